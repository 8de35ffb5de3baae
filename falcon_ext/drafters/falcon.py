"""Falcon's semi-autoregressive drafter (arXiv 2412.12639, section 3.1).

Position i of the drafter reads the pair (f_i, t_{i+1}): the target's feature at token i (its
last hidden state after the final norm, i.e. what its LM head reads) and the embedding of the
token one step ahead. Its output predicts f_{i+k}. Body: a 2-layer LSTM (2H -> H), one
relaxed-causal multi-head attention layer (a query sees every earlier position and every
position of its own k-block) and an MLP, each with a pre-RMSNorm and a residual. Tokens come
from the target's LM head, token embeddings from the target's embedding; both stay the target's
(frozen, never saved with the drafter).

Block alignment (training vs decoding): with ``block_offset = o`` the blocks are
[o, o+k), [o+k, o+2k), ... and positions before o form a partial block. At decode time the
first drafting pass queries the last k context positions as one block, i.e. a from-scratch
forward over T positions reproduces it with ``block_offset = T % k``; later passes feed whole
drafted blocks. Training with random offsets therefore covers every alignment decoding uses.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import ops
from ..engine.drafting import DraftTree
from ..targets import DTYPE_NAMES, DTYPES, dtype_name
from . import checkpoint
from . import tree as cdt  # the Custom-Designed Decoding Tree (CDT)
from .checkpoint import check_vocab

# Canonical names only: a checkpoint's dtype and tree keys are written one way.
_DTYPES = {name: DTYPES[name] for name in DTYPE_NAMES}

# The fused draft-step op's weights, in its order (csrc/ops.h names the same slots in its
# DraftWeight enum). The 2-layer LSTM (PyTorch gate order i, f, g, o; b = b_ih + b_hh):
# w_ih0 [4H, 2H], w_hh0 [4H, H], b0 [4H], w_ih1 [4H, H], w_hh1 [4H, H], b1 [4H]; attention:
# attn_norm [H], w_qkv [3H, H], w_o [H, H]; MLP: mlp_norm [H], w_up [M, H], w_down [H, M].
FUSED_WEIGHTS = ["w_ih0", "w_hh0", "b0", "w_ih1", "w_hh1", "b1", "attn_norm", "w_qkv", "w_o", "mlp_norm", "w_up",
                 "w_down"]
# The matrices among them, in slot order (csrc/ops.h: kDraftMatrices): what int8 weights quantize.
FUSED_MATRICES = [name for name in FUSED_WEIGHTS if name.startswith("w_")]
# How a drafter holds its matrices while decoding (``FalconDrafter.set_weight_format``).
WEIGHT_FORMATS = ("float", "int8")
WEIGHT_FORMAT_CHOICES = ("auto", *WEIGHT_FORMATS)


def choose_weight_format(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The weight format for ``--drafter-weights name`` with the drafter on ``device`` in
    ``dtype``, and why. ``auto``: int8 on a CPU whose vector units run the int8 kernel (AVX2 or
    AVX-512) when the drafter runs in bf16/fp16, the low-precision path a fast run takes; float
    elsewhere (a GPU reads float weights at HBM speed; float32 runs keep the weights exact)."""
    device = torch.device(device)
    if name != "auto":
        if name not in WEIGHT_FORMATS:
            raise ValueError(f"drafter weights must be one of {WEIGHT_FORMAT_CHOICES}, got {name!r}")
        if name == "int8" and device.type != "cpu":
            raise ValueError(f"int8 drafter weights are a CPU format; the drafter is on {device}")
        return name, "as requested"
    if device.type != "cpu":
        return "float", f"auto, the drafter is on {device.type}"
    if dtype == torch.float32 or dtype == torch.float64:
        return "float", f"auto, the drafter runs in {dtype_name(dtype)}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return "float", f"auto, this CPU's vector capability is {capability} (int8 wants AVX2 or AVX-512)"
    return "int8", f"auto, a {capability} CPU drafting in {dtype_name(dtype)} reads half the bytes in int8"


@dataclass
class FalconDrafterConfig:
    """Shape and identity of a Falcon drafter. ``for_target`` fills the target-derived fields.

    hidden_size / vocab_size: the target's. k: tokens per drafter forward (paper: 2 is best).
    num_heads must divide hidden_size. intermediate_size: MLP width. trees: the Custom-Designed
    Decoding Trees (rank paths, see falcon_ext.drafters.tree) measured by falcon_ext.evaluation.tree_tuning, keyed by
    device type and target dtype ("cpu-bfloat16", "cuda-bfloat16", "cpu-float32"; a bare device
    type such as "cpu" is a tree from before per-dtype keys), chosen by ``pick_tree``; tree: the
    one used where none fits; neither = a top-1 chain of ``num_passes`` blocks (what an
    unmeasured drafter gets).
    draft_vocab_size: 0 = the drafter proposes from the whole vocabulary; else the number of
    token ids in its ``draft_vocab`` buffer (see FalconDrafter.set_draft_vocab).
    target: the identity recorded by ``checkpoint.target_identity`` (checked on load).
    """

    hidden_size: int
    vocab_size: int
    k: int = 2
    num_heads: int = 1
    intermediate_size: int = 0  # 0 = 2 * hidden_size, resolved in __post_init__
    rms_norm_eps: float = 1e-6
    dtype: str = "float32"
    num_passes: int = 4
    tree: list[list[int]] | None = None
    trees: dict[str, list[list[int]]] = field(default_factory=dict)  # per "<device type>-<dtype>"
    draft_vocab_size: int = 0
    target: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.intermediate_size == 0:
            self.intermediate_size = 2 * self.hidden_size
        for name in ("hidden_size", "vocab_size", "k", "num_heads", "intermediate_size", "num_passes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FalconDrafterConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.draft_vocab_size, int) or not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"FalconDrafterConfig.draft_vocab_size must be an int in [0, vocab_size="
                             f"{self.vocab_size}], got {self.draft_vocab_size!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.tree is not None:
            self.tree = [list(map(int, p)) for p in self.tree]
            cdt.TreePlan(self.tree, self.k)  # validates
        for key, paths in self.trees.items():
            _check_tree_key(key)
            self.trees[key] = [list(map(int, p)) for p in paths]
            cdt.TreePlan(self.trees[key], self.k)

    @classmethod
    def for_target(cls, target: nn.Module, **overrides) -> "FalconDrafterConfig":
        """Config sized for ``target``; head count defaults to head_dim 64 where it divides H."""
        hidden = target.get_input_embeddings().weight.shape[1]
        overrides.setdefault("num_heads", hidden // 64 if hidden % 64 == 0 and hidden >= 64 else 1)
        return cls(hidden_size=hidden, vocab_size=target.get_output_embeddings().weight.shape[0],
                   target=checkpoint.target_identity(target), **overrides)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tree_key(device_type: str, dtype: torch.dtype) -> str:
    """The ``config.trees`` key of a tree measured on this device type with the target in this dtype."""
    return f"{device_type}-{dtype_name(dtype)}"


def _check_tree_key(key: str) -> None:
    device_type, _, dtype = key.partition("-")
    try:
        torch.device(device_type)
    except RuntimeError:
        raise ValueError(f"tree key {key!r}: {device_type!r} is not a device type") from None
    if dtype and dtype not in _DTYPES:
        raise ValueError(f"tree key {key!r}: the dtype after the device type must be one of {sorted(_DTYPES)}")


def pick_tree(trees: dict[str, list[list[int]]], device_type: str, dtype: torch.dtype) -> str | None:
    """The key of the tree to draft with on ``device_type`` with the target in ``dtype``, or None.

    A tree's worth depends on what verifying N tokens costs, which depends most on the device
    and then on the dtype. So: the exact "<device>-<dtype>" key; else the same device in any
    dtype: first a bare "<device>" key (checkpoints from before per-dtype keys, dtype unknown),
    then the other dtypes in the order float32, bfloat16, float16; else None (``config.tree``).
    """
    same_device = [tree_key(device_type, dtype), device_type,
                   *(tree_key(device_type, other) for other in _DTYPES.values())]
    return next((key for key in same_device if key in trees), None)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32: bf16 sums of squares lose too much at H = 4096.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


@dataclass(frozen=True)
class Int8Weight:
    """A weight matrix [N, K] as int8 with one float32 scale per row: row n is q[n] * scale[n].

    A decoding format for CPUs (``FalconDrafter.set_weight_format``): a CPU drafting pass is bound
    by the bytes of weights it streams, and int8 halves bf16's. Symmetric per-row scales,
    max |w| -> 127: the rounding error is under half a step, 1/254 of the row's largest weight.
    """

    q: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def quantize(weight: torch.Tensor) -> "Int8Weight":
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        return Int8Weight(torch.round(w / scale[:, None]).to(torch.int8), scale)

    def rows(self, start: int, stop: int) -> "Int8Weight":
        return Int8Weight(self.q[start:stop], self.scale[start:stop])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale[:, None]).to(dtype)


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for drafting, where x has a few rows. ``Int8Weight``: ``ops.int8_linear``. In
    bf16 on CPU it computes (W @ x^T)^T: oneDNN runs that form 1.4-2x faster than x @ W^T (whose
    transposed weight view takes a slower path) from 2 to 128 rows, and ``mv`` likewise for one
    row (``benchmarks/bench_linear.py``; the fused op's ``dense`` does the same in C++).
    Elsewhere, and wherever autograd records, ``F.linear``."""
    if isinstance(weight, Int8Weight):
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("int8 drafter weights are a decoding format without gradients; train with "
                               "set_weight_format('float')")
        return ops.int8_linear(x, weight.q, weight.scale, bias)
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).to(weight.dtype)
    y = torch.mv(weight, rows[0])[None] if rows.shape[0] == 1 else (weight @ rows.T).T
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class DraftHead:
    """The target's frozen LM head over all rows, or only the rows of ``vocab`` (sorted token ids).

    Drafting and training read tokens through it. Restricted to the ids a drafter was trained on
    (FR-Spec and EAGLE-3 do the same), it reads a fraction of the rows: SmolLM2's head has 49152,
    its own answers use a few thousand, and the head is most of a CPU drafting pass or training
    step. Lossless either way: the target verifies every drafted token; a token outside the set is
    only never proposed.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, vocab: torch.Tensor | None = None,
                 int8: bool = False):
        self.vocab, self.dtype = vocab, weight.dtype
        with torch.no_grad():  # frozen: a copy of the rows, never part of a training graph
            rows = weight.detach() if vocab is None else weight.detach().index_select(0, vocab)
            # int8 (a CPU drafter in int8 format): the head is as much of a pass's bytes as the drafter
            self.weight = Int8Weight.quantize(rows) if int8 else rows
            self.bias = None if bias is None else bias.detach() if vocab is None else bias.detach().index_select(0, vocab)
        if vocab is not None:  # token id -> row of the subset head (-1: not in the subset)
            self.row = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
            self.row[vocab] = torch.arange(vocab.numel(), device=weight.device)

    def __len__(self) -> int:
        return (self.weight.q if isinstance(self.weight, Int8Weight) else self.weight).shape[0]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., len(self)] in the head's dtype."""
        return few_rows_linear(features.to(self.dtype), self.weight, self.bias)

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> indices into ``logits``'s last dimension (-1 for ids outside the subset)."""
        return tokens if self.vocab is None else self.row[tokens]

    def tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """Indices into ``logits``'s last dimension -> token ids."""
        return rows if self.vocab is None else self.vocab[rows]


def relaxed_block_mask(length: int, k: int, block_offset: int = 0, device=None) -> torch.Tensor:
    """[T, T] bool, True where query i may see key j: block(j) <= block(i), block(i) = floor((i - o) / k)."""
    if not 0 <= block_offset < k:
        raise ValueError(f"block_offset must be in [0, k={k}), got {block_offset}")
    block = torch.div(torch.arange(length, device=device) - block_offset, k, rounding_mode="floor")
    return block[None, :] <= block[:, None]


@dataclass
class LSTMState:
    """LSTM hidden and cell state, [2 layers, B, H] each."""

    h: torch.Tensor
    c: torch.Tensor

    def select(self, index: torch.Tensor) -> "LSTMState":
        return LSTMState(self.h.index_select(1, index), self.c.index_select(1, index))

    @staticmethod
    def cat(states: list["LSTMState"]) -> "LSTMState":
        """Several states' rows side by side; a single state is returned as it is."""
        if len(states) == 1:
            return states[0]
        return LSTMState(torch.cat([s.h for s in states], dim=1), torch.cat([s.c for s in states], dim=1))

    def split(self) -> list["LSTMState"]:
        """One state per row, the inverse of ``cat``; a one-row state is returned as it is."""
        if self.h.shape[1] == 1:
            return [self]
        return [self.select(torch.tensor([i], device=self.h.device)) for i in range(self.h.shape[1])]


class Passes:
    """The drafter's pass loop over a context, one ``step`` per pass: the one loop that decoding
    (``FalconDrafter.propose``), tree tuning (``tree_tuning``) and training's chain acceptance run.

    Pass 0 drafts a block of k positions from the context's k pending positions (k = 1: from the
    last settled position, see ``cdt.DraftContext``). Every later pass
    drafts from the previous pass's blocks, after ``feed`` names the tokens chosen for them (and,
    for a tree, which branches continue): position i of a block is the pair (its predicted
    feature, the token chosen at i). Every branch attends to the settled context and to its own
    earlier blocks.

    Given several rows' contexts (a batch), pass 0 has one branch per row and every pass runs
    the branches of all rows in one call. The fused op takes one context for all its branches,
    so a batch's passes run ``draft_block`` (plain PyTorch) on the rows' contexts padded to the
    longest, with a key mask that hides the padding.
    """

    def __init__(self, drafter: "FalconDrafter", ctx: cdt.DraftContext | list[cdt.DraftContext]):
        contexts = ctx if isinstance(ctx, list) else [ctx]
        for c in contexts:
            if not c.ready:
                raise ValueError(f"drafting needs {drafter.config.k} context positions, the context has "
                                 f"{c.length + c.pending.shape[0]}")
        drafter.settle(contexts)
        self.drafter = drafter
        first = contexts[0]
        self.settled_out = first.output if len(contexts) == 1 else None
        # x None: pass 0 of a k = 1 drafter, whose query position is already settled.
        if not first.pending.shape[0]:
            self.x = None
        else:
            self.x = first.pending[None] if len(contexts) == 1 else torch.stack([c.pending for c in contexts])
        self.br_k = self.br_v = first.keys.new_empty(len(contexts), 0, drafter.config.hidden_size)
        self.out = self.block_k = self.block_v = None
        self.state = LSTMState.cat([c.state for c in contexts])
        if len(contexts) == 1:  # one context shared by every branch: what the fused op takes
            self.ctx_k, self.ctx_v, self.ctx_mask = first.keys[:first.length], first.values[:first.length], None
            self.branch_row = None
        else:  # several rows (a batch): padded contexts, each branch reading its own row's
            self.ctx_k, self.ctx_v, self.ctx_mask = cdt.DraftContext.padded(contexts)
            self.branch_row = torch.arange(len(contexts), device=first.keys.device)

    def step(self) -> torch.Tensor:
        """Runs the next pass: its predicted features [B, k, H], one block per branch."""
        if self.x is None:  # its key and value are the context's last row, not a branch's block
            self.out = self.settled_out if self.settled_out is not None else self.drafter.settled_output(
                self.state, self.ctx_k, self.ctx_v, self.ctx_mask)
            self.block_k, self.block_v = self.br_k, self.br_v
        elif self.branch_row is None:
            self.out, self.state, self.block_k, self.block_v = self.drafter.draft_step(
                self.x, self.state, self.ctx_k, self.ctx_v, self.br_k, self.br_v)
        else:
            row = self.branch_row
            self.out, self.state, self.block_k, self.block_v = self.drafter.draft_block(
                self.x, self.state, self.ctx_k.index_select(0, row), self.ctx_v.index_select(0, row), self.br_k,
                self.br_v, self.ctx_mask.index_select(0, row))
        return self.out

    def feed(self, block_tokens: torch.Tensor, branches: torch.Tensor | None = None) -> None:
        """The next pass's input: ``block_tokens`` [B', k] chosen for the blocks of the last pass's
        branches ``branches`` [B'] (a branch may continue several times or not at all; None: each
        branch once, in order)."""
        out, state = self.out, self.state
        br_k, br_v = torch.cat([self.br_k, self.block_k], dim=1), torch.cat([self.br_v, self.block_v], dim=1)
        if branches is not None:
            out, state = out.index_select(0, branches), state.select(branches)
            br_k, br_v = br_k.index_select(0, branches), br_v.index_select(0, branches)
            if self.branch_row is not None:
                self.branch_row = self.branch_row.index_select(0, branches)
        self.x, self.state, self.br_k, self.br_v = self.drafter.pair_inputs(out, block_tokens), state, br_k, br_v


class FalconDrafter(nn.Module):
    """The Falcon drafting head for one target model; also the engine's Drafter (reset/extend/propose)."""

    needs_features = True
    config_class = FalconDrafterConfig  # what ``checkpoint.load`` reads config.json into

    def __init__(self, config: FalconDrafterConfig, target: nn.Module):
        super().__init__()
        self.config = config
        checkpoint.check_target(config, target)
        # The target's modules are held outside the module tree: not parameters of the drafter,
        # not in its state_dict, not moved by drafter.to().
        object.__setattr__(self, "_target", target)
        H, M = config.hidden_size, config.intermediate_size
        self.lstm = nn.LSTM(2 * H, H, num_layers=2, batch_first=True)
        self.attn_norm = RMSNorm(H, config.rms_norm_eps)
        self.qkv = nn.Linear(H, 3 * H, bias=False)
        self.o_proj = nn.Linear(H, H, bias=False)
        self.mlp_norm = RMSNorm(H, config.rms_norm_eps)
        self.up = nn.Linear(H, M, bias=False)
        self.down = nn.Linear(M, H, bias=False)
        # The ids are placeholders until load_state_dict or set_draft_vocab fills them.
        self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size) if config.draft_vocab_size else None)
        self._draft_head_key, self._draft_head = None, None
        self.to(device=target.get_input_embeddings().weight.device, dtype=config.torch_dtype)
        weight = target.get_input_embeddings().weight
        key = pick_tree(config.trees, weight.device.type, weight.dtype)
        paths = config.tree if key is None else config.trees[key]
        self.set_tree(cdt.chain(config.k * config.num_passes) if paths is None else paths)
        self.use_fused = True  # False: the plain-PyTorch draft_block (same contract)
        self.weight_format = "float"
        self._decode_weights_key, self._decode_weights = None, None
        self.reset()

    # ---- the target's shared pieces ----
    @property
    def target(self) -> nn.Module:
        return self._target

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._target.get_input_embeddings()(tokens).to(self.config.torch_dtype)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Token logits of (predicted) features through the target's LM head. [..., H] -> [..., V]."""
        head = self._target.get_output_embeddings()
        return head(features.to(head.weight.dtype))

    def draft_head(self) -> DraftHead:
        """The LM head over the draft vocabulary (built once; rebuilt if the head or vocabulary changes)."""
        head = self._target.get_output_embeddings()
        vocab = self.draft_vocab
        key = (head.weight.data_ptr(), head.weight._version, head.weight.dtype, self.weight_format,
               None if vocab is None else (vocab.data_ptr(), vocab._version))
        if key != self._draft_head_key:
            self._draft_head = DraftHead(head.weight, getattr(head, "bias", None),
                                         None if vocab is None else vocab.to(head.weight.device),
                                         int8=self.weight_format == "int8")
            self._draft_head_key = key
        return self._draft_head

    def set_draft_vocab(self, token_ids) -> None:
        """Propose only these token ids (sorted, distinct; None: the whole vocabulary); saved with
        the checkpoint. ``falcon-ext train --distill-vocab data`` sets the ids of its training data,
        the rows the drafter was trained to rank."""
        ids = None if token_ids is None else check_vocab(token_ids, self.config.vocab_size)
        self._check_plan(self.plan, self.config.vocab_size if ids is None else ids.numel())
        self.draft_vocab = None if ids is None else ids.to(self.qkv.weight.device)
        self.config.draft_vocab_size = 0 if ids is None else ids.numel()

    def pair_inputs(self, features: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """concat(f_i, emb(t_{i+1})): [..., H] and [...] -> [..., 2H] in the drafter's dtype."""
        return torch.cat([features.to(self.config.torch_dtype), self.embed(next_tokens)], dim=-1)

    # ---- training / full-sequence forward ----
    def forward(self, features: torch.Tensor, next_tokens: torch.Tensor, block_offset: int = 0,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted features: position i predicts f_{i+k}.

        Shape:
            features: [B, T, H]; next_tokens: [B, T] int64 (next_tokens[:, i] = t_{i+1});
            attention_mask: optional [B, T], 1 for real positions, 0 for padding (hidden as keys).
        Returns [B, T, H] in the drafter's dtype.
        """
        B, T, H = self._check_inputs(features, next_tokens)
        lstm_out, _ = self.lstm(self.pair_inputs(features, next_tokens))
        mask = relaxed_block_mask(T, self.config.k, block_offset, features.device)[None, None]
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must be [B, T] = {[B, T]}, got {list(attention_mask.shape)}")
            mask = mask & attention_mask.bool()[:, None, None, :]
            mask = mask | torch.eye(T, dtype=torch.bool, device=mask.device)  # padded queries see themselves
        q, k, v = self._heads(self.qkv(self.attn_norm(lstm_out)))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._finish(lstm_out, attn.transpose(1, 2).reshape(B, T, H))

    def _check_inputs(self, features, next_tokens):
        H = self.config.hidden_size
        if features.dim() != 3 or features.shape[-1] != H:
            raise ValueError(f"features must be [B, T, H={H}], got {list(features.shape)}")
        if next_tokens.shape != features.shape[:2]:
            raise ValueError(f"next_tokens must be [B, T] = {list(features.shape[:2])}, got {list(next_tokens.shape)}")
        return features.shape

    def _heads(self, qkv: torch.Tensor):
        """[B, T, 3H] -> q, k, v as [B, heads, T, head_dim]."""
        B, T, _ = qkv.shape
        heads = self.config.num_heads
        return qkv.view(B, T, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def _finish(self, lstm_out: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection + residual, then the MLP block + residual."""
        h = lstm_out + self._linear("w_o", attn)
        return h + self._linear("w_down", F.silu(self._linear("w_up", self.mlp_norm(h))))

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The module call where autograd records (training: hooks and all), else
        ``few_rows_linear`` with the decoding weights (``decode_weights``)."""
        if torch.is_grad_enabled():
            return {"w_qkv": self.qkv, "w_o": self.o_proj, "w_up": self.up, "w_down": self.down}[name](x)
        return few_rows_linear(x, self.decode_weights()[name])

    # ---- weights as decoding reads them ----
    def set_weight_format(self, weight_format: str) -> None:
        """How decoding holds the matrices (``WEIGHT_FORMATS``): "float", the parameters as they
        are; "int8" (CPU only), int8 copies with per-row scales (``Int8Weight``), and the draft
        head likewise. Every decoding path (fused op, plain PyTorch, draft head) reads the chosen
        format; ``forward`` and training always use the float parameters, and the int8 copies
        follow them (remade when a parameter changes)."""
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
        device = self.qkv.weight.device
        if weight_format == "int8" and device.type != "cpu":
            raise ValueError(f"int8 drafter weights are a CPU format (a GPU reads the float weights at HBM "
                             f"speed); this drafter is on {device}")
        self.weight_format = weight_format

    def decode_weights(self) -> dict[str, torch.Tensor | Int8Weight]:
        """``FUSED_WEIGHTS`` by name as decoding reads them: LSTM biases summed, the matrices in
        ``weight_format``. Remade only when a parameter or the format changed."""
        params = list(self.parameters())
        key = (self.weight_format, tuple((p.data_ptr(), p._version) for p in params))
        if key != self._decode_weights_key:
            L = self.lstm
            with torch.no_grad():
                named = {"w_ih0": L.weight_ih_l0, "w_hh0": L.weight_hh_l0, "b0": L.bias_ih_l0 + L.bias_hh_l0,
                         "w_ih1": L.weight_ih_l1, "w_hh1": L.weight_hh_l1, "b1": L.bias_ih_l1 + L.bias_hh_l1,
                         "attn_norm": self.attn_norm.weight, "w_qkv": self.qkv.weight, "w_o": self.o_proj.weight,
                         "mlp_norm": self.mlp_norm.weight, "w_up": self.up.weight, "w_down": self.down.weight}
                if self.weight_format == "int8":
                    named.update({name: Int8Weight.quantize(named[name]) for name in FUSED_MATRICES})
            weights = [w.q if isinstance(w, Int8Weight) else w for w in map(named.__getitem__, FUSED_WEIGHTS)]
            scales = [named[name].scale for name in FUSED_MATRICES] if self.weight_format == "int8" else None
            self._decode_weights_key, self._decode_weights, self._fused = key, named, (weights, scales)
        return self._decode_weights

    # ---- incremental decoding primitives ----
    def zero_state(self, batch: int = 1) -> LSTMState:
        z = torch.zeros(2, batch, self.config.hidden_size, dtype=self.config.torch_dtype,
                        device=self.qkv.weight.device)
        return LSTMState(z, z.clone())

    def encode(self, x: torch.Tensor, state: LSTMState):
        """Settle context positions of G rows: LSTM from ``state`` [2, G, H] over x [G, L, 2H]
        -> (K [G, L, H], V [G, L, H], new state)."""
        if self.use_fused:
            empty = x.new_empty(0, self.config.hidden_size)
            no_branch = x.new_empty(x.shape[0], 0, self.config.hidden_size)
            _, h, c, k, v = self._fused_call(x, state, empty, empty, no_branch, no_branch, encode_only=True)
            return k, v, LSTMState(h, c)
        out, state = self.lstm_steps(x, state)
        _, k, v = self._linear("w_qkv", self.attn_norm(out)).chunk(3, dim=-1)
        return k, v, state

    def lstm_steps(self, x: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """The LSTM over x [B, L, 2H] from ``state`` -> (outputs [B, L, H], new state). Where no
        gradient is recorded (decoding) it runs cell by cell through ``few_rows_linear``, in fp32
        between the matmuls as the fused op does: ``nn.LSTM`` in bf16 on CPU takes 2.5x as long for
        a decoding step."""
        if torch.is_grad_enabled():
            out, (h, c) = self.lstm(x, (state.h, state.c))
            return out, LSTMState(h, c)
        w = self.decode_weights()
        hs, cs = [], []
        for layer in range(2):
            w_hh = w[f"w_hh{layer}"]
            gx = few_rows_linear(x, w[f"w_ih{layer}"]).float() + w[f"b{layer}"].float()
            h, c, outs = state.h[layer], state.c[layer].float(), []
            for t in range(x.shape[1]):
                i, f, g, o = (gx[:, t] + few_rows_linear(h, w_hh).float()).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = (torch.sigmoid(o) * torch.tanh(c)).to(x.dtype)
                outs.append(h)
            x = torch.stack(outs, dim=1)
            hs.append(h)
            cs.append(c.to(h.dtype))
        return x, LSTMState(torch.stack(hs), torch.stack(cs))

    def settled_output(self, state: LSTMState, ctx_k, ctx_v, ctx_mask=None) -> torch.Tensor:
        """The output [R, 1, H] at the last settled position of R rows (R = 1: one context): its
        LSTM output is layer 1's h in ``state`` [2, R, H] and its key/value are the last valid
        rows of ctx_k/ctx_v ([S, H], or [R, S, H] with ``ctx_mask`` [R, S] marking the valid
        rows), so only the query, the attention and the MLP remain (plain PyTorch: 5 small
        matmuls, no LSTM weights read)."""
        H, heads = self.config.hidden_size, self.config.num_heads
        h = state.h[1][:, None]  # [R, 1, H]
        rows = h.shape[0]
        qkv = self.decode_weights()["w_qkv"]
        q = few_rows_linear(self.attn_norm(h), qkv.rows(0, H) if isinstance(qkv, Int8Weight) else qkv[:H])
        split = lambda t: t.view(rows, -1, heads, H // heads).transpose(1, 2)  # noqa: E731
        if ctx_k.dim() == 2:
            ctx_k, ctx_v = ctx_k[None], ctx_v[None]
        mask = None if ctx_mask is None else ctx_mask[:, None, None]
        attn = F.scaled_dot_product_attention(split(q), split(ctx_k), split(ctx_v), attn_mask=mask)
        return self._finish(h, attn.transpose(1, 2).reshape(rows, 1, H))

    def draft_block(self, x, state: LSTMState, ctx_k, ctx_v, br_k, br_v, ctx_mask=None):
        """One drafter forward over a block of k drafted positions per branch (plain PyTorch).

        Every query sees the whole context cache, its branch's earlier drafted blocks and its
        whole own block (the relaxed mask at decode time hides nothing).
        Shape: x [B, k, 2H]; state [2, B, H]; ctx_k/ctx_v [S, H] (one context for every branch)
        or [B, S, H] (one per branch, with ``ctx_mask`` [B, S]: False hides a padding position);
        br_k/br_v [B, D, H].
        Returns (out [B, k, H], new state, block K [B, k, H], block V [B, k, H]).
        """
        B, k, _ = x.shape
        out, state = self.lstm_steps(x, state)
        q, bk, bv = self._linear("w_qkv", self.attn_norm(out)).chunk(3, dim=-1)
        keys = torch.cat([ctx_k.expand(B, -1, -1), br_k, bk], dim=1)
        values = torch.cat([ctx_v.expand(B, -1, -1), br_v, bv], dim=1)
        heads, d = self.config.num_heads, self.config.hidden_size // self.config.num_heads
        split = lambda t: t.view(B, -1, heads, d).transpose(1, 2)  # noqa: E731
        mask = None if ctx_mask is None else torch.cat(
            [ctx_mask, ctx_mask.new_ones(B, keys.shape[1] - ctx_mask.shape[1])], dim=1)[:, None, None]
        attn = F.scaled_dot_product_attention(split(q), split(keys), split(values), attn_mask=mask)
        return self._finish(out, attn.transpose(1, 2).reshape(B, k, -1)), state, bk, bv

    def draft_step(self, x, state: LSTMState, ctx_k, ctx_v, br_k, br_v):
        """:meth:`draft_block` through the fused C++/CUDA op when available (same contract)."""
        if not self.use_fused:
            return self.draft_block(x, state, ctx_k, ctx_v, br_k, br_v)
        out, h, c, bk, bv = self._fused_call(x, state, ctx_k, ctx_v, br_k, br_v)
        return out, LSTMState(h, c), bk, bv

    def fused_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The fused op's ``weights`` and ``scales``: the decoding weights in ``FUSED_WEIGHTS``
        order (int8 matrices: their ``q``) and, in int8, the matrices' scales in ``FUSED_MATRICES``
        order (else None)."""
        self.decode_weights()
        return self._fused

    def _fused_call(self, x, state: LSTMState, ctx_k, ctx_v, br_k, br_v, encode_only: bool = False):
        weights, scales = self.fused_weights()
        return ops.falcon_draft_step(x, state.h, state.c, ctx_k, ctx_v, br_k, br_v, weights, self.config.num_heads,
                                     self.config.rms_norm_eps, encode_only=encode_only, scales=scales)

    # ---- Drafter protocol (falcon_ext.engine.drafting), and BatchDrafter's per-row calls ----
    def reset(self) -> None:
        self.context = cdt.DraftContext.empty(self)

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, features: torch.Tensor | None, next_token: int) -> None:
        self.extend_contexts([self.context], [tokens], [features], [next_token])

    @torch.no_grad()
    def propose(self) -> DraftTree:
        """Run the plan's passes and return the draft tree (tokens[0] = the next token)."""
        return self._draft([self.context])[0]

    def reset_rows(self, batch_size: int) -> None:
        self.row_contexts = [cdt.DraftContext.empty(self) for _ in range(batch_size)]

    @torch.no_grad()
    def extend_rows(self, rows: list[int], tokens: list[torch.Tensor], features: list[torch.Tensor] | None,
                    next_tokens: list[int]) -> None:
        if features is None:
            raise ValueError("FalconDrafter needs the target's features in extend_rows() (needs_features=True)")
        self.extend_contexts([self.row_contexts[row] for row in rows], tokens, features, next_tokens)

    @torch.no_grad()
    def extend_contexts(self, contexts: list[cdt.DraftContext], tokens: list[torch.Tensor],
                        features: list[torch.Tensor | None], next_tokens: list[int]) -> None:
        """``extend`` for each context (a row of a batch, or the one context of ``extend``): the
        accepted positions are taken as pending; the next draft settles them (``settle``)."""
        for ctx, row_tokens, row_features, next_token in zip(contexts, tokens, features, next_tokens, strict=True):
            ctx.take(self, row_tokens, row_features, int(next_token))

    # A k = 1 context settling at most this many positions settles them with the fused op's full
    # forward, which also yields pass 0's output; a longer block (a prompt) is only encoded, since
    # the attention and MLP of all its rows would cost more than ``settled_output``'s one row.
    SETTLE_WITH_OUTPUT = 16

    @torch.no_grad()
    def settle(self, contexts: list[cdt.DraftContext]) -> None:
        """Settles the positions each context took since its last draft (``DraftContext``).

        One k = 1 context through the fused op: one full forward over the new positions. Its last
        query sees them all and the context before them, all that the causal mask shows it, so
        the call that settles them also computes pass 0's output (``DraftContext.output``).
        Otherwise contexts that settle as many positions are encoded in one call from their own
        states, so the LSTM weights are read once per group, not once per row (rows accept
        paths of different lengths, hence the groups)."""
        todo = [ctx for ctx in contexts if ctx.unsettled]
        if (len(contexts) == 1 and todo and self.config.k == 1 and self.use_fused
                and todo[0].unsettled <= self.SETTLE_WITH_OUTPUT):
            ctx = todo[0]
            no_branch = ctx.pending.new_empty(1, 0, self.config.hidden_size)
            out, state, keys, values = self.draft_step(ctx.pending[None], ctx.state, ctx.keys[:ctx.length],
                                                       ctx.values[:ctx.length], no_branch, no_branch)
            ctx.settle(keys[0], values[0], state, out[:, -1:])
            return
        groups: dict[int, list[cdt.DraftContext]] = {}
        for ctx in todo:
            groups.setdefault(ctx.unsettled, []).append(ctx)
        for settle, group in groups.items():
            state = LSTMState.cat([c.state for c in group])
            keys, values, state = self.encode(torch.stack([c.pending[:settle] for c in group]), state)
            for ctx, row_keys, row_values, row_state in zip(group, keys, values, state.split()):
                ctx.settle(row_keys, row_values, row_state)

    @torch.no_grad()
    def propose_rows(self, rows: list[int]) -> list[DraftTree]:
        """One tree per row, the branches of all rows drafted together, one call per pass."""
        return self._draft([self.row_contexts[row] for row in rows])

    def _draft(self, contexts: list[cdt.DraftContext]) -> list[DraftTree]:
        """The plan's tree for every context; one with fewer than k positions gets the root alone."""
        if any(ctx.next_token is None for ctx in contexts):
            raise RuntimeError("propose() before extend(): the drafter has no context")
        device = contexts[0].pending.device
        roots = torch.tensor([[ctx.next_token] for ctx in contexts], dtype=torch.long, device=device)
        ready = [i for i, ctx in enumerate(contexts) if ctx.ready]
        drafted = {}
        if ready:
            tokens = self._draft_tokens([contexts[i] for i in ready],
                                        roots if len(ready) == len(contexts) else roots[ready])
            parents = self.plan.tensors(device)["parents"]
            drafted = {i: DraftTree(row_tokens, parents) for i, row_tokens in zip(ready, tokens)}
        # fewer than k context positions: nothing to draft from yet, the root alone
        return [drafted[i] if i in drafted else DraftTree(roots[i], roots.new_tensor([-1]))
                for i in range(len(contexts))]

    def _draft_tokens(self, contexts: list[cdt.DraftContext], roots: torch.Tensor) -> torch.Tensor:
        """The plan's passes over R contexts at once: node tokens [R, nodes], roots [R, 1] first.
        Pass p runs R x (its branches per row) branches, row by row."""
        plan, rows = self.plan, len(contexts)
        if not plan.num_passes:  # a root-only tree: nothing to draft, nothing to settle yet
            return roots
        idx = plan.tensors(roots.device)
        passes = Passes(self, contexts if rows > 1 else contexts[0])
        head = self.draft_head()
        node_tokens = [roots]
        for p in range(plan.num_passes):
            if p > 0:
                block = torch.cat(node_tokens, dim=1)[:, idx["block_nodes"][p]]  # [R, branches, k]
                passes.feed(block.reshape(-1, plan.k), self._row_branches(idx["parent_branch"][p], rows, p - 1))
            top = head.tokens(head.logits(passes.step()).topk(plan.topk[p], dim=-1).indices)  # [R x B, k, K] ids
            node_tokens.append(top.reshape(rows, -1)[:, idx["gather"][p]])
        return torch.cat(node_tokens, dim=1)

    def _row_branches(self, parent_branch: torch.Tensor, rows: int, previous_pass: int) -> torch.Tensor:
        """A pass's parent branches for R rows: row r's are offset by r x the previous pass's branches."""
        if rows == 1:
            return parent_branch
        previous = len(self.plan.block_nodes[previous_pass]) or 1  # pass 0 has one branch per row
        offsets = torch.arange(rows, device=parent_branch.device)[:, None] * previous
        return (offsets + parent_branch).reshape(-1)

    def set_tree(self, paths: list[list[int]]) -> None:
        """Draft with another Custom-Designed Decoding Tree (rank paths, see falcon_ext.drafters.tree).
        Not saved: checkpoints keep ``config.trees`` / ``config.tree``."""
        plan = cdt.TreePlan(paths, self.config.k)
        self._check_plan(plan, self.config.draft_vocab_size or self.config.vocab_size)
        self.plan = plan

    @staticmethod
    def _check_plan(plan: cdt.TreePlan, rows: int) -> None:
        if max(plan.topk, default=0) > rows:
            raise ValueError(f"the tree asks for the top {max(plan.topk)} tokens of a pass; the drafter "
                             f"proposes from {rows} token ids")

    # ---- checkpoints ----
    def save_pretrained(self, directory) -> None:
        """Write config.json + model.safetensors (drafter weights only, never the target's)."""
        checkpoint.save(self, directory)

    @classmethod
    def from_pretrained(cls, name_or_path, target: nn.Module, dtype: torch.dtype | None = None) -> "FalconDrafter":
        """Load a drafter saved by :meth:`save_pretrained` (a folder), or one shipped with the
        package by name (``"stories260K"``, ``"SmolLM2-135M-Instruct"``), in ``dtype`` (default:
        the dtype it was saved in); raises ValueError for the wrong target or a
        corrupt/incomplete checkpoint."""
        return checkpoint.load(cls, name_or_path, target, dtype)

    def weight_bytes(self) -> int:
        """Bytes of drafter weights one draft step reads (LM head excluded), in ``weight_format``."""
        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()
        return sum(size(w.q) + size(w.scale) if isinstance(w, Int8Weight) else size(w)
                   for w in self.decode_weights().values())

    def __repr__(self):
        c = self.config
        return (f"FalconDrafter(H={c.hidden_size}, k={c.k}, heads={c.num_heads}, mlp={c.intermediate_size}, "
                f"dtype={c.dtype}, tree={len(self.plan.parents)} nodes)")
