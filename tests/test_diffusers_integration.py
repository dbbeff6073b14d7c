"""fastdiff.integrations.diffusers on small random-weight diffusers models, on the CPU.

Models: UNet2DModel (default time-embedding norm, AttnDown/AttnUp blocks), UNet2DModel with scale_shift norms,
resnet down/up-sampling blocks and class labels, UNet2DConditionModel (cross attention), AutoencoderKL (mid-block
attention with its GroupNorm). For each: patched == unpatched, the replacement count, unpatch restores exactly,
state_dict unchanged, torch.compile; and fastdiff.sample over a diffusers U-Net equals a diffusers DDIM loop.
"""
import copy
import functools
import gc
import importlib.util
import io
import os
import subprocess
import sys
import types
import weakref

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'fastdiff[diffusers]')")

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.diffusion import DDIMSampler  # noqa: E402
from fastdiff.integrations import diffusers as fdd  # noqa: E402

_HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unet2d():
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)


def _unet2d_scale_shift():
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), norm_num_groups=8,
                       attention_head_dim=8, resnet_time_scale_shift="scale_shift", num_class_embeds=10)


def _unet_cond():
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)


def _vae():
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                         norm_num_groups=8, layers_per_block=1)


# name -> (factory, call(model, inputs), make inputs(dtype), replacements expected)
# counts: 2 per ResnetBlock2D (norm1+SiLU, norm2(+AdaGN)+SiLU) + 1 per attention processor + conv_norm_out+conv_act
# + 1 per other GroupNorm (UNet2DConditionModel: the Transformer2DModel input norms).
CASES = {
    "unet2d": (_unet2d, lambda m, a: m(a["x"], a["t"]).sample, 8 * 2 + 4 + 1),
    "unet2d_scale_shift": (_unet2d_scale_shift, lambda m, a: m(a["x"], a["t"], class_labels=a["y"]).sample,
                           9 * 2 + 4 + 1),
    "unet_cond": (_unet_cond, lambda m, a: m(a["x4"], a["t"], encoder_hidden_states=a["ctx"]).sample,
                  8 * 2 + 8 + 1 + 4),
    "vae": (_vae, lambda m, a: m(a["x"]).sample, 10 * 2 + 2 + 2),
}


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 3, 16, 16, generator=g).to(dtype), "x4": torch.randn(2, 4, 16, 16, generator=g).to(dtype),
            "ctx": torch.randn(2, 7, 16, generator=g).to(dtype), "t": torch.tensor([10, 700]),
            "y": torch.tensor([1, 7])}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: f().eval() for name, (f, _, _) in CASES.items()}


def _expected_count(model):
    n = 0
    for m in model.modules():
        if isinstance(m, ResnetBlock2D):
            n += 2
        elif isinstance(m, Attention):
            n += 1
    gns = [m for m in model.modules() if type(m) is torch.nn.GroupNorm]
    owned = {id(m.norm1) for m in model.modules() if isinstance(m, ResnetBlock2D)}
    owned |= {id(m.norm2) for m in model.modules() if isinstance(m, ResnetBlock2D)}
    owned |= {id(m.group_norm) for m in model.modules() if isinstance(m, Attention)}
    return n + sum(1 for g in gns if id(g) not in owned)


def _snapshot(model):
    return ({n: m for n, m in model.named_modules()},
            {n: m.processor for n, m in model.named_modules() if isinstance(m, Attention)},
            {n: m.__dict__.get("forward") for n, m in model.named_modules()})


@pytest.mark.parametrize("name", list(CASES))
def test_patch_matches_unpatched_and_unpatch_restores(models, name):
    _, call, expected = CASES[name]
    model = models[name]
    a = _inputs()
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    before = _snapshot(model)
    counted = _expected_count(model)
    with torch.no_grad():
        ref = call(model, a)
        n = fdd.patch(model)
        try:
            assert n == expected == counted
            assert fdd.is_patched(model)
            # state_dict: the same keys, the same tensors (nothing copied)
            assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
            assert all(isinstance(m.processor, fdd.FastdiffAttnProcessor)
                       for m in model.modules() if isinstance(m, Attention))
            # the GroupNorm modules left are those the fused resnet forwards and attention processors run
            owned = {id(g) for m in model.modules() if isinstance(m, ResnetBlock2D) for g in (m.norm1, m.norm2)}
            owned |= {id(m.group_norm) for m in model.modules() if isinstance(m, Attention)}
            assert all(id(m) in owned for m in model.modules() if type(m) is torch.nn.GroupNorm)
            out = call(model, a)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
            assert fdd.patch(model) == 0  # idempotent
        finally:
            assert fdd.unpatch(model) == n  # the layers patch replaced (it counted undo steps: 22 for 29)
        assert not fdd.is_patched(model)
        after = _snapshot(model)
        assert after[0].keys() == before[0].keys() and all(after[0][k] is before[0][k] for k in before[0])
        assert all(after[1][k] is before[1][k] for k in before[1])
        assert after[2] == before[2]
        assert torch.equal(call(model, a), ref)
        assert fdd.unpatch(model) == 0


@pytest.mark.parametrize("name", list(CASES))
def test_patched_bfloat16(models, name):
    _, call, _ = CASES[name]
    model = copy.deepcopy(models[name]).to(torch.bfloat16)
    a = _inputs(torch.bfloat16)
    with torch.no_grad():
        ref = call(model, a).float()
        fdd.patch(model)
        out = call(model, a).float()
    torch.testing.assert_close(out, ref, atol=5e-2 * ref.abs().max().item(), rtol=5e-2)


def test_load_state_dict_after_patch(models):
    src = models["unet2d_scale_shift"]
    model = _unet2d_scale_shift().eval()
    fdd.patch(model)
    model.load_state_dict(src.state_dict())  # strict: the keys are unchanged
    a = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(CASES["unet2d_scale_shift"][1](model, a), CASES["unet2d_scale_shift"][1](src, a),
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["unet_cond", "vae"])
def test_unpatch_keeps_weights_assigned_after_patch(models, name):
    # load_state_dict(assign=True) (or accelerate / to_empty) replaces the Parameter objects of the fused
    # layers: unpatch must put back the original layers holding those, not the weights from before the patch
    make, run, _ = CASES[name]
    src = copy.deepcopy(models[name])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # weights unlike the fresh model's
        for p in src.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model = make().eval()
    fdd.patch(model)
    model.load_state_dict(src.state_dict(), assign=True)
    fdd.unpatch(model)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    a = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(run(model, a), run(src, a), atol=0, rtol=0)


class _HalfProcessor:
    """A user's processor (as IP-Adapter or a LoRA loader installs with set_attn_processor): the default one, halved."""

    def __init__(self):
        self.inner = AttnProcessor()

    def __call__(self, *args, **kwargs):
        return 0.5 * self.inner(*args, **kwargs)


def test_unpatch_keeps_what_was_set_after_patch(models):
    # processors, modules and forwards that the user sets after patch are theirs: unpatch restores only what patch
    # put in and is still there (it used to put AttnProcessor2_0 back over an IP-Adapter's processors)
    model = copy.deepcopy(models["unet_cond"])
    _, call, _ = CASES["unet_cond"]
    a = _inputs()
    fdd.patch(model)
    model.set_attn_processor(_HalfProcessor())
    block = model.down_blocks[1].resnets[0]
    block.forward = types.MethodType(ResnetBlock2D.forward, block)  # e.g. a hook wrapping the forward
    tr = model.down_blocks[0].attentions[0]
    norm = torch.nn.GroupNorm(8, 32, eps=1e-3)
    norm.load_state_dict(tr.norm.state_dict())
    tr.norm = norm
    with torch.no_grad():
        ref = call(model, a)
        fdd.unpatch(model)
        assert all(isinstance(p, _HalfProcessor) for p in model.attn_processors.values())
        assert tr.norm is norm and block.__dict__["forward"].__func__ is ResnetBlock2D.forward
        torch.testing.assert_close(call(model, a), ref, atol=2e-5, rtol=1e-4)


def test_attention_mask_falls_back(models):
    model = copy.deepcopy(models["unet_cond"])
    attn = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    h, ctx = torch.randn(2, 64, 32), torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, -2:] = False
    with torch.no_grad():
        ref_mask, ref = attn(h, ctx, attention_mask=mask), attn(h, ctx)
        fdd.patch(model)
        assert isinstance(attn.processor, fdd.FastdiffAttnProcessor)
        torch.testing.assert_close(attn(h, ctx, attention_mask=mask), ref_mask)
        torch.testing.assert_close(attn(h, ctx), ref, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(ref, ref_mask)


def test_unsupported_parts_are_left_alone():
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=8, groups=4, non_linearity="mish").eval()
    attn = Attention(16, heads=2, dim_head=8)
    custom = AttnProcessor()
    attn.set_processor(lambda *a, **k: custom(*a, **k))  # a user's own processor
    root = torch.nn.ModuleDict({"block": block, "attn": attn})
    # the resnet's norms are still fused on their own (not with the mish), the custom processor is kept
    assert fdd.patch(root) == 2
    assert "forward" not in block.__dict__
    assert not isinstance(attn.processor, fdd.FastdiffAttnProcessor)
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 8)
    with torch.no_grad():
        out = block(x, temb)
        fdd.unpatch(root)
        torch.testing.assert_close(out, block(x, temb), atol=1e-5, rtol=1e-4)


def test_resnet_output_scale_factor_and_up_down():
    torch.manual_seed(0)
    for kw in ({"output_scale_factor": 2.0}, {"up": True}, {"down": True}, {"skip_time_act": True},
               {"time_embedding_norm": "scale_shift", "out_channels": 32}, {"temb_channels": None}):
        block = ResnetBlock2D(in_channels=16, temb_channels=kw.pop("temb_channels", 8), groups=4, **kw).eval()
        x = torch.randn(2, 16, 8, 8)
        temb = torch.randn(2, 8) if block.time_emb_proj is not None else None
        with torch.no_grad():
            ref = block(x, temb)
            assert fdd.patch(block) == 2
            assert block.__dict__["forward"].func is fdd._resnet_forward
            torch.testing.assert_close(block(x, temb), ref, atol=2e-5, rtol=1e-4)
            fdd.unpatch(block)


@pytest.mark.parametrize("make", [_unet_cond, lambda: ResnetBlock2D(in_channels=16, temb_channels=8, groups=4)])
def test_dropped_patched_model_is_freed(make):
    # _UNDO holds the model weakly, but its undo steps held the model itself (the parent of conv_norm_out, or the
    # patched block as the model): a patched model dropped without unpatch was never freed
    model = make()
    assert fdd.patch(model) > 0
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_patched_model_pickles(models):
    # the module docstring promises pickling untouched: torch.save of a patched model failed on the bound method
    # the resnet blocks' forward was ("'ResnetBlock2D' object has no attribute '_resnet_forward'" on load)
    model = copy.deepcopy(models["unet2d_scale_shift"])
    _, call, _ = CASES["unet2d_scale_shift"]
    a = _inputs()
    fdd.patch(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    block = loaded.down_blocks[0].resnets[0]
    assert block.__dict__["forward"].func is fdd._resnet_forward and block.__dict__["forward"].args[0] is block
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, a), call(model, a), atol=0, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"skip_time_act": True}])
def test_resnet_without_its_time_embedding_fails_as_diffusers(kw):
    # a time-conditioned block called with temb=None: diffusers fails; the fused forward ran it unconditioned
    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4, **kw).eval()
    x = torch.randn(1, 16, 4, 4)
    with pytest.raises((TypeError, AttributeError)):
        block(x, None)
    fdd.patch(block)
    with pytest.raises((TypeError, AttributeError)):
        block(x, None)


@pytest.mark.parametrize("name", ["unet_cond", "vae"])
def test_torch_compile(models, name):
    _, call, _ = CASES[name]
    model = copy.deepcopy(models[name])
    a = _inputs()
    with torch.no_grad():
        ref = call(model, a)
        fdd.patch(model)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(call(compiled, a), ref, atol=2e-5, rtol=1e-4)


def _ddim_loop(unet, scheduler, shape, seed, steps, ctx=None, uctx=None, guidance=1.0):
    """A diffusers DDIM loop with fastdiff.sample's initial noise."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        if guidance != 1.0:
            eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([ctx, uctx])).sample
            cond, unc = eps.chunk(2)
            eps = unc + guidance * (cond - unc)
        elif ctx is not None:
            eps = unet(x, t, encoder_hidden_states=ctx).sample
        else:
            eps = unet(x, t).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


def test_sample_with_diffusers_unet_and_scheduler(models):
    unet = copy.deepcopy(models["unet2d"])
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    with torch.no_grad():
        ref = _ddim_loop(unet, scheduler, (2, 3, 16, 16), seed=3, steps=4)
    fdd.patch(unet)
    sampler = DDIMSampler.from_config(scheduler.config)
    out = fastdiff.sample(unet, sampler, (2, 3, 16, 16), num_inference_steps=4, seed=3, progress=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_sample_with_diffusers_cond_unet_cfg(models):
    unet = copy.deepcopy(models["unet_cond"])
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    g = torch.Generator().manual_seed(5)
    ctx, uctx = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    with torch.no_grad():
        ref = _ddim_loop(unet, scheduler, (2, 4, 16, 16), seed=4, steps=3, ctx=ctx, uctx=uctx, guidance=4.0)
    fdd.patch(unet)
    out = fastdiff.sample(unet, DDIMSampler.from_config(scheduler.config), (2, 4, 16, 16), context=ctx,
                          uncond_context=uctx, guidance_scale=4.0, num_inference_steps=3, seed=4, progress=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_sample_with_class_labels(models):
    unet = models["unet2d_scale_shift"]
    m = fdd.sampling_model(unet)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 5]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y=y), unet(x, t, class_labels=y).sample)
    assert fdd.sampling_model(m) is m
    plain = torch.nn.Conv2d(3, 3, 1)
    assert fdd.sampling_model(plain) is plain
    with pytest.raises(TypeError, match="context"):
        m(x, t, context=torch.randn(2, 7, 16))


def test_sample_refuses_labels_a_unet_would_ignore(models):
    # UNet2DConditionModel accepts class_labels without a class embedding and drops them: y (and guidance on
    # uncond_y) would silently do nothing
    unet = models["unet_cond"]
    assert unet.class_embedding is None
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.randn(1, 7, 16)
    with pytest.raises(TypeError, match="y: UNet2DConditionModel"):
        fdd.sampling_model(unet)(x, t, y=torch.tensor([1]), context=ctx)
    with pytest.raises(TypeError, match="class_labels"):
        fastdiff.sample(unet, DDIMSampler(), (1, 4, 16, 16), context=ctx, y=torch.tensor([3]),
                        uncond_y=torch.tensor([0]), guidance_scale=7.5, num_inference_steps=1, seed=0, progress=False)


def test_fastdiff_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import fastdiff, fastdiff.integrations\n"
            "assert 'fastdiff.integrations.diffusers' not in sys.modules\n"
            "try:\n    import fastdiff.integrations.diffusers\nexcept ImportError as e:\n"
            "    assert 'fastdiff[diffusers]' in str(e), e\nelse:\n    raise SystemExit('imported')\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def _cfg_loop(call, scheduler, shape, seed, steps, cond, uncond, guidance, init_sigma=1.0):
    """A diffusers-style loop with classifier-free guidance: call(x, t, kwargs) -> prediction."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * init_sigma
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        c, u = call(x_in, t.expand(shape[0]), cond), call(x_in, t.expand(shape[0]), uncond)
        x = scheduler.step(u + guidance * (c - u), t, x).prev_sample
    return x


def test_sample_sdxl_style_unet_with_added_cond_kwargs():
    # SDXL's U-Net needs added_cond_kwargs (pooled text embeddings and size ids), which fastdiff.sample could not
    # pass: model_kwargs / uncond_model_kwargs carry them, joined for the batched CFG call
    from diffusers import EulerDiscreteScheduler

    from fastdiff.diffusion import from_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8).eval()
    g = torch.Generator().manual_seed(2)
    ctx, uctx = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    pooled, upooled = torch.randn(2, 12, generator=g), torch.zeros(2, 12)
    ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    cond = {"encoder_hidden_states": ctx, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    uncond = {"encoder_hidden_states": uctx, "added_cond_kwargs": {"text_embeds": upooled, "time_ids": ids}}
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with torch.no_grad():
        ref = _cfg_loop(lambda x, t, kw: unet(x, t, **kw).sample, scheduler, (2, 4, 16, 16), 3, 4, cond, uncond, 5.0,
                        init_sigma=float(scheduler.init_noise_sigma))
    calls = []
    unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    out = fastdiff.sample(unet, from_scheduler(scheduler), (2, 4, 16, 16), context=ctx, uncond_context=uctx,
                          model_kwargs={"added_cond_kwargs": cond["added_cond_kwargs"]},
                          uncond_model_kwargs={"added_cond_kwargs": uncond["added_cond_kwargs"]},
                          guidance_scale=5.0, num_inference_steps=4, seed=3, progress=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert calls == [4] * 4  # one batched call per step


def test_sample_sd3_style_transformer_with_flow_matching():
    # the SD3 / Flux transformers take the timestep after encoder_hidden_states (it was passed second, into
    # encoder_hidden_states) and need pooled_projections (model_kwargs)
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from fastdiff.diffusion import from_scheduler

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                               pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16).eval()
    g = torch.Generator().manual_seed(2)
    ctx, uctx = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    pooled, upooled = torch.randn(2, 12, generator=g), torch.randn(2, 12, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with torch.no_grad():
        ref = _cfg_loop(lambda x, t, kw: tr(x, timestep=t, **kw).sample, scheduler, (2, 4, 8, 8), 5, 4,
                        {"encoder_hidden_states": ctx, "pooled_projections": pooled},
                        {"encoder_hidden_states": uctx, "pooled_projections": upooled}, 7.0)
    out = fastdiff.sample(tr, from_scheduler(scheduler), (2, 4, 8, 8), context=ctx, uncond_context=uctx,
                          model_kwargs={"pooled_projections": pooled}, uncond_model_kwargs={"pooled_projections": upooled},
                          guidance_scale=7.0, num_inference_steps=4, seed=5, progress=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_sample_model_kwargs_errors():
    model = lambda x, t, **kw: x  # noqa: E731
    s = DDIMSampler()
    for kw, err, needle in [(dict(model_kwargs=[1]), TypeError, "^model_kwargs:"),
                            (dict(model_kwargs={"context": 1}), ValueError, "^model_kwargs: 'context'"),
                            (dict(model_kwargs={"a": 1}, uncond_model_kwargs={"b": 1}), ValueError,
                             "^uncond_model_kwargs: expected the keys")]:
        with pytest.raises(err, match=needle):
            fastdiff.sample(model, s, (1, 3, 4, 4), num_inference_steps=2, progress=False, **kw)
    # uncond_model_kwargs alone is a condition to guide against; shared values reach both branches unchanged
    seen = []

    def m(x, t, scale=None, emb=None):
        seen.append((x.shape[0], scale, None if emb is None else emb.shape[0]))
        return x * 0.1

    fastdiff.sample(m, s, (2, 3, 4, 4), num_inference_steps=1, guidance_scale=2.0, progress=False,
                    model_kwargs={"scale": float("0.5"), "emb": torch.ones(2, 3)},
                    uncond_model_kwargs={"scale": float("0.5"), "emb": torch.zeros(2, 3)})
    assert seen == [(4, 0.5, 4)]  # equal numbers and per-sample tensors: one batched call
    seen.clear()
    fastdiff.sample(m, s, (2, 3, 4, 4), num_inference_steps=1, guidance_scale=2.0, progress=False,
                    model_kwargs={"scale": 0.5}, uncond_model_kwargs={"scale": 0.7})
    assert seen == [(2, 0.5, None), (2, 0.7, None)]  # values that differ: a call per branch


def test_sample_model_kwargs_tuple_of_per_sample_tensors():
    # ControlNet-style residuals: a tuple of per-sample tensors, the same for both branches. The tuple went to
    # the batched CFG call as it was (N rows for a 2N batch): a shape error for N > 1. Joined item by item.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8).eval()
    g = torch.Generator().manual_seed(2)
    ctx, uctx = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    shapes = ((32, 16), (32, 16), (32, 8), (64, 8))  # the down blocks' residuals at 16 x 16
    down = tuple(torch.randn(2, c, s, s, generator=g) * 0.1 for c, s in shapes)
    mid = torch.randn(2, 64, 8, 8, generator=g) * 0.1
    extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with torch.no_grad():
        ref = _cfg_loop(lambda x, t, kw: unet(x, t, **kw).sample, scheduler, (2, 4, 16, 16), 3, 3,
                        {"encoder_hidden_states": ctx, **extra}, {"encoder_hidden_states": uctx, **extra},
                        5.0)
    calls = []
    unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    out = fastdiff.sample(unet, DDIMSampler.from_config(scheduler.config), (2, 4, 16, 16), context=ctx,
                          uncond_context=uctx, model_kwargs=extra, guidance_scale=5.0, num_inference_steps=3,
                          seed=3, progress=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert calls == [4] * 3  # one batched call per step
    # lists too, each branch its own: joined item by item, one batched call
    seen = []

    def m(x, t, embs=None):
        seen.append((x.shape[0], [e.shape[0] for e in embs]))
        return x * 0.1

    fastdiff.sample(m, DDIMSampler(), (2, 3, 4, 4), num_inference_steps=1, guidance_scale=2.0, progress=False,
                    model_kwargs={"embs": [torch.ones(2, 3), torch.ones(2, 5)]},
                    uncond_model_kwargs={"embs": [torch.zeros(2, 3), torch.zeros(2, 5)]})
    assert seen == [(4, [4, 4])]


def test_sample_model_kwargs_device_move_keeps_shared_values_shared():
    # a tensor both branches share (Flux-style position ids, not per-sample) goes once to the batched CFG call
    # only while it is the same object in both: moving each branch's kwargs to the device separately made two
    # copies (on a GPU, of CPU tensors), and every step ran as two model calls. A tensor whose .to() copies
    # stands in for the move here.
    class _Moves(torch.Tensor):
        def to(self, *args, **kwargs):
            return torch.Tensor.to(self, *args, **kwargs).as_subclass(torch.Tensor).clone()

    seen = []

    def m(x, t, ids=None, emb=None):
        seen.append((x.shape[0], ids.shape[0], emb.shape[0]))
        return x * 0.1

    ids = torch.zeros(7, 3).as_subclass(_Moves)
    fastdiff.sample(m, DDIMSampler(), (2, 3, 4, 4), num_inference_steps=1, guidance_scale=2.0, progress=False,
                    model_kwargs={"ids": ids, "emb": torch.ones(2, 5)},
                    uncond_model_kwargs={"ids": ids, "emb": torch.zeros(2, 5)})
    assert seen == [(4, 7, 4)]  # one batched call, the shared ids passed once


def test_sample_model_kwargs_clashing_with_the_wrapper(models):
    # encoder_hidden_states in model_kwargs was silently overwritten by context (and class_labels skipped y's check)
    m = fdd.sampling_model(models["unet_cond"])
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.randn(1, 7, 16)
    for kw in ({"encoder_hidden_states": ctx}, {"timestep": t}):
        with pytest.raises(TypeError, match="^model_kwargs: '"):
            m(x, t, context=ctx, **kw)
    with torch.no_grad():  # without context, encoder_hidden_states through model_kwargs is the model's own argument
        torch.testing.assert_close(m(x, t, encoder_hidden_states=ctx), m(x, t, context=ctx))



# -- FastdiffScheduler: a pipeline's scheduler stepping with a fastdiff sampler ------------------------------------
def _pipeline_loop(unet, scheduler, shape, *, steps, seed, ctx, uctx, guidance, generator=None, eta=0.0,
                   custom=None):
    """The denoising loop of diffusers' StableDiffusionPipeline (set_timesteps with the device, init_noise_sigma,
    scale_model_input, batched CFG, step with the extra kwargs the pipeline passes where the step accepts them).
    custom: {"timesteps": ...} or {"sigmas": ...}, passed as the pipelines' retrieve_timesteps passes them."""
    import inspect

    if custom is not None:
        (key, value), = custom.items()
        if key not in inspect.signature(scheduler.set_timesteps).parameters:  # retrieve_timesteps' check
            raise ValueError(f"does not support custom {key} schedules")
        scheduler.set_timesteps(**{key: value}, device="cpu")
    else:
        scheduler.set_timesteps(steps, device="cpu")
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    params = set(inspect.signature(scheduler.step).parameters)
    extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        with torch.no_grad():
            out = unet(x_in, t, encoder_hidden_states=torch.cat([uctx, ctx])).sample
        u, c = out.chunk(2)
        latents = scheduler.step(u + guidance * (c - u), t, latents, **extra, return_dict=False)[0]
    return latents


SCHED_CASES = [("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
               ("EulerDiscreteScheduler", {"use_karras_sigmas": True}), ("HeunDiscreteScheduler", {}),
               ("DPMSolverMultistepScheduler", {}), ("DPMSolverMultistepScheduler", {"solver_order": 3}),
               ("UniPCMultistepScheduler", {}), ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1}),
               ("LMSDiscreteScheduler", {"use_karras_sigmas": True}), ("KDPM2DiscreteScheduler", {}),
               # Playground v2.5's scheduler (EDM DPM-Solver++) and EDM Euler: timesteps log(sigma) / 4, input c_in x
               ("EDMEulerScheduler", {}), ("EDMDPMSolverMultistepScheduler", {"sigma_max": 14.6, "solver_order": 3}),
               ("DPMSolverSinglestepScheduler", {}), ("DPMSolverSinglestepScheduler", {"solver_order": 3}),
               # a pipeline's inverse_scheduler (DiffEdit, ...)
               ("DDIMInverseScheduler", {"clip_sample": False}), ("DPMSolverMultistepInverseScheduler", {}),
               ("CogVideoXDDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                           "prediction_type": "v_prediction"})]


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")  # diffusers' KDPM2
@pytest.mark.parametrize("name,cfg", SCHED_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SCHED_CASES)])
def test_fastdiff_scheduler_in_a_pipeline_loop(models, name, cfg):
    unet = models["unet_cond"]
    sd = {} if name.startswith("EDM") else {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    base = getattr(diffusers, name)(**sd, **cfg)
    g = torch.Generator().manual_seed(5)
    ctx, uctx = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    kw = dict(steps=5, seed=3, ctx=ctx, uctx=uctx, guidance=3.0)
    want = _pipeline_loop(unet, base, (2, 4, 16, 16), **kw)
    sched = fdd.FastdiffScheduler.from_scheduler(base)
    got = _pipeline_loop(unet, sched, (2, 4, 16, 16), **kw)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert sched.config is base.config and sched.order == base.order and len(sched) == len(base)
    assert sched.step_index == len(sched.timesteps) and sched.init_noise_sigma == pytest.approx(base.init_noise_sigma)
    # (KDPM2's midpoint timesteps: diffusers reads them back from the sigmas in float32, these in float64)
    torch.testing.assert_close(sched.timesteps.double(), base.timesteps.double(), rtol=1e-6, atol=0)
    got2 = _pipeline_loop(unet, sched, (2, 4, 16, 16), **kw)  # a second run: set_timesteps starts it afresh
    torch.testing.assert_close(got2, got, atol=0, rtol=0)


def test_fastdiff_scheduler_in_ddim_and_ddpm_pipelines(models):
    from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler

    unet = models["unet2d"]
    pipe = DDIMPipeline(unet, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run(**kw):
        return pipe(batch_size=2, num_inference_steps=6, output_type="np", **kw).images

    want = run(generator=torch.Generator().manual_seed(0))
    pipe.scheduler = fdd.FastdiffScheduler.from_scheduler(pipe.scheduler)
    got = run(generator=torch.Generator().manual_seed(0))
    assert abs(got - want).max() < 1e-4
    # eta = 1: DDIM's noise, drawn in the kernel from a seed the pipeline's generator gives
    a = run(generator=torch.Generator().manual_seed(1), eta=1.0)
    b = run(generator=torch.Generator().manual_seed(1), eta=1.0)
    c = run(generator=torch.Generator().manual_seed(2), eta=1.0)
    assert (a == b).all() and abs(a - c).max() > 1e-3 and abs(a - got).max() > 1e-3
    assert pipe.scheduler.sampler.config["eta"] == 1.0
    ddpm = DDPMPipeline(unet, fdd.FastdiffScheduler.from_scheduler(DDPMScheduler()))
    ddpm.set_progress_bar_config(disable=True)
    imgs = [ddpm(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(s))
            .images for s in (7, 7, 8)]
    assert (imgs[0] == imgs[1]).all() and abs(imgs[0] - imgs[2]).max() > 1e-3


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")  # diffusers' KDPM2
@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "LCMScheduler", "KDPM2AncestralDiscreteScheduler",
                                  "TCDScheduler", "CogVideoXDPMScheduler", "CosineDPMSolverMultistepScheduler"])
def test_fastdiff_scheduler_stochastic_samplers_follow_the_generator(models, name):
    if name == "CosineDPMSolverMultistepScheduler" and not _HAS_TORCHSDE:
        pytest.skip("diffusers' CosineDPMSolverMultistepScheduler needs torchsde (pip install torchsde)")
    # their noise is the kernel's (seeded from the pipeline's generator), not diffusers': the same generator gives
    # the same latents, another generator others; with no generator, torch's global seed decides
    unet = models["unet_cond"]
    g = torch.Generator().manual_seed(5)
    ctx, uctx = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    sched = fdd.FastdiffScheduler.from_scheduler(getattr(diffusers, name)())
    # (the pipelines pass their eta, 0 unless given, to the steps that take one: TCD's gamma, stochastic from 0.3)
    kw = dict(steps=4, seed=3, ctx=ctx, uctx=uctx, guidance=3.0, eta=0.3 if name == "TCDScheduler" else 0.0)
    run = [_pipeline_loop(unet, sched, (2, 4, 16, 16), generator=torch.Generator().manual_seed(s), **kw)
           for s in (1, 1, 2)]
    assert torch.isfinite(run[0]).all() and torch.equal(run[0], run[1]) and not torch.allclose(run[0], run[2])
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        outs.append(_pipeline_loop(unet, sched, (2, 4, 16, 16), **kw))
    assert torch.equal(outs[0], outs[1])
    if name == "TCDScheduler":  # a pipeline's default eta = 0: deterministic, whatever the generator
        kw["eta"] = 0.0
        a, b = (_pipeline_loop(unet, sched, (2, 4, 16, 16), generator=torch.Generator().manual_seed(s), **kw)
                for s in (1, 2))
        assert torch.equal(a, b) and sched.sampler.config["eta"] == 0.0


def _img2img_inputs():
    """(image latents, noise, text context) for _img2img_loop: (2, 4, 16, 16), (2, 4, 16, 16), (2, 7, 16), seeded."""
    g = torch.Generator().manual_seed(2)
    image, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    return image, noise, torch.randn(2, 7, 16, generator=g)


def _img2img_loop(unet, s, image, noise, ctx, *, steps, start, begin_index, mask=None):
    """The img2img pipelines' recipe: timesteps[start:], set_begin_index(start) where asked (older pipelines: none,
    the run's start is found from its first timestep), latents = add_noise(image, noise, start's timestep); with a
    mask, the inpainting pipeline's blend after each call but the last (the kept part noised to the next timestep)."""
    s.set_timesteps(steps, device="cpu")
    ts = s.timesteps[start:]
    if begin_index and hasattr(s, "set_begin_index"):  # (diffusers' PNDM has none: it counts from a run's start)
        s.set_begin_index(start)
    x = s.add_noise(image, noise, ts[:1].repeat(2))
    for i, t in enumerate(ts):
        with torch.no_grad():
            m = unet(s.scale_model_input(x, t), t, encoder_hidden_states=ctx).sample
        x = s.step(m, t, x).prev_sample
        if mask is not None and i < len(ts) - 1:
            x = (1 - mask) * s.add_noise(image, noise, ts[i + 1:i + 2]) + mask * x
    return x


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler",
                                  "PNDMScheduler"])
@pytest.mark.parametrize("begin_index", [True, False])
@pytest.mark.parametrize("inpaint", [False, True])
def test_fastdiff_scheduler_image_to_image(models, name, begin_index, inpaint):
    # the img2img pipelines' recipe: timesteps[t_start:], set_begin_index (older pipelines: none, the run's start is
    # found from its first timestep), latents = add_noise(image, noise, t_start's timestep)
    unet = models["unet_cond"]
    image, noise, ctx = _img2img_inputs()
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0  # (hard: UniPC's corrector keeps a blend that diffusers' drops)
    kw = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}
    run = functools.partial(_img2img_loop, unet, image=image, noise=noise, ctx=ctx, steps=8, start=3,
                            begin_index=begin_index, mask=mask if inpaint else None)
    want = run(getattr(diffusers, name)(**kw))
    got = run(fdd.FastdiffScheduler.from_scheduler(getattr(diffusers, name)(**kw)))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")  # diffusers' KDPM2
@pytest.mark.parametrize("name,cfg", [("HeunDiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {}),
                                      ("DPMSolverSinglestepScheduler", {}),
                                      ("DPMSolverSinglestepScheduler", {"solver_order": 3}),
                                      ("PNDMScheduler", {"skip_prk_steps": True})])
@pytest.mark.parametrize("begin_index", [True, False])
def test_fastdiff_scheduler_kept_x_inpainting(models, name, cfg, begin_index):
    # image-to-image from t_start * order, with a soft inpainting blend after every call: the second call of a
    # Heun-type step (a single-step group's later steps, PNDM's warm-up) reads the x its first call (step) was given,
    # kept in a buffer as diffusers keeps it, so the blend made in between enters as it does in diffusers
    unet = models["unet_cond"]
    image, noise, ctx = _img2img_inputs()
    mask = torch.linspace(0, 1, 16).reshape(1, 1, 1, 16).expand(1, 1, 16, 16)  # soft: a ramp across the image

    def run(s):  # from t_start = 2, at call index t_start * order
        return _img2img_loop(unet, s, image, noise, ctx, steps=6, start=2 * s.order, begin_index=begin_index,
                             mask=mask)

    want = run(getattr(diffusers, name)(**cfg))
    got = run(fdd.FastdiffScheduler.from_scheduler(getattr(diffusers, name)(**cfg)))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("cfg", [{"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
                                 {"shift": 3.0}])
def test_fastdiff_scheduler_flux_style_sigmas(cfg):
    # the Flux pipeline: retrieve_timesteps(scheduler, sigmas=np.linspace(1, 1/n, n), mu=...), then the loop
    import inspect

    import numpy as np

    def retrieve_timesteps(s, n, device, sigmas, **kw):  # what diffusers' pipelines do with custom sigmas
        assert "sigmas" in inspect.signature(s.set_timesteps).parameters
        s.set_timesteps(sigmas=sigmas, device=device, **kw)
        return s.timesteps, len(s.timesteps)

    def loop(s, img2img=False):
        n = 6
        sig = np.linspace(1.0, 1 / n, n)
        kw = {"mu": 0.9} if cfg.get("use_dynamic_shifting") else {}
        ts, steps = retrieve_timesteps(s, n, "cpu", sigmas=sig, **kw)
        assert steps == n
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        if img2img:  # Flux img2img: timesteps[t_start:], set_begin_index, scale_noise
            ts = ts[2:]
            s.set_begin_index(2)
            x = s.scale_noise(x.clamp(-1, 1), ts[:1].repeat(2), torch.randn(2, 4, 8, 8,
                                                                          generator=torch.Generator().manual_seed(2)))
        for t in ts:
            x = s.step(torch.tanh(x) + t / 1000, t, x, return_dict=False)[0]
        return x

    for img2img in (False, True):
        want = loop(diffusers.FlowMatchEulerDiscreteScheduler(**cfg), img2img)
        got = loop(fdd.FastdiffScheduler.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(**cfg)), img2img)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="^sigmas: custom sigmas are not supported by DPMSolverPPSampler"):
        fdd.FastdiffScheduler.from_scheduler(diffusers.DPMSolverMultistepScheduler()).set_timesteps(sigmas=[1.0])


@pytest.mark.parametrize("custom", [{"timesteps": [1000.0, 800.0, 550.0, 300.0, 90.0]},
                                    {"timesteps": [950.0, 700.0, 400.0], "sigmas": [0.9, 0.6, 0.3]}])
def test_fastdiff_scheduler_flow_custom_timesteps(custom):
    # an SD3 pipeline called with timesteps= (retrieve_timesteps(scheduler, timesteps=...)): the model sees them as
    # given, the sigmas are timesteps / 1000 shifted (or the sigmas passed beside them), as diffusers does
    def loop(s):
        s.set_timesteps(device="cpu", **custom)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        for t in s.timesteps:
            x = s.step(torch.tanh(x) + t / 1000, t, x, return_dict=False)[0]
        return x, s.timesteps.tolist()

    want, ts_want = loop(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    got, ts_got = loop(fdd.FastdiffScheduler.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)))
    assert ts_got == ts_want == custom["timesteps"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fastdiff_scheduler_flow_match_heun():
    # SD3's loop with FlowMatchHeunDiscreteScheduler: timesteps list every call (2n - 1), the model's velocity
    def loop(s):
        s.set_timesteps(5, device="cpu")
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        for t in s.timesteps:
            x = s.step(torch.tanh(x) + t / 1000, t, x, return_dict=False)[0]
        return x, len(s.timesteps)

    want, n_want = loop(diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0))
    sched = fdd.FastdiffScheduler.from_scheduler(diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0))
    got, n_got = loop(sched)
    assert n_got == n_want == 9 and sched.order == 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


AYS_SD15 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # Align Your Steps, Stable Diffusion 1.5, 10 steps


@pytest.mark.parametrize("name,cfg,custom", [
    ("DPMSolverMultistepScheduler", {}, {"timesteps": AYS_SD15}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {"timesteps": AYS_SD15[::3]}),
    ("EulerDiscreteScheduler", {}, {"timesteps": AYS_SD15}),
    ("EulerDiscreteScheduler", {}, {"sigmas": [14.6, 6.0, 2.5, 1.0, 0.3, 0.0]}),
    ("HeunDiscreteScheduler", {}, {"timesteps": AYS_SD15[::2]}),
    ("DDPMScheduler", {}, {"timesteps": AYS_SD15}),
    ("LCMScheduler", {}, {"timesteps": [999, 759, 499, 259]}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3}, {"timesteps": AYS_SD15}),
])
def test_fastdiff_scheduler_custom_timesteps_in_a_pipeline_loop(models, name, cfg, custom):
    # a pipeline called with timesteps= (Align Your Steps) or sigmas= hands them to set_timesteps through
    # retrieve_timesteps, which first checks that the scheduler's set_timesteps names the argument
    unet = models["unet_cond"]
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    base = getattr(diffusers, name)(**sd, **cfg)
    g = torch.Generator().manual_seed(5)
    ctx, uctx = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    kw = dict(steps=None, seed=3, ctx=ctx, uctx=uctx, guidance=3.0, custom=custom)
    stochastic = name in ("DDPMScheduler", "LCMScheduler") or cfg.get("algorithm_type") == "sde-dpmsolver++"
    gen = (lambda: torch.Generator().manual_seed(9)) if stochastic else (lambda: None)
    sched = fdd.FastdiffScheduler.from_scheduler(base)
    got = _pipeline_loop(unet, sched, (2, 4, 16, 16), generator=gen(), **kw)
    if stochastic:
        # stochastic: the kernel's noise, not diffusers' (see FastdiffScheduler): the same generator, the same run
        assert torch.isfinite(got).all()
        torch.testing.assert_close(_pipeline_loop(unet, sched, (2, 4, 16, 16), generator=gen(), **kw), got, atol=0,
                                   rtol=0)
    else:
        want = _pipeline_loop(unet, base, (2, 4, 16, 16), **kw)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
        assert sched.timesteps.tolist() == base.timesteps.tolist()
    n = len(next(iter(custom.values()))) - ("sigmas" in custom)
    assert sched.num_inference_steps == (2 * n - 1 if name == "HeunDiscreteScheduler" else n)
    # image-to-image from step 2 re-plans the run (set_begin_index): the custom schedule is kept for it
    ts = sched.timesteps.tolist()
    sched.set_begin_index(2)
    assert sched.timesteps.tolist() == ts


@pytest.mark.parametrize("name", ["LCMScheduler", "TCDScheduler"])
@pytest.mark.parametrize("strength", [1.0, 0.6, 0.3])
def test_fastdiff_scheduler_lcm_image_to_image_strength(name, strength):
    # the LCM img2img pipeline: retrieve_timesteps(scheduler, n, original_inference_steps=None, strength=s), then
    # x_init noised to the first timestep and every timestep run (the steps from the first int(50 s) of the
    # distillation schedule). TCD at eta 0 is deterministic: the whole loop equals diffusers'; LCM's noise is the
    # kernel's (FastdiffScheduler), so there the same generator gives the same run
    def loop(s, seed=1):
        s.set_timesteps(4, original_inference_steps=None, strength=strength)
        ts = s.timesteps
        x = s.add_noise(_X0, _NOISE, ts[:1])
        gen = torch.Generator().manual_seed(seed)
        for t in ts:
            x = s.step(torch.tanh(x) * 0.8 + float(t) / 1000, t, x, generator=gen, return_dict=False,
                       **({"eta": 0.0} if name == "TCDScheduler" else {}))[0]
        return ts, x

    d_ts, want = loop(getattr(diffusers, name)())
    sched = fdd.FastdiffScheduler.from_scheduler(getattr(diffusers, name)())
    ts, got = loop(sched)
    assert ts.tolist() == d_ts.tolist() and int(ts[0]) == int(50 * strength) * 20 - 1
    if name == "TCDScheduler":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert torch.isfinite(got).all() and torch.equal(loop(sched)[1], got)
        assert not torch.equal(loop(sched, seed=2)[1], got)
    sched.set_begin_index(0)  # a re-plan keeps the strength
    assert sched.timesteps.tolist() == ts.tolist()
    # custom timesteps with a strength: the last int(n s) of them, as diffusers' timesteps[t_start:]
    custom = [999, 759, 499, 259, 19]
    d = getattr(diffusers, name)()
    d.set_timesteps(timesteps=custom, strength=strength)
    sched.set_timesteps(timesteps=custom, strength=strength)
    assert sched.timesteps.tolist() == d.timesteps.tolist() == custom[5 - int(5 * strength):]
    with pytest.raises(ValueError, match="^num_inference_steps: 40 exceeds the 15 timesteps of"):
        sched.set_timesteps(40, strength=0.3)
    with pytest.raises(ValueError, match="^strength: expected a float in"):
        sched.set_timesteps(4, strength=0.0)


_X0, _NOISE = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(7)), \
    torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(8))


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")  # diffusers' KDPM2
def test_fastdiff_scheduler_refuses_custom_schedules_it_cannot_follow():
    for name, kw in (("DDIMScheduler", {}), ("UniPCMultistepScheduler", {}), ("KDPM2DiscreteScheduler", {}),
                     ("PNDMScheduler", {"skip_prk_steps": True})):
        sched = fdd.FastdiffScheduler.from_scheduler(getattr(diffusers, name)(**kw))
        with pytest.raises(ValueError, match="^timesteps: custom timesteps are not supported by"):
            sched.set_timesteps(timesteps=AYS_SD15)
    with pytest.raises(ValueError, match="^sigmas: custom sigmas are not supported by HeunSampler"):
        fdd.FastdiffScheduler.from_scheduler(diffusers.HeunDiscreteScheduler()).set_timesteps(sigmas=[5.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="^num_inference_steps: required when no custom timesteps or sigmas"):
        fdd.FastdiffScheduler.from_scheduler(diffusers.EulerDiscreteScheduler()).set_timesteps()


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")  # diffusers' KDPM2
@pytest.mark.parametrize("name,kw", [("HeunDiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {}),
                                     ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing",
                                                                      "lambda_min_clipped": -5.1,
                                                                      "beta_schedule": "squaredcos_cap_v2"})])
def test_fastdiff_scheduler_image_to_image_when_steps_are_not_calls(name, kw):
    # Heun and KDPM2 (and PNDM) count model calls in timesteps, DPM-Solver++ can run fewer steps than asked: a
    # re-plan (set_begin_index) must ask for the steps the run asked for, not the plan's length
    g = torch.Generator().manual_seed(2)
    image, noise = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)

    def run(s):
        s.set_timesteps(8, device="cpu")
        start = 3 * s.order
        ts = s.timesteps[start:]
        s.set_begin_index(start)
        x = s.add_noise(image, noise, ts[:1])
        for t in ts:
            x = s.step(torch.tanh(s.scale_model_input(x, t)) + float(t) / 1000, t, x).prev_sample
        return x, len(s.timesteps)

    (want, nd), (got, nf) = run(getattr(diffusers, name)(**kw)), run(
        fdd.FastdiffScheduler.from_scheduler(getattr(diffusers, name)(**kw)))
    assert nf == nd
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fastdiff_scheduler_errors_and_save(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from fastdiff.diffusion import DPMSolverPPSampler

    with pytest.raises(TypeError, match="^sampler:"):
        fdd.FastdiffScheduler("ddim")
    s = fdd.FastdiffScheduler(DPMSolverPPSampler(solver_order=3))  # from a sampler: its diffusers counterpart
    assert type(s._base).__name__ == "DPMSolverMultistepScheduler" and s.config["solver_order"] == 3
    with pytest.raises(ValueError, match="^num_inference_steps:"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="^mu:"):
        s.set_timesteps(4, mu=0.5)
    with pytest.raises(TypeError, match="^original_inference_steps:"):
        s.set_timesteps(4, original_inference_steps=50)
    s.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(TypeError, match="^s_churn:"):
        s.step(x, s.timesteps[0], x, s_churn=1.0)
    with pytest.raises(ValueError, match="^timestep:"):
        s.step(x, 12345, x)
    with pytest.raises(ValueError, match="^timesteps:"):
        s.add_noise(x.repeat(2, 1, 1, 1), x.repeat(2, 1, 1, 1), torch.tensor([999, 500, 1]))
    # a timestep per sample, as diffusers' add_noise takes them
    base = DPMSolverMultistepScheduler(solver_order=3)
    base.set_timesteps(4)
    x2, z2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ts = torch.stack([s.timesteps[0], s.timesteps[2]])
    torch.testing.assert_close(s.add_noise(x2, z2, ts), base.add_noise(x2, z2, ts))
    s.save_pretrained(tmp_path)  # the replaced scheduler's config: it loads into the diffusers scheduler too
    loaded = DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert loaded.config["solver_order"] == 3
    again = fdd.FastdiffScheduler.from_pretrained(tmp_path)
    assert isinstance(again.sampler, DPMSolverPPSampler) and again.sampler.config["solver_order"] == 3


def test_fastdiff_scheduler_pipeline_save_and_load(models, tmp_path):
    from diffusers import DDPMPipeline  # (DDIMPipeline's constructor turns any scheduler into a DDIMScheduler)

    pipe = DDPMPipeline(models["unet2d"], fdd.FastdiffScheduler.from_scheduler(DDIMScheduler()))
    pipe.save_pretrained(tmp_path)
    back = DDPMPipeline.from_pretrained(tmp_path)
    def public(cfg):
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    assert isinstance(back.scheduler, fdd.FastdiffScheduler)
    assert public(back.scheduler.config) == public(pipe.scheduler.config)
    assert public(DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler").config) == public(pipe.scheduler.config)



@pytest.mark.skipif(not _HAS_TORCHSDE, reason="diffusers' DPMSolverSDEScheduler needs torchsde (optional test "
                                              "dependency: pip install torchsde)")
def test_fastdiff_scheduler_dpmpp_sde(models, monkeypatch, tmp_path):
    # DPM++ SDE in a pipeline loop: without its noise (s_noise 0 here, diffusers' Brownian tree patched to zeros) the
    # same latents as diffusers'; with it, the kernel's noise seeded by the pipeline's generator
    import diffusers.schedulers.scheduling_dpmsolver_sde as sde_mod

    class ZeroNoise:
        def __init__(self, x, *args, **kwargs):
            self.x = x

        def __call__(self, sigma, sigma_next):
            return torch.zeros_like(self.x)

    unet = models["unet_cond"]
    g = torch.Generator().manual_seed(5)
    ctx, uctx = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    kw = dict(steps=5, seed=3, ctx=ctx, uctx=uctx, guidance=3.0)
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": True}
    base = diffusers.DPMSolverSDEScheduler(**sd)
    sched = fdd.FastdiffScheduler.from_scheduler(base)
    assert type(sched.sampler).__name__ == "DPMSolverSDESampler" and sched.order == 2
    with monkeypatch.context() as m:
        m.setattr(sde_mod, "BrownianTreeNoiseSampler", ZeroNoise)
        want = _pipeline_loop(unet, base, (2, 4, 16, 16), **kw)
    sched.sampler.config["s_noise"] = 0.0  # (a config edit takes effect at the next set_timesteps)
    got = _pipeline_loop(unet, sched, (2, 4, 16, 16), **kw)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert len(sched.timesteps) == 9 and sched.step_index == 9
    torch.testing.assert_close(sched.timesteps.double(), base.timesteps.double(), rtol=1e-6, atol=0)
    sched.sampler.config["s_noise"] = 1.0
    run = [_pipeline_loop(unet, sched, (2, 4, 16, 16), generator=torch.Generator().manual_seed(s), **kw)
           for s in (1, 1, 2)]
    assert torch.isfinite(run[0]).all() and torch.equal(run[0], run[1]) and not torch.allclose(run[0], run[2])
    assert not torch.allclose(run[0], got)
    # s_noise (a step argument in diffusers) goes into the config only where it is not 1, and comes back from it
    from fastdiff.diffusion import DPMSolverSDESampler

    assert "s_noise" not in fdd.FastdiffScheduler(DPMSolverSDESampler()).config
    assert fdd._same([1, 2], (1, 2)) and not fdd._same(torch.ones(2).numpy(), None) and not fdd._same(0.5, 1.0)
    fdd.FastdiffScheduler(DPMSolverSDESampler(s_noise=0.5, use_karras_sigmas=True)).save_pretrained(tmp_path)
    again = fdd.FastdiffScheduler.from_pretrained(tmp_path).sampler
    assert type(again) is DPMSolverSDESampler and again.config["s_noise"] == 0.5 and again.config["use_karras_sigmas"]


# -- FastdiffScheduler as pipelines use it (found by a helper session acting as a diffusers user) -------------------

def test_scheduler_step_returns_what_the_replaced_scheduler_returns():
    # step returned prev_sample alone: the LCM pipelines (`latents, denoised = scheduler.step(..., return_dict=False)`,
    # then decoding denoised) crashed; DDIM's, DDPM's, Euler's pred_original_sample were missing
    for base, second in [(diffusers.LCMScheduler(), "denoised"), (DDIMScheduler(), "pred_original_sample"),
                         (diffusers.EulerDiscreteScheduler(), "pred_original_sample"),
                         (diffusers.DDPMScheduler(clip_sample=True), "pred_original_sample"),
                         (DDIMScheduler(thresholding=True), "pred_original_sample"),
                         (diffusers.DPMSolverMultistepScheduler(), None), (diffusers.TCDScheduler(), None)]:
        fs = fdd.FastdiffScheduler.from_scheduler(base)
        fs.set_timesteps(4)
        base.set_timesteps(4)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * fs.init_noise_sigma
        t = fs.timesteps[0]
        m = torch.tanh(fs.scale_model_input(x, t))
        got = fs.step(m, t, x, return_dict=False)
        want = base.step(torch.tanh(base.scale_model_input(x, t)), t, x, return_dict=False,
                         generator=torch.Generator().manual_seed(1))
        assert len(got) == (1 if second is None else 2), type(base).__name__
        if second is not None:
            assert len(want) == 2
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5, msg=type(base).__name__)
            fs.set_timesteps(4)
            assert getattr(fs.step(m, t, x), second).shape == x.shape


def test_scheduler_step_options_hold_for_one_run_and_config_follows_the_sampler(tmp_path):
    # eta passed to step, and LCM's original_inference_steps passed to set_timesteps, stayed on for every later run
    # (diffusers takes them per call); overrides given to from_scheduler (and sampler.config edits) were missing from
    # config and from save_pretrained, so a reloaded scheduler ran another trajectory
    import pickle

    fs = fdd.FastdiffScheduler.from_scheduler(diffusers.LCMScheduler())
    fs.set_timesteps(4, original_inference_steps=30)
    assert fs.timesteps.tolist() == [989, 758, 494, 263]
    fs.set_timesteps(4)
    ref = diffusers.LCMScheduler()
    ref.set_timesteps(4)
    assert fs.timesteps.tolist() == ref.timesteps.tolist() and fs.config.original_inference_steps == 50

    fs = fdd.FastdiffScheduler.from_scheduler(DDIMScheduler())

    def run(eta=None):
        fs.set_timesteps(5)
        x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        for t in fs.timesteps:
            kw = {} if eta is None else dict(eta=eta, generator=torch.Generator().manual_seed(2))
            x = fs.step(torch.tanh(x), t, x, **kw).prev_sample
        return x

    a = run()
    assert not torch.equal(run(0.7), a)
    assert torch.equal(run(), a) and fs.sampler.config["eta"] == 0.0

    fs = fdd.FastdiffScheduler.from_scheduler(diffusers.DPMSolverMultistepScheduler(), solver_order=3,
                                              use_karras_sigmas=True)
    fs.sampler.config["timestep_spacing"] = "trailing"
    assert fs.config.solver_order == 3 and fs.config.use_karras_sigmas and fs.config.timestep_spacing == "trailing"
    fs.save_pretrained(str(tmp_path))
    back = fdd.FastdiffScheduler.from_pretrained(str(tmp_path))
    for fsched in (fs, back):
        fsched.set_timesteps(6)
    assert torch.equal(back.timesteps, fs.timesteps) and back.sampler.config["solver_order"] == 3
    assert diffusers.DPMSolverMultistepScheduler.from_pretrained(str(tmp_path)).config.solver_order == 3

    # a used scheduler (and its sampler) pickles: the fast path's cache held a torch.ops handle
    x = torch.randn(1, 3, 4, 4)
    for t in fs.timesteps[:2]:
        x = fs.step(torch.tanh(x), t, x).prev_sample
    again = pickle.loads(pickle.dumps(fs))
    t = fs.timesteps[2]
    assert torch.equal(again.step(torch.tanh(x), t, x).prev_sample, fs.step(torch.tanh(x), t, x).prev_sample)


def test_a_list_of_generators_gives_each_sample_its_own_noise():
    # generator=[g0, g1, g2] (as pipelines pass it) seeded the whole batch from g0: a sample changed with the batch
    # around it (diffusers draws each sample's noise from its own generator). sampler.step(generator=[...]) raised
    # torch's "randn() received an invalid combination of arguments"
    from fastdiff.diffusion import DDPMSampler

    fs = fdd.FastdiffScheduler.from_scheduler(diffusers.DDPMScheduler())

    def run(idx):
        fs.set_timesteps(6)
        x = torch.stack([torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(100 + j)) for j in idx])
        gens = [torch.Generator().manual_seed(j) for j in idx]
        for t in fs.timesteps:
            x = fs.step(torch.tanh(x), t, x, generator=gens).prev_sample
        return x

    assert torch.equal(run([0, 1, 2])[2], run([2])[0])
    s = DDPMSampler()
    s.set_timesteps(3)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="^generator: a list of 1 generators for a batch of 2"):
        s.step(x, 0, x, generator=[torch.Generator()])
    with pytest.raises(TypeError, match="^generator: expected a torch.Generator or a list"):
        s.step(x, 0, x, generator=5)


def test_seed_and_model_arguments_are_named():
    # set_timesteps(seed=2**64) wrapped to seed 0; unpatch(None) / is_patched(None) raised "cannot create weak
    # reference to 'NoneType' object"
    s = DDIMSampler()
    for bad in (2 ** 64, -(2 ** 63) - 1):
        with pytest.raises(ValueError, match="^seed: expected a 64-bit int"):
            s.set_timesteps(4, seed=bad)
    s.set_timesteps(4, seed=2 ** 64 - 1)
    for fn in (fdd.unpatch, fdd.is_patched):
        with pytest.raises(TypeError, match="^model: expected a torch.nn.Module, got NoneType"):
            fn(None)
