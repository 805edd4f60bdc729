// MoEFFN attributes: names, defaults and parsing in one place (mirrors moefuse/spec.py's
// MoEFFNAttrs). Shared by every kernel of the library (CPU now, CUDA later).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ort_abi.h"

namespace moefuse {

enum class Routing { kSoftmaxTopk, kTopkSoftmax, kSigmoidTopk, kPrecomputed, kSparsemixer };
enum class Activation { kSilu, kGelu, kGeluTanh, kRelu, kIdentity };
enum class GateUpLayout { kHalves, kInterleaved, kSeparate };
enum class WeightLayout { kOutIn, kInOut };
enum class GroupScore { kTop2Sum, kMax };

// Field order and defaults are spec.MoEFFNAttrs'.
struct MoEFFNAttrs {
  int64_t k = 2;
  std::string routing = "softmax_topk";
  int64_t normalize_topk = 1;
  float routed_scaling_factor = 1.0f;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  std::string group_score = "top2_sum";
  std::string activation = "silu";
  int64_t gated = 1;
  std::string gate_up_layout = "halves";
  std::string weight_layout = "out_in";
  float activation_alpha = 1.0f;
  float clamp_limit = 0.0f;
  float up_offset = 0.0f;
  int64_t weight_on_input = 0;
  float jitter_eps = 0.01f;  // sparsemixer's threshold
  int64_t zero_experts = 0;  // ranked after the E experts; a pick of one adds w * x

  // An attribute the node sets with another ONNX type than the one it is read as (ReadAttrs):
  // refused by CheckAttrs, not replaced by the default.
  std::string mistyped;

  // Decoded enums, valid after a successful check() (moeffn_validate.h).
  Routing routing_kind = Routing::kSoftmaxTopk;
  Activation activation_kind = Activation::kSilu;
  GateUpLayout gate_up_kind = GateUpLayout::kHalves;
  WeightLayout layout_kind = WeightLayout::kOutIn;
  GroupScore group_score_kind = GroupScore::kTop2Sum;

  bool in_out() const { return layout_kind == WeightLayout::kInOut; }
  bool fused_gate_up() const { return gated && gate_up_kind != GateUpLayout::kSeparate; }
  bool separate_gate_up() const { return gated && gate_up_kind == GateUpLayout::kSeparate; }
  // How many of a group's best choice values add up to its score (n_group > 1).
  int group_score_terms(int group_size) const {
    return group_score_kind == GroupScore::kMax ? 1 : (group_size < 2 ? group_size : 2);
  }
};

inline const char* const kRoutingNames[] = {"softmax_topk", "topk_softmax", "sigmoid_topk",
                                            "precomputed", "sparsemixer"};
inline const char* const kActivationNames[] = {"silu", "gelu", "gelu_tanh", "relu", "identity"};
inline const char* const kGateUpNames[] = {"halves", "interleaved", "separate"};
inline const char* const kLayoutNames[] = {"out_in", "in_out"};
inline const char* const kGroupScoreNames[] = {"top2_sum", "max"};

namespace detail {

inline bool Ok(const OrtApi* api, OrtStatus* st) {
  if (!st) return true;
  api->ReleaseStatus(st);
  return false;
}

// The ONNX type of an attribute the node sets: INT, FLOAT, STRING, INTS, FLOATS, or "" for none
// of them (not set, an empty list, or another type, which onnxruntime's getters cannot tell from
// not set).
inline const char* AttributeType(const OrtApi* api, const OrtKernelInfo* info, const char* name) {
  int64_t i = 0;
  float f = 0.0f;
  size_t size = 0;
  if (Ok(api, api->KernelInfoGetAttribute_int64(info, name, &i))) return "INT";
  if (Ok(api, api->KernelInfoGetAttribute_float(info, name, &f))) return "FLOAT";
  if (Ok(api, api->KernelInfoGetAttribute_string(info, name, nullptr, &size))) return "STRING";
  // (the list getters do not check the list's type: another list reads as an empty one)
  size = 0;
  if (Ok(api, api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size)) && size > 0) return "INTS";
  size = 0;
  if (Ok(api, api->KernelInfoGetAttributeArray_float(info, name, nullptr, &size)) && size > 0) return "FLOATS";
  return "";
}

// An attribute the getter of its type cannot read: absent (the default stays), or set with
// another type (recorded in `mistyped`, the first one only).
inline void Unread(const OrtApi* api, const OrtKernelInfo* info, const char* name, const char* type,
                   std::string* mistyped) {
  const std::string given = AttributeType(api, info, name);
  if (!given.empty() && mistyped->empty())
    *mistyped = std::string("attribute '") + name + "' must be of type " + type + ", got " + given;
}

inline void ReadInt(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t* v,
                    std::string* mistyped) {
  int64_t out = 0;
  if (!Ok(api, api->KernelInfoGetAttribute_int64(info, name, &out))) return Unread(api, info, name, "INT", mistyped);
  *v = out;
}

inline void ReadFloat(const OrtApi* api, const OrtKernelInfo* info, const char* name, float* v,
                      std::string* mistyped) {
  float out = 0.0f;
  if (!Ok(api, api->KernelInfoGetAttribute_float(info, name, &out))) return Unread(api, info, name, "FLOAT", mistyped);
  *v = out;
}

inline void ReadString(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                       std::string* v, std::string* mistyped) {
  size_t size = 0;
  if (!Ok(api, api->KernelInfoGetAttribute_string(info, name, nullptr, &size)))
    return Unread(api, info, name, "STRING", mistyped);
  std::vector<char> buf(size + 1, '\0');
  if (!Ok(api, api->KernelInfoGetAttribute_string(info, name, buf.data(), &size))) return;
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

// Reads every v1 attribute of the node (absent ones keep their defaults; one set with another
// type is recorded in `mistyped`). Values are checked by CheckAttrs() in moeffn_validate.h.
inline MoEFFNAttrs ReadAttrs(const OrtApi* api, const OrtKernelInfo* info) {
  MoEFFNAttrs a;
  std::string* m = &a.mistyped;
  detail::ReadInt(api, info, "k", &a.k, m);
  detail::ReadString(api, info, "routing", &a.routing, m);
  detail::ReadInt(api, info, "normalize_topk", &a.normalize_topk, m);
  detail::ReadFloat(api, info, "routed_scaling_factor", &a.routed_scaling_factor, m);
  detail::ReadInt(api, info, "n_group", &a.n_group, m);
  detail::ReadInt(api, info, "topk_group", &a.topk_group, m);
  detail::ReadString(api, info, "group_score", &a.group_score, m);
  detail::ReadString(api, info, "activation", &a.activation, m);
  detail::ReadInt(api, info, "gated", &a.gated, m);
  detail::ReadString(api, info, "gate_up_layout", &a.gate_up_layout, m);
  detail::ReadString(api, info, "weight_layout", &a.weight_layout, m);
  detail::ReadFloat(api, info, "activation_alpha", &a.activation_alpha, m);
  detail::ReadFloat(api, info, "clamp_limit", &a.clamp_limit, m);
  detail::ReadFloat(api, info, "up_offset", &a.up_offset, m);
  detail::ReadInt(api, info, "weight_on_input", &a.weight_on_input, m);
  detail::ReadFloat(api, info, "jitter_eps", &a.jitter_eps, m);
  detail::ReadInt(api, info, "zero_experts", &a.zero_experts, m);
  return a;
}

}  // namespace moefuse
