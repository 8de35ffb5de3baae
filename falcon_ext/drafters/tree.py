"""Falcon's Custom-Designed Decoding Tree (CDT) and the drafter's incremental decoding state.

A tree is data: a list of *rank paths*. The path [r1, ..., rd] names the node at depth d whose
token is the r_d-th most likely token of the drafter's distribution at that depth, below the
node [r1, ..., r(d-1)] (the root, depth 0, is the next token and has the empty path). Depth d
is drafted by pass (d-1)//k, position (d-1)%k: one drafter forward yields the k distributions
of a whole block, so all nodes of a block that share the block's start node read the same k
distributions. A node at depth p*k with children starts a *branch* of pass p: the k nodes of
its block (with the features that predicted them) are the next forward's input, and the
branches of a pass run as one batch. ``falcon_ext.evaluation.tree_tuning`` (``falcon-ext tune-tree``) derives a tree from measured
acceptance; ``chain(n)`` is the top-1 path used when nothing was measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence


def chain(depth: int) -> list[list[int]]:
    """The top-1 chain of ``depth`` nodes below the root."""
    return [[0] * d for d in range(1, depth + 1)]


class TreePlan:
    """A CDT compiled into index tensors for drafting (one per pass), nodes in topological order.

    Node order: by depth, then rank path; node 0 is the root. Pass p runs one branch per node
    at depth p*k that has children (pass 0: the root), and drafts the nodes at depths
    p*k+1 .. p*k+k, which are contiguous in node order. Per pass:
      parent_branch[p]: for p >= 1, each branch's index in pass p-1's batch;
      block_nodes[p]: for p >= 1, [branches, k] the nodes of each branch's last drafted block;
      gather[p]: for the nodes drafted, the flat index into the top-K ids [branches, k, topk[p]].
    """

    def __init__(self, paths: list[list[int]], k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        nodes = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        if len(nodes) != len(paths):
            raise ValueError("tree has duplicate rank paths")
        index = {(): 0}
        for n, p in enumerate(nodes, start=1):
            if not p or min(p) < 0:
                raise ValueError(f"tree path {list(p)} must be non-empty with ranks >= 0")
            if p[:-1] not in index:
                raise ValueError(f"tree path {list(p)} has no parent {list(p[:-1])} (paths must be prefix-closed)")
            index[p] = n
        self.k = k
        self.paths = [list(p) for p in nodes]
        self.parents = [-1] + [index[p[:-1]] for p in nodes]
        depth = [0] + [len(p) for p in nodes]
        self.depth = max(depth)
        self.num_passes = (self.depth + k - 1) // k
        has_child = {p[:-1] for p in nodes}
        self.parent_branch, self.block_nodes, self.gather, self.topk = [], [], [], []
        prev_slot: dict = {}
        for p in range(self.num_passes):
            branches = [()] if p == 0 else [q for q in nodes if len(q) == p * k and q in has_child]
            slot = {q: b for b, q in enumerate(branches)}
            self.parent_branch.append([prev_slot[q[:(p - 1) * k]] for q in branches] if p else [])
            self.block_nodes.append([[index[q[:d]] for d in range((p - 1) * k + 1, p * k + 1)]
                                     for q in branches] if p else [])
            drafted = [q for q in nodes if (len(q) - 1) // k == p]  # contiguous in node order
            K = max(q[-1] for q in drafted) + 1
            self.gather.append([(slot[q[:p * k]] * k + (len(q) - 1) % k) * K + q[-1] for q in drafted])
            self.topk.append(K)
            prev_slot = slot
        self._device_cache: dict = {}

    def tensors(self, device) -> dict:
        """The plan's index tensors on ``device`` (built once per device)."""
        key = str(device)
        if key not in self._device_cache:
            as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
            self._device_cache[key] = {
                "parents": as_t(self.parents),
                "parent_branch": [as_t(x) for x in self.parent_branch],
                "block_nodes": [as_t(x) for x in self.block_nodes],
                "gather": [as_t(x) for x in self.gather],
            }
        return self._device_cache[key]

    def __len__(self) -> int:
        return len(self.parents)


@dataclass
class DraftContext:
    """The drafter's view of the accepted context, kept across steps.

    Context position i is the pair (f_i, t_{i+1}). ``take`` (the drafter's ``extend``) appends
    accepted positions as *pending*: their inputs are kept, nothing is computed. The next draft
    (``FalconDrafter.settle``, first thing in ``Passes``) *settles* all but the last k: folds them
    into the LSTM state and the attention KV cache, computed once from the target's true
    features; the first drafting pass runs the last k as one relaxed block. So a drafter whose
    tree drafts nothing costs nothing. Speculative (drafted) positions never enter this state, so
    after the target accepts a path, only the newly accepted positions are settled.

    For k = 1 nothing stays pending: a block of one position sees itself and what came before,
    exactly what settling computes, so the first pass only finishes the last settled position
    (``output`` when settling produced it, else ``FalconDrafter.settled_output``) instead of
    running the LSTM over it a second time.
    """

    state: "LSTMState"  # noqa: F821  (falcon.LSTMState: after the last settled position)
    keys: torch.Tensor  # [capacity, H]; rows [:length] are valid
    values: torch.Tensor
    length: int
    pending: torch.Tensor  # [P <= k, 2H] inputs of the pending positions (none when k = 1)
    next_token: int | None
    k: int
    output: torch.Tensor | None = None  # k = 1: pass 0's output [1, 1, H], when settling computed it

    @property
    def ready(self) -> bool:
        """Whether the first pass has its input: k positions taken (k = 1: one)."""
        return self.length + self.pending.shape[0] >= self.k

    @property
    def unsettled(self) -> int:
        """How many of the oldest pending positions the next draft settles."""
        return max(0, self.pending.shape[0] - (0 if self.k == 1 else self.k))

    @classmethod
    def empty(cls, drafter) -> "DraftContext":
        H = drafter.config.hidden_size
        w = drafter.qkv.weight
        k = drafter.config.k
        return cls(drafter.zero_state(1), w.new_empty(0, H), w.new_empty(0, H), 0, w.new_empty(0, 2 * H), None, k)

    def take(self, drafter, tokens: torch.Tensor, features: torch.Tensor | None, next_token: int) -> None:
        """``FalconDrafter.extend_contexts``: appends the accepted positions as pending (the next
        draft settles them, and ``settle`` records them)."""
        H = drafter.config.hidden_size
        if features is None:
            raise ValueError("FalconDrafter needs the target's features in extend() (needs_features=True)")
        if tokens.dim() != 1 or tokens.numel() == 0 or features.shape != (tokens.numel(), H):
            raise ValueError(f"extend() needs tokens [L >= 1] and features [L, {H}], got "
                             f"{list(tokens.shape)} and {list(features.shape)}")
        if self.next_token is not None and int(tokens[0]) != self.next_token:
            raise ValueError(f"extend() must start with the previous next token {self.next_token}, "
                             f"got {int(tokens[0])}")
        # Pair i = (f_i, t_{i+1}): tokens[0] already sits in the previous pair (or starts the text).
        ahead = torch.cat([tokens[1:], tokens.new_tensor([next_token])])
        self.pending = torch.cat([self.pending, drafter.pair_inputs(features, ahead)])
        self.next_token = next_token
        self.output = None

    def settle(self, keys: torch.Tensor, values: torch.Tensor, state, output: torch.Tensor | None = None) -> None:
        """The oldest ``len(keys)`` pending positions become settled: their keys and values [n, H]
        join the cache and ``state`` is the LSTM state after them; ``output``: the last one's
        drafter output, if it was computed."""
        self._append(keys, values)
        self.state = state
        self.pending = self.pending[keys.shape[0]:]
        self.output = output

    @staticmethod
    def padded(contexts: list["DraftContext"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Several rows' settled keys and values [R, S, H], each row's padded at its end to the
        longest (S), and the mask [R, S] (True: a settled position) that hides the padding."""
        keys = pad_sequence([c.keys[:c.length] for c in contexts], batch_first=True)
        values = pad_sequence([c.values[:c.length] for c in contexts], batch_first=True)
        lengths = torch.tensor([c.length for c in contexts], device=keys.device)
        return keys, values, torch.arange(keys.shape[1], device=keys.device) < lengths[:, None]

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        need = self.length + k.shape[0]
        if need > self.keys.shape[0]:  # grow geometrically so appends are amortised O(1)
            cap = max(need, 2 * self.keys.shape[0], 64)
            self.keys = torch.cat([self.keys[:self.length], self.keys.new_empty(cap - self.length, k.shape[1])])
            self.values = torch.cat([self.values[:self.length], self.values.new_empty(cap - self.length, k.shape[1])])
        self.keys[self.length:need] = k
        self.values[self.length:need] = v
        self.length = need

