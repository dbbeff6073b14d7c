"""Benchmark fastdiff.ops.attention against eager PyTorch and SDPA on Stable Diffusion 1.5 and ADM shapes.

    python benchmarks/bench_attention.py            # the GPU: every shape, fp16 and bf16
    python benchmarks/bench_attention.py --quick    # a short CPU run (eager, sdpa, fastdiff-cpu; small shapes)
    fastdiff bench --op attention [--quick] [--no-compile]   # the same through run() below

Providers: ``eager`` (fastdiff.reference.attention: the materialised softmax in the input dtype), ``compile``
(torch.compile of it, with --compile), ``sdpa`` (F.scaled_dot_product_attention's default choice) and
``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` (each of its backends that runs the case),
``fastdiff-triton``, ``fastdiff-cuda`` and, on the CPU, ``fastdiff-cpu``.

FLOPs are counted on the real head dim, 4·B·H·Sq·Skv·D for the forward, so a kernel that pads 40 to 64 does not
get credit for the padding. Cross-attention (Skv ≤ 128) is memory-bound: its rows report GB/s over the bytes of
q, k, v and out and % of the measured copy bandwidth (with TFLOP/s as an extra key), timed with L2 flushed.
Every row has ``peak_mem_mb``: the peak allocated during one call above what was allocated before it (GPU only).
Writes benchmarks/results/<device-slug>/attention.json and prints markdown tables (vs eager, vs sdpa).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import _bench, reference

attn_mod = sys.modules["fastdiff.ops.attention"]  # the module; fastdiff.ops.attention is the function

# (B, H, Sq, Skv, D, label)
SD15 = [(2, 8, 4096, 4096, 40, "sd15"), (2, 8, 4096, 77, 40, "sd15-cross"),
        (2, 8, 1024, 1024, 80, "sd15"), (2, 8, 1024, 77, 80, "sd15-cross"),
        (2, 8, 256, 256, 160, "sd15"), (2, 8, 256, 77, 160, "sd15-cross")]
ADM = [(2, 8, 1024, 1024, 64, "adm"), (2, 16, 256, 256, 64, "adm"), (2, 16, 64, 64, 64, "adm")]
LONG = [(2, 8, s, s, d, "long") for d in (64, 128) for s in (4096, 8192, 16384)]
QUICK = [(1, 8, 1024, 1024, 40, "sd15/4"), (1, 8, 1024, 77, 40, "sd15/4-cross"),
         (1, 8, 256, 256, 80, "sd15/4"), (1, 8, 256, 77, 80, "sd15/4-cross"),
         (1, 8, 64, 64, 160, "sd15/4"), (1, 8, 64, 77, 160, "sd15/4-cross"),
         (1, 8, 256, 256, 64, "adm/4")]

EAGER_MAX_BYTES = 24 << 30  # skip the materialised softmax above this (fp32 scores + probabilities)


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    names = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
             "sdpa-cudnn": "CUDNN_ATTENTION"}
    out = {}
    for prov, attr in names.items():
        if hasattr(SDPBackend, attr):
            out[prov] = functools.partial(_with_kernel, sdpa_kernel, getattr(SDPBackend, attr))
    return out


def _with_kernel(sdpa_kernel, backend, q, k, v, scale):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def providers(device: torch.device, use_compile: bool) -> dict:
    p = {"eager": lambda q, k, v, s: reference.attention(q, k, v, s)}
    if use_compile:
        # dynamic=False: a graph specialised to each case, as a user compiling a fixed-shape model gets (by
        # default Dynamo recompiles the second shape it sees with dynamic sizes, and later cases timed that)
        p["compile"] = torch.compile(reference.attention, dynamic=False)
    p["sdpa"] = lambda q, k, v, s: F.scaled_dot_product_attention(q, k, v, scale=s)
    if device.type == "cuda":
        p.update(_sdpa_backends())
        if attn_mod._HAS_TRITON_OPS:
            p["fastdiff-triton"] = lambda q, k, v, s: fastdiff.ops.attention(q, k, v, scale=s, backend="triton")
        if attn_mod._HAS_CUDA_OP and fastdiff._backend.has_cuda_ext():
            p["fastdiff-cuda"] = lambda q, k, v, s: fastdiff.ops.attention(q, k, v, scale=s, backend="cuda")
    else:
        p["fastdiff-cpu"] = lambda q, k, v, s: fastdiff.ops.attention(q, k, v, scale=s, backend="cpu")
    return p


def _peak_mem_mb(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run_cases(cases, dtypes, device, use_compile=False, reps=None, verbose=True):
    rows = []
    # one static graph per (case, dtype): past the recompile limit (8) Dynamo would silently run eager code
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    provs = providers(device, use_compile)
    for B, H, Sq, Skv, D, label in cases:
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, generator=g) for S in (Sq, Skv, Skv))
            scale = D ** -0.5
            case = f"B{B} H{H} Sq{Sq} Skv{Skv} d{D}"
            flops = 4 * B * H * Sq * Skv * D
            cross = Skv <= 128
            nbytes = (2 * q.numel() + k.numel() + v.numel()) * q.element_size()
            for name, fn in provs.items():
                if name in ("eager", "compile") and B * H * Sq * Skv * 8 > EAGER_MAX_BYTES:
                    continue
                call = functools.partial(fn, q, k, v, scale)
                try:
                    call()
                except (RuntimeError, ValueError, TypeError) as e:  # an SDPA backend that cannot take the case
                    print(f"skip {name} {case} {dtype}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
                    continue
                timing = _bench.time_fn(call, device, flush_l2=cross, reps=reps)
                extra = {"peak_mem_mb": _peak_mem_mb(call, device), "label": label, "head_dim": D}
                if cross:
                    extra["tflops"] = flops / (timing["median_ms"] * 1e-3) / 1e12
                    row = _bench.make_row(op="attention", case=case, shape=(B, H, Sq, Skv, D), dtype=dtype,
                                          layout=None, provider=name, timing=timing, device=device, nbytes=nbytes,
                                          extra=extra)
                else:
                    row = _bench.make_row(op="attention", case=case, shape=(B, H, Sq, Skv, D), dtype=dtype,
                                          layout=None, provider=name, timing=timing, device=device, flops=flops,
                                          extra=extra)
                rows.append(row)
                rate = f"{row['gbps']:.0f} GB/s" if "gbps" in row else f"{row['tflops']:.2f} TFLOP/s"
                if verbose:
                        print(f"{case:32s} {str(dtype)[6:]:9s} {name:16s} {timing['median_ms']:9.4f} ms  {rate}",
                          file=sys.stderr)
    return rows


def run(device="auto", dtypes=None, quick=False, compile_=True, out=None, verbose=True, only=None, cases=None,
        reps=None):
    """The attention benchmark as `fastdiff bench` and benchmarks/run_all.py call it: returns (rows, out_path).

    device: "auto" (a GPU when present), "cuda" or "cpu". compile_: True, False or "auto" (on, except in a CPU
    quick run). quick: on the CPU the QUICK shapes, timed with torch's current thread count
    (benchmarks/run_all.py --quick sets one); on a GPU every shape but the LONG ones. cases: (B, H, Sq, Skv,
    D, label) tuples that replace the default list (the tests pass tiny ones). out: the JSON path (None: the
    default under benchmarks/results/<device-slug>/; '' writes nothing).
    """
    device = _bench.resolve_device(device)
    cpu = device.type == "cpu"
    if dtypes is None:
        dtypes = [torch.float32, torch.bfloat16] if cpu else [torch.float16, torch.bfloat16]
    if cases is None:
        cases = QUICK if cpu else (SD15 + ADM if quick else SD15 + ADM + LONG)
    if only:
        cases = [c for c in cases if only in c[-1]]
    if compile_ == "auto":  # `fastdiff bench`: a CPU quick run skips the 14 recompiles of the reference
        compile_ = not (quick and cpu)
    if out is None:
        out = os.path.join(_bench.results_dir(device), "attention.json")
    rows = run_cases(cases, dtypes, device, use_compile=compile_,
                     reps=reps if reps is not None else (30 if cpu else None), verbose=verbose)
    if out:
        _bench.write_rows(rows, out)
    return rows, out


def main(argv=None):
    return _bench.run_main(_main, argv)


def _main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short CPU run: small shapes, eager/sdpa/fastdiff-cpu")
    ap.add_argument("--dtypes", default=None, help="comma-separated, e.g. float16,bfloat16")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    ap.add_argument("--only", default=None, help="run only cases whose label contains this (sd15, adm, long)")
    ap.add_argument("--out", default=None, help="output JSON path (default benchmarks/results/<device>/attention.json)")
    args = ap.parse_args(argv)

    # as this script always did: --quick is a CPU run, every shape (LONG included) on a GPU otherwise
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else None
    cases = None if device.type == "cpu" else SD15 + ADM + LONG
    rows, path = run(device, dtypes, quick=args.quick, compile_=args.compile, out=args.out, only=args.only,
                     cases=cases)
    print(_bench.format_table(rows, baseline="eager"))
    print()
    print(_bench.format_table(rows, baseline="sdpa"))
    if path:
        print(f"\nwrote {len(rows)} rows to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
