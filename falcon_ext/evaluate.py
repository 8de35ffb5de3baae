"""Mean accepted tokens of a Falcon drafter, measured with the real engine on held-out prompts."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from . import prompts as prompt_sets
from .targets import add_dtype_argument


def load_drafter(name_or_path: str, target):
    """A drafter folder or shipped name, run in its target's dtype (what the CLI tools use)."""
    from .falcon import FalconDrafter

    return FalconDrafter.from_pretrained(name_or_path, target=target, dtype=target.get_input_embeddings().weight.dtype)


@torch.no_grad()
def mean_accepted_tokens(model, drafter, prompts: list[list[int]], max_new_tokens: int = 128,
                         temperature: float = 0.0, seed: int = 0, progress: bool = True) -> dict:
    """Runs ``speculative_generate`` on each prompt; pools the steps of all prompts (Spec-Bench's
    "#Mean Accepted Tokens": tokens emitted per target forward, the target's own token included)."""
    from .generate import speculative_generate

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


def measured_tree(folder: Path, size: int) -> list[list[int]]:
    """The ``size`` most often accepted nodes recorded by falcon_ext.cdt_tune for this drafter."""
    from .cdt_tune import best_trees

    path = Path(folder) / "cdt_measurement.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m falcon_ext.cdt_tune --drafter {folder} ...` first")
    rates = {tuple(int(r) for r in key.split(",")): v for key, v in json.loads(path.read_text())["node_rates"].items()}
    trees = best_trees(rates, sizes=(size,))
    if size not in trees:
        raise ValueError(f"{path} records only {len(rates)} nodes; ask for a tree of at most that many")
    return trees[size]


def encode_prompts(tokenizer, sources: list[str], limit: int = 0) -> list[list[int]]:
    """Token ids of the prompts in ``sources`` (named sets, files, folders; see
    ``prompts.load_sources``), a user turn through the chat template when the tokenizer has one.
    The one prompt encoder of drafter evaluation and tree tuning, so a tree is tuned on exactly
    the inputs it is evaluated on."""
    chosen = prompt_sets.load_sources(sources)
    chosen = chosen[:limit] if limit else chosen
    template = prompt_sets.use_chat_template(tokenizer)
    return [prompt_sets.encode(tokenizer, p.text, template, None)[0][0].tolist() for p in chosen]


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval-drafter", help="mean accepted tokens of a drafter on prompts (real engine)")
    p.add_argument("--target", required=True, help="model name, HF folder or .gguf")
    p.add_argument("--drafter", required=True, help="drafter folder or shipped name")
    p.add_argument("--prompts", nargs="+", required=True, help="JSONL / text files or folders (first turns)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--passes", type=int, default=0, help="use a top-1 chain of this many drafter passes")
    p.add_argument("--tree-size", type=int, default=0, help="use the best N-node tree from the drafter folder's "
                   "cdt_measurement.json (written by falcon_ext.cdt_tune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_dtype_argument(p)
    p.set_defaults(func=_eval)


def _eval(args) -> None:
    from . import cdt
    from .targets import load_target, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_target(args.target, resolve_dtype(args.dtype, args.device), args.device)
    drafter = load_drafter(args.drafter, model).eval()
    if args.passes:
        drafter.set_tree(cdt.chain(args.passes * drafter.config.k))
    if args.tree_size:
        drafter.set_tree(measured_tree(checkpoint.drafter_dir(args.drafter), args.tree_size))
    result = mean_accepted_tokens(model, drafter, encode_prompts(tokenizer, args.prompts, args.limit),
                                  args.max_new_tokens, args.temperature, args.seed)
    print(json.dumps(result))
