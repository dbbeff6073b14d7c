"""fastdiff.nn and fastdiff.models as a user dropping them into a model meets them: torch.nn.GroupNorm's own
arguments and dtype rules, and bad constructor arguments refused with an error that names them."""
import inspect

import pytest
import torch

import fastdiff
from fastdiff.models import AutoencoderKL, DiagonalGaussian, NoisyClassifier, UNet

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_BIAS_KW = "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters


@pytest.mark.skipif(not HAS_BIAS_KW, reason="this torch.nn.GroupNorm has no bias keyword")
def test_group_norm_bias_false_like_torch():
    ref = torch.nn.GroupNorm(4, 16, bias=False)
    with torch.no_grad():
        ref.weight.normal_()
    m = fastdiff.nn.GroupNorm(4, 16, bias=False)
    assert m.bias is None and set(m.state_dict()) == set(ref.state_dict()) == {"weight"}
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 5, 3)
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
    assert repr(m) == repr(ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_half_input_with_fp32_parameters_like_torch(dtype, channels_last,
                                                               silu_group_norm_pair):
    # torch.nn.GroupNorm takes a half input with fp32 parameters (a norm kept in fp32 in a half model, as
    # mixed-precision recipes do); the drop-in raised TypeError "weight: expected dtype ..." outside autocast.
    ref, m = silu_group_norm_pair
    x = torch.randn(2, 16, 6, 5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = m(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(y, torch.nn.functional.silu(ref(x)), atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert m.weight.grad is not None and m.weight.grad.dtype == torch.float32
    assert m.bias.grad is not None and m.bias.grad.dtype == torch.float32


def _tiny_unet(**kw):
    args = dict(image_size=16, in_channels=2, model_channels=8, out_channels=2, num_res_blocks=1,
                attention_resolutions=(8,), channel_mult=(1, 2), num_groups=4)
    args.update(kw)
    return UNet(**args)


@pytest.mark.parametrize("kw,match", [
    (dict(num_head_channels=0), "num_head_channels"),
    (dict(num_head_channels=-2), "num_head_channels"),
    (dict(num_heads_upsample=0), "num_heads_upsample"),
    (dict(num_groups=0), "num_groups"),
    (dict(dropout=None), "dropout"),
    (dict(channel_mult=("1", "2")), "channel_mult"),
], ids=["head_channels_0", "head_channels_-2", "heads_upsample_0", "groups_0", "dropout_none", "mult_str"])
def test_unet_bad_arguments_name_themselves(kw, match):
    # these used to escape as ZeroDivisionError / a bare TypeError, or blame num_heads for num_head_channels
    with pytest.raises(ValueError, match=f"^{match}:"):
        _tiny_unet(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(num_heads=0), "num_heads"),
    (dict(num_head_channels=0), "num_head_channels"),
    (dict(num_groups=0), "num_groups"),
], ids=["heads_0", "head_channels_0", "groups_0"])
def test_classifier_bad_arguments_name_themselves(kw, match):
    args = dict(channel_mult=(1, 2), num_groups=4)
    args.update(kw)
    with pytest.raises(ValueError, match=f"^{match}:"):
        NoisyClassifier(16, 2, 8, 5, 1, (8,), **args)


def test_autoencoder_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="^num_groups:"):
        AutoencoderKL(3, 4, 8, (1, 2), num_groups=0)
    # int(1.5) == 1 silently built a narrower model than asked for
    with pytest.raises(ValueError, match="^channel_mult:"):
        AutoencoderKL(3, 4, 8, (1, 1.5), num_groups=4)
    assert AutoencoderKL(3, 4, 8, (1, 2.0), num_groups=4).config["channel_mult"] == [1, 2]
    for bad in (0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="^scale_factor:"):
            AutoencoderKL(3, 4, 8, (1, 2), num_groups=4, scale_factor=bad)
    ae = AutoencoderKL(3, 4, 8, (1, 2), num_groups=4, scale_factor=0.5)
    with pytest.raises(ValueError, match="^scale_factor:"):
        ae.scale_factor = 0.0  # from_latent would divide by it: every decoded image inf/NaN
    assert ae.scale_factor == 0.5


def test_posterior_sample_refuses_noise_that_would_broadcast():
    post = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    noise = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(post.sample(noise=noise), post.mean + post.std * noise)
    # a (1, C, h, w) noise broadcast: both samples of the batch got the same draw
    with pytest.raises(ValueError, match=r"^noise: .*\(2, 4, 4, 4\)"):
        post.sample(noise=noise[:1])
    with pytest.raises(ValueError, match="^noise:"):
        post.sample(noise=noise[0])


def test_layer_sizes_take_numpy_ints():
    # sizes read from a config or computed with numpy (np.int64) are ints to torch.nn's layers: ours took them too
    # for num_groups only, and refused emb_dim, heads, dim_head, channels and the rest
    import numpy as np

    i = np.int64
    ada = fastdiff.nn.AdaGroupNorm(i(2), i(4), emb_dim=i(6))
    assert ada.linear.in_features == 6 and type(ada.linear.in_features) is int
    att = fastdiff.nn.Attention(i(8), context_dim=i(5), heads=i(2), dim_head=np.int32(4))
    assert (att.heads, att.dim_head, att.to_k.in_features) == (2, 4, 5) and type(att.heads) is int
    sa = fastdiff.nn.SpatialSelfAttention(i(8), num_head_channels=i(4), num_groups=i(2))
    assert sa.num_heads == 2 and type(sa.channels) is int
    x = torch.randn(2, 8, 3, 3)
    assert sa(x).shape == x.shape and att(torch.randn(2, 3, 8), torch.randn(2, 4, 5)).shape == (2, 3, 8)
    for bad in (dict(heads=True), dict(dim_head=1.0), dict(context_dim=i(0))):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))}:"):
            fastdiff.nn.Attention(8, **bad)


def test_ada_group_norm_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="^emb_dim:"):
        fastdiff.nn.AdaGroupNorm(4, 16, emb_dim=0)  # was accepted: a Linear(0, 32) whose scale/shift is its bias
    ada = fastdiff.nn.AdaGroupNorm(4, 16, emb_dim=8)
    x = torch.randn(2, 16, 3, 3)
    with pytest.raises(TypeError, match="^emb:"):
        ada(x, torch.ones(2, 8, dtype=torch.long))  # was NotImplementedError from silu
    with pytest.raises(TypeError, match="^emb:"):
        ada(x, [[0.0] * 8] * 2)  # was AttributeError


def test_spatial_self_attention_autocast_keeps_the_low_precision_in_both_formats():
    # the NCHW path added the fp32 bias to the autocast (bf16) matmul: its output was promoted to fp32 (twice the
    # activation memory downstream) while the channels_last path's output stayed bf16
    blk = fastdiff.nn.SpatialSelfAttention(32, num_heads=2, num_groups=8)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 32, 5, 3).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = blk(x)
        y_cl = blk(x.to(memory_format=torch.channels_last))
    assert y.dtype == y_cl.dtype == torch.bfloat16
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), y_cl.float(), atol=3e-2, rtol=3e-2)
    with torch.no_grad():
        want = blk(x.float())
    torch.testing.assert_close(y.float(), want, atol=6e-2, rtol=6e-2)


def test_unet_takes_numpy_scalar_timesteps():
    np = pytest.importorskip("numpy")
    m = _tiny_unet().eval()
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        want = m(x, 7)
        for t in (np.int64(7), np.float32(7.0)):  # "expected a tensor or a number": numpy's are numbers too
            torch.testing.assert_close(m(x, t), want)
    with pytest.raises(TypeError, match="^timesteps:"):
        m(x, np.bool_(True))


def test_unet_broadcasts_one_timestep_like_diffusers():
    # diffusers' U-Nets expand a (1,) timestep over the batch (t[None], timesteps[i:i + 1]); it was a ValueError
    m = _tiny_unet().eval()
    x = torch.randn(3, 2, 16, 16)
    with torch.no_grad():
        want = m(x, torch.tensor([7, 7, 7]))
        torch.testing.assert_close(m(x, torch.tensor([7])), want)
        torch.testing.assert_close(m(x, torch.tensor(7.0)), want)
    with pytest.raises(ValueError, match=r"^timesteps: expected shape \(3,\)"):
        m(x, torch.tensor([7, 7]))


def test_modules_run_on_meta_tensors_like_torch():
    # shape inference on the meta device (e.g. a model built under torch.device("meta")): torch.nn.GroupNorm runs
    # there; fastdiff's GroupNorm raised from its autocast query ("unknown device type for autocast")
    with torch.device("meta"):
        x = torch.randn(2, 32, 8, 8)
        assert fastdiff.nn.GroupNorm(8, 32, activation="silu")(x).shape == x.shape
        assert fastdiff.nn.AdaGroupNorm(8, 32, emb_dim=16)(x, torch.randn(2, 16)).shape == x.shape
        unet = UNet(image_size=8, in_channels=32, model_channels=32, out_channels=32, num_res_blocks=1,
                    attention_resolutions=(4,), channel_mult=(1, 2), num_head_channels=16)
        assert unet(x, torch.tensor([3, 5])).device.type == "meta"


@pytest.mark.parametrize("emb_dtype", ["fp32", "low"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_ada_group_norm_half_input_with_fp32_parameters(dtype, channels_last, emb_dtype):
    # the fp32 AdaGroupNorm of a half model (a norm kept in fp32, as its GroupNorm and torch.nn.GroupNorm
    # take): x (and emb, from the half model's embedding MLP) arrive in half; it raised TypeError "scale:
    # expected dtype torch.float16" (the fp32 projection's scale) or, with a half emb, "mat1 and mat2 must
    # have the same dtype"
    ada = fastdiff.nn.AdaGroupNorm(4, 16, emb_dim=8)
    with torch.no_grad():
        for p in ada.parameters():
            p.normal_(0, 0.5)
    x, emb = torch.randn(2, 16, 6, 5).to(dtype), torch.randn(2, 8)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if emb_dtype == "low":
        emb = emb.to(dtype)
    y = ada(x, emb)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    with torch.no_grad():
        want = ada(x.float(), emb.float())
    torch.testing.assert_close(y.float(), want, atol=3e-2, rtol=3e-2)
    y.float().sum().backward()
    for name, p in ada.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name


def test_ada_group_norm_bad_x_names_itself():
    ada = fastdiff.nn.AdaGroupNorm(4, 16, emb_dim=8)
    with pytest.raises(TypeError, match="^x:"):
        ada([[0.0] * 16] * 2, torch.randn(2, 8))  # was AttributeError: 'list' object has no attribute 'shape'
    with pytest.raises(ValueError, match="^x:"):
        ada(torch.tensor(1.0), torch.randn(2, 8))  # was IndexError from x.shape[0]


def test_attention_modules_bad_inputs_name_themselves():
    # a non-tensor input escaped as AttributeError ('list' object has no attribute 'dim')
    attn = fastdiff.nn.Attention(16, context_dim=12, heads=2, dim_head=8)
    x = torch.randn(2, 5, 16)
    with pytest.raises(TypeError, match="^x:"):
        attn(x.tolist(), torch.randn(2, 3, 12))
    with pytest.raises(TypeError, match="^context:"):
        attn(x, torch.randn(2, 3, 12).tolist())
    with pytest.raises(TypeError, match="^x:"):
        fastdiff.nn.SpatialSelfAttention(16, num_heads=2, num_groups=4)(torch.randn(1, 16, 2, 2).tolist())


def test_layer_errors_name_the_argument_and_torch_call_forms_work():
    # emb_activation's error said "activation", SpatialSelfAttention's groups error said "channels", a cross-
    # attention called without its context asked for a context of x's width; GroupNorm(input=x) (torch's keyword)
    # raised TypeError; an emb of batch 1 (which diffusers' AdaGroupNorm broadcasts) was refused
    with pytest.raises(ValueError, match="^emb_activation: expected None or 'silu', got 'gelu'"):
        fastdiff.nn.AdaGroupNorm(4, 16, 8, emb_activation="gelu")
    with pytest.raises(ValueError, match="^num_groups: 3 GroupNorm groups do not divide the 32 channels"):
        fastdiff.nn.SpatialSelfAttention(32, num_groups=3)
    attn = fastdiff.nn.Attention(32, context_dim=24, heads=2, dim_head=8)
    with pytest.raises(ValueError, match=r"^context: this cross-attention \(context_dim=24\) needs a context of "
                                         r"shape \(2, S_ctx, 24\), got None"):
        attn(torch.randn(2, 7, 32))
    assert attn(torch.randn(2, 7, 32), torch.randn(2, 5, 24)).shape == (2, 7, 32)
    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(4, 16)
    m = fastdiff.nn.GroupNorm(4, 16)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(m(input=x), ref(input=x))
    ada = fastdiff.nn.AdaGroupNorm(4, 16, 8)
    emb = torch.randn(1, 8)
    torch.testing.assert_close(ada(x, emb), ada(x, emb.expand(2, 8)))
    with pytest.raises(ValueError, match=r"^emb: expected shape \(2, 8\)"):
        ada(x, torch.randn(3, 8))


def test_fx_symbolic_trace_records_the_layers():
    # torch.fx.symbolic_trace failed on every fastdiff layer ("x: expected a torch.Tensor, got Proxy"): fx traces
    # into modules outside torch.nn, and the layers' checks refuse a Proxy. GroupNorm and AdaGroupNorm now trace
    # to the op on their parameters (alone too, as torch.nn.GroupNorm does); the attention layers, whose layout
    # branches cannot be traced, are one call each inside the traced model
    import copy
    import pickle

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.norm = fastdiff.nn.GroupNorm(4, 16, activation="silu")
            self.ada = fastdiff.nn.AdaGroupNorm(4, 16, 8)
            self.attn = fastdiff.nn.SpatialSelfAttention(16, num_groups=4)
            self.xattn = fastdiff.nn.Attention(16, context_dim=6, heads=2, dim_head=8)
            torch.nn.init.normal_(self.attn.proj_out.weight)

        def forward(self, x, emb, ctx):
            h = self.attn(self.ada(self.norm(self.conv(x)), emb))
            return self.xattn(h.flatten(2).transpose(1, 2), ctx)

    torch.manual_seed(0)
    m = Net()
    gm = torch.fx.symbolic_trace(m)
    calls = [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count("fx_group_norm") == 2 and calls.count("fx_leaf_call") == 2, calls
    args = (torch.randn(2, 3, 5, 5), torch.randn(2, 8), torch.randn(2, 4, 6))
    want = m(*args)
    for g in (gm, copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        torch.testing.assert_close(g(*args), want, atol=0, rtol=0)
    ada = fastdiff.nn.AdaGroupNorm(4, 16, 8)
    x, emb = torch.randn(2, 16, 3, 3), torch.randn(2, 8)
    for e in (emb, emb[:1]):
        torch.testing.assert_close(torch.fx.symbolic_trace(ada)(x, e), ada(x, e), atol=0, rtol=0)
    gn = fastdiff.nn.GroupNorm(4, 16)
    torch.testing.assert_close(torch.fx.symbolic_trace(gn)(x), gn(x), atol=0, rtol=0)
    with pytest.raises(TypeError, match="^symbolic_trace: fastdiff.nn.Attention is recorded as one call inside"):
        torch.fx.symbolic_trace(fastdiff.nn.Attention(16, heads=2, dim_head=8))
