package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/audit"
	"github.com/rayvmm/rayvmm/network"
)

func init() {
	netCmd := &cobra.Command{
		Use:   "net",
		Short: "Manage guest networks (bridges, NAT, VXLAN overlays)",
		Long: `A network is a Linux bridge "rv-NAME" in the current network namespace,
recorded in the state store (<state-dir>/state.db). Unless --isolated, the host takes the
subnet's first address on it (the guests' gateway). Guests join it with
"rayvmm boot --net network=NAME[,vlan=N|,trunk=N1:N2]"; an access VLAN N gets
its own bridge "rv-NAME.N", created on first use.`,
	}

	var opts network.CreateOptions
	create := &cobra.Command{
		Use:   "create NAME --subnet CIDR",
		Short: "Create a network",
		Example: `  rayvmm net create lan --subnet 192.0.2.0/24 --nat
  rayvmm net create ov --subnet 198.51.100.0/24 --isolated \
      --overlay vxlan:42,remote=203.0.113.2,local=203.0.113.1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.Name = args[0]
			var n *network.Network
			if err := auditAction(cmd.Context(), audit.NetCreate, netObj(args[0]), netParams(opts), func() (err error) { n, err = network.Create(cmd.Context(), stateDir, opts); return err }); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created network %s: bridge %s, subnet %s%s\n", n.Name, n.Bridge, n.Subnet, describe(n))
			return nil
		},
	}
	create.Flags().StringVar(&opts.Subnet, "subnet", "", "IPv4 subnet in CIDR form, e.g. 192.0.2.0/24 (required)")
	create.Flags().BoolVar(&opts.Isolated, "isolated", false, "give the host no address on the network")
	create.Flags().BoolVar(&opts.NAT, "nat", false, "masquerade the subnet's traffic leaving the host (nftables) and enable IPv4 forwarding")
	create.Flags().StringVar(&opts.Overlay, "overlay", "", "extend the network to another host: vxlan:ID,remote=IP,local=IP[,port=N]")
	create.Flags().IntVar(&opts.MTU, "mtu", 0, "MTU of the network and its guests (default 1500, 1450 with --overlay)")
	create.MarkFlagRequired("subnet")

	list := &cobra.Command{
		Use:   "list",
		Short: "List networks",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			nets, err := network.List(stateDir)
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tBRIDGE\tSUBNET\tHOST ADDRESS\tNAT\tMTU\tOVERLAY")
			for _, n := range nets {
				host, overlay := "-", "-"
				if n.HostAddr.IsValid() {
					host = n.HostAddr.Addr().String()
				}
				if n.Overlay != nil {
					overlay = n.Overlay.String()
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", n.Name, n.Bridge, n.Subnet, host, yesNo(n.NAT), n.MTU, overlay)
			}
			return w.Flush()
		},
	}

	inspect := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a network's record and live state as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := network.Inspect(stateDir, args[0])
			if err != nil {
				return err
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(st)
		},
	}

	rm := &cobra.Command{
		Use:   "rm NAME",
		Short: "Remove a network: its bridges, overlay device and NAT rule (refused while a VM is attached)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := auditAction(cmd.Context(), audit.NetRemove, netObj(args[0]), nil, func() error { return network.Remove(cmd.Context(), stateDir, args[0]) }); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed network %s\n", args[0])
			return nil
		},
	}

	netCmd.AddCommand(create, list, inspect, rm)
	rootCmd.AddCommand(netCmd)
}

func describe(n *network.Network) string {
	var parts []string
	if n.HostAddr.IsValid() {
		parts = append(parts, "host "+n.HostAddr.String())
	} else {
		parts = append(parts, "isolated")
	}
	if n.NAT {
		parts = append(parts, "NAT (nftables table ip rayvmm-"+n.Name+")")
	}
	if n.Overlay != nil {
		parts = append(parts, "overlay "+n.Overlay.String()+" on "+n.Overlay.Device)
	}
	return ", " + strings.Join(parts, ", ") + fmt.Sprintf(", MTU %d", n.MTU)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
