// Kernels with planted bugs, for tests/test_cuda_emulated.py: each must be caught by the emulator (a wrong
// result under some schedule, or an error from the launch). Compiled through the same rewrite as csrc/cuda.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace cuemu_selftest {

// Thread 0 fills shared memory; the others read it. With the barrier (fixed = true) every thread reads 1..n;
// without it, a thread that runs before thread 0 reads whatever shared memory held.
__global__ void race(float* out, bool fixed) {
  __shared__ float s[256];
  if (threadIdx.x == 0)
    for (int i = 0; i < 256; ++i) s[i] = static_cast<float>(i + 1);
  if (fixed) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
}

// Each thread writes its own slot; reads its neighbour's after a barrier (correct) or reads a slot no one wrote.
__global__ void uninit(float* out, bool fixed) {
  __shared__ float s[257];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[fixed ? (threadIdx.x + 1) % blockDim.x : threadIdx.x + 1];
}

// Odd and even threads wait at two different barriers (a hang or a wrong result on a GPU). Threads that
// return before a barrier are not an error: they count as arrived, as on the hardware.
__global__ void divergent_barrier(float* out, bool fixed) {
  if (threadIdx.x == 63) return;
  if (fixed || threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// A full-mask shuffle after half the warp has returned.
__global__ void shuffle_after_exit(float* out, bool fixed) {
  if (!fixed && threadIdx.x >= 16) return;
  float v = static_cast<float>(threadIdx.x);
  v += __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// A warp sum by shuffles: lane 0 holds 0 + 1 + ... + 31.
__global__ void warp_sum(float* out, bool) {
  float v = static_cast<float>(threadIdx.x % 32);
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[threadIdx.x] = v;
}

// A 16-byte load one float past an aligned address.
__global__ void misaligned(float* out, bool fixed) {
  const float4 v = *reinterpret_cast<const float4*>(out + (fixed ? 4 : 1));
  if (threadIdx.x == 0) out[0] = v.x;
}

at::Tensor run(int64_t which, bool fixed) {
  at::Tensor out = at::zeros({1024 + 8}, at::kFloat);
  float* p = out.data_ptr<float>();
  switch (which) {
    case 0: race<<<2, 256>>>(p, fixed); break;
    case 1: uninit<<<1, 256>>>(p, fixed); break;
    case 2: divergent_barrier<<<1, 64>>>(p, fixed); break;
    case 3: shuffle_after_exit<<<1, 32>>>(p, fixed); break;
    case 4: warp_sum<<<1, 64>>>(p, fixed); break;
    case 5: misaligned<<<1, 32>>>(p, fixed); break;
    case 6: warp_sum<<<1, fixed ? 1024 : 1025>>>(p, fixed); break;  // more than 1024 threads: refused
    case 7: warp_sum<<<fixed ? 1 : 0, 32>>>(p, fixed); break;       // an empty grid: refused
    default: TORCH_CHECK(false, "which: no self-test ", which);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cuemu_selftest
