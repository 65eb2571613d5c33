package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// NAT uses github.com/google/nftables rather than the nft tool: it speaks
// nf_tables netlink directly, so the one static rayvmm binary needs no
// nftables package on the host, errors come back as values rather than
// text to parse, and the rules are built from typed expressions rather than
// strings (no quoting of user input). The cost is expressing
// "ip saddr S ip daddr != S masquerade" as raw payload/cmp/masq
// expressions, done once below.
//
// Each NAT network gets its own table, "ip rayvmm-NAME", holding a
// postrouting nat chain with one rule, so removing the network deletes the
// table and nothing else in the host's ruleset is touched. Inspect it with
// "nft list table ip rayvmm-NAME".

const natChain = "postrouting"

func natTable(n *Network) *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyIPv4, Name: "rayvmm-" + n.Name}
}

// masqueradeExprs is "ip saddr SUBNET ip daddr != SUBNET counter masquerade".
func masqueradeExprs(n *Network) []expr.Any {
	addr := n.Subnet.Addr().AsSlice()
	mask := net.CIDRMask(n.Subnet.Bits(), 32)
	match := func(off uint32, op expr.CmpOp) []expr.Any {
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
			&expr.Cmp{Op: op, Register: 1, Data: addr},
		}
	}
	e := append(match(12, expr.CmpOpEq), match(16, expr.CmpOpNeq)...)
	return append(e, &expr.Counter{}, &expr.Masq{})
}

// ensureNAT installs the masquerade rule for n's subnet and turns on IPv4
// forwarding in the namespace (NAT is useless without it). Forwarding is
// turned on also when the rule is already there: a ruleset restored at
// boot brings back the table, not the sysctl.
func ensureNAT(ctx context.Context, n *Network, undo *undoList) error {
	ok, err := natPresent(n)
	if err != nil {
		return err
	}
	if ok {
		return enableForwarding()
	}
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	t := c.AddTable(natTable(n))
	ch := c.AddChain(&nftables.Chain{
		Name:     natChain,
		Table:    t,
		Type:     nftables.ChainTypeNAT,
		Hooknum:  nftables.ChainHookPostrouting,
		Priority: nftables.ChainPriorityNATSource,
	})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: masqueradeExprs(n)})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: add masquerade for %s: %w", n.Subnet, err)
	}
	undo.add(func() { removeNAT(ctx, n) })
	return enableForwarding()
}

func enableForwarding() error {
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0); err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	return nil
}

// removeNAT deletes n's table; a missing table is not an error.
func removeNAT(_ context.Context, n *Network) error {
	ok, err := natPresent(n)
	if err != nil || !ok {
		return err
	}
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	c.DelTable(natTable(n))
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: delete table %s: %w", natTable(n).Name, err)
	}
	return nil
}

// natPresent reports whether n's masquerade rule is installed.
func natPresent(n *Network) (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("nftables: %w", err)
	}
	t, err := c.ListTableOfFamily(natTable(n).Name, nftables.TableFamilyIPv4)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("nftables: list table %s: %w", natTable(n).Name, err)
	}
	rules, err := c.GetRules(t, &nftables.Chain{Name: natChain, Table: t})
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("nftables: list rules of %s: %w", t.Name, err)
	}
	return len(rules) > 0, nil
}
