"""Run every benchmark (the ops, then the U-Net step and the sampling loop), then write the report.

    python benchmarks/run_all.py                 # a GPU: every shape, fp16 + bf16, every provider
    python benchmarks/run_all.py --quick         # a short CPU run (small shapes, tiny U-Nets)
    python benchmarks/run_all.py --op attention --op unet_step
    python benchmarks/run_all.py --compare benchmarks/results/<device>/   # and flag regressions over 5%
    python benchmarks/run_all.py --report-only   # REPORT.md and plots from the folder's files, nothing run

Rows go to benchmarks/results/<device-slug>/<name>.json (group_norm, attention, sampler_step, and unet_step and
sampling for the U-Net module), merged into what the folder holds: a run replaces only the rows it measures again
(same op, case, shape, dtype, layout, provider and device), so `--op unet_step` or a --quick run keeps the other
rows. The report goes to REPORT.md and *.png in the same folder. The folder is named after the device (on the CPU with the
thread count: a CPU --quick run uses one thread unless --threads says otherwise). Commit the folder with the
commit the rows name in `commit`.

compile: every op benchmark times torch.compile unless --no-compile. In a CPU --quick run the U-Net compile
providers are skipped (Inductor takes minutes per tiny U-Net on a small CPU) unless --compile-unet, and so is the
attention one (14 shapes x dtypes of recompiles) unless --compile-attention.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

import torch  # noqa: E402

from fastdiff import _bench  # noqa: E402
from fastdiff._io import atomic_write_file  # noqa: E402
from fastdiff.benchmarks import report  # noqa: E402

# (label, module, file (None: one file per op, <op>.json), extra run() kwargs)
SUITE = [("group_norm", "group_norm", "group_norm.json", {}),
         ("attention", "attention", "attention.json", {}),
         ("sampler_step", "sampler", "sampler_step.json", {}),
         ("unet", "unet", None, {})]
OP_TO_LABEL = {"group_norm": "group_norm", "attention": "attention", "sampler_step": "sampler_step",
               "unet_step": "unet", "sampling": "unet", "unet": "unet"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (on the CPU: small shapes, tiny U-Nets)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--op", action="append", choices=sorted(OP_TO_LABEL), help="repeatable; default all")
    ap.add_argument("--no-compile", action="store_true", help="skip every torch.compile provider")
    ap.add_argument("--compile-unet", action="store_true", help="time torch.compile of the U-Nets in a CPU quick run")
    ap.add_argument("--compile-attention", action="store_true", help="time torch.compile of attention in a CPU "
                                                                     "quick run")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: 1 in a CPU --quick run, else torch's default)")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results/<device-slug>")
    ap.add_argument("--compare", metavar="OLD", default=None, help="a stored results file or folder to compare to")
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: rewrite REPORT.md and the plots from the result files in the folder")
    a = ap.parse_args(argv)
    from fastdiff.cli import run_reporting_errors

    def run():
        return _run(a, argv)

    return run_reporting_errors("run_all.py", run)  # a user's error: one line, exit 2 (FASTDIFF_DEBUG=1: traceback)


def _run(a, argv):
    import importlib

    from fastdiff.cli import CLIError, read_result_rows

    if a.threads is not None and a.threads < 1:
        raise CLIError(f"--threads: expected a positive int, got {a.threads}")
    if not 0 <= a.threshold < float("inf"):  # NaN too
        raise CLIError(f"--threshold: expected a non-negative fraction (0.05 = 5%), got {a.threshold}")
    device = _bench.resolve_device(a.device)
    cpu_quick = a.quick and device.type == "cpu"
    if a.threads or (cpu_quick and a.threads is None):
        # One thread by default on the CPU quick run: on a shared machine a parallel region waits for its slowest,
        # descheduled thread and the timings quantise to the scheduler's slice (12 ms steps under load on 2 cores);
        # attention and the U-Nets use one thread in quick mode anyway, so the whole folder is one configuration.
        torch.set_num_threads(a.threads or 1)
    out_dir = a.out_dir or _bench.results_dir(device)
    if a.report_only and not os.path.isdir(out_dir):
        raise CLIError(f"--out-dir: {out_dir}: no such folder (--report-only reads the result files there)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CLIError(f"--out-dir: {out_dir}: not a folder")
    # read the old rows before anything is overwritten (OLD is often this very folder)
    old_rows = None
    if a.compare:
        if not os.path.exists(a.compare):
            raise CLIError(f"--compare: {a.compare}: no such file or folder")
        old_rows = read_result_rows(a.compare, "--compare")
        if not old_rows:  # it would compare nothing and report "0 regression(s)", exit 0: a gate that always passes
            raise CLIError(f"--compare: {a.compare}: no benchmark rows in it")
        if a.report_only:
            raise CLIError("--compare: --report-only runs nothing, so there is nothing to compare")
    wanted = {OP_TO_LABEL[o] for o in a.op} if a.op else None
    ops = {"unet_step", "sampling"} & set(a.op or ())
    if not a.report_only:  # (the report itself reads no peaks: they are in the rows)
        print(f"device: {_bench.device_name(device)}; peak {_bench.peak_bandwidth_gbps(str(device)):.1f} GB/s "
              f"copy, {_bench.peak_tflops(str(device)):.3f} TFLOP/s matmul; results -> {out_dir}", flush=True)
    all_rows = []
    for label, mod_name, fname, extra in SUITE:
        if (wanted and label not in wanted) or a.report_only:
            continue
        compile_ = not a.no_compile
        if cpu_quick and label == "unet":
            compile_ = compile_ and a.compile_unet
        if cpu_quick and label == "attention":
            compile_ = compile_ and a.compile_attention
        kw = dict(extra)
        if label == "unet" and ops:
            kw["ops"] = tuple(sorted(ops))
        mod = importlib.import_module(f"fastdiff.benchmarks.{mod_name}")
        t0 = time.perf_counter()
        print(f"\n## {label} (compile: {compile_})", flush=True)
        rows, path = mod.run(device=device, quick=a.quick, compile_=compile_,
                             out=os.path.join(out_dir, fname) if fname else "", **kw)
        if fname is None:
            path = ", ".join(_bench.write_rows_by_op(rows, out_dir))
        print(f"   {len(rows)} rows -> {path} in {time.perf_counter() - t0:.0f} s", flush=True)
        all_rows += rows

    rows = read_result_rows(out_dir, "--out-dir")  # everything in the folder: this run's rows and earlier ones
    if not rows:
        raise CLIError(f"--out-dir: {out_dir}: no benchmark rows in it, no report to write")
    md = report.markdown(rows)
    tg = report.targets(rows)
    if tg:
        md = ("## End-to-end targets\n\nIssue 7's targets are for an H100 (fastdiff's U-Net step >= 1.5x eager and "
              ">= 1.1x torch.compile max-autotune; sampling >= 1.6x eager images/s); rows from other devices are "
              "shown for reference only.\n\n" + tg + "\n\n## All results\n\n" + md)
    # the devices the rows were measured on (a report of another machine's folder names that machine)
    devices = list(dict.fromkeys(str(r.get("device")) for r in rows if r.get("device")))
    title = ", ".join(devices) if devices else _bench.device_name(device)
    text = (f"# Benchmark results: {title}\n\n"
            f"Written by `python benchmarks/run_all.py{''.join(' ' + x for x in (argv or sys.argv[1:]))}`; "
            f"rows in the *.json next "
            f"to this file. Times are medians (p20/p80 in the JSON); `vs eager` is eager's median over the "
            f"provider's; `% peak` is of the measured copy bandwidth (GB/s rows) or the measured matmul "
            f"FLOP/s (TFLOP/s rows; for unet_step and sampling that is the MFU from counted FLOPs); `% of copy` "
            f"(GroupNorm forward) is a same-size `x.clone()` timed in the same rounds, over the provider's "
            f"median.\n\n" + md)
    atomic_write_file(os.path.join(out_dir, "REPORT.md"), lambda f: f.write(text), mode="w")
    try:
        pngs = report.plots(rows, out_dir)
    except ImportError:
        pngs = []
        print("matplotlib is not installed: no plots", file=sys.stderr)
    print(f"\nwrote {os.path.join(out_dir, 'REPORT.md')} and {len(pngs)} plot(s)")
    if old_rows is not None:
        lines, regs = report.compare(old_rows, all_rows, a.threshold)
        print("\n".join(lines) if lines else "no rows in common")
        print(f"\n{len(regs)} regression(s) over {100 * a.threshold:.0f}%")
        return 1 if regs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
