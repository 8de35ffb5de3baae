"""Tree ops: CPU op == plain-PyTorch reference (falcon_ext.engine.references), CUDA op == CPU op, bad input raises.

Tests taking the `device` fixture (conftest.py) run on the CPU and, marked `cuda`, on the GPU;
the large cases there are sized to take the kernels' other paths (strided loops over more than
1,024 nodes or 262,144 columns, V = 256k, thousands of positions). Tests marked `cuda` by hand
compare the CUDA op with the CPU op, or check what only CUDA has (kernel-side checks, streams).
"""
from __future__ import annotations

import pytest
import torch
from falcon_reference import draft_step_cases
from helpers import (
    FLOAT_DTYPES,
    SHAPES,
    SIZES,
    SMALL_V,
    VOCAB,
    chi_square_passes,
    equal_outputs,
    gen,
    layout,
    markov_case,
    random_path,
    seed_of,
    verify_ops_on,
)

from falcon_ext import ops
from falcon_ext.engine.references import (
    distinct_sibling_tokens,
    greedy_inputs,
    random_tree,
    reference_kv_compact_,
    reference_tree_build,
    reference_verify_greedy,
    reference_verify_sample,
    sample_inputs,
)

# ---------------------------------------------------------------- tree_build


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prefix_len", [0, 1, 37])
def test_tree_build_matches_reference(n, shape, prefix_len):
    parents = random_tree(n, gen(seed_of(n, shape, prefix_len)), shape)
    for dtype in FLOAT_DTYPES:
        mask, pos, paths = ops.tree_build(parents, prefix_len, dtype)
        ref_mask, ref_pos, ref_paths = reference_tree_build(parents, prefix_len, dtype)
        assert mask.dtype == dtype and mask.shape == (n, prefix_len + n)
        assert equal_outputs((mask, pos, paths), (ref_mask, ref_pos, ref_paths))


def test_tree_build_small_example():
    mask, pos, paths = ops.tree_build(torch.tensor([-1, 0, 0, 1]), 2)
    inf = float("-inf")
    assert torch.equal(mask, torch.tensor([[0, 0, 0, inf, inf, inf],
                                           [0, 0, 0, 0, inf, inf],
                                           [0, 0, 0, inf, 0, inf],
                                           [0, 0, 0, 0, inf, 0]]))
    assert pos.tolist() == [2, 3, 3, 4]
    assert paths.tolist() == [[0, 2, -1], [0, 1, 3]]  # leaves 2 and 3 in index order


def test_tree_build_non_contiguous_parents(device):
    parents = torch.tensor([[-1, 9], [0, 9], [1, 9], [0, 9]], device=device).t()[0]
    assert not parents.is_contiguous()
    got = ops.tree_build(parents, 3)
    assert equal_outputs(got, reference_tree_build(parents.cpu(), 3), device)


@pytest.mark.parametrize("shape", ["random", "chain"])
def test_tree_build_large(device, shape):
    """1,500 nodes (the CUDA scan's strided loop runs twice) after a 3,000-token prefix."""
    parents = random_tree(1500, gen(seed_of("large", shape)), shape)
    want = reference_tree_build(parents, 3000, torch.float16) if device == "cpu" else ops.tree_build(parents, 3000,
                                                                                                     torch.float16)
    got = ops.tree_build(parents.to(device), 3000, torch.float16)
    assert equal_outputs(got, want, device)


BAD_TREES = [
    (torch.tensor([0, 0]), "parents\\[0\\] must be -1"),
    (torch.tensor([-1, 1]), "node 1 has parent 1"),  # self loop
    (torch.tensor([-1, 2, 1]), "node 1 has parent 2"),  # forward reference / cycle 1 <-> 2
    (torch.tensor([-1, 0, 7]), "node 2 has parent 7"),  # out of range
    (torch.tensor([-1, 0, -1]), "node 2 has parent -1"),  # second root
    (torch.tensor([-1, -5]), "node 1 has parent -5"),
    (torch.tensor([], dtype=torch.int64), "at least the root"),
    (torch.tensor([-1.0, 0.0]), "parents must be Long"),
    (torch.tensor([-1, 0], dtype=torch.int32), "parents must be Long"),
    (torch.tensor([[-1, 0]]), "must have 1 dimensions"),
]


@pytest.mark.parametrize("parents,message", BAD_TREES)
def test_tree_build_rejects_malformed_tree(device, parents, message):
    with pytest.raises(RuntimeError, match=message):
        ops.tree_build(parents.to(device), 0)


def test_tree_build_rejects_bad_arguments(device):
    parents = torch.tensor([-1, 0], device=device)
    with pytest.raises(RuntimeError, match="prefix_len must be >= 0"):
        ops.tree_build(parents, -1)
    with pytest.raises(RuntimeError, match="floating type"):
        ops.tree_build(parents, 0, torch.int64)
    # Float8 / Float4 pass at::isFloatingType, but no kernel writes them: refused before any launch.
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float4_e2m1fn_x2):
        with pytest.raises(RuntimeError, match="dtype must be a floating type"):
            ops.tree_build(parents, 0, dtype)


# ---------------------------------------------------------------- tree_verify_greedy


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_verify_greedy_matches_reference(n, shape, dtype):
    accepted = []
    for rep in range(4):
        logits, tokens, parents = greedy_inputs(n, VOCAB, shape, dtype, seed_of(n, shape, dtype, rep))
        path, result = ops.tree_verify_greedy(logits, tokens, parents)
        ref_path, ref_result = reference_verify_greedy(logits, tokens, parents)
        assert equal_outputs((path, result), (ref_path, ref_result))
        accepted.append(int(result[0]))
    if n > 1 and shape == "chain":
        assert max(accepted) > 1  # the forced paths are actually accepted


def test_verify_greedy_ties_take_lowest_index():
    logits = torch.randint(0, 3, (40, VOCAB), generator=gen(1)).to(torch.float16)  # many ties per row
    parents = random_tree(40, gen(2), "random")
    tokens = distinct_sibling_tokens(parents, VOCAB, gen(3))
    assert equal_outputs(ops.tree_verify_greedy(logits, tokens, parents),
                         reference_verify_greedy(logits, tokens, parents))
    row = torch.zeros(1, VOCAB)
    row[0, [5, 9]] = 1.0
    assert ops.tree_verify_greedy(row, torch.tensor([0]), torch.tensor([-1]))[1].tolist() == [1, 5]


def test_verify_greedy_duplicate_siblings_take_first_child():
    # children 1 and 2 both carry the target's token 4; only node 2 has a matching child (3),
    # but the contract follows the first matching child.
    logits = torch.zeros(4, 8)
    logits[0, 4] = logits[1, 6] = logits[2, 5] = logits[3, 1] = 1.0
    path, result = ops.tree_verify_greedy(logits, torch.tensor([0, 4, 4, 5]), torch.tensor([-1, 0, 0, 2]))
    assert path.tolist() == [0, 1, -1, -1] and result.tolist() == [2, 6]


def test_verify_greedy_nan_counts_as_minus_inf():
    logits = torch.tensor([[float("nan"), 1.0, 3.0, float("nan")]])
    assert ops.tree_verify_greedy(logits, torch.tensor([0]), torch.tensor([-1]))[1].tolist() == [1, 2]


def verify_args(n=3, vocab=5):
    return torch.zeros(n, vocab), torch.zeros(n, dtype=torch.int64), torch.tensor([-1] + [0] * (n - 1))


BAD_VERIFY = [  # (mutation, message, whether the error is in the data: the CUDA ops return a sentinel then)
    (lambda s, t, p: (s, torch.tensor([0, 5, 0]), p), "tokens\\[1\\] = 5 is outside the vocabulary \\[0, 5\\)", True),
    (lambda s, t, p: (s, torch.tensor([0, 0, -1]), p), "tokens\\[2\\] = -1 is outside", True),
    (lambda s, t, p: (s, t, torch.tensor([-1, 2, 0])), "node 1 has parent 2", True),
    (lambda s, t, p: (s, t, torch.tensor([3, 0, 0])), "parents\\[0\\] must be -1", True),
    (lambda s, t, p: (s, t.int(), p), "tokens must be Long", False),
    (lambda s, t, p: (s, t, p.float()), "parents must be Long", False),
    (lambda s, t, p: (s, t[:2], p), "tokens and parents must have 3 entries", False),
    (lambda s, t, p: (s[0], t, p), "must have shape \\[N, V\\]", False),
    (lambda s, t, p: (s.double(), t, p), "float32, float16 or bfloat16", False),
    (lambda s, t, p: (s.long(), t, p), "float32, float16 or bfloat16", False),
    (lambda s, t, p: (s.to(torch.float8_e4m3fn), t, p), "float32, float16 or bfloat16", False),
    (lambda s, t, p: (s[:, :0], t, p), "V >= 1", False),
]


@pytest.mark.parametrize("mutate,message,data_error", BAD_VERIFY)
def test_verify_rejects_bad_input(device, mutate, message, data_error):
    """Argument errors raise on every device. Data errors (tree, token range) raise on the CPU; on
    CUDA, where the kernels cannot raise without a host sync, they give the sentinel result."""
    scores, tokens, parents = mutate(*verify_args())
    for op, args in verify_ops_on(device, ops.tree_verify_greedy, ops.tree_verify_sample, scores, tokens, parents,
                                  torch.rand(tokens.numel() + 1)):
        if data_error and device == "cuda":
            path, result = op(*args)
            assert result.tolist() == [0, -1] and (path == -1).all()
        else:
            with pytest.raises(RuntimeError, match=message):
                op(*args)


@pytest.mark.parametrize("n,vocab", [(1500, VOCAB), (16, 262144)], ids=["1500_nodes", "V_256k"])
def test_verify_large(device, n, vocab):
    """Over 1,024 nodes (the kernels' strided loops over nodes run twice) and V = 256k
    (256 tokens per sum chunk); on CUDA against the CPU op, on the CPU against the reference."""
    g = gen(seed_of("verify-large", n, vocab))
    logits, tokens, parents = greedy_inputs(n, vocab, "wide", torch.bfloat16, seed_of("greedy", n, vocab))
    want = (reference_verify_greedy if device == "cpu" else ops.tree_verify_greedy)(logits, tokens, parents)
    got = ops.tree_verify_greedy(logits.to(device), tokens.to(device), parents.to(device))
    assert want[1][0] >= 2 and equal_outputs(got, want)
    probs, tokens, parents, _ = sample_inputs(n, vocab, "wide", torch.bfloat16, seed_of("sample", n, vocab))
    for _ in range(3):
        u = torch.rand(n + 1, generator=g)
        want = (reference_verify_sample if device == "cpu" else ops.tree_verify_sample)(probs, tokens, parents, u)
        got = ops.tree_verify_sample(*[t.to(device) for t in (probs, tokens, parents, u)])
        assert equal_outputs(got, want)


def test_verify_non_contiguous_inputs(device):
    """Column-major scores and every-other-element tokens / parents / uniforms give the results
    of their contiguous copies."""
    logits, tokens, parents = greedy_inputs(40, VOCAB, "random", torch.float16, 3)
    probs = logits.float().softmax(-1)
    u = torch.rand(41, generator=gen(3))
    args = [t.to(device) for t in (logits, probs, tokens, parents, u)]
    odd = [layout(t, "transposed") for t in args[:2]] + [layout(t, "strided") for t in args[2:]]
    assert not any(t.is_contiguous() for t in odd)
    for got, want in [(ops.tree_verify_greedy(odd[0], *odd[2:4]), ops.tree_verify_greedy(args[0], *args[2:4])),
                      (ops.tree_verify_sample(*odd[1:]), ops.tree_verify_sample(*args[1:]))]:
        assert want[1][0] >= 1 and equal_outputs(got, want)


# ---------------------------------------------------------------- tree_verify_sample


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_verify_sample_matches_reference(n, shape, dtype):
    for rep in range(4):
        probs, tokens, parents, uniforms = sample_inputs(n, VOCAB, shape, dtype, seed_of(n, shape, dtype, rep))
        path, result = ops.tree_verify_sample(probs, tokens, parents, uniforms)
        ref_path, ref_result = reference_verify_sample(probs, tokens, parents, uniforms)
        assert equal_outputs((path, result), (ref_path, ref_result))


@pytest.mark.parametrize("shape", SHAPES)
def test_verify_sample_one_hot_target_equals_greedy(shape):
    """A one-hot target leaves nothing to chance: the output is the target's tokens."""
    g = gen(11)
    logits, tokens, parents = greedy_inputs(60, VOCAB, shape, torch.float32, 5)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float()
    expected = ops.tree_verify_greedy(logits, tokens, parents)
    for _ in range(20):
        got = ops.tree_verify_sample(one_hot, tokens, parents, torch.rand(61, generator=g))
        assert equal_outputs(got, expected)


def test_verify_sample_invariants():
    g = gen(21)
    probs, tokens, parents, _ = sample_inputs(99, VOCAB, "wide", torch.float32, 21)
    for _ in range(200):
        path, result = ops.tree_verify_sample(probs, tokens, parents, torch.rand(100, generator=g))
        count, next_token = result.tolist()
        assert 1 <= count <= 99 and path[0] == 0 and (path[count:] == -1).all()
        for k in range(1, count):  # a root-to-node chain
            assert parents[path[k]] == path[k - 1]
        last = int(path[count - 1])
        assert probs[last, next_token] > 0  # drawn where the target has mass
        rejected = tokens[(parents == last).nonzero().flatten()]
        assert next_token not in rejected.tolist()  # rejected drafts leave the residual


def test_verify_sample_edge_weights():
    parents, tokens = torch.tensor([-1, 0]), torch.tensor([0, 2])
    zero_row = torch.zeros(2, 4)
    path, result = ops.tree_verify_sample(zero_row, tokens, parents, torch.tensor([0.0, 0.0, 0.5]))
    assert result.tolist() == [1, 0]  # all-zero weights: argmax with the lowest index
    weird = torch.tensor([[float("nan"), -3.0, 0.0, 2.0], [0.0, 1.0, 0.0, 0.0]])
    for u in torch.linspace(0, 0.999, 7):
        path, result = ops.tree_verify_sample(weird, torch.tensor([0, 1]), parents, torch.tensor([0.0, u, u]))
        assert result.tolist() == [1, 3]  # NaN / negative weights count as zero, token 1 has none


@pytest.mark.parametrize("uniforms,message", [
    (torch.rand(3), "uniforms must have N \\+ 1 = 4 entries"),
    (torch.rand(4).double(), "uniforms must be Float"),
    (torch.rand(2, 2), "uniforms must have 1 dimensions"),
])
def test_verify_sample_rejects_bad_uniforms(uniforms, message):
    with pytest.raises(RuntimeError, match=message):
        ops.tree_verify_sample(*verify_args(), uniforms)


# Distribution test: helpers.markov_case, a Markov "target" over a small vocabulary.


def emitted_prefixes(probs, tokens, parents, q, uniforms, extra):
    """(t1, t2) per draw; when only one token is emitted, t2 is drawn from q(. | t1)."""
    pairs = []
    for u, e in zip(uniforms, extra):
        path, result = ops.tree_verify_sample(probs, tokens, parents, u)
        count, next_token = result.tolist()
        emitted = tokens[path[1:count]].tolist() + [next_token]
        if len(emitted) == 1:
            emitted.append(int(torch.searchsorted(q[emitted[0]].cumsum(0), e.unsqueeze(0)).clamp(max=SMALL_V - 1)))
        pairs.append(emitted[:2])
    return torch.tensor(pairs)


def test_verify_sample_preserves_target_distribution():
    q, probs, tokens, parents = markov_case()
    draws = 20000
    g = gen(1234)
    uniforms = torch.rand(draws, tokens.numel() + 1, generator=g)
    pairs = emitted_prefixes(probs, tokens, parents, q, uniforms, torch.rand(draws, generator=g))
    root = int(tokens[0])
    first_counts = torch.bincount(pairs[:, 0], minlength=SMALL_V).double()
    assert chi_square_passes(first_counts, q[root].double())
    joint_counts = torch.bincount(pairs[:, 0] * SMALL_V + pairs[:, 1], minlength=SMALL_V**2).double()
    joint_p = (q[root].unsqueeze(1) * q).flatten().double()
    assert chi_square_passes(joint_counts, joint_p)
    # the same test rejects a biased sampler: squaring the uniforms favours acceptance
    biased = emitted_prefixes(probs, tokens, parents, q, uniforms[:5000] ** 2, torch.rand(5000, generator=g))
    assert not chi_square_passes(torch.bincount(biased[:, 0], minlength=SMALL_V).double(), q[root].double())


# ---------------------------------------------------------------- kv_compact_


def cropped_caches(layers: int, dtype: torch.dtype, g: torch.Generator):
    """[B, H, S, D] views into bigger buffers: a sequence crop of a [B, S, H, D] layout, i.e.
    neither contiguous nor starting at the buffer's origin."""
    bases = [torch.randn(2, 50, 3, 9, generator=g).to(dtype) for _ in range(layers)]
    views = [b.permute(0, 2, 1, 3)[:, :, 4:45, 1:8] for b in bases]
    return bases, views


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dst_start", [0, 1, 17])
def test_kv_compact_matches_reference(dtype, dst_start):
    g = gen(seed_of(dtype, dst_start))
    for length in [1, 2, 7, 20]:
        path = random_path(length, 41 - dst_start, g)
        bases, views = cropped_caches(3, dtype, g)
        ref_bases = [b.clone() for b in bases]
        ref_views = [b.permute(0, 2, 1, 3)[:, :, 4:45, 1:8] for b in ref_bases]
        assert not views[0].is_contiguous()
        ops.kv_compact_(views, path, dst_start)
        reference_kv_compact_(ref_views, path, dst_start)
        assert equal_outputs(bases, ref_bases)  # also checks nothing outside the views moved


def test_kv_compact_aliasing_path():
    kv = torch.arange(8.0).view(1, 1, 8, 1).repeat(2, 3, 1, 4)
    ops.kv_compact_([kv], torch.tensor([0, 2, 5]), 1)
    assert kv[1, 2, :, 3].tolist() == [0, 1, 3, 6, 4, 5, 6, 7]


def test_kv_compact_several_shapes_one_call():
    g = gen(8)
    kv = [torch.randn(1, 2, 12, 4, generator=g), torch.randn(2, 1, 9, 3, generator=g)]
    want = [t.clone() for t in kv]
    path = torch.tensor([0, 1, 4, 6])
    ops.kv_compact_(kv, path, 2)
    reference_kv_compact_(want, path, 2)
    assert equal_outputs(kv, want)


def test_kv_compact_disjoint_views_of_one_buffer(device):
    """Keys and values stored as two halves of one buffer do not share memory: accepted."""
    buf = torch.randn(2, 1, 2, 10, 4, generator=gen(9)).to(device)
    want = buf.cpu().clone()
    path = torch.tensor([0, 3, 4])
    ops.kv_compact_([buf[0], buf[1]], path.to(device), 1)
    reference_kv_compact_([want[0], want[1]], path, 1)
    assert torch.equal(buf.cpu(), want)


def test_kv_compact_checks_path_with_nothing_to_move(device):
    """No tensor (or none with a column) to move: the path is still checked, on CUDA too."""
    for kv in ([], [torch.empty(1, 0, 10, 4, device=device)]):
        with pytest.raises(RuntimeError, match="path\\[0\\] must be 0"):
            ops.kv_compact_(kv, torch.tensor([1, 2], device=device), 0)
        with pytest.raises(RuntimeError, match="strictly increasing"):
            ops.kv_compact_(kv, torch.tensor([0, 2, 2], device=device), 0)
        ops.kv_compact_(kv, torch.tensor([0, 2], device=device), 0)
    with pytest.raises(RuntimeError, match="is outside kv\\[0\\]'s sequence length 10"):
        ops.kv_compact_([torch.empty(1, 0, 10, 4, device=device)], torch.tensor([0, 10], device=device), 0)


def test_kv_compact_large(device):
    """Thousands of positions (a 1,100-entry path into a 6,000-slot cache at dst_start 3,000), and a
    tensor of 280,000 columns: more than one CUDA launch covers (1,024 blocks x 256 threads)."""
    g = gen(31)
    cases = [(torch.randn(1, 3, 6000, 64, generator=g), random_path(1100, 3000, g), 3000),
             (torch.randn(1, 2, 6, 140000, generator=g).half(), torch.tensor([0, 2, 5]), 0)]
    for kv, path, dst_start in cases:
        want = kv.clone()
        reference_kv_compact_([want], path, dst_start)
        got = kv.to(device)
        ops.kv_compact_([got], path.to(device), dst_start)
        assert torch.equal(got.cpu(), want)


BAD_KV = [
    (lambda kv, p: (kv, torch.tensor([1, 2])), 0, "path\\[0\\] must be 0"),
    (lambda kv, p: (kv, torch.tensor([0, 3, 3])), 0, "strictly increasing"),
    (lambda kv, p: (kv, torch.tensor([0, 2, 1])), 0, "strictly increasing"),
    (lambda kv, p: (kv, torch.tensor([0, 10])), 0, "dst_start \\+ path\\[-1\\] = 10 is outside kv\\[0\\]"),
    (lambda kv, p: (kv, torch.tensor([0, 4])), 6, "dst_start \\+ path\\[-1\\] = 10 is outside"),
    (lambda kv, p: (kv, p), -1, "dst_start must be >= 0"),
    (lambda kv, p: (kv, p.int()), 0, "path must be Long"),
    (lambda kv, p: (kv, p[:0]), 0, "at least the root"),
    (lambda kv, p: (kv, p.view(1, -1)), 0, "path must have 1 dimensions"),
    (lambda kv, p: ([kv[0], kv[1][0]], p), 0, "kv\\[1\\] must have shape \\[B, H, S, D\\]"),
    (lambda kv, p: ([kv[0], kv[1].half()], p), 0, "one dtype"),
    (lambda kv, p: ([kv[0].long()], p), 0, "float32, float16 or bfloat16"),
    (lambda kv, p: ([kv[0].to(torch.float8_e5m2)], p), 0, "float32, float16 or bfloat16"),
    (lambda kv, p: ([kv[0], kv[1], kv[0]], p), 0, "kv\\[0\\] and kv\\[2\\] share memory"),
    (lambda kv, p: ([kv[0][:, :, :6], kv[0][:, :, 4:]], p), 0, "kv\\[0\\] and kv\\[1\\] share memory"),
    (lambda kv, p: ([kv[0][:, :, :1].expand(1, 2, 10, 4)], p), 0, "kv\\[0\\] has elements sharing memory"),
]


@pytest.mark.parametrize("mutate,dst_start,message", BAD_KV)
def test_kv_compact_rejects_bad_input(mutate, dst_start, message):
    kv = [torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)]
    before = [t.clone() for t in kv]
    args = mutate(kv, torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match=message):
        ops.kv_compact_(*args, dst_start)
    assert all(torch.equal(a, b) for a, b in zip(kv, before))  # validation happens before any write


def test_op_schemas():
    """Schemas, autograd registration and the fake (meta) implementations of ops.py (opcheck's
    default checks: FakeTensor outputs match the real ones, AOT dispatch with dynamic shapes)."""
    parents = torch.tensor([-1, 0, 0, 1])
    logits, tokens, _ = greedy_inputs(4, VOCAB, "random", torch.float32, 0)
    torch.library.opcheck(torch.ops.falcon_ext.tree_build, (parents, 3, torch.float16))
    torch.library.opcheck(torch.ops.falcon_ext.tree_verify_greedy, (logits, tokens, parents))
    torch.library.opcheck(torch.ops.falcon_ext.tree_verify_sample, (logits.softmax(-1), tokens, parents, torch.rand(5)))
    torch.library.opcheck(torch.ops.falcon_ext.kv_compact_, ([torch.randn(1, 2, 6, 3)], torch.tensor([0, 2]), 1))



# ---------------------------------------------------------------- CUDA == CPU


def on_cuda(*tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.cuda
@pytest.mark.parametrize("n", SIZES + [300])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_tree_build_equals_cpu(n, shape):
    parents = random_tree(n, gen(seed_of("cuda", n, shape)), shape)
    for prefix_len in [0, 1, 37, 1500]:
        for dtype in FLOAT_DTYPES:
            want = ops.tree_build(parents, prefix_len, dtype)
            got = ops.tree_build(parents.cuda(), prefix_len, dtype)
            assert equal_outputs(got, want, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("vocab", [VOCAB, 5000])
def test_cuda_verify_equals_cpu(n, shape, dtype, vocab):
    g = gen(seed_of("cuda-verify", n, shape, dtype, vocab))
    for rep in range(3):
        logits, tokens, parents = greedy_inputs(n, vocab, shape, dtype, seed_of(n, shape, dtype, vocab, rep))
        want = ops.tree_verify_greedy(logits, tokens, parents)
        got = ops.tree_verify_greedy(*on_cuda(logits, tokens, parents))
        assert equal_outputs(got, want)
        probs, tokens, parents, _ = sample_inputs(n, vocab, shape, dtype, seed_of(n, shape, dtype, vocab, rep))
        for _ in range(5):
            uniforms = torch.rand(n + 1, generator=g)
            want = ops.tree_verify_sample(probs, tokens, parents, uniforms)
            got = ops.tree_verify_sample(*on_cuda(probs, tokens, parents, uniforms))
            assert equal_outputs(got, want)


@pytest.mark.cuda
def test_cuda_verify_edge_cases_equal_cpu():
    cases = [  # ties, NaN, all-zero and negative weights, one-hot rows
        (torch.randint(0, 3, (40, VOCAB), generator=gen(1)).float(), random_tree(40, gen(2), "random")),
        (torch.tensor([[float("nan"), 1.0, 3.0, float("nan")], [0.0, 0.0, -1.0, 0.0]]), torch.tensor([-1, 0])),
        (torch.zeros(3, 7), torch.tensor([-1, 0, 0])),
        (torch.nn.functional.one_hot(torch.tensor([3, 1, 4]), 9).float(), torch.tensor([-1, 0, 1])),
    ]
    g = gen(4)
    for scores, parents in cases:
        tokens = torch.randint(0, scores.shape[1], (parents.numel(),), generator=g)
        tokens[1:] = scores[parents[1:]].nan_to_num(-1).argmax(-1)  # duplicates among siblings too
        for dtype in FLOAT_DTYPES:
            s = scores.to(dtype)
            want = ops.tree_verify_greedy(s, tokens, parents)
            got = ops.tree_verify_greedy(*on_cuda(s, tokens, parents))
            assert equal_outputs(got, want)
            for _ in range(10):
                u = torch.rand(parents.numel() + 1, generator=g)
                want = ops.tree_verify_sample(s, tokens, parents, u)
                got = ops.tree_verify_sample(*on_cuda(s, tokens, parents, u))
                assert equal_outputs(got, want)


@pytest.mark.cuda
def test_cuda_verify_large_vocab_equals_cpu():
    g = gen(77)
    parents = random_tree(60, g, "wide")
    tokens = distinct_sibling_tokens(parents, 128256, g)
    for dtype in [torch.float16, torch.bfloat16]:
        logits = (3 * torch.randn(60, 128256, generator=g)).to(dtype)
        tokens[1] = logits[0].float().argmax()
        probs = torch.softmax(logits.float(), dim=-1).to(dtype)
        want = ops.tree_verify_greedy(logits, tokens, parents)
        got = ops.tree_verify_greedy(*on_cuda(logits, tokens, parents))
        assert want[1][0] >= 2 and equal_outputs(got, want)
        for _ in range(5):
            u = torch.rand(61, generator=g)
            want = ops.tree_verify_sample(probs, tokens, parents, u)
            got = ops.tree_verify_sample(*on_cuda(probs, tokens, parents, u))
            assert equal_outputs(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_kv_compact_equals_cpu(dtype):
    g = gen(seed_of("cuda-kv", dtype))
    for dst_start, length in [(0, 1), (0, 7), (13, 20), (30, 11)]:
        path = random_path(length, 41 - dst_start, g)
        bases, views = cropped_caches(40, dtype, g)  # more tensors than one launch takes
        cuda_bases = [b.cuda() for b in bases]
        cuda_views = [b.permute(0, 2, 1, 3)[:, :, 4:45, 1:8] for b in cuda_bases]
        ops.kv_compact_(views, path, dst_start)
        ops.kv_compact_(cuda_views, path.cuda(), dst_start)
        assert equal_outputs(cuda_bases, bases)


@pytest.mark.cuda
def test_cuda_kv_compact_bad_input():
    kv = [torch.randn(1, 2, 10, 4, device="cuda")]
    with pytest.raises(RuntimeError, match="same device"):
        ops.kv_compact_(kv, torch.tensor([0, 2]), 0)  # path left on the CPU
    before = kv[0].clone()
    for bad in ([1, 2], [0, 3, 3], [0, 10]):  # checked in the kernel: nothing is written
        ops.kv_compact_(kv, torch.tensor(bad, device="cuda"), 0)
        assert torch.equal(kv[0], before)


@pytest.mark.cuda
def test_cuda_every_op_runs_on_the_current_stream():
    """Every op inside a non-default stream: its inputs are written on that stream only after a
    long GPU sleep, so an op that launched on another stream would read the stale inputs (or
    have its KV moves overwritten) and give a different answer."""
    parents = random_tree(99, gen(41), "wide")
    logits, tokens, _ = greedy_inputs(99, VOCAB, "wide", torch.float32, 41)
    probs, u = logits.softmax(-1), torch.rand(100, generator=gen(42))
    kv = torch.randn(1, 2, 40, 8, generator=gen(43))
    path = torch.tensor([0, 3, 7, 20])
    [(ref, _, draft_args)] = draft_step_cases("cpu", torch.float32, [(64, 128, 4, 3, 2, 50, 4)])
    fresh = [parents, logits, probs, tokens, u, kv, draft_args[0]]
    stale = [torch.arange(-1, 98), torch.zeros_like(logits), torch.ones_like(probs), torch.zeros_like(tokens),
             torch.zeros_like(u), torch.zeros_like(kv), torch.zeros_like(draft_args[0])]
    d_fresh = [t.cuda() for t in fresh]
    d_in = [t.cuda() for t in stale]
    d_draft = [t.cuda() for t in draft_args[1:7]], [w.cuda() for w in draft_args[7]]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for dst, src in zip(d_in, d_fresh):
            dst.copy_(src)
        d_parents, d_logits, d_probs, d_tokens, d_u, d_kv, d_x = d_in
        built = ops.tree_build(d_parents, 5)
        greedy = ops.tree_verify_greedy(d_logits, d_tokens, d_parents)
        sampled = ops.tree_verify_sample(d_probs, d_tokens, d_parents, d_u)
        ops.kv_compact_([d_kv], path.cuda(), 2)
        step = ops.falcon_draft_step(d_x, *d_draft[0], d_draft[1], ref.heads, ref.eps)
    side.synchronize()
    assert equal_outputs(built, ops.tree_build(parents, 5))
    assert equal_outputs(greedy, ops.tree_verify_greedy(logits, tokens, parents))
    assert equal_outputs(sampled, ops.tree_verify_sample(probs, tokens, parents, u))
    ops.kv_compact_([kv], path, 2)
    assert torch.equal(d_kv.cpu(), kv)
    with torch.no_grad():
        want = ops.falcon_draft_step(*draft_args, ref.heads, ref.eps)
    for g, w in zip(step, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-4 * max(1.0, w.abs().max().item()))
