// Routing (top-k selection and weights) and grouping of the (token, expert) pairs by expert:
// counts, offsets, the grouped GEMM's tile schedule and the sorted row lists.
//
// Top-k is k selection passes over the token's scores, one warp per token: pass j picks the best
// score ranked after pick j-1 (numpy's stable argsort order: larger first, NaN last, ties to the
// lower index), so no per-token storage is needed whatever E is (up to 256 experts a lane keeps its
// scores in registers; beyond, they are recomputed from the logits in each pass). A call of one
// token is ranked by a block in parallel instead, with the same picks and weights bit for bit.
#include <climits>

#include "common.cuh"
#include "route_token.cuh"

namespace moefuse {
namespace cuda {
namespace {

using namespace routing;

constexpr int kRouteWarps = 4;       // warps (tokens in flight) per block, multi-kernel path
// Small T: one block routes and groups, a warp per token. Up to 16 tokens it has 512 threads: on an
// H200, 1024 took the routing kernel from 13.4 to 10.7 µs at T = 32, and cost 0.7-1.3 µs per
// decode call at T = 1 in that run, 0.2-0.3 µs in another (docs/performance.md).
constexpr int kFusedMaxTokens = 32;
constexpr int kFusedSmallTokens = 16;
constexpr int kScanThreads = 1024;

// Kernels are compiled per routing mode: a decode call waits for the routing kernel, which runs on
// one SM with a cold instruction cache, so the code it walks through must be short (with every
// mode in one body the executed path was strewn over 95 KB of code).

// Expert e's counter is r.counts[e * kStride]: 1 where the counters are in shared memory (one
// block routes), kCountLine in global memory (several kernels), so that each expert's counter has
// a 128-byte line of its own: atomics on one line queue behind each other at L2. H100, T = 4096,
// the routing kernel with the counters side by side / a line apart: 16.1 / 11.1 us at 128 experts
// and k = 8 (32768 picks on 4 lines), 12.1 / 7.0 at 32 experts and k = 4 (16384 on one line),
// 7.7 / 7.6 at 8 experts and k = 2 (docs/performance.md).
constexpr int kCountLine = 32;

// A pick's arrival rank within its expert. A zero expert's pick (an id past the experts) is not
// counted: its id becomes kZeroExpertPick (no sorted row), and the combine adds w * x for it.
template <int kStride>
__device__ __forceinline__ int CountPick(const RouteParams& r, int* id) {
  if (*id >= r.E - r.zero_experts) {
    *id = kZeroExpertPick;
    return 0;
  }
  return atomicAdd(r.counts + *id * kStride, 1);
}

// Given ids and weights (precomputed routing): copied, scaled and counted; ids outside [0, E)
// become -1 and the first is reported in r.bad (E counts the zero experts, whose picks become
// kZeroExpertPick).
template <typename T, int kStride>
__device__ void CopyPicks(const RouteParams& r, int t) {
  const int lane = threadIdx.x & 31;
  const int E = r.E, K = r.K;
  float* wout = r.w + static_cast<int64_t>(t) * K;
  int* iout = r.ids + static_cast<int64_t>(t) * K;
  int* rout = r.rank + static_cast<int64_t>(t) * K;
  for (int j = lane; j < K; j += 32) {
    const int64_t idx = static_cast<int64_t>(t) * K + j;
    const int64_t id = r.ids_int64 ? static_cast<const int64_t*>(r.ids_in)[idx]
                                   : static_cast<const int32_t*>(r.ids_in)[idx];
    const float w = ToF(static_cast<const T*>(r.w_in)[idx]) * r.scale;
    wout[j] = w;
    if (id < 0 || id >= E) {
      iout[j] = -1;
      rout[j] = 0;
      atomicMax(r.bad, kBadPairBase - static_cast<int>(idx));
    } else if (id >= E - r.zero_experts) {  // a zero expert's pick (CountPick written out: through
                                            // it, the one-block kernel spilled on sm_90a)
      iout[j] = kZeroExpertPick;
      rout[j] = 0;
    } else {
      iout[j] = static_cast<int>(id);
      rout[j] = atomicAdd(r.counts + id * kStride, 1);
    }
  }
}

// Routes one token with a full warp. `gscratch` holds n_group floats (IsGrouped modes, n_group > 1).
template <typename T, int M, int kStride>
__device__ void RouteToken(const RouteParams& r, int t, float* gscratch) {
  const int lane = threadIdx.x & 31;
  const int E = r.E, K = r.K;
  float* wout = r.w + static_cast<int64_t>(t) * K;
  int* iout = r.ids + static_cast<int64_t>(t) * K;
  int* rout = r.rank + static_cast<int64_t>(t) * K;

  Token<T, M> tok = MakeToken<T, M>(r, t);
  if (IsGrouped(M) && r.n_group > 1) {
    // Group score: sum of the group's top group_terms (1 or 2) choices; keep the topk_group best
    // groups.
    const int G = r.n_group, gs = E / G, top = r.group_terms;
    tok.gsize = gs;
    for (int g = lane; g < G; g += 32) {
      float b0 = 0.0f, b1 = 0.0f;
      int i0 = INT32_MAX, i1 = INT32_MAX;
      for (int e = g * gs; e < (g + 1) * gs; ++e) {
        const float c = tok.Choice(e);
        if (i0 == INT32_MAX || Better(c, e, b0, i0)) {
          b1 = b0;
          i1 = i0;
          b0 = c;
          i0 = e;
        } else if (i1 == INT32_MAX || Better(c, e, b1, i1)) {
          b1 = c;
          i1 = e;
        }
      }
      gscratch[g] = top == 2 ? b0 + b1 : b0;
    }
    __syncwarp();
    // Select the kept groups, then turn the scratch into the mask (1 kept, 0 not).
    float pv = 0.0f;
    int pi = INT32_MAX;
    for (int j = 0; j < r.topk_group; ++j) {
      float bv = 0.0f;
      int bi = INT32_MAX;
      for (int g = lane; g < G; g += 32) {
        const float v = gscratch[g];
        if (pi != INT32_MAX && !Better(pv, pi, v, g)) continue;
        if (bi == INT32_MAX || Better(v, g, bv, bi)) {
          bv = v;
          bi = g;
        }
      }
      WarpBest(bv, bi);
      pv = bv;
      pi = bi;
    }
    __syncwarp();
    for (int g = lane; g < G; g += 32) {
      const float v = gscratch[g];
      gscratch[g] = (g == pi || Better(v, g, pv, pi)) ? 1.0f : 0.0f;
    }
    __syncwarp();
    tok.gkeep = gscratch;
  }

  // the raw weights go to wout, finished below
  const PickSums sums = SelectPicks(tok, K, [&](int j, int e, float w) {
    if (lane == 0) {
      iout[j] = e;
      wout[j] = w;
    }
  });
  __syncwarp();
  float esum = 0.0f;
  if constexpr (M == kTopkSoftmax) {
    for (int j = lane; j < K; j += 32) esum += expf(wout[j] - sums.lmax);
    esum = WarpSum(esum);
  }
  for (int j = lane; j < K; j += 32) {
    wout[j] = Finish<M>(r, wout[j], sums, esum);
    rout[j] = CountPick<kStride>(r, iout + j);
  }
}

// PhiMoE's sparsemixer (k = 2) with a full warp: pick j is the largest logit not yet picked (in
// Better's order); its weight is its probability among the logits not yet picked that lie within
// 2 jitter_eps of it, relative to max(|l|, its logit): 1 / the sum of exp(l - its logit) over them.
template <typename T, int kStride>
__device__ void SparsemixerToken(const RouteParams& r, int t) {
  const int lane = threadIdx.x & 31, E = r.E;
  const T* lg = static_cast<const T*>(r.logits) + static_cast<int64_t>(t) * E;
  const float thr = 2.0f * r.jitter_eps;
  // one pick, skipping expert `skip`; its weight, scaled
  auto pick = [&](int skip, float* weight) {
    float bv = 0.0f;
    int bi = INT32_MAX;
    for (int e = lane; e < E; e += 32) {
      const float v = ToF(lg[e]);
      if (e != skip && (bi == INT32_MAX || Better(v, e, bv, bi))) {
        bv = v;
        bi = e;
      }
    }
    WarpBest(bv, bi);  // warp-uniform from here
    float s = 0.0f;
    for (int e = lane; e < E; e += 32) {
      const float l = ToF(lg[e]);
      if (e != skip && !((bv - l) / fmaxf(fabsf(l), bv) > thr)) s += expf(l - bv);
    }
    const float w = 1.0f / WarpSum(s);
    *weight = r.scale != 1.0f ? w * r.scale : w;
    return bi;
  };
  float w0, w1;
  const int e0 = pick(-1, &w0);
  const int e1 = pick(e0, &w1);
  if (lane < 2) {
    const int64_t at = static_cast<int64_t>(t) * 2 + lane;
    int e = lane == 0 ? e0 : e1;
    r.rank[at] = CountPick<kStride>(r, &e);
    r.ids[at] = e;
    r.w[at] = lane == 0 ? w0 : w1;
  }
}

template <typename T, int M, int kStride>
__device__ __forceinline__ void Route(const RouteParams& r, int t, float* gscratch) {
  if constexpr (M == kPrecomputed) CopyPicks<T, kStride>(r, t);
  else if constexpr (M == kSparsemixer) SparsemixerToken<T, kStride>(r, t);
  else RouteToken<T, M, kStride>(r, t, gscratch);
}

// r.counts: the experts' counters a line apart (kCountLine).
template <typename T, int M>
__global__ void RouteKernel(RouteParams r) {
  GridDepWait();
  extern __shared__ float gscratch_all[];
  const int warp = threadIdx.x >> 5;
  const int t = blockIdx.x * kRouteWarps + warp;
  if (t < r.T) Route<T, M, kCountLine>(r, t, gscratch_all + warp * r.n_group);
}

// Exclusive block scan of three values per thread at once; returns the prefixes, *total gets the
// sums. `smem` holds 3 * 32 ints.
template <int kThreads>
__device__ int3 BlockScan3(int3 v, int3* total, int* smem) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "one partial sum per warp, at most 32 warps");
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int3 x = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int a = __shfl_up_sync(0xffffffffu, x.x, o), b = __shfl_up_sync(0xffffffffu, x.y, o),
              c = __shfl_up_sync(0xffffffffu, x.z, o);
    if (lane >= o) {
      x.x += a;
      x.y += b;
      x.z += c;
    }
  }
  if (lane == 31) {
    smem[warp] = x.x;
    smem[32 + warp] = x.y;
    smem[64 + warp] = x.z;
  }
  __syncthreads();
  if (warp < 3) {  // warp w scans the warps' sums of value w
    int sum = lane < kWarps ? smem[warp * 32 + lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, sum, o);
      if (lane >= o) sum += y;
    }
    if (lane < kWarps) smem[warp * 32 + lane] = sum;
  }
  __syncthreads();
  const int3 before = make_int3((warp > 0 ? smem[warp - 1] : 0) + x.x - v.x,
                                (warp > 0 ? smem[32 + warp - 1] : 0) + x.y - v.y,
                                (warp > 0 ? smem[64 + warp - 1] : 0) + x.z - v.z);
  *total = make_int3(smem[kWarps - 1], smem[32 + kWarps - 1], smem[64 + kWarps - 1]);
  __syncthreads();
  return before;
}

// offsets, tile prefix and active list from counts (in `cnt`, E entries). One block. The offsets
// also go to `off_copy` when given (the fused kernel's shared memory).
template <int kThreads>
__device__ void Group(const SortParams& s, const int* cnt, int* smem, int* off_copy = nullptr) {
  const int E = s.E;
  const int per = (E + kThreads - 1) / kThreads;
  const int e0 = threadIdx.x * per;
  int rows = 0, tiles = 0, act = 0;
  for (int e = e0; e < e0 + per && e < E; ++e) {
    const int c = cnt[e];
    rows += c;
    tiles += (c + s.bm - 1) / s.bm;
    act += c > 0;
  }
  int3 total;
  const int3 first = BlockScan3<kThreads>(make_int3(rows, tiles, act), &total, smem);
  int r0 = first.x, t0 = first.y, a0 = first.z;
  for (int e = e0; e < e0 + per && e < E; ++e) {
    const int c = cnt[e];
    s.offsets[e] = r0;
    if (off_copy) off_copy[e] = r0;
    s.tile_prefix[e] = t0;
    if (c > 0) {
      s.active[a0] = e;
      s.active[E + a0] = c;
      ++a0;
    }
    for (int m = 0; m * s.bm < c; ++m)
      if (t0 + m < s.max_tiles) s.mtiles[t0 + m] = make_int4(e, r0 + m * s.bm, min(s.bm, c - m * s.bm), 0);
    r0 += c;
    t0 += (c + s.bm - 1) / s.bm;
  }
  if (threadIdx.x == 0) {
    s.offsets[E] = total.x;
    s.tile_prefix[E] = total.y;
    *s.num_active = total.z;
  }
  if (s.mpairs) {  // the m-tiles two by two (uniform branch: the scan's barriers)
    int pairs = 0;
    for (int e = e0; e < e0 + per && e < E; ++e) pairs += ((cnt[e] + s.bm - 1) / s.bm + 1) / 2;
    int3 ptotal;
    int q = BlockScan3<kThreads>(make_int3(pairs, 0, 0), &ptotal, smem).x;
    int t = first.y;
    for (int e = e0; e < e0 + per && e < E; ++e) {
      const int tiles_e = (cnt[e] + s.bm - 1) / s.bm;
      s.mpair_prefix[e] = q;
      for (int j = 0; 2 * j < tiles_e; ++j, ++q)
        if (q < s.max_tiles) s.mpairs[q] = make_int4(e, t + 2 * j, min(2, tiles_e - 2 * j), 0);
      t += tiles_e;
    }
    if (threadIdx.x == 0) s.mpair_prefix[E] = ptotal.x;
  }
}

// After RouteKernel: the counters, a line apart, gathered into `counts` (E ints, global: E may
// exceed shared memory), then grouped from there.
__global__ void GroupKernel(SortParams s, int* counts) {
  GridDepWait();
  __shared__ int smem[3 * 32];
  for (int e = threadIdx.x; e < s.E; e += blockDim.x) counts[e] = s.counts[static_cast<int64_t>(e) * kCountLine];
  __syncthreads();  // (orders the block's global writes before its reads)
  Group<kScanThreads>(s, counts, smem);
}

__global__ void ScatterKernel(SortParams s) {
  GridDepWait();
  const int64_t n = static_cast<int64_t>(s.T) * s.K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int e = s.ids[i];
    if (e < 0) {
      s.pair_pos[i] = e;  // -1 (dropped) or kZeroExpertPick
      continue;
    }
    const int p = s.offsets[e] + s.rank[i];
    s.sorted_row[p] = static_cast<int>(i / s.K);
    s.sorted_w[p] = s.w[i];
    s.pair_pos[i] = p;
  }
}

// Small T: routing, counting, grouping and scattering in one block. The picks, counts and offsets
// stay in shared memory (a decode call waits for this kernel: each trip to global memory and back
// would be on its critical path); global memory gets only what later kernels read.
// A grid of one block has no occupancy to keep. Told only the block size, ptxas for sm_80 aims at
// a full SM of such blocks (32 registers a thread) and spills; allowing one block an SM lets it
// keep its values in registers. (On sm_90a it fits in 32 registers; its code is left as it was.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define MOEFUSE_ONE_BLOCK_GRID(threads) __launch_bounds__(threads, 1)
#else
#define MOEFUSE_ONE_BLOCK_GRID(threads) __launch_bounds__(threads)
#endif

template <typename T, int M, int kThreads>
__global__ void MOEFUSE_ONE_BLOCK_GRID(kThreads) FusedKernel(RouteParams r, SortParams s) {
  GridDepWait();
  const int E = r.E, n = r.T * r.K;
  extern __shared__ int fsm[];
  int* cnt = fsm;                  // E
  int* off = cnt + E;              // E
  int* scan = off + E;             // 3 * 32
  int* ids = scan + 3 * 32;        // T*K picks
  int* rank = ids + n;             // T*K
  float* w = reinterpret_cast<float*>(rank + n);  // T*K
  float* gscr = w + n;             // warps * n_group
  for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
  for (int i = threadIdx.x; i < s.zero_count; i += blockDim.x) s.zero[i] = 0;
  if (threadIdx.x == 0) *r.bad = 0;
  __syncthreads();
  RouteParams rr = r;
  rr.counts = cnt;
  rr.ids = ids;
  rr.rank = rank;
  rr.w = w;
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int t = warp; t < r.T; t += nwarps) Route<T, M, 1>(rr, t, gscr + warp * r.n_group);
  __syncthreads();
  Group<kThreads>(s, cnt, scan, off);
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int e = ids[i];
    r.ids[i] = e;
    r.w[i] = w[i];
    if (e < 0) {
      s.pair_pos[i] = e;  // -1 (dropped) or kZeroExpertPick
      continue;
    }
    const int p = off[e] + rank[i];
    s.sorted_row[p] = i / r.K;
    s.sorted_w[p] = w[i];
    s.pair_pos[i] = p;
  }
  // counts for the host-side debug check and the multi-kernel layout
  for (int e = threadIdx.x; e < E - r.zero_experts; e += blockDim.x) r.counts[e] = cnt[e];
}


// One token: routed by the block in parallel (RouteTokenByRank), where the selection passes of the
// fused kernel are a chain of k dependent warp reductions; a decode call waits for this kernel (on
// an H200, 3.9 µs instead of 5.7 at the Qwen3 shape, 2.8 instead of 4.2 at GPT-OSS's:
// docs/performance.md). Every (token, expert) pair is an expert of its own with one row, so the
// grouping is the picks' order by expert, and each expert's offset and count take K reads of the
// picks by its own thread (by one warp, E / 32 rounds of K shuffles each cost 0.5 µs at E = 128).
constexpr int kRankThreads = 128;

template <typename T, int M>
__global__ void __launch_bounds__(kRankThreads) RouteOneKernel(RouteParams r, SortParams s) {
  GridDepWait();
  __shared__ RankScratch sm;
  for (int i = threadIdx.x; i < s.zero_count; i += blockDim.x) s.zero[i] = 0;
  int id;
  float w;
  RouteTokenByRank<T, M>(r, 0, sm, &id, &w);
  const int E = r.E, K = r.K;
  if (threadIdx.x < K) {
    // the pick's sorted row: the picks of lower experts (a token's picks are distinct)
    int pos = 0;
    for (int j = 0; j < K; ++j) pos += sm.pick[j] < id;
    const int j = threadIdx.x;
    r.ids[j] = id;
    r.w[j] = w;
    r.rank[j] = 0;
    s.pair_pos[j] = pos;
    s.sorted_row[pos] = 0;
    s.sorted_w[pos] = w;
    s.active[pos] = id;
    s.active[E + pos] = 1;
    if (pos < s.max_tiles) s.mtiles[pos] = make_int4(id, pos, 1, 0);
    if (s.mpairs && pos < s.max_tiles) s.mpairs[pos] = make_int4(id, pos, 1, 0);  // (one m-tile a pair)
  }
  // every expert's first sorted row and count, a thread per expert
  for (int e = threadIdx.x; e <= E; e += blockDim.x) {
    int below = 0, here = 0;
    for (int j = 0; j < K; ++j) {
      const int v = sm.pick[j];
      below += v < e;
      here += v == e;
    }
    s.offsets[e] = below;
    s.tile_prefix[e] = below;  // one row, so one m-tile, per picked expert
    if (s.mpairs) s.mpair_prefix[e] = below;
    if (e < E) r.counts[e] = here;
  }
  if (threadIdx.x == 0) {
    *s.num_active = K;
    *r.bad = 0;
  }
}

template <typename T, int M>
cudaError_t RouteT(const RouteParams& r, const SortParams& s, cudaStream_t stream) {
  if constexpr (HasRankKernel(M)) {
    if (RoutesOneByRank(r))
      return Launch(RouteOneKernel<T, M>, dim3(1), dim3(kRankThreads), 0, stream, r, s);
  }
  const int gfloats = (IsGrouped(M) && r.n_group > 1) ? r.n_group : 0;
  const int threads = r.T <= kFusedSmallTokens ? 512 : 1024;
  const size_t fused_smem = (2 * static_cast<size_t>(r.E) + 3 * 32 + 3 * static_cast<size_t>(r.T) * r.K) * 4 +
                            static_cast<size_t>(threads / 32) * gfloats * sizeof(float);
  if (r.T <= kFusedMaxTokens && fused_smem <= 48 * 1024) {
    // sparsemixer: 512 threads at any T (at 1024 its kernel spills; two picks a token are cheap)
    if constexpr (M == kSparsemixer)
      return Launch(FusedKernel<T, M, 512>, dim3(1), dim3(512), fused_smem, stream, r, s);
    else
      return threads == 512 ? Launch(FusedKernel<T, M, 512>, dim3(1), dim3(512), fused_smem, stream, r, s)
                            : Launch(FusedKernel<T, M, 1024>, dim3(1), dim3(1024), fused_smem, stream, r, s);
  }
  // the counters a line apart, then counts, bad and the later kernels' counters: one buffer, one
  // memset (counts itself is written by GroupKernel)
  const int experts = r.E - r.zero_experts;  // counted: not the zero experts
  int* const lines = r.counts - static_cast<int64_t>(kCountLine) * experts;
  if (r.bad != r.counts + experts || s.E != experts || (s.zero_count > 0 && s.zero != r.bad + 1) ||
      s.counts != lines)
    return cudaErrorInvalidValue;
  if (cudaError_t e = cudaMemsetAsync(lines, 0, sizeof(int) * (kCountLine * experts + experts + 1 + s.zero_count),
                                      stream))
    return e;
  const size_t smem = static_cast<size_t>(kRouteWarps) * gfloats * sizeof(float);
  if (smem > 48 * 1024) {
    if (cudaError_t e = cudaFuncSetAttribute(RouteKernel<T, M>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)))
      return e;
  }
  RouteParams rl = r;
  rl.counts = lines;
  if (cudaError_t e = Launch(RouteKernel<T, M>, dim3(static_cast<unsigned>(CeilDiv(r.T, kRouteWarps))),
                             dim3(kRouteWarps * 32), smem, stream, rl))
    return e;
  if (cudaError_t e = Launch(GroupKernel, dim3(1), dim3(kScanThreads), 0, stream, s, r.counts)) return e;
  const int64_t n = static_cast<int64_t>(r.T) * r.K;
  const unsigned blocks = static_cast<unsigned>(CeilDiv(n, 256) < 4096 ? CeilDiv(n, 256) : 4096);
  return Launch(ScatterKernel, dim3(blocks), dim3(256), 0, stream, s);
}

template <typename T>
cudaError_t RouteModeT(const RouteParams& r, const SortParams& s, cudaStream_t stream) {
  switch (r.mode) {
    case kSoftmaxTopk:
      if (r.n_group > 1) return RouteT<T, kSoftmaxGroupTopk>(r, s, stream);
      return r.sel_bias ? RouteT<T, kSoftmaxBiasTopk>(r, s, stream) : RouteT<T, kSoftmaxTopk>(r, s, stream);
    case kTopkSoftmax:
      return RouteT<T, kTopkSoftmax>(r, s, stream);
    case kSigmoidTopk:
      return RouteT<T, kSigmoidTopk>(r, s, stream);
    case kPrecomputed:
      return RouteT<T, kPrecomputed>(r, s, stream);
    case kSparsemixer:
      return RouteT<T, kSparsemixer>(r, s, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

int64_t RouteCountLineInts(int64_t E) { return kCountLine * E; }

cudaError_t LaunchRouteAndSort(const RouteParams& r, const SortParams& s, cudaStream_t stream) {
  switch (r.dtype) {
    case DType::kF16:
      return RouteModeT<__half>(r, s, stream);
    case DType::kBF16:
      return RouteModeT<__nv_bfloat16>(r, s, stream);
    default:
      return RouteModeT<float>(r, s, stream);
  }
}

}  // namespace cuda
}  // namespace moefuse
