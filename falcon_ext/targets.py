"""Loading target models: the embedded stories260K default, SmolLM2-135M-Instruct (fetched and
converted once, see falcon_ext.downloads), any local HF folder, or a .gguf file."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from . import downloads

EMBEDDED = {"stories260K": os.path.join(os.path.dirname(__file__), "models", "stories260K")}
# stories260K ends a story with BOS (id 1), never EOS (2): llama2.c's run.c stops on BOS.
EMBEDDED_EOS = {"stories260K": [1, 2]}

# The one table of dtype names every command accepts; the first name of each dtype is canonical.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the canonical names, as dtype_name writes them
# /proc/cpuinfo flags that give a CPU native bf16 arithmetic (AVX512-BF16 dot products, AMX tiles).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name ("float32", "bfloat16", "float16"): config files and tree keys use it."""
    return str(dtype).removeprefix("torch.")


def cpu_bf16_flags() -> list[str]:
    """The bf16 instruction-set flags this CPU reports (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_BF16_FLAGS if flag in flags]
    except OSError:
        pass
    return []


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a command runs its target in, and why (printed as one line)."""

    dtype: torch.dtype
    reason: str

    def __str__(self) -> str:
        return f"dtype {dtype_name(self.dtype)}: {self.reason}"


def device_bf16(device: str | torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and what says so."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return torch.cuda.is_bf16_supported(including_emulation=False), f"CUDA GPU {name}"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        return bool(flags), f"this CPU ({', '.join(flags)})" if flags else "this CPU (no avx512_bf16/amx_bf16 flag)"
    return False, f"device type {device.type}"


def choose_dtype(name: str, device: str | torch.device, bf16: tuple[bool, str] | None = None) -> DtypeChoice:
    """The dtype for ``--dtype name`` on ``device``.

    ``auto``: bfloat16 where the device computes it natively (CUDA GPUs that support it, CPUs
    with avx512_bf16 or amx_bf16), float32 elsewhere. An explicit dtype the device cannot run
    is an error rather than a slow emulation or garbage: bfloat16 without native support,
    float16 on a CPU (no fp16 arithmetic in torch's CPU kernels worth running a model on).
    ``bf16`` overrides the device probe (tests).
    """
    device = torch.device(device)
    supported, what = bf16 if bf16 is not None else device_bf16(device)
    if name == "auto":
        if supported:
            return DtypeChoice(torch.bfloat16, f"auto, {what} supports bf16 natively")
        return DtypeChoice(torch.float32, f"auto, {what} lacks native bf16")
    dtype = parse_dtype(name)
    if dtype == torch.bfloat16 and not supported:
        raise ValueError(f"--dtype {name}: {what} has no native bf16 arithmetic; use --dtype float32 "
                         f"(or auto)")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError(f"--dtype {name}: float16 is not supported on a CPU; use --dtype bfloat16 where the "
                         f"CPU has avx512_bf16/amx_bf16, else float32 (or auto)")
    return DtypeChoice(dtype, "as requested")


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """``choose_dtype``, announced on one line of stderr (stdout may be a command's JSON result):
    what every command runs before loading its target."""
    choice = choose_dtype(name, device)
    print(choice, file=sys.stderr, flush=True)
    return choice.dtype


def eos_token_ids(model, tokenizer=None) -> list[int]:
    """The target's stop tokens: its generation_config's eos_token_id, else the tokenizer's (when
    given); [] when neither has one."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def resolve_target(name_or_path: str) -> str:
    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path]
    if name_or_path == downloads.NAME:
        return str(downloads.ensure_local())
    if os.path.isdir(name_or_path) or (os.path.isfile(name_or_path) and name_or_path.endswith(".gguf")):
        return name_or_path
    raise FileNotFoundError(f"no target model {name_or_path!r}: give a local Hugging Face model folder, a .gguf "
                            f"file, {downloads.NAME!r} or one of the embedded models {sorted(EMBEDDED)}")


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
