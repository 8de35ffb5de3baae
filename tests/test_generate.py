"""speculative_generate against the target's own generate: token-identical when greedy,
the same distribution when sampling. References come from transformers, never from falcon_ext."""
import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from falcon_ext import PromptLookupDrafter, speculative_generate
from helpers import chi_square_pvalue, exact_distribution, greedy_reference, tiny_model
from scripted_drafters import RandomTreeDrafter, ScriptedDrafter

STORY_PROMPTS = [
    "Once upon a time",
    "Lily wanted to play with the ball. Lily wanted to play with the ball",
    "The cat sat on the mat. The dog",
    "Tom and Sue went to the park. They saw a big tree. Tom said,",
]


@pytest.mark.parametrize("mode", ["right", "wrong", "mixed"])
@pytest.mark.parametrize("prompt", STORY_PROMPTS)
def test_greedy_identical_on_stories260K(stories, prompt, mode):
    model, tokenizer = stories
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    for max_new in (1, 7, 60):
        ref = greedy_reference(model, ids, max_new, [1, 2])
        drafter = ScriptedDrafter(ref[0].tolist(), model.config.vocab_size, mode, seed=max_new)
        out = speculative_generate(model, drafter, ids, max_new_tokens=max_new, eos_token_id=[1, 2])
        assert torch.equal(out.sequences, ref), (prompt, mode, max_new)
        if mode == "right" and max_new == 60:
            assert out.mean_accepted_tokens > 1.5  # drafts were really accepted, not just skipped


@pytest.mark.parametrize("mode", ["right", "wrong", "mixed"])
def test_greedy_identical_on_tiny_families(tiny, mode):
    gen = torch.Generator().manual_seed(1)
    for trial in range(4):
        ids = torch.randint(1, tiny.config.vocab_size, (1, 1 + 9 * trial), generator=gen)
        max_new = (5, 40, 23, 64)[trial]
        ref = greedy_reference(tiny, ids, max_new, None)
        drafter = ScriptedDrafter(ref[0].tolist(), tiny.config.vocab_size, mode, seed=trial)
        out = speculative_generate(tiny, drafter, ids, max_new_tokens=max_new, eos_token_id=None)
        assert torch.equal(out.sequences, ref), (tiny.config.model_type, mode, trial)


@pytest.mark.parametrize("branches", [1, 3])
def test_prompt_lookup_identical_and_accepts(stories, branches):
    model, tokenizer = stories
    accepted = []
    for prompt in STORY_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        ref = greedy_reference(model, ids, 120, [1, 2])
        out = speculative_generate(model, PromptLookupDrafter(max_branches=branches), ids,
                                   max_new_tokens=120, eos_token_id=[1, 2])
        assert torch.equal(out.sequences, ref)
        accepted.append(out.mean_accepted_tokens)
    assert max(accepted) > 1.2  # stories repeat themselves: lookup drafts do get accepted


def test_eos_and_max_new_tokens(stories):
    model, tokenizer = stories
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    ref = greedy_reference(model, ids, 400, [1, 2])
    assert ref[0, -1].item() in (1, 2)  # the story ends inside the budget
    for eos in (1, [1, 2], [2, 1]):
        out = speculative_generate(model, PromptLookupDrafter(), ids, max_new_tokens=400, eos_token_id=eos)
        assert torch.equal(out.sequences, ref)
    # generation_config's EOS (set to [1, 2] by load_target) is the default
    out = speculative_generate(model, PromptLookupDrafter(), ids, max_new_tokens=400)
    assert torch.equal(out.sequences, ref)
    # without EOS the budget is met exactly
    ref = greedy_reference(model, ids, 33, [])
    drafter = ScriptedDrafter(ref[0].tolist(), 512, "right", seed=3)
    out = speculative_generate(model, drafter, ids, max_new_tokens=33, eos_token_id=[])
    assert out.sequences.shape[1] == ids.shape[1] + 33 and torch.equal(out.sequences, ref)


def test_left_padding_is_ignored(stories):
    model, tokenizer = stories
    ids = tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    ref = greedy_reference(model, ids, 30, [1, 2])
    out = speculative_generate(model, PromptLookupDrafter(), padded, attention_mask=mask, max_new_tokens=30)
    assert torch.equal(out.sequences[:, :3], padded[:, :3]) and torch.equal(out.sequences[:, 3:], ref)


def test_streamer_receives_prompt_then_every_token(stories):
    model, tokenizer = stories

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    streamer = Collect()
    out = speculative_generate(model, PromptLookupDrafter(), ids, max_new_tokens=50, streamer=streamer)
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out.sequences[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_sampling_is_lossless(temperature, top_k, top_p):
    vocab, steps, runs = 6, 3, 1500
    model = tiny_model("llama", vocab=vocab, seed=5)
    prompt = [1, 4, 2]
    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                     + ([TopKLogitsWarper(top_k)] if top_k else [])
                                     + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    probs = exact_distribution(model, prompt, steps, processors)
    counts = torch.zeros(vocab ** steps, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1234)
    accepted_drafts = 0
    for run in range(runs):
        out = speculative_generate(model, RandomTreeDrafter(vocab, seed=run), torch.tensor([prompt]),
                                   max_new_tokens=steps, temperature=temperature, top_k=top_k, top_p=top_p,
                                   eos_token_id=[], generator=generator)
        t = out.sequences[0, len(prompt):].tolist()
        counts[(t[0] * vocab + t[1]) * vocab + t[2]] += 1
        accepted_drafts += sum(n - 1 for n in out.accept_lengths)
    assert accepted_drafts > runs // 10  # the rejection sampler really accepted drafts
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_sampling_detects_a_biased_sampler():
    """The chi-square check above has power: a slightly wrong distribution fails it."""
    probs = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    counts = torch.tensor([0.25, 0.3, 0.45], dtype=torch.float64) * 3000
    assert chi_square_pvalue(counts, probs) < 1e-3
    assert chi_square_pvalue(probs * 3000, probs) > 0.5


class BadRootDrafter(RandomTreeDrafter):
    def propose(self):
        tree = super().propose()
        tree.tokens[0] = (self.next_token + 1) % self.vocab
        return tree


class OutOfVocabDrafter(RandomTreeDrafter):
    def propose(self):
        tree = super().propose()
        return type(tree)(torch.cat([tree.tokens, torch.tensor([self.vocab + 5])]),
                          torch.cat([tree.parents, torch.tensor([0])]))


@pytest.mark.parametrize("kwargs,ids,message", [
    (dict(), torch.ones(1, 0, dtype=torch.long), "prompt is empty"),
    (dict(), torch.tensor([[1, 600]]), "must lie in"),
    (dict(), torch.tensor([[1.0, 2.0]]), "integer"),
    (dict(max_new_tokens=0), torch.tensor([[1, 2]]), "max_new_tokens"),
    (dict(max_new_tokens=-3), torch.tensor([[1, 2]]), "max_new_tokens"),
    (dict(max_new_tokens=600), torch.tensor([[1, 2]]), "positions"),
    (dict(temperature=-1.0), torch.tensor([[1, 2]]), "temperature"),
    (dict(temperature=float("nan")), torch.tensor([[1, 2]]), "temperature"),
    (dict(temperature=float("inf")), torch.tensor([[1, 2]]), "temperature"),
    (dict(temperature=1.0, top_p=0.0), torch.tensor([[1, 2]]), "top_p"),
    (dict(temperature=1.0, top_p=1.5), torch.tensor([[1, 2]]), "top_p"),
    (dict(temperature=1.0, top_k=-1), torch.tensor([[1, 2]]), "top_k"),
])
def test_bad_arguments_raise_clear_errors(stories, kwargs, ids, message):
    model, _ = stories
    kwargs = {"max_new_tokens": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        speculative_generate(model, PromptLookupDrafter(), ids, **kwargs)


@pytest.mark.parametrize("drafter,message", [(BadRootDrafter(512), "root"), (OutOfVocabDrafter(512), "vocabulary")])
def test_misbehaving_drafter_is_caught_and_model_stays_usable(stories, drafter, message):
    model, tokenizer = stories
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with pytest.raises(ValueError, match=message):
        speculative_generate(model, drafter, ids, max_new_tokens=20)
    ref = greedy_reference(model, ids, 20, [1, 2])
    assert torch.equal(speculative_generate(model, PromptLookupDrafter(), ids, max_new_tokens=20).sequences, ref)


def test_not_a_drafter_is_rejected(stories):
    model, _ = stories
    with pytest.raises(TypeError, match="Drafter"):
        speculative_generate(model, object(), torch.tensor([[1, 2]]), max_new_tokens=3)


@pytest.mark.cuda
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cuda_target_matches_generate(stories, temperature):
    """The whole loop on a GPU: CUDA tree ops, device-side sampling, cache on the device."""
    model, tokenizer = stories
    model = type(model).from_pretrained(model.name_or_path, dtype=torch.float32).cuda().eval()
    model.generation_config.eos_token_id = [1, 2]
    for prompt in STORY_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.cuda()
        generator = torch.Generator(device="cuda").manual_seed(0)
        out = speculative_generate(model, PromptLookupDrafter(max_branches=3), ids, max_new_tokens=100,
                                   temperature=temperature, top_k=0, top_p=1.0, generator=generator)
        assert out.sequences.is_cuda
        if temperature == 0.0:
            assert torch.equal(out.sequences, greedy_reference(model, ids, 100, [1, 2]))
