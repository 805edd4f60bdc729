// Per-block timestamps of the one-token decode kernels, to find where a short call's time goes
// (docs/performance.md, "H100, 2026-12-06 (routing cost)"). Compiled in only with the CMake option
// MOEFUSE_CUDA_TRACE; without it every call here is empty and the kernels' code is unchanged.
// The stamps of each kernel's first 1024 blocks in the last call stay in device memory, and
// benchmarks/gpu_trace.py reads them through the library's moefuse_trace_read (skinny.cu).
#pragma once

namespace moefuse {
namespace cuda {
namespace trace {

// A block's stamps: the SM, %globaltimer (ns) at its start and end, %clock64 at the others.
// Projection 2 passes griddepcontrol without waiting (its wait for projection 1 is within
// kRouted..kMultiplied).
enum Slot {
  kSm = 0,
  kStartNs = 1,
  kStart = 2,       // the block's first instruction
  kToken = 3,       // the token's softmax statistics taken (RouteTokenByRank)
  kKeys = 4,        // each expert's key written, after the barrier
  kRanked = 5,      // the picks ranked, after the barrier
  kWaited = 6,      // past griddepcontrol
  kRouting = 7,     // the routing starts (parameters read, the row copy issued, logits staged)
  kRouted = 8,      // the routing done: the weight loads follow
  kMultiplied = 9,  // the weights loaded and multiplied (projection 2: also H waited for)
  kEnd = 10,
  kEndNs = 11,
  kSlots = 12
};
constexpr int kKernels = 2;  // the one-token projection 1, projection 2
constexpr int kBlocks = 1024;

#ifdef MOEFUSE_CUDA_TRACE
// The last call's stamps of each kernel's first kBlocks blocks: one copy per source file; the
// one-token kernels and moefuse_trace_read are skinny.cu's.
static __device__ unsigned long long g_stamps[kKernels][kBlocks][kSlots];

// Thread 0 of a block writes each stamp as it is taken (a register array of stamps, held across
// the kernel, made projection 2 spill).
struct Stamps {
  unsigned long long* row = nullptr;
  __device__ __forceinline__ Stamps(int kernel, int block) {
    if (threadIdx.x == 0 && block < kBlocks) row = g_stamps[kernel][block];
  }
  __device__ __forceinline__ void Start() {
    if (!row) return;
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    row[kStartNs] = ns;
    row[kStart] = clock64();
  }
  __device__ __forceinline__ void At(Slot s) {
    if (row) row[s] = clock64();
  }
  __device__ __forceinline__ void End() {
    if (!row) return;
    row[kEnd] = clock64();
    unsigned long long ns;
    unsigned sm;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    row[kEndNs] = ns;
    row[kSm] = sm;
  }
};
#else
struct Stamps {
  __device__ __forceinline__ Stamps(int, int) {}
  __device__ __forceinline__ void Start() {}
  __device__ __forceinline__ void At(Slot) {}
  __device__ __forceinline__ void End() {}
};
#endif

}  // namespace trace
}  // namespace cuda
}  // namespace moefuse
