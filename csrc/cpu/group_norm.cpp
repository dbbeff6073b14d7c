// GroupNorm + AdaGN scale/shift + SiLU on the CPU.
//
// Algorithm (both layouts): (1) per-channel statistics of x - K (K: the group's pivot, see
// common/group_norm.h) over the spatial extent, each chunk read once and its (mean, M2) computed in one pass
// around a pivot taken inside the chunk (row_stats, rows_stats say why that keeps the digits), chunks merged
// with Chan's formula; (2) channels merged into per-(n, group) mean/rstd and
// folded with the affine and AdaGN parameters into one (A, B) per (n, c); (3) y = act(A (x - K) + B) in one
// vectorised pass.
// Cost: reads x twice (once for statistics, once to apply), writes y once. Parallel over rows (NCHW) or
// row chunks (channels-last), with a fixed reduction order, so results are bit-identical run to run.
// Backward: one pass reducing S1, S2 per (n, c), a tiny per-(n, c) fold, one pass writing grad_x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "common/check.h"
#include "common/group_norm.h"
#include "cpu/vec.h"

namespace fastdiff {
namespace {

// exp for the SiLU, branch-free so the loops vectorise (Cody-Waite range reduction, degree-6 polynomial,
// about 2 ulp on [-87, 88]).
inline float exp_f(float x) {
  x = x > 88.f ? 88.f : x;  // ternaries, not std::min/max: they if-convert (with -fno-trapping-math)
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504088896341f + 12582912.f;  // round(x * log2 e) via the 1.5 * 2^23 trick
  const float n = t - 12582912.f;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  const int32_t ni = ti - 0x4B400000;
  float r = x - n * 0.693145751953125f;
  r -= n * 1.428606765330187045e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// SiLU and sigmoid on top of exp_f, branch-free. Below z = -88 the true values are under 1e-36 and are returned as
// 0: exp_f clamps its argument at 88, and z / (1 + e^88) would be far off for z near -FLT_MAX. NaN stays NaN.
inline float silu_f(float z) {
  const float v = z / (1.f + exp_f(-z));
  return z < -88.f ? 0.f : v;
}

inline float sigmoid_f(float z) {
  const float v = 1.f / (1.f + exp_f(-z));
  return z < -88.f ? 0.f : v;
}

#if FASTDIFF_AVX512
// The SiLU is what bounds the apply pass (the data stays in L2), so its instruction count is the cost.
// silu(z) = z / (1 + 2^u) with u = -z log2(e) formed by the caller with its own FMA (from x - K, so no extra
// rounding of z enters u): 2^u = 2^floor(u) 2^f with f = u - floor(u) in [0, 1) taken by one vreduceps, 2^f by
// a degree-5 polynomial, the scaling by vscalefps (which applies 2^floor(u) itself, so floor(u) is never
// formed), and one correctly rounded division (the divider runs beside the FMA pipes: 24% faster than a 14-bit
// reciprocal with a Newton step and a mask, in a microbenchmark on Zen 4). The limits need no special lanes:
// vreduceps gives 0 for u = +-inf, so z = +inf gives 2^u = 0 and silu = +inf; where 2^u overflows (z < -88.7,
// true result below 3e-37) the quotient is -0; a NaN z stays NaN; z = -inf gives NaN, as torch's silu does.
// 1 + 2^u, for silu16 and silu_grad16.
inline __m512 one_plus_exp2(__m512 u) {
  const __m512 f = _mm512_reduce_ps(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  // 2^f on [0, 1): degree-5 polynomial with p(0) = 1, fitted for the least maximum relative error (6.8e-8 in
  // exact arithmetic, 1.6e-7 evaluated in fp32 by Horner's rule, where the fp32 rounding of values in [1, 2)
  // alone is up to 6e-8)
  __m512 p = _mm512_set1_ps(1.8737094942480326e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.000674821436405e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.58142326772213e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40159273147583e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931519508361816e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_add_ps(_mm512_scalef_ps(p, u), _mm512_set1_ps(1.f));
}

inline __m512 silu16(__m512 z, __m512 u) { return _mm512_div_ps(z, one_plus_exp2(u)); }

// silu'(z) = s (1 + z (1 - s)), s = sigmoid(z) = 1 / (1 + 2^u): 0 where 2^u overflows (z < -88.7), NaN at
// z = +-inf (inf times 0), as torch's derivative gives.
inline __m512 silu_grad16(__m512 z, __m512 u) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 sg = _mm512_div_ps(one, one_plus_exp2(u));
  return _mm512_mul_ps(sg, _mm512_fmadd_ps(z, _mm512_sub_ps(one, sg), one));
}

constexpr float kLog2e = 1.44269504088896341f;

// y[i] = act(a (x[i] - K) + b) for n values (fp32, fp16 or bf16; the math in fp32), K one value: a, b one value
// each (kVec = false), or per-value fp32 arrays (kVec = true) with ua, ub = -log2(e) a, b beside them. prefetch: n
// values to bring into L2 meanwhile (one prefetch per 16 values), or nullptr. kStream: the full vectors of y by
// non-temporal stores. tick(): called after each full vector (other work to interleave with this loop's).
struct NoTick {
  void operator()() const {}
};

template <bool kSilu, bool kVec, bool kStream = false, typename T, typename Tick = NoTick>
inline void apply_vec(const T* x, T* y, int64_t n, const float* a, const float* b, float K,
                      const T* prefetch = nullptr, const float* ua_v = nullptr, const float* ub_v = nullptr,
                      Tick tick = Tick{}) {
  __m512 va = _mm512_set1_ps(a[0]), vb = _mm512_set1_ps(b[0]);
  __m512 ua = _mm512_set1_ps(-a[0] * kLog2e), ub = _mm512_set1_ps(-b[0] * kLog2e);
  const __m512 vk = _mm512_set1_ps(K);
  auto step = [&](int64_t i, __mmask16 m) {
    if constexpr (kVec) {
      va = _mm512_maskz_loadu_ps(m, a + i);
      vb = _mm512_maskz_loadu_ps(m, b + i);
      if constexpr (kSilu) {
        ua = _mm512_maskz_loadu_ps(m, ua_v + i);
        ub = _mm512_maskz_loadu_ps(m, ub_v + i);
      }
    }
    if (prefetch != nullptr) _mm_prefetch(reinterpret_cast<const char*>(prefetch + i), _MM_HINT_T1);
    const __m512 d = _mm512_sub_ps(load16(x + i, m), vk);
    const __m512 z = _mm512_fmadd_ps(va, d, vb);
    store16<kStream>(y + i, kSilu ? silu16(z, _mm512_fmadd_ps(ua, d, ub)) : z, m);
  };
  int64_t i = 0;
  if (kStream) {  // a partial vector up to y's first vector-aligned address, so the full vectors can be streamed
    constexpr uintptr_t kBytes = 16 * sizeof(T);
    const int64_t head =
        std::min<int64_t>(n, ((kBytes - (reinterpret_cast<uintptr_t>(y) & (kBytes - 1))) & (kBytes - 1)) / sizeof(T));
    if (head > 0) step(0, lane_mask(head));
    i = head;
  }
  for (; i + 16 <= n; i += 16) {
    step(i, 0xffff);
    tick();
  }
  if (i < n) step(i, lane_mask(n - i));
}

// Channel rows shorter than this (S values) are applied by apply_short_rows, not by the per-block row loop
// (measured on Zen 4 against that loop: 1x1 1.48x, 2x2 1.08x, 3x3 0.90-0.94x, 4x4 0.84-0.94x, 5x5 0.68x).
constexpr int64_t kShortRow = 5;
constexpr int64_t kExpand = 1024;  // values per expanded chunk of apply_short_rows (4 x 4 KB of parameters, in L1)

// y = act(a[r] (x - K) + b[r]) over `rows` contiguous channel rows of S < kShortRow values each (one (n, group)
// block of a channels-first input with a small map, 1x1 to 2x2, or no spatial dims at all): a call per row would
// cost more than its few values, so one vector loop runs across the row boundaries, on the parameters themselves
// where S = 1, else on each row's parameters broadcast over its S values into L1 buffers, kExpand values at a
// time. p: a, b, ua = -log2(e) a, ub = -log2(e) b, `rows` values each.
template <typename T, bool kSilu, bool kStream>
void apply_short_rows(const T* x, T* y, int64_t rows, int64_t S, const float* p, float K, const T* prefetch) {
  const float *a = p, *b = p + rows, *ua = p + 2 * rows, *ub = p + 3 * rows;
  if (S == 1) {
    apply_vec<kSilu, true, kStream>(x, y, rows, a, b, K, prefetch, ua, ub);
    return;
  }
  alignas(64) float av[kExpand], bv[kExpand], uav[kExpand], ubv[kExpand];
  const int64_t per = std::max<int64_t>(1, kExpand / S);  // rows per chunk
  for (int64_t r0 = 0; r0 < rows; r0 += per) {
    const int64_t r1 = std::min(rows, r0 + per);
    int64_t n = 0;
    for (int64_t r = r0; r < r1; ++r, n += S) {
      const __m512 va = _mm512_set1_ps(a[r]), vb = _mm512_set1_ps(b[r]);
      const __m512 vua = _mm512_set1_ps(ua[r]), vub = _mm512_set1_ps(ub[r]);
      for (int64_t s = 0; s < S; s += 16) {
        const __mmask16 m = lane_mask(S - s);
        _mm512_mask_storeu_ps(av + n + s, m, va);
        _mm512_mask_storeu_ps(bv + n + s, m, vb);
        if (kSilu) {
          _mm512_mask_storeu_ps(uav + n + s, m, vua);
          _mm512_mask_storeu_ps(ubv + n + s, m, vub);
        }
      }
    }
    apply_vec<kSilu, true, kStream>(x + r0 * S, y + r0 * S, n, av, bv, K, prefetch ? prefetch + r0 * S : nullptr,
                                    uav, ubv);
  }
}

// apply_short_rows for the activation and store kind chosen at run time.
template <typename T>
auto apply_short_rows_fn(bool silu, bool stream) {
  return silu ? (stream ? apply_short_rows<T, true, true> : apply_short_rows<T, true, false>)
              : (stream ? apply_short_rows<T, false, true> : apply_short_rows<T, false, false>);
}

// Sums of d = x - pivot and of d^2 over n fp32 values in one pass, four accumulators each (the loop is otherwise
// bound by the add latency).
template <typename T>
inline void chunk_sums(const T* x, int64_t n, float pivot, float& sum_out, float& sq_out) {
  const __m512 pv = _mm512_set1_ps(pivot);
  __m512 s[4], q[4];
  for (int k = 0; k < 4; ++k) s[k] = q[k] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int k = 0; k < 4; ++k) {
      const __m512 d = _mm512_sub_ps(load16(x + i + 16 * k), pv);
      s[k] = _mm512_add_ps(s[k], d);
      q[k] = _mm512_fmadd_ps(d, d, q[k]);
    }
  for (; i < n; i += 16) {
    const __mmask16 m = lane_mask(n - i);
    const __m512 d = _mm512_maskz_sub_ps(m, load16(x + i, m), pv);
    s[0] = _mm512_add_ps(s[0], d);
    q[0] = _mm512_fmadd_ps(d, d, q[0]);
  }
  sum_out = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
  sq_out = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(q[0], q[1]), _mm512_add_ps(q[2], q[3])));
}

// Channels-last statistics of one chunk of `rows` rows of C values (rows <= kOnePassRows; fp32, fp16 or bf16,
// summed in fp32): per channel, the mean relative to the pivot K[c] and the M2. One pass in memory order (the
// hardware prefetchers see one sequential stream; walking the chunk 64 channels at a time, row stride C, was
// 1.6-2x slower on this Zen 4), eight rows per sweep along a block of up to kAccC channels whose running sums wait
// in L1. Sums of d = x - P and d^2 with P the channel's value in the chunk's first row,
// M2 = sum d^2 - (sum d)^2 / rows: as P is one of the values, (P - mean)^2 <= M2, so the subtraction loses at most
// a factor rows + 1 of precision (7.7e-6 relative at 128 rows).
constexpr int64_t kOnePassRows = 128;
constexpr int64_t kAccC = 512;

template <typename T>
inline void rows_stats(const T* p, int64_t rows, int64_t C, const float* K, float* mean_out, float* m2_out) {
  alignas(64) float acc[kAccC], sq[kAccC];
  const __m512 inv = _mm512_set1_ps(1.f / static_cast<float>(rows));
  for (int64_t c0 = 0; c0 < C; c0 += kAccC) {
    const int64_t cn = std::min(kAccC, C - c0);
    const T* q = p + c0;
    for (int64_t c = 0; c < cn; c += 16) {
      _mm512_store_ps(acc + c, _mm512_setzero_ps());
      _mm512_store_ps(sq + c, _mm512_setzero_ps());
    }
    // rows r0 .. r1 - 1 into the running sums, 16 channels at a time (two sets of sums: two add chains)
    auto sweep = [&](int64_t r0, int64_t r1) {
      for (int64_t c = 0; c < cn; c += 16) {
        const __mmask16 m = lane_mask(cn - c);
        const __m512 pv = load16(q + c, m);
        __m512 a0 = _mm512_load_ps(acc + c), s0 = _mm512_load_ps(sq + c);
        __m512 a1 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        int64_t r = r0;
        for (; r + 2 <= r1; r += 2) {
          const __m512 d0 = _mm512_maskz_sub_ps(m, load16(q + r * C + c, m), pv);
          const __m512 d1 = _mm512_maskz_sub_ps(m, load16(q + (r + 1) * C + c, m), pv);
          a0 = _mm512_add_ps(a0, d0);
          a1 = _mm512_add_ps(a1, d1);
          s0 = _mm512_fmadd_ps(d0, d0, s0);
          s1 = _mm512_fmadd_ps(d1, d1, s1);
        }
        if (r < r1) {
          const __m512 d0 = _mm512_maskz_sub_ps(m, load16(q + r * C + c, m), pv);
          a0 = _mm512_add_ps(a0, d0);
          s0 = _mm512_fmadd_ps(d0, d0, s0);
        }
        _mm512_store_ps(acc + c, _mm512_add_ps(a0, a1));
        _mm512_store_ps(sq + c, _mm512_add_ps(s0, s1));
      }
    };
    for (int64_t r = 0; r < rows; r += 8) sweep(r, std::min(rows, r + 8));
    for (int64_t c = 0; c < cn; c += 16) {
      const __mmask16 m = lane_mask(cn - c);
      const __m512 a = _mm512_load_ps(acc + c), rel = _mm512_mul_ps(a, inv);
      const __m512 pk = _mm512_sub_ps(load16(q + c, m), _mm512_maskz_loadu_ps(m, K + c0 + c));
      _mm512_mask_storeu_ps(mean_out + c0 + c, m, _mm512_add_ps(pk, rel));
      _mm512_mask_storeu_ps(m2_out + c0 + c, m,
                            _mm512_max_ps(_mm512_fnmadd_ps(a, rel, _mm512_load_ps(sq + c)), _mm512_setzero_ps()));
    }
  }
}
#endif

constexpr int64_t kChunk = 2048;        // elements per statistics chunk (channels-first)
constexpr int64_t kClaimValues = 16384; // values per claim of the channels-first per-group path
constexpr int64_t kPerChannelGrain = 16384;  // (n, c) per task of the per-channel folds, run in parallel from there
constexpr int64_t kRowBytes = 32768;    // bytes per row chunk (channels-last)
constexpr int64_t kStatsValues = 40960; // values per row chunk of the AVX-512 channels-last statistics (160 KB of
                                        // fp32; counted in values so fp16/bf16 chunk exactly as fp32 does)

// Rows per chunk of the AVX-512 channels-last statistics at C channels (channel_stats and the per-sample path of
// group_norm_cpu chunk alike, so their results are bit-identical).
#if FASTDIFF_AVX512
constexpr int64_t stats_chunk_rows(int64_t C) { return std::clamp<int64_t>(kStatsValues / C, 1, kOnePassRows); }
#endif

struct Shape {
  int64_t N, C, S, G, cpg;
  Layout layout;
};

Shape shape_of(const at::Tensor& x, int64_t G) {
  Shape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.S = 1;
  for (int64_t i = 2; i < x.dim(); ++i) s.S *= x.size(i);
  s.G = G;
  s.cpg = s.C / G;
  s.layout = nc_layout(x, "x");
  return s;
}

// An optional parameter, weight/bias (C,) or scale/shift (N, C), read in place when it is fp32 (any strides: the
// scale and shift that a Linear's output .chunk(2, dim=1) gives are not contiguous, and copying them cost more
// than a small call's kernel), else converted to fp32 once. at() gives dflt for an absent one.
struct Param {
  at::Tensor keep;  // the fp32 tensor read (a converted copy, or the argument)
  const float* p = nullptr;
  int64_t s0 = 0, s1 = 0;  // element strides of dims 0 and 1
  float at(int64_t c, float dflt) const { return p ? p[c * s0] : dflt; }
  float at(int64_t n, int64_t c, float dflt) const { return p ? p[n * s0 + c * s1] : dflt; }
};

Param param_f32(const c10::optional<at::Tensor>& t) {
  Param r;
  if (!t.has_value()) return r;
  r.keep = t->scalar_type() == at::kFloat ? *t : t->to(at::kFloat);
  r.p = r.keep.const_data_ptr<float>();
  r.s0 = r.keep.stride(0);
  r.s1 = r.keep.dim() > 1 ? r.keep.stride(1) : 0;
  return r;
}

#if FASTDIFF_AVX512
// Values c .. c + 15 (the lanes in m) of an optional parameter along its channel dim: off is the element offset of
// the first one, stride the channel stride; dflt where the parameter is absent.
inline __m512 param16(const Param& p, int64_t off, int64_t stride, __mmask16 m, float dflt) {
  if (p.p == nullptr) return _mm512_set1_ps(dflt);
  if (stride == 1) return _mm512_maskz_loadu_ps(m, p.p + off);
  alignas(64) float v[16] = {};
  for (int i = 0; i < 16; ++i)
    if (m >> i & 1) v[i] = p.p[off + i * stride];
  return _mm512_load_ps(v);
}

// gn_fold for the cpg channels c0 .. of sample n, 16 at a time, with the group's rstd r and mean mu in the pivot's
// frame: a_out, b_out receive a and b - a mu, ua_out, ub_out (when not null) -log2(e) times each, cpg values each.
inline void fold_block(const Param& w, const Param& b, const Param& s, const Param& t, int64_t n, int64_t c0,
                       int64_t cpg, float r, float mu, float* a_out, float* b_out, float* ua_out, float* ub_out) {
  const __m512 vr = _mm512_set1_ps(r), vmu = _mm512_set1_ps(mu), nl2e = _mm512_set1_ps(-kLog2e);
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < cpg; i += 16) {
    const __mmask16 m = lane_mask(cpg - i);
    const int64_t c = c0 + i;
    const __m512 k = _mm512_add_ps(one, param16(s, n * s.s0 + c * s.s1, s.s1, m, 0.f));
    const __m512 a = _mm512_mul_ps(_mm512_mul_ps(vr, param16(w, c * w.s0, w.s0, m, 1.f)), k);
    const __m512 b0 =
        _mm512_fmadd_ps(param16(b, c * b.s0, b.s0, m, 0.f), k, param16(t, n * t.s0 + c * t.s1, t.s1, m, 0.f));
    const __m512 bb = _mm512_fnmadd_ps(a, vmu, b0);
    _mm512_mask_storeu_ps(a_out + i, m, a);
    _mm512_mask_storeu_ps(b_out + i, m, bb);
    if (ua_out != nullptr) {
      _mm512_mask_storeu_ps(ua_out + i, m, _mm512_mul_ps(a, nl2e));
      _mm512_mask_storeu_ps(ub_out + i, m, _mm512_mul_ps(bb, nl2e));
    }
  }
}
#endif

// The portable passes (the build without AVX-512) work on blocks of kBlock values: convert to fp32, do the math
// on the fp32 block, convert back. Keeping dtype conversion out of the math loops lets every math loop
// vectorise, the SiLU's exp included.
constexpr int64_t kBlock = 512;


template <typename T>
inline void to_f32(const T* p, float* o, int64_t n) {
#if FASTDIFF_AVX512
  to_float(p, o, n);
#else
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(p[i]);
#endif
}

// o = p - K: the input in its group pivot's frame (exact for values near K).
template <typename T>
inline void to_f32(const T* p, float* o, int64_t n, float K) {
#if FASTDIFF_AVX512
  const __m512 k = _mm512_set1_ps(K);
  for_vectors(n, [&](int64_t i, __mmask16 m) { store16(o + i, _mm512_sub_ps(load16(p + i, m), k), m); });
#else
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(p[i]) - K;
#endif
}

template <typename T>
inline void to_f32(const T* p, float* o, int64_t n, const float* K) {
#if FASTDIFF_AVX512
  for_vectors(n, [&](int64_t i, __mmask16 m) { store16(o + i, _mm512_sub_ps(load16(p + i, m), load16(K + i, m)), m); });
#else
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(p[i]) - K[i];
#endif
}

template <typename T>
inline void from_f32(const float* v, T* p, int64_t n) {
#if FASTDIFF_AVX512
  from_float(v, p, n);
#else
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(v[i]);
#endif
}

// z <- a z + b (scalar a, b), then the activation, in place.
template <bool kSilu>
inline void affine_act(float* z, int64_t n, float a, float b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) z[i] = a * z[i] + b;
  if (kSilu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) z[i] = silu_f(z[i]);
  }
}

// z <- a[i] z + b[i] (per-channel a, b), then the activation, in place.
template <bool kSilu>
inline void affine_act(float* z, int64_t n, const float* a, const float* b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) z[i] = a[i] * z[i] + b[i];
  if (kSilu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) z[i] = silu_f(z[i]);
  }
}

// g <- g * act'(a x + b): dL/dz from dL/dy.
template <bool kSilu, typename AB>
inline void act_backward(const float* x, float* g, int64_t n, AB a, AB b) {
  if (!kSilu) return;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float ai, bi;
    if constexpr (std::is_pointer_v<AB>) {
      ai = a[i];
      bi = b[i];
    } else {
      ai = a;
      bi = b;
    }
    const float z = ai * x[i] + bi;
    const float s = sigmoid_f(z);
    g[i] *= s * (1.f + z * (1.f - s));
  }
}

// (mean, M2) of one contiguous row of S values, in the frame of the pivot K (see channel_stats). One pass per
// chunk of kChunk values: sums of d = x - P and d^2, with the chunk's own pivot P close to the mean (the running
// mean of the chunks before it; for the first chunk the mean of its first 16 values), so the chunk's
// M2 = sum d^2 - (sum d)^2 / n loses no digits; chunks are merged with Chan's formula.
// The pivot of a row's chunk at s0 (len values), as an offset from K: the mean of the first 16 values for the
// first chunk, else mu, the running mean of the chunks before it.
template <typename T>
inline float chunk_pivot_rel(const T* p, int64_t s0, int64_t len, float K, float mu) {
  if (s0 != 0) return mu;
  const int64_t m = std::min<int64_t>(len, 16);
  float acc = 0.f;
  for (int64_t i = 0; i < m; ++i) acc += static_cast<float>(p[i]) - K;
  return acc / static_cast<float>(m);
}

// Merges a chunk of len values with sums `sum` of d = x - pivot and `sq` of d^2 into the row's (n, mu, m2).
inline void merge_chunk(float& n, float& mu, float& m2, int64_t len, float pivot, float K, float sum, float sq) {
  const float rel = sum / static_cast<float>(len);
  // sq = inf (|x| >~ 1e19 in fp32): the M2 is inf, not inf - inf = NaN (std::max keeps a NaN), so rstd is 0
  // as torch's is
  chan_merge(n, mu, m2, static_cast<float>(len), (pivot - K) + rel,
             std::isinf(sq) ? sq : std::max(sq - sum * rel, 0.f));
}

template <typename T>
inline void row_stats(const T* p, int64_t S, float K, float& mean_out, float& m2_out) {
  float n = 0.f, mu = 0.f, m2 = 0.f;
  for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
    const int64_t len = std::min(S - s0, kChunk);
    const float pivot = K + chunk_pivot_rel(p, s0, len, K, mu);
    float sum = 0.f, sq = 0.f;
#if FASTDIFF_AVX512
    chunk_sums(p + s0, len, pivot, sum, sq);
#else
#pragma omp simd reduction(+ : sum, sq)
    for (int64_t i = 0; i < len; ++i) {
      const float d = static_cast<float>(p[s0 + i]) - pivot;
      sum += d;
      sq += d * d;
    }
#endif
    merge_chunk(n, mu, m2, len, pivot, K, sum, sq);
  }
  mean_out = mu;
  m2_out = m2;
}

#if FASTDIFF_AVX512
// row_stats of one block done a little at a time, so that it can run inside the apply loop of the block before it:
// step() is one iteration of chunk_sums' loop (64 values, or a 16-value tail step) or a chunk's merge. The same
// operations in the same order as row_stats, and both ways of running a block (step() from another block's apply
// loop, or finish() alone) go through the same code, so a block's statistics are bit-identical whichever way and
// whichever thread computes them. The chunk boundaries are out of line: once per kChunk values.
template <typename T>
struct StatsCursor {
  const T* p = nullptr;
  int64_t total = 0, s0 = 0, i = 0, len = 0;
  float K = 0.f, n = 0.f, mu = 0.f, m2 = 0.f, pivot = 0.f;
  __m512 pv, s[4], q[4];

  void start(const T* p_, int64_t total_, float K_) {
    p = p_;
    total = total_;
    K = K_;
    s0 = 0;
    n = mu = m2 = 0.f;
    if (total > 0) begin_chunk();
  }
  bool active() const { return s0 < total; }
  [[gnu::noinline]] void begin_chunk() {
    len = std::min(total - s0, kChunk);
    i = 0;
    pivot = K + chunk_pivot_rel(p, s0, len, K, mu);
    pv = _mm512_set1_ps(pivot);
    for (int k = 0; k < 4; ++k) s[k] = q[k] = _mm512_setzero_ps();
  }
  [[gnu::noinline]] void end_chunk() {
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
    const float sq = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(q[0], q[1]), _mm512_add_ps(q[2], q[3])));
    merge_chunk(n, mu, m2, len, pivot, K, sum, sq);
    s0 += len;
    if (s0 < total) begin_chunk();
  }
  // One unit of work; only while active().
  inline void step() {
    const T* x = p + s0 + i;
    if (i + 64 <= len) {
      for (int k = 0; k < 4; ++k) {
        const __m512 d = _mm512_sub_ps(load16(x + 16 * k), pv);
        s[k] = _mm512_add_ps(s[k], d);
        q[k] = _mm512_fmadd_ps(d, d, q[k]);
      }
      i += 64;
    } else if (i < len) {
      const __mmask16 m = lane_mask(len - i);
      const __m512 d = _mm512_maskz_sub_ps(m, load16(x, m), pv);
      s[0] = _mm512_add_ps(s[0], d);
      q[0] = _mm512_fmadd_ps(d, d, q[0]);
      i += 16;
    } else {
      end_chunk();
    }
  }
  void finish(float& mean_out, float& m2_out) {
    while (active()) step();
    mean_out = mu;
    m2_out = m2;
  }
};
#endif

// y = act(a (x - K) + b) over one contiguous row of S values.
template <typename T, bool kSilu, bool kStream = false>
inline void apply_row(const T* x, T* y, int64_t S, float a, float b, float K, const T* prefetch = nullptr) {
#if FASTDIFF_AVX512
  apply_vec<kSilu, false, kStream>(x, y, S, &a, &b, K, prefetch);
#else
  float buf[kBlock];
  for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
    const int64_t n = std::min(kBlock, S - s0);
    if constexpr (std::is_same_v<T, float>) {  // no conversion: one pass straight from x to y
      const float* p = x + s0;
      float* q = y + s0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float z = a * (p[i] - K) + b;
        q[i] = kSilu ? silu_f(z) : z;
      }
      continue;
    }
    to_f32(x + s0, buf, n, K);
    affine_act<kSilu>(buf, n, a, b);
    from_f32(buf, y + s0, n);
  }
#endif
}

// apply_row for the activation and store kind chosen at run time.
template <typename T>
auto apply_row_fn(bool silu, bool stream) {
  return silu ? (stream ? apply_row<T, true, true> : apply_row<T, true, false>)
              : (stream ? apply_row<T, false, true> : apply_row<T, false, false>);
}

// Merges a channels-last chunk of `len` rows (per-channel mean pmu, in the pivots' frame, and M2 pq) into the
// running mu, m2 of the `cnt` rows before it: Chan's formula, with scalar weights (every channel has the chunk's
// count), lane by lane.
inline void merge_rows_chunk(float* mu, float* m2, const float* pmu, const float* pq, int64_t C, float cnt,
                             float len) {
  const float nn = cnt + len, f = len / nn;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float d = pmu[c] - mu[c];
    mu[c] += d * f;
    m2[c] += pq[c] + d * (d * (cnt * f));  // (cnt f) first: 0 for the first chunk, even where d * d overflows
  }
}

// Per-channel (mean, M2) of x - K over the spatial extent (count S for every channel), where K = Kc[n, c] is
// the pivot of the channel's group. Within each chunk, values are taken relative to the chunk's first value
// and the chunk mean is moved to K's frame exactly ((pivot - K) is exact for nearby values): with
// |mean| >> std no digit of the spread is rounded away, so neither the variance nor the mean loses precision.
template <typename T>
void channel_stats(const T* x, const Shape& sh, const float* Kc, float* cmean, float* cm2) {
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  if (sh.layout == Layout::kChannelsFirst) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) row_stats(x + row * S, S, Kc[row], cmean[row], cm2[row]);
    });
    return;
  }
  // Channels-last: rows of C contiguous values. Chunks of R rows give per-channel partials, vectorised
  // along C; the partials of one (n, c) are then merged in chunk order.
  // (with AVX-512: rows_stats's one pass, up to kOnePassRows rows of about kStatsValues per chunk)
#if FASTDIFF_AVX512
  const int64_t R = stats_chunk_rows(C);
#else
  const int64_t R = std::max<int64_t>(1, kRowBytes / (C * static_cast<int64_t>(sizeof(T))));
#endif
  const int64_t nchunk = (S + R - 1) / R;
  std::vector<float> pmean(N * nchunk * C), pm2(N * nchunk * C);
  at::parallel_for(0, N * nchunk, 1, [&](int64_t b, int64_t e) {
    std::vector<float> sum(C), pivot(C), rel(C);
    for (int64_t job = b; job < e; ++job) {
      const int64_t n = job / nchunk, k = job % nchunk;
      const int64_t r0 = k * R, r1 = std::min(S, r0 + R);
      const T* p = x + (n * S + r0) * C;
      float* mean_out = pmean.data() + job * C;
      float* m2_out = pm2.data() + job * C;
      const float* K = Kc + n * C;
#if FASTDIFF_AVX512
      rows_stats(p, r1 - r0, C, K, mean_out, m2_out);
      continue;
#endif
      // per-channel sums of (x - pivot), pivot = the chunk's first row
      to_f32(p, pivot.data(), C);
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t r = 0; r < r1 - r0; ++r) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<float>(p[r * C + c]) - pivot[c];
      }
      const float inv = 1.f / static_cast<float>(r1 - r0);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        rel[c] = sum[c] * inv;
        mean_out[c] = (pivot[c] - K[c]) + rel[c];
        m2_out[c] = 0.f;
      }
      for (int64_t r = 0; r < r1 - r0; ++r) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float d = (static_cast<float>(p[r * C + c]) - pivot[c]) - rel[c];
          m2_out[c] += d * d;
        }
      }
    }
  });
  // Merge the partials of each n in chunk order, vectorised along C: a chunk has the same count for every
  // channel, so Chan's weights are scalars per chunk (the same arithmetic as chan_merge, lane by lane).
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      float* mu = cmean + n * C;
      float* m2 = cm2 + n * C;
      std::fill(mu, mu + C, 0.f);
      std::fill(m2, m2 + C, 0.f);
      for (int64_t k = 0; k < nchunk; ++k)
        merge_rows_chunk(mu, m2, pmean.data() + (n * nchunk + k) * C, pm2.data() + (n * nchunk + k) * C, C,
                         static_cast<float>(k * R), static_cast<float>(std::min(S, (k + 1) * R) - k * R));
    }
  });
}

#if FASTDIFF_AVX512
// y = act(a[c] (x - K[c]) + b[c]) over rows r0 .. r1 - 1 of one sample's channels-last rows of C values (x, y: its
// row 0). Sweeps of up to 8 rows: along the channels, each 16 channels' parameters (with the SiLU's -log2(e)
// multiples) are loaded once for the 8 rows, so memory is read and written as 8 sequential streams. stream: full
// vectors of y by non-temporal stores (the caller fences).
template <typename T, bool kSilu>
inline void apply_cl_rows(const T* x, T* y, int64_t r0, int64_t r1, int64_t C, const float* a, const float* bb,
                          const float* K, bool stream) {
  for (int64_t b = r0; b < r1; b += 8) {
    const int64_t e = std::min(r1, b + 8);
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = lane_mask(C - c);
      const __m512 va = load16(a + c, m), vb = load16(bb + c, m), vk = load16(K + c, m);
      const __m512 ua = _mm512_mul_ps(va, _mm512_set1_ps(-kLog2e)), ub = _mm512_mul_ps(vb, _mm512_set1_ps(-kLog2e));
      for (int64_t row = b; row < e; ++row) {
        const int64_t off = row * C + c;
        const __m512 d = _mm512_sub_ps(load16(x + off, m), vk);
        const __m512 z = _mm512_fmadd_ps(va, d, vb);
        const __m512 out = kSilu ? silu16(z, _mm512_fmadd_ps(ua, d, ub)) : z;
        if (stream)
          store16<true>(y + off, out, m);
        else
          store16(y + off, out, m);
      }
    }
  }
}
#endif

// y = act(A[n,c] (x - K[n,c]) + B[n,c])
// stream: write fp32 y with non-temporal stores (see group_norm_cpu).
template <typename T, bool kSilu>
void apply(const T* x, T* y, const float* A, const float* B, const float* Kc, const Shape& sh, bool stream) {
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  if (sh.layout == Layout::kChannelsFirst) {
    auto fn = apply_row_fn<T>(kSilu, stream);
    at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) fn(x + row * S, y + row * S, S, A[row], B[row], Kc[row], nullptr);
#if FASTDIFF_AVX512
      if (stream) _mm_sfence();
#endif
    });
    return;
  }
#if FASTDIFF_AVX512
  {
    // parallel over rows, each task's rows split at the samples' boundaries
    at::parallel_for(0, N * S, std::max<int64_t>(1, 16384 / C), [&](int64_t b, int64_t e) {
      while (b < e) {
        const int64_t n = b / S, r1 = std::min(e, (n + 1) * S);  // rows b .. r1 - 1, all of sample n
        apply_cl_rows<T, kSilu>(x + n * S * C, y + n * S * C, b - n * S, r1 - n * S, C, A + n * C, B + n * C,
                                Kc + n * C, stream);
        b = r1;
      }
      if (stream) _mm_sfence();
    });
  }
#else
  at::parallel_for(0, N * S, std::max<int64_t>(1, 16384 / C), [&](int64_t b, int64_t e) {
    float buf[kBlock];
    for (int64_t row = b; row < e; ++row) {
      const int64_t nC = (row / S) * C;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t n = std::min(kBlock, C - c0);
        if constexpr (std::is_same_v<T, float>) {
          const float* p = x + row * C + c0;
          float* q = y + row * C + c0;
          const float *a = A + nC + c0, *bb = B + nC + c0, *K = Kc + nC + c0;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const float z = a[i] * (p[i] - K[i]) + bb[i];
            q[i] = kSilu ? silu_f(z) : z;
          }
          continue;
        }
        to_f32(x + row * C + c0, buf, n, Kc + nC + c0);
        affine_act<kSilu>(buf, n, A + nC + c0, B + nC + c0);
        from_f32(buf, y + row * C + c0, n);
      }
    }
  });
#endif
}

#if FASTDIFF_AVX512
// The backward with AVX-512, both passes, fp32, fp16 and bf16 (the math in fp32). The sums pass forms
// gz = gy act'(a (x - K) + b); in fp32 with SiLU it keeps gz in gx, so the apply pass
// (gx = P gz + Q ((x - K) - mean) + R) reads it back instead of evaluating the SiLU's derivative again; fp16 and
// bf16 evaluate it again in the apply pass (gz rounded to 16 bits in between would lose digits). Channels-first
// rows are one (n, c) each; channels-last works on tiles of rows with 16 channels' parameters and sums held in
// registers.
// gz for 16 values (fp32 with kSilu: also stored to gz_out) given d = x - K; adds gz and gz (d - mu) to s1, s2.
template <bool kSilu, typename T>
inline void bwd_sums16(__mmask16 m, const T* x, const T* gy, T* gz_out, __m512 a, __m512 b, __m512 ua, __m512 ub,
                       __m512 k, __m512 mu, __m512& s1, __m512& s2) {
  const __m512 d = _mm512_sub_ps(load16(x, m), k);
  __m512 gz = load16(gy, m);
  if constexpr (kSilu) {
    gz = _mm512_mul_ps(gz, silu_grad16(_mm512_fmadd_ps(a, d, b), _mm512_fmadd_ps(ua, d, ub)));
    if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(gz_out, m, gz);
  }
  s1 = _mm512_add_ps(s1, gz);
  s2 = _mm512_fmadd_ps(gz, _mm512_maskz_sub_ps(m, d, mu), s2);
}

// gx = P gz + Q ((x - K) - mu) + R for 16 values: gz read back from gx (fp32 with SiLU), taken from gy (no
// activation), or formed again from gy, x and a, b, ua, ub (fp16/bf16 with SiLU).
template <bool kSilu, typename T>
inline void bwd_apply16(__mmask16 m, const T* x, const T* gy, T* gx, __m512 p, __m512 q, __m512 r, __m512 k,
                        __m512 mu, __m512 a, __m512 b, __m512 ua, __m512 ub) {
  const __m512 d = _mm512_sub_ps(load16(x, m), k);
  __m512 g;
  if constexpr (kSilu && std::is_same_v<T, float>) {
    g = _mm512_maskz_loadu_ps(m, gx);
  } else {
    g = load16(gy, m);
    if constexpr (kSilu) g = _mm512_mul_ps(g, silu_grad16(_mm512_fmadd_ps(a, d, b), _mm512_fmadd_ps(ua, d, ub)));
  }
  store16(gx, _mm512_fmadd_ps(p, g, _mm512_fmadd_ps(q, _mm512_sub_ps(d, mu), r)), m);
}

// Rows per sweep of the channels-last backward passes: each 16 channels' parameters (and the sums pass's partial
// sums) are loaded once per sweep instead of once per row. Measured on this Zen 4 (fp32 SiLU, two threads,
// medians of 10 alternating runs against per-row loops), the next sweep prefetched where the tensors outgrow
// the cache: (2, 1280, 32, 32) 1.66x, (2, 640, 64, 64) 1.30x, (2, 320, 32, 32) 1.26x, (2, 192, 64, 64)
// 1.15x, (2, 320, 64, 64) 1.01x. 8 rows without prefetching were 0.72x at (2, 320, 64, 64) (24 streams within
// a few pages, which the hardware prefetchers follow badly), as an earlier attempt found.
constexpr int64_t kBwdSweep = 4;

// Channels-first rows of up to this many values take backward_short_rows (measured on Zen 4 against the per-row
// loops: 1x2 1.22x, 2x2 1.15x, 2x3 1.06-1.09x, 1x8 1.03x, 3x3 0.88-0.95x, 3x5 0.80-0.84x).
constexpr int64_t kShortRowBackward = 8;

// The channels-first backward for rows of up to 8 values (maps of 1x1 to 2x4, or no spatial dims): the
// same two passes as backward_avx512's, but each runs one vector loop across the row boundaries, on the
// per-row parameters themselves where S = 1, else on them broadcast over each row's S values into L1 buffers
// (kExpand values at a time); the sums pass writes gz and gz (d - mu) per value and adds each row's S of them in
// order afterwards (S = 1: they are the sums).
template <bool kSilu, typename T, typename Fold>
void backward_short_rows(const T* gy, const T* x, T* gx, const float* A, const float* B, const float* Kc,
                         const float* mean_c, const float* P, const float* Q, const float* Rr, const Shape& sh,
                         float* S1, float* S2, Fold&& fold) {
  constexpr bool kRecompute = kSilu && !std::is_same_v<T, float>;  // the apply pass forms gz again
  const int64_t rows = sh.N * sh.C, S = sh.S;
  const int64_t per = std::max<int64_t>(1, kExpand / S);  // rows per chunk
  const int64_t chunks = (rows + per - 1) / per;
  const int64_t grain = std::max<int64_t>(1, kClaimValues / (per * S));
  const __m512 nl2e = _mm512_set1_ps(-kLog2e);
  // ptr[j] for this chunk: the per-row array src[j] + r0 itself (S = 1), or it broadcast into buf[j]
  auto params = [&](int64_t r0, int64_t r1, int count, const float* const* src, float (*buf)[kExpand],
                    const float** ptr) {
    for (int j = 0; j < count; ++j) {
      if (S == 1) {
        ptr[j] = src[j] + r0;
        continue;
      }
      for (int64_t r = r0, o = 0; r < r1; ++r, o += S) {
        const __m512 v = _mm512_set1_ps(src[j][r]);
        for (int64_t i = 0; i < S; i += 16) _mm512_mask_storeu_ps(buf[j] + o + i, lane_mask(S - i), v);
      }
      ptr[j] = buf[j];
    }
  };
  at::parallel_for(0, chunks, grain, [&](int64_t cb, int64_t ce) {
    alignas(64) float buf[4][kExpand], t1[kExpand], t2[kExpand];
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t r0 = ch * per, r1 = std::min(rows, r0 + per), o = r0 * S, n = (r1 - r0) * S;
      const float* src[4] = {A, B, Kc, mean_c};
      const float* p[4];
      params(r0, r1, 4, src, buf, p);
      float* o1 = S == 1 ? S1 + r0 : t1;
      float* o2 = S == 1 ? S2 + r0 : t2;
      for_vectors(n, [&](int64_t i, __mmask16 m) {
        const __m512 a = _mm512_maskz_loadu_ps(m, p[0] + i), b = _mm512_maskz_loadu_ps(m, p[1] + i);
        const __m512 d = _mm512_maskz_sub_ps(m, load16(x + o + i, m), _mm512_maskz_loadu_ps(m, p[2] + i));
        __m512 g = load16(gy + o + i, m);
        if constexpr (kSilu) {
          g = _mm512_mul_ps(g, silu_grad16(_mm512_fmadd_ps(a, d, b),
                                           _mm512_fmadd_ps(_mm512_mul_ps(a, nl2e), d, _mm512_mul_ps(b, nl2e))));
          if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(gx + o + i, m, g);
        }
        _mm512_mask_storeu_ps(o1 + i, m, g);
        _mm512_mask_storeu_ps(o2 + i, m, _mm512_mul_ps(g, _mm512_sub_ps(d, _mm512_maskz_loadu_ps(m, p[3] + i))));
      });
      if (S > 1)
        for (int64_t r = r0, k = 0; r < r1; ++r, k += S) {
          float a1 = 0.f, a2 = 0.f;
          for (int64_t i = 0; i < S; ++i) {
            a1 += t1[k + i];
            a2 += t2[k + i];
          }
          S1[r] = a1;
          S2[r] = a2;
        }
    }
  });
  at::parallel_for(0, sh.N, std::max<int64_t>(1, kPerChannelGrain / std::max<int64_t>(sh.C, 1)), fold);
  at::parallel_for(0, chunks, grain, [&](int64_t cb, int64_t ce) {
    alignas(64) float buf[7][kExpand];
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t r0 = ch * per, r1 = std::min(rows, r0 + per), o = r0 * S, n = (r1 - r0) * S;
      const float* src[7] = {P, Q, Rr, Kc, mean_c, A, B};
      const float* p[7];
      params(r0, r1, kRecompute ? 7 : 5, src, buf, p);
      for_vectors(n, [&](int64_t i, __mmask16 m) {
        __m512 a = _mm512_setzero_ps(), b = a;
        if constexpr (kRecompute) {
          a = _mm512_maskz_loadu_ps(m, p[5] + i);
          b = _mm512_maskz_loadu_ps(m, p[6] + i);
        }
        bwd_apply16<kSilu>(m, x + o + i, gy + o + i, gx + o + i, _mm512_maskz_loadu_ps(m, p[0] + i),
                           _mm512_maskz_loadu_ps(m, p[1] + i), _mm512_maskz_loadu_ps(m, p[2] + i),
                           _mm512_maskz_loadu_ps(m, p[3] + i), _mm512_maskz_loadu_ps(m, p[4] + i), a, b,
                           _mm512_mul_ps(a, nl2e), _mm512_mul_ps(b, nl2e));
      });
    }
  });
}

// fold(n0, n1) turns S1, S2 of samples n0 .. n1 - 1 into their P, Q, Rr between the two passes; fold_group(n, g)
// does it for one group. With `blocks` (channels-first only, see group_norm_backward_cpu), refold(n, g, mu) sets
// A, B and mean_c of group g of sample n around its mean mu in the pivot's frame.
template <bool kSilu, typename T, typename Fold, typename FoldGroup, typename Refold>
void backward_avx512(const T* gy, const T* x, T* gx, const float* A, const float* B, const float* Kc,
                     const float* mean_c, const float* P, const float* Q, const float* Rr, const Shape& sh,
                     float* S1, float* S2, Fold&& fold, FoldGroup&& fold_group, Refold&& refold, bool prefetch,
                     bool blocks) {
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  auto bc = [](float v) { return _mm512_set1_ps(v); };
  auto fold_all = [&] {
    at::parallel_for(0, N, std::max<int64_t>(1, kPerChannelGrain / std::max<int64_t>(C, 1)), fold);
  };
  if (sh.layout == Layout::kChannelsFirst && S <= kShortRowBackward) {
    backward_short_rows<kSilu>(gy, x, gx, A, B, Kc, mean_c, P, Q, Rr, sh, S1, S2, fold);
    return;
  }
  if (sh.layout == Layout::kChannelsFirst) {
    auto sums_row = [&](int64_t row) {  // S1[row], S2[row] (and gz in gx: fp32 with SiLU)
      __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
      const __m512 a = bc(A[row]), bb = bc(B[row]), k = bc(Kc[row]), mu = bc(mean_c[row]);
      const __m512 ua = bc(-A[row] * kLog2e), ub = bc(-B[row] * kLog2e);
      for (int64_t i = 0; i < S; i += 16)
        bwd_sums16<kSilu>(lane_mask(S - i), x + row * S + i, gy + row * S + i, gx + row * S + i, a, bb, ua, ub, k,
                          mu, s1, s2);
      S1[row] = _mm512_reduce_add_ps(s1);
      S2[row] = _mm512_reduce_add_ps(s2);
    };
    auto apply_row = [&](int64_t row, const T* pf_x = nullptr, const T* pf_g = nullptr) {
      for (int64_t i = 0; i < S; i += 16) {
        if (pf_x != nullptr) {  // the same line of the next block's x and gy, into L2
          _mm_prefetch(reinterpret_cast<const char*>(pf_x + i), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(pf_g + i), _MM_HINT_T1);
        }
        bwd_apply16<kSilu>(lane_mask(S - i), x + row * S + i, gy + row * S + i, gx + row * S + i, bc(P[row]),
                           bc(Q[row]), bc(Rr[row]), bc(Kc[row]), bc(mean_c[row]), bc(A[row]), bc(B[row]),
                           bc(-A[row] * kLog2e), bc(-B[row] * kLog2e));
      }
    };
    if (blocks) {
      // (n, group) blocks, handed out from a shared counter in batches as in the forward (up to kClaimValues values,
      // at least eight batches per thread: neighbouring blocks' S1, S2, P, Q, Rr share cache lines). Per block:
      // its statistics again (row_stats: the arithmetic of the forward's StatsCursor), so that x is centred by
      // its mean in the pivot's frame as the forward centred it, not by the saved fp32 mean, which is rounded to
      // the pivot's ulp (at a mean of 1e4 standard deviations that cost 4e-4 of the gradients, relative; now
      // 3e-7); then the sums pass and the apply pass, during which the next block's x and gy are prefetched into
      // L2. x and gy come from memory once; the sums and apply passes re-read them (and gz, kept in gx) from L2.
      const int64_t cpg = sh.cpg, G = sh.G, blocks_n = N * G;
      const int64_t batch = std::max<int64_t>(
          1, std::min(kClaimValues / std::max<int64_t>(1, cpg * S), blocks_n / (8 * at::get_num_threads())));
      std::atomic<int64_t> counter{0};
      at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), (blocks_n + batch - 1) / batch), 1,
                       [&](int64_t, int64_t) {
        int64_t b0 = counter.fetch_add(batch);
        while (b0 < blocks_n) {
          const int64_t b1 = std::min(blocks_n, b0 + batch), following = counter.fetch_add(batch);
          for (int64_t ng = b0; ng < b1; ++ng) {
            const int64_t n = ng / G, g = ng % G, row0 = n * C + g * cpg;
            const int64_t next = ng + 1 < b1 ? ng + 1 : following;  // this thread's next block
            const bool ahead = next < blocks_n;
            const T* xb = x + row0 * S;
            float mu, m2;
            row_stats(xb, cpg * S, static_cast<float>(xb[0]), mu, m2);
            refold(n, g, mu);
            for (int64_t row = row0; row < row0 + cpg; ++row) sums_row(row);
            fold_group(n, g);
            for (int64_t row = row0; row < row0 + cpg; ++row) {
              const int64_t r = row + (next - ng) * cpg;  // the same row of the next block
              apply_row(row, ahead ? x + r * S : nullptr, ahead ? gy + r * S : nullptr);
            }
          }
          b0 = following;
        }
      });
      return;
    }
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) sums_row(row);
    });
    fold_all();
    at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) apply_row(row);
    });
    return;
  }
  // Channels-last, maps of up to kOnePassRows positions (8 x 8 and smaller): one task per sample for both passes
  // and the fold between them (the sample's rows are re-read from L1/L2), one parallel region for the call.
  if (S <= kOnePassRows && N >= at::get_num_threads()) {
    at::parallel_for(0, N, std::max<int64_t>(1, kClaimValues / (S * C)), [&](int64_t n0, int64_t n1) {
      std::vector<float> u(2 * C);  // -log2(e) A, -log2(e) B of the sample
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t nc0 = n * C;
        for_vectors(C, [&](int64_t c, __mmask16 m) {
          _mm512_mask_storeu_ps(u.data() + c, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, A + nc0 + c), bc(-kLog2e)));
          _mm512_mask_storeu_ps(u.data() + C + c, m,
                                _mm512_mul_ps(_mm512_maskz_loadu_ps(m, B + nc0 + c), bc(-kLog2e)));
        });
        std::fill(S1 + nc0, S1 + nc0 + C, 0.f);
        std::fill(S2 + nc0, S2 + nc0 + C, 0.f);
        for (int64_t r = 0; r < S; ++r)
          for (int64_t c0 = 0; c0 < C; c0 += 16) {
            const __mmask16 m = lane_mask(C - c0);
            const int64_t o = nc0 + c0, off = (n * S + r) * C + c0;
            __m512 s1 = _mm512_maskz_loadu_ps(m, S1 + o), s2 = _mm512_maskz_loadu_ps(m, S2 + o);
            bwd_sums16<kSilu>(m, x + off, gy + off, gx + off, _mm512_maskz_loadu_ps(m, A + o),
                              _mm512_maskz_loadu_ps(m, B + o), _mm512_maskz_loadu_ps(m, u.data() + c0),
                              _mm512_maskz_loadu_ps(m, u.data() + C + c0), _mm512_maskz_loadu_ps(m, Kc + o),
                              _mm512_maskz_loadu_ps(m, mean_c + o), s1, s2);
            _mm512_mask_storeu_ps(S1 + o, m, s1);
            _mm512_mask_storeu_ps(S2 + o, m, s2);
          }
        fold(n, n + 1);
        for (int64_t r = 0; r < S; ++r)
          for (int64_t c0 = 0; c0 < C; c0 += 16) {
            const __mmask16 m = lane_mask(C - c0);
            const int64_t o = nc0 + c0, off = (n * S + r) * C + c0;
            bwd_apply16<kSilu>(m, x + off, gy + off, gx + off, _mm512_maskz_loadu_ps(m, P + o),
                               _mm512_maskz_loadu_ps(m, Q + o), _mm512_maskz_loadu_ps(m, Rr + o),
                               _mm512_maskz_loadu_ps(m, Kc + o), _mm512_maskz_loadu_ps(m, mean_c + o),
                               _mm512_maskz_loadu_ps(m, A + o), _mm512_maskz_loadu_ps(m, B + o),
                               _mm512_maskz_loadu_ps(m, u.data() + c0), _mm512_maskz_loadu_ps(m, u.data() + C + c0));
          }
      }
    });
    return;
  }
  // Channels-last: per (n, chunk of R rows) partial sums per channel, rows in memory order (16 channels per
  // vector, parameters and partials from L1), added in chunk order.
  const int64_t R = std::max<int64_t>(1, kRowBytes / (C * static_cast<int64_t>(sizeof(float))));  // fp32 rows
  const int64_t nchunk = (S + R - 1) / R;
  std::vector<float> p1(N * nchunk * C), p2(N * nchunk * C), UA(N * C), UB(N * C);
  for (int64_t i = 0; i < N * C; ++i) {
    UA[i] = -A[i] * kLog2e;
    UB[i] = -B[i] * kLog2e;
  }
  // Sweeps of kBwdSweep rows (see there): each 16 channels' parameters and partial sums are loaded once per
  // sweep. Each channel's sums still add the rows in order, so the result does not depend on the sweep size.
  at::parallel_for(0, N * nchunk, 1, [&](int64_t b, int64_t e) {
    for (int64_t job = b; job < e; ++job) {
      const int64_t n = job / nchunk, r0 = (job % nchunk) * R, r1 = std::min(S, r0 + R);
      float* o1 = p1.data() + job * C;
      float* o2 = p2.data() + job * C;
      std::fill(o1, o1 + C, 0.f);
      std::fill(o2, o2 + C, 0.f);
      for (int64_t rb = r0; rb < r1; rb += kBwdSweep) {
        const int64_t re = std::min(r1, rb + kBwdSweep);
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
          const __mmask16 m = lane_mask(C - c0);
          const int64_t o = n * C + c0;
          const __m512 a = _mm512_maskz_loadu_ps(m, A + o), bb = _mm512_maskz_loadu_ps(m, B + o),
                       ua = _mm512_maskz_loadu_ps(m, UA.data() + o), ub = _mm512_maskz_loadu_ps(m, UB.data() + o),
                       k = _mm512_maskz_loadu_ps(m, Kc + o), mu = _mm512_maskz_loadu_ps(m, mean_c + o);
          __m512 s1 = _mm512_maskz_loadu_ps(m, o1 + c0), s2 = _mm512_maskz_loadu_ps(m, o2 + c0);
          for (int64_t r = rb; r < re; ++r) {
            const int64_t off = (n * S + r) * C + c0;
            if (prefetch) {  // the same vector of the next sweep's rows
              _mm_prefetch(reinterpret_cast<const char*>(x + off + kBwdSweep * C), _MM_HINT_T0);
              _mm_prefetch(reinterpret_cast<const char*>(gy + off + kBwdSweep * C), _MM_HINT_T0);
            }
            bwd_sums16<kSilu>(m, x + off, gy + off, gx + off, a, bb, ua, ub, k, mu, s1, s2);
          }
          _mm512_mask_storeu_ps(o1 + c0, m, s1);
          _mm512_mask_storeu_ps(o2 + c0, m, s2);
        }
      }
    }
  });
  for (int64_t n = 0; n < N; ++n) {  // in chunk order per (n, c), vectorised along C
    std::fill(S1 + n * C, S1 + (n + 1) * C, 0.f);
    std::fill(S2 + n * C, S2 + (n + 1) * C, 0.f);
    for (int64_t k = 0; k < nchunk; ++k) {
      const float* q1 = p1.data() + (n * nchunk + k) * C;
      const float* q2 = p2.data() + (n * nchunk + k) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        S1[n * C + c] += q1[c];
        S2[n * C + c] += q2[c];
      }
    }
  }
  fold_all();
  // Sweeps of up to kBwdSweep rows of one sample, the 16 channels' parameters loaded once per sweep.
  at::parallel_for(0, N * S, std::max<int64_t>(1, 16384 / C), [&](int64_t b, int64_t e) {
    for (int64_t rb = b; rb < e;) {
      const int64_t nC = (rb / S) * C, re = std::min({e, rb + kBwdSweep, (rb / S + 1) * S});  // rows rb .. re - 1
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const __mmask16 m = lane_mask(C - c0);
        const int64_t o = nC + c0;
        const __m512 p = _mm512_maskz_loadu_ps(m, P + o), q = _mm512_maskz_loadu_ps(m, Q + o),
                     r = _mm512_maskz_loadu_ps(m, Rr + o), k = _mm512_maskz_loadu_ps(m, Kc + o),
                     mu = _mm512_maskz_loadu_ps(m, mean_c + o), a = _mm512_maskz_loadu_ps(m, A + o),
                     bb = _mm512_maskz_loadu_ps(m, B + o), ua = _mm512_maskz_loadu_ps(m, UA.data() + o),
                     ub = _mm512_maskz_loadu_ps(m, UB.data() + o);
        for (int64_t row = rb; row < re; ++row) {
          const int64_t off = row * C + c0;
          if (prefetch) {
            _mm_prefetch(reinterpret_cast<const char*>(x + off + kBwdSweep * C), _MM_HINT_T0);
            const T* g = kSilu && std::is_same_v<T, float> ? gx : gy;  // what bwd_apply16 reads
            _mm_prefetch(reinterpret_cast<const char*>(g + off + kBwdSweep * C), _MM_HINT_T0);
          }
          bwd_apply16<kSilu>(m, x + off, gy + off, gx + off, p, q, r, k, mu, a, bb, ua, ub);
        }
      }
      rb = re;
    }
  });
}
#endif

// Per-(n, c) S1 = sum gz and S2 = sum gz (x - mean_g). Each block's sums are formed in fp32 and added in order.
// x is taken in its group pivot's frame (x - Kc) and mean_c is the group mean in that frame.
template <typename T, bool kSilu>
void backward_sums(const T* gy, const T* x, const float* A, const float* B, const float* Kc, const float* mean_c,
                   const Shape& sh, float* S1, float* S2) {
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  if (sh.layout == Layout::kChannelsFirst) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t b, int64_t e) {
      float xb[kBlock], gb[kBlock];
      for (int64_t row = b; row < e; ++row) {
        const float mu = mean_c[row];
        float t1 = 0.f, t2 = 0.f;
        for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
          const int64_t n = std::min(kBlock, S - s0);
          to_f32(x + row * S + s0, xb, n, Kc[row]);
          to_f32(gy + row * S + s0, gb, n);
          act_backward<kSilu>(xb, gb, n, A[row], B[row]);
          float c1 = 0.f, c2 = 0.f;
#pragma omp simd reduction(+ : c1, c2)
          for (int64_t i = 0; i < n; ++i) {
            c1 += gb[i];
            c2 += gb[i] * (xb[i] - mu);
          }
          t1 += c1;
          t2 += c2;
        }
        S1[row] = t1;
        S2[row] = t2;
      }
    });
    return;
  }
  // Channels-last: per (n, chunk of rows) partials, vectorised along C, then added in chunk order.
  const int64_t R = std::max<int64_t>(1, kRowBytes / (C * static_cast<int64_t>(sizeof(T))));
  const int64_t nchunk = (S + R - 1) / R;
  std::vector<float> p1(N * nchunk * C), p2(N * nchunk * C);
  at::parallel_for(0, N * nchunk, 1, [&](int64_t b, int64_t e) {
    float xb[kBlock], gb[kBlock];
    for (int64_t job = b; job < e; ++job) {
      const int64_t n = job / nchunk, k = job % nchunk;
      const int64_t r0 = k * R, r1 = std::min(S, r0 + R);
      float* o1 = p1.data() + job * C;
      float* o2 = p2.data() + job * C;
      std::fill(o1, o1 + C, 0.f);
      std::fill(o2, o2 + C, 0.f);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
          const int64_t m = std::min(kBlock, C - c0);
          const int64_t off = (n * S + r) * C + c0;
          to_f32(x + off, xb, m, Kc + n * C + c0);
          to_f32(gy + off, gb, m);
          act_backward<kSilu>(xb, gb, m, A + n * C + c0, B + n * C + c0);
          const float* mu = mean_c + n * C + c0;
#pragma omp simd
          for (int64_t i = 0; i < m; ++i) {
            o1[c0 + i] += gb[i];
            o2[c0 + i] += gb[i] * (xb[i] - mu[i]);
          }
        }
      }
    }
  });
  at::parallel_for(0, N * C, 256, [&](int64_t b, int64_t e) {
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      float t1 = 0.f, t2 = 0.f;
      for (int64_t k = 0; k < nchunk; ++k) {
        t1 += p1[(n * nchunk + k) * C + c];
        t2 += p2[(n * nchunk + k) * C + c];
      }
      S1[nc] = t1;
      S2[nc] = t2;
    }
  });
}

// grad_x = P gz + Q (x - mean) + R, with x - mean = (x - Kc) - mean_c as in backward_sums
template <typename T, bool kSilu>
void backward_apply(const T* gy, const T* x, T* gx, const float* A, const float* B, const float* P, const float* Q,
                    const float* Rr, const float* Kc, const float* mean_c, const Shape& sh) {
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  if (sh.layout == Layout::kChannelsFirst) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t b, int64_t e) {
      float xb[kBlock], gb[kBlock];
      for (int64_t row = b; row < e; ++row) {
        const float p = P[row], q = Q[row], r = Rr[row], mu = mean_c[row];
        for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
          const int64_t n = std::min(kBlock, S - s0);
          to_f32(x + row * S + s0, xb, n, Kc[row]);
          to_f32(gy + row * S + s0, gb, n);
          act_backward<kSilu>(xb, gb, n, A[row], B[row]);
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) gb[i] = p * gb[i] + q * (xb[i] - mu) + r;
          from_f32(gb, gx + row * S + s0, n);
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * S, std::max<int64_t>(1, 16384 / C), [&](int64_t b, int64_t e) {
    float xb[kBlock], gb[kBlock];
    for (int64_t row = b; row < e; ++row) {
      const int64_t nC = (row / S) * C;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t m = std::min(kBlock, C - c0);
        const int64_t o = nC + c0;
        to_f32(x + row * C + c0, xb, m, Kc + o);
        to_f32(gy + row * C + c0, gb, m);
        act_backward<kSilu>(xb, gb, m, A + o, B + o);
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) gb[i] = P[o + i] * gb[i] + Q[o + i] * (xb[i] - mean_c[o + i]) + Rr[o + i];
        from_f32(gb, gx + row * C + c0, m);
      }
    }
  });
}

// Each group's pivot K: its first value. Statistics and the apply pass work on x - K, so an input whose mean
// is far from zero keeps its digits (see channel_stats). Kc holds the pivot per (n, c).
template <typename T>
void group_pivots(const T* x, const Shape& sh, float* Kc) {
  for (int64_t n = 0; n < sh.N; ++n)
    for (int64_t g = 0; g < sh.G; ++g) {
      const int64_t c0 = g * sh.cpg;
      const int64_t idx = sh.layout == Layout::kChannelsFirst ? (n * sh.C + c0) * sh.S : n * sh.S * sh.C + c0;
      const float K = sh.S > 0 ? static_cast<float>(x[idx]) : 0.f;
      for (int64_t c = c0; c < c0 + sh.cpg; ++c) Kc[n * sh.C + c] = K;
    }
}

// A group's mean (in its pivot's frame) and rstd from its cpg channels' means and M2s, each over S values: the
// mean of the channel means, then M2 = sum M2_c + S sum (mu_c - mu)^2 (the two-pass form of Chan's merge for
// equal counts, no division per channel).
inline void group_stats(const float* cmu, const float* cq, int64_t cpg, float S, double eps, float& mu_out,
                        float& rstd_out) {
  float mu = 0.f, q = 0.f, dev = 0.f;
  for (int64_t c = 0; c < cpg; ++c) mu += cmu[c];
  mu /= static_cast<float>(cpg);
  for (int64_t c = 0; c < cpg; ++c) {
    const float d = cmu[c] - mu;
    q += cq[c];
    dev += d * d;
  }
  mu_out = mu;
  rstd_out = 1.f / std::sqrt(std::max((q + S * dev) / (S * static_cast<float>(cpg)), 0.f) + static_cast<float>(eps));
}

// (A, B) per (n, c) for z = A (x - K) + B, from the group mean in K's frame (mrel) and rstd:
//   A = rstd w (1 + s),  B = (b (1 + s) + t) - A mrel;  mean_c receives mrel per channel.
void fold(const Shape& sh, const float* mrel, const float* rstd, const Param& w, const Param& b, const Param& s,
          const Param& t, float* A, float* B, float* mean_c) {
  // parallel over samples once there are many (n, c): at 1x1 maps this loop costs as much as the passes
  at::parallel_for(0, sh.N, std::max<int64_t>(1, kPerChannelGrain / std::max<int64_t>(sh.C, 1)), [&](int64_t n0,
                                                                                                     int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < sh.G; ++g) {
        const int64_t ng = n * sh.G + g;
#if FASTDIFF_AVX512
        const int64_t o = n * sh.C + g * sh.cpg;
        fold_block(w, b, s, t, n, g * sh.cpg, sh.cpg, rstd[ng], mrel[ng], A + o, B + o, nullptr, nullptr);
        std::fill(mean_c + o, mean_c + o + sh.cpg, mrel[ng]);
#else
        for (int64_t c = g * sh.cpg; c < (g + 1) * sh.cpg; ++c) {
          const int64_t nc = n * sh.C + c;
          gn_fold(0.f, rstd[ng], w.at(c, 1.f), b.at(c, 0.f), s.at(n, c, 0.f), t.at(n, c, 0.f), A[nc], B[nc]);
          B[nc] -= A[nc] * mrel[ng];
          mean_c[nc] = mrel[ng];
        }
#endif
      }
  });
}

// The size of cpu0's cache `index` (2: L2, 3: L3) from sysfs, or `fallback` where it cannot be read.
int64_t sysfs_cache_bytes(int index, int64_t fallback) {
  long long kb = 0;
  char unit = 'K';
  const std::string path = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size";
  if (FILE* f = std::fopen(path.c_str(), "r")) {
    if (std::fscanf(f, "%lld%c", &kb, &unit) < 1) kb = 0;
    std::fclose(f);
  }
  if (unit == 'M') kb *= 1024;
  return kb > 0 ? static_cast<int64_t>(kb) * 1024 : fallback;
}

// The size the store choices below assume for the last-level cache, where set (set_cpu_cache_bytes; 0: not set).
std::atomic<int64_t> g_cache_override{0};

// The last-level cache's size: FASTDIFF_CPU_CACHE_MB where set (a VM may report its host's whole L3, shared
// with other guests), else from sysfs (32 MiB where it cannot be read); set_cpu_cache_bytes overrides both.
int64_t llc_bytes() {
  const int64_t forced = g_cache_override.load(std::memory_order_relaxed);
  if (forced > 0) return forced;
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("FASTDIFF_CPU_CACHE_MB")) {
      char* end = nullptr;
      const long long mb = std::strtoll(env, &end, 10);
      if (end != env && *end == '\0' && mb > 0) return static_cast<int64_t>(mb) << 20;
      TORCH_WARN("FASTDIFF_CPU_CACHE_MB: expected a positive integer (MiB), got '", env, "'; ignored");
    }
    return sysfs_cache_bytes(3, int64_t{32} << 20);
  }();
  return bytes;
}

// The L2 size the choices of the backward's block-by-block passes (fp32 NCHW) and the forward's per-sample
// channels-last path assume, where set (set_cpu_l2_bytes; 0: not set).
std::atomic<int64_t> g_l2_override{0};

// The L2 cache's size per core: from sysfs (1 MiB where it cannot be read); set_cpu_l2_bytes overrides it.
[[maybe_unused]] int64_t l2_bytes() {
  const int64_t forced = g_l2_override.load(std::memory_order_relaxed);
  if (forced > 0) return forced;
  static const int64_t bytes = sysfs_cache_bytes(2, int64_t{1} << 20);
  return bytes;
}

// Whether y is written with non-temporal stores: in the AVX-512 build, when x and y together exceed half the
// last-level cache (the same byte threshold for fp32, fp16 and bf16). These stores skip reading each line of y
// before overwriting it; the apply pass is bound by those reads once the SiLU is cheap. At that size y does not
// stay cached for the next op anyway (the LLC is shared with other cores' data, and the next op in a U-Net is a
// convolution, bound by its arithmetic).
// Measured here (2-core Zen 4 VM, 32 MiB LLC, GroupNorm then y.sum(), medians of 16 alternating rounds):
// 10.5 MB NCHW  gn 829 -> 566 us, gn + sum 1113 -> 934 us; channels-last gn 1455 -> 985, gn + sum 1822 -> 1344;
// 8.4 MB gn 529 -> 422, gn + sum 700 -> 709 (even); 5.2 MB gn 283 -> 272 but gn + sum 359 -> 442 (the sum
// reads y from DRAM): smaller outputs keep ordinary stores.
bool stream_output(const at::Tensor& x) {
  return FASTDIFF_AVX512 && 4 * x.nbytes() > static_cast<size_t>(llc_bytes());
}

// Where y is streamed (NCHW blocks), the blocks that still fit stay in the cache: the first ones, up to the part of y
// with x and two outputs' worth of it in half the last-level cache (x + 2 kept <= LLC / 2; two, because a loop that
// keeps its previous output while it makes the next one gets two heap blocks from glibc in turn). The kept part
// is there for the op that reads y next; in a benchmark loop of calls it is written without DRAM traffic.
// Measured here (2-core VM, 32 MiB LLC, (2, 320, 64, 64) fp32 AdaGN + SiLU, where this keeps 30% of y), medians of 8
// rounds alternating in one process: all streamed 0.453 ms, 30% kept 0.433; in another session all streamed 0.456,
// 25% kept 0.433, 50% 0.432 (but wider spread).
[[maybe_unused]] int64_t cached_blocks(const at::Tensor& x, int64_t blocks) {
  const double room = 0.5 * static_cast<double>(llc_bytes()) - static_cast<double>(x.nbytes());
  const double frac = std::clamp(room / (2.0 * static_cast<double>(x.nbytes())), 0.0, 1.0);
  return static_cast<int64_t>(frac * static_cast<double>(blocks));
}

constexpr size_t kHugeOutputBytes = size_t{32} << 20;

// A new tensor like x for an output the kernel writes in full. From kHugeOutputBytes up, the 2 MiB-aligned
// interior of its memory is advised for transparent huge pages before anything touches it: where the allocator
// hands out freshly mapped memory (glibc's malloc does for every block of 32 MiB and more), the first writes then
// take one page fault per 2 MiB instead of one per 4 KiB. Measured here (2-core VM, THP "madvise"), a
// (2, 1280, 64, 64) fp32 forward (42 MB out): 15-25 ms -> 2.1-9.9 ms; 10.5 and 21 MB outputs, which glibc serves
// from its heap, unchanged. Advice only: where the pages already exist, or THP is off, nothing changes (errors
// are ignored).
at::Tensor empty_output(const at::Tensor& x) {
  at::Tensor y = at::empty_like(x);
#ifdef __linux__
  const size_t bytes = y.nbytes();
  if (bytes >= kHugeOutputBytes) {
    const uintptr_t huge = uintptr_t{2} << 20, p = reinterpret_cast<uintptr_t>(y.data_ptr());
    const uintptr_t b = (p + huge - 1) & ~(huge - 1), e = (p + bytes) & ~(huge - 1);
    if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
  }
#endif
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cpu(const at::Tensor& x, int64_t G,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              const c10::optional<at::Tensor>& scale,
                                                              const c10::optional<at::Tensor>& shift, double eps,
                                                              c10::string_view activation) {
  TORCH_CHECK(x.dim() >= 2, "x: expected (N, C, *spatial), got ", x.dim(), " dims");
  TORCH_CHECK(G > 0 && x.size(1) % G == 0, "num_groups: ", G, " must divide the ", x.size(1), " channels");
  const int act_code = activation_code(activation);
  const int64_t N = x.size(0), C = x.size(1);
  check_param(weight, "weight", {C}, x);
  check_param(bias, "bias", {C}, x);
  check_param(scale, "scale", {N, C}, x);
  check_param(shift, "shift", {N, C}, x);
  const Shape sh = shape_of(x, G);
  at::Tensor y = empty_output(x);
  at::Tensor mean = at::empty({N, G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N, G}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    mean.fill_(0.f);  // empty groups: zero mean, rstd of a zero variance
    rstd.fill_(static_cast<float>(1.0 / std::sqrt(eps)));
    return {y, mean, rstd};
  }
  const Param w = param_f32(weight), b = param_f32(bias), s = param_f32(scale), t = param_f32(shift);
  float* pm = mean.data_ptr<float>();
  float* pr = rstd.data_ptr<float>();
  if (sh.layout == Layout::kChannelsFirst && N * G >= 4 * at::get_num_threads()) {
    // One task per (n, group): its cpg * S values are one contiguous block (160 KB at 10 x 64 x 64 fp32), so
    // the apply pass re-reads it from L2 right after the statistics instead of from memory. The statistics run
    // over the block as one row (chunks of kChunk values across channel boundaries), so small maps (8 x 8) do
    // not pay a reduction per channel. With AVX-512 the statistics of the task's next block run inside the apply
    // loop of the current one (StatsCursor), so its reads from memory overlap y's writes and the SiLU; where rows
    // are short, or without AVX-512, the next block is prefetched into L2 during the apply loop instead.
    // Blocks are handed out from a shared counter, a batch of up to kClaimValues values at a time and at least
    // eight batches per thread (one block where blocks are large; many 1x1 or 4x4 ones, where a claim per block
    // would cost more than the block): on a machine shared with other work, a thread slowed down leaves its
    // blocks to the others instead of holding up the call. A thread claims its next batch before it works on the
    // current one, so it knows what to prefetch. A block is computed the same way whichever thread takes it, so
    // results stay bit-identical run to run. With AVX-512 a block's channels are folded 16 at a time and its rows
    // applied in one inlined loop (a call per row through a function pointer cost 15-25% at 8 x 8 maps); rows
    // shorter than kShortRow are applied across their boundaries (apply_short_rows).
    const int64_t cpg = sh.cpg, S = sh.S, blocks = N * G;
    const int64_t batch = std::max<int64_t>(
        1, std::min(kClaimValues / std::max<int64_t>(1, cpg * S), blocks / (8 * at::get_num_threads())));
    const bool stream = stream_output(x);  // y by non-temporal stores (but its first kept blocks)
#if FASTDIFF_AVX512
    const int64_t kept = stream ? cached_blocks(x, blocks) : 0;
    const bool short_rows = S < kShortRow;
    const int64_t block_bytes = cpg * S * static_cast<int64_t>(x.element_size()), l2 = l2_bytes();
#else
    const bool short_rows = false;
#endif
    std::atomic<int64_t> counter{0};
    FASTDIFF_DISPATCH_FLOATING(x.scalar_type(), "group_norm_cpu", [&] {
      const scalar_t* px = x.const_data_ptr<scalar_t>();
      scalar_t* py = y.data_ptr<scalar_t>();
      auto block = [&](int64_t ng) { return px + ((ng / G) * C + (ng % G) * cpg) * S; };
#if FASTDIFF_AVX512
      auto short_fn = apply_short_rows_fn<scalar_t>(act_code == 1, stream);
#else
      auto fn = apply_row_fn<scalar_t>(act_code == 1, stream);
#endif
      at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), (blocks + batch - 1) / batch), 1,
                       [&](int64_t, int64_t) {
#if FASTDIFF_AVX512
        std::vector<float> ab(4 * cpg);  // the block's a, b (and for apply_short_rows ua, ub)
        int64_t ahead_ng = -1;  // the block whose statistics the last apply loop computed: ahead_mu, ahead_m2
        float ahead_mu = 0.f, ahead_m2 = 0.f;
#endif
        int64_t b0 = counter.fetch_add(batch);
        while (b0 < blocks) {
          const int64_t b1 = std::min(blocks, b0 + batch);
          const int64_t following = counter.fetch_add(batch);  // the next batch
          for (int64_t ng = b0; ng < b1; ++ng) {
            const int64_t next_ng = ng + 1 < b1 ? ng + 1 : following;
            const int64_t n = ng / G, c0 = (ng % G) * cpg;
            const scalar_t* base = block(ng);
            const scalar_t* next = next_ng < blocks ? block(next_ng) : nullptr;
            const float K = static_cast<float>(base[0]);
            float mu, m2;
#if FASTDIFF_AVX512
            if (short_rows) {
              row_stats(base, cpg * S, K, mu, m2);
            } else if (ng == ahead_ng) {  // done during the previous block's apply loop
              mu = ahead_mu;
              m2 = ahead_m2;
            } else {
              StatsCursor<scalar_t> c;
              c.start(base, cpg * S, K);
              c.finish(mu, m2);
            }
#else
            row_stats(base, cpg * S, K, mu, m2);
#endif
            const float r =
                1.f / std::sqrt(std::max(m2 / static_cast<float>(cpg * S), 0.f) + static_cast<float>(eps));
            pm[ng] = K + mu;
            pr[ng] = r;
#if FASTDIFF_AVX512
            float* o = ab.data();  // a, b, and (short rows) ua, ub
            fold_block(w, b, s, t, n, c0, cpg, r, mu, o, o + cpg, short_rows ? o + 2 * cpg : nullptr,
                       short_rows ? o + 3 * cpg : nullptr);
            scalar_t* yb = py + (base - px);
            if (short_rows) {
              short_fn(base, yb, cpg, S, o, K, next);
              continue;
            }
            // The next block's statistics run inside this block's apply loop, 64 values per 64 applied: its x
            // streams in from memory while y streams out and the SiLU computes, and it is then in L2 for its own
            // apply. Measured on a 2-core Intel Xeon VM (AVX-512, 2 MB L2), medians of 5 rounds alternating in one
            // process against the previous loop (statistics, then the apply loop with the next block prefetched
            // into L2), fp32 AdaGN + SiLU: (2, 320, 64, 64) 0.453 -> 0.412 ms, (2, 640, 32, 32) 0.250 -> 0.231,
            // (8, 128, 16, 16, 16) 0.738 -> 0.668; 16x16 and 8x8 maps, fp16 and bf16 within 2.5% either way.
            // It needs the current block's x, the next one's and (ordinary stores) y in L2 at once: an L2 is LRU
            // enough that the current block's unread lines, loaded first and untouched since, are the first to go.
            // So it runs where those blocks fit in three quarters of one (as the backward's block path); larger
            // blocks (640 KB at (2, 1280, 64, 64) fp32) run their statistics first, then the apply from L2. The
            // statistics are the same cursor's either way, so outputs do not change. Measured on the same VM,
            // medians of 4 rounds alternating in one process, ordinary stores: 640 KB blocks (2, 1280, 64, 64)
            // ahead 2.96-3.40 ms, statistics first 2.56-2.74 (a later, noisier run of 6 rounds: 3.21-3.51 against
            // 2.89-3.34); (1, 1280, 64, 64) 1.09-1.29 -> 0.93-0.95 (later 1.13-1.45 -> 1.04-1.26); at 512 KB
            // (2, 1024, 64, 64) ahead still wins, 1.38-1.48 against 1.52-1.59. With y streamed (2 blocks) ahead
            // wins at 640 KB too: 1.73-1.96 against 1.89-2.21.
            const bool st = stream && ng >= kept;
            const bool ahead_fits = (st ? 2 : 3) * block_bytes <= l2 * 3 / 4;
            StatsCursor<scalar_t> ahead;
            if (next != nullptr && ahead_fits) ahead.start(next, cpg * S, static_cast<float>(next[0]));
            int64_t ticks = 0;
            auto tick = [&] {
              if ((++ticks & 3) == 0 && ahead.active()) ahead.step();
            };
            auto rows = [&](auto silu_c, auto stream_c) {
              for (int64_t i = 0; i < cpg; ++i)
                apply_vec<decltype(silu_c)::value, false, decltype(stream_c)::value>(
                    base + i * S, yb + i * S, S, o + i, o + cpg + i, K, static_cast<const scalar_t*>(nullptr), nullptr,
                    nullptr, tick);
            };
            using T_ = std::true_type;
            using F_ = std::false_type;
            if (act_code == 1)
              st ? rows(T_{}, T_{}) : rows(T_{}, F_{});
            else
              st ? rows(F_{}, T_{}) : rows(F_{}, F_{});
            if (next != nullptr && ahead_fits) {
              ahead.finish(ahead_mu, ahead_m2);
              ahead_ng = next_ng;
            }
#else
            for (int64_t c = c0; c < c0 + cpg; ++c) {
              float a, bb;
              gn_fold(0.f, r, w.at(c, 1.f), b.at(c, 0.f), s.at(n, c, 0.f), t.at(n, c, 0.f), a, bb);
              bb -= a * mu;
              const int64_t nc = n * C + c;
              fn(px + nc * S, py + nc * S, S, a, bb, K, next ? next + (c - c0) * S : nullptr);
            }
#endif
          }
          b0 = following;
        }
#if FASTDIFF_AVX512
        if (stream) _mm_sfence();  // order this thread's non-temporal stores before the region ends
#endif
      });
    });
    return {y, mean, rstd};
  }
#if FASTDIFF_AVX512
  if (sh.layout == Layout::kChannelsLast && N >= at::get_num_threads() &&
      (sh.S <= kOnePassRows || (N >= 4 * at::get_num_threads() &&
                                2 * sh.S * sh.C * static_cast<int64_t>(x.element_size()) <= l2_bytes()))) {
    // Channels-last maps of up to kOnePassRows positions (8 x 8 and smaller), or samples of up to half an L2 where
    // there are four or more per thread (16 x 16 maps of a few hundred channels): one task per sample, whose S
    // rows of C values are read for their statistics (one rows_stats chunk; over kOnePassRows rows, chunks of
    // channel_stats's size merged in order as there) and again, from L1/L2, to apply; one parallel region for the
    // whole call, and no per-(n, c) arrays beyond the task's own. Outputs are bit-identical to the two passes
    // over the whole tensor below (the same chunks, merges and apply loop). Measured for the second kind on the
    // 2-core Intel VM (fp32 AdaGN + SiLU, medians of 5 rounds alternating in one process against those two
    // passes): (160, 32, 16, 16) 0.455 -> 0.301 ms, (160, 64, 16, 16) 0.800 -> 0.544, (160, 96, 16, 16)
    // 1.209 -> 0.800, (16, 320, 16, 16) 0.386 -> 0.273, (8, 640, 16, 16) 0.394 -> 0.293, (32, 128, 32, 32)
    // 1.179 -> 0.811, (160, 64, 12, 12) 0.512 -> 0.342 (1.34-1.51x).
    const int64_t cpg = sh.cpg, S = sh.S;
    const int64_t R = stats_chunk_rows(C);  // rows per chunk over kOnePassRows
    const bool stream = stream_output(x);
    FASTDIFF_DISPATCH_FLOATING(x.scalar_type(), "group_norm_cpu", [&] {
      const scalar_t* px = x.const_data_ptr<scalar_t>();
      scalar_t* py = y.data_ptr<scalar_t>();
      auto apply_rows = act_code == 1 ? apply_cl_rows<scalar_t, true> : apply_cl_rows<scalar_t, false>;
      at::parallel_for(0, N, std::max<int64_t>(1, kClaimValues / (S * C)), [&](int64_t n0, int64_t n1) {
        std::vector<float> buf(7 * C);
        float *K = buf.data(), *cmu = K + C, *cq = cmu + C, *a = cq + C, *bb = a + C, *pmu = bb + C, *pq = pmu + C;
        for (int64_t n = n0; n < n1; ++n) {
          const scalar_t* p = px + n * S * C;
          for (int64_t g = 0; g < G; ++g)
            std::fill(K + g * cpg, K + (g + 1) * cpg, static_cast<float>(p[g * cpg]));  // pivots: row 0's values
          if (S <= kOnePassRows) {
            rows_stats(p, S, C, K, cmu, cq);
          } else {  // chunks merged in order with Chan's weights, as channel_stats merges them
            std::fill(cmu, cmu + C, 0.f);
            std::fill(cq, cq + C, 0.f);
            for (int64_t r0 = 0; r0 < S; r0 += R) {
              const int64_t rows = std::min(R, S - r0);
              rows_stats(p + r0 * C, rows, C, K, pmu, pq);
              merge_rows_chunk(cmu, cq, pmu, pq, C, static_cast<float>(r0), static_cast<float>(rows));
            }
          }
          for (int64_t g = 0; g < G; ++g) {
            float mu, r;
            group_stats(cmu + g * cpg, cq + g * cpg, cpg, static_cast<float>(S), eps, mu, r);
            pm[n * G + g] = K[g * cpg] + mu;
            pr[n * G + g] = r;
            fold_block(w, b, s, t, n, g * cpg, cpg, r, mu, a + g * cpg, bb + g * cpg, nullptr, nullptr);
          }
          apply_rows(p, py + n * S * C, 0, S, C, a, bb, K, stream);
        }
        if (stream) _mm_sfence();
      });
    });
    return {y, mean, rstd};
  }
#endif
  std::vector<float> cmean(N * C), cm2(N * C), A(N * C), B(N * C), mean_c(N * C), Kc(N * C), mrel(N * G);
  FASTDIFF_DISPATCH_FLOATING(x.scalar_type(), "group_norm_cpu", [&] {
    group_pivots<scalar_t>(x.const_data_ptr<scalar_t>(), sh, Kc.data());
    channel_stats<scalar_t>(x.const_data_ptr<scalar_t>(), sh, Kc.data(), cmean.data(), cm2.data());
  });
  const float S = static_cast<float>(sh.S);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      float mu, r;
      group_stats(cmean.data() + n * C + g * sh.cpg, cm2.data() + n * C + g * sh.cpg, sh.cpg, S, eps, mu, r);
      mrel[n * G + g] = mu;
      pm[n * G + g] = Kc[n * C + g * sh.cpg] + mu;
      pr[n * G + g] = r;
    }
  fold(sh, mrel.data(), pr, w, b, s, t, A.data(), B.data(), mean_c.data());
  FASTDIFF_DISPATCH_FLOATING(x.scalar_type(), "group_norm_cpu", [&] {
    auto fn = act_code == 1 ? apply<scalar_t, true> : apply<scalar_t, false>;
    fn(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), A.data(), B.data(), Kc.data(), sh, stream_output(x));
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& mean_in, const at::Tensor& rstd_in, int64_t G,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, c10::string_view activation) {
  TORCH_CHECK(x.dim() >= 2, "x: expected (N, C, *spatial), got ", x.dim(), " dims");
  TORCH_CHECK(G > 0 && x.size(1) % G == 0, "num_groups: ", G, " must divide the ", x.size(1), " channels");
  TORCH_CHECK(grad_y_in.sizes() == x.sizes(), "grad_y: expected shape ", x.sizes(), ", got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.scalar_type() == x.scalar_type(), "grad_y: expected dtype ", x.scalar_type());
  const int act_code = activation_code(activation);
  const int64_t N = x.size(0), C = x.size(1);
  check_param(weight, "weight", {C}, x);
  check_param(bias, "bias", {C}, x);
  check_param(scale, "scale", {N, C}, x);
  check_param(shift, "shift", {N, C}, x);
  TORCH_CHECK(mean_in.numel() == N * G && rstd_in.numel() == N * G, "mean/rstd: expected ", N * G, " values");
  if (x.numel() == 0) {  // no values (N, C or a spatial dim of 0): y is empty, so every gradient is zero
    auto grad_of = [&](const c10::optional<at::Tensor>& p) {
      return p.has_value() ? at::zeros(p->sizes(), p->options()) : at::empty({0}, x.options());
    };
    return {at::empty_like(x), grad_of(weight), grad_of(bias), grad_of(scale), grad_of(shift)};
  }
  const Shape sh = shape_of(x, G);
  // grad_y must share x's layout for the fused passes; copy only when it does not.
  at::Tensor grad_y = grad_y_in.strides() == x.strides() ? grad_y_in : at::empty_like(x).copy_(grad_y_in);
  at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  const Param w = param_f32(weight), b = param_f32(bias), s = param_f32(scale), t = param_f32(shift);

  at::Tensor gx = empty_output(x);
  at::Tensor S1 = at::zeros({N, C}, x.options().dtype(at::kFloat));
  at::Tensor S2 = at::zeros({N, C}, x.options().dtype(at::kFloat));
  std::vector<float> A(N * C), B(N * C), mean_c(N * C), P(N * C), Q(N * C), Rr(N * C), Kc(N * C), mrel(N * G);
  const float* pm = mean.data_ptr<float>();
  const float* pr = rstd.data_ptr<float>();
  if (x.numel() > 0) {
    // the forward's pivots again, so x - K is formed exactly as it was there
    FASTDIFF_DISPATCH_FLOATING(x.scalar_type(), "group_norm_backward_cpu",
                               [&] { group_pivots<scalar_t>(x.const_data_ptr<scalar_t>(), sh, Kc.data()); });
  }
  for (int64_t ng = 0; ng < N * G; ++ng) mrel[ng] = pm[ng] - Kc[(ng / G) * C + (ng % G) * sh.cpg];
  fold(sh, mrel.data(), pr, w, b, s, t, A.data(), B.data(), mean_c.data());
  float* s1 = S1.data_ptr<float>();
  float* s2 = S2.data_ptr<float>();  // sum gz (x - mean); times rstd gives sum gz xhat
  const float M = static_cast<float>(sh.cpg * sh.S);
  const int64_t nc_grain = std::max<int64_t>(1, kPerChannelGrain / std::max<int64_t>(C, 1));  // samples per task
  // grad_x = P gz + Q (x - mean) + R per (n, c) of group g of sample n, from S1 and S2
  auto fold_pqr_group = [&](int64_t n, int64_t g) {
    const float r = pr[n * G + g];
#if FASTDIFF_AVX512
    // 16 channels at a time (sums added lane-wise, then across lanes)
    const int64_t c0 = g * sh.cpg, o = n * C + c0;
    __m512 v1 = _mm512_setzero_ps(), v2 = _mm512_setzero_ps();
    for_vectors(sh.cpg, [&](int64_t i, __mmask16 m) {
      const int64_t c = c0 + i;
      const __m512 sv = param16(s, n * s.s0 + c * s.s1, s.s1, m, 0.f);
      const __m512 gc = _mm512_mul_ps(param16(w, c * w.s0, w.s0, m, 1.f), _mm512_add_ps(_mm512_set1_ps(1.f), sv));
      v1 = _mm512_fmadd_ps(gc, _mm512_maskz_loadu_ps(m, s1 + o + i), v1);
      v2 = _mm512_fmadd_ps(gc, _mm512_maskz_loadu_ps(m, s2 + o + i), v2);
      _mm512_mask_storeu_ps(P.data() + o + i, m, _mm512_mul_ps(_mm512_set1_ps(r), gc));
    });
    const float m1 = _mm512_reduce_add_ps(v1) / M, m2 = _mm512_reduce_add_ps(v2) * r / M;
    std::fill(Q.data() + o, Q.data() + o + sh.cpg, -r * r * m2);
    std::fill(Rr.data() + o, Rr.data() + o + sh.cpg, -r * m1);
#else
    float m1 = 0.f, m2 = 0.f;
    for (int64_t c = g * sh.cpg; c < (g + 1) * sh.cpg; ++c) {
      const int64_t nc = n * C + c;
      const float gc = w.at(c, 1.f) * (1.f + s.at(n, c, 0.f));
      m1 += gc * s1[nc];
      m2 += gc * s2[nc] * r;
    }
    m1 /= M;
    m2 /= M;
    for (int64_t c = g * sh.cpg; c < (g + 1) * sh.cpg; ++c) {
      const int64_t nc = n * C + c;
      P[nc] = r * w.at(c, 1.f) * (1.f + s.at(n, c, 0.f));
      Q[nc] = -r * r * m2;
      Rr[nc] = -r * m1;
    }
#endif
  };
  // the same for samples n0 .. n1 - 1
  auto fold_pqr = [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < G; ++g) fold_pqr_group(n, g);
  };
  bool done = false;
#if FASTDIFF_AVX512
  if (x.numel() > 0) {
    FASTDIFF_DISPATCH_FLOATING(x.scalar_type(), "group_norm_backward_cpu", [&] {
      const scalar_t* pgy = grad_y.const_data_ptr<scalar_t>();
      const scalar_t* px = x.const_data_ptr<scalar_t>();
      scalar_t* pgx = gx.data_ptr<scalar_t>();
      // channels-last: prefetch the next sweep's rows where the tensors outgrow the cache (the threshold of y's
      // non-temporal stores); in cache the prefetches only cost instructions (0.8-0.9x measured)
      const bool prefetch = stream_output(x);
      // fp32 channels-first (maps over 2x4): block by block (see backward_avx512) where x outgrows two L2s, a
      // block's x, gy and gx fit in three quarters of one, and there are blocks enough for the threads. Measured
      // on the 2-core Intel VM (2 MB L2), fp32 AdaGN + SiLU, medians of 5 rounds alternating in one process
      // against the two-pass loops, two runs: (2, 320, 64, 64) 1.06-1.16x, (2, 640, 64, 64) 1.07-1.42x,
      // (2, 1280, 32, 32) 1.17-1.46x, (4, 512, 64, 64) 1.10-1.18x, (8, 128, 16, 16, 16) 1.11-1.15x. But smaller
      // tensors, (2, 320, 16, 16) and (2, 1280, 16, 16), 0.88-0.93x (the statistics cost more than the traffic
      // they save), and fp16 and bf16 (compute-bound: gz is formed twice) 0.93-1.00x: they keep the two passes.
      const bool blocks = std::is_same_v<scalar_t, float> && sh.layout == Layout::kChannelsFirst &&
                          sh.S > kShortRowBackward && N * G >= 2 * at::get_num_threads() &&
                          static_cast<int64_t>(x.nbytes()) >= 2 * l2_bytes() &&
                          3 * sh.cpg * sh.S * static_cast<int64_t>(sizeof(scalar_t)) <= l2_bytes() * 3 / 4;
      auto refold = [&](int64_t n, int64_t g, float mu) {
        const int64_t o = n * C + g * sh.cpg;
        fold_block(w, b, s, t, n, g * sh.cpg, sh.cpg, pr[n * G + g], mu, A.data() + o, B.data() + o, nullptr,
                   nullptr);
        std::fill(mean_c.data() + o, mean_c.data() + o + sh.cpg, mu);
      };
      if (act_code == 1)
        backward_avx512<true>(pgy, px, pgx, A.data(), B.data(), Kc.data(), mean_c.data(), P.data(), Q.data(),
                              Rr.data(), sh, s1, s2, fold_pqr, fold_pqr_group, refold, prefetch, blocks);
      else
        backward_avx512<false>(pgy, px, pgx, A.data(), B.data(), Kc.data(), mean_c.data(), P.data(), Q.data(),
                               Rr.data(), sh, s1, s2, fold_pqr, fold_pqr_group, refold, prefetch, blocks);
    });
    done = true;
  }
#endif
  if (!done) {
    if (x.numel() > 0) {
      FASTDIFF_DISPATCH_FLOATING(x.scalar_type(), "group_norm_backward_cpu", [&] {
        auto fn = act_code == 1 ? backward_sums<scalar_t, true> : backward_sums<scalar_t, false>;
        fn(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), A.data(), B.data(), Kc.data(),
           mean_c.data(), sh, s1, s2);
      });
    }
    at::parallel_for(0, N, nc_grain, fold_pqr);
    if (x.numel() > 0) {
      FASTDIFF_DISPATCH_FLOATING(x.scalar_type(), "group_norm_backward_cpu", [&] {
        auto fn = act_code == 1 ? backward_apply<scalar_t, true> : backward_apply<scalar_t, false>;
        fn(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), A.data(),
           B.data(), P.data(), Q.data(), Rr.data(), Kc.data(), mean_c.data(), sh);
      });
    }
  }
  // Parameter gradients from S1, S2: plain loops over (n, c) (a dozen small tensor ops cost more than the
  // passes at 8 x 8 maps). xhat_sum = sum gz xhat = S2 rstd; h = xhat w + b.
  at::Tensor gw32 = at::zeros({C}, S1.options()), gb32 = at::zeros({C}, S1.options());
  at::Tensor gs32 = at::empty({N, C}, S1.options());
  float *gwp = gw32.data_ptr<float>(), *gbp = gb32.data_ptr<float>(), *gsp = gs32.data_ptr<float>();
  // parallel over channel ranges (each channel's sums over n stay in order: deterministic)
#if FASTDIFF_AVX512
  // 16 channels of one group at a time (groups split across tasks, whole)
  at::parallel_for(0, G, std::max<int64_t>(1, kPerChannelGrain / std::max<int64_t>(N * sh.cpg, 1)), [&](int64_t g0,
                                                                                                       int64_t g1) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = g0; g < g1; ++g) {
        const __m512 r = _mm512_set1_ps(pr[n * G + g]);
        for_vectors(sh.cpg, [&](int64_t i, __mmask16 m) {
          const int64_t c = g * sh.cpg + i, nc = n * C + c;
          const __m512 xs = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s2 + nc), r);
          const __m512 v1 = _mm512_maskz_loadu_ps(m, s1 + nc);
          const __m512 one_s = _mm512_add_ps(_mm512_set1_ps(1.f), param16(s, n * s.s0 + c * s.s1, s.s1, m, 0.f));
          _mm512_mask_storeu_ps(gwp + c, m, _mm512_fmadd_ps(one_s, xs, _mm512_maskz_loadu_ps(m, gwp + c)));
          _mm512_mask_storeu_ps(gbp + c, m, _mm512_fmadd_ps(one_s, v1, _mm512_maskz_loadu_ps(m, gbp + c)));
          _mm512_mask_storeu_ps(gsp + nc, m,
                                _mm512_fmadd_ps(xs, param16(w, c * w.s0, w.s0, m, 1.f),
                                                _mm512_mul_ps(v1, param16(b, c * b.s0, b.s0, m, 0.f))));
        });
      }
  });
#else
  at::parallel_for(0, C, std::max<int64_t>(1, kPerChannelGrain / std::max<int64_t>(N, 1)), [&](int64_t c0,
                                                                                                int64_t c1) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = c0, g = c0 / sh.cpg, k = c0 % sh.cpg; c < c1; ++c, k = k + 1 == sh.cpg ? (++g, 0) : k + 1) {
        const int64_t nc = n * C + c;
        const float xs = s2[nc] * pr[n * G + g];
        const float one_s = 1.f + s.at(n, c, 0.f);
        gwp[c] += one_s * xs;
        gbp[c] += one_s * s1[nc];
        gsp[nc] = xs * w.at(c, 1.f) + s1[nc] * b.at(c, 0.f);
      }
  });
#endif
  auto empty = [&] { return at::empty({0}, x.options()); };  // distinct tensors: outputs must not alias
  at::Tensor g_w = weight.has_value() ? gw32.to(weight->scalar_type()) : empty();
  at::Tensor g_b = bias.has_value() ? gb32.to(bias->scalar_type()) : empty();
  at::Tensor g_s = scale.has_value() ? gs32.to(scale->scalar_type()) : empty();
  at::Tensor g_t = shift.has_value() ? S1.to(shift->scalar_type()) : empty();
  return {gx, g_w, g_b, g_s, g_t};
}

}  // namespace

std::string cpu_kernels() { return FASTDIFF_AVX512 ? "avx512" : "portable"; }

int64_t cpu_cache_bytes() { return llc_bytes(); }

int64_t set_cpu_cache_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "bytes: expected a cache size in bytes, or 0 to go back to the detected one; got ", bytes);
  return g_cache_override.exchange(bytes);
}

int64_t cpu_l2_bytes() { return l2_bytes(); }

int64_t set_cpu_l2_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "bytes: expected an L2 size in bytes, or 0 to go back to the detected one; got ", bytes);
  return g_l2_override.exchange(bytes);
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("group_norm", &group_norm_cpu);
  m.impl("group_norm_backward", &group_norm_backward_cpu);
}

}  // namespace fastdiff
