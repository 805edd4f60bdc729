// The portable path: grouped GEMMs on CUDA cores with float32 accumulation, for float32 models,
// sizes the tensor-core paths do not take (hidden or intermediate size not a multiple of 8) and
// GPUs older than sm_80. Tiles of 64 sorted rows x 64 columns over the m-tile schedule of the
// routing step (SortParams::bm = 64); gated tiles hold 32 units (columns 0-31 gate, 32-63 up).
#include "common.cuh"

namespace moefuse {
namespace cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

// acc[i][j] += the kBK-long products of the staged tiles: rows ty + 16 i of As, columns
// tx + 16 j of Ws.
__device__ __forceinline__ void TileMma(const float (&As)[kBK][kBM + 1], const float (&Ws)[kBK][kBN + 1],
                                        int ty, int tx, float (&acc)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < kBK; ++kk) {
    float a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = Ws[kk][tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) Gemm1Kernel(Gemm1Params p) {
  GridDepWait();
  GridDepLaunch();
  __shared__ float As[kBK][kBM + 1];
  __shared__ float Ws[kBK][kBN + 1];
  __shared__ int src_row[kBM];
  int e, r0, rows;
  if (!MTile(p.g, blockIdx.x, kBM, &e, &r0, &rows)) return;
  const int D = p.D, I = p.I;
  const bool gated = p.w.up != nullptr;
  const int units = gated ? kBN / 2 : kBN;
  const int u0 = blockIdx.y * units;
  if (u0 >= I) return;
  const T* A = static_cast<const T*>(p.A);
  const T* gate = static_cast<const T*>(p.w.gate);
  const T* up = static_cast<const T*>(p.w.up);
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  for (int i = tid; i < kBM; i += kThreads) {
    const int r = r0 + i;
    src_row[i] = i < rows ? (p.row_map ? p.row_map[r] : r) : -1;
  }
  __syncthreads();
  float acc[4][4] = {};
  for (int k0 = 0; k0 < D; k0 += kBK) {
    for (int i = tid; i < kBM * kBK; i += kThreads) {
      const int row = i / kBK, kk = i % kBK, k = k0 + kk;
      const int src = src_row[row];
      As[kk][row] = (src >= 0 && k < D) ? ToF(A[static_cast<int64_t>(src) * D + k]) : 0.0f;
      // weight row `row` of the tile
      float w = 0.0f;
      const int col = row;
      int u;
      const T* base;
      int64_t r0w, rpe, rpu;
      if (gated && col >= units) {
        u = u0 + col - units;
        base = up;
        r0w = p.w.up_row0;
        rpe = p.w.up_rpe;
        rpu = p.w.up_rpu;
      } else {
        u = u0 + col;
        base = gate;
        r0w = p.w.gate_row0;
        rpe = p.w.gate_rpe;
        rpu = p.w.gate_rpu;
      }
      if (u < I && k < D) w = ToF(base[(r0w + e * rpe + u * rpu) * D + k]);
      Ws[kk][col] = w;
    }
    __syncthreads();
    TileMma(As, Ws, ty, tx, acc);
    __syncthreads();
  }
  T* H = static_cast<T*>(p.H);
  const DType bt = Elem<T>::kType;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = ty + 16 * i;
    if (row >= rows) continue;
    const int r = r0 + row;
    const float sc = p.row_scale ? p.row_scale[r] : 1.0f;
    T* hrow = H + static_cast<int64_t>(r) * I;
    if (gated) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int u = u0 + tx + 16 * j;
        if (u >= I) continue;
        float gv = acc[i][j] * sc, uv = acc[i][j + 2] * sc;
        if (p.w.bg) gv += LoadF(p.w.bg, p.w.bg_off + e * p.w.bg_es + u * p.w.bg_us, bt);
        if (p.w.bu) uv += LoadF(p.w.bu, p.w.bu_off + e * p.w.bu_es + u * p.w.bu_us, bt);
        hrow[u] = FromF<T>(Glu(gv, uv, p.act));
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int u = u0 + tx + 16 * j;
        if (u >= I) continue;
        float x = acc[i][j] * sc;
        if (p.w.bg) x += LoadF(p.w.bg, p.w.bg_off + e * p.w.bg_es + u * p.w.bg_us, bt);
        hrow[u] = FromF<T>(Act(x, p.act));
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) Gemm2Kernel(Gemm2Params p) {
  GridDepWait();
  GridDepLaunch();
  __shared__ float As[kBK][kBM + 1];
  __shared__ float Ws[kBK][kBN + 1];
  int e, r0, rows;
  if (!MTile(p.g, blockIdx.x, kBM, &e, &r0, &rows)) return;
  const int D = p.D, I = p.I;
  const int d0 = blockIdx.y * kBN;
  if (d0 >= D) return;
  const T* H = static_cast<const T*>(p.H);
  const T* w2 = static_cast<const T*>(p.w2) + static_cast<int64_t>(e) * D * I;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < I; k0 += kBK) {
    for (int i = tid; i < kBM * kBK; i += kThreads) {
      const int row = i / kBK, kk = i % kBK, k = k0 + kk;
      As[kk][row] = (row < rows && k < I) ? ToF(H[static_cast<int64_t>(r0 + row) * I + k]) : 0.0f;
      const int d = d0 + row;
      Ws[kk][row] = (d < D && k < I) ? ToF(w2[static_cast<int64_t>(d) * I + k]) : 0.0f;
    }
    __syncthreads();
    TileMma(As, Ws, ty, tx, acc);
    __syncthreads();
  }
  const DType bt = Elem<T>::kType;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = ty + 16 * i;
    if (row >= rows) continue;
    const int64_t r = r0 + row;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int d = d0 + tx + 16 * j;
      if (d >= D) continue;
      float v = acc[i][j];
      if (p.b2) v += LoadF(p.b2, static_cast<int64_t>(e) * D + d, bt);
      if (p.out_f32)
        static_cast<float*>(p.out)[r * D + d] = v;
      else
        static_cast<T*>(p.out)[r * D + d] = FromF<T>(v);
    }
  }
}

int64_t MTiles(const Groups& g) {
  return g.dense_rows >= 0 ? CeilDiv(g.dense_rows, kBM) : g.max_tiles;
}

template <typename T>
cudaError_t Gemm1T(const Gemm1Params& p, cudaStream_t stream) {
  const int units = p.w.up ? kBN / 2 : kBN;
  const int64_t mt = MTiles(p.g), nt = CeilDiv(p.I, units);
  if (mt <= 0 || nt <= 0) return cudaSuccess;
  return Launch(Gemm1Kernel<T>, dim3(static_cast<unsigned>(mt), static_cast<unsigned>(nt)),
                dim3(kThreads), 0, stream, p);
}

template <typename T>
cudaError_t Gemm2T(const Gemm2Params& p, cudaStream_t stream) {
  const int64_t mt = MTiles(p.g), nt = CeilDiv(p.D, kBN);
  if (mt <= 0 || nt <= 0) return cudaSuccess;
  return Launch(Gemm2Kernel<T>, dim3(static_cast<unsigned>(mt), static_cast<unsigned>(nt)),
                dim3(kThreads), 0, stream, p);
}

}  // namespace

cudaError_t LaunchSimtGemm1(const Gemm1Params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kF16:
      return Gemm1T<__half>(p, stream);
    case DType::kBF16:
      return Gemm1T<__nv_bfloat16>(p, stream);
    default:
      return Gemm1T<float>(p, stream);
  }
}

cudaError_t LaunchSimtGemm2(const Gemm2Params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kF16:
      return Gemm2T<__half>(p, stream);
    case DType::kBF16:
      return Gemm2T<__nv_bfloat16>(p, stream);
    default:
      return Gemm2T<float>(p, stream);
  }
}

}  // namespace cuda
}  // namespace moefuse
