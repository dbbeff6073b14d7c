#!/usr/bin/env bash
# The emulated CUDA kernels (tests/test_cuda_emulated.py) under AddressSanitizer: an out-of-bounds read or write
# by any CUDA thread, into a tensor or past a shared-memory array, stops the run with ASan's report. The
# emulator is built with -fsanitize=address (FASTDIFF_CUEMU_ASAN=1, its own build folder) and Python runs with
# libasan preloaded (torch and Python themselves are not instrumented: their heap allocations get redzones).
# Usage: bash scripts/cuemu_asan.sh [pytest args]   (from the repository root; a few minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
LIBASAN=$(${CXX:-c++} -print-file-name=libasan.so)
[ -f "$LIBASAN" ] || { echo "cuemu_asan: libasan.so not found (install the compiler's ASan runtime)" >&2; exit 2; }
# libstdc++ preloaded too: ASan's __cxa_throw interceptor must find the real one when it starts (Python does not
# link libstdc++), or the first C++ exception in an uninstrumented library (Triton's, torch's) aborts
LIBSTDCXX=$(${CXX:-c++} -print-file-name=libstdc++.so)
export FASTDIFF_CUEMU_ASAN=1
export ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0
LD_PRELOAD="$LIBASAN $LIBSTDCXX" PYTHONPATH=. "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_emulated.py "$@"
