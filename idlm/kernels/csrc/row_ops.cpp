// The elementwise steps and the attention of a CPU decode step, one call each, every row computed
// alone: a row's bits do not depend on how many rows the call has or what they hold. Built with
// the group GEMM by kernels/cpu_kernels.py.
//
// An eager PyTorch step spends more on its ~1,400 op calls (3-5 us each on a small CPU) than on the
// arithmetic of the elementwise steps; here a layer's rotary, cache writes and attention are one
// call, and each norm and the MLP's activation one more.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

using idlm::dot;
using idlm::exp256;
using idlm::lane_sum;
using idlm::load_partial;
using idlm::store_partial;

namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == at::kFloat && t.dim() == 2 && t.is_contiguous(), name, " must be 2-D contiguous float32");
}

// t as contiguous float32 rows of its last dimension (the tensor itself where it is one already)
at::Tensor as_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == at::kFloat && t.dim() >= 1, name, " must be float32");
  return t.contiguous().view({-1, t.size(-1)});
}

// y = x / sqrt(mean(x^2) + eps) * w for one row of n.
void norm_row(const float* x, const float* w, float eps, int64_t n, float* y) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  if (i < n) {
    __m256 v = load_partial(x + i, n - i, 0.0f);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(lane_sum(acc) / static_cast<float>(n) + eps));
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv), _mm256_loadu_ps(w + i)));
  if (i < n)
    store_partial(y + i, _mm256_mul_ps(_mm256_mul_ps(load_partial(x + i, n - i, 0.0f), inv),
                                       load_partial(w + i, n - i, 0.0f)), n - i);
}

// out = x * cos + rotate_half(x) * sin for one head of d (rotate_half(x) = [-x[d/2:], x[:d/2]]):
// a product, a product and a sum per element, as PyTorch's eager rotary computes them.
void rotate_head(const float* x, const float* cos, const float* sin, int64_t d, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
  for (int64_t i = half; i < d; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

}  // namespace

// Shapes [..., n]: each row of the last dimension alone.
at::Tensor rms_norm_rows(at::Tensor input, at::Tensor weight, double eps) {
  const at::Tensor x = as_rows(input, "x");
  TORCH_CHECK(weight.dtype() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be contiguous float32 of x's width");
  auto y = at::empty(input.sizes(), x.options());
  const int64_t n = x.size(1);
  for (int64_t m = 0; m < x.size(0); ++m)
    norm_row(x.data_ptr<float>() + m * n, weight.data_ptr<float>(), static_cast<float>(eps), n,
             y.data_ptr<float>() + m * n);
  return y;
}

// qkv [M, (H + 2 KV) D] with each q head normed by q_weight and each k head by k_weight (Qwen3's q/k
// norms; v as it is), as rms_norm_rows computes each head.
at::Tensor qk_norm_rows(at::Tensor qkv, at::Tensor q_weight, at::Tensor k_weight, int64_t num_heads,
                        int64_t num_kv_heads, double eps) {
  qkv = qkv.contiguous();
  check_rows(qkv, "qkv");
  const int64_t d = q_weight.numel(), width = qkv.size(1);
  TORCH_CHECK(q_weight.dtype() == at::kFloat && k_weight.dtype() == at::kFloat && q_weight.is_contiguous() &&
                  k_weight.is_contiguous() && k_weight.numel() == d && width == (num_heads + 2 * num_kv_heads) * d,
              "q/k norm weights must be contiguous float32 of the head dim, qkv (heads + 2 kv heads) of them");
  auto out = qkv.clone();
  const float *src = qkv.data_ptr<float>(), *qw = q_weight.data_ptr<float>(), *kw = k_weight.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t r = 0; r < qkv.size(0); ++r)
    for (int64_t h = 0; h < num_heads + num_kv_heads; ++h)
      norm_row(src + r * width + h * d, h < num_heads ? qw : kw, static_cast<float>(eps), d, dst + r * width + h * d);
  return out;
}

// (rms_norm(residual + x), residual + x)
std::vector<at::Tensor> add_rms_norm_rows(at::Tensor input, at::Tensor residual_in, at::Tensor weight, double eps) {
  TORCH_CHECK(input.sizes() == residual_in.sizes(), "x and residual must have one shape");
  const at::Tensor x = as_rows(input, "x"), residual = as_rows(residual_in, "residual");
  TORCH_CHECK(weight.dtype() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be contiguous float32 of x's width");
  auto total = at::empty(input.sizes(), x.options()), y = at::empty(input.sizes(), x.options());
  const int64_t n = x.size(1), count = x.numel();
  const float *a = x.data_ptr<float>(), *b = residual.data_ptr<float>();
  float* t = total.data_ptr<float>();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(t + i, _mm256_add_ps(_mm256_loadu_ps(b + i), _mm256_loadu_ps(a + i)));
  for (; i < count; ++i) t[i] = b[i] + a[i];
  for (int64_t m = 0; m < x.size(0); ++m)
    norm_row(t + m * n, weight.data_ptr<float>(), static_cast<float>(eps), n, y.data_ptr<float>() + m * n);
  return {y, total};
}

// gate_up [M, 2I] (the gate's columns, then the up projection's) -> silu(gate) * up [M, I]
// Shapes [..., 2I] -> [..., I].
at::Tensor silu_mul_rows(at::Tensor input) {
  const at::Tensor gate_up = as_rows(input, "gate_up");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) == 2 * width, "gate_up must have an even width");
  auto shape = input.sizes().vec();
  shape.back() = width;
  auto y = at::empty(shape, gate_up.options());
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (int64_t m = 0; m < rows; ++m) {
    const float* g = gate_up.data_ptr<float>() + m * 2 * width;
    const float* u = g + width;
    float* out = y.data_ptr<float>() + m * width;
    for (int64_t i = 0; i < width; i += 8) {
      const int left = static_cast<int>(std::min<int64_t>(8, width - i));
      __m256 a = left == 8 ? _mm256_loadu_ps(g + i) : load_partial(g + i, left, 0.0f);
      __m256 b = left == 8 ? _mm256_loadu_ps(u + i) : load_partial(u + i, left, 0.0f);
      // silu(a) = a / (1 + e^-a)
      __m256 s = _mm256_div_ps(a, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, a))));
      __m256 r = _mm256_mul_ps(s, b);
      if (left == 8) _mm256_storeu_ps(out + i, r);
      else store_partial(out + i, r, left);
    }
  }
  return y;
}

// One attention layer of a decode step from its fused projection's output: rotates q and k by
// (cos, sin), writes k and v into the layer's cache at write_slots (-1: the row writes nothing),
// then each row attends, alone, to the keys it sees: of its sequence's key slots
// (seq_slots[row_start[r]:]), the first prefix_len[r] positions, then the positions
// extra_idx[extra_off[r]:extra_off[r + 1]] (a draft tree's rows), in that order.
// qkv [M, (H + 2 KV) D]; cos, sin [M, D]; caches [slots, KV, D] float32. Returns [M, H D].
at::Tensor rope_attend(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache,
                       at::Tensor write_slots, at::Tensor seq_slots, at::Tensor row_start, at::Tensor prefix_len,
                       at::Tensor extra_off, at::Tensor extra_idx, int64_t num_heads, double scale) {
  qkv = qkv.contiguous();
  check_rows(qkv, "qkv");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  TORCH_CHECK(k_cache.dtype() == at::kFloat && v_cache.dtype() == at::kFloat && k_cache.dim() == 3 &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "the caches must be contiguous float32 [slots, kv heads, head dim]");
  for (const at::Tensor* t : {&write_slots, &seq_slots, &row_start, &prefix_len, &extra_off, &extra_idx})
    TORCH_CHECK(t->dtype() == at::kLong && t->is_contiguous(), "slot and row tables must be contiguous int64");
  const int64_t rows = qkv.size(0), kv_heads = k_cache.size(1), d = k_cache.size(2);
  const int64_t group = num_heads / kv_heads, q_width = num_heads * d, width = qkv.size(1);
  TORCH_CHECK(num_heads % kv_heads == 0 && width == (num_heads + 2 * kv_heads) * d && cos.size(1) == d &&
                  cos.size(0) == rows && sin.sizes() == cos.sizes() && write_slots.numel() == rows &&
                  row_start.numel() == rows && prefix_len.numel() == rows && extra_off.numel() == rows + 1,
              "shapes do not fit");
  const float *src = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const int64_t *ws = write_slots.data_ptr<int64_t>(), *slots = seq_slots.data_ptr<int64_t>();
  const int64_t *start = row_start.data_ptr<int64_t>(), *prefix = prefix_len.data_ptr<int64_t>();
  const int64_t *eoff = extra_off.data_ptr<int64_t>(), *eidx = extra_idx.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0);

  auto q = at::empty({rows, q_width}, qkv.options());
  float* qp = q.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float *row = src + r * width, *c = cp + r * d, *s = sp + r * d;
    for (int64_t h = 0; h < num_heads; ++h) rotate_head(row + h * d, c, s, d, qp + r * q_width + h * d);
    const int64_t slot = ws[r];
    if (slot < 0) continue;
    TORCH_CHECK(slot < num_slots, "a write slot lies past the cache");
    for (int64_t h = 0; h < kv_heads; ++h) {
      rotate_head(row + q_width + h * d, c, s, d, kc + (slot * kv_heads + h) * d);
      std::copy_n(row + q_width + (kv_heads + h) * d, d, vc + (slot * kv_heads + h) * d);
    }
  }
  const int64_t num_keys = seq_slots.numel();
  for (int64_t i = 0; i < num_keys; ++i) TORCH_CHECK(slots[i] >= 0 && slots[i] < num_slots, "a key slot lies past the cache");
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(start[r] >= 0 && prefix[r] >= 0 && start[r] + prefix[r] <= num_keys && eoff[r] <= eoff[r + 1] &&
                    eoff[r + 1] <= extra_idx.numel(), "a row's keys lie outside its table");
    for (int64_t e = eoff[r]; e < eoff[r + 1]; ++e)
      TORCH_CHECK(eidx[e] >= 0 && start[r] + eidx[e] < num_keys, "a row's keys lie outside its table");
  }

  auto out = at::empty({rows, q_width}, qkv.options());
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  // each (row, head) is one task, computed whole by one thread: its bits do not depend on the split
  at::parallel_for(0, rows * num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> keys;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / num_heads, h = task % num_heads, kvh = h / group;
      keys.clear();
      for (int64_t j = 0; j < prefix[r]; ++j) keys.push_back(slots[start[r] + j]);
      for (int64_t e = eoff[r]; e < eoff[r + 1]; ++e) keys.push_back(slots[start[r] + eidx[e]]);
      const int64_t n = static_cast<int64_t>(keys.size());
      float* o = op + r * q_width + h * d;
      if (n == 0) {
        std::fill_n(o, d, 0.0f);
        continue;
      }
      const float* qh = qp + r * q_width + h * d;
      scores.assign((n + 7) / 8 * 8, 0.0f);
      float best = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        scores[j] = dot(qh, kc + (keys[j] * kv_heads + kvh) * d, d) * fscale;
        best = std::max(best, scores[j]);
      }
      __m256 total = _mm256_setzero_ps();
      const __m256 shift = _mm256_set1_ps(best);
      for (int64_t j = 0; j < n; j += 8) {
        const int left = static_cast<int>(std::min<int64_t>(8, n - j));
        __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores.data() + j), shift));
        if (left < 8) {
          store_partial(scores.data() + j, p, left);
          p = load_partial(scores.data() + j, left, 0.0f);
        } else {
          _mm256_storeu_ps(scores.data() + j, p);
        }
        total = _mm256_add_ps(total, p);
      }
      const float inv = 1.0f / lane_sum(total);
      for (int64_t i = 0; i < d; i += 8) {
        const int left = static_cast<int>(std::min<int64_t>(8, d - i));
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {
          const float* v = vc + (keys[j] * kv_heads + kvh) * d + i;
          acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[j]), left == 8 ? _mm256_loadu_ps(v) : load_partial(v, left, 0.0f),
                                acc);
        }
        acc = _mm256_mul_ps(acc, _mm256_set1_ps(inv));
        if (left == 8) _mm256_storeu_ps(o + i, acc);
        else store_partial(o + i, acc, left);
      }
    }
  });
  return out;
}

// out + (x A^T) B^T * gate on the rows whose gate is not 0 (the gated LoRA's delta: A [R, K], B [N, R]
// scaled); the other rows are out's, untouched. Each gated row alone: its R dot products with A's
// rows, then N with B's, in a fixed order.
at::Tensor gated_lora_add(at::Tensor out, at::Tensor x, at::Tensor a, at::Tensor b, at::Tensor gate) {
  out = out.contiguous();
  x = x.contiguous();
  check_rows(out, "out");
  check_rows(x, "x");
  check_rows(a, "A");
  check_rows(b, "B");
  const int64_t rows = x.size(0), in = x.size(1), rank = a.size(0), n = b.size(0);
  TORCH_CHECK(gate.dtype() == at::kFloat && gate.numel() == rows && a.size(1) == in && b.size(1) == rank &&
                  out.size(0) == rows && out.size(1) == n,
              "shapes do not fit");
  gate = gate.contiguous();
  const float* gates = gate.data_ptr<float>();
  if (std::all_of(gates, gates + rows, [](float g) { return g == 0.0f; })) return out;  // (no gated row: a K = 0 step)
  auto result = out.clone();
  const float *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  const float* gp = gate.data_ptr<float>();
  float* rp = result.data_ptr<float>();
  std::vector<float> low(rank);
  for (int64_t r = 0; r < rows; ++r) {
    if (gp[r] == 0.0f) continue;
    for (int64_t k = 0; k < rank; ++k) low[k] = dot(ap + k * in, xp + r * in, in);
    const float g = gp[r];
    float* row = rp + r * n;
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) row[j] += dot(bp + j * rank, low.data(), rank) * g;
    });
  }
  return result;
}
