"""Benchmark results -> a markdown table and PNG plots; and `--compare OLD NEW` to flag regressions.

Input: result files in the format of shared/ARCHITECTURE.md (a JSON list of rows, or {"rows": [...]}),
given as files or folders (every *.json under them). One table per op: a row per (case, dtype, layout), a
column per provider with its median time, and the speed-up of each provider over eager (and over
torch.compile where it was measured), and images/s per provider for the end-to-end rows (unet_step, sampling).
PNGs: per (op, device) the speed-up over eager per case and provider, and for `sampling` rows the images per
second per case and provider.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections import OrderedDict

from fastdiff._io import atomic_write, atomic_write_file

KEY = ("op", "case", "dtype", "layout", "provider", "device")


def load_rows(paths) -> list:
    rows = []
    for p in paths:
        files = sorted(glob.glob(os.path.join(p, "**", "*.json"), recursive=True)) if os.path.isdir(p) else [p]
        for f in files:
            with open(f) as fh:
                data = json.load(fh)
            data = data["rows"] if isinstance(data, dict) else data
            if not isinstance(data, list):
                raise ValueError(f"{f}: expected a JSON list of rows or {{'rows': [...]}}")
            for r in data:
                if isinstance(r, dict) and "op" in r and "median_ms" in r:
                    rows.append(r)
    return _newest(rows)


def _newest(rows) -> list:
    """One row per measured thing (_bench.row_key), the newest by `date` (the later one read on a tie), at the place
    of the first: a folder can hold a case twice, e.g. an older unet.json (both U-Net ops in one file) next to the
    unet_step.json / sampling.json that newer runs write."""
    from fastdiff._bench import row_key

    best = OrderedDict()
    for r in rows:
        k = row_key(r)
        if k not in best or str(r.get("date") or "") >= str(best[k].get("date") or ""):
            best[k] = r
    return list(best.values())


def _group(rows):
    """(op, device) -> (case, dtype, layout) -> provider -> row, in first-seen order. Rows with a `unit` of their
    own (the sampler benchmark's tiny-model loop: "ms per step") get a table of their own, "op (unit)"."""
    out = OrderedDict()
    for r in rows:
        op = f"{r['op']} ({r['unit']})" if r.get("unit") else r["op"]
        tab = out.setdefault((op, r.get("device", "?")), OrderedDict())
        tab.setdefault((r["case"], r.get("dtype"), r.get("layout")), OrderedDict())[r["provider"]] = r
    return out


_RUN_KEYS = ("torch", "triton", "cuda", "commit", "cpu_heap")


def _run_key(r):
    return tuple(str(r.get(key)) for key in _RUN_KEYS)


def _runs(tab):
    """The runs a table's rows come from: rows that share versions, commit and CPU heap setting are one run (a
    run's rows differ in their time stamps only). Returns (each run's provenance line, oldest run first; the run
    number, from 1, of each row by id)."""
    runs, dates = OrderedDict(), {}
    for cell in tab.values():
        for r in cell.values():
            k = _run_key(r)
            runs.setdefault(k, r)
            dates.setdefault(k, []).append(str(r.get("date")))
    order = sorted(runs, key=lambda k: min(dates[k]))
    number = {k: i for i, k in enumerate(order, 1)}
    of_row = {id(r): number[_run_key(r)] for cell in tab.values() for r in cell.values()}
    lines = []
    for k in order:
        r, d = runs[k], sorted(dates[k])
        when = d[0] if d[0] == d[-1] else f"{d[0]} to {d[-1]}"
        lines.append(f"torch {r.get('torch')}, triton {r.get('triton')}, CUDA {r.get('cuda')}, commit "
                     f"{r.get('commit')}, {when}" + (f"; CPU heap: {r['cpu_heap']}" if r.get("cpu_heap") else ""))
    return lines, of_row


def markdown(rows) -> str:
    parts = []
    for (op, device), tab in _group(rows).items():
        providers = list(OrderedDict.fromkeys(p for cell in tab.values() for p in cell))
        runs, run_of = _runs(tab)
        if len(runs) == 1:
            parts.append(f"### {op} on {device}\n\n{runs[0]}\n")
        else:  # rows merged from several runs: say which run each line's figures come from
            parts.append(f"### {op} on {device}\n\nRows from {len(runs)} runs (the `run` column):\n\n"
                         + "\n".join(f"{i}. {line}" for i, line in enumerate(runs, 1)) + "\n")
        head = ["case", "dtype", "layout"] + [f"{p} ms" for p in providers]
        fast = [p for p in providers if p.startswith("fastdiff")]
        head += [f"{p} vs eager" for p in fast] + [f"{p} vs compile" for p in fast if "compile" in providers]
        head += [f"{p} % peak" for p in fast]
        copy = [p for p in fast if any("pct_copy" in cell.get(p, {}) for cell in tab.values())]
        head += [f"{p} % of copy" for p in copy]
        ips = any("images_per_s" in r for cell in tab.values() for r in cell.values())
        if ips:
            head += [f"{p} img/s" for p in providers]
        if len(runs) > 1:
            head.append("run")
        parts.append("| " + " | ".join(head) + " |")
        parts.append("|" + "---|" * 3 + "---:|" * (len(head) - 3))
        for (case, dtype, layout), cell in tab.items():
            line = [case, str(dtype), layout or "-"]
            line += [f"{cell[p]['median_ms']:.4f}" if p in cell else "-" for p in providers]
            for base in ("eager", "compile"):
                if base == "compile" and "compile" not in providers:
                    continue
                for p in fast:
                    ok = p in cell and base in cell
                    line.append(f"{cell[base]['median_ms'] / cell[p]['median_ms']:.2f}x" if ok else "-")
            line += [f"{cell[p]['pct_peak']:.0f}%" if p in cell and "pct_peak" in cell[p] else "-" for p in fast]
            line += [f"{cell[p]['pct_copy']:.0f}%" if p in cell and "pct_copy" in cell[p] else "-" for p in copy]
            if ips:
                line += [f"{cell[p]['images_per_s']:.3g}" if p in cell and cell[p].get("images_per_s") else "-"
                         for p in providers]
            if len(runs) > 1:
                line.append(",".join(str(n) for n in sorted({run_of[id(r)] for r in cell.values()})))
            parts.append("| " + " | ".join(line) + " |")
        parts.append("")
    return "\n".join(parts)


# issue 7's targets (judged on an H100): (op, baseline provider, minimum speed-up of `fastdiff` over it)
TARGETS = (("unet_step", "eager", 1.5), ("unet_step", "compile", 1.1), ("sampling", "eager", 1.6))


def targets(rows) -> str:
    """A markdown table of the end-to-end targets per (case, dtype): fastdiff's speed-up (for sampling: images/s
    ratio, the same thing at a fixed batch) over each baseline, and whether it meets the target."""
    lines = ["| op | case | dtype | device | fastdiff vs | speed-up | target | met |", "|---|---|---|---|---|---:|---:|---|"]
    for (op, device), tab in _group(rows).items():
        for want_op, base, goal in TARGETS:
            if op != want_op:
                continue
            for (case, dtype, _layout), cell in tab.items():
                if "fastdiff" not in cell or base not in cell:
                    continue
                sp = cell[base]["median_ms"] / cell["fastdiff"]["median_ms"]
                lines.append(f"| {op} | {case} | {dtype} | {device} | {base} | {sp:.2f}x | {goal:.1f}x | "
                             f"{'yes' if sp >= goal else 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _bar_png(plt, outdir, name, cases, provs, value, *, ticks, ylabel, title, per_bar, unit_line) -> str:
    """A grouped bar chart (a group per case, a bar per provider, height value(case, provider)) saved as
    <outdir>/<slug of name>.png; returns the path."""
    fig, ax = plt.subplots(figsize=(max(6, per_bar * len(cases) * max(1, len(provs)) / 2 + 2), 4.5))
    width = 0.8 / len(provs)
    for i, p in enumerate(provs):
        ax.bar([j + i * width for j in range(len(cases))], [value(c, p) for c in cases], width, label=p)
    if unit_line:
        ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(ticks, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = os.path.join(outdir, f"{slug}.png")
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))  # a reader never sees half a plot
    plt.close(fig)
    return path


def plots(rows, outdir) -> list:
    """One PNG per (op, device): speed-up over eager per case (bars per provider). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    written = []
    for (op, device), tab in _group(rows).items():
        cases = [k for k, cell in tab.items() if "eager" in cell]
        provs = [p for p in OrderedDict.fromkeys(p for c in cases for p in tab[c]) if p != "eager"]
        if not cases or not provs:
            continue
        written.append(_bar_png(
            plt, outdir, f"{op}-{device}", cases, provs,
            lambda c, p: tab[c]["eager"]["median_ms"] / tab[c][p]["median_ms"] if p in tab[c] else 0,
            ticks=[f"{c[0]}\n{c[1]} {c[2] or ''}" for c in cases], ylabel="speed-up over eager (x)",
            title=f"{op} on {device}", per_bar=0.55, unit_line=True))
    written += _images_per_s_plots(rows, outdir, plt)
    return written


def _images_per_s_plots(rows, outdir, plt) -> list:
    """One PNG per device for the `sampling` rows that carry images_per_s: bars per provider per case."""
    written = []
    for (op, device), tab in _group(rows).items():
        if op != "sampling":
            continue
        cases = [k for k, cell in tab.items() if any(r.get("images_per_s") for r in cell.values())]
        provs = list(OrderedDict.fromkeys(p for c in cases for p in tab[c]))
        if not cases:
            continue
        written.append(_bar_png(
            plt, outdir, f"sampling-images-per-s-{device}", cases, provs,
            lambda c, p: tab[c][p].get("images_per_s") or 0 if p in tab[c] else 0,
            ticks=[f"{c[0]}\n{c[1]}" for c in cases], ylabel="images per second (higher is better)",
            title=f"sampling loop, images/s on {device}", per_bar=0.5, unit_line=False))
    return written


def compare(old_rows, new_rows, threshold=0.05):
    """Lines describing the change per matching row, and the list of regressions (slower by > threshold)."""
    old = {tuple(r.get(k) for k in KEY): r for r in old_rows}
    lines, regressions = [], []
    for r in new_rows:
        k = tuple(r.get(k) for k in KEY)
        if k not in old:
            continue
        before, after = old[k]["median_ms"], r["median_ms"]
        change = after / before - 1
        flag = "REGRESSION" if change > threshold else ("faster" if change < -threshold else "")
        line = (f"{r['op']:12s} {r['case']:40s} {str(r.get('dtype')):9s} {str(r.get('layout')):5s} "
                f"{r['provider']:18s} {before:9.4f} -> {after:9.4f} ms  {100 * change:+6.1f}%  {flag}")
        lines.append(line)
        if change > threshold:
            regressions.append(line)
    return lines, regressions


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark results to a markdown table and plots, or compare two runs.")
    p.add_argument("paths", nargs="*", default=["benchmarks/results"], help="result files or folders")
    p.add_argument("--plots", default=None, help="folder for PNG plots (default: none)")
    p.add_argument("--out", default=None, help="write the markdown here (default: stdout)")
    p.add_argument("--compare", metavar="OLD", default=None, help="compare `paths` against this stored run")
    p.add_argument("--threshold", type=float, default=0.05, help="regression threshold (default 0.05 = 5%%)")
    a = p.parse_args(argv)
    rows = load_rows(a.paths)
    if not rows:
        print(f"no result rows under {a.paths}", file=sys.stderr)
        return 2
    if a.compare:
        lines, regs = compare(load_rows([a.compare]), rows, a.threshold)
        print("\n".join(lines) if lines else "no rows in common")
        print(f"\n{len(regs)} regression(s) over {100 * a.threshold:.0f}%")
        return 1 if regs else 0
    md = markdown(rows)
    if a.out:
        atomic_write_file(a.out, lambda f: f.write(md), mode="w")
    else:
        print(md)
    if a.plots:
        for path in plots(rows, a.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
