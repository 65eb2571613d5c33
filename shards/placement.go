package shards

import (
	"fmt"
	"sort"

	"github.com/rayvmm/rayvmm/shards/engine"
)

// Place picks r distinct nodes for each of n shards from nodes, always
// the ones holding the fewest replicas so far (counting load, the
// replicas they already hold), ties broken by name: counts end up within
// one of each other.
func Place(n, r int, nodes []string, load map[string]int) ([][]string, error) {
	uniq := map[string]int{}
	for _, x := range nodes {
		uniq[x] = load[x]
	}
	if len(uniq) < r {
		return nil, fmt.Errorf("%d replicas need %d distinct live nodes, have %d: %w", r, r, len(uniq), ErrPlace)
	}
	names := sortedNames(uniq)
	out := make([][]string, n)
	for i := range out {
		sort.SliceStable(names, func(a, b int) bool { return uniq[names[a]] < uniq[names[b]] })
		out[i] = append([]string(nil), names[:r]...)
		sort.Strings(out[i])
		for _, x := range names[:r] {
			uniq[x]++
		}
	}
	return out, nil
}

// Move is one step of a rebalance: shard Shard of Volume gains a replica
// on To and, once that is healthy, loses the one on From ("" when the
// shard only lacks a replica).
type Move struct {
	Volume string `json:"volume"`
	Shard  int    `json:"shard"`
	From   string `json:"from,omitempty"`
	To     string `json:"to"`
	Reason string `json:"reason"`
}

// PlanRebalance computes the moves that leave every shard of every volume
// with its R replicas on distinct live nodes and the replica counts of
// the live nodes within one of each other. Replicas on nodes that are not
// live move first; then replicas move from the fullest to the emptiest
// node. Shards already in a move are left alone.
func PlanRebalance(vols []Volume, maps map[string][]engine.Shard, live []string) ([]Move, error) {
	isLive := map[string]bool{}
	count := map[string]int{}
	for _, n := range live {
		isLive[n], count[n] = true, 0
	}
	if len(live) == 0 {
		return nil, fmt.Errorf("no live nodes: %w", ErrPlace)
	}
	type ref struct {
		vol   string
		shard int
	}
	holders := map[ref]map[string]bool{}
	var moves []Move
	busy := map[ref]bool{}
	for _, v := range vols {
		for _, sh := range maps[v.Name] {
			k := ref{v.Name, sh.Index}
			holders[k] = map[string]bool{}
			for _, r := range sh.Replicas {
				holders[k][r.Node] = true
				if r.Leaving {
					busy[k] = true // a move is under way
				}
				if isLive[r.Node] && !r.Leaving {
					count[r.Node]++
				}
			}
		}
	}
	// emptiest returns the live node with the fewest replicas that does
	// not hold the shard.
	emptiest := func(k ref) string {
		best := ""
		for _, n := range sortedNames(count) {
			if !holders[k][n] && (best == "" || count[n] < count[best]) {
				best = n
			}
		}
		return best
	}
	for _, v := range vols {
		for _, sh := range maps[v.Name] {
			k := ref{v.Name, sh.Index}
			if busy[k] {
				continue
			}
			have := 0
			for _, r := range sh.Replicas {
				if isLive[r.Node] {
					have++
				}
			}
			for _, r := range sh.Replicas {
				if isLive[r.Node] {
					continue
				}
				to := emptiest(k)
				if to == "" {
					return nil, fmt.Errorf("%s shard %d: no live node left to move its replica on %s to: %w", v.Name, sh.Index, r.Node, ErrPlace)
				}
				moves = append(moves, Move{Volume: v.Name, Shard: sh.Index, From: r.Node, To: to, Reason: "node " + r.Node + " is not live"})
				holders[k][to] = true
				count[to]++
				busy[k] = true
			}
			for ; have < v.Replicas && !busy[k]; have++ {
				to := emptiest(k)
				if to == "" {
					break
				}
				moves = append(moves, Move{Volume: v.Name, Shard: sh.Index, To: to, Reason: "shard has too few replicas"})
				holders[k][to] = true
				count[to]++
			}
		}
	}
	// Even out: move from the fullest to the emptiest while they differ
	// by more than one.
	for {
		names := sortedNames(count)
		full, empty := names[0], names[0]
		for _, n := range names {
			if count[n] > count[full] {
				full = n
			}
			if count[n] < count[empty] {
				empty = n
			}
		}
		if count[full]-count[empty] <= 1 {
			return moves, nil
		}
		moved := false
		for _, v := range vols {
			for _, sh := range maps[v.Name] {
				k := ref{v.Name, sh.Index}
				if moved || busy[k] || !holders[k][full] || holders[k][empty] {
					continue
				}
				moves = append(moves, Move{Volume: v.Name, Shard: sh.Index, From: full, To: empty, Reason: "balance"})
				holders[k][empty] = true
				count[full]--
				count[empty]++
				busy[k] = true
				moved = true
			}
		}
		if !moved {
			return moves, nil // every candidate shard is already moving
		}
	}
}
