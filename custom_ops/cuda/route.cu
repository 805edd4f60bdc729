// The routing kernels: small T in one block (RouteSmall), larger T as routing (a warp per token),
// grouping (one block) and scattering kernels. Their device code is in route.cuh.
#include <climits>

#include "route.cuh"

namespace moefuse {
namespace cuda {
namespace {

constexpr int kRouteWarps = 4;       // warps (tokens in flight) per block, multi-kernel path
// Small T: one block routes and groups, a warp per token. Up to 16 tokens it has 512 threads: on an
// H200, 1024 took the routing kernel from 13.4 to 10.7 µs at T = 32, and cost 0.7-1.3 µs per
// decode call at T = 1 in that run, 0.2-0.3 µs in another (docs/performance.md).
constexpr int kFusedMaxTokens = 32;
constexpr int kFusedSmallTokens = 16;
constexpr int kScanThreads = 1024;

using namespace routing;

template <typename T, int M>
__global__ void RouteKernel(RouteParams r) {
  GridDepWait();
  extern __shared__ float gscratch_all[];
  const int warp = threadIdx.x >> 5;
  const int t = blockIdx.x * kRouteWarps + warp;
  if (t < r.T) Route<T, M>(r, t, gscratch_all + warp * r.n_group);
}

__global__ void GroupKernel(SortParams s) {
  GridDepWait();
  __shared__ int smem[3 * 32];
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

// Small T: routing and grouping in one block.
template <typename T, int M, int kThreads>
__global__ void __launch_bounds__(kThreads) FusedKernel(RouteParams r, SortParams s) {
  GridDepWait();
  extern __shared__ int fsm[];
  routing::RouteSmall<T, M, kThreads>(r, s, fsm, true);
}

template <typename T, int M>
cudaError_t RouteT(const RouteParams& r, const SortParams& s, cudaStream_t stream) {
  const int gfloats = (M == kSigmoidTopk && r.n_group > 1) ? r.n_group : 0;
  const int threads = r.T <= kFusedSmallTokens ? 512 : 1024;
  const size_t fused_smem = SmallRouteInts(r.E, r.T, r.K, threads / 32, gfloats) * sizeof(int);
  if (r.T <= kFusedMaxTokens && fused_smem <= 48 * 1024) {
    return threads == 512 ? Launch(FusedKernel<T, M, 512>, dim3(1), dim3(512), fused_smem, stream, r, s)
                          : Launch(FusedKernel<T, M, 1024>, dim3(1), dim3(1024), fused_smem, stream, r, s);
  }
  // counts, bad and the later kernels' counters: one buffer, one memset
  if (r.bad != r.counts + r.E || (s.zero_count > 0 && s.zero != r.bad + 1)) return cudaErrorInvalidValue;
  if (cudaError_t e = cudaMemsetAsync(r.counts, 0, sizeof(int) * (r.E + 1 + s.zero_count), stream)) return e;
  const size_t smem = static_cast<size_t>(kRouteWarps) * gfloats * sizeof(float);
  if (smem > 48 * 1024) {
    if (cudaError_t e = cudaFuncSetAttribute(RouteKernel<T, M>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)))
      return e;
  }
  if (cudaError_t e = Launch(RouteKernel<T, M>, dim3(static_cast<unsigned>(CeilDiv(r.T, kRouteWarps))),
                             dim3(kRouteWarps * 32), smem, stream, r))
    return e;
  if (cudaError_t e = Launch(GroupKernel, dim3(1), dim3(kScanThreads), 0, stream, s)) return e;
  const int64_t n = static_cast<int64_t>(r.T) * r.K;
  const unsigned blocks = static_cast<unsigned>(CeilDiv(n, 256) < 4096 ? CeilDiv(n, 256) : 4096);
  return Launch(ScatterKernel, dim3(blocks), dim3(256), 0, stream, s);
}

template <typename T>
cudaError_t RouteModeT(const RouteParams& r, const SortParams& s, cudaStream_t stream) {
  return ForMode(r.mode, [&](auto m) { return RouteT<T, decltype(m)::value>(r, s, stream); });
}

}  // namespace

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
