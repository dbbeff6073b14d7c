# PLACEHOLDER until the attention branch lands: replaced at merge
"""Minimal attention layers (torch's scaled_dot_product_attention) with the attention branch's exact API."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.nn.norm import GroupNorm


class Attention(torch.nn.Module):
    """Multi-head attention on (B, S, query_dim) tokens; cross-attention to `context` (B, S_kv, context_dim)."""

    def __init__(self, query_dim: int, context_dim=None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = torch.nn.Linear(query_dim, inner, bias=False)
        self.to_k = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_v = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_out = torch.nn.Linear(inner, query_dim)

    def forward(self, x, context=None):
        ctx = x if context is None else context
        B, S, _ = x.shape

        def split(t):
            return t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, S, self.heads * self.dim_head))


class SpatialSelfAttention(torch.nn.Module):
    """ADM's AttentionBlock: x + proj_out(attention(qkv(GroupNorm(x)))) on (N, C, H, W), either memory format."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, num_groups: int = 32):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"num_head_channels: {num_head_channels} does not divide channels={channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide channels={channels}")
        self.norm = GroupNorm(num_groups, channels)
        self.qkv = torch.nn.Linear(channels, 3 * channels)
        self.proj_out = torch.nn.Linear(channels, channels)
        torch.nn.init.zeros_(self.proj_out.weight)
        torch.nn.init.zeros_(self.proj_out.bias)

    def forward(self, x):
        N, C, H, W = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C): a view in both memory formats
        q, k, v = (u.reshape(N, H * W, self.num_heads, C // self.num_heads).transpose(1, 2)
                   for u in self.qkv(t).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, H * W, C)
        return x + self.proj_out(out).transpose(1, 2).reshape(N, C, H, W)
