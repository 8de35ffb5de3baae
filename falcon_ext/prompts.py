"""The one prompt reader and encoder: named sets shipped in ``falcon_ext/prompt_data``, prompt
files and folders of one's own. bench, eval-drafter, tune-tree, prepare-data and training's final
evaluation all read prompts through ``load_sources`` and encode them through ``encode``, so the
same file gives the same prompts, and the same token ids, everywhere.

Every prompt carries a category, for per-category results. ``select`` takes prompts round-robin
over the categories (file order within each), so a small prompt count still covers every
category equally: 16 MT-Bench prompts are 2 per category, not all of "writing".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "prompt_data"
SPEC_BENCH = DATA_DIR / "spec_bench_question.jsonl"
GSM8K = DATA_DIR / "gsm8k_test_first100.jsonl"
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SPEC_BENCH_CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
NAMED_SETS = ("mt-bench", "spec-bench", *(f"spec-bench:{c}" for c in SPEC_BENCH_CATEGORIES), "gsm8k")
# Keys a JSONL record's prompt may be under; for a list (MT-Bench "turns") the first item is used:
# later turns refer to an answer the benchmark does not have.
PROMPT_KEYS = ("turns", "question", "prompt", "instruction", "text")


@dataclass(frozen=True)
class Prompt:
    category: str
    text: str


def _jsonl_records(path: Path) -> list[tuple[dict, str]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                records.append((json.loads(line), f"{path}:{n}"))
    return records


def record_text(record: dict, where: str) -> str:
    for key in PROMPT_KEYS:
        if key in record:
            value = record[key]
            text = value[0] if isinstance(value, list) and value else value
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: {key!r} holds no prompt text")
            return text
    raise ValueError(f"{where}: a prompt record needs one of the keys {PROMPT_KEYS}, has {sorted(record)}")


def _spec_bench(category_of) -> list[Prompt]:
    return [Prompt(category_of(r["category"]), record_text(r, where)) for r, where in _jsonl_records(SPEC_BENCH)]


def load_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file (first of turns / question / prompt / instruction / text; the
    category from a ``category`` key, else the file name) or a text file (documents separated
    by ``<|endoftext|>`` when it has one, else one prompt per non-empty line)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [Prompt(str(r.get("category", path.stem)), record_text(r, where)) for r, where in _jsonl_records(path)]
    text = path.read_text(encoding="utf-8")
    parts = text.split("<|endoftext|>") if "<|endoftext|>" in text else text.splitlines()
    return [Prompt(path.stem, p.strip()) for p in parts if p.strip()]


def load_prompt_set(name: str) -> list[Prompt]:
    """A named set (see ``NAMED_SETS``) or a path to a JSONL/text file."""
    if name == "mt-bench":
        return [p for p in _spec_bench(str) if p.category in MT_BENCH_CATEGORIES]
    if name == "spec-bench" or name.startswith("spec-bench:"):
        # Spec-Bench reports its 80 MT-Bench questions as one category.
        prompts = _spec_bench(lambda c: "mt_bench" if c in MT_BENCH_CATEGORIES else c)
        if name == "spec-bench":
            return prompts
        category = name.split(":", 1)[1]
        if category not in SPEC_BENCH_CATEGORIES:
            raise ValueError(f"unknown Spec-Bench category {category!r}; one of {SPEC_BENCH_CATEGORIES}")
        return [p for p in prompts if p.category == category]
    if name == "gsm8k":
        return [Prompt("gsm8k", record_text(r, where)) for r, where in _jsonl_records(GSM8K)]
    if Path(name).is_file():
        return load_prompt_file(name)
    raise ValueError(f"no prompt set {name!r}: give one of {NAMED_SETS} or a JSONL/text file")


def load_sources(sources: list[str]) -> list[Prompt]:
    """Prompts of several sources, in order: named sets, files, or folders (their .jsonl, .txt and
    .md files, sorted by path)."""
    prompts = []
    for source in sources:
        path = Path(source)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt", ".md") and p.is_file()) \
            if path.is_dir() else None
        prompts += [p for f in files for p in load_prompt_file(f)] if files is not None else load_prompt_set(source)
    return prompts


def use_chat_template(tokenizer, mode: str = "auto") -> bool:
    """Whether prompts go in as a user turn: ``on``, ``off``, or ``auto`` (when the tokenizer has a
    chat template, i.e. the target is instruction-tuned)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has_template:
        raise ValueError("--chat-template on, but the tokenizer has no chat template")
    return {"on": True, "off": False, "auto": has_template}[mode]


def select(prompts: list[Prompt], count: int) -> list[Prompt]:
    """``count`` prompts taken round-robin over the categories (in order of first appearance)."""
    if count < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {count}")
    by_category: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    chosen, depth = [], 0
    while len(chosen) < min(count, len(prompts)):
        for group in by_category.values():
            if depth < len(group) and len(chosen) < count:
                chosen.append(group[depth])
        depth += 1
    return chosen


def encode(tokenizer, text: str, chat_template: bool, max_tokens: int | None) -> tuple[torch.Tensor, bool]:
    """Token ids [1, T] of a prompt (as a user turn through the chat template, or plain), cut to
    at most ``max_tokens`` by dropping tokens from the start (after a leading BOS): the end holds
    the question and the assistant header. Returns (ids, whether it was cut)."""
    if chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    if max_tokens is None or ids.shape[1] <= max_tokens:
        return ids, False
    if max_tokens < 2:
        raise ValueError(f"no room for the prompt: at most {max_tokens} prompt tokens")
    keep_first = tokenizer.bos_token_id is not None and int(ids[0, 0]) == tokenizer.bos_token_id
    head = ids[:, :1] if keep_first else ids[:, :0]
    return torch.cat([head, ids[:, ids.shape[1] - (max_tokens - head.shape[1]):]], dim=1), True


def encode_sources(tokenizer, sources: list[str], limit: int = 0) -> list[list[int]]:
    """Token ids of the first ``limit`` (0: all) prompts of ``sources`` (see ``load_sources``), a
    user turn through the chat template when the tokenizer has one (``use_chat_template``)."""
    chosen = load_sources(sources)
    chosen = chosen[:limit] if limit else chosen
    template = use_chat_template(tokenizer)
    return [encode(tokenizer, p.text, template, None)[0][0].tolist() for p in chosen]
