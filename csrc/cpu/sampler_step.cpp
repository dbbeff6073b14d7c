// The fused sampler step on the CPU (math in csrc/common/sampler_step.h, noise in csrc/common/philox.h).
//
// Algorithm: the batch is split into rows (one per sample) and each row into chunks of kChunk elements that
// live in L1; each chunk goes through a few short branch-free loops (guidance -> x0 -> clip -> update ->
// noise) whose mode branches are hoisted out of the inner loops, so every loop vectorises. The Gaussian noise
// is Philox4x32-10 + Box-Muller with polynomial log / sin / cos (about 1 ulp on their ranges) so it
// vectorises too; the CUDA and Triton kernels compute the same numbers with their native log/sin/cos.
// Cost: one read of x, the model output(s) (and noise / the x0 history / variance when used), one write of x_prev
// (and of x0 and the history moved down one buffer, for a multistep solver); one pass, no temporaries the size of
// the input.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>

#include "common/check.h"
#include "common/philox.h"
#include "common/sampler_step.h"
#include "cpu/vec.h"

namespace fastdiff {
namespace {

using namespace sampler;

constexpr int64_t kChunk = 1024;  // multiple of 4

inline float as_float(int32_t i) { return __builtin_bit_cast(float, i); }
inline int32_t as_int(float f) { return __builtin_bit_cast(int32_t, f); }

// Natural log for x in (0, 1], branch-free (Cephes logf polynomial, ~1 ulp). The mantissa is folded into
// [sqrt(1/2), sqrt(2)) with integer ops only: a float compare-and-select here stops GCC from vectorising.
inline float log_f(float x) {
  const int32_t bits = as_int(x);
  const int32_t mant = bits & 0x007fffff;
  const int32_t small = static_cast<int32_t>(mant < 0x3504f3);  // mantissa value in [0.5, sqrt(1/2))
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 126 - small);
  const float m = as_float(mant | 0x3f000000 | (small << 23)) - 1.f;  // m - 1, or 2m - 1 when small
  const float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// sqrt(y) for y > 0 as y / sqrt(y) with a bit-trick rsqrt and three Newton steps (~1 ulp): std::sqrt keeps its
// errno branch without -fno-math-errno, and that branch stops the noise loop from vectorising.
inline float sqrt_pos(float y) {
  float r = as_float(0x5f375a86 - (as_int(y) >> 1));
  r = r * (1.5f - 0.5f * y * r * r);
  r = r * (1.5f - 0.5f * y * r * r);
  r = r * (1.5f - 0.5f * y * r * r);
  return y * r;
}

// (cos 2 pi t, sin 2 pi t) for t in [0, 1), branch-free: quarter-turn reduction, minimax polynomials on
// [-pi/4, pi/4]. Rounding by the 1.5 * 2^23 trick (not nearbyint, a library call) so the loop vectorises.
inline void sincos_2pi(float t, float& c, float& s) {
  const float q = (4.f * t + 12582912.f) - 12582912.f;  // round(4 t), 0..4
  const float th = 6.283185307179586f * (t - 0.25f * q);
  const float z = th * th;
  const float sp = th + th * z * (-1.6666654611E-1f + z * (8.3321608736E-3f + z * -1.9515295891E-4f));
  const float cp =
      1.f - 0.5f * z + z * z * (4.166664568298827E-2f + z * (-1.388731625493765E-3f + z * 2.443315711809948E-5f));
  const int qi = static_cast<int>(q);
  // rotate by qi quarter turns: odd turns swap (c, s) -> (-s, c); turns 2 and 3 negate both (arithmetic selects)
  const float odd = static_cast<float>(qi & 1), sign = 1.f - static_cast<float>(qi & 2);
  c = sign * (cp + odd * (-sp - cp));
  s = sign * (sp + odd * (cp - sp));
}

// z[j] for the global element indices e0 .. e0 + len - 1. Philox and Box-Muller run as two SIMD loops over the
// four-element groups (32x32->64-bit multiplies vectorise as vpmuludq).
void philox_normals(uint64_t seed, uint32_t step, int64_t e0, int64_t len, float* z) {
  const int64_t q0 = e0 >> 2, q1 = (e0 + len - 1) >> 2;
  const int ng = static_cast<int>(q1 - q0 + 1);
  alignas(64) uint32_t r0[kChunk / 4 + 2], r1[kChunk / 4 + 2], r2[kChunk / 4 + 2], r3[kChunk / 4 + 2];
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  const uint64_t qb = static_cast<uint64_t>(q0);
#pragma omp simd
  for (int g = 0; g < ng; ++g) {
    const uint64_t q = qb + static_cast<uint64_t>(g);
    uint32_t c0 = static_cast<uint32_t>(q), c1 = static_cast<uint32_t>(q >> 32), c2 = step, c3 = 0u;
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(philox::kM0) * c0;
      const uint64_t p1 = static_cast<uint64_t>(philox::kM1) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      k0 += philox::kW0;
      k1 += philox::kW1;
    }
    r0[g] = c0;
    r1[g] = c1;
    r2[g] = c2;
    r3[g] = c3;
  }
  alignas(64) float zz[kChunk + 8];
  alignas(64) float za[kChunk / 4 + 2], zb[kChunk / 4 + 2], zc[kChunk / 4 + 2], zd[kChunk / 4 + 2];
#pragma omp simd
  for (int g = 0; g < ng; ++g) {
    const float rad0 = sqrt_pos(-2.f * log_f(philox::uniform(r0[g])));
    const float rad1 = sqrt_pos(-2.f * log_f(philox::uniform(r2[g])));
    float c0, s0, c1, s1;
    sincos_2pi(philox::uniform(r1[g]), c0, s0);
    sincos_2pi(philox::uniform(r3[g]), c1, s1);
    za[g] = rad0 * c0;
    zb[g] = rad0 * s0;
    zc[g] = rad1 * c1;
    zd[g] = rad1 * s1;
  }
  for (int g = 0; g < ng; ++g) {
    zz[4 * g + 0] = za[g];
    zz[4 * g + 1] = zb[g];
    zz[4 * g + 2] = zc[g];
    zz[4 * g + 3] = zd[g];
  }
  const int64_t off = e0 - 4 * q0;
  std::memcpy(z, zz + off, sizeof(float) * len);
}

struct Params {
  int64_t N, L;
  int64_t sx, sm, su, sz, sb, sv, so, sb2, sb3;  // row (sample) strides
  float g, clip_range;
  const float* row;
  const float* thr;
  uint64_t seed;
  uint32_t step;
  int var_mode, clip_mode;
  bool stochastic;
};

// One chunk's update in a single loop: read x, the model output(s) (and x0_prev, z), write x_prev (and x0).
// kU: classifier-free guidance (uncond given); kPrev: 0 no x0 buffer, 1 write x0 only, 2 read x0_prev and write
// x0, 3 two buffers (third-order solvers), 4 three (PLMS): read x0_prev (x0_prev2, x0_prev3), write x0 and move
// each value one buffer down; each read value enters the sum only where its coefficient is nonzero (a select, as
// the loop must stay branch-free), and where the row's KEEP is set every buffer is written back unchanged.
// kNoise: add S * zb (zb already holds z, times the learned std when var_mode != fixed). Clipping is
// branch-free: x0 = min(max(x0, lo), hi) * inv, with lo = -inf, hi = inf, inv = 1 when there is none (that order
// keeps a NaN a NaN, as torch.clamp does).
template <typename T, bool kU, int kPrev, bool kNoise>
inline void update_chunk(const float* c, float g, float lo, float hi, float inv, const T* px, const T* pm,
                         const T* pu, T* pb, T* pb2, T* pb3, const float* zb, T* po, int64_t len) {
#if FASTDIFF_AVX512
  if constexpr (!std::is_same_v<T, float>) {
    // fp16/bf16: the chunk widened to fp32 16 values at a time, the fp32 loop, narrowed back with the same
    // rounding (c10's scalar conversions inside the loop kept it from vectorising: 5x the fp32 time)
    alignas(64) float bx[kChunk], bm[kChunk], bu[kChunk], bb[kChunk], bb2[kChunk], bb3[kChunk], bo[kChunk];
    to_float(px, bx, len);
    to_float(pm, bm, len);
    if constexpr (kU) to_float(pu, bu, len);
    if constexpr (kPrev >= 2) to_float(pb, bb, len);
    if constexpr (kPrev >= 3) to_float(pb2, bb2, len);
    if constexpr (kPrev == 4) to_float(pb3, bb3, len);
    update_chunk<float, kU, kPrev, kNoise>(c, g, lo, hi, inv, bx, bm, bu, bb, bb2, bb3, zb, bo, len);
    from_float(bo, po, len);
    if constexpr (kPrev != 0) from_float(bb, pb, len);
    if constexpr (kPrev >= 3) from_float(bb2, pb2, len);  // values that came from this dtype: exact
    if constexpr (kPrev == 4) from_float(bb3, pb3, len);
    return;
  }
#endif
  const float PX = c[kPX], PM = c[kPM], A = c[kA], B = c[kB], C = c[kC], D = c[kD], S = c[kS], E = c[kE],
              F = c[kF];
  const bool use_d = D != 0.f, use_e = E != 0.f, use_f = F != 0.f, keep = c[kKeep] != 0.f;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float xf = static_cast<float>(px[j]);
    float mb = static_cast<float>(pm[j]);
    if constexpr (kU) {
      const float uu = static_cast<float>(pu[j]);
      mb = uu + g * (mb - uu);
    }
    const float x0 = std::min(std::max(PX * xf + PM * mb, lo), hi) * inv;
    float acc = A * xf + B * mb + C * x0;
    if constexpr (kPrev >= 2) {
      const float p1 = static_cast<float>(pb[j]);
      acc += use_d ? D * p1 : 0.f;
      if constexpr (kPrev >= 3) {
        const float p2 = static_cast<float>(pb2[j]);
        acc += use_e ? E * p2 : 0.f;
        if constexpr (kPrev == 4) {
          const float p3 = static_cast<float>(pb3[j]);
          acc += use_f ? F * p3 : 0.f;
          pb3[j] = static_cast<T>(keep ? p3 : p2);
        }
        pb2[j] = static_cast<T>(keep ? p2 : p1);
      }
      pb[j] = static_cast<T>(keep ? p1 : x0);
    } else if constexpr (kPrev == 1) {
      pb[j] = static_cast<T>(x0);
    }
    if constexpr (kNoise) acc += S * zb[j];
    po[j] = static_cast<T>(acc);
  }
}

template <typename T, bool kU, int kPrev, bool kNoise>
void run_fused(const Params& p, const T* x, const T* m, const T* u, const T* zin, T* x0b, T* x0b2, T* x0b3,
               const T* v, T* out) {
  const float* c = p.row;
  const float MINL = c[kMinLog], MAXL = c[kMaxLog];
  const int64_t chunks = (p.L + kChunk - 1) / kChunk;
  const float inf = std::numeric_limits<float>::infinity();
  // grain: about 16 K elements per task, so a small latent is not split into more tasks than it is worth
  const int64_t grain = std::max<int64_t>(1, (16 * 1024) / kChunk);
  at::parallel_for(0, p.N * chunks, grain, [&](int64_t b, int64_t e) {
    alignas(64) float zb[kChunk];
    for (int64_t job = b; job < e; ++job) {
      const int64_t n = job / chunks, l0 = (job % chunks) * kChunk;
      const int64_t len = std::min(kChunk, p.L - l0);
      float lo = -inf, hi = inf, inv = 1.f;
      if (p.clip_mode == kClipRange) {
        lo = -p.clip_range;
        hi = p.clip_range;
      } else if (p.clip_mode == kClipThreshold) {
        hi = p.thr[n];
        lo = -hi;
        inv = 1.f / hi;
      }
      if constexpr (kNoise) {
        if (zin != nullptr) {
          const T* pz = zin + n * p.sz + l0;
#if FASTDIFF_AVX512
          to_float(pz, zb, len);
#else
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) zb[j] = static_cast<float>(pz[j]);
#endif
        } else {
          philox_normals(p.seed, p.step, n * p.L + l0, len, zb);
        }
        if (p.var_mode == kVarLearned) {
          const T* pv = v + n * p.sv + l0;
          for (int64_t j = 0; j < len; ++j) zb[j] *= std::sqrt(static_cast<float>(pv[j]));
        } else if (p.var_mode == kVarLearnedRange) {
          const T* pv = v + n * p.sv + l0;
          for (int64_t j = 0; j < len; ++j) {
            const float f = 0.5f * (static_cast<float>(pv[j]) + 1.f);
            zb[j] *= std::exp(0.5f * (f * MAXL + (1.f - f) * MINL));
          }
        }
      }
      update_chunk<T, kU, kPrev, kNoise>(c, p.g, lo, hi, inv, x + n * p.sx + l0, m + n * p.sm + l0,
                                         kU ? u + n * p.su + l0 : nullptr,
                                         kPrev != 0 ? x0b + n * p.sb + l0 : nullptr,
                                         kPrev >= 3 ? x0b2 + n * p.sb2 + l0 : nullptr,
                                         kPrev == 4 ? x0b3 + n * p.sb3 + l0 : nullptr, zb, out + n * p.so + l0, len);
    }
  });
}

// Picks the instantiation: whether uncond is read, how the x0 buffers are used, whether noise is added.
template <typename T>
void run(const Params& p, const T* x, const T* m, const T* u, const T* zin, T* x0b, T* x0b2, T* x0b3, const T* v,
         T* out) {
  const bool noise = p.stochastic && p.row[kS] != 0.f;
  // one buffer: written only (kPrev 1) unless D reads it or KEEP has it written back as it was (2)
  const int prev = x0b == nullptr ? 0
                   : x0b3 != nullptr ? 4
                   : x0b2 != nullptr ? 3
                   : (p.row[kD] != 0.f || p.row[kKeep] != 0.f) ? 2 : 1;
  auto go = [&](auto kU, auto kN) {
    constexpr bool U = decltype(kU)::value, N = decltype(kN)::value;
    switch (prev) {
      case 0: return run_fused<T, U, 0, N>(p, x, m, u, zin, x0b, x0b2, x0b3, v, out);
      case 1: return run_fused<T, U, 1, N>(p, x, m, u, zin, x0b, x0b2, x0b3, v, out);
      case 2: return run_fused<T, U, 2, N>(p, x, m, u, zin, x0b, x0b2, x0b3, v, out);
      case 3: return run_fused<T, U, 3, N>(p, x, m, u, zin, x0b, x0b2, x0b3, v, out);
      default: return run_fused<T, U, 4, N>(p, x, m, u, zin, x0b, x0b2, x0b3, v, out);
    }
  };
  if (u != nullptr) {
    if (noise) go(std::true_type{}, std::true_type{});
    else go(std::true_type{}, std::false_type{});
  } else {
    if (noise) go(std::false_type{}, std::true_type{});
    else go(std::false_type{}, std::false_type{});
  }
}

int64_t row_stride(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), name, ": expected shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, ": expected device ", x.device(), ", got ", t.device());
  for (int64_t d = 1; d < x.dim(); ++d)
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) == x.stride(d), name,
                ": each sample must be laid out like x's (strides ", x.strides(), "), got ", t.strides());
  return x.size(0) == 1 ? 0 : t.stride(0);
}

// Whether a and b share a byte of memory: ATen's answer where it has one, else (a tensor with gaps between its
// samples) whether their extents in the same storage intersect.
bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  const at::MemOverlapStatus st = at::get_overlap_status(a, b);
  if (st == at::MemOverlapStatus::Full || st == at::MemOverlapStatus::Partial) return true;
  if (st == at::MemOverlapStatus::No) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  auto extent = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
    return std::make_pair(lo, lo + static_cast<uintptr_t>((last + 1) * t.element_size()));
  };
  const auto [a0, a1] = extent(a);
  const auto [b0, b1] = extent(b);
  return a0 < b1 && b0 < a1;
}

// A buffer the kernel overwrites in place: its samples must not overlap one another (a stride-0 expand would have
// every sample write the same memory) and it must share no memory with another argument (threads would write what
// others still read, or two buffers the same values).
void check_written(const c10::optional<at::Tensor>& buf, const char* name, int64_t L,
                   std::initializer_list<std::pair<const c10::optional<at::Tensor>*, const char*>> others) {
  if (!buf.has_value()) return;
  TORCH_CHECK(buf->size(0) == 1 || buf->stride(0) >= L, name, ": its samples overlap in memory (stride ",
              buf->stride(0), " for ", L, " values per sample); the kernel writes it in place");
  for (const auto& [other, oname] : others)
    if (other->has_value())
      TORCH_CHECK(!shares_memory(*buf, **other), name, ": shares memory with ", oname, " (the kernel writes ", name,
                  " in place)");
}

}  // namespace

// Shared argument checks of the CPU and CUDA entry points; fills the row strides.
void sampler_step_check(const at::Tensor& x, const at::Tensor& model_output, const c10::optional<at::Tensor>& uncond,
                        const at::Tensor& table, const at::Tensor& step, const c10::optional<at::Tensor>& noise,
                        const c10::optional<at::Tensor>& x0_buf, const c10::optional<at::Tensor>& var_values,
                        const c10::optional<at::Tensor>& thresh, int64_t var_mode, int64_t clip_mode,
                        const c10::optional<at::Tensor>& x0_buf2, const c10::optional<at::Tensor>& x0_buf3,
                        int64_t strides[8]) {
  TORCH_CHECK(x.dim() >= 1 && x.numel() > 0, "x: expected a non-empty (N, ...) tensor");
  const int64_t N = x.size(0), L = x.numel() / N;
  TORCH_CHECK(x.is_non_overlapping_and_dense() && (N == 1 || x.stride(0) == L),
              "x: each sample must be one dense block of memory (contiguous or channels-last)");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == kCols && table.scalar_type() == at::kFloat &&
                  table.is_contiguous() && table.device() == x.device() && table.size(0) > 0,
              "table: expected a contiguous (num_steps, ", kCols, ") float32 tensor on ", x.device());
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong && step.device() == x.device(),
              "step: expected a one-element int64 tensor on ", x.device());
  TORCH_CHECK(var_mode >= 0 && var_mode <= 2, "var_mode: expected 0, 1 or 2, got ", var_mode);
  TORCH_CHECK(clip_mode >= 0 && clip_mode <= 2, "clip_mode: expected 0, 1 or 2, got ", clip_mode);
  strides[0] = row_stride(model_output, x, "model_output");
  strides[1] = uncond.has_value() ? row_stride(*uncond, x, "uncond") : 0;
  strides[2] = noise.has_value() ? row_stride(*noise, x, "noise") : 0;
  strides[3] = x0_buf.has_value() ? row_stride(*x0_buf, x, "x0_buf") : 0;
  strides[4] = var_values.has_value() ? row_stride(*var_values, x, "var_values") : 0;
  strides[5] = N == 1 ? 0 : x.stride(0);
  strides[6] = x0_buf2.has_value() ? row_stride(*x0_buf2, x, "x0_buf2") : 0;
  TORCH_CHECK(!x0_buf2.has_value() || x0_buf.has_value(), "x0_buf2: given without x0_buf (it holds the x0 before "
              "the one in x0_buf)");
  TORCH_CHECK(!x0_buf2.has_value() || x0_buf2->data_ptr() != x0_buf->data_ptr(),
              "x0_buf2: must be a different tensor from x0_buf");
  strides[7] = x0_buf3.has_value() ? row_stride(*x0_buf3, x, "x0_buf3") : 0;
  TORCH_CHECK(!x0_buf3.has_value() || x0_buf2.has_value(), "x0_buf3: given without x0_buf2 (it holds the x0 "
              "before the one in x0_buf2)");
  TORCH_CHECK(!x0_buf3.has_value() || (x0_buf3->data_ptr() != x0_buf->data_ptr() &&
                                       x0_buf3->data_ptr() != x0_buf2->data_ptr()),
              "x0_buf3: must be a different tensor from x0_buf and x0_buf2");
  {
    const c10::optional<at::Tensor> xo = x, mo = model_output;
    check_written(x0_buf, "x0_buf", L,
                  {{&xo, "x"}, {&mo, "model_output"}, {&uncond, "uncond"}, {&noise, "noise"},
                   {&var_values, "var_values"}, {&x0_buf2, "x0_buf2"}, {&x0_buf3, "x0_buf3"}});
    check_written(x0_buf2, "x0_buf2", L,
                  {{&xo, "x"}, {&mo, "model_output"}, {&uncond, "uncond"}, {&noise, "noise"},
                   {&var_values, "var_values"}, {&x0_buf3, "x0_buf3"}});
    check_written(x0_buf3, "x0_buf3", L,
                  {{&xo, "x"}, {&mo, "model_output"}, {&uncond, "uncond"}, {&noise, "noise"},
                   {&var_values, "var_values"}});
  }
  TORCH_CHECK(var_mode == 0 || var_values.has_value(), "var_values: required when var_mode is ", var_mode);
  if (clip_mode == kClipThreshold) {
    TORCH_CHECK(thresh.has_value() && thresh->numel() == N && thresh->scalar_type() == at::kFloat &&
                    thresh->is_contiguous() && thresh->device() == x.device(),
                "thresh: expected a contiguous float32 tensor of ", N, " per-sample thresholds on ", x.device());
  }
}

namespace {

at::Tensor sampler_step_cpu(const at::Tensor& x, const at::Tensor& model_output,
                            const c10::optional<at::Tensor>& uncond, double guidance_scale, const at::Tensor& table,
                            const at::Tensor& step,
                            const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& x0_buf,
                            const c10::optional<at::Tensor>& var_values, const c10::optional<at::Tensor>& thresh,
                            int64_t seed, int64_t var_mode, int64_t clip_mode, double clip_range, bool stochastic,
                            const c10::optional<at::Tensor>& x0_buf2, const c10::optional<at::Tensor>& x0_buf3) {
  int64_t st[8];
  sampler_step_check(x, model_output, uncond, table, step, noise, x0_buf, var_values, thresh, var_mode, clip_mode,
                     x0_buf2, x0_buf3, st);
  at::Tensor out = at::empty_like(x);
  Params p;
  p.N = x.size(0);
  p.L = x.numel() / p.N;
  p.sm = st[0];
  p.su = st[1];
  p.sz = st[2];
  p.sb = st[3];
  p.sv = st[4];
  p.sx = st[5];
  p.sb2 = st[6];
  p.sb3 = st[7];
  p.so = p.N == 1 ? 0 : out.stride(0);
  p.g = static_cast<float>(guidance_scale);
  p.clip_range = static_cast<float>(clip_range);
  // The step lives in host memory here, so reading it is free; out-of-range steps are clamped, as on the GPU.
  const int64_t i = std::min<int64_t>(std::max<int64_t>(*step.const_data_ptr<int64_t>(), 0), table.size(0) - 1);
  p.row = table.const_data_ptr<float>() + i * kCols;
  p.thr = clip_mode == kClipThreshold ? thresh->const_data_ptr<float>() : nullptr;
  p.seed = static_cast<uint64_t>(seed);
  p.step = static_cast<uint32_t>(i);
  p.var_mode = static_cast<int>(var_mode);
  p.clip_mode = static_cast<int>(clip_mode);
  p.stochastic = stochastic;
  FASTDIFF_DISPATCH_FLOATING(x.scalar_type(), "sampler_step_cpu", [&] {
    auto ptr = [](const c10::optional<at::Tensor>& t) -> const scalar_t* {
      return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
    };
    run<scalar_t>(p, x.const_data_ptr<scalar_t>(), model_output.const_data_ptr<scalar_t>(), ptr(uncond), ptr(noise),
                  x0_buf.has_value() ? x0_buf->data_ptr<scalar_t>() : nullptr,
                  x0_buf2.has_value() ? x0_buf2->data_ptr<scalar_t>() : nullptr,
                  x0_buf3.has_value() ? x0_buf3->data_ptr<scalar_t>() : nullptr, ptr(var_values),
                  out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("sampler_step", &sampler_step_cpu); }

}  // namespace fastdiff
