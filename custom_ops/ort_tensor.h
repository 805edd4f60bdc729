// An onnxruntime tensor as the kernels read it (data, element type, shape), and the reading of a
// call's inputs. Shared by the CPU kernel (moeffn_cpu.cc) and the CUDA kernel (cuda/moeffn_cuda.cc).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "moeffn_validate.h"
#include "ort_abi.h"

namespace moefuse {

// One input tensor; v is null for an input left out.
struct Value {
  const OrtValue* v = nullptr;
  const void* data = nullptr;
  int type = 0;  // ONNX TensorProto data type
  std::vector<int64_t> dims;
};

// Elements of a tensor of these dims.
inline int64_t Numel(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

// Fills *out from v. Returns false when onnxruntime cannot describe it (*out is then not valid).
inline bool Describe(const OrtApi* api, const OrtValue* v, Value* out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = api->GetTensorTypeAndShape(v, &info)) {
    api->ReleaseStatus(st);
    return false;
  }
  ONNXTensorElementDataType t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  bool ok = true;
  if (OrtStatus* st = api->GetTensorElementType(info, &t)) {
    api->ReleaseStatus(st);
    ok = false;
  }
  if (ok) {
    if (OrtStatus* st = api->GetDimensionsCount(info, &rank)) {
      api->ReleaseStatus(st);
      ok = false;
    }
  }
  if (ok) {
    out->dims.assign(rank, 0);
    if (OrtStatus* st = api->GetDimensions(info, out->dims.data(), rank)) {
      api->ReleaseStatus(st);
      ok = false;
    }
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  if (!ok) return false;
  void* data = nullptr;
  if (OrtStatus* st = api->GetTensorMutableData(const_cast<OrtValue*>(v), &data)) {
    api->ReleaseStatus(st);
    return false;
  }
  out->v = v;
  out->type = static_cast<int>(t);
  out->data = data;
  return true;
}

// Reads the inputs of one call into in[0..kNumInputs) and their descriptions for Validate() into
// *descs. Returns null, or the error status for the kernel to return.
inline OrtStatus* ReadInputs(const OrtApi* api, OrtKernelContext* ctx, const std::string& node_name,
                             Value* in, InputDescs* descs) {
  size_t nin = 0;
  if (OrtStatus* st = api->KernelContext_GetInputCount(ctx, &nin)) return st;
  for (size_t i = 0; i < nin && i < kNumInputs; ++i) {
    const OrtValue* v = nullptr;
    if (OrtStatus* st = api->KernelContext_GetInput(ctx, i, &v)) return st;
    if (!v) continue;
    if (!Describe(api, v, &in[i]))
      return api->CreateStatus(ORT_RUNTIME_EXCEPTION,
                               (Who(node_name) + ": cannot read input '" + kInputNames[i] + "'").c_str());
    TensorDesc& d = (*descs)[i];
    d.present = true;
    d.has_shape = true;
    d.elem_type = in[i].type;
    d.dims = in[i].dims;
  }
  if (nin > kNumInputs)
    return api->CreateStatus(ORT_INVALID_ARGUMENT, (Who(node_name) + ": got " + std::to_string(nin) +
                                                    " inputs; MoEFFN v1 has " + std::to_string(kNumInputs))
                                                       .c_str());
  return nullptr;
}

// The start of one call, the same for the CPU and the CUDA kernel: the inputs read and validated
// (so that both refuse bad input with the same words), Y allocated with X's shape.
struct CallStart {
  Value in[kNumInputs];
  MoEFFNAttrs attrs;  // the node's, as Validate completes them
  MoEFFNShape shape;
  void* y = nullptr;  // Y's data; null when there are no tokens (then there is nothing to do)
};

inline OrtStatus* StartCall(const OrtApi* api, OrtKernelContext* ctx, const std::string& node_name,
                            const MoEFFNAttrs& attrs, CallStart* c) {
  InputDescs descs;
  if (OrtStatus* st = ReadInputs(api, ctx, node_name, c->in, &descs)) return st;
  c->attrs = attrs;
  const std::string err = Validate(c->attrs, descs, node_name, &c->shape);
  if (!err.empty()) return api->CreateStatus(ORT_INVALID_ARGUMENT, err.c_str());
  OrtValue* yv = nullptr;
  const auto& xdims = c->in[kX].dims;
  if (OrtStatus* st = api->KernelContext_GetOutput(ctx, 0, xdims.data(), xdims.size(), &yv)) return st;
  c->y = nullptr;
  if (c->shape.tokens == 0) return nullptr;
  return api->GetTensorMutableData(yv, &c->y);
}

}  // namespace moefuse
