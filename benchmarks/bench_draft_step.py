"""Draft-step cost: the fused falcon_draft_step op vs the drafter's plain-PyTorch block forward.

Run: PYTHONPATH=. python -m pytest benchmarks/bench_draft_step.py --benchmark-only -q
(add -k "576" for the quick subset). On CPU each case runs in float32, in bfloat16 and in
bfloat16 with int8 matrices (``FalconDrafter.set_weight_format("int8")``); on CUDA in bfloat16.
Each case times the op and the plain reference
interleaved in one run (median of ROUNDS each) and reports their ratio, the drafter's weight
bytes, the bytes one step must stream (the recurrent matrices once per position; the LM head
is a separate cost) and the achieved bandwidth against this machine's copy bandwidth,
measured in the same session.
CPU runs use FALCON_BENCH_THREADS intra-op threads (default 1: on a small shared machine extra
BLAS threads mostly spin against other load; set it to the core count on a quiet machine).
"""
import os
import statistics
import time

import pytest
import torch
from torch import nn

from falcon_ext.drafters.falcon import FalconDrafter, FalconDrafterConfig

ROUNDS = 7
CONTEXT = 256  # settled context positions in the drafter's KV cache
CASES = [("cpu", "float32"), ("cpu", "bfloat16"), ("cpu", "int8")] + (
    [("cuda", "bfloat16")] if torch.cuda.is_available() else [])


class ShapeOnlyTarget(nn.Module):
    """Embedding + LM head of a target of width H (random: the step's cost does not depend on values)."""

    def __init__(self, hidden, vocab=1024):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, hidden), nn.Linear(hidden, vocab, bias=False)

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.head


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, rounds=ROUNDS):
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.fixture(scope="module")
def report(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FALCON_BENCH_THREADS", "1")))
    rows = {}
    yield rows
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        write_report(tr, rows)
    torch.set_num_threads(threads)


def write_report(tr, rows):
    for device, bandwidth in sorted({(r["device"], r["copy_GBps"]) for r in rows.values()}):
        tr.write_line(f"\nfalcon_draft_step on {device} (B=1, S={CONTEXT}, {torch.get_num_threads()} CPU threads; "
                      f"copy bandwidth {bandwidth:.1f} GB/s)")
        tr.write_line(f"{'H':>5} {'k':>2} {'weights':>9} {'weights MB':>10} {'read MB':>8} {'plain ms':>9} "
                      f"{'fused ms':>9} {'ratio':>6} {'fused GB/s':>10}")
        for r in rows.values():
            if r["device"] == device:
                tr.write_line(f"{r['H']:>5} {r['k']:>2} {r['format']:>9} {r['weight_MB']:>10.1f} {r['read_MB']:>8.1f} "
                              f"{r['plain_ms']:>9.3f} {r['fused_ms']:>9.3f} {r['ratio']:>5.2f}x {r['fused_GBps']:>10.1f}")


_bandwidth = {}


def copy_bandwidth(device):
    """GB/s of a 256 MB device-to-device copy (read + write counted)."""
    if device not in _bandwidth:
        src = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=device).fill_(1)
        dst = torch.empty_like(src)
        dst.copy_(src)
        seconds = median_seconds(lambda: dst.copy_(src), device, rounds=5)
        _bandwidth[device] = 2 * src.numel() * 4 / seconds / 1e9
    return _bandwidth[device]


@pytest.mark.benchmark(group="falcon_draft_step")
@pytest.mark.parametrize("device,fmt", CASES, ids=[f"{d}-{f}" for d, f in CASES])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("H", [576, 4096])
def test_draft_step(benchmark, report, H, k, device, fmt):
    dtype = torch.float32 if fmt == "float32" else torch.bfloat16
    torch.manual_seed(0)
    target = ShapeOnlyTarget(H).to(device, dtype)
    drafter = FalconDrafter(FalconDrafterConfig.for_target(target, k=k, dtype=str(dtype).split(".")[1]), target)
    drafter.set_weight_format("int8" if fmt == "int8" else "float")
    x = torch.randn(1, k, 2 * H, device=device, dtype=dtype)
    state = drafter.zero_state(1)
    ctx_k = torch.randn(CONTEXT, H, device=device, dtype=dtype)
    ctx_v = torch.randn_like(ctx_k)
    br = torch.empty(1, 0, H, device=device, dtype=dtype)
    args = (x, state, ctx_k, ctx_v, br, br)

    def fused():
        drafter.use_fused = True
        return drafter.draft_step(*args)

    def plain():
        drafter.use_fused = False
        return drafter.draft_step(*args)

    with torch.no_grad():
        torch.testing.assert_close(fused()[0].float(), plain()[0].float(), rtol=5e-2, atol=5e-2)  # same computation
        plain_s, fused_s = [], []
        for _ in range(3):  # interleave, so both see the same machine load
            plain_s.append(median_seconds(plain, device))
            fused_s.append(median_seconds(fused, device))
        plain_t, fused_t = min(plain_s), min(fused_s)
        benchmark.pedantic(lambda: (fused(), sync(device)), rounds=ROUNDS, warmup_rounds=1)
    weight_bytes = drafter.weight_bytes()
    # The recurrence is sequential: each of the k steps reads both w_hh matrices again (B = 1
    # cannot batch them), so a step streams k - 1 extra copies of them unless they stay in cache.
    recurrent = drafter.lstm.weight_hh_l0.numel() + drafter.lstm.weight_hh_l1.numel()
    read_bytes = weight_bytes + (k - 1) * recurrent * (1 if fmt == "int8" else dtype.itemsize)
    row = {"device": device, "H": H, "k": k, "format": fmt, "weight_MB": weight_bytes / 1e6,
           "read_MB": read_bytes / 1e6, "plain_ms": plain_t * 1e3, "fused_ms": fused_t * 1e3,
           "ratio": plain_t / fused_t, "fused_GBps": read_bytes / fused_t / 1e9, "copy_GBps": copy_bandwidth(device)}
    benchmark.extra_info.update(row)
    report[(device, fmt, H, k)] = row
