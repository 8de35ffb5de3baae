"""The drafter protocol: what a drafter gives the engine, and what the engine tells it back.

One speculative step: the engine asks ``propose()`` for a tree rooted at the next token (the
token the target already chose but has not yet run), verifies the whole tree in one target
forward, then calls ``extend()`` with the accepted path (now in the target's KV cache), the
target's features at those positions, and the new next token.

Batch > 1: a drafter that keeps one state per row implements ``BatchDrafter`` as well: the same
three calls, for a list of rows at once. The engine decodes a batch only with such a drafter
(a batch-1 drafter gets a clear error), and keeps using the three batch-1 calls for one prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class DraftTree:
    """A draft tree in topological order.

    Shape:
        tokens: [N] int64 on the target's input device; tokens[0] is the root (the next token).
        parents: [N] int64 on the same device; parents[0] == -1, 0 <= parents[i] < i.
    Sibling order matters for sampling: children are tried in index order.
    """

    tokens: torch.Tensor
    parents: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.numel()


@runtime_checkable
class Drafter(Protocol):
    """What ``speculative_generate`` needs from a drafter.

    ``needs_features``: when True, ``extend`` receives the target's features: the hidden
    states its LM head reads (after the final norm), one row per token passed.
    """

    needs_features: bool

    def reset(self) -> None:
        """Forget all context: a new generation begins."""

    def extend(self, tokens: torch.Tensor, features: torch.Tensor | None, next_token: int) -> None:
        """Append context tokens that the target has now processed, and set the next token.

        Shape: tokens [L] int64; features [L, H] (or None when not needed). ``features[i]`` is
        the target's hidden state at ``tokens[i]``, which predicted the token after it; the token
        after ``tokens[-1]`` is ``next_token``, the root of the next tree.
        """

    def propose(self) -> DraftTree:
        """A draft tree rooted at the current next token."""


@runtime_checkable
class BatchDrafter(Drafter, Protocol):
    """A ``Drafter`` that also drafts for a batch of prompts, one independent state per row.

    Rows are the rows of ``speculative_generate``'s ``input_ids``. The engine calls the row
    methods with the rows still decoding, in increasing order; a finished row is never named
    again. Each row's calls mean exactly what the batch-1 calls mean for that row alone.
    """

    def reset_rows(self, batch_size: int) -> None:
        """Forget all context: a new generation of ``batch_size`` rows begins."""

    def extend_rows(self, rows: list[int], tokens: list[torch.Tensor], features: list[torch.Tensor] | None,
                    next_tokens: list[int]) -> None:
        """``extend(tokens[i], features[i], next_tokens[i])`` for row ``rows[i]`` (features None when
        not needed)."""

    def propose_rows(self, rows: list[int]) -> list[DraftTree]:
        """One draft tree per row of ``rows``, each rooted at that row's next token."""
