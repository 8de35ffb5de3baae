"""Training a Falcon drafter: Coupled Sequential Glancing Distillation (CSGD) or plain distillation.

Data (falcon_ext.training.data): sequences t_0..t_{L-1} with the target's features f_0..f_{L-1}. Drafter
position i reads (f_i, t_{i+1}) and predicts f_{i+k}; its token is LM_head(f_{i+k}) -> t_{i+k+1}.
Loss per position (paper §3.2): SmoothL1(f̂, f) + w_dist·[α·KL(p ‖ p̂) + (1-α)·CE(t, p̂)], with
p = softmax(LM_head(f_{i+k})) recomputed from the stored feature through the frozen shared head.

CSGD (one step): a first pass on the true inputs gives f̂; the Hamming distance d counts the
positions whose drafted token is wrong. The second pass's input at position i is the first
pass's prediction for it (feature f̂_i = first-pass output at i-k, token argmax LM_head(f̂_i)),
as in the drafter's second and later forwards at decode time, except for a span of
N = round(λ·d) consecutive positions (and the first k, which have no prediction) that keep
their true (f_i, t_{i+1}); λ = λ0·(E − e)/E decays over epochs. The loss is on the second pass,
plus ``first_pass_weight`` times the first pass's. Plain training (``csgd=False``) is the
first-pass loss alone.

Checkpoints: <out>/checkpoints/step_<n>/ (drafter config.json + model.safetensors,
optimizer.safetensors, state.json), each made in a temporary folder and renamed into place;
<out>/latest.json names the newest. A rerun of the same command resumes from it; the data
order, noise and spans come from one torch.Generator whose state is saved, so a resumed run
gives the same weights as an uninterrupted one.

Under torchrun (falcon_ext.training.distributed) each rank trains on its share of every global batch,
``batch_size`` rows in all, and DDP averages the gradients. Every rank draws the random numbers
of the whole global batch (window starts, offset, noise, spans) from the same generator and keeps
its rows', and the loss of a rank is its rows' share of the global batch's mean: so N ranks run
the single process's computation, up to the order of floating-point sums. Only rank 0 logs and
writes files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..drafters.falcon import DraftHead, FalconDrafter, FalconDrafterConfig, Passes
from ..drafters.tree import DraftContext
from ..evaluation.acceptance import mean_accepted_tokens
from ..prompts import encode_sources
from ..targets import load_target, parse_dtype
from .data import Sequences, read_data
from .distributed import World
from .run_state import load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    target: str
    data: list[str]  # one or more folders written by prepare-data (from the same target)
    out: str
    k: int = 2
    steps: int = 0  # 0: derived from epochs
    epochs: float = 1.0
    batch_size: int = 8
    seq_len: int = 256  # training window (tokens) cut at random from each sequence
    lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.5
    csgd: bool = True
    glance_lambda: float = 0.4  # λ0
    glance_span: str = "random"  # random | first | last: where the N replaced positions lie
    first_pass_weight: float = 1.0
    feature_noise: float = 0.1  # U(-a, a) added to input features
    w_dist: float = 0.1
    kl_alpha: float = 0.9
    loss_on_prompt: bool = False
    distill_vocab: str = "full"  # full | data: the LM head rows the losses use (see falcon.DraftHead)
    draft_vocab_size: int = 0  # with distill_vocab=data: only the N most frequent target tokens (0 = all)
    amp: str = "none"  # none | bfloat16: autocast of the drafter's forward and the LM head
    num_heads: int = 0  # 0: the drafter's default for the target
    intermediate_size: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    threads: int = 0
    save_every: int = 200
    log_every: int = 20
    keep_checkpoints: int = 2
    eval_sequences: int = 32  # held out from the data for the chain acceptance estimate
    eval_data: str = ""  # a data folder of greedy answers to held-out prompts (used instead)
    eval_prompts: list[str] = dataclasses.field(default_factory=list)  # engine evaluation at the end
    eval_max_new_tokens: int = 128
    eval_passes: int = 4
    allow_partial_data: bool = False
    init: str = ""  # start from this drafter folder (e.g. CSGD fine-tuning of a plain-trained drafter)
    resize_world: bool = False  # resume a checkpoint written by another number of processes

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.distill_vocab not in ("full", "data"):
            raise ValueError(f"distill_vocab must be full or data, got {self.distill_vocab!r}")
        if self.amp not in ("none", "bfloat16"):
            raise ValueError(f"amp must be none or bfloat16, got {self.amp!r}")
        if self.draft_vocab_size < 0 or (self.draft_vocab_size and self.distill_vocab != "data"):
            raise ValueError("draft_vocab_size needs distill_vocab='data' and must be >= 0")
        if self.glance_span not in ("random", "first", "last"):
            raise ValueError(f"glance_span must be random, first or last, got {self.glance_span!r}")
        if self.k < 1 or self.batch_size < 1 or self.seq_len <= self.k + 1:
            raise ValueError("need k >= 1, batch_size >= 1 and seq_len > k + 1")

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})


# ---------------------------------------------------------------- batches

@dataclass
class Batch:
    """Padded training windows. features [B, T+1, H] fp32, tokens [B, T+1], valid [B, T+1] (real
    token), target_ok [B, T+1] (a position whose token counts as a training target)."""

    features: torch.Tensor
    tokens: torch.Tensor
    valid: torch.Tensor
    target_ok: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in dataclasses.astuple(self)))


def make_batch(seqs: Sequences, index: list[int], seq_len: int, loss_on_prompt: bool,
               gen: torch.Generator, rows: slice = slice(None)) -> Batch:
    """Windows of the sequences ``index``, only the rows ``rows`` of them (a rank's share): the
    start of every row's window is drawn, so ``gen`` advances as for the whole batch."""
    starts = []
    for j in index:
        L = seqs.tokens[j].numel()
        # Any start, as long as the window still holds some answer tokens when it can.
        hi = max(L - seq_len, 0)
        lo = min(max(seqs.prompt_lens[j] + seq_len // 4 - seq_len, 0), hi)
        starts.append(int(torch.randint(lo, hi + 1, (1,), generator=gen)))
    index, starts = index[rows], starts[rows]
    B, H = len(index), seqs.features[0].shape[-1]
    feats = torch.zeros(B, seq_len, H)
    toks = torch.zeros(B, seq_len, dtype=torch.long)
    valid = torch.zeros(B, seq_len, dtype=torch.bool)
    target_ok = torch.zeros(B, seq_len, dtype=torch.bool)
    for row, (j, start) in enumerate(zip(index, starts)):
        L = seqs.tokens[j].numel()
        n = min(seq_len, L - start)
        feats[row, :n] = seqs.features[j][start: start + n].float()
        toks[row, :n] = seqs.tokens[j][start: start + n]
        valid[row, :n] = True
        target_ok[row, :n] = True if loss_on_prompt else seqs.loss_masks[j][start: start + n]
    return Batch(feats, toks, valid, target_ok)


# ---------------------------------------------------------------- losses

@dataclass
class StepLosses:
    loss: torch.Tensor
    reg: float
    kl: float
    ce: float
    correct: torch.Tensor  # [k] correct drafted tokens per block position
    count: torch.Tensor  # [k] positions per block position
    agree: torch.Tensor  # [k] drafted tokens equal to the target's argmax (what the engine accepts)
    first_correct: torch.Tensor | None = None  # CSGD: the first (true-input) pass's counts


def data_vocab(seqs: Sequences, size: int = 0) -> tuple[torch.Tensor, float]:
    """The ``distill_vocab="data"`` head rows: sorted ids of the tokens in the sequences, or with
    ``size`` only the ``size`` most frequent training-target tokens (FR-Spec's frequency-ranked
    draft vocabulary), and the share of training-target tokens those ids cover."""
    if not size:
        return torch.unique(torch.cat([t.long() for t in seqs.tokens])), 1.0
    targets = torch.cat([t.long()[m] for t, m in zip(seqs.tokens, seqs.loss_masks)])
    counts = torch.bincount(targets)
    top = counts.argsort(descending=True, stable=True)[: min(size, int((counts > 0).sum()))]
    return top.sort().values, float(counts[top].sum()) / max(targets.numel(), 1)


def distill_loss(head: DraftHead, pred, batch: Batch, offset: int, cfg: TrainConfig) -> StepLosses:
    """Loss of predictions ``pred`` [B, T, H] (position i predicts f_{i+k}, token t_{i+k+1})."""
    k = cfg.k
    T = pred.shape[1]
    n = T - k  # positions i < T - k have both f_{i+k} and t_{i+k+1} in the window
    pred = pred[:, :n]
    true_f = batch.features[:, k: k + n]
    true_t = head.rows(batch.tokens[:, k + 1: k + 1 + n])
    # Padding holds id 0, which a data-vocabulary head may lack (row -1); it is masked anyway.
    mask = (batch.valid[:, k + 1: k + 1 + n] & batch.target_ok[:, k + 1: k + 1 + n] & (true_t >= 0)).float()
    true_t = true_t.clamp(min=0)
    denom = mask.sum().clamp(min=1.0)
    reg = (F.smooth_l1_loss(pred.float(), true_f, reduction="none").mean(-1) * mask).sum() / denom
    with torch.no_grad():
        target_logp = F.log_softmax(head.logits(true_f).float(), -1)
    draft_logp = F.log_softmax(head.logits(pred).float(), -1)
    kl = ((target_logp.exp() * (target_logp - draft_logp)).sum(-1) * mask).sum() / denom
    ce = (F.nll_loss(draft_logp.transpose(1, 2), true_t, reduction="none") * mask).sum() / denom
    loss = reg + cfg.w_dist * (cfg.kl_alpha * kl + (1 - cfg.kl_alpha) * ce)
    with torch.no_grad():
        drafted = draft_logp.argmax(-1)
        slot = (torch.arange(n, device=mask.device) - offset) % k
        per_slot = lambda x: torch.stack([x[:, slot == j].sum() for j in range(k)])  # noqa: E731
        # On text the target did not write the data token is often not the target's choice:
        # agreement with the target's argmax is what the engine's greedy verification accepts.
        correct = per_slot((drafted == true_t).float() * mask)
        agree = per_slot((drafted == target_logp.argmax(-1)).float() * mask)
    return StepLosses(loss, reg.item(), kl.item(), ce.item(), correct, per_slot(mask), agree)


def glance_inputs(head: DraftHead, pred1, batch: Batch, lam: float, span: str, k: int, gen: torch.Generator,
                  world: World = World()):
    """Second-pass inputs: predicted (f̂_i, t̂_{i+1}) except the first k and N = round(λ·d) consecutive
    positions per sequence, which keep their true inputs. Returns (features, next_tokens) [B, T, .]."""
    B, T, _ = pred1.shape
    with torch.no_grad():
        pred_tok = head.tokens(head.logits(pred1).argmax(-1))  # [B, T]: position i's guess of t_{i+k+1}
        n = T - k
        wrong = (pred_tok[:, :n] != batch.tokens[:, k + 1: k + 1 + n]) & batch.valid[:, k + 1: k + 1 + n]
        d = wrong.sum(1)
        feats = batch.features[:, :T].clone()
        toks = batch.tokens[:, 1: T + 1].clone()
        # Position i >= k: predicted f_i is pass-1 output at i-k, its token t̂_{i+1} from that output.
        feats[:, k:] = pred1[:, : T - k].to(feats.dtype)
        toks[:, k:] = pred_tok[:, : T - k]
        keep_true = torch.zeros(B, T, dtype=torch.bool, device=pred1.device)
        keep_true[:, :k] = True
        # Spans are drawn for every row of the global batch (d of all ranks), in order, so the
        # generator and each row's span are the single process's.
        d_all, mine = world.gather(d).tolist(), world.share(B * world.size)
        for row in range(B * world.size):
            N = min(int(round(lam * d_all[row])), T - k)
            if N == 0:
                continue
            if span == "first":
                s = k
            elif span == "last":
                s = T - N
            else:
                s = k + int(torch.randint(0, T - k - N + 1, (1,), generator=gen))
            if mine.start <= row < mine.stop:
                keep_true[row - mine.start, s: s + N] = True
        feats = torch.where(keep_true[..., None], batch.features[:, :T], feats)
        toks = torch.where(keep_true, batch.tokens[:, 1: T + 1], toks)
    return feats, toks


def noisy(features: torch.Tensor, amount: float, gen: torch.Generator, world: World = World()) -> torch.Tensor:
    if amount <= 0:
        return features
    # The whole global batch's noise, this rank's rows of it: the single process's numbers.
    rows = features.shape[0] * world.size
    noise = (torch.rand((rows, *features.shape[1:]), generator=gen)[world.share(rows)] * 2 - 1) * amount
    return features + noise.to(features.device)


def train_step(drafter, head: DraftHead, batch: Batch, cfg: TrainConfig, lam: float,
               gen: torch.Generator, world: World = World()) -> StepLosses:
    # bf16 autocast runs the LSTM, attention, MLP and LM-head matmuls in bf16 (AMX / AVX512-BF16 on
    # CPU, tensor cores on GPU); the losses upcast to fp32 (distill_loss) and the weights stay fp32.
    with torch.autocast(batch.tokens.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bfloat16"):
        return _train_step(drafter, head, batch, cfg, lam, gen, world)


def _train_step(drafter, head: DraftHead, batch: Batch, cfg: TrainConfig, lam: float,
                gen: torch.Generator, world: World) -> StepLosses:
    T = batch.tokens.shape[1] - 1
    offset = int(torch.randint(0, cfg.k, (1,), generator=gen))
    feats, toks = batch.features[:, :T], batch.tokens[:, 1: T + 1]
    mask = batch.valid[:, 1: T + 1].long()
    pred1 = drafter(noisy(feats, cfg.feature_noise, gen, world), toks, offset, mask)
    first = distill_loss(head, pred1, batch, offset, cfg)
    if not cfg.csgd:
        return first
    g_feats, g_toks = glance_inputs(head, pred1.detach(), batch, lam, cfg.glance_span, cfg.k, gen, world)
    pred2 = drafter(noisy(g_feats, cfg.feature_noise, gen, world), g_toks, offset, mask)
    second = distill_loss(head, pred2, batch, offset, cfg)
    second.loss = second.loss + cfg.first_pass_weight * first.loss
    second.first_correct = first.correct
    return second


def global_losses(losses: StepLosses, tokens: int, world: World) -> tuple[StepLosses, int]:
    """Under DDP: rescales ``losses.loss`` in place (the loss backward runs on) from the mean over
    this rank's target positions to their share of the global batch's mean, times the world size,
    so DDP's average of the ranks' gradients is the gradient of the global batch's mean loss.
    Returns the global batch's figures for the log and its real tokens (one all_reduce)."""
    k = losses.count.numel()
    c = losses.count.sum()
    first = losses.correct if losses.first_correct is None else losses.first_correct
    stats = torch.cat([torch.stack([c, losses.loss.detach().float() * c]),
                       c.new_tensor([losses.reg, losses.kl, losses.ce]) * c, c.new_tensor([tokens]),
                       losses.correct, losses.agree, losses.count, first])
    world.sum(stats)
    total = stats[0].clamp(min=1)
    losses.loss = losses.loss * (c * world.size / total)
    reg, kl, ce = (stats[2:5] / total).tolist()
    correct, agree, count, first = stats[6:].view(4, k)
    return StepLosses(stats[1] / total, reg, kl, ce, correct, count, agree,
                      None if losses.first_correct is None else first), int(stats[5])


# ---------------------------------------------------------------- schedule

def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        scale = 1.0
    elif cfg.schedule == "linear":
        scale = 1.0 - progress
    else:
        scale = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * scale)


def glance_lambda(step: int, total: int, cfg: TrainConfig) -> float:
    """λ = λ0·(E − e)/E with e the current (whole) epoch; E = ceil(epochs), at least 1."""
    epochs = max(math.ceil(cfg.epochs), 1)
    epoch = min(step * epochs // max(total, 1), epochs - 1)
    return cfg.glance_lambda * (epochs - epoch) / epochs


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def chain_acceptance(drafter, seqs: Sequences, passes: int, points_per_seq: int = 4) -> float:
    """Mean accepted tokens per step of a top-1 chain of ``passes`` drafter forwards, against the
    stored continuation (bonus token included: 1 + matching drafted tokens). For greedy target
    answers this is the engine's greedy chain acceptance; for sampled data it is a lower bound."""
    k = drafter.config.k
    dev = drafter.qkv.weight.device
    accepted = []
    for j in range(len(seqs)):
        toks, feats = seqs.tokens[j].to(dev), seqs.features[j].float().to(dev)
        L = toks.numel()
        lo = max(seqs.prompt_lens[j] - 1, k - 1)
        hi = L - 2  # need t_{n+1} (the root) and at least one token after it
        if hi < lo:
            continue
        for n in torch.linspace(lo, hi, points_per_seq).long().unique().tolist():
            accepted.append(_chain_at(drafter, feats, toks, n, passes, k))
    return sum(accepted) / max(len(accepted), 1)


def _chain_at(drafter, feats, toks, n: int, passes: int, k: int) -> int:
    """Context f_0..f_n, t_1..t_{n+1}; draft ``passes`` top-1 blocks; count leading matches with t_{n+2}..."""
    ctx = DraftContext.empty(drafter)
    drafter.extend_contexts([ctx], [toks[: n + 1]], [feats[: n + 1]], [int(toks[n + 1])])
    loop = Passes(drafter, ctx)
    head = drafter.draft_head()
    drafted = []
    for p in range(passes):
        if p:
            loop.feed(block[None])
        block = head.tokens(head.logits(loop.step()[0]).argmax(-1))
        drafted.extend(block.tolist())
    truth = toks[n + 2: n + 2 + len(drafted)].tolist()
    hits = 0
    for a, b in zip(drafted, truth):
        if a != b:
            break
        hits += 1
    return 1 + hits


# ---------------------------------------------------------------- the loop

def split_data(seqs: Sequences, held_out: int) -> tuple[Sequences, Sequences]:
    """The last ``held_out`` sequences are kept for evaluation (at most a quarter of the data)."""
    held_out = min(held_out, len(seqs) // 4)
    cut = len(seqs) - held_out
    return seqs.part(0, cut), seqs.part(cut, len(seqs))


def read_all(folders: list[str], allow_partial: bool) -> tuple[list[dict], Sequences]:
    metas, seqs = [], Sequences([], [], [])
    for folder in folders:
        meta, part = read_data(folder, allow_partial=allow_partial)
        metas.append({"folder": Path(folder).name, "shards_read": meta["shards_read"], **meta["config"]})
        seqs.extend(part)
    return metas, seqs


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Sequences of a step: each epoch is a fresh permutation (a function of the seed and the epoch,
    so a resumed run continues it), and every sequence is seen once per epoch. So the checkpoint
    after D tokens of the first epoch is a drafter trained on D distinct tokens."""
    first = step * batch_size
    index = []
    for pos in range(first, first + batch_size):
        epoch, at = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        index.append(int(perm[at]))
    return index


def build_drafter(cfg: TrainConfig, model) -> FalconDrafter:
    extra = {"num_heads": cfg.num_heads} if cfg.num_heads else {}
    if cfg.intermediate_size:
        extra["intermediate_size"] = cfg.intermediate_size
    config = FalconDrafterConfig.for_target(model, k=cfg.k, dtype=cfg.dtype, **extra)
    return FalconDrafter(config, model)


def train(cfg: TrainConfig, model=None, tokenizer=None, world: World | None = None) -> FalconDrafter:
    """Trains (or resumes) a drafter; writes checkpoints, train_log.jsonl and final/ under cfg.out.
    ``world``: this process's rank in a torchrun job (falcon_ext.training.distributed.session); default the
    single process on ``cfg.device``."""
    world = world or World(device=cfg.device)
    world.share(cfg.batch_size)  # refuses a global batch that does not split evenly over the ranks
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_config(out, cfg, write=world.main)
    if model is None:
        model, tokenizer = load_target(cfg.target, parse_dtype("float32"), world.device)
    meta, seqs = read_all(cfg.data, cfg.allow_partial_data)
    train_seqs, eval_seqs = split_data(seqs, 0 if cfg.eval_data else cfg.eval_sequences)
    if cfg.eval_data:
        eval_seqs = read_data(cfg.eval_data)[1]
    steps_per_epoch = max(len(train_seqs) // cfg.batch_size, 1)
    total = cfg.steps or max(int(cfg.epochs * steps_per_epoch), 1)

    torch.manual_seed(cfg.seed)  # drafter initialisation
    drafter = build_drafter(cfg, model)
    if cfg.init:
        init = FalconDrafter.from_pretrained(cfg.init, target=model)
        init.set_draft_vocab(None)  # the weights only: the vocabulary follows this run's data
        drafter.load_state_dict(init.state_dict())
    # What the losses rank the drafter on is what it will propose from.
    vocab, coverage = data_vocab(train_seqs, cfg.draft_vocab_size) if cfg.distill_vocab == "data" else (None, 1.0)
    drafter.set_draft_vocab(vocab)
    head = drafter.draft_head()
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history = load_checkpoint(out, drafter, opt, gen)
    # Checkpoints from before DDP have no world_size: they were written by one process.
    if step and history.get("world_size", 1) != world.size and not cfg.resize_world:
        raise ValueError(f"{out} holds a checkpoint (step {step}) of a run with {history.get('world_size', 1)} "
                         f"process(es); this run has {world.size}. Pass --resize-world to continue it with "
                         f"{world.size}: the global batch is unchanged, so it is the same run up to the order "
                         f"of floating-point sums. The checkpoint is untouched.")
    history["world_size"] = world.size
    history.setdefault("draft_vocab", {"size": 0 if vocab is None else vocab.numel(),
                                       "target_token_coverage": round(coverage, 4)})
    model_fn = world.wrap(drafter)
    log = open(out / "train_log.jsonl", "a") if world.main else None
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not world.main)
    window = _Window(cfg.k)
    t0 = time.time()
    while step < total:
        index = batch_indices(step, len(train_seqs), cfg.batch_size, cfg.seed)
        batch = make_batch(train_seqs, index, cfg.seq_len + 1, cfg.loss_on_prompt, gen,
                           world.share(cfg.batch_size)).to(world.device)
        lr, lam = lr_at(step, total, cfg), glance_lambda(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        drafter.train()
        losses = train_step(model_fn, head, batch, cfg, lam, gen, world)
        logged, tokens = losses, int(batch.valid.sum())
        if world.group:  # log the global batch's figures; backward takes the rescaled losses.loss
            logged, tokens = global_losses(losses, tokens, world)
        # Tokens of data seen so far (real positions): the x axis of a one-pass scaling curve.
        history["tokens_seen"] = history.get("tokens_seen", 0) + tokens
        opt.zero_grad(set_to_none=True)
        losses.loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        window.add(logged)
        bar.update(1)
        if world.main and (step % cfg.log_every == 0 or step == total):
            record = {"step": step, "tokens_seen": history["tokens_seen"], "lr": lr, "lambda": lam,
                      **window.summary(), "seconds": round(time.time() - t0, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=record["acc"])
            window = _Window(cfg.k)
        if world.main and (step % cfg.save_every == 0 or step == total):
            save_checkpoint(out, drafter, opt, step, gen, history, cfg.keep_checkpoints)
    bar.close()
    drafter.eval()
    if not world.main:  # the evaluations and final/ are rank 0's
        return drafter
    if "chain_acceptance" not in history and len(eval_seqs):
        history["chain_acceptance"] = chain_acceptance(drafter, eval_seqs, cfg.eval_passes)
        history["eval_sequences"] = len(eval_seqs)
        save_checkpoint(out, drafter, opt, step, gen, history, cfg.keep_checkpoints)
    if cfg.eval_prompts and "mean_accepted_tokens" not in history:
        tokenizer = load_target(cfg.target)[1] if tokenizer is None else tokenizer
        history["engine_eval"] = mean_accepted_tokens(
            model, drafter, encode_sources(tokenizer, cfg.eval_prompts), cfg.eval_max_new_tokens)
        history["mean_accepted_tokens"] = history["engine_eval"]["mean_accepted_tokens"]
        save_checkpoint(out, drafter, opt, step, gen, history, cfg.keep_checkpoints)
    drafter.save_pretrained(out / "final")
    (out / "final" / "training.json").write_text(json.dumps(
        {"train_config": dataclasses.asdict(cfg), "data": meta, "steps": step,
         "train_sequences": len(train_seqs), "train_tokens": train_seqs.num_tokens(), **history}, indent=1))
    print(f"drafter in {out / 'final'}; held-out chain acceptance "
          f"({cfg.eval_passes} passes, k={cfg.k}): {history.get('chain_acceptance', float('nan')):.3f}; "
          f"engine mean accepted tokens: {history.get('mean_accepted_tokens', 'not evaluated')}")
    log.close()
    return drafter


class _Window:
    """Running sums of the logged quantities since the last log line."""

    def __init__(self, k: int):
        self.n, self.loss, self.reg, self.kl, self.ce = 0, 0.0, 0.0, 0.0, 0.0
        self.correct, self.count, self.first_correct = torch.zeros(k), torch.zeros(k), torch.zeros(k)
        self.agree, self.tokens = torch.zeros(k), 0

    def add(self, s: StepLosses) -> None:
        self.n += 1
        self.loss += s.loss.item()
        self.reg, self.kl, self.ce = self.reg + s.reg, self.kl + s.kl, self.ce + s.ce
        self.correct += s.correct.cpu()
        self.agree += s.agree.cpu()
        self.count += s.count.cpu()
        self.first_correct += (s.correct if s.first_correct is None else s.first_correct).cpu()

    def summary(self) -> dict:
        n = max(self.n, 1)
        rate = lambda c: [round(a, 4) for a in (c / self.count.clamp(min=1)).tolist()]  # noqa: E731
        # acc: token accuracy per block position of the loss pass (CSGD: the glancing pass);
        # acc_true_inputs: of the pass on true inputs (what plain training optimises).
        # acc_target: agreement with the target's argmax (equals acc on self-distilled greedy data).
        return {"loss": self.loss / n, "reg": self.reg / n, "kl": self.kl / n, "ce": self.ce / n,
                "acc": rate(self.correct), "acc_true_inputs": rate(self.first_correct), "acc_target": rate(self.agree)}


# Options of one invocation, not of the run: a resume may set them differently (threads: a run
# continues on a machine with another core count, or with fewer threads beside other work).
_INVOCATION_OPTIONS = ("resize_world", "threads")


def _check_same_config(out: Path, cfg: TrainConfig, write: bool = True) -> None:
    """A resumed run must use the configuration it started with. ``write``: record it when it is
    new (rank 0 only; atomic, since the other ranks may read it at the same time)."""
    path = out / "train_config.json"
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if path.exists():
        saved = json.loads(path.read_text())
        # Options added since the run started count as unchanged when they keep their defaults.
        defaults = json.loads(json.dumps(dataclasses.asdict(TrainConfig(cfg.target, cfg.data, cfg.out))))
        diff = {k: (saved.get(k, defaults[k]), now[k]) for k in now
                if k not in _INVOCATION_OPTIONS and saved.get(k, defaults[k]) != now[k]}
        if diff:
            raise ValueError(f"{out} holds a run with another configuration (saved, now): {diff}; use a new --out")
    elif write:
        (out / "train_config.json.tmp").write_text(json.dumps(now, indent=1))
        os.replace(out / "train_config.json.tmp", path)
