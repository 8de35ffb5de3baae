"""Loading target models: the embedded stories260K default, SmolLM2-135M-Instruct (fetched and
converted once, see falcon_ext.smollm2), any local HF folder, or a .gguf file."""
from __future__ import annotations

import os

import torch

EMBEDDED = {"stories260K": os.path.join(os.path.dirname(__file__), "models", "stories260K")}
# stories260K ends a story with BOS (id 1), never EOS (2): llama2.c's run.c stops on BOS.
EMBEDDED_EOS = {"stories260K": [1, 2]}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def resolve_target(name_or_path: str) -> str:
    from . import smollm2

    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path]
    if name_or_path == smollm2.NAME:
        return str(smollm2.ensure_local())
    if os.path.isdir(name_or_path) or (os.path.isfile(name_or_path) and name_or_path.endswith(".gguf")):
        return name_or_path
    raise FileNotFoundError(f"no target model {name_or_path!r}: give a local Hugging Face model folder, a .gguf "
                            f"file, {smollm2.NAME!r} or one of the embedded models {sorted(EMBEDDED)}")


def load_target(name_or_path: str = "stories260K", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in eval mode with frozen weights, the generation_config's EOS fixed where known."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_target(name_or_path)
    kw = {}
    if path.endswith(".gguf"):  # transformers dequantises GGUF weights (needs packages gguf + accelerate)
        path, kw["gguf_file"] = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    if name_or_path in EMBEDDED_EOS:
        model.generation_config.eos_token_id = EMBEDDED_EOS[name_or_path]
    return model, tokenizer
