"""Building blocks of the ADM U-Net family (guided-diffusion's unet.py) on fastdiff's fused layers.

Every GroupNorm followed by SiLU is one fused ``fastdiff.nn.GroupNorm(..., activation="silu")``; ADM's
scale-shift norm ``SiLU(GroupNorm(h) * (1 + scale) + shift)`` is the same op with its scale/shift arguments (AdaGN),
so a ResBlock reads and writes its activations once per norm. The time embedding's SiLU, which ADM applies at
the start of every ResBlock's embedding projection, is applied once per forward by the model and the activated
embedding is passed down. Nothing here branches on tensor values (CUDA graphs, ``torch.compile(fullgraph=True)``).
"""
from __future__ import annotations

import collections.abc
import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn import Attention, GroupNorm, SpatialSelfAttention
from fastdiff.nn.norm import positive_int


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM's sinusoidal embedding: (N,) timesteps (int or float) -> (N, dim) float32, [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def check_groups(channels: int, num_groups: int, where: str):
    num_groups = positive_int(num_groups, "num_groups")
    if channels % num_groups:
        raise ValueError(f"num_groups: {num_groups} groups do not divide the {channels} channels of {where}; "
                         f"pick model_channels / channel_mult so that every width is a multiple of num_groups")


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv when use_conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """A strided 3x3 conv when use_conv, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x):
        return F.avg_pool2d(x, 2) if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """ADM's ResBlock: GN-SiLU-conv, embedding in (AdaGN scale/shift or added), GN-SiLU-dropout-conv, skip.

    emb_channels=None gives the plain residual block of the autoencoder (no embedding). up/down make it the
    BigGAN up/down-sampling block (resample between the first norm and the first conv, and on the skip path).
    The last conv is zero-initialised (zero_init) so the block starts as the identity, as in ADM.
    """

    def __init__(self, channels: int, emb_channels: int | None, dropout: float = 0.0, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False, num_groups: int = 32,
                 zero_init: bool = True, eps: float = 1e-5):
        super().__init__()
        out_channels = out_channels or channels
        check_groups(channels, num_groups, "a residual block's input")
        check_groups(out_channels, num_groups, "a residual block's output")
        self.use_scale_shift_norm = use_scale_shift_norm and emb_channels is not None
        self.up, self.down = up, down
        self.in_norm = GroupNorm(num_groups, channels, eps=eps, activation="silu")
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = None
        if emb_channels is not None:
            self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if self.use_scale_shift_norm else out_channels)
        self.out_norm = GroupNorm(num_groups, out_channels, eps=eps, activation="silu")
        self.dropout = nn.Dropout(dropout)
        self.out_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if zero_init:
            zero_(self.out_conv)
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb=None):
        """x: (N, C, H, W); emb: the SiLU-activated embedding (N, emb_channels), or None without one."""
        h = self.in_norm(x)
        if self.up:
            h, x = F.interpolate(h, scale_factor=2.0, mode="nearest"), F.interpolate(x, scale_factor=2.0, mode="nearest")
        elif self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.in_conv(h)
        if self.emb_proj is None:
            h = self.out_norm(h)
        elif self.use_scale_shift_norm:
            scale, shift = self.emb_proj(emb).chunk(2, dim=1)
            h = self.out_norm(h, scale=scale, shift=shift)  # fused AdaGN + SiLU
        else:
            h = self.out_norm(h + self.emb_proj(emb)[:, :, None, None])
        return self.skip(x) + self.out_conv(self.dropout(h))


class CrossAttention(nn.Module):
    """LDM-style conditioning on a context sequence after a self-attention block, kept minimal:

        x = x + CrossAttn(GroupNorm(x), context);  x = x + FF(GroupNorm(x))

    on the (N, HW, C) token view of x (no copies in either memory format). The output projections of the
    attention and the feed-forward are zero-initialised, so the block starts as the identity.
    """

    def __init__(self, channels: int, context_dim: int, heads: int, dim_head: int, num_groups: int = 32,
                 ff_mult: int = 4):
        super().__init__()
        self.norm = GroupNorm(num_groups, channels)
        self.attn = Attention(channels, context_dim, heads=heads, dim_head=dim_head)
        zero_(self.attn.to_out)
        self.ff_norm = GroupNorm(num_groups, channels)
        self.ff_in = nn.Linear(channels, ff_mult * channels)
        self.ff_out = zero_(nn.Linear(ff_mult * channels, channels))

    def forward(self, x, context):
        N, C, H, W = x.shape

        def tokens(t):
            return t.flatten(2).transpose(1, 2)

        def image(t):
            return t.transpose(1, 2).reshape(N, C, H, W)

        x = x + image(self.attn(tokens(self.norm(x)), context))
        return x + image(self.ff_out(F.gelu(self.ff_in(tokens(self.ff_norm(x))))))


class AttentionBlock(nn.Module):
    """Self-attention over the feature map (fastdiff.nn.SpatialSelfAttention), then cross-attention to the
    context when the model has a context_dim."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, num_groups: int,
                 context_dim: int | None = None):
        super().__init__()
        # SpatialSelfAttention resolves (and checks) the heads, naming num_heads / num_head_channels
        self.attn = SpatialSelfAttention(channels, num_heads=num_heads, num_head_channels=num_head_channels,
                                         num_groups=num_groups)
        heads = self.attn.num_heads
        self.cross = None
        if context_dim is not None:
            self.cross = CrossAttention(channels, context_dim, heads, channels // heads, num_groups)

    def forward(self, x, context=None):
        x = self.attn(x)
        return x if self.cross is None else self.cross(x, context)


class EmbedSequential(nn.ModuleList):
    """ADM's TimestepEmbedSequential: passes the embedding to residual blocks and the context to attention."""

    def forward(self, x, emb=None, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def build_down_path(*, image_size, model_channels, num_res_blocks, attention_ds, dropout, channel_mult, num_heads,
                    num_head_channels, use_scale_shift_norm, resblock_updown, conv_resample, num_groups, context_dim,
                    in_channels, emb_dim):
    """The encoder half shared by the U-Net and the classifier: input blocks, then the middle block.

    Returns (input_blocks, middle_block, input_block_chans, ch, ds).
    """
    ch = int(channel_mult[0] * model_channels)
    input_blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(in_channels, ch, 3, padding=1)])])
    chans, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [ResBlock(ch, emb_dim, dropout, int(mult * model_channels), use_scale_shift_norm,
                               num_groups=num_groups)]
            ch = int(mult * model_channels)
            if ds in attention_ds:
                layers.append(AttentionBlock(ch, num_heads, num_head_channels, num_groups, context_dim))
            input_blocks.append(EmbedSequential(layers))
            chans.append(ch)
        if level != len(channel_mult) - 1:
            down = (ResBlock(ch, emb_dim, dropout, ch, use_scale_shift_norm, down=True, num_groups=num_groups)
                    if resblock_updown else Downsample(ch, conv_resample))
            input_blocks.append(EmbedSequential([down]))
            chans.append(ch)
            ds *= 2
    middle = EmbedSequential([
        ResBlock(ch, emb_dim, dropout, ch, use_scale_shift_norm, num_groups=num_groups),
        AttentionBlock(ch, num_heads, num_head_channels, num_groups, context_dim),
        ResBlock(ch, emb_dim, dropout, ch, use_scale_shift_norm, num_groups=num_groups),
    ])
    return input_blocks, middle, chans, ch, ds


def attention_downsample_rates(image_size: int, attention_resolutions, num_levels: int) -> set:
    """Feature-map sizes that get attention (guided-diffusion's command-line convention) -> downsample rates."""
    sizes = {image_size // 2 ** i: 2 ** i for i in range(num_levels)}
    out = set()
    for r in attention_resolutions:
        if isinstance(r, bool) or not isinstance(r, int) or r not in sizes:
            raise ValueError(f"attention_resolutions: {r!r} is not a feature-map size of this model; with "
                             f"image_size={image_size} and {num_levels} levels they are {sorted(sizes, reverse=True)}")
        out.add(sizes[r])
    return out


def positive_ints(**values) -> tuple:
    """The values as ints (Python's or numpy's integers), in the order given; a ValueError names the first that is
    not a positive int."""
    return tuple(positive_int(v, name) for name, v in values.items())


def optional_positive_int(v, name: str, unset=None, says: str = "None"):
    """`unset` (None, or a sentinel such as -1), returned as it is, or a positive int; a ValueError naming `name`
    that says what `unset` means."""
    if v is None if unset is None else (not isinstance(v, bool) and v == unset):
        return v
    try:
        return positive_int(v, name)
    except ValueError:
        raise ValueError(f"{name}: expected {says} or a positive int, got {v!r}") from None


def check_arch(*, image_size, in_channels, model_channels, num_res_blocks, channel_mult, dropout) -> tuple:
    """The U-Net-shaped models' shared arguments checked; returns (image_size, in_channels, model_channels,
    num_res_blocks) as ints (numpy's integers too)."""
    sizes = positive_ints(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                          num_res_blocks=num_res_blocks)
    if len(channel_mult) == 0 or any(isinstance(m, bool) or not isinstance(m, numbers.Real) or not m > 0
                                     or not math.isfinite(m) for m in channel_mult):
        raise ValueError(f"channel_mult: expected a non-empty sequence of positive numbers, got {channel_mult!r}")
    if image_size % 2 ** (len(channel_mult) - 1):
        raise ValueError(f"image_size: {image_size} must be divisible by 2**{len(channel_mult) - 1} "
                         f"({len(channel_mult)} levels in channel_mult)")
    check_dropout(dropout)
    return sizes


def check_dropout(dropout):
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")


def as_sequence(v, name: str) -> tuple:
    """A sequence argument (channel_mult, attention_resolutions) as a tuple; a TypeError naming it for a number,
    None or a string (tuple(2) raised "'int' object is not iterable")."""
    if isinstance(v, (str, bytes)) or not isinstance(v, collections.abc.Iterable):
        raise TypeError(f"{name}: expected a sequence (a tuple or list), got {type(v).__name__} {v!r}")
    return tuple(v)


def check_flags(**flags):
    """Boolean options: a string or a number was taken as truthy ("no" built the scale-shift model)."""
    for name, v in flags.items():
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"{name}: expected a bool, got {type(v).__name__} {v!r}")


def check_image(x, in_channels: int, multiple: int, name: str = "x", channels_name: str = "in_channels"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{name}: expected shape (N, {in_channels}, H, W) ({channels_name}={in_channels}), "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"{name}: height and width must be multiples of {multiple} (the model downsamples by "
                         f"that much), got {tuple(x.shape[2:])}")


def prepare_timesteps(timesteps, x: torch.Tensor) -> torch.Tensor:
    """(N,), (1,) or scalar timesteps (tensor or number) -> an (N,) tensor on x's device. No host sync. A (1,)
    tensor is broadcast over the batch, as diffusers' U-Nets do (``t[None]`` or ``timesteps[i:i + 1]``)."""
    N = x.shape[0]
    if not isinstance(timesteps, torch.Tensor):
        # numbers.Real: numpy scalars (np.int64 from a timestep array, np.float32) are numbers too
        if isinstance(timesteps, bool) or not isinstance(timesteps, numbers.Real):
            raise TypeError(f"timesteps: expected a tensor of shape ({N},) or a number, got {type(timesteps).__name__}")
        return torch.full((N,), float(timesteps), device=x.device)
    if timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps: expected an integer or floating-point tensor, got {timesteps.dtype}")
    if timesteps.dim() == 0 or (timesteps.shape == (1,) and N != 1):
        timesteps = timesteps.reshape(1).expand(N)
    elif timesteps.shape != (N,):
        raise ValueError(f"timesteps: expected shape ({N},) (one per sample of x), (1,) or a scalar, "
                         f"got {tuple(timesteps.shape)}")
    return timesteps.to(x.device)


def check_class_ids(y, N: int, num_embeddings: int, num_classes: int, null_class: int | None):
    """Shape and dtype always; the range only where it costs no host sync (a CPU tensor, eager mode).

    On CUDA an out-of-range id is caught by the embedding's own device-side assert instead.
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y: expected an integer tensor of shape ({N},), got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y: expected integer class ids (torch.long), got {y.dtype}")
    if y.shape != (N,):
        raise ValueError(f"y: expected shape ({N},) (one class id per sample), got {tuple(y.shape)}")
    if y.device.type == "cpu" and not torch.compiler.is_compiling() and N > 0:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_embeddings:
            allowed = f"[0, {num_classes})" + (f" or {null_class} (the null class)" if null_class is not None else "")
            raise ValueError(f"y: class ids must be in {allowed}; got values in [{lo}, {hi}]")


def check_context(context, N: int, context_dim: int | None):
    if context_dim is None:
        if context is not None:
            raise ValueError("context: this model has no cross-attention (context_dim=None); pass context=None")
        return
    if context is None:
        raise ValueError(f"context: this model cross-attends to a context (context_dim={context_dim}); pass a "
                         f"({N}, S, {context_dim}) tensor (model.null_context(N) for the unconditional one)")
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"context: expected a tensor, got {type(context).__name__}")
    if context.dim() != 3 or context.shape[0] != N or context.shape[2] != context_dim:
        raise ValueError(f"context: expected shape ({N}, S, {context_dim}) (context_dim={context_dim}), "
                         f"got {tuple(context.shape)}")
    if not context.is_floating_point():
        raise TypeError(f"context: expected a floating-point tensor, got {context.dtype}")


def jsonable(v):
    """Tuples to lists and numpy numbers to Python's (recursively), so a config survives a JSON round trip
    unchanged."""
    if isinstance(v, dict):
        return {k: jsonable(u) for k, u in v.items()}
    if isinstance(v, (tuple, list)):
        return [jsonable(u) for u in v]
    if isinstance(v, numbers.Integral) and not isinstance(v, (bool, int)):
        return int(v)
    if isinstance(v, numbers.Real) and not isinstance(v, (bool, int, float)):
        return float(v)
    return v


class ConfigMixin:
    """Models keep their constructor arguments in ``self.config`` (JSON-able) and rebuild from them."""

    config: dict

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
