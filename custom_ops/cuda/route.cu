// Routing (top-k selection and weights, one warp per token) and grouping of the (token, expert)
// pairs by expert: counts, offsets, the grouped GEMM's tile schedule and the sorted row lists.
//
// Top-k is k selection passes over the token's scores: pass j picks the best score ranked after
// pick j-1 (numpy's stable argsort order: larger first, NaN last, ties to the lower index), so no
// per-token storage is needed whatever E is. Scores are recomputed from the logits in each pass.
#include <climits>

#include "common.cuh"

namespace moefuse {
namespace cuda {
namespace {

constexpr int kRouteWarps = 4;       // warps (tokens in flight) per block, multi-kernel path
constexpr int kFusedThreads = 512;   // one block: route + group, small T
constexpr int kFusedMaxTokens = 32;
constexpr int kScanThreads = 1024;

enum Mode { kSoftmaxTopk = 0, kTopkSoftmax = 1, kSigmoidTopk = 2, kPrecomputed = 3 };

template <typename T>
struct Token {
  const T* lg;  // this token's logits
  const T* bias;
  int E;
  int mode;
  float m, sum;         // softmax statistics
  const float* gkeep;   // group mask (1.0 kept) or null
  int gsize;

  // The score that ranks experts for selection.
  __device__ __forceinline__ float Choice(int e) const {
    const float l = ToF(lg[e]);
    if (mode == kSoftmaxTopk) return expf(l - m) / sum;
    if (mode == kTopkSoftmax) return l;
    float c = Sigmoid(l);
    if (bias) c = c + ToF(bias[e]);
    if (gkeep && gkeep[e / gsize] != 1.0f) c = -INFINITY;
    return c;
  }
};

// Routes one token with a full warp. `gscratch` holds n_group floats (sigmoid_topk, n_group > 1).
template <typename T>
__device__ void RouteToken(const RouteParams& r, int t, float* gscratch) {
  const int lane = threadIdx.x & 31;
  const int E = r.E, K = r.K;
  float* wout = r.w + static_cast<int64_t>(t) * K;
  int* iout = r.ids + static_cast<int64_t>(t) * K;
  int* rout = r.rank + static_cast<int64_t>(t) * K;

  if (r.mode == kPrecomputed) {
    for (int j = lane; j < K; j += 32) {
      const int64_t idx = static_cast<int64_t>(t) * K + j;
      const int64_t id = r.ids_int64 ? static_cast<const int64_t*>(r.ids_in)[idx]
                                     : static_cast<const int32_t*>(r.ids_in)[idx];
      const float w = ToF(static_cast<const T*>(r.w_in)[idx]) * r.scale;
      wout[j] = w;
      if (id < 0 || id >= E) {
        iout[j] = -1;
        rout[j] = 0;
        atomicMin(r.bad, static_cast<int>(idx));
      } else {
        iout[j] = static_cast<int>(id);
        rout[j] = atomicAdd(r.counts + id, 1);
      }
    }
    return;
  }

  Token<T> tok;
  tok.lg = static_cast<const T*>(r.logits) + static_cast<int64_t>(t) * E;
  tok.bias = static_cast<const T*>(r.sel_bias);
  tok.E = E;
  tok.mode = r.mode;
  tok.m = 0.0f;
  tok.sum = 1.0f;
  tok.gkeep = nullptr;
  tok.gsize = 1;
  if (r.mode == kSoftmaxTopk) {
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) m = NanMax(m, ToF(tok.lg[e]));
    m = WarpNanMax(m);
    float s = 0.0f;
    for (int e = lane; e < E; e += 32) s += expf(ToF(tok.lg[e]) - m);
    tok.m = m;
    tok.sum = WarpSum(s);
  }
  if (r.mode == kSigmoidTopk && r.n_group > 1) {
    // Group score: sum of the group's top min(2, size) choices; keep the topk_group best groups.
    const int G = r.n_group, gs = E / G, top = gs < 2 ? gs : 2;
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

  // k selection passes; the raw weights go to wout, finished below. Up to 256 experts, each
  // lane keeps its experts' scores in registers; beyond, scores are recomputed in every pass.
  // E <= 256: each lane keeps its experts' choice values and their order keys in registers; a
  // pick is two warp reductions (best key, then lowest expert holding it). Otherwise the values
  // are re-read per pick.
  constexpr int kCache = 8;
  const bool cached = E <= 32 * kCache;
  float cv[kCache];
  unsigned key[kCache];
  if (cached) {
#pragma unroll
    for (int q = 0; q < kCache; ++q) {
      const int e = q * 32 + lane;
      cv[q] = e < E ? tok.Choice(e) : 0.0f;
      key[q] = e < E ? OrderKey(cv[q]) : 0u;
    }
  }
  float pv = 0.0f;
  int pi = INT32_MAX;
  float wsum = 0.0f, lmax = -INFINITY;
  for (int j = 0; j < K; ++j) {
    float bv = 0.0f;
    int bi = INT32_MAX;
    if (cached) {
      unsigned bk = 0u;
      int bq = 0;
#pragma unroll
      for (int q = 0; q < kCache; ++q) {
        if (key[q] > bk) {  // strict: the lowest expert of equal keys
          bk = key[q];
          bq = q;
        }
      }
      const unsigned mk = WarpExtreme<true>(bk);
      bi = WarpExtreme<false>(bk == mk && bk != 0u ? bq * 32 + lane : INT32_MAX);
      const int oq = bi >> 5, ol = bi & 31;
      float mine = 0.0f;
#pragma unroll
      for (int q = 0; q < kCache; ++q) {
        if (q == oq) {
          mine = cv[q];
          if (lane == ol) key[q] = 0u;  // picked
        }
      }
      bv = __shfl_sync(0xffffffffu, mine, ol);
    } else {
      for (int e = lane; e < E; e += 32) {
        const float c = tok.Choice(e);
        if (pi != INT32_MAX && !Better(pv, pi, c, e)) continue;
        if (bi == INT32_MAX || Better(c, e, bv, bi)) {
          bv = c;
          bi = e;
        }
      }
      WarpBest(bv, bi);  // warp-uniform from here
    }
    pv = bv;
    pi = bi;
    float w;
    if (r.mode == kSoftmaxTopk) {
      w = bv;  // the probability
    } else if (r.mode == kTopkSoftmax) {
      w = bv;  // the logit: softmax over the picks below
      lmax = NanMax(lmax, bv);
    } else {
      w = Sigmoid(ToF(tok.lg[bi]));
    }
    wsum += w;  // in pick order, as the reference's sum over k
    if (lane == 0) {
      iout[j] = bi;
      wout[j] = w;
    }
  }
  __syncwarp();
  if (r.mode == kTopkSoftmax) {
    float s = 0.0f;
    for (int j = lane; j < K; j += 32) s += expf(wout[j] - lmax);
    s = WarpSum(s);
    for (int j = lane; j < K; j += 32) wout[j] = expf(wout[j] - lmax) / s;
  } else if (r.normalize) {
    for (int j = lane; j < K; j += 32) wout[j] = wout[j] / wsum;
  }
  for (int j = lane; j < K; j += 32) {
    if (r.scale != 1.0f) wout[j] = wout[j] * r.scale;
    rout[j] = atomicAdd(r.counts + iout[j], 1);
  }
}

template <typename T>
__global__ void RouteKernel(RouteParams r) {
  GridDepWait();
  extern __shared__ float gscratch_all[];
  const int warp = threadIdx.x >> 5;
  const int t = blockIdx.x * kRouteWarps + warp;
  if (t < r.T) RouteToken<T>(r, t, gscratch_all + warp * r.n_group);
}

// Exclusive block scan of one value per thread; returns the prefix, *total gets the sum.
template <int kThreads>
__device__ int BlockScan(int v, int* total, int* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) smem[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int s = lane < kThreads / 32 ? smem[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < kThreads / 32) smem[lane] = s;
  }
  __syncthreads();
  const int before = (warp > 0 ? smem[warp - 1] : 0) + x - v;
  *total = smem[kThreads / 32 - 1];
  __syncthreads();
  return before;
}

// offsets, tile prefix and active list from counts (in `cnt`, E entries). One block.
template <int kThreads>
__device__ void Group(const SortParams& s, const int* cnt, int* smem) {
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
  int total_rows, total_tiles, total_act;
  int r0 = BlockScan<kThreads>(rows, &total_rows, smem);
  int t0 = BlockScan<kThreads>(tiles, &total_tiles, smem);
  int a0 = BlockScan<kThreads>(act, &total_act, smem);
  for (int e = e0; e < e0 + per && e < E; ++e) {
    const int c = cnt[e];
    s.offsets[e] = r0;
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
    s.offsets[E] = total_rows;
    s.tile_prefix[E] = total_tiles;
    *s.num_active = total_act;
  }
}

__global__ void GroupKernel(SortParams s) {
  GridDepWait();
  __shared__ int smem[32];
  Group<kScanThreads>(s, s.counts, smem);
}

__global__ void ScatterKernel(SortParams s) {
  GridDepWait();
  const int64_t n = static_cast<int64_t>(s.T) * s.K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int e = s.ids[i];
    if (e < 0) {
      s.pair_pos[i] = -1;
      continue;
    }
    const int p = s.offsets[e] + s.rank[i];
    s.sorted_row[p] = static_cast<int>(i / s.K);
    s.sorted_w[p] = s.w[i];
    s.pair_pos[i] = p;
  }
}

// Small T: routing, counting, grouping and scattering in one block (counts in shared memory).
template <typename T>
__global__ void __launch_bounds__(kFusedThreads) FusedKernel(RouteParams r, SortParams s) {
  GridDepWait();
  extern __shared__ int fsm[];
  int* cnt = fsm;                  // E
  int* scan = fsm + r.E;           // 32
  float* gscr = reinterpret_cast<float*>(fsm + r.E + 32);  // warps * n_group
  for (int e = threadIdx.x; e < r.E; e += blockDim.x) cnt[e] = 0;
  if (threadIdx.x == 0) *r.bad = INT32_MAX;
  __syncthreads();
  RouteParams rr = r;
  rr.counts = cnt;
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int t = warp; t < r.T; t += nwarps) RouteToken<T>(rr, t, gscr + warp * r.n_group);
  __syncthreads();
  Group<kFusedThreads>(s, cnt, scan);
  __syncthreads();
  // scatter (offsets were written to global by this block; read them back after the barrier)
  __threadfence_block();
  const int n = r.T * r.K;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int e = s.ids[i];
    if (e < 0) {
      s.pair_pos[i] = -1;
      continue;
    }
    const int p = s.offsets[e] + s.rank[i];
    s.sorted_row[p] = i / r.K;
    s.sorted_w[p] = s.w[i];
    s.pair_pos[i] = p;
  }
  // counts for the host-side debug check and the multi-kernel layout
  for (int e = threadIdx.x; e < r.E; e += blockDim.x) r.counts[e] = cnt[e];
}

template <typename T>
cudaError_t RouteT(const RouteParams& r, const SortParams& s, cudaStream_t stream) {
  const int gfloats = (r.mode == kSigmoidTopk && r.n_group > 1) ? r.n_group : 0;
  const size_t fused_smem = (static_cast<size_t>(r.E) + 32) * sizeof(int) +
                            static_cast<size_t>(kFusedThreads / 32) * gfloats * sizeof(float);
  if (r.T <= kFusedMaxTokens && fused_smem <= 48 * 1024)
    return Launch(FusedKernel<T>, dim3(1), dim3(kFusedThreads), fused_smem, stream, r, s);
  if (cudaError_t e = cudaMemsetAsync(r.bad, 0x7f, sizeof(int), stream)) return e;
  if (cudaError_t e = cudaMemsetAsync(r.counts, 0, sizeof(int) * r.E, stream)) return e;
  const size_t smem = static_cast<size_t>(kRouteWarps) * gfloats * sizeof(float);
  if (smem > 48 * 1024) {
    if (cudaError_t e = cudaFuncSetAttribute(RouteKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)))
      return e;
  }
  if (cudaError_t e = Launch(RouteKernel<T>, dim3(static_cast<unsigned>(CeilDiv(r.T, kRouteWarps))),
                             dim3(kRouteWarps * 32), smem, stream, r))
    return e;
  if (cudaError_t e = Launch(GroupKernel, dim3(1), dim3(kScanThreads), 0, stream, s)) return e;
  const int64_t n = static_cast<int64_t>(r.T) * r.K;
  const unsigned blocks = static_cast<unsigned>(CeilDiv(n, 256) < 4096 ? CeilDiv(n, 256) : 4096);
  return Launch(ScatterKernel, dim3(blocks), dim3(256), 0, stream, s);
}

}  // namespace

cudaError_t LaunchRouteAndSort(const RouteParams& r, const SortParams& s, cudaStream_t stream) {
  switch (r.dtype) {
    case DType::kF16:
      return RouteT<__half>(r, s, stream);
    case DType::kBF16:
      return RouteT<__nv_bfloat16>(r, s, stream);
    default:
      return RouteT<float>(r, s, stream);
  }
}

}  // namespace cuda
}  // namespace moefuse
