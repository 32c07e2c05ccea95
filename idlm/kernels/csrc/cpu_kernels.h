// The entry points of idlm's CPU kernels (group_gemm.cpp, row_ops.cpp, decoder_stack.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

at::Tensor group_linear_q4x8(at::Tensor x, at::Tensor codes, at::Tensor scales, int64_t out_features);
at::Tensor group_linear_q8(at::Tensor x, at::Tensor codes, at::Tensor scale);
at::Tensor rms_norm_rows(at::Tensor x, at::Tensor weight, double eps);
std::vector<at::Tensor> add_rms_norm_rows(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps);
at::Tensor silu_mul_rows(at::Tensor gate_up);
at::Tensor gated_lora_add(at::Tensor out, at::Tensor x, at::Tensor a, at::Tensor b, at::Tensor gate);
at::Tensor qk_norm_rows(at::Tensor qkv, at::Tensor q_weight, at::Tensor k_weight, int64_t num_heads,
                        int64_t num_kv_heads, double eps);
at::Tensor rope_attend(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache,
                       at::Tensor write_slots, at::Tensor seq_slots, at::Tensor row_start, at::Tensor prefix_len,
                       at::Tensor extra_off, at::Tensor extra_idx, int64_t num_heads, double scale);

// A decoder's layers on the CPU, run in one call a forward: the Llama-style pre-norm layer of
// models/transformer.py (no biases; Qwen3's q/k norms where given) with every projection on the group GEMM and the
// gated LoRA's delta on it where one is attached, the ops the Python forward runs, in its order.
class DecoderStack {
 public:
  // norms: 2 a layer, then the final norm. Per layer, its projections qkv, o, gate_up, down in
  // order: out_features (4-bit: GroupQuant.repack_columns' codes and scales in weights[2 i],
  // weights[2 i + 1]; 0:
  // Q8_0 codes and scales there), and the LoRA's A and scaled B (lora[2 i], lora[2 i + 1]; None:
  // no adapter on it). qk_norms: each layer's q and k norm weights, or empty.
  DecoderStack(std::vector<at::Tensor> norms, std::vector<int64_t> out_features, std::vector<at::Tensor> weights,
               std::vector<std::optional<at::Tensor>> lora, std::vector<at::Tensor> qk_norms, double eps,
               int64_t num_heads, int64_t num_kv_heads);
  // x: the embedded rows [M, hidden]; cos, sin [M, head dim]; kv_cache [2, layers, slots, kv heads,
  // head dim]; tables as rope_attend reads them; gate [M] (0/1) or None. Returns the final-normed
  // hidden rows.
  at::Tensor forward(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor kv_cache, std::vector<at::Tensor> tables,
                     double scale, std::optional<at::Tensor> gate) const;

 private:
  at::Tensor project(int64_t index, const at::Tensor& x, const std::optional<at::Tensor>& gate) const;
  std::vector<at::Tensor> norms_;
  std::vector<int64_t> out_features_;
  std::vector<at::Tensor> weights_;
  std::vector<std::optional<at::Tensor>> lora_;
  std::vector<at::Tensor> qk_norms_;
  double eps_;
  int64_t num_heads_, num_kv_heads_;
};
