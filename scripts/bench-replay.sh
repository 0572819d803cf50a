#!/usr/bin/env bash
# Replay throughput from the embedded log: loads an NDJSON event file into a
# log once (`bench pipeline --log-dir`, untimed here), then replays its whole
# range into a new SQLite database RUNS times per thread count and prints
# each run and the median events/s.
#   scripts/bench-replay.sh EVENTS_FILE [RUNS] [THREADS...]
# e.g. scripts/bench-replay.sh events.ndjson 3 1 2
set -euo pipefail
source "$(dirname "$0")/env.sh"
input="${1:?usage: bench-replay.sh EVENTS_FILE [RUNS] [THREADS...]}"
runs="${2:-3}"
shift $(( $# < 2 ? $# : 2 ))
threads=("${@:-1 2}")
bin="${TIDEMARK_BIN:-$CARGO_TARGET_DIR/release/tidemark}"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
"$bin" bench pipeline --input "$input" --log-dir "$dir" >/dev/null
for t in ${threads[@]}; do
  rates=()
  for r in $(seq "$runs"); do
    line="$("$bin" replay --data-dir "$dir" --from 0 --to 4102444800000 --threads "$t" \
      --into "bench_${t}_${r}" --no-progress | tail -n 1)"
    echo "$line"
    rates+=("$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["events_per_sec"])' "$line")")
    rm -f "$dir/bench_${t}_${r}.sqlite"*
  done
  median="$(printf '%s\n' "${rates[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
  echo "{\"bench\":\"replay\",\"threads\":$t,\"runs\":$runs,\"median_events_per_sec\":$median}"
done
