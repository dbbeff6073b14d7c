"""Benchmark of diffusers models patched with fastdiff.integrations.diffusers against the same models unpatched.

Cases (random weights, the configurations of Stable Diffusion 1.5):
  unet_step:  UNet2DConditionModel (320/640/1280/1280, 2 layers per block, 8 heads, cross-attention dim 768), one
              forward on latents (2, 4, 64, 64) (a classifier-free-guidance batch at 512x512) with a (2, 77, 768)
              text context.
  vae_decode: AutoencoderKL decoder (128/256/512/512, 2 layers per block), latents (1, 4, 64, 64) -> 512x512.
--quick: tiny configurations of both on (2, 4, 32, 32) / (1, 4, 16, 16) (for the CPU).
Providers: diffusers (unpatched, diffusers' AttnProcessor2_0 = SDPA, torch GroupNorm), fastdiff-<backend> (patched;
the backend the fused GroupNorm picks), and with --compile torch.compile of each (suffix "-compile").
The providers are timed in interleaved rounds (patch / unpatch the same model each round; each keeps its best
round), so a burst of load on a shared machine hits both alike.

Usage: python benchmarks/bench_diffusers.py [--quick] [--device cpu|cuda] [--dtype float16 bfloat16 float32]
       [--compile] [--rounds N] [--out PATH]
Writes benchmarks/results/<device-slug>/diffusers.json and prints a markdown table (speed-up vs diffusers).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdiff import _bench  # noqa: E402
from fastdiff.ops.group_norm import choose_backend  # noqa: E402

try:
    from diffusers import AutoencoderKL, UNet2DConditionModel
except ImportError:  # pragma: no cover
    sys.exit("bench_diffusers.py needs diffusers: pip install 'fastdiff[diffusers]'")

from fastdiff.integrations import diffusers as fdd  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), latent_channels=4,
                layers_per_block=2, norm_num_groups=32, sample_size=512)
TINY_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                layers_per_block=1, norm_num_groups=8)


def _cases(quick: bool, device, dtype):
    """(op, case name, model, fn(model) -> output, input shape)."""
    g = torch.Generator().manual_seed(0)
    if quick:
        ucfg, vcfg, x, lat, ctx_len, ctx_dim = TINY_UNET, TINY_VAE, (2, 4, 32, 32), (1, 4, 16, 16), 77, 32
    else:
        ucfg, vcfg, x, lat, ctx_len, ctx_dim = SD15_UNET, SD15_VAE, (2, 4, 64, 64), (1, 4, 64, 64), 77, 768
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**ucfg).to(device, dtype).eval()
    vae = AutoencoderKL(**vcfg).to(device, dtype).eval()
    xs = torch.randn(x, generator=g).to(device, dtype)
    ctx = torch.randn((x[0], ctx_len, ctx_dim), generator=g).to(device, dtype)
    t = torch.tensor([999, 999], device=device)[: x[0]]
    z = torch.randn(lat, generator=g).to(device, dtype)
    tag = "tiny" if quick else "sd15"
    return [
        ("unet_step", f"{tag}-unet B{x[0]} {x[2]}x{x[3]} ctx{ctx_len}x{ctx_dim}", unet,
         lambda m: m(xs, t, encoder_hidden_states=ctx, return_dict=False)[0], x),
        ("vae_decode", f"{tag}-vae-decoder B{lat[0]} {lat[2]}x{lat[3]}", vae,
         lambda m: m.decode(z, return_dict=False)[0], lat),
    ]


def _time_interleaved(model, fn, device, rounds, compile_too):
    """Best-of-rounds timings of the unpatched and the patched model (and their torch.compile)."""
    best = {}

    def keep(name, t):
        if name not in best or t["median_ms"] < best[name]["median_ms"]:
            best[name] = t

    compiled = {}
    for _ in range(rounds):
        for patched in (False, True):
            if patched:
                fdd.patch(model)
            name = "fastdiff" if patched else "diffusers"
            with torch.no_grad():
                keep(name, _bench.time_fn(lambda: fn(model), device, warmup=2, min_time_s=0.5))
                if compile_too:
                    if name not in compiled:
                        torch._dynamo.reset()
                        compiled[name] = torch.compile(model)
                    keep(name + "-compile", _bench.time_fn(lambda c=compiled[name]: fn(c), device, warmup=3,
                                                           min_time_s=0.5))
            if patched:
                fdd.unpatch(model)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny configurations (for the CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", default=None, help="default: float16 bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # One thread (as bench_attention.py): on a shared machine a parallel region waits for its slowest,
        # descheduled thread; one thread measures the layers, not the neighbours.
        torch.set_num_threads(1)
    dtypes = args.dtype or (["float16", "bfloat16"] if device.type == "cuda" else ["float32"])
    rows = []
    for dname in dtypes:
        dtype = getattr(torch, dname)
        for op, case, model, fn, shape in _cases(args.quick, device, dtype):
            n = fdd.patch(model)
            fdd.unpatch(model)
            backend = choose_backend(torch.empty(1, 8, 1, device=device, dtype=dtype))
            times = _time_interleaved(model, fn, device, args.rounds, args.compile)
            for name, t in times.items():
                provider = name.replace("fastdiff", f"fastdiff-{backend}")
                rows.append(_bench.make_row(op=op, case=case, shape=shape, dtype=dtype, layout="nchw",
                                            provider=provider, timing=t, device=device,
                                            extra={"patched_layers": n if name.startswith("fastdiff") else 0}))
            print(f"{case} {dname}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in times.items()),
                  flush=True)
            del model
    out = args.out or os.path.join(_bench.results_dir(device), "diffusers.json")
    _bench.write_rows(rows, out)
    print(_bench.format_table(rows, baseline="diffusers"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
