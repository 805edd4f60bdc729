// Device helpers shared by the moefuse CUDA kernels.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace moefuse {
namespace cuda {

// Element type <-> DType.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr DType kType = DType::kF32;
};
template <>
struct Elem<__half> {
  static constexpr DType kType = DType::kF16;
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr DType kType = DType::kBF16;
};

__device__ __forceinline__ float ToF(float v) { return v; }
__device__ __forceinline__ float ToF(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToF(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromF(float v);
template <>
__device__ __forceinline__ float FromF<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half FromF<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromF<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Element i of a tensor of run-time type t, as float32.
__device__ __forceinline__ float LoadF(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ float Sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// act(v) of the spec. NaN propagates (relu of NaN is NaN, as numpy's maximum).
__device__ __forceinline__ float Act(float v, const ActParams& a) {
  switch (a.kind) {
    case 0:
      return v * Sigmoid(a.alpha == 1.0f ? v : a.alpha * v);
    case 1:
      return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case 2: {
      const float c = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v)));
    }
    case 3:
      return v < 0.0f ? 0.0f : v;
    default:
      return v;
  }
}

// Gated expert activation: clamp (when set), up offset, act(gate) * up.
__device__ __forceinline__ float Glu(float g, float u, const ActParams& a) {
  if (a.clamp_limit > 0.0f) {
    const float l = a.clamp_limit;
    g = g > l ? l : g;
    u = u > l ? l : (u < -l ? -l : u);
  }
  return Act(g, a) * (u + a.up_offset);
}

// Epilogue activations as types, with hardware exp and approximate reciprocal (the results are
// rounded to 16 bits; a few float32 ulps apart from Act / Glu, NaN and infinities behave the same).
// Tensor-core epilogues unroll over a thread's whole accumulator tile. A per-element switch over
// the kinds put every kind's code into each unrolled step, so the executed epilogue was strewn over
// about 87 KB of code for one 128 x 256 tile, beyond the instruction cache.
// WithEpilogueOps picks one type from the launch-uniform parameters: the unrolled body holds one kind.
__device__ __forceinline__ float FastRcp(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ float FastExp2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ float FastSigmoid(float x) {
  return FastRcp(1.0f + FastExp2(x * -1.4426950408889634f));
}

struct IdentityFast {
  __device__ __forceinline__ float operator()(float v) const { return v; }
};

struct SiluFast {  // alpha * v is v exactly when alpha == 1
  float alpha;
  __device__ __forceinline__ float operator()(float v) const { return v * FastSigmoid(alpha * v); }
};

struct GeluTanhFast {  // 0.5 (1 + tanh(z)) = sigmoid(2z)
  __device__ __forceinline__ float operator()(float v) const {
    return v * FastSigmoid(1.5957691216057308f * (v + 0.044715f * v * v * v));
  }
};

struct AnyActFast {  // the kinds without a type of their own (WithEpilogueOps), by a switch
  ActParams a;
  __device__ __forceinline__ float operator()(float v) const {
    switch (a.kind) {
      case 1:
        return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
      case 3:
        return v < 0.0f ? 0.0f : v;
      default:
        return v;
    }
  }
};

// Gated expert activation: clamp (the limit is +inf when off; the comparisons keep NaN, as numpy's
// clip does), act(gate) * (up + offset).
template <typename Act>
struct GluFast {
  Act act;
  float limit, up_offset;
  __device__ __forceinline__ float operator()(float g, float u) const {
    g = g > limit ? limit : g;
    u = u > limit ? limit : u;
    u = u < -limit ? -limit : u;
    return act(g) * (u + up_offset);
  }
};

template <typename Act>
__device__ __forceinline__ GluFast<Act> MakeGluFast(Act act, const ActParams& a) {
  return GluFast<Act>{act, a.clamp_limit > 0.0f ? a.clamp_limit : __int_as_float(0x7f800000), a.up_offset};
}

// f(activation, has_bias) as compile-time types: the activation is identity when !on, else the
// kind of a; has_bias is std::true_type when bias (always for the rarer kinds).
template <typename F>
__device__ __forceinline__ void WithEpilogueOps(const ActParams& a, bool on, bool bias, F&& f) {
  auto with_bias = [&](auto act) {
    if (bias) f(act, std::true_type{});
    else f(act, std::false_type{});
  };
  if (!on) with_bias(IdentityFast{});
  else if (a.kind == 0) with_bias(SiluFast{a.alpha});
  else if (a.kind == 2) with_bias(GeluTanhFast{});
  else f(AnyActFast{a}, std::true_type{});
}

// Ranking of (value, index) pairs as numpy's stable argsort of -values: larger first, NaN last,
// equal values by lower index.
__device__ __forceinline__ bool Better(float va, int ia, float vb, int ib) {
  const bool na = va != va, nb = vb != vb;
  if (na || nb) return (na && nb) ? ia < ib : nb;
  return va > vb || (va == vb && ia < ib);
}

__device__ __forceinline__ float NanMax(float a, float b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpNanMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = NanMax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A key that orders choice values as Better() does: larger is better, NaN ranks below every
// number (key 1), and -0 equals +0. Key 0 is left for "no candidate".
__device__ __forceinline__ unsigned OrderKey(float v) {
  if (v != v) return 1u;
  const unsigned b = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // -inf: 0x007fffff
}

// Warp-wide max (kMax) or min of a 32-bit integer (sm_80 reductions, shuffles before).
template <bool kMax, typename V>
__device__ __forceinline__ V WarpExtreme(V v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kMax) return __reduce_max_sync(0xffffffffu, v);
  else return __reduce_min_sync(0xffffffffu, v);
#else
  for (int o = 16; o > 0; o >>= 1) {
    const V w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? max(v, w) : min(v, w);
  }
  return v;
#endif
}

// Warp-wide best (value, index) under Better(); index INT32_MAX marks "none".
__device__ __forceinline__ void WarpBest(float& v, int& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (oi != INT32_MAX && (i == INT32_MAX || Better(ov, oi, v, i))) {
      v = ov;
      i = oi;
    }
  }
}

// Sum over the block (all threads get it); smem holds 32 floats.
__device__ inline float BlockSum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = WarpSum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float s = 0.0f;
  for (int w = 0; w < nw; ++w) s += smem[w];
  return s;
}

// The shared expert's gate of one token: sigmoid(x . gate) over its row's D values. Blocks of one
// size sum in one order (the combine's and the one-token decode's: 256 threads).
template <typename T>
__device__ inline float SharedGate(const T* x, const void* gate, int D, float* smem) {
  float s = 0.0f;
  for (int d = threadIdx.x; d < D; d += blockDim.x)
    s += ToF(x[d]) * ToF(static_cast<const T*>(gate)[d]);
  return Sigmoid(BlockSum(s, smem));
}

// Programmatic dependent launch: wait for the previous kernel's results / let the next start.
__device__ __forceinline__ void GridDepWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void GridDepLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Counters between the CTAs of running kernels (a producer's finished work, a consumer's wait).
__device__ __forceinline__ int LoadAcquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Adds v with release semantics (the block's writes before its barrier are visible first), without
// waiting for the result.
__device__ __forceinline__ void RedRelease(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Launch with the programmatic-stream-serialization attribute when enabled (launch.cu).
bool UsePdl();

// Blocks in clusters of cluster_x along x (a launch's, or an occupancy query's, attribute).
inline cudaLaunchAttribute ClusterAttribute(unsigned cluster_x) {
  cudaLaunchAttribute a = {};
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = cluster_x;
  a.val.clusterDim.y = 1;
  a.val.clusterDim.z = 1;
  return a;
}

// LaunchOnClusters: blocks in clusters of cluster_x along x (grid.x a multiple of it).
template <typename Kernel, typename... Args>
cudaError_t LaunchOnClusters(unsigned cluster_x, Kernel kernel, dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (UsePdl()) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_x > 1) attr[n++] = ClusterAttribute(cluster_x);
  cfg.attrs = n ? attr : nullptr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

template <typename Kernel, typename... Args>
cudaError_t Launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args... args) {
  return LaunchOnClusters(1, kernel, grid, block, smem, stream, args...);
}

__host__ __device__ inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether the current device runs `kernel`'s sm_90a machine code rather than a stand-in compiled
// for another architecture. The code the driver compiles from a build's compute_80 PTX reports the
// device's own binaryVersion (90 on a Hopper GPU running a build without sm_90a), so the PTX
// version it came from must be 90 too.
template <typename Kernel>
bool RunsSm90aCode(Kernel kernel) {
  cudaFuncAttributes a;
  return cudaFuncGetAttributes(&a, kernel) == cudaSuccess && a.binaryVersion == 90 && a.ptxVersion == 90;
}

// --- tensor-core and shared-memory primitives (sm_80+) -------------------------------------------

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, zero-filled when src_bytes == 0.
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(SmemAddr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// c (16 x 8, float32) += a (16 x 16) . b (16 x 8) in mma.sync's fragment layout: lane (g, t) =
// (lane / 4, lane % 4) holds a's rows g and g + 8 at k = 2t, 2t + 1 (a0: row g, a1: row g + 8) and
// k + 8 (a2, a3), b's column g at k = 2t, 2t + 1 (b0) and k + 8 (b1), c's rows g (c[0..1]) and
// g + 8 (c[2..3]) at columns 2t and 2t + 1.
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

// --- expert weights and the m-tile schedule ------------------------------------------------------

// Row of unit u of expert e's gate (or only) projection, or of its up projection (FirstProj), in a
// matrix of rows of D values.
template <typename T>
__device__ __forceinline__ const T* FirstProjRow(const FirstProj& w, int64_t D, int e, int64_t u, bool up) {
  if (up) return static_cast<const T*>(w.up) + (w.up_row0 + e * w.up_rpe + u * w.up_rpu) * D;
  return static_cast<const T*>(w.gate) + (w.gate_row0 + e * w.gate_rpe + u * w.gate_rpu) * D;
}

// m-tile mt of bm rows -> (group, first sorted row, rows); false when past the last tile.
__device__ __forceinline__ bool MTile(const Groups& g, int mt, int bm, int* e, int* r0, int* rows) {
  if (g.dense_rows >= 0) {
    if (mt * bm >= g.dense_rows) return false;
    *e = 0;
    *r0 = mt * bm;
    *rows = min(bm, g.dense_rows - mt * bm);
    return true;
  }
  if (mt >= g.tile_prefix[g.num_groups]) return false;
  const int4 info = g.mtiles[mt];
  *e = info.x;
  *r0 = info.y;
  *rows = info.z;
  return true;
}

// Lets `kernel` use `bytes` of dynamic shared memory on the current device. The attribute is a
// device's: set once per device (the first 64), for each kernel its own `devices_done` mask.
template <typename Kernel>
cudaError_t AllowDynamicSmem(Kernel kernel, int bytes, std::atomic<uint64_t>& devices_done) {
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device)) return e;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit & devices_done.load(std::memory_order_relaxed)) return cudaSuccess;
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)) return e;
  devices_done.fetch_or(bit, std::memory_order_relaxed);
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace moefuse
