package api

import (
	"bytes"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/rayvmm/rayvmm/devices/virtio/blk"
	vnet "github.com/rayvmm/rayvmm/devices/virtio/net"
	"github.com/rayvmm/rayvmm/devices/virtio/vsock"
)

// The metrics are written in the Prometheus text exposition format
// (version 0.0.4) by hand. Why not the Prometheus Go client: it brings
// protobuf, its registry and expfmt into the VM process, whose whole
// memory budget is 5 MiB. Measured on the development machine with the
// same small program serving one scrape on a Unix socket: 3.4 MiB peak RSS
// writing the text by hand, 6.5 MiB with client_golang v1.25's registry
// and expfmt's encoder (and no net/http): 3.1 MiB more, more than the VM
// process's whole margin. For a fixed set of counters read from atomics at
// scrape time the format is a few lines of code; the tests read it back
// with the Prometheus parser (expfmt), so the two agree.

// family is one metric family being written.
type family struct {
	b          *bytes.Buffer
	name, typ  string
	help       string
	headerDone bool
}

func (f *family) header() {
	if !f.headerDone {
		fmt.Fprintf(f.b, "# HELP %s %s\n# TYPE %s %s\n", f.name, f.help, f.name, f.typ)
		f.headerDone = true
	}
}

// sample writes one sample of the family with label pairs.
func (f *family) sample(suffix string, v float64, labels ...string) {
	f.header()
	f.b.WriteString(f.name + suffix)
	if len(labels) > 0 {
		f.b.WriteByte('{')
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				f.b.WriteByte(',')
			}
			f.b.WriteString(labels[i] + `="` + escapeLabel(labels[i+1]) + `"`)
		}
		f.b.WriteByte('}')
	}
	f.b.WriteByte(' ')
	f.b.WriteString(strconv.FormatFloat(v, 'g', -1, 64))
	f.b.WriteByte('\n')
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

func escapeLabel(s string) string { return labelEscaper.Replace(s) }

// metrics renders every metric of the VM.
func (a *Server) metrics() []byte {
	var b bytes.Buffer
	fam := func(name, typ, help string) *family { return &family{b: &b, name: name, typ: typ, help: help} }
	v := a.vm

	up := fam("rayvmm_vm_uptime_seconds", "gauge", "Seconds since the vCPUs started.")
	up.sample("", v.Uptime().Seconds())
	paused := fam("rayvmm_vm_paused", "gauge", "1 while the VM is paused through the API.")
	pv := 0.0
	if v.State() == "Paused" {
		pv = 1
	}
	paused.sample("", pv)

	bt := v.BootTimes()
	for _, m := range []struct {
		name, help string
		val        float64
	}{
		{"rayvmm_boot_first_kvm_run_seconds", "Wall time from the control plane's start to the first KVM_RUN.", bt.FirstRunWall.Seconds()},
		{"rayvmm_boot_first_kvm_run_cpu_seconds", "CPU time (control plane and VM process) to the first KVM_RUN.", bt.FirstRunCPU.Seconds()},
		{"rayvmm_boot_ready_seconds", "Wall time from the control plane's start to the guest's ready signal (0 until it comes).", bt.ReadyWall.Seconds()},
		{"rayvmm_boot_ready_cpu_seconds", "CPU time (control plane and VM process) to the guest's ready signal.", bt.ReadyCPU.Seconds()},
	} {
		fam(m.name, "gauge", m.help).sample("", m.val)
	}

	exits := fam("rayvmm_vcpu_exits_total", "counter", "KVM_RUN returns by vCPU and reason (signal: a kick or Go's preemption).")
	for _, e := range v.Exits() {
		for _, k := range sortedKeys(e.ByKind) {
			exits.sample("", float64(e.ByKind[k]), "vcpu", strconv.Itoa(e.VCPU), "reason", k)
		}
	}

	disks := v.Disks()
	snaps := make([]blk.Snapshot, len(disks))
	for i, d := range disks {
		snaps[i] = d.Device.Metrics().Snapshot()
	}
	for _, m := range []struct {
		name, help string
		get        func(blk.Snapshot) uint64
	}{
		{"rayvmm_disk_read_ops_total", "Read requests completed.", func(s blk.Snapshot) uint64 { return s.ReadOps }},
		{"rayvmm_disk_write_ops_total", "Write requests completed.", func(s blk.Snapshot) uint64 { return s.WriteOps }},
		{"rayvmm_disk_flush_ops_total", "Flush requests completed.", func(s blk.Snapshot) uint64 { return s.FlushOps }},
		{"rayvmm_disk_discard_ops_total", "Discard requests completed.", func(s blk.Snapshot) uint64 { return s.DiscardOps }},
		{"rayvmm_disk_write_zeroes_ops_total", "Write-zeroes requests completed.", func(s blk.Snapshot) uint64 { return s.WriteZeroesOps }},
		{"rayvmm_disk_read_bytes_total", "Bytes read.", func(s blk.Snapshot) uint64 { return s.ReadBytes }},
		{"rayvmm_disk_written_bytes_total", "Bytes written.", func(s blk.Snapshot) uint64 { return s.WriteBytes }},
	} {
		f := fam(m.name, "counter", m.help)
		for i, d := range disks {
			f.sample("", float64(m.get(snaps[i])), "disk", d.Spec.ID)
		}
	}
	errs := fam("rayvmm_disk_errors_total", "counter", "Requests refused or failed, by kind.")
	thr := fam("rayvmm_disk_throttled_seconds_total", "counter", "Time requests waited for the rate limiter.")
	lat := fam("rayvmm_disk_request_duration_seconds", "histogram", "Time from a request's pop to its completion.")
	for i, d := range disks {
		s := snaps[i]
		for _, k := range sortedKeys(s.Errors) {
			errs.sample("", float64(s.Errors[k]), "disk", d.Spec.ID, "kind", k)
		}
		thr.sample("", s.ThrottledSeconds, "disk", d.Spec.ID)
		for _, bk := range s.Latency.Buckets {
			lat.sample("_bucket", float64(bk.Count), "disk", d.Spec.ID, "le", strconv.FormatFloat(bk.LeSeconds, 'g', -1, 64))
		}
		lat.sample("_bucket", float64(s.Latency.Count), "disk", d.Spec.ID, "le", "+Inf")
		lat.sample("_sum", s.Latency.SumSeconds, "disk", d.Spec.ID)
		lat.sample("_count", float64(s.Latency.Count), "disk", d.Spec.ID)
	}

	nics := v.NICs()
	nsnaps := make([]vnet.Snapshot, len(nics))
	for i, n := range nics {
		nsnaps[i] = n.Device.Metrics().Snapshot()
	}
	for _, m := range []struct {
		name, help string
		get        func(vnet.Snapshot) float64
	}{
		{"rayvmm_net_rx_frames_total", "Frames delivered to the guest.", func(s vnet.Snapshot) float64 { return float64(s.RxFrames) }},
		{"rayvmm_net_rx_bytes_total", "Bytes delivered to the guest.", func(s vnet.Snapshot) float64 { return float64(s.RxBytes) }},
		{"rayvmm_net_tx_frames_total", "Frames sent by the guest.", func(s vnet.Snapshot) float64 { return float64(s.TxFrames) }},
		{"rayvmm_net_tx_bytes_total", "Bytes sent by the guest.", func(s vnet.Snapshot) float64 { return float64(s.TxBytes) }},
		{"rayvmm_net_rx_throttled_seconds_total", "Time frames toward the guest waited for the rate limiter.", func(s vnet.Snapshot) float64 { return float64(s.RxThrottledNs) / 1e9 }},
		{"rayvmm_net_tx_throttled_seconds_total", "Time frames from the guest waited for the rate limiter.", func(s vnet.Snapshot) float64 { return float64(s.TxThrottledNs) / 1e9 }},
		{"rayvmm_net_interrupts_total", "Interrupts raised to the guest.", func(s vnet.Snapshot) float64 { return float64(s.Interrupts) }},
	} {
		f := fam(m.name, "counter", m.help)
		for i, n := range nics {
			f.sample("", m.get(nsnaps[i]), "nic", n.Spec.ID)
		}
	}
	drops := fam("rayvmm_net_dropped_frames_total", "counter", "Frames dropped, by direction and reason.")
	for i, n := range nics {
		s := nsnaps[i]
		for _, d := range []struct {
			dir, reason string
			v           uint64
		}{
			{"rx", "no_buffer", s.RxDropNoBuffer}, {"rx", "small_buffer", s.RxDropSmallBuffer}, {"rx", "bad_chain", s.RxDropBadChain},
			{"rx", "too_big", s.RxDropTooBig}, {"rx", "inactive", s.RxDropInactive}, {"rx", "port_error", s.RxPortErrors},
			{"tx", "bad_chain", s.TxDropBadChain}, {"tx", "too_big", s.TxDropTooBig}, {"tx", "runt", s.TxDropRunt},
			{"tx", "offload", s.TxDropOffload}, {"tx", "port_error", s.TxPortErrors},
		} {
			drops.sample("", float64(d.v), "nic", n.Spec.ID, "direction", d.dir, "reason", d.reason)
		}
	}
	if vs := v.Vsock(); vs != nil {
		vsockMetrics(fam, vs.Device.Metrics().Snapshot())
	}
	return b.Bytes()
}

// vsockMetrics writes the vsock device's counters (a VM has at most one).
func vsockMetrics(fam func(name, typ, help string) *family, s vsock.Snapshot) {
	for _, m := range []struct {
		name, typ, help string
		v               uint64
	}{
		{"rayvmm_vsock_rx_packets_total", "counter", "Packets delivered to the guest.", s.RxPackets},
		{"rayvmm_vsock_rx_bytes_total", "counter", "Data bytes delivered to the guest.", s.RxBytes},
		{"rayvmm_vsock_tx_packets_total", "counter", "Packets sent by the guest.", s.TxPackets},
		{"rayvmm_vsock_tx_bytes_total", "counter", "Data bytes from the guest written to host sockets.", s.TxBytes},
		{"rayvmm_vsock_connections", "gauge", "Connections open now (both directions, handshakes included).", s.ConnsAdded - s.ConnsRemoved},
		{"rayvmm_vsock_host_connects_total", "counter", "Host connections accepted on the vsock socket.", s.HostConnects},
		{"rayvmm_vsock_host_connects_established_total", "counter", "Host connections the guest accepted (OK sent).", s.HostConnectsOK},
		{"rayvmm_vsock_guest_connects_total", "counter", "Guest connection requests to the host.", s.GuestConnects},
		{"rayvmm_vsock_guest_connects_refused_total", "counter", "Guest connection requests nothing listened for (RST).", s.GuestRefused},
		{"rayvmm_vsock_interrupts_total", "counter", "Interrupts raised to the guest.", s.Interrupts},
	} {
		fam(m.name, m.typ, m.help).sample("", float64(m.v))
	}
	errs := fam("rayvmm_vsock_errors_total", "counter", "Packets, connections and host clients refused or failed, by kind (none stops the device).")
	for _, e := range []struct {
		kind string
		v    uint64
	}{
		{"handshake", s.HandshakeErrors}, {"handshake_timeout", s.HandshakeTimeouts}, {"conn_limit", s.ConnLimit},
		{"request_timeout", s.RequestTimeouts}, {"shutdown_timeout", s.ShutdownTimeouts},
		{"bad_chain", s.BadChain}, {"bad_header", s.BadHeader}, {"bad_type", s.BadType}, {"bad_cid", s.BadCID},
		{"bad_op", s.BadOp}, {"unroutable", s.Unroutable}, {"credit_overflow", s.CreditOverflow}, {"rst_dropped", s.RstDropped},
		{"host_read", s.HostReadErrors}, {"host_write", s.HostWriteErrors}, {"interrupt", s.InterruptErrors},
		{"queue", s.QueueErrors}, {"loop", s.LoopErrors}, {"config_write", s.ConfigWrites},
	} {
		errs.sample("", float64(e.v), "kind", e.kind)
	}
}

func sortedKeys(m map[string]uint64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
