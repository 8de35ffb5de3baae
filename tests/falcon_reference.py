"""The one plain-PyTorch reference of the Falcon drafter's block, and the cases and tolerances that
hold falcon_draft_step (C++ CPU, CUDA) to it.

``reference_block`` is written independently of falcon_ext: LSTM cells step by step (not
nn.LSTM, which FalconDrafter uses), attention with an explicit mask, head by head. It serves
test_drafter.py (the drafter's forward over a sequence, with its block mask) and
test_draft_step.py / test_fuzz.py (one fused decode step over cached keys).

Tolerances (``check_outputs``): fp32 within 2e-5 (relative to the output's scale) of an fp64
reference; bf16/fp16 (flash-attention's rule) the op's error vs fp64 is at most 2x the error of
the same reference run in that dtype, plus one unit of the dtype's epsilon times the output
scale. The CUDA op is held to the CPU op: at most 2x its error vs fp64, plus 4 eps of the scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from falcon_ext import ops
from falcon_ext.drafters.falcon import FUSED_WEIGHTS


def reference_block(w: dict[str, torch.Tensor], x, h0, c0, prior_k, prior_v, visible, heads: int, eps: float):
    """The Falcon block in x's dtype: matmuls and norms in that dtype, the LSTM cells' gate
    arithmetic and the softmax in at least fp32, the LSTM state rounded to x's dtype each step. In
    fp16/bf16 this is the plain baseline the fused op is held to; computing the cells wholly in
    the low dtype would err more than nn.LSTM there and so loosen that bound.

    w: the weights by their ``FUSED_WEIGHTS`` names (LSTM biases summed); x [B, T, 2H] the
    block's inputs; h0, c0 [2, B, H] the LSTM state before it; prior_k, prior_v [B, P, H] keys
    and values from before the block; visible [T, P + T] bool, which keys each position sees.
    Returns (out [B, T, H], h, c [2, B, H] after the block, the block's keys and values [B, T, H]).
    """
    H, acc = h0.shape[-1], torch.promote_types(x.dtype, torch.float32)
    seq, hs, cs = x, [], []
    for layer in range(2):
        w_cat, b = torch.cat([w[f"w_ih{layer}"], w[f"w_hh{layer}"]], 1), w[f"b{layer}"]
        h, c, outs = h0[layer], c0[layer], []
        for t in range(seq.shape[1]):
            i, f, g, o = F.linear(torch.cat([seq[:, t], h], -1), w_cat, b).to(acc).split(H, -1)  # nn.LSTM's gate order
            c = (torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)).to(x.dtype)
            h = (torch.sigmoid(o) * torch.tanh(c)).to(x.dtype)
            outs.append(h)
        seq = torch.stack(outs, 1)
        hs.append(h)
        cs.append(c)

    def rms(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight

    q, block_k, block_v = (rms(seq, w["attn_norm"]) @ w["w_qkv"].T).split(H, -1)
    keys, values = torch.cat([prior_k, block_k], 1), torch.cat([prior_v, block_v], 1)
    d = H // heads
    attn = torch.empty_like(q)
    for head in range(heads):
        s = slice(head * d, (head + 1) * d)
        scores = (q[..., s] @ keys[..., s].transpose(1, 2)) / d**0.5
        scores = scores.masked_fill(~visible, float("-inf"))
        attn[..., s] = torch.softmax(scores, -1, dtype=acc).to(q.dtype) \
            @ values[..., s]
    r = seq + attn @ w["w_o"].T
    return (r + F.silu(rms(r, w["mlp_norm"]) @ w["w_up"].T) @ w["w_down"].T, torch.stack(hs), torch.stack(cs),
            block_k, block_v)


class ReferenceBlock(nn.Module):
    """Random weights of one block (non-trivial norm weights and LSTM biases, so every term is
    exercised) and a decode step through ``reference_block`` in whatever dtype it is cast to."""

    def __init__(self, H, M, heads, eps=1e-6):
        super().__init__()
        self.H, self.heads, self.eps = H, heads, eps
        self.lstm = nn.LSTM(2 * H, H, num_layers=2, batch_first=True)
        self.attn_norm, self.mlp_norm = nn.Parameter(1 + 0.3 * torch.randn(H)), nn.Parameter(1 + 0.3 * torch.randn(H))
        self.qkv, self.o = nn.Linear(H, 3 * H, bias=False), nn.Linear(H, H, bias=False)
        self.up, self.down = nn.Linear(H, M, bias=False), nn.Linear(M, H, bias=False)
        with torch.no_grad():
            for p in self.lstm.parameters():
                p.add_(0.2 * torch.randn_like(p))

    def named(self) -> dict[str, torch.Tensor]:
        L = self.lstm
        return {"w_ih0": L.weight_ih_l0, "w_hh0": L.weight_hh_l0, "b0": L.bias_ih_l0 + L.bias_hh_l0,
                "w_ih1": L.weight_ih_l1, "w_hh1": L.weight_hh_l1, "b1": L.bias_ih_l1 + L.bias_hh_l1,
                "attn_norm": self.attn_norm, "w_qkv": self.qkv.weight, "w_o": self.o.weight,
                "mlp_norm": self.mlp_norm, "w_up": self.up.weight, "w_down": self.down.weight}

    def weights(self):
        """In the op's order, ``FUSED_WEIGHTS``."""
        named = self.named()
        return [named[name] for name in FUSED_WEIGHTS]

    def forward(self, x, h0, c0, ctx_k, ctx_v, br_k, br_v):
        """The op's contract: the block's k positions see the shared context, their branch and
        the whole block (the queries are the last block, so a relaxed causal mask hides nothing)."""
        B, k, _ = x.shape
        prior_k, prior_v = torch.cat([ctx_k.expand(B, -1, -1), br_k], 1), torch.cat([ctx_v.expand(B, -1, -1), br_v], 1)
        visible = torch.ones(k, prior_k.shape[1] + k, dtype=torch.bool)
        w = {name: t.to(x.dtype) for name, t in self.named().items()}
        return reference_block(w, x, h0, c0, prior_k, prior_v, visible, self.heads, self.eps)


def make_case(H, M, heads, B, k, S, D, seed=0):
    torch.manual_seed(seed)
    ref = ReferenceBlock(H, M, heads)
    inputs = [torch.randn(B, k, 2 * H), 0.5 * torch.randn(2, B, H), 0.5 * torch.randn(2, B, H),
              torch.randn(S, H), torch.randn(S, H), torch.randn(B, D, H), torch.randn(B, D, H)]
    return ref, inputs


def run_ref(ref, inputs, dtype):
    with torch.no_grad():
        return ref(*[t.to(dtype) for t in inputs])


def draft_step_cases(device, dtype, shapes):
    """Per shape (H, M, heads, B, k, S, D): (reference block, its fp32 CPU inputs, the op's
    tensor arguments on ``device`` in ``dtype``); shared by the CPU and the CUDA tests."""
    cases = []
    for shape in shapes:
        ref, inputs = make_case(*shape)
        args = [t.to(device, dtype) for t in inputs] + [[w.detach().to(device, dtype) for w in ref.weights()]]
        cases.append((ref, inputs, args))
    return cases


def check_outputs(got, ref, inputs, args, dtype, device, encode_only=False):
    """The op's outputs (computed on ``device`` from ``args``) against an fp64 run of the reference.

    CPU, fp32: within 2e-5 of the output's scale. CPU, fp16/bf16: at most twice the error of the
    reference run in that dtype, plus one eps of the scale. CUDA: at most twice the CPU op's error
    on the same inputs, plus 4 eps of the scale (the CPU op is the CUDA reference).
    """
    first = 1 if encode_only else 0  # encode_only: no features, only the state and the block's keys/values
    exact = run_ref(ref, inputs, torch.float64)[first:]
    got = got[first:]
    eps = torch.finfo(dtype).eps
    if device == "cuda":
        with torch.no_grad():
            cpu = ops.falcon_draft_step(*[t.cpu() for t in args[:7]], [w.cpu() for w in args[7]], ref.heads, ref.eps,
                                        encode_only)[first:]
        bounds = [2 * (c.double() - e).abs().max().item() + 4 * eps * max(e.abs().max().item(), 1.0)
                  for c, e in zip(cpu, exact)]
    elif dtype == torch.float32:
        for g, e in zip(got, exact):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5 * max(1.0, e.abs().max().item()))
        return
    else:
        plain = run_ref(ref, inputs, dtype)[first:]
        bounds = [2 * (p.double() - e).abs().max().item() + eps * e.abs().max().item() for p, e in zip(plain, exact)]
    for name, g, e, bound in zip(["out", "h", "c", "block_k", "block_v"][first:], got, exact, bounds):
        assert g.dtype == dtype and g.shape == e.shape, (name, g.dtype, g.shape)
        err = (g.cpu().double() - e).abs().max().item()
        assert err <= bound, (name, err, bound)
