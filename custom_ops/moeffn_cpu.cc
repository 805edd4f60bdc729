// MoEFFN on onnxruntime's CPU execution provider.
//
// One call, for T tokens routed to k of E experts (P = T*k (token, expert) pairs):
//   A. per block of tokens, in parallel: X rows to float32, routing in one pass over each
//      token's logits (or the precomputed ids/weights), the shared expert's sigmoid gate;
//   B. a counting sort of the pairs by expert (rows of one expert become contiguous), and the
//      list of tile jobs: (expert, chunk of output columns, block of rows);
//   C. in parallel: weight_on_input row scaling; packing of the active experts when the
//      weights are not constant initializers (constant ones were packed at kernel creation);
//   D. in parallel: first projection of every active expert fused with bias, clamp, activation
//      and gating (cpu_kernels.h), the shared expert as one more "expert" over all tokens;
//   E. in parallel: down projection (+ bias) into one output row per pair;
//   F. per block of tokens, in parallel: the weighted sum of each token's pairs in ascending
//      expert order, plus the (gated) shared expert, rounded once to the output type.
// Every output element is computed by exactly one job with a fixed summation order, so results
// are bit-identical for any number of threads. Experts with intermediate size <= 4 (rank-1
// "flash expert" layers) skip B-E: phase F computes them directly per token with dot products.
#include "moeffn_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "half.h"
#include "ort_tensor.h"

namespace moefuse {

// --- storage ----------------------------------------------------------------------------------

AlignedBuffer::~AlignedBuffer() { std::free(p_); }

void AlignedBuffer::Reset(size_t bytes) {
  std::free(p_);
  p_ = nullptr;
  bytes_ = 0;
  if (bytes == 0) return;
  const size_t huge = size_t(2) << 20;
  const size_t align = bytes >= huge ? huge : 64;
  const size_t rounded = (bytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, rounded);
  if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == huge) madvise(p, rounded, MADV_HUGEPAGE);  // fewer TLB misses when streaming
#endif
  p_ = p;
  bytes_ = bytes;
}

struct MoEFFNCpuKernel::Arena {
  AlignedBuffer buf;
};

namespace {

constexpr int kTokenBlock = 16;  // tokens per routing / combine work item
constexpr int kRowBlock = 96;    // rows per GEMM job (a multiple of every micro-tile height)
constexpr int kDirectMaxInter = 4;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bytes rounded up to whole 64-byte lines (packed chunks are read with aligned loads).
int64_t Lines(int64_t bytes) { return CeilDiv(bytes, 64) * 64; }

// Row r of a direct-path weight array (rows of n elements of wtype): float32 rows as stored,
// 16-bit ones widened into `wide` (the products are those of float32 rows), whose row is valid
// until the next call.
struct RowsOf {
  const void* w;
  int wtype;
  int64_t n;
  float* wide;
  const cpu::Kernels& k;
  const float* Row(int64_t r) const {
    if (wtype == cpu::kWeightF32) return static_cast<const float*>(w) + r * n;
    k.widen(static_cast<const uint16_t*>(w) + r * n, wtype, wide, n);
    return wide;
  }
  float Dot(const float* x, int64_t r) const {  // dot(x, Row(r)) without widening the row first
    if (wtype == cpu::kWeightF32) return k.dot(x, static_cast<const float*>(w) + r * n, n);
    return k.dot_half(x, static_cast<const uint16_t*>(w) + r * n, wtype, n);
  }
};

// Bytes of one expert's per-call packed weights, each array starting on a 64-byte line.
int64_t SlotBytes(const FFNGeometry& g) {
  const int64_t wb = g.WeightBytes(), fb = sizeof(float);
  return Lines(g.W1Size() * wb) + Lines(g.W2Size() * wb) + Lines(g.B1Size() * fb) + Lines(g.B2Size() * fb);
}

// Carves 64-byte aligned sub-buffers out of one allocation.
class Carver {
 public:
  template <class T>
  size_t Add(int64_t count) {
    const size_t off = size_;
    size_ += (static_cast<size_t>(std::max<int64_t>(count, 0)) * sizeof(T) + 63) / 64 * 64;
    return off;
  }
  size_t bytes() const { return size_; }

 private:
  size_t size_ = 0;
};

template <class F>
void ParallelFor(const OrtApi* api, OrtKernelContext* ctx, size_t n, F& fn) {
  if (n == 0) return;
  if (n == 1) {
    fn(0);
    return;
  }
  struct Thunk {
    static void Call(void* user, size_t i) { (*static_cast<F*>(user))(i); }
  };
  if (OrtStatus* st = api->KernelContext_ParallelFor(ctx, &Thunk::Call, n, 0, &fn)) {
    api->ReleaseStatus(st);
    for (size_t i = 0; i < n; ++i) fn(i);
  }
}

// --- routing ----------------------------------------------------------------------------------

// a ranks before b: larger first, NaN last (numpy's argsort of -scores puts NaN at the end).
inline bool Before(float a, float b) { return a > b || (std::isnan(b) && !std::isnan(a)); }

// Indices of the k best of v[0..n), best first, equal values in index order.
void TopK(const float* v, int n, int k, int32_t* idx, float* val) {
  int cnt = 0;
  for (int e = 0; e < n; ++e) {
    const float x = v[e];
    if (cnt == k && !Before(x, val[k - 1])) continue;
    int p = cnt < k ? cnt++ : k - 1;
    while (p > 0 && Before(x, val[p - 1])) {
      val[p] = val[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    val[p] = x;
    idx[p] = e;
  }
}

inline float SigmoidScalar(float x) { return 1.0f / (1.0f + std::exp(-x)); }

float MaxNan(const float* v, int n) {
  float m = v[0];
  for (int i = 0; i < n; ++i) {
    if (std::isnan(v[i])) return v[i];
    if (v[i] > m) m = v[i];
  }
  return m;
}

// Group-limited selection: sets the choice values outside the topk_group best groups to -inf. A
// group's score is the sum of its a.group_score_terms() best values.
void MaskGroups(const MoEFFNAttrs& a, float* choice, int E) {
  const int groups = static_cast<int>(a.n_group);
  const int gsize = E / groups;
  const int top = a.group_score_terms(gsize);
  float best[2];
  int32_t besti[2];
  float gscore[1024];
  std::vector<float> gheap;
  float* gs = gscore;
  if (groups > 1024) {
    gheap.resize(groups);
    gs = gheap.data();
  }
  for (int g = 0; g < groups; ++g) {
    TopK(choice + g * gsize, gsize, top, besti, best);
    gs[g] = top == 2 ? best[0] + best[1] : best[0];
  }
  std::vector<int32_t> keep(static_cast<size_t>(a.topk_group));
  std::vector<float> keepv(static_cast<size_t>(a.topk_group));
  TopK(gs, groups, static_cast<int>(a.topk_group), keep.data(), keepv.data());
  std::vector<char> kept(static_cast<size_t>(groups), 0);
  for (int32_t g : keep) kept[g] = 1;
  for (int g = 0; g < groups; ++g) {
    if (kept[g]) continue;
    for (int e = g * gsize; e < (g + 1) * gsize; ++e) choice[e] = -std::numeric_limits<float>::infinity();
  }
}

// Routing of one token: `lg` holds its E logits as float32 (overwritten); work has 2E floats.
void RouteToken(const MoEFFNAttrs& a, float* lg, const float* sel_bias, int E, int32_t* ids,
                float* w, float* work) {
  const int k = static_cast<int>(a.k);
  float* vals = work;  // k <= E
  float* tmp = work + E;
  switch (a.routing_kind) {
    case Routing::kSoftmaxTopk: {
      const float m = MaxNan(lg, E);
      float sum = 0.0f;
      for (int e = 0; e < E; ++e) {
        lg[e] = std::exp(lg[e] - m);
        sum += lg[e];
      }
      for (int e = 0; e < E; ++e) lg[e] = lg[e] / sum;
      if (sel_bias || a.n_group > 1) {  // selection by probability (+ bias), weights the probabilities
        for (int e = 0; e < E; ++e) tmp[e] = sel_bias ? lg[e] + sel_bias[e] : lg[e];
        if (a.n_group > 1) MaskGroups(a, tmp, E);
        TopK(tmp, E, k, ids, vals);
      } else {
        TopK(lg, E, k, ids, vals);
      }
      for (int j = 0; j < k; ++j) w[j] = lg[ids[j]];
      break;
    }
    case Routing::kTopkSoftmax: {
      TopK(lg, E, k, ids, vals);
      const float m = MaxNan(vals, k);
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) {
        w[j] = std::exp(vals[j] - m);
        sum += w[j];
      }
      for (int j = 0; j < k; ++j) w[j] = w[j] / sum;
      break;
    }
    case Routing::kSparsemixer: {  // k = 2 (validated); PhiMoE's sparsemixer at inference
      // pick j: the largest logit not yet picked (tmp: -inf at the picks); its weight: its
      // probability among the logits not yet picked within 2 eps, relative to max(|l|, pick's), of it
      const float thr = 2.0f * a.jitter_eps;
      for (int e = 0; e < E; ++e) tmp[e] = lg[e];
      for (int j = 0; j < 2; ++j) {
        TopK(tmp, E, 1, ids + j, vals);
        const float top = vals[0];
        float sum = 0.0f;
        for (int e = 0; e < E; ++e) {
          const bool drop = (top - lg[e]) / std::max(std::fabs(lg[e]), top) > thr;
          if (!drop) sum += std::exp(tmp[e] - top);
        }
        w[j] = 1.0f / sum;  // exp(pick's logit - top) is 1
        tmp[ids[j]] = -std::numeric_limits<float>::infinity();
      }
      break;
    }
    default: {  // sigmoid_topk
      float* choice = tmp;
      for (int e = 0; e < E; ++e) {
        lg[e] = SigmoidScalar(lg[e]);
        choice[e] = sel_bias ? lg[e] + sel_bias[e] : lg[e];
      }
      if (a.n_group > 1) MaskGroups(a, choice, E);
      TopK(choice, E, k, ids, vals);
      for (int j = 0; j < k; ++j) w[j] = lg[ids[j]];
      break;
    }
  }
  if (a.normalize_topk && a.routing_kind != Routing::kTopkSoftmax && a.routing_kind != Routing::kSparsemixer) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += w[j];
    for (int j = 0; j < k; ++j) w[j] = w[j] / sum;
  }
  if (a.routed_scaling_factor != 1.0f) {
    for (int j = 0; j < k; ++j) w[j] = w[j] * a.routed_scaling_factor;
  }
}

// --- weight access ----------------------------------------------------------------------------

// The first projection's output column n of w1 (or w3) feeding intermediate unit i.
struct Col {
  const void* w = nullptr;  // tensor (null: padding)
  const void* b = nullptr;  // its bias or null
  int64_t n = 0;            // column in that tensor
  int64_t width = 0;        // that tensor's output width
};

Col FirstProjCol(const FFNSource& s, int64_t i, bool up) {
  Col c;
  if (i >= s.I) return c;
  if (!s.gated) return Col{s.w1, s.b1, i, s.I};
  switch (s.gate_up) {
    case GateUpLayout::kHalves:
      return Col{s.w1, s.b1, up ? s.I + i : i, 2 * s.I};
    case GateUpLayout::kInterleaved:
      return Col{s.w1, s.b1, 2 * i + (up ? 1 : 0), 2 * s.I};
    default:
      return up ? Col{s.w3, s.b3, i, s.I} : Col{s.w1, s.b1, i, s.I};
  }
}

// Element (in = d, out = n) of expert e of a stored projection with `in_dim` inputs and
// `out_dim` outputs, as W: float32, or its 16 bits (the stored float16 / bfloat16 value, or the
// upper half of a float32 that holds a bfloat16 value).
template <class W>
inline W ProjAt(const FFNSource& s, const void* w, int64_t e, int64_t d, int64_t n, int64_t in_dim,
                int64_t out_dim) {
  const int64_t idx = s.in_out ? (e * in_dim + d) * out_dim + n : (e * out_dim + n) * in_dim + d;
  if constexpr (std::is_same_v<W, float>) {
    return LoadAsFloat(w, idx, s.elem_type);
  } else if (s.elem_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    // only where every value is one of the 16-bit type (Make sets wtype = exact_16bit): exact
    if (s.exact_16bit == cpu::kWeightF16) return FloatToFp16(static_cast<const float*>(w)[idx]);
    return static_cast<uint16_t>(static_cast<const uint32_t*>(w)[idx] >> 16);
  } else {
    return static_cast<const uint16_t*>(w)[idx];
  }
}

// The chunked layout of cpu_kernels.h: first-projection chunks (gated: 32 gate then 32 up
// columns) into w1 and their biases into b1, down-projection chunks into w2.
template <class W>
void PackChunks(const FFNSource& s, const FFNGeometry& g, int64_t e, W* w1, W* w2, float* b1) {
  const int64_t D = s.D, I = s.I;
  Col cols[cpu::kChunk];
  for (int64_t c = 0; c < g.nc1; ++c) {
    W* blk = w1 + c * D * cpu::kChunk;
    for (int j = 0; j < cpu::kChunk; ++j) {
      cols[j] = s.gated ? FirstProjCol(s, c * cpu::kGatedHalf + (j % cpu::kGatedHalf), j >= cpu::kGatedHalf)
                        : FirstProjCol(s, c * cpu::kChunk + j, false);
      if (b1) {
        b1[c * cpu::kChunk + j] =
            cols[j].w && cols[j].b ? LoadAsFloat(cols[j].b, e * cols[j].width + cols[j].n, s.elem_type) : 0.0f;
      }
    }
    auto at = [&](int64_t d, int j) {
      return cols[j].w ? ProjAt<W>(s, cols[j].w, e, d, cols[j].n, D, cols[j].width) : W(0);
    };
    if (s.in_out) {  // source rows are contiguous over outputs: walk d outside
      for (int64_t d = 0; d < D; ++d)
        for (int j = 0; j < cpu::kChunk; ++j) blk[d * cpu::kChunk + j] = at(d, j);
    } else {  // source rows are contiguous over inputs: walk d inside
      for (int j = 0; j < cpu::kChunk; ++j)
        for (int64_t d = 0; d < D; ++d) blk[d * cpu::kChunk + j] = at(d, j);
    }
  }
  for (int64_t c = 0; c < g.nc2; ++c) {
    W* blk = w2 + c * g.Ipad * cpu::kChunk;
    std::memset(blk, 0, sizeof(W) * g.Ipad * cpu::kChunk);  // all-zero bits: +0 in every type
    const int ncols = static_cast<int>(std::min<int64_t>(cpu::kChunk, D - c * cpu::kChunk));
    if (s.in_out) {
      for (int64_t i = 0; i < I; ++i)
        for (int j = 0; j < ncols; ++j) blk[i * cpu::kChunk + j] = ProjAt<W>(s, s.w2, e, i, c * cpu::kChunk + j, I, D);
    } else {
      for (int j = 0; j < ncols; ++j)
        for (int64_t i = 0; i < I; ++i) blk[i * cpu::kChunk + j] = ProjAt<W>(s, s.w2, e, i, c * cpu::kChunk + j, I, D);
    }
  }
}

}  // namespace

FFNGeometry FFNGeometry::Make(const FFNSource& s, bool allow_direct, bool keep_half) {
  FFNGeometry g;
  g.E = s.E;
  g.D = s.D;
  g.I = s.I;
  g.gated = s.gated;
  g.direct = allow_direct && s.I <= kDirectMaxInter;
  g.Dpad = CeilDiv(s.D, cpu::kChunk) * cpu::kChunk;
  g.has_b1 = s.b1 != nullptr || s.b3 != nullptr;
  g.has_b2 = s.b2 != nullptr;
  if (g.direct) {
    g.rows1 = s.gated ? 2 * s.I : s.I;
    g.Ipad = s.I;
  } else {
    const int64_t per = s.gated ? cpu::kGatedHalf : cpu::kChunk;
    g.nc1 = CeilDiv(s.I, per);
    g.Ipad = g.nc1 * per;
    g.nc2 = CeilDiv(s.D, cpu::kChunk);
  }
  if (keep_half) {
    g.wtype = s.elem_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16    ? cpu::kWeightF16
              : s.elem_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 ? cpu::kWeightBF16
                                                                       : s.exact_16bit;
  }
  return g;
}

// The direct path's rows (w1 [rows1, D], w2 [I, D]) of element type W, and w1's biases.
template <class W>
void PackRows(const FFNSource& s, const FFNGeometry& g, int64_t e, W* w1, W* w2, float* b1) {
  const int64_t D = s.D, I = s.I;
  for (int64_t r = 0; r < g.rows1; ++r) {
    const bool up = s.gated && r >= I;
    const Col c = FirstProjCol(s, up ? r - I : r, up);
    for (int64_t d = 0; d < D; ++d) w1[r * D + d] = ProjAt<W>(s, c.w, e, d, c.n, D, c.width);
    if (b1) b1[r] = c.b ? LoadAsFloat(c.b, e * c.width + c.n, s.elem_type) : 0.0f;
  }
  for (int64_t i = 0; i < I; ++i)
    for (int64_t d = 0; d < D; ++d) w2[i * D + d] = ProjAt<W>(s, s.w2, e, i, d, I, D);
}

void PackExpert(const FFNSource& s, const FFNGeometry& g, int64_t e, void* w1v, void* w2v, float* b1,
                float* b2) {
  const int64_t D = s.D;
  if (g.direct && g.wtype == cpu::kWeightF32) {
    PackRows(s, g, e, static_cast<float*>(w1v), static_cast<float*>(w2v), b1);
  } else if (g.direct) {
    PackRows(s, g, e, static_cast<uint16_t*>(w1v), static_cast<uint16_t*>(w2v), b1);
  } else if (g.wtype == cpu::kWeightF32) {
    PackChunks(s, g, e, static_cast<float*>(w1v), static_cast<float*>(w2v), b1);
  } else {
    PackChunks(s, g, e, static_cast<uint16_t*>(w1v), static_cast<uint16_t*>(w2v), b1);
  }
  if (b2) {
    for (int64_t d = 0; d < g.Dpad; ++d) b2[d] = d < D ? LoadAsFloat(s.b2, e * D + d, s.elem_type) : 0.0f;
  }
}

namespace {

std::unique_ptr<PackedFFN> PackAll(const FFNSource& s, bool allow_direct, bool keep_half) {
  auto p = std::make_unique<PackedFFN>();
  FFNGeometry g = FFNGeometry::Make(s, allow_direct, keep_half);
  p->view.g = g;
  const int64_t wb = g.WeightBytes();
  p->w1.Reset(static_cast<size_t>(g.E * g.W1Size() * wb));
  p->w2.Reset(static_cast<size_t>(g.E * g.W2Size() * wb));
  if (g.has_b1) p->b1.Reset(static_cast<size_t>(g.E * g.B1Size()) * sizeof(float));
  if (g.has_b2) p->b2.Reset(static_cast<size_t>(g.E * g.B2Size()) * sizeof(float));
  p->view.w1.resize(g.E);
  p->view.w2.resize(g.E);
  p->view.b1.assign(g.E, nullptr);
  p->view.b2.assign(g.E, nullptr);
  for (int64_t e = 0; e < g.E; ++e) {
    char* w1 = p->w1.as<char>() + e * g.W1Size() * wb;  // whole chunks: 64-byte aligned
    char* w2 = p->w2.as<char>() + e * g.W2Size() * wb;
    float* b1 = g.has_b1 ? p->b1.as<float>() + e * g.B1Size() : nullptr;
    float* b2 = g.has_b2 ? p->b2.as<float>() + e * g.B2Size() : nullptr;
    PackExpert(s, g, e, w1, w2, b1, b2);
    p->view.w1[e] = w1;
    p->view.w2[e] = w2;
    p->view.b1[e] = b1;
    p->view.b2[e] = b2;
  }
  return p;
}

// Routed / shared FFN sources from inputs known to be valid (Validate passed).
FFNSource RoutedSource(const MoEFFNAttrs& a, const Value* in, int64_t E, int64_t D, int64_t I) {
  FFNSource s;
  s.w1 = in[kW1].data;
  s.w2 = in[kW2].data;
  s.w3 = in[kW3].data;
  s.b1 = in[kB1].data;
  s.b2 = in[kB2].data;
  s.b3 = in[kB3].data;
  s.elem_type = in[kW1].type;
  s.in_out = a.in_out();
  s.gated = a.gated != 0;
  s.gate_up = a.gate_up_kind;
  s.E = E;
  s.D = D;
  s.I = I;
  return s;
}

FFNSource SharedSource(const MoEFFNAttrs& a, const Value* in, int64_t D, int64_t Is) {
  FFNSource s;
  s.w1 = in[kSharedW1].data;
  s.w2 = in[kSharedW2].data;
  s.w3 = in[kSharedW3].data;
  s.elem_type = in[kSharedW1].type;
  s.in_out = a.in_out();
  s.gated = a.gated != 0;
  s.gate_up = s.w3 ? GateUpLayout::kSeparate : a.gate_up_kind;
  s.E = 1;
  s.D = D;
  s.I = Is;
  return s;
}

void AssignSlot(const FFNGeometry& g, char* slot, FFNView* view, int64_t e) {
  const int64_t wb = g.WeightBytes(), fb = sizeof(float);
  view->w1[e] = slot;
  slot += Lines(g.W1Size() * wb);
  view->w2[e] = slot;
  slot += Lines(g.W2Size() * wb);
  view->b1[e] = g.has_b1 ? reinterpret_cast<float*>(slot) : nullptr;
  slot += Lines(g.B1Size() * fb);
  view->b2[e] = g.has_b2 ? reinterpret_cast<float*>(slot) : nullptr;
}

// Whether every element of a float32 tensor is a bfloat16 value (its low 16 bits zero), as in a
// float32 export of a bfloat16 checkpoint: such weights pack as bfloat16, losslessly.
bool HoldsBf16Values(const Value& v) {
  const uint32_t* p = static_cast<const uint32_t*>(v.data);
  const int64_t n = Numel(v.dims);
  for (int64_t i0 = 0; i0 < n; i0 += 4096) {  // blocks: an early answer for the usual float32 weights
    uint32_t low = 0;
    for (int64_t i = i0, i1 = std::min<int64_t>(n, i0 + 4096); i < i1; ++i) low |= p[i];
    if (low & 0xffffu) return false;
  }
  return true;
}

// Whether every element of a float32 tensor is a float16 value (it converts to float16 and back
// to the same bits), as in a float32 export of a float16 checkpoint.
bool HoldsFp16Values(const Value& v) {
  const float* p = static_cast<const float*>(v.data);
  const int64_t n = Numel(v.dims);
  for (int64_t i = 0; i < n; ++i) {
    if (FloatToBits(Fp16ToFloat(FloatToFp16(p[i]))) != FloatToBits(p[i])) return false;
  }
  return true;
}

// The 16-bit type (cpu::WeightType) that holds every value of these float32 weights, else
// kWeightF32.
int Exact16BitType(const std::vector<const Value*>& weights) {
  auto all = [&](bool (*holds)(const Value&)) {
    return std::all_of(weights.begin(), weights.end(), [&](const Value* v) { return holds(*v); });
  };
  if (!all([](const Value& v) { return v.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; })) return cpu::kWeightF32;
  if (all(HoldsBf16Values)) return cpu::kWeightBF16;
  if (all(HoldsFp16Values)) return cpu::kWeightF16;
  return cpu::kWeightF32;
}

bool SameGeometry(const FFNGeometry& g, int64_t E, int64_t D, int64_t I) {
  return g.E == E && g.D == D && g.I == I;
}

}  // namespace

// --- kernel creation --------------------------------------------------------------------------

MoEFFNCpuKernel::~MoEFFNCpuKernel() = default;

OrtStatus* MoEFFNCpuKernel::Error(OrtErrorCode code, const std::string& msg) const {
  return api_->CreateStatus(code, msg.c_str());
}

OrtStatus* MoEFFNCpuKernel::Create(const OrtApi* api, const OrtKernelInfo* info, int declared_type,
                                   MoEFFNCpuKernel** out) {
  (void)declared_type;
  std::unique_ptr<MoEFFNCpuKernel> k(new MoEFFNCpuKernel());
  k->api_ = api;
  k->node_name_ = ReadNodeName(api, info);
  k->attrs_ = ReadAttrs(api, info);
  std::string err = CheckAttrs(k->attrs_, k->node_name_);
  if (!err.empty()) return api->CreateStatus(ORT_INVALID_ARGUMENT, err.c_str());
  k->kernels_ = &cpu::Select();
  k->keep_half_ = cpu::PacksHalfWeights(*k->kernels_);  // half the bytes to keep and to stream
  try {
    k->TryPrepack(info);
  } catch (const std::bad_alloc&) {
    return api->CreateStatus(ORT_FAIL, (Who(k->node_name_) + ": out of memory packing the expert weights").c_str());
  }
  *out = k.release();
  return nullptr;
}

void MoEFFNCpuKernel::TryPrepack(const OrtKernelInfo* info) {
  size_t count = 0;
  if (OrtStatus* st = api_->KernelInfo_GetInputCount(info, &count)) {
    api_->ReleaseStatus(st);
    return;
  }
  Value in[kNumInputs];
  bool present[kNumInputs] = {};
  bool constant[kNumInputs] = {};
  for (size_t i = 0; i < count && i < kNumInputs; ++i) {
    size_t len = 0;
    if (OrtStatus* st = api_->KernelInfo_GetInputName(info, i, nullptr, &len)) {
      api_->ReleaseStatus(st);
      continue;
    }
    std::vector<char> name(len + 1, '\0');
    if (OrtStatus* st = api_->KernelInfo_GetInputName(info, i, name.data(), &len)) {
      api_->ReleaseStatus(st);
      continue;
    }
    present[i] = name[0] != '\0';
    if (!present[i]) continue;
    int is_const = 0;
    const OrtValue* v = nullptr;
    if (OrtStatus* st = api_->KernelInfoGetConstantInput_tensor(info, i, &is_const, &v)) {
      api_->ReleaseStatus(st);
      continue;
    }
    if (is_const && v && Describe(api_, v, &in[i])) constant[i] = true;
  }
  const MoEFFNAttrs& a = attrs_;
  const bool in_out = a.in_out();
  auto all_const = [&](std::initializer_list<int> idx) {
    for (int i : idx)
      if (present[i] && !constant[i]) return false;
    return true;
  };
  auto dims_are = [&](int i, std::vector<int64_t> want) { return !present[i] || in[i].dims == want; };
  // Packs `src`, whose matrices are the inputs `matrices`; float32 ones that all hold values of a
  // 16-bit type pack as that type.
  auto pack = [&](FFNSource src, std::initializer_list<int> matrices, bool allow_direct) {
    if (keep_half_) {
      std::vector<const Value*> values;
      for (int i : matrices)
        if (present[i]) values.push_back(&in[i]);
      src.exact_16bit = Exact16BitType(values);
    }
    return PackAll(src, allow_direct, keep_half_);
  };

  // Routed experts: pack when every routed weight is constant and the shapes agree.
  if (present[kW1] && present[kW2] && all_const({kW1, kW2, kW3, kB1, kB2, kB3}) &&
      in[kW1].dims.size() == 3) {
    const auto& w1 = in[kW1].dims;
    const int64_t E = w1[0], D = in_out ? w1[1] : w1[2], N1 = in_out ? w1[2] : w1[1];
    const bool fused = a.fused_gate_up();
    const bool separate = a.separate_gate_up();
    const int64_t I = fused ? N1 / 2 : N1;
    bool ok = E >= 1 && D >= 1 && I >= 1 && (!fused || N1 % 2 == 0) && (separate == present[kW3]);
    ok = ok && dims_are(kW2, in_out ? std::vector<int64_t>{E, I, D} : std::vector<int64_t>{E, D, I});
    ok = ok && dims_are(kW3, w1) && dims_are(kB1, {E, N1}) && dims_are(kB2, {E, D}) &&
         dims_are(kB3, {E, I}) && (!present[kB3] || separate);
    for (int i : {kW2, kW3, kB1, kB2, kB3})
      if (present[i] && in[i].type != in[kW1].type) ok = false;
    const int t = in[kW1].type;
    ok = ok && (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ||
                t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16);
    if (ok) routed_ = pack(RoutedSource(a, in, E, D, I), {kW1, kW2, kW3}, true);
  }
  // Shared expert.
  if (present[kSharedW1] && present[kSharedW2] && all_const({kSharedW1, kSharedW2, kSharedW3}) &&
      in[kSharedW1].dims.size() == 2) {
    const auto& s1 = in[kSharedW1].dims;
    const int64_t D = in_out ? s1[0] : s1[1], N1 = in_out ? s1[1] : s1[0];
    const bool separate = present[kSharedW3];
    const bool fused = a.gated && !separate;
    const int64_t Is = fused ? N1 / 2 : N1;
    bool ok = D >= 1 && Is >= 1 && (!fused || N1 % 2 == 0) && (a.gated || !separate) &&
              !(fused && a.gate_up_kind == GateUpLayout::kSeparate);
    ok = ok && dims_are(kSharedW2, in_out ? std::vector<int64_t>{Is, D} : std::vector<int64_t>{D, Is});
    ok = ok && dims_are(kSharedW3, s1);
    for (int i : {kSharedW2, kSharedW3})
      if (present[i] && in[i].type != in[kSharedW1].type) ok = false;
    const int t = in[kSharedW1].type;
    ok = ok && (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ||
                t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16);
    if (ok) shared_ = pack(SharedSource(a, in, D, Is), {kSharedW1, kSharedW2, kSharedW3}, false);
  }
}

MoEFFNCpuKernel::Arena* MoEFFNCpuKernel::AcquireArena() {
  std::lock_guard<std::mutex> lock(arena_mu_);
  if (!free_arenas_.empty()) {
    Arena* a = free_arenas_.back();
    free_arenas_.pop_back();
    return a;
  }
  arenas_.push_back(std::make_unique<Arena>());
  return arenas_.back().get();
}

void MoEFFNCpuKernel::ReleaseArena(Arena* a) {
  std::lock_guard<std::mutex> lock(arena_mu_);
  free_arenas_.push_back(a);
}

// --- compute ----------------------------------------------------------------------------------

namespace {

// One group of rows that share weights: a routed expert, or the shared expert over all tokens.
struct Group {
  const FFNView* ffn;
  int64_t expert;
  int64_t row0;   // first row in pair space (routed pairs first, then shared rows)
  int64_t rows;
};

struct Job {
  int32_t group;
  int32_t chunk;
  int32_t r0;
  int32_t rows;
};

}  // namespace

OrtStatus* MoEFFNCpuKernel::Compute(OrtKernelContext* ctx) {
  const OrtApi* api = api_;
  CallStart call;
  if (OrtStatus* st = StartCall(api, ctx, node_name_, attrs_, &call)) return st;
  const Value* in = call.in;
  const MoEFFNAttrs& a = call.attrs;
  const MoEFFNShape& sh = call.shape;
  const int64_t T = sh.tokens, D = sh.hidden, E = sh.experts, I = sh.inter, Is = sh.shared_inter;
  if (T == 0) return nullptr;
  // what the router ranks: the E experts, then the zero experts (a pick of one adds w * x)
  const int64_t Er = E + a.zero_experts;
  void* ydata = call.y;

  const int t_type = sh.elem_type;
  const bool f32 = t_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  const int64_t K = a.k;
  const bool precomputed = a.routing_kind == Routing::kPrecomputed;
  const bool woi = a.weight_on_input != 0;
  const bool has_shared = in[kSharedW1].v != nullptr;
  const bool has_sgate = in[kSharedGate].v != nullptr;
  const cpu::Kernels& kern = *kernels_;

  // Weights: prepacked, or packed here for the experts this call uses.
  const FFNSource rsrc = RoutedSource(a, in, E, D, I);
  const bool routed_packed = routed_ && SameGeometry(routed_->view.g, E, D, I) &&
                             routed_->view.g.has_b1 == (rsrc.b1 || rsrc.b3) &&
                             routed_->view.g.has_b2 == (rsrc.b2 != nullptr);
  FFNView routed_call;
  const FFNView* rview = routed_packed ? &routed_->view : &routed_call;
  if (!routed_packed) {
    routed_call.g = FFNGeometry::Make(rsrc, true, keep_half_);
    routed_call.w1.assign(E, nullptr);
    routed_call.w2.assign(E, nullptr);
    routed_call.b1.assign(E, nullptr);
    routed_call.b2.assign(E, nullptr);
  }
  const FFNGeometry& rg = rview->g;
  const bool direct = rg.direct;
  FFNSource ssrc;
  FFNView shared_call;
  const FFNView* sview = nullptr;
  if (has_shared) {
    ssrc = SharedSource(a, in, D, Is);
    if (shared_ && SameGeometry(shared_->view.g, 1, D, Is)) {
      sview = &shared_->view;
    } else {
      shared_call.g = FFNGeometry::Make(ssrc, false, keep_half_);
      shared_call.w1.assign(1, nullptr);
      shared_call.w2.assign(1, nullptr);
      shared_call.b1.assign(1, nullptr);
      shared_call.b2.assign(1, nullptr);
      sview = &shared_call;
    }
  }
  const int64_t P = direct ? 0 : T * K;        // routed pair rows
  const int64_t Tsh = has_shared ? T : 0;      // shared rows
  const int64_t R = P + Tsh;
  const int64_t nblocks = CeilDiv(T, kTokenBlock);
  const int64_t r_ipad = direct ? 0 : rg.Ipad;
  const int64_t s_ipad = sview ? sview->g.Ipad : 0;

  // Scratch layout.
  Carver cv;
  const size_t o_xf = cv.Add<float>(f32 ? 0 : T * D);
  const size_t o_ids = cv.Add<int32_t>(T * K);
  const size_t o_w = cv.Add<float>(T * K);
  const size_t o_sg = cv.Add<float>(has_sgate ? T : 0);
  const size_t o_gatev = cv.Add<float>(has_sgate ? D : 0);
  const int64_t Elg = precomputed ? 0 : Er;  // logits a token (none with precomputed routing)
  const size_t o_selb = cv.Add<float>(Elg);
  const size_t o_route = cv.Add<float>(nblocks * 3 * Elg);
  const size_t o_pos = cv.Add<int64_t>(P);
  const size_t o_ptok = cv.Add<int64_t>(P);
  const size_t o_xrows = cv.Add<const float*>(R);
  const size_t o_arows = cv.Add<const float*>(R);
  const size_t o_xs = cv.Add<float>(woi ? P * D : 0);
  const size_t o_act = cv.Add<float>(P * r_ipad + Tsh * s_ipad);
  const size_t o_out = cv.Add<float>(R * D);
  const int64_t direct_tmp = direct ? (3 * D + rg.rows1 + 2 * rg.I) : 0;
  const size_t o_comb = cv.Add<float>(nblocks * ((f32 ? 0 : D) + direct_tmp));
  // per-call packing: sized after routing (active experts unknown yet): reserve the worst case
  const int64_t max_active = std::min<int64_t>(E, T * K);
  const int64_t r_pack = routed_packed ? 0 : max_active * SlotBytes(rg);
  const int64_t s_pack = (sview && sview == &shared_call) ? SlotBytes(sview->g) : 0;
  const size_t o_pack = cv.Add<char>(r_pack + s_pack);

  Arena* arena = AcquireArena();
  struct ArenaGuard {
    MoEFFNCpuKernel* k;
    Arena* a;
    ~ArenaGuard() { k->ReleaseArena(a); }
  } guard{this, arena};
  const size_t need = cv.bytes();
  try {
    if (arena->buf.bytes() < need) arena->buf.Reset(need + need / 4);
  } catch (const std::bad_alloc&) {
    return Error(ORT_FAIL, Who(node_name_) + ": out of memory for " + std::to_string(cv.bytes()) +
                               " bytes of scratch");
  }
  char* base = arena->buf.as<char>();
  auto at = [&](size_t off) { return static_cast<void*>(base + off); };
  float* xf = f32 ? nullptr : static_cast<float*>(at(o_xf));
  int32_t* ids = static_cast<int32_t*>(at(o_ids));
  float* wts = static_cast<float*>(at(o_w));
  float* sg = static_cast<float*>(at(o_sg));
  float* gatev = static_cast<float*>(at(o_gatev));
  float* selb = in[kSelectionBias].v ? static_cast<float*>(at(o_selb)) : nullptr;
  float* route_tmp = static_cast<float*>(at(o_route));
  int64_t* pos = static_cast<int64_t*>(at(o_pos));
  int64_t* ptok = static_cast<int64_t*>(at(o_ptok));
  const float** xrows = static_cast<const float**>(at(o_xrows));
  const float** arows = static_cast<const float**>(at(o_arows));
  float* xs = static_cast<float*>(at(o_xs));
  float* act = static_cast<float*>(at(o_act));
  float* outb = static_cast<float*>(at(o_out));
  float* comb = static_cast<float*>(at(o_comb));
  char* pack = static_cast<char*>(at(o_pack));

  const float* X32 = f32 ? static_cast<const float*>(in[kX].data) : xf;
  if (has_sgate) ToFloat(in[kSharedGate].data, t_type, gatev, D);
  if (selb) ToFloat(in[kSelectionBias].data, t_type, selb, Er);

  // A. inputs to float32, routing, shared gate.
  std::atomic<int64_t> bad_token{-1};
  std::atomic<int64_t> bad_id{0};
  {
    const void* lg_data = in[kRouterLogits].data;
    const void* id_data = in[kTopkIds].data;
    const int id_type = in[kTopkIds].type;
    const void* tw_data = in[kTopkWeights].data;
    auto phase_a = [&](size_t blk) {
      const int64_t t0 = static_cast<int64_t>(blk) * kTokenBlock;
      const int64_t t1 = std::min<int64_t>(T, t0 + kTokenBlock);
      float* lg = route_tmp + static_cast<int64_t>(blk) * 3 * Elg;
      for (int64_t t = t0; t < t1; ++t) {
        if (!f32) ToFloat(static_cast<const char*>(in[kX].data) + t * D * 2, t_type, xf + t * D, D);
        if (has_sgate) sg[t] = SigmoidScalar(kern.dot(X32 + t * D, gatev, D));
        int32_t* tid = ids + t * K;
        float* tw = wts + t * K;
        if (precomputed) {
          for (int64_t j = 0; j < K; ++j) {
            const int64_t id = id_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32
                                   ? static_cast<const int32_t*>(id_data)[t * K + j]
                                   : static_cast<const int64_t*>(id_data)[t * K + j];
            if (id < 0 || id >= Er) {
              int64_t expected = -1;
              if (bad_token.compare_exchange_strong(expected, t)) bad_id.store(id);
              tid[j] = 0;
            } else {
              tid[j] = static_cast<int32_t>(id);
            }
            tw[j] = LoadAsFloat(tw_data, t * K + j, t_type);
            if (a.routed_scaling_factor != 1.0f) tw[j] = tw[j] * a.routed_scaling_factor;
          }
        } else {
          ToFloat(static_cast<const char*>(lg_data) + t * Er * (f32 ? 4 : 2), t_type, lg, Er);
          RouteToken(a, lg, selb, static_cast<int>(Er), tid, tw, lg + Er);
        }
      }
    };
    ParallelFor(api, ctx, static_cast<size_t>(nblocks), phase_a);
  }
  if (bad_token.load() >= 0) {
    return Error(ORT_INVALID_ARGUMENT,
                 Who(node_name_) + ": input 'topk_ids' (#9) holds an expert id outside [0, " + std::to_string(Er) +
                     "): " + std::to_string(bad_id.load()) + " for token " + std::to_string(bad_token.load()));
  }

  // B. group pairs by expert; rows and jobs.
  std::vector<Group> groups;
  std::vector<int64_t> offs;
  if (!direct) {
    // zero-expert pairs (ids >= E) sort last, as one more bucket; their rows are never computed
    offs.assign(E + 2, 0);
    for (int64_t i = 0; i < T * K; ++i) ++offs[std::min<int64_t>(ids[i], E) + 1];
    for (int64_t e = 0; e <= E; ++e) offs[e + 1] += offs[e];
    std::vector<int64_t> fill(offs.begin(), offs.end() - 1);
    for (int64_t i = 0; i < T * K; ++i) {
      const int64_t p = fill[std::min<int64_t>(ids[i], E)]++;
      pos[i] = p;
      ptok[p] = i / K;
    }
    for (int64_t p = 0; p < P; ++p) {
      xrows[p] = woi ? xs + p * D : X32 + ptok[p] * D;
      arows[p] = act + p * r_ipad;
    }
    int64_t slot = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (offs[e + 1] == offs[e]) continue;
      groups.push_back(Group{rview, e, offs[e], offs[e + 1] - offs[e]});
      if (!routed_packed) {
        AssignSlot(rg, pack + slot * SlotBytes(rg), &routed_call, e);
        ++slot;
      }
    }
  } else if (!routed_packed) {
    // direct path without constant weights: pack the experts this call uses
    std::vector<char> used(E, 0);
    for (int64_t i = 0; i < T * K; ++i)
      if (ids[i] < E) used[ids[i]] = 1;
    int64_t slot = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (!used[e]) continue;
      AssignSlot(rg, pack + slot * SlotBytes(rg), &routed_call, e);
      ++slot;
    }
  }
  if (has_shared) {
    for (int64_t t = 0; t < T; ++t) {
      xrows[P + t] = X32 + t * D;
      arows[P + t] = act + P * r_ipad + t * s_ipad;
    }
    groups.push_back(Group{sview, 0, P, T});
    if (sview == &shared_call) AssignSlot(shared_call.g, pack + r_pack, &shared_call, 0);
  }

  // C. weight_on_input scaling and per-call packing.
  {
    struct Item {
      int kind;  // 0: scale rows, 1: pack routed expert, 2: pack shared
      int64_t a;
    };
    std::vector<Item> items;
    if (woi && !direct) {
      for (int64_t p0 = 0; p0 < P; p0 += 64) items.push_back(Item{0, p0});
    }
    if (!routed_packed) {
      for (int64_t e = 0; e < E; ++e)
        if (routed_call.w1[e]) items.push_back(Item{1, e});
    }
    if (sview == &shared_call) items.push_back(Item{2, 0});
    // weight of pair p (for scaling): wts at the (token, slot) that maps to p
    std::vector<float> pair_w;
    if (woi && !direct) {
      pair_w.resize(P);
      for (int64_t i = 0; i < T * K; ++i) pair_w[pos[i]] = wts[i];
    }
    auto phase_c = [&](size_t n) {
      const Item& it = items[n];
      if (it.kind == 0) {
        const int64_t p1 = std::min<int64_t>(P, it.a + 64);
        for (int64_t p = it.a; p < p1; ++p) {
          const float* x = X32 + ptok[p] * D;
          float* dst = xs + p * D;
          const float w = pair_w[p];
          for (int64_t d = 0; d < D; ++d) dst[d] = x[d] * w;
        }
      } else if (it.kind == 1) {
        PackExpert(rsrc, rg, it.a, const_cast<void*>(routed_call.w1[it.a]),
                   const_cast<void*>(routed_call.w2[it.a]), const_cast<float*>(routed_call.b1[it.a]),
                   const_cast<float*>(routed_call.b2[it.a]));
      } else {
        PackExpert(ssrc, shared_call.g, 0, const_cast<void*>(shared_call.w1[0]),
                   const_cast<void*>(shared_call.w2[0]), nullptr, nullptr);
      }
    };
    ParallelFor(api, ctx, items.size(), phase_c);
  }

  // D and E: the two projections of every group, as tile jobs.
  if (!groups.empty()) {
    std::vector<Job> jobs;
    for (int phase = 1; phase <= 2; ++phase) {
      jobs.clear();
      for (size_t gi = 0; gi < groups.size(); ++gi) {
        const Group& g = groups[gi];
        const FFNGeometry& geo = g.ffn->g;
        const int64_t nchunks = phase == 1 ? geo.nc1 : geo.nc2;
        for (int64_t c = 0; c < nchunks; ++c)
          for (int64_t r0 = 0; r0 < g.rows; r0 += kRowBlock)
            jobs.push_back(Job{static_cast<int32_t>(gi), static_cast<int32_t>(c), static_cast<int32_t>(r0),
                               static_cast<int32_t>(std::min<int64_t>(kRowBlock, g.rows - r0))});
      }
      auto run_job = [&](size_t n) {
        const Job& j = jobs[n];
        const Group& g = groups[j.group];
        const FFNView& v = *g.ffn;
        const FFNGeometry& geo = v.g;
        cpu::TileJob tj;
        tj.rows = j.rows;
        tj.b_type = geo.wtype;
        tj.act.kind = static_cast<int>(a.activation_kind);
        tj.act.alpha = a.activation_alpha;
        tj.act.clamp_limit = a.clamp_limit;
        tj.act.up_offset = a.up_offset;
        const int64_t row = g.row0 + j.r0;
        if (phase == 1) {
          tj.K = static_cast<int>(D);
          tj.a = xrows + row;
          tj.b = static_cast<const char*>(v.w1[g.expert]) + j.chunk * D * cpu::kChunk * geo.WeightBytes();
          tj.bias = v.b1[g.expert] ? v.b1[g.expert] + static_cast<int64_t>(j.chunk) * cpu::kChunk : nullptr;
          const int64_t per = geo.gated ? cpu::kGatedHalf : cpu::kChunk;
          tj.out = const_cast<float*>(arows[row]) + j.chunk * per;
          tj.ldo = geo.Ipad;
          tj.epilogue = geo.gated ? cpu::kEpiGated : cpu::kEpiAct;
        } else {
          tj.K = static_cast<int>(geo.Ipad);
          tj.a = arows + row;
          tj.b = static_cast<const char*>(v.w2[g.expert]) + j.chunk * geo.Ipad * cpu::kChunk * geo.WeightBytes();
          tj.bias = v.b2[g.expert] ? v.b2[g.expert] + static_cast<int64_t>(j.chunk) * cpu::kChunk : nullptr;
          tj.out = outb + row * D + static_cast<int64_t>(j.chunk) * cpu::kChunk;
          tj.ldo = D;
          tj.ncols = static_cast<int>(std::min<int64_t>(cpu::kChunk, D - static_cast<int64_t>(j.chunk) * cpu::kChunk));
          tj.epilogue = cpu::kEpiBias;
        }
        kern.tile(tj);
      };
      ParallelFor(api, ctx, jobs.size(), run_job);
    }
  }

  // F. combine.
  {
    const int64_t zero_row0 = direct ? 0 : offs[E];  // the first zero-expert pair's row
    const float* shared_out = outb + P * D;
    auto phase_f = [&](size_t blk) {
      const int64_t t0 = static_cast<int64_t>(blk) * kTokenBlock;
      const int64_t t1 = std::min<int64_t>(T, t0 + kTokenBlock);
      float* tmp = comb + static_cast<int64_t>(blk) * ((f32 ? 0 : D) + direct_tmp);
      float* dtmp = tmp + (f32 ? 0 : D);
      int64_t order_pos[64];
      float order_w[64];
      std::vector<int64_t> heap_pos;
      std::vector<float> heap_w;
      int64_t* opos = order_pos;
      float* ow = order_w;
      if (K > 64) {
        heap_pos.resize(K);
        heap_w.resize(K);
        opos = heap_pos.data();
        ow = heap_w.data();
      }
      for (int64_t t = t0; t < t1; ++t) {
        float* y = f32 ? static_cast<float*>(ydata) + t * D : tmp;
        for (int64_t d = 0; d < D; ++d) y[d] = 0.0f;
        // the token's pairs in ascending expert order (slot order among equal experts)
        for (int64_t j = 0; j < K; ++j) {
          const int64_t key = direct ? static_cast<int64_t>(ids[t * K + j]) * K + j : pos[t * K + j];
          int64_t q = j;
          while (q > 0 && opos[q - 1] > key) {
            opos[q] = opos[q - 1];
            ow[q] = ow[q - 1];
            --q;
          }
          opos[q] = key;
          ow[q] = wts[t * K + j];
        }
        const float* x = X32 + t * D;
        for (int64_t j = 0; j < K; ++j) {
          const float w = ow[j];
          const float* o;
          if (direct ? opos[j] / K >= E : opos[j] >= zero_row0) {  // a zero expert: w * x
            for (int64_t d = 0; d < D; ++d) y[d] += w * x[d];
            continue;
          }
          if (direct) {
            // f_e(x) for a small-intermediate expert: rows1 dot products, activation, I axpys
            const int64_t e = opos[j] / K;
            float* xin = dtmp;
            float* h = xin + D;
            float* av = h + rg.rows1;
            float* fo = av + 2 * rg.I;
            float* wide = fo + D;  // a 16-bit row widened
            const float* xi = x;
            if (woi) {
              for (int64_t d = 0; d < D; ++d) xin[d] = x[d] * w;
              xi = xin;
            }
            const RowsOf w1{rview->w1[e], rg.wtype, D, wide, kern}, w2{rview->w2[e], rg.wtype, D, wide, kern};
            const float* b1 = rview->b1[e];
            for (int64_t r = 0; r < rg.rows1; ++r) h[r] = w1.Dot(xi, r) + (b1 ? b1[r] : 0.0f);
            cpu::ActParams ap;
            ap.kind = static_cast<int>(a.activation_kind);
            ap.alpha = a.activation_alpha;
            if (rg.gated) {
              float* gte = av;
              float* up = av + rg.I;
              for (int64_t i = 0; i < rg.I; ++i) {
                float gv = h[i], uv = h[rg.I + i];
                if (a.clamp_limit > 0.0f) {
                  const float l = a.clamp_limit;
                  gv = gv > l ? l : gv;
                  uv = uv > l ? l : (uv < -l ? -l : uv);
                }
                gte[i] = gv;
                up[i] = uv + a.up_offset;
              }
              kern.activate(gte, rg.I, ap);
              for (int64_t i = 0; i < rg.I; ++i) av[i] = gte[i] * up[i];
            } else {
              for (int64_t i = 0; i < rg.I; ++i) av[i] = h[i];
              kern.activate(av, rg.I, ap);
            }
            const float* w2r = w2.Row(0);
            for (int64_t d = 0; d < D; ++d) fo[d] = av[0] * w2r[d];
            for (int64_t i = 1; i < rg.I; ++i) {
              w2r = w2.Row(i);
              for (int64_t d = 0; d < D; ++d) fo[d] += av[i] * w2r[d];
            }
            if (const float* b2 = rview->b2[e])
              for (int64_t d = 0; d < D; ++d) fo[d] += b2[d];
            o = fo;
          } else {
            o = outb + opos[j] * D;
          }
          if (woi) {
            for (int64_t d = 0; d < D; ++d) y[d] += o[d];
          } else {
            for (int64_t d = 0; d < D; ++d) y[d] += w * o[d];
          }
        }
        if (has_shared) {
          const float* z = shared_out + t * D;
          if (has_sgate) {
            const float s = sg[t];
            for (int64_t d = 0; d < D; ++d) y[d] += z[d] * s;
          } else {
            for (int64_t d = 0; d < D; ++d) y[d] += z[d];
          }
        }
        if (!f32) FromFloat(y, t_type, static_cast<char*>(ydata) + t * D * 2, D);
      }
    };
    ParallelFor(api, ctx, static_cast<size_t>(nblocks), phase_f);
  }
  return nullptr;
}

}  // namespace moefuse
