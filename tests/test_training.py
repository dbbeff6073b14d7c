"""fastdiff.training: losses, the variational bound, timestep samplers, data, trainers, checkpoints, CLI, DDP.

Small models and few steps: the file runs in about a minute or two on a shared 2-core CPU.
"""
import copy
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.distributed as dist

from fastdiff.models import AutoencoderKL, NoisyClassifier, UNet
from fastdiff.training import (AutoencoderTrainer, ClassifierTrainer, ImageFolder, ImportanceSampler,
                               TensorImageDataset, TrainConfig, Trainer, UniformSampler, bits_per_dim, digits,
                               load_autoencoder, load_model, min_snr_weight, q_sample, training_losses)
from fastdiff.training import checkpoint as ckpt
from fastdiff.training.losses import _make_schedule, coefs

try:
    import sklearn  # noqa: F401
    HAS_SKLEARN = True
except ImportError:
    HAS_SKLEARN = False
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="the digits dataset needs scikit-learn (pip install "
                                                           "scikit-learn)")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(**kw):
    args = dict(image_size=16, in_channels=1, model_channels=8, out_channels=1, num_res_blocks=1,
                attention_resolutions=(8,), channel_mult=(1, 2), num_groups=4)
    args.update(kw)
    return UNet(**args)


def synthetic(n=24, channels=1, size=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g) * 2 - 1
    return TensorImageDataset(x, torch.arange(n) % classes)


# -- schedules and losses --------------------------------------------------------------------------------------

def test_schedules():
    for kind in ("linear", "cosine"):
        s = _make_schedule(kind, 1000)
        b = s.betas
        assert b.shape == (1000,) and (b > 0).all() and (b < 1).all()
        assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()
    torch.testing.assert_close(_make_schedule("linear", 1000).betas[[0, -1]].double(),
                               torch.tensor([1e-4, 0.02], dtype=torch.float64))
    # linear is rescaled to T steps (ADM); cosine is the sampler's squaredcos_cap_v2
    torch.testing.assert_close(_make_schedule("linear", 250).betas[[0, -1]].double(),
                               torch.tensor([4e-4, 0.08], dtype=torch.float64))
    from fastdiff.diffusion import NoiseSchedule
    torch.testing.assert_close(_make_schedule("cosine", 100).betas,
                               NoiseSchedule(100, beta_schedule="squaredcos_cap_v2").betas)
    with pytest.raises(ValueError, match="beta_schedule"):
        _make_schedule("quadratic", 10)


def _oracle(schedule, x0, target):
    """A 'model' that returns the exact target, computed from x_t, t and the x0 it was built with."""
    c = coefs(schedule, x0.device)

    def model(x_t, t, **_):
        eps = (x_t - c("sqrt_ab", t, 4) * x0) / c("sqrt_1mab", t, 4)
        if target == "eps":
            return eps
        if target == "x0":
            return x0.expand_as(x_t)
        return c("sqrt_ab", t, 4) * eps - c("sqrt_1mab", t, 4) * x0

    return model


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_l_simple_targets(target):
    s = _make_schedule("linear", 1000)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    terms = training_losses(_oracle(s, x0, target), x0, t, s, target=target)
    assert terms["loss"].shape == (4,) and terms["mse"].max() < 1e-6
    zero = training_losses(lambda x_t, t: torch.zeros_like(x_t), x0, t, s, target=target)
    assert (zero["mse"] > 1e-3).all() and "vb" not in zero


def test_hybrid_loss_stop_gradient_and_weighting():
    s = _make_schedule("cosine", 100)
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    t = torch.tensor([0, 50, 99])
    mean_p = torch.randn(1, 2, 4, 4, requires_grad=True)
    var_p = torch.randn(1, 2, 4, 4, requires_grad=True)

    def model(x_t, t):
        return torch.cat([mean_p.expand(len(t), -1, -1, -1), torch.tanh(var_p).expand(len(t), -1, -1, -1)], 1)

    terms = training_losses(model, x0, t, s, lambda_vlb=1e-3)
    assert set(terms) == {"loss", "mse", "vb"}
    torch.testing.assert_close(terms["loss"], terms["mse"] + 1e-3 * 100 * terms["vb"])
    terms["vb"].sum().backward()
    assert mean_p.grad is None or mean_p.grad.abs().sum() == 0  # L_vlb trains the variances only
    assert var_p.grad.abs().sum() > 0
    var_p.grad = None
    training_losses(model, x0, t, s)["mse"].sum().backward()
    assert var_p.grad is None or var_p.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="output channels"):
        training_losses(lambda x_t, t: torch.zeros(3, 3, 4, 4), x0, t, s)


def test_min_snr_weighting():
    snr = torch.tensor([0.1, 1.0, 5.0, 100.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.05]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "x0"), torch.tensor([0.1, 1.0, 5.0, 5.0]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"), torch.tensor([0.1 / 1.1, 0.5, 5 / 6, 5 / 101]))
    s = _make_schedule("linear", 1000)
    x0, t, noise = torch.rand(4, 1, 4, 4), torch.tensor([0, 100, 500, 999]), torch.randn(4, 1, 4, 4)

    def zero(x_t, t):
        return torch.zeros_like(x_t)

    plain = training_losses(zero, x0, t, s, noise=noise)["loss"]
    weighted = training_losses(zero, x0, t, s, noise=noise, min_snr_gamma=5.0)["loss"]
    ab = s.alphas_cumprod[t].float()
    torch.testing.assert_close(weighted, plain * min_snr_weight(ab / (1 - ab), 5.0, "eps"))


def test_bits_per_dim():
    s = _make_schedule("cosine", 12)
    x0 = (torch.randint(0, 256, (2, 1, 4, 4)).float() / 127.5 - 1)
    g = torch.Generator().manual_seed(0)
    good = bits_per_dim(_oracle(s, x0, "eps"), x0, s, generator=g)
    bad = bits_per_dim(lambda x_t, t: torch.zeros_like(x_t), x0, s, generator=torch.Generator().manual_seed(0))
    assert good["vb"].shape == (2, 12) and good["total_bpd"].shape == (2,)
    torch.testing.assert_close(good["total_bpd"], good["vb"].sum(1) + good["prior_bpd"])
    assert torch.isfinite(good["total_bpd"]).all() and (good["total_bpd"] > 0).all()
    assert (good["total_bpd"] < bad["total_bpd"]).all()
    assert good["mse"].max() < 1e-4
    # learned variances: the half of the channels after the mean
    learned = bits_per_dim(lambda x_t, t: torch.cat([_oracle(s, x0, "eps")(x_t, t), torch.zeros_like(x_t)], 1), x0,
                           s, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(learned["total_bpd"]).all()


def test_timestep_samplers():
    g = torch.Generator().manual_seed(0)
    t, w = UniformSampler(10).sample(1000, generator=g)
    assert t.min() >= 0 and t.max() <= 9 and torch.allclose(w, torch.ones(1000))
    s = ImportanceSampler(4, history=2)
    torch.testing.assert_close(s.probs(), torch.full((4,), 0.25, dtype=torch.float64))  # uniform until warm
    for _ in range(3):
        s.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert s.warmed_up()
    p = s.probs()
    assert (p[1:] > p[:-1]).all() and math.isclose(float(p.sum()), 1.0)
    t, w = s.sample(8, generator=g)
    torch.testing.assert_close(w, (1 / (4 * p[t])).float())
    s2 = ImportanceSampler(4, history=2)
    s2.load_state_dict(s.state_dict())
    torch.testing.assert_close(s2.probs(), p)


def test_q_sample():
    s = _make_schedule("linear", 1000)
    x0, noise = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t = torch.tensor([0, 999])
    ab = s.alphas_cumprod[t].float().reshape(2, 1, 1, 1)
    torch.testing.assert_close(q_sample(s, x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


# -- data --------------------------------------------------------------------------------------------------------

@needs_sklearn
def test_digits():
    d = digits(16)
    assert len(d) == 1797 and d.images.shape == (1797, 1, 16, 16) and d.num_classes == 10
    assert d.images.min() >= -1 and d.images.max() <= 1 and d.images.std() > 0.3
    assert sorted(d.labels.unique().tolist()) == list(range(10))
    assert digits(8).images.shape == (1797, 1, 8, 8)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (tmp_path / "labelled" / cls).mkdir(parents=True)
        for i in range(2):
            arr = (torch.rand(20, 30, 3, generator=rng) * 255).byte().numpy()
            Image.fromarray(arr).save(tmp_path / "labelled" / cls / f"{i}.png")
    (tmp_path / "flat").mkdir()
    Image.fromarray((torch.rand(40, 40, generator=rng) * 255).byte().numpy()).save(tmp_path / "flat" / "a.jpg")
    d = ImageFolder(str(tmp_path / "labelled"), 8)
    assert len(d) == 4 and d.num_classes == 2 and d.class_names == ["cat", "dog"]
    x, y = d[3]
    assert x.shape == (3, 8, 8) and y == 1 and x.min() >= -1 and x.max() <= 1
    flat = ImageFolder(str(tmp_path / "flat"), 8, channels=1)
    assert flat.num_classes == 0 and flat[0][0].shape == (1, 8, 8) and flat[0][1] == -1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(str(tmp_path / "empty"), 8)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolder(str(tmp_path / "missing"), 8)


# -- the trainer ----------------------------------------------------------------------------------------------------

@needs_sklearn
def test_training_on_digits_lowers_the_loss():
    torch.manual_seed(0)
    data = digits(16)
    model = UNet(16, 1, 16, 1, 1, (8,), channel_mult=(1, 2), num_classes=10, num_groups=8, learn_null_class=True)
    trainer = Trainer(model, data, steps=60, batch_size=16, lr=2e-3, cfg_dropout=0.1, log_every=10, seed=0)
    # a fixed evaluation batch: same images, timesteps and noise before and after
    g = torch.Generator().manual_seed(123)
    idx = torch.randperm(len(data), generator=g)[:64]
    x0, y = data.images[idx], data.labels[idx]
    t = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            model.eval()
            return float(training_losses(model, x0, t, trainer.schedule, noise=noise,
                                         model_kwargs={"y": y})["loss"].mean())

    before = eval_loss()
    history = trainer.train()
    after = eval_loss()
    losses = [row["loss"] for row in history]
    print(f"\ndigits: eval loss {before:.4f} -> {after:.4f}; training loss per 10 steps "
          f"{[round(v, 4) for v in losses]}")
    assert len(history) == 6 and history[-1]["step"] == 60
    assert after < 0.5 * before
    assert losses[-1] < 0.5 * losses[0]
    assert all(math.isfinite(r["grad_norm"]) for r in history)


def _state(trainer):
    opt = trainer.opt.state_dict()["state"]
    return {
        "step": trainer.step,
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "ema": {k: v.clone() for k, v in trainer.ema.state_dict().items()},
        "opt": {(i, n): v.clone() for i, st in opt.items() for n, v in st.items()},
        "sampler": {k: v.clone() for k, v in trainer.sampler.state_dict().items()},
        "rng": torch.get_rng_state(),
        "history": list(trainer.history),
    }


def _assert_same(a, b):
    assert a["step"] == b["step"] and a["history"] == b["history"]
    for key in ("model", "ema", "opt", "sampler"):
        assert a[key].keys() == b[key].keys(), key
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert torch.equal(a["rng"], b["rng"])


RESUME_CFG = dict(steps=6, batch_size=4, lr=1e-3, cfg_dropout=0.25, timestep_sampler="importance", ema_decay=0.9,
                  grad_clip=0.5, warmup_steps=3, log_every=2, seed=7)


def _resume_model():
    return tiny_unet(num_classes=3, learn_null_class=True, out_channels=2, dropout=0.2)


def _straight_state_and_first_trainer(data, out_dir):
    """The state of an uninterrupted RESUME_CFG run, and a fresh trainer of the same run writing to out_dir."""
    torch.manual_seed(0)
    straight = Trainer(_resume_model(), data, **RESUME_CFG)
    straight.train()
    expected = _state(straight)
    torch.manual_seed(0)
    return expected, Trainer(_resume_model(), data, out_dir=out_dir, **RESUME_CFG)


def test_checkpoint_resume_reproduces_the_state(tmp_path):
    data = synthetic()
    expected, first = _straight_state_and_first_trainer(data, str(tmp_path))
    first.train(3)  # saves at the end
    torch.manual_seed(999)  # the resumed run must not depend on the state of this process
    resumed = Trainer.from_checkpoint(str(tmp_path), data)
    assert resumed.step == 3
    resumed.train()
    _assert_same(_state(resumed), expected)

    # the files: one tensors file, the JSON naming it, no temporary files left behind
    files = sorted(os.listdir(tmp_path))
    assert files == ["checkpoint.json", "ckpt-000000006.safetensors"], files
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["step"] == 6 and meta["model"]["class"] == "UNet" and meta["train_config"]["lr"] == 1e-3
    ema_model = load_model(str(tmp_path))
    for k, v in ema_model.state_dict().items():
        assert torch.equal(v, expected["ema"][k])
    raw = load_model(str(tmp_path), ema=False)
    for k, v in raw.state_dict().items():
        assert torch.equal(v, expected["model"][k])


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    data = synthetic()
    trainer = Trainer(tiny_unet(), data, batch_size=4, out_dir=str(tmp_path), log_every=1)
    trainer.train(1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()

    st = ckpt._safetensors()
    real = st.save_file

    def crash(tensors, path, metadata=None):
        real(dict(list(tensors.items())[:3]), path, metadata=metadata)  # a partial write...
        raise KeyboardInterrupt  # ...then the process is interrupted

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json", "ckpt-000000001.safetensors"]
    back = Trainer.from_checkpoint(str(tmp_path), data)
    assert back.step == 1
    for k, v in back.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_new_trainer_refuses_to_replace_a_run(tmp_path):
    # a fresh Trainer pointed at a folder holding a run used to replace it at its first save (deleting the old
    # tensors file); now only a trainer resumed from that folder may write there
    data = synthetic()
    d = str(tmp_path / "run")
    Trainer(tiny_unet(), data, batch_size=4, out_dir=d).train(3)
    before = {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)}
    assert sorted(before) == ["checkpoint.json", "ckpt-000000003.safetensors"]
    fresh = Trainer(tiny_unet(), data, batch_size=4, save_every=1, out_dir=d)
    with pytest.raises(ValueError, match=r"out_dir: .*run' already holds a training run at step 3.*from_checkpoint"):
        fresh.train(2)
    assert fresh.step == 0  # refused before any work
    with pytest.raises(ValueError, match="out_dir: .*already holds"):
        fresh.save()
    with pytest.raises(ValueError, match="directory: .*already holds"):
        Trainer(tiny_unet(), data, batch_size=4).save(d)
    assert {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)} == before  # intact

    # resuming is how to continue: from_checkpoint, or resume() on a trainer built with that out_dir
    back = Trainer.from_checkpoint(d, data)
    back.train(4)
    assert ckpt.load_meta(d)["step"] == 4
    again = Trainer(tiny_unet(), data, batch_size=4, out_dir=d).resume()
    again.train(5)
    again.save()  # its own run: saving twice is fine
    assert ckpt.load_meta(d)["step"] == 5
    # a resumed run may not write into another run's folder either
    other = str(tmp_path / "other")
    Trainer(tiny_unet(), data, batch_size=4, out_dir=other).train(1)
    with pytest.raises(ValueError, match="out_dir: .*other' already holds"):
        Trainer.from_checkpoint(d, data, out_dir=other).train(6)
    assert ckpt.load_meta(other)["step"] == 1


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_get_the_umask_mode(tmp_path, umask):
    # mkstemp's 0600 used to survive the atomic rename: checkpoints were unreadable to the group whatever the umask
    old = os.umask(umask)
    try:
        Trainer(tiny_unet(), synthetic(), batch_size=4, out_dir=str(tmp_path)).train(1)
    finally:
        os.umask(old)
    modes = {f: os.stat(tmp_path / f).st_mode & 0o777 for f in os.listdir(tmp_path)}
    assert modes == {"checkpoint.json": 0o666 & ~umask, "ckpt-000000001.safetensors": 0o666 & ~umask}, modes


def test_ctrl_c_saves_at_the_step_boundary_and_resumes_bit_for_bit(tmp_path):
    import signal

    data = synthetic()
    expected, first = _straight_state_and_first_trainer(data, str(tmp_path))
    step = first.train_step

    def step_then_ctrl_c():  # Ctrl-C arrives in the middle of step 2 (before its optimizer update)
        if first.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return step()

    first.train_step = step_then_ctrl_c
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 2  # the step finished, then saved
    resumed = Trainer.from_checkpoint(str(tmp_path), data)
    resumed.train()
    _assert_same(_state(resumed), expected)


def test_resume_checks_the_model(tmp_path):
    data = synthetic()
    Trainer(tiny_unet(), data, batch_size=4, out_dir=str(tmp_path)).train(1)
    with pytest.raises(ValueError, match="model config"):
        Trainer(tiny_unet(model_channels=16), data, batch_size=4).resume(str(tmp_path))
    with pytest.raises(ValueError, match="'diffusion' run"):
        ClassifierTrainer(NoisyClassifier(16, 1, 8, 3, 1, (8,), channel_mult=(1, 2), num_groups=4), data,
                          batch_size=4).resume(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_unet(), data).resume(str(tmp_path / "nowhere"))


def test_resume_refuses_another_train_config(tmp_path):
    # resume() kept the given TrainConfig: another lr, target, schedule... went into the resumed run, and the next
    # save replaced the run's config with it
    data, out = synthetic(), str(tmp_path)
    run = dict(batch_size=4, lr=1e-3, target="v", beta_schedule="cosine", num_train_timesteps=50, lambda_vlb=0.01)
    Trainer(tiny_unet(), data, TrainConfig(steps=1, **run), out_dir=out).train()
    before = (tmp_path / "checkpoint.json").read_text()
    for change, needle in [(dict(lr=2e-3), "lr=0.002 (the run has 0.001)"), (dict(target="eps"), "target='eps'"),
                           (dict(beta_schedule="linear"), "beta_schedule"), (dict(num_train_timesteps=100),
                                                                            "num_train_timesteps=100"),
                           (dict(lambda_vlb=0.0), "lambda_vlb"), (dict(precision="bf16"), "precision='bf16'"),
                           (dict(ema_decay=None), "ema_decay=None (the run has 0.9999)")]:  # (save_every may change)
        with pytest.raises(ValueError, match="^config: .*" + needle.replace("(", r"\(").replace(")", r"\)")):
            Trainer(tiny_unet(), data, TrainConfig(steps=2, **{**run, **change}), out_dir=out).resume()
    with pytest.raises(ValueError, match="lr=0.5"):  # a keyword override too
        Trainer.from_checkpoint(out, data, lr=0.5)
    assert (tmp_path / "checkpoint.json").read_text() == before
    resumed = Trainer(tiny_unet(), data, TrainConfig(steps=2, **run), out_dir=out).resume()  # steps may extend it
    assert resumed.step == 1 and resumed.config.steps == 2
    resumed.train()
    assert json.loads((tmp_path / "checkpoint.json").read_text())["train_config"] == {
        **json.loads(before)["train_config"], "steps": 2}
    assert Trainer.from_checkpoint(out, data).step == 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision(precision):
    torch.manual_seed(0)
    model = tiny_unet(num_classes=3, context_dim=4, out_channels=2)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, synthetic(), batch_size=4, precision=precision, log_every=2, lr=1e-3,
                      context_fn=lambda y: torch.nn.functional.one_hot(y, 4).float()[:, None].expand(-1, 2, -1))
    trainer.train(2)
    assert math.isfinite(trainer.history[-1]["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if precision == "fp16":
        assert trainer.scaler.is_enabled()


def test_targets_and_min_snr_train():
    for target in ("x0", "v"):
        trainer = Trainer(tiny_unet(), synthetic(), batch_size=4, target=target, min_snr_gamma=5.0, log_every=2,
                          beta_schedule="cosine")
        trainer.train(2)
        assert math.isfinite(trainer.history[-1]["loss"])


def test_trainer_rejects_bad_setups():
    data = synthetic()
    with pytest.raises(ValueError, match="cfg_dropout: label dropout needs a null class"):
        Trainer(tiny_unet(num_classes=3), data, cfg_dropout=0.1)
    with pytest.raises(ValueError, match="dataset has no labels"):
        Trainer(tiny_unet(num_classes=3), TensorImageDataset(data.images))
    with pytest.raises(ValueError, match="in_channels=1 but the data have 3 channels"):
        Trainer(tiny_unet(), synthetic(channels=3))
    with pytest.raises(ValueError, match="num_classes=2 but the dataset has 3 classes"):
        Trainer(tiny_unet(num_classes=2), data)
    with pytest.raises(ValueError, match="context_fn"):
        Trainer(tiny_unet(context_dim=4), data)
    with pytest.raises(ValueError, match="precision"):
        Trainer(tiny_unet(), data, precision="fp8")
    with pytest.raises(ValueError, match="target"):
        Trainer(tiny_unet(), data, target="score")
    with pytest.raises(ValueError, match="cfg_dropout"):
        Trainer(tiny_unet(), data, cfg_dropout=1.5)


@pytest.mark.parametrize("kw, error, needle", [
    (dict(lambda_vlb=-1.0), ValueError, "lambda_vlb"),
    (dict(lambda_vlb=float("nan")), ValueError, "lambda_vlb"),
    (dict(kl_weight=-5.0), ValueError, "kl_weight"),
    (dict(kl_weight=float("inf")), ValueError, "kl_weight"),
    (dict(lr=float("inf")), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr="1e-3"), TypeError, "lr"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    # T <= 20 with the linear schedule: the rescaled beta_end 0.02*1000/T reaches 1; the user set T, not beta_end
    (dict(num_train_timesteps=10), ValueError, "num_train_timesteps: .*needs T > 20"),
    (dict(num_train_timesteps=20), ValueError, "num_train_timesteps"),
])
def test_config_rejects_bad_values(kw, error, needle):
    from fastdiff.training import TrainConfig

    with pytest.raises(error, match=needle):
        TrainConfig(**kw).validate()
    TrainConfig(lambda_vlb=0.0, kl_weight=0.0, seed=-3, num_train_timesteps=21).validate()  # the edges are fine
    TrainConfig(beta_schedule="cosine", num_train_timesteps=10).validate()


def test_classifier_autoencoder_and_latent_training(tmp_path):
    data = synthetic(channels=3)
    torch.manual_seed(0)
    clf = NoisyClassifier(16, 3, 8, 3, 1, (8,), channel_mult=(1, 2), num_groups=4)
    ct = ClassifierTrainer(clf, data, batch_size=6, lr=1e-3, log_every=3)
    ct.train(3)
    assert set(ct.history[-1]) >= {"loss", "acc"} and math.isfinite(ct.history[-1]["loss"])

    ae = AutoencoderKL(3, latent_channels=2, model_channels=8, channel_mult=(1, 2), num_groups=4)
    at = AutoencoderTrainer(ae, data, batch_size=6, lr=2e-3, log_every=1, out_dir=str(tmp_path / "ae"))
    at.train(8)
    rec = [r["rec"] for r in at.history]
    assert rec[-1] < rec[0] and all(math.isfinite(r["kl"]) for r in at.history)
    scale = at.fit_scale_factor()
    assert scale > 0 and ae.scale_factor == scale and at.ema.scale_factor == scale
    at.save()
    ae2 = load_model(str(tmp_path / "ae"))
    assert ae2.scale_factor == scale

    # a U-Net trained in the autoencoder's latent space (8x8x2 latents), resumable with the autoencoder inside
    unet = UNet(8, 2, 8, 2, 1, (4,), channel_mult=(1, 2), num_groups=4, num_classes=3)
    lt = Trainer(unet, data, autoencoder=ae2, batch_size=4, log_every=2, out_dir=str(tmp_path / "ldm"))
    lt.train(2)
    assert math.isfinite(lt.history[-1]["loss"])
    assert load_autoencoder(str(tmp_path / "ldm")).scale_factor == scale
    assert load_autoencoder(str(tmp_path / "ae")) is None
    back = Trainer.from_checkpoint(str(tmp_path / "ldm"), data)
    assert back.step == 2 and back.autoencoder is not None and back.autoencoder.scale_factor == scale
    with pytest.raises(ValueError, match="in_channels=1 but the latents have 2 channels"):
        Trainer(tiny_unet(), data, autoencoder=ae2)


def test_latent_run_resumes_only_with_its_own_autoencoder(tmp_path):
    # resumed without its autoencoder a latent run went on in pixel space (3-channel latents fit a 3-channel
    # U-Net) and the next save dropped the autoencoder from the checkpoint; with another autoencoder it went on on
    # other latents and the save replaced the run's
    data = synthetic(channels=3)
    torch.manual_seed(0)
    ae = AutoencoderKL(3, latent_channels=3, model_channels=8, channel_mult=(1, 2), num_groups=4, scale_factor=0.7)

    def unet():
        return UNet(8, 3, 8, 3, 1, (4,), channel_mult=(1, 2), num_groups=4, num_classes=3)

    out = str(tmp_path / "ldm")
    Trainer(unet(), data, autoencoder=ae, batch_size=4, out_dir=out).train(1)
    # without it, 16x16 images do not even fit the model's 8x8 latents (checked when the trainer is built); 8x8
    # images would, and resume() refuses them
    with pytest.raises(ValueError, match="^model: image_size=8 but the dataset gives 16x16 images"):
        Trainer(unet(), data, batch_size=4, out_dir=out)
    with pytest.raises(ValueError, match="^autoencoder: .*latent space"):
        Trainer(unet(), synthetic(channels=3, size=8), batch_size=4, out_dir=out).resume()
    other = copy.deepcopy(ae)
    other.scale_factor = 0.5
    with pytest.raises(ValueError, match="^autoencoder: it differs"):
        Trainer(unet(), data, autoencoder=other, batch_size=4, out_dir=out).resume()
    other = copy.deepcopy(ae)
    with torch.no_grad():
        other.post_quant_conv.bias.add_(1.0)
    with pytest.raises(ValueError, match="^autoencoder: it differs"):
        Trainer(unet(), data, autoencoder=other, batch_size=4, out_dir=out).resume()
    assert load_autoencoder(out).scale_factor == 0.7
    back = Trainer(unet(), data, autoencoder=copy.deepcopy(ae), batch_size=4, out_dir=out).resume()
    assert back.step == 1
    assert Trainer.from_checkpoint(out, data).step == 1
    pixel = str(tmp_path / "pixel")
    Trainer(unet(), synthetic(channels=3, size=8), batch_size=4, out_dir=pixel).train(1)
    with pytest.raises(ValueError, match="^autoencoder: .*pixel space"):
        Trainer(unet(), data, autoencoder=ae, batch_size=4, out_dir=pixel).resume()


# -- command line ----------------------------------------------------------------------------------------------

@needs_sklearn
def test_cli_trains_and_resumes(tmp_path):
    from fastdiff.training.cli import train_main

    out = str(tmp_path / "run")
    argv = ["--dataset", "digits", "--out", out, "--batch-size", "4", "--model-channels", "8", "--num-groups", "4",
            "--num-res-blocks", "1", "--channel-mult", "1,2", "--cfg-dropout", "0.1", "--learn-sigma",
            "--log-every", "1", "--save-every", "1", "--quiet", "--device", "cpu"]
    assert train_main(argv + ["--steps", "2"]) == 0
    meta = json.loads(open(os.path.join(out, "checkpoint.json")).read())
    assert meta["step"] == 2 and meta["model"]["config"]["num_classes"] == 10
    assert meta["model"]["config"]["learn_null_class"] and meta["model"]["config"]["out_channels"] == 2
    assert train_main(argv + ["--steps", "3"]) == 0  # resumes from step 2
    meta = json.loads(open(os.path.join(out, "checkpoint.json")).read())
    assert meta["step"] == 3 and [r["step"] for r in meta["history"]] == [1, 2, 3]


def _cli_refuses(argv, needle):
    """train_main(argv) exits with a one-line error naming the flag that `needle` starts with, and holding needle."""
    from fastdiff.training.cli import train_main

    with pytest.raises(SystemExit) as e:
        train_main(argv)
    flag = needle.split()[0].rstrip(":")
    assert isinstance(e.value.code, str) and e.value.code.startswith(f"error: {flag}: "), e.value.code
    assert needle in e.value.code and "\n" not in e.value.code, e.value.code


@needs_sklearn
def test_cli_resume_refuses_other_model_flags(tmp_path):
    # the model flags (--model-channels, --channel-mult, ...) given on a resume with another value than the run's
    # were silently ignored: the run went on with its own model
    from fastdiff.training.cli import train_main

    common = ["--dataset", "digits", "--batch-size", "2", "--quiet", "--device", "cpu", "--steps", "1"]
    arch = ["--model-channels", "8", "--num-groups", "4", "--num-res-blocks", "1", "--channel-mult", "1,2"]
    out = str(tmp_path / "run")
    argv = common + arch + ["--out", out, "--dropout", "0.1"]
    assert train_main(argv) == 0
    before = open(os.path.join(out, "checkpoint.json")).read()
    for flags, needle in [(["--model-channels", "16"], "--model-channels 16 (the run has 8)"),
                          (["--channel-mult", "1,2,2"], "--channel-mult 1,2,2 (the run has 1,2)"),
                          (["--num-res-blocks", "3"], "--num-res-blocks 3 (the run has 1)"),
                          (["--attention-resolutions", "16"], "--attention-resolutions 16 (the run has 8)"),
                          (["--num-heads", "2"], "--num-heads 2 (the run has 1)"),
                          (["--num-head-channels", "4"], "--num-head-channels 4 (the run has -1)"),
                          (["--num-groups", "8"], "--num-groups 8 (the run has 4)"),
                          (["--dropout", "0.2"], "--dropout 0.2 (the run has 0.1)"),
                          (["--no-scale-shift-norm"], "--no-scale-shift-norm (the run has no --no-scale-shift-norm)"),
                          (["--resblock-updown"], "--resblock-updown"),
                          (["--learn-sigma"], "--learn-sigma (the run has no --learn-sigma)"),
                          (["--no-class-cond"], "--no-class-cond (the run has --class-cond)"),
                          (["--lr", "0.5", "--num-groups", "2"], "--lr 0.5 (the run has 0.0002); --num-groups 2"),
                          # flags written at their default values are given too (they were taken as not given)
                          (["--model-channels", "64"], "--model-channels 64 (the run has 8)"),
                          (["--dropout", "0"], "--dropout 0.0 (the run has 0.1)")]:
        _cli_refuses(argv + flags, needle)
    from fastdiff import cli  # the `fastdiff train` command line too

    assert cli.main(["train"] + argv + ["--model-channels", "64"]) == 2
    assert open(os.path.join(out, "checkpoint.json")).read() == before
    # the run's own values, given or left at their defaults, resume it
    assert train_main(argv + ["--attention-resolutions", "8", "--class-cond", "--steps", "2"]) == 0
    assert train_main(["--dataset", "digits", "--out", out, "--quiet", "--device", "cpu", "--steps", "3"]) == 0
    assert json.loads(open(os.path.join(out, "checkpoint.json")).read())["step"] == 3

    # the classifier's and the autoencoder's flags too
    clf = str(tmp_path / "clf")
    assert train_main(common + arch + ["--task", "classifier", "--out", clf]) == 0
    _cli_refuses(common + arch + ["--task", "classifier", "--out", clf, "--pool", "adaptive"],
                 "--pool adaptive (the run has attention)")
    ae = str(tmp_path / "ae")
    assert train_main(common + arch + ["--task", "autoencoder", "--out", ae, "--latent-channels", "2"]) == 0
    _cli_refuses(common + arch + ["--task", "autoencoder", "--out", ae, "--latent-channels", "3"],
                 "--latent-channels 3 (the run has 2)")
    _cli_refuses(common + ["--task", "autoencoder", "--out", ae, "--model-channels", "16"],
                 "--model-channels 16 (the run has 8)")


@needs_sklearn
def test_cli_resume_checks_the_autoencoder_flag(tmp_path):
    # --autoencoder on a resume was ignored: the run went on with the autoencoder saved in it, whatever was given
    import shutil

    from fastdiff.training.cli import train_main

    common = ["--dataset", "digits", "--batch-size", "2", "--quiet", "--device", "cpu", "--model-channels", "8",
              "--num-groups", "4", "--num-res-blocks", "1", "--channel-mult", "1,2"]
    ae, ldm, pixel = (str(tmp_path / n) for n in ("ae", "ldm", "pixel"))
    assert train_main(common + ["--task", "autoencoder", "--out", ae, "--latent-channels", "2", "--steps", "1"]) == 0
    same = str(tmp_path / "same")
    shutil.copytree(ae, same)
    argv = common + ["--out", ldm, "--attention-resolutions", "4", "--steps", "1"]
    assert train_main(argv + ["--autoencoder", ae]) == 0
    assert train_main(common + ["--task", "autoencoder", "--out", ae, "--latent-channels", "2", "--steps", "2"]) == 0
    before = open(os.path.join(ldm, "checkpoint.json")).read()
    _cli_refuses(argv + ["--steps", "2", "--autoencoder", ae], "--autoencoder: ")  # trained on: other weights
    scaled = str(tmp_path / "scaled")  # the same weights with another scale factor
    shutil.copytree(same, scaled)
    meta = json.loads(open(os.path.join(scaled, "checkpoint.json")).read())
    meta["model"]["config"]["scale_factor"] *= 2
    with open(os.path.join(scaled, "checkpoint.json"), "w") as f:
        json.dump(meta, f)
    _cli_refuses(argv + ["--steps", "2", "--autoencoder", scaled], "--autoencoder: ")
    assert open(os.path.join(ldm, "checkpoint.json")).read() == before
    assert train_main(argv + ["--steps", "2", "--autoencoder", same]) == 0  # the run's own: resumes
    assert train_main(argv + ["--steps", "3"]) == 0
    assert json.loads(open(os.path.join(ldm, "checkpoint.json")).read())["step"] == 3
    assert train_main(common + ["--out", pixel, "--steps", "1"]) == 0
    _cli_refuses(common + ["--out", pixel, "--steps", "2", "--autoencoder", same], "--autoencoder: ")


@needs_sklearn
def test_cli_resume_without_image_size_trains_at_the_runs_size(tmp_path):
    # a resume without --image-size loaded the data at the default size (16 for digits): a run trained at 8 then
    # failed ("pass the run's --image-size"), and an autoencoder run silently went on at another resolution
    from fastdiff.training.cli import _run_image_size, train_main

    common = ["--dataset", "digits", "--batch-size", "2", "--quiet", "--device", "cpu", "--model-channels", "8",
              "--num-groups", "4", "--num-res-blocks", "1", "--channel-mult", "1,2"]
    ae, ldm, pixel = (str(tmp_path / n) for n in ("ae", "ldm", "pixel"))
    assert train_main(common + ["--task", "autoencoder", "--out", ae, "--latent-channels", "2", "--steps", "1",
                                "--image-size", "8"]) == 0
    assert train_main(common + ["--out", ldm, "--autoencoder", ae, "--steps", "1", "--image-size", "8"]) == 0
    assert train_main(common + ["--out", pixel, "--steps", "1", "--image-size", "8"]) == 0
    for out in (ae, ldm, pixel):
        meta = json.loads(open(os.path.join(out, "checkpoint.json")).read())
        assert meta["image_shape"] == [1, 8, 8], meta  # the training images' (a latent run's too)
        assert train_main(common + ["--out", out, "--steps", "2"]) == 0, out
        meta = json.loads(open(os.path.join(out, "checkpoint.json")).read())
        assert meta["step"] == 2 and meta["image_shape"] == [1, 8, 8]
        # a checkpoint from before image_shape was recorded: the model's size (times the autoencoder's factor)
        del meta["image_shape"]
        assert _run_image_size(meta) == (None if out == ae else 8)
    _cli_refuses(common + ["--out", pixel, "--steps", "3", "--image-size", "16"], "--image-size: ")
    # the run's task is taken when --task is not given (above: the autoencoder resumed without it); another is refused
    _cli_refuses(common + ["--out", ae, "--steps", "3", "--task", "diffusion"],
                 f"--task: {ae} holds an autoencoder run, which resumes with --task autoencoder")
    _cli_refuses(common + ["--out", pixel, "--steps", "3", "--task", "classifier"],
                 f"--task: {pixel} holds a diffusion run")


def test_module_cli_reports_errors_in_one_line(tmp_path, capsys):
    # python -m fastdiff.training printed a traceback for a user's error (fastdiff train printed one line)
    from fastdiff.training.cli import train_main

    assert train_main(["--dataset", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m fastdiff.training: error:") and "missing" in err and "\n" not in err


def test_cli_parser_is_reusable():
    import argparse

    from fastdiff.training.cli import add_train_arguments

    p = add_train_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--out", "x", "--channel-mult", "1,2,4", "--attention-resolutions", "16,8",
                         "--precision", "bf16", "--no-class-cond"])
    assert args.channel_mult == (1, 2, 4) and args.attention_resolutions == (16, 8)
    assert args.precision == "bf16" and args.class_cond is False


# -- DDP ---------------------------------------------------------------------------------------------------------

DDP_CFG = dict(batch_size=3, lr=1e-3, timestep_sampler="importance", cfg_dropout=0.3, log_every=2, seed=3,
               ema_decay=0.99)


def _ddp_model():
    torch.manual_seed(0)
    return tiny_unet(num_classes=3, learn_null_class=True, out_channels=2, resblock_updown=True)


def _two_steps(trainer):
    trainer.train_step()
    trainer.train_step()
    return {"grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters()},
            "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "history": trainer.history}


def _ddp_worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = Trainer(_ddp_model(), synthetic(), **DDP_CFG)
        assert trainer.ddp is not None and trainer.global_batch == 6
        result = _two_steps(trainer)
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    out_file = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    ddp = torch.load(out_file)
    single = _two_steps(Trainer(_ddp_model(), synthetic(), **dict(DDP_CFG, batch_size=6)))
    for n, g in single["grads"].items():
        torch.testing.assert_close(ddp["grads"][n], g, atol=1e-6, rtol=1e-4, msg=n)
    for k, w in single["weights"].items():
        torch.testing.assert_close(ddp["weights"][k], w, atol=1e-6, rtol=1e-5, msg=k)
    assert ddp["history"][0]["loss"] == pytest.approx(single["history"][0]["loss"], rel=1e-5)


def test_fit_scale_factor_without_ema_is_deterministic_and_leaves_train_mode():
    # no EMA: the fit runs on the trained model itself, which must not use dropout (the global RNG) while fitting
    data = synthetic(channels=3)
    torch.manual_seed(0)
    ae = AutoencoderKL(3, latent_channels=2, model_channels=8, channel_mult=(1, 2), num_groups=4, dropout=0.5)
    at = AutoencoderTrainer(ae, data, batch_size=6, ema_decay=None)
    assert at.ema is None and ae.training
    torch.manual_seed(1)
    a = at.fit_scale_factor()
    torch.manual_seed(2)
    b = at.fit_scale_factor()
    assert a == b and ae.training
    state = torch.random.get_rng_state()
    at.fit_scale_factor()
    assert torch.equal(state, torch.random.get_rng_state())


def test_every_autoencoder_checkpoint_has_a_fitted_scale_factor(tmp_path):
    # the scale factor was fitted only at the end of `fastdiff train --task autoencoder`: a periodic checkpoint, or
    # the one Ctrl-C writes, held 1.0, and latent diffusion on it trained on unscaled latents without a word
    data = synthetic(channels=3)

    def trainer(out):
        torch.manual_seed(0)
        ae = AutoencoderKL(3, latent_channels=2, model_channels=8, channel_mult=(1, 2), num_groups=4)
        return AutoencoderTrainer(ae, data, batch_size=6, lr=2e-3, save_every=2, out_dir=str(tmp_path / out))

    at = trainer("ae")
    at.train(2)  # the periodic save at step 2 (and train()'s final one: the same weights, not fitted again)
    s2 = load_model(str(tmp_path / "ae")).scale_factor
    probe = trainer("probe")
    probe.ema.load_state_dict(at.ema.state_dict())
    probe.step = at.step
    assert s2 != 1.0 and s2 == probe.fit_scale_factor()  # fitted to the step-2 weights
    at.train(3)
    s3 = load_model(str(tmp_path / "ae")).scale_factor
    assert s3 != s2 and at.model.scale_factor == s3
    # fitting at a save does not touch the training: the run resumed at step 3 ends as an uninterrupted one does
    straight = trainer("straight")
    straight.train(4)
    resumed = AutoencoderTrainer.from_checkpoint(str(tmp_path / "ae"), data)
    resumed.train(4)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.model.scale_factor == straight.model.scale_factor


def test_autoencoder_resume_refits_at_the_next_save(tmp_path):
    # a trainer that fitted at step k, resumed from a step-k checkpoint with the unfitted 1.0 (one written before
    # every save fitted), saved that 1.0 again: the last fit was taken as the loaded weights'
    torch.manual_seed(0)
    ae = AutoencoderKL(3, latent_channels=2, model_channels=8, channel_mult=(1, 2), num_groups=4)
    at = AutoencoderTrainer(ae, synthetic(channels=3), batch_size=6, out_dir=str(tmp_path / "ae"))
    at.train(1)
    fitted = load_model(str(tmp_path / "ae")).scale_factor
    path = tmp_path / "ae" / "checkpoint.json"
    meta = json.loads(path.read_text())
    meta["model"]["config"]["scale_factor"] = 1.0
    path.write_text(json.dumps(meta))
    at.resume()
    assert at.model.scale_factor == 1.0
    at.save()
    assert load_model(str(tmp_path / "ae")).scale_factor == fitted != 1.0


def test_autoencoder_trainer_refuses_other_output_channels():
    # out_channels=1 on RGB data: |x - x_hat| broadcast the one reconstructed channel over all three, silently
    ae = AutoencoderKL(3, latent_channels=2, model_channels=8, channel_mult=(1, 2), num_groups=4, out_channels=1)
    with pytest.raises(ValueError, match="^model: out_channels=1"):
        AutoencoderTrainer(ae, synthetic(channels=3), batch_size=6, ema_decay=None)

@pytest.mark.parametrize("bad", [-1, 0, 2.5, True])
def test_fit_scale_factor_refuses_a_bad_sample_count(bad):
    # -1 fitted on all the images but one (idx[:-1]), 0 failed inside torch.cat, 2.5 in randperm's slice
    ae = AutoencoderKL(3, latent_channels=2, model_channels=8, channel_mult=(1, 2), num_groups=4)
    at = AutoencoderTrainer(ae, synthetic(channels=3), batch_size=6, ema_decay=None)
    with pytest.raises(ValueError, match="^num_samples:"):
        at.fit_scale_factor(bad)
    assert ae.scale_factor == 1.0


def test_custom_schedule_is_saved_resumed_and_sampled(tmp_path):
    # a schedule= of the trainer's own was not saved: from_checkpoint resumed on the config's schedule (another
    # one, silently), resume() took any schedule, and a sampler of the checkpoint used the config's betas
    from fastdiff import pretrained
    from fastdiff.diffusion import NoiseSchedule

    data = synthetic()
    custom = NoiseSchedule(200, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

    def run(out, steps, **kw):
        torch.manual_seed(0)
        t = Trainer(tiny_unet(), data, batch_size=4, out_dir=str(tmp_path / out), **kw)
        t.train(steps)
        return t

    straight = run("straight", 2, schedule=custom)
    run("split", 1, schedule=custom)
    saved = json.loads((tmp_path / "split" / "checkpoint.json").read_text())["schedule"]
    assert saved["betas"] == custom.betas.tolist() and saved["alphas_cumprod"] == custom.alphas_cumprod.tolist()
    with pytest.raises(ValueError, match="^schedule: the run was trained on a custom"):
        Trainer(tiny_unet(), data, batch_size=4, out_dir=str(tmp_path / "split")).resume()
    back = Trainer.from_checkpoint(str(tmp_path / "split"), data)
    assert torch.equal(back.schedule.alphas_cumprod, custom.alphas_cumprod) and back.sampler.num_timesteps == 200
    back.train(2)  # bit for bit the uninterrupted run
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k
    s = pretrained.make_sampler("ddim", back.model, str(tmp_path / "split"))
    assert s.schedule.num_train_timesteps == 200 and torch.equal(s.schedule.betas, custom.betas)
    # a run on the config's schedule saves none, and refuses a custom one on resume
    run("plain", 1)
    assert json.loads((tmp_path / "plain" / "checkpoint.json").read_text())["schedule"] is None
    with pytest.raises(ValueError, match="^schedule: the run was trained on its TrainConfig"):
        Trainer(tiny_unet(), data, batch_size=4, out_dir=str(tmp_path / "plain"), schedule=custom).resume()
    # zero terminal SNR (a beta of 1) cannot go to a sampler as trained_betas: a clear error
    run("zsnr", 1, schedule=NoiseSchedule(200, rescale_betas_zero_snr=True), target="v")
    with pytest.raises(ValueError, match="^checkpoint: .*zero terminal SNR"):
        pretrained.make_sampler("ddim", None, str(tmp_path / "zsnr"))


def test_checkpoint_from_before_saved_schedules_resumes_on_its_schedule(tmp_path):
    # a checkpoint written before schedules were saved has no "schedule": resume() took that as "the config's
    # schedule" and refused the run's own custom one, the only way such a run could go on (from_checkpoint(...,
    # schedule=...)), naming the wrong schedule
    from fastdiff import pretrained
    from fastdiff.diffusion import NoiseSchedule

    data, out = synthetic(), str(tmp_path / "old")
    custom = NoiseSchedule(200, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    Trainer(tiny_unet(), data, batch_size=4, out_dir=out, schedule=custom).train(1)
    meta = json.loads((tmp_path / "old" / "checkpoint.json").read_text())
    del meta["schedule"]  # as written before today
    (tmp_path / "old" / "checkpoint.json").write_text(json.dumps(meta))
    assert pretrained.make_sampler("ddim", None, out).schedule.num_train_timesteps == 1000  # samples, as before
    back = Trainer.from_checkpoint(out, data, schedule=custom)
    back.train(2)
    assert json.loads((tmp_path / "old" / "checkpoint.json").read_text())["schedule"]["betas"] == custom.betas.tolist()
    assert Trainer.from_checkpoint(out, data).step == 2


def test_float64_custom_schedule_resumes_bit_for_bit(tmp_path):
    # the saved schedule was rounded to float32: a float64 schedule= resumed on other values (not bit for bit)
    class Schedule64:
        betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        num_train_timesteps = 100

    data = synthetic()

    def run(out, steps):
        torch.manual_seed(0)
        t = Trainer(tiny_unet(), data, batch_size=4, out_dir=str(tmp_path / out), schedule=Schedule64())
        t.train(steps)
        return t

    straight = run("straight", 2)
    run("split", 1)
    back = Trainer.from_checkpoint(str(tmp_path / "split"), data)
    assert torch.equal(back.schedule.alphas_cumprod, Schedule64.alphas_cumprod)
    back.train(2)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k


# -- memory format -------------------------------------------------------------------------------------------------

def test_cpu_trainer_runs_channels_last_and_matches_nchw():
    # On the CPU the trainer lays the model's 4-D weights out channels_last (oneDNN's convolutions take NHWC without
    # reordering; activations follow the weights): the same two steps as a trainer put back to NCHW, to fp32 rounding
    def trainer(nchw):
        torch.manual_seed(0)
        t = Trainer(tiny_unet(num_classes=3, learn_null_class=True, out_channels=2, resblock_updown=True),
                    synthetic(), batch_size=4, lr=1e-3, cfg_dropout=0.3, ema_decay=0.9, seed=3)
        if nchw:
            t.model.to(memory_format=torch.contiguous_format)
        return t

    cl, nchw = trainer(False), trainer(True)
    convs = [m.weight for m in cl.model.modules()  # (1x1 kernels, or one input channel: both layouts agree)
             if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[2:].numel() > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    a, b = _two_steps(cl), _two_steps(nchw)
    assert [r["step"] for r in a["history"]] == [r["step"] for r in b["history"]]
    for key in ("grads", "weights"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=1e-4, atol=1e-5, msg=f"{key} {k}")


@needs_sklearn
def test_cli_same_command_trains_the_same_run(tmp_path):
    # --seed seeded the data order and the noise but not the model's initial weights: the same command twice gave
    # different runs
    from safetensors.torch import load_file

    from fastdiff.training.cli import train_main

    common = ["--dataset", "digits", "--batch-size", "2", "--quiet", "--device", "cpu", "--model-channels", "8",
              "--num-groups", "4", "--num-res-blocks", "1", "--channel-mult", "1,2", "--steps", "2"]
    runs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = str(tmp_path / name)
        torch.manual_seed(int(name.encode()[0]))  # whatever the global RNG held before
        assert train_main(common + ["--out", out, "--seed", seed]) == 0
        meta = json.loads(open(os.path.join(out, "checkpoint.json")).read())
        runs.append(load_file(os.path.join(out, meta["tensors"])))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    conv = sorted(k for k, v in runs[0].items() if k.startswith("model.") and v.dim() == 4)[0]
    assert not torch.equal(runs[0][conv], runs[2][conv])  # another --seed, other weights


def test_train_config_checks_its_values_when_made():
    # TrainConfig(lr=nan), (seed=1.5), (steps=-1), ... were accepted until a Trainer took them; seed=2**70 was
    # accepted even there (torch.manual_seed then overflowed)
    from fastdiff.training import TrainConfig

    for kw, err, needle in [(dict(seed=1.5), TypeError, "seed: expected an int"),
                            (dict(seed=2 ** 70), ValueError, "seed: expected a 64-bit int"),
                            (dict(lr=float("nan")), ValueError, "lr: expected a finite positive float"),
                            (dict(lr="1e-3"), TypeError, "lr: expected a float"),
                            (dict(steps=-1), ValueError, "steps: expected a non-negative int"),
                            (dict(precision="fp8"), ValueError, "precision: expected one of")]:
        with pytest.raises(err, match="^" + needle):
            TrainConfig(**kw)
    assert TrainConfig(seed=2 ** 64 - 1).seed == 2 ** 64 - 1


@needs_sklearn
def test_cli_resume_steps(tmp_path):
    # a resume with --steps below the run's step printed "trained to step 8" and saved steps=3 in its config; one
    # without --steps took the default 2000 as the target, cutting short an interrupted longer run
    from fastdiff.training.cli import train_main

    out = str(tmp_path / "run")
    common = ["--dataset", "digits", "--batch-size", "2", "--quiet", "--device", "cpu", "--model-channels", "8",
              "--num-groups", "4", "--num-res-blocks", "1", "--channel-mult", "1,2", "--out", out]
    assert train_main(common + ["--steps", "2"]) == 0
    path = os.path.join(out, "checkpoint.json")
    before = open(path).read()
    _cli_refuses(common + ["--steps", "1"], f"--steps: {out} is at step 2 already, past 1")
    assert open(path).read() == before
    meta = json.loads(before)
    meta["train_config"]["steps"] = 3  # as a run of --steps 3 stopped (Ctrl-C) at step 2 leaves it
    with open(path, "w") as f:
        json.dump(meta, f)
    assert train_main(common) == 0  # no --steps: the run's own target
    meta = json.loads(open(path).read())
    assert meta["step"] == 3 and meta["train_config"]["steps"] == 3


def test_resume_on_another_process_count_warns(tmp_path):
    # a run trained on 2 processes resumed on 1 at half the global batch, silently
    run = str(tmp_path / "run")
    torch.manual_seed(0)
    Trainer(tiny_unet(), synthetic(), batch_size=2, out_dir=run).train(1)
    path = os.path.join(run, "checkpoint.json")
    meta = json.loads(open(path).read())
    meta["world_size"] = 2  # as a torchrun --nproc_per_node=2 run saves it
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.warns(UserWarning, match="trained on 2 process.*global batch of 4; it resumes on 1, a global batch of 2"):
        Trainer.from_checkpoint(run, synthetic())
    meta["world_size"] = 1
    with open(path, "w") as f:
        json.dump(meta, f)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer.from_checkpoint(run, synthetic())


@needs_sklearn
def test_cli_resume_may_change_the_log_and_save_intervals(tmp_path, capsys):
    # --log-every / --save-every on a resume were refused like an optimisation flag; they only say how often the
    # run logs and saves. --help now shows every default (--lr, --dataset, --weight-decay had none)
    import argparse

    from fastdiff.training import TrainConfig, digits
    from fastdiff.training.cli import add_train_arguments, train_main

    out = str(tmp_path / "run")
    common = ["--dataset", "digits", "--batch-size", "2", "--quiet", "--device", "cpu", "--model-channels", "8",
              "--num-groups", "4", "--num-res-blocks", "1", "--channel-mult", "1,2", "--out", out]
    assert train_main(common + ["--steps", "2", "--log-every", "1"]) == 0
    assert train_main(common + ["--steps", "4", "--log-every", "2", "--save-every", "3"]) == 0
    meta = json.loads(open(os.path.join(out, "checkpoint.json")).read())
    assert meta["step"] == 4 and meta["train_config"]["log_every"] == 2 and meta["train_config"]["save_every"] == 3
    assert [r["step"] for r in meta["history"]] == [1, 2, 4]
    _cli_refuses(common + ["--steps", "5", "--lr", "0.1"], "--lr 0.1 (the run has 0.0002)")
    # the Python API alike: a trainer built with other intervals resumes the run
    t = Trainer.from_checkpoint(out, digits(16))
    cfg = TrainConfig(**{**dataclasses.asdict(t.config), "log_every": 7, "save_every": 0})
    Trainer(t.model, t.dataset, cfg, out_dir=out).resume()
    with pytest.raises(SystemExit):
        add_train_arguments(argparse.ArgumentParser(prog="p")).parse_args(["--help"])
    text = capsys.readouterr().out
    for needle in ("(default: digits)", "default: 0.0002", "--weight-decay WEIGHT_DECAY", "default: 0.0",
                   "(default: 1,2)"):
        assert needle in text, needle
    with pytest.raises(ValueError, match="^weight_decay: expected a finite non-negative float"):
        TrainConfig(weight_decay=-1)
