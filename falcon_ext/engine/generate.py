"""Lossless tree speculative decoding over an unmodified Hugging Face causal LM.

One step: the drafter proposes a tree rooted at the next token (the token the target already
chose but has not run yet); ``tree_build`` turns it into a 4D attention mask and depth
position ids; the target runs the whole tree in one forward over its KV cache; ``tree_verify``
keeps the longest path the target agrees with (greedy: argmax match; sampling: rejection
sampling) plus the target's own next token; ``kv_compact_`` keeps the accepted path's cache
entries. Every emitted token is one the target itself chose, so the output equals the
target's own decoding (greedy) or follows its distribution (sampling).

A batch of prompts (B > 1) runs the same stages with a batch dimension: every row has its own
tree, accepted path, bonus token and stopping point, all rows are verified in one forward
(``tree_build_batched`` etc., docs/batched_ops.md), and a finished row leaves the batch. One
prompt keeps the batch-1 loop and ops.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from . import ops, target_io
from .drafting import BatchDrafter, Drafter, DraftTree
from .kv_cache import ReservedCache
from .sampling import SamplingConfig, warp_probs
from .target_io import TargetIO


@dataclass
class SpeculativeOutput:
    """``sequences`` [B, prompt + generated] like ``generate``; per-step statistics.

    With one prompt, ``accept_lengths`` and ``tree_sizes`` hold one entry per step; with a batch
    (B > 1) they hold one such list per row (``accept_lengths[b]``: row b's steps).
    """

    sequences: torch.Tensor
    accept_lengths: list = field(default_factory=list)  # tokens emitted per target forward
    tree_sizes: list = field(default_factory=list)  # nodes verified per target forward
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # With profile=True: seconds per decoding stage (draft, tree_build, verify, accept, commit,
    # emit, drafter_update), the device synchronised at each boundary.
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens emitted per verifying target forward and row (plain decoding: 1.0)."""
        lengths = self.accept_lengths
        if self.sequences.shape[0] > 1:
            lengths = [n for row in lengths for n in row]
        return sum(lengths) / len(lengths) if lengths else 0.0


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
    first = _choose_tokens(logits[-1:], sampling, generator)[0]
    drafter.reset()
    drafter.extend(prompt[0], features, first)
    return cache, first


def _choose_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator) -> list[int]:
    """The target's own next token from each row of logits [B, V]."""
    if bool(logits.isnan().any()):
        raise _nan_error("at the prompt's last position")
    if sampling.greedy:
        return logits.argmax(dim=-1).tolist()
    probs = warp_probs(logits, sampling)
    return torch.multinomial(probs.to(_generator_device(generator)), 1, generator=generator)[:, 0].tolist()


def draft(io: TargetIO, drafter: Drafter, state: DecodeState) -> DraftTree:
    """The drafter's tree, checked before it can reach an embedding lookup."""
    tree = drafter.propose()
    _check_tree_shape(tree)
    root, low, high = torch.stack([tree.tokens[0], tree.tokens.min(), tree.tokens.max()]).tolist()
    if root != state.next_token:
        raise ValueError(f"the drafter's tree root {root} is not the next token {state.next_token}")
    if low < 0 or high >= io.vocab_size:
        raise ValueError(f"the drafter proposed token ids in [{low}, {high}], outside the vocabulary [0, {io.vocab_size})")
    return tree


def _check_tree_shape(tree) -> None:
    if (not isinstance(tree, DraftTree) or tree.tokens.dim() != 1 or tree.tokens.numel() == 0
            or tree.tokens.shape != tree.parents.shape or tree.tokens.dtype != torch.int64):
        raise ValueError("the drafter must return a DraftTree with int64 tokens and parents of shape [N], N >= 1")


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
    tokens, state.done = _clip(tokens, state.max_new_tokens - len(state.generated), state.eos_ids)
    state.generated.extend(tokens)
    if streamer is not None and tokens:
        streamer.put(torch.tensor(tokens))


def _clip(tokens: list[int], room: int, eos_ids: frozenset[int]) -> tuple[list[int], bool]:
    """The tokens a row may still emit (through its first EOS, at most ``room``), and whether it stops."""
    tokens = tokens[:room]
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1], True
    return tokens, len(tokens) == room


# ---------------------------------------------------------------- the same stages for a batch (B > 1)
#
# Cache layout (docs/batched_ops.md): one cache for the rows still decoding, row i's tokens
# left-aligned in slots starts[i] .. lengths[i] - 1 (its left padding before them, stale slots
# of rejected nodes after them), the cache max(lengths) long. The tree of every row is appended
# at the common slots after that; each row's accepted path then moves to its own length.


@dataclass
class BatchState:
    """What the batch loop carries between steps. ``rows`` are the input rows still decoding, in
    cache order; the per-row lists run parallel to it; ``generated`` and ``done`` cover every input row."""

    cache: ReservedCache
    rows: list[int]
    starts: list[int]  # first cache slot of each row's tokens (after its left padding)
    lengths: list[int]  # end of each row's tokens in the cache
    next_tokens: list[int]  # per row: chosen by the target, not yet run through it
    generated: list[list[int]]
    done: list[bool]
    max_new_tokens: int
    eos_ids: frozenset[int]

    def attention(self, device: torch.device) -> torch.Tensor:
        """[rows, cache length] bool: the slots holding each row's tokens."""
        slots = torch.arange(max(self.lengths), device=device)
        starts = torch.tensor(self.starts, device=device)
        lengths = torch.tensor(self.lengths, device=device)
        return (slots >= starts[:, None]) & (slots < lengths[:, None])


@dataclass
class TreeBatch:
    """The step's trees, row i's first n_i nodes, then padding (parent -1) up to the largest tree."""

    trees: list[DraftTree]
    tokens: torch.Tensor  # [B, N] on the input device; padding nodes repeat the row's root (a valid id)
    parents: torch.Tensor  # [B, N]
    real: torch.Tensor  # [B, N] bool: False at padding nodes
    mask: torch.Tensor | None = None  # [B, N, cache length + N] from tree_build_batched
    positions: torch.Tensor | None = None  # [B, N]

    @classmethod
    def pad(cls, trees: list[DraftTree], device: torch.device) -> "TreeBatch":
        tokens = pad_sequence([t.tokens.to(device) for t in trees], batch_first=True)
        parents = pad_sequence([t.parents.to(device) for t in trees], batch_first=True, padding_value=-1)
        sizes = torch.tensor([len(t) for t in trees], device=device)
        real = torch.arange(tokens.shape[1], device=device) < sizes[:, None]
        return cls(trees, torch.where(real, tokens, tokens[:, :1]), parents, real)


@dataclass
class RowSteps:
    """One verification's outcome per row (parallel to ``BatchState.rows``)."""

    paths: torch.Tensor  # [B, N] accepted node ids, -1 padded, on the logits' device
    accepted: torch.Tensor  # [B, N] their tokens (entries past a row's count are not meaningful)
    counts: list[int]  # accepted nodes per row, the root included
    tokens: list[list[int]]  # per row: the accepted tokens after the root, then the bonus token
    next_tokens: list[int]


def prefill_rows(io: TargetIO, ids: torch.Tensor, real: torch.Tensor, drafter: BatchDrafter, sampling,
                 generator, max_new_tokens: int, eos_ids: frozenset[int]) -> BatchState:
    """The left-padded prompts through the target in one forward (as ``generate`` runs them), each
    row's first token, the drafter primed row by row."""
    batch, width = ids.shape
    cache = ReservedCache(width + max_new_tokens + TREE_ROOM)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # transformers' numbering of a left-padded row
    logits, features = target_io.forward_rows(io, ids, cache, need_features=drafter.needs_features,
                                              attention_mask=real.long(), position_ids=positions)
    first = _choose_tokens(logits[:, -1], sampling, generator)
    starts = (width - real.sum(dim=-1)).tolist()
    rows = list(range(batch))
    drafter.reset_rows(batch)
    drafter.extend_rows(rows, [ids[b, starts[b]:] for b in rows],
                        None if features is None else [features[b, starts[b]:] for b in rows], first)
    return BatchState(cache, rows, starts, [width] * batch, first, [[] for _ in rows], [False] * batch,
                      max_new_tokens, eos_ids)


def draft_rows(io: TargetIO, drafter: BatchDrafter, state: BatchState) -> TreeBatch:
    """Every row's tree, checked (one host sync for all rows) before it can reach an embedding lookup."""
    trees = drafter.propose_rows(list(state.rows))
    if not isinstance(trees, list) or len(trees) != len(state.rows):
        raise ValueError(f"the drafter's propose_rows must return a list of {len(state.rows)} DraftTrees, "
                         f"one per row asked for")
    for tree in trees:
        _check_tree_shape(tree)
    batch = TreeBatch.pad(trees, io.input_device)
    extra_roots = ((batch.parents < 0) & batch.real)[:, 1:].sum(dim=1)
    checks = torch.stack([batch.tokens[:, 0], batch.tokens.amin(dim=1), batch.tokens.amax(dim=1), extra_roots])
    for row, next_token, (root, low, high, extra) in zip(state.rows, state.next_tokens, zip(*checks.tolist())):
        if root != next_token:
            raise ValueError(f"the drafter's tree root {root} for row {row} is not the row's next token {next_token}")
        if low < 0 or high >= io.vocab_size:
            raise ValueError(f"the drafter proposed token ids in [{low}, {high}] for row {row}, outside the "
                             f"vocabulary [0, {io.vocab_size})")
        if extra:
            raise ValueError(f"malformed tree from the drafter for row {row}: a node other than the root has "
                             f"parent -1 (only node 0 is a root)")
    return batch


def build_trees(io: TargetIO, batch: TreeBatch, state: BatchState) -> TreeBatch:
    """Masks and position ids for all rows' trees; prunes nodes that could only produce tokens past
    a row's end."""
    attention = state.attention(io.input_device)
    mask, positions, paths = ops.tree_build_batched(batch.parents, attention, io.dtype)
    rooms = [state.max_new_tokens - len(state.generated[row]) for row in state.rows]
    if paths.shape[-1] > min(rooms):  # some row's deepest path may emit more than its room
        depths = ((paths >= 0).sum(dim=-1).amax(dim=-1) - 1).tolist()
        trees = [_prune(tree, max_depth=room - 1) if depth >= room else tree
                 for tree, depth, room in zip(batch.trees, depths, rooms)]
        batch = TreeBatch.pad(trees, io.input_device)
        mask, positions, _ = ops.tree_build_batched(batch.parents, attention, io.dtype)
    batch.mask, batch.positions = mask, positions
    return batch


def verify_rows(io: TargetIO, batch: TreeBatch, state: BatchState, need_features: bool):
    """One target forward over every row's tree: logits [B, N, V], features [B, N, H] or None."""
    with target_io.grouped_kv_attention(io.input_device):
        return target_io.forward_rows(io, batch.tokens, state.cache, need_features=need_features,
                                      attention_mask=batch.mask[:, None], position_ids=batch.positions)


def accept_rows(logits, batch: TreeBatch, sampling: SamplingConfig, generator) -> RowSteps:
    """Each row's accepted path and next token (one host sync for all rows)."""
    tokens, parents = batch.tokens.to(logits.device), batch.parents.to(logits.device)
    rows, n = tokens.shape
    if sampling.greedy:
        paths, result = ops.tree_verify_greedy_batched(logits, tokens, parents)
    else:
        uniforms = torch.rand(rows, n + 1, generator=generator, device=_generator_device(generator))
        paths, result = ops.tree_verify_sample_batched(warp_probs(logits, sampling), tokens, parents,
                                                       uniforms.to(logits.device))
    accepted = tokens.gather(1, paths.clamp(min=0))
    nan_nodes = logits.isnan().any(dim=-1).long()
    host = torch.cat([result.flatten(), paths.flatten(), accepted.flatten(), nan_nodes.flatten()]).tolist()
    results = host[:2 * rows]
    host_paths, host_tokens, host_nan = (host[2 * rows + k * rows * n: 2 * rows + (k + 1) * rows * n] for k in range(3))
    counts, emitted, next_tokens = [], [], []
    for b in range(rows):
        count, next_token = results[2 * b], results[2 * b + 1]
        if count < 1 or next_token < 0:
            raise RuntimeError(f"tree verification failed in row {b} of the step: malformed tree or "
                               f"out-of-vocabulary draft token")
        path = host_paths[b * n: b * n + count]
        nan_row = host_nan[b * n: (b + 1) * n]
        if any(nan_row[node] for node in path):  # only the accepted nodes' rows chose tokens
            raise _nan_error(f"at tree nodes {[node for node in path if nan_row[node]]} of a verification step")
        counts.append(count)
        emitted.append(host_tokens[b * n + 1: b * n + count] + [next_token])
        next_tokens.append(next_token)
    return RowSteps(paths, accepted, counts, emitted, next_tokens)


def commit_rows(state: BatchState, steps: RowSteps) -> None:
    """Each row's accepted path's KV entries move to the row's own end; the cache is cut to the longest row."""
    width = max(state.lengths)  # where the trees were appended
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for layer in state.cache.layers:
        by_device.setdefault(layer.keys.device, []).extend((layer.keys, layer.values))
    for device, tensors in by_device.items():
        ops.kv_compact_batched_(tensors, steps.paths.to(device), state.lengths, width)
    state.lengths = [length + count for length, count in zip(state.lengths, steps.counts)]
    state.cache.keep(max(state.lengths))


def emit_rows(state: BatchState, tokens: list[list[int]], next_tokens: list[int]) -> None:
    """Each row's tokens, stopping it after an EOS or at max_new_tokens."""
    for row, row_tokens in zip(state.rows, tokens):
        row_tokens, state.done[row] = _clip(row_tokens, state.max_new_tokens - len(state.generated[row]),
                                            state.eos_ids)
        state.generated[row].extend(row_tokens)
    state.next_tokens = next_tokens


def extend_rows(drafter: BatchDrafter, state: BatchState, steps: RowSteps, features) -> None:
    """The drafter rolls every row still decoding to its accepted path."""
    alive = [i for i, row in enumerate(state.rows) if not state.done[row]]
    if not alive:
        return
    paths = [steps.paths[i, :steps.counts[i]] for i in alive]
    drafter.extend_rows([state.rows[i] for i in alive], [steps.accepted[i, :steps.counts[i]] for i in alive],
                        None if features is None else [features[i][path.to(features.device)]
                                                       for i, path in zip(alive, paths)],
                        [state.next_tokens[i] for i in alive])


def drop_finished(state: BatchState) -> None:
    """Finished rows leave the batch (they cost no more verification), and with them the left
    padding that no remaining row needs."""
    keep = [i for i, row in enumerate(state.rows) if not state.done[row]]
    if len(keep) == len(state.rows):
        return
    first = min((state.starts[i] for i in keep), default=0)
    if keep:
        state.cache.select_rows(torch.tensor(keep), first, max(state.lengths[i] for i in keep))
    state.rows = [state.rows[i] for i in keep]
    state.starts = [state.starts[i] - first for i in keep]
    state.lengths = [state.lengths[i] - first for i in keep]
    state.next_tokens = [state.next_tokens[i] for i in keep]


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
    ``model.generation_config``. ``profile=True`` fills ``stage_seconds``.

    A batch: ``input_ids`` [B, T] with ``attention_mask`` marking each row's left padding, as
    ``generate`` takes them. Each row decodes exactly as it would alone; ``sequences`` is
    [B, T + new] with the rows that stopped early padded after their EOS with
    ``generation_config.pad_token_id`` (else the first EOS id), as ``generate`` pads them. The
    drafter must be a ``falcon_ext.BatchDrafter``; a streamer takes one prompt only.

    ``fp32_lm_head=True``: the target's tokens are chosen from float32 logits, its LM head upcast
    and applied to its (bf16/fp16) features, so the rounding of the logits to the model's dtype
    cannot create or flip near-ties. Greedy output then follows that upcast target: identical to
    ``generate`` in float32; in bf16/fp16 it may differ where ``generate``'s own logits were
    within rounding of a tie (see falcon_ext.evaluation.divergence).
    """
    if not isinstance(drafter, Drafter):
        raise TypeError(f"drafter must implement falcon_ext.Drafter (reset/extend/propose), got {type(drafter)}")
    io = target_io.for_model(model, fp32_lm_head)
    gc = getattr(model, "generation_config", None)
    sampling = SamplingConfig.resolve(gc, temperature, top_k, top_p)
    ids, real = _prepare_inputs(io, input_ids, attention_mask)
    eos_ids = _eos_ids(eos_token_id, gc)
    if ids.shape[0] == 1:
        prompt = ids if real is None else ids[:, real[0]]
        max_new = _resolve_max_new_tokens(max_new_tokens, gc, prompt.shape[1])
        _check_length(io, prompt.shape[1], max_new)
        return _decode_one(io, drafter, input_ids, prompt, sampling, generator, max_new, eos_ids, streamer, profile)
    _check_batch(drafter, streamer, ids.shape[0])
    max_new = _resolve_max_new_tokens(max_new_tokens, gc, ids.shape[1])
    _check_length(io, ids.shape[1], max_new)
    real = torch.ones_like(ids, dtype=torch.bool) if real is None else real
    return _decode_batch(io, drafter, input_ids, ids, real, sampling, generator, max_new, eos_ids,
                         _pad_token_id(eos_token_id, gc), profile)


def _decode_one(io: TargetIO, drafter: Drafter, input_ids, prompt, sampling, generator, max_new: int,
                eos_ids: frozenset[int], streamer, profile: bool) -> SpeculativeOutput:
    """One prompt [1, T] (padding removed): the batch-1 loop and ops."""
    if streamer is not None:
        streamer.put(input_ids.cpu())
    start = time.perf_counter()
    cache, first = prefill(io, prompt, drafter, sampling, generator, max_new)
    state = DecodeState(cache, prompt.shape[1], first, [], max_new, eos_ids)
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


def _decode_batch(io: TargetIO, drafter: BatchDrafter, input_ids, ids, real, sampling, generator, max_new: int,
                  eos_ids: frozenset[int], pad_token_id: int | None, profile: bool) -> SpeculativeOutput:
    """B left-padded prompts ``ids`` [B, T] (``real``: their attention mask): one verify forward
    per step for all rows still decoding."""
    start = time.perf_counter()
    state = prefill_rows(io, ids, real, drafter, sampling, generator, max_new, eos_ids)
    emit_rows(state, [[t] for t in state.next_tokens], state.next_tokens)
    drop_finished(state)
    output = SpeculativeOutput(sequences=input_ids, accept_lengths=[[] for _ in state.done],
                               tree_sizes=[[] for _ in state.done], prefill_seconds=time.perf_counter() - start)

    timer = StageTimer(profile, io.input_device)
    start = time.perf_counter()
    while state.rows:
        with timer("draft"):
            batch = draft_rows(io, drafter, state)
        with timer("tree_build"):
            batch = build_trees(io, batch, state)
        with timer("verify"):
            logits, features = verify_rows(io, batch, state, drafter.needs_features)
        with timer("accept"):
            steps = accept_rows(logits, batch, sampling, generator)
        with timer("commit"):
            commit_rows(state, steps)
        with timer("emit"):
            emit_rows(state, steps.tokens, steps.next_tokens)
            for row, count, tree in zip(state.rows, steps.counts, batch.trees):
                output.accept_lengths[row].append(count)
                output.tree_sizes[row].append(len(tree))
        with timer("drafter_update"):
            extend_rows(drafter, state, steps, features)
        with timer("drop_finished"):
            drop_finished(state)
    output.decode_seconds = time.perf_counter() - start
    output.stage_seconds = timer.seconds

    width = max(len(tokens) for tokens in state.generated)
    new = torch.tensor([tokens + [pad_token_id] * (width - len(tokens)) for tokens in state.generated],
                       dtype=input_ids.dtype, device=input_ids.device)
    output.sequences = torch.cat([input_ids, new], dim=1)
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


def _pad_token_id(eos_token_id, generation_config) -> int | None:
    """What ``generate`` pads a finished row with: the pad id, else the first EOS id (a row only
    stops early at an EOS, so without either nothing is ever padded)."""
    pad = getattr(generation_config, "pad_token_id", None)
    if pad is not None:
        return pad
    if eos_token_id is None:
        eos_token_id = getattr(generation_config, "eos_token_id", None)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    return ids[0] if ids else None


def _prepare_inputs(io: TargetIO, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompts as [B, T] int64 on the input device, left padding set to id 0 (a valid id the
    mask hides), and the attention mask as [B, T] bool there (None: no mask given)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an integer torch.Tensor of shape [B, T]")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [1, T] or [B, T], got {tuple(input_ids.shape)}")
    ids = input_ids.to(device=io.input_device, dtype=torch.int64)
    real = None if attention_mask is None else _left_padding(attention_mask, input_ids).to(io.input_device)
    if ids.shape[1] == 0 or (real is not None and ids.shape[0] == 1 and not bool(real.any())):
        raise ValueError("the prompt is empty: pass at least one token (e.g. the BOS token)")
    tokens = ids if real is None else ids[real]
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= io.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {io.vocab_size}), got values in [{low}, {high}]")
    return (ids, None) if real is None else (torch.where(real, ids, 0), real)


def _left_padding(attention_mask, input_ids: torch.Tensor) -> torch.Tensor:
    """The attention mask as bool, checked: input_ids' shape, 0/1 only, each row zeros then ones."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask shape {shape} != input_ids shape {tuple(input_ids.shape)}")
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (a prompt token)")
    real = attention_mask.to(torch.bool)
    right = (real[:, :-1] & ~real[:, 1:]).any(dim=1).nonzero().flatten().tolist()
    if right:
        raise ValueError(f"attention_mask row {right[0]} has padding after a token: speculative_generate takes "
                         f"left-padded prompts (tokenizer padding_side='left'), as generate does")
    if real.shape[0] > 1:
        empty = (~real.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"row {empty[0]} of the batch is all padding (attention_mask all 0): every prompt "
                             f"needs at least one token")
    return real


def _check_batch(drafter: Drafter, streamer, batch: int) -> None:
    if streamer is not None:
        raise ValueError(f"a streamer takes one prompt (batch size 1, as in generate), got a batch of {batch}")
    if not isinstance(drafter, BatchDrafter):
        raise ValueError(f"{type(drafter).__name__} drafts for one prompt at a time; a batch of {batch} prompts "
                         f"needs a falcon_ext.BatchDrafter (reset_rows/extend_rows/propose_rows), such as "
                         f"PromptLookupDrafter")


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
