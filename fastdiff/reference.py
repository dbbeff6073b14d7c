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
        scale = q.shape[-1] ** -0.5
    if compute_dtype is not None:
        q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v).to(out_dtype)
