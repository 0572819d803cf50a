#!/usr/bin/env bash
# Checks the shipped Prometheus and Alertmanager files: the scrape config and
# rules parse (promtool check), every alert fires and stays quiet where its
# unit tests say (promtool test rules), and the routes send each severity to
# its receiver (amtool). tests/tests/alerting.rs runs them end to end.
set -euo pipefail
source "$(dirname "$0")/env.sh"
dir="$ROOT/dashboards/prometheus"

# promtool checks that the token file the scrape config names exists; it is
# made at deploy time, so check a copy with a stand-in.
copy="$(mktemp -d)"
trap 'rm -rf "$copy"' EXIT
cp -r "$dir/prometheus.yml" "$dir/rules" "$copy/"
mkdir -p "$copy/secrets"
echo stand-in >"$copy/secrets/tidemark-token"
promtool check config "$copy/prometheus.yml" >/dev/null
promtool check rules "$dir/rules/tidemark.rules.yml" >/dev/null
(cd "$dir/rules" && promtool test rules tidemark.rules.test.yml)

amtool check-config "$dir/alertmanager.yml" >/dev/null
route() {
  local want="$1"; shift
  amtool config routes test --config.file "$dir/alertmanager.yml" --verify.receivers="$want" "$@" >/dev/null 2>&1 \
    || { echo "alertmanager.yml: $* is not routed to $want" >&2; exit 1; }
}
route webhook-critical severity=critical alertname=TidemarkStoreWritesFailing
route webhook-warning severity=warning alertname=TidemarkConsumerLagHigh
route webhook-warning alertname=WithoutSeverity
