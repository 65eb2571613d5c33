package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/rayvmm/rayvmm/seccap/policy"
)

// DefaultPolicyFile is where the daemon and `rayvmm policy` read the
// access policy unless --policy says otherwise.
const DefaultPolicyFile = "/etc/rayvmm/policy.yaml"

// exitDenied is `rayvmm policy check`'s status for a denial.
const exitDenied = 3

func init() {
	policyCmd := &cobra.Command{
		Use:   "policy",
		Short: "Check requests against the daemon's access policy",
		Long: `The rayvmm daemon decides every request with an access policy (YAML; see
seccap/policy/README.md): users and groups have clearances, volumes,
networks and pods have classifications (public < internal < confidential <
secret), rules allow or deny actions, deny beats allow, and anything no rule
allows is denied. Mandatory levels come first and no rule overrides them: a
pod runs at its owner's clearance; its VMs attach volumes read-only at or
below it (no read up), read-write only at exactly it (no write down), and
join networks only at exactly it. Root is allowed everything.`,
	}

	var file, user, action, object string
	var labels, groups []string
	check := &cobra.Command{
		Use:   "check --user U --action A --object KIND/NAME",
		Short: "Print what the policy decides for one request, and why, without acting",
		Long: `Print the decision the policy makes for one request, naming the rule or the
level check that made it (or root, or the default deny), with the user's
clearance and the object's classification. Nothing is done.

The user is a name or a uid; its groups come from /etc/group unless --group
gives them. The object's labels are given with --label.

Exit status: 0 when allowed, 3 when denied, 1 when the request or the policy
is bad.`,
		Example: `  rayvmm policy check --user alice --action attach-rw --object volume/payroll-2024
  rayvmm policy check --user 64031 --group 2001 --action join --object network/lab
  rayvmm policy check --policy ./policy.yaml --user bob --action delete \
      --object volume/base --label golden=yes`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			a, err := policy.ParseAction(action)
			if err != nil {
				return fmt.Errorf("--action: %w", err)
			}
			o, err := policy.ParseObject(object)
			if err != nil {
				return fmt.Errorf("--object: %w", err)
			}
			if o.Labels, err = parseLabels(labels); err != nil {
				return err
			}
			s, err := policy.LookupSubject(user)
			if err != nil {
				return fmt.Errorf("--user: %w", err)
			}
			if cmd.Flags().Changed("group") {
				if s.Groups, err = lookupGroups(groups); err != nil {
					return err
				}
			}
			p, err := policy.Load(file)
			if err != nil {
				return err
			}
			d, err := p.Decide(s, a, o)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), d)
			if d.By != policy.ByRoot {
				fmt.Fprintf(cmd.OutOrStdout(), "  %s's clearance: %s (%s); %s's classification: %s (%s)\n",
					d.Subject, d.Clearance, d.ClearanceBy, d.Object, d.Classification, d.ClassificationBy)
			}
			if !d.Allow {
				return &exitError{code: exitDenied, err: errors.New("denied")}
			}
			return nil
		},
	}
	check.Flags().StringVar(&file, "policy", DefaultPolicyFile, "policy file")
	check.Flags().StringVar(&user, "user", "", "the user asking: a name or a uid (required)")
	check.Flags().StringVar(&action, "action", "", "create, delete, inspect, attach-ro, attach-rw, snapshot, clone, run or join (required)")
	check.Flags().StringVar(&object, "object", "", "the object: volume/NAME, network/NAME or pod/NAME (required)")
	check.Flags().StringArrayVar(&labels, "label", nil, "a label of the object, KEY=VALUE (repeatable)")
	check.Flags().StringArrayVar(&groups, "group", nil, "the user's groups, names or gids, primary first (repeatable; default: from /etc/group)")
	check.MarkFlagRequired("user")
	check.MarkFlagRequired("action")
	check.MarkFlagRequired("object")
	policyCmd.AddCommand(check)
	rootCmd.AddCommand(policyCmd)
}

func parseLabels(kvs []string) (map[string]string, error) {
	m := map[string]string{}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--label %q: want KEY=VALUE", kv)
		}
		if _, dup := m[k]; dup {
			return nil, fmt.Errorf("--label %q: %s given twice", kv, k)
		}
		m[k] = v
	}
	return m, nil
}

func lookupGroups(names []string) ([]policy.Group, error) {
	var gs []policy.Group
	for _, n := range names {
		g, err := policy.LookupGroup(n)
		if err != nil {
			return nil, fmt.Errorf("--group: %w", err)
		}
		gs = append(gs, g)
	}
	return gs, nil
}
