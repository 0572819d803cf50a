#!/usr/bin/env bash
# Side by side, in one run, on one generated file: tidemark's four pipelines
# (`tidemark bench pipeline`, reading the embedded log, decode included) and
# the peers' Apache Flink job over the same queries. Prints each run's JSON,
# then one JSON summary with the medians and their ratio.
#
#   scripts/bench-vs-flink.sh [EVENTS] [RUNS]     (defaults: 1000000 3)
#
# Needs ../shared/peers (the reference generator and Flink job); installs
# PyFlink there on first use.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
EVENTS="${1:-1000000}"
RUNS="${2:-3}"
PEERS="${PEERS_DIR:-$ROOT/../shared/peers}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

cargo build --release --quiet --bin tidemark
BIN="$CARGO_TARGET_DIR/release/tidemark"
python3 "$PEERS/gen_events.py" --events "$EVENTS" --seed 1 --out "$WORK/events.ndjson" >/dev/null
PY="$("$PEERS/setup.sh")"

for i in $(seq "$RUNS"); do
  "$BIN" bench pipeline --input "$WORK/events.ndjson" | tee -a "$WORK/tidemark.jsonl"
  "$PY" "$PEERS/flink/job.py" --input "$WORK/events.ndjson" --queries all 2>/dev/null \
    | grep '^{' | tail -1 | tee -a "$WORK/flink.jsonl"
done

python3 - "$WORK/tidemark.jsonl" "$WORK/flink.jsonl" <<'PY'
import json, statistics, sys
def rates(path):
    return [json.loads(l)["events_per_sec"] for l in open(path) if l.strip()]
t, f = rates(sys.argv[1]), rates(sys.argv[2])
mt, mf = statistics.median(t), statistics.median(f)
print(json.dumps({"bench": "pipeline_vs_flink", "tidemark_events_per_sec": t,
                  "flink_events_per_sec": f, "tidemark_median": mt, "flink_median": mf,
                  "ratio": round(mt / mf, 1)}))
PY
