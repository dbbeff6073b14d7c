"""Eager PyTorch definitions of every fastdiff op: the truth that tests and benchmarks use.

Written for clarity, one op a function, in the input's dtype by default (so a benchmark of these functions
measures "eager PyTorch as a user writes it"); ``compute_dtype=torch.float64`` gives the high-precision
reference that tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _bcast(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N, C) -> (N, C, 1, ...) for an (N, C, *spatial) input with `ndim` dims."""
    return t.reshape(t.shape + (1,) * (ndim - t.dim()))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, scale=None, shift=None, activation=None,
               compute_dtype=None):
    """y = act((GroupNorm(x) * weight + bias) * (1 + scale) + shift); scale/shift are (N, C), act None or "silu"."""
    out_dtype = x.dtype
    if compute_dtype is not None:
        x = x.to(compute_dtype)
        weight, bias, scale, shift = (None if t is None else t.to(compute_dtype) for t in (weight, bias, scale, shift))
    if x.numel() == 0 and x.shape[0] > 0:
        # no values to normalise (a 0-sized channel or spatial dim), which F.group_norm rejects: the empty result
        # the fused kernels give, still connected to x and the parameters for autograd
        h = x * 0
        if weight is not None:
            h = h * _bcast(weight.unsqueeze(0), x.dim())
        if bias is not None:
            h = h + _bcast(bias.unsqueeze(0), x.dim())
    else:
        h = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        h = h * (1 + _bcast(scale, x.dim()))
    if shift is not None:
        h = h + _bcast(shift, x.dim())
    if activation == "silu":
        h = F.silu(h)
    return h.to(out_dtype)


def attention(q, k, v, scale=None, *, compute_dtype=None):
    """softmax(q @ kᵀ · scale) @ v, with the Sq × Skv matrix materialised: what eager attention code writes.

    q: (B, H, Sq, D); k, v: (B, H, Skv, D); scale defaults to D ** -0.5. In the input dtype by default (so it
    measures "eager"); ``compute_dtype=torch.float32`` (or float64) gives the reference the tests compare to.
    """
    out_dtype = q.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0  # an empty head dim: the output is empty anyway
    if compute_dtype is not None:
        q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v).to(out_dtype)
# --- sampler_step -----------------------------------------------------------------------------------------------
# Columns of a sampler's per-step coefficient table (csrc/common/sampler_step.h): x0 = clip(PX x + PM m),
# x_prev = A x + B m + C x0 + D x0_prev + std z.
SAMPLER_COLS = ("px", "pm", "a", "b", "c", "d", "s", "min_log", "max_log")
SAMPLER_TABLE_WIDTH = 12

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and int64 b in [0, 2^32), without overflow."""
    p_lo = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (p_lo >> 16)
    return (mid >> 16) & _MASK32, (((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)) & _MASK32


def philox4x32_10(c0, c1, c2, c3, seed: int):
    """Philox4x32-10 on int64 tensors holding uint32 counters, keyed by a 64-bit seed."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


def philox_normal(seed: int, step, numel: int, device=None) -> torch.Tensor:
    """The fused step's noise: float32 normals for element indices 0 .. numel - 1 at `step` (an int or a one-element
    int64 tensor), as csrc/common/philox.h defines them (Philox4x32-10 on (q, step) with q = index // 4, Box-Muller)."""
    if isinstance(step, torch.Tensor):
        device = step.device if device is None else device
        step = step.reshape(()).to(device=device, dtype=torch.int64) & _MASK32
    ngroups = (numel + 3) // 4
    q = torch.arange(ngroups, device=device, dtype=torch.int64)
    zero = torch.zeros_like(q)
    r0, r1, r2, r3 = philox4x32_10(q & _MASK32, q >> 32, zero + step, zero, int(seed) & ((1 << 64) - 1))

    def uniform(r):
        return ((r >> 9).to(torch.float32) + 0.5) * 1.1920928955078125e-07

    rad0 = torch.sqrt(-2.0 * torch.log(uniform(r0)))
    rad1 = torch.sqrt(-2.0 * torch.log(uniform(r2)))
    th0 = 6.283185307179586 * uniform(r1)
    th1 = 6.283185307179586 * uniform(r3)
    z = torch.stack([rad0 * torch.cos(th0), rad0 * torch.sin(th0), rad1 * torch.cos(th1), rad1 * torch.sin(th1)], 1)
    return z.reshape(-1)[:numel]


def _memory_order_like(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like x whose memory (in x's stride order) holds `flat`."""
    perm = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -d))
    shape = [x.shape[d] for d in perm]
    inv = [perm.index(d) for d in range(x.dim())]
    return flat.reshape(shape).permute(inv)


def sampler_step(x, model_output, table, step, *, uncond=None, guidance_scale=1.0, noise=None, x0_buf=None,
                 var_values=None, thresh=None, seed=0, var_mode=0, clip_mode=0, clip_range=1.0, stochastic=True,
                 compute_dtype=torch.float32, x0_buf2=None, x0_buf3=None):
    """One sampler step from a coefficient table (the definition the fused kernels implement):

        m   = uncond + guidance_scale * (model_output - uncond)     (when uncond is given)
        x0  = clip(PX x + PM m)                                     (clip_mode 1: clamp; 2: clamp(., -s, s) / s)
        out = A x + B m + C x0 + D x0_prev + E x0_prev2 + F x0_prev3 + std z

    with the coefficients in row `step` of `table` (read with index_select: no host sync; E, F in columns 9, 10),
    x0_prev read from and x0 written to `x0_buf` when given, x0_prev2 read from and x0_prev written to `x0_buf2`,
    x0_prev3 read from and x0_prev2 written to `x0_buf3` when given (each only with the one before; each history
    term enters only where its coefficient is nonzero; where column 11, KEEP, is nonzero no buffer is written), std
    = S (var_mode 0), S sqrt(v) (1) or S exp((f MAXLOG + (1-f) MINLOG)/2) with f = (v + 1)/2 (2), and z = `noise` or
    the Philox normals of (seed, step, element index in memory order).
    """
    out_dtype = x.dtype
    cd = compute_dtype
    n_steps = table.shape[0]
    step = step.reshape(1).to(torch.int64).clamp(0, n_steps - 1)
    row = table.index_select(0, step).reshape(-1).to(cd)
    px, pm, a, b, c, d, s, min_log, max_log, e, f, keep = (row[j] for j in range(12))
    m = model_output.to(cd)
    if uncond is not None:
        u = uncond.to(cd)
        m = u + guidance_scale * (m - u)
    xf = x.to(cd)
    x0 = px * xf + pm * m
    if clip_mode == 1:
        x0 = x0.clamp(-clip_range, clip_range)
    elif clip_mode == 2:
        t = thresh.to(cd).reshape((-1,) + (1,) * (x.dim() - 1))
        x0 = torch.maximum(torch.minimum(x0, t), -t) / t
    out = a * xf + b * m + c * x0
    bufs = [t for t in (x0_buf, x0_buf2, x0_buf3) if t is not None]
    for coef, buf in zip((d, e, f), bufs):  # each read only where its coefficient is nonzero
        out = out + torch.where(coef != 0, coef * buf.to(cd), torch.zeros_like(out))
    if bufs:  # the history moves one buffer down, unless the row says KEEP (selected on the device: no sync)
        moved = [x0.to(bufs[0].dtype)] + [t.clone() for t in bufs[:-1]]
        for buf, new in zip(bufs, moved):
            buf.copy_(torch.where(keep != 0, buf, new))
    if stochastic:
        if noise is None:
            z = _memory_order_like(philox_normal(seed, step, x.numel(), x.device), x)
        else:
            z = noise
        z = z.to(cd)
        if var_mode == 0:
            std = s
        elif var_mode == 1:
            std = s * torch.sqrt(var_values.to(cd))
        else:
            f = 0.5 * (var_values.to(cd) + 1)
            std = s * torch.exp(0.5 * (f * max_log + (1 - f) * min_log))
        out = out + torch.where(s != 0, std * z, torch.zeros_like(out))
    return out.to(out_dtype)
