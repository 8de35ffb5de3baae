"""Training data for Falcon drafters: token sequences plus the target's features, on disk.

Sources of sequences:
- teacher forcing: fixed text (plain .txt, JSONL ``text`` fields) is tokenised and run through the
  target; each document becomes one or more sequences of at most ``max_len`` tokens.
- teacher forcing on conversations (``source``: "sharegpt" or a conversation file, see
  falcon_ext.training.conversations): each whole conversation through the chat template, trained only on
  the assistant's tokens.
- self-distillation: the target answers prompts itself (batched; the chat template is applied when
  the tokenizer has one), then the prompt + answer is run through the target. With a conversation
  ``source`` the prompts are the conversations' first user turns.

A conversation source is shuffled for the seed and split by conversation: the first
``holdout_conversations`` form the ``heldout`` split, the rest ``train``; conversations whose first
turn overlaps an evaluation prompt (MT-Bench, Spec-Bench, GSM8K-test, ``exclude`` files) are removed
first. ``max_tokens`` stops after the first shard that reaches the budget.

Storage: ``<out>/data.json`` (what produced the data) and ``<out>/shard_00000.safetensors`` ...,
each holding
    tokens      int32  [n_tok]      all sequences of the shard, concatenated
    features    fp16   [n_tok, H]   the target's last hidden state (after the final norm)
    offsets     int64  [n_seq + 1]  sequence j is tokens[offsets[j]:offsets[j+1]]
    prompt_lens int32  [n_seq]      tokens before the first trained one (0 for plain teacher forcing)
    loss_mask   uint8  [n_tok]      1 where the token is a training target (format 2; format 1
                                    shards mean: every token from prompt_lens on)
Nothing vocabulary-sized is stored: the distillation targets p = softmax(lm_head(f)) are
recomputed at training time from the stored features through the frozen shared LM head, so a
token costs 4 + 2·H bytes (H = 64: 132 B; H = 576: 1156 B). Shards are written atomically and a
shard's content depends only on its prompts and ``seed + shard index``, so an interrupted run
resumes by skipping the shards that exist. Under torchrun, rank r of N writes the shards
i ≡ r (mod N) into the same folder and rank 0 writes data.json: the folder is the one a single
process writes.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..prompts import encode, encode_sources, record_text, use_chat_template
from ..targets import DTYPE_NAMES, eos_token_ids, parse_dtype
from . import conversations as conv
from .distributed import World

FORMAT_VERSION = 2


@dataclass
class DataConfig:
    """Everything that determines the content of the shards (saved as data.json)."""

    target: str
    mode: str  # "self_distill" or "teacher_forcing"
    sources: list[str]
    shard_size: int = 256  # sequences per shard
    batch_size: int = 16
    max_len: int = 512  # tokens per sequence (prompt + answer)
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy answers
    top_p: float = 1.0
    eos_token_ids: list[int] = field(default_factory=list)  # empty: the model's generation_config
    limit: int = 0  # use only the first `limit` prompts / documents (0 = all; without sources: samples)
    feature_dtype: str = "float16"
    seed: int = 0
    source: str = ""  # "sharegpt" or a JSON/JSONL conversation file (instead of sources)
    split: str = "train"  # with a conversation source: train | heldout
    holdout_conversations: int = 256
    exclude: list[str] = field(default_factory=list)  # prompt files whose prompts must stay out of training
    english_only: bool = True
    max_tokens: int = 0  # stop after the shard that reaches this many stored tokens (0 = no budget)
    dtype: str = "float32"  # the target's dtype while making the data

    def __post_init__(self):
        if self.mode not in ("self_distill", "teacher_forcing"):
            raise ValueError(f"mode must be 'self_distill' or 'teacher_forcing', got {self.mode!r}")
        if self.split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {self.split!r}")
        if self.source and self.sources:
            raise ValueError("give either a conversation --source or --data files, not both")
        if self.feature_dtype not in DTYPE_NAMES:
            raise ValueError(f"feature_dtype must be float16, bfloat16 or float32, got {self.feature_dtype!r}")
        for name in ("shard_size", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------- reading documents

def _files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt", ".md") and p.is_file())
    if not path.exists():
        raise ValueError(f"data source {source!r} does not exist")
    return [path]


def _split_text(text: str) -> list[str]:
    """Documents in a text file: separated by <|endoftext|> when present, else the whole file."""
    parts = text.split("<|endoftext|>") if "<|endoftext|>" in text else [text]
    return [p.strip() for p in parts if p.strip()]


def load_texts(sources: list[str]) -> list[str]:
    """Documents for teacher forcing: text files, JSONL ``text`` fields (else prompt + answer)."""
    texts = []
    for source in sources:
        for path in _files(source):
            if path.suffix != ".jsonl":
                texts.extend(_split_text(path.read_text(encoding="utf-8")))
                continue
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    text = record.get("text") or record_text(record, f"{path}:{n}")
                    if "answer" in record:
                        text = f"{text}\n{record['answer']}"
                    texts.append(text)
    return texts


# ---------------------------------------------------------------- stop tokens

def stop_ids(model, config: DataConfig) -> list[int]:
    stops = list(config.eos_token_ids) or eos_token_ids(model)
    if not stops:
        raise ValueError("the model has no eos_token_id in its generation_config: pass eos_token_ids")
    return stops


# ---------------------------------------------------------------- running the target

def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.tensor(s)
        mask[row, cols] = 1
    return ids, mask


@torch.no_grad()
def target_features(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """The target's features (last hidden state after the final norm) for each sequence, [L, H] fp32.
    Right padding: under causal attention the real positions never see the pads."""
    device = next(model.parameters()).device
    ids, mask = _pad(seqs, 0, left=False)
    # Only the hidden states are needed: skip the LM head over every position where the model
    # allows it (for SmolLM2 that is a fifth of the forward and a [B, L, 49152] fp32 buffer).
    skip_logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, **skip_logits)
    hidden = out.hidden_states[-1].float().cpu()
    return [hidden[row, : len(s)] for row, s in enumerate(seqs)]


@torch.no_grad()
def answer_prompts(model, prompts: list[list[int]], config: DataConfig, stops: list[int]) -> list[list[int]]:
    """Prompt + the target's own answer (sampled, or greedy at temperature 0), cut after the first
    stop token and at max_len."""
    device = next(model.parameters()).device
    ids, mask = _pad(prompts, stops[0], left=True)
    sample = config.temperature > 0
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=config.max_new_tokens,
        do_sample=sample, temperature=config.temperature if sample else None,
        top_p=config.top_p if sample else None, top_k=0 if sample else None,
        eos_token_id=stops, pad_token_id=stops[0],
    ).cpu()
    answers = []
    for row, prompt in enumerate(prompts):
        answer = out[row, ids.shape[1]:].tolist()
        for n, token in enumerate(answer):
            if token in stops:
                answer = answer[: n + 1]
                break
        answers.append((prompt + answer)[: config.max_len])
    return answers


# ---------------------------------------------------------------- shards

def shard_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"shard_{index:05d}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def pack_shard(seqs: list[list[int]], loss_masks: list[list[int]], feats: list[torch.Tensor], dtype: torch.dtype):
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    # The first trained token; a sequence with none counts as all prompt.
    prompt_lens = [next((i for i, m in enumerate(mask) if m), len(mask)) for mask in loss_masks]
    return {
        "tokens": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
        "features": torch.cat(feats).to(dtype).contiguous(),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "prompt_lens": torch.tensor(prompt_lens, dtype=torch.int32),
        "loss_mask": torch.tensor([m for mask in loss_masks for m in mask], dtype=torch.uint8),
    }


def _check_resume(out_dir: Path, config: DataConfig) -> None:
    """A rerun must make the same data. The token budget only decides how many shards there are
    (each shard's content does not depend on it), so a rerun with a larger budget grows the data."""
    meta = out_dir / "data.json"
    if meta.exists():
        saved = {**DataConfig("", "self_distill", []).__dict__, **json.loads(meta.read_text())["config"]}
        now = asdict(config)
        saved.pop("max_tokens"), now.pop("max_tokens")
        if saved != now:
            raise ValueError(f"{meta} was written with a different configuration; use a new folder.\n"
                             f"saved: {saved}\nnow:   {now}")


@dataclass
class Item:
    """One sequence to be: its token ids and which of them are training targets. For
    self-distillation ``ids`` is the prompt and the answer's tokens are the targets."""

    ids: list[int]
    loss_mask: list[int]


def _conversation_items(tokenizer, config: DataConfig) -> tuple[list[Item], dict]:
    found, report = conv.read_conversations(config.source)
    kept = conv.filter_conversations(found, report, conv.eval_prompt_keys(config.exclude), config.english_only)
    order = conv.shuffled(kept, config.seed)
    cut = min(config.holdout_conversations, len(order) // 4)
    chosen = order[:cut] if config.split == "heldout" else order[cut:]
    chosen = chosen[: config.limit] if config.limit else chosen
    items, skipped = [], 0
    for c in chosen:
        if config.mode == "self_distill":
            ids = encode(tokenizer, c.first_user_turn(), use_chat_template(tokenizer), None)[0][0].tolist()
            ids = ids[: config.max_len - 1]
            items.append(Item(ids, [0] * len(ids)))
            continue
        encoded = conv.tokenize_conversation(tokenizer, c, config.max_len)
        if encoded is None or sum(encoded[1]) == 0:
            skipped += 1
            continue
        items.append(Item(*encoded))
    summary = {**dataclasses.asdict(report), "split": config.split, "split_conversations": len(chosen),
               "skipped_no_answer_in_window": skipped}
    summary["excluded_ids"] = summary["excluded_ids"][:50]
    print(f"{config.source}: recovered {report.conversations} conversations from {report.records} records; "
          f"removed {report.dropped_eval_overlap} overlapping an evaluation prompt ({report.eval_prompts_checked} "
          f"checked), {report.dropped_non_english} not English, {report.dropped_malformed} malformed; "
          f"{config.split} split: {len(chosen)} conversations")
    return items, summary


def _work_items(tokenizer, config: DataConfig) -> tuple[list[Item], dict]:
    """The sequences-to-be in a fixed order, and what the source reading kept and dropped."""
    if config.source:
        return _conversation_items(tokenizer, config)
    if config.mode == "self_distill":
        # No sources: `limit` unconditional samples (the prompt is just what encoding "" gives, e.g. BOS).
        if config.sources:
            prompts = encode_sources(tokenizer, config.sources, config.limit)
        else:
            prompts = [encode(tokenizer, "", use_chat_template(tokenizer), None)[0][0].tolist()] * config.limit
        items = []
        for ids in prompts:
            ids = ids[: config.max_len - 1]
            items.append(Item(ids, [0] * len(ids)))
        return items, {}
    texts = load_texts(config.sources)
    texts = texts[: config.limit] if config.limit else texts
    items = []
    for text in texts:
        ids = tokenizer(text).input_ids
        for i in range(0, len(ids) - 1, config.max_len):
            piece = ids[i: i + config.max_len]
            items.append(Item(piece, [1] * len(piece)))
    return [it for it in items if len(it.ids) >= 2], {}


def build_shard(model, items: list[Item], config: DataConfig, seed: int, stops: list[int], progress=None):
    """One shard's tensors; ``progress(n)`` is called with the tokens of each finished batch."""
    torch.manual_seed(seed)
    seqs, masks = [], []
    for start in range(0, len(items), config.batch_size):
        batch = items[start: start + config.batch_size]
        if config.mode == "self_distill":
            for item, full in zip(batch, answer_prompts(model, [it.ids for it in batch], config, stops)):
                seqs.append(full)
                masks.append(item.loss_mask + [1] * (len(full) - len(item.ids)))
        else:
            seqs.extend(it.ids for it in batch)
            masks.extend(it.loss_mask for it in batch)
    feats = []
    for start in range(0, len(seqs), config.batch_size):
        chunk = seqs[start: start + config.batch_size]
        feats.extend(target_features(model, chunk))
        if progress:
            progress(sum(len(s) for s in chunk))
    return pack_shard(seqs, masks, feats, parse_dtype(config.feature_dtype))


def shard_tokens(path: Path) -> int:
    """Stored tokens of a finished shard, read from its offsets alone."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int(f.get_tensor("offsets")[-1])


def _write_meta(out_dir: Path, meta: dict) -> None:
    tmp = out_dir / "data.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out_dir / "data.json")


def prepare_data(model, tokenizer, config: DataConfig, out_dir: str | Path, world: World = World()) -> Path:
    """Writes (or completes) the shards in ``out_dir``; returns it. ``world``: this process's rank
    in a torchrun job (it writes every size-th shard); default the single process."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(out_dir, config)
    items, corpus = _work_items(tokenizer, config)
    if not items:
        raise ValueError(f"no prompts or text found in {config.source or config.sources}")
    stops = stop_ids(model, config) if config.mode == "self_distill" else []
    n_shards = (len(items) + config.shard_size - 1) // config.shard_size
    meta = {"format": FORMAT_VERSION, "config": asdict(config), "num_shards": n_shards,
            "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size, "corpus": corpus}
    if world.main:
        _write_meta(out_dir, meta)
    planned = sum(len(it.ids) for it in items) if config.mode == "teacher_forcing" else None
    totals = [t for t in (config.max_tokens, planned) if t]
    bar = tqdm(total=min(totals) if totals else None, desc="tokens", unit="tok", unit_scale=True, smoothing=0.1,
               disable=not world.main)
    stored, reached = 0, False
    # Rounds of one shard per rank; after each, the ranks share their shards' token counts, so
    # every rank counts the budget in shard order, as a single process does.
    for first in range(0, n_shards, world.size):
        index, done, built = first + world.rank, 0, False
        path = shard_path(out_dir, index)
        if index < n_shards and path.exists():
            done = shard_tokens(path)
            bar.update(done)
        elif index < n_shards:  # (the last round may have fewer shards than ranks)
            chunk = items[index * config.shard_size: (index + 1) * config.shard_size]
            tensors = build_shard(model, chunk, config, config.seed + index, stops, progress=bar.update)
            _save_atomic(tensors, path)
            done, built = int(tensors["offsets"][-1]), True
        counts = world.gather(torch.tensor([done], device=world.device)).tolist()
        bar.update(sum(counts) - done)
        for at, n in zip(range(first, n_shards), counts):
            stored += n
            if config.max_tokens and stored >= config.max_tokens:
                meta["num_shards"] = at + 1  # the budget is reached: later shards are not part of this data
                reached = True
                break
        if reached:
            if built and index >= meta["num_shards"]:
                path.unlink()  # built beside the shard that reached the budget; a single process would not have
            break
    bar.close()
    world.barrier()  # every rank's shards are final (one past the budget deleted) before the folder is read
    meta["tokens"] = stored
    if world.main:
        _write_meta(out_dir, meta)
    return out_dir


# ---------------------------------------------------------------- reading shards back

@dataclass
class Sequences:
    """All sequences of a data folder, in memory: tokens [L_j] int64, features [L_j, H] (stored
    dtype), how many leading tokens of each are prompt, and which tokens are training targets
    (bool [L_j])."""

    tokens: list[torch.Tensor]
    features: list[torch.Tensor]
    prompt_lens: list[int]
    loss_masks: list[torch.Tensor] = field(default_factory=list)

    def part(self, lo: int, hi: int) -> "Sequences":
        return Sequences(self.tokens[lo:hi], self.features[lo:hi], self.prompt_lens[lo:hi], self.loss_masks[lo:hi])

    def extend(self, other: "Sequences") -> None:
        self.tokens += other.tokens
        self.features += other.features
        self.prompt_lens += other.prompt_lens
        self.loss_masks += other.loss_masks

    def __len__(self) -> int:
        return len(self.tokens)

    def num_tokens(self) -> int:
        return sum(t.numel() for t in self.tokens)


def read_data(data_dir: str | Path, allow_partial: bool = False) -> tuple[dict, Sequences]:
    """Loads data.json and the shards. A missing shard is an error unless ``allow_partial``
    (then the finished shards are used, e.g. to train while the data is still growing)."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "data.json"
    if not meta_path.exists():
        raise ValueError(f"{data_dir} has no data.json: prepare data with `falcon-ext prepare-data`")
    meta = json.loads(meta_path.read_text())
    seqs = Sequences([], [], [])
    meta["shards_read"] = 0
    for index in range(meta["num_shards"]):
        path = shard_path(data_dir, index)
        if not path.exists():
            if allow_partial:
                continue
            raise ValueError(f"{path} is missing: the data preparation was interrupted; rerun it to resume")
        meta["shards_read"] += 1
        shard = load_file(str(path))
        offsets = shard["offsets"].tolist()
        for j in range(len(offsets) - 1):
            lo, hi = offsets[j], offsets[j + 1]
            seqs.tokens.append(shard["tokens"][lo:hi].long())
            seqs.features.append(shard["features"][lo:hi])
            seqs.prompt_lens.append(int(shard["prompt_lens"][j]))
            if "loss_mask" in shard:
                seqs.loss_masks.append(shard["loss_mask"][lo:hi].bool())
            else:  # format 1: every token after the prompt
                seqs.loss_masks.append(torch.arange(hi - lo) >= seqs.prompt_lens[-1])
    if not seqs.tokens:
        raise ValueError(f"{data_dir} has no finished shard yet")
    return meta, seqs


def bytes_per_token(data_dir: str | Path) -> float:
    """Disk bytes per stored token, measured over all shard files."""
    data_dir = Path(data_dir)
    meta, seqs = read_data(data_dir, allow_partial=True)
    size = sum(p.stat().st_size for p in data_dir.glob("shard_*.safetensors"))
    return size / max(seqs.num_tokens(), 1)
