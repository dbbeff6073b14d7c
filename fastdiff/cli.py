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


BENCH_OPS = ("group_norm",)


def _bench_module(op):
    import importlib

    return importlib.import_module(f"fastdiff.benchmarks.{op}")


def _cmd_bench(args):
    from fastdiff import _bench

    ops = [args.op] if args.op else [op for op in BENCH_OPS]
    for op in ops:
        mod = _bench_module(op)
        rows, out = mod.run(device=args.device, quick=args.quick, compile_=not args.no_compile,
                            out=None if args.out is None else args.out)
        print(f"\n## {op}\n")
        print(_bench.format_table(rows))
        if out:
            print(f"\nwrote {len(rows)} rows to {out}")
    return 0


def _cmd_demo(args):
    """Until sampling lands, the demo is the GroupNorm benchmark on the machine at hand."""
    import fastdiff

    info = fastdiff.info()
    print(f"fastdiff {info['fastdiff']} on {info['device_name']} (torch {info['torch']}); backends: "
          f"cpu extension={info['cpu_extension']}, cuda extension={info['cuda_extension']}, triton={info['triton']}")
    ns = argparse.Namespace(op="group_norm", device="auto", quick=True, no_compile=False, out="")
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
