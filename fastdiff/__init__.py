"""fastdiff: fused CUDA and Triton kernels for diffusion models, and a thin model and sampler API over them.

``import fastdiff`` never fails because the compiled extension, CUDA or Triton is missing: the ops fall back
to the backends that are present, and :func:`info` says which those are.
"""
from __future__ import annotations

import torch

from fastdiff._bench import _cpu_name
from fastdiff._backend import (EXTENSION_ERROR, cpu_kernels, get_backend, has_cpu_ext, has_cuda_ext, has_triton,
                               set_backend)
from fastdiff import ops, reference  # noqa: E402
from fastdiff import nn  # noqa: E402
from fastdiff import models  # noqa: E402
from fastdiff import diffusion  # noqa: E402
from fastdiff.diffusion import sample  # noqa: E402

__version__ = "0.1.0"

__all__ = ["info", "ops", "nn", "models", "reference", "diffusion", "sample", "set_backend", "get_backend",
           "__version__"]


def info() -> dict:
    """Which backends are present: the CPU extension, its CUDA kernels, Triton, and the device."""
    cuda_ok = torch.cuda.is_available()
    d = {
        "fastdiff": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_extension": has_cpu_ext(),
        "cpu_kernels": cpu_kernels(),
        "cuda_extension": has_cuda_ext(),
        "triton": None,
        "device": "cuda" if cuda_ok else "cpu",
        "device_name": torch.cuda.get_device_name() if cuda_ok else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "default_backend": get_backend(),
    }
    if has_triton():
        import triton

        d["triton"] = triton.__version__
    if cuda_ok:
        cap = torch.cuda.get_device_capability()
        d["compute_capability"] = f"{cap[0]}.{cap[1]}"
    if EXTENSION_ERROR:
        d["extension_error"] = EXTENSION_ERROR
    return d
