"""fastdiff.ops.sampler_step: every backend against fastdiff.reference.sampler_step, the Philox noise, errors."""
import pytest
import torch

import fastdiff
from fastdiff import reference
from fastdiff.ops import sampler_step
from fastdiff.ops.sampler_step import choose_backend

HAS_GPU = torch.cuda.is_available()

BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]
DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1.6e-2)]


def _skip_unavailable(backend):
    if backend == "cpu" and not fastdiff.info()["cpu_extension"]:
        pytest.skip("the compiled extension is not built (python setup.py build_ext --inplace)")
    if backend == "cuda" and not fastdiff.info()["cuda_extension"]:
        pytest.skip("the extension was built without its CUDA kernels")
    if backend == "triton" and fastdiff.info()["triton"] is None:
        pytest.skip("Triton is not installed")


def _device(backend):
    return torch.device("cuda" if backend in ("cuda",) or (backend == "triton" and HAS_GPU) else "cpu")


def _table(n, device, *, d=True, s=True):
    """A random but well-scaled coefficient table: rows like a real sampler's."""
    t = torch.zeros(n, 12)
    t[:, 0] = 1 + torch.rand(n)            # PX
    t[:, 1] = -torch.rand(n)               # PM
    t[:, 2] = torch.rand(n)                # A
    t[:, 3] = 0.5 * torch.rand(n)          # B
    t[:, 4] = torch.rand(n)                # C
    t[:, 5] = 0.3 * torch.rand(n) if d else 0.0  # D
    t[:, 6] = 0.2 + 0.5 * torch.rand(n) if s else 0.0  # S
    t[:, 7] = -6 + torch.rand(n)           # MINLOG
    t[:, 8] = -2 + torch.rand(n)           # MAXLOG
    t[:, 9] = -0.4 * torch.rand(n)         # E (x0_prev2, read only when x0_buf2 is given)
    t[:, 10] = 0.3 * torch.rand(n)         # F (x0_prev3, read only when x0_buf3 is given)
    return t.to(device)                    # (column 11, KEEP, 0: the history moves)


def _inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(1)
    mk = lambda: torch.randn(shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(), mk(), mk(), mk(), (torch.rand(shape, generator=g) * 2 - 1).to(device=device, dtype=dtype)


def _run(backend, x, m, table, step, **kw):
    buf = kw.pop("x0_buf", None)
    buf_k = None if buf is None else buf.clone()
    buf_r = None if buf is None else buf.clone()
    buf2 = kw.pop("x0_buf2", None)
    if buf2 is not None:
        kw["x0_buf2"] = buf2.clone()
        ref_buf2 = buf2.clone()
    out = sampler_step(x, m, table, step, x0_buf=buf_k, backend=backend, **kw)
    if buf2 is not None:
        kw["x0_buf2"] = ref_buf2
    ref = reference.sampler_step(x, m, table, torch.as_tensor(step, device=x.device), x0_buf=buf_r,
                                 seed=kw.pop("seed", 0) & ((1 << 64) - 1),
                                 var_mode={"fixed": 0, "learned": 1, "learned_range": 2}[kw.pop("var_mode", "fixed")],
                                 clip_mode={"none": 0, "clip": 1, "threshold": 2}[kw.pop("clip", "none")], **kw)
    return out, ref, buf_k, buf_r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("clip", ["none", "clip", "threshold"])
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
def test_matches_reference(backend, dtype, atol, rtol, clip, cfg):
    _skip_unavailable(backend)
    dev = _device(backend)
    shape = (3, 4, 5, 7)  # 420 elements: rows of 140 (not a multiple of the 4-element noise groups' alignment)
    x, m, u, _, _ = _inputs(shape, dtype, dev)
    table = _table(6, dev)
    thresh = torch.tensor([1.0, 1.7, 2.5], device=dev) if clip == "threshold" else None
    buf = torch.randn(shape, device=dev).to(dtype)
    kw = dict(uncond=u if cfg else None, guidance_scale=4.5 if cfg else 1.0, clip=clip, clip_range=0.8,
              thresh=thresh, seed=2**40 + 17, x0_buf=buf)
    out, ref, bk, br = _run(backend, x, m, table, 4, **kw)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=atol * 4, rtol=rtol)
    torch.testing.assert_close(bk.float(), br.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_rows"])
@pytest.mark.parametrize("nbuf", [1, 2, 3])
def test_history_buffers(backend, dtype, atol, rtol, layout, nbuf):
    """x0_buf (+ D x0_prev), x0_buf2 (third-order solvers: + E x0_prev2), x0_buf3 (PLMS: + F x0_prev3): each value
    moves one buffer down per step (x0 -> x0_buf -> x0_buf2 -> x0_buf3) unless the row says KEEP (column 11), on
    every backend as in the reference; four steps in a row, the second a KEEP step, so each step reads what the
    steps before left."""
    _skip_unavailable(backend)
    dev = _device(backend)
    shape = (3, 5, 7, 9)
    x, m, u, _, _ = _inputs(shape, dtype, dev)
    g = torch.Generator().manual_seed(4)
    bufs = [torch.randn(shape, generator=g).to(dev, dtype) for _ in range(nbuf)]
    if layout == "channels_last":
        x, m, u = (t.contiguous(memory_format=torch.channels_last) for t in (x, m, u))
        bufs = [t.contiguous(memory_format=torch.channels_last) for t in bufs]
    elif layout == "strided_rows":  # every sample a dense block, the batch stride larger: views of a bigger batch
        x, m, u = (torch.cat([t, t], 0)[::2] for t in (x, m, u))
        bufs = [torch.cat([t, t], 0)[::2] for t in bufs]
    table = _table(5, dev)
    table[1, 11] = 1.0  # KEEP at step 1
    names = ("x0_buf", "x0_buf2", "x0_buf3")

    def copies():
        return [torch.cat([t, t], 0)[::2] if layout == "strided_rows" else t.clone() for t in bufs]

    kb, rb = copies(), copies()
    for step in range(4):
        before = [t.clone() for t in kb]
        got = sampler_step(x, m, table, step, uncond=u, guidance_scale=2.5, seed=5, backend=backend,
                           **dict(zip(names, kb)))
        want = reference.sampler_step(x, m, table, torch.tensor(step, device=dev), uncond=u, guidance_scale=2.5,
                                      seed=5, **dict(zip(names, rb)))
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        for k, r in zip(kb, rb):
            torch.testing.assert_close(k, r, atol=atol, rtol=rtol)
        if step == 1:  # KEEP: every buffer exactly as it was
            assert all(torch.equal(a, b) for a, b in zip(kb, before))
        else:  # the move itself is exact: each buffer holds what the one before it held, bit for bit
            assert all(torch.equal(kb[i], before[i - 1]) for i in range(1, nbuf))
        x = got


@pytest.mark.parametrize("backend", BACKENDS)
def test_history_terms_skipped_where_their_coefficient_is_zero(backend):
    """A NaN left in a history buffer does not reach a step whose D or E is 0 (a run's first steps)."""
    _skip_unavailable(backend)
    dev = _device(backend)
    x, m, _, _, _ = _inputs((2, 3, 4, 4), torch.float32, dev)
    table = _table(2, dev)
    table[:, 5] = 0.0
    table[:, 9] = 0.0
    b1, b2 = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    out = sampler_step(x, m, table, 0, x0_buf=b1, x0_buf2=b2, stochastic=False, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(b1).all() and torch.isnan(b2).all()
    table[:, 9] = 0.5  # now E reads x0_prev2: the NaN moved there from x0_buf, and it shows
    table[:, 5] = 0.0
    b1.fill_(float("nan"))
    out = sampler_step(x, m, table, 0, x0_buf=b1, x0_buf2=b2, stochastic=False, backend=backend)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", ["none", "clip", "threshold"])
def test_nan_is_not_clipped_away(backend, clip):
    """A NaN in the input stays NaN through clipping and thresholding on every backend (as torch.clamp keeps it,
    and the reference does), instead of becoming a finite bound that hides a diverged run."""
    _skip_unavailable(backend)
    dev = _device(backend)
    x, m, *_ = _inputs((2, 3, 4, 4), torch.float32, dev)
    x[0, 1, 2, 3] = float("nan")
    m[1, 0, 0, 0] = float("nan")
    thr = torch.tensor([1.5, 2.0], device=dev) if clip == "threshold" else None
    table = _table(3, dev, d=False, s=False)
    out = sampler_step(x, m, table, 1, clip=clip, thresh=thr, backend=backend)
    ref = sampler_step(x, m, table, 1, clip=clip, thresh=thr, backend="torch")
    assert out[0, 1, 2, 3].isnan() and out[1, 0, 0, 0].isnan()
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.nan_to_num(0.0), ref.nan_to_num(0.0), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("var_mode", ["fixed", "learned", "learned_range"])
@pytest.mark.parametrize("noise", ["philox", "given", "off"])
def test_noise_and_variance(backend, var_mode, noise):
    _skip_unavailable(backend)
    dev = _device(backend)
    shape = (2, 3, 6, 5)
    x, m, _, z, v = _inputs(shape, torch.float32, dev)
    if var_mode == "learned":
        v = v.abs() + 0.01
    table = _table(3, dev)
    out, ref, _, _ = _run(backend, x, m, table, 1, noise=z if noise == "given" else None, var_values=v,
                          var_mode=var_mode, stochastic=noise != "off", seed=99)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_and_channels_last(backend):
    """Model outputs that are halves of a bigger tensor (learned variance, batched CFG) are read in place, and a
    channels-last x keeps its layout."""
    _skip_unavailable(backend)
    dev = _device(backend)
    x = torch.randn(2, 3, 4, 4, device=dev)
    both = torch.randn(2, 6, 4, 4, device=dev)
    eps, var = both[:, :3], both[:, 3:]
    table = _table(2, dev)
    out, ref, _, _ = _run(backend, x, eps, table, 0, var_values=var, var_mode="learned_range", seed=5)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=3e-5)
    xc = x.to(memory_format=torch.channels_last)
    mc = torch.randn_like(xc)
    out, ref, _, _ = _run(backend, xc, mc, table, 1, seed=5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=3e-5)
    # a model output in a different layout than x is matched to x's (a copy) and gives the same result
    out2 = sampler_step(xc, mc.contiguous(), table, 1, seed=5, backend=backend)
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_is_read_on_the_device_and_clamped(backend):
    _skip_unavailable(backend)
    dev = _device(backend)
    x, m, _, _, _ = _inputs((2, 8), torch.float32, dev)
    table = _table(5, dev)
    a = sampler_step(x, m, table, torch.tensor(4, device=dev), seed=3, backend=backend)
    b = sampler_step(x, m, table, 4, seed=3, backend=backend)
    c = sampler_step(x, m, table, torch.tensor([9], device=dev), seed=3, backend=backend)  # clamped to 4
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, sampler_step(x, m, table, 3, seed=3, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_seeded(backend):
    _skip_unavailable(backend)
    dev = _device(backend)
    x, m, _, _, _ = _inputs((4, 3, 8, 8), torch.float32, dev)
    table = _table(3, dev)
    a = sampler_step(x, m, table, 1, seed=11, backend=backend)
    b = sampler_step(x, m, table, 1, seed=11, backend=backend)
    c = sampler_step(x, m, table, 1, seed=12, backend=backend)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.1


def test_philox_noise_is_standard_normal_and_independent():
    z = reference.philox_normal(1234, 0, 1 << 18)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    # the four normals of a Philox call are uncorrelated, as are neighbouring steps and seeds
    g = z.reshape(-1, 4)
    c = torch.corrcoef(g.T)
    assert (c - torch.eye(4)).abs().max() < 0.02
    z1 = reference.philox_normal(1234, 1, 1 << 18)
    z2 = reference.philox_normal(1235, 0, 1 << 18)
    assert abs(torch.corrcoef(torch.stack([z, z1]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([z, z2]))[0, 1]) < 0.01
    # tails: the fraction beyond 3 sigma is about 0.27%
    assert 0.0020 < (z.abs() > 3).float().mean().item() < 0.0034
    # the same (seed, step, index) gives the same number whatever the length asked for
    assert torch.equal(reference.philox_normal(1234, 0, 37), z[:37])


def test_philox_known_answer():
    """Philox4x32-10 known-answer vectors from the Random123 distribution (kat_vectors)."""
    def run(c, k):
        cs = [torch.tensor([v], dtype=torch.int64) for v in c]
        out = reference.philox4x32_10(*cs, k[0] | (k[1] << 32))
        return [int(o.item()) for o in out]

    assert run([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_noise_matches_reference(backend):
    """CPU, CUDA and Triton draw the same noise for the same (seed, step, element index)."""
    _skip_unavailable(backend)
    dev = _device(backend)
    n = 4099  # not a multiple of 4: the tail group is partial
    x = torch.zeros(1, n, device=dev)
    table = torch.zeros(3, 12, device=dev)
    table[:, 6] = 1.0  # out = z
    for seed, step in ((0, 0), (2**63 + 5, 2), (123456789, 1)):
        out = sampler_step(x, x, table, step, seed=seed, backend=backend)
        ref = reference.philox_normal(seed, step, n).reshape(1, n)
        torch.testing.assert_close(out.cpu(), ref, atol=2e-5, rtol=2e-5)


def test_opcheck():
    if not fastdiff.info()["cpu_extension"]:
        pytest.skip("the compiled extension is not built")
    x = torch.randn(2, 3, 4, 4)
    m, u = torch.randn_like(x), torch.randn_like(x)
    table = _table(4, "cpu")
    step = torch.tensor(2)
    buf = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fastdiff.sampler_step,
                          (x, m, u, 3.0, table, step, None, buf, None, None, 7, 0, 1, 1.0, True))
    torch.library.opcheck(torch.ops.fastdiff.sampler_step,
                          (x, m, None, 1.0, table, step, None, None, None, torch.ones(2), 7, 0, 2, 1.0, False))
    torch.library.opcheck(torch.ops.fastdiff.sampler_step,
                          (x, m, u, 3.0, table, step, None, buf, None, None, 7, 0, 1, 1.0, True, torch.randn_like(x)))
    keep = table.clone()
    keep[:, 11] = 1.0
    for t in (table, keep):
        torch.library.opcheck(torch.ops.fastdiff.sampler_step,
                              (x, m, u, 3.0, t, step, None, buf, None, None, 7, 0, 1, 1.0, True, torch.randn_like(x),
                               torch.randn_like(x)))


@pytest.mark.triton
def test_opcheck_triton():
    _skip_unavailable("triton")
    dev = _device("triton")
    x = torch.randn(2, 3, 4, 4, device=dev)
    table = _table(4, dev)
    torch.library.opcheck(torch.ops.fastdiff.sampler_step_triton,
                          (x, torch.randn_like(x), None, 1.0, table, torch.tensor(1, device=dev), None,
                           torch.randn_like(x), None, None, 7, 0, 1, 1.0, True, torch.randn_like(x)),
                          # the interpreter reads data pointers, which fake tensors lack: schema only there
                          test_utils=("test_schema",) if not HAS_GPU else
                          ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compile_fullgraph():
    if not fastdiff.info()["cpu_extension"]:
        pytest.skip("the compiled extension is not built")
    x = torch.randn(2, 3, 4, 4)
    m = torch.randn_like(x)
    table = _table(4, "cpu")
    buf = torch.randn_like(x)
    step = torch.tensor(1)

    def f(x, m, buf, step):
        return sampler_step(x, m, table, step, x0_buf=buf, seed=3, clip="clip", backend="cpu")

    b1, b2 = buf.clone(), buf.clone()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, m, b1, step)
    want = f(x, m, b2, step)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(b1, b2)

    def f2(x, m, buf, buf2, step):  # both history buffers mutated in place under compile too
        return sampler_step(x, m, table, step, x0_buf=buf, x0_buf2=buf2, seed=3, backend="cpu")

    c1, c2, d1, d2 = buf.clone(), torch.randn_like(x), buf.clone(), None
    d2 = c2.clone()
    got = torch.compile(f2, fullgraph=True, backend="aot_eager")(x, m, c1, c2, step)
    want = f2(x, m, d1, d2, step)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(c1, d1)
    torch.testing.assert_close(c2, d2)
    assert torch.equal(c2, buf)  # x0_buf2 holds what x0_buf held


def test_auto_backend():
    x = torch.randn(2, 3)
    want = "cpu" if fastdiff.info()["cpu_extension"] else "torch"
    assert choose_backend(x) == want
    assert choose_backend(x.double()) == "torch"
    with fastdiff.set_backend("torch"):
        assert choose_backend(x) == "torch"


def test_float64_on_the_torch_backend():
    x = torch.randn(2, 5, dtype=torch.float64)
    out = sampler_step(x, torch.randn_like(x), _table(2, "cpu"), 0, seed=1)
    assert out.dtype == torch.float64
    with pytest.raises(ValueError, match="backend"):
        sampler_step(x, torch.randn_like(x), _table(2, "cpu"), 0, backend="cpu")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_x0_buf_laid_out_unlike_x_is_refused_not_copied(backend):
    _skip_unavailable(backend)
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    m = torch.randn_like(x)
    buf = torch.zeros(2, 3, 4, 5)  # NCHW: a copy in x's layout would be updated, this buffer left stale
    with pytest.raises(ValueError, match="^x0_buf: must be laid out like x"):
        sampler_step(x, m, _table(3, "cpu"), 0, x0_buf=buf, backend=backend)
    good = torch.zeros_like(x)
    sampler_step(x, m, _table(3, "cpu"), 0, x0_buf=good, backend=backend)
    assert good.abs().sum() > 0  # the kernel wrote x0 into the caller's buffer


def test_bad_arguments():
    x = torch.randn(2, 3, 4)
    m = torch.randn_like(x)
    t = _table(3, "cpu")
    with pytest.raises(TypeError, match="^x:"):
        sampler_step(x.long(), m, t, 0)
    with pytest.raises(ValueError, match="^model_output:"):
        sampler_step(x, m[:1], t, 0)
    with pytest.raises(ValueError, match="^uncond:"):
        sampler_step(x, m, t, 0, uncond=m[:, :1])
    with pytest.raises(ValueError, match="^table:"):
        sampler_step(x, m, t[:, :5], 0)
    with pytest.raises(TypeError, match="^table:"):
        sampler_step(x, m, t.double(), 0)
    with pytest.raises(TypeError, match="^step:"):
        sampler_step(x, m, t, 0.5)
    with pytest.raises(TypeError, match="^step:"):
        sampler_step(x, m, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="^clip:"):
        sampler_step(x, m, t, 0, clip="yes")
    with pytest.raises(ValueError, match="^thresh:"):
        sampler_step(x, m, t, 0, clip="threshold")
    with pytest.raises(ValueError, match="^var_mode:"):
        sampler_step(x, m, t, 0, var_mode="big")
    with pytest.raises(ValueError, match="^var_values:"):
        sampler_step(x, m, t, 0, var_mode="learned")
    with pytest.raises(TypeError, match="^x0_buf:"):
        sampler_step(x, m, t, 0, x0_buf=x.double())
    # x0_buf is written in place: never copied into x's layout, never shared between samples
    with pytest.raises(ValueError, match="^x0_buf: must be laid out like x"):
        sampler_step(x, m, t, 0, x0_buf=torch.zeros_like(x).transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="^x0_buf: must be laid out like x"):
        sampler_step(x, m, t, 0, x0_buf=torch.zeros_like(x[:1]).expand_as(x))
    # x0_buf2: only with x0_buf, never the same memory, written in place like it
    with pytest.raises(ValueError, match="^x0_buf2: given without x0_buf"):
        sampler_step(x, m, t, 0, x0_buf2=torch.zeros_like(x))
    shared = torch.zeros(2, *x.shape)
    with pytest.raises(ValueError, match="^x0_buf2: shares memory with x0_buf"):
        sampler_step(x, m, t, 0, x0_buf=shared[0], x0_buf2=shared[0])
    with pytest.raises(ValueError, match="^x0_buf2: shares memory with x0_buf"):
        big = torch.zeros(3 * x.numel())
        sampler_step(x, m, t, 0, x0_buf=big[:x.numel()].view(x.shape), x0_buf2=big[5:5 + x.numel()].view(x.shape))
    sampler_step(x, m, t, 0, x0_buf=shared[0], x0_buf2=shared[1])  # two halves of one tensor: fine
    with pytest.raises(TypeError, match="^x0_buf2:"):
        sampler_step(x, m, t, 0, x0_buf=torch.zeros_like(x), x0_buf2=x.double())
    with pytest.raises(ValueError, match="^x0_buf2: must be laid out like x"):
        sampler_step(x, m, t, 0, x0_buf=torch.zeros_like(x), x0_buf2=torch.zeros_like(x[:1]).expand_as(x))
    with pytest.raises(ValueError, match="^x0_buf3: given without x0_buf2"):
        sampler_step(x, m, t, 0, x0_buf=torch.zeros_like(x), x0_buf3=torch.zeros_like(x))
    three = torch.zeros(3, *x.shape)
    with pytest.raises(ValueError, match="^x0_buf3: shares memory with x0_buf "):
        sampler_step(x, m, t, 0, x0_buf=three[0], x0_buf2=three[1], x0_buf3=three[0])
    with pytest.raises(ValueError, match="^x0_buf3: shares memory with x0_buf2"):
        sampler_step(x, m, t, 0, x0_buf=three[0], x0_buf2=three[1], x0_buf3=three[1])
    sampler_step(x, m, t, 0, x0_buf=three[0], x0_buf2=three[1], x0_buf3=three[2])
    # a written buffer sharing memory with an input: threads would overwrite values others still read
    flat = torch.zeros(3 * x.numel())
    xs = flat[:x.numel()].view(x.shape).copy_(x)
    for kw, name in (({"x0_buf": flat[3:3 + x.numel()].view(x.shape)}, "x0_buf: shares memory with x"),
                     ({"x0_buf": m}, "x0_buf: shares memory with model_output"),
                     ({"x0_buf": three[0], "x0_buf2": m}, "x0_buf2: shares memory with model_output"),
                     ({"x0_buf": three[0], "x0_buf2": three[1], "x0_buf3": xs}, "x0_buf3: shares memory with x")):
        with pytest.raises(ValueError, match="^" + name):
            sampler_step(xs, m, t, 0, **kw)
    noise = torch.randn_like(x)
    with pytest.raises(ValueError, match="^x0_buf: shares memory with noise"):
        sampler_step(x, m, t, 0, noise=noise, x0_buf=noise)
    if fastdiff.info()["cpu_extension"]:  # the op itself checks too (torch.ops.fastdiff.sampler_step called directly)
        with pytest.raises(RuntimeError, match="x0_buf2: given without x0_buf"):
            torch.ops.fastdiff.sampler_step(x, m, None, 1.0, t, torch.tensor(0), None, None, None, None, 0, 0, 0, 1.0,
                                            True, torch.zeros_like(x))
        op = torch.ops.fastdiff.sampler_step
        with pytest.raises(RuntimeError, match="x0_buf: its samples overlap in memory"):
            op(x, m, None, 1.0, t, torch.tensor(0), None, torch.zeros_like(x[:1]).expand_as(x), None, None, 0, 0, 0,
               1.0, True)
        with pytest.raises(RuntimeError, match="x0_buf: shares memory with model_output"):
            op(x, m, None, 1.0, t, torch.tensor(0), None, m, None, None, 0, 0, 0, 1.0, True)
        with pytest.raises(RuntimeError, match="x0_buf: shares memory with x "):
            op(xs, m, None, 1.0, t, torch.tensor(0), None, flat[3:3 + x.numel()].view(x.shape), None, None, 0, 0, 0,
               1.0, True)
        with pytest.raises(RuntimeError, match="x0_buf2: shares memory with x0_buf3"):
            op(x, m, None, 1.0, t, torch.tensor(0), None, three[0], None, None, 0, 0, 0, 1.0, True,
               flat[:x.numel()].view(x.shape), flat[5:5 + x.numel()].view(x.shape))
        gapped = torch.zeros(2, 2 * x[0].numel())[:, :x[0].numel()].view(x.shape)  # samples with gaps: extents
        op(x, m, None, 1.0, t, torch.tensor(0), None, gapped, None, None, 0, 0, 0, 1.0, True)  # no overlap: fine
    with pytest.raises(ValueError, match="^clip_range:"):
        sampler_step(x, m, t, 0, clip="clip", clip_range=0)
    with pytest.raises(TypeError, match="^clip_range:"):
        sampler_step(x, m, t, 0, clip="clip", clip_range="1")
    # stochastic="no" and stochastic=torch.tensor(False) were taken as truthy: noise added
    for bad in ("no", torch.tensor(False), 0):
        with pytest.raises(TypeError, match="^stochastic:"):
            sampler_step(x, m, t, 0, stochastic=bad)
    with pytest.raises(TypeError, match="^seed:"):
        sampler_step(x, m, t, 0, seed=1.5)
    with pytest.raises(TypeError, match="^guidance_scale:"):
        sampler_step(x, m, t, 0, guidance_scale="7")
    with pytest.raises(ValueError, match="^uncond:"):  # a guidance scale without uncond would be ignored
        sampler_step(x, m, t, 0, guidance_scale=7.0)
    with pytest.raises(ValueError, match="^backend:"):
        sampler_step(x, m, t, 0, backend="fast")


# Inside CUDA-graph capture a Python int (or a CPU tensor) step would need a host-to-device copy, which capture
# forbids (a cryptic CUDA error): it raises a clear error instead; a step tensor on the device is captured and
# replays with the step it holds at replay time.
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
def test_step_under_cuda_graph_capture(backend):
    _skip_unavailable(backend)
    x = torch.randn(2, 4, 8, 8, device="cuda")
    m = torch.randn_like(x)
    t = _table(4, "cuda")
    step = torch.tensor(1, device="cuda")
    sampler_step(x, m, t, step, backend=backend, seed=3)  # warm-up (Triton compiles outside capture)
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for bad, what in ((1, "a Python int"), (torch.tensor(1), "a torch.int64 tensor on cpu")):
            with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream):
                with pytest.raises(ValueError, match="^step: while a CUDA graph is captured.*" + what):
                    sampler_step(x, m, t, bad, backend=backend, seed=3)
        with torch.cuda.graph(g, stream=stream):
            out = sampler_step(x, m, t, step, backend=backend, seed=3)
    torch.cuda.current_stream().wait_stream(stream)
    for s in (1, 2):
        step.fill_(s)
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, sampler_step(x, m, t, s, backend=backend, seed=3), rtol=0, atol=0)


@pytest.mark.parametrize("clip", ["none", "clip", "threshold"])
def test_differentiated_step_runs_the_reference_with_its_gradients(clip):
    # the fused op has no backward: its output claimed requires_grad and backward gave no gradient, silently
    # (reward fine-tuning through the sampling loop lost every gradient). A differentiated step runs the reference
    x, m, u, z, v = _inputs((2, 3, 4, 5), torch.float64, "cpu")
    table = _table(6, "cpu")
    kw = dict(guidance_scale=3.0, clip=clip, thresh=torch.tensor([1.5, 0.7]) if clip == "threshold" else None,
              var_mode="learned_range")
    ins = [t.clone().requires_grad_() for t in (x, m, u, z, v)]

    def f(x, m, u, z, v):
        return sampler_step(x, m, table, 2, uncond=u, noise=z, var_values=v, **kw)

    assert torch.autograd.gradcheck(f, ins)  # float64 computes in float64 on the reference
    x32 = [t.float().requires_grad_() for t in (x, m, u, z, v)]
    with torch.no_grad():
        fused = f(*(t.detach() for t in x32))
    got = f(*x32)
    torch.testing.assert_close(got, fused, atol=2e-5, rtol=2e-5)  # the reference agrees with the kernel
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, x32, g)
    want = torch.autograd.grad(sampler_step(*x32[:2], table, 2, uncond=x32[2], noise=x32[3], var_values=x32[4],
                                            backend="torch", **kw), x32, g)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)
    assert all(t.abs().sum() > 0 for t in grads[:2])


@pytest.mark.parametrize("sampler", ["DDIMSampler", "DDPMSampler", "DPMSolverPPSampler", "DPMSolverPPSampler3"])
def test_gradients_flow_through_a_sampling_loop(sampler):
    # the history buffers of multistep solvers carry gradients from step to step; the fast path (taken from the
    # second step of a loop) runs the fused op, which has none, and must not be taken for a differentiated step
    from fastdiff import diffusion

    kw = {"solver_order": 3} if sampler.endswith("3") else {}
    cls = getattr(diffusion, sampler.rstrip("3"))
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 2, 3, padding=1).double()

    def run(x0, dtype=torch.float64, grad=True):
        s = cls(**kw)
        s.set_timesteps(4, seed=1)
        x = x0.to(dtype) * s.init_noise_sigma
        with torch.set_grad_enabled(grad):
            for i in range(4):
                x = s.step(0.1 * net.to(dtype)(s.scale_model_input(x, i)), i, x)
        return x

    x0 = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (x0,))
    a = x0.detach().float().requires_grad_()
    y = run(a, torch.float32)
    torch.testing.assert_close(y, run(a.detach(), torch.float32, grad=False), atol=1e-4, rtol=1e-4)
    (ga,) = torch.autograd.grad(y.square().sum(), a)
    with fastdiff.set_backend("torch"):
        b = a.detach().requires_grad_()
        (gb,) = torch.autograd.grad(run(b, torch.float32).square().sum(), b)
    torch.testing.assert_close(ga, gb)
    net.double()
