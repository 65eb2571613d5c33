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
	var rs []landlock.Rule
	if len(c.DialUnix) > 0 {
		rs = append(rs, landlock.PathAccess(0, c.DialUnix...).WithResolveUnix())
	}
	for _, p := range c.DialTCP {
		rs = append(rs, landlock.ConnectTCP(p))
	}
	// go-landlock builds the ruleset, best effort down to the kernel's
	// ABI. Its Restrict is not used: before ABI 8 it sets no_new_privs
	// on every thread first, one more stop-the-world than needed when
	// the threads have it already (see dropPrivileges).
	fd, flags, err := landlock.V11.BestEffort().NewRulesetFD(rs...)
	if err != nil {
		return abi, "", fmt.Errorf("ruleset: %w", err)
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

func describeLandlock(c Config) string {
	s := "(no file opens"
	if len(c.DialTCP) > 0 {
		s += fmt.Sprintf(", TCP connects to ports %v only", c.DialTCP)
	} else {
		s += ", no TCP"
	}
	return s + ")"
}
