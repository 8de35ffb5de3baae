"""Training checkpoints: drafter (config.json + model.safetensors), AdamW state and the data/noise
RNG as safetensors, step and history as JSON; never pickles.

<out>/checkpoints/step_<n>/ is written in a temporary folder and renamed into place, then
<out>/latest.json is replaced atomically to point at it, so a kill at any moment leaves the
previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .falcon import FalconDrafter


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
    final = ckpts / f"step_{step:08d}"
    tmp = ckpts / f".step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    drafter.save_pretrained(tmp)
    params = [n for n, _ in drafter.named_parameters()]
    tensors, groups = _optimizer_tensors(opt, params)
    tensors["rng_state"] = gen.get_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **groups, "history": history}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest = out / "latest.json"
    (out / "latest.json.tmp").write_text(json.dumps({"checkpoint": final.name, "step": step}))
    os.replace(out / "latest.json.tmp", latest)
    for old in sorted(ckpts.glob("step_*"))[:-keep]:
        shutil.rmtree(old)


def load_checkpoint(out: Path, drafter, opt, gen: torch.Generator) -> tuple[int, dict]:
    """Restores the newest checkpoint; returns (step, history), (0, {}) when there is none."""
    latest = out / "latest.json"
    if not latest.exists():
        return 0, {}
    ckpt = out / "checkpoints" / json.loads(latest.read_text())["checkpoint"]
    loaded = FalconDrafter.from_pretrained(ckpt, target=drafter.target)
    drafter.load_state_dict(loaded.state_dict())
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    gen.set_state(tensors.pop("rng_state"))
    state = json.loads((ckpt / "state.json").read_text())
    _restore_optimizer(opt, [n for n, _ in drafter.named_parameters()], tensors, state["param_groups"])
    return state["step"], state["history"]
