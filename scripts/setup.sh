#!/usr/bin/env bash
# Installs what the demo and the tests need, idempotently and quickly when present:
# Debian's influxdb (real InfluxDB 1.x for tests) and chromium (browser tests),
# the tansu broker (Kafka tests), the dashboard's npm packages (and its build),
# playwright-core for the browser test.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

want_debs=()
command -v influxd >/dev/null 2>&1 || want_debs+=(influxdb)
command -v chromium >/dev/null 2>&1 || want_debs+=(chromium)
if [ "${#want_debs[@]}" -gt 0 ] && [ "${1:-}" != "--web-only" ]; then
  echo "Installing Debian packages: ${want_debs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${want_debs[@]}" >/dev/null
  # The package starts a system influxd on the default ports; tests start their own.
  if command -v systemctl >/dev/null 2>&1; then systemctl stop influxdb >/dev/null 2>&1 || true; fi
  pkill -x influxd >/dev/null 2>&1 || true
fi

# npm packages: reinstall only when the lock file changed since the last install.
npm_install() {
  local dir="$1"
  local stamp="$dir/node_modules/.tidemark-lock"
  if [ ! -f "$stamp" ] || ! cmp -s "$dir/package-lock.json" "$stamp"; then
    # `npm install` honours the lock file; `npm ci` trips over optional
    # platform packages (rollup) that npm 11 leaves out of the lock.
    (cd "$dir" && npm install --no-save --no-audit --no-fund --loglevel=error)
    cp "$dir/package-lock.json" "$stamp"
  fi
}
npm_install dashboards/web
[ "${1:-}" = "--web-only" ] || npm_install tests/browser

# tansu, a Kafka-compatible broker, for the Kafka log's tests (built once,
# about 10 minutes, kept outside the clone).
if [ "${1:-}" != "--web-only" ] && ! command -v tansu >/dev/null 2>&1 \
   && [ ! -x "$HOME/.cargo/bin/tansu" ] && [ ! -x "$TIDEMARK_TOOLS/bin/tansu" ]; then
  echo "Installing tansu (Kafka-compatible broker for tests) into $TIDEMARK_TOOLS"
  cargo install tansu --locked --features libsql --root "$TIDEMARK_TOOLS" --quiet
fi

# Build the dashboard when its sources are newer than the build.
if [ ! -f dashboards/web/dist/index.html ] || \
   [ -n "$(find dashboards/web/src dashboards/web/index.html dashboards/web/package-lock.json -newer dashboards/web/dist/index.html 2>/dev/null | head -1)" ]; then
  (cd dashboards/web && npm run --silent build)
fi
