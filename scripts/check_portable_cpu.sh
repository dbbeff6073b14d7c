#!/usr/bin/env bash
# The CPU kernels have AVX-512 code paths (csrc/cpu/group_norm.cpp) and portable ones that GCC vectorises for
# AVX2 or plainer CPUs. `make test` builds for the machine at hand, so on an AVX-512 machine the portable paths
# would go untested: this builds a second, CPU-only copy of the extension without AVX-512 and runs the CPU kernel
# tests against it. Used by .ci/run; run it by hand after changing a kernel that has both paths.
#   usage: scripts/check_portable_cpu.sh [python]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(realpath "${1:-.venv/bin/python}")
if ! grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  echo "check_portable_cpu: this CPU has no AVX-512, so make test already ran the portable paths"
  exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
git ls-files -z | xargs -0 -I{} cp --parents {} "$TMP"/  # the tracked sources only
cd "$TMP"
FASTDIFF_BUILD_CUDA=0 FASTDIFF_CPU_FLAGS="-mavx2 -mfma -mf16c" "$PY" setup.py -q build_ext --inplace > build.log 2>&1 \
  || { cat build.log; exit 1; }
# An editable install of the checkout puts a finder ahead of sys.path: drop it, so `fastdiff` is this copy.
"$PY" - <<'PYEOF'
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in getattr(f, "__name__", "")]
sys.path.insert(0, os.getcwd())
import importlib.util
origin = importlib.util.find_spec("fastdiff").origin  # (not imported here: the tests' conftest goes first)
assert origin.startswith(os.getcwd()), f"fastdiff resolves to {origin}, not the portable build"
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_group_norm.py", "tests/test_sampler_step.py",
                      "tests/test_samplers.py"]))
PYEOF
