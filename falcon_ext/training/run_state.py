"""Training checkpoints: drafter (config.json + model.safetensors), AdamW state and the data/noise
RNG as safetensors, step and history as JSON; never pickles.

<out>/checkpoints/step_<n>/ is written in a temporary folder and renamed into place, then
<out>/latest.json is replaced atomically to point at it, so a kill at any moment leaves the
previous checkpoint intact. A step saved again (the end-of-training evaluation re-saves the
last step with its results) goes to a new folder, step_<n>_<revision>: the folder latest.json
names is never modified or deleted while it names it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..drafters.falcon import FalconDrafter


def _optimizer_tensors(opt, params: list[str]) -> tuple[dict, dict]:
    """AdamW state as flat tensors (safetensors) + the param groups (json)."""
    state = opt.state_dict()
    tensors = {f"{params[i]}.{key}": v.detach().cpu().contiguous()
               for i, s in state["state"].items() for key, v in s.items() if torch.is_tensor(v)}
    groups = [{key: v for key, v in g.items() if key != "params"} for g in state["param_groups"]]
    return tensors, {"param_groups": groups}


def _restore_optimizer(opt, params: list[str], tensors: dict, groups: list[dict]) -> None:
    state = opt.state_dict()
    restored = {}
    for i, name in enumerate(params):
        keys = {t.split(".")[-1] for t in tensors if t.rsplit(".", 1)[0] == name}
        if keys:
            restored[i] = {key: tensors[f"{name}.{key}"] for key in keys}
    for group, saved in zip(state["param_groups"], groups):
        group.update({key: tuple(v) if isinstance(v, list) else v for key, v in saved.items()})
    opt.load_state_dict({"state": restored, "param_groups": state["param_groups"]})


def save_checkpoint(out: Path, drafter, opt, step: int, gen: torch.Generator, history: dict, keep: int) -> None:
    ckpts = out / "checkpoints"
    # Never reuse a folder name: removing and rewriting the folder latest.json names would leave
    # it naming a missing or half-deleted folder if the process died in between.
    name, revision = f"step_{step:08d}", 0
    while (ckpts / name).exists():
        revision += 1
        name = f"step_{step:08d}_{revision:03d}"
    final, tmp = ckpts / name, ckpts / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    drafter.save_pretrained(tmp)
    params = [n for n, _ in drafter.named_parameters()]
    tensors, groups = _optimizer_tensors(opt, params)
    tensors["rng_state"] = gen.get_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **groups, "history": history}))
    os.replace(tmp, final)
    latest = out / "latest.json"
    (out / "latest.json.tmp").write_text(json.dumps({"checkpoint": final.name, "step": step}))
    os.replace(out / "latest.json.tmp", latest)
    # Names sort by step, then revision: the newest, which latest.json names, sorts last.
    # keep = 0 keeps every checkpoint (a scaling curve measures each of them).
    for old in sorted(ckpts.glob("step_*"))[:-keep] if keep else []:
        shutil.rmtree(old)


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is missing or corrupt: {e}") from None
    if not isinstance(body, dict) or not set(keys) <= set(body):
        raise ValueError(f"{path} is corrupt: expected a JSON object with the keys {list(keys)}")
    return body


def load_checkpoint(out: Path, drafter, opt, gen: torch.Generator) -> tuple[int, dict]:
    """Restores the newest checkpoint; returns (step, history), (0, {}) when there is none.
    Raises ValueError naming the file when the checkpoint is incomplete or corrupt."""
    latest = out / "latest.json"
    if not latest.exists():
        return 0, {}
    name = _read_json(latest, ("checkpoint",))["checkpoint"]
    ckpt = out / "checkpoints" / str(name)
    if not isinstance(name, str) or not re.fullmatch(r"step_\d+(_\d+)?", name) or not ckpt.is_dir():
        raise ValueError(f"{latest} names checkpoint {name!r}, which is not a folder in {out / 'checkpoints'}")
    loaded = FalconDrafter.from_pretrained(ckpt, target=drafter.target)
    drafter.load_state_dict(loaded.state_dict())
    path = ckpt / "optimizer.safetensors"
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own error type for truncated or foreign (e.g. pickle) files
        raise ValueError(f"{path} is missing, corrupt or truncated: {e}") from None
    if "rng_state" not in tensors:
        raise ValueError(f"{path} has no rng_state: not a training checkpoint")
    gen.set_state(tensors.pop("rng_state"))
    state = _read_json(ckpt / "state.json", ("step", "param_groups", "history"))
    _restore_optimizer(opt, [n for n, _ in drafter.named_parameters()], tensors, state["param_groups"])
    return state["step"], state["history"]
