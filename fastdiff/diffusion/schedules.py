"""Noise schedules: the betas of a discrete-time diffusion and what follows from them.

x_t = sqrt(alphas_cumprod[t]) x_0 + sqrt(1 - alphas_cumprod[t]) eps, t = 0 .. num_train_timesteps - 1.
The betas are computed in float32 exactly as diffusers computes them (so trajectories match its schedulers);
samplers derive their float64 step coefficients from these float32 values.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Improved DDPM (Nichol & Dhariwal 2021, eq. 17), betas capped at max_beta."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last step has zero SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Algorithm 1): shift and scale sqrt(alphas_cumprod) so it ends at 0 and keeps its start."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """Betas from `beta_schedule` ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid") or `trained_betas`,
    optionally rescaled to zero terminal SNR.

    Attributes (float32 CPU tensors of length num_train_timesteps): ``betas``, ``alphas``, ``alphas_cumprod``,
    ``sigmas`` (sqrt((1 - a) / a), the variance-exploding noise level) and ``log_snr`` (log(a / (1 - a))).
    ``to(device)`` gives the same tensors on a device, moved once and cached.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, rescale_betas_zero_snr: bool = False):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral) \
                or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps: expected an int >= 2, got {num_train_timesteps!r}")
        T = int(num_train_timesteps)
        if trained_betas is not None:
            betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64)).to(torch.float32).reshape(-1)
            if betas.numel() != T:
                raise ValueError(f"trained_betas: expected {T} values (num_train_timesteps), got {betas.numel()}")
            if not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError("trained_betas: every beta must lie in (0, 1)")
        else:
            for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < 1:
                    raise ValueError(f"{name}: expected a float in (0, 1), got {v!r}")
            if beta_schedule == "linear":
                betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
            elif beta_schedule == "scaled_linear":  # latent diffusion's schedule
                betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
            elif beta_schedule == "squaredcos_cap_v2":
                betas = _betas_for_alpha_bar(T)
            elif beta_schedule == "sigmoid":  # GeoDiff
                betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
            else:
                raise ValueError(f"beta_schedule: expected one of {', '.join(BETA_SCHEDULES)}, got {beta_schedule!r}")
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.num_train_timesteps = T
        self.beta_schedule = beta_schedule if trained_betas is None else "trained"
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._set_levels(self.alphas_cumprod.double())

    def _set_levels(self, acp: torch.Tensor):
        """sigmas and log_snr from the float64 cumulative alphas; the device copies dropped."""
        with np.errstate(divide="ignore"):
            self.sigmas = ((1 - acp) / acp).sqrt().float()
            self.log_snr = (acp.log() - (1 - acp).log()).float()
        self._on: dict = {}

    def _set_alphas_cumprod(self, alphas_cumprod: torch.Tensor):
        """Replace the schedule by the one with these cumulative alphas (a schedule defined on them, as
        CogVideoX's shifted one): betas, alphas, sigmas and log_snr follow."""
        acp = alphas_cumprod.double()
        alphas = torch.cat([acp[:1], acp[1:] / acp[:-1]])
        self.alphas_cumprod = acp.float()
        self.alphas = alphas.float()
        self.betas = (1 - alphas).float()
        self._set_levels(acp)

    def to(self, device) -> dict:
        """{"betas", "alphas_cumprod", "sigmas", "log_snr"} on `device`, moved once and cached."""
        device = torch.device(device)
        key = str(device)
        if key not in self._on:
            self._on[key] = {k: getattr(self, k).to(device) for k in ("betas", "alphas_cumprod", "sigmas", "log_snr")}
        return self._on[key]

    def __repr__(self):
        return (f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r}, "
                f"rescale_betas_zero_snr={self.rescale_betas_zero_snr})")
