#!/usr/bin/env bash
# The SIGKILL matrix (tests/tests/kill_matrix.rs): `tidemark run` over a
# fixed workload, killed KILLS times in each place (an append, a checkpoint
# write, a store write, `replay --follow`, `archive`) at passes drawn from a
# printed seed, restarted each time; every window must equal the
# uninterrupted run's. Repeat a run with TIDEMARK_KILL_SEED=<seed>.
#   scripts/kill-matrix.sh [KILLS]   (default 20; CI runs 1 per place)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
# The features of scripts/test.sh, so both share one build.
FEATURES="tidemark-log/kafka,tidemark/kafka,tidemark-tests/kafka"
cargo build --release --quiet --bin tidemark --features kafka
export TIDEMARK_BIN="${TIDEMARK_BIN:-$CARGO_TARGET_DIR/release/tidemark}"
export TIDEMARK_KILLS="${1:-20}"
cargo test --workspace --features "$FEATURES" --test kill_matrix -- --nocapture 2>&1 |
  grep -E '^(kill matrix|crash point|test |thread|  left|  right|assertion)|differ|panicked'
exit "${PIPESTATUS[0]}"
