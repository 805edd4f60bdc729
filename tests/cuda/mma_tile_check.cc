// Checks the tile layout of the mma grouped GEMM (custom_ops/cuda/mma_tile.h) on the CPU: the
// kernel's copies into the swizzled shared-memory ring, its ldmatrix reads and its mma.sync
// fragments are replayed here with PTX's definitions of the two instructions, over three k-blocks of
// small integers, and every accumulator must come out as the product element the epilogue takes it
// for (AccRow, AccCol). Also: every shared-memory slot is written once per k-block; no ldmatrix
// phase and no round of 16-byte copies has a bank conflict; gated tiles pair each unit's gate and
// up rows in one thread. Prints "ok" and exits 0, or names the first failure and exits 1.
//
// PTX's definitions used (ISA, "Matrix fragments for mma.m16n8k16" and "ldmatrix"):
// - ldmatrix .m8n8 .x4 .b16: lanes 8j .. 8j + 7 give the row addresses of matrix j; lane l
//   receives in register j the two 16-bit values at columns 2 (l % 4), 2 (l % 4) + 1 of row l / 4 of
//   matrix j (the lower column in the lower half).
// - mma.m16n8k16 with 16-bit A and B, lane l = 4 g + t: A registers 0..3 hold (row g, k 2t..2t+1),
//   (row g + 8, k 2t..), (row g, k 2t + 8..), (row g + 8, k 2t + 8..); B registers 0, 1 hold
//   (k 2t..2t+1, column g), (k 2t + 8.., column g); C values 0..3 are (row g, columns 2t, 2t + 1)
//   and (row g + 8, columns 2t, 2t + 1).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <vector>

#include "cuda/mma_tile.h"

using namespace moefuse::cuda::mma_tile;

namespace {

int failures = 0;

void Expect(bool ok, const char* what, int a = 0, int b = 0, int c = 0, int d = 0) {
  if (ok || failures++ > 0) return;  // report the first failure only
  std::printf("FAILED: %s (%d %d %d %d)\n", what, a, b, c, d);
}

// 16-byte bank group of a shared-memory byte address (32 banks of 4 bytes = 8 groups of 16 bytes).
int BankGroup(uint32_t addr) { return static_cast<int>((addr / 16) % 8); }

template <int kBM>
void CheckTile() {
  using C = Cfg<kBM>;
  constexpr int kKBlocks = 3, K = kKBlocks * kBK;
  // operands: rows of A (tile rows) and of B (weight rows), small integers (exact sums)
  std::vector<int> A(kBM * K), B(kBN * K);
  unsigned seed = 12345u + kBM;
  auto rnd = [&]() { seed = seed * 1103515245u + 12345u; return static_cast<int>((seed >> 16) % 7) - 3; };
  for (int& v : A) v = rnd();
  for (int& v : B) v = rnd();

  // accumulators of every thread: [warp][lane][mi][nj][c]
  std::vector<long> acc(8 * 32 * C::kMT * C::kNT * 4, 0);
  auto accum = [&](int w, int l, int mi, int nj, int c) -> long& {
    return acc[(((w * 32 + l) * C::kMT + mi) * C::kNT + nj) * 4 + c];
  };
  std::vector<int> smem(C::kSmem / 2, 0);  // 16-bit slots, holding the values themselves

  for (int kb = 0; kb < kKBlocks; ++kb) {
    const int stage = kb % kStages;
    const uint32_t a_base = stage * C::kStageBytes, b_base = a_base + kBM * kRowBytes;
    // copies: every 16-byte slot of the stage's A and B rows written exactly once
    std::vector<int> written(C::kStageBytes / 16, 0);
    for (int tid = 0; tid < kThreads; ++tid) {
      const int chunk = CopyChunk(tid);
      auto copy = [&](uint32_t base, const std::vector<int>& src, int row) {
        const uint32_t at = base + Swizzled(row, chunk);
        Expect(at % 16 == 0, "copy address not 16-byte aligned", kBM, tid, row);
        written[(at - a_base) / 16]++;
        for (int i = 0; i < 8; ++i) smem[at / 2 + i] = src[row * K + kb * kBK + chunk * 8 + i];
      };
      for (int i = 0; i < C::kACopies; ++i) copy(a_base, A, CopyRow(tid, i));
      for (int i = 0; i < C::kBCopies; ++i) copy(b_base, B, CopyRow(tid, i));
    }
    for (size_t s = 0; s < written.size(); ++s) Expect(written[s] == 1, "slot not written once", kBM, kb, (int)s);
    // a round of 16-byte copies is served 8 threads at a time: 8 different bank groups
    for (int i = 0; i < C::kACopies + C::kBCopies; ++i)
      for (int t0 = 0; t0 < kThreads; t0 += 8) {
        std::set<int> groups;
        for (int tid = t0; tid < t0 + 8; ++tid) {
          const bool is_a = i < C::kACopies;
          const int row = CopyRow(tid, is_a ? i : i - C::kACopies);
          groups.insert(BankGroup((is_a ? a_base : b_base) + Swizzled(row, CopyChunk(tid))));
        }
        Expect(groups.size() == 8, "bank conflict in a copy round", kBM, i, t0);
      }

    for (int w = 0; w < kThreads / 32; ++w)
      for (int kk = 0; kk < kBK / 16; ++kk) {
        // ldmatrix .x4: register j of lane l <- matrix j, row l / 4, columns 2 (l % 4) and + 1
        auto ldmatrix = [&](uint32_t base, auto addr_of, int (&reg)[32][4][2]) {
          uint32_t addr[32];
          for (int l = 0; l < 32; ++l) {
            const LdAddr at = addr_of(l);
            addr[l] = base + Swizzled(at.row, at.chunk);
            Expect(addr[l] % 16 == 0, "ldmatrix row not 16-byte aligned", kBM, w, l);
          }
          for (int j = 0; j < 4; ++j) {  // one phase per matrix: its 8 rows in 8 bank groups
            std::set<int> groups;
            for (int r = 0; r < 8; ++r) groups.insert(BankGroup(addr[8 * j + r]));
            Expect(groups.size() == 8, "bank conflict in an ldmatrix phase", kBM, w, j);
          }
          for (int l = 0; l < 32; ++l)
            for (int j = 0; j < 4; ++j)
              for (int h = 0; h < 2; ++h) reg[l][j][h] = smem[addr[8 * j + l / 4] / 2 + 2 * (l % 4) + h];
        };
        static int a[C::kMT][32][4][2], b[C::kNT / 2][32][4][2];
        for (int mi = 0; mi < C::kMT; ++mi)
          ldmatrix(a_base, [&](int l) { return ARows<kBM>(w, l, mi, kk); }, a[mi]);
        for (int nj = 0; nj < C::kNT; nj += 2)
          ldmatrix(b_base, [&](int l) { return BRows(w, l, nj, kk); }, b[nj / 2]);
        // mma.m16n8k16: assemble A (16 x 16), B (16 x 8) from the lanes' registers, C += A B
        for (int mi = 0; mi < C::kMT; ++mi)
          for (int nj = 0; nj < C::kNT; ++nj) {
            int am[16][16], bm[16][8];
            for (int l = 0; l < 32; ++l) {
              const int g = l / 4, t = l % 4;
              for (int h = 0; h < 2; ++h) {
                am[g][2 * t + h] = a[mi][l][0][h];
                am[g + 8][2 * t + h] = a[mi][l][1][h];
                am[g][2 * t + 8 + h] = a[mi][l][2][h];
                am[g + 8][2 * t + 8 + h] = a[mi][l][3][h];
                const int* breg = b[nj / 2][l][(nj % 2) * 2];  // tile nj: registers 0, 1; nj + 1: 2, 3
                bm[2 * t + h][g] = breg[h];
                bm[2 * t + 8 + h][g] = b[nj / 2][l][(nj % 2) * 2 + 1][h];
              }
            }
            for (int l = 0; l < 32; ++l) {
              const int g = l / 4, t = l % 4;
              for (int c = 0; c < 4; ++c) {
                const int row = g + (c / 2) * 8, col = 2 * t + c % 2;
                long s = 0;
                for (int k = 0; k < 16; ++k) s += am[row][k] * bm[k][col];
                accum(w, l, mi, nj, c) += s;
              }
            }
          }
      }
  }

  // every accumulator is the product element (AccRow, AccCol), each element held once
  std::vector<int> held(kBM * kBN, 0);
  for (int w = 0; w < kThreads / 32; ++w)
    for (int l = 0; l < 32; ++l)
      for (int mi = 0; mi < C::kMT; ++mi)
        for (int nj = 0; nj < C::kNT; ++nj)
          for (int c = 0; c < 4; ++c) {
            const int row = AccRow<kBM>(w, l, mi, c), col = AccCol(w, l, nj, c);
            long want = 0;
            for (int k = 0; k < K; ++k) want += static_cast<long>(A[row * K + k]) * B[col * K + k];
            Expect(accum(w, l, mi, nj, c) == want, "accumulator is not its product element", kBM, w, l, row * 1000 + col);
            held[row * kBN + col]++;
          }
  for (int i = 0; i < kBM * kBN; ++i) Expect(held[i] == 1, "element not held exactly once", kBM, i);
}

// Gated tiles: weight row n holds gate or up row GatedUnit(n) (64 units, each once as gate and
// once as up); a thread's column tiles 2j and 2j + 1 hold the gate and up rows of one unit, and its
// two columns c = 0, 1 units u and u + 1 (the epilogue's pair store).
void CheckGated() {
  std::vector<int> seen(2 * kBN / 2, 0);
  for (int n = 0; n < kBN; ++n) {
    Expect(GatedUnit(n) >= 0 && GatedUnit(n) < kBN / 2, "gated unit out of range", n);
    seen[GatedUnit(n) * 2 + GatedUp(n)]++;
  }
  for (size_t i = 0; i < seen.size(); ++i) Expect(seen[i] == 1, "gated unit/up not held once", (int)i);
  for (int w = 0; w < kThreads / 32; ++w)
    for (int l = 0; l < 32; ++l)
      for (int j = 0; j < kBN / kWarpsN / 8 / 2; ++j)
        for (int c = 0; c < 2; ++c) {
          const int ng = AccCol(w, l, 2 * j, c), nu = AccCol(w, l, 2 * j + 1, c);
          Expect(!GatedUp(ng) && GatedUp(nu), "column tiles 2j / 2j + 1 are not gate / up", w, l, j);
          Expect(GatedUnit(ng) == GatedUnit(nu), "gate and up of different units", w, l, j, c);
          Expect(GatedUnit(ng) == GatedUnit(AccCol(w, l, 2 * j, 0)) + c, "a thread's two units not u, u + 1", w, l, j);
        }
}

}  // namespace

int main() {
  CheckTile<64>();
  CheckTile<128>();
  CheckGated();
  if (failures) return 1;
  std::printf("ok\n");
  return 0;
}
