// MoEFFN attributes: names, defaults and parsing in one place (mirrors moefuse/spec.py's
// MoEFFNAttrs). Shared by every kernel of the library (CPU now, CUDA later).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ort_abi.h"

namespace moefuse {

enum class Routing { kSoftmaxTopk, kTopkSoftmax, kSigmoidTopk, kPrecomputed };
enum class Activation { kSilu, kGelu, kGeluTanh, kRelu, kIdentity };
enum class GateUpLayout { kHalves, kInterleaved, kSeparate };
enum class WeightLayout { kOutIn, kInOut };

// Field order and defaults are spec.MoEFFNAttrs'.
struct MoEFFNAttrs {
  int64_t k = 2;
  std::string routing = "softmax_topk";
  int64_t normalize_topk = 1;
  float routed_scaling_factor = 1.0f;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  std::string activation = "silu";
  int64_t gated = 1;
  std::string gate_up_layout = "halves";
  std::string weight_layout = "out_in";
  float activation_alpha = 1.0f;
  float clamp_limit = 0.0f;
  float up_offset = 0.0f;
  int64_t weight_on_input = 0;

  // Decoded enums, valid after a successful check() (moeffn_validate.h).
  Routing routing_kind = Routing::kSoftmaxTopk;
  Activation activation_kind = Activation::kSilu;
  GateUpLayout gate_up_kind = GateUpLayout::kHalves;
  WeightLayout layout_kind = WeightLayout::kOutIn;

  bool in_out() const { return layout_kind == WeightLayout::kInOut; }
  bool fused_gate_up() const { return gated && gate_up_kind != GateUpLayout::kSeparate; }
  bool separate_gate_up() const { return gated && gate_up_kind == GateUpLayout::kSeparate; }
};

inline const char* const kRoutingNames[] = {"softmax_topk", "topk_softmax", "sigmoid_topk",
                                            "precomputed"};
inline const char* const kActivationNames[] = {"silu", "gelu", "gelu_tanh", "relu", "identity"};
inline const char* const kGateUpNames[] = {"halves", "interleaved", "separate"};
inline const char* const kLayoutNames[] = {"out_in", "in_out"};

namespace detail {

// An attribute that the node does not set makes the getter return an error status: keep the
// default then.
inline void ReadInt(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t* v) {
  int64_t out = 0;
  if (OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &out)) {
    api->ReleaseStatus(st);
    return;
  }
  *v = out;
}

inline void ReadFloat(const OrtApi* api, const OrtKernelInfo* info, const char* name, float* v) {
  float out = 0.0f;
  if (OrtStatus* st = api->KernelInfoGetAttribute_float(info, name, &out)) {
    api->ReleaseStatus(st);
    return;
  }
  *v = out;
}

inline void ReadString(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                       std::string* v) {
  size_t size = 0;
  if (OrtStatus* st = api->KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
    api->ReleaseStatus(st);
    return;
  }
  std::vector<char> buf(size + 1, '\0');
  if (OrtStatus* st = api->KernelInfoGetAttribute_string(info, name, buf.data(), &size)) {
    api->ReleaseStatus(st);
    return;
  }
  *v = std::string(buf.data());
}

}  // namespace detail

// The node's name ("" when it has none or onnxruntime does not give it).
inline std::string ReadNodeName(const OrtApi* api, const OrtKernelInfo* info) {
  size_t size = 0;
  if (OrtStatus* st = api->KernelInfo_GetNodeName(info, nullptr, &size)) {
    api->ReleaseStatus(st);
    return std::string();
  }
  if (size == 0) return std::string();
  std::vector<char> buf(size + 1, '\0');
  if (OrtStatus* st = api->KernelInfo_GetNodeName(info, buf.data(), &size)) {
    api->ReleaseStatus(st);
    return std::string();
  }
  return std::string(buf.data());
}

// Reads every v1 attribute of the node (absent ones keep their defaults). Values are checked by
// CheckAttrs() in moeffn_validate.h.
inline MoEFFNAttrs ReadAttrs(const OrtApi* api, const OrtKernelInfo* info) {
  MoEFFNAttrs a;
  detail::ReadInt(api, info, "k", &a.k);
  detail::ReadString(api, info, "routing", &a.routing);
  detail::ReadInt(api, info, "normalize_topk", &a.normalize_topk);
  detail::ReadFloat(api, info, "routed_scaling_factor", &a.routed_scaling_factor);
  detail::ReadInt(api, info, "n_group", &a.n_group);
  detail::ReadInt(api, info, "topk_group", &a.topk_group);
  detail::ReadString(api, info, "activation", &a.activation);
  detail::ReadInt(api, info, "gated", &a.gated);
  detail::ReadString(api, info, "gate_up_layout", &a.gate_up_layout);
  detail::ReadString(api, info, "weight_layout", &a.weight_layout);
  detail::ReadFloat(api, info, "activation_alpha", &a.activation_alpha);
  detail::ReadFloat(api, info, "clamp_limit", &a.clamp_limit);
  detail::ReadFloat(api, info, "up_offset", &a.up_offset);
  detail::ReadInt(api, info, "weight_on_input", &a.weight_on_input);
  return a;
}

}  // namespace moefuse
