"""fastdiff.ops.attention, its kernels, and the Attention / SpatialSelfAttention modules.

Accuracy criterion (shared/ARCHITECTURE.md): against an fp32 reference, a kernel's max error is at most twice the
error of eager PyTorch computing the same thing in the same dtype (fastdiff.reference.attention, materialised
softmax). Without a GPU: the cpu/torch backends and the op's CPU kernel at reduced sizes, the Triton kernels under
TRITON_INTERPRET=1 on tiny shapes (fp16/fp32: a bf16 tl.dot is wrong in the interpreter), and a lane-level model
of the CUDA kernel's fragment indexing. The SD/ADM shapes ((4096, 4096), (1024, 77)) and bf16 run on the GPU.
"""
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import _backend, reference

attn_mod = importlib.import_module("fastdiff.ops.attention")  # the module (fastdiff.ops.attention is the function)

HAS_GPU = torch.cuda.is_available()
HAS_EXT = _backend.HAS_EXTENSION and hasattr(torch.ops.fastdiff, "attention")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="the compiled extension (torch.ops.fastdiff.attention) is not built")
needs_triton = pytest.mark.skipif(not attn_mod._HAS_TRITON_OPS, reason="Triton is not installed")
needs_cuda_ext = pytest.mark.skipif(not (HAS_EXT and _backend.has_cuda_ext()),
                                    reason="the extension was built without its CUDA kernels")
interp_only = pytest.mark.skipif(HAS_GPU, reason="interpreter-sized variant; the GPU runs the full-size tests")

HEAD_DIMS = (40, 64, 80, 128, 160)
LAYOUTS = ("contiguous", "bshd", "packed")


def make_qkv(B, H, Sq, Skv, D, dtype, layout="contiguous", device="cpu", requires_grad=False):
    """q, k, v in a memory layout: "contiguous" (B, H, S, D); "bshd" (B, S, H, D) memory viewed per head; "packed"
    slices of one (B, S, 3, H, D) projection output (strided, not dense), as a fused qkv Linear produces."""
    def one(S, i):
        if layout == "contiguous":
            return torch.randn(B, H, S, D, device=device, dtype=dtype)
        if layout == "bshd":
            return torch.randn(B, S, H, D, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(B, S, 3, H, D, device=device, dtype=dtype)[:, :, i].transpose(1, 2)

    qkv = [one(Sq, 0), one(Skv, 1), one(Skv, 2)]
    if requires_grad:
        qkv = [t.requires_grad_() for t in qkv]
    return qkv


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def floor(dtype, ref):
    """For fp32 inputs both errors are a few ulps and their ratio is noise: allow 16 ulps of the largest value."""
    if dtype not in (torch.float32, torch.float64):
        return 0.0
    return 16 * torch.finfo(dtype).eps * ref.abs().max().item()


def ref_dtype(dtype):
    """fp32 for half inputs; fp64 for fp32 inputs (an fp32 reference would be eager itself)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def assert_within_eager(out, q, k, v, scale=None, what="out"):
    ref = reference.attention(q, k, v, scale, compute_dtype=ref_dtype(q.dtype))
    eager = reference.attention(q, k, v, scale)
    err, eager_err = max_err(out, ref), max_err(eager, ref)
    assert err <= 2 * eager_err + floor(q.dtype, ref), f"{what}: error {err:.3e} > 2 x eager's {eager_err:.3e}"


def grads(fn, q, k, v, go):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return out, torch.autograd.grad(out, (q, k, v), go)


def assert_grads_within_eager(fn, q, k, v, scale=None):
    go = torch.randn(q.shape[:-2] + (q.shape[2], v.shape[-1]), dtype=q.dtype, device=q.device)
    _, g = grads(fn, q, k, v, go)
    _, gr = grads(lambda a, b, c: reference.attention(a, b, c, scale, compute_dtype=ref_dtype(q.dtype)), q, k, v,
                  go)
    _, ge = grads(lambda a, b, c: reference.attention(a, b, c, scale), q, k, v, go)
    for name, a, r, e in zip(("dq", "dk", "dv"), g, gr, ge):
        assert a.shape == r.shape, name
        err, eager_err = max_err(a, r), max_err(e, r)
        assert err <= 2 * eager_err + floor(q.dtype, r), f"{name}: error {err:.3e} > 2 x eager's {eager_err:.3e}"


# ---------------------------------------------------------------------------------------------------------------
# CPU: the cpu (F.sdpa) and torch (reference) backends at reduced sizes


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Sq,Skv", [(256, 256), (128, 77), (37, 53)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_backends_forward(D, Sq, Skv, dtype, backend):
    q, k, v = make_qkv(1, 2, Sq, Skv, D, dtype, layout="bshd")
    out = fastdiff.ops.attention(q, k, v, backend=backend)
    assert out.shape == (1, 2, Sq, D) and out.dtype == dtype
    assert_within_eager(out, q, k, v)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_backend_layouts_scale_and_grads(layout, dtype):
    q, k, v = make_qkv(2, 3, 37, 53, 40, dtype, layout=layout)
    out = fastdiff.ops.attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    assert_within_eager(out, q, k, v, scale=0.3)
    assert_grads_within_eager(lambda a, b, c: fastdiff.ops.attention(a, b, c, scale=0.3), q, k, v, scale=0.3)


def test_auto_on_cpu_is_sdpa():
    q, k, v = make_qkv(1, 2, 8, 9, 44, torch.float32)  # a head dim no fused kernel takes: still fine on the CPU
    assert attn_mod.choose_backend(q) == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastdiff.ops.attention(q, k, v)
    with fastdiff.set_backend("torch"):
        assert attn_mod.choose_backend(q) == "torch"


# ---------------------------------------------------------------------------------------------------------------
# torch.ops.fastdiff.attention on the CPU: the op's contract (out laid out like q, lse), fake kernel and autograd


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_cpu_kernel(layout, dtype):
    q, k, v = make_qkv(2, 2, 37, 53, 40, dtype, layout=layout)
    out, lse = torch.ops.fastdiff.attention(q, k, v, 0.25)
    assert_within_eager(out, q, k, v, scale=0.25)
    s = torch.matmul(q.double(), k.double().transpose(-2, -1)) * 0.25
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-4, rtol=1e-4)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 37) and lse.is_contiguous()
    # the output follows q's layout: (B, S, H, D) memory for a per-head view of (B, S, H·D) tokens
    assert (out.stride(1) < out.stride(2)) == (q.stride(1) < q.stride(2))
    assert_grads_within_eager(lambda a, b, c: torch.ops.fastdiff.attention(a, b, c, 0.25)[0], q, k, v, scale=0.25)


@needs_ext
def test_op_cpu_kernel_edge_sizes():
    q, k, v = make_qkv(1, 1, 0, 5, 16, torch.float32)
    out, lse = torch.ops.fastdiff.attention(q, k, v, 0.5)
    assert out.shape == (1, 1, 0, 16)
    q, k, v = make_qkv(1, 1, 3, 0, 16, torch.float32)
    out, lse = torch.ops.fastdiff.attention(q, k, v, 0.5)
    assert (out == 0).all() and torch.isinf(lse).all()
    with pytest.raises(RuntimeError, match="k: expected the batch"):
        torch.ops.fastdiff.attention(q, torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), 0.5)


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "packed"])
def test_opcheck_cpu_kernel(layout):
    q, k, v = make_qkv(1, 2, 19, 23, 24, torch.float32, layout=layout, requires_grad=True)
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, 0.2))


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (on the CPU under TRITON_INTERPRET=1, tiny shapes)


@pytest.mark.triton
@needs_triton
@interp_only
@pytest.mark.parametrize("D", [40, 64, 80])
@pytest.mark.parametrize("layout", ["contiguous", "packed"])
def test_triton_fp16_forward_and_grads(D, layout):
    q, k, v = make_qkv(1, 2, 37, 53, D, torch.float16, layout=layout)
    out = fastdiff.ops.attention(q, k, v, backend="triton")
    assert_within_eager(out, q, k, v)
    assert (out.stride(1) < out.stride(2)) == (q.stride(1) < q.stride(2))
    assert_grads_within_eager(lambda a, b, c: fastdiff.ops.attention(a, b, c, backend="triton"), q, k, v)


@pytest.mark.triton
@needs_triton
@interp_only
@pytest.mark.parametrize("D,Sq,Skv", [(40, 37, 53), (80, 16, 77), (160, 9, 33), (8, 33, 5), (24, 40, 32)])
def test_triton_fp32_kernel(D, Sq, Skv):
    """fp32 through the raw op: the tightest check of the kernel's arithmetic (the public op sends fp32 to the
    reference); also head dims 8, 24 (masked power-of-two block / tail) and 160 (128 + 32)."""
    q, k, v = make_qkv(2, 1, Sq, Skv, D, torch.float32, layout="bshd")
    def fn(a, b, c):
        return torch.ops.fastdiff.attention_triton(a, b, c, 0.7 * D ** -0.5)[0]

    out, lse = torch.ops.fastdiff.attention_triton(q, k, v, 0.7 * D ** -0.5)
    assert_within_eager(out, q, k, v, scale=0.7 * D ** -0.5)
    s = torch.matmul(q.double(), k.double().transpose(-2, -1)) * (0.7 * D ** -0.5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    assert_grads_within_eager(fn, q, k, v, scale=0.7 * D ** -0.5)


@pytest.mark.triton
@needs_triton
@interp_only
def test_triton_output_poisoned_and_deterministic():
    q, k, v = make_qkv(1, 2, 33, 40, 40, torch.float16)
    a = fastdiff.ops.attention(q, k, v, backend="triton")
    assert torch.isfinite(a).all()  # every element written (empty outputs are garbage, often NaN)
    b = fastdiff.ops.attention(q, k, v, backend="triton")
    assert torch.equal(a, b)


@pytest.mark.triton
@needs_triton
@interp_only
def test_opcheck_triton_op():
    q, k, v = make_qkv(1, 2, 19, 23, 40, torch.float16, layout="bshd", requires_grad=True)
    torch.library.opcheck(torch.ops.fastdiff.attention_triton.default, (q, k, v, 0.2))
    go = torch.randn(1, 2, 19, 40, dtype=torch.float16)
    out, lse = torch.ops.fastdiff.attention_triton(q.detach(), k.detach(), v.detach(), 0.2)
    torch.library.opcheck(torch.ops.fastdiff.attention_backward_triton.default,
                          (go, q.detach(), k.detach(), v.detach(), out, lse, 0.2))


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("backend", ["triton",
                                     pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda_ext])])
def test_fused_backends_under_torch_func_and_forward_ad(backend):
    """The fused ops' autograd (register_autograd) has no forward derivative: torch.func.jvp gave a zero
    tangent and forward_ad no tangent at all, silently; torch.func.grad raised "... must override the
    setup_context staticmethod". Differentiated so, the op runs the reference."""
    import torch.autograd.forward_ad as fwAD

    device = torch.device("cuda" if HAS_GPU else "cpu")
    if not _backend.triton_usable(device):
        pytest.skip("needs a GPU, or TRITON_INTERPRET=1 to pretend the CPU is a fused-kernel device")
    q, k, v = make_qkv(1, 2, 5, 7, 16, torch.float16, device=device)
    tq = torch.randn_like(q)

    def fn(a):
        return fastdiff.ops.attention(a, k, v, scale=0.3, backend=backend)

    def ref(a):
        return reference.attention(a.float(), k.float(), v.float(), 0.3)

    want = torch.func.jvp(ref, (q,), (tq,))[1]
    torch.testing.assert_close(torch.func.jvp(fn, (q,), (tq,))[1].float(), want, atol=1e-2, rtol=1e-2)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fn(fwAD.make_dual(q, tq))).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent.float(), want, atol=1e-2, rtol=1e-2)
    got = torch.func.grad(lambda a: fn(a).float().square().sum())(q)
    want = torch.func.grad(lambda a: ref(a).square().sum())(q)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    out = fn(q)  # no transform: the fused kernel still runs (its output is laid out like q, written in full)
    assert torch.isfinite(out).all()


@pytest.mark.triton
@needs_triton
def test_auto_fallback_warns_once(monkeypatch):
    """auto with a case the fused kernels cannot take (head dim 44): the reference, with one warning."""
    if not _backend.triton_usable(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 to pretend the CPU is a fused-kernel device")
    monkeypatch.setattr(attn_mod, "_auto_order", lambda device: ("triton",))
    monkeypatch.setattr(attn_mod, "warn_once", _fresh_warn_once())
    q, k, v = make_qkv(1, 2, 8, 9, 44, torch.float16)
    with pytest.warns(UserWarning, match="head dims that are multiples of 8"):
        out = fastdiff.ops.attention(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastdiff.ops.attention(q, k, v)  # the second time: no warning
    q32 = make_qkv(1, 2, 8, 9, 40, torch.float32)[0]
    with pytest.warns(UserWarning, match="float16 and bfloat16"):
        assert attn_mod.choose_backend(q32) == "torch"


def _fresh_warn_once():
    seen = set()

    def warn_once(key, msg):
        if key not in seen:
            seen.add(key)
            warnings.warn(msg, stacklevel=3)

    return warn_once


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernel: a lane-level model of its fragment indexing (no GPU needed)


@pytest.mark.parametrize("dmax,warps,block_n,D,Sq,Skv", [
    (64, 2, 32, 40, 37, 53),    # D = 40: a k16 step of 8 real + 8 zero columns; 5 n8 output tiles
    (64, 2, 32, 64, 20, 77),    # cross-attention, ragged last key tile
    (128, 2, 32, 80, 40, 33),   # 80 = 5 k16 steps, 10 n8 tiles
    (160, 1, 64, 160, 16, 70),
    (256, 1, 32, 200, 16, 17),
    (64, 1, 16, 8, 16, 5),      # the smallest head dim
])
def test_cuda_kernel_fragment_model(dmax, warps, block_n, D, Sq, Skv):
    np = pytest.importorskip("numpy")
    from cuda_attention_model import run_cta

    rng = np.random.default_rng(D + Sq)
    q, k, v = (rng.standard_normal((n, D)).astype(np.float16) for n in (Sq, Skv, Skv))
    scale = D ** -0.5
    s = q.astype(np.float64) @ k.astype(np.float64).T * scale
    lse_ref = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    ref = np.exp(s - lse_ref[:, None]) @ v.astype(np.float64)
    eager = torch.softmax(torch.from_numpy(q) @ torch.from_numpy(k).T * scale, -1) @ torch.from_numpy(v)
    block_m = 16 * warps
    outs, lses = zip(*(run_cta(q, k, v, scale, dmax=dmax, warps=warps, block_n=block_n, m_block=m)
                       for m in range((Sq + block_m - 1) // block_m)))
    out, lse = np.concatenate(outs), np.concatenate(lses)
    assert not np.isnan(out).any()  # the model's stale shared memory is NaN: nothing unwritten was read
    assert np.abs(out - ref).max() <= 2 * np.abs(eager.double().numpy() - ref).max()
    assert np.abs(lse - lse_ref).max() < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs():
    q, k, v = make_qkv(1, 2, 8, 9, 16, torch.float32)
    att = fastdiff.ops.attention
    with pytest.raises(ValueError, match="q: expected 4 dims"):
        att(q[0], k, v)
    with pytest.raises(ValueError, match="k: expected 4 dims"):
        att(q, k[0], v)
    with pytest.raises(ValueError, match="k: expected shape"):
        att(q, torch.randn(2, 2, 9, 16), v)  # batch
    with pytest.raises(ValueError, match="k: expected shape"):
        att(q, torch.randn(1, 3, 9, 16), v)  # heads
    with pytest.raises(ValueError, match="v: expected shape"):
        att(q, k, torch.randn(1, 2, 9, 24))  # head dim
    with pytest.raises(ValueError, match="v: expected 9 keys"):
        att(q, k, torch.randn(1, 2, 10, 16))
    with pytest.raises(TypeError, match="k: expected dtype"):
        att(q, k.double(), v)
    with pytest.raises(ValueError, match="v: expected a tensor on"):
        att(q, k, v.to("meta"))
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        att(q.numpy(), k, v)
    with pytest.raises(TypeError, match="q: expected a floating-point"):
        att(q.long(), k, v)
    with pytest.raises(TypeError, match="scale"):
        att(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match="backend"):
        att(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="backend"):
        att(q, k, v, backend="cuda")  # a CPU tensor


@pytest.mark.triton
@needs_triton
def test_bad_inputs_explicit_fused_backend():
    if not _backend.triton_usable(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 to run Triton on CPU tensors")
    q, k, v = make_qkv(1, 2, 8, 9, 16, torch.float32)
    with pytest.raises(TypeError, match="q: the fused attention kernels take float16 and bfloat16"):
        fastdiff.ops.attention(q, k, v, backend="triton")
    q, k, v = make_qkv(1, 2, 8, 9, 44, torch.float16)
    with pytest.raises(ValueError, match="q: .*head dims that are multiples of 8 up to 256, got 44"):
        fastdiff.ops.attention(q, k, v, backend="triton")
    q, k, v = make_qkv(1, 2, 8, 9, 264, torch.float16)
    with pytest.raises(ValueError, match="got 264"):
        fastdiff.ops.attention(q, k, v, backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# Modules


def _ref_attention_module(m, x, context=None):
    ctx = x if context is None else context
    B, S, _ = x.shape
    q = (x @ m.to_q.weight.T).view(B, S, m.heads, m.dim_head).transpose(1, 2)
    k = (ctx @ m.to_k.weight.T).view(B, ctx.shape[1], m.heads, m.dim_head).transpose(1, 2)
    v = (ctx @ m.to_v.weight.T).view(B, ctx.shape[1], m.heads, m.dim_head).transpose(1, 2)
    o = reference.attention(q, k, v, m.scale).transpose(1, 2).reshape(B, S, -1)
    return o @ m.to_out.weight.T + m.to_out.bias


def test_attention_module_self_and_cross():
    m = fastdiff.nn.Attention(64, context_dim=48, heads=2, dim_head=40)
    assert m.to_q.bias is None and m.to_k.in_features == 48 and m.to_v.in_features == 48
    assert m.to_out.bias is not None and m.to_out.in_features == 80 and m.scale == 40 ** -0.5
    x, c = torch.randn(2, 37, 64), torch.randn(2, 13, 48)
    torch.testing.assert_close(m(x, c), _ref_attention_module(m, x, c))
    s = fastdiff.nn.Attention(64, heads=4, dim_head=16)
    torch.testing.assert_close(s(x), _ref_attention_module(s, x))
    x.requires_grad_()
    m(x, c).sum().backward()
    assert m.to_q.weight.grad is not None and x.grad is not None
    with pytest.raises(ValueError, match="context"):
        m(x, torch.randn(2, 13, 64))
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(2, 37, 32), c)
    with pytest.raises(ValueError, match="heads"):
        fastdiff.nn.Attention(64, heads=0)


def _ref_spatial(m, x):
    n, c, h, w = x.shape
    hn = F.group_norm(x, m.norm.num_groups, m.norm.weight, m.norm.bias, m.norm.eps)
    t = hn.flatten(2).transpose(1, 2)
    q, k, v = (t @ m.qkv.weight.T + m.qkv.bias).chunk(3, dim=-1)
    def split(z):
        return z.reshape(n, h * w, m.num_heads, -1).transpose(1, 2)

    o = reference.attention(split(q), split(k), split(v)).transpose(1, 2).reshape(n, h * w, c)
    y = o @ m.proj_out.weight.T + m.proj_out.bias
    return x + y.transpose(1, 2).reshape(n, c, h, w)


@needs_ext  # the fused GroupNorm
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_spatial_self_attention(fmt):
    m = fastdiff.nn.SpatialSelfAttention(64, num_head_channels=32)
    assert m.num_heads == 2 and isinstance(m.norm, fastdiff.nn.GroupNorm) and m.norm.num_groups == 32
    x = torch.randn(2, 64, 5, 7).to(memory_format=fmt)
    torch.testing.assert_close(m(x), x)  # proj_out starts at zero: the block is the identity
    torch.nn.init.normal_(m.proj_out.weight, std=0.1)
    torch.nn.init.normal_(m.proj_out.bias, std=0.1)
    y = m(x)
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, _ref_spatial(m, x), atol=1e-5, rtol=1e-5)
    x.requires_grad_()
    m(x).sum().backward()
    assert x.grad is not None and m.qkv.weight.grad is not None


def test_spatial_self_attention_arguments():
    assert fastdiff.nn.SpatialSelfAttention(64, num_heads=4).num_heads == 4
    assert fastdiff.nn.SpatialSelfAttention(16).norm.num_groups == 16  # fewer channels than groups
    with pytest.raises(ValueError, match="num_head_channels"):
        fastdiff.nn.SpatialSelfAttention(64, num_head_channels=24)
    with pytest.raises(ValueError, match="num_heads"):
        fastdiff.nn.SpatialSelfAttention(64, num_heads=3)
    with pytest.raises(ValueError, match="^num_groups: 32 GroupNorm groups do not divide the 48 channels"):
        fastdiff.nn.SpatialSelfAttention(48, num_groups=32)


@needs_ext
def test_compile_modules_fullgraph():
    """Both modules under torch.compile(fullgraph=True); the CPU uses the aot_eager backend (dynamo capture and AOT
    autograd through the ops' fake kernels, without minutes of C++ codegen); the GPU test below uses inductor."""
    m = fastdiff.nn.Attention(64, context_dim=32, heads=2, dim_head=40)
    x, c = torch.randn(2, 37, 64), torch.randn(2, 13, 32)
    torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="aot_eager")(x, c), m(x, c))
    s = fastdiff.nn.SpatialSelfAttention(64, num_head_channels=32)
    torch.nn.init.normal_(s.proj_out.weight, std=0.1)
    cs = torch.compile(s, fullgraph=True, backend="aot_eager")
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = torch.randn(2, 64, 4, 6).to(memory_format=fmt).requires_grad_()
        y = cs(xi)
        torch.testing.assert_close(y, s(xi))
        assert y.is_contiguous(memory_format=fmt)
        y.sum().backward()


@needs_ext
@pytest.mark.triton
@needs_triton
@interp_only
def test_compile_attention_module_triton_backend():
    m = fastdiff.nn.Attention(64, context_dim=32, heads=2, dim_head=40).half()
    x, c = torch.randn(2, 37, 64).half(), torch.randn(2, 13, 32).half().requires_grad_()
    with fastdiff.set_backend("triton"):
        y = torch.compile(m, fullgraph=True, backend="aot_eager")(x, c)
        torch.testing.assert_close(y, m(x, c))
        y.float().sum().backward()
    assert c.grad is not None and torch.isfinite(c.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# GPU (skipped without one): the SD / ADM shapes, bf16, the CUDA kernel, inductor


GPU_SHAPES = [(4096, 4096), (1024, 77), (37, 53)]


def _gpu_backends():
    out = []
    if HAS_EXT and _backend.has_cuda_ext():
        out.append("cuda")
    if attn_mod._HAS_TRITON_OPS:
        out.append("triton")
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Sq,Skv", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "packed"])
def test_gpu_forward(D, Sq, Skv, dtype, layout):
    q, k, v = make_qkv(2, 2, Sq, Skv, D, dtype, layout=layout, device="cuda")
    for backend in _gpu_backends():
        out = fastdiff.ops.attention(q, k, v, backend=backend)
        assert torch.isfinite(out).all(), backend
        assert_within_eager(out, q, k, v, what=f"{backend} out")


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Sq,Skv", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_grads(D, Sq, Skv, dtype):
    q, k, v = make_qkv(1, 2, Sq, Skv, D, dtype, layout="bshd", device="cuda")
    for backend in _gpu_backends():
        assert_grads_within_eager(lambda a, b, c, be=backend: fastdiff.ops.attention(a, b, c, backend=be), q, k, v)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [8, 24, 48, 56, 72, 96, 112, 136, 192, 200, 256])
def test_gpu_other_head_dims(D):
    q, k, v = make_qkv(2, 3, 300, 129, D, torch.float16, layout="packed", device="cuda")
    for backend in _gpu_backends():
        assert_within_eager(fastdiff.ops.attention(q, k, v, backend=backend), q, k, v, what=backend)


@pytest.mark.cuda
@needs_cuda_ext
def test_gpu_cuda_kernel_lse_unaligned_and_edges():
    q, k, v = make_qkv(2, 2, 130, 77, 40, torch.float16, device="cuda")
    out, lse = torch.ops.fastdiff.attention(q, k, v, 0.3)
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-4, rtol=1e-4)
    # a view starting 8 bytes into its buffer: copied to an aligned tensor by the launcher
    base = torch.randn(2 * 2 * 130 * 40 + 4, dtype=torch.float16, device="cuda")
    qu = base[4:].view(2, 2, 130, 40)
    torch.testing.assert_close(torch.ops.fastdiff.attention(qu, k, v, 0.3)[0],
                               torch.ops.fastdiff.attention(qu.clone(), k, v, 0.3)[0])
    out, lse = torch.ops.fastdiff.attention(q[:, :, :0], k, v, 0.3)
    assert out.shape == (2, 2, 0, 40)
    out, _ = torch.ops.fastdiff.attention(q, k[:, :, :0], v[:, :, :0], 0.3)
    assert (out == 0).all()
    a = torch.ops.fastdiff.attention(q, k, v, 0.3)[0]
    assert torch.equal(a, torch.ops.fastdiff.attention(q, k, v, 0.3)[0])  # deterministic


@pytest.mark.cuda
@needs_cuda_ext
def test_gpu_cuda_kernel_more_batches_than_grid_z():
    # B > 65535 (gridDim.z): the launcher splits the batch; the lse of every chunk lands in its place. Expanded k
    # (batch stride 0) too.
    B = 65535 + 3
    q = torch.randn(B, 1, 5, 16, dtype=torch.float16, device="cuda")
    k = torch.randn(1, 1, 7, 16, dtype=torch.float16, device="cuda").expand(B, 1, 7, 16)
    v = torch.randn(B, 1, 7, 16, dtype=torch.float16, device="cuda")
    out, lse = torch.ops.fastdiff.attention(q, k, v, 0.25)
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * 0.25
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.float(), torch.softmax(s, -1) @ v.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.cuda
def test_gpu_auto_order_and_fp32_fallback():
    q, k, v = make_qkv(1, 2, 64, 64, 64, torch.float16, device="cuda")
    assert attn_mod.choose_backend(q) == _gpu_backends()[0]
    q32, k32, v32 = (t.float() for t in (q, k, v))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = fastdiff.ops.attention(q32, k32, v32)
    assert_within_eager(out, q32, k32, v32)
    for backend in _gpu_backends():
        with pytest.raises(TypeError, match="float16 and bfloat16"):
            fastdiff.ops.attention(q32, k32, v32, backend=backend)


@pytest.mark.cuda
def test_gpu_opcheck():
    q, k, v = make_qkv(1, 2, 77, 93, 40, torch.float16, layout="bshd", device="cuda", requires_grad=True)
    if HAS_EXT and _backend.has_cuda_ext():
        torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, 0.2))
    if attn_mod._HAS_TRITON_OPS:
        torch.library.opcheck(torch.ops.fastdiff.attention_triton.default, (q, k, v, 0.2))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_compile_modules_inductor(backend):
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend} is not available")
    with fastdiff.set_backend(backend):
        m = fastdiff.nn.Attention(320, context_dim=768, heads=8, dim_head=40).cuda().half()
        x, c = torch.randn(2, 1024, 320, device="cuda").half(), torch.randn(2, 77, 768, device="cuda").half()
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(x, c), m(x, c), atol=2e-3, rtol=2e-3)
        s = fastdiff.nn.SpatialSelfAttention(256, num_head_channels=64).cuda().half()
        torch.nn.init.normal_(s.proj_out.weight, std=0.05)
        cs = torch.compile(s, fullgraph=True)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xi = torch.randn(2, 256, 16, 16, device="cuda").half().to(memory_format=fmt)
            y = cs(xi)
            assert y.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(y, s(xi), atol=2e-3, rtol=2e-3)
