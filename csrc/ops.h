// Declarations of every falcon_ext op (CPU reference + CUDA kernel) and the argument checks
// they share. Shapes: N = tree nodes, V = vocabulary, P = prefix (cached) length, B = batch rows.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <tuple>
#include <vector>

#define FALCON_CHECK_DIM(t, d) \
  TORCH_CHECK((t).dim() == (d), #t " must have " #d " dimensions, got shape ", (t).sizes())
#define FALCON_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must be ", (dt), ", got ", (t).scalar_type())
#define FALCON_CHECK_SAME_DEVICE(a, b)                                                        \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device, got ", \
              (a).device(), " and ", (b).device())
// at::isFloatingType also admits the Float8 / Float4 dtypes, for which no op dispatches a
// kernel: they must be refused here, before a launcher allocates or launches anything.
#define FALCON_CHECK_FLOAT(t)                                                                        \
  TORCH_CHECK(falcon_ext::is_supported_float((t).scalar_type()), #t " must be a floating tensor, got ", \
              (t).scalar_type(), " (supported: float64, float32, float16, bfloat16)")

namespace falcon_ext {

// The float dtypes every op dispatches on (see FALCON_CHECK_FLOAT).
inline bool is_supported_float(at::ScalarType st) {
  return st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

// Checks a tree given as parent indices: parents [N] int64 with parents[0] == -1 (the root)
// and 0 <= parents[i] < i for i > 0, which rules out cycles and forward references.
// Throws with the first offending node; reads nothing out of bounds. CPU tensors only.
void check_tree_cpu(const at::Tensor& parents);

// Argument checks of tree_build that need no data: parents [N >= 1] int64, prefix_len >= 0,
// a floating mask dtype.
void check_tree_build_args(const at::Tensor& parents, int64_t prefix_len, at::ScalarType dtype);

// The per-node rule behind check_tree_cpu (also used by the CUDA launcher to report the first
// bad node its kernel found): throws unless node 0 has parent -1, or 0 <= parent < node.
void check_tree_node(int64_t node, int64_t parent);

// Shape / dtype / device checks of the verify ops (no data reads; CPU and CUDA launchers):
// scores [N, V] float32/float16/bfloat16 with N, V >= 1, tokens and parents [N] int64 on its device.
void check_verify_args(const at::Tensor& scores, const char* scores_name, const at::Tensor& tokens,
                       const at::Tensor& parents);

// uniforms [N + 1] float32 on probs' device (tree_verify_sample).
void check_sample_uniforms(const at::Tensor& uniforms, const at::Tensor& probs);

// Shape / dtype / device checks of kv_compact_ (no data reads): path [L >= 1] int64, dst_start >= 0,
// every kv tensor 4-D, float32/float16/bfloat16, one dtype, on path's device, no two sharing memory.
void check_kv_compact_args(at::TensorList kv, const at::Tensor& path, int64_t dst_start);

// The path's values (root first, strictly increasing, dst_start + path[-1] inside every tensor);
// path must be a CPU tensor. The CPU op's check, also used by the CUDA op when it launches nothing.
void check_kv_path_cpu(at::TensorList kv, const at::Tensor& path, int64_t dst_start);

// ---- batched trees: B rows, each padded to the step's largest tree (N nodes) ----
// A row's tree is its first n nodes (a valid tree as above); nodes n..N-1 are padding, marked by
// parent -1 (the root's marker: a padding node is the child of nothing, so no walk from the root
// reaches it). Padding must be a suffix of the row. Padding nodes' tokens and scores are never read.

// The per-node rule for row `row` of batched parents (also used by the CUDA launcher to report the
// first bad node its kernel found): throws unless node 0 has parent -1, a padding node (parent -1)
// or a non-root node with 0 <= parent < node; `after_padding`: a padding node precedes this one,
// which then must be padding too.
void check_padded_tree_node(int64_t row, int64_t node, int64_t parent, bool after_padding);

// Checks row `row` of parents [B, N] int64 (CPU) with check_padded_tree_node and returns its node
// count n (1 <= n <= N). Reads nothing out of bounds.
int64_t check_padded_tree_row_cpu(const at::Tensor& parents, int64_t row);

// Argument checks of tree_build_batched that need no data: parents [B >= 1, N >= 1] int64,
// prefix_mask [B, P] bool or int64 on parents' device, a floating mask dtype.
void check_tree_build_batched_args(const at::Tensor& parents, const at::Tensor& prefix_mask, at::ScalarType dtype);

// Shape / dtype / device checks of the batched verify ops: scores [B, N, V] float32/float16/bfloat16
// with B, N, V >= 1, tokens and parents [B, N] int64 on its device.
void check_batched_verify_args(const at::Tensor& scores, const char* scores_name, const at::Tensor& tokens,
                               const at::Tensor& parents);

// uniforms [B, N + 1] float32 on probs' device (tree_verify_sample_batched).
void check_batched_sample_uniforms(const at::Tensor& uniforms, const at::Tensor& probs);

// Checks of kv_compact_batched_ that need no path values: paths [B >= 1, L >= 1] int64, src_start >= 0,
// B dst_starts each in [0, src_start], the kv tensors as for kv_compact_ and each with batch size B.
void check_kv_compact_batched_args(at::TensorList kv, const at::Tensor& paths, at::IntArrayRef dst_starts,
                                   int64_t src_start);

// The paths' values (CPU tensor): each row root first (paths[b, 0] == 0), strictly increasing, then
// -1 padding to L; src_start + the row's last node inside every tensor.
void check_kv_paths_cpu(at::TensorList kv, const at::Tensor& paths, int64_t src_start);

// ---- tree_build: verification inputs for a draft tree ----
// parents [N] int64 -> (mask [N, P + N] dtype: 0 = visible, -inf = hidden;
//                       position_ids [N] int64 = P + depth;
//                       retrieve_paths [leaves, max_depth + 1] int64, root-to-leaf node ids, -1 padded)
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_build_cpu(const at::Tensor& parents, int64_t prefix_len,
                                                              at::ScalarType dtype);

// ---- tree_verify_greedy: longest path whose draft tokens equal the target's argmax ----
// logits [N, V] float, tokens [N] int64, parents [N] int64
// -> (path [N] int64: accepted node ids from the root, -1 padded;
//     result [2] int64: (accepted nodes incl. root, next token = target argmax after the path))
std::tuple<at::Tensor, at::Tensor> tree_verify_greedy_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                                                          const at::Tensor& parents);

// ---- tree_verify_sample: lossless rejection sampling over the tree ----
// probs [N, V] float (non-negative weights of the target's warped distribution at each node),
// tokens [N] int64, parents [N] int64, uniforms [N + 1] float in [0, 1):
//   uniforms[i] decides node i's acceptance, uniforms[N] samples the correction/bonus token.
// -> same outputs as tree_verify_greedy.
//
// Float sums over V follow one fixed order in both implementations so that CPU and CUDA agree
// bit for bit: V is cut into kSampleChunks contiguous chunks of ceil(V / kSampleChunks) tokens
// (one per CUDA thread); each chunk is summed in token order from 0.f, then the chunk sums are
// added in chunk order from 0.f (float32 throughout).
constexpr int64_t kSampleChunks = 1024;
std::tuple<at::Tensor, at::Tensor> tree_verify_sample_cpu(const at::Tensor& probs, const at::Tensor& tokens,
                                                          const at::Tensor& parents, const at::Tensor& uniforms);

// ---- kv_compact_: keep the accepted path's KV entries, contiguously, in place ----
// kv: list of [B, H, S, D] cache tensors (any float dtype, any strides), path [L] int64 node ids
// (strictly increasing, as tree_verify returns them); entry dst_start + path[j] moves to dst_start + j.
void kv_compact_cpu(at::TensorList kv, const at::Tensor& path, int64_t dst_start);

// ---- batched ops (B rows; the checks above say how rows are padded) ----
// tree_build_batched: parents [B, N] int64, prefix_mask [B, P] bool/int64 (nonzero = the cache slot
// holds one of the row's tokens) -> (mask [B, N, P + N] dtype; position_ids [B, N] int64 = the row's
// visible prefix count + depth; retrieve_paths [B, max leaves, max depth + 1] int64, -1 padded).
// Real node i sees the row's visible prefix slots, its ancestors and itself; a padding node sees
// only itself (never an all -inf row, see tree_build.cpp), and no real node sees a padding node.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_build_batched_cpu(const at::Tensor& parents,
                                                                      const at::Tensor& prefix_mask,
                                                                      at::ScalarType dtype);

// tree_verify_greedy_batched / tree_verify_sample_batched: scores [B, N, V], tokens and parents
// [B, N], uniforms [B, N + 1] (row b: uniforms[b, i] tests node i, uniforms[b, n_b] draws the last
// token) -> (path [B, N] int64, result [B, 2] int64). Row b's outputs are the batch-1 op's on the
// row's first n_b nodes (with uniforms[b, :n_b + 1]), path -1 padded to N.
std::tuple<at::Tensor, at::Tensor> tree_verify_greedy_batched_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                                                                  const at::Tensor& parents);
std::tuple<at::Tensor, at::Tensor> tree_verify_sample_batched_cpu(const at::Tensor& probs, const at::Tensor& tokens,
                                                                  const at::Tensor& parents,
                                                                  const at::Tensor& uniforms);

// kv_compact_batched_: kv list of [B, H, S, D], paths [B, L] int64 (-1 padded, as the batched verify
// ops return them); for every tensor and row b: entry src_start + paths[b, j] moves to
// dst_starts[b] + j, with dst_starts[b] <= src_start (each row's tree was appended at src_start,
// each row's cache ends at its own dst_starts[b]).
void kv_compact_batched_cpu(at::TensorList kv, const at::Tensor& paths, at::IntArrayRef dst_starts,
                            int64_t src_start);

// ---- falcon_draft_step: one Falcon drafter forward over a block of k positions, B branches ----
// x [B, k, 2H], h0/c0 [2, B, H], ctx_k/ctx_v [S, H], br_k/br_v [B, D, H],
// weights: kNumDraftWeights tensors in DraftWeight slot order (below); all one dtype/device, except
// the matrices when `scales` is given (int8, see kDraftMatrices).
// -> (out [B, k, H], h [2, B, H], c [2, B, H], block_k [B, k, H], block_v [B, k, H]); see csrc/draft_step.cpp.
// encode_only: settle context positions: only h, c, block_k, block_v; out is [B, k, 0].
// The fused weights' slots, the order of falcon_ext.drafters.falcon.FUSED_WEIGHTS (PyTorch LSTM gate order
// i, f, g, o; b = b_ih + b_hh). Shapes: w_ih0 [4H, 2H], w_hh0 [4H, H], b0 [4H], w_ih1 [4H, H],
// w_hh1 [4H, H], b1 [4H], attn_norm [H], w_qkv [3H, H], w_o [H, H], mlp_norm [H], w_up [M, H], w_down [H, M].
enum DraftWeight : size_t {
  kWIh0, kWHh0, kB0, kWIh1, kWHh1, kB1, kAttnNorm, kWQkv, kWO, kMlpNorm, kWUp, kWDown, kNumDraftWeights
};
// The matrix slots, in slot order: with `scales` (CPU only) these are int8 [N, K] and scales[i] is
// the float32 [N] per-row scale of slot kDraftMatrices[i] (int8_linear's format); the rest stay in x's dtype.
inline constexpr std::array<DraftWeight, 8> kDraftMatrices = {kWIh0, kWHh0, kWIh1, kWHh1, kWQkv, kWO, kWUp, kWDown};
struct DraftStepDims {
  int64_t B, k, H, M, S, D, heads, head_dim;
};
DraftStepDims check_draft_step(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const at::Tensor& ctx_k, const at::Tensor& ctx_v, const at::Tensor& br_k,
                               const at::Tensor& br_v, at::TensorList weights, int64_t num_heads, double eps,
                               const c10::optional<at::TensorList>& scales);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> falcon_draft_step_cpu(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& ctx_k,
    const at::Tensor& ctx_v, const at::Tensor& br_k, const at::Tensor& br_v, at::TensorList weights,
    int64_t num_heads, double eps, bool encode_only, const c10::optional<at::TensorList>& scales);

// ---- int8_linear: x [..., K] float @ (weight [N, K] int8 * scale [N] float32 per row)^T + bias [N]
// -> [..., N] in x's dtype, fp32 accumulation. CPU only (csrc/int8_linear.cpp says why).
void check_int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias);
at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias);
// The unchecked kernel behind it, for the fused draft step: rows of x -> [rows, N] fp32.
at::Tensor int8_dense(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                      const c10::optional<at::Tensor>& bias);

#ifdef FALCON_EXT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_build_cuda(const at::Tensor& parents, int64_t prefix_len,
                                                               at::ScalarType dtype);
std::tuple<at::Tensor, at::Tensor> tree_verify_greedy_cuda(const at::Tensor& logits, const at::Tensor& tokens,
                                                           const at::Tensor& parents);
std::tuple<at::Tensor, at::Tensor> tree_verify_sample_cuda(const at::Tensor& probs, const at::Tensor& tokens,
                                                           const at::Tensor& parents, const at::Tensor& uniforms);
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_build_batched_cuda(const at::Tensor& parents,
                                                                       const at::Tensor& prefix_mask,
                                                                       at::ScalarType dtype);
std::tuple<at::Tensor, at::Tensor> tree_verify_greedy_batched_cuda(const at::Tensor& logits, const at::Tensor& tokens,
                                                                   const at::Tensor& parents);
std::tuple<at::Tensor, at::Tensor> tree_verify_sample_batched_cuda(const at::Tensor& probs, const at::Tensor& tokens,
                                                                   const at::Tensor& parents,
                                                                   const at::Tensor& uniforms);
void kv_compact_batched_cuda(at::TensorList kv, const at::Tensor& paths, at::IntArrayRef dst_starts,
                             int64_t src_start);
void kv_compact_cuda(at::TensorList kv, const at::Tensor& path, int64_t dst_start);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> falcon_draft_step_cuda(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& ctx_k,
    const at::Tensor& ctx_v, const at::Tensor& br_k, const at::Tensor& br_v, at::TensorList weights,
    int64_t num_heads, double eps, bool encode_only, const c10::optional<at::TensorList>& scales);
#endif

}  // namespace falcon_ext
