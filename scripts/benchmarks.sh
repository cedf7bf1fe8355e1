#!/usr/bin/env bash
# Every benchmark whose record is committed under results/bench/, one after the other
# (they time the machine: run nothing else meanwhile). About 15 minutes on 2 cores.
#   bash scripts/benchmarks.sh            # all
#   bash scripts/benchmarks.sh train      # the ones whose record name starts with "train"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
only="${1:-}"
run() {  # run NAME ARGS...: python -m mpc bench ARGS --record-name NAME
    local name="$1"; shift
    [[ -z "$only" || "$name" == "$only"* ]] || return 0
    echo "== bench $name: python -m mpc bench $* --record-name $name" >&2
    python -m mpc bench "$@" --record-name "$name"
}
run prepare          prepare
run synth            synth
run train            train --configs fp32 int8 int8+5%lru int4+1%lru
# the whole-step goal (int8 + 5% LRU >= 0.95x mpc fp32, batch 2048) on its own: only
# the two contenders (and the baselines), twice the rounds, for a tighter paired ratio
run train_goal       train --configs fp32 int8+5%lru --batch-sizes 2048 --repeats 41
# (train_goal_repeat.json is a second run of train_goal's command, --record-name
# train_goal_repeat; train_repeat.json one of train's with --repeats 61 21.)
run lookup           lookup
run lookup_threads1  lookup --threads 1
run cache            cache
run cache_threads1   cache --threads 1
run cache_lfu        cache --policy lfu --no-uncached --threads 1
run cache_fully_associative cache --ways 0 --no-uncached --threads 1
run cache_synth      cache --ids synth
run cache_dlrm       cache --model dlrm --warmup 1500 --rounds 5
