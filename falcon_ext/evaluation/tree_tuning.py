"""Derive a Custom-Designed Decoding Tree from measurement, for one drafter on one device.

1. ``measure_ranks``: on held-out prompts, decode the target greedily, then at every position
   run the drafter's passes along the target's own continuation (teacher forcing) and record,
   at each depth, the rank of the target's token in the drafter's distribution. A tree node
   [r1..rd] is accepted by greedy verification exactly when the ranks at depths 1..d are
   r1..rd, so the empirical frequency of each rank prefix *is* the node's acceptance rate, and a
   tree's expected accepted tokens per step is the sum of its nodes' rates (no independence
   assumption across depths).
2. ``best_trees``: for every size N, the N nodes with the highest rates (prefix-closed, since a
   node's rate never exceeds its parent's).
3. ``measure_costs`` times, on this device, ``propose()`` for each candidate tree and one target
   forward verifying N + 1 tree tokens over a cached prefix; ``choose`` keeps the size with the
   most tokens per second: (1 + accepted(N)) / (t_draft(N) + t_verify(N + 1)). Extending the
   drafter and the verify/compaction ops cost about the same for every N and are left out.

``tune`` (CLI: ``falcon-ext tune-tree --drafter DIR --target NAME --prompts FILE.jsonl``) writes
the chosen tree into DIR/config.json under ``trees["<device type>-<dtype>"]`` (the device and
target dtype it measured, e.g. ``cpu-bfloat16``) and the measurements into
DIR/cdt_measurement.json. Prompts are read and encoded by ``prompts.encode_sources``, as
eval-drafter encodes them (a user turn through the chat template when the tokenizer has one).
"""
from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..drafters.falcon import FalconDrafter, Passes, tree_key
from ..engine import ops, target_io
from ..engine.generate import TREE_ROOM
from ..engine.kv_cache import ReservedCache
from ..engine.target_io import TargetIO
from ..prompts import encode_sources
from ..targets import dtype_name, eos_token_ids
from .acceptance import load_drafter

SIZES = (0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64)


@torch.no_grad()
def measure_ranks(drafter, target, prompts: list[torch.Tensor], *, max_new_tokens: int, passes: int,
                  max_rank: int = 8, eos_token_id=None) -> torch.Tensor:
    """[steps, passes * k] ranks of the target's greedy tokens (``max_rank`` = not in the top max_rank)."""
    depth = passes * drafter.config.k
    rows = []
    for ids in tqdm(prompts, desc="measuring acceptance", unit="prompt"):
        ids = ids.to(target.get_input_embeddings().weight.device).view(1, -1)
        seq = target.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                              pad_token_id=0, temperature=None, top_k=None, top_p=None)[0]
        feats = target(seq[None], output_hidden_states=True).hidden_states[-1][0]
        P = ids.shape[1]
        drafter.reset()
        drafter.extend(seq[:P], feats[:P], int(seq[P]))
        for root in range(P, seq.numel() - depth):  # seq[root] is the tree root, seq[root + d] depth d
            rows.append(_chain_ranks(drafter, seq[root + 1: root + 1 + depth], passes, max_rank))
            drafter.extend(seq[root: root + 1], feats[root: root + 1], int(seq[root + 1]))
    rows = [r for r in rows if r is not None]
    return torch.tensor(rows, dtype=torch.long).view(-1, depth)


def _chain_ranks(drafter, truth: torch.Tensor, passes: int, max_rank: int):
    """Ranks of ``truth`` (depths 1..passes*k) running the drafter's passes along it."""
    k = drafter.config.k
    if not drafter.context.ready:
        return None
    loop = Passes(drafter, drafter.context)
    head = drafter.draft_head()
    ranks = []
    for p in range(passes):
        block = truth[p * k:(p + 1) * k]
        logits = head.logits(loop.step())[0].float()  # [k, draft vocabulary]
        rows = head.rows(block)
        true_logit = logits.gather(1, rows.clamp(min=0)[:, None])
        rank = (logits > true_logit).sum(1).masked_fill(rows < 0, max_rank)  # never proposed: a miss
        ranks += rank.clamp(max=max_rank).tolist()
        loop.feed(block[None])
    return ranks


def node_rates(ranks: torch.Tensor, max_rank: int = 8) -> dict[tuple[int, ...], float]:
    """Acceptance rate of every rank path seen (excluding paths through a miss)."""
    counts: Counter = Counter()
    for row in ranks.tolist():
        for d in range(1, len(row) + 1):
            if row[d - 1] >= max_rank:
                break
            counts[tuple(row[:d])] += 1
    return {path: c / max(len(ranks), 1) for path, c in counts.items()}


def best_trees(rates: dict[tuple[int, ...], float], sizes=SIZES) -> dict[int, list[list[int]]]:
    """For each size N: the N most often accepted nodes (ties: shallower first, so prefix-closed)."""
    order = sorted(rates, key=lambda p: (-rates[p], len(p), p))
    return {n: [list(p) for p in order[:n]] for n in sizes if n <= len(order)}


def measured_tree(folder: Path, size: int) -> list[list[int]]:
    """The ``size`` most often accepted nodes recorded by ``tune`` for this drafter (its cdt_measurement.json)."""
    path = Path(folder) / "cdt_measurement.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `falcon-ext tune-tree --drafter {folder} ...` first")
    rates = {tuple(int(r) for r in key.split(",")): v for key, v in json.loads(path.read_text())["node_rates"].items()}
    trees = best_trees(rates, sizes=(size,))
    if size not in trees:
        raise ValueError(f"{path} records only {len(rates)} nodes; ask for a tree of at most that many")
    return trees[size]


def tree_size_for_batch(folder: Path, batch: int) -> int:
    """The tree size (nodes below the root) with the most tokens per second when ``batch`` rows
    are verified in one forward, from the drafter's cdt_measurement.json (what ``tune`` measured
    at batch 1 on its device).

    A step of B rows verifies B x (N + 1) tokens, so a tree that verification paid for at B = 1
    costs real time once B x (N + 1) tokens are compute-bound. Each size N is scored as
    B x tokens(N) / (draft(N) + verify(B x (N + 1))): tokens(N) and draft(N) as measured (the
    drafter runs all rows' branches in one call per pass, so its time is taken as the batch-1
    time, a lower bound), verify(M) read off the measured verify-cost curve (M = N + 1 tokens
    for each measured N), linearly between its points and beyond its last two (where it is
    compute-bound, it grows linearly).
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    path = Path(folder) / "cdt_measurement.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `falcon-ext tune-tree --drafter {folder} ...` first")
    options = json.loads(path.read_text())["options"]
    curve = sorted((o["size"] + 1, o["verify_seconds"]) for o in options)
    if len(curve) < 2:
        raise ValueError(f"{path} measured fewer than two tree sizes: no verify-cost curve to read")

    def verify_seconds(tokens: int) -> float:
        i = next((i for i in range(1, len(curve)) if curve[i][0] >= tokens), len(curve) - 1)
        (x0, y0), (x1, y1) = curve[i - 1], curve[i]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def tokens_per_second(o) -> float:
        return batch * o["expected_tokens"] / (o["draft_seconds"] + verify_seconds(batch * (o["size"] + 1)))

    return max(options, key=tokens_per_second)["size"]


def expected_accepted(tree: list[list[int]], rates) -> float:
    return sum(rates.get(tuple(p), 0.0) for p in tree)


def median_seconds(fn, device, rounds: int) -> float:
    """Median wall time of ``rounds`` calls of ``fn`` after one warm-up call (CUDA synchronised)."""
    times = []
    for _ in range(rounds + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first call warms caches/allocators


@dataclass
class VerifyTimer:
    """The target's KV cache over a random prefix, for timing verify forwards over N tokens."""

    io: TargetIO
    prefix: torch.Tensor  # [1, prefix_len]
    cache: object
    features: torch.Tensor  # [prefix_len, H]: the target's features of the prefix

    @classmethod
    @torch.no_grad()
    def for_target(cls, target, prefix_len: int = 128) -> "VerifyTimer":
        io = target_io.for_model(target)
        prefix = torch.randint(3, io.vocab_size, (1, prefix_len), device=io.input_device,
                               generator=torch.Generator(io.input_device).manual_seed(0))
        cache = ReservedCache(prefix_len + 2 * TREE_ROOM)
        _, features = target_io.forward(io, prefix, cache, need_features=True)
        return cls(io, prefix, cache, features)

    @torch.no_grad()
    def verify(self, n_nodes: int) -> None:
        """One verify forward over a chain of ``n_nodes`` tokens (the cost depends on N, not shape)."""
        prefix_len = self.prefix.shape[1]
        parents = torch.arange(-1, n_nodes - 1, device=self.io.input_device)
        mask, positions, _ = ops.tree_build(parents, prefix_len, self.io.dtype)
        with target_io.grouped_kv_attention(self.io.input_device):  # the engine's verify forward
            target_io.forward(self.io, self.prefix[:, :n_nodes], self.cache, need_features=True,
                              attention_mask=mask[None, None], position_ids=positions[None])
        self.cache.keep(prefix_len)  # drop the tree again, as the engine's commit does

    def seconds(self, n_nodes: int, rounds: int) -> float:
        return median_seconds(lambda: self.verify(n_nodes), self.io.input_device, rounds)


@torch.no_grad()
def measure_costs(drafter, target, trees: dict[int, list[list[int]]], *, prefix_len: int = 128,
                  rounds: int = 7) -> dict[int, dict[str, float]]:
    """Seconds per step on this device: drafting each tree and verifying its N + 1 tokens.

    A step's drafting is timed as the engine runs it: the drafter takes an accepted path of two
    tokens (about τ for the shipped drafters), settles it, then drafts the tree."""
    timer = VerifyTimer.for_target(target, prefix_len)
    drafter.reset()
    next_token = int(timer.prefix[0, -1])
    drafter.extend(timer.prefix[0, :-1], timer.features[:-1], next_token)
    path = torch.tensor([next_token, int(timer.prefix[0, 0])], device=timer.prefix.device)

    def step():  # the path starts with the previous next token and names it again as the next
        drafter.extend(path, timer.features[:2], next_token)
        drafter.propose()

    costs = {}
    for n, tree in tqdm(sorted(trees.items()), desc="timing trees", unit="tree"):
        if n:
            drafter.set_tree(tree)
        draft = median_seconds(step, timer.io.input_device, rounds) if n else 0.0
        costs[n] = {"draft_s": draft, "verify_s": timer.seconds(n + 1, rounds)}
    return costs


@dataclass
class TreeChoice:
    size: int
    tree: list[list[int]]
    expected_tokens: float  # per step, incl. the target's own token
    draft_seconds: float
    verify_seconds: float
    tokens_per_second: float


def choose(trees, rates, costs) -> tuple[TreeChoice, list[TreeChoice]]:
    options = []
    for n, tree in sorted(trees.items()):
        tokens = 1.0 + expected_accepted(tree, rates)
        draft, verify = costs[n]["draft_s"], costs[n]["verify_s"]
        options.append(TreeChoice(n, tree, tokens, draft, verify, tokens / (draft + verify)))
    return max(options, key=lambda o: o.tokens_per_second), options


def tune(drafter_folder: str, target, tokenizer, prompts: list[str], *, max_new_tokens: int = 128,
         passes: int = 4, weights: str = "auto") -> TreeChoice:
    """Measures the drafter in ``drafter_folder`` on ``target`` (on its device and in its dtype)
    and the held-out ``prompts`` (sources as eval-drafter reads them), writes the chosen tree into
    the folder's config.json as ``trees["<device type>-<dtype>"]`` and the measurements into its
    cdt_measurement.json, prints the options; returns the choice."""
    # Measured as the engine's CLI tools run it (in the target's dtype and the weight format
    # ``weights`` picks, by default what they pick); the checkpoint keeps its own dtype.
    drafter = load_drafter(drafter_folder, target, weights)
    ids = [torch.tensor(p) for p in encode_sources(tokenizer, prompts)]
    ranks = measure_ranks(drafter, target, ids, max_new_tokens=max_new_tokens, passes=passes,
                          eos_token_id=eos_token_ids(target) or None)
    rates = node_rates(ranks)
    trees = best_trees(rates)
    costs = measure_costs(drafter, target, trees)
    best, options = choose(trees, rates, costs)
    weight = target.get_input_embeddings().weight
    key = tree_key(weight.device.type, weight.dtype)
    stored = FalconDrafter.from_pretrained(drafter_folder, target=target)
    stored.config.trees[key] = best.tree
    stored.save_pretrained(drafter_folder)
    report = {"device": weight.device.type, "dtype": dtype_name(weight.dtype), "tree_key": key,
              "drafter_weights": drafter.weight_format,
              "steps_measured": len(ranks), "chosen": asdict(best),
              "options": [{k: v for k, v in asdict(o).items() if k != "tree"} for o in options],
              "node_rates": {",".join(map(str, k)): v for k, v in sorted(rates.items(), key=lambda kv: -kv[1])[:128]}}
    (Path(drafter_folder) / "cdt_measurement.json").write_text(json.dumps(report, indent=1) + "\n")
    for o in options:
        print(f"N={o.size:3d} tokens/step={o.expected_tokens:.3f} draft ms={o.draft_seconds * 1e3:.2f} "
              f"verify ms={o.verify_seconds * 1e3:.2f} tokens/s={o.tokens_per_second:.1f}")
    print(f"chosen for {key}: N={best.size} ({best.expected_tokens:.2f} tokens/step, "
          f"{best.tokens_per_second:.1f} tokens/s predicted); written to {drafter_folder} as trees[{key!r}]")
    return best
