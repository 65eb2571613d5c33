package cluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rayvmm/rayvmm/shards/link"
	"github.com/rayvmm/rayvmm/vmproc"
)

// Agents starts, for each sharded disk of a VM, the agent that owns the
// volume while the VM runs: `rayvmmd shard attach NAME` (see
// shards.AttachLink and shards.Attachment.Serve), which keeps the
// ownership lease, records replica state changes in etcd, looks nodes
// up, dials them and passes the sockets to the VM process over the link,
// and repairs the volume in the background. It implements
// vmproc/control's ShardedVolumes for rayvmm, which links no etcd.
//
// Lifetimes: the agent lives exactly as long as its link. rayvmm makes
// the socketpair, gives one end to the agent and, once the agent owns the
// volume, the other to the VM process; when every holder of the VM end is
// gone (the VM process exited or was killed, or rayvmm was killed before
// it started one), the agent reads EOF, gives the volume up and exits. It
// runs in a session of its own, so the terminal's signals (Ctrl-C) reach
// the VM and not the agent, which must stay for the VM's final flush.
type Agents struct {
	// StateDir and Endpoints are passed on as --state-dir and
	// --etcd-endpoints.
	StateDir  string
	Endpoints []string
	// Binary is rayvmmd's path; "" finds it (vmproc.FindDaemon).
	Binary string
	// Stderr receives the agents' log lines (replica failures, rebuilds);
	// nil discards them. Verbose logs rebuilds too, not only warnings.
	Stderr  *os.File
	Verbose bool
	// Wait bounds how long Attach waits for an agent to own its volume
	// (default one minute: it may start the embedded etcd first) and how
	// long the detach waits for it to exit (default 30 s).
	Wait time.Duration
}

// agentReady is the line an agent writes on its ready descriptor once it
// owns the volume; anything else is its error.
const agentReady = "ok"

// Attach starts the agent for the sharded volume name of the VM vm and
// returns the VM process's end of the link once the agent owns the
// volume, and a function to call once the VM process has exited (and
// every copy of that end is closed): it waits for the agent to give the
// volume up and exit. The error of an agent that could not attach (no
// such volume, etcd unreachable) is the agent's own message.
func (a *Agents) Attach(ctx context.Context, name, vm string) (_ *os.File, detach func() error, err error) {
	bin := a.Binary
	if bin == "" {
		if bin, err = vmproc.FindDaemon(); err != nil {
			return nil, nil, fmt.Errorf("sharded volume %s: %w", name, err)
		}
	}
	wait := a.Wait
	if wait <= 0 {
		wait = time.Minute
	}
	ctlEnd, vmEnd, err := link.Pair()
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if err != nil {
			vmEnd.Close()
		}
	}()
	defer ctlEnd.Close() // the agent has its own copy
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	defer readyR.Close()
	args := []string{vmproc.DaemonBinary, "--state-dir", a.StateDir}
	if len(a.Endpoints) > 0 {
		args = append(args, "--etcd-endpoints", strings.Join(a.Endpoints, ","))
	}
	args = append(args, "shard", "attach", name, "--holder", "VM "+vm+" (rayvmm boot)", "--link-fd", "3", "--ready-fd", "4")
	if a.Verbose {
		args = append(args, "-v")
	}
	cmd := &exec.Cmd{Path: bin, Args: args, Stdout: a.Stderr, Stderr: a.Stderr,
		ExtraFiles:  []*os.File{ctlEnd, readyW},
		SysProcAttr: &syscall.SysProcAttr{Setsid: true}}
	err = cmd.Start()
	readyW.Close()
	if err != nil {
		return nil, nil, fmt.Errorf("sharded volume %s: start its agent %s: %w", name, bin, err)
	}
	// exited holds the agent's end once it is known. An agent ends with
	// status 0 once the VM process's end of the link is closed; one that
	// fails or is killed before is reported at once: the VM's I/O to the
	// volume fails from then on (its engine is fenced).
	exited := make(chan error, 1)
	var attached atomic.Bool // from its ready line to the detach
	go func() {
		err := cmd.Wait()
		if err != nil && attached.Load() && a.Stderr != nil {
			fmt.Fprintf(a.Stderr, "rayvmm: sharded volume %s: its agent (pid %d) ended while the VM runs (%v); the VM's I/O to the volume fails from now on\n", name, cmd.Process.Pid, err)
		}
		exited <- err
	}()
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(readyR).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	fail := func(err error) (*os.File, func() error, error) {
		cmd.Process.Kill()
		<-exited
		return nil, nil, err
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case l := <-line:
		if l != agentReady {
			if l == "" {
				err := <-exited
				return nil, nil, fmt.Errorf("sharded volume %s: its agent (%s shard attach) exited without attaching it: %v", name, bin, err)
			}
			return fail(errors.New(l))
		}
	case <-t.C:
		return fail(fmt.Errorf("sharded volume %s: its agent did not attach it within %v", name, wait))
	case <-ctx.Done():
		return fail(fmt.Errorf("sharded volume %s: %w", name, context.Cause(ctx)))
	}
	attached.Store(true)
	detach = func() error {
		attached.Store(false)
		t := time.NewTimer(a.exitWait())
		defer t.Stop()
		select {
		case err := <-exited:
			if err != nil {
				return fmt.Errorf("sharded volume %s: its agent: %w (the replicas are resynced at the next attach)", name, err)
			}
			return nil
		case <-t.C:
			cmd.Process.Kill()
			<-exited
			return fmt.Errorf("sharded volume %s: its agent did not exit within %v after the VM; killed it", name, a.exitWait())
		}
	}
	return vmEnd, detach, nil
}

func (a *Agents) exitWait() time.Duration {
	if a.Wait > 0 {
		return a.Wait
	}
	return 30 * time.Second
}
