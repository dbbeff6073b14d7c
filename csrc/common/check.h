// Input checks shared by the CPU and CUDA kernels. The Python layer validates arguments with friendly
// ValueError/TypeError messages first; these TORCH_CHECKs are the last line of defence for direct
// torch.ops.fastdiff.* callers, so a bad call never reads out of bounds.
#pragma once
#include <ATen/ATen.h>

namespace fastdiff {

enum class Layout { kChannelsFirst, kChannelsLast };

// x is (N, C, *spatial). Returns the layout the kernels read in place: NCHW-contiguous, or channels-last
// (C innermost, then the spatial dims in order, then N), which is what channels_last / channels_last_3d
// and a permuted (N, *spatial, C) tensor all look like.
inline Layout nc_layout(const at::Tensor& x, const char* name) {
  if (x.is_contiguous()) return Layout::kChannelsFirst;
  const int64_t d = x.dim();
  TORCH_CHECK(d >= 3, name, ": a 2-D input must be contiguous");
  // channels-last: stride(1) == 1, stride(d-1) == C, stride(i) == stride(i+1) * size(i+1), stride(0) = C*S
  bool cl = x.stride(1) == 1 || x.size(1) == 1;
  int64_t expect = x.size(1);
  for (int64_t i = d - 1; i >= 2 && cl; --i) {
    if (x.size(i) != 1 && x.stride(i) != expect) cl = false;
    expect *= x.size(i);
  }
  if (cl && x.size(0) != 1 && x.stride(0) != expect) cl = false;
  TORCH_CHECK(cl, name, ": must be contiguous or channels-last (C innermost); got strides ", x.strides());
  return Layout::kChannelsLast;
}

inline void check_param(const c10::optional<at::Tensor>& p, const char* name, at::IntArrayRef shape,
                        const at::Tensor& x) {
  if (!p.has_value()) return;
  const at::Tensor& t = *p;
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, ": expected device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.is_floating_point(), name, ": expected a floating-point tensor, got ", t.scalar_type());
}

inline int activation_code(c10::string_view act) {
  if (act == "none" || act == "") return 0;
  if (act == "silu") return 1;
  TORCH_CHECK(false, "activation: expected 'none' or 'silu', got '", std::string(act), "'");
}

}  // namespace fastdiff

// float, half and bfloat16: the dtypes every fastdiff kernel takes.
#define FASTDIFF_DISPATCH_FLOATING(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
