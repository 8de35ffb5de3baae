"""Property-based fuzzing (hypothesis) of the batched ops, in the style of test_fuzz.py.

Valid batches have rows of random sizes padded to the largest, junk in the padding (NaN scores,
tokens outside the vocabulary, which no op may read), random prefix masks, non-contiguous
layouts and every supported dtype. They must equal the plain-PyTorch references of
falcon_ext.engine.references exactly, and each row must equal the batch-1 op on that row alone. A batch
with one malformed row must raise naming that row; on CUDA the verify ops give that row alone
the sentinel. FALCON_FUZZ_EXAMPLES and FALCON_FUZZ_RANDOM work as in test_fuzz.py (fuzz_strategies.FUZZ).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")
from fuzz_strategies import (BIG, CACHE_LENGTHS, FLOATS, FUZZ, LAYOUTS, SEEDS, cache_path,  # noqa: E402
                             cache_tensor, trees)
from helpers import equal_outputs, layout, rejects, views_on  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from falcon_ext import ops  # noqa: E402
from falcon_ext.engine.references import (  # noqa: E402
    distinct_sibling_tokens,
    pad_rows,
    reference_kv_compact_batched_,
    reference_tree_build_batched,
    reference_verify_greedy_batched,
    reference_verify_sample_batched,
)

BATCHES = st.one_of(st.sampled_from([1, 3, 7]), st.integers(1, 5))
JUNK_TOKENS = st.sampled_from([-1, -7, 10**6, BIG, -BIG - 1])


@st.composite
def padded_trees(draw, max_nodes=40):
    """parents [B, N]: B valid trees (fuzz_strategies.trees) padded with -1 to the largest."""
    rows = [draw(trees(n=draw(st.integers(1, max_nodes)))) for _ in range(draw(BATCHES))]
    return pad_rows(rows, max(len(r) for r in rows), -1), [len(r) for r in rows]


@st.composite
def prefix_mask(draw, batch):
    """[B, P] cache masks: each row's visible slots anywhere (the engine's rows are one run, but
    the op takes any mask), bool or int64."""
    width = draw(st.sampled_from([0, 1, 7, 40]))
    g = torch.Generator().manual_seed(draw(SEEDS))
    mask = torch.rand(batch, width, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    return mask.long() if draw(st.booleans()) else mask


@FUZZ
@given(case=padded_trees(), data=st.data(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16,
                                                                    torch.float64]), how=LAYOUTS)
def test_tree_build_batched_equals_reference(case, data, dtype, how, device):
    parents, _ = case
    prefix = data.draw(prefix_mask(parents.shape[0]))
    got = ops.tree_build_batched(layout(parents, how).to(device), layout(prefix, how).to(device), dtype)
    want = reference_tree_build_batched(parents, prefix, dtype)
    assert equal_outputs(got, want, device)


@st.composite
def batched_verify_case(draw, sample: bool):
    """(scores [B, N, V], tokens, parents, sizes): per row random drafts with distinct siblings,
    the target's choice forced along a random chain; NaN scores and junk tokens in the padding."""
    parents, sizes = draw(padded_trees(max_nodes=30))
    batch, n = parents.shape
    g = torch.Generator().manual_seed(draw(SEEDS))
    widest = max(int(torch.bincount(parents[b, 1:size], minlength=1).max()) if size > 1 else 0
                 for b, size in enumerate(sizes))
    vocab = max(draw(st.sampled_from([1, 7, 111])), widest)
    scores = torch.full((batch, n, vocab), float("nan"))
    tokens = torch.full((batch, n), draw(JUNK_TOKENS), dtype=torch.int64)
    for b, size in enumerate(sizes):
        row_parents = parents[b, :size]
        tokens[b, :size] = distinct_sibling_tokens(row_parents, vocab, g)
        row = 3 * torch.randn(size, vocab, generator=g)
        if sample:
            row = torch.softmax(row, dim=-1)
            row[torch.rand(size, vocab, generator=g) < 0.2] = 0
        node = int(torch.randint(0, size, (1,), generator=g))
        while node > 0:  # the target picks this chain's drafts: long paths get accepted too
            parent = int(row_parents[node])
            row[parent, tokens[b, node]] = row[parent].max() + 1.0
            node = parent
        scores[b, :size] = row
    return scores.to(draw(FLOATS)), tokens, parents, sizes


def rows_equal_batch1(op, got, args, sizes, uniforms=None):
    for b, size in enumerate(sizes):
        row = [a[b, :size] for a in args] + ([uniforms[b, : size + 1]] if uniforms is not None else [])
        alone = op(*row)
        assert equal_outputs((got[0][b, :size], got[1][b]), alone)
        assert (got[0][b, size:] == -1).all()


@FUZZ
@given(case=batched_verify_case(sample=False), how=LAYOUTS)
def test_verify_greedy_batched_equals_reference(case, how, device):
    scores, tokens, parents, sizes = case
    got = ops.tree_verify_greedy_batched(*[layout(t, how).to(device) for t in (scores, tokens, parents)])
    want = reference_verify_greedy_batched(scores.float(), tokens, parents)
    assert equal_outputs(got, want)
    rows_equal_batch1(ops.tree_verify_greedy, got, (scores, tokens, parents), sizes)


@FUZZ
@given(case=batched_verify_case(sample=True), how=LAYOUTS, seed=SEEDS)
def test_verify_sample_batched_equals_reference(case, how, seed, device):
    probs, tokens, parents, sizes = case
    uniforms = torch.rand(parents.shape[0], parents.shape[1] + 1, generator=torch.Generator().manual_seed(seed))
    got = ops.tree_verify_sample_batched(*[layout(t, how).to(device) for t in (probs, tokens, parents, uniforms)])
    want = reference_verify_sample_batched(probs.float(), tokens, parents, uniforms)
    assert equal_outputs(got, want)
    rows_equal_batch1(ops.tree_verify_sample, got, (probs, tokens, parents), sizes, uniforms)


@FUZZ
@given(case=batched_verify_case(sample=False), data=st.data())
def test_verify_batched_one_bad_row(case, data, device):
    """One row gets a malformed tree (a real node after its padding, or a bad parent) or an
    out-of-vocabulary token: the CPU ops raise naming the row; on CUDA that row alone gets the
    sentinel and every other row its batch-1 result."""
    scores, tokens, parents, sizes = case
    batch, n = parents.shape
    bad = data.draw(st.integers(0, batch - 1), label="bad row")
    parents, tokens = parents.clone(), tokens.clone()
    kind = data.draw(st.sampled_from(["token", "parent"] + (["after padding"] if sizes[bad] < n - 1 else [])))
    if kind == "token":
        node = data.draw(st.integers(0, sizes[bad] - 1))
        tokens[bad, node] = data.draw(st.sampled_from([-1, scores.shape[2], BIG]))
        message = rf"tokens\[{bad}, {node}\] = {int(tokens[bad, node])} is outside the vocabulary"
    elif kind == "parent":
        node = data.draw(st.integers(0, sizes[bad] - 1))
        parents[bad, node] = node if node > 0 else 0  # a self loop, or a root with a parent
        message = rf"malformed tree in row {bad}: " + (rf"node {node} has parent {node}" if node else "parents")
    else:
        node = data.draw(st.integers(sizes[bad] + 1, n - 1))
        parents[bad, node] = 0
        message = rf"malformed tree in row {bad}: node {node} has parent 0 after a padding node"
    probs = torch.nan_to_num(scores.float(), nan=0.0).clamp(min=0)
    uniforms = torch.rand(batch, n + 1)
    for op, args in [(ops.tree_verify_greedy_batched, (scores, tokens, parents)),
                     (ops.tree_verify_sample_batched, (probs, tokens, parents, uniforms))]:
        moved = [t.to(device) for t in args]
        if device == "cpu":
            rejects(lambda: op(*moved), message)
            continue
        path, result = op(*moved)
        assert result[bad].tolist() == [0, -1] and (path[bad] == -1).all()
        for b in range(batch):
            if b != bad:
                alone = op(*[t[b : b + 1] for t in moved])
                assert equal_outputs((path[b], result[b]), (alone[0][0], alone[1][0]))


@st.composite
def kv_batched_case(draw):
    """Bases, [B, H, S, D] views (see fuzz_strategies.cache_tensor), paths [B, L] (-1 padded),
    dst_starts <= src_start."""
    g = torch.Generator().manual_seed(draw(SEEDS))
    dtype, batch = draw(FLOATS), draw(BATCHES)
    seq = draw(CACHE_LENGTHS)
    tensors = [cache_tensor(draw, g, dtype, batch, seq) for _ in range(draw(st.integers(1, 3), label="tensors"))]
    src_start = draw(st.integers(0, seq - 1))
    rows = [cache_path(draw, seq - src_start) for _ in range(batch)]
    dst_starts = [draw(st.integers(0, src_start)) for _ in range(batch)]
    return ([t[0] for t in tensors], [t[1] for t in tensors], pad_rows(rows, max(len(r) for r in rows), -1), dst_starts,
            src_start)


@FUZZ
@given(case=kv_batched_case(), how=LAYOUTS)
def test_kv_compact_batched_equals_reference(case, how, device):
    bases, views, paths, dst_starts, src_start = case
    want = [b.clone() for b in bases]
    reference_kv_compact_batched_([w.as_strided(v.shape, v.stride(), v.storage_offset()) for w, v in zip(want, views)],
                                  paths, dst_starts, src_start)
    bases, views = views_on(device, bases, views)
    ops.kv_compact_batched_(views, layout(paths, how).to(device), dst_starts, src_start)
    assert equal_outputs(bases, want)  # whole buffers: nothing else moved
