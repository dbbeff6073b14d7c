"""The CUDA kernels' own source (csrc/cuda/group_norm.cu, sampler_step.cu), run on the CPU by tests/cuemu.

No GPU is needed: tests/cuemu/build.py compiles the .cu files with g++ against a fiber runtime that runs every
CUDA thread of a block (see tests/cuemu/cuemu.h for what it models and what it does not). The host code of each
op runs as written too: the plan, the scratch layout, the launches and their configurations. Each case runs
under three schedules (threads and blocks in order, reversed, shuffled) that must give bit-identical results:
a missing barrier or an order-dependent merge shows up as a difference, a read of shared memory or scratch no
thread wrote as NaN. This is not a GPU run: timing, the memory model and the GPU's own float intrinsics are
not modelled, and the `-m cuda` tests, compute-sanitizer and the benchmarks are still needed on a GPU.
"""
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

import fastdiff
from fastdiff import reference

from test_group_norm import GRAD_TOL, TOL, make_inputs, ref_fp64, to_layout
from test_sampler_step import _table as _step_table

pytestmark = pytest.mark.cuemu

HERE = Path(__file__).resolve().parent
SCHEDULES = (0, 1, 2)  # in order, reversed, shuffled


def _load_builder():
    spec = importlib.util.spec_from_file_location("cuemu_build", HERE / "cuemu" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def emu():
    if not fastdiff.info()["cpu_extension"]:
        pytest.skip("the extension is not built: the emulated ops take their schemas from fastdiff._C")
    if not sys.platform.startswith("linux") or shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("cuemu needs Linux (ucontext fibers), a C++ compiler and ninja")
    builder = _load_builder()
    if builder.cuda_include_dir() is None:
        pytest.skip("cuemu needs the CUDA toolkit's headers (cuda_fp16.h): set CUDA_HOME")
    m = builder.load()  # a build error fails here: it is not a skip
    yield m
    m.configure(132, 0, 1)


def run_all_schedules(emu, fn, sms=132):
    """fn() under each schedule; the results must be bit-identical (NaN where NaN): returns the first."""
    outs = []
    for s in SCHEDULES:
        emu.configure(sms, s, 7 + s)
        outs.append(fn())
    emu.configure(132, 0, 1)
    flat = [o if isinstance(o, (tuple, list)) else (o,) for o in outs]
    for s, o in zip(SCHEDULES[1:], flat[1:]):
        for i, (a, b) in enumerate(zip(flat[0], o)):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), (
                f"output {i} differs between schedule 0 and schedule {s}: a race or an order-dependent reduction")
    return outs[0]


def misaligned_copy(t):
    """t's values and strides, one element past an aligned address (a view into a larger buffer)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    v = buf[1:].as_strided(t.shape, t.stride())
    v.copy_(t)
    return v


def gn_forward(x, G, p, act, eps=1e-5):
    return torch.ops.fastdiff_emu.group_norm(x, G, p.get("weight"), p.get("bias"), p.get("scale"), p.get("shift"),
                                             eps, act or "")


# ---- the emulator itself ---------------------------------------------------------------------------------------

SELFTESTS = [  # which, schedules that must expose the planted bug, what they show
    (0, (1, 2), "nan", "a shared-memory read without its __syncthreads"),
    (1, (0, 1, 2), "nan", "a read of shared memory no thread of the block wrote"),
    (2, (0, 1, 2), "divergent __syncthreads", "threads waiting at two different barriers"),
    (3, (0, 1, 2), "deadlock", "a full-mask shuffle after half the warp returned"),
    (5, (0, 1, 2), "misaligned address", "a 16-byte load at a 4-byte offset"),
    (6, (0, 1, 2), "invalid configuration", "1025 threads per block"),
    (7, (0, 1, 2), "invalid configuration", "an empty grid"),
]


@pytest.mark.parametrize("which,schedules,shows,what", SELFTESTS, ids=[s[3] for s in SELFTESTS])
def test_emulator_catches_planted_bugs(emu, which, schedules, shows, what):
    # the same kernel without its bug runs clean under every schedule
    for s in SCHEDULES:
        emu.configure(132, s, 3)
        assert not emu.selftest(which, True).isnan().any()
    for s in schedules:
        emu.configure(132, s, 3)
        if shows == "nan":
            assert emu.selftest(which, False).isnan().any(), f"schedule {s} missed {what}"
        else:
            with pytest.raises(RuntimeError, match=shows):
                emu.selftest(which, False)
    emu.configure(132, 0, 1)


def test_emulator_warp_shuffles(emu):
    out = emu.selftest(4, True)  # a butterfly sum over each warp of 64 threads
    assert torch.equal(out[:64], torch.full((64,), 496.0))


# ---- GroupNorm ---------------------------------------------------------------------------------------------------

SHAPES = [
    ((3, 20, 7, 9), 2),      # odd spatial
    ((2, 12, 17), 3),        # 1-D
    ((2, 8, 3, 4, 5), 4),    # 3-D
    ((4, 6), 3),             # no spatial dims
    ((1, 64, 1, 1), 32),     # one value per channel
    ((2, 72, 5, 6), 8),      # channels-last columns over several CTAs, a partial one
    ((1, 6, 50, 50), 2),     # chunks that straddle channel boundaries
    ((2, 40, 33, 17), 4),    # rows that start mid-vector (S = 561)
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G", SHAPES, ids=[str(s[0]) for s in SHAPES])
@pytest.mark.parametrize("affine,ada,act", [(True, True, "silu"), (False, False, None)], ids=["ada-silu", "plain"])
def test_group_norm_forward(emu, dtype, channels_last, shape, G, affine, ada, act):
    x, p = make_inputs(shape, G, dtype, "cpu", affine=affine, ada=ada, channels_last=channels_last)
    y, mean, rstd = run_all_schedules(emu, lambda: gn_forward(x, G, p, act))
    ref = ref_fp64(x, G, p, act)
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)
    xs = x.double().reshape(shape[0], G, -1)
    torch.testing.assert_close(mean.double(), xs.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), (xs.var(-1, unbiased=False) + 1e-5).rsqrt(), atol=1e-4, rtol=1e-4)


def _backward_case(emu, x, p, G, act, gy, sms=132):
    emu.configure(sms, 0, 1)
    _, mean, rstd = gn_forward(x, G, p, act)
    got = run_all_schedules(emu, lambda: torch.ops.fastdiff_emu.group_norm_backward(
        gy, x, mean, rstd, G, p.get("weight"), p.get("bias"), p.get("scale"), p.get("shift"), act or ""), sms=sms)
    names = ("x", "weight", "bias", "scale", "shift")
    leaves = [x.detach().double().requires_grad_(True)] + [
        p[k].detach().double().requires_grad_(True) if k in p else None for k in names[1:]]
    ref = reference.group_norm(leaves[0], G, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4],
                               activation=act, compute_dtype=torch.float64)
    present = [(n, g, t) for n, g, t in zip(names, got, leaves) if t is not None]
    want = torch.autograd.grad(ref, [t for _, _, t in present], gy.double())
    for (name, g, _), w in zip(present, want):
        tol = GRAD_TOL[x.dtype] * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=GRAD_TOL[x.dtype],
                                   msg=lambda m, name=name: f"grad {name}: {m}")
    for name, g in zip(names, got):
        if name not in ("x",) and name not in p:
            assert g.numel() == 0
    assert got[0].stride() == x.stride()
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G", SHAPES, ids=[str(s[0]) for s in SHAPES])
@pytest.mark.parametrize("affine,ada,act", [(True, True, "silu"), (False, True, None), (True, False, None)],
                         ids=["ada-silu", "ada", "affine"])
def test_group_norm_backward(emu, dtype, channels_last, shape, G, affine, ada, act):
    x, p = make_inputs(shape, G, dtype, "cpu", affine=affine, ada=ada, channels_last=channels_last)
    gy = to_layout(torch.randn(shape, dtype=torch.float64).to(dtype), channels_last)
    _backward_case(emu, x, p, G, act, gy)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_sd15_shape_fp16(emu, channels_last):
    """(2, 320, 64, 64) at 32 groups, fp16: the issue's shape, 640 CTAs per pass on a 132-SM plan."""
    shape, G = (2, 320, 64, 64), 32
    x, p = make_inputs(shape, G, torch.float16, "cpu", channels_last=channels_last)
    emu.configure(132, 2, 11)
    y, mean, rstd = gn_forward(x, G, p, "silu")
    ref = ref_fp64(x, G, p, "silu")
    atol, rtol = TOL[torch.float16]
    torch.testing.assert_close(y.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)
    gy = to_layout(torch.randn(shape).half(), channels_last)
    g = torch.ops.fastdiff_emu.group_norm_backward(gy, x, mean, rstd, G, p["weight"], p["bias"], p["scale"],
                                                   p["shift"], "silu")
    want = torch.ops.fastdiff.group_norm_backward(gy, x, mean, rstd, G, p["weight"], p["bias"], p["scale"],
                                                  p["shift"], "silu")  # the CPU kernel (tested against fp64)
    for a, b in zip(g, want):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2 * max(1.0, b.abs().max().item()), rtol=2e-2)
    emu.configure(132, 0, 1)


@pytest.mark.parametrize("sms", [1, 8, 132, 1024])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G", [((1, 6, 50, 50), 2), ((2, 64, 33, 17), 8), ((1, 16, 128, 96), 4)],
                         ids=["straddle", "odd", "long-rows"])
def test_group_norm_plans_for_other_gpus(emu, sms, channels_last, shape, G):
    """The plan splits rows into more chunks the more SMs the GPU has: every split must give the same answer."""
    x, p = make_inputs(shape, G, torch.float32, "cpu", channels_last=channels_last)
    y, _, _ = run_all_schedules(emu, lambda: gn_forward(x, G, p, "silu"), sms=sms)
    ref = ref_fp64(x, G, p, "silu")
    torch.testing.assert_close(y.double(), ref, atol=2e-5 * max(1.0, ref.abs().max().item()), rtol=2e-5)
    gy = to_layout(torch.randn(shape), channels_last)
    try:
        _backward_case(emu, x, p, G, "silu", gy, sms=sms)
    finally:
        emu.configure(132, 0, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_misaligned_views(emu, dtype, channels_last):
    """x (and grad_y) one element past a 16-byte boundary: the kernels must take the scalar path, not fault."""
    shape, G = (2, 24, 9, 10), 4
    x0, p = make_inputs(shape, G, dtype, "cpu", channels_last=channels_last)
    x = misaligned_copy(x0)
    y, _, _ = run_all_schedules(emu, lambda: gn_forward(x, G, p, "silu"))
    ref = ref_fp64(x, G, p, "silu")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)
    gy = misaligned_copy(to_layout(torch.randn(shape).to(dtype), channels_last))
    _backward_case(emu, x, p, G, "silu", gy)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_large_mean_small_spread(emu, channels_last):
    x, p = make_inputs((2, 40, 9, 11), 4, torch.float32, "cpu", channels_last=channels_last, mean=1000.0,
                       spread=0.01)
    y, _, _ = run_all_schedules(emu, lambda: gn_forward(x, 4, p, "silu"))
    ref = ref_fp64(x, 4, p, "silu")
    torch.testing.assert_close(y.double(), ref, atol=2e-4, rtol=2e-4)


def test_group_norm_grad_y_in_the_other_layout_and_strided_params(emu):
    shape, G = (2, 16, 6, 7), 4
    x, p = make_inputs(shape, G, torch.float32, "cpu", channels_last=True)
    ss = torch.randn(2, 32) * 0.5  # scale and shift: column halves of one (N, 2C) tensor (row stride 2C)
    p["scale"], p["shift"] = ss[:, :16], ss[:, 16:]
    gy = torch.randn(shape)  # NCHW while x is channels-last: the op copies it once
    _backward_case(emu, x, p, G, "silu", gy)


@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 8, 0, 3), (2, 0, 3)], ids=["N0", "H0", "C0"])
def test_group_norm_empty(emu, shape):
    N, C = shape[:2]
    x = torch.empty(shape)
    w, b, s = torch.randn(C), torch.randn(C), torch.randn(N, C)
    y, mean, rstd = torch.ops.fastdiff_emu.group_norm(x, 4, w, b, s, None, 1e-5, "silu")
    assert y.shape == x.shape and mean.shape == (N, 4)
    g = torch.ops.fastdiff_emu.group_norm_backward(torch.empty_like(x), x, mean, rstd, 4, w, b, s, None, "silu")
    assert g[0].shape == x.shape
    for got, p in zip(g[1:4], (w, b, s)):
        assert torch.equal(got, torch.zeros_like(p))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_silu_at_extreme_values(emu, channels_last):
    x, p = make_inputs((2, 8, 5, 7), 2, torch.float32, "cpu", channels_last=channels_last)
    p["scale"] = torch.full((2, 8), 1e4)  # z = +-1e4 and beyond: silu(z) = z or -0, never NaN
    y, _, _ = gn_forward(x, 2, p, "silu")
    ref = ref_fp64(x, 2, p, "silu")
    assert not y.isnan().any()
    torch.testing.assert_close(y.double(), ref, atol=1e-2, rtol=2e-5)


# ---- the sampler step --------------------------------------------------------------------------------------------

def _sampler_tensors(shape, dtype, layout, nbuf, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(scale=1.0):
        t = (torch.randn(shape, generator=g) * scale).to(dtype)
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "strided_rows":  # each sample dense, the batch stride larger
            return torch.cat([t, t], 0)[::2]
        if layout == "misaligned":  # one element past an aligned address: the non-vector path
            return misaligned_copy(t)
        return t

    x = mk() if layout != "strided_rows" else torch.randn(shape, generator=g).to(dtype)  # x itself must be dense
    m, u, z = mk(), mk(), mk()
    v = mk(0.3).abs() + 0.01
    bufs = [mk() for _ in range(nbuf)]
    return x, m, u, z, v, bufs


def _table(n, *, keep_row=None):
    """test_sampler_step's random, well-scaled coefficient table; KEEP (column 11) set on keep_row."""
    t = _step_table(n, "cpu")
    if keep_row is not None:
        t[keep_row, 11] = 1.0
    return t


def _step_both(emu, x, m, table, step, *, u=None, gs=1.0, z=None, bufs=(), v=None, thr=None, seed=5, var_mode=0,
               clip_mode=0, clip_range=1.0, stochastic=True):
    """The emulated CUDA op and the CPU op on the same arguments (each on its own copies of the history)."""
    def call(op, bs):
        bs = list(bs) + [None] * (3 - len(bs))
        return op(x, m, u, gs, table, torch.tensor(step), z, bs[0], v, thr, seed, var_mode, clip_mode, clip_range,
                  stochastic, bs[1], bs[2])

    def clone_like(t):
        c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
        c.copy_(t)
        return c

    eb = [clone_like(b) for b in bufs]
    cb = [clone_like(b) for b in bufs]

    def emu_call():
        bs = [clone_like(b) for b in eb]
        out = call(torch.ops.fastdiff_emu.sampler_step, bs)
        return (out, *bs)

    got = run_all_schedules(emu, emu_call)
    want = call(torch.ops.fastdiff.sampler_step, cb)
    return got[0], list(got[1:]), want, cb


SAMPLER_DTYPES = [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]


@pytest.mark.parametrize("dtype,tol", SAMPLER_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_rows", "misaligned"])
@pytest.mark.parametrize("nbuf", [0, 1, 2, 3])
def test_sampler_step_history_and_layouts(emu, dtype, tol, layout, nbuf):
    """CFG + Philox noise + 0-3 history buffers over three steps (the second a KEEP step), odd element count:
    the emulated CUDA kernel against the CPU kernel, outputs within rounding, the history moves bit-exact."""
    shape = (3, 5, 7, 9)  # 945 values a sample: not a multiple of 4
    x, m, u, _, _, bufs = _sampler_tensors(shape, dtype, layout, nbuf)
    table = _table(4, keep_row=1)
    for step in range(3):
        out, eb, want, cb = _step_both(emu, x, m, table, step, u=u, gs=2.5, bufs=bufs, clip_mode=1,
                                       clip_range=1.5)
        assert out.stride() == x.stride() or layout in ("strided_rows", "misaligned")
        torch.testing.assert_close(out.float(), want.float(), atol=tol * 4, rtol=tol)
        for a, b in zip(eb, cb):
            torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
        if step == 1:
            assert all(torch.equal(a, b) for a, b in zip(eb, bufs)), "KEEP must leave the history as it was"
        else:
            assert all(torch.equal(eb[i], bufs[i - 1]) for i in range(1, nbuf)), "the history moves bit-exact"
        bufs = eb
        x = out


@pytest.mark.parametrize("var_mode", [0, 1, 2], ids=["fixed", "learned", "learned_range"])
@pytest.mark.parametrize("noise", ["philox", "given", "off"])
@pytest.mark.parametrize("clip_mode", [0, 1, 2], ids=["none", "clip", "threshold"])
def test_sampler_step_noise_variance_and_clipping(emu, var_mode, noise, clip_mode):
    shape = (2, 4, 6, 5)
    x, m, _, z, v, bufs = _sampler_tensors(shape, torch.float32, "contiguous", 1, seed=var_mode)
    if var_mode == 2:
        v = v.clamp(max=1.0) * 2 - 1
    thr = (1.0 + torch.rand(shape[0])) if clip_mode == 2 else None
    out, eb, want, cb = _step_both(emu, x, m, _table(3), 1, z=z if noise == "given" else None, bufs=bufs,
                                   v=v if var_mode else None, thr=thr, var_mode=var_mode, clip_mode=clip_mode,
                                   clip_range=1.2, stochastic=noise != "off", seed=123456789)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eb[0], cb[0], atol=1e-6, rtol=1e-6)


def test_sampler_step_single_sample_and_tiny(emu):
    for shape in [(1, 3, 5, 5), (2, 1), (1, 3)]:
        x, m, u, _, _, bufs = _sampler_tensors(shape, torch.float32, "contiguous", 2)
        out, eb, want, cb = _step_both(emu, x, m, _table(2), 0, u=u, gs=3.0, bufs=bufs)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        for a, b in zip(eb, cb):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_sampler_step_step_clamped_on_the_device(emu):
    x, m, _, _, _, _ = _sampler_tensors((2, 3, 4, 4), torch.float32, "contiguous", 0)
    table = _table(3)
    for step, row in [(-5, 0), (2, 2), (99, 2)]:
        a, _, _, _ = _step_both(emu, x, m, table, step, stochastic=False)
        b, _, _, _ = _step_both(emu, x, m, table, row, stochastic=False)
        assert torch.equal(a, b)


# ---- attention (mma.sync / ldmatrix / cp.async modelled per warp: see cuemu.h) -------------------------------------

def _attn_ref(q, k, v, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


ATTN_CASES = [  # (B, H, Sq, Skv, D): every head-dim bucket, ragged query and key tiles
    (1, 2, 77, 50, 40),
    (2, 1, 130, 200, 64),
    (1, 2, 65, 33, 80),
    (1, 1, 129, 97, 128),
    (1, 1, 70, 90, 160),
    (1, 1, 40, 40, 256),
    (3, 1, 1, 1, 8),
    (1, 1, 16, 77, 72),   # cross-attention with CLIP's 77 tokens, a head dim between buckets
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B,H,Sq,Skv,D", ATTN_CASES, ids=[f"d{c[4]}-{c[2]}x{c[3]}" for c in ATTN_CASES])
def test_attention_forward(emu, dtype, B, H, Sq, Skv, D):
    g = torch.Generator().manual_seed(D)
    q, k, v = (torch.randn(B, H, s, D, generator=g).to(dtype) for s in (Sq, Skv, Skv))
    scale = D ** -0.5
    out, lse = run_all_schedules(emu, lambda: torch.ops.fastdiff_emu.attention(q, k, v, scale))
    ref, ref_lse = _attn_ref(q, k, v, scale)
    tol = 4e-3 if dtype == torch.float16 else 2e-2
    assert out.dtype == dtype and out.shape == (B, H, Sq, D)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


def test_attention_views_and_misaligned_rows(emu):
    """(B, S, H, D) views (the layout a fused QKV projection leaves) read in place, and rows that are not
    16-byte aligned (the host copies them): both equal to the reference."""
    B, S, H, D = 2, 37, 3, 40
    qkv = torch.randn(B, S, 3, H, D).half()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out, _ = run_all_schedules(emu, lambda: torch.ops.fastdiff_emu.attention(q, k, v, 0.2))
    ref, _ = _attn_ref(q, k, v, 0.2)
    torch.testing.assert_close(out.double(), ref, atol=4e-3, rtol=4e-3)
    buf = torch.randn(B * H * S * D + 1).half()
    qm = buf[1:].view(B, H, S, D)  # 2-byte offset
    out, _ = torch.ops.fastdiff_emu.attention(qm, k, v, 0.2)
    ref, _ = _attn_ref(qm, k, v, 0.2)
    torch.testing.assert_close(out.double(), ref, atol=4e-3, rtol=4e-3)


def test_attention_on_a_gpu_with_99_kb_of_shared_memory(emu):
    """sm86 / sm89 / sm120 let a block opt in to 99 KB: head dims 136-160 take the smaller tile there (the
    107-KB one would fail to launch), and give the same answer."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, s, 160, generator=g).half() for s in (70, 90, 90))
    try:
        emu.configure(84, 2, 3, 99 * 1024)
        out, _ = torch.ops.fastdiff_emu.attention(q, k, v, 0.08)
    finally:
        emu.configure(132, 0, 1)
    ref, _ = _attn_ref(q, k, v, 0.08)
    torch.testing.assert_close(out.double(), ref, atol=4e-3, rtol=4e-3)


def test_attention_empty_keys_and_queries(emu):
    q = torch.randn(1, 2, 5, 64).half()
    out, lse = torch.ops.fastdiff_emu.attention(q, q[:, :, :0], q[:, :, :0], 0.125)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out, lse = torch.ops.fastdiff_emu.attention(q[:, :, :0], q, q, 0.125)
    assert out.shape == (1, 2, 0, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_grid_fills_an_h100(emu, dtype, channels_last):
    """The issue's design rule, read from the launches the host code makes: (2, 320, 64, 64) at 32 groups is not
    one CTA per (n, group) (64 CTAs on 132 SMs) but >= 4 CTAs per SM in the statistics and apply passes (640 of
    256 threads), then one merge CTA per (n, group); the backward the same. And the forward moves x and y in
    16-byte vectors only (x read twice, y written once), in both layouts, with groups of 10 channels."""
    shape, G = (2, 320, 64, 64), 32
    x, p = make_inputs(shape, G, dtype, "cpu", channels_last=channels_last)
    emu.configure(132, 0, 1)
    emu.launch_log(True)
    v0 = emu.stats()[3]
    _, mean, rstd = gn_forward(x, G, p, "silu")
    # every value of x read twice and y written once in 16-byte vectors (10 channels a group: vectors of 4 or 8
    # straddle groups, without padding), apart from one pivot value per group
    assert emu.stats()[3] - v0 == 3 * x.numel() * x.element_size() // 16
    fwd = emu.launch_log(True)
    assert [grid for grid, _, _, _ in fwd] == [(640, 1, 1), (64, 1, 1), (640, 1, 1)]
    assert all(block == (256, 1, 1) for _, block, _, _ in fwd)
    torch.ops.fastdiff_emu.group_norm_backward(x, x, mean, rstd, G, p["weight"], p["bias"], p["scale"],
                                               p["shift"], "silu")
    bwd = emu.launch_log(True)
    assert [grid for grid, _, _, _ in bwd][:3] == [(640, 1, 1), (64, 1, 1), (640, 1, 1)]
    assert len(bwd) == 4  # + the per-channel weight/bias sums


def test_every_launch_is_on_the_current_stream(emu):
    """Each op launches on at::cuda::getCurrentCUDAStream() (the issue's rule; a launch without a stream would
    go to the legacy default stream and break stream ordering and CUDA-graph capture)."""
    x, p = make_inputs((2, 16, 5, 6), 4, torch.float16, "cpu", channels_last=True)
    emu.launch_log(True)
    y, mean, rstd = gn_forward(x, 4, p, "silu")
    torch.ops.fastdiff_emu.group_norm_backward(y, x, mean, rstd, 4, p["weight"], p["bias"], p["scale"],
                                               p["shift"], "silu")
    xs, m, u, _, _, bufs = _sampler_tensors((2, 3, 4, 4), torch.float32, "contiguous", 1)
    _step_both(emu, xs, m, _table(2), 0, u=u, bufs=bufs)
    q = torch.randn(1, 2, 33, 160).half()
    torch.ops.fastdiff_emu.attention(q, q, q, 0.1)
    log = emu.launch_log(True)
    assert len(log) >= 4 + 1 + 1
    assert all(current for *_, current in log), log
    emu.selftest(4, True)  # a kernel launched as k<<<grid, block>>>: the legacy default stream, logged as such
    assert [current for *_, current in emu.launch_log(True)] == [False]
