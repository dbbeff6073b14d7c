"""The bundled pretrained model and the class-conditional sampling the `fastdiff sample` / `eval` commands run.

``fastdiff/assets/digits16/`` holds a class-conditional U-Net of scikit-learn's digits at 16x16 (trained with
fastdiff.training on the fixed "digits:train" split, with a learned null class for classifier-free guidance; EMA
weights stored in fp16 and cast to fp32 on load). Its ``checkpoint.json`` records the training command.

    from fastdiff.pretrained import load, generate
    model = load()                                   # the bundled checkpoint, fp32, eval mode
    x, y = generate(model, classes=range(10), n=8)   # (80, 1, 16, 16) in [-1, 1], labels (80,)
"""
from __future__ import annotations

import os
import time

import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUNDLED_CHECKPOINT = os.path.join(ASSETS, "digits16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {device!r} is not a device ({e})") from None
    if dev.type == "cpu":
        return torch.device("cpu")  # "cpu:0" is the CPU too (safetensors refused to load onto "cpu:0": a traceback)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
        return dev
    # another accelerator (mps, xpu: the ops' torch backend) only where torch has it; "meta" holds no data
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        raise ValueError(f"device: {device!r} is not available here (expected auto, cpu, cuda or cuda:N)")
    return dev


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices on AMX tiles (Intel Sapphire Rapids and later), from the flags in
    /proc/cpuinfo (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU (fp16 where bf16 is not supported); on the CPU, bf16 where it has AMX-BF16 (oneDNN's
    bf16 convolutions run on its tiles: the bundled model's sampling 3x faster on a 2-core Sapphire Rapids VM,
    its scores unchanged) and fp32 elsewhere."""
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_amx_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def checkpoint_dir(checkpoint: str | None) -> str:
    """The checkpoint directory for a `--checkpoint` value: None -> the bundled one; a training run's folder; or
    its checkpoint.json file."""
    if checkpoint is None:
        return BUNDLED_CHECKPOINT
    if os.path.isfile(checkpoint):
        if os.path.basename(checkpoint) != "checkpoint.json":
            raise ValueError(f"checkpoint: {checkpoint!r}: expected a checkpoint folder or its checkpoint.json")
        return os.path.dirname(os.path.abspath(checkpoint))
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(2, "No such file or directory", checkpoint)
    return checkpoint


def class_names(checkpoint: str | None = None) -> list | None:
    """The class names a checkpoint's label ids stand for (label i is class_names[i]: digits runs save "0".."9", an
    image folder its subfolders' names), or None where it saved none (the bundled digits model, older runs)."""
    from fastdiff.training.checkpoint import load_meta

    try:
        names = load_meta(checkpoint_dir(checkpoint)).get("class_names")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def load(checkpoint: str | None = None, device="cpu", ema: bool = True) -> torch.nn.Module:
    """The U-Net of a checkpoint (default: the bundled digits model), in fp32 and eval mode."""
    from fastdiff.training.checkpoint import load_model

    d = checkpoint_dir(checkpoint)
    try:
        model = load_model(d, ema=ema, device=device)
    except (KeyError, RuntimeError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"checkpoint: cannot read {d!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return model.float().eval()


def load_autoencoder(checkpoint: str | None = None, device="cpu"):
    """The autoencoder a latent-diffusion checkpoint was trained with (saved inside it; fp32, eval mode), or None
    for a pixel-space checkpoint (the bundled one is)."""
    from fastdiff.training.checkpoint import load_autoencoder as _load

    d = checkpoint_dir(checkpoint)
    try:
        ae = _load(d, device=device)
    except (KeyError, RuntimeError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"checkpoint: cannot read {d!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return None if ae is None else ae.float().eval()


def image_shape(model, autoencoder=None) -> tuple:
    """(C, H, W) of the images `model` generates: its own sample shape, or its latents decoded by `autoencoder`."""
    size, ch = model.image_size, model.in_channels
    if autoencoder is None:
        return (ch, size, size)
    f = autoencoder.downsample_factor
    return (autoencoder.out_channels, size * f, size * f)


def _learns_sigma(model=None, meta_model: dict | None = None) -> bool:
    """Whether a model predicts its variances too (Improved DDPM: out_channels = 2 x in_channels)."""
    if model is not None:
        cin, cout = getattr(model, "in_channels", None), getattr(model, "out_channels", None)
    else:
        cfg = (meta_model or {}).get("config", {})
        cin, cout = cfg.get("in_channels"), cfg.get("out_channels")
    return cin is not None and cout == 2 * cin


#: the sampler names of make_sampler, generate and the command line's --sampler
SAMPLER_NAMES = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmsolver++", "sde-dpmsolver++", "dpmsolver++3m",
                 "sde-dpmsolver++3m", "unipc", "pndm", "lms", "deis", "kdpm2", "kdpm2_ancestral", "dpmsolver_singlestep",
                 "dpmsolver_singlestep3", "dpmsolver_sde")


def make_sampler(name: str, model=None, checkpoint: str | None = None):
    """A sampler by name (one of SAMPLER_NAMES: ddpm, ddim, euler, euler_ancestral, heun, dpmsolver++,
    sde-dpmsolver++, dpmsolver++3m, sde-dpmsolver++3m (the third-order forms, "DPM++ 3M (SDE)"), unipc, pndm (PLMS:
    n steps are n + 1 model calls), lms (K-LMS), deis, kdpm2, kdpm2_ancestral (DPM2 and DPM2 a: 2 model calls a
    step but the last), dpmsolver_singlestep, dpmsolver_singlestep3 (DPM-Solver++ single-step, order 2 or 3),
    dpmsolver_sde (DPM++ SDE: 2 model calls a step but the last)) on the schedule the model was trained with. For a
    model with learned variances (out_channels = 2 x in_channels) DDPM samples with them (variance_type
    "learned_range", Improved DDPM's) and DPM-Solver++ (both forms) accepts and drops them (as diffusers does); DDIM
    and the Euler samplers take only the mean channels, which :func:`generate` passes them."""
    import json

    from fastdiff.diffusion import SAMPLERS

    if name not in SAMPLER_NAMES:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLER_NAMES)}, got {name!r}")
    opts = {}
    if name.endswith("3m"):  # DPMSolverPPSampler of order 3
        name, opts["solver_order"] = name[:-2], 3
    if name == "sde-dpmsolver++":  # DPMSolverPPSampler's SDE form ("DPM++ 2M SDE")
        name, opts["algorithm_type"] = "dpmsolver++", "sde-dpmsolver++"
    if name == "dpmsolver_singlestep3":  # DPMSolverSinglestepSampler of order 3
        name, opts["solver_order"] = "dpmsolver_singlestep", 3
    d = checkpoint_dir(checkpoint)
    try:
        with open(os.path.join(d, "checkpoint.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = {}
    train = meta.get("train_config", {})
    if train:
        # the very betas training used (fastdiff.training rescales "linear" to T steps as ADM does, which the
        # sampler's beta_start/beta_end defaults do not), so sampler and training agree for every schedule and T
        from fastdiff.training.losses import _make_schedule

        kind = train.get("beta_schedule", "linear")
        T = int(train.get("num_train_timesteps", 1000))
        opts["num_train_timesteps"] = T
        opts["trained_betas"] = _make_schedule(kind, T).betas
        opts["beta_schedule"] = "squaredcos_cap_v2" if kind == "cosine" else kind
        custom = meta.get("schedule")  # a run trained on a schedule= of its own saved its betas
        if custom is not None:
            betas = custom["betas"]
            if not all(0 < b < 1 for b in betas):
                raise ValueError(f"checkpoint: {d!r} was trained on a custom schedule with a beta of 1 (zero "
                                 f"terminal SNR): build the sampler for it yourself (e.g. rescale_betas_zero_snr=True)")
            opts["num_train_timesteps"], opts["trained_betas"] = len(betas), betas
    target = train.get("target")
    if target:
        opts["prediction_type"] = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[target]
    if name in ("ddpm", "dpmsolver++", "dpmsolver_singlestep") and _learns_sigma(model, meta.get("model")):
        opts["variance_type"] = "learned_range"
    return SAMPLERS[name](**opts)


def generate(model, *, sampler="dpmsolver++", steps: int = 20, guidance: float = 1.0, classes=range(10),
             n: int = 8, seed: int = 0, dtype=torch.float32, device=None, batch_size: int | None = None,
             progress: bool = False, checkpoint: str | None = None, channels_last: bool | None = None,
             autoencoder="auto"):
    """n samples of each class in `classes`, class-major: returns (x in [-1, 1] float32 on the CPU, labels,
    seconds spent sampling). The model is moved to `device` and `dtype` in place (as Module.to does) and sampled in
    eval mode (its training mode is restored after). On a GPU it runs with channels_last activations, the fused sampler
    step and the CUDA-graph loop of fastdiff.sample; guidance != 1 is classifier-free guidance against the model's
    null class. channels_last: None (the default) runs channels_last on a GPU and on the CPU (oneDNN's convolutions
    take NHWC without reordering: the bundled model's default sampling 1.86-1.89 -> 1.58-1.59 s on a 2-core CPU),
    which leaves the model's 4-D weights in that memory format (Module.to(memory_format=...)); False keeps NCHW.

    autoencoder: a latent-diffusion model's samples are latents, which this decodes (``from_latent``, in the
    seconds) into images: "auto" uses the autoencoder saved in `checkpoint` (none when checkpoint is None or a
    pixel-space run), None decodes nothing, or pass an AutoencoderKL (moved like the model; it decodes in eval
    mode, and its mode is restored after)."""
    import fastdiff
    from fastdiff.nn.norm import positive_int

    # a device this machine lacks: a ValueError naming it (it was torch's RuntimeError at the first copy)
    device = resolve_device(str(device)) if device is not None else next(model.parameters()).device
    if isinstance(sampler, str):
        sampler = make_sampler(sampler, model, checkpoint)
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("classes: expected at least one class, got none")
    n = positive_int(n, "n")
    if batch_size is not None:
        batch_size = positive_int(batch_size, "batch_size")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        raise ValueError("checkpoint: the model is not class-conditional")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes: {bad[0]} is out of range for a model of {num_classes} classes")
    null = getattr(model, "null_class_id", None)
    if guidance != 1.0 and null is None:
        raise ValueError("guidance: this model has no null class (trained without --cfg-dropout)")
    if isinstance(autoencoder, str):
        if autoencoder != "auto":
            raise ValueError(f"autoencoder: expected 'auto', None or an autoencoder, got {autoencoder!r}")
        autoencoder = load_autoencoder(checkpoint, device) if checkpoint is not None else None
    if autoencoder is not None:
        if getattr(autoencoder, "latent_channels", None) != model.in_channels:
            raise ValueError(f"autoencoder: its latents have {getattr(autoencoder, 'latent_channels', None)} "
                             f"channels, the model samples {model.in_channels}")
        autoencoder = autoencoder.to(device=device, dtype=dtype)
    ae_was_training = autoencoder is not None and autoencoder.training
    if channels_last is None:
        channels_last = device.type in ("cuda", "cpu")
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    # a model with learned variances gives 2C channels; a sampler that does not read them gets the C mean ones
    C = model.in_channels
    mean_only = _learns_sigma(model) and sampler.config.get("variance_type") not in ("learned", "learned_range")

    def net(x, t, **kw):
        out = model(x.contiguous(memory_format=fmt), t, **kw)
        return out[:, :C] if mean_only else out

    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(n)
    N = len(labels)
    bs = batch_size or N
    size, ch = model.image_size, model.in_channels
    out = []
    was_training = model.training
    model.eval()  # sampled without dropout even when handed a model in training mode; its mode is restored
    if autoencoder is not None:
        autoencoder.eval()  # and decoded without it: the autoencoder's mode is restored too
    try:
        t0 = time.perf_counter()
        for k, start in enumerate(range(0, N, bs)):
            y = labels[start:start + bs].to(device)
            kw = dict(y=y, guidance_scale=float(guidance))
            if guidance != 1.0:
                kw["uncond_y"] = torch.full_like(y, null)
            x = fastdiff.sample(net, sampler, (len(y), ch, size, size), seed=seed + k, dtype=dtype,
                                num_inference_steps=steps, device=device, progress=progress, **kw)
            if autoencoder is not None:
                with torch.no_grad():
                    x = autoencoder.from_latent(x)
            out.append(x.float().cpu())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
        if autoencoder is not None:
            autoencoder.train(ae_was_training)
    return torch.cat(out).clamp(-1, 1), labels, seconds


def save_grid(x: torch.Tensor, rows: int, path: str, scale: int = 4, pad: int = 2):
    """A PNG grid of images in [-1, 1] (N, C, H, W), `rows` rows filled row-major, upscaled `scale`x (nearest)."""
    from PIL import Image

    N, C, H, W = x.shape
    cols = -(-N // rows)
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.full((C, rows * (H + pad) + pad, cols * (W + pad) + pad), 255, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, top:top + H, left:left + W] = img[i]
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    arr = grid[0].numpy() if C == 1 else grid.permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(arr, mode="L" if C == 1 else "RGB").save(path, format="PNG")  # a path or a file object
