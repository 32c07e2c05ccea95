// The Python module of idlm's CPU kernels (kernels/cpu_kernels.py builds it): the group GEMM
// (group_gemm.cpp), the per-row steps of a decode layer (row_ops.cpp) and the layers in one call
// (decoder_stack.cpp).
#include <torch/extension.h>

#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_linear_q8", &group_linear_q8, "x W^T for Q8_0 codes and float32 scales, float32 x");
  m.def("group_linear_q4x8", &group_linear_q4x8, "x W^T for repacked 4-bit weights, x quantised to int8 per group");
  m.def("rms_norm_rows", &rms_norm_rows, "RMS norm of each row, times the weight");
  m.def("add_rms_norm_rows", &add_rms_norm_rows, "(rms_norm(residual + x), residual + x)");
  m.def("silu_mul_rows", &silu_mul_rows, "silu(gate) * up of a fused gate_up row");
  m.def("gated_lora_add", &gated_lora_add, "out plus the gated LoRA's delta on the gated rows");
  m.def("qk_norm_rows", &qk_norm_rows, "each q and k head of a fused qkv row normed (Qwen3)");
  m.def("rope_attend", &rope_attend, "rotary, cache writes and per-row attention of one layer");
  pybind11::class_<DecoderStack>(m, "DecoderStack")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>,
                          std::vector<std::optional<at::Tensor>>, std::vector<at::Tensor>, double, int64_t, int64_t>())
      .def("forward", &DecoderStack::forward);
}
