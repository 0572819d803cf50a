#!/usr/bin/env bash
# The scale-out stages against a real broker on this machine, beside the same
# stages on the embedded log, so the broker's own ceiling shows:
#   ingest  : HTTP POST /v1/events -> log (202 after the log confirmed)
#   read    : log -> nothing (every partition start to end, no decoding)
#   process : log -> both processor stages -> InfluxDB
#   sharded : the same as `tidemark process` runs it: the shards report
#             through the partials topic to a separate combiner
# Each run gets a fresh tansu broker (SQLite storage) and reuses one influxd.
# Prints each run's JSON, then one JSON summary with the medians.
#
#   scripts/bench-kafka.sh [EVENTS] [RUNS]     (defaults: 100000 3)
#
# Needs tansu (scripts/setup.sh installs it) and Debian's influxd.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
EVENTS="${1:-100000}"
RUNS="${2:-3}"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

cargo build --release --quiet --bin tidemark
BIN="$CARGO_TARGET_DIR/release/tidemark"
TANSU="$(tansu_bin)" || { echo "tansu not found: run scripts/setup.sh" >&2; exit 1; }

INFLUX_PORT="$(free_port)"
mkdir -p "$WORK/influx"
cat > "$WORK/influx/influxdb.conf" <<EOF
reporting-disabled = true
bind-address = "127.0.0.1:$(free_port)"
[meta]
  dir = "$WORK/influx/meta"
[data]
  dir = "$WORK/influx/data"
  wal-dir = "$WORK/influx/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:$INFLUX_PORT"
  log-enabled = false
EOF
influxd -config "$WORK/influx/influxdb.conf" >"$WORK/influx/log" 2>&1 &
PIDS+=($!)
wait_port "$INFLUX_PORT"
INFLUX="http://127.0.0.1:$INFLUX_PORT"

with_tansu() {
  local port dir pid
  port="$(free_port)"
  dir="$(mktemp -d -p "$WORK")"
  (cd "$dir" && RUST_LOG=warn exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" \
     --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine sqlite://tansu.db) >"$dir/log" 2>&1 &
  pid=$!
  wait_port "$port"
  "$@" --kafka-brokers "127.0.0.1:$port"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}

for i in $(seq "$RUNS"); do
  "$BIN" bench ingest --events "$EVENTS" | tee -a "$WORK/ingest-embedded.jsonl"
  with_tansu "$BIN" bench ingest --events "$EVENTS" | tee -a "$WORK/ingest-kafka.jsonl"
  "$BIN" bench read --events "$EVENTS" | tee -a "$WORK/read-embedded.jsonl"
  with_tansu "$BIN" bench read --events "$EVENTS" | tee -a "$WORK/read-kafka.jsonl"
  "$BIN" bench process --events "$EVENTS" --event-rate 500 --influx-url "$INFLUX" | tee -a "$WORK/process-embedded.jsonl"
  with_tansu "$BIN" bench process --events "$EVENTS" --event-rate 500 --influx-url "$INFLUX" | tee -a "$WORK/process-kafka.jsonl"
  "$BIN" bench process --sharded --events "$EVENTS" --event-rate 500 --influx-url "$INFLUX" | tee -a "$WORK/sharded-embedded.jsonl"
  with_tansu "$BIN" bench process --sharded --events "$EVENTS" --event-rate 500 --influx-url "$INFLUX" | tee -a "$WORK/sharded-kafka.jsonl"
done

python3 - "$WORK" <<'PY'
import json, statistics, sys, os
out = {"bench": "kafka_vs_embedded"}
for name in ["ingest-embedded", "ingest-kafka", "read-embedded", "read-kafka",
             "process-embedded", "process-kafka", "sharded-embedded", "sharded-kafka"]:
    rates = [json.loads(l)["events_per_sec"] for l in open(os.path.join(sys.argv[1], name + ".jsonl")) if l.strip()]
    out[name.replace("-", "_") + "_events_per_sec"] = rates
    out[name.replace("-", "_") + "_median"] = statistics.median(rates)
print(json.dumps(out))
PY
