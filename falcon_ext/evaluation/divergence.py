"""Low-precision greedy divergences from ``model.generate``: rounding near-ties, or not.

In fp32 the engine's greedy output is token-identical to ``model.generate``. In bf16/fp16 it may
not be, without any bug: the target's logits for a token depend on how the forward was batched
(``generate`` runs one token at a time over its cache; a verify step runs several tokens at once,
with other matmul shapes, accumulation orders and attention kernels), and when the two best
tokens are nearly tied, that rounding decides between them. ``classify`` takes the first position
where an output differs from ``generate``'s and recomputes the target's logits there both ways,
independently of the engine:

- one-token: what ``generate`` itself ran (its own raw logits and hidden states);
- multi-token: plain HF forwards, the prefix before the step into the cache, then the step's
  tokens in one forward (the engine's chain along the accepted path, without the other branches).

It is **explained** when, in both forwards, the two competing tokens' logits are within the
rounding of their difference (``rounding_tolerance``), **unexplained** otherwise: then the
output is not one the target could have produced, i.e. a bug.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from ..engine import target_io

# lam of rounding_tolerance: how many standard deviations of accumulated rounding count as a tie.
CONFIDENCE = 4.0
# Tokens forwarded at once when the step boundaries of the method are unknown (transformers'
# prompt lookup): about one verify step of it (prompt_lookup_num_tokens is 10 by default).
DEFAULT_CHUNK = 8


@dataclass
class Divergence:
    """The first differing new token of an output, and the target's logits there."""

    position: int  # index among the new tokens
    generate_token: int  # what model.generate chose
    other_token: int  # what the output has instead
    gap_one_token: float  # logit(generate_token) - logit(other_token), generate's one-token forward
    gap_multi_token: float  # the same in the multi-token forward
    tolerance: float  # rounding that difference can carry (rounding_tolerance)
    step_start: int  # new-token index where the multi-token forward began

    @property
    def explained(self) -> bool:
        return abs(self.gap_one_token) <= self.tolerance and abs(self.gap_multi_token) <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "explained": self.explained}


def first_divergence(reference: list[int], output: list[int]) -> int | None:
    """Index of the first new token where ``output`` differs from ``reference``; None if equal."""
    if reference == output:
        return None
    for i, (a, b) in enumerate(zip(reference, output)):
        if a != b:
            return i
    # One stopped before the other with no differing token: not a choice between two tokens.
    raise ValueError(f"outputs of {len(reference)} and {len(output)} new tokens agree on their common prefix")


def step_start(accept_lengths: list[int], position: int) -> int:
    """New-token index of the root of the engine step that emitted new token ``position``.

    The prefill emits token 0; step s verifies a tree rooted at token r_s and emits tokens
    r_s + 1 .. r_s + accept_lengths[s], so r_0 = 0 and r_{s+1} = r_s + accept_lengths[s].
    """
    root = 0
    for length in accept_lengths:
        if position <= root + length:
            return root
        root += length
    raise ValueError(f"new token {position} is past the {root + 1} tokens the steps emitted")


def rounding_tolerance(model, features: torch.Tensor, logits: torch.Tensor, a: int, b: int) -> float:
    """How far rounding can move logit(a) - logit(b) between two forwards that compute the same
    function with different batching (one token at a time vs several at once).

    Notation: u, the unit roundoff of the model's dtype (bf16 2^-8, fp16 2^-11, fp32 2^-24);
    u32 = 2^-24, that of the fp32 accumulators PyTorch's CPU and CUDA matmuls use in every
    dtype; h, the hidden state the LM head reads [H]; w_a, w_b, the head's rows; L, the layers;
    K, the longest reduction in a layer (max of the hidden and MLP sizes). Then
    logit(a) - logit(b) = sum_i h_i (w_a,i - w_b,i), and:

    - each logit is rounded to the dtype on output: at most u |logit|, so u (|l_a| + |l_b|);
    - every h_i carries a relative error of size e, independent across i, which moves the
      difference by a sum of H independent terms of standard deviation about
      e * ||h * (w_a - w_b)||_2: the same random-walk model as below, applied to the dot
      product. Its bound holds with probability at least 1 - 2 exp(-lam^2 / 2) for a confidence
      lam (Higham and Mary's lambda); lam = 4 leaves a 0.07 % chance of calling rounding a bug.
      The worst case over the signs (the L1 norm) is about sqrt(H) times larger: for SmolLM2
      it would call gaps of dozens of bf16 ulps "rounding";
    - e: each layer's two residual updates are matmul outputs, accumulated over K terms in fp32
      (batching changes the order: a relative error growing like sqrt(K) u32) and then rounded
      to the dtype (u); with the final norm that is 2L + 1 such roundings, and errors of
      independent operations add like a random walk (Higham and Mary, "A new approach to
      probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019), so
      e = sqrt(2L + 1) (u + sqrt(K) u32).

    tolerance = u (|l_a| + |l_b|) + lam sqrt(2L + 1) (u + sqrt(K) u32) ||h * (w_a - w_b)||_2.

    In bf16 the u terms dominate: for SmolLM2 (L = 30) e is about 0.03, a few bf16 ulps of a
    typical logit gap's mass. In fp32 the accumulation term does (sqrt(K) u32). A token the
    target did not choose (a bug) typically loses by many times the tolerance.
    """
    u, u32 = torch.finfo(features.dtype).eps / 2, torch.finfo(torch.float32).eps / 2
    config = model.config
    hidden = features.shape[-1]
    reduction = max(hidden, getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    relative = math.sqrt(2 * config.num_hidden_layers + 1) * (u + math.sqrt(reduction) * u32)
    weight = model.get_output_embeddings().weight.detach()
    spread = float((features.float() * (weight[a].float() - weight[b].float())).norm())
    return u * (abs(float(logits[a])) + abs(float(logits[b]))) + CONFIDENCE * relative * spread


@torch.no_grad()
def one_token_logits(model, prompt: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Raw logits [V] and last hidden state [H] with which ``model.generate`` chose new token
    ``position`` (greedy, one token per forward over its cache), and the tokens it generated."""
    out = model.generate(prompt, do_sample=False, max_new_tokens=position + 1, temperature=None, top_k=None,
                         top_p=None, output_logits=True, output_hidden_states=True, return_dict_in_generate=True,
                         pad_token_id=model.generation_config.pad_token_id or 0)
    return out.logits[position][0], out.hidden_states[position][-1][0, -1], out.sequences[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def multi_token_logits(model, prompt: torch.Tensor, generated: list[int], position: int,
                       start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [V] and last hidden state [H] for new token ``position`` from plain forwards:
    prompt + generated[:start] into the cache, then generated[start:position] in one forward
    (``position`` 0: the prompt in one forward, as both the engine and generate prefill it)."""
    ids = torch.cat([prompt[0], torch.tensor(generated[:position], dtype=prompt.dtype, device=prompt.device)])
    split = prompt.shape[1] + start if start < position else 0
    cache = {target_io.for_model(model).cache_kwarg: DynamicCache()}
    if split:
        model(ids[None, :split], use_cache=True, **cache)
    out = model(ids[None, split:], use_cache=True, output_hidden_states=True, **cache)
    return out.logits[0, -1], out.hidden_states[-1][0, -1]


def classify(model, prompt: torch.Tensor, reference: list[int], output: list[int],
             accept_lengths: list[int] | None = None) -> Divergence | None:
    """The first divergence of ``output`` (new tokens) from ``reference`` (``model.generate``'s
    greedy new tokens for ``prompt`` [1, T]), or None when they are equal. ``accept_lengths``:
    the engine's tokens per step (``SpeculativeOutput.accept_lengths``), which locate the step
    that emitted the divergent token; without them the last ``DEFAULT_CHUNK`` tokens form it."""
    position = first_divergence(reference, output)
    if position is None:
        return None
    a, b = reference[position], output[position]
    logits_1, hidden_1, regenerated = one_token_logits(model, prompt, position)
    if regenerated != reference[:position + 1]:
        raise ValueError("model.generate does not reproduce the reference output: not the same model or prompt")
    start = max(0, position - DEFAULT_CHUNK) if accept_lengths is None else step_start(accept_lengths, position)
    logits_n, hidden_n = multi_token_logits(model, prompt, reference, position, start)
    tolerance = max(rounding_tolerance(model, hidden_1, logits_1, a, b),
                    rounding_tolerance(model, hidden_n, logits_n, a, b))
    return Divergence(position, a, b, float(logits_1[a] - logits_1[b]), float(logits_n[a] - logits_n[b]),
                      tolerance, start)
