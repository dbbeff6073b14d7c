"""GroupNorm + AdaGN scale/shift + SiLU: eager, torch.compile and every fastdiff backend, on U-Net shapes.

Bytes counted per call: x, weight, bias, scale and shift read once and y written once (the floor for any
implementation; the fused kernels read x a second time for the statistics, from L2 where it fits). GB/s and
% of the measured peak bandwidth follow from that floor, so they compare providers fairly.

The forward rows also carry `copy_ms`, the median of `x.clone()` (read x, write a new tensor of its size: the
least any out-of-place kernel of this op does) timed in the same interleaved rounds, and `pct_copy` = 100 *
copy_ms / median_ms: how near a provider runs to that speed of light in the same cache regime. `pct_peak` is
against one large copy, which runs from DRAM; on a CPU whose caches hold these tensors it can pass 100%.

--backward times a training step instead (op "group_norm_fwd_bwd", file group_norm_fwd_bwd.json): the forward
and torch.autograd.grad for x, weight, bias, scale and shift; bytes counted: x read twice, y and grad_x written,
grad_y read; the four parameters read by the forward and again by the backward, and their gradients written.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import fastdiff
from fastdiff import _bench, reference
from fastdiff.ops.group_norm import _available

SD15 = [(2, c, hw) for c in (320, 640, 1280) for hw in (64, 32, 16, 8)]  # N, C, H=W; 32 groups
ADM64 = [(4, c, hw) for c, hw in ((192, 64), (384, 32), (576, 16), (768, 8))]  # ADM 64x64: 192 * (1, 2, 3, 4)
QUICK_CPU = [(2, 320, 64), (2, 640, 32), (2, 1280, 16), (2, 1280, 8)]
_COPY = "(copy)"  # the timing key of the same-size x.clone() reference: not a provider, no row of its own


def _eager(x, w, b, s, t):
    # what a user writes: F.group_norm, then the AdaGN multiply-add and the SiLU as separate ops
    return reference.group_norm(x, 32, w, b, scale=s, shift=t, activation="silu")


def providers(device: torch.device, dtype: torch.dtype, *, compile_: bool):
    probe = torch.empty(1, 32, 1, device=device, dtype=dtype)
    avail = _available(probe)
    out = [("eager", _eager)]
    if compile_:
        out.append(("compile", torch.compile(_eager, dynamic=False)))
    for name in ("cuda", "triton", "cpu"):
        if avail[name][0]:
            out.append((f"fastdiff-{name}", lambda x, w, b, s, t, _n=name: fastdiff.ops.group_norm(
                x, 32, w, b, scale=s, shift=t, activation="silu", backend=_n)))
    return out


def _nbytes(x, params, backward: bool) -> int:
    """The bytes a perfect kernel moves (see the module docstring): the parameters (C and N*C values each) are
    inputs too: 2-3% of the traffic on the U-Nets' 8x8 maps, more on smaller ones."""
    xb = x.numel() * x.element_size()
    pb = sum(p.numel() * p.element_size() for p in params)
    return 5 * xb + 3 * pb if backward else 2 * xb + pb


def _training_step(fn, x, w, b, s, t, gy):
    """fn's forward and the gradients of all five inputs for the output gradient gy, as an optimizer step needs."""
    leaves = [v.detach().requires_grad_(True) for v in (x, w, b, s, t)]

    def step():
        y = fn(*leaves)
        return torch.autograd.grad(y, leaves, gy)

    return step


def run(device="auto", dtypes=None, quick=False, compile_=True, layouts=("nchw", "nhwc"), out=None, verbose=True,
        shapes=None, backward=False):
    """Returns (rows, out_path). shapes: (model label, (N, C, HW)) pairs that replace the default list.
    backward: time forward + backward (op "group_norm_fwd_bwd") instead of the forward."""
    device = _bench.resolve_device(device)
    gpu = device.type == "cuda"
    shapes_arg = shapes
    if dtypes is None:
        dtypes = [torch.float16, torch.bfloat16] if gpu else [torch.float32]
    shapes = [("sd15", s) for s in SD15] + [("adm64", s) for s in ADM64]
    if quick and not gpu:
        shapes = [("sd15", s) for s in QUICK_CPU]
    shapes = shapes_arg if shapes_arg is not None else shapes
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    rows = []
    for dtype in dtypes:
        provs = providers(device, dtype, compile_=compile_)
        for model, (N, C, HW) in shapes:
            for layout in layouts:
                x = torch.randn(N, C, HW, HW, device=device, dtype=dtype)
                if layout == "nhwc":
                    x = x.to(memory_format=torch.channels_last)
                w = torch.randn(C, device=device, dtype=dtype)
                b = torch.randn(C, device=device, dtype=dtype)
                s = 0.1 * torch.randn(N, C, device=device, dtype=dtype)
                t = 0.1 * torch.randn(N, C, device=device, dtype=dtype)
                nbytes = _nbytes(x, (w, b, s, t), backward)
                case = f"{model} N{N} C{C} {HW}x{HW} G32 ada+silu"
                op = "group_norm_fwd_bwd" if backward else "group_norm"
                fns = {}
                if backward:
                    want, gy = None, torch.randn_like(x)
                    for name, fn in provs:
                        step = _training_step(fn, x, w, b, s, t, gy)
                        got = step()  # also the warm-up / compile
                        if want is None:
                            want = [g.float() for g in got]
                        err = max(((g.float() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()
                                  for g, r in zip(got, want))
                        if err > (1e-3 if dtype == torch.float32 else 0.1):
                            raise RuntimeError(f"{name} on {case} {layout}: gradient error {err:.3g} vs eager — "
                                               "not timing a wrong answer")
                        fns[name] = step
                else:
                    want = _eager(x.float(), w.float(), b.float(), s.float(), t.float())
                    for name, fn in provs:
                        got = fn(x, w, b, s, t)  # also the warm-up / compile
                        err = (got.float() - want).abs().max().item()
                        if err > (1e-3 if dtype == torch.float32 else 0.1):
                            raise RuntimeError(f"{name} on {case} {layout}: max error {err:.3g} — not timing a wrong "
                                               "answer")
                        fns[name] = (lambda fn=fn: fn(x, w, b, s, t))
                    fns[_COPY] = x.clone  # the speed-of-light reference (see the module docstring)
                # CPU: three interleaved rounds, each provider's best (a shared machine's load bursts hit all alike)
                timings = _bench.time_providers(fns, device, 1 if gpu or quick else 3, flush_l2=gpu,
                                                min_time_s=0.1 if quick else 0.3)
                copy = timings.pop(_COPY, None)
                for name, timing in timings.items():
                    extra = None if copy is None else {
                        "copy_ms": copy["median_ms"], "pct_copy": 100 * copy["median_ms"] / timing["median_ms"]}
                    row = _bench.make_row(op=op, case=case, shape=[N, C, HW, HW], dtype=dtype,
                                          layout=layout, provider=name, timing=timing, device=device, nbytes=nbytes,
                                          extra=extra)
                    rows.append(row)
                    if verbose:
                        vs_copy = f" {row['pct_copy']:5.0f}% of copy" if copy is not None else ""
                        print(f"  {case:38s} {layout} {row['dtype']:8s} {name:16s} {row['median_ms']:8.4f} ms "
                              f"{row['gbps']:7.1f} GB/s{vs_copy}", file=sys.stderr)
    if out is None:
        out = os.path.join(_bench.results_dir(device), "group_norm_fwd_bwd.json" if backward else "group_norm.json")
    if out:
        _bench.write_rows(rows, out)
    return rows, out


def main(argv=None):
    return _bench.run_main(_main, argv)


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"],
                   help="repeatable; default fp16+bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--quick", action="store_true", help="a short run (four SD shapes on the CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--layout", action="append", choices=["nchw", "nhwc"], help="repeatable; default both")
    p.add_argument("--backward", action="store_true",
                   help="time forward + backward (a training step) instead of the forward")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/group_norm.json); "
                   "'' to write nothing")
    a = p.parse_args(argv)
    dtypes = [getattr(torch, d) for d in a.dtype] if a.dtype else None
    rows, out = run(a.device, dtypes, a.quick, not a.no_compile, tuple(a.layout or ("nchw", "nhwc")), a.out,
                    backward=a.backward)
    print(_bench.format_table(rows))
    if out:
        print(f"\nwrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
