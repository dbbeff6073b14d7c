"""Argument checks and backend choice shared by the ops."""
from __future__ import annotations

import warnings

import torch
import torch.autograd.forward_ad as _forward_ad

try:  # private torch names (present from torch 2.0 to this day): without them no transform is detected
    from torch._C import _functorch
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _all_functorch_interpreters
except ImportError:  # pragma: no cover
    _functorch = None

from fastdiff import _backend

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # check_like's fast path (a module's weight is a Parameter)


def check_tensor(t, name: str, *, dtypes=KERNEL_DTYPES, allow_none=False):
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name}: expected a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def check_like(t, name: str, ref: torch.Tensor, shape: tuple, *, dtype=None, device=None):
    """t is None, or a tensor of `shape` on ref's device with ref's dtype (a caller checking several tensors passes
    ref's dtype and device, read once)."""
    if t is None:
        return
    if (type(t) in _PLAIN_TENSORS and t.dtype is (dtype or ref.dtype) and t.shape == shape
            and t.device == (device or ref.device)):
        return  # the common case, in as few attribute reads as possible (this runs on every call of an op)
    check_tensor(t, name)
    if t.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the input's device), got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the input's dtype), got {t.dtype}")


_AUTODIFF_TRANSFORMS = (_functorch.TransformType.Grad, _functorch.TransformType.Jvp) if _functorch else ()


@torch.compiler.assume_constant_result
def autodiff_transform_active() -> bool:
    """Whether the call is differentiated by something the fused ops' registered autograd cannot serve: a
    torch.func transform that differentiates (grad, vjp, jacrev, jvp, jacfwd, hessian) or forward-mode AD
    (torch.autograd.forward_ad). The ops then run their eager reference, which has every derivative.

    A C call and an attribute read when neither is active (vmap alone runs the fused ops). Under torch.compile
    Dynamo runs it at trace time and takes the answer as a constant (it cannot trace CInterpreter.key): a traced
    transform (``torch.compile(torch.func.grad(f))``) is on the real transform stack while Dynamo traces it, and the
    compiled code is guarded on that stack. Outside transforms the fused ops are traced; AOTAutograd
    differentiates them without torch.func."""
    if getattr(_forward_ad, "_current_level", -1) >= 0:  # inside a forward_ad.dual_level() (a private name)
        return True
    if _functorch is None or _functorch.peek_interpreter_stack() is None:
        return False
    return any(i.key() in _AUTODIFF_TRANSFORMS for i in _all_functorch_interpreters())


def needs_grad(*tensors) -> bool:
    """Whether autograd records an op on these tensors (None allowed): grad mode on and one of them requires grad.
    The fused kernels that have no backward (sampler_step; SDPA under a compiled training step) run the reference
    then. A plain loop: Sampler.step's fast path calls it every step."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def is_channels_last(x: torch.Tensor) -> bool:
    """(N, C, *spatial) with C innermost, then the spatial dims in order: what the kernels read in place."""
    if x.dim() < 3 or x.is_contiguous():
        return False
    perm = (0,) + tuple(range(2, x.dim())) + (1,)
    return x.permute(perm).is_contiguous()


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernels read it in place (contiguous or channels-last), else a contiguous copy."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous()


_warned: set = set()


def warn_once(key, msg: str):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def pick(backend: str, device: torch.device, dtype: torch.dtype, *, available: dict, order_cuda, order_cpu,
         op: str) -> str:
    """Resolve `backend` to one that can run on (device, dtype).

    available: backend name -> (ok: bool, why_not: str). An explicit backend that cannot run raises; "auto"
    takes the first in the device's order that can, and falls back to "torch" otherwise.
    """
    name = _backend.resolve(backend)
    if name == "auto":
        order = order_cuda if device.type == "cuda" else order_cpu
        for cand in order:
            ok, _ = available[cand]
            if ok:
                return cand
        return "torch"
    if name == "torch":
        return name
    ok, why = available[name]
    if not ok:
        raise ValueError(f"backend: {op} cannot run backend={name!r} here: {why}")
    return name


_CHOICES: dict = {}


def choose_elementwise(op: str, backend: str, x: torch.Tensor, has_triton_ops: bool) -> str:
    """`pick` for an op whose kernels take x of any KERNEL_DTYPES on its device (group_norm, sampler_step),
    cached on everything the answer depends on (the op, the resolved backend name, x's device and dtype, and
    TRITON_INTERPRET where Triton could be picked: "auto" never picks it for a CPU tensor), so a call in a sampling
    loop does not rebuild the availability table (nor, on the CPU, read the environment: ~1 us a call)."""
    name = _backend.resolve(backend)
    if torch.compiler.is_compiling():
        # not through the cache: Dynamo would guard on its contents, which this call's own entry changes (one
        # needless recompile at the second call)
        return _pick_elementwise(op, name, x, has_triton_ops)
    interp = _backend.triton_interpret() if name == "triton" or x.device.type != "cpu" else None
    key = (op, name, x.device, x.dtype, interp)
    got = _CHOICES.get(key)
    if got is None:
        got = _CHOICES[key] = _pick_elementwise(op, name, x, has_triton_ops)
    return got


def _pick_elementwise(op: str, name: str, x: torch.Tensor, has_triton_ops: bool) -> str:
    return pick(name, x.device, x.dtype, available=elementwise_availability(x, has_triton_ops),
                order_cuda=("cuda", "triton"), order_cpu=("cpu",), op=op)


def elementwise_availability(x: torch.Tensor, has_triton_ops: bool) -> dict:
    """Which backends can run an op whose kernels take x of any KERNEL_DTYPES on its device: the `available`
    table of `pick` for group_norm and sampler_step."""
    dev, dt = x.device, x.dtype
    dtype_ok = dt in KERNEL_DTYPES
    why_dtype = f"x has dtype {dt}; the fused kernels take float32, float16 and bfloat16"
    return {
        "cuda": (dtype_ok and dev.type == "cuda" and _backend.has_cuda_ext(),
                 why_dtype if not dtype_ok else "needs a CUDA tensor and the extension built with CUDA"),
        "triton": (dtype_ok and has_triton_ops and _backend.triton_usable(dev),
                   why_dtype if not dtype_ok else "needs Triton and a CUDA tensor (or TRITON_INTERPRET=1)"),
        "cpu": (dtype_ok and dev.type == "cpu" and _backend.has_cpu_ext(),
                why_dtype if not dtype_ok else "needs a CPU tensor and the compiled extension"),
    }
