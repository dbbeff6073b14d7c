"""The ADM U-Net (Dhariwal & Nichol, "Diffusion Models Beat GANs", guided-diffusion's UNetModel) on fused layers,
with LDM-style cross-attention to a context sequence as an option."""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models._blocks import (AttentionBlock, ConfigMixin, EmbedSequential, ResBlock, Upsample, as_sequence,
                                     check_flags,
                                     attention_downsample_rates, build_down_path, check_arch, check_class_ids,
                                     check_context, check_groups, check_image, jsonable, optional_positive_int,
                                     positive_int, prepare_timesteps, timestep_embedding, zero_)
from fastdiff.nn import GroupNorm


class UNet(ConfigMixin, nn.Module):
    """The ADM U-Net, with guided-diffusion's argument names.

    image_size: the training resolution (it places the attention layers; any H, W divisible by
        2**(len(channel_mult) - 1) runs).
    in_channels, out_channels: out_channels = 2 * in_channels for learned variances (Improved DDPM).
    model_channels, channel_mult: the width, and its multiplier per resolution level.
    num_res_blocks: residual blocks per level (the decoder has one more).
    attention_resolutions: the feature-map sizes that get self-attention, e.g. (16, 8) for a 64x64 model.
    dropout, num_heads / num_head_channels (a fixed head width overrides num_heads), num_heads_upsample.
    num_classes: class-conditional when set; ``learn_null_class=True`` adds one more embedding row,
        ``model.null_class_id == num_classes``, the "no class" label of classifier-free guidance (``y=None`` then
        means all-null).
    use_scale_shift_norm: AdaGN (GroupNorm modulated by the embedding's scale and shift, one fused op); False adds
        the embedding to the activations instead.
    resblock_updown: BigGAN residual blocks for up/down-sampling (else conv / nearest + conv).
    context_dim: cross-attention to a (N, S, context_dim) context after each self-attention (LDM-style).
    num_groups: GroupNorm groups (32 in ADM); every width must be a multiple of it.

    ``forward(x, timesteps, y=None, context=None)``: x (N, in_channels, H, W) in either memory format,
    timesteps (N,) or a scalar, y (N,) class ids, context (N, S, context_dim). Returns (N, out_channels, H, W)
    in x's dtype. The model computes in its parameters' dtype (``model.to(torch.bfloat16)``) or under autocast.

    Bad input raises a ValueError/TypeError naming the argument: x's channel count or size, timesteps' shape, y's
    shape and dtype (always) and y's range (only for CPU tensors outside torch.compile, where checking costs no
    device-to-host sync; on a GPU an out-of-range id trips the embedding's device-side assert instead), and the
    context's shape and width.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions=(), dropout: float = 0.0, channel_mult=(1, 2, 4, 8),
                 num_classes: int | None = None, num_heads: int = 1, num_head_channels: int = -1,
                 use_scale_shift_norm: bool = True, resblock_updown: bool = False, context_dim: int | None = None,
                 *, conv_resample: bool = True, num_heads_upsample: int = -1, num_groups: int = 32,
                 learn_null_class: bool = False):
        super().__init__()
        channel_mult = as_sequence(channel_mult, "channel_mult")
        attention_resolutions = as_sequence(attention_resolutions, "attention_resolutions")
        check_flags(use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                    conv_resample=conv_resample, learn_null_class=learn_null_class)
        image_size, in_channels, model_channels, num_res_blocks = check_arch(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels,
            num_res_blocks=num_res_blocks, channel_mult=channel_mult, dropout=dropout)
        out_channels = positive_int(out_channels, "out_channels")
        num_classes = optional_positive_int(num_classes, "num_classes")
        if learn_null_class and num_classes is None:
            raise ValueError("learn_null_class: needs num_classes (the null class is one more class)")
        context_dim = optional_positive_int(context_dim, "context_dim")
        if num_head_channels == -1:
            num_heads = positive_int(num_heads, "num_heads")
        num_heads_upsample = optional_positive_int(num_heads_upsample, "num_heads_upsample", -1, "-1 (num_heads)")
        self.config = jsonable(dict(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels, out_channels=out_channels,
            num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions, dropout=dropout,
            channel_mult=channel_mult, num_classes=num_classes, num_heads=num_heads,
            num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, context_dim=context_dim, conv_resample=conv_resample,
            num_heads_upsample=num_heads_upsample, num_groups=num_groups, learn_null_class=learn_null_class))
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes, self.context_dim = model_channels, num_classes, context_dim
        self.null_class_id = num_classes if learn_null_class else None
        self._multiple = 2 ** (len(channel_mult) - 1)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_ds = attention_downsample_rates(image_size, attention_resolutions, len(channel_mult))

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = None
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + int(learn_null_class), emb_dim)

        common = dict(dropout=dropout, num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
                      num_groups=num_groups)
        self.input_blocks, self.middle_block, chans, ch, ds = build_down_path(
            image_size=image_size, model_channels=model_channels, num_res_blocks=num_res_blocks,
            attention_ds=attention_ds, channel_mult=channel_mult, num_heads=num_heads,
            resblock_updown=resblock_updown, conv_resample=conv_resample, context_dim=context_dim,
            in_channels=in_channels, emb_dim=emb_dim, **common)

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = chans.pop()
                out_ch = int(model_channels * mult)
                layers = [ResBlock(ch + ich, emb_dim, dropout, out_ch, use_scale_shift_norm, num_groups=num_groups)]
                ch = out_ch
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, num_heads_upsample, num_head_channels, num_groups, context_dim))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb_dim, dropout, ch, use_scale_shift_norm, up=True,
                                           num_groups=num_groups) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(layers))

        check_groups(ch, num_groups, "the output norm")
        self.out_norm = GroupNorm(num_groups, ch, activation="silu")
        self.out_conv = zero_(nn.Conv2d(ch, out_channels, 3, padding=1))

    def null_context(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        """The "empty" context of classifier-free guidance: zeros of shape (batch_size, 1, context_dim)."""
        if self.context_dim is None:
            raise ValueError("context: this model has no cross-attention (context_dim=None)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 0:
            raise ValueError(f"batch_size: expected a non-negative int, got {batch_size!r}")
        return torch.zeros(int(batch_size), 1, self.context_dim, device=device or self.device, dtype=dtype or self.dtype)

    def forward(self, x, timesteps, y=None, context=None):
        check_image(x, self.in_channels, self._multiple)
        N = x.shape[0]
        t = prepare_timesteps(timesteps, x)
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y: this model is not class-conditional (num_classes=None); pass y=None")
        elif y is None:
            if self.null_class_id is None:
                raise ValueError(f"y: this model is class-conditional (num_classes={self.num_classes}); pass class "
                                 f"ids of shape ({N},)")
            y = torch.full((N,), self.null_class_id, dtype=torch.long, device=x.device)
        else:
            check_class_ids(y, N, self.label_emb.num_embeddings, self.num_classes, self.null_class_id)
        check_context(context, N, self.context_dim)

        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(device=x.device, dtype=torch.long))
        emb = F.silu(emb)  # the SiLU that opens every ResBlock's embedding projection in ADM, applied once
        if context is not None:
            context = context.to(device=x.device, dtype=dtype)

        h = x.to(dtype)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out_conv(self.out_norm(h)).to(x.dtype)
