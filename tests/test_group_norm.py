"""fastdiff.ops.group_norm and the GroupNorm modules against fastdiff.reference (fp64), on every backend here.

The Triton backend's numerics are tested in test_group_norm_triton.py (interpreter-sized shapes); here the
`cuda` backend runs on a GPU only (marked, skipped with the reason elsewhere).
"""
import warnings

import pytest
import torch

import fastdiff
from fastdiff import ops, reference
from fastdiff.ops._common import is_channels_last

HAS_EXT = fastdiff.info()["cpu_extension"]


@pytest.fixture
def cache_32mb():
    """The CPU kernel's store choices as on a 32 MiB last-level cache: outputs over 8 MB written with non-temporal
    stores, the NCHW path keeping its first blocks in the cache (csrc/cpu/group_norm.cpp, stream_output and
    cached_blocks). A machine that reports a larger cache (a VM may report its host's whole L3) would otherwise
    never run those paths in these tests."""
    prev = torch.ops.fastdiff._set_cpu_cache_bytes(32 << 20)
    try:
        yield
    finally:
        torch.ops.fastdiff._set_cpu_cache_bytes(prev)

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
GRAD_TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}  # relative to max |grad|


def _backends():
    out = [pytest.param("torch", "cpu", id="torch-cpu")]
    out.append(pytest.param("cpu", "cpu", id="cpu", marks=pytest.mark.skipif(not HAS_EXT, reason="extension not built")))
    out.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda))
    out.append(pytest.param("triton", "cuda", id="triton-gpu", marks=[pytest.mark.cuda, pytest.mark.triton]))
    return out


def to_layout(x, channels_last):
    if not channels_last or x.dim() < 3:
        return x.contiguous()
    perm = (0,) + tuple(range(2, x.dim())) + (1,)
    inv = [0] * x.dim()
    for i, p in enumerate(perm):
        inv[p] = i
    return x.permute(perm).contiguous().permute(inv)


def make_inputs(shape, G, dtype, device, *, affine=True, ada=True, channels_last=False, mean=0.0, spread=1.0):
    N, C = shape[:2]
    x = to_layout((torch.randn(shape, dtype=torch.float64) * spread + mean).to(dtype), channels_last).to(device)
    p = {}
    if affine:
        p["weight"] = (1 + 0.5 * torch.randn(C)).to(dtype).to(device)
        p["bias"] = (0.5 * torch.randn(C)).to(dtype).to(device)
    if ada:
        p["scale"] = (0.5 * torch.randn(N, C)).to(dtype).to(device)
        p["shift"] = (0.5 * torch.randn(N, C)).to(dtype).to(device)
    return x, p


def ref_fp64(x, G, p, activation, eps=1e-5):
    return reference.group_norm(x.double(), G, p.get("weight"), p.get("bias"), eps, scale=p.get("scale"),
                                shift=p.get("shift"), activation=activation, compute_dtype=torch.float64)


def check_forward_and_grads(x, p, G, backend):
    """fp32 AdaGN+SiLU forward and all five gradients against float64: returns (y, gy, gradients)."""
    leaves = [t.detach().requires_grad_(True) for t in [x] + [p[k] for k in ("weight", "bias", "scale", "shift")]]
    y = ops.group_norm(leaves[0], G, *leaves[1:3], scale=leaves[3], shift=leaves[4], activation="silu",
                       backend=backend)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = reference.group_norm(leaves64[0], G, *leaves64[1:3], scale=leaves64[3], shift=leaves64[4],
                               activation="silu")
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(y.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, gy)
    want = torch.autograd.grad(ref, leaves64, gy.double())
    for name, g, w in zip(("x", "weight", "bias", "scale", "shift"), got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-3 * max(1.0, w.abs().max().item()), rtol=1e-3,
                                   msg=lambda m, name=name: f"grad {name}: {m}")
    return y, gy, got


SHAPES = [
    ((2, 320, 64, 64), 32),  # SD 1.5 first level: 10 channels per group
    ((3, 20, 7, 9), 2),      # odd spatial
    ((2, 12, 17), 3),        # 1-D
    ((2, 8, 3, 4, 5), 4),    # 3-D
    ((4, 6), 3),             # no spatial dims
    ((1, 64, 1, 1), 32),     # one value per channel
    ((2, 72, 5, 6), 8),      # channels-last blocks of 32 channels with a partial one (72 = 32 + 32 + 8)
    ((1, 6, 50, 50), 2),     # statistics chunks that straddle channel boundaries (a group is 7500 values)
]


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G", SHAPES, ids=[str(s[0]) for s in SHAPES])
@pytest.mark.parametrize("affine,ada,act", [(True, True, "silu"), (False, False, None), (True, False, "silu"),
                                            (False, True, None)], ids=["ada-silu", "plain", "affine-silu", "ada"])
def test_forward(backend, device, dtype, channels_last, shape, G, affine, ada, act):
    if backend == "torch" and dtype == torch.float16 and shape[0] * shape[1] > 1000:
        pytest.skip("eager fp16 group_norm on the CPU is slow; covered by the smaller shapes")
    x, p = make_inputs(shape, G, dtype, device, affine=affine, ada=ada, channels_last=channels_last)
    y = ops.group_norm(x, G, p.get("weight"), p.get("bias"), scale=p.get("scale"), shift=p.get("shift"),
                       activation=act, backend=backend)
    ref = ref_fp64(x, G, p, act)
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    if backend != "torch":
        assert y.stride() == x.stride(), "output must keep the input's memory format"
    torch.testing.assert_close(y.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)


# Not run on backend="torch": that is PyTorch's own group_norm, which (on the CPU, fp32) loses most digits here.
@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_mean_small_spread(backend, device, dtype, channels_last):
    # fp32 E[x^2] - E[x]^2 would lose every digit of the variance here (1e6 - 1e6); the kernels work on
    # x - K (K: the group's first value) and merge (mean, M2) with Chan's formula, so they keep them all.
    x, p = make_inputs((2, 40, 9, 11), 4, dtype, device, channels_last=channels_last, mean=1000.0, spread=0.01)
    if dtype == torch.bfloat16:  # bf16 cannot hold 1000 + 0.01 z: use a mean it can, with a spread it resolves
        x, p = make_inputs((2, 40, 9, 11), 4, dtype, device, channels_last=channels_last, mean=64.0, spread=1.0)
    y = ops.group_norm(x, 4, p["weight"], p["bias"], scale=p["scale"], shift=p["shift"], activation="silu",
                       backend=backend)
    ref = ref_fp64(x, 4, p, "silu")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol * 10, rtol=rtol * 10)


# x and y together over half the last-level cache (32 MiB here): the CPU kernel writes y with non-temporal stores,
# rows that start 64-byte aligned (256 x 256) and rows that do not (183 x 181, odd) alike, one task per (n, group)
# or (N * G < 4 threads) per channel; channels-last with 40 channels (a partial 32-channel block), 64 and 72.
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G", [((2, 40, 256, 256), 8), ((2, 64, 183, 181), 8), ((1, 72, 256, 256), 4)],
                         ids=["aligned", "odd", "per-channel"])
def test_outputs_larger_than_the_cache(shape, G, channels_last):
    x, p = make_inputs(shape, G, torch.float32, "cpu", channels_last=channels_last)
    y = ops.group_norm(x, G, p["weight"], p["bias"], scale=p["scale"], shift=p["shift"], activation="silu",
                       backend="cpu")
    ref = ref_fp64(x, G, p, "silu")
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(y.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)


# Outputs of 32 MiB and more (34 MB here): the CPU kernel advises their memory for transparent huge pages before
# writing it (empty_output in csrc/cpu/group_norm.cpp); values and gradients as everywhere else.
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_outputs_of_32_mib_and_more(channels_last):
    x, p = make_inputs((1, 32, 512, 520), 4, torch.float32, "cpu", channels_last=channels_last)
    assert x.nbytes >= 32 << 20
    xg = x.detach().requires_grad_(True)
    y = ops.group_norm(xg, 4, p["weight"], p["bias"], scale=p["scale"], shift=p["shift"], activation="silu",
                       backend="cpu")
    ref = ref_fp64(x, 4, p, "silu")
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(y.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, (xg,), gy)
    x64 = x.detach().double().requires_grad_(True)
    ref = reference.group_norm(x64, 4, p["weight"].double(), p["bias"].double(), scale=p["scale"].double(),
                               shift=p["shift"].double(), activation="silu")
    (want,) = torch.autograd.grad(ref, (x64,), gy.double())
    torch.testing.assert_close(gx.double(), want, atol=1e-4 * max(1.0, want.abs().max().item()), rtol=1e-3)


# Groups of many statistics chunks (16384 values: 8 chunks of 2048 on the CPU), once per (n, group) task
# (N * G >= 4 threads) and once per channel, with an offset 1e5 times the spread and outliers at each
# channel's start, where the chunks' own pivots are taken; and small maps (8x8: one task per sample in
# channels-last; 3x5: rows shorter than a vector in channels-first).
@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] != "torch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(1, 8, 64, 64), (4, 8, 64, 64), (4, 8, 8, 8), (4, 8, 3, 5)],
                         ids=["per-channel", "per-group", "8x8", "3x5"])
def test_statistics_with_offset_and_outliers(backend, device, channels_last, shape):
    x, p = make_inputs(shape, 2, torch.float32, device, channels_last=channels_last, mean=100.0,
                       spread=0.001)
    x[:, :, 0, :3] += torch.tensor([0.5, -0.3, 0.2], device=device)  # 500, 300, 200 times the spread
    y = ops.group_norm(x, 2, p["weight"], p["bias"], scale=p["scale"], shift=p["shift"], activation="silu",
                       backend=backend)
    ref = ref_fp64(x, 2, p, "silu")
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(y.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)


# Many small (n, group) blocks, where the CPU kernel claims several blocks at a time and applies rows of up to
# 4 values across their boundaries (apply_short_rows in csrc/cpu/group_norm.cpp; backward_short_rows up to 8):
# no spatial dims (one value per channel; 10.5 MB, so y is also streamed), 1x3 and 2x3 maps (partial vectors
# across rows), 4x4 maps of 40-channel groups, 7x9 (the per-row loops); channels-last, the same maps run one task
# per sample. Against float64, with every gradient, and bit-identical on one thread and two.
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("shape,G,channels_last", [
    ((2048, 1280), 32, False), ((96, 64, 2, 3), 32, False), ((5, 48, 1, 3), 16, False), ((16, 1280, 4, 4), 32, False),
    ((5, 48, 7, 9), 16, False), ((96, 64, 2, 3), 32, True), ((5, 48, 7, 9), 16, True), ((16, 1280, 4, 4), 32, True)],
    ids=["0d-streamed", "2x3", "1x3", "4x4", "7x9", "2x3-nhwc", "7x9-nhwc", "4x4-nhwc"])
def test_many_short_rows(shape, G, channels_last, cache_32mb):
    x, p = make_inputs(shape, G, torch.float32, "cpu", mean=3.0, spread=2.0, channels_last=channels_last)
    y, gy, got = check_forward_and_grads(x, p, G, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = ops.group_norm(x, G, p["weight"], p["bias"], scale=p["scale"], shift=p["shift"], activation="silu",
                            backend="cpu")
        g1 = torch.ops.fastdiff.group_norm_backward(gy, x, *torch.ops.fastdiff.group_norm(
            x, G, p["weight"], p["bias"], p["scale"], p["shift"], 1e-5, "silu")[1:], G, p["weight"], p["bias"],
            p["scale"], p["shift"], "silu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y.detach())
    assert all(torch.equal(a, b) for a, b in zip(g1, got))


# The CPU kernel's channels-first blocks (AVX-512 build): each thread computes the statistics of its next (n, group)
# block inside the apply loop of the current one, and those of its first block alone (StatsCursor in
# csrc/cpu/group_norm.cpp). Which blocks come first depends on the thread count, so one thread and two must agree
# bit for bit: blocks of several statistics chunks with a short last chunk (8 x 2050 values = 8 chunks of 2048 and
# one of 16; rows of 2050, not a multiple of 16), a large mean with outliers at each block's start (the chunks'
# pivots), and the 10.5 MB (2, 320, 64, 64) case, whose y is partly streamed on a 32 MB cache. Against float64 too.
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,G", [((3, 64, 50, 41), 8), ((2, 320, 64, 64), 32)], ids=["2050-rows", "sd-64x64"])
def test_cpu_blocks_statistics_thread_invariant(shape, G, dtype, cache_32mb):
    x, p = make_inputs(shape, G, dtype, "cpu", mean=300.0, spread=2.0)
    cpg, S = shape[1] // G, shape[2] * shape[3]
    blocks = x.view(shape[0] * G, cpg * S)
    blocks[:, 0] = 330.0  # the first chunk's pivot comes from its first 16 values; later chunks' from running means
    blocks[:, 2049] = 270.0
    runs = {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs[n] = ops.group_norm(x, G, p["weight"], p["bias"], scale=p["scale"], shift=p["shift"],
                                     activation="silu", backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[1], runs[2])
    ref = ref_fp64(x, G, p, "silu")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(runs[2].double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)


# The CPU kernel writes y with ordinary stores, non-temporal ones, or (NCHW) ordinary ones for its first blocks and
# non-temporal ones for the rest, by the size of x against the last-level cache: the store kind must not change a
# value. Caches of 1 GiB (ordinary stores), 32 MiB (the first 30% of blocks kept) and 1 MiB (everything streamed),
# forward and backward, both layouts, each path's large and small maps.
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,channels_last", [((2, 320, 64, 64), False), ((2, 320, 64, 64), True),
                                                 ((64, 320, 8, 8), True), ((4096, 640), False)],
                         ids=["nchw", "nhwc", "nhwc-8x8", "0d"])
def test_cpu_store_kind_changes_no_value(shape, channels_last, dtype):
    x, p = make_inputs(shape, 32, dtype, "cpu", channels_last=channels_last, mean=1.0)
    gy = torch.randn_like(x)
    assert torch.ops.fastdiff._cpu_cache_bytes() > 0
    outs = []
    for cache in (1 << 30, 32 << 20, 1 << 20):
        prev = torch.ops.fastdiff._set_cpu_cache_bytes(cache)
        try:
            assert torch.ops.fastdiff._cpu_cache_bytes() == cache
            y, mean, rstd = torch.ops.fastdiff.group_norm(x, 32, p["weight"], p["bias"], p["scale"], p["shift"],
                                                          1e-5, "silu")
            grads = torch.ops.fastdiff.group_norm_backward(gy, x, mean, rstd, 32, p["weight"], p["bias"],
                                                           p["scale"], p["shift"], "silu")
        finally:
            torch.ops.fastdiff._set_cpu_cache_bytes(prev)
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        outs.append((y, *grads))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
    ref = ref_fp64(x, 32, p, "silu")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(outs[0][0].double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_cpu_cache_bytes_setter_checks_its_argument():
    with pytest.raises(RuntimeError, match="bytes"):
        torch.ops.fastdiff._set_cpu_cache_bytes(-1)


class _assumed_l2:
    """The CPU GroupNorm's L2-sized choices as on a machine with this L2 size (csrc/cpu/group_norm.cpp): the
    backward's block-by-block passes (fp32 NCHW, x at least two L2s, a block's x, gy and gx in three quarters of
    one), which 64 KiB or 16 KiB takes at the small shapes below and 1 GiB never does, and the forward's per-sample
    channels-last path (samples of up to half an L2), which 1 GiB takes there and one byte never does."""

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def __enter__(self):
        self.prev = torch.ops.fastdiff._set_cpu_l2_bytes(self.nbytes)
        assert torch.ops.fastdiff._cpu_l2_bytes() == self.nbytes

    def __exit__(self, *exc):
        torch.ops.fastdiff._set_cpu_l2_bytes(self.prev)


def _cpu_grads(x, p, G, activation, gy):
    leaves = [t.detach().requires_grad_(True) for t in [x] + [p[k] for k in ("weight", "bias", "scale", "shift")]]
    y = ops.group_norm(leaves[0], G, *leaves[1:3], scale=leaves[3], shift=leaves[4], activation=activation,
                       backend="cpu")
    return torch.autograd.grad(y, leaves, gy)


def _ref_grads(x, p, G, activation, gy):
    params = [p[k] for k in ("weight", "bias", "scale", "shift")]
    leaves = [t.detach().double().requires_grad_(True) for t in [x] + params]
    y = reference.group_norm(leaves[0], G, *leaves[1:3], scale=leaves[3], shift=leaves[4], activation=activation)
    return torch.autograd.grad(y, leaves, gy.double())


# Both backward paths against float64 (maps of 9 x 7 end in partial vectors; 10 channels per group), and the block
# path's gradients bit-identical on one thread and two (blocks are handed out dynamically, each computed the same).
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("shape,G", [((2, 64, 16, 16), 32), ((3, 80, 9, 7), 8), ((2, 32, 4, 8, 9), 16)],
                         ids=["16x16", "9x7", "3d"])
@pytest.mark.parametrize("l2", [16 << 10, 1 << 30], ids=["blocks", "two-pass"])
def test_cpu_backward_paths(shape, G, activation, l2):
    x, p = make_inputs(shape, G, torch.float32, "cpu", mean=2.0)
    gy = torch.randn_like(x)
    threads = torch.get_num_threads()
    runs = {}
    try:
        with _assumed_l2(l2):
            for n in (1, 2):
                torch.set_num_threads(n)
                runs[n] = _cpu_grads(x, p, G, activation, gy)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(runs[1], runs[2]))
    for got, want in zip(runs[2], _ref_grads(x, p, G, activation, gy)):
        torch.testing.assert_close(got.double(), want, atol=GRAD_TOL[torch.float32] * want.abs().max().item(),
                                   rtol=0)


# A mean of 1e4 standard deviations: the block path centres x by each group's mean as the forward computed it (in
# its pivot's frame), so every gradient keeps fp32's digits; the two-pass path centres by the saved fp32 mean,
# rounded to ulp(100) = 7.6e-6, 7.6e-4 of the spread (its bound: torch's own CPU backward is off by 1e-3 here).
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("l2,tol", [(64 << 10, 1e-5), (1 << 30, 2e-3)], ids=["blocks", "two-pass"])
def test_cpu_backward_large_mean(l2, tol, activation):
    if l2 < (1 << 20) and torch.ops.fastdiff._cpu_kernels() != "avx512":
        pytest.skip("the block-by-block backward is in the AVX-512 build only; this (portable) build centres x by "
                    "the saved mean: the two-pass case's bound")
    x, p = make_inputs((2, 64, 32, 32), 32, torch.float32, "cpu", mean=100.0, spread=0.01)
    gy = torch.randn_like(x)
    with _assumed_l2(l2):
        got = _cpu_grads(x, p, 32, activation, gy)
    for name, g, want in zip(("x", "weight", "bias", "scale", "shift"), got, _ref_grads(x, p, 32, activation, gy)):
        err = (g.double() - want).abs().max().item() / want.abs().max().item()
        assert err <= tol, f"grad of {name}: {err:.2e} of its largest value (bound {tol:.0e})"


# Channels-last samples of up to half an L2, four or more per thread, run one task per sample (statistics in chunks
# of channel_stats's size, merged in the same order, then the apply from L1/L2): bit-identical to the two passes
# over the whole tensor, which an assumed L2 of one byte forces. 16x16 (2 chunks of 128 rows at 64 channels),
# 12x12 at 640 channels (chunks of 64 rows: 3, the last partial), and a 6x6x6 3-D map.
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,G", [((8, 64, 16, 16), 32), ((8, 640, 12, 12), 32), ((8, 40, 6, 6, 6), 4)],
                         ids=["16x16", "12x12-640", "3d"])
def test_cpu_channels_last_per_sample_path(shape, G, dtype):
    x, p = make_inputs(shape, G, dtype, "cpu", channels_last=True, mean=5.0)
    threads = torch.get_num_threads()
    outs = []
    try:
        torch.set_num_threads(2)
        for l2 in (1, 1 << 30):
            with _assumed_l2(l2):
                outs.append(ops.group_norm(x, G, p["weight"], p["bias"], scale=p["scale"], shift=p["shift"],
                                           activation="silu", backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert outs[1].is_contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    ref = ref_fp64(x, G, p, "silu")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(outs[1].double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)


# The NCHW forward's per-block path computes the next block's statistics inside the current block's apply loop where
# the current block's x, the next one's and (ordinary stores) y fit in three quarters of an L2, and each block's
# statistics first, then its apply, where they do not (csrc/cpu/group_norm.cpp). Both run the same statistics
# cursor, so outputs are bit-identical: an assumed L2 of 1 GiB takes the first for every block, one byte the second;
# with ordinary stores and with y streamed (an assumed 64 KiB cache); 9x7 maps end in partial vectors.
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cache", [1 << 30, 64 << 10], ids=["stores", "streamed"])
@pytest.mark.parametrize("shape,G", [((2, 64, 16, 16), 32), ((3, 80, 9, 7), 8)], ids=["16x16", "9x7"])
def test_cpu_nchw_statistics_ahead_or_first(shape, G, cache, dtype):
    x, p = make_inputs(shape, G, dtype, "cpu", mean=3.0)
    threads = torch.get_num_threads()
    prev = torch.ops.fastdiff._set_cpu_cache_bytes(cache)
    outs = []
    try:
        torch.set_num_threads(2)
        for l2 in (1, 1 << 30):
            with _assumed_l2(l2):
                outs.append(torch.ops.fastdiff.group_norm(x, G, p["weight"], p["bias"], p["scale"], p["shift"],
                                                          1e-5, "silu"))
    finally:
        torch.set_num_threads(threads)
        torch.ops.fastdiff._set_cpu_cache_bytes(prev)
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    ref = ref_fp64(x, G, p, "silu")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(outs[1][0].double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=rtol)


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_cpu_l2_bytes_setter_checks_its_argument():
    assert torch.ops.fastdiff._cpu_l2_bytes() > 0
    with pytest.raises(RuntimeError, match="bytes"):
        torch.ops.fastdiff._set_cpu_l2_bytes(-1)


# Wide channels-last rows: the CPU's fp32 statistics sum up to 512 channels at a time (kAccC in
# csrc/cpu/group_norm.cpp), so 1048 channels are two full blocks and a partial one ending in a partial vector
# (24 = 16 + 8); 150 rows per sample are chunks of 39 rows (an odd count for the two-row steps) and a shorter last
# one. Forward and gradients against float64.
@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] != "torch"])
def test_channels_last_wide_rows(backend, device):
    x, p = make_inputs((2, 1048, 10, 15), 8, torch.float32, device, channels_last=True, mean=10.0, spread=0.5)
    y, _, _ = check_forward_and_grads(x, p, 8, backend)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G,affine,ada,act", [
    ((2, 40, 6, 7), 4, True, True, "silu"),
    ((3, 20, 7, 9), 2, True, False, None),
    ((2, 8, 3, 4, 5), 4, False, True, "silu"),
    ((2, 12, 17), 3, True, True, None),
    ((64, 40, 2, 3), 4, True, True, "silu"),   # CPU: rows of 6 values (backward_short_rows)
    ((2, 40, 12, 12), 4, True, True, "silu"),  # CPU channels-last: 144 rows, over one task per sample
], ids=["ada-silu", "affine", "3d-ada-silu", "1d-ada", "2x3-ada-silu", "12x12-ada-silu"])
def test_backward(backend, device, dtype, channels_last, shape, G, affine, ada, act):
    x, p = make_inputs(shape, G, dtype, device, affine=affine, ada=ada, channels_last=channels_last)
    leaves = {"x": x, **p}
    for t in leaves.values():
        t.requires_grad_(True)
    y = ops.group_norm(x, G, p.get("weight"), p.get("bias"), scale=p.get("scale"), shift=p.get("shift"),
                       activation=act, backend=backend)
    gy = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    y.backward(gy)
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    ref = reference.group_norm(ref_leaves["x"], G, ref_leaves.get("weight"), ref_leaves.get("bias"),
                               scale=ref_leaves.get("scale"), shift=ref_leaves.get("shift"), activation=act)
    ref.backward(gy.double())
    for k in leaves:
        got, want = leaves[k].grad, ref_leaves[k].grad
        assert got is not None, f"no gradient for {k}"
        assert got.shape == want.shape and got.dtype == dtype
        err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
        assert err < GRAD_TOL[dtype], f"grad {k}: relative error {err:.2e}"


@pytest.mark.parametrize("backend,device", _backends())
def test_grad_y_of_other_layout(backend, device):
    # a channels-last x with a contiguous upstream gradient: the backward must not misread it
    x, p = make_inputs((2, 16, 5, 6), 4, torch.float32, device, channels_last=True)
    x.requires_grad_(True)
    y = ops.group_norm(x, 4, p["weight"], p["bias"], scale=p["scale"], shift=p["shift"], activation="silu",
                       backend=backend)
    gy = torch.randn(2, 16, 5, 6, device=device)
    (gx,) = torch.autograd.grad(y, x, gy)
    xr = x.detach().double().requires_grad_(True)
    yr = reference.group_norm(xr, 4, p["weight"].double(), p["bias"].double(), scale=p["scale"].double(),
                              shift=p["shift"].double(), activation="silu")
    (gr,) = torch.autograd.grad(yr, xr, gy.double())
    torch.testing.assert_close(gx.double(), gr, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend,device", _backends())
def test_empty_batch(backend, device):
    x = torch.randn(0, 32, 4, 4, device=device)
    w = torch.ones(32, device=device)
    y = ops.group_norm(x, 8, w, torch.zeros(32, device=device), scale=torch.zeros(0, 32, device=device),
                       activation="silu", backend=backend)
    assert y.shape == x.shape


# No values to normalise but samples present (a 0-sized spatial or channel dim): every backend gives the empty
# result, the eager one included (F.group_norm itself rejects these), with empty or zero gradients.
@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("shape,G", [((2, 4, 0), 2), ((2, 4, 0, 5), 4), ((2, 0, 3, 3), 1)], ids=["S0", "H0", "C0"])
def test_empty_map_or_channels(backend, device, shape, G):
    x = torch.randn(*shape, device=device, requires_grad=True)
    C = shape[1]
    w, b = (torch.randn(C, device=device, requires_grad=True) for _ in range(2))
    s, t = (torch.randn(2, C, device=device, requires_grad=True) for _ in range(2))
    y = ops.group_norm(x, G, w, b, scale=s, shift=t, activation="silu", backend=backend)
    assert y.shape == x.shape
    grads = torch.autograd.grad(y.sum(), [x, w, b, s, t], allow_unused=True)
    for g, leaf in zip(grads, [x, w, b, s, t]):
        assert g is None or (g.shape == leaf.shape and not g.any())
    # create_graph=True (a gradient penalty): the cpu/cuda op's composite backward raised ATen's "Expected HxW to
    # be greater than 0"
    y = ops.group_norm(x, G, w, b, scale=s, shift=t, activation="silu", backend=backend)
    grads = torch.autograd.grad(y.sum(), [x, w, b, s, t], allow_unused=True, create_graph=True)
    for g, leaf in zip(grads, [x, w, b, s, t]):
        assert g is None or (g.shape == leaf.shape and not g.any())


@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] != "torch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("spatial", [(5, 7), (40, 40)], ids=["5x7", "40x40"])
def test_silu_at_extreme_values(backend, device, channels_last, spatial):
    """The fused SiLU over the whole float range: pre-activations far beyond exp's range give silu's limits (0 below,
    z above), +inf stays +inf and NaN stays NaN. With weight 0 the pre-activation is the bias itself."""
    z = torch.tensor([-3e38, -1e30, -200.0, -88.5, -87.0, -50.0, -10.0, -1e-3, 0.0, 1e-3, 10.0, 50.0, 87.0, 88.5,
                      200.0, 1e30, 3e38, float("inf"), float("nan"), 1.0])
    C = z.numel()
    x = to_layout(torch.randn(2, C, *spatial), channels_last).to(device)
    y = ops.group_norm(x, 4, torch.zeros(C, device=device), z.to(device), activation="silu", backend=backend)
    want = torch.nn.functional.silu(z.double())
    got = y[:, :, 0, 0].double().cpu()
    for n in range(2):
        # rtol 2e-6: for z < -40 (values under 1e-17) fp32 u = -z log2(e) carries a relative error ~1e-6 into 2^u
        torch.testing.assert_close(got[n], want, atol=1e-18, rtol=2e-6, equal_nan=True)
    # the backward's SiLU derivative at the same pre-activations: grad of the bias = sum over (n, s) of silu'(z)
    xb = x.clone()
    zb = z.to(device).requires_grad_(True)
    y = ops.group_norm(xb, 4, torch.zeros(C, device=device), zb, activation="silu", backend=backend)
    (gb,) = torch.autograd.grad(y, (zb,), torch.ones_like(y))
    z64 = z.double().requires_grad_(True)
    (d64,) = torch.autograd.grad(torch.nn.functional.silu(z64).sum(), (z64,))
    # rtol 2e-5: the bias gradient is an fp32 sum over N x H x W values
    torch.testing.assert_close(gb.double().cpu(), d64 * (2 * spatial[0] * spatial[1]), atol=1e-18, rtol=2e-5,
                               equal_nan=True)


@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] != "torch"])
def test_deterministic(backend, device):
    x, p = make_inputs((2, 64, 33, 31), 32, torch.float32, device)
    runs = [ops.group_norm(x, 32, p["weight"], p["bias"], scale=p["scale"], shift=p["shift"], activation="silu",
                           backend=backend) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] != "torch"])
def test_noncontiguous_params_and_odd_strides(backend, device):
    # scale/shift as chunks of one Linear output (row stride 2C) and an x that is neither layout
    x = torch.randn(2, 20, 6, 8, device=device)[:, :, :, ::2]
    emb = torch.randn(2, 40, device=device)
    scale, shift = emb.chunk(2, dim=1)
    y = ops.group_norm(x, 5, scale=scale, shift=shift, activation="silu", backend=backend)
    ref = reference.group_norm(x.double(), 5, scale=scale.double(), shift=shift.double(), activation="silu")
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_strided_parameters_with_gradients(backend, device, dtype, channels_last):
    # parameters read in place through their strides: weight every other element of a longer vector, bias
    # contiguous, scale one row broadcast to every sample (stride 0), shift a chunk of a Linear output (row
    # stride 2C); forward and all five gradients against float64
    C = 24
    x = to_layout(torch.randn(3, C, 5, 7, dtype=torch.float64), channels_last).to(dtype).to(device)
    weight = torch.randn(2 * C, dtype=torch.float64).to(dtype).to(device)[::2]
    bias = torch.randn(C, dtype=torch.float64).to(dtype).to(device)
    scale = (0.3 * torch.randn(1, C, dtype=torch.float64)).to(dtype).to(device)
    shift_src = torch.randn(3, 2 * C, dtype=torch.float64).to(dtype).to(device)
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias, scale, shift_src)]
    xs, w, b, sc, sh_src = leaves
    shift = sh_src.chunk(2, dim=1)[1]
    assert not w.is_contiguous() and not shift.is_contiguous() and sc.expand(3, C).stride(0) == 0
    y = ops.group_norm(xs, 4, w, b, scale=sc.expand(3, C), shift=shift, activation="silu", backend=backend)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    x64, w64, b64, sc64, sh64 = leaves64
    ref = reference.group_norm(x64, 4, w64, b64, scale=sc64.expand(3, C), shift=sh64.chunk(2, dim=1)[1],
                               activation="silu")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, gy)
    want = torch.autograd.grad(ref, leaves64, gy.double())
    gtol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, g, r in zip(("x", "weight", "bias", "scale", "shift"), got, want):
        torch.testing.assert_close(g.double(), r, atol=gtol * max(1.0, r.abs().max().item()), rtol=gtol,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


# The AVX-512 CPU kernels convert fp16/bf16 to fp32 and back with vector instructions (F16C; bf16 by a shift and
# a round-to-nearest-even): the same math as on fp32 inputs, so the output is exactly the fp32 kernel's on the
# converted inputs, rounded as torch rounds (NaN included). The portable build sums in another order: there, within
# the dtype's tolerance.
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G", [((2, 64, 9, 13), 8), ((3, 40, 33, 17), 4)], ids=["small", "odd"])
def test_half_precision_rounds_like_torch(dtype, channels_last, shape, G):
    x, p = make_inputs(shape, G, dtype, "cpu", channels_last=channels_last, spread=3.0)
    x[0, 1, 2, 3] = float("nan")
    x[-1, -2, -1, -3] = 300.0 if dtype == torch.float16 else 3e30  # a SiLU output past fp16's range, and bf16's
    y = ops.group_norm(x, G, p["weight"], p["bias"], scale=p["scale"], shift=p["shift"], activation="silu",
                       backend="cpu")
    p32 = {k: v.float() for k, v in p.items()}
    y32 = ops.group_norm(x.float(), G, p32["weight"], p32["bias"], scale=p32["scale"], shift=p32["shift"],
                         activation="silu", backend="cpu")
    assert y.dtype == dtype and y.stride() == x.stride()
    assert torch.equal(y.isnan(), y32.isnan())
    if fastdiff.info()["cpu_kernels"] == "avx512":
        assert torch.equal(y[~y.isnan()], y32.to(dtype)[~y.isnan()])
    else:
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(y, y32.to(dtype), atol=atol, rtol=rtol, equal_nan=True)


# Half-precision stores of values around fp32's denormal range, and NaN: the AVX-512 build narrows bf16 with
# vcvtneps2bf16 where the CPU has it, which reads denormals as 0 and keeps NaN payloads; those vectors take the
# integer rounding instead, so every value still rounds as torch rounds it.
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_store_of_tiny_values(dtype):
    x, _ = make_inputs((2, 32, 8, 8), 4, dtype, "cpu")
    tiny = 1e-39 if dtype == torch.bfloat16 else 1e-7  # a denormal of fp32 (bf16), of fp16
    w = torch.full((32,), tiny).to(dtype)
    w[::4] = 1.0  # vectors mixing normal and denormal values
    b = torch.zeros(32, dtype=dtype)
    y = ops.group_norm(x, 4, w, b, backend="cpu")
    y32 = ops.group_norm(x.float(), 4, w.float(), b.float(), backend="cpu")
    assert (y32[:, 1].abs() < 1.2e-38).all() if dtype == torch.bfloat16 else True
    assert (y[:, 1] != 0).any()
    if fastdiff.info()["cpu_kernels"] == "avx512":
        assert torch.equal(y, y32.to(dtype))
    else:
        torch.testing.assert_close(y, y32.to(dtype), atol=0, rtol=TOL[dtype][1])


def _opcheck_forward_and_backward(device, dtype):
    x, p = make_inputs((2, 8, 3, 5), 4, dtype, device)
    for t in (x, *p.values()):
        t.requires_grad_(True)
    args = (x, 4, p["weight"], p["bias"], p["scale"], p["shift"], 1e-5, "silu")
    torch.library.opcheck(torch.ops.fastdiff.group_norm, args)
    xl = to_layout(x.detach(), True).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastdiff.group_norm, (xl, 4, None, None, None, None, 1e-5, "none"))
    y, mean, rstd = torch.ops.fastdiff.group_norm(*args)
    gy = torch.randn_like(y)
    d = {k: v.detach() for k, v in p.items()}
    # two absent parameters: their (0,) gradients must be distinct tensors (outputs may not alias)
    torch.library.opcheck(torch.ops.fastdiff.group_norm_backward,
                          (gy, x.detach(), mean.detach(), rstd.detach(), 4, d["weight"], None, d["scale"], None,
                           "silu"))
    # scale and shift as transposed (N, C) views: the fake kernel must predict the real gradients' strides
    st, tt = d["scale"].t().contiguous().t(), d["shift"].t().contiguous().t()
    assert st.stride() != d["scale"].stride()
    torch.library.opcheck(torch.ops.fastdiff.group_norm_backward,
                          (gy, x.detach(), mean.detach(), rstd.detach(), 4, d["weight"], d["bias"], st, tt, "silu"))


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_opcheck_cpu():
    _opcheck_forward_and_backward("cpu", torch.float32)


@pytest.mark.cuda
def test_opcheck_cuda():
    _opcheck_forward_and_backward("cuda", torch.float16)


# A group of more than 2^24 values (one group over 64 x 512 x 520): counts and merge weights past fp32's exact
# integers (the CUDA kernels keep them in float), against float64, forward and the x gradient, both layouts. On
# the CPU too (its chunk counts are multiples of 2048, exact far beyond that).
@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] != "torch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_of_more_than_2_to_24_values(backend, device, channels_last):
    if backend == "cpu" and not HAS_EXT:
        pytest.skip("extension not built")
    x = to_layout(torch.randn(1, 64, 512, 520) * 2 + 3, channels_last).to(device).requires_grad_(True)
    y = ops.group_norm(x, 1, backend=backend)
    xr = x.detach().double().requires_grad_(True)
    yr = reference.group_norm(xr, 1, compute_dtype=torch.float64)
    torch.testing.assert_close(y.double(), yr, atol=2e-5, rtol=2e-5)
    gy = torch.randn_like(x)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gr,) = torch.autograd.grad(yr, xr, gy.double())
    torch.testing.assert_close(gx.double(), gr, atol=2e-4 * gr.abs().max().item(), rtol=0)


def test_module_is_drop_in():
    ref = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    m = fastdiff.nn.GroupNorm(4, 16)
    m.load_state_dict(ref.state_dict())
    assert set(m.state_dict()) == set(ref.state_dict())
    assert isinstance(m, torch.nn.GroupNorm)
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
    silu = fastdiff.nn.GroupNorm(4, 16, activation="silu")
    silu.load_state_dict(ref.state_dict())
    torch.testing.assert_close(silu(x), torch.nn.functional.silu(ref(x)), atol=1e-5, rtol=1e-5)
    assert "activation='silu'" in repr(silu)


def test_ada_group_norm_module():
    m = fastdiff.nn.AdaGroupNorm(4, 16, emb_dim=12)
    x, emb = torch.randn(3, 16, 4, 4), torch.randn(3, 12)
    scale, shift = m.linear(torch.nn.functional.silu(emb)).chunk(2, dim=1)
    want = reference.group_norm(x, 4, m.norm.weight, m.norm.bias, scale=scale, shift=shift, activation="silu")
    torch.testing.assert_close(m(x, emb), want, atol=1e-5, rtol=1e-5)
    m(x, emb).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="emb"):
        m(x, torch.randn(3, 11))


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_EXT else []))
def test_compile_fullgraph(backend):
    m = fastdiff.nn.GroupNorm(4, 16, activation="silu")
    ada = fastdiff.nn.AdaGroupNorm(4, 16, emb_dim=8)
    x, emb = torch.randn(2, 16, 6, 6, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    leaves = [x, emb, *m.parameters(), *ada.parameters()]
    gy = torch.randn(2, 16, 6, 6)
    with fastdiff.set_backend(backend):
        want = ada(m(x), emb)
        want_grads = torch.autograd.grad(want, leaves, gy)
        cm = torch.compile(lambda a, e: ada(m(a), e), fullgraph=True, backend="aot_eager")
        got = cm(x, emb)
        torch.testing.assert_close(got, want)
        got_grads = torch.autograd.grad(got, leaves, gy)  # the backward traced by AOTAutograd
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_compile_warns_nothing():
    # The backend checks (what is built, whether Triton is there) are constants to Dynamo: it used to trace through
    # their lru_cache and warn about it, twice, whenever a user compiled a model with our layers. Dynamo warns once
    # per process and location, so this sees it only where no earlier test compiled these layers.
    m = fastdiff.nn.GroupNorm(4, 16, activation="silu")
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cm(x)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
    torch.testing.assert_close(got, m(x))


# The C++ autograd (csrc/autograd.cpp) for any subset of the inputs requiring grad, with parameters absent: the
# others get no gradient, the asked-for ones match the reference.
@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("needs,absent", [(("x",), ()), (("scale",), ()), (("weight", "shift"), ("bias",)),
                                          (("bias", "x"), ("weight", "scale")), (("shift",), ("weight", "bias"))],
                         ids=["x", "scale", "weight+shift", "bias+x", "shift-only"])
def test_gradients_of_a_subset(needs, absent):
    x, p = make_inputs((2, 12, 5, 7), 3, torch.float32, "cpu")
    for k in absent:
        del p[k]
    leaves = {"x": x, **p}
    for k in needs:
        leaves[k].requires_grad_(True)
    y = ops.group_norm(x, 3, p.get("weight"), p.get("bias"), scale=p.get("scale"), shift=p.get("shift"),
                       activation="silu", backend="cpu")
    assert y.requires_grad
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [leaves[k] for k in needs], gy)
    ref_leaves = {k: v.detach().double().requires_grad_(k in needs) for k, v in leaves.items()}
    ref = reference.group_norm(ref_leaves["x"], 3, ref_leaves.get("weight"), ref_leaves.get("bias"),
                               scale=ref_leaves.get("scale"), shift=ref_leaves.get("shift"), activation="silu")
    want = torch.autograd.grad(ref, [ref_leaves[k] for k in needs], gy.double())
    for k, g, w in zip(needs, got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"grad {k}: {m}")
    # nothing requires grad: no graph at all
    y = ops.group_norm(x.detach(), 3, *(None if p.get(k) is None else p[k].detach() for k in ("weight", "bias")),
                       backend="cpu")
    assert not y.requires_grad and y.grad_fn is None


def check_double_backward(backend, channels_last, device="cpu", needs=("x", "weight", "bias", "scale", "shift")):
    """Gradients taken with create_graph=True, differentiated again (a gradient penalty): both orders against the
    float64 reference; the first-order ones also against the fused backward's (create_graph=False)."""
    x, p = make_inputs((2, 8, 3, 5), 2, torch.float32, device, channels_last=channels_last)
    p["x"] = x
    names = ("x", "weight", "bias", "scale", "shift")
    g = torch.Generator().manual_seed(3)
    coef = {k: torch.randn(p[k].shape, generator=g).to(device) for k in needs}

    def run(leaves, fn):
        y = fn(leaves["x"], 2, leaves["weight"], leaves["bias"], scale=leaves["scale"], shift=leaves["shift"],
               activation="silu")
        first = torch.autograd.grad(y.square().sum(), [leaves[k] for k in needs], create_graph=True)
        penalty = sum((gk * coef[k].to(gk.dtype)).sum() for k, gk in zip(needs, first))
        return first, torch.autograd.grad(penalty, [leaves[k] for k in needs])

    leaves = {k: p[k].detach().clone().requires_grad_(k in needs) for k in names}
    first, second = run(leaves, lambda *a, **k: ops.group_norm(*a, **k, backend=backend))
    leaves64 = {k: p[k].detach().double().requires_grad_(k in needs) for k in names}
    first64, second64 = run(leaves64, reference.group_norm)
    plain = torch.autograd.grad(ops.group_norm(leaves["x"], 2, leaves["weight"], leaves["bias"],
                                               scale=leaves["scale"], shift=leaves["shift"], activation="silu",
                                               backend=backend).square().sum(), [leaves[k] for k in needs])
    for k, a, b, c, d, e in zip(needs, first, first64, plain, second, second64):
        for got, want, what in ((a, b, "grad"), (c, b, "fused grad"), (d, e, "second-order grad")):
            scale = want.abs().max().item()
            torch.testing.assert_close(got.double(), want, atol=2e-5 * scale, rtol=2e-5,
                                       msg=lambda m, k=k, what=what: f"{what} {k}: {m}")


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("needs", [("x", "weight", "bias", "scale", "shift"), ("x",), ("weight", "scale")])
def test_double_backward(channels_last, needs):
    # the fused backward kernel has no derivative of its own: under create_graph=True the op's autograd takes a
    # differentiable path (it raised "no double backward" before), so gradient penalties work
    check_double_backward("cpu", channels_last, needs=needs)


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_double_backward_cuda(channels_last):
    if not fastdiff.info()["cuda_extension"]:
        pytest.skip("the extension was built without its CUDA kernels")
    check_double_backward("cuda", channels_last, device="cuda")


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True])
def test_double_backward_triton(channels_last):
    import importlib
    import os

    gn = importlib.import_module("fastdiff.ops.group_norm")
    if not gn._HAS_TRITON_OPS or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the Triton GroupNorm needs a GPU or TRITON_INTERPRET=1")
    check_double_backward("triton", channels_last, device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_direct_backward_op_has_no_double_backward():
    x, p = make_inputs((2, 8, 4, 4), 2, torch.float32, "cpu")
    x.requires_grad_(True)
    y, mean, rstd = torch.ops.fastdiff.group_norm(x, 2, p["weight"], p["bias"], None, None, 1e-5, "silu")
    gy = torch.randn_like(y, requires_grad=True)
    gx = torch.ops.fastdiff.group_norm_backward(gy, x, mean, rstd, 2, p["weight"], p["bias"], None, None, "silu")[0]
    with pytest.raises(RuntimeError, match="no double backward"):  # called directly, the kernel's own backward
        gx.sum().backward()


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_EXT else []))
def test_torch_func_transforms_like_torch(backend, silu_group_norm_pair):
    # torch.nn.GroupNorm works under torch.func's differentiating transforms (per-sample gradients as
    # vmap(grad(...)), jvp, hessian); the cpu/cuda op's C++ autograd raised "cannot use C++
    # torch::autograd::Function with functorch transforms" under all of them
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, grad, hessian, jvp, vmap

    ref, m = silu_group_norm_pair
    x = torch.randn(3, 16, 3, 2)

    def loss(mod, act):
        return lambda params, xi: act(functional_call(mod, params, (xi[None],))).square().sum()

    with fastdiff.set_backend(backend):
        got = vmap(grad(loss(m, lambda t: t)), in_dims=(None, 0))(dict(m.named_parameters()), x)
        t = torch.randn_like(x)
        got_jvp = jvp(m, (x,), (t,))[1]
        got_hess = hessian(lambda a: m(a).sum())(x[:1, :, :1])
        with fwAD.dual_level():  # forward AD: "jvp is not implemented for the c++ API of custom Function"
            got_fwad = fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent
    silu = torch.nn.functional.silu
    want = vmap(grad(loss(ref, silu)), in_dims=(None, 0))(dict(ref.named_parameters()), x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_jvp, jvp(lambda a: silu(ref(a)), (x,), (t,))[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_fwad, got_jvp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_hess, hessian(lambda a: silu(ref(a)).sum())(x[:1, :, :1]), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.skipif(not HAS_EXT, reason="needs the compiled extension (the cpu op)")
def test_compiled_torch_func_transforms_run_the_reference_and_plain_compile_the_op(silu_group_norm_pair):
    # torch.compile(torch.func.grad(f), fullgraph=True) failed: the transform check answered False whenever Dynamo
    # traced, so the C++ autograd op went under the traced grad ("cannot use C++ torch::autograd::Function with
    # functorch transforms")
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.func import functional_call, grad, vmap

    ref, m = silu_group_norm_pair
    x = torch.randn(3, 16, 3, 2)
    params = dict(m.named_parameters())

    def per_sample(mod):
        return vmap(grad(lambda p, xi: functional_call(mod, p, (xi[None],)).square().sum()), in_dims=(None, 0))

    torch._dynamo.reset()
    got = torch.compile(per_sample(m), fullgraph=True)(params, x)
    want = per_sample(m)(params, x)  # eager: the reference under the transforms (test above)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    gx = torch.compile(grad(lambda a: m(a).square().sum()), fullgraph=True)(x)
    torch.testing.assert_close(gx, grad(lambda a: torch.nn.functional.silu(ref(a)).square().sum())(x),
                               atol=1e-4, rtol=1e-4)
    # outside transforms the compiled graph holds the fused op; the same compiled function under grad still works
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda a: m(a).square().sum(), backend=cnt)
    f(x)
    assert "fastdiff.group_norm" in [str(n.target) for n in cnt.graphs[0].graph.nodes]
    torch.testing.assert_close(grad(f)(x), gx, atol=1e-5, rtol=1e-5)


def test_set_backend_switches_and_restores():
    x = torch.randn(2, 8, 4, 4)
    assert fastdiff.get_backend() == "auto"
    with fastdiff.set_backend("torch"):
        assert fastdiff.get_backend() == "torch"
        assert ops.group_norm.__module__  # the op reads the global choice at call time
        from fastdiff.ops.group_norm import choose_backend
        assert choose_backend(x) == "torch"
    assert fastdiff.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend"):
        fastdiff.set_backend("tpu")


def test_set_backend_as_a_decorator_switches_for_each_call():
    from fastdiff.ops.group_norm import choose_backend

    x = torch.randn(2, 8, 4, 4)

    @fastdiff.set_backend("torch")
    def reference():
        return fastdiff.get_backend(), choose_backend(x)

    assert fastdiff.get_backend() == "auto"  # decorating switches nothing
    for _ in range(3):  # every call, not only the first
        assert reference() == ("torch", "torch")
        assert fastdiff.get_backend() == "auto"
    assert reference.__name__ == "reference"


def test_set_backend_is_per_thread():
    # as the README says: the choice belongs to the calling thread (like autocast's state)
    import threading

    seen = {}

    def worker():
        seen["start"] = fastdiff.get_backend()
        fastdiff.set_backend("torch")
        seen["set"] = fastdiff.get_backend()

    with fastdiff.set_backend("cpu"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert fastdiff.get_backend() == "cpu"
    assert seen == {"start": "auto", "set": "torch"}
    assert fastdiff.get_backend() == "auto"


def test_channels_last_helper():
    x = torch.randn(2, 8, 4, 5).to(memory_format=torch.channels_last)
    assert is_channels_last(x) and not is_channels_last(x.contiguous())
    assert is_channels_last(to_layout(torch.randn(2, 8, 3, 4, 5), True))


# ---- bad input: a clear error that names the argument ----

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_groups=3), ValueError, "num_groups"),
    (dict(num_groups=0), ValueError, "num_groups"),
    (dict(num_groups=2.0), TypeError, "num_groups"),
    (dict(scale=torch.randn(2, 7)), ValueError, "scale"),
    (dict(shift=torch.randn(8)), ValueError, "shift"),
    (dict(weight=torch.randn(9)), ValueError, "weight"),
    (dict(bias=torch.randn(8, dtype=torch.float64)), TypeError, "bias"),
    (dict(scale=torch.randn(2, 8, dtype=torch.float16)), TypeError, "scale"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(eps=torch.tensor(1e-5)), TypeError, "^eps:"),  # a type error, not a value error
    (dict(eps="1e-5"), TypeError, "^eps:"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(x=torch.randn(2, 8, 4, 4), num_groups=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.group_norm(**args)


def test_bad_x():
    with pytest.raises(TypeError, match="x"):
        ops.group_norm(torch.randint(0, 5, (2, 8, 4, 4)), 4)
    with pytest.raises(ValueError, match="x"):
        ops.group_norm(torch.randn(8), 4)
    with pytest.raises(ValueError, match="x"):
        ops.group_norm(torch.randn(1, 8, 2, 2, 2, 2), 4)
    with pytest.raises(TypeError, match="x"):
        ops.group_norm([1.0, 2.0], 1)
    if HAS_EXT:
        with pytest.raises(ValueError, match="backend"):  # fp64 runs on the reference only
            ops.group_norm(torch.randn(2, 8, 3, dtype=torch.float64), 4, backend="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to put tensors on two devices")
def test_mixed_devices():
    with pytest.raises(ValueError, match="weight"):
        ops.group_norm(torch.randn(2, 8, 4, 4, device="cuda"), 4, torch.ones(8))


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_direct_op_call_is_checked():
    # callers of torch.ops.fastdiff.* directly get a RuntimeError, never a crash
    with pytest.raises(RuntimeError, match="num_groups"):
        torch.ops.fastdiff.group_norm(torch.randn(2, 8, 3), 3, None, None, None, None, 1e-5, "none")
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.fastdiff.group_norm(torch.randn(2, 8, 3), 4, None, None, torch.randn(3, 8), None, 1e-5, "none")
    with pytest.raises(RuntimeError, match="activation"):
        torch.ops.fastdiff.group_norm(torch.randn(2, 8, 3), 4, None, None, None, None, 1e-5, "relu")


def test_compile_does_not_recompile_at_the_second_call():
    # Dynamo guarded on the backend-choice cache, which the first compiled call itself filled: the second call
    # recompiled once (TORCH_LOGS=recompiles)
    from torch._dynamo.testing import CompileCounter

    from fastdiff.ops import _common

    m = fastdiff.nn.GroupNorm(4, 16, activation="silu")
    table = torch.rand(5, 12)
    table[:, 11] = 0
    for fn in (lambda x: m(x), lambda x: ops.sampler_step(x, x, table, 1)):
        _common._CHOICES.clear()
        torch._dynamo.reset()
        cnt = CompileCounter()
        f = torch.compile(fn, backend=cnt, fullgraph=True)
        x = torch.randn(2, 16, 4, 4)
        for _ in range(3):
            f(x)
        assert cnt.frame_count == 1
