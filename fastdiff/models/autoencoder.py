"""A small KL-regularised autoencoder: the first stage of latent diffusion (Rombach et al., LDM's AutoencoderKL).

The encoder maps an image to a diagonal Gaussian over latents (mean and log-variance), the decoder maps a latent
back. A U-Net trains and samples on ``scale_factor * z`` so the latents have about unit variance
(LDM's "scale by std"): :meth:`to_latent` and :meth:`from_latent` apply it.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from fastdiff.models._blocks import (ConfigMixin, Downsample, ResBlock, Upsample, as_sequence, check_dropout,
                                     check_flags, check_groups, check_image, jsonable, positive_ints)
from fastdiff.nn import GroupNorm, SpatialSelfAttention


def _check_scale_factor(value) -> float:
    # from_latent divides by it: 0, inf or NaN would turn every decoded latent into inf/NaN
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value == 0:
        raise ValueError(f"scale_factor: expected a finite non-zero number (1 / std of the latents), got {value!r}")
    return float(value)


class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element, from the encoder's (N, 2 * latent_channels, h, w) output."""

    def __init__(self, parameters: torch.Tensor):
        if not isinstance(parameters, torch.Tensor) or parameters.dim() != 4 or parameters.shape[1] % 2:
            # an odd channel count split into unequal halves: a size-mismatch error deep inside
            got = tuple(parameters.shape) if isinstance(parameters, torch.Tensor) else type(parameters).__name__
            raise ValueError(f"parameters: expected (N, 2 * latent_channels, h, w), got {got}")
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * noise; noise drawn from `generator` (on the mean's device) unless given."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        elif not isinstance(noise, torch.Tensor) or noise.shape != self.mean.shape:
            # a (1, ...) or (C, h, w) noise would broadcast: every sample of the batch drawn with the same noise
            raise ValueError(f"noise: expected a tensor of the latent's shape {tuple(self.mean.shape)}, got "
                             f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent's elements (N,), in fp32."""
        # the variance from the fp32 log-variance, not self.var: in fp16 exp(logvar) overflows from logvar > 11 (the
        # clamp allows 20), and in bf16 v - 1 - logvar (~ logvar^2 / 2 near 0) drowns in v's rounding
        m, lv = self.mean.float(), self.logvar.float()
        return 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv).sum(dim=(1, 2, 3))

    def nll(self, z: torch.Tensor) -> torch.Tensor:
        """-log q(z) per sample (N,), in nats."""
        if not isinstance(z, torch.Tensor) or z.shape != self.mean.shape:
            # a (1, ...) z broadcast against the batch: every sample scored against the same latent, silently
            raise ValueError(f"z: expected a tensor of the latent's shape {tuple(self.mean.shape)}, got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        m, lv = self.mean.float(), self.logvar.float()
        return 0.5 * (torch.log(torch.tensor(2 * torch.pi)) + lv + (z.float() - m).pow(2) / lv.exp()).sum(dim=(1, 2, 3))


class _Encoder(nn.Module):
    def __init__(self, in_channels, model_channels, channel_mult, num_res_blocks, latent_channels, num_groups,
                 mid_attention, dropout):
        super().__init__()
        ch = model_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, None, dropout, model_channels * mult, num_groups=num_groups,
                                          zero_init=False, eps=1e-6))
                ch = model_channels * mult
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch, True))
        self.mid = nn.ModuleList([ResBlock(ch, None, dropout, ch, num_groups=num_groups, zero_init=False, eps=1e-6),
                                  ResBlock(ch, None, dropout, ch, num_groups=num_groups, zero_init=False, eps=1e-6)])
        self.mid_attn = SpatialSelfAttention(ch, num_groups=num_groups) if mid_attention else None
        self.norm_out = GroupNorm(num_groups, ch, eps=1e-6, activation="silu")
        self.conv_out = nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for layer in self.down:
            h = layer(h)
        h = self.mid[0](h)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid[1](h)
        return self.conv_out(self.norm_out(h))


class _Decoder(nn.Module):
    def __init__(self, out_channels, model_channels, channel_mult, num_res_blocks, latent_channels, num_groups,
                 mid_attention, dropout):
        super().__init__()
        ch = model_channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(ch, None, dropout, ch, num_groups=num_groups, zero_init=False, eps=1e-6),
                                  ResBlock(ch, None, dropout, ch, num_groups=num_groups, zero_init=False, eps=1e-6)])
        self.mid_attn = SpatialSelfAttention(ch, num_groups=num_groups) if mid_attention else None
        self.up = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch, None, dropout, model_channels * mult, num_groups=num_groups,
                                        zero_init=False, eps=1e-6))
                ch = model_channels * mult
            if level != 0:
                self.up.append(Upsample(ch, True))
        self.norm_out = GroupNorm(num_groups, ch, eps=1e-6, activation="silu")
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid[0](self.conv_in(z))
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid[1](h)
        for layer in self.up:
            h = layer(h)
        return self.conv_out(self.norm_out(h))


class AutoencoderKL(ConfigMixin, nn.Module):
    """A small KL autoencoder (LDM's first stage): ``encode(x) -> DiagonalGaussian``, ``decode(z) -> image``.

    in_channels / out_channels (default in_channels), latent_channels, model_channels and channel_mult (the
    spatial size shrinks by 2**(len(channel_mult) - 1)), num_res_blocks per level, num_groups for GroupNorm,
    mid_attention (self-attention in the middle blocks), and scale_factor: what a latent-diffusion U-Net
    multiplies the latents by (set it from data with ``1 / std(z)``; it is part of the config, so checkpoints
    keep it). ``forward(x, sample_posterior=True, noise=None) -> (reconstruction, posterior)``.
    """

    def __init__(self, in_channels: int = 3, latent_channels: int = 4, model_channels: int = 64,
                 channel_mult=(1, 2, 4), num_res_blocks: int = 1, out_channels: int | None = None,
                 num_groups: int = 32, mid_attention: bool = True, dropout: float = 0.0, scale_factor: float = 1.0):
        super().__init__()
        channel_mult = as_sequence(channel_mult, "channel_mult")
        check_flags(mid_attention=mid_attention)
        check_dropout(dropout)
        if not channel_mult or any(isinstance(m, bool) or not isinstance(m, numbers.Real) or not math.isfinite(m)
                                   or m <= 0 or m != int(m) for m in channel_mult):
            # int(1.5) would silently build another model than asked for
            raise ValueError(f"channel_mult: expected a non-empty sequence of positive ints, got {channel_mult!r}")
        channel_mult = tuple(int(m) for m in channel_mult)
        out_channels = in_channels if out_channels is None else out_channels
        in_channels, latent_channels, model_channels, out_channels, num_res_blocks = positive_ints(
            in_channels=in_channels, latent_channels=latent_channels, model_channels=model_channels,
            out_channels=out_channels, num_res_blocks=num_res_blocks)
        for m in channel_mult:
            check_groups(model_channels * m, num_groups, "the autoencoder")
        self.config = jsonable(dict(
            in_channels=in_channels, latent_channels=latent_channels, model_channels=model_channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks, out_channels=out_channels,
            num_groups=num_groups, mid_attention=mid_attention, dropout=dropout,
            scale_factor=_check_scale_factor(scale_factor)))
        self.in_channels, self.out_channels, self.latent_channels = in_channels, out_channels, latent_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        args = dict(model_channels=model_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                    latent_channels=latent_channels, num_groups=num_groups, mid_attention=mid_attention,
                    dropout=dropout)
        self.encoder = _Encoder(in_channels, **args)
        self.decoder = _Decoder(out_channels, **args)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    @property
    def scale_factor(self) -> float:
        return self.config["scale_factor"]

    @scale_factor.setter
    def scale_factor(self, value: float):
        self.config["scale_factor"] = _check_scale_factor(value)

    def latent_shape(self, image_shape) -> tuple:
        """(C, H, W) of an image -> (latent_channels, H / f, W / f)."""
        f = self.downsample_factor
        return (self.latent_channels, image_shape[-2] // f, image_shape[-1] // f)

    def encode(self, x) -> DiagonalGaussian:
        check_image(x, self.in_channels, self.downsample_factor)
        dtype = self.quant_conv.weight.dtype
        return DiagonalGaussian(self.quant_conv(self.encoder(x.to(dtype))))

    def decode(self, z) -> torch.Tensor:
        check_image(z, self.latent_channels, 1, name="z", channels_name="latent_channels")
        dtype = self.quant_conv.weight.dtype
        return self.decoder(self.post_quant_conv(z.to(dtype)))

    def forward(self, x, sample_posterior: bool = True, noise=None, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator=generator, noise=noise) if sample_posterior else posterior.mode()
        return self.decode(z).to(x.dtype), posterior

    def to_latent(self, x, sample: bool = True, noise=None, generator=None) -> torch.Tensor:
        """scale_factor * z, z drawn from (or the mode of) the posterior: what the U-Net sees."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator, noise=noise) if sample else posterior.mode()
        return z * self.scale_factor

    def from_latent(self, z) -> torch.Tensor:
        """decode(z / scale_factor): a U-Net's latent sample back to an image."""
        return self.decode(z / self.scale_factor)
