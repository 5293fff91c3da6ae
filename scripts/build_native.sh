#!/usr/bin/env bash
# Build the compiled kernels of the torch sparse backend (cmkd_ros/sparse/csrc: kernel maps and
# a fused gather-GEMM-scatter convolution, C++ with OpenMP) into the cache
#   ${CMKD_NATIVE_CACHE:-$HOME/.cache/cmkd_ros/native}/torch-<version>-<python>-<machine>/<hash>/
# once per torch version, Python, machine and source: a later run (CI, a fresh venv with the same
# torch) finds the build and returns at once. cmkd_ros loads it from there at run time.
#
# Usage: scripts/build_native.sh [VENV]      (default: the active virtual environment)
#
# Needs a C++ compiler with OpenMP (g++; tested: GCC 12, torch 2.13.0+cpu, about 2-4 minutes on
# 2 shared cores) and ninja (installed into the venv when missing). One build serves every x86-64
# CPU (the convolution is compiled for AVX-512, AVX2 and the baseline, chosen at run time).
# Without a compiler the script warns and exits 0: the pure-PyTorch path runs (same results,
# slower); CMKD_REQUIRE_NATIVE=1 makes a failed build an error.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv_python.sh"
run() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$@"; }
if run -c 'import sys; from cmkd_ros.sparse import native
sys.exit(0 if native.library_path().exists() else 1)' 2>/dev/null; then
    run -c 'from cmkd_ros.sparse import native; native.main([])'
    exit 0
fi
if ! command -v "${CXX:-c++}" > /dev/null; then
    echo "[native] warning: no C++ compiler (${CXX:-c++}); the pure-PyTorch sparse path runs" >&2
    [[ "${CMKD_REQUIRE_NATIVE:-0}" == "1" ]] && exit 1
    exit 0
fi
if ! run -c 'import ninja' 2>/dev/null && ! command -v ninja > /dev/null; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check ninja
fi
START=$(date +%s)
if run -c 'from cmkd_ros.sparse import native; native.main(["--build"])'; then
    echo "[native] built in $(( $(date +%s) - START )) s"
else
    echo "[native] warning: the build failed; the pure-PyTorch sparse path runs" >&2
    [[ "${CMKD_REQUIRE_NATIVE:-0}" == "1" ]] && exit 1
fi
exit 0
