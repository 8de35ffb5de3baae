// tree_verify_greedy / tree_verify_sample, CUDA kernels + launchers (contract and CPU
// reference: tree_verify.cpp). No host sync: one block of kThreads threads walks the tree from
// the root; each step reduces a row of V scores in parallel, the walk itself is sequential.
//
// Malformed data cannot raise without a host sync. The kernels check every parent and token
// first (in bounds, reading only [0, N)) and on failure write the sentinel result
// (accepted = 0, next token = -1) with path all -1, and touch no row. Callers read `result`
// anyway; ops.py documents that a 0 count means malformed input. The CPU ops raise instead.
//
// Batched ops: one block per row (blockIdx.x) of contiguous [B, N, ...] inputs, the same kernels
// instantiated with kPadded (ops.h: a row's tree is its first n_b nodes, parent -1 pads). Padding
// needs no change to the walk: a padding node is nobody's child, so no child search accepts it;
// only the validation and the last uniform (uniforms[b, n_b]) depend on n_b. A malformed row gets
// the sentinel; the other rows' blocks do not look at it. The batch-1 ops launch one block with
// kPadded = false, where the row offsets are 0 and the node count is N.
//
// Float arithmetic matches the CPU reference bit for bit: float32 values, the same reduction
// order for sums (kSampleChunks chunks, ops.h), explicit _rn intrinsics so that nvcc cannot
// contract a multiply and an add into an FMA, and argmax ties resolved to the lowest index.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "ops.h"

namespace falcon_ext {
namespace {

constexpr int kThreads = static_cast<int>(kSampleChunks);  // thread t owns sum chunk t
static_assert(kThreads == 1024, "one block of 1024 threads: the chunk order of ops.h");
constexpr int64_t kNoIndex = INT64_MAX;

// Block-wide: the row's node count (N unless kPadded: nodes before the first padding node), or -1
// unless every real node's parent is valid, every real node's token in [0, vocab) and every node
// after the first padding node padding too. Padding nodes' tokens are not read. Called by all threads.
template <bool kPadded>
__device__ int64_t valid_node_count(const int64_t* __restrict__ tokens, const int64_t* __restrict__ parents, int64_t n,
                                    int64_t vocab) {
  int64_t nodes = n;
  if (kPadded) {
    __shared__ unsigned long long first_padding;
    if (threadIdx.x == 0) first_padding = n;
    __syncthreads();
    for (int64_t i = 1 + threadIdx.x; i < n; i += blockDim.x) {
      if (parents[i] == -1) atomicMin(&first_padding, static_cast<unsigned long long>(i));
    }
    __syncthreads();
    nodes = static_cast<int64_t>(first_padding);
  }
  bool ok = true;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t p = parents[i];
    if (i < nodes) {
      const int64_t t = tokens[i];
      ok = ok && (i == 0 ? p == -1 : (p >= 0 && p < i)) && t >= 0 && t < vocab;
    } else {
      ok = ok && p == -1;
    }
  }
  return __syncthreads_and(ok) ? nodes : -1;
}

__device__ void write_outputs(int64_t* __restrict__ path, int64_t* __restrict__ result, int64_t n, int64_t count,
                              int64_t next_token) {
  for (int64_t k = count + threadIdx.x; k < n; k += blockDim.x) path[k] = -1;
  if (threadIdx.x == 0) result[0] = count, result[1] = next_token;
}

// Scores seen by argmax: greedy ranks logits with NaN as -inf; sampling ranks clamped weights.
struct RankLogit {
  __device__ float operator()(float x) const { return isnan(x) ? -INFINITY : x; }
};
struct Weight {
  __device__ float operator()(float x) const { return x > 0.f ? x : 0.f; }  // negative and NaN weigh 0
};

__device__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// (value, index) pairs: b wins over a on a larger value, or an equal value at a lower index.
__device__ bool beats(float b_val, int64_t b_idx, float a_val, int64_t a_idx) {
  return b_val > a_val || (b_val == a_val && b_idx < a_idx);
}

// Lowest index of the maximum of rank(row[v]) over v < vocab; all threads call it.
template <typename Rank, typename scalar_t>
__device__ int64_t block_argmax(const scalar_t* __restrict__ row, int64_t vocab, float* vals, int64_t* idxs) {
  float best = -INFINITY;
  int64_t best_idx = kNoIndex;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float x = Rank()(static_cast<float>(row[v]));
    if (beats(x, v, best, best_idx)) best = x, best_idx = v;
  }
  vals[threadIdx.x] = best;
  idxs[threadIdx.x] = best_idx;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride && beats(vals[threadIdx.x + stride], idxs[threadIdx.x + stride], vals[threadIdx.x],
                                      idxs[threadIdx.x])) {
      vals[threadIdx.x] = vals[threadIdx.x + stride];
      idxs[threadIdx.x] = idxs[threadIdx.x + stride];
    }
    __syncthreads();
  }
  const int64_t winner = idxs[0];
  __syncthreads();  // vals / idxs are reused by the caller's next reduction
  return winner;
}

template <typename scalar_t, bool kPadded>
__global__ void __launch_bounds__(kThreads)
    verify_greedy_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ tokens,
                         const int64_t* __restrict__ parents, int64_t n, int64_t vocab, int64_t* __restrict__ path,
                         int64_t* __restrict__ result) {
  __shared__ float vals[kThreads];
  __shared__ int64_t idxs[kThreads];
  __shared__ unsigned long long next_child;
  const int64_t row = blockIdx.x;
  logits += row * n * vocab, tokens += row * n, parents += row * n, path += row * n, result += row * 2;
  if (valid_node_count<kPadded>(tokens, parents, n, vocab) < 0) return write_outputs(path, result, n, 0, -1);
  int64_t cur = 0, count = 1;
  if (threadIdx.x == 0) path[0] = 0;
  while (true) {
    const int64_t target = block_argmax<RankLogit>(logits + cur * vocab, vocab, vals, idxs);
    if (threadIdx.x == 0) next_child = n;
    __syncthreads();
    for (int64_t c = cur + 1 + threadIdx.x; c < n; c += blockDim.x) {  // children follow their parent
      if (parents[c] == cur && tokens[c] == target) atomicMin(&next_child, static_cast<unsigned long long>(c));
    }
    __syncthreads();
    const auto child = static_cast<int64_t>(next_child);
    __syncthreads();  // next_child is reset in the next step
    if (child == n) return write_outputs(path, result, n, count, target);
    if (threadIdx.x == 0) path[count] = child;
    ++count;
    cur = child;
  }
}

// ---- sampling ----

// Residual weight of token v at node `node`: zero once a child of `node` drafting v was rejected.
// rejected_at[v] holds the node where v was rejected (each node is visited once, so stale
// entries from earlier nodes never match).
template <typename scalar_t>
__device__ float residual(const scalar_t* __restrict__ row, const int64_t* rejected_at, int64_t node, int64_t v) {
  return rejected_at[v] == node ? 0.f : Weight()(static_cast<float>(row[v]));
}

// Chunk sums of the residual into sums[] (thread t: chunk t, in token order), then the total in
// chunk order, on thread 0 only. All threads call it.
template <typename scalar_t>
__device__ float residual_total(const scalar_t* __restrict__ row, const int64_t* rejected_at, int64_t node,
                                int64_t vocab, int64_t chunk, float* sums) {
  const int64_t lo = min64(vocab, threadIdx.x * chunk), hi = min64(vocab, lo + chunk);
  float acc = 0.f;
  for (int64_t v = lo; v < hi; ++v) acc = __fadd_rn(acc, residual(row, rejected_at, node, v));
  sums[threadIdx.x] = acc;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    for (int t = 0; t < kThreads; ++t) total = __fadd_rn(total, sums[t]);
  }
  return total;
}

// Thread 0: the inverse-CDF draw of tree_verify.cpp's draw_residual, -1 when the residual is zero.
template <typename scalar_t>
__device__ int64_t draw_residual(const scalar_t* __restrict__ row, const int64_t* rejected_at, int64_t node,
                                 int64_t vocab, int64_t chunk, const float* sums, float total, float u) {
  if (!(total > 0.f)) return -1;
  const float threshold = __fmul_rn(u, total);
  float prefix = 0.f;
  int64_t selected = -1;
  for (int t = 0; t < kThreads && selected < 0; ++t) {
    const float through = __fadd_rn(prefix, sums[t]);
    if (through > threshold) {
      selected = t;
    } else {
      prefix = through;
    }
  }
  const bool rounded_out = selected < 0;
  if (rounded_out) {
    for (int t = kThreads - 1; t >= 0 && selected < 0; --t) {
      if (sums[t] > 0.f) selected = t;
    }
  }
  const int64_t lo = min64(vocab, selected * chunk), hi = min64(vocab, lo + chunk);
  if (!rounded_out) {
    float running = prefix;
    for (int64_t v = lo; v < hi; ++v) {
      running = __fadd_rn(running, residual(row, rejected_at, node, v));
      if (running > threshold) return v;
    }
  }
  for (int64_t v = hi - 1; v >= lo; --v) {  // rounding left nothing selected: last positive weight
    if (residual(row, rejected_at, node, v) > 0.f) return v;
  }
  return -1;  // unreachable: the selected chunk has a positive sum
}

template <typename scalar_t, bool kPadded>
__global__ void __launch_bounds__(kThreads)
    verify_sample_kernel(const scalar_t* __restrict__ probs, const int64_t* __restrict__ tokens,
                         const int64_t* __restrict__ parents, const float* __restrict__ uniforms, int64_t n,
                         int64_t vocab, int64_t* rejected_at, int64_t* __restrict__ path,
                         int64_t* __restrict__ result) {
  __shared__ float sums[kThreads];
  __shared__ float vals[kThreads];
  __shared__ int64_t idxs[kThreads];
  __shared__ int64_t shared_index;
  const int64_t row = blockIdx.x;  // rejected_at: one [V] slice per row
  probs += row * n * vocab, tokens += row * n, parents += row * n, uniforms += row * (n + 1);
  rejected_at += row * vocab, path += row * n, result += row * 2;
  const int64_t nodes = valid_node_count<kPadded>(tokens, parents, n, vocab);
  if (nodes < 0) return write_outputs(path, result, n, 0, -1);
  const int64_t chunk = (vocab + kThreads - 1) / kThreads;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) rejected_at[v] = -1;
  __syncthreads();
  int64_t cur = 0, count = 1;
  if (threadIdx.x == 0) path[0] = 0;
  while (true) {
    const scalar_t* node_row = probs + cur * vocab;
    float sum = residual_total(node_row, rejected_at, cur, vocab, chunk, sums);
    if (threadIdx.x == 0) {
      // Children in index order; accept c iff u[c] * sum < residual[token]; a rejection removes
      // the token's mass. Sequential: each test depends on the previous rejections.
      int64_t accepted = n;
      for (int64_t c = cur + 1; c < n && accepted == n; ++c) {
        if (parents[c] != cur) continue;
        const int64_t token = tokens[c];
        const float w = residual(node_row, rejected_at, cur, token);
        if (__fmul_rn(uniforms[c], sum) < w) {
          accepted = c;
        } else {
          rejected_at[token] = cur;
          sum = __fsub_rn(sum, w);
        }
      }
      shared_index = accepted;
    }
    __syncthreads();  // also publishes rejected_at to the block
    const int64_t child = shared_index;
    __syncthreads();
    if (child == n) break;
    if (threadIdx.x == 0) path[count] = child;
    ++count;
    cur = child;
  }
  const scalar_t* last_row = probs + cur * vocab;
  const float total = residual_total(last_row, rejected_at, cur, vocab, chunk, sums);
  if (threadIdx.x == 0) {
    shared_index = draw_residual(last_row, rejected_at, cur, vocab, chunk, sums, total, uniforms[nodes]);
  }
  __syncthreads();
  int64_t next_token = shared_index;
  if (next_token < 0) next_token = block_argmax<Weight>(last_row, vocab, vals, idxs);  // residual all zero
  write_outputs(path, result, n, count, next_token);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tree_verify_greedy_cuda(const at::Tensor& logits, const at::Tensor& tokens,
                                                           const at::Tensor& parents) {
  check_verify_args(logits, "logits", tokens, parents);  // before the guard: all on one CUDA device
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor scores = logits.contiguous(), tok = tokens.contiguous(), par = parents.contiguous();
  at::Tensor path = at::empty({tok.numel()}, tok.options()), result = at::empty({2}, tok.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "tree_verify_greedy_cuda", [&] {
    verify_greedy_kernel<scalar_t, false><<<1, kThreads, 0, stream>>>(
        scores.data_ptr<scalar_t>(), tok.data_ptr<int64_t>(), par.data_ptr<int64_t>(), scores.size(0),
        scores.size(1), path.data_ptr<int64_t>(), result.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {path, result};
}

std::tuple<at::Tensor, at::Tensor> tree_verify_sample_cuda(const at::Tensor& probs, const at::Tensor& tokens,
                                                           const at::Tensor& parents, const at::Tensor& uniforms) {
  check_verify_args(probs, "probs", tokens, parents);
  check_sample_uniforms(uniforms, probs);
  const c10::cuda::CUDAGuard guard(probs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor scores = probs.contiguous(), tok = tokens.contiguous(), par = parents.contiguous();
  const at::Tensor u = uniforms.contiguous();
  at::Tensor path = at::empty({tok.numel()}, tok.options()), result = at::empty({2}, tok.options());
  const at::Tensor rejected_at = at::empty({scores.size(1)}, tok.options());  // the kernel initialises it
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "tree_verify_sample_cuda", [&] {
    verify_sample_kernel<scalar_t, false><<<1, kThreads, 0, stream>>>(
        scores.data_ptr<scalar_t>(), tok.data_ptr<int64_t>(), par.data_ptr<int64_t>(), u.data_ptr<float>(),
        scores.size(0), scores.size(1), rejected_at.data_ptr<int64_t>(), path.data_ptr<int64_t>(),
        result.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {path, result};
}

std::tuple<at::Tensor, at::Tensor> tree_verify_greedy_batched_cuda(const at::Tensor& logits, const at::Tensor& tokens,
                                                                   const at::Tensor& parents) {
  check_batched_verify_args(logits, "logits", tokens, parents);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor scores = logits.contiguous(), tok = tokens.contiguous(), par = parents.contiguous();
  const int64_t batch = scores.size(0), n = scores.size(1);
  at::Tensor path = at::empty({batch, n}, tok.options()), result = at::empty({batch, 2}, tok.options());
  const auto blocks = static_cast<unsigned>(batch);  // one row per block
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "tree_verify_greedy_batched_cuda", [&] {
    verify_greedy_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
        scores.data_ptr<scalar_t>(), tok.data_ptr<int64_t>(), par.data_ptr<int64_t>(), n, scores.size(2),
        path.data_ptr<int64_t>(), result.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {path, result};
}

std::tuple<at::Tensor, at::Tensor> tree_verify_sample_batched_cuda(const at::Tensor& probs, const at::Tensor& tokens,
                                                                   const at::Tensor& parents,
                                                                   const at::Tensor& uniforms) {
  check_batched_verify_args(probs, "probs", tokens, parents);
  check_batched_sample_uniforms(uniforms, probs);
  const c10::cuda::CUDAGuard guard(probs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor scores = probs.contiguous(), tok = tokens.contiguous(), par = parents.contiguous();
  const at::Tensor u = uniforms.contiguous();
  const int64_t batch = scores.size(0), n = scores.size(1), vocab = scores.size(2);
  at::Tensor path = at::empty({batch, n}, tok.options()), result = at::empty({batch, 2}, tok.options());
  const at::Tensor rejected_at = at::empty({batch, vocab}, tok.options());  // the kernel initialises it
  const auto blocks = static_cast<unsigned>(batch);  // one row per block
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "tree_verify_sample_batched_cuda", [&] {
    verify_sample_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
        scores.data_ptr<scalar_t>(), tok.data_ptr<int64_t>(), par.data_ptr<int64_t>(), u.data_ptr<float>(), n, vocab,
        rejected_at.data_ptr<int64_t>(), path.data_ptr<int64_t>(), result.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {path, result};
}

}  // namespace falcon_ext
