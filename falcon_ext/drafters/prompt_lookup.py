"""Training-free drafting by prompt lookup: continue the text the way it continued before.

The last n tokens of the context (n from ``max_ngram`` down to ``min_ngram``) are looked up
in the earlier context; the tokens that followed each earlier occurrence are candidate
continuations. Up to ``max_branches`` distinct continuations are merged into one tree (a trie
rooted at the next token), so the target can verify several guesses in one forward. With
``max_branches=1`` this is transformers' ``prompt_lookup_num_tokens`` drafting.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..engine.drafting import DraftTree


class PromptLookupDrafter:
    """A ``BatchDrafter``: one lookup context per row of a batch (``falcon_ext.engine.drafting``)."""

    needs_features = False

    def __init__(self, num_tokens: int = 10, max_ngram: int = 3, min_ngram: int = 1, max_branches: int = 1):
        if not (1 <= min_ngram <= max_ngram):
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if num_tokens < 1 or max_branches < 1:
            raise ValueError(f"num_tokens and max_branches must be >= 1, got {num_tokens}, {max_branches}")
        self.num_tokens, self.max_ngram, self.min_ngram, self.max_branches = num_tokens, max_ngram, min_ngram, max_branches
        self.reset()

    # ---- one prompt
    def reset(self) -> None:
        self.reset_rows(1)

    def extend(self, tokens: torch.Tensor, features, next_token: int) -> None:
        self._rows[0].extend(tokens, next_token)

    def propose(self) -> DraftTree:
        return self._rows[0].propose()

    # ---- a batch: the same lookup, one context per row
    def reset_rows(self, batch_size: int) -> None:
        self._rows = [_RowContext(self) for _ in range(batch_size)]

    def extend_rows(self, rows: list[int], tokens: list[torch.Tensor], features, next_tokens: list[int]) -> None:
        for row, row_tokens, next_token in zip(rows, tokens, next_tokens, strict=True):
            self._rows[row].extend(row_tokens, next_token)

    def propose_rows(self, rows: list[int]) -> list[DraftTree]:
        return [self._rows[row].propose() for row in rows]


class _RowContext:
    """One row's context and its n-gram index."""

    def __init__(self, settings: PromptLookupDrafter):
        self.settings = settings
        self.tokens: list[int] = []
        self.next = None
        self.device = torch.device("cpu")
        # n -> n-gram -> end positions in tokens, most recent last (kept incrementally, so a
        # lookup costs O(1) however long the context grows).
        self.index = {n: defaultdict(list) for n in range(settings.min_ngram, settings.max_ngram + 1)}

    def extend(self, tokens: torch.Tensor, next_token: int) -> None:
        self.device = tokens.device
        for t in tokens.tolist():
            self.tokens.append(t)
            end = len(self.tokens)
            for n, table in self.index.items():
                if end >= n:
                    table[tuple(self.tokens[end - n:])].append(end - 1)
        self.next = next_token

    def _continuations(self) -> list[list[int]]:
        s = self.settings
        full = self.tokens + [self.next]
        found, seen = [], set()
        for n in range(s.max_ngram, s.min_ngram - 1, -1):
            if len(full) <= n:
                continue
            for end in reversed(self.index[n].get(tuple(full[-n:]), ())):
                cont = tuple(full[end + 1: end + 1 + s.num_tokens])
                if cont and cont not in seen:
                    seen.add(cont)
                    found.append(list(cont))
                    if len(found) == s.max_branches:
                        return found
        return found

    def propose(self) -> DraftTree:
        if self.next is None:
            raise RuntimeError("PromptLookupDrafter.propose() before extend(): no context yet")
        tokens, parents, children = [self.next], [-1], [{}]
        for cont in self._continuations():
            node = 0
            for t in cont:
                child = children[node].get(t)
                if child is None:
                    child = len(tokens)
                    tokens.append(t)
                    parents.append(node)
                    children.append({})
                    children[node][t] = child
                node = child
        return DraftTree(torch.tensor(tokens, dtype=torch.int64, device=self.device),
                         torch.tensor(parents, dtype=torch.int64, device=self.device))
