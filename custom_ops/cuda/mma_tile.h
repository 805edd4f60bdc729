// The tile layout of the mma grouped GEMM (mma_grouped.cu): which 16-byte chunk each thread copies
// where in shared memory, which shared-memory rows each lane's ldmatrix reads, and which element
// of the tile each accumulator holds. Callable on the host too, so that a CPU test
// (tests/cuda/mma_tile_check.cc) checks that they compose into the tile's product under PTX's
// definitions of ldmatrix and mma.sync, and that no ldmatrix phase or copy round has a bank conflict.
//
// A tile is kBM rows (tokens) by kBN weight rows, over k-blocks of kBK 16-bit values: per stage of
// the ring, kBM rows of A then kBN rows of B, each row kRowBytes. 8 warps: 2 along the rows by 4
// along the weight rows; a warp's tile is kBM / 2 x 32, (kBM / 32) x 4 MMAs of 16 x 8.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MOEFUSE_HD __host__ __device__
#else
#define MOEFUSE_HD
#endif

namespace moefuse {
namespace cuda {
namespace mma_tile {

constexpr int kBN = 128, kBK = 32, kStages = 4, kThreads = 256;
constexpr int kWarpsM = 2, kWarpsN = 4;
constexpr int kRowBytes = kBK * 2;
constexpr int kCopyRows = kThreads / 4;  // rows one round of 16-byte copies covers (4 a row)

template <int kBM>
struct Cfg {
  static_assert(kBM == 64 || kBM == 128, "m-tiles of 64 or 128 rows");
  static constexpr int kMT = kBM / kWarpsM / 16;    // MMA row tiles of a warp
  static constexpr int kNT = kBN / kWarpsN / 8;     // MMA column tiles of a warp
  static constexpr int kACopies = kBM / kCopyRows;  // a thread's 16-byte copies of a k-block
  static constexpr int kBCopies = kBN / kCopyRows;
  static constexpr int kStageBytes = (kBM + kBN) * kRowBytes;
  static constexpr int kSmem = kStages * kStageBytes;
};

// Byte offset of 16-byte chunk `chunk` (k = 8 chunk .. 8 chunk + 7) of a row. The chunk index is
// XORed with (row / 2) % 4: the 8 rows one ldmatrix phase reads at one chunk, 64 bytes apart, land
// in 8 different 16-byte bank groups.
MOEFUSE_HD inline uint32_t Swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ ((row >> 1) & 3)) << 4));
}

// Thread tid's i-th copy of a k-block: its row (of the A or B rows) and chunk.
MOEFUSE_HD inline int CopyRow(int tid, int i) { return (tid >> 2) + i * kCopyRows; }
MOEFUSE_HD inline int CopyChunk(int tid) { return tid & 3; }

// The shared-memory row and chunk whose address lane `lane` gives to an ldmatrix .x4 (lane l: row
// l % 8 of matrix l / 8).
struct LdAddr {
  int row, chunk;
};

// Row tile mi of the warp at k16-step kk (0, 1): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7),
// (rows 0-7, k 8-15), (rows 8-15, k 8-15): the MMA's a0..a3.
template <int kBM>
MOEFUSE_HD inline LdAddr ARows(int warp, int lane, int mi, int kk) {
  return {(warp / kWarpsN) * (kBM / kWarpsM) + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
          kk * 2 + (lane >> 4)};
}

// Column tiles nj and nj + 1 (nj even) of the warp: matrices (weight rows 0-7, k 0-7), (0-7,
// 8-15), (8-15, 0-7), (8-15, 8-15): b0, b1 of tile nj, then of tile nj + 1.
MOEFUSE_HD inline LdAddr BRows(int warp, int lane, int nj, int kk) {
  return {(warp % kWarpsN) * (kBN / kWarpsN) + nj * 8 + (lane & 7) + (lane >> 4) * 8,
          kk * 2 + ((lane >> 3) & 1)};
}

// The tile row and weight row (column) of accumulator c (0..3) of MMA (mi, nj): c / 2 picks rows
// g or g + 8, c % 2 the column 2t or 2t + 1 (g = lane / 4, t = lane % 4).
template <int kBM>
MOEFUSE_HD inline int AccRow(int warp, int lane, int mi, int c) {
  return (warp / kWarpsN) * (kBM / kWarpsM) + mi * 16 + (lane >> 2) + (c >> 1) * 8;
}
MOEFUSE_HD inline int AccCol(int warp, int lane, int nj, int c) {
  return (warp % kWarpsN) * (kBN / kWarpsN) + nj * 8 + 2 * (lane & 3) + (c & 1);
}

// Gated experts: weight row n of a block holds unit GatedUnit(n) (of the block's 64) of the gate
// rows, or of the up rows where GatedUp(n). A warp's column tiles 2j and 2j + 1 are the gate and
// up rows of the same 8 units, so a thread holds both sums of a unit.
MOEFUSE_HD inline int GatedUnit(int n) { return (n / 32) * 16 + ((n % 32) / 16) * 8 + (n % 8); }
MOEFUSE_HD inline bool GatedUp(int n) { return (n / 8) & 1; }

}  // namespace mma_tile
}  // namespace cuda
}  // namespace moefuse
