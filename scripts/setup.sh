#!/usr/bin/env bash
# Installs what the demo and the tests need, idempotently and quickly when present:
# Debian's influxdb (real InfluxDB 1.x for tests) and chromium (browser tests),
# the tansu broker (Kafka tests), the dashboard's npm packages (and its build,
# which bundles the JavaScript SDK's sources), the SDK's own build tools (and
# its build, for its tests), playwright-core for the browser tests.
# `--web-only` installs just what the demo needs: the dashboard's packages and
# its build.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
web_only=false
[ "${1:-}" = "--web-only" ] && web_only=true

want_debs=()
command -v influxd >/dev/null 2>&1 || want_debs+=(influxdb)
command -v chromium >/dev/null 2>&1 || want_debs+=(chromium)
command -v promtool >/dev/null 2>&1 || want_debs+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || want_debs+=(prometheus-alertmanager)
command -v docker-compose >/dev/null 2>&1 || want_debs+=(docker-compose)
if [ "${#want_debs[@]}" -gt 0 ] && ! $web_only; then
  step "setup: Debian packages ${want_debs[*]} (InfluxDB 1.x for the store tests, Chromium for the browser tests, Prometheus, promtool and Alertmanager for the alerting tests, docker-compose to validate the compose file; about 2 minutes)"
  export DEBIAN_FRONTEND=noninteractive
  # The packages may start their daemons on the default ports; the tests
  # start their own. Stop only those the install started: a server that ran
  # before is the user's and stays.
  daemons='(^|/)(influxd|prometheus|prometheus-alertmanager)( |$)'
  running_before=" $(pgrep -d ' ' -f "$daemons" || true) "
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${want_debs[@]}" >/dev/null
  if command -v systemctl >/dev/null 2>&1; then
    for pkg in "${want_debs[@]}"; do
      case "$pkg" in
        influxdb|prometheus|prometheus-alertmanager) systemctl stop "$pkg" >/dev/null 2>&1 || true ;;
      esac
    done
  fi
  for pid in $(pgrep -f "$daemons" || true); do
    case "$running_before" in
      *" $pid "*) ;;
      *) kill "$pid" 2>/dev/null || true ;;
    esac
  done
fi

# npm packages: reinstall only when the lock file changed since the last install.
npm_install() {
  local dir="$1" why="$2"
  local stamp="$dir/node_modules/.tidemark-lock"
  if [ ! -f "$stamp" ] || ! cmp -s "$dir/package-lock.json" "$stamp"; then
    step "setup: npm packages of $dir ($why)"
    # `npm install` honours the lock file; `npm ci` trips over optional
    # platform packages (rollup) that npm 11 leaves out of the lock.
    (cd "$dir" && npm install --no-save --no-audit --no-fund --loglevel=error)
    cp "$dir/package-lock.json" "$stamp"
  fi
}
npm_install dashboards/web "React, Vite: the dashboard's build"
$web_only || npm_install sdk/js "esbuild, TypeScript: the JavaScript SDK's build"
$web_only || npm_install tests/browser "playwright-core: drives Chromium in the browser test"

# tansu, a Kafka-compatible broker, for the Kafka log's tests: built once from
# crates.io and kept outside the clone.
if ! $web_only && ! tansu_bin >/dev/null; then
  step "setup: tansu into $TIDEMARK_TOOLS (Kafka-compatible broker for the Kafka tests; built from crates.io once, about 10 minutes on 2 cores)"
  cargo install tansu --locked --features libsql --root "$TIDEMARK_TOOLS" --quiet
  tansu_bin >/dev/null || { echo "setup: tansu was built but is not in $TIDEMARK_TOOLS/bin" >&2; exit 1; }
fi

# Build the SDK and the dashboard when their sources are newer than the builds.
if ! $web_only && { [ ! -f sdk/js/dist/tidemark.mjs ] || \
   [ -n "$(find sdk/js/src sdk/js/build.mjs sdk/js/package-lock.json -newer sdk/js/dist/tidemark.mjs 2>/dev/null | head -1)" ]; }; then
  step "setup: building the JavaScript SDK (sdk/js/dist)"
  (cd sdk/js && npm run --silent build)
fi
if [ ! -f dashboards/web/dist/index.html ] || \
   [ -n "$(find dashboards/web/src dashboards/web/index.html dashboards/web/package-lock.json sdk/js/src -newer dashboards/web/dist/index.html 2>/dev/null | head -1)" ]; then
  step "setup: building the dashboard (dashboards/web/dist, served by tidemark)"
  (cd dashboards/web && npm run --silent build)
fi
