"""Triton GroupNorm + AdaGN scale/shift + SiLU: ``fastdiff::group_norm_triton`` and its backward.

Same contract as the C++ ops (csrc/cpu/group_norm.cpp): y = act((GroupNorm(x) * w + b) * (1 + s) + t),
returning (y, mean, rstd) with mean/rstd (N, G) fp32; the backward returns (grad_x, grad_weight, grad_bias,
grad_scale, grad_shift) with an empty (0,) tensor for each parameter that was None.

Algorithm. x is viewed as (N, C, S), S the flattened spatial extent, and read in place in either layout:
NCHW (offset c*S + s) or channels-last (offset s*C + c). Every pass works on [BLOCK_C, BLOCK_S] tiles; only
the offset formula depends on the layout, and Triton's coalescing follows whichever axis is contiguous (the
data loads and stores compile to 128-bit accesses in both). One program per (n, group) would be 64 programs
at N=2, G=32, half of an H100's 132 SMs, so each (n, channel block) is also split along S into SPLIT chunks,
sized so the reduction grids hold about 4 programs per SM; the elementwise grids have one tile a program.
Forward, 3 launches:
  1. stats:  grid (N*SPLIT, C/BLOCK_C). Statistics of the shifted data x - K (K: the group's first element,
             so that tile means are O(std), not O(|mean|)). Per channel and tile, (mean, M2) from registers
             (two passes over the tile), tiles merged with Chan's formula; writes per-(n, split, c) partials.
  2. merge:  grid (N*G). Merges the group's SPLIT x C/G partials with the exact multi-way parallel formula
             (mean = sum n_i m_i / n, then M2 = sum M2_i + sum n_i (m_i - mean)^2), writes rstd and
             mean = K + mean(x - K) (N, G), and keeps (K, mean(x - K)) for the apply.
  3. apply:  grid (N*ceil(S/BLOCK_S), C/BLOCK_C). Folds per channel A = rstd w (1+s), B0 = b (1+s) + t and
             writes y = act(A ((x - K) - mean(x - K)) + B0). The C++ kernels fold to A x + B, which cancels
             A x against B when |mean| >> std (A ~ 300 at x = 1000 + 0.01 randn: errors of 1e-2); x - K is
             exact for x near K, so y stays accurate to ~1e-6 there, for two more flops in a memory-bound
             pass.
Backward, 3 launches (+ a sum over N of two (N, C) fp32 tensors for grad_weight/grad_bias):
  1. sums:   like stats; per (n, split, c) S1 = sum gz, S2 = sum gz (x - mean), gz = gy act'(z), z recomputed.
  2. merge:  grid (N*G); sums the split partials in a fixed order, writes grad_scale/grad_shift, the
             per-(n, c) terms of grad_weight/grad_bias, and per-(n, g) Q, R of grad_x = P gz + Q (x-mean) + R.
  3. apply:  like the forward apply; writes grad_x.
Cost model (E = N*C*S elements of b bytes): the forward reads x twice and writes y, 3 E b bytes (the second
read may hit L2 for small tensors); the backward reads x and grad_y twice and writes grad_x, 5 E b bytes.
The partials are N*SPLIT*C*8 bytes (tens of KB). No atomics: every reduction has a fixed order, so results
are bit-identical run to run (on one GPU model: SPLIT depends on the SM count).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# Tiling knobs. Module attributes (not constants folded into the code) so tests can shrink them and make the
# interpreter exercise several tiles per program, several splits and ragged tails on small shapes.
_TILE = 4096          # elements per [BLOCK_C, BLOCK_S] tile: 32 fp32 registers a thread at 4 warps
_MAX_BLOCK_S = 1024   # NCHW: spatial extent of a tile (contiguous run per channel)
_CL_BLOCK_C = 64      # channels-last: channels per tile (128 B of bf16 per row, a full cache line)
_PROGRAMS_PER_SM = 4  # split S until the stats/sums grids hold about this many programs per SM
_INTERPRET_PROGRAMS = 4  # the target grid size off-GPU (TRITON_INTERPRET=1 runs programs one by one)
_NUM_WARPS = 4

# Tests set this to fill every output and scratch buffer with NaN before the kernels run, so an element a
# kernel fails to write shows up as a NaN.
_POISON = False


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    t = like.new_empty(shape, dtype=dtype or like.dtype)
    return t.fill_(float("nan")) if _POISON else t


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    t = torch.empty_like(x)  # keeps x's layout (NCHW or channels-last)
    return t.fill_(float("nan")) if _POISON else t


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(c, s, C, S, CHANNELS_LAST: tl.constexpr):
    # [BLOCK_C, BLOCK_S] offsets within one sample, int64 so a sample may exceed 2^31 elements.
    if CHANNELS_LAST:
        return s[None, :].to(tl.int64) * C + c[:, None]
    else:
        return c[:, None].to(tl.int64) * S + s[None, :]


@triton.jit
def _first_offset(c, CPG, C, S, CHANNELS_LAST: tl.constexpr):
    # Offset within a sample of x[., first channel of c's group, s = 0].
    c0 = (c // CPG) * CPG
    if CHANNELS_LAST:
        return c0
    else:
        return c0.to(tl.int64) * S


@triton.jit
def _coef(n, c, cmask, mean_ptr, rstd_ptr, w_ptr, b_ptr, s_ptr, t_ptr, G, CPG, w_st, b_st, s_sn, s_sc, t_sn,
          t_sc, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr):
    # Per-channel fold of GroupNorm, its affine and AdaGN: z = A (x - mean) + B0, and g = w (1 + s), the
    # factor dz/dxhat that the backward needs.
    grp = n * G + c // CPG
    mu = tl.load(mean_ptr + grp, mask=cmask, other=0.0)
    r = tl.load(rstd_ptr + grp, mask=cmask, other=0.0)
    k = tl.full(c.shape, 1.0, tl.float32)
    if HAS_S:
        k += tl.load(s_ptr + n * s_sn + c * s_sc, mask=cmask, other=0.0).to(tl.float32)
    g = k
    if HAS_W:
        g = k * tl.load(w_ptr + c * w_st, mask=cmask, other=0.0).to(tl.float32)
    B0 = tl.zeros(c.shape, tl.float32)
    if HAS_B:
        B0 = k * tl.load(b_ptr + c * b_st, mask=cmask, other=0.0).to(tl.float32)
    if HAS_T:
        B0 += tl.load(t_ptr + n * t_sn + c * t_sc, mask=cmask, other=0.0).to(tl.float32)
    return mu, r, r * g, B0, g


@triton.jit
def _silu_grad(z):
    sg = 1.0 / (1.0 + tl.exp(-z))
    return sg * (1.0 + z * (1.0 - sg))


@triton.jit
def _gn_stats_kernel(x_ptr, pmean_ptr, pm2_ptr, C, S, CPG, CHUNK, SPLIT, CHANNELS_LAST: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid0 = tl.program_id(0)
    n = pid0 // SPLIT
    k = pid0 % SPLIT
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    x_base = x_ptr + n.to(tl.int64) * C * S
    # Shifted data: statistics of x - K with K = the group's first element, so the tile means and their
    # differences are O(std) rather than O(|mean|) and keep their digits when |mean| >> std.
    K = tl.load(x_base + _first_offset(c, CPG, C, S, CHANNELS_LAST), mask=cmask, other=0.0).to(tl.float32)
    s_lo = k * CHUNK
    s_hi = tl.minimum(S, s_lo + CHUNK)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = cmask[:, None] & (s < s_hi)[None, :]
        xv = tl.load(x_base + _tile_offsets(c, s, C, S, CHANNELS_LAST), mask=m, other=0.0).to(tl.float32)
        xv = tl.where(m, xv - K[:, None], 0.0)
        nb = tl.minimum(s_hi - s0, BLOCK_S).to(tl.float32)
        # The tile's own (mean, M2) from registers: deviations from the tile mean, never E[x^2] - E[x]^2.
        tmean = tl.sum(xv, axis=1) / nb
        d = tl.where(m, xv - tmean[:, None], 0.0)
        tm2 = tl.sum(d * d, axis=1)
        # Chan merge; every channel of the tile has the same count, na before it and nb in it.
        na = (s0 - s_lo).to(tl.float32)
        f = nb / (na + nb)
        delta = tmean - mean
        mean += delta * f
        # (na f) first: for the first tile na = 0 and the term is 0 even where delta * delta overflows (|x| >~ 1e19
        # in fp32), where inf * 0 = NaN would make the variance NaN, clamped to 0 by the merge (rstd 1/sqrt(eps)).
        m2 += tm2 + delta * (delta * (na * f))
    out = (n * SPLIT + k).to(tl.int64) * C + c
    tl.store(pmean_ptr + out, mean, mask=cmask)
    tl.store(pm2_ptr + out, m2, mask=cmask)


@triton.jit
def _gn_fwd_merge_kernel(x_ptr, pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr, ctr_ptr, C, S, G, CPG, CHUNK, SPLIT,
                         eps, CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CF: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    k = tl.arange(0, BLOCK_K)
    kmask = k < SPLIT
    cnt = tl.where(kmask, tl.minimum(S - k * CHUNK, CHUNK), 0).to(tl.float32)  # elements per channel
    row = (n * SPLIT + k).to(tl.int64) * C + g * CPG
    j = tl.arange(0, BLOCK_CF)
    total = tl.sum(cnt, axis=0) * CPG
    # Exact multi-way parallel merge in two sweeps (the partials are few and L2-resident): the mean first,
    # then M2 = sum M2_i + sum n_i (mean_i - mean)^2, in which an error in the mean enters only squared.
    # The partial means are of x - K (K: the group's first element, as in the stats kernel).
    acc = tl.zeros([BLOCK_K, BLOCK_CF], tl.float32)
    for c0 in range(0, CPG, BLOCK_CF):
        m = kmask[:, None] & (c0 + j < CPG)[None, :]
        pm = tl.load(pmean_ptr + row[:, None] + (c0 + j)[None, :], mask=m, other=0.0)
        acc += cnt[:, None] * pm
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    acc = tl.zeros([BLOCK_K, BLOCK_CF], tl.float32)
    for c0 in range(0, CPG, BLOCK_CF):
        m = kmask[:, None] & (c0 + j < CPG)[None, :]
        pm = tl.load(pmean_ptr + row[:, None] + (c0 + j)[None, :], mask=m, other=0.0)
        pm2 = tl.load(pm2_ptr + row[:, None] + (c0 + j)[None, :], mask=m, other=0.0)
        d = pm - mean
        acc += tl.where(m, pm2 + cnt[:, None] * d * d, 0.0)
    var = tl.maximum(tl.sum(tl.sum(acc, axis=1), axis=0) / total, 0.0)
    K = tl.load(x_ptr + n.to(tl.int64) * C * S + _first_offset(g * CPG, CPG, C, S, CHANNELS_LAST))
    K = K.to(tl.float32)
    tl.store(mean_ptr + pid, K + mean)
    tl.store(rstd_ptr + pid, 1.0 / tl.sqrt(var + eps))
    # (K, mean of x - K) for the apply pass: x - K is exact for x near K, so y keeps the digits that
    # rounding K + mean to fp32 would lose.
    tl.store(ctr_ptr + 2 * pid, K)
    tl.store(ctr_ptr + 2 * pid + 1, mean)


@triton.jit
def _gn_apply_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, ctr_ptr, w_ptr, b_ptr, s_ptr, t_ptr, C, S, G, CPG, NSB,
                     w_st, b_st, s_sn, s_sc, t_sn, t_sc, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_S: tl.constexpr, HAS_T: tl.constexpr, SILU: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid0 = tl.program_id(0)
    n = pid0 // NSB
    s = (pid0 % NSB) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mu, r, A, B0, g = _coef(n, c, cmask, mean_ptr, rstd_ptr, w_ptr, b_ptr, s_ptr, t_ptr, G, CPG, w_st, b_st,
                            s_sn, s_sc, t_sn, t_sc, HAS_W, HAS_B, HAS_S, HAS_T)
    grp = n * G + c // CPG
    K = tl.load(ctr_ptr + 2 * grp, mask=cmask, other=0.0)
    ms = tl.load(ctr_ptr + 2 * grp + 1, mask=cmask, other=0.0)
    m = cmask[:, None] & (s < S)[None, :]
    offs = n.to(tl.int64) * C * S + _tile_offsets(c, s, C, S, CHANNELS_LAST)
    xv = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    # x - mean as (x - K) - mean(x - K); masked lanes zeroed so they compute nothing that overflows.
    d = tl.where(m, (xv - K[:, None]) - ms[:, None], 0.0)
    z = A[:, None] * d + B0[:, None]
    if SILU:
        z = z / (1.0 + tl.exp(-z))
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gn_bwd_sums_kernel(gy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, s_ptr, t_ptr, ps1_ptr, ps2_ptr, C, S,
                        G, CPG, CHUNK, SPLIT, w_st, b_st, s_sn, s_sc, t_sn, t_sc, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr, SILU: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid0 = tl.program_id(0)
    n = pid0 // SPLIT
    k = pid0 % SPLIT
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mu, r, A, B0, g = _coef(n, c, cmask, mean_ptr, rstd_ptr, w_ptr, b_ptr, s_ptr, t_ptr, G, CPG, w_st, b_st,
                            s_sn, s_sc, t_sn, t_sc, HAS_W, HAS_B, HAS_S, HAS_T)
    base = n.to(tl.int64) * C * S
    s_lo = k * CHUNK
    s_hi = tl.minimum(S, s_lo + CHUNK)
    # Elementwise accumulators reduced once at the end: a fixed order, and pairwise-like accuracy.
    acc1 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = cmask[:, None] & (s < s_hi)[None, :]
        offs = base + _tile_offsets(c, s, C, S, CHANNELS_LAST)
        xv = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        gz = tl.load(gy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, xv - mu[:, None], 0.0)  # masked lanes: zero, and no overflow in the exp below
        if SILU:
            gz = gz * _silu_grad(A[:, None] * d + B0[:, None])
        acc1 += gz
        acc2 += gz * d
    out = (n * SPLIT + k).to(tl.int64) * C + c
    tl.store(ps1_ptr + out, tl.sum(acc1, axis=1), mask=cmask)
    tl.store(ps2_ptr + out, tl.sum(acc2, axis=1), mask=cmask)


@triton.jit
def _gn_bwd_merge_kernel(ps1_ptr, ps2_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, s_ptr, t_ptr, gw_ptr, gb_ptr,
                         gs_ptr, gt_ptr, qr_ptr, C, S, G, CPG, SPLIT, w_st, b_st, s_sn, s_sc, t_sn, t_sc,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_CF: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    r = tl.load(rstd_ptr + pid)
    k = tl.arange(0, BLOCK_K)
    kmask = k < SPLIT
    row = (n * SPLIT + k).to(tl.int64) * C
    j = tl.arange(0, BLOCK_CF)
    m1 = tl.zeros([BLOCK_CF], tl.float32)
    m2 = tl.zeros([BLOCK_CF], tl.float32)
    for c0 in range(0, CPG, BLOCK_CF):
        c = g * CPG + c0 + j
        cmask = c0 + j < CPG
        m = kmask[:, None] & cmask[None, :]
        s1 = tl.sum(tl.load(ps1_ptr + row[:, None] + c[None, :], mask=m, other=0.0), axis=0)
        s2 = tl.sum(tl.load(ps2_ptr + row[:, None] + c[None, :], mask=m, other=0.0), axis=0)
        mu, rr, A, B0, gc = _coef(n, c, cmask, mean_ptr, rstd_ptr, w_ptr, b_ptr, s_ptr, t_ptr, G, CPG, w_st,
                                  b_st, s_sn, s_sc, t_sn, t_sc, HAS_W, HAS_B, HAS_S, HAS_T)
        m1 += gc * s1
        m2 += gc * s2
        xs = s2 * r  # sum gz xhat
        nc = n.to(tl.int64) * C + c
        kk = tl.full([BLOCK_CF], 1.0, tl.float32)
        if HAS_S:
            kk += tl.load(s_ptr + n * s_sn + c * s_sc, mask=cmask, other=0.0).to(tl.float32)
        if HAS_W:  # per-(n, c) term of grad_weight; summed over n afterwards in a fixed order
            tl.store(gw_ptr + nc, kk * xs, mask=cmask)
        if HAS_B:
            tl.store(gb_ptr + nc, kk * s1, mask=cmask)
        if HAS_S:  # dL/ds = sum gz h, h = xhat w + b
            h = xs
            if HAS_W:
                h = xs * tl.load(w_ptr + c * w_st, mask=cmask, other=0.0).to(tl.float32)
            if HAS_B:
                h += s1 * tl.load(b_ptr + c * b_st, mask=cmask, other=0.0).to(tl.float32)
            tl.store(gs_ptr + nc, h.to(gs_ptr.dtype.element_ty), mask=cmask)
        if HAS_T:
            tl.store(gt_ptr + nc, s1.to(gt_ptr.dtype.element_ty), mask=cmask)
    M = (CPG * 1.0) * S  # float before the product: a group may exceed 2^31 elements
    tl.store(qr_ptr + 2 * pid, -r * r * r * (tl.sum(m2, axis=0) / M))
    tl.store(qr_ptr + 2 * pid + 1, -r * (tl.sum(m1, axis=0) / M))


@triton.jit
def _gn_bwd_apply_kernel(gy_ptr, x_ptr, gx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, s_ptr, t_ptr, qr_ptr, C, S,
                         G, CPG, NSB, w_st, b_st, s_sn, s_sc, t_sn, t_sc, HAS_W: tl.constexpr,
                         HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr, SILU: tl.constexpr,
                         CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid0 = tl.program_id(0)
    n = pid0 // NSB
    s = (pid0 % NSB) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mu, r, A, B0, g = _coef(n, c, cmask, mean_ptr, rstd_ptr, w_ptr, b_ptr, s_ptr, t_ptr, G, CPG, w_st, b_st,
                            s_sn, s_sc, t_sn, t_sc, HAS_W, HAS_B, HAS_S, HAS_T)
    grp = n * G + c // CPG
    Q = tl.load(qr_ptr + 2 * grp, mask=cmask, other=0.0)
    R = tl.load(qr_ptr + 2 * grp + 1, mask=cmask, other=0.0)
    m = cmask[:, None] & (s < S)[None, :]
    offs = n.to(tl.int64) * C * S + _tile_offsets(c, s, C, S, CHANNELS_LAST)
    xv = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    gz = tl.load(gy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.where(m, xv - mu[:, None], 0.0)
    if SILU:
        gz = gz * _silu_grad(A[:, None] * d + B0[:, None])
    gx = (r * g)[:, None] * gz + Q[:, None] * d + R[:, None]
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------
def _np2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _PROGRAMS_PER_SM * _sm_count(index)
    return _INTERPRET_PROGRAMS


def _layout(t: torch.Tensor) -> Optional[bool]:
    """False: NCHW-contiguous; True: channels-last (C innermost, then the spatial dims in order, then N);
    None: neither. Strides of size-1 dims are ignored, as check.h's nc_layout does."""
    if t.is_contiguous():
        return False
    if t.dim() < 3:
        return None
    expect = t.shape[1]
    if t.shape[1] != 1 and t.stride(1) != 1:
        return None
    for i in range(t.dim() - 1, 1, -1):
        if t.shape[i] != 1 and t.stride(i) != expect:
            return None
        expect *= t.shape[i]
    if t.shape[0] != 1 and t.stride(0) != expect:
        return None
    return True


def _tiling(N: int, C: int, S: int, channels_last: bool, device: torch.device):
    """(BLOCK_C, BLOCK_S, SPLIT, CHUNK): tile shape and the split of S for the reduction passes."""
    if channels_last:  # a tile row is BLOCK_C contiguous channels
        block_c = min(_np2(C), _CL_BLOCK_C)
        block_s = max(1, min(_np2(S), _TILE // block_c))
    else:  # a tile row is BLOCK_S contiguous positions of one channel
        # rows whose length is not a multiple of 16 load without vectors: half the tile keeps those kernels
        # free of register spills (ptxas, Triton 3.6, sm80/86/90: 288-704 B of spills at 7x9 with the full tile)
        tile = _TILE if S % 16 == 0 else _TILE // 2
        block_s = min(_np2(S), _MAX_BLOCK_S, tile)
        block_c = max(1, min(_np2(C), tile // block_s))
    nsb = _cdiv(S, block_s)
    want = _cdiv(_target_programs(device), N * _cdiv(C, block_c))  # splits wanted per (n, channel block)
    tiles = max(1, nsb // want)  # tiles per split: at least `want` splits where S allows
    chunk = tiles * block_s
    return block_c, block_s, _cdiv(S, chunk), chunk


def _merge_blocks(split: int, cpg: int):
    block_k = _np2(split)
    return block_k, max(1, min(_np2(cpg), _TILE // block_k))


def _check(x: torch.Tensor, G: int, weight, bias, scale, shift, activation: str) -> bool:
    """Validates like the C++ TORCH_CHECKs (so a bad direct call never reads out of bounds); returns the
    layout (True for channels-last)."""
    if x.dim() < 2:
        raise ValueError(f"x: expected (N, C, *spatial), got {x.dim()} dims")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x: expected float32, float16 or bfloat16, got {x.dtype}")
    N, C = x.shape[0], x.shape[1]
    if G <= 0 or C % G != 0:
        raise ValueError(f"num_groups: {G} must divide the {C} channels")
    if activation not in ("none", "", "silu"):
        raise ValueError(f"activation: expected 'none' or 'silu', got {activation!r}")
    for p, name, shape in ((weight, "weight", (C,)), (bias, "bias", (C,)), (scale, "scale", (N, C)),
                           (shift, "shift", (N, C))):
        if p is None:
            continue
        if tuple(p.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name}: expected device {x.device}, got {p.device}")
        if not p.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {p.dtype}")
    cl = _layout(x)
    if cl is None:
        raise ValueError(f"x: must be contiguous or channels-last (C innermost); got strides {x.stride()}")
    return cl


def _param_args(x, weight, bias, scale, shift):
    """Pointers (x stands in for an absent parameter: its HAS_* flag keeps it unread), strides and flags."""
    ptrs = tuple(x if p is None else p for p in (weight, bias, scale, shift))
    strides = (0 if weight is None else weight.stride(0), 0 if bias is None else bias.stride(0),
               0 if scale is None else scale.stride(0), 0 if scale is None else scale.stride(1),
               0 if shift is None else shift.stride(0), 0 if shift is None else shift.stride(1))
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_S=scale is not None,
                 HAS_T=shift is not None)
    return ptrs, strides, flags


# Schemas spelled out (inference would make num_groups a SymInt) to match the C++ ops in csrc/ops.cpp.
@triton_op("fastdiff::group_norm_triton", mutates_args={}, schema=(
    "(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, float eps, "
    "str activation) -> (Tensor, Tensor, Tensor)"))
def group_norm_triton(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                      shift: Optional[torch.Tensor], eps: float, activation: str,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    G = num_groups
    cl = _check(x, G, weight, bias, scale, shift, activation)
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    y = _empty_like(x)
    mean = _empty((N, G), x, torch.float32)
    rstd = _empty((N, G), x, torch.float32)
    if N == 0:
        return y, mean, rstd
    if x.numel() == 0:  # empty groups: zero mean, the rstd of a zero variance (as the C++ op)
        mean.fill_(0.0)
        rstd.fill_(1.0 / math.sqrt(eps) if eps > 0 else math.inf)
        return y, mean, rstd
    cpg = C // G
    block_c, block_s, split, chunk = _tiling(N, C, S, cl, x.device)
    ncb = _cdiv(C, block_c)
    pmean = _empty((N, split, C), x, torch.float32)
    pm2 = _empty((N, split, C), x, torch.float32)
    wrap_triton(_gn_stats_kernel)[(N * split, ncb)](
        x, pmean, pm2, C, S, cpg, chunk, split, CHANNELS_LAST=cl, BLOCK_C=block_c, BLOCK_S=block_s,
        num_warps=_NUM_WARPS)
    block_k, block_cf = _merge_blocks(split, cpg)
    ctr = _empty((N, G, 2), x, torch.float32)
    wrap_triton(_gn_fwd_merge_kernel)[(N * G,)](
        x, pmean, pm2, mean, rstd, ctr, C, S, G, cpg, chunk, split, eps, CHANNELS_LAST=cl, BLOCK_K=block_k,
        BLOCK_CF=block_cf, num_warps=_NUM_WARPS)
    ptrs, strides, flags = _param_args(x, weight, bias, scale, shift)
    nsb = _cdiv(S, block_s)
    wrap_triton(_gn_apply_kernel)[(N * nsb, ncb)](
        x, y, mean, rstd, ctr, *ptrs, C, S, G, cpg, nsb, *strides, **flags, SILU=activation == "silu",
        CHANNELS_LAST=cl, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_NUM_WARPS)
    return y, mean, rstd


@group_norm_triton.register_fake
def _group_norm_triton_fake(x, num_groups, weight, bias, scale, shift, eps, activation):
    # triton_op would use the body itself as the fake kernel, but under TRITON_INTERPRET=1 wrap_triton hands
    # back the raw interpreted kernel, which cannot run on fake tensors. The outputs depend only on shapes.
    _check(x, num_groups, weight, bias, scale, shift, activation)
    N = x.shape[0]
    return (torch.empty_like(x), x.new_empty((N, num_groups), dtype=torch.float32),
            x.new_empty((N, num_groups), dtype=torch.float32))


@triton_op("fastdiff::group_norm_backward_triton", mutates_args={}, schema=(
    "(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, int num_groups, Tensor? weight, Tensor? bias, "
    "Tensor? scale, Tensor? shift, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"))
def group_norm_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                               num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                               scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], activation: str,
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    G = num_groups
    cl = _check(x, G, weight, bias, scale, shift, activation)
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    if tuple(grad_y.shape) != tuple(x.shape):
        raise ValueError(f"grad_y: expected shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    if grad_y.dtype != x.dtype:
        raise TypeError(f"grad_y: expected dtype {x.dtype}, got {grad_y.dtype}")
    if mean.numel() != N * G or rstd.numel() != N * G:
        raise ValueError(f"mean/rstd: expected {N * G} values")
    # The fused passes index grad_y with x's offsets: copy it only when its layout differs.
    if _layout(grad_y) != cl:
        grad_y = torch.empty_like(x).copy_(grad_y)
    mean = mean.to(torch.float32).contiguous()
    rstd = rstd.to(torch.float32).contiguous()
    grad_x = _empty_like(x)

    def empty():  # a distinct (0,) tensor per absent parameter: custom-op outputs must not alias each other
        return x.new_empty((0,))

    if x.numel() == 0:  # S1 = S2 = 0: every parameter gradient is zero (as the C++ op)
        return (grad_x,) + tuple(empty() if p is None else torch.zeros(p.shape, dtype=p.dtype,
                                                                       device=p.device)
                                 for p in (weight, bias, scale, shift))

    cpg = C // G
    block_c, block_s, split, chunk = _tiling(N, C, S, cl, x.device)
    ncb = _cdiv(C, block_c)
    ptrs, strides, flags = _param_args(x, weight, bias, scale, shift)
    silu = activation == "silu"
    ps1 = _empty((N, split, C), x, torch.float32)
    ps2 = _empty((N, split, C), x, torch.float32)
    wrap_triton(_gn_bwd_sums_kernel)[(N * split, ncb)](
        grad_y, x, mean, rstd, *ptrs, ps1, ps2, C, S, G, cpg, chunk, split, *strides, **flags, SILU=silu,
        CHANNELS_LAST=cl, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_NUM_WARPS)

    gw = _empty((N, C), x, torch.float32) if weight is not None else None
    gb = _empty((N, C), x, torch.float32) if bias is not None else None
    gs = _empty((N, C), x, scale.dtype) if scale is not None else empty()
    gt = _empty((N, C), x, shift.dtype) if shift is not None else empty()
    qr = _empty((N, G, 2), x, torch.float32)
    block_k, block_cf = _merge_blocks(split, cpg)
    wrap_triton(_gn_bwd_merge_kernel)[(N * G,)](
        ps1, ps2, mean, rstd, *ptrs, x if weight is None else gw, x if bias is None else gb,
        x if scale is None else gs, x if shift is None else gt, qr, C, S, G, cpg, split, *strides, **flags,
        BLOCK_K=block_k, BLOCK_CF=block_cf, num_warps=_NUM_WARPS)

    nsb = _cdiv(S, block_s)
    wrap_triton(_gn_bwd_apply_kernel)[(N * nsb, ncb)](
        grad_y, x, grad_x, mean, rstd, *ptrs, qr, C, S, G, cpg, nsb, *strides, **flags, SILU=silu,
        CHANNELS_LAST=cl, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_NUM_WARPS)

    # grad_weight, grad_bias: a fixed-order sum over N of the per-(n, c) terms (deterministic, no atomics).
    grad_w = gw.sum(0).to(weight.dtype) if weight is not None else empty()
    grad_b = gb.sum(0).to(bias.dtype) if bias is not None else empty()
    return grad_x, grad_w, grad_b, gs, gt


@group_norm_backward_triton.register_fake
def _group_norm_backward_triton_fake(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift,
                                     activation):
    _check(x, num_groups, weight, bias, scale, shift, activation)
    N, C = x.shape[0], x.shape[1]

    def g(p, shape):
        return x.new_empty((0,)) if p is None else p.new_empty(shape)

    return (torch.empty_like(x), g(weight, (C,)), g(bias, (C,)), g(scale, (N, C)), g(shift, (N, C)))
