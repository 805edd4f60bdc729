// Portable build of the inner loops (GCC/Clang vector extensions at the baseline ISA) and the
// run-time choice between the builds.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <mutex>
#include <vector>

#include "cpu_kernels.h"
#include "half.h"

#if defined(MOEFUSE_HAVE_BLAS)
#include <cblas.h>  // scipy-openblas32's header: every symbol carries the scipy_ prefix
#endif

namespace moefuse {
namespace cpu {
namespace {

typedef float v4f __attribute__((vector_size(16)));

struct V {
  using T = v4f;
  static constexpr int W = 4;
  static constexpr int MR = 3;  // 3 rows x 4 vectors = 12 accumulators of 16 registers
  static constexpr int NV = 4;
  static T Zero() { return T{0.f, 0.f, 0.f, 0.f}; }
  static T Set1(float v) { return T{v, v, v, v}; }
  static T Load(const float* p) {
    T v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static T LoadA(const float* p) { return Load(p); }
  static T LoadF16A(const uint16_t* p) {
    return T{Fp16ToFloat(p[0]), Fp16ToFloat(p[1]), Fp16ToFloat(p[2]), Fp16ToFloat(p[3])};
  }
  static T LoadBF16A(const uint16_t* p) {
    return T{Bf16ToFloat(p[0]), Bf16ToFloat(p[1]), Bf16ToFloat(p[2]), Bf16ToFloat(p[3])};
  }
  static T LoadF16(const uint16_t* p) { return LoadF16A(p); }
  static T LoadBF16(const uint16_t* p) { return LoadBF16A(p); }
  static void Store(float* p, T v) { std::memcpy(p, &v, sizeof(v)); }
  static T Add(T a, T b) { return a + b; }
  static T Sub(T a, T b) { return a - b; }
  static T Mul(T a, T b) { return a * b; }
  static T Div(T a, T b) { return a / b; }
  static T Fma(T a, T b, T c) { return a * b + c; }
  static T MinKeepNan(T x, T l) { return x > l ? l : x; }
  static T MaxKeepNan(T x, T l) { return x < l ? l : x; }
  static float ReduceAdd(T v) { return ((v[0] + v[1]) + v[2]) + v[3]; }
  static T Exp(T x) { return T{std::exp(x[0]), std::exp(x[1]), std::exp(x[2]), std::exp(x[3])}; }
};

#include "cpu_kernels_impl.h"

const Kernels kTable = {"generic", &TileImpl<V>, &DotImpl<V>, &ActivateImpl<V>, &DotHalfImpl<V>, &WidenImpl<V>, true};

#if defined(MOEFUSE_HAVE_BLAS)
// The portable fallback for CPUs without AVX2: each tile job is one single-threaded BLAS sgemm
// (rows gathered into a contiguous block) followed by the same epilogue. OpenBLAS dispatches to
// the best kernels it has for the CPU (it also covers non-x86 machines).
void TileBlas(const TileJob& job) {
  thread_local std::vector<float> a, c;
  const int M = job.rows, K = job.K;
  a.resize(static_cast<size_t>(M) * K);
  c.resize(static_cast<size_t>(M) * kChunk);
  for (int r = 0; r < M; ++r) std::memcpy(a.data() + static_cast<size_t>(r) * K, job.a[r], sizeof(float) * K);
  const float* b = static_cast<const float*>(job.b);  // float32 chunks only (half_weights false)
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, kChunk, K, 1.0f, a.data(), K, b, kChunk,
                    0.0f, c.data(), kChunk);
  for (int r0 = 0; r0 < M; r0 += V::MR) {
    const int mr = M - r0 < V::MR ? M - r0 : V::MR;
    Epilogue<V>(job, c.data() + static_cast<size_t>(r0) * kChunk, mr, r0);
  }
}

const Kernels kBlasTable = {"blas", &TileBlas, &DotImpl<V>, &ActivateImpl<V>, &DotHalfImpl<V>, &WidenImpl<V>, false};

const Kernels* BlasTable() {
  // OpenBLAS threads would fight with onnxruntime's: jobs already run in parallel.
  static std::once_flag once;
  std::call_once(once, [] { scipy_openblas_set_num_threads(1); });
  return &kBlasTable;
}
#else
const Kernels* BlasTable() { return nullptr; }
#endif

const Kernels& Choose() {
  const Kernels* avx512 = Avx512Kernels();
  const Kernels* avx2 = Avx2Kernels();
  bool has512 = false, has2 = false;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  has512 = __builtin_cpu_supports("avx512f");
  has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  const Kernels* blas = BlasTable();
  if (const char* want = std::getenv("MOEFUSE_CPU_ISA")) {
    if (!std::strcmp(want, "generic")) return kTable;
    if (!std::strcmp(want, "blas") && blas) return *blas;
    if (!std::strcmp(want, "avx2") && avx2 && has2) return *avx2;
    if (!std::strcmp(want, "avx512") && avx512 && has512) return *avx512;
  }
  if (avx512 && has512) return *avx512;
  if (avx2 && has2) return *avx2;
  return blas ? *blas : kTable;
}

}  // namespace

const Kernels* GenericKernels() { return &kTable; }

const Kernels& Select() { return Choose(); }

bool PacksHalfWeights(const Kernels& k) {
  const char* v = std::getenv("MOEFUSE_CPU_WEIGHTS");
  return k.half_weights && !(v && !std::strcmp(v, "float32"));
}

}  // namespace cpu
}  // namespace moefuse
