// One token's routing, shared by the routing kernels (route.cu) and the one-token decode
// (skinny.cu): the routing modes as compiled, a token's scores, the k selection passes, and the
// parallel ranking of one token by a block (and RoutesOneByRank, the host's test of which calls that
// serves).
#pragma once

#include <climits>

#include "common.cuh"
#include "trace.cuh"

namespace moefuse {
namespace cuda {
namespace routing {

// The routing modes of the spec (moefuse::Routing), and softmax_topk with a selection bias or with
// expert groups, compiled apart so that the other modes' kernels stay as they were.
enum Mode {
  kSoftmaxTopk = 0,
  kTopkSoftmax = 1,
  kSigmoidTopk = 2,
  kPrecomputed = 3,
  kSparsemixer = 4,
  kSoftmaxBiasTopk = 5,
  kSoftmaxGroupTopk = 6  // n_group > 1, with or without a selection bias
};

__host__ __device__ constexpr bool IsSoftmax(int m) {
  return m == kSoftmaxTopk || m == kSoftmaxBiasTopk || m == kSoftmaxGroupTopk;
}
// Modes that may limit the selection to the best expert groups.
__host__ __device__ constexpr bool IsGrouped(int m) { return m == kSigmoidTopk || m == kSoftmaxGroupTopk; }

// Up to this many experts a lane keeps its experts' scores in registers (kCache per lane).
constexpr int kCache = 8;
constexpr int kCachedMaxExperts = 32 * kCache;

template <typename T, int M>
struct Token {
  const T* lg;  // this token's logits
  const T* bias;
  int E;
  float m, sum;         // softmax statistics
  const float* gkeep;   // group mask (1.0 kept) or null
  int gsize;

  // The score that ranks experts for selection.
  __device__ __forceinline__ float Choice(int e) const {
    const float l = ToF(lg[e]);
    if constexpr (M == kSoftmaxTopk) return expf(l - m) / sum;
    if constexpr (M == kSoftmaxBiasTopk) return expf(l - m) / sum + ToF(bias[e]);
    if constexpr (M == kTopkSoftmax) return l;
    float c = M == kSoftmaxGroupTopk ? expf(l - m) / sum : Sigmoid(l);
    if (bias) c = c + ToF(bias[e]);
    if (gkeep && gkeep[e / gsize] != 1.0f) c = -INFINITY;
    return c;
  }

  // The weight of a pick before normalization, where it is not the choice score itself (modes with
  // a selection bias): the probability, or the sigmoid.
  __device__ __forceinline__ float Score(int e) const {
    const float l = ToF(lg[e]);
    if constexpr (IsSoftmax(M)) return expf(l - m) / sum;
    return Sigmoid(l);
  }
};

// Token t's scores, with the softmax statistics where the mode needs them (no group mask yet).
template <typename T, int M>
__device__ __forceinline__ Token<T, M> MakeToken(const RouteParams& r, int t) {
  const int lane = threadIdx.x & 31, E = r.E;
  Token<T, M> tok;
  tok.lg = static_cast<const T*>(r.logits) + static_cast<int64_t>(t) * E;
  tok.bias = static_cast<const T*>(r.sel_bias);
  tok.E = E;
  tok.m = 0.0f;
  tok.sum = 1.0f;
  tok.gkeep = nullptr;
  tok.gsize = 1;
  if constexpr (IsSoftmax(M)) {
    float m = -INFINITY, s = 0.0f;
    if (E <= kCachedMaxExperts) {
      // a lane's logits loaded at once: a loop that takes each into the max as it comes waits a
      // round trip per load (1.3 us of a one-token block on an H100; docs/performance.md)
      float l[kCache];
#pragma unroll
      for (int q = 0; q < kCache; ++q) l[q] = q * 32 + lane < E ? ToF(tok.lg[q * 32 + lane]) : 0.0f;
#pragma unroll
      for (int q = 0; q < kCache; ++q)
        if (q * 32 + lane < E) m = NanMax(m, l[q]);
      m = WarpNanMax(m);
#pragma unroll
      for (int q = 0; q < kCache; ++q)
        if (q * 32 + lane < E) s += expf(l[q] - m);
    } else {
      for (int e = lane; e < E; e += 32) m = NanMax(m, ToF(tok.lg[e]));
      m = WarpNanMax(m);
      for (int e = lane; e < E; e += 32) s += expf(ToF(tok.lg[e]) - m);
    }
    tok.m = m;
    tok.sum = WarpSum(s);
  }
  return tok;
}

// What the k passes leave for the weights' last step (Finish).
struct PickSums {
  float wsum = 0.0f;       // the raw weights' sum, in pick order (as the reference's sum over k)
  float lmax = -INFINITY;  // topk_softmax: the largest picked logit
};

// The k selection passes. on_pick(j, expert, raw weight) is called by every lane with warp-uniform
// values; the raw weight is the probability (softmax_topk), the logit (topk_softmax) or the
// sigmoid (sigmoid_topk). E <= kCachedMaxExperts: each lane keeps its experts' choice values and
// their order keys in registers, and a pick is two warp reductions (best key, then lowest expert
// holding it). Otherwise the values are re-read per pick.
template <typename T, int M, typename OnPick>
__device__ __forceinline__ PickSums SelectPicks(const Token<T, M>& tok, int K, OnPick&& on_pick) {
  const int lane = threadIdx.x & 31, E = tok.E;
  const bool cached = E <= kCachedMaxExperts;
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
  PickSums sums;
  float pv = 0.0f;
  int pi = INT32_MAX;
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
    if constexpr (M == kSoftmaxTopk) {
      w = bv;  // the probability
    } else if constexpr (M == kTopkSoftmax) {
      w = bv;  // the logit: softmax over the picks in Finish
      sums.lmax = NanMax(sums.lmax, bv);
    } else {
      w = tok.Score(bi);  // the sigmoid, or (kSoftmaxBiasTopk) the probability
    }
    sums.wsum += w;
    on_pick(j, bi, w);
  }
  return sums;
}

// A pick's final weight from its raw weight: topk_softmax's softmax over the picks (`esum`: the
// sum of expf(raw - lmax) over the token's picks), or the normalization; then the scale.
template <int M>
__device__ __forceinline__ float Finish(const RouteParams& r, float raw, const PickSums& sums, float esum) {
  float w = raw;
  if constexpr (M == kTopkSoftmax) w = expf(raw - sums.lmax) / esum;
  else if (r.normalize) w = w / sums.wsum;
  if (r.scale != 1.0f) w = w * r.scale;
  return w;
}

// Modes RouteTokenByRank serves (sigmoid_topk only without groups, which the launcher checks).
__host__ __device__ constexpr bool HasRankKernel(int m) {
  return m != kPrecomputed && m != kSparsemixer && m != kSoftmaxGroupTopk;
}

// Shared memory of RouteTokenByRank.
struct RankScratch {
  alignas(16) unsigned key[kCachedMaxExperts];
  float raw[kCachedMaxExperts];
  int pick[32];
};

// One token routed by a whole block (K <= 32, E <= kCachedMaxExperts, no expert groups), with the
// picks and weights of the k selection passes above, bit for bit, but in parallel: a thread per
// expert finds its expert's rank among all (the passes' order: the larger key first, of equal keys
// the lower expert), and the expert of rank j is pick j. Lane j < K of
// every warp gets pick j's expert and final weight; the other lanes get -1 and 0. Two barriers;
// every thread of the block must call it. weights = false: the picks only (sm.pick), every weight
// 0, for a caller that needs no weight (the weights' sums in pick order are a chain of
// shared-memory reads). ts: the caller's stamps (MOEFUSE_CUDA_TRACE), or null.
template <typename T, int M>
__device__ __forceinline__ void RouteTokenByRank(const RouteParams& r, int t, RankScratch& sm, int* id,
                                                 float* w, bool weights = true, trace::Stamps* ts = nullptr) {
  static_assert(HasRankKernel(M), "precomputed picks are copied; sparsemixer's are direct; groups need a pass");
  const int lane = threadIdx.x & 31, E = r.E, K = r.K;
  const Token<T, M> tok = MakeToken<T, M>(r, t);  // every warp: the same statistics
  if (ts) ts->At(trace::kToken);
  const int E4 = (E + 3) / 4;  // keys read four at a time; the padding's key 0 outranks none
  for (int e = threadIdx.x; e < 4 * E4; e += blockDim.x) {
    if (e >= E) {
      sm.key[e] = 0u;
      continue;
    }
    // the choice and the raw weight, as SelectPicks takes them (with a bias on the
    // probabilities, the probability once for both)
    if constexpr (M == kSoftmaxBiasTopk) {
      const float p = tok.Score(e);
      sm.key[e] = OrderKey(p + ToF(tok.bias[e]));
      sm.raw[e] = p;
    } else {
      const float c = tok.Choice(e);
      sm.key[e] = OrderKey(c);
      sm.raw[e] = M == kSigmoidTopk ? tok.Score(e) : c;
    }
  }
  __syncthreads();
  if (ts) ts->At(trace::kKeys);
  const uint4* key4 = reinterpret_cast<const uint4*>(sm.key);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    // An expert below e outranks it with an equal key or a larger one (k' >= k), one above only
    // with a larger one (k' >= k + 1; real keys lie in [1, 0xff800000], so no overflow). The keys
    // of experts below (above) all of this warp's experts compare in one instruction; only the
    // warp's own 32 need the expert's index (blockDim.x is a multiple of 32, so each warp's
    // experts are 32 in a row). Testing both on every key, a block's ranking took 1.49 us on an
    // H100, this 1.25 (docs/performance.md).
    const unsigned k = sm.key[e], k1 = k + 1u;
    const int own = (e & ~31) / 4, own_end = min(own + 8, E4);  // this warp's 8 chunks of 4 keys
    int r0 = 0, r1 = 0, r2 = 0, r3 = 0;  // independent sums: the loads pipeline
#pragma unroll 4
    for (int o = 0; o < own; ++o) {
      const uint4 q = key4[o];
      r0 += q.x >= k;
      r1 += q.y >= k;
      r2 += q.z >= k;
      r3 += q.w >= k;
    }
#pragma unroll 4
    for (int o = own; o < own_end; ++o) {
      const uint4 q = key4[o];
      r0 += q.x >= (4 * o < e ? k : k1);
      r1 += q.y >= (4 * o + 1 < e ? k : k1);
      r2 += q.z >= (4 * o + 2 < e ? k : k1);
      r3 += q.w >= (4 * o + 3 < e ? k : k1);
    }
#pragma unroll 4
    for (int o = own_end; o < E4; ++o) {
      const uint4 q = key4[o];
      r0 += q.x >= k1;
      r1 += q.y >= k1;
      r2 += q.z >= k1;
      r3 += q.w >= k1;
    }
    const int rank = r0 + r1 + r2 + r3;
    if (rank < K) sm.pick[rank] = e;
  }
  __syncthreads();
  if (ts) ts->At(trace::kRanked);
  if (!weights) {
    *id = lane < K ? sm.pick[lane] : -1;
    *w = 0.0f;
    return;
  }
  // the sums in pick order, as the passes add them
  PickSums sums;
  for (int j = 0; j < K; ++j) {
    const float raw = sm.raw[sm.pick[j]];
    if constexpr (M == kTopkSoftmax) sums.lmax = NanMax(sums.lmax, raw);
    sums.wsum += raw;
  }
  const int my_id = lane < K ? sm.pick[lane] : -1;
  const float my_raw = lane < K ? sm.raw[my_id] : 0.0f;
  float esum = 0.0f;
  if constexpr (M == kTopkSoftmax) esum = WarpSum(lane < K ? expf(my_raw - sums.lmax) : 0.0f);
  *id = my_id;
  *w = lane < K ? Finish<M>(r, my_raw, sums, esum) : 0.0f;
}

// Whether a call's routing is one token that RouteTokenByRank serves: softmax_topk (with or
// without a selection bias), topk_softmax or sigmoid_topk, without expert groups or zero experts,
// k <= 32 and E <= kCachedMaxExperts (and MOEFUSE_CUDA_RANK_ROUTE not 0).
inline bool RoutesOneByRank(const RouteParams& r) {
  const bool computed = (r.mode == kSoftmaxTopk || r.mode == kTopkSoftmax || r.mode == kSigmoidTopk) && r.n_group <= 1;
  return r.rank_one && computed && r.zero_experts == 0 && r.T == 1 && r.K >= 1 && r.K <= 32 && r.E >= r.K && r.E <= kCachedMaxExperts;
}

}  // namespace routing
}  // namespace cuda
}  // namespace moefuse
