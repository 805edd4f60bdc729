// The decode path: grouped GEMMs with few rows per expert, on tensor cores (mma.sync m16n8k16).
//
// Swapped operands: the weights are the MMA's A operand (16 output units per warp tile, read
// straight from global memory with 16-byte loads, once per call) and the tokens of the expert are
// the B operand (n = 8 tokens per MMA). Both operands use the same permutation of k inside each
// block of 32 (lane t of a quad holds k = 8t..8t+7), which leaves the dot products unchanged and
// lets every load be 16 bytes wide. The four warps of a block split K and reduce through shared
// memory; warp i then runs the fused epilogue of token tile i. (Projection 2 with short K: a warp
// per weight tile over all of K, Gemm2WarpKernel.)
//
// Projection 1 tiles hold 8 units: MMA row g is the gate (or fc1) row of unit u0+g and row g+8
// its up row, so act(gate) * up is computed in the thread that holds both. Non-gated tiles hold 16
// units. Projection 2 tiles hold 16 output features.
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "route_token.cuh"
#include "sm90.cuh"

namespace moefuse {
namespace cuda {
namespace {

constexpr int kWarps = 4;  // split K
constexpr int kNT = 4;     // token tiles (of 8) per pass: 32 tokens
static_assert(kWarps == kNT, "warp i reduces and finishes token tile i");

// One k-block of 32 in the permuted k order: rows g (a) and g+8 (b) of the weights times token g.
template <typename T>
__device__ __forceinline__ void MmaK32(float* acc, uint4 a, uint4 b, uint4 x) {
  Mma<T>(acc, a.x, b.x, a.y, b.y, x.x, x.y);
  Mma<T>(acc, a.z, b.z, a.w, b.w, x.z, x.w);
}

// Activations (small, reused by every weight tile): through L1.
__device__ __forceinline__ uint4 Ld16(const void* p) {
  return p ? __ldg(static_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
}

// Rows that another SM wrote while this kernel ran (projection 2 started per expert): through L2,
// which the writer's release reached; the non-coherent path may not see them.
__device__ __forceinline__ uint4 LdL2(const void* p) {
  return p ? __ldcg(static_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
}

// Weights are read once: streamed (evict first), each miss filling 256 bytes of L2, since a warp
// reads a weight row on, 64 bytes a load. The hint took Qwen3-30B-A3B's T = 1 from 32.63 to 31.99
// us on an H100 and left T = 32 level (docs/performance.md).
__device__ __forceinline__ uint4 LdWeights(const uint4* p) {
  uint4 r;
  asm("ld.global.cs.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}
__device__ __forceinline__ uint4 LdStream(const void* p) {
  return p ? LdWeights(static_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
}

// The group (expert) of this block and its sorted rows.
struct Slot {
  int e, r0, rows;
};

// kL2: read through L2 (a kernel that starts without waiting for the previous one: the routing's
// results are complete, but this SM's L1 may hold an earlier call's).
template <bool kL2 = false>
__device__ __forceinline__ bool GetSlot(const Groups& g, int slot, Slot* s) {
  auto ld = [](const int* p) { return kL2 ? __ldcg(p) : *p; };
  if (g.dense_rows >= 0) {
    s->e = 0;
    s->r0 = 0;
    s->rows = g.dense_rows;
    return slot == 0 && g.dense_rows > 0;
  }
  if (slot >= ld(g.num_active)) return false;
  s->e = ld(&g.active[slot]);
  s->r0 = ld(&g.offsets[s->e]);
  s->rows = ld(&g.active[g.num_groups + slot]);
  return true;
}

// Projection 2's start on its expert (Groups::ready): nothing to wait for, or, per warp, until the
// expert's projection-1 blocks have all signalled. The acquire orders this warp's reads of H after
// their writes.
struct NoWait {
  __device__ __forceinline__ void operator()() const {}
};
struct ExpertReady {
  const int* count;
  int need;
  __device__ __forceinline__ void operator()() const {
    if ((threadIdx.x & 31) == 0)
      while (LoadAcquire(count) < need) __nanosleep(64);
    __syncwarp();
  }
};

// The weight loads of kBatch k-blocks are issued before their MMAs, so that each warp keeps
// kBatch * 1 KiB of weights in flight. (Asking L2 for the k-blocks further ahead with bulk
// prefetches was measured slower on an H100: 279 -> 340 us at T=1 on (4096, 14336, 8, 2).)
constexpr int kBatch = 8;

// Token loads beside the weights' (MainLoop's kTokensEarly) where each of a block's warps gets at
// most this many batches of K. H200: (2048, 768, 128, 8) T = 1 (2 batches) 1.02x-1.05x faster in
// two runs, its T = 4 and (2880, 2880, 32, 4) T = 1 and 4 (3 batches) within -1% to +2%;
// projection 1 of (4096, 14336, 8, 2) (4 batches) 9-18% slower (docs/performance.md).
constexpr int kEarlyMaxBatches = 3;

__host__ __device__ inline bool TokensEarly(int64_t K) {
  return CeilDiv(CeilDiv(K, 32), kWarps) <= kEarlyMaxBatches * kBatch;
}

// acc[i][0..3] += W rows (wa: row g, wb: row g+8) x B rows (brow[i]: token g of tile i), over the
// k-blocks of this warp (its quarter of the block's k-blocks [kbeg, kend)). A batch's token
// loads are written together, after its weight loads; lanes past K or the batch load zeros.
// kWholeK: this warp takes all of [kbeg, kend) (a warp per weight tile, Gemm2WarpKernel).
// kTokensEarly: the first token tile's loads are issued with the batch's weight loads (ptxas
// otherwise moves them down to their MMAs, one round trip per k-block); that is faster where a
// warp has at most kEarlyMaxBatches batches (TokensEarly), slower where it has more.
// `ready` runs once the first batch's weight loads are issued, before any token row is read; with
// kL2Rows the rows are read through L2 (LdL2).
template <typename T, bool kWholeK = false, bool kTokensEarly = kWholeK, bool kL2Rows = false,
          typename Ready = NoWait>
__device__ __forceinline__ void MainLoop(float (&acc)[kNT][4], const T* wa, const T* wb,
                                         const T* const (&brow)[kNT], int ntiles, int K, int kbeg,
                                         int kend, Ready ready = {}) {
  auto ld_row = [](const void* p) { return kL2Rows ? LdL2(p) : Ld16(p); };
  constexpr bool kWaits = !std::is_same<Ready, NoWait>::value;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
  const int kb0 = kWholeK ? kbeg : kbeg + warp * (kend - kbeg) / kWarps;
  const int kb1 = kWholeK ? kend : kbeg + (warp + 1) * (kend - kbeg) / kWarps;
  for (int kb = kb0; kb < kb1; kb += kBatch) {
    uint4 a[kBatch], b[kBatch], x0[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int k = (kb + u) * 32 + t * 8;
      const bool in = kb + u < kb1 && k < K;
      a[u] = LdStream(in && wa ? wa + k : nullptr);
      b[u] = LdStream(in && wb ? wb + k : nullptr);
      if constexpr (kTokensEarly && !kWaits) x0[u] = ld_row(in && brow[0] ? brow[0] + k : nullptr);
    }
    if (kb == kb0) ready();
    if constexpr (kTokensEarly && kWaits) {
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int k = (kb + u) * 32 + t * 8;
        x0[u] = ld_row(kb + u < kb1 && k < K && brow[0] ? brow[0] + k : nullptr);
      }
    }
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      if (i >= ntiles) break;  // block-uniform
      uint4 x[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int k = (kb + u) * 32 + t * 8;
        x[u] = kTokensEarly && i == 0 ? x0[u] : ld_row(kb + u < kb1 && k < K && brow[i] ? brow[i] + k : nullptr);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) MmaK32<T>(acc[i], a[u], b[u], x[u]);
    }
  }
}

// Sums the warps' accumulators of token tile `warp` into `out` (all kWarps warps call it; `sync`
// is their barrier).
struct BlockSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

template <typename Sync = BlockSync>
__device__ __forceinline__ void Reduce(float (&acc)[kNT][4], float* red, float (&out)[4], Sync sync = {}) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < kNT; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[((warp * kNT + i) * 4 + c) * 32 + lane] = acc[i][c];
  sync();
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[((w * kNT + warp) * 4 + c) * 32 + lane];
    out[c] = s;
  }
}

// The units of MMA rows g (x) and g + 8 (y) of projection 1's weight tile `tile`, as Tile1Row lays
// them out: gated, the same unit (its gate and up rows); else units 16 tile + g and 16 tile + g + 8.
__device__ __forceinline__ int2 Tile1Units(bool gated, int tile, int g) {
  const int ua = gated ? tile * 8 + g : tile * 16 + g;
  return make_int2(ua, gated ? ua : ua + 8);
}

// Row r of projection 1's weight tile `tile` of expert e, or null past I: gated, rows 0-7 are the
// gate rows of units tile*8 .. tile*8+7 and rows 8-15 their up rows; else units tile*16 + r.
template <typename T>
__device__ __forceinline__ const T* Tile1Row(const Gemm1Params& p, int e, int tile, int r) {
  const FirstProj& w = p.w;
  const int64_t u = w.up ? tile * 8 + (r & 7) : tile * 16 + r;
  if (u >= p.I) return nullptr;
  if (w.up && r >= 8) return static_cast<const T*>(w.up) + (w.up_row0 + e * w.up_rpe + u * w.up_rpu) * p.D;
  return static_cast<const T*>(w.gate) + (w.gate_row0 + e * w.gate_rpe + u * w.gate_rpu) * p.D;
}

// Row r of projection 2's weight tile `tile` (output features tile*16 + r) of expert e, or null past D.
template <typename T>
__device__ __forceinline__ const T* Tile2Row(const Gemm2Params& p, int e, int tile, int r) {
  const int64_t d = tile * 16 + r;
  return d < p.D ? static_cast<const T*>(p.w2) + (static_cast<int64_t>(e) * p.D + d) * p.I : nullptr;
}

// Projection 1's epilogue for this warp's token tile of the pass at c0 (`v` from Reduce): routing
// weight on the input (row_scale, per sorted row, or null), bias, activation (gated: act(gate) *
// up) into H. Unit ua is MMA row g; ub, of row g + 8, is the same unit's up row (gated) or unit
// ua + 8.
template <typename T>
__device__ __forceinline__ void StoreH(const Gemm1Params& p, const Slot& s, int c0, int ntiles, int ua,
                                       int ub, const float (&v)[4], const float* row_scale) {
  const int warp = threadIdx.x >> 5, t = threadIdx.x & 3, I = p.I;
  if (warp >= ntiles) return;
  const DType bt = Elem<T>::kType;
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int col = c0 + warp * 8 + 2 * t + c;
    if (col >= s.rows) continue;
    const int r = s.r0 + col;
    const float sc = row_scale ? row_scale[r] : 1.0f;
    T* hrow = static_cast<T*>(p.H) + static_cast<int64_t>(r) * I;
    if (p.w.up) {
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

// Projection 2's bias of output features da (row g) and db (row g + 8), added by part 0 of K only.
template <typename T>
__device__ __forceinline__ float2 Bias2(const Gemm2Params& p, const Slot& s, int z, int da, int db) {
  float2 b = make_float2(0.0f, 0.0f);
  if (p.b2 && z == 0) {
    const DType bt = Elem<T>::kType;
    if (da < p.D) b.x = LoadF(p.b2, static_cast<int64_t>(s.e) * p.D + da, bt);
    if (db < p.D) b.y = LoadF(p.b2, static_cast<int64_t>(s.e) * p.D + db, bt);
  }
  return b;
}

// Projection 2's epilogue for the token tile of rows c8 .. c8 + 7 of slot s: (part z of K of)
// output rows, plus bias.
template <typename T>
__device__ __forceinline__ void StoreOutTile(const Gemm2Params& p, const Slot& s, int c8, int z, int da, int db,
                                             float2 bias, const float (&v)[4]) {
  const int t = threadIdx.x & 3, D = p.D;
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int col = c8 + 2 * t + c;
    if (col >= s.rows) continue;
    const int64_t r = s.r0 + col;
    if (p.out_f32) {
      float* o = static_cast<float*>(p.out) + z * p.plane + r * D;
      if (da < D) o[da] = v[c] + bias.x;
      if (db < D) o[db] = v[2 + c] + bias.y;
    } else {
      T* o = static_cast<T*>(p.out) + r * D;
      if (da < D) o[da] = FromF<T>(v[c] + bias.x);
      if (db < D) o[db] = FromF<T>(v[2 + c] + bias.y);
    }
  }
}

// ... for this warp's token tile of the pass at c0 (`v` from Reduce).
template <typename T>
__device__ __forceinline__ void StoreOut(const Gemm2Params& p, const Slot& s, int c0, int ntiles, int z,
                                         int da, int db, float2 bias, const float (&v)[4]) {
  const int warp = threadIdx.x >> 5;
  if (warp >= ntiles) return;
  StoreOutTile<T>(p, s, c0 + warp * 8, z, da, db, bias, v);
}

// Projection 1 of one slot by a block: its weight tile (blockIdx.x) times the slot's rows of A
// (src_row(sorted row): A's row), in passes of kNT * 8 rows, into H. kTokensEarly: as in MainLoop.
template <typename T, bool kTokensEarly, typename SrcRow>
__device__ __forceinline__ void Gemm1Block(const Gemm1Params& p, const Slot& s, SrcRow src_row,
                                           const float* row_scale, float* red) {
  const int g = (threadIdx.x & 31) >> 2, D = p.D;
  const bool gated = p.w.up != nullptr;
  // this thread's two weight rows (Tile1Units written out: through it, ptxas allocated this
  // kernel's registers differently, 160 -> 162, and the kernel was timed as it is)
  const int ua = gated ? blockIdx.x * 8 + g : blockIdx.x * 16 + g;
  const int ub = gated ? ua : ua + 8;
  const T* wa = Tile1Row<T>(p, s.e, blockIdx.x, g);
  const T* wb = Tile1Row<T>(p, s.e, blockIdx.x, g + 8);
  const T* A = static_cast<const T*>(p.A);
  for (int c0 = 0; c0 < s.rows; c0 += kNT * 8) {
    const int ntiles = min(kNT, (s.rows - c0 + 7) / 8);
    const T* brow[kNT];
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      const int c = c0 + i * 8 + g;
      brow[i] = nullptr;
      if (i < ntiles && c < s.rows) brow[i] = A + static_cast<int64_t>(src_row(s.r0 + c)) * D;
    }
    float acc[kNT][4] = {};
    MainLoop<T, false, kTokensEarly>(acc, wa, wb, brow, ntiles, D, 0, (D + 31) / 32);
    float v[4];
    Reduce(acc, red, v);
    StoreH<T>(p, s, c0, ntiles, ua, ub, v, row_scale);
    __syncthreads();  // red is reused by the next pass (and the block's rows of H are written)
  }
}

// kSignal (Groups::ready): the block counts itself done for its expert once its rows of H are
// written (projection 2 then starts per expert). kTokensEarly: as in MainLoop.
template <typename T, bool kSignal, bool kTokensEarly>
__global__ void __launch_bounds__(kWarps * 32) Gemm1Kernel(Gemm1Params p) {
  GridDepWait();
  GridDepLaunch();
  __shared__ float red[kWarps * kNT * 4 * 32];
  Slot s;
  if (!GetSlot(p.g, blockIdx.y, &s)) return;
  const int* row_map = p.row_map;
  Gemm1Block<T, kTokensEarly>(p, s, [row_map](int r) { return row_map ? row_map[r] : r; }, p.row_scale, red);
  if constexpr (kSignal) {
    if (threadIdx.x == 0) RedRelease(p.g.ready + s.e, 1);
  }
}

// Projection 2's token rows (rows of H) of this thread's MMA column g in the pass at c0, null past
// the slot's rows.
template <typename T>
__device__ __forceinline__ void HRows(const Gemm2Params& p, const Slot& s, int c0, int ntiles,
                                      const T* (&brow)[kNT]) {
  const int g = (threadIdx.x & 31) >> 2;
  const T* H = static_cast<const T*>(p.H);
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
    const int c = c0 + i * 8 + g;
    brow[i] = (i < ntiles && c < s.rows) ? H + static_cast<int64_t>(s.r0 + c) * p.I : nullptr;
  }
}

// kPerExpert (Groups::ready): the block does not wait for all of projection 1 (the previous
// kernel), only for its expert's blocks of it; a warp's first weight loads are in flight meanwhile
// (its token loads follow the wait). kTokensEarly: as in MainLoop (waiting form only).
template <typename T, bool kPerExpert, bool kTokensEarly>
__global__ void __launch_bounds__(kWarps * 32) Gemm2Kernel(Gemm2Params p) {
  if (!kPerExpert) GridDepWait();
  GridDepLaunch();
  __shared__ float red[kWarps * kNT * 4 * 32];
  Slot s;
  if (!GetSlot<kPerExpert>(p.g, blockIdx.y, &s)) return;
  const int g = (threadIdx.x & 31) >> 2, I = p.I;
  const int da = blockIdx.x * 16 + g, db = da + 8;
  const T* wa = Tile2Row<T>(p, s.e, blockIdx.x, g);
  const T* wb = Tile2Row<T>(p, s.e, blockIdx.x, g + 8);
  // this block's part of K; part 0 adds the bias
  const int z = blockIdx.z, nkb = (I + 31) / 32;
  const int kbeg = z * nkb / p.splits, kend = (z + 1) * nkb / p.splits;
  const float2 bias = Bias2<T>(p, s, z, da, db);
  for (int c0 = 0; c0 < s.rows; c0 += kNT * 8) {
    const int ntiles = min(kNT, (s.rows - c0 + 7) / 8);
    const T* brow[kNT];
    HRows<T>(p, s, c0, ntiles, brow);
    float acc[kNT][4] = {};
    if constexpr (kPerExpert)
      MainLoop<T, false, false, true>(acc, wa, wb, brow, ntiles, I, kbeg, kend,
                                      ExpertReady{p.g.ready + s.e, p.g.ready_need});
    else
      MainLoop<T, false, kTokensEarly>(acc, wa, wb, brow, ntiles, I, kbeg, kend);
    float v[4];
    Reduce(acc, red, v);
    StoreOut<T>(p, s, c0, ntiles, z, da, db, bias, v);
    __syncthreads();
  }
}

// Projection 2 when K is short: each warp takes a whole weight tile (16 output features) over all
// of K, four tiles a block, and no reduction through shared memory follows. With K split over the
// block's warps, a warp of (2048, 768, 128, 8) got 6 k-blocks, less than one batch of loads, then
// waited at the block's barrier. On an H200 that shape's projection 2 at T = 4 went from 31.1 to
// 27.7 µs after projection 1's end; at T = 1 it stayed at 10.2-10.9 µs (docs/performance.md).
template <typename T, bool kPerExpert>
__global__ void __launch_bounds__(kWarps * 32) Gemm2WarpKernel(Gemm2Params p) {
  if (!kPerExpert) GridDepWait();
  GridDepLaunch();
  Slot s;
  if (!GetSlot<kPerExpert>(p.g, blockIdx.y, &s)) return;
  const int g = (threadIdx.x & 31) >> 2, I = p.I;
  const int tile = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (tile * 16 >= p.D) return;  // warp-uniform; nothing below waits for the block
  const int da = tile * 16 + g, db = da + 8;
  const T* wa = Tile2Row<T>(p, s.e, tile, g);
  const T* wb = Tile2Row<T>(p, s.e, tile, g + 8);
  const float2 bias = Bias2<T>(p, s, 0, da, db);
  for (int c0 = 0; c0 < s.rows; c0 += kNT * 8) {
    const int ntiles = min(kNT, (s.rows - c0 + 7) / 8);
    const T* brow[kNT];
    HRows<T>(p, s, c0, ntiles, brow);
    float acc[kNT][4] = {};
    if constexpr (kPerExpert)
      MainLoop<T, true, true, true>(acc, wa, wb, brow, ntiles, I, 0, (I + 31) / 32,
                                    ExpertReady{p.g.ready + s.e, p.g.ready_need});
    else
      MainLoop<T, true>(acc, wa, wb, brow, ntiles, I, 0, (I + 31) / 32);
#pragma unroll
    for (int i = 0; i < kNT; ++i)
      if (i < ntiles) StoreOutTile<T>(p, s, c0 + i * 8, 0, da, db, bias, acc[i]);
  }
}

// ---- one-token decode: no routing kernel, no combine ---------------------------------------------
//
// A decode call of one token otherwise runs four kernels one after another: routing, the two
// projections, the combine. Here every block of both projections ranks the token's experts itself
// (RouteTokenByRank; the logits are an input, so no block waits for another kernel to learn its
// expert), and each block of projection 2 computes 16 output features for all k picks, then sums
// them with the routing weights, and adds the shared expert's, as the combine does: the output is
// that of the four kernels (bit for bit in the tests' small cases; docs/runtime.md). Pick j's row
// of H is row j. Projection 2 reads H after all of projection 1 (griddepcontrol.wait), its warps'
// first weights already requested: starting each pick once its blocks of projection 1 were done
// (counters, cleared by a memset first) was 5% slower on an H100 at (2048, 768, 128, 8)
// (docs/performance.md).
constexpr int kOneTokenWarps = 8;  // projection 2's warps, a pick each at a time; 256 threads, as the combine

// MainLoop's wait before the first row of H: all of projection 1.
struct AfterGrid {
  __device__ __forceinline__ void operator()() const { GridDepWait(); }
};

// One-token projection 1 with each warp's weights requested at once (Wide, where D <= 2048): its
// quarter of K, at most kWideBatch k-blocks of its two weight rows (16 KiB a warp: the block's
// whole tile; in batches of 8 k-blocks, a round trip each, Qwen3-30B-A3B's T = 1 took 1.07x
// longer on an H100), the token's values from shared memory. The MMA's column 0 is the token; the
// other columns get zeros, as in MainLoop.
constexpr int kWideBatch = 16;
constexpr int kWideMaxD = kWarps * kWideBatch * 32;

// `rows` is the call's token count (1) from the call: with the MMAs behind a test of it, the compiler
// keeps the loads together rather than moving each down to its MMA (a round trip per k-block).
template <typename T>
__device__ __forceinline__ void WideLoop(float (&acc)[4], const T* wa, const T* wb, const T* xs, int K,
                                         int kb0, int kb1, int rows) {
  const int t = threadIdx.x & 3;
  const unsigned token = (threadIdx.x & 31) < 4 ? ~0u : 0u;  // MMA column 0 is the token (g = 0)
  const bool has_a = wa != nullptr, has_b = wb != nullptr;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  // one base address a row and immediate offsets, rather than a pointer a load
  const uint4* pa = reinterpret_cast<const uint4*>((has_a ? wa : xs) + kb0 * 32 + t * 8);
  const uint4* pb = reinterpret_cast<const uint4*>((has_b ? wb : xs) + kb0 * 32 + t * 8);
  uint4 a[kWideBatch], b[kWideBatch];
#pragma unroll
  for (int u = 0; u < kWideBatch; ++u) {
    const bool in = kb0 + u < kb1 && (kb0 + u) * 32 + t * 8 < K;
    a[u] = in && has_a ? LdWeights(pa + 4 * u) : zero;
    b[u] = in && has_b ? LdWeights(pb + 4 * u) : zero;
  }
  if (rows <= 0) return;
#pragma unroll
  for (int u = 0; u < kWideBatch; ++u) {
    const int k = (kb0 + u) * 32 + t * 8;
    uint4 x = kb0 + u < kb1 && k < K ? *reinterpret_cast<const uint4*>(xs + k) : zero;
    x.x &= token;  // (a mask, not a test: the test's predicates cost registers)
    x.y &= token;
    x.z &= token;
    x.w &= token;
    MmaK32<T>(acc, a[u], b[u], x);
  }
}

// Projection 1: block (b, j) takes pick j's expert, weight tile b. MainLoop's batches, or (Wide,
// D <= 2048) each warp's weights requested at once (WideLoop), the token's row copied to shared
// memory as the block starts (before the routing).
template <typename T, int M, bool Wide>
__global__ void __launch_bounds__(kWarps * 32, 3) OneTokenGemm1Kernel(OneTokenParams p) {
  trace::Stamps ts(0, blockIdx.y * gridDim.x + blockIdx.x);
  ts.Start();
  GridDepWait();
  GridDepLaunch();
  ts.At(trace::kWaited);
  __shared__ float red[kNT * kWarps * 4 * 32];
  __shared__ routing::RankScratch rank;
  __shared__ float w[32];
  __shared__ alignas(16) T xs[Wide ? kWideMaxD : 8];
  const int D = p.p1.D;
  if constexpr (Wide) {
    const T* x = static_cast<const T*>(p.p1.A);
    for (int k = threadIdx.x * 8; k < D; k += blockDim.x * 8) CpAsync16(xs + k, x + k, 16);
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  int id;
  float wj;
  ts.At(trace::kRouting);
  // The routing weights only where they scale the input: a block's routing comes before its
  // first weight load (2.9 us of each first-wave block in a trace on an H100; docs/performance.md).
  routing::RouteTokenByRank<T, M>(p.r, 0, rank, &id, &wj, p.weight_on_input != 0, &ts);
  if (threadIdx.x < 32) w[threadIdx.x] = wj;  // pick j's weight at j (0 past k, or unused)
  if constexpr (Wide) asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
  ts.At(trace::kRouted);
  // The slot's row count from the call (T, which is 1), not the constant 1: told the count, the
  // compiler moves each k-block's loads down to its MMAs, a round trip per k-block.
  const int j = blockIdx.y;
  const Slot s{rank.pick[j], j, p.r.T};
  const float* row_scale = p.weight_on_input ? w : nullptr;
  if constexpr (!Wide) {
    Gemm1Block<T, true>(p.p1, s, [](int) { return 0; }, row_scale, red);
    ts.At(trace::kMultiplied);  // (and stored)
    ts.End();
  } else {
    const int g = (threadIdx.x & 31) >> 2, warp = threadIdx.x >> 5;
    const int2 u = Tile1Units(p.p1.w.up != nullptr, blockIdx.x, g);
    const int nkb = (D + 31) / 32;
    float acc[kNT][4] = {};
    WideLoop<T>(acc[0], Tile1Row<T>(p.p1, s.e, blockIdx.x, g), Tile1Row<T>(p.p1, s.e, blockIdx.x, g + 8), xs, D,
                warp * nkb / kWarps, (warp + 1) * nkb / kWarps, s.rows);
    ts.At(trace::kMultiplied);
    float v[4];
    Reduce(acc, red, v);
    StoreH<T>(p.p1, s, 0, 1, u.x, u.y, v, row_scale);
    ts.End();
  }
}

// Projection 2 and the combine: block `tile` computes output features tile*16 .. tile*16+15, warp
// i for picks i, i + kOneTokenWarps, ...; a warp's first weight loads of a pick are in flight
// before it waits for projection 1.
template <typename T, int M>
__global__ void __launch_bounds__(kOneTokenWarps * 32) OneTokenGemm2Kernel(OneTokenParams p) {
  static_assert(sizeof(T) == 2, "16-bit types");
  trace::Stamps ts(1, blockIdx.x);
  ts.Start();
  GridDepLaunch();
  ts.At(trace::kWaited);
  __shared__ routing::RankScratch rank;
  __shared__ uint16_t logits[routing::kCachedMaxExperts], sel_bias[routing::kCachedMaxExperts];
  __shared__ float w[32];
  __shared__ float part[32][16];  // pick j's output features, plus bias
  __shared__ float smem[32];
  // The logits through L2: this kernel starts before projection 1 ends, without the wait that
  // makes an earlier kernel's writes safe to read through L1.
  const int E = p.r.E, K = p.r.K;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    logits[e] = __ldcg(static_cast<const uint16_t*>(p.r.logits) + e);
    if (p.r.sel_bias) sel_bias[e] = __ldcg(static_cast<const uint16_t*>(p.r.sel_bias) + e);
  }
  __syncthreads();
  RouteParams r = p.r;
  r.logits = logits;
  r.sel_bias = p.r.sel_bias ? sel_bias : nullptr;
  int id;
  float wj;
  ts.At(trace::kRouting);
  routing::RouteTokenByRank<T, M>(r, 0, rank, &id, &wj, true, &ts);
  ts.At(trace::kRouted);
  if (threadIdx.x < 32) w[threadIdx.x] = wj;
  const Gemm2Params& q = p.p2;
  const int lane = threadIdx.x & 31, g = lane >> 2;
  const int tile = blockIdx.x, da = tile * 16 + g, db = da + 8;
  for (int j = threadIdx.x >> 5; j < K; j += kOneTokenWarps) {
    const Slot s{rank.pick[j], j, p.r.T};  // (T = 1: see OneTokenGemm1Kernel)
    const T* wa = Tile2Row<T>(q, s.e, tile, g);
    const T* wb = Tile2Row<T>(q, s.e, tile, g + 8);
    const float2 bias = Bias2<T>(q, s, 0, da, db);
    const T* brow[kNT];
    const int ntiles = s.rows;
    HRows<T>(q, s, 0, ntiles, brow);
    float acc[kNT][4] = {};
    MainLoop<T, true, true, true>(acc, wa, wb, brow, ntiles, q.I, 0, (q.I + 31) / 32, AfterGrid{});
    if ((lane & 3) == 0) {  // the token is MMA column 0: c = 0 of rows g and g + 8
      part[j][g] = acc[0][0] + bias.x;
      part[j][g + 8] = acc[0][2] + bias.y;
    }
  }
  // The shared expert's output and X (its gate) after all earlier kernels (a warp without a pick
  // has not waited yet).
  float sg = 1.0f;
  if (p.shared) {
    GridDepWait();
    if (p.shared_gate) sg = SharedGate<T>(static_cast<const T*>(p.p1.A), p.shared_gate, q.D, smem);
  }
  ts.At(trace::kMultiplied);
  __syncthreads();
  ts.End();
  const int d = tile * 16 + threadIdx.x;
  if (threadIdx.x >= 16 || d >= q.D) return;
  // the combine's sum: the picks in order, then the shared expert
  float y = 0.0f;
  for (int j = 0; j < K; ++j) y += (p.weight_on_input ? 1.0f : w[j]) * part[j][threadIdx.x];
  if (p.shared) {
    const float z = p.shared_f32 ? static_cast<const float*>(p.shared)[d] : ToF(static_cast<const T*>(p.shared)[d]);
    y += p.shared_gate ? z * sg : z;
  }
  static_cast<T*>(p.Y)[d] = FromF<T>(y);
}

// ---- decode on Hopper: both projections in one persistent kernel (large calls) ---------------
//
// Three blocks per SM. A producer warp streams weight rows into a ring of shared-memory stages
// with bulk copies (the TMA unit, so the bytes in flight are not bounded by registers); four
// consumer warps run the MMAs above from there, with the tokens' values through L1, and the same
// reduction and epilogues. Work items are numbered expert-major: every projection-1 tile of the
// call, then every projection-2 tile (and part of K). Blocks take them in order from a ticket
// counter. A projection-2 item waits until its expert's projection-1 tiles are done (a counter per
// expert), but its weights are already on their way: projection 2's weights stream in while
// projection 1 finishes, and the launch between the two kernels is gone. Tickets rather than a
// fixed split keep this deadlock-free on a shared GPU: an item waits only for items with smaller
// tickets, each held by a block that is running.
//
// Measured on an H200 it matched the two kernels at T = 1 and was a few percent slower at T = 4; on
// an H100 it is faster where a call's routed weights are large (kSkinnyFusedMinBytes, the default
// from there; docs/performance.md). One block per SM
// (4 stages of 1024) was 1.14x-1.32x slower at T = 1 than three (3 stages of 512): a block's
// stream stalls on each item's own latency (reduction, epilogue, counters), which other blocks
// hide.

constexpr int kFzStages = 3;
constexpr int kFzKC = 512;  // k of one stage
constexpr int kFzBlocksPerSm = 3;  // one block's per-item latencies hide behind the others' streams
constexpr int kFzKbPerWarp = kFzKC / 32 / kWarps;
// Stage rows are 64 bytes longer than their data: the two rows a quarter-warp's 16-byte loads
// touch then fall on different banks.
constexpr int kFzRowBytes = kFzKC * 2 + 64;
constexpr int kFzItems = 2 * kFzStages;  // item queue
static_assert(kFzItems > kFzStages, "the item queue's reuse argument (FzProduce)");
static_assert(kSkinnyFusedMaxPairs <= kNT * 8, "one pass of token tiles per expert");

struct FzShared {
  uint8_t stage[kFzStages][16 * kFzRowBytes];
  float red[kWarps * kNT * 4 * 32];
  uint64_t full[kFzStages], empty[kFzStages], item_bar[kFzItems];
  int item[kFzItems];
  int slot_e[kSkinnyFusedMaxPairs], slot_r0[kSkinnyFusedMaxPairs], slot_rows[kSkinnyFusedMaxPairs];
  int row_src[kSkinnyFusedMaxPairs];
  int slot_ready[kSkinnyFusedMaxPairs];  // seen all projection-1 tiles of the slot done
  int num_active;
};

// One work item: projection 1 or 2, the expert's slot, the weight tile, the part of K (projection
// 2) and its stages [st0, st1) of kFzKC each.
struct FzItem {
  bool first;
  int slot, tile, z, st0, st1;
};

struct FzShape {
  int n1, n2, splits, nst1, nst2;  // tiles per expert; parts of K (projection 2); stages of K
  __device__ explicit FzShape(const FusedDecodeParams& f)
      : n1(static_cast<int>(CeilDiv(f.p1.I, f.p1.w.up ? 8 : 16))),
        n2(static_cast<int>(CeilDiv(f.p2.D, 16))),
        splits(f.p2.splits),
        nst1(static_cast<int>(CeilDiv(f.p1.D, kFzKC))),
        nst2(static_cast<int>(CeilDiv(f.p2.I, kFzKC))) {}
  __device__ int Items(int active) const { return active * (n1 + n2 * splits); }
  __device__ FzItem Decode(int item, int active) const {
    FzItem it;
    it.first = item < active * n1;
    if (it.first) {
      it.slot = item / n1;
      it.tile = item % n1;
      it.z = 0;
      it.st0 = 0;
      it.st1 = nst1;
    } else {
      const int j = item - active * n1, per = n2 * splits;
      it.slot = j / per;
      it.tile = j % per / splits;
      it.z = j % splits;
      it.st0 = it.z * nst2 / splits;  // >= 1 stage per part: splits <= nst2 (the launcher checks)
      it.st1 = (it.z + 1) * nst2 / splits;
    }
    return it;
  }
};

#ifdef MOEFUSE_SM90A

// The consumer warps' barrier (the producer warp is not in it).
struct ConsumerSync {
  __device__ __forceinline__ void operator()() const {
    asm volatile("bar.sync 1, %0;" ::"n"(kWarps * 32) : "memory");
  }
};

// The producer warp: lane 0 takes tickets and announces each item in the item queue; lane r < 16
// issues the bulk copy of weight row r of each stage.
// Item j's queue entry was last read when the consumers began item j - kFzItems; every item has
// at least one stage, so issuing item j - 1's stages waited until the consumers had released a
// stage of an item after that one (kFzItems - 1 >= kFzStages).
template <typename T>
__device__ __forceinline__ void FzProduce(const FusedDecodeParams& f, FzShared& sh, const FzShape& shape,
                                          int active) {
  const int lane = threadIdx.x & 31, total = shape.Items(active);
  const uint64_t policy = EvictFirstPolicy();
  int next = lane == 0 ? atomicAdd(f.sync, 1) : 0;
  uint32_t q = 0;  // stages filled
  for (int j = 0;; ++j) {
    int item = 0;
    if (lane == 0) {
      item = next < total ? next : -1;
      if (item >= 0) next = atomicAdd(f.sync, 1);  // in flight while this item is issued
      sh.item[j % kFzItems] = item;
      MbarArrive(&sh.item_bar[j % kFzItems]);
    }
    item = __shfl_sync(0xffffffffu, item, 0);
    if (item < 0) return;
    const FzItem it = shape.Decode(item, active);
    const int e = sh.slot_e[it.slot], K = it.first ? f.p1.D : f.p2.I;
    const T* row = nullptr;
    if (lane < 16) row = it.first ? Tile1Row<T>(f.p1, e, it.tile, lane) : Tile2Row<T>(f.p2, e, it.tile, lane);
    const uint32_t nrows = __popc(__ballot_sync(0xffffffffu, row != nullptr));
    for (int st = it.st0; st < it.st1; ++st, ++q) {
      const int s = q % kFzStages;
      const int k0 = st * kFzKC, klen = min(kFzKC, K - k0);
      if (lane == 0) {
        if (q >= kFzStages) MbarWait(&sh.empty[s], (q / kFzStages + 1) & 1);
        MbarExpectTx(&sh.full[s], nrows * klen * 2);
      }
      __syncwarp();
      if (row) BulkLoad(sh.stage[s] + lane * kFzRowBytes, row + k0, klen * 2, &sh.full[s], policy);
    }
  }
}

// One stage of a consumer warp: its quarter of the stage's k-blocks. The tokens' values of the
// first token tile are requested before waiting for the weights. X is read-only (the non-coherent
// path); H is written by this kernel, read through L1 (ld.ca) only after the acquire of its
// expert's counter, which leaves no stale line of it in this SM's L1.
template <typename T, bool kWrittenHere>
__device__ __forceinline__ void FzStage(float (&acc)[kNT][4], const uint8_t* stage, bool va, bool vb,
                                        const T* const (&brow)[kNT], int ntiles, int k0, int klen,
                                        uint64_t* full, uint32_t parity) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int nkb = (klen + 31) / 32, kb0 = warp * nkb / kWarps, kb1 = (warp + 1) * nkb / kWarps;
  const uint8_t* ra = stage + g * kFzRowBytes;
  const uint8_t* rb = ra + 8 * kFzRowBytes;
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
    if (i >= ntiles) break;  // block-uniform
    uint4 x[kFzKbPerWarp];
#pragma unroll
    for (int u = 0; u < kFzKbPerWarp; ++u) {
      const int k = (kb0 + u) * 32 + t * 8;
      const uint4* src = reinterpret_cast<const uint4*>(brow[i] + k0 + k);
      x[u] = kb0 + u < kb1 && k < klen && brow[i] ? (kWrittenHere ? __ldca(src) : __ldg(src)) : zero;
    }
    if (i == 0) MbarWait(full, parity);
#pragma unroll
    for (int u = 0; u < kFzKbPerWarp; ++u) {
      const int k = (kb0 + u) * 32 + t * 8;
      const bool in = kb0 + u < kb1 && k < klen;
      const uint4 a = in && va ? *reinterpret_cast<const uint4*>(ra + k * 2) : zero;
      const uint4 b = in && vb ? *reinterpret_cast<const uint4*>(rb + k * 2) : zero;
      MmaK32<T>(acc[i], a, b, x[u]);
    }
  }
}

// The four consumer warps: each item's stages, then the reduction and projection 1's or 2's
// epilogue. A finished projection-1 tile counts for its expert; a projection-2 item first waits
// for its expert's count (its weights keep arriving meanwhile).
template <typename T>
__device__ __forceinline__ void FzConsume(const FusedDecodeParams& f, FzShared& sh, const FzShape& shape,
                                          int active) {
  const int lane = threadIdx.x & 31, g = lane >> 2;
  const ConsumerSync sync;
  const T* X = static_cast<const T*>(f.p1.A);
  const T* H = static_cast<const T*>(f.p2.H);
  uint32_t q = 0;  // stages consumed
  for (int j = 0;; ++j) {
    MbarWait(&sh.item_bar[j % kFzItems], (j / kFzItems) & 1);
    const int item = sh.item[j % kFzItems];
    if (item < 0) return;
    const FzItem it = shape.Decode(item, active);
    const Slot s{sh.slot_e[it.slot], sh.slot_r0[it.slot], sh.slot_rows[it.slot]};
    const int ntiles = (s.rows + 7) / 8;
    const T* brow[kNT];
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      const int c = i * 8 + g;
      brow[i] = c >= s.rows ? nullptr
                : it.first  ? X + static_cast<int64_t>(sh.row_src[s.r0 + c]) * f.p1.D
                            : H + static_cast<int64_t>(s.r0 + c) * f.p2.I;
    }
    // (every consumer thread takes the same branch: the flag is set after this barrier and read
    // again only after the reduction's barrier)
    if (!it.first && !sh.slot_ready[it.slot]) {
      if (threadIdx.x == 0)
        while (LoadAcquire(f.sync + 1 + it.slot) < shape.n1) __nanosleep(64);
      sync();
      if (threadIdx.x == 0) sh.slot_ready[it.slot] = 1;
    }
    const int K = it.first ? f.p1.D : f.p2.I;
    // MMA rows g and g + 8 of the tile: valid unless past I (projection 1) or D (projection 2)
    const int2 u1 = Tile1Units(f.p1.w.up != nullptr, it.tile, g);
    const int ua = u1.x, ub = u1.y;
    const int da = it.tile * 16 + g, db = da + 8;
    const bool va = it.first ? ua < f.p1.I : da < f.p2.D, vb = it.first ? ub < f.p1.I : db < f.p2.D;
    float acc[kNT][4] = {};
    for (int st = it.st0; st < it.st1; ++st, ++q) {
      const int sidx = q % kFzStages, k0 = st * kFzKC, klen = min(kFzKC, K - k0);
      const uint32_t parity = (q / kFzStages) & 1;
      if (it.first)
        FzStage<T, false>(acc, sh.stage[sidx], va, vb, brow, ntiles, k0, klen, &sh.full[sidx], parity);
      else
        FzStage<T, true>(acc, sh.stage[sidx], va, vb, brow, ntiles, k0, klen, &sh.full[sidx], parity);
      __syncwarp();
      if (lane == 0) MbarArrive(&sh.empty[sidx]);
    }
    float v[4];
    Reduce(acc, sh.red, v, sync);
    if (it.first) {
      StoreH<T>(f.p1, s, 0, ntiles, ua, ub, v, f.p1.row_scale);
      sync();  // every thread's H values are written (and red is free again)
      if (threadIdx.x == 0) RedRelease(f.sync + 1 + it.slot, 1);
    } else {
      StoreOut<T>(f.p2, s, 0, ntiles, it.z, da, db, Bias2<T>(f.p2, s, it.z, da, db), v);
      sync();  // red is free again
    }
  }
}

template <typename T>
__global__ void __launch_bounds__((kWarps + 1) * 32, kFzBlocksPerSm)
    FusedDecodeKernel(const __grid_constant__ FusedDecodeParams f) {
  extern __shared__ __align__(128) uint8_t fz_raw[];
  FzShared& sh = *reinterpret_cast<FzShared*>(fz_raw);
  GridDepWait();
  GridDepLaunch();
  const Groups& g = f.p1.g;
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < kFzStages; ++s) {
      MbarInit(&sh.full[s], 1);  // the producer's arrival + the stage's bytes
      MbarInit(&sh.empty[s], kWarps);
    }
    for (int j = 0; j < kFzItems; ++j) MbarInit(&sh.item_bar[j], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    sh.num_active = *g.num_active;
  }
  if (tid < kSkinnyFusedMaxPairs) {
    sh.slot_ready[tid] = 0;
    if (tid < *g.num_active) {
      const int e = g.active[tid];
      sh.slot_e[tid] = e;
      sh.slot_r0[tid] = g.offsets[e];
      sh.slot_rows[tid] = g.active[g.num_groups + tid];
    }
    if (tid < f.pairs) sh.row_src[tid] = f.p1.row_map ? f.p1.row_map[tid] : tid;
  }
  __syncthreads();
  const FzShape shape(f);
  if (tid >= kWarps * 32) {
    FzProduce<T>(f, sh, shape, sh.num_active);
    return;
  }
  FzConsume<T>(f, sh, shape, sh.num_active);
}

#else  // not sm_90a: never launched (SkinnyFusedAvailable checks the device's code); a launch
        // traps rather than leave the outputs unwritten

template <typename T>
__global__ void FusedDecodeKernel(const __grid_constant__ FusedDecodeParams) { __trap(); }

#endif

template <typename T>
cudaError_t Gemm1T(const Gemm1Params& p, cudaStream_t stream) {
  const bool gated = p.w.up != nullptr;
  const int64_t tiles = CeilDiv(p.I, gated ? 8 : 16);
  const int slots = p.g.dense_rows >= 0 ? 1 : p.g.max_slots;
  if (tiles <= 0 || slots <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(slots)), block(kWarps * 32);
  if (TokensEarly(p.D))
    return p.g.ready ? Launch(Gemm1Kernel<T, true, true>, grid, block, 0, stream, p)
                     : Launch(Gemm1Kernel<T, false, true>, grid, block, 0, stream, p);
  return p.g.ready ? Launch(Gemm1Kernel<T, true, false>, grid, block, 0, stream, p)
                   : Launch(Gemm1Kernel<T, false, false>, grid, block, 0, stream, p);
}

template <typename T>
cudaError_t Gemm2T(const Gemm2Params& p, cudaStream_t stream) {
  const int64_t tiles = CeilDiv(p.D, 16);
  const int slots = p.g.dense_rows >= 0 ? 1 : p.g.max_slots;
  if (tiles <= 0 || slots <= 0) return cudaSuccess;
  if (p.splits < 1 || (p.splits > 1 && !p.out_f32)) return cudaErrorInvalidValue;
  const bool per_expert = p.g.ready != nullptr;
  if (p.splits == 1 && CeilDiv(p.I, 32) < kWarps * kBatch) {  // less than a batch per warp if split
    const dim3 grid(static_cast<unsigned>(CeilDiv(tiles, kWarps)), static_cast<unsigned>(slots));
    return per_expert ? Launch(Gemm2WarpKernel<T, true>, grid, dim3(kWarps * 32), 0, stream, p)
                      : Launch(Gemm2WarpKernel<T, false>, grid, dim3(kWarps * 32), 0, stream, p);
  }
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(slots), static_cast<unsigned>(p.splits));
  if (per_expert) return Launch(Gemm2Kernel<T, true, false>, grid, dim3(kWarps * 32), 0, stream, p);
  return TokensEarly(CeilDiv(p.I, p.splits))
             ? Launch(Gemm2Kernel<T, false, true>, grid, dim3(kWarps * 32), 0, stream, p)
             : Launch(Gemm2Kernel<T, false, false>, grid, dim3(kWarps * 32), 0, stream, p);
}

template <typename T, int M>
cudaError_t OneTokenT(const OneTokenParams& p, cudaStream_t stream) {
  const bool gated = p.p1.w.up != nullptr;
  const dim3 grid1(static_cast<unsigned>(CeilDiv(p.p1.I, gated ? 8 : 16)), static_cast<unsigned>(p.r.K));
  const dim3 grid2(static_cast<unsigned>(CeilDiv(p.p2.D, 16)));
  const bool wide = p.p1.D <= kWideMaxD && p.p1.D % 8 == 0 && (reinterpret_cast<uintptr_t>(p.p1.A) & 15) == 0;
  const cudaError_t e = wide ? Launch(OneTokenGemm1Kernel<T, M, true>, grid1, dim3(kWarps * 32), 0, stream, p)
                             : Launch(OneTokenGemm1Kernel<T, M, false>, grid1, dim3(kWarps * 32), 0, stream, p);
  if (e) return e;
  return Launch(OneTokenGemm2Kernel<T, M>, grid2, dim3(kOneTokenWarps * 32), 0, stream, p);
}

template <typename T>
cudaError_t OneTokenModeT(const OneTokenParams& p, cudaStream_t stream) {
  switch (p.r.mode) {
    case routing::kSoftmaxTopk:
      return p.r.sel_bias ? OneTokenT<T, routing::kSoftmaxBiasTopk>(p, stream)
                          : OneTokenT<T, routing::kSoftmaxTopk>(p, stream);
    case routing::kTopkSoftmax:
      return OneTokenT<T, routing::kTopkSoftmax>(p, stream);
    case routing::kSigmoidTopk:
      return OneTokenT<T, routing::kSigmoidTopk>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// The one-kernel decode's shared-memory attribute and blocks resident per SM, set and asked once
// per device (the first 64; past those, on every call): both are the device's, not the call's. A
// cached count means the attribute was set before it.
template <typename T>
cudaError_t FusedBlocksPerSm(size_t smem, int* per_sm) {
  static std::atomic<int> cached[64];
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device)) return e;
  std::atomic<int>* slot = device >= 0 && device < 64 ? &cached[device] : nullptr;
  if (slot && (*per_sm = slot->load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  if (cudaError_t e = cudaFuncSetAttribute(FusedDecodeKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)))
    return e;
  if (cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, FusedDecodeKernel<T>,
                                                                    (kWarps + 1) * 32, smem))
    return e;
  if (slot && *per_sm > 0) slot->store(*per_sm, std::memory_order_relaxed);
  return cudaSuccess;
}

template <typename T>
cudaError_t FusedT(const FusedDecodeParams& f, int num_sms, cudaStream_t stream) {
  const int nst2 = static_cast<int>(CeilDiv(f.p2.I, kFzKC));
  if (f.pairs > kSkinnyFusedMaxPairs || f.p1.g.dense_rows >= 0 || f.p2.splits < 1 || f.p2.splits > nst2 ||
      !f.p2.out_f32 || !f.sync)
    return cudaErrorInvalidValue;
  if (f.pairs == 0 || f.p1.I <= 0 || f.p1.D <= 0) return cudaSuccess;
  const size_t smem = sizeof(FzShared);
  int per_sm = 0;
  if (cudaError_t e = FusedBlocksPerSm<T>(smem, &per_sm)) return e;
  const int blocks = num_sms * std::max(1, std::min(per_sm, kFzBlocksPerSm));
  return Launch(FusedDecodeKernel<T>, dim3(static_cast<unsigned>(blocks)), dim3((kWarps + 1) * 32), smem,
                stream, f);
}

// Blocks of a skinny kernel (kWarps warps, static shared memory only) resident per SM on the
// current device; 1 where the occupancy query fails.
template <typename Kernel>
int ResidentPerSm(Kernel kernel) {
  int n = 0;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kWarps * 32, 0) == cudaSuccess && n > 0 ? n : 1;
}

}  // namespace

// Wave quantization: with B blocks and C resident per wave, the last wave of ceil(B / C) may run
// nearly empty (projection 2 of (4096, 14336, 8, 2) at T = 1: 512 blocks, 396 resident). Splitting
// K s ways costs ceil(s B / C) / s waves of the unsplit work; the least wins, fewer parts on ties,
// and each warp keeps at least one batch of k-blocks.
int SkinnyGemm2Splits(int64_t D, int64_t I, int64_t slots, int num_sms) {
  static const int per_sm = ResidentPerSm(Gemm2Kernel<__half, false, false>);
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

int SkinnyFirstProjSignals(const Gemm1Params& p) {
  return static_cast<int>(CeilDiv(p.I, p.w.up ? 8 : 16));  // a signal per block of the expert
}

// Projection 2's blocks get onto the SMs only as projection 1's last wave drains; where that is
// one of a few waves, starting them per expert gains (the experts of earlier waves are done), and
// each of projection 1's blocks pays for its release (a memory fence) once. H200, bfloat16: 5-6%
// faster calls at 2-4 waves (T = 1 on (2048, 768, 128, 8) and (2880, 2880, 32, 4)), 3% at 8
// (T = 4 on the first), 0.7% at 9-15, and 3-5% slower at 31-36 (docs/performance.md).
constexpr int kPerExpertMaxWaves = 8;

bool SkinnyPerExpertStartPays(int64_t I, bool gated, int64_t slots, int num_sms) {
  static const int per_sm = ResidentPerSm(Gemm1Kernel<__half, false, false>);
  const int64_t blocks = CeilDiv(I, gated ? 8 : 16) * slots;
  return blocks <= static_cast<int64_t>(kPerExpertMaxWaves) * per_sm * num_sms;
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

bool OneTokenDecodeShapeServes(int64_t D, int64_t I) {
  // projection 1 with its token loads early (the other form spills here: D > 3072 is left to the
  // skinny kernels), projection 2 as Gemm2WarpKernel takes it
  return D > 0 && I > 0 && TokensEarly(D) && CeilDiv(I, 32) < kWarps * kBatch;
}

bool OneTokenDecodeServes(const RouteParams& r, const Gemm2Params& p2) {
  const bool half = p2.dtype == DType::kBF16 || p2.dtype == DType::kF16;
  return half && routing::RoutesOneByRank(r) && p2.splits == 1 && OneTokenDecodeShapeServes(p2.D, p2.I);
}

cudaError_t LaunchOneTokenDecode(const OneTokenParams& p, cudaStream_t stream) {
  if (!OneTokenDecodeServes(p.r, p.p2) || p.r.dtype != p.p2.dtype) return cudaErrorInvalidValue;
  if (p.p2.dtype == DType::kBF16) return OneTokenModeT<__nv_bfloat16>(p, stream);
  return OneTokenModeT<__half>(p, stream);
}

bool SkinnyFusedAvailable() {
  return RunsSm90aCode(FusedDecodeKernel<__half>);
}

// Parts of projection 2's K: about four stages each at least, at most four parts (they are summed
// by the combine), so that long K (14336) still gives every SM several items to balance.
int SkinnyFusedSplits(int64_t I) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(4, CeilDiv(I, kFzKC) / 4)));
}

cudaError_t LaunchSkinnyFused(const FusedDecodeParams& f, int num_sms, cudaStream_t stream) {
  if (f.p1.dtype == DType::kBF16) return FusedT<__nv_bfloat16>(f, num_sms, stream);
  if (f.p1.dtype == DType::kF16) return FusedT<__half>(f, num_sms, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace moefuse

#ifdef MOEFUSE_CUDA_TRACE
// The one-token kernels' stamps of the last call (trace.cuh), [kernel][block][slot], into `host`
// (kKernels * kBlocks * kSlots 64-bit words); a CUDA error code, 0 on success.
extern "C" __attribute__((visibility("default"))) int moefuse_trace_read(void* host) {
  using moefuse::cuda::trace::g_stamps;
  return static_cast<int>(cudaMemcpyFromSymbol(host, g_stamps, sizeof(g_stamps)));
}
#endif
