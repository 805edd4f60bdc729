// MoEFFN validation shared by all kernels: the rules and messages of moefuse/spec.py's
// MoEFFNAttrs.check() and validate(), on plain shape/type descriptions (no onnxruntime types),
// so that the CPU kernel and a CUDA kernel report the same errors as the Python tools.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "moeffn_attrs.h"

namespace moefuse {

// Input order of the op (spec.INPUTS); the order is the ABI.
enum InputIndex : int {
  kX = 0,
  kRouterLogits,
  kW1,
  kW2,
  kW3,
  kB1,
  kB2,
  kB3,
  kSelectionBias,
  kTopkIds,
  kTopkWeights,
  kSharedW1,
  kSharedW2,
  kSharedW3,
  kSharedGate,
  kNumInputs
};

extern const char* const kInputNames[kNumInputs];

// One input as the validator sees it. dims holds -1 for a dimension that is not known (symbolic).
struct TensorDesc {
  bool present = false;
  bool has_shape = false;  // false: rank unknown
  int elem_type = 0;       // ONNX TensorProto data type
  std::vector<int64_t> dims;
};

using InputDescs = std::array<TensorDesc, kNumInputs>;

// Sizes implied by a valid node (spec.MoEFFNShape).
struct MoEFFNShape {
  int64_t tokens = -1;  // T, -1 if symbolic
  int64_t hidden = 0;   // D
  int64_t experts = 0;  // E
  int64_t inter = 0;    // I
  int64_t shared_inter = 0;
  int elem_type = 0;  // T
};

// "MoEFFN node 'name'" or "MoEFFN".
std::string Who(const std::string& node_name);

// spec.MoEFFNAttrs.check(); also decodes the string attributes into attrs' enums.
// Returns "" when valid, else the message.
std::string CheckAttrs(MoEFFNAttrs& attrs, const std::string& node_name);

// spec.validate(). Returns "" when valid (and fills *shape), else the message.
std::string Validate(MoEFFNAttrs& attrs, const InputDescs& inputs, const std::string& node_name,
                     MoEFFNShape* shape);

// numpy's name for an ONNX element type ("float32", "bfloat16", "int64", ...).
std::string ElemTypeName(int elem_type);

// spec._fmt: "[2, ?, 16]".
std::string FormatDims(const std::vector<int64_t>& dims);

}  // namespace moefuse
