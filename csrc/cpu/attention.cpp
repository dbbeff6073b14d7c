// CPU kernel of torch.ops.fastdiff.attention: a chunked reference in fp32, so the op, its fake kernel and its
// autograd can be exercised on any machine. (The `cpu` backend of fastdiff.ops.attention is PyTorch's own
// scaled_dot_product_attention; this kernel exists for the op's contract, not for speed.)
//
// Cost: O(chunk × Skv) memory per step instead of O(Sq × Skv): query rows in chunks of 256.
#include <limits>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/attention.h"

namespace fastdiff {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale) {
  check_attention_inputs(q, k, v);
  TORCH_CHECK(q.device().is_cpu(), "q: expected a CPU tensor, got ", q.device());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "q: expected a floating-point tensor, got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Skv = k.size(2);
  at::Tensor out = empty_bhsd_like(q, Sq, D);
  at::Tensor lse = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (Skv == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor kt = k.to(acc).transpose(-2, -1);
  const at::Tensor vf = v.to(acc);
  constexpr int64_t kChunk = 256;
  for (int64_t m0 = 0; m0 < Sq; m0 += kChunk) {
    const int64_t n = std::min(kChunk, Sq - m0);
    at::Tensor s = at::matmul(q.narrow(2, m0, n).to(acc), kt).mul_(scale);
    at::Tensor l = at::logsumexp(s, -1, /*keepdim=*/true);
    s.sub_(l).exp_();
    out.narrow(2, m0, n).copy_(at::matmul(s, vf));
    lse.narrow(2, m0, n).copy_(l.squeeze(-1));
  }
  return {out, lse};
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("attention", &fastdiff::attention_cpu); }
