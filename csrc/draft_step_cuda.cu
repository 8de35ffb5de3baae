// falcon_draft_step, CUDA kernels + launcher (contract and CPU reference: draft_step.cpp).
// At decode time a step is a handful of rows (B branches x k positions) against every drafter
// weight once, so it is bound by reading weights: every matmul is a "skinny" one where a warp
// owns one output column, streams that weight row once (coalesced) and applies it to all rows.
// Launches, in order, all on the current stream (2k + 9 kernels, plus dtype casts of the
// inputs/outputs):
//   linear  x @ w_ih0^T + b0                        (layer-0 input projection, whole block)
//   lstm_step x k                                   (w_hh0 GEMV fused with the LSTM cell)
//   linear  h0_seq @ w_ih1^T + b1, lstm_step x k    (layer 1)
//   rms     -> linear with the norm folded in      (q, k, v)
//   attention (one block per (head, branch), online softmax over ctx + branch + block keys)
//   linear  attn @ w_o^T + residual
//   rms     -> linear with norm + SiLU epilogue     (MLP up)
//   linear  @ w_down^T + residual                   (predicted features)
// Activations and the LSTM state are fp32; weights are read in their own dtype. encode_only
// stops after the LSTM and a key/value-only projection (settling context positions).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cmath>
#include <vector>

#include "ops.h"

namespace falcon_ext {
namespace {

constexpr int kWarps = 8;         // warps per block in the column-per-warp kernels
constexpr int kRows = 4;          // rows accumulated together (registers per lane)
constexpr int kChunk = 128;       // keys per attention chunk = attention block size
constexpr int kAttnThreads = kChunk;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float sigmoidf(float v) { return 1.f / (1.f + __expf(-v)); }

// y[r, n] = act(row_scale[r] * sum_j w[n, j] * col_scale[j] * x[r, j] + bias[n]) + resid[r, n]
// x [R, K] (x_t), w [N, K], bias [N], col_scale [K] (w_t), row_scale [R], resid/y [R, N] fp32.
// Optional pointers may be null. One warp per column n; rows in groups of kRows.
template <typename x_t, typename w_t>
__global__ void linear_kernel(const x_t* __restrict__ x, const w_t* __restrict__ w, const w_t* __restrict__ bias,
                              const float* __restrict__ row_scale, const w_t* __restrict__ col_scale,
                              const float* __restrict__ resid, float* __restrict__ y, int64_t R, int64_t N,
                              int64_t K, bool silu) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;  // whole warps exit together; no block-level sync follows
  const w_t* wn = w + n * K;
  for (int64_t r0 = 0; r0 < R; r0 += kRows) {
    float acc[kRows] = {};
    for (int64_t j = lane; j < K; j += 32) {
      float wv = float(wn[j]);
      if (col_scale) wv *= float(col_scale[j]);
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) {
        if (r0 + rr < R) acc[rr] += wv * float(x[(r0 + rr) * K + j]);
      }
    }
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) acc[rr] = warp_sum(acc[rr]);
    if (lane == 0) {
      for (int rr = 0; rr < kRows && r0 + rr < R; ++rr) {
        const int64_t r = r0 + rr;
        float v = acc[rr] * (row_scale ? row_scale[r] : 1.f) + (bias ? float(bias[n]) : 0.f);
        if (silu) v = v * sigmoidf(v);
        if (resid) v += resid[r * N + n];
        y[r * N + n] = v;
      }
    }
  }
}

// One LSTM time step t for all B rows, fused with the recurrent GEMV. Warp per hidden unit u:
// gates g = gx[b, t, {u, H+u, 2H+u, 3H+u}] + w_hh[those rows] . h_prev[b]; then the cell.
// gx [B, k, 4H] (input projection + bias), h_prev rows at h_prev + b * h_stride,
// c [B, H] updated in place (each (b, u) by exactly one lane), seq [B, k, H] gets h at t.
template <typename w_t>
__global__ void lstm_step_kernel(const float* __restrict__ gx, const w_t* __restrict__ w_hh,
                                 const float* h_prev, int64_t h_stride, float* __restrict__ c, float* seq,
                                 int64_t B, int64_t k, int64_t H, int64_t t) {
  const int lane = threadIdx.x & 31;
  const int64_t u = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (u >= H) return;
  for (int64_t b0 = 0; b0 < B; b0 += kRows) {
    float acc[4][kRows] = {};
    for (int64_t j = lane; j < H; j += 32) {
      float wv[4];
#pragma unroll
      for (int g = 0; g < 4; ++g) wv[g] = float(w_hh[(g * H + u) * H + j]);
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) {
        if (b0 + rr < B) {
          const float hv = h_prev[(b0 + rr) * h_stride + j];
#pragma unroll
          for (int g = 0; g < 4; ++g) acc[g][rr] += wv[g] * hv;
        }
      }
    }
#pragma unroll
    for (int g = 0; g < 4; ++g) {
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) acc[g][rr] = warp_sum(acc[g][rr]);
    }
    if (lane == 0) {
      for (int rr = 0; rr < kRows && b0 + rr < B; ++rr) {
        const int64_t b = b0 + rr;
        const float* g = gx + (b * k + t) * 4 * H;
        const float c_new = sigmoidf(acc[1][rr] + g[H + u]) * c[b * H + u] +
                            sigmoidf(acc[0][rr] + g[u]) * tanhf(acc[2][rr] + g[2 * H + u]);
        c[b * H + u] = c_new;
        seq[(b * k + t) * H + u] = sigmoidf(acc[3][rr] + g[3 * H + u]) * tanhf(c_new);
      }
    }
  }
}

// scale[r] = 1 / sqrt(mean(x[r]^2) + eps) for x [R, H] fp32; one block of 256 threads per row.
__global__ void rms_kernel(const float* __restrict__ x, float* __restrict__ scale, int64_t H, float eps) {
  __shared__ float partial[256];
  const float* row = x + int64_t(blockIdx.x) * H;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) s += row[j] * row[j];
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) scale[blockIdx.x] = rsqrtf(partial[0] / float(H) + eps);
}

struct AttnArgs {
  const float* qkv;  // [B * k, 3H] fp32, q in columns [0, H)
  const void *ctx_k, *ctx_v, *br_k, *br_v, *blk_k, *blk_v;
  float* out;  // [B * k, H]
  int64_t S, D, k, H, head_dim;
  float scale;
};

// Row j of the keys (or values) a branch b attends to: context, then its drafted history, then its block.
template <typename w_t>
__device__ __forceinline__ const w_t* kv_row(const void* ctx, const void* br, const void* blk, int64_t j, int64_t b,
                                             const AttnArgs& a) {
  if (j < a.S) return static_cast<const w_t*>(ctx) + j * a.H;
  if (j < a.S + a.D) return static_cast<const w_t*>(br) + (b * a.D + j - a.S) * a.H;
  return static_cast<const w_t*>(blk) + (b * a.k + j - a.S - a.D) * a.H;
}

// grid (heads, B), kAttnThreads threads. Shared: q [k, hd], acc [k, hd], p [k, kChunk], m/l/alpha [k].
// Online softmax over chunks of kChunk keys: thread t scores key (chunk start + t) for every
// query; warps then rescale per query; threads own (query, dim) accumulator entries.
template <typename w_t>
__global__ void attention_kernel(AttnArgs a) {
  extern __shared__ float smem[];
  const int64_t k = a.k, hd = a.head_dim, col = int64_t(blockIdx.x) * hd, b = blockIdx.y;
  float* q = smem;
  float* acc = q + k * hd;
  float* p = acc + k * hd;
  float* m = p + k * kChunk;
  float* l = m + k;
  float* alpha = l + k;
  for (int64_t i = threadIdx.x; i < k * hd; i += blockDim.x) {
    q[i] = a.qkv[(b * k + i / hd) * 3 * a.H + col + i % hd] * a.scale;
    acc[i] = 0.f;
  }
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  __syncthreads();
  const int64_t n_keys = a.S + a.D + k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t start = 0; start < n_keys; start += kChunk) {
    const int64_t j = start + threadIdx.x;
    if (j < n_keys) {
      const w_t* key = kv_row<w_t>(a.ctx_k, a.br_k, a.blk_k, j, b, a) + col;
      for (int64_t qi = 0; qi < k; ++qi) {
        float s = 0.f;
        for (int64_t e = 0; e < hd; ++e) s += q[qi * hd + e] * float(key[e]);
        p[qi * kChunk + threadIdx.x] = s;
      }
    } else {
      for (int64_t qi = 0; qi < k; ++qi) p[qi * kChunk + threadIdx.x] = -INFINITY;
    }
    __syncthreads();
    for (int64_t qi = warp; qi < k; qi += kAttnThreads / 32) {
      float* pq = p + qi * kChunk;
      float mx = -INFINITY;
      for (int i = lane; i < kChunk; i += 32) mx = fmaxf(mx, pq[i]);
      const float m_new = fmaxf(m[qi], warp_max(mx));  // finite: key `start` is always valid
      float sum = 0.f;
      for (int i = lane; i < kChunk; i += 32) sum += (pq[i] = __expf(pq[i] - m_new));
      sum = warp_sum(sum);
      if (lane == 0) {
        alpha[qi] = __expf(m[qi] - m_new);
        l[qi] = l[qi] * alpha[qi] + sum;
        m[qi] = m_new;
      }
    }
    __syncthreads();
    const int64_t valid = n_keys - start < kChunk ? n_keys - start : kChunk;
    for (int64_t i = threadIdx.x; i < k * hd; i += blockDim.x) {
      const int64_t qi = i / hd, e = i % hd;
      float v = acc[i] * alpha[qi];
      for (int64_t jj = 0; jj < valid; ++jj) {
        v += p[qi * kChunk + jj] * float(kv_row<w_t>(a.ctx_v, a.br_v, a.blk_v, start + jj, b, a)[col + e]);
      }
      acc[i] = v;
    }
    __syncthreads();
  }
  for (int64_t i = threadIdx.x; i < k * hd; i += blockDim.x) {
    a.out[(b * k + i / hd) * a.H + col + i % hd] = acc[i] / l[i / hd];
  }
}

template <typename x_t, typename w_t>
void launch_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, const at::Tensor* row_scale,
                   const at::Tensor* col_scale, const at::Tensor* resid, at::Tensor& y, bool silu,
                   cudaStream_t stream) {
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  const dim3 grid((N + kWarps - 1) / kWarps);
  linear_kernel<x_t, w_t><<<grid, kWarps * 32, 0, stream>>>(
      x.data_ptr<x_t>(), w.data_ptr<w_t>(), bias ? bias->data_ptr<w_t>() : nullptr,
      row_scale ? row_scale->data_ptr<float>() : nullptr, col_scale ? col_scale->data_ptr<w_t>() : nullptr,
      resid ? resid->data_ptr<float>() : nullptr, y.data_ptr<float>(), R, N, K, silu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// LSTM layer over the block: gx [B*k, 4H] fp32, h_init/c [B, H] fp32 (c updated) -> seq [B*k, H] fp32.
template <typename w_t>
void launch_lstm(const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& h_init, at::Tensor& c,
                 at::Tensor& seq, int64_t B, int64_t k, int64_t H, cudaStream_t stream) {
  const dim3 grid((H + kWarps - 1) / kWarps);
  for (int64_t t = 0; t < k; ++t) {
    // h_{t-1}: the initial state, or row (b, t-1) of the layer's output sequence.
    const float* h_prev = t == 0 ? h_init.data_ptr<float>() : seq.data_ptr<float>() + (t - 1) * H;
    const int64_t stride = t == 0 ? H : k * H;
    lstm_step_kernel<w_t><<<grid, kWarps * 32, 0, stream>>>(gx.data_ptr<float>(), w_hh.data_ptr<w_t>(), h_prev,
                                                            stride, c.data_ptr<float>(), seq.data_ptr<float>(), B,
                                                            k, H, t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void launch_rms(const at::Tensor& x, at::Tensor& scale, double eps, cudaStream_t stream) {
  rms_kernel<<<x.size(0), 256, 0, stream>>>(x.data_ptr<float>(), scale.data_ptr<float>(), x.size(1), float(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> falcon_draft_step_cuda(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& ctx_k,
    const at::Tensor& ctx_v, const at::Tensor& br_k, const at::Tensor& br_v, at::TensorList weights,
    int64_t num_heads, double eps, bool encode_only, const c10::optional<at::TensorList>& scales) {
  // int8 weights pay off where drafting streams weights from DRAM (a CPU); on a GPU the drafter's
  // float weights are read at HBM speed, so there is no kernel for them.
  TORCH_CHECK(!scales, "falcon_draft_step: int8 weights (scales) are a CPU format; on CUDA pass the drafter's "
              "float weights and no scales");
  const DraftStepDims d = check_draft_step(x, h0, c0, ctx_k, ctx_v, br_k, br_v, weights, num_heads, eps, scales);
  const int64_t B = d.B, k = d.k, H = d.H, R = B * k;
  const c10::cuda::CUDAGuard guard(x.device());
  // Shared memory of the attention kernel, which grows with k. Only attention needs it:
  // encode_only settles a whole prompt in one call (k = its length, thousands of positions).
  const int64_t smem = (2 * k * d.head_dim + k * kChunk + 3 * k) * int64_t(sizeof(float));
  if (!encode_only) {
    int device_smem = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
    TORCH_CHECK(smem <= device_smem, "falcon_draft_step: head_dim ", d.head_dim, " with k ", k, " needs ", smem,
                " bytes of shared memory, the device allows ", device_smem, "; use more heads or a smaller k");
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = x.scalar_type();
  const auto f32 = x.options().dtype(at::kFloat);
  std::vector<at::Tensor> w;
  for (const auto& t : weights) w.push_back(t.contiguous());
  const at::Tensor xin = x.contiguous();
  const at::Tensor ck = ctx_k.contiguous(), cv = ctx_v.contiguous(), bk = br_k.contiguous(), bv = br_v.contiguous();
  // Private fp32 copies of the state: the kernels update the cell state in place.
  const at::Tensor h_init = h0.to(at::kFloat, false, /*copy=*/true).contiguous();
  at::Tensor c = c0.to(at::kFloat, false, /*copy=*/true).contiguous();
  at::Tensor c_0 = c[0], c_1 = c[1];
  at::Tensor gx = at::empty({R, 4 * H}, f32), seq0 = at::empty({R, H}, f32), seq1 = at::empty({R, H}, f32);
  at::Tensor scale = at::empty({R}, f32), qkv = at::empty({R, 3 * H}, f32), attn = at::empty({R, H}, f32);
  at::Tensor resid = at::empty({R, H}, f32), up = at::empty({R, d.M}, f32), out = at::empty({R, H}, f32);
  at::Tensor blk_k, blk_v;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "falcon_draft_step_cuda", [&] {
    using w_t = scalar_t;
    const at::Tensor x2 = xin.view({R, 2 * H});
    launch_linear<w_t, w_t>(x2, w[kWIh0], &w[kB0], nullptr, nullptr, nullptr, gx, false, stream);
    launch_lstm<w_t>(gx, w[kWHh0], h_init[0], c_0, seq0, B, k, H, stream);
    launch_linear<float, w_t>(seq0, w[kWIh1], &w[kB1], nullptr, nullptr, nullptr, gx, false, stream);
    launch_lstm<w_t>(gx, w[kWHh1], h_init[1], c_1, seq1, B, k, H, stream);

    launch_rms(seq1, scale, eps, stream);
    if (encode_only) {  // settling context: keys/values only, from rows [H, 3H) of w_qkv
      at::Tensor kv = at::empty({R, 2 * H}, f32);
      launch_linear<float, w_t>(seq1, w[kWQkv].narrow(0, H, 2 * H), nullptr, &scale, &w[kAttnNorm], nullptr, kv, false, stream);
      blk_k = kv.narrow(1, 0, H).to(dtype, false, /*copy=*/true).contiguous();
      blk_v = kv.narrow(1, H, H).to(dtype, false, /*copy=*/true).contiguous();
      return;
    }
    launch_linear<float, w_t>(seq1, w[kWQkv], nullptr, &scale, &w[kAttnNorm], nullptr, qkv, false, stream);
    // The block's keys/values are returned in the cache dtype and attended to as stored.
    blk_k = qkv.narrow(1, H, H).to(dtype, false, /*copy=*/true).contiguous();  // never aliases qkv or blk_v
    blk_v = qkv.narrow(1, 2 * H, H).to(dtype, false, /*copy=*/true).contiguous();
    AttnArgs a{qkv.data_ptr<float>(), ck.data_ptr(), cv.data_ptr(), bk.data_ptr(), bv.data_ptr(), blk_k.data_ptr(),
               blk_v.data_ptr(), attn.data_ptr<float>(), d.S, d.D, k, H, d.head_dim,
               1.f / std::sqrt(float(d.head_dim))};
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(attention_kernel<w_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          int(smem)));
    }
    attention_kernel<w_t><<<dim3(d.heads, B), kAttnThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    launch_linear<float, w_t>(attn, w[kWO], nullptr, nullptr, nullptr, &seq1, resid, false, stream);
    launch_rms(resid, scale, eps, stream);
    launch_linear<float, w_t>(resid, w[kWUp], nullptr, &scale, &w[kMlpNorm], nullptr, up, true, stream);
    launch_linear<float, w_t>(up, w[kWDown], nullptr, nullptr, nullptr, &resid, out, false, stream);
  });
  // Final hidden states: each layer's output at the block's last position.
  const at::Tensor h_last = at::stack({seq0.view({B, k, H}).select(1, k - 1), seq1.view({B, k, H}).select(1, k - 1)});
  const at::Tensor features = encode_only ? at::empty({B, k, 0}, x.options()) : out.view({B, k, H}).to(dtype);
  return {features, h_last.to(dtype), c.to(dtype), blk_k.view({B, k, H}), blk_v.view({B, k, H})};
}

}  // namespace falcon_ext
