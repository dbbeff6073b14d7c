"""The `fastdiff` command: --help for every subcommand, one-line errors with exit code 2, sample / train / eval."""
import os
import subprocess
import sys

import numpy as np
import torch
import pytest

import fastdiff
from fastdiff import cli, pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["info", "train", "sample", "eval", "bench", "demo"]


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTDIFF_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fastdiff.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: fastdiff {command}" in capsys.readouterr().out


def test_bad_argument_subprocess_one_line():
    r = run_cli("sample", "--steps", "zero")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--steps" in r.stderr


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--n", "0"], "--n"),
    (["sample", "--sampler", "nope"], "--sampler"),
    (["sample", "--dtype", "fp8"], "--dtype"),
    (["sample", "--classes", ","], "--classes"),
    (["nosuchcommand"], "invalid choice"),
    (["train"], "--out"),
    (["train", "--image-size", "0", "--out", "unused-run"], "--image-size"),  # was silently the default
    (["sample", "--guidance", "nan", "--out", "x.npz"], "--guidance"),  # NaN samples with exit 0 before
])
def test_bad_arguments(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--checkpoint", "/no/such/run"], "/no/such/run"),
    (["sample", "--out", "grid.jpg"], "--out"),
    (["sample", "--out", "/no/such/dir/x.png"], "--out"),
    (["sample", "--classes", "12", "--n", "1", "--steps", "1"], "--classes"),
    (["sample", "--classes", "a,b", "--n", "1", "--steps", "1"], "--classes"),  # the bundled model saved no names
    (["sample", "--device", "nonsense"], "device"),
    (["eval", "--checkpoint", "/no/such/run"], "/no/such/run"),
    (["train", "--dataset", "/no/such/folder", "--out", "/tmp/unused-fastdiff-run"], "--dataset"),
    # the rescaled linear betas' limit, named by what the user set (it used to blame beta_end, never set)
    (["train", "--num-timesteps", "10", "--out", "unused-run"], "--num-timesteps"),
    # refused before any sampling or training (they used to fail after it, or write NaN samples)
    (["eval", "--json", "/no/such/dir/r.json"], "--json"),
    (["train", "--out", "a_file", "--steps", "1"], "--out"),
    (["train", "--device", "bogus", "--out", "unused-run"], "--device"),
])
def test_bad_inputs_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unreadable_checkpoint(tmp_path, capsys):
    (tmp_path / "checkpoint.json").write_text("{not json")
    assert cli.main(["sample", "--checkpoint", str(tmp_path), "--quiet"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    d = tmp_path / "notdir"
    d.mkdir()
    assert cli.main(["sample", "--checkpoint", str(d), "--quiet"]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_bundled_checkpoint_loads():
    model = pretrained.load()
    assert model.num_classes == 10 and model.null_class_id == 10 and model.image_size == 16
    assert next(model.parameters()).dtype.is_floating_point and next(model.parameters()).dtype.itemsize == 4
    assert os.path.getsize(os.path.join(pretrained.BUNDLED_CHECKPOINT, "checkpoint.json")) > 0


def test_sample_png(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    assert cli.main(["sample", "--n", "2", "--steps", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out
    with Image.open(tmp_path / "samples.png") as im:
        # 10 rows of 2 columns of 16x16 images with 2-pixel padding, upscaled 4x
        assert im.size == (4 * (2 * 18 + 2), 4 * (10 * 18 + 2))


@pytest.mark.parametrize("command", ["sample", "info"])
def test_commands_that_run_models_keep_freed_heap_blocks(tmp_path, monkeypatch, command):
    from fastdiff import _bench

    calls = []
    monkeypatch.setattr(_bench, "warm_cpu_heap", lambda: calls.append(1))
    monkeypatch.chdir(tmp_path)
    argv = ["sample", "--n", "1", "--steps", "1", "--quiet"] if command == "sample" else [command]
    assert cli.main(argv) == 0
    assert len(calls) == (1 if command == "sample" else 0)


def test_sample_npz(tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert cli.main(["sample", "--classes", "1,7", "--n", "3", "--steps", "3", "--sampler", "ddim",
                     "--guidance", "1", "--out", str(out), "--quiet"]) == 0
    d = np.load(out)
    assert d["samples"].shape == (6, 1, 16, 16) and d["samples"].dtype == np.float32
    assert d["labels"].tolist() == [1, 1, 1, 7, 7, 7]
    assert d["images"].shape == (6, 1, 16, 16) and d["images"].dtype == np.uint8
    assert np.abs(d["samples"]).max() <= 1.0
    # the same seed gives the same samples
    out2 = tmp_path / "s2.npz"
    assert cli.main(["sample", "--classes", "1,7", "--n", "3", "--steps", "3", "--sampler", "ddim",
                     "--guidance", "1", "--out", str(out2), "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(out2)["samples"], d["samples"])


def test_train_then_resume_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train", "--dataset", "digits", "--out", str(run), "--batch-size", "4", "--model-channels", "8",
              "--channel-mult", "1", "--num-res-blocks", "1", "--num-groups", "4", "--attention-resolutions", "",
              "--cfg-dropout", "0.1", "--log-every", "1", "--quiet"]
    assert cli.main(common + ["--steps", "2"]) == 0
    assert (run / "checkpoint.json").is_file()
    import json

    assert json.loads((run / "checkpoint.json").read_text())["step"] == 2
    assert cli.main(common + ["--steps", "3"]) == 0  # resumes
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 3
    out = tmp_path / "x.npz"
    assert cli.main(["sample", "--checkpoint", str(run), "--n", "1", "--steps", "2", "--out", str(out),
                     "--quiet"]) == 0
    assert np.load(out)["samples"].shape == (10, 1, 16, 16)
    # a resume with other training flags, or other data sizes, is refused (it kept its own, silently)
    before = (run / "checkpoint.json").read_text()
    assert cli.main(common + ["--steps", "4", "--lr", "0.5", "--save-every", "1"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5 (the run has 0.0002)" in err and "--save-every" not in err  # (an interval may change)
    assert cli.main(common + ["--steps", "4", "--image-size", "8"]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert (run / "checkpoint.json").read_text() == before


def _tiny_run(tmp_path, name, out_channels=1, autoencoder=None, **config):
    """A one-step class-conditional run on 8x8 greyscale data (or in `autoencoder`'s latent space)."""
    import torch

    from fastdiff.models import UNet
    from fastdiff.training import TensorImageDataset, Trainer

    torch.manual_seed(0)
    data = TensorImageDataset(torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 3)
    ch, size = (1, 8) if autoencoder is None else (autoencoder.latent_channels, 8 // autoencoder.downsample_factor)
    unet = UNet(size, ch, 8, out_channels * ch, 1, (), channel_mult=(1, 2), num_classes=3, learn_null_class=True,
                num_groups=4)
    kw = {"autoencoder": autoencoder} if autoencoder is not None else {}
    trainer = Trainer(unet, data, steps=1, batch_size=4, out_dir=str(tmp_path / name), **kw, **config)
    trainer.train()
    return str(tmp_path / name), trainer


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sampler_schedule_is_the_training_schedule(tmp_path, schedule):
    # training rescales "linear" betas to T steps (ADM); the sampler of a T=100 run must use the same betas
    import torch

    d, trainer = _tiny_run(tmp_path, "run", num_train_timesteps=100, beta_schedule=schedule)
    for name in ("ddpm", "ddim", "euler", "dpmsolver++"):
        s = pretrained.make_sampler(name, checkpoint=d)
        assert s.schedule.num_train_timesteps == 100
        torch.testing.assert_close(s.schedule.alphas_cumprod, trainer.schedule.alphas_cumprod, rtol=0, atol=0)


def test_sample_learned_variances(tmp_path, capsys):
    # a --learn-sigma checkpoint (out_channels = 2 x in_channels) samples with every sampler: DDPM reads the
    # variance channels (learned_range); DDIM, Euler and DPM-Solver++ give what its C mean channels alone give
    import torch

    d, trainer = _tiny_run(tmp_path, "run", out_channels=2)
    model = pretrained.load(d)
    assert pretrained.make_sampler("ddpm", checkpoint=d).config["variance_type"] == "learned_range"
    assert pretrained.make_sampler("dpmsolver++", model).config["variance_type"] == "learned_range"

    class MeanOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.in_channels, self.out_channels = m, m.in_channels, m.in_channels
            self.image_size, self.num_classes, self.null_class_id = m.image_size, m.num_classes, m.null_class_id

        def forward(self, x, t, **kw):
            return self.m(x, t, **kw)[:, :self.in_channels]

    for name in ("ddpm", "ddim", "euler", "dpmsolver++"):
        for guidance in (1.0, 2.0):
            kw = dict(sampler=name, steps=3, guidance=guidance, classes=[0, 2], n=2, checkpoint=d)
            x, y, _ = pretrained.generate(model, **kw)
            assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all() and y.tolist() == [0, 0, 2, 2]
            if name != "ddpm":
                torch.testing.assert_close(x, pretrained.generate(MeanOnly(model), **kw)[0], rtol=0, atol=0)
    out = tmp_path / "x.npz"
    assert cli.main(["sample", "--checkpoint", d, "--sampler", "ddpm", "--steps", "2", "--n", "1", "--out", str(out),
                     "--quiet"]) == 0
    assert np.load(out)["samples"].shape == (3, 1, 8, 8)


def test_generate_restores_the_autoencoder_mode(tmp_path):
    # generate restored the U-Net's training mode but left a passed autoencoder in eval mode (its dropout off for
    # the rest of the caller's training); it must still decode in eval mode
    import torch

    from fastdiff.models import AutoencoderKL

    torch.manual_seed(0)
    ae = AutoencoderKL(in_channels=1, latent_channels=4, model_channels=8, channel_mult=(1, 2), num_groups=4,
                       dropout=0.5)
    d, _ = _tiny_run(tmp_path, "ldm", autoencoder=ae)
    model = pretrained.load(d)
    kw = dict(sampler="ddim", steps=2, classes=[0, 1], n=1, checkpoint=d)
    ae.eval()
    ref = pretrained.generate(model, autoencoder=ae, **kw)[0]
    ae.train()
    x = pretrained.generate(model, autoencoder=ae, **kw)[0]
    assert ae.training and all(m.training for m in ae.modules())
    torch.testing.assert_close(x, ref, rtol=0, atol=0)  # decoded without dropout all the same


def test_sample_latent_diffusion_decodes(tmp_path, capsys):
    # a latent-diffusion run (4x4x4 latents of 1x8x8 images): sample and generate decode the latents with the
    # autoencoder saved in the checkpoint, instead of writing the latents as images
    import torch
    from PIL import Image

    import fastdiff
    from fastdiff.models import AutoencoderKL

    torch.manual_seed(0)
    ae = AutoencoderKL(in_channels=1, latent_channels=4, model_channels=8, channel_mult=(1, 2), num_groups=4,
                       scale_factor=0.7)
    d, trainer = _tiny_run(tmp_path, "ldm", autoencoder=ae)
    model = pretrained.load(d)
    assert model.in_channels == 4 and model.image_size == 4
    dec = pretrained.load_autoencoder(d)
    assert dec.scale_factor == 0.7 and pretrained.load_autoencoder(None) is None
    assert pretrained.image_shape(model, dec) == (1, 8, 8)

    x, y, _ = pretrained.generate(model, sampler="ddim", steps=2, classes=[0, 1, 2], n=1, checkpoint=d)
    assert x.shape == (3, 1, 8, 8)
    sampler = pretrained.make_sampler("ddim", model, d)
    z = fastdiff.sample(model, sampler, (3, 4, 4, 4), y=y, seed=0, num_inference_steps=2, device="cpu",
                        dtype=torch.float32, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(x, dec.from_latent(z).clamp(-1, 1))
    z2, _, _ = pretrained.generate(model, sampler="ddim", steps=2, classes=[0, 1, 2], n=1, checkpoint=d,
                                   autoencoder=None)
    assert z2.shape == (3, 4, 4, 4)  # autoencoder=None: the latents themselves

    out = tmp_path / "x.npz"
    assert cli.main(["sample", "--checkpoint", d, "--steps", "2", "--n", "1", "--out", str(out), "--quiet"]) == 0
    assert np.load(out)["samples"].shape == (3, 1, 8, 8) and np.load(out)["images"].shape == (3, 1, 8, 8)
    png = tmp_path / "x.png"
    assert cli.main(["sample", "--checkpoint", d, "--steps", "2", "--n", "1", "--out", str(png), "--quiet",
                     "--scale", "1"]) == 0
    with Image.open(png) as im:
        assert im.size == (1 * (8 + 2) + 2, 3 * (8 + 2) + 2)


def test_eval_quick(capsys, tmp_path):
    js = tmp_path / "e.json"
    assert cli.main(["eval", "--quick", "--n", "3", "--steps", "4", "--quiet", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "floor" in out and "accuracy" in out
    import json

    r = json.loads(js.read_text())
    assert r["rows"][0]["n"] == 30 and 0 <= r["rows"][0]["accuracy"] <= 1 and r["rows"][0]["fd"] >= 0
    assert r["floor"]["accuracy"] > 0.95


def test_frechet_distance_matches_closed_form():
    from fastdiff.evaluation import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2 + 1
    # N(0, I) vs N(1, 4I): |mu|^2 + tr(I) + tr(4I) - 2 tr(2I) = 3 + 3 + 12 - 12 = 6
    assert abs(frechet_distance(a, b) - 6.0) < 0.4
    assert abs(frechet_distance(a, a)) < 1e-6


def test_digits_split_is_fixed_and_disjoint():
    from fastdiff.training.data import digits, digits_split_indices, load_dataset

    tr, te = digits_split_indices(1797, "train"), digits_split_indices(1797, "test")
    assert len(tr) == 1438 and len(te) == 359
    assert set(tr.tolist()).isdisjoint(te.tolist()) and len(set(tr.tolist()) | set(te.tolist())) == 1797
    assert (digits_split_indices(1797, "test") == te).all()
    assert len(load_dataset("digits:test", 16)) == 359 and digits(8, split="train").images.shape == (1438, 1, 8, 8)
    with pytest.raises(ValueError, match="split"):
        digits(16, split="val")


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fastdiff {fastdiff.__version__}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "fastdiff", "--version"], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == f"fastdiff {fastdiff.__version__}", p.stderr
    assert cli._count(1, "class", "classes") == "1 class" and cli._count(3, "sample") == "3 samples"


def test_info_says_which_cpu_kernels():
    info = fastdiff.info()
    if not info["cpu_extension"]:
        assert info["cpu_kernels"] is None
        return
    assert info["cpu_kernels"] in ("avx512", "portable")
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return
    if "avx512f" not in flags.split():  # an AVX-512 build would not even load here
        assert info["cpu_kernels"] == "portable"


def test_reference_features_follow_the_classifier_weights():
    # cached per classifier: a retrained (in-place updated) or a new classifier never gets stale features
    from fastdiff import evaluation

    clf = evaluation.load_classifier()
    a = evaluation.reference_features(clf)
    assert evaluation.reference_features(clf)[0] is a[0]  # cached while the weights are unchanged
    with torch.no_grad():
        next(clf.parameters()).mul_(0.5)
    b = evaluation.reference_features(clf)
    assert not np.allclose(a[0], b[0])


def test_generate_samples_in_eval_mode_and_restores_the_mode():
    # a model handed over in training mode (e.g. mid-training) is sampled without dropout, then left as it was
    import copy

    from fastdiff.models import UNet

    torch.manual_seed(0)
    unet = UNet(8, 1, 8, 1, 1, (), channel_mult=(1, 2), num_classes=3, learn_null_class=True, num_groups=4,
                dropout=0.5)
    with torch.no_grad():  # weights that make dropout matter
        for p in unet.parameters():
            p.normal_(0, 0.2)
    ref = copy.deepcopy(unet).eval()
    unet.train()
    kw = dict(sampler="ddim", steps=3, classes=[0, 1], n=1, seed=3)
    x = pretrained.generate(unet, **kw)[0]
    assert unet.training
    torch.testing.assert_close(x, pretrained.generate(ref, **kw)[0], rtol=0, atol=0)


def test_generate_rejects_nothing_to_sample():
    # n = 0, no classes, or a batch size of 0 name their argument (they raised range()'s "arg 3 must not be zero")
    from fastdiff.models import UNet

    unet = UNet(8, 1, 8, 1, 1, (), channel_mult=(1,), num_classes=3, num_groups=4)
    for kw, name in ((dict(n=0), "n"), (dict(n=-1), "n"), (dict(n=1.5), "n"), (dict(classes=[]), "classes"),
                     (dict(batch_size=0), "batch_size"), (dict(n=True), "n")):
        with pytest.raises(ValueError, match=f"^{name}: "):
            pretrained.generate(unet, **{"sampler": "ddim", "steps": 1, "classes": [0], "n": 1, **kw})


def test_generate_runs_channels_last_on_the_cpu_by_default():
    import copy

    import torch

    model = pretrained.load(None, device="cpu")
    nchw = copy.deepcopy(model)
    kw = dict(sampler="dpmsolver++", steps=3, guidance=2.0, classes=[1, 7], n=2, seed=5, device="cpu")
    def conv_weight(m):  # a convolution with input channels to lay out (one input channel: both layouts agree)
        return next(c.weight for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.weight.shape[1] > 1)

    x = pretrained.generate(model, **kw)[0]
    w = conv_weight(model)
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    ref = pretrained.generate(nchw, channels_last=False, **kw)[0]
    assert conv_weight(nchw).is_contiguous()
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-4)  # oneDNN's NHWC and NCHW convolutions round apart


def test_auto_dtype_is_bf16_on_a_cpu_with_amx(monkeypatch):
    import torch

    cpu = torch.device("cpu")
    for amx, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(pretrained, "cpu_has_amx_bf16", lambda amx=amx: amx)
        assert pretrained.resolve_dtype("auto", cpu) == want
        assert pretrained.resolve_dtype(None, cpu) == want
        assert pretrained.resolve_dtype("fp32", cpu) == torch.float32
        assert pretrained.resolve_dtype("bf16", cpu) == torch.bfloat16


def test_sample_npz_name_kept(tmp_path, capsys):
    out = tmp_path / "S.NPZ"  # numpy alone would write S.NPZ.npz
    assert cli.main(["sample", "--n", "1", "--classes", "0", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    assert out.is_file() and not (tmp_path / "S.NPZ.npz").exists()
    assert np.load(out)["samples"].shape == (1, 1, 16, 16)


def test_train_refuses_a_unet_run_as_autoencoder(tmp_path, capsys):
    d, _ = _tiny_run(tmp_path, "unet")
    assert cli.main(["train", "--autoencoder", d, "--out", str(tmp_path / "ldm"), "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--autoencoder" in err and "Traceback" not in err


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_steps_the_sampler_refuses_name_the_flag(tmp_path, capsys):
    # 1000 steps of the 1000-timestep model pass the "exceed the T timesteps" check, but DPM-Solver++ refuses the
    # schedule (two equal timesteps): the error named num_inference_steps, after loading, not the flag
    out = str(tmp_path / "x.npz")
    assert cli.main(["sample", "--n", "1", "--steps", "1000", "--out", out, "--quiet"]) == 2
    _one_line_error(capsys, "--steps: 1000 steps with --sampler dpmsolver++: the schedule gives non-finite")
    assert not os.path.exists(out)
    assert cli.main(["sample", "--n", "1", "--steps", "2", "--out", out, "--quiet"]) == 0


def test_device_spellings(tmp_path, capsys):
    # "cpu:0" is the CPU (safetensors refused it: a traceback); meta / mps / xpu where torch has none are refused
    # naming the argument (meta was a traceback, mps blamed the checkpoint)
    assert pretrained.resolve_device("cpu:0") == torch.device("cpu")
    out = tmp_path / "x.npz"
    assert cli.main(["sample", "--device", "cpu:0", "--n", "1", "--classes", "0", "--steps", "1", "--out", str(out),
                     "--quiet"]) == 0
    for dev in ("meta", "xpu") + (() if torch.backends.mps.is_available() else ("mps",)):
        assert cli.main(["sample", "--device", dev, "--n", "1", "--steps", "1", "--out", str(out), "--quiet"]) == 2
        _one_line_error(capsys, "device")


@pytest.mark.parametrize("name", ["euler_ancestral", "sde-dpmsolver++", "heun", "dpmsolver++3m", "sde-dpmsolver++3m",
                                  "unipc", "pndm", "lms", "deis", "kdpm2", "kdpm2_ancestral", "dpmsolver_singlestep",
                                  "dpmsolver_singlestep3", "dpmsolver_sde"])
def test_sample_with_the_new_samplers(name, tmp_path, capsys):
    from fastdiff.diffusion import (DEISSampler, DPMSolverPPSampler, DPMSolverSDESampler, DPMSolverSinglestepSampler,
                                    EulerAncestralSampler, HeunSampler, KDPM2AncestralSampler, KDPM2Sampler,
                                    LMSSampler, PNDMSampler, UniPCSampler)

    s = pretrained.make_sampler(name)
    cls = {"euler_ancestral": EulerAncestralSampler, "heun": HeunSampler, "unipc": UniPCSampler,
           "pndm": PNDMSampler, "lms": LMSSampler, "deis": DEISSampler, "kdpm2": KDPM2Sampler,
           "kdpm2_ancestral": KDPM2AncestralSampler, "dpmsolver_singlestep": DPMSolverSinglestepSampler,
           "dpmsolver_singlestep3": DPMSolverSinglestepSampler,
           "dpmsolver_sde": DPMSolverSDESampler}.get(name, DPMSolverPPSampler)
    assert type(s) is cls
    assert s._stochastic == name.startswith(("euler_ancestral", "sde-", "kdpm2_ancestral", "dpmsolver_sde"))
    if cls is DPMSolverSinglestepSampler:
        assert s.config["solver_order"] == (3 if name.endswith("3") else 2)
    if cls is DPMSolverPPSampler:
        assert s.config["solver_order"] == (3 if name.endswith("3m") else 2)
        assert s.config["algorithm_type"] == ("sde-dpmsolver++" if name.startswith("sde-") else "dpmsolver++")
    outs = []
    for seed in (0, 0, 1):
        out = tmp_path / f"s{len(outs)}.npz"
        assert cli.main(["sample", "--sampler", name, "--classes", "3", "--n", "2", "--steps", "3", "--seed",
                         str(seed), "--out", str(out), "--quiet"]) == 0
        outs.append(np.load(out)["samples"])
    assert name in capsys.readouterr().out
    assert np.isfinite(outs[0]).all() and np.abs(outs[0]).max() <= 1
    np.testing.assert_array_equal(outs[0], outs[1])  # the same seed, the same samples
    assert not np.array_equal(outs[0], outs[2])  # (another seed: other initial noise)


def test_sample_by_class_name(tmp_path, capsys):
    # a run on an image folder saves its subfolders' names: --classes takes them, the output shows and keeps them
    from fastdiff.models import UNet
    from fastdiff.training import TensorImageDataset, Trainer

    torch.manual_seed(0)
    data = TensorImageDataset(torch.rand(6, 1, 8, 8) * 2 - 1, torch.arange(6) % 3, class_names=["cat", "dog", "7"])
    unet = UNet(8, 1, 8, 1, 1, (), channel_mult=(1,), num_classes=3, learn_null_class=True, num_groups=4)
    run = str(tmp_path / "pets")
    Trainer(unet, data, steps=1, batch_size=3, out_dir=run).train()
    out = tmp_path / "s.npz"
    argv = ["sample", "--checkpoint", run, "--n", "1", "--steps", "1", "--guidance", "1", "--out", str(out), "--quiet"]
    capsys.readouterr()
    # "7" is class 2's name (a name wins over an id written the same way); 1 is an id
    assert cli.main(argv + ["--classes", "dog,7,1"]) == 0
    d = np.load(out)
    assert d["labels"].tolist() == [1, 2, 1] and d["class_names"].tolist() == ["cat", "dog", "7"]
    assert "rows: 1 dog, 2 7, 1 dog" in capsys.readouterr().out
    assert cli.main(argv + ["--classes", "cow"]) == 2
    _one_line_error(capsys, "--classes: 'cow' is not one of its class names (cat, dog, 7)")
    assert cli.main(argv + ["--classes", "3"]) == 2
    _one_line_error(capsys, "out of range")


def test_eval_refuses_a_checkpoint_of_other_classes(tmp_path, capsys):
    # a 16x16 greyscale run of 10 image-folder classes a..j was scored against the digits classifier, silently
    from fastdiff.models import UNet
    from fastdiff.training import TensorImageDataset, Trainer

    torch.manual_seed(0)
    data = TensorImageDataset(torch.rand(10, 1, 16, 16) * 2 - 1, torch.arange(10), class_names=list("abcdefghij"))
    unet = UNet(16, 1, 8, 1, 1, (), channel_mult=(1,), num_classes=10, learn_null_class=True, num_groups=4)
    Trainer(unet, data, steps=1, batch_size=4, out_dir=str(tmp_path / "letters")).train()
    assert pretrained.class_names(str(tmp_path / "letters")) == list("abcdefghij")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "letters"), "--quick", "--quiet"]) == 2
    _one_line_error(capsys, "classes are a, b")


@pytest.fixture
def no_work(monkeypatch):
    """Sampling and benchmarking fail the test: the errors below must come before any work."""
    def fail(*a, **k):
        raise AssertionError("ran before refusing the arguments")

    monkeypatch.setattr(pretrained, "generate", fail)
    monkeypatch.setattr(cli, "_bench_plan", fail)


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--out", "adir.png"], "--out"),  # IsADirectoryError after the sampling
    (["eval", "--json", "adir"], "--json"),  # after the whole evaluation (--table: an hour on the CPU)
    (["bench", "--op", "group_norm", "--out", "adir"], "--out"),  # after the whole benchmark
    (["bench", "--op", "group_norm", "--out", "a_file/x.json"], "--out"),
    (["bench", "--op", "group_norm", "--out", "bad.json"], "--out"),  # not a results file: not merged into
    (["bench", "--op", "group_norm", "--compare", "nokey.json"], "--compare"),  # was a KeyError traceback
    (["bench", "--op", "group_norm", "--compare", "numbers.json"], "--compare"),  # "0 regression(s)", exit 0
    (["bench", "--op", "group_norm", "--compare", "adir"], "--compare"),  # an empty folder: the same
    (["sample", "--steps", "1001", "--n", "1"], "--steps"),  # was "num_inference_steps: ..."
    (["eval", "--table", "--steps", "3"], "--table"),  # --sampler/--steps/--guidance were silently ignored
    (["eval", "--table", "--sampler", "ddim"], "--table"),
    (["eval", "--table", "--guidance", "2"], "--table"),
])
def test_refused_before_any_work(argv, needle, capsys, tmp_path, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.png").mkdir()
    (tmp_path / "a_file").write_text("")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nokey.json").write_text('{"a": 1}')
    (tmp_path / "numbers.json").write_text("[1, 2]")
    assert cli.main(argv + ["--quiet"] if argv[0] != "bench" else argv) == 2
    _one_line_error(capsys, needle)
    assert (tmp_path / "bad.json").read_text() == "{not json"


def test_bench_threshold_must_be_a_number(capsys, no_work):
    # nan made every comparison False: "0 regression(s)", exit 0, whatever the change
    for t in ("nan", "-0.1"):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", "--op", "group_norm", "--out", "", "--threshold", t])
        assert e.value.code == 2
        _one_line_error(capsys, "--threshold")


def test_out_of_memory_is_one_line(monkeypatch, capsys, tmp_path):
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 8000000000000 bytes. Error code 12")

    monkeypatch.setattr(pretrained, "generate", oom)
    assert cli.main(["sample", "--n", "1000", "--out", str(tmp_path / "x.npz"), "--quiet"]) == 2
    _one_line_error(capsys, "--batch-size")

    def bug(*a, **k):
        raise RuntimeError("some other error")

    monkeypatch.setattr(pretrained, "generate", bug)  # anything else is still a traceback (a bug to report)
    with pytest.raises(RuntimeError):
        cli.main(["sample", "--n", "1", "--out", str(tmp_path / "x.npz"), "--quiet"])


@pytest.mark.parametrize("name", ["old.png", "old.npz"])
def test_sample_replaces_its_output_whole_or_not_at_all(name, tmp_path, monkeypatch, capsys):
    # the output was opened (truncated) and then written: a failed or interrupted write lost the old file
    out = tmp_path / name
    out.write_bytes(b"previous samples")
    os.chmod(out, 0o640)

    def broken(*a, **k):
        (k["path"] if "path" in k else a[0]).write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "save_grid", broken)
    monkeypatch.setattr(np, "savez_compressed", broken)
    argv = ["sample", "--n", "1", "--classes", "0", "--steps", "1", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 130
    assert out.read_bytes() == b"previous samples" and os.listdir(tmp_path) == [name]
    monkeypatch.undo()
    assert cli.main(argv) == 0
    assert out.read_bytes()[:4] in (b"\x89PNG", b"PK\x03\x04") and os.stat(out).st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == [name]
