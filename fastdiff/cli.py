"""The `fastdiff` command: `info`, `train`, `sample`, `eval`, `bench`, `demo`.

Bad arguments or unreadable files print one line and exit with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from fastdiff._io import atomic_write_file


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _cmd_info(args):
    import fastdiff

    info = fastdiff.info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


BENCH_OPS = ("group_norm", "attention", "sampler_step", "unet_step", "sampling")
# op -> (module under fastdiff.benchmarks, extra run() arguments); unet_step and sampling share the U-Net module
_BENCH_MODULES = {"group_norm": ("group_norm", {}), "attention": ("attention", {}), "sampler_step": ("sampler", {}),
                  "unet_step": ("unet", {"ops": ("unet_step",)}), "sampling": ("unet", {"ops": ("sampling",)})}


def _bench_module(op):
    import importlib

    return importlib.import_module(f"fastdiff.benchmarks.{_BENCH_MODULES[op][0]}")


def _bench_plan(op):
    """[(label, module, extra kwargs)]: one op, or every module once (the U-Net module runs both of its ops)."""
    if op:
        return [(op, _bench_module(op), dict(_BENCH_MODULES[op][1]))]
    seen, plan = set(), []
    for name in BENCH_OPS:
        mod_name = _BENCH_MODULES[name][0]
        if mod_name in seen:
            continue
        seen.add(mod_name)
        label = "unet_step + sampling" if mod_name == "unet" else name
        plan.append((label, _bench_module(name), {}))
    return plan


def read_result_rows(path: str, flag: str) -> list:
    """The benchmark rows in a results file or folder; one that is not: a one-line error naming `flag` (bad JSON,
    {} without "rows"). Shared with benchmarks/run_all.py."""
    from fastdiff.benchmarks import report

    try:
        return report.load_rows([path])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CLIError(f"{flag}: {path}: not a results file or folder ({type(e).__name__}: {e})") from None


def _cmd_bench(args):
    from fastdiff import _bench

    old_rows = None
    if getattr(args, "compare", None):
        old_rows = read_result_rows(args.compare, "--compare")
        if not old_rows:  # it compared nothing and reported "0 regression(s)", exit 0: a CI gate that always passed
            raise CLIError(f"--compare: {args.compare}: no benchmark rows in it")
    if args.out:  # checked before the run, not after minutes of benchmarks
        _check_bench_out(args.out)
    all_rows = []
    for label, mod, extra in _bench_plan(args.op):
        # compile_="auto": every module compiles unless told not to, except that the U-Net module skips the
        # minutes-long Inductor compiles of its models in a CPU quick run.
        # --out FILE: the modules write nothing, this run's rows of every module go to FILE once at the end (each
        # module writing FILE in turn left only the last module's rows); no --out: each writes its own file.
        try:
            rows, out = mod.run(device=args.device, quick=args.quick, compile_=False if args.no_compile else "auto",
                                out=None if args.out is None else "", **extra)
        except _bench.ResultsFileError as e:
            raise CLIError(str(e)) from None
        all_rows += rows
        print(f"\n## {label}\n")
        print(_bench.format_table(rows))
        if out:
            print(f"\nwrote {len(rows)} rows to {out}")
    if args.out:
        try:
            _bench.write_rows(all_rows, args.out)
        except _bench.ResultsFileError as e:
            raise CLIError(str(e)) from None
        print(f"\nwrote {len(all_rows)} rows to {args.out}")
    if old_rows is not None:
        from fastdiff.benchmarks import report

        lines, regs = report.compare(old_rows, all_rows, args.threshold)
        print(f"\n## change against {args.compare}\n")
        print("\n".join(lines) if lines else "no rows in common")
        print(f"\n{len(regs)} regression(s) over {100 * args.threshold:.0f}%")
        return 1 if regs else 0
    return 0


def _check_output_file(flag, path):
    """Refuse, before any work, an output path that cannot be written (it failed after the sampling / the eval)."""
    if os.path.isdir(path):
        raise CLIError(f"{flag}: {path!r} is a directory; expected a file name")
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        raise CLIError(f"{flag}: no such directory: {parent!r}")


def _check_bench_out(path):
    """bench --out, checked before the run: a directory, a missing folder (as sample's and eval's --out: a typo
    in the path used to create a tree of folders), or an existing file that holds no results (write_rows merges
    into it and refuses those) failed only after the whole run or not at all."""
    from fastdiff import _bench

    if os.path.isdir(path):
        raise CLIError(f"--out: {path!r} is a directory; expected a JSON file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"--out: no such directory: {os.path.dirname(path)!r}")
    try:
        _bench.read_results_file(path)  # what write_rows will merge into
    except _bench.ResultsFileError as e:
        raise CLIError(f"--out: {e}") from None


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {s!r}")
    return v


def _finite_float(s):
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _non_negative_float(s):
    v = _finite_float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def _classes(s):
    """--classes as written: ids or class names, resolved against the checkpoint by _resolve_classes."""
    v = [c.strip() for c in s.split(",")]
    if v == [""]:
        raise argparse.ArgumentTypeError("expected at least one class id or name")
    if "" in v:  # "3,,7": a typo, taken as "3,7" before
        raise argparse.ArgumentTypeError(f"an empty entry in {s!r}; expected comma-separated class ids or names")
    return v


def _resolve_classes(tokens, num_classes, names):
    """Class ids for --classes: each token one of the checkpoint's saved class names (an image folder's subfolder
    names; a name wins over an id written the same way) or an id 0 .. num_classes - 1."""
    ids = []
    for tok in tokens:
        if names is not None and tok in names:
            ids.append(names.index(tok))
            continue
        try:
            c = int(tok)
        except ValueError:
            known = f"one of its class names ({', '.join(names)}) or " if names is not None else ""
            raise CLIError(f"--classes: {tok!r} is not {known}a class id 0-{num_classes - 1} of this checkpoint") from None
        if not 0 <= c < num_classes:
            raise CLIError(f"--classes: {c} is out of range for a model of {num_classes} classes")
        ids.append(c)
    return ids


def _load_checkpoint(path, device):
    """(the U-Net, the autoencoder that decodes its latents or None for a pixel-space model)."""
    from fastdiff import pretrained

    d = pretrained.checkpoint_dir(path)
    if path is not None and not os.path.isfile(os.path.join(d, "checkpoint.json")):
        raise CLIError(f"no checkpoint in {path!r} (expected a training run's folder holding checkpoint.json)")
    from fastdiff.models import UNet

    model = pretrained.load(path, device=device)
    if not isinstance(model, UNet):
        raise CLIError(f"checkpoint {d!r}: holds a {type(model).__name__}, not a diffusion U-Net")
    if model.num_classes is None:
        raise CLIError(f"checkpoint {d!r}: the model is not class-conditional (sample and eval need one)")
    autoencoder = pretrained.load_autoencoder(path, device=device)  # latent diffusion: decode the samples with it
    if autoencoder is not None and autoencoder.latent_channels != model.in_channels:
        raise CLIError(f"checkpoint {d!r}: its autoencoder's latents have {autoencoder.latent_channels} channels, "
                       f"the U-Net's {model.in_channels}")
    return model, autoencoder


def _sampling_setup(args):
    from fastdiff import pretrained

    device = pretrained.resolve_device(args.device)
    dtype = pretrained.resolve_dtype(args.dtype, device)
    return device, dtype


def _cmd_sample(args):
    import numpy as np
    import torch

    from fastdiff import pretrained

    out = args.out
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".png", ".npz"):
        raise CLIError(f"--out: expected a .png or .npz file name, got {out!r}")
    _check_output_file("--out", out)
    device, dtype = _sampling_setup(args)
    model, autoencoder = _load_checkpoint(args.checkpoint, device)
    _check_model_arguments(args.checkpoint, model, [(args.sampler, args.steps, args.guidance)])
    names = pretrained.class_names(args.checkpoint)
    if names is not None and len(names) != model.num_classes:
        names = None  # not this model's labels: show ids only
    classes = (_resolve_classes(args.classes, model.num_classes, names) if args.classes is not None
               else list(range(model.num_classes)))
    n_total = len(classes) * args.n
    if args.warmup:  # the same shapes once untimed: CUDA-graph capture, cuDNN/Triton autotuning, allocator
        pretrained.generate(model, sampler=args.sampler, steps=args.steps, guidance=args.guidance, classes=classes,
                            n=args.n, seed=args.seed, dtype=dtype, device=device, batch_size=args.batch_size,
                            checkpoint=args.checkpoint, autoencoder=autoencoder)
    x, y, sec = pretrained.generate(model, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                                    classes=classes, n=args.n, seed=args.seed, dtype=dtype, device=device,
                                    batch_size=args.batch_size, progress=not args.quiet,
                                    checkpoint=args.checkpoint, autoencoder=autoencoder)
    if ext == ".npz":  # a file object: numpy would add ".npz" to a name ending in ".NPZ"
        atomic_write_file(out, lambda f: np.savez_compressed(
            f, samples=x.numpy(), labels=y.numpy(),
            images=((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy(),
            **({"class_names": np.array(names)} if names is not None else {})))
    else:
        atomic_write_file(out, lambda f: pretrained.save_grid(x, rows=len(classes), path=f, scale=args.scale))
    name = "the bundled digits model" if args.checkpoint is None else args.checkpoint
    print(f"{_count(n_total, 'sample')} ({_count(len(classes), 'class', 'classes')} x {args.n}) of {name} with {args.sampler} {args.steps} steps, "
          f"guidance {args.guidance:g}, {str(dtype).replace('torch.', '')} on {device}: {sec:.2f} s, "
          f"{n_total / sec:.1f} images/s -> {out}")
    if names is not None and names != [str(i) for i in range(model.num_classes)]:
        print("rows: " + ", ".join(f"{c} {names[c]}" for c in classes))
    return 0


def _check_model_arguments(checkpoint, model, settings, table=False):
    """(sampler, steps, guidance) settings that only the model can judge, refused before any sampling and naming
    the flag (the library's errors name its own arguments: num_inference_steps, guidance)."""
    from fastdiff import pretrained

    flag = " / --table" if table else ""
    T = pretrained.make_sampler("ddim", model, checkpoint).schedule.num_train_timesteps
    steps = max(s for _, s, _ in settings)
    if steps > T:
        raise CLIError(f"--steps{flag}: {steps} steps exceed the {T} timesteps the model was trained with")
    for name, n, _ in dict.fromkeys(settings):  # a schedule the sampler refuses (DPM-Solver++ at n = T: two equal
        try:                                    # timesteps) is named by the flag, before any sampling
            pretrained.make_sampler(name, model, checkpoint).set_timesteps(n)
        except ValueError as e:
            msg = str(e)
            if not msg.startswith("num_inference_steps: "):
                raise
            raise CLIError(f"--steps{flag}: {n} steps with --sampler {name}: {msg[len('num_inference_steps: '):]}") \
                from None
    if getattr(model, "null_class_id", None) is None and any(g != 1.0 for _, _, g in settings):
        raise CLIError(f"--guidance{flag}: this model has no null class (trained without --cfg-dropout), so it can "
                       "only be sampled at guidance 1" + ("" if table else ": pass --guidance 1"))


def _cmd_eval(args):
    from fastdiff import evaluation, pretrained

    if args.json:
        _check_output_file("--json", args.json)
    if args.table and (args.sampler_given or args.steps is not None or args.guidance_given):
        # they were silently ignored: the table's own settings ran
        raise CLIError("--table runs the README's settings: --sampler, --steps and --guidance do not apply to it")
    device, dtype = _sampling_setup(args)
    model, autoencoder = _load_checkpoint(args.checkpoint, device)
    if model.num_classes != 10 or pretrained.image_shape(model, autoencoder) != (1, 16, 16):
        raise CLIError("eval scores digits models: a class-conditional 16x16 greyscale model of 10 classes")
    names = pretrained.class_names(args.checkpoint)
    if names is not None and names != [str(i) for i in range(10)]:
        # label i must mean digit i: a folder of other classes was scored against the digits classifier silently
        raise CLIError(f"eval scores digits models: the checkpoint's classes are {', '.join(names)}, not the "
                       "digits 0-9")
    clf = evaluation.load_classifier()
    n = args.n if args.n is not None else (10 if args.quick else 50)
    if args.table:
        settings = evaluation.TABLE
    else:
        steps = args.steps if args.steps is not None else (10 if args.quick else 20)
        settings = [(args.sampler, steps, args.guidance)]
    # before any sampling: a guided or 1000-step row would fail after the others had run
    _check_model_arguments(args.checkpoint, model, settings, table=args.table)
    fl = evaluation.floor(clf)
    rows = []
    print(f"classifier: held-out accuracy {fl['accuracy']:.2%}; floor FD(train {fl['n']} vs held-out "
          f"{fl['n_ref']}) = {fl['fd']:.2f}")
    w = max([12] + [len(s) for s, _, _ in settings])  # the sampler column fits the longest name
    print(f"{'sampler':<{w}} {'steps':>5} {'guidance':>8} {'samples':>7} {'accuracy':>8} {'FD':>8} {'img/s':>7}")
    for sampler, steps, guidance in settings:
        r = evaluation.evaluate(model, sampler=sampler, steps=steps, guidance=guidance, n_per_class=n,
                                seed=args.seed, dtype=dtype, device=device, batch_size=args.batch_size, clf=clf,
                                progress=not args.quiet, checkpoint=args.checkpoint, autoencoder=autoencoder)
        rows.append(r)
        print(f"{sampler:<{w}} {steps:>5} {guidance:>8g} {r['n']:>7} {r['accuracy']:>8.1%} {r['fd']:>8.2f} "
              f"{r['n'] / r['sampling_s']:>7.1f}", flush=True)
    if args.json:
        atomic_write_file(args.json, lambda f: json.dump(
            {"floor": fl, "device": str(device), "dtype": str(dtype), "rows": rows}, f, indent=1), mode="w")
        print(f"wrote {args.json}")
    return 0


def _cmd_train(args):
    from fastdiff.training.cli import run_train

    if args.dataset not in ("digits", "digits:train", "digits:test") and not os.path.isdir(args.dataset):
        raise CLIError(f"--dataset: {args.dataset!r} is neither 'digits' nor a folder of images")
    if args.steps < 0:
        raise CLIError(f"--steps: expected a non-negative int, got {args.steps}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out: {args.out!r} is a file; expected a checkpoint directory")
    try:
        run_train(args, progress=True)
    except SystemExit as e:  # run_train's own argument errors
        if isinstance(e.code, str):
            raise CLIError(e.code.removeprefix("error: ")) from None
        raise
    return 0


def _cmd_demo(args):
    """`make demo`: the sample command with its defaults, then the quick GroupNorm benchmark table."""
    import fastdiff

    info = fastdiff.info()
    print(f"fastdiff {info['fastdiff']} on {info['device_name']} (torch {info['torch']}); backends: "
          f"cpu extension={info['cpu_extension']}, cuda extension={info['cuda_extension']}, triton={info['triton']}")
    sample_args = _resolve_sampling_defaults(build_parser().parse_args(["sample"]))
    _cmd_sample(sample_args)
    ns = argparse.Namespace(op="group_norm", device="auto", quick=True, no_compile=False, out="", compare=None)
    return _cmd_bench(ns)


def _add_sampling_arguments(s):
    from fastdiff.pretrained import SAMPLER_NAMES

    s.add_argument("--checkpoint", default=None,
                   help="a training run's folder (or its checkpoint.json); default: the bundled digits model")
    s.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, help="default: dpmsolver++")
    s.add_argument("--guidance", type=_finite_float, default=None,
                   help="classifier-free guidance scale, 1 turns it off (default: 2 for sample, 1 for eval)")
    s.add_argument("--seed", type=int, default=0, help="default: 0")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="default: bf16 on a GPU and on a CPU with AMX-BF16, else fp32")
    s.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    s.add_argument("--batch-size", type=_positive_int, default=None, help="samples per model batch (default: all)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit code 2 (argparse's code), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastdiff", description="Fused CUDA and Triton kernels for diffusion models.")
    from fastdiff import __version__

    p.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="which backends are present (CPU/CUDA extension, Triton, device)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("bench", help="benchmark the fused ops against eager PyTorch and torch.compile",
                       description="Benchmark the fused ops against eager PyTorch and torch.compile. Each op's rows "
                                   "go to benchmarks/results/<device>/<op>.json (or --out) in the fastdiff source "
                                   "checkout, or, for an installed package, under the current directory; "
                                   "merged into what the "
                                   "file holds: a run replaces only the rows it measures again (same op, case, "
                                   "shape, dtype, layout, provider and device), so --op unet_step keeps the "
                                   "sampling rows and a --quick run keeps the rows of cases it does not run.")
    s.add_argument("--op", choices=BENCH_OPS, help="one op (default: all)")
    s.add_argument("--quick", action="store_true", help="a short run with a few shapes")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    s.add_argument("--out", default=None,
                   help="one JSON file for all of this run's rows, merged into it (default: each op's own file, "
                        "benchmarks/results/<device>/<op>.json; '' writes none)")
    s.add_argument("--compare", metavar="OLD.json", default=None,
                   help="print the change against a stored run (a results file or folder); exit 1 on a regression")
    s.add_argument("--threshold", type=_non_negative_float, default=0.05, help="--compare's regression threshold (default 0.05)")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("train", help="train a diffusion U-Net, noisy classifier or autoencoder (resumes from --out)")
    from fastdiff.training.cli import add_train_arguments

    add_train_arguments(s)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="sample a class-conditional model (default: the bundled digits model) to a PNG grid")
    _add_sampling_arguments(s)
    s.add_argument("--steps", type=_positive_int, default=20, help="sampling steps (default: 20)")
    s.add_argument("--classes", type=_classes, default=None, help="comma-separated class ids or, for a checkpoint that saved them, class names: a row "
                   "each (default: all)")
    s.add_argument("--n", type=_positive_int, default=8, help="samples per class (default: 8)")
    s.add_argument("--out", default="samples.png", help="a .png grid (a row per class) or .npz of the raw samples "
                   "(default: samples.png)")
    s.add_argument("--scale", type=_positive_int, default=4, help="PNG upscaling factor (default: 4)")
    s.add_argument("--warmup", action="store_true",
                   help="run once untimed first, so images/s is the steady state (GPU: excludes graph capture)")
    s.set_defaults(func=_cmd_sample, guidance_default=2.0)

    s = sub.add_parser("eval", help="sample quality on digits: class accuracy and Frechet distance to held-out data")
    _add_sampling_arguments(s)
    s.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default: 20; 10 with --quick)")
    s.add_argument("--n", type=_positive_int, default=None, help="samples per class (default: 50; 10 with --quick)")
    s.add_argument("--quick", action="store_true",
                   help="a small fast run: 10 samples per class, 10 steps (with --table: 10 per class, its steps)")
    s.add_argument("--table", action="store_true",
                   help="the README's table: DDPM 1000, DDIM 50/20/10, DPM-Solver++ 20/10 steps, guidance 1/2/4")
    s.add_argument("--json", default=None, help="also write the results to this JSON file")
    s.set_defaults(func=_cmd_eval, guidance_default=1.0)

    s = sub.add_parser("demo", help="what `make demo` runs")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":  # which flags were written (a resume refuses one that differs from the run's)
        from fastdiff.training.cli import given_flags

        args.given_flags = given_flags(sys.argv[1:] if argv is None else argv)
    if hasattr(args, "guidance_default"):  # sample and eval
        _resolve_sampling_defaults(args)
    if args.command in ("sample", "eval", "train", "demo"):
        from fastdiff import _bench

        # glibc keeps freed blocks of up to 32 MiB for the next tensor instead of mapping fresh pages (see
        # there): the default digits sampling on the 2-core Intel VM 2.20-2.46 -> 1.96-2.00 s, a 60-step training
        # run 80 -> 75 s
        _bench.warm_cpu_heap()
    return run_reporting_errors(f"fastdiff {args.command}", lambda: args.func(args))


def _resolve_sampling_defaults(args):
    """--guidance and --sampler defaults filled in after parsing, noting which were given (eval --table refuses
    them); returns args."""
    args.guidance_given, args.sampler_given = args.guidance is not None, args.sampler is not None
    if args.guidance is None:
        args.guidance = args.guidance_default
    if args.sampler is None:
        args.sampler = "dpmsolver++"
    return args


def run_reporting_errors(prog: str, fn) -> int:
    """fn()'s exit status, a user's error (bad argument, missing file, CLIError) printed as one line naming prog
    (exit 2) instead of a traceback; FASTDIFF_DEBUG=1 keeps the tracebacks. Shared with python -m fastdiff.training."""
    if os.environ.get("FASTDIFF_DEBUG"):  # full tracebacks for developers
        return fn() or 0
    try:
        return fn() or 0
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`fastdiff info --json | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        msg = f"{e.strerror}: {e.filename}" if e.strerror else str(e).splitlines()[0]
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError (CUDA) is a RuntimeError; the CPU's is plain
        msg = str(e)
        if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
                or "can't allocate memory" in msg):
            raise
        msg = msg.splitlines()[0] if msg else "the allocator gave up"
        print(f"{prog}: error: out of memory ({msg[msg.find('you tried'):] if 'you tried' in msg else msg}): "
              "try a smaller --batch-size", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
