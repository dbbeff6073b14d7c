"""Flash attention in Triton: forward and backward, for every head dim that is a multiple of 8 up to 256.

Algorithm (forward). One program owns BM query rows of one (batch, head) and streams the keys in tiles of
BN: s = q kᵀ · scale · log2(e), a running row max m and row sum l (exp2 of s - m), and an fp32 accumulator
rescaled by exp2(m_old - m_new) whenever the max grows. The Sq × Skv matrix is never stored; the program
writes its output rows and their log-sum-exp (natural log, fp32, (B, H, Sq)) for the backward.

Head dims are not padded to a power of two. tl.arange and tl.dot want power-of-two extents, so the head dim
is split into a power-of-two block DA and a power-of-two tail DB (at least 16, the smallest dot depth):
40 = 32 + 16 (8 of them masked), 80 = 64 + 16, 160 = 128 + 32, 96 = 64 + 32, 192 = 128 + 64. Each product
over the head dim is two dots, q_a·k_aᵀ + q_b·k_bᵀ, and the output is two accumulators, p·v_a and p·v_b.
Padding 40 → 64 would do 60% more work on the q kᵀ product and 60% more on p v; the split does 20% and 0%.

Backward (FlashAttention-2's): delta = rowsum(dO ∘ O) first; then one kernel per key tile that walks the
query tiles, recomputes p = exp2(s - lse) and accumulates dV += pᵀ dO and dK += dSᵀ q with
dS = p ∘ (dO vᵀ - delta); and one kernel per query tile that walks the key tiles for dQ += dS k. Two kernels
instead of atomics keep the gradients deterministic.

Cost model. Forward: reads q once, k and v once per query tile (from L2 after the first), writes o and lse:
4·B·H·Sq·Skv·D FLOPs. Cross-attention to 77 keys is memory-bound (≈ 77 FLOPs per byte of q and o), so its key
tiles are small (32): the padded keys cost exps and dot work that would otherwise dominate. Backward: 2.5× the
forward FLOPs (q kᵀ is recomputed in both kernels), reads q, k, v, o, dO.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastdiff import _backend

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)  # the kernels' copies: a @triton.jit function may only read constexpr globals
_LN2 = tl.constexpr(LN2)


def split_head_dim(d: int) -> tuple[int, int]:
    """(DA, DB): DA the largest power of two ≤ d (at least 16), DB a power of two ≥ 16 covering the rest (0: none)."""
    da = max(16, 1 << (d.bit_length() - 1))
    rest = d - da
    db = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    return da, db


@triton.jit
def _ld(ptrs, rows, nrows, cols, D, MASK_R: tl.constexpr, MASK_D: tl.constexpr):
    """Load a tile; rows past nrows and columns past the head dim D read as 0 where the masks are on."""
    if MASK_R:
        if MASK_D:
            x = tl.load(ptrs, mask=(rows < nrows) & (cols < D), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows < nrows, other=0.0)
    else:
        if MASK_D:
            x = tl.load(ptrs, mask=cols < D, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _st(ptrs, x, rows, nrows, cols, D, MASK_D: tl.constexpr):
    if MASK_D:
        tl.store(ptrs, x, mask=(rows < nrows) & (cols < D))
    else:
        tl.store(ptrs, x, mask=rows < nrows)


@triton.jit
def _fwd_tile(acc_a, acc_b, l_i, m_i, qa, qb, k_base, v_base, sk_n, sv_n, start_n, SKV, qk_scale,
              D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BN: tl.constexpr,
              HAS_B: tl.constexpr, MASK_A: tl.constexpr, MASK_N: tl.constexpr):
    """One key tile of the online softmax: returns the updated (acc_a, acc_b, l, m)."""
    offs_n = start_n + tl.arange(0, BN)
    offs_a = tl.arange(0, DA)
    ka = _ld(k_base + offs_n[:, None] * sk_n + offs_a[None, :], offs_n[:, None], SKV, offs_a[None, :], D,
             MASK_N, MASK_A)
    s = tl.dot(qa, tl.trans(ka))
    if HAS_B:
        offs_b = DA + tl.arange(0, DB)
        kb = _ld(k_base + offs_n[:, None] * sk_n + offs_b[None, :], offs_n[:, None], SKV, offs_b[None, :], D,
                 MASK_N, True)
        s += tl.dot(qb, tl.trans(kb))
    s = s * qk_scale
    if MASK_N:
        s = tl.where(offs_n[None, :] < SKV, s, float("-inf"))
    # Every tile holds at least one real key, so m_new is finite and exp2(-inf - m_new) = 0 on the first tile.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(qa.dtype)
    va = _ld(v_base + offs_n[:, None] * sv_n + offs_a[None, :], offs_n[:, None], SKV, offs_a[None, :], D,
             MASK_N, MASK_A)
    acc_a = acc_a * alpha[:, None] + tl.dot(p, va)
    if HAS_B:
        offs_b = DA + tl.arange(0, DB)
        vb = _ld(v_base + offs_n[:, None] * sv_n + offs_b[None, :], offs_n[:, None], SKV, offs_b[None, :], D,
                 MASK_N, True)
        acc_b = acc_b * alpha[:, None] + tl.dot(p, vb)
    return acc_a, acc_b, l_i, m_new


@triton.jit
def _tile_and_bh(S, BLOCK: tl.constexpr, GRID_1D: tl.constexpr):
    """(tile, b·h) of this program. The grid is (tiles, B·H), or, when B·H exceeds CUDA's gridDim.y limit of 65535
    (video models' temporal attention: batch = frames' pixels, e.g. 2·64·64 sequences × 8 heads), 1-D with the
    tiles of each (batch, head) in a row, the same order. Only then: the division costs the D = 160 forward a
    spill on sm80/86."""
    if GRID_1D:
        pid = tl.program_id(0)
        nt = tl.cdiv(S, BLOCK)
        return pid % nt, pid // nt
    else:
        return tl.program_id(0), tl.program_id(1)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m,
              H, SQ, SKV, qk_scale,
              D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              GRID_1D: tl.constexpr):
    HAS_B: tl.constexpr = DB > 0
    MASK_A: tl.constexpr = DA > D
    DBB: tl.constexpr = DB if DB > 0 else 16  # a shape for the unused tail accumulator when there is no tail
    pid_m, bh = _tile_and_bh(SQ, BM, GRID_1D)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    o_base = O + b * so_b + h * so_h

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_a = tl.arange(0, DA)
    qa = _ld(q_base + offs_m[:, None] * sq_m + offs_a[None, :], offs_m[:, None], SQ, offs_a[None, :], D,
             True, MASK_A)
    acc_a = tl.zeros([BM, DA], dtype=tl.float32)
    acc_b = tl.zeros([BM, DBB], dtype=tl.float32)
    qb = qa
    if HAS_B:
        offs_b = DA + tl.arange(0, DB)
        qb = _ld(q_base + offs_m[:, None] * sq_m + offs_b[None, :], offs_m[:, None], SQ, offs_b[None, :], D,
                 True, True)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)

    # Full key tiles without masks, then the ragged last one with them.
    n_full = (SKV // BN) * BN
    for start_n in range(0, n_full, BN):
        acc_a, acc_b, l_i, m_i = _fwd_tile(acc_a, acc_b, l_i, m_i, qa, qb, k_base, v_base, sk_n, sv_n, start_n,
                                           SKV, qk_scale, D, DA, DB, BN, HAS_B, MASK_A, False)
    if n_full < SKV:
        acc_a, acc_b, l_i, m_i = _fwd_tile(acc_a, acc_b, l_i, m_i, qa, qb, k_base, v_base, sk_n, sv_n, n_full,
                                           SKV, qk_scale, D, DA, DB, BN, HAS_B, MASK_A, True)

    inv_l = 1.0 / l_i
    _st(o_base + offs_m[:, None] * so_m + offs_a[None, :], (acc_a * inv_l[:, None]).to(O.dtype.element_ty),
        offs_m[:, None], SQ, offs_a[None, :], D, MASK_A)
    if HAS_B:
        offs_b = DA + tl.arange(0, DB)
        _st(o_base + offs_m[:, None] * so_m + offs_b[None, :], (acc_b * inv_l[:, None]).to(O.dtype.element_ty),
            offs_m[:, None], SQ, offs_b[None, :], D, True)
    lse = (m_i + tl.log2(l_i)) * _LN2
    tl.store(LSE + bh.to(tl.int64) * SQ + offs_m, lse, mask=offs_m < SQ)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, so_b, so_h, so_m, sd_b, sd_h, sd_m, H, SQ,
                    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BM: tl.constexpr,
                    GRID_1D: tl.constexpr):
    """delta = rowsum(dO ∘ O) in fp32, (B, H, Sq) contiguous."""
    HAS_B: tl.constexpr = DB > 0
    MASK_A: tl.constexpr = DA > D
    pid_m, bh = _tile_and_bh(SQ, BM, GRID_1D)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_a = tl.arange(0, DA)
    o = _ld(O + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_a[None, :], offs_m[:, None], SQ,
            offs_a[None, :], D, True, MASK_A)
    do = _ld(DO + b * sd_b + h * sd_h + offs_m[:, None] * sd_m + offs_a[None, :], offs_m[:, None], SQ,
             offs_a[None, :], D, True, MASK_A)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_B:
        offs_b = DA + tl.arange(0, DB)
        o = _ld(O + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_b[None, :], offs_m[:, None], SQ,
                offs_b[None, :], D, True, True)
        do = _ld(DO + b * sd_b + h * sd_h + offs_m[:, None] * sd_m + offs_b[None, :], offs_m[:, None], SQ,
                 offs_b[None, :], D, True, True)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * SQ + offs_m, delta, mask=offs_m < SQ)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sd_b, sd_h, sd_m,
                   sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
                   H, SQ, SKV, sm_scale, qk_scale,
                   D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   GRID_1D: tl.constexpr):
    """One key tile: dV = Σ pᵀ dO and dK = scale · Σ dSᵀ q over every query tile (the transposed products)."""
    HAS_B: tl.constexpr = DB > 0
    MASK_A: tl.constexpr = DA > D
    DBB: tl.constexpr = DB if DB > 0 else 16
    pid_n, bh = _tile_and_bh(SKV, BN, GRID_1D)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sd_b + h * sd_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    lse_base = LSE + bh.to(tl.int64) * SQ
    delta_base = DELTA + bh.to(tl.int64) * SQ

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DBB)
    ka = _ld(k_base + offs_n[:, None] * sk_n + offs_a[None, :], offs_n[:, None], SKV, offs_a[None, :], D,
             True, MASK_A)
    va = _ld(v_base + offs_n[:, None] * sv_n + offs_a[None, :], offs_n[:, None], SKV, offs_a[None, :], D,
             True, MASK_A)
    kb = ka
    vb = va
    if HAS_B:
        kb = _ld(k_base + offs_n[:, None] * sk_n + offs_b[None, :], offs_n[:, None], SKV, offs_b[None, :], D,
                 True, True)
        vb = _ld(v_base + offs_n[:, None] * sv_n + offs_b[None, :], offs_n[:, None], SKV, offs_b[None, :], D,
                 True, True)
    dk_a = tl.zeros([BN, DA], dtype=tl.float32)
    dv_a = tl.zeros([BN, DA], dtype=tl.float32)
    dk_b = tl.zeros([BN, DBB], dtype=tl.float32)
    dv_b = tl.zeros([BN, DBB], dtype=tl.float32)

    for start_m in range(0, SQ, BM):
        offs_m = start_m + tl.arange(0, BM)
        qa = _ld(q_base + offs_m[:, None] * sq_m + offs_a[None, :], offs_m[:, None], SQ, offs_a[None, :], D,
                 True, MASK_A)
        doa = _ld(do_base + offs_m[:, None] * sd_m + offs_a[None, :], offs_m[:, None], SQ, offs_a[None, :], D,
                  True, MASK_A)
        # Rows past SQ: lse = +inf makes their p exactly 0, so they add nothing.
        lse2 = tl.load(lse_base + offs_m, mask=offs_m < SQ, other=float("inf")) * _LOG2E
        delta = tl.load(delta_base + offs_m, mask=offs_m < SQ, other=0.0)
        s_t = tl.dot(ka, tl.trans(qa))
        if HAS_B:
            qb = _ld(q_base + offs_m[:, None] * sq_m + offs_b[None, :], offs_m[:, None], SQ, offs_b[None, :], D,
                     True, True)
            s_t += tl.dot(kb, tl.trans(qb))
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        dv_a += tl.dot(p_t.to(doa.dtype), doa)
        dp_t = tl.dot(va, tl.trans(doa))
        if HAS_B:
            dob = _ld(do_base + offs_m[:, None] * sd_m + offs_b[None, :], offs_m[:, None], SQ, offs_b[None, :], D,
                      True, True)
            dv_b += tl.dot(p_t.to(dob.dtype), dob)
            dp_t += tl.dot(vb, tl.trans(dob))
        ds_t = (p_t * (dp_t - delta[None, :])).to(qa.dtype)
        dk_a += tl.dot(ds_t, qa)
        if HAS_B:
            dk_b += tl.dot(ds_t, qb)

    dk_base = DK + b * sdk_b + h * sdk_h
    dv_base = DV + b * sdv_b + h * sdv_h
    _st(dk_base + offs_n[:, None] * sdk_n + offs_a[None, :], (dk_a * sm_scale).to(DK.dtype.element_ty),
        offs_n[:, None], SKV, offs_a[None, :], D, MASK_A)
    _st(dv_base + offs_n[:, None] * sdv_n + offs_a[None, :], dv_a.to(DV.dtype.element_ty),
        offs_n[:, None], SKV, offs_a[None, :], D, MASK_A)
    if HAS_B:
        _st(dk_base + offs_n[:, None] * sdk_n + offs_b[None, :], (dk_b * sm_scale).to(DK.dtype.element_ty),
            offs_n[:, None], SKV, offs_b[None, :], D, True)
        _st(dv_base + offs_n[:, None] * sdv_n + offs_b[None, :], dv_b.to(DV.dtype.element_ty),
            offs_n[:, None], SKV, offs_b[None, :], D, True)


@triton.jit
def _dq_tile(dq_a, dq_b, qa, qb, doa, dob, lse2, delta, k_base, v_base, sk_n, sv_n, start_n, SKV, qk_scale,
             D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BN: tl.constexpr,
             HAS_B: tl.constexpr, MASK_A: tl.constexpr, MASK_N: tl.constexpr):
    offs_n = start_n + tl.arange(0, BN)
    offs_a = tl.arange(0, DA)
    ka = _ld(k_base + offs_n[:, None] * sk_n + offs_a[None, :], offs_n[:, None], SKV, offs_a[None, :], D,
             MASK_N, MASK_A)
    va = _ld(v_base + offs_n[:, None] * sv_n + offs_a[None, :], offs_n[:, None], SKV, offs_a[None, :], D,
             MASK_N, MASK_A)
    s = tl.dot(qa, tl.trans(ka))
    dp = tl.dot(doa, tl.trans(va))
    kb = ka
    if HAS_B:
        offs_b = DA + tl.arange(0, DB)
        kb = _ld(k_base + offs_n[:, None] * sk_n + offs_b[None, :], offs_n[:, None], SKV, offs_b[None, :], D,
                 MASK_N, True)
        vb = _ld(v_base + offs_n[:, None] * sv_n + offs_b[None, :], offs_n[:, None], SKV, offs_b[None, :], D,
                 MASK_N, True)
        s += tl.dot(qb, tl.trans(kb))
        dp += tl.dot(dob, tl.trans(vb))
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASK_N:
        p = tl.where(offs_n[None, :] < SKV, p, 0.0)
    ds = (p * (dp - delta[:, None])).to(qa.dtype)
    dq_a += tl.dot(ds, ka)
    if HAS_B:
        dq_b += tl.dot(ds, kb)
    return dq_a, dq_b


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sd_b, sd_h, sd_m, sdq_b, sdq_h, sdq_m,
                 H, SQ, SKV, sm_scale, qk_scale,
                 D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 GRID_1D: tl.constexpr):
    """One query tile: dQ = scale · Σ dS k over every key tile."""
    HAS_B: tl.constexpr = DB > 0
    MASK_A: tl.constexpr = DA > D
    DBB: tl.constexpr = DB if DB > 0 else 16
    pid_m, bh = _tile_and_bh(SQ, BM, GRID_1D)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sd_b + h * sd_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DBB)
    qa = _ld(q_base + offs_m[:, None] * sq_m + offs_a[None, :], offs_m[:, None], SQ, offs_a[None, :], D,
             True, MASK_A)
    doa = _ld(do_base + offs_m[:, None] * sd_m + offs_a[None, :], offs_m[:, None], SQ, offs_a[None, :], D,
              True, MASK_A)
    qb = qa
    dob = doa
    if HAS_B:
        qb = _ld(q_base + offs_m[:, None] * sq_m + offs_b[None, :], offs_m[:, None], SQ, offs_b[None, :], D,
                 True, True)
        dob = _ld(do_base + offs_m[:, None] * sd_m + offs_b[None, :], offs_m[:, None], SQ, offs_b[None, :], D,
                  True, True)
    lse2 = tl.load(LSE + bh.to(tl.int64) * SQ + offs_m, mask=offs_m < SQ, other=0.0) * _LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * SQ + offs_m, mask=offs_m < SQ, other=0.0)
    dq_a = tl.zeros([BM, DA], dtype=tl.float32)
    dq_b = tl.zeros([BM, DBB], dtype=tl.float32)

    n_full = (SKV // BN) * BN
    for start_n in range(0, n_full, BN):
        dq_a, dq_b = _dq_tile(dq_a, dq_b, qa, qb, doa, dob, lse2, delta, k_base, v_base, sk_n, sv_n, start_n, SKV,
                              qk_scale, D, DA, DB, BN, HAS_B, MASK_A, False)
    if n_full < SKV:
        dq_a, dq_b = _dq_tile(dq_a, dq_b, qa, qb, doa, dob, lse2, delta, k_base, v_base, sk_n, sv_n, n_full, SKV,
                              qk_scale, D, DA, DB, BN, HAS_B, MASK_A, True)

    dq_base = DQ + b * sdq_b + h * sdq_h
    _st(dq_base + offs_m[:, None] * sdq_m + offs_a[None, :], (dq_a * sm_scale).to(DQ.dtype.element_ty),
        offs_m[:, None], SQ, offs_a[None, :], D, MASK_A)
    if HAS_B:
        _st(dq_base + offs_m[:, None] * sdq_m + offs_b[None, :], (dq_b * sm_scale).to(DQ.dtype.element_ty),
            offs_m[:, None], SQ, offs_b[None, :], D, True)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration. Hand-picked per head-dim size (no autotuning: it would run every config on the first call,
# and under the interpreter that is minutes); the interpreter gets small tiles, which it runs fastest.

@functools.lru_cache(None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fill_grid(bm: int, sq: int, bh: int, index: int) -> int:
    """Halve the query tile (down to 32) while the grid would not cover the SMs once."""
    sms = _num_sms(index)
    while bm > 32 and triton.cdiv(sq, bm) * bh < sms:
        bm //= 2
    return bm


@functools.lru_cache(None)
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _fwd_config(d: int, sq: int, skv: int, bh: int, device: torch.device) -> dict:
    """Tiles of the forward (BM queries × BN keys). Hopper (wgmma) takes bigger tiles in registers than Ampere's
    mma.sync. Checked with ptxas (offline compiles for sm80 and sm90): no spills up to D = 160, except 12 bytes
    at 64 < D ≤ 128 on sm80, the fewest found; above 160 sm80 spills (the CUDA kernel is auto's forward there)."""
    if _backend.triton_interpret() or device.type != "cuda":
        return {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 1}
    index = device.index if device.index is not None else torch.cuda.current_device()
    hopper = _major(index) >= 9
    if d <= 64:
        bm, bn, warps, stages = 128, 64, 4 if hopper else 8, 3
    elif d <= 128:
        bm, bn, warps, stages = (128, 64, 8, 3) if hopper else (128, 32, 8, 2)
    elif d <= 160:
        bm, bn, warps, stages = 128, 32, 8, 2
    else:  # the q tile and accumulator of 256 columns fill the registers: narrow key tiles
        bm, bn, warps, stages = 64, 16, 8, 1
    if skv <= 128:  # cross-attention to a few keys: small key tiles waste the fewest padded keys
        bn = min(bn, 32 if skv > 16 else 16)
    small = _fill_grid(bm, sq, bh, index)
    if small < bm:  # a short sequence: more, smaller programs
        bm, warps = small, 4
    return {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages}


def _bwd_config(d: int, sq: int, skv: int, bh: int, device: torch.device) -> dict:
    """Tiles of the dK/dV kernel (BM1 queries × BN1 keys, w1 warps) and the dQ kernel (BM2 × BN2, w2 warps): checked
    free of register spills with ptxas for sm80 and sm90 up to D = 160; above, the dQ kernel spills 3.4-4.8 KB
    (Triton 3.6, scripts/triton_offline_check.py)."""
    if _backend.triton_interpret() or device.type != "cuda":
        return {"BM1": 32, "BN1": 32, "w1": 4, "BM2": 32, "BN2": 32, "w2": 4, "num_stages": 1, "BMD": 32}
    index = device.index if device.index is not None else torch.cuda.current_device()
    hopper = _major(index) >= 9
    if d <= 64:
        cfg = {"BM1": 32, "BN1": 128, "w1": 8, "BM2": 128, "BN2": 32, "w2": 8, "num_stages": 2}
    elif d <= 128:
        cfg = {"BM1": 32, "BN1": 64, "w1": 8, "BM2": 64 if hopper else 32, "BN2": 32, "w2": 4, "num_stages": 2}
    elif d <= 160:
        cfg = {"BM1": 16, "BN1": 64, "w1": 8, "BM2": 64, "BN2": 16, "w2": 8, "num_stages": 1} if hopper else \
            {"BM1": 32, "BN1": 16, "w1": 4, "BM2": 64, "BN2": 16, "w2": 8, "num_stages": 1}
    else:
        cfg = {"BM1": 16, "BN1": 32 if hopper else 16, "w1": 8 if hopper else 4, "BM2": 64, "BN2": 16, "w2": 8,
               "num_stages": 1}
    if skv <= 64:
        cfg["BN1"] = max(16, min(cfg["BN1"], triton.next_power_of_2(skv)))
    cfg["BMD"] = 64
    return cfg


def empty_bhsd(t: torch.Tensor, s: int, d: int, dtype=None) -> torch.Tensor:
    """An empty (B, H, s, d) tensor laid out like t: (B, S, H, D) memory when t's heads are inside its sequence
    (the layout of a projection's output viewed per head), else contiguous (B, H, S, D)."""
    b, h = t.shape[0], t.shape[1]
    dtype = dtype or t.dtype
    if t.stride(1) < t.stride(2):
        return torch.empty((b, s, h, d), dtype=dtype, device=t.device).transpose(1, 2)
    return torch.empty((b, h, s, d), dtype=dtype, device=t.device)


_MAX_GRID_Y = 65535  # CUDA's gridDim.y (and .z) limit


def _grid(s: int, block: int, bh: int):
    """(grid, GRID_1D) for cdiv(s, block) tiles of each of bh (batch, head) pairs: see _tile_and_bh."""
    tiles = triton.cdiv(s, block)
    return ((tiles * bh,), True) if bh > _MAX_GRID_Y else ((tiles, bh), False)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _define_op(name: str):
    """triton_op, so torch.compile sees through the launches; under TRITON_INTERPRET=1 a plain custom op instead:
    the interpreter needs real data pointers, which the compiler's functional tracing of a triton_op's body does not
    give it, and an opaque op (with the fake kernel fastdiff.ops.attention registers) traces fine."""
    if _backend.triton_interpret():
        return torch.library.custom_op(name, mutates_args=())
    return triton_op(name, mutates_args=())


@_define_op("fastdiff::attention_triton")
def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Flash-attention forward: (out (B, H, Sq, D), lse (B, H, Sq) fp32, natural log). Last dims contiguous."""
    # Plain ints: tile choices and constexprs need them (under dynamic-shape tracing this specialises the sizes).
    B, H, SQ, D = (int(x) for x in q.shape)
    SKV = int(k.shape[2])
    out = empty_bhsd(q, SQ, D)
    lse = torch.empty((B, H, SQ), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if SKV == 0:  # softmax over no keys: the output is empty sums
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    da, db = split_head_dim(D)
    cfg = _fwd_config(D, SQ, SKV, B * H, q.device)
    grid, grid_1d = _grid(SQ, cfg["BM"], B * H)
    wrap_triton(_attn_fwd)[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), H, SQ, SKV, scale * LOG2E,
        D=D, DA=da, DB=db, BM=cfg["BM"], BN=cfg["BN"], GRID_1D=grid_1d, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out, lse


@_define_op("fastdiff::attention_backward_triton")
def attention_backward_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, scale: float) -> tuple[torch.Tensor,
                                                                                           torch.Tensor,
                                                                                           torch.Tensor]:
    """Gradients (dq, dk, dv) of attention_triton, from its output and log-sum-exp."""
    B, H, SQ, D = (int(x) for x in q.shape)
    SKV = int(k.shape[2])
    dq = empty_bhsd(q, SQ, D)
    dk = empty_bhsd(k, SKV, D)
    dv = empty_bhsd(v, SKV, D)
    if B * H == 0 or D == 0:
        return dq, dk, dv
    if SQ == 0 or SKV == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if grad_out.stride(3) != 1:
        grad_out = grad_out.contiguous()
    da, db = split_head_dim(D)
    cfg = _bwd_config(D, SQ, SKV, B * H, q.device)
    common = {"D": D, "DA": da, "DB": db}
    delta = torch.empty((B, H, SQ), dtype=torch.float32, device=q.device)
    grid, grid_1d = _grid(SQ, cfg["BMD"], B * H)
    wrap_triton(_attn_bwd_delta)[grid](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), H, SQ, BM=cfg["BMD"], GRID_1D=grid_1d,
        num_warps=4, **common)
    qk_scale = scale * LOG2E
    grid, grid_1d = _grid(SKV, cfg["BN1"], B * H)
    wrap_triton(_attn_bwd_dkdv)[grid](
        q, k, v, grad_out, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        *_strides(dk), *_strides(dv), H, SQ, SKV, scale, qk_scale, BM=cfg["BM1"], BN=cfg["BN1"],
        GRID_1D=grid_1d, num_warps=cfg["w1"], num_stages=cfg["num_stages"], **common)
    grid, grid_1d = _grid(SQ, cfg["BM2"], B * H)
    wrap_triton(_attn_bwd_dq)[grid](
        q, k, v, grad_out, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        *_strides(dq), H, SQ, SKV, scale, qk_scale, BM=cfg["BM2"], BN=cfg["BN2"],
        GRID_1D=grid_1d, num_warps=cfg["w2"], num_stages=cfg["num_stages"], **common)
    return dq, dk, dv


__all__ = ["attention_triton", "attention_backward_triton", "split_head_dim", "empty_bhsd", "LOG2E", "LN2"]
