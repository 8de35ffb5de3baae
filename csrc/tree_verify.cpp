// tree_verify_greedy / tree_verify_sample, CPU references: which draft nodes the target accepts.
//   logits / probs [N, V] float32/float16/bfloat16 (read as float32), tokens [N] int64 in [0, V),
//   parents [N] int64 (valid tree), uniforms [N + 1] float32 (sampling only)
//   -> path [N] int64: accepted node ids from the root (path[0] == 0), -1 padded;
//      result [2] int64: (accepted nodes incl. the root, next token).
// The batched ops run the same walks on each row's first n_b nodes (ops.h: padded trees).
// Both walk from the root; the CUDA kernels (tree_verify_cuda.cu) follow the same steps and the same
// float summation order (kSampleChunks, ops.h), so CPU and CUDA results are identical.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "ops.h"

namespace falcon_ext {

void check_verify_args(const at::Tensor& scores, const char* scores_name, const at::Tensor& tokens,
                       const at::Tensor& parents) {
  TORCH_CHECK(scores.dim() == 2, scores_name, " must have shape [N, V], got ", scores.sizes());
  const auto st = scores.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, scores_name,
              " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(scores.size(0) >= 1 && scores.size(1) >= 1, scores_name, " must have N >= 1 rows and V >= 1 columns, got ",
              scores.sizes());
  FALCON_CHECK_DIM(tokens, 1);
  FALCON_CHECK_DTYPE(tokens, at::kLong);
  FALCON_CHECK_DIM(parents, 1);
  FALCON_CHECK_DTYPE(parents, at::kLong);
  TORCH_CHECK(tokens.numel() == scores.size(0) && parents.numel() == scores.size(0), "tokens and parents must have ",
              scores.size(0), " entries (one per row of ", scores_name, "), got ", tokens.numel(), " and ",
              parents.numel());
  TORCH_CHECK(tokens.device() == scores.device() && parents.device() == scores.device(),
              "tokens and parents must be on ", scores_name, "'s device ", scores.device(), ", got ", tokens.device(),
              " and ", parents.device());
}

void check_sample_uniforms(const at::Tensor& uniforms, const at::Tensor& probs) {
  FALCON_CHECK_DIM(uniforms, 1);
  FALCON_CHECK_DTYPE(uniforms, at::kFloat);
  TORCH_CHECK(uniforms.numel() == probs.size(0) + 1, "uniforms must have N + 1 = ", probs.size(0) + 1,
              " entries (one per node, one for the last draw), got ", uniforms.numel());
  FALCON_CHECK_SAME_DEVICE(uniforms, probs);
}

void check_batched_verify_args(const at::Tensor& scores, const char* scores_name, const at::Tensor& tokens,
                               const at::Tensor& parents) {
  TORCH_CHECK(scores.dim() == 3, scores_name, " must have shape [B, N, V], got ", scores.sizes());
  const auto st = scores.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, scores_name,
              " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(scores.size(0) >= 1 && scores.size(1) >= 1 && scores.size(2) >= 1, scores_name,
              " must have B >= 1, N >= 1 and V >= 1, got ", scores.sizes());
  const at::IntArrayRef rows = scores.sizes().slice(0, 2);
  TORCH_CHECK(tokens.sizes() == rows && parents.sizes() == rows, "tokens and parents must have shape [B, N] = ", rows,
              " (one entry per row of ", scores_name, "), got ", tokens.sizes(), " and ", parents.sizes());
  FALCON_CHECK_DTYPE(tokens, at::kLong);
  FALCON_CHECK_DTYPE(parents, at::kLong);
  TORCH_CHECK(tokens.device() == scores.device() && parents.device() == scores.device(),
              "tokens and parents must be on ", scores_name, "'s device ", scores.device(), ", got ", tokens.device(),
              " and ", parents.device());
}

void check_batched_sample_uniforms(const at::Tensor& uniforms, const at::Tensor& probs) {
  TORCH_CHECK(uniforms.dim() == 2 && uniforms.size(0) == probs.size(0) && uniforms.size(1) == probs.size(1) + 1,
              "uniforms must have shape [B, N + 1] = [", probs.size(0), ", ", probs.size(1) + 1,
              "] (per row: one per node, one for the last draw), got ", uniforms.sizes());
  FALCON_CHECK_DTYPE(uniforms, at::kFloat);
  FALCON_CHECK_SAME_DEVICE(uniforms, probs);
}

namespace {

// Host-side value checksnamespace {

// Host-side value checks: a valid tree and every draft token inside the vocabulary.
void check_tree_and_tokens_cpu(const at::Tensor& tokens, const at::Tensor& parents, int64_t vocab) {
  check_tree_cpu(parents);
  const auto tok = tokens.accessor<int64_t, 1>();
  for (int64_t i = 0; i < tokens.numel(); ++i) {
    TORCH_CHECK(tok[i] >= 0 && tok[i] < vocab, "tokens[", i, "] = ", tok[i], " is outside the vocabulary [0, ", vocab,
                ")");
  }
}

std::vector<float> row_as_float(const at::Tensor& scores, int64_t node) {
  const at::Tensor row = scores[node].to(at::kFloat).contiguous();
  return std::vector<float>(row.data_ptr<float>(), row.data_ptr<float>() + row.numel());
}

// Lowest index of the maximum; NaN counts as -inf so that the answer does not depend on the
// order in which a parallel reduction meets it.
int64_t argmax_lowest(const std::vector<float>& row) {
  int64_t best = 0;
  float best_val = -std::numeric_limits<float>::infinity();
  for (size_t v = 0; v < row.size(); ++v) {
    const float x = std::isnan(row[v]) ? -std::numeric_limits<float>::infinity() : row[v];
    if (x > best_val) best_val = x, best = static_cast<int64_t>(v);
  }
  return best;
}

// First child of `node` (lowest index) satisfying `accept`, or -1. Children follow their parent.
template <typename Accept>
int64_t first_accepted_child(const at::Tensor& parents, int64_t node, Accept accept) {
  const auto p = parents.accessor<int64_t, 1>();
  for (int64_t c = node + 1; c < parents.numel(); ++c) {
    if (p[c] == node && accept(c)) return c;
  }
  return -1;
}

std::tuple<at::Tensor, at::Tensor> make_outputs(const std::vector<int64_t>& accepted, int64_t n, int64_t next_token,
                                                const at::TensorOptions& options) {
  at::Tensor path = at::full({n}, -1, options);
  for (size_t k = 0; k < accepted.size(); ++k) path[k] = accepted[k];
  at::Tensor result = at::empty({2}, options);
  result[0] = static_cast<int64_t>(accepted.size());
  result[1] = next_token;
  return {path, result};
}

// ---- sampling helpers: weights, the fixed-order sums of ops.h, the inverse-CDF draw ----

// Negative and NaN weights count as 0 (same rule as the kernel).
std::vector<float> clamped_weights(const std::vector<float>& row) {
  std::vector<float> w(row.size());
  for (size_t v = 0; v < row.size(); ++v) w[v] = row[v] > 0.f ? row[v] : 0.f;
  return w;
}

int64_t chunk_size(int64_t vocab) { return (vocab + kSampleChunks - 1) / kSampleChunks; }

std::vector<float> chunk_sums(const std::vector<float>& w) {
  const int64_t vocab = static_cast<int64_t>(w.size()), size = chunk_size(vocab);
  std::vector<float> sums(kSampleChunks, 0.f);
  for (int64_t t = 0; t < kSampleChunks; ++t) {
    for (int64_t v = t * size; v < std::min(vocab, (t + 1) * size); ++v) sums[t] += w[v];
  }
  return sums;
}

float total_of(const std::vector<float>& sums) {
  float total = 0.f;
  for (float s : sums) total += s;
  return total;
}

int64_t last_positive_in_chunk(const std::vector<float>& r, int64_t t) {
  const int64_t vocab = static_cast<int64_t>(r.size()), size = chunk_size(vocab);
  for (int64_t v = std::min(vocab, (t + 1) * size) - 1; v >= t * size; --v) {
    if (r[v] > 0.f) return v;
  }
  return -1;  // unreachable for a chunk with a positive sum
}

// Inverse CDF of the residual r at u: the first token whose running sum exceeds u * sum(r).
// The chunk is found from the chunk sums, then scanned from the running prefix. If rounding
// leaves nothing selected, the last token with positive weight (in that chunk, or overall)
// is taken. Returns -1 when r is all zero.
int64_t draw_residual(const std::vector<float>& r, float u) {
  const std::vector<float> sums = chunk_sums(r);
  const float total = total_of(sums);
  if (!(total > 0.f)) return -1;
  const float threshold = u * total;
  float prefix = 0.f;
  int64_t chunk = -1;
  for (int64_t t = 0; t < kSampleChunks; ++t) {
    const float through = prefix + sums[t];
    if (through > threshold) {
      chunk = t;
      break;
    }
    prefix = through;
  }
  if (chunk < 0) {
    for (int64_t t = kSampleChunks - 1; t >= 0 && chunk < 0; --t) {
      if (sums[t] > 0.f) chunk = t;
    }
    return last_positive_in_chunk(r, chunk);
  }
  const int64_t vocab = static_cast<int64_t>(r.size()), size = chunk_size(vocab);
  float running = prefix;
  for (int64_t v = chunk * size; v < std::min(vocab, (chunk + 1) * size); ++v) {
    running += r[v];
    if (running > threshold) return v;
  }
  return last_positive_in_chunk(r, chunk);
}

// The greedy walk over a valid tree with in-vocabulary tokens: (accepted node ids, next token).
std::pair<std::vector<int64_t>, int64_t> greedy_walk(const at::Tensor& logits, const at::Tensor& tokens,
                                                     const at::Tensor& parents) {
  const auto tok = tokens.accessor<int64_t, 1>();
  std::vector<int64_t> accepted{0};
  while (true) {
    const int64_t target = argmax_lowest(row_as_float(logits, accepted.back()));
    const int64_t child = first_accepted_child(parents, accepted.back(), [&](int64_t c) { return tok[c] == target; });
    if (child < 0) return {accepted, target};
    accepted.push_back(child);
  }
}

// The sampling walk; uniforms [N + 1] (accessor: any strides).
std::pair<std::vector<int64_t>, int64_t> sample_walk(const at::Tensor& probs, const at::Tensor& tokens,
                                                     const at::Tensor& parents, const at::Tensor& uniforms) {
  const auto tok = tokens.accessor<int64_t, 1>();
  const auto u = uniforms.accessor<float, 1>();
  std::vector<int64_t> accepted{0};
  while (true) {
    const std::vector<float> weights = clamped_weights(row_as_float(probs, accepted.back()));
    std::vector<float> residual = weights;
    float sum = total_of(chunk_sums(residual));
    // Point-mass proposal: child c is accepted with probability residual[tok] / sum; a rejected
    // token's mass leaves the residual before the next sibling is tried.
    const int64_t child = first_accepted_child(parents, accepted.back(), [&](int64_t c) {
      const float weight = residual[tok[c]];
      if (u[c] * sum < weight) return true;
      residual[tok[c]] = 0.f;
      sum -= weight;
      return false;
    });
    if (child < 0) {
      const int64_t drawn = draw_residual(residual, u[probs.size(0)]);
      return {accepted, drawn >= 0 ? drawn : argmax_lowest(weights)};
    }
    accepted.push_back(child);
  }
}

// Row b of the batched ops: checks the row (naming it in errors) and returns its node count.
int64_t check_batched_row_cpu(const at::Tensor& tokens, const at::Tensor& parents, int64_t vocab, int64_t row) {
  const int64_t nodes = check_padded_tree_row_cpu(parents, row);
  const auto tok = tokens.accessor<int64_t, 2>();
  for (int64_t i = 0; i < nodes; ++i) {  // padding nodes' tokens are never read
    TORCH_CHECK(tok[row][i] >= 0 && tok[row][i] < vocab, "tokens[", row, ", ", i, "] = ", tok[row][i],
                " is outside the vocabulary [0, ", vocab, ")");
  }
  return nodes;
}

// Runs `walk(b, nodes)` on every row after checking them all (a bad row raises before any work).
template <typename Walk>
std::tuple<at::Tensor, at::Tensor> batched_walks(const at::Tensor& tokens, const at::Tensor& parents, int64_t vocab,
                                                 Walk walk) {
  const int64_t batch = parents.size(0), n = parents.size(1);
  std::vector<int64_t> nodes(batch);
  for (int64_t b = 0; b < batch; ++b) nodes[b] = check_batched_row_cpu(tokens, parents, vocab, b);
  at::Tensor path = at::full({batch, n}, -1, tokens.options()), result = at::empty({batch, 2}, tokens.options());
  auto pa = path.accessor<int64_t, 2>();
  auto ra = result.accessor<int64_t, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    const auto [accepted, next_token] = walk(b, nodes[b]);
    for (size_t k = 0; k < accepted.size(); ++k) pa[b][k] = accepted[k];
    ra[b][0] = static_cast<int64_t>(accepted.size());
    ra[b][1] = next_token;
  }
  return {path, result};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tree_verify_greedy_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                                                          const at::Tensor& parents) {
  check_verify_args(logits, "logits", tokens, parents);
  check_tree_and_tokens_cpu(tokens, parents, logits.size(1));
  const auto [accepted, next_token] = greedy_walk(logits, tokens, parents);
  return make_outputs(accepted, parents.numel(), next_token, tokens.options());
}

std::tuple<at::Tensor, at::Tensor> tree_verify_sample_cpu(const at::Tensor& probs, const at::Tensor& tokens,
                                                          const at::Tensor& parents, const at::Tensor& uniforms) {
  check_verify_args(probs, "probs", tokens, parents);
  check_sample_uniforms(uniforms, probs);
  check_tree_and_tokens_cpu(tokens, parents, probs.size(1));
  const auto [accepted, next_token] = sample_walk(probs, tokens, parents, uniforms);
  return make_outputs(accepted, parents.numel(), next_token, tokens.options());
}

std::tuple<at::Tensor, at::Tensor> tree_verify_greedy_batched_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                                                                  const at::Tensor& parents) {
  check_batched_verify_args(logits, "logits", tokens, parents);
  return batched_walks(tokens, parents, logits.size(2), [&](int64_t b, int64_t nodes) {
    return greedy_walk(logits[b].narrow(0, 0, nodes), tokens[b].narrow(0, 0, nodes), parents[b].narrow(0, 0, nodes));
  });
}

std::tuple<at::Tensor, at::Tensor> tree_verify_sample_batched_cpu(const at::Tensor& probs, const at::Tensor& tokens,
                                                                  const at::Tensor& parents,
                                                                  const at::Tensor& uniforms) {
  check_batched_verify_args(probs, "probs", tokens, parents);
  check_batched_sample_uniforms(uniforms, probs);
  return batched_walks(tokens, parents, probs.size(2), [&](int64_t b, int64_t nodes) {
    return sample_walk(probs[b].narrow(0, 0, nodes), tokens[b].narrow(0, 0, nodes), parents[b].narrow(0, 0, nodes),
                       uniforms[b].narrow(0, 0, nodes + 1));
  });
}

}  // namespace falcon_ext
