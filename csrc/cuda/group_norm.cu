// GroupNorm + AdaGN scale/shift + SiLU on CUDA: the same contract as csrc/cpu/group_norm.cpp.
//
// Algorithm. Everything works in the frame of each group's pivot K (its first value, x[n, g cpg, spatial 0];
// see "Precision" in common/group_norm.h): the stats, merge and backward-sums kernels read that one element of
// x themselves, so every CTA of a group uses the same K and no launch is added for it; the merge kernels hand
// K on per (n, c) to the apply passes in one more scratch plane (forward Kc, backward kCK). Forward, three
// launches:
//   1. stats: per-(n, c, chunk) partial (mean, M2) of x - K. A thread loads a batch of kItems 16-byte
//      vectors, subtracts K from every value (exact for values near K), takes the batch's (mean, M2) exactly
//      from its registers (two passes) and merges it into its running (count, mean, M2) with Chan's formula;
//      threads then merge in a fixed tree.
//   2. merge: one CTA per (n, group) merges that group's cpg * K partials in a fixed order into mrel (the mean
//      of x - K) and rstd, outputs mean = K + mrel and rstd, and folds them with weight/bias/scale/shift
//      into one (A, B) per (n, c) for z = A (x - K) + B: A = rstd w (1 + s), B = b (1 + s) + t - A mrel.
//   3. apply: y = act(A (x - K) + B), 16-byte loads and stores.
// Backward, three launches (four with weight or bias), in the same frame (K read from x again,
// mrel = mean - K): per-(n, c, chunk) partial sums S1 = sum gz and S2 = sum gz ((x - K) - mrel)
// (z = A (x - K) + B recomputed for the SiLU); one CTA per (n, group) adds them in a fixed order into the
// per-(n, c) coefficients of grad_x = P gz + Q ((x - K) - mrel) + R and the scale/shift gradients; one apply
// pass for grad_x; a per-channel sum over n for the weight/bias gradients. (Plus one copy when grad_y's
// strides differ from x's, as on the CPU.)
// No float atomics anywhere: every partial is written by exactly one thread and read in a fixed order, so
// the same input gives bit-identical outputs run to run.
//
// Work split (both layouts read in place):
//   NCHW: a row is one (n, c) plane of S contiguous values. A team of TS threads (a power of two) reads one
//     chunk of one row, so its coefficients are two scalars; small planes pack 256 / TS rows into a CTA,
//     large ones split into K chunks of L values. Vectors follow the absolute address, so a row that starts
//     mid-vector (S % vec != 0) reads its head and tail (< vec values each) with scalar loads.
//   channels-last: a CTA reads L rows (spatial positions) of one sample times Cb 16-byte columns of
//     channels (>= 128 contiguous bytes per row). A thread owns one column, so its per-channel accumulators
//     and coefficients stay in registers, and reads every slots-th row of the tile; slots merge in a fixed
//     tree through shared memory. A vector may straddle two groups: coefficients are per channel.
//   When a pointer is not 16-byte aligned (a view with an odd offset) or, channels-last, vec does not divide
//   C, the same kernels run with one value per "vector".
//   Split sizes are chosen so that the grid has >= 4 CTAs per SM whenever there is that much work, e.g.
//   (2, 320, 64, 64) gets 640 CTAs of 256 threads on a 132-SM H100 in either layout and dtype.
// Cost: forward reads x twice (the second read mostly from L2) and writes y once; backward reads x and
// grad_y twice and writes grad_x once. Partials add 8 bytes per (n, c, chunk): nothing in NCHW (a chunk is
// >= a few KB), at most 8 / (32 * sizeof(T)) of x in channels-last (tiles of >= 32 rows unless S < 32).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/check.h"
#include "common/group_norm.h"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;  // stats/apply CTAs: NCHW always 256; channels-last Cb * slots <= 256
// __launch_bounds__(..., 2) on every kernel: without a minimum, ptxas caps some of them at 48-64 registers
// and spills; two 256-thread CTAs per SM (<= 128 registers) still keep 32-64 KB of loads in flight per SM.
constexpr int kItems = 4;      // vectors (NCHW) or rows (channels-last) loaded per thread before any is used
constexpr int kMaxCtaChannels = 64;  // channels-last: Cb * W <= 64 (128 bytes of a row, or 64 scalar columns)
constexpr int kMergeThreads = 256;
constexpr int kMergeWarps = kMergeThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename I>
__host__ __device__ __forceinline__ I imin(I a, I b) {
  return a < b ? a : b;
}
template <typename I>
__host__ __device__ __forceinline__ I imax(I a, I b) {
  return a > b ? a : b;
}

// ---- loads and stores: W values of T at a W-aligned element index ------------------------------------------

// A C++ 16-byte store through a pointer that went through the head/tail arithmetic comes out of nvcc 13 as
// four 4-byte stores (the loads stay 16 bytes), so stores go through PTX (volatile: never dropped or moved out
// of its branch). No "memory" clobber: no kernel here reads what it stores.
__device__ __forceinline__ void st_v4(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d));
}

template <typename T, int W>
struct Io;

template <typename T>
struct Io<T, 1> {
  using raw = T;
  static __device__ __forceinline__ raw load(const T* p) { return *p; }
  static __device__ __forceinline__ void cvt(const raw& r, float (&f)[1]) { f[0] = static_cast<float>(r); }
  static __device__ __forceinline__ void store(T* p, const float (&f)[1]) { *p = static_cast<T>(f[0]); }
};

template <>
struct Io<float, 4> {
  using raw = float4;
  static __device__ __forceinline__ raw load(const float* p) { return *reinterpret_cast<const float4*>(p); }
  static __device__ __forceinline__ void cvt(const raw& r, float (&f)[4]) {
    f[0] = r.x;
    f[1] = r.y;
    f[2] = r.z;
    f[3] = r.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&f)[4]) {
    st_v4(p, __float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

// 16-bit types, two per 32-bit word; the first value in the low half (the lower address).
struct HalfBits {
  static __device__ __forceinline__ float2 load(uint32_t u) {
    __half2 h;
    memcpy(&h, &u, 4);
    return __half22float2(h);
  }
  static __device__ __forceinline__ uint32_t store(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
};
struct BF16Bits {
  static __device__ __forceinline__ float2 load(uint32_t u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));  // exact
  }
  static __device__ __forceinline__ uint32_t store(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
};

template <typename T, typename Bits>
struct Io16x8 {
  using raw = uint4;
  static __device__ __forceinline__ raw load(const T* p) { return *reinterpret_cast<const uint4*>(p); }
  static __device__ __forceinline__ void cvt(const raw& r, float (&f)[8]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 v = Bits::load(w[i]);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
  static __device__ __forceinline__ void store(T* p, const float (&f)[8]) {
    st_v4(p, Bits::store(f[0], f[1]), Bits::store(f[2], f[3]), Bits::store(f[4], f[5]), Bits::store(f[6], f[7]));
  }
};
template <>
struct Io<c10::Half, 8> : Io16x8<c10::Half, HalfBits> {};
template <>
struct Io<c10::BFloat16, 8> : Io16x8<c10::BFloat16, BF16Bits> {};

// ---- activation ------------------------------------------------------------------------------------------

// __fdividef is exact enough here (2 ulp) and turns z / inf (z < -88) into the correct -0.
template <bool kSilu>
__device__ __forceinline__ float act(float z) {
  return kSilu ? __fdividef(z, 1.f + expf(-z)) : z;
}

template <bool kSilu>
__device__ __forceinline__ float act_grad(float z) {
  if (!kSilu) return 1.f;
  const float s = __fdividef(1.f, 1.f + expf(-z));
  return s * (1.f + z * (1.f - s));
}

// ---- parameters: any floating dtype and strides, read through a runtime dtype code --------------------------
// (like the CPU file, which converts each to fp32; the kernels stay one instantiation per x dtype)

enum : int { kAbsent = 0, kF32 = 1, kF16 = 2, kBF16 = 3, kF64 = 4 };

struct ParamIn {
  const void* p;
  int64_t s0, s1;  // element strides of dims 0 and 1
  int dt;
};
struct ParamOut {  // a contiguous output
  void* p;
  int dt;
};
struct Fold {
  ParamIn w, b, s, t;  // weight (C,), bias (C,), scale (N, C), shift (N, C)
};

__device__ __forceinline__ float ldp(const ParamIn& t, int64_t i, int64_t j, float dflt) {
  if (t.dt == kAbsent) return dflt;
  const int64_t o = i * t.s0 + j * t.s1;
  switch (t.dt) {
    case kF32: return static_cast<const float*>(t.p)[o];
    case kF16: return __half2float(static_cast<const __half*>(t.p)[o]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(t.p)[o]);
    default: return static_cast<float>(static_cast<const double*>(t.p)[o]);
  }
}

__device__ __forceinline__ void stp(const ParamOut& t, int64_t i, float v) {
  switch (t.dt) {
    case kF32: static_cast<float*>(t.p)[i] = v; break;
    case kF16: static_cast<__half*>(t.p)[i] = __float2half_rn(v); break;
    case kBF16: static_cast<__nv_bfloat16*>(t.p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<double*>(t.p)[i] = static_cast<double>(v); break;
  }
}

// (A, B) of one (n, c). Never call it from an unrolled loop: its dtype switches then get unswitched into
// hundreds of copies of the caller's main loop (that once made a 55k-instruction kernel).
__device__ __forceinline__ float2 fold_nc(const Fold& f, int64_t n, int64_t c, float mean, float rstd) {
  float2 ab;
  gn_fold(mean, rstd, ldp(f.w, c, 0, 1.f), ldp(f.b, c, 0, 0.f), ldp(f.s, n, c, 0.f), ldp(f.t, n, c, 0.f), ab.x,
          ab.y);
  return ab;
}

// (A, B) of one (n, c) in the pivot frame, z = A (x - K) + B, from mrel (the group mean of x - K), as the
// CPU file's fold: B = (b (1 + s) + t) - A mrel.
__device__ __forceinline__ float2 fold_rel(const Fold& f, int64_t n, int64_t c, float mrel, float rstd) {
  float2 ab = fold_nc(f, n, c, 0.f, rstd);
  ab.y -= ab.x * mrel;
  return ab;
}

// Element index in x of the pivot of channel c's group in sample n: the group's first value (spatial 0),
// for x contiguous in NCHW (cl false) or channels-last (cl true). 32-bit channel math: C < 2^31.
__device__ __forceinline__ int64_t pivot_at(int64_t n, uint32_t c, uint32_t cpg, int64_t C, int64_t S, bool cl) {
  const int64_t c0 = static_cast<int64_t>(c - c % cpg);
  return cl ? n * S * C + c0 : (n * C + c0) * S;
}

// ---- the work split ----------------------------------------------------------------------------------------

struct Plan {
  int64_t N, C, S, G, cpg;
  int64_t R;    // NCHW: rows, N * C
  int64_t L;    // chunk: values of a row (NCHW) or rows of a sample (channels-last)
  int64_t K;    // chunks per row (NCHW) or per sample (channels-last)
  int64_t nck;  // N * C * K: one plane of partials
  int64_t Vc;   // channels-last: columns of W channels, C / W
  int64_t grid;
  int W;                        // values per vector: 16 / sizeof(T), or 1 (see the note at the top)
  int TS, ts_log, RPC;          // NCHW: team size, log2, rows per CTA
  int Cb, ncb, slots, threads;  // channels-last: columns per CTA, column blocks, rows in flight; CTA size
  bool cl;
};

// Partials of (n, c, k) live at n * pN + c * pC + k * pK, chunk k holding min(L, S - k L) values (NCHW) or
// rows (channels-last).
struct PartIdx {
  int64_t pN, pC, pK;
};
inline PartIdx part_idx(const Plan& p) {
  return p.cl ? PartIdx{p.K * p.C, 1, p.C} : PartIdx{p.C * p.K, p.K, 1};
}

// NCHW: where a thread is. Teams are aligned groups of TS threads; rows beyond R leave a team idle.
struct CfPos {
  int64_t row, k;
  int rank;
  bool active;
};
__device__ __forceinline__ CfPos cf_pos(const Plan& p) {
  CfPos q;
  const int team = static_cast<int>(threadIdx.x) >> p.ts_log;
  q.rank = static_cast<int>(threadIdx.x) & (p.TS - 1);
  const uint32_t K = static_cast<uint32_t>(p.K), rb = blockIdx.x / K;  // 32-bit: no division subroutine
  q.k = blockIdx.x - rb * K;
  q.row = static_cast<int64_t>(rb) * p.RPC + team;
  q.active = q.row < p.R;
  return q;
}

// A chunk of a row as absolute element indices: `head` scalars from e0, then `nvec` W-aligned vectors, then
// `tail` scalars. head, tail < W; both are 0 when W == 1.
struct Span {
  int64_t e0;
  int head, nvec, tail;
};
template <int W>
__device__ __forceinline__ Span cf_span(const Plan& p, int64_t row, int64_t k) {
  const int64_t lo = k * p.L, hi = imin(p.S, lo + p.L);
  const int64_t e0 = row * p.S + lo, e1 = row * p.S + hi;
  const int64_t a0 = imin((e0 + W - 1) / W * W, e1);
  const int64_t a1 = imax(a0, e1 / W * W);
  return {e0, static_cast<int>(a0 - e0), static_cast<int>((a1 - a0) / W), static_cast<int>(e1 - a1)};
}

// channels-last: where a thread is. Thread = slot * Cb + col.
struct ClPos {
  int64_t n, k, gcol;  // gcol: the column over the whole row; channels gcol * W .. + W - 1
  int col, slot, nr;   // nr: rows in this tile
  bool active;
};
__device__ __forceinline__ ClPos cl_pos(const Plan& p) {
  ClPos q;
  q.col = static_cast<int>(threadIdx.x) % p.Cb;
  q.slot = static_cast<int>(threadIdx.x) / p.Cb;
  const uint32_t ncb = static_cast<uint32_t>(p.ncb), K = static_cast<uint32_t>(p.K);
  const uint32_t b = blockIdx.x / ncb, cb = blockIdx.x - b * ncb;
  q.n = b / K;
  q.k = b - static_cast<uint32_t>(q.n) * K;
  q.gcol = static_cast<int64_t>(cb) * p.Cb + q.col;
  q.active = q.gcol < p.Vc;
  q.nr = static_cast<int>(imin(p.L, p.S - q.k * p.L));
  return q;
}

// ---- reductions in a fixed order --------------------------------------------------------------------------

// Tree over aligned segments of `width` lanes (a power of two <= 32); the segment's first lane ends with the
// merge of the whole segment. Every lane of the warp must call it.
__device__ __forceinline__ void seg_merge(Stats& s, int width) {
  const int r = static_cast<int>(threadIdx.x) & (width - 1);
  for (int off = width >> 1; off > 0; off >>= 1) {
    const Stats o{__shfl_down_sync(kFull, s.n, off, width), __shfl_down_sync(kFull, s.mean, off, width),
                  __shfl_down_sync(kFull, s.m2, off, width)};
    if (r < off) chan_merge(s, o);
  }
}
__device__ __forceinline__ void seg_sum(float& a, float& b, int width) {
  const int r = static_cast<int>(threadIdx.x) & (width - 1);
  for (int off = width >> 1; off > 0; off >>= 1) {
    const float oa = __shfl_down_sync(kFull, a, off, width), ob = __shfl_down_sync(kFull, b, off, width);
    if (r < off) {
      a += oa;
      b += ob;
    }
  }
}

// NCHW: merge a team's values into its rank 0. Teams wider than a warp go through shared memory, warps in
// order. Every thread of the CTA must call it (it may hold a barrier).
__device__ __forceinline__ void team_merge(Stats& s, const Plan& p, int rank, Stats* red) {
  seg_merge(s, imin(p.TS, 32));
  if (p.TS > 32) {
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
    __syncthreads();
    if (rank == 0)
      for (int w = 1; w < (p.TS >> 5); ++w) chan_merge(s, red[(threadIdx.x >> 5) + w]);
  }
}
__device__ __forceinline__ void team_sum(float& a, float& b, const Plan& p, int rank, float2* red) {
  seg_sum(a, b, imin(p.TS, 32));
  if (p.TS > 32) {
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = make_float2(a, b);
    __syncthreads();
    if (rank == 0)
      for (int w = 1; w < (p.TS >> 5); ++w) {
        a += red[(threadIdx.x >> 5) + w].x;
        b += red[(threadIdx.x >> 5) + w].y;
      }
  }
}

// Chan merge of W channels that share one count.
template <int W>
__device__ __forceinline__ void merge_w(float& n, float (&mean)[W], float (&m2)[W], float nb, const float (&mb)[W],
                                        const float (&m2b)[W]) {
  if (nb == 0.f) return;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    float nj = n;
    chan_merge(nj, mean[j], m2[j], nb, mb[j], m2b[j]);
  }
  n += nb;
}

// ---- forward -----------------------------------------------------------------------------------------------

template <typename T, int W>
__device__ __forceinline__ void stats_cf(const T* __restrict__ x, float* __restrict__ part, const Plan& p,
                                         Stats* red) {
  using io = Io<T, W>;
  const CfPos q = cf_pos(p);
  Stats st{0.f, 0.f, 0.f};
  if (q.active) {
    const uint32_t row = static_cast<uint32_t>(q.row), C = static_cast<uint32_t>(p.C);  // N C < 2^31
    const uint32_t n = row / C;
    const float K = static_cast<float>(x[pivot_at(n, row - n * C, static_cast<uint32_t>(p.cpg), p.C, p.S, false)]);
    const Span sp = cf_span<W>(p, q.row, q.k);
    const T* xv = x + sp.e0 + sp.head;
    for (int v0 = 0; v0 < sp.nvec; v0 += p.TS * kItems) {
      typename io::raw r[kItems];
      int nv = 0;  // the valid vectors of the batch are a prefix
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int v = v0 + i * p.TS + q.rank;
        if (v < sp.nvec) {
          r[i] = io::load(xv + static_cast<int64_t>(v) * W);
          nv = i + 1;
        }
      }
      if (nv == 0) continue;
      float f[kItems][W];
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        if (i < nv) {
          io::cvt(r[i], f[i]);
#pragma unroll
          for (int j = 0; j < W; ++j) {
            f[i][j] -= K;
            sum += f[i][j];
          }
        }
      const float nb = static_cast<float>(nv * W), mb = sum / nb;
      float m2b = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        if (i < nv) {
#pragma unroll
          for (int j = 0; j < W; ++j) {
            const float d = f[i][j] - mb;
            m2b += d * d;
          }
        }
      chan_merge(st.n, st.mean, st.m2, nb, mb, m2b);
    }
    for (int j = q.rank; j < sp.head; j += p.TS)
      chan_merge(st.n, st.mean, st.m2, 1.f, static_cast<float>(x[sp.e0 + j]) - K, 0.f);
    const int64_t et = sp.e0 + sp.head + static_cast<int64_t>(sp.nvec) * W;
    for (int j = q.rank; j < sp.tail; j += p.TS)
      chan_merge(st.n, st.mean, st.m2, 1.f, static_cast<float>(x[et + j]) - K, 0.f);
  }
  team_merge(st, p, q.rank, red);
  if (q.active && q.rank == 0) {
    const int64_t i = q.row * p.K + q.k;
    part[i] = st.mean;
    part[p.nck + i] = st.m2;
  }
}

template <typename T, int W>
__device__ __forceinline__ void stats_cl(const T* __restrict__ x, float* __restrict__ part, const Plan& p,
                                         float* sm, float* piv) {
  using io = Io<T, W>;
  const ClPos q = cl_pos(p);
  // The pivots of the CTA's (<= 64) channels, one per thread, into shared memory: a vector may straddle
  // groups, and every slot of a column needs the same W pivots.
  {
    const int64_t cbase = (q.gcol - q.col) * W;  // first channel of this CTA's column block
    const int nch = static_cast<int>(imin<int64_t>(p.Cb * W, p.C - cbase));
    if (static_cast<int>(threadIdx.x) < nch)
      piv[threadIdx.x] = static_cast<float>(
          x[pivot_at(q.n, static_cast<uint32_t>(cbase) + threadIdx.x, static_cast<uint32_t>(p.cpg), p.C, p.S, true)]);
    __syncthreads();
  }
  float cnt = 0.f, mean[W], m2[W];
#pragma unroll
  for (int j = 0; j < W; ++j) mean[j] = m2[j] = 0.f;
  if (q.active) {
    float K[W];
#pragma unroll
    for (int j = 0; j < W; ++j) K[j] = piv[q.col * W + j];
    const T* xb = x + (q.n * p.S + q.k * p.L) * p.C + q.gcol * W;
    for (int r0 = 0; r0 < q.nr; r0 += p.slots * kItems) {
      typename io::raw r[kItems];
      int nv = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int row = r0 + i * p.slots + q.slot;
        if (row < q.nr) {
          r[i] = io::load(xb + static_cast<int64_t>(row) * p.C);
          nv = i + 1;
        }
      }
      if (nv == 0) continue;
      float f[kItems][W];
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        if (i < nv) {
          io::cvt(r[i], f[i]);
#pragma unroll
          for (int j = 0; j < W; ++j) f[i][j] -= K[j];
        }
      const float nb = static_cast<float>(nv);
      float mb[W], m2b[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < kItems; ++i)
          if (i < nv) s += f[i][j];
        mb[j] = s / nb;
        float s2 = 0.f;
#pragma unroll
        for (int i = 0; i < kItems; ++i)
          if (i < nv) {
            const float d = f[i][j] - mb[j];
            s2 += d * d;
          }
        m2b[j] = s2;
      }
      merge_w<W>(cnt, mean, m2, nb, mb, m2b);
    }
  }
  // Fixed tree over the slots of each column: at step s, slot j (j % 2s == 0) takes slot j + s.
  constexpr int kStride = 2 * W + 1;  // odd: conflict-free
  float* mine = sm + threadIdx.x * kStride;
  mine[0] = cnt;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    mine[1 + j] = mean[j];
    mine[1 + W + j] = m2[j];
  }
  for (int s = 1; s < p.slots; s <<= 1) {
    __syncthreads();
    if ((q.slot & (2 * s - 1)) == 0 && q.slot + s < p.slots) {
      const float* o = sm + (threadIdx.x + s * p.Cb) * kStride;
      float ob[W], o2[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        ob[j] = o[1 + j];
        o2[j] = o[1 + W + j];
      }
      merge_w<W>(cnt, mean, m2, o[0], ob, o2);
      mine[0] = cnt;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        mine[1 + j] = mean[j];
        mine[1 + W + j] = m2[j];
      }
    }
  }
  if (q.slot == 0 && q.active) {
    const int64_t i = (q.n * p.K + q.k) * p.C + q.gcol * W;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      part[i + j] = mean[j];
      part[p.nck + i + j] = m2[j];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    gn_stats_cf(const T* __restrict__ x, float* __restrict__ part, const Plan p) {
  __shared__ Stats red[kThreads / 32];
  if (p.W == 1)
    stats_cf<T, 1>(x, part, p, red);
  else
    stats_cf<T, vec_of<T>()>(x, part, p, red);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    gn_stats_cl(const T* __restrict__ x, float* __restrict__ part, const Plan p) {
  __shared__ float sm[kThreads * (2 * vec_of<T>() + 1)];
  __shared__ float piv[kMaxCtaChannels];
  if (p.W == 1)
    stats_cl<T, 1>(x, part, p, sm, piv);
  else
    stats_cl<T, vec_of<T>()>(x, part, p, sm, piv);
}

struct MergeArgs {
  int64_t N, C, S, G, cpg, K, L, nck;
  PartIdx pi;
  float eps;
  bool cl;
};

inline MergeArgs merge_args(const Plan& p, double eps) {
  return {p.N, p.C, p.S, p.G, p.cpg, p.K, p.L, p.nck, part_idx(p), static_cast<float>(eps), p.cl};
}

// The pivot K of group (n, g), read from x.
template <typename T>
__device__ __forceinline__ float group_pivot(const T* __restrict__ x, const MergeArgs& m, int64_t n, int64_t g) {
  return static_cast<float>(
      x[pivot_at(n, static_cast<uint32_t>(g * m.cpg), static_cast<uint32_t>(m.cpg), m.C, m.S, m.cl)]);
}

// One CTA per (n, group): warp w merges channels w, w + 8, ... (lanes over chunks, then a fixed tree) and
// keeps them in channel order; the warps are then merged in order. The partials are in the frame of the
// group's pivot K; mean = K + mrel, and Kc receives K per (n, c) for the apply pass.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads, 2)
    gn_merge_fwd(const T* __restrict__ x, const float* __restrict__ part, float* __restrict__ mean_out,
                 float* __restrict__ rstd_out, float* __restrict__ A, float* __restrict__ B,
                 float* __restrict__ Kc, const Fold f, const MergeArgs m) {
  __shared__ Stats red[kMergeWarps];
  __shared__ float bc[3];
  const int64_t ng = blockIdx.x, n = blockIdx.x / static_cast<uint32_t>(m.G), g = ng - n * m.G;
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const float K = threadIdx.x == 0 ? group_pivot(x, m, n, g) : 0.f;  // issued early, used by thread 0
  Stats acc{0.f, 0.f, 0.f};
  for (int64_t ci = warp; ci < m.cpg; ci += kMergeWarps) {
    const float* pc = part + n * m.pi.pN + (g * m.cpg + ci) * m.pi.pC;
    Stats s{0.f, 0.f, 0.f};
    for (int64_t k = lane; k < m.K; k += 32)
      chan_merge(s.n, s.mean, s.m2, static_cast<float>(imin(m.L, m.S - k * m.L)), pc[k * m.pi.pK],
                 pc[m.nck + k * m.pi.pK]);
    seg_merge(s, 32);
    if (lane == 0) chan_merge(acc, s);
  }
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    Stats t = red[0];
    for (int w = 1; w < kMergeWarps; ++w) chan_merge(t, red[w]);
    const float rs = 1.f / sqrtf(fmaxf(t.m2 / t.n, 0.f) + m.eps);
    mean_out[ng] = K + t.mean;
    rstd_out[ng] = rs;
    bc[0] = t.mean;
    bc[1] = rs;
    bc[2] = K;
  }
  __syncthreads();
  const float mrel = bc[0], rs = bc[1], Kg = bc[2];
  for (int64_t ci = threadIdx.x; ci < m.cpg; ci += kMergeThreads) {
    const int64_t c = g * m.cpg + ci;
    const float2 ab = fold_rel(f, n, c, mrel, rs);
    A[n * m.C + c] = ab.x;
    B[n * m.C + c] = ab.y;
    Kc[n * m.C + c] = Kg;
  }
}

template <typename T, bool kSilu, int W>
__device__ __forceinline__ void apply_cf(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ A,
                                         const float* __restrict__ B, const float* __restrict__ Kc, const Plan& p) {
  using io = Io<T, W>;
  const CfPos q = cf_pos(p);
  if (!q.active) return;
  const float a = A[q.row], b = B[q.row], K = Kc[q.row];
  const Span sp = cf_span<W>(p, q.row, q.k);
  const T* xv = x + sp.e0 + sp.head;
  T* yv = y + sp.e0 + sp.head;
  for (int v0 = 0; v0 < sp.nvec; v0 += p.TS * kItems) {
    typename io::raw r[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = v0 + i * p.TS + q.rank;
      if (v < sp.nvec) r[i] = io::load(xv + static_cast<int64_t>(v) * W);
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = v0 + i * p.TS + q.rank;
      if (v < sp.nvec) {
        float f[W];
        io::cvt(r[i], f);
#pragma unroll
        for (int j = 0; j < W; ++j) f[j] = act<kSilu>(a * (f[j] - K) + b);
        io::store(yv + static_cast<int64_t>(v) * W, f);
      }
    }
  }
  for (int j = q.rank; j < sp.head; j += p.TS)
    y[sp.e0 + j] = static_cast<T>(act<kSilu>(a * (static_cast<float>(x[sp.e0 + j]) - K) + b));
  const int64_t et = sp.e0 + sp.head + static_cast<int64_t>(sp.nvec) * W;
  for (int j = q.rank; j < sp.tail; j += p.TS)
    y[et + j] = static_cast<T>(act<kSilu>(a * (static_cast<float>(x[et + j]) - K) + b));
}

template <typename T, bool kSilu, int W>
__device__ __forceinline__ void apply_cl(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ A,
                                         const float* __restrict__ B, const float* __restrict__ Kc, const Plan& p) {
  using io = Io<T, W>;
  const ClPos q = cl_pos(p);
  if (!q.active) return;
  const int64_t c0 = q.gcol * W;
  float a[W], b[W], K[W];
#pragma unroll
  for (int j = 0; j < W; ++j) {
    a[j] = A[q.n * p.C + c0 + j];
    b[j] = B[q.n * p.C + c0 + j];
    K[j] = Kc[q.n * p.C + c0 + j];
  }
  const int64_t off = (q.n * p.S + q.k * p.L) * p.C + c0;
  const T* xb = x + off;
  T* yb = y + off;
  for (int r0 = 0; r0 < q.nr; r0 += p.slots * kItems) {
    typename io::raw r[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int row = r0 + i * p.slots + q.slot;
      if (row < q.nr) r[i] = io::load(xb + static_cast<int64_t>(row) * p.C);
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int row = r0 + i * p.slots + q.slot;
      if (row < q.nr) {
        float f[W];
        io::cvt(r[i], f);
#pragma unroll
        for (int j = 0; j < W; ++j) f[j] = act<kSilu>(a[j] * (f[j] - K[j]) + b[j]);
        io::store(yb + static_cast<int64_t>(row) * p.C, f);
      }
    }
  }
}

template <typename T, bool kSilu>
__global__ void __launch_bounds__(kThreads, 2)
    gn_apply_cf(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ A, const float* __restrict__ B,
                const float* __restrict__ Kc, const Plan p) {
  if (p.W == 1)
    apply_cf<T, kSilu, 1>(x, y, A, B, Kc, p);
  else
    apply_cf<T, kSilu, vec_of<T>()>(x, y, A, B, Kc, p);
}

template <typename T, bool kSilu>
__global__ void __launch_bounds__(kThreads, 2)
    gn_apply_cl(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ A, const float* __restrict__ B,
                const float* __restrict__ Kc, const Plan p) {
  if (p.W == 1)
    apply_cl<T, kSilu, 1>(x, y, A, B, Kc, p);
  else
    apply_cl<T, kSilu, vec_of<T>()>(x, y, A, B, Kc, p);
}

// ---- backward ----------------------------------------------------------------------------------------------

// Per-element terms of S1 and S2, in the pivot frame: d = x - K, z = a d + b, x - mean = d - mrel.
template <bool kSilu>
__device__ __forceinline__ void bwd_acc(float xv, float g, float a, float b, float K, float mrel, float& s1,
                                        float& s2) {
  const float d = xv - K;
  const float gz = g * act_grad<kSilu>(a * d + b);
  s1 += gz;
  s2 += gz * (d - mrel);
}

template <typename T, bool kSilu, int W>
__device__ __forceinline__ void bsums_cf(const T* __restrict__ gy, const T* __restrict__ x,
                                         const float* __restrict__ mean, const float* __restrict__ rstd,
                                         const Fold& fo, float* __restrict__ part, const Plan& p, float2* red) {
  using io = Io<T, W>;
  const CfPos q = cf_pos(p);
  float s1 = 0.f, s2 = 0.f;
  if (q.active) {
    const uint32_t row = static_cast<uint32_t>(q.row), C = static_cast<uint32_t>(p.C);  // N C < 2^31
    const uint32_t n = row / C, c = row - n * C, ng = n * static_cast<uint32_t>(p.G) + c / static_cast<uint32_t>(p.cpg);
    // the forward's pivot again, read from x, and the mean in its frame
    const float K = static_cast<float>(x[pivot_at(n, c, static_cast<uint32_t>(p.cpg), p.C, p.S, false)]);
    const float mu = mean[ng] - K;
    float a = 0.f, b = 0.f;
    if (kSilu) {
      const float2 ab = fold_rel(fo, n, c, mu, rstd[ng]);
      a = ab.x;
      b = ab.y;
    }
    const Span sp = cf_span<W>(p, q.row, q.k);
    const T* xv = x + sp.e0 + sp.head;
    const T* gv = gy + sp.e0 + sp.head;
    for (int v0 = 0; v0 < sp.nvec; v0 += p.TS * kItems) {
      typename io::raw rx[kItems], rg[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int v = v0 + i * p.TS + q.rank;
        if (v < sp.nvec) {
          rx[i] = io::load(xv + static_cast<int64_t>(v) * W);
          rg[i] = io::load(gv + static_cast<int64_t>(v) * W);
        }
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int v = v0 + i * p.TS + q.rank;
        if (v < sp.nvec) {
          float fx[W], fg[W];
          io::cvt(rx[i], fx);
          io::cvt(rg[i], fg);
#pragma unroll
          for (int j = 0; j < W; ++j) bwd_acc<kSilu>(fx[j], fg[j], a, b, K, mu, s1, s2);
        }
      }
    }
    for (int j = q.rank; j < sp.head; j += p.TS)
      bwd_acc<kSilu>(static_cast<float>(x[sp.e0 + j]), static_cast<float>(gy[sp.e0 + j]), a, b, K, mu, s1, s2);
    const int64_t et = sp.e0 + sp.head + static_cast<int64_t>(sp.nvec) * W;
    for (int j = q.rank; j < sp.tail; j += p.TS)
      bwd_acc<kSilu>(static_cast<float>(x[et + j]), static_cast<float>(gy[et + j]), a, b, K, mu, s1, s2);
  }
  team_sum(s1, s2, p, q.rank, red);
  if (q.active && q.rank == 0) {
    const int64_t i = q.row * p.K + q.k;
    part[i] = s1;
    part[p.nck + i] = s2;
  }
}

template <typename T, bool kSilu, int W>
__device__ __forceinline__ void bsums_cl(const T* __restrict__ gy, const T* __restrict__ x,
                                         const float* __restrict__ mean, const float* __restrict__ rstd,
                                         const Fold& fo, float* __restrict__ part, const Plan& p, float* sm,
                                         float (*coef)[kMaxCtaChannels]) {  // coef: A, B, mrel, K
  using io = Io<T, W>;
  const ClPos q = cl_pos(p);
  // The CTA's (<= 64) channels fold once, one per thread, into shared memory: every slot of a column needs
  // the same coefficients, and a per-thread fold of W channels would serialise W parameter round trips.
  {
    const int64_t cbase = (q.gcol - q.col) * W;  // first channel of this CTA's column block
    const int nch = static_cast<int>(imin<int64_t>(p.Cb * W, p.C - cbase));
    if (static_cast<int>(threadIdx.x) < nch) {
      const uint32_t c = static_cast<uint32_t>(cbase) + threadIdx.x;
      const uint32_t ng = static_cast<uint32_t>(q.n * p.G) + c / static_cast<uint32_t>(p.cpg);
      // the forward's pivot again, read from x, and the mean in its frame
      const float K = static_cast<float>(x[pivot_at(q.n, c, static_cast<uint32_t>(p.cpg), p.C, p.S, true)]);
      const float mu = mean[ng] - K;
      float2 ab = make_float2(0.f, 0.f);
      if (kSilu) ab = fold_rel(fo, q.n, c, mu, rstd[ng]);
      coef[0][threadIdx.x] = ab.x;
      coef[1][threadIdx.x] = ab.y;
      coef[2][threadIdx.x] = mu;
      coef[3][threadIdx.x] = K;
    }
    __syncthreads();
  }
  float s1[W], s2[W];
#pragma unroll
  for (int j = 0; j < W; ++j) s1[j] = s2[j] = 0.f;
  if (q.active) {
    float a[W], b[W], mu[W], K[W];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      a[j] = coef[0][q.col * W + j];
      b[j] = coef[1][q.col * W + j];
      mu[j] = coef[2][q.col * W + j];
      K[j] = coef[3][q.col * W + j];
    }
    const int64_t off = (q.n * p.S + q.k * p.L) * p.C + q.gcol * W;
    const T* xb = x + off;
    const T* gb = gy + off;
    for (int r0 = 0; r0 < q.nr; r0 += p.slots * kItems) {
      typename io::raw rx[kItems], rg[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int row = r0 + i * p.slots + q.slot;
        if (row < q.nr) {
          rx[i] = io::load(xb + static_cast<int64_t>(row) * p.C);
          rg[i] = io::load(gb + static_cast<int64_t>(row) * p.C);
        }
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int row = r0 + i * p.slots + q.slot;
        if (row < q.nr) {
          float fx[W], fg[W];
          io::cvt(rx[i], fx);
          io::cvt(rg[i], fg);
#pragma unroll
          for (int j = 0; j < W; ++j) bwd_acc<kSilu>(fx[j], fg[j], a[j], b[j], K[j], mu[j], s1[j], s2[j]);
        }
      }
    }
  }
  constexpr int kStride = 2 * W + 1;  // odd: conflict-free (as gn_stats_cl)
  float* mine = sm + threadIdx.x * kStride;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    mine[j] = s1[j];
    mine[W + j] = s2[j];
  }
  for (int s = 1; s < p.slots; s <<= 1) {
    __syncthreads();
    if ((q.slot & (2 * s - 1)) == 0 && q.slot + s < p.slots) {
      const float* o = sm + (threadIdx.x + s * p.Cb) * kStride;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        s1[j] += o[j];
        s2[j] += o[W + j];
        mine[j] = s1[j];
        mine[W + j] = s2[j];
      }
    }
  }
  if (q.slot == 0 && q.active) {
    const int64_t i = (q.n * p.K + q.k) * p.C + q.gcol * W;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      part[i + j] = s1[j];
      part[p.nck + i + j] = s2[j];
    }
  }
}

template <typename T, bool kSilu>
__global__ void __launch_bounds__(kThreads, 2)
    gn_bsums_cf(const T* __restrict__ gy, const T* __restrict__ x, const float* __restrict__ mean,
                const float* __restrict__ rstd, const Fold fo, float* __restrict__ part, const Plan p) {
  __shared__ float2 red[kThreads / 32];
  if (p.W == 1)
    bsums_cf<T, kSilu, 1>(gy, x, mean, rstd, fo, part, p, red);
  else
    bsums_cf<T, kSilu, vec_of<T>()>(gy, x, mean, rstd, fo, part, p, red);
}

template <typename T, bool kSilu>
__global__ void __launch_bounds__(kThreads, 2)
    gn_bsums_cl(const T* __restrict__ gy, const T* __restrict__ x, const float* __restrict__ mean,
                const float* __restrict__ rstd, const Fold fo, float* __restrict__ part, const Plan p) {
  __shared__ float sm[kThreads * (2 * vec_of<T>() + 1)];
  __shared__ float coef[4][kMaxCtaChannels];
  if (p.W == 1)
    bsums_cl<T, kSilu, 1>(gy, x, mean, rstd, fo, part, p, sm, coef);
  else
    bsums_cl<T, kSilu, vec_of<T>()>(gy, x, mean, rstd, fo, part, p, sm, coef);
}

// Per-(n, c) coefficient planes written by the backward merge and read by the grad_x pass: A, B of
// z = A (x - K) + B, P, Q, R of grad_x, mrel (the mean in K's frame) and the pivot K.
enum : int { kCA = 0, kCB, kCP, kCQ, kCR, kCM, kCK, kNumCoef };

struct BwdOut {
  float* coef;   // kNumCoef planes of N * C
  float* gwb;    // 2 planes of N * C: per-(n, c) terms of grad weight / grad bias; null when neither exists
  ParamOut gs, gt;  // grad scale / shift, (N, C) contiguous; p null when absent
};

// One CTA per (n, group): warp w sums channels w, w + 8, ... (lanes over chunks, then a fixed tree); the
// group sums m1, m2 then add the warps' channel-ordered partial sums in warp order. Formulas as in the CPU
// file: xhat sums S2 rstd, m1 = mean_c(g S1), m2 = mean_c(g S2 rstd), g = w (1 + s). (A, B) and the mean
// are in the frame of the group's pivot K, read from x as in the forward: mrel = mean - K.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads, 2)
    gn_merge_bwd(const T* __restrict__ x, const float* __restrict__ part, const float* __restrict__ mean,
                 const float* __restrict__ rstd, const Fold f, const BwdOut o, const MergeArgs m) {
  __shared__ float red[kMergeWarps][2];
  __shared__ float bc[2];
  const int64_t ng = blockIdx.x, n = blockIdx.x / static_cast<uint32_t>(m.G), g = ng - n * m.G;
  const int64_t NC = m.N * m.C;
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const float r = rstd[ng], K = group_pivot(x, m, n, g), mu = mean[ng] - K;
  float acc1 = 0.f, acc2 = 0.f;
  for (int64_t ci = warp; ci < m.cpg; ci += kMergeWarps) {
    const int64_t c = g * m.cpg + ci, nc = n * m.C + c;
    const float* pc = part + n * m.pi.pN + c * m.pi.pC;
    float s1 = 0.f, s2 = 0.f;
    for (int64_t k = lane; k < m.K; k += 32) {
      s1 += pc[k * m.pi.pK];
      s2 += pc[m.nck + k * m.pi.pK];
    }
    seg_sum(s1, s2, 32);
    if (lane == 0) {
      const float w = ldp(f.w, c, 0, 1.f), b = ldp(f.b, c, 0, 0.f), sc = ldp(f.s, n, c, 0.f),
                  t = ldp(f.t, n, c, 0.f);
      const float one_s = 1.f + sc, gc = w * one_s;
      acc1 += gc * s1;
      acc2 += gc * s2 * r;
      float A, B;
      gn_fold(0.f, r, w, b, sc, t, A, B);
      B -= A * mu;  // as fold_rel
      o.coef[kCA * NC + nc] = A;
      o.coef[kCB * NC + nc] = B;
      o.coef[kCP * NC + nc] = r * gc;
      const float xs = s2 * r;  // sum gz xhat
      if (o.gwb != nullptr) {
        o.gwb[nc] = one_s * xs;
        o.gwb[NC + nc] = one_s * s1;
      }
      if (o.gs.p != nullptr) {
        float h = f.w.dt != kAbsent ? xs * w : xs;  // sum gz h, h = xhat w + b
        if (f.b.dt != kAbsent) h = h + s1 * b;
        stp(o.gs, nc, h);
      }
      if (o.gt.p != nullptr) stp(o.gt, nc, s1);
    }
  }
  if (lane == 0) {
    red[warp][0] = acc1;
    red[warp][1] = acc2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float m1 = red[0][0], m2 = red[0][1];
    for (int w = 1; w < kMergeWarps; ++w) {
      m1 += red[w][0];
      m2 += red[w][1];
    }
    const float M = static_cast<float>(m.cpg * m.S);
    m1 /= M;
    m2 /= M;
    bc[0] = -r * r * m2;
    bc[1] = -r * m1;
  }
  __syncthreads();
  for (int64_t ci = threadIdx.x; ci < m.cpg; ci += kMergeThreads) {
    const int64_t nc = n * m.C + g * m.cpg + ci;
    o.coef[kCQ * NC + nc] = bc[0];
    o.coef[kCR * NC + nc] = bc[1];
    o.coef[kCM * NC + nc] = mu;
    o.coef[kCK * NC + nc] = K;
  }
}

// grad weight / bias: per channel, the sum over n in order.
__global__ void __launch_bounds__(kMergeThreads, 2)
    gn_param_grads(const float* __restrict__ gwb, int64_t N, int64_t C, const ParamOut gw, const ParamOut gb) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (c >= C) return;
  if (gw.p != nullptr) {
    float s = 0.f;
    for (int64_t n = 0; n < N; ++n) s += gwb[n * C + c];
    stp(gw, c, s);
  }
  if (gb.p != nullptr) {
    float s = 0.f;
    for (int64_t n = 0; n < N; ++n) s += gwb[N * C + n * C + c];
    stp(gb, c, s);
  }
}

template <bool kSilu>
__device__ __forceinline__ float bwd_gx(float xv, float g, float a, float b, float P, float Q, float R, float K,
                                        float mrel) {
  const float d = xv - K;  // pivot frame, as bwd_acc
  const float gz = g * act_grad<kSilu>(a * d + b);
  return P * gz + Q * (d - mrel) + R;
}

template <typename T, bool kSilu, int W>
__device__ __forceinline__ void bapply_cf(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gx,
                                          const float* __restrict__ coef, const Plan& p) {
  using io = Io<T, W>;
  const CfPos q = cf_pos(p);
  if (!q.active) return;
  const int64_t NC = p.N * p.C;
  const float a = kSilu ? coef[kCA * NC + q.row] : 0.f, b = kSilu ? coef[kCB * NC + q.row] : 0.f;
  const float P = coef[kCP * NC + q.row], Q = coef[kCQ * NC + q.row], R = coef[kCR * NC + q.row],
              mu = coef[kCM * NC + q.row], K = coef[kCK * NC + q.row];
  const Span sp = cf_span<W>(p, q.row, q.k);
  const T* xv = x + sp.e0 + sp.head;
  const T* gv = gy + sp.e0 + sp.head;
  T* ov = gx + sp.e0 + sp.head;
  for (int v0 = 0; v0 < sp.nvec; v0 += p.TS * kItems) {
    typename io::raw rx[kItems], rg[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = v0 + i * p.TS + q.rank;
      if (v < sp.nvec) {
        rx[i] = io::load(xv + static_cast<int64_t>(v) * W);
        rg[i] = io::load(gv + static_cast<int64_t>(v) * W);
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = v0 + i * p.TS + q.rank;
      if (v < sp.nvec) {
        float fx[W], fg[W];
        io::cvt(rx[i], fx);
        io::cvt(rg[i], fg);
#pragma unroll
        for (int j = 0; j < W; ++j) fx[j] = bwd_gx<kSilu>(fx[j], fg[j], a, b, P, Q, R, K, mu);
        io::store(ov + static_cast<int64_t>(v) * W, fx);
      }
    }
  }
  for (int j = q.rank; j < sp.head; j += p.TS) {
    const int64_t e = sp.e0 + j;
    gx[e] = static_cast<T>(bwd_gx<kSilu>(static_cast<float>(x[e]), static_cast<float>(gy[e]), a, b, P, Q, R, K, mu));
  }
  const int64_t et = sp.e0 + sp.head + static_cast<int64_t>(sp.nvec) * W;
  for (int j = q.rank; j < sp.tail; j += p.TS) {
    const int64_t e = et + j;
    gx[e] = static_cast<T>(bwd_gx<kSilu>(static_cast<float>(x[e]), static_cast<float>(gy[e]), a, b, P, Q, R, K, mu));
  }
}

template <typename T, bool kSilu, int W>
__device__ __forceinline__ void bapply_cl(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gx,
                                          const float* __restrict__ coef, const Plan& p) {
  using io = Io<T, W>;
  const ClPos q = cl_pos(p);
  if (!q.active) return;
  const int64_t NC = p.N * p.C, c0 = q.gcol * W;
  float a[W], b[W], P[W], Q[W], R[W], mu[W], K[W];
#pragma unroll
  for (int j = 0; j < W; ++j) {
    const int64_t nc = q.n * p.C + c0 + j;
    a[j] = kSilu ? coef[kCA * NC + nc] : 0.f;
    b[j] = kSilu ? coef[kCB * NC + nc] : 0.f;
    P[j] = coef[kCP * NC + nc];
    Q[j] = coef[kCQ * NC + nc];
    R[j] = coef[kCR * NC + nc];
    mu[j] = coef[kCM * NC + nc];
    K[j] = coef[kCK * NC + nc];
  }
  const int64_t off = (q.n * p.S + q.k * p.L) * p.C + c0;
  const T* xb = x + off;
  const T* gb = gy + off;
  T* ob = gx + off;
  for (int r0 = 0; r0 < q.nr; r0 += p.slots * kItems) {
    typename io::raw rx[kItems], rg[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int row = r0 + i * p.slots + q.slot;
      if (row < q.nr) {
        rx[i] = io::load(xb + static_cast<int64_t>(row) * p.C);
        rg[i] = io::load(gb + static_cast<int64_t>(row) * p.C);
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int row = r0 + i * p.slots + q.slot;
      if (row < q.nr) {
        float fx[W], fg[W];
        io::cvt(rx[i], fx);
        io::cvt(rg[i], fg);
#pragma unroll
        for (int j = 0; j < W; ++j) fx[j] = bwd_gx<kSilu>(fx[j], fg[j], a[j], b[j], P[j], Q[j], R[j], K[j], mu[j]);
        io::store(ob + static_cast<int64_t>(row) * p.C, fx);
      }
    }
  }
}

template <typename T, bool kSilu>
__global__ void __launch_bounds__(kThreads, 2)
    gn_bapply_cf(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gx,
                 const float* __restrict__ coef, const Plan p) {
  if (p.W == 1)
    bapply_cf<T, kSilu, 1>(gy, x, gx, coef, p);
  else
    bapply_cf<T, kSilu, vec_of<T>()>(gy, x, gx, coef, p);
}

template <typename T, bool kSilu>
__global__ void __launch_bounds__(kThreads, 2)
    gn_bapply_cl(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gx,
                 const float* __restrict__ coef, const Plan p) {
  if (p.W == 1)
    bapply_cl<T, kSilu, 1>(gy, x, gx, coef, p);
  else
    bapply_cl<T, kSilu, vec_of<T>()>(gy, x, gx, coef, p);
}

// ---- host ----------------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// float, half and bfloat16 only: double never reaches here (check_common), so it is not instantiated.
#define GN_DISPATCH(TYPE, NAME, ...)                                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)              \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)           \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

unsigned grid_of(int64_t n) {
  TORCH_CHECK(n > 0 && n <= std::numeric_limits<int32_t>::max(), "group_norm: grid of ", n, " CTAs");
  return static_cast<unsigned>(n);
}

// At least this many CTAs per SM when there is enough work: with 256-thread CTAs that keeps 16-64 KB of loads
// in flight per SM, enough for HBM, without cutting chunks so small that partials cost traffic.
constexpr int64_t kCtasPerSm = 4;

Plan make_plan(const at::Tensor& x, int64_t G, Layout layout, bool aligned) {
  Plan p{};
  p.N = x.size(0);
  p.C = x.size(1);
  p.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) p.S *= x.size(d);
  p.G = G;
  p.cpg = p.C / G;
  p.R = p.N * p.C;
  p.cl = layout == Layout::kChannelsLast;
  const int esize = static_cast<int>(x.element_size());
  const int vec = 16 / esize;
  const int64_t target = kCtasPerSm * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (!p.cl) {
    p.W = aligned ? vec : 1;
    const int64_t V = ceil_div(p.S, p.W);  // vectors per row, about
    // The smallest team that reads a row in <= kItems vectors per thread; rows longer than a CTA's worth
    // split into chunks of about kThreads * kItems vectors.
    int TS = 1;
    while (TS < kThreads && TS * kItems < V) TS *= 2;
    int64_t K = TS == kThreads ? ceil_div(V, kThreads * kItems) : 1;
    auto ctas = [&] { return ceil_div(p.R, kThreads / TS) * K; };
    while (ctas() < target) {  // too few CTAs: fewer rows per CTA, then shorter chunks (>= 1 vector a thread)
      if (TS < kThreads && TS < V)
        TS *= 2;
      else if (2 * K * kThreads <= V)
        K *= 2;
      else
        break;
    }
    p.L = ceil_div(ceil_div(p.S, K), p.W) * p.W;  // a multiple of W: chunk boundaries stay aligned
    p.K = ceil_div(p.S, p.L);
    p.TS = TS;
    p.ts_log = 0;
    while ((1 << p.ts_log) < TS) ++p.ts_log;
    p.RPC = kThreads / TS;
    p.threads = kThreads;
    p.grid = ceil_div(p.R, p.RPC) * p.K;
  } else {
    p.W = aligned && p.C % vec == 0 ? vec : 1;
    p.Vc = p.C / p.W;
    // Columns per CTA: >= 128 contiguous bytes of a row (a full cache line), the rest of the CTA in slots.
    const int64_t cb_target = imax<int64_t>(1, 128 / (p.W * esize));
    p.ncb = static_cast<int>(ceil_div(p.Vc, cb_target));
    p.Cb = static_cast<int>(ceil_div(p.Vc, p.ncb));
    p.slots = kThreads / p.Cb;
    p.threads = p.Cb * p.slots;
    TORCH_CHECK(p.Cb * p.W <= kMaxCtaChannels, "group_norm: internal error, ", p.Cb * p.W, " channels per CTA");
    // Tiles of up to 16 rows a thread, halved while the grid is small, but not below 32 rows: each tile
    // writes 8 bytes of partials per channel.
    int64_t Lr = imin<int64_t>(p.S, 16 * p.slots);
    auto ctas = [&] { return p.N * ceil_div(p.S, Lr) * p.ncb; };
    while (ctas() < target && Lr > 32) Lr = imax<int64_t>(32, Lr / 2);
    p.L = Lr;
    p.K = ceil_div(p.S, Lr);
    p.grid = p.N * p.K * p.ncb;
  }
  p.nck = p.N * p.C * p.K;
  // (n, c) and (n, group) indices are 32-bit in the kernels (element indices are 64-bit).
  TORCH_CHECK(p.R <= std::numeric_limits<int32_t>::max(), "group_norm: N * C = ", p.R, " exceeds 2^31 - 1");
  TORCH_CHECK(p.grid <= std::numeric_limits<int32_t>::max(), "group_norm: input too large (", p.grid, " CTAs)");
  return p;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

int dtype_code(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", t);
  }
  return kAbsent;
}

ParamIn param_in(const c10::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return {nullptr, 0, 0, kAbsent};
  return {t->const_data_ptr(), t->stride(0), t->dim() > 1 ? t->stride(1) : 0, dtype_code(t->scalar_type(), name)};
}

Fold fold_of(const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& b,
             const c10::optional<at::Tensor>& s, const c10::optional<at::Tensor>& t) {
  return {param_in(w, "weight"), param_in(b, "bias"), param_in(s, "scale"), param_in(t, "shift")};
}

void check_common(const at::Tensor& x, int64_t G, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& shift) {
  TORCH_CHECK(x.dim() >= 2, "x: expected (N, C, *spatial), got ", x.dim(), " dims");
  TORCH_CHECK(G > 0 && x.size(1) % G == 0, "num_groups: ", G, " must divide the ", x.size(1), " channels");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x: the CUDA kernels take float32, float16 and bfloat16, got ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1);
  check_param(weight, "weight", {C}, x);
  check_param(bias, "bias", {C}, x);
  check_param(scale, "scale", {N, C}, x);
  check_param(shift, "shift", {N, C}, x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cuda(const at::Tensor& x, int64_t G,
                                                               const c10::optional<at::Tensor>& weight,
                                                               const c10::optional<at::Tensor>& bias,
                                                               const c10::optional<at::Tensor>& scale,
                                                               const c10::optional<at::Tensor>& shift, double eps,
                                                               c10::string_view activation) {
  check_common(x, G, weight, bias, scale, shift);
  const int act_code = activation_code(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const Layout layout = nc_layout(x, "x");
  const int64_t N = x.size(0);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({N, G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N, G}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    mean.fill_(0.f);  // empty groups: zero mean, rstd of a zero variance (as on the CPU)
    rstd.fill_(static_cast<float>(1.0 / std::sqrt(eps)));
    return {y, mean, rstd};
  }
  const Plan p = make_plan(x, G, layout, aligned16(x) && aligned16(y));
  at::Tensor scratch = at::empty({2 * p.nck + 3 * p.R}, x.options().dtype(at::kFloat));
  float* part = scratch.data_ptr<float>();
  float* A = part + 2 * p.nck;
  float* B = A + p.R;
  float* Kc = B + p.R;  // the group pivot per (n, c)
  const Fold fo = fold_of(weight, bias, scale, shift);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  GN_DISPATCH(x.scalar_type(), "group_norm_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (p.cl)
      gn_stats_cl<scalar_t><<<grid_of(p.grid), p.threads, 0, stream>>>(xp, part, p);
    else
      gn_stats_cf<scalar_t><<<grid_of(p.grid), p.threads, 0, stream>>>(xp, part, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gn_merge_fwd<scalar_t><<<grid_of(N * G), kMergeThreads, 0, stream>>>(
        xp, part, mean.data_ptr<float>(), rstd.data_ptr<float>(), A, B, Kc, fo, merge_args(p, eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto apply = p.cl ? (act_code == 1 ? gn_apply_cl<scalar_t, true> : gn_apply_cl<scalar_t, false>)
                      : (act_code == 1 ? gn_apply_cf<scalar_t, true> : gn_apply_cf<scalar_t, false>);
    apply<<<grid_of(p.grid), p.threads, 0, stream>>>(xp, yp, A, B, Kc, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

at::Tensor param_f32(const c10::optional<at::Tensor>& p) {
  return p.has_value() ? p->to(at::kFloat).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& mean_in, const at::Tensor& rstd_in, int64_t G,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, c10::string_view activation) {
  check_common(x, G, weight, bias, scale, shift);
  TORCH_CHECK(grad_y_in.sizes() == x.sizes(), "grad_y: expected shape ", x.sizes(), ", got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.scalar_type() == x.scalar_type(), "grad_y: expected dtype ", x.scalar_type());
  TORCH_CHECK(grad_y_in.device() == x.device(), "grad_y: expected device ", x.device(), ", got ", grad_y_in.device());
  const int act_code = activation_code(activation);
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(mean_in.numel() == N * G && rstd_in.numel() == N * G, "mean/rstd: expected ", N * G, " values");
  TORCH_CHECK(mean_in.device() == x.device() && rstd_in.device() == x.device(), "mean/rstd: expected device ",
              x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const Layout layout = nc_layout(x, "x");
  // grad_y must share x's layout for the fused passes; copy only when it does not (as on the CPU).
  at::Tensor grad_y = grad_y_in.strides() == x.strides() ? grad_y_in : at::empty_like(x).copy_(grad_y_in);
  at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  at::Tensor gx = at::empty_like(x);
  // an absent parameter's gradient: a new (0,) tensor each time (outputs must not alias one another)
  auto empty = [&] { return at::empty({0}, x.options()); };

  if (x.numel() == 0) {  // nothing to reduce: the CPU file's parameter-gradient math on zero sums
    const int64_t cpg = C / G;
    at::Tensor S1 = at::zeros({N, C}, x.options().dtype(at::kFloat)), S2 = at::zeros_like(S1);
    at::Tensor w = param_f32(weight), b = param_f32(bias), s = param_f32(scale);
    at::Tensor xhat_sum = S2 * rstd.reshape({N, G}).repeat_interleave(cpg, 1);
    at::Tensor one_s = s.defined() ? 1 + s : at::ones({N, C}, S1.options());
    at::Tensor g_w = weight.has_value() ? (one_s * xhat_sum).sum(0).to(weight->scalar_type()) : empty();
    at::Tensor g_b = bias.has_value() ? (one_s * S1).sum(0).to(bias->scalar_type()) : empty();
    at::Tensor g_s = empty(), g_t = empty();
    if (scale.has_value()) {
      at::Tensor h = w.defined() ? xhat_sum * w : xhat_sum;
      if (b.defined()) h = h + S1 * b;
      g_s = h.to(scale->scalar_type());
    }
    if (shift.has_value()) g_t = S1.to(shift->scalar_type());
    return {gx, g_w, g_b, g_s, g_t};
  }

  const Plan p = make_plan(x, G, layout, aligned16(x) && aligned16(grad_y) && aligned16(gx));
  const bool need_wb = weight.has_value() || bias.has_value();
  const int64_t NC = p.R;
  at::Tensor scratch =
      at::empty({2 * p.nck + kNumCoef * NC + (need_wb ? 2 * NC : 0)}, x.options().dtype(at::kFloat));
  float* part = scratch.data_ptr<float>();
  float* coef = part + 2 * p.nck;
  float* gwb = need_wb ? coef + kNumCoef * NC : nullptr;
  at::Tensor g_w = weight.has_value() ? at::empty({C}, weight->options()) : empty();
  at::Tensor g_b = bias.has_value() ? at::empty({C}, bias->options()) : empty();
  at::Tensor g_s = scale.has_value() ? at::empty({N, C}, scale->options()) : empty();
  at::Tensor g_t = shift.has_value() ? at::empty({N, C}, shift->options()) : empty();
  auto out = [](const c10::optional<at::Tensor>& param, at::Tensor& t, const char* name) -> ParamOut {
    return param.has_value() ? ParamOut{t.data_ptr(), dtype_code(t.scalar_type(), name)} : ParamOut{nullptr, kAbsent};
  };
  const BwdOut bo{coef, gwb, out(scale, g_s, "scale"), out(shift, g_t, "shift")};
  const Fold fo = fold_of(weight, bias, scale, shift);
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  GN_DISPATCH(x.scalar_type(), "group_norm_backward_cuda", [&] {
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    auto sums = p.cl ? (act_code == 1 ? gn_bsums_cl<scalar_t, true> : gn_bsums_cl<scalar_t, false>)
                     : (act_code == 1 ? gn_bsums_cf<scalar_t, true> : gn_bsums_cf<scalar_t, false>);
    sums<<<grid_of(p.grid), p.threads, 0, stream>>>(gp, xp, mp, rp, fo, part, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gn_merge_bwd<scalar_t><<<grid_of(N * G), kMergeThreads, 0, stream>>>(xp, part, mp, rp, fo, bo, merge_args(p, 0.0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto apply = p.cl ? (act_code == 1 ? gn_bapply_cl<scalar_t, true> : gn_bapply_cl<scalar_t, false>)
                      : (act_code == 1 ? gn_bapply_cf<scalar_t, true> : gn_bapply_cf<scalar_t, false>);
    apply<<<grid_of(p.grid), p.threads, 0, stream>>>(gp, xp, gx.data_ptr<scalar_t>(), coef, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (need_wb) {
    gn_param_grads<<<grid_of(ceil_div(C, kMergeThreads)), kMergeThreads, 0, stream>>>(
        gwb, N, C, out(weight, g_w, "weight"), out(bias, g_b, "bias"));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {gx, g_w, g_b, g_s, g_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("group_norm", &group_norm_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
}

}  // namespace fastdiff
