package network

import (
	"fmt"
	"os"
	"syscall"

	"github.com/songgao/water"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/rayvmm/rayvmm/network/port"
)

// TAP is a TAP interface OpenTAP opened: the data path (port.TAP) and
// whether OpenTAP created it.
type TAP struct {
	*port.TAP
	created bool // by OpenTAP, so it goes away on Close
}

// OpenTAP opens the TAP interface name in the calling thread's network
// namespace, creating it when it does not exist. A TAP it creates is not
// persistent: the kernel deletes it when the last descriptor closes, also
// when the process holding it is killed. An existing TAP (made persistent
// by someone else, e.g. "ip tuntap add") stays persistent and survives
// Close.
func OpenTAP(name string) (*TAP, error) {
	if err := checkIfName(name, "tap"); err != nil {
		return nil, err
	}
	existing, err := tapExists(name)
	if err != nil {
		return nil, err
	}
	cfg := water.Config{DeviceType: water.TAP}
	cfg.Name = name
	// water always issues TUNSETPERSIST with this flag: keep a TAP that was
	// already there (and so persistent) persistent.
	cfg.Persist = existing
	f, ifname, err := openCloexec(cfg)
	if err != nil {
		return nil, fmt.Errorf("open TAP %s: %w", name, err)
	}
	t, err := port.NewTAP(f, ifname)
	if err != nil {
		return nil, fmt.Errorf("open TAP %s: %w", name, err)
	}
	return &TAP{TAP: t, created: !existing}, nil
}

// openCloexec is water.New with the descriptor made close-on-exec. water
// opens /dev/net/tun without O_CLOEXEC, so a process started meanwhile (by
// any goroutine) would inherit the TAP and keep it alive after Close and
// after rayvmm exits. Holding syscall.ForkLock for reading until the flag
// is set keeps os/exec from forking in between, as the standard library
// does for descriptors it cannot open close-on-exec atomically.
func openCloexec(cfg water.Config) (*os.File, string, error) {
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	ifc, err := water.New(cfg)
	if err != nil {
		return nil, "", err
	}
	f, ok := ifc.ReadWriteCloser.(*os.File)
	if !ok {
		ifc.Close()
		return nil, "", fmt.Errorf("water returned a %T, not a file", ifc.ReadWriteCloser)
	}
	// Not f.Fd(): it would put the descriptor in blocking mode.
	raw, err := f.SyscallConn()
	if err == nil {
		err = raw.Control(func(fd uintptr) { unix.CloseOnExec(int(fd)) })
	}
	if err != nil {
		ifc.Close()
		return nil, "", err
	}
	return f, ifc.Name(), nil
}

// tapExists reports whether a TAP called name exists; another kind of
// interface with that name is an error.
func tapExists(name string) (bool, error) {
	l, err := netlink.LinkByName(name)
	switch {
	case isNotFound(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("look up %s: %w", name, err)
	}
	if t, ok := l.(*netlink.Tuntap); !ok || t.Mode != netlink.TUNTAP_MODE_TAP {
		return false, fmt.Errorf("interface %s exists and is a %s, not a TAP", name, l.Type())
	}
	return true, nil
}
