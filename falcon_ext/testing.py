"""Plain-PyTorch references of the tree ops and random inputs for them (tests and benchmarks).

The references are written independently of csrc/: a different algorithm where one exists
(ancestor matrix by repeated parent lookup, EAGLE-style greedy verification over retrieve
paths), float64 where the ops use float32. They are slow and meant only to check the ops.
"""
from __future__ import annotations

import torch

# ---- trees ----


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
    """The rejection rule of falcon_ext.ops.tree_verify_sample as a plain loop in float64."""
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
