"""The data-scaling curve of a one-pass drafter training run (docs/training.md §5).

`falcon-ext train` visits every training sequence once per epoch (train.batch_indices), so its
checkpoint after step s of the first epoch is a drafter trained on the s·batch·seq_len tokens it
has seen, no more. This script measures each kept checkpoint (and the drafter the run started
from, if --init) on:
- held-out chain acceptance: the top-1 chain of --passes drafter passes against the target's own
  greedy answers to held-out conversations (a `prepare-data --split heldout --mode self_distill
  --temperature 0` folder), so it is the engine's greedy chain acceptance, bonus token included;
- engine τ: `speculative_generate` mean accepted tokens, greedy, with the --tree-size node tree
  measured for --tree-from, on the MT-Bench first turns and GSM8K-test questions (chat template).

Results go to <run>/scaling.jsonl, one line per (checkpoint, measurement), so an interrupted run
resumes; then a Markdown table and <run>/scaling.png.

  python scripts/scaling_curve.py --run runs/sg_k2 --heldout runs/sg_heldout --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from falcon_ext.drafters.checkpoint import drafter_dir
from falcon_ext.evaluation.acceptance import load_drafter, mean_accepted_tokens
from falcon_ext.evaluation.tree_tuning import measured_tree
from falcon_ext.prompts import encode_sources
from falcon_ext.targets import load_target, parse_dtype
from falcon_ext.training.data import read_data
from falcon_ext.training.train import chain_acceptance


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(tokens seen, folder) of the init drafter and every kept checkpoint, in training order."""
    cfg = json.loads((run / "train_config.json").read_text())
    found = [(0, drafter_dir(cfg["init"]))] if cfg.get("init") else []
    for folder in sorted((run / "checkpoints").glob("step_*")):
        found.append((json.loads((folder / "state.json").read_text())["history"]["tokens_seen"], folder))
    return found


def log_spaced(found: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """The start, then the checkpoints nearest to 1, 2, 4, ... times the first one's tokens, and the
    last: an even spread on the curve's log axis at a fraction of the evaluation cost."""
    start = [c for c in found if c[0] == 0]
    trained = [c for c in found if c[0] > 0]
    if not trained:
        return start
    chosen, target = [], trained[0][0]
    while target <= trained[-1][0]:
        nearest = min(trained, key=lambda c: abs(c[0] - target))
        if nearest not in chosen:
            chosen.append(nearest)
        target *= 2
    if trained[-1] not in chosen:
        # The last checkpoint replaces a doubling point that lies within 1.5x of it: a point that
        # close adds little to a log axis and costs a whole evaluation.
        if len(chosen) > 1 and trained[-1][0] < 1.5 * chosen[-1][0]:
            chosen.pop()
        chosen.append(trained[-1])
    return start + chosen


def done(path: Path) -> set[tuple[str, str]]:
    if not path.exists():
        return set()
    return {(r["checkpoint"], r["measure"]) for r in map(json.loads, path.read_text().splitlines())}


def measure(args) -> None:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_target(args.target, parse_dtype(args.dtype))
    heldout = read_data(args.heldout)[1]
    # Each chain point re-runs the drafter over its whole prefix: a subset keeps this to minutes.
    heldout = heldout.part(0, args.chain_sequences)
    tree_k = json.loads((drafter_dir(args.tree_from) / "config.json").read_text())["k"]
    run_k = json.loads((args.run / "train_config.json").read_text())["k"]
    if tree_k != run_k:  # a tree's paths are in blocks of k tokens: another k's tree means other nodes
        raise SystemExit(f"--tree-from {args.tree_from} is a k = {tree_k} drafter but {args.run} trains k = {run_k}; "
                         f"pass a drafter folder of k = {run_k} measured by `falcon-ext tune-tree`")
    tree = measured_tree(drafter_dir(args.tree_from), args.tree_size)
    sets = {name: encode_sources(tokenizer, [name], args.prompts) for name in ("mt-bench", "gsm8k")}
    out = args.run / "scaling.jsonl"
    found = checkpoints(args.run)
    chosen = found if args.all_checkpoints else log_spaced(found)
    index, count = map(int, args.shard.split("/"))
    for tokens, folder in chosen[index::count]:
        for measure_name in ("chain", *sets):
            if (folder.name, measure_name) in done(out):
                continue
            drafter = load_drafter(str(folder), model).eval()
            start = time.time()
            if measure_name == "chain":
                value = chain_acceptance(drafter, heldout, args.passes, points_per_seq=args.chain_points)
                extra = {"sequences": len(heldout), "points_per_sequence": args.chain_points, "passes": args.passes}
            else:
                drafter.set_tree(tree)
                result = mean_accepted_tokens(model, drafter, sets[measure_name], args.max_new_tokens)
                value, extra = result["mean_accepted_tokens"], result
            record = {"checkpoint": folder.name, "tokens_seen": tokens, "measure": measure_name, "value": value,
                      "dtype": args.dtype, "tree_size": args.tree_size, "seconds": round(time.time() - start, 1),
                      **{k: v for k, v in extra.items() if k != "mean_accepted_tokens"}}
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)


def report(run: Path) -> None:
    rows: dict[int, dict] = {}
    for r in map(json.loads, (run / "scaling.jsonl").read_text().splitlines()):
        rows.setdefault(r["tokens_seen"], {})[r["measure"]] = r["value"]
    print("| tokens seen | held-out chain acceptance | τ MT-Bench | τ GSM8K-test |")
    print("|---:|---:|---:|---:|")
    for tokens in sorted(rows):
        cells = [rows[tokens].get(m) for m in ("chain", "mt-bench", "gsm8k")]
        print(f"| {tokens / 1e6:.2f}M | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for measure_name, label in (("chain", "held-out chain acceptance"), ("mt-bench", "τ MT-Bench"),
                                ("gsm8k", "τ GSM8K-test")):
        points = sorted((t, v[measure_name]) for t, v in rows.items() if measure_name in v and t > 0)
        if points:
            ax.plot([p[0] / 1e6 for p in points], [p[1] for p in points], marker="o", label=label)
        if 0 in rows and measure_name in rows[0]:
            ax.axhline(rows[0][measure_name], linestyle=":", color=ax.lines[-1].get_color() if points else "grey")
    ax.set_xscale("log")
    ax.set_xlabel("ShareGPT tokens seen (millions, one pass)")
    ax.set_ylabel("mean accepted tokens per step")
    ax.set_title("SmolLM2-135M-Instruct Falcon drafter (dotted: start)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "scaling.png", dpi=120)
    print(f"plot: {run / 'scaling.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a `falcon-ext train` output folder")
    p.add_argument("--heldout", required=True, help="data folder of greedy answers to held-out conversations")
    p.add_argument("--target", default="SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tree-from", default="SmolLM2-135M-Instruct", help="drafter whose cdt_measurement.json gives the tree")
    p.add_argument("--tree-size", type=int, default=24)
    p.add_argument("--prompts", type=int, default=80, help="first N of MT-Bench and of GSM8K-test")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--passes", type=int, default=4)
    p.add_argument("--chain-sequences", type=int, default=32, help="held-out sequences for the chain acceptance")
    p.add_argument("--chain-points", type=int, default=3, help="chain start points per held-out sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--all-checkpoints", action="store_true", help="measure every checkpoint, not a log-spaced few")
    p.add_argument("--shard", default="0/1", help="I/N: measure every N-th checkpoint from the I-th, so N processes "
                   "of one thread each share the work (faster than one process of N threads at batch 1)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if not args.report_only:
        measure(args)
    report(args.run)


if __name__ == "__main__":
    main()
