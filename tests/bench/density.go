package main

import (
	"context"
	"fmt"
	"time"

	"github.com/rayvmm/rayvmm/tests/bench/internal/launch"
)

// DensityResult is K rayvmm microVMs started at once.
type DensityResult struct {
	K      int `json:"k"`
	Rounds int `json:"rounds"`
	// VMsPerSec: K / wall time from the first start to the last exit, per
	// round in which every VM booted and powered off.
	VMsPerSec Summary `json:"vms_per_sec"`
	WallMS    Summary `json:"wall_ms"`
	// RSSPerVMKiB: ru_maxrss of every VM of the counted rounds.
	RSSPerVMKiB Summary  `json:"rss_per_vm_kib"`
	Failures    []string `json:"failures,omitempty"`
}

// density starts k `rayvmm boot` processes at once (all from one launcher),
// rounds times per k.
func density(ctx context.Context, rayvmm string, memMiB int, ks []int, rounds int) []*DensityResult {
	var out []*DensityResult
	argv := []string{rayvmm, "boot", "--memory", fmt.Sprintf("%dM", memMiB)}
	for _, k := range ks {
		d := &DensityResult{K: k, Rounds: rounds}
		var rate, wall, rss []float64
		why := map[string]int{}
		for r := 0; r < rounds; r++ {
			resp, err := runMany(ctx, launch.Request{Argv: argv, Copies: k, Timeout: 120 * time.Second})
			if err != nil {
				why[err.Error()]++
				continue
			}
			failed := 0
			for _, o := range resp.Outcomes {
				ok, reason := poweredOff(o)
				if ok && o.Ready == 0 {
					ok, reason = false, "no ready line"
				}
				if !ok {
					failed++
					why[reason]++
				}
			}
			if failed > 0 {
				continue
			}
			rate = append(rate, float64(k)/resp.Wall.Seconds())
			wall = append(wall, ms(resp.Wall))
			for _, o := range resp.Outcomes {
				rss = append(rss, float64(o.MaxRSSKiB))
			}
		}
		d.VMsPerSec, d.WallMS, d.RSSPerVMKiB = summarize(rate), summarize(wall), summarize(rss)
		d.Failures = countedReasons(why)
		logf("density: K=%d: %.0f VMs/s (median of %d rounds)", k, d.VMsPerSec.Median, d.VMsPerSec.N)
		out = append(out, d)
	}
	return out
}
