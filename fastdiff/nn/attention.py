"""Attention layers of diffusion U-Nets on the fused attention op.

``Attention`` is the LDM / Stable Diffusion (cross-)attention layer on token sequences; ``SpatialSelfAttention`` is
the ADM / DDPM attention block on feature maps. Both hand ``fastdiff.ops.attention`` per-head views of their
projections: (B, S, H·Dh) memory seen as (B, H, S, Dh) with strides, no transposing copy, and the fused kernels
write their output in that same (B, S, H, Dh) layout, so merging the heads again is a view.
"""
from __future__ import annotations

import torch

from fastdiff import ops
from fastdiff.nn.norm import GroupNorm, positive_int, traced_as_leaf


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H·Dh) → (B, H, S, Dh), a view."""
    b, s, c = t.shape
    return t.view(b, s, heads, c // heads).transpose(1, 2)


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    """(B, H, S, Dh) → (B, S, H·Dh): a view when o has (B, S, H, Dh) memory, as the fused kernels write it."""
    b, h, s, d = o.shape
    return o.transpose(1, 2).reshape(b, s, h * d)


class Attention(torch.nn.Module):
    """Multi-head attention on tokens: self-attention, or cross-attention to a context (LDM's CrossAttention).

    forward(x, context=None): x (B, S, query_dim); context (B, S_ctx, context_dim) or None (self-attention).
    Returns (B, S, query_dim). Parameters: ``to_q``, ``to_k``, ``to_v`` (bias-free Linear layers; to_k and to_v take
    context_dim, or query_dim without a context) and ``to_out`` (Linear(heads · dim_head, query_dim) with bias).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 device=None, dtype=None):
        super().__init__()
        query_dim, heads, dim_head = (positive_int(v, n) for v, n in ((query_dim, "query_dim"), (heads, "heads"),
                                                                       (dim_head, "dim_head")))
        if context_dim is not None:
            try:
                context_dim = positive_int(context_dim, "context_dim")
            except ValueError:
                raise ValueError(f"context_dim: expected None or a positive int, got {context_dim!r}") from None
        inner = heads * dim_head
        kv_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        kw = {"device": device, "dtype": dtype}
        self.to_q = torch.nn.Linear(query_dim, inner, bias=False, **kw)
        self.to_k = torch.nn.Linear(kv_dim, inner, bias=False, **kw)
        self.to_v = torch.nn.Linear(kv_dim, inner, bias=False, **kw)
        self.to_out = torch.nn.Linear(inner, query_dim, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return traced_as_leaf(self, x, context)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if context is not None and not isinstance(context, torch.Tensor):
            raise TypeError(f"context: expected None or a torch.Tensor, got {type(context).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.to_q.in_features:
            raise ValueError(f"x: expected shape (B, S, {self.to_q.in_features}), got {tuple(x.shape)}")
        if context is None and self.to_k.in_features != self.to_q.in_features:
            raise ValueError(f"context: this cross-attention (context_dim={self.to_k.in_features}) needs a context "
                             f"of shape ({x.shape[0]}, S_ctx, {self.to_k.in_features}), got None")
        ctx = x if context is None else context
        if ctx.dim() != 3 or ctx.shape[0] != x.shape[0] or ctx.shape[-1] != self.to_k.in_features:
            raise ValueError(f"context: expected shape ({x.shape[0]}, S_ctx, {self.to_k.in_features}), "
                             f"got {tuple(ctx.shape)}")
        if ctx.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"context: expected x's dtype {x.dtype}, got {ctx.dtype}")
        q = _heads(self.to_q(x), self.heads)
        k = _heads(self.to_k(ctx), self.heads)
        v = _heads(self.to_v(ctx), self.heads)
        o = ops.attention(q, k, v, scale=self.scale)
        return self.to_out(_merge_heads(o))

    def extra_repr(self):
        return f"heads={self.heads}, dim_head={self.dim_head}"


class SpatialSelfAttention(torch.nn.Module):
    """ADM's AttentionBlock on (N, C, H, W) maps: x + proj_out(attention(qkv(GroupNorm(x)))) over the H·W positions.

    ``norm`` is the fused fastdiff.nn.GroupNorm; ``qkv`` a Linear(C, 3C) applied to (N, H·W, C) tokens, its output
    split as [q | k | v], each then into heads (the order of ADM's QKVAttention, not the head-interleaved legacy
    one); ``proj_out`` a zero-initialised Linear(C, C) (ADM's zero_module, so the block starts as the identity).
    Heads: ``num_heads``, or C // num_head_channels when num_head_channels != -1.

    Memory formats: a channels_last input is (N, H·W, C) token memory already, so the projections read and write it
    in place and the output is channels_last; an NCHW input is read as strided tokens by the qkv matmul and the
    output projection is computed channel-first, so the result is NCHW with no separate transposing copy.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, num_groups: int = 32,
                 device=None, dtype=None):
        super().__init__()
        channels = positive_int(channels, "channels")
        if num_head_channels == -1:
            num_heads = positive_int(num_heads, "num_heads")
            if channels % num_heads != 0:
                raise ValueError(f"num_heads: {num_heads} heads must divide the {channels} channels")
            heads = num_heads
        else:
            try:
                num_head_channels = positive_int(num_head_channels, "num_head_channels")
            except ValueError:
                raise ValueError(f"num_head_channels: expected -1 or a positive int, got {num_head_channels!r}") \
                    from None
            if channels % num_head_channels != 0:
                raise ValueError(f"num_head_channels: {num_head_channels} must divide the {channels} channels")
            heads = channels // num_head_channels
        num_groups = positive_int(num_groups, "num_groups")
        groups = min(num_groups, channels)  # small test models have fewer than 32 channels
        if channels % groups != 0:
            raise ValueError(f"num_groups: {groups} GroupNorm groups do not divide the {channels} channels")
        self.channels = channels
        self.num_heads = heads
        self.dim_head = channels // heads
        self.scale = self.dim_head ** -0.5
        kw = {"device": device, "dtype": dtype}
        self.norm = GroupNorm(groups, channels, **kw)
        self.qkv = torch.nn.Linear(channels, 3 * channels, **kw)
        self.proj_out = torch.nn.Linear(channels, channels, **kw)
        torch.nn.init.zeros_(self.proj_out.weight)
        torch.nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return traced_as_leaf(self, x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x: expected shape (N, {self.channels}, H, W), got {tuple(x.shape)}")
        n, c, hh, ww = x.shape
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        h = self.norm(x)  # keeps x's memory format
        if channels_last:
            tokens = h.permute(0, 2, 3, 1).reshape(n, hh * ww, c)  # a view: channels_last is (N, H, W, C) memory
        else:
            tokens = h.flatten(2).transpose(1, 2)  # (N, HW, C) with strides (C·HW, 1, HW): the matmul reads it so
        qkv = self.qkv(tokens)  # (N, HW, 3C), token-major
        q, k, v = qkv.split(c, dim=-1)
        o = ops.attention(_heads(q, self.num_heads), _heads(k, self.num_heads), _heads(v, self.num_heads),
                          scale=self.scale)
        o = _merge_heads(o)  # (N, HW, C)
        if channels_last:
            y = self.proj_out(o)  # (N, HW, C) = channels_last (N, C, H, W) memory
            return x + y.view(n, hh, ww, c).permute(0, 3, 1, 2)
        # NCHW: the projection as W · oᵀ gives (N, C, HW) channel-first directly, the transpose folded into the GEMM.
        y = torch.matmul(self.proj_out.weight, o.transpose(1, 2))
        # the bias in y's dtype: under autocast the matmul is low precision but the bias stays fp32, and adding it
        # as is would promote the block's output to fp32 (the channels_last path's Linear keeps the low precision)
        y = y + self.proj_out.bias.to(y.dtype)[:, None]
        return x + y.view(n, c, hh, ww)

    def extra_repr(self):
        return f"channels={self.channels}, num_heads={self.num_heads}, dim_head={self.dim_head}"
