// tree_verify_greedy / tree_verify_sample, CPU references: which draft nodes the target accepts.
//   logits / probs [N, V] float32/float16/bfloat16 (read as float32), tokens [N] int64 in [0, V),
//   parents [N] int64 (valid tree), uniforms [N + 1] float32 (sampling only)
//   -> path [N] int64: accepted node ids from the root (path[0] == 0), -1 padded;
//      result [2] int64: (accepted nodes incl. the root, next token).
// Both walk from the root; the CUDA kernels (tree_verify_cuda.cu) follow the same steps and the same
// float summation order (kSampleChunks, ops.h), so CPU and CUDA results are identical.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
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

namespace {

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

}  // namespace

std::tuple<at::Tensor, at::Tensor> tree_verify_greedy_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                                                          const at::Tensor& parents) {
  check_verify_args(logits, "logits", tokens, parents);
  check_tree_and_tokens_cpu(tokens, parents, logits.size(1));
  const auto tok = tokens.accessor<int64_t, 1>();
  std::vector<int64_t> accepted{0};
  while (true) {
    const int64_t target = argmax_lowest(row_as_float(logits, accepted.back()));
    const int64_t child = first_accepted_child(parents, accepted.back(), [&](int64_t c) { return tok[c] == target; });
    if (child < 0) return make_outputs(accepted, parents.numel(), target, tokens.options());
    accepted.push_back(child);
  }
}

std::tuple<at::Tensor, at::Tensor> tree_verify_sample_cpu(const at::Tensor& probs, const at::Tensor& tokens,
                                                          const at::Tensor& parents, const at::Tensor& uniforms) {
  check_verify_args(probs, "probs", tokens, parents);
  check_sample_uniforms(uniforms, probs);
  check_tree_and_tokens_cpu(tokens, parents, probs.size(1));
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
      const int64_t next_token = drawn >= 0 ? drawn : argmax_lowest(weights);
      return make_outputs(accepted, parents.numel(), next_token, tokens.options());
    }
    accepted.push_back(child);
  }
}

}  // namespace falcon_ext
