package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/rayvmm/rayvmm/pods"
	"github.com/rayvmm/rayvmm/state"
)

// A pod's record in the state store's "pods" bucket: the spec as applied,
// who applied it, what the daemon last knew of each VM (for a restarted
// daemon to re-adopt it: pid and process start time) and its events.

// record is one pod's record.
type record struct {
	UID     string      `json:"uid"`
	Pod     *pods.Pod   `json:"pod"`
	Owner   pods.Owner  `json:"owner"`
	Created time.Time   `json:"created"`
	Stopped bool        `json:"stopped,omitempty"` // stop asked for, or the pod failed to start: nothing is (re)started
	Reason  string      `json:"reason,omitempty"`
	Message string      `json:"message,omitempty"`
	VMs     []*vmRecord `json:"vms"`
	// Volumes are the pod volumes made for it (store names).
	Volumes []string     `json:"volumes,omitempty"`
	Events  []pods.Event `json:"events,omitempty"`
}

// vmRecord is what the daemon knows of one VM.
type vmRecord struct {
	Name string `json:"name"`
	// PID and StartTime identify the VM process while it is believed to
	// run (both zero otherwise).
	PID       int    `json:"pid,omitempty"`
	StartTime uint64 `json:"start_time,omitempty"`
	// Instance counts the VM's launches; Launched is when the last began.
	Instance int `json:"instance"`
	// Started: the startup probe passed for this process (or there is
	// none); Ready: it is ready.
	Started      bool         `json:"started,omitempty"`
	Ready        bool         `json:"ready,omitempty"`
	State        pods.VMState `json:"state"`
	LastState    pods.VMState `json:"lastState,omitzero"`
	RestartCount int32        `json:"restartCount"`
	// Backoff is the delay the next restart waits; NextStart when the
	// pending one may start.
	Backoff   time.Duration `json:"backoff_ns,omitempty"`
	NextStart time.Time     `json:"next_start,omitzero"`
	// OOMKills is the cgroup's OOM kill count when this process started.
	OOMKills uint64 `json:"oom_kills,omitempty"`
}

// maxEvents bounds a pod's event list (the oldest go first).
const maxEvents = 200

var records = state.NewBucket("pods", checkRecord)

// checkRecord refuses a record the daemon could not have written.
func checkRecord(name string, r *record) error {
	if r.Pod == nil {
		return errors.New("no pod spec")
	}
	if r.Pod.Metadata.Name != name {
		return fmt.Errorf("record names pod %q", r.Pod.Metadata.Name)
	}
	if err := r.Pod.Validate(); err != nil {
		return fmt.Errorf("pod spec: %w", err)
	}
	if len(r.VMs) != len(r.Pod.Spec.VMs) {
		return fmt.Errorf("%d VM records for %d VMs", len(r.VMs), len(r.Pod.Spec.VMs))
	}
	if !validUID(r.UID) {
		return fmt.Errorf("uid %q", r.UID)
	}
	for i, v := range r.VMs {
		switch {
		case v == nil || v.Name != r.Pod.Spec.VMs[i].Name:
			return fmt.Errorf("VM record %d does not match the spec", i)
		case v.PID < 0 || v.Instance < 0 || v.RestartCount < 0 || v.Backoff < 0:
			return fmt.Errorf("VM %s: negative count", v.Name)
		case (v.PID == 0) != (v.StartTime == 0):
			return fmt.Errorf("VM %s: pid without start time", v.Name)
		}
	}
	for _, n := range r.Volumes {
		if !slices.ContainsFunc(r.Pod.Spec.Volumes, func(v pods.Volume) bool { return pods.VolumeName(name, v.Name) == n }) {
			return fmt.Errorf("volume %q is not one of the pod's", n)
		}
	}
	return nil
}

// validUID: 16 lower-case hex digits.
func validUID(s string) bool {
	if len(s) != 16 {
		return false
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// clone deep-copies a record for writing outside the daemon's lock.
func (r *record) clone() *record {
	b, err := json.Marshal(r)
	if err != nil {
		panic(err) // a record is always marshalable
	}
	var c record
	if err := json.Unmarshal(b, &c); err != nil {
		panic(err)
	}
	return &c
}

// persister writes dirty records to the state store in batches: every
// change marks its pod dirty and the writer commits whatever is dirty in
// one transaction (one fsync for many changes). A caller that must know
// its change is on disk before it goes on (a VM's pid, before the VM
// runs) waits for the commit.
type persister struct {
	st *state.Store

	mu      sync.Mutex
	dirty   map[string]*record // name -> snapshot; nil snapshot: delete
	waiters []chan error
	kick    chan struct{}
}

func newPersister(st *state.Store) *persister {
	return &persister{st: st, dirty: map[string]*record{}, kick: make(chan struct{}, 1)}
}

// mark queues a snapshot of a pod's record (nil: delete it) and returns a
// channel that yields the commit's result.
func (p *persister) mark(name string, snap *record) <-chan error {
	ch := make(chan error, 1)
	p.mu.Lock()
	p.dirty[name] = snap
	p.waiters = append(p.waiters, ch)
	p.mu.Unlock()
	select {
	case p.kick <- struct{}{}:
	default:
	}
	return ch
}

// run commits until stop is closed, then commits what is left.
func (p *persister) run(stop <-chan struct{}) {
	for {
		select {
		case <-p.kick:
			p.commit()
		case <-stop:
			p.commit()
			return
		}
	}
}

func (p *persister) commit() {
	p.mu.Lock()
	dirty, waiters := p.dirty, p.waiters
	p.dirty, p.waiters = map[string]*record{}, nil
	p.mu.Unlock()
	if len(dirty) == 0 {
		for _, w := range waiters {
			w <- nil
		}
		return
	}
	err := p.st.Update(func(tx *state.Tx) error {
		for name, r := range dirty {
			var err error
			if r == nil {
				err = records.Delete(tx, name)
			} else {
				err = records.Put(tx, name, r)
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
	for _, w := range waiters {
		w <- err
	}
}

// loadRecords reads every pod record.
func loadRecords(st *state.Store) (map[string]*record, error) {
	out := map[string]*record{}
	err := st.View(func(tx *state.Tx) error {
		return records.ForEach(tx, func(name string, r *record) error {
			out[name] = r
			return nil
		})
	})
	return out, err
}
