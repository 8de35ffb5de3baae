"""falcon_draft_step (C++ CPU, CUDA) against the independent plain-PyTorch reference of
falcon_reference.py, within the tolerances of its check_outputs.

Every test taking the `device` fixture runs on the CPU and, marked `cuda`, on the GPU, from the
same draft_step_cases.
"""
import pytest
import torch
from falcon_reference import check_outputs, draft_step_cases, make_case

from falcon_ext import ops

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes", [SHAPES, GPU_PATH_SHAPES], ids=["small", "gpu_paths"])
def test_matches_reference(device, dtype, shapes):
    for ref, inputs, args in draft_step_cases(device, dtype, shapes):
        with torch.no_grad():
            got = ops.falcon_draft_step(*args, ref.heads, ref.eps)
        assert all(g.device.type == device for g in got)
        check_outputs(got, ref, inputs, args, dtype, device)


@pytest.mark.parametrize("shapes", [SHAPES[:3], [LONG_PROMPT]], ids=["small", "long_prompt"])
def test_encode_only_matches_reference(device, shapes):
    for ref, inputs, args in draft_step_cases(device, torch.float32, shapes):
        with torch.no_grad():
            got = ops.falcon_draft_step(*args, ref.heads, ref.eps, encode_only=True)
        B, k = args[0].shape[:2]
        assert got[0].shape == (B, k, 0) and all(g.device.type == device for g in got)
        check_outputs(got, ref, inputs, args, torch.float32, device, encode_only=True)


@pytest.mark.cuda
def test_cuda_attention_shared_memory_limit_is_clear():
    """The long prompt's k is fine for encode_only but not for a full step: a clear error, no launch."""
    [(ref, _, args)] = draft_step_cases("cuda", torch.float32, [LONG_PROMPT])
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"head_dim 64 with k 400 needs \d+ bytes of shared memory"):
        ops.falcon_draft_step(*args, ref.heads, ref.eps)


def test_drafter_encodes_a_long_prompt(device):
    """The real caller: DraftContext settles a 500-token prompt with one fused encode_only call,
    which must equal the plain-PyTorch encode."""
    from falcon_ext.drafters.falcon import FalconDrafter
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
    [(_, _, args)] = draft_step_cases(device, torch.float32, [(7, 13, 1, 2, 2, 3, 1)])
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
