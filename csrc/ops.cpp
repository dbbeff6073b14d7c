// Every fastdiff op schema, in one place. Kernels register implementations per dispatch key in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake (meta) kernels are registered from Python in
// fastdiff/ops/<op>.py, and so is autograd, except for group_norm's (csrc/autograd.cpp, C++ end to end).
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace fastdiff {
bool built_with_cuda() {
#ifdef FASTDIFF_WITH_CUDA
  return true;
#else
  return false;
#endif
}
// "avx512" or "portable": which code the CPU kernels were compiled to (csrc/cpu/group_norm.cpp)
std::string cpu_kernels();
// The last-level cache size the CPU kernels' store choices assume (bytes), and an override of it (0: back to the
// detected size); returns the previous override (csrc/cpu/group_norm.cpp)
int64_t cpu_cache_bytes();
int64_t set_cpu_cache_bytes(int64_t bytes);
// The same for the L2 size per core behind the CPU GroupNorm's choices of the backward's block-by-block passes and
// the forward's per-sample channels-last path
int64_t cpu_l2_bytes();
int64_t set_cpu_l2_bytes(int64_t bytes);
}  // namespace fastdiff

TORCH_LIBRARY(fastdiff, m) {
  // y = act((GroupNorm(x) * weight + bias) * (1 + scale) + shift); returns (y, mean, rstd) with mean and
  // rstd of shape (N, num_groups) in fp32. activation: "none" or "silu".
  m.def(
      "group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "float eps, str activation) -> (Tensor, Tensor, Tensor)");
  // Gradients of group_norm: (grad_x, grad_weight, grad_bias, grad_scale, grad_shift). The gradient of a
  // parameter that was None is an empty tensor.
  m.def(
      "group_norm_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, int num_groups, Tensor? weight, "
      "Tensor? bias, Tensor? scale, Tensor? shift, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Flash attention forward: out = softmax(q kᵀ · scale) v for q (B, H, Sq, D), k and v (B, H, Skv, D), any strides
  // with the last dim contiguous. Returns (out, lse): out (B, H, Sq, D) laid out like q ((B, Sq, H, D) memory when
  // q's heads are inside its sequence), lse = logsumexp(q kᵀ · scale) in fp32, (B, H, Sq) contiguous, for the
  // backward. CUDA: fp16/bf16, D a multiple of 8 up to 256 (csrc/cuda/attention.cu). CPU: any float dtype, a
  // chunked reference (csrc/cpu/attention.cpp) so the op and its autograd can be checked without a GPU.
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  // One fused sampler step (csrc/common/sampler_step.h): classifier-free guidance, prediction type -> x0,
  // clip or dynamic thresholding, the update x_prev = A x + B m + C x0 + D x0_prev + std z with the
  // coefficients read from row `step` of `table` (on the device: no host sync), and z from Philox keyed by
  // (seed, step) unless `noise` is given. x0_buf, when given, is read as x0_prev (when D != 0) and overwritten
  // with this step's x0 (multistep solvers); x0_buf2 (only with x0_buf) is read as x0_prev2 (when E != 0, the
  // table's column 9: + E x0_prev2) and overwritten with x0_prev (third-order solvers); x0_buf3 (only with x0_buf2)
  // likewise one further back (column 10: + F x0_prev3; PLMS). Where column 11 (KEEP) is nonzero the buffers are
  // left unchanged. var_mode: 0 fixed, 1 learned, 2 learned_range (var_values needed).
  // clip_mode: 0 none, 1 clamp to clip_range, 2 threshold by the per-sample `thresh` (N,) float32.
  m.def(
      "sampler_step(Tensor x, Tensor model_output, Tensor? uncond, float guidance_scale, Tensor table, Tensor step, "
      "Tensor? noise, Tensor(a!)? x0_buf, Tensor? var_values, Tensor? thresh, int seed, int var_mode, "
      "int clip_mode, float clip_range, bool stochastic, Tensor(b!)? x0_buf2=None, Tensor(c!)? x0_buf3=None) -> Tensor");
  // True when this build of the extension holds the CUDA kernels.
  m.def("_built_with_cuda() -> bool", &fastdiff::built_with_cuda);
  // "avx512" (the AVX-512 loops, fp16/bf16 converted in vector registers) or "portable" (loops GCC vectorises).
  m.def("_cpu_kernels() -> str", &fastdiff::cpu_kernels);
  // The last-level cache size (bytes) behind the CPU GroupNorm's choice of non-temporal stores, and a setter for
  // it (tests use it to take the paths of a 32 MiB cache on any machine; 0 restores the detected size).
  m.def("_cpu_cache_bytes() -> int", &fastdiff::cpu_cache_bytes);
  m.def("_set_cpu_cache_bytes(int bytes) -> int", &fastdiff::set_cpu_cache_bytes);
  // The L2 size (bytes per core) behind the CPU GroupNorm's choices of the backward's block-by-block passes (fp32
  // NCHW) and the forward's per-sample channels-last path, and a setter (tests use it to take either path on any
  // machine; 0 restores the detected size).
  m.def("_cpu_l2_bytes() -> int", &fastdiff::cpu_l2_bytes);
  m.def("_set_cpu_l2_bytes(int bytes) -> int", &fastdiff::set_cpu_l2_bytes);
}

// A Python module named _C so `import fastdiff._C` loads the library and runs the registrations above.
static struct PyModuleDef fastdiff_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastdiff_c_module); }
