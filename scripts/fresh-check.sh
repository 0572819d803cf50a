#!/usr/bin/env bash
# Runs the test command as CI does (`CI=true bash .ci/run`) on a fresh clone of
# HEAD, as on a fresh machine: HOME is an empty temporary folder, so every
# cache and tool location of the project's own (~/.cache/tidemark: the build
# output, the tansu broker) and of the tools it calls (npm's cache) starts
# empty. Kept as they are: the Rust toolchain (~/.cargo, ~/.rustup) and the
# Debian packages. Prints the run's time; the folder is removed on success
# and kept for a look on failure.
#
#   scripts/fresh-check.sh            # about 30 minutes on 2 cores
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"

# A tansu outside the project's tool folder would be found by the lookup and
# hide a first-run install, which is what this check is for.
for found in "$cargo_home/bin/tansu" "$(command -v tansu || true)"; do
  if [ -n "$found" ] && [ -x "$found" ]; then
    echo "fresh-check: $found would stand in for the tansu that setup installs; move it away first" >&2
    exit 2
  fi
done

work="$(mktemp -d "${TMPDIR:-/tmp}/tidemark-fresh.XXXXXX")"
mkdir -p "$work/home"
git clone --quiet "$src" "$work/clone"
echo "fresh-check: clone of $(git -C "$src" rev-parse --short HEAD) in $work/clone, HOME=$work/home"

started=$(date +%s)
status=0
(
  cd "$work/clone"
  unset CARGO_TARGET_DIR TIDEMARK_TOOLS TANSU_BIN TIDEMARK_BIN TIDEMARK_INFLUXD npm_config_cache
  export HOME="$work/home" CARGO_HOME="$cargo_home" RUSTUP_HOME="$rustup_home" CI=true
  bash .ci/run </dev/null
) || status=$?
elapsed=$(( $(date +%s) - started ))
printf 'fresh-check: exit %d after %dm%02ds\n' "$status" $((elapsed / 60)) $((elapsed % 60))
if [ "$status" -eq 0 ]; then
  rm -rf "$work"
else
  echo "fresh-check: kept $work for a look" >&2
fi
exit "$status"
