"""UnionDrafter: several drafters' trees verified together. The merged tree is checked against an
independent description (its set of token paths); decoding with it against transformers'
generate (greedy, fp32) and the target's exact distribution (sampling)."""
import random

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper

from falcon_ext import DraftTree, FalconDrafter, PromptLookupDrafter, UnionDrafter, speculative_generate
from falcon_ext.drafters.union import merge_trees
from falcon_ext.evaluation.bench import resolve_drafter
from helpers import chi_square_pvalue, exact_distribution, greedy_reference, tiny_model
from scripted_drafters import PerRow, RandomTreeDrafter
from test_batch_generate import EOS, alone, expected, left_pad, story_ids


def paths(tree: DraftTree) -> set[tuple[int, ...]]:
    """Every node's token path from the root, root included."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    out = []
    for node in range(len(tokens)):
        out.append((out[parents[node]] if parents[node] >= 0 else ()) + (tokens[node],))
    return set(out)


def random_trie(rng: random.Random, root: int, vocab: int, nodes: int) -> DraftTree:
    """A random tree without repeated siblings (as drafters' tries are)."""
    tokens, parents, seen = [root], [-1], set()
    while len(tokens) < nodes:
        parent, token = rng.randrange(len(tokens)), rng.randrange(vocab)
        if (parent, token) not in seen:
            seen.add((parent, token))
            tokens.append(token)
            parents.append(parent)
    return DraftTree(torch.tensor(tokens), torch.tensor(parents))


@pytest.mark.parametrize("seed", range(20))
def test_merge_trees_is_the_union_of_token_paths(seed):
    rng = random.Random(seed)
    trees = [random_trie(rng, 7, rng.choice([2, 3, 11]), rng.randint(1, 9)) for _ in range(rng.randint(1, 4))]
    merged = merge_trees(trees)
    parents = merged.parents.tolist()
    assert parents[0] == -1 and all(0 <= p < i for i, p in enumerate(parents) if i)  # topological
    assert paths(merged) == set().union(*map(paths, trees))
    assert len(paths(merged)) == len(merged)  # one node per path: no repeated siblings
    n = len(trees[0])  # the first tree keeps its indices, hence its sibling order
    assert torch.equal(merged.tokens[:n], trees[0].tokens) and torch.equal(merged.parents[:n], trees[0].parents)


def test_merge_trees_bad_input():
    a = DraftTree(torch.tensor([5, 1]), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="share their root"):
        merge_trees([a, DraftTree(torch.tensor([6]), torch.tensor([-1]))])
    with pytest.raises(ValueError, match="at least one tree"):
        merge_trees([])
    for parents in ([-1, 1], [-1, -1], [0, 0], [-1, 0, 2]):
        bad = DraftTree(torch.tensor([5, 1, 2][:len(parents)]), torch.tensor(parents))
        with pytest.raises(ValueError, match=r"0 <= parents\[i\] < i"):
            merge_trees([a, bad])
    with pytest.raises(ValueError, match="at least two drafters"):
        UnionDrafter(PromptLookupDrafter())
    with pytest.raises(TypeError, match="must be drafters"):
        UnionDrafter(PromptLookupDrafter(), object())


def falcon_and_lookup(model) -> UnionDrafter:
    return UnionDrafter(FalconDrafter.from_pretrained("stories260K", target=model), PromptLookupDrafter())


def test_falcon_plus_lookup_is_identical_to_generate(stories):
    model, tokenizer = stories
    union = falcon_and_lookup(model)
    lookup_nodes = 0
    for text in ["Lily wanted to play with the ball. Lily wanted to play", "Once upon a time"]:
        ids = torch.tensor([tokenizer(text).input_ids])
        want = greedy_reference(model, ids, 150, [])
        got = speculative_generate(model, union, ids, max_new_tokens=150, eos_token_id=[])
        assert torch.equal(got.sequences, want)
        # the tree really is the union: after the run, both parts' current paths are in it
        tree = union.propose()
        falcon_tree, lookup_tree = (part.propose() for part in union.parts)
        assert paths(tree) == paths(falcon_tree) | paths(lookup_tree)
        lookup_nodes += len(paths(lookup_tree) - paths(falcon_tree))
    assert lookup_nodes > 0  # the lookup part did add paths of its own


def test_falcon_plus_lookup_rows_equal_generate_alone(stories):
    model, tokenizer = stories
    prompts = story_ids(tokenizer)
    refs = [alone(model, p, 80, EOS) for p in prompts]
    ids, mask = left_pad(prompts, pad=7)
    out = speculative_generate(model, falcon_and_lookup(model), ids, attention_mask=mask, max_new_tokens=80,
                               eos_token_id=EOS)
    assert torch.equal(out.sequences, expected(ids, refs, pad=EOS[0]))


def test_union_sampling_is_lossless():
    """test_generate's chi-square test with merged random trees: merging keeps sampling exact."""
    vocab, steps, runs = 6, 3, 1200
    model = tiny_model("llama", vocab=vocab, seed=5)
    prompt = [1, 4, 2]
    probs = exact_distribution(model, prompt, steps, LogitsProcessorList([TemperatureLogitsWarper(0.8)]))
    counts = torch.zeros(vocab ** steps, dtype=torch.float64)
    generator = torch.Generator().manual_seed(99)
    big_trees = 0
    for run in range(runs):
        union = UnionDrafter(*(RandomTreeDrafter(vocab, seed=2 * run + i, max_nodes=4) for i in (0, 1)))
        out = speculative_generate(model, union, torch.tensor([prompt]), max_new_tokens=steps, temperature=0.8,
                                   eos_token_id=[], generator=generator)
        t = out.sequences[0, len(prompt):].tolist()
        counts[(t[0] * vocab + t[1]) * vocab + t[2]] += 1
        big_trees += sum(size > 4 for size in out.tree_sizes)
    assert chi_square_pvalue(counts, probs) > 1e-3
    assert big_trees >= 30  # steps whose tree outgrew one part's 4 nodes: the trees were merged (63 here)


def test_union_batch_needs_batch_drafters(stories):
    model, tokenizer = stories
    ids, mask = left_pad(story_ids(tokenizer)[:2])
    union = UnionDrafter(PromptLookupDrafter(), RandomTreeDrafter(model.config.vocab_size))
    with pytest.raises(ValueError, match="RandomTreeDrafter is not"):
        speculative_generate(model, union, ids, attention_mask=mask, max_new_tokens=5)
    batch = UnionDrafter(PromptLookupDrafter(), PerRow([RandomTreeDrafter(model.config.vocab_size, seed=b)
                                                         for b in range(2)]))
    out = speculative_generate(model, batch, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=EOS)
    assert torch.equal(out.sequences, expected(ids, [alone(model, p, 30, EOS) for p in story_ids(tokenizer)[:2]],
                                               pad=EOS[0]))


def test_resolve_drafter_joins_names_with_plus(stories):
    model, _ = stories
    union = resolve_drafter("falcon+lookup", model, "stories260K", lookup_tokens=4)
    assert isinstance(union, UnionDrafter) and union.needs_features
    falcon, lookup = union.parts
    assert isinstance(falcon, FalconDrafter) and isinstance(lookup, PromptLookupDrafter)
    assert lookup.num_tokens == 4
    for bad in ["falcon+", "lookup+lookup", "+falcon"]:
        with pytest.raises(ValueError, match="join distinct drafter names"):
            resolve_drafter(bad, model, "stories260K")
