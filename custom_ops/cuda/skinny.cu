// The decode path: grouped GEMMs with few rows per expert, on tensor cores (mma.sync m16n8k16).
//
// Swapped operands: the weights are the MMA's A operand (16 output units per warp tile, read
// straight from global memory with 16-byte loads, once per call) and the tokens of the expert are
// the B operand (n = 8 tokens per MMA). Both operands use the same permutation of k inside each
// block of 32 (lane t of a quad holds k = 8t..8t+7), which leaves the dot products unchanged and
// lets every load be 16 bytes wide. The four warps of a block split K and reduce through shared
// memory; warp i then runs the fused epilogue of token tile i.
//
// Projection 1 tiles hold 8 units: MMA row g is the gate (or fc1) row of unit u0+g and row g+8
// its up row, so act(gate) * up is computed in the thread that holds both. Non-gated tiles hold 16
// units. Projection 2 tiles hold 16 output features.
#include <algorithm>

#include "common.cuh"

namespace moefuse {
namespace cuda {
namespace {

constexpr int kWarps = 4;  // split K
constexpr int kNT = 4;     // token tiles (of 8) per pass: 32 tokens
static_assert(kWarps == kNT, "warp i reduces and finishes token tile i");

template <typename T>
__device__ __forceinline__ void Mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void Mma<__half>(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                            uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void Mma<__nv_bfloat16>(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                                   uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Activations (small, reused by every weight tile): through L1.
__device__ __forceinline__ uint4 Ld16(const void* p) {
  return p ? __ldg(static_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
}

// Weights are read once: streamed (evict first).
__device__ __forceinline__ uint4 LdStream(const void* p) {
  return p ? __ldcs(static_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
}

// The group (expert) of this block and its sorted rows.
struct Slot {
  int e, r0, rows;
};

__device__ __forceinline__ bool GetSlot(const Groups& g, int slot, Slot* s) {
  if (g.dense_rows >= 0) {
    s->e = 0;
    s->r0 = 0;
    s->rows = g.dense_rows;
    return slot == 0 && g.dense_rows > 0;
  }
  if (slot >= *g.num_active) return false;
  s->e = g.active[slot];
  s->r0 = g.offsets[s->e];
  s->rows = g.active[g.num_groups + slot];
  return true;
}

// The weight loads of kBatch k-blocks are issued before their MMAs, so that each warp keeps
// kBatch * 1 KiB of weights in flight. (Asking L2 for the k-blocks further ahead with bulk
// prefetches was measured slower on an H100: 279 -> 340 us at T=1 on (4096, 14336, 8, 2).)
constexpr int kBatch = 8;

// acc[i][0..3] += W rows (wa: row g, wb: row g+8) x B rows (brow[i]: token g of tile i), over the
// k-blocks of this warp (its quarter of the block's k-blocks [kbeg, kend)). A batch's token
// loads are issued together too (one L2 round trip per token tile and batch, not one per
// k-block); lanes past K or the batch load zeros.
template <typename T>
__device__ __forceinline__ void MainLoop(float (&acc)[kNT][4], const T* wa, const T* wb,
                                         const T* const (&brow)[kNT], int ntiles, int K, int kbeg,
                                         int kend) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
  const int kb0 = kbeg + warp * (kend - kbeg) / kWarps, kb1 = kbeg + (warp + 1) * (kend - kbeg) / kWarps;
  for (int kb = kb0; kb < kb1; kb += kBatch) {
    uint4 a[kBatch], b[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int k = (kb + u) * 32 + t * 8;
      const bool in = kb + u < kb1 && k < K;
      a[u] = LdStream(in && wa ? wa + k : nullptr);
      b[u] = LdStream(in && wb ? wb + k : nullptr);
    }
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      if (i >= ntiles) break;  // block-uniform
      uint4 x[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int k = (kb + u) * 32 + t * 8;
        x[u] = Ld16(kb + u < kb1 && k < K && brow[i] ? brow[i] + k : nullptr);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        Mma<T>(acc[i], a[u].x, b[u].x, a[u].y, b[u].y, x[u].x, x[u].y);
        Mma<T>(acc[i], a[u].z, b[u].z, a[u].w, b[u].w, x[u].z, x[u].w);
      }
    }
  }
}

// Sums the warps' accumulators of token tile `warp` into `out` (all threads of the block call it).
__device__ __forceinline__ bool Reduce(float (&acc)[kNT][4], float* red, float (&out)[4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < kNT; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[((warp * kNT + i) * 4 + c) * 32 + lane] = acc[i][c];
  __syncthreads();
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[((w * kNT + warp) * 4 + c) * 32 + lane];
    out[c] = s;
  }
  return true;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) Gemm1Kernel(Gemm1Params p) {
  GridDepWait();
  GridDepLaunch();
  __shared__ float red[kWarps * kNT * 4 * 32];
  Slot s;
  if (!GetSlot(p.g, blockIdx.y, &s)) return;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int D = p.D, I = p.I;
  const bool gated = p.w.up != nullptr;
  const T* gate = static_cast<const T*>(p.w.gate);
  const T* up = static_cast<const T*>(p.w.up);
  // this thread's two weight rows
  const int ua = gated ? blockIdx.x * 8 + g : blockIdx.x * 16 + g;
  const int ub = gated ? ua : ua + 8;
  const T* wa = nullptr;
  const T* wb = nullptr;
  if (ua < I) wa = gate + (p.w.gate_row0 + s.e * p.w.gate_rpe + ua * p.w.gate_rpu) * D;
  if (ub < I) {
    wb = gated ? up + (p.w.up_row0 + s.e * p.w.up_rpe + ub * p.w.up_rpu) * D
               : gate + (p.w.gate_row0 + s.e * p.w.gate_rpe + ub * p.w.gate_rpu) * D;
  }
  const T* A = static_cast<const T*>(p.A);
  T* H = static_cast<T*>(p.H);
  const DType bt = Elem<T>::kType;
  for (int c0 = 0; c0 < s.rows; c0 += kNT * 8) {
    const int ntiles = min(kNT, (s.rows - c0 + 7) / 8);
    const T* brow[kNT];
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      const int c = c0 + i * 8 + g;
      brow[i] = nullptr;
      if (i < ntiles && c < s.rows) {
        const int r = s.r0 + c;
        const int src = p.row_map ? p.row_map[r] : r;
        brow[i] = A + static_cast<int64_t>(src) * D;
      }
    }
    float acc[kNT][4] = {};
    MainLoop<T>(acc, wa, wb, brow, ntiles, D, 0, (D + 31) / 32);
    float v[4];
    Reduce(acc, red, v);
    const int warp = threadIdx.x >> 5;
    if (warp < ntiles) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = c0 + warp * 8 + 2 * t + c;
        if (col >= s.rows) continue;
        const int r = s.r0 + col;
        const float sc = p.row_scale ? p.row_scale[r] : 1.0f;
        T* hrow = H + static_cast<int64_t>(r) * I;
        if (gated) {
          if (ua < I) {
            float gv = v[c] * sc, uv = v[2 + c] * sc;
            if (p.w.bg) gv += LoadF(p.w.bg, p.w.bg_off + s.e * p.w.bg_es + ua * p.w.bg_us, bt);
            if (p.w.bu) uv += LoadF(p.w.bu, p.w.bu_off + s.e * p.w.bu_es + ua * p.w.bu_us, bt);
            hrow[ua] = FromF<T>(Glu(gv, uv, p.act));
          }
        } else {
          if (ua < I) {
            float x = v[c] * sc;
            if (p.w.bg) x += LoadF(p.w.bg, p.w.bg_off + s.e * p.w.bg_es + ua * p.w.bg_us, bt);
            hrow[ua] = FromF<T>(Act(x, p.act));
          }
          if (ub < I) {
            float x = v[2 + c] * sc;
            if (p.w.bg) x += LoadF(p.w.bg, p.w.bg_off + s.e * p.w.bg_es + ub * p.w.bg_us, bt);
            hrow[ub] = FromF<T>(Act(x, p.act));
          }
        }
      }
    }
    __syncthreads();  // red is reused by the next pass
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) Gemm2Kernel(Gemm2Params p) {
  GridDepWait();
  GridDepLaunch();
  __shared__ float red[kWarps * kNT * 4 * 32];
  Slot s;
  if (!GetSlot(p.g, blockIdx.y, &s)) return;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int D = p.D, I = p.I;
  const T* w2 = static_cast<const T*>(p.w2) + static_cast<int64_t>(s.e) * D * I;
  const int da = blockIdx.x * 16 + g, db = da + 8;
  const T* wa = da < D ? w2 + static_cast<int64_t>(da) * I : nullptr;
  const T* wb = db < D ? w2 + static_cast<int64_t>(db) * I : nullptr;
  const T* H = static_cast<const T*>(p.H);
  const DType bt = Elem<T>::kType;
  // this block's part of K; part 0 adds the bias
  const int z = blockIdx.z, nkb = (I + 31) / 32;
  const int kbeg = z * nkb / p.splits, kend = (z + 1) * nkb / p.splits;
  float ba = 0.0f, bb = 0.0f;
  if (p.b2 && z == 0) {
    if (da < D) ba = LoadF(p.b2, static_cast<int64_t>(s.e) * D + da, bt);
    if (db < D) bb = LoadF(p.b2, static_cast<int64_t>(s.e) * D + db, bt);
  }
  for (int c0 = 0; c0 < s.rows; c0 += kNT * 8) {
    const int ntiles = min(kNT, (s.rows - c0 + 7) / 8);
    const T* brow[kNT];
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      const int c = c0 + i * 8 + g;
      brow[i] = (i < ntiles && c < s.rows) ? H + static_cast<int64_t>(s.r0 + c) * I : nullptr;
    }
    float acc[kNT][4] = {};
    MainLoop<T>(acc, wa, wb, brow, ntiles, I, kbeg, kend);
    float v[4];
    Reduce(acc, red, v);
    const int warp = threadIdx.x >> 5;
    if (warp < ntiles) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = c0 + warp * 8 + 2 * t + c;
        if (col >= s.rows) continue;
        const int64_t r = s.r0 + col;
        if (p.out_f32) {
          float* o = static_cast<float*>(p.out) + z * p.plane + r * D;
          if (da < D) o[da] = v[c] + ba;
          if (db < D) o[db] = v[2 + c] + bb;
        } else {
          T* o = static_cast<T*>(p.out) + r * D;
          if (da < D) o[da] = FromF<T>(v[c] + ba);
          if (db < D) o[db] = FromF<T>(v[2 + c] + bb);
        }
      }
    }
    __syncthreads();
  }
}

template <typename T>
cudaError_t Gemm1T(const Gemm1Params& p, cudaStream_t stream) {
  const bool gated = p.w.up != nullptr;
  const int64_t tiles = CeilDiv(p.I, gated ? 8 : 16);
  const int slots = p.g.dense_rows >= 0 ? 1 : p.g.max_slots;
  if (tiles <= 0 || slots <= 0) return cudaSuccess;
  return Launch(Gemm1Kernel<T>, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(slots)),
                dim3(kWarps * 32), 0, stream, p);
}

template <typename T>
cudaError_t Gemm2T(const Gemm2Params& p, cudaStream_t stream) {
  const int64_t tiles = CeilDiv(p.D, 16);
  const int slots = p.g.dense_rows >= 0 ? 1 : p.g.max_slots;
  if (tiles <= 0 || slots <= 0) return cudaSuccess;
  if (p.splits < 1 || (p.splits > 1 && !p.out_f32)) return cudaErrorInvalidValue;
  return Launch(Gemm2Kernel<T>,
                dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(slots), static_cast<unsigned>(p.splits)),
                dim3(kWarps * 32), 0, stream, p);
}

}  // namespace

// Wave quantization: with B blocks and C resident per wave, the last wave of ceil(B / C) may run
// nearly empty (projection 2 of (4096, 14336, 8, 2) at T = 1: 512 blocks, 396 resident). Splitting
// K s ways costs ceil(s B / C) / s waves of the unsplit work; the least wins, fewer parts on ties,
// and each warp keeps at least one batch of k-blocks.
int SkinnyGemm2Splits(int64_t D, int64_t I, int64_t slots, int num_sms) {
  static const int per_sm = [] {
    int n = 0;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Gemm2Kernel<__half>, kWarps * 32, 0) ==
                   cudaSuccess && n > 0 ? n : 1;
  }();
  const int64_t blocks = CeilDiv(D, 16) * slots, resident = static_cast<int64_t>(per_sm) * num_sms;
  const int64_t max_splits = std::min<int64_t>(4, CeilDiv(I, 32) / (kWarps * kBatch));
  if (blocks <= 0 || resident <= 0) return 1;
  int best = 1;
  double best_waves = static_cast<double>(CeilDiv(blocks, resident));
  for (int s = 2; s <= max_splits; ++s) {
    const double waves = static_cast<double>(CeilDiv(blocks * s, resident)) / s;
    if (waves < best_waves - 1e-9) {
      best = s;
      best_waves = waves;
    }
  }
  return best;
}

cudaError_t LaunchSkinnyGemm1(const Gemm1Params& p, cudaStream_t stream) {
  if (p.dtype == DType::kBF16) return Gemm1T<__nv_bfloat16>(p, stream);
  if (p.dtype == DType::kF16) return Gemm1T<__half>(p, stream);
  return cudaErrorInvalidValue;
}

cudaError_t LaunchSkinnyGemm2(const Gemm2Params& p, cudaStream_t stream) {
  if (p.dtype == DType::kBF16) return Gemm2T<__nv_bfloat16>(p, stream);
  if (p.dtype == DType::kF16) return Gemm2T<__half>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace moefuse
