// Math shared by the GroupNorm kernels on every device. The forward folds GroupNorm's normalisation,
// its affine (weight, bias) and AdaGN's (1 + scale, shift) into one (A, B) pair per (n, c), so the
// apply pass is one FMA plus the activation:
//   z = A x + B,  A = rstd w (1 + s),  B = (b - mean rstd w)(1 + s) + t,  y = act(z).
// The backward reduces two sums per (n, c) over the spatial extent,
//   S1 = sum gz,  S2 = sum gz (x - mean)      (gz = dL/dz = gy act'(z)),
// from which every parameter gradient follows, and grad_x is again one affine map per (n, c):
//   grad_x = P gz + Q (x - mean) + R,  P = rstd g,  Q = -rstd^3 m2,  R = -rstd m1,
// with g = w (1 + s), m1 = mean_c(g S1) / S and m2 = mean_c(g S2) / S over the group's channels.
//
// Precision: the kernels take x in the frame of a pivot K per (n, group) (the group's first value):
// statistics of x - K, and z = A (x - K) + (B0 - A mrel), where mrel is the mean in K's frame and
// B0 = b (1 + s) + t. x - K is exact for values near the mean, so an input with |mean| >> std keeps all the
// digits of its spread (the plain fold A x + B would lose about eps * |mean| / std).
#pragma once
#include "common/stats.h"

namespace fastdiff {

FD_HD void gn_fold(float mean, float rstd, float w, float b, float s, float t, float& A, float& B) {
  const float k = 1.f + s;
  A = rstd * w * k;
  B = (b - mean * rstd * w) * k + t;
}

}  // namespace fastdiff
