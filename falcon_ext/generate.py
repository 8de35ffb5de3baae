"""Lossless tree speculative decoding over an unmodified Hugging Face causal LM.

One step: the drafter proposes a tree rooted at the next token (the token the target already
chose but has not run yet); ``tree_build`` turns it into a 4D attention mask and depth
position ids; the target runs the whole tree in one forward over its KV cache; ``tree_verify``
keeps the longest path the target agrees with (greedy: argmax match; sampling: rejection
sampling) plus the target's own next token; ``kv_compact_`` keeps the accepted path's cache
entries. Every emitted token is one the target itself chose, so the output equals the
target's own decoding (greedy) or follows its distribution (sampling).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import ops, target_io
from .drafting import Drafter, DraftTree
from .kv_cache import ReservedCache
from .sampling import SamplingConfig, warp_probs
from .target_io import TargetIO


@dataclass
class SpeculativeOutput:
    """``sequences`` [1, prompt + generated] like ``generate``; per-step statistics."""

    sequences: torch.Tensor
    accept_lengths: list[int] = field(default_factory=list)  # tokens emitted per target forward
    tree_sizes: list[int] = field(default_factory=list)  # nodes verified per target forward
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # With profile=True: seconds per decoding stage (draft, tree_build, verify, accept, commit,
    # emit, drafter_update), the device synchronised at each boundary.
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens emitted per verifying target forward (plain decoding: 1.0)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0


@dataclass
class DecodeState:
    """What the loop carries between steps."""

    cache: ReservedCache
    cached_len: int  # tokens whose KV the target cache holds
    next_token: int  # chosen by the target, not yet run through it: the next tree's root
    generated: list[int]
    max_new_tokens: int
    eos_ids: frozenset[int]
    done: bool = False


# ---------------------------------------------------------------- the stages of one step

# Cache positions reserved beyond prompt + max_new_tokens: the last step's unaccepted tree nodes.
# A larger tree still works (the cache grows once); this only sizes the first reservation.
TREE_ROOM = 64


def prefill(io: TargetIO, prompt: torch.Tensor, drafter: Drafter, sampling, generator,
            max_new_tokens: int) -> tuple[ReservedCache, int]:
    """Run the prompt through the target, pick the first token and prime the drafter."""
    cache = ReservedCache(prompt.shape[1] + max_new_tokens + TREE_ROOM)
    logits, features = target_io.forward(io, prompt, cache, need_features=drafter.needs_features)
    first = _choose_token(logits[-1], sampling, generator)
    drafter.reset()
    drafter.extend(prompt[0], features, first)
    return cache, first


def _choose_token(logits_row: torch.Tensor, sampling: SamplingConfig, generator) -> int:
    """The target's own next token from one row of logits."""
    if bool(logits_row.isnan().any()):
        raise _nan_error("at the prompt's last position")
    if sampling.greedy:
        return int(logits_row.argmax())
    probs = warp_probs(logits_row[None], sampling)
    return int(torch.multinomial(probs.to(_generator_device(generator)), 1, generator=generator))


def draft(io: TargetIO, drafter: Drafter, state: DecodeState) -> DraftTree:
    """The drafter's tree, checked before it can reach an embedding lookup."""
    tree = drafter.propose()
    if (not isinstance(tree, DraftTree) or tree.tokens.dim() != 1 or tree.tokens.numel() == 0
            or tree.tokens.shape != tree.parents.shape or tree.tokens.dtype != torch.int64):
        raise ValueError("the drafter must return a DraftTree with int64 tokens and parents of shape [N], N >= 1")
    root, low, high = torch.stack([tree.tokens[0], tree.tokens.min(), tree.tokens.max()]).tolist()
    if root != state.next_token:
        raise ValueError(f"the drafter's tree root {root} is not the next token {state.next_token}")
    if low < 0 or high >= io.vocab_size:
        raise ValueError(f"the drafter proposed token ids in [{low}, {high}], outside the vocabulary [0, {io.vocab_size})")
    return tree


def build_tree(io: TargetIO, tree: DraftTree, state: DecodeState):
    """Mask and position ids for the tree; prunes nodes that could only produce tokens past the end."""
    parents = tree.parents.to(io.input_device)
    mask, positions, paths = ops.tree_build(parents, state.cached_len, io.dtype)
    room = state.max_new_tokens - len(state.generated)  # tokens still allowed, incl. the bonus token
    if paths.shape[1] > room:  # depth + 1 tokens would be emitted along the deepest path
        tree = _prune(tree, max_depth=room - 1)
        mask, positions, _ = ops.tree_build(tree.parents.to(io.input_device), state.cached_len, io.dtype)
    return tree, mask, positions


def _prune(tree: DraftTree, max_depth: int) -> DraftTree:
    parents = tree.parents.tolist()
    depth, keep, new_index = [0] * len(parents), [], {}
    for i, p in enumerate(parents):
        depth[i] = 0 if p < 0 else depth[p] + 1
        if depth[i] <= max_depth:
            new_index[i] = len(keep)
            keep.append(i)
    new_parents = [-1 if parents[i] < 0 else new_index[parents[i]] for i in keep]
    index = torch.tensor(keep, device=tree.tokens.device)
    return DraftTree(tree.tokens[index], torch.tensor(new_parents, dtype=torch.int64, device=tree.parents.device))


def verify(io: TargetIO, tree: DraftTree, mask, positions, state: DecodeState, need_features: bool):
    """One target forward over the whole tree."""
    tokens = tree.tokens.to(io.input_device)
    with target_io.grouped_kv_attention(io.input_device):
        return target_io.forward(io, tokens[None], state.cache, need_features=need_features,
                                 attention_mask=mask[None, None], position_ids=positions[None])


def accept(logits, tree: DraftTree, sampling: SamplingConfig, generator) -> tuple[list[int], int]:
    """Accepted node ids (root first) and the target's next token."""
    tokens = tree.tokens.to(logits.device)
    parents = tree.parents.to(logits.device)
    if sampling.greedy:
        path, result = ops.tree_verify_greedy(logits, tokens, parents)
    else:
        uniforms = torch.rand(len(tree) + 1, generator=generator, device=_generator_device(generator))
        path, result = ops.tree_verify_sample(warp_probs(logits, sampling), tokens, parents,
                                              uniforms.to(logits.device))
    nan_rows = logits.isnan().any(dim=-1).long()  # rides along with the step's one host sync
    count, next_token, *rest = torch.cat([result, path, nan_rows]).tolist()
    if count < 1 or next_token < 0:
        raise RuntimeError("tree verification failed: malformed tree or out-of-vocabulary draft token")
    path, nan_rows = rest[:count], rest[len(tree):]
    if any(nan_rows[node] for node in path):  # only the accepted nodes' rows chose tokens
        raise _nan_error(f"at tree nodes {[node for node in path if nan_rows[node]]} of a verification step")
    return path, next_token


def commit(state: DecodeState, path: list[int]) -> None:
    """Keep the accepted path's KV entries, contiguous after the prefix, and drop the rest."""
    layers = state.cache.layers
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for layer in layers:
        by_device.setdefault(layer.keys.device, []).extend((layer.keys, layer.values))
    for device, tensors in by_device.items():
        ops.kv_compact_(tensors, torch.tensor(path, dtype=torch.int64, device=device), state.cached_len)
    state.cached_len += len(path)
    state.cache.keep(state.cached_len)


def emit(state: DecodeState, tokens: list[int], streamer) -> None:
    """Append tokens, stopping after an EOS or at max_new_tokens."""
    room = state.max_new_tokens - len(state.generated)
    tokens = tokens[:room]
    for i, t in enumerate(tokens):
        if t in state.eos_ids:
            tokens = tokens[: i + 1]
            state.done = True
            break
    state.generated.extend(tokens)
    if len(state.generated) >= state.max_new_tokens:
        state.done = True
    if streamer is not None and tokens:
        streamer.put(torch.tensor(tokens))


# ---------------------------------------------------------------- the loop

@torch.no_grad()
def speculative_generate(
    model,
    drafter: Drafter,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    profile: bool = False,
    fp32_lm_head: bool = False,
) -> SpeculativeOutput:
    """Generate from ``model`` with ``drafter``'s trees, exactly as the target would alone.

    Greedy (``temperature=0``) output is token-identical to ``model.generate(do_sample=False)``;
    with ``temperature > 0`` tokens follow the distribution ``model.generate(do_sample=True,
    temperature, top_k, top_p)`` samples from. Unset arguments come from
    ``model.generation_config``. Batch size 1. ``profile=True`` fills ``stage_seconds``.

    ``fp32_lm_head=True``: the target's tokens are chosen from float32 logits, its LM head upcast
    and applied to its (bf16/fp16) features, so the rounding of the logits to the model's dtype
    cannot create or flip near-ties. Greedy output then follows that upcast target: identical to
    ``generate`` in float32; in bf16/fp16 it may differ where ``generate``'s own logits were
    within rounding of a tie (see falcon_ext.divergence).
    """
    if not isinstance(drafter, Drafter):
        raise TypeError(f"drafter must implement falcon_ext.Drafter (reset/extend/propose), got {type(drafter)}")
    io = target_io.for_model(model, fp32_lm_head)
    gc = getattr(model, "generation_config", None)
    sampling = SamplingConfig.resolve(gc, temperature, top_k, top_p)
    prompt = _prepare_prompt(io, input_ids, attention_mask)
    max_new = _resolve_max_new_tokens(max_new_tokens, gc, prompt.shape[1])
    _check_length(io, prompt.shape[1], max_new)

    if streamer is not None:
        streamer.put(input_ids.cpu())
    start = time.perf_counter()
    cache, first = prefill(io, prompt, drafter, sampling, generator, max_new)
    state = DecodeState(cache, prompt.shape[1], first, [], max_new, _eos_ids(eos_token_id, gc))
    emit(state, [first], streamer)
    output = SpeculativeOutput(sequences=input_ids, prefill_seconds=time.perf_counter() - start)

    timer = StageTimer(profile, io.input_device)
    start = time.perf_counter()
    while not state.done:
        with timer("draft"):
            tree = draft(io, drafter, state)
        with timer("tree_build"):
            tree, mask, positions = build_tree(io, tree, state)
        with timer("verify"):
            logits, features = verify(io, tree, mask, positions, state, drafter.needs_features)
        with timer("accept"):
            path, next_token = accept(logits, tree, sampling, generator)
        with timer("commit"):
            commit(state, path)
        with timer("emit"):
            accepted = tree.tokens[torch.tensor(path, device=tree.tokens.device)]
            emit(state, accepted[1:].tolist() + [next_token], streamer)
            output.accept_lengths.append(len(path))
            output.tree_sizes.append(len(tree))
            state.next_token = next_token
        if not state.done:
            with timer("drafter_update"):
                drafter.extend(accepted, None if features is None else features[path], next_token)
    output.decode_seconds = time.perf_counter() - start
    output.stage_seconds = timer.seconds

    if streamer is not None:
        streamer.end()
    new = torch.tensor(state.generated, dtype=input_ids.dtype, device=input_ids.device)
    output.sequences = torch.cat([input_ids if input_ids.dim() == 2 else input_ids[None], new[None]], dim=1)
    return output


# ---------------------------------------------------------------- argument handling and helpers

def _eos_ids(eos_token_id, generation_config) -> frozenset[int]:
    if eos_token_id is None:
        eos_token_id = getattr(generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return frozenset(ids)


def _resolve_max_new_tokens(max_new_tokens, generation_config, prompt_len) -> int:
    if max_new_tokens is None:
        max_new_tokens = getattr(generation_config, "max_new_tokens", None)
    if max_new_tokens is None:  # transformers' own fallback: max_length (default 20) in total
        max_new_tokens = (getattr(generation_config, "max_length", None) or 20) - prompt_len
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return max_new_tokens


def _prepare_prompt(io: TargetIO, input_ids, attention_mask) -> torch.Tensor:
    """The prompt as a [1, T] tensor on the input device, left padding removed."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an integer torch.Tensor of shape [1, T]")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [1, T], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate supports batch size 1, got batch {input_ids.shape[0]}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        input_ids = input_ids[:, attention_mask[0].to(torch.bool).to(input_ids.device)]
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: pass at least one token (e.g. the BOS token)")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= io.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {io.vocab_size}), got values in [{low}, {high}]")
    return input_ids.to(device=io.input_device, dtype=torch.int64)


def _check_length(io: TargetIO, prompt_len: int, max_new_tokens: int):
    limit = io.max_positions
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's {limit} positions (config.max_position_embeddings)")
    window = getattr(io.model.config, "sliding_window", None)
    if window is not None and prompt_len + max_new_tokens > window:
        raise ValueError(f"prompt + max_new_tokens ({prompt_len + max_new_tokens}) exceeds the model's "
                         f"sliding window ({window}); tree verification needs full attention")


def _nan_error(where: str) -> RuntimeError:
    # argmax and the samplers would silently turn NaN into some token id: refuse instead.
    return RuntimeError(f"the target model returned NaN logits ({where}); its output cannot be trusted "
                        f"(overflow in its dtype, or broken weights), so generation stops here")


def _generator_device(generator) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class StageTimer:
    """Accumulates wall time per stage; a no-op unless enabled (timing needs device syncs)."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device, self.seconds = enabled, device, {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
