#!/usr/bin/env bash
# Creates .venv (reusing an installed torch, else `pip install torch`) and installs fastdiff into it, editable,
# with its compiled extension (C++ always; CUDA when torch is a CUDA build and nvcc is found).
# Used by `make demo` and `make test`; safe to run again (it rebuilds the extension incrementally).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "fastdiff needs Python 3.10 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "== creating $VENV, reusing the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    echo "== creating $VENV and installing torch (no torch found for $PYTHON)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install torch
  fi
fi
PY="$VENV/bin/python"

# nvcc: CUDA_HOME if set, else /usr/local/cuda when it has one, else whatever is on PATH
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# build requirements (no build isolation: the extension must compile against the torch in the venv)
"$PY" -m pip install -q setuptools wheel ninja
echo "== building fastdiff and its extension (CUDA_HOME=${CUDA_HOME:-unset}, archs=${FASTDIFF_CUDA_ARCHS:-default})"
"$PY" -m pip install -q --no-build-isolation -e ".[${EXTRAS}]"
"$PY" -c 'import fastdiff, json; print(json.dumps(fastdiff.info(), indent=1))'
