"""Drafter ablation on one footing (docs/training.md §5): each drafter gets its own measured tree.

For every ``LABEL=FOLDER`` drafter (e.g. k = 1 / 2 / 3, CSGD against plain, more epochs):
1. its tree: ``tree_tuning.measure_ranks`` on --tune-prompts (the shipped drafter's tuning prompts,
   chat template, never the evaluation sets), drafting --depth tokens (ceil(depth / k) passes),
   and the --tree-size most often accepted nodes (``tree_tuning.best_trees``). No timing: the same
   tree size for all, so the comparison is of acceptance, not of this machine's speed;
2. held-out chain acceptance: the top-1 chain of ceil(depth / k) passes on --chain-sequences
   held-out greedy answers (``train.chain_acceptance``);
3. engine τ: ``speculative_generate``, greedy, with that tree, --max-new-tokens new tokens, on the
   first --prompts MT-Bench first turns and GSM8K-test questions (chat template).

Records go to --out (JSONL, one per drafter and measure, so a rerun resumes), then a table.

  python scripts/ablation.py --out runs/ablation.jsonl k1=runs/abl/k1_b4/final k2=SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from falcon_ext.drafters.checkpoint import drafter_dir
from falcon_ext.evaluation.acceptance import load_drafter, mean_accepted_tokens
from falcon_ext.evaluation.tree_tuning import best_trees, measure_ranks, node_rates
from falcon_ext.prompts import encode_sources
from falcon_ext.targets import load_target, parse_dtype
from falcon_ext.training.data import read_data
from falcon_ext.training.train import chain_acceptance

MEASURES = ("chain", "mt-bench", "gsm8k")


def done(path: Path) -> dict[tuple[str, str], dict]:
    if not path.exists():
        return {}
    return {(r["label"], r["measure"]): r for r in map(json.loads, path.read_text().splitlines())}


def measure(args) -> None:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_target(args.target, parse_dtype(args.dtype))
    heldout = read_data(args.heldout)[1].part(0, args.chain_sequences)
    tune = [torch.tensor(ids) for ids in encode_sources(tokenizer, [args.tune_prompts])]
    sets = {name: encode_sources(tokenizer, [name], args.prompts) for name in MEASURES[1:]}
    eos = getattr(model.generation_config, "eos_token_id", None)
    for label, folder in [d.split("=", 1) for d in args.drafters]:
        if all((label, m) in done(args.out) for m in MEASURES):
            continue
        drafter = load_drafter(str(drafter_dir(folder)), model).eval()
        passes = math.ceil(args.depth / drafter.config.k)
        ranks = measure_ranks(drafter, model, tune, max_new_tokens=args.tune_new_tokens, passes=passes,
                              eos_token_id=eos)
        tree = best_trees(node_rates(ranks), sizes=(args.tree_size,))[args.tree_size]
        for name in MEASURES:
            if (label, name) in done(args.out):
                continue
            start = time.time()
            if name == "chain":
                value = chain_acceptance(drafter, heldout, passes, points_per_seq=args.chain_points)
                extra = {"sequences": len(heldout), "points_per_sequence": args.chain_points}
            else:
                drafter.set_tree(tree)
                extra = mean_accepted_tokens(model, drafter, sets[name], args.max_new_tokens)
                value = extra.pop("mean_accepted_tokens")
            record = {"label": label, "drafter": folder, "k": drafter.config.k, "passes": passes,
                      "measure": name, "value": value, "tree_size": args.tree_size, "tree": tree,
                      "tune_steps": len(ranks), "dtype": args.dtype, "seconds": round(time.time() - start, 1), **extra}
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps({k: v for k, v in record.items() if k != "tree"}), flush=True)


def report(path: Path) -> None:
    rows: dict[str, dict] = {}
    for (label, name), r in done(path).items():
        rows.setdefault(label, {"k": r["k"], "passes": r["passes"]})[name] = r["value"]
    print("| drafter | k | passes | held-out chain acceptance | τ MT-Bench | τ GSM8K-test |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        cells = ["–" if r.get(m) is None else f"{r[m]:.3f}" for m in MEASURES]
        print(f"| {label} | {r['k']} | {r['passes']} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("drafters", nargs="*", help="LABEL=FOLDER (a drafter folder or shipped name)")
    p.add_argument("--out", type=Path, required=True, help="JSONL of records (appended; a rerun resumes)")
    p.add_argument("--heldout", default="runs/sg_heldout", help="data folder of greedy answers to held-out conversations")
    p.add_argument("--target", default="SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tune-prompts", default=str(drafter_dir("SmolLM2-135M-Instruct") / "tune_prompts.jsonl"))
    p.add_argument("--tune-new-tokens", type=int, default=96)
    p.add_argument("--depth", type=int, default=8, help="drafted tokens per step before the tree is cut")
    p.add_argument("--tree-size", type=int, default=24)
    p.add_argument("--prompts", type=int, default=80, help="first N of MT-Bench and of GSM8K-test")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chain-sequences", type=int, default=32)
    p.add_argument("--chain-points", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if not args.report_only:
        measure(args)
    report(args.out)


if __name__ == "__main__":
    main()
