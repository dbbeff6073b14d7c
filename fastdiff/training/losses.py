"""Diffusion training objectives (DDPM, Improved DDPM, min-SNR) and the variational bound in bits per dimension.

Everything takes a *schedule*: any object with ``betas`` and ``alphas_cumprod`` (1-D float tensors of length T)
and ``num_train_timesteps`` (T). The per-timestep coefficients are derived from alphas_cumprod once, in float64
(the betas as 1 - ab_t / ab_{t-1}, so that the posterior is the one of the marginals x_t is drawn from), and
gathered per sample in float32.

Conventions: data x0 in [-1, 1]; the model maps (x_t, t, **model_kwargs) to its prediction of the target
(``"eps"``, ``"x0"`` or ``"v"``), with a second half of channels when it learns its variances (Improved DDPM's
"learned range": v in [-1, 1] interpolates log beta_t and the clipped log posterior variance).
"""
from __future__ import annotations

import math
import numbers

import torch

TARGETS = ("eps", "x0", "v")


# -- schedules ----------------------------------------------------------------------------------------------------

def _make_schedule(kind: str = "linear", num_train_timesteps: int = 1000):
    """The training schedule, as the samplers see it (fastdiff.diffusion.NoiseSchedule): "linear" is DDPM's
    (1e-4 to 0.02, rescaled to T steps as ADM does), "cosine" Improved DDPM's (squaredcos_cap_v2); any other
    NoiseSchedule beta_schedule name is passed through."""
    from fastdiff.diffusion.schedules import NoiseSchedule

    T = int(num_train_timesteps)
    if T <= 0:
        raise ValueError(f"num_train_timesteps: expected a positive int, got {num_train_timesteps!r}")
    if kind == "linear":
        scale = 1000.0 / T
        if not scale * 0.02 < 1:  # beta_end reaches 1: name what the user set, not the derived beta_end
            raise ValueError(f"num_train_timesteps: the 'linear' schedule (betas 1e-4 to 0.02 rescaled by 1000/T) "
                             f"needs T > 20 (--num-timesteps), got {T}")
        return NoiseSchedule(T, beta_start=scale * 1e-4, beta_end=scale * 0.02, beta_schedule="linear")
    return NoiseSchedule(T, beta_schedule="squaredcos_cap_v2" if kind == "cosine" else kind)


class _Coefs:
    """Per-timestep constants of the Gaussian diffusion (guided-diffusion's GaussianDiffusion), on one device."""

    def __init__(self, schedule, device):
        b = torch.as_tensor(schedule.betas, dtype=torch.float64).cpu()
        ab = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float64).cpu()
        T = int(schedule.num_train_timesteps)
        if b.dim() != 1 or ab.shape != b.shape or len(b) != T:
            raise ValueError(f"schedule: betas and alphas_cumprod must be 1-D of length num_train_timesteps={T}, "
                             f"got {tuple(b.shape)} and {tuple(ab.shape)}")
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        # The posterior and the variances use the betas of the marginals x_t is drawn from (q_sample):
        # 1 - ab_t / ab_{t-1}, as diffusers' DDPM step (and fastdiff's) does. The schedule's own betas disagree with
        # its float32 alphas_cumprod by the rounding of 1 - ab_t, which is large where ab_t is near 1: with cosine
        # T=4000, 1 - ab_0 is 0.3% above beta_0, so the t=0 decoder mean was 0.997 x0 (an exact model's L_0 1.6x
        # improved-diffusion's).
        b = 1 - ab / ab_prev
        post_var = b * (1 - ab_prev) / (1 - ab)
        c = {
            "sqrt_ab": ab.sqrt(), "sqrt_1mab": (1 - ab).sqrt(), "log_1mab": torch.log(1 - ab),
            "sqrt_recip_ab": (1 / ab).sqrt(), "sqrt_recipm1_ab": (1 / ab - 1).sqrt(),
            "snr": ab / (1 - ab),
            "post_var": post_var,
            # the first posterior variance is 0: ADM clips its log by repeating the second
            "post_log_var": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "post_c1": b * ab_prev.sqrt() / (1 - ab), "post_c2": (1 - ab_prev) * (1 - b).sqrt() / (1 - ab),
            "log_beta": torch.log(b),
        }
        # ADM's "fixed large" variance for models that do not learn it
        c["fixed_log_var"] = torch.log(torch.cat([post_var[1:2], b[1:]]))
        self.zero_snr = bool(ab[-1] == 0)  # rescale_betas_zero_snr: x0 cannot be had from eps at t = T - 1
        self.T = T
        self.c = {k: v.to(device) for k, v in c.items()}

    def __call__(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """coefficient[t] as float32, shaped (N, 1, 1, ...) to broadcast against an ndim-D batch."""
        v = self.c[name][t].float()
        return v.reshape(v.shape + (1,) * (ndim - 1))


_COEF_CACHE: dict = {}


def coefs(schedule, device) -> _Coefs:
    key = (id(schedule), str(device))
    hit = _COEF_CACHE.get(key)
    if hit is None or hit[0] is not schedule:
        hit = (schedule, _Coefs(schedule, device))
        _COEF_CACHE[key] = hit
    return hit[1]


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def _check_timesteps(t, batch: int, T: int):
    """t: one integer timestep per sample, in [0, T). The range is checked on CPU tensors only (a device tensor's
    check would sync); out of range, a negative t would otherwise silently index from the end (t = -1 is T - 1)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t: expected a tensor of integer timesteps, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:  # uint8 / bool would index as a mask, floats not at all
        raise TypeError(f"t: expected an integer tensor (int64), got {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"t: expected shape ({batch},), one timestep per sample, got {tuple(t.shape)}")
    if t.device.type == "cpu" and batch and (int(t.min()) < 0 or int(t.max()) >= T):
        raise ValueError(f"t: timesteps must lie in [0, {T - 1}] (num_train_timesteps={T}), got "
                         f"{int(t.min())} .. {int(t.max())}")


def q_sample(schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise; t: (N,) integer timesteps in [0, T)."""
    c = coefs(schedule, x0.device)
    _check_timesteps(t, x0.shape[0], c.T)
    if not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
        # a (1, C, H, W) or (C, H, W) noise would broadcast: every sample of the batch noised (and scored) alike
        raise ValueError(f"noise: expected a tensor of x0's shape {tuple(x0.shape)}, got "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    return c("sqrt_ab", t, x0.dim()) * x0 + c("sqrt_1mab", t, x0.dim()) * noise


def _target(c, target, x0, x_t, t, noise):
    if target == "eps":
        return noise
    if target == "x0":
        return x0
    return c("sqrt_ab", t, x0.dim()) * noise - c("sqrt_1mab", t, x0.dim()) * x0  # v


def _pred_x0(c, target, out, x_t, t):
    n = x_t.dim()
    if target == "eps":
        return c("sqrt_recip_ab", t, n) * x_t - c("sqrt_recipm1_ab", t, n) * out
    if target == "x0":
        return out
    return c("sqrt_ab", t, n) * x_t - c("sqrt_1mab", t, n) * out  # from v


def _split(out, channels, learn_sigma):
    if learn_sigma:
        if out.shape[1] != 2 * channels:
            raise ValueError(f"model: learned variances need 2 * {channels} output channels, got {out.shape[1]}")
        return out[:, :channels], out[:, channels:]
    if out.shape[1] != channels:
        raise ValueError(f"model: expected {channels} output channels (or {2 * channels} with learned variances), "
                         f"got {out.shape[1]}")
    return out, None


def _model_log_var(c, var_values, t, ndim):
    if var_values is None:
        return c("fixed_log_var", t, ndim)
    frac = (var_values + 1) / 2  # learned range: interpolate log beta_t and the clipped log posterior variance
    return frac * c("log_beta", t, ndim) + (1 - frac) * c("post_log_var", t, ndim)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of x in [-1, 1] quantised to 256 levels (bin width 2/255) under N(means, e^(2 log_scales))."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(t):
    return t.mean(dim=tuple(range(1, t.dim())))


def _vb_term(c, x0, x_t, t, pred_x0, log_var):
    """L_t in bits per dimension: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), or the decoder NLL at t = 0."""
    n = x0.dim()
    true_mean = c("post_c1", t, n) * x0 + c("post_c2", t, n) * x_t
    true_log_var = c("post_log_var", t, n)
    model_mean = c("post_c1", t, n) * pred_x0 + c("post_c2", t, n) * x_t
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, log_var)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def min_snr_weight(snr: torch.Tensor, gamma: float, target: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), expressed for each prediction target."""
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not gamma > 0 or math.isinf(gamma):
        raise ValueError(f"min_snr_gamma: expected a positive finite float, got {gamma!r}")
    clipped = snr.clamp(max=gamma)
    if target == "eps":
        # min(snr, gamma) / snr -> 1 as snr -> 0: a zero-terminal-SNR step weighs 1, not 0 / 0 = NaN
        return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    if target == "x0":
        return clipped
    return clipped / (snr + 1)


def training_losses(model, x0, t, schedule, *, target: str = "eps", learn_sigma: bool | None = None,
                    lambda_vlb: float = 1e-3, min_snr_gamma: float | None = None, noise=None, model_kwargs=None):
    """Per-sample losses for one batch: a dict with "loss" (N,) and its terms "mse" and, with learned
    variances, "vb" -- all float32.

    L_simple: mean squared error to the target (eps, x0 or v), optionally min-SNR-weighted. With learned variances
    (``learn_sigma``; by default: the model returns twice x0's channels) the Improved-DDPM hybrid loss
    L_simple + lambda_vlb * T * L_t, where L_t (bits/dim) sees the predicted mean through a stop-gradient, so
    L_vlb trains only the variances. Average with the timestep sampler's weights for the batch loss.
    """
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
    if isinstance(lambda_vlb, bool) or not isinstance(lambda_vlb, numbers.Real) or not 0 <= lambda_vlb < math.inf:
        raise ValueError(f"lambda_vlb: expected a non-negative finite float, got {lambda_vlb!r}")
    c = coefs(schedule, x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = q_sample(schedule, x0, t, noise)  # checks t while it may still be on the CPU (no sync)
    t = t.to(x0.device)  # the samplers draw t on the CPU: torch.where in the L_vlb term wants it beside x0
    # the model sees x_t in x0's dtype (as diffusers' add_noise gives it: a half model need not cast its input);
    # the loss terms use the fp32 x_t
    out = model(x_t.to(x0.dtype), t, **(model_kwargs or {})).float()
    if learn_sigma is None:
        learn_sigma = out.shape[1] == 2 * x0.shape[1]
    if learn_sigma and target == "eps" and c.zero_snr:  # the L_vlb term's x0 would be inf * 0 = NaN at T - 1
        raise ValueError("target: 'eps' with learned variances needs a nonzero SNR at every timestep (x0 is "
                         "(x_t - sqrt(1 - a) eps) / sqrt(a)); this schedule ends at zero SNR: use target 'v' or 'x0'")
    pred, var_values = _split(out, x0.shape[1], learn_sigma)
    x0f, x_tf = x0.float(), x_t.float()
    mse = _mean_flat((_target(c, target, x0f, x_tf, t, noise.float()) - pred) ** 2)
    if min_snr_gamma is not None:
        snr = c.c["snr"][t].float()
        mse = mse * min_snr_weight(snr, min_snr_gamma, target)
    terms = {"mse": mse}
    loss = mse
    if learn_sigma:
        frozen_x0 = _pred_x0(c, target, pred.detach(), x_tf, t)
        vb = _vb_term(c, x0f, x_tf, t, frozen_x0, _model_log_var(c, var_values, t, x0.dim()))
        terms["vb"] = vb
        loss = loss + lambda_vlb * c.T * vb
    terms["loss"] = loss
    return terms


@torch.no_grad()
def bits_per_dim(model, x0, schedule, *, target: str = "eps", learn_sigma: bool | None = None, model_kwargs=None,
                 clip_denoised: bool = True, generator: torch.Generator | None = None) -> dict:
    """The full variational bound -log p(x0) <= L_0 + ... + L_{T-1} + L_prior in bits per dimension (ADM's
    calc_bpd_loop): T model evaluations per batch. Returns "total_bpd" (N,), "prior_bpd" (N,), "vb" (N, T) and
    "mse" (N, T) (of the eps implied by the model). x0 in [-1, 1], quantised to 8 bits for L_0.
    """
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
    c = coefs(schedule, x0.device)
    if target == "eps" and c.zero_snr:  # x0 from eps at alpha = 0 is inf * 0: the bound would be NaN
        raise ValueError("target: 'eps' needs a nonzero SNR at every timestep to give x0; this schedule ends at "
                         "zero SNR: use a 'v' or 'x0' model")
    x0f = x0.float()
    N, n = x0.shape[0], x0.dim()
    vbs, mses = [], []
    for i in reversed(range(c.T)):
        t = torch.full((N,), i, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else x0.device)
        noise = noise.to(x0.device)
        x_t = q_sample(schedule, x0f, t, noise)
        out = model(x_t.to(x0.dtype), t, **(model_kwargs or {})).float()
        ls = out.shape[1] == 2 * x0.shape[1] if learn_sigma is None else learn_sigma
        pred, var_values = _split(out, x0.shape[1], ls)
        px0 = _pred_x0(c, target, pred, x_t, t)
        if clip_denoised:
            px0 = px0.clamp(-1, 1)
        vbs.append(_vb_term(c, x0f, x_t, t, px0, _model_log_var(c, var_values, t, n)))
        if c.zero_snr and i == c.T - 1:  # x_t is the noise itself there (the formula is inf / inf)
            eps = x_t
        else:
            eps = (c("sqrt_recip_ab", t, n) * x_t - px0) / c("sqrt_recipm1_ab", t, n)
        mses.append(_mean_flat((eps - noise) ** 2))
    vb = torch.stack(vbs[::-1], dim=1)
    mse = torch.stack(mses[::-1], dim=1)
    last = torch.full((N,), c.T - 1, device=x0.device, dtype=torch.long)
    prior = _mean_flat(normal_kl(c("sqrt_ab", last, n) * x0f, c("log_1mab", last, n), torch.zeros_like(x0f),
                                 torch.zeros_like(x0f))) / math.log(2.0)
    return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "mse": mse}


# -- timestep samplers --------------------------------------------------------------------------------------------

class UniformSampler:
    """t ~ U{0, ..., T-1}, weights 1."""

    name = "uniform"

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def probs(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, generator: torch.Generator | None = None):
        """(t, weights) on the CPU: t (batch,) long, weights (batch,) float32 = 1 / (T p(t))."""
        p = self.probs()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        w = (1.0 / (self.num_timesteps * p[t])).float()
        return t, w

    def update(self, t, losses):
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class ImportanceSampler(UniformSampler):
    """Improved DDPM's loss-aware sampler: p(t) proportional to sqrt(E[L_t^2]) over the last `history` losses
    of each t, mixed with a little of the uniform; uniform until every t has a full history. Feed it the
    per-sample L_vlb terms with :meth:`update`.
    """

    name = "importance"

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 1e-3):
        super().__init__(num_timesteps)
        self.history, self.uniform_prob = history, uniform_prob
        self.loss_history = torch.zeros(self.num_timesteps, history, dtype=torch.float64)
        self.loss_counts = torch.zeros(self.num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def probs(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().probs()
        w = self.loss_history.pow(2).mean(dim=1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t, losses):
        """Record per-sample losses (any device; moved to the CPU) of timesteps t, in order."""
        for ti, li in zip(t.detach().cpu().tolist(), losses.detach().double().cpu().tolist()):
            if self.loss_counts[ti] == self.history:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:].clone()
                self.loss_history[ti, -1] = li
            else:
                self.loss_history[ti, self.loss_counts[ti]] = li
                self.loss_counts[ti] += 1

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict):
        self.loss_history.copy_(state["loss_history"])
        self.loss_counts.copy_(state["loss_counts"])


def create_timestep_sampler(name: str, num_timesteps: int) -> UniformSampler:
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "importance":
        return ImportanceSampler(num_timesteps)
    raise ValueError(f"timestep_sampler: expected 'uniform' or 'importance', got {name!r}")
