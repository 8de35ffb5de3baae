"""Typed Python entry points of the C++/CUDA ops (torch.ops.falcon_ext.*).

Each op has a CPU reference (csrc/<op>.cpp) and a CUDA kernel (csrc/<op>.cu) with the same
contract; the dispatcher picks by the device of the tensors passed in. Shapes: N tree nodes,
V vocabulary, P prefix (already cached) length.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.falcon_ext)

_ops = torch.ops.falcon_ext


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
    return _ops.tree_verify_sample(probs, tokens, parents, uniforms)


def kv_compact_(kv: list[torch.Tensor], path: torch.Tensor, dst_start: int) -> None:
    """In place, for every tensor in ``kv``: entry ``dst_start + path[j]`` moves to ``dst_start + j``.

    Shape:
        kv: list of [B, H, S, D] cache tensors (float16/bfloat16/float32, any strides, one device);
        path: [L] int64 on the tensors' device, strictly increasing node ids with path[0] == 0,
        as tree_verify returns; dst_start + path[-1] < S.
    The tensors must not share memory with each other. On CPU a bad path raises; on CUDA it is
    checked in the kernel (no host sync) and leaves every tensor unchanged without an error.
    """
    _ops.kv_compact_(kv, path, dst_start)
