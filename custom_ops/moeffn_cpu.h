// The MoEFFN kernel for onnxruntime's CPU execution provider.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "moeffn_attrs.h"
#include "moeffn_validate.h"
#include "ort_abi.h"

namespace moefuse {

// 64-byte (or, for large blocks, 2 MiB) aligned storage.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  ~AlignedBuffer();
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  void Reset(size_t bytes);  // contents are not kept
  template <class T>
  T* as() const { return static_cast<T*>(p_); }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Where the weights of one FFN come from (routed experts: E of them; shared expert: E = 1).
struct FFNSource {
  const void* w1 = nullptr;  // first projection (gate+up fused, gate, or fc1)
  const void* w3 = nullptr;  // up projection when stored apart
  const void* w2 = nullptr;
  const void* b1 = nullptr;
  const void* b2 = nullptr;
  const void* b3 = nullptr;
  int elem_type = 1;
  // float32 weights that all hold values of a 16-bit type (a float32 export of a bfloat16 or
  // float16 checkpoint): that type (cpu::WeightType), else kWeightF32
  int exact_16bit = cpu::kWeightF32;
  bool in_out = false;
  bool gated = true;
  GateUpLayout gate_up = GateUpLayout::kHalves;  // kSeparate when w3 is given
  int64_t E = 0, D = 0, I = 0;
};

// Geometry of the packed form of one FFN (see cpu_kernels.h for the chunk layout).
struct FFNGeometry {
  int64_t E = 0, D = 0, I = 0;
  bool gated = true;
  bool direct = false;  // small I: per-token dot products instead of GEMMs
  int64_t Ipad = 0;     // intermediate size padded to whole gated/plain chunks
  int64_t nc1 = 0;      // chunks of the first projection
  int64_t nc2 = 0;      // chunks of the down projection (over D)
  int64_t Dpad = 0;
  int64_t rows1 = 0;    // direct path: rows of w1 per expert (2I gated, I plain)
  bool has_b1 = false, has_b2 = false;
  int wtype = cpu::kWeightF32;  // elements of the packed w1 and w2 (biases are float32)

  // keep_half: pack float16 / bfloat16 weights in their own type, and float32 weights whose
  // values are all of a 16-bit type (s.exact_16bit) as that type (lossless).
  static FFNGeometry Make(const FFNSource& s, bool allow_direct, bool keep_half = false);
  int64_t WeightBytes() const { return cpu::WeightBytes(wtype); }
  // Elements per expert of each packed array.
  int64_t W1Size() const { return direct ? rows1 * D : nc1 * D * cpu::kChunk; }
  int64_t W2Size() const { return direct ? I * D : nc2 * Ipad * cpu::kChunk; }
  int64_t B1Size() const { return direct ? rows1 : nc1 * cpu::kChunk; }
  int64_t B2Size() const { return Dpad; }
};

// Per-expert pointers into packed weights (a packed store or per-call scratch).
struct FFNView {
  FFNGeometry g;
  std::vector<const void*> w1, w2;  // elements of g.wtype; null for experts not packed (inactive)
  std::vector<const float*> b1, b2;
};

// Packs expert e of `src` into the given destinations (b1/b2 may be null when absent).
void PackExpert(const FFNSource& src, const FFNGeometry& g, int64_t e, void* w1, void* w2,
                float* b1, float* b2);

// Weights packed once at kernel creation.
struct PackedFFN {
  FFNView view;
  AlignedBuffer w1, w2, b1, b2;
};

class MoEFFNCpuKernel {
 public:
  // Returns null status on success.
  static OrtStatus* Create(const OrtApi* api, const OrtKernelInfo* info, int declared_type,
                           MoEFFNCpuKernel** out);
  OrtStatus* Compute(OrtKernelContext* ctx);

  struct Arena;

 private:
  MoEFFNCpuKernel() = default;
  OrtStatus* Error(OrtErrorCode code, const std::string& msg) const;
  void TryPrepack(const OrtKernelInfo* info);

  Arena* AcquireArena();
  void ReleaseArena(Arena* a);

  const OrtApi* api_ = nullptr;
  std::string node_name_;
  MoEFFNAttrs attrs_;
  const cpu::Kernels* kernels_ = nullptr;
  bool keep_half_ = false;  // 16-bit weights packed as stored (FFNGeometry::Make)
  std::unique_ptr<PackedFFN> routed_;  // null: weights are not constant, packed per call
  std::unique_ptr<PackedFFN> shared_;
  std::mutex arena_mu_;
  std::vector<std::unique_ptr<Arena>> arenas_;
  std::vector<Arena*> free_arenas_;

 public:
  ~MoEFFNCpuKernel();
};

}  // namespace moefuse
