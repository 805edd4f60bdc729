// moefuse CUDA kernels: the launch interface between the host code (moeffn_cuda.cc) and the
// device code (*.cu). Plain structs of device pointers and sizes; every launcher enqueues work on
// the given stream and never synchronizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace moefuse {
namespace cuda {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

// Expert activation (the values of moefuse::Activation).
struct ActParams {
  int kind = 0;  // 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu, 4 identity
  float alpha = 1.0f;
  float clamp_limit = 0.0f;  // gated only, 0 = off
  float up_offset = 0.0f;    // gated only
};

// --- routing ----------------------------------------------------------------------------------

struct RouteParams {
  int T = 0, E = 0, K = 0;
  int mode = 0;  // moefuse::Routing
  int normalize = 1;
  float scale = 1.0f;  // routed_scaling_factor
  int n_group = 1, topk_group = 1;
  DType dtype = DType::kF32;
  // n_group > 1: a group's score adds its best group_terms choices (MoEFFNAttrs::group_score_terms;
  // in the padding before the pointers: a larger struct made the one-block routing kernels spill
  // on sm_90a)
  int group_terms = 2;
  const void* logits = nullptr;    // [T, E] (routing != precomputed)
  const void* sel_bias = nullptr;  // [E] or null
  const void* ids_in = nullptr;    // [T, K] int32 / int64 (precomputed)
  int ids_int64 = 0;
  // E counts the zero experts too (ranked after the experts; in the padding before the pointer):
  // their picks get id kZeroExpertPick and no count, and the combine adds w * x for them
  int zero_experts = 0;
  const void* w_in = nullptr;  // [T, K] (precomputed)
  // outputs
  int* ids = nullptr;     // [T*K]; -1 for an id outside [0, E), kZeroExpertPick for a zero expert
  float* w = nullptr;     // [T*K] routing weights (scaled)
  int* rank = nullptr;    // [T*K] arrival rank of the pair within its expert
  // SortParams::counts, counts, bad and SortParams::zero lie back to back in one buffer, which the
  // launcher clears (one memset where several kernels route; LaunchRouteAndSort checks the layout).
  int* counts = nullptr;  // [E] pairs per expert
  int* bad = nullptr;     // [1] kBadPairBase - index of the first invalid pair, or 0 when all are valid
  // One-token calls routed by a block in parallel (a thread per expert ranks it; the same picks as
  // the selection passes, bit for bit) where the routing allows; 0: by the selection passes.
  int rank_one = 1;
  float jitter_eps = 0.01f;  // sparsemixer's threshold
};

// RouteParams::bad: kBadPairBase - index (token*K + slot) of the first invalid pair (atomicMax
// keeps the lowest index); 0 when every pair is valid, so that clearing the counters clears it.
constexpr int kBadPairBase = 0x7fffffff;
// The id (and SortParams::pair_pos) of a zero expert's pick: no row, the combine adds w * x. An id
// outside [0, E) is -1 and dropped.
constexpr int kZeroExpertPick = -2;

// Pairs grouped by expert ("sorted" rows, contiguous per expert) and the tile schedule.
struct SortParams {
  int T = 0, E = 0, K = 0;
  int bm = 128;  // rows of one m-tile of the grouped GEMM schedule
  const int* ids = nullptr;
  const float* w = nullptr;
  const int* rank = nullptr;
  // [RouteCountLineInts(E)] where several kernels route: expert e's counter at e * 32 (a 128-byte
  // line each where the buffer is 128-byte aligned, as the scratch carver's 256-byte parts are),
  // right before RouteParams::counts
  const int* counts = nullptr;
  int* offsets = nullptr;      // [E+1] first sorted row of each expert
  int* tile_prefix = nullptr;  // [E+1] m-tiles of the experts before e
  int* active = nullptr;       // [E] experts with rows, ascending; then [E] holds their count
  int* num_active = nullptr;   // [1]
  int4* mtiles = nullptr;      // [max m-tiles] (expert, first sorted row, rows, 0) of m-tile i
  int64_t max_tiles = 0;       // capacity of mtiles
  // Optional (wgmma path, CTA pairs: MOEFUSE_CUDA_CTA_PAIRS): an expert's m-tiles two by two, for
  // the two CTAs of a cluster that share the weight tile (Groups::mpairs).
  int* mpair_prefix = nullptr;  // [E+1] m-tile pairs of the experts before e
  int4* mpairs = nullptr;       // [max_tiles] (expert, its first m-tile's index in mtiles, m-tiles: 1 or 2, 0)
  int* sorted_row = nullptr;   // [T*K] token of each sorted row
  float* sorted_w = nullptr;   // [T*K] its routing weight
  int* pair_pos = nullptr;     // [T*K] sorted row of pair (t, j), else its id (-1 dropped, kZeroExpertPick)
  int* zero = nullptr;         // [zero_count] ints zeroed for a later kernel (fused decode's
                               // counters), right after RouteParams::bad
  int zero_count = 0;
};

// Ints of SortParams::counts for E experts.
int64_t RouteCountLineInts(int64_t E);

// Routing for T tokens plus grouping (scan, scatter). Small T uses one fused block.
cudaError_t LaunchRouteAndSort(const RouteParams& r, const SortParams& s, cudaStream_t stream);

// --- expert FFN weights -----------------------------------------------------------------------

// Rows of the first projection in out_in form. Row (e, u) of the gate (or only) projection is row
// gate_row0 + e*gate_rpe + u*gate_rpu of the [gate_rows, D] matrix at `gate`; likewise up (gated
// experts). Halves: one tensor, up_row0 = I. Interleaved: one tensor, rows 2u and 2u+1.
// Separate: w1 and w3. Biases: unit (e, u) at b + off + e*es + u*us elements.
struct FirstProj {
  const void* gate = nullptr;
  int64_t gate_rows = 0, gate_row0 = 0, gate_rpe = 0, gate_rpu = 1;
  const void* up = nullptr;  // null: not gated
  int64_t up_rows = 0, up_row0 = 0, up_rpe = 0, up_rpu = 1;
  const void* bg = nullptr;
  int64_t bg_off = 0, bg_es = 0, bg_us = 1;
  const void* bu = nullptr;
  int64_t bu_off = 0, bu_es = 0, bu_us = 1;
};

// Groups of rows sharing one expert's weights.
struct Groups {
  const int* offsets = nullptr;      // [G+1] (grouped)
  const int* tile_prefix = nullptr;  // [G+1] (grouped)
  const int* active = nullptr;       // [G] active groups (skinny kernel)
  const int* num_active = nullptr;
  const int4* mtiles = nullptr;      // [m-tiles] (grouped): (expert, first row, rows, 0)
  int num_groups = 0;
  int dense_rows = -1;               // >= 0: one group of this many rows (shared expert)
  int max_slots = 0;                 // upper bound of active groups (skinny kernel grid)
  int64_t max_tiles = 0;             // upper bound of m-tiles (grouped GEMM grid)
  int64_t est_tiles = 0;             // expected m-tiles of 128 rows (balanced routing): tile choice
  // Non-null (SortParams::mpairs): the wgmma path's 128-row tiles run on clusters of two CTAs that
  // take m-tiles 2j and 2j + 1 of one expert and n-tile, each loading half of the weight tile into
  // both (TMA multicast); where an expert's m-tile count is odd, its last pair is that m-tile split
  // in halves of 64 rows. Grouped, expert-major; tiles assigned statically or, with next_tile, taken
  // from the counter by rank 0 of the cluster, which hands each to rank 1.
  const int* mpair_prefix = nullptr;
  const int4* mpairs = nullptr;
  int tile_rows = 128;               // rows of an m-tile (grouped; the sort's bm): 128, or 32 / 64
                                     // for the wgmma path's narrow tiles
  int order_n = 0;                   // wgmma tile order: 0 expert-major, 1 n-major (tuning)
  // Routed experts: projection 2 starts while projection 1 finishes. Zeroed by the routing kernel.
  // Null: projection 2 waits for all of projection 1.
  // - wgmma path: ready[e] counts projection 1's finished (tile, consumer warpgroup) pairs of
  //   expert e, ready_need per m-tile of the expert when complete (WgmmaFirstProjSignals);
  //   projection 2 takes its tiles from the *next_tile counter and gathers an expert's rows of H
  //   once its count is complete.
  // - skinny path: ready[e] counts projection 1's finished blocks of expert e, ready_need when
  //   complete (SkinnyFirstProjSignals); each block of projection 2 starts its expert's rows once
  //   the count is complete, its first weights already requested.
  int* ready = nullptr;
  int* next_tile = nullptr;
  int ready_need = 0;
};

// Projection 1: H[r, u] = epilogue(A[row(r)] . gate(e,u), A[row(r)] . up(e,u)), r over sorted rows.
struct Gemm1Params {
  DType dtype = DType::kF16;
  int D = 0, I = 0;
  const void* A = nullptr;         // X [T, D]
  const int* row_map = nullptr;    // sorted row -> row of A (null: identity)
  const float* row_scale = nullptr;  // weight_on_input: per sorted row
  FirstProj w;
  ActParams act;
  Groups g;
  void* H = nullptr;  // [rows, I] in dtype
  int64_t rows = 0;   // rows of A (X: T; X gathered in sorted order: its sorted rows)
  bool rows_by_tma = true;  // wgmma path: A's rows by TMA where they are the sorted rows (no row_map)
  int bn = 0;         // wgmma tile width: 0 = automatic, 128 or 256
  bool pingpong = false;  // wgmma, 128-wide tiles: ping-pong consumer warpgroups (experimental)
  int* next_tile = nullptr;  // wgmma 128-row tiles taken from this zeroed counter (else a static stride)
};

// Projection 2: Out[r, d] = H[r] . w2(e, d) + b2(e, d).
struct Gemm2Params {
  DType dtype = DType::kF16;
  int D = 0, I = 0;
  const void* H = nullptr;   // [rows, I]
  const void* w2 = nullptr;  // [G, D, I]
  const void* b2 = nullptr;  // [G, D] or null
  Groups g;
  void* out = nullptr;  // [rows, D]
  int64_t rows = 0;     // rows of H
  bool rows_by_tma = true;  // wgmma path: H's rows by TMA (else gathered by cp.async)
  bool out_f32 = true;  // float32 output (else dtype)
  int bn = 0;           // wgmma tile width: 0 = automatic, 128 or 256
  bool pingpong = false;  // wgmma, 128-wide tiles: ping-pong consumer warpgroups (experimental)
  // Skinny path only: K split in `splits` parts, part z writing float32 partial sums to plane z
  // (out + z * plane elements); the combine adds the planes in order (deterministic).
  int splits = 1;
  int64_t plane = 0;
};

// Tensor-core skinny path (mma.sync, sm_80+, 16-bit types; D % 8 == 0 and I % 8 == 0).
cudaError_t LaunchSkinnyGemm1(const Gemm1Params& p, cudaStream_t stream);
cudaError_t LaunchSkinnyGemm2(const Gemm2Params& p, cudaStream_t stream);
// Groups::ready_need of the skinny projection 1's launch: its blocks per expert.
int SkinnyFirstProjSignals(const Gemm1Params& p);
// Whether the skinny projection 2 should start per expert (Groups::ready): projection 1's grid
// (I units, gated or not, `slots` experts) runs in few enough waves on the GPU.
bool SkinnyPerExpertStartPays(int64_t I, bool gated, int64_t slots, int num_sms);
// How many parts the skinny projection 2 splits K into, so that its blocks fill the GPU's waves
// (1 when K is too short to split; at most 4).
int SkinnyGemm2Splits(int64_t D, int64_t I, int64_t slots, int num_sms);

// One-token decode: a call of one token whose routing a block ranks in parallel (RoutesOneByRank),
// with D <= 3072 and projection 2 taken by a warp per weight tile (I < 1024, unsplit), in two
// kernels where the skinny path runs four (routing, projections 1 and 2, combine): every block of
// both ranks the token's experts itself, and projection 2 sums the picks' outputs into Y as the
// combine does (the four kernels' output; docs/runtime.md on bit for bit). p1.H holds pick j's
// row at row j.
struct OneTokenParams {
  RouteParams r;   // routing of the one token (outputs unused)
  Gemm1Params p1;  // A = X [1, D]
  Gemm2Params p2;  // H = p1.H; out unused
  int weight_on_input = 0;
  const void* shared = nullptr;  // [1, D] shared expert output or null
  bool shared_f32 = true;
  const void* shared_gate = nullptr;  // [D] or null
  void* Y = nullptr;
};
bool OneTokenDecodeServes(const RouteParams& r, const Gemm2Params& p2);
// The layer-shape part of OneTokenDecodeServes: hidden size D and projection 2's K (I).
bool OneTokenDecodeShapeServes(int64_t D, int64_t I);
cudaError_t LaunchOneTokenDecode(const OneTokenParams& p, cudaStream_t stream);

// Decode on Hopper (sm_90a; by default from kSkinnyFusedMinBytes): projections 1 and 2 of the
// routed experts in one persistent kernel, weights streamed into shared memory by bulk copies;
// projection 2's weights stream in while projection 1 finishes. For calls of at most
// kSkinnyFusedMaxPairs (token, expert) pairs; projection 2 writes p2.splits float32 planes
// (SkinnyFusedSplits) for the combine.
constexpr int kSkinnyFusedMaxPairs = 32;
struct FusedDecodeParams {
  Gemm1Params p1;
  Gemm2Params p2;
  int pairs = 0;        // T * k
  int* sync = nullptr;  // [1 + max_slots] ints, zero: the work ticket, then each slot's finished
                        // projection-1 tiles
};
bool SkinnyFusedAvailable();  // the current device runs the kernel's sm_90a code (DeviceCode)
// The one-kernel decode by default from this many bytes of routed expert weights a call (where the
// one-token kernels do not serve). On an H100 (docs/performance.md, "H100, 2026-12-06 (late)"),
// against the two skinny kernels: 1.01x-1.03x faster from 705 MB (Mixtral-8x7B T = 1, 2, 4;
// GPT-OSS-20B T = 4, 8), level at 398 MB (GPT-OSS T = 2), 1.01x-1.05x slower at 151-302 MB
// (Qwen3-30B-A3B T = 2, 4; GPT-OSS T = 1).
constexpr int64_t kSkinnyFusedMinBytes = int64_t{512} << 20;
int SkinnyFusedSplits(int64_t I);
cudaError_t LaunchSkinnyFused(const FusedDecodeParams& f, int num_sms, cudaStream_t stream);

// Grouped GEMM on mma.sync tiles (sm_80+, 16-bit types; D % 8 == 0 and I % 8 == 0), for the
// prefill of GPUs that do not run the Hopper kernels (opt-in for now). Its m-tiles hold
// MmaTileRows(rows per expert: the pairs over min(E, pairs), an average that skewed routing
// overstates) rows, 64 or 128: the sort's bm and Groups::tile_rows of the routed launches.
int MmaTileRows(int64_t rows_per_expert);
cudaError_t LaunchMmaGemm1(const Gemm1Params& p, cudaStream_t stream);
cudaError_t LaunchMmaGemm2(const Gemm2Params& p, cudaStream_t stream);

// CUDA-core path for any type and size (float32, odd sizes, older GPUs).
cudaError_t LaunchSimtGemm1(const Gemm1Params& p, cudaStream_t stream);
cudaError_t LaunchSimtGemm2(const Gemm2Params& p, cudaStream_t stream);

// Hopper grouped GEMM (wgmma + TMA, sm_90a): prefill. `num_sms` sizes the persistent grid.
bool WgmmaAvailable();  // the current device runs its sm_90a code (DeviceCode)
cudaError_t LaunchWgmmaGemm1(const Gemm1Params& p, int num_sms, cudaStream_t stream);
cudaError_t LaunchWgmmaGemm2(const Gemm2Params& p, int num_sms, cudaStream_t stream);
// Groups::ready_need of projection 1's launch (p.g.ready set; not with the ping-pong schedule).
int WgmmaFirstProjSignals(const Gemm1Params& p, int num_sms);

// --- combine ------------------------------------------------------------------------------------

struct CombineParams {
  DType dtype = DType::kF16;
  int T = 0, D = 0, K = 0;
  const void* X = nullptr;
  const int* pair_pos = nullptr;  // [T*K]
  const float* w = nullptr;       // [T*K]
  int weight_on_input = 0;
  int zero_experts = 0;  // pairs with pair_pos kZeroExpertPick are zero experts' picks: w * x
  const void* ypair = nullptr;  // [planes][P, D]: summed over the planes (float32 when > 1)
  bool ypair_f32 = true;
  int ypair_planes = 1;
  int64_t ypair_plane = 0;  // elements between planes
  const void* shared = nullptr;  // [T, D] shared expert output or null
  bool shared_f32 = true;
  const void* shared_gate = nullptr;  // [D] or null
  void* Y = nullptr;
};
cudaError_t LaunchCombine(const CombineParams& p, cudaStream_t stream);

// Small-intermediate experts (rank-1 "flash expert" layers): per token, k dot-product experts,
// combined with the shared expert, without per-expert GEMMs.
struct DirectParams {
  DType dtype = DType::kF16;
  int T = 0, D = 0, I = 0, K = 0;
  const void* X = nullptr;
  const int* ids = nullptr;  // [T*K], -1 skipped, kZeroExpertPick a zero expert's pick (w * x)
  const float* w = nullptr;
  int weight_on_input = 0;
  FirstProj w1;
  const void* w2 = nullptr;  // [E, D, I] (out_in)
  const void* b2 = nullptr;
  ActParams act;
  const void* shared = nullptr;  // [T, D] or null
  bool shared_f32 = true;
  const void* shared_gate = nullptr;
  void* Y = nullptr;
};
cudaError_t LaunchDirect(const DirectParams& p, cudaStream_t stream);

// dst[b][c][r] = src[b][r][c] for b < batch, r < rows, c < cols (a stored [E, in, out] projection
// into [E, out, in]).
cudaError_t LaunchTranspose(DType t, const void* src, void* dst, int64_t batch, int64_t rows,
                            int64_t cols, cudaStream_t stream);

// dst[r] = src[rows[r]] for r < min(n, *count) (a device count): rows of `cols` 16-bit values (a
// multiple of 8), e.g. the tokens' rows of X in sorted order, so that the wgmma path reads them by
// TMA.
cudaError_t LaunchGatherRows(const void* src, const int* rows, const int* count, int64_t n, int64_t cols,
                             void* dst, int num_sms, cudaStream_t stream);

// Programmatic dependent launch between the kernels of one call (where DeviceCode::pdl).
void SetUsePdl(bool on);

// What of this library's device code the current GPU runs, asked of the kernels themselves. A
// build without sm_90a code run on a Hopper GPU, or a GPU newer than the build (the driver compiles
// the build's compute_80 PTX for it), runs neither the sm_90a kernels nor the waits that make
// programmatic dependent launch safe; the device's compute capability alone would say it does.
struct DeviceCode {
  bool runs = false;          // the library has code for this GPU at all (compute capability 8.0+
                              // and an architecture of the build, or PTX the driver compiles)
  bool wgmma = false;         // the grouped GEMM's sm_90a kernels (and the driver's TMA encoder)
  bool fused_decode = false;  // the one-kernel decode's sm_90a kernel
  bool pdl = false;           // kernels compiled for sm_90+, which wait for the previous kernel's
                              // results (GridDepWait): their launches may overlap
};
DeviceCode CurrentDeviceCode();

}  // namespace cuda
}  // namespace moefuse
