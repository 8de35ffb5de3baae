"""Training under torchrun: 2 CPU processes with gloo against 1 process, on stories260K.

The 2-rank run is the 1-rank run up to the order of floating-point sums; it survives a rank that
dies (resume, bitwise equal to an uninterrupted 2-rank run); its checkpoint decodes losslessly;
a changed world size or a missing rendezvous is refused without touching the checkpoint; data
preparation over 2 ranks writes the single process's folder, byte for byte.
"""
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import greedy_reference
from safetensors.torch import load_file

from falcon_ext import speculative_generate
from falcon_ext.drafters.falcon import FalconDrafter
from falcon_ext.training import data as fdata
from falcon_ext.training import train as ftrain
from falcon_ext.training.distributed import World

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="this torch build has no torch.distributed with the gloo backend"),
]

STORY = ("Once upon a time there was a little cat named Tom. Tom liked to play in the sun. "
         "One day he saw a big red ball. He ran to it and played all day. He was very happy.")
STEPS, SAVE_EVERY = 40, 4
# Per-step logged losses of 2 ranks vs 1: the same numbers summed in another order (gradients
# all-reduced, losses split per rank), compounded over STEPS AdamW steps; measured about 2e-7.
LOSS_RTOL = 1e-5
# Final weights, largest difference relative to each tensor's largest entry; measured about 3e-6.
WEIGHT_RTOL = 1e-4
TIMEOUT = 600  # seconds per subprocess: the CI cores may be shared


def _env():
    """The children import the falcon_ext this process imports, one thread each."""
    import falcon_ext

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(falcon_ext.__file__).parents[1]), env.get("PYTHONPATH", "")])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(*args):
    # --standalone: a rendezvous on localhost at a free port. cwd must not be the repository root
    # (see tests/test_train.py::_train_cmd): the callers pass cwd=tmp_path.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "falcon_ext.cli", *args]


def _train_args(data, out):
    return ["train", "--target", "stories260K", "--data", str(data), "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "4", "--seq-len", "24", "--lr", "1e-3", "--save-every", str(SAVE_EVERY),
            "--log-every", "1", "--eval-sequences", "0", "--threads", "1", "--seed", "7", "--dist-timeout", "120"]


def _config(data, out, **changes):
    """The TrainConfig the CLI builds from _train_args."""
    return ftrain.TrainConfig("stories260K", [str(data)], str(out), steps=STEPS, batch_size=4, seq_len=24, lr=1e-3,
                              save_every=SAVE_EVERY, log_every=1, eval_sequences=0, threads=1, seed=7, **changes)


def _run(cmd, cwd):
    run = subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


def _assert_close_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        if a[name].is_floating_point():
            err = (a[name] - b[name]).abs().max() / a[name].abs().max().clamp(min=1e-12)
            assert err <= WEIGHT_RTOL, (name, float(err))
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.txt"
    path.write_text("<|endoftext|>".join([STORY] * 6))
    return path


def _data_config(docs, **changes):
    return fdata.DataConfig(target="stories260K", mode="teacher_forcing", sources=[str(docs)], shard_size=2,
                            batch_size=2, max_len=48, **changes)


@pytest.fixture(scope="module")
def data(tmp_path_factory, docs, stories):
    """6 shards of 2 sequences, by one process."""
    return fdata.prepare_data(*stories, _data_config(docs), tmp_path_factory.mktemp("data") / "d")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data, stories):
    """The same training by 1 process (in this one) and by 2 torchrun ranks."""
    root = tmp_path_factory.mktemp("runs")
    ftrain.train(_config(data, root / "one"), *stories)
    _run(_torchrun(*_train_args(data, root / "two")), cwd=root)
    return root / "one", root / "two"


# ---------------------------------------------------------------- the same run

def test_two_ranks_follow_the_one_rank_loss_curve(runs):
    one, two = (_log(out) for out in runs)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        # The global batch and its real tokens are the same whatever the split.
        assert a["tokens_seen"] == b["tokens_seen"], a["step"]
        for key in ("loss", "reg", "kl", "ce"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), (a["step"], key)
    assert one[-1]["loss"] < one[0]["loss"]  # it trained
    _assert_close_weights(_weights(runs[0]), _weights(runs[1]))
    # Only rank 0 wrote: one log line per step, one final folder, world size recorded.
    assert json.loads((runs[1] / "final" / "training.json").read_text())["world_size"] == 2


def test_checkpoint_of_rank_0_decodes_losslessly(runs, stories):
    model, tokenizer = stories
    drafter = FalconDrafter.from_pretrained(runs[1] / "final", target=model)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    ref = greedy_reference(model, ids, 40, [1, 2])
    out = speculative_generate(model, drafter, ids, max_new_tokens=40, eos_token_id=[1, 2])
    assert torch.equal(out.sequences, ref)


# ---------------------------------------------------------------- failures

def _rank_pid(launcher: int, rank: int) -> int | None:
    """A torchrun worker's pid: the launcher's child whose environment has RANK=<rank>."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = b"\0" + (stat.parent / "environ").read_bytes()
        except (OSError, ValueError, IndexError):  # the process ended, or is not ours
            continue
        if ppid == launcher and f"\0RANK={rank}\0".encode() in environ:
            return int(stat.parent.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_rank_death_keeps_the_checkpoint_and_the_run_resumes(runs, data, stories, tmp_path):
    out = tmp_path / "killed"
    log = tmp_path / "torchrun.log"  # a file, not a pipe: a full pipe would stall rank 0
    launcher = subprocess.Popen(_torchrun(*_train_args(data, out)), env=_env(), cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=log.open("w"))
    latest, victim = out / "latest.json", None
    deadline = time.time() + TIMEOUT
    while not (victim and latest.exists()) and launcher.poll() is None and time.time() < deadline:
        victim = victim or _rank_pid(launcher.pid, 1)
        time.sleep(0.02)
    assert victim, "rank 1 was not found"
    os.kill(victim, signal.SIGKILL)
    launcher.wait(timeout=TIMEOUT)
    assert launcher.returncode != 0 and "falcon_ext.cli" in log.read_text()  # torchrun names the failed worker
    step = json.loads(latest.read_text())["step"]
    assert 0 < step < STEPS, "rank 1 must die between the first checkpoint and the end"
    assert not (out / "final").exists()

    # Another world size is refused unless asked for, and leaves the checkpoint as it was.
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="--resize-world"):
        ftrain.train(_config(data, out), *stories)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # Asked for, one process continues the 2-rank run: the same run up to the order of sums.
    # (On a copy at the same path: --out is part of the configuration a resume must keep.)
    shutil.copytree(out, tmp_path / "as_killed")
    ftrain.train(_config(data, out, resize_world=True), *stories)
    _assert_close_weights(_weights(runs[1]), _weights(out))
    shutil.rmtree(out)
    (tmp_path / "as_killed").rename(out)

    # The same command under torchrun resumes: bitwise the uninterrupted 2-rank run.
    _run(_torchrun(*_train_args(data, out)), cwd=tmp_path)
    a, b = _weights(runs[1]), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert _log(out)[-1]["step"] == STEPS


def test_missing_rendezvous_fails_clearly_and_keeps_the_checkpoint(runs, data, tmp_path):
    out = tmp_path / "two"
    shutil.copytree(runs[1], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Rank 0 of 2 whose peer never comes.
    env = dict(_env(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = _train_args(data, out)
    args[args.index("--dist-timeout") + 1] = "3"
    run = subprocess.run([sys.executable, "-m", "falcon_ext.cli", *args], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode != 0 and "rank 0 of 2 could not join the gloo process group" in run.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_global_batch_must_split_evenly_over_the_ranks(data, stories, tmp_path):
    assert World(rank=1, size=2).share(4) == slice(2, 4)
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        ftrain.train(_config(data, tmp_path / "x"), *stories, world=World(rank=0, size=3))
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- data preparation

def test_prepare_data_over_two_ranks_writes_the_single_process_folder(docs, stories, tmp_path):
    # A budget that the third shard reaches: rank 1 builds the fourth beside it and drops it.
    config = _data_config(docs, max_tokens=120)
    one = fdata.prepare_data(*stories, config, tmp_path / "one")
    two = tmp_path / "two"
    _run(_torchrun("prepare-data", "--target", "stories260K", "--mode", "teacher_forcing", "--data", str(docs),
                   "--shard-size", "2", "--batch-size", "2", "--max-len", "48", "--max-tokens", "120",
                   "--out", str(two), "--threads", "1"), cwd=tmp_path)
    names = sorted(p.name for p in one.iterdir())
    assert names == ["data.json"] + [f"shard_0000{i}.safetensors" for i in range(3)]
    assert sorted(p.name for p in two.iterdir()) == names
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert json.loads((two / "data.json").read_text())["num_shards"] == 3
    assert dataclasses.asdict(config) == json.loads((two / "data.json").read_text())["config"]
