"""falcon-ext bench --batch-size: every method decodes the prompts B at a time, each row still
compared with transformers' generate, and --tree-size auto shrinks a Falcon drafter's tree as B
grows (tree_tuning.tree_size_for_batch, checked on a measurement whose answer is known)."""
import argparse
import json

import pytest

from falcon_ext import cli
from falcon_ext.evaluation import bench
from falcon_ext.evaluation.tree_tuning import tree_size_for_batch

COMMON = ["--target", "stories260K", "--prompts", "mt-bench", "--max-new-tokens", "16", "--threads", "1",
          "--dtype", "float32", "--no-progress"]


def test_bench_batch_size_end_to_end(tmp_path, stories):
    out = tmp_path / "out"
    assert cli.main(["bench", "--batch-size", "3", "--num-prompts", "5", "--lookup-branches", "2",
                     "--out", str(out), *COMMON]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert set(report["summary"]) == {"generate", "ar", "spec"}  # transformers' batch-1-only methods skipped
    assert set(report["skipped"]) == {"pld", "assisted"}
    for key, stats in report["summary"].items():
        assert stats["prompts"] == 5  # batches of 3 and 2: every prompt has its record
        assert stats["identical_to_generate"] == 5, key  # each row equals generate's row of the same batch
        assert stats["new_tokens"] > 0 and stats["tokens_per_second"] > 0
    assert report["summary"]["ar"]["mean_accepted_tokens"] == 1.0  # per row and step, not per batch forward
    assert report["breakdown"]["ar"]["mean_tree_nodes"] == 1.0
    # Independent of the bench's own generate: each prompt decoded alone by transformers.
    model, tokenizer = stories
    args = argparse.Namespace(prompts="mt-bench", num_prompts=5, chat_template="auto", max_prompt_tokens=0,
                              max_new_tokens=16)
    _, ids_list, _ = bench.bench_inputs(args, model, tokenizer)
    spec = {r["prompt"]: r["tokens"] for r in report["records"] if r["method"] == "spec"}
    for i, ids in enumerate(ids_list):
        alone = model.generate(ids, do_sample=False, max_new_tokens=16, eos_token_id=[1, 2], pad_token_id=0,
                               temperature=None, top_k=None, top_p=None)
        assert spec[i] == alone[0, ids.shape[1]:].tolist(), i
    text = (out / "bench.md").read_text()
    assert "batches of 3" in text and "pld: skipped" in text


def test_bench_tree_size_auto_shrinks_the_tree_for_a_batch(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["bench", "--drafter", "falcon", "--tree-size", "auto", "--batch-size", "4", "--num-prompts", "4",
                     "--methods", "generate,spec", "--out", str(out), *COMMON]) == 0
    report = json.loads((out / "bench.json").read_text())
    size = tree_size_for_batch(bench.drafter_dir("stories260K"), 4)
    assert size < tree_size_for_batch(bench.drafter_dir("stories260K"), 1)
    assert f"auto: {size}-node tree for batch 4" in report["methods"]["spec"]
    assert report["summary"]["spec"]["identical_to_generate"] == 4
    assert report["breakdown"]["spec"]["mean_tree_nodes"] <= size + 1


def test_tree_size_for_batch_reads_the_verify_cost_curve(tmp_path):
    """Verifying M tokens costs 1 up to M = 4, then 0.25 per token (compute-bound). Per row and
    step the trees of N = 0, 1, 3, 7 nodes give 1, 1.8, 2.4, 2.8 tokens. At B = 1 the 3-node tree
    is fastest (2.4 tokens per unit); at B = 2 its 8 tokens cost 2 (4.8 / 2 < 3.6 / 1 for N = 1);
    at B = 8 even N = 1's 16 tokens cost 4 (14.4 / 4 < 8 / 2 for N = 0)."""
    options = [{"size": n, "expected_tokens": t, "draft_seconds": 0.0, "verify_seconds": v}
               for n, t, v in ((0, 1.0, 1.0), (1, 1.8, 1.0), (3, 2.4, 1.0), (7, 2.8, 2.0))]
    (tmp_path / "cdt_measurement.json").write_text(json.dumps({"options": options}))
    assert [tree_size_for_batch(tmp_path, b) for b in (1, 2, 8)] == [3, 1, 0]
    # the shipped drafter's own choice at batch 1 is what tune-tree chose
    chosen = json.loads((bench.drafter_dir("stories260K") / "cdt_measurement.json").read_text())["chosen"]["size"]
    assert tree_size_for_batch(bench.drafter_dir("stories260K"), 1) == chosen
    with pytest.raises(ValueError, match="batch must be a positive int"):
        tree_size_for_batch(tmp_path, 0)
    with pytest.raises(FileNotFoundError, match="tune-tree"):
        tree_size_for_batch(tmp_path / "missing", 2)


def test_bench_rejects_bad_batch_and_tree_size(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--tree-size", "big"])
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        cli.main(["bench", "--batch-size", "0", "--num-prompts", "1", "--methods", "generate", "--out",
                  str(tmp_path), *COMMON])


def test_batched_divergences_are_classified_against_the_prompt_alone(stories):
    """A batched bf16 row may differ from its prompt decoded alone; classify can only reproduce
    generate on the prompt alone, so a batched run passes that as the reference for every method."""
    model, tokenizer = stories
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    alone = model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0,
                           temperature=None, top_k=None, top_p=None)[0, ids.shape[1]:].tolist()
    batched_row = alone[:3] + [(alone[3] + 1) % model.config.vocab_size] + alone[4:]  # as if rounding had split
    records = [dict(prompt=0, method="generate", tokens=batched_row, accept_lengths=None, same_as_generate=True),
               dict(prompt=0, method="spec", tokens=list(alone), accept_lengths=[1] * 8, same_as_generate=False)]
    with pytest.raises(ValueError, match="does not reproduce"):  # the batched row as reference: not reproducible
        bench.classify_divergences(model, [dict(r) for r in records], [ids])
    bench.classify_divergences(model, records, [ids], reference={0: alone})
    assert [r["same_as_generate"] for r in records] == [False, True]
    assert records[0]["divergence"]["position"] == 3 and "divergence" not in records[1]
