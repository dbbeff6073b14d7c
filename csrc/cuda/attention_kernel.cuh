// Flash-attention forward on tensor cores: mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate), ldmatrix, cp.async
// double buffering, the online softmax in exp2. sm80 and newer. Device code only (no torch headers), so the
// kernels can be compiled alone to read their ptxas report; the launcher is csrc/cuda/attention.cu.
//
// Algorithm. A CTA owns kBlockM = 16 · kWarps query rows of one (batch, head); each warp owns 16 of them (one m16
// tile). The CTA streams the keys in tiles of kBlockN through shared memory (K and V double-buffered, the next
// tile's cp.async in flight while this one is used). Per tile a warp computes S = Q Kᵀ (16 × kBlockN, fp32
// registers), scales it by scale · log2(e), updates the running row max m and its partial row sums l, rescales its
// output accumulator by exp2(m_old - m_new), and adds P V with P = exp2(S - m) converted to fp16/bf16 in
// registers (the m16n8 accumulator layout of two adjacent n8 tiles is the A-operand layout of one k16 step). At
// the end the output is divided by l, staged through shared memory and written in 16-byte rows; lse = (m +
// log2 l) · ln 2 goes to a (B, H, Sq) fp32 tensor for the backward.
//
// Head dims without padding to a power of two. Q Kᵀ runs in k-steps of 16 over the head dim: with D = 40 the
// third step has 8 real columns and 8 zero columns (shared-memory pad columns [D, kDMax) are zeroed once and never
// written by cp.async), so the waste is at most 8 columns. P V produces the output in n8 tiles of the head dim:
// 40 = 5 × 8, nothing padded. A kernel is compiled per head-dim bucket (kDMax = 64, 128, 160, 256): register
// arrays are sized for kDMax, the unrolled loops skip the steps past the runtime D with warp-uniform branches.
//
// Ragged key tiles: a tile with valid_n < kBlockN keys masks columns ≥ valid_n to -inf and skips every n8 / k16
// step that lies wholly past valid_n, so cross-attention to 77 keys in tiles of 64 computes 64 + 16 keys, not 128.
// Rows of K, V and Q past the sequence are zero-filled by cp.async (src-size 0): a zero V row times p = 0 is 0,
// where stale shared memory could hold a NaN.
//
// Cost model: reads Q once, K and V once per CTA (⌈Sq / kBlockM⌉ times per head, mostly from L2), writes O and
// lse; 4 · B · H · Sq · Skv · D tensor-core FLOPs on the real head dim (rounded up to 16 for Q Kᵀ only).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastdiff {
namespace attn {

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;  // (B, H, Sq) contiguous
  int64_t q_sb, q_sh, q_sm;
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  int64_t o_sb, o_sh, o_sm;
  int H, Sq, Skv, D;
  float scale_log2;  // scale · log2(e)
};

template <int kDMax_, int kWarps_, int kBlockN_, int kMinBlocks_ = 1>
struct FwdConfig {
  static constexpr int kMinBlocks = kMinBlocks_;  // CTAs per SM asked of the register allocator
  static constexpr int kDMax = kDMax_;      // the largest head dim of the bucket, a multiple of 16
  static constexpr int kWarps = kWarps_;
  static constexpr int kBlockN = kBlockN_;  // keys per tile, a multiple of 16
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  // Shared-memory row stride in elements: 16 bytes more than the row, so the 8 rows an ldmatrix phase reads (and
  // the 8 rows the output staging writes) fall in different banks.
  static constexpr int kStride = kDMax + 8;
  static constexpr int kKSteps = kDMax / 16;   // k16 steps of Q Kᵀ
  static constexpr int kNTilesO = kDMax / 8;   // n8 tiles of the output
  static constexpr int kNTilesS = kBlockN / 8; // n8 tiles of S
  static constexpr int kChunksPerRow = kDMax / 8;  // 16-byte chunks per row
  static constexpr int kSmemRows = kBlockM + 4 * kBlockN;  // Q, then two stages of K, then two of V
  static constexpr int kSmemBytes = kSmemRows * kStride * 2;
  static_assert(kDMax % 16 == 0 && kBlockN % 16 == 0, "tiles are multiples of 16");
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared, asynchronously; pred == false writes 16 zero bytes instead (src-size 0).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8×8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives matrix i with
// lane l holding row l/4, columns 2(l%4) and 2(l%4)+1 (transposed: rows 2(l%4), 2(l%4)+1 of column l/4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ float fast_exp2(float x) {  // exp2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// d += a · b for one m16n8k16 tile; pack() makes the b32 holding two elements (lo in the low half).
template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Rows [row0, row0 + kRows) of a (rows, D) global matrix into shared memory, 16 bytes a thread at a time. Rows
// past nrows are zero-filled (their source address is clamped to row 0, which always exists); columns ≥ D are
// not written (they hold the zeros written at kernel start).
template <typename Cfg, int kRows, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t row_stride, int row0, int nrows, int D,
                                          int tid) {
  constexpr int kChunks = kRows * Cfg::kChunksPerRow;
  constexpr int kIters = (kChunks + Cfg::kThreads - 1) / Cfg::kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = tid + it * Cfg::kThreads;
    if (kChunks % Cfg::kThreads == 0 || i < kChunks) {
      const int r = i / Cfg::kChunksPerRow;
      const int c = (i % Cfg::kChunksPerRow) * 8;
      if (c < D) {
        const int gr = row0 + r;
        const bool valid = gr < nrows;
        const T* src = g + static_cast<int64_t>(valid ? gr : 0) * row_stride + c;
        cp_async_16(smem_u32(smem + r * Cfg::kStride + c), src, valid);
      }
    }
  }
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) attention_fwd_kernel(const FwdParams p) {
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kStride = Cfg::kStride;
  constexpr float kLn2 = 0.6931471805599453f;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);   // [kBlockM][kStride]; reused to stage the output
  T* sK = sQ + kBlockM * kStride;           // [2][kBlockN][kStride]
  T* sV = sK + 2 * kBlockN * kStride;       // [2][kBlockN][kStride]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int m0 = blockIdx.x * kBlockM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int D = p.D;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  T* o = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;

  // Zero the pad columns [D, kDMax) of every shared row once: the last k16 step of Q Kᵀ reads them when
  // D % 16 == 8, and the paired V ldmatrix reads them (its result is unused there, but stays finite).
  if (D < Cfg::kDMax) {
    for (int i = tid; i < Cfg::kSmemRows * Cfg::kChunksPerRow; i += Cfg::kThreads) {
      const int r = i / Cfg::kChunksPerRow;
      const int c = (i % Cfg::kChunksPerRow) * 8;
      if (c >= D) *reinterpret_cast<uint4*>(sQ + r * kStride + c) = make_uint4(0u, 0u, 0u, 0u);
    }
  }

  load_tile<Cfg, kBlockM>(sQ, q, p.q_sm, m0, p.Sq, D, tid);
  load_tile<Cfg, kBlockN>(sK, k, p.k_sn, 0, p.Skv, D, tid);
  load_tile<Cfg, kBlockN>(sV, v, p.v_sn, 0, p.Skv, D, tid);
  cp_async_commit();

  // Fragment coordinates: lane = 4 g + t holds rows g and g + 8 of the warp's m16 tile, columns 2t and 2t + 1 of
  // each n8 tile (PTX's m16n8k16 accumulator layout).
  const int g = lane >> 2;
  const int col0 = (lane & 3) * 2;

  float acc[Cfg::kNTilesO][4];
#pragma unroll
  for (int nt = 0; nt < Cfg::kNTilesO; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};  // in log2 units (scores already scaled by scale · log2 e)
  float row_sum[2] = {0.f, 0.f};              // this thread's partial sums; the quad's four are added at the end

  // A operand (Q) of q kᵀ: ldmatrix lane l addresses row l % 16, column 8 (l / 16) of the k16 step.
  const uint32_t q_frag = smem_u32(sQ + (warp * 16 + (lane & 15)) * kStride + ((lane >> 4) << 3));
  // B operand (K, stored [key][d]) of q kᵀ for two n8 tiles: lane l addresses key 8 (l / 16) + l % 8 and column
  // 8 ((l / 8) % 2), giving b0, b1 of n-tile nt and b0, b1 of n-tile nt + 1.
  const int k_row = ((lane >> 4) << 3) + (lane & 7);
  const int k_col = ((lane >> 3) & 1) << 3;
  // B operand (V, stored [key][d]) of p v for two n8 tiles of the head dim, transposed by ldmatrix: lane l
  // addresses key 8 ((l / 8) % 2) + l % 8 of the k16 step and column 8 (l / 16) of the n-tile pair.
  const int v_row = (((lane >> 3) & 1) << 3) + (lane & 7);
  const int v_col = (lane >> 4) << 3;

  const int n_blocks = (p.Skv - 1) / kBlockN + 1;  // Skv >= 1; no overflow near 2^31
  for (int j = 0; j < n_blocks; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_blocks) {
      // The other stage was last read in iteration j - 1, which ended with __syncthreads().
      load_tile<Cfg, kBlockN>(sK + (stage ^ 1) * kBlockN * kStride, k, p.k_sn, (j + 1) * kBlockN, p.Skv, D, tid);
      load_tile<Cfg, kBlockN>(sV + (stage ^ 1) * kBlockN * kStride, v, p.v_sn, (j + 1) * kBlockN, p.Skv, D, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sKj = sK + stage * kBlockN * kStride;
    const T* sVj = sV + stage * kBlockN * kStride;
    const int valid_n = min(kBlockN, p.Skv - j * kBlockN);

    // S = Q Kᵀ for this warp's 16 rows.
    float s[Cfg::kNTilesS][4];
#pragma unroll
    for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < Cfg::kKSteps; ++ks) {
      if (ks * 16 < D) {
        uint32_t a[4];
        ldmatrix_x4(a, q_frag + ks * 16 * sizeof(T));
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTilesS; nt += 2) {
          if (nt * 8 < valid_n) {
            uint32_t bk[4];
            ldmatrix_x4(bk, smem_u32(sKj + (nt * 8 + k_row) * kStride + ks * 16 + k_col));
            Mma<T>::run(s[nt], a, bk[0], bk[1]);
            Mma<T>::run(s[nt + 1], a, bk[2], bk[3]);
          }
        }
      }
    }

    // Scale to log2 units, mask the keys past the sequence, and the new row max (over the quad of lanes that
    // share a row).
    const bool ragged = valid_n < kBlockN;
#pragma unroll
    for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (ragged && nt * 8 + col0 + (e & 1) >= valid_n) x = -INFINITY;
        s[nt][e] = x;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < Cfg::kNTilesS; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // Each tile holds a real key, so mx is finite; on the first tile exp2(-inf - mx) = 0.
      const float alpha = fast_exp2(row_max[r] - mx);
      row_max[r] = mx;
      row_sum[r] *= alpha;
#pragma unroll
      for (int nt = 0; nt < Cfg::kNTilesO; ++nt) {
        acc[nt][2 * r] *= alpha;
        acc[nt][2 * r + 1] *= alpha;
      }
    }
    // P = exp2(S - m), skipping the n8 tiles wholly past the last key.
#pragma unroll
    for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
      if (nt * 8 < valid_n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = fast_exp2(s[nt][e] - row_max[e >> 1]);
          row_sum[e >> 1] += s[nt][e];
        }
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
      }
    }

    // O += P V: the accumulators of n-tiles 2kk and 2kk + 1 are the A fragment of k16 step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      if (kk * 16 < valid_n) {
        uint32_t a[4];
        a[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
        a[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
        a[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        const T* vrow = sVj + (kk * 16 + v_row) * kStride + v_col;
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTilesO; nt += 2) {
          if (nt * 8 < D) {
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, smem_u32(vrow + nt * 8));
            Mma<T>::run(acc[nt], a, bv[0], bv[1]);
            if ((nt + 1) * 8 < D) Mma<T>::run(acc[nt + 1], a, bv[2], bv[3]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // Epilogue: O / l, staged in this warp's own rows of sQ (no other warp reads them), then 16-byte row stores.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  const float inv[2] = {1.f / row_sum[0], 1.f / row_sum[1]};
#pragma unroll
  for (int nt = 0; nt < Cfg::kNTilesO; ++nt) {
    if (nt * 8 < D) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        *reinterpret_cast<uint32_t*>(sQ + (warp * 16 + g + 8 * r) * kStride + nt * 8 + col0) =
            Mma<T>::pack(acc[nt][2 * r] * inv[r], acc[nt][2 * r + 1] * inv[r]);
      }
    }
  }
  if ((lane & 3) == 0) {
    float* lse = p.lse + (static_cast<int64_t>(b) * p.H + h) * p.Sq;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + warp * 16 + g + 8 * r;
      if (row < p.Sq) lse[row] = (row_max[r] + __log2f(row_sum[r])) * kLn2;
    }
  }
  __syncthreads();
  constexpr int kChunks = kBlockM * Cfg::kChunksPerRow;
  for (int i = tid; i < kChunks; i += Cfg::kThreads) {
    const int r = i / Cfg::kChunksPerRow;
    const int c = (i % Cfg::kChunksPerRow) * 8;
    if (c < D && m0 + r < p.Sq) {
      *reinterpret_cast<uint4*>(o + static_cast<int64_t>(m0 + r) * p.o_sm + c) =
          *reinterpret_cast<const uint4*>(sQ + r * kStride + c);
    }
  }
}

}  // namespace attn
}  // namespace fastdiff
