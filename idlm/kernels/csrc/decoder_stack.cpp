// DecoderStack (cpu_kernels.h): a CPU forward's layers in one call. The Python forward of a small
// model on a small CPU spends a sixth of a decode step in the interpreter (module calls, attribute
// lookups, argument checks around ~300 kernel calls); here the same kernels run in the same order,
// so the same bits, without it.
#include "cpu_kernels.h"

DecoderStack::DecoderStack(std::vector<at::Tensor> norms, std::vector<int64_t> out_features,
                           std::vector<at::Tensor> weights, std::vector<std::optional<at::Tensor>> lora,
                           std::vector<at::Tensor> qk_norms, double eps, int64_t num_heads, int64_t num_kv_heads)
    : norms_(std::move(norms)),
      out_features_(std::move(out_features)),
      weights_(std::move(weights)),
      lora_(std::move(lora)),
      qk_norms_(std::move(qk_norms)),
      eps_(eps),
      num_heads_(num_heads),
      num_kv_heads_(num_kv_heads) {
  const size_t projections = out_features_.size();
  TORCH_CHECK(projections % 4 == 0 && norms_.size() == projections / 2 + 1 && weights_.size() == 2 * projections &&
                  lora_.size() == 2 * projections && (qk_norms_.empty() || qk_norms_.size() == projections / 2),
              "a DecoderStack takes 2 norms and 4 projections a layer (and 2 q/k norms or none), and the final norm");
}

at::Tensor DecoderStack::project(int64_t index, const at::Tensor& x, const std::optional<at::Tensor>& gate) const {
  const int64_t out_features = out_features_[index];
  at::Tensor out = out_features ? group_linear_q4x8(x, weights_[2 * index], weights_[2 * index + 1], out_features)
                                : group_linear_q8(x, weights_[2 * index], weights_[2 * index + 1]);
  const auto& a = lora_[2 * index];
  if (gate.has_value() && a.has_value()) out = gated_lora_add(out, x, *a, *lora_[2 * index + 1], *gate);  // (as GatedLoRA.add_to)
  return out;
}

at::Tensor DecoderStack::forward(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor kv_cache,
                                 std::vector<at::Tensor> tables, double scale, std::optional<at::Tensor> gate) const {
  TORCH_CHECK(tables.size() == 6, "rope_attend's six tables");
  const int64_t layers = static_cast<int64_t>(out_features_.size()) / 4;
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.size(1) == layers,
              "kv_cache must be [2, layers, slots, kv heads, head dim]");
  at::Tensor residual, h;
  for (int64_t l = 0; l < layers; ++l) {
    if (l == 0) {
      h = rms_norm_rows(x, norms_[0], eps_);
      residual = x;
    } else {
      auto pair = add_rms_norm_rows(x, residual, norms_[2 * l], eps_);
      h = pair[0];
      residual = pair[1];
    }
    at::Tensor qkv = project(4 * l, h, gate);
    if (!qk_norms_.empty())
      qkv = qk_norm_rows(qkv, qk_norms_[2 * l], qk_norms_[2 * l + 1], num_heads_, num_kv_heads_, eps_);
    at::Tensor attended = rope_attend(qkv, cos, sin, kv_cache[0][l], kv_cache[1][l], tables[0], tables[1], tables[2],
                                      tables[3], tables[4], tables[5], num_heads_, scale);
    auto pair = add_rms_norm_rows(project(4 * l + 1, attended, gate), residual, norms_[2 * l + 1], eps_);
    h = pair[0];
    residual = pair[1];
    x = project(4 * l + 3, silu_mul_rows(project(4 * l + 2, h, gate)), gate);
  }
  return add_rms_norm_rows(x, residual, norms_.back(), eps_)[0];
}
