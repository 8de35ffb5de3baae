"""Mean accepted tokens of a Falcon drafter, measured with the real engine on held-out prompts."""
from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from ..drafters.falcon import FalconDrafter, choose_weight_format
from ..engine.generate import speculative_generate


def load_drafter(name_or_path: str, target, weights: str = "auto"):
    """A drafter folder or shipped name, run in its target's dtype with ``weights`` chosen by
    ``choose_weight_format`` and announced on stderr (what the CLI tools use)."""
    weight = target.get_input_embeddings().weight
    drafter = FalconDrafter.from_pretrained(name_or_path, target=target, dtype=weight.dtype)
    weight_format, reason = choose_weight_format(weights, weight.device, weight.dtype)
    drafter.set_weight_format(weight_format)
    print(f"drafter weights {weight_format}: {reason}", file=sys.stderr, flush=True)
    return drafter


@torch.no_grad()
def mean_accepted_tokens(model, drafter, prompts: list[list[int]], max_new_tokens: int = 128,
                         temperature: float = 0.0, seed: int = 0, progress: bool = True) -> dict:
    """Runs ``speculative_generate`` on each prompt; pools the steps of all prompts (Spec-Bench's
    "#Mean Accepted Tokens": tokens emitted per target forward, the target's own token included)."""
    device = model.get_input_embeddings().weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    lengths, new_tokens = [], 0
    for ids in tqdm(prompts, desc="eval", unit="prompt", disable=not progress):
        drafter.reset()
        out = speculative_generate(model, drafter, torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=0, top_p=1.0, generator=generator)
        lengths.extend(out.accept_lengths)
        new_tokens += out.sequences.shape[1] - len(ids)
    return {"mean_accepted_tokens": sum(lengths) / max(len(lengths), 1), "prompts": len(prompts),
            "steps": len(lengths), "new_tokens": new_tokens, "temperature": temperature,
            "max_new_tokens": max_new_tokens}
