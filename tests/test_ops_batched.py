"""Batched tree ops (B rows, each tree padded to the largest): the op == its plain-PyTorch
reference (falcon_ext.engine.references), each row == the batch-1 op on that row alone, padding never read,
bad input raises naming the row.

Sizes are odd on purpose: B = 1, 3, 7 rows, trees of up to 1, 7, 99 nodes (rows of random sizes,
one row always the largest), vocabulary 111. Padding slots of every input hold values that would
change the answer if an op read them (NaN scores, out-of-vocabulary tokens). Tests taking the
`device` fixture (conftest.py) also run on the GPU, marked `cuda`; there the exact comparison
with the reference is the CUDA == CPU check, since the CPU op equals the reference exactly.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from helpers import (
    FLOAT_DTYPES,
    SHAPES,
    SIZES,
    VOCAB,
    chi_square_passes,
    equal_outputs,
    gen,
    greedy_reference,
    markov_case,
    random_path,
    seed_of,
    verify_ops_on,
)

from falcon_ext import ops
from falcon_ext.engine.references import (
    greedy_inputs,
    pad_rows,
    random_tree,
    reference_kv_compact_batched_,
    reference_tree_build_batched,
    reference_verify_greedy_batched,
    reference_verify_sample_batched,
    sample_inputs,
    tree_sizes,
)

BATCHES = [1, 3, 7]
PAD_TOKEN = -7  # outside any vocabulary: a padding node's token is never checked nor read


def row_sizes(batch: int, largest: int, g: torch.Generator) -> list[int]:
    """Random node counts in [1, largest], one row (at a random place) exactly `largest`."""
    sizes = torch.randint(1, largest + 1, (batch,), generator=g).tolist()
    sizes[int(torch.randint(0, batch, (1,), generator=g))] = largest
    return sizes


def prefix_masks(batch: int, prefix_len: int, g: torch.Generator, dtype=torch.bool) -> torch.Tensor:
    """[batch, prefix_len] cache masks of the engine's layout: left padding, the row's tokens,
    then stale slots up to the common width (rows of any length, 0 included)."""
    mask = torch.zeros(batch, prefix_len, dtype=dtype)
    for b in range(batch):
        start, end = sorted(torch.randint(0, prefix_len + 1, (2,), generator=g).tolist())
        mask[b, start:end] = 1
    return mask


def batched_trees(batch: int, largest: int, shape: str, g: torch.Generator) -> torch.Tensor:
    return pad_rows([random_tree(n, g, shape) for n in row_sizes(batch, largest, g)], largest, -1)


def batched_verify_inputs(batch, largest, shape, dtype, seed, sample):
    """(scores [B, N, V], tokens [B, N], parents [B, N]) from references.greedy_inputs /
    sample_inputs per row (so that long paths get accepted), padded with NaN scores and
    PAD_TOKEN tokens."""
    g = gen(seed)
    rows = [(sample_inputs if sample else greedy_inputs)(n, VOCAB, shape, torch.float32, seed + b)[:3]
            for b, n in enumerate(row_sizes(batch, largest, g))]
    scores = pad_rows([r[0] for r in rows], largest, float("nan")).to(dtype)
    return scores, pad_rows([r[1] for r in rows], largest, PAD_TOKEN), pad_rows([r[2] for r in rows], largest, -1)


# ---------------------------------------------------------------- tree_build_batched


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("largest", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_tree_build_batched_matches_reference(device, batch, largest, shape):
    g = gen(seed_of("build-batched", batch, largest, shape))
    parents = batched_trees(batch, largest, shape, g)
    for prefix_len, mask_dtype in [(0, torch.bool), (1, torch.int64), (37, torch.bool)]:
        prefix = prefix_masks(batch, prefix_len, g, mask_dtype)
        for dtype in FLOAT_DTYPES + [torch.float64]:
            got = ops.tree_build_batched(parents.to(device), prefix.to(device), dtype)
            assert got[0].dtype == dtype and got[0].shape == (batch, largest, prefix_len + largest)
            assert equal_outputs(got, reference_tree_build_batched(parents, prefix, dtype), device)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES)
def test_tree_build_batched_rows_equal_batch1(batch, shape):
    """Row b, cut to its n_b nodes, is tree_build on the row alone after the row's visible prefix
    count; hidden prefix slots are the only difference."""
    g = gen(seed_of("build-rows", batch, shape))
    parents = batched_trees(batch, 99, shape, g)
    prefix = prefix_masks(batch, 20, g)
    mask, positions, paths = ops.tree_build_batched(parents, prefix, torch.float16)
    for b, n in enumerate(tree_sizes(parents)):
        seen = int(prefix[b].sum())
        alone_mask, alone_pos, alone_paths = ops.tree_build(parents[b, :n], seen, torch.float16)
        assert torch.equal(mask[b, :n, 20 : 20 + n], alone_mask[:, seen:])
        assert torch.equal(mask[b, :n, :20], torch.where(prefix[b], 0.0, float("-inf")).half().expand(n, 20))
        assert torch.equal(positions[b, :n], alone_pos)
        assert torch.equal(paths[b, : alone_paths.shape[0], : alone_paths.shape[1]], alone_paths)
        assert (paths[b, alone_paths.shape[0] :] == -1).all() and (paths[b, :, alone_paths.shape[1] :] == -1).all()


def test_tree_build_batched_small_example(device):
    # row 0: 0 -> {1, 2}, 1 -> {3}; row 1: the root and three padding nodes. Cache width 3: row 0
    # holds slots 1, 2 (slot 0 is prompt padding), row 1 only slot 0 (slots 1, 2 are stale).
    parents = torch.tensor([[-1, 0, 0, 1], [-1, -1, -1, -1]], device=device)
    prefix = torch.tensor([[0, 1, 1], [1, 0, 0]], device=device)
    mask, pos, paths = ops.tree_build_batched(parents, prefix)
    x = float("-inf")
    assert mask.tolist() == [[[x, 0, 0, 0, x, x, x],
                              [x, 0, 0, 0, 0, x, x],
                              [x, 0, 0, 0, x, 0, x],
                              [x, 0, 0, 0, 0, x, 0]],
                             [[0, x, x, 0, x, x, x],
                              [x, x, x, x, 0, x, x],  # padding nodes see only themselves
                              [x, x, x, x, x, 0, x],
                              [x, x, x, x, x, x, 0]]]
    assert pos.tolist() == [[2, 3, 3, 4], [1, 1, 1, 1]]
    assert paths.tolist() == [[[0, 2, -1], [0, 1, 3]], [[0, -1, -1], [-1, -1, -1]]]


BAD_BATCHED_TREES = [  # (parents [B, N], message): every device raises (the build op syncs once)
    (torch.tensor([[-1, 0], [0, 0]]), r"malformed tree in row 1: parents\[1, 0\] must be -1"),
    (torch.tensor([[-1, 0, -1, 1]]), r"row 0: node 3 has parent 1 after a padding node"),
    (torch.tensor([[-1, 0, 0], [-1, 2, 0]]), r"row 1: node 1 has parent 2; every non-root node"),
    (torch.tensor([[-1, 0, 0], [-1, 0, 7]]), r"row 1: node 2 has parent 7"),
    (torch.tensor([[-1, -5]]), r"row 0: node 1 has parent -5"),
    (torch.tensor([[-1, 0, -1, 2**63 - 1]]), r"row 0: node 3 has parent 9223372036854775807 after a padding node"),
]


@pytest.mark.parametrize("parents,message", BAD_BATCHED_TREES)
def test_tree_build_batched_rejects_malformed_tree(device, parents, message):
    with pytest.raises(RuntimeError, match=message):
        ops.tree_build_batched(parents.to(device), torch.ones(parents.shape[0], 2, dtype=torch.bool, device=device))


def test_tree_build_batched_rejects_bad_arguments(device):
    parents, prefix = torch.tensor([[-1, 0], [-1, -1]], device=device), torch.ones(2, 3, dtype=torch.bool,
                                                                                  device=device)
    cases = [
        ((parents[0], prefix), r"parents must have shape \[B, N\], got \[2\]"),
        ((parents.int(), prefix), r"parents must be Long, got Int"),
        ((parents[:, :0], prefix), r"B >= 1 rows of N >= 1 nodes"),
        ((parents[:0], prefix[:0]), r"B >= 1 rows of N >= 1 nodes"),
        ((parents, prefix[:1]), r"prefix_mask must have shape \[B = 2, P\], got \[1, 3\]"),
        ((parents, prefix[0]), r"prefix_mask must have shape \[B = 2, P\], got \[3\]"),
        ((parents, prefix.float()), r"prefix_mask must be Bool or Long"),
        ((parents, prefix.to("meta")), r"got parents on \S+ and prefix_mask on meta"),
        ((parents.tolist(), prefix), r"parents must be a torch.Tensor, got list"),
    ]
    for args, message in cases:
        with pytest.raises((RuntimeError, TypeError), match=message):
            ops.tree_build_batched(*args)
    for dtype in (torch.int64, torch.float8_e4m3fn):
        with pytest.raises(RuntimeError, match="dtype must be a floating type"):
            ops.tree_build_batched(parents, prefix, dtype)


# ---------------------------------------------------------------- tree_verify_*_batched


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("largest", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_verify_greedy_batched_matches_reference(device, batch, largest, shape, dtype):
    accepted = []
    for rep in range(2):
        logits, tokens, parents = batched_verify_inputs(batch, largest, shape, dtype,
                                                        seed_of("greedy-b", batch, largest, shape, dtype, rep), False)
        got = ops.tree_verify_greedy_batched(logits.to(device), tokens.to(device), parents.to(device))
        assert equal_outputs(got, reference_verify_greedy_batched(logits, tokens, parents), device)
        accepted += got[1][:, 0].tolist()
    if largest > 1 and shape == "chain":
        assert max(accepted) > 1  # the forced paths are actually accepted


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("largest", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_verify_sample_batched_matches_reference(device, batch, largest, shape, dtype):
    g = gen(seed_of("sample-b-u", batch, largest, shape, dtype))
    for rep in range(2):
        probs, tokens, parents = batched_verify_inputs(batch, largest, shape, dtype,
                                                       seed_of("sample-b", batch, largest, shape, dtype, rep), True)
        uniforms = torch.rand(batch, largest + 1, generator=g)
        uniforms[:, -1] = 2.0  # past every row's last draw unless the row is the largest: must be unused then
        for b, n in enumerate(tree_sizes(parents)):
            uniforms[b, n] = torch.rand(1, generator=g)
        got = ops.tree_verify_sample_batched(*[t.to(device) for t in (probs, tokens, parents, uniforms)])
        assert equal_outputs(got, reference_verify_sample_batched(probs, tokens, parents, uniforms), device)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES)
def test_verify_batched_rows_equal_batch1(batch, shape):
    """Row b of either batched op is the batch-1 op on the row's first n_b nodes."""
    g = gen(seed_of("verify-rows", batch, shape))
    logits, tokens, parents = batched_verify_inputs(batch, 99, shape, torch.bfloat16, seed_of("rows-g", batch, shape),
                                                    False)
    path, result = ops.tree_verify_greedy_batched(logits, tokens, parents)
    for b, n in enumerate(tree_sizes(parents)):
        alone = ops.tree_verify_greedy(logits[b, :n], tokens[b, :n], parents[b, :n])
        assert equal_outputs((path[b, :n], result[b]), alone) and (path[b, n:] == -1).all()
    probs, tokens, parents = batched_verify_inputs(batch, 99, shape, torch.float32, seed_of("rows-s", batch, shape),
                                                   True)
    for _ in range(5):
        uniforms = torch.rand(batch, 100, generator=g)
        path, result = ops.tree_verify_sample_batched(probs, tokens, parents, uniforms)
        for b, n in enumerate(tree_sizes(parents)):
            alone = ops.tree_verify_sample(probs[b, :n], tokens[b, :n], parents[b, :n], uniforms[b, : n + 1])
            assert equal_outputs((path[b, :n], result[b]), alone) and (path[b, n:] == -1).all()


def test_verify_batched_non_contiguous_inputs(device):
    logits, tokens, parents = batched_verify_inputs(3, 40, "random", torch.float16, 5, False)
    probs = logits.float().softmax(-1)
    u = torch.rand(3, 41, generator=gen(5))
    args = [t.to(device) for t in (logits, probs, tokens, parents, u)]
    odd = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in args]
    assert not any(t.is_contiguous() for t in odd)
    assert equal_outputs(ops.tree_verify_greedy_batched(odd[0], *odd[2:4]),
                         ops.tree_verify_greedy_batched(args[0], *args[2:4]), device)
    assert equal_outputs(ops.tree_verify_sample_batched(*odd[1:]), ops.tree_verify_sample_batched(*args[1:]), device)


def test_verify_sample_batched_preserves_target_distribution():
    """helpers.markov_case's Markov target in every row, padded to different widths: each row's
    first emitted token follows the target (chi-square at 1e-3)."""
    q, probs, tokens, parents = markov_case()
    n, width, batch, draws = tokens.numel(), tokens.numel() + 4, 3, 6000
    g = gen(99)
    rows_probs = pad_rows([probs] * batch, width, float("nan"))
    rows_tokens, rows_parents = pad_rows([tokens] * batch, width, PAD_TOKEN), pad_rows([parents] * batch, width, -1)
    firsts = [[] for _ in range(batch)]
    for _ in range(draws):
        uniforms = torch.rand(batch, width + 1, generator=g)
        path, result = ops.tree_verify_sample_batched(rows_probs, rows_tokens, rows_parents, uniforms)
        for b in range(batch):
            count = int(result[b, 0])
            firsts[b].append(int(tokens[path[b, 1]]) if count > 1 else int(result[b, 1]))
    root = int(tokens[0])
    for b in range(batch):
        counts = torch.bincount(torch.tensor(firsts[b]), minlength=q.shape[0]).double()
        assert chi_square_passes(counts, q[root].double())
    assert n < width  # the rows really are padded


def batched_verify_args(batch=2, n=3, vocab=5):
    return (torch.zeros(batch, n, vocab), torch.zeros(batch, n, dtype=torch.int64),
            torch.tensor([[-1] + [0] * (n - 1)] * batch))


def with_row(t, row, values):
    t = t.clone()
    t[row] = torch.tensor(values)
    return t


BAD_VERIFY_BATCHED = [  # (mutation, message, the row whose data is bad: CUDA gives it the sentinel; None: arguments)
    (lambda s, t, p: (s, with_row(t, 1, [0, 5, 0]), p), r"tokens\[1, 1\] = 5 is outside the vocabulary \[0, 5\)", 1),
    (lambda s, t, p: (s, with_row(t, 0, [0, 0, -1]), p), r"tokens\[0, 2\] = -1 is outside", 0),
    (lambda s, t, p: (s, t, with_row(p, 1, [-1, 2, 0])), r"malformed tree in row 1: node 1 has parent 2", 1),
    (lambda s, t, p: (s, t, with_row(p, 0, [3, 0, 0])), r"malformed tree in row 0: parents\[0, 0\] must be -1", 0),
    (lambda s, t, p: (s, t, with_row(p, 1, [-1, -1, 0])), r"row 1: node 2 has parent 0 after a padding node", 1),
    (lambda s, t, p: (s, t.int(), p), r"tokens must be Long", None),
    (lambda s, t, p: (s, t, p.float()), r"parents must be Long", None),
    (lambda s, t, p: (s, t[:, :2], p), r"tokens and parents must have shape \[B, N\] = \[2, 3\]", None),
    (lambda s, t, p: (s, t, p[:1]), r"tokens and parents must have shape \[B, N\] = \[2, 3\]", None),
    (lambda s, t, p: (s[0], t, p), r"must have shape \[B, N, V\]", None),
    (lambda s, t, p: (s.double(), t, p), r"float32, float16 or bfloat16", None),
    (lambda s, t, p: (s[:, :, :0], t, p), r"V >= 1", None),
    (lambda s, t, p: (s[:0], t[:0], p[:0]), r"B >= 1", None),
]


@pytest.mark.parametrize("mutate,message,bad_row", BAD_VERIFY_BATCHED)
def test_verify_batched_rejects_bad_input(device, mutate, message, bad_row):
    """Argument errors raise on every device. A data error raises naming its row on the CPU; on
    CUDA it gives its row the sentinel (0, -1), and the other rows their normal result."""
    scores, tokens, parents = mutate(*batched_verify_args())
    for op, args in verify_ops_on(device, ops.tree_verify_greedy_batched, ops.tree_verify_sample_batched, scores,
                                  tokens, parents, torch.rand(scores.shape[0], tokens.shape[1] + 1)):
        if bad_row is None or device == "cpu":
            with pytest.raises(RuntimeError, match=message):
                op(*args)
            continue
        path, result = op(*args)
        assert result[bad_row].tolist() == [0, -1] and (path[bad_row] == -1).all()
        good = 1 - bad_row
        alone = op(*[a[good : good + 1] for a in args])
        assert equal_outputs((path[good], result[good]), (alone[0][0], alone[1][0]))


@pytest.mark.parametrize("uniforms,message", [
    (torch.rand(2, 3), r"uniforms must have shape \[B, N \+ 1\] = \[2, 4\]"),
    (torch.rand(1, 4), r"uniforms must have shape \[B, N \+ 1\] = \[2, 4\]"),
    (torch.rand(8), r"uniforms must have shape \[B, N \+ 1\]"),
    (torch.rand(2, 4).double(), r"uniforms must be Float"),
])
def test_verify_sample_batched_rejects_bad_uniforms(uniforms, message):
    with pytest.raises(RuntimeError, match=message):
        ops.tree_verify_sample_batched(*batched_verify_args(), uniforms)


# ---------------------------------------------------------------- kv_compact_batched_


def batched_cache(batch, layers, dtype, g, seq=41):
    """Bases [B, seq + 9, H, D] and the [B, H, seq, D] views passed to the op (a sequence crop:
    neither contiguous nor at the buffer's origin)."""
    bases = [torch.randn(batch, seq + 9, 3, 9, generator=g).to(dtype) for _ in range(layers)]
    return bases, [b.permute(0, 2, 1, 3)[:, :, 4 : 4 + seq, 1:8] for b in bases]


def random_paths(batch, src_start, seq, g):
    """Paths [B, L] (-1 padded) into slots src_start.. of a seq-long cache, and dst_starts <= src_start."""
    span = seq - src_start
    rows = [random_path(int(torch.randint(1, span + 1, (1,), generator=g)), span, g) for _ in range(batch)]
    dst = torch.randint(0, src_start + 1, (batch,), generator=g).tolist()
    return pad_rows(rows, max(len(r) for r in rows), -1), dst


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("src_start", [0, 1, 17, 40])
def test_kv_compact_batched_matches_reference(device, batch, dtype, src_start):
    g = gen(seed_of("kv-b", batch, dtype, src_start))
    for _ in range(3):
        paths, dst = random_paths(batch, src_start, 41, g)
        bases, views = batched_cache(batch, 3, dtype, g)
        want = [b.clone() for b in bases]
        reference_kv_compact_batched_([w.permute(0, 2, 1, 3)[:, :, 4:45, 1:8] for w in want], paths, dst, src_start)
        got = [b.to(device) for b in bases]
        ops.kv_compact_batched_([b.permute(0, 2, 1, 3)[:, :, 4:45, 1:8] for b in got], paths.to(device), dst,
                                src_start)
        assert equal_outputs(got, want)  # whole buffers: nothing else moved


@pytest.mark.parametrize("batch", BATCHES)
def test_kv_compact_batched_rows_equal_batch1(batch):
    """With dst_starts[b] == src_start, row b moves as kv_compact_ moves the row alone."""
    g = gen(seed_of("kv-rows", batch))
    paths, _ = random_paths(batch, 13, 41, g)
    bases, views = batched_cache(batch, 2, torch.float32, g)
    alone = [v.clone() for v in views]
    ops.kv_compact_batched_(views, paths, [13] * batch, 13)
    for b, row in enumerate(paths.tolist()):
        rows = [a[b : b + 1] for a in alone]
        ops.kv_compact_(rows, torch.tensor([p for p in row if p >= 0]), 13)
        assert all(torch.equal(v[b : b + 1], r) for v, r in zip(views, rows))


def test_kv_compact_batched_aliasing_paths():
    """Row 0 moves down by 3 (sources and destinations interleave), row 1 in place (dst == src)."""
    kv = torch.arange(10.0).view(1, 1, 10, 1).repeat(2, 3, 1, 4)
    ops.kv_compact_batched_([kv], torch.tensor([[0, 1, 3, 4], [0, 2, -1, -1]]), [2, 5], 5)
    assert kv[0, 2, :, 3].tolist() == [0, 1, 5, 6, 8, 9, 6, 7, 8, 9]
    assert kv[1, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 7, 7, 8, 9]


def test_kv_compact_batched_checks_paths_with_nothing_to_move(device):
    for kv in ([], [torch.empty(2, 0, 10, 4, device=device)]):
        with pytest.raises(RuntimeError, match=r"paths\[1, 0\] must be 0"):
            ops.kv_compact_batched_(kv, torch.tensor([[0, 1], [1, 2]], device=device), [0, 0], 0)
        with pytest.raises(RuntimeError, match=r"paths\[0\] must be -1 after its first -1"):
            ops.kv_compact_batched_(kv, torch.tensor([[0, -1, 2], [0, 1, 2]], device=device), [0, 0], 0)
        ops.kv_compact_batched_(kv, torch.tensor([[0, 2], [0, -1]], device=device), [0, 1], 1)
    with pytest.raises(RuntimeError, match=r"src_start \+ paths\[0\]\[-1\] = 10 is outside kv\[0\]"):
        ops.kv_compact_batched_([torch.empty(1, 0, 10, 4, device=device)], torch.tensor([[0, 7]], device=device), [2],
                                3)


BAD_KV_BATCHED = [  # (mutation of (kv, paths, dst_starts, src_start), message); checked before any write
    (lambda kv, p, d, s: (kv, torch.tensor([[0, 2], [1, 2]]), d, s), r"paths\[1, 0\] must be 0"),
    (lambda kv, p, d, s: (kv, torch.tensor([[0, 3, 3], [0, 1, 2]]), d, s), r"paths\[0\] must be strictly increasing"),
    (lambda kv, p, d, s: (kv, torch.tensor([[0, 3, -2], [0, 1, 2]]), d, s), r"paths\[0\] must be strictly increasing"),
    (lambda kv, p, d, s: (kv, torch.tensor([[0, -1, 3], [0, 1, 2]]), d, s), r"paths\[0\] must be -1 after its first"),
    (lambda kv, p, d, s: (kv, torch.tensor([[0, 2], [0, 7]]), d, s),
     r"src_start \+ paths\[1\]\[-1\] = 10 is outside kv\[0\]'s sequence length 10"),
    (lambda kv, p, d, s: (kv, torch.tensor([[0, 2], [0, 2**63 - 1]]), d, s),
     r"src_start \+ paths\[1\]\[-1\] = 9223372036854775810 is outside"),
    (lambda kv, p, d, s: (kv, p, [0, 4], s), r"dst_starts\[1\] must be in \[0, src_start = 3\], got 4"),
    (lambda kv, p, d, s: (kv, p, [-1, 0], s), r"dst_starts\[0\] must be in \[0, src_start = 3\], got -1"),
    (lambda kv, p, d, s: (kv, p, [0], s), r"dst_starts must have B = 2 entries"),
    (lambda kv, p, d, s: (kv, p, d, -1), r"src_start must be >= 0"),
    (lambda kv, p, d, s: (kv, p[0], d, s), r"paths must have shape \[B, L\]"),
    (lambda kv, p, d, s: (kv, p[:, :0], d, s), r"B >= 1 rows of L >= 1 entries"),
    (lambda kv, p, d, s: (kv, p.int(), d, s), r"paths must be Long"),
    (lambda kv, p, d, s: ([kv[0][:1], kv[1][:1]], p, d, s), r"kv\[0\] must have shape \[B = 2, H, S, D\]"),
    (lambda kv, p, d, s: ([kv[0], kv[1][0]], p, d, s), r"kv\[1\] must have shape \[B, H, S, D\]"),
    (lambda kv, p, d, s: ([kv[0], kv[1].half()], p, d, s), r"one dtype"),
    (lambda kv, p, d, s: ([kv[0], kv[1], kv[0]], p, d, s), r"kv\[0\] and kv\[2\] share memory"),
    (lambda kv, p, d, s: ([kv[0][:, :, :1].expand(2, 2, 10, 4)], p, d, s), r"kv\[0\] has elements sharing memory"),
    (lambda kv, p, d, s: ([kv[0], kv[1].to("meta")], p, d, s), r"got paths on cpu and kv\[1\] on meta"),
    (lambda kv, p, d, s: (kv, p, None, s), r"NoneType"),
]


@pytest.mark.parametrize("mutate,message", BAD_KV_BATCHED)
def test_kv_compact_batched_rejects_bad_input(mutate, message):
    kv = [torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4)]
    before = [t.clone() for t in kv]
    args = mutate(kv, torch.tensor([[0, 2], [0, -1]]), [1, 3], 3)
    with pytest.raises((RuntimeError, TypeError), match=message):
        ops.kv_compact_batched_(*args)
    assert all(torch.equal(a, b) for a, b in zip(kv, before))


@pytest.mark.cuda
def test_cuda_kv_compact_batched_bad_paths_write_nothing():
    kv = [torch.randn(2, 2, 10, 4, device="cuda")]
    before = kv[0].clone()
    for bad in ([[0, 2], [1, 2]], [[0, 3, 3], [0, 1, 2]], [[0, -1, 3], [0, 1, 2]], [[0, 2], [0, 7]]):
        ops.kv_compact_batched_(kv, torch.tensor(bad, device="cuda"), [1, 3], 3)  # checked in the kernel
        assert torch.equal(kv[0], before)


@pytest.mark.cuda
def test_cuda_kv_compact_batched_many_tensors_equals_cpu():
    """More tensors than one launch takes, and a tensor of 280,000 columns per row."""
    g = gen(61)
    paths, dst = random_paths(3, 20, 41, g)
    bases, views = batched_cache(3, 40, torch.bfloat16, g)
    cuda_bases = [b.cuda() for b in bases]
    ops.kv_compact_batched_(views, paths, dst, 20)
    ops.kv_compact_batched_([b.permute(0, 2, 1, 3)[:, :, 4:45, 1:8] for b in cuda_bases], paths.cuda(), dst, 20)
    assert equal_outputs(cuda_bases, bases)
    wide = torch.randn(2, 2, 6, 140000, generator=g).half()
    wide_cuda = wide.cuda()
    ops.kv_compact_batched_([wide], torch.tensor([[0, 2], [0, -1]]), [1, 0], 3)
    ops.kv_compact_batched_([wide_cuda], torch.tensor([[0, 2], [0, -1]], device="cuda"), [1, 0], 3)
    assert torch.equal(wide_cuda.cpu(), wide)


@pytest.mark.cuda
def test_cuda_batched_ops_run_on_the_current_stream():
    """As test_ops' stream test: inputs written on a side stream after a long GPU sleep, the ops
    called on that stream; an op launching (or copying dst_starts) on another stream would read
    stale inputs."""
    logits, tokens, parents = batched_verify_inputs(3, 40, "wide", torch.float32, 71, False)
    probs, u = torch.nan_to_num(logits, nan=0.0).softmax(-1), torch.rand(3, 41, generator=gen(72))
    prefix = prefix_masks(3, 9, gen(73))
    kv = torch.randn(3, 2, 50, 8, generator=gen(74))
    paths, dst = random_paths(3, 20, 50, gen(75))
    fresh = [parents, prefix, logits, probs, tokens, u, kv, paths]
    stale = [torch.full_like(parents, -1), torch.zeros_like(prefix), torch.zeros_like(logits), torch.ones_like(probs),
             torch.zeros_like(tokens), torch.zeros_like(u), torch.zeros_like(kv), torch.zeros_like(paths)]
    d_fresh, d_in = [t.cuda() for t in fresh], [t.cuda() for t in stale]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for target, source in zip(d_in, d_fresh):
            target.copy_(source)
        d_parents, d_prefix, d_logits, d_probs, d_tokens, d_u, d_kv, d_paths = d_in
        built = ops.tree_build_batched(d_parents, d_prefix)
        greedy = ops.tree_verify_greedy_batched(d_logits, d_tokens, d_parents)
        sampled = ops.tree_verify_sample_batched(d_probs, d_tokens, d_parents, d_u)
        ops.kv_compact_batched_([d_kv], d_paths, dst, 20)
    side.synchronize()
    assert equal_outputs(built, ops.tree_build_batched(parents, prefix), "cuda")
    assert equal_outputs(greedy, ops.tree_verify_greedy_batched(logits, tokens, parents), "cuda")
    assert equal_outputs(sampled, ops.tree_verify_sample_batched(probs, tokens, parents, u), "cuda")
    ops.kv_compact_batched_([kv], paths, dst, 20)
    assert torch.equal(d_kv.cpu(), kv)


# ---------------------------------------------------------------- the cache layout, with a model


def cache_tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def crop(cache, length: int) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]


def test_cache_layout_verifies_each_row_as_alone(tiny):
    """docs/batched_ops.md's layout on a tiny target of each family: left-padded prompts of
    different lengths in one cache, two steps of trees of different sizes verified in one
    forward (tree_build_batched), each row's accepted path compacted to its own length
    (kv_compact_batched_, leaving stale slots in the shorter rows). Every row's tree logits
    equal those of the same row run alone through the batch-1 ops (fp32, within 1e-4: the
    batched forward reduces over a longer, masked prefix), and so do its path and next token."""
    model, g = tiny, gen(5)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    vocab, lengths = model.config.vocab_size, [5, 9, 7]
    prompts = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids, attention = torch.zeros(3, width, dtype=torch.int64), torch.zeros(3, width, dtype=torch.int64)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt) :], attention[b, width - len(prompt) :] = prompt, 1

    def forward(cache, **kwargs):
        return model(use_cache=True, **{cache_arg: cache}, **kwargs).logits

    with torch.no_grad():
        cache, alone = transformers.DynamicCache(), [transformers.DynamicCache() for _ in prompts]
        forward(cache, input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0))
        for prompt, row_cache in zip(prompts, alone):
            forward(row_cache, input_ids=prompt[None])
        ends, alone_lengths = [width] * 3, list(lengths)  # each row's slots in the batch cache / alone
        contexts = [prompt.tolist() for prompt in prompts]
        for plan in ([(3, 2), (0, 4), (1, 0)], [(0, 3), (2, 0), (4, 2)]):  # per row: (chain, decoys)
            trees, drafts = [], []
            for context, (chain, decoys) in zip(contexts, plan):
                # a random root, then the target's own greedy continuation (accepted) and decoys
                root = int(torch.randint(0, vocab, (1,), generator=g))
                follow = greedy_reference(model, torch.tensor([context + [root]]), max(chain, 1),
                                          None)[0, len(context) + 1 :].tolist()[:chain]
                decoy_parents = torch.randint(0, chain + 1, (decoys,), generator=g).tolist()
                trees.append(torch.tensor([-1] + list(range(chain)) + decoy_parents))
                drafts.append(torch.tensor([root] + follow + torch.randint(0, vocab, (decoys,), generator=g).tolist()))
            sizes = [len(t) for t in trees]
            parents, tokens = pad_rows(trees, max(sizes), -1), pad_rows(drafts, max(sizes), 0)
            mask, positions, _ = ops.tree_build_batched(parents, attention, torch.float32)
            logits = forward(cache, input_ids=tokens, attention_mask=mask[:, None], position_ids=positions)
            path, result = ops.tree_verify_greedy_batched(logits, tokens, parents)
            for b, n in enumerate(sizes):
                row_mask, row_positions, _ = ops.tree_build(trees[b], alone_lengths[b])
                row_logits = forward(alone[b], input_ids=drafts[b][None], attention_mask=row_mask[None, None],
                                     position_ids=row_positions[None])[0]
                torch.testing.assert_close(logits[b, :n], row_logits, rtol=1e-4, atol=1e-4)
                row_path, row_result = ops.tree_verify_greedy(row_logits, drafts[b], trees[b])
                assert equal_outputs((path[b, :n], result[b]), (row_path, row_result))
                count = int(row_result[0])
                contexts[b] += drafts[b][row_path[:count]].tolist()
                ops.kv_compact_(cache_tensors(alone[b]), row_path[:count], alone_lengths[b])
                alone_lengths[b] += count
                crop(alone[b], alone_lengths[b])
            ops.kv_compact_batched_(cache_tensors(cache), path, ends, attention.shape[1])
            new_ends = [end + int(count) for end, count in zip(ends, result[:, 0])]
            kept = min(attention.shape[1], max(new_ends))
            crop(cache, max(new_ends))
            grown = torch.zeros(3, max(new_ends), dtype=torch.int64)
            grown[:, :kept] = attention[:, :kept]
            for b, (end, new_end) in enumerate(zip(ends, new_ends)):
                grown[b, end:new_end] = 1
            attention, ends = grown, new_ends
        assert len(set(ends)) > 1  # the rows did end at different lengths: stale slots were hidden


# ---------------------------------------------------------------- schemas


def test_batched_op_schemas():
    """Schemas and fake (meta) implementations of the batched ops (opcheck's default checks)."""
    logits, tokens, parents = batched_verify_inputs(2, 4, "random", torch.float32, 0, False)
    torch.library.opcheck(torch.ops.falcon_ext.tree_build_batched,
                          (parents, torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool), torch.float16))
    torch.library.opcheck(torch.ops.falcon_ext.tree_verify_greedy_batched, (logits, tokens, parents))
    torch.library.opcheck(torch.ops.falcon_ext.tree_verify_sample_batched,
                          (logits.softmax(-1), tokens, parents, torch.rand(2, 5)))
    torch.library.opcheck(torch.ops.falcon_ext.kv_compact_batched_,
                          ([torch.randn(2, 2, 8, 3)], torch.tensor([[0, 2], [0, -1]]), [1, 3], 4))
