"""End to end: one U-Net denoising step (op "unet_step") and a full DDIM sampling loop (op "sampling") for an
SD-1.5-sized latent U-Net and the ADM 64x64 class-conditional U-Net, against eager, torch.compile and diffusers.

Models (random weights; fastdiff.models.UNet, built only from fastdiff.nn):
  sd15-approx: 4x64x64 latents, model_channels 320, channel_mult (1, 2, 4, 4) = 320/640/1280/1280, 2 residual
      blocks per level, attention at the three highest-resolution levels (64, 32, 16) and in the middle block,
      8 heads (head dims 40/80/160), cross-attention to a 77x768 context, no scale-shift norm (as SD).
      NOT SD-1.5's exact block: fastdiff's UNet has ADM's attention block (GroupNorm, qkv, self-attention, proj)
      followed by an LDM-style cross-attention block (GroupNorm, cross-attention, GroupNorm, GELU feed-forward),
      where SD has a SpatialTransformer (GroupNorm, proj_in, LayerNorm+self-attn, LayerNorm+cross-attn,
      LayerNorm+GEGLU feed-forward, proj_out). Same widths, heads, levels and sequence lengths; somewhat fewer
      FLOPs (GELU FF 4C instead of GEGLU 8C, no proj_in/proj_out). The `diffusers` provider runs diffusers'
      UNet2DConditionModel with SD-1.5's exact configuration on the same case, so its row is the real SD-1.5.
  adm64: guided-diffusion's 64x64 ImageNet model: 3x64x64, model_channels 192, channel_mult (1, 2, 3, 4),
      3 residual blocks per level, attention at 32, 16, 8 with 64-channel heads, scale-shift norm, BigGAN
      up/down-sampling blocks, 1000 classes, learned variances (6 output channels).
  On the CPU in quick mode both shrink (model_channels 32, 16x16 inputs, batch 1 and 2, 5 steps):
  the `case` string names the shape actually run.

unet_step: one forward at batch N (no guidance): images/s = N / time.
sampling: `steps` DDIM steps (eta 0) from noise, sd15 with classifier-free guidance 7.5 (model batch 2N; the null
  context is zeros), adm64 class-conditional without guidance: images/s = N / loop time.

Providers: eager (the same UNet under fastdiff.set_backend("torch"): every fused op replaced by its eager
reference, the loop with the eager sampler step, no graphs), compile (torch.compile of the eager model,
mode="max-autotune-no-cudagraphs" on a GPU, the default mode on the CPU), compile-cudagraphs (mode="max-autotune",
GPU only), fastdiff (fused layers, the fused sampler step, and on a GPU the step captured in a CUDA graph:
fastdiff.sample's loop, and a graph of the forward for unet_step), diffusers (UNet2DConditionModel + DDIMScheduler,
sd15 only, when diffusers is importable).

FLOPs per step are counted once per model with torch.utils.flop_counter.FlopCounterMode over the eager model
(convolutions, linears and the attention matmuls; elementwise work is not counted; diffusers' SDPA calls are
counted on SDPA's math backend, i.e. as the same two matmuls), so `tflops` is the useful
work rate and `pct_peak` the MFU against the measured bf16 (GPU) / fp32 (CPU) matmul peak. Each row carries
`images_per_s`, `flops_per_image` (per step) and, for sampling, `steps`.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from fastdiff import _bench

GUIDANCE = 7.5
SD15_NOTE = ("fastdiff UNet with SD-1.5's widths/levels/heads/context; its attention is ADM self-attn + LDM-style "
             "cross-attn/GELU-FF, not SD's SpatialTransformer (proj_in, LN+self, LN+cross, LN+GEGLU, proj_out); "
             "the diffusers row is the exact SD-1.5 UNet2DConditionModel")


def model_specs(full: bool) -> dict:
    """name -> (fastdiff UNet kwargs, input (C, H, W), context (S, D) or None, num_classes or None, diffusers cfg)."""
    if full:
        sd = dict(image_size=64, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2,
                  attention_resolutions=(64, 32, 16), channel_mult=(1, 2, 4, 4), num_heads=8, context_dim=768,
                  use_scale_shift_norm=False)
        sd_diffusers = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
        adm = dict(image_size=64, in_channels=3, model_channels=192, out_channels=6, num_res_blocks=3,
                   attention_resolutions=(32, 16, 8), channel_mult=(1, 2, 3, 4), num_head_channels=64,
                   num_classes=1000, use_scale_shift_norm=True, resblock_updown=True)
        return {"sd15-approx": (sd, (4, 64, 64), (77, 768), None, sd_diffusers),
                "adm64": (adm, (3, 64, 64), None, 1000, None)}
    sd = dict(image_size=16, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2,
              attention_resolutions=(16, 8, 4), channel_mult=(1, 2, 4, 4), num_heads=4, context_dim=64,
              use_scale_shift_norm=False)
    sd_diffusers = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                        block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, attention_head_dim=4)
    adm = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=2,
               attention_resolutions=(8, 4, 2), channel_mult=(1, 2, 3, 4), num_head_channels=32,
               num_classes=10, use_scale_shift_norm=True, resblock_updown=True)
    return {"sd15-approx-tiny": (sd, (4, 16, 16), (77, 64), None, sd_diffusers),
            "adm64-tiny": (adm, (3, 16, 16), None, 10, None)}


def _randomise_zero_init(model):
    """fastdiff's UNet zero-initialises its output convs/projections (ADM's zero_module): a random-weights
    benchmark then computes an all-zero output. Same cost either way, but give them small random values so
    the outputs are non-trivial and the providers can be checked against each other."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return model


def count_flops(fn) -> int:
    """FLOPs of fn() (convolutions, matmuls), with scaled_dot_product_attention on its math backend during the
    count: FlopCounterMode has no formula for the CPU's fused SDPA kernel (it counted 0 for the attention of the
    diffusers U-Net, 13-16% of its FLOPs), while the math backend's two matmuls (4·B·H·Sq·Skv·D) are what the
    fastdiff/eager models' attention counts. Only this counting pass runs on the math backend, not the timing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _graphed(fn):
    """Capture fn() (static inputs) in a CUDA graph; return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def _compiled(model, device, mode):
    if device.type != "cuda":
        return torch.compile(model, dynamic=False)
    return torch.compile(model, mode=mode, dynamic=False)


def _mark_step(fn, cudagraphs):
    """mode="max-autotune" (CUDA-graph trees): mark each call a new step so outputs of the last replay may be
    overwritten once the sampler has consumed them."""
    if not cudagraphs:
        return fn

    def call(*a, **k):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*a, **k)

    return call


def _diffusers_unet(cfg, device, dtype):
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return None
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).to(device=device, dtype=dtype).eval()


def run(device="auto", dtypes=None, quick=False, compile_="auto", out=None, verbose=True, models=None, batches=None,
        steps=None, ops=("unet_step", "sampling"), diffusers=True, reps=None, specs=None):
    """Returns (rows, out_path); see _run. Timed with torch's current thread count (benchmarks/run_all.py --quick
    sets one thread unless --threads says otherwise: on a shared machine a parallel region waits for its
    slowest, descheduled thread)."""
    device = _bench.resolve_device(device)
    return _run(device, dtypes, quick, compile_, out, verbose, models, batches, steps, ops, diffusers, reps, specs)


def _run(device, dtypes, quick, compile_, out, verbose, models, batches, steps, ops, diffusers, reps, specs):
    """Returns (rows, out_path). models: names from model_specs() (default both); batches: batch sizes (default
    1, 4, 8 on a GPU, 1 and 2 on the CPU); steps: sampling steps (default 50, 5 in CPU quick mode).
    On the CPU the U-Nets are the tiny ones unless quick=False (the full-size models on a CPU take minutes per step).
    specs: a dict in model_specs()'s format that replaces the models (the tests pass a smaller one).
    compile_: the torch.compile providers: True, False, or "auto" (the default: on, except in a CPU quick run,
    where Inductor's compiles of even the tiny U-Nets take minutes on a small shared CPU).
    out: the JSON path (None: benchmarks/results/<device-slug>/<op>.json, unet_step.json and sampling.json, and the
    returned out_path names both; '' writes nothing). Rows are merged into an existing file (_bench.write_rows).
    """
    from fastdiff import set_backend
    from fastdiff.diffusion import DDIMSampler, sample
    from fastdiff.models import UNet

    gpu = device.type == "cuda"
    if dtypes is None:
        dtypes = [torch.float16, torch.bfloat16] if gpu else [torch.float32]
    full = gpu or not quick
    if compile_ == "auto":
        compile_ = full
    specs = specs if specs is not None else model_specs(full)
    if models is not None:
        specs = {k: v for k, v in specs.items() if any(k.startswith(m) for m in models)}
    batches = batches or ((1, 4, 8) if gpu else (1, 2))
    steps = steps or (50 if full else 5)
    step_reps = reps or (None if gpu else 5)
    loop_reps = reps or (3 if full else 2)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    rows = []

    def log(msg):
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    for name, (kw, (C, H, W), ctx_shape, ncls, dcfg) in specs.items():
        for dtype in dtypes:
            torch.manual_seed(0)
            model = _randomise_zero_init(UNet(**kw)).to(device=device, dtype=dtype).eval()
            dunet = _diffusers_unet(dcfg, device, dtype) if (diffusers and dcfg is not None) else None
            compiled = {}
            if compile_:
                compiled["compile"] = _compiled(model, device, "max-autotune-no-cudagraphs")
                if gpu:
                    compiled["compile-cudagraphs"] = _compiled(model, device, "max-autotune")
            for N in batches:
                g = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(N, C, H, W, device=device, dtype=dtype, generator=g)
                t = torch.full((N,), 500, device=device, dtype=torch.long)
                kwargs = {}
                if ctx_shape is not None:
                    kwargs["context"] = torch.randn(N, *ctx_shape, device=device, dtype=dtype, generator=g)
                if ncls is not None:
                    kwargs["y"] = torch.randint(0, ncls, (N,), device=device, generator=g)
                shape_str = f"{C}x{H}x{W}" + (f" ctx{ctx_shape[0]}x{ctx_shape[1]}" if ctx_shape else "") + (
                    f" {ncls} classes" if ncls else "")
                base_extra = {"model": name, "batch": N}
                if name.startswith("sd15"):
                    base_extra["model_note"] = SD15_NOTE
                with torch.no_grad(), set_backend("torch"):
                    flops_img = count_flops(lambda: model(x[:1], t[:1], **{k: v[:1] for k, v in kwargs.items()}))
                    want = model(x, t, **kwargs).float()
                dflops_img = None
                if dunet is not None:
                    with torch.no_grad():
                        dflops_img = count_flops(lambda: dunet(x[:1], t[:1],
                                                               encoder_hidden_states=kwargs["context"][:1]))

                # -- one denoising step ----------------------------------------------------------------------------
                if "unet_step" in ops:
                    case = f"{name} B{N} {shape_str}"
                    provs = [("eager", "torch", lambda: model(x, t, **kwargs))]
                    for pname, cm in compiled.items():
                        provs.append((pname, "torch", _mark_step(lambda cm=cm: cm(x, t, **kwargs),
                                                                 pname == "compile-cudagraphs")))
                    provs.append(("fastdiff", "auto", lambda: model(x, t, **kwargs)))
                    if dunet is not None:
                        provs.append(("diffusers", "auto",
                                      lambda: dunet(x, t, encoder_hidden_states=kwargs["context"]).sample))
                    for pname, backend, fn in provs:
                        with torch.no_grad(), set_backend(backend):
                            try:
                                got = fn()  # also the compile / warm-up
                            except Exception as e:  # noqa: BLE001 - one provider failing must not stop the suite
                                log(f"  skip {pname} {case} {dtype}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                                continue
                            if pname == "fastdiff" and gpu:
                                fn = _graphed(fn)
                            rel = None
                            if pname != "diffusers":  # a different network: nothing to compare with
                                got = got.float()
                                rel = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
                            timing = _bench.time_fn(fn, device, warmup=3, reps=step_reps,
                                                    min_time_s=0.5 if gpu else 0.2)
                        fl = dflops_img if pname == "diffusers" else flops_img
                        extra = dict(base_extra, images_per_s=N / (timing["median_ms"] * 1e-3),
                                     flops_per_image=fl, rel_err_vs_eager=rel)
                        row = _bench.make_row(op="unet_step", case=case, shape=(N, C, H, W), dtype=dtype,
                                              layout="nchw", provider=pname, timing=timing, device=device,
                                              flops=fl * N, extra=extra)
                        rows.append(row)
                        log(f"  unet_step {case:44s} {row['dtype']:8s} {pname:18s} {row['median_ms']:9.3f} ms "
                            f"{row['images_per_s']:8.2f} img/s  MFU {row['pct_peak']:.1f}%")

                # -- the sampling loop -----------------------------------------------------------------------------
                if "sampling" in ops:
                    cfg = ctx_shape is not None
                    case = f"{name} B{N} {shape_str} ddim{steps}" + (f" cfg{GUIDANCE}" if cfg else "") + (
                        " eps-of-learned-var" if kw["out_channels"] != C else "")
                    mult = 2 if cfg else 1  # classifier-free guidance: the model runs on 2N
                    skw = dict(num_inference_steps=steps, progress=False, device=device, dtype=dtype, seed=0)
                    if cfg:
                        skw.update(context=kwargs["context"], uncond_context=torch.zeros_like(kwargs["context"]),
                                   guidance_scale=GUIDANCE)
                    if ncls is not None:
                        skw["y"] = kwargs["y"]
                    sampler = DDIMSampler(clip_sample=False)
                    eps_only = kw["out_channels"] != C  # learned variances (ADM): DDIM uses the eps channels

                    def loop(m, backend, graph):
                        if eps_only:
                            m = _EpsChannels(m, C)
                        return sample(m, sampler, (N, C, H, W), cuda_graph=graph, backend=backend, **skw)

                    provs = [("eager", "torch", lambda: loop(model, "torch", False))]
                    for pname, cm in compiled.items():
                        provs.append((pname, "torch", lambda cm=cm, p=pname: loop(
                            _mark_step(cm, p == "compile-cudagraphs"), "torch", False)))
                    provs.append(("fastdiff", "auto", lambda: loop(model, "auto", "auto")))
                    if dunet is not None:
                        provs.append(("diffusers", "auto", lambda: _diffusers_loop(dunet, x, kwargs["context"], steps,
                                                                                   device, dtype)))
                    for pname, backend, fn in provs:
                        with torch.no_grad(), set_backend(backend):
                            try:
                                timing = _bench.time_fn(fn, device, warmup=1, reps=loop_reps)
                            except Exception as e:  # noqa: BLE001
                                log(f"  skip {pname} {case} {dtype}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                                continue
                        fl = (dflops_img if pname == "diffusers" else flops_img) * N * mult * steps
                        extra = dict(base_extra, images_per_s=N / (timing["median_ms"] * 1e-3), steps=steps,
                                     flops_per_image=fl // (N * mult * steps), guidance=GUIDANCE if cfg else None)
                        row = _bench.make_row(op="sampling", case=case, shape=(N, C, H, W), dtype=dtype,
                                              layout="nchw", provider=pname, timing=timing, device=device,
                                              flops=fl, extra=extra)
                        rows.append(row)
                        log(f"  sampling  {case:44s} {row['dtype']:8s} {pname:18s} {row['median_ms']:9.1f} ms "
                            f"{row['images_per_s']:8.3f} img/s  MFU {row['pct_peak']:.1f}%")
            model = dunet = compiled = None  # free before the next model (the lambdas above are done with them)
    if out is None:  # each op's rows in its own file, merged into what is there (the other op's rows stay)
        out = ", ".join(_bench.write_rows_by_op(rows, _bench.results_dir(device)))
    elif out:
        _bench.write_rows(rows, out)
    return rows, out


class _EpsChannels:
    """model(...)[:, :C]: the eps half of a learned-variance model's output (a view; DDIM ignores the variance)."""

    def __init__(self, model, channels):
        self.model, self.channels = model, channels

    def __call__(self, *a, **k):
        return self.model(*a, **k)[:, :self.channels]


def _diffusers_loop(unet, x_like, context, steps, device, dtype):
    """The loop a diffusers user writes (StableDiffusionPipeline's denoising loop without the VAE and the text
    encoder): DDIMScheduler, classifier-free guidance with a batched cond/uncond call."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(steps, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(x_like.shape, device=device, dtype=dtype, generator=g) * sched.init_noise_sigma
    ctx = torch.cat([context, torch.zeros_like(context)])
    for t in sched.timesteps:
        x_in = sched.scale_model_input(torch.cat([x, x]), t)
        out = unet(x_in, t, encoder_hidden_states=ctx).sample
        cond, unc = out.chunk(2)
        x = sched.step(unc + GUIDANCE * (cond - unc), t, x).prev_sample
    return x


def main(argv=None):
    return _bench.run_main(_main, argv)


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Writes benchmarks/results/<device>/unet_step.json and sampling.json, "
                                       "replacing only the rows it measures again.")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"],
                   help="repeatable; default fp16+bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--quick", action="store_true", help="on the CPU: tiny U-Nets, batch 1 and 2, 5 steps")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument("--model", action="append", choices=["sd15", "adm64"], help="repeatable; default both")
    p.add_argument("--batch", type=int, action="append", help="repeatable; default 1 4 8 (GPU), 1 2 (CPU)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; 5 in CPU quick mode)")
    p.add_argument("--only", choices=["unet_step", "sampling"], help="one of the two ops")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/<op>.json); '' none")
    a = p.parse_args(argv)
    dtypes = [getattr(torch, d) for d in a.dtype] if a.dtype else None
    rows, out = run(a.device, dtypes, a.quick, not a.no_compile, a.out, models=a.model, batches=a.batch,
                    steps=a.steps, ops=(a.only,) if a.only else ("unet_step", "sampling"))
    print(_bench.format_table(rows))
    if out:
        print(f"\nwrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
