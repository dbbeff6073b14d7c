// CUDA kernel of torch.ops.fastdiff.attention: the launcher of the flash forward in attention_kernel.cuh (see its
// header for the algorithm and cost model). The backward is Triton's (fastdiff/triton/attention.py), fed by the
// lse this op returns.
//
// Head-dim buckets (one kernel per bucket and dtype, to keep the build lean), tiles per CTA, and the CTAs per SM
// the registers (ptxas, no spills) and shared memory allow on an H100:
//   D ≤ 64        kBlockM 128 (8 warps), kBlockN 64   55 KB shared, ≤ 128 registers: 2 CTAs/SM
//   64 < D ≤ 128  kBlockM 128 (8 warps), kBlockN 32   70 KB, ≤ 128 registers: 2 CTAs/SM (kBlockN 64 spills at 128)
//   128 < D ≤ 160 kBlockM  64 (4 warps), kBlockN 64   107 KB, ~175 registers: 2 CTAs/SM
//   160 < D ≤ 256 kBlockM  64 (4 warps), kBlockN 32   101 KB (fits the A100's 163 KB), ~225 registers: 2 CTAs/SM
// GPUs that let a block opt in to less than 107 KB (sm86, sm89, sm120: 99 KB) run 128 < D ≤ 160 with kBlockN 32
// (63 KB) instead.
// kBlockM 128 halves the K/V traffic from L2 against 64 (each CTA reads all of K and V of its head); the buckets
// with wide rows take 64 to stay in registers.
#include <limits>
#include <mutex>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/attention.h"
#include "cuda/attention_kernel.cuh"

namespace fastdiff {
namespace {

using attn::FwdConfig;
using attn::FwdParams;

using Cfg64 = FwdConfig<64, 8, 64, 2>;
using Cfg128 = FwdConfig<128, 8, 32, 2>;
using Cfg160 = FwdConfig<160, 4, 64, 2>;
using Cfg160Small = FwdConfig<160, 4, 32, 2>;  // where a block may not have Cfg160's shared memory
using Cfg256 = FwdConfig<256, 4, 32, 1>;

template <typename T, typename Cfg>
void launch(const FwdParams& p, int B, int device, cudaStream_t stream) {
  auto kernel = attn::attention_fwd_kernel<T, Cfg>;
  constexpr int smem = Cfg::kSmemBytes;
  if (smem > 48 * 1024) {
    // The opt-in above 48 KB is per device; set it once per device for this instantiation (once_flag: host
    // threads may launch on the same device at once). Devices past the 64th set it on every call.
    static std::once_flag done[64];
    auto set = [&] {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    };
    if (device < 64) std::call_once(done[device], set);
    else set();
  }
  // (Sq - 1) / kBlockM + 1, not (Sq + kBlockM - 1) / kBlockM: no int overflow for Sq near 2^31
  const dim3 grid(static_cast<unsigned>((p.Sq - 1) / Cfg::kBlockM + 1), p.H, B);
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernel of q's head-dim bucket (see the table at the top), for element type T.
template <typename T>
void launch_bucket(const FwdParams& p, int B, int device, cudaStream_t stream, int64_t D, bool big_smem) {
  if (D <= 64) launch<T, Cfg64>(p, B, device, stream);
  else if (D <= 128) launch<T, Cfg128>(p, B, device, stream);
  else if (D <= 160 && big_smem) launch<T, Cfg160>(p, B, device, stream);
  else if (D <= 160) launch<T, Cfg160Small>(p, B, device, stream);
  else launch<T, Cfg256>(p, B, device, stream);
}

// The kernels read 16-byte chunks: every row must start 16-byte aligned. A view that is not gets a contiguous copy.
at::Tensor aligned(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) == 1 || t.stride(d) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                  double scale) {
  check_attention_inputs(q_, k_, v_);
  TORCH_CHECK(q_.is_cuda(), "q: expected a CUDA tensor, got ", q_.device());
  const auto dtype = q_.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "q: the CUDA attention kernel takes float16 and "
              "bfloat16, got ", dtype);
  const int64_t B = q_.size(0), H = q_.size(1), Sq = q_.size(2), D = q_.size(3), Skv = k_.size(2);
  TORCH_CHECK(D % 8 == 0 && D >= 8 && D <= 256, "q: head dim must be a multiple of 8 up to 256, got ", D);
  TORCH_CHECK(H <= 65535, "q: at most 65535 heads, got ", q_.sizes());  // gridDim.y; batches go in chunks
  TORCH_CHECK(Sq < (int64_t{1} << 31) && Skv < (int64_t{1} << 31), "q, k: sequences must be shorter than 2^31");
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "the CUDA attention kernel needs sm80 or newer, got sm", prop->major, prop->minor);

  at::Tensor out = empty_bhsd_like(q_, Sq, D);
  at::Tensor lse = at::empty({B, H, Sq}, q_.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (Skv == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const at::Tensor q = aligned(q_), k = aligned(k_), v = aligned(v_);

  FwdParams p;
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sm = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sn = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sn = v.stride(2);
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sm = out.stride(2);
  p.H = static_cast<int>(H);
  p.Sq = static_cast<int>(Sq);
  p.Skv = static_cast<int>(Skv);
  p.D = static_cast<int>(D);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  const int device = q.get_device();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool big_smem = prop->sharedMemPerBlockOptin >= static_cast<size_t>(Cfg160::kSmemBytes);
  // The batch is gridDim.z (at most 65535): larger batches (temporal attention over every pixel of a video
  // latent) run as several launches of up to 65535 batches each, the tensors offset by their batch strides.
  constexpr int64_t kMaxGridZ = 65535;
  for (int64_t b0 = 0; b0 < B; b0 += kMaxGridZ) {
    const int b = static_cast<int>(std::min(kMaxGridZ, B - b0));
    p.q = q.select(0, b0).data_ptr();
    p.k = k.select(0, b0).data_ptr();
    p.v = v.select(0, b0).data_ptr();
    p.o = out.select(0, b0).data_ptr();
    p.lse = lse.select(0, b0).data_ptr<float>();
    if (dtype == at::kHalf)
      launch_bucket<__half>(p, b, device, stream, D, big_smem);
    else
      launch_bucket<__nv_bfloat16>(p, b, device, stream, D, big_smem);
  }
  return {out, lse};
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("attention", &fastdiff::attention_cuda); }
