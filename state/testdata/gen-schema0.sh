#!/usr/bin/env bash
# Regenerates testdata/schema0: a state directory written by rayvmm at
# commit 5e23d5e, the last release before state.db (schema 0). Needs root
# (network create makes bridges, in a namespace of its own) and /dev/kvm
# (a VM attaches a volume and is killed with SIGKILL, leaving its lock
# file as a crashed VMM does). Volume images are not kept: only the
# metadata the store imports (volumes.db, network records and lock files)
# and `net list` as that rayvmm printed it (volume list depends on the
# images, so cmd/rayvmm's upgrade test builds 5e23d5e and compares live).
set -euo pipefail
cd "$(dirname "$0")"
repo=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'ip netns del rvgen-schema0 2>/dev/null || true; rm -rf "$work"' EXIT
git -C "$repo" archive 5e23d5e | tar -x -C "$work"
(cd "$work" && CGO_ENABLED=0 go build -o "$work/rayvmm-5e23d5e" ./cmd/rayvmm)
old="$work/rayvmm-5e23d5e"
st="$work/state"
ip netns add rvgen-schema0
in_ns() { ip netns exec rvgen-schema0 "$@"; }
"$old" --state-dir "$st" volume create data --size 64M
"$old" --state-dir "$st" volume create scratch --size 8M --format raw
"$old" --state-dir "$st" volume snapshot data monday
"$old" --state-dir "$st" volume clone monday copy
in_ns "$old" --state-dir "$st" net create lan --subnet 192.0.2.0/24
in_ns "$old" --state-dir "$st" net create iso --subnet 198.51.100.0/24 --isolated --mtu 9000
in_ns "$old" --state-dir "$st" net create out --subnet 203.0.113.0/25 --nat
in_ns "$old" --state-dir "$st" net create ov --subnet 203.0.113.128/25 --isolated --overlay vxlan:42,remote=192.0.2.200,local=192.0.2.100
# A VMM attached to a volume, killed: its lock file stays behind.
coproc vm { "$old" --state-dir "$st" boot --disk volume=copy --cmdline rayguest.run=echo; }
read -r line <&"${vm[0]}"
until [[ $line == *"rayguest: ready"* ]]; do read -r line <&"${vm[0]}"; done
kill -9 "$vm_PID"
wait "$vm_PID" || true
rm -rf schema0 && mkdir -p schema0/volumes schema0/networks
cp "$st"/volumes/volumes.db "$st"/volumes/*.lock schema0/volumes/
cp -a "$st"/networks/. schema0/networks/
"$old" --state-dir "$st" net list > schema0/net-list.txt
find schema0 -type f | sort
