"""Load a target model + tokenizer from a name, an HF folder or a GGUF file."""
from __future__ import annotations

from pathlib import Path

import torch

EMBEDDED = Path(__file__).parent / "models"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def resolve_target(spec: str) -> Path:
    """A target spec is the name of an embedded model (stories260K), the name SmolLM2-135M-Instruct
    (fetched and converted once into the cache), an HF folder, or a .gguf file."""
    from . import smollm2

    if (EMBEDDED / spec / "config.json").exists():
        return EMBEDDED / spec
    if spec == smollm2.NAME:
        return smollm2.ensure_local()
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"target {spec!r} is neither a known model name nor an existing path")
    return path


def load_target(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Returns (model in eval mode with frozen weights, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_target(spec)
    if path.suffix == ".gguf":
        kw = {"gguf_file": path.name}
        path = path.parent
    else:
        kw = {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer
