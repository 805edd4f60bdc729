// Library entry point: registers moefuse.MoEFFN (opset 1) for the CPU execution provider, once
// per float type (float32, float16, bfloat16), with every input after X optional.
#include <cstdio>
#include <string>

#include "moeffn_cpu.h"
#include "moeffn_op.h"
#ifdef MOEFUSE_WITH_CUDA
#include "cuda/moeffn_cuda.h"
#endif
#include "moeffn_validate.h"
#include "ort_abi.h"

namespace moefuse {
namespace {

constexpr const char* kDomain = "moefuse";

// What the CPU execution provider's op has of its own (moeffn_op.h).
struct CpuEP {
  static constexpr const char* kProvider = "CPUExecutionProvider";
  static constexpr const char* kWho = "MoEFFN";
  using Kernel = MoEFFNCpuKernel;
  static OrtStatus* Create(const OrtApi* api, const OrtKernelInfo* info, ONNXTensorElementDataType type,
                           Kernel** out) {
    return MoEFFNCpuKernel::Create(api, info, type, out);
  }
};

// onnxruntime 1.20 to 1.23 crash in session creation when a custom op with a shape inference
// callback has a node that leaves an optional input out in the middle (e.g. routing=precomputed
// without router_logits) and the model also carries a local function of the op's name, as every
// converted model does. Output types are inferred without the callback, so older versions only
// lose Y's inferred shape.
bool ShapeInferenceIsSafe(const char* version) {
  int major = 0, minor = 0;
  if (!version || std::sscanf(version, "%d.%d", &major, &minor) != 2) return false;
  return major > 1 || (major == 1 && minor >= 24);
}

}  // namespace
}  // namespace moefuse

extern "C" MOEFUSE_EXPORT OrtStatus* MOEFUSE_ORT_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                       const OrtApiBase* api_base) {
  using namespace moefuse;
  const OrtApi* api = api_base->GetApi(MOEFUSE_ORT_API_VERSION);
  if (!api) {
    // Too old: report it through the oldest table, which every release serves.
    const OrtApi* old = api_base->GetApi(1);
    std::string msg = std::string("moefuse: this library needs onnxruntime >= 1.20 (C API version ") +
                      std::to_string(MOEFUSE_ORT_API_VERSION) + "); loaded onnxruntime " +
                      api_base->GetVersionString();
    return old ? old->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  // A domain per registration; onnxruntime keeps using it for the sessions made from `options`,
  // so it is deliberately never released (a few bytes per registration).
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  const bool shape_inference = ShapeInferenceIsSafe(api_base->GetVersionString());
  if (OrtStatus* st = MoEFFNOp<CpuEP>::AddTo(api, domain, shape_inference)) return st;
#ifdef MOEFUSE_WITH_CUDA
  if (OrtStatus* st = cuda::AddCudaOps(api, domain, shape_inference)) return st;
#endif
  return api->AddCustomOpDomain(options, domain);
}

// The CPU kernel's inner loops for this process (avx512, avx2, generic or blas; MOEFUSE_CPU_ISA
// overrides the CPU's best), and whether a kernel made now packs 16-bit weights 16-bit.
extern "C" MOEFUSE_EXPORT const char* MoefuseCpuKernels(void) { return moefuse::cpu::Select().name; }
extern "C" MOEFUSE_EXPORT int MoefuseCpuPacksHalfWeights(void) {
  return moefuse::cpu::PacksHalfWeights(moefuse::cpu::Select()) ? 1 : 0;
}
