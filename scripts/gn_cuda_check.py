"""GPU checks for csrc/cuda/group_norm.cu (run from the worktree root: python /tmp/gn_gpu_check.py [cuda|cpu]).

With "cpu" it exercises the CPU op through the same checks (validates this script). Checks per case:
forward y / mean / rstd against fastdiff.reference in fp64; backward (grad_x, weight, bias, scale, shift)
against autograd of the fp64 reference; CUDA vs CPU op; bit-identical reruns; misaligned views; channels-last;
non-contiguous scale/shift (chunks of a (N, 2C) tensor); grad_y in the other layout; empty inputs; opcheck;
CUDA-graph capture.
"""
import itertools
import sys

import torch

sys.path.insert(0, ".")
import fastdiff  # noqa: E402,F401
from fastdiff import reference  # noqa: E402

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 8e-2)}
fails = []


def make_x(shape, dtype, layout, misalign, gen, mean=3.0, spread=2.0):
    base = torch.randn(shape, generator=gen, dtype=torch.float64) * spread + mean
    if layout == "cl":
        perm = (0,) + tuple(range(2, len(shape))) + (1,)
        inv = [0] * len(perm)
        for i, q in enumerate(perm):
            inv[q] = i
        t = base.permute(perm).contiguous().permute(inv)
    else:
        t = base
    t = t.to(dtype)
    if misalign:  # same strides, data pointer off by one element (not 16-byte aligned)
        buf = torch.empty(t.numel() + 1, dtype=dtype, device=dev)
        v = buf[1:].as_strided(t.shape, t.stride())
        v.copy_(t.to(dev))
        return v
    return t.to(dev)


def close(name, got, ref, dtype, ctx):
    atol, rtol = TOL[dtype]
    got = got.double().cpu()
    ref = ref.double().cpu()
    if got.shape != ref.shape:
        fails.append(f"{ctx} {name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}")
        return
    if not torch.isfinite(got).all():
        fails.append(f"{ctx} {name}: non-finite")
        return
    scale = 1 + ref.abs().max().item() if name.startswith("g") and name != "gx" else 1
    err = ((got - ref).abs() - rtol * ref.abs()).max().item() if ref.numel() else 0.0
    if err > atol * scale:
        fails.append(f"{ctx} {name}: err {err:.3g} > {atol * scale:.3g}")


def case(shape, G, dtype, layout, params, act, misalign, seed=0, loc=3.0, spread=2.0, backward=True):
    gen = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = make_x(shape, dtype, layout, misalign, gen, loc, spread)
    p = {}
    if "w" in params:
        p["w"] = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.5 + 1).to(dtype).to(dev)
    if "b" in params:
        p["b"] = torch.randn(C, generator=gen, dtype=torch.float64).to(dtype).to(dev)
    if "s" in params:  # chunks of a Linear output: row stride 2C
        emb = torch.randn(N, 2 * C, generator=gen, dtype=torch.float64).mul(0.3).to(dtype).to(dev)
        p["s"], p["t"] = emb.chunk(2, dim=1)
    w, b, s, t = (p.get(k) for k in "wbst")
    ctx = f"{tuple(shape)} G={G} {dtype} {layout} params={params} act={act} misalign={misalign} loc={loc}"
    y, mean, rstd = torch.ops.fastdiff.group_norm(x, G, w, b, s, t, 1e-5, act)
    if y.stride() != x.stride():
        fails.append(f"{ctx}: y strides {y.stride()} != x strides {x.stride()}")
    y2, mean2, rstd2 = torch.ops.fastdiff.group_norm(x, G, w, b, s, t, 1e-5, act)
    if not (torch.equal(y, y2) and torch.equal(mean, mean2) and torch.equal(rstd, rstd2)):
        fails.append(f"{ctx}: forward not bit-identical run to run")
    # fp64 reference and its autograd
    xr = x.detach().double().cpu().requires_grad_()
    pr = {k: v.detach().double().cpu().requires_grad_() for k, v in p.items()}
    yr = reference.group_norm(xr, G, pr.get("w"), pr.get("b"), 1e-5, scale=pr.get("s"), shift=pr.get("t"),
                              activation="silu" if act == "silu" else None)
    close("y", y, yr.detach(), dtype, ctx)
    xg = xr.detach().reshape(N, G, -1)
    close("mean", mean, xg.mean(-1), torch.float32, ctx)
    close("rstd", rstd / (1 + rstd.abs().max()), (1 / torch.sqrt(xg.var(-1, unbiased=False) + 1e-5)) /
          (1 + rstd.abs().max().cpu()), torch.float32, ctx)
    if backward:
        gy = torch.randn(shape, generator=gen, dtype=torch.float64)
        yr.backward(gy)
        for gy_layout in ("same", "other"):
            gyd = gy.to(dtype).to(dev)
            if gy_layout == "same":
                gyd = torch.empty_like(x).copy_(gyd)
            elif len(shape) > 2:
                other = "cf" if layout == "cl" else "cl"
                gyd = make_x(shape, dtype, other, False, torch.Generator().manual_seed(1)).copy_(gyd)
            outs = torch.ops.fastdiff.group_norm_backward(gyd, x, mean, rstd, G, w, b, s, t, act)
            outs2 = torch.ops.fastdiff.group_norm_backward(gyd, x, mean, rstd, G, w, b, s, t, act)
            if not all(torch.equal(a, c) for a, c in zip(outs, outs2)):
                fails.append(f"{ctx} gy={gy_layout}: backward not bit-identical run to run")
            gx, gw, gb, gs, gt = outs
            close("gx", gx, xr.grad, dtype, ctx)
            for name, got, key in (("gw", gw, "w"), ("gb", gb, "b"), ("gs", gs, "s"), ("gt", gt, "t")):
                if key in pr:
                    close(name, got, pr[key].grad, dtype, ctx)
                elif got.numel() != 0:
                    fails.append(f"{ctx} {name}: expected an empty tensor for an absent parameter")
    # against the CPU kernel
    if dev == "cuda":
        cpu = torch.ops.fastdiff.group_norm(x.cpu(), G, *(v.cpu() if v is not None else None for v in (w, b, s, t)),
                                            1e-5, act)
        close("y_vs_cpu", y, cpu[0], dtype, ctx)
        close("mean_vs_cpu", mean, cpu[1], torch.float32, ctx)


shapes = [((2, 320, 64, 64), 32), ((3, 20, 7, 9), 4), ((3, 20, 7, 9), 5), ((2, 8), 4), ((2, 8, 1, 1), 2),
          ((1, 32, 4099), 32), ((4, 40, 3, 5, 7), 8), ((2, 1280, 8, 8), 32), ((5, 3, 13, 11), 3),
          ((1, 128, 129, 127), 32)]
for (shape, G), dtype, layout, act in itertools.product(shapes, TOL, ("cf", "cl"), ("none", "silu")):
    if layout == "cl" and len(shape) == 2:
        continue
    for params in ("", "wb", "wbst"):
        case(shape, G, dtype, layout, params, act, misalign=False)
    case(shape, G, dtype, layout, "wbst", act, misalign=True)

# |mean| >> std (fp32): the pivot frame (x - K, K the group's first value) must keep fp32-level agreement with
# fp64; the plain fold A x + B would lose about eps * |mean| / std ~ 1e-2 here. Multi-chunk shapes included.
# Forward only: the backward takes the fp32 mean of the contract (mrel = mean - K), whose rounding
# (eps * |mean| ~ 6e-5 against std 0.01) costs it fp32-level agreement on the CPU kernel as well.
for (shape, G), layout, misalign in itertools.product(
        [((2, 320, 64, 64), 32), ((1, 32, 4099), 32), ((3, 20, 7, 9), 5), ((5, 3, 13, 11), 3)], ("cf", "cl"),
        (False, True)):
    case(shape, G, torch.float32, layout, "wbst", "silu", misalign, loc=1000.0, spread=0.01, backward=False)

# empty inputs: shapes and values as on the CPU
for shape in ((0, 8, 4, 4), (2, 8, 0, 4)):
    x = torch.randn(shape, device=dev)
    w = torch.randn(8, device=dev)
    sc = torch.randn(shape[0], 8, device=dev)
    y, m, r = torch.ops.fastdiff.group_norm(x, 4, w, w, sc, sc, 1e-5, "silu")
    gx, gw, gb, gs, gt = torch.ops.fastdiff.group_norm_backward(torch.randn_like(x), x, m, r, 4, w, w, sc, sc, "silu")
    ref = torch.ops.fastdiff.group_norm(x.cpu(), 4, w.cpu(), w.cpu(), sc.cpu(), sc.cpu(), 1e-5, "silu")
    if not (y.shape == x.shape and torch.equal(m.cpu(), ref[1]) and torch.equal(r.cpu(), ref[2])):
        fails.append(f"empty {shape}: forward differs from the CPU op")
    if not (gw.shape == (8,) and gs.shape == (shape[0], 8) and (gw == 0).all()):
        fails.append(f"empty {shape}: backward shapes/values")

if dev == "cuda":
    x = torch.randn(2, 64, 16, 16, device=dev).to(memory_format=torch.channels_last)
    w = torch.randn(64, device=dev)
    sc = torch.randn(2, 64, device=dev)
    try:
        torch.library.opcheck(torch.ops.fastdiff.group_norm.default, (x, 32, w, w, sc, sc, 1e-5, "silu"))
        y, m, r = torch.ops.fastdiff.group_norm(x, 32, w, w, sc, sc, 1e-5, "silu")
        torch.library.opcheck(torch.ops.fastdiff.group_norm_backward.default,
                              (torch.randn_like(x), x, m, r, 32, w, w, sc, sc, "silu"))
    except Exception as e:  # noqa: BLE001
        fails.append(f"opcheck: {type(e).__name__}: {e}")
    # CUDA graph capture: same result as eager
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.fastdiff.group_norm(x, 32, w, w, sc, sc, 1e-5, "silu")
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        yg, mg, rg = torch.ops.fastdiff.group_norm(x, 32, w, w, sc, sc, 1e-5, "silu")
    g.replay()
    torch.cuda.synchronize()
    ye = torch.ops.fastdiff.group_norm(x, 32, w, w, sc, sc, 1e-5, "silu")[0]
    if not torch.equal(yg, ye):
        fails.append("CUDA graph replay differs from eager")

print("\n".join(fails[:60]))
print(f"{len(fails)} failures" if fails else "all GPU checks passed" if dev == "cuda" else "all CPU checks passed")
