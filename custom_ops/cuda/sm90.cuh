// Hopper (sm_90a) primitives shared by the kernels that stream through shared memory: mbarriers
// and bulk copies (TMA). Compiled only into the sm_90a code (MOEFUSE_SM90A); the host checks the
// device before launching a kernel that uses them.
#pragma once

#include <cstdint>

#include "common.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOEFUSE_SM90A 1
#endif

#ifdef MOEFUSE_SM90A

namespace moefuse {
namespace cuda {

__device__ __forceinline__ void MbarInit(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(SmemAddr(bar)), "r"(count));
}

// Waits for the phase of `bar` with this parity to complete. kCluster: with acquire at cluster
// scope, where the arrival came from another CTA of the cluster with a release at that scope.
template <bool kCluster = false>
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = SmemAddr(bar);
  uint32_t done = 0;
  do {
    if constexpr (kCluster)
      asm volatile(
          "{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
          "selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(addr), "r"(parity)
          : "memory");
    else
      asm volatile(
          "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
          "selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(addr), "r"(parity)
          : "memory");
  } while (!done);
}

__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(SmemAddr(bar)) : "memory");
}

// Clusters of CTAs (the wgmma path's CTA pairs): this CTA's rank, an arrival on the mbarrier at
// `bar`'s offset in CTA `cta` of the cluster, and a barrier of all the cluster's threads whose
// writes before it (mbarrier inits included) the others see after it.
__device__ __forceinline__ uint32_t ClusterRank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// The address of `p`'s shared-memory offset in CTA `cta` of the cluster.
__device__ __forceinline__ uint32_t ClusterSmemAddr(const void* p, uint32_t cta) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(SmemAddr(p)), "r"(cta));
  return remote;
}

// (Default semantics, release at CTA scope, as CUTLASS's cluster barrier arrives: what it orders is
// this CTA's wgmma reads of a stage before the partner's TMA writes it. The cluster-scope release
// made paired CTAs 1.26x-1.62x slower on an H200, docs/performance.md "H200, 2026-12-04 (night)".)
__device__ __forceinline__ void MbarArriveCluster(uint64_t* bar, uint32_t cta) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(ClusterSmemAddr(bar, cta)) : "memory");
}

// An arrival on another CTA's mbarrier (ClusterSmemAddr) that releases this thread's earlier
// writes at cluster scope; the waiter acquires them (MbarWait<true>).
__device__ __forceinline__ void MbarArriveRemoteRelease(uint32_t bar_addr) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(bar_addr) : "memory");
}

// A 32-bit store into another CTA's shared memory, then such an arrival on its mbarrier.
__device__ __forceinline__ void StoreAndArriveRemote(uint32_t value_addr, int value, uint32_t bar_addr) {
  asm volatile("st.shared::cluster.u32 [%0], %1;" ::"r"(value_addr), "r"(value) : "memory");
  MbarArriveRemoteRelease(bar_addr);
}

__device__ __forceinline__ void ClusterSync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__device__ __forceinline__ void MbarExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SmemAddr(bar)),
               "r"(bytes)
               : "memory");
}

// L2 policy for data read once (weights): evicted first, so that what is reused stays.
__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}

// `bytes` (a multiple of 16; both addresses 16-byte aligned) global -> shared by the TMA unit,
// completing on `bar`'s transaction count.
__device__ __forceinline__ void BulkLoad(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                         uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
      "[%0], [%1], %2, [%3], %4;" ::"r"(SmemAddr(dst)),
      "l"(src), "r"(bytes), "r"(SmemAddr(bar)), "l"(policy)
      : "memory");
}

}  // namespace cuda
}  // namespace moefuse

#endif  // MOEFUSE_SM90A
