// Inner loops of the CPU kernel, compiled once per x86 vector ISA (AVX-512, AVX2+FMA) plus a
// portable build, and picked at run time from what the CPU supports (MOEFUSE_CPU_ISA overrides).
//
// Weights are prepacked into column chunks of kChunk = 64 output columns: a chunk of a [K, N]
// projection is a contiguous, 64-byte aligned [K, 64] row-major block (zero padded), of float32,
// or of the model's own float16 / bfloat16 values (widened to float32 as they are loaded: the
// products are those of float32 weights, from half the bytes). A "tile job"
// multiplies rows of activations by one chunk and applies the epilogue (bias, activation, gating)
// on the way out, so every output element is produced by exactly one job with a fixed order of
// summation: results do not depend on the number of threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moefuse {
namespace cpu {

constexpr int kChunk = 64;      // output columns per packed chunk
constexpr int kGatedHalf = 32;  // gated chunks hold 32 gate columns then 32 up columns

enum ActKind : int { kActSilu = 0, kActGelu, kActGeluTanh, kActRelu, kActIdentity };

struct ActParams {
  int kind = kActSilu;
  float alpha = 1.0f;       // silu: v * sigmoid(alpha v)
  float clamp_limit = 0.f;  // gated: gate = min(gate, l), up = clip(up, -l, l) when > 0
  float up_offset = 0.f;    // gated: up + up_offset
};

// Element type of a packed weight chunk.
enum WeightType : int { kWeightF32 = 0, kWeightF16 = 1, kWeightBF16 = 2 };

inline int WeightBytes(int type) { return type == kWeightF32 ? 4 : 2; }

enum EpilogueKind : int {
  kEpiBias = 0,   // out = acc + bias                      (ncols valid columns)
  kEpiAct = 1,    // out = act(acc + bias)                 (64 columns)
  kEpiGated = 2,  // out = act(gate) * (up + off)          (32 columns)
};

struct TileJob {
  int rows = 0;                    // M
  int K = 0;                       // reduction length
  const float* const* a = nullptr; // M row pointers, each K contiguous floats
  const void* b = nullptr;         // packed chunk [K, 64] of b_type, 64-byte aligned
  int b_type = kWeightF32;
  const float* bias = nullptr;     // 64 floats in chunk column order, or null
  float* out = nullptr;            // row r written at out + r * ldo
  int64_t ldo = 0;
  int ncols = kChunk;              // kEpiBias: valid columns (<= 64)
  int epilogue = kEpiBias;
  ActParams act;
};

struct Kernels {
  const char* name;
  void (*tile)(const TileJob& job);
  float (*dot)(const float* a, const float* b, int64_t n);
  // Activation (no gating) on n values in place; used by the small-I direct path.
  void (*activate)(float* v, int64_t n, const ActParams& act);
  // The direct path's 16-bit rows (wtype float16 / bfloat16): dot(a, b) bit for bit that of b
  // widened to float32, and n values widened, exactly.
  float (*dot_half)(const float* a, const uint16_t* b, int wtype, int64_t n);
  void (*widen)(const uint16_t* src, int wtype, float* dst, int64_t n);
  bool half_weights;  // tile() takes float16 / bfloat16 chunks (else float32 only)
};

// The best kernels this CPU supports (or the ones MOEFUSE_CPU_ISA=avx512|avx2|generic asks for).
const Kernels& Select();

// Whether weights of 16-bit values stay 16-bit when packed for `k`: k reads them, and
// MOEFUSE_CPU_WEIGHTS=float32 does not ask for float32 packing.
bool PacksHalfWeights(const Kernels& k);

// Per-ISA tables (null when not compiled in).
const Kernels* GenericKernels();
const Kernels* Avx2Kernels();
const Kernels* Avx512Kernels();

}  // namespace cpu
}  // namespace moefuse
