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
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

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

}  // namespace falcon_ext
