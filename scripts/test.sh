#!/usr/bin/env bash
# Install everything (idempotent) and run the whole test suite. Extra arguments go to pytest.
# The suite runs on the ROS 2 Kilted wheels (.venv); then its ROS-facing tests (marker `ros`:
# nodes, launch files, replay, bags through rclpy) run again on the Jazzy wheels
# (.venv-jazzy, CMKD_TEST_JAZZY=0 leaves that out).
# CMKD_TEST_TIER=unit runs only the unit tests (marker `unit`: no process, no ROS graph, about
# a minute; test/conftest.py) on Kilted; they do not depend on the distro.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIER="${CMKD_TEST_TIER:-full}"
case "$TIER" in
  full) ;;
  unit) set -- -m unit "$@" ;;
  *) echo "CMKD_TEST_TIER must be unit or full, not '$TIER'" >&2; exit 2 ;;
esac

bash "$ROOT/scripts/install.sh"
# MinkowskiEngine for the backend parity tests: built once (about 7 minutes on 2 cores) and cached
# by torch version; skipped when it already imports.
bash "$ROOT/scripts/build_minkowski.sh" "${CMKD_VENV:-$ROOT/.venv}"
# The backend parity tests must run, not shrink away, once it is built; likewise the tests of
# the compiled sparse kernels (install.sh builds them).
export CMKD_REQUIRE_MINKOWSKI=1
export CMKD_REQUIRE_NATIVE="${CMKD_REQUIRE_NATIVE:-1}"
cd "$ROOT"

run_suite() {  # VENV, then pytest arguments; prints the distro's summary
  local venv="$1" rc=0; shift
  # shellcheck disable=SC1091
  ( CMKD_VENV="$venv" && source "$ROOT/scripts/env.sh" && \
    python -m pytest test -ra --durations=10 -p no:cacheprovider "$@" ) || rc=$?
  if [ "$rc" = 5 ]; then echo "no tests were collected"; fi
  return "$rc"
}

set +e
run_suite "${CMKD_VENV:-$ROOT/.venv}" "$@"
rc=$?
rc_jazzy=0
if [ "${CMKD_TEST_JAZZY:-1}" != 0 ] && [ "$TIER" = full ]; then
  echo "== the ROS-facing tests again on the ROS 2 Jazzy wheels (.venv-jazzy)"
  JAZZY_VENV="${CMKD_JAZZY_VENV:-$ROOT/.venv-jazzy}"
  if CMKD_ROS_DISTRO=jazzy CMKD_VENV="$JAZZY_VENV" bash "$ROOT/scripts/install.sh"; then
    run_suite "$JAZZY_VENV" -m ros "$@"
    rc_jazzy=$?
    if [ "$rc_jazzy" = 5 ]; then rc_jazzy=0; fi   # your -k selected no ROS-facing test
  else
    echo "installing the Jazzy venv failed"; rc_jazzy=1
  fi
fi
set -e
if [ "$rc" = 0 ]; then rc=$rc_jazzy; fi
exit "$rc"
