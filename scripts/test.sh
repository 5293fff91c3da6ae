#!/usr/bin/env bash
# Install everything (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/install.sh"
# MinkowskiEngine for the backend parity tests: built once (about 7 minutes on 2 cores) and cached
# by torch version; skipped when it already imports.
bash "$ROOT/scripts/build_minkowski.sh" "${CMKD_VENV:-$ROOT/.venv}"
# The backend parity tests must run, not shrink away, once it is built.
export CMKD_REQUIRE_MINKOWSKI=1
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
set +e
python -m pytest test -ra --durations=20 -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "no tests were collected"; fi
exit "$rc"
