// AVX2 + FMA build of the inner loops (compiled with -mavx2 -mfma -mf16c; only called when the
// CPU reports all three).
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "cpu_kernels.h"

#if defined(MOEFUSE_HAVE_AVX2)
#include <immintrin.h>

namespace moefuse {
namespace cpu {
namespace {

#include "cpu_kernels_x86.h"

struct V {
  using T = __m256;
  static constexpr int W = 8;
  static constexpr int MR = 6;  // 6 rows x 2 vectors = 12 accumulators of 16 registers
  static constexpr int NV = 2;
  static T Zero() { return _mm256_setzero_ps(); }
  static T Set1(float v) { return _mm256_set1_ps(v); }
  static T Load(const float* p) { return _mm256_loadu_ps(p); }
  static T LoadA(const float* p) { return _mm256_load_ps(p); }
  static T LoadF16A(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static T LoadBF16A(const uint16_t* p) {  // bfloat16 is the upper half of a float32
    const __m256i w = _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static T LoadF16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static T LoadBF16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static void Store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static void StoreA(float* p, T v) { _mm256_store_ps(p, v); }
  static T Add(T a, T b) { return _mm256_add_ps(a, b); }
  static T Sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T Mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T Div(T a, T b) { return _mm256_div_ps(a, b); }
  static T Fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T Fnma(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }
  static T Round(T x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static T MinKeepNan(T x, T l) { return _mm256_min_ps(l, x); }
  static T MaxKeepNan(T x, T l) { return _mm256_max_ps(l, x); }
  static float ReduceAdd(T v) { return SumLanes<V>(v); }
  static T Exp(T x) {
    // ExpSplit (cpu_kernels_x86.h) as in the AVX-512 version, but 2^n is built in the exponent
    // field, so n is kept within [-126, 127] and the overflow/underflow ends are patched afterwards.
    const T big = _mm256_cmp_ps(x, Set1(88.7228f), _CMP_GT_OQ);
    const T tiny = _mm256_cmp_ps(x, Set1(-87.33f), _CMP_LT_OQ);
    x = MinKeepNan(MaxKeepNan(x, Set1(-87.33f)), Set1(88.37f));
    const ExpParts<V> e = ExpSplit<V>(x);
    const __m256i bits =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(e.n), _mm256_set1_epi32(127)), 23);
    T out = _mm256_mul_ps(e.p, _mm256_castsi256_ps(bits));
    out = _mm256_blendv_ps(out, Set1(INFINITY), big);
    return _mm256_blendv_ps(out, Zero(), tiny);
  }
};

#include "cpu_kernels_impl.h"

const Kernels kTable = {"avx2", &TileImpl<V>, &DotImpl<V>, &ActivateImpl<V>, &DotHalfImpl<V>, &WidenImpl<V>, true};

}  // namespace

const Kernels* Avx2Kernels() { return &kTable; }

}  // namespace cpu
}  // namespace moefuse

#else

namespace moefuse {
namespace cpu {
const Kernels* Avx2Kernels() { return nullptr; }
}  // namespace cpu
}  // namespace moefuse

#endif
