"""`falcon-ext bench`: end-to-end decoding speed, measured interleaved prompt by prompt in one run.

Methods (every prompt runs each method in turn, the order rotated from prompt to prompt, so
load from other processes falls on all of them alike):
  generate  (a) transformers' ``model.generate``: the baseline.
  ar        (b) "falcon_ext AR": ``speculative_generate`` with a drafter that proposes only the
                root, i.e. the project's own engine decoding one token per target forward.
  spec      (c) ``speculative_generate`` with the chosen drafter (prompt lookup, a Falcon drafter,
                or both joined by "+": their trees verified together, ``UnionDrafter``).
  pld       (d) transformers' prompt-lookup decoding (``prompt_lookup_num_tokens``).
  assisted  (e) transformers' assisted generation with ``--assistant``, a smaller model that
                shares the target's tokenizer (skipped without one).
Per method: tokens/s, speedup over (a) and (b), mean accepted tokens per target forward after
the prefill, and for greedy runs how many outputs equal (a)'s: identical, or differing at a
rounding near-tie of the target's logits (explained, expected in bf16/fp16), or not
(unexplained: a bug; the exit status is then 1), see falcon_ext.evaluation.divergence. The engine's
methods also get a per-stage step-time breakdown. Results go to OUT/bench.json, bench.md and bench.png.

``--batch-size B``: consecutive prompts run B at a time, left-padded into one batch, for
(a), (b) and (c) alike (transformers' prompt lookup and assisted generation take one prompt, so
(d) and (e) are skipped). Speed is then throughput: the rows' new tokens over the batch's wall
time. Each prompt still gets its own record (its row's tokens, compared with (a)'s row), with
the batch's time, stage times and, for (a), forwards shared out over its rows; an engine row's
forwards are its own steps, so mean accepted tokens stays per row and step. Greedy outputs are
then compared with ``model.generate`` on each prompt alone, (a)'s batched rows included: in
bf16/fp16 padding and batching change the rounding, and a divergence is classified where
generate on the prompt alone can reproduce it. ``--tree-size
auto`` shrinks a Falcon drafter's tree as B grows (falcon_ext.evaluation.tree_tuning.tree_size_for_batch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import prompts as prompt_sets
from ..drafters.checkpoint import drafter_dir
from ..drafters.falcon import FalconDrafter
from ..drafters.prompt_lookup import PromptLookupDrafter
from ..drafters.union import UnionDrafter
from ..engine.drafting import DraftTree
from ..engine.generate import speculative_generate
from ..targets import dtype_name, eos_token_ids, load_target, resolve_dtype
from . import bench_report
from .acceptance import load_drafter
from .divergence import classify
from .tree_tuning import measured_tree, tree_size_for_batch

METHODS = ("generate", "ar", "spec", "pld", "assisted")
WARMUP_TOKENS = 8


class RootOnlyDrafter:
    """Proposes the root alone: the engine then emits one target-chosen token per forward (a
    falcon_ext.BatchDrafter, so that a batch gets its plain decoding baseline too)."""

    needs_features = False

    def reset(self) -> None:
        self.reset_rows(1)

    def extend(self, tokens: torch.Tensor, features, next_token: int) -> None:
        self.extend_rows([0], [tokens], None, [next_token])

    def propose(self) -> DraftTree:
        return self.propose_rows([0])[0]

    def reset_rows(self, batch_size: int) -> None:
        self._next, self._device = [None] * batch_size, torch.device("cpu")

    def extend_rows(self, rows: list[int], tokens: list[torch.Tensor], features, next_tokens: list[int]) -> None:
        for row, next_token in zip(rows, next_tokens, strict=True):
            self._next[row] = next_token
        self._device = tokens[0].device

    def propose_rows(self, rows: list[int]) -> list[DraftTree]:
        return [DraftTree(torch.tensor([self._next[row]], device=self._device),
                          torch.tensor([-1], device=self._device)) for row in rows]


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
class PromptBatch:
    """Prompts run together: their indices, ids [B, T] left-padded and the attention mask (None
    for one prompt, which is never padded)."""

    prompts: list[int]
    ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def row_tokens(self, sequences: torch.Tensor, eos: list[int]) -> list[list[int]]:
        """Each row's new tokens, through its first EOS (the batch pads a finished row after it)."""
        rows = []
        for new in sequences[:, self.ids.shape[1]:].tolist():
            end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new)) if len(self.prompts) > 1 else len(new)
            rows.append(new[:end])
        return rows


def make_batches(ids_list: list[torch.Tensor], batch_size: int) -> list[PromptBatch]:
    """Consecutive prompts, ``batch_size`` at a time (the last batch may be smaller), left-padded
    with id 0 (any id: the attention mask hides it)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(ids_list), batch_size):
        chunk = ids_list[start:start + batch_size]
        if len(chunk) == 1:
            batches.append(PromptBatch([start], chunk[0]))
            continue
        width = max(ids.shape[1] for ids in chunk)
        ids = torch.zeros((len(chunk), width), dtype=chunk[0].dtype, device=chunk[0].device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(chunk):
            ids[row, width - prompt.shape[1]:], mask[row, width - prompt.shape[1]:] = prompt[0], 1
        batches.append(PromptBatch(list(range(start, start + len(chunk))), ids, mask))
    return batches


@dataclass
class Method:
    key: str
    label: str
    run: Callable[[PromptBatch, int, int], list[RunResult]]  # (prompts, max new tokens, seed): one per row


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

        def run(batch: PromptBatch, max_new, seed):
            torch.manual_seed(seed)
            out, seconds, forwards = self.timed(lambda: self.model.generate(
                batch.ids, attention_mask=batch.attention_mask, max_new_tokens=max_new, eos_token_id=self.eos,
                pad_token_id=self.pad, **sampling, **extra))
            rows = len(batch.prompts)
            # the batch's forwards run every row: each row's count is the batch's
            return [RunResult(tokens, seconds / rows, forwards) for tokens in batch.row_tokens(out, self.eos)]

        return Method(key, label, run)

    def engine_method(self, key: str, label: str, drafter) -> Method:
        def run(batch: PromptBatch, max_new, seed):
            generator = torch.Generator(device=batch.ids.device).manual_seed(seed)
            out, seconds, forwards = self.timed(lambda: speculative_generate(
                self.model, drafter, batch.ids, attention_mask=batch.attention_mask, max_new_tokens=max_new,
                temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, eos_token_id=self.eos,
                generator=generator, profile=self.breakdown, fp32_lm_head=self.fp32_lm_head))
            tokens = batch.row_tokens(out.sequences, self.eos)
            if len(batch.prompts) == 1:
                return [RunResult(tokens[0], seconds, forwards, out.decode_seconds, dict(out.stage_seconds),
                                  sum(out.tree_sizes), list(out.accept_lengths))]
            share = 1 / len(batch.prompts)  # the batch's times, shared out over its rows
            return [RunResult(row_tokens, seconds * share, 1 + len(steps), out.decode_seconds * share,
                              {stage: t * share for stage, t in out.stage_seconds.items()}, sum(sizes), list(steps))
                    for row_tokens, steps, sizes in zip(tokens, out.accept_lengths, out.tree_sizes)]

        return Method(key, label, run)


def resolve_drafter(name: str, model, target_name: str, lookup_tokens: int = 10, lookup_branches: int = 1,
                    tree_size: int | str = 0, batch_size: int = 1, weights: str = "auto"):
    """``lookup`` (prompt lookup), ``falcon`` (the Falcon drafter shipped for this target) or a
    Falcon drafter folder / shipped drafter name, in the weight format ``weights``
    (``load_drafter``); a Falcon drafter drafts with the best ``tree_size``-node tree of its
    cdt_measurement.json when that is not 0, and with ``"auto"`` with the size that measurement
    predicts fastest for ``batch_size`` rows. Names joined by ``+`` (``falcon+lookup``) give a
    ``UnionDrafter`` of those drafters: their trees verified together."""
    if "+" in name:
        parts = name.split("+")
        if "" in parts or len(set(parts)) < len(parts):
            raise ValueError(f"--drafter {name!r}: join distinct drafter names with '+', e.g. falcon+lookup")
        return UnionDrafter(*(resolve_drafter(part, model, target_name, lookup_tokens, lookup_branches,
                                              0 if part == "lookup" else tree_size, batch_size, weights)
                              for part in parts))
    if name == "lookup":
        if tree_size:
            raise ValueError("--tree-size applies to Falcon drafters, not to --drafter lookup (its tree is "
                             "--lookup-tokens x --lookup-branches)")
        return PromptLookupDrafter(num_tokens=lookup_tokens, max_branches=lookup_branches)
    if name == "falcon":
        name = Path(target_name.rstrip("/")).name.removesuffix(".gguf")
    drafter = load_drafter(name, model, weights).eval()
    if tree_size == "auto":
        tree_size = tree_size_for_batch(drafter_dir(name), batch_size)
        drafter.set_tree(measured_tree(drafter_dir(name), tree_size))
    elif tree_size:
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
                                      args.tree_size, args.batch_size, args.drafter_weights)
            parts = getattr(drafter, "parts", (drafter,))
            name = args.drafter
            if "lookup" in name.split("+"):
                name += f" ({args.lookup_tokens}" + (f" x {args.lookup_branches})" if args.lookup_branches > 1 else ")")
            falcon = [part for part in parts if isinstance(part, FalconDrafter)]
            if falcon and args.tree_size == "auto":
                name += f" (auto: {len(falcon[0].plan) - 1}-node tree for batch {args.batch_size})"
            elif falcon and args.tree_size:
                name += f" ({args.tree_size}-node tree)"
            if any(getattr(part, "weight_format", "float") == "int8" for part in parts):
                name += " [int8 weights]"
            methods.append(setup.engine_method(key, f"falcon_ext + {name}{head}", drafter))
        elif key in ("pld", "assisted") and args.batch_size > 1:
            skipped[key] = "transformers' prompt lookup and assisted generation decode one prompt at a time"
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


def measure(methods: list[Method], chosen, batches: list[PromptBatch], max_new: int, seed: int,
            progress: bool) -> list[dict]:
    """Every method on every batch of prompts, interleaved; one record per (prompt, method)."""
    for m in methods:  # warm-up: first calls pay one-off allocation and dispatch costs
        m.run(batches[0], min(WARMUP_TOKENS, max_new), seed)
    records = []
    bar = tqdm(batches, desc="bench", unit="batch" if len(batches[0].prompts) > 1 else "prompt", disable=not progress)
    for i, batch in enumerate(bar):
        shift = i % len(methods)
        results = {m.key: m.run(batch, max_new, seed + i) for m in methods[shift:] + methods[:shift]}
        for row, prompt in enumerate(batch.prompts):
            reference = results["generate"][row].tokens if "generate" in results else None
            for m in methods:
                r = results[m.key][row]
                records.append(dict(prompt=prompt, category=chosen[prompt].category, method=m.key,
                                    prompt_tokens=int(batch.ids.shape[1] if batch.attention_mask is None
                                                      else batch.attention_mask[row].sum()),
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


def classify_divergences(model, records: list[dict], ids_list: list[torch.Tensor],
                         reference: dict[int, list[int]] | None = None) -> None:
    """Adds ``divergence`` to every greedy record that differs from model.generate's: where the
    outputs part, and whether the target's logits there were a rounding near-tie (explained).
    ``reference``: model.generate's tokens per prompt to compare with instead of the run's own
    "generate" records (whose ``same_as_generate`` is then recomputed too)."""
    if reference is None:
        reference = {r["prompt"]: r["tokens"] for r in records if r["method"] == "generate"}
    else:
        for r in records:
            r["same_as_generate"] = r["tokens"] == reference[r["prompt"]]
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
    batches = make_batches(ids_list, args.batch_size)
    records = measure(methods, chosen, batches, args.max_new_tokens, args.seed, not args.no_progress)
    generate = next((m for m in methods if m.key == "generate"), None)
    if args.temperature == 0 and generate is not None:
        reference = None
        if args.batch_size > 1:
            # In bf16/fp16 a batched row may differ from its prompt decoded alone (padding and the
            # batch change the rounding), and classify can only reproduce generate on the prompt
            # alone: every method's rows, generate's batched ones included, are compared with that.
            reference = {b.prompts[0]: generate.run(b, args.max_new_tokens, args.seed)[0].tokens
                         for b in make_batches(ids_list, 1)}
        classify_divergences(model, records, ids_list, reference)
    report = bench_report.build_report(args, methods, skipped, records, cut, dtype_name(model.dtype))
    paths = bench_report.write(report, Path(args.out))
    print(bench_report.markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    unexplained = [r for r in records if r.get("divergence") and not r["divergence"]["explained"]]
    return 1 if unexplained else 0
