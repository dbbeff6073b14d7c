"""fastdiff.ops.group_norm: GroupNorm with the AdaGN scale/shift of ADM and an optional SiLU, in one kernel.

    y = act((GroupNorm(x) * weight + bias) * (1 + scale) + shift)

Backends: ``cuda`` (csrc/cuda/group_norm.cu), ``triton`` (fastdiff/triton/group_norm.py), ``cpu``
(csrc/cpu/group_norm.cpp), ``torch`` (fastdiff.reference.group_norm). Every backend but ``torch`` is a
custom op with a fake kernel (so torch.compile traces it) and a registered backward (so it trains): in C++ for
the cpu/cuda op (csrc/autograd.cpp), from Python for the Triton one.
"""
from __future__ import annotations

import numbers

import torch

from fastdiff import _backend, reference
from fastdiff.ops._common import (KERNEL_DTYPES, autodiff_transform_active, check_like, check_tensor,
                                  choose_elementwise, elementwise_availability, kernel_layout)

_ACTIVATIONS = {None: "none", "none": "none", "silu": "silu"}
_DTYPES = KERNEL_DTYPES + (torch.float64,)


def _fake_forward(x, num_groups, weight, bias, scale, shift, eps, activation):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fake_backward(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift, activation):
    def g(p):
        # every kernel returns parameter gradients contiguous, whatever the parameter's strides
        return x.new_empty((0,)) if p is None else p.new_empty(p.shape)

    return torch.empty_like(x), g(weight), g(bias), g(scale), g(shift)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, scale, shift, eps, activation = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias, scale, shift)
    ctx.num_groups, ctx.activation, ctx.eps = num_groups, activation, eps


def _composite_backward(ctx, grad_y, x, weight, bias, scale, shift):
    """Under create_graph=True: the gradients as differentiable ops of the inputs (the reference recomputed and
    differentiated with create_graph), so a second derivative exists; as the C++ op's autograd does."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = reference.group_norm(x, ctx.num_groups, weight, bias, ctx.eps, scale=scale, shift=shift,
                             activation=None if ctx.activation == "none" else ctx.activation, compute_dtype=cd)
    pos = [i for i, t in ((0, x), (2, weight), (3, bias), (4, scale), (5, shift))
           if t is not None and ctx.needs_input_grad[i]]
    out = [None] * 8
    if pos:
        ins = [(x, None, weight, bias, scale, shift)[i] for i in pos]
        for i, g in zip(pos, torch.autograd.grad(y, ins, grad_y, create_graph=True, allow_unused=True)):
            out[i] = g
    return tuple(out)


def _autograd_for(backward_op):
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, mean, rstd, weight, bias, scale, shift = ctx.saved_tensors
        if torch.is_grad_enabled() and grad_y is not None:
            return _composite_backward(ctx, grad_y, x, weight, bias, scale, shift)
        gx, gw, gb, gs, gt = backward_op(grad_y, x, mean, rstd, ctx.num_groups, weight, bias, scale, shift,
                                         ctx.activation)
        keep = ctx.needs_input_grad
        return (gx if keep[0] else None, None, gw if keep[2] else None, gb if keep[3] else None,
                gs if keep[4] else None, gt if keep[5] else None, None, None)

    return backward


if _backend.HAS_EXTENSION:
    # The C++/CUDA op's autograd is registered in C++ (csrc/autograd.cpp): a training step then pays no Python
    # per call. The Triton op below keeps the Python registration.
    torch.library.register_fake("fastdiff::group_norm")(_fake_forward)
    torch.library.register_fake("fastdiff::group_norm_backward")(_fake_backward)

_HAS_TRITON_OPS = False
if _backend.has_triton():
    try:
        from fastdiff.triton import group_norm as _tgn  # noqa: F401  (defines fastdiff::group_norm_triton)

        torch.library.register_autograd("fastdiff::group_norm_triton",
                                        _autograd_for(torch.ops.fastdiff.group_norm_backward_triton),
                                        setup_context=_setup_context)
        _HAS_TRITON_OPS = True
    except ImportError:  # a Triton too old or broken: the other backends still work
        pass


def _available(x: torch.Tensor) -> dict:
    return elementwise_availability(x, _HAS_TRITON_OPS)


def choose_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """The backend group_norm runs for this input: "auto" resolved to the fastest one present."""
    return choose_elementwise("group_norm", backend, x, _HAS_TRITON_OPS)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, scale=None, shift=None, activation=None,
               backend="auto"):
    """y = act((GroupNorm(x) * weight + bias) * (1 + scale) + shift), fused.

    x: (N, C, *spatial), 0 to 3 spatial dims, NCHW-contiguous or channels-last (read in place; the output keeps
    the input's memory format; other strides are made contiguous first). num_groups must divide C.
    weight, bias: (C,) or None. scale, shift: (N, C) or None (AdaGN). activation: None or "silu".
    backend: "auto", "cuda", "triton", "cpu" or "torch". Statistics are computed in fp32.
    """
    check_tensor(x, "x")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: expected float32, float16, bfloat16 or float64, got {x.dtype}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"x: expected shape (N, C, *spatial) with 0 to 3 spatial dims, got {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups: expected an int, got {type(num_groups).__name__}")
    num_groups = int(num_groups)
    C = x.shape[1]
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"num_groups: {num_groups} must be positive and divide the {C} channels of x")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):  # a tensor eps too: the schema takes a float
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected None or 'silu', got {activation!r}")
    c_shape, nc_shape = x.shape[1:2], x.shape[:2]  # torch.Size: compared with the parameters' shapes as is
    dt, dev = x.dtype, x.device
    check_like(weight, "weight", x, c_shape, dtype=dt, device=dev)
    check_like(bias, "bias", x, c_shape, dtype=dt, device=dev)
    check_like(scale, "scale", x, nc_shape, dtype=dt, device=dev)
    check_like(shift, "shift", x, nc_shape, dtype=dt, device=dev)

    name = choose_backend(x, backend)
    if name != "torch" and autodiff_transform_active():
        # the C++ op's autograd is a C++ autograd function: torch.func cannot run it ("cannot use C++
        # torch::autograd::Function with functorch transforms") and it has no forward derivative; the
        # reference (F.group_norm) has every derivative
        name = "torch"
    act = _ACTIVATIONS[activation]
    if name == "torch":
        return reference.group_norm(x, num_groups, weight, bias, float(eps), scale=scale, shift=shift,
                                    activation=None if act == "none" else act)
    x = kernel_layout(x)
    op = torch.ops.fastdiff.group_norm_triton if name == "triton" else torch.ops.fastdiff.group_norm
    return op(x, num_groups, weight, bias, scale, shift, float(eps), act)[0]
