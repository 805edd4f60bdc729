// The inner loops of cpu_kernels.h written once over a small vector abstraction `V`.
//
// This file is included by each ISA translation unit *inside an anonymous namespace*, after the
// definition of that unit's `V`, so every function here gets internal linkage: code compiled
// for AVX-512 can never be picked by the linker for a caller in a portable unit.
//
// V provides: type T, lane count W, micro-tile shape MR (rows) x NV (vectors per row), and
// Zero, Set1, Load (unaligned), LoadA (64-byte aligned), LoadF16A / LoadBF16A (W aligned 16-bit
// values widened to float32), Store, Add, Sub, Mul, Div,
// Fma(a, b, c) = a*b + c, MinKeepNan(x, l) (x when x is NaN, else min), MaxKeepNan, Exp and
// ReduceAdd (fixed order).

// --- activations --------------------------------------------------------------------------

template <class V>
inline typename V::T Sigmoid(typename V::T z) {
  // 1 / (1 + exp(-z)); exp overflows to +inf for very negative z, giving 0 as in the reference.
  const auto one = V::Set1(1.0f);
  return V::Div(one, V::Add(one, V::Exp(V::Sub(V::Zero(), z))));
}

template <class V>
inline typename V::T Tanh(typename V::T y) {
  // tanh(y) = 1 - 2 / (exp(2y) + 1): saturates to +-1 without overflow trouble.
  const auto one = V::Set1(1.0f);
  const auto e = V::Exp(V::Add(y, y));
  return V::Sub(one, V::Div(V::Set1(2.0f), V::Add(e, one)));
}

template <class V>
inline typename V::T Erf(typename V::T v) {
  alignas(64) float lanes[V::W];
  V::Store(lanes, v);
  for (int i = 0; i < V::W; ++i) lanes[i] = std::erf(lanes[i]);
  return V::Load(lanes);
}

template <class V>
inline typename V::T Act(typename V::T v, const cpu::ActParams& p) {
  using T = typename V::T;
  switch (p.kind) {
    case cpu::kActSilu: {
      T z = p.alpha == 1.0f ? v : V::Mul(v, V::Set1(p.alpha));
      return V::Mul(v, Sigmoid<V>(z));
    }
    case cpu::kActGelu: {
      // 0.5 v (1 + erf(v / sqrt(2)))
      T e = Erf<V>(V::Div(v, V::Set1(1.41421356237309515f)));
      return V::Mul(V::Mul(V::Set1(0.5f), v), V::Add(V::Set1(1.0f), e));
    }
    case cpu::kActGeluTanh: {
      // 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))
      T cube = V::Mul(V::Mul(V::Mul(V::Set1(0.044715f), v), v), v);
      T t = Tanh<V>(V::Mul(V::Set1(0.797884560802865355f), V::Add(v, cube)));
      return V::Mul(V::Mul(V::Set1(0.5f), v), V::Add(V::Set1(1.0f), t));
    }
    case cpu::kActRelu:
      return V::MaxKeepNan(v, V::Zero());
    default:
      return v;
  }
}

// --- micro kernel: C[MR, NV*W] = A[MR, K] * B[K, NV*W] (B rows kChunk elements apart) --------

// W weights of type BT at p (64-byte aligned chunk rows), widened to float32 exactly.
template <class V, int BT>
inline typename V::T LoadWeights(const void* p, ptrdiff_t i) {
  if constexpr (BT == cpu::kWeightF32) {
    return V::LoadA(static_cast<const float*>(p) + i);
  } else if constexpr (BT == cpu::kWeightF16) {
    return V::LoadF16A(static_cast<const uint16_t*>(p) + i);
  } else {
    return V::LoadBF16A(static_cast<const uint16_t*>(p) + i);
  }
}

template <class V, int BT, int MR, int NV>
inline void Micro(int K, const float* const* a, const void* b, ptrdiff_t b0, float* c) {
  using T = typename V::T;
  T acc[MR][NV];
  const float* ap[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    ap[r] = a[r];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[r][j] = V::Zero();
  }
  for (int k = 0; k < K; ++k) {
    const ptrdiff_t bk = b0 + static_cast<ptrdiff_t>(k) * cpu::kChunk;
    T bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = LoadWeights<V, BT>(b, bk + j * V::W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T av = V::Set1(ap[r][k]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] = V::Fma(av, bv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) V::Store(c + r * cpu::kChunk + j * V::W, acc[r][j]);
  }
}

template <class V, int BT, int MR>
inline void MicroChunk(int K, const float* const* a, const void* b, float* c) {
  constexpr int kSlice = V::NV * V::W;
  static_assert(cpu::kChunk % kSlice == 0, "slices must tile a chunk");
  for (int s = 0; s < cpu::kChunk; s += kSlice) Micro<V, BT, MR, V::NV>(K, a, b, s, c + s);
}

template <class V, int BT, int MR>
inline void MicroRows(int mr, int K, const float* const* a, const void* b, float* c) {
  if constexpr (MR > 1) {
    if (mr < MR) return MicroRows<V, BT, MR - 1>(mr, K, a, b, c);
  }
  MicroChunk<V, BT, MR>(K, a, b, c);
}

// --- epilogues ----------------------------------------------------------------------------

template <class V>
inline void StoreCols(float* dst, const float* src, int n) {
  int i = 0;
  for (; i + V::W <= n; i += V::W) V::Store(dst + i, V::Load(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

template <class V>
inline void Epilogue(const cpu::TileJob& job, float* tile, int mr, int r0) {
  using T = typename V::T;
  for (int r = 0; r < mr; ++r) {
    float* t = tile + r * cpu::kChunk;
    float* out = job.out + static_cast<int64_t>(r0 + r) * job.ldo;
    switch (job.epilogue) {
      case cpu::kEpiBias: {
        if (job.bias) {
          for (int c = 0; c < cpu::kChunk; c += V::W)
            V::Store(t + c, V::Add(V::Load(t + c), V::Load(job.bias + c)));
        }
        if (job.ncols == cpu::kChunk) {
          for (int c = 0; c < cpu::kChunk; c += V::W) V::Store(out + c, V::Load(t + c));
        } else {
          StoreCols<V>(out, t, job.ncols);
        }
        break;
      }
      case cpu::kEpiAct: {
        for (int c = 0; c < cpu::kChunk; c += V::W) {
          T v = V::Load(t + c);
          if (job.bias) v = V::Add(v, V::Load(job.bias + c));
          V::Store(out + c, Act<V>(v, job.act));
        }
        break;
      }
      default: {  // gated: columns [0, 32) gate, [32, 64) up
        const float lim = job.act.clamp_limit;
        for (int c = 0; c < cpu::kGatedHalf; c += V::W) {
          T g = V::Load(t + c);
          T u = V::Load(t + cpu::kGatedHalf + c);
          if (job.bias) {
            g = V::Add(g, V::Load(job.bias + c));
            u = V::Add(u, V::Load(job.bias + cpu::kGatedHalf + c));
          }
          if (lim > 0.0f) {
            g = V::MinKeepNan(g, V::Set1(lim));
            u = V::MinKeepNan(V::MaxKeepNan(u, V::Set1(-lim)), V::Set1(lim));
          }
          if (job.act.up_offset != 0.0f) u = V::Add(u, V::Set1(job.act.up_offset));
          V::Store(out + c, V::Mul(Act<V>(g, job.act), u));
        }
        break;
      }
    }
  }
}

template <class V, int BT>
void TileRows(const cpu::TileJob& job) {
  alignas(64) float tile[V::MR * cpu::kChunk];
  const float* rows[V::MR];
  for (int r0 = 0; r0 < job.rows; r0 += V::MR) {
    const int mr = job.rows - r0 < V::MR ? job.rows - r0 : V::MR;
    for (int r = 0; r < mr; ++r) rows[r] = job.a[r0 + r];
    MicroRows<V, BT, V::MR>(mr, job.K, rows, job.b, tile);
    Epilogue<V>(job, tile, mr, r0);
  }
}

template <class V>
void TileImpl(const cpu::TileJob& job) {
  switch (job.b_type) {
    case cpu::kWeightF16:
      return TileRows<V, cpu::kWeightF16>(job);
    case cpu::kWeightBF16:
      return TileRows<V, cpu::kWeightBF16>(job);
    default:
      return TileRows<V, cpu::kWeightF32>(job);
  }
}

template <class V>
float DotImpl(const float* a, const float* b, int64_t n) {
  using T = typename V::T;
  T acc0 = V::Zero(), acc1 = V::Zero(), acc2 = V::Zero(), acc3 = V::Zero();
  int64_t i = 0;
  for (; i + 4 * V::W <= n; i += 4 * V::W) {
    acc0 = V::Fma(V::Load(a + i), V::Load(b + i), acc0);
    acc1 = V::Fma(V::Load(a + i + V::W), V::Load(b + i + V::W), acc1);
    acc2 = V::Fma(V::Load(a + i + 2 * V::W), V::Load(b + i + 2 * V::W), acc2);
    acc3 = V::Fma(V::Load(a + i + 3 * V::W), V::Load(b + i + 3 * V::W), acc3);
  }
  for (; i + V::W <= n; i += V::W) acc0 = V::Fma(V::Load(a + i), V::Load(b + i), acc0);
  float s = V::ReduceAdd(V::Add(V::Add(acc0, acc1), V::Add(acc2, acc3)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class V>
void ActivateImpl(float* v, int64_t n, const cpu::ActParams& p) {
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::Store(v + i, Act<V>(V::Load(v + i), p));
  if (i < n) {
    alignas(64) float lanes[V::W] = {};
    for (int64_t j = i; j < n; ++j) lanes[j - i] = v[j];
    V::Store(lanes, Act<V>(V::Load(lanes), p));
    for (int64_t j = i; j < n; ++j) v[j] = lanes[j - i];
  }
}

// W 16-bit weights of type BT at p (any alignment), widened to float32 exactly.
template <class V, int BT>
inline typename V::T LoadHalf(const uint16_t* p) {
  if constexpr (BT == cpu::kWeightF16) {
    return V::LoadF16(p);
  } else {
    return V::LoadBF16(p);
  }
}

// n 16-bit weights of type BT to float32.
template <class V, int BT>
void WidenAs(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::Store(dst + i, LoadHalf<V, BT>(src + i));
  if (i < n) {
    alignas(64) uint16_t lanes[V::W] = {};
    alignas(64) float out[V::W];
    for (int64_t j = i; j < n; ++j) lanes[j - i] = src[j];
    V::Store(out, LoadHalf<V, BT>(lanes));
    for (int64_t j = i; j < n; ++j) dst[j] = out[j - i];
  }
}

template <class V>
void WidenImpl(const uint16_t* src, int wtype, float* dst, int64_t n) {
  if (wtype == cpu::kWeightF16) return WidenAs<V, cpu::kWeightF16>(src, dst, n);
  WidenAs<V, cpu::kWeightBF16>(src, dst, n);
}

// DotImpl over 16-bit b, widened as it is loaded: the same sums in the same order, so bit for
// bit DotImpl of b widened to float32.
template <class V, int BT>
float DotHalfAs(const float* a, const uint16_t* b, int64_t n) {
  using T = typename V::T;
  T acc0 = V::Zero(), acc1 = V::Zero(), acc2 = V::Zero(), acc3 = V::Zero();
  int64_t i = 0;
  for (; i + 4 * V::W <= n; i += 4 * V::W) {
    acc0 = V::Fma(V::Load(a + i), LoadHalf<V, BT>(b + i), acc0);
    acc1 = V::Fma(V::Load(a + i + V::W), LoadHalf<V, BT>(b + i + V::W), acc1);
    acc2 = V::Fma(V::Load(a + i + 2 * V::W), LoadHalf<V, BT>(b + i + 2 * V::W), acc2);
    acc3 = V::Fma(V::Load(a + i + 3 * V::W), LoadHalf<V, BT>(b + i + 3 * V::W), acc3);
  }
  for (; i + V::W <= n; i += V::W) acc0 = V::Fma(V::Load(a + i), LoadHalf<V, BT>(b + i), acc0);
  float s = V::ReduceAdd(V::Add(V::Add(acc0, acc1), V::Add(acc2, acc3)));
  if (i < n) {
    alignas(64) float rest[V::W];
    WidenAs<V, BT>(b + i, rest, n - i);
    for (int64_t j = i; j < n; ++j) s += a[j] * rest[j - i];
  }
  return s;
}

template <class V>
float DotHalfImpl(const float* a, const uint16_t* b, int wtype, int64_t n) {
  if (wtype == cpu::kWeightF16) return DotHalfAs<V, cpu::kWeightF16>(a, b, n);
  return DotHalfAs<V, cpu::kWeightBF16>(a, b, n);
}
