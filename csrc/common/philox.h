// Counter-based Gaussian noise shared by the CPU and CUDA kernels (fastdiff/triton/sampler_step.py and
// fastdiff/reference.py implement the same function).
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) keyed by the 64-bit
// seed, with the counter (q_lo, q_hi, step, 0) where q = element_index / 4. One call gives four 32-bit
// words r0..r3 for the four elements 4q .. 4q+3, turned into normals by Box-Muller:
//   u_k = ((r_k >> 9) + 0.5) * 2^-23           (exact in fp32, in (0, 1): log never sees 0)
//   z_{4q+0} = sqrt(-2 ln u0) cos(2 pi u1),  z_{4q+1} = sqrt(-2 ln u0) sin(2 pi u1)
//   z_{4q+2} = sqrt(-2 ln u2) cos(2 pi u3),  z_{4q+3} = sqrt(-2 ln u2) sin(2 pi u3)
// Being a pure function of (seed, step, element index), the noise is the same on every backend, for any
// launch configuration, and replays identically inside a CUDA graph (the step is read from device memory).
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FD_PHILOX_HD __host__ __device__ __forceinline__
#else
#define FD_PHILOX_HD inline
#endif

namespace fastdiff {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;

struct U4 {
  uint32_t x, y, z, w;
};

FD_PHILOX_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Ten rounds of Philox4x32 on counter c with key (k0, k1).
FD_PHILOX_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c.x, hi0, lo0);
    mulhilo(kM1, c.z, hi1, lo1);
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// The four words for element group q at `step`.
FD_PHILOX_HD U4 words(uint64_t seed, uint64_t q, uint32_t step) {
  return philox4x32_10(U4{static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), step, 0u},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// u in (0, 1), exactly representable: 23 random bits plus one half.
FD_PHILOX_HD float uniform(uint32_t r) { return (static_cast<float>(r >> 9) + 0.5f) * 1.1920928955078125e-07f; }

}  // namespace philox
}  // namespace fastdiff
