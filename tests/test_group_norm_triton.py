"""The Triton GroupNorm ops (fastdiff/triton/group_norm.py) against the fp64 reference.

On a machine without a GPU run them with the interpreter, which must be switched on before Triton is imported:
    TRITON_INTERPRET=1 python -m pytest -q tests/test_group_norm_triton.py
Shapes are small because the interpreter runs every program one by one in numpy.
"""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a GPU, or TRITON_INTERPRET=1 set before Triton is imported",
                allow_module_level=True)
pytest.importorskip("triton")

import importlib  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import reference  # noqa: E402

# the module, not the function of the same name that fastdiff.ops re-exports
gn_ops = importlib.import_module("fastdiff.ops.group_norm")
if not gn_ops._HAS_TRITON_OPS:
    pytest.skip("fastdiff.triton.group_norm failed to import", allow_module_level=True)

import fastdiff.triton.group_norm as tgn  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cpu" if INTERPRET else "cuda"
OPS = torch.ops.fastdiff
EPS = 1e-5

# (dtype, tolerance): the kernels compute in fp32, so the error is mostly the rounding of the outputs to the
# dtype (half an ulp: 6e-8, 4.9e-4, 3.9e-3 relative) plus fp32 accumulation; tolerances leave a few x margin.
DTYPES = [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]

# (shape, num_groups): 10 channels per group, 1-D, 3-D, 0-D spatial, spatial size 1, odd spatial extent.
SHAPES = [((2, 40, 5, 7), 4), ((1, 8, 3), 2), ((2, 16, 2, 3, 4), 4), ((3, 6), 3), ((2, 6, 1), 2),
          ((1, 4, 9, 7), 1)]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every output and scratch buffer starts as NaN, so an element the kernels fail to write fails a test."""
    monkeypatch.setattr(tgn, "_POISON", True)


def _layout(x, channels_last):
    """x with C innermost (the spatial dims in order, then N), as channels_last(_3d) gives for 4-D/5-D."""
    if not channels_last:
        return x.contiguous()
    d = x.dim()
    perm = (0,) + tuple(range(2, d)) + (1,)
    inv = (0, d - 1) + tuple(range(1, d - 1))
    return x.permute(perm).contiguous().permute(inv)


def _inputs(shape, dtype, channels_last, params, seed=0, loc=0.0, spread=1.0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g)

    N, C = shape[0], shape[1]
    x = _layout((loc + spread * rnd(*shape)).to(DEVICE, dtype), channels_last)
    w = b = s = t = None
    if "w" in params:
        w = (1 + 0.5 * rnd(C)).to(DEVICE, dtype)
    if "b" in params:
        b = rnd(C).to(DEVICE, dtype)
    if "s" in params or "t" in params:
        # scale, shift: the two halves of one (N, 2C) Linear output, non-contiguous views (row stride 2C)
        st = (0.5 * rnd(N, 2 * C)).to(DEVICE, dtype)
        s, t = st.chunk(2, dim=1)
        s = s if "s" in params else None
        t = t if "t" in params else None
    gy = rnd(*shape).to(DEVICE, dtype)
    return x, w, b, s, t, gy


def _reference(x, w, b, s, t, gy, G, act):
    """fp64 forward and the five gradients (None for an absent parameter) from autograd. x is made contiguous:
    torch's CPU group_norm on a channels-last input loses digits when |mean| >> std, even in fp64."""
    leaves = [None if p is None else p.detach().double().contiguous().requires_grad_()
              for p in (x, w, b, s, t)]
    y = reference.group_norm(leaves[0], G, leaves[1], leaves[2], EPS, scale=leaves[3], shift=leaves[4],
                             activation=act)
    y.backward(gy.double())
    return y.detach(), [None if p is None else p.grad for p in leaves]


def _check_close(out, ref, tol, what, scale=1.0):
    """|out - ref| <= tol (|ref| + max(scale, max |ref|)): relative, with a floor at the tensor's size."""
    assert out.dtype != torch.float64
    scale = max(scale, ref.abs().max().item()) if ref.numel() else scale
    torch.testing.assert_close(out.double(), ref, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def _run_and_compare(shape, G, dtype, tol, channels_last, params, act, **kw):
    x, w, b, s, t, gy = _inputs(shape, dtype, channels_last, params, **kw)
    leaves = [None if p is None else p.detach().clone().requires_grad_() for p in (x, w, b, s, t)]
    y = fastdiff.ops.group_norm(leaves[0], G, leaves[1], leaves[2], EPS, scale=leaves[3], shift=leaves[4],
                                activation=act, backend="triton")
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()  # layout kept
    y.backward(gy)
    y_ref, grads_ref = _reference(x, w, b, s, t, gy, G, act)
    _check_close(y.detach(), y_ref, tol, "y")
    # grad_x = P gz + Q (x - mean) + R: its terms, of size rstd |w (1 + s)| |gy|, cancel when a group is tiny
    # (rstd is 70 for a group of two values), and the error follows the terms, not their sum.
    xg = x.double().reshape(shape[0], G, -1)
    rstd = (xg.var(-1, unbiased=False) + EPS).rsqrt().max().item() if x.numel() else 1.0
    g = 1.0 if w is None else w.abs().max().item()
    g *= 1.0 if s is None else (1 + s.double()).abs().max().item()
    terms = rstd * g * (gy.abs().max().item() if x.numel() else 0.0)
    for name, leaf, g_ref in zip(("x", "weight", "bias", "scale", "shift"), leaves, grads_ref):
        if leaf is not None:
            _check_close(leaf.grad, g_ref, 2 * tol, f"grad_{name}", scale=terms if name == "x" else 1.0)
    return y


# Every shape in both layouts, except channels-last for 2-D (N, C) inputs, which have none.
LAYOUT_CASES = [pytest.param(shape, G, cl, id="x".join(map(str, shape)) + ("-nhwc" if cl else "-nchw"))
                for shape, G in SHAPES for cl in (False, True) if not (cl and len(shape) == 2)]


@pytest.mark.parametrize("params,act", [("wbst", "silu"), ("", None)], ids=["wbst-silu", "plain"])
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,G,channels_last", LAYOUT_CASES)
def test_matches_reference(shape, G, dtype, tol, params, act, channels_last):
    _run_and_compare(shape, G, dtype, tol, channels_last, params, act)


@pytest.mark.parametrize("params", ["w", "b", "s", "t", "wt", "bs", "wbs"])
def test_parameter_subsets(params):
    """Each parameter on its own and in pairs: the HAS_* branches are independent."""
    _run_and_compare((2, 20, 3, 5), 2, torch.float32, 2e-5, True, params, "silu")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("programs", [1, 10, 1000])
def test_split_and_tile_loops(monkeypatch, channels_last, programs):
    """Tiny tiles, so that the interpreter covers what large shapes do on a GPU: several tiles per program
    (Chan merges across tiles), several spatial splits with a ragged last one, and merges that loop over
    channel blocks."""
    monkeypatch.setattr(tgn, "_TILE", 32)
    monkeypatch.setattr(tgn, "_MAX_BLOCK_S", 8)
    monkeypatch.setattr(tgn, "_CL_BLOCK_C", 8)
    monkeypatch.setattr(tgn, "_target_programs", lambda device: programs)
    _run_and_compare((1, 20, 5, 7), 2, torch.float32, 2e-5, channels_last, "wbst", "silu")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_mean_small_spread(monkeypatch, channels_last):
    """x = 1000 + 0.01 randn, fp32: E[x^2] - E[x]^2 would lose every digit of the variance. Shifted data
    (x - K, K = the group's first element) and Chan merges keep the statistics to about an ulp, and the
    output, computed as A ((x - K) - mean(x - K)) + B, keeps them too although A = rstd w (1 + s) is about
    300 here. The gradients go through the fp32 mean (the op's interface), whose rounding (ulp(1000)/2 = 3e-5,
    3e-3 of a standard deviation) limits their relative accuracy to a few 1e-3 (C++ CPU op: 2-3x worse)."""
    monkeypatch.setattr(tgn, "_TILE", 256)  # several tiles per program: Chan merges across tiles
    monkeypatch.setattr(tgn, "_MAX_BLOCK_S", 16)
    monkeypatch.setattr(tgn, "_CL_BLOCK_C", 8)
    shape, G = (2, 40, 5, 7), 4
    x, w, b, s, t, gy = _inputs(shape, torch.float32, channels_last, "wbst", loc=1000.0, spread=0.01)
    y, mean, rstd = OPS.group_norm_triton(x, G, w, b, s, t, EPS, "silu")
    y_ref, grads_ref = _reference(x, w, b, s, t, gy, G, "silu")
    _check_close(y, y_ref, 1e-5, "y")
    xg = x.double().reshape(shape[0], G, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), atol=4e-5, rtol=0)  # 1000's ulp is 6.1e-5
    torch.testing.assert_close(rstd.double(), (xg.var(-1, unbiased=False) + EPS).rsqrt(), atol=0, rtol=1e-6)
    grads = OPS.group_norm_backward_triton(gy, x, mean, rstd, G, w, b, s, t, "silu")
    for name, g, g_ref in zip(("x", "weight", "bias", "scale", "shift"), grads, grads_ref):
        _check_close(g, g_ref, 5e-3, f"grad_{name}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_overflowing_variance_is_not_clamped_to_zero(monkeypatch, channels_last):
    """|x| ~ 1e20 in fp32: the squares overflow. The first tile's Chan term delta^2 * na * f was inf * 0 = NaN,
    which the merge's max(var, 0) turned into a variance of 0: rstd = 1/sqrt(eps) and a finite y of ~3e22,
    silently. Now the variance is inf and rstd 0, as torch's NCHW group_norm (y = the affine's bias)."""
    monkeypatch.setattr(tgn, "_MAX_BLOCK_S", 4)  # several tiles, so later tiles' merge terms overflow too
    monkeypatch.setattr(tgn, "_CL_BLOCK_C", 2)
    x, w, b, _, _, _ = _inputs((2, 4, 3, 3), torch.float32, channels_last, "wb", spread=1e20)
    y, mean, rstd = OPS.group_norm_triton(x, 2, w, b, None, None, EPS, "none")
    assert torch.equal(rstd, torch.zeros_like(rstd))
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x.contiguous(), 2, w, b, EPS))
    torch.testing.assert_close(y, b.view(1, 4, 1, 1).expand_as(y))


@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 8, 0), (0, 8), (2, 0, 3)])
def test_empty(shape):
    """N = 0 returns without launching; an empty spatial extent gives mean 0 and rstd 1/sqrt(eps), like the
    C++ op; every gradient of an empty input is zero."""
    x, w, b, s, t, gy = _inputs(shape, torch.float32, False, "wbst")
    y, mean, rstd = OPS.group_norm_triton(x, 2, w, b, s, t, EPS, "silu")
    assert y.shape == x.shape and mean.shape == rstd.shape == (shape[0], 2) and mean.dtype == torch.float32
    assert torch.all(mean == 0) and torch.allclose(rstd, torch.full_like(rstd, EPS ** -0.5))
    gx, gw, gb, gs, gt = OPS.group_norm_backward_triton(gy, x, mean, rstd, 2, w, b, s, t, "silu")
    assert gx.shape == x.shape
    for g, p in ((gw, w), (gb, b), (gs, s), (gt, t)):
        assert g.shape == p.shape and g.dtype == p.dtype and torch.all(g == 0)


def test_absent_parameters_give_empty_gradients():
    """The C++ contract: the gradient of a parameter that was None is an empty (0,) tensor."""
    x, w, b, s, t, gy = _inputs((2, 8, 3, 3), torch.float32, False, "w")
    y, mean, rstd = OPS.group_norm_triton(x, 2, w, None, None, None, EPS, "none")
    gx, gw, gb, gs, gt = OPS.group_norm_backward_triton(gy, x, mean, rstd, 2, w, None, None, None, "none")
    assert gw.shape == (8,) and gb.shape == gs.shape == gt.shape == (0,)


@pytest.mark.skipif(not fastdiff.info()["cpu_extension"], reason="needs the compiled CPU extension")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_agrees_with_cpu_op(channels_last):
    """Same outputs (shapes, dtypes, strides, values) as the C++ op that defines the contract."""
    x, w, b, s, t, gy = _inputs((2, 40, 5, 7), torch.float32, channels_last, "wst")
    tri = OPS.group_norm_triton(x, 4, w, b, s, t, EPS, "silu")
    args = (x.cpu(), 4, w.cpu(), None, s.cpu(), t.cpu())
    cpu = OPS.group_norm(*args, EPS, "silu")
    tri_b = OPS.group_norm_backward_triton(gy, x, tri[1], tri[2], 4, w, b, s, t, "silu")
    cpu_b = OPS.group_norm_backward(gy.cpu(), x.cpu(), cpu[1], cpu[2], *args[1:], "silu")
    for a, c in zip(tri + tri_b, cpu + cpu_b):
        assert a.shape == c.shape and a.dtype == c.dtype
        if a.numel():
            assert a.stride() == c.stride()
            torch.testing.assert_close(a.cpu(), c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic(monkeypatch, dtype):
    """Fixed reduction order, no atomics: two runs are bit-identical (with several splits per group)."""
    monkeypatch.setattr(tgn, "_MAX_BLOCK_S", 8)
    monkeypatch.setattr(tgn, "_target_programs", lambda device: 20)
    x, w, b, s, t, gy = _inputs((2, 20, 5, 7), dtype, False, "wbst")
    runs = []
    for _ in range(2):
        y, mean, rstd = OPS.group_norm_triton(x, 2, w, b, s, t, EPS, "silu")
        grads = OPS.group_norm_backward_triton(gy, x, mean, rstd, 2, w, b, s, t, "silu")
        runs.append((y, mean, rstd) + grads)
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("x_cl", [False, True], ids=["x-nchw", "x-nhwc"])
def test_grad_y_layout(x_cl):
    """grad_y in another layout (or not dense at all) is brought to x's: the same bits as a matching one."""
    x, w, b, s, t, gy = _inputs((2, 8, 3, 5), torch.float32, x_cl, "wbst")
    y, mean, rstd = OPS.group_norm_triton(x, 2, w, b, s, t, EPS, "silu")
    same = OPS.group_norm_backward_triton(_layout(gy, x_cl), x, mean, rstd, 2, w, b, s, t, "silu")
    wide = torch.zeros(2, 8, 3, 10, device=DEVICE)
    wide[..., ::2] = gy
    for other in (_layout(gy, not x_cl), wide[..., ::2]):
        got = OPS.group_norm_backward_triton(other, x, mean, rstd, 2, w, b, s, t, "silu")
        for a, c in zip(got, same):
            assert torch.equal(a, c)


def test_bad_inputs():
    x = torch.randn(2, 8, 3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="num_groups"):
        OPS.group_norm_triton(x, 3, None, None, None, None, EPS, "none")
    with pytest.raises(ValueError, match="channels-last"):
        OPS.group_norm_triton(x.transpose(2, 3), 2, None, None, None, None, EPS, "none")
    with pytest.raises(ValueError, match="weight"):
        OPS.group_norm_triton(x, 2, torch.ones(4, device=DEVICE), None, None, None, EPS, "none")
    with pytest.raises(ValueError, match="activation"):
        OPS.group_norm_triton(x, 2, None, None, None, None, EPS, "gelu")


# Under the interpreter wrap_triton returns the raw interpreted kernel, which AOTAutograd cannot trace, so
# test_aot_dispatch_dynamic (the torch.compile path) runs only on a GPU.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
if not INTERPRET:
    OPCHECK_UTILS += ("test_aot_dispatch_dynamic",)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("params", ["wbst", ""], ids=["wbst", "plain"])
def test_opcheck(channels_last, params):
    x, w, b, s, t, gy = _inputs((2, 8, 3, 5), torch.float32, channels_last, params)
    act = "silu" if params else "none"
    args = (x.requires_grad_(), 2, w, b, s, t, EPS, act)
    torch.library.opcheck(OPS.group_norm_triton.default, args, test_utils=OPCHECK_UTILS)
    y, mean, rstd = OPS.group_norm_triton(x.detach(), 2, w, b, s, t, EPS, act)
    torch.library.opcheck(OPS.group_norm_backward_triton.default,
                          (gy, x.detach(), mean, rstd, 2, w, b, s, t, act), test_utils=OPCHECK_UTILS)
