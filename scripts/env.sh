# Shared settings for the project's scripts: compiled output lives outside the
# clone so fresh clones (and CI) reuse it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tidemark/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ROOT
# Tools built for the tests (the tansu broker) live outside the clone too.
export TIDEMARK_TOOLS="${TIDEMARK_TOOLS:-$HOME/.cache/tidemark/tools}"

# The tansu binary, or nothing if there is none yet. The same lookup as
# `TansuServer::binary()` in log/src/kafka/testing.rs: TANSU_BIN, the
# project's tool folder, ~/.cargo/bin, PATH. Call it after setup, not only
# when this file is sourced: on a fresh machine setup installs tansu.
tansu_bin() {
  local candidate
  for candidate in "${TANSU_BIN:-}" "$TIDEMARK_TOOLS/bin/tansu" \
      "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" "$(command -v tansu || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# One line per step, so a long first run reads as progress, not as a hang.
step() {
  echo "==> $*" >&2
}
