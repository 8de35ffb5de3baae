"""Plain-PyTorch references of the tree ops and random inputs for them (tests and benchmarks).

The references are written independently of csrc/: a different algorithm where one exists
(ancestor matrix by repeated parent lookup, EAGLE-style greedy verification over retrieve
paths), float64 where the ops use float32. They are slow and meant only to check the ops.
"""
from __future__ import annotations

import torch

# ---- trees and op inputs ----


def random_tree(n: int, generator: torch.Generator, shape: str = "random") -> torch.Tensor:
    """Parents [n] int64 of a tree in topological order.

    shape: "random" (uniform parent among earlier nodes), "chain", "star" (every node a child of
    the root), "wide" (root, then nodes spread over a few levels of ~sqrt(n) children each).
    """
    parents = torch.empty(n, dtype=torch.int64)
    parents[0] = -1
    for i in range(1, n):
        if shape == "random":
            parents[i] = int(torch.randint(0, i, (1,), generator=generator))
        elif shape == "chain":
            parents[i] = i - 1
        elif shape == "star":
            parents[i] = 0
        elif shape == "wide":
            width = max(1, int(n**0.5))
            parents[i] = 0 if i <= width else int(torch.randint(max(1, i - 2 * width), i, (1,), generator=generator))
        else:
            raise ValueError(f"unknown tree shape {shape!r}")
    return parents


def distinct_sibling_tokens(parents: torch.Tensor, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Draft tokens [n] with distinct tokens among siblings, as a top-k drafter produces them."""
    n = parents.numel()
    tokens = torch.empty(n, dtype=torch.int64)
    tokens[0] = int(torch.randint(0, vocab, (1,), generator=generator))
    for node in range(n):
        children = (parents == node).nonzero().flatten()
        if len(children) > vocab:
            raise ValueError(f"node {node} has {len(children)} children, more than vocab {vocab}")
        tokens[children] = torch.randperm(vocab, generator=generator)[: len(children)]
    return tokens


def greedy_inputs(n: int, vocab: int, shape: str, dtype: torch.dtype, seed: int):
    """(logits [n, vocab], tokens, parents) whose greedy verification accepts a random-length
    prefix of a random root-to-leaf path (the target's argmax is forced along it)."""
    g = torch.Generator().manual_seed(seed)
    parents = random_tree(n, g, shape)
    tokens = distinct_sibling_tokens(parents, vocab, g)
    logits = torch.randn(n, vocab, generator=g)
    chain = [int(torch.randint(0, n, (1,), generator=g))]
    while chain[-1] > 0:
        chain.append(int(parents[chain[-1]]))
    for child, parent in zip(chain[:-1], chain[1:]):  # the target's argmax at parent = child's token
        logits[parent, tokens[child]] = logits[parent].max() + 1.0
    return logits.to(dtype), tokens, parents


def sample_inputs(n: int, vocab: int, shape: str, dtype: torch.dtype, seed: int):
    """(probs [n, vocab], tokens, parents, uniforms [n + 1]): peaked target weights with some
    exact zeros; each node's first child drafts the target's favourite token (so that sampling
    accepts a few nodes, as with a good drafter), its other children distinct other tokens."""
    g = torch.Generator().manual_seed(seed)
    parents = random_tree(n, g, shape)
    probs = torch.softmax(5 * torch.randn(n, vocab, generator=g), dim=-1)
    probs[torch.rand(n, vocab, generator=g) < 0.2] = 0
    tokens = distinct_sibling_tokens(parents, vocab, g)
    for node in range(n):
        children = (parents == node).nonzero().flatten()
        if len(children):
            favourite = probs[node].argmax()
            tokens[children[tokens[children] == favourite]] = int(tokens[children[0]])  # keep siblings distinct
            tokens[children[0]] = favourite
    uniforms = torch.rand(n + 1, generator=g)
    return probs.to(dtype), tokens, parents, uniforms


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """[n, n] bool: entry (i, j) is True when j is i or an ancestor of i (repeated parent lookup)."""
    n = parents.numel()
    rows = torch.arange(n)
    visible = torch.zeros(n, n, dtype=torch.bool)
    node = rows.clone()
    for _ in range(n):
        alive = node >= 0
        visible[rows[alive], node[alive]] = True
        node = torch.where(alive, parents[node.clamp(min=0)], torch.full_like(node, -1))
    return visible


# ---- tree_build ----


def reference_tree_build(parents: torch.Tensor, prefix_len: int, dtype: torch.dtype = torch.float32):
    visible = ancestor_matrix(parents)
    n = parents.numel()
    depth = visible.sum(dim=1) - 1
    tree_mask = torch.zeros(n, n, dtype=dtype).masked_fill(~visible, float("-inf"))
    mask = torch.cat([torch.zeros(n, prefix_len, dtype=dtype), tree_mask], dim=1)
    is_leaf = ~torch.isin(torch.arange(n), parents[1:])
    leaves = torch.arange(n)[is_leaf]
    paths = torch.full((len(leaves), int(depth.max()) + 1), -1, dtype=torch.int64)
    for row, leaf in enumerate(leaves.tolist()):
        ancestors = visible[leaf].nonzero().flatten()  # ascending ids == ascending depth
        paths[row, : len(ancestors)] = ancestors
    return mask, prefix_len + depth, paths


# ---- tree_verify_greedy ----


def reference_verify_greedy(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor):
    """EAGLE-style: along every root-to-leaf path, cumprod of (draft token == target argmax at
    its parent); the longest accepted prefix wins. Assumes distinct tokens among siblings (then
    the accepted path is unique)."""
    n = parents.numel()
    _, _, paths = reference_tree_build(parents, 0)
    target = logits.float().argmax(dim=-1)  # first maximum on ties
    valid = paths[:, 1:] >= 0
    drafted = tokens[paths[:, 1:].clamp(min=0)]
    predicted = target[paths[:, :-1].clamp(min=0)]
    matches = ((drafted == predicted) & valid).long().cumprod(dim=1)
    accepted = 1 + matches.sum(dim=1)
    best = int(accepted.argmax())
    count = int(accepted[best])
    path = torch.full((n,), -1, dtype=torch.int64)
    path[:count] = paths[best, :count]
    return path, torch.tensor([count, int(target[path[count - 1]])])


# ---- tree_verify_sample ----


def reference_verify_sample(probs: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, uniforms: torch.Tensor):
    """The rejection rule of falcon_ext.engine.ops.tree_verify_sample as a plain loop in float64."""
    n = parents.numel()
    p64 = probs.double().clamp(min=0)
    u = uniforms.double()
    path = [0]
    while True:
        node = path[-1]
        residual = p64[node].clone()
        accepted = None
        for child in range(node + 1, n):
            if int(parents[child]) != node:
                continue
            token = int(tokens[child])
            if u[child] * residual.sum() < residual[token]:
                accepted = child
                break
            residual[token] = 0
        if accepted is None:
            break
        path.append(accepted)
    if residual.sum() > 0:
        cdf = residual.cumsum(0)
        next_token = int((cdf > u[n] * cdf[-1]).nonzero()[0])
    else:
        next_token = int(p64[node].argmax())
    out = torch.full((n,), -1, dtype=torch.int64)
    out[: len(path)] = torch.tensor(path)
    return out, torch.tensor([len(path), next_token])


# ---- kv_compact_ ----


def reference_kv_compact_(kv: list[torch.Tensor], path: torch.Tensor, dst_start: int) -> None:
    for t in kv:
        t[:, :, dst_start : dst_start + path.numel()] = t[:, :, dst_start + path].clone()


# ---- batched ops: rows padded to the largest tree (parent -1 marks padding) ----


def pad_rows(rows: list[torch.Tensor], width: int, value) -> torch.Tensor:
    """[len(rows), width, *rest]: each row's leading entries, then ``value``."""
    out = torch.full((len(rows), width, *rows[0].shape[1:]), value, dtype=rows[0].dtype)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


def tree_sizes(parents: torch.Tensor) -> list[int]:
    """Node count of each row of padded parents [B, N]: nodes before the first padding (-1 past 0)."""
    sizes = []
    for row in parents.tolist():
        sizes.append(next((i for i in range(1, len(row)) if row[i] == -1), len(row)))
    return sizes


def reference_tree_build_batched(parents: torch.Tensor, prefix_mask: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Per row: reference_tree_build on the row's tree, the prefix columns taken from prefix_mask,
    padding nodes seeing only themselves, positions from the visible prefix count."""
    batch, n = parents.shape
    prefix_len = prefix_mask.shape[1]
    sizes = tree_sizes(parents)
    mask = torch.full((batch, n, prefix_len + n), float("-inf"), dtype=dtype)
    positions = torch.empty(batch, n, dtype=torch.int64)
    rows = []
    for b, size in enumerate(sizes):
        seen = int(prefix_mask[b].bool().sum())
        row_mask, row_pos, row_paths = reference_tree_build(parents[b, :size], seen, dtype)
        mask[b, :size, :prefix_len] = torch.where(prefix_mask[b].bool(), 0.0, float("-inf")).to(dtype)
        mask[b, :size, prefix_len : prefix_len + size] = row_mask[:, seen:]
        pad = torch.arange(size, n)
        mask[b, pad, prefix_len + pad] = 0
        positions[b, :size] = row_pos
        positions[b, size:] = seen
        rows.append(row_paths)
    paths = torch.full((batch, max(len(r) for r in rows), max(r.shape[1] for r in rows)), -1, dtype=torch.int64)
    for b, row in enumerate(rows):
        paths[b, : row.shape[0], : row.shape[1]] = row
    return mask, positions, paths


def _batched(per_row, *args, extra=None):
    n = args[0].shape[1]
    outputs = []
    for b, size in enumerate(tree_sizes(args[-1])):
        row_args = [a[b, :size] for a in args] + ([extra[b, : size + 1]] if extra is not None else [])
        path, result = per_row(*row_args)
        outputs.append((path, result))
    return pad_rows([p for p, _ in outputs], n, -1), torch.stack([r for _, r in outputs])


def reference_verify_greedy_batched(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor):
    """reference_verify_greedy on each row's first n_b nodes, paths -1 padded to N."""
    return _batched(reference_verify_greedy, logits, tokens, parents)


def reference_verify_sample_batched(probs: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                                    uniforms: torch.Tensor):
    """reference_verify_sample on each row's first n_b nodes with uniforms[b, :n_b + 1]."""
    return _batched(reference_verify_sample, probs, tokens, parents, extra=uniforms)


def reference_kv_compact_batched_(kv: list[torch.Tensor], paths: torch.Tensor, dst_starts: list[int],
                                  src_start: int) -> None:
    for t in kv:
        for b, row in enumerate(paths.tolist()):
            path = torch.tensor([p for p in row if p >= 0])
            t[b, :, dst_starts[b] : dst_starts[b] + len(path)] = t[b, :, src_start + path].clone()
