"""int8 drafter weights (CPU): the int8_linear op and falcon_draft_step's int8 matrices against
plain-PyTorch references on dequantized weights, and FalconDrafter's "int8" weight format.

The references quantize independently of falcon_ext (``quantize`` below) and compute in float64
on the dequantized weights, so int8 changes only which weights the block has, never the math.
"""
import pytest
import torch
from falcon_reference import check_outputs, draft_step_cases

from falcon_ext import ops, speculative_generate
from falcon_ext.drafters.falcon import FUSED_MATRICES, FUSED_WEIGHTS, FalconDrafter, Int8Weight, choose_weight_format
from falcon_ext.targets import load_target


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: q = round(w / s) with s = max |row| / 127."""
    s = w.double().abs().amax(1) / 127
    s[s == 0] = 1.0
    return torch.round(w.double() / s[:, None]).to(torch.int8), s.float()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9])
@pytest.mark.parametrize("N,K", [(1, 1), (7, 111), (99, 33), (16, 1152)])
def test_int8_linear_matches_reference(rows, N, K):
    g = torch.Generator().manual_seed(rows * 1000 + N + K)
    x = torch.randn(rows, K, generator=g)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale, bias = torch.rand(N, generator=g) / 50, torch.randn(N, generator=g)
    exact = x.double() @ (q.double() * scale.double()[:, None]).T
    for b in (None, bias):
        want = exact + (0 if b is None else b.double())
        got = ops.int8_linear(x, q, scale, b)
        assert got.dtype == torch.float32 and got.shape == (rows, N)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_int8_linear_keeps_x_dtype_and_leading_dims(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 99, generator=g).to(dtype)
    q = torch.randint(-127, 128, (7, 99), generator=g, dtype=torch.int8)
    scale, bias = torch.rand(7, generator=g) / 50, torch.randn(7, generator=g).to(dtype)
    got = ops.int8_linear(x, q, scale, bias)
    assert got.dtype == dtype and got.shape == (2, 3, 7)
    want = (x.double() @ (q.double() * scale.double()[:, None]).T + bias.double()).to(dtype)
    # fp32 accumulation (float64 x too), then one rounding to the dtype
    torch.testing.assert_close(got.double(), want.double(), rtol=2 * torch.finfo(dtype).eps,
                               atol=1e-5 * want.abs().max().item())


def test_int8_linear_bad_arguments_raise():
    x, q, s = torch.randn(3, 8), torch.zeros(5, 8, dtype=torch.int8), torch.ones(5)
    with pytest.raises(RuntimeError, match="weight must be int8"):
        ops.int8_linear(x, q.float(), s)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        ops.int8_linear(x, q, s.double())
    with pytest.raises(RuntimeError, match=r"scale must be \[N\] = \[5\]"):
        ops.int8_linear(x, q, s[:4])
    with pytest.raises(RuntimeError, match=r"x must be \[\.\.\., K\] with K = weight.size\(1\) = 8"):
        ops.int8_linear(x[:, :7], q, s)
    with pytest.raises(RuntimeError, match=r"bias must be \[N\] = \[5\]"):
        ops.int8_linear(x, q, s, torch.ones(4))
    with pytest.raises(RuntimeError, match="x must be a floating tensor"):
        ops.int8_linear(x.int(), q, s)
    with pytest.raises(RuntimeError, match="CPU only"):
        ops.int8_linear(x.to("meta"), q.to("meta"), s.to("meta"))
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        ops.int8_linear(x, q, 1.0)


def test_int8_linear_opcheck():
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (7, 9), generator=g, dtype=torch.int8)
    args = (torch.randn(3, 9, generator=g), q, torch.rand(7, generator=g), torch.randn(7, generator=g))
    torch.library.opcheck(torch.ops.falcon_ext.int8_linear.default, args)


def int8_case(dtype, shape):
    """A draft_step case whose reference holds the dequantized weights, and the op's arguments
    with the matrices as int8 + scales."""
    [(ref, inputs, args)] = draft_step_cases("cpu", dtype, [shape])
    named = ref.named()
    scales = []
    with torch.no_grad():
        for name in FUSED_MATRICES:
            q, s = quantize(named[name])
            named[name].copy_(q.float() * s[:, None])  # the reference computes with these weights
            args[7][FUSED_WEIGHTS.index(name)] = q
            scales.append(s)
    return ref, inputs, args, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 13, 7, 3, 3, 0, 4), (99, 37, 9, 2, 4, 33, 8), (1, 1, 1, 1, 1, 0, 0),
                                   (64, 128, 4, 5, 1, 17, 2)])
def test_draft_step_with_int8_weights_matches_reference(dtype, shape):
    ref, inputs, args, scales = int8_case(dtype, shape)
    with torch.no_grad():
        got = ops.falcon_draft_step(*args, ref.heads, ref.eps, scales=scales)
        check_outputs(got, ref, inputs, args, dtype, "cpu")
        encoded = ops.falcon_draft_step(*args, ref.heads, ref.eps, encode_only=True, scales=scales)
        check_outputs(encoded, ref, inputs, args, dtype, "cpu", encode_only=True)


def test_draft_step_int8_bad_arguments_raise():
    ref, _, args, scales = int8_case(torch.float32, (7, 13, 1, 2, 2, 3, 1))
    x, h0, c0, ck, cv, bk, bv, w = args
    step = lambda w, scales: ops.falcon_draft_step(x, h0, c0, ck, cv, bk, bv, w, 1, 1e-6, scales=scales)  # noqa: E731
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="one scale per weight matrix"):
            step(w, scales[:7])
        with pytest.raises(RuntimeError, match=r"scales\[1\] must be float32 \[28\]"):
            step(w, scales[:1] + [scales[1][:-1]] + scales[2:])
        floats = [t.float() if t.dtype == torch.int8 else t for t in w]
        with pytest.raises(RuntimeError, match="must be int8"):
            step(floats, scales)
        with pytest.raises(RuntimeError, match="dtype"):  # int8 matrices without scales
            step(w, None)


@pytest.fixture(scope="module")
def stories():
    model, _ = load_target("stories260K")
    return model


def test_weight_format_int8_every_decoding_path_reads_the_same_weights(stories):
    """Fused op and plain PyTorch in int8 agree; both differ from float (they read other weights)."""
    drafter = FalconDrafter.from_pretrained("stories260K", target=stories)
    g = torch.Generator().manual_seed(0)
    H = drafter.config.hidden_size
    x = torch.randn(2, 3, 2 * H, generator=g)
    ctx = torch.randn(5, H, generator=g), torch.randn(5, H, generator=g)
    br = torch.randn(2, 1, H, generator=g), torch.randn(2, 1, H, generator=g)
    state = drafter.zero_state(2)
    outs = {}
    with torch.no_grad():
        for fmt in ("float", "int8"):
            drafter.set_weight_format(fmt)
            for fused in (True, False):
                drafter.use_fused = fused
                outs[fmt, fused] = drafter.draft_step(x, state, *ctx, *br)[0]
    torch.testing.assert_close(outs["int8", True], outs["int8", False], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["float", True], outs["float", False], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outs["int8", True], outs["float", True], rtol=1e-4, atol=1e-4)
    # and the int8 copies are the rounding of the float weights: within half a step per row
    w = drafter.lstm.weight_ih_l0.detach()
    q8 = drafter.decode_weights()["w_ih0"]
    assert isinstance(q8, Int8Weight)
    assert ((q8.dequantize() - w).abs() <= q8.scale[:, None] / 2 + 1e-7).all()


def test_int8_drafter_output_is_identical_to_generate(stories):
    """Lossless whatever the drafter's weights: greedy output equals the target's own generate."""
    drafter = FalconDrafter.from_pretrained("stories260K", target=stories)
    drafter.set_weight_format("int8")
    ids = torch.tensor([[1, 403, 407, 262]])
    want = stories.generate(ids, max_new_tokens=48, do_sample=False, min_new_tokens=48)
    got = speculative_generate(stories, drafter, ids, max_new_tokens=48, eos_token_id=[])
    assert torch.equal(got.sequences, want)


def test_int8_copies_follow_the_float_weights(stories):
    drafter = FalconDrafter.from_pretrained("stories260K", target=stories)
    drafter.set_weight_format("int8")
    before = drafter.decode_weights()["w_o"].q.clone()
    with torch.no_grad():
        drafter.o_proj.weight.mul_(-1)
    assert torch.equal(drafter.decode_weights()["w_o"].q, -before)
    head = drafter.draft_head()
    assert isinstance(head.weight, Int8Weight)
    drafter.set_weight_format("float")
    assert not isinstance(drafter.draft_head().weight, Int8Weight)


def test_weight_bytes_counts_what_decoding_reads(stories):
    """weight_bytes (bench_draft_step's GB/s) follows the format: the LSTM's two biases are read
    summed, and an int8 matrix is 1 byte a weight plus a float32 scale per row."""
    drafter = FalconDrafter.from_pretrained("stories260K", target=stories)
    params = dict(drafter.named_parameters())
    size = params["qkv.weight"].element_size()
    merged = sum(params[f"lstm.bias_hh_l{i}"].numel() for i in (0, 1))
    want = (sum(p.numel() for p in params.values()) - merged) * size
    assert drafter.weight_bytes() == want
    matrices = {"w_ih0": "lstm.weight_ih_l0", "w_hh0": "lstm.weight_hh_l0", "w_ih1": "lstm.weight_ih_l1",
                "w_hh1": "lstm.weight_hh_l1", "w_qkv": "qkv.weight", "w_o": "o_proj.weight", "w_up": "up.weight",
                "w_down": "down.weight"}
    assert sorted(matrices) == sorted(FUSED_MATRICES)
    drafter.set_weight_format("int8")
    saved = sum(params[n].numel() * (size - 1) - params[n].shape[0] * 4 for n in matrices.values())
    assert drafter.weight_bytes() == want - saved


def test_weight_format_bad_values(stories):
    drafter = FalconDrafter.from_pretrained("stories260K", target=stories)
    with pytest.raises(ValueError, match="weight_format must be one of"):
        drafter.set_weight_format("int4")
    drafter.set_weight_format("int8")
    # int8 has no gradients: a training graph through the int8 draft head is refused clearly
    pred = torch.randn(1, 2, drafter.config.hidden_size, requires_grad=True)
    with pytest.raises(RuntimeError, match="decoding format without gradients"):
        drafter.draft_head().logits(pred)


def test_choose_weight_format(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for capability in ("AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert choose_weight_format("auto", cpu, torch.bfloat16)[0] == "int8"
        assert choose_weight_format("auto", cpu, torch.float16)[0] == "int8"
        assert choose_weight_format("auto", cpu, torch.float32) == ("float", "auto, the drafter runs in float32")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert choose_weight_format("auto", cpu, torch.bfloat16)[0] == "float"
    assert choose_weight_format("auto", gpu, torch.bfloat16) == ("float", "auto, the drafter is on cuda")
    assert choose_weight_format("int8", cpu, torch.float32) == ("int8", "as requested")
    assert choose_weight_format("float", cpu, torch.bfloat16) == ("float", "as requested")
    with pytest.raises(ValueError, match="CPU format"):
        choose_weight_format("int8", gpu, torch.bfloat16)
    with pytest.raises(ValueError, match="must be one of"):
        choose_weight_format("int4", cpu, torch.bfloat16)


def test_cli_drafter_weights_reaches_the_drafter(stories, capsys):
    """--drafter-weights, through the one CLI loader: announced on stderr and applied."""
    from falcon_ext.evaluation.acceptance import load_drafter

    assert load_drafter("stories260K", stories, "int8").weight_format == "int8"
    assert "drafter weights int8: as requested" in capsys.readouterr().err
    assert load_drafter("stories260K", stories).weight_format == "float"  # auto: a float32 target
    assert "drafter weights float: auto, the drafter runs in float32" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["demo"], ["bench"], ["eval-drafter", "--target", "t", "--drafter", "d", "--prompts", "p"],
                                     ["tune-tree", "--target", "t", "--drafter", "d", "--prompts", "p"]])
def test_drafter_weights_option(command):
    from falcon_ext.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(command).drafter_weights == "auto"
    assert parser.parse_args(command + ["--drafter-weights", "int8"]).drafter_weights == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(command + ["--drafter-weights", "int4"])
