#!/usr/bin/env bash
# One full GPU validation pass, for a machine with an NVIDIA GPU (e.g. the device tool's H100):
# build against the torch installed there, run the whole test suite (CUDA-marked tests included), run
# compute-sanitizer (memcheck, racecheck, initcheck) over the CUDA tests, then the benchmarks.
# Everything lands under ${OUT:-out/gpu}: build.log, tests.log, sanitizer-*.log, benchmark JSON files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

echo "== build" | tee "$OUT/summary.txt"
FASTDIFF_PTXAS_VERBOSE=1 python -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { echo "build failed" | tee -a "$OUT/summary.txt"; tail -50 "$OUT/build.log"; exit 1; }
grep -E "spill|registers" "$OUT/build.log" | sort | uniq -c > "$OUT/ptxas.txt"
python -c 'import fastdiff, json; print(json.dumps(fastdiff.info()))' | tee -a "$OUT/summary.txt"

echo "== tests" | tee -a "$OUT/summary.txt"
python -m pytest -q -ra tests > "$OUT/tests.log" 2>&1; echo "tests rc=$?" | tee -a "$OUT/summary.txt"
tail -5 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  for tool in memcheck racecheck initcheck; do
    echo "== compute-sanitizer $tool" | tee -a "$OUT/summary.txt"
    compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
      python -m pytest -q -x -m cuda -k "not compile" tests > "$OUT/sanitizer-$tool.log" 2>&1
    echo "$tool rc=$?" | tee -a "$OUT/summary.txt"
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer-$tool.log" | tail -3 | tee -a "$OUT/summary.txt"
  done
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmarks" | tee -a "$OUT/summary.txt"
  python -m fastdiff.cli bench > "$OUT/bench.md" 2> "$OUT/bench.log"; echo "bench rc=$?" | tee -a "$OUT/summary.txt"
  cp -r benchmarks/results "$OUT/results" 2>/dev/null || true
fi
