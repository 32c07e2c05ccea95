// y = x W^T for llama.cpp's groupwise formats (Q4_0, Q4_1 and Q8_0: groups of 32 input
// features), float32 activations and outputs, on AVX2 + FMA + F16C. Built on first use by
// kernels/cpu_kernels.py.
//
// Each output element (row m, column n) is computed by the same instructions in the same order
// whatever the number of rows: for each group g in order, the group's eight-lane partial dot
// product is scaled and added to one eight-lane accumulator, the offset times the group's sum of x
// to a scalar one; the lanes are summed at the end in a fixed tree. Rows are taken up to four at a
// time only to decode a group's codes once for them, so a row's bits do not depend on the rows
// around it.
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

// 4-bit codes against activations quantised per group of 32 to int8 (llama.cpp's Q8_1 layout,
// scale max|x| / 127): u8 x i8 products summed in pairs (pmaddubsw, 32 products an instruction,
// no saturation: 2 * 15 * 127 < 32767), then in fours (pmaddwd with ones), exact in int32; the
// group's sum scaled by both scales. The offset term uses the rounded x's group sum, so the result
// is the dot product of the dequantised weights with the rounded x.
template <int kRows>
void rows_block_q4(const int8_t* xq, const float* xs, const float* xsum, int64_t in, int64_t groups,
                      const uint8_t* blocks, int64_t block_bytes, int64_t n_begin, int64_t n_end, float* y,
                      int64_t y_stride) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const bool has_min = block_bytes == 20;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = blocks + n * groups * block_bytes;
    __m256 acc[kRows];
    float acc_off[kRows];
    for (int r = 0; r < kRows; ++r) { acc[r] = _mm256_setzero_ps(); acc_off[r] = 0.0f; }
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* block = row + g * block_bytes;
      const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(block));
      const float off = has_min ? _cvtsh_ss(*reinterpret_cast<const uint16_t*>(block + 2)) : d * -8.0f;
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + block_bytes - kGroup / 2));
      // elements 0..15 (low nibbles) in the low lane, 16..31 (high nibbles) in the high one
      __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
      for (int r = 0; r < kRows; ++r) {
        __m256i xg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * in + g * kGroup));
        __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xg), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * xs[r * groups + g]), acc[r]);
        acc_off[r] = std::fma(off, xsum[r * groups + g], acc_off[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) y[r * y_stride + n] = lane_sum(acc[r]) + acc_off[r];
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

// x [M, K] float32; blocks [N, K / 32 * block_bytes] uint8, Q4_1 (20 bytes a block) or Q4_0 (18).
// The activations are quantised per group of 32 to int8 first (rows_block_q4). Returns [M, N].
at::Tensor group_linear_q4(at::Tensor x, at::Tensor blocks, int64_t block_bytes) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2, "x must be 2-D float32");
  TORCH_CHECK(blocks.dtype() == at::kByte && blocks.is_contiguous(), "blocks must be contiguous uint8");
  TORCH_CHECK(block_bytes == 18 || block_bytes == 20, "Q4_0 (18-byte) or Q4_1 (20-byte) blocks only");
  x = x.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), out = blocks.size(0), groups = in / kGroup;
  TORCH_CHECK(in % kGroup == 0 && blocks.size(1) == groups * block_bytes, "shapes do not fit");
  at::Tensor xq, xs, xsum;
  quantize_rows_i8(x, xq, xs, xsum);
  const int8_t* qp = xq.data_ptr<int8_t>();
  const float* sp = xs.data_ptr<float>();
  const float* sump = xsum.data_ptr<float>();
  auto y = at::empty({rows, out}, x.options());
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    int64_t m = 0;
    for (; m + kRowBlock <= rows; m += kRowBlock)
      rows_block_q4<kRowBlock>(qp + m * in, sp + m * groups, sump + m * groups, in, groups, bp, block_bytes,
                                  begin, end, yp + m * out, out);
    const int64_t left = rows - m;
    auto tail = [&](auto block) {
      block(qp + m * in, sp + m * groups, sump + m * groups, in, groups, bp, block_bytes, begin, end, yp + m * out,
            out);
    };
    if (left == 3) tail(rows_block_q4<3>);
    else if (left == 2) tail(rows_block_q4<2>);
    else if (left == 1) tail(rows_block_q4<1>);
  });
  return y;
}

