// falcon_draft_step, CPU reference: one Falcon drafter forward over a block of k drafted
// positions for B branches (the tree's branches as a small batch).
//
//   x [B, k, 2H]        pairs (feature, embedding of the token one step ahead)
//   h0, c0 [2, B, H]    LSTM state before the block (per layer)
//   ctx_k, ctx_v [S, H] attention cache of the settled context (shared by all branches)
//   br_k, br_v [B, D, H] the branch's earlier drafted blocks
//   weights             one per DraftWeight slot (csrc/ops.h), in slot order
// -> out [B, k, H] predicted features, h, c [2, B, H], block_k, block_v [B, k, H].
// encode_only: stop after the LSTM and the block's keys/values (settling accepted context
// positions, whose outputs nobody reads); out is then [B, k, 0].
//
// Stages: LSTM layer 0 and 1 (input projections batched over the block, recurrence sequential),
// RMSNorm + QKV, attention of the k queries against ctx + branch + block (the relaxed mask
// hides nothing at decode time: every query sees its whole block and everything before it),
// output projection + residual, RMSNorm + SiLU MLP + residual. Matmuls run in the weights'
// dtype through ATen (BLAS); the LSTM cell, norms, softmax and residual stream are fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "ops.h"

namespace falcon_ext {

DraftStepDims check_draft_step(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const at::Tensor& ctx_k, const at::Tensor& ctx_v, const at::Tensor& br_k,
                               const at::Tensor& br_v, at::TensorList weights, int64_t num_heads, double eps) {
  FALCON_CHECK_DIM(x, 3);
  FALCON_CHECK_FLOAT(x);
  TORCH_CHECK(weights.size() == kNumDraftWeights, "falcon_draft_step needs ", size_t(kNumDraftWeights),
              " weight tensors, got ", weights.size());
  DraftStepDims d;
  d.B = x.size(0);
  d.k = x.size(1);
  d.H = x.size(2) / 2;
  TORCH_CHECK(d.B >= 1 && d.k >= 1 && d.H >= 1 && x.size(2) == 2 * d.H,
              "x must be [B >= 1, k >= 1, 2H] with H >= 1, got shape ", x.sizes());
  const int64_t B = d.B, H = d.H;
  TORCH_CHECK(num_heads >= 1 && H % num_heads == 0, "num_heads (", num_heads, ") must divide H (", H, ")");
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  d.heads = num_heads;
  d.head_dim = H / num_heads;
  d.M = weights[kWUp].dim() == 2 ? weights[kWUp].size(0) : -1;
  TORCH_CHECK(d.M >= 1, "w_up must be [M >= 1, H], got shape ", weights[kWUp].sizes());
  FALCON_CHECK_DIM(ctx_k, 2);
  FALCON_CHECK_DIM(br_k, 3);
  d.S = ctx_k.size(0);
  d.D = br_k.size(1);
  const std::vector<std::pair<const at::Tensor*, std::vector<int64_t>>> expected = {
      {&h0, {2, B, H}}, {&c0, {2, B, H}}, {&ctx_k, {d.S, H}}, {&ctx_v, {d.S, H}},
      {&br_k, {B, d.D, H}}, {&br_v, {B, d.D, H}}};
  const char* names[] = {"h0", "c0", "ctx_k", "ctx_v", "br_k", "br_v"};
  for (size_t i = 0; i < expected.size(); ++i) {
    const at::Tensor& t = *expected[i].first;
    TORCH_CHECK(t.sizes() == at::IntArrayRef(expected[i].second), names[i], " must have shape ",
                at::IntArrayRef(expected[i].second), ", got ", t.sizes());
  }
  struct WeightShape {
    DraftWeight slot;
    const char* name;
    std::vector<int64_t> shape;
  };
  const std::vector<WeightShape> wshapes = {
      {kWIh0, "w_ih0", {4 * H, 2 * H}}, {kWHh0, "w_hh0", {4 * H, H}}, {kB0, "b0", {4 * H}},
      {kWIh1, "w_ih1", {4 * H, H}},     {kWHh1, "w_hh1", {4 * H, H}}, {kB1, "b1", {4 * H}},
      {kAttnNorm, "attn_norm", {H}},    {kWQkv, "w_qkv", {3 * H, H}}, {kWO, "w_o", {H, H}},
      {kMlpNorm, "mlp_norm", {H}},      {kWUp, "w_up", {d.M, H}},     {kWDown, "w_down", {H, d.M}}};
  for (const auto& e : wshapes) {
    TORCH_CHECK(weights[e.slot].sizes() == at::IntArrayRef(e.shape), e.name, " must have shape ",
                at::IntArrayRef(e.shape), ", got ", weights[e.slot].sizes());
  }
  std::vector<at::Tensor> all = {h0, c0, ctx_k, ctx_v, br_k, br_v};
  all.insert(all.end(), weights.begin(), weights.end());
  for (const auto& t : all) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "every falcon_draft_step tensor must have x's dtype ",
                x.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "every falcon_draft_step tensor must be on ", x.device(), ", got ",
                t.device());
  }
  return d;
}

namespace {

// y [R, N] fp32 = x [R, K] fp32 @ w[N, K]^T (+ bias), the matmul in the weight's dtype.
at::Tensor dense(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias = c10::nullopt) {
  at::Tensor xw = x.to(w.scalar_type());
  at::Tensor y = bias ? at::addmm(*bias, xw, w.t()) : at::mm(xw, w.t());
  return y.to(at::kFloat);
}

// A fresh contiguous tensor of dtype: outputs never alias each other or an input.
at::Tensor own_copy(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype, false, /*copy=*/true).contiguous();
}

inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

// In place over B rows: gates [B, 4H] (i, f, g, o) -> c = f*c + i*g, h = o*tanh(c).
void lstm_cell(const at::Tensor& gates, at::Tensor& h, at::Tensor& c, int64_t B, int64_t H) {
  const float* g = gates.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  float* cp = c.data_ptr<float>();
  at::parallel_for(0, B * H, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t e = lo; e < hi; ++e) {
      const float* row = g + (e / H) * 4 * H;
      const int64_t u = e % H;
      const float c_new = sigmoid(row[H + u]) * cp[e] + sigmoid(row[u]) * std::tanh(row[2 * H + u]);
      cp[e] = c_new;
      hp[e] = sigmoid(row[3 * H + u]) * std::tanh(c_new);
    }
  });
}

// One LSTM layer over the block: x [B, k, In] fp32, state h, c [B, H] fp32 (updated) -> [B, k, H] fp32.
at::Tensor lstm_layer(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b,
                      at::Tensor& h, at::Tensor& c) {
  const int64_t B = x.size(0), k = x.size(1), H = h.size(1);
  at::Tensor gx = dense(x.reshape({B * k, x.size(2)}), w_ih, b).view({B, k, 4 * H});
  at::Tensor out = at::empty({B, k, H}, x.options());
  for (int64_t t = 0; t < k; ++t) {
    at::Tensor gates = gx.select(1, t) + dense(h, w_hh);
    lstm_cell(gates, h, c, B, H);
    out.select(1, t).copy_(h);
  }
  return out;
}

// RMSNorm of rows x [R, H] fp32 with weight w -> [R, H] fp32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t R = x.size(0), H = x.size(1);
  at::Tensor wf = w.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = wf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < H; ++j) ss += double(xp[r * H + j]) * xp[r * H + j];
    const float inv = 1.f / std::sqrt(float(ss / H) + float(eps));
    for (int64_t j = 0; j < H; ++j) yp[r * H + j] = xp[r * H + j] * inv * wp[j];
  }
  return y;
}

// out [B, k, H] fp32: each (branch, head) query attends, unmasked, to ctx (S) + branch (D) + block (k) keys.
template <typename scalar_t>
void attention(const at::Tensor& q, const at::Tensor& ctx_k, const at::Tensor& ctx_v, const at::Tensor& br_k,
               const at::Tensor& br_v, const at::Tensor& blk_k, const at::Tensor& blk_v, at::Tensor& out,
               const DraftStepDims& d) {
  const int64_t S = d.S, D = d.D, k = d.k, H = d.H, hd = d.head_dim, n_keys = S + D + k;
  const float scale = 1.f / std::sqrt(float(hd));
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const scalar_t *ck = ctx_k.data_ptr<scalar_t>(), *cv = ctx_v.data_ptr<scalar_t>();
  const scalar_t *bk = br_k.data_ptr<scalar_t>(), *bv = br_v.data_ptr<scalar_t>();
  const scalar_t *xk = blk_k.data_ptr<scalar_t>(), *xv = blk_v.data_ptr<scalar_t>();
  at::parallel_for(0, d.B * d.heads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> p(n_keys);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / d.heads, col = (task % d.heads) * hd;
      // Row j of the concatenated keys (or values): context, then branch history, then block.
      auto row = [&](const scalar_t* c, const scalar_t* br, const scalar_t* blk, int64_t j) {
        if (j < S) return c + j * H + col;
        if (j < S + D) return br + (b * D + j - S) * H + col;
        return blk + (b * k + j - S - D) * H + col;
      };
      for (int64_t i = 0; i < k; ++i) {
        const float* qi = qp + (b * k + i) * H + col;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n_keys; ++j) {
          const scalar_t* kj = row(ck, bk, xk, j);
          float s = 0;
          for (int64_t e = 0; e < hd; ++e) s += qi[e] * float(kj[e]);
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        float sum = 0;
        for (int64_t j = 0; j < n_keys; ++j) sum += (p[j] = std::exp(p[j] - mx));
        float* oi = op + (b * k + i) * H + col;
        for (int64_t e = 0; e < hd; ++e) oi[e] = 0;
        for (int64_t j = 0; j < n_keys; ++j) {
          const scalar_t* vj = row(cv, bv, xv, j);
          const float w = p[j] / sum;
          for (int64_t e = 0; e < hd; ++e) oi[e] += w * float(vj[e]);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> falcon_draft_step_cpu(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& ctx_k,
    const at::Tensor& ctx_v, const at::Tensor& br_k, const at::Tensor& br_v, at::TensorList weights,
    int64_t num_heads, double eps, bool encode_only) {
  const DraftStepDims d = check_draft_step(x, h0, c0, ctx_k, ctx_v, br_k, br_v, weights, num_heads, eps);
  const int64_t B = d.B, k = d.k, H = d.H;
  const auto dtype = x.scalar_type();
  std::vector<at::Tensor> w;
  for (const auto& t : weights) w.push_back(t.contiguous());
  // Private fp32 copies: the recurrence updates the state in place, the inputs stay untouched.
  at::Tensor h = h0.to(at::kFloat, false, /*copy=*/true).contiguous();
  at::Tensor c = c0.to(at::kFloat, false, /*copy=*/true).contiguous();
  at::Tensor h_0 = h[0], c_0 = c[0], h_1 = h[1], c_1 = c[1];

  at::Tensor out0 = lstm_layer(x.to(at::kFloat), w[kWIh0], w[kWHh0], w[kB0], h_0, c_0);
  at::Tensor lstm_out = lstm_layer(out0, w[kWIh1], w[kWHh1], w[kB1], h_1, c_1).reshape({B * k, H});

  at::Tensor h_out = at::stack({h_0, h_1}).to(dtype), c_out = at::stack({c_0, c_1}).to(dtype);
  at::Tensor normed = rms_norm(lstm_out, w[kAttnNorm], eps);
  if (encode_only) {  // settling context: keys/values only, from rows [H, 3H) of w_qkv
    at::Tensor kv = dense(normed, w[kWQkv].narrow(0, H, 2 * H));
    return {at::empty({B, k, 0}, x.options()), h_out, c_out, own_copy(kv.narrow(1, 0, H), dtype).view({B, k, H}),
            own_copy(kv.narrow(1, H, H), dtype).view({B, k, H})};
  }
  at::Tensor qkv = dense(normed, w[kWQkv]);  // [B*k, 3H]
  at::Tensor q = qkv.narrow(1, 0, H).contiguous();
  // The block's keys/values are returned in the cache dtype, and attended to as stored.
  at::Tensor blk_k = own_copy(qkv.narrow(1, H, H), dtype);
  at::Tensor blk_v = own_copy(qkv.narrow(1, 2 * H, H), dtype);
  at::Tensor attn = at::empty({B * k, H}, lstm_out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "falcon_draft_step_cpu", [&] {
    attention<scalar_t>(q, ctx_k.contiguous(), ctx_v.contiguous(), br_k.contiguous(), br_v.contiguous(), blk_k,
                        blk_v, attn, d);
  });

  at::Tensor resid = lstm_out + dense(attn, w[kWO]);
  at::Tensor up = dense(rms_norm(resid, w[kMlpNorm], eps), w[kWUp]);
  at::Tensor out = resid + dense(up * at::sigmoid(up), w[kWDown]);
  return {out.view({B, k, H}).to(dtype), h_out, c_out, blk_k.view({B, k, H}), blk_v.view({B, k, H})};
}

}  // namespace falcon_ext
