"""A lane-by-lane numpy model of one CTA of csrc/cuda/attention_kernel.cuh, for machines without a GPU.

The CUDA kernel cannot run here; what can go wrong in it without a compiler error is its index arithmetic: which
shared-memory rows each lane hands to ldmatrix, and how mma.sync fragments are packed. This model executes the
kernel's own address formulas against independent models of the PTX instructions (ldmatrix .x4 / .x4.trans and
mma.m16n8k16, written from the PTX ISA's fragment tables), with the same tiling, pad-column zeroing, zero-filled
rows, ragged-tile masks and skipped steps. If the formulas in the .cuh change, change them here too.
"""
from __future__ import annotations

import numpy as np

# --- PTX instruction models (independent of the kernel) -----------------------------------------------------------


def ldmatrix_x4(smem, addrs, trans=False):
    """addrs: 32 element addresses (lane 8i + j gives row j of matrix i). Returns r[4][32][2] (lo, hi halves).

    Plain: lane l receives row l // 4, columns 2 (l % 4), 2 (l % 4) + 1 of each matrix.
    .trans: lane l receives rows 2 (l % 4), 2 (l % 4) + 1 of column l // 4.
    """
    r = np.zeros((4, 32, 2), dtype=smem.dtype)
    for i in range(4):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            if trans:
                r[i, lane, 0] = smem[addrs[8 * i + 2 * t] + g]
                r[i, lane, 1] = smem[addrs[8 * i + 2 * t + 1] + g]
            else:
                r[i, lane, 0] = smem[addrs[8 * i + g] + 2 * t]
                r[i, lane, 1] = smem[addrs[8 * i + g] + 2 * t + 1]
    return r


def mma_16816(d, a, b0, b1):
    """d[32][4] += A·B with A (16×16) from a[4][32][2] and B (16×8) from b0, b1 ([32][2]), per the PTX tables:
    a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); b0 (k 2t.., n g), b1 (k 2t+8.., n g);
    c0, c1 (g, 2t..), c2, c3 (g+8, 2t..)."""
    A = np.zeros((16, 16), np.float32)
    B = np.zeros((16, 8), np.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(2):
            A[g, 2 * t + j] = a[0][lane][j]
            A[g + 8, 2 * t + j] = a[1][lane][j]
            A[g, 2 * t + 8 + j] = a[2][lane][j]
            A[g + 8, 2 * t + 8 + j] = a[3][lane][j]
            B[2 * t + j, g] = b0[lane][j]
            B[2 * t + 8 + j, g] = b1[lane][j]
    C = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        d[lane][0] += C[g, 2 * t]
        d[lane][1] += C[g, 2 * t + 1]
        d[lane][2] += C[g + 8, 2 * t]
        d[lane][3] += C[g + 8, 2 * t + 1]


def quad_reduce(x, fn):
    """__shfl_xor_sync over masks 1 and 2: x[32] → every lane holds fn over its quad."""
    for mask in (1, 2):
        x = fn(x, x[np.arange(32) ^ mask])
    return x


# --- The kernel, one CTA --------------------------------------------------------------------------------------------


def run_cta(q, k, v, scale, *, dmax, warps, block_n, m_block=0, elem=np.float16):
    """Output rows [m_block·kBlockM, ...) and their lse for q (Sq, D), k, v (Skv, D), as the kernel computes them."""
    sq, d = q.shape
    skv = k.shape[0]
    block_m = 16 * warps
    stride = dmax + 8
    chunks_per_row = dmax // 8
    rows = block_m + 4 * block_n
    smem = np.full(rows * stride, np.nan, dtype=elem)  # stale shared memory: NaN wherever the kernel must not read
    sQ, sK, sV = 0, block_m * stride, block_m * stride + 2 * block_n * stride
    m0 = m_block * block_m

    # pad columns [D, dmax) zeroed once
    for r in range(rows):
        for c in range(0, dmax, 8):
            if c >= d:
                smem[r * stride + c: r * stride + c + 8] = 0

    def load_tile(base, src, row0, nrows_tile, nrows):
        for i in range(nrows_tile * chunks_per_row):
            r, c = i // chunks_per_row, (i % chunks_per_row) * 8
            if c < d:
                gr = row0 + r
                smem[base + r * stride + c: base + r * stride + c + 8] = src[gr, c:c + 8] if gr < nrows else 0

    load_tile(sQ, q, m0, block_m, sq)
    load_tile(sK, k, 0, block_n, skv)
    load_tile(sV, v, 0, block_n, skv)

    lanes = np.arange(32)
    g, col0 = lanes >> 2, (lanes & 3) * 2
    scale_log2 = np.float32(scale * 1.4426950408889634)
    n_tiles_o, n_tiles_s, k_steps = dmax // 8, block_n // 8, dmax // 16
    acc = np.zeros((warps, n_tiles_o, 32, 4), np.float32)
    row_max = np.full((warps, 2, 32), -np.inf, np.float32)
    row_sum = np.zeros((warps, 2, 32), np.float32)
    k_row = ((lanes >> 4) << 3) + (lanes & 7)
    k_col = ((lanes >> 3) & 1) << 3
    v_row = (((lanes >> 3) & 1) << 3) + (lanes & 7)
    v_col = (lanes >> 4) << 3

    n_blocks = (skv + block_n - 1) // block_n
    for j in range(n_blocks):
        stage = j & 1
        if j + 1 < n_blocks:
            load_tile(sK + (stage ^ 1) * block_n * stride, k, (j + 1) * block_n, block_n, skv)
            load_tile(sV + (stage ^ 1) * block_n * stride, v, (j + 1) * block_n, block_n, skv)
        sKj, sVj = sK + stage * block_n * stride, sV + stage * block_n * stride
        valid_n = min(block_n, skv - j * block_n)
        for w in range(warps):
            q_frag = sQ + (w * 16 + (lanes & 15)) * stride + ((lanes >> 4) << 3)
            s = np.zeros((n_tiles_s, 32, 4), np.float32)
            for ks in range(k_steps):
                if ks * 16 < d:
                    a = ldmatrix_x4(smem, q_frag + ks * 16)
                    for nt in range(0, n_tiles_s, 2):
                        if nt * 8 < valid_n:
                            bk = ldmatrix_x4(smem, sKj + (nt * 8 + k_row) * stride + ks * 16 + k_col)
                            mma_16816(s[nt], a, bk[0], bk[1])
                            mma_16816(s[nt + 1], a, bk[2], bk[3])
            ragged = valid_n < block_n
            for nt in range(n_tiles_s):
                for e in range(4):
                    x = s[nt, :, e] * scale_log2
                    if ragged:
                        x = np.where(nt * 8 + col0 + (e & 1) >= valid_n, -np.inf, x)
                    s[nt, :, e] = x
            for r in range(2):
                mx = row_max[w, r].copy()
                for nt in range(n_tiles_s):
                    mx = np.maximum(mx, np.maximum(s[nt, :, 2 * r], s[nt, :, 2 * r + 1]))
                mx = quad_reduce(mx, np.maximum)
                alpha = np.exp2(row_max[w, r] - mx)
                row_max[w, r] = mx
                row_sum[w, r] *= alpha
                acc[w, :, :, 2 * r] *= alpha
                acc[w, :, :, 2 * r + 1] *= alpha
            for nt in range(n_tiles_s):
                if nt * 8 < valid_n:
                    for e in range(4):
                        s[nt, :, e] = np.exp2(s[nt, :, e] - row_max[w, e >> 1])
                        row_sum[w, e >> 1] += s[nt, :, e]
                else:
                    s[nt] = 0
            p = s.astype(elem)  # Mma<T>::pack
            for kk in range(block_n // 16):
                if kk * 16 < valid_n:
                    a = [np.stack([p[2 * kk, :, 0], p[2 * kk, :, 1]], -1), np.stack([p[2 * kk, :, 2], p[2 * kk, :, 3]], -1),
                         np.stack([p[2 * kk + 1, :, 0], p[2 * kk + 1, :, 1]], -1),
                         np.stack([p[2 * kk + 1, :, 2], p[2 * kk + 1, :, 3]], -1)]
                    vrow = sVj + (kk * 16 + v_row) * stride + v_col
                    for nt in range(0, n_tiles_o, 2):
                        if nt * 8 < d:
                            bv = ldmatrix_x4(smem, vrow + nt * 8, trans=True)
                            mma_16816(acc[w, nt], a, bv[0], bv[1])
                            if (nt + 1) * 8 < d:
                                mma_16816(acc[w, nt + 1], a, bv[2], bv[3])

    # epilogue: stage in sQ, then rows out
    out = np.full((block_m, d), np.nan, np.float32)
    lse = np.full(block_m, np.nan, np.float32)
    for w in range(warps):
        rs = np.stack([quad_reduce(row_sum[w, r], np.add) for r in range(2)])
        for nt in range(n_tiles_o):
            if nt * 8 < d:
                for r in range(2):
                    addr = sQ + (w * 16 + g + 8 * r) * stride + nt * 8 + col0
                    smem[addr] = (acc[w, nt, :, 2 * r] / rs[r]).astype(elem)
                    smem[addr + 1] = (acc[w, nt, :, 2 * r + 1] / rs[r]).astype(elem)
        for lane in range(32):
            if lane & 3 == 0:
                for r in range(2):
                    lse[w * 16 + lane // 4 + 8 * r] = (row_max[w, r, lane] + np.log2(rs[r][lane])) * np.log(2)
    for i in range(block_m * chunks_per_row):
        r, c = i // chunks_per_row, (i % chunks_per_row) * 8
        if c < d and m0 + r < sq:
            out[r, c:c + 8] = smem[sQ + r * stride + c: sQ + r * stride + c + 8]
    n = max(0, min(block_m, sq - m0))
    return out[:n], lse[:n]
