"""Samplers: DDPM, DDIM, Euler, Euler ancestral, Heun, DPM2 (KDPM2) and DPM2 ancestral, K-LMS, DPM-Solver++ (2M, 3M
and their SDE forms; single-step 2S/3S), DPM++ SDE, DEIS, UniPC, PNDM (PLMS), LCM, TCD, flow-matching Euler and Heun,
EDM's Euler and DPM-Solver++ (and its cosine form), CogVideoX's DDIM and DPM, and DDIM and DPM-Solver++ inversion,
each one fused kernel per step and no host sync.

Every sampler here writes its step as x_prev = A x + B m + C x0 + D x0_prev + E x0_prev2 + F x0_prev3 + std z (m the
model output after classifier-free guidance, x0 = clip(PX x + PM m) -- or whatever the multistep history needs there:
the noise prediction for DEIS, the ODE derivative for K-LMS, the model output for PNDM -- and x0_prev .. x0_prev3
the values of the steps before, kept on the device by the kernel). ``set_timesteps`` computes the coefficients of every step once,
in float64 on the host from the float32 schedule (as diffusers computes it), and moves them to the device as a
(num_steps, 12) table; ``step`` hands the table and the step index to fastdiff.ops.sampler_step, which reads the row
on the device. Nothing in ``step`` reads a tensor value on the host, so the loop runs ahead of the GPU and can be
captured in a CUDA graph.

Options are named as in diffusers' scheduler configs, with the defaults of the matching diffusers scheduler, and
``Sampler.from_config(scheduler.config)`` gives the same trajectory as that scheduler (DDPMScheduler,
DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler,
DPMSolverMultistepScheduler, DEISMultistepScheduler, UniPCMultistepScheduler, PNDMScheduler, LCMScheduler,
FlowMatchEulerDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, TCDScheduler,
EDMEulerScheduler, EDMDPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, CogVideoXDDIMScheduler,
CogVideoXDPMScheduler, FlowMatchHeunDiscreteScheduler; in distribution, their Brownian-tree noise not drawn:
DPMSolverSDEScheduler and CosineDPMSolverMultistepScheduler;
DDIMInverseScheduler and DPMSolverMultistepInverseScheduler, which run backwards for inversion).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np
import torch

from fastdiff import _backend, ops
from fastdiff.diffusion.schedules import BETA_SCHEDULES, NoiseSchedule
from fastdiff.ops._common import needs_grad
from fastdiff.ops.sampler_step import (CLIP_MODES, TABLE_WIDTH, VAR_MODES, _dense_rows, _signed64, choose_backend,
                                       step_tensor)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
_PX, _PM, _A, _B, _C, _D, _S, _MINLOG, _MAXLOG, _E, _F, _KEEP = range(12)

_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr")
_THRESHOLDING = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_CLIPPING = {"clip_sample": True, "clip_sample_range": 1.0}


def _canonical_device(device) -> torch.device:
    """`device` as tensors report it: "cuda" is cuda:<current device>, "cpu:0" is cpu. A sampler compares x.device
    with its own, and torch.device("cuda") != torch.device("cuda:0")."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a device ({e})") from None
    if device.type == "cpu":
        return torch.device("cpu")
    try:
        return torch.empty(0, device=device).device
    except (RuntimeError, AssertionError) as e:  # no driver, no such GPU, a backend torch was built without
        raise ValueError(f"device: {device} cannot be used here ({str(e).splitlines()[0]})") from None


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _float64_array(values, name: str) -> np.ndarray:
    """A custom schedule (a sequence, numpy array or tensor of numbers) as a float64 numpy array; TypeError naming
    the argument for anything else."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(values).__name__}") from None


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho) from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


_SIGMA_SPACINGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}
_SPACING_OPTIONS = {"use_exponential_sigmas": False, "use_beta_sigmas": False}  # beside use_karras_sigmas


def _sigma_spacing(cfg):
    """Which of diffusers' sigma spacings the config turns on: "karras", "exponential", "beta" or None."""
    return next((kind for k, kind in _SIGMA_SPACINGS.items() if cfg.get(k)), None)


def _check_sigma_spacing(cfg):
    """use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas: bools, at most one of them on (as diffusers)."""
    on = [k for k in _SIGMA_SPACINGS if k in cfg and cfg[k]]
    for k in _SIGMA_SPACINGS:
        if k in cfg and not isinstance(cfg[k], (bool, np.bool_)):
            raise TypeError(f"{k}: expected a bool, got {type(cfg[k]).__name__}")
    if len(on) > 1:
        raise ValueError(f"{on[1]}: only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can "
                         f"be on (got {', '.join(on)})")


def _spaced_sigmas(kind: str, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, spaced as diffusers' _convert_to_karras (rho = 7),
    _convert_to_exponential (evenly in log sigma) or _convert_to_beta (at the quantiles 1 - linspace(0, 1, n) of a
    Beta(0.6, 0.6) distribution, "Beta Sampling is All You Need", Lee et al. 2024; needs scipy, as diffusers')."""
    if kind == "karras":
        return _karras(sigma_min, sigma_max, n)
    if kind == "exponential":
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
    try:
        from scipy.stats import beta as beta_dist
    except ImportError:
        raise ImportError("use_beta_sigmas: the beta spacing needs scipy (pip install scipy), as diffusers' "
                          "does") from None
    ppf = beta_dist.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)
    return sigma_min + ppf * (sigma_max - sigma_min)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear interpolation in log sigma (as diffusers)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _discrete_timesteps(spacing: str, T: int, n: int, offset: int) -> np.ndarray:
    """DDPM/DDIM timesteps (Table 2 of Lin et al. 2023 for the three spacings), as diffusers computes them."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + offset
        if ts[0] >= T:  # e.g. n = T with steps_offset=1: alphas_cumprod[T] does not exist
            raise ValueError(f"steps_offset: {offset} puts the first of {n} leading-spaced timesteps at {ts[0]}, past "
                             f"the last training timestep {T - 1}")
        return ts
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


def _sigma_run_timesteps(spacing: str, T: int, n: int, offset: int, dtype) -> np.ndarray:
    """The timesteps of the sigma-space samplers (diffusers' Euler family: fractional, in `dtype`, float32 for Euler,
    float64 for DPM++ SDE) for the three spacings."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=dtype)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(dtype) + offset
    return np.arange(T, 0, -T / n).round().copy().astype(dtype) - 1


def _ancestral_split(sigma, to):
    """Euler ancestral's split of a step from sigma to `to` (eta 1, k-diffusion's get_ancestral_step): (sigma_up,
    sigma_down), sigma_up^2 + sigma_down^2 = to^2, sigma_up = min(to, to sqrt(1 - to^2 / sigma^2))."""
    up = np.minimum(to, np.sqrt(np.maximum(to**2 * (sigma**2 - to**2) / sigma**2, 0.0)))
    return up, np.sqrt(np.maximum(to**2 - up**2, 0.0))


def _check_flags(cfg):
    """The options several samplers share, where the config has them: the sigma spacing, the bools, the positive
    floats, the thresholding ratio, final_sigmas_type."""
    _check_sigma_spacing(cfg)
    for k in ("clip_sample", "thresholding", "rescale_betas_zero_snr", "set_alpha_to_one",
              "lower_order_final", "euler_at_final", "use_clipped_model_output"):
        if k in cfg and not isinstance(cfg[k], (bool, np.bool_)):
            raise TypeError(f"{k}: expected a bool, got {type(cfg[k]).__name__}")
    for k in ("clip_sample_range", "sample_max_value"):
        if k in cfg and (not _is_real(cfg[k]) or not cfg[k] > 0):
            raise ValueError(f"{k}: expected a positive float, got {cfg[k]!r}")
    if "dynamic_thresholding_ratio" in cfg:
        r = cfg["dynamic_thresholding_ratio"]
        if not _is_real(r) or not 0 <= r <= 1:
            raise ValueError(f"dynamic_thresholding_ratio: expected a float in [0, 1], got {r!r}")
    if "final_sigmas_type" in cfg and cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type: expected 'zero' or 'sigma_min', got {cfg['final_sigmas_type']!r}")


class Sampler:
    """Base class. Subclasses define ``_options`` (name -> default), ``_fixed`` (diffusers options accepted only at
    their default) and ``_plan(n)``."""

    _options: dict = {}
    _fixed: dict = {}
    #: "score": classifier guidance shifts the score (eps <- eps - sigma_t s grad, Dhariwal & Nichol Alg. 2);
    #: "mean": it shifts the mean of x_{t-1} by s Sigma grad (Alg. 1, for ancestral sampling).
    classifier_guidance = "score"
    _multistep = False  # keeps x0_prev in a buffer (x0_buf) from step to step
    _prediction_types = PREDICTION_TYPES

    _n_buffers = 1  # the x0 history buffers a multistep sampler keeps (or properties that read the config)
    #: the custom schedules set_timesteps takes, where the matching diffusers scheduler's set_timesteps takes them:
    #: "timesteps" (training timesteps, e.g. Align Your Steps) and "sigmas" (noise levels)
    _custom_schedules: tuple = ()
    _timesteps_integral = True  # custom timesteps must be whole numbers (the model sees integer timesteps)
    _given_timesteps = None  # set_timesteps' custom timesteps (float64), while its _plan runs
    _given_sigmas = None  # likewise its custom sigmas (EulerSampler)

    @property
    def _two_buffers(self) -> bool:
        """A third-order step: x0_prev2 kept too (x0_buf2), read at set_timesteps from the config."""
        return self._n_buffers >= 2

    @property
    def _three_buffers(self) -> bool:
        """PLMS, K-LMS, UniPC-3: x0_prev3 kept too (x0_buf3)."""
        return self._n_buffers >= 3

    def __init__(self, **options):
        self._check_options(options)
        cfg = dict(self._options)
        cfg.update(options)
        self._validate(cfg)
        self.config = cfg
        self._schedule_key = None
        self._build_schedule()
        self.num_inference_steps = None
        self.timesteps = None
        self._device = torch.device("cpu")
        self._seed = None
        self._x0_buf = None
        self._x0_buf2 = None  # x0_prev2 for third-order steps, made and replaced with _x0_buf
        self._x0_buf3 = None  # x0_prev3 (PLMS), likewise
        self._x0_key = None  # x's shape, dtype, device and strides when _x0_buf was made
        self._hist2 = self._hist3 = False
        self._fast = None  # the validated plan of the last step call, reused while its inputs look the same
        self._begin_index = 0  # the step a run starts at (set_timesteps' begin_index)
        self.mu = None  # the resolution-dependent shift of the samplers with dynamic shifting (set_timesteps(mu=))

    def __getstate__(self):
        # the fast path's cache holds a torch.ops handle, which cannot be pickled (a sampler, or a pipeline holding
        # a FastdiffScheduler, could not be pickled after its first step); the next step rebuilds it
        state = dict(self.__dict__)
        state["_fast"] = None
        return state

    # -- configuration ---------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, **overrides):
        """A sampler from a diffusers scheduler config (a dict or FrozenDict, e.g. ``pipe.scheduler.config``) plus
        overrides. Keys of other schedulers are ignored (as diffusers does); options this sampler does not
        implement raise ValueError unless they hold their default."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a dict or FrozenDict, got {type(config).__name__}")
        opts = {}
        for k, v in config.items():
            if k.startswith("_"):
                continue
            if k in cls._options:
                opts[k] = v
            elif k in cls._fixed and v != cls._fixed[k] and not (v is None and cls._fixed[k] in (False, None)):
                raise ValueError(f"config: {k}={v!r} is not supported by {cls.__name__} (only {cls._fixed[k]!r})")
        opts.update(overrides)
        return cls(**opts)

    def _check_options(self, options):
        unknown = sorted(set(options) - set(self._options))
        if unknown:
            raise TypeError(f"{unknown[0]}: not an option of {type(self).__name__} (options: "
                            f"{', '.join(self._options)})")

    def _build_schedule(self):
        """(Re)build the noise schedule when an option it is made from differs from those it was built with."""
        cfg = self.config
        tb = cfg["trained_betas"]
        key = tuple(cfg[k] for k in _SCHEDULE_KEYS if k != "trained_betas") + (
            None if tb is None else tuple(np.asarray(tb, dtype=np.float64).ravel().tolist()),)
        if key != self._schedule_key:
            self.schedule = NoiseSchedule(cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"],
                                          cfg["beta_schedule"], tb, cfg["rescale_betas_zero_snr"])
            self._schedule_key = key

    def _validate(self, cfg):
        if cfg["beta_schedule"] not in BETA_SCHEDULES and cfg["trained_betas"] is None:
            raise ValueError(f"beta_schedule: expected one of {', '.join(BETA_SCHEDULES)}, got {cfg['beta_schedule']!r}")
        if cfg["prediction_type"] not in self._prediction_types:
            raise ValueError(f"prediction_type: expected one of {', '.join(self._prediction_types)}, got "
                             f"{cfg['prediction_type']!r}")
        if "timestep_spacing" in cfg and cfg["timestep_spacing"] not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing: expected one of {', '.join(TIMESTEP_SPACINGS)}, got "
                             f"{cfg['timestep_spacing']!r}")
        if not _is_int(cfg["steps_offset"]) or cfg["steps_offset"] < 0:
            raise ValueError(f"steps_offset: expected a non-negative int, got {cfg['steps_offset']!r}")
        _check_flags(cfg)

    def __repr__(self):
        diff = {k: v for k, v in self.config.items() if v != self._options[k] and k != "trained_betas"}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in diff.items())})"

    # -- the schedule of a run -------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, seed=None, begin_index: int = 0,
                      timesteps=None):
        """Choose `num_inference_steps` steps and move their coefficient table to `device` (default: the sampler's
        device, initially the CPU). `seed` keys the in-kernel noise of stochastic samplers; None draws one from
        torch's global (CPU) generator, so torch.manual_seed makes runs reproducible. `begin_index`: the step index
        a run starts at (image-to-image: x = add_noise(x0, noise, begin_index), then steps begin_index, ...): a
        multistep sampler takes its first-order step there, as diffusers does at a run's first step.
        `timesteps`: the run's training timesteps, strictly decreasing, in place of the spaced ones (e.g. an Align
        Your Steps schedule); their count is the number of steps. Taken where the matching diffusers scheduler takes
        them (DDPMSampler, EulerSampler, HeunSampler, DPMSolverPPSampler, DPMSolverSinglestepSampler, LCMSampler,
        TCDSampler; FlowMatchEulerSampler has its own), and not kept: a
        later call without them goes back to the spacing of the config."""
        given = None
        if timesteps is not None:
            given = self._check_custom_timesteps(timesteps)
            if num_inference_steps is not None and num_inference_steps != len(given):
                raise ValueError(f"num_inference_steps: {num_inference_steps!r}, but {len(given)} timesteps were "
                                 f"given (pass one or the other)")
            num_inference_steps = len(given)
        elif num_inference_steps is None:
            raise ValueError("num_inference_steps: required when no custom timesteps are given")
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected a positive int, got {num_inference_steps!r}")
        self._given_timesteps = given  # read by _plan, for this call only
        try:
            return self._set_timesteps(num_inference_steps, device, seed, begin_index)
        finally:
            self._given_timesteps = None

    def _check_custom_timesteps(self, timesteps) -> np.ndarray:
        """`timesteps` (set_timesteps' custom schedule) checked: a non-empty 1-D sequence, strictly decreasing,
        within the trained range [0, num_train_timesteps), whole numbers where the sampler's timesteps are
        integers. Returned as float64."""
        name = type(self).__name__
        if "timesteps" not in self._custom_schedules:
            takes = ", ".join(c.__name__ for c in _CUSTOM_TIMESTEP_SAMPLERS)
            raise ValueError(f"timesteps: custom timesteps are not supported by {name}, as by its diffusers "
                             f"scheduler (samplers that take them: {takes})")
        arr = _float64_array(timesteps, "timesteps")
        T = self.config["num_train_timesteps"]
        if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
            raise ValueError(f"timesteps: expected a non-empty 1-D sequence of finite numbers, got {timesteps!r}")
        if self._timesteps_integral and not (arr == np.round(arr)).all():
            raise ValueError(f"timesteps: {name} runs integer timesteps, got {timesteps!r}")
        if arr.min() < 0 or arr.max() > T - 1:
            raise ValueError(f"timesteps: expected values in [0, {T - 1}] (num_train_timesteps={T}), got "
                             f"{timesteps!r}")
        if arr.size > 1 and not (np.diff(arr) < 0).all():
            raise ValueError(f"timesteps: expected a strictly decreasing sequence, got {timesteps!r}")
        return arr

    def _set_timesteps(self, num_inference_steps, device, seed, begin_index):
        if not _is_int(begin_index) or begin_index < 0:
            raise ValueError(f"begin_index: expected a non-negative int, got {begin_index!r}")
        n = int(num_inference_steps)
        # config edits take effect here: checked as the constructor checks options, the schedule rebuilt if one
        # of its options changed (nothing is changed if a check fails)
        missing = [k for k in self._options if k not in self.config]
        if missing:
            raise TypeError(f"{missing[0]}: missing from config (an option of {type(self).__name__})")
        self._check_options(self.config)
        self._validate(self.config)
        self._build_schedule()
        new_device = _canonical_device(device) if device is not None else self._device  # taken once all is checked
        begin_before, self._begin_index = self._begin_index, int(begin_index)
        sigmas_before = getattr(self, "_sigmas_np", None)  # _plan sets it: a refused call restores it
        try:
            plan = self._plan(n)
            # the plan may hold fewer steps than asked (DPM-Solver++: trailing spacing cut short by
            # lambda_min_clipped); as diffusers, num_inference_steps and timesteps are then those of the steps run
            n = len(plan["timesteps"])
            if n == 0:
                raise ValueError(f"num_inference_steps: the sampler's options leave no step to run for "
                                 f"{num_inference_steps} steps")
            self._check_begin(int(begin_index), n)
            rows = np.zeros((n, TABLE_WIDTH), dtype=np.float64)
            rows[:, : plan["rows"].shape[1]] = plan["rows"]
            if not np.isfinite(rows).all():
                # FlowMatchEulerSampler has no prediction_type
                hint = (f" (prediction_type={self.config['prediction_type']!r} with a zero-SNR step, or two equal "
                        f"sigmas in a row?)" if "prediction_type" in self.config else "")
                raise ValueError(f"num_inference_steps: the schedule gives non-finite step coefficients for {n} "
                                 f"steps{hint}")
        except Exception:
            self._sigmas_np = sigmas_before
            raise
        finally:
            self._begin_index = begin_before
        self.num_inference_steps = n
        self._device = new_device
        self._begin_index = int(begin_index)
        self._plan_host = plan
        self._timesteps_np = plan["timesteps"]
        self._table_np = rows
        self._x0_buf = self._x0_buf2 = self._x0_buf3 = None
        self._hist2, self._hist3 = self._two_buffers, self._three_buffers
        # the per-step options, read here with the table: a config change takes effect at the next set_timesteps
        self._mode = (self._clip(), self._var_mode, self._stochastic, self._split_channels,
                      float(self.config.get("clip_sample_range", 1.0)))
        self._to_device(self._device)
        self.manual_seed(seed)
        return self

    def _to_device(self, device):
        plan = self._plan_host
        self.timesteps = torch.as_tensor(plan["timesteps"]).to(device)
        self._table = torch.tensor(self._table_np, dtype=torch.float32, device=device)
        self._device = self._table.device  # as x.device will read (an index on CUDA)
        self._steps = torch.arange(self.num_inference_steps, dtype=torch.int64, device=device)
        self._step_list = list(self._steps.unbind(0))  # 0-d views, one per step: step(i) indexes a list
        self._fast = None
        alpha, sigma = plan["alpha"], plan["sigma"]
        # classifier guidance, score form: m += k * s * grad, with k such that eps shifts by -sigma s grad
        with np.errstate(divide="ignore", invalid="ignore"):
            k = plan["cg_k"] if "cg_k" in plan else {"epsilon": -sigma, "sample": sigma**2 / alpha,
                                                     "v_prediction": -sigma / alpha}[self.config["prediction_type"]]
        # A zero-SNR step (alpha = 0, rescale_betas_zero_snr) has no finite shift for "sample" and "v_prediction":
        # the shifted x0 = (x - sigma eps') / alpha is undefined. x_t there is pure noise, independent of x0 and so
        # of y: p(y | x_t) = p(y), the true guidance gradient is 0 and a classifier's gradient carries no
        # information. The step is taken unguided (k = 0) rather than turning the whole sample into NaN.
        k = np.where(np.isfinite(k), k, 0.0)
        self._cg_k = torch.tensor(k, dtype=torch.float32, device=device)
        self._in_div = (torch.tensor(plan["in_div"], dtype=torch.float32, device=device)
                        if plan.get("in_div") is not None else None)
        self._post_var = (torch.tensor(plan["post_var"], dtype=torch.float32, device=device)
                          if plan.get("post_var") is not None else None)

    def to(self, device):
        """Move the step tables (and the sampler's state) to `device`."""
        self._device = _canonical_device(device)
        if self.num_inference_steps is not None:
            self._to_device(self._device)
            self._x0_buf = self._x0_buf2 = self._x0_buf3 = None
        return self

    @property
    def device(self) -> torch.device:
        return self._device

    def manual_seed(self, seed=None):
        """Key the in-kernel noise: the same seed gives the same noise at every step index, run to run."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # CPU generator: no device sync
        if not _is_int(seed):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        if not -(1 << 63) <= seed < 1 << 64:  # (2**64 wrapped to seed 0, as fastdiff.sample refuses)
            raise ValueError(f"seed: expected a 64-bit int (-2**63 to 2**64 - 1), got {seed!r}")
        self._seed = int(seed) & ((1 << 64) - 1)
        self._fast = None
        return self

    @property
    def seed(self):
        return self._seed

    def _require(self):
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) first")

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of the initial noise x_T (diffusers' meaning)."""
        return 1.0

    @property
    def order(self) -> int:
        """Model calls per step, as diffusers' scheduler.order (2 for Heun): image-to-image starts at step index
        t_start * order."""
        return 1

    def _check_begin(self, begin: int, n: int, name: str = "begin_index"):
        if begin >= n:
            raise ValueError(f"{name}: {begin} is past the last of the {n} steps")

    def _noise_levels(self):
        """(a, s) float64 arrays of n + 1 values: x0 noised to step i's level, in the form the sampler's x has
        there, is a[i] x0 + s[i] noise for the n steps (x at scale 1 / alpha where the plan says in_div: Euler);
        then (1, 0): x0 itself, after the last step."""
        plan = self._plan_host
        n = self.num_inference_steps
        scale = np.asarray(plan["in_div"][:n], dtype=np.float64) if plan.get("in_div") is not None else np.ones(n)
        a = np.append(np.asarray(plan["alpha"][:n], dtype=np.float64) * scale, 1.0)
        s = np.append(np.asarray(plan["sigma"][:n], dtype=np.float64) * scale, 0.0)
        return a, s

    def _add_noise_levels(self):
        """The levels add_noise gives: _noise_levels, but where diffusers' add_noise differs from them."""
        return self._noise_levels()

    def _noising_coefs(self):
        """_noise_levels as float32 tensors on the sampler's device (inpainting's blend, indexed on the device)."""
        return tuple(torch.tensor(v, dtype=torch.float32, device=self._device) for v in self._noise_levels())

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i) -> torch.Tensor:
        """x0 noised to step index i's noise level, in the form the sampler's x has there (diffusers'
        ``scheduler.add_noise(x0, noise, timesteps[i:i+1])``; flow matching: ``scale_noise``): the start of an
        image-to-image run of steps i, i+1, ... (``set_timesteps(n, begin_index=i)``), or an inpainting pipeline's
        blend after step i - 1 (a two-call sampler's second call included: diffusers' level there)."""
        self._require()
        if not isinstance(x0, torch.Tensor) or not isinstance(noise, torch.Tensor):
            raise TypeError("x0, noise: expected tensors")
        if noise.shape != x0.shape:
            raise ValueError(f"noise: expected x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        if isinstance(i, torch.Tensor) and i.device.type == "cpu" and i.numel() == 1 and not i.is_floating_point():
            i = int(i)  # a CPU step-index tensor, as step takes (no device read)
        if not _is_int(i) or not 0 <= i < self.num_inference_steps:
            raise ValueError(f"i: expected a step index in [0, {self.num_inference_steps}), got {i!r}")
        a, s = (float(v[i]) for v in self._add_noise_levels())
        ct = torch.float64 if x0.dtype == torch.float64 else torch.float32  # fp32 math for half x0, fp64 kept
        return (a * x0.to(ct) + s * noise.to(x0.device, ct)).to(x0.dtype)

    @property
    def sigmas(self):
        """Euler and DPM-Solver++: the n + 1 noise levels sqrt((1 - a) / a) of the run (numpy, the last one 0 or
        sigma_min, or the last of custom sigmas); None for the others."""
        self._require()
        return getattr(self, "_sigmas_np", None)

    def step_index(self, i) -> torch.Tensor:
        """Step `i` (an int or a one-element integer tensor) as the 0-d int64 tensor on the sampler's device that the
        kernel reads; a Python int indexes a precomputed arange (no host-to-device copy)."""
        self._require()
        if isinstance(i, torch.Tensor):
            # diffusers' loop passes the timestep t (`for t in scheduler.timesteps`); the kernel would clamp it to
            # the last row and run every step as the last one. A tensor from sampler.timesteps is refused; a CPU
            # tensor is read (free, no device sync) and checked like an int; a device tensor (the CUDA-graph loop's
            # step index) can't be read without a sync and goes to the kernel as it is.
            if _shares_storage(i, self.timesteps):
                raise TypeError("i: got a timestep from sampler.timesteps: pass the step index i "
                                "(for i, t in enumerate(sampler.timesteps)), not the timestep t")
            if i.device.type != "cpu":
                return step_tensor(i, self._device)
            if i.numel() != 1 or i.dtype.is_floating_point or i.dtype.is_complex or i.dtype == torch.bool:
                raise TypeError(f"i: expected an int or a one-element integer tensor, got {i.dtype} of shape "
                                f"{tuple(i.shape)}")
            i = int(i)
        if not _is_int(i):
            raise TypeError(f"i: expected an int or a one-element integer tensor, got {type(i).__name__}")
        if not -self.num_inference_steps <= i < self.num_inference_steps:
            raise ValueError(f"i: step index {i} out of range for {self.num_inference_steps} steps (pass the step "
                             f"index i, not the timestep t)")
        return self._step_list[int(i)]

    def timestep(self, i) -> torch.Tensor:
        """The model's timestep at step i, a 0-d tensor on the device (gathered on the device for a tensor i)."""
        st = self.step_index(i)
        return self.timesteps.index_select(0, st.reshape(1)).reshape(())

    def predict_x0(self, model_output: torch.Tensor, i, x: torch.Tensor) -> torch.Tensor:
        """x0 as step i forms it from the model output: the prediction-type conversion, then clip_sample or dynamic
        thresholding where configured (diffusers' ``pred_original_sample``, e.g. for previews). One elementwise
        pass in float32, returned in x's dtype; the step itself computes it inside its kernel."""
        self._require()
        st = self.step_index(i)
        clip, _, _, split_channels, clip_range = self._mode
        C = x.shape[1]
        if split_channels and model_output.dim() == x.dim() and model_output.shape[1] == 2 * C:
            model_output = model_output[:, :C]
        row = self._table.index_select(0, st.reshape(1))[0]
        x0 = row[_PX] * x.float() + row[_PM] * model_output.float()
        if clip == "clip":
            x0 = x0.clamp(-clip_range, clip_range)
        elif clip == "threshold":
            t = self._threshold(x, model_output, None, 1.0, st).reshape((-1,) + (1,) * (x.dim() - 1))
            x0 = torch.maximum(torch.minimum(x0, t), -t) / t
        return x0.to(x.dtype)

    def scale_model_input(self, x: torch.Tensor, i) -> torch.Tensor:
        """The model's input at step i (diffusers' meaning): x itself except for Euler, x / sqrt(sigma^2 + 1)."""
        if self._in_div_needed():
            st = self.step_index(i)
            return x / self._in_div.index_select(0, st.reshape(1)).reshape(()).to(x.device)
        return x

    def _in_div_needed(self):
        self._require()
        return self._in_div is not None

    # -- one step --------------------------------------------------------------------------------------------------
    @property
    def _stochastic(self) -> bool:
        return False

    @property
    def _var_mode(self) -> str:
        return "fixed"

    @property
    def _split_channels(self) -> bool:
        return False

    def _clip(self):
        if self.config.get("thresholding"):
            return "threshold"
        if self.config.get("clip_sample"):
            return "clip"
        return "none"

    def _threshold(self, x, m, uncond, guidance_scale, st):
        """Per-sample dynamic-thresholding s (Imagen): the `dynamic_thresholding_ratio` quantile of |x0| per sample,
        clamped to [1, sample_max_value], computed on the device (topk, no sync). x0 is formed here in float32 from
        the same table row the kernel will use."""
        row = self._table.index_select(0, st.reshape(1))[0]
        mf = m.float()
        if uncond is not None:
            uf = uncond.float()
            mf = uf + guidance_scale * (mf - uf)
        a = (row[_PX] * x.float() + row[_PM] * mf).reshape(x.shape[0], -1).abs()
        L = a.shape[1]
        pos = self.config["dynamic_thresholding_ratio"] * (L - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, L - 1)
        vals = torch.topk(a, L - lo, dim=1, sorted=True).values  # descending: vals[:, L-1-j] is the j-th smallest
        v_lo, v_hi = vals[:, L - 1 - lo], vals[:, L - 1 - hi]
        s = torch.lerp(v_lo, v_hi, pos - lo)
        return s.clamp(1.0, float(self.config["sample_max_value"]))

    def _x0_buffer(self, x):
        # The buffer holds x0_prev from step to step. A new shape, dtype or device is a new run (its step 0 is first
        # order and never reads x0_prev): a zeroed buffer. New strides alone are the same run with x laid out anew
        # (a view such as big[:, :4], big[::2] or an expanded noise at step 0, then the op's dense output at step
        # 1): the values must survive, in a buffer laid out as the op lays out x (it makes a non-dense x contiguous
        # and requires x0_buf laid out like that x). Keyed by x's strides, not the buffer's, which can differ.
        # With two or three buffers (third-order steps, PLMS) the others follow the first. Returns (x0_buf, x0_buf2
        # or None, x0_buf3 or None).
        key = (x.shape, x.dtype, x.device, x.stride())
        old, old2, old3 = self._x0_buf, self._x0_buf2, self._x0_buf3
        if (old is not None and self._x0_key == key and (old2 is not None) == self._hist2
                and (old3 is not None) == self._hist3):
            return old, old2, old3

        def fresh(prev):
            t = torch.zeros_like(x) if _dense_rows(x) else torch.zeros(x.shape, dtype=x.dtype, device=x.device)
            if prev is not None and self._x0_key[:3] == key[:3]:
                t.copy_(prev)
            return t

        new = fresh(old)
        new2 = fresh(old2) if self._hist2 else None
        new3 = fresh(old3) if self._hist3 else None
        self._x0_buf, self._x0_buf2, self._x0_buf3, self._x0_key = new, new2, new3, key
        return new, new2, new3

    def step(self, model_output, i, x, *, uncond=None, guidance_scale=1.0, noise=None, generator=None,
             backend="auto", classifier_grad=None, classifier_scale=1.0):
        """x_{t-1} from x_t and the model output at step index i (an int or a 0-d device tensor): 0 to
        num_inference_steps - 1 in order, or negative, counting from the end as Python's indexing does (-1: the last
        step). Not the timestep t: ``for i, t in enumerate(sampler.timesteps)``.

        uncond: the unconditional model output; the step then uses uncond + guidance_scale (model_output - uncond)
        (classifier-free guidance, inside the kernel). noise: explicit standard-normal noise replacing the in-kernel
        Philox noise (e.g. to reproduce another library's trajectory); generator: draw that noise with torch.randn
        from this generator instead. classifier_grad: grad_x log p(y | x_t) at the model's input, applied with
        `classifier_scale` as this sampler's ``classifier_guidance`` ("score" or "mean") says.
        backend: "auto", "cuda", "triton", "cpu" or "torch" (fastdiff.ops.sampler_step).

        A call shaped like the previous one (same tensor shapes, strides, dtypes and devices, same options) reuses
        that call's checks and goes straight to the kernel: a few microseconds of Python per step.
        """
        fast = self._fast
        if (fast is not None and noise is None and generator is None and classifier_grad is None
                and type(i) is int and type(x) is torch.Tensor and type(model_output) is torch.Tensor
                and type(guidance_scale) in (float, int) and -fast[3] <= i < fast[3]
                and -_INF < guidance_scale < _INF):  # (NaN fails it too: the checked path names it)
            g1 = guidance_scale == 1.0
            u = None if g1 else uncond
            key = _call_key(x, model_output, u, uncond is not None, g1, backend)
            if (key == fast[0] and (u is None or type(u) is torch.Tensor) and self._x0_buf is fast[2]
                    and not needs_grad(x, model_output, u, fast[2])):  # (the fused op has no backward)
                op, rest = fast[1], fast[4]
                return op(x, model_output, u, float(guidance_scale), self._table, self._step_list[i], None,
                          fast[2], *rest)  # rest ends with x0_buf2, x0_buf3
        return self._step(model_output, i, x, uncond, guidance_scale, noise, generator, backend, classifier_grad,
                          classifier_scale)

    def _step(self, model_output, i, x, uncond, guidance_scale, noise, generator, backend, classifier_grad,
              classifier_scale):
        self._require()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output: expected a torch.Tensor, got {type(model_output).__name__}")
        if x.dim() < 2:
            raise ValueError(f"x: expected shape (N, C, ...), got {tuple(x.shape)}")
        if not _is_real(guidance_scale):
            raise TypeError(f"guidance_scale: expected a float, got {type(guidance_scale).__name__}")
        if not math.isfinite(guidance_scale):  # every output NaN, silently
            raise ValueError(f"guidance_scale: expected a finite float, got {guidance_scale!r}")
        if x.device != self._device:
            raise ValueError(f"x: on {x.device} but the sampler's tables are on {self._device}: call "
                             f"set_timesteps(n, device=...) or sampler.to(device)")
        clip, var_mode, stochastic, split_channels, clip_range = self._mode
        st = self.step_index(i)
        C = x.shape[1]
        var_values = None
        full_output = model_output
        if split_channels and model_output.dim() == x.dim() and model_output.shape[1] == 2 * C:
            model_output, var_values = model_output[:, :C], model_output[:, C:]
            if uncond is not None and uncond.dim() == x.dim() and uncond.shape[1] == 2 * C:
                uncond = uncond[:, :C]
        if var_mode != "fixed" and var_values is None:
            raise ValueError(f"model_output: variance_type={self.config['variance_type']!r} needs the model's "
                             f"variance channels: expected {2 * C} channels, got shape {tuple(model_output.shape)}")
        if tuple(model_output.shape) != tuple(x.shape):
            hint = ""
            if model_output.dim() == x.dim() and model_output.shape[1] == 2 * C:
                hint = (f"; {2 * C} channels look like a model with learned variances: this sampler reads only the "
                        f"first {C} (pass model_output[:, :{C}]), DDPMSampler(variance_type='learned_range') reads "
                        f"them all")
            raise ValueError(f"model_output: expected shape {tuple(x.shape)} (x's shape), got "
                             f"{tuple(model_output.shape)}{hint}")
        uncond_given = uncond is not None
        if uncond is not None:
            if not isinstance(uncond, torch.Tensor):
                raise TypeError(f"uncond: expected a torch.Tensor, got {type(uncond).__name__}")
            if guidance_scale == 1.0:
                uncond = None  # m = cond: skip reading uncond
        elif guidance_scale != 1.0:
            raise ValueError("uncond: classifier-free guidance (guidance_scale != 1) needs the unconditional output")
        post_shift = None
        if classifier_grad is not None:
            if not isinstance(classifier_grad, torch.Tensor) or tuple(classifier_grad.shape) != tuple(x.shape):
                raise ValueError(f"classifier_grad: expected a tensor of shape {tuple(x.shape)}")
            if not _is_real(classifier_scale):
                raise TypeError(f"classifier_scale: expected a float, got {type(classifier_scale).__name__}")
            if self.classifier_guidance == "mean":
                post_shift = (classifier_grad, float(classifier_scale), var_values)
            elif self.classifier_guidance == "score":
                k = self._cg_k.index_select(0, st.reshape(1)).reshape(()) * float(classifier_scale)
                model_output = model_output + (k * classifier_grad.float()).to(model_output.dtype)
                if uncond is not None:
                    uncond = uncond + (k * classifier_grad.float()).to(uncond.dtype)
            else:
                raise ValueError(f"classifier_guidance: expected 'score' or 'mean', got {self.classifier_guidance!r}")
        if noise is None and generator is not None and stochastic:
            noise = randn_from(generator, x)
        thresh = self._threshold(x, model_output, uncond, guidance_scale, st) if clip == "threshold" else None
        x0_buf, x0_buf2, x0_buf3 = self._x0_buffer(x) if self._multistep else (None, None, None)
        out = ops.sampler_step(
            x, model_output, self._table, st, uncond=uncond, guidance_scale=float(guidance_scale), noise=noise,
            x0_buf=x0_buf, var_values=var_values, thresh=thresh, seed=self._seed, var_mode=var_mode, clip=clip,
            clip_range=clip_range, stochastic=stochastic, backend=backend, x0_buf2=x0_buf2, x0_buf3=x0_buf3)
        if post_shift is not None:
            grad, scale, v = post_shift
            out = out + (scale * self._mean_shift_variance(st, v) * grad.float()).to(out.dtype)
        elif noise is None and var_values is None and thresh is None and full_output is model_output:
            self._remember_fast(x, full_output, uncond, uncond_given, guidance_scale == 1.0, backend, x0_buf,
                                var_mode, clip, clip_range, stochastic, x0_buf2, x0_buf3)
        return out

    def _remember_fast(self, x, model_output, uncond, uncond_given, g1, backend, x0_buf, var_mode, clip, clip_range,
                       stochastic, x0_buf2=None, x0_buf3=None):
        """After a checked step: keep what the next call with inputs of the same shapes, strides, dtypes and
        devices needs to go straight to the kernel. Only when the kernel read every tensor in place (no cast, no
        layout copy) and the backend is a fused one."""
        name = choose_backend(x, backend)
        if name == "torch" or not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
            return
        tensors = [model_output] + [t for t in (uncond, x0_buf, x0_buf2, x0_buf3) if t is not None]
        if any(type(t) is not torch.Tensor or t.dtype != x.dtype or t.device != x.device or t.stride() != x.stride()
               or t.shape != x.shape for t in tensors):
            return
        if type(x) is not torch.Tensor or self._table.device != x.device or not self._table.is_contiguous():
            return
        key = _call_key(x, model_output, uncond, uncond_given, g1, backend)
        op = torch.ops.fastdiff.sampler_step_triton if name == "triton" else torch.ops.fastdiff.sampler_step
        rest = (None, None, _signed64(self._seed), VAR_MODES[var_mode], CLIP_MODES[clip], float(clip_range),
                bool(stochastic), x0_buf2, x0_buf3)
        self._fast = (key, op, x0_buf, self.num_inference_steps, rest)

    def _mean_shift_variance(self, st, v):
        raise NotImplementedError

    def _plan(self, n):  # pragma: no cover - abstract
        raise NotImplementedError

    def _acp(self) -> np.ndarray:
        return self.schedule.alphas_cumprod.double().numpy()


def _shares_storage(a: torch.Tensor, b) -> bool:
    """Whether a is (a view of) b's memory: compares storage pointers only, no device read."""
    if not isinstance(b, torch.Tensor) or a.device != b.device:
        return False
    try:
        pa, pb = a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (fake, functional): nothing to compare
        return False
    return pa != 0 and pa == pb


_INF = float("inf")


def randn_from(generator, x: torch.Tensor) -> torch.Tensor:
    """Standard normals shaped like x from `generator`: one torch.Generator for the batch, or a list of one per
    sample (each sample's noise from its own, so a sample does not depend on the batch around it), drawn on the
    generator's device and moved to x's, as diffusers' randn_tensor draws them."""
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != x.shape[0]:
            raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {x.shape[0]}")
        shape = (1,) + tuple(x.shape[1:])
        return torch.cat([torch.randn(shape, generator=g, device=g.device, dtype=x.dtype).to(x.device)
                          for g in generator])
    raise TypeError(f"generator: expected a torch.Generator or a list of one per sample, got "
                    f"{type(generator).__name__}")


def _call_key(x, model_output, u, uncond_given: bool, g1: bool, backend: str) -> tuple:
    """What Sampler.step's fast path compares between calls: every property its checks and its choice of kernel
    depend on (u: the unconditional output the kernel reads, None without guidance)."""
    usig = (u.shape, u.stride(), u.dtype, u.device) if type(u) is torch.Tensor else None
    return (x.shape, x.stride(), x.dtype, x.device, model_output.shape, model_output.stride(), model_output.dtype,
            model_output.device, usig, uncond_given, g1, backend, _backend.get_backend(), _backend.triton_interpret())


def _x0_from_ve(pred: str, s):
    """(PX, PM) for x0 = PX x + PM m with x = x0 + s eps (Euler's x, at scale sqrt(s^2 + 1) of the VP one)."""
    if pred == "epsilon":
        return np.ones_like(s), -s
    if pred == "sample":
        return np.zeros_like(s), np.ones_like(s)
    return 1 / (s**2 + 1), -s / np.sqrt(s**2 + 1)  # v_prediction


def _eps_from_vp(pred: str, alpha, sigma):
    """(EX, EM): the noise a prediction of type pred implies, eps = EX x + EM m, at x = alpha x0 + sigma eps."""
    return {"epsilon": (np.zeros_like(alpha), np.ones_like(alpha)), "sample": (1 / sigma, -alpha / sigma),
            "v_prediction": (sigma, alpha)}[pred]


def _x0_from_vp(pred: str, alpha, sigma):
    """(PX, PM) for x0 = PX x + PM m with x = alpha x0 + sigma eps (variance preserving)."""
    if pred == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if pred == "sample":
        return np.zeros_like(alpha), np.ones_like(alpha)
    return alpha, -sigma  # v_prediction, v = alpha eps - sigma x0


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) via the posterior q(x_{t-1} | x_t, x0):

        x_{t-1} = sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t + sigma_t z

    with a = alphas_cumprod and beta_t = 1 - a_t / a_prev between consecutive chosen timesteps. variance_type:
    "fixed_small" (the posterior variance), "fixed_large" (beta_t), "learned" (the model's extra channels are the
    variance, as diffusers reads them) or "learned_range" (Improved DDPM: they interpolate log variance between
    the two, v in [-1, 1]). No noise is added at t = 0. Classifier guidance shifts the mean by s Sigma grad.
    """

    _options = {**_COMMON, "variance_type": "fixed_small", **_CLIPPING, **_THRESHOLDING, "timestep_spacing": "leading"}
    _fixed = {}
    _custom_schedules = ("timesteps",)
    classifier_guidance = "mean"
    VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")

    def _validate(self, cfg):
        super()._validate(cfg)
        if cfg["variance_type"] not in self.VARIANCE_TYPES:
            raise ValueError(f"variance_type: expected one of {', '.join(self.VARIANCE_TYPES)}, got "
                             f"{cfg['variance_type']!r}")

    @property
    def _stochastic(self):
        return True

    @property
    def _var_mode(self):
        vt = self.config["variance_type"]
        return vt if vt in ("learned", "learned_range") else "fixed"

    @property
    def _split_channels(self):
        return self.config["variance_type"] in ("learned", "learned_range")

    def _plan(self, n):
        T = self.schedule.num_train_timesteps
        if n > T:
            raise ValueError(f"num_inference_steps: {n} exceeds num_train_timesteps={T}")
        acp = self._acp()
        if self._given_timesteps is not None:  # each step goes to the next given timestep (the last one to -1)
            ts = self._given_timesteps.astype(np.int64)
        else:
            ts = _discrete_timesteps(self.config["timestep_spacing"], T, n, self.config["steps_offset"])
        a_t = acp[ts]
        prev = np.append(ts[1:], -1)
        a_p = np.where(prev >= 0, acp[np.maximum(prev, 0)], 1.0)
        cur_alpha = a_t / a_p
        cur_beta = 1 - cur_alpha
        alpha, sigma = np.sqrt(a_t), np.sqrt(1 - a_t)
        rows = np.zeros((n, 9))
        rows[:, _PX], rows[:, _PM] = _x0_from_vp(self.config["prediction_type"], alpha, sigma)
        rows[:, _C] = np.sqrt(a_p) * cur_beta / (1 - a_t)
        rows[:, _A] = np.sqrt(cur_alpha) * (1 - a_p) / (1 - a_t)
        variance = np.maximum((1 - a_p) / (1 - a_t) * cur_beta, 1e-20)
        vt = self.config["variance_type"]
        if vt in ("fixed_small", "fixed_small_log"):
            std, post_var = np.sqrt(variance), variance
        elif vt == "fixed_large":
            std, post_var = np.sqrt(cur_beta), cur_beta
        else:
            std, post_var = np.ones(n), None
            rows[:, _MINLOG] = np.log(variance)
            rows[:, _MAXLOG] = np.log(cur_beta)
        rows[:, _S] = np.where(ts > 0, std, 0.0)  # diffusers adds noise while t > 0
        return {"timesteps": ts, "rows": rows, "alpha": alpha, "sigma": sigma, "post_var": post_var}

    def _mean_shift_variance(self, st, v):
        if self._post_var is not None:
            return self._post_var.index_select(0, st.reshape(1)).reshape(())
        if self.config["variance_type"] == "learned":
            return v.float()
        row = self._table.index_select(0, st.reshape(1))[0]
        f = 0.5 * (v.float() + 1)
        return torch.exp(f * row[_MAXLOG] + (1 - f) * row[_MINLOG])


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12):

        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z,
        sigma_t = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))

    eta = 0 is deterministic. As in diffusers, the previous timestep is t - num_train_timesteps // n whatever the
    spacing, a_prev at t < 0 is 1 (set_alpha_to_one) or alphas_cumprod[0], and eps is the model's (not re-derived
    from the clipped x0) unless use_clipped_model_output=True.
    """

    _options = {**_COMMON, **_CLIPPING, "set_alpha_to_one": True, **_THRESHOLDING, "timestep_spacing": "leading",
                "eta": 0.0, "use_clipped_model_output": False}
    _fixed = {}

    def _validate(self, cfg):
        super()._validate(cfg)
        if not _is_real(cfg["eta"]) or not cfg["eta"] >= 0:
            raise ValueError(f"eta: expected a non-negative float, got {cfg['eta']!r}")

    @property
    def _stochastic(self):
        return bool(self.config["eta"] > 0)

    def _ddim_run(self, n):
        """(T, alphas_cumprod, the cumulative alpha past the first training step (1 with set_alpha_to_one, else
        alphas_cumprod[0]), the run's timesteps, descending)."""
        T = self.schedule.num_train_timesteps
        if n > T:
            raise ValueError(f"num_inference_steps: {n} exceeds num_train_timesteps={T}")
        acp = self._acp()
        edge = 1.0 if self.config["set_alpha_to_one"] else acp[0]
        return T, acp, edge, _discrete_timesteps(self.config["timestep_spacing"], T, n, self.config["steps_offset"])

    def _ddim_levels(self, n):
        """(the run's timesteps, the cumulative alpha at each, the one each step goes to: at t - T // n, past the
        first training step the edge value)."""
        T, acp, final, ts = self._ddim_run(n)
        prev = ts - T // n
        return ts, acp[ts], np.where(prev >= 0, acp[np.maximum(prev, 0)], final)

    def _plan(self, n):
        ts, a_t, a_p = self._ddim_levels(n)
        alpha, sigma = np.sqrt(a_t), np.sqrt(1 - a_t)
        variance = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        std = self.config["eta"] * np.sqrt(variance)
        direction = np.sqrt(np.maximum(1 - a_p - std**2, 0.0))
        pred = self.config["prediction_type"]
        if self.config["use_clipped_model_output"]:  # eps re-derived from the clipped x0 (GLIDE)
            ex, em, e0 = 1 / sigma, np.zeros(n), -alpha / sigma
        else:
            (ex, em), e0 = _eps_from_vp(pred, alpha, sigma), np.zeros(n)
        rows = np.zeros((n, 9))
        rows[:, _PX], rows[:, _PM] = _x0_from_vp(pred, alpha, sigma)
        rows[:, _A] = direction * ex
        rows[:, _B] = direction * em
        rows[:, _C] = np.sqrt(a_p) + direction * e0
        rows[:, _S] = std
        return {"timesteps": ts, "rows": rows, "alpha": alpha, "sigma": sigma}


class DDIMInverseSampler(DDIMSampler):
    """DDIM inversion (Song et al. 2021; Mokady et al.'s null-text inversion and diffusers' DiffEdit and pix2pix-zero
    pipelines start from it): the deterministic DDIM step run backwards, from a clean sample up to noise, as
    diffusers' DDIMInverseScheduler. Its timesteps ascend (leading: 0, T/n, ..., with steps_offset; trailing: T/n - 1,
    ..., T - 1); step i evaluates the model at timesteps[i] on x at the level of timesteps[i] - T // n (at the first
    step: a_cumprod = 1 with set_alpha_to_one, else alphas_cumprod[0]) and moves x to timesteps[i]:

        x_next = sqrt(a_next) x0 + sqrt(1 - a_next) eps,   x0 clamped to +-clip_sample_range with clip_sample

    (eps the model's, or re-derived from x and the unclamped prediction for "sample" / "v_prediction", as diffusers
    does). ``fastdiff.sample(model, sampler, shape, x_init=x0, ...)`` runs it from x0 (CFG, conditioning and the
    CUDA-graph loop as for sampling); so do step() over ``timesteps``, or FastdiffScheduler as a pipeline's
    inverse_scheduler. The inverted x is then the start (``fastdiff.sample(..., noise=x_T)``) of a DDIMSampler run
    with the same settings.
    """

    _options = {**_COMMON, **_CLIPPING, "set_alpha_to_one": True, "timestep_spacing": "leading"}
    _fixed = {"set_alpha_to_zero": None}  # diffusers' deprecated name for set_alpha_to_one
    _inverts = True  # fastdiff.sample starts it from x_init as it is

    def _validate(self, cfg):
        Sampler._validate(self, cfg)
        if cfg["timestep_spacing"] not in ("leading", "trailing"):
            raise ValueError(f"timestep_spacing: expected 'leading' or 'trailing' (as diffusers' "
                             f"DDIMInverseScheduler), got {cfg['timestep_spacing']!r}")

    @property
    def _stochastic(self):
        return False

    def _plan(self, n):
        T, acp, first, ts = self._ddim_run(n)
        ts = ts[::-1].copy()
        cur = np.minimum(ts - T // n, T - 1)  # the level x is at when the model is called at ts
        a_c = np.where(cur >= 0, acp[np.maximum(cur, 0)], first)
        a_n = acp[ts]
        alpha, sigma = np.sqrt(a_c), np.sqrt(1 - a_c)
        pred = self.config["prediction_type"]
        with np.errstate(divide="ignore"):  # "sample" at a_c = 1: eps = (x - x0) / 0, as in diffusers (refused)
            ex, em = _eps_from_vp(pred, alpha, sigma)
        rows = np.zeros((n, 9))
        rows[:, _PX], rows[:, _PM] = _x0_from_vp(pred, alpha, sigma)
        direction = np.sqrt(1 - a_n)
        rows[:, _A], rows[:, _B], rows[:, _C] = direction * ex, direction * em, np.sqrt(a_n)
        return {"timesteps": ts, "rows": rows, "alpha": alpha, "sigma": sigma}


class CogVideoXDDIMSampler(DDIMSampler):
    """DDIM on CogVideoX's schedule, as diffusers' CogVideoXDDIMScheduler (CogVideoX-2b's): the cumulative alphas
    shifted toward noise as SD3 shifts its sigmas, a' = a / (s + (1 - s) a) with s = snr_shift_scale, then (with
    rescale_betas_zero_snr, CogVideoX's config) rescaled to zero terminal SNR, computed in float64 as diffusers does
    for the scaled_linear betas; each step is

        x_prev = k x + (sqrt(a_prev) - sqrt(a_t) k) x0,   k = sqrt((1 - a_prev) / (1 - a_t))

    (deterministic DDIM with the noise re-derived from x0; diffusers' step ignores eta and clip_sample, and so does
    this one).
    """

    _options = {**_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                **_CLIPPING, "set_alpha_to_one": True, "sample_max_value": 1.0, "timestep_spacing": "leading",
                "snr_shift_scale": 3.0}
    _fixed = {}

    def _validate(self, cfg):
        Sampler._validate(self, cfg)
        if cfg["beta_schedule"] == "sigmoid" and cfg["trained_betas"] is None:
            raise ValueError("beta_schedule: expected linear, scaled_linear or squaredcos_cap_v2 (as diffusers' "
                             "CogVideoXDDIMScheduler), got 'sigmoid'")
        if not _is_real(cfg["snr_shift_scale"]) or not cfg["snr_shift_scale"] > 0:
            raise ValueError(f"snr_shift_scale: expected a positive float, got {cfg['snr_shift_scale']!r}")

    def _build_schedule(self):
        cfg = self.config
        key = self._schedule_key
        super()._build_schedule()
        shift_key = (self._schedule_key, float(cfg["snr_shift_scale"]))
        if self._schedule_key != key or getattr(self, "_shift_key", None) != shift_key:
            if cfg["trained_betas"] is None and cfg["beta_schedule"] == "scaled_linear":  # float64, as diffusers
                betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5,
                                       cfg["num_train_timesteps"], dtype=torch.float64) ** 2
            else:
                betas = NoiseSchedule(cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"],
                                      cfg["beta_schedule"], cfg["trained_betas"]).betas
            acp = torch.cumprod(1.0 - betas, dim=0)
            s = float(cfg["snr_shift_scale"])
            acp = acp / (s + (1 - s) * acp)
            if cfg["rescale_betas_zero_snr"]:  # on the shifted cumulative alphas (diffusers' CogVideoX version)
                r = acp.sqrt()
                a0, aT = r[0].clone(), r[-1].clone()
                acp = ((r - aT) * (a0 / (a0 - aT))) ** 2
            self._acp64 = acp.double().numpy()
            self.schedule._set_alphas_cumprod(acp)
            self._shift_key = shift_key

    def _acp(self) -> np.ndarray:
        return self._acp64

    def _clip(self):
        return "none"  # (diffusers' CogVideoX step applies neither clip_sample nor thresholding)

    @property
    def _stochastic(self):
        return False

    def _plan(self, n):
        ts, a_t, a_p = self._ddim_levels(n)
        alpha, sigma = np.sqrt(a_t), np.sqrt(1 - a_t)
        k = np.sqrt((1 - a_p) / (1 - a_t))
        rows = np.zeros((n, 9))
        rows[:, _PX], rows[:, _PM] = _x0_from_vp(self.config["prediction_type"], alpha, sigma)
        rows[:, _A], rows[:, _C] = k, np.sqrt(a_p) - alpha * k
        return {"timesteps": ts, "rows": rows, "alpha": alpha, "sigma": sigma}


class CogVideoXDPMSampler(CogVideoXDDIMSampler):
    """DPM-Solver++ (2M) with noise on CogVideoX's schedule, as diffusers' CogVideoXDPMScheduler (CogVideoX-5b's):
    the cumulative alphas shifted and rescaled as CogVideoXDDIMSampler's, DDIM's timesteps (the step goes to
    t - num_train_timesteps // n), and with lambda = log(sqrt(a / (1 - a))), h = lambda_prev - lambda_t,

        x_prev = sqrt((1 - a_prev) / (1 - a_t)) e^-h x + sqrt(a_prev) (1 - e^-2h) D + sqrt(1 - a_prev) sqrt(1 - e^-2h) z

    D = x0 at a run's first step and at the last (to t < 0), else (1 + 1 / 2r) x0 - x0_prev / 2r, r = h_prev / h
    (h_prev the previous step's h, measured from its timestep). diffusers' step takes the previous x0 and timestep
    as arguments (its pipeline passes them); here x0_prev stays in the kernel's buffer, so the step is the plain one
    and a pipeline given a FastdiffScheduler calls it so. The noise z is the kernel's (or `noise=` / `generator=`);
    diffusers draws two per step and uses the second. As diffusers' step, clip_sample and eta are not applied.
    """

    _multistep = True

    @property
    def _stochastic(self):
        return True

    def _plan(self, n):
        ts, a_t, a_p = self._ddim_levels(n)
        alpha, sigma = np.sqrt(a_t), np.sqrt(1 - a_t)
        T = self.schedule.num_train_timesteps
        with np.errstate(divide="ignore"):  # lambda = -inf at a zero-SNR step, +inf at a_prev = 1
            lam, lam_p = 0.5 * (np.log(a_t) - np.log1p(-a_t)), 0.5 * (np.log(a_p) - np.log1p(-a_p))
        h = lam_p - lam
        decay = np.exp(-h)  # e^-h (0 where h is infinite)
        one_m = -np.expm1(-2 * h)  # 1 - e^-2h
        rows = np.zeros((n, 12))
        rows[:, _PX], rows[:, _PM] = _x0_from_vp(self.config["prediction_type"], alpha, sigma)
        rows[:, _A] = np.sqrt((1 - a_p) / (1 - a_t)) * decay
        rows[:, _S] = np.sqrt(1 - a_p) * np.sqrt(one_m)
        m2 = np.sqrt(a_p) * one_m
        rows[:, _C] = m2
        begin = self._begin_index
        for i in range(begin + 1, n):
            if ts[i] - T // n < 0:  # the last step, to t < 0: first order, as diffusers'
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                half_inv_r = h[i] / (2 * (lam[i] - lam[i - 1]))  # 1 / 2r (0 after a zero-SNR step: h_prev = inf)
            rows[i, _C] = m2[i] * (1 + half_inv_r)
            rows[i, _D] = -m2[i] * half_inv_r
        return {"timesteps": ts, "rows": rows, "alpha": alpha, "sigma": sigma}


class LCMSampler(Sampler):
    """Latent Consistency Model multistep sampling (Luo et al. 2023), as diffusers' LCMScheduler: for few-step
    models (LCM, LCM-LoRA). At each step the consistency function gives

        denoised = c_skip(t) x + c_out(t) x0,   c_skip = sd^2 / (ts^2 + sd^2),  c_out = ts / sqrt(ts^2 + sd^2)

    (ts = timestep_scaling t, sd = 0.5), and the next step re-noises it to the next timestep,
    x_prev = sqrt(a_prev) denoised + sqrt(1 - a_prev) z; the last step returns denoised. The timesteps are
    num_inference_steps evenly skipped ones of the `original_inference_steps` schedule the model was distilled on.
    Defaults are LCMScheduler's (Stable Diffusion's scaled_linear betas).
    """

    _options = {**_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
                "set_alpha_to_one": True, **_THRESHOLDING, "timestep_scaling": 10.0}
    _fixed = {}
    _custom_schedules = ("timesteps",)  # as LCMScheduler (any training timesteps, not only the distilled ones)

    def _validate(self, cfg):
        super()._validate(cfg)
        o = cfg["original_inference_steps"]
        if not _is_int(o) or not 0 < o <= cfg["num_train_timesteps"]:
            raise ValueError(f"original_inference_steps: expected a positive int up to num_train_timesteps="
                             f"{cfg['num_train_timesteps']}, got {o!r}")
        if not _is_real(cfg["timestep_scaling"]) or not cfg["timestep_scaling"] > 0:
            raise ValueError(f"timestep_scaling: expected a positive float, got {cfg['timestep_scaling']!r}")

    @property
    def _stochastic(self):
        return True

    _strength = 1.0  # set_timesteps' strength, while its _plan runs

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, seed=None, begin_index: int = 0,
                      timesteps=None, strength: float = 1.0):
        """As Sampler.set_timesteps. `strength` (image-to-image, as diffusers' set_timesteps(strength=), which the
        LCM img2img pipeline passes): the steps are taken from the first int(original_inference_steps * strength)
        of the distillation schedule, so the run starts part-way down (noise x_init to the first timestep:
        add_noise(x0, noise, 0)); with custom timesteps, the last int(n * strength) of them run. For this call
        only."""
        if not _is_real(strength) or not 0 < strength <= 1:
            raise ValueError(f"strength: expected a float in (0, 1], got {strength!r}")
        if timesteps is not None and strength != 1:
            given = self._check_custom_timesteps(timesteps)
            n = len(given)
            timesteps = given[n - min(int(n * strength), n):]  # diffusers: timesteps[t_start * order:]
            if len(timesteps) == 0:
                raise ValueError(f"strength: {strength} of {n} custom timesteps leaves no step to run")
            num_inference_steps = None
        self._strength = float(strength)
        try:
            return super().set_timesteps(num_inference_steps, device, seed=seed, begin_index=begin_index,
                                         timesteps=timesteps)
        finally:
            self._strength = 1.0

    def denoised(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """The consistency function's output at step i, c_skip x + c_out x0: what diffusers' LCMScheduler.step
        returns as ``denoised`` (the LCM pipelines decode it after the last step)."""
        x0 = self.predict_x0(model_output, i, x)
        c_skip, c_out = self._consistency
        k = int(i) % len(c_skip)
        return (float(c_skip[k]) * x.float() + float(c_out[k]) * x0.float()).to(x.dtype)

    def _lcm_run_timesteps(self, n):
        """The run's timesteps: the custom ones, or n evenly skipped ones of the distillation schedule (its first
        int(original_inference_steps * strength) timesteps, with set_timesteps' strength)."""
        if self._given_timesteps is not None:
            return self._given_timesteps.astype(np.int64)
        T, orig = self.schedule.num_train_timesteps, int(self.config["original_inference_steps"])
        avail = int(orig * self._strength)
        if n > avail:
            what = (f"original_inference_steps={orig}" if self._strength == 1 else
                    f"the {avail} timesteps of original_inference_steps={orig} x strength={self._strength}")
            raise ValueError(f"num_inference_steps: {n} exceeds {what} (the steps are a subset of the schedule the "
                             f"model was distilled on)")
        return _lcm_timesteps(T, orig, n, avail)

    def _plan(self, n):
        cfg = self.config
        ts = self._lcm_run_timesteps(n)
        acp = self._acp()
        a_t = acp[ts]
        last = np.arange(n) == n - 1
        a_p = np.where(last, 1.0, acp[np.append(ts[1:], ts[-1])])  # the last step: denoised itself
        scaled = ts * float(cfg["timestep_scaling"])
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / np.sqrt(scaled**2 + 0.25)
        self._consistency = (c_skip, c_out)  # for denoised()
        alpha, sigma = np.sqrt(a_t), np.sqrt(1 - a_t)
        rows = np.zeros((n, 9))
        rows[:, _PX], rows[:, _PM] = _x0_from_vp(cfg["prediction_type"], alpha, sigma)
        rows[:, _A] = np.sqrt(a_p) * c_skip
        rows[:, _C] = np.sqrt(a_p) * c_out
        rows[:, _S] = np.where(last, 0.0, np.sqrt(1 - a_p))
        return {"timesteps": ts, "rows": rows, "alpha": alpha, "sigma": sigma}


def _lcm_timesteps(T: int, orig: int, n: int, avail: int) -> np.ndarray:
    """LCM's and TCD's n timesteps: evenly skipped ones of the first `avail` timesteps k - 1, 2k - 1, ... of the
    `orig`-step distillation schedule (k = T // orig; all `orig` of them, up to T - 1, unless img2img's strength
    takes fewer), as diffusers picks them."""
    origin = (np.arange(1, avail + 1) * (T // orig) - 1)[::-1]
    return origin[np.floor(np.linspace(0, avail, num=n, endpoint=False)).astype(np.int64)].astype(np.int64)


class TCDSampler(LCMSampler):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024), as diffusers'
    TCDScheduler: for TCD-distilled models (TCD LoRAs, 2-8 steps). With the next timestep t' and
    s = floor((1 - eta) t'), each step predicts x0 and the noise from the model output, goes to s,

        x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps,

    and re-noises x_s forward to t': x' = sqrt(a_t' / a_s) x_s + sqrt(1 - a_t' / a_s) z (the last step, to t' = 0,
    returns x_s). `eta` (the paper's gamma, diffusers' step(eta=), default 0.3) sets the stochasticity: 0 is
    deterministic. The timesteps are LCM's; like diffusers' TCD step, clip_sample and thresholding are not applied.
    """

    _options = {**LCMSampler._options, "timestep_spacing": "leading", "eta": 0.3}

    def _validate(self, cfg):
        super()._validate(cfg)
        if not _is_real(cfg["eta"]) or not 0 <= cfg["eta"] <= 1:
            raise ValueError(f"eta: expected a float in [0, 1], got {cfg['eta']!r}")

    @property
    def _stochastic(self):
        return self.config["eta"] > 0

    def _clip(self):
        return "none"  # (diffusers' TCD step applies neither clip_sample nor thresholding)

    def denoised(self, model_output, i, x):
        raise NotImplementedError("denoised: a TCD step has no consistency-function output (diffusers' TCDScheduler "
                                  "returns pred_noised_sample); predict_x0 gives its x0")

    def _plan(self, n):
        cfg = self.config
        eta = float(cfg["eta"])
        ts = self._lcm_run_timesteps(n)
        acp = self._acp()
        prev = np.append(ts[1:], 0)  # the last step goes to t' = 0
        s_t = np.floor((1 - eta) * prev).astype(np.int64)
        a_t, a_p, a_s = acp[ts], acp[prev], acp[s_t]
        alpha, sigma = np.sqrt(a_t), np.sqrt(1 - a_t)
        pred = cfg["prediction_type"]
        ex, em = _eps_from_vp(pred, alpha, sigma)  # eps = ex x + em m
        noisy = (np.arange(n) < n - 1) & (eta > 0)
        k = np.where(noisy, np.sqrt(a_p / a_s), 1.0)
        rows = np.zeros((n, 9))
        rows[:, _PX], rows[:, _PM] = _x0_from_vp(pred, alpha, sigma)
        rows[:, _C] = k * np.sqrt(a_s)
        rows[:, _A] = k * np.sqrt(1 - a_s) * ex
        rows[:, _B] = k * np.sqrt(1 - a_s) * em
        rows[:, _S] = np.where(noisy, np.sqrt(np.maximum(1 - a_p / a_s, 0.0)), 0.0)
        return {"timesteps": ts, "rows": rows, "alpha": alpha, "sigma": sigma}


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 1 without churn),
    as diffusers' EulerDiscreteScheduler: x lives at scale sqrt(sigma^2 + 1) (init_noise_sigma), the model sees
    x / sqrt(sigma^2 + 1) (scale_model_input), and

        x_next = x + (x - x0) / sigma (sigma_next - sigma)

    use_karras_sigmas=True spaces the sigmas as Karras et al. eq. 5 (rho = 7), between sigma_min and sigma_max;
    use_exponential_sigmas evenly in log sigma, use_beta_sigmas at Beta(0.6, 0.6) quantiles (scipy).
    set_timesteps takes custom ``timesteps=`` (sigmas interpolated at them) or ``sigmas=`` (the timesteps read
    back from them), as EulerDiscreteScheduler's does.
    """

    _options = {**_COMMON, "use_karras_sigmas": False, **_SPACING_OPTIONS, "sigma_min": None, "sigma_max": None,
                "timestep_spacing": "linspace", "timestep_type": "discrete", "final_sigmas_type": "zero"}
    _fixed = {"interpolation_type": "linear"}
    _custom_schedules = ("timesteps", "sigmas")
    _timesteps_integral = False  # interpolated: fractional timesteps are fine (diffusers takes them as float32)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, seed=None, begin_index: int = 0,
                      timesteps=None, sigmas=None):
        """As Sampler.set_timesteps. `sigmas` (EulerSampler): the run's n + 1 noise levels sqrt((1 - a) / a),
        strictly decreasing, the last one the end of the run (0 to end on the clean sample), in place of the
        spaced ones: n steps, the timesteps read back from the sigmas (diffusers' ``set_timesteps(sigmas=)``); the
        config's Karras spacing and final_sigmas_type do not apply to them. Not kept past this call."""
        if sigmas is None:
            return super().set_timesteps(num_inference_steps, device, seed=seed, begin_index=begin_index,
                                         timesteps=timesteps)
        name = type(self).__name__
        if "sigmas" not in self._custom_schedules:
            raise ValueError(f"sigmas: custom sigmas are not supported by {name}, as by its diffusers scheduler "
                             f"(EulerSampler and FlowMatchEulerSampler take them)")
        if timesteps is not None:
            raise ValueError("sigmas: pass custom timesteps or custom sigmas, not both")
        arr = _float64_array(sigmas, "sigmas")
        if arr.ndim != 1 or arr.size < 2 or not np.isfinite(arr).all():
            raise ValueError(f"sigmas: expected a 1-D sequence of at least 2 finite values (n steps take n + 1 "
                             f"sigmas, the last one where the run ends), got {sigmas!r}")
        arr = arr.astype(np.float32)  # as diffusers takes them
        if not (arr[:-1] > 0).all() or arr[-1] < 0 or not (np.diff(arr) < 0).all():
            raise ValueError(f"sigmas: expected strictly decreasing values, positive but for the last one (which "
                             f"may be 0), got {sigmas!r}")
        n = arr.size - 1
        if num_inference_steps is not None and num_inference_steps != n:
            raise ValueError(f"num_inference_steps: {num_inference_steps!r}, but {arr.size} sigmas (= {n} steps) "
                             f"were given (pass one or the other)")
        self._given_sigmas = arr
        try:
            return super().set_timesteps(n, device, seed=seed, begin_index=begin_index)
        finally:
            self._given_sigmas = None

    def _validate(self, cfg):
        super()._validate(cfg)
        if cfg["timestep_type"] not in ("discrete", "continuous"):
            raise ValueError(f"timestep_type: expected 'discrete' or 'continuous', got {cfg['timestep_type']!r}")
        for k in ("sigma_min", "sigma_max"):
            if cfg[k] is not None and (not _is_real(cfg[k]) or not cfg[k] > 0):
                raise ValueError(f"{k}: expected None or a positive float, got {cfg[k]!r}")

    def _train_sigmas(self):
        acp = self.schedule.alphas_cumprod.clone()
        if self.config["rescale_betas_zero_snr"]:
            acp[-1] = 2**-24  # as diffusers: near zero, so the first sigma is finite
        return (((1 - acp) / acp) ** 0.5).numpy().astype(np.float64), acp.numpy()

    def _plan(self, n):
        cfg = {**EulerSampler._options, **self.config}  # EulerAncestralSampler has no sigma options: the defaults
        T = self.schedule.num_train_timesteps
        given_t, given_s = self._given_timesteps, self._given_sigmas
        spacing = _sigma_spacing(cfg)
        if given_t is not None and spacing:
            raise ValueError(f"timesteps: custom timesteps can't be taken with use_{spacing}_sigmas=True (as "
                             f"diffusers)")
        if given_t is not None and cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
            raise ValueError("timesteps: custom timesteps can't be taken with timestep_type='continuous' and "
                             "prediction_type='v_prediction' (as diffusers: the timesteps are 0.25 log sigma there)")
        if given_t is not None:
            ts = given_t.astype(np.float32)
        elif given_s is not None:
            ts = None  # read back from the sigmas below
        else:
            ts = _sigma_run_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"], np.float32)
        train_sigmas, acp = self._train_sigmas()
        # float32 logs, as diffusers takes them (np.log of its float32 sigmas): t(sigma) is truncated, not rounded,
        # for squaredcos_cap_v2, and t(sigma_max) is 998.99999996 there, 999.0 with float64 logs
        log_sigmas = np.log(train_sigmas.astype(np.float32))
        if given_s is not None:  # float32, as given: the timesteps read back from them (float32 logs, as diffusers)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in given_s[:-1]])
            sig = given_s.astype(np.float64)
        else:
            sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
            if spacing:
                smin = cfg["sigma_min"] if cfg["sigma_min"] is not None else sigmas[-1].item()
                smax = cfg["sigma_max"] if cfg["sigma_max"] is not None else sigmas[0].item()
                sigmas = _spaced_sigmas(spacing, smin, smax, n)
                ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            last = ((1 - acp[0]) / acp[0]).item() ** 0.5 if cfg["final_sigmas_type"] == "sigma_min" else 0.0
            sig = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
        if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
            ts = 0.25 * np.log(sig[:-1].astype(np.float32)).astype(np.float32)
        s, s_next = sig[:-1], sig[1:]
        rows = np.zeros((n, 9))
        rows[:, _PX], rows[:, _PM] = _x0_from_ve(cfg["prediction_type"], s)
        ratio = (s_next - s) / s
        rows[:, _A] = 1 + ratio
        rows[:, _C] = -ratio
        alpha = 1 / np.sqrt(s**2 + 1)
        self._sigmas_np = sig
        return {"timesteps": ts.astype(np.float32), "rows": rows, "alpha": alpha, "sigma": s * alpha,
                "in_div": np.sqrt(s**2 + 1)}

    @property
    def init_noise_sigma(self) -> float:
        if self.num_inference_steps is None:
            sig = self._train_sigmas()[0]
        else:
            sig = self._sigmas_np.astype(np.float32)
        m = float(np.max(sig))
        return m if self.config["timestep_spacing"] in ("linspace", "trailing") else (m**2 + 1) ** 0.5


class LMSSampler(EulerSampler):
    """K-LMS: the linear multistep method in sigma space (Karras et al. 2022; k-diffusion's sample_lms), as diffusers'
    LMSDiscreteScheduler with its default order 4. With the derivative d = (x - x0) / sigma of the probability-flow
    ODE at each step,

        x_next = x + sum_k c_k d_{i-k},   c_k = integral from sigma_i to sigma_{i+1} of the Lagrange basis
                                          polynomial of sigma_{i-k} over the last `order` sigmas

    (the order grows 1, 2, 3, 4 over the first steps). The kernel's x0 row computes d itself and its three history
    buffers keep the last three; the integrals are exact (the basis polynomials integrated in closed form; diffusers
    uses scipy's quad, exact for them to rounding). Sigmas, timesteps and input scaling are EulerSampler's.
    """

    _options = {**_COMMON, "use_karras_sigmas": False, **_SPACING_OPTIONS, "timestep_spacing": "linspace"}
    _fixed = {}
    _custom_schedules = ()  # as LMSDiscreteScheduler
    _multistep = True
    _n_buffers = 3
    ORDER = 4

    def _validate(self, cfg):
        Sampler._validate(self, cfg)

    def _plan(self, n):
        plan = EulerSampler._plan(self, n)
        sig = self._sigmas_np
        s = sig[:-1]
        px, pm = _x0_from_ve(self.config["prediction_type"], s)
        rows = np.zeros((n, 12))
        rows[:, _PX], rows[:, _PM] = (1 - px) / s, -pm / s  # d = (x - x0) / sigma
        rows[:, _A] = 1.0
        begin = self._begin_index
        for i in range(n):
            order = min(i + 1, self.ORDER)
            # as diffusers: the coefficients of that order, zipped with the derivatives the run has so far
            for k in range(min(order, max(i - begin, 0) + 1)):
                basis = np.poly1d([1.0])
                for j in range(order):
                    if j != k:
                        basis *= np.poly1d([1.0, -sig[i - j]]) / (sig[i - k] - sig[i - j])
                antideriv = basis.integ()
                rows[i, (_C, _D, _E, _F)[k]] = antideriv(sig[i + 1]) - antideriv(sig[i])
        plan["rows"] = rows
        return plan


class EulerAncestralSampler(EulerSampler):
    """Euler ancestral ("Euler a"), as diffusers' EulerAncestralDiscreteScheduler: the Euler step to sigma_down,
    then fresh noise of std sigma_up, with sigma_up^2 + sigma_down^2 = sigma_next^2 (k-diffusion's split for eta 1):

        sigma_up = sigma_next sqrt(1 - sigma_next^2 / sigma^2),  sigma_down = sigma_next^2 / sigma
        x_next = x + (x - x0) / sigma (sigma_down - sigma) + sigma_up z

    Sigmas, timesteps and input scaling are EulerSampler's defaults (no Karras sigmas, a final sigma of 0). The
    noise z is the in-kernel Philox noise (or `noise` / `generator` given to step): the same seed gives the same
    samples.
    """

    _options = {**_COMMON, "timestep_spacing": "linspace"}
    _fixed = {}
    _custom_schedules = ()  # as EulerAncestralDiscreteScheduler

    def _validate(self, cfg):
        Sampler._validate(self, cfg)

    @property
    def _stochastic(self):
        return True

    def _plan(self, n):
        plan = super()._plan(n)
        sig = self._sigmas_np
        s, s_next = sig[:-1], sig[1:]
        up, down = _ancestral_split(s, s_next)
        rows = plan["rows"]
        ratio = (down - s) / s
        rows[:, _A] = 1 + ratio
        rows[:, _C] = -ratio
        rows[:, _S] = up
        return plan


class _KeepsX:
    """Samplers whose later steps start from an x they were given before (a two-call step's first call, a
    single-step group's first step), as diffusers keeps it (``self.sample``): where the plan says so ("keep_x", per
    step index), the x a step is given is copied into history buffer ``_x_buffer`` (1: x0_buf, 2: x0_buf2) after the
    step, for later steps to read as they read the x0 history (in half precision, re-deriving it from the step's
    result would lose digits; with noise in the step it could not be re-derived at all)."""

    _x_buffer = 2

    def _to_device(self, device):
        super()._to_device(device)
        keep = self._plan_host.get("keep_x")
        self._keep_x = None if keep is None else torch.tensor(keep, device=self._device)

    def step(self, model_output, i, x, **kwargs):
        """As Sampler.step; after a step the plan marks, the x it was given is kept (in a history buffer)."""
        out = super().step(model_output, i, x, **kwargs)
        if self._keep_x is not None:
            buf = self._x0_buf if self._x_buffer == 1 else self._x0_buf2
            if isinstance(i, torch.Tensor):  # selected on the device (the CUDA-graph loop's index): no sync
                keep = self._keep_x.index_select(0, self.step_index(i).reshape(1)).reshape(())
                torch.where(keep, x, buf, out=buf)
            elif self._plan_host["keep_x"][int(i)]:
                buf.copy_(x)
        return out


class _TwoCallSteps(_KeepsX):
    """Samplers whose steps are two model calls (a correction after each but the last, Heun's way): order 2, and a
    run (image-to-image) starts at an even call index. The step's x waits in a buffer for the second call."""

    _midpoint_calls = False  # the second calls run the model at a midpoint sigma (KDPM2, DPM++ SDE)

    @property
    def order(self) -> int:
        return 2

    def _add_noise_levels(self):
        """Where the second calls run at a midpoint, the sample after a first call is at the midpoint's level, but
        diffusers' add_noise gives its sigmas list's entry there, the step's target sigma (x0 + sigma noise)."""
        a, s = self._noise_levels()
        if self._midpoint_calls:
            odd = np.arange(1, self.num_inference_steps, 2)
            a[odd], s[odd] = 1.0, self._sigmas_np[odd]
        return a, s

    def _check_begin(self, begin: int, n: int, name: str = "begin_index"):
        super()._check_begin(begin, n, name)
        if begin % 2:
            raise ValueError(f"{name}: {begin} is a correction call; a Heun run starts at an even index "
                             f"(t_start * order)")


class HeunSampler(_TwoCallSteps, EulerSampler):
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn), as
    diffusers' HeunDiscreteScheduler: each step from sigma to sigma_next is an Euler step (the model at sigma), then,
    unless sigma_next = 0, a correction with the model at sigma_next:

        x_next = x + (sigma_next - sigma) (d(x, sigma) + d(x_euler, sigma_next)) / 2,   d = (x - x0) / sigma

    so n steps take 2n - 1 model evaluations: ``timesteps`` holds 2n - 1 entries (every one after the first
    twice, as diffusers lists them) and ``num_inference_steps`` counts them. The step's x (copied after the Euler
    call) and the Euler call's x0 wait in the sampler's two buffers, so the correction is one fused kernel too.
    Sigmas, timesteps and input scaling are EulerSampler's (Karras, exponential or beta sigmas optional); defaults
    are HeunDiscreteScheduler's.
    """

    _options = {**_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": False,
                **_SPACING_OPTIONS, "clip_sample": False, "clip_sample_range": 1.0, "timestep_spacing": "linspace"}
    _fixed = {}
    _custom_schedules = ("timesteps",)  # as HeunDiscreteScheduler (no custom sigmas)
    _multistep = True
    _n_buffers = 2  # the Euler call's x0, and the step's x

    def _validate(self, cfg):
        Sampler._validate(self, cfg)

    def _plan(self, n):
        base = super()._plan(n)
        sig, ts = self._sigmas_np, base["timesteps"]  # n + 1 sigmas (the last 0), n timesteps
        # the calls: step k's Euler part (the model at sig[k]), then its correction (the model at sig[k + 1])
        # for every k but the last
        ev = [0]
        for k in range(1, n):
            ev += [k, k]
        s_ev = sig[ev]
        rows = np.zeros((2 * n - 1, 12))
        rows[:, _PX], rows[:, _PM] = _x0_from_ve(self.config["prediction_type"], s_ev)  # the model at s_ev
        keep_x = np.zeros(2 * n - 1, dtype=bool)
        for j, k in enumerate(ev):
            if j % 2 == 0:  # an Euler step from sig[k] to sig[k + 1]; x0 into the first buffer, x into the second
                s, sn = sig[k], sig[k + 1]
                rows[j, _A], rows[j, _C] = sn / s, 1 - sn / s
                keep_x[j] = k < n - 1
            else:  # the correction of the Euler step from sig[k - 1] to sig[k]: x + dt (d(x) + d(x_euler)) / 2
                s, sn = sig[k - 1], sig[k]
                dt = sn - s
                rows[j, _E], rows[j, _D] = 1 + dt / (2 * s), -dt / (2 * s)  # x, x0 (the Euler call's)
                rows[j, _A], rows[j, _C] = dt / (2 * sn), -dt / (2 * sn)  # x_euler, its x0
                rows[j, _KEEP] = 1.0
        alpha = 1 / np.sqrt(s_ev**2 + 1)
        self._sigmas_np = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])  # diffusers' 2n sigmas
        return {"timesteps": ts[ev].astype(np.float32), "rows": rows, "alpha": alpha, "sigma": s_ev * alpha,
                "in_div": np.sqrt(s_ev**2 + 1), "keep_x": keep_x}


class KDPM2Sampler(HeunSampler):
    """DPM-Solver-2 (k-diffusion's sample_dpm_2, "DPM2"), as diffusers' KDPM2DiscreteScheduler: each step from sigma
    to sigma_next is an Euler step to the midpoint sigma_mid = sqrt(sigma sigma_next) (the model at sigma), then the
    step from sigma itself with the derivative at the midpoint (the model at sigma_mid on the Euler point):

        x_next = x + (sigma_next - sigma) (x_mid - x0_mid) / sigma_mid

    The last step, to sigma = 0, is Euler's alone; so n steps take 2n - 1 model calls (``timesteps`` and
    ``num_inference_steps`` count them, the midpoints' timesteps read back from their sigmas). The step's x waits in
    the sampler's buffer (copied after the Euler call), so every call is one fused kernel. Sigmas and input scaling
    are EulerSampler's (Karras, exponential or beta sigmas optional); prediction_type epsilon or v_prediction, as
    diffusers'.
    """

    _options = {**_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": False,
                **_SPACING_OPTIONS, "timestep_spacing": "linspace"}
    _fixed = {}
    _custom_schedules = ()  # as KDPM2DiscreteScheduler
    _prediction_types = ("epsilon", "v_prediction")
    _n_buffers = 1  # the step's x (the first call's x0 is not needed)
    _x_buffer = 1
    _midpoint_calls = True

    def _plan(self, n):
        sig, ts, log_sigmas = self._base_plan(n)
        # the midpoints, as diffusers forms them in float32: exp(lerp(log sigma_k, log sigma_(k-1), 1/2)), k = 1..n
        s32 = torch.from_numpy(sig.astype(np.float32))
        mid = s32.log().lerp(s32.roll(1).log(), 0.5).exp().numpy().astype(np.float64)
        return self._two_call_plan(sig, ts, log_sigmas, mid[1:], sig[1:], np.zeros(n))

    def _base_plan(self, n):
        """EulerSampler's n + 1 sigmas (float64, the last 0) and n timesteps (Karras ones rounded, as diffusers
        rounds KDPM2's), and the float32 log sigmas of the training schedule."""
        ts = EulerSampler._plan(self, n)["timesteps"]
        if self.config["use_karras_sigmas"]:
            ts = ts.round()
        return self._sigmas_np, ts, np.log(self._train_sigmas()[0].astype(np.float32))

    def _two_call_plan(self, sig, ts, log_sigmas, mid, target, up):
        """The 2n - 1 calls of an n-step run: for step k, an Euler call from sig[k] to mid[k] (the model at sig[k];
        mid[n - 1] = 0 ends the run on x0), then, but for the last step, the call at mid[k] that steps from sig[k]
        to target[k] with the derivative there and adds noise of std up[k]."""
        n = len(ts)
        t_mid = np.array([_sigma_to_t(np.float32(v), log_sigmas) for v in mid[: n - 1]]).astype(np.float32)
        calls, model_sigma, times = [], [], []
        for k in range(n):
            calls.append((True, sig[k], mid[k], None, 0.0))
            model_sigma.append(sig[k])
            times.append(ts[k])
            if k < n - 1:
                calls.append((False, sig[k], mid[k], target[k], up[k]))
                model_sigma.append(mid[k])
                times.append(t_mid[k])
        model_sigma = np.array(model_sigma)
        rows = np.zeros((len(calls), 12))
        rows[:, _PX], rows[:, _PM] = _x0_from_ve(self.config["prediction_type"], model_sigma)
        rows[:, _KEEP] = 1.0  # the buffer holds the step's x, copied in after its first call
        keep_x = np.zeros(len(calls), dtype=bool)
        for j, (euler, s, sm, sn, u) in enumerate(calls):
            if euler:  # x_mid = x + (x - x0) / s (sm - s)
                rows[j, _A], rows[j, _C] = sm / s, 1 - sm / s
                keep_x[j] = sm > 0
            else:  # x + (sn - s) (x_mid - x0) / sm + u z, x from the buffer
                rows[j, _D] = 1.0
                rows[j, _A] = (sn - s) / sm
                rows[j, _C] = -(sn - s) / sm
                rows[j, _S] = u
        alpha = 1 / np.sqrt(model_sigma**2 + 1)
        # diffusers' sigmas: the first, each later one twice, the final 0 twice
        self._sigmas_np = np.concatenate([sig[:1], np.repeat(sig[1:], 2), sig[-1:]])
        return {"timesteps": np.array(times, dtype=np.float32), "rows": rows, "alpha": alpha,
                "sigma": model_sigma * alpha, "in_div": np.sqrt(model_sigma**2 + 1), "keep_x": keep_x}


class KDPM2AncestralSampler(KDPM2Sampler):
    """DPM-Solver-2 ancestral (k-diffusion's sample_dpm_2_ancestral, "DPM2 a"), as diffusers'
    KDPM2AncestralDiscreteScheduler: each step from sigma to sigma_next is KDPM2Sampler's, but to sigma_down, with
    noise of std sigma_up added (sigma_up^2 + sigma_down^2 = sigma_next^2, sigma_up = sigma_next sqrt(1 -
    sigma_next^2 / sigma^2), as Euler ancestral's), the midpoint between sigma and sigma_down. The noise is the
    kernel's (seeded), or drawn from a `generator` at the second call of each step, as diffusers draws it.
    """

    _custom_schedules = ()  # as KDPM2AncestralDiscreteScheduler

    @property
    def _stochastic(self):
        return True

    def _plan(self, n):
        sig, ts, log_sigmas = self._base_plan(n)
        # sigma_up, sigma_down and the midpoints as diffusers forms them, in float32
        s32 = torch.from_numpy(sig.astype(np.float32))
        nxt = s32.roll(-1)
        nxt[-1] = 0.0
        up = (nxt**2 * (s32**2 - nxt**2) / s32**2) ** 0.5
        down = (nxt**2 - up**2) ** 0.5
        down[-1] = 0.0
        mid = s32.log().lerp(down.log(), 0.5).exp()
        mid[-2:] = 0.0
        f64 = lambda t: t.numpy().astype(np.float64)  # noqa: E731
        return self._two_call_plan(sig, ts, log_sigmas, f64(mid)[:n], f64(down)[:n], np.nan_to_num(f64(up))[:n])

    def _step(self, model_output, i, x, uncond, guidance_scale, noise, generator, backend, classifier_grad,
              classifier_scale):
        # diffusers draws from the generator at the second call of each step only (the Euler calls add no noise)
        if generator is not None and noise is None:
            j = int(i) if isinstance(i, int) or (isinstance(i, torch.Tensor) and i.device.type == "cpu"
                                                and i.numel() == 1) else None
            if j is not None and self.num_inference_steps and j % self.num_inference_steps % 2 == 0:
                generator = None  # (the row's noise std is 0: the kernel's own noise adds nothing)
        return super()._step(model_output, i, x, uncond, guidance_scale, noise, generator, backend, classifier_grad,
                             classifier_scale)


class DPMSolverSDESampler(_TwoCallSteps, EulerSampler):
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde, "DPM++ SDE", "DPM++ SDE Karras" with Karras sigmas), as
    diffusers' DPMSolverSDEScheduler. Each step from sigma to sigma_next takes two model calls: an ancestral step
    (Euler to sigma_down, then noise of std sigma_up, split as Euler ancestral's) to the midpoint sigma_mid =
    sqrt(sigma sigma_next) with the model at sigma, then, from the step's own x, the ancestral step to sigma_next
    with the model at sigma_mid on the midpoint sample:

        x_mid  = r1 x + (1 - r1) x0(x, sigma)            + sigma_up1 W1,         r1 = sigma_down1 / sigma
        x_next = r2 x + (1 - r2) x0(x_mid, sigma_mid)    + sigma_up2 W2,         r2 = sigma_down2 / sigma

    W1 and W2 are the Brownian increments from sigma to sigma_mid and from sigma to sigma_next, normalised: W2
    holds W1, W2 = (sqrt(sigma - sigma_mid) W1 + sqrt(sigma_mid - sigma_next) Z) / sqrt(sigma - sigma_next) with Z
    fresh noise. The last step, to sigma = 0, is Euler's alone, so n steps take 2n - 1 model calls (``timesteps``
    and ``num_inference_steps`` count them, the midpoints' timesteps read back from their sigmas).

    Every call is one fused kernel: the step's x is kept in the sampler's second buffer (copied there after the
    first call) and its first x0 in the first, and the second call recovers W1 from x_mid, x and that x0, so the
    kernel draws only Z (in-kernel Philox noise; ``noise=`` / ``generator=`` given to step replace W1 at a first
    call and Z at a second one). diffusers draws W1 and W2 from a Brownian tree (torchsde), which also makes the noise
    of a seed agree between runs of different step counts; this noise has the same distribution within a run, not
    that cross-run property, and the same seed (``noise_sampler_seed``, or set_timesteps' seed) gives the same
    samples. ``s_noise`` (diffusers' step argument) scales the noise. Sigmas and input scaling are EulerSampler's
    (Karras, exponential or beta sigmas optional), defaults DPMSolverSDEScheduler's.
    """

    _options = {**_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": False,
                **_SPACING_OPTIONS, "noise_sampler_seed": None, "timestep_spacing": "linspace", "s_noise": 1.0}
    _fixed = {}
    _custom_schedules = ()  # as DPMSolverSDEScheduler
    _prediction_types = ("epsilon", "v_prediction")  # diffusers' step raises for "sample"
    _multistep = True
    _n_buffers = 2  # x0 of the step's first call, and the step's x
    _midpoint_calls = True

    def _validate(self, cfg):
        Sampler._validate(self, cfg)
        seed = cfg["noise_sampler_seed"]
        if seed is not None and not _is_int(seed):
            raise TypeError(f"noise_sampler_seed: expected None or an int, got {type(seed).__name__}")
        if not _is_real(cfg["s_noise"]) or not cfg["s_noise"] >= 0:
            raise ValueError(f"s_noise: expected a non-negative float, got {cfg['s_noise']!r}")

    @property
    def _stochastic(self):
        return True

    def _set_timesteps(self, num_inference_steps, device, seed, begin_index):
        if seed is None and self.config["noise_sampler_seed"] is not None:
            seed = self.config["noise_sampler_seed"]  # as diffusers: the config's seed unless one is given
        return super()._set_timesteps(num_inference_steps, device, seed, begin_index)

    def _plan(self, n):
        cfg = self.config
        T = self.schedule.num_train_timesteps
        # the timesteps and sigmas as DPMSolverSDEScheduler.set_timesteps forms them (float64 timesteps)
        ts = _sigma_run_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"], np.float64)
        train_sigmas = self._train_sigmas()[0].astype(np.float32)
        log_sigmas = np.log(train_sigmas)
        sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
        spacing = _sigma_spacing(cfg)
        if spacing:
            sigmas = _spaced_sigmas(spacing, sigmas[-1].item(), sigmas[0].item(), n)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        # the midpoints' timesteps, from the float64 sigmas (as diffusers' _second_order_timesteps)
        lt = -np.log(sigmas)
        t_mid = np.array([_sigma_to_t(s, log_sigmas) for s in np.exp(-(lt[:-1] + np.diff(lt) * 0.5))])
        sig = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)

        s_noise = float(cfg["s_noise"])
        rows = np.zeros((2 * n - 1, 12))
        model_sigma, times, keep_x = [], [], np.zeros(2 * n - 1, dtype=bool)
        for k in range(n):
            s, sn = sig[k], sig[k + 1]
            j = 2 * k
            model_sigma.append(s)
            times.append(ts[k])
            if k == n - 1:  # to sigma = 0: x_next = x0
                rows[j, _C] = 1.0
                continue
            mid = math.sqrt(s * sn)  # exp of the mean of the log sigmas
            up1, down1 = _ancestral_split(s, mid)
            r1 = down1 / s
            rows[j, _A], rows[j, _C], rows[j, _S] = r1, 1 - r1, s_noise * up1
            keep_x[j] = True  # the step's x, kept for its second call
            # the second call, on x_mid with the model at sigma_mid: x0_prev (the first call's x0) in the first
            # buffer, the step's x in the second; W1 = (x_mid - r1 x - (1 - r1) x0_prev) / (s_noise up1)
            up2, down2 = _ancestral_split(s, sn)
            r2 = down2 / s
            a, b = math.sqrt((s - mid) / (s - sn)), math.sqrt((mid - sn) / (s - sn))
            j += 1
            model_sigma.append(mid)
            times.append(t_mid[k])
            rows[j, _C], rows[j, _E], rows[j, _KEEP] = 1 - r2, r2, 1.0
            if s_noise * up1 > 0:  # W2's part W1 from x_mid; the kernel's noise is the fresh part
                w = up2 * a / up1
                rows[j, _A], rows[j, _D], rows[j, _E] = w, -w * (1 - r1), r2 - w * r1
                rows[j, _S] = s_noise * up2 * b
            else:  # no W1 in x_mid: W2 is fresh noise
                rows[j, _S] = s_noise * up2
        model_sigma = np.array(model_sigma)
        rows[:, _PX], rows[:, _PM] = _x0_from_ve(cfg["prediction_type"], model_sigma)
        alpha = 1 / np.sqrt(model_sigma**2 + 1)
        self._sigmas_np = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])  # diffusers' 2n sigmas
        return {"timesteps": np.array(times, dtype=np.float32), "rows": rows, "alpha": alpha,
                "sigma": model_sigma * alpha, "in_div": np.sqrt(model_sigma**2 + 1), "keep_x": keep_x}



def _clipped_alphas_cumprod(cfg, schedule, lambda_min_clipped):
    """The schedule's float32 cumulative alphas as diffusers' DPM-Solver family holds them (the last one 2^-24 with
    rescale_betas_zero_snr), and how many of the noisiest timesteps lambda_min_clipped cuts off."""
    acp_t = schedule.alphas_cumprod.clone()
    if cfg["rescale_betas_zero_snr"]:
        acp_t[-1] = 2**-24
    lambda_t = torch.log(torch.sqrt(acp_t)) - torch.log(torch.sqrt(1 - acp_t))
    return acp_t, int(torch.searchsorted(torch.flip(lambda_t, [0]), torch.tensor(float(lambda_min_clipped))))


def _vp_sigmas(cfg, schedule, n, lambda_min_clipped=-float("inf"), *, round_karras=True, given=None):
    """(timesteps, sigmas) of an n-step run of a variance-preserving multistep scheduler, as diffusers'
    DPMSolverMultistepScheduler and UniPCMultistepScheduler compute them: the timesteps spaced over the trained
    range (cut at lambda_min_clipped), or the `given` ones (custom timesteps), sigma = sqrt((1 - acp) / acp) at
    them (or Karras, exponential or beta sigmas, or (use_lu_lambdas) sigmas evenly spaced in log sigma, over the
    trained range, with the timesteps read back: Karras and Lu ones rounded unless round_karras is False, the others
    truncated, as diffusers' int64 cast), then the final sigma (0 or sigma_min): n + 1 float64 values rounded
    through float32."""
    T = schedule.num_train_timesteps
    acp_t, clipped = _clipped_alphas_cumprod(cfg, schedule, lambda_min_clipped)
    last_t = T - clipped
    sp = cfg["timestep_spacing"]
    spacing = _sigma_spacing(cfg) or ("lu" if cfg.get("use_lu_lambdas") else None)
    if given is not None:
        if spacing:
            opt = "use_lu_lambdas" if spacing == "lu" else f"use_{spacing}_sigmas"
            raise ValueError(f"timesteps: custom timesteps can't be taken with {opt}=True (as diffusers)")
        ts = given.astype(np.int64)
    elif sp == "linspace":
        ts = np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif sp == "leading":
        ratio = last_t // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + cfg["steps_offset"]
    else:
        ts = np.arange(last_t, 0, -T / n).round().copy().astype(np.int64) - 1
    train_sigmas = (((1 - acp_t) / acp_t) ** 0.5).numpy().astype(np.float64)
    # float32 logs, as diffusers takes them (np.log of its float32 sigmas): t(sigma) is truncated, not rounded,
    # for squaredcos_cap_v2, and t(sigma_max) is 998.99999996 there, 999.0 with float64 logs
    log_sigmas = np.log(train_sigmas.astype(np.float32))
    if spacing == "lu":  # Lu et al.'s: evenly spaced in lambda = -log sigma, between the float32 log sigmas' ends
        lmax, lmin = float(log_sigmas[-1]), float(log_sigmas[0])
        sigmas = np.exp(lmax + np.linspace(0, 1, n) * (lmin - lmax))
    elif spacing:
        flipped = np.flip(train_sigmas).copy()
        sigmas = _spaced_sigmas(spacing, flipped[-1].item(), flipped[0].item(), n)
    if spacing:
        tf = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if round_karras and spacing in ("karras", "lu"):
            tf = tf.round()
        ts = tf.astype(np.int64)
    else:
        sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
    last = ((1 - acp_t[0]) / acp_t[0]).item() ** 0.5 if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    return ts, np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)


def _check_solver_order(cfg):
    if cfg["solver_order"] not in (1, 2, 3) or isinstance(cfg["solver_order"], bool):
        raise ValueError(f"solver_order: expected 1, 2 or 3, got {cfg['solver_order']!r}")


def _check_dpm_solver(cfg):
    """DPM-Solver++'s algorithm_type, solver_order and solver_type."""
    if cfg["algorithm_type"] not in DPMSolverPPSampler.ALGORITHM_TYPES:
        raise ValueError(f"algorithm_type: expected 'dpmsolver++' or 'sde-dpmsolver++' (the noise-prediction "
                         f"'dpmsolver' variants are not implemented), got {cfg['algorithm_type']!r}")
    _check_solver_order(cfg)
    if cfg["solver_type"] not in ("midpoint", "heun"):
        raise ValueError(f"solver_type: expected 'midpoint' or 'heun', got {cfg['solver_type']!r}")


def _check_dpm_outputs(cfg):
    """DPM-Solver++'s variance_type (learned variances: the channels dropped) and lambda_min_clipped."""
    if cfg["variance_type"] not in (None, "learned", "learned_range"):
        raise ValueError(f"variance_type: expected None, 'learned' or 'learned_range', got {cfg['variance_type']!r}")
    if not _is_real(cfg["lambda_min_clipped"]):
        raise ValueError(f"lambda_min_clipped: expected a float, got {cfg['lambda_min_clipped']!r}")


def _check_flow_options(cfg, time_shift_types):
    """The flow-sigma options of the multistep samplers, checked as the constructor checks options."""
    for k in ("use_flow_sigmas", "use_dynamic_shifting"):
        if not isinstance(cfg[k], (bool, np.bool_)):
            raise TypeError(f"{k}: expected a bool, got {type(cfg[k]).__name__}")
    if not _is_real(cfg["flow_shift"]) or not cfg["flow_shift"] > 0:
        raise ValueError(f"flow_shift: expected a positive float, got {cfg['flow_shift']!r}")
    if cfg["time_shift_type"] not in time_shift_types:
        raise ValueError(f"time_shift_type: expected {' or '.join(map(repr, time_shift_types))}, got "
                         f"{cfg['time_shift_type']!r}")
    if cfg["use_flow_sigmas"] and _sigma_spacing(cfg):
        raise ValueError(f"use_{_sigma_spacing(cfg)}_sigmas: not implemented together with use_flow_sigmas")


def _dpm_flow_sigmas(cfg, mu, n):
    """(timesteps, n sigmas) of diffusers' DPM-Solver / DEIS flow sigmas: 1 - linspace(1, 1/T, n + 1) shifted by
    flow_shift (exp(mu) with dynamic shifting and a mu), reversed, the final 0 dropped; timesteps sigma T truncated."""
    T = cfg["num_train_timesteps"]
    shift = math.exp(mu) if cfg["use_dynamic_shifting"] and mu is not None else cfg["flow_shift"]
    up = 1.0 - np.linspace(1, 1 / T, n + 1)
    fs = np.flip(shift * up / (1 + (shift - 1) * up))[:-1].copy()
    return (fs * T).astype(np.int64), fs


class _FlowShiftMu(Sampler):
    """set_timesteps(mu=) of the multistep samplers whose flow sigmas take diffusers' exp(mu) shift."""

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, seed=None, begin_index: int = 0,
                      mu=None, timesteps=None):
        """As Sampler.set_timesteps; `mu` (flow sigmas with use_dynamic_shifting): the shift is exp(mu), as
        diffusers sets flow_shift (kept in ``self.mu`` for later calls; without one, flow_shift)."""
        if mu is not None and not (self.config["use_flow_sigmas"] and self.config["use_dynamic_shifting"]):
            raise ValueError("mu: only used with use_flow_sigmas=True and use_dynamic_shifting=True")
        return _set_timesteps_with_mu(self, super().set_timesteps, num_inference_steps, device, seed, begin_index, mu,
                                      timesteps)


class DPMSolverPPSampler(_FlowShiftMu):
    """DPM-Solver++ (Lu et al. 2022), multistep, data prediction, order 1, 2 ("2M", Algorithm 2) or 3 ("3M"), as
    diffusers' DPMSolverMultistepScheduler with algorithm_type="dpmsolver++". With lambda = log(alpha / sigma),
    h = lambda_t - lambda_s, r = h_prev / h, D0 = x0_s, D1 = (x0_s - x0_prev) / r:

        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D0 - alpha_t (e^-h - 1) D1 / 2     (midpoint)

    algorithm_type="sde-dpmsolver++" (DPM++ 2M SDE) takes the SDE form of the same step:

        x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) (D0 + D1 / 2) + sigma_t sqrt(1 - e^-2h) z

    solver_order=3 (DPM++ 3M, and 3M SDE) adds the second difference D2 of the last three x0 (diffusers'
    multistep_dpm_solver_third_order_update). First order at the first step and at the last one when
    lower_order_final applies, second order at the second step (and the last but one under lower_order_final with
    fewer than 15 steps), as diffusers. The previous x0 (and, for order 3, the one before it) live in buffers owned
    by the sampler, which the kernel reads and overwrites in place.
    """

    _options = {**_COMMON, "algorithm_type": "dpmsolver++", "solver_order": 2, **_THRESHOLDING,
                "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                "use_karras_sigmas": False, **_SPACING_OPTIONS, "use_lu_lambdas": False,
                "final_sigmas_type": "zero", "lambda_min_clipped": -float("inf"),
                "variance_type": None, "timestep_spacing": "linspace", "use_flow_sigmas": False, "flow_shift": 1.0,
                "use_dynamic_shifting": False, "time_shift_type": "exponential"}
    _fixed = {}
    _custom_schedules = ("timesteps",)  # as DPMSolverMultistepScheduler (e.g. Align Your Steps)
    _prediction_types = PREDICTION_TYPES + ("flow_prediction",)
    ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
    _multistep = True
    _round_karras = False  # Karras timesteps rounded for every beta schedule (else not for squaredcos_cap_v2)

    def _validate(self, cfg):
        super()._validate(cfg)
        _check_dpm_solver(cfg)
        lu = cfg.get("use_lu_lambdas", False)  # (not an option of the single-step subclass)
        if not isinstance(lu, (bool, np.bool_)):
            raise TypeError(f"use_lu_lambdas: expected a bool, got {type(lu).__name__}")
        if lu and (_sigma_spacing(cfg) or cfg["use_flow_sigmas"]):
            other = f"use_{_sigma_spacing(cfg)}_sigmas" if _sigma_spacing(cfg) else "use_flow_sigmas"
            raise ValueError(f"use_lu_lambdas: not together with {other}")
        _check_dpm_outputs(cfg)
        _check_flow_options(cfg, ("exponential",))

    @property
    def order(self) -> int:
        return 1  # one model call a step, as diffusers' DPMSolverMultistepScheduler.order (solver_order is not it)

    @property
    def _stochastic(self):
        return self.config["algorithm_type"] == "sde-dpmsolver++"

    @property
    def _two_buffers(self):
        return self.config["solver_order"] == 3

    @property
    def _split_channels(self):
        return self.config["variance_type"] in ("learned", "learned_range")

    def _run_sigmas(self, n):
        """(timesteps, the n + 1 sigmas, alpha and sigma of x at each (n + 1 each), and x0 = PX x + PM m at each
        of the n steps (PX, PM)) of an n-step run."""
        cfg = self.config
        flow = cfg["use_flow_sigmas"]
        if flow and self._given_timesteps is not None:
            raise ValueError("timesteps: custom timesteps can't be taken with use_flow_sigmas=True")
        if flow:  # diffusers' flow sigmas: 1 - linspace(1, 1/T, n + 1) shifted, reversed, the final 0 dropped
            ts, fs = _dpm_flow_sigmas(cfg, self.mu, n)
            acp0 = float(self.schedule.alphas_cumprod[0])  # (sigma_min is the VP one there too, as diffusers')
            last = ((1 - acp0) / acp0) ** 0.5 if cfg["final_sigmas_type"] == "sigma_min" else 0.0
            sig = np.concatenate([fs, [last]]).astype(np.float32).astype(np.float64)
            alpha, sigma_vp = 1 - sig, sig
        else:
            ts, sig = _vp_sigmas(cfg, self.schedule, n, cfg["lambda_min_clipped"],
                                 round_karras=self._round_karras or cfg["beta_schedule"] != "squaredcos_cap_v2",
                                 given=self._given_timesteps)
            alpha = 1 / np.sqrt(sig**2 + 1)
            sigma_vp = sig * alpha
        m = len(ts)
        if cfg["prediction_type"] == "flow_prediction":
            px, pm = np.ones(m), -sig[:m]  # x0 = x - sigma v
        else:
            px, pm = _x0_from_vp(cfg["prediction_type"], alpha[:m], sigma_vp[:m])
        return ts, sig, alpha, sigma_vp, px, pm

    def _plan(self, n):
        cfg = self.config
        ts, sig, alpha, sigma_vp, px, pm = self._run_sigmas(n)
        n = len(ts)
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma_vp)  # +inf where sigma = 0
        lower_final = (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                       or cfg.get("final_sigmas_type") == "zero")  # (the inverse sampler has no final sigma)
        lower_second = cfg["lower_order_final"] and n < 15
        rows = np.zeros((n, 10))
        pred = cfg["prediction_type"]
        sde = cfg["algorithm_type"] == "sde-dpmsolver++"
        order = cfg["solver_order"]
        rows[:, _PX], rows[:, _PM] = px, pm
        # (a zero gap between two steps divides by zero: the rows are then non-finite, which set_timesteps refuses
        # with a ValueError naming the step count, not with numpy warnings)
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in range(n):
                a_s, s_s, a_t, s_t = alpha[i], sigma_vp[i], alpha[i + 1], sigma_vp[i + 1]
                h = lam[i + 1] - lam[i]
                if abs(h) <= 1e-6:  # two equal sigmas (Karras sigmas ending at sigma_min; or, EDM, a float32
                    # sigma_min and the config's, 1 ulp apart, equal in diffusers' float32 lambdas): every form's limit
                    # is x_t = x_s
                    rows[i, _A] = 1.0  # (diffusers' heun 2M and 3M give NaN there, 0 / 0)
                    continue
                first = order == 1 or i <= self._begin_index or (i == n - 1 and lower_final)
                third = (not first and order == 3 and i >= self._begin_index + 2 and not (i == n - 2 and lower_second))
                r0 = None if first else (lam[i] - lam[i - 1]) / h
                if third:
                    self._third_order_row(rows[i], a_t, s_t, s_s, h, r0, (lam[i - 1] - lam[i - 2]) / h, sde)
                    continue
                if sde:  # the SDE form: e^-h in place of 1 on x, 1 - e^-2h in place of 1 - e^-h, noise of variance
                    # sigma_t^2 (1 - e^-2h)
                    phi2 = -np.expm1(-2 * h) if np.isfinite(h) else 1.0  # 1 - e^-2h
                    rows[i, _A] = s_t / s_s * np.exp(-h)
                    rows[i, _C] = a_t * phi2
                    rows[i, _S] = s_t * np.sqrt(phi2)
                    if not first:
                        k = (0.5 * a_t * phi2 / r0 if cfg["solver_type"] == "midpoint"
                             else a_t * (phi2 / (-2 * h) + 1) / r0)
                        rows[i, _C] += k
                        rows[i, _D] = -k
                    continue
                phi = np.expm1(-h) if np.isfinite(h) else -1.0  # e^-h - 1
                rows[i, _A] = s_t / s_s
                if first:
                    rows[i, _C] = -a_t * phi
                else:
                    if cfg["solver_type"] == "midpoint":
                        k = -0.5 * a_t * phi / r0
                    else:
                        k = a_t * (phi / h + 1.0) / r0
                    rows[i, _C] = -a_t * phi + k
                    rows[i, _D] = -k
        self._sigmas_np = sig
        plan = {"timesteps": ts, "rows": rows, "alpha": alpha[:n], "sigma": sigma_vp[:n]}
        if pred == "flow_prediction":
            with np.errstate(divide="ignore"):
                plan["cg_k"] = -sigma_vp[:n] / alpha[:n]  # as flow matching's: v shifts by -sigma / (1 - sigma) s grad
        return plan

    @staticmethod
    def _third_order_row(row, a_t, s_t, s_s, h, r0, r1, sde):
        """Row of a DPM++ 3M step (diffusers' third-order update) with D0 = m0, D1_0 = (m0 - m1) / r0,
        D1_1 = (m1 - m2) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1), the x0 of this
        step and the two before (m0, m1, m2) weighed by C, D, E:
            ODE: x_t = (s_t / s_s) x - a_t phi D0 + a_t (phi / h + 1) D1 - a_t ((phi + h) / h^2 - 1/2) D2,
                 phi = e^-h - 1
            SDE: x_t = (s_t / s_s) e^-h x + a_t psi D0 + a_t (psi / (-2h) + 1) D1 + a_t ((psi - 2h) / (2h)^2 - 1/2) D2
                       + s_t sqrt(psi) z,  psi = 1 - e^-2h"""
        if sde:
            psi = -np.expm1(-2 * h)
            row[_A] = s_t / s_s * np.exp(-h)
            c0, c1, c2 = a_t * psi, a_t * (psi / (-2 * h) + 1), a_t * ((psi - 2 * h) / (2 * h) ** 2 - 0.5)
            row[_S] = s_t * np.sqrt(psi)
        else:
            phi = np.expm1(-h)
            row[_A] = s_t / s_s
            c0, c1, c2 = -a_t * phi, a_t * (phi / h + 1), -a_t * ((phi + h) / h**2 - 0.5)
        w = r0 / (r0 + r1)
        k = c1 * (1 + w) + c2 / (r0 + r1)  # weight of D1_0
        l_ = -c1 * w - c2 / (r0 + r1)  # weight of D1_1
        row[_C] = c0 + k / r0
        row[_D] = -k / r0 + l_ / r1
        row[_E] = -l_ / r1


class DPMSolverMultistepInverseSampler(DPMSolverPPSampler):
    """DPM-Solver++ multistep run backwards, from a clean sample up to noise (inversion), as diffusers'
    DPMSolverMultistepInverseScheduler (DiffEdit's faster inverse_scheduler): the timesteps and sigmas ascend, from
    the first spaced timestep to the noisiest one (num_train_timesteps - 1, or where lambda_min_clipped cuts), and
    each step is DPMSolverPPSampler's update with the sign of h turned (orders 1-3, midpoint / heun, the same
    lower-order steps). With Karras, exponential or beta sigmas the last sigma is repeated, as diffusers does (the
    last step keeps x). ``fastdiff.sample(model, sampler, shape, x_init=x0)`` runs it from x0 as it is (see
    DDIMInverseSampler); its output starts a DPMSolverPPSampler run. The SDE forms and flow sigmas are refused
    (diffusers' flow-sigma inverse runs its sigmas downwards).
    """

    _options = {**_COMMON, "algorithm_type": "dpmsolver++", "solver_order": 2, **_THRESHOLDING,
                "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                "use_karras_sigmas": False, **_SPACING_OPTIONS, "lambda_min_clipped": -float("inf"),
                "variance_type": None, "timestep_spacing": "linspace"}
    _fixed = {"use_flow_sigmas": False, "flow_shift": 1.0}
    _custom_schedules = ()
    _prediction_types = PREDICTION_TYPES
    _inverts = True  # fastdiff.sample starts it from x_init as it is

    def _validate(self, cfg):
        Sampler._validate(self, cfg)
        _check_dpm_solver(cfg)
        if cfg["algorithm_type"] != "dpmsolver++":
            raise ValueError(f"algorithm_type: the inverse sampler implements 'dpmsolver++' only, got "
                             f"{cfg['algorithm_type']!r}")
        _check_sigma_spacing(cfg)
        _check_dpm_outputs(cfg)

    # the base set_timesteps: no mu (as diffusers' inverse scheduler)
    set_timesteps = Sampler.set_timesteps

    def _run_sigmas(self, n):
        cfg = self.config
        T = self.schedule.num_train_timesteps
        acp_t, clipped = _clipped_alphas_cumprod(cfg, self.schedule, cfg["lambda_min_clipped"])
        top = T - 1 - clipped  # the noisiest timestep
        sp = cfg["timestep_spacing"]
        if sp == "linspace":
            ts = np.linspace(0, top, n + 1).round()[:-1].copy().astype(np.int64)
        elif sp == "leading":
            ts = (np.arange(0, n + 1) * ((top + 1) // (n + 1))).round()[:-1].copy().astype(np.int64)
            ts += cfg["steps_offset"]
        else:
            ts = np.arange(top + 1, 0, -T / n).round()[::-1].copy().astype(np.int64) - 1
        train = (((1 - acp_t) / acp_t) ** 0.5).numpy()  # float32, as diffusers' np.array of its tensor
        log_sigmas = np.log(train)
        spacing = _sigma_spacing(cfg)
        if spacing:  # from the smallest trained sigma up (diffusers passes its ascending sigmas as they are)
            sig = _spaced_sigmas(spacing, float(train[-1]), float(train[0]), n)
            tf = np.array([_sigma_to_t(v, log_sigmas) for v in sig])
            # Karras timesteps rounded to integers; the others kept fractional until after the de-duplication
            # below (then truncated), as diffusers has them: two of those can truncate to the same timestep
            ts = tf.round().astype(np.int64) if spacing == "karras" else tf
            sig = np.concatenate([sig, sig[-1:]])
        else:
            sig = np.interp(ts, np.arange(0, len(train)), train.astype(np.float64))
            sig = np.concatenate([sig, [((1 - acp_t[top]) / acp_t[top]).item() ** 0.5]])
        # where n approaches num_train_timesteps the timesteps repeat: diffusers keeps the first of each (and all
        # the sigmas, so the steps run over the first len(ts) + 1 of them)
        _, first = np.unique(ts, return_index=True)
        ts = ts[np.sort(first)].astype(np.int64)
        m = len(ts)
        sig = sig.astype(np.float32).astype(np.float64)[:m + 1]
        alpha = 1 / np.sqrt(sig**2 + 1)
        sigma_vp = sig * alpha
        px, pm = _x0_from_vp(cfg["prediction_type"], alpha[:m], sigma_vp[:m])
        return ts, sig, alpha, sigma_vp, px, pm


class DPMSolverSinglestepSampler(_KeepsX, DPMSolverPPSampler):
    """DPM-Solver++ single-step (Lu et al. 2022, "DPM++ 2S" / "3S"), order 1, 2 or 3, as diffusers'
    DPMSolverSinglestepScheduler with algorithm_type="dpmsolver++" or its SDE form "sde-dpmsolver++": the steps come
    in groups of `solver_order` (orders 1, 2[, 3] in turn; see ``order_list``), and each step of a group goes from
    the group's first x, x_g, with the x0 of the group's steps so far (lambda = log(alpha / sigma), h = lambda_t -
    lambda_g, r_k = (lambda_k - lambda_g) / h, D0 = the group's first x0):

        order 2:  x_t = (sigma_t / sigma_g) x_g - alpha_t (e^-h - 1) D0 - alpha_t (e^-h - 1) D1 / 2   (midpoint)
        order 3:  the third-order update of the paper with the group's three x0 (solver_type midpoint or heun)

    (the SDE form: x_g's weight times e^-h, e^-2h in place of e^-h in the others, and fresh noise of std
    sigma_t sqrt(1 - e^-2h) at every step). Each step is one fused kernel call: x_g is copied into a history buffer
    after the group's first step (as diffusers keeps it) and moves down the buffers with the group's x0, so an
    edit made to x between the steps of a group (an inpainting blend) is dropped, as diffusers drops it.

    Orders as diffusers: a run's steps before `solver_order` model outputs exist run at the order they allow (an
    image-to-image run starting at begin_index), lower_order_final ends on a shorter group, and with
    final_sigmas_type="zero" (the default) the last step is first order. diffusers switches lower_order_final on
    when the step count is not a multiple of solver_order, or with final_sigmas_type="zero"; it does so here too, for
    that run (diffusers writes it into its config for good). The noise-prediction "dpmsolver" is refused, as by
    DPMSolverPPSampler.
    """

    _options = {**_COMMON, "algorithm_type": "dpmsolver++", "solver_order": 2, **_THRESHOLDING,
                "solver_type": "midpoint", "lower_order_final": False, "use_karras_sigmas": False,
                **_SPACING_OPTIONS, "final_sigmas_type": "zero", "lambda_min_clipped": -float("inf"),
                "variance_type": None, "timestep_spacing": "linspace", "use_flow_sigmas": False, "flow_shift": 1.0,
                "use_dynamic_shifting": False, "time_shift_type": "exponential"}
    _round_karras = True  # diffusers' single-step rounds its Karras timesteps for every beta schedule

    @property
    def _n_buffers(self):  # a group's x0 but the last, and its first x
        return self.config["solver_order"]

    _two_buffers = Sampler._two_buffers  # (from _n_buffers, not DPMSolverPPSampler's)

    def _validate(self, cfg):
        super()._validate(cfg)
        if not isinstance(cfg["lower_order_final"], (bool, np.bool_)):
            raise TypeError(f"lower_order_final: expected a bool, got {type(cfg['lower_order_final']).__name__}")
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type: expected 'zero' or 'sigma_min', got {cfg['final_sigmas_type']!r}")

    def order_list(self, n: int) -> list:
        """The solver order of each of an n-step run's steps, as diffusers' get_order_list: groups 1, 2[, 3] in
        turn; with lower_order_final (in effect when n is not a multiple of solver_order, or with
        final_sigmas_type="zero") the last group shortened to fit and the final step first order."""
        cfg = self.config
        order = cfg["solver_order"]
        lower = cfg["lower_order_final"] or n % order != 0 or cfg["final_sigmas_type"] == "zero"
        if order == 1:
            orders = [1] * n
        elif not lower:
            orders = list(range(1, order + 1)) * (n // order)
        elif order == 3:
            orders = ([1, 2, 3] * (n // 3 - 1) + [1, 2, 1] if n % 3 == 0
                      else [1, 2, 3] * (n // 3) + ([1] if n % 3 == 1 else [1, 2]))
        else:
            orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
        if cfg["final_sigmas_type"] == "zero":
            orders[-1] = 1
        return orders

    def _group_step(self, i, o, alpha, sigma, lam):
        """Step i of order o from its group's first x, x_g (g = i - o + 1): x_{i+1} = a x_g + sum_k w[k] x0_k, the
        sum over the group's steps g..i; returns (a, w, noise std)."""
        g, t = i - o + 1, i + 1
        a_t, s_t = alpha[t], sigma[t]
        h = lam[t] - lam[g]
        if abs(h) <= 1e-6:  # two equal sigmas: every form's limit is x_t = x_g (see DPMSolverPPSampler)
            return 1.0, {}, 0.0
        # the weights of x_g (a), D0 = x0_g (c0), the first difference (c1: heun's, and the third order's; the
        # second order's midpoint form) and the second (c2, heun's third order); the SDE form (diffusers'): e^-2h in
        # place of e^-h (h2 = 2h in place of h), x_g's weight times e^-h, fresh noise. (Orders 2 and 3 never end
        # at sigma = 0: h is finite where c1, c2 are formed.)
        sde = self.config["algorithm_type"] == "sde-dpmsolver++"
        h2 = 2 * h if sde else h
        phi = np.expm1(-h2) if np.isfinite(h) else -1.0  # e^-h - 1 (SDE: e^-2h - 1)
        a = s_t / sigma[g] * (np.exp(-h) if sde else 1.0)
        c0 = -a_t * phi
        std = s_t * np.sqrt(-phi) if sde else 0.0
        if o == 1:
            return a, {i: c0}, std
        c1 = a_t * (phi / h2 + 1.0) if self.config["solver_type"] == "heun" or o == 3 else -0.5 * a_t * phi
        if o == 2:  # D1 = (x0_i - x0_g) / r0
            r0 = (lam[i] - lam[g]) / h
            return a, {g: c0 - c1 / r0, i: c1 / r0}, std
        # order 3: D1_0 = (x0_{i-1} - x0_g) / r1, D1_1 = (x0_i - x0_g) / r0
        r0, r1 = (lam[i] - lam[g]) / h, (lam[i - 1] - lam[g]) / h
        if self.config["solver_type"] == "midpoint":  # c1 D1_1 (x0_{i-1} enters only the group's second step)
            return a, {g: c0 - c1 / r0, i: c1 / r0}, std
        # heun: c1 D1 + c2 D2, D1 = (r0 D1_0 - r1 D1_1) / (r0 - r1), D2 = 2 (D1_1 - D1_0) / (r0 - r1)
        c2 = a_t * ((-phi - h2) / h2**2 - 0.5) if sde else -a_t * ((phi + h) / h**2 - 0.5)
        k10 = (c1 * r0 - 2 * c2) / (r0 - r1)  # weight of D1_0
        k11 = (2 * c2 - c1 * r1) / (r0 - r1)  # weight of D1_1
        return a, {g: c0 - k10 / r1 - k11 / r0, i - 1: k10 / r1, i: k11 / r0}, std

    def _plan(self, n):
        ts, sig, alpha, sigma_vp, px, pm = self._run_sigmas(n)
        n = len(ts)
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma_vp)  # +inf where sigma = 0
        orders, b = self.order_list(n), self._begin_index
        rows = np.zeros((n, 12))
        rows[:, _PX], rows[:, _PM] = px, pm
        # as diffusers: no higher order than the model outputs of this run allow (steps before begin_index are not
        # run; their rows are first order)
        o_run = [min(orders[i], i - b + 1) if i >= b else 1 for i in range(n)]
        keep_x = np.zeros(n, dtype=bool)
        for i, o in enumerate(o_run):
            a, w, std = self._group_step(i, o, alpha, sigma_vp, lam)
            # x_g: x itself at a group's first step (then copied into the second buffer, where the kernel has just
            # put the x0 before this one, for the group's next step), the second buffer at its second step, the
            # third at its third (moved down with the x0)
            rows[i, (_A, _A, _E, _F)[o]] = a
            for k, col in ((i, _C), (i - 1, _D), (i - 2, _E)):
                if k in w:
                    rows[i, col] += w[k]
            rows[i, _S] = std
            keep_x[i] = i + 1 < n and o_run[i + 1] == 2
        self._sigmas_np = sig
        plan = {"timesteps": ts, "rows": rows, "alpha": alpha[:n], "sigma": sigma_vp[:n], "keep_x": keep_x}
        if self.config["prediction_type"] == "flow_prediction":
            with np.errstate(divide="ignore"):
                plan["cg_k"] = -sigma_vp[:n] / alpha[:n]
        return plan


def _set_timesteps_with_mu(sampler, set_timesteps, n, device, seed, begin_index, mu, timesteps=None):
    """set_timesteps of a sampler with dynamic shifting: `mu` checked and kept in sampler.mu (a refused call keeps
    the previous one)."""
    before = sampler.mu
    if mu is not None:
        if not _is_real(mu) or not math.isfinite(mu):
            raise ValueError(f"mu: expected a finite float, got {mu!r}")
        sampler.mu = float(mu)
    try:
        return set_timesteps(n, device, seed=seed, begin_index=begin_index, timesteps=timesteps)
    except Exception:
        sampler.mu = before
        raise


def _time_shift(sampler, sig):
    """Flow sigmas shifted by the resolution-dependent sampler.mu (diffusers' time_shift with sigma = 1)."""
    if sampler.mu is None:
        hint = ("mu=sampler.calculate_shift(image_seq_len)" if hasattr(sampler, "calculate_shift") else "mu=...")
        raise ValueError(f"mu: use_dynamic_shifting needs the resolution-dependent shift: set_timesteps(n, {hint}) "
                         f"(or set sampler.mu)")
    if sampler.config["time_shift_type"] == "linear" and not sampler.mu > 0:  # mu / (mu + 1/sigma - 1): 0/0 at 1
        raise ValueError(f"mu: time_shift_type='linear' needs mu > 0, got {sampler.mu!r}")
    e = math.exp(sampler.mu) if sampler.config["time_shift_type"] == "exponential" else sampler.mu
    return e / (e + (1 / sig - 1))


def _stretch_to_terminal(sig, terminal):
    """Sigmas stretched so that the last one is `terminal` (diffusers' stretch_shift_to_terminal)."""
    one_minus = 1 - sig
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


class DEISSampler(_FlowShiftMu):
    """DEIS (Zhang & Chen 2023), multistep, log-rho, order 1-3, as diffusers' DEISMultistepScheduler: on the noise
    prediction e, with rho = sigma / alpha,

        x_t = alpha_t (x_s / alpha_s + sum_k c_k e_{s-k}),   c_k = integral over log rho from rho_s to rho_t of the
                                                             Lagrange basis of the last `order` steps (closed form)

    (order 1 is DDIM). First order at a run's first step, second at its second, and at the last (last two) under
    lower_order_final with fewer than 15 steps, as diffusers. The previous noise predictions stay on the device in the
    kernel's history buffers (the kernel's x0 row forms e from x and the model output). VP sigmas (spacings, Karras)
    or flow sigmas (flow_shift, dynamic shifting with mu). thresholding (which would clip x0 before e is re-derived
    from it) is not implemented.
    """

    _options = {**_COMMON, "solver_order": 2, "algorithm_type": "deis", "solver_type": "logrho",
                "lower_order_final": True, "use_karras_sigmas": False, **_SPACING_OPTIONS, "use_flow_sigmas": False,
                "flow_shift": 1.0, "timestep_spacing": "linspace", "use_dynamic_shifting": False,
                "time_shift_type": "exponential"}
    _fixed = {"thresholding": False}
    _prediction_types = PREDICTION_TYPES + ("flow_prediction",)
    _multistep = True

    def _validate(self, cfg):
        super()._validate(cfg)
        _check_solver_order(cfg)
        if cfg["algorithm_type"] != "deis":
            raise ValueError(f"algorithm_type: expected 'deis', got {cfg['algorithm_type']!r}")
        if cfg["solver_type"] != "logrho":
            raise ValueError(f"solver_type: expected 'logrho', got {cfg['solver_type']!r}")
        _check_flow_options(cfg, ("exponential",))

    @property
    def _two_buffers(self):
        return self.config["solver_order"] == 3

    def _plan(self, n):
        cfg = self.config
        flow = cfg["use_flow_sigmas"]
        if flow:  # DPM-Solver++'s flow sigmas, the last one repeated
            ts, fs = _dpm_flow_sigmas(cfg, self.mu, n)
            sig = np.concatenate([fs, fs[-1:]]).astype(np.float32).astype(np.float64)
            alpha, sigma = 1 - sig, sig
        else:  # the final sigma: sigma_min, or (Karras, exponential, beta sigmas) the last one repeated
            spaced = _sigma_spacing(cfg) is not None
            ts, sig = _vp_sigmas({**cfg, "final_sigmas_type": "zero" if spaced else "sigma_min"}, self.schedule, n)
            if spaced:
                sig[-1] = sig[-2]
            alpha = 1 / np.sqrt(sig**2 + 1)
            sigma = sig * alpha
        n = len(ts)
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)
        lrho = np.log(sigma / alpha)
        pred = cfg["prediction_type"]
        lower = cfg["lower_order_final"] and n < 15
        order_cfg, begin = cfg["solver_order"], self._begin_index

        def ind2(t, b, c):  # diffusers' ind_fn of the second-order update, in log rho
            return np.exp(t) * (-c + t - 1) / (b - c)

        def ind3(t, b, c, d):
            num = np.exp(t) * (c * (d - t + 1) - d * t + d + t**2 - 2 * t + 2)
            return num / ((b - c) * (b - d))

        rows = np.zeros((n, 12))
        for i in range(n):
            a_s, s_s, a_t, s_t = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
            if pred == "flow_prediction":
                px, pm = 1.0, -sig[i]
            else:
                px, pm = _x0_from_vp(pred, np.array(a_s), np.array(s_s))
            rows[i, _PX], rows[i, _PM] = (1 - a_s * px) / s_s, -a_s * pm / s_s  # e = (x - alpha x0) / sigma
            k = i - begin
            if order_cfg == 1 or k < 1 or (i == n - 1 and lower):
                h = lam[i + 1] - lam[i]
                rows[i, _A] = a_t / a_s
                rows[i, _C] = -s_t * np.expm1(h)
                continue
            rows[i, _A] = a_t / a_s
            t_, s0, s1 = lrho[i + 1], lrho[i], lrho[i - 1]
            if order_cfg == 2 or k < 2 or (i == n - 2 and lower):
                rows[i, _C] = a_t * (ind2(t_, s0, s1) - ind2(s0, s0, s1))
                rows[i, _D] = a_t * (ind2(t_, s1, s0) - ind2(s0, s1, s0))
            else:
                s2 = lrho[i - 2]
                rows[i, _C] = a_t * (ind3(t_, s0, s1, s2) - ind3(s0, s0, s1, s2))
                rows[i, _D] = a_t * (ind3(t_, s1, s2, s0) - ind3(s0, s1, s2, s0))
                rows[i, _E] = a_t * (ind3(t_, s2, s0, s1) - ind3(s0, s2, s0, s1))
        self._sigmas_np = sig
        plan = {"timesteps": ts, "rows": rows, "alpha": alpha[:n], "sigma": sigma[:n]}
        if pred == "flow_prediction":
            plan["cg_k"] = -sigma[:n] / alpha[:n]
        return plan


class PNDMSampler(_KeepsX, Sampler):
    """PNDM's pseudo linear multistep method (Liu et al. 2022, PLMS), as diffusers' PNDMScheduler with
    skip_prk_steps=True (Stable Diffusion 1.x's scheduler config): each step is the transfer

        x_prev = sqrt(a_prev / a_t) x - (a_prev - a_t) e / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev))

    with e a linear-multistep combination of the last model outputs: (3 e_k - e_{k-1}) / 2, then (23, -16, 5) / 12,
    then (55, -59, 37, -9) / 24; the run starts with a warm-up step that evaluates the model twice at the first
    step and redoes it with the mean of the two outputs (the second is not kept). So n steps are n + 1 model calls
    (``timesteps`` and ``num_inference_steps`` count the calls; the second timestep appears twice), and the last
    three outputs stay on the device in the kernel's three history buffers. v_prediction is converted to the noise
    after the combination, as diffusers does. skip_prk_steps=False (Runge-Kutta warm-up, diffusers' default) is not
    implemented.

    The warm-up's second call redoes the first step from its start x_0, which is copied into the second history
    buffer after the first call (as diffusers keeps it; the history holds one output then), so an edit made to x
    after the first step (a soft inpainting blend) is dropped, as in diffusers.
    """

    _options = {**_COMMON, "set_alpha_to_one": False, "timestep_spacing": "leading"}
    _fixed = {"skip_prk_steps": True}
    _prediction_types = ("epsilon", "v_prediction")
    _multistep = True
    _n_buffers = 3

    def _plan(self, n):
        T = self.schedule.num_train_timesteps
        if n > T:
            raise ValueError(f"num_inference_steps: {n} exceeds num_train_timesteps={T}")
        cfg = self.config
        acp = self._acp()
        final = 1.0 if cfg["set_alpha_to_one"] else acp[0]
        asc = _discrete_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"])[::-1]
        ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].copy().astype(np.int64)  # n + 1 model calls
        r = T // n
        v = cfg["prediction_type"] == "v_prediction"

        def transfer(t, tp):  # (a, b): x_prev = a sample + b model_output (diffusers' _get_prev_sample)
            a_t = acp[t]
            a_p = acp[tp] if tp >= 0 else final
            k = (a_p - a_t) / (a_t * np.sqrt(1 - a_p) + np.sqrt(a_t * (1 - a_t) * a_p))
            sc = np.sqrt(a_p / a_t)
            return (sc - k * np.sqrt(1 - a_t), -k * np.sqrt(a_t)) if v else (sc, -k)

        m = len(ts)
        rows = np.zeros((m, 12))
        rows[:, _PX], rows[:, _PM] = 0.0, 1.0  # the history keeps the model outputs themselves
        begin = self._begin_index
        keep_x = np.zeros(m, dtype=bool)
        if begin + 1 < m:  # the warm-up's start x_0, for its second call
            keep_x[begin] = True
        for i in range(m):
            c = max(i - begin, 0)  # the run's counter (steps before begin_index are never run)
            t = int(ts[i])
            if c == 1:  # the warm-up's second call: redo step 0 from its start x_0 (the second buffer)
                a1, b1 = transfer(t + r, t)
                rows[i, _E] = a1
                rows[i, _C] = rows[i, _D] = b1 / 2  # the mean of the two outputs
                rows[i, _KEEP] = 1.0  # KEEP: this output is not one of the multistep history
                continue
            a, b = transfer(t, t - r)
            coef = {0: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12)}.get(c, (55 / 24, -59 / 24, 37 / 24,
                                                                                       -9 / 24))
            rows[i, _A] = a
            for col, w in zip((_C, _D, _E, _F), coef):
                rows[i, col] = b * w
        alpha = np.sqrt(acp[ts])
        self._sigmas_np = None
        return {"timesteps": ts, "rows": rows, "alpha": alpha, "sigma": np.sqrt(1 - acp[ts]), "keep_x": keep_x}


def _flow_sigma_ends(T: int, shift: float):
    """(sigma_max, sigma_min) as diffusers' flow-matching constructors leave them: t / T for t = T .. 1 in float32,
    shifted by `shift` (1: unshifted, as with dynamic shifting)."""
    init = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
    if shift != 1:
        init = shift * init / (1 + (shift - 1) * init)
    return init[0].item(), init[-1].item()


class FlowMatchEulerSampler(Sampler):
    """Euler sampling of a rectified-flow / flow-matching model (Stable Diffusion 3, Flux, ...), as diffusers'
    FlowMatchEulerDiscreteScheduler: x_t = (1 - sigma) x0 + sigma noise, the model predicts the velocity
    v = noise - x0 at timestep sigma * num_train_timesteps, and

        x_next = x + (sigma_next - sigma) v          (stochastic_sampling: (1 - sigma_next) x0 + sigma_next z)

    The sigmas run from 1 down to the shifted 1 / num_train_timesteps, then 0: shifted by `shift`
    (sigma' = shift sigma / (1 + (shift - 1) sigma); SD3 uses 3), or, with use_dynamic_shifting (Flux), by the
    resolution-dependent `mu` that set_timesteps takes (``calculate_shift(image_seq_len)`` gives the pipelines'
    value), then optionally stretched to `shift_terminal` and/or respaced as Karras sigmas. Classifier-free guidance
    combines the velocities, as the pipelines do.
    """

    _options = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                "time_shift_type": "exponential", "shift_terminal": None, "use_karras_sigmas": False,
                **_SPACING_OPTIONS,
                "stochastic_sampling": False}
    _fixed = {"invert_sigmas": False}
    _custom_schedules = ("sigmas", "timesteps")  # n values in (0, 1] / (0, T], before shifting (set_timesteps)
    # set_timesteps' custom timesteps while its _plan runs (not _given_timesteps: the base set_timesteps, which
    # this one calls without them, resets that; the sigmas are kept in _given_sigmas, as EulerSampler's)
    _given_flow_timesteps = None

    def _build_schedule(self):
        self.schedule = None  # no discrete-time VP schedule: the sigmas are the schedule

    def _validate(self, cfg):
        T = cfg["num_train_timesteps"]
        if not _is_int(T) or T < 1:
            raise ValueError(f"num_train_timesteps: expected a positive int, got {T!r}")
        _check_sigma_spacing(cfg)
        for k in ("use_dynamic_shifting", "stochastic_sampling"):
            if not isinstance(cfg[k], (bool, np.bool_)):
                raise TypeError(f"{k}: expected a bool, got {type(cfg[k]).__name__}")
        if not _is_real(cfg["shift"]) or not cfg["shift"] > 0:
            raise ValueError(f"shift: expected a positive float, got {cfg['shift']!r}")
        # the dynamic-shifting options: None allowed where unused (diffusers' signature), else checked
        dyn = cfg["use_dynamic_shifting"]
        for k, ok, want in (("max_shift", lambda v: _is_real(v) and v > 0, "a positive float"),
                            ("base_shift", _is_real, "a float"),
                            ("base_image_seq_len", lambda v: _is_int(v) and v >= 1, "a positive int"),
                            ("max_image_seq_len", lambda v: _is_int(v) and v >= 1, "a positive int")):
            if not ok(cfg[k]) and (dyn or cfg[k] is not None):
                raise ValueError(f"{k}: expected {want}, got {cfg[k]!r}")
        if cfg["time_shift_type"] not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type: expected 'exponential' or 'linear', got {cfg['time_shift_type']!r}")
        st = cfg["shift_terminal"]
        if st is not None and (not _is_real(st) or not 0 <= st < 1):
            raise ValueError(f"shift_terminal: expected None or a float in [0, 1), got {st!r}")

    def calculate_shift(self, image_seq_len: int) -> float:
        """The `mu` of use_dynamic_shifting for a sequence of image_seq_len tokens, as the diffusers pipelines
        compute it: linear from base_shift at base_image_seq_len to max_shift at max_image_seq_len (Flux: 2x2
        latent patches, so (H / 16) (W / 16) tokens for an H x W image)."""
        cfg = self.config
        if any(cfg[k] is None for k in ("max_shift", "base_shift", "max_image_seq_len", "base_image_seq_len")):
            raise ValueError("config: calculate_shift needs base_shift, max_shift, base_image_seq_len and "
                             "max_image_seq_len (some are None)")
        m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
        return image_seq_len * m + (cfg["base_shift"] - m * cfg["base_image_seq_len"])

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, seed=None, begin_index: int = 0,
                      mu=None, sigmas=None, timesteps=None):
        """As Sampler.set_timesteps; `mu` (use_dynamic_shifting only, required there) is the resolution-dependent
        shift: kept in ``self.mu`` for later calls (fastdiff.sample calls set_timesteps without it). `sigmas`: this
        run's sigmas before shifting, in place of the default linspace (as diffusers' ``set_timesteps(sigmas=)``,
        which the Flux pipeline passes: ``np.linspace(1, 1 / n, n)``); their count is the number of steps.
        `timesteps`: the model's timesteps, used as given (values in (0, num_train_timesteps], strictly
        decreasing); without `sigmas` the sigmas are timesteps / num_train_timesteps, shifted as the default ones
        are, so the model then sees unshifted timesteps at shifted noise levels, exactly as diffusers does (and
        warns of); pass both, of the same length, to set each. Neither is kept: a later call without them goes back
        to the default."""
        given = {}
        for name, vals, hi in (("sigmas", sigmas, 1), ("timesteps", timesteps, self.config["num_train_timesteps"])):
            if vals is None:
                continue
            arr = _float64_array(vals, name) if name == "timesteps" else np.asarray(vals, dtype=np.float32)
            if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all() or not ((arr > 0) & (arr <= hi)).all():
                raise ValueError(f"{name}: expected a non-empty 1-D sequence of values in (0, {hi}], got {vals!r}")
            if name == "timesteps" and arr.size > 1 and not (np.diff(arr) < 0).all():
                raise ValueError(f"timesteps: expected a strictly decreasing sequence, got {vals!r}")
            if num_inference_steps is not None and num_inference_steps != arr.size:
                raise ValueError(f"num_inference_steps: {num_inference_steps!r} but {arr.size} {name} were given")
            num_inference_steps = int(arr.size)
            given[name] = arr.astype(np.float32)  # float32, as diffusers takes them
        if num_inference_steps is None:
            raise ValueError("num_inference_steps: required when no sigmas or timesteps are given")
        self._given_sigmas, self._given_flow_timesteps = given.get("sigmas"), given.get("timesteps")
        try:
            return _set_timesteps_with_mu(self, super().set_timesteps, num_inference_steps, device, seed, begin_index,
                                          mu)
        finally:
            self._given_sigmas = self._given_flow_timesteps = None

    def _sigmas(self, n):
        cfg = self.config
        T = cfg["num_train_timesteps"]
        # sigma_max and sigma_min as diffusers' constructor leaves them (float32; the static shift applied once
        # there and once more below, as diffusers does)
        smax, smin = _flow_sigma_ends(T, 1.0 if cfg["use_dynamic_shifting"] else cfg["shift"])
        custom, given_ts = self._given_sigmas, self._given_flow_timesteps
        # given sigmas (or timesteps) are float32 from here on, as diffusers' (the default ones float64 until the
        # end, as its)
        if custom is not None:
            sig = custom.copy()
        elif given_ts is not None:
            sig = given_ts / np.float32(T)
        else:
            sig = np.linspace(smax * T, smin * T, n) / T
        if cfg["use_dynamic_shifting"]:
            sig = _time_shift(self, sig)
        else:
            sig = cfg["shift"] * sig / (1 + (cfg["shift"] - 1) * sig)
        if cfg["shift_terminal"]:
            if n == 1:  # the one sigma is 1: stretching 1 - sigma is 0/0 (diffusers: NaN sigmas)
                st = cfg["shift_terminal"]
                raise ValueError(f"num_inference_steps: shift_terminal={st!r} stretches the sigmas to end at "
                                 f"it, which needs at least 2 steps, got 1")
            sig = _stretch_to_terminal(sig, cfg["shift_terminal"])
        if _sigma_spacing(cfg):
            sig = _spaced_sigmas(_sigma_spacing(cfg), float(sig[-1]), float(sig[0]), n)
        return sig.astype(np.float32)

    def _plan(self, n):
        T = self.config["num_train_timesteps"]
        s32 = self._sigmas(n)
        given_ts = self._given_flow_timesteps
        ts = given_ts.copy() if given_ts is not None else s32 * np.float32(T)
        sig = np.concatenate([s32, [0.0]]).astype(np.float64)
        s, s_next = sig[:-1], sig[1:]
        rows = np.zeros((n, 9))
        rows[:, _PX], rows[:, _PM] = 1.0, -s  # x0 = x - sigma v
        if self.config["stochastic_sampling"]:
            rows[:, _C], rows[:, _S] = 1 - s_next, s_next
        else:
            rows[:, _A], rows[:, _B] = 1.0, s_next - s
        self._sigmas_np = sig
        with np.errstate(divide="ignore"):
            cg_k = -s / (1 - s)  # v shifts by -sigma / (1 - sigma) s grad (eps by -sigma s grad); 0 at sigma = 1
        return {"timesteps": ts.astype(np.float32), "rows": rows, "alpha": 1 - s, "sigma": s, "cg_k": cg_k}

    @property
    def _stochastic(self):
        return bool(self.config["stochastic_sampling"])


class FlowMatchHeunSampler(_TwoCallSteps, FlowMatchEulerSampler):
    """Heun's method on a flow-matching model, as diffusers' FlowMatchHeunDiscreteScheduler (an SD3 alternative):
    each step from sigma to sigma_next is an Euler step with the velocity v there, then, unless sigma_next = 0, a
    correction with the velocity v' at the Euler point:

        x_next = x + (sigma_next - sigma) (v + v') / 2

    so n steps take 2n - 1 model calls (``timesteps`` lists every one after the first twice, as diffusers does, and
    ``num_inference_steps`` counts them). The Euler call's v (in the x0 slot of the kernel's first buffer) and the
    step's x (copied into the second after that call) wait for the correction, as diffusers keeps them, so each call
    is one fused kernel. Sigmas as diffusers' (the shift applied twice, as its FlowMatchEulerDiscreteScheduler
    does); its step's churn (s_churn > 0) is not implemented.
    """

    _options = {"num_train_timesteps": 1000, "shift": 1.0}
    _fixed = {}
    _custom_schedules = ()
    _multistep = True
    _n_buffers = 2  # the Euler call's velocity, and the step's x

    def _validate(self, cfg):
        T = cfg["num_train_timesteps"]
        if not _is_int(T) or T < 1:
            raise ValueError(f"num_train_timesteps: expected a positive int, got {T!r}")
        if not _is_real(cfg["shift"]) or not cfg["shift"] > 0:
            raise ValueError(f"shift: expected a positive float, got {cfg['shift']!r}")

    # the base set_timesteps: no mu (as diffusers' FlowMatchHeunDiscreteScheduler)
    set_timesteps = Sampler.set_timesteps

    @property
    def _stochastic(self):
        return False

    def _sigmas(self, n):
        T, shift = self.config["num_train_timesteps"], self.config["shift"]
        smax, smin = _flow_sigma_ends(T, shift)  # shifted once there, and again here, as diffusers does
        sig = np.linspace(smax * T, smin * T, n) / T
        return (shift * sig / (1 + (shift - 1) * sig)).astype(np.float32)

    def _plan(self, n):
        T = self.config["num_train_timesteps"]
        s32 = self._sigmas(n)
        sig = np.concatenate([s32, [0.0]]).astype(np.float64)
        ev = [0]  # the calls: step k's Euler part (the model at sig[k]), then its correction (at sig[k + 1])
        for k in range(1, n):
            ev += [k, k]
        s_ev = sig[ev]
        rows = np.zeros((2 * n - 1, 12))
        rows[:, _PX], rows[:, _PM] = 1.0, -s_ev  # x0 = x - sigma v
        keep_x = np.zeros(2 * n - 1, dtype=bool)
        for j, k in enumerate(ev):
            if j % 2 == 0:  # Euler from sig[k] to sig[k + 1]: x + dt v; v into the first buffer, x into the second
                rows[j, _A], rows[j, _B] = 1.0, sig[k + 1] - sig[k]
                rows[j, _PX], rows[j, _PM] = 0.0, 1.0  # (the "x0" the kernel keeps: v itself)
                keep_x[j] = k < n - 1
            else:  # the correction of the step from sig[k - 1] to sig[k]: x + dt (v + v') / 2
                dt = sig[k] - sig[k - 1]
                rows[j, _E], rows[j, _D], rows[j, _B], rows[j, _KEEP] = 1.0, dt / 2, dt / 2, 1.0
        self._sigmas_np = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])  # diffusers' 2n sigmas
        with np.errstate(divide="ignore"):
            cg_k = -s_ev / (1 - s_ev)  # as FlowMatchEulerSampler's
        ts = (s32 * np.float32(T))[ev]
        return {"timesteps": ts.astype(np.float32), "rows": rows, "alpha": 1 - s_ev, "sigma": s_ev, "cg_k": cg_k,
                "keep_x": keep_x}


class UniPCSampler(Sampler):
    """UniPC (Zhao et al. 2023): the UniP predictor with the UniC corrector, B(h) variants, order 1 to 3, as diffusers'
    UniPCMultistepScheduler (the scheduler of Wan 2.x and many fast-sampling setups; flow matching with
    use_flow_sigmas=True and prediction_type="flow_prediction").

    diffusers' step i first corrects x_i, which its predictor made from x_{i-1}, with the model output at x_i (UniC:
    x_i^c = x_i + m_i B(h) [the predictor's residual minus the corrector's], linear in the x0 of steps i, i - 1 and
    i - 2), then predicts x_{i+1} from x_i^c (UniP: x_{i+1} = A x_i^c - m_{i+1} phi_1 x0_i - m_{i+1} B(h) rho (x0_{i-1}
    - x0_i) / r, and the same for x0_{i-2} at order 3). Both are linear in x and the last x0, so one step is one row
    of the fused kernel, out = A x + C x0_i + D x0_{i-1} + E x0_{i-2} (+ F x0_{i-3} at order 3, whose corrector
    reaches one step further), the earlier x0 in the sampler's buffers (the kernel moves them down). predict_x0=False runs the same on the noise prediction. The corrector is skipped at the
    first step of a run and after each step listed in disable_corrector, as diffusers does; the last sample is not
    corrected (that would take another model call).

    One difference from diffusers, by design: the corrector corrects the x it is given. diffusers recomputes x_i^c
    from its own stored sample and so drops any edit made to x between steps (inpainting's blend of the known
    region, for one); here the edit is kept. Where diffusers' last step to sigma = 0 is NaN (solver_type="bh1", or
    predict_x0=False) this takes its limit, the final x0.
    """

    _options = {**_COMMON, "solver_order": 2, **_THRESHOLDING, "predict_x0": True, "solver_type": "bh2",
                "lower_order_final": True, "disable_corrector": [], "use_karras_sigmas": False, **_SPACING_OPTIONS,
                "use_flow_sigmas": False, "flow_shift": 1.0, "timestep_spacing": "linspace",
                "final_sigmas_type": "zero", "use_dynamic_shifting": False, "time_shift_type": "exponential",
                "shift_terminal": None}
    _fixed = {"solver_p": None, "sigma_min": None, "sigma_max": None}
    _prediction_types = PREDICTION_TYPES + ("flow_prediction",)
    _multistep = True

    def _validate(self, cfg):
        super()._validate(cfg)
        _check_solver_order(cfg)
        if cfg["solver_type"] not in ("bh1", "bh2", "midpoint", "heun", "logrho"):  # the last three mean bh2 there
            raise ValueError(f"solver_type: expected 'bh1' or 'bh2', got {cfg['solver_type']!r}")
        if not isinstance(cfg["predict_x0"], (bool, np.bool_)):
            raise TypeError(f"predict_x0: expected a bool, got {type(cfg['predict_x0']).__name__}")
        _check_flow_options(cfg, ("exponential", "linear"))
        dc = cfg["disable_corrector"]
        if not isinstance(dc, (list, tuple)) or not all(_is_int(v) for v in dc):
            raise TypeError(f"disable_corrector: expected a list of step indices, got {dc!r}")
        if cfg["prediction_type"] == "flow_prediction" and not cfg["predict_x0"]:
            raise ValueError("prediction_type: 'flow_prediction' needs predict_x0=True (as diffusers)")
        st = cfg["shift_terminal"]
        if st is not None and (not cfg["use_flow_sigmas"] or not _is_real(st) or not 0 <= st < 1):
            raise ValueError(f"shift_terminal: expected None, or a float in [0, 1) with use_flow_sigmas, got {st!r}")

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, seed=None, begin_index: int = 0,
                      mu=None, timesteps=None):
        """As Sampler.set_timesteps; `mu`: the shift of use_dynamic_shifting (flow sigmas), kept in ``self.mu``."""
        return _set_timesteps_with_mu(self, super().set_timesteps, num_inference_steps, device, seed, begin_index, mu,
                                      timesteps)

    def _clip(self):
        return super()._clip() if self.config["predict_x0"] else "none"  # diffusers thresholds x0 predictions only

    def _flow_sigmas(self, n):
        cfg = self.config
        T = cfg["num_train_timesteps"]
        sig = np.linspace(1, 1 / T, n + 1)[:-1]
        if cfg["use_dynamic_shifting"]:
            sig = _time_shift(self, sig)
        else:
            sig = cfg["flow_shift"] * sig / (1 + (cfg["flow_shift"] - 1) * sig)
        if cfg["shift_terminal"]:
            sig = _stretch_to_terminal(sig, cfg["shift_terminal"])
        if abs(sig[0] - 1) < 1e-6:
            sig[0] -= 1e-6
        ts = (sig * T).astype(np.int64)  # diffusers keeps them as int64 (truncated)
        last = sig[-1] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        return ts, np.concatenate([sig, [last]]).astype(np.float32).astype(np.float64)

    def _plan(self, n):
        cfg = self.config
        flow = cfg["use_flow_sigmas"]
        ts, sig = self._flow_sigmas(n) if flow else _vp_sigmas(cfg, self.schedule, n)
        n = len(ts)
        if flow:
            alpha, sigma = 1 - sig, sig
        else:
            alpha = 1 / np.sqrt(sig**2 + 1)
            sigma = sig * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf where sigma = 0
        x0_mode = cfg["predict_x0"]
        mult = alpha if x0_mode else sigma  # the factor of phi_1 and B(h) in each step's sum
        bh1 = cfg["solver_type"] == "bh1"
        begin, so = self._begin_index, cfg["solver_order"]
        pred = cfg["prediction_type"]
        off = set(int(v) for v in cfg["disable_corrector"])

        def order(i):  # diffusers' this_order at step i of a run started at `begin`
            if i < begin:
                return 1
            p = min(so, n - i) if cfg["lower_order_final"] else so
            return min(p, min(i - begin, so) + 1)

        def hb(i):  # (hh, h phi_1(hh) = e^hh - 1, B(h)) of the step from i to i + 1
            h = lam[i + 1] - lam[i]
            hh = -h if x0_mode else h
            return hh, np.expm1(hh), (hh if bh1 else np.expm1(hh))

        def solve_rhos(s0, order_):
            """(rks, rhos_p, rhos_c) of an order-`order_` UniP / UniC step from index s0 to s0 + 1, as diffusers
            solves them: rks[k-1] = (lambda_{s0-k} - lambda_{s0}) / h for the k = 1 .. order-1 earlier x0, R its
            Vandermonde matrix (with 1 for this step), b_k = h phi_k(hh) k! / B(h)."""
            hh, phi1, bh = hb(s0)
            h = lam[s0 + 1] - lam[s0]
            rks = np.array([(lam[s0 - k] - lam[s0]) / h for k in range(1, order_)] + [1.0])
            R = np.stack([rks**k for k in range(order_)])
            b, phik, fact = [], phi1 / hh - 1, 1
            for k in range(1, order_ + 1):
                b.append(phik * fact / bh)
                fact *= k + 1
                phik = phik / hh - 1 / fact
            b = np.array(b)
            if order_ == 1:
                rp = np.zeros(0)
            elif order_ == 2:
                rp = np.array([0.5])
            else:
                rp = np.linalg.solve(R[:-1, :-1], b[:-1])
            rc = np.array([0.5]) if order_ == 1 else np.linalg.solve(R, b)
            return rks[:-1], rp, rc

        rows = np.zeros((n, 12))
        for i in range(n):
            a, s_ = alpha[i], sigma[i]
            if pred == "flow_prediction":
                rows[i, _PX], rows[i, _PM] = 1.0, -sig[i]  # x0 = x - sigma v
            elif x0_mode:
                rows[i, _PX], rows[i, _PM] = _x0_from_vp(pred, np.array(a), np.array(s_))
            else:  # the noise prediction: eps = m, (x - alpha m) / sigma, or alpha m + sigma x
                rows[i, _PX], rows[i, _PM] = {"epsilon": (0.0, 1.0), "sample": (1 / s_, -a / s_),
                                              "v_prediction": (s_, a)}[pred]
            # k[j]: the weight of x0_{i-j} in x_i^c - x_i (the corrector of x_i, UniC of the order q the predictor
            # of step i - 1 had): f (pred_res - corr_res), f = mult_i B(h), with D1_k = (x0_{i-1-k} - x0_{i-1}) / rk_k,
            # pred_res = sum rhos_p D1, corr_res = sum rhos_c[:-1] D1 + rhos_c[-1] (x0_i - x0_{i-1})
            k = np.zeros(4)
            if i > begin and (i - 1) not in off:
                q = order(i - 1)
                rks, rp, rc = solve_rhos(i - 1, q)
                f = mult[i] * hb(i - 1)[2]
                k[0] = -f * rc[-1]
                k[1] = f * rc[-1]
                for kk in range(1, q):
                    w = f * (rp[kk - 1] - rc[kk - 1]) / rks[kk - 1]
                    k[1 + kk] += w
                    k[1] -= w
            # predictor from x_i^c (UniP of order p): x_{i+1} = A x^c - mult_{i+1} (phi_1 x0_i + B(h) sum rhos_p D1),
            # D1_k = (x0_{i-k} - x0_i) / rk_k
            p = order(i)
            hh, phi1, bh = hb(i)
            P = np.zeros(4)
            if np.isinf(hh):  # a last step to sigma = 0: mult_{i+1} phi_1 at its limit (x0: -1; noise: a_t s_s / a_s)
                A = 0.0 if x0_mode else alpha[i + 1] / a
                P[0] = -mult[i + 1] * phi1 if x0_mode else -alpha[i + 1] * s_ / a
            else:
                A = sigma[i + 1] / s_ if x0_mode else alpha[i + 1] / a
                P[0] = -mult[i + 1] * phi1
            if p > 1:
                if np.isinf(hh):  # D1 = (x0_{i-k} - x0_i) / rk with rk = h_prev / inf = 0 (diffusers: inf or a
                    # singular solve)
                    raise ValueError(f"lower_order_final: False runs the last step, to sigma 0, at order {p}, which has "
                                     f"no finite UniPC update; set lower_order_final=True or "
                                     f"final_sigmas_type='sigma_min'")
                rks, rp, _ = solve_rhos(i, p)
                for kk in range(1, p):
                    w = mult[i + 1] * bh * rp[kk - 1] / rks[kk - 1]
                    P[kk] -= w
                    P[0] += w
            rows[i, _A] = A
            for col, j_ in zip((_C, _D, _E, _F), range(4)):
                rows[i, col] = A * k[j_] + P[j_]
        self._sigmas_np = sig
        plan = {"timesteps": ts, "rows": rows, "alpha": alpha[:n], "sigma": sigma[:n]}
        if pred == "flow_prediction":
            with np.errstate(divide="ignore"):
                plan["cg_k"] = -sigma[:n] / alpha[:n]  # v shifts by -sigma / (1 - sigma) s grad, as flow matching's
        return plan

    @property
    def _two_buffers(self):
        return self.config["solver_order"] >= 2

    @property
    def _three_buffers(self):
        return self.config["solver_order"] == 3


# -- EDM (Karras et al. 2022) preconditioning ------------------------------------------------------------------------
_EDM_OPTIONS = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "sigma_schedule": "karras",
                "num_train_timesteps": 1000, "prediction_type": "epsilon", "rho": 7.0, "final_sigmas_type": "zero"}


class _EDM:
    """What the EDM samplers share (diffusers' EDMEulerScheduler / EDMDPMSolverMultistepScheduler): x = x0 + sigma
    noise, the model sees c_in x = x / sqrt(sigma^2 + sigma_data^2) at timestep c_noise = log(sigma) / 4, and its
    output F gives x0 = c_skip x + c_out F with c_skip = sigma_data^2 / (sigma^2 + sigma_data^2) and
    c_out = +-sigma sigma_data / sqrt(sigma^2 + sigma_data^2) (+ for "epsilon", - for "v_prediction"). The sigmas
    run from sigma_max to sigma_min, spaced as Karras et al. eq. 5 (`rho`) or evenly in log sigma
    (sigma_schedule="exponential"), then 0 (or sigma_min: final_sigmas_type)."""

    _prediction_types = ("epsilon", "v_prediction")
    _karras_dtype = torch.float64  # the dtype diffusers spaces Karras sigmas in (float32 for EDM DPM-Solver++)

    def _build_schedule(self):
        self.schedule = None  # no discrete-time schedule: the sigmas are the schedule

    def _validate_edm(self, cfg):
        T = cfg["num_train_timesteps"]
        if not _is_int(T) or T < 1:
            raise ValueError(f"num_train_timesteps: expected a positive int, got {T!r}")
        for k in ("sigma_min", "sigma_max", "sigma_data", "rho"):
            if not _is_real(cfg[k]) or not 0 < cfg[k] < math.inf:
                raise ValueError(f"{k}: expected a positive float, got {cfg[k]!r}")
        if not cfg["sigma_max"] > cfg["sigma_min"]:
            raise ValueError(f"sigma_max: expected more than sigma_min={cfg['sigma_min']!r}, got {cfg['sigma_max']!r}")
        if cfg["sigma_schedule"] not in ("karras", "exponential"):
            raise ValueError(f"sigma_schedule: expected 'karras' or 'exponential', got {cfg['sigma_schedule']!r}")
        if cfg["prediction_type"] not in self._prediction_types:
            raise ValueError(f"prediction_type: expected one of {', '.join(self._prediction_types)}, got "
                             f"{cfg['prediction_type']!r}")
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type: expected 'zero' or 'sigma_min', got {cfg['final_sigmas_type']!r}")

    def _edm_sigmas(self, n):
        """The n sigmas of a run (float32, computed as diffusers computes them) and the final one."""
        cfg = self.config
        smin, smax = float(cfg["sigma_min"]), float(cfg["sigma_max"])
        if cfg["sigma_schedule"] == "karras":
            ramp = torch.linspace(0, 1, n, dtype=self._karras_dtype)
            lo, hi = smin ** (1 / cfg["rho"]), smax ** (1 / cfg["rho"])
            sig = (hi + ramp * (lo - hi)) ** cfg["rho"]
        else:
            sig = torch.linspace(math.log(smin), math.log(smax), n).exp().flip(0)
        sig = sig.to(torch.float32)
        last = 0.0 if cfg["final_sigmas_type"] == "zero" else self._edm_last_sigma(sig)
        return sig.numpy().astype(np.float64), float(np.float32(last))

    def _edm_last_sigma(self, sig):
        return float(sig[-1])

    def _edm_coefs(self, s):
        """(c_skip, c_out, c_in) at sigmas s (float64)."""
        sd = float(self.config["sigma_data"])
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / np.sqrt(s**2 + sd**2)
        if self.config["prediction_type"] == "v_prediction":
            c_out = -c_out
        return c_skip, c_out, 1 / np.sqrt(s**2 + sd**2)

    def _edm_plan_extras(self, plan, s):
        """The model's input scaling and timesteps, the noise levels of x at the n steps (add_noise: x0 + s noise),
        and the classifier-guidance gain: x0 shifts by sigma^2 grad_x log p(y | x) (Tweedie), grad_x = c_in times
        the gradient at the model's input, so F shifts by sigma^2 c_in / c_out times that."""
        c_skip, c_out, c_in = self._edm_coefs(s)
        plan["in_div"] = 1 / c_in
        plan["alpha"], plan["sigma"] = c_in, s * c_in  # times in_div: 1 and s
        plan["cg_k"] = s**2 * c_in / c_out
        plan["timesteps"] = (0.25 * torch.log(torch.from_numpy(s.astype(np.float32)))).numpy()
        return plan

    @property
    def init_noise_sigma(self) -> float:
        return (float(self.config["sigma_max"]) ** 2 + 1) ** 0.5  # as diffusers' EDM schedulers


class EDMEulerSampler(_EDM, Sampler):
    """Euler's method on the EDM probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn), as diffusers'
    EDMEulerScheduler (Playground v2.5-style models): x_next = x + (x - x0) / sigma (sigma_next - sigma) with the EDM
    preconditioning of _EDM; ``scale_model_input`` gives c_in x and ``timesteps`` are c_noise = log(sigma) / 4."""

    _options = dict(_EDM_OPTIONS)

    def _validate(self, cfg):
        self._validate_edm(cfg)

    def _plan(self, n):
        sig, last = self._edm_sigmas(n)
        full = np.append(sig, last)
        self._sigmas_np = full
        s, s_next = full[:-1], full[1:]
        c_skip, c_out, _ = self._edm_coefs(s)
        rows = np.zeros((n, 9))
        rows[:, _PX], rows[:, _PM] = c_skip, c_out
        ratio = (s_next - s) / s
        rows[:, _A], rows[:, _C] = 1 + ratio, -ratio
        return self._edm_plan_extras({"rows": rows}, s)


class EDMDPMSolverPPSampler(_EDM, DPMSolverPPSampler):
    """DPM-Solver++ (2M, 3M and their SDE forms) with the EDM preconditioning of _EDM, as diffusers'
    EDMDPMSolverMultistepScheduler: the steps of DPMSolverPPSampler with alpha = 1 and sigma the EDM sigma
    (lambda = -log sigma), x0 from c_skip and c_out; thresholding, solver_order, solver_type, lower_order_final,
    euler_at_final as there."""

    _options = {**_EDM_OPTIONS, "solver_order": 2, **_THRESHOLDING, "algorithm_type": "dpmsolver++",
                "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False}
    _karras_dtype = torch.float32
    _custom_schedules = ()

    def _validate(self, cfg):
        self._validate_edm(cfg)
        _check_flags(cfg)
        _check_dpm_solver(cfg)

    def _edm_last_sigma(self, sig):
        return self.config["sigma_min"]  # diffusers' EDM DPM-Solver++ ends at the config's, not the last sigma

    @property
    def _split_channels(self):
        return False

    # the base set_timesteps: no mu (there are no flow sigmas here)
    set_timesteps = Sampler.set_timesteps

    def _run_sigmas(self, n):
        sig, last = self._edm_sigmas(n)
        full = np.append(sig, last)
        c_skip, c_out, _ = self._edm_coefs(sig)
        return np.zeros(n), full, np.ones(n + 1), full, c_skip, c_out

    def _plan(self, n):
        plan = super()._plan(n)
        return self._edm_plan_extras(plan, self._sigmas_np[:-1])


class CosineDPMSolverSampler(EDMDPMSolverPPSampler):
    """DPM-Solver++ 2M SDE on the EDM form with the "cosine" noise conditioning, as diffusers'
    CosineDPMSolverMultistepScheduler (Stable Audio Open's): EDMDPMSolverPPSampler's steps with
    algorithm_type="sde-dpmsolver++" (always) and solver_order 1 or 2, the model's timestep c_noise = atan(sigma)
    2 / pi, and Stable Audio's defaults (sigmas exponentially spaced from 500 to 0.3, sigma_data 1, v_prediction).
    diffusers draws the noise from a Brownian tree (torchsde): each step's increment is independent of the others,
    so the kernel's fresh noise at every step has the same distribution (the same seed gives the same samples, not
    diffusers' samples)."""

    _options = {**EDMDPMSolverPPSampler._options, "sigma_min": 0.3, "sigma_max": 500.0, "sigma_data": 1.0,
                "sigma_schedule": "exponential", "prediction_type": "v_prediction",
                "algorithm_type": "sde-dpmsolver++"}

    def _validate(self, cfg):
        super()._validate(cfg)
        if cfg["algorithm_type"] != "sde-dpmsolver++":
            raise ValueError(f"algorithm_type: CosineDPMSolverSampler runs 'sde-dpmsolver++' only (as diffusers' "
                             f"CosineDPMSolverMultistepScheduler), got {cfg['algorithm_type']!r}")
        if cfg["solver_order"] not in (1, 2):
            raise ValueError(f"solver_order: expected 1 or 2 (as diffusers' CosineDPMSolverMultistepScheduler), got "
                             f"{cfg['solver_order']!r}")

    def _edm_plan_extras(self, plan, s):
        plan = super()._edm_plan_extras(plan, s)
        plan["timesteps"] = (torch.from_numpy(s.astype(np.float32)).atan() / math.pi * 2).numpy()
        return plan


SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "euler": EulerSampler, "euler_ancestral": EulerAncestralSampler,
            "dpmsolver++": DPMSolverPPSampler, "lcm": LCMSampler, "flow_match_euler": FlowMatchEulerSampler,
            "heun": HeunSampler, "unipc": UniPCSampler, "pndm": PNDMSampler, "lms": LMSSampler,
            "deis": DEISSampler, "tcd": TCDSampler, "kdpm2": KDPM2Sampler, "kdpm2_ancestral": KDPM2AncestralSampler,
            "edm_euler": EDMEulerSampler, "edm_dpmsolver++": EDMDPMSolverPPSampler,
            "dpmsolver_singlestep": DPMSolverSinglestepSampler, "ddim_inverse": DDIMInverseSampler,
            "dpmsolver++_inverse": DPMSolverMultistepInverseSampler, "cogvideox_ddim": CogVideoXDDIMSampler,
            "flow_match_heun": FlowMatchHeunSampler, "dpmsolver_sde": DPMSolverSDESampler,
            "cogvideox_dpm": CogVideoXDPMSampler, "cosine_dpmsolver++": CosineDPMSolverSampler}

_CUSTOM_TIMESTEP_SAMPLERS = (DDPMSampler, EulerSampler, HeunSampler, DPMSolverPPSampler, DPMSolverSinglestepSampler,
                             LCMSampler, TCDSampler, FlowMatchEulerSampler)

#: diffusers scheduler class -> the sampler that follows its trajectory (from_scheduler)
DIFFUSERS_SCHEDULERS = {"DDPMScheduler": DDPMSampler, "DDIMScheduler": DDIMSampler,
                        "EulerDiscreteScheduler": EulerSampler, "EulerAncestralDiscreteScheduler": EulerAncestralSampler,
                        "HeunDiscreteScheduler": HeunSampler, "DPMSolverMultistepScheduler": DPMSolverPPSampler,
                        "LCMScheduler": LCMSampler, "FlowMatchEulerDiscreteScheduler": FlowMatchEulerSampler,
                        "UniPCMultistepScheduler": UniPCSampler, "PNDMScheduler": PNDMSampler,
                        "LMSDiscreteScheduler": LMSSampler, "DEISMultistepScheduler": DEISSampler,
                        "KDPM2DiscreteScheduler": KDPM2Sampler, "TCDScheduler": TCDSampler,
                        "KDPM2AncestralDiscreteScheduler": KDPM2AncestralSampler, "EDMEulerScheduler": EDMEulerSampler,
                        "EDMDPMSolverMultistepScheduler": EDMDPMSolverPPSampler,
                        "DPMSolverSinglestepScheduler": DPMSolverSinglestepSampler,
                        "DDIMInverseScheduler": DDIMInverseSampler,
                        "DPMSolverMultistepInverseScheduler": DPMSolverMultistepInverseSampler,
                        "CogVideoXDDIMScheduler": CogVideoXDDIMSampler,
                        "FlowMatchHeunDiscreteScheduler": FlowMatchHeunSampler,
                        "DPMSolverSDEScheduler": DPMSolverSDESampler,
                        "CogVideoXDPMScheduler": CogVideoXDPMSampler,
                        "CosineDPMSolverMultistepScheduler": CosineDPMSolverSampler}


def from_scheduler(scheduler, **overrides) -> Sampler:
    """The fastdiff sampler that follows a diffusers scheduler's trajectory, with its config (plus overrides):
    `scheduler` is a scheduler (``pipe.scheduler``) or a saved config dict naming its class in "_class_name"
    (scheduler_config.json). A class without a fastdiff sampler (IPNDM, SA-Solver, ...) raises ValueError:
    pick a sampler and call its ``from_config(scheduler.config)`` (DDIMSampler for PNDM's Stable Diffusion
    configs)."""
    config = getattr(scheduler, "config", scheduler)
    if not isinstance(config, Mapping):
        raise TypeError(f"scheduler: expected a diffusers scheduler or its config dict, got {type(scheduler).__name__}")
    name = config.get("_class_name") if scheduler is config else type(scheduler).__name__
    if name is None:
        raise ValueError("scheduler: the config does not name its class (\"_class_name\"): call a sampler's "
                         "from_config(config) instead")
    cls = DIFFUSERS_SCHEDULERS.get(name)
    if cls is None:
        raise ValueError(f"scheduler: {name} has no fastdiff sampler (those with one: "
                         f"{', '.join(DIFFUSERS_SCHEDULERS)}); pick a sampler and call its from_config(config)")
    return cls.from_config(_keys_the_class_takes(scheduler, config, name), **overrides)


def _keys_the_class_takes(scheduler, config, name: str):
    """`config` without the keys the diffusers class ignores. A config carried over from another scheduler keeps
    keys its new class has no argument for (diffusers warns "... is not expected and will be ignored"): DDIM's
    rescale_betas_zero_snr in a Heun config, timestep_spacing in DPMSolverSinglestep's. Those do not change the
    diffusers scheduler's trajectory, so they must not change the sampler that follows it (some fastdiff samplers
    take them, beyond diffusers: pass them as overrides for that). The keys a FastdiffScheduler saved for its
    sampler's options beyond diffusers' (listed under "fastdiff_options", e.g. DPM++ SDE's s_noise) are kept."""
    import inspect

    klass = type(scheduler) if scheduler is not config else None
    if klass is None:
        try:
            import diffusers

            klass = getattr(diffusers, name, None)
        except ImportError:  # a saved config without diffusers installed: taken as it is
            return config
    if klass is None:
        return config
    try:
        params = inspect.signature(klass.__init__).parameters
    except (TypeError, ValueError):
        return config
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return config
    own = config.get("fastdiff_options") or ()  # what a FastdiffScheduler saved beyond the class's arguments
    own = set(own) if isinstance(own, (list, tuple)) else set()
    return {k: v for k, v in config.items() if k in params or k in own or k.startswith("_")}
