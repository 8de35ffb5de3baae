"""`falcon-ext bench`: end-to-end decoding speed, measured interleaved prompt by prompt in one run.

Methods (every prompt runs each method in turn, the order rotated from prompt to prompt, so
load from other processes falls on all of them alike):
  generate  (a) transformers' ``model.generate``: the baseline.
  ar        (b) "falcon_ext AR": ``speculative_generate`` with a drafter that proposes only the
                root, i.e. the project's own engine decoding one token per target forward.
  spec      (c) ``speculative_generate`` with the chosen drafter (prompt lookup, a Falcon drafter).
  pld       (d) transformers' prompt-lookup decoding (``prompt_lookup_num_tokens``).
  assisted  (e) transformers' assisted generation with ``--assistant``, a smaller model that
                shares the target's tokenizer (skipped without one).
Per method: tokens/s, speedup over (a) and (b), mean accepted tokens per target forward after
the prefill, and for greedy runs how many outputs equal (a)'s: identical, or differing at a
rounding near-tie of the target's logits (explained, expected in bf16/fp16), or not
(unexplained: a bug; the exit status is then 1), see falcon_ext.divergence. The engine's
methods also get a per-stage step-time breakdown. Results go to OUT/bench.json, bench.md and bench.png.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import bench_report
from . import prompts as prompt_sets
from .cdt_tune import measured_tree
from .checkpoint import drafter_dir
from .divergence import classify
from .drafting import DraftTree
from .evaluate import load_drafter
from .generate import speculative_generate
from .prompt_lookup import PromptLookupDrafter
from .targets import dtype_name, eos_token_ids, load_target, resolve_dtype

METHODS = ("generate", "ar", "spec", "pld", "assisted")
WARMUP_TOKENS = 8


class RootOnlyDrafter:
    """Proposes the root alone: the engine then emits one target-chosen token per forward."""

    needs_features = False

    def reset(self) -> None:
        self._next, self._device = None, torch.device("cpu")

    def extend(self, tokens: torch.Tensor, features, next_token: int) -> None:
        self._next, self._device = next_token, tokens.device

    def propose(self) -> DraftTree:
        return DraftTree(torch.tensor([self._next], device=self._device),
                         torch.tensor([-1], device=self._device))


class ForwardCounter:
    """Counts the target's forward calls (an assistant model's calls are not the target's)."""

    def __init__(self, model: torch.nn.Module):
        self.count = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1


@dataclass
class RunResult:
    tokens: list[int]  # new tokens only
    seconds: float  # wall time of the whole call, prefill included
    forwards: int  # target forwards, prefill included
    decode_seconds: float = 0.0  # engine methods: the decoding loop alone
    stage_seconds: dict[str, float] = field(default_factory=dict)
    tree_nodes: int = 0  # engine methods: draft-tree nodes the target verified, all steps together
    accept_lengths: list[int] | None = None  # engine methods: tokens emitted per step


@dataclass
class Method:
    key: str
    label: str
    run: Callable[[torch.Tensor, int, int], RunResult]  # (input ids, max new tokens, seed)


@dataclass
class Setup:
    """What every method shares: the target, its stop tokens and the sampling settings."""

    model: torch.nn.Module
    counter: ForwardCounter
    eos: list[int]
    pad: int
    temperature: float
    top_k: int
    top_p: float
    breakdown: bool
    fp32_lm_head: bool

    def sync(self):
        device = self.model.get_input_embeddings().weight.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(self, fn) -> tuple[object, float, int]:
        self.sync()
        before, start = self.counter.count, time.perf_counter()
        result = fn()
        self.sync()
        return result, time.perf_counter() - start, self.counter.count - before

    def hf_method(self, key: str, label: str, **extra) -> Method:
        if self.temperature > 0:
            sampling = dict(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:
            sampling = dict(do_sample=False, temperature=None, top_k=None, top_p=None)

        def run(ids, max_new, seed):
            torch.manual_seed(seed)
            out, seconds, forwards = self.timed(lambda: self.model.generate(
                ids, max_new_tokens=max_new, eos_token_id=self.eos, pad_token_id=self.pad, **sampling, **extra))
            return RunResult(out[0, ids.shape[1]:].tolist(), seconds, forwards)

        return Method(key, label, run)

    def engine_method(self, key: str, label: str, drafter) -> Method:
        def run(ids, max_new, seed):
            generator = torch.Generator(device=ids.device).manual_seed(seed)
            out, seconds, forwards = self.timed(lambda: speculative_generate(
                self.model, drafter, ids, max_new_tokens=max_new, temperature=self.temperature, top_k=self.top_k,
                top_p=self.top_p, eos_token_id=self.eos, generator=generator, profile=self.breakdown,
                fp32_lm_head=self.fp32_lm_head))
            return RunResult(out.sequences[0, ids.shape[1]:].tolist(), seconds, forwards, out.decode_seconds,
                             dict(out.stage_seconds), sum(out.tree_sizes), list(out.accept_lengths))

        return Method(key, label, run)


def resolve_drafter(name: str, model, target_name: str, lookup_tokens: int = 10, lookup_branches: int = 1,
                    tree_size: int = 0):
    """``lookup`` (prompt lookup), ``falcon`` (the Falcon drafter shipped for this target) or a
    Falcon drafter folder / shipped drafter name; a Falcon drafter drafts with the best
    ``tree_size``-node tree of its cdt_measurement.json when that is not 0."""
    if name == "lookup":
        if tree_size:
            raise ValueError("--tree-size applies to Falcon drafters, not to --drafter lookup")
        return PromptLookupDrafter(num_tokens=lookup_tokens, max_branches=lookup_branches)
    if name == "falcon":
        name = Path(target_name.rstrip("/")).name.removesuffix(".gguf")
    drafter = load_drafter(name, model).eval()
    if tree_size:
        drafter.set_tree(measured_tree(drafter_dir(name), tree_size))
    return drafter


def build_methods(args, model, tokenizer, counter) -> tuple[list[Method], dict[str, str]]:
    """The methods to run, and a note for each requested one that cannot run."""
    eos = eos_token_ids(model, tokenizer)
    pad = model.generation_config.pad_token_id
    setup = Setup(model, counter, eos, pad if pad is not None else (eos[0] if eos else 0),
                  args.temperature, args.top_k, args.top_p, not args.no_breakdown, args.fp32_lm_head)
    head = " (fp32 LM head)" if args.fp32_lm_head else ""
    methods, skipped = [], {}
    for key in args.methods:
        if key == "generate":
            methods.append(setup.hf_method(key, "model.generate"))
        elif key == "ar":
            methods.append(setup.engine_method(key, "falcon_ext AR" + head, RootOnlyDrafter()))
        elif key == "spec":
            drafter = resolve_drafter(args.drafter, model, args.target, args.lookup_tokens, args.lookup_branches,
                                      args.tree_size)
            name = args.drafter
            if name == "lookup":
                name += f" ({args.lookup_tokens}" + (f" x {args.lookup_branches})" if args.lookup_branches > 1 else ")")
            elif args.tree_size:
                name += f" ({args.tree_size}-node tree)"
            methods.append(setup.engine_method(key, f"falcon_ext + {name}{head}", drafter))
        elif key == "pld":
            methods.append(setup.hf_method(key, f"HF prompt lookup ({args.pld_tokens})",
                                           prompt_lookup_num_tokens=args.pld_tokens))
        elif key == "assisted" and args.assistant:
            assistant, _ = load_target(args.assistant, dtype=model.dtype, device=str(model.device))
            methods.append(setup.hf_method(key, f"HF assisted ({Path(args.assistant).name})", assistant_model=assistant))
        elif key == "assisted":
            skipped[key] = "no --assistant given: it needs a smaller model sharing the target's tokenizer"
    return methods, skipped


def bench_inputs(args, model, tokenizer) -> tuple[list[prompt_sets.Prompt], list[torch.Tensor], int]:
    """The selected prompts, their ids on the model's device, and how many were cut to fit."""
    chosen = prompt_sets.select(prompt_sets.load_sources([args.prompts]), args.num_prompts)
    use_template = prompt_sets.use_chat_template(tokenizer, args.chat_template)
    limit = args.max_prompt_tokens or None
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None:
        room = positions - args.max_new_tokens
        limit = room if limit is None else min(limit, room)
    encoded = [prompt_sets.encode(tokenizer, p.text, use_template, limit) for p in chosen]
    device = model.get_input_embeddings().weight.device
    return chosen, [ids.to(device) for ids, _ in encoded], sum(cut for _, cut in encoded)


def measure(methods: list[Method], chosen, ids_list, max_new: int, seed: int, progress: bool) -> list[dict]:
    """Every method on every prompt, interleaved; one record per (prompt, method)."""
    for m in methods:  # warm-up: first calls pay one-off allocation and dispatch costs
        m.run(ids_list[0], min(WARMUP_TOKENS, max_new), seed)
    records = []
    bar = tqdm(list(zip(chosen, ids_list)), desc="bench", unit="prompt", disable=not progress)
    for i, (prompt, ids) in enumerate(bar):
        shift = i % len(methods)
        results = {m.key: m.run(ids, max_new, seed + i) for m in methods[shift:] + methods[:shift]}
        reference = results["generate"].tokens if "generate" in results else None
        for m in methods:
            r = results[m.key]
            records.append(dict(prompt=i, category=prompt.category, method=m.key, prompt_tokens=ids.shape[1],
                                new_tokens=len(r.tokens), seconds=r.seconds, forwards=r.forwards,
                                decode_seconds=r.decode_seconds, stage_seconds=r.stage_seconds,
                                tree_nodes=r.tree_nodes, accept_lengths=r.accept_lengths,
                                same_as_generate=None if reference is None else r.tokens == reference,
                                tokens=r.tokens))
        if "generate" in results and "spec" in results:
            done = [r for r in records if r["method"] in ("generate", "spec")]
            t = {k: sum(r["seconds"] for r in done if r["method"] == k) for k in ("generate", "spec")}
            bar.set_postfix(spec_speedup=f"{t['generate'] / t['spec']:.2f}x")
    return records


def classify_divergences(model, records: list[dict], ids_list: list[torch.Tensor]) -> None:
    """Adds ``divergence`` to every greedy record that differs from model.generate's: where the
    outputs part, and whether the target's logits there were a rounding near-tie (explained)."""
    reference = {r["prompt"]: r["tokens"] for r in records if r["method"] == "generate"}
    for r in records:
        if r["same_as_generate"] is False:
            found = classify(model, ids_list[r["prompt"]], reference[r["prompt"]], r["tokens"], r["accept_lengths"])
            r["divergence"] = found.to_dict()


def run_bench(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_target(args.target, dtype=resolve_dtype(args.dtype, args.device), device=args.device)
    chosen, ids_list, cut = bench_inputs(args, model, tokenizer)
    counter = ForwardCounter(model)
    methods, skipped = build_methods(args, model, tokenizer, counter)
    records = measure(methods, chosen, ids_list, args.max_new_tokens, args.seed, not args.no_progress)
    if args.temperature == 0:
        classify_divergences(model, records, ids_list)
    report = bench_report.build_report(args, methods, skipped, records, cut, dtype_name(model.dtype))
    paths = bench_report.write(report, Path(args.out))
    print(bench_report.markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    unexplained = [r for r in records if r.get("divergence") and not r["divergence"]["explained"]]
    return 1 if unexplained else 0
