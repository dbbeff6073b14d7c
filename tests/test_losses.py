"""fastdiff.training.losses against a float64 transcription of openai/improved-diffusion (gaussian_diffusion.py,
losses.py): the hybrid loss's L_vlb terms, the t = 0 decoder likelihood, min-SNR weights, timestep checks."""
import math

import numpy as np
import pytest
import torch

from fastdiff.diffusion import NoiseSchedule
from fastdiff.training.losses import _make_schedule, coefs, min_snr_weight, q_sample, training_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def _adm_betas(kind, T):
    """improved-diffusion's get_named_beta_schedule, in float64."""
    if kind == "linear":
        return np.linspace(1000 / T * 1e-4, 1000 / T * 0.02, T, dtype=np.float64)

    def ab(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - ab((i + 1) / T) / ab(i / T), 0.999) for i in range(T)])


def _adm_hybrid(betas, out, x0, t, noise):
    """improved-diffusion's training_losses for an eps model with LEARNED_RANGE variances and RESCALED_MSE
    (--learn_sigma True --use_kl False): (mse, vb, loss = mse + vb * T / 1000), all float64."""
    T = len(betas)
    alphas = 1 - betas
    ac = np.cumprod(alphas)
    acp = np.append(1.0, ac[:-1])
    pv = betas * (1 - acp) / (1 - ac)
    plv = np.log(np.append(pv[1], pv[1:]))
    c1 = betas * np.sqrt(acp) / (1 - ac)
    c2 = (1 - acp) * np.sqrt(alphas) / (1 - ac)

    def ex(a):
        return torch.from_numpy(a)[t].reshape(-1, 1, 1, 1)

    x0, noise, out = x0.double(), noise.double(), out.double()
    C = x0.shape[1]
    x_t = ex(np.sqrt(ac)) * x0 + ex(np.sqrt(1 - ac)) * noise
    eps, v = out[:, :C], out[:, C:]
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    px0 = ex(np.sqrt(1 / ac)) * x_t - ex(np.sqrt(1 / ac - 1)) * eps
    model_mean = ex(c1) * px0 + ex(c2) * x_t
    true_mean = ex(c1) * x0 + ex(c2) * x_t
    frac = (v + 1) / 2
    log_var = frac * ex(np.log(betas)) + (1 - frac) * ex(plv)
    kl = 0.5 * (-1 + log_var - ex(plv) + torch.exp(ex(plv) - log_var) + (true_mean - model_mean) ** 2
                * torch.exp(-log_var))
    kl = kl.mean(dim=(1, 2, 3)) / math.log(2)

    def cdf(z):
        return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    inv = torch.exp(-0.5 * log_var)
    cp, cm = cdf(inv * (x0 - model_mean + 1 / 255)), cdf(inv * (x0 - model_mean - 1 / 255))
    logp = torch.where(x0 < -0.999, torch.log(cp.clamp(min=1e-12)),
                       torch.where(x0 > 0.999, torch.log((1 - cm).clamp(min=1e-12)),
                                   torch.log((cp - cm).clamp(min=1e-12))))
    nll = -logp.mean(dim=(1, 2, 3)) / math.log(2)
    vb = torch.where(t == 0, nll, kl)
    return mse, vb, mse + vb * T / 1000


@pytest.mark.parametrize("kind,T", [("linear", 1000), ("linear", 50), ("cosine", 1000), ("cosine", 4000)])
def test_hybrid_loss_matches_improved_diffusion(kind, T):
    """The L_vlb terms (the t = 0 decoder NLL above all) agree with improved-diffusion's float64 ones. fastdiff used
    the schedule's betas with its float32 alphas_cumprod, which disagree where alphas_cumprod is near 1: with cosine
    T = 4000 (Improved DDPM's), the t = 0 decoder mean was 0.997 x0 and L_0 1.6 times too large."""
    g = torch.Generator().manual_seed(0)
    N = 8
    x0 = torch.randint(0, 256, (N, 3, 8, 8), generator=g).float() / 127.5 - 1  # 8-bit data, both tails included
    t = torch.tensor([0, 0, 1, 2, 5, T // 2, T - 2, T - 1])
    noise = torch.randn(x0.shape, generator=g)
    eps = noise + 0.05 * torch.randn(x0.shape, generator=g)  # a good but imperfect model
    eps[0] = noise[0]                                         # and an exact one at t = 0
    var = torch.tanh(torch.randn(x0.shape, generator=g))
    out = torch.cat([eps, var], 1)
    terms = training_losses(lambda x_t, t: out, x0, t, _make_schedule(kind, T), noise=noise)
    mse, vb, loss = _adm_hybrid(_adm_betas(kind, T), out, x0, t, noise)
    torch.testing.assert_close(terms["mse"].double(), mse, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["vb"].double(), vb, rtol=1e-2, atol=0)
    torch.testing.assert_close(terms["loss"].double(), loss, rtol=1e-2, atol=0)


def test_decoder_mean_at_t0_is_the_predicted_x0():
    """q(x_{t-1} | x_t, x_0) at t = 0 is x_0 itself: its mean coefficients are exactly 1 and 0, and the posterior
    coefficients agree with the marginals x_t is drawn from, for every schedule."""
    for s in (_make_schedule("cosine", 4000), _make_schedule("linear", 1000), NoiseSchedule(1000, 0.00085, 0.012,
                                                                                             "scaled_linear")):
        c = coefs(s, "cpu").c
        assert float(c["post_c1"][0]) == pytest.approx(1.0, abs=1e-12)
        assert float(c["post_c2"][0]) == 0.0
        ab = s.alphas_cumprod.double()
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        # mean of x_{t-1} given x_0 is sqrt(ab_{t-1}) x0: so must the posterior mean averaged over x_t
        torch.testing.assert_close(c["post_c1"] + c["post_c2"] * ab.sqrt(), ab_prev.sqrt())
        # and its variance 1 - ab_{t-1}: Var[c2 x_t] + the posterior variance
        torch.testing.assert_close(c["post_c2"] ** 2 * (1 - ab) + c["post_var"], 1 - ab_prev)


def test_min_snr_weight_at_zero_terminal_snr():
    """With a zero-terminal-SNR schedule the last step has snr = 0: the eps weight min(snr, gamma) / snr is 1 there
    (its limit), not 0 / 0 = NaN, which made the whole batch's loss NaN."""
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"), torch.tensor([0.0, 1 / 3, 5 / 6, 5 / 51]))
    s = NoiseSchedule(100, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)
    assert float(s.alphas_cumprod[-1]) == 0.0
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    t = torch.tensor([50, 99])
    terms = training_losses(lambda x_t, t: torch.zeros_like(x_t), x0, t, s, min_snr_gamma=5.0)
    assert torch.isfinite(terms["loss"]).all()


def test_learned_variances_at_zero_terminal_snr():
    # target eps with learned variances: the L_vlb term's x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) is NaN at a = 0,
    # and every batch holding t = T - 1 had a NaN loss, silently; v (and x0) targets are fine there
    s = NoiseSchedule(100, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    t = torch.tensor([50, 99])

    def model(x_t, t):
        return torch.cat([0.1 * x_t, torch.zeros_like(x_t)], 1)  # mean and variance channels

    with pytest.raises(ValueError, match="^target: 'eps' with learned variances"):
        training_losses(model, x0, t, s)
    for target in ("v", "x0"):
        assert torch.isfinite(training_losses(model, x0, t, s, target=target)["loss"]).all()
    assert torch.isfinite(training_losses(lambda x_t, t: 0.1 * x_t, x0, t, s)["loss"]).all()  # fixed variances
    # the variational bound too: NaN for every target before (eps: x0; v, x0: the implied eps at T - 1)
    from fastdiff.training.losses import bits_per_dim

    small = NoiseSchedule(20, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="^target: 'eps'"):
        bits_per_dim(model, x0, small)
    for target in ("v", "x0"):
        r = bits_per_dim(model, x0, small, target=target, generator=torch.Generator().manual_seed(0))
        assert all(torch.isfinite(r[k]).all() for k in ("total_bpd", "vb", "mse")), target


@pytest.mark.parametrize("t,error,needle", [
    (torch.tensor([0, 5, -1]), ValueError, r"\[0, 99\]"),       # used to index from the end: t = 99
    (torch.tensor([0, 5, 100]), ValueError, r"\[0, 99\]"),
    (torch.tensor([0.0, 5.0, 9.0]), TypeError, "integer"),
    (torch.tensor([0, 5, 9], dtype=torch.uint8), TypeError, "integer"),  # would index as a mask
    (torch.tensor([1, 2]), ValueError, r"\(3,\)"),
    ([0, 5, 9], TypeError, "tensor"),
])
def test_bad_timesteps_are_refused(t, error, needle):
    s = _make_schedule("linear", 100)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    with pytest.raises(error, match=r"^t: .*" + needle):
        training_losses(lambda x_t, t: torch.zeros_like(x_t), x0, t, s)
    with pytest.raises(error, match=r"^t: "):
        q_sample(s, x0, t, torch.randn_like(x0))
    ok = training_losses(lambda x_t, t: torch.zeros_like(x_t), x0, torch.tensor([0, 5, 99], dtype=torch.int32), s)
    assert ok["loss"].shape == (3,)


def test_hybrid_loss_takes_cpu_timesteps_for_device_data():
    # the timestep samplers return t on the CPU; with learned variances torch.where(t == 0, L_0, KL) then mixed a
    # CPU condition with device tensors and raised (on a GPU: "Expected all tensors to be on the same device").
    # The meta device stands in for CUDA here.
    s = _make_schedule("linear", 100)
    x0 = torch.empty(3, 1, 4, 4, device="meta")
    seen = []

    def model(x_t, t):
        seen.append(t.device)
        return torch.zeros(3, 2, 4, 4, device="meta")

    terms = training_losses(model, x0, torch.tensor([0, 5, 99]), s, noise=torch.empty_like(x0))
    assert terms["vb"].device.type == "meta" and terms["loss"].shape == (3,)
    assert seen == [x0.device]
    with pytest.raises(ValueError, match=r"^t: .*\[0, 99\]"):  # still checked while on the CPU
        training_losses(model, x0, torch.tensor([0, 5, 100]), s, noise=torch.empty_like(x0))


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (1, 4, 4)])
def test_noise_that_would_broadcast_is_refused(shape):
    # a (1, C, H, W) noise broadcast over the batch: every sample noised with the same draw, silently
    s = _make_schedule("linear", 100)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    t = torch.tensor([0, 5, 9])
    with pytest.raises(ValueError, match=r"^noise: .*\(3, 1, 4, 4\)"):
        training_losses(lambda x_t, t: torch.zeros_like(x_t), x0, t, s, noise=torch.randn(shape))
    with pytest.raises(ValueError, match="^noise:"):
        q_sample(s, x0, t, torch.randn(shape))
