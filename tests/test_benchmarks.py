"""Smoke tests of the benchmark modules (fastdiff.benchmarks.*) and `fastdiff bench`: tiny shapes, nothing written.

These check that every benchmark runs and returns rows in the format of shared/ARCHITECTURE.md; they never
assert a speed (targets are judged from the committed results files).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import fastdiff

from fastdiff import cli
from fastdiff.benchmarks import attention, group_norm, report, sampler, unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"op", "case", "shape", "dtype", "layout", "provider", "median_ms", "p20_ms", "p80_ms", "device", "torch",
            "triton", "cuda", "commit", "date"}


def _check_rows(rows, op, providers=()):
    assert rows, "no rows"
    for r in rows:
        assert ROW_KEYS <= set(r), sorted(ROW_KEYS - set(r))
        # every row has a rate and its % of peak, but the sampler benchmark's tiny-model loop (ms per step only)
        assert ("gbps" in r or "tflops" in r) and "pct_peak" in r or r.get("unit") == "ms per step"
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        json.dumps(r)  # serialisable
    assert {r["op"] for r in rows} >= {op}
    assert set(providers) <= {r["provider"] for r in rows}


def test_group_norm_run():
    rows, out = group_norm.run("cpu", quick=True, compile_=False, layouts=("nchw",), out="", verbose=False,
                               shapes=[("tiny", (1, 64, 8))])
    assert out == ""
    _check_rows(rows, "group_norm", ["eager"])
    # each row carries the same-size copy timed alongside, which is no provider of its own
    assert group_norm._COPY not in {r["provider"] for r in rows}
    assert len({r["copy_ms"] for r in rows}) == 1
    for r in rows:
        assert r["copy_ms"] > 0 and r["pct_copy"] == pytest.approx(100 * r["copy_ms"] / r["median_ms"])
    assert "% of copy)" in fastdiff._bench.format_table(rows)


def test_group_norm_backward_run():
    """--backward: a training step (forward + the five gradients) per provider, checked against eager first."""
    rows, _ = group_norm.run("cpu", quick=True, compile_=False, layouts=("nchw", "nhwc"), out="", verbose=False,
                             shapes=[("tiny", (2, 64, 8))], backward=True)
    _check_rows(rows, "group_norm_fwd_bwd", ["eager"])
    assert {r["provider"] for r in rows} >= ({"eager", "fastdiff-cpu"} if fastdiff.info()["cpu_extension"]
                                            else {"eager"})


def test_attention_run_restores_threads():
    threads = torch.get_num_threads()
    rows, _ = attention.run("cpu", [torch.float32], quick=True, compile_=False, out="", verbose=False, reps=3,
                              cases=[(1, 2, 64, 64, 8, "tiny"), (1, 2, 64, 77, 8, "tiny-cross")])
    assert torch.get_num_threads() == threads
    _check_rows(rows, "attention", ["eager", "sdpa"])
    assert any("gbps" in r for r in rows) and any("tflops" in r for r in rows)  # cross rows are memory-bound


def test_sampler_run():
    rows, _ = sampler.run("cpu", quick=True, compile_=False, out="", verbose=False, shapes=[(1, 4, 8, 8)],
                          loop_steps=2, loop_shape=(1, 4, 8, 8))
    _check_rows(rows, "sampler_step", ["eager"])
    assert {r["case"].split()[0] for r in rows if r["op"] == "sampler_step"} == {"ddim-cfg", "ddpm-cfg", "dpmpp-cfg",
                                                                             "flow-cfg", "unipc-cfg"}
    flow = [r for r in rows if r["case"].startswith("flow-cfg")]
    provs = {r["provider"] for r in flow}
    assert "eager" in provs and "fastdiff-torch" in provs
    assert ("diffusers" in provs) == (importlib.util.find_spec("diffusers") is not None)
    assert any(r["op"] == "sampling" for r in rows)


def test_sampler_unipc_providers_compute_the_same_step():
    """The unipc-cfg row's providers do the same work: the eager step (Python-float coefficients), diffusers' step
    (its state set to step i with the two previous x0) and the fused step give the same x_prev."""
    from fastdiff.diffusion import UniPCSampler

    cfg = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
    s = UniPCSampler(**cfg).set_timesteps(30, seed=0)
    i = 5
    g = torch.Generator().manual_seed(0)
    x, c, u, p, p2 = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(5))
    eager, x0 = sampler.eager_unipc(s, i)(x, c, u, p, p2)
    s._x0_buf, s._x0_buf2, s._x0_key = p.clone(), p2.clone(), (x.shape, x.dtype, x.device, x.stride())
    fused = s.step(c, i, x, uncond=u, guidance_scale=sampler.GUIDANCE)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(s._x0_buf2, p) and torch.allclose(s._x0_buf, x0)
    if importlib.util.find_spec("diffusers") is not None:
        # diffusers at step i of a run (its stored last sample consistent with x), the same x0 history in ours
        from diffusers import UniPCMultistepScheduler

        us = UniPCMultistepScheduler(**cfg)
        us.set_timesteps(30)
        y = torch.randn(2, 4, 8, 8, generator=g)
        for t in us.timesteps[:i]:
            y = us.step(torch.tanh(y), t, y).prev_sample
        assert us.this_order == 2 and us.lower_order_nums == 2
        s._x0_buf, s._x0_buf2 = us.model_outputs[-1].clone(), us.model_outputs[-2].clone()
        fused = s.step(c, i, y, uncond=u, guidance_scale=sampler.GUIDANCE)
        want = us.step(u + sampler.GUIDANCE * (c - u), us.timesteps[i], y).prev_sample
        torch.testing.assert_close(fused, want, atol=1e-4, rtol=1e-4)


# two levels, 8x8 latents: the SD-like model shrunk further than the quick suite's tiny one, same code paths
MICRO = {"sd15-micro": (dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                             attention_resolutions=(8, 4), channel_mult=(1, 2), num_heads=4, context_dim=16,
                             use_scale_shift_norm=False), (4, 8, 8), (7, 16), None,
                        dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                             block_out_channels=(32, 64), cross_attention_dim=16, attention_head_dim=4,
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))),
         "adm-micro": (dict(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                            attention_resolutions=(4,), channel_mult=(1, 2), num_head_channels=32, num_classes=10,
                            use_scale_shift_norm=True, resblock_updown=True), (3, 8, 8), None, 10, None)}


def test_model_specs_sd15_shape():
    kw, chw, ctx, _ncls, dcfg = unet.model_specs(full=True)["sd15-approx"]
    assert (kw["model_channels"], kw["channel_mult"], kw["num_res_blocks"], kw["num_heads"]) == (320, (1, 2, 4, 4), 2, 8)
    assert chw == (4, 64, 64) and ctx == (77, 768) and dcfg["block_out_channels"] == (320, 640, 1280, 1280)


def test_unet_run_tiny():
    rows, out = unet.run("cpu", quick=True, compile_="auto", out="", verbose=False, batches=(1,), steps=2, reps=1,
                         specs=MICRO, diffusers=True)
    assert out == ""
    _check_rows(rows, "unet_step", ["eager", "fastdiff"])
    assert {r["op"] for r in rows} == {"unet_step", "sampling"}
    assert not any(r["provider"].startswith("compile") for r in rows)  # "auto" skips compile in a CPU quick run
    for r in rows:
        assert r["images_per_s"] > 0 and r["flops_per_image"] > 0 and 0 < r["pct_peak"]
        assert "8x8" in r["case"] and ("ctx7x16" in r["case"] or "10 classes" in r["case"])
        if r["provider"] != "diffusers":
            assert r["op"] == "sampling" or r["rel_err_vs_eager"] < 1e-3  # fp32: the fused layers agree
    assert [r for r in rows if r["op"] == "sampling"][0]["steps"] == 2
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return
    assert {"diffusers"} <= {r["provider"] for r in rows if r["op"] == "sampling"}


def test_report_markdown_plots_and_compare(tmp_path):
    base = dict(dtype="float32", layout=None, device="cpu", p20_ms=1.0, p80_ms=1.0, shape=[1], torch="x",
                triton=None, cuda=None, commit="abc", date="d", pct_peak=1.0, tflops=1.0)
    rows = [dict(base, op="sampling", case="m B1", provider="eager", median_ms=10.0, images_per_s=100.0),
            dict(base, op="sampling", case="m B1", provider="fastdiff", median_ms=5.0, images_per_s=200.0)]
    md = report.markdown(rows)
    assert "fastdiff vs eager" in md and "2.00x" in md and "img/s" in md and "% of copy" not in md
    gn = [dict(base, op="group_norm", case="g", provider=p, median_ms=ms, copy_ms=0.5, pct_copy=50 / ms)
          for p, ms in (("eager", 2.0), ("fastdiff-cpu", 0.625))]
    md = report.markdown(gn)
    assert "fastdiff-cpu % of copy" in md and "| 80% |" in md and "3.20x" in md
    pytest.importorskip("matplotlib")
    pngs = report.plots(rows, str(tmp_path))
    assert any("images-per-s" in os.path.basename(p) for p in pngs) and all(os.path.exists(p) for p in pngs)
    assert "| sampling | m B1 | float32 | cpu | eager | 2.00x | 1.6x | yes |" in report.targets(rows)
    slower = [dict(r, median_ms=r["median_ms"] * 1.2) for r in rows]
    lines, regs = report.compare(rows, slower)
    assert len(lines) == 2 and len(regs) == 2


def test_cli_bench_compare(monkeypatch, tmp_path, capsys):
    """`fastdiff bench --compare OLD.json`: prints the change and exits 1 on a regression over 5%, 0 otherwise."""
    row = dict(op="group_norm", case="c", dtype="float32", layout="nchw", provider="eager", device="cpu",
               median_ms=1.0, p20_ms=1.0, p80_ms=1.0)
    old = tmp_path / "old.json"
    old.write_text(json.dumps([row]))

    class Fake:
        def __init__(self, ms):
            self.ms = ms

        def run(self, **kw):
            return [dict(row, median_ms=self.ms)], ""

    for ms, code in ((1.2, 1), (1.01, 0)):
        monkeypatch.setattr(cli, "_bench_plan", lambda op, ms=ms: [("group_norm", Fake(ms), {})])
        assert cli.main(["bench", "--op", "group_norm", "--quick", "--out", "", "--compare", str(old)]) == code
    assert "REGRESSION" not in capsys.readouterr().out.split("regression(s)")[-1]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["bench", "--op", "group_norm", "--out", "", "--compare", str(bad)]) == 2


def test_cli_ops_registered():
    assert set(cli.BENCH_OPS) == {"group_norm", "attention", "sampler_step", "unet_step", "sampling"}
    labels = [label for label, _, _ in cli._bench_plan(None)]
    assert labels == ["group_norm", "attention", "sampler_step", "unet_step + sampling"]


def test_cli_bench_subprocess():
    """`fastdiff bench --op group_norm --quick --no-compile --out ''` exits 0 (a real, short CPU run)."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "fastdiff.cli", "bench", "--op", "group_norm", "--quick",
                        "--no-compile", "--out", ""], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| group_norm |" in p.stdout and "wrote" not in p.stdout


def test_cli_bench_out_file_keeps_every_module_rows(monkeypatch, tmp_path, capsys):
    """`fastdiff bench --out FILE` with every op: FILE holds the rows of every module, not only the last one's
    (each module used to be handed FILE and overwrite it in turn)."""
    from fastdiff import _bench

    class Fake:  # writes `out` as the real modules do
        def __init__(self, op):
            self.op = op

        def run(self, out=None, **kw):
            rows = [dict(op=self.op, case="c", shape=[1], dtype="float32", layout=None, provider="eager",
                         device="cpu", median_ms=1.0, p20_ms=1.0, p80_ms=1.0)]
            if out:
                _bench.write_rows(rows, out)
            return rows, out

    plan = [(op, Fake(op), {}) for op in ("group_norm", "attention", "sampler_step", "unet_step")]
    monkeypatch.setattr(cli, "_bench_plan", lambda op: plan)
    path = tmp_path / "all.json"
    assert cli.main(["bench", "--quick", "--no-compile", "--device", "cpu", "--out", str(path)]) == 0
    assert sorted(r["op"] for r in json.loads(path.read_text())) == ["attention", "group_norm", "sampler_step",
                                                                      "unet_step"]
    assert capsys.readouterr().out.count(f"wrote 4 rows to {path}") == 1


def test_cli_bench_unet_ops_write_their_own_files(monkeypatch, tmp_path):
    """`fastdiff bench --op unet_step` and `--op sampling` write <op>.json each (both used to replace unet.json),
    and a rerun replaces its own rows without touching the others."""
    import functools

    from fastdiff import _bench

    monkeypatch.setattr(_bench, "results_dir", lambda device: str(tmp_path))
    monkeypatch.setattr(unet, "run", functools.partial(unet.run, specs={"adm-micro": MICRO["adm-micro"]},
                                                       batches=(1,), steps=1, reps=1, diffusers=False, verbose=False))
    for op in ("unet_step", "sampling", "unet_step"):
        assert cli.main(["bench", "--op", op, "--quick", "--no-compile", "--device", "cpu"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["sampling.json", "unet_step.json"]
    for op in ("unet_step", "sampling"):
        rows = json.loads((tmp_path / f"{op}.json").read_text())
        assert {r["op"] for r in rows} == {op} and len(rows) == 2  # eager and fastdiff, once each


def test_flop_count_includes_sdpa_attention_like_fastdiff():
    """The U-Net benchmark's FLOP count: diffusers' attention (F.scaled_dot_product_attention, whose fused CPU
    kernel FlopCounterMode counted as 0) counts the same FLOPs as fastdiff's eager attention (two matmuls) for the
    same attention layer, so the diffusers rows' TFLOP/s and MFU are comparable."""
    import torch.nn.functional as F

    from fastdiff.nn import Attention

    B, H, S, Sk, D, C, Dc = 1, 2, 64, 7, 32, 64, 16
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    with torch.no_grad():
        assert unet.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * B * H * S * S * D
    inner = H * D
    want = 2 * B * (S * C * inner + 2 * Sk * Dc * inner + inner * C * S) + 4 * B * H * S * Sk * D
    x, ctx = torch.randn(B, S, C), torch.randn(B, Sk, Dc)
    fd = Attention(C, context_dim=Dc, heads=H, dim_head=D).eval()
    with torch.no_grad(), fastdiff.set_backend("torch"):
        assert unet.count_flops(lambda: fd(x, ctx)) == want
    diffusers_attention = pytest.importorskip("diffusers.models.attention_processor")
    da = diffusers_attention.Attention(C, cross_attention_dim=Dc, heads=H, dim_head=D).eval()
    with torch.no_grad():
        assert unet.count_flops(lambda: da(x, encoder_hidden_states=ctx)) == want


def _record_compiles(monkeypatch):
    """torch.compile with a recording backend (no Inductor) and the recompile limit lowered to 2: returns the
    list of compiled graphs, each True where the graph has symbolic (dynamic) sizes."""
    import torch._dynamo

    graphs = []

    def backend(gm, example_inputs):
        # a dynamic graph takes its sizes as SymInt inputs (or, in some versions, tensors of symbolic sizes)
        graphs.append(any(isinstance(t, torch.SymInt) or isinstance(t, torch.Tensor) and any(
            isinstance(s, torch.SymInt) for s in t.shape) for t in example_inputs))
        return gm.forward

    real = torch.compile

    def compile_(fn=None, *a, **kw):
        kw["backend"] = backend
        kw.pop("mode", None)
        return real(fn, *a, **kw)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 2)
    return graphs


def test_compile_providers_time_a_static_graph_per_shape(monkeypatch):
    """The `compile` rows of attention and the sampler step: Dynamo's default compiled the second shape with
    dynamic sizes (every later case timed that graph, not the specialised one a fixed-shape user gets), and
    past the recompile limit it would run eager code under the name `compile`. Now one static graph per case."""
    graphs = _record_compiles(monkeypatch)
    cases = [(1, 2, s, s, 8, "tiny") for s in (16, 24, 32)]
    attention.run("cpu", [torch.float32], quick=True, compile_=True, out="", verbose=False, reps=1,
                  cases=cases)
    assert graphs == [False] * len(cases)
    torch._dynamo.reset()
    graphs.clear()
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 2)  # attention.run raised it
    shapes = [(1, 4, 8, 8), (1, 4, 8, 12), (2, 4, 8, 8)]
    sampler.run("cpu", quick=True, compile_=True, out="", verbose=False, shapes=shapes, loop_steps=1,
                loop_shape=(1, 4, 8, 8))
    assert graphs == [False] * (5 * len(shapes))  # ddim, ddpm, dpmpp, flow, unipc: one static graph per shape
    torch._dynamo.reset()


@pytest.mark.parametrize("backward", [False, True])
def test_group_norm_bytes_count_the_parameters(backward):
    """GB/s counts the bytes a perfect kernel must move: x and the four parameters (weight, bias: C; scale,
    shift: N*C) read, y written; a training step reads x and grad_y, writes grad_x, reads the parameters again
    and writes their gradients. The parameters were left out (x's bytes only): GB/s and % of peak understated
    by 0.1% on 64x64 maps, 2-3% on the 8x8 ones and 60% here (one value per channel)."""
    N, C, HW = 2, 64, 1
    rows, _ = group_norm.run("cpu", quick=True, compile_=False, layouts=("nchw",), out="", verbose=False,
                             shapes=[("tiny", (N, C, HW))], backward=backward)
    xb, pb = N * C * HW * HW * 4, (2 * C + 2 * N * C) * 4
    want = 5 * xb + 3 * pb if backward else 2 * xb + pb
    for r in rows:
        assert r["gbps"] * 1e9 * r["median_ms"] * 1e-3 == pytest.approx(want, rel=1e-9)


def _run_all():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", os.path.join(ROOT, "benchmarks", "run_all.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --report-only of another machine's folder names that machine (it took the title from the machine running it) and
# measures nothing; bad arguments are one line and exit code 2 (they were tracebacks); a --compare that compares
# nothing is refused (it passed, as a CI gate, whatever changed).
def test_run_all_report_only_and_its_errors(tmp_path, capsys):
    import shutil

    run_all = _run_all()
    src = os.path.join(ROOT, "benchmarks", "results", "amd-epyc-2-threads")
    folder = tmp_path / "amd"
    shutil.copytree(src, folder)
    assert run_all.main(["--report-only", "--out-dir", str(folder)]) == 0
    assert (folder / "REPORT.md").read_text().splitlines()[0] == "# Benchmark results: AMD EPYC (2 threads)"
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]
    assert "peak" not in capsys.readouterr().out.split("wrote")[0]  # no copy / matmul peak measured
    (tmp_path / "empty").mkdir()
    (tmp_path / "e.json").write_text("{}")
    for argv, needle in ((["--out-dir", str(tmp_path / "missing")], "--out-dir: "),
                         (["--out-dir", str(tmp_path / "empty")], "no benchmark rows in it"),
                         (["--out-dir", str(folder), "--compare", str(tmp_path / "e.json")], "--compare: "),
                         (["--out-dir", str(folder), "--compare", str(tmp_path / "nope.json")], "no such file"),
                         (["--out-dir", str(folder), "--compare", str(folder)], "--report-only runs nothing"),
                         (["--out-dir", str(folder), "--threads", "-3"], "--threads: "),
                         (["--out-dir", str(folder), "--threshold", "nan"], "--threshold: ")):
        assert run_all.main(["--report-only"] + argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("run_all.py: error: ") and needle in err and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a device this machine lacks")
def test_bench_refuses_a_missing_device_and_out_folder_in_one_line(tmp_path, capsys):
    # --device cuda without a GPU was torch's "Found no NVIDIA driver" traceback (exit 1) from fastdiff bench,
    # run_all.py and the bench_<op>.py scripts; bench --out into a missing folder created the folders
    needle = "--device: cuda was asked for but torch sees no CUDA device"
    assert cli.main(["bench", "--device", "cuda", "--op", "group_norm", "--quick"]) == 2
    assert needle in capsys.readouterr().err
    for mod in (group_norm, unet, sampler):
        assert mod.main(["--device", "cuda", "--quick"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    missing = tmp_path / "typo" / "rows.json"
    assert cli.main(["bench", "--op", "group_norm", "--quick", "--out", str(missing)]) == 2
    assert "--out: no such directory" in capsys.readouterr().err and not missing.parent.exists()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "run_all.py"), "--device", "cuda",
                        "--quick"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
