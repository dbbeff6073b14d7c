// The Python side of cuemu: configuration and counters (the ops themselves register as fastdiff_emu::*).
#include <torch/extension.h>

#include "cuemu.h"

namespace cuemu_selftest {
at::Tensor run(int64_t which, bool fixed);
}

#if defined(__x86_64__)
// cuemu_switch(save_sp, load_sp): push the callee-saved registers and MXCSR / the x87 control word, store rsp in
// *save_sp, load load_sp, pop the other context's, return into it (see ctx_init in cuemu.h for a new one).
asm(R"(
.text
.globl cuemu_switch
.hidden cuemu_switch
.type cuemu_switch,@function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuemu_switch, .-cuemu_switch
)");
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "configure",
      [](int sms, int schedule, uint64_t seed, int64_t smem_optin) {
        TORCH_CHECK(sms > 0, "sms: expected a positive SM count, got ", sms);
        TORCH_CHECK(schedule >= 0 && schedule <= 2, "schedule: expected 0 (in order), 1 (reverse) or 2 (shuffled)");
        TORCH_CHECK(smem_optin >= 48 * 1024, "smem_optin: expected >= 48 KB, got ", smem_optin);
        cuemu::rt().sms = sms;
        cuemu::rt().schedule = schedule;
        cuemu::rt().seed = seed;
        cuemu::rt().smem_optin = static_cast<size_t>(smem_optin);
      },
      py::arg("sms") = 132, py::arg("schedule") = 0, py::arg("seed") = 1, py::arg("smem_optin") = 227 * 1024);
  m.def("selftest", &cuemu_selftest::run, py::arg("which"), py::arg("fixed"));
  m.def(
      "launch_log",
      [](bool clear) {
        py::list out;
        for (const auto& l : cuemu::rt().log)
          out.append(py::make_tuple(py::make_tuple(l.grid.x, l.grid.y, l.grid.z),
                                    py::make_tuple(l.block.x, l.block.y, l.block.z), l.dyn_smem, l.current_stream));
        if (clear) cuemu::rt().log.clear();
        return out;
      },
      py::arg("clear") = true);
  m.def("stats", [] {
    const cuemu::Runtime& r = cuemu::rt();
    return std::make_tuple(r.launches, r.blocks_run, r.switches, r.vec16);
  });
}
