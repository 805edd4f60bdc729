// See moeffn_validate.h. Each rule below is one rule of moefuse/spec.py, in the same order and
// with the same message, so that a node refused by the library is refused by the Python tools
// with the same words.
#include "moeffn_validate.h"

#include <charconv>
#include <cmath>
#include <cstring>

namespace moefuse {

const char* const kInputNames[kNumInputs] = {
    "X",   "router_logits",  "w1",       "w2",           "w3",        "b1",        "b2",
    "b3",  "selection_bias", "topk_ids", "topk_weights", "shared_w1", "shared_w2", "shared_w3",
    "shared_gate"};

namespace {

constexpr int kFloat = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr int kFloat16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr int kBFloat16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
constexpr int kInt32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
constexpr int kInt64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;

// Python's repr() of a float: shortest round-trip digits, ".0" on integral values.
std::string PyFloat(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v);
  std::string s(buf, res.ptr);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string Join(const char* const* names, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) {
    if (i) out += ", ";
    out += names[i];
  }
  return out;
}

template <int N>
bool OneOf(const std::string& who, const char* attr, const std::string& value,
           const char* const (&allowed)[N], int* index, std::string* err) {
  for (int i = 0; i < N; ++i) {
    if (value == allowed[i]) {
      *index = i;
      return true;
    }
  }
  *err = who + ": attribute '" + attr + "' must be one of " + Join(allowed, N) + "; got '" +
         value + "'";
  return false;
}

bool IsIntegerInput(int i) { return i == kTopkIds; }

std::vector<int64_t> Lead(const std::vector<int64_t>& d) {
  return std::vector<int64_t>(d.begin(), d.end() - (d.empty() ? 0 : 1));
}

// Product of dims, -1 when any is unknown.
int64_t Prod(const std::vector<int64_t>& dims) {
  int64_t out = 1;
  for (int64_t d : dims) {
    if (d < 0) return -1;
    out *= d;
  }
  return out;
}

// spec._same_tokens: equal leading dims, or equal token counts, or not known yet.
bool SameTokens(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  if (a == b) return true;
  int64_t pa = Prod(a), pb = Prod(b);
  if (pa < 0 || pb < 0) return true;
  return pa == pb;
}

bool AnyUnknown(const std::vector<int64_t>& d) {
  for (int64_t v : d)
    if (v < 0) return true;
  return false;
}

std::string Str(int64_t v) { return std::to_string(v); }

}  // namespace

std::string Who(const std::string& node_name) {
  return node_name.empty() ? std::string("MoEFFN") : "MoEFFN node '" + node_name + "'";
}

std::string FormatDims(const std::vector<int64_t>& dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) out += ", ";
    out += dims[i] < 0 ? std::string("?") : std::to_string(dims[i]);
  }
  return out + "]";
}

std::string ElemTypeName(int t) {
  switch (t) {
    case 1: return "float32";
    case 2: return "uint8";
    case 3: return "int8";
    case 4: return "uint16";
    case 5: return "int16";
    case 6: return "int32";
    case 7: return "int64";
    case 8: return "str";
    case 9: return "bool";
    case 10: return "float16";
    case 11: return "float64";
    case 12: return "uint32";
    case 13: return "uint64";
    case 14: return "complex64";
    case 15: return "complex128";
    case 16: return "bfloat16";
    case 17: return "float8_e4m3fn";
    case 18: return "float8_e4m3fnuz";
    case 19: return "float8_e5m2";
    case 20: return "float8_e5m2fnuz";
    case 21: return "uint4";
    case 22: return "int4";
    default: return "type#" + std::to_string(t);
  }
}

std::string CheckAttrs(MoEFFNAttrs& a, const std::string& node_name) {
  const std::string who = Who(node_name);
  if (!a.mistyped.empty()) return who + ": " + a.mistyped;
  std::string err;
  int idx = 0;
  if (!OneOf(who, "routing", a.routing, kRoutingNames, &idx, &err)) return err;
  a.routing_kind = static_cast<Routing>(idx);
  if (!OneOf(who, "activation", a.activation, kActivationNames, &idx, &err)) return err;
  a.activation_kind = static_cast<Activation>(idx);
  if (!OneOf(who, "gate_up_layout", a.gate_up_layout, kGateUpNames, &idx, &err)) return err;
  a.gate_up_kind = static_cast<GateUpLayout>(idx);
  if (!OneOf(who, "weight_layout", a.weight_layout, kLayoutNames, &idx, &err)) return err;
  a.layout_kind = static_cast<WeightLayout>(idx);
  if (!OneOf(who, "group_score", a.group_score, kGroupScoreNames, &idx, &err)) return err;
  a.group_score_kind = static_cast<GroupScore>(idx);
  const std::pair<const char*, int64_t> flags[] = {
      {"normalize_topk", a.normalize_topk}, {"gated", a.gated}, {"weight_on_input", a.weight_on_input}};
  for (const auto& f : flags) {
    if (f.second != 0 && f.second != 1)
      return who + ": attribute '" + f.first + "' must be 0 or 1, got " + Str(f.second);
  }
  if (a.k < 1) return who + ": attribute 'k' must be >= 1, got " + Str(a.k);
  if (a.zero_experts < 0) return who + ": attribute 'zero_experts' must be >= 0, got " + Str(a.zero_experts);
  if (a.n_group < 1 || a.topk_group < 1)
    return who + ": attributes 'n_group' and 'topk_group' must be >= 1, got n_group=" +
           Str(a.n_group) + ", topk_group=" + Str(a.topk_group);
  if (a.topk_group > a.n_group)
    return who + ": attribute 'topk_group'=" + Str(a.topk_group) + " must be <= n_group=" +
           Str(a.n_group);
  if (a.n_group > 1 && a.routing_kind != Routing::kSoftmaxTopk && a.routing_kind != Routing::kSigmoidTopk)
    return who + ": group-limited top-k (n_group=" + Str(a.n_group) +
           ") is defined for routing='softmax_topk' or 'sigmoid_topk' only, got routing='" + a.routing + "'";
  if (a.n_group == 1 && a.group_score_kind != GroupScore::kTop2Sum)
    return who + ": 'group_score' applies to group-limited top-k (n_group > 1) only, got n_group=1";
  if (a.routing_kind == Routing::kSparsemixer && a.k != 2)
    return who + ": routing='sparsemixer' picks k=2 experts, got k=" + Str(a.k);
  if (!(a.jitter_eps >= 0.0f && std::isfinite(a.jitter_eps)))
    return who + ": attribute 'jitter_eps' must be finite and >= 0, got " + PyFloat(a.jitter_eps);
  if (a.jitter_eps != 0.01f && a.routing_kind != Routing::kSparsemixer)
    return who + ": 'jitter_eps' applies to routing='sparsemixer' only, got routing='" + a.routing + "'";
  if (!std::isfinite(a.routed_scaling_factor))
    return who + ": attribute 'routed_scaling_factor' must be finite";
  if (!(a.clamp_limit >= 0.0f && std::isfinite(a.clamp_limit)))
    return who + ": attribute 'clamp_limit' must be finite and >= 0 (0 = off), got " +
           PyFloat(a.clamp_limit);
  if (!a.gated && (a.clamp_limit != 0.0f || a.up_offset != 0.0f))
    return who + ": 'clamp_limit' and 'up_offset' apply to gated experts only (gated=0)";
  if (a.activation_alpha != 1.0f && a.activation_kind != Activation::kSilu)
    return who + ": 'activation_alpha' applies to activation='silu' only, got activation='" +
           a.activation + "'";
  return "";
}

std::string Validate(MoEFFNAttrs& a, const InputDescs& in, const std::string& node_name,
                     MoEFFNShape* out) {
  std::string err = CheckAttrs(a, node_name);
  if (!err.empty()) return err;
  const std::string who = Who(node_name);
  auto present = [&](int i) { return in[i].present; };
  auto shape = [&](int i) -> const std::vector<int64_t>& { return in[i].dims; };
  auto name = [](int i) { return std::string(kInputNames[i]); };
  auto fail = [&](int i, const std::string& expected, const std::vector<int64_t>& got) {
    return who + ": input '" + name(i) + "' (#" + Str(i) + ") expected " + expected + ", got " +
           FormatDims(got);
  };

  for (int i : {kX, kW1, kW2}) {
    if (!present(i)) return who + ": required input '" + name(i) + "' (#" + Str(i) + ") is missing";
  }
  for (int i = 0; i < kNumInputs; ++i) {
    if (present(i) && !in[i].has_shape)
      return who + ": input '" + name(i) + "' (#" + Str(i) + ") has no known rank";
  }

  // One float type T for every float input; an index type for topk_ids.
  const int t = in[kX].elem_type;
  if (t != kFloat && t != kFloat16 && t != kBFloat16)
    return who + ": input 'X' has element type " + ElemTypeName(t) +
           "; expected one of float32, float16, bfloat16";
  for (int i = 0; i < kNumInputs; ++i) {
    if (!present(i)) continue;
    const int d = in[i].elem_type;
    if (IsIntegerInput(i)) {
      if (d != kInt32 && d != kInt64)
        return who + ": input '" + name(i) + "' must be int32 or int64, got " + ElemTypeName(d);
    } else if (d != t) {
      return who + ": input '" + name(i) + "' has element type " + ElemTypeName(d) + " but X is " +
             ElemTypeName(t) + "; all float inputs of a MoEFFN node share one type";
    }
  }

  const auto& x = shape(kX);
  if (x.size() != 2 && x.size() != 3) return fail(kX, "rank 2 [T, D] or rank 3 [B, S, D]", x);
  const int64_t d_model = x.back();
  if (d_model < 0)
    return who + ": input 'X' must have a static hidden size (last dim), got " + FormatDims(x);
  const std::vector<int64_t> x_lead = Lead(x);
  const int64_t tokens = Prod(x_lead);

  // Routed expert weights.
  const auto& w1 = shape(kW1);
  const auto& w2 = shape(kW2);
  if (w1.size() != 3 || AnyUnknown(w1)) return fail(kW1, "a static rank-3 tensor [E, ., .]", w1);
  if (w2.size() != 3 || AnyUnknown(w2)) return fail(kW2, "a static rank-3 tensor [E, ., .]", w2);
  const int64_t experts = w1[0];
  const bool in_out = a.in_out();
  const int64_t w1_in = in_out ? w1[1] : w1[2];
  const int64_t n1 = in_out ? w1[2] : w1[1];
  const std::string lay = in_out ? "[E, in, out]" : "[E, out, in]";
  if (w1_in != d_model)
    return fail(kW1, lay + " with in = D = " + Str(d_model) + " (weight_layout=" + a.weight_layout + ")",
                w1);
  int64_t inter = n1;
  if (a.fused_gate_up()) {
    if (n1 % 2) return fail(kW1, "an even output width 2*I (gate and up " + a.gate_up_layout + ")", w1);
    inter = n1 / 2;
  }
  if (experts < 1) return fail(kW1, "at least one expert", w1);
  const std::vector<int64_t> w2_expected =
      in_out ? std::vector<int64_t>{experts, inter, d_model} : std::vector<int64_t>{experts, d_model, inter};
  if (w2 != w2_expected)
    return fail(kW2,
                FormatDims(w2_expected) + " (E=" + Str(experts) + ", I=" + Str(inter) +
                    ", D=" + Str(d_model) + ", weight_layout=" + a.weight_layout + ")",
                w2);

  const bool separate = a.separate_gate_up();
  if (separate) {
    if (!present(kW3))
      return who + ": input 'w3' (#4) is required with gate_up_layout=separate";
    if (shape(kW3) != w1) return fail(kW3, "the shape of w1 " + FormatDims(w1), shape(kW3));
  } else if (present(kW3)) {
    return who + ": input 'w3' is given but gate_up_layout=" + a.gate_up_layout +
           (a.gated ? "" : " and gated=0") +
           "; w3 is only used with gated=1, gate_up_layout=separate";
  }
  const std::pair<int, std::vector<int64_t>> biases[] = {
      {kB1, {experts, n1}}, {kB2, {experts, d_model}}, {kB3, {experts, inter}}};
  for (const auto& b : biases) {
    if (!present(b.first)) continue;
    if (b.first == kB3 && !separate) return who + ": input 'b3' requires gate_up_layout=separate";
    if (shape(b.first) != b.second) return fail(b.first, FormatDims(b.second), shape(b.first));
  }

  // Routing inputs: the router ranks the E experts and, past them, the zero (identity) experts.
  constexpr int64_t kMaxRanked = 2147483647;  // 32-bit expert ids
  const bool too_many = a.zero_experts > kMaxRanked - experts;  // (before the sum can overflow)
  const int64_t ranked = too_many ? 0 : experts + a.zero_experts;
  const std::string e_ranked =
      a.zero_experts == 0 ? "E=" + Str(experts)
                          : "E + zero_experts = " + Str(experts) + " + " + Str(a.zero_experts) + " = " +
                                std::to_string(static_cast<uint64_t>(experts) + static_cast<uint64_t>(a.zero_experts));
  if (too_many)
    return who + ": attribute 'zero_experts'=" + Str(a.zero_experts) + ": " + e_ranked + " exceeds " +
           Str(kMaxRanked) + " experts";
  if (a.k > ranked)
    return who + ": attribute 'k'=" + Str(a.k) + " exceeds the number of experts " + e_ranked + " (from w1 " +
           FormatDims(w1) + ")";
  if (a.n_group > 1 && ranked % a.n_group)
    return who + ": attribute 'n_group'=" + Str(a.n_group) + " does not divide the number of experts " + e_ranked;
  if (a.n_group > 1 && a.k > a.topk_group * (ranked / a.n_group))
    return who + ": k=" + Str(a.k) + " exceeds the experts in the topk_group=" + Str(a.topk_group) +
           " selected groups of " + Str(ranked / a.n_group);
  if (a.routing_kind == Routing::kPrecomputed) {
    for (int i : {kTopkIds, kTopkWeights}) {
      if (!present(i))
        return who + ": input '" + name(i) + "' (#" + Str(i) + ") is required with routing=precomputed";
      const auto& s = shape(i);
      if (s.empty() || (s.back() >= 0 && s.back() != a.k))
        return fail(i, "[..., k] with k=" + Str(a.k), s);
      if (!SameTokens(Lead(s), x_lead))
        return fail(i, "leading dims holding T=" + FormatDims(x_lead) + " tokens like X", s);
    }
    if (Lead(shape(kTopkIds)) != Lead(shape(kTopkWeights)))
      return fail(kTopkWeights, "the shape of topk_ids " + FormatDims(shape(kTopkIds)),
                  shape(kTopkWeights));
    for (int i : {kRouterLogits, kSelectionBias}) {
      if (present(i)) return who + ": input '" + name(i) + "' is not used with routing=precomputed";
    }
  } else {
    if (!present(kRouterLogits))
      return who + ": input 'router_logits' (#1) is required with routing=" + a.routing;
    const auto& lg = shape(kRouterLogits);
    if (lg.size() < 2 || lg.back() != ranked)
      return fail(kRouterLogits,
                  std::string(a.zero_experts ? "[..., E + zero_experts]" : "[..., E]") + " with " + e_ranked +
                      " (from w1 " + FormatDims(w1) + ")",
                  lg);
    if (!SameTokens(Lead(lg), x_lead))
      return fail(kRouterLogits, "leading dims holding the same tokens as X " + FormatDims(x), lg);
    for (int i : {kTopkIds, kTopkWeights}) {
      if (present(i))
        return who + ": input '" + name(i) + "' is only used with routing=precomputed";
    }
    if (present(kSelectionBias)) {
      if (a.routing_kind != Routing::kSoftmaxTopk && a.routing_kind != Routing::kSigmoidTopk)
        return who + ": input 'selection_bias' is only used with routing=softmax_topk or sigmoid_topk, got routing=" +
               a.routing;
      if (shape(kSelectionBias) != std::vector<int64_t>{ranked})
        return fail(kSelectionBias, FormatDims({ranked}), shape(kSelectionBias));
    }
  }

  // Shared expert.
  int64_t shared_inter = 0;
  std::vector<int> shared_present;
  for (int i : {kSharedW1, kSharedW2, kSharedW3, kSharedGate})
    if (present(i)) shared_present.push_back(i);
  if (!shared_present.empty()) {
    for (int i : {kSharedW1, kSharedW2}) {
      if (!present(i)) {
        std::string got;
        for (size_t j = 0; j < shared_present.size(); ++j)
          got += (j ? ", " : "") + name(shared_present[j]);
        return who + ": input '" + name(i) +
               "' is required when any shared expert input is given (got " + got + ")";
      }
    }
    const auto& s1 = shape(kSharedW1);
    const auto& s2 = shape(kSharedW2);
    if (s1.size() != 2 || AnyUnknown(s1)) return fail(kSharedW1, "a static rank-2 tensor", s1);
    const int64_t s_in = in_out ? s1[0] : s1[1];
    const int64_t s_n1 = in_out ? s1[1] : s1[0];
    if (s_in != d_model)
      return fail(kSharedW1, std::string(in_out ? "[D, N1]" : "[N1, D]") + " with D=" + Str(d_model), s1);
    const bool shared_separate = present(kSharedW3);
    if (shared_separate && !a.gated)
      return who + ": input 'shared_w3' requires gated experts (gated=1)";
    if (a.gated && !shared_separate) {
      if (a.gate_up_kind == GateUpLayout::kSeparate)
        return who + ": input 'shared_w3' is required: with gate_up_layout=separate the shared "
                     "expert's up projection is stored apart";
      if (s_n1 % 2) return fail(kSharedW1, "an even output width 2*Is (gate and up fused)", s1);
      shared_inter = s_n1 / 2;
    } else {
      shared_inter = s_n1;
    }
    if (shared_separate && shape(kSharedW3) != s1)
      return fail(kSharedW3, "the shape of shared_w1 " + FormatDims(s1), shape(kSharedW3));
    const std::vector<int64_t> s2_expected =
        in_out ? std::vector<int64_t>{shared_inter, d_model} : std::vector<int64_t>{d_model, shared_inter};
    if (s2 != s2_expected) return fail(kSharedW2, FormatDims(s2_expected), s2);
    if (present(kSharedGate) && shape(kSharedGate) != std::vector<int64_t>{d_model})
      return fail(kSharedGate, FormatDims({d_model}), shape(kSharedGate));
  }

  if (out) {
    out->tokens = tokens;
    out->hidden = d_model;
    out->experts = experts;
    out->inter = inter;
    out->shared_inter = shared_inter;
    out->elem_type = t;
  }
  return "";
}

}  // namespace moefuse
