"""The bf16 path: the --dtype rule, trees per device and dtype, one prompt encoder for tuning and
evaluation, and low-precision greedy outputs measured against model.generate (every difference a
rounding near-tie of the target's own logits). References: transformers' generate and plain HF
forwards, the tokenizer's own chat template, and tables of the documented rules."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache

from falcon_ext import DraftTree, PromptLookupDrafter, cli, speculative_generate
from falcon_ext import prompts as prompts_mod
from falcon_ext.drafters.checkpoint import SHIPPED
from falcon_ext.drafters.falcon import FalconDrafter, pick_tree
from falcon_ext.evaluation import tree_tuning
from falcon_ext.evaluation.divergence import classify, rounding_tolerance
from falcon_ext.targets import EMBEDDED, choose_dtype, cpu_bf16_flags, load_target
from helpers import greedy_reference, tiny_model
from scripted_drafters import ScriptedDrafter

REPO = Path(__file__).resolve().parents[1]
STORY_PROMPTS = ["Once upon a time", "The cat sat on the mat. The dog", "Tom and Sue went to the park. They saw",
                 "Lily wanted to play with the ball. Lily wanted to", "One day a little bird", "Ben had a red car."]


# ---------------------------------------------------------------- the --dtype rule

@pytest.mark.parametrize("name,device,native,expected", [
    ("auto", "cpu", True, torch.bfloat16),
    ("auto", "cpu", False, torch.float32),
    ("auto", "cuda", True, torch.bfloat16),
    ("auto", "cuda", False, torch.float32),
    ("float32", "cpu", False, torch.float32),
    ("fp32", "cuda", True, torch.float32),
    ("bf16", "cpu", True, torch.bfloat16),
    ("float16", "cuda", True, torch.float16),
])
def test_dtype_rule(name, device, native, expected):
    choice = choose_dtype(name, device, bf16=(native, "the device"))
    assert choice.dtype == expected
    assert str(choice).startswith(f"dtype {str(expected).removeprefix('torch.')}: ")


@pytest.mark.parametrize("name,device,native,message", [
    ("bfloat16", "cpu", False, "no native bf16"),
    ("bf16", "cuda", False, "no native bf16"),
    ("float16", "cpu", True, "float16 is not supported on a CPU"),
    ("int8", "cpu", True, "dtype must be one of"),
])
def test_dtypes_the_device_cannot_run_are_refused(name, device, native, message):
    with pytest.raises(ValueError, match=message):
        choose_dtype(name, device, bf16=(native, "the device"))


def test_cpu_probe_reads_cpuinfo_flags():
    flags = set()
    if Path("/proc/cpuinfo").exists():
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
        flags = set(line.split(":", 1)[1].split())
    assert set(cpu_bf16_flags()) == flags & {"avx512_bf16", "amx_bf16"}
    expected = torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else torch.float32
    assert choose_dtype("auto", "cpu").dtype == expected


def test_commands_announce_and_refuse_dtypes(capsys):
    assert cli.main(["demo", "--repeats", "1", "--max-new-tokens", "8", "--drafter", "lookup", "--dtype", "float32"]) == 0
    assert capsys.readouterr().err.splitlines()[0] == "dtype float32: as requested"
    with pytest.raises(ValueError, match="float16 is not supported on a CPU"):
        cli.main(["demo", "--dtype", "float16"])
    with pytest.raises(ValueError, match="float16 is not supported on a CPU"):
        cli.main(["bench", "--dtype", "fp16", "--num-prompts", "1"])
    with pytest.raises(SystemExit):  # not a dtype name at all: argparse refuses it
        cli.main(["eval-drafter", "--target", "stories260K", "--drafter", "stories260K", "--prompts", "x",
                  "--dtype", "float64"])


# ---------------------------------------------------------------- trees per device and dtype

TREES = {"cpu-float32": [[0]], "cpu": [[0], [1]], "cpu-float16": [[0], [0, 0]], "cuda-bfloat16": [[0], [1], [2]]}


@pytest.mark.parametrize("device,dtype,trees,expected", [
    ("cpu", torch.float32, TREES, "cpu-float32"),  # exact key
    ("cpu", torch.bfloat16, TREES, "cpu"),  # same device: the legacy bare key first
    ("cpu", torch.bfloat16, {k: v for k, v in TREES.items() if k != "cpu"}, "cpu-float32"),  # then float32
    ("cpu", torch.bfloat16, {"cpu-float16": [], "cuda-bfloat16": []}, "cpu-float16"),
    ("cuda", torch.bfloat16, TREES, "cuda-bfloat16"),
    ("cuda", torch.float32, TREES, "cuda-bfloat16"),
    ("cuda", torch.float32, {"cpu-float32": []}, None),  # another device's tree never: config.tree
    ("cpu", torch.float32, {}, None),
])
def test_tree_fallback_rule(device, dtype, trees, expected):
    assert pick_tree(trees, device, dtype) == expected


def _drafter_copy(tmp_path, edit) -> Path:
    folder = tmp_path / "drafter"
    shutil.copytree(SHIPPED / "stories260K", folder)
    body = json.loads((folder / "config.json").read_text())
    edit(body)
    (folder / "config.json").write_text(json.dumps(body))
    return folder


def _paths(drafter) -> list[list[int]]:
    return [list(p) for p in drafter.plan.paths]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drafter_picks_its_tree_from_the_target_device_and_dtype(tmp_path, dtype):
    trees = {"cpu-float32": [[0]], "cpu-bfloat16": [[0], [0, 0]], "cuda-bfloat16": [[0], [1], [2]]}
    folder = _drafter_copy(tmp_path, lambda b: b.update(trees=trees, tree=[[1]]))
    model, _ = load_target("stories260K", dtype)
    drafter = FalconDrafter.from_pretrained(folder, target=model)
    assert _paths(drafter) == trees["cpu-" + str(dtype).removeprefix("torch.")]


def test_old_checkpoints_with_per_device_keys_keep_loading(tmp_path):
    """A checkpoint from before per-dtype keys ({"cpu": ...}) drafts with its CPU tree in any dtype."""
    folder = _drafter_copy(tmp_path, lambda b: b.update(trees={"cpu": [[0], [1], [0, 0]]}, tree=[[1]]))
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load_target("stories260K", dtype)
        assert _paths(FalconDrafter.from_pretrained(folder, target=model)) == [[0], [1], [0, 0]]


@pytest.mark.parametrize("key", ["gpu-float32", "cpu-int8", "cpu-bf16"])
def test_malformed_tree_keys_are_refused(tmp_path, key):
    folder = _drafter_copy(tmp_path, lambda b: b.update(trees={key: [[0]]}))
    model, _ = load_target("stories260K")
    with pytest.raises(ValueError, match="tree key"):
        FalconDrafter.from_pretrained(folder, target=model)


def test_shipped_configs_use_device_dtype_keys():
    for folder in SHIPPED.iterdir():
        if not folder.is_dir() or folder.name == "__pycache__":
            continue  # the drafters' code, beside their folders
        keys = json.loads((folder / "config.json").read_text())["trees"]
        assert keys and all("-" in k for k in keys), folder.name


def test_cdt_tune_writes_its_device_dtype_key_and_encodes_like_eval(tmp_path):
    folder = _drafter_copy(tmp_path, lambda b: None)
    before = json.loads((folder / "config.json").read_text())["trees"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [p, "a second turn"]}) + "\n" for p in STORY_PROMPTS[:2]))
    cli.main(["tune-tree", "--drafter", str(folder), "--target", "stories260K", "--prompts", str(prompts), "--dtype",
                   "bfloat16", "--max-new-tokens", "24", "--passes", "1"])
    trees = json.loads((folder / "config.json").read_text())["trees"]
    assert set(trees) == set(before) | {"cpu-bfloat16"} and trees["cpu-float32"] == before["cpu-float32"]
    report = json.loads((folder / "cdt_measurement.json").read_text())
    assert report["tree_key"] == "cpu-bfloat16" and report["dtype"] == "bfloat16"


def test_tuning_and_evaluation_share_the_chat_template_encoding(tmp_path, monkeypatch):
    """tree_tuning's prompts are eval-drafter's: a user turn through the tokenizer's own chat template."""
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED["stories260K"])
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in STORY_PROMPTS[:3]))
    expected = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"] for p in STORY_PROMPTS[:3]]
    assert prompts_mod.encode_sources(tokenizer, [str(prompts)]) == expected

    seen = {}
    model, _ = load_target("stories260K")
    monkeypatch.setattr("falcon_ext.targets.load_target", lambda *a, **k: (model, tokenizer))

    def stop(drafter, target, prompt_ids, **kwargs):
        seen["ids"] = [p.tolist() for p in prompt_ids]
        raise KeyboardInterrupt

    monkeypatch.setattr(tree_tuning, "measure_ranks", stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["tune-tree", "--drafter", str(_drafter_copy(tmp_path, lambda b: None)), "--target", "stories260K",
                       "--prompts", str(prompts), "--dtype", "float32"])
    assert seen["ids"] == expected


# ---------------------------------------------------------------- low-precision greedy outputs

class ReferenceChainDrafter:
    """Drafts generate's own continuation, a chain of up to ``length`` tokens, while the context
    follows it (root alone once it does not): long verify forwards, mostly accepted. Unlike
    tests/scripted_drafters it does not assert that the engine follows generate: in bf16 it may
    part from it at a near-tie."""

    needs_features = False

    def __init__(self, reference: list[int], length: int = 6):
        self.reference, self.length = reference, length

    def reset(self):
        self.context, self.next_token = [], None

    def extend(self, tokens, features, next_token):
        self.context += tokens.tolist()
        self.next_token = next_token

    def propose(self):
        seq = self.context + [self.next_token]
        chain = self.reference[len(seq):len(seq) + self.length] if seq == self.reference[:len(seq)] else []
        return DraftTree(torch.tensor([self.next_token] + chain), torch.tensor([-1] + list(range(len(chain)))))


def greedy(model, ids, max_new, eos):
    """generate's new tokens, as a list."""
    return greedy_reference(model, ids, max_new, eos)[0, ids.shape[1]:].tolist()


def divergences(model, cases, drafters, max_new, eos, fp32_lm_head=False):
    """(identical count, [Divergence]) of speculative_generate against generate over cases x drafters
    (each made from the prompt + generate's continuation)."""
    identical, found = 0, []
    for ids in cases:
        reference = greedy(model, ids, max_new, eos)
        for make in drafters:
            out = speculative_generate(model, make(ids[0].tolist() + reference), ids, max_new_tokens=max_new, eos_token_id=eos,
                                       fp32_lm_head=fp32_lm_head)
            d = classify(model, ids, reference, out.sequences[0, ids.shape[1]:].tolist(), out.accept_lengths)
            if d is None:
                identical += 1
            else:
                assert d.gap_one_token >= 0  # generate chose the larger logit of its own forward
                found.append(d)
    return identical, found


@pytest.fixture(scope="module")
def stories_bf16():
    return load_target("stories260K", torch.bfloat16)


@pytest.mark.parametrize("fp32_lm_head", [False, True])
def test_bf16_stories_divergences_are_all_rounding_near_ties(stories_bf16, fp32_lm_head):
    model, tokenizer = stories_bf16
    falcon = FalconDrafter.from_pretrained("stories260K", target=model, dtype=torch.bfloat16)
    cases = [tokenizer(p, return_tensors="pt").input_ids for p in STORY_PROMPTS]
    drafters = [lambda ref: PromptLookupDrafter(max_branches=3), lambda ref: falcon, ReferenceChainDrafter]
    identical, found = divergences(model, cases, drafters, 100, [1, 2], fp32_lm_head)
    assert identical + len(found) == len(cases) * len(drafters)
    assert [d for d in found if not d.explained] == []


def test_bf16_tiny_model_divergences_are_all_rounding_near_ties():
    model = tiny_model("llama", seed=3).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randint(1, model.config.vocab_size, (1, 4 + 7 * i), generator=gen) for i in range(5)]
    drafters = [ReferenceChainDrafter, lambda ref: PromptLookupDrafter(max_branches=3)]
    for fp32_lm_head in (False, True):
        identical, found = divergences(model, cases, drafters, 60, [], fp32_lm_head)
        assert identical + len(found) == len(cases) * len(drafters)
        assert [d for d in found if not d.explained] == []


def test_classifier_flags_a_token_the_target_did_not_choose(stories_bf16):
    """The check has power: an output that takes the runner-up where generate's winner led clearly
    (what a verification bug would emit) is unexplained."""
    model, tokenizer = stories_bf16
    ids = tokenizer(STORY_PROMPTS[0], return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=40, eos_token_id=[1, 2], pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, temperature=None, top_k=None, top_p=None)
    reference = out.sequences[0, ids.shape[1]:].tolist()
    top2 = torch.stack([row[0].float().topk(2).values for row in out.logits])
    position = int((top2[:, 0] - top2[:, 1]).argmax())  # the clearest decision of the output
    runner_up = int(out.logits[position][0].float().topk(2).indices[1])
    wrong = reference[:position] + [runner_up] + reference[position + 1:]
    d = classify(model, ids, reference, wrong)
    assert d.position == position and d.other_token == runner_up and not d.explained


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tolerance_covers_the_rounding_between_one_and_many_tokens_per_forward(stories_bf16, dtype):
    """At every position of a long output, the top-2 logit gap of generate's one-token forward and
    of a forward over 8 tokens at once differ by less than the documented tolerance."""
    model, tokenizer = load_target("stories260K", dtype) if dtype != torch.bfloat16 else stories_bf16
    ids = tokenizer(STORY_PROMPTS[2], return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=120, min_new_tokens=120, pad_token_id=0,
                         output_logits=True, output_hidden_states=True, return_dict_in_generate=True,
                         temperature=None, top_k=None, top_p=None)
    seq = out.sequences[0]
    cache, P = DynamicCache(), ids.shape[1]
    model(seq[None, :P], past_key_values=cache, use_cache=True)
    last = seq.numel() - 1  # the final token chooses nothing
    chunks = [model(seq[None, s:min(s + 8, last)], past_key_values=cache, use_cache=True).logits[0]
              for s in range(P, last, 8)]
    many = torch.cat(chunks)  # row j: the logits that choose new token j + 1
    for j in range(many.shape[0]):
        one = out.logits[j + 1][0]
        a, b = one.float().topk(2).indices.tolist()
        gap_one, gap_many = float(one[a] - one[b]), float(many[j, a] - many[j, b])
        tolerance = rounding_tolerance(model, out.hidden_states[j + 1][-1][0, -1], one, a, b)
        assert abs(gap_one - gap_many) <= tolerance, (j, gap_one, gap_many, tolerance)


def test_fp32_lm_head_in_fp32_is_token_identical(tiny):
    gen = torch.Generator().manual_seed(2)
    for trial in range(3):
        ids = torch.randint(1, tiny.config.vocab_size, (1, 3 + 5 * trial), generator=gen)
        reference = greedy(tiny, ids, 40, None)
        out = speculative_generate(tiny, ScriptedDrafter(ids[0].tolist() + reference, tiny.config.vocab_size,
                                                         "mixed", seed=trial), ids, max_new_tokens=40,
                                   eos_token_id=None, fp32_lm_head=True)
        assert out.sequences[0, ids.shape[1]:].tolist() == reference


def test_bench_bf16_reports_divergence_columns_for_engine_and_prompt_lookup(tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["bench", "--target", "stories260K", "--prompts", "mt-bench", "--num-prompts", "4", "--max-new-tokens",
                     "48", "--methods", "generate,spec,pld", "--dtype", "bfloat16", "--fp32-lm-head", "--threads", "1",
                     "--no-breakdown", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["dtype"] == "bfloat16" and report["environment"]["uptime"]
    for key in ("spec", "pld"):
        s = report["summary"][key]
        assert s["identical_to_generate"] + s["explained_divergences"] + s["unexplained_divergences"] == 4
        assert s["unexplained_divergences"] == 0
    for r in report["records"]:
        assert (r["same_as_generate"] is False) == ("divergence" in r)
    assert "falcon_ext + lookup (10) (fp32 LM head)" in report["methods"].values()
    assert "identical / explained / unexplained" in (out / "bench.md").read_text()


def test_benchmark_scripts_run_at_a_tiny_size():
    # No PYTHONPATH: the scripts import falcon_ext as a user's would, the installed package (the
    # source folder has no compiled _C in a fresh clone).
    run = dict(cwd=REPO, capture_output=True, text=True, timeout=600,
               env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    verify = subprocess.run([sys.executable, "benchmarks/verify_cost.py", "--target", "stories260K", "--threads", "1",
                             "--nodes", "1", "2", "--prefix", "8", "--rounds", "1"], **run)
    assert verify.returncode == 0, verify.stderr
    assert "uptime:" in verify.stdout and "torch " in verify.stdout and "commit" in verify.stdout
    assert "\nfloat32:" in verify.stdout and "| N | float32 |" in verify.stdout
    steps = subprocess.run([sys.executable, "benchmarks/step_vs_position.py", "--target", "stories260K", "--threads",
                            "1", "--positions", "8", "--nodes", "2", "--rounds", "1", "--max-new-tokens", "30",
                            "--bucket", "16", "--drafter", "lookup", "--dtype", "float32"], **run)
    assert steps.returncode == 0, steps.stderr
    assert "| model.generate | falcon_ext |" in steps.stdout and "| 8 |" in steps.stdout
    linear = subprocess.run([sys.executable, "benchmarks/bench_linear.py", "--threads", "1", "--repeats", "1"], **run)
    assert linear.returncode == 0, linear.stderr
    assert "| bfloat16 | 2304x1152 | 1 |" in linear.stdout and "| float16 | 8192x576 | 64 |" in linear.stdout
