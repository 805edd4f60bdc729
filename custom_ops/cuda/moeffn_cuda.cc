// MoEFFN on onnxruntime's CUDA execution provider: the kernel object (creation, validation, path
// choice, scratch memory) and its registration. The device code is in the *.cu files beside.
//
// One call, on the EP's compute stream, with no host synchronization:
//   1. routing and grouping (route.cu): top-k ids and weights per token, pairs counted and
//      scattered per expert, the per-expert tile schedule, all in device memory;
//   2. projection 1 (+ bias, clamp, activation, gating, routing weight on the input) into H, and
//      projection 2 (+ bias) into one output row per pair, by one of four GEMM paths:
//        - skinny (skinny.cu): few rows per expert (decode), weights streamed once, mma.sync (on
//          Hopper, opt-in: both projections of a call of few pairs in one persistent kernel);
//        - wgmma (wgmma.cu): Hopper grouped GEMM (prefill), persistent, TMA + wgmma;
//        - mma (mma_grouped.cu): a grouped GEMM on mma.sync tiles fed by cp.async, for GPUs that
//          do not run the Hopper kernels, from 32 rows per active expert;
//        - simt (simt.cu): float32 and sizes the tensor-core paths do not take;
//      the shared expert is the same GEMMs over all tokens as one dense group;
//   3. combine (misc.cu): each token's weighted sum in pick order, plus the (gated) shared expert.
// Experts with intermediate size <= 4 (rank-1 layers) take the direct path instead of 2 and 3.
// Scratch memory comes from the EP's allocator (onnxruntime's arena) for each call; weights
// stored in_out are transposed to out_in once at kernel creation when they are constant.
#include "moeffn_cuda.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "../moeffn_attrs.h"
#include "../moeffn_op.h"
#include "../moeffn_validate.h"
#include "../ort_tensor.h"
#include "kernels.h"

namespace moefuse {
namespace cuda {
namespace {

constexpr int kDirectMaxInter = 4;     // same threshold as the CPU kernel
// Skinny (decode) path while the routed pairs average fewer than 2 per active expert (on an
// H100 the grouped GEMM path is faster from 2 rows per expert on: T = 32 of the benchmark's
// shapes); shared expert: fewer than 16 tokens.
constexpr int kDecodeRowsPerExpert = 2;
constexpr int kDenseSkinnyRows = 16;
// Grouped path: narrow wgmma tiles (tokens on the N side: 32 or 64 rows instead of 128) while the
// routed pairs average at most 16 / 40 per active expert, so that few-row experts do not pay for
// 128-row tensor-core tiles.
constexpr int kNarrow32Rows = 16;
constexpr int kNarrow64Rows = 40;
constexpr int kGatherMinI = 2048;
// wgmma path, 128-row tiles: CTA pairs that share the weight tile (MOEFUSE_CUDA_CTA_PAIRS=auto)
// from this many routed pairs per active expert on average. Tiles from counters (the default):
// from one m-tile an expert. On an H100 (bfloat16, GPU time, pairs over unpaired, two runs;
// docs/performance.md, "H100, 2026-12-06 (evening)"): GPT-OSS T = 4096 (512 rows an expert)
// 0.97x-0.98x, Mixtral T = 512 (128) 0.95x-0.96x, T = 4096 (1024) 0.91x-0.95x, Qwen3 T = 4096
// (256) 0.99x; GPT-OSS T = 512 (64 rows: each pair one m-tile split in halves) 1.06x. Wall time
// 0.99x-1.03x at the paired points. Projection 1's tiles assigned statically
// (MOEFUSE_CUDA_P1_COUNTER=0): from 1024 rows ("H100, 2026-12-06 (CTA pairs)": 1024 rows
// 0.92x-0.98x in three runs; 512 0.99x-1.05x, 256 1.01x-1.03x, 64 1.07x-1.08x).
constexpr int kCtaPairMinRows = 128;
constexpr int kStaticCtaPairMinRows = 1024;
// Without the Hopper kernels: skinny while the routed pairs average fewer than 32 rows per active
// expert, the mma grouped GEMM from there (the skinny kernel reads an expert's weights again for
// every 32 rows). On an H200 running the compute_80 code, bfloat16 (docs/performance.md,
// 2026-12-05): mma 0.70x and 0.82x of skinny at 8 and 16 rows an expert, 1.09x at 32 (Mixtral
// T = 128); with the sm_90a build (the same kernels' source), 1.21x-3.92x at 32 to 1024 rows
// (T = 512, 4096).
constexpr int kMmaRowsPerExpert = 32;

enum class Path { kSkinny, kWgmma, kMma, kSimt };

int64_t CeilDiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }

DType ToDType(int t) {
  if (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return DType::kF16;
  if (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) return DType::kBF16;
  return DType::kF32;
}

// 256-byte aligned sub-buffers of one allocation.
class Carver {
 public:
  size_t Add(size_t bytes) {
    const size_t off = size_;
    size_ += (bytes + 255) / 256 * 256;
    parts_.push_back({off, bytes});
    return off;
  }
  size_t bytes() const { return size_; }
  const std::vector<std::pair<size_t, size_t>>& parts() const { return parts_; }

 private:
  size_t size_ = 0;
  std::vector<std::pair<size_t, size_t>> parts_;  // (offset, bytes)
};

const char* EnvOr(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

// Weight inputs that are transposed when stored in_out: index, batch (experts) and stored dims.
constexpr int kWeightInputs[] = {kW1, kW2, kW3, kSharedW1, kSharedW2, kSharedW3};

struct DeviceInfo {
  int device = -1;
  int num_sms = 0;
  int major = 0;
  DeviceCode code;  // what of the library's device code runs here
};

class Kernel {
 public:
  static OrtStatus* Create(const OrtApi* api, const OrtKernelInfo* info, Kernel** out);
  OrtStatus* Compute(OrtKernelContext* ctx);
  ~Kernel();

 private:
  Kernel() = default;
  OrtStatus* Error(OrtErrorCode code, const std::string& msg) const {
    return api_->CreateStatus(code, msg.c_str());
  }
  OrtStatus* CudaError(cudaError_t e, const char* what) const {
    cudaGetLastError();  // a failed launch's error would otherwise fail this thread's next call
    return Error(ORT_RUNTIME_EXCEPTION, Who(node_name_) + ": CUDA error in " + what + ": " +
                                            cudaGetErrorString(e));
  }
  OrtStatus* Prepack(const OrtKernelInfo* info);
  OrtStatus* EnsureDevice(const void* any_device_ptr);

  const OrtApi* api_ = nullptr;
  std::string node_name_;
  MoEFFNAttrs attrs_;
  OrtAllocator* alloc_ = nullptr;  // the EP's device allocator
  std::string path_;               // MOEFUSE_CUDA_PATH: auto, decode, prefill, mma, simt
  bool check_ids_ = false;         // MOEFUSE_CUDA_CHECK_IDS=1: report bad topk_ids (synchronizes)
  int bn_ = 0;                     // MOEFUSE_CUDA_BN=128|256: wgmma tile width (tuning)
  int order_n_ = 0;                // MOEFUSE_CUDA_ORDER=n: n-major wgmma tile order (tuning)
  bool pingpong_ = false;          // MOEFUSE_CUDA_SCHEDULE=pingpong: 128-wide wgmma tiles on
                                   // ping-pong consumers (experimental)
  int cta_pairs_ = -1;             // MOEFUSE_CUDA_CTA_PAIRS=auto|0|1|counter: 128-row wgmma tiles on
                                   // CTA pairs that share the weight tile (Groups::mpairs; -1 auto;
                                   // 1 forced, projection 1's tiles static; 2 forced, from its counter)
  int narrow_ = -1;                // MOEFUSE_CUDA_NARROW=auto|0|32|64: narrow wgmma tiles (-1 auto)
  int splitk_ = 1;                 // MOEFUSE_CUDA_SPLITK=auto|1..4: skinny projection 2 K split
                                   // (experimental; 0 = auto)
  bool use_pdl_ = true;            // MOEFUSE_CUDA_PDL=0: no programmatic dependent launch
  bool rank_one_ = true;           // MOEFUSE_CUDA_RANK_ROUTE=0: one-token calls routed by the
                                   // selection passes (else by rank, in parallel)
  bool one_token_ = true;          // MOEFUSE_CUDA_ONE_TOKEN=0: one-token calls run the routing,
                                   // skinny and combine kernels (else two kernels where they serve)
  bool p1_counter_ = true;         // MOEFUSE_CUDA_P1_COUNTER=0: projection 1's 128-row wgmma tiles
                                   // assigned statically (else taken from a counter)
  int decode_ = 0;                 // MOEFUSE_CUDA_DECODE=auto|fused|split: the decode projections
                                   // in one kernel on Hopper from kSkinnyFusedMinBytes (0), always
                                   // where it serves (1), or never (-1)
  int tma_rows_ = 2;               // MOEFUSE_CUDA_TMA_ROWS: the wgmma path's activation rows by
                                   // cp.async (0), by TMA where already in order (1), and X's rows
                                   // gathered in order first where it pays (2, auto) or always (3)
  bool overlap_ = true;            // MOEFUSE_CUDA_OVERLAP=0: projection 2 of the routed experts
                                   // waits for all of projection 1 (not per expert)
  bool exact_alloc_ = false;       // MOEFUSE_CUDA_EXACT_ALLOC=1: one cudaMalloc per scratch buffer
                                   // (for compute-sanitizer; synchronizes)
  // in_out weights transposed to out_in at creation (constant inputs), with their stored dims
  void* packed_[kNumInputs] = {};
  std::vector<int64_t> packed_dims_[kNumInputs];
  DeviceInfo dev_;
  std::mutex dev_mu_;
};

Kernel::~Kernel() {
  if (alloc_) {
    for (void* p : packed_)
      if (p) alloc_->Free(alloc_, p);
    api_->ReleaseAllocator(alloc_);
  }
}

OrtStatus* Kernel::Create(const OrtApi* api, const OrtKernelInfo* info, Kernel** out) {
  std::unique_ptr<Kernel> k(new Kernel());
  k->api_ = api;
  k->node_name_ = ReadNodeName(api, info);
  k->attrs_ = ReadAttrs(api, info);
  std::string err = CheckAttrs(k->attrs_, k->node_name_);
  if (!err.empty()) return api->CreateStatus(ORT_INVALID_ARGUMENT, err.c_str());
  if (OrtStatus* st = api->KernelInfoGetAllocator(info, OrtMemTypeDefault, &k->alloc_)) return st;
  k->path_ = EnvOr("MOEFUSE_CUDA_PATH", "auto");
  k->check_ids_ = std::string(EnvOr("MOEFUSE_CUDA_CHECK_IDS", "0")) == "1";
  k->exact_alloc_ = std::string(EnvOr("MOEFUSE_CUDA_EXACT_ALLOC", "0")) == "1";
  k->use_pdl_ = std::string(EnvOr("MOEFUSE_CUDA_PDL", "1")) != "0";
  k->rank_one_ = std::string(EnvOr("MOEFUSE_CUDA_RANK_ROUTE", "1")) != "0";
  k->one_token_ = std::string(EnvOr("MOEFUSE_CUDA_ONE_TOKEN", "1")) != "0";
  k->p1_counter_ = std::string(EnvOr("MOEFUSE_CUDA_P1_COUNTER", "1")) != "0";
  const std::string decode = EnvOr("MOEFUSE_CUDA_DECODE", "auto");
  k->decode_ = decode == "fused" ? 1 : decode == "split" ? -1 : 0;
  k->overlap_ = std::string(EnvOr("MOEFUSE_CUDA_OVERLAP", "1")) != "0";
  k->tma_rows_ = std::min(3, std::max(0, std::atoi(EnvOr("MOEFUSE_CUDA_TMA_ROWS", "2"))));
  k->order_n_ = std::string(EnvOr("MOEFUSE_CUDA_ORDER", "expert")) == "n";
  k->bn_ = std::atoi(EnvOr("MOEFUSE_CUDA_BN", "0"));
  if (k->bn_ != 128 && k->bn_ != 256) k->bn_ = 0;
  k->pingpong_ = std::string(EnvOr("MOEFUSE_CUDA_SCHEDULE", "cooperative")) == "pingpong";
  const std::string pairs = EnvOr("MOEFUSE_CUDA_CTA_PAIRS", "auto");
  k->cta_pairs_ = pairs == "1" ? 1 : pairs == "0" ? 0 : pairs == "counter" ? 2 : -1;
  const std::string narrow = EnvOr("MOEFUSE_CUDA_NARROW", "auto");
  k->narrow_ = narrow == "32" ? 32 : narrow == "64" ? 64 : narrow == "0" ? 0 : -1;
  const std::string splitk = EnvOr("MOEFUSE_CUDA_SPLITK", "1");
  k->splitk_ = splitk == "auto" ? 0 : std::min(4, std::max(1, std::atoi(splitk.c_str())));
  if (k->attrs_.in_out()) {
    if (OrtStatus* st = k->Prepack(info)) return st;
  }
  *out = k.release();
  return nullptr;
}

// Constant in_out weights: one transposed device copy each, made once.
OrtStatus* Kernel::Prepack(const OrtKernelInfo* info) {
  size_t count = 0;
  if (OrtStatus* st = api_->KernelInfo_GetInputCount(info, &count)) {
    api_->ReleaseStatus(st);
    return nullptr;
  }
  // a stream of its own, made for the first weight, destroyed on every way out
  std::unique_ptr<CUstream_st, cudaError_t (*)(cudaStream_t)> own_stream(nullptr, cudaStreamDestroy);
  for (int i : kWeightInputs) {
    if (static_cast<size_t>(i) >= count) continue;
    int is_const = 0;
    const OrtValue* v = nullptr;
    if (OrtStatus* st = api_->KernelInfoGetConstantInput_tensor(info, i, &is_const, &v)) {
      api_->ReleaseStatus(st);
      continue;
    }
    Value val;
    if (!is_const || !v || !Describe(api_, v, &val)) continue;
    const auto& d = val.dims;
    if ((d.size() != 3 && d.size() != 2) || Numel(d) <= 0) continue;
    if (val.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && val.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 &&
        val.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)
      continue;
    const DType t = ToDType(val.type);
    const size_t bytes = static_cast<size_t>(Numel(d)) * DTypeSize(t);
    void* dst = alloc_->Alloc(alloc_, bytes);
    if (!dst) return Error(ORT_FAIL, Who(node_name_) + ": out of device memory for transposed weights");
    packed_[i] = dst;
    if (dev_.device < 0) {
      if (OrtStatus* st = EnsureDevice(dst)) return st;
    }
    if (!own_stream) {
      cudaStream_t made = nullptr;
      if (cudaError_t e = cudaStreamCreateWithFlags(&made, cudaStreamNonBlocking))
        return CudaError(e, "stream creation");
      own_stream.reset(made);
    }
    cudaStream_t stream = own_stream.get();
    // the constant may live on the host (onnxruntime keeps a CPU copy): stage it on the device
    cudaPointerAttributes attr;
    const void* src = val.data;
    void* staged = nullptr;
    if (cudaPointerGetAttributes(&attr, src) != cudaSuccess || attr.type == cudaMemoryTypeUnregistered ||
        attr.type == cudaMemoryTypeHost) {
      cudaGetLastError();
      staged = alloc_->Alloc(alloc_, bytes);
      if (!staged) return Error(ORT_FAIL, Who(node_name_) + ": out of device memory staging weights");
      if (cudaError_t e = cudaMemcpyAsync(staged, src, bytes, cudaMemcpyHostToDevice, stream)) {
        alloc_->Free(alloc_, staged);
        return CudaError(e, "weight upload");
      }
      src = staged;
    }
    const int64_t batch = d.size() == 3 ? d[0] : 1;
    const int64_t rows = d[d.size() - 2], cols = d[d.size() - 1];
    cudaError_t e = (rows == 1 || cols == 1)
                        ? cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream)
                        : LaunchTranspose(t, src, dst, batch, rows, cols, stream);
    if (!e) e = cudaStreamSynchronize(stream);
    if (staged) alloc_->Free(alloc_, staged);
    if (e) return CudaError(e, "weight transposition");
    packed_dims_[i] = d;
  }
  return nullptr;
}

OrtStatus* Kernel::EnsureDevice(const void* p) {
  std::lock_guard<std::mutex> lock(dev_mu_);
  int device = dev_.device;
  if (device < 0) {
    cudaPointerAttributes attr;
    if (cudaError_t e = cudaPointerGetAttributes(&attr, p)) return CudaError(e, "cudaPointerGetAttributes");
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      return Error(ORT_FAIL, Who(node_name_) + ": inputs are not in CUDA device memory");
    device = attr.device;
  }
  int cur = -1;
  if (cudaGetDevice(&cur) != cudaSuccess || cur != device) {
    if (cudaError_t e = cudaSetDevice(device)) return CudaError(e, "cudaSetDevice");
  }
  if (dev_.device < 0) {
    DeviceInfo d;
    d.device = device;
    if (cudaError_t e = cudaDeviceGetAttribute(&d.num_sms, cudaDevAttrMultiProcessorCount, device))
      return CudaError(e, "cudaDeviceGetAttribute");
    if (cudaError_t e = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device))
      return CudaError(e, "cudaDeviceGetAttribute");
    d.code = CurrentDeviceCode();  // (the kernels' attributes are the current device's: this one)
    if (!d.code.runs) {
      int minor = 0;
      (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
      const std::string cc = std::to_string(d.major) + "." + std::to_string(minor);
      return Error(ORT_FAIL, Who(node_name_) + ": this library has no CUDA code for device " + std::to_string(device) +
                                 " (compute capability " + cc + "; the library's: " MOEFUSE_CUDA_ARCHS_BUILT ")" +
                                 (d.major < 8 ? ": its kernels need compute capability 8.0 or newer"
                                              : ": rebuild it with MOEFUSE_CUDA_ARCHS naming this GPU's") +
                                 ". The CPU execution provider runs the library's CPU kernel.");
    }
    dev_ = d;
  }
  return nullptr;
}

// The first projection of `E` experts stored (after transposition) out_in.
FirstProj MakeFirstProj(const MoEFFNAttrs& a, bool separate, const void* w1, const void* w3,
                        const void* b1, const void* b3, int64_t E, int64_t I, int64_t experts_stride) {
  FirstProj f;
  f.gate = w1;
  if (!a.gated) {
    f.gate_rows = E * I;
    f.gate_rpe = experts_stride ? I : 0;
    f.bg = b1;
    f.bg_es = I;
    return f;
  }
  if (separate) {
    f.gate_rows = E * I;
    f.gate_rpe = experts_stride ? I : 0;
    f.up = w3;
    f.up_rows = E * I;
    f.up_rpe = f.gate_rpe;
    f.bg = b1;
    f.bg_es = I;
    f.bu = b3;
    f.bu_es = I;
    return f;
  }
  f.gate_rows = E * 2 * I;
  f.gate_rpe = experts_stride ? 2 * I : 0;
  f.up = w1;
  f.up_rows = E * 2 * I;
  f.up_rpe = f.gate_rpe;
  f.bg = b1;
  f.bu = b1;
  f.bg_es = f.bu_es = 2 * I;
  if (a.gate_up_kind == GateUpLayout::kInterleaved) {
    f.gate_rpu = f.up_rpu = 2;
    f.up_row0 = 1;
    f.bg_us = f.bu_us = 2;
    f.bu_off = 1;
  } else {
    f.up_row0 = I;
    f.bu_off = I;
  }
  return f;
}

OrtStatus* Kernel::Compute(OrtKernelContext* ctx) {
  const OrtApi* api = api_;
  CallStart call;
  if (OrtStatus* st = StartCall(api, ctx, node_name_, attrs_, &call)) return st;
  const Value* in = call.in;
  const MoEFFNAttrs& a = call.attrs;
  const MoEFFNShape& sh = call.shape;
  const int64_t T = sh.tokens, D = sh.hidden, E = sh.experts, I = sh.inter, Is = sh.shared_inter;
  const int64_t K = a.k;
  if (T == 0 || D == 0) return nullptr;  // Y has no elements
  void* ydata = call.y;
  // The wgmma path numbers the 16-byte chunks of X and H in 32 bits (Produce): 2^35 elements.
  const int64_t kMaxActivation = (int64_t{1} << 35) - 64;
  if (T * K >= kBadPairBase || E + a.zero_experts >= INT_MAX / 2 || D >= INT_MAX || I >= INT_MAX ||
      T * D >= kMaxActivation || T * K * I >= kMaxActivation || T * Is >= kMaxActivation)
    return Error(ORT_INVALID_ARGUMENT, Who(node_name_) + ": sizes exceed the CUDA kernel's 32-bit row indices");

  void* stream_ptr = nullptr;
  if (OrtStatus* st = api->KernelContext_GetGPUComputeStream(ctx, &stream_ptr)) return st;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (OrtStatus* st = EnsureDevice(in[kX].data)) return st;
  const bool pdl = use_pdl_ && dev_.code.pdl;
  SetUsePdl(pdl);

  const DType dt = ToDType(sh.elem_type);
  const size_t ts = DTypeSize(dt);
  const int64_t P = T * K;
  const bool has_shared = in[kSharedW1].data != nullptr;
  const bool woi = a.weight_on_input != 0;
  const bool in_out = a.in_out();

  // --- weights in out_in form: prepacked, or transposed into scratch below ---
  const void* canon[kNumInputs] = {};
  int64_t need_t[kNumInputs] = {};  // bytes to transpose per call
  for (int i : kWeightInputs) {
    if (!in[i].data) continue;
    if (!in_out) {
      canon[i] = in[i].data;
    } else if (packed_[i] && packed_dims_[i] == in[i].dims) {
      canon[i] = packed_[i];
    } else {
      need_t[i] = Numel(in[i].dims) * static_cast<int64_t>(ts);
    }
  }

  // --- paths ---
  const bool small = I <= kDirectMaxInter;
  const bool tc_ok = dt != DType::kF32 && dev_.major >= 8 && D % 8 == 0;
  const bool wg_ok = tc_ok && dev_.code.wgmma;
  auto pick = [&](int64_t inter, int64_t rows, int64_t active, bool dense) {
    const bool ok = tc_ok && inter % 8 == 0;
    if (!ok || path_ == "simt") return Path::kSimt;
    if (!dense && active > 65535) return Path::kSimt;  // skinny grid limit
    if (path_ == "decode") return Path::kSkinny;
    if (path_ == "mma") return Path::kMma;
    const Path grouped = wg_ok ? Path::kWgmma : Path::kMma;
    if (path_ == "prefill") return grouped;
    const bool few = !wg_ok ? rows < kMmaRowsPerExpert * active
                     : dense ? rows < kDenseSkinnyRows
                             : rows < kDecodeRowsPerExpert * active;
    return few ? Path::kSkinny : grouped;
  };
  const int64_t max_active = std::min<int64_t>(E, P);
  const int64_t per_expert = CeilDiv64(P, max_active);  // routed rows per active expert, on average
  const Path rpath = small ? Path::kSimt : pick(I, P, max_active, false);
  const Path spath = has_shared ? pick(Is, T, 1, true) : Path::kSimt;
  // decode on Hopper: both projections in one kernel (calls of few pairs: one pass of tokens; not
  // with zero experts: it takes every pair for a row), by default where the call's routed weights
  // are large and the one-token kernels would not take it
  const int64_t routed_bytes = max_active * (a.gated ? 3 : 2) * D * I * static_cast<int64_t>(ts);
  const bool one_token_shape = one_token_ && T == 1 && OneTokenDecodeShapeServes(D, I);
  const bool fused_decode = rpath == Path::kSkinny && dev_.code.fused_decode && P <= kSkinnyFusedMaxPairs &&
                            a.zero_experts == 0 &&
                            (decode_ > 0 || (decode_ == 0 && !one_token_shape && routed_bytes >= kSkinnyFusedMinBytes));
  const bool ypair_f32 = rpath != Path::kWgmma;
  const int ypair_planes = rpath != Path::kSkinny ? 1
                           : fused_decode ? SkinnyFusedSplits(I)
                           : splitk_      ? splitk_
                                          : SkinnyGemm2Splits(D, I, max_active, dev_.num_sms);
  const bool shared_f32 = spath != Path::kWgmma;

  // --- scratch ---
  Carver cv;
  const size_t o_ids = cv.Add(P * 4), o_w = cv.Add(P * 4), o_rank = cv.Add(P * 4);
  const size_t o_offsets = cv.Add((E + 1) * 4), o_prefix = cv.Add((E + 1) * 4);
  const size_t o_active = cv.Add(2 * E * 4), o_nact = cv.Add(4);
  const size_t o_srow = cv.Add(P * 4), o_sw = cv.Add(P * 4), o_pos = cv.Add(P * 4);
  int narrow = 0;  // wgmma: m-tile rows of the narrow tiles, 0 = 128-row tiles
  if (rpath == Path::kWgmma) {
    narrow = narrow_ >= 0 ? narrow_ : per_expert <= kNarrow32Rows ? 32 : per_expert <= kNarrow64Rows ? 64 : 0;
  }
  // m-tile rows of the grouped GEMM schedule
  const int bm = rpath == Path::kSimt  ? 64
                 : rpath == Path::kMma ? MmaTileRows(per_expert)
                 : narrow              ? narrow
                                       : 128;
  const int64_t max_tiles = P / bm + std::min<int64_t>(E, P);
  const size_t o_mt = cv.Add(static_cast<size_t>(max_tiles) * 16);
  // Projection 2 starts per expert as projection 1 finishes it: on the wgmma path (not with the
  // ping-pong schedule of 128-row tiles), and on the skinny path's two kernels where projection 2
  // is launched before projection 1 ends (programmatic dependent launch) and projection 1 takes
  // few waves.
  const bool overlap =
      overlap_ && ((rpath == Path::kWgmma && (narrow || !pingpong_)) ||
                   (rpath == Path::kSkinny && !fused_decode && pdl &&
                    SkinnyPerExpertStartPays(I, a.gated != 0, max_active, dev_.num_sms)));
  // Projection 1's 128-row tiles taken from a counter, so that the CTAs sharing an expert's
  // weight tile start it together (static strides drift apart: 1.38 GB of DRAM reads for its 805
  // MB of weights at Qwen3 T = 4096 on an H200); not with MOEFUSE_CUDA_CTA_PAIRS=1, whose clusters
  // take projection 1's tiles statically (with pairs, rank 0 of each cluster takes them).
  const bool p1_counter = p1_counter_ && rpath == Path::kWgmma && !narrow && !pingpong_ && cta_pairs_ != 1;
  // the m-tiles two by two for CTA pairs (wgmma, 128-row cooperative tiles)
  const bool cta_pairs =
      rpath == Path::kWgmma && !narrow && !pingpong_ &&
      (cta_pairs_ >= 1 || (cta_pairs_ < 0 && per_expert >= (p1_counter ? kCtaPairMinRows : kStaticCtaPairMinRows)));
  const size_t o_mpp = cta_pairs ? cv.Add((E + 1) * 4) : 0;
  const size_t o_mp = cta_pairs ? cv.Add(static_cast<size_t>(max_tiles) * 16) : 0;
  // ints the routing kernel zeroes: the one-kernel decode's tickets and counts, or the overlap's
  // tile counter and per-expert counts, then projection 1's tile counter
  const int overlap_ints = overlap ? static_cast<int>(1 + E) : 0;
  const int sync_count = fused_decode ? static_cast<int>(1 + max_active) : overlap_ints + (p1_counter ? 1 : 0);
  // the routing kernel's counters (a line an expert), counts [E], the invalid-pair mark, then the
  // counters: cleared together (RouteParams)
  const size_t o_counts = cv.Add(static_cast<size_t>(RouteCountLineInts(E) + E + 1 + sync_count) * 4);
  size_t o_h = 0, o_y = 0, o_hs = 0, o_s = 0, o_xs = 0;
  // wgmma path, 128-row tiles: X's rows copied in sorted order first, so that projection 1 reads
  // them by TMA rather than gathering them by cp.async (at the Mixtral shape, T = 4096, its tensor
  // pipe went from 77.6% to 90.3% busy; docs/performance.md). Only where the tiles are full on
  // average and I is large: the copy moves 4 P D bytes against projection 1's 4 P D I FLOPs, about
  // 200 / I of its time at 600 TFLOP/s and 3 TB/s (computed), and TMA boxes of half-empty tiles
  // read rows they discard.
  const bool gather_pays = I >= kGatherMinI && P >= 128 * max_active;
  const bool gather_x = rpath == Path::kWgmma && !narrow && D % 8 == 0 &&
                        (tma_rows_ == 3 || (tma_rows_ == 2 && gather_pays));
  if (gather_x) o_xs = cv.Add(static_cast<size_t>(P * D) * ts);
  if (!small) {
    o_h = cv.Add(static_cast<size_t>(P * I) * ts);
    o_y = cv.Add(static_cast<size_t>(P * D) * (ypair_f32 ? 4 : ts) * ypair_planes);
  }
  if (has_shared) {
    o_hs = cv.Add(static_cast<size_t>(T * Is) * ts);
    o_s = cv.Add(static_cast<size_t>(T * D) * (shared_f32 ? 4 : ts));
  }
  size_t o_t[kNumInputs] = {};
  for (int i : kWeightInputs)
    if (need_t[i]) o_t[i] = cv.Add(static_cast<size_t>(need_t[i]));
  // One allocation from the EP's arena, carved; or, for memory checkers, one exact cudaMalloc
  // per buffer (freed after the stream drains). The arena's buffer is onnxruntime's scratch
  // buffer, tied to this call's stream: it goes back to the arena as Compute returns, while the
  // kernels queued here may still run, and only a stream that has waited for this one gets it
  // again. (A plain Alloc would be free for any stream at once, e.g. a concurrent Run's.)
  struct Scratch {
    const OrtApi* api = nullptr;
    OrtAllocator* a = nullptr;  // frees `base`: the kernel context's allocator, or the EP's
    bool release_a = false;     // (the kernel context's, released here)
    char* base = nullptr;
    std::vector<std::pair<size_t, void*>> exact;  // (offset, buffer)
    cudaStream_t stream = nullptr;
    ~Scratch() {
      if (base) a->Free(a, base);
      if (release_a) api->ReleaseAllocator(a);
      if (!exact.empty()) cudaStreamSynchronize(stream);
      for (auto& b : exact) cudaFree(b.second);
    }
  } scratch;
  scratch.api = api_;
  scratch.stream = stream;
  if (exact_alloc_) {
    for (const auto& part : cv.parts()) {
      void* p = nullptr;
      if (part.second && cudaMalloc(&p, part.second) != cudaSuccess)
        return Error(ORT_FAIL, Who(node_name_) + ": cudaMalloc of scratch failed");
      scratch.exact.push_back({part.first, p});
    }
  } else {
    void* base = nullptr;
    if (!stream) {  // no compute stream: the legacy default stream orders all work
      scratch.a = alloc_;
      base = alloc_->Alloc(alloc_, cv.bytes());
    } else {
      const OrtMemoryInfo* device_memory = alloc_->Info(alloc_);
      if (OrtStatus* st = api->KernelContext_GetAllocator(ctx, device_memory, &scratch.a)) return st;
      scratch.release_a = true;
      if (OrtStatus* st = api->KernelContext_GetScratchBuffer(ctx, device_memory, cv.bytes(), &base)) return st;
    }
    scratch.base = static_cast<char*>(base);
    if (!scratch.base)
      return Error(ORT_FAIL, Who(node_name_) + ": out of device memory for " +
                                 std::to_string(cv.bytes()) + " bytes of scratch");
  }
  auto at = [&](size_t off) -> void* {
    if (scratch.base) return scratch.base + off;
    for (const auto& b : scratch.exact)  // empty buffers share the next one's offset
      if (b.first == off && b.second) return b.second;
    return nullptr;
  };

  cudaError_t e = cudaSuccess;
  for (int i : kWeightInputs) {
    if (!need_t[i]) continue;
    const auto& d = in[i].dims;
    const int64_t batch = d.size() == 3 ? d[0] : 1;
    const int64_t rows = d[d.size() - 2], cols = d[d.size() - 1];
    e = (rows == 1 || cols == 1) ? cudaMemcpyAsync(at(o_t[i]), in[i].data, need_t[i], cudaMemcpyDeviceToDevice, stream)
                                 : LaunchTranspose(dt, in[i].data, at(o_t[i]), batch, rows, cols, stream);
    if (e) return CudaError(e, "weight transposition");
    canon[i] = at(o_t[i]);
  }

  // --- 1. routing and grouping ---
  RouteParams r;
  r.T = static_cast<int>(T);
  r.E = static_cast<int>(E + a.zero_experts);  // ranked: the experts, then the zero experts
  r.zero_experts = static_cast<int>(a.zero_experts);
  r.K = static_cast<int>(K);
  r.mode = static_cast<int>(a.routing_kind);
  r.normalize = static_cast<int>(a.normalize_topk);
  r.scale = a.routed_scaling_factor;
  r.jitter_eps = a.jitter_eps;
  r.n_group = static_cast<int>(a.n_group);
  r.topk_group = static_cast<int>(a.topk_group);
  r.group_terms = a.group_score_terms(static_cast<int>((E + a.zero_experts) / a.n_group));
  r.dtype = dt;
  r.logits = in[kRouterLogits].data;
  r.sel_bias = in[kSelectionBias].data;
  r.ids_in = in[kTopkIds].data;
  r.ids_int64 = in[kTopkIds].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  r.w_in = in[kTopkWeights].data;
  r.ids = static_cast<int*>(at(o_ids));
  r.w = static_cast<float*>(at(o_w));
  r.rank = static_cast<int*>(at(o_rank));
  r.counts = static_cast<int*>(at(o_counts)) + RouteCountLineInts(E);
  r.bad = r.counts + E;
  r.rank_one = rank_one_;
  SortParams s;
  s.T = r.T;
  s.E = static_cast<int>(E);
  s.K = r.K;
  s.bm = bm;
  s.mtiles = static_cast<int4*>(at(o_mt));
  s.max_tiles = max_tiles;
  if (cta_pairs) {
    s.mpair_prefix = static_cast<int*>(at(o_mpp));
    s.mpairs = static_cast<int4*>(at(o_mp));
  }
  s.ids = r.ids;
  s.w = r.w;
  s.rank = r.rank;
  s.counts = static_cast<int*>(at(o_counts));
  s.offsets = static_cast<int*>(at(o_offsets));
  s.tile_prefix = static_cast<int*>(at(o_prefix));
  s.active = static_cast<int*>(at(o_active));
  s.num_active = static_cast<int*>(at(o_nact));
  s.sorted_row = static_cast<int*>(at(o_srow));
  s.sorted_w = static_cast<float*>(at(o_sw));
  s.pair_pos = static_cast<int*>(at(o_pos));
  s.zero = sync_count ? r.bad + 1 : nullptr;
  s.zero_count = sync_count;
  // One token on the skinny path: two kernels that route for themselves and combine (no routing
  // or combine kernel), where they serve the routing and projection 2's K.
  Gemm2Params one_p2;
  one_p2.dtype = dt;
  one_p2.D = static_cast<int>(D);
  one_p2.I = static_cast<int>(I);
  one_p2.splits = ypair_planes;
  const bool one_token = one_token_ && !small && rpath == Path::kSkinny && !fused_decode &&
                         OneTokenDecodeServes(r, one_p2);
  if (!one_token && (e = LaunchRouteAndSort(r, s, stream))) return CudaError(e, "routing");
  if (check_ids_ && a.routing_kind == Routing::kPrecomputed) {
    int mark = 0;
    if ((e = cudaMemcpyAsync(&mark, r.bad, sizeof(int), cudaMemcpyDeviceToHost, stream)) ||
        (e = cudaStreamSynchronize(stream)))
      return CudaError(e, "topk_ids check");
    if (mark != 0) {
      const int bad = kBadPairBase - mark;
      int64_t id = 0;
      const size_t isz = r.ids_int64 ? 8 : 4;
      const char* src = static_cast<const char*>(in[kTopkIds].data) + static_cast<size_t>(bad) * isz;
      int32_t id32 = 0;
      if ((e = cudaMemcpy(r.ids_int64 ? static_cast<void*>(&id) : static_cast<void*>(&id32), src, isz,
                          cudaMemcpyDeviceToHost)))
        return CudaError(e, "topk_ids check");
      if (!r.ids_int64) id = id32;
      return Error(ORT_INVALID_ARGUMENT, Who(node_name_) + ": input 'topk_ids' (#9) holds an expert id outside [0, " +
                                             std::to_string(E + a.zero_experts) + "): " + std::to_string(id) + " for token " +
                                             std::to_string(bad / K));
    }
  }

  // --- shared expert: one dense group over all tokens ---
  if (has_shared) {
    const bool sep = in[kSharedW3].data != nullptr;
    Groups g;
    g.dense_rows = static_cast<int>(T);
    g.num_groups = 1;
    g.max_slots = 1;
    Gemm1Params g1;
    g1.dtype = dt;
    g1.D = static_cast<int>(D);
    g1.I = static_cast<int>(Is);
    g1.A = in[kX].data;
    g1.w = MakeFirstProj(a, sep, canon[kSharedW1], canon[kSharedW3], nullptr, nullptr, 1, Is, 0);
    g1.act = ActParams{static_cast<int>(a.activation_kind), a.activation_alpha, a.clamp_limit, a.up_offset};
    g1.g = g;
    g1.H = at(o_hs);
    g1.rows = T;
    g1.rows_by_tma = tma_rows_ >= 1;
    Gemm2Params g2;
    g2.dtype = dt;
    g2.D = static_cast<int>(D);
    g2.I = static_cast<int>(Is);
    g2.H = g1.H;
    g2.w2 = canon[kSharedW2];
    g2.g = g;
    g2.out = at(o_s);
    g2.out_f32 = shared_f32;
    g2.rows = T;
    g2.rows_by_tma = g1.rows_by_tma;
    switch (spath) {
      case Path::kWgmma:
        if ((e = LaunchWgmmaGemm1(g1, dev_.num_sms, stream)) || (e = LaunchWgmmaGemm2(g2, dev_.num_sms, stream)))
          return CudaError(e, "shared expert (wgmma)");
        break;
      case Path::kMma:
        if ((e = LaunchMmaGemm1(g1, stream)) || (e = LaunchMmaGemm2(g2, stream)))
          return CudaError(e, "shared expert (mma)");
        break;
      case Path::kSkinny:
        if ((e = LaunchSkinnyGemm1(g1, stream)) || (e = LaunchSkinnyGemm2(g2, stream)))
          return CudaError(e, "shared expert (skinny)");
        break;
      default:
        if ((e = LaunchSimtGemm1(g1, stream)) || (e = LaunchSimtGemm2(g2, stream)))
          return CudaError(e, "shared expert (simt)");
    }
  }

  const bool separate = a.separate_gate_up();
  const FirstProj routed = MakeFirstProj(a, separate, canon[kW1], canon[kW3], in[kB1].data,
                                         in[kB3].data, E, I, 1);
  const ActParams act{static_cast<int>(a.activation_kind), a.activation_alpha, a.clamp_limit, a.up_offset};

  // Y and the shared expert's output, for the kernel that writes Y (one-token projection 2, the
  // direct experts or the combine)
  auto set_output = [&](auto& p) {
    p.shared = has_shared ? at(o_s) : nullptr;
    p.shared_f32 = shared_f32;
    p.shared_gate = in[kSharedGate].data;
    p.Y = ydata;
  };
  if (one_token) {
    OneTokenParams op;
    op.r = r;
    Gemm1Params& g1 = op.p1;
    g1.dtype = dt;
    g1.D = static_cast<int>(D);
    g1.I = static_cast<int>(I);
    g1.A = in[kX].data;
    g1.rows = 1;
    g1.w = routed;
    g1.act = act;
    g1.H = at(o_h);
    op.p2 = one_p2;
    op.p2.H = g1.H;
    op.p2.w2 = canon[kW2];
    op.p2.b2 = in[kB2].data;
    op.p2.rows = K;
    op.weight_on_input = woi;
    set_output(op);
    if ((e = LaunchOneTokenDecode(op, stream))) return CudaError(e, "experts (one-token decode)");
  } else if (small) {
    DirectParams dp;
    dp.dtype = dt;
    dp.T = static_cast<int>(T);
    dp.D = static_cast<int>(D);
    dp.I = static_cast<int>(I);
    dp.K = static_cast<int>(K);
    dp.X = in[kX].data;
    dp.ids = r.ids;
    dp.w = r.w;
    dp.weight_on_input = woi;
    dp.w1 = routed;
    dp.w2 = canon[kW2];
    dp.b2 = in[kB2].data;
    dp.act = act;
    set_output(dp);
    if ((e = LaunchDirect(dp, stream))) return CudaError(e, "direct experts");
  } else {
    Groups g;
    g.offsets = s.offsets;
    g.tile_prefix = s.tile_prefix;
    g.active = s.active;
    g.num_active = s.num_active;
    g.num_groups = static_cast<int>(E);
    g.max_slots = static_cast<int>(max_active);
    g.mtiles = s.mtiles;
    g.max_tiles = max_tiles;
    g.mpair_prefix = s.mpair_prefix;
    g.mpairs = s.mpairs;
    g.est_tiles = max_active * CeilDiv64(per_expert, 128);
    g.tile_rows = bm;
    g.order_n = order_n_;
    if (overlap) {
      g.next_tile = s.zero;
      g.ready = s.zero + 1;
    }
    Gemm1Params g1;
    g1.dtype = dt;
    g1.D = static_cast<int>(D);
    g1.I = static_cast<int>(I);
    g1.A = in[kX].data;
    g1.row_map = s.sorted_row;
    g1.rows = T;
    g1.row_scale = woi ? s.sorted_w : nullptr;
    g1.w = routed;
    g1.act = act;
    g1.g = g;
    g1.H = at(o_h);
    g1.bn = bn_;
    g1.pingpong = pingpong_;
    if (p1_counter) g1.next_tile = s.zero + overlap_ints;
    Gemm2Params g2;
    g2.dtype = dt;
    g2.D = static_cast<int>(D);
    g2.I = static_cast<int>(I);
    g2.H = g1.H;
    g2.w2 = canon[kW2];
    g2.b2 = in[kB2].data;
    g2.g = g;
    g2.out = at(o_y);
    g2.out_f32 = ypair_f32;
    g2.bn = bn_;
    g2.pingpong = pingpong_;
    g2.splits = ypair_planes;
    g2.plane = P * D;
    g2.rows = P;
    g2.rows_by_tma = tma_rows_ >= 1;
    if (overlap)
      g2.g.ready_need = rpath == Path::kWgmma ? WgmmaFirstProjSignals(g1, dev_.num_sms) : SkinnyFirstProjSignals(g1);
    switch (rpath) {
      case Path::kWgmma:
        if (gather_x) {
          if ((e = LaunchGatherRows(g1.A, s.sorted_row, s.offsets + E, P, D, at(o_xs), dev_.num_sms, stream)))
            return CudaError(e, "experts (gathering X)");
          g1.A = at(o_xs);
          g1.row_map = nullptr;
          g1.rows = P;
        }
        if ((e = LaunchWgmmaGemm1(g1, dev_.num_sms, stream)) || (e = LaunchWgmmaGemm2(g2, dev_.num_sms, stream)))
          return CudaError(e, "experts (wgmma)");
        break;
      case Path::kMma:
        if ((e = LaunchMmaGemm1(g1, stream)) || (e = LaunchMmaGemm2(g2, stream)))
          return CudaError(e, "experts (mma)");
        break;
      case Path::kSkinny:
        if (fused_decode) {
          FusedDecodeParams f;
          f.p1 = g1;
          f.p2 = g2;
          f.pairs = static_cast<int>(P);
          f.sync = s.zero;
          if ((e = LaunchSkinnyFused(f, dev_.num_sms, stream))) return CudaError(e, "experts (fused decode)");
        } else if ((e = LaunchSkinnyGemm1(g1, stream)) || (e = LaunchSkinnyGemm2(g2, stream))) {
          return CudaError(e, "experts (skinny)");
        }
        break;
      default:
        if ((e = LaunchSimtGemm1(g1, stream)) || (e = LaunchSimtGemm2(g2, stream)))
          return CudaError(e, "experts (simt)");
    }
    CombineParams cp;
    cp.dtype = dt;
    cp.T = static_cast<int>(T);
    cp.D = static_cast<int>(D);
    cp.K = static_cast<int>(K);
    cp.X = in[kX].data;
    cp.pair_pos = s.pair_pos;
    cp.w = r.w;
    cp.weight_on_input = woi;
    cp.zero_experts = a.zero_experts > 0;
    cp.ypair = at(o_y);
    cp.ypair_f32 = ypair_f32;
    cp.ypair_planes = ypair_planes;
    cp.ypair_plane = P * D;
    set_output(cp);
    if ((e = LaunchCombine(cp, stream))) return CudaError(e, "combine");
  }
  if ((e = cudaGetLastError())) return CudaError(e, "kernel launch");
  return nullptr;
}

// --- registration -------------------------------------------------------------------------------

// What the CUDA execution provider's op has of its own (../moeffn_op.h).
struct CudaEP {
  static constexpr const char* kProvider = "CUDAExecutionProvider";
  static constexpr const char* kWho = "MoEFFN (CUDA)";
  using Kernel = cuda::Kernel;
  static OrtStatus* Create(const OrtApi* api, const OrtKernelInfo* info, ONNXTensorElementDataType,
                           Kernel** out) {
    return Kernel::Create(api, info, out);
  }
};

}  // namespace

OrtStatus* AddCudaOps(const OrtApi* api, OrtCustomOpDomain* domain, bool shape_inference) {
  return MoEFFNOp<CudaEP>::AddTo(api, domain, shape_inference);
}

}  // namespace cuda
}  // namespace moefuse

// Lets tests and tools tell a CUDA build of the library from a CPU-only one.
extern "C" MOEFUSE_EXPORT int MoefuseCudaBuilt(void) { return 1; }

// The GPU architectures the kernels were compiled for (MOEFUSE_CUDA_ARCHS, e.g. "80,90a").
extern "C" MOEFUSE_EXPORT const char* MoefuseCudaArchs(void) { return MOEFUSE_CUDA_ARCHS_BUILT; }

// What of the library's device code the current GPU runs (moefuse::cuda::DeviceCode): bit 0 the
// grouped GEMM's sm_90a kernels, bit 1 the one-kernel decode's, bit 2 programmatic dependent
// launch, bit 3 any of it; -1 where there is no usable GPU.
extern "C" MOEFUSE_EXPORT int MoefuseCudaDeviceCode(void) {
  int n = 0, dev = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0 || cudaGetDevice(&dev) != cudaSuccess) return -1;
  const moefuse::cuda::DeviceCode c = moefuse::cuda::CurrentDeviceCode();
  return (c.wgmma ? 1 : 0) | (c.fused_decode ? 2 : 0) | (c.pdl ? 4 : 0) | (c.runs ? 8 : 0);
}

// The current GPU's compute capability as 10 * major + minor (e.g. 90); -1 without a usable GPU.
extern "C" MOEFUSE_EXPORT int MoefuseCudaDeviceCapability(void) {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return -1;
  return 10 * major + minor;
}
