"""fastdiff.ops.attention: fused scaled-dot-product attention, a drop-in for
``torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)`` without mask, dropout or causality.

    out = softmax(q @ kᵀ · scale) @ v,   q: (B, H, Sq, D), k, v: (B, H, Skv, D)

Backends:
  ``cuda``    csrc/cuda/attention.cu: a flash forward on tensor cores (mma.sync, sm80+); its backward is
              Triton's (torch.ops.fastdiff.attention returns (out, lse) for it).
  ``triton``  fastdiff/triton/attention.py: flash forward and backward.
  ``cpu``     torch.nn.functional.scaled_dot_product_attention (a well-kept library already does this on the CPU).
  ``torch``   fastdiff.reference.attention: the materialised softmax in the input dtype ("eager").
``auto`` picks cuda → triton for CUDA tensors and cpu for CPU tensors. The fused kernels take float16 and
bfloat16 with every head dim that is a multiple of 8 up to 256; for anything else (float32 included) ``auto``
falls back to the reference with one warning, and an explicit fused backend raises.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from fastdiff import _backend, reference
from fastdiff.ops._common import autodiff_transform_active, check_tensor, needs_grad, warn_once

FUSED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _empty_bhsd(t: torch.Tensor, s, d, dtype=None) -> torch.Tensor:
    """Mirror of the kernels' output allocation: (B, S, H, D) memory when t's heads are inside its sequence."""
    b, h = t.shape[0], t.shape[1]
    dtype = dtype or t.dtype
    if t.stride(1) < t.stride(2):
        return t.new_empty((b, s, h, d), dtype=dtype).transpose(1, 2)
    return t.new_empty((b, h, s, d), dtype=dtype)


def _fake_forward(q, k, v, scale):
    B, H, SQ, D = q.shape
    return _empty_bhsd(q, SQ, D), q.new_empty((B, H, SQ), dtype=torch.float32)


def _fake_backward(grad_out, q, k, v, out, lse, scale):
    return _empty_bhsd(q, q.shape[2], q.shape[3]), _empty_bhsd(k, k.shape[2], k.shape[3]), \
        _empty_bhsd(v, v.shape[2], v.shape[3])


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward_math(grad_out, q, k, v, out, lse, scale):
    """The flash backward written with torch ops in fp32 (materialises p): for devices without Triton."""
    qf, kf, vf, gf = q.float(), k.float(), v.float(), grad_out.float()
    p = torch.exp(torch.matmul(qf, kf.transpose(-2, -1)) * scale - lse.unsqueeze(-1))
    dv = torch.matmul(p.transpose(-2, -1), gf)
    dp = torch.matmul(gf, vf.transpose(-2, -1))
    delta = (gf * out.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-2, -1), qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _NoDoubleBackward(torch.autograd.Function):
    """The math backward's gradients, tied to what they depend on so that differentiating them raises (as the
    Triton backward op, which has no autograd formula, does): differentiated as torch ops they would treat the
    saved lse as a constant and give a silently wrong second derivative."""

    @staticmethod
    def forward(ctx, dq, dk, dv, *deps):
        return dq, dk, dv

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("fastdiff attention: no double backward (a gradient of its gradient) on the fused "
                           "backends; use backend=\"torch\" for that")


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if q.device.type == "cuda" and _HAS_TRITON_OPS:
        dq, dk, dv = torch.ops.fastdiff.attention_backward_triton(grad_out, q, k, v, out, lse, ctx.scale)
    else:
        with torch.no_grad():
            dq, dk, dv = _backward_math(grad_out, q, k, v, out, lse, ctx.scale)
        if torch.is_grad_enabled():  # create_graph=True
            deps = [t for t in (grad_out, q, k, v) if t.requires_grad]
            if deps:
                dq, dk, dv = _NoDoubleBackward.apply(dq, dk, dv, *deps)
    keep = ctx.needs_input_grad
    return dq if keep[0] else None, dk if keep[1] else None, dv if keep[2] else None, None


_HAS_CUDA_OP = _backend.HAS_EXTENSION and hasattr(torch.ops.fastdiff, "attention")
if _HAS_CUDA_OP:
    # torch.ops.fastdiff.attention: the CUDA kernel, and a CPU kernel (csrc/cpu/attention.cpp) so the op and its
    # autograd can be checked on any machine.
    torch.library.register_fake("fastdiff::attention")(_fake_forward)
    torch.library.register_autograd("fastdiff::attention", _backward, setup_context=_setup_context)

_HAS_TRITON_OPS = False
if _backend.has_triton():
    try:
        from fastdiff.triton import attention as _tattn  # defines fastdiff::attention_triton and its backward

        # Explicit fake kernels: triton_op's own runs the Python body on fake tensors, which under
        # TRITON_INTERPRET=1 touches data pointers. Inductor still sees through the ops (their functional
        # decomposition is separate from the fake kernel).
        _tattn.attention_triton.register_fake(_fake_forward)
        _tattn.attention_backward_triton.register_fake(_fake_backward)
        torch.library.register_autograd("fastdiff::attention_triton", _backward, setup_context=_setup_context)
        _HAS_TRITON_OPS = True
    except ImportError:  # a Triton too old or broken: the other backends still work
        pass


def _check(q, k, v, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, dtypes=None)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (B, H, S, D), got shape {tuple(t.shape)}")
    B, H, _, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (q's device), got {t.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (q's dtype), got {t.dtype}")
        if t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
            raise ValueError(f"{name}: expected shape ({B}, {H}, S, {D}) to match q's batch, heads and head dim; "
                             f"got {tuple(t.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v: expected {k.shape[2]} keys/values like k, got shape {tuple(v.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale: expected None or a float, got {type(scale).__name__}")
    if scale is not None and scale != scale:  # NaN: SDPA (the cpu backend) returns zeros, the others NaN
        raise ValueError(f"scale: expected a number, got {scale!r}")


def _fused_problem(q):
    """Why the fused kernels cannot take q (an (exception type, message) pair), or None."""
    D = q.shape[-1]
    if q.dtype not in FUSED_DTYPES:
        return TypeError, f"q: the fused attention kernels take float16 and bfloat16, got {q.dtype}"
    if D % 8 != 0 or not 8 <= D <= MAX_HEAD_DIM:
        return ValueError, (f"q: the fused attention kernels take head dims that are multiples of 8 up to "
                            f"{MAX_HEAD_DIM}, got {D}")
    return None


def _present(name: str, device: torch.device):
    """(present, why not): whether backend `name` exists for tensors on `device`, whatever their shape."""
    if name == "cuda":
        return (device.type == "cuda" and _HAS_CUDA_OP and _backend.has_cuda_ext(),
                "needs a CUDA tensor and the extension built with CUDA")
    if name == "triton":
        return (_HAS_TRITON_OPS and _backend.triton_usable(device),
                "needs Triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    if name == "cpu":
        return device.type == "cpu", "needs a CPU tensor"
    return True, ""


def _auto_order(device: torch.device) -> tuple:
    if device.type == "cuda":
        return ("cuda", "triton")
    if device.type == "cpu":
        return ("cpu",)
    return ()


def choose_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend attention runs for this query: "auto" resolved to the fastest one that can take it."""
    name = _backend.resolve(backend)
    problem = _fused_problem(q)
    if name == "auto":
        for cand in _auto_order(q.device):
            if not _present(cand, q.device)[0]:
                continue
            if cand in ("cuda", "triton") and problem is not None:
                warn_once(("attention", problem[1]),
                          f"fastdiff.ops.attention: {problem[1]}; running the eager reference (backend='torch')")
                return "torch"
            return cand
        return "torch"
    if name == "torch":
        return name
    ok, why = _present(name, q.device)
    if not ok:
        raise ValueError(f"backend: attention cannot run backend={name!r} here: {why}")
    if name in ("cuda", "triton") and problem is not None:
        exc, msg = problem
        raise exc(f"{msg} (backend={name!r})")
    return name


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def attention(q, k, v, *, scale=None, backend="auto"):
    """softmax(q @ kᵀ · scale) @ v, fused: a drop-in for F.scaled_dot_product_attention(q, k, v, scale=scale).

    q: (B, H, Sq, D); k, v: (B, H, Skv, D) with the same B, H, D, device and dtype; returns (B, H, Sq, D).
    Any strides with a contiguous last dim are read in place ((B, S, H, D) memory viewed as (B, H, S, D) needs no
    copy), and the output of the fused kernels is laid out like q. scale defaults to D ** -0.5.
    backend: "auto", "cuda", "triton", "cpu" or "torch".
    """
    _check(q, k, v, scale)
    name = choose_backend(q, backend)
    if name in ("cuda", "triton", "cpu") and autodiff_transform_active():
        # the fused ops' autograd (torch.library.register_autograd) has no forward derivative -- jvp and
        # forward_ad got a zero or no tangent, silently -- and torch.func's grad cannot run it; on the CPU, torch's
        # SDPA kernel has no forward derivative (jvp, jacfwd, hessian raise NotImplementedError); the reference
        # has every derivative
        name = "torch"
    if scale is None:  # D ** -0.5; any scale for an empty head dim (the output is empty), as SDPA
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
    else:
        scale = float(scale)
    if name == "torch":
        return reference.attention(q, k, v, scale)
    if name == "cpu" and torch.compiler.is_compiling() and needs_grad(q, k, v):
        # a compiled training step on the CPU: Inductor's SDPA backward fails on symbolic sequence lengths
        # (torch.compile(dynamic=True): "cannot determine truth value of Relational: 16*((s53//2))**2 < 4", torch
        # 2.14), and Dynamo cannot tell a symbolic shape from a static one here (isinstance(d, SymInt) traces as
        # False), so every compiled step with gradients takes the reference, which Inductor fuses; compiled
        # inference keeps SDPA
        return reference.attention(q, k, v, scale)
    if name == "cpu":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    op = torch.ops.fastdiff.attention if name == "cuda" else torch.ops.fastdiff.attention_triton
    return op(q, k, v, scale)[0]
