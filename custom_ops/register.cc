// Library entry point: registers moefuse.MoEFFN (opset 1) for the CPU execution provider, once
// per float type (float32, float16, bfloat16), with every input after X optional.
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "moeffn_cpu.h"
#ifdef MOEFUSE_WITH_CUDA
#include "cuda/moeffn_cuda.h"
#endif
#include "moeffn_validate.h"
#include "ort_abi.h"

namespace moefuse {
namespace {

constexpr const char* kDomain = "moefuse";
constexpr const char* kOpType = "MoEFFN";

// OrtCustomOp first, so that onnxruntime's `const OrtCustomOp*` can be cast back.
struct CpuOp {
  OrtCustomOp op;
  ONNXTensorElementDataType type;
};

const CpuOp* Self(const OrtCustomOp* op) { return reinterpret_cast<const CpuOp*>(op); }

const char* MOEFUSE_ORT_CALL GetName(const OrtCustomOp*) { return kOpType; }
const char* MOEFUSE_ORT_CALL GetEpType(const OrtCustomOp*) { return "CPUExecutionProvider"; }

ONNXTensorElementDataType MOEFUSE_ORT_CALL GetInputType(const OrtCustomOp* op, size_t index) {
  // topk_ids may be int32 or int64: left open, checked by the kernel.
  if (index == kTopkIds) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  return Self(op)->type;
}
size_t MOEFUSE_ORT_CALL GetInputCount(const OrtCustomOp*) { return kNumInputs; }
ONNXTensorElementDataType MOEFUSE_ORT_CALL GetOutputType(const OrtCustomOp* op, size_t) {
  return Self(op)->type;
}
size_t MOEFUSE_ORT_CALL GetOutputCount(const OrtCustomOp*) { return 1; }

OrtCustomOpInputOutputCharacteristic MOEFUSE_ORT_CALL GetInputCharacteristic(const OrtCustomOp*,
                                                                            size_t index) {
  return index == kX ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
OrtCustomOpInputOutputCharacteristic MOEFUSE_ORT_CALL GetOutputCharacteristic(const OrtCustomOp*,
                                                                             size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType MOEFUSE_ORT_CALL GetInputMemoryType(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int MOEFUSE_ORT_CALL VariadicMinArity(const OrtCustomOp*) { return 1; }
int MOEFUSE_ORT_CALL VariadicHomogeneity(const OrtCustomOp*) { return 1; }

const OrtApi* g_api = nullptr;

OrtStatusPtr MOEFUSE_ORT_CALL CreateKernelV2(const OrtCustomOp* op, const OrtApi* api,
                                              const OrtKernelInfo* info, void** kernel) {
  try {
    MoEFFNCpuKernel* k = nullptr;
    if (OrtStatus* st = MoEFFNCpuKernel::Create(api, info, Self(op)->type, &k)) return st;
    *kernel = k;
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("MoEFFN: ") + e.what()).c_str());
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "MoEFFN: unexpected error creating the kernel");
  }
}

OrtStatusPtr MOEFUSE_ORT_CALL KernelComputeV2(void* kernel, OrtKernelContext* ctx) {
  try {
    return static_cast<MoEFFNCpuKernel*>(kernel)->Compute(ctx);
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, "MoEFFN: out of memory");
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_FAIL, (std::string("MoEFFN: ") + e.what()).c_str());
  } catch (...) {
    return g_api->CreateStatus(ORT_FAIL, "MoEFFN: unexpected error");
  }
}

void MOEFUSE_ORT_CALL KernelDestroy(void* kernel) { delete static_cast<MoEFFNCpuKernel*>(kernel); }

// Y has X's shape (and the type of the registered variant).
OrtStatusPtr MOEFUSE_ORT_CALL InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi* api = g_api;
  OrtTensorTypeAndShapeInfo* x = nullptr;  // owned by the context
  if (OrtStatus* st = api->ShapeInferContext_GetInputTypeShape(ctx, 0, &x)) {
    api->ReleaseStatus(st);
    return nullptr;
  }
  size_t rank = 0;
  if (OrtStatus* st = api->GetDimensionsCount(x, &rank)) {
    api->ReleaseStatus(st);
    return nullptr;
  }
  if (rank == 2 || rank == 3) {
    if (OrtStatus* st = api->ShapeInferContext_SetOutputTypeShape(ctx, 0, x)) api->ReleaseStatus(st);
  }
  return nullptr;
}

CpuOp MakeOp(ONNXTensorElementDataType type) {
  CpuOp c;
  std::memset(&c, 0, sizeof(c));
  OrtCustomOp& op = c.op;
  op.version = MOEFUSE_ORT_API_VERSION;
  op.GetName = &GetName;
  op.GetExecutionProviderType = &GetEpType;
  op.GetInputType = &GetInputType;
  op.GetInputTypeCount = &GetInputCount;
  op.GetOutputType = &GetOutputType;
  op.GetOutputTypeCount = &GetOutputCount;
  op.KernelDestroy = &KernelDestroy;
  op.GetInputCharacteristic = &GetInputCharacteristic;
  op.GetOutputCharacteristic = &GetOutputCharacteristic;
  op.GetInputMemoryType = &GetInputMemoryType;
  op.GetVariadicInputMinArity = &VariadicMinArity;
  op.GetVariadicInputHomogeneity = &VariadicHomogeneity;
  op.GetVariadicOutputMinArity = &VariadicMinArity;
  op.GetVariadicOutputHomogeneity = &VariadicHomogeneity;
  op.CreateKernelV2 = &CreateKernelV2;
  op.KernelComputeV2 = &KernelComputeV2;
  // InferOutputShapeFn is set at registration, on onnxruntime versions where it is safe.
  c.type = type;
  return c;
}

// The op descriptions live as long as the process: sessions keep pointers to them. One set
// with the shape inference callback and one without (see ShapeInferenceIsSafe).
CpuOp kOps[2][3] = {{MakeOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
                     MakeOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
                     MakeOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)},
                    {MakeOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
                     MakeOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
                     MakeOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)}};
std::once_flag g_ops_once;

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
  g_api = api;
  // A domain per registration; onnxruntime keeps using it for the sessions made from `options`,
  // so it is deliberately never released (a few bytes per registration).
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  std::call_once(g_ops_once, [] {
    for (CpuOp& op : kOps[1]) op.op.InferOutputShapeFn = &InferOutputShape;
  });
  const CpuOp* ops = kOps[ShapeInferenceIsSafe(api_base->GetVersionString()) ? 1 : 0];
  for (int i = 0; i < 3; ++i) {
    const CpuOp& op = ops[i];
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, &op.op)) return st;
  }
#ifdef MOEFUSE_WITH_CUDA
  if (OrtStatus* st = cuda::AddCudaOps(api, domain, ShapeInferenceIsSafe(api_base->GetVersionString())))
    return st;
#endif
  return api->AddCustomOpDomain(options, domain);
}
