// Running statistics merged with Chan et al.'s parallel formula: each tile keeps (count, mean, M2) and
// tiles merge exactly, so the variance never comes from E[x^2] - E[x]^2 (which cancels catastrophically
// when |mean| >> std). Usable from host and device code.
#pragma once
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdiff {

struct Stats {
  float n, mean, m2;
};

FD_HD void chan_merge(float& n, float& mean, float& m2, float nb, float meanb, float m2b) {
  const float nn = n + nb;
  if (nb == 0.f) return;
  const float d = meanb - mean;
  const float f = nb / nn;
  mean += d * f;
  m2 += m2b + d * (d * (n * f));  // (n f) first: 0 for a first merge (n = 0) even where d * d overflows fp32
  n = nn;
}

FD_HD void chan_merge(Stats& a, const Stats& b) { chan_merge(a.n, a.mean, a.m2, b.n, b.mean, b.m2); }

}  // namespace fastdiff
