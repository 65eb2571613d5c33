package daemon

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/vmm/api/client"
)

// The daemon's /metrics, with the Prometheus Go client:
//
//	rayvmm_pods{phase}                               pods by phase
//	rayvmm_pod_vm_restarts_total{pod,vm}             restarts
//	rayvmm_pod_vm_ready{pod,vm}                      1 while Ready
//	rayvmm_pod_vm_probe_total{pod,vm,probe,result}   probe tries by outcome
//	rayvmm_pod_vm_cpu_seconds_total{pod,vm}          the VM cgroup's CPU time
//	rayvmm_pod_vm_memory_bytes{pod,vm}               the VM cgroup's memory use
//	rayvmm_pod_vm_oom_kills_total{pod,vm}            OOM kills in the VM cgroup
//	rayvmm_disk_* / rayvmm_net_*{pod,vm,...}         each running VM's disk and
//	                                                 NIC counters, scraped from
//	                                                 its API's GET /metrics
//
// and the Go and process collectors of the daemon itself.
//
// A caller sees a sample labelled with a pod only when the access policy
// lets it inspect that pod, as `pod ps` lists only those pods (see
// handleMetrics); the samples without a pod label (pods by phase, the
// daemon's own) are for every caller the socket lets in.

type metrics struct {
	d      *Daemon
	reg    *prometheus.Registry
	probes *prometheus.CounterVec

	podsDesc, restartsDesc, readyDesc, cpuDesc, memDesc, oomDesc *prometheus.Desc
}

func newMetrics(d *Daemon) *metrics {
	m := &metrics{
		d:   d,
		reg: prometheus.NewRegistry(),
		probes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rayvmm_pod_vm_probe_total", Help: "Probe tries by VM, probe (startup, liveness, readiness) and result (success, failure).",
		}, []string{"pod", "vm", "probe", "result"}),
		podsDesc:     prometheus.NewDesc("rayvmm_pods", "Pods by phase.", []string{"phase"}, nil),
		restartsDesc: prometheus.NewDesc("rayvmm_pod_vm_restarts_total", "Times each VM was restarted.", []string{"pod", "vm"}, nil),
		readyDesc:    prometheus.NewDesc("rayvmm_pod_vm_ready", "1 while the VM is Ready.", []string{"pod", "vm"}, nil),
		cpuDesc:      prometheus.NewDesc("rayvmm_pod_vm_cpu_seconds_total", "CPU time of the VM process, from its cgroup.", []string{"pod", "vm"}, nil),
		memDesc:      prometheus.NewDesc("rayvmm_pod_vm_memory_bytes", "Memory charged to the VM's cgroup.", []string{"pod", "vm"}, nil),
		oomDesc:      prometheus.NewDesc("rayvmm_pod_vm_oom_kills_total", "Processes the OOM killer ended in the VM's cgroup.", []string{"pod", "vm"}, nil),
	}
	m.reg.MustRegister(m.probes, m, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) probed(pod, vm, kind string, ok bool) {
	result := "success"
	if !ok {
		result = "failure"
	}
	m.probes.WithLabelValues(pod, vm, kind, result).Inc()
}

// handler serves the samples whose pod label, if they have one, names a
// pod in visible.
func (m *metrics) handler(visible map[string]bool) http.Handler {
	g := prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		mfs, err := m.reg.Gather() // built anew for each call: ours to change
		out := mfs[:0]
		for _, mf := range mfs {
			kept := mf.Metric[:0]
			for _, s := range mf.Metric {
				if pod, ok := podLabel(s); !ok || visible[pod] {
					kept = append(kept, s)
				}
			}
			if len(kept) > 0 {
				mf.Metric = kept
				out = append(out, mf)
			}
		}
		return out, err
	})
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// podLabel is a sample's pod label, if it has one.
func podLabel(s *dto.Metric) (string, bool) {
	for _, l := range s.GetLabel() {
		if l.GetName() == "pod" {
			return l.GetValue(), true
		}
	}
	return "", false
}

// Describe is empty: the VM metrics scraped from the VMs are only known
// at collection time (an unchecked collector).
func (m *metrics) Describe(chan<- *prometheus.Desc) {}

// vmView is what one collection needs of a VM, copied under the lock.
type vmView struct {
	pod, vm  string
	restarts int32
	ready    bool
	in       *instance
}

// Collect reads the pods under the lock, then each VM's cgroup and API
// outside it.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	d := m.d
	phases := map[string]int{}
	var vms []vmView
	d.mu.Lock()
	for _, p := range d.pods {
		phases[p.phase()]++
		for _, v := range p.vms {
			vms = append(vms, vmView{pod: p.name(), vm: v.spec.Name, restarts: v.rec.RestartCount, ready: v.rec.Ready, in: v.cur})
		}
	}
	d.mu.Unlock()
	for _, ph := range pods.Phases {
		ch <- prometheus.MustNewConstMetric(m.podsDesc, prometheus.GaugeValue, float64(phases[ph]), ph)
	}
	var wg sync.WaitGroup
	for _, v := range vms {
		ch <- prometheus.MustNewConstMetric(m.restartsDesc, prometheus.CounterValue, float64(v.restarts), v.pod, v.vm)
		ready := 0.0
		if v.ready {
			ready = 1
		}
		ch <- prometheus.MustNewConstMetric(m.readyDesc, prometheus.GaugeValue, ready, v.pod, v.vm)
		if v.in == nil {
			continue
		}
		if v.in.group != nil {
			if st, err := v.in.group.Stats(); err == nil {
				ch <- prometheus.MustNewConstMetric(m.cpuDesc, prometheus.CounterValue, st.CPUSeconds, v.pod, v.vm)
				ch <- prometheus.MustNewConstMetric(m.memDesc, prometheus.GaugeValue, float64(st.MemoryBytes), v.pod, v.vm)
				ch <- prometheus.MustNewConstMetric(m.oomDesc, prometheus.CounterValue, float64(st.OOMKills), v.pod, v.vm)
			}
		}
		wg.Go(func() { scrapeVM(ch, v) })
	}
	wg.Wait()
}

// scrapeVM re-exports a running VM's disk and NIC counters, with pod and
// vm labels added.
func scrapeVM(ch chan<- prometheus.Metric, v vmView) {
	defer func() {
		// What a VM serves is its business: a parser that chokes on it
		// costs this scrape that VM's counters, never the daemon.
		recover()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c := client.New(v.in.eff.APISocket)
	defer c.Close()
	text, err := c.Metrics(ctx)
	if err != nil {
		return
	}
	fams, err := parseText(text)
	if err != nil {
		return
	}
	for name, f := range fams {
		if !strings.HasPrefix(name, "rayvmm_disk_") && !strings.HasPrefix(name, "rayvmm_net_") {
			continue
		}
		var vt prometheus.ValueType
		switch f.GetType() {
		case dto.MetricType_COUNTER:
			vt = prometheus.CounterValue
		case dto.MetricType_GAUGE:
			vt = prometheus.GaugeValue
		default:
			continue // histograms stay on the VM's own API
		}
		for _, mt := range f.GetMetric() {
			names, values := []string{"pod", "vm"}, []string{v.pod, v.vm}
			for _, l := range mt.GetLabel() {
				if l.GetName() == "pod" || l.GetName() == "vm" {
					continue
				}
				names, values = append(names, l.GetName()), append(values, l.GetValue())
			}
			val := mt.GetCounter().GetValue()
			if vt == prometheus.GaugeValue {
				val = mt.GetGauge().GetValue()
			}
			desc := prometheus.NewDesc(name, f.GetHelp(), names, nil)
			if m, err := prometheus.NewConstMetric(desc, vt, val, values...); err == nil {
				ch <- m
			}
		}
	}
}

// parseText parses Prometheus text format.
func parseText(b []byte) (map[string]*dto.MetricFamily, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(bytes.NewReader(b))
}
