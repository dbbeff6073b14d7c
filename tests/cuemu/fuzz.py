"""Random cases for the emulated CUDA kernels (tests/cuemu), beyond the fixed ones of test_cuda_emulated.py.

Each case draws a shape, dtype, layout, alignment, parameter set and GPU (SM count, shared memory per block),
runs the op under a random schedule and checks it against the fp64 reference; a failure prints the case (and
its seed) and the script exits 1. Usage, from the repository root:
    PYTHONPATH=. python tests/cuemu/fuzz.py [--seconds 300] [--seed 0] [--ops group_norm,attention,sampler_step]
"""
import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import build  # noqa: E402

from fastdiff import reference  # noqa: E402
from test_cuda_emulated import misaligned_copy as _misalign  # noqa: E402
from test_group_norm import to_layout as _layout  # noqa: E402

TOL = {torch.float32: 3e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def case_group_norm(rng, emu):
    G = rng.choice([1, 2, 3, 4, 8, 32])
    cpg = rng.choice([1, 2, 3, 5, 8, 10, 16, 20, 40])
    C, N = G * cpg, rng.randint(1, 3)
    nsp = rng.randint(0, 3)
    spatial = [rng.choice([1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 31, 33, 64]) for _ in range(nsp)]
    while math.prod(spatial) * C * N > 400_000:
        spatial[spatial.index(max(spatial))] //= 2
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    cl = nsp >= 1 and rng.random() < 0.5
    x = _layout(torch.randn(N, C, *spatial, dtype=torch.float64) * rng.choice([0.1, 1, 10]) + rng.choice([0, 3, 100]),
                cl).to(dtype)
    if rng.random() < 0.25:
        x = _misalign(x)
    p = {}
    for k, shp in (("weight", (C,)), ("bias", (C,)), ("scale", (N, C)), ("shift", (N, C))):
        if rng.random() < 0.6:
            p[k] = (torch.randn(shp) * 0.5 + (1 if k == "weight" else 0)).to(dtype)
    act = rng.choice(["silu", ""])
    desc = (f"group_norm x{tuple(x.shape)} G={G} {dtype} cl={cl} off={x.storage_offset()} params={sorted(p)} "
            f"act={act!r}")
    y, mean, rstd = torch.ops.fastdiff_emu.group_norm(x, G, p.get("weight"), p.get("bias"), p.get("scale"),
                                                      p.get("shift"), 1e-5, act)
    try:
        ref = reference.group_norm(x.double(), G, *(p.get(k) for k in ("weight", "bias")), 1e-5,
                                   scale=p.get("scale"), shift=p.get("shift"), activation=act or None,
                                   compute_dtype=torch.float64)
    except ValueError:  # one value per group: torch's group_norm refuses it; the CPU kernel takes it
        ref = torch.ops.fastdiff.group_norm(x, G, p.get("weight"), p.get("bias"), p.get("scale"), p.get("shift"),
                                            1e-5, act)[0].double()
    tol = TOL[dtype] * max(1.0, ref.abs().max().item())
    err = (y.double() - ref).abs().max().item() if y.numel() else 0.0
    ok = y.stride() == x.stride() and err <= tol
    if ok and x.numel():
        gy = _layout(torch.randn(x.shape), cl).to(dtype)
        got = torch.ops.fastdiff_emu.group_norm_backward(gy, x, mean, rstd, G, p.get("weight"), p.get("bias"),
                                                         p.get("scale"), p.get("shift"), act)
        want = torch.ops.fastdiff.group_norm_backward(gy, x, mean, rstd, G, p.get("weight"), p.get("bias"),
                                                      p.get("scale"), p.get("shift"), act)
        for name, a, b in zip(("x", "weight", "bias", "scale", "shift"), got, want):
            t = 5 * TOL[dtype] * max(1.0, b.abs().max().item()) if b.numel() else 0
            e = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
            if not (e <= t) or a.shape != b.shape:
                return False, f"{desc}: grad {name} off by {e:.3g} (tol {t:.3g}) against the CPU kernel"
    return ok, f"{desc}: max error {err:.3g} (tol {tol:.3g})"


def case_attention(rng, emu):
    D = 8 * rng.randint(1, 32)
    B, H = rng.randint(1, 2), rng.randint(1, 3)
    Sq, Skv = rng.randint(1, 200), rng.randint(1, 200)
    dtype = rng.choice([torch.float16, torch.bfloat16])
    q, k, v = (torch.randn(B, H, s, D).to(dtype) for s in (Sq, Skv, Skv))
    if rng.random() < 0.3:  # (B, S, H, D) views
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    scale = rng.choice([D ** -0.5, 0.05, 1.0])
    out, lse = torch.ops.fastdiff_emu.attention(q, k, v, scale)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    ref = torch.softmax(s, -1) @ v.double()
    err = (out.double() - ref).abs().max().item()
    lerr = (lse.double() - torch.logsumexp(s, -1)).abs().max().item()
    tol = 6e-3 if dtype == torch.float16 else 3e-2
    return err <= tol and lerr <= 1e-3, f"attention {B}x{H} Sq={Sq} Skv={Skv} D={D} {dtype} scale={scale:.3g}: " \
                                        f"max error {err:.3g}, lse {lerr:.3g}"


def case_sampler_step(rng, emu):
    N = rng.randint(1, 3)
    L = rng.randint(1, 3000)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    mk = lambda: torch.randn(N, L).to(dtype)  # noqa: E731
    x, m = mk(), mk()
    u = mk() if rng.random() < 0.5 else None
    nb = rng.randint(0, 3)
    bufs = [mk() for _ in range(nb)]
    if rng.random() < 0.3:
        m = _misalign(m)
    table = torch.rand(3, 12)
    table[:, 11] = (torch.rand(3) < 0.3).float()
    step = rng.randint(-1, 4)
    var_mode, clip_mode = rng.randint(0, 2), rng.randint(0, 2)
    v = (torch.rand(N, L) * 0.5 + 0.01).to(dtype) if var_mode else None
    thr = torch.rand(N) + 0.5 if clip_mode == 2 else None
    z = mk() if rng.random() < 0.3 else None
    args = lambda bs: (x, m, u, 2.0, table, torch.tensor(step), z, bs[0] if nb else None, v, thr,  # noqa: E731
                       rng_seed, var_mode, clip_mode, 1.5, True, bs[1] if nb > 1 else None,
                       bs[2] if nb > 2 else None)
    rng_seed = rng.randint(0, 2**62)
    eb, cb = [b.clone() for b in bufs], [b.clone() for b in bufs]
    got = torch.ops.fastdiff_emu.sampler_step(*args(eb))
    want = torch.ops.fastdiff.sampler_step(*args(cb))
    t = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    err = (got.double() - want.double()).abs().max().item()
    berr = max([(a.double() - b.double()).abs().max().item() for a, b in zip(eb, cb)] + [0.0])
    return err <= t * 4 and berr <= t, (f"sampler_step N={N} L={L} {dtype} cfg={u is not None} bufs={nb} "
                                        f"step={step} var={var_mode} clip={clip_mode} noise={'given' if z is not None else 'philox'}: "
                                        f"max error {err:.3g}, history {berr:.3g}")


CASES = {"group_norm": case_group_norm, "attention": case_attention, "sampler_step": case_sampler_step}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", default=",".join(CASES))
    a = ap.parse_args()
    emu = build.load()
    ops = a.ops.split(",")
    t0, n, bad = time.time(), 0, 0
    while time.time() - t0 < a.seconds:
        seed = a.seed * 1_000_003 + n
        rng = random.Random(seed)
        torch.manual_seed(seed)
        emu.configure(rng.choice([1, 8, 46, 84, 108, 132, 1024]), rng.randint(0, 2), seed,
                      rng.choice([99 * 1024, 163 * 1024, 227 * 1024]))
        op = ops[n % len(ops)]
        try:
            ok, desc = CASES[op](rng, emu)
        except Exception as e:  # noqa: BLE001 - a kernel error is a finding too
            ok, desc = False, f"{op}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        n += 1
        if not ok:
            bad += 1
            print(f"FAIL (seed {seed}): {desc}", flush=True)
    print(f"{n} cases in {time.time() - t0:.0f} s, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
