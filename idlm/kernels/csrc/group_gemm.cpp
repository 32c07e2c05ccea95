// y = x W^T for llama.cpp's groupwise formats (Q4_0, Q4_1 and Q8_0: groups of 32 input
// features), float32 activations and outputs, on AVX2 + FMA + F16C. Built on first use by
// kernels/cpu_kernels.py.
//
// Each output element (row m, column n) is computed by the same instructions in the same order
// whatever the number of rows: for each group g in order, the group's partial dot product is scaled
// and added to an eight-lane accumulator (Q8_0: eight lanes of one column's inputs, summed at the end
// in a fixed tree; 4-bit: eight columns, a lane each). Rows are taken up to four at a time only to
// decode a group's codes once for them, so a row's bits do not depend on the rows around it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "simd.h"

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowBlock = 4;

using idlm::lane_sum;

// The 32 codes of one group as four vectors of eight floats, elements 0..31 in order.
inline void decode_q8(const int8_t* block, __m256 q[4]) {
  for (int j = 0; j < 4; ++j) {
    __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 8 * j));
    q[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
  }
}

// Q8_0 codes (int8, kept apart from their float32 scales so that a tied embedding shares them)
// against float32 x.
template <int kRows>
void rows_block_q8(const float* x, int64_t x_stride, int64_t groups, const int8_t* codes, const float* scale,
                   int64_t n_begin, int64_t n_end, float* y, int64_t y_stride) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* row_codes = codes + n * groups * kGroup;
    const float* d = scale + n * groups;
    __m256 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256 q[4];
      decode_q8(row_codes + g * kGroup, q);
      __m256 dg = _mm256_set1_ps(d[g]);
      for (int r = 0; r < kRows; ++r) {
        const float* xg = x + r * x_stride + g * kGroup;
        __m256 p = _mm256_mul_ps(q[0], _mm256_loadu_ps(xg));
        p = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xg + 8), p);
        p = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xg + 16), p);
        p = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xg + 24), p);
        acc[r] = _mm256_fmadd_ps(p, dg, acc[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) y[r * y_stride + n] = lane_sum(acc[r]);
  }
}

// 4-bit weights repacked eight output columns at a time (GroupQuant.repack_columns), against activations rounded
// per group of 32 to int8 (llama.cpp's Q8_1). In a block of eight columns and a group of 32 inputs
// the codes are eight vectors of 32 bytes, vector s holding inputs 4s..4s+3 of each column j at
// bytes 4j..4j+3 (two vectors a 32-byte load, as low and high nibbles). With x's four bytes 4s..4s+3
// broadcast, pmaddubsw gives each column two sums of two products; the eight vectors' sums add up
// in int16 (at most 8 * 2 * 15 * 127 = 30480) and pmaddwd adds each column's two: the group's dot
// product of every column in one vector's lanes, exact in int32, then scaled by the columns' d
// times x's step; the offsets m times x's rounded group sum likewise. Lanes are columns, so nothing
// is summed across lanes, and each (row, column) takes the same instructions whatever the rows.
constexpr int64_t kColumns = 8;
constexpr int64_t kPackedGroupBytes = kColumns * kGroup / 2;  // 128

template <int kRows>
void rows_block_q4x8(const int8_t* xq, const float* xs, const float* xsum, int64_t in, int64_t groups,
                     const uint8_t* codes, const uint16_t* scales, int64_t b_begin, int64_t b_end, float* y,
                     int64_t out) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = b_begin; b < b_end; ++b) {
    __m256 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* packed = codes + (b * groups + g) * kPackedGroupBytes;
      const uint16_t* dm = scales + (b * groups + g) * 2 * kColumns;
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + kColumns)));
      __m256i w[8];
      for (int q = 0; q < 4; ++q) {
        const __m256i chunk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + 32 * q));
        w[2 * q] = _mm256_and_si256(chunk, mask);
        w[2 * q + 1] = _mm256_and_si256(_mm256_srli_epi16(chunk, 4), mask);
      }
      for (int r = 0; r < kRows; ++r) {
        const int8_t* xg = xq + r * in + g * kGroup;
        __m256i sum = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xg)));
        for (int s = 1; s < 8; ++s)
          sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(
                                          w[s], _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xg + 4 * s))));
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum, ones));
        acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, _mm256_set1_ps(xs[r * groups + g])), acc[r]);
        acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xsum[r * groups + g]), acc[r]);
      }
    }
    const int64_t n = b * kColumns, left = std::min<int64_t>(kColumns, out - n);
    for (int r = 0; r < kRows; ++r) {
      if (left == kColumns) _mm256_storeu_ps(y + r * out + n, acc[r]);
      else idlm::store_partial(y + r * out + n, acc[r], static_cast<int>(left));
    }
  }
}

// x [M, K] rounded per group of 32 to int8 (llama.cpp's Q8_1 activations): codes xq [M, K], the
// groups' steps xs = max|x_g| / 127 [M, K / 32], and the rounded groups' sums xs * sum(xq) [M, K / 32].
void quantize_rows_i8(const at::Tensor& x, at::Tensor& xq, at::Tensor& xs, at::Tensor& xsum) {
  const int64_t rows = x.size(0), in = x.size(1), groups = in / kGroup;
  xq = at::empty({rows, in}, x.options().dtype(at::kChar));
  xs = at::empty({rows, groups}, x.options());
  xsum = at::empty({rows, groups}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = xq.data_ptr<int8_t>();
  float* sp = xs.data_ptr<float>();
  float* sump = xsum.data_ptr<float>();
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = xp + m * in + g * kGroup;
      float amax = 0.0f;
      for (int64_t i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(xg[i]));
      const float step = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int64_t i = 0; i < kGroup; ++i) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(xg[i] * inv));
        qp[m * in + g * kGroup + i] = static_cast<int8_t>(q);
        sum += q;
      }
      sp[m * groups + g] = step;
      sump[m * groups + g] = step * static_cast<float>(sum);
    }
}

}  // namespace

// x [M, K] float32; codes [N, K] int8; scale [N, K / 32] float32 (Q8_0). Returns [M, N] float32.
at::Tensor group_linear_q8(at::Tensor x, at::Tensor codes, at::Tensor scale) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2, "x must be 2-D float32");
  TORCH_CHECK(codes.dtype() == at::kChar && codes.is_contiguous(), "codes must be contiguous int8");
  TORCH_CHECK(scale.dtype() == at::kFloat && scale.is_contiguous(), "scale must be contiguous float32");
  x = x.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), out = codes.size(0), groups = in / kGroup;
  TORCH_CHECK(in % kGroup == 0 && codes.size(1) == in && scale.size(0) == out && scale.size(1) == groups,
              "shapes do not fit");
  auto y = at::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* dp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // columns split between threads; a column's arithmetic is the same whichever thread runs it
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    int64_t m = 0;
    for (; m + kRowBlock <= rows; m += kRowBlock)
      rows_block_q8<kRowBlock>(xp + m * in, in, groups, cp, dp, begin, end, yp + m * out, out);
    // the last rows in one pass too (each row's arithmetic is the same in a block of any size)
    const int64_t left = rows - m;
    auto tail = [&](auto block) { block(xp + m * in, in, groups, cp, dp, begin, end, yp + m * out, out); };
    if (left == 3) tail(rows_block_q8<3>);
    else if (left == 2) tail(rows_block_q8<2>);
    else if (left == 1) tail(rows_block_q8<1>);
  });
  return y;
}

// x [M, K] float32 against 4-bit weights as quant.py's GroupQuant.repack_columns lays them out: codes
// [ceil(N / 8), K / 32, 128] uint8, scales [ceil(N / 8), K / 32, 16] (float16 bits: eight columns' d,
// then their offsets); out_features N. Returns [M, N] float32.
at::Tensor group_linear_q4x8(at::Tensor x, at::Tensor codes, at::Tensor scales, int64_t out_features) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2, "x must be 2-D float32");
  TORCH_CHECK(codes.dtype() == at::kByte && codes.is_contiguous() && codes.dim() == 3 &&
                  codes.size(2) == kPackedGroupBytes && scales.dtype() == at::kShort && scales.is_contiguous(),
              "codes and scales must be GroupQuant.repack_columns'");
  x = x.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), nb = codes.size(0), groups = in / kGroup;
  TORCH_CHECK(in % kGroup == 0 && codes.size(1) == groups && scales.size(0) == nb && scales.size(1) == groups &&
                  out_features <= nb * kColumns && out_features > (nb - 1) * kColumns,
              "shapes do not fit");
  at::Tensor xq, xs, xsum;
  quantize_rows_i8(x, xq, xs, xsum);
  const int8_t* qp = xq.data_ptr<int8_t>();
  const float* sp = xs.data_ptr<float>();
  const float* sump = xsum.data_ptr<float>();
  auto y = at::empty({rows, out_features}, x.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(scales.data_ptr<int16_t>());
  float* yp = y.data_ptr<float>();
  // column blocks split between threads; a block's arithmetic is the same whichever thread runs it
  at::parallel_for(0, nb, 8, [&](int64_t begin, int64_t end) {
    int64_t m = 0;
    for (; m + kRowBlock <= rows; m += kRowBlock)
      rows_block_q4x8<kRowBlock>(qp + m * in, sp + m * groups, sump + m * groups, in, groups, cp, dp, begin, end,
                                 yp + m * out_features, out_features);
    const int64_t left = rows - m;
    auto tail = [&](auto block) {
      block(qp + m * in, sp + m * groups, sump + m * groups, in, groups, cp, dp, begin, end, yp + m * out_features,
            out_features);
    };
    if (left == 3) tail(rows_block_q4x8<3>);
    else if (left == 2) tail(rows_block_q4x8<2>);
    else if (left == 1) tail(rows_block_q4x8<1>);
  });
  return y;
}
