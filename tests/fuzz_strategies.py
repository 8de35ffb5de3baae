"""Hypothesis settings and strategies shared by test_fuzz.py and test_fuzz_batched.py.

Only those modules import this one, after ``pytest.importorskip("hypothesis")``: hypothesis is
an optional test dependency, and the rest of the suite runs without it.
"""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from falcon_ext.engine.references import random_tree

FUZZ = settings(max_examples=int(os.environ.get("FALCON_FUZZ_EXAMPLES", "100")), deadline=None,
                derandomize=os.environ.get("FALCON_FUZZ_RANDOM") != "1", database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FLOATS = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SIZES = st.one_of(st.sampled_from([1, 7, 99]), st.integers(1, 30))
VOCABS = st.one_of(st.sampled_from([1, 7, 111]), st.integers(1, 200))
SEEDS = st.integers(0, 2**32 - 1)
LAYOUTS = st.sampled_from(["contiguous", "strided", "transposed"])  # helpers.layout's names
BIG = 2**63 - 1


@st.composite
def trees(draw, n=None):
    """Parents [n] of a valid tree: drawn node by node, or one of references.random_tree's shapes."""
    n = draw(SIZES) if n is None else n
    shape = draw(st.sampled_from(["drawn", "random", "chain", "star", "wide"]))
    if shape == "drawn" and n <= 30:
        return torch.tensor([-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)], dtype=torch.int64)
    return random_tree(n, torch.Generator().manual_seed(draw(SEEDS)), "random" if shape == "drawn" else shape)


def cache_tensor(draw, g: torch.Generator, dtype: torch.dtype, batch: int, seq: int):
    """(base buffer, the [batch, H, seq, D] view of it passed to a KV op): the whole buffer, a
    sequence window of a [batch, seq', H, D] buffer (neither contiguous nor at offset 0), or
    every other element of D."""
    H, D = draw(st.sampled_from([1, 2, 7])), draw(st.sampled_from([1, 3, 7]))
    how = draw(st.sampled_from(["whole", "window", "strided"]))
    if how == "window":
        offset = draw(st.integers(0, 3))
        base = torch.randn(batch, seq + 4, H, D, generator=g).to(dtype)
        return base, base[:, offset : offset + seq].permute(0, 2, 1, 3)
    if how == "strided":
        base = torch.randn(batch, H, seq, 2 * D, generator=g).to(dtype)
        return base, base[..., ::2]
    base = torch.randn(batch, H, seq, D, generator=g).to(dtype)
    return base, base


CACHE_LENGTHS = st.one_of(st.sampled_from([1, 7, 99]), st.integers(1, 20))


def cache_path(draw, span: int) -> torch.Tensor:
    """A valid kv_compact_ path into ``span`` slots: 0, then sorted distinct offsets in [1, span)."""
    rest = sorted(draw(st.sets(st.integers(1, span - 1), max_size=span - 1))) if span > 1 else []
    return torch.tensor([0] + rest, dtype=torch.int64)
