// AVX-512 build of the inner loops (compiled with -mavx512f -mfma; only called when the CPU
// reports AVX-512F).
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "cpu_kernels.h"

#if defined(MOEFUSE_HAVE_AVX512)
#include <immintrin.h>

namespace moefuse {
namespace cpu {
namespace {

#include "cpu_kernels_x86.h"

struct V {
  using T = __m512;
  static constexpr int W = 16;
  static constexpr int MR = 6;  // 6 rows x 4 vectors = 24 accumulators of 32 registers
  static constexpr int NV = 4;
  static T Zero() { return _mm512_setzero_ps(); }
  static T Set1(float v) { return _mm512_set1_ps(v); }
  static T Load(const float* p) { return _mm512_loadu_ps(p); }
  static T LoadA(const float* p) { return _mm512_load_ps(p); }
  static T LoadF16A(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static T LoadBF16A(const uint16_t* p) {  // bfloat16 is the upper half of a float32
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static T LoadF16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static T LoadBF16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static void Store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static void StoreA(float* p, T v) { _mm512_store_ps(p, v); }
  static T Add(T a, T b) { return _mm512_add_ps(a, b); }
  static T Sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T Mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T Div(T a, T b) { return _mm512_div_ps(a, b); }
  static T Fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T Fnma(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }
  static T Round(T x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // vminps/vmaxps return their second operand when either is NaN.
  static T MinKeepNan(T x, T l) { return _mm512_min_ps(l, x); }
  static T MaxKeepNan(T x, T l) { return _mm512_max_ps(l, x); }
  static float ReduceAdd(T v) { return SumLanes<V>(v); }
  static T Exp(T x) {
    // Clamping keeps r finite for +-inf inputs (cpu_kernels_x86.h); scalef then overflows to
    // +inf or underflows to 0. NaN passes through the clamps.
    x = MinKeepNan(MaxKeepNan(x, Set1(-104.0f)), Set1(89.0f));
    const ExpParts<V> e = ExpSplit<V>(x);
    return _mm512_scalef_ps(e.p, e.n);
  }
};

#include "cpu_kernels_impl.h"

const Kernels kTable = {"avx512", &TileImpl<V>, &DotImpl<V>, &ActivateImpl<V>, &DotHalfImpl<V>, &WidenImpl<V>, true};

}  // namespace

const Kernels* Avx512Kernels() { return &kTable; }

}  // namespace cpu
}  // namespace moefuse

#else

namespace moefuse {
namespace cpu {
const Kernels* Avx512Kernels() { return nullptr; }
}  // namespace cpu
}  // namespace moefuse

#endif
