"""The engine's KV cache: the HF cache API over buffers reserved once, written in place.

transformers' ``DynamicCache`` appends with ``torch.cat``: every step copies the layer's whole
cache, so a step's cost grows with the position even where attention does not
(``benchmarks/step_vs_position.py``, RESULTS.md). ``ReservedCache`` keeps each layer's keys
and values in a buffer sized for the whole output (prompt + max_new_tokens + a tree's
slack), appends by writing into it and hands the model views of the filled part. The model
reads the same values in the same order as from a ``DynamicCache``: exact, and the model's
code is untouched (it only sees the ``Cache`` API). Should a step need more room than
reserved (a larger tree than planned), the buffer grows by half at once: amortised, never a
copy per step.
"""
from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicLayer


class ReservedLayer(DynamicLayer):
    """One layer's keys and values [B, H, capacity, D]; ``keys``/``values`` view the first ``length``."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._keys = self._values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self._keys = key_states.new_empty((b, h, self.capacity, d))
        self._values = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.capacity = max(self.capacity, key_states.shape[-2])
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(max(end, self.capacity + self.capacity // 2))
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.keep(end)
        return self.keys, self.values

    def keep(self, length: int) -> None:
        """Keep the first ``length`` positions (the rest is free room for the next update)."""
        if not 0 <= length <= (self.capacity if self.is_initialized else 0):
            raise ValueError(f"cannot keep {length} positions of a layer holding {self.length}")
        self.length = length
        if self.is_initialized:
            self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def select_rows(self, rows: torch.Tensor, start: int, end: int) -> None:
        """Keep only the batch rows ``rows`` and the positions ``start .. end - 1`` (moved to 0)."""
        if not self.is_initialized:
            return
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"cannot keep positions {start}..{end - 1} of a layer holding {self.length}")
        rows = rows.to(self._keys.device)
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_empty((rows.numel(), old.shape[1], self.capacity, old.shape[-1]))
            new[:, :, :end - start] = old[rows, :, start:end]
            setattr(self, name, new)
        self.keep(end - start)

    def crop(self, tokens_to_remove: int) -> None:
        # transformers' convention (negative: that many tokens from the end), as DynamicLayer.crop.
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.keep(max(0, self.length + tokens_to_remove))

    def reset(self) -> None:
        self.length = 0
        self._keys = self._values = None
        super().reset()

    def _grow(self, capacity: int) -> None:
        keys, values = self._keys, self._values
        self._keys = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
        self._values = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
        self._keys[:, :, :self.length] = keys[:, :, :self.length]
        self._values[:, :, :self.length] = values[:, :, :self.length]
        self.capacity = capacity


class ReservedCache(Cache):
    """A ``Cache`` of ``ReservedLayer``s, one per attention layer, each reserving ``capacity`` positions."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        # layers are made lazily, one per layer index the model updates (Cache.update)
        super().__init__(layer_class_to_replicate=partial(ReservedLayer, capacity))

    def keep(self, length: int) -> None:
        """Keep the first ``length`` positions of every layer (after the engine's kv_compact_)."""
        for layer in self.layers:
            layer.keep(length)

    def select_rows(self, rows: torch.Tensor, start: int, end: int) -> None:
        """Keep batch rows ``rows`` (ids, in their new order) and positions ``start .. end - 1`` of
        every layer: a batch drops its finished rows, the left padding and the stale end that no
        remaining row needs."""
        for layer in self.layers:
            layer.select_rows(rows, start, end)
