// Combine (weighted sum of each token's expert outputs plus the shared expert), the direct path
// for small-intermediate experts, and the layout transpose used when weights are stored in_out.
#include <algorithm>

#include "common.cuh"

namespace moefuse {
namespace cuda {

namespace {
// Set by each call before its launches, all on the calling thread: per thread, so that calls on
// GPUs that differ (one running code without the waits) do not set it for each other.
thread_local bool g_use_pdl = false;
}  // namespace

bool UsePdl() { return g_use_pdl; }
void SetUsePdl(bool on) { g_use_pdl = on; }

namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float LoadAny(const void* p, int64_t i, bool f32) {
  return f32 ? static_cast<const float*>(p)[i] : ToF(static_cast<const T*>(p)[i]);
}

// 8 consecutive values (16- or 32-byte aligned) as float.
template <typename T>
__device__ __forceinline__ void Load8(const void* p, int64_t i, bool f32, float (&v)[8]) {
  if (f32) {
    const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    const float4 b = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else if constexpr (sizeof(T) == 2) {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const T*>(p) + i);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = ToF(h[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = ToF(static_cast<const T*>(p)[i + k]);
  }
}

// Adds w * x[d .. d + 8) for each of token t's picks of a zero expert (pairs without a row), after
// the experts' outputs, as the reference does (and outside the loop over the pairs, whose registers
// it would add to: inside, the 16-bit kernels spilled).
template <typename T>
__device__ __forceinline__ void AddZeroExperts8(const CombineParams& p, int t, int d, float* acc) {
  const int64_t row = static_cast<int64_t>(t) * p.K;
  float xv[8];
  Load8<T>(p.X, static_cast<int64_t>(t) * p.D + d, false, xv);
  for (int j = 0; j < p.K; ++j) {
    if (p.pair_pos[row + j] != kZeroExpertPick) continue;
    const float w = p.w[row + j];
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] += w * xv[k];
  }
}

// One block per token and 2048 columns; 8 consecutive columns per thread (16-byte accesses) when
// D is a multiple of 8, else columns strided by the block size.
template <typename T>
__global__ void __launch_bounds__(kThreads) CombineKernel(CombineParams p) {
  GridDepWait();
  GridDepLaunch();
  __shared__ float smem[32];
  const int t = blockIdx.x, D = p.D, K = p.K;
  const T* x = static_cast<const T*>(p.X) + static_cast<int64_t>(t) * D;
  float sg = 1.0f;
  if (p.shared && p.shared_gate) sg = SharedGate<T>(x, p.shared_gate, D, smem);
  T* y = static_cast<T*>(p.Y) + static_cast<int64_t>(t) * D;
  const int64_t row = static_cast<int64_t>(t) * K;
  if (D % 8 == 0) {
    const int d = (blockIdx.y * kThreads + threadIdx.x) * 8;
    if (d >= D) return;
    // The pairs' rows are fetched kChunk at a time (one round trip for their positions, one for
    // their rows) and summed in pair order, as the reference does.
    constexpr int kChunk = 4;
    float acc[8] = {};
    for (int j0 = 0; j0 < K; j0 += kChunk) {
      int pos[kChunk];
      float w[kChunk], v[kChunk][8];
#pragma unroll
      for (int q = 0; q < kChunk; ++q) {
        const int j = j0 + q;
        pos[q] = j < K ? p.pair_pos[row + j] : -1;
        w[q] = j < K && !p.weight_on_input ? p.w[row + j] : 1.0f;
      }
#pragma unroll
      for (int q = 0; q < kChunk; ++q)
        if (pos[q] >= 0) Load8<T>(p.ypair, static_cast<int64_t>(pos[q]) * D + d, p.ypair_f32, v[q]);
      for (int pl = 1; pl < p.ypair_planes; ++pl) {  // partial sums of a split K, in order
#pragma unroll
        for (int q = 0; q < kChunk; ++q) {
          if (pos[q] < 0) continue;
          float u[8];
          Load8<T>(p.ypair, pl * p.ypair_plane + static_cast<int64_t>(pos[q]) * D + d, true, u);
#pragma unroll
          for (int k = 0; k < 8; ++k) v[q][k] += u[k];
        }
      }
#pragma unroll
      for (int q = 0; q < kChunk; ++q)
        if (pos[q] >= 0)
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[k] += w[q] * v[q][k];
    }
    if (p.zero_experts) AddZeroExperts8<T>(p, t, d, acc);
    if (p.shared) {
      float z[8];
      Load8<T>(p.shared, static_cast<int64_t>(t) * D + d, p.shared_f32, z);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] += p.shared_gate ? z[k] * sg : z[k];
    }
    T out[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = FromF<T>(acc[k]);
    if constexpr (sizeof(T) == 2) {
      *reinterpret_cast<uint4*>(y + d) = *reinterpret_cast<const uint4*>(out);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) y[d + k] = out[k];
    }
    return;
  }
  const int d0 = blockIdx.y * kThreads * 8;
  for (int q = 0; q < 8; ++q) {
    const int d = d0 + q * kThreads + threadIdx.x;
    if (d >= D) continue;
    float acc = 0.0f;
    for (int j = 0; j < K; ++j) {
      const int pos = p.pair_pos[row + j];
      if (pos < 0) continue;
      float v = LoadAny<T>(p.ypair, static_cast<int64_t>(pos) * D + d, p.ypair_f32);
      for (int pl = 1; pl < p.ypair_planes; ++pl)
        v += LoadAny<T>(p.ypair, pl * p.ypair_plane + static_cast<int64_t>(pos) * D + d, true);
      acc += p.weight_on_input ? v : p.w[row + j] * v;
    }
    if (p.zero_experts) {  // the zero experts' picks (no row): w * x, after the experts' as the reference
      for (int j = 0; j < K; ++j)
        if (p.pair_pos[row + j] == kZeroExpertPick) acc += p.w[row + j] * ToF(x[d]);
    }
    if (p.shared) {
      const float z = LoadAny<T>(p.shared, static_cast<int64_t>(t) * D + d, p.shared_f32);
      acc += p.shared_gate ? z * sg : z;
    }
    y[d] = FromF<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) DirectKernel(DirectParams p) {
  GridDepWait();
  GridDepLaunch();
  extern __shared__ float dsm[];
  __shared__ float smem[32];
  const int t = blockIdx.x, D = p.D, I = p.I, K = p.K;
  const bool gated = p.w1.up != nullptr;
  const int rows1 = gated ? 2 * I : I;
  float* h = dsm;                     // [K][rows1]
  float* a = dsm + K * rows1;         // [K][I]
  const T* x = static_cast<const T*>(p.X) + static_cast<int64_t>(t) * D;
  const T* gate = static_cast<const T*>(p.w1.gate);
  const T* up = static_cast<const T*>(p.w1.up);
  const DType bt = Elem<T>::kType;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  // 1. first projection: K * rows1 dot products, one warp each
  for (int q = warp; q < K * rows1; q += nw) {
    const int j = q / rows1, r = q % rows1;
    const int64_t idx = static_cast<int64_t>(t) * K + j;
    const int e = p.ids[idx];
    float v = 0.0f;
    if (e >= 0) {
      const bool is_up = gated && r >= I;
      const int u = is_up ? r - I : r;
      const T* row = is_up ? up + (p.w1.up_row0 + e * p.w1.up_rpe + u * p.w1.up_rpu) * D
                           : gate + (p.w1.gate_row0 + e * p.w1.gate_rpe + u * p.w1.gate_rpu) * D;
      float s = 0.0f;
      for (int d = lane; d < D; d += 32) s += ToF(x[d]) * ToF(row[d]);
      v = WarpSum(s);
      if (p.weight_on_input) v *= p.w[idx];
      if (is_up) {
        if (p.w1.bu) v += LoadF(p.w1.bu, p.w1.bu_off + e * p.w1.bu_es + u * p.w1.bu_us, bt);
      } else {
        if (p.w1.bg) v += LoadF(p.w1.bg, p.w1.bg_off + e * p.w1.bg_es + u * p.w1.bg_us, bt);
      }
    }
    if (lane == 0) h[q] = v;
  }
  __syncthreads();
  // 2. activation
  for (int q = threadIdx.x; q < K * I; q += blockDim.x) {
    const int j = q / I, i = q % I;
    a[q] = gated ? Glu(h[j * rows1 + i], h[j * rows1 + I + i], p.act) : Act(h[j * rows1 + i], p.act);
  }
  __syncthreads();
  float sg = 1.0f;
  if (p.shared && p.shared_gate) sg = SharedGate<T>(x, p.shared_gate, D, smem);
  // 3. down projection and combine
  const T* w2 = static_cast<const T*>(p.w2);
  T* y = static_cast<T*>(p.Y) + static_cast<int64_t>(t) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < K; ++j) {
      const int64_t idx = static_cast<int64_t>(t) * K + j;
      const int e = p.ids[idx];
      if (e < 0) {
        if (e == kZeroExpertPick) acc += p.w[idx] * ToF(x[d]);  // a zero expert's pick
        continue;
      }
      const T* row = w2 + (static_cast<int64_t>(e) * D + d) * I;
      float o = 0.0f;
      for (int i = 0; i < I; ++i) o += a[j * I + i] * ToF(row[i]);
      if (p.b2) o += LoadF(p.b2, static_cast<int64_t>(e) * D + d, bt);
      acc += p.weight_on_input ? o : p.w[idx] * o;
    }
    if (p.shared) {
      const float z = LoadAny<T>(p.shared, static_cast<int64_t>(t) * D + d, p.shared_f32);
      acc += p.shared_gate ? z * sg : z;
    }
    y[d] = FromF<T>(acc);
  }
}

template <typename E>
__global__ void TransposeKernel(const E* src, E* dst, int64_t rows, int64_t cols) {
  __shared__ E tile[32][33];
  const int64_t b = blockIdx.z;
  const E* s = src + b * rows * cols;
  E* o = dst + b * rows * cols;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * 32, r0 = static_cast<int64_t>(blockIdx.y) * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = s[r * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (r < rows && c < cols) o[c * rows + r] = tile[threadIdx.x][i];
  }
}

// dst[r] = src[rows[r]] for r < min(n, *count), 16-byte chunks; a warp per row, each lane
// loading up to kBatch chunks before it stores any, so that a warp has up to 4 KB of its row in
// flight (all of a 2048-wide 16-bit row) rather than one 512-byte slice per round trip. Waits for
// the kernel that wrote `rows`.
__global__ void __launch_bounds__(kThreads) GatherRowsKernel(const uint4* __restrict__ src, const int* rows,
                                                             const int* count, int64_t n, int chunks,
                                                             uint4* __restrict__ dst) {
  GridDepWait();
  GridDepLaunch();
  constexpr int kBatch = 8;
  n = min(n, static_cast<int64_t>(*count));
  const int lane = threadIdx.x & 31;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5; r < n;
       r += static_cast<int64_t>(gridDim.x) * (kThreads / 32)) {
    const uint4* s = src + static_cast<int64_t>(rows[r]) * chunks;
    uint4* d = dst + r * chunks;
    for (int c0 = lane; c0 < chunks; c0 += 32 * kBatch) {
      uint4 v[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i)
        if (c0 + 32 * i < chunks) v[i] = s[c0 + 32 * i];
#pragma unroll
      for (int i = 0; i < kBatch; ++i)
        if (c0 + 32 * i < chunks) d[c0 + 32 * i] = v[i];
    }
  }
}

template <typename T>
cudaError_t CombineT(const CombineParams& p, cudaStream_t stream) {
  const unsigned gy = static_cast<unsigned>(CeilDiv(p.D, kThreads * 8));
  return Launch(CombineKernel<T>, dim3(static_cast<unsigned>(p.T), gy), dim3(kThreads), 0, stream, p);
}

template <typename T>
cudaError_t DirectT(const DirectParams& p, cudaStream_t stream) {
  const int rows1 = p.w1.up ? 2 * p.I : p.I;
  const size_t smem = static_cast<size_t>(p.K) * (rows1 + p.I) * sizeof(float);
  if (smem > 48 * 1024) {
    if (cudaError_t e = cudaFuncSetAttribute(DirectKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)))
      return e;
  }
  return Launch(DirectKernel<T>, dim3(static_cast<unsigned>(p.T)), dim3(kThreads), smem, stream, p);
}

}  // namespace

cudaError_t LaunchCombine(const CombineParams& p, cudaStream_t stream) {
  if (p.T <= 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kF16:
      return CombineT<__half>(p, stream);
    case DType::kBF16:
      return CombineT<__nv_bfloat16>(p, stream);
    default:
      return CombineT<float>(p, stream);
  }
}

cudaError_t LaunchDirect(const DirectParams& p, cudaStream_t stream) {
  if (p.T <= 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kF16:
      return DirectT<__half>(p, stream);
    case DType::kBF16:
      return DirectT<__nv_bfloat16>(p, stream);
    default:
      return DirectT<float>(p, stream);
  }
}

cudaError_t LaunchGatherRows(const void* src, const int* rows, const int* count, int64_t n, int64_t cols,
                             void* dst, int num_sms, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (cols % 8 != 0) return cudaErrorInvalidValue;
  const int64_t blocks = std::min<int64_t>(CeilDiv(n, kThreads / 32), 4 * static_cast<int64_t>(num_sms));
  return Launch(GatherRowsKernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream,
                static_cast<const uint4*>(src), rows, count, n, static_cast<int>(cols / 8),
                static_cast<uint4*>(dst));
}

cudaError_t LaunchTranspose(DType t, const void* src, void* dst, int64_t batch, int64_t rows,
                            int64_t cols, cudaStream_t stream) {
  if (batch <= 0 || rows <= 0 || cols <= 0) return cudaSuccess;
  constexpr int64_t kMaxGridZ = 65535;  // a launch's batches (experts) at most
  const dim3 block(32, 8);
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridZ) {
    const dim3 grid(static_cast<unsigned>(CeilDiv(cols, 32)), static_cast<unsigned>(CeilDiv(rows, 32)),
                    static_cast<unsigned>(std::min(kMaxGridZ, batch - b0)));
    const int64_t off = b0 * rows * cols;
    if (t == DType::kF32) {
      TransposeKernel<uint32_t><<<grid, block, 0, stream>>>(static_cast<const uint32_t*>(src) + off,
                                                            static_cast<uint32_t*>(dst) + off, rows, cols);
    } else {
      TransposeKernel<uint16_t><<<grid, block, 0, stream>>>(static_cast<const uint16_t*>(src) + off,
                                                            static_cast<uint16_t*>(dst) + off, rows, cols);
    }
    if (cudaError_t e = cudaGetLastError()) return e;
  }
  return cudaSuccess;
}

DeviceCode CurrentDeviceCode() {
  DeviceCode c;
  c.wgmma = WgmmaAvailable();
  c.fused_decode = SkinnyFusedAvailable();
  // Every kernel is compiled for the same architectures: one that waits (GridDepWait) tells for
  // all. Its PTX architecture is the one its code was compiled from: 80 where the driver compiled
  // the compute_80 PTX, whose waits are compiled out.
  cudaFuncAttributes a;
  const cudaError_t e = cudaFuncGetAttributes(&a, CombineKernel<__half>);
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // the failed query is not an error of the next call's
    return DeviceCode{};
  }
  c.runs = true;  // (another error is the GPU's own: the next launch reports it)
  c.pdl = e == cudaSuccess && a.ptxVersion >= 90;
  return c;
}

}  // namespace cuda
}  // namespace moefuse
