// The prefill path on Hopper (sm_90a): a persistent, warp-specialized grouped GEMM on wgmma.
//
// One CTA per SM walks the output tiles of every expert (128 sorted rows x BN columns), expert by
// expert, n-tile by n-tile, m-tiles innermost so that the CTAs working at the same time share the
// expert's weight tile in L2. By default the CTAs take their next 128-row tile from a counter (a
// static stride let the CTAs sharing a weight tile drift apart, and DRAM served it again). The
// schedule (tiles per expert) comes from the routing step in device memory: the host never learns
// the per-expert token counts.
//
// Warpgroup 0 produces: the weight tile by TMA (128-byte swizzle), the activation rows by
// cp.async, gathered through the sorted row list (tokens of the expert), written in the same
// swizzled layout; both complete on the stage's "full" mbarrier. Warpgroups 1 and 2 consume with
// wgmma (A and B read from shared memory, float32 accumulators in registers) and run a fused
// epilogue straight from the registers: routing weight (weight on input), bias, clamp, activation
// and gating for projection 1; bias for projection 2. Two consumer schedules:
//  - cooperative (128 x 128 and 128 x 256 tiles; the default): both warpgroups share each tile,
//    64 rows each; the tensor cores idle during the epilogue. Keep the epilogue's executed code
//    small: when it held every activation kind in each unrolled step, it ran out of the
//    instruction cache and projection 1 kept the tensor pipe 38% busy (77.6% since; H200).
//  - ping-pong (128 x 128 tiles; MOEFUSE_CUDA_SCHEDULE=pingpong, experimental): each consumer
//    warpgroup owns every other tile of the CTA (all 128 rows, two m64n128k16 per k-step), so one
//    warpgroup's epilogue runs while the other's main loop keeps the tensor cores busy; the main
//    loops take turns (mma_done barriers). The epilogue writes the tile into the warpgroup's own
//    shared-memory buffer and copies it out with 16-byte stores.
// The cooperative schedule also runs on CTA pairs (WgKernel<..., Pairs>; MOEFUSE_CUDA_CTA_PAIRS in
// docs/runtime.md): clusters of two CTAs take m-tiles 2j and 2j + 1 of one expert and n-tile and
// each loads half of the weight tile into both (TMA multicast); an odd count's last m-tile is split
// in halves of 64 rows over the pair. Tiles from a counter are taken by rank 0 for both
// (PairTickets).
//
// Gate and up columns: every gate/up layout (halves, interleaved, separate) arrives as two TMA boxes
// of BN/2 rows, read through "unit maps" (views that take every rpu-th weight row, so interleaved
// rows split into a gate and an up view): gate units in accumulator columns [0, BN/2), their up rows
// in [BN/2, BN), 16 accumulator blocks apart. Both values of a unit are in the same thread, and a
// thread's two adjacent units leave in one 4-byte store.
#include <cuda.h>

#include "common.cuh"
#include "sm90.cuh"

namespace moefuse {
namespace cuda {
namespace {

constexpr int kBM = 128, kBK = 64, kThreads = 384;

struct WgArgs {
  const void* A = nullptr;  // rows of K elements (stride lda)
  int64_t lda = 0;
  int K = 0;
  const int* row_map = nullptr;      // sorted row -> A row (null: identity)
  const float* row_scale = nullptr;  // per sorted row (weight on input)
  Groups g;
  int n_tiles = 0;
  int N = 0;     // valid output columns (units for gated modes)
  int mode = 0;  // 0 plain (one box), 2 gated (a gate box and an up box)
  int act_on = 0;
  int64_t b1_rpe = 0, b2_rpe = 0;  // TMA rows per expert of box 1 / box 2 (maps start at row 0)
  void* out = nullptr;
  int64_t ldo = 0;
  const void* bias1 = nullptr;
  int64_t bias1_off = 0, bias1_es = 0, bias1_us = 1;
  const void* bias2 = nullptr;
  int64_t bias2_off = 0, bias2_es = 0, bias2_us = 1;
  ActParams act;
  int expert_major = 1;  // tile order: expert, n-tile, m-tile (else n-tile, then all m-tiles)
  // Groups::ready (cooperative and narrow tiles): projection 1 counts its finished tiles per expert
  // in ready_signal; projection 2 takes tiles from *next_tile and gathers an expert's rows once
  // ready_wait[e] reaches ready_need per m-tile of the expert.
  int* ready_signal = nullptr;
  const int* ready_wait = nullptr;
  int ready_need = 0;
  int* next_tile = nullptr;
  // A's rows are the sorted rows themselves (no row_map): the producer loads them with the TMA
  // (TmaMaps::a, boxes of kBK x BM rows), not with cp.async.
  int a_tma = 0;
  // Clusters of two CTAs share each weight tile (Groups::mpairs; the weight maps' boxes are half
  // a tile's rows): the cooperative kernel's WgKernel<..., true>.
  int cta_pairs = 0;
};

// The kernels' TMA maps: weight boxes (gate and up views, or one view twice) and, with
// WgArgs::a_tma, the activation rows.
struct TmaMaps {
  CUtensorMap w1, w2, a;
};

// Shared-memory bytes of a ring (SetUpRing's layout, plus the alignment slack).
constexpr int RingSmem(int S, int a_bytes, int b_bytes, int info_slots, int extra_bytes = 0) {
  return S * (a_bytes + b_bytes) + extra_bytes + (2 * S + 2) * 8 + info_slots * 16 + 1024;
}

template <int BN, bool PingPong>
struct Cfg {
  static_assert(!PingPong || BN == 128, "ping-pong: 128 x 128 tiles (128 accumulators a thread)");
  static constexpr bool kPingPong = PingPong;
  static constexpr int kStages = PingPong ? 5 : BN == 256 ? 4 : 6;
  static constexpr int kABytes = kBM * kBK * 2;
  static constexpr int kBBytes = BN * kBK * 2;
  // ping-pong: each consumer warpgroup stages its output tile here (a pipeline stage held through
  // the epilogue would stall the other warpgroup's main loop a few k-blocks later)
  static constexpr int kEpiBytes = PingPong ? 2 * kBM * BN * 2 : 0;
  // Ring of tile descriptions, producer -> consumers. The producer runs at most kStages stages
  // (so kStages tiles) ahead of the oldest tile not yet consumed, one more under ping-pong.
  static constexpr int kInfo = 16;
  static_assert(kInfo > kStages + 2, "tile ring too small");
  static constexpr int kSmem = RingSmem(kStages, kABytes, kBBytes, kInfo, kEpiBytes);
  static_assert(kSmem <= 227 * 1024, "shared memory of an H100/H200 SM");
};

// Narrow tiles (WgNarrowKernel): kUnits weight rows per box (gate and up: two boxes) by BT rows.
template <int BT>
struct NarrowCfg {
  static_assert(BT == 32 || BT == 64, "narrow tiles: 32 or 64 rows");
  static constexpr int kUnits = 128;
  static constexpr int kStages = BT == 32 ? 6 : 5;
  static constexpr int kABytes = BT * kBK * 2;
  static constexpr int kBBytes = 2 * kUnits * kBK * 2;
  static constexpr int kInfo = 16;
  static_assert(kInfo > kStages + 1, "tile ring too small");
  static constexpr int kSmem = RingSmem(kStages, kABytes, kBBytes, kInfo);
  static_assert(kSmem <= 227 * 1024, "shared memory of an H100/H200 SM");
};

#ifdef MOEFUSE_SM90A

__device__ __forceinline__ void TmaLoad2d(void* dst, const CUtensorMap* map, int x, int y,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3}], [%4];" ::"r"(SmemAddr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(SmemAddr(bar))
      : "memory");
}

// The same box into the same shared-memory offset of both CTAs of the cluster, completing on each
// one's mbarrier at `bar`'s offset.
__device__ __forceinline__ void TmaLoad2dBoth(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster "
      "[%0], [%1, {%2, %3}], [%4], %5;" ::"r"(SmemAddr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(SmemAddr(bar)), "h"(static_cast<uint16_t>(3))
      : "memory");
}

// The stage's mbarrier completes one arrival once this thread's cp.async writes have landed.
__device__ __forceinline__ void CpAsyncArrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];" ::"r"(SmemAddr(bar)) : "memory");
}

// Shared memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t Desc(const void* p) {
  const uint32_t a = SmemAddr(p);
  return static_cast<uint64_t>((a & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

#define MOEFUSE_D8(b) "+f"(d[b + 0]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), \
    "+f"(d[b + 4]), "+f"(d[b + 5]), "+f"(d[b + 6]), "+f"(d[b + 7])

// m64n128k16, float32 accumulators d[0..63], A and B from shared memory (K-major).
#define MOEFUSE_WGMMA_128(TY)                                                       \
  asm volatile(                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                   \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                     \
      : MOEFUSE_D8(0), MOEFUSE_D8(8), MOEFUSE_D8(16), MOEFUSE_D8(24), \
        MOEFUSE_D8(32), MOEFUSE_D8(40), MOEFUSE_D8(48), MOEFUSE_D8(56) \
      : "l"(da), "l"(db), "r"(scale_d))

// m64n256k16, float32 accumulators d[0..127], A and B from shared memory (K-major).
#define MOEFUSE_WGMMA_256(TY)                                                       \
  asm volatile(                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                   \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {"                \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"                                     \
      : MOEFUSE_D8(0), MOEFUSE_D8(8), MOEFUSE_D8(16), MOEFUSE_D8(24), \
        MOEFUSE_D8(32), MOEFUSE_D8(40), MOEFUSE_D8(48), MOEFUSE_D8(56), \
        MOEFUSE_D8(64), MOEFUSE_D8(72), MOEFUSE_D8(80), MOEFUSE_D8(88), \
        MOEFUSE_D8(96), MOEFUSE_D8(104), MOEFUSE_D8(112), MOEFUSE_D8(120) \
      : "l"(da), "l"(db), "r"(scale_d))

// m64n32k16 and m64n64k16 (narrow tiles: the tokens on the N side).
#define MOEFUSE_WGMMA_32(TY)                                                        \
  asm volatile(                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                  \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " {"                 \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"         \
      "}, %16, %17, p, 1, 1, 0, 0;\n}\n"                                             \
      : MOEFUSE_D8(0), MOEFUSE_D8(8)                                                \
      : "l"(da), "l"(db), "r"(scale_d))

#define MOEFUSE_WGMMA_64(TY)                                                        \
  asm volatile(                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                  \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"                 \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                             \
      : MOEFUSE_D8(0), MOEFUSE_D8(8), MOEFUSE_D8(16), MOEFUSE_D8(24)                \
      : "l"(da), "l"(db), "r"(scale_d))

// Wgmma<T, N>: d (m64 x N, float32) += A (64 x 16) . B (N x 16)^T, both K-major in shared memory;
// scale_d == 0 overwrites d.
template <typename T, int N>
__device__ __forceinline__ void Wgmma(float* d, uint64_t da, uint64_t db, int scale_d);
#define MOEFUSE_WGMMA_SPECS(N)                                                                  \
  template <>                                                                                   \
  __device__ __forceinline__ void Wgmma<__half, N>(float* d, uint64_t da, uint64_t db, int scale_d) { \
    MOEFUSE_WGMMA_##N("f16");                                                                   \
  }                                                                                             \
  template <>                                                                                   \
  __device__ __forceinline__ void Wgmma<__nv_bfloat16, N>(float* d, uint64_t da, uint64_t db,    \
                                                         int scale_d) {                         \
    MOEFUSE_WGMMA_##N("bf16");                                                                  \
  }
MOEFUSE_WGMMA_SPECS(32)
MOEFUSE_WGMMA_SPECS(64)
MOEFUSE_WGMMA_SPECS(128)
MOEFUSE_WGMMA_SPECS(256)

__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

struct Tile {
  int e, r0, rows, n;
  int split = 0;  // CTA pairs: half of a lone m-tile (DecodePairTile)
};

// A tile as the producer publishes it to the consumers (its split in bit 30 of n).
__device__ __forceinline__ int4 PackTile(const Tile& t) {
  return make_int4(t.e, t.r0, t.rows, t.n | (t.split << 30));
}
__device__ __forceinline__ Tile ReadTile(int4 v) {
  return Tile{v.x, v.y, v.z, v.w & 0x3FFFFFFF, v.w >> 30};
}

// A consumer's k-block: wait for the stage to fill; its cp.async rows (generic proxy) are then
// made visible to wgmma (async proxy).
__device__ __forceinline__ void AcquireStage(uint64_t* full, uint32_t phase) {
  MbarWait(full, phase);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  WgmmaFence();
}

// A stage read by this warp goes back to the producer, and with CTA pairs to the partner's
// producer too (its multicast writes this CTA's stage).
__device__ __forceinline__ void ReleaseStage(uint64_t* empty, int partner) {
  MbarArrive(empty);
  if (partner >= 0) MbarArriveCluster(empty, static_cast<uint32_t>(partner));
}

// After a k-block's MMAs are issued: once the previous k-block's MMAs are done, its stage goes
// back to the producer(s); then on to the next stage of the ring.
template <int S>
__device__ __forceinline__ void NextStage(uint64_t* empty, int lane, int& prev, int& stage,
                                          uint32_t& phase, int partner = -1) {
  WgmmaCommit();
  WgmmaWait<1>();
  if (prev >= 0 && lane == 0) ReleaseStage(empty + prev, partner);
  prev = stage;
  if (++stage == S) {
    stage = 0;
    phase ^= 1;
  }
}

template <int BM>
__device__ __forceinline__ int64_t MTiles(const WgArgs& p) {
  if (p.g.dense_rows >= 0) return CeilDiv(p.g.dense_rows, BM);
  return p.g.tile_prefix[p.g.num_groups];
}

// CTA pairs: the tiles' schedule counts m-tile pairs, expert-major as DecodeTile's; the CTA of
// cluster rank `rank` takes the pair's m-tile `rank`. Where an expert's m-tile count is odd, its
// last pair is one m-tile split in halves: rows 64 rank .. 64 rank + 63 of it (none where it has
// fewer rows), so that neither CTA computes a whole tile on rows it never stores (a warpgroup
// without rows only passes the stages on).
__device__ __forceinline__ Tile DecodePairTile(const WgArgs& p, int64_t tile, uint32_t rank) {
  const int64_t q0 = tile / p.n_tiles;
  const int4 first = p.g.mpairs[q0];
  const int* pre = p.g.mpair_prefix;
  const int p0 = pre[first.x], pe = pre[first.x + 1] - p0;
  const int64_t local = tile - static_cast<int64_t>(p0) * p.n_tiles;
  const int64_t q = p0 + local % pe;
  const int4 pair = q == q0 ? first : p.g.mpairs[q];
  Tile t;
  t.split = pair.z == 1;
  const int4 info = p.g.mtiles[pair.y + (t.split ? 0 : static_cast<int>(rank))];
  const int skip = t.split ? static_cast<int>(rank) * (kBM / 2) : 0;
  t.n = static_cast<int>(local / pe);
  t.e = pair.x;
  t.r0 = info.y + skip;
  t.rows = t.split ? max(0, min(kBM / 2, info.z - skip)) : info.z;
  return t;
}

// Tile order. Expert-major (default): expert by expert, n-tile by n-tile, m-tiles innermost, so
// that the CTAs working at the same time share the expert's weight tile and its rows in L2.
// N-major: n-tile by n-tile over all m-tiles, one table load. Only the producer decodes; the
// consumers read the tile from a shared-memory ring.
template <int BM>
__device__ __forceinline__ Tile DecodeTile(const WgArgs& p, int64_t tile, int64_t mtiles) {
  Tile t;
  if (p.g.dense_rows >= 0) {
    const int64_t mt = tile % mtiles;
    t.n = static_cast<int>(tile / mtiles);
    t.e = 0;
    t.r0 = static_cast<int>(mt) * BM;
    t.rows = min(BM, p.g.dense_rows - t.r0);
    return t;
  }
  if (p.expert_major) {
    // The expert's tiles are [pre[e], pre[e + 1]) * n_tiles, so m-tile tile / n_tiles is one of
    // its own: three dependent loads (two when the expert has one m-tile) rather than a binary
    // search over the experts, which stalled the producer between two tiles.
    const int64_t mt0 = tile / p.n_tiles;
    const int4 first = p.g.mtiles[mt0];
    const int* pre = p.g.tile_prefix;
    const int p0 = pre[first.x], me = pre[first.x + 1] - p0;
    const int64_t local = tile - static_cast<int64_t>(p0) * p.n_tiles;
    t.n = static_cast<int>(local / me);
    const int64_t mt = p0 + local % me;
    const int4 info = mt == mt0 ? first : p.g.mtiles[mt];
    t.e = info.x;
    t.r0 = info.y;
    t.rows = info.z;
    return t;
  }
  const int4 info = p.g.mtiles[tile % mtiles];
  t.n = static_cast<int>(tile / mtiles);
  t.e = info.x;
  t.r0 = info.y;
  t.rows = info.z;
  return t;
}

// The shared-memory ring of a persistent grouped GEMM: per stage an activation buffer (A, rows
// gathered by cp.async) and a weight buffer (B, TMA boxes), a "full" and an "empty" mbarrier; and a
// ring of tile descriptions, producer -> consumers.
struct Ring {
  uint8_t* As;
  int a_bytes;
  uint8_t* Bs;
  int b_bytes;
  uint8_t* extra;  // the kernel's own buffer, after the stages
  uint64_t* full;
  uint64_t* empty;
  int4* tinfo;
  int info_slots;
};

// Carves the ring out of dynamic shared memory (aligned to 1024 bytes for the 128-byte swizzle:
// S A buffers, S B buffers, extra_bytes for the kernel, S full and S empty mbarriers, two more
// for the kernel, the tile ring) and initialises the barriers; the CTA's threads synchronise.
template <int S>
__device__ __forceinline__ Ring SetUpRing(uint8_t* raw, int a_bytes, int b_bytes, int info_slots,
                                          int empty_arrivals, int extra_bytes = 0) {
  Ring r;
  r.As = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~static_cast<uintptr_t>(1023));
  r.a_bytes = a_bytes;
  r.Bs = r.As + S * a_bytes;
  r.b_bytes = b_bytes;
  r.extra = r.Bs + S * b_bytes;
  r.full = reinterpret_cast<uint64_t*>(r.extra + extra_bytes);
  r.empty = r.full + S;
  r.tinfo = reinterpret_cast<int4*>(r.empty + S + 2);
  r.info_slots = info_slots;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      MbarInit(r.full + s, 128 + 1);  // 128 cp.async arrivals + the TMA transaction arrival
      MbarInit(r.empty + s, empty_arrivals);  // one per warp of the consuming warpgroup(s)
    }
    MbarInit(r.empty + S, 4);
    MbarInit(r.empty + S + 1, 4);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  return r;
}

__device__ __forceinline__ void ProducerSync() { asm volatile("bar.sync 3, 128;" ::: "memory"); }

// CTA pairs with tiles from a counter: rank 0 takes each tile and hands it to rank 1 through two
// slots in rank 1's shared memory; `full` completes on rank 1 as a slot is written, `empty` on rank
// 0 as rank 1 has read it (so that rank 0 writes a slot again only after). Initialised before the
// kernel's first cluster barrier (InitPairTickets).
struct PairTickets {
  uint64_t full[2];
  uint64_t empty[2];
  int value[2];
};

__device__ __forceinline__ void InitPairTickets(PairTickets& pt) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) {
      MbarInit(pt.full + i, 1);
      MbarInit(pt.empty + i, 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
}

// Warpgroup 0 of the tile kernels: walks this CTA's tiles and fills the ring, stage by stage. The
// weight tile is one TMA box of box_rows rows, or (mode 2: gate and up views) two, the second
// box_rows * 128 bytes after the first; tile n starts at row n * box_rows of each view. The BM
// activation rows are gathered through the sorted row list, 16-byte chunks in the 128-byte
// swizzle wgmma reads, zero-filled past the tile's rows and past K.
//
// Tiles are blockIdx.x + i * gridDim.x, or (p.next_tile) taken from a counter, so that the CTAs
// that start first take more (CTA pairs: by rank 0 for both, through `pt`); the end is then
// published as a tile of expert -1 on the next stage.
// With p.ready_wait, a tile's weights are requested at once and its rows once the expert's rows
// are ready.
template <typename T, int BM, int S, bool Pairs = false>
__device__ __forceinline__ void Produce(const TmaMaps& maps, const WgArgs& p,
                                        const Ring& ring, int box_rows, int64_t total, int64_t mtiles,
                                        int nkb, PairTickets* pt = nullptr) {
  constexpr int kRows = BM / 16;  // rows per thread
  const int tid = threadIdx.x & 127;
  const int chunk = tid & 7, rbase = tid >> 3;  // rows rbase + 16 j, 16-byte chunk `chunk`
  const bool two_boxes = p.mode == 2;
  const uint32_t tx_bytes = (two_boxes ? 2 : 1) * box_rows * kBK * 2 + (p.a_tma ? BM * kBK * 2 : 0);
  int stage = 0;
  uint32_t phase = 0;
  // CTA pairs: cluster c takes pair tiles c, c + clusters, ...; this CTA loads half of each weight
  // box (rows rank * half ..) into both CTAs' stage
  const uint32_t rank = Pairs ? ClusterRank() : 0;
  const int64_t step = Pairs ? gridDim.x / 2 : gridDim.x;
  auto decode = [&](int64_t t) { return Pairs ? DecodePairTile(p, t, rank) : DecodeTile<BM>(p, t, mtiles); };
  // A counter's tile goes to the warpgroup through two shared slots: a slot is written again only
  // after every thread has passed the barrier that follows its read.
  __shared__ int taken[2];
  int fetches = 0;
  auto take = [&]() -> int64_t {
    const int use = fetches >> 1;  // earlier uses of this slot
    const int slot = fetches++ & 1;
    if (tid == 0) {
      if (!Pairs) {
        taken[slot] = atomicAdd(p.next_tile, 1);
      } else if (rank == 0) {
        if (use > 0) MbarWait<true>(pt->empty + slot, (use - 1) & 1);
        taken[slot] = atomicAdd(p.next_tile, 1);
        StoreAndArriveRemote(ClusterSmemAddr(pt->value + slot, 1), taken[slot], ClusterSmemAddr(pt->full + slot, 1));
      } else {
        MbarWait<true>(pt->full + slot, use & 1);
        taken[slot] = pt->value[slot];
        MbarArriveRemoteRelease(ClusterSmemAddr(pt->empty + slot, 0));
      }
    }
    ProducerSync();
    return taken[slot];
  };
  // The rows this thread gathers, as numbers of 16-byte chunks from A: its chunk of each row at
  // k = 0, kNoRow past the tile's rows (zero-filled). A k-block adds kBK / 8 chunks, so a row's
  // 64-bit address arithmetic is done once a tile rather than once a k-block (Qwen3 T = 4096,
  // projection 1: 584 -> 552 µs on an H100). ActivationMap checks that A's chunks fit 32 bits.
  constexpr uint32_t kNoRow = 0xFFFFFFFFu;
  const uint4* const A16 = static_cast<const uint4*>(p.A);
  const uint32_t lda16 = static_cast<uint32_t>(p.lda / 8);
  Tile cur, nxt;
  uint32_t src[kRows], nsrc[kRows];
  auto rows_of = [&](const Tile& t, uint32_t (&out)[kRows]) {
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int rr = rbase + 16 * j;
      const int row = rr < t.rows ? (p.row_map ? p.row_map[t.r0 + rr] : t.r0 + rr) : -1;
      out[j] = row >= 0 ? static_cast<uint32_t>(row) * lda16 + chunk : kNoRow;
    }
  };
  int64_t tile = p.next_tile ? take() : Pairs ? blockIdx.x / 2 : blockIdx.x;
  if (tile < total) {
    cur = decode(tile);
    rows_of(cur, src);
  }
  int local = 0;
  for (; tile < total; ++local) {
    int64_t next = tile + step;
    // published before the tile's first stage completes (the expect_tx arrive below releases it)
    if (tid == 0) ring.tinfo[local % ring.info_slots] = PackTile(cur);
    const int64_t n0 = static_cast<int64_t>(cur.n) * box_rows;
    const int y1 = static_cast<int>(cur.e * p.b1_rpe + n0);
    const int y2 = static_cast<int>(cur.e * p.b2_rpe + n0);
    for (int kb = 0; kb < nkb; ++kb) {
      MbarWait(ring.empty + stage, phase ^ 1);
      uint8_t* as = ring.As + stage * ring.a_bytes;
      uint8_t* bs = ring.Bs + stage * ring.b_bytes;
      if (tid == 0) {
        MbarExpectTx(ring.full + stage, tx_bytes);  // (with pairs, the partner's half too)
        if constexpr (Pairs) {
          const int off = static_cast<int>(rank) * (box_rows / 2);
          TmaLoad2dBoth(bs + off * kBK * 2, &maps.w1, kb * kBK, y1 + off, ring.full + stage);
          if (two_boxes)
            TmaLoad2dBoth(bs + (box_rows + off) * kBK * 2, &maps.w2, kb * kBK, y2 + off, ring.full + stage);
        } else {
          TmaLoad2d(bs, &maps.w1, kb * kBK, y1, ring.full + stage);
          if (two_boxes) TmaLoad2d(bs + box_rows * kBK * 2, &maps.w2, kb * kBK, y2, ring.full + stage);
        }
      }
      if (kb == 0 && p.ready_wait) {  // the expert's rows of the previous kernel
        if (tid == 0) {
          const int need = p.ready_need * (p.g.tile_prefix[cur.e + 1] - p.g.tile_prefix[cur.e]);
          while (LoadAcquire(p.ready_wait + cur.e) < need) __nanosleep(128);
          // the rows were stored by other CTAs' generic stores; the TMA reads them (async proxy)
          if (p.a_tma) asm volatile("fence.proxy.async.global;" ::: "memory");
        }
        ProducerSync();
      }
      if (p.a_tma) {
        // rows past the tile's (the next expert's, or zeros past the matrix) are computed and
        // never stored: each output row depends on its own A row only
        if (tid == 0) TmaLoad2d(as, &maps.a, kb * kBK, cur.r0, ring.full + stage);
        MbarArrive(ring.full + stage);
      } else {
        const bool k_ok = kb * kBK + chunk * 8 < p.K;
        const uint32_t kc = static_cast<uint32_t>(kb) * (kBK / 8);
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          const int rr = rbase + 16 * j;
          const bool ok = k_ok && src[j] != kNoRow;
          CpAsync16(as + rr * 128 + ((chunk ^ (rr & 7)) << 4), ok ? A16 + (src[j] + kc) : A16, ok ? 16 : 0);
        }
        CpAsyncArrive(ring.full + stage);
      }
      if (++stage == S) {
        stage = 0;
        phase ^= 1;
      }
      if (kb == 0) {  // the next tile and its rows, while this one streams
        if (p.next_tile) next = take();
        if (next < total) {
          nxt = decode(next);
          rows_of(nxt, nsrc);
        }
      }
    }
    tile = next;
    if (tile < total) {
      cur = nxt;
#pragma unroll
      for (int j = 0; j < kRows; ++j) src[j] = nsrc[j];
    }
  }
  if (p.next_tile) {  // the end, as a stage completed without data
    MbarWait(ring.empty + stage, phase ^ 1);
    if (tid == 0) ring.tinfo[local % ring.info_slots] = make_int4(-1, 0, 0, 0);
    MbarArrive(ring.full + stage);
    if (tid == 0) MbarArrive(ring.full + stage);  // in place of the TMA's arrival
  }
}

template <typename T>
__device__ __forceinline__ uint32_t Pack2(float a, float b) {
  static_assert(sizeof(T) == 2, "16-bit outputs");
  T v[2] = {FromF<T>(a), FromF<T>(b)};
  return *reinterpret_cast<const uint32_t*>(v);
}

// Where the epilogue's values go (row: 0..127 in the tile; col: output column).
// Straight to global memory: 2- and 4-byte stores, eight rows per warp instruction.
template <typename T>
struct ToGlobal {
  T* out;
  int64_t ldo;
  int r0;
  __device__ __forceinline__ T* At(int row, int col) const {
    return out + static_cast<int64_t>(r0 + row) * ldo + col;
  }
  __device__ __forceinline__ void Put2(int row, int col, float a, float b) const {
    *reinterpret_cast<uint32_t*>(At(row, col)) = Pack2<T>(a, b);
  }
  __device__ __forceinline__ void Put1(int row, int col, float a) const { *At(row, col) = FromF<T>(a); }
};

// Into a shared-memory copy of the tile (W columns from col0, row-major; rows 0-63 at lo, 64-127
// at hi; the 16-byte chunks of a row XOR-swizzled by row & 7 so that the eight rows a warp
// instruction writes fall in distinct banks), copied out by CopyOut with 16-byte stores.
template <typename T, int W>
struct ToShared {
  uint8_t* lo;
  uint8_t* hi;
  int col0;
  __device__ __forceinline__ static int Offset(int row, int byte) {
    return (row & 63) * (W * 2) + (((byte >> 4) ^ (row & 7)) << 4) + (byte & 15);
  }
  __device__ __forceinline__ uint8_t* At(int row, int col) const {
    return (row < 64 ? lo : hi) + Offset(row, (col - col0) * 2);
  }
  __device__ __forceinline__ void Put2(int row, int col, float a, float b) const {
    *reinterpret_cast<uint32_t*>(At(row, col)) = Pack2<T>(a, b);
  }
  __device__ __forceinline__ void Put1(int row, int col, float a) const {
    *reinterpret_cast<T*>(At(row, col)) = FromF<T>(a);
  }
};

// The warpgroup copies a ToShared tile to its rows of the output: 16 bytes per thread and
// instruction, whole rows per warp (needs N and ldo multiples of 8: Dispatch checks).
template <typename T, int W>
__device__ __forceinline__ void CopyOut(const WgArgs& p, const Tile& t, const ToShared<T, W>& sh) {
  constexpr int kChunks = W / 8;  // 16-byte chunks per row
  T* out = static_cast<T*>(p.out);
  const int tid = threadIdx.x & 127;
#pragma unroll 4
  for (int idx = tid; idx < kBM * kChunks; idx += 128) {
    const int row = idx / kChunks, c = idx % kChunks;
    if (row >= t.rows) break;  // rows only grow with idx
    const int col = sh.col0 + c * 8;
    if (col >= p.N) continue;
    const uint4 v = *reinterpret_cast<const uint4*>((row < 64 ? sh.lo : sh.hi) + ToShared<T, W>::Offset(row, c * 16));
    *reinterpret_cast<uint4*>(out + static_cast<int64_t>(t.r0 + row) * p.ldo + col) = v;
  }
}

__device__ __forceinline__ void WarpgroupSync(int id) {
  asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory");
}

// Projection 1 (p.ready_signal): consumer warpgroup cw's part of tile t is in H, visible to the GPU.
// Each half of a split m-tile (CTA pairs) signals once, from its CTA's warpgroup 0: two signals, as
// the two warpgroups of a whole tile give.
__device__ __forceinline__ void SignalReady(const WgArgs& p, const Tile& t, int cw) {
  if (!p.ready_signal || (t.split && cw != 0)) return;
  __threadfence();
  WarpgroupSync(1 + cw);
  if ((threadIdx.x & 127) == 0) atomicAdd(p.ready_signal + t.e, 1);
}

// One tile's epilogue for this thread's accumulators (rows 64 cw .. 64 cw + 63 of the tile), mode
// and activation fixed at compile time (Epilogue dispatches), so that the unrolled body holds the
// code of one case only.
template <typename T, int BN, int Mode, bool Bias, typename Sink, typename Act>
__device__ __forceinline__ void EpilogueBody(const WgArgs& p, const Tile& t, const float* acc, int cw,
                                             const Sink& sink, Act act) {
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, q = lane & 3;
  const DType bt = Elem<T>::kType;
  const auto glu = MakeGluFast(act, p.act);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = cw * 64 + warp * 16 + g + 8 * h;
    if (row >= t.rows) continue;
    const int r = t.r0 + row;
    const float sc = p.row_scale ? p.row_scale[r] : 1.0f;
    if constexpr (Mode == 0) {
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) {
        const int n = t.n * BN + 8 * i + 2 * q;
        if (n >= p.N) continue;
        float v0 = acc[4 * i + 2 * h] * sc, v1 = acc[4 * i + 2 * h + 1] * sc;
        if (Bias && p.bias1) {
          const int64_t b = p.bias1_off + t.e * p.bias1_es + static_cast<int64_t>(n) * p.bias1_us;
          v0 += LoadF(p.bias1, b, bt);
          v1 += LoadF(p.bias1, b + p.bias1_us, bt);
        }
        sink.Put2(row, n, act(v0), act(v1));
      }
    } else {
#pragma unroll
      for (int i = 0; i < BN / 16; ++i) {
        const int u = t.n * (BN / 2) + 8 * i + 2 * q;
        if (u >= p.N) continue;
        float g0 = acc[4 * i + 2 * h] * sc, g1 = acc[4 * i + 2 * h + 1] * sc;
        float u0 = acc[4 * (i + BN / 16) + 2 * h] * sc, u1 = acc[4 * (i + BN / 16) + 2 * h + 1] * sc;
        if (Bias && p.bias1) {
          const int64_t b = p.bias1_off + t.e * p.bias1_es + static_cast<int64_t>(u) * p.bias1_us;
          g0 += LoadF(p.bias1, b, bt);
          g1 += LoadF(p.bias1, b + p.bias1_us, bt);
        }
        if (Bias && p.bias2) {
          const int64_t b = p.bias2_off + t.e * p.bias2_es + static_cast<int64_t>(u) * p.bias2_us;
          u0 += LoadF(p.bias2, b, bt);
          u1 += LoadF(p.bias2, b + p.bias2_us, bt);
        }
        sink.Put2(row, u, glu(g0, u0), glu(g1, u1));
      }
    }
  }
}

template <typename T, int BN, typename Sink>
__device__ __forceinline__ void Epilogue(const WgArgs& p, const Tile& t, const float* acc, int cw,
                                         const Sink& sink) {
  const bool bias = p.bias1 || p.bias2;
  if (p.mode == 0) {
    WithEpilogueOps(p.act, p.act_on, bias, [&](auto act, auto b) {
      EpilogueBody<T, BN, 0, decltype(b)::value>(p, t, acc, cw, sink, act);
    });
  } else {
    WithEpilogueOps(p.act, true, bias, [&](auto act, auto b) {
      EpilogueBody<T, BN, 2, decltype(b)::value>(p, t, acc, cw, sink, act);
    });
  }
}

// Pairs: launched on clusters of two CTAs (Run<..., true>) that share each weight tile
// (WgArgs::cta_pairs; cooperative schedule only): each CTA's stages are released by both CTAs'
// consumers.
template <typename T, int BN, bool PingPong, bool Pairs>
__global__ void __launch_bounds__(kThreads, 1)
    WgKernel(const __grid_constant__ TmaMaps maps, const __grid_constant__ WgArgs p) {
  static_assert(!(PingPong && Pairs), "CTA pairs: cooperative schedule");
  using C = Cfg<BN, PingPong>;
  constexpr int S = C::kStages;
  extern __shared__ uint8_t smem_raw[];
  const Ring ring = SetUpRing<S>(smem_raw, C::kABytes, C::kBBytes, C::kInfo,
                                 C::kPingPong ? 4 : Pairs ? 16 : 8, C::kEpiBytes);
  __shared__ PairTickets tickets;  // (pairs with tiles from a counter)
  if constexpr (Pairs) InitPairTickets(tickets);
  // the partner's barriers are initialised before this CTA arrives on them or multicasts to them
  if constexpr (Pairs) ClusterSync();
  const int partner = Pairs ? static_cast<int>(ClusterRank() ^ 1) : -1;
  uint8_t* const As = ring.As;
  uint8_t* const Bs = ring.Bs;
  uint64_t* const full = ring.full;
  uint64_t* const empty = ring.empty;
  uint64_t* const mma_done = empty + S;  // ping-pong: consumer warpgroup c finished a main loop
  const int4* const tinfo = ring.tinfo;
  if (!p.ready_wait) GridDepWait();  // (as in WgNarrowKernel)
  GridDepLaunch();
  const int64_t mtiles = Pairs ? p.g.mpair_prefix[p.g.num_groups] : MTiles<kBM>(p);
  const int64_t total = mtiles * p.n_tiles;
  const int nkb = (p.K + kBK - 1) / kBK;
  const int wg = threadIdx.x >> 7;

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;");
    Produce<T, kBM, S, Pairs>(maps, p, ring, p.mode == 2 ? BN / 2 : BN, total, mtiles, nkb, &tickets);
  } else {
    // ---- consumers ----
    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;");
    const int cw = wg - 1;
    const int lane = threadIdx.x & 31;
    if constexpr (!C::kPingPong) {
      // Cooperative: every tile, rows 64 cw .. 64 cw + 63 of it.
      int stage = 0;
      uint32_t phase = 0;
      float acc[BN / 2] = {};
      const int64_t step = Pairs ? gridDim.x / 2 : gridDim.x;  // (static schedule, as Produce's)
      int64_t tile = Pairs ? blockIdx.x / 2 : blockIdx.x;
      for (int local = 0; p.next_tile || tile < total; ++local, tile += step) {
        MbarWait(full + stage, phase);  // the tile's first stage: its description came before
        const Tile t = ReadTile(tinfo[local % C::kInfo]);
        if (t.e < 0) break;  // the producer's end of a counted schedule
        if constexpr (Pairs) {
          if (t.rows <= 64 * cw) {  // no rows for this warpgroup: its stages go straight back
            for (int kb = 0; kb < nkb; ++kb) {
              MbarWait(full + stage, phase);
              if (lane == 0) ReleaseStage(empty + stage, partner);
              if (++stage == S) {
                stage = 0;
                phase ^= 1;
              }
            }
            SignalReady(p, t, cw);
            continue;
          }
        }
        int prev = -1;
        for (int kb = 0; kb < nkb; ++kb) {
          AcquireStage(full + stage, phase);
          const uint64_t da = Desc(As + stage * C::kABytes + cw * 64 * 128);
          const uint64_t db = Desc(Bs + stage * C::kBBytes);
#pragma unroll
          for (int kk = 0; kk < kBK / 16; ++kk) Wgmma<T, BN>(acc, da + 2 * kk, db + 2 * kk, (kb | kk) != 0);
          NextStage<S>(empty, lane, prev, stage, phase, partner);
        }
        WgmmaWait<0>();
        if (prev >= 0 && lane == 0) ReleaseStage(empty + prev, partner);
        Epilogue<T, BN>(p, t, acc, cw, ToGlobal<T>{static_cast<T*>(p.out), p.ldo, t.r0});
        SignalReady(p, t, cw);
      }
    } else {
      // Ping-pong: tiles cw, cw + 2, ... of this CTA, all 128 rows (accumulators [0, 64): rows
      // 0-63, [64, 128): rows 64-127).
      float acc[2][BN / 2] = {};
      for (int local = cw;; local += 2) {
        const int64_t tile = blockIdx.x + static_cast<int64_t>(local) * gridDim.x;
        if (tile >= total) break;
        // Start once the other warpgroup's main loop of tile local - 1 is done: a parity wait
        // cannot tell a phase from the one two ahead, so this tile's stages may be waited on only
        // after all earlier stages arrived. It also makes the two main loops take turns.
        if (local > 0) MbarWait(mma_done + (1 - cw), ((local - 1) / 2) & 1);
        const int64_t kb_before = static_cast<int64_t>(local) * nkb;  // stages of earlier tiles
        int stage = static_cast<int>(kb_before % S);
        uint32_t phase = static_cast<uint32_t>((kb_before / S) & 1);
        int prev = -1;
        for (int kb = 0; kb < nkb; ++kb) {
          AcquireStage(full + stage, phase);
          const uint64_t da0 = Desc(As + stage * C::kABytes);            // rows 0-63
          const uint64_t da1 = Desc(As + stage * C::kABytes + 64 * 128);  // rows 64-127
          const uint64_t db = Desc(Bs + stage * C::kBBytes);
#pragma unroll
          for (int kk = 0; kk < kBK / 16; ++kk) {
            Wgmma<T, BN>(acc[0], da0 + 2 * kk, db + 2 * kk, (kb | kk) != 0);
            Wgmma<T, BN>(acc[1], da1 + 2 * kk, db + 2 * kk, (kb | kk) != 0);
          }
          NextStage<S>(empty, lane, prev, stage, phase);
        }
        WgmmaWait<0>();
        if (lane == 0) {
          MbarArrive(empty + prev);
          MbarArrive(mma_done + cw);
        }
        const Tile t = ReadTile(tinfo[local % C::kInfo]);
        // The tile leaves through this warpgroup's staging buffer (rows 0-63, then 64-127), once
        // the warpgroup's copy-out of its previous tile is done.
        uint8_t* lo = ring.extra + cw * (C::kEpiBytes / 2);
        uint8_t* hi = lo + C::kEpiBytes / 4;
        WarpgroupSync(1 + cw);
        if (p.mode == 0) {
          const ToShared<T, BN> sh{lo, hi, t.n * BN};
          Epilogue<T, BN>(p, t, acc[0], 0, sh);
          Epilogue<T, BN>(p, t, acc[1], 1, sh);
          WarpgroupSync(1 + cw);
          CopyOut<T, BN>(p, t, sh);
        } else {
          const ToShared<T, BN / 2> sh{lo, hi, t.n * (BN / 2)};
          Epilogue<T, BN>(p, t, acc[0], 0, sh);
          Epilogue<T, BN>(p, t, acc[1], 1, sh);
          WarpgroupSync(1 + cw);
          CopyOut<T, BN / 2>(p, t, sh);
        }
      }
    }
  }
  // neither CTA of a pair leaves while the other may still arrive on its barriers
  if constexpr (Pairs) ClusterSync();
}

// Narrow tiles: the weight rows on wgmma's M side, the tile's BT token rows on its N side.
// A tile is kUnits output columns (gated, mode 2: units, from a gate and an up box of kUnits rows
// each; plain, mode 0: one box) by BT sorted rows; consumer warpgroup c computes columns
// 64 c .. 64 c + 63 of it for all BT rows (one m64 wgmma per box and k-step).
// Accumulator (i, h, j) of a thread: column 16 warp + lane / 4 + 8 h, row 8 i + 2 (lane % 4) + j.
//
// ForNarrowRows calls f(accumulator index, sorted row, its scale) for this thread's rows of the
// tile in half h.
template <int BT, typename F>
__device__ __forceinline__ void ForNarrowRows(const WgArgs& p, const Tile& t, int h, F&& f) {
  const int q = threadIdx.x & 3;
#pragma unroll
  for (int i = 0; i < BT / 8; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int row = 8 * i + 2 * q + j;
      if (row >= t.rows) continue;
      const int r = t.r0 + row;
      f(4 * i + 2 * h + j, r, p.row_scale ? p.row_scale[r] : 1.0f);
    }
  }
}

template <typename T, int BT, bool Bias, typename Act>
__device__ __forceinline__ void NarrowEpilogueBody(const WgArgs& p, const Tile& t, const float* accg,
                                                   const float* accu, int cw, Act act) {
  using C = NarrowCfg<BT>;
  const int warp = (threadIdx.x >> 5) & 3, g = (threadIdx.x & 31) >> 2;
  const DType bt = Elem<T>::kType;
  const auto glu = MakeGluFast(act, p.act);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int c = cw * 64 + warp * 16 + g + 8 * h;  // column of the first box
    if (p.mode == 2) {
      const int u = t.n * C::kUnits + c;
      if (u >= p.N) continue;
      const float bg = Bias && p.bias1 ? LoadF(p.bias1, p.bias1_off + t.e * p.bias1_es + u * p.bias1_us, bt) : 0.0f;
      const float bu = Bias && p.bias2 ? LoadF(p.bias2, p.bias2_off + t.e * p.bias2_es + u * p.bias2_us, bt) : 0.0f;
      ForNarrowRows<BT>(p, t, h, [&](int a, int r, float sc) {
        out[static_cast<int64_t>(r) * p.ldo + u] = FromF<T>(glu(accg[a] * sc + bg, accu[a] * sc + bu));
      });
    } else {  // mode 0: one box
      const int n = t.n * C::kUnits + c;
      if (n >= p.N) continue;
      const float bias = Bias && p.bias1 ? LoadF(p.bias1, p.bias1_off + t.e * p.bias1_es + n * p.bias1_us, bt) : 0.0f;
      ForNarrowRows<BT>(p, t, h, [&](int a, int r, float sc) {
        out[static_cast<int64_t>(r) * p.ldo + n] = FromF<T>(act(accg[a] * sc + bias));
      });
    }
  }
}

template <typename T, int BT>
__device__ __forceinline__ void NarrowEpilogue(const WgArgs& p, const Tile& t, const float* accg,
                                               const float* accu, int cw) {
  WithEpilogueOps(p.act, p.act_on, p.bias1 || p.bias2, [&](auto act, auto b) {
    NarrowEpilogueBody<T, BT, decltype(b)::value>(p, t, accg, accu, cw, act);
  });
}

// One narrow tile's main loop; returns the stage of its last k-block, not yet released.
template <typename T, int BT, int S, bool Gated>
__device__ __forceinline__ int NarrowMainLoop(const Ring& ring, int cw, int lane, int nkb, int& stage,
                                              uint32_t& phase, float* accg, float* accu) {
  using C = NarrowCfg<BT>;
  int prev = -1;
  for (int kb = 0; kb < nkb; ++kb) {
    AcquireStage(ring.full + stage, phase);
    const uint64_t dx = Desc(ring.As + stage * C::kABytes);
    const uint64_t dg = Desc(ring.Bs + stage * C::kBBytes + cw * 64 * 128);
    const uint64_t du = Desc(ring.Bs + stage * C::kBBytes + (C::kUnits + cw * 64) * 128);
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      Wgmma<T, BT>(accg, dg + 2 * kk, dx + 2 * kk, (kb | kk) != 0);
      if constexpr (Gated) Wgmma<T, BT>(accu, du + 2 * kk, dx + 2 * kk, (kb | kk) != 0);
    }
    NextStage<S>(ring.empty, lane, prev, stage, phase);
  }
  return prev;
}

template <typename T, int BT>
__global__ void __launch_bounds__(kThreads, 1)
    WgNarrowKernel(const __grid_constant__ TmaMaps maps, const __grid_constant__ WgArgs p) {
  using C = NarrowCfg<BT>;
  constexpr int S = C::kStages;
  extern __shared__ uint8_t smem_raw[];
  const Ring ring = SetUpRing<S>(smem_raw, C::kABytes, C::kBBytes, C::kInfo, 8);
  // Projection 2 with ready_wait reads nothing of projection 1's before its counts say so (the
  // routing results it reads were complete before projection 1 let this kernel start).
  if (!p.ready_wait) GridDepWait();
  GridDepLaunch();
  const int64_t mtiles = MTiles<BT>(p);
  const int64_t total = mtiles * p.n_tiles;
  const int nkb = (p.K + kBK - 1) / kBK;
  const int wg = threadIdx.x >> 7;
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;");
    Produce<T, BT, S>(maps, p, ring, C::kUnits, total, mtiles, nkb);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 224;");
  const int cw = wg - 1, lane = threadIdx.x & 31;
  int stage = 0;
  uint32_t phase = 0;
  float accg[BT / 2] = {}, accu[BT / 2] = {};
  int64_t tile = blockIdx.x;  // (static schedule)
  for (int local = 0; p.next_tile || tile < total; ++local, tile += gridDim.x) {
    MbarWait(ring.full + stage, phase);  // the tile's first stage: its description came before
    const Tile t = ReadTile(ring.tinfo[local % C::kInfo]);
    if (t.e < 0) break;  // the producer's end of a counted schedule
    // two main loops rather than a branch between the MMAs, which makes the compiler serialise them
    const int prev = p.mode == 2 ? NarrowMainLoop<T, BT, S, true>(ring, cw, lane, nkb, stage, phase, accg, accu)
                                 : NarrowMainLoop<T, BT, S, false>(ring, cw, lane, nkb, stage, phase, accg, accu);
    WgmmaWait<0>();
    if (prev >= 0 && lane == 0) MbarArrive(ring.empty + prev);
    NarrowEpilogue<T, BT>(p, t, accg, accu, cw);
    SignalReady(p, t, cw);
  }
}

#else  // not sm_90a: never launched (WgmmaAvailable() checks the device's code); a launch traps
        // rather than leave the outputs unwritten

template <typename T, int BN, bool PingPong, bool Pairs>
__global__ void WgKernel(const __grid_constant__ TmaMaps, const __grid_constant__ WgArgs) { __trap(); }

template <typename T, int BT>
__global__ void WgNarrowKernel(const __grid_constant__ TmaMaps, const __grid_constant__ WgArgs) { __trap(); }

#endif

// ---- host side ----

typedef CUresult (*EncodeTiledFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                  const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                  const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                  CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn GetEncode() {
  static EncodeTiledFn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return static_cast<EncodeTiledFn>(nullptr);
    return reinterpret_cast<EncodeTiledFn>(p);
  }();
  return fn;
}

// A [rows, K] 16-bit matrix, rows `row_stride` elements apart (default K), read in boxes of
// 64 x box_rows with 128-byte swizzle.
bool MakeMap(CUtensorMap* map, const void* base, DType t, int64_t rows, int64_t K, int box_rows,
             int64_t row_stride = 0) {
  EncodeTiledFn enc = GetEncode();
  if (!enc) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_stride ? row_stride : K) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t estr[2] = {1, 1};
  const CUtensorMapDataType dt =
      t == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return enc(map, dt, 2, const_cast<void*>(base), dims, strides, box, estr,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Clusters of two such CTAs that the GPU holds at once (an SM alone in its GPC takes none), once
// per device: the persistent grid of CTA pairs, so that no cluster waits for another to end.
template <typename Kernel>
int64_t ResidentPairs(Kernel kernel, int smem, int num_sms, std::atomic<int>* per_device) {
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) device = -1;  // (not cached)
  const int cached = device >= 0 ? per_device[device].load(std::memory_order_relaxed) : 0;
  if (cached > 0) return cached;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(num_sms & ~1));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cudaLaunchAttribute attr[1] = {ClusterAttribute(2)};
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // (the query's own error)
    return num_sms / 2;        // not cached: a later call asks again
  }
  if (n <= 0) return num_sms / 2;
  if (device >= 0) per_device[device].store(n, std::memory_order_relaxed);
  return n;
}

template <typename T, int BN, bool PingPong, bool Pairs = false>
cudaError_t Run(const TmaMaps& m, const WgArgs& a, int64_t tiles_ub,
                int num_sms, cudaStream_t stream) {
  using C = Cfg<BN, PingPong>;
  static std::atomic<uint64_t> smem_allowed{0};
  if (cudaError_t e = AllowDynamicSmem(WgKernel<T, BN, PingPong, Pairs>, C::kSmem, smem_allowed)) return e;
  // (pairs: tiles_ub counts pair tiles, each of two CTAs)
  static std::atomic<int> resident[64] = {};
  const int64_t clusters = Pairs ? ResidentPairs(WgKernel<T, BN, PingPong, Pairs>, C::kSmem, num_sms, resident) : 0;
  const int64_t ctas = Pairs ? 2 * (tiles_ub < clusters ? tiles_ub : clusters)
                             : (tiles_ub < num_sms ? tiles_ub : num_sms);
  if (ctas <= 0) return cudaSuccess;
  return LaunchOnClusters(Pairs ? 2 : 1, WgKernel<T, BN, PingPong, Pairs>, dim3(static_cast<unsigned>(ctas)),
                          dim3(kThreads), static_cast<size_t>(C::kSmem), stream, m, a);
}

template <typename T>
cudaError_t DispatchT(int bn, bool pingpong, const TmaMaps& m,
                      const WgArgs& a, int64_t tiles_ub, int num_sms, cudaStream_t stream) {
  if (a.cta_pairs) {
    return bn == 256 ? Run<T, 256, false, true>(m, a, tiles_ub, num_sms, stream)
                     : Run<T, 128, false, true>(m, a, tiles_ub, num_sms, stream);
  }
  if (bn == 256) return Run<T, 256, false>(m, a, tiles_ub, num_sms, stream);
  if (pingpong) return Run<T, 128, true>(m, a, tiles_ub, num_sms, stream);
  return Run<T, 128, false>(m, a, tiles_ub, num_sms, stream);
}

cudaError_t Dispatch(DType t, int bn, bool pingpong, const TmaMaps& m,
                     const WgArgs& a, int64_t tiles_ub, int num_sms, cudaStream_t stream) {
  // the ping-pong epilogue's 16-byte stores (the tensor-core paths take only such sizes)
  if (pingpong && bn == 128 && (a.N % 8 != 0 || a.ldo % 8 != 0)) return cudaErrorInvalidValue;
  return t == DType::kBF16 ? DispatchT<__nv_bfloat16>(bn, pingpong, m, a, tiles_ub, num_sms, stream)
                           : DispatchT<__half>(bn, pingpong, m, a, tiles_ub, num_sms, stream);
}

int64_t MTilesUpperBound(const Groups& g) {
  return g.dense_rows >= 0 ? CeilDiv(g.dense_rows, kBM) : g.max_tiles;
}

// One projection's weight rows (row0 + e * rpe + u * rpu of a [rows, K] matrix) as a map whose
// row u of expert e is row e * (rpe / rpu) + u: every rpu-th row, from row0.
bool MakeUnitMap(CUtensorMap* map, const void* w, DType t, int64_t rows, int64_t row0, int64_t rpe,
                 int64_t rpu, int64_t K, int box_rows, int64_t* unit_rpe) {
  if (rpu < 1 || rpe % rpu != 0 || row0 >= rows) return false;
  *unit_rpe = rpe / rpu;
  const void* base = static_cast<const char*>(w) + row0 * K * 2;
  return MakeMap(map, base, t, (rows - row0 + rpu - 1) / rpu, K, box_rows, rpu * K);
}

template <typename T, int BT>
cudaError_t RunNarrow(const TmaMaps& m, const WgArgs& a, int num_sms,
                      cudaStream_t stream) {
  using C = NarrowCfg<BT>;
  static std::atomic<uint64_t> smem_allowed{0};
  if (cudaError_t e = AllowDynamicSmem(WgNarrowKernel<T, BT>, C::kSmem, smem_allowed)) return e;
  const int64_t tiles_ub = a.g.max_tiles * a.n_tiles;
  const int64_t grid = tiles_ub < num_sms ? tiles_ub : num_sms;
  if (grid <= 0) return cudaSuccess;
  return Launch(WgNarrowKernel<T, BT>, dim3(static_cast<unsigned>(grid)), dim3(kThreads),
                static_cast<size_t>(C::kSmem), stream, m, a);
}

// Narrow tiles for groups whose m-tiles are g.tile_rows (32 or 64) rows: grouped (not dense) only.
cudaError_t DispatchNarrow(DType t, const TmaMaps& m, WgArgs& a,
                           int num_sms, cudaStream_t stream) {
  if (a.g.dense_rows >= 0) return cudaErrorInvalidValue;
  a.n_tiles = static_cast<int>(CeilDiv(a.N, NarrowCfg<32>::kUnits));
  const bool bf = t == DType::kBF16;
  switch (a.g.tile_rows) {
    case 32:
      return bf ? RunNarrow<__nv_bfloat16, 32>(m, a, num_sms, stream)
                : RunNarrow<__half, 32>(m, a, num_sms, stream);
    case 64:
      return bf ? RunNarrow<__nv_bfloat16, 64>(m, a, num_sms, stream)
                : RunNarrow<__half, 64>(m, a, num_sms, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// Projection 1's weights as TMA maps with boxes of box_rows rows: gated (mode 2), a gate and an up
// unit map, so that every layout (halves, interleaved, separate) is two boxes; else (mode 0) one map.
bool FirstProjMaps(const Gemm1Params& p, int box_rows, WgArgs& a, TmaMaps* m) {
  const FirstProj& w = p.w;
  if (!MakeUnitMap(&m->w1, w.gate, p.dtype, w.gate_rows, w.gate_row0, w.gate_rpe, w.gate_rpu, p.D, box_rows,
                   &a.b1_rpe))
    return false;
  m->w2 = m->w1;
  a.mode = 0;
  if (!w.up) return true;
  a.mode = 2;
  return MakeUnitMap(&m->w2, w.up, p.dtype, w.up_rows, w.up_row0, w.up_rpe, w.up_rpu, p.D, box_rows, &a.b2_rpe);
}

// The activation rows (A: `rows` rows of a.lda elements) by TMA when they are the sorted rows
// themselves (no row map), by_tma and the map can be made; else (a.a_tma = 0) the producer gathers
// them by cp.async, its rows numbered in 16-byte chunks of 32 bits (Produce): false when A is too
// large for that (64 GiB and over).
bool ActivationMap(DType t, int64_t rows, bool by_tma, int box_rows, WgArgs& a, TmaMaps* m) {
  a.a_tma = by_tma && !a.row_map && rows > 0 && MakeMap(&m->a, a.A, t, rows, a.K, box_rows, a.lda);
  if (a.a_tma) return true;
  m->a = m->w1;  // unused
  return a.lda % 8 == 0 && rows * (a.lda / 8) < 0xFFFFFFFFll;
}

// CTA pairs where the schedule offers them (Groups::mpairs): 128-row tiles, cooperative, grouped,
// expert-major; assigned statically or taken from a counter (rank 0 takes, PairTickets).
bool TakesCtaPairs(const WgArgs& a, bool narrow, bool pingpong, int num_sms) {
  return a.g.mpairs && a.g.mpair_prefix && !narrow && !pingpong && a.expert_major && a.g.dense_rows < 0 &&
         num_sms >= 2;
}

// 128 x 256 tiles unless there would be fewer than half a wave of them (then 128 x 128 tiles put
// twice as many SMs to work). Forcing 256 was faster or equal at every T >= 512 point of the GPU
// benchmark on an H200 (docs/performance.md), K short or long.
int PickBn(const Groups& g, int64_t n_cols, int num_sms) {
  const int64_t m = g.dense_rows >= 0 ? CeilDiv(g.dense_rows, kBM) : (g.est_tiles ? g.est_tiles : g.max_tiles);
  return (n_cols > 128 && 2 * m * CeilDiv(n_cols, 256) >= num_sms) ? 256 : 128;
}

// Projection 1's tile width with 128-row tiles (the gated kinds' box is half of it).
int FirstProjBn(const Gemm1Params& p, int num_sms) {
  if (p.bn) return p.bn;
  return PickBn(p.g, p.w.up ? 2 * static_cast<int64_t>(p.I) : p.I, num_sms);
}

}  // namespace

bool WgmmaAvailable() {
  // (plain sm_90 code would be a stand-in too: CMake refuses it)
  return GetEncode() != nullptr && RunsSm90aCode(WgKernel<__half, 128, false, false>);
}

int WgmmaFirstProjSignals(const Gemm1Params& p, int num_sms) {
  // two consumer warpgroups signal each tile, narrow or cooperative
  if (p.g.tile_rows != kBM) return 2 * static_cast<int>(CeilDiv(p.I, NarrowCfg<32>::kUnits));
  const int bn = FirstProjBn(p, num_sms);
  return 2 * static_cast<int>(CeilDiv(p.I, p.w.up ? bn / 2 : bn));
}

cudaError_t LaunchWgmmaGemm1(const Gemm1Params& p, int num_sms, cudaStream_t stream) {
  if (p.dtype == DType::kF32) return cudaErrorInvalidValue;
  const bool gated = p.w.up != nullptr;
  WgArgs a;
  a.A = p.A;
  a.lda = p.D;
  a.K = p.D;
  a.row_map = p.row_map;
  a.row_scale = p.row_scale;
  a.g = p.g;
  a.N = p.I;
  a.out = p.H;
  a.ldo = p.I;
  a.act = p.act;
  a.act_on = 1;
  a.expert_major = p.g.order_n ? 0 : 1;
  a.bias1 = p.w.bg;
  a.bias1_off = p.w.bg_off;
  a.bias1_es = p.w.bg_es;
  a.bias1_us = p.w.bg_us;
  a.bias2 = p.w.bu;
  a.bias2_off = p.w.bu_off;
  a.bias2_es = p.w.bu_es;
  a.bias2_us = p.w.bu_us;
  a.ready_signal = p.g.ready;
  a.next_tile = p.next_tile;
  if (p.g.ready && p.g.tile_rows == kBM && p.pingpong) return cudaErrorInvalidValue;
  const bool narrow = p.g.tile_rows != kBM;
  const int bn = narrow ? 0 : FirstProjBn(p, num_sms);
  const int box = narrow ? NarrowCfg<32>::kUnits : gated ? bn / 2 : bn;
  a.cta_pairs = TakesCtaPairs(a, narrow, p.pingpong, num_sms);
  TmaMaps m;
  if (!FirstProjMaps(p, a.cta_pairs ? box / 2 : box, a, &m) ||
      !ActivationMap(p.dtype, p.rows, p.rows_by_tma, p.g.tile_rows, a, &m))
    return cudaErrorInvalidValue;
  if (narrow) return DispatchNarrow(p.dtype, m, a, num_sms, stream);
  a.n_tiles = static_cast<int>(CeilDiv(p.I, box));
  return Dispatch(p.dtype, bn, p.pingpong, m, a, MTilesUpperBound(p.g) * a.n_tiles, num_sms, stream);
}

cudaError_t LaunchWgmmaGemm2(const Gemm2Params& p, int num_sms, cudaStream_t stream) {
  if (p.dtype == DType::kF32 || p.out_f32) return cudaErrorInvalidValue;
  WgArgs a;
  a.A = p.H;
  a.lda = p.I;
  a.K = p.I;
  a.g = p.g;
  a.N = p.D;
  a.out = p.out;
  a.ldo = p.D;
  a.mode = 0;
  a.act_on = 0;
  a.expert_major = p.g.order_n ? 0 : 1;
  a.bias1 = p.b2;
  a.bias1_es = p.D;
  a.bias1_us = 1;
  if (p.g.ready) {
    if (!p.g.next_tile || p.g.dense_rows >= 0 || p.g.ready_need <= 0 || (p.g.tile_rows == kBM && p.pingpong))
      return cudaErrorInvalidValue;
    a.ready_wait = p.g.ready;
    a.ready_need = p.g.ready_need;
    a.next_tile = p.g.next_tile;
  }
  const int64_t groups = p.g.dense_rows >= 0 ? 1 : p.g.num_groups;
  a.b1_rpe = p.D;
  const bool narrow = p.g.tile_rows != kBM;
  const int bn = narrow ? NarrowCfg<32>::kUnits : p.bn ? p.bn : PickBn(p.g, p.D, num_sms);  // box rows
  a.cta_pairs = TakesCtaPairs(a, narrow, p.pingpong, num_sms);
  TmaMaps m;
  if (!MakeMap(&m.w1, p.w2, p.dtype, groups * p.D, p.I, a.cta_pairs ? bn / 2 : bn)) return cudaErrorInvalidValue;
  m.w2 = m.w1;
  if (!ActivationMap(p.dtype, p.rows, p.rows_by_tma, p.g.tile_rows, a, &m)) return cudaErrorInvalidValue;
  if (narrow) return DispatchNarrow(p.dtype, m, a, num_sms, stream);
  a.n_tiles = static_cast<int>(CeilDiv(p.D, bn));
  return Dispatch(p.dtype, bn, p.pingpong, m, a, MTilesUpperBound(p.g) * a.n_tiles, num_sms, stream);
}

}  // namespace cuda
}  // namespace moefuse
