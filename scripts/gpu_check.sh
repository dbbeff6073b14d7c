#!/usr/bin/env bash
# GPU validation, for a machine with an NVIDIA GPU (e.g. the device tool's H100): build against the torch
# installed there, run the whole test suite (CUDA-marked tests included), run compute-sanitizer (memcheck,
# racecheck, initcheck) over the CUDA tests, then the benchmarks. Results land under ${OUT:-out/gpu}:
# summary.txt, build.log, ptxas.txt, tests.log, sanitizer-*.log, bench-*.md/.log and results/ (benchmark JSON).
#
#   scripts/gpu_check.sh                      # every stage: build tests sanitizer bench
#   scripts/gpu_check.sh build tests          # some stages, in the order given
#
# Stages: build, tests, sanitizer, bench, gn (scripts/gn_cuda_check.py: GroupNorm on every CUDA path). Each
# stage's heavy commands run under `timeout` (STAGE_TIMEOUT seconds each, default 480), so a stage that runs long
# still leaves its log and the later stages still run. Where one command may run at most 10 minutes (the
# device tool), split the work over calls on a machine that stays warm (the build is kept between them), e.g.
#   call 1: scripts/gpu_check.sh build tests       (build ~3-5 min on 16 cores, tests a few minutes)
#   call 2: scripts/gpu_check.sh sanitizer gn
#   call 3: BENCH_OPS="group_norm sampler_step" scripts/gpu_check.sh bench
#   call 4: BENCH_OPS="attention unet_step sampling" scripts/gpu_check.sh bench
# BENCH_ARGS adds options to every `fastdiff bench` call (e.g. "--quick").
# Later calls rebuild only if the build is missing (`pip install -e .` leaves fastdiff/_C*.so in the tree).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-480}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
log() { echo "$@" | tee -a "$OUT/summary.txt"; }
run_timed() { timeout --signal=INT --kill-after=20 "$STAGE_TIMEOUT" "$@"; }

stage_build() {
  log "== build ($(date -u +%FT%TZ))"
  if ! FASTDIFF_PTXAS_VERBOSE=1 run_timed python -m pip install -v --no-build-isolation --no-deps -e . \
      > "$OUT/build.log" 2>&1; then
    log "build failed"
    tail -50 "$OUT/build.log"
    exit 1
  fi
  grep -E "spill|registers" "$OUT/build.log" | sort | uniq -c > "$OUT/ptxas.txt"
  log "$(grep -cE '[1-9][0-9]* bytes spill' "$OUT/build.log") ptxas lines with spills (ptxas.txt)"
}

ensure_built() {
  if ! python -c 'import fastdiff, sys; sys.exit(0 if fastdiff.info()["cuda_extension"] else 1)' 2>/dev/null; then
    stage_build
  fi
  log "$(python -c 'import fastdiff, json; print(json.dumps(fastdiff.info()))')"
}

stage_tests() {
  log "== tests ($(date -u +%FT%TZ))"
  run_timed python -m pytest -q -ra tests > "$OUT/tests.log" 2>&1
  log "tests rc=$?"
  tail -5 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
}

stage_sanitizer() {
  for tool in memcheck racecheck initcheck; do
    log "== compute-sanitizer $tool ($(date -u +%FT%TZ))"
    run_timed compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
      python -m pytest -q -x -m cuda -k "not compile" tests > "$OUT/sanitizer-$tool.log" 2>&1
    log "$tool rc=$?"
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer-$tool.log" | tail -3 | tee -a "$OUT/summary.txt"
  done
}

stage_gn() {
  log "== gn_cuda_check ($(date -u +%FT%TZ))"
  run_timed python scripts/gn_cuda_check.py cuda > "$OUT/gn_cuda_check.log" 2>&1
  log "gn_cuda_check rc=$?"
  tail -5 "$OUT/gn_cuda_check.log" | tee -a "$OUT/summary.txt"
}

stage_bench() {
  for op in ${BENCH_OPS:-group_norm attention sampler_step unet_step sampling}; do
    log "== bench $op ($(date -u +%FT%TZ))"
    run_timed python -m fastdiff.cli bench --op "$op" ${BENCH_ARGS:-} > "$OUT/bench-$op.md" 2> "$OUT/bench-$op.log"
    log "bench $op rc=$?"
  done
  mkdir -p "$OUT/results"
  cp -r benchmarks/results/. "$OUT/results/" 2>/dev/null || true
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests sanitizer bench)
for s in "${stages[@]}"; do
  case "$s" in
    build) stage_build; ensure_built ;;
    tests | sanitizer | bench | gn) ensure_built; "stage_$s" ;;
    *) echo "unknown stage: $s (build, tests, sanitizer, bench, gn)" >&2; exit 2 ;;
  esac
done
