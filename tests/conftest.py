"""Test set-up: markers, and Triton's interpreter on machines without a GPU.

Triton decides at kernel-definition time whether to interpret, so TRITON_INTERPRET must be set before any
fastdiff module that defines Triton kernels is imported: it is set here, first, when no GPU is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastdiff  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU: none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords and not HAS_GPU:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a CPU shared by several jobs it avoids OpenMP's oversubscription
    stalls (a parallel region waiting for a descheduled thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def silu_group_norm_pair():
    """(torch.nn.GroupNorm(4, 16) with random affine parameters, fastdiff.nn.GroupNorm(4, 16, activation="silu")
    holding the same state): the drop-in and the module it replaces."""
    ref = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    m = fastdiff.nn.GroupNorm(4, 16, activation="silu")
    m.load_state_dict(ref.state_dict())
    return ref, m
