package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/vmm"
)

func init() {
	var device string
	cmd := &cobra.Command{
		Use:   "probe",
		Short: "Report what the host's KVM offers rayvmm",
		Long: `Report the KVM API version, the capabilities rayvmm uses (and whether each is
present), whether /dev/kvm is PVM-backed (guest code then runs in KVM's
instruction emulator), and which CPU template --cpu-template auto picks.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := vmm.Probe(device)
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintf(w, "KVM device\t%s\n", p.Device)
			fmt.Fprintf(w, "KVM API version\t%d\n", p.APIVersion)
			fmt.Fprintf(w, "PVM-backed\t%v\n", p.PVM)
			fmt.Fprintf(w, "CPU template (auto)\t%s\n", p.AutoTemplate)
			fmt.Fprintf(w, "max vCPUs\t%d (recommended %d)\n", p.MaxVCPUs, p.RecommendedVCPUs)
			fmt.Fprintf(w, "memory slots\t%d\n", p.MemSlots)
			fmt.Fprintln(w, "capabilities:")
			for _, c := range p.Caps {
				state := "missing"
				if c.Value != 0 {
					state = "yes"
				}
				need := ""
				if c.Required {
					need = " (required)"
				}
				fmt.Fprintf(w, "  %s\t%s%s\n", c.Name, state, need)
			}
			return w.Flush()
		},
	}
	cmd.Flags().StringVar(&device, "kvm-device", "/dev/kvm", "KVM device to probe")
	rootCmd.AddCommand(cmd)
}
