#!/usr/bin/env bash
# Build and install MinkowskiEngine 0.5.4 (the optional reference sparse-convolution backend).
#
# Usage: scripts/build_minkowski.sh [VENV]      (default: the active virtual environment)
#
# The wheel is built once per torch version and cached in
#   ${CMKD_WHEEL_CACHE:-$HOME/.cache/cmkd_ros/wheels}/torch-<torch version>/<cpu|cuda>/
# A later run (CI, a fresh venv with the same torch) installs the cached wheel without building;
# nothing is done when MinkowskiEngine already imports (CMKD_ME_FORCE=1 reinstalls).
#
# CPU build (default, tested: torch 2.13.0+cpu, Python 3.11, about 7 min on 2 cores, 27.6 MB
# wheel): needs OpenBLAS headers (apt-get install -y libopenblas-dev; done here when apt-get is
# available and we are root).
# CUDA build (CMKD_ME_CUDA=1; not tested here): needs nvcc matching torch's CUDA version and
# TORCH_CUDA_ARCH_LIST for the target GPUs. The sdist is patched with the thrust includes that
# CUDA >= 12 no longer provides implicitly (NVIDIA/MinkowskiEngine issues #543, #601). The cache
# key is the torch version, which names the CUDA build (e.g. torch-2.5.1+cu124/cuda).
#
# Why this recipe: plain `pip install minkowskiengine` builds in an isolated environment without
# torch and fails; --install-option/--global-option without -C are ignored by modern pip; the
# released sources import `Sequence` from `collections`, removed in Python 3.10 (patched below).
set -euo pipefail

ME_VERSION="${CMKD_ME_VERSION:-0.5.4}"
MAX_JOBS="${MAX_JOBS:-2}"
export MAX_JOBS

# 1. Choose the Python interpreter: the venv given as argument, else the active one.
source "$(dirname "${BASH_SOURCE[0]}")/venv_python.sh"
TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)')" || {
    echo "error: torch is not importable by $PYTHON; install torch first" >&2
    exit 2
}
if [[ "${CMKD_ME_FORCE:-0}" != "1" ]] && "$PYTHON" -c 'import MinkowskiEngine' > /dev/null 2>&1; then
    echo "MinkowskiEngine already imports in $PYTHON (set CMKD_ME_FORCE=1 to reinstall)"
    exit 0
fi
PY_TAG="$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"

if [[ "${CMKD_ME_CUDA:-0}" == "1" ]]; then
    BUILD_FLAGS="--blas=openblas"
    VARIANT="cuda"
else
    BUILD_FLAGS="--blas=openblas --cpu_only"
    VARIANT="cpu"
fi
CACHE_ROOT="${CMKD_WHEEL_CACHE:-$HOME/.cache/cmkd_ros/wheels}"
WHEEL_DIR="$CACHE_ROOT/torch-$TORCH_VERSION/$VARIANT"
mkdir -p "$WHEEL_DIR"
echo "python: $PYTHON  torch: $TORCH_VERSION  variant: $VARIANT  wheel cache: $WHEEL_DIR"

# 2. OpenBLAS headers (needed to build, and the runtime library to import).
if ! [[ -e /usr/include/x86_64-linux-gnu/cblas.h || -e /usr/include/cblas.h \
        || -e /usr/include/openblas/cblas.h || -e /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ]]; then
    if command -v apt-get > /dev/null && [[ "$(id -u)" == "0" ]]; then
        apt-get install -y libopenblas-dev || { apt-get update && apt-get install -y libopenblas-dev; }
    else
        echo "warning: OpenBLAS headers not found; run: sudo apt-get install -y libopenblas-dev" >&2
    fi
fi

# 3. Build the wheel unless the cache already holds one for this torch and Python.
shopt -s nullglob
WHEELS=("$WHEEL_DIR"/[Mm]inkowski[Ee]ngine-"$ME_VERSION"-"$PY_TAG"-*.whl)
if [[ ${#WHEELS[@]} -eq 0 ]]; then
    "$PYTHON" -m pip install --quiet numpy ninja wheel setuptools
    START=$(date +%s)
    if [[ "$VARIANT" == "cpu" ]]; then
        "$PYTHON" -m pip wheel --no-deps --no-build-isolation --use-pep517 \
            -C"--global-option=$BUILD_FLAGS" "minkowskiengine==$ME_VERSION" -w "$WHEEL_DIR"
    else
        SRC_DIR="$(mktemp -d)"
        trap 'rm -rf "$SRC_DIR"' EXIT
        "$PYTHON" -m pip download --no-deps --no-binary :all: "minkowskiengine==$ME_VERSION" \
            -d "$SRC_DIR"
        tar -xzf "$SRC_DIR"/[Mm]inkowski[Ee]ngine-"$ME_VERSION".tar.gz -C "$SRC_DIR"
        TREE="$SRC_DIR/MinkowskiEngine-$ME_VERSION"
        sed -i '1i #include <thrust/execution_policy.h>' \
            "$TREE/src/3rdparty/concurrent_unordered_map.cuh"
        sed -i '1i #include <thrust/remove.h>\n#include <thrust/unique.h>' \
            "$TREE/src/coordinate_map_gpu.cu"
        "$PYTHON" -m pip wheel --no-deps --no-build-isolation --use-pep517 \
            -C"--global-option=$BUILD_FLAGS --force_cuda" "$TREE" -w "$WHEEL_DIR"
    fi
    echo "built MinkowskiEngine wheel in $(( $(date +%s) - START )) s"
    WHEELS=("$WHEEL_DIR"/[Mm]inkowski[Ee]ngine-"$ME_VERSION"-"$PY_TAG"-*.whl)
    if [[ ${#WHEELS[@]} -eq 0 ]]; then
        echo "error: pip wheel produced no MinkowskiEngine wheel in $WHEEL_DIR" >&2
        exit 1
    fi
else
    echo "using cached wheel ${WHEELS[0]}"
fi

# 4. Install it, then import the ABCs that the sources take from `collections` (`Sequence`,
#    removed there in Python 3.10) from `collections.abc` instead; other names stay.
"$PYTHON" -m pip install --no-deps --force-reinstall "${WHEELS[0]}"
"$PYTHON" - <<'EOF'
import importlib.util
import pathlib
import re

ABCS = {'Sequence', 'Mapping', 'MutableMapping', 'Iterable', 'Iterator', 'Callable'}
root = pathlib.Path(importlib.util.find_spec('MinkowskiEngine').origin).parent
pattern = re.compile(r'^([ \t]*)from collections import ([\w, ]+)$', re.M)


def fix(match):
    indent, names = match.group(1), [n.strip() for n in match.group(2).split(',')]
    rest = [n for n in names if n not in ABCS]
    abcs = [n for n in names if n in ABCS]
    out = [f'{indent}from collections import {", ".join(rest)}'] if rest else []
    if abcs:
        out.append(f'{indent}from collections.abc import {", ".join(abcs)}')
    return '\n'.join(out)


for path in sorted(root.rglob('*.py')):
    text = path.read_text()
    patched = pattern.sub(fix, text)
    if patched != text:
        path.write_text(patched)
        print('patched', path)
EOF

# 5. Check that it imports.
"$PYTHON" -c 'import MinkowskiEngine as ME; print("MinkowskiEngine", ME.__version__, "imports")'
