"""Backend names, what is present, and the global/default backend (``fastdiff.set_backend``)."""
from __future__ import annotations

import functools
import importlib.util
import os
import threading

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

_state = threading.local()


def _load_extension():
    try:
        from fastdiff import _C  # noqa: F401  (loading registers torch.ops.fastdiff.*)
    except (ImportError, OSError) as e:  # a missing or broken build must not break `import fastdiff`
        return False, f"{type(e).__name__}: {e}"
    return True, None


HAS_EXTENSION, EXTENSION_ERROR = _load_extension()


# What is present does not change in a process: the checks below are cached, and torch.compile takes their result
# as a constant (assume_constant_result: Dynamo neither traces into them nor warns about the lru_cache wrapper).
def _constant(fn):
    cached = functools.lru_cache(None)(fn)

    @functools.wraps(fn)
    def get():
        return cached()

    return torch.compiler.assume_constant_result(get)


def has_cpu_ext() -> bool:
    return HAS_EXTENSION


@_constant
def cpu_kernels():
    """Which code the extension's CPU kernels were compiled to: "avx512" or "portable" (None: no extension)."""
    return str(torch.ops.fastdiff._cpu_kernels()) if HAS_EXTENSION else None


@_constant
def has_cuda_ext() -> bool:
    """The extension was built with its CUDA kernels (a GPU is a separate question)."""
    return HAS_EXTENSION and bool(torch.ops.fastdiff._built_with_cuda())


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@_constant
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    """Triton can run a kernel on tensors on `device`: a CUDA device, or any device under TRITON_INTERPRET=1."""
    if not has_triton():
        return False
    return triton_interpret() or (device.type == "cuda" and torch.version.cuda is not None)


def get_backend() -> str:
    return getattr(_state, "backend", "auto")


class set_backend:
    """Switch every fused layer's default backend: ``fastdiff.set_backend("torch")`` sets it globally (for this
    thread); ``with fastdiff.set_backend("torch"): ...`` sets it for the block and restores it after;
    ``@fastdiff.set_backend("torch")`` on a function sets it for each call of the function only.

    Backends: ``auto`` (fastest present for the tensor's device), ``cuda``, ``triton``, ``cpu`` and ``torch``
    (the eager reference). An op called with an explicit ``backend=`` other than ``"auto"`` ignores this.
    """

    def __init__(self, name: str):
        check_backend(name)
        self._name = name
        self._prev = get_backend()
        _state.backend = name

    def __call__(self, func):
        # used as a decorator: undo the global switch __init__ made, and switch for each call instead
        _state.backend = self._prev
        name = self._name

        @functools.wraps(func)
        def scoped(*args, **kwargs):
            with set_backend(name):
                return func(*args, **kwargs)

        return scoped

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _state.backend = self._prev
        return False


def check_backend(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def resolve(backend: str) -> str:
    """An op's `backend=` argument, with "auto" replaced by the global choice when one is set."""
    check_backend(backend)
    return get_backend() if backend == "auto" else backend
