"""Training data for Falcon drafters: token sequences plus the target's features, on disk.

Two sources of sequences:
- teacher forcing: fixed text (plain .txt, JSONL ``text`` fields) is tokenised and run through the
  target; each document becomes one or more sequences of at most ``max_len`` tokens.
- self-distillation: the target answers prompts itself (batched sampling; the chat template is
  applied when the tokenizer has one), then the prompt + answer is run through the target.

Storage: ``<out>/data.json`` (what produced the data) and ``<out>/shard_00000.safetensors`` ...,
each holding
    tokens      int32  [n_tok]      all sequences of the shard, concatenated
    features    fp16   [n_tok, H]   the target's last hidden state (after the final norm)
    offsets     int64  [n_seq + 1]  sequence j is tokens[offsets[j]:offsets[j+1]]
    prompt_lens int32  [n_seq]      leading tokens that are prompt (0 for teacher forcing)
Nothing vocabulary-sized is stored: the distillation targets p = softmax(lm_head(f)) are
recomputed at training time from the stored features through the frozen shared LM head, so a
token costs 4 + 2·H bytes (H = 64: 132 B; H = 576: 1156 B). Shards are written atomically and a
shard's content depends only on its prompts and ``seed + shard index``, so an interrupted run
resumes by skipping the shards that exist.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

FORMAT_VERSION = 1
PROMPT_KEYS = ("turns", "question", "prompt", "instruction", "text")


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

    def __post_init__(self):
        if self.mode not in ("self_distill", "teacher_forcing"):
            raise ValueError(f"mode must be 'self_distill' or 'teacher_forcing', got {self.mode!r}")
        if self.feature_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"feature_dtype must be float16, bfloat16 or float32, got {self.feature_dtype!r}")
        for name in ("shard_size", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------- reading prompts and text

def _files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt", ".md") and p.is_file())
    if not path.exists():
        raise ValueError(f"data source {source!r} does not exist")
    return [path]


def _record_prompt(record: dict, where: str) -> str:
    for key in PROMPT_KEYS:
        if key in record:
            value = record[key]
            # Multi-turn records: only the first turn is a prompt; later turns refer to answers.
            return value[0] if isinstance(value, list) else value
    raise ValueError(f"{where}: a JSONL record needs one of the keys {PROMPT_KEYS}, has {sorted(record)}")


def _split_text(text: str) -> list[str]:
    """Documents in a text file: separated by <|endoftext|> when present, else the whole file."""
    parts = text.split("<|endoftext|>") if "<|endoftext|>" in text else [text]
    return [p.strip() for p in parts if p.strip()]


def load_prompts(sources: list[str]) -> list[str]:
    """Prompts from JSONL files (first of turns / question / prompt / instruction / text),
    text files (one document each, split on <|endoftext|>) or folders of those."""
    prompts = []
    for source in sources:
        for path in _files(source):
            if path.suffix == ".jsonl":
                with open(path, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            prompts.append(_record_prompt(json.loads(line), f"{path}:{n}"))
            else:
                prompts.extend(_split_text(path.read_text(encoding="utf-8")))
    return prompts


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
                    text = record.get("text") or _record_prompt(record, f"{path}:{n}")
                    if "answer" in record:
                        text = f"{text}\n{record['answer']}"
                    texts.append(text)
    return texts


# ---------------------------------------------------------------- tokenising

def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt: through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt).input_ids


def stop_ids(model, config: DataConfig) -> list[int]:
    if config.eos_token_ids:
        return list(config.eos_token_ids)
    eos = model.generation_config.eos_token_id
    if eos is None:
        raise ValueError("the model has no eos_token_id in its generation_config: pass eos_token_ids")
    return [eos] if isinstance(eos, int) else list(eos)


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


def pack_shard(seqs: list[list[int]], prompt_lens: list[int], feats: list[torch.Tensor], dtype: torch.dtype):
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return {
        "tokens": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
        "features": torch.cat(feats).to(dtype).contiguous(),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "prompt_lens": torch.tensor(prompt_lens, dtype=torch.int32),
    }


def _check_resume(out_dir: Path, config: DataConfig) -> None:
    meta = out_dir / "data.json"
    if meta.exists():
        saved = json.loads(meta.read_text())["config"]
        if saved != asdict(config):
            raise ValueError(f"{meta} was written with a different configuration; use a new folder.\n"
                             f"saved: {saved}\nnow:   {asdict(config)}")


def _work_items(tokenizer, config: DataConfig) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per sequence-to-be, in a fixed order."""
    if config.mode == "self_distill":
        # No sources: `limit` unconditional samples (the prompt is just what encoding "" gives, e.g. BOS).
        prompts = load_prompts(config.sources) if config.sources else [""] * config.limit
        prompts = prompts[: config.limit] if config.limit else prompts
        items = []
        for p in prompts:
            ids = encode_prompt(tokenizer, p)[: config.max_len - 1]
            items.append((ids, len(ids)))
        return items
    texts = load_texts(config.sources)
    texts = texts[: config.limit] if config.limit else texts
    items = []
    for text in texts:
        ids = tokenizer(text).input_ids
        items.extend((ids[i: i + config.max_len], 0) for i in range(0, len(ids) - 1, config.max_len))
    return [(ids, n) for ids, n in items if len(ids) >= 2]


def build_shard(model, items: list[tuple[list[int], int]], config: DataConfig, seed: int, stops: list[int]):
    torch.manual_seed(seed)
    seqs, prompt_lens = [], []
    for start in range(0, len(items), config.batch_size):
        batch = items[start: start + config.batch_size]
        if config.mode == "self_distill":
            seqs.extend(answer_prompts(model, [ids for ids, _ in batch], config, stops))
        else:
            seqs.extend(ids for ids, _ in batch)
        prompt_lens.extend(n for _, n in batch)
    feats = []
    for start in range(0, len(seqs), config.batch_size):
        feats.extend(target_features(model, seqs[start: start + config.batch_size]))
    return pack_shard(seqs, prompt_lens, feats, getattr(torch, config.feature_dtype))


def prepare_data(model, tokenizer, config: DataConfig, out_dir: str | Path) -> Path:
    """Writes (or completes) the shards in ``out_dir``; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(out_dir, config)
    items = _work_items(tokenizer, config)
    if not items:
        raise ValueError(f"no prompts or text found in {config.sources}")
    stops = stop_ids(model, config) if config.mode == "self_distill" else []
    n_shards = (len(items) + config.shard_size - 1) // config.shard_size
    meta = {"format": FORMAT_VERSION, "config": asdict(config), "num_shards": n_shards,
            "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size}
    (out_dir / "data.json").write_text(json.dumps(meta, indent=1))
    for index in tqdm(range(n_shards), desc="shards", unit="shard"):
        path = shard_path(out_dir, index)
        if path.exists():
            continue
        chunk = items[index * config.shard_size: (index + 1) * config.shard_size]
        _save_atomic(build_shard(model, chunk, config, config.seed + index, stops), path)
    return out_dir


# ---------------------------------------------------------------- reading shards back

@dataclass
class Sequences:
    """All sequences of a data folder, in memory: tokens [L_j] int64, features [L_j, H] (stored
    dtype), and how many leading tokens of each are prompt."""

    tokens: list[torch.Tensor]
    features: list[torch.Tensor]
    prompt_lens: list[int]

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
    if not seqs.tokens:
        raise ValueError(f"{data_dir} has no finished shard yet")
    return meta, seqs


def bytes_per_token(data_dir: str | Path) -> float:
    """Disk bytes per stored token, measured over all shard files."""
    data_dir = Path(data_dir)
    meta, seqs = read_data(data_dir, allow_partial=True)
    size = sum(p.stat().st_size for p in data_dir.glob("shard_*.safetensors"))
    return size / max(seqs.num_tokens(), 1)
