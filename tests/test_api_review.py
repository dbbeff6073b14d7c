"""What a user-acceptance pass over the training, checkpoint and sampling API found: each case as a user meets it."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.diffusion import DDIMSampler
from fastdiff.models import AutoencoderKL, UNet
from fastdiff.training import TensorImageDataset, Trainer, load_model
from fastdiff.training import checkpoint as ckpt
from fastdiff.training.losses import _make_schedule, min_snr_weight, training_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_unet(**kw):
    args = dict(image_size=8, in_channels=1, model_channels=8, out_channels=1, num_res_blocks=1,
                attention_resolutions=(), channel_mult=(1, 2), num_groups=4)
    args.update(kw)
    return UNet(**args)


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 2)


@pytest.fixture
def run(tmp_path):
    """A two-step run's checkpoint folder."""
    out = tmp_path / "run"
    Trainer(_tiny_unet(), _data(), batch_size=2, steps=2, out_dir=str(out)).train()
    return out


# A damaged checkpoint (a truncated tensors file, a JSON cut short) is a ValueError naming the file, from Python and
# from the CLI (one line, exit code 2): it was safetensors' own SafetensorError, or a JSONDecodeError naming nothing.
def test_damaged_checkpoint_names_the_file(run):
    tensors = next(p for p in run.iterdir() if p.suffix == ".safetensors")
    with open(tensors, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ckpt.CheckpointError, match=f"^{tensors}: damaged or not a safetensors file"):
        load_model(str(run))
    with pytest.raises(ValueError, match=f"{tensors.name}: damaged"):
        Trainer.from_checkpoint(str(run), _data())
    p = subprocess.run([sys.executable, "-m", "fastdiff", "sample", "--checkpoint", str(run), "--n", "1", "--steps",
                        "1", "--out", str(run.parent / "s.npz")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert p.returncode == 2 and "damaged or not a safetensors file" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    (run / "checkpoint.json").write_text('{"format": "fastdiff-checkpoint", "step": ')
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.json: damaged or not a checkpoint's JSON"):
        load_model(str(run))
    (run / "checkpoint.json").write_text("[1, 2]")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.json: damaged .*a list, not an object"):
        ckpt.load_meta(str(run))


def test_missing_tensors_file_names_it(run):
    tensors = next(p for p in run.iterdir() if p.suffix == ".safetensors")
    tensors.unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"^{tensors}: missing"):
        load_model(str(run))


def test_load_model_takes_the_checkpoint_json(run):
    a, b = load_model(str(run)), load_model(str(run / "checkpoint.json"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ckpt.exists(str(run / "checkpoint.json"))


# An out_dir that cannot be written fails before the first step (it failed at the first save, save_every steps of
# work later: 500 by default in the CLI).
def test_unwritable_out_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    t = Trainer(_tiny_unet(), _data(), batch_size=2, steps=3, out_dir=str(blocker / "run"))
    with pytest.raises(ValueError, match="^out_dir: cannot write checkpoints to"):
        t.train()
    assert t.step == 0


# A half-precision model that does not cast its input (any model but ours) gets x_t in x0's dtype, as diffusers'
# add_noise gives it; the losses match the fp32 x_t's model seeing the same rounded input.
def test_training_losses_feed_x_t_in_x0s_dtype():
    seen = []

    def model(x, t):
        seen.append(x.dtype)
        if x.dtype != torch.bfloat16:
            raise RuntimeError("Input type (float) and bias type (c10::BFloat16) should be the same")
        return x * 0.5

    x0 = (torch.rand(2, 1, 8, 8) * 2 - 1).bfloat16()
    out = training_losses(model, x0, torch.tensor([0, 999]), _make_schedule("linear", 1000),
                          noise=torch.randn(2, 1, 8, 8))
    assert seen == [torch.bfloat16] and out["loss"].dtype == torch.float32 and out["loss"].isfinite().all()


def test_loss_weights_check_their_arguments():
    snr = torch.tensor([0.1, 1.0, 10.0])
    for gamma in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="^min_snr_gamma:"):
            min_snr_weight(snr, gamma, "eps")
    with pytest.raises(ValueError, match="^target:"):
        min_snr_weight(snr, 5.0, "foo")  # was v-prediction's weighting, silently
    model = lambda x, t: x  # noqa: E731
    x0, t, sched = torch.zeros(2, 1, 4, 4), torch.tensor([1, 2]), _make_schedule("linear", 100)
    with pytest.raises(ValueError, match="^min_snr_gamma:"):
        training_losses(model, x0, t, sched, min_snr_gamma=0)  # gave all-zero losses
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="^lambda_vlb:"):
            training_losses(model, x0, t, sched, lambda_vlb=bad)
    assert training_losses(model, x0, t, sched, min_snr_gamma=5)["loss"].shape == (2,)  # an int gamma is fine


# Datasets whose items are images alone, or (image,) as torch's TensorDataset(images) gives: unlabeled (label 0).
def test_trainer_takes_unlabeled_items():
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    for ds in (torch.utils.data.TensorDataset(images), [im for im in images]):
        t = Trainer(_tiny_unet(), ds, batch_size=2, steps=2)
        t.train()
        assert t.step == 2

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return images[i], 0, "extra"

    with pytest.raises(ValueError, match="^dataset: item .* expected an image, \\(image,\\) or \\(image, label\\)"):
        Trainer(_tiny_unet(), Bad(), batch_size=2, steps=1).train()


def test_sample_checks_guidance_seed_and_device():
    model = lambda x, t: x * 0  # noqa: E731
    kw = dict(num_inference_steps=2, progress=False)
    for name, bad in (("guidance_scale", float("nan")), ("guidance_scale", float("inf")),
                      ("classifier_scale", float("nan"))):
        with pytest.raises(ValueError, match=f"^{name}: expected a finite float"):
            fastdiff.sample(model, DDIMSampler(), (1, 1, 4, 4), **{name: bad}, **kw)
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="^seed:"):
            fastdiff.sample(model, DDIMSampler(), (1, 1, 4, 4), seed=seed, **kw)
    a = fastdiff.sample(model, DDIMSampler(eta=1.0), (1, 1, 4, 4), seed=2**64 - 1, **kw)
    assert a.isfinite().all()
    with pytest.raises(ValueError, match="^device: 'nope' is not a device"):
        fastdiff.sample(model, DDIMSampler(), (1, 1, 4, 4), device="nope", **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^device: cuda cannot be used here"):
            fastdiff.sample(model, DDIMSampler(), (1, 1, 4, 4), device="cuda", **kw)


def test_learned_variance_output_error_says_what_to_do():
    s = DDIMSampler()
    s.set_timesteps(2)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"6 channels look like a model with learned variances.*model_output\[:, :3\]"):
        s.step(torch.randn(1, 6, 4, 4), 0, x)


def test_autoencoder_decode_names_latent_channels():
    ae = AutoencoderKL(in_channels=1, latent_channels=2, model_channels=8, channel_mult=(1, 2), num_groups=4)
    with pytest.raises(ValueError, match=r"^z: expected shape \(N, 2, H, W\) \(latent_channels=2\)"):
        ae.decode(torch.randn(1, 3, 4, 4))


# The size a model samples at (its image_size) must be the size it trains on: a 16x16 dataset trained into an
# image_size=8 model (or resumed into an 8x8 run from Python) went on silently; the CLI refused only a resume.
def test_trainer_checks_the_image_size(run):
    big = TensorImageDataset(torch.rand(4, 1, 16, 16) * 2 - 1, torch.arange(4) % 2)
    with pytest.raises(ValueError, match="^model: image_size=8 but the dataset gives 16x16 images"):
        Trainer(_tiny_unet(), big, batch_size=2, steps=1)
    with pytest.raises(ValueError, match="^model: image_size=8 but the dataset gives 16x16 images"):
        Trainer.from_checkpoint(str(run), big)
    ae = AutoencoderKL(in_channels=1, latent_channels=1, model_channels=8, channel_mult=(1, 2), num_groups=4)
    Trainer(_tiny_unet(), big, autoencoder=ae, batch_size=2, steps=1)  # 8x8 latents of 16x16 images: fine
    with pytest.raises(ValueError, match="^model: image_size=8 but the dataset gives 4x4 latents of the 8x8 images"):
        Trainer(_tiny_unet(), _data(), autoencoder=ae, batch_size=2, steps=1)


# A config carried over from another scheduler keeps keys its new class ignores (diffusers warns "... is not
# expected and will be ignored"); the conversion applied them, and followed another trajectory than diffusers'.
def test_from_scheduler_drops_the_keys_diffusers_ignores():
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.diffusion import from_scheduler

    sd15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "timestep_spacing": "leading"}
    d = diffusers.DPMSolverSinglestepScheduler.from_config(sd15)
    s = from_scheduler(d)
    d.set_timesteps(10)
    s.set_timesteps(10)
    assert s.timesteps.tolist() == d.timesteps.tolist()  # was [901, 811, ...] for diffusers' [999, 899, ...]
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                   timestep_spacing="trailing")
    heun = diffusers.HeunDiscreteScheduler.from_config(ddim.config)
    s = from_scheduler(heun)
    heun.set_timesteps(5)
    s.set_timesteps(5)
    assert s.init_noise_sigma == pytest.approx(float(heun.init_noise_sigma), rel=1e-6)  # was 4096 for 14.6
    saved = dict(heun.config, _class_name="HeunDiscreteScheduler")  # a saved config dict: the same
    assert from_scheduler(saved).config.get("rescale_betas_zero_snr") in (None, False)


# A training loop's add_noise (any training timestep, before set_timesteps too), as the diffusers scheduler gives it.
def test_fastdiff_scheduler_add_noise_at_training_timesteps():
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.integrations.diffusers import FastdiffScheduler

    x0, noise, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([17, 503])
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        want = cls().add_noise(x0, noise, t)
        fs = FastdiffScheduler.from_scheduler(cls())
        torch.testing.assert_close(fs.add_noise(x0, noise, t), want, rtol=0, atol=0)  # was AttributeError
        fs.set_timesteps(10)
        torch.testing.assert_close(fs.add_noise(x0, noise, t), want, rtol=0, atol=0)  # was "not one of the run's"


# Forward-mode derivatives of attention on the CPU (where "auto" runs torch's SDPA, which has none): the reference.
def test_attention_jvp_and_hessian_on_the_cpu():
    q, k, v = (torch.randn(1, 2, 3, 8, dtype=torch.float64) for _ in range(3))
    tq = torch.randn_like(q)
    out, tan = torch.func.jvp(lambda a: fastdiff.ops.attention(a, k, v), (q,), (tq,))
    ref, rtan = torch.func.jvp(lambda a: fastdiff.reference.attention(a, k, v), (q,), (tq,))
    torch.testing.assert_close(tan, rtan)
    h = torch.func.hessian(lambda a: fastdiff.ops.attention(a, k, v).sum())(q)
    assert h.shape == q.shape * 2 and h.isfinite().all()


def test_frechet_distance_edges():
    from fastdiff.evaluation import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (200, 1)), rng.normal(2, 3, (300, 1))  # one feature: was a LinAlgError
    va, vb = np.var(a, ddof=1), np.var(b, ddof=1)
    want = (a.mean() - b.mean()) ** 2 + va + vb - 2 * np.sqrt(va * vb)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    f = rng.normal(size=(50, 6))
    assert frechet_distance(f, f) >= 0.0  # was -3.6e-15
    with pytest.raises(ValueError, match="^feats_a: expected .* 2 or more samples"):
        frechet_distance(f[:1], f)
    with pytest.raises(ValueError, match="^feats_b: expected 6 features"):
        frechet_distance(f, f[:, :5])
    with pytest.raises(ValueError, match="^feats_b: holds NaN"):
        frechet_distance(f, np.full((3, 6), np.nan))


def test_attention_layer_names_a_context_of_another_dtype():
    att = fastdiff.nn.Attention(8, context_dim=5, heads=2, dim_head=4)
    with pytest.raises(TypeError, match="^context: expected x's dtype torch.float32, got torch.float64"):
        att(torch.randn(1, 3, 8), torch.randn(1, 2, 5, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast mixes dtypes itself: fine
        assert att(torch.randn(1, 3, 8), torch.randn(1, 2, 5).bfloat16()).dtype == torch.bfloat16


def test_models_and_train_config_take_numpy_ints_and_save_them_as_json():
    # the models' and TrainConfig's size checks refused numpy ints (np.int64(8): "expected a positive int"), which
    # the fastdiff.nn layers took; taken now, and saved as JSON ints
    import json

    from fastdiff.models import NoisyClassifier
    from fastdiff.training import TrainConfig

    i = np.int64
    models = [UNet(i(8), i(1), i(8), i(1), i(1), channel_mult=(i(1), i(2)), num_groups=i(4), num_classes=i(3),
                   num_heads_upsample=i(2), context_dim=i(4)),
              NoisyClassifier(i(8), i(1), i(8), i(3), i(1), channel_mult=(1, 2), num_groups=i(4)),
              AutoencoderKL(in_channels=i(1), model_channels=i(8), channel_mult=(i(1), i(2)), num_res_blocks=i(1),
                            latent_channels=i(2), num_groups=i(4))]
    for m in models:
        text = json.dumps(m.config)  # raised TypeError on a numpy int
        assert type(m).from_config(json.loads(text)).config == m.config
        assert all(type(v) is not np.int64 for v in m.config.values())
    x = torch.randn(2, 1, 8, 8)
    assert models[0](x, torch.tensor([3, 5]), y=torch.tensor([0, 2]), context=torch.randn(2, 3, 4)).shape == x.shape
    cfg = TrainConfig(batch_size=i(4), steps=i(3), save_every=i(0))
    cfg.validate()
    assert json.loads(json.dumps(cfg.__dict__))["batch_size"] == 4 and type(cfg.steps) is int
    for bad, needle in [(dict(num_heads_upsample=0), "num_heads_upsample: expected -1 (num_heads) or a positive int"),
                        (dict(num_classes=True), "num_classes: expected None or a positive int"),
                        (dict(context_dim=i(0)), "context_dim: expected None or a positive int"),
                        (dict(num_groups=np.float64(4)), "num_groups: expected a positive int")]:
        with pytest.raises(ValueError, match="^" + re.escape(needle)):
            UNet(8, 1, 8, 1, 1, channel_mult=(1, 2), **{"num_groups": 4, **bad})
    with pytest.raises(ValueError, match="^batch_size: expected a positive int"):
        TrainConfig(batch_size=np.float64(4)).validate()


def test_model_constructor_arguments_are_named():
    # channel_mult=2 / attention_resolutions=8 raised "'int' object is not iterable", channel_mult=(1, inf) an
    # OverflowError; use_scale_shift_norm="no" built the scale-shift model (truthy string); AutoencoderKL took
    # dropout=1.0; null_context(-1) raised torch's error (found by a helper session acting as a model user)
    import math

    from fastdiff.models import NoisyClassifier

    kw = dict(channel_mult=(1, 2), num_groups=4)
    cases = [(lambda: UNet(8, 1, 8, 1, 1, **{**kw, "channel_mult": 2}), TypeError, "channel_mult: expected a sequence"),
             (lambda: UNet(8, 1, 8, 1, 1, attention_resolutions=8, **kw), TypeError,
              "attention_resolutions: expected a sequence"),
             (lambda: UNet(8, 1, 8, 1, 1, **{**kw, "channel_mult": (1, math.inf)}), ValueError, "channel_mult: "),
             (lambda: UNet(8, 1, 8, 1, 1, use_scale_shift_norm="no", **kw), TypeError,
              "use_scale_shift_norm: expected a bool"),
             (lambda: NoisyClassifier(8, 1, 8, 3, 1, resblock_updown="yes", **kw), TypeError,
              "resblock_updown: expected a bool"),
             (lambda: AutoencoderKL(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                    latent_channels=2, num_groups=4, dropout=1.0), ValueError, "dropout: "),
             (lambda: AutoencoderKL(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                    latent_channels=2, num_groups=4, mid_attention="no"), TypeError, "mid_attention: "),
             (lambda: UNet(8, 1, 8, 1, 1, context_dim=4, **kw).null_context(-1), ValueError, "batch_size: ")]
    for build, err, needle in cases:
        with pytest.raises(err, match="^" + re.escape(needle)):
            build()
    assert UNet(8, 1, 8, 1, 1, context_dim=4, **kw).null_context(np.int64(3)).shape == (3, 1, 4)


def test_diagonal_gaussian_refuses_shapes_that_broadcast():
    # nll(z) broadcast a (1, ...) z against a batch of 3 (sample() refused the same noise); an odd channel count
    # failed with a size mismatch deep inside
    from fastdiff.models import DiagonalGaussian

    g = DiagonalGaussian(torch.randn(3, 8, 4, 4))
    assert g.nll(g.sample()).shape == (3,)
    with pytest.raises(ValueError, match=r"^z: expected a tensor of the latent's shape \(3, 4, 4, 4\)"):
        g.nll(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"^parameters: expected \(N, 2 \* latent_channels, h, w\)"):
        DiagonalGaussian(torch.randn(1, 7, 2, 2))
