"""The README's Python examples run as written, and the signatures it prints are the real ones.

Each ```python block of README.md is executed with the names it takes from its surrounding prose (a `model`, an
`x`, a diffusers `pipe`, ...) defined by a small set-up here, on the CPU. Only sizes the README does not fix are
chosen here; where a block's own numbers would make the test slow (2,000 training steps, 50 sampling steps), the
runner replaces that one literal and checks first that it is still in the README. A block without a runner fails
`test_every_python_block_has_a_runner`, so a new example cannot go untested.
"""
import inspect
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastdiff

README = Path(__file__).resolve().parents[1] / "README.md"
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _python_blocks():
    """(first line number, code) of every ```python block."""
    blocks, code, start = [], None, 0
    for n, line in enumerate(README.read_text().splitlines(), 1):
        if code is None and line.strip() == "```python":
            code, start = [], n + 1
        elif code is not None and line.strip() == "```":
            blocks.append((start, "\n".join(code) + "\n"))
            code = None
        elif code is not None:
            code.append(line)
    return blocks


def _replace(code, old, new):
    assert old in code, f"the README example no longer contains {old!r}: update its runner in tests/test_readme.py"
    return code.replace(old, new)


def _signature_of_text(text, name):
    """The signature written as `name(...)` in text, parsed as a Python function definition."""
    m = re.search(re.escape(name) + r"\((.*?)\)(?:\s|`|$|#)", " ".join(text.split()))
    assert m, f"no signature of {name} in {text!r}"
    ns = {}
    exec(f"def _f({m.group(1)}): pass", ns)
    return inspect.signature(ns["_f"])


def _same_signature(written, func):
    real = inspect.signature(func)
    real = real.replace(parameters=[p for p in real.parameters.values() if p.name != "self"])
    got = [(p.name, p.kind, p.default) for p in written.parameters.values()]
    want = [(p.name, p.kind, p.default) for p in real.parameters.values()]
    assert got == want, f"README: {written}\nreal:   {real}"


def _tiny_unet(in_channels=4, context_dim=None, num_classes=None, image_size=16, **kw):
    from fastdiff.models import UNet

    return UNet(image_size=image_size, in_channels=in_channels, model_channels=32, out_channels=in_channels,
                num_res_blocks=1, attention_resolutions=(8,), channel_mult=(1, 2), num_head_channels=8,
                context_dim=context_dim, num_classes=num_classes, **kw).eval()


def _sd_scheduler_config():
    # Stable Diffusion 1.5's scheduler config (as pipe.scheduler.config holds it), without needing diffusers.
    return {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None, "set_alpha_to_one": False,
            "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}


# --- one runner per block, keyed by a text of its first line ---

def _run_set_backend(code):
    model = fastdiff.nn.GroupNorm(4, 8, activation="silu")
    with torch.no_grad():
        model.weight.normal_()
        model.bias.normal_()
    x = torch.randn(2, 8, 5, 5)
    ns = {"model": model, "x": x}
    exec(code, ns)
    with torch.no_grad():
        want = F.silu(F.group_norm(x, 4, model.weight, model.bias, model.eps))
        torch.testing.assert_close(ns["y_ref"], want)
        torch.testing.assert_close(ns["reference"](x), want)


def _run_group_norm_signature(code):
    _same_signature(_signature_of_text(code, "fastdiff.ops.group_norm"), fastdiff.ops.group_norm)


def _run_layers(code):
    torch_groupnorm = torch.nn.GroupNorm(32, 320)
    with torch.no_grad():
        torch_groupnorm.weight.normal_()
        torch_groupnorm.bias.normal_()
    x = torch.randn(2, 320, 6, 6)
    ns = {"fastdiff": fastdiff, "torch_groupnorm": torch_groupnorm, "x": x, "emb": torch.randn(2, 1280)}
    exec(_replace(code, "y = ada(x, emb)", "y_norm = y\ny = ada(x, emb)"), ns)
    with torch.no_grad():
        torch.testing.assert_close(ns["y_norm"], F.silu(torch_groupnorm(x)))
    assert ns["y"].shape == x.shape


def _run_attention_signature(code):
    _same_signature(_signature_of_text(code, "fastdiff.ops.attention"), fastdiff.ops.attention)


def _run_more_layers(code):
    ns = {"fastdiff": fastdiff, "x": torch.randn(2, 24, 320), "text_emb": torch.randn(2, 77, 768),
          "feature_map": torch.randn(2, 256, 6, 5)}
    exec(_replace(code, "y = blk(", "y_attn = y\ny = blk("), ns)
    assert ns["y_attn"].shape == (2, 24, 320)
    assert ns["y"].shape == (2, 256, 6, 5)


def _run_sampling(code):
    unet = _tiny_unet(context_dim=768)
    # a stand-in for a pipeline's DPMSolverMultistepScheduler (from_scheduler goes by the class name)
    scheduler = type("DPMSolverMultistepScheduler", (), {"config": _sd_scheduler_config()})()
    ns = {"pipe": types.SimpleNamespace(scheduler=scheduler),
          "unet": unet, "text_emb": torch.randn(4, 77, 768), "null_emb": torch.randn(4, 77, 768)}
    code = _replace(code, "(4, 4, 64, 64)", "(4, 4, 16, 16)")
    code = _replace(code, "num_inference_steps=25", "num_inference_steps=3, progress=False")
    exec(code, ns)
    images = ns["images"]
    assert images.shape == (4, 4, 16, 16) and torch.isfinite(images).all()


def _run_diffusers_style_loop(code):
    from fastdiff.diffusion import DDIMSampler

    unet = _tiny_unet(context_dim=32).to(_DEVICE)  # the example runs on "cuda" where there is a GPU
    n = 2
    ns = {"torch": torch, "sampler": DDIMSampler.from_config(_sd_scheduler_config()), "unet": unet, "n": n,
          "shape": (n, 4, 16, 16), "ctx2": torch.randn(2 * n, 77, 32, device=_DEVICE)}
    code = _replace(code, "set_timesteps(50,", "set_timesteps(3,")
    with torch.no_grad():
        exec(code.replace('device="cuda"', f'device="{_DEVICE}"'), ns)
    assert ns["x"].shape == (n, 4, 16, 16) and torch.isfinite(ns["x"]).all()


def _run_models(code):
    # The README's own sizes: the ADM 64x64 ImageNet U-Net (~100 M parameters) and its classifier, one image.
    x = torch.randn(1, 3, 64, 64)
    t = torch.tensor([500])
    y = torch.tensor([7])
    ns = {"fastdiff": fastdiff, "x": x, "timesteps": t, "labels": y, "x_t": x, "t": t, "y": y}
    with torch.no_grad():  # as in a sampling loop: log_prob_grad turns autograd on itself
        exec(code, ns)
    assert ns["eps"].shape == (1, 6, 64, 64)
    torch.testing.assert_close(ns["eps"], ns["ref"], rtol=1e-4, atol=1e-4)
    assert ns["z"].shape == (1, 4, 16, 16) and ns["x_hat"].shape == x.shape
    assert ns["grad"].shape == x.shape and torch.isfinite(ns["grad"]).all()


def _run_trainer(code, tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn (pip install 'fastdiff[train]')")
    monkeypatch.chdir(tmp_path)  # the example writes runs/digits under the current directory
    unet = _tiny_unet(in_channels=1, num_classes=10, learn_null_class=True).train()
    exec(_replace(code, "steps=2000", "steps=2, batch_size=4"), {"unet": unet})
    assert (tmp_path / "runs" / "digits").is_dir()


def _diffusers_pipe():
    diffusers = pytest.importorskip("diffusers", reason="needs diffusers (pip install 'fastdiff[diffusers]')")
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,),
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=32).eval()
    scheduler = diffusers.DDIMScheduler(**{k: v for k, v in _sd_scheduler_config().items() if k[0] != "_"})
    return types.SimpleNamespace(unet=unet, vae=vae, scheduler=scheduler)


def _run_diffusers_patch(code):
    pipe = _diffusers_pipe()
    ns = {"pipe": pipe}
    exec(code, ns)
    assert ns["n"] > 0
    assert not any(type(m).__module__.startswith("fastdiff") for m in pipe.unet.modules())


def _run_diffusers_sample(code):
    pipe = _diffusers_pipe()
    ns = {"fastdiff": fastdiff, "pipe": pipe, "text_emb": torch.randn(1, 77, 32), "null_emb": torch.randn(1, 77, 32)}
    code = _replace(code, "(1, 4, 64, 64)", "(1, 4, 16, 16)")
    exec(_replace(code, "num_inference_steps=50", "num_inference_steps=3, progress=False"), ns)
    assert ns["latents"].shape == (1, 4, 16, 16) and torch.isfinite(ns["latents"]).all()


def _run_sdxl_sample(code):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8).eval()
    pipe = types.SimpleNamespace(unet=unet, scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear"))
    ns = {"fastdiff": fastdiff, "pipe": pipe, "prompt_embeds": torch.randn(1, 7, 16),
          "negative_prompt_embeds": torch.randn(1, 7, 16), "pooled": torch.randn(1, 12),
          "negative_pooled": torch.zeros(1, 12), "add_time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    code = _replace(code, "(1, 4, 128, 128)", "(1, 4, 16, 16)")
    with torch.no_grad():
        exec(_replace(code, "num_inference_steps=30", "num_inference_steps=2, progress=False"), ns)
    assert ns["latents"].shape == (1, 4, 16, 16) and torch.isfinite(ns["latents"]).all()


def _run_sd3_sample(code):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    torch.manual_seed(0)
    tr = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                         num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                         pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16).eval()
    pipe = types.SimpleNamespace(transformer=tr, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    ns = {"fastdiff": fastdiff, "pipe": pipe, "prompt_embeds": torch.randn(1, 5, 16),
          "negative_prompt_embeds": torch.randn(1, 5, 16), "pooled": torch.randn(1, 12),
          "negative_pooled": torch.randn(1, 12)}
    code = _replace(code, "(1, 16, 128, 128)", "(1, 4, 8, 8)")
    with torch.no_grad():
        exec(_replace(code, "num_inference_steps=28", "num_inference_steps=2, progress=False"), ns)
    assert ns["latents"].shape == (1, 4, 8, 8) and torch.isfinite(ns["latents"]).all()


def _run_fastdiff_scheduler(code):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(32, 32), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    pipe = diffusers.DDPMPipeline(unet, diffusers.DPMSolverMultistepScheduler())  # a stand-in: prompt-free
    pipe.set_progress_bar_config(disable=True)
    ns = {"pipe": pipe, "torch": torch}
    exec(_replace(code, "num_inference_steps=25", "num_inference_steps=3, output_type='np'"), ns)
    from fastdiff.integrations.diffusers import FastdiffScheduler
    assert isinstance(pipe.scheduler, FastdiffScheduler) and ns["images"].shape == (1, 8, 8, 3)


def _run_custom_timesteps(code):
    from fastdiff.diffusion import DPMSolverPPSampler

    unet = _tiny_unet(context_dim=32).to(_DEVICE)
    scheduler = types.SimpleNamespace(config=_sd_scheduler_config())
    seen = []
    unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(int(args[1].reshape(-1)[0])), with_kwargs=True)
    ns = {"pipe": types.SimpleNamespace(scheduler=scheduler), "DPMSolverPPSampler": DPMSolverPPSampler,
          "fastdiff": fastdiff, "unet": unet, "ctx": torch.randn(1, 7, 32, device=_DEVICE),
          "uctx": torch.randn(1, 7, 32, device=_DEVICE)}
    code = _replace(code, 'device="cuda"', f"device={_DEVICE!r}")
    code = _replace(code, "(1, 4, 64, 64)", "(1, 4, 16, 16)")
    code = _replace(code, "guidance_scale=7.5)", "guidance_scale=7.5, progress=False)")
    exec(code, ns)
    assert ns["latents"].shape == (1, 4, 16, 16) and torch.isfinite(ns["latents"]).all()
    assert seen == ns["ays"]  # one batched (CFG) model call at each of the custom timesteps


def _run_ddim_inversion(code):
    from fastdiff.diffusion import DDIMInverseSampler, DDIMSampler

    unet = _tiny_unet(context_dim=32).to(_DEVICE)
    g = torch.Generator().manual_seed(0)
    ns = {"pipe": types.SimpleNamespace(scheduler=types.SimpleNamespace(config=_sd_scheduler_config())),
          "DDIMInverseSampler": DDIMInverseSampler, "DDIMSampler": DDIMSampler, "fastdiff": fastdiff, "unet": unet,
          "latents": torch.randn(1, 4, 16, 16, generator=g).to(_DEVICE),
          "ctx": torch.randn(1, 7, 32, generator=g).to(_DEVICE), "edited_ctx": torch.randn(1, 7, 32).to(_DEVICE)}
    code = _replace(code, "num_inference_steps=50)", "num_inference_steps=4, progress=False)")
    exec(code, ns)
    assert ns["x_T"].shape == ns["x0"].shape == (1, 4, 16, 16)
    assert torch.isfinite(ns["x_T"]).all() and torch.isfinite(ns["x0"]).all()
    assert not torch.allclose(ns["x_T"], ns["latents"])


_RUNNERS = {
    "inv = DDIMInverseSampler.from_config": _run_ddim_inversion,
    'with fastdiff.set_backend("torch")': _run_set_backend,
    "y = fastdiff.ops.group_norm(": _run_group_norm_signature,
    "norm = fastdiff.nn.GroupNorm(": _run_layers,
    "out = fastdiff.ops.attention(": _run_attention_signature,
    "attn = fastdiff.nn.Attention(": _run_more_layers,
    "from fastdiff.diffusion import": _run_sampling,
    "sampler.set_timesteps(50": _run_diffusers_style_loop,
    "ays = [999, 850": _run_custom_timesteps,
    "from fastdiff.models import": _run_models,
    "from fastdiff.training import Trainer": _run_trainer,
    "from fastdiff.integrations.diffusers import patch": _run_diffusers_patch,
    "sampler = fastdiff.diffusion.DDIMSampler.from_config": _run_diffusers_sample,
    "# SDXL: the U-Net's pooled": _run_sdxl_sample,
    "# SD3: a flow-matching transformer": _run_sd3_sample,
    "from fastdiff.integrations.diffusers import FastdiffScheduler": _run_fastdiff_scheduler,
}


def _runner(code):
    head = "\n".join(code.splitlines()[:2])
    found = [r for key, r in _RUNNERS.items() if key in head]
    return found[0] if len(found) == 1 else None


def test_every_python_block_has_a_runner():
    blocks = _python_blocks()
    assert len(blocks) >= len(_RUNNERS)
    missing = [line for line, code in blocks if _runner(code) is None]
    assert not missing, f"README python blocks at lines {missing} have no runner in tests/test_readme.py"
    used = {_runner(code) for _, code in blocks}
    assert used == set(_RUNNERS.values()), "a runner in tests/test_readme.py matches no README block"


@pytest.mark.parametrize("line,code", _python_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_example_runs(line, code, tmp_path, monkeypatch):
    run = _runner(code)
    assert run is not None, f"README line {line}: no runner"
    if "tmp_path" in inspect.signature(run).parameters:
        run(code, tmp_path, monkeypatch)
    else:
        run(code)


def test_readme_prose_signatures():
    """The signatures the README spells out in prose: fastdiff.sample and Sampler.step."""
    from fastdiff.diffusion import DDIMSampler

    text = README.read_text()
    _same_signature(_signature_of_text(text, "`fastdiff.sample"), fastdiff.sample)
    _same_signature(_signature_of_text(text, "`step"), DDIMSampler.step)


def _command_lines():
    """The `fastdiff ...` and `python -m fastdiff.training ...` command lines of the README's code blocks."""
    lines, in_block = [], False
    for n, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block
            continue
        cmd = line.split("#", 1)[0].strip().removeprefix("$ ")
        if in_block and re.match(r"(fastdiff [a-z]|python -m fastdiff\.|torchrun .*-m fastdiff\.)", cmd):
            lines.append((n, cmd))
    return lines


def test_readme_command_lines_parse():
    """Every command line the README shows parses with the real argument parser (flags renamed or dropped fail)."""
    import argparse
    import shlex

    from fastdiff.cli import build_parser
    from fastdiff.training.cli import add_train_arguments

    lines = _command_lines()
    assert len(lines) >= 10
    for n, cmd in lines:
        argv = shlex.split(cmd)
        if argv[0] == "fastdiff":
            parser, args = build_parser(), argv[1:]
        else:
            parser, args = add_train_arguments(argparse.ArgumentParser()), argv[argv.index("fastdiff.training") + 1:]
        parser.exit = parser.error = lambda *a, **k: pytest.fail(f"README line {n}: {cmd!r} does not parse: {a}")
        for action in parser._actions:  # the subcommands' parsers too
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    sub.exit = sub.error = parser.error
        parser.parse_args(args)
