#!/usr/bin/env bash
# Runs every check and test: formatting, lints, unit and property tests, the
# end-to-end tests against real InfluxDB, and the browser test of the dashboard.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
scripts/setup.sh

cargo fmt --all -- --check
# The Kafka log (feature `kafka` of tidemark-log) is built, linted and tested
# against a real broker (tansu) and librdkafka's mock cluster.
# `tidemark/kafka` adds `replay --source kafka`; `tidemark-tests/kafka` its
# end-to-end test.
FEATURES="tidemark-log/kafka,tidemark/kafka,tidemark-tests/kafka"
cargo clippy --workspace --all-targets --features "$FEATURES" --quiet -- -D warnings
cargo build --release --quiet --bin tidemark --features kafka
export TIDEMARK_BIN="$CARGO_TARGET_DIR/release/tidemark"
cargo test --workspace --all-targets --features "$FEATURES"

mkdir -p artifacts
(cd tests/browser && node --test --test-reporter=tap dashboard.test.mjs)
