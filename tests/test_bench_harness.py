"""The benchmark harness and report: row format, timing on the CPU, markdown, plots and --compare."""
import json

import pytest
import torch

from fastdiff import _bench
from fastdiff.benchmarks import report

ROW_KEYS = {"op", "case", "shape", "dtype", "layout", "provider", "median_ms", "p20_ms", "p80_ms", "device",
            "torch", "triton", "cuda", "commit", "date"}


def _row(provider, ms, case="N2 C320 64x64", op="group_norm"):
    return {"op": op, "case": case, "shape": [2, 320, 64, 64], "dtype": "float16", "layout": "nchw",
            "provider": provider, "median_ms": ms, "p20_ms": ms * 0.9, "p80_ms": ms * 1.1, "gbps": 1.0,
            "pct_peak": 50.0, "device": "TestGPU", "torch": "x", "triton": "y", "cuda": "z", "commit": "c",
            "date": "d"}


def test_time_fn_and_make_row_cpu():
    x = torch.randn(1000)
    t = _bench.time_fn(lambda: x * 2, "cpu", warmup=1, reps=7)
    assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
    row = _bench.make_row(op="demo", case="c", shape=[1000], dtype=torch.float32, layout=None, provider="eager",
                          timing=t, device="cpu", nbytes=8000)
    assert ROW_KEYS <= set(row) and row["dtype"] == "float32"
    assert row["gbps"] > 0 and row["pct_peak"] > 0


def test_write_rows_atomic(tmp_path):
    path = tmp_path / "sub" / "r.json"
    _bench.write_rows([_row("eager", 1.0)], str(path))
    assert json.loads(path.read_text())[0]["provider"] == "eager"
    assert not (tmp_path / "sub" / "r.json.tmp").exists()


def test_markdown_speedups(tmp_path):
    rows = [_row("eager", 3.0), _row("compile", 1.5), _row("fastdiff-cuda", 1.0)]
    (tmp_path / "a.json").write_text(json.dumps({"rows": rows}))
    md = report.markdown(report.load_rows([str(tmp_path)]))
    assert "3.00x" in md and "1.50x" in md and "group_norm on TestGPU" in md


def test_markdown_names_each_run_of_a_merged_table(tmp_path):
    # a table whose rows came from two runs (an op rerun for some cases) showed the first row's commit and date
    # as if every figure were from it
    run1 = [dict(_row(p, t, case="a"), commit="aaa", date="2026-01-01T00:00:0%dZ" % i)
            for i, (p, t) in enumerate([("eager", 3.0), ("fastdiff-cuda", 1.0)])]
    run2 = [dict(_row(p, t, case="b"), commit="bbb", date="2026-02-01T00:00:00Z")
            for p, t in [("eager", 2.0), ("fastdiff-cuda", 1.0)]]
    run2.append(dict(_row("eager", 2.5, case="a"), commit="bbb", date="2026-02-01T00:00:00Z"))  # case a's eager, rerun
    md = report.markdown(run1 + run2)
    assert "Rows from 2 runs" in md
    assert "1. torch" in md and "commit aaa, 2026-01-01T00:00:01Z\n" in md  # its eager row was replaced
    assert "2. torch" in md and "commit bbb, 2026-02-01T00:00:00Z" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[0].endswith("| run |")
    assert lines[1].startswith("| a |") and lines[1].endswith("| 1,2 |")  # eager from run 2, fastdiff from run 1
    assert lines[2].startswith("| b |") and lines[2].endswith("| 2 |")
    one = report.markdown(run1)  # one run: the provenance line as before, no run column
    assert "Rows from" not in one and "run |" not in one
    assert "commit aaa, 2026-01-01T00:00:00Z to 2026-01-01T00:00:01Z" in one


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("eager", 3.0), _row("fastdiff-cuda", 1.0), _row("eager", 2.0, case="b"),
            _row("fastdiff-cuda", 1.0, case="b")]
    paths = report.plots(rows, str(tmp_path))
    assert len(paths) == 1 and (tmp_path / "group-norm-testgpu.png").stat().st_size > 1000


def test_compare_flags_regressions(tmp_path):
    old = [_row("fastdiff-cuda", 1.0), _row("eager", 3.0)]
    new = [_row("fastdiff-cuda", 1.2), _row("eager", 3.05)]
    lines, regs = report.compare(old, new)
    assert len(lines) == 2 and len(regs) == 1 and "fastdiff-cuda" in regs[0]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert report.main([str(tmp_path / "new.json"), "--compare", str(tmp_path / "old.json")]) == 1


def test_cpu_rows_record_the_warm_heap():
    """CPU timings run with glibc's heap kept warm, and the rows say so (None where libc is not glibc)."""
    import platform

    from fastdiff import _bench

    env = _bench.environment(torch.device("cpu"))
    if platform.libc_ver()[0] == "glibc":
        assert env["cpu_heap"].startswith("glibc mallopt")
    else:
        assert env["cpu_heap"] is None


def test_write_rows_merges_by_row_key(tmp_path):
    """A run replaces only the rows it measured again (same op, case, shape, dtype, layout, provider, device):
    `fastdiff bench --op unet_step` used to delete the sampling rows of the same file, a --quick run every other
    case's rows."""
    path = tmp_path / "r.json"
    _bench.write_rows([_row("eager", 3.0), _row("fastdiff-cpu", 1.0), _row("eager", 5.0, case="other")], str(path))
    _bench.write_rows([_row("fastdiff-cpu", 0.5), _row("fastdiff-cpu", 2.0, op="sampling")], str(path))
    got = [(r["op"], r["case"], r["provider"], r["median_ms"]) for r in json.loads(path.read_text())]
    assert got == [("group_norm", "N2 C320 64x64", "eager", 3.0), ("group_norm", "N2 C320 64x64", "fastdiff-cpu", 0.5),
                   ("group_norm", "other", "eager", 5.0), ("sampling", "N2 C320 64x64", "fastdiff-cpu", 2.0)]
    _bench.write_rows([_row("eager", 4.0)], str(path), merge=False)
    assert len(json.loads(path.read_text())) == 1
    path.write_text(json.dumps({"rows": [_row("eager", 3.0)], "note": "kept"}))  # the other accepted format
    _bench.write_rows([_row("compile", 2.0)], str(path))
    data = json.loads(path.read_text())
    assert data["note"] == "kept" and [r["provider"] for r in data["rows"]] == ["eager", "compile"]
    path.write_text("{not json")
    with pytest.raises(_bench.ResultsFileError, match="not overwritten"):
        _bench.write_rows([_row("eager", 1.0)], str(path))
    assert path.read_text() == "{not json"


def test_report_keeps_the_newest_row_of_a_case(tmp_path):
    """A folder holding an older file with both U-Net ops (unet.json) and the per-op files newer runs write: the
    report and --compare use the newest row of each case, whatever the file order."""
    old, new = dict(_row("eager", 9.0, op="sampling"), date="2026-01-01"), dict(_row("eager", 1.0, op="sampling"),
                                                                                date="2026-02-01")
    (tmp_path / "sampling.json").write_text(json.dumps([new]))
    (tmp_path / "unet.json").write_text(json.dumps([old, _row("eager", 2.0, op="unet_step")]))
    rows = report.load_rows([str(tmp_path)])
    assert sorted((r["op"], r["median_ms"]) for r in rows) == [("sampling", 1.0), ("unet_step", 2.0)]


def test_installed_package_records_no_foreign_commit_and_writes_under_cwd(tmp_path):
    """fastdiff installed in a venv inside the user's own git repository: rows used to record the user's commit
    (git run from site-packages finds the enclosing repo) and results went into site-packages. Now: commit None,
    results under ./benchmarks/results, and every row names fastdiff's version. From the checkout: its commit."""
    import os
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proj = tmp_path / "proj"
    site = proj / ".venv" / "site-packages"
    shutil.copytree(os.path.join(root, "fastdiff"), site / "fastdiff",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "assets"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=proj, check=True)
    (proj / "app.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "app.py"], cwd=proj, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "user project"], cwd=proj, check=True)
    work = proj / "work"
    work.mkdir()
    code = ("import json, fastdiff, torch; from fastdiff import _bench; "
            "print(json.dumps([fastdiff.__file__, _bench.git_commit(), _bench.results_dir('cpu'), "
            "_bench.environment(torch.device('cpu'))['fastdiff']]))")
    env = dict(os.environ, PYTHONPATH=str(site))
    p = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    where, commit, results, version = json.loads(p.stdout.strip().splitlines()[-1])
    assert where.startswith(str(site))
    assert commit is None
    assert results == os.path.join(str(work), "benchmarks", "results", _bench.device_slug(torch.device("cpu")))
    import fastdiff

    assert version == fastdiff.__version__
    assert _bench.environment(torch.device("cpu"))["fastdiff"] == fastdiff.__version__
    assert _bench.results_dir("cpu").startswith(os.path.join(root, "benchmarks", "results"))
    if subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True
                      ).stdout.strip() == root:
        assert _bench.git_commit()  # the checkout's own commit
