#!/usr/bin/env bash
# Runs every check and test: formatting, lints, unit and property tests, the
# end-to-end tests against real InfluxDB and Kafka (tansu), the Grafana
# dashboards' queries against real InfluxDB and Prometheus, the JavaScript
# SDK's unit tests and size budget, and the browser tests of the dashboard
# and the SDK, the Prometheus rules and Alertmanager routes. The first run on a fresh machine installs and builds
# everything (see docs/operations.md); later runs reuse it.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
scripts/setup.sh
# Resolved after setup, which installs tansu on a fresh machine; the tests
# would look in the same places, this makes the choice visible and fixed.
TANSU_BIN="$(tansu_bin)" || { echo "tansu not found after setup" >&2; exit 1; }
export TANSU_BIN

step "test: formatting"
cargo fmt --all -- --check
step "test: no import circles between the files of processor/ and src/"
python3 scripts/import-circles.py processor/src src
# The Kafka log (feature `kafka` of tidemark-log) is built, linted and tested
# against a real broker (tansu) and librdkafka's mock cluster.
# `tidemark/kafka` adds `replay --source kafka`; `tidemark-tests/kafka` its
# end-to-end test.
FEATURES="tidemark-log/kafka,tidemark/kafka,tidemark-tests/kafka"
step "test: Prometheus config and rules (promtool), Alertmanager routes (amtool), docker-compose.yml"
scripts/check-alerting.sh
# The required secrets are set to stand-ins: config resolves, nothing starts.
TIDEMARK_API_KEY=stand-in GRAFANA_ADMIN_PASSWORD=stand-in docker-compose -f docker-compose.yml config -q
step "test: clippy (the first run compiles the workspace: several minutes)"
cargo clippy --workspace --all-targets --features "$FEATURES" --quiet -- -D warnings
step "test: release build of tidemark (used by the end-to-end tests)"
cargo build --release --quiet --bin tidemark --features kafka
export TIDEMARK_BIN="$CARGO_TARGET_DIR/release/tidemark"
step "test: cargo test (unit, property and end-to-end tests)"
cargo test --workspace --all-targets --features "$FEATURES"

step "test: fuzz targets, 2 minutes in all (scripts/fuzz.sh; a longer run: scripts/fuzz.sh MINUTES)"
scripts/fuzz.sh 2

step "test: dashboard unit tests (vitest)"
(cd dashboards/web && npm run --silent test)

step "test: JavaScript SDK: unit tests, and the core's size (at most 5 KB min+gzip)"
(cd sdk/js && npm run --silent build -- --size && node --test --test-reporter=tap test/*.test.mjs)

step "test: browser tests of the dashboard and the SDK (Chromium)"
mkdir -p artifacts
(cd tests/browser && node --test --test-reporter=tap dashboard.test.mjs pages.test.mjs sdk.test.mjs)
