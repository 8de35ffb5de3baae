"""FalconDrafter: forward semantics vs an independent reference, incremental state, CDT, checkpoints."""
import json
from pathlib import Path

import pytest
import torch
from falcon_reference import reference_block
from helpers import greedy_reference, tiny_model
from torch import nn

from falcon_ext.drafters.falcon import FalconDrafter, FalconDrafterConfig, Passes
from falcon_ext.drafters.tree import TreePlan, chain
from falcon_ext.engine.drafting import DraftTree

STORIES = Path(__file__).resolve().parents[1] / "falcon_ext" / "models" / "stories260K"


class TinyTarget(nn.Module):
    """Just what a drafter reads from a target: an input embedding and an LM head (odd sizes)."""

    def __init__(self, hidden=7, vocab=111, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, hidden, generator=g))
            self.head.weight.copy_(torch.randn(vocab, hidden, generator=g))

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.head


def make_drafter(hidden=7, k=2, heads=1, seed=0, target=None, **kw):
    target = target or TinyTarget(hidden)
    torch.manual_seed(seed)
    drafter = FalconDrafter(FalconDrafterConfig.for_target(target, k=k, num_heads=heads, **kw), target)
    with torch.no_grad():  # non-trivial norm weights and LSTM biases so every term is exercised
        for p in drafter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return drafter


def reference_forward(d: FalconDrafter, features, next_tokens, block_offset):
    """falcon_reference.reference_block, in fp64, over the drafter's own weights (read from its
    modules here, not through its fused-weight list) from a zero state: position i sees
    position j iff j's block is not after i's."""
    H, k = d.config.hidden_size, d.config.k
    x = torch.cat([features, d.target.get_input_embeddings()(next_tokens)], -1).double()
    B, T, _ = x.shape
    L = d.lstm
    w = {"w_ih0": L.weight_ih_l0, "w_hh0": L.weight_hh_l0, "b0": L.bias_ih_l0 + L.bias_hh_l0,
         "w_ih1": L.weight_ih_l1, "w_hh1": L.weight_hh_l1, "b1": L.bias_ih_l1 + L.bias_hh_l1,
         "attn_norm": d.attn_norm.weight, "w_qkv": d.qkv.weight, "w_o": d.o_proj.weight,
         "mlp_norm": d.mlp_norm.weight, "w_up": d.up.weight, "w_down": d.down.weight}
    block = torch.tensor([(i - block_offset) // k for i in range(T)])
    state, prior = torch.zeros(2, B, H, dtype=torch.double), torch.zeros(B, 0, H, dtype=torch.double)
    with torch.no_grad():
        return reference_block({n: t.double() for n, t in w.items()}, x, state, state, prior, prior,
                               block[None, :] <= block[:, None], d.config.num_heads, d.config.rms_norm_eps)[0]


@pytest.mark.parametrize("hidden,heads,k,offset", [(7, 1, 2, 0), (7, 7, 3, 2), (12, 3, 4, 1), (1, 1, 1, 0)])
def test_forward_matches_reference(hidden, heads, k, offset):
    d = make_drafter(hidden, k=k, heads=heads)
    feats = torch.randn(2, 11, hidden)
    toks = torch.randint(0, 111, (2, 11))
    got = d(feats, toks, block_offset=offset)
    torch.testing.assert_close(got.double(), reference_forward(d, feats, toks, offset), rtol=1e-5, atol=1e-5)


def test_forward_bf16_close_to_fp32():
    d32 = make_drafter(64, heads=4, k=2)
    d16 = make_drafter(64, heads=4, k=2, dtype="bfloat16")
    d16.load_state_dict(d32.state_dict())
    feats, toks = torch.randn(1, 9, 64), torch.randint(0, 111, (1, 9))
    ref = reference_forward(d32, feats, toks, 1)
    got = d16(feats, toks, block_offset=1)
    assert got.dtype == torch.bfloat16
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, err


def test_relaxed_mask_sees_own_block_not_later_blocks():
    k, T = 3, 10
    d = make_drafter(8, k=k, heads=2)
    feats, toks = torch.randn(1, T, 8), torch.randint(0, 111, (1, T))
    base = d(feats, toks, block_offset=1)  # blocks [0], [1,4), [4,7), [7,10)
    changed = feats.clone()
    changed[0, 5] += 1.0  # position 5, in block [4, 7)
    out = d(changed, toks, block_offset=1)
    diff = (out - base).abs().amax(-1)[0]
    assert torch.all(diff[:4] == 0)  # earlier blocks never see it
    assert torch.all(diff[4:] > 0)  # its own block sees it (position 4 too: relaxed), later ones too


def test_attention_mask_hides_padding():
    d = make_drafter(7, k=2)
    feats, toks = torch.randn(1, 6, 7), torch.randint(0, 111, (1, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    padded = d(feats, toks, block_offset=0, attention_mask=mask)[:, :5]
    short = d(feats[:, :5], toks[:, :5], block_offset=0)
    torch.testing.assert_close(padded, short)


def test_bad_inputs_raise():
    d = make_drafter(7)
    with pytest.raises(ValueError, match="features must be"):
        d(torch.randn(1, 3, 8), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="next_tokens must be"):
        d(torch.randn(1, 3, 7), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="block_offset"):
        d(torch.randn(1, 3, 7), torch.zeros(1, 3, dtype=torch.long), block_offset=2)
    with pytest.raises(ValueError, match="num_heads"):
        FalconDrafterConfig(hidden_size=7, vocab_size=111, num_heads=2)
    with pytest.raises(ValueError, match="prefix-closed"):
        TreePlan([[0, 0]], 2)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("settle_each_step", [False, True])
@pytest.mark.parametrize("with_output", [True, False])
def test_incremental_state_matches_from_scratch(k, settle_each_step, with_output):
    """After several extends, the first pass (and a second drafted pass) equal a full forward:
    whether each extend is settled before the next (as decoding settles every step's accepted
    path) or all at once, and for k = 1 whether settling computes pass 0's output (the fused op's
    full forward) or ``settled_output`` does."""
    d = make_drafter(7, k=k, heads=7)
    d.SETTLE_WITH_OUTPUT = 16 if with_output else 0
    T = 13
    tokens = torch.randint(0, 111, (T + 1,))  # tokens[T] is the next token
    feats = torch.randn(T + 1, 7)
    cuts = [0, 4, 5, 9, T]
    for a, b in zip(cuts, cuts[1:]):
        d.extend(tokens[a:b], feats[a:b], int(tokens[b]))
        if settle_each_step:
            d.settle([d.context])
    ctx = d.context
    if not settle_each_step:
        assert (ctx.length, ctx.pending.shape[0]) == (0, T)  # extend only takes; drafting settles
    full = d(feats[None, :T], tokens[None, 1:T + 1], block_offset=T % k)[0]
    loop = Passes(d, ctx)
    # k = 1 keeps nothing pending: pass 0 finishes the last settled position.
    assert (ctx.length, ctx.pending.shape[0]) == ((T, 0) if k == 1 else (T - k, k))
    assert (ctx.output is not None) == (k == 1 and with_output)
    out1 = loop.step()
    torch.testing.assert_close(out1[0], full[T - k:], rtol=1e-5, atol=1e-5)
    # Pass 2: drafted pairs (f^_{T+j}, x_{T+j+1}) continue the sequence as one more block.
    drafted = torch.randint(0, 111, (k,))
    loop.feed(drafted[None])
    out2 = loop.step()
    f_all = torch.cat([feats[:T], out1[0]])
    t_all = torch.cat([tokens[1:T + 1], drafted])
    full2 = d(f_all[None], t_all[None], block_offset=T % k)[0]
    torch.testing.assert_close(out2[0], full2[T:], rtol=1e-5, atol=1e-5)


BUSHY = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0],
         [0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]


EVERY_THIRD = list(range(1, 111, 3))  # a draft vocabulary of 37 of the 111 ids


@pytest.mark.parametrize("vocab", [None, EVERY_THIRD])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_propose_returns_valid_tree(k, vocab):
    d = make_drafter(7, k=k, heads=1)
    d.set_draft_vocab(vocab)
    d.set_tree(BUSHY)
    tokens, feats = torch.randint(0, 111, (9,)), torch.randn(9, 7)
    d.extend(tokens[:8], feats[:8], int(tokens[8]))
    tree = d.propose()
    assert torch.equal(d.propose().tokens, tree.tokens)  # proposing leaves the context untouched
    assert isinstance(tree, DraftTree) and len(tree) == len(BUSHY) + 1
    assert int(tree.tokens[0]) == int(tokens[8]) and int(tree.parents[0]) == -1
    assert all(0 <= int(p) < i for i, p in enumerate(tree.parents.tolist()) if i)
    assert tree.tokens.dtype == torch.long and 0 <= int(tree.tokens.min()) and int(tree.tokens.max()) < 111
    # Independent check of every node: follow each node's path with full-sequence forwards,
    # appending each pass's predicted features and chosen tokens to the sequence.
    T = 8
    for n, path in enumerate(d.plan.paths, start=1):
        f_all, t_all, drafted = feats[:T], tokens[1:T + 1], []
        passes = (len(path) - 1) // k + 1
        for p in range(passes):
            out = d(f_all[None], t_all[None], block_offset=T % k)[0, T - k + p * k:T + p * k]
            logits = d.logits(out)  # the full head; ids outside the draft vocabulary are masked
            if vocab is not None:
                logits = logits.masked_fill(~torch.isin(torch.arange(111), torch.tensor(vocab)), float("-inf"))
            order = logits.argsort(-1, descending=True)
            block = [int(order[j, path[p * k + j]]) for j in range(k) if p * k + j < len(path)]
            drafted += block
            if p + 1 < passes:
                f_all, t_all = torch.cat([f_all, out]), torch.cat([t_all, torch.tensor(block)])
        assert int(tree.tokens[n]) == drafted[-1], (path, drafted)
    if vocab is not None:
        assert set(tree.tokens[1:].tolist()) <= set(vocab)


def test_draft_vocab_checks_and_checkpoint(tmp_path):
    target = TinyTarget(7, seed=0)
    d = make_drafter(7, k=2, target=target)
    for bad, match in ((torch.tensor([3.0, 4.0]), "token ids"), (torch.tensor([[1, 2]]), "token ids"),
                       (torch.tensor([], dtype=torch.long), "token ids"), (torch.tensor([5, 3]), "sorted"),
                       (torch.tensor([3, 3]), "sorted"), (torch.tensor([0, 111]), r"\[0, 111\)"),
                       (torch.tensor([-1, 4]), "sorted")):
        with pytest.raises(ValueError, match=match):
            d.set_draft_vocab(bad)
    assert d.draft_vocab is None and d.config.draft_vocab_size == 0  # a refused vocabulary changes nothing
    d.set_tree([[0], [1], [2], [0, 0]])
    with pytest.raises(ValueError, match="top 3 tokens"):
        d.set_draft_vocab([4, 9])  # too few ids for the tree
    assert d.draft_vocab is None and d.config.draft_vocab_size == 0
    d.set_draft_vocab([4, 9, 50])
    with pytest.raises(ValueError, match="top 4 tokens"):
        d.set_tree([[0], [1], [2], [3]])
    d.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab_size"] == 3
    loaded = FalconDrafter.from_pretrained(tmp_path, target=target)
    assert loaded.draft_vocab.tolist() == [4, 9, 50] and loaded.draft_head().vocab.tolist() == [4, 9, 50]
    loaded.set_draft_vocab(None)
    assert "draft_vocab" not in loaded.state_dict() and len(loaded.draft_head()) == 111
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["draft_vocab"] = torch.tensor([9, 4, 50])
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="corrupt draft_vocab"):
        FalconDrafter.from_pretrained(tmp_path, target=target)
    tensors["draft_vocab"] = torch.tensor([4, 9])
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="draft_vocab has shape"):
        FalconDrafter.from_pretrained(tmp_path, target=target)


def test_short_context_gives_root_only():
    d = make_drafter(7, k=3)
    d.extend(torch.tensor([5, 6]), torch.randn(2, 7), 9)
    tree = d.propose()
    assert tree.tokens.tolist() == [9] and tree.parents.tolist() == [-1]
    with pytest.raises(ValueError, match="previous next token"):
        d.extend(torch.tensor([8]), torch.randn(1, 7), 3)
    d.reset()
    with pytest.raises(RuntimeError, match="before extend"):
        d.propose()


@pytest.mark.parametrize("k", [1, 2])
def test_root_only_tree_costs_nothing(k):
    """With a root-only tree the drafter proposes the next token alone and computes nothing: the
    accepted positions wait, unsettled, until a tree needs them, and then draft as if settled
    step by step."""
    d, fresh = make_drafter(7, k=k, heads=7), make_drafter(7, k=k, heads=7)
    tokens, feats = torch.randint(0, 111, (9,)), torch.randn(9, 7)
    d.set_tree([])
    d.extend(tokens[:5], feats[:5], int(tokens[5]))
    assert d.propose().tokens.tolist() == [int(tokens[5])]
    d.extend(tokens[5:8], feats[5:8], int(tokens[8]))
    assert d.propose().tokens.tolist() == [int(tokens[8])]
    assert (d.context.length, d.context.pending.shape[0]) == (0, 8)
    fresh.extend(tokens[:8], feats[:8], int(tokens[8]))
    d.set_tree(fresh.plan.paths)
    assert torch.equal(d.propose().tokens, fresh.propose().tokens)


def test_tree_plan_passes():
    plan = TreePlan([[0], [1], [0, 0], [1, 0], [1, 1], [0, 0, 0], [1, 1, 0], [1, 1, 1]], 2)
    assert plan.num_passes == 2 and plan.depth == 3
    assert plan.topk == [2, 2]
    assert plan.parent_branch[1] == [0, 0]  # both depth-2 branch nodes come from the root pass
    assert plan.parents == [-1, 0, 0, 1, 2, 2, 3, 5, 5]
    assert len(TreePlan(chain(8), 2)) == 9


def test_checkpoint_round_trip_and_errors(tmp_path):
    target = TinyTarget(7, seed=0)
    d = make_drafter(7, k=2, target=target, tree=[[0], [1], [0, 0]])
    d.save_pretrained(tmp_path)
    names = set(json.loads((tmp_path / "config.json").read_text()))
    assert {"k", "hidden_size", "target", "tree"} <= names
    loaded = FalconDrafter.from_pretrained(tmp_path, target=target)
    assert loaded.config == d.config
    feats, toks = torch.randn(1, 5, 7), torch.randint(0, 111, (1, 5))
    torch.testing.assert_close(loaded(feats, toks), d(feats, toks), rtol=0, atol=0)
    assert not any("emb" in n or "head" in n for n in loaded.state_dict())
    # Stored in bf16, run in fp32: the weights are the bf16 values, widened exactly.
    d.to(torch.bfloat16).config.dtype = "bfloat16"
    d.save_pretrained(tmp_path / "bf16")
    wide = FalconDrafter.from_pretrained(tmp_path / "bf16", target=target, dtype=torch.float32)
    assert wide.config.dtype == "float32"
    for (name, w), (_, narrow) in zip(wide.state_dict().items(), d.state_dict().items()):
        assert w.dtype == torch.float32 and torch.equal(w, narrow.float()), name
    # The same target in bf16 still matches; another target does not.
    FalconDrafter.from_pretrained(tmp_path, target=TinyTarget(7, seed=0).to(torch.bfloat16))
    with pytest.raises(ValueError, match="wrong target"):
        FalconDrafter.from_pretrained(tmp_path, target=TinyTarget(7, seed=1))
    with pytest.raises(ValueError, match="hidden_size"):
        FalconDrafter.from_pretrained(tmp_path, target=TinyTarget(8, seed=0))
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        FalconDrafter.from_pretrained(tmp_path, target=target)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FalconDrafter.from_pretrained(tmp_path, target=target)


def test_stories260k_target_identity(tmp_path):
    transformers = pytest.importorskip("transformers")
    target = transformers.AutoModelForCausalLM.from_pretrained(STORIES)
    d = FalconDrafter(FalconDrafterConfig.for_target(target), target)
    assert d.config.target["architecture"] == "LlamaForCausalLM" and d.config.hidden_size == 64
    d.save_pretrained(tmp_path)
    other = transformers.LlamaForCausalLM(target.config)  # same architecture, fresh weights
    with pytest.raises(ValueError, match="fingerprint"):
        FalconDrafter.from_pretrained(tmp_path, target=other)
    ids = torch.tensor([1, 403, 407, 261, 378])
    with torch.no_grad():
        feats = target(ids[None], output_hidden_states=True).hidden_states[-1][0]
    loaded = FalconDrafter.from_pretrained(tmp_path, target=target)
    loaded.extend(ids, feats, 42)
    tree = loaded.propose()
    assert int(tree.tokens[0]) == 42 and len(tree) == len(loaded.plan)


def engine_drafter(vocab=13, seed=0):
    target = tiny_model("llama", vocab=vocab, seed=seed)
    torch.manual_seed(seed)
    drafter = FalconDrafter(FalconDrafterConfig.for_target(target, k=2, num_heads=4), target)
    return target, drafter


@pytest.mark.parametrize("vocab", [None, [0, 2, 3, 5, 8, 11]])
@pytest.mark.parametrize("tree", [chain(6), BUSHY])
def test_speculative_generate_lossless_greedy(tree, vocab):
    from falcon_ext import speculative_generate

    target, drafter = engine_drafter()
    drafter.set_draft_vocab(vocab)
    drafter.set_tree(tree)
    for n, max_new in ((1, 30), (5, 17)):
        ids = torch.randint(1, 13, (1, n), generator=torch.Generator().manual_seed(n))
        ref = greedy_reference(target, ids, max_new, None)
        out = speculative_generate(target, drafter, ids, max_new_tokens=max_new, eos_token_id=None)
        assert torch.equal(out.sequences, ref)
        assert max(out.tree_sizes) == len(drafter.plan)  # the drafter's trees were really verified


def test_speculative_generate_sampling_runs():
    from falcon_ext import speculative_generate

    target, drafter = engine_drafter()
    drafter.set_tree(BUSHY)
    gen = torch.Generator().manual_seed(0)
    out = speculative_generate(target, drafter, torch.tensor([[3, 4, 5]]), max_new_tokens=20, temperature=1.0,
                               eos_token_id=None, generator=gen)
    assert out.sequences.shape == (1, 23) and int(out.sequences.max()) < 13


@pytest.mark.parametrize("vocab", [None, [1, 2, 5, 7, 9, 10, 12]])
def test_measured_ranks_predict_engine_acceptance(vocab):
    """tree_tuning's teacher-forced ranks say, step by step, how many nodes greedy verification accepts."""
    from falcon_ext import speculative_generate
    from falcon_ext.evaluation import tree_tuning

    target, drafter = engine_drafter(vocab=13, seed=3)
    drafter.set_draft_vocab(vocab)
    drafter.set_tree(BUSHY)
    ids = torch.tensor([[2, 7, 5]])
    roots, propose = [], drafter.propose

    def recording_propose():
        roots.append(drafter.context.length + drafter.context.pending.shape[0])
        return propose()

    drafter.propose = recording_propose
    out = speculative_generate(target, drafter, ids, max_new_tokens=40, eos_token_id=None)
    del drafter.propose
    seq = out.sequences[0]
    depth = 6
    ranks = tree_tuning.measure_ranks(drafter, target, [ids[0]], max_new_tokens=40, passes=depth // 2, max_rank=8)
    nodes = {tuple(p) for p in BUSHY}
    checked = 0
    for root, accepted in zip(roots, out.accept_lengths):
        row = root - ids.shape[1]
        if row >= ranks.shape[0]:
            continue
        r = ranks[row].tolist()
        predicted = 1 + max([d for d in range(1, depth + 1) if tuple(r[:d]) in nodes], default=0)
        assert accepted == predicted, (root, r, accepted)
        checked += 1
    assert checked >= 5 and seq.numel() == 43
    assert sum(out.accept_lengths) > len(out.accept_lengths)  # some drafts were accepted: the check has teeth


def test_tree_derivation_from_rates():
    from falcon_ext.evaluation import tree_tuning

    ranks = torch.tensor([[0, 0, 1, 8], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [8, 0, 0, 0]])
    rates = tree_tuning.node_rates(ranks)
    assert rates[(0,)] == 3 / 5 and rates[(0, 0)] == 2 / 5 and (8,) not in rates and (0, 0, 1, 8) not in rates
    trees = tree_tuning.best_trees(rates, sizes=(0, 1, 3, 6))
    assert trees[1] == [[0]] and trees[3] == [[0], [0, 0], [1]]  # ties: the shallower node first
    for tree in trees.values():  # every prefix of every node is in the tree: a valid CDT
        TreePlan(tree, 2)
    assert tree_tuning.expected_accepted(trees[3], rates) == pytest.approx(3 / 5 + 2 / 5 + 1 / 5)
    costs = {n: {"draft_s": 0.001 * n, "verify_s": 0.01} for n in trees}
    best, options = tree_tuning.choose(trees, rates, costs)
    assert best.tokens_per_second == max(o.tokens_per_second for o in options)
