"""The `fastdiff` command: `fastdiff info`, `fastdiff bench`, `fastdiff demo`.

Bad arguments or unreadable files print one line and exit with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys


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


def _cmd_bench(args):
    from fastdiff import _bench

    old_rows = None
    if getattr(args, "compare", None):
        from fastdiff.benchmarks import report

        try:
            old_rows = report.load_rows([args.compare])
        except ValueError as e:  # json.JSONDecodeError is a ValueError: one line, exit 2
            raise CLIError(f"--compare: {args.compare}: {e}") from None
    all_rows = []
    for label, mod, extra in _bench_plan(args.op):
        # compile_="auto": every module compiles unless told not to, except that the U-Net module skips the
        # minutes-long Inductor compiles of its models in a CPU quick run
        rows, out = mod.run(device=args.device, quick=args.quick, compile_=False if args.no_compile else "auto",
                            out=None if args.out is None else args.out, **extra)
        all_rows += rows
        print(f"\n## {label}\n")
        print(_bench.format_table(rows))
        if out:
            print(f"\nwrote {len(rows)} rows to {out}")
    if old_rows is not None:
        from fastdiff.benchmarks import report

        lines, regs = report.compare(old_rows, all_rows, args.threshold)
        print(f"\n## change against {args.compare}\n")
        print("\n".join(lines) if lines else "no rows in common")
        print(f"\n{len(regs)} regression(s) over {100 * args.threshold:.0f}%")
        return 1 if regs else 0
    return 0


def _cmd_demo(args):
    """Until sampling lands, the demo is the GroupNorm benchmark on the machine at hand."""
    import fastdiff

    info = fastdiff.info()
    print(f"fastdiff {info['fastdiff']} on {info['device_name']} (torch {info['torch']}); backends: "
          f"cpu extension={info['cpu_extension']}, cuda extension={info['cuda_extension']}, triton={info['triton']}")
    ns = argparse.Namespace(op="group_norm", device="auto", quick=True, no_compile=False, out="", compare=None)
    return _cmd_bench(ns)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdiff", description="Fused CUDA and Triton kernels for diffusion models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="which backends are present (CPU/CUDA extension, Triton, device)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("bench", help="benchmark the fused ops against eager PyTorch and torch.compile")
    s.add_argument("--op", choices=BENCH_OPS, help="one op (default: all)")
    s.add_argument("--quick", action="store_true", help="a short run with a few shapes")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    s.add_argument("--out", default=None, help="JSON file (default benchmarks/results/<device>/<op>.json; '' for none)")
    s.add_argument("--compare", metavar="OLD.json", default=None,
                   help="print the change against a stored run (a results file or folder); exit 1 on a regression")
    s.add_argument("--threshold", type=float, default=0.05, help="--compare's regression threshold (default 0.05)")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("demo", help="what `make demo` runs")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("FASTDIFF_DEBUG"):  # full tracebacks for developers
        return args.func(args) or 0
    try:
        return args.func(args) or 0
    except CLIError as e:
        print(f"fastdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"fastdiff {args.command}: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print(f"fastdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastdiff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
