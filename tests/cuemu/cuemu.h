// cuemu: runs the CUDA kernels of csrc/cuda/*.cu, as written, on the CPU, for machines without a GPU.
//
// tests/cuemu/build.py rewrites a .cu file mechanically (launches `k<<<g, b, s, st>>>(args)` become
// `::cuemu::Launch(g, b, s, st).run(k, args)`, vector casts `*reinterpret_cast<V*>(p)` go through an alignment
// check, inline PTX becomes calls of the models below, the CUDA op registrations move to the `fastdiff_emu`
// namespace on the CPU key, new tensors are filled with NaN bits) and compiles it with g++ against this header.
// What it models:
//   - every thread of a block is a fiber (a register switch on x86-64, ucontext elsewhere); a block's threads
//     run until they all end, one block at a time, in an order set by the schedule: threads and blocks in
//     order, in reverse, or shuffled (seeded). A thread runs until it must wait (__syncthreads, a warp
//     collective), so a missing barrier shows up as a wrong result under one of the orders: a reader can run
//     before the writer it forgot to wait for.
//   - __shared__ variables are statics in one linker section, and dynamic shared memory one buffer per launch;
//     both are filled with NaN bits (0xff bytes) before each block: a read that no thread of this block wrote
//     gives NaN.
//   - __syncthreads: all threads of the block that have not exited, at the same call site (threads waiting at
//     two different barriers are reported); warp shuffles, ldmatrix and mma.sync: every lane in the mask must
//     arrive (one that exited, or a mask naming lanes past the block's end, is reported, not hung on). A
//     barrier that can never complete ends the launch with an error.
//   - cp.async: a copy lands when a cp.async.wait_group lets it (or when its thread ends), not before; an
//     ldmatrix of 16 bytes a copy has not landed in is reported. ldmatrix / mma.sync m16n8k16 follow the PTX
//     ISA's fragment tables (products exact, sums in double).
//   - launch configuration checked like the driver does (empty grid, > 1024 threads, grid.x >= 2^31, more
//     dynamic shared memory than the device allows or than the kernel opted in to with cudaFuncSetAttribute);
//     16-byte vector accesses checked for alignment ("misaligned address" on a GPU).
// What it does not model: timing, the memory model across blocks of one launch (blocks run one after another),
// GPU-specific float results (rsqrtf, __expf, ex2.approx, sincospif ... use the host's libm), out-of-bounds
// accesses (scripts/cuemu_asan.sh builds with FASTDIFF_CUEMU_ASAN=1 and runs under libasan for those).
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <vector_types.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUEMU_ASAN 1
#endif

// ---- CUDA keywords -----------------------------------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("cuemu_shared"), used))

// The built-in variables: set by the scheduler before it switches into a thread.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace cuemu {

// ---- contexts: x86-64 switches callee-saved registers, MXCSR and the x87 control word in user space (ucontext
// makes a system call per switch for the signal mask, which doubled the run time); ucontext elsewhere
#if defined(__x86_64__)
extern "C" void cuemu_switch(void** save_sp, void* load_sp);  // defined once, in module.cpp
struct Ctx {
  void* sp = nullptr;
};
inline void ctx_init(Ctx& c, char* stack, size_t size, void (*entry)()) {
#ifdef CUEMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(stack, size);  // the redzones of frames an earlier thread left on this stack
#endif
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  auto* w = reinterpret_cast<uint64_t*>(top);
  *--w = 0;                                     // entry's return address (it never returns)
  *--w = reinterpret_cast<uint64_t>(entry);     // cuemu_switch's ret lands here, rsp = 8 mod 16 as after a call
  for (int i = 0; i < 6; ++i) *--w = 0;         // rbp rbx r12 r13 r14 r15
  uint32_t csr[2] = {0, 0};
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
  *--w = static_cast<uint64_t>(csr[0]) | (static_cast<uint64_t>(csr[1] & 0xffff) << 32);
  c.sp = w;
}
inline void ctx_switch(Ctx& from, Ctx& to) { cuemu_switch(&from.sp, to.sp); }
#else
struct Ctx {
  ucontext_t uc;
};
inline void ctx_init(Ctx& c, char* stack, size_t size, void (*entry)()) {
#ifdef CUEMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(stack, size);
#endif
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
#endif

[[noreturn]] void fail(const std::string& msg);
void report(const std::string& msg);

struct Runtime {
  // configuration (set from Python through the module)
  int sms = 132;
  int schedule = 0;  // 0: in order, 1: reverse, 2: shuffled
  uint64_t seed = 1;
  size_t smem_optin = 227 * 1024;
  // the current launch
  std::string error;
  std::string last_error;
  uint64_t launches = 0, blocks_run = 0, switches = 0;
  uint64_t vec16 = 0;  // 16-byte vector accesses (loads and stores through vptr / st.global.v4)
  struct LaunchRecord {
    dim3 grid, block;
    size_t dyn_smem;
    bool current_stream;  // launched on at::cuda::getCurrentCUDAStream() (not the legacy default stream)
  };
  std::vector<LaunchRecord> log;  // every launch since the last clear (configurations, refused ones too)
  // the current block
  struct Copy {  // one cp.async: 16 bytes into shared memory, n of them from src (the rest zeros)
    uint32_t dst;
    const void* src;
    int n;
  };
  struct Fiber {
    Ctx ctx;
    uint3 tid;
    bool done;
    std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
    std::vector<Copy> open;                 // issued, not yet committed
  };
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  size_t stack_size = 256 * 1024;
  Ctx sched, dead;  // the scheduler's context; where an ending fiber's registers go
  int cur = -1, nthreads = 0, live = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0, events = 0;
  const char* bar_file = nullptr;  // where the threads waiting at the current barrier called it
  int bar_line = 0;
  static constexpr size_t kLaneBytes = 64;  // the most one lane hands to a warp collective (an mma's fragments)
  struct Warp {
    uint64_t seq[32];
    unsigned char val[2][32][kLaneBytes];
  };
  std::vector<Warp> warps;
  std::function<void()> body;
  bool abandon = false;
  // dynamic shared memory of the current launch, and how many cp.async copies are in flight per 16 bytes of it
  std::vector<unsigned char> dyn_store;
  unsigned char* dyn = nullptr;
  size_t dyn_size = 0;
  std::vector<uint16_t> pending;
  // cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, v) per kernel
  std::vector<std::pair<const void*, int>> max_dyn;
#ifdef CUEMU_ASAN
  void* fake_stack = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline void report(const std::string& msg) {
  Runtime& r = rt();
  if (r.error.empty()) r.error = msg;
}

inline std::string thread_name() {
  const Runtime& r = rt();
  return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ") thread (" + std::to_string(threadIdx.x) + "," +
         std::to_string(threadIdx.y) + "," + std::to_string(threadIdx.z) + ") [linear " + std::to_string(r.cur) +
         "]";
}

// ---- fibers --------------------------------------------------------------------------------------------------

inline void switch_to_scheduler() {
  Runtime& r = rt();
  ++r.switches;
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(&r.fake_stack, r.sched_bottom, r.sched_size);
#endif
  ctx_switch(r.fibers[r.cur].ctx, r.sched);
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(r.fake_stack, &r.sched_bottom, &r.sched_size);
#endif
}

inline void yield() { switch_to_scheduler(); }

inline void release_barrier_if_complete() {
  Runtime& r = rt();
  if (r.bar_arrived > 0 && r.bar_arrived == r.live) {
    r.bar_arrived = 0;
    ++r.bar_gen;
    ++r.events;
  }
}

void finish_copies(Runtime::Fiber& f);

inline void fiber_main() {
  Runtime& r = rt();
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_bottom, &r.sched_size);
#endif
  r.body();
  finish_copies(r.fibers[r.cur]);  // copies a thread never waited for still land before the kernel ends
  r.fibers[r.cur].done = true;
  --r.live;
  ++r.events;
  release_barrier_if_complete();
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, r.sched_bottom, r.sched_size);
#endif
  ctx_switch(r.dead, r.sched);  // never returns
}

extern "C" char __start_cuemu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_cuemu_shared[] __attribute__((weak, visibility("hidden")));

inline void poison_shared() {
  if (__start_cuemu_shared != nullptr && __stop_cuemu_shared > __start_cuemu_shared)
    std::memset(__start_cuemu_shared, 0xff, static_cast<size_t>(__stop_cuemu_shared - __start_cuemu_shared));
  Runtime& r = rt();
  if (r.dyn_size > 0) std::memset(r.dyn, 0xff, r.dyn_size);
  std::fill(r.pending.begin(), r.pending.end(), 0);
}

inline std::vector<int64_t> order_of(int64_t n, int mode, std::mt19937_64& gen) {
  std::vector<int64_t> o(static_cast<size_t>(n));
  std::iota(o.begin(), o.end(), 0);
  if (mode == 1) std::reverse(o.begin(), o.end());
  if (mode == 2) std::shuffle(o.begin(), o.end(), gen);
  return o;
}

inline void run_block(const dim3& b, std::mt19937_64& gen) {
  Runtime& r = rt();
  const int n = static_cast<int>(b.x * b.y * b.z);
  while (static_cast<int>(r.stacks.size()) < n) {
    // a guard page below each stack: an overflow faults instead of writing over the next stack
    const size_t page = 4096, total = r.stack_size + page;
    void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("cuemu: out of memory for thread stacks");
    mprotect(m, page, PROT_NONE);
    r.stacks.push_back(static_cast<char*>(m) + page);
  }
  r.fibers.assign(static_cast<size_t>(n), Runtime::Fiber{});
  r.warps.assign(static_cast<size_t>((n + 31) / 32), Runtime::Warp{});
  r.nthreads = n;
  r.live = n;
  r.bar_arrived = 0;
  for (int i = 0; i < n; ++i) {
    Runtime::Fiber& f = r.fibers[static_cast<size_t>(i)];
    f.tid = make_uint3(i % b.x, (i / b.x) % b.y, i / (b.x * b.y));
    f.done = false;
    ctx_init(f.ctx, r.stacks[static_cast<size_t>(i)], r.stack_size, fiber_main);
  }
  const std::vector<int64_t> order = order_of(n, r.schedule, gen);
  while (r.live > 0) {
    const uint64_t before = r.events;
    for (const int64_t i : order) {
      Runtime::Fiber& f = r.fibers[static_cast<size_t>(i)];
      if (f.done) continue;
      r.cur = static_cast<int>(i);
      threadIdx = f.tid;
      ++r.switches;
#ifdef CUEMU_ASAN
      void* fs = nullptr;
      __sanitizer_start_switch_fiber(&fs, r.stacks[static_cast<size_t>(i)], r.stack_size);
#endif
      ctx_switch(r.sched, f.ctx);
#ifdef CUEMU_ASAN
      __sanitizer_finish_switch_fiber(fs, nullptr, nullptr);
#endif
    }
    if (r.live > 0 && r.events == before) {
      std::string who;
      int shown = 0;
      for (int i = 0; i < n && shown < 4; ++i)
        if (!r.fibers[static_cast<size_t>(i)].done) who += (shown++ ? ", " : "") + std::to_string(i);
      report("deadlock in block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
             std::to_string(blockIdx.z) + "): " + std::to_string(r.live) + " of " + std::to_string(n) +
             " threads wait forever (a __syncthreads or shuffle some threads never reach; first: " + who + ")");
      r.abandon = true;
      return;
    }
  }
}

// What at::cuda::getCurrentCUDAStream() hands the host code here: a launch that names another stream (or none:
// the legacy default stream) is logged as such.
inline cudaStream_t current_stream() { return reinterpret_cast<cudaStream_t>(uintptr_t{0x5eed}); }

inline void launch_grid(dim3 g, dim3 b, size_t dyn_smem, cudaStream_t stream, std::function<void()> body) {
  Runtime& r = rt();
  ++r.launches;
  r.error.clear();
  r.log.push_back({g, b, dyn_smem, stream == current_stream()});
  const uint64_t threads = static_cast<uint64_t>(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0 || threads > 1024 || b.z > 64 || g.x > 2147483647u ||
      g.y > 65535 || g.z > 65535) {
    r.last_error = "invalid configuration argument (grid " + std::to_string(g.x) + "x" + std::to_string(g.y) + "x" +
                   std::to_string(g.z) + ", block " + std::to_string(b.x) + "x" + std::to_string(b.y) + "x" +
                   std::to_string(b.z) + ")";
    return;
  }
  if (dyn_smem > r.smem_optin) {
    r.last_error = "invalid argument: " + std::to_string(dyn_smem) + " bytes of dynamic shared memory (limit " +
                   std::to_string(r.smem_optin) + ")";
    return;
  }
  // (static shared memory is not checked: the section holds every kernel's statics, no per-kernel figure)
  r.dyn_store.assign(dyn_smem + 256, 0);
  r.dyn = r.dyn_store.data() + (128 - reinterpret_cast<uintptr_t>(r.dyn_store.data()) % 128);
  r.dyn_size = dyn_smem;
  r.pending.assign(dyn_smem / 16 + 1, 0);
  r.body = std::move(body);
  r.abandon = false;
  std::mt19937_64 gen(r.seed);
  const uint64_t nblocks = static_cast<uint64_t>(g.x) * g.y * g.z;
  const std::vector<int64_t> border = order_of(static_cast<int64_t>(nblocks), r.schedule, gen);
  gridDim = g;
  blockDim = b;
  for (const int64_t lb : border) {
    const uint64_t u = static_cast<uint64_t>(lb);
    blockIdx = make_uint3(static_cast<unsigned>(u % g.x), static_cast<unsigned>((u / g.x) % g.y),
                          static_cast<unsigned>(u / (static_cast<uint64_t>(g.x) * g.y)));
    poison_shared();
    run_block(b, gen);
    ++r.blocks_run;
    if (r.abandon) break;
  }
  r.body = nullptr;
  r.last_error = r.error;
}

struct Launch {
  dim3 g, b;
  size_t smem;
  cudaStream_t stream;
  Launch(dim3 grid, dim3 block, size_t dyn_smem = 0, cudaStream_t s = nullptr)
      : g(grid), b(block), smem(dyn_smem), stream(s) {}
  template <class... P, class... A>
  void run(void (*kernel)(P...), A&&... a) {
    // above 48 KB of dynamic shared memory a kernel must have opted in (cudaFuncSetAttribute) to at least that
    if (smem > 48 * 1024) {
      int allowed = 48 * 1024;
      for (const auto& kv : rt().max_dyn)
        if (kv.first == reinterpret_cast<const void*>(kernel)) allowed = kv.second;
      if (static_cast<size_t>(allowed) < smem) {
        rt().last_error = "invalid argument: " + std::to_string(smem) + " bytes of dynamic shared memory, the " +
                          "kernel's cudaFuncAttributeMaxDynamicSharedMemorySize is " + std::to_string(allowed);
        return;
      }
    }
    // kernel parameters are copied at launch, as on a GPU; each thread calls the kernel with its own copies
    std::tuple<std::remove_cv_t<std::remove_reference_t<P>>...> params{static_cast<P>(std::forward<A>(a))...};
    launch_grid(g, b, smem, stream, [&params, kernel] { std::apply(kernel, params); });
  }
};

inline void launch_check() {
  Runtime& r = rt();
  if (!r.last_error.empty()) {
    const std::string e = r.last_error;
    r.last_error.clear();
    TORCH_CHECK(false, "cuemu: kernel launch failed: ", e);
  }
}

inline void fail(const std::string& msg) { TORCH_CHECK(false, msg); }

// ---- barriers and warps --------------------------------------------------------------------------------------

inline void syncthreads(const char* file, int line) {
  Runtime& r = rt();
  const uint64_t g = r.bar_gen;
  if (r.bar_arrived == 0) {
    r.bar_file = file;
    r.bar_line = line;
  } else if (r.bar_line != line || std::strcmp(r.bar_file, file) != 0) {
    report("divergent __syncthreads: threads of one block wait at " + std::string(r.bar_file) + ":" +
           std::to_string(r.bar_line) + " and at " + file + ":" + std::to_string(line) + ", " + thread_name());
  }
  ++r.bar_arrived;
  ++r.events;
  release_barrier_if_complete();
  while (r.bar_gen == g) yield();
}

// Every lane in `mask` hands `bytes` of its own and waits for the others; returns the 32 lanes' blobs (valid
// until this lane's next collective: a lane can only get two collectives ahead once every lane has read this one).
inline const unsigned char (*warp_collective(unsigned mask, const void* mine, size_t bytes, const char* what))[Runtime::kLaneBytes] {
  Runtime& r = rt();
  const int t = r.cur, w = t / 32, l = t % 32, nl = std::min(32, r.nthreads - w * 32);
  if (!((mask >> l) & 1u)) report(std::string(what) + ": the calling lane is not in the mask, at " + thread_name());
  if (nl < 32 && (mask >> nl) != 0u)
    report(std::string(what) + ": the mask names lanes past the block's last thread, at " + thread_name());
  Runtime::Warp& W = r.warps[static_cast<size_t>(w)];
  const uint64_t s = ++W.seq[l];
  std::memcpy(W.val[s & 1][l], mine, bytes);
  ++r.events;
  for (;;) {
    bool all = true;
    for (int j = 0; j < nl; ++j)
      if (((mask >> j) & 1u) && W.seq[j] < s) all = false;
    if (all) break;
    yield();
  }
  return W.val[s & 1];
}

inline uint64_t warp_exchange(unsigned mask, uint64_t bits, int width, int (*src_of)(int, int, int), int arg,
                              const char* what) {
  Runtime& r = rt();
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    report(std::string(what) + ": width must be a power of two <= 32, at " + thread_name());
  const auto* all = warp_collective(mask, &bits, 8, what);
  const int l = r.cur % 32, nl = std::min(32, r.nthreads - (r.cur / 32) * 32);
  const int src = src_of(l, arg, width);
  if (src < 0 || src >= nl || !((mask >> src) & 1u)) {
    report(std::string(what) + ": reads lane " + std::to_string(src) + ", not in the mask, at " + thread_name());
    return bits;
  }
  uint64_t out;
  std::memcpy(&out, all[src], 8);
  return out;
}

template <class T>
inline T shfl_generic(unsigned mask, T v, int width, int (*src_of)(int, int, int), int arg, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(mask, bits, width, src_of, arg, what);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline int src_down(int l, int d, int w) {
  const int base = l & ~(w - 1);
  return (l - base) + d < w ? l + d : l;
}
inline int src_up(int l, int d, int w) {
  const int base = l & ~(w - 1);
  return (l - base) - d >= 0 ? l - d : l;
}
inline int src_xor(int l, int m, int w) {
  const int s = l ^ m, base = l & ~(w - 1);
  return s >= base + w ? l : s;
}
inline int src_idx(int l, int s, int w) { return (l & ~(w - 1)) + (s & (w - 1)); }

// ---- memory ----------------------------------------------------------------------------------------------------

// *reinterpret_cast<V*>(p) in a kernel becomes *vptr<V>(p): a vector access must be aligned to its size.
template <class V, class P>
inline V* vptr(P* p) {
  if (sizeof(V) == 16) ++rt().vec16;
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0)
    report("misaligned address: a " + std::to_string(sizeof(V)) + "-byte access at " +
           std::to_string(reinterpret_cast<uintptr_t>(p) % 64) + " mod 64, at " + thread_name());
  return reinterpret_cast<V*>(p);
}

// st.global.v4.b32
inline void st_global_v4_b32(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  const uint32_t v[4] = {a, b, c, d};
  std::memcpy(vptr<uint4>(p), v, 16);
}

// New tensors (outputs, scratch): NaN bits, as uninitialised device memory can hold anything.
inline void poison(at::Tensor& t) {
  if (t.defined() && t.numel() > 0) std::memset(t.data_ptr(), 0xff, t.storage().nbytes() - t.storage_offset() * t.element_size());
}
inline at::Tensor empty(at::IntArrayRef size, at::TensorOptions opts = {},
                        std::optional<at::MemoryFormat> mf = std::nullopt) {
  at::Tensor t = at::empty(size, opts, mf);
  poison(t);
  return t;
}
inline at::Tensor empty_like(const at::Tensor& x, at::TensorOptions opts = {},
                             std::optional<at::MemoryFormat> mf = std::nullopt) {
  at::Tensor t = at::empty_like(x, opts, mf);
  poison(t);
  return t;
}


// ---- shared-memory addresses, cp.async, ldmatrix, mma.sync (the PTX the attention kernel issues) -----------------

inline unsigned char* dyn_smem() { return rt().dyn; }

inline uint32_t to_shared(const void* p) {
  Runtime& r = rt();
  const auto* c = static_cast<const unsigned char*>(p);
  if (r.dyn == nullptr || c < r.dyn || c >= r.dyn + r.dyn_size) {
    report("__cvta_generic_to_shared: not a dynamic shared memory address, at " + thread_name());
    return 0;
  }
  return static_cast<uint32_t>(c - r.dyn);
}

inline unsigned char* shared_at(uint32_t a, size_t bytes, const char* what) {
  Runtime& r = rt();
  if (static_cast<size_t>(a) + bytes > r.dyn_size) {
    report(std::string(what) + ": shared address " + std::to_string(a) + " + " + std::to_string(bytes) +
           " past the block's " + std::to_string(r.dyn_size) + " bytes, at " + thread_name());
    return r.dyn;
  }
  return r.dyn + a;
}

inline void do_copy(const Runtime::Copy& c) {
  unsigned char* d = shared_at(c.dst, 16, "cp.async");
  std::memset(d, 0, 16);
  if (c.n > 0) std::memcpy(d, c.src, static_cast<size_t>(c.n));
  uint16_t& p = rt().pending[c.dst / 16];
  if (p > 0) --p;
}

inline void finish_copies(Runtime::Fiber& f) {
  for (const auto& g : f.groups)
    for (const auto& c : g) do_copy(c);
  for (const auto& c : f.open) do_copy(c);
  f.groups.clear();
  f.open.clear();
}

// cp.async.cg.shared.global [dst], [src], 16, n: lands when a later cp.async.wait_group lets it (not before)
inline void cp_async_cg_16(uint32_t dst, const void* src, int n) {
  Runtime& r = rt();
  if (dst % 16 != 0 || (n > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    report("cp.async: misaligned address (16 bytes), at " + thread_name());
  if (n < 0 || n > 16) report("cp.async: src-size " + std::to_string(n) + " outside 0..16, at " + thread_name());
  shared_at(dst, 16, "cp.async");
  r.fibers[r.cur].open.push_back({dst, src, n});
  if (dst / 16 < r.pending.size()) ++r.pending[dst / 16];
}
inline void cp_async_commit() {
  Runtime::Fiber& f = rt().fibers[rt().cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
inline void cp_async_wait(int n) {  // all but the newest n committed groups complete
  Runtime::Fiber& f = rt().fibers[rt().cur];
  while (static_cast<int>(f.groups.size()) > n) {
    for (const auto& c : f.groups.front()) do_copy(c);
    f.groups.erase(f.groups.begin());
  }
}

inline void check_landed(uint32_t a, const char* what) {
  Runtime& r = rt();
  if (a / 16 < r.pending.size() && r.pending[a / 16] != 0)
    report(std::string(what) + " reads shared memory that a cp.async has not written yet (a missing " +
           "cp.async.wait_group or __syncthreads), at " + thread_name());
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of matrix i
inline void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr, bool trans) {
  const char* what = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
  if (addr % 16 != 0) report(std::string(what) + ": row address not 16-byte aligned, at " + thread_name());
  const auto* all = warp_collective(0xffffffffu, &addr, 4, what);
  const int l = rt().cur % 32;
  uint32_t* out[4] = {&r0, &r1, &r2, &r3};
  auto row = [&](int lane) {
    uint32_t a;
    std::memcpy(&a, all[lane], 4);
    check_landed(a, what);
    return shared_at(a, 16, what);
  };
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      std::memcpy(out[i], row(8 * i + l / 4) + 4 * (l % 4), 4);
    } else {
      uint16_t lo, hi;
      std::memcpy(&lo, row(8 * i + 2 * (l % 4)) + 2 * (l / 4), 2);
      std::memcpy(&hi, row(8 * i + 2 * (l % 4) + 1) + 2 * (l / 4), 2);
      *out[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

inline float b16_to_float(uint16_t v, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw h;
  h.x = v;
  return __half2float(__half(h));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: d = a b + d over the warp's fragments
// (g = lane / 4, t = lane % 4; a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); b0 (k 2t.., n g),
// b1 (k 2t+8.., n g); d0, d1 (g, 2t..), d2, d3 (g+8, 2t..)). Products exact, sums in double.
template <bool kBf16>
inline void mma_m16n8k16(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2,
                         uint32_t a3, uint32_t b0, uint32_t b1) {
  struct Frag {
    uint32_t a[4], b[2];
    float c[4];
  } mine{{a0, a1, a2, a3}, {b0, b1}, {d0, d1, d2, d3}};
  const auto* all = warp_collective(0xffffffffu, &mine, sizeof(Frag), "mma.sync");
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    Frag f;
    std::memcpy(&f, all[lane], sizeof(Frag));
    const int g = lane / 4, t = lane % 4;
    const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[ar[i]][ac[i]] = b16_to_float(static_cast<uint16_t>(f.a[i] & 0xffff), kBf16);
      A[ar[i]][ac[i] + 1] = b16_to_float(static_cast<uint16_t>(f.a[i] >> 16), kBf16);
    }
    for (int i = 0; i < 2; ++i) {
      B[2 * t + 8 * i][g] = b16_to_float(static_cast<uint16_t>(f.b[i] & 0xffff), kBf16);
      B[2 * t + 8 * i + 1][g] = b16_to_float(static_cast<uint16_t>(f.b[i] >> 16), kBf16);
    }
  }
  const int l = rt().cur % 32, g = l / 4, t = l % 4;
  float* d[4] = {&d0, &d1, &d2, &d3};
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    double acc = *d[i];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
    *d[i] = static_cast<float>(acc);
  }
}

// ex2.approx.ftz.f32 (2^x; subnormal results flush to zero)
inline float ex2_approx_ftz(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

inline int device_index(const at::Tensor&) { return 0; }
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }

}  // namespace cuemu

// ---- intrinsics -------------------------------------------------------------------------------------------------

#define __syncthreads() ::cuemu::syncthreads(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuemu::warp_exchange(mask, 0, 32, cuemu::src_idx, 0, "__syncwarp");
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return cuemu::shfl_generic(mask, v, width, cuemu::src_down, static_cast<int>(d), "__shfl_down_sync");
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return cuemu::shfl_generic(mask, v, width, cuemu::src_up, static_cast<int>(d), "__shfl_up_sync");
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
  return cuemu::shfl_generic(mask, v, width, cuemu::src_xor, m, "__shfl_xor_sync");
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int s, int width = 32) {
  return cuemu::shfl_generic(mask, v, width, cuemu::src_idx, s, "__shfl_sync");
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
// CUDA's device-side integer and float min/max overloads
#define CUEMU_MINMAX(T)                          \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
CUEMU_MINMAX(int)
CUEMU_MINMAX(unsigned)
CUEMU_MINMAX(long)
CUEMU_MINMAX(unsigned long)
CUEMU_MINMAX(long long)
CUEMU_MINMAX(unsigned long long)
#undef CUEMU_MINMAX
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __log2f(float a) { return std::log2(a); }
inline size_t __cvta_generic_to_shared(const void* p) { return cuemu::to_shared(p); }
inline float rsqrtf(float a) { return 1.f / std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : a); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline float __int_as_float(int u) { return std::bit_cast<float>(u); }
inline void sincospif(float x, float* s, float* c) {
  // exact reduction of x mod 2, then double precision: within 1 ulp of CUDA's sincospif
  double r = std::fmod(static_cast<double>(x), 2.0);
  *s = static_cast<float>(std::sin(M_PI * r));
  *c = static_cast<float>(std::cos(M_PI * r));
  if (r == std::floor(r)) *s = 0.f;
  if (r - std::floor(r) == 0.5) *c = 0.f;
}

// ---- host API stubs ----------------------------------------------------------------------------------------------

namespace at::cuda {
inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp p{};
  p.multiProcessorCount = cuemu::rt().sms;
  p.sharedMemPerBlockOptin = cuemu::rt().smem_optin;
  p.sharedMemPerBlock = 48 * 1024;
  p.major = 9;
  p.minor = 0;
  p.warpSize = 32;
  p.maxThreadsPerBlock = 1024;
  return &p;
}
inline cudaStream_t getCurrentCUDAStream() { return cuemu::current_stream(); }
}  // namespace at::cuda

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

template <class T>
inline cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorNotSupported;
  if (value < 0 || static_cast<size_t>(value) > cuemu::rt().smem_optin) return cudaErrorInvalidValue;
  auto& v = cuemu::rt().max_dyn;
  for (auto& kv : v)
    if (kv.first == reinterpret_cast<const void*>(kernel)) {
      kv.second = value;
      return cudaSuccess;
    }
  v.emplace_back(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::cuemu::launch_check()
#define C10_CUDA_CHECK(expr)                                                               \
  do {                                                                                      \
    const cudaError_t cuemu_err = (expr);                                                   \
    TORCH_CHECK(cuemu_err == cudaSuccess, "cuemu: CUDA error ", static_cast<int>(cuemu_err), \
                " from " #expr);                                                            \
  } while (0)
