"""Benchmark harness shared by benchmarks/*.py and `fastdiff bench`: timing, device peaks, result rows.

GPU timing uses CUDA events around each run, after warm-up, with L2 flushed between runs for memory-bound ops
(a write of a buffer larger than L2); CPU timing uses time.perf_counter, with glibc's heap kept warm (see
warm_cpu_heap: otherwise whether a provider's outputs page-fault on every call depends on what ran before it). Both report the median and the
p20/p80 of many runs. Peaks are measured, not taken from data sheets: a large device-to-device copy for
bandwidth (bytes read + written), a large bf16 (GPU) or fp32 (CPU) matmul for FLOP/s.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import time

import torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(device) -> torch.device:
    """A benchmark's --device: "auto" (cuda when available), cpu, cuda, cuda:N; a device this machine lacks is a
    ValueError naming --device (it was torch's "Found no NVIDIA driver" traceback after the first allocation)."""
    if isinstance(device, torch.device):
        return device
    from fastdiff.pretrained import resolve_device as resolve

    try:
        return resolve(device)
    except ValueError as e:
        raise ValueError(f"--{e}") from None


def run_main(main, argv=None) -> int:
    """A benchmark script's main(argv) with a user's error (a bad --device, an unwritable --out) printed as one line
    naming the script (exit 2), as `fastdiff bench` prints it, instead of a traceback."""
    import sys

    from fastdiff.cli import run_reporting_errors

    return run_reporting_errors(os.path.basename(sys.argv[0]) or "benchmark", lambda: main(argv))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _checkout_root(package_dir: str = _PACKAGE_DIR) -> str | None:
    """The fastdiff source tree the package is imported from (the folder holding setup.py, fastdiff/ and csrc/),
    or None for an installed package (site-packages)."""
    root = os.path.dirname(package_dir)
    ok = (os.path.basename(package_dir) == "fastdiff" and os.path.isfile(os.path.join(root, "setup.py"))
          and os.path.isdir(os.path.join(root, "csrc")))
    return root if ok else None


def git_commit(package_dir: str = _PACKAGE_DIR) -> str | None:
    """The commit of the fastdiff checkout the package runs from ("-dirty" with uncommitted changes), or None when
    the package is installed: git run from site-packages finds whatever repository encloses it (a project with its
    venv inside), whose commit says nothing about the fastdiff measured."""
    return _git_commit(os.path.realpath(package_dir))


@functools.lru_cache(None)
def _git_commit(package_dir: str) -> str | None:
    root = _checkout_root(package_dir)
    if root is None:
        return None
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return None  # a source tree without git of its own, inside some other repository
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        # results files a previous run left modified do not make the measured code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from fastdiff import __version__

    env = {
        "device": device_name(device),
        "fastdiff": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if torch.device(device).type == "cpu":
        env["cpu_heap"] = warm_cpu_heap()
    return env


_CPU_HEAP = None


def warm_cpu_heap():
    """Keep freed blocks of up to 32 MiB in glibc's heap instead of returning them to the OS.

    By default glibc hands large freed blocks back (munmap, or a heap trim) and maps fresh zeroed pages for the
    next allocation, so an op that returns a new 10 MB tensor page-faults about 2,500 times per call; whether it
    does depends on glibc's adaptive thresholds, i.e. on what the process allocated before. A benchmark would then
    time the allocator: the same kernel measured 0.55 ms or 5 ms at (2, 320, 64, 64) fp32 here. This sets
    M_MMAP_THRESHOLD to 32 MiB (glibc's maximum) and M_TRIM_THRESHOLD to 1 GiB once per process, for every
    provider alike (eager, compile and fastdiff), and returns the setting recorded in the result rows; None where
    the C library is not glibc. The `fastdiff` command sets it too for sample, eval, train and demo (a process of
    its own: up to 1 GiB of freed memory may then stay in its heap). A program that imports fastdiff gets the same
    with the environment variables MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824, or with
    jemalloc/tcmalloc."""
    global _CPU_HEAP
    if _CPU_HEAP is None:
        _CPU_HEAP = ""
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
            if libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1:
                _CPU_HEAP = "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB"
        except (OSError, AttributeError):
            pass
    return _CPU_HEAP or None


_l2_buffer = None


def _flush_l2(device):
    global _l2_buffer
    if _l2_buffer is None or _l2_buffer.device != device:
        # 256 MB: larger than the L2 of any current GPU (H100: 50 MB, B200: 126 MB)
        _l2_buffer = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=device)
    _l2_buffer.zero_()


def time_fn(fn, device: torch.device, *, warmup: int = 5, reps: int | None = None, flush_l2: bool = False,
            min_time_s: float = 0.2) -> dict:
    """Median / p20 / p80 of fn() in milliseconds."""
    device = torch.device(device)
    if device.type == "cpu":
        warm_cpu_heap()
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        one = time.perf_counter() - t0
        reps = reps or int(min(200, max(10, min_time_s / max(one, 1e-6))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if flush_l2:
                _flush_l2(device)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        t0 = time.perf_counter()
        fn()
        one = time.perf_counter() - t0
        reps = reps or int(min(100, max(5, min_time_s / max(one, 1e-6))))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "reps": len(times)}


def time_providers(fns: dict, device, rounds: int = 1, **kw) -> dict:
    """Time every provider (name -> fn) in `rounds` interleaved rounds and keep each one's best round (the lowest
    median): on a shared CPU a burst of load from elsewhere then hits every provider alike instead of one."""
    best = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time_fn(fn, device, **kw)
            if name not in best or t["median_ms"] < best[name]["median_ms"]:
                best[name] = t
    return best


def _threads(device_str: str) -> int:
    # on the CPU the peak depends on the thread count (the attention benchmark runs on one thread)
    return torch.get_num_threads() if torch.device(device_str).type == "cpu" else 0


def peak_bandwidth_gbps(device_str: str) -> float:
    """Measured: bytes read + written per second by a large copy."""
    return _peak_bandwidth_gbps(device_str, _threads(device_str))


def peak_tflops(device_str: str) -> float:
    """Measured: a large bf16 matmul on a GPU, fp32 on the CPU."""
    return _peak_tflops(device_str, _threads(device_str))


@functools.lru_cache(None)
def _peak_bandwidth_gbps(device_str: str, threads: int) -> float:
    device = torch.device(device_str)
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, reps=20 if device.type == "cuda" else 10)
    return 2 * src.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9


@functools.lru_cache(None)
def _peak_tflops(device_str: str, threads: int) -> float:
    device = torch.device(device_str)
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=3, reps=20 if device.type == "cuda" else 5)
    return 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12


def make_row(*, op, case, shape, dtype, layout, provider, timing, device, nbytes=None, flops=None, extra=None):
    """One result row in the format of shared/ARCHITECTURE.md."""
    dev = torch.device(device)
    row = {"op": op, "case": case, "shape": list(shape) if shape is not None else None,
           "dtype": str(dtype).replace("torch.", "") if dtype is not None else None, "layout": layout,
           "provider": provider, "median_ms": timing["median_ms"], "p20_ms": timing["p20_ms"],
           "p80_ms": timing["p80_ms"]}
    sec = timing["median_ms"] * 1e-3
    if nbytes is not None:
        row["gbps"] = nbytes / sec / 1e9
        row["pct_peak"] = 100 * row["gbps"] / peak_bandwidth_gbps(str(dev))
    elif flops is not None:
        row["tflops"] = flops / sec / 1e12
        row["pct_peak"] = 100 * row["tflops"] / peak_tflops(str(dev))
    if extra:
        row.update(extra)
    row.update(environment(dev))
    return row


def results_dir(device: torch.device, package_dir: str = _PACKAGE_DIR) -> str:
    """<checkout>/benchmarks/results/<device-slug> when fastdiff runs from its source tree; for an installed package
    ./benchmarks/results/<device-slug> under the current directory (never inside site-packages)."""
    root = _checkout_root(package_dir) or os.getcwd()
    return os.path.join(root, "benchmarks", "results", device_slug(torch.device(device)))


# What one row measured: a later row with the same values is a newer measurement of the same thing.
ROW_KEY = ("op", "case", "shape", "dtype", "layout", "provider", "device", "unit")


class ResultsFileError(ValueError):
    """An existing results file that is not a JSON list of rows (or {"rows": [...]}): left as it is."""


def row_key(row: dict) -> tuple:
    return tuple(tuple(v) if isinstance(v, list) else v for v in (row.get(k) for k in ROW_KEY))


def merge_rows(old: list, new: list) -> list:
    """old's rows with those that new measured again (same row_key) replaced in place by new's, then new's other
    rows: a run of some cases (one op of a module, a --quick run's few shapes) keeps the rows of all the others."""
    fresh = {}
    for r in new:
        fresh.setdefault(row_key(r), []).append(r)
    merged, done = [], set()
    for r in old:
        k = row_key(r)
        if k not in fresh:
            merged.append(r)
        elif k not in done:
            merged += fresh[k]
            done.add(k)
    return merged + [r for r in new if row_key(r) not in done]


def read_results_file(path: str):
    """The JSON an existing results file holds (a list of rows, or {"rows": [...]} with other keys), or None where
    there is no file; ResultsFileError for anything else, which write_rows leaves as it is."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ResultsFileError(f"{path}: not a readable results file, not overwritten ({e})") from None
    if isinstance(old, list) or (isinstance(old, dict) and isinstance(old.get("rows"), list)):
        return old
    raise ResultsFileError(f"{path}: expected a JSON list of rows or {{'rows': [...]}}, not overwritten")


def write_rows(rows: list, path: str, merge: bool = True):
    """Write rows as a JSON list, atomically (fastdiff._io.atomic_write). merge: an existing file keeps its rows but
    those these rows measure again (merge_rows); merge=False replaces the file."""
    from fastdiff._io import atomic_write_file

    data = rows
    old = read_results_file(path) if merge else None
    if isinstance(old, dict):
        data = dict(old, rows=merge_rows(old["rows"], rows))
    elif old is not None:
        data = merge_rows(old, rows)
    atomic_write_file(path, lambda f: json.dump(data, f, indent=1), mode="w")


def write_rows_by_op(rows: list, folder: str) -> list:
    """Each op's rows merged into folder/<op>.json; returns the paths written."""
    paths = []
    for op in dict.fromkeys(r["op"] for r in rows):
        path = os.path.join(folder, f"{op}.json")
        write_rows([r for r in rows if r["op"] == op], path)
        paths.append(path)
    return paths


def format_table(rows: list, baseline: str = "eager") -> str:
    """A markdown table: one line per (case, dtype, layout, provider), with the speed-up over `baseline`."""
    base = {}
    for r in rows:
        if r["provider"] == baseline:
            base[(r["op"], r["case"], r["dtype"], r["layout"])] = r["median_ms"]
    lines = ["| op | case | dtype | layout | provider | median ms | p20-p80 ms | GB/s or TFLOP/s | % peak | vs "
             + baseline + " |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get((r["op"], r["case"], r["dtype"], r["layout"]))
        speed = f"{b / r['median_ms']:.2f}x" if b else "-"
        rate = f"{r['gbps']:.1f} GB/s" if "gbps" in r else (f"{r['tflops']:.2f} TFLOP/s" if "tflops" in r else "-")
        pct = f"{r['pct_peak']:.0f}%" if "pct_peak" in r else "-"
        if "pct_copy" in r:  # GroupNorm forward: also against a same-size copy timed alongside
            pct += f" ({r['pct_copy']:.0f}% of copy)"
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['layout'] or '-'} | {r['provider']} | "
                     f"{r['median_ms']:.4f} | {r['p20_ms']:.4f}-{r['p80_ms']:.4f} | {rate} | {pct} | {speed} |")
    return "\n".join(lines)
