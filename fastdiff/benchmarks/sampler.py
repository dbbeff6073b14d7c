"""Benchmark of the fused sampler step, and of a 50-step sampling loop with and without CUDA graphs.

Per-step update (op "sampler_step") on SD latents (4, 4, 64, 64), SDXL-like latents (8, 4, 96, 96) and pixels
(16, 3, 256, 256), two steps with classifier-free guidance (cond and uncond model outputs):
  ddim-cfg:  deterministic DDIM (eta = 0), the common DDIM step
  ddpm-cfg:  ancestral DDPM with x0 clipping: Gaussian noise drawn every step (in the kernel, by Philox)
  dpmpp-cfg: DPM-Solver++ 2M at a second-order step (reads and rewrites the previous x0)
  flow-cfg:  flow-matching Euler (SD3 / Flux: x + (sigma_next - sigma) v, shift 3) on the guided velocity
  unipc-cfg: UniPC bh2 (corrector + predictor, both second order) on flow-matching sigmas (Wan 2.x: flow_shift 3,
             flow_prediction): reads the x0 of the two steps before and rotates them
Providers: eager (the step as a user writes it in PyTorch, Python-float coefficients, torch.randn_like),
diffusers (the matching scheduler's step after the CFG combination, when installed),
compile (torch.compile of the eager step), and fastdiff-cuda / fastdiff-triton / fastdiff-cpu / fastdiff-torch.
GB/s counts the bytes a fused step must move: x, cond, uncond read and x_prev written (+ x0_prev read and
written for DPM-Solver++; + x0_prev, x0_prev2 read and x0, x0_prev written for UniPC); the noise is generated, not
read.

Loop (op "sampling"): 50 steps of DDIM around a tiny conv model on (4, 4, 64, 64): time per step, eager and (on a
GPU) CUDA-graphed.

Usage: python benchmarks/bench_sampler.py [--quick] [--device cpu|cuda] [--no-compile] [--out PATH]
   or: fastdiff bench --op sampler_step [--quick] [--no-compile]
Writes benchmarks/results/<device-slug>/sampler_step.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from fastdiff import _bench
from fastdiff.diffusion import (DDIMSampler, DDPMSampler, DPMSolverPPSampler, FlowMatchEulerSampler, UniPCSampler,
                                sample)
from fastdiff.ops.sampler_step import _available

SHAPES = [(4, 4, 64, 64), (8, 4, 96, 96), (16, 3, 256, 256)]


GUIDANCE = 7.5


def _case(shape):
    return "x".join(str(s) for s in shape)


def _ddim_coefs(sampler, i):
    """The Python floats a user's eager DDIM step (eta = 0) would compute."""
    acp = sampler.schedule.alphas_cumprod.double()
    T, n = sampler.schedule.num_train_timesteps, sampler.num_inference_steps
    t = int(sampler.timesteps[i])
    a, ap = acp[t].item(), (acp[t - T // n].item() if t - T // n >= 0 else 1.0)
    return a, ap


def eager_ddim(a, ap):
    sa, s1a, sap, s1ap = math.sqrt(a), math.sqrt(1 - a), math.sqrt(ap), math.sqrt(1 - ap)

    def step(x, cond, uncond):
        eps = uncond + GUIDANCE * (cond - uncond)
        x0 = (x - s1a * eps) / sa
        return sap * x0 + s1ap * eps

    return step


def eager_ddpm(sampler, i):
    """Ancestral DDPM with clipping, as a user writes it."""
    acp = sampler.schedule.alphas_cumprod.double()
    t, tp = int(sampler.timesteps[i]), int(sampler.timesteps[i + 1])
    a, ap = acp[t].item(), acp[tp].item()
    beta = 1 - a / ap
    c0, c1 = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
    std = math.sqrt(beta * (1 - ap) / (1 - a))
    sa, s1a = math.sqrt(a), math.sqrt(1 - a)

    def step(x, cond, uncond):
        eps = uncond + GUIDANCE * (cond - uncond)
        x0 = ((x - s1a * eps) / sa).clamp(-1, 1)
        return c0 * x0 + c1 * x + std * torch.randn_like(x)

    return step


def eager_dpmpp(sampler, i):
    """DPM-Solver++ 2M (midpoint) at a second-order step, as a user writes it."""
    sig = sampler.sigmas
    al = [1 / math.sqrt(s * s + 1) for s in sig[i - 1: i + 2]]
    sv = [s * a for s, a in zip(sig[i - 1: i + 2], al)]
    lam = [math.log(a) - math.log(s) for a, s in zip(al, sv)]
    h, h0 = lam[2] - lam[1], lam[1] - lam[0]
    r0 = h0 / h
    phi = math.expm1(-h)
    a_s, s_s, a_t, s_t = al[1], sv[1], al[2], sv[2]

    def step(x, cond, uncond, x0_prev):
        eps = uncond + GUIDANCE * (cond - uncond)
        x0 = (x - s_s * eps) / a_s
        d1 = (x0 - x0_prev) / r0
        out = (s_t / s_s) * x - a_t * phi * x0 - 0.5 * a_t * phi * d1
        return out, x0

    return step


def eager_unipc(sampler, i):
    """UniPC's step i (UniC corrector, then UniP predictor) on a flow-matching model, as a user writes it: the
    coefficients as Python floats (taken from the sampler's own table), the tensors as PyTorch ops."""
    row = sampler._table_np[i]
    s = float(sampler._sigmas_np[i])
    A, C, D, E = (float(row[k]) for k in (2, 4, 5, 9))
    # split back into the corrector (x_c = x + k0 x0 + k1 p1 + k2 p2) and the predictor (A x_c + P0 x0 + P1 p1):
    # any split with these totals does the same work; this one sets the predictor's own terms to zero
    k0, k1, k2 = C / A, D / A, E / A

    def step(x, cond, uncond, p1, p2):
        v = uncond + GUIDANCE * (cond - uncond)
        x0 = x - s * v
        xc = x + k0 * x0 + k1 * p1 + k2 * p2
        return A * xc, x0

    return step


def _record(rows, label, fns, shape, dtype, device, rounds, timing_kw, *, nbytes):
    """Time every provider in fns for one (step kind, shape, dtype) and append a row each (and print it)."""
    for name, t_ in _bench.time_providers(fns, device, rounds, **timing_kw).items():
        rows.append(_bench.make_row(op="sampler_step", case=f"{label} {_case(shape)}", shape=shape, dtype=dtype,
                                    layout="nchw", provider=name, timing=t_, device=device, nbytes=nbytes))
        print(f"  {label:<9} {_case(shape):>14} {str(dtype):>15} {name:>16} {t_['median_ms']:9.4f} ms", flush=True)


def bench_step(args, device, rows):
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    shapes = args.shapes or (SHAPES[:2] if args.quick and device.type == "cpu" else SHAPES)
    timing_kw = dict(flush_l2=device.type == "cuda", min_time_s=0.05 if args.quick else 0.2)
    rounds = 1 if device.type == "cuda" or args.quick else 3
    # compile: dynamic=False, one graph specialised to each (shape, dtype) as a fixed-shape sampler gets (by
    # default Dynamo recompiles the second shape of a step function with dynamic sizes, and later shapes timed
    # that); the limit raised so the 3 shapes x 3 dtypes of a GPU run stay compiled (past it: eager code)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    try:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    except ImportError:
        DDIMScheduler = DPMSolverMultistepScheduler = None
    ddim = DDIMSampler(clip_sample=False).set_timesteps(50, device=device, seed=0)
    ddpm = DDPMSampler().set_timesteps(50, device=device, seed=0)
    dpm = DPMSolverPPSampler().set_timesteps(20, device=device, seed=0)
    flow = FlowMatchEulerSampler(shift=3.0).set_timesteps(28, device=device, seed=0)
    unipc_cfg = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
    unipc = UniPCSampler(**unipc_cfg).set_timesteps(30, device=device, seed=0)
    i_ddim, i_dpm = 10, 5
    for shape in shapes:
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            x, c, u, p, p2 = (torch.randn(shape, device=device, dtype=dtype, generator=g) for _ in range(5))
            numel, size = x.numel(), x.element_size()
            avail = _available(x)
            backends = [b for b in ("cuda", "triton", "cpu") if avail[b][0]] + ["torch"]

            # ddim-cfg ---------------------------------------------------------------------------------------------
            fns = {"eager": lambda f=eager_ddim(*_ddim_coefs(ddim, i_ddim)): f(x, c, u)}
            if DDIMScheduler is not None:
                ds = DDIMScheduler(clip_sample=False)
                ds.set_timesteps(50, device=device)
                t = ds.timesteps[i_ddim]

                def diff_ddim(ds=ds, t=t):
                    return ds.step(u + GUIDANCE * (c - u), t, x).prev_sample

                fns["diffusers"] = diff_ddim
            if not args.no_compile:
                cf = torch.compile(eager_ddim(*_ddim_coefs(ddim, i_ddim)), dynamic=False)
                fns["compile"] = lambda cf=cf: cf(x, c, u)
            for b in backends:
                fns[f"fastdiff-{b}"] = lambda b=b: ddim.step(c, i_ddim, x, uncond=u, guidance_scale=GUIDANCE, backend=b)
            _record(rows, "ddim-cfg", fns, shape, dtype, device, rounds, timing_kw, nbytes=4 * numel * size)

            # ddpm-cfg ---------------------------------------------------------------------------------------------
            ef = eager_ddpm(ddpm, i_ddim)
            fns = {"eager": lambda: ef(x, c, u)}
            try:
                from diffusers import DDPMScheduler
            except ImportError:
                DDPMScheduler = None
            if DDPMScheduler is not None:
                dp = DDPMScheduler()
                dp.set_timesteps(50, device=device)
                t = dp.timesteps[i_ddim]
                fns["diffusers"] = lambda dp=dp, t=t: dp.step(u + GUIDANCE * (c - u), t, x, generator=g).prev_sample
            if not args.no_compile:
                cf3 = torch.compile(ef, dynamic=False)
                fns["compile"] = lambda cf3=cf3: cf3(x, c, u)
            for b in (b for b in backends if b != "torch"):  # the reference's int64 Philox is far off the pace
                fns[f"fastdiff-{b}"] = lambda b=b: ddpm.step(c, i_ddim, x, uncond=u, guidance_scale=GUIDANCE, backend=b)
            _record(rows, "ddpm-cfg", fns, shape, dtype, device, rounds, timing_kw, nbytes=4 * numel * size)

            # dpmpp-cfg --------------------------------------------------------------------------------------------
            ef = eager_dpmpp(dpm, i_dpm)
            fns = {"eager": lambda: ef(x, c, u, p)}
            if DPMSolverMultistepScheduler is not None:
                dd = DPMSolverMultistepScheduler()
                dd.set_timesteps(20, device=device)
                t = dd.timesteps[i_dpm]

                def diff_dpm(dd=dd, t=t):
                    dd._step_index, dd.lower_order_nums = i_dpm, 2
                    dd.model_outputs = [p, p]
                    return dd.step(u + GUIDANCE * (c - u), t, x).prev_sample

                fns["diffusers"] = diff_dpm
            if not args.no_compile:
                cf2 = torch.compile(ef, dynamic=False)
                fns["compile"] = lambda cf2=cf2: cf2(x, c, u, p)
            dpm._x0_buf, dpm._x0_key = p.clone(), (x.shape, x.dtype, x.device, x.stride())  # x0_prev = p
            for b in backends:
                fns[f"fastdiff-{b}"] = lambda b=b: dpm.step(c, i_dpm, x, uncond=u, guidance_scale=GUIDANCE, backend=b)
            _record(rows, "dpmpp-cfg", fns, shape, dtype, device, rounds, timing_kw, nbytes=6 * numel * size)

            # flow-cfg ---------------------------------------------------------------------------------------------
            dt = float(flow.sigmas[i_dpm + 1] - flow.sigmas[i_dpm])

            def eager_flow(x, c, u, dt=dt):
                return x + dt * (u + GUIDANCE * (c - u))

            fns = {"eager": lambda: eager_flow(x, c, u)}
            try:
                from diffusers import FlowMatchEulerDiscreteScheduler
            except ImportError:
                FlowMatchEulerDiscreteScheduler = None
            if FlowMatchEulerDiscreteScheduler is not None:
                fm = FlowMatchEulerDiscreteScheduler(shift=3.0)
                fm.set_timesteps(28, device=device)
                t = fm.timesteps[i_dpm]

                def diff_flow(fm=fm, t=t):
                    fm._step_index = i_dpm
                    return fm.step(u + GUIDANCE * (c - u), t, x).prev_sample

                fns["diffusers"] = diff_flow
            if not args.no_compile:
                cf4 = torch.compile(eager_flow, dynamic=False)
                fns["compile"] = lambda cf4=cf4: cf4(x, c, u)
            for b in backends:
                fns[f"fastdiff-{b}"] = lambda b=b: flow.step(c, i_dpm, x, uncond=u, guidance_scale=GUIDANCE, backend=b)
            _record(rows, "flow-cfg", fns, shape, dtype, device, rounds, timing_kw, nbytes=4 * numel * size)

            # unipc-cfg --------------------------------------------------------------------------------------------
            ef5 = eager_unipc(unipc, i_dpm)
            fns = {"eager": lambda: ef5(x, c, u, p, p2)}
            try:
                from diffusers import UniPCMultistepScheduler
            except ImportError:
                UniPCMultistepScheduler = None
            if UniPCMultistepScheduler is not None:
                us = UniPCMultistepScheduler(**unipc_cfg)
                us.set_timesteps(30, device=device)
                t = us.timesteps[i_dpm]

                def diff_unipc(us=us, t=t):
                    us._step_index, us.lower_order_nums, us.this_order = i_dpm, 2, 2
                    us.model_outputs, us.timestep_list, us.last_sample = [p2, p], [t, t], x
                    return us.step(u + GUIDANCE * (c - u), t, x).prev_sample

                fns["diffusers"] = diff_unipc
            if not args.no_compile:
                cf5 = torch.compile(ef5, dynamic=False)
                fns["compile"] = lambda cf5=cf5: cf5(x, c, u, p, p2)
            unipc._x0_buf, unipc._x0_buf2 = p.clone(), p2.clone()  # x0 of the two steps before
            unipc._x0_key = (x.shape, x.dtype, x.device, x.stride())
            for b in backends:
                fns[f"fastdiff-{b}"] = lambda b=b: unipc.step(c, i_dpm, x, uncond=u, guidance_scale=GUIDANCE,
                                                              backend=b)
            _record(rows, "unipc-cfg", fns, shape, dtype, device, rounds, timing_kw, nbytes=8 * numel * size)


class TinyModel(torch.nn.Module):
    """Two 3x3 convolutions and a timestep embedding: small, so the loop's per-step overhead shows."""

    def __init__(self, c=4, hidden=32):
        super().__init__()
        self.c1 = torch.nn.Conv2d(c, hidden, 3, padding=1)
        self.c2 = torch.nn.Conv2d(hidden, c, 3, padding=1)
        self.t = torch.nn.Linear(1, hidden)

    def forward(self, x, t):
        h = self.c1(x) + self.t(t.float().reshape(-1, 1) / 1000)[:, :, None, None]
        return self.c2(torch.nn.functional.silu(h))


def bench_loop(args, device, rows):
    steps = args.loop_steps
    shape = args.loop_shape
    model = TinyModel().to(device).eval()
    s = DDIMSampler(eta=1.0, clip_sample=False)
    modes = [("fastdiff-eager", False)] + ([("fastdiff-cudagraph", True)] if device.type == "cuda" else [])
    reps = 2 if args.quick else 5
    for name, graph in modes:
        def run(graph=graph):
            sample(model, s, shape, seed=0, num_inference_steps=steps, cuda_graph=graph, progress=False,
                   device=device)

        t_ = _bench.time_fn(run, device, warmup=1, reps=reps)
        per = {k: v / steps for k, v in t_.items() if k.endswith("_ms")}
        rows.append(_bench.make_row(op="sampling", case=f"ddim {steps} steps tiny-model {_case(shape)}", shape=shape,
                                    dtype=torch.float32, layout="nchw", provider=name, timing=per, device=device,
                                    extra={"unit": "ms per step", "steps": steps}))
        print(f"  loop {name:>20} {per['median_ms']:9.4f} ms/step", flush=True)
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        return
    ds = DDIMScheduler(clip_sample=False)

    def run_diffusers():
        ds.set_timesteps(steps, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, device=device, generator=g)
        with torch.no_grad():
            for t in ds.timesteps:
                x = ds.step(model(x, t.expand(shape[0])), t, x, eta=1.0, generator=g).prev_sample

    t_ = _bench.time_fn(run_diffusers, device, warmup=1, reps=reps)
    per = {k: v / steps for k, v in t_.items() if k.endswith("_ms")}
    rows.append(_bench.make_row(op="sampling", case=f"ddim {steps} steps tiny-model {_case(shape)}", shape=shape,
                                dtype=torch.float32, layout="nchw", provider="diffusers", timing=per, device=device,
                                extra={"unit": "ms per step", "steps": steps}))
    print(f"  loop {'diffusers':>20} {per['median_ms']:9.4f} ms/step", flush=True)


def run(device="auto", quick=False, compile_=True, out=None, verbose=True, shapes=None, loop_steps=50,
        loop_shape=(4, 4, 64, 64)):
    """The sampler benchmark as `fastdiff bench` and benchmarks/run_all.py call it: returns (rows, out_path).

    shapes / loop_steps / loop_shape replace the defaults (the tests pass tiny ones). out: the JSON path (None: the
    default under benchmarks/results/<device-slug>/; '' writes nothing).
    """
    import contextlib
    import io

    device = _bench.resolve_device(device)
    args = argparse.Namespace(quick=quick, no_compile=not compile_, shapes=shapes, loop_steps=loop_steps,
                              loop_shape=tuple(loop_shape))
    rows = []
    with contextlib.redirect_stdout(sys.stdout if verbose else io.StringIO()):
        print(f"device: {_bench.device_name(device)}; peak bandwidth "
              f"{_bench.peak_bandwidth_gbps(str(device)):.1f} GB/s")
        bench_step(args, device, rows)
        bench_loop(args, device, rows)
    if out is None:
        out = os.path.join(_bench.results_dir(device), "sampler_step.json")
    if out:
        _bench.write_rows(rows, out)
    return rows, out


def main(argv=None):
    return _bench.run_main(_main, argv)


def _main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a short run: fewer repetitions (and on the CPU, the two "
                                                         "latent shapes only)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/<device>/sampler_step.json)")
    args = ap.parse_args(argv)
    rows, out = run(args.device, args.quick, not args.no_compile, args.out)
    print(_bench.format_table(rows))
    if out:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
