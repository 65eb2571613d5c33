package policy

import (
	"fmt"
	"net"
	"os/user"
	"strconv"

	"golang.org/x/sys/unix"
)

// Caller is who is at the other end of a Unix socket, as the kernel
// recorded when it connected: its pid, uid, gid and supplementary groups
// (SO_PEERCRED and SO_PEERGROUPS). The daemon identifies every request
// this way; nothing the caller sends can change it.
type Caller struct {
	PID    int32
	UID    uint32
	GID    uint32
	Groups []uint32
}

// PeerCred reads the caller on a connected Unix socket.
func PeerCred(c *net.UnixConn) (Caller, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return Caller{}, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var groups []uint32
	var cerr, gerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if cerr == nil {
			groups, gerr = peerGroups(int(fd))
		}
	}); err != nil {
		return Caller{}, fmt.Errorf("peer credentials: %w", err)
	}
	if cerr != nil {
		return Caller{}, fmt.Errorf("peer credentials: SO_PEERCRED: %w", cerr)
	}
	if gerr != nil {
		return Caller{}, fmt.Errorf("peer credentials: SO_PEERGROUPS: %w", gerr)
	}
	return Caller{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid, Groups: groups}, nil
}

// Subject names a caller's user and groups from the system's user
// database (/etc/passwd and /etc/group); ids without a name keep only
// their number, which policy entries can use.
func (c Caller) Subject() Subject {
	s := Subject{UID: c.UID}
	if u, err := user.LookupId(strconv.FormatUint(uint64(c.UID), 10)); err == nil {
		s.Name = u.Username
	}
	s.Groups = append(s.Groups, lookupGroup(c.GID))
	for _, g := range c.Groups {
		if g != c.GID {
			s.Groups = append(s.Groups, lookupGroup(g))
		}
	}
	return s
}

func lookupGroup(gid uint32) Group {
	g := Group{GID: gid}
	if gr, err := user.LookupGroupId(strconv.FormatUint(uint64(gid), 10)); err == nil {
		g.Name = gr.Name
	}
	return g
}

// LookupSubject resolves a user name or uid, with its groups, from the
// system's user database, for `rayvmm policy check --user`. A uid with
// no passwd entry is a subject with no name and no groups.
func LookupSubject(nameOrUID string) (Subject, error) {
	u, err := user.Lookup(nameOrUID)
	if err != nil {
		u, err = user.LookupId(nameOrUID)
	}
	if err != nil {
		uid, perr := strconv.ParseUint(nameOrUID, 10, 32)
		if perr != nil {
			return Subject{}, fmt.Errorf("user %q: no such user", nameOrUID)
		}
		return Subject{UID: uint32(uid)}, nil
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return Subject{}, fmt.Errorf("user %q: uid %q", nameOrUID, u.Uid)
	}
	s := Subject{UID: uint32(uid), Name: u.Username}
	if gid, err := strconv.ParseUint(u.Gid, 10, 32); err == nil {
		s.Groups = append(s.Groups, lookupGroup(uint32(gid)))
	}
	gids, _ := u.GroupIds()
	for _, g := range gids {
		if gid, err := strconv.ParseUint(g, 10, 32); err == nil && g != u.Gid {
			s.Groups = append(s.Groups, lookupGroup(uint32(gid)))
		}
	}
	return s, nil
}

// LookupGroup resolves a group name or gid; a gid with no entry keeps
// only its number.
func LookupGroup(nameOrGID string) (Group, error) {
	if g, err := user.LookupGroup(nameOrGID); err == nil {
		gid, err := strconv.ParseUint(g.Gid, 10, 32)
		if err != nil {
			return Group{}, fmt.Errorf("group %q: gid %q", nameOrGID, g.Gid)
		}
		return Group{GID: uint32(gid), Name: g.Name}, nil
	}
	gid, err := strconv.ParseUint(nameOrGID, 10, 32)
	if err != nil {
		return Group{}, fmt.Errorf("group %q: no such group", nameOrGID)
	}
	return lookupGroup(uint32(gid)), nil
}
