// AVX2 helpers shared by idlm's CPU kernels. Every function here gives each lane's result from that
// lane's inputs alone, in a fixed order, so the kernels' bits do not depend on the data around them.
#pragma once
#include <immintrin.h>

namespace idlm {

// The eight lanes summed in a fixed tree.
inline float lane_sum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);                // lanes i + i+4
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));       // + lanes 2, 3
  s = _mm_add_ss(s, _mm_movehdup_ps(s));        // + lane 1
  return _mm_cvtss_f32(s);
}

// e^x per lane (Cephes' single-precision polynomial on x - n ln 2, then 2^n through the exponent
// bits): within 2 ulp of the exact value; x clamped to where the result stays a normal float.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

// The first `count` (< 8) floats at p, the other lanes `fill`.
inline __m256 load_partial(const float* p, int count, float fill) {
  alignas(32) float lanes[8];
  for (int i = 0; i < 8; ++i) lanes[i] = i < count ? p[i] : fill;
  return _mm256_load_ps(lanes);
}

inline void store_partial(float* p, __m256 v, int count) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (int i = 0; i < count; ++i) p[i] = lanes[i];
}

// sum_i a[i] b[i] over n floats: eight-lane partial sums in order, the lanes summed last.
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  if (i < n) acc = _mm256_fmadd_ps(load_partial(a + i, n - i, 0.0f), load_partial(b + i, n - i, 0.0f), acc);
  return lane_sum(acc);
}

}  // namespace idlm
