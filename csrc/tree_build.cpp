// tree_build, CPU reference: verification inputs for a draft tree given as parent indices.
//   parents [N] int64 (parents[0] == -1, 0 <= parents[i] < i)
//   -> mask [N, P + N] of `dtype`: 0 where node i attends (all P prefix columns, its ancestors,
//      itself), -inf elsewhere; position_ids [N] int64 = P + depth;
//      retrieve_paths [leaves, max_depth + 1] int64: root-to-leaf node ids per leaf, leaves in
//      increasing node order, -1 padded.
// tree_build_batched: the same per row of a batch of padded trees (ops.h), against a per-row
// prefix mask; see the comment above tree_build_batched_cpu.
// Also home of check_tree_cpu and check_padded_tree_row_cpu, the tree validation every CPU op shares.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ops.h"

namespace falcon_ext {

namespace {

void check_tree_shape(const at::Tensor& parents) {
  FALCON_CHECK_DIM(parents, 1);
  FALCON_CHECK_DTYPE(parents, at::kLong);
  TORCH_CHECK(parents.numel() >= 1, "parents must hold at least the root node, got an empty tensor");
}

}  // namespace

void check_tree_build_args(const at::Tensor& parents, int64_t prefix_len, at::ScalarType dtype) {
  check_tree_shape(parents);
  TORCH_CHECK(prefix_len >= 0, "prefix_len must be >= 0, got ", prefix_len);
  // prefix_len + N is the mask width and the largest position id: it must not overflow int64
  TORCH_CHECK(prefix_len <= std::numeric_limits<int64_t>::max() - parents.numel(),
              "prefix_len + N must fit in int64, got prefix_len = ", prefix_len, " and N = ", parents.numel());
  TORCH_CHECK(is_supported_float(dtype), "dtype must be a floating type for the additive mask (float64, float32, ",
              "float16 or bfloat16), got ", dtype);
}

void check_tree_cpu(const at::Tensor& parents) {
  TORCH_CHECK(parents.device().is_cpu(), "parents must be a CPU tensor here, got ", parents.device());
  check_tree_shape(parents);
  const int64_t n = parents.numel();
  // accessor reads through strides, so non-contiguous parents need no copy
  const auto p = parents.accessor<int64_t, 1>();
  for (int64_t i = 0; i < n; ++i) check_tree_node(i, p[i]);
}

void check_tree_node(int64_t node, int64_t parent) {
  TORCH_CHECK(node != 0 || parent == -1, "malformed tree: parents[0] must be -1 (node 0 is the root), got ", parent);
  // parents[i] < i makes every walk to the root strictly decreasing: no cycles, no forward refs
  TORCH_CHECK(node == 0 || (parent >= 0 && parent < node), "malformed tree: node ", node, " has parent ", parent,
              "; every non-root node needs 0 <= parents[i] < i (a parent precedes its child)");
}

void check_padded_tree_node(int64_t row, int64_t node, int64_t parent, bool after_padding) {
  TORCH_CHECK(node != 0 || parent == -1, "malformed tree in row ", row, ": parents[", row,
              ", 0] must be -1 (node 0 is the root), got ", parent);
  TORCH_CHECK(node == 0 || !after_padding || parent == -1, "malformed tree in row ", row, ": node ", node,
              " has parent ", parent, " after a padding node; padding (parent -1) must fill the end of the row");
  TORCH_CHECK(node == 0 || parent == -1 || (parent >= 0 && parent < node), "malformed tree in row ", row, ": node ",
              node, " has parent ", parent,
              "; every non-root node needs 0 <= parents[b, i] < i (a parent precedes its child), or -1 for padding");
}

int64_t check_padded_tree_row_cpu(const at::Tensor& parents, int64_t row) {
  TORCH_CHECK(parents.device().is_cpu(), "parents must be a CPU tensor here, got ", parents.device());
  const auto p = parents.accessor<int64_t, 2>();
  const int64_t n = parents.size(1);
  int64_t nodes = n;
  for (int64_t i = 0; i < n; ++i) {
    check_padded_tree_node(row, i, p[row][i], nodes < i);
    if (i > 0 && p[row][i] == -1 && nodes == n) nodes = i;
  }
  return nodes;
}

void check_tree_build_batched_args(const at::Tensor& parents, const at::Tensor& prefix_mask, at::ScalarType dtype) {
  TORCH_CHECK(parents.dim() == 2, "parents must have shape [B, N], got ", parents.sizes());
  FALCON_CHECK_DTYPE(parents, at::kLong);
  TORCH_CHECK(parents.size(0) >= 1 && parents.size(1) >= 1,
              "parents must have B >= 1 rows of N >= 1 nodes (each row holds at least its root), got ", parents.sizes());
  TORCH_CHECK(prefix_mask.dim() == 2 && prefix_mask.size(0) == parents.size(0), "prefix_mask must have shape [B = ",
              parents.size(0), ", P], got ", prefix_mask.sizes());
  TORCH_CHECK(prefix_mask.scalar_type() == at::kBool || prefix_mask.scalar_type() == at::kLong,
              "prefix_mask must be Bool or Long (nonzero = visible cache slot), got ", prefix_mask.scalar_type());
  FALCON_CHECK_SAME_DEVICE(prefix_mask, parents);
  TORCH_CHECK(is_supported_float(dtype), "dtype must be a floating type for the additive mask (float64, float32, ",
              "float16 or bfloat16), got ", dtype);
}

namespace {

std::vector<int64_t> node_depths(const at::Tensor& parents) {
  const auto p = parents.accessor<int64_t, 1>();
  std::vector<int64_t> depth(parents.numel(), 0);
  for (int64_t i = 1; i < parents.numel(); ++i) depth[i] = depth[p[i]] + 1;  // parent already done
  return depth;
}

// visible[i][j]: node j is node i or one of its ancestors (row i = row of its parent + itself).
std::vector<std::vector<bool>> ancestor_or_self(const at::Tensor& parents) {
  const auto p = parents.accessor<int64_t, 1>();
  const int64_t n = parents.numel();
  std::vector<std::vector<bool>> visible(n);
  for (int64_t i = 0; i < n; ++i) {
    visible[i] = i == 0 ? std::vector<bool>(n, false) : visible[p[i]];
    visible[i][i] = true;
  }
  return visible;
}

at::Tensor build_mask(const at::Tensor& parents, int64_t prefix_len, at::ScalarType dtype) {
  const int64_t n = parents.numel();
  const auto visible = ancestor_or_self(parents);
  at::Tensor mask = at::empty({n, prefix_len + n}, parents.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "tree_build_mask_cpu", [&] {
    const scalar_t hidden = -std::numeric_limits<scalar_t>::infinity();
    auto m = mask.accessor<scalar_t, 2>();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = 0; c < prefix_len; ++c) m[i][c] = scalar_t(0);
      for (int64_t j = 0; j < n; ++j) m[i][prefix_len + j] = visible[i][j] ? scalar_t(0) : hidden;
    }
  });
  return mask;
}

at::Tensor build_retrieve_paths(const at::Tensor& parents, const std::vector<int64_t>& depth) {
  const auto p = parents.accessor<int64_t, 1>();
  const int64_t n = parents.numel();
  std::vector<bool> has_child(n, false);
  for (int64_t i = 1; i < n; ++i) has_child[p[i]] = true;
  std::vector<int64_t> leaves;
  int64_t max_depth = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!has_child[i]) leaves.push_back(i);
    max_depth = std::max(max_depth, depth[i]);
  }
  at::Tensor paths = at::full({static_cast<int64_t>(leaves.size()), max_depth + 1}, -1, parents.options());
  auto out = paths.accessor<int64_t, 2>();
  for (size_t r = 0; r < leaves.size(); ++r) {
    // walk leaf -> root, filling the row from the leaf's depth down to column 0
    for (int64_t node = leaves[r]; node != -1; node = p[node]) out[r][depth[node]] = node;
  }
  return paths;
}

// Row b of the batched mask: real node i sees the visible prefix slots, its ancestors and
// itself. A padding node sees only itself: an all -inf row would give it NaN attention outputs,
// and the next layer would multiply that NaN value by the other nodes' zero weight for it
// (0 * NaN = NaN), corrupting the real nodes too.
template <typename scalar_t>
void fill_batched_mask_row(at::TensorAccessor<scalar_t, 2> m, const std::vector<std::vector<bool>>& visible,
                           at::TensorAccessor<bool, 1> prefix, int64_t nodes) {
  const scalar_t hidden = -std::numeric_limits<scalar_t>::infinity();
  const int64_t n = m.size(0), prefix_len = prefix.size(0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < prefix_len; ++c) m[i][c] = i < nodes && prefix[c] ? scalar_t(0) : hidden;
    for (int64_t j = 0; j < n; ++j) {
      const bool open = i < nodes ? j < nodes && visible[i][j] : j == i;
      m[i][prefix_len + j] = open ? scalar_t(0) : hidden;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_build_cpu(const at::Tensor& parents, int64_t prefix_len,
                                                              at::ScalarType dtype) {
  check_tree_build_args(parents, prefix_len, dtype);
  check_tree_cpu(parents);
  const std::vector<int64_t> depth = node_depths(parents);
  at::Tensor position_ids = at::empty({parents.numel()}, parents.options());
  auto pos = position_ids.accessor<int64_t, 1>();
  for (int64_t i = 0; i < parents.numel(); ++i) pos[i] = prefix_len + depth[i];
  return {build_mask(parents, prefix_len, dtype), position_ids, build_retrieve_paths(parents, depth)};
}

// Batched: every row checked first (nothing is allocated for a malformed batch), then each row
// built from its first n_b nodes by the helpers above. Position ids count the row's visible
// prefix slots, as transformers does for a left-padded row (cumsum of the attention mask), so a
// row's positions do not depend on the padding or stale slots other rows' lengths leave in it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_build_batched_cpu(const at::Tensor& parents,
                                                                      const at::Tensor& prefix_mask,
                                                                      at::ScalarType dtype) {
  check_tree_build_batched_args(parents, prefix_mask, dtype);
  const int64_t batch = parents.size(0), n = parents.size(1), prefix_len = prefix_mask.size(1);
  std::vector<int64_t> nodes(batch);
  for (int64_t b = 0; b < batch; ++b) nodes[b] = check_padded_tree_row_cpu(parents, b);
  const at::Tensor prefix = prefix_mask.ne(0);
  const auto pre = prefix.accessor<bool, 2>();
  at::Tensor mask = at::empty({batch, n, prefix_len + n}, parents.options().dtype(dtype));
  at::Tensor position_ids = at::empty({batch, n}, parents.options());
  auto pos = position_ids.accessor<int64_t, 2>();
  std::vector<at::Tensor> row_paths;
  int64_t leaves = 0, columns = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const at::Tensor tree = parents[b].narrow(0, 0, nodes[b]);
    const std::vector<int64_t> depth = node_depths(tree);
    const auto visible = ancestor_or_self(tree);
    int64_t seen = 0;
    for (int64_t c = 0; c < prefix_len; ++c) seen += pre[b][c];
    for (int64_t i = 0; i < n; ++i) pos[b][i] = seen + (i < nodes[b] ? depth[i] : 0);  // padding: the root's
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "tree_build_batched_mask_cpu", [&] {
      fill_batched_mask_row<scalar_t>(mask.accessor<scalar_t, 3>()[b], visible, pre[b], nodes[b]);
    });
    row_paths.push_back(build_retrieve_paths(tree, depth));
    leaves = std::max(leaves, row_paths.back().size(0));
    columns = std::max(columns, row_paths.back().size(1));
  }
  at::Tensor paths = at::full({batch, leaves, columns}, -1, parents.options());
  for (int64_t b = 0; b < batch; ++b) {
    paths[b].narrow(0, 0, row_paths[b].size(0)).narrow(1, 0, row_paths[b].size(1)).copy_(row_paths[b]);
  }
  return {mask, position_ids, paths};
}

}  // namespace falcon_ext
