"""falcon-ext bench end to end on stories260K, and the prompt-set helpers it uses."""
import argparse
import json

import pytest
import torch
from helpers import greedy_reference

from falcon_ext import cli, prompts
from falcon_ext.engine.generate import speculative_generate
from falcon_ext.evaluation import bench
from falcon_ext.training import data as fdata


def test_bench_end_to_end_greedy(tmp_path):
    out = tmp_path / "out"
    # The target doubles as its own "assistant": the only model sharing its tokenizer, and
    # enough to run transformers' assisted generation path.
    rc = cli.main(["bench", "--target", "stories260K", "--prompts", "mt-bench", "--num-prompts", "2",
                     "--max-new-tokens", "16", "--assistant", "stories260K", "--threads", "1", "--dtype", "float32",
                     "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    assert set(report["summary"]) == set(bench.METHODS)
    for key, stats in report["summary"].items():
        assert stats["prompts"] == 2
        assert stats["identical_to_generate"] == 2, key  # fp32: token-identical, no divergence at all
        assert stats["explained_divergences"] == stats["unexplained_divergences"] == 0, key
        assert stats["new_tokens"] > 0 and stats["tokens_per_second"] > 0
    assert report["summary"]["ar"]["mean_accepted_tokens"] == 1.0  # one token per forward, by construction
    assert [r["category"] for r in report["records"] if r["method"] == "generate"] == ["writing", "roleplay"]
    assert report["breakdown"]["ar"]["mean_tree_nodes"] == 1.0
    breakdown = report["breakdown"]["spec"]
    assert set(breakdown["stage_seconds"]) >= {"draft", "tree_build", "verify", "accept", "commit", "loop overhead"}
    assert sum(breakdown["stage_fraction"].values()) == pytest.approx(1.0)
    text = (out / "bench.md").read_text()
    assert "falcon_ext + lookup (10)" in text and "| 2 / 0 / 0 of 2 |" in text and "float32" in text
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_falcon_drafter_with_a_measured_tree_size(tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["bench", "--target", "stories260K", "--drafter", "falcon", "--tree-size", "16", "--methods", "generate,spec",
                     "--prompts", "mt-bench", "--num-prompts", "1", "--max-new-tokens", "24", "--threads", "1",
                     "--dtype", "float32", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["summary"]["spec"]["identical_to_generate"] == 1
    assert report["breakdown"]["spec"]["mean_tree_nodes"] > 10  # the shipped CPU tree has 10 nodes; this one 16 + root
    assert "falcon_ext + falcon (16-node tree)" in (out / "bench.md").read_text()
    with pytest.raises(ValueError, match="tree-size"):
        cli.main(["bench", "--drafter", "lookup", "--tree-size", "4", "--methods", "spec", "--out", str(out)])


def test_bench_rejects_unknown_method():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--methods", "generate,warp"])


def test_root_only_drafter_is_plain_decoding(stories):
    model, tokenizer = stories
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    out = speculative_generate(model, bench.RootOnlyDrafter(), ids, max_new_tokens=20, eos_token_id=[1, 2])
    ref = greedy_reference(model, ids, 20, [1, 2])
    assert torch.equal(out.sequences, ref)
    assert set(out.tree_sizes) == {1}


def test_select_round_robin_over_categories():
    items = [prompts.Prompt(c, f"{c}{i}") for c in "aab" for i in range(3)]  # a: 6 prompts, b: 3
    assert [p.text for p in prompts.select(items, 4)] == ["a0", "b0", "a1", "b1"]
    assert len(prompts.select(items, 100)) == len(items)
    with pytest.raises(ValueError):
        prompts.select(items, 0)


def test_named_sets():
    mt = prompts.load_prompt_set("mt-bench")
    assert len(mt) == 80 and {p.category for p in mt} == set(prompts.MT_BENCH_CATEGORIES)
    spec = prompts.load_prompt_set("spec-bench")
    assert len(spec) == 480 and {p.category for p in spec} == set(prompts.SPEC_BENCH_CATEGORIES)
    assert len(prompts.load_prompt_set("spec-bench:rag")) == 80
    assert len(prompts.load_prompt_set("gsm8k")) == 100
    with pytest.raises(ValueError, match="no prompt set"):
        prompts.load_prompt_set("nonexistent-set")
    with pytest.raises(ValueError, match="category"):
        prompts.load_prompt_set("spec-bench:poetry")


def test_prompt_files(tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"turns": ["first", "second"], "category": "x"}\n\n{"question": "q"}\n')
    assert prompts.load_prompt_file(jsonl) == [prompts.Prompt("x", "first"), prompts.Prompt("mine", "q")]
    lines = tmp_path / "lines.txt"
    lines.write_text("one\n\n two \n")
    assert [p.text for p in prompts.load_prompt_file(lines)] == ["one", "two"]
    docs = tmp_path / "docs.txt"
    docs.write_text("a story\nwith lines<|endoftext|>another")
    assert [p.text for p in prompts.load_prompt_file(docs)] == ["a story\nwith lines", "another"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "no prompt"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        prompts.load_prompt_file(bad)


def test_encode_cuts_from_the_start_keeping_bos(stories):
    _, tokenizer = stories
    text = "Once upon a time there was a very long story about a cat and a dog."
    full, cut = prompts.encode(tokenizer, text, chat_template=False, max_tokens=None)
    assert not cut and int(full[0, 0]) == tokenizer.bos_token_id
    short, cut = prompts.encode(tokenizer, text, chat_template=False, max_tokens=6)
    assert cut and short.shape == (1, 6)
    assert short[0].tolist() == full[0, :1].tolist() + full[0, -5:].tolist()


def test_chat_template_on_needs_a_template(tmp_path):
    with pytest.raises(ValueError, match="no chat template"):
        cli.main(["bench", "--chat-template", "on", "--num-prompts", "1", "--out", str(tmp_path), "--no-progress"])


def test_demo_prints_speedup_and_identity(capsys):
    from falcon_ext import cli

    assert cli.main(["demo", "--repeats", "1", "--max-new-tokens", "24", "--dtype", "float32"]) == 0  # 0: identical
    printed = capsys.readouterr().out
    assert "identical to model.generate: True" in printed and "speedup over plain decoding:" in printed
    accepted = float(printed.split("mean accepted tokens per target forward:")[1].split()[0])
    assert accepted > 1.5  # the shipped drafter is trained: well above plain decoding's 1.0


def test_every_command_reads_a_prompt_file_alike(tmp_path, stories):
    """One reader and encoder: bench, eval-drafter / tune-tree (encode_sources) and prepare-data
    take the same prompts, the same ids, from a 2-line text file and a multi-turn JSONL file."""
    model, tokenizer = stories
    lines = tmp_path / "two.txt"
    lines.write_text("Once upon a time\nThe cat sat on the mat\n")
    turns = tmp_path / "turns.jsonl"
    turns.write_text('{"turns": ["Once upon a time", "and then?"]}\n{"turns": ["The cat sat on the mat"]}\n')
    for source in (lines, turns):
        expected = prompts.encode_sources(tokenizer, [str(source)])
        assert expected == [tokenizer("Once upon a time").input_ids, tokenizer("The cat sat on the mat").input_ids]
        args = argparse.Namespace(prompts=str(source), num_prompts=16, chat_template="auto", max_prompt_tokens=0,
                                  max_new_tokens=8)
        assert [ids[0].tolist() for ids in bench.bench_inputs(args, model, tokenizer)[1]] == expected
        items, _ = fdata._work_items(tokenizer, fdata.DataConfig("stories260K", "self_distill", [str(source)]))
        assert [item.ids for item in items] == expected
