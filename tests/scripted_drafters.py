"""Test drafters that know the target's true continuation (computed independently by
``model.generate``), so tests can force drafts that are always right, always wrong or mixed,
on random tree shapes. They also check that the engine feeds them the right context."""
import random

import torch

from falcon_ext import DraftTree


class ScriptedDrafter:
    needs_features = False

    def __init__(self, reference: list[int], vocab: int, mode: str, seed: int = 0, max_nodes: int = 12):
        self.reference, self.vocab, self.mode = reference, vocab, mode
        self.rng = random.Random(seed)
        self.max_nodes = max_nodes

    def reset(self):
        self.context = []
        self.next_token = None

    def extend(self, tokens, features, next_token):
        self.context += tokens.tolist()
        self.next_token = next_token
        # The engine must only ever hand over tokens the target itself produced.
        n = len(self.context)
        assert self.context == self.reference[:n], "engine passed tokens that differ from the target's"
        if n < len(self.reference):
            assert next_token == self.reference[n], "engine's next token differs from the target's"

    def _truth(self, depth: int):
        i = len(self.context) + depth  # the root (depth 0) sits at index len(context)
        return self.reference[i] if i < len(self.reference) else None

    def _token(self, depth: int, on_track: bool) -> int:
        truth = self._truth(depth) if on_track else None
        right = {"right": True, "wrong": False, "mixed": self.rng.random() < 0.6}[self.mode]
        if truth is not None and right:
            return truth
        token = self.rng.randrange(self.vocab)
        while token == truth:
            token = self.rng.randrange(self.vocab)
        return token

    def propose(self):
        n = self.rng.randint(1, self.max_nodes)
        tokens, parents, depth, on_track = [self.next_token], [-1], [0], [True]
        if self.mode == "right":  # a correct chain first, then random wrong or right branches
            for d in range(1, n):
                if self._truth(d) is None:
                    break
                tokens.append(self._truth(d)), parents.append(d - 1), depth.append(d), on_track.append(True)
        while len(tokens) < n:
            p = self.rng.randrange(len(tokens))
            d = depth[p] + 1
            tok = self._token(d, on_track[p])
            tokens.append(tok), parents.append(p), depth.append(d)
            on_track.append(on_track[p] and tok == self._truth(d))
        return DraftTree(torch.tensor(tokens), torch.tensor(parents))


class RandomTreeDrafter:
    """Random trees of random tokens: for sampling tests, where no 'truth' exists."""

    needs_features = False

    def __init__(self, vocab: int, seed: int = 0, max_nodes: int = 8):
        self.vocab, self.rng, self.max_nodes = vocab, random.Random(seed), max_nodes

    def reset(self):
        self.next_token = None

    def extend(self, tokens, features, next_token):
        self.next_token = next_token

    def propose(self):
        n = self.rng.randint(1, self.max_nodes)
        parents = [-1] + [self.rng.randrange(i) for i in range(1, n)]
        tokens = [self.next_token] + [self.rng.randrange(self.vocab) for _ in range(1, n)]
        return DraftTree(torch.tensor(tokens), torch.tensor(parents))


class PerRow:
    """A batch drafter (falcon_ext.BatchDrafter) made of one batch-1 drafter per row: each row's
    drafter sees only its own row's calls, so a ScriptedDrafter per row also checks that the
    engine hands every row exactly that row's tokens."""

    def __init__(self, drafters):
        self.drafters = drafters
        self.needs_features = drafters[0].needs_features
        self.asked = []  # the rows of each propose_rows call

    def reset(self):
        self.reset_rows(1)

    def extend(self, tokens, features, next_token):
        self.drafters[0].extend(tokens, features, next_token)

    def propose(self):
        return self.drafters[0].propose()

    def reset_rows(self, batch_size):
        assert batch_size == len(self.drafters)
        for drafter in self.drafters:
            drafter.reset()

    def extend_rows(self, rows, tokens, features, next_tokens):
        for i, row in enumerate(rows):
            self.drafters[row].extend(tokens[i], None if features is None else features[i], next_tokens[i])

    def propose_rows(self, rows):
        self.asked.append(list(rows))
        return [self.drafters[row].propose() for row in rows]
