// The fused sampler update, shared by the CPU and CUDA kernels (fastdiff/triton/sampler_step.py and
// fastdiff.reference.sampler_step implement the same math; fastdiff/diffusion/samplers.py builds the tables).
//
// Every sampler's step is, per element, with m the model output after classifier-free guidance,
//   m   = uncond + g (cond - uncond)                       (when uncond is given)
//   x0  = clip(PX x + PM m)                                 (prediction type -> x0, then clip/threshold)
//   out = A x + B m + C x0 + D x0_prev + E x0_prev2 + F x0_prev3 + std z
// where (PX, PM, A, B, C, D, ...) is row `step` of a (num_steps, kCols) fp32 table on the device: the
// prediction type, the sampler, eta, the order of a multistep solver and the last-step special cases are all
// folded into the numbers, so one kernel serves every sampler and never branches on a host value per step.
// std is the table's S column (var_mode 0), S sqrt(v) (var_mode 1, "learned": v is the variance itself, as
// diffusers' DDPMScheduler reads it), or S exp((f MAXLOG + (1 - f) MINLOG) / 2) with f = (v + 1) / 2
// (var_mode 2, Improved DDPM's "learned_range"); S is then a 0/1 gate for "this step adds noise".
// History: x0_buf (when given) holds x0_prev and is overwritten with this step's x0; x0_buf2 (when given, always
// with x0_buf) holds x0_prev2 and is overwritten with x0_prev; x0_buf3 (always with x0_buf2) holds x0_prev3 and is
// overwritten with x0_prev2. So a multistep solver keeps up to three previous x0 on the device across steps and
// CUDA-graph replays (DPM-Solver++ 3M and UniPC two, PLMS three). Each enters the sum only where its coefficient is
// nonzero (a stale NaN in a buffer never leaks into a step that does not use it). Where the row's KEEP column is
// nonzero the buffers are left as they are (PLMS's warm-up step, whose model output is not kept).
// clip_mode: 0 none, 1 clamp to [-clip_range, clip_range], 2 dynamic thresholding clamp(x0, -s, s) / s with the
// per-sample s computed on the device beforehand.
#pragma once

namespace fastdiff {
namespace sampler {

enum Col : int { kPX = 0, kPM, kA, kB, kC, kD, kS, kMinLog, kMaxLog, kE, kF, kKeep };
constexpr int kCols = 12;

enum ClipMode : int { kClipNone = 0, kClipRange = 1, kClipThreshold = 2 };
enum VarMode : int { kVarFixed = 0, kVarLearned = 1, kVarLearnedRange = 2 };

}  // namespace sampler
}  // namespace fastdiff
