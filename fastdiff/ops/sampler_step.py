"""fastdiff.ops.sampler_step: one diffusion sampler step in one kernel, with no host sync.

    m   = uncond + guidance_scale * (model_output - uncond)     (classifier-free guidance, when uncond is given)
    x0  = clip(PX x + PM m)                                     (prediction type -> x0; clamp or dynamic threshold)
    out = A x + B m + C x0 + D x0_prev + E x0_prev2 + F x0_prev3 + std z     (the sampler's update)

The coefficients are row `step` of a (num_steps, 12) float32 `table` that a sampler builds once in
``set_timesteps`` (fastdiff.diffusion.samplers); `step` is a one-element int64 tensor on the device, read by the
kernel, so a loop over steps never synchronises with the host and can be captured in a CUDA graph. z is drawn in
the kernel by Philox4x32-10 from (seed, step, element index) unless `noise` is given; every backend draws the same
numbers (fastdiff.reference.philox_normal).

Backends: ``cuda`` (csrc/cuda/sampler_step.cu), ``triton`` (fastdiff/triton/sampler_step.py), ``cpu``
(csrc/cpu/sampler_step.cpp), ``torch`` (fastdiff.reference.sampler_step). The fused kernels have no backward: a
step whose inputs require grad (with grad mode on), or under a differentiating torch.func transform, runs the
reference, which is differentiable and draws the same noise.
"""
from __future__ import annotations

import numbers

import numpy as np

import torch

from fastdiff import _backend, reference
from fastdiff.ops._common import (KERNEL_DTYPES, autodiff_transform_active, check_tensor, choose_elementwise,
                                  elementwise_availability, needs_grad)

TABLE_WIDTH = reference.SAMPLER_TABLE_WIDTH
CLIP_MODES = {"none": 0, "clip": 1, "threshold": 2}
VAR_MODES = {"fixed": 0, "learned": 1, "learned_range": 2}


def _fake(x, model_output, uncond, guidance_scale, table, step, noise, x0_buf, var_values, thresh, seed, var_mode,
          clip_mode, clip_range, stochastic, x0_buf2=None, x0_buf3=None):
    return torch.empty_like(x)


if _backend.HAS_EXTENSION:
    torch.library.register_fake("fastdiff::sampler_step")(_fake)

_HAS_TRITON_OPS = False
if _backend.has_triton():
    try:
        from fastdiff.triton import sampler_step as _tss  # noqa: F401  (defines fastdiff::sampler_step_triton)

        _HAS_TRITON_OPS = True
    except ImportError:  # a Triton too old or broken: the other backends still work
        pass


def _available(x: torch.Tensor) -> dict:
    return elementwise_availability(x, _HAS_TRITON_OPS)


def choose_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """The backend sampler_step runs for this input: "auto" resolved to the fastest one present."""
    return choose_elementwise("sampler_step", backend, x, _HAS_TRITON_OPS)


def _dense_rows(x: torch.Tensor) -> bool:
    """Each sample is one dense block of memory, all samples laid out alike (contiguous or channels-last)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return True
    n = x.shape[0]
    if n != 1 and x.stride(0) * n != x.numel():
        return False
    expect = 1  # dense: the strides, sorted, are the running products of the sizes
    for d in sorted(range(1, x.dim()), key=lambda d: (x.stride(d), -d)):
        if x.shape[d] != 1 and x.stride(d) != expect:
            return False
        expect *= x.shape[d]
    return True


def _like_rows(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t itself when each of its samples is laid out like x's (any batch stride), else a copy laid out like x."""
    if t.stride() == x.stride() or all(t.shape[d] == 1 or t.stride(d) == x.stride(d) for d in range(1, x.dim())):
        return t
    return torch.empty_like(x).copy_(t)


def _check_same(t, name: str, x: torch.Tensor, *, inplace: bool = False):
    """t checked against x (shape, device, dtype: cast to x's) and laid out like x's rows (a copy if it is not).
    inplace: t is written by the kernel, so it is never copied or cast: a layout unlike x's, or
    samples that overlap in memory, raise instead."""
    if t is None:
        return None
    check_tensor(t, name, dtypes=None)
    if t.shape != x.shape:
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} (x's shape), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} (x's device), got {t.device}")
    if t.dtype != x.dtype:
        if inplace:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's dtype), got {t.dtype}")
        t = t.to(x.dtype)
    if inplace:
        per_sample = t[0].numel() if t.shape[0] else 0
        if not all(t.shape[d] == 1 or t.stride(d) == x.stride(d) for d in range(1, x.dim())) or (
                t.shape[0] > 1 and t.stride(0) < per_sample):
            raise ValueError(f"{name}: must be laid out like x, one sample after another without overlap (it is "
                             f"updated in place); got strides {t.stride()} for x's {x.stride()}")
        return t
    return _like_rows(t, x)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b touch a common byte of memory (same storage, overlapping extents)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def extent(t):
        lo = t.data_ptr()
        return lo, lo + (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


def step_tensor(step, device: torch.device) -> torch.Tensor:
    """`step` as the one-element int64 tensor on `device` that the kernels read. While a CUDA graph is being
    captured, only such a tensor can be used: anything else would need a copy from the host, which capture
    forbids (the samplers' CUDA-graph path passes precomputed step tensors)."""
    if isinstance(step, torch.Tensor):
        if step.dtype == torch.int64 and step.dim() == 0 and step.device == device:
            return step  # already what the kernels read (a sampler's precomputed step tensors)
    on_device = isinstance(step, torch.Tensor) and step.device == device
    if (device.type == "cuda" and not on_device and not torch.compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing()):
        got = (f"a {step.dtype} tensor on {step.device}" if isinstance(step, torch.Tensor)
               else f"a Python {type(step).__name__}")
        raise ValueError(f"step: while a CUDA graph is captured it must be a tensor on {device} (a copy from the "
                         f"host cannot be captured), got {got}")
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
            raise TypeError(f"step: expected an int or a one-element integer tensor, got {step.dtype} of shape "
                            f"{tuple(step.shape)}")
        return step.reshape(()).to(device=device, dtype=torch.int64, non_blocking=True)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step: expected an int or a one-element integer tensor, got {type(step).__name__}")
    return torch.tensor(int(step), dtype=torch.int64, device=device)


def _signed64(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    seed = int(seed) & ((1 << 64) - 1)
    return seed - (1 << 64) if seed >= 1 << 63 else seed  # the schema's int is int64; kernels read it as uint64


def sampler_step(x, model_output, table, step, *, uncond=None, guidance_scale=1.0, noise=None, x0_buf=None,
                 var_values=None, thresh=None, seed=0, var_mode="fixed", clip="none", clip_range=1.0,
                 stochastic=True, backend="auto", x0_buf2=None, x0_buf3=None):
    """One fused sampler step; returns x_prev (a new tensor shaped and laid out like x).

    x: (N, ...) float32/float16/bfloat16 (float64 on the torch backend). model_output, uncond, noise, var_values:
    x's shape and device (cast to x's dtype if needed). table: (num_steps, 12) float32 on x's device. step: an int
    or a one-element integer tensor (out-of-range steps are clamped). x0_buf: None, or a tensor like x that holds
    x0_prev and is overwritten with this step's x0 (multistep solvers). x0_buf2: None, or (with x0_buf) a second
    tensor like x that holds x0_prev2 (the table's column 9 weighs it: + E x0_prev2) and is overwritten with
    x0_prev (third-order solvers: DPM-Solver++ 3M, UniPC). x0_buf3: None, or (with x0_buf2) a third, x0_prev3
    (column 10, F), overwritten with x0_prev2 (PLMS). Where the table's column 11 (KEEP) is nonzero the buffers are
    read but not written. var_mode: "fixed", "learned" or
    "learned_range" (then var_values are the model's variance outputs). clip: "none", "clip" (clamp x0 to
    ±clip_range) or "threshold" (clamp(x0, -s, s) / s with thresh (N,) float32 per-sample s). stochastic: False
    skips the noise term. seed: the Philox key. backend: "auto", "cuda", "triton", "cpu" or "torch".
    """
    check_tensor(x, "x")
    if x.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"x: expected float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x: expected a non-empty (N, ...) tensor, got shape {tuple(x.shape)}")
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"table: expected a torch.Tensor, got {type(table).__name__}")
    if table.dim() != 2 or table.shape[1] != TABLE_WIDTH or table.shape[0] == 0:
        raise ValueError(f"table: expected shape (num_steps, {TABLE_WIDTH}), got {tuple(table.shape)}")
    if table.dtype != torch.float32:
        raise TypeError(f"table: expected float32, got {table.dtype}")
    if table.device != x.device:
        raise ValueError(f"table: expected a tensor on {x.device} (x's device), got {table.device}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise TypeError(f"guidance_scale: expected a float, got {type(guidance_scale).__name__}")
    if not -float("inf") < guidance_scale < float("inf"):
        raise ValueError(f"guidance_scale: expected a finite float, got {guidance_scale!r}")
    if uncond is None and guidance_scale != 1.0:  # would be ignored: m = model_output
        raise ValueError("uncond: classifier-free guidance (guidance_scale != 1) needs the unconditional output")
    if clip not in CLIP_MODES:
        raise ValueError(f"clip: expected one of {', '.join(CLIP_MODES)}, got {clip!r}")
    if var_mode not in VAR_MODES:
        raise ValueError(f"var_mode: expected one of {', '.join(VAR_MODES)}, got {var_mode!r}")
    if isinstance(clip_range, bool) or not isinstance(clip_range, numbers.Real):
        raise TypeError(f"clip_range: expected a float, got {type(clip_range).__name__}")
    if not clip_range > 0:
        raise ValueError(f"clip_range: expected a positive float, got {clip_range!r}")
    if not isinstance(stochastic, (bool, np.bool_)):  # a tensor or a string was taken as truthy
        raise TypeError(f"stochastic: expected a bool, got {type(stochastic).__name__}")
    seed = _signed64(seed)
    step = step_tensor(step, x.device)
    if not _dense_rows(x):
        x = x.contiguous()
    model_output = _check_same(model_output, "model_output", x)
    uncond = _check_same(uncond, "uncond", x)
    noise = _check_same(noise, "noise", x)
    var_values = _check_same(var_values, "var_values", x)
    x0_buf = _check_same(x0_buf, "x0_buf", x, inplace=True)
    x0_buf2 = _check_same(x0_buf2, "x0_buf2", x, inplace=True)
    x0_buf3 = _check_same(x0_buf3, "x0_buf3", x, inplace=True)
    for name, buf, before, before_name in (("x0_buf2", x0_buf2, x0_buf, "x0_buf"),
                                           ("x0_buf3", x0_buf3, x0_buf2, "x0_buf2")):
        if buf is not None and before is None:
            raise ValueError(f"{name}: given without {before_name} (it holds the x0 before the one in {before_name})")
    if not torch.compiler.is_compiling():  # (storage pointers: checked in eager only; the C++ op checks too)
        inputs = (("x", x), ("model_output", model_output), ("uncond", uncond), ("noise", noise),
                  ("var_values", var_values))
        for name, buf, others in (("x0_buf", x0_buf, inputs),
                                  ("x0_buf2", x0_buf2, (("x0_buf", x0_buf),) + inputs),
                                  ("x0_buf3", x0_buf3, (("x0_buf", x0_buf), ("x0_buf2", x0_buf2)) + inputs)):
            for oname, other in others:
                if buf is not None and other is not None and _overlaps(buf, other):
                    raise ValueError(f"{name}: shares memory with {oname} (the kernel writes {name} in place)")
    if var_mode != "fixed" and var_values is None:
        raise ValueError(f"var_values: required when var_mode is {var_mode!r}")
    if clip == "threshold":
        if thresh is None:
            raise ValueError("thresh: required when clip is 'threshold'")
        check_tensor(thresh, "thresh", dtypes=None)
        if thresh.numel() != x.shape[0] or thresh.device != x.device:
            raise ValueError(f"thresh: expected {x.shape[0]} values on {x.device}, got shape {tuple(thresh.shape)} "
                             f"on {thresh.device}")
        thresh = thresh.reshape(-1).to(torch.float32).contiguous()
    else:
        thresh = None

    name = choose_backend(x, backend)
    if name != "torch" and (needs_grad(x, model_output, uncond, noise, var_values, thresh, x0_buf, x0_buf2, x0_buf3)
                            or autodiff_transform_active()):
        # the fused kernels have no backward: a step that is differentiated (reward fine-tuning through the
        # sampling loop, gradients of the output with respect to the noise) runs the reference, which has every
        # derivative and draws the same Philox noise
        name = "torch"
    args = (x, model_output, uncond, float(guidance_scale), table.contiguous(), step, noise, x0_buf, var_values,
            thresh, seed, VAR_MODES[var_mode], CLIP_MODES[clip], float(clip_range), bool(stochastic), x0_buf2,
            x0_buf3)
    if name == "torch":
        return reference.sampler_step(x, model_output, table, step, uncond=uncond, guidance_scale=float(guidance_scale),
                                      noise=noise, x0_buf=x0_buf, var_values=var_values, thresh=thresh,
                                      seed=seed & ((1 << 64) - 1), var_mode=VAR_MODES[var_mode],
                                      clip_mode=CLIP_MODES[clip], clip_range=float(clip_range),
                                      stochastic=bool(stochastic), x0_buf2=x0_buf2, x0_buf3=x0_buf3,
                                      compute_dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    op = torch.ops.fastdiff.sampler_step_triton if name == "triton" else torch.ops.fastdiff.sampler_step
    return op(*args)
