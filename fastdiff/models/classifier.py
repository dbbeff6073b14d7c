"""ADM's noisy classifier (guided-diffusion's EncoderUNetModel): the U-Net's encoder half and a pooled head,
trained on noised images x_t to give p(y | x_t, t) for classifier guidance."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models._blocks import (ConfigMixin, as_sequence, attention_downsample_rates, build_down_path, check_arch,
                                     check_flags,
                                     check_class_ids, check_groups, check_image, jsonable, positive_int,
                                     prepare_timesteps, timestep_embedding, zero_)
from fastdiff.nn import Attention, GroupNorm

_POOLS = ("attention", "adaptive")


class NoisyClassifier(ConfigMixin, nn.Module):
    """The ADM half-U-Net classifier on noisy inputs: ``forward(x_t, timesteps) -> logits (N, out_channels)``.

    Arguments as in :class:`fastdiff.models.UNet` (out_channels is the number of classes), plus ``pool``:
    ``"attention"`` (ADM's default for its classifiers, in structure though not in layers, so ADM checkpoints do not
    load: attention pooling with a learned position embedding, so
    inputs must be image_size x image_size) or ``"adaptive"`` (global average pooling, any size).
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions=(), dropout: float = 0.0, channel_mult=(1, 2, 4, 8),
                 num_heads: int = 1, num_head_channels: int = -1, use_scale_shift_norm: bool = True,
                 resblock_updown: bool = False, pool: str = "attention", *, conv_resample: bool = True,
                 num_groups: int = 32):
        super().__init__()
        channel_mult = as_sequence(channel_mult, "channel_mult")
        attention_resolutions = as_sequence(attention_resolutions, "attention_resolutions")
        check_flags(use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                    conv_resample=conv_resample)
        image_size, in_channels, model_channels, num_res_blocks = check_arch(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels,
            num_res_blocks=num_res_blocks, channel_mult=channel_mult, dropout=dropout)
        try:
            out_channels = positive_int(out_channels, "out_channels")
        except ValueError:
            raise ValueError(f"out_channels: expected the number of classes (a positive int), "
                             f"got {out_channels!r}") from None
        if pool not in _POOLS:
            raise ValueError(f"pool: expected one of {_POOLS}, got {pool!r}")
        self.config = jsonable(dict(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels, out_channels=out_channels,
            num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions, dropout=dropout,
            channel_mult=channel_mult, num_heads=num_heads, num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown, pool=pool,
            conv_resample=conv_resample, num_groups=num_groups))
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.num_classes = out_channels
        self.model_channels, self.pool = model_channels, pool
        self._multiple = 2 ** (len(channel_mult) - 1)
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks, self.middle_block, _, ch, ds = build_down_path(
            image_size=image_size, model_channels=model_channels, num_res_blocks=num_res_blocks,
            attention_ds=attention_downsample_rates(image_size, attention_resolutions, len(channel_mult)),
            dropout=dropout, channel_mult=channel_mult, num_heads=num_heads, num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown, conv_resample=conv_resample,
            num_groups=num_groups, context_dim=None, in_channels=in_channels, emb_dim=emb_dim)
        check_groups(ch, num_groups, "the output norm")
        self.out_norm = GroupNorm(num_groups, ch, activation="silu")
        if pool == "attention":
            # As ADM's AttentionPool2d: the mean token, with a learned position embedding, attends to all tokens.
            # Not its layers: bias-free q/k/v and an output projection before the head (ADM: a biased qkv_proj and
            # one c_proj), so ADM classifier checkpoints do not load into it; pool="adaptive" matches ADM's.
            head_ch = num_head_channels if num_head_channels != -1 else ch // num_heads
            if ch % head_ch:
                raise ValueError(f"num_head_channels: {head_ch} does not divide the pooled width {ch}")
            side = image_size // ds
            self.pos_emb = nn.Parameter(torch.randn(side * side + 1, ch) / ch ** 0.5)
            self.attn_pool = Attention(ch, heads=ch // head_ch, dim_head=head_ch)
        self.head = nn.Linear(ch, out_channels)
        if pool == "adaptive":
            zero_(self.head)  # ADM zero-initialises the adaptive head's 1x1 conv

    def forward(self, x, timesteps):
        check_image(x, self.in_channels, self._multiple)
        if self.pool == "attention" and (x.shape[2] != self.image_size or x.shape[3] != self.image_size):
            raise ValueError(f"x: attention pooling has a position embedding for {self.image_size}x{self.image_size}"
                             f" inputs, got {tuple(x.shape[2:])} (use pool='adaptive' for other sizes)")
        t = prepare_timesteps(timesteps, x)
        dtype = self.time_embed[0].weight.dtype
        emb = F.silu(self.time_embed(timestep_embedding(t, self.model_channels).to(dtype)))
        h = x.to(dtype)
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.out_norm(self.middle_block(h, emb))
        if self.pool == "adaptive":
            pooled = h.mean(dim=(2, 3))
        else:
            tokens = h.flatten(2).transpose(1, 2)  # (N, HW, C)
            tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.pos_emb.to(tokens.dtype)
            pooled = self.attn_pool(tokens[:, :1], context=tokens)[:, 0]
        return self.head(pooled).to(x.dtype)

    def log_prob_grad(self, x, timesteps, y) -> torch.Tensor:
        """grad_x log p(y | x_t, t): the classifier-guidance term (ADM's cond_fn without its scale)."""
        check_class_ids(y, x.shape[0], self.out_channels, self.out_channels, None)
        from fastdiff.diffusion.guidance import classifier_grad

        return classifier_grad(self, x, timesteps, y)
