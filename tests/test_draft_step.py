"""falcon_draft_step (C++ CPU, CUDA) against an independent plain-PyTorch reference.

Tolerances: fp32 within 2e-5 (relative to the output's scale) of an fp64 reference; bf16/fp16
(flash-attention's rule) the op's error vs fp64 is at most 2x the error of the same plain
reference run in that dtype, plus one unit of the dtype's epsilon times the output scale. The
CUDA op is held to the CPU op: at most 2x its error vs fp64, plus 4 eps of the scale.
Every test taking the `device` fixture runs on the CPU and, marked `cuda`, on the GPU, from the
same sample_inputs.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from falcon_ext import ops
from falcon_ext.falcon import FUSED_WEIGHTS

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
        """In the op's order, ``FUSED_WEIGHTS``."""
        L = self.lstm
        named = {"w_ih0": L.weight_ih_l0, "w_hh0": L.weight_hh_l0, "b0": L.bias_ih_l0 + L.bias_hh_l0,
                 "w_ih1": L.weight_ih_l1, "w_hh1": L.weight_hh_l1, "b1": L.bias_ih_l1 + L.bias_hh_l1,
                 "attn_norm": self.attn_norm, "w_qkv": self.qkv.weight, "w_o": self.o.weight,
                 "mlp_norm": self.mlp_norm, "w_up": self.up.weight, "w_down": self.down.weight}
        return [named[name] for name in FUSED_WEIGHTS]


def make_case(H, M, heads, B, k, S, D, seed=0):
    torch.manual_seed(seed)
    ref = ReferenceBlock(H, M, heads)
    inputs = [torch.randn(B, k, 2 * H), 0.5 * torch.randn(2, B, H), 0.5 * torch.randn(2, B, H),
              torch.randn(S, H), torch.randn(S, H), torch.randn(B, D, H), torch.randn(B, D, H)]
    return ref, inputs


def run_op(ref, inputs, dtype, device="cpu", encode_only=False):
    with torch.no_grad():
        w = [t.detach().to(device, dtype) for t in ref.weights()]
        return ops.falcon_draft_step(*[t.to(device, dtype) for t in inputs], w, ref.heads, ref.eps, encode_only)


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
# Sizes that take the CUDA kernels' other paths (run on the CPU too, against the reference).
GPU_PATH_SHAPES = [
    (576, 1536, 9, 4, 2, 300, 4),  # SmolLM2's drafter: 64 columns per warp in every linear
    (256, 64, 2, 2, 32, 40, 4),  # head_dim 128, k = 32: 49.5 KB of attention shared memory (> the 48 KB default)
    (64, 96, 4, 2, 2, 3000, 8),  # 3,000 context positions: 24 chunks of keys through the online softmax
]
# A prompt settled in one encode_only call, as DraftContext does (k = prompt length): its
# attention would need 410 KB of shared memory, so the CUDA op must not ask for any.
LONG_PROMPT = (64, 128, 1, 1, 400, 0, 0)


def sample_inputs(device, dtype, shapes):
    """Per shape: (reference module, its fp32 CPU inputs, the op's tensor arguments on ``device``
    in ``dtype``); shared by the CPU and the CUDA tests."""
    cases = []
    for shape in shapes:
        ref, inputs = make_case(*shape)
        args = [t.to(device, dtype) for t in inputs] + [[w.detach().to(device, dtype) for w in ref.weights()]]
        cases.append((ref, inputs, args))
    return cases


def check_outputs(got, ref, inputs, args, dtype, encode_only=False):
    """The op's outputs against an fp64 run of the reference module.

    CPU, fp32: within 2e-5 of the output's scale. CPU, fp16/bf16: at most twice the error of the
    reference module run in that dtype, plus one eps of the scale. CUDA: at most twice the CPU
    op's error on the same inputs, plus 4 eps of the scale (the CPU op is the CUDA reference).
    """
    first = 1 if encode_only else 0  # encode_only: no features, only the state and the block's keys/values
    exact = run_ref(ref, inputs, torch.float64)[first:]
    got = got[first:]
    eps = torch.finfo(dtype).eps
    if got[0].is_cuda:
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes", [SHAPES, GPU_PATH_SHAPES], ids=["small", "gpu_paths"])
def test_matches_reference(device, dtype, shapes):
    for ref, inputs, args in sample_inputs(device, dtype, shapes):
        with torch.no_grad():
            got = ops.falcon_draft_step(*args, ref.heads, ref.eps)
        assert all(g.device.type == device for g in got)
        check_outputs(got, ref, inputs, args, dtype)


@pytest.mark.parametrize("shapes", [SHAPES[:3], [LONG_PROMPT]], ids=["small", "long_prompt"])
def test_encode_only_matches_reference(device, shapes):
    for ref, inputs, args in sample_inputs(device, torch.float32, shapes):
        with torch.no_grad():
            got = ops.falcon_draft_step(*args, ref.heads, ref.eps, encode_only=True)
        B, k = args[0].shape[:2]
        assert got[0].shape == (B, k, 0) and all(g.device.type == device for g in got)
        check_outputs(got, ref, inputs, args, torch.float32, encode_only=True)


@pytest.mark.cuda
def test_cuda_attention_shared_memory_limit_is_clear():
    """The long prompt's k is fine for encode_only but not for a full step: a clear error, no launch."""
    [(ref, _, args)] = sample_inputs("cuda", torch.float32, [LONG_PROMPT])
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"head_dim 64 with k 400 needs \d+ bytes of shared memory"):
        ops.falcon_draft_step(*args, ref.heads, ref.eps)


def test_drafter_encodes_a_long_prompt(device):
    """The real caller: DraftContext settles a 500-token prompt with one fused encode_only call,
    which must equal the plain-PyTorch encode."""
    from falcon_ext.falcon import FalconDrafter
    from falcon_ext.targets import load_target

    model, _ = load_target("stories260K", device=device)
    drafter = FalconDrafter.from_pretrained("stories260K", target=model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 500, 2 * drafter.config.hidden_size, generator=g).to(device, drafter.config.torch_dtype)
    state = drafter.zero_state()
    with torch.no_grad():
        fused = drafter.encode(x, state)
        drafter.use_fused = False
        plain = drafter.encode(x, state)
    for f, p in zip([fused[0], fused[1], fused[2].h, fused[2].c], [plain[0], plain[1], plain[2].h, plain[2].c]):
        assert f.device.type == device
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-4 * max(1.0, p.abs().max().item()))


@pytest.mark.parametrize("B,k", [(2, 3), (1, 1)])  # B = k = 1: single-row outputs must not alias either
def test_opcheck(B, k):
    ref, inputs = make_case(7, 13, 7, B, k, 4, 2)
    w = [t.detach() for t in ref.weights()]
    for encode_only in (False, True):
        torch.library.opcheck(torch.ops.falcon_ext.falcon_draft_step.default, (*inputs, w, 7, 1e-6, encode_only))


def test_bad_arguments_raise(device):
    [(_, _, args)] = sample_inputs(device, torch.float32, [(7, 13, 1, 2, 2, 3, 1)])
    x, h0, c0, ck, cv, bk, bv, w = args
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
        # Float8 passes at::isFloatingType but has no kernel: refused by the checks, before any launch.
        f8 = [t.to(torch.float8_e4m3fn) for t in (x, h0, c0, ck, cv, bk, bv)]
        with pytest.raises(RuntimeError, match="x must be a floating tensor, got Float8_e4m3fn"):
            ops.falcon_draft_step(*f8, [t.to(torch.float8_e4m3fn) for t in w], 1, 1e-6)
