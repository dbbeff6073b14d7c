"""Mutation check of the emulated CUDA tests: plant one bug at a time in a copy of the tree, run
tests/test_cuda_emulated.py there, and require a failure for each (a planted bug that passes means the tests
cannot see that kind of mistake). Not part of `make test`: each mutant rebuilds the emulator (about 1 minute on 2
cores). Usage, from the repository root: python tests/cuemu/mutants.py [index ...]

A chunk length that is not a multiple of the vector width (group_norm.cu's make_plan) was tried and is not a
bug: cf_span aligns vectors to absolute addresses, so any chunk boundary reads correctly (it only costs speed).
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]
MUTS = [
 ("gn: stats_cl pivot barrier removed", "csrc/cuda/group_norm.cu",
  "          x[pivot_at(q.n, static_cast<uint32_t>(cbase) + threadIdx.x, static_cast<uint32_t>(p.cpg), p.C, p.S, true)]);\n    __syncthreads();",
  "          x[pivot_at(q.n, static_cast<uint32_t>(cbase) + threadIdx.x, static_cast<uint32_t>(p.cpg), p.C, p.S, true)]);"),
 ("gn: stats_cl tree barrier removed", "csrc/cuda/group_norm.cu",
  "  for (int s = 1; s < p.slots; s <<= 1) {\n    __syncthreads();\n    if ((q.slot & (2 * s - 1)) == 0 && q.slot + s < p.slots) {\n      const float* o = sm + (threadIdx.x + s * p.Cb) * kStride;",
  "  for (int s = 1; s < p.slots; s <<= 1) {\n    if ((q.slot & (2 * s - 1)) == 0 && q.slot + s < p.slots) {\n      const float* o = sm + (threadIdx.x + s * p.Cb) * kStride;"),
 ("gn: team_merge barrier removed", "csrc/cuda/group_norm.cu",
  "    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;\n    __syncthreads();",
  "    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;"),
 ("gn: merge_fwd broadcast barrier removed", "csrc/cuda/group_norm.cu",
  "    bc[2] = K;\n  }\n  __syncthreads();",
  "    bc[2] = K;\n  }"),
 ("gn: seg_merge shuffle offset off by one", "csrc/cuda/group_norm.cu",
  "const Stats o{__shfl_down_sync(kFull, s.n, off, width)",
  "const Stats o{__shfl_down_sync(kFull, s.n, off + 1, width)"),
 ("gn: apply_cf tail loop misses its last value", "csrc/cuda/group_norm.cu",
  "  for (int j = q.rank; j < sp.tail; j += p.TS)\n    y[et + j]",
  "  for (int j = q.rank; j + 1 < sp.tail; j += p.TS)\n    y[et + j]"),
 ("sampler: history moves in the wrong order", "csrc/cuda/sampler_step.cu",
  "      if (move2) store4(a.b3, e0, a.sb3, a.L, a.flat, full, e0, a.total, p2);\n      if (move1) store4(a.b2, e0, a.sb2, a.L, a.flat, full, e0, a.total, p);",
  "      if (move1) store4(a.b2, e0, a.sb2, a.L, a.flat, full, e0, a.total, p);\n      if (move2) store4(a.b3, e0, a.sb3, a.L, a.flat, full, e0, a.total, p);"),
 ("sampler: flat path ignores misalignment", "csrc/cuda/sampler_step.cu",
  "  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;",
  "  return true;"),
 ("sampler: last partial group dropped", "csrc/cuda/sampler_step.cu",
  "  const int64_t groups = (total + 3) / 4;", "  const int64_t groups = total / 4;"),
 ("attn: waits for one group too few", "csrc/cuda/attention_kernel.cuh",
  "      cp_async_wait<1>();", "      cp_async_wait<2>();"),
 ("attn: stage refilled without the barrier", "csrc/cuda/attention_kernel.cuh",
  "    __syncthreads();  // every warp is done with this stage before it is refilled", ""),
 ("attn: output staged without the barrier", "csrc/cuda/attention_kernel.cuh",
  "  }\n  __syncthreads();\n  constexpr int kChunks = kBlockM * Cfg::kChunksPerRow;", "  }\n  constexpr int kChunks = kBlockM * Cfg::kChunksPerRow;"),
 ("attn: K fragment column from the wrong lane bit", "csrc/cuda/attention_kernel.cuh",
  "const int k_col = ((lane >> 3) & 1) << 3;", "const int k_col = ((lane >> 4) & 1) << 3;"),
 ("attn: ragged-key mask off by one", "csrc/cuda/attention_kernel.cuh",
  "if (ragged && nt * 8 + col0 + (e & 1) >= valid_n) x = -INFINITY;", "if (ragged && nt * 8 + col0 + (e & 1) > valid_n) x = -INFINITY;"),
 ("attn: the 107-KB tile on every GPU", "csrc/cuda/attention.cu",
  "  else if (D <= 160 && big_smem) launch<T, Cfg160>(p, B, device, stream);", "  else if (D <= 160) launch<T, Cfg160>(p, B, device, stream);"),
]


def main(argv):
    only = set(argv)
    survivors = []
    with tempfile.TemporaryDirectory(prefix="cuemu-mutants-") as tmp:
        for i, (name, rel, old, new) in enumerate(MUTS):
            if only and str(i) not in only:
                continue
            d = Path(tmp) / "tree"
            if d.exists():
                shutil.rmtree(d)
            shutil.copytree(SRC, d, ignore=shutil.ignore_patterns(".git", ".venv", "build", "__pycache__", "*.png"))
            if (SRC / "build" / "cuemu").exists():  # reuse the objects of the files left unchanged
                shutil.copytree(SRC / "build" / "cuemu", d / "build" / "cuemu")
            f = d / rel
            text = f.read_text()
            if old not in text:
                print(f"[{i}] {name}: the source changed, update this mutant", flush=True)
                survivors.append(name)
                continue
            f.write_text(text.replace(old, new, 1))
            sel = ["-k", "attention"] if rel.endswith(("attention.cu", ".cuh")) else []
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                "tests/test_cuda_emulated.py", *sel], cwd=d, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(d)})
            errs = [ln for ln in r.stdout.splitlines() if ln.startswith("E ")][:1]
            failed = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")][:1]
            caught = r.returncode == 1 and failed and "Error building extension" not in r.stdout
            print(f"[{i}] {name}: {'caught' if caught else 'NOT CAUGHT (rc %d)' % r.returncode}"
                  f" {' '.join(failed + errs)[:300]}", flush=True)
            if not caught:
                survivors.append(name)
    print(f"{len(survivors)} mutant(s) not caught" + (": " + "; ".join(survivors) if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
