"""What several test modules share: the tiny random targets, the target's own greedy reference,
seeded generators, the comparisons of an op's outputs and the input layouts the ops must accept.

Test modules import from here (and from scripted_drafters, falcon_reference, fuzz_strategies),
never from one another or from conftest.py, which holds only the fixtures.
"""
from __future__ import annotations

import math
import re
import zlib

import pytest
import torch
import transformers

# ---------------------------------------------------------------- targets

TINY_FAMILIES = ("llama", "qwen2", "mistral", "gpt2")


def tiny_model(family: str, vocab: int = 97, seed: int = 0):
    """A small random-initialised causal LM in fp32, with logits spread wide enough that argmax
    ties (which fp32 rounding could flip between batched and sequential forwards) are rare."""
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=None, pad_token_id=None, initializer_range=0.3)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    if family == "llama":
        config = transformers.LlamaConfig(**common, **decoder)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, **decoder, use_sliding_window=False)
    elif family == "mistral":
        config = transformers.MistralConfig(**common, **decoder, sliding_window=None)
    elif family == "gpt2":
        config = transformers.GPT2Config(**common, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = 0
    return model


def greedy_reference(model, ids, max_new_tokens, eos):
    """The target's own greedy decoding (transformers' generate, nothing of falcon_ext): the
    sequences [1, prompt + new] that speculative_generate must equal token for token."""
    return model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0,
                          temperature=None, top_k=None, top_p=None)


# ---------------------------------------------------------------- seeds

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seed_of(*parts) -> int:
    """A fixed seed per test case (str hashes vary between processes; crc32 does not)."""
    return zlib.crc32(repr(parts).encode())


# ---------------------------------------------------------------- the tree ops' cases

VOCAB = 111
SIZES = [1, 7, 99]
SHAPES = ["random", "chain", "star", "wide"]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_path(length: int, span: int, g: torch.Generator) -> torch.Tensor:
    """A kv_compact_ path: 0, then length - 1 sorted distinct offsets in [1, span)."""
    rest = torch.randperm(span - 1, generator=g)[: length - 1].sort().values + 1
    return torch.cat([torch.zeros(1, dtype=torch.int64), rest])


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


def exact_distribution(model, prompt, steps, processors):
    """P(t_1..t_steps) for every continuation, by enumeration with transformers' own warpers."""
    vocab = model.config.vocab_size
    seqs, probs = [prompt], torch.ones(1)
    for _ in range(steps):
        batch = torch.tensor(seqs)
        with torch.no_grad():
            scores = processors(batch, model(batch).logits[:, -1].double())
        p = scores.softmax(-1)
        probs = (probs[:, None] * p).reshape(-1)
        seqs = [s + [t] for s in seqs for t in range(vocab)]
    return probs


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test, cells with expected count < 5 pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


# ---------------------------------------------------------------- comparing outputs

def equal_outputs(got, want, device: str | None = None) -> bool:
    """An op's output tuple equals ``want`` exactly, output by output, with as many outputs
    (compared on the CPU, wherever either lies); with ``device``, every output lies on it."""
    return all((device is None or g.device.type == device) and torch.equal(g.cpu(), w.cpu())
               for g, w in zip(got, want, strict=True))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (inputs must come back exactly as they went in)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def rejects(call, message: str) -> None:
    """The call raises one of the documented exception types, with ``message`` in its text."""
    with pytest.raises((ValueError, RuntimeError, TypeError)) as info:
        call()
    assert re.search(message, str(info.value)), (message, str(info.value))


# ---------------------------------------------------------------- input layouts

def layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values with other strides: 'strided' (every other element of the last dim of a
    wider buffer), 'transposed' (column-major storage of a 2-D tensor), or as is."""
    if how == "strided" and t.dim():
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    return t


def views_on(device: str, bases: list[torch.Tensor], views: list[torch.Tensor]):
    """(bases, views) moved to ``device``: each view keeps its strides and offset into its base,
    so an op writing through the views can be checked on the whole buffers."""
    if device == "cpu":
        return bases, views
    moved = [b.to(device) for b in bases]
    return moved, [m.as_strided(v.shape, v.stride(), v.storage_offset()) for m, v in zip(moved, views)]


def verify_ops_on(device: str, greedy, sample, scores, tokens, parents, uniforms):
    """[(op, its arguments on ``device``)] for a greedy and a sampling verify op on one input
    (the sampling op reads the scores as weights)."""
    return [(greedy, [t.to(device) for t in (scores, tokens, parents)]),
            (sample, [t.to(device) for t in (scores, tokens, parents, uniforms)])]
