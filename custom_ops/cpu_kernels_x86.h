// The parts of V (cpu_kernels_impl.h) that the AVX2 and AVX-512 builds compute the same way,
// written once over V's primitives. Included by cpu_kernels_avx2.cc and cpu_kernels_avx512.cc
// inside their anonymous namespace, before their V, whose members call these templates.
//
// Besides cpu_kernels_impl.h's list, V provides StoreA (store to a W-float aligned address),
// Round (to the nearest integer, ties to even) and Fnma(a, b, c) = c - a*b.

// Sum of v's lanes in lane order.
template <class V>
inline float SumLanes(typename V::T v) {
  alignas(sizeof(typename V::T)) float lanes[V::W];
  V::StoreA(lanes, v);
  float s = 0.0f;
  for (int i = 0; i < V::W; ++i) s += lanes[i];
  return s;
}

// e^x = 2^n p.
template <class V>
struct ExpParts {
  typename V::T n;  // integral
  typename V::T p;
};

// e^x = 2^n e^r with n = round(x log2(e)), |r| <= ln(2)/2 (ln(2) subtracted in two parts); e^r by
// its Taylor series to degree 7 (truncation < 6e-9 relative). x must be finite or NaN: the
// caller clamps it, then scales p by 2^n.
template <class V>
inline ExpParts<V> ExpSplit(typename V::T x) {
  using T = typename V::T;
  const T n = V::Round(V::Mul(x, V::Set1(1.44269504088896341f)));
  T r = V::Fnma(n, V::Set1(0.693145751953125f), x);
  r = V::Fnma(n, V::Set1(1.428606820309417e-06f), r);
  T p = V::Set1(1.0f / 5040.0f);
  p = V::Fma(p, r, V::Set1(1.0f / 720.0f));
  p = V::Fma(p, r, V::Set1(1.0f / 120.0f));
  p = V::Fma(p, r, V::Set1(1.0f / 24.0f));
  p = V::Fma(p, r, V::Set1(1.0f / 6.0f));
  p = V::Fma(p, r, V::Set1(0.5f));
  p = V::Fma(p, r, V::Set1(1.0f));
  p = V::Fma(p, r, V::Set1(1.0f));
  return {n, p};
}
