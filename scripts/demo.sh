#!/usr/bin/env bash
# Install everything (idempotent) and run the demo on generated data. Extra arguments go to
# `cmkd demo` (see `cmkd demo --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/install.sh"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec cmkd demo --out "$ROOT/out/demo" "$@"
