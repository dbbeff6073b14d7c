"""Compile every Triton kernel of fastdiff for a GPU that is not there, and check what a GPU would refuse.

    python scripts/triton_offline_check.py [--arch 80 86 90] [--quick] [--json out.json]

The Triton launchers (fastdiff/triton/*.py) run on CPU tensors with Triton's active driver replaced by one that
only names a target (sm80, sm86, sm90), and each launch compiles instead of running (JITFunction.run with
warmup=True): the tile configurations are the ones the launchers pick on that GPU (their device queries are
answered for it: compute capability, SM count). For every kernel and configuration the script reports the
registers, the shared memory and the spills (ptxas -v on the kernel's PTX, Triton's own ptxas) and fails when
a kernel does not compile or needs more shared memory than a block of that GPU may have (what raises
OutOfResources at launch on the device). Spills are reported, not failed: the launchers document where they
accept some (see _fwd_config / _bwd_config in fastdiff/triton/attention.py).

No GPU, CUDA driver or TRITON_INTERPRET needed; the compiled code is not run, so this says nothing about
numerics (the interpreter tests do) or speed (the benchmarks on a GPU do).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Shared memory a block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin), and SM counts of one GPU of the
# kind (the launchers size grids by it).
GPUS = {80: ("A100", 166912, 108), 86: ("RTX 3090 / A10", 101376, 82), 89: ("L4 / RTX 4090", 101376, 58),
        90: ("H100 SXM", 232448, 132)}


class _TargetOnlyDriver:
    """Enough of a Triton driver for compiling: the target, a device index and a stream; nothing runs."""

    def __init__(self, cap: int):
        self.cap = cap

    def get_current_device(self):
        # Triton caches compiled kernels per device index: one index per target, so no sm80 binary is reused
        # for sm90
        return self.cap

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.cap, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(cap: int, sms: int, records: list):
    """Launches compile for sm`cap` and append (kernel name, constexprs and options, compiled kernel) to records;
    the launchers' GPU queries answer for a GPU of that kind."""
    from fastdiff.triton import attention as attn
    from fastdiff.triton import group_norm as gn

    cuda0 = torch.device("cuda", 0)
    saved = {(attn, "_major"): attn._major, (attn, "_num_sms"): attn._num_sms, (gn, "_sm_count"): gn._sm_count,
             (attn, "_fwd_config"): attn._fwd_config, (attn, "_bwd_config"): attn._bwd_config,
             (gn, "_target_programs"): gn._target_programs}
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        records.append((self.fn.__name__, {k: v for k, v in kwargs.items()}, kernel))
        return kernel

    prev_driver = _driver._active  # (reset_active() would create the real driver, which needs libcuda)
    _driver.set_active(_TargetOnlyDriver(cap))
    JITFunction.run = run
    attn._major = lambda index: cap // 10
    attn._num_sms = lambda index: sms
    gn._sm_count = lambda index: sms
    attn._fwd_config = lambda d, sq, skv, bh, device: saved[(attn, "_fwd_config")](d, sq, skv, bh, cuda0)
    attn._bwd_config = lambda d, sq, skv, bh, device: saved[(attn, "_bwd_config")](d, sq, skv, bh, cuda0)
    gn._target_programs = lambda device: saved[(gn, "_target_programs")](cuda0)
    try:
        yield
    finally:
        JITFunction.run = orig_run
        _driver._active = prev_driver
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


def _ptxas_report(ptx: str, cap: int) -> dict:
    """Registers, spill bytes and stack frame from ptxas -v (Triton's bundled ptxas) on the kernel's PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{text}")

    def num(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def _cases(quick: bool):
    """(label, callable) pairs; each callable runs one user-level launch path on CPU tensors."""
    from fastdiff.triton import attention as attn  # noqa: F401  (registers the ops)
    from fastdiff.triton import group_norm as gn  # noqa: F401
    from fastdiff.triton import sampler_step as ss  # noqa: F401

    ops = torch.ops.fastdiff
    out = []
    gn_shapes = [(2, 320, 64, 64), (2, 1280, 8, 8), (2, 320, 7, 9)] if quick else \
        [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (4, 192, 64, 64), (2, 320, 7, 9),
         (3, 40, 17), (2, 64, 4, 6, 5)]
    gn_dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    for shape in gn_shapes:
        for dtype in gn_dtypes:
            for cl in (False, True):
                if cl and len(shape) != 4:
                    continue

                def gn_case(shape=shape, dtype=dtype, cl=cl):
                    x = torch.randn(shape, dtype=dtype)
                    if cl:
                        x = x.to(memory_format=torch.channels_last)
                    C, N = shape[1], shape[0]
                    w, b = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
                    s, t = torch.randn(N, C, dtype=dtype), torch.randn(N, C, dtype=dtype)
                    y, mean, rstd = ops.group_norm_triton(x, 32 if C % 32 == 0 else 4, w, b, s, t, 1e-5, "silu")
                    ops.group_norm_backward_triton(torch.randn_like(y), x, mean, rstd, 32 if C % 32 == 0 else 4,
                                                   w, b, s, t, "silu")

                out.append((f"group_norm {shape} {str(dtype)[6:]} {'nhwc' if cl else 'nchw'}", gn_case))
    # attention: SD 1.5 self-attention (4096/1024/256/64 tokens, heads of 40/80/160), cross-attention to 77
    # tokens, ADM heads of 64, DiT/others up to 256
    att = [(2, 8, 4096, 4096, 40), (2, 8, 1024, 77, 80), (2, 8, 256, 256, 160), (2, 4, 1024, 1024, 64),
           (2, 4, 256, 256, 128), (1, 2, 128, 128, 256), (2, 8, 64, 64, 160), (2, 8, 4096, 77, 40)]
    if quick:
        att = att[:3]
    for B, H, SQ, SKV, D in att:
        for dtype in ([torch.float16] if quick else [torch.float16, torch.bfloat16]):

            def attn_case(B=B, H=H, SQ=SQ, SKV=SKV, D=D, dtype=dtype):
                q = torch.randn(B, H, SQ, D, dtype=dtype)
                k, v = torch.randn(B, H, SKV, D, dtype=dtype), torch.randn(B, H, SKV, D, dtype=dtype)
                o, lse = ops.attention_triton(q, k, v, D ** -0.5)
                ops.attention_backward_triton(torch.randn_like(o), q, k, v, o, lse, D ** -0.5)

            out.append((f"attention B{B} H{H} Sq{SQ} Skv{SKV} D{D} {str(dtype)[6:]}", attn_case))
    # sampler step: the flag combinations the samplers use (nb: x0 history buffers, 0-3; 2 and 3 with the KEEP and
    # history-move code of DPM-Solver++ 3M, UniPC and PLMS)
    for flags in ([(0, 0, True, False, 0), (0, 0, False, True, 3)] if quick else
                  [(0, 0, True, False, 0), (0, 1, True, True, 0), (2, 2, True, False, 1), (1, 0, False, True, 1),
                   (0, 2, True, True, 2), (0, 0, False, True, 3)]):
        var_mode, clip_mode, stochastic, with_u, nb = flags

        def ss_case(var_mode=var_mode, clip_mode=clip_mode, stochastic=stochastic, with_u=with_u, nb=nb):
            x = torch.randn(2, 4, 8, 8, dtype=torch.float16)
            m = torch.randn_like(x)
            table = torch.randn(10, 12)
            step = torch.zeros(1, dtype=torch.int64)
            thresh = torch.ones(2) if clip_mode == 2 else None
            bufs = [torch.zeros_like(x) for _ in range(nb)] + [None] * (3 - nb)
            ops.sampler_step_triton(x, m, m if with_u else None, 2.0, table, step, None, bufs[0],
                                    m if var_mode else None, thresh, 3, var_mode, clip_mode, 1.0, stochastic,
                                    bufs[1], bufs[2])

        out.append((f"sampler_step var{var_mode} clip{clip_mode} stoch{int(stochastic)} u{int(with_u)} "
                    f"b{nb}", ss_case))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 86, 90], choices=sorted(GPUS),
                   help="compute capabilities to compile for (default: 80 86 90)")
    p.add_argument("--quick", action="store_true", help="a few shapes per op, fp16 only")
    p.add_argument("--only", default=None, help="only the cases whose label contains this text")
    p.add_argument("--json", default=None, help="also write every kernel's figures to this file")
    a = p.parse_args(argv)

    rows, failures = [], []
    t0 = time.time()
    for cap in a.arch:
        name, smem_limit, sms = GPUS[cap]
        print(f"== sm{cap} ({name}: {smem_limit // 1024} KB shared per block, {sms} SMs)", flush=True)
        seen = {}
        for label, case in _cases(a.quick):
            if a.only and a.only not in label:
                continue
            records = []
            try:
                with compile_only(cap, sms, records):
                    case()
            except Exception as e:  # a compile error: report it with the case, go on with the others
                failures.append(f"sm{cap} {label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                print(f"  FAIL {label}: {failures[-1]}", flush=True)
                continue
            for kname, kwargs, kernel in records:
                consts = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
                key = getattr(kernel, "hash", None) or id(kernel)  # one compiled binary, reported once
                if key in seen:
                    continue
                rep = _ptxas_report(kernel.asm["ptx"], cap)
                row = {"arch": cap, "case": label, "kernel": kname, "config": consts,
                       "shared": kernel.metadata.shared, **rep}
                seen[key] = row
                rows.append(row)
                bad = row["shared"] > smem_limit
                if bad:
                    failures.append(f"sm{cap} {label}: {kname} needs {row['shared']} B of shared memory, "
                                    f"more than the {smem_limit} B a block may have")
                spill = row["spill_stores"] + row["spill_loads"]
                flag = "  OVER SHARED LIMIT" if bad else (f"  spills {spill} B" if spill else "")
                cfg = " ".join(f"{k}={v}" for k, v in consts.items() if not k.startswith("HAS_"))
                print(f"  {kname:24s} regs {row['registers']:3d} smem {row['shared']:6d} B  {cfg[:70]}  "
                      f"[{label}]{flag}", flush=True)
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(rows)} distinct kernels compiled in {time.time() - t0:.0f} s; {len(spilling)} with spills; "
          f"{len(failures)} failures")
    for f in failures:
        print("  " + f)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "rows": rows,
                       "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
