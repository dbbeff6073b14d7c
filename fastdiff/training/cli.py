"""The training command line: ``python -m fastdiff.training --dataset digits --out runs/digits``.

Several processes or GPUs: ``torchrun --nproc_per_node=N -m fastdiff.training ...`` (DDP; --batch-size is per
process). When --out already holds a checkpoint the run resumes from it, with its own model, autoencoder and training
configuration: a flag given with another value is refused (--steps can extend the run).

``add_train_arguments(parser)`` and ``run_train(args)`` are the reusable halves (the ``fastdiff`` console
command hooks them in); ``train_main(argv)`` is the whole command.
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch

from fastdiff.cli import _positive_int


def _ints(s: str) -> tuple:
    s = s.strip()
    return tuple(int(v) for v in s.split(",") if v.strip()) if s else ()


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    first = len(parser._actions)
    a = parser.add_argument
    a("--task", choices=("diffusion", "classifier", "autoencoder"), default="diffusion",
      help="what to train: the diffusion U-Net, the noisy classifier, or the KL autoencoder (default: diffusion)")
    a("--dataset", default="digits", help="'digits' (scikit-learn's 8x8 digits), 'digits:train' / 'digits:test' (its "
      "fixed 80/20 split) or a folder of images")
    a("--image-size", type=_positive_int, default=None,
      help="training resolution (default: 16 for digits, else 64)")
    a("--channels", type=int, choices=(1, 3), default=None,
      help="image folders: 1 (greyscale) or 3 (RGB), whatever the files hold (default: 3)")
    a("--out", required=True, help="checkpoint directory; resumes when it holds a checkpoint")
    a("--steps", type=int, default=2000, help="train until this step (default: 2000; on a resume, the run's own)")
    a("--batch-size", type=int, default=32, help="per process (default: 32)")
    a("--lr", type=float, default=2e-4)
    a("--weight-decay", type=float, default=0.0)
    a("--warmup-steps", type=int, default=0)
    a("--ema", type=float, default=0.9999, help="EMA decay; 0 disables the EMA (default: 0.9999)")
    a("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping (default: 1.0)")
    a("--cfg-dropout", type=float, default=0.0,
      help="label-dropout probability for classifier-free guidance (adds a learned null class)")
    a("--target", choices=("eps", "x0", "v"), default="eps")
    a("--learn-sigma", action="store_true", help="learned variances with the Improved-DDPM hybrid loss")
    a("--lambda-vlb", type=float, default=1e-3)
    a("--timestep-sampler", choices=("uniform", "importance"), default="uniform")
    a("--min-snr-gamma", type=float, default=None)
    a("--beta-schedule", choices=("linear", "cosine"), default="linear")
    a("--num-timesteps", type=int, default=1000)
    a("--model-channels", type=int, default=64)
    a("--channel-mult", type=_ints, default=(1, 2), help="comma-separated, e.g. 1,2,2 (default: 1,2)")
    a("--num-res-blocks", type=int, default=2)
    a("--attention-resolutions", type=_ints, default=None,
      help="feature-map sizes with attention, comma-separated (default: the smallest one)")
    a("--num-heads", type=int, default=1)
    a("--num-head-channels", type=int, default=-1)
    a("--num-groups", type=int, default=32)
    a("--dropout", type=float, default=0.0)
    a("--no-scale-shift-norm", action="store_true", help="add the embedding instead of AdaGN")
    a("--resblock-updown", action="store_true")
    a("--class-cond", action=argparse.BooleanOptionalAction, default=None,
      help="class-conditional U-Net (default: when the dataset has labels)")
    a("--pool", choices=("attention", "adaptive"), default="attention", help="classifier head")
    a("--latent-channels", type=int, default=4, help="autoencoder latent channels")
    a("--kl-weight", type=float, default=1e-6)
    a("--autoencoder", default=None, help="checkpoint directory of a trained autoencoder: train in its latent space")
    a("--seed", type=int, default=0, help="the initial weights, the data order and the noise")
    a("--log-every", type=int, default=100, help="steps per logged row (a resume may change it)")
    a("--save-every", type=int, default=500, help="steps between checkpoints; 0: only at the end and on Ctrl-C "
      "(a resume may change it)")
    a("--device", default=None, help="default: cuda when available, else cpu")
    a("--quiet", action="store_true")
    for act in parser._actions[first:]:  # every default in --help (they were missing for --lr, --dataset, ...)
        if act.default is None or act.default is False or act.default == argparse.SUPPRESS or \
                "default" in (act.help or ""):
            continue
        shown = ",".join(map(str, act.default)) if isinstance(act.default, tuple) else act.default
        act.help = f"{act.help} (default: {shown})" if act.help else f"default: {shown}"
    return parser


def _build_model(args, task, data_shape, num_classes):
    from fastdiff.models import AutoencoderKL, NoisyClassifier, UNet

    ch, size = data_shape[0], data_shape[-1]
    if task == "autoencoder":
        return AutoencoderKL(in_channels=ch, latent_channels=args.latent_channels, model_channels=args.model_channels,
                             channel_mult=args.channel_mult, num_res_blocks=args.num_res_blocks,
                             num_groups=args.num_groups, dropout=args.dropout)
    levels = len(args.channel_mult)
    attn = args.attention_resolutions
    if attn is None:
        attn = (size // 2 ** (levels - 1),)
    common = dict(image_size=size, in_channels=ch, model_channels=args.model_channels,
                  num_res_blocks=args.num_res_blocks, attention_resolutions=attn, dropout=args.dropout,
                  channel_mult=args.channel_mult, num_heads=args.num_heads, num_head_channels=args.num_head_channels,
                  use_scale_shift_norm=not args.no_scale_shift_norm, resblock_updown=args.resblock_updown,
                  num_groups=args.num_groups)
    if task == "classifier":
        if not num_classes:
            raise SystemExit("error: --task classifier needs a labelled dataset")
        return NoisyClassifier(out_channels=num_classes, pool=args.pool, **common)
    class_cond = bool(num_classes) if args.class_cond is None else args.class_cond
    if class_cond and not num_classes:
        raise SystemExit("error: --class-cond needs a labelled dataset (digits, or a folder with one subfolder a class)")
    if args.cfg_dropout > 0 and not class_cond:
        raise SystemExit("error: --cfg-dropout: label dropout needs a class-conditional model, and "
                         + ("--no-class-cond was given" if num_classes else
                            f"{args.dataset!r} has no labels (labels need every image in a class subfolder)"))
    return UNet(out_channels=2 * ch if args.learn_sigma else ch, num_classes=num_classes if class_cond else None,
                learn_null_class=class_cond and args.cfg_dropout > 0, **common)


# TrainConfig field -> the flag that sets it (where the names differ)
_FLAG_OF = {"ema_decay": "--ema", "grad_clip": "--grad-clip", "num_train_timesteps": "--num-timesteps"}

# model flags (argparse dests) named as the model config keys they set
_MODEL_KEYS = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
               "num_head_channels", "num_groups", "dropout", "resblock_updown", "pool", "latent_channels")


def _run_model_flags(task, config):
    """The values of the model flags that _build_model turns into a model `config`, for the flags that apply to it
    (an autoencoder has no attention resolutions, ...)."""
    run = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in _MODEL_KEYS}
    if "use_scale_shift_norm" in config:
        run["no_scale_shift_norm"] = not config["use_scale_shift_norm"]
    if task == "diffusion":
        run["learn_sigma"] = config["out_channels"] == 2 * config["in_channels"]
        run["class_cond"] = config["num_classes"] is not None
    return run


def _text(value) -> str:
    return (",".join(map(str, value)) or '""') if isinstance(value, tuple) else str(value)


def _show(dest, value) -> str:
    """The flag `dest` with `value`, as spelled on the command line."""
    flag = "--" + dest.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else ("--no-" + flag[2:] if dest == "class_cond" else f"no {flag}")
    return f"{flag} {_text(value)}"


def _config_from_args(args):
    from fastdiff.training.trainer import TrainConfig

    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, ema_decay=args.ema or None, precision=args.precision,
        grad_clip=args.grad_clip or None, cfg_dropout=args.cfg_dropout, target=args.target,
        lambda_vlb=args.lambda_vlb, timestep_sampler=args.timestep_sampler, min_snr_gamma=args.min_snr_gamma,
        beta_schedule=args.beta_schedule, num_train_timesteps=args.num_timesteps, kl_weight=args.kl_weight,
        seed=args.seed, log_every=args.log_every, save_every=args.save_every)


def given_flags(argv) -> set:
    """The argparse dests of the training flags written in `argv`, whatever their values: a flag written at its
    default value (``--lr 1e-4`` on a run trained at 1e-3) is still a flag given. run_train reads it from
    ``args.given_flags`` where the command line sets it; without it, a flag counts as given where its value
    differs from the default."""
    probe = add_train_arguments(argparse.ArgumentParser(add_help=False))
    for a in probe._actions:
        a.default, a.required = argparse.SUPPRESS, False
    ns, _ = probe.parse_known_args(list(argv))
    return set(vars(ns))


def _flag_given(args, dest: str) -> bool:
    """Whether the command line wrote the flag of `dest` (args.given_flags), or, where run_train is called without
    that record, whether its value differs from the default."""
    typed = getattr(args, "given_flags", None)
    if typed is not None:
        return dest in typed
    return getattr(args, dest, None) != _defaults().get_default(dest)


@functools.lru_cache(None)
def _defaults() -> argparse.ArgumentParser:
    """The training flags' parser, built once: _flag_given reads its defaults for every flag of a resume."""
    return add_train_arguments(argparse.ArgumentParser())


def _check_resume(args, trainer, dataset):
    """A resumed run keeps its own configuration: a training flag given with another value than the checkpoint's,
    or data of another size than the model's, is refused rather than silently dropped or mixed in. (Re-running
    the run's own command, flags included, resumes it.)"""
    import dataclasses

    from fastdiff.training.data import fetch
    from fastdiff.training.trainer import RESUME_MAY_CHANGE

    given = functools.partial(_flag_given, args)
    want = _config_from_args(args)
    differ = []
    for f in dataclasses.fields(want):
        if f.name in RESUME_MAY_CHANGE:  # applied by run_train
            continue
        flag = _FLAG_OF.get(f.name, "--" + f.name.replace("_", "-"))
        dest = flag[2:].replace("-", "_")
        if given(dest) and getattr(want, f.name) != getattr(trainer.config, f.name):
            differ.append(f"{flag} {getattr(args, dest)} (the run has {getattr(trainer.config, f.name)})")
    for dest, run_value in _run_model_flags(trainer.task, trainer.model.config).items():
        value = getattr(args, dest)
        if given(dest) and value != run_value:
            differ.append(f"{_show(dest, value)} (the run has "
                          f"{_show(dest, run_value) if isinstance(run_value, bool) else _text(run_value)})")
    if differ:
        raise SystemExit(f"error: {differ[0].split()[0]}: {args.out} holds a run, which resumes with its own "
                         f"configuration: {'; '.join(differ)}. Drop the flag(s) or train into another --out")
    if args.autoencoder:  # the run's own autoencoder (saved in its checkpoint) is the only one it resumes with
        if trainer.autoencoder is None:
            raise SystemExit(f"error: --autoencoder: {args.out} holds a pixel-space run, which resumes without an "
                             "autoencoder. Drop the flag or train into another --out")
        from fastdiff.training import checkpoint as ckpt

        ae = ckpt.load_model(args.autoencoder)  # compared as if it were the saved one
        try:
            trainer._check_resumed_autoencoder(ckpt.model_meta(ae), ae.state_dict())
        except ValueError:
            raise SystemExit(f"error: --autoencoder: {args.autoencoder} is not the autoencoder (config, scale factor "
                             f"and weights) that {args.out} holds, which its run resumes with. Drop the flag or "
                             "train into another --out") from None
    model = trainer.model
    size = getattr(model, "image_size", None)
    if size is not None and len(dataset):
        shape = tuple(fetch(dataset, torch.tensor([0]))[0].shape[1:])
        if trainer.autoencoder is not None:
            shape = tuple(trainer.autoencoder.latent_shape(shape))
        if tuple(shape[1:]) != (size,) * (len(shape) - 1):
            raise SystemExit(f"error: --image-size: {args.out} holds a run on {size}x{size} "
                             f"{'latents' if trainer.autoencoder is not None else 'images'}, the data gives "
                             f"{'x'.join(map(str, shape[1:]))} (pass the run's --image-size)")


def _run_image_size(meta: dict):
    """The image size a saved run trained at: its recorded image shape, else (checkpoints from before it was
    recorded) the model's image_size, times the autoencoder's downsampling for a latent run; None if unknown."""
    shape = meta.get("image_shape")
    if shape:
        return int(shape[-1])
    size = meta.get("model", {}).get("config", {}).get("image_size")
    if size is None:
        return None
    ae = meta.get("autoencoder")
    if ae is not None:
        size *= 2 ** (len(ae.get("config", {}).get("channel_mult", (1,))) - 1)
    return int(size)


def _run_channels(meta: dict):
    """The image channels a saved run trained on: its recorded image shape's, else the model's (the autoencoder's
    for a latent run) in_channels; None if unknown."""
    shape = meta.get("image_shape")
    if shape:
        return int(shape[0])
    model = meta.get("autoencoder") or meta.get("model") or {}
    ch = model.get("config", {}).get("in_channels")
    return int(ch) if ch in (1, 3) else None


def run_train(args: argparse.Namespace, progress: bool = False):
    """Run the training that parsed `args` describe; returns the trainer."""
    from fastdiff.training import checkpoint as ckpt
    from fastdiff.training.data import fetch, load_dataset
    from fastdiff.training.trainer import TRAINERS, init_distributed

    rank, world, local_rank = init_distributed()
    if args.device:
        from fastdiff.pretrained import resolve_device

        try:
            device = resolve_device(args.device)
        except ValueError as e:
            raise SystemExit(f"error: --{e}") from None
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    verbose = not args.quiet and rank == 0
    image_size = args.image_size
    if ckpt.exists(args.out):  # a resume trains its run's task at its run's resolution unless told otherwise
        meta = ckpt.load_meta(args.out)
        task = meta.get("task")
        if task in TRAINERS and task != args.task:
            if _flag_given(args, "task"):
                raise SystemExit(f"error: --task: {args.out} holds {'an' if task[0] in 'aeiou' else 'a'} {task} "
                                 f"run, which resumes with --task {task} (or train into another --out)")
            args.task = task
        if image_size is None:
            image_size = _run_image_size(meta)
        if args.channels is None and not args.dataset.startswith("digits"):
            args.channels = _run_channels(meta)  # a folder run trained greyscale (--channels 1) resumes greyscale
    if image_size is None:
        image_size = 16 if args.dataset.startswith("digits") else 64
    dataset = load_dataset(args.dataset, image_size, args.channels)
    trainer_cls = TRAINERS[args.task]
    if ckpt.exists(args.out):
        try:
            trainer = trainer_cls.from_checkpoint(args.out, dataset, device=device, verbose=verbose)
        except ValueError as e:
            if not str(e).startswith("model: image_size="):
                raise
            raise SystemExit(f"error: --image-size: {args.out} holds a run whose {str(e)[len('model: '):]} (pass "
                             f"the run's --image-size)") from None
        _check_resume(args, trainer, dataset)
        if _flag_given(args, "steps"):
            if args.steps < trainer.step:  # it printed "trained to step N" and saved the smaller target
                raise SystemExit(f"error: --steps: {args.out} is at step {trainer.step} already, past "
                                 f"{args.steps}; pass a larger --steps to extend the run")
            trainer.config.steps = args.steps
        # --steps left out: the run's own target (the default 2000 replaced it, cutting a longer run short)
        for dest in ("log_every", "save_every"):  # other intervals for the rest of the run
            if _flag_given(args, dest):
                setattr(trainer.config, dest, getattr(args, dest))
        trainer.config.validate()
        if verbose:
            print(f"resuming {args.out} at step {trainer.step} (its model and training configuration are used)",
                  file=sys.stderr)
    else:
        autoencoder = ckpt.load_model(args.autoencoder, device=device) if args.autoencoder else None
        if autoencoder is not None and not hasattr(autoencoder, "latent_shape"):
            raise SystemExit(f"error: --autoencoder: {args.autoencoder!r} holds a {type(autoencoder).__name__}, not "
                             "an autoencoder (train one with --task autoencoder)")
        shape = tuple(fetch(dataset, torch.tensor([0]))[0].shape[1:])
        if autoencoder is not None:
            shape = autoencoder.latent_shape(shape)
        config = _config_from_args(args)  # checks the flags' values (the seed's too) before any work
        torch.manual_seed(args.seed)  # the initial weights too: the same command trains the same run
        model = _build_model(args, args.task, shape, getattr(dataset, "num_classes", 0))
        kwargs = {"autoencoder": autoencoder} if autoencoder is not None else {}
        trainer = trainer_cls(model.to(device), dataset, config, out_dir=args.out, device=device, verbose=verbose,
                              **kwargs)
        if verbose:
            n = sum(p.numel() for p in model.parameters())
            print(f"{type(model).__name__}: {n / 1e6:.2f} M parameters, {len(dataset)} images {shape}, "
                  f"{world} process(es) on {device}", file=sys.stderr)
    trainer.train(progress=progress and verbose)
    if args.task == "autoencoder":
        scale = trainer.model.scale_factor  # fitted by train()'s final save (AutoencoderTrainer.save)
        if verbose:
            print(f"latent scale factor: {scale:.5g}", file=sys.stderr)
    return trainer


def train_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.training",
                                     description="Train a fastdiff U-Net, noisy classifier or autoencoder.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    args.given_flags = given_flags(sys.argv[1:] if argv is None else argv)
    from fastdiff.cli import run_reporting_errors  # the same one-line errors as `fastdiff train`

    def run():
        run_train(args)
        return 0

    return run_reporting_errors(parser.prog, run)
