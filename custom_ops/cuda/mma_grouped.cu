// A grouped GEMM for GPUs that do not run the Hopper kernels: Ampere and Ada (the sm_80 code), and
// GPUs newer than the build (the driver compiles its compute_80 PTX). Meant for the calls with many
// rows per expert (prefill, the shared expert of long calls), which the skinny path serves now by
// reading each weight again for every 32 rows of an expert. Opt-in (MOEFUSE_CUDA_PATH=mma) until it
// has run on a GPU; its layout is checked on the CPU (tests/test_mma_tile_layout.py).
//
// mma.sync m16n8k16 tiles of kBM sorted rows of one expert (the routing step's m-tile schedule,
// SortParams::bm = kBM) by kBN weight rows. Both operands are K-major (token rows, and weight rows
// in out_in form), so ldmatrix reads both without transposing. Token rows and weight rows stream
// into shared memory by cp.async through a ring of kStages k-blocks (rows past the tile's and k
// past K zero-filled). The layout (copies, swizzle, fragments, gated units) is mma_tile.h's.
#include <atomic>
#include <climits>
#include <type_traits>

#include "common.cuh"
#include "mma_tile.h"

namespace moefuse {
namespace cuda {
namespace {

using namespace mma_tile;

__device__ __forceinline__ void LdMatrixX4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");  // ordered after the barrier that publishes the stage
}

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

template <typename T>
__device__ __forceinline__ void StorePair(T* p, float a, float b) {
  if constexpr (std::is_same<T, __half>::value)
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
  else
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// acc += the tile's rows . its weight rows over K. arow[i] / brow[i]: the row (of the tile's
// rows, of its weight rows) of this thread's i-th 16-byte copy of each k-block (CopyRow), null for
// zeros; `any` is a valid address for the zero-filling copies.
template <typename T, int kBM>
__device__ __forceinline__ void MainLoop(uint8_t* smem, const T* const (&arow)[Cfg<kBM>::kACopies],
                                         const T* const (&brow)[Cfg<kBM>::kBCopies], const void* any,
                                         int K, float (&acc)[Cfg<kBM>::kMT][Cfg<kBM>::kNT][4]) {
  using C = Cfg<kBM>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, chunk = CopyChunk(threadIdx.x);
  const int nkb = (K + kBK - 1) / kBK;

  auto load = [&](int stage, int kb) {
    uint8_t* As = smem + stage * C::kStageBytes;
    uint8_t* Bs = As + kBM * kRowBytes;
    const int k = kb * kBK + chunk * 8;  // K % 8 == 0: a copy is whole or past K
#pragma unroll
    for (int i = 0; i < C::kACopies; ++i) {
      const bool in = arow[i] && k < K;
      CpAsync16(As + Swizzled(CopyRow(threadIdx.x, i), chunk), in ? arow[i] + k : any, in ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < C::kBCopies; ++i) {
      const bool in = brow[i] && k < K;
      CpAsync16(Bs + Swizzled(CopyRow(threadIdx.x, i), chunk), in ? brow[i] + k : any, in ? 16 : 0);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nkb) load(s, s);
    CpAsyncCommit();
  }
  for (int kb = 0; kb < nkb; ++kb) {
    CpAsyncWait<kStages - 2>();  // k-block kb has landed (this thread's copies)
    __syncthreads();             // ... everyone's; and every warp is done with k-block kb - 1's stage
    const int next = kb + kStages - 1;
    if (next < nkb) load(next % kStages, next);
    CpAsyncCommit();
    const uint32_t As = SmemAddr(smem + (kb % kStages) * C::kStageBytes);
    const uint32_t Bs = As + kBM * kRowBytes;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t a[C::kMT][4], b[C::kNT][2];
#pragma unroll
      for (int mi = 0; mi < C::kMT; ++mi) {
        const LdAddr at = ARows<kBM>(warp, lane, mi, kk);
        LdMatrixX4(As + Swizzled(at.row, at.chunk), a[mi]);
      }
#pragma unroll
      for (int nj = 0; nj < C::kNT; nj += 2) {
        const LdAddr at = BRows(warp, lane, nj, kk);
        uint32_t r[4];
        LdMatrixX4(Bs + Swizzled(at.row, at.chunk), r);
        b[nj][0] = r[0];
        b[nj][1] = r[1];
        b[nj + 1][0] = r[2];
        b[nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < C::kMT; ++mi)
#pragma unroll
        for (int nj = 0; nj < C::kNT; ++nj)
          Mma<T>(acc[mi][nj], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[nj][0], b[nj][1]);
    }
  }
}

// f(mi, h, r) for this thread's accumulator rows that exist: MMA row tile mi, rows g (h = 0, values
// 0 and 1 of each MMA) or g + 8 (h = 1, values 2 and 3); r is the sorted row.
template <int kBM, typename F>
__device__ __forceinline__ void ForEachRow(int r0, int rows, F&& f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int mi = 0; mi < Cfg<kBM>::kMT; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = AccRow<kBM>(warp, lane, mi, 2 * h);
      if (row < rows) f(mi, h, r0 + row);
    }
}

// A tile kernel's start: wait for the previous kernel's results (programmatic dependent launch),
// let the next kernel launch, find the block's m-tile (false past the schedule's last).
template <int kBM>
__device__ __forceinline__ bool StartTile(const Groups& g, int* e, int* r0, int* rows) {
  GridDepWait();
  GridDepLaunch();
  return MTile(g, blockIdx.x, kBM, e, r0, rows);
}

__device__ __forceinline__ uint8_t* RingSmem() {
  extern __shared__ __align__(128) uint8_t ring_smem[];
  return ring_smem;
}

// Weight row n (< kBN) of projection 1's block of units from u0: gated, 64 units' gate and up rows
// (GatedUnit); else 128 units. Null past I.
template <typename T>
__device__ __forceinline__ const T* FirstProjTileRow(const Gemm1Params& p, int e, int64_t u0, int n) {
  const bool gated = p.w.up != nullptr;
  const int64_t u = u0 + (gated ? GatedUnit(n) : n);
  if (u >= p.I) return nullptr;
  return FirstProjRow<T>(p.w, p.D, e, u, gated && GatedUp(n));
}

template <typename T, int kBM>
__global__ void __launch_bounds__(kThreads, 2) Gemm1Kernel(Gemm1Params p) {
  using C = Cfg<kBM>;
  int e, r0, rows;
  if (!StartTile<kBM>(p.g, &e, &r0, &rows)) return;
  uint8_t* const smem = RingSmem();
  const bool gated = p.w.up != nullptr;
  const int64_t u0 = static_cast<int64_t>(blockIdx.y) * (gated ? kBN / 2 : kBN);
  const T* A = static_cast<const T*>(p.A);
  const T* arow[C::kACopies];
  const T* brow[C::kBCopies];
#pragma unroll
  for (int i = 0; i < C::kACopies; ++i) {
    const int row = CopyRow(threadIdx.x, i), r = r0 + row;
    arow[i] = row < rows ? A + static_cast<int64_t>(p.row_map ? p.row_map[r] : r) * p.D : nullptr;
  }
#pragma unroll
  for (int i = 0; i < C::kBCopies; ++i) brow[i] = FirstProjTileRow<T>(p, e, u0, CopyRow(threadIdx.x, i));
  float acc[C::kMT][C::kNT][4] = {};
  MainLoop<T, kBM>(smem, arow, brow, A, p.D, acc);

  // epilogue: routing weight on the input, biases, activation (gated: act(gate) * up) into H
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, I = p.I;
  T* H = static_cast<T*>(p.H);
  const DType bt = Elem<T>::kType;
  WithEpilogueOps(p.act, true, p.w.bg || p.w.bu, [&](auto act, auto has_bias) {
    constexpr bool kBias = decltype(has_bias)::value;
    auto bias = [&](const void* b, int64_t off, int64_t es, int64_t us, int64_t u) {
      return kBias && b ? LoadF(b, off + e * es + u * us, bt) : 0.0f;
    };
    if (gated) {
      const auto glu = MakeGluFast(act, p.act);
#pragma unroll
      for (int j = 0; j < C::kNT / 2; ++j) {  // column tiles 2j (gate) and 2j + 1 (up)
        const int64_t u = u0 + GatedUnit(AccCol(warp, lane, 2 * j, 0));
        if (u >= I) continue;  // I % 8 == 0: u + 1 < I too
        const float bg0 = bias(p.w.bg, p.w.bg_off, p.w.bg_es, p.w.bg_us, u);
        const float bg1 = bias(p.w.bg, p.w.bg_off, p.w.bg_es, p.w.bg_us, u + 1);
        const float bu0 = bias(p.w.bu, p.w.bu_off, p.w.bu_es, p.w.bu_us, u);
        const float bu1 = bias(p.w.bu, p.w.bu_off, p.w.bu_es, p.w.bu_us, u + 1);
        ForEachRow<kBM>(r0, rows, [&](int mi, int h, int r) {
          const float sc = p.row_scale ? p.row_scale[r] : 1.0f;
          const float* gv = acc[mi][2 * j] + 2 * h;
          const float* uv = acc[mi][2 * j + 1] + 2 * h;
          StorePair(H + static_cast<int64_t>(r) * I + u, glu(gv[0] * sc + bg0, uv[0] * sc + bu0),
                    glu(gv[1] * sc + bg1, uv[1] * sc + bu1));
        });
      }
    } else {
#pragma unroll
      for (int j = 0; j < C::kNT; ++j) {
        const int64_t u = u0 + AccCol(warp, lane, j, 0);
        if (u >= I) continue;
        const float b0 = bias(p.w.bg, p.w.bg_off, p.w.bg_es, p.w.bg_us, u);
        const float b1 = bias(p.w.bg, p.w.bg_off, p.w.bg_es, p.w.bg_us, u + 1);
        ForEachRow<kBM>(r0, rows, [&](int mi, int h, int r) {
          const float sc = p.row_scale ? p.row_scale[r] : 1.0f;
          const float* v = acc[mi][j] + 2 * h;
          StorePair(H + static_cast<int64_t>(r) * I + u, act(v[0] * sc + b0), act(v[1] * sc + b1));
        });
      }
    }
  });
}

template <typename T, int kBM>
__global__ void __launch_bounds__(kThreads, 2) Gemm2Kernel(Gemm2Params p) {
  using C = Cfg<kBM>;
  int e, r0, rows;
  if (!StartTile<kBM>(p.g, &e, &r0, &rows)) return;
  uint8_t* const smem = RingSmem();
  const int D = p.D, I = p.I;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const T* H = static_cast<const T*>(p.H);
  const T* w2 = static_cast<const T*>(p.w2);
  const T* arow[C::kACopies];
  const T* brow[C::kBCopies];
#pragma unroll
  for (int i = 0; i < C::kACopies; ++i) {
    const int row = CopyRow(threadIdx.x, i);
    arow[i] = row < rows ? H + static_cast<int64_t>(r0 + row) * I : nullptr;
  }
#pragma unroll
  for (int i = 0; i < C::kBCopies; ++i) {
    const int64_t d = d0 + CopyRow(threadIdx.x, i);
    brow[i] = d < D ? w2 + (static_cast<int64_t>(e) * D + d) * I : nullptr;
  }
  float acc[C::kMT][C::kNT][4] = {};
  MainLoop<T, kBM>(smem, arow, brow, H, I, acc);

  // epilogue: bias into the pair's output row (float32 for the combine, or dtype)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const DType bt = Elem<T>::kType;
#pragma unroll
  for (int j = 0; j < C::kNT; ++j) {
    const int64_t d = d0 + AccCol(warp, lane, j, 0);
    if (d >= D) continue;  // D % 8 == 0: d + 1 < D too
    const float b0 = p.b2 ? LoadF(p.b2, e * static_cast<int64_t>(D) + d, bt) : 0.0f;
    const float b1 = p.b2 ? LoadF(p.b2, e * static_cast<int64_t>(D) + d + 1, bt) : 0.0f;
    ForEachRow<kBM>(r0, rows, [&](int mi, int h, int r) {
      const int64_t at = static_cast<int64_t>(r) * D + d;
      const float* v = acc[mi][j] + 2 * h;
      if (p.out_f32)
        *reinterpret_cast<float2*>(static_cast<float*>(p.out) + at) = make_float2(v[0] + b0, v[1] + b1);
      else
        StorePair(static_cast<T*>(p.out) + at, v[0] + b0, v[1] + b1);
    });
  }
}

// m-tiles of a launch: the dense group's, else the schedule's bound (blocks past its last tile
// return at once).
int64_t MTiles(const Groups& g, int bm) { return g.dense_rows >= 0 ? CeilDiv(g.dense_rows, bm) : g.max_tiles; }

template <typename Params>
cudaError_t LaunchTiles(void (*kernel)(Params), int smem, std::atomic<uint64_t>& smem_set, int64_t mtiles,
                        int64_t ntiles, const Params& p, cudaStream_t stream) {
  if (mtiles <= 0 || ntiles <= 0) return cudaSuccess;
  if (mtiles > INT_MAX || ntiles > 65535) return cudaErrorInvalidConfiguration;
  if (cudaError_t e = AllowDynamicSmem(kernel, smem, smem_set)) return e;
  return Launch(kernel, dim3(static_cast<unsigned>(mtiles), static_cast<unsigned>(ntiles)), dim3(kThreads),
                static_cast<size_t>(smem), stream, p);
}

template <typename T, int kBM>
cudaError_t Gemm1T(const Gemm1Params& p, cudaStream_t stream) {
  static std::atomic<uint64_t> smem_set{0};
  return LaunchTiles(Gemm1Kernel<T, kBM>, Cfg<kBM>::kSmem, smem_set, MTiles(p.g, kBM),
                     CeilDiv(p.I, p.w.up ? kBN / 2 : kBN), p, stream);
}

template <typename T, int kBM>
cudaError_t Gemm2T(const Gemm2Params& p, cudaStream_t stream) {
  static std::atomic<uint64_t> smem_set{0};
  return LaunchTiles(Gemm2Kernel<T, kBM>, Cfg<kBM>::kSmem, smem_set, MTiles(p.g, kBM), CeilDiv(p.D, kBN), p,
                     stream);
}

// The m-tile rows of a launch: the routing step's schedule's (Groups::tile_rows), or for the dense
// group (the shared expert) the smaller tile that holds it.
int TileRows(const Groups& g) {
  if (g.dense_rows >= 0) return MmaTileRows(g.dense_rows);
  return g.tile_rows;
}

// f(type tag, m-tile rows tag) for the launch's 16-bit type and m-tile rows.
template <typename F>
cudaError_t ByTypeAndTileRows(DType t, const Groups& g, F&& f) {
  auto rows = [&](auto one) -> cudaError_t {
    switch (TileRows(g)) {
      case 64:
        return f(one, std::integral_constant<int, 64>{});
      case 128:
        return f(one, std::integral_constant<int, 128>{});
      default:
        return cudaErrorInvalidValue;
    }
  };
  switch (t) {
    case DType::kF16:
      return rows(__half{});
    case DType::kBF16:
      return rows(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;  // 16-bit types only (float32 takes the SIMT path)
  }
}

}  // namespace

int MmaTileRows(int64_t rows_per_expert) { return rows_per_expert <= 64 ? 64 : 128; }

cudaError_t LaunchMmaGemm1(const Gemm1Params& p, cudaStream_t stream) {
  return ByTypeAndTileRows(p.dtype, p.g, [&](auto one, auto bm) {
    return Gemm1T<decltype(one), decltype(bm)::value>(p, stream);
  });
}

cudaError_t LaunchMmaGemm2(const Gemm2Params& p, cudaStream_t stream) {
  return ByTypeAndTileRows(p.dtype, p.g, [&](auto one, auto bm) {
    return Gemm2T<decltype(one), decltype(bm)::value>(p, stream);
  });
}

}  // namespace cuda
}  // namespace moefuse
