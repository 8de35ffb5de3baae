"""Falcon drafter checkpoints: config.json + model.safetensors, tied to one target model.

The drafter reuses the target's embedding and LM head, so a checkpoint is only meaningful
with the target it was trained for. config.json records that target's identity (class, model
type, sizes, and a fingerprint: fixed samples of the embedding and LM-head weights), and
loading against another target is an error. The fingerprint is compared with a tolerance so
the same target loaded in bf16/fp16 instead of fp32 still matches.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..targets import dtype_name

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "falcon_ext.FalconDrafter"
_SAMPLES = 64
# bf16 keeps 8 significant bits (relative error <= 2^-9), so 1e-2 accepts a bf16/fp16 copy of
# the same weights while two independently initialised or trained matrices differ by O(1).
_RTOL, _ATOL = 1e-2, 1e-5
SHIPPED = Path(__file__).parent  # drafters shipped in the package (folders beside this module), loadable by name


def _sample(weight: torch.Tensor) -> list[float]:
    flat = weight.detach().reshape(-1)
    # clamp: in float32, linspace rounds the last index up to numel for tensors over 2^24 elements
    index = torch.linspace(0, flat.numel() - 1, _SAMPLES, device=flat.device).long().clamp_(max=flat.numel() - 1)
    return [float(f"{v:.6g}") for v in flat[index].float().cpu().tolist()]


def target_identity(target: nn.Module) -> dict:
    """What a drafter checkpoint records about its target."""
    emb = target.get_input_embeddings().weight
    head = target.get_output_embeddings().weight
    return {
        "architecture": type(target).__name__,
        "model_type": getattr(getattr(target, "config", None), "model_type", None),
        "hidden_size": int(emb.shape[1]),
        "vocab_size": int(head.shape[0]),
        "fingerprint": {"embedding": _sample(emb), "lm_head": _sample(head)},
    }


def check_target(config, target: nn.Module) -> None:
    """ValueError unless ``target`` is the model ``config`` was made for."""
    emb = target.get_input_embeddings()
    head = target.get_output_embeddings()
    if emb is None or head is None:
        raise ValueError(f"{type(target).__name__} has no input embedding or LM head; Falcon needs both")
    if emb.weight.shape[1] != config.hidden_size or head.weight.shape[0] != config.vocab_size:
        raise ValueError(f"drafter expects hidden_size={config.hidden_size}, vocab_size={config.vocab_size}; "
                         f"the target has hidden_size={emb.weight.shape[1]}, vocab_size={head.weight.shape[0]}")
    if not config.target:
        return
    found = target_identity(target)
    for key in ("architecture", "model_type", "hidden_size", "vocab_size"):
        if config.target.get(key) != found[key]:
            raise ValueError(f"wrong target: drafter was made for {key}={config.target.get(key)!r}, "
                             f"got {found[key]!r}")
    for key, samples in found["fingerprint"].items():
        expected = torch.tensor(config.target["fingerprint"][key])
        if expected.shape != (len(samples),) or not torch.allclose(torch.tensor(samples), expected,
                                                                   rtol=_RTOL, atol=_ATOL):
            raise ValueError(f"wrong target: its {key} weights do not match the fingerprint recorded with "
                             f"this drafter (same architecture and sizes, different weights)")


def check_vocab(token_ids, vocab_size: int) -> torch.Tensor:
    """``token_ids`` as int64 if they are a non-empty, strictly increasing 1-D list of ids < vocab_size."""
    ids = torch.as_tensor(token_ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"a draft vocabulary must be a non-empty 1-D tensor of token ids, got "
                         f"{ids.dtype} of shape {list(ids.shape)}")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size or (ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all())):
        raise ValueError(f"a draft vocabulary must hold sorted, distinct token ids in [0, {vocab_size})")
    return ids


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(drafter, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in drafter.state_dict().items()}
    _write_atomic(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    body = {"format": FORMAT, **drafter.config.to_dict()}
    _write_atomic(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(body, indent=2) + "\n"))


def read_config(directory, config_cls):
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a FalconDrafter checkpoint")
    try:
        body = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt (not valid JSON): {e}") from None
    if not isinstance(body, dict) or body.pop("format", None) != FORMAT:
        raise ValueError(f"{path} is not a FalconDrafter config (missing \"format\": \"{FORMAT}\")")
    try:
        return config_cls(**body)
    except TypeError as e:
        raise ValueError(f"{path} has unknown or missing fields: {e}") from None


def read_weights(directory, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked against ``expected`` (a state_dict) by name and shape."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{path} is corrupt or truncated: {e}") from None
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the config: missing {missing}, unexpected {unexpected}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{path}: {name} has shape {list(t.shape)}, config implies {list(expected[name].shape)}")
    return tensors


def drafter_dir(name_or_path) -> Path:
    """A drafter folder: a path, or the name of a drafter shipped in falcon_ext/drafters/."""
    path = Path(name_or_path)
    if (path / CONFIG_NAME).exists():
        return path
    if (SHIPPED / str(name_or_path) / CONFIG_NAME).exists():
        return SHIPPED / str(name_or_path)
    shipped = sorted(p.name for p in SHIPPED.iterdir() if (p / CONFIG_NAME).exists()) if SHIPPED.exists() else []
    raise FileNotFoundError(f"no drafter {str(name_or_path)!r}: give a folder with {CONFIG_NAME} or one of {shipped}")


def load(cls, name_or_path, target: nn.Module, dtype: torch.dtype | None = None):
    """A drafter of class ``cls`` (its config read into ``cls.config_class``) from a folder or shipped name."""
    directory = drafter_dir(name_or_path)
    config = read_config(directory, cls.config_class)
    if dtype is not None:  # e.g. a drafter stored in bf16 (half the bytes) run in fp32 on a CPU
        config.dtype = dtype_name(dtype)
    drafter = cls(config, target)
    drafter.load_state_dict(read_weights(directory, drafter.state_dict()))  # casts to the config's dtype
    if drafter.draft_vocab is not None:
        try:
            check_vocab(drafter.draft_vocab, config.vocab_size)
        except ValueError as e:
            raise ValueError(f"{directory / WEIGHTS_NAME} has a corrupt draft_vocab: {e}") from None
    return drafter
