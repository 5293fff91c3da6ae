#!/usr/bin/env bash
# Install everything (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The real ROS 2 launch system and command line, as wheels beside the checkout when there
# (PyPI lacks them; a full ROS 2 install's own wins, see install.sh).
if [ -z "${CMKD_EXTRA_WHEELS+set}" ] && [ -d "$ROOT/../shared/wheels/ros2-cli" ]; then
  export CMKD_EXTRA_WHEELS="$ROOT/../shared/wheels/ros2-cli"
fi
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
