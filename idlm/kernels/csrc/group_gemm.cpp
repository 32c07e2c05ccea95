// y = x W^T for llama.cpp's groupwise formats (Q4_0/Q4_1 and Q8_0, groups of 32 input features),
// float32 activations and outputs, on AVX2 + FMA. Built on first use by kernels/group_gemm.py.
//
// Each output element (row m, column n) is computed by the same instructions in the same order
// whatever the number of rows: for each group g in order, the eight-lane products of the group's
// dequantised codes with x are scaled by the group's scale and added to one eight-lane
// accumulator, the offset times the group's sum of x to a scalar one; the lanes are summed at the
// end in a fixed tree. Rows are taken up to four at a time only to decode a group's codes once
// for them, so a row's bits do not depend on the rows around it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowBlock = 4;

inline float lane_sum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);                // lanes i + i+4
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));       // + lanes 2, 3
  s = _mm_add_ss(s, _mm_movehdup_ps(s));        // + lane 1
  return _mm_cvtss_f32(s);
}

// The 32 codes of one group as four vectors of eight floats, elements 0..31 in order.
inline void decode_q4(const uint8_t* block, __m256 q[4]) {
  // byte i: element i in its low nibble, element 16 + i in its high nibble (GGUF's layout)
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
  __m128i mask = _mm_set1_epi8(0x0F);
  __m128i lo = _mm_and_si128(bytes, mask);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

inline void decode_q8(const int8_t* block, __m256 q[4]) {
  for (int j = 0; j < 4; ++j) {
    __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 8 * j));
    q[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
  }
}

template <bool kQ8, int kRows>
void rows_block(const float* x, int64_t x_stride, const float* xsum, int64_t groups, const uint8_t* codes,
                int64_t code_bytes, const float* scale, const float* offset, int64_t n_begin, int64_t n_end,
                float* y, int64_t y_stride) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row_codes = codes + n * groups * code_bytes;
    const float* d = scale + n * groups;
    const float* off = offset ? offset + n * groups : nullptr;
    __m256 acc[kRows];
    float acc_off[kRows];
    for (int r = 0; r < kRows; ++r) { acc[r] = _mm256_setzero_ps(); acc_off[r] = 0.0f; }
    for (int64_t g = 0; g < groups; ++g) {
      __m256 q[4];
      if (kQ8) decode_q8(reinterpret_cast<const int8_t*>(row_codes + g * code_bytes), q);
      else decode_q4(row_codes + g * code_bytes, q);
      __m256 dg = _mm256_set1_ps(d[g]);
      for (int r = 0; r < kRows; ++r) {
        const float* xg = x + r * x_stride + g * kGroup;
        __m256 p = _mm256_mul_ps(q[0], _mm256_loadu_ps(xg));
        p = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xg + 8), p);
        p = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xg + 16), p);
        p = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xg + 24), p);
        acc[r] = _mm256_fmadd_ps(p, dg, acc[r]);
        if (off) acc_off[r] = std::fma(off[g], xsum[r * groups + g], acc_off[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) y[r * y_stride + n] = lane_sum(acc[r]) + acc_off[r];
  }
}

template <bool kQ8>
void run(const float* x, int64_t rows, int64_t groups, const float* xsum, const uint8_t* codes, int64_t code_bytes,
         const float* scale, const float* offset, int64_t n_begin, int64_t n_end, float* y, int64_t out) {
  int64_t in = groups * kGroup;
  int64_t m = 0;
  for (; m + kRowBlock <= rows; m += kRowBlock)
    rows_block<kQ8, kRowBlock>(x + m * in, in, xsum + m * groups, groups, codes, code_bytes, scale, offset,
                               n_begin, n_end, y + m * out, out);
  // the last rows in one pass too (each row's arithmetic is the same in a block of any size)
  const int64_t left = rows - m;
  auto tail = [&](auto block) {
    block(x + m * in, in, xsum + m * groups, groups, codes, code_bytes, scale, offset, n_begin, n_end, y + m * out,
          out);
  };
  if (left == 3) tail(rows_block<kQ8, 3>);
  else if (left == 2) tail(rows_block<kQ8, 2>);
  else if (left == 1) tail(rows_block<kQ8, 1>);
}

// 4-bit codes against activations quantised per group of 32 to int16 (scale max|x| / 32767,
// finer than bfloat16 unless a group's largest element is more than 128 times the others): the
// group's dot product is exact in int32 (pmaddwd), so only the scaling is rounded.
template <int kRows>
void rows_block_i16(const int16_t* xq, const float* xs, const float* xsum, int64_t in, int64_t groups,
                    const uint8_t* codes, const float* scale, const float* offset, int64_t n_begin, int64_t n_end,
                    float* y, int64_t y_stride) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row_codes = codes + n * groups * (kGroup / 2);
    const float* d = scale + n * groups;
    const float* off = offset ? offset + n * groups : nullptr;
    __m256 acc[kRows];
    float acc_off[kRows];
    for (int r = 0; r < kRows; ++r) { acc[r] = _mm256_setzero_ps(); acc_off[r] = 0.0f; }
    for (int64_t g = 0; g < groups; ++g) {
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row_codes + g * (kGroup / 2)));
      __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, mask));                     // elements 0..15
      __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask));  // 16..31
      for (int r = 0; r < kRows; ++r) {
        const int16_t* xg = xq + r * in + g * kGroup;
        __m256i dot = _mm256_add_epi32(
            _mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg))),
            _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 16))));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d[g] * xs[r * groups + g]), acc[r]);
        if (off) acc_off[r] = std::fma(off[g], xsum[r * groups + g], acc_off[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) y[r * y_stride + n] = lane_sum(acc[r]) + acc_off[r];
  }
}

}  // namespace

// x [M, K] float32; codes [N, K / 2] uint8 (4-bit, as below). The activations are quantised per
// group of 32 to int16 first (rows_block_i16). Returns [M, N] float32.
torch::Tensor group_linear_i16(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor offset) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be 2-D float32");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous(), "4-bit codes only");
  x = x.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), out = codes.size(0), groups = in / kGroup;
  TORCH_CHECK(in % kGroup == 0 && codes.size(1) * 2 == in && scale.size(0) == out && scale.size(1) == groups,
              "shapes do not fit");
  const bool has_offset = offset.numel() > 0;
  auto xq = torch::empty({rows, in}, x.options().dtype(torch::kInt16));
  auto xs = torch::empty({rows, groups}, x.options());
  auto xsum = torch::empty({rows, groups}, x.options());
  const float* xp = x.data_ptr<float>();
  int16_t* qp = xq.data_ptr<int16_t>();
  float* sp = xs.data_ptr<float>();
  float* sump = xsum.data_ptr<float>();
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = xp + m * in + g * kGroup;
      float amax = 0.0f, sum = 0.0f;
      for (int64_t i = 0; i < kGroup; ++i) { amax = std::max(amax, std::fabs(xg[i])); sum += xg[i]; }
      const float step = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
      for (int64_t i = 0; i < kGroup; ++i) qp[m * in + g * kGroup + i] = static_cast<int16_t>(std::nearbyint(xg[i] * inv));
      sp[m * groups + g] = step;
      sump[m * groups + g] = sum;
    }
  auto y = torch::empty({rows, out}, x.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* dp = scale.data_ptr<float>();
  const float* op = has_offset ? offset.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    int64_t m = 0;
    for (; m + kRowBlock <= rows; m += kRowBlock)
      rows_block_i16<kRowBlock>(qp + m * in, sp + m * groups, sump + m * groups, in, groups, cp, dp, op, begin, end,
                                yp + m * out, out);
    const int64_t left = rows - m;
    auto tail = [&](auto block) {
      block(qp + m * in, sp + m * groups, sump + m * groups, in, groups, cp, dp, op, begin, end, yp + m * out, out);
    };
    if (left == 3) tail(rows_block_i16<3>);
    else if (left == 2) tail(rows_block_i16<2>);
    else if (left == 1) tail(rows_block_i16<1>);
  });
  return y;
}

// x [M, K] float32; codes [N, K / 2] uint8 (Q4: 16 bytes a group) or [N, K] int8 (Q8_0);
// scale [N, K / 32] float32; offset the same or empty (Q8_0). Returns [M, N] float32.
torch::Tensor group_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor offset) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be 2-D float32");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous(), "scale must be contiguous float32");
  x = x.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), out = codes.size(0);
  TORCH_CHECK(in % kGroup == 0 && scale.size(0) == out && scale.size(1) == in / kGroup, "shapes do not fit");
  const bool q8 = codes.dtype() == torch::kInt8;
  const int64_t code_bytes = q8 ? kGroup : kGroup / 2;
  TORCH_CHECK(codes.is_contiguous() && codes.size(1) * (q8 ? 1 : 2) == in, "codes do not fit x");
  const bool has_offset = offset.numel() > 0;
  TORCH_CHECK(!has_offset || (offset.sizes() == scale.sizes() && offset.is_contiguous()), "offset must be like scale");
  const int64_t groups = in / kGroup;
  // each row's sums of x over the groups, in order (the offsets' term)
  auto xsum = torch::empty({rows, groups}, x.options());
  const float* xp = x.data_ptr<float>();
  float* sp = xsum.data_ptr<float>();
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t i = 0; i < kGroup; ++i) s += xp[m * in + g * kGroup + i];
      sp[m * groups + g] = s;
    }
  auto y = torch::empty({rows, out}, x.options());
  const uint8_t* cp = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const float* dp = scale.data_ptr<float>();
  const float* op = has_offset ? offset.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // columns split between threads; a column's arithmetic is the same whichever thread runs it
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    if (q8) run<true>(xp, rows, groups, sp, cp, code_bytes, dp, op, begin, end, yp, out);
    else run<false>(xp, rows, groups, sp, cp, code_bytes, dp, op, begin, end, yp, out);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_linear", &group_linear, "x W^T for groupwise Q4/Q8 weights, float32 (AVX2 + FMA)");
  m.def("group_linear_i16", &group_linear_i16, "x W^T for 4-bit groupwise weights, x quantised to int16 per group");
}
