package seccap

import (
	"fmt"

	"github.com/landlock-lsm/go-landlock/landlock"
	llsyscall "github.com/landlock-lsm/go-landlock/landlock/syscall"
	"golang.org/x/sys/unix"
)

// LandlockABI is the kernel's landlock ABI version; 0 when it has none.
func LandlockABI() int {
	v, err := llsyscall.LandlockGetABIVersion()
	if err != nil {
		return 0
	}
	return v
}

// restrictLandlock enforces, on every thread and as far as the kernel's
// ABI goes (go-landlock's best effort), every filesystem, network and
// scope right landlock knows, with these exceptions only:
//
//   - c.DialUnix directories: connecting to Unix sockets in them (the
//     resolve_unix right of ABI 9; older ABIs do not restrict pathname
//     Unix socket connects at all, which is why the jail exists);
//   - c.DialTCP ports: TCP connects to them (ABI 4).
//
// So no file can be opened, created, removed or executed, no TCP port
// bound, no abstract Unix socket reached and no other process signalled.
// Descriptors opened before keep the rights they were opened with.
func restrictLandlock(c Config) (abi int, rules string, err error) {
	abi = LandlockABI()
	fd, flags, err := landlockRuleset(c)
	if err != nil {
		return abi, "", err
	}
	if fd < 0 {
		return 0, "", nil // no landlock in this kernel
	}
	defer unix.Close(fd)
	if abi >= 8 {
		// One call from this thread restricts them all.
		err = llsyscall.LandlockRestrictSelf(fd, flags|llsyscall.FlagRestrictSelfTSync)
	} else {
		err = llsyscall.AllThreadsLandlockRestrictSelf(fd, flags)
	}
	if err != nil {
		return abi, "", fmt.Errorf("landlock_restrict_self: %w", err)
	}
	return abi, describeLandlock(c), nil
}

// landlockRuleset makes c's ruleset (and extra rules), best effort down
// to the kernel's ABI: a descriptor, or -1 when the kernel has no
// landlock. go-landlock builds it; its Restrict is not used: before ABI 8
// it sets no_new_privs on every thread first, one more stop-the-world
// than needed when the threads have it already (see dropPrivileges).
func landlockRuleset(c Config, extra ...landlock.Rule) (fd int, flags uint32, err error) {
	var rs []landlock.Rule
	if len(c.DialUnix) > 0 {
		rs = append(rs, landlock.PathAccess(0, c.DialUnix...).WithResolveUnix())
	}
	for _, p := range c.DialTCP {
		rs = append(rs, landlock.ConnectTCP(p))
	}
	fd, flags, err = landlock.V11.BestEffort().NewRulesetFD(append(rs, extra...)...)
	if err != nil {
		return -1, 0, fmt.Errorf("ruleset: %w", err)
	}
	return fd, flags, nil
}

// LandlockForkThread is for the control plane, on the OS thread that is
// about to start a VM process that will not be jailed, after
// PrepareForkThread (which sets no_new_privs): it restricts that thread
// alone with c's landlock ruleset, plus reading and executing exe (the VM
// process's binary, for the exec). The VM process then runs landlocked
// from its exec on, on every thread, and its sandbox need not restrict
// its threads itself, which before landlock ABI 8 stops the world (and
// then, while the VM is being built, interrupts KVM's ioctls); hand it c
// with Landlocked set. The VM process opens nothing by path, so it loses
// nothing. The thread must stay locked until its goroutine ends. A
// kernel without landlock makes this do nothing.
func LandlockForkThread(c Config, exe string) error {
	fd, flags, err := landlockRuleset(c, landlock.PathAccess(llsyscall.AccessFSExecute|llsyscall.AccessFSReadFile, exe))
	if err != nil {
		return fmt.Errorf("landlock: %w", err)
	}
	if fd < 0 {
		return nil
	}
	defer unix.Close(fd)
	if err := llsyscall.LandlockRestrictSelf(fd, flags); err != nil {
		return fmt.Errorf("landlock_restrict_self: %w", err)
	}
	return nil
}

func describeLandlock(c Config) string {
	s := "(no file opens"
	if len(c.DialTCP) > 0 {
		s += fmt.Sprintf(", TCP connects to ports %v only", c.DialTCP)
	} else {
		s += ", no TCP"
	}
	return s + ")"
}
