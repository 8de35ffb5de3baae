"""Several drafters' guesses verified together: the union of their trees, in one target forward.

Falcon's drafter predicts what the model tends to write; prompt lookup finds what it is copying
from its context. Each wins where the other is weak (on MT-Bench's extraction prompts prompt
lookup accepts 2.85 tokens a step, SmolLM2's Falcon drafter 1.90: benchmarks/RESULTS.md), and
verifying a few more tokens costs little where a forward over N tokens is nearly the price of
one (bf16 on CPU, GPUs). So ``UnionDrafter(falcon, PromptLookupDrafter())`` drafts with both
and the target verifies the merged tree. Lossless whatever the parts propose: the target checks
every token.
"""
from __future__ import annotations

import torch

from ..engine.drafting import BatchDrafter, Drafter, DraftTree


def merge_trees(trees: list[DraftTree]) -> DraftTree:
    """The trie union of trees with the same root: a node for every distinct token path of any of
    them. The first tree's nodes keep their indices and sibling order (sampling tries children in
    index order); each later tree only appends the paths the earlier ones lack."""
    if not trees:
        raise ValueError("merge_trees needs at least one tree")
    # Each tree read to the host once (on CUDA: one copy per part and step).
    host = [(tree.tokens.tolist(), tree.parents.tolist()) for tree in trees]
    for _, parents in host:  # a part's malformed tree must be refused, not silently reshaped by the merge
        if not parents or parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i):
            raise ValueError(f"a tree to merge must have parents[0] == -1 and 0 <= parents[i] < i, got {parents}")
    first = trees[0]
    if len(trees) == 1:
        return first
    tokens, parents = host[0]
    children: list[dict[int, int]] = [{} for _ in tokens]
    for node in range(1, len(tokens)):
        children[parents[node]][tokens[node]] = node
    for their_tokens, their_parents in host[1:]:
        if their_tokens[0] != tokens[0]:
            raise ValueError(f"trees to merge must share their root (the next token): "
                             f"{tokens[0]} and {their_tokens[0]}")
        ours = [0] * len(their_tokens)  # their node -> our node
        for node in range(1, len(their_tokens)):
            parent, token = ours[their_parents[node]], their_tokens[node]
            if token not in children[parent]:
                children[parent][token] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                children.append({})
            ours[node] = children[parent][token]
    return DraftTree(torch.tensor(tokens, dtype=torch.int64, device=first.tokens.device),
                     torch.tensor(parents, dtype=torch.int64, device=first.parents.device))


class UnionDrafter:
    """A drafter whose tree is the union (``merge_trees``) of its parts' trees, the first part's
    first. Every part sees every accepted token (and the target's features when any part needs
    them). A ``BatchDrafter`` when every part is one."""

    def __init__(self, *parts: Drafter):
        if len(parts) < 2:
            raise ValueError(f"UnionDrafter needs at least two drafters, got {len(parts)}")
        for part in parts:
            if not isinstance(part, Drafter):
                raise TypeError(f"UnionDrafter parts must be drafters (reset/extend/propose), "
                                f"got {type(part).__name__}")
        self.parts = parts
        self.needs_features = any(part.needs_features for part in parts)

    def __repr__(self) -> str:
        return f"UnionDrafter({', '.join(type(part).__name__ for part in self.parts)})"

    # ---- one prompt
    def reset(self) -> None:
        for part in self.parts:
            part.reset()

    def extend(self, tokens: torch.Tensor, features: torch.Tensor | None, next_token: int) -> None:
        for part in self.parts:
            part.extend(tokens, features if part.needs_features else None, next_token)

    def propose(self) -> DraftTree:
        return merge_trees([part.propose() for part in self.parts])

    # ---- a batch: each row's trees merged
    def reset_rows(self, batch_size: int) -> None:
        for part in self.parts:
            if not isinstance(part, BatchDrafter):
                raise ValueError(f"a batch needs every UnionDrafter part to be a falcon_ext.BatchDrafter; "
                                 f"{type(part).__name__} is not")
        for part in self.parts:
            part.reset_rows(batch_size)

    def extend_rows(self, rows: list[int], tokens: list[torch.Tensor], features: list[torch.Tensor] | None,
                    next_tokens: list[int]) -> None:
        for part in self.parts:
            part.extend_rows(rows, tokens, features if part.needs_features else None, next_tokens)

    def propose_rows(self, rows: list[int]) -> list[DraftTree]:
        per_part = [part.propose_rows(rows) for part in self.parts]
        return [merge_trees(list(row_trees)) for row_trees in zip(*per_part, strict=True)]
