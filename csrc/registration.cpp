// The one list of falcon_ext op schemas, and which implementation serves each dispatch key.
// The dispatcher routes by the tensors' device: CPU tensors reach the C++ references,
// CUDA tensors the kernels (when built with CUDA).
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY(falcon_ext, m) {
  // Tree attention mask over [prefix + tree], depth position ids, root-to-leaf paths.
  m.def("tree_build(Tensor parents, int prefix_len, ScalarType dtype) -> (Tensor mask, Tensor position_ids, Tensor retrieve_paths)");
  // Greedy verification: accepted path and the target's next token.
  m.def("tree_verify_greedy(Tensor logits, Tensor tokens, Tensor parents) -> (Tensor path, Tensor result)");
  // Lossless speculative rejection sampling over the tree.
  m.def("tree_verify_sample(Tensor probs, Tensor tokens, Tensor parents, Tensor uniforms) -> (Tensor path, Tensor result)");
  // In-place KV compaction of the accepted path, every cache tensor in one call.
  m.def("kv_compact_(Tensor(a!)[] kv, Tensor path, int dst_start) -> ()");
  // Batched versions: B rows, each tree padded to the largest (parent -1 marks padding, see ops.h).
  m.def("tree_build_batched(Tensor parents, Tensor prefix_mask, ScalarType dtype) -> (Tensor mask, Tensor position_ids, Tensor retrieve_paths)");
  m.def("tree_verify_greedy_batched(Tensor logits, Tensor tokens, Tensor parents) -> (Tensor path, Tensor result)");
  m.def("tree_verify_sample_batched(Tensor probs, Tensor tokens, Tensor parents, Tensor uniforms) -> (Tensor path, Tensor result)");
  // Ragged compaction: each row's path from the common src_start to that row's own dst_starts[b].
  m.def("kv_compact_batched_(Tensor(a!)[] kv, Tensor paths, int[] dst_starts, int src_start) -> ()");
  // One Falcon drafter forward (2-layer LSTM, relaxed attention over the draft KV cache, MLP) for a block.
  m.def("falcon_draft_step(Tensor x, Tensor h0, Tensor c0, Tensor ctx_k, Tensor ctx_v, Tensor br_k, Tensor br_v, Tensor[] weights, int num_heads, float eps, bool encode_only=False, Tensor[]? scales=None) -> (Tensor out, Tensor h, Tensor c, Tensor block_k, Tensor block_v)");
  // x @ (int8 weight * per-row scale)^T + bias for a few rows, fp32 accumulation (CPU only: csrc/int8_linear.cpp).
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(falcon_ext, CPU, m) {
  m.impl("tree_build", &falcon_ext::tree_build_cpu);
  m.impl("tree_verify_greedy", &falcon_ext::tree_verify_greedy_cpu);
  m.impl("tree_verify_sample", &falcon_ext::tree_verify_sample_cpu);
  m.impl("kv_compact_", &falcon_ext::kv_compact_cpu);
  m.impl("tree_build_batched", &falcon_ext::tree_build_batched_cpu);
  m.impl("tree_verify_greedy_batched", &falcon_ext::tree_verify_greedy_batched_cpu);
  m.impl("tree_verify_sample_batched", &falcon_ext::tree_verify_sample_batched_cpu);
  m.impl("kv_compact_batched_", &falcon_ext::kv_compact_batched_cpu);
  m.impl("falcon_draft_step", &falcon_ext::falcon_draft_step_cpu);
  m.impl("int8_linear", &falcon_ext::int8_linear_cpu);
}

#ifdef FALCON_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(falcon_ext, CUDA, m) {
  m.impl("tree_build", &falcon_ext::tree_build_cuda);
  m.impl("tree_verify_greedy", &falcon_ext::tree_verify_greedy_cuda);
  m.impl("tree_verify_sample", &falcon_ext::tree_verify_sample_cuda);
  m.impl("kv_compact_", &falcon_ext::kv_compact_cuda);
  m.impl("tree_build_batched", &falcon_ext::tree_build_batched_cuda);
  m.impl("tree_verify_greedy_batched", &falcon_ext::tree_verify_greedy_batched_cuda);
  m.impl("tree_verify_sample_batched", &falcon_ext::tree_verify_sample_batched_cuda);
  m.impl("kv_compact_batched_", &falcon_ext::kv_compact_batched_cuda);
  m.impl("falcon_draft_step", &falcon_ext::falcon_draft_step_cuda);
}
#endif

PYBIND11_MODULE(_C, module) {
  module.def(
      "compiled_with_cuda",
      [] {
#ifdef FALCON_EXT_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels were compiled into this build.");
}
