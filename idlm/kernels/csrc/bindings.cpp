// The Python module of idlm's CPU kernels (kernels/cpu_kernels.py builds it): the group GEMM
// (group_gemm.cpp) and the per-row steps of a decode layer (row_ops.cpp).
#include <torch/extension.h>

at::Tensor group_linear_q4(at::Tensor x, at::Tensor blocks, int64_t block_bytes);
at::Tensor group_linear_q8(at::Tensor x, at::Tensor codes, at::Tensor scale);
at::Tensor rms_norm_rows(at::Tensor x, at::Tensor weight, double eps);
std::vector<at::Tensor> add_rms_norm_rows(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps);
at::Tensor silu_mul_rows(at::Tensor gate_up);
at::Tensor rope_attend(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache,
                       at::Tensor write_slots, at::Tensor seq_slots, at::Tensor row_start, at::Tensor prefix_len,
                       at::Tensor extra_off, at::Tensor extra_idx, int64_t num_heads, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_linear_q8", &group_linear_q8, "x W^T for Q8_0 codes and float32 scales, float32 x");
  m.def("group_linear_q4", &group_linear_q4, "x W^T for Q4_0/Q4_1 blocks, x quantised to int8 per group");
  m.def("rms_norm_rows", &rms_norm_rows, "RMS norm of each row, times the weight");
  m.def("add_rms_norm_rows", &add_rms_norm_rows, "(rms_norm(residual + x), residual + x)");
  m.def("silu_mul_rows", &silu_mul_rows, "silu(gate) * up of a fused gate_up row");
  m.def("rope_attend", &rope_attend, "rotary, cache writes and per-row attention of one layer");
}
