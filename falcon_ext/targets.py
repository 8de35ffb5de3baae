"""Loading target models: the embedded stories260K default, or any local HF folder."""
from __future__ import annotations

import os

import torch

EMBEDDED = {"stories260K": os.path.join(os.path.dirname(__file__), "models", "stories260K")}
# stories260K ends a story with BOS (id 1), never EOS (2): llama2.c's run.c stops on BOS.
EMBEDDED_EOS = {"stories260K": [1, 2]}


def resolve_target(name_or_path: str) -> str:
    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path]
    if os.path.isdir(name_or_path):
        return name_or_path
    raise FileNotFoundError(f"no target model {name_or_path!r}: give a local Hugging Face model folder "
                            f"or one of the embedded models {sorted(EMBEDDED)}")


def load_target(name_or_path: str = "stories260K", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in eval mode, with the generation_config's EOS fixed where known."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_target(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name_or_path in EMBEDDED_EOS:
        model.generation_config.eos_token_id = EMBEDDED_EOS[name_or_path]
    return model, tokenizer
