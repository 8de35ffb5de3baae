"""Typed Python entry points of the C++/CUDA ops (torch.ops.falcon_ext.*).

Each op has a CPU reference (csrc/<op>.cpp) and a CUDA kernel (csrc/<op>.cu) with the same
contract; the dispatcher picks by the device of the tensors passed in. One exception,
``int8_linear``: a CPU kernel only, for a CPU-only weight format. Shapes: N tree nodes,
V vocabulary, P prefix (already cached) length.
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loading the library registers torch.ops.falcon_ext)

_ops = torch.ops.falcon_ext


def _check_tensors(op: str, named: list[tuple[str, object]]) -> None:
    """Every argument a tensor, all on one device. The C++ checks cannot say this clearly: the
    dispatcher picks the kernel from the tensors' devices before they run, so a stray meta
    tensor ends in "no Meta kernel", a non-tensor in "no tensor arguments"."""
    first_name, first_device = None, None
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if first_device is None:
            first_name, first_device = name, t.device
        elif t.device != first_device:
            raise RuntimeError(f"{op}: every tensor must be on the same device, got {first_name} on {first_device} "
                               f"and {name} on {t.device}")


def tree_build(parents: torch.Tensor, prefix_len: int, dtype: torch.dtype = torch.float32):
    """Verification inputs for a draft tree.

    Shape:
        parents: [N] int64, parents[0] == -1 (root), 0 <= parents[i] < i otherwise.
    Returns:
        mask [N, P + N] of ``dtype``: 0 where node i may attend (the prefix, its ancestors,
        itself), -inf elsewhere; position_ids [N] int64 = P + depth; retrieve_paths
        [leaves, max_depth + 1] int64 of root-to-leaf node ids, -1 padded.
    Raises RuntimeError for a malformed tree.
    """
    _check_tensors("tree_build", [("parents", parents)])
    return _ops.tree_build(parents, prefix_len, dtype)


def tree_verify_greedy(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor):
    """Longest root-to-node path whose draft tokens equal the target's argmax at their parent.

    Shape:
        logits: [N, V] float, the target's logits at every node; tokens: [N] int64 draft tokens
        (tokens[0] is the root, already accepted); parents: [N] int64.
    Returns:
        path [N] int64: accepted node ids from the root (path[0] == 0), -1 padded;
        result [2] int64: (number of accepted nodes incl. the root, the target's next token).
    Argmax ties go to the lowest token id; NaN logits count as -inf.
    Raises RuntimeError for bad shapes/dtypes/devices. A malformed tree or a token outside
    [0, V) raises on CPU; on CUDA it cannot without a host sync, so the op returns the sentinel
    result (0, -1) with path all -1: check ``result[0] >= 1`` where you read the result.
    """
    _check_tensors("tree_verify_greedy", [("logits", logits), ("tokens", tokens), ("parents", parents)])
    return _ops.tree_verify_greedy(logits, tokens, parents)


def tree_verify_sample(probs: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, uniforms: torch.Tensor):
    """Lossless speculative rejection sampling over the tree (drafts as point-mass proposals).

    At the current node with residual target weights p, each child c (in index order) is
    accepted with probability p[tok_c] / sum(p); on rejection p[tok_c] = 0. When no child is
    accepted (or the node is a leaf) the next token is drawn from the residual p. The output
    token sequence is distributed exactly as sampling from the target, whatever the drafts.

    Precisely: with residual sum S, child c is accepted iff ``uniforms[c] * S < p[tokens[c]]``
    (float32); on rejection ``S -= p[tokens[c]]`` and ``p[tokens[c]] = 0``. The last token is
    the first token whose running sum of the residual exceeds ``uniforms[N] * sum(residual)``
    (the last token with positive weight if rounding selects none; argmax of the weights if the
    residual is all zero). Sums run in one fixed order on CPU and CUDA (kSampleChunks in
    csrc/ops.h), so both give identical results. Negative and NaN weights count as 0.

    Shape:
        probs: [N, V] float, non-negative (need not be normalised); tokens, parents: [N] int64;
        uniforms: [N + 1] float32 in [0, 1): uniforms[i] tests node i, uniforms[N] draws the last token.
    Returns: as :func:`tree_verify_greedy`, including the CUDA sentinel (0, -1) for malformed data.
    """
    _check_tensors("tree_verify_sample", [("probs", probs), ("tokens", tokens), ("parents", parents),
                                          ("uniforms", uniforms)])
    return _ops.tree_verify_sample(probs, tokens, parents, uniforms)


def kv_compact_(kv: list[torch.Tensor], path: torch.Tensor, dst_start: int) -> None:
    """In place, for every tensor in ``kv``: entry ``dst_start + path[j]`` moves to ``dst_start + j``.

    Shape:
        kv: list of [B, H, S, D] cache tensors (float16/bfloat16/float32, any strides, one device);
        path: [L] int64 on the tensors' device, strictly increasing node ids with path[0] == 0,
        as tree_verify returns; dst_start + path[-1] < S.
    The tensors must not share memory with each other (two whose memory ranges overlap are
    refused). On CPU a bad path raises; on CUDA it is checked in the kernel (no host sync) and
    leaves every tensor unchanged without an error, except when there is nothing to move (no
    tensors, or none with a column): then it is checked on the host and raises as on CPU.
    """
    _check_tensors("kv_compact_", [("path", path)] + [(f"kv[{i}]", t) for i, t in enumerate(kv)])
    _ops.kv_compact_(kv, path, dst_start)


# ---- batched ops: B rows, one verify forward for the whole batch ----
#
# Each row's tree is padded to the step's largest tree (N nodes): row b's tree is its first n_b
# nodes, and nodes n_b..N-1 have parent -1 (padding; the root's marker, so no walk from the root
# reaches them). Padding must fill the end of the row; padding nodes' tokens and scores are never
# read, never accepted, and never visible to a real node.
#
# Cache layout these ops assume (the engine's choice for batch > 1): one cache of width P for the
# whole batch, every row's entries left-aligned in it. Row b holds its tokens in the slots its
# attention mask marks (left padding of the prompt first, then the row's tokens up to its own
# length L_b); slots L_b..P-1 are stale (nodes rejected in earlier steps) and hidden by the mask.
# The verify forward appends every row's tree at the common slots P..P+N-1; kv_compact_batched_
# then moves row b's accepted path from there to L_b, and the engine crops the cache to
# max_b(L_b + accepted_b). The cache stays an ordinary transformers cache of one length; only the
# attention mask is ragged, and position ids come from it as transformers computes them for
# left-padded rows (the count of visible slots), so each row sees exactly what it would alone.


def tree_build_batched(parents: torch.Tensor, prefix_mask: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Verification inputs for B padded draft trees against a per-row prefix mask.

    Shape:
        parents: [B, N] int64, row b a tree over its first n_b nodes (parents[b, 0] == -1,
        0 <= parents[b, i] < i), then -1 padding; prefix_mask: [B, P] bool or int64 on parents'
        device, nonzero where the cached slot holds one of row b's tokens (the attention mask of
        the cache; P may be 0).
    Returns:
        mask [B, N, P + N] of ``dtype`` (``mask[:, None]`` is the 4D additive mask): 0 where
        real node i of row b may attend (the row's visible prefix slots, its ancestors, itself),
        -inf elsewhere; a padding node sees only itself (an all -inf row would give NaN outputs
        that leak into the other nodes' attention as 0 * NaN); position_ids [B, N] int64 =
        (visible prefix slots of the row) + depth, the root's for padding nodes; retrieve_paths
        [B, max leaves, max depth + 1] int64: row b's root-to-leaf paths as :func:`tree_build`
        gives them for the row alone, -1 padded.
    Row b's real part equals :func:`tree_build` on ``parents[b, :n_b]`` with prefix_len =
    prefix_mask[b].count_nonzero(), except that hidden prefix slots are -inf.
    Raises RuntimeError naming the row for a malformed tree or padding that is not a suffix.
    """
    _check_tensors("tree_build_batched", [("parents", parents), ("prefix_mask", prefix_mask)])
    return _ops.tree_build_batched(parents, prefix_mask, dtype)


def tree_verify_greedy_batched(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor):
    """:func:`tree_verify_greedy` on every row of a batch of padded trees.

    Shape:
        logits: [B, N, V] float; tokens, parents: [B, N] int64 (padding as for
        :func:`tree_build_batched`; padding nodes' tokens and logits are not read).
    Returns:
        path [B, N] int64 and result [B, 2] int64: row b's are :func:`tree_verify_greedy`'s on
        the row's first n_b nodes, path -1 padded to N.
    Raises RuntimeError (naming the row) for bad input on CPU; on CUDA a malformed row gets the
    sentinel result (0, -1) with its path all -1, and the other rows are verified as usual.
    """
    _check_tensors("tree_verify_greedy_batched", [("logits", logits), ("tokens", tokens), ("parents", parents)])
    return _ops.tree_verify_greedy_batched(logits, tokens, parents)


def tree_verify_sample_batched(probs: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                               uniforms: torch.Tensor):
    """:func:`tree_verify_sample` on every row of a batch of padded trees.

    Shape:
        probs: [B, N, V] float; tokens, parents: [B, N] int64 (padding as for
        :func:`tree_build_batched`); uniforms: [B, N + 1] float32 in [0, 1): uniforms[b, i]
        tests node i of row b, uniforms[b, n_b] draws the row's last token (the row's entries
        past n_b are unused).
    Returns: as :func:`tree_verify_greedy_batched`; row b's are :func:`tree_verify_sample`'s on
    ``(probs[b, :n_b], tokens[b, :n_b], parents[b, :n_b], uniforms[b, :n_b + 1])``, with the
    same fixed summation order, so CPU and CUDA agree bit for bit.
    """
    _check_tensors("tree_verify_sample_batched", [("probs", probs), ("tokens", tokens), ("parents", parents),
                                                  ("uniforms", uniforms)])
    return _ops.tree_verify_sample_batched(probs, tokens, parents, uniforms)


def kv_compact_batched_(kv: list[torch.Tensor], paths: torch.Tensor, dst_starts: list[int], src_start: int) -> None:
    """Ragged compaction, in place: for every tensor and row b, entry ``src_start + paths[b, j]``
    of batch row b moves to ``dst_starts[b] + j`` (see the cache layout above).

    Shape:
        kv: list of [B, H, S, D] cache tensors (float16/bfloat16/float32, any strides, one
        device, no two sharing memory); paths: [B, L] int64 on their device, row b strictly
        increasing node ids with paths[b, 0] == 0, then -1 padding (as the batched verify ops
        return them); dst_starts: B ints with 0 <= dst_starts[b] <= src_start (the row's cached
        length; the tree was appended at src_start); src_start + the row's last node < S.
    Slots of a row outside its destination range are left as they are (stale, to be hidden by
    the attention mask or cropped). On CPU a bad path raises before anything moves; on CUDA the
    paths are checked in the kernel (no host sync) and a bad one leaves every tensor unchanged
    without an error, except when there is nothing to move: then they are checked on the host.
    """
    _check_tensors("kv_compact_batched_", [("paths", paths)] + [(f"kv[{i}]", t) for i, t in enumerate(kv)])
    _ops.kv_compact_batched_(kv, paths, [int(d) for d in dst_starts], src_start)


def falcon_draft_step(x, h0, c0, ctx_k, ctx_v, br_k, br_v, weights: list[torch.Tensor], num_heads: int,
                      eps: float, encode_only: bool = False, scales: list[torch.Tensor] | None = None):
    """One Falcon drafter forward over a block of k drafted positions for B branches.

    2-layer LSTM over the block from (h0, c0) (input projections batched, recurrence
    sequential), RMSNorm + QKV, attention of the block's queries to the context cache, the
    branch's earlier blocks and the whole block itself (relaxed mask: nothing hidden), output
    projection + residual, RMSNorm + SiLU MLP + residual. fp32 accumulation in every dtype.

    Shape:
        x: [B, k, 2H]; h0, c0: [2, B, H]; ctx_k, ctx_v: [S, H]; br_k, br_v: [B, D, H];
        weights (one dtype and device with x): the tensors named by
        ``falcon_ext.drafters.falcon.FUSED_WEIGHTS``, in that order (shapes listed there).
    Returns:
        out [B, k, H] predicted features, h [2, B, H], c [2, B, H] (state after the block),
        block_k, block_v [B, k, H] (the block's attention keys/values, to extend br_k/br_v).
        With ``encode_only`` (settling accepted context positions: only their LSTM state and
        keys/values matter) attention and MLP are skipped and ``out`` is [B, k, 0].
    ``scales`` (CPU only): the eight weight matrices are int8, in ``int8_linear``'s format, and
    ``scales`` holds their float32 per-row scales in slot order (``FUSED_MATRICES``).
    """
    _check_tensors("falcon_draft_step", list(zip(("x", "h0", "c0", "ctx_k", "ctx_v", "br_k", "br_v"),
                                                 (x, h0, c0, ctx_k, ctx_v, br_k, br_v)))
                   + [(f"weights[{i}]", w) for i, w in enumerate(weights)]
                   + [(f"scales[{i}]", s) for i, s in enumerate(scales or [])])
    return _ops.falcon_draft_step(x, h0, c0, ctx_k, ctx_v, br_k, br_v, weights, num_heads, eps, encode_only, scales)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear(x, weight * scale[:, None], bias)`` with int8 weights, for the few rows of a draft
    step: fp32 accumulation, each weight row read once for all rows of x. CPU only (on a GPU
    drafting reads its float weights at HBM speed; csrc/int8_linear.cpp).

    Shape:
        x: [..., K] float; weight: [N, K] int8; scale: [N] float32 (row n's weights are
        weight[n] * scale[n]); bias: [N] float or None.
    Returns [..., N] in x's dtype.
    """
    named = [("x", x), ("weight", weight), ("scale", scale)] + ([] if bias is None else [("bias", bias)])
    _check_tensors("int8_linear", named)
    if x.device.type != "cpu":
        raise RuntimeError(f"int8_linear runs on CPU only (int8 drafter weights are a CPU format), got {x.device}")
    return _ops.int8_linear(x, weight, scale, bias)


# Fake (meta) implementations: output shapes and dtypes without running anything, for
# torch.compile, FakeTensor tracing and opcheck. One per op.


@torch.library.register_fake("falcon_ext::tree_build")
def _tree_build_fake(parents, prefix_len, dtype):
    n = parents.shape[0]
    # retrieve_paths' shape (leaves, max depth + 1) depends on the tree's values.
    ctx = torch.library.get_ctx()
    leaves, columns = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return parents.new_empty(n, prefix_len + n, dtype=dtype), parents.new_empty(n), parents.new_empty(leaves, columns)


@torch.library.register_fake("falcon_ext::tree_verify_greedy")
def _tree_verify_greedy_fake(logits, tokens, parents):
    return tokens.new_empty(tokens.shape[0]), tokens.new_empty(2)


@torch.library.register_fake("falcon_ext::tree_verify_sample")
def _tree_verify_sample_fake(probs, tokens, parents, uniforms):
    return tokens.new_empty(tokens.shape[0]), tokens.new_empty(2)


@torch.library.register_fake("falcon_ext::kv_compact_")
def _kv_compact_fake(kv, path, dst_start):
    return None


@torch.library.register_fake("falcon_ext::tree_build_batched")
def _tree_build_batched_fake(parents, prefix_mask, dtype):
    batch, n = parents.shape
    ctx = torch.library.get_ctx()
    leaves, columns = ctx.new_dynamic_size(), ctx.new_dynamic_size()  # from the trees' values, as in tree_build
    return (parents.new_empty(batch, n, prefix_mask.shape[1] + n, dtype=dtype), parents.new_empty(batch, n),
            parents.new_empty(batch, leaves, columns))


@torch.library.register_fake("falcon_ext::tree_verify_greedy_batched")
def _tree_verify_greedy_batched_fake(logits, tokens, parents):
    return tokens.new_empty(tokens.shape), tokens.new_empty(tokens.shape[0], 2)


@torch.library.register_fake("falcon_ext::tree_verify_sample_batched")
def _tree_verify_sample_batched_fake(probs, tokens, parents, uniforms):
    return tokens.new_empty(tokens.shape), tokens.new_empty(tokens.shape[0], 2)


@torch.library.register_fake("falcon_ext::kv_compact_batched_")
def _kv_compact_batched_fake(kv, paths, dst_starts, src_start):
    return None


@torch.library.register_fake("falcon_ext::falcon_draft_step")
def _falcon_draft_step_fake(x, h0, c0, ctx_k, ctx_v, br_k, br_v, weights, num_heads, eps, encode_only=False,
                            scales=None):
    B, k, H = x.shape[0], x.shape[1], x.shape[2] // 2
    return (x.new_empty(B, k, 0 if encode_only else H), h0.new_empty(h0.shape), c0.new_empty(c0.shape), x.new_empty(B, k, H),
            x.new_empty(B, k, H))


@torch.library.register_fake("falcon_ext::int8_linear")
def _int8_linear_fake(x, weight, scale, bias=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
