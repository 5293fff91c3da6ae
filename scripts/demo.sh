#!/usr/bin/env bash
# Install everything (idempotent) and run the demo on generated data. Extra arguments go to
# `cmkd demo` (see `cmkd demo --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The real ROS 2 launch system and command line, as wheels beside the checkout when there
# (PyPI lacks them; a full ROS 2 install's own wins, see install.sh).
if [ -z "${CMKD_EXTRA_WHEELS+set}" ] && [ -d "$ROOT/../shared/wheels/ros2-cli" ]; then
  export CMKD_EXTRA_WHEELS="$ROOT/../shared/wheels/ros2-cli"
fi
bash "$ROOT/scripts/install.sh"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec cmkd demo --out "$ROOT/out/demo" "$@"
