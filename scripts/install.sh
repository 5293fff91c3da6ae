#!/usr/bin/env bash
# Install cmkd_ros and everything it needs into a project venv (default: .venv). Idempotent: a
# second run with unchanged dependency files returns in about a second.
#   CMKD_VENV=DIR            venv location
#   CMKD_PYTHON=python3.11   interpreter for a new venv (the PyPI ROS 2 wheels target CPython 3.11)
# MinkowskiEngine (optional backend, needed by the parity tests) is built by
# scripts/build_minkowski.sh, which scripts/test.sh runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CMKD_VENV:-$ROOT/.venv}"
if [ -z "${CMKD_PYTHON:-}" ]; then
  CMKD_PYTHON=$(command -v python3.11 || command -v python3)
fi

stamp_of() {
  cat "$ROOT/setup.py" "$ROOT/scripts/constraints.txt" "$ROOT/scripts/install.sh" \
      "$ROOT/scripts/ament_link.sh" 2>/dev/null | sha256sum | cut -c1-16
}
STAMP="$(stamp_of)"
if [ -f "$VENV/.cmkd-install-stamp" ] && [ "$(cat "$VENV/.cmkd-install-stamp")" = "$STAMP" ] \
   && [ -x "$VENV/bin/cmkd" ]; then
  echo "[install] $VENV is up to date"
  exit 0
fi

echo "[install] creating/updating $VENV with $CMKD_PYTHON"
if [ ! -x "$VENV/bin/python" ]; then
  "$CMKD_PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
quiet() { "$@" 2>&1 | { grep -v -e 'is ignored: it is neither a file nor a directory' || true; }; }
quiet "${PIP[@]}" install -q --upgrade pip wheel 'setuptools<80'
# PyPI's `launch` is an unrelated project that shadows ROS 2's launch module: refuse it.
if "$VENV/bin/python" -m pip show launch >/dev/null 2>&1 && \
   ! "$VENV/bin/python" -c 'import launch.actions' >/dev/null 2>&1; then
  echo "[install] removing PyPI 'launch' (not ROS 2 launch)"; "${PIP[@]}" uninstall -y -q launch
fi
quiet "${PIP[@]}" install -q -c "$ROOT/scripts/constraints.txt" -e "$ROOT[ros,train,dev]"

# An editable install does not install data files: expose the package to ament/ros2 from the
# source tree (share/cmkd_ros -> launch, config, package.xml; lib/cmkd_ros -> node executables).
bash "$ROOT/scripts/ament_link.sh" "$VENV" "$ROOT"

echo "$STAMP" > "$VENV/.cmkd-install-stamp"
echo "[install] done: source scripts/env.sh to use it"
