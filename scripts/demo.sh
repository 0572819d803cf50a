#!/usr/bin/env bash
# Builds tidemark and its dashboard, then runs `tidemark demo` on the embedded
# default: every stage in one process plus a traffic generator. Extra arguments
# go to `tidemark demo` (see `tidemark demo --help`).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
scripts/setup.sh --web-only
cargo build --release --quiet --bin tidemark
exec "$CARGO_TARGET_DIR/release/tidemark" demo --web-dir dashboards/web/dist "$@"
