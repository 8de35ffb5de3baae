"""One verify step of the engine: the project's own work next to the target's forward.

For each target (the embedded stories260K, and a random-initialised Llama of SmolLM2-135M's
shape: 30 layers, width 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152) and each tree size,
one step over a PREFIX-token KV cache is timed stage by stage, ROUNDS times, all in one run:

  tree build    falcon_ext.engine.generate.build_tree   (op tree_build: mask, position ids, paths)
  forward       falcon_ext.engine.generate.verify       (the target's forward over the tree)
  tree verify   falcon_ext.engine.generate.accept       (op tree_verify_greedy, or warp + tree_verify_sample)
  KV compaction falcon_ext.engine.generate.commit       (op kv_compact_ + cache truncation)

"engine %" is (build + verify + compaction) / (those + forward) with the engine's stage
functions (the ops plus their Python around them); "ops %" times the three op calls alone on
the same inputs. Medians over rounds. The tree is a best-first tree over assumed per-rank
acceptance rates (the shape dynamic-tree drafters grow), whose rank-0 chain holds the target's
own greedy continuation for ACCEPT tokens, so the accepted path is ACCEPT + 1 nodes long.

    python benchmarks/bench_step.py [--device cuda] [--threads 1] [--nodes 16 32 60] [--prefix 200]
"""
from __future__ import annotations

import argparse
import heapq
import statistics
import time

import torch
import transformers

from falcon_ext import ops
from falcon_ext.engine import target_io
from falcon_ext.engine.drafting import DraftTree
from falcon_ext.engine.generate import DecodeState, accept, build_tree, commit, verify
from falcon_ext.engine.sampling import SamplingConfig, warp_probs
from falcon_ext.targets import load_target

RANK_ACCEPTANCE = (0.6, 0.15, 0.08, 0.05)  # assumed P(draft of rank j is right | parent right)


def smollm2_shaped(seed: int = 0) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                      rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def best_first_parents(nodes: int) -> list[int]:
    """Parents of the ``nodes`` most likely nodes of a top-k draft tree (root first, topological)."""
    parents, ranks = [-1], [0]
    frontier = [(-RANK_ACCEPTANCE[j], 0, j) for j in range(len(RANK_ACCEPTANCE))]
    heapq.heapify(frontier)
    while len(parents) < nodes:
        neg_p, parent, rank = heapq.heappop(frontier)
        parents.append(parent)
        ranks.append(rank)
        node = len(parents) - 1
        for j, a in enumerate(RANK_ACCEPTANCE):
            heapq.heappush(frontier, (neg_p * a, node, j))
    return parents


class Step:
    """A target with a PREFIX-token cache, restored after every measured step."""

    def __init__(self, model, prefix: int, device: str, seed: int = 0):
        self.model, self.io = model, target_io.for_model(model)
        gen = torch.Generator().manual_seed(seed)
        vocab = self.io.vocab_size
        prompt = torch.randint(3, vocab, (1, prefix), generator=gen).to(device)
        self.prefix = prefix
        self.cache = transformers.DynamicCache()
        with torch.no_grad():
            logits = model(input_ids=prompt, use_cache=True, **{self.io.cache_kwarg: self.cache}).logits
        self.root = int(logits[0, -1].argmax())
        self.gen = gen

    def restore(self):
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, : self.prefix]
            layer.values = layer.values[:, :, : self.prefix]

    @torch.no_grad()
    def greedy_chain(self, length: int) -> list[int]:
        """The target's own next ``length`` tokens after the root."""
        chain, token = [], self.root
        for i in range(length):
            out = self.model(input_ids=torch.tensor([[token]], device=self.io.input_device), use_cache=True,
                             position_ids=torch.tensor([[self.prefix + i]], device=self.io.input_device),
                             **{self.io.cache_kwarg: self.cache})
            token = int(out.logits[0, -1].argmax())
            chain.append(token)
        self.restore()
        return chain

    def tree(self, nodes: int, accept_len: int) -> DraftTree:
        parents = best_first_parents(nodes)
        tokens = torch.randint(3, self.io.vocab_size, (nodes,), generator=self.gen)
        tokens[0] = self.root
        chain = self.greedy_chain(accept_len)
        node = 0
        for token in chain:  # rank-0 children along the first chain carry the right tokens
            children = [i for i, p in enumerate(parents) if p == node]
            if not children:
                break
            node = children[0]
            tokens[node] = token
        device = self.io.input_device
        return DraftTree(tokens.to(device), torch.tensor(parents, dtype=torch.int64, device=device))


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


@torch.no_grad()
def measure(step: Step, tree: DraftTree, sampling: SamplingConfig, rounds: int) -> dict:
    """Median seconds per stage of one step (engine functions), and of the bare ops."""
    device, io = step.io.input_device, step.io
    times: dict[str, list[float]] = {}

    def record(name, fn):
        result, seconds = _timed(fn, device)
        times.setdefault(name, []).append(seconds)
        return result

    gen = torch.Generator(device=device).manual_seed(0)
    for r in range(rounds + 1):  # round 0 warms up
        state = DecodeState(step.cache, step.prefix, step.root, [], max_new_tokens=10 ** 9, eos_ids=frozenset())
        t, mask, positions = record("build", lambda: build_tree(io, tree, state))
        logits, _ = record("forward", lambda: verify(io, t, mask, positions, state, need_features=False))
        # The bare ops on the same inputs (KV compaction on a copy of the cache: it works in place).
        record("op build", lambda: ops.tree_build(t.parents, step.prefix, io.dtype))
        if sampling.greedy:
            record("op verify", lambda: ops.tree_verify_greedy(logits, t.tokens, t.parents)[1].tolist())
        else:
            probs = warp_probs(logits, sampling)
            uniforms = torch.rand(len(t) + 1, device=device, generator=gen)
            record("op verify", lambda: ops.tree_verify_sample(probs, t.tokens, t.parents, uniforms)[1].tolist())
        path, _ = record("verify", lambda: accept(logits, t, sampling, gen))
        kv = [x.clone() for layer in step.cache.layers for x in (layer.keys, layer.values)]
        index = torch.tensor(path, dtype=torch.int64, device=device)
        record("op compact", lambda: ops.kv_compact_(kv, index, step.prefix))
        record("compact", lambda: commit(state, path))
        step.restore()
        if r == 0:
            times.clear()
    result = {name: statistics.median(v) for name, v in times.items()}
    result["accepted"] = len(path)
    return result


def _row(target: str, nodes: int, mode: str, m: dict) -> str:
    engine = m["build"] + m["verify"] + m["compact"]
    bare = m["op build"] + m["op verify"] + m["op compact"]
    return (f"| {target} | {nodes} | {mode} | {m['accepted']} | {1e3 * m['forward']:.2f} | {1e3 * m['build']:.3f} | "
            f"{1e3 * m['verify']:.3f} | {1e3 * m['compact']:.3f} | {100 * engine / (engine + m['forward']):.1f}% | "
            f"{1e3 * bare:.3f} | {100 * bare / (bare + m['forward']):.1f}% |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 16, 32, 60])
    parser.add_argument("--prefix", type=int, default=200)
    parser.add_argument("--accept", type=int, default=3, help="draft tokens along one chain the target agrees with")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--targets", nargs="+", default=["stories260K", "smollm2-shaped"],
                        choices=["stories260K", "smollm2-shaped"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"one verify step: prefix {args.prefix} tokens, fp32, device {args.device}, {torch.get_num_threads()} "
          f"CPU threads, {args.rounds} rounds (medians); torch {torch.__version__}, transformers "
          f"{transformers.__version__}\n")
    print("| target | tree nodes | verify | accepted | forward ms | tree build ms | tree verify ms | KV compaction ms "
          "| engine % of step | bare ops ms | bare ops % of step |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.targets:
        model = load_target("stories260K")[0] if name == "stories260K" else smollm2_shaped()
        step = Step(model.to(args.device), args.prefix, args.device)
        for nodes in args.nodes:
            tree = step.tree(nodes, args.accept)
            for mode, sampling in (("greedy", SamplingConfig()), ("sample T=1", SamplingConfig(temperature=1.0))):
                print(_row(name, nodes, mode, measure(step, tree, sampling, args.rounds)), flush=True)
        del model, step


if __name__ == "__main__":
    main()
