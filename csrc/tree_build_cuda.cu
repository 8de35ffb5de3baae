// tree_build, CUDA kernels + launcher (contract and CPU reference: tree_build.cpp).
//   parents [N] int64 -> mask [N, P + N] dtype, position_ids [N] int64, retrieve_paths [leaves, max_depth + 1] int64
// Three kernels on the current stream:
//   1. tree_scan_kernel (one block): validates every node, depths -> position_ids, child flags,
//      leaf count and max depth into a 4-int64 status.
//   2. tree_mask_kernel: the N x (P + N) mask, one element per thread, consecutive threads on
//      consecutive columns (coalesced stores). Independent of kernel 1's verdict: its ancestor
//      walks stop at any invalid parent, so it is launched before the host sync.
//   3. retrieve_paths_kernel: one leaf per thread.
// Host sync: retrieve_paths' shape depends on the data (leaf count, max depth), so the launcher
// copies the 4-int64 status to the host once (cudaMemcpyAsync + stream sync) between kernels 2
// and 3; that copy also carries the first malformed node, reported like the CPU op does.
// tree_build_batched: the same three kernels over B padded rows (ops.h), the scan with one block
// per row, and the same single sync, which carries every row's status (first bad node, leaf
// count, max depth, node count): a malformed row raises as on the CPU, naming the row.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ops.h"

namespace falcon_ext {
namespace {

constexpr int kScanThreads = 1024;
constexpr int kThreads = 256;

// status: [first bad node (N if none), its parent, leaf count, max depth]
__global__ void __launch_bounds__(kScanThreads)
    tree_scan_kernel(const int64_t* __restrict__ parents, int64_t n, int64_t prefix_len,
                     int64_t* __restrict__ position_ids, int32_t* __restrict__ has_child,
                     int64_t* __restrict__ status) {
  __shared__ unsigned long long first_bad, leaves, max_depth;
  if (threadIdx.x == 0) first_bad = n, leaves = 0, max_depth = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) has_child[i] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t p = parents[i];
    const bool ok = i == 0 ? p == -1 : (p >= 0 && p < i);
    if (!ok) atomicMin(&first_bad, static_cast<unsigned long long>(i));
    if (ok && i > 0) has_child[p] = 1;  // racing stores all write 1
  }
  __syncthreads();  // global stores above are visible to the whole block after the barrier
  if (first_bad == static_cast<unsigned long long>(n)) {
    // every parent is valid, so walks strictly decrease to the root: at most i steps
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      int64_t depth = 0;
      for (int64_t k = i; k > 0; k = parents[k]) ++depth;
      position_ids[i] = prefix_len + depth;
      atomicMax(&max_depth, static_cast<unsigned long long>(depth));
      if (!has_child[i]) atomicAdd(&leaves, 1ull);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const auto bad = static_cast<int64_t>(first_bad);
    status[0] = bad;
    status[1] = bad < n ? parents[bad] : 0;
    status[2] = static_cast<int64_t>(leaves);
    status[3] = static_cast<int64_t>(max_depth);
  }
}

// j is i or an ancestor of i. Ancestor ids decrease along the walk, so stop once below j; an
// invalid parent (not in [0, k)) ends the walk, which bounds it by i - j steps for any input.
__device__ bool ancestor_or_self(const int64_t* __restrict__ parents, int64_t j, int64_t i) {
  int64_t k = i;
  while (k > j) {
    const int64_t p = parents[k];
    if (p < 0 || p >= k) return false;
    k = p;
  }
  return k == j;
}

template <typename scalar_t>
__global__ void tree_mask_kernel(const int64_t* __restrict__ parents, int64_t n, int64_t prefix_len, scalar_t hidden,
                                 scalar_t* __restrict__ mask) {
  const int64_t width = prefix_len + n, total = n * width;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / width, col = e - row * width;
    const bool visible = col < prefix_len || ancestor_or_self(parents, col - prefix_len, row);
    mask[e] = visible ? scalar_t(0) : hidden;
  }
}

// Runs only on a validated tree. A leaf's row is its rank among leaves (count of leaves before it).
__global__ void retrieve_paths_kernel(const int64_t* __restrict__ parents, const int32_t* __restrict__ has_child,
                                      const int64_t* __restrict__ position_ids, int64_t n, int64_t prefix_len,
                                      int64_t cols, int64_t* __restrict__ paths) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (has_child[i]) continue;
    int64_t rank = 0;
    for (int64_t j = 0; j < i; ++j) rank += has_child[j] == 0;
    int64_t* row = paths + rank * cols;
    const int64_t depth = position_ids[i] - prefix_len;
    for (int64_t c = depth + 1; c < cols; ++c) row[c] = -1;
    for (int64_t c = depth, k = i; c >= 0; --c, k = parents[k]) row[c] = k;
  }
}

int blocks_for(int64_t work) { return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, 4096)); }

// ---- batched: row b of parents [B, N] is a tree over its first n_b nodes, then parent -1 padding ----

// status per row: [first bad node (N if none), its parent, leaf count, max depth, node count n_b]
constexpr int kRowStatus = 5;

// One block per row. A padding node has depth 0 (the root's position); leaves and depths count
// the row's real nodes only.
__global__ void __launch_bounds__(kScanThreads)
    batched_tree_scan_kernel(const int64_t* __restrict__ parents, const bool* __restrict__ prefix, int64_t n,
                             int64_t prefix_len, int64_t* __restrict__ position_ids, int32_t* __restrict__ has_child,
                             int64_t* __restrict__ status) {
  const int64_t row = blockIdx.x;
  parents += row * n, prefix += row * prefix_len, position_ids += row * n, has_child += row * n;
  status += row * kRowStatus;
  __shared__ unsigned long long first_bad, first_padding, leaves, max_depth, seen;
  if (threadIdx.x == 0) first_bad = n, first_padding = n, leaves = 0, max_depth = 0, seen = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) has_child[i] = 0;
  __syncthreads();
  unsigned long long visible = 0;  // the row's visible prefix slots: its tokens' count
  for (int64_t c = threadIdx.x; c < prefix_len; c += blockDim.x) visible += prefix[c];
  atomicAdd(&seen, visible);
  for (int64_t i = 1 + threadIdx.x; i < n; i += blockDim.x) {
    if (parents[i] == -1) atomicMin(&first_padding, static_cast<unsigned long long>(i));
  }
  __syncthreads();
  const auto nodes = static_cast<int64_t>(first_padding);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t p = parents[i];
    const bool ok = i == 0 ? p == -1 : i < nodes ? (p >= 0 && p < i) : p == -1;
    if (!ok) atomicMin(&first_bad, static_cast<unsigned long long>(i));
    if (ok && i > 0 && i < nodes) has_child[p] = 1;
  }
  __syncthreads();
  if (first_bad == static_cast<unsigned long long>(n)) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      int64_t depth = 0;
      if (i < nodes) {
        for (int64_t k = i; k > 0; k = parents[k]) ++depth;
        atomicMax(&max_depth, static_cast<unsigned long long>(depth));
        if (!has_child[i]) atomicAdd(&leaves, 1ull);
      }
      position_ids[i] = static_cast<int64_t>(seen) + depth;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const auto bad = static_cast<int64_t>(first_bad);
    status[0] = bad;
    status[1] = bad < n ? parents[bad] : 0;
    status[2] = static_cast<int64_t>(leaves);
    status[3] = static_cast<int64_t>(max_depth);
    status[4] = nodes;
  }
}

// Like tree_mask_kernel over B rows; a padding node (parent -1 past the root) sees only itself
// (tree_build.cpp says why). Reads in bounds for any input, like tree_mask_kernel.
template <typename scalar_t>
__global__ void batched_tree_mask_kernel(const int64_t* __restrict__ parents, const bool* __restrict__ prefix,
                                         int64_t batch, int64_t n, int64_t prefix_len, scalar_t hidden,
                                         scalar_t* __restrict__ mask) {
  const int64_t width = prefix_len + n, per_row = n * width, total = batch * per_row;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / per_row, rest = e - b * per_row, i = rest / width, col = rest - i * width;
    const int64_t* row_parents = parents + b * n;
    bool visible;
    if (i > 0 && row_parents[i] == -1) {
      visible = col == prefix_len + i;
    } else if (col < prefix_len) {
      visible = prefix[b * prefix_len + col];
    } else {
      visible = ancestor_or_self(row_parents, col - prefix_len, i);
    }
    mask[e] = visible ? scalar_t(0) : hidden;
  }
}

// Runs only on validated rows; paths is pre-filled with -1. A leaf's row is its rank among the
// row's leaves; its depth is its position id minus the root's.
__global__ void batched_retrieve_paths_kernel(const int64_t* __restrict__ parents,
                                              const int32_t* __restrict__ has_child,
                                              const int64_t* __restrict__ position_ids,
                                              const int64_t* __restrict__ status, int64_t batch, int64_t n,
                                              int64_t leaves, int64_t cols, int64_t* __restrict__ paths) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < batch * n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / n, i = e - b * n;
    if (i >= status[b * kRowStatus + 4] || has_child[e]) continue;
    int64_t rank = 0;
    for (int64_t j = 0; j < i; ++j) rank += has_child[b * n + j] == 0;
    int64_t* out = paths + (b * leaves + rank) * cols;
    const int64_t* row_parents = parents + b * n;
    for (int64_t c = position_ids[e] - position_ids[b * n], k = i; c >= 0; --c, k = row_parents[k]) out[c] = k;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_build_cuda(const at::Tensor& parents, int64_t prefix_len,
                                                               at::ScalarType dtype) {
  check_tree_build_args(parents, prefix_len, dtype);  // shapes only; the kernel checks the values
  const int64_t n = parents.numel();
  const c10::cuda::CUDAGuard guard(parents.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor par = parents.contiguous();
  at::Tensor position_ids = at::empty({n}, par.options());
  at::Tensor has_child = at::empty({n}, par.options().dtype(at::kInt));
  at::Tensor status = at::empty({4}, par.options());
  tree_scan_kernel<<<1, kScanThreads, 0, stream>>>(par.data_ptr<int64_t>(), n, prefix_len,
                                                   position_ids.data_ptr<int64_t>(), has_child.data_ptr<int32_t>(),
                                                   status.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor mask = at::empty({n, prefix_len + n}, par.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "tree_build_mask_cuda", [&] {
    const auto hidden = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
    tree_mask_kernel<scalar_t><<<blocks_for(mask.numel()), kThreads, 0, stream>>>(
        par.data_ptr<int64_t>(), n, prefix_len, hidden, mask.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  int64_t host_status[4];  // the one host sync of this op (see the header comment)
  C10_CUDA_CHECK(cudaMemcpyAsync(host_status, status.data_ptr<int64_t>(), sizeof(host_status),
                                 cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (host_status[0] < n) check_tree_node(host_status[0], host_status[1]);  // throws

  const int64_t cols = host_status[3] + 1;
  at::Tensor paths = at::empty({host_status[2], cols}, par.options());
  retrieve_paths_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      par.data_ptr<int64_t>(), has_child.data_ptr<int32_t>(), position_ids.data_ptr<int64_t>(), n, prefix_len, cols,
      paths.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mask, position_ids, paths};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_build_batched_cuda(const at::Tensor& parents,
                                                                       const at::Tensor& prefix_mask,
                                                                       at::ScalarType dtype) {
  check_tree_build_batched_args(parents, prefix_mask, dtype);  // shapes only; the kernels check the values
  const int64_t batch = parents.size(0), n = parents.size(1), prefix_len = prefix_mask.size(1);
  const c10::cuda::CUDAGuard guard(parents.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor par = parents.contiguous();
  const at::Tensor prefix = prefix_mask.ne(0).contiguous();
  at::Tensor position_ids = at::empty({batch, n}, par.options());
  at::Tensor has_child = at::empty({batch, n}, par.options().dtype(at::kInt));
  at::Tensor status = at::empty({batch, kRowStatus}, par.options());
  batched_tree_scan_kernel<<<static_cast<unsigned>(batch), kScanThreads, 0, stream>>>(
      par.data_ptr<int64_t>(), prefix.data_ptr<bool>(), n, prefix_len, position_ids.data_ptr<int64_t>(),
      has_child.data_ptr<int32_t>(), status.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor mask = at::empty({batch, n, prefix_len + n}, par.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "tree_build_batched_mask_cuda", [&] {
    const auto hidden = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
    batched_tree_mask_kernel<scalar_t><<<blocks_for(mask.numel()), kThreads, 0, stream>>>(
        par.data_ptr<int64_t>(), prefix.data_ptr<bool>(), batch, n, prefix_len, hidden, mask.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  std::vector<int64_t> host_status(batch * kRowStatus);  // the one host sync of this op
  C10_CUDA_CHECK(cudaMemcpyAsync(host_status.data(), status.data_ptr<int64_t>(), host_status.size() * sizeof(int64_t),
                                 cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  int64_t leaves = 0, max_depth = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* row = host_status.data() + b * kRowStatus;
    if (row[0] < n) check_padded_tree_node(b, row[0], row[1], row[4] < row[0]);  // throws: the first bad row
    leaves = std::max(leaves, row[2]);
    max_depth = std::max(max_depth, row[3]);
  }

  at::Tensor paths = at::full({batch, leaves, max_depth + 1}, -1, par.options());
  batched_retrieve_paths_kernel<<<blocks_for(batch * n), kThreads, 0, stream>>>(
      par.data_ptr<int64_t>(), has_child.data_ptr<int32_t>(), position_ids.data_ptr<int64_t>(),
      status.data_ptr<int64_t>(), batch, n, leaves, max_depth + 1, paths.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mask, position_ids, paths};
}

}  // namespace falcon_ext
