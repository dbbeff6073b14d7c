// The fused sampler step on CUDA (math in csrc/common/sampler_step.h, noise in csrc/common/philox.h).
//
// Algorithm: one thread per group of four consecutive elements 4q .. 4q+3, which is exactly one Philox4x32-10
// call (four words -> two Box-Muller pairs -> four normals), so no random bits are wasted. When every tensor
// is flat (each sample's row directly follows the previous one) and 4-element aligned, the thread moves its
// four elements with one vector load/store per tensor (16 B in fp32, 8 B in fp16/bf16); otherwise it
// addresses each element through its tensor's row stride (e.g. the halves of a [eps, variance] model output).
// The step index is read from device memory and the coefficient row from the table (both L1/L2 broadcasts), so
// the kernel is the same every step and replays inside a CUDA graph; it never syncs with the host.
// Cost: one read of x and of each model output (+ noise / the x0 history / variance when used), one write of
// x_prev (+ x0 and the history moved down one buffer, for multistep solvers): at fp32 with CFG
// 16 B/element, memory-bound; Philox adds ~20 integer ops per
// element, well under the H100's integer throughput at HBM speed.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/check.h"
#include "common/philox.h"
#include "common/sampler_step.h"

namespace fastdiff {

void sampler_step_check(const at::Tensor& x, const at::Tensor& model_output, const c10::optional<at::Tensor>& uncond,
                        const at::Tensor& table, const at::Tensor& step, const c10::optional<at::Tensor>& noise,
                        const c10::optional<at::Tensor>& x0_buf, const c10::optional<at::Tensor>& var_values,
                        const c10::optional<at::Tensor>& thresh, int64_t var_mode, int64_t clip_mode,
                        const c10::optional<at::Tensor>& x0_buf2, const c10::optional<at::Tensor>& x0_buf3,
                        int64_t strides[8]);

namespace {

using namespace sampler;

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
struct Args {
  const T* x;
  const T* m;
  const T* u;
  const T* z;
  T* b;
  T* b2;
  T* b3;
  const T* v;
  T* out;
  const float* thr;
  const float* table;
  const int64_t* step;
  int64_t total, L, n_steps;
  int64_t sx, sm, su, sz, sb, sv, so, sb2, sb3;
  float g, clip_range;
  uint64_t seed;
  int var_mode, clip_mode;
  bool stochastic, flat;
};

// clamp(v, lo, hi) that keeps a NaN a NaN, as torch.clamp and the CPU kernel do (fminf/fmaxf would turn it
// into a bound and hide the bad value)
__device__ __forceinline__ float clamp_keep_nan(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename T>
__device__ __forceinline__ void load4(const T* p, int64_t base, int64_t stride_row, int64_t L, bool flat, bool full,
                                      int64_t e0, int64_t total, float out[4]) {
  if (flat && full) {
    const Vec4<T> w = *reinterpret_cast<const Vec4<T>*>(p + base);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = static_cast<float>(w.v[k]);
    return;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t e = e0 + k;
    if (e < total) {
      const int64_t n = e / L;
      out[k] = static_cast<float>(p[n * stride_row + (e - n * L)]);
    } else {
      out[k] = 0.f;
    }
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, int64_t base, int64_t stride_row, int64_t L, bool flat, bool full,
                                       int64_t e0, int64_t total, const float val[4]) {
  if (flat && full) {
    Vec4<T> w;
#pragma unroll
    for (int k = 0; k < 4; ++k) w.v[k] = static_cast<T>(val[k]);
    *reinterpret_cast<Vec4<T>*>(p + base) = w;
    return;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t e = e0 + k;
    if (e < total) {
      const int64_t n = e / L;
      p[n * stride_row + (e - n * L)] = static_cast<T>(val[k]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) sampler_step_kernel(const Args<T> a) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t e0 = 4 * q;
  if (e0 >= a.total) return;
  const bool full = e0 + 4 <= a.total;
  int64_t st = *a.step;
  st = st < 0 ? 0 : (st >= a.n_steps ? a.n_steps - 1 : st);
  const float* row = a.table + st * kCols;
  const float PX = __ldg(row + kPX), PM = __ldg(row + kPM), A = __ldg(row + kA), B = __ldg(row + kB),
              C = __ldg(row + kC), D = __ldg(row + kD), S = __ldg(row + kS);

  float x[4], m[4], x0[4], acc[4];
  load4(a.x, e0, a.sx, a.L, a.flat, full, e0, a.total, x);
  load4(a.m, e0, a.sm, a.L, a.flat, full, e0, a.total, m);
  if (a.u != nullptr) {
    float u[4];
    load4(a.u, e0, a.su, a.L, a.flat, full, e0, a.total, u);
#pragma unroll
    for (int k = 0; k < 4; ++k) m[k] = u[k] + a.g * (m[k] - u[k]);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) x0[k] = PX * x[k] + PM * m[k];
  if (a.clip_mode == kClipRange) {
#pragma unroll
    for (int k = 0; k < 4; ++k) x0[k] = clamp_keep_nan(x0[k], -a.clip_range, a.clip_range);
  } else if (a.clip_mode == kClipThreshold) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t e = e0 + k < a.total ? e0 + k : a.total - 1;
      const float s = __ldg(a.thr + e / a.L);
      x0[k] = clamp_keep_nan(x0[k], -s, s) / s;
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) acc[k] = A * x[k] + B * m[k] + C * x0[k];
  if (a.b != nullptr) {
    // the x0 history: each buffer read where its coefficient uses it or the next buffer takes its value over
    // (x0_buf -> x0_buf2 -> x0_buf3), then every value moves one buffer down, unless the row says KEEP (PLMS's
    // warm-up step), which leaves them all as they are (a uniform branch: one row per launch)
    const bool keep = __ldg(row + kKeep) != 0.f;
    const float E = a.b2 != nullptr ? __ldg(row + kE) : 0.f, F = a.b3 != nullptr ? __ldg(row + kF) : 0.f;
    float p[4], p2[4];
    const bool move1 = !keep && a.b2 != nullptr, move2 = !keep && a.b3 != nullptr;
    if (D != 0.f || move1) load4<T>(a.b, e0, a.sb, a.L, a.flat, full, e0, a.total, p);
    if (E != 0.f || move2) load4<T>(a.b2, e0, a.sb2, a.L, a.flat, full, e0, a.total, p2);
    if (D != 0.f) {
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] += D * p[k];
    }
    if (E != 0.f) {
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] += E * p2[k];
    }
    if (F != 0.f) {
      float p3[4];
      load4<T>(a.b3, e0, a.sb3, a.L, a.flat, full, e0, a.total, p3);
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] += F * p3[k];
    }
    if (!keep) {
      if (move2) store4(a.b3, e0, a.sb3, a.L, a.flat, full, e0, a.total, p2);
      if (move1) store4(a.b2, e0, a.sb2, a.L, a.flat, full, e0, a.total, p);
      store4(a.b, e0, a.sb, a.L, a.flat, full, e0, a.total, x0);
    }
  }
  if (a.stochastic && S != 0.f) {
    float z[4];
    if (a.z != nullptr) {
      load4(a.z, e0, a.sz, a.L, a.flat, full, e0, a.total, z);
    } else {
      const philox::U4 r = philox::words(a.seed, static_cast<uint64_t>(q), static_cast<uint32_t>(st));
      const float rad0 = sqrtf(-2.f * logf(philox::uniform(r.x)));
      const float rad1 = sqrtf(-2.f * logf(philox::uniform(r.z)));
      float s0, c0, s1, c1;
      sincospif(2.f * philox::uniform(r.y), &s0, &c0);  // sin/cos(2 pi u), exact argument reduction
      sincospif(2.f * philox::uniform(r.w), &s1, &c1);
      z[0] = rad0 * c0;
      z[1] = rad0 * s0;
      z[2] = rad1 * c1;
      z[3] = rad1 * s1;
    }
    if (a.var_mode == kVarFixed) {
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] += S * z[k];
    } else {
      float v[4];
      load4(a.v, e0, a.sv, a.L, a.flat, full, e0, a.total, v);
      const float MINL = __ldg(row + kMinLog), MAXL = __ldg(row + kMaxLog);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float sd;
        if (a.var_mode == kVarLearned) {
          sd = sqrtf(v[k]);
        } else {
          const float f = 0.5f * (v[k] + 1.f);
          sd = expf(0.5f * (f * MAXL + (1.f - f) * MINL));
        }
        acc[k] += S * sd * z[k];
      }
    }
  }
  store4(a.out, e0, a.so, a.L, a.flat, full, e0, a.total, acc);
}

template <typename T>
bool aligned4(const T* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

at::Tensor sampler_step_cuda(const at::Tensor& x, const at::Tensor& model_output, const c10::optional<at::Tensor>& uncond,
                             double guidance_scale, const at::Tensor& table, const at::Tensor& step,
                             const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& x0_buf,
                             const c10::optional<at::Tensor>& var_values, const c10::optional<at::Tensor>& thresh,
                             int64_t seed, int64_t var_mode, int64_t clip_mode, double clip_range, bool stochastic,
                             const c10::optional<at::Tensor>& x0_buf2, const c10::optional<at::Tensor>& x0_buf3) {
  int64_t st[8];
  sampler_step_check(x, model_output, uncond, table, step, noise, x0_buf, var_values, thresh, var_mode, clip_mode,
                     x0_buf2, x0_buf3, st);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t N = x.size(0), total = x.numel(), L = total / N;
  const int64_t so = N == 1 ? 0 : out.stride(0);
  FASTDIFF_DISPATCH_FLOATING(x.scalar_type(), "sampler_step_cuda", [&] {
    auto ptr = [](const c10::optional<at::Tensor>& t) -> const scalar_t* {
      return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
    };
    Args<scalar_t> a;
    a.x = x.const_data_ptr<scalar_t>();
    a.m = model_output.const_data_ptr<scalar_t>();
    a.u = ptr(uncond);
    a.z = ptr(noise);
    a.b = x0_buf.has_value() ? x0_buf->data_ptr<scalar_t>() : nullptr;
    a.b2 = x0_buf2.has_value() ? x0_buf2->data_ptr<scalar_t>() : nullptr;
    a.b3 = x0_buf3.has_value() ? x0_buf3->data_ptr<scalar_t>() : nullptr;
    a.v = ptr(var_values);
    a.out = out.data_ptr<scalar_t>();
    a.thr = clip_mode == kClipThreshold ? thresh->const_data_ptr<float>() : nullptr;
    a.table = table.const_data_ptr<float>();
    a.step = step.const_data_ptr<int64_t>();
    a.total = total;
    a.L = L;
    a.n_steps = table.size(0);
    a.sm = st[0];
    a.su = st[1];
    a.sz = st[2];
    a.sb = st[3];
    a.sv = st[4];
    a.sx = st[5];
    a.sb2 = st[6];
    a.sb3 = st[7];
    a.so = so;
    a.g = static_cast<float>(guidance_scale);
    a.clip_range = static_cast<float>(clip_range);
    a.seed = static_cast<uint64_t>(seed);
    a.var_mode = static_cast<int>(var_mode);
    a.clip_mode = static_cast<int>(clip_mode);
    a.stochastic = stochastic;
    // Flat: element e of every tensor is at offset e (rows back to back), and every base pointer is aligned for
    // a 4-element vector access.
    bool flat = N == 1 || (a.sx == L && a.sm == L && a.so == L && (!a.u || a.su == L) && (!a.z || a.sz == L) &&
                           (!a.b || a.sb == L) && (!a.b2 || a.sb2 == L) && (!a.b3 || a.sb3 == L) &&
                           (!a.v || a.sv == L));
    flat = flat && aligned4(a.x) && aligned4(a.m) && aligned4(a.u) && aligned4(a.z) && aligned4<scalar_t>(a.b) &&
           aligned4<scalar_t>(a.b2) && aligned4<scalar_t>(a.b3) && aligned4(a.v) && aligned4<scalar_t>(a.out);
    a.flat = flat;
    const int64_t groups = (total + 3) / 4;
    const int threads = 256;
    const int64_t blocks = (groups + threads - 1) / threads;
    sampler_step_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("sampler_step", &sampler_step_cuda); }

}  // namespace fastdiff
