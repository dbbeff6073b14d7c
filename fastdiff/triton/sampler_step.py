"""The fused sampler step in Triton (math: csrc/common/sampler_step.h; noise: csrc/common/philox.h).

Algorithm: one program per BLOCK elements, viewed as a (BLOCK/4, 4) tile so that one Philox4x32-10 call (four
32-bit words) feeds the four consecutive elements 4q .. 4q+3 through Box-Muller, exactly like the C++ and CUDA
kernels; the coefficient row is loaded from the table at the step read from device memory (no host sync, graph
safe). Cost: one read of x and of each model output, one write of x_prev (plus noise / x0_prev / x0_prev2 / x0 /
variance when used); ~20 integer ops per element for the noise, which keeps the kernel memory-bound.
The Philox here is our own (tl.umulhi), not tl.randn, so the numbers do not depend on Triton's version.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_TABLE_WIDTH = 12


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
    m1 = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
    w0 = tl.full(c0.shape, 0x9E3779B9, tl.uint32)
    w1 = tl.full(c0.shape, 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + w0
        k1 = k1 + w1
    return c0, c1, c2, c3


@triton.jit
def _uniform(r):
    return ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "guidance_scale", "clip_range", "sx", "sm", "su", "sz", "sb",
                               "sv", "so", "sb2", "sb3"])
def _sampler_step_kernel(x_ptr, m_ptr, u_ptr, z_ptr, b_ptr, b2_ptr, b3_ptr, v_ptr, thr_ptr, out_ptr, table_ptr,
                         step_ptr, total, L, n_steps, sx, sm, su, sz, sb, sv, so, sb2, sb3, guidance_scale, clip_range,
                         seed_lo, seed_hi, HAS_U: tl.constexpr, HAS_Z: tl.constexpr, HAS_B: tl.constexpr,
                         HAS_B2: tl.constexpr, HAS_B3: tl.constexpr, VAR_MODE: tl.constexpr,
                         CLIP_MODE: tl.constexpr, STOCHASTIC: tl.constexpr, FLAT: tl.constexpr,
                         BLOCK: tl.constexpr):
    G: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0).to(tl.int64)
    g = pid * G + tl.arange(0, G).to(tl.int64)
    e = g[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = e < total
    if FLAT:
        xo = e
        mo = e
        uo = e
        zo = e
        bo = e
        b2o = e
        b3o = e
        vo = e
        oo = e
    else:
        n = e // L
        l_ = e - n * L
        xo = n * sx + l_
        mo = n * sm + l_
        uo = n * su + l_
        zo = n * sz + l_
        bo = n * sb + l_
        b2o = n * sb2 + l_
        b3o = n * sb3 + l_
        vo = n * sv + l_
        oo = n * so + l_

    st = tl.load(step_ptr)
    st = tl.minimum(tl.maximum(st, 0), n_steps - 1)
    row = table_ptr + st * 12
    c_px = tl.load(row + 0)
    c_pm = tl.load(row + 1)
    c_a = tl.load(row + 2)
    c_b = tl.load(row + 3)
    c_c = tl.load(row + 4)
    c_d = tl.load(row + 5)
    c_s = tl.load(row + 6)

    x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + mo, mask=mask, other=0.0).to(tl.float32)
    if HAS_U:
        u = tl.load(u_ptr + uo, mask=mask, other=0.0).to(tl.float32)
        m = u + guidance_scale * (m - u)
    x0 = c_px * x + c_pm * m
    if CLIP_MODE == 1:
        x0 = tl.where(x0 < -clip_range, -clip_range, tl.where(x0 > clip_range, clip_range, x0))  # NaN stays NaN
    elif CLIP_MODE == 2:
        thr = tl.load(thr_ptr + e // L, mask=mask, other=1.0)
        x0 = tl.where(x0 < -thr, -thr, tl.where(x0 > thr, thr, x0)) / thr
    acc = c_a * x + c_b * m + c_c * x0
    if HAS_B:
        # the x0 history: each value moves one buffer down (x0 -> x0_buf -> x0_buf2 -> x0_buf3) unless the row says
        # KEEP (column 11: PLMS's warm-up step); a buffer enters the sum only where its coefficient is nonzero
        write = mask & ((tl.zeros(x.shape, tl.float32) + tl.load(row + 11)) == 0.0)
        prev = tl.load(b_ptr + bo, mask=mask, other=0.0)
        acc += tl.where(c_d != 0.0, c_d * prev.to(tl.float32), 0.0)
        if HAS_B2:
            c_e = tl.load(row + 9)
            prev2 = tl.load(b2_ptr + b2o, mask=mask, other=0.0)
            acc += tl.where(c_e != 0.0, c_e * prev2.to(tl.float32), 0.0)
            if HAS_B3:
                c_f = tl.load(row + 10)
                prev3 = tl.load(b3_ptr + b3o, mask=mask & ((tl.zeros(x.shape, tl.float32) + c_f) != 0.0),
                                other=0.0).to(tl.float32)
                acc += c_f * prev3
                tl.store(b3_ptr + b3o, prev2, mask=write)
            tl.store(b2_ptr + b2o, prev, mask=write)
        tl.store(b_ptr + bo, x0.to(b_ptr.dtype.element_ty), mask=write)
    if STOCHASTIC:
        if HAS_Z:
            z = tl.load(z_ptr + zo, mask=mask & ((tl.zeros(x.shape, tl.float32) + c_s) != 0.0), other=0.0).to(tl.float32)
        else:
            k0 = tl.full([G], 0, tl.uint32) + seed_lo.to(tl.uint32, bitcast=True)
            k1 = tl.full([G], 0, tl.uint32) + seed_hi.to(tl.uint32, bitcast=True)
            c0 = (g & 0xFFFFFFFF).to(tl.uint32)
            c1 = (g >> 32).to(tl.uint32)
            c2 = tl.full([G], 0, tl.uint32) + st.to(tl.uint32)
            c3 = tl.full([G], 0, tl.uint32)
            r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
            rad0 = tl.sqrt(-2.0 * tl.log(_uniform(r0)))
            rad1 = tl.sqrt(-2.0 * tl.log(_uniform(r2)))
            th0 = 6.283185307179586 * _uniform(r1)
            th1 = 6.283185307179586 * _uniform(r3)
            col = tl.arange(0, 4)[None, :]
            z = tl.where(col == 0, (rad0 * tl.cos(th0))[:, None],
                         tl.where(col == 1, (rad0 * tl.sin(th0))[:, None],
                                  tl.where(col == 2, (rad1 * tl.cos(th1))[:, None], (rad1 * tl.sin(th1))[:, None])))
        if VAR_MODE == 0:
            std = c_s
        elif VAR_MODE == 1:
            v = tl.load(v_ptr + vo, mask=mask, other=0.0).to(tl.float32)
            std = c_s * tl.sqrt(v)
        else:
            v = tl.load(v_ptr + vo, mask=mask, other=0.0).to(tl.float32)
            min_log = tl.load(row + 7)
            max_log = tl.load(row + 8)
            f = 0.5 * (v + 1.0)
            std = c_s * tl.exp(0.5 * (f * max_log + (1.0 - f) * min_log))
        acc += tl.where(c_s != 0.0, std * z, 0.0)
    tl.store(out_ptr + oo, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _row_stride(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def _u32_as_i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


@triton_op("fastdiff::sampler_step_triton", mutates_args={"x0_buf", "x0_buf2", "x0_buf3"})
def sampler_step_triton(x: torch.Tensor, model_output: torch.Tensor, uncond: Optional[torch.Tensor],
                        guidance_scale: float, table: torch.Tensor, step: torch.Tensor, noise: Optional[torch.Tensor],
                        x0_buf: Optional[torch.Tensor], var_values: Optional[torch.Tensor],
                        thresh: Optional[torch.Tensor], seed: int, var_mode: int, clip_mode: int, clip_range: float,
                        stochastic: bool, x0_buf2: Optional[torch.Tensor] = None,
                        x0_buf3: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = torch.empty_like(x)
    total = x.numel()
    N = x.shape[0]
    L = total // N
    ts = [t if t is not None else x for t in (uncond, noise, x0_buf, var_values, x0_buf2, x0_buf3)]
    strides = [_row_stride(t) for t in [x, model_output] + ts + [out]]
    flat = all(s == L for s in strides) or N == 1
    block = 1024
    grid = (triton.cdiv(total, block),)
    seed &= (1 << 64) - 1
    wrap_triton(_sampler_step_kernel)[grid](
        x, model_output, ts[0], ts[1], ts[2], ts[4], ts[5], ts[3], thresh if thresh is not None else table, out, table,
        step, total, L, table.shape[0], strides[0], strides[1], strides[2], strides[3], strides[4], strides[5],
        strides[8], strides[6], strides[7], guidance_scale, clip_range, _u32_as_i32(seed), _u32_as_i32(seed >> 32),
        HAS_U=uncond is not None, HAS_Z=noise is not None, HAS_B=x0_buf is not None, HAS_B2=x0_buf2 is not None,
        HAS_B3=x0_buf3 is not None, VAR_MODE=var_mode,
        CLIP_MODE=clip_mode, STOCHASTIC=stochastic, FLAT=flat, BLOCK=block, num_warps=4)
    return out
