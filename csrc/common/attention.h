// Shared by the CPU and CUDA attention kernels: argument checks and the output allocation rule.
#pragma once
#include <ATen/ATen.h>

namespace fastdiff {

// q (B, H, Sq, D); k, v (B, H, Skv, D): the TORCH_CHECKs behind the Python layer's friendly errors.
inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "q: expected 4 dims (B, H, Sq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k: expected 4 dims (B, H, Skv, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "v: expected 4 dims (B, H, Skv, D), got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k: expected the batch, heads and head dim of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k, v: expected q's dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "k, v: expected q's device ", q.device());
}

// An empty (B, H, S, D) tensor laid out like t: (B, S, H, D) memory when t's heads are inside its sequence (a
// projection's output viewed per head), else contiguous. fastdiff/ops/attention.py's fake kernel mirrors this.
inline at::Tensor empty_bhsd_like(const at::Tensor& t, int64_t s, int64_t d) {
  const int64_t b = t.size(0), h = t.size(1);
  if (t.stride(1) < t.stride(2)) return at::empty({b, s, h, d}, t.options()).transpose(1, 2);
  return at::empty({b, h, s, d}, t.options());
}

}  // namespace fastdiff
