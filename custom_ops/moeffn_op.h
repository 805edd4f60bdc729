// The OrtCustomOp description of MoEFFN (opset 1) and its callbacks, shared by the execution
// providers: one op per float type (float32, float16, bfloat16, the type of every float input
// and of Y), every input after X optional, Y of X's shape. What differs between providers comes
// from the EP argument (register.cc: CPU, cuda/moeffn_cuda.cc: CUDA):
//
//   struct EP {
//     static constexpr const char* kProvider;  // "CPUExecutionProvider", ...
//     static constexpr const char* kWho;       // prefix of the errors the callbacks report
//     using Kernel = ...;                       // has OrtStatus* Compute(OrtKernelContext*)
//     static OrtStatus* Create(const OrtApi*, const OrtKernelInfo*, ONNXTensorElementDataType,
//                              Kernel**);       // null status on success
//   };
#pragma once

#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "moeffn_validate.h"
#include "ort_abi.h"

namespace moefuse {

template <class EP>
struct MoEFFNOp {
  OrtCustomOp op;  // first, so that onnxruntime's `const OrtCustomOp*` can be cast back
  ONNXTensorElementDataType type;

  // Adds the three ops to `domain`. `shape_inference`: with the output shape callback (only on
  // onnxruntime versions where it is safe, see register.cc).
  static OrtStatus* AddTo(const OrtApi* api, OrtCustomOpDomain* domain, bool shape_inference) {
    api_ = api;
    // They live as long as the process: sessions keep pointers to them.
    static const MoEFFNOp ops[2][3] = {{Make(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false),
                                        Make(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, false),
                                        Make(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, false)},
                                       {Make(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true),
                                        Make(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, true),
                                        Make(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, true)}};
    for (const MoEFFNOp& op : ops[shape_inference ? 1 : 0]) {
      if (OrtStatus* st = api->CustomOpDomain_Add(domain, &op.op)) return st;
    }
    return nullptr;
  }

 private:
  using Kernel = typename EP::Kernel;

  static inline const OrtApi* api_ = nullptr;

  static MoEFFNOp Make(ONNXTensorElementDataType type, bool shape_inference) {
    MoEFFNOp c;
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
    if (shape_inference) op.InferOutputShapeFn = &InferOutputShape;
    c.type = type;
    return c;
  }

  static const MoEFFNOp* Self(const OrtCustomOp* op) { return reinterpret_cast<const MoEFFNOp*>(op); }

  static const char* MOEFUSE_ORT_CALL GetName(const OrtCustomOp*) { return "MoEFFN"; }
  static const char* MOEFUSE_ORT_CALL GetEpType(const OrtCustomOp*) { return EP::kProvider; }

  static ONNXTensorElementDataType MOEFUSE_ORT_CALL GetInputType(const OrtCustomOp* op, size_t index) {
    // topk_ids may be int32 or int64: left open, checked by the kernel.
    if (index == kTopkIds) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    return Self(op)->type;
  }
  static size_t MOEFUSE_ORT_CALL GetInputCount(const OrtCustomOp*) { return kNumInputs; }
  static ONNXTensorElementDataType MOEFUSE_ORT_CALL GetOutputType(const OrtCustomOp* op, size_t) {
    return Self(op)->type;
  }
  static size_t MOEFUSE_ORT_CALL GetOutputCount(const OrtCustomOp*) { return 1; }

  static OrtCustomOpInputOutputCharacteristic MOEFUSE_ORT_CALL GetInputCharacteristic(const OrtCustomOp*,
                                                                                     size_t index) {
    return index == kX ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  static OrtCustomOpInputOutputCharacteristic MOEFUSE_ORT_CALL GetOutputCharacteristic(const OrtCustomOp*,
                                                                                      size_t) {
    return INPUT_OUTPUT_REQUIRED;
  }
  static OrtMemType MOEFUSE_ORT_CALL GetInputMemoryType(const OrtCustomOp*, size_t) {
    return OrtMemTypeDefault;
  }
  static int MOEFUSE_ORT_CALL VariadicMinArity(const OrtCustomOp*) { return 1; }
  static int MOEFUSE_ORT_CALL VariadicHomogeneity(const OrtCustomOp*) { return 1; }

  static OrtStatusPtr MOEFUSE_ORT_CALL CreateKernelV2(const OrtCustomOp* op, const OrtApi* api,
                                                      const OrtKernelInfo* info, void** kernel) {
    try {
      Kernel* k = nullptr;
      if (OrtStatus* st = EP::Create(api, info, Self(op)->type, &k)) return st;
      *kernel = k;
      return nullptr;
    } catch (const std::exception& e) {
      return api->CreateStatus(ORT_FAIL, (std::string(EP::kWho) + ": " + e.what()).c_str());
    } catch (...) {
      return api->CreateStatus(ORT_FAIL, (std::string(EP::kWho) + ": unexpected error creating the kernel").c_str());
    }
  }

  static OrtStatusPtr MOEFUSE_ORT_CALL KernelComputeV2(void* kernel, OrtKernelContext* ctx) {
    try {
      return static_cast<Kernel*>(kernel)->Compute(ctx);
    } catch (const std::bad_alloc&) {
      return api_->CreateStatus(ORT_FAIL, (std::string(EP::kWho) + ": out of memory").c_str());
    } catch (const std::exception& e) {
      return api_->CreateStatus(ORT_FAIL, (std::string(EP::kWho) + ": " + e.what()).c_str());
    } catch (...) {
      return api_->CreateStatus(ORT_FAIL, (std::string(EP::kWho) + ": unexpected error").c_str());
    }
  }

  static void MOEFUSE_ORT_CALL KernelDestroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

  // Y has X's shape (and the type of the registered variant).
  static OrtStatusPtr MOEFUSE_ORT_CALL InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
    const OrtApi* api = api_;
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
};

}  // namespace moefuse
