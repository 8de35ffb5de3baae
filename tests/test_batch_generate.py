"""speculative_generate on a batch of left-padded prompts: every row token-identical (fp32) to
transformers' generate on that row's prompt alone, every row's sampling following the target's
distribution, bad batches refused. References come from transformers, never from falcon_ext."""
import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from falcon_ext import FalconDrafter, FalconDrafterConfig, PromptLookupDrafter, speculative_generate
from falcon_ext.evaluation.acceptance import load_drafter
from helpers import chi_square_pvalue, exact_distribution, greedy_reference, tiny_model
from scripted_drafters import PerRow, RandomTreeDrafter, ScriptedDrafter

# Stories that end (EOS 1 or 2) after different numbers of tokens, and one that does not end
# within END_BUDGET tokens: rows stop at different steps.
STORIES = [
    "The cat sat on the mat. The dog",
    "Once upon a time",
    "Tom and Sue went to the park. They saw a big tree. Tom said,",
    "Mia had a red hat.",
]
END_BUDGET = 250
EOS = [1, 2]


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] of the prompts, left-padded as generate takes them."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def alone(model, prompt: list[int], max_new_tokens: int, eos) -> list[int]:
    """transformers' greedy continuation of one prompt, run alone (batch 1, no padding)."""
    out = greedy_reference(model, torch.tensor([prompt], device=model.device), max_new_tokens, eos)
    return out[0, len(prompt):].tolist()


def expected(ids: torch.Tensor, continuations: list[list[int]], pad: int) -> torch.Tensor:
    """generate's batch output: the padded prompts, then each row's tokens padded after its EOS."""
    width = max(len(c) for c in continuations)
    return torch.cat([ids, torch.tensor([c + [pad] * (width - len(c)) for c in continuations])], dim=1)


def story_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(s).input_ids for s in STORIES]


@pytest.mark.parametrize("mode", ["right", "wrong", "mixed"])
def test_rows_equal_generate_alone_on_stories260K(stories, mode):
    model, tokenizer = stories
    prompts = story_ids(tokenizer)
    refs = [alone(model, p, END_BUDGET, EOS) for p in prompts]
    assert len({len(r) for r in refs}) == len(refs) and refs[1][-1] not in EOS  # rows end at different steps
    ids, mask = left_pad(prompts)
    drafter = PerRow([ScriptedDrafter(p + r, model.config.vocab_size, mode, seed=b)
                      for b, (p, r) in enumerate(zip(prompts, refs))])
    out = speculative_generate(model, drafter, ids, attention_mask=mask, max_new_tokens=END_BUDGET, eos_token_id=EOS)
    # stories260K has no pad id: generate pads a finished row with the first EOS id
    assert torch.equal(out.sequences, expected(ids, refs, pad=EOS[0]))
    # Per row, one entry per step: accepted nodes (the root included), so the tokens it emitted
    # after the prefill's first token, or more where an EOS cut the step short.
    emitted = [sum(lengths) for lengths in out.accept_lengths]
    assert emitted[1] == len(refs[1]) - 1 and all(e >= len(r) - 1 for e, r in zip(emitted, refs))
    if mode == "right":
        assert out.mean_accepted_tokens > 1.5  # drafts were really accepted, not just skipped


def test_finished_rows_leave_the_batch(stories):
    """Each verify forward runs exactly the rows still decoding, and the drafter is asked for them only."""
    model, tokenizer = stories
    prompts = story_ids(tokenizer)
    refs = [alone(model, p, END_BUDGET, EOS) for p in prompts]
    rows_per_forward = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: rows_per_forward.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        ids, mask = left_pad(prompts)
        drafter = PerRow([ScriptedDrafter(p + r, model.config.vocab_size, "mixed", seed=b)
                          for b, (p, r) in enumerate(zip(prompts, refs))])
        out = speculative_generate(model, drafter, ids, attention_mask=mask, max_new_tokens=END_BUDGET,
                                   eos_token_id=EOS)
    finally:
        hook.remove()
    assert torch.equal(out.sequences, expected(ids, refs, pad=EOS[0]))
    steps = [len(lengths) for lengths in out.accept_lengths]
    alive = [sum(s > step for s in steps) for step in range(max(steps))]
    assert rows_per_forward == [len(prompts)] + alive  # the prefill, then one forward per step
    assert [len(rows) for rows in drafter.asked] == alive and alive[-1] < alive[0]
    assert all(rows == sorted(rows) for rows in drafter.asked)


@pytest.mark.parametrize("branches", [1, 3])
def test_prompt_lookup_rows_equal_generate_alone(stories, branches):
    model, tokenizer = stories
    prompts = story_ids(tokenizer) + [tokenizer("Lily wanted to play with the ball. Lily wanted to play").input_ids]
    refs = [alone(model, p, 120, EOS) for p in prompts]
    ids, mask = left_pad(prompts, pad=7)  # any pad id: the mask hides it
    out = speculative_generate(model, PromptLookupDrafter(max_branches=branches), ids, attention_mask=mask,
                               max_new_tokens=120, eos_token_id=EOS)
    assert torch.equal(out.sequences, expected(ids, refs, pad=EOS[0]))
    assert out.mean_accepted_tokens > 1.2  # stories repeat themselves: lookup drafts do get accepted


def test_padding_matches_generate_on_the_whole_batch(stories):
    """The output format is generate's own on the same left-padded batch: prompts as given, finished
    rows padded (here with the generation_config's pad id)."""
    model, tokenizer = stories
    prompts = story_ids(tokenizer)[:3]
    ids, mask = left_pad(prompts)
    model.generation_config.pad_token_id = 5
    try:
        out = speculative_generate(model, PromptLookupDrafter(), ids, attention_mask=mask, max_new_tokens=200,
                                   eos_token_id=EOS)
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=200, eos_token_id=EOS,
                             temperature=None, top_k=None, top_p=None)
    finally:
        model.generation_config.pad_token_id = None
    assert (ref[:, -1] == 5).any()  # some row did stop early and was padded
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("mode", ["right", "wrong", "mixed"])
def test_rows_equal_generate_alone_on_tiny_families(tiny, mode):
    g = torch.Generator().manual_seed(3)
    vocab = tiny.config.vocab_size
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (1, 12, 5, 9, 2)]
    # An EOS id that the first row's continuation reaches early: that row stops first.
    eos = alone(tiny, prompts[0], 6, None)[-1]
    refs = [alone(tiny, p, 40, eos) for p in prompts]
    assert len(refs[0]) <= 6 and max(len(r) for r in refs) == 40
    ids, mask = left_pad(prompts, pad=3)
    drafter = PerRow([ScriptedDrafter(p + r, vocab, mode, seed=b) for b, (p, r) in enumerate(zip(prompts, refs))])
    out = speculative_generate(tiny, drafter, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=eos)
    assert torch.equal(out.sequences, expected(ids, refs, pad=tiny.generation_config.pad_token_id)), \
        (tiny.config.model_type, mode)


def test_max_new_tokens_and_eos_in_the_first_token(stories):
    """max_new_tokens=1 (every row done at the prefill) and a row whose prompt ends in EOS (generate
    does not look at the prompt: it continues)."""
    model, tokenizer = stories
    prompts = [tokenizer("Once upon a time").input_ids, tokenizer("The dog ran.").input_ids + [2],
               tokenizer("Mia had a red hat.").input_ids + [1]]
    ids, mask = left_pad(prompts)
    for max_new in (1, 30):
        refs = [alone(model, p, max_new, EOS) for p in prompts]
        out = speculative_generate(model, PromptLookupDrafter(), ids, attention_mask=mask, max_new_tokens=max_new,
                                   eos_token_id=EOS)
        assert torch.equal(out.sequences, expected(ids, refs, pad=EOS[0])), max_new


def test_rows_without_padding_and_without_a_mask(stories):
    model, tokenizer = stories
    prompts = [tokenizer("Once upon a time").input_ids, tokenizer("The big dog").input_ids]
    assert len(prompts[0]) == len(prompts[1])
    refs = [alone(model, p, 25, EOS) for p in prompts]
    out = speculative_generate(model, PromptLookupDrafter(), torch.tensor(prompts), max_new_tokens=25,
                               eos_token_id=EOS)
    assert torch.equal(out.sequences, expected(torch.tensor(prompts), refs, pad=EOS[0]))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_batched_sampling_is_lossless_per_row(temperature, top_k, top_p):
    """The chi-square test of test_generate's sampling test, on every row of a batch of prompts of
    different lengths (left-padded), each row against its own exact distribution."""
    vocab, steps, runs = 6, 3, 1500
    model = tiny_model("llama", vocab=vocab, seed=5)
    prompts = [[1, 4, 2], [3], [5, 0, 2, 2, 1]]
    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                     + ([TopKLogitsWarper(top_k)] if top_k else [])
                                     + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    probs = [exact_distribution(model, p, steps, processors) for p in prompts]
    counts = torch.zeros(len(prompts), vocab ** steps, dtype=torch.float64)
    ids, mask = left_pad(prompts)
    generator = torch.Generator().manual_seed(1234)
    accepted_drafts = 0
    for run in range(runs):
        drafter = PerRow([RandomTreeDrafter(vocab, seed=run * len(prompts) + b) for b in range(len(prompts))])
        out = speculative_generate(model, drafter, ids, attention_mask=mask, max_new_tokens=steps,
                                   temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=[],
                                   generator=generator)
        for b in range(len(prompts)):
            t = out.sequences[b, ids.shape[1]:].tolist()
            counts[b, (t[0] * vocab + t[1]) * vocab + t[2]] += 1
        accepted_drafts += sum(n - 1 for lengths in out.accept_lengths for n in lengths)
    assert accepted_drafts > runs // 10  # the rejection sampler really accepted drafts
    for b in range(len(prompts)):
        assert chi_square_pvalue(counts[b], probs[b]) > 1e-3, b


@pytest.mark.cuda
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cuda_batch_matches_generate_alone(stories, temperature):
    """The batch loop on a GPU: CUDA batched ops, device-side uniforms, the cache and its row
    selection on the device, with prompt lookup and the Falcon drafter."""
    model, tokenizer = stories
    model = type(model).from_pretrained(model.name_or_path, dtype=torch.float32).cuda().eval()
    prompts = story_ids(tokenizer)
    refs = [alone(model, p, 120, EOS) for p in prompts]
    ids, mask = left_pad(prompts)
    for drafter in (PromptLookupDrafter(max_branches=3), load_drafter("stories260K", model)):
        generator = torch.Generator(device="cuda").manual_seed(0)
        out = speculative_generate(model, drafter, ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=120,
                                   temperature=temperature, top_k=0, top_p=1.0, eos_token_id=EOS,
                                   generator=generator)
        assert out.sequences.is_cuda and out.sequences.shape[0] == len(prompts)
        if temperature == 0.0:
            assert torch.equal(out.sequences.cpu(), expected(ids, refs, pad=EOS[0]))


# ---------------------------------------------------------------- the Falcon drafter

# A bushy tree: several branches per pass, so pass p runs rows x branches blocks.
TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]


def random_falcon(target, k: int, seed: int = 0) -> FalconDrafter:
    """An untrained drafter with non-trivial weights: its trees are wrong often, right sometimes."""
    torch.manual_seed(seed)
    drafter = FalconDrafter(FalconDrafterConfig.for_target(target, k=k, tree=TREE), target)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return drafter


def test_falcon_drafter_rows_equal_generate_alone_on_stories260K(stories):
    model, tokenizer = stories
    prompts = story_ids(tokenizer)
    refs = [alone(model, p, END_BUDGET, EOS) for p in prompts]
    ids, mask = left_pad(prompts)
    out = speculative_generate(model, load_drafter("stories260K", model), ids, attention_mask=mask,
                               max_new_tokens=END_BUDGET, eos_token_id=EOS)
    assert torch.equal(out.sequences, expected(ids, refs, pad=EOS[0]))
    assert out.mean_accepted_tokens > 1.5  # the shipped drafter's trees are accepted in the batch too


@pytest.mark.parametrize("k", [1, 2, 3])
def test_falcon_drafter_rows_equal_generate_alone_on_tiny_families(tiny, k):
    """Rows of 1 to 12 prompt tokens: a row with fewer than k context positions drafts the root
    alone while the other rows draft whole trees in the same step."""
    g = torch.Generator().manual_seed(4)
    vocab = tiny.config.vocab_size
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (1, 12, 5, 2)]
    eos = alone(tiny, prompts[2], 9, None)[-1]
    refs = [alone(tiny, p, 30, eos) for p in prompts]
    ids, mask = left_pad(prompts)
    out = speculative_generate(tiny, random_falcon(tiny, k), ids, attention_mask=mask, max_new_tokens=30,
                               eos_token_id=eos)
    assert torch.equal(out.sequences, expected(ids, refs, pad=tiny.generation_config.pad_token_id)), \
        (tiny.config.model_type, k)
    assert max(n for sizes in out.tree_sizes for n in sizes) == len(TREE) + 1  # whole trees were verified


@pytest.mark.parametrize("k", [1, 2])
def test_extend_rows_settles_each_row_as_extend_alone(k):
    """Rows that settle as many positions are encoded in one call: once settled, every row's
    context (keys, values, LSTM state, pending inputs) equals the batch-1 extend() on that row
    alone (settled by its own path: for k = 1 the fused op's full forward), for groups of one and
    of several rows."""
    target = tiny_model("llama", vocab=97, seed=3)
    H = target.config.hidden_size
    g = torch.Generator().manual_seed(0)
    lengths = [[5, 5, 2, 5], [3, 1, 3, 3]]  # per step and row: two groups in each step
    batched, single = random_falcon(target, k, seed=2), [random_falcon(target, k, seed=2) for _ in range(4)]
    batched.reset_rows(4)
    for drafter in single:
        drafter.reset()
    heads = [None] * 4
    for step in lengths:
        tokens = [torch.randint(0, 97, (n,), generator=g) for n in step]
        for row, t in enumerate(tokens):
            if heads[row] is not None:
                t[0] = heads[row]  # an accepted path starts with the previous next token
        features = [torch.randn(n, H, generator=g) for n in step]
        heads = [int(torch.randint(0, 97, (1,), generator=g)) for _ in step]
        batched.extend_rows(list(range(4)), tokens, features, heads)
        for row in range(4):
            single[row].extend(tokens[row], features[row], heads[row])
        assert any(c.unsettled for c in batched.row_contexts)  # extend only takes; settling is deferred
        batched.settle(batched.row_contexts)
        for row in range(4):
            single[row].settle([single[row].context])
            got, want = batched.row_contexts[row], single[row].context
            assert got.unsettled == want.unsettled == 0
            assert got.length == want.length and got.next_token == want.next_token
            for a, b in ((got.keys[:got.length], want.keys[:want.length]),
                         (got.values[:got.length], want.values[:want.length]),
                         (got.state.h, want.state.h), (got.state.c, want.state.c), (got.pending, want.pending)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_propose_rows_equals_propose_row_by_row(stories, k):
    """Batched drafting (padded contexts, one call per pass for all rows) drafts every row's tree
    as the batch-1 drafter does on that row alone, after extends of different lengths and for
    any subset of rows."""
    model, tokenizer = stories
    prompts = [tokenizer(s).input_ids for s in STORIES] + [[1]]  # the last: too short to draft from (k = 2)
    features = [model(torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0].detach() for p in prompts]
    batched = random_falcon(model, k, seed=1)
    single = [random_falcon(model, k, seed=1) for _ in prompts]
    rows = list(range(len(prompts)))
    batched.reset_rows(len(prompts))
    for drafter in single:
        drafter.reset()
    # first the prompts, then "accepted paths" of different lengths: the next few prompt tokens again
    cut = [len(p) - min(len(p) - 1, 3 + b) if len(p) > 1 else 1 for b, p in enumerate(prompts)]
    steps = [[(p[:c], f[:c], p[c] if c < len(p) else 7) for p, f, c in zip(prompts, features, cut)],
             [(p[c:], f[c:], 11) for p, f, c in zip(prompts, features, cut) if c < len(p)]]
    calls = []
    original = batched.draft_block
    batched.draft_block = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    for step in steps:
        active = rows[:len(step)]
        batched.extend_rows(active, [torch.tensor(t) for t, _, _ in step], [f for _, f, _ in step],
                            [n for _, _, n in step])
        for row, (t, f, n) in zip(active, step):
            single[row].extend(torch.tensor(t), f, n)
        for subset in (active, active[1::2]):
            calls.clear()
            trees = batched.propose_rows(subset)
            for row, tree in zip(subset, trees):
                alone_tree = single[row].propose()
                assert torch.equal(tree.tokens, alone_tree.tokens) and torch.equal(tree.parents, alone_tree.parents)
            drafting = [row for row in subset if batched.row_contexts[row].ready]
            # k > 1: every pass is one draft_block call for all rows (k = 1: pass 0 needs none)
            assert len(calls) == (0 if len(drafting) < 2 else batched.plan.num_passes - (k == 1))
    assert [len(t) for t in batched.propose_rows(rows)][-1] == (1 if k == 2 else len(TREE) + 1)


# ---------------------------------------------------------------- bad input


class Collect:
    def put(self, value):
        pass

    def end(self):
        pass


@pytest.mark.parametrize("ids,mask,kwargs,error,message", [
    (torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3), {}, ValueError,
     r"attention_mask shape \(2, 3\) != input_ids shape \(2, 4\)"),
    (torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), {}, ValueError,
     r"attention_mask row 1 has padding after a token: .* left-padded"),
    (torch.ones(2, 4, dtype=torch.long), torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]]), {}, ValueError,
     r"attention_mask row 0 has padding after a token"),
    (torch.ones(3, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]), {}, ValueError,
     r"row 1 of the batch is all padding"),
    (torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [0, 2, 1, 1]]), {}, ValueError,
     r"attention_mask must hold only 0 \(padding\) and 1"),
    (torch.tensor([[5, 1, 2], [700, 600, 2]]), torch.tensor([[1, 1, 1], [0, 1, 1]]), {}, ValueError,
     r"input_ids must lie in \[0, 512\), got values in \[1, 600\]"),
    (torch.ones(2, 0, dtype=torch.long), None, {}, ValueError, r"the prompt is empty"),
    (torch.ones(2, 4, dtype=torch.long), None, {"streamer": Collect()}, ValueError,
     r"a streamer takes one prompt \(batch size 1, as in generate\), got a batch of 2"),
    (torch.ones(2, 4, dtype=torch.long), None, {"drafter": RandomTreeDrafter(512)}, ValueError,
     r"RandomTreeDrafter drafts for one prompt at a time; a batch of 2 prompts needs a falcon_ext.BatchDrafter"),
])
def test_bad_batches_raise_clear_errors(stories, ids, mask, kwargs, error, message):
    model, tokenizer = stories
    kwargs = {"drafter": PromptLookupDrafter(), "max_new_tokens": 5, **kwargs}
    with pytest.raises(error, match=message):
        speculative_generate(model, input_ids=ids, attention_mask=mask, **kwargs)
    # the model still decodes a batch exactly
    prompts = story_ids(tokenizer)[:2]
    ids, mask = left_pad(prompts)
    out = speculative_generate(model, PromptLookupDrafter(), ids, attention_mask=mask, max_new_tokens=20,
                               eos_token_id=EOS)
    assert torch.equal(out.sequences, expected(ids, [alone(model, p, 20, EOS) for p in prompts], pad=EOS[0]))


class WrongRootInRow(PerRow):
    """Row `bad` proposes a tree whose root is not its next token, at the third step."""

    def __init__(self, drafters, bad):
        super().__init__(drafters)
        self.bad = bad

    def propose_rows(self, rows):
        trees = super().propose_rows(rows)
        if len(self.asked) == 3:
            tree = trees[rows.index(self.bad)]
            tree.tokens[0] = (tree.tokens[0] + 1) % 512
        return trees


class ShortList(PerRow):
    def propose_rows(self, rows):
        return super().propose_rows(rows)[:-1]


@pytest.mark.parametrize("make,message", [
    (lambda d: WrongRootInRow(d, bad=1), r"the drafter's tree root \d+ for row 1 is not the row's next token"),
    (ShortList, r"propose_rows must return a list of 2 DraftTrees"),
])
def test_misbehaving_batch_drafter_is_caught(stories, make, message):
    model, tokenizer = stories
    prompts = story_ids(tokenizer)[:2]
    ids, mask = left_pad(prompts)
    with pytest.raises(ValueError, match=message):
        speculative_generate(model, make([RandomTreeDrafter(512, seed=b) for b in range(2)]), ids,
                             attention_mask=mask, max_new_tokens=20)
