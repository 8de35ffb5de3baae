// kv_compact_, CUDA kernel + launcher (contract and CPU reference: kv_compact.cpp).
//   kv: [B, H, S, D] tensors (one dtype, any strides), path [L] int64 on their device.
// One thread per (tensor, b, h, d) column copies that column's entries in increasing j:
// slot dst_start + path[j] -> dst_start + j. Race free: a column is read and written by its
// own thread only (tensors must not share memory: check_kv_compact_args refuses any two whose
// byte ranges overlap), and in that thread increasing j never overwrites a source
// still to be read (path[j'] > path[j] >= j for j' > j, see kv_compact.cpp).
// Consecutive threads take consecutive d, so each step's loads and stores are coalesced for
// the usual D-contiguous layout. The copy moves raw 2- or 4-byte words: no float conversion.
//
// No host sync: the path values are checked in the kernel (every thread, before any store, with
// the same verdict everywhere): path[0] == 0, strictly increasing, dst_start + path[-1] below
// every tensor's S. An invalid path leaves every tensor untouched, silently (the CPU op raises);
// tree_verify's paths are valid by construction. The one exception: with nothing to move (an
// empty list, or tensors without columns) no kernel runs, and the path is checked on the host
// and raises like the CPU op.
//
// kv_compact_batched_: the same scheme, column (tensor, b, h, d) following row b's path from
// src_start to dst_starts[b] (copied to the device with the launch; checked on the host, so that
// dst_starts[b] <= src_start keeps the in-order copy race and alias free, kv_compact.cpp). Every
// thread checks every row's path before any store: one bad row leaves every tensor untouched.
#include <ATen/core/Tensor.h>
#include <ATen/ops/tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "ops.h"

namespace falcon_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTensorsPerLaunch = 32;  // 32 views = 2.3 KB of kernel parameters (limit 4 KB)

struct KvView {
  void* data;
  int64_t sizes[4];    // B, H, S, D
  int64_t strides[4];  // in elements
};

struct KvBatch {
  KvView views[kMaxTensorsPerLaunch];
};

__device__ bool path_valid(const int64_t* __restrict__ path, int64_t length, int64_t dst_start, int64_t min_seq) {
  bool ok = path[0] == 0 && path[length - 1] < min_seq - dst_start;  // dst_start + path[-1] could overflow
  for (int64_t j = 1; j < length && ok; ++j) ok = path[j] > path[j - 1];
  return ok;
}

// blockIdx.y picks the tensor; x threads stride over its B * H * D columns.
template <typename word_t>
__global__ void kv_compact_kernel(KvBatch batch, const int64_t* __restrict__ path, int64_t length,
                                  int64_t dst_start, int64_t min_seq) {
  if (!path_valid(path, length, dst_start, min_seq)) return;
  const KvView& view = batch.views[blockIdx.y];
  const int64_t heads = view.sizes[1], dim = view.sizes[3], columns = view.sizes[0] * heads * dim;
  word_t* data = static_cast<word_t*>(view.data);
  const int64_t seq_stride = view.strides[2];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < columns;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = e % dim, h = (e / dim) % heads, b = e / (dim * heads);
    word_t* column = data + b * view.strides[0] + h * view.strides[1] + d * view.strides[3];
    for (int64_t j = 0; j < length; ++j) {
      const int64_t src = path[j];
      if (src != j) column[(dst_start + j) * seq_stride] = column[(dst_start + src) * seq_stride];
    }
  }
}

// Every row: paths[b, 0] == 0, strictly increasing, then -1 to the end; src_start + its last node
// below min_seq (compared as last < min_seq - src_start: the sum could overflow).
__device__ bool paths_valid(const int64_t* __restrict__ paths, int64_t rows, int64_t length, int64_t src_start,
                            int64_t min_seq) {
  bool ok = true;
  for (int64_t b = 0; b < rows && ok; ++b) {
    const int64_t* path = paths + b * length;
    int64_t last = path[0];
    ok = last == 0;
    bool padding = false;
    for (int64_t j = 1; j < length && ok; ++j) {
      if (padding) {
        ok = path[j] == -1;
      } else if (path[j] == -1) {
        padding = true;
      } else {
        ok = path[j] > last;
        last = path[j];
      }
    }
    ok = ok && last < min_seq - src_start;
  }
  return ok;
}

// blockIdx.y picks the tensor; x threads stride over its B * H * D columns, column b following
// row b's path.
template <typename word_t>
__global__ void kv_compact_batched_kernel(KvBatch batch, const int64_t* __restrict__ paths, int64_t rows,
                                          int64_t length, const int64_t* __restrict__ dst_starts, int64_t src_start,
                                          int64_t min_seq) {
  if (!paths_valid(paths, rows, length, src_start, min_seq)) return;
  const KvView& view = batch.views[blockIdx.y];
  const int64_t heads = view.sizes[1], dim = view.sizes[3], columns = view.sizes[0] * heads * dim;
  word_t* data = static_cast<word_t*>(view.data);
  const int64_t seq_stride = view.strides[2];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < columns;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = e % dim, h = (e / dim) % heads, b = e / (dim * heads);
    word_t* column = data + b * view.strides[0] + h * view.strides[1] + d * view.strides[3];
    const int64_t* path = paths + b * length;
    const int64_t dst_start = dst_starts[b];
    for (int64_t j = 0; j < length && path[j] >= 0; ++j) {
      const int64_t src = src_start + path[j], dst = dst_start + j;
      if (src != dst) column[dst * seq_stride] = column[src * seq_stride];
    }
  }
}

KvView view_of(const at::Tensor& t) {
  KvView v{t.data_ptr(), {}, {}};
  for (int k = 0; k < 4; ++k) v.sizes[k] = t.size(k), v.strides[k] = t.stride(k);
  return v;
}

}  // namespace

void kv_compact_cuda(at::TensorList kv, const at::Tensor& path, int64_t dst_start) {
  check_kv_compact_args(kv, path, dst_start);
  const c10::cuda::CUDAGuard guard(path.device());
  int64_t min_seq = kv.empty() ? 0 : kv[0].size(2), max_columns = 0;
  for (const at::Tensor& t : kv) {
    min_seq = std::min(min_seq, t.size(2));
    max_columns = std::max(max_columns, t.size(0) * t.size(1) * t.size(3));
  }
  if (max_columns == 0) {
    // Nothing to move (no tensors, or none with a column), so no kernel would see the path:
    // check it on the host as the CPU op does. The sync costs nothing here, there is no work.
    check_kv_path_cpu(kv, path.cpu(), dst_start);
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor p = path.contiguous();
  const int blocks = static_cast<int>(std::min<int64_t>((max_columns + kThreads - 1) / kThreads, 1024));
  const bool half_width = kv[0].element_size() == 2;  // float16 / bfloat16, else float32
  for (size_t first = 0; first < kv.size(); first += kMaxTensorsPerLaunch) {
    const size_t count = std::min<size_t>(kMaxTensorsPerLaunch, kv.size() - first);
    KvBatch batch{};
    for (size_t k = 0; k < count; ++k) batch.views[k] = view_of(kv[first + k]);
    const dim3 grid(blocks, static_cast<unsigned>(count));
    if (half_width) {
      kv_compact_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(batch, p.data_ptr<int64_t>(), p.numel(), dst_start,
                                                                 min_seq);
    } else {
      kv_compact_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(batch, p.data_ptr<int64_t>(), p.numel(), dst_start,
                                                                 min_seq);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void kv_compact_batched_cuda(at::TensorList kv, const at::Tensor& paths, at::IntArrayRef dst_starts,
                             int64_t src_start) {
  check_kv_compact_batched_args(kv, paths, dst_starts, src_start);
  const c10::cuda::CUDAGuard guard(paths.device());
  int64_t min_seq = kv.empty() ? 0 : kv[0].size(2), max_columns = 0;
  for (const at::Tensor& t : kv) {
    min_seq = std::min(min_seq, t.size(2));
    max_columns = std::max(max_columns, t.size(0) * t.size(1) * t.size(3));
  }
  if (max_columns == 0) {  // nothing to move: check the paths on the host (see kv_compact_cuda)
    check_kv_paths_cpu(kv, paths.cpu(), src_start);
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor p = paths.contiguous();
  // non_blocking: a pageable host source is staged before the call returns, and no stream sync
  // waits for the step's pending work
  const at::Tensor dst = at::tensor(dst_starts, p.options().device(at::kCPU)).to(p.device(), /*non_blocking=*/true);
  const int blocks = static_cast<int>(std::min<int64_t>((max_columns + kThreads - 1) / kThreads, 1024));
  const bool half_width = kv[0].element_size() == 2;  // float16 / bfloat16, else float32
  for (size_t first = 0; first < kv.size(); first += kMaxTensorsPerLaunch) {
    const size_t count = std::min<size_t>(kMaxTensorsPerLaunch, kv.size() - first);
    KvBatch batch{};
    for (size_t k = 0; k < count; ++k) batch.views[k] = view_of(kv[first + k]);
    const dim3 grid(blocks, static_cast<unsigned>(count));
    if (half_width) {
      kv_compact_batched_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(
          batch, p.data_ptr<int64_t>(), p.size(0), p.size(1), dst.data_ptr<int64_t>(), src_start, min_seq);
    } else {
      kv_compact_batched_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(
          batch, p.data_ptr<int64_t>(), p.size(0), p.size(1), dst.data_ptr<int64_t>(), src_start, min_seq);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace falcon_ext
