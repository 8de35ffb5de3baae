"""Tree ops: CPU op == plain-PyTorch reference (falcon_ext.testing), CUDA op == CPU op, bad input raises."""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from falcon_ext import ops
from falcon_ext.testing import (
    distinct_sibling_tokens,
    random_tree,
    reference_kv_compact_,
    reference_tree_build,
    reference_verify_greedy,
    reference_verify_sample,
)

VOCAB = 111
SIZES = [1, 7, 99]
SHAPES = ["random", "chain", "star", "wide"]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("falcon_ext::tree_build", "CUDA")
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the CUDA build of falcon_ext")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seed_of(*parts) -> int:
    """A fixed seed per test case (str hashes vary between processes; crc32 does not)."""
    return zlib.crc32(repr(parts).encode())


def greedy_case(n: int, shape: str, dtype: torch.dtype, seed: int):
    """Logits that accept a random-length prefix of a random root-to-leaf path."""
    g = gen(seed)
    parents = random_tree(n, g, shape)
    tokens = distinct_sibling_tokens(parents, VOCAB, g)
    logits = torch.randn(n, VOCAB, generator=g)
    node = int(torch.randint(0, n, (1,), generator=g))
    chain = [node]
    while chain[-1] > 0:
        chain.append(int(parents[chain[-1]]))
    for child, parent in zip(chain[:-1], chain[1:]):  # the target's argmax at parent = child's token
        logits[parent, tokens[child]] = logits[parent].max() + 1.0
    return logits.to(dtype), tokens, parents


def sample_case(n: int, shape: str, dtype: torch.dtype, seed: int):
    """Target weights with some exact zeros; drafts mostly drawn from the target (realistic acceptance)."""
    g = gen(seed)
    parents = random_tree(n, g, shape)
    probs = torch.softmax(5 * torch.randn(n, VOCAB, generator=g), dim=-1)
    probs[torch.rand(n, VOCAB, generator=g) < 0.2] = 0
    tokens = distinct_sibling_tokens(parents, VOCAB, g)
    for node in range(n):  # a node's first child drafts the target's favourite token
        children = (parents == node).nonzero().flatten()
        if len(children):
            favourite = probs[node].argmax()
            tokens[children[tokens[children] == favourite]] = int(tokens[children[0]])  # keep siblings distinct
            tokens[children[0]] = favourite
    uniforms = torch.rand(n + 1, generator=g)
    return probs.to(dtype), tokens, parents, uniforms


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
        assert torch.equal(mask, ref_mask)
        assert torch.equal(pos, ref_pos)
        assert torch.equal(paths, ref_paths)


def test_tree_build_small_example():
    mask, pos, paths = ops.tree_build(torch.tensor([-1, 0, 0, 1]), 2)
    inf = float("-inf")
    assert torch.equal(mask, torch.tensor([[0, 0, 0, inf, inf, inf],
                                           [0, 0, 0, 0, inf, inf],
                                           [0, 0, 0, inf, 0, inf],
                                           [0, 0, 0, 0, inf, 0]]))
    assert pos.tolist() == [2, 3, 3, 4]
    assert paths.tolist() == [[0, 2, -1], [0, 1, 3]]  # leaves 2 and 3 in index order


def test_tree_build_non_contiguous_parents():
    parents = torch.tensor([[-1, 9], [0, 9], [1, 9], [0, 9]]).t()[0]
    assert not parents.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(ops.tree_build(parents, 3), reference_tree_build(parents, 3)))


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
def test_tree_build_rejects_malformed_tree(parents, message):
    with pytest.raises(RuntimeError, match=message):
        ops.tree_build(parents, 0)


def test_tree_build_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="prefix_len must be >= 0"):
        ops.tree_build(torch.tensor([-1, 0]), -1)
    with pytest.raises(RuntimeError, match="floating type"):
        ops.tree_build(torch.tensor([-1, 0]), 0, torch.int64)


# ---------------------------------------------------------------- tree_verify_greedy


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_verify_greedy_matches_reference(n, shape, dtype):
    accepted = []
    for rep in range(4):
        logits, tokens, parents = greedy_case(n, shape, dtype, seed_of(n, shape, dtype, rep))
        path, result = ops.tree_verify_greedy(logits, tokens, parents)
        ref_path, ref_result = reference_verify_greedy(logits, tokens, parents)
        assert torch.equal(path, ref_path) and torch.equal(result, ref_result)
        accepted.append(int(result[0]))
    if n > 1 and shape == "chain":
        assert max(accepted) > 1  # the forced paths are actually accepted


def test_verify_greedy_ties_take_lowest_index():
    logits = torch.randint(0, 3, (40, VOCAB), generator=gen(1)).to(torch.float16)  # many ties per row
    parents = random_tree(40, gen(2), "random")
    tokens = distinct_sibling_tokens(parents, VOCAB, gen(3))
    assert all(torch.equal(a, b) for a, b in zip(ops.tree_verify_greedy(logits, tokens, parents),
                                                 reference_verify_greedy(logits, tokens, parents)))
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


BAD_VERIFY = [
    (lambda s, t, p: (s, torch.tensor([0, 5, 0]), p), "tokens\\[1\\] = 5 is outside the vocabulary \\[0, 5\\)"),
    (lambda s, t, p: (s, torch.tensor([0, 0, -1]), p), "tokens\\[2\\] = -1 is outside"),
    (lambda s, t, p: (s, t, torch.tensor([-1, 2, 0])), "node 1 has parent 2"),
    (lambda s, t, p: (s, t, torch.tensor([3, 0, 0])), "parents\\[0\\] must be -1"),
    (lambda s, t, p: (s, t.int(), p), "tokens must be Long"),
    (lambda s, t, p: (s, t, p.float()), "parents must be Long"),
    (lambda s, t, p: (s, t[:2], p), "tokens and parents must have 3 entries"),
    (lambda s, t, p: (s[0], t, p), "must have shape \\[N, V\\]"),
    (lambda s, t, p: (s.double(), t, p), "float32, float16 or bfloat16"),
    (lambda s, t, p: (s.long(), t, p), "float32, float16 or bfloat16"),
    (lambda s, t, p: (s[:, :0], t, p), "V >= 1"),
]


@pytest.mark.parametrize("mutate,message", BAD_VERIFY)
def test_verify_rejects_bad_input(mutate, message):
    scores, tokens, parents = mutate(*verify_args())
    with pytest.raises(RuntimeError, match=message):
        ops.tree_verify_greedy(scores, tokens, parents)
    with pytest.raises(RuntimeError, match=message.replace("logits", "probs")):
        ops.tree_verify_sample(scores, tokens, parents, torch.rand(tokens.numel() + 1))


# ---------------------------------------------------------------- tree_verify_sample


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_verify_sample_matches_reference(n, shape, dtype):
    for rep in range(4):
        probs, tokens, parents, uniforms = sample_case(n, shape, dtype, seed_of(n, shape, dtype, rep))
        path, result = ops.tree_verify_sample(probs, tokens, parents, uniforms)
        ref_path, ref_result = reference_verify_sample(probs, tokens, parents, uniforms)
        assert torch.equal(path, ref_path) and torch.equal(result, ref_result)


@pytest.mark.parametrize("shape", SHAPES)
def test_verify_sample_one_hot_target_equals_greedy(shape):
    """A one-hot target leaves nothing to chance: the output is the target's tokens."""
    g = gen(11)
    logits, tokens, parents = greedy_case(60, shape, torch.float32, 5)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float()
    expected = ops.tree_verify_greedy(logits, tokens, parents)
    for _ in range(20):
        got = ops.tree_verify_sample(one_hot, tokens, parents, torch.rand(61, generator=g))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_verify_sample_invariants():
    g = gen(21)
    probs, tokens, parents, _ = sample_case(99, "wide", torch.float32, 21)
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


# Distribution test: a Markov "target" q(next | current token) over a small vocabulary. Node
# i's row is q(. | tokens[i]); a lossless sampler emits t1 ~ q(. | root) and t2 ~ q(. | t1).
SMALL_V = 6


def markov_case():
    q = torch.softmax(torch.randn(SMALL_V, SMALL_V, generator=gen(3)), dim=-1)
    q[:, 4] = 0  # a token the target never emits (one draft below proposes it)
    q = q / q.sum(-1, keepdim=True)
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4])
    tokens = torch.tensor([1, 2, 4, 0, 3, 2, 5, 1])
    return q, q[tokens], tokens, parents


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


def chi_square_passes(counts: torch.Tensor, expected_p: torch.Tensor) -> bool:
    """Pearson chi-square at significance 1e-3 (Wilson-Hilferty quantile; scipy is not needed).

    Cells the target gives zero probability must stay empty."""
    if (counts[expected_p == 0] > 0).any():
        return False
    keep = expected_p > 0
    expected = expected_p[keep] * counts.sum()
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    z = 3.0902  # standard normal 0.999 quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < critical


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


def random_path(length: int, span: int, g: torch.Generator) -> torch.Tensor:
    rest = torch.randperm(span - 1, generator=g)[: length - 1].sort().values + 1
    return torch.cat([torch.zeros(1, dtype=torch.int64), rest])


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
        for got, want in zip(bases, ref_bases):  # also checks nothing outside the views moved
            assert torch.equal(got, want)


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
    assert all(torch.equal(a, b) for a, b in zip(kv, want))


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
    parents = torch.tensor([-1, 0, 0, 1])
    logits, tokens, _ = greedy_case(4, "random", torch.float32, 0)
    checks = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.falcon_ext.tree_build, (parents, 3, torch.float16), test_utils=checks)
    torch.library.opcheck(torch.ops.falcon_ext.tree_verify_greedy, (logits, tokens, parents), test_utils=checks)
    torch.library.opcheck(torch.ops.falcon_ext.tree_verify_sample, (logits.softmax(-1), tokens, parents, torch.rand(5)),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.falcon_ext.kv_compact_, ([torch.randn(1, 2, 6, 3)], torch.tensor([0, 2]), 1),
                          test_utils=checks)
