#!/usr/bin/env bash
# Runs every fuzz target of tests/tests/fuzz.rs (structure-aware random
# inputs, stable toolchain) one after another for MINUTES in all, and prints
# each target's JSON line (cases run) and a summary. A finding fails the run
# with the shrunk input and the seed that repeats it
# (TIDEMARK_FUZZ_SEED=<seed> scripts/fuzz.sh MINUTES).
#   scripts/fuzz.sh [MINUTES]   (default 2, as CI runs it)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
minutes="${1:-2}"
targets="$(grep -B1 '^fn ' tests/tests/fuzz.rs | grep -c '#\[test\]')"
seconds="$(python3 -c "import sys; print(max(1.0, float(sys.argv[1]) * 60 / int(sys.argv[2])))" "$minutes" "$targets")"
# The features of scripts/test.sh, so both share one build.
FEATURES="tidemark-log/kafka,tidemark/kafka,tidemark-tests/kafka"
cargo build --release --quiet --bin tidemark --features kafka
export TIDEMARK_BIN="${TIDEMARK_BIN:-$CARGO_TARGET_DIR/release/tidemark}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
TIDEMARK_FUZZ_SECONDS="$seconds" cargo test --workspace --features "$FEATURES" --test fuzz \
  -- --test-threads=1 --nocapture >"$log" 2>&1 || status=$?
# The harness prints a test's output after its name, on the same line.
grep -o '{"fuzz".*}' "$log" || true
if [ "$status" -ne 0 ]; then
  cat "$log" >&2
  echo "fuzz: a target failed (see above)" >&2
  exit "$status"
fi
python3 - "$log" "$minutes" <<'PY'
import json, sys
import re
runs = [json.loads(m) for m in re.findall(r'\{"fuzz".*\}', open(sys.argv[1]).read())]
print(json.dumps({"fuzz": "all", "minutes": float(sys.argv[2]), "targets": len(runs),
                  "cases": sum(r["cases"] for r in runs),
                  "findings": sum(r["findings"] for r in runs)}))
PY
