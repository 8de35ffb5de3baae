// tree_build, CPU reference: verification inputs for a draft tree given as parent indices.
//   parents [N] int64 (parents[0] == -1, 0 <= parents[i] < i)
//   -> mask [N, P + N] of `dtype`: 0 where node i attends (all P prefix columns, its ancestors,
//      itself), -inf elsewhere; position_ids [N] int64 = P + depth;
//      retrieve_paths [leaves, max_depth + 1] int64: root-to-leaf node ids per leaf, leaves in
//      increasing node order, -1 padded.
// Also home of check_tree_cpu, the tree validation every CPU op shares.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

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

}  // namespace falcon_ext
