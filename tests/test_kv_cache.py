"""The engine's ReservedCache against transformers' own DynamicCache, and the grouped-KV switch.

The reference is transformers' DynamicCache driving the same model: the model must compute the
same logits whether its cache grows by concatenation or in place, across growth, after the
engine's `keep` (its commit), and in every tiny model family.
"""
import contextlib
import os

import pytest
import torch
from helpers import TINY_FAMILIES, tiny_model
from transformers import DynamicCache

from falcon_ext import ops
from falcon_ext.engine.kv_cache import ReservedCache
from falcon_ext.engine.target_io import for_model, grouped_kv_attention

# Same values, same order; a view of a larger buffer may take another SDPA blocking than a
# contiguous tensor, so fp32 rounding (not the values read) may differ in the last bits.
ATOL = 1e-5


def chunks_logits(model, cache, ids, cuts, keep=None):
    """Logits of ``ids`` run through ``cache`` in pieces split at ``cuts``; ``keep`` = {piece: length
    to keep afterwards} drops the cache's tail as the engine's commit does."""
    out, start = [], 0
    for i, end in enumerate([*cuts, ids.shape[1]]):
        piece = ids[:, start:end]
        positions = torch.arange(start, end)[None]
        if keep and i - 1 in keep:  # continue after the kept prefix
            positions = torch.arange(keep[i - 1], keep[i - 1] + piece.shape[1])[None]
        out.append(model(input_ids=piece, **{for_model(model).cache_kwarg: cache}, position_ids=positions, use_cache=True).logits)
        if keep and i in keep:
            if isinstance(cache, ReservedCache):
                cache.keep(keep[i])
            else:
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, :keep[i]], layer.values[:, :, :keep[i]]
        start = end
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("capacity", [1, 7, 99])  # 1 and 7 force growth, 99 never grows
def test_reserved_cache_matches_dynamic_cache(family, capacity):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    cuts = [9, 10, 23, 31]
    with torch.no_grad():
        want = chunks_logits(model, DynamicCache(), ids, cuts)
        cache = ReservedCache(capacity)
        got = chunks_logits(model, cache, ids, cuts)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert cache.get_seq_length() == 40
    assert all(layer.capacity >= 40 for layer in cache.layers)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_keep_drops_the_tail_like_slicing_a_dynamic_cache(family):
    """The engine keeps a prefix after each verify step; the next step overwrites the dropped tail."""
    model = tiny_model(family)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    cuts, keep = [12, 20], {0: 9, 1: 15}  # keep 9 of 12, then 15 of 9 + 8
    with torch.no_grad():
        want = chunks_logits(model, DynamicCache(), ids, cuts, keep)
        got = chunks_logits(model, ReservedCache(16), ids, cuts, keep)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_reserved_cache_writes_in_place_without_growing():
    model = tiny_model("llama")
    cache = ReservedCache(32)
    with torch.no_grad():
        model(input_ids=torch.arange(5)[None], **{for_model(model).cache_kwarg: cache}, use_cache=True)
        buffers = [layer._keys.data_ptr() for layer in cache.layers]
        for t in range(5, 20):
            model(input_ids=torch.tensor([[t]]), **{for_model(model).cache_kwarg: cache}, use_cache=True)
    assert [layer._keys.data_ptr() for layer in cache.layers] == buffers  # no reallocation, no copy
    assert [layer.keys.data_ptr() for layer in cache.layers] == buffers  # keys view the buffer


def test_reserved_cache_bad_input():
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        ReservedCache(0)
    cache = ReservedCache(8)
    model = tiny_model("llama")
    with torch.no_grad():
        model(input_ids=torch.arange(4)[None], **{for_model(model).cache_kwarg: cache}, use_cache=True)
    with pytest.raises(ValueError, match="cannot keep 9 positions"):
        cache.keep(9)
    with pytest.raises(ValueError, match="negative number"):
        cache.layers[0].crop(2)
    cache.layers[0].crop(-3)
    assert cache.layers[0].get_seq_length() == 1


def test_grouped_kv_attention_restores_the_environment():
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    assert name not in os.environ
    with grouped_kv_attention(torch.device("cpu")):
        assert os.environ[name] == "1"
    assert name not in os.environ
    os.environ[name] = "0"
    try:
        with pytest.raises(RuntimeError):
            with grouped_kv_attention(torch.device("cpu")):
                raise RuntimeError
        assert os.environ[name] == "0"
        with grouped_kv_attention(torch.device("cuda")):  # CUDA: left to transformers' choice
            assert os.environ[name] == "0"
    finally:
        del os.environ[name]


def test_grouped_kv_attention_skips_the_per_group_copy(monkeypatch):
    """The switch works: under it transformers' SDPA path makes no per-group K/V copy."""
    import transformers.integrations.sdpa_attention as sdpa

    copies = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: copies.append(n) or real(x, n))
    model = tiny_model("llama")
    mask, positions, _ = ops.tree_build(torch.tensor([-1, 0, 0]), 4, torch.float32)
    for grouped in (False, True):
        cache, copies[:] = DynamicCache(), []
        with torch.no_grad():
            model(input_ids=torch.arange(4)[None], **{for_model(model).cache_kwarg: cache}, use_cache=True)
            with grouped_kv_attention(torch.device("cpu")) if grouped else contextlib.nullcontext():
                model(input_ids=torch.arange(3)[None], **{for_model(model).cache_kwarg: cache},
                      attention_mask=mask[None, None], position_ids=positions[None], use_cache=True)
        assert (len(copies) == 0) == grouped, copies


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_grouped_kv_attention_gives_the_same_tree_logits(family):
    """A tree forward with a custom mask reads the grouped KV heads directly: same logits as with
    transformers' per-group copies (the tiny models have 4 query heads over 2 KV heads)."""
    model = tiny_model(family)
    prefix = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(3))
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 5])
    tokens = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(4))
    mask, positions, _ = ops.tree_build(parents, 11, torch.float32)
    logits = []
    for grouped in (False, True):
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=prefix, **{for_model(model).cache_kwarg: cache}, use_cache=True)
            with grouped_kv_attention(torch.device("cpu")) if grouped else contextlib.nullcontext():
                out = model(input_ids=tokens, **{for_model(model).cache_kwarg: cache}, attention_mask=mask[None, None],
                            position_ids=positions[None], use_cache=True)
        logits.append(out.logits)
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=0)
