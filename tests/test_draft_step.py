"""falcon_draft_step (C++ CPU, CUDA) against an independent plain-PyTorch reference.

Tolerances: fp32 within 2e-5 (relative to the output's scale) of an fp64 reference; bf16/fp16
(flash-attention's rule) the op's error vs fp64 is at most 2x the error of the same plain
reference run in that dtype, plus one unit of the dtype's epsilon times the output scale.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from falcon_ext import ops

CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("falcon_ext::falcon_draft_step",
                                                                                   "CUDA")


class ReferenceBlock(nn.Module):
    """nn.LSTM + explicit masked multi-head attention + MLP, in whatever dtype it is cast to."""

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

    def norm(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def forward(self, x, h0, c0, ctx_k, ctx_v, br_k, br_v):
        B, k, _ = x.shape
        out, (h, c) = self.lstm(x, (h0, c0))
        q, bk, bv = self.qkv(self.norm(out, self.attn_norm)).split(self.H, -1)
        keys = torch.cat([ctx_k.expand(B, -1, -1), br_k, bk], 1)
        values = torch.cat([ctx_v.expand(B, -1, -1), br_v, bv], 1)
        n = keys.shape[1]
        # Relaxed causal mask: key j is visible to a query iff block(j) <= the query's block. The
        # queries are the last block, so at decode time this hides nothing (computed, not assumed).
        key_block = (torch.arange(n) >= n - k).long()
        visible = (key_block <= 1)[None, :]
        d = self.H // self.heads
        attn = torch.empty_like(q)
        for hd in range(self.heads):
            s = slice(hd * d, (hd + 1) * d)
            scores = (q[..., s] @ keys[..., s].transpose(1, 2)) / d ** 0.5
            scores = scores.masked_fill(~visible, float("-inf"))
            attn[..., s] = torch.softmax(scores.float(), -1).to(q.dtype) @ values[..., s]
        r = out + self.o(attn)
        return r + self.down(F.silu(self.up(self.norm(r, self.mlp_norm)))), h, c, bk, bv

    def weights(self):
        L = self.lstm
        return [L.weight_ih_l0, L.weight_hh_l0, L.bias_ih_l0 + L.bias_hh_l0, L.weight_ih_l1, L.weight_hh_l1,
                L.bias_ih_l1 + L.bias_hh_l1, self.attn_norm, self.qkv.weight, self.o.weight, self.mlp_norm,
                self.up.weight, self.down.weight]


def make_case(H, M, heads, B, k, S, D, seed=0):
    torch.manual_seed(seed)
    ref = ReferenceBlock(H, M, heads)
    inputs = [torch.randn(B, k, 2 * H), 0.5 * torch.randn(2, B, H), 0.5 * torch.randn(2, B, H),
              torch.randn(S, H), torch.randn(S, H), torch.randn(B, D, H), torch.randn(B, D, H)]
    return ref, inputs


def run_op(ref, inputs, dtype, device="cpu"):
    with torch.no_grad():
        w = [t.detach().to(device, dtype) for t in ref.weights()]
        return ops.falcon_draft_step(*[t.to(device, dtype) for t in inputs], w, ref.heads, ref.eps)


def run_ref(ref, inputs, dtype):
    with torch.no_grad():
        r = ref.to(dtype)
        got = r(*[t.to(dtype) for t in inputs])
        ref.float()
        return got


SHAPES = [  # H, M, heads, B, k, S, D
    (7, 13, 1, 1, 2, 5, 0),
    (7, 13, 7, 3, 3, 0, 4),
    (99, 37, 9, 2, 4, 33, 8),
    (1, 1, 1, 1, 1, 0, 0),
    (64, 128, 4, 5, 2, 17, 2),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_fp32_matches_reference(shape):
    ref, inputs = make_case(*shape)
    exact = run_ref(ref, inputs, torch.float64)
    got = run_op(ref, inputs, torch.float32)
    for g, e in zip(got, exact):
        assert g.dtype == torch.float32 and g.shape == e.shape
        torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5 * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_cpu_low_precision_within_twice_plain_error(shape, dtype):
    ref, inputs = make_case(*shape)
    exact = run_ref(ref, inputs, torch.float64)
    plain = run_ref(ref, inputs, dtype)
    got = run_op(ref, inputs, dtype)
    eps = torch.finfo(dtype).eps
    for name, g, p, e in zip(["out", "h", "c", "block_k", "block_v"], got, plain, exact):
        assert g.dtype == dtype
        op_err = (g.double() - e).abs().max().item()
        plain_err = (p.double() - e).abs().max().item()
        assert op_err <= 2 * plain_err + eps * e.abs().max().item(), (name, op_err, plain_err)


def test_opcheck():
    ref, inputs = make_case(7, 13, 7, 2, 3, 4, 2)
    w = [t.detach() for t in ref.weights()]
    torch.library.opcheck(torch.ops.falcon_ext.falcon_draft_step.default, (*inputs, w, 7, 1e-6))


def test_bad_arguments_raise():
    ref, inputs = make_case(7, 13, 1, 2, 2, 3, 1)
    w = [t.detach() for t in ref.weights()]
    x, h0, c0, ck, cv, bk, bv = inputs
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="h0 must have shape"):
            ops.falcon_draft_step(x, h0[:, :1], c0, ck, cv, bk, bv, w, 1, 1e-6)
        with pytest.raises(RuntimeError, match="br_k must have shape"):
            ops.falcon_draft_step(x, h0, c0, ck, cv, bk[:1], bv, w, 1, 1e-6)
        with pytest.raises(RuntimeError, match="ctx_v must have shape"):
            ops.falcon_draft_step(x, h0, c0, ck, cv[:2], bk, bv, w, 1, 1e-6)
        with pytest.raises(RuntimeError, match="12 weight tensors"):
            ops.falcon_draft_step(x, h0, c0, ck, cv, bk, bv, w[:11], 1, 1e-6)
        with pytest.raises(RuntimeError, match="w_qkv must have shape"):
            ops.falcon_draft_step(x, h0, c0, ck, cv, bk, bv, w[:7] + [w[7][:-1]] + w[8:], 1, 1e-6)
        with pytest.raises(RuntimeError, match="must divide"):
            ops.falcon_draft_step(x, h0, c0, ck, cv, bk, bv, w, 2, 1e-6)
        with pytest.raises(RuntimeError, match="dtype"):
            ops.falcon_draft_step(x.double(), h0, c0, ck, cv, bk, bv, w, 1, 1e-6)
        with pytest.raises(RuntimeError, match=r"x must be \[B"):
            ops.falcon_draft_step(x[..., :-1], h0, c0, ck, cv, bk, bv, w, 1, 1e-6)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(576, 1536, 9, 4, 2, 300, 4)])
def test_cuda_matches_cpu(shape, dtype):
    ref, inputs = make_case(*shape)
    exact = run_ref(ref, inputs, torch.float64)
    cpu = run_op(ref, inputs, dtype)
    gpu = run_op(ref, inputs, dtype, "cuda")
    eps = torch.finfo(dtype).eps
    for c, g, e in zip(cpu, gpu, exact):
        assert g.device.type == "cuda" and g.dtype == dtype
        scale = e.abs().max().item()
        cpu_err = (c.double() - e).abs().max().item()
        gpu_err = (g.cpu().double() - e).abs().max().item()
        assert gpu_err <= 2 * cpu_err + 4 * eps * max(scale, 1.0), (gpu_err, cpu_err)
