#!/usr/bin/env bash
# Install cmkd_ros and everything it needs into a project venv (default: .venv). Idempotent: a
# second run with unchanged dependency files returns in about a second.
#   CMKD_VENV=DIR            venv location
#   CMKD_PYTHON=python3.11   interpreter for a new venv (the PyPI ROS 2 wheels target CPython 3.11)
#   CMKD_ROS_DISTRO=kilted   which ROS 2 wheels from PyPI: kilted (ros-*) or jazzy (ros-jazzy-*);
#                            one distro per venv
#   CMKD_EXTRA_WHEELS=DIR    a folder of wheels of the ROS 2 parts that PyPI lacks (launch,
#                            launch_ros, ros2cli: `ros2 launch|run|topic|node|param`); default
#                            ../shared/wheels/ros2-cli beside the checkout when it exists, '' for
#                            none; installed with the PyPI packages they need, unless a full ROS 2
#                            install already provides `launch` (its own wins)
# The compiled kernels of the torch sparse backend are built by scripts/build_native.sh (cached
# by torch version and source; a warning, not an error, without a C++ compiler). MinkowskiEngine
# (optional backend, needed by the parity tests) is built by scripts/build_minkowski.sh, which
# scripts/test.sh runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CMKD_VENV:-$ROOT/.venv}"
if [ -z "${CMKD_PYTHON:-}" ]; then
  CMKD_PYTHON=$(command -v python3.11 || command -v python3)
fi

DISTRO="${CMKD_ROS_DISTRO:-kilted}"
case "$DISTRO" in
  kilted) ROS_EXTRA=ros ;;
  jazzy) ROS_EXTRA=ros-jazzy ;;
  *) echo "[install] CMKD_ROS_DISTRO=$DISTRO: expected kilted or jazzy (PyPI has no other)" >&2
     exit 2 ;;
esac
EXTRA_WHEELS=()
if [ -z "${CMKD_EXTRA_WHEELS+set}" ] && [ -d "$ROOT/../shared/wheels/ros2-cli" ]; then
  CMKD_EXTRA_WHEELS="$(cd "$ROOT/../shared/wheels/ros2-cli" && pwd)"
fi
if [ -n "${CMKD_EXTRA_WHEELS:-}" ]; then
  if [ ! -d "$CMKD_EXTRA_WHEELS" ]; then
    echo "[install] CMKD_EXTRA_WHEELS=$CMKD_EXTRA_WHEELS is not a folder" >&2; exit 2
  fi
  # A full ROS 2 install (sourced: its launch on PYTHONPATH) keeps its own launch and ros2.
  external=$(cd / && env -u VIRTUAL_ENV python3 -c 'import launch.actions, os; \
print(os.path.dirname(os.path.dirname(launch.__file__)))' 2>/dev/null || true)
  if [ -n "$external" ] && [ "${external#"$VENV"}" = "$external" ]; then
    echo "[install] launch comes from $external (a ROS 2 install): $CMKD_EXTRA_WHEELS not used"
  else
    shopt -s nullglob
    EXTRA_WHEELS=("$CMKD_EXTRA_WHEELS"/*.whl)
    shopt -u nullglob
  fi
fi

stamp_of() {
  { cat "$ROOT/setup.py" "$ROOT/scripts/constraints.txt" "$ROOT/scripts/install.sh" 2>/dev/null
    echo "$DISTRO"; for w in "${EXTRA_WHEELS[@]}"; do basename "$w"; done; } \
    | sha256sum | cut -c1-16
}
STAMP="$(stamp_of)"
if [ -f "$VENV/.cmkd-install-stamp" ] && [ "$(cat "$VENV/.cmkd-install-stamp")" = "$STAMP" ] \
   && [ -x "$VENV/bin/cmkd" ]; then
  # cheap, and shows launch or config files added since
  bash "$ROOT/scripts/ament_link.sh" "$VENV" "$ROOT"
  bash "$ROOT/scripts/build_native.sh" "$VENV"  # seconds when this source is built
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
# One distro per venv (the Jazzy wheels also install ros-rclpy, at Jazzy's version).
has() { "$VENV/bin/python" -m pip show "$1" >/dev/null 2>&1; }
if { [ "$DISTRO" = kilted ] && has ros-jazzy-rclpy; } || \
   { [ "$DISTRO" = jazzy ] && has ros-rclpy && ! has ros-jazzy-rclpy; }; then
  echo "[install] $VENV holds another distro's ROS 2 wheels: choose another CMKD_VENV" >&2
  exit 2
fi
EXTRAS="$ROS_EXTRA,train,dev"
if [ ${#EXTRA_WHEELS[@]} -gt 0 ]; then EXTRAS="$EXTRAS,ros2cli"; fi
quiet "${PIP[@]}" install -q -c "$ROOT/scripts/constraints.txt" -e "$ROOT[$EXTRAS]"
if [ ${#EXTRA_WHEELS[@]} -gt 0 ]; then
  echo "[install] ROS 2 launch and command line from $CMKD_EXTRA_WHEELS"
  quiet "${PIP[@]}" install -q --no-deps --no-index "${EXTRA_WHEELS[@]}"
fi

# An editable install does not install data files: expose the package to ament/ros2 from the
# source tree (share/cmkd_ros -> launch, config, package.xml; lib/cmkd_ros -> node executables).
bash "$ROOT/scripts/ament_link.sh" "$VENV" "$ROOT"

bash "$ROOT/scripts/build_native.sh" "$VENV"

echo "$STAMP" > "$VENV/.cmkd-install-stamp"
echo "[install] done: source scripts/env.sh to use it"
