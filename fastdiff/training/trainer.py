"""Trainers: the diffusion U-Net (pixel or latent space), the noisy classifier, the KL autoencoder.

One loop for all three (:class:`Trainer`; the subclasses change only the loss): AdamW with optional warm-up,
EMA of the weights, mixed precision (bf16 / fp16 autocast, a gradient scaler for fp16), gradient clipping, label
dropout for classifier-free guidance, crash-safe checkpoints that resume to the same state, and DDP when
``torch.distributed`` is initialised (``torchrun``).

Reproducibility: everything random in a step (the batch, the timesteps, the noise, the label-dropout mask) is
drawn on the CPU from a generator seeded by (seed, step), for the *global* batch (batch_size x world_size), of
which each process takes its slice. So a step depends only on the weights, the seed and the step number: a
resumed run continues exactly, and N processes with batch B compute what one process computes with batch N x B.
(Dropout inside the model uses torch's global generator, whose state the checkpoint saves per process.)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
import signal
import sys
import tempfile
import threading
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastdiff.nn.norm import positive_int
from fastdiff.training import checkpoint as ckpt
from fastdiff.training.data import fetch
from fastdiff.training.losses import TARGETS, _make_schedule, create_timestep_sampler, q_sample, training_losses

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_SALT_DATA, _SALT_STEP = 1, 2


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of a training run (saved in the checkpoint's JSON)."""

    steps: int = 1000                   # train() runs until this step
    batch_size: int = 32                # per process; the global batch is batch_size x world_size
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0               # linear learning-rate warm-up
    ema_decay: float | None = 0.9999    # None: no EMA. The decay used is min(ema_decay, (1 + step) / (10 + step))
    precision: str = "fp32"             # fp32, bf16 or fp16 (autocast; fp16 adds a gradient scaler)
    grad_clip: float | None = 1.0       # max global gradient norm; None: no clipping
    cfg_dropout: float = 0.0            # probability of replacing the label / context by the null one
    target: str = "eps"                 # eps, x0 or v
    lambda_vlb: float = 1e-3            # weight of L_vlb in the hybrid loss (models with learned variances)
    timestep_sampler: str = "uniform"   # uniform or importance
    min_snr_gamma: float | None = None  # min-SNR-gamma weighting of L_simple (5.0 in the paper)
    beta_schedule: str = "linear"       # linear or cosine
    num_train_timesteps: int = 1000
    kl_weight: float = 1e-6             # autoencoder: weight of the KL term (LDM's value)
    seed: int = 0
    log_every: int = 100
    save_every: int = 0                 # 0: save only at the end of train()

    def __post_init__(self):
        self.validate()  # a bad value is named when the config is made, not at the first Trainer that takes it

    def validate(self):
        for name in ("batch_size", "num_train_timesteps", "log_every"):
            setattr(self, name, positive_int(getattr(self, name), name))
        for name in ("steps", "warmup_steps", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
            setattr(self, name, int(v))  # numpy's ints too, as Python's (the config is saved as JSON)
        def real(name, positive):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
            if not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise ValueError(f"{name}: expected a finite {'positive' if positive else 'non-negative'} float, "
                                 f"got {v!r}")

        real("lr", positive=True)
        real("weight_decay", positive=False)  # torch's AdamW raised "Invalid weight_decay value" at the first Trainer
        real("lambda_vlb", positive=False)  # a negative weight would maximise L_vlb
        real("kl_weight", positive=False)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"seed: expected an int, got {type(self.seed).__name__} {self.seed!r}")
        if not -(1 << 63) <= self.seed < 1 << 64:  # what torch.manual_seed takes (2**70 overflowed there)
            raise ValueError(f"seed: expected a 64-bit int, got {self.seed!r}")
        self.seed = int(self.seed)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected None or a value in [0, 1), got {self.ema_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected None or a positive norm, got {self.grad_clip!r}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout: expected a probability in [0, 1), got {self.cfg_dropout!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {self.target!r}")
        if self.timestep_sampler not in ("uniform", "importance"):
            raise ValueError(f"timestep_sampler: expected 'uniform' or 'importance', got {self.timestep_sampler!r}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma: expected None or a positive float, got {self.min_snr_gamma!r}")
        if self.beta_schedule not in ("linear", "cosine"):
            raise ValueError(f"beta_schedule: expected 'linear' or 'cosine', got {self.beta_schedule!r}")
        _make_schedule(self.beta_schedule, self.num_train_timesteps)  # the schedule's own limits on T
        return self


# TrainConfig fields a resumed run may change: how far it trains, and how often it logs and saves (nothing of the
# optimisation itself)
RESUME_MAY_CHANGE = ("steps", "log_every", "save_every")


def init_distributed():
    """Initialise torch.distributed from torchrun's environment (WORLD_SIZE > 1), once: NCCL with GPUs, gloo
    otherwise. Returns (rank, world_size, local_rank)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    return 0, 1, 0


def _seed(*parts) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 0x100000001B3 ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


class Trainer:
    """Trains a diffusion model (:class:`fastdiff.models.UNet`, or any module called as
    ``model(x_t, t, y=..., context=...)`` with ``in_channels`` / ``out_channels`` attributes).

    dataset: items (image in [-1, 1], label) -- :func:`fastdiff.training.data.digits`, ``ImageFolder``, ...
    config: a :class:`TrainConfig`; keyword overrides (``lr=...``) are applied on top.
    out_dir: where checkpoints go (``save()``, every ``save_every`` steps, and at the end of ``train()``). A folder
        that already holds a checkpoint is written only by a trainer resumed from it (``from_checkpoint`` or
        ``resume()``): any other raises ValueError rather than replace that run.
    schedule: an object with betas, alphas_cumprod, num_train_timesteps (default: ``config.beta_schedule``).
    autoencoder: an AutoencoderKL to train in its latent space (frozen; latents are scale_factor * z).
    context_fn: for models with cross-attention, labels (N,) -> context (N, S, context_dim).
    device: default: the model's.
    """

    task = "diffusion"

    def __init__(self, model, dataset, config: TrainConfig | None = None, *, out_dir: str | None = None,
                 schedule=None, autoencoder=None, context_fn=None, device=None, verbose: bool = False, **overrides):
        self.config = dataclasses.replace(config or TrainConfig(), **overrides).validate()
        cfg = self.config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        if self.device.type == "cpu":
            # channels_last weights (and so activations, which convolutions lay out like their weights): oneDNN's
            # convolutions take NHWC without reordering. A 40-step `fastdiff train` (batch 128) on the 2-core Intel
            # VM: 44.6-44.8 -> 39.4-40.7 s. (On a GPU this is not measured yet: NCHW stays.)
            self.model.to(memory_format=torch.channels_last)
        self.dataset, self.out_dir, self.verbose = dataset, out_dir, verbose
        self.context_fn = context_fn
        self.rank, self.world = ((dist.get_rank(), dist.get_world_size())
                                 if dist.is_available() and dist.is_initialized() else (0, 1))
        self.schedule = schedule if schedule is not None else _make_schedule(cfg.beta_schedule,
                                                                             cfg.num_train_timesteps)
        self.autoencoder = None
        if autoencoder is not None:
            self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)
        if len(dataset) == 0:
            raise ValueError("dataset: it is empty")
        self._sample_shape = tuple(fetch(dataset, torch.tensor([0]))[0].shape[1:])
        self._label_limit = None  # labels must lie in [0, this) where the model reads them (set by _check)
        self._batch_failed = False  # train_step's data fetch raised (the state is still at a step boundary)
        self._check()
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)  # broadcasts rank 0's weights
        self.ema = None
        if cfg.ema_decay is not None:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.sampler = create_timestep_sampler(cfg.timestep_sampler, self.schedule.num_train_timesteps)
        self.step = 0
        self.history: list[dict] = []
        self._pending: list[dict] = []
        self._perm_cache: dict = {}
        self._own_dirs: set = set()  # folders whose checkpoint is this run's (resumed from or saved to)

    # -- checks --------------------------------------------------------------------------------------------------

    def _data_channels(self):
        if self.autoencoder is not None:
            if self._sample_shape[0] != self.autoencoder.in_channels:
                raise ValueError(f"autoencoder: takes {self.autoencoder.in_channels}-channel images, the dataset "
                                 f"has {self._sample_shape[0]} channels")
            return self.autoencoder.latent_channels
        return self._sample_shape[0]

    def _check(self):
        m, cfg = self.model, self.config
        ch = self._data_channels()
        if getattr(m, "in_channels", ch) != ch:
            raise ValueError(f"model: in_channels={m.in_channels} but the {'latents' if self.autoencoder else 'data'} "
                             f"have {ch} channels")
        size = getattr(m, "image_size", None)
        if size is not None and len(self._sample_shape) == 3 and self._sample_shape[1] == self._sample_shape[2]:
            # the size the model samples at (its image_size) must be the one it trains on: a 16x16 dataset trained
            # into an image_size=8 model would later be sampled at 8x8
            side = self._sample_shape[1]
            want = (self.autoencoder.latent_shape(self._sample_shape)[1] if self.autoencoder is not None else side)
            if size != want:
                what = f"{want}x{want} latents of the {side}x{side}" if self.autoencoder is not None else f"{side}x{side}"
                raise ValueError(f"model: image_size={size} but the dataset gives {what} images")
        out = getattr(m, "out_channels", ch)
        if out not in (ch, 2 * ch):
            raise ValueError(f"model: out_channels={out}; expected {ch} (fixed variances) or {2 * ch} (learned)")
        self.learn_sigma = out == 2 * ch
        num_classes = getattr(m, "num_classes", None)
        data_classes = self._data_classes()
        if num_classes is not None:
            if data_classes == 0:
                raise ValueError("dataset: the model is class-conditional but the dataset has no labels")
            if data_classes is not None and data_classes > num_classes:
                raise ValueError(f"model: num_classes={num_classes} but the dataset has {data_classes} classes")
            self._label_limit = data_classes or num_classes
        null_id = getattr(m, "null_class_id", None)
        if cfg.cfg_dropout > 0 and num_classes is not None and null_id is None:
            raise ValueError("cfg_dropout: label dropout needs a null class: build the model with "
                             "learn_null_class=True")
        context_dim = getattr(m, "context_dim", None)
        if context_dim is not None and self.context_fn is None:
            raise ValueError(f"context_fn: the model cross-attends to a context (context_dim={context_dim}); pass "
                             f"context_fn=labels -> (N, S, {context_dim}) context")
        if cfg.cfg_dropout > 0 and num_classes is None and context_dim is None:
            raise ValueError("cfg_dropout: the model has no condition to drop (no num_classes, no context_dim)")

    # -- randomness and data ---------------------------------------------------------------------------------

    @property
    def raw_model(self):
        return self.model

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.world

    def _local(self, t: torch.Tensor) -> torch.Tensor:
        """This process's slice of a global-batch tensor, on the device."""
        B = self.config.batch_size
        return t[self.rank * B:(self.rank + 1) * B].to(self.device)

    def _global_indices(self, step: int) -> torch.Tensor:
        """Dataset indices of the global batch at `step`: an epoch-wise shuffle seeded by (seed, epoch)."""
        N, Bg = len(self.dataset), self.global_batch
        pos = torch.arange(step * Bg, (step + 1) * Bg)
        epochs = (pos // N).tolist()
        out = torch.empty(Bg, dtype=torch.long)
        for e in sorted(set(epochs)):
            if e not in self._perm_cache:
                self._perm_cache = {k: v for k, v in self._perm_cache.items() if k >= e - 1}
                self._perm_cache[e] = torch.randperm(N, generator=_generator(self.config.seed, _SALT_DATA, e))
            sel = pos // N == e
            out[sel] = self._perm_cache[e][pos[sel] % N]
        return out

    def _batch(self, step: int):
        idx = self._global_indices(step)
        B = self.config.batch_size
        idx = idx[self.rank * B:(self.rank + 1) * B]
        x, y = fetch(self.dataset, idx)
        self._check_labels(y, idx)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _autocast(self):
        dtype = PRECISIONS[self.config.precision]
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    # -- the step --------------------------------------------------------------------------------------------

    def _forward_model(self):
        return self.ddp if self.ddp is not None else self.model

    def _loss(self, x, y, gen: torch.Generator):
        """(scalar loss to minimise, dict of detached scalar metrics) for the local batch."""
        cfg, Bg = self.config, self.global_batch
        if self.autoencoder is not None:
            z_noise = self._local(torch.randn((Bg,) + self.autoencoder.latent_shape(x.shape), generator=gen))
            with torch.no_grad():
                x = self.autoencoder.to_latent(x, noise=z_noise).float()
        t, w = self.sampler.sample(Bg, generator=gen)
        noise = torch.randn((Bg,) + tuple(x.shape[1:]), generator=gen)
        drop = torch.rand(Bg, generator=gen) < cfg.cfg_dropout
        t_local, w, noise, drop = self._local(t), self._local(w), self._local(noise), self._local(drop)
        kwargs = {}
        m = self.model
        if getattr(m, "num_classes", None) is not None:
            if m.null_class_id is not None:
                y = torch.where(drop, torch.full_like(y, m.null_class_id), y)
            kwargs["y"] = y
        if getattr(m, "context_dim", None) is not None:
            context = self.context_fn(y).to(self.device)
            kwargs["context"] = torch.where(drop[:, None, None], torch.zeros_like(context), context)
        terms = training_losses(self._forward_model(), x, t_local, self.schedule, target=cfg.target,
                                learn_sigma=self.learn_sigma, lambda_vlb=cfg.lambda_vlb,
                                min_snr_gamma=cfg.min_snr_gamma, noise=noise, model_kwargs=kwargs)
        if self.sampler.name == "importance":
            self._update_sampler(t, terms.get("vb", terms["loss"]).detach())
        loss = (terms["loss"] * w).mean()
        return loss, {k: v.detach().mean() for k, v in terms.items()}

    def _update_sampler(self, t_global, local_losses):
        if self.world > 1:
            parts = [torch.empty_like(local_losses) for _ in range(self.world)]
            dist.all_gather(parts, local_losses)
            local_losses = torch.cat(parts)
        self.sampler.update(t_global, local_losses)

    def train_step(self) -> dict:
        """One optimisation step; returns its metrics (detached tensors)."""
        cfg = self.config
        self.model.train()
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        try:
            x, y = self._batch(self.step)
        except Exception:
            self._batch_failed = True  # at a step boundary still: train() saves what the run has done
            raise
        gen = _generator(cfg.seed, _SALT_STEP, self.step)
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss, metrics = self._loss(x, y, gen)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
        self.scaler.step(self.opt)
        self.scaler.update()
        self._update_ema()
        self.step += 1
        metrics["lr"] = torch.tensor(lr, dtype=torch.float64)
        self._pending.append(metrics)
        if self.step % cfg.log_every == 0:
            self._flush_log()
        return metrics

    @torch.no_grad()
    def _update_ema(self):
        if self.ema is None:
            return
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        ema_p = list(self.ema.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in self.model.parameters()], 1.0 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    def _flush_log(self):
        if not self._pending:
            return
        keys = sorted(self._pending[0])
        vals = torch.stack([torch.stack([m[k].double().cpu() for m in self._pending]).mean() for k in keys])
        if self.world > 1:
            vals = vals.to(self.device)
            dist.all_reduce(vals)
            vals = vals.cpu() / self.world
        row = {"step": self.step, **{k: float(v) for k, v in zip(keys, vals)}}
        self.history.append(row)
        self._pending = []
        if self.verbose and self.rank == 0:
            line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            bar = getattr(self, "_bar", None)
            if bar is not None:  # above the progress bar, not through it
                bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)

    def train(self, steps: int | None = None, progress: bool = False) -> list[dict]:
        """Train until ``self.step == steps`` (default ``config.steps``): a resumed run finishes the same schedule.
        Saves every ``save_every`` steps and at the end when out_dir is set. Returns the log history: one row
        (metrics averaged over the window) every ``log_every`` steps; a partial window stays pending, and is saved
        with a checkpoint, so an interrupted and resumed run logs the same rows as an uninterrupted one."""
        steps = self.config.steps if steps is None else steps
        if self.out_dir:  # before any work: the first save would replace another run, or fail to write at all
            self._check_out_dir(self.out_dir, "out_dir")
            if self.rank == 0:
                self._check_writable(self.out_dir, "out_dir")
        t0 = time.perf_counter()
        bar = None
        if progress and self.rank == 0 and self.step < steps:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps, initial=self.step, desc="training", unit="step")
            except ImportError:  # progress bars are a nicety
                pass
        self._bar = bar
        saved, interrupted, installed = self.step, [], False
        self._batch_failed = False
        if self.world == 1 and threading.current_thread() is threading.main_thread():
            # Ctrl-C finishes the step in progress, saves (when out_dir is set) and then raises KeyboardInterrupt,
            # so the checkpoint is a step boundary and resumes bit for bit; a second Ctrl-C interrupts at once.
            def on_sigint(signum, frame):
                interrupted.append(signum)
                signal.signal(signal.SIGINT, prev)

            prev = signal.getsignal(signal.SIGINT)
            prev = signal.default_int_handler if prev is None else prev  # (a handler not set from Python)
            signal.signal(signal.SIGINT, on_sigint)
            installed = True
        try:
            while self.step < steps:
                self.train_step()
                if bar is not None:
                    bar.update(1)
                if self.out_dir and self.config.save_every and self.step % self.config.save_every == 0:
                    self.save()
                    saved = self.step
                if interrupted:
                    if bar is not None:
                        bar.close()
                    if self.out_dir and self.step > saved:
                        self.save()
                        if self.verbose:
                            print(f"interrupted: saved step {self.step} to {self.out_dir}", file=sys.stderr)
                    raise KeyboardInterrupt
        except Exception:
            # the data failed (an unreadable image, a bad label): nothing of the failed step has run, so the steps
            # done since the last save are saved, as Ctrl-C saves them (one process: a save with several gathers)
            if self._batch_failed and self.out_dir and self.step > saved and self.world == 1:
                self._batch_failed = False
                self.save()
                if self.verbose:
                    print(f"the data failed at step {self.step + 1}: saved step {self.step} to {self.out_dir}",
                          file=sys.stderr)
            raise
        finally:
            if installed:
                signal.signal(signal.SIGINT, prev)
        if bar is not None:
            bar.close()
        self._bar = None
        if self.out_dir:
            self.save()
        if self.verbose and self.rank == 0:
            print(f"trained to step {self.step} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return self.history

    # -- checkpoints -------------------------------------------------------------------------------------------

    def _rng_states(self) -> dict:
        states = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world > 1:  # every process's own stream (dropout), saved by rank 0
            gathered = [None] * self.world
            dist.all_gather_object(gathered, states)
            return {f"rng.{k}.{r}": v for r, s in enumerate(gathered) for k, v in s.items()}
        return {f"rng.{k}.0": v for k, v in states.items()}

    def state_tensors(self) -> tuple[dict, dict]:
        """(tensors, JSON meta) describing the whole training state."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        if self.autoencoder is not None:
            tensors.update({f"autoencoder.{k}": v for k, v in self.autoencoder.state_dict().items()})
        opt = self.opt.state_dict()
        for idx, st in opt["state"].items():
            for name, v in st.items():
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"optimizer state {name!r} is not a tensor; cannot checkpoint it")
                tensors[f"optim.{idx}.{name}"] = v
        tensors.update(self._rng_states())
        tensors.update({f"sampler.{k}": v for k, v in self.sampler.state_dict().items()})
        meta = {
            "task": self.task, "step": self.step, "world_size": self.world,
            "model": ckpt.model_meta(self.model),
            "train_config": dataclasses.asdict(self.config),
            "optimizer": {"param_groups": opt["param_groups"]},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "history": self.history,
            "pending_log": [{k: float(v) for k, v in m.items()} for m in self._pending],
            # label i means class_names[i]: kept so a resume (or a sampler elsewhere) uses the same numbering
            "class_names": self._class_names(),
            # (C, H, W) of one training image: the resolution a resume without --image-size trains at
            "image_shape": list(self._sample_shape),
        }
        if self.autoencoder is not None:
            meta["autoencoder"] = ckpt.model_meta(self.autoencoder)
        # always written (null: the config's own schedule), so a resume tells a checkpoint of the config's schedule
        # from an older one that did not record its schedule
        meta["schedule"] = self._schedule_meta()
        return tensors, meta

    def _schedule_meta(self):
        """The noise schedule for the checkpoint where it is not the one TrainConfig names (a ``schedule=`` passed
        to the constructor): its betas and alphas_cumprod, exactly (as JSON floats, which hold a float64 schedule's
        values too), so a resume and a sampler of the checkpoint use the very schedule the run trained on. None for
        the config's own."""
        own = _make_schedule(self.config.beta_schedule, self.config.num_train_timesteps)
        cur = {k: [float(v) for v in torch.as_tensor(getattr(self.schedule, k)).double().reshape(-1)]
               for k in ("betas", "alphas_cumprod")}
        if cur == {k: [float(v) for v in getattr(own, k).reshape(-1)] for k in cur}:
            return None
        return cur

    def _data_classes(self):
        """The dataset's class count: its ``num_classes`` where it says, else None for a dataset whose items are
        (image, label) (a TensorDataset(images, labels): the labels are checked batch by batch against the
        model's classes), 0 for one without labels."""
        n = getattr(self.dataset, "num_classes", None)
        if n is not None:
            return n
        item = self.dataset[0]
        return None if isinstance(item, (tuple, list)) and len(item) == 2 else 0

    def _check_labels(self, y: torch.Tensor, idx: torch.Tensor):
        """Labels outside [0, classes) would index another class's embedding (or, on a GPU, trip a device
        assert): refused naming the dataset item. Only CPU labels are read (no device sync)."""
        limit = self._label_limit
        if limit is None or y.numel() == 0 or y.device.type != "cpu":
            return
        bad = (y < 0) | (y >= limit)
        if bad.any():
            k = int(bad.nonzero()[0, 0])
            whose = "dataset" if getattr(self.dataset, "num_classes", None) else "model"
            raise ValueError(f"dataset: item {int(idx[k])} has label {int(y[k])}, outside 0..{limit - 1} (the "
                             f"{limit} classes of the {whose})")

    def _class_names(self):
        names = getattr(self.dataset, "class_names", None)
        return [str(n) for n in names] if names is not None else None

    def _check_out_dir(self, directory: str, name: str):
        """Refuse to write into a folder holding a checkpoint of another run: ckpt.save would replace it and delete
        its tensors file."""
        if os.path.abspath(directory) in self._own_dirs or not ckpt.exists(directory):
            return
        try:
            step = f" at step {ckpt.load_meta(directory).get('step')}"
        except (OSError, ValueError):
            step = ""
        raise ValueError(f"{name}: {directory!r} already holds a training run{step}; this trainer was not resumed "
                         f"from it, and saving would replace that run. Resume it (Trainer.from_checkpoint("
                         f"{directory!r}, dataset) or trainer.resume()), or choose another {name}")

    @staticmethod
    def _check_writable(directory: str, name: str):
        """Create the folder and write (then remove) a file in it now, so that a folder that cannot be written fails
        before the first step, not at the first save, save_every steps of work later."""
        try:
            os.makedirs(directory, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=directory)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"{name}: cannot write checkpoints to {directory!r} ({e.strerror or e})") from None

    def save(self, directory: str | None = None) -> str | None:
        """Write a checkpoint (rank 0 writes; every process must call it). Returns the JSON path on rank 0. Refuses
        (ValueError) a folder that holds another run's checkpoint: see ``out_dir``."""
        name = "directory" if directory else "out_dir"
        directory = directory or self.out_dir
        if directory is None:
            raise ValueError("directory: no out_dir was given to the trainer; pass one")
        if self.rank == 0:  # the other ranks would see rank 0's fresh checkpoint; train() checked them all
            self._check_out_dir(directory, name)
        tensors, meta = self.state_tensors()
        path = ckpt.save(directory, tensors, meta) if self.rank == 0 else None
        self._own_dirs.add(os.path.abspath(directory))
        if self.world > 1:
            dist.barrier()
        return path

    def resume(self, directory: str | None = None) -> "Trainer":
        """Load the whole training state (weights, EMA, optimizer, scaler, step, RNG, sampler, history) from a
        checkpoint of this run: training then continues exactly as if never interrupted. The trainer must be built
        as the run was (its model config, its TrainConfig but ``steps``, its autoencoder), else ValueError:
        ``from_checkpoint`` builds it so."""
        directory = directory or self.out_dir
        tensors, meta = ckpt.load(directory)
        if meta.get("task") != self.task:
            raise ValueError(f"checkpoint: it is a {meta.get('task')!r} run, this trainer trains {self.task!r}")
        saved = dict(meta["model"]["config"])
        if {k: v for k, v in saved.items() if k != "scale_factor"} != \
                {k: v for k, v in self.model.config.items() if k != "scale_factor"}:
            raise ValueError(f"checkpoint: its model config {saved} differs from this model's {self.model.config}")
        self._check_resumed_config(meta.get("train_config"), directory)
        # (a checkpoint written before schedules were saved has no "schedule": the trainer's is taken as the run's)
        if "schedule" in meta and meta["schedule"] != self._schedule_meta():
            raise ValueError("schedule: " + ("the run was trained on a custom noise schedule (saved in its checkpoint)"
                                              if meta.get("schedule") is not None else
                                              "the run was trained on its TrainConfig's beta_schedule") +
                             ", this trainer has another; pass the run's schedule (Trainer.from_checkpoint does)")
        saved_names, names = meta.get("class_names"), self._class_names()
        uses_labels = (self.task == "classifier" or getattr(self.model, "num_classes", None) is not None
                       or self.context_fn is not None)
        if uses_labels and saved_names is not None and names is not None and saved_names != names:
            # the same folder with a class added, removed or renamed numbers its classes differently: resuming
            # would silently retrain label i on another class
            raise ValueError(f"dataset: the run was trained on the classes {saved_names}, this dataset has "
                             f"{names} (a label is a position in the sorted names: it would change meaning)")
        self._check_resumed_autoencoder(meta.get("autoencoder"), ckpt.prefixed(tensors, "autoencoder."))
        for m in (self.model, self.ema):  # the autoencoder's scale factor is fitted data, not architecture
            if m is not None and "scale_factor" in saved:
                m.scale_factor = saved["scale_factor"]
        self.model.load_state_dict(ckpt.prefixed(tensors, "model."))
        ema = ckpt.prefixed(tensors, "ema.")
        if self.ema is not None:
            self.ema.load_state_dict(ema if ema else self.model.state_dict())
        state: dict = {}
        for k, v in ckpt.prefixed(tensors, "optim.").items():
            idx, name = k.split(".", 1)
            state.setdefault(int(idx), {})[name] = v
        groups = meta["optimizer"]["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        if meta.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(meta["scaler"])
        rng = ckpt.prefixed(tensors, "rng.")
        saved_world = meta.get("world_size")
        r = self.rank if saved_world == self.world else 0
        if saved_world not in (None, self.world) and self.rank == 0:
            # allowed (a run moved to another machine), but not silently: the global batch and the data order change
            warnings.warn(f"{directory}: the run trained on {saved_world} process(es), a global batch of "
                          f"{self.config.batch_size * saved_world}; it resumes on {self.world}, a global batch of "
                          f"{self.global_batch} (the per-process --batch-size is kept)", stacklevel=2)
        if f"torch.{r}" in rng:
            torch.set_rng_state(rng[f"torch.{r}"])
        if self.device.type == "cuda" and f"cuda.{r}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda.{r}"], self.device)
        sampler_state = ckpt.prefixed(tensors, "sampler.")
        if sampler_state:
            self.sampler.load_state_dict(sampler_state)
        self.step = int(meta["step"])
        self._own_dirs.add(os.path.abspath(directory))
        self.history = list(meta.get("history", []))
        self._pending = [{k: torch.tensor(v, dtype=torch.float64) for k, v in m.items()}
                         for m in meta.get("pending_log", [])]
        return self

    def _check_resumed_config(self, saved: dict | None, directory: str):
        """A run resumes with its own training configuration: another one went into the resumed run (the schedule,
        the loss, the optimiser) and the next save replaced the run's. Only RESUME_MAY_CHANGE may differ: a resume
        may extend a run (the command line's --steps does), and log or save at other intervals."""
        if saved is None:
            return
        mine = dataclasses.asdict(self.config)
        differ = [f"{f.name}={mine[f.name]!r} (the run has {saved.get(f.name, f.default)!r})"
                  for f in dataclasses.fields(TrainConfig)
                  if f.name not in RESUME_MAY_CHANGE and mine[f.name] != saved.get(f.name, f.default)]
        if differ:
            raise ValueError(f"config: {directory!r} holds a run, which resumes with its own training configuration: "
                             f"{'; '.join(differ)}. Pass the run's values (Trainer.from_checkpoint does), or train "
                             f"into another out_dir")

    def _check_resumed_autoencoder(self, saved_meta, saved_tensors: dict):
        """A latent run resumes only in its own latent space: without its autoencoder it went on in pixel space (and
        the next save dropped the autoencoder from the checkpoint); with another one (other weights or scale factor)
        it went on on other latents, and the next save replaced the run's autoencoder."""
        ae = self.autoencoder
        mine = None if ae is None else ckpt.model_meta(ae)
        if saved_meta is None and mine is None:
            return
        if saved_meta is None or mine is None:
            raise ValueError("autoencoder: " + ("the run was trained in pixel space; resume it without an autoencoder"
                                                if saved_meta is None else
                                                "the run was trained in an autoencoder's latent space; pass the "
                                                "autoencoder saved in its checkpoint (Trainer.from_checkpoint does)"))
        state = ae.state_dict()
        same = saved_meta == mine and state.keys() == saved_tensors.keys() and all(
            torch.equal(v.detach().to("cpu", saved_tensors[k].dtype), saved_tensors[k]) for k, v in state.items())
        if not same:
            raise ValueError(f"autoencoder: it differs from the one the run was trained with (config "
                             f"{saved_meta.get('config')}, or its weights); pass the autoencoder saved in the "
                             f"checkpoint (Trainer.from_checkpoint does)")

    @classmethod
    def from_checkpoint(cls, directory: str, dataset, *, device=None, out_dir: str | None = None, **kwargs):
        """A trainer rebuilt from a checkpoint directory (model, its config, the autoencoder, the training
        config) and resumed. kwargs go to the constructor (context_fn, verbose, ...)."""
        tensors, meta = ckpt.load(directory)
        model = ckpt.build_model(meta["model"])
        if device is not None:
            model = model.to(device)
        if "autoencoder" in meta and "autoencoder" not in kwargs:
            ae = ckpt.build_model(meta["autoencoder"])
            ae.load_state_dict(ckpt.prefixed(tensors, "autoencoder."))
            kwargs["autoencoder"] = ae
        if meta.get("schedule") is not None and "schedule" not in kwargs:
            kwargs["schedule"] = SavedSchedule(meta["schedule"])
        trainer = cls(model, dataset, TrainConfig(**meta["train_config"]), out_dir=out_dir or directory,
                      device=device, **kwargs)
        return trainer.resume(directory)


class SavedSchedule:
    """A noise schedule as a checkpoint saved it (``checkpoint.json``'s "schedule": betas and alphas_cumprod):
    what Trainer and the losses read of a schedule (CPU tensors, num_train_timesteps)."""

    def __init__(self, saved: dict):
        def exact(values):  # float32 where that holds the values exactly, else float64 (a float64 schedule's)
            t = torch.tensor(values, dtype=torch.float64)
            return t.float() if torch.equal(t.float().double(), t) else t

        self.betas = exact(saved["betas"])
        self.alphas_cumprod = exact(saved["alphas_cumprod"])
        self.num_train_timesteps = len(self.betas)


class ClassifierTrainer(Trainer):
    """Trains a :class:`fastdiff.models.NoisyClassifier` on noised images (ADM): x_t = q_sample(x0, t), t uniform,
    cross-entropy against the labels. Logs the loss and the accuracy."""

    task = "classifier"

    def _check(self):
        m = self.model
        data_classes = self._data_classes()
        if data_classes == 0:
            raise ValueError("dataset: a classifier needs labels; this dataset has none")
        if data_classes is not None and data_classes > m.out_channels:
            raise ValueError(f"model: out_channels={m.out_channels} but the dataset has {data_classes} classes")
        self._label_limit = data_classes or m.out_channels
        ch = self._data_channels()
        if m.in_channels != ch:
            raise ValueError(f"model: in_channels={m.in_channels} but the data have {ch} channels")
        if self.config.cfg_dropout:
            raise ValueError("cfg_dropout: label dropout makes no sense for a classifier; leave it at 0")

    def _loss(self, x, y, gen):
        Bg = self.global_batch
        if self.autoencoder is not None:
            z_noise = self._local(torch.randn((Bg,) + self.autoencoder.latent_shape(x.shape), generator=gen))
            with torch.no_grad():
                x = self.autoencoder.to_latent(x, noise=z_noise).float()
        t = torch.randint(0, self.schedule.num_train_timesteps, (Bg,), generator=gen)
        noise = torch.randn((Bg,) + tuple(x.shape[1:]), generator=gen)
        t, noise = self._local(t), self._local(noise)
        logits = self._forward_model()(q_sample(self.schedule, x, t, noise), t).float()
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc.detach()}


class AutoencoderTrainer(Trainer):
    """Trains a :class:`fastdiff.models.AutoencoderKL`: loss = mean |x - x_hat| + kl_weight * KL / (elements of x)
    (LDM's objective divided by the pixel count, without its perceptual and adversarial terms).
    :meth:`fit_scale_factor` sets the latent scale factor from data, and every :meth:`save` fits it first where the
    weights changed since the last fit: each checkpoint of the run (a periodic one, the one Ctrl-C writes) holds a
    scale factor fitted to its own weights, ready for latent diffusion (it was 1.0 until the end of training)."""

    task = "autoencoder"
    _scale_fitted_step = None  # the step whose weights fit_scale_factor last fitted

    def resume(self, directory: str | None = None) -> "Trainer":
        super().resume(directory)
        self._scale_fitted_step = None  # the loaded weights: fitted again at the next save (an older checkpoint's
        return self                     # factor may be the unfitted 1.0)

    def save(self, directory: str | None = None) -> str | None:
        if self._scale_fitted_step != self.step:
            self.fit_scale_factor()  # deterministic, and the loss does not read it: a resume stays bit for bit
        return super().save(directory)

    def _check(self):
        ch = self._sample_shape[0]
        if self.model.in_channels != ch:
            raise ValueError(f"model: in_channels={self.model.in_channels} but the data have {ch} channels")
        if self.model.out_channels != ch:  # |x - x_hat| would broadcast a 1-channel reconstruction over x's channels
            raise ValueError(f"model: out_channels={self.model.out_channels}; an autoencoder trained to reconstruct "
                             f"{ch}-channel data must output {ch} channels")
        if self.autoencoder is not None:
            raise ValueError("autoencoder: an autoencoder trainer trains the autoencoder itself; pass it as model")
        if self.config.cfg_dropout:
            raise ValueError("cfg_dropout: there is no condition to drop in an autoencoder; leave it at 0")

    def _loss(self, x, y, gen):
        noise = self._local(torch.randn((self.global_batch,) + self.model.latent_shape(x.shape), generator=gen))
        recon, posterior = self._forward_model()(x, noise=noise)
        rec = (x.float() - recon.float()).abs().mean(dim=(1, 2, 3))
        kl = posterior.kl() / x[0].numel()
        loss = (rec + self.config.kl_weight * kl).mean()
        return loss, {"loss": loss.detach(), "rec": rec.detach().mean(), "kl": kl.detach().mean()}

    @torch.no_grad()
    def fit_scale_factor(self, num_samples: int = 512) -> float:
        """scale_factor = 1 / std of the posterior samples on up to num_samples training images (LDM's
        scale-by-std), set on the model and its EMA; returns it."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples <= 0:
            # a negative count sliced from the end (-1: all images but one), 0 failed in torch.cat
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        model = self.ema if self.ema is not None else self.model
        n = min(int(num_samples), len(self.dataset))
        idx = torch.randperm(len(self.dataset), generator=_generator(self.config.seed, 3))[:n]
        gen = _generator(self.config.seed, 4)  # not the global RNG: fitting must not perturb a resumable run
        zs = []
        was_training = model.training
        model.eval()  # no dropout (it would draw from the global RNG, and fit on perturbed latents), no graph
        try:
            with torch.no_grad():
                for chunk in idx.split(self.config.batch_size):
                    x, _ = fetch(self.dataset, chunk)
                    noise = torch.randn((len(chunk),) + model.latent_shape(x.shape), generator=gen)
                    with self._autocast():
                        zs.append(model.encode(x.to(self.device)).sample(noise=noise).float().cpu())
        finally:
            model.train(was_training)
        scale = 1.0 / float(torch.cat(zs).std())
        for m in (self.model, self.ema):
            if m is not None:
                m.scale_factor = scale
        self._scale_fitted_step = self.step
        return scale


TRAINERS = {"diffusion": Trainer, "classifier": ClassifierTrainer, "autoencoder": AutoencoderTrainer}
