"""Edge cases of the public ops found in review: double backward, empty head dims, NaN scales, overflow."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import _backend, reference

attn_mod = importlib.import_module("fastdiff.ops.attention")

HAS_GPU = torch.cuda.is_available()
HAS_ATTN_OP = _backend.HAS_EXTENSION and hasattr(torch.ops.fastdiff, "attention")


def _qkv(dtype, device="cpu"):
    return [torch.randn(1, 2, S, 16, dtype=dtype, device=device, requires_grad=True) for S in (5, 7, 7)]


def _double_backward(fn, dtype, device="cpu"):
    q, k, v = _qkv(dtype, device)
    out = fn(q, k, v)
    gq, = torch.autograd.grad(out.float().pow(2).sum(), q, create_graph=True)
    gq_plain, = torch.autograd.grad(fn(q, k, v).float().pow(2).sum(), q)
    assert torch.equal(gq.detach(), gq_plain)  # create_graph=True alone still gives the first-order gradient
    gq.float().pow(2).sum().backward()


@pytest.mark.skipif(not HAS_ATTN_OP, reason="the compiled extension (torch.ops.fastdiff.attention) is not built")
def test_attention_op_double_backward_raises():
    """The op's backward on a device without the Triton backward is torch math that treats the saved lse as a
    constant: differentiated again it gave a silently wrong second derivative (q.grad off by ~15%)."""
    with pytest.raises(RuntimeError, match="no double backward"):
        _double_backward(lambda q, k, v: torch.ops.fastdiff.attention(q, k, v, 0.25)[0], torch.float32)


@pytest.mark.triton
@pytest.mark.skipif(HAS_GPU or not attn_mod._HAS_TRITON_OPS or not _backend.triton_interpret(),
                    reason="the Triton backend on CPU tensors needs TRITON_INTERPRET=1 (the GPU variant is below)")
def test_attention_triton_double_backward_raises_interpreted():
    with pytest.raises(RuntimeError, match="no double backward"):
        _double_backward(lambda q, k, v: fastdiff.ops.attention(q, k, v, backend="triton"), torch.float16)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_attention_gpu_double_backward_raises(backend):
    with pytest.raises(RuntimeError, match="no double backward|no autograd formula"):
        _double_backward(lambda q, k, v: fastdiff.ops.attention(q, k, v, backend=backend), torch.float16, "cuda")


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_attention_empty_head_dim(backend):
    """D = 0 with the default scale raised ZeroDivisionError (0 ** -0.5); SDPA returns the empty output."""
    q, k, v = torch.randn(1, 2, 5, 0), torch.randn(1, 2, 7, 0), torch.randn(1, 2, 7, 0)
    out = fastdiff.ops.attention(q, k, v, backend=backend)
    assert out.shape == F.scaled_dot_product_attention(q, k, v).shape == (1, 2, 5, 0)
    assert reference.attention(q, k, v).shape == (1, 2, 5, 0)


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_attention_nan_scale_raises(backend):
    """scale=nan: the cpu backend (SDPA) returned zeros where the torch and Triton backends return NaN."""
    q, k, v = (t.detach() for t in _qkv(torch.float32))
    with pytest.raises(ValueError, match="scale"):
        fastdiff.ops.attention(q, k, v, scale=float("nan"), backend=backend)


@pytest.mark.skipif(not fastdiff.info()["cpu_extension"], reason="needs the compiled CPU extension")
@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (1, 4, 64, 80), (2, 64, 40, 40)])  # one chunk; several; CL chunks
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cpu_group_norm_overflowing_variance(shape, fmt):
    """|x| ~ 1e20 in fp32: the variance overflows to inf, so rstd = 0 and y = bias, as torch's NCHW path gives.
    The NCHW rows gave rstd = NaN (sq - sum * rel = inf - inf, which std::max(NaN, 0) keeps), and a first Chan
    merge's d * d * 0 = inf * 0 could do the same."""
    torch.manual_seed(0)
    C = shape[1]
    x = (torch.randn(shape) * 1e20).contiguous(memory_format=fmt)
    w, b = torch.randn(C), torch.randn(C)
    y, _, rstd = torch.ops.fastdiff.group_norm(x, 2, w, b, None, None, 1e-5, "none")
    assert torch.equal(rstd, torch.zeros_like(rstd))
    torch.testing.assert_close(y, b[:, None, None].expand(shape), rtol=0, atol=0)


@pytest.mark.triton
@pytest.mark.skipif(not attn_mod._HAS_TRITON_OPS, reason="Triton is not installed")
def test_attention_triton_grid_fits_cuda_limits(monkeypatch):
    """B·H = 65536 (temporal attention at SD's 64x64 latents: 2·64·64 sequences × 8 heads) was launched on a
    (tiles, B·H) grid: gridDim.y > 65535 fails to launch on a GPU. The launches are recorded here, not run."""
    tattn = importlib.import_module("fastdiff.triton.attention")
    grids = []

    class _Record:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tattn, "wrap_triton", _Record)
    dev = "cuda" if HAS_GPU else "cpu"
    q = torch.zeros(8192, 8, 1, 16, dtype=torch.float16, device=dev)
    out, lse = tattn.attention_triton(q, q, q, 0.25)
    tattn.attention_backward_triton(q, q, q, q, out, lse, 0.25)
    assert len(grids) == 4
    for grid in grids:
        assert all(g <= 65535 for g in grid[1:]) and grid[0] < 2 ** 31, grid


@pytest.mark.triton
@pytest.mark.skipif(HAS_GPU or not attn_mod._HAS_TRITON_OPS or not _backend.triton_interpret(),
                    reason="interpreter-sized check of the 1-D grid's indexing")
def test_attention_triton_1d_grid_matches(monkeypatch):
    """The 1-D grid taken past 65535 (batch, head) pairs, forced here on a small problem: same results."""
    tattn = importlib.import_module("fastdiff.triton.attention")
    q, k, v = (torch.randn(3, 2, S, 40, dtype=torch.float16) for S in (37, 45, 45))
    go = torch.randn(3, 2, 37, 40, dtype=torch.float16)
    runs = []
    for limit in (65535, 1):
        monkeypatch.setattr(tattn, "_MAX_GRID_Y", limit)
        out, lse = tattn.attention_triton(q, k, v, 0.3)
        runs.append((out, lse) + tuple(tattn.attention_backward_triton(go, q, k, v, out, lse, 0.3)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
