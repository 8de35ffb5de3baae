"""Sampling settings and the target-distribution warp shared by every decoding stage.

The warp matches transformers' sampling (temperature, then top-k, then top-p, as its
logits processors apply them), so speculative sampling reproduces exactly the distribution
that ``model.generate(do_sample=True, ...)`` samples from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """temperature == 0 means greedy; top_k == 0 and top_p == 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {k!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def resolve(cls, generation_config, temperature, top_k, top_p) -> "SamplingConfig":
        """Explicit arguments win; unset ones come from the model's generation_config.

        With ``temperature=None`` the model's ``do_sample`` decides: greedy unless it is True.
        """
        gc = generation_config
        if temperature is None:
            temperature = (getattr(gc, "temperature", None) or 1.0) if getattr(gc, "do_sample", False) else 0.0
        if top_k is None:
            top_k = getattr(gc, "top_k", None) or 0
        if top_p is None:
            top_p = getattr(gc, "top_p", None) or 1.0
        return cls(float(temperature) if isinstance(temperature, int) else temperature, top_k, top_p)


def warp_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Target probabilities after temperature, top-k and top-p, computed in float32.

    Shape: logits [N, V] -> probs [N, V] (rows sum to 1).
    """
    scores = logits.float() / cfg.temperature
    vocab = scores.shape[-1]
    if 0 < cfg.top_k < vocab:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1.0 - cfg.top_p)
        drop[..., -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores.softmax(dim=-1)
