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
// output projection + residual, RMSNorm + SiLU MLP + residual. Weight matmuls run in the
// weights' dtype through ATen (BLAS); the LSTM cell, norms, attention (fp32 matmuls), softmax
// and residual stream are fp32.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <vector>

#include "ops.h"

namespace falcon_ext {

DraftStepDims check_draft_step(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const at::Tensor& ctx_k, const at::Tensor& ctx_v, const at::Tensor& br_k,
                               const at::Tensor& br_v, at::TensorList weights, int64_t num_heads, double eps,
                               const c10::optional<at::TensorList>& scales) {
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
  std::vector<bool> int8(kNumDraftWeights, false);
  if (scales) {
    TORCH_CHECK(scales->size() == kDraftMatrices.size(), "falcon_draft_step needs one scale per weight matrix (",
                kDraftMatrices.size(), ", in slot order) with int8 weights, got ", scales->size());
    for (size_t i = 0; i < kDraftMatrices.size(); ++i) {
      const at::Tensor& w = weights[kDraftMatrices[i]];
      const at::Tensor& s = (*scales)[i];
      TORCH_CHECK(w.scalar_type() == at::kChar, "with scales, weight matrix ", size_t(kDraftMatrices[i]),
                  " must be int8, got ", w.scalar_type());
      TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == w.size(0), "scales[", i,
                  "] must be float32 [", w.size(0), "], got ", s.scalar_type(), " ", s.sizes());
      TORCH_CHECK(s.device() == x.device(), "scales[", i, "] must be on ", x.device(), ", got ", s.device());
      int8[kDraftMatrices[i]] = true;
    }
  }
  for (size_t i = 0; i < kNumDraftWeights; ++i) {
    if (!int8[i]) all.push_back(weights[i]);
    TORCH_CHECK(weights[i].device() == x.device(), "every falcon_draft_step tensor must be on ", x.device(),
                ", got ", weights[i].device());
  }
  for (const auto& t : all) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "every falcon_draft_step tensor must have x's dtype ",
                x.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "every falcon_draft_step tensor must be on ", x.device(), ", got ",
                t.device());
  }
  return d;
}

namespace {

// A weight matrix [N, K]: in x's dtype, or int8 with one fp32 scale per row (scale defined).
struct Matrix {
  at::Tensor w, scale;
  Matrix rows(int64_t start, int64_t n) const {
    return {w.narrow(0, start, n), scale.defined() ? scale.narrow(0, start, n) : scale};
  }
};

// y [R, N] fp32 = x [R, K] fp32 @ w[N, K]^T (+ bias). int8: csrc/int8_linear.cpp. Else the matmul
// runs in the weight's dtype; in bf16 as (w @ x^T)^T: for the few rows a draft step has, oneDNN
// takes that form 1.4-2x faster on CPU (x @ w^T with w as a transposed view takes a slower path),
// and in fp32 and fp16 the plain form is faster (benchmarks/bench_linear.py).
at::Tensor dense(const at::Tensor& x, const Matrix& m, const c10::optional<at::Tensor>& bias = c10::nullopt) {
  if (m.scale.defined()) return int8_dense(x, m.w, m.scale, bias);
  const at::Tensor& w = m.w;
  at::Tensor xw = x.to(w.scalar_type());
  at::Tensor y;
  if (w.scalar_type() == at::kBFloat16 && w.device().is_cpu()) {
    y = (x.size(0) == 1 ? at::mv(w, xw[0]).unsqueeze(0) : at::mm(w, xw.t()).t()).to(at::kFloat);
    return bias ? y + *bias : y.contiguous();
  }
  y = bias ? at::addmm(*bias, xw, w.t()) : at::mm(xw, w.t());
  return y.to(at::kFloat);
}

// A fresh contiguous tensor of dtype: outputs never alias each other or an input.
at::Tensor own_copy(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype, false, /*copy=*/true).contiguous();
}

// In place over B rows: gates [B, 4H] (i, f, g, o) -> c = f*c + i*g, h = o*tanh(c). ATen's
// vectorised sigmoid/tanh: the scalar loop this replaces cost 0.1-0.2 ms per layer at 5 branches.
void lstm_cell(const at::Tensor& gates, at::Tensor& h, at::Tensor& c) {
  const int64_t H = h.size(1);
  at::Tensor s = at::sigmoid(gates);  // the g slot's sigmoid is unused: one call beats four slices
  c.mul_(s.narrow(1, H, H)).addcmul_(s.narrow(1, 0, H), at::tanh(gates.narrow(1, 2 * H, H)));
  at::mul_out(h, s.narrow(1, 3 * H, H), at::tanh(c));
}

// One LSTM layer over the block: x [B, k, In] fp32, state h, c [B, H] fp32 (updated) -> [B, k, H] fp32.
at::Tensor lstm_layer(const at::Tensor& x, const Matrix& w_ih, const Matrix& w_hh, const at::Tensor& b,
                      at::Tensor& h, at::Tensor& c) {
  const int64_t B = x.size(0), k = x.size(1), H = h.size(1);
  at::Tensor gx = dense(x.reshape({B * k, x.size(2)}), w_ih, b).view({B, k, 4 * H});
  at::Tensor out = at::empty({B, k, H}, x.options());
  for (int64_t t = 0; t < k; ++t) {
    lstm_cell(gx.select(1, t) + dense(h, w_hh), h, c);
    out.select(1, t).copy_(h);
  }
  return out;
}

// RMSNorm of rows x [R, H] fp32 with weight w -> [R, H] fp32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return x * at::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps) * w.to(at::kFloat);
}

// Per-head view of rows [..., n, H] -> [..., heads, n, head_dim].
at::Tensor split_heads(const at::Tensor& t, int64_t heads) {
  auto sizes = t.sizes().vec();
  const int64_t H = sizes.back();
  sizes.back() = heads;
  sizes.push_back(H / heads);
  return t.view(sizes).transpose(-3, -2);
}

// q [B*k, H] fp32 -> out [B*k, H] fp32: each (branch, head) query attends, unmasked, to ctx (S, shared
// by every branch) + its branch's history (D) + its block (k). Scores and weighted sums are fp32
// matmuls (BLAS); the context's are one batched matmul for all branches, since they share it.
at::Tensor attention(const at::Tensor& q, const at::Tensor& ctx_k, const at::Tensor& ctx_v, const at::Tensor& br_k,
                     const at::Tensor& br_v, const at::Tensor& blk_k, const at::Tensor& blk_v,
                     const DraftStepDims& d) {
  const int64_t B = d.B, k = d.k, S = d.S, nh = d.heads;
  const double scale = 1.0 / std::sqrt(double(d.head_dim));
  at::Tensor qh = split_heads(q.view({B, k, d.H}), nh).mul(scale);                            // [B, nh, k, hd]
  at::Tensor qc = qh.transpose(0, 1).reshape({nh, B * k, d.head_dim});                        // [nh, B*k, hd]
  at::Tensor ck = split_heads(ctx_k.to(at::kFloat), nh), cv = split_heads(ctx_v.to(at::kFloat), nh);  // [nh, S, hd]
  at::Tensor own_k = split_heads(at::cat({br_k, blk_k.view({B, k, d.H})}, 1).to(at::kFloat), nh);  // [B, nh, D+k, hd]
  at::Tensor own_v = split_heads(at::cat({br_v, blk_v.view({B, k, d.H})}, 1).to(at::kFloat), nh);
  at::Tensor s_ctx = at::bmm(qc, ck.transpose(1, 2)).view({nh, B, k, S}).transpose(0, 1);      // [B, nh, k, S]
  at::Tensor p = at::softmax(at::cat({s_ctx, at::matmul(qh, own_k.transpose(-1, -2))}, -1), -1);
  at::Tensor p_ctx = p.narrow(-1, 0, S).transpose(0, 1).reshape({nh, B * k, S});
  at::Tensor o = at::bmm(p_ctx, cv).view({nh, B, k, d.head_dim}).transpose(0, 1) +
                 at::matmul(p.narrow(-1, S, p.size(-1) - S), own_v);                         // [B, nh, k, hd]
  return o.transpose(1, 2).reshape({B * k, d.H});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> falcon_draft_step_cpu(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& ctx_k,
    const at::Tensor& ctx_v, const at::Tensor& br_k, const at::Tensor& br_v, at::TensorList weights,
    int64_t num_heads, double eps, bool encode_only, const c10::optional<at::TensorList>& scales) {
  const DraftStepDims d = check_draft_step(x, h0, c0, ctx_k, ctx_v, br_k, br_v, weights, num_heads, eps, scales);
  // An inference op (no autograd formula): its ATen calls must not record graphs or reject
  // in-place updates when the caller's weights require grad (a drafter in training).
  at::NoGradGuard no_grad;
  const int64_t B = d.B, k = d.k, H = d.H;
  const auto dtype = x.scalar_type();
  std::vector<Matrix> w;
  for (const auto& t : weights) w.push_back({t.contiguous(), at::Tensor()});
  for (size_t i = 0; scales && i < kDraftMatrices.size(); ++i) w[kDraftMatrices[i]].scale = (*scales)[i].contiguous();
  // Private fp32 copies: the recurrence updates the state in place, the inputs stay untouched.
  at::Tensor h = h0.to(at::kFloat, false, /*copy=*/true).contiguous();
  at::Tensor c = c0.to(at::kFloat, false, /*copy=*/true).contiguous();
  at::Tensor h_0 = h[0], c_0 = c[0], h_1 = h[1], c_1 = c[1];

  at::Tensor out0 = lstm_layer(x.to(at::kFloat), w[kWIh0], w[kWHh0], w[kB0].w, h_0, c_0);
  at::Tensor lstm_out = lstm_layer(out0, w[kWIh1], w[kWHh1], w[kB1].w, h_1, c_1).reshape({B * k, H});

  at::Tensor h_out = at::stack({h_0, h_1}).to(dtype), c_out = at::stack({c_0, c_1}).to(dtype);
  at::Tensor normed = rms_norm(lstm_out, w[kAttnNorm].w, eps);
  if (encode_only) {  // settling context: keys/values only, from rows [H, 3H) of w_qkv
    at::Tensor kv = dense(normed, w[kWQkv].rows(H, 2 * H));
    return {at::empty({B, k, 0}, x.options()), h_out, c_out, own_copy(kv.narrow(1, 0, H), dtype).view({B, k, H}),
            own_copy(kv.narrow(1, H, H), dtype).view({B, k, H})};
  }
  at::Tensor qkv = dense(normed, w[kWQkv]);  // [B*k, 3H]
  at::Tensor q = qkv.narrow(1, 0, H).contiguous();
  // The block's keys/values are returned in the cache dtype, and attended to as stored.
  at::Tensor blk_k = own_copy(qkv.narrow(1, H, H), dtype);
  at::Tensor blk_v = own_copy(qkv.narrow(1, 2 * H, H), dtype);
  at::Tensor attn = attention(q, ctx_k, ctx_v, br_k, br_v, blk_k, blk_v, d);

  at::Tensor resid = lstm_out + dense(attn, w[kWO]);
  at::Tensor up = dense(rms_norm(resid, w[kMlpNorm].w, eps), w[kWUp]);
  at::Tensor out = resid + dense(up * at::sigmoid(up), w[kWDown]);
  return {out.view({B, k, H}).to(dtype), h_out, c_out, blk_k.view({B, k, H}), blk_v.view({B, k, H})};
}

}  // namespace falcon_ext
