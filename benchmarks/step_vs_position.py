"""How a decoding step's cost grows with the position in a long output (default bf16, up to 4,000 tokens).

Two views, each against the position P (tokens already in the KV cache):

1. Forwards: the target's forward over 1 token and over each --nodes N tokens (a verify step's
   chain, the engine's mask and position ids) after a random P-token cache; median of ROUNDS.
2. Real decoding: one long greedy output (EOS ignored, so it runs to --max-new-tokens) from
   ``model.generate`` and from ``speculative_generate`` with --drafter; a streamer clocks every
   step (generate: one token per step; the engine: one verify step, whatever it emits). Steps
   are grouped into --bucket-token-wide position buckets: median ms per step, ms per token.

3. Causes: an N-token tree forward after a P-token cache four ways, the engine's two remedies
   off and on: transformers' ``DynamicCache`` (a ``torch.cat`` of the whole cache per update)
   or the engine's ``ReservedCache`` (written in place), and transformers' grouped-query path
   (a copy of the cached K/V per query-head group under a custom mask) or ``enable_gqa``
   (falcon_ext.engine.target_io.grouped_kv_attention).

Attention reads the whole cache, so its share grows with P while the matmuls' stays put; the
Falcon drafter's own attention reads its context too. The output starts with the machine's load
and versions (figures from a loaded machine are not figures).

    python benchmarks/step_vs_position.py [--target SmolLM2-135M-Instruct] [--drafter falcon] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch

from falcon_ext import ops, speculative_generate
from falcon_ext.cli import add_dtype_argument
from falcon_ext.engine import target_io
from falcon_ext.engine.kv_cache import ReservedCache
from falcon_ext.engine.target_io import grouped_kv_attention
from falcon_ext.evaluation.bench import resolve_drafter
from falcon_ext.evaluation.tree_tuning import VerifyTimer, median_seconds
from falcon_ext.targets import load_target, resolve_dtype
from transformers import DynamicCache
from verify_cost import print_provenance


@dataclass
class StepClock:
    """A transformers-style streamer that clocks decoding steps: (position after the step, seconds,
    tokens emitted). Its first call is the prompt, its second the prefill's token: the clock
    starts there, so the prefill is not a step."""

    position: int = 0
    steps: list[tuple[int, float, int]] = field(default_factory=list)
    calls: int = 0
    last: float = 0.0

    def put(self, value: torch.Tensor) -> None:
        now, emitted = time.perf_counter(), value.numel()
        if self.calls >= 2:  # calls 0 and 1: the prompt and the prefill's token
            self.steps.append((self.position + emitted, now - self.last, emitted))
        self.position += emitted
        self.last, self.calls = now, self.calls + 1

    def end(self) -> None:
        pass


def forward_costs(model, positions: list[int], nodes: list[int], rounds: int) -> dict[int, dict[int, float]]:
    """{P: {N: median seconds of a forward over N tokens after a P-token cache}}."""
    costs = {}
    for p in positions:
        timer = VerifyTimer.for_target(model, p)
        costs[p] = {n: timer.seconds(n, rounds) for n in nodes}
    return costs


CAUSES = ("DynamicCache", "DynamicCache + enable_gqa", "ReservedCache", "ReservedCache + enable_gqa")


@torch.no_grad()
def growth_causes(model, positions: list[int], n_nodes: int, rounds: int) -> dict[int, dict[str, float]]:
    """{P: {variant: median seconds of an n_nodes-token chain forward after a P-token cache}}."""
    io = target_io.for_model(model)
    costs = {}
    for p in positions:
        prefix = torch.randint(3, io.vocab_size, (1, p), generator=torch.Generator().manual_seed(0)).to(io.input_device)
        tree = torch.randint(3, io.vocab_size, (1, n_nodes), generator=torch.Generator().manual_seed(1)).to(io.input_device)
        mask, position_ids, _ = ops.tree_build(torch.arange(-1, n_nodes - 1, device=io.input_device), p, io.dtype)
        costs[p] = {}
        for variant in CAUSES:
            reserved = variant.startswith("ReservedCache")
            cache = ReservedCache(p + n_nodes) if reserved else DynamicCache()
            target_io.forward(io, prefix, cache, need_features=False)

            grouped = variant.endswith("enable_gqa")

            def step():
                with grouped_kv_attention(io.input_device) if grouped else contextlib.nullcontext():
                    target_io.forward(io, tree, cache, need_features=False,
                                      attention_mask=mask[None, None], position_ids=position_ids[None])
                if reserved:  # drop the tree again, as the engine's commit does
                    cache.keep(p)
                else:
                    for layer in cache.layers:
                        layer.keys, layer.values = layer.keys[:, :, :p], layer.values[:, :, :p]

            costs[p][variant] = median_seconds(step, io.input_device, rounds)
    return costs


def decode_clocks(model, drafter, prompt: torch.Tensor, max_new_tokens: int) -> dict[str, StepClock]:
    """Step clocks of one long greedy output of model.generate and of the engine."""
    clocks = {"model.generate": StepClock(), "falcon_ext": StepClock()}
    # min_new_tokens keeps generate from stopping at EOS: a timing run, not an output to compare.
    model.generate(prompt, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                   temperature=None, top_k=None, top_p=None, pad_token_id=0, streamer=clocks["model.generate"])
    speculative_generate(model, drafter, prompt, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=[],
                         streamer=clocks["falcon_ext"])
    return clocks


def bucketed(clock: StepClock, width: int) -> dict[int, tuple[float, float, int]]:
    """{bucket start: (median ms per step, ms per token, steps)} over the steps ending in each bucket."""
    seconds: dict[int, list[float]] = {}
    tokens: dict[int, int] = {}
    for position, s, emitted in clock.steps:
        start = (position // width) * width
        seconds.setdefault(start, []).append(s)
        tokens[start] = tokens.get(start, 0) + emitted
    return {b: (1e3 * statistics.median(s), 1e3 * sum(s) / tokens[b], len(s)) for b, s in sorted(seconds.items())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="SmolLM2-135M-Instruct", help="model name, HF folder or .gguf")
    p.add_argument("--drafter", default="falcon", help="lookup, falcon, or a Falcon drafter folder")
    p.add_argument("--device", default="cpu")
    add_dtype_argument(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--positions", type=int, nargs="+", default=[128, 512, 1000, 2000, 3000, 4000])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", default="Write a very long story about a lighthouse keeper and the sea.")
    p.add_argument("--max-new-tokens", type=int, default=4000)
    p.add_argument("--bucket", type=int, default=500, help="position bucket width, tokens")
    p.add_argument("--cause-nodes", type=int, default=12, help="tree size of the causes view (0: skip it)")
    p.add_argument("--skip-decode", action="store_true", help="only the forward and causes views")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_provenance(args.device)
    model, tokenizer = load_target(args.target, resolve_dtype(args.dtype, args.device), args.device)
    nodes = sorted(set([1] + args.nodes))

    costs = forward_costs(model, args.positions, nodes, args.rounds)
    print(f"\nTarget forward over N tokens after a P-token cache, ms (median of {args.rounds}):")
    print("| P | " + " | ".join(f"N={n}" for n in nodes) + " |")
    print("|---:|" + "---:|" * len(nodes))
    for position, by_n in costs.items():
        print(f"| {position} | " + " | ".join(f"{1e3 * by_n[n]:.2f}" for n in nodes) + " |")

    if args.cause_nodes:
        causes = growth_causes(model, args.positions, args.cause_nodes, args.rounds)
        print(f"\nCauses: a {args.cause_nodes}-token tree forward after a P-token cache, ms (median of {args.rounds}):")
        print("| P | " + " | ".join(CAUSES) + " |")
        print("|---:|" + "---:|" * len(CAUSES))
        for position, by_variant in causes.items():
            print(f"| {position} | " + " | ".join(f"{1e3 * by_variant[v]:.2f}" for v in CAUSES) + " |")
    if args.skip_decode:
        return

    drafter = resolve_drafter(args.drafter, model, args.target)
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids.to(args.device)
    clocks = decode_clocks(model, drafter, prompt, args.max_new_tokens)
    print(f"\nGreedy decoding of {args.max_new_tokens} new tokens (EOS ignored), drafter {args.drafter}, "
          f"per {args.bucket}-token position bucket: median ms per step / ms per token (steps)")
    tables = {name: bucketed(clock, args.bucket) for name, clock in clocks.items()}
    print("| positions | " + " | ".join(tables) + " |")
    print("|---|" + "---:|" * len(tables))
    for start in sorted(set().union(*tables.values())):
        cells = [f"{t[start][0]:.2f} / {t[start][1]:.2f} ({t[start][2]})" if start in t else "–" for t in tables.values()]
        print(f"| {start}-{start + args.bucket - 1} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
