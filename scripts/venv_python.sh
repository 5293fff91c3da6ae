# Sourced by the build scripts: sets PYTHON to the interpreter of the venv given as the script's
# first argument ($1), else of the active venv, else python3 on PATH; exits 2 when there is none.
if [[ $# -ge 1 ]]; then
    PYTHON="$1/bin/python"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
else
    PYTHON="$(command -v python3)"
fi
if [[ ! -x "$PYTHON" ]]; then
    echo "error: no python interpreter at $PYTHON" >&2
    exit 2
fi
