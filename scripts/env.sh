# Shared settings for the project's scripts: compiled output lives outside the
# clone so fresh clones (and CI) reuse it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tidemark/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ROOT
# Tools built for the tests (the tansu broker) live outside the clone too.
export TIDEMARK_TOOLS="${TIDEMARK_TOOLS:-$HOME/.cache/tidemark/tools}"
if [ -z "${TANSU_BIN:-}" ] && [ -x "$TIDEMARK_TOOLS/bin/tansu" ]; then
  export TANSU_BIN="$TIDEMARK_TOOLS/bin/tansu"
fi
