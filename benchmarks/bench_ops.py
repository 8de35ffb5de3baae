"""Tree ops vs their plain-PyTorch composition: tree_build, tree_verify_greedy, tree_verify_sample, kv_compact_.

Run: PYTHONPATH=. python -m pytest benchmarks/bench_ops.py --benchmark-only -q
(add -k tree_build, -k greedy, ... for one op). Each case first checks that the op and the
plain version return identical results (so the two cannot be doing different work), then times
both interleaved in one run (the lower of REPEATS medians of ROUNDS calls each, as
bench_draft_step.py does) and reports their ratio plain / op, the bytes each reads or moves and
the rate, next to this machine's copy bandwidth measured in the same session. A table of all
cases is printed at the end; the same numbers are in --benchmark-json under extra_info.

The plain versions are what a user would write without the ops: vectorised tensor code with
no Python loop over nodes or vocabulary (only sampling loops over the accepted depth, since
each level depends on the last).
CPU runs use FALCON_BENCH_THREADS intra-op threads (default 1, see bench_draft_step.py).
"""
import os

import pytest
import torch
from bench_draft_step import DEVICES, copy_bandwidth, median_seconds, sync

from falcon_ext import ops
from falcon_ext.engine.references import greedy_inputs

ROUNDS = 15  # calls per median: most cases take microseconds, so more rounds cost little
REPEATS = 3  # interleaved medians per implementation
NODES = [16, 32, 80]
VOCABS = [512, 49152, 128256]
PREFIX = 300  # cached tokens before the tree
TREE_SHAPE = "wide"  # a few children per node over a few levels, as draft trees are
SAMPLE_TEMPERATURE = 0.25  # sharpens greedy_inputs' logits so that sampling accepts most of the forced path
# (layers, KV heads, head dim) of the caches compacted: SmolLM2-135M and a Llama-3-8B-like 4096-wide model.
KV_SHAPES = {"smollm2-135m": (30, 3, 64), "4096-wide": (32, 8, 128)}
VERIFY_CASES = [(n, vocab, device) for n in NODES for vocab in VOCABS for device in DEVICES]


def float_dtype(device):
    # What the engine sees: fp32 models on CPU, bf16 ones on GPU.
    return torch.float32 if device == "cpu" else torch.bfloat16


@pytest.fixture(scope="module")
def rows(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FALCON_BENCH_THREADS", "1")))
    collected = []
    yield collected
    lines = table(collected, torch.get_num_threads())
    torch.set_num_threads(threads)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


def table(collected, threads):
    lines = []
    for device in sorted({r["device"] for r in collected}):
        mine = [r for r in collected if r["device"] == device]
        lines += [f"\ntree ops on {device} ({threads} CPU threads; copy bandwidth "
                  f"{mine[0]['copy_GBps']:.1f} GB/s); plain / op = ratio",
                  f"{'op':<20} {'case':<36} {'op us':>10} {'plain us':>10} {'ratio':>7} {'op MB':>8} {'op GB/s':>8} "
                  f"{'plain MB':>8} {'plain GB/s':>10}"]
        lines += [f"{r['op']:<20} {r['case']:<36} {r['op_us']:>10.1f} {r['plain_us']:>10.1f} {r['ratio']:>6.2f}x "
                  f"{r['op_MB']:>8.3f} {r['op_GBps']:>8.2f} {r['plain_MB']:>8.3f} {r['plain_GBps']:>10.2f}"
                  for r in mine]
    return lines


def assert_identical(got, want):
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.cpu(), w.cpu())


def compare(benchmark, rows, *, device, op_name, case, op, plain, op_bytes, plain_bytes):
    """Checks that op() and plain() agree (the first calls also warm both up), times them
    interleaved, gives pytest-benchmark the op's own timing and records the row."""
    with torch.no_grad():
        assert_identical(op(), plain())
        op_s, plain_s = [], []
        for _ in range(REPEATS):  # interleave, so both see the same machine load
            op_s.append(median_seconds(op, device, ROUNDS))
            plain_s.append(median_seconds(plain, device, ROUNDS))
        op_t, plain_t = min(op_s), min(plain_s)
        benchmark.pedantic(lambda: (op(), sync(device)), rounds=ROUNDS, warmup_rounds=1)
    row = {"op": op_name, "device": device, "case": case, "op_us": op_t * 1e6, "plain_us": plain_t * 1e6,
           "ratio": plain_t / op_t, "op_MB": op_bytes / 1e6, "op_GBps": op_bytes / op_t / 1e9,
           "plain_MB": plain_bytes / 1e6, "plain_GBps": plain_bytes / plain_t / 1e9,
           "copy_GBps": copy_bandwidth(device)}
    benchmark.extra_info.update(row)
    rows.append(row)


def wide_tree(n, vocab, device, seed=0):
    """(logits, tokens, parents) on device; greedy verification accepts a root path of a few nodes."""
    logits, tokens, parents = greedy_inputs(n, vocab, TREE_SHAPE, torch.float32, seed)
    return logits.to(device, float_dtype(device)), tokens.to(device), parents.to(device)


# ---------------------------------------------------------------- tree_build


def plain_tree_build(parents, prefix_len, dtype):
    """Ancestor matrix by repeated squaring of (I + parent adjacency): log2(N) small matmuls, no
    host sync; then mask, depths and retrieve paths from it."""
    n, device = parents.numel(), parents.device
    reach = torch.eye(n, device=device)
    reach[torch.arange(1, n, device=device), parents[1:]] = 1
    for _ in range((n - 1).bit_length()):  # after k squarings reach covers paths of up to 2^k edges
        reach = (reach @ reach).clamp_(max=1)
    visible = reach.bool()
    depth = visible.sum(dim=1) - 1
    mask = torch.zeros(n, prefix_len + n, dtype=dtype, device=device)
    mask[:, prefix_len:].masked_fill_(~visible, float("-inf"))
    is_leaf = torch.ones(n, dtype=torch.bool, device=device)
    is_leaf[parents[1:]] = False
    leaf_rows = visible[is_leaf]
    paths = torch.full((leaf_rows.shape[0], int(depth.max()) + 1), -1, dtype=torch.int64, device=device)
    row, node = leaf_rows.nonzero(as_tuple=True)  # ancestors of each leaf, one per depth
    paths[row, depth[node]] = node
    return mask, prefix_len + depth, paths


@pytest.mark.benchmark(group="tree_build")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", NODES)
def test_tree_build(benchmark, rows, n, device):
    _, _, parents = wide_tree(n, 512, device)
    dtype = float_dtype(device)
    mask_bytes = n * (PREFIX + n) * torch.finfo(dtype).bits // 8  # written by both
    compare(benchmark, rows, device=device, op_name="tree_build", case=f"N={n} P={PREFIX}",
            op=lambda: ops.tree_build(parents, PREFIX, dtype), plain=lambda: plain_tree_build(parents, PREFIX, dtype),
            op_bytes=mask_bytes, plain_bytes=mask_bytes)


# ---------------------------------------------------------------- tree_verify_greedy


def plain_verify_greedy(logits, tokens, paths):
    """EAGLE-style, over the retrieve paths tree_build gives: the target's argmax at every node,
    compared with each path's draft tokens; the longest matching prefix wins. No host sync."""
    n = tokens.numel()
    target = logits.argmax(dim=-1)  # first maximum on ties, as the op
    valid = paths[:, 1:] >= 0
    drafted = tokens[paths[:, 1:].clamp(min=0)]
    predicted = target[paths[:, :-1].clamp(min=0)]
    accepted = 1 + ((drafted == predicted) & valid).long().cumprod(dim=1).sum(dim=1)
    count, best = accepted.max(dim=0)
    row = paths[best]
    path = torch.full((n,), -1, dtype=torch.int64, device=tokens.device)
    path[: row.numel()] = torch.where(torch.arange(row.numel(), device=row.device) < count, row, -1)
    return path, torch.stack([count, target[row[count - 1]]])


@pytest.mark.benchmark(group="tree_verify_greedy")
@pytest.mark.parametrize("n, vocab, device", VERIFY_CASES)
def test_tree_verify_greedy(benchmark, rows, n, vocab, device):
    logits, tokens, parents = wide_tree(n, vocab, device)
    paths = ops.tree_build(parents, 0)[2]  # the engine has them from building the tree
    accepted = int(ops.tree_verify_greedy(logits, tokens, parents)[1][0])
    row_bytes = vocab * logits.element_size()
    # The op reads the logits rows of the accepted nodes only; argmax over all of them reads every row.
    compare(benchmark, rows, device=device, op_name="tree_verify_greedy", case=f"N={n} V={vocab} acc={accepted}",
            op=lambda: ops.tree_verify_greedy(logits, tokens, parents),
            plain=lambda: plain_verify_greedy(logits, tokens, paths),
            op_bytes=accepted * row_bytes, plain_bytes=n * row_bytes)


# ---------------------------------------------------------------- tree_verify_sample


def plain_verify_sample(probs, tokens, parents, uniforms):
    """The rejection rule of ops.tree_verify_sample, one tensor step per accepted level: at the
    current node the children's acceptance tests are vectorised (each child's residual sum is
    the total minus the weights of the siblings rejected before it), and the first passing child
    is taken; if none passes, the last token comes from the residual by inverse CDF."""
    n = parents.numel()
    path = [0]
    while True:
        weights = probs[path[-1]].float().clamp(min=0)
        children = (parents == path[-1]).nonzero().flatten()
        child_tokens = tokens[children]
        w = weights[child_tokens]
        residual_sums = weights.sum() - (w.cumsum(0) - w)
        passed = (uniforms[children] * residual_sums < w).nonzero()
        if passed.numel() == 0:
            break
        path.append(int(children[passed[0, 0]]))
    residual = weights.index_fill(0, child_tokens, 0)
    cdf = residual.cumsum(0)
    if cdf[-1] > 0:
        next_token = torch.searchsorted(cdf, uniforms[n] * cdf[-1], right=True).clamp_(max=cdf.numel() - 1)
    else:
        next_token = weights.argmax()
    path_out = torch.full((n,), -1, dtype=torch.int64, device=tokens.device)
    path_out[: len(path)] = torch.tensor(path, device=tokens.device)
    return path_out, torch.stack([torch.tensor(len(path), device=tokens.device), next_token.reshape(())])


@pytest.mark.benchmark(group="tree_verify_sample")
@pytest.mark.parametrize("n, vocab, device", VERIFY_CASES)
def test_tree_verify_sample(benchmark, rows, n, vocab, device):
    logits, tokens, parents = wide_tree(n, vocab, device)
    probs = torch.softmax(logits.float() / SAMPLE_TEMPERATURE, dim=-1).to(logits.dtype)
    uniforms = torch.rand(n + 1, generator=torch.Generator().manual_seed(n + vocab)).to(device)
    accepted = int(ops.tree_verify_sample(probs, tokens, parents, uniforms)[1][0])
    visited_bytes = accepted * vocab * probs.element_size()  # both read the accepted nodes' rows only
    compare(benchmark, rows, device=device, op_name="tree_verify_sample", case=f"N={n} V={vocab} acc={accepted}",
            op=lambda: ops.tree_verify_sample(probs, tokens, parents, uniforms),
            plain=lambda: plain_verify_sample(probs, tokens, parents, uniforms),
            op_bytes=visited_bytes, plain_bytes=visited_bytes)


# ---------------------------------------------------------------- kv_compact_


def plain_kv_compact_(kv, path, dst_start):
    """Gather the path's entries with index_select and copy them back over each cache tensor."""
    source = path + dst_start
    for t in kv:
        t.narrow(2, dst_start, path.numel()).copy_(t.index_select(2, source))
    return kv


@pytest.mark.benchmark(group="kv_compact_")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", NODES)
@pytest.mark.parametrize("model", list(KV_SHAPES))
def test_kv_compact(benchmark, rows, model, n, device):
    layers, heads, head_dim = KV_SHAPES[model]
    logits, tokens, parents = wide_tree(n, 512, device)
    path_padded, result = ops.tree_verify_greedy(logits, tokens, parents)
    path = path_padded[: int(result[0])]  # an accepted path of this tree
    g = torch.Generator().manual_seed(n)
    cache = [torch.randn(1, heads, PREFIX + n, head_dim, generator=g).to(device, float_dtype(device))
             for _ in range(2 * layers)]  # keys and values of every layer, as the engine passes them
    op_kv, plain_kv = [t.clone() for t in cache], [t.clone() for t in cache]
    del cache
    # Entries that really move (path[j] != j), read once and written once; every call moves the same ones.
    moved = int((path != torch.arange(path.numel(), device=device)).sum())
    kv_bytes = 2 * moved * 2 * layers * heads * head_dim * op_kv[0].element_size()

    def op():
        ops.kv_compact_(op_kv, path, PREFIX)
        return op_kv

    compare(benchmark, rows, device=device, op_name="kv_compact_",
            case=f"{model} {2 * layers} tensors N={n} moved={moved}",
            op=op, plain=lambda: plain_kv_compact_(plain_kv, path, PREFIX), op_bytes=kv_bytes, plain_bytes=kv_bytes)


# ---------------------------------------------------------------- batched (docs/batched_ops.md)

BATCH = 4  # rows per batched case; row b's tree has n - 3b nodes, padded to n


def batched_trees(n, vocab, device):
    """(logits [B, n, V], tokens, parents [B, n]) of BATCH wide trees of different sizes, padded."""
    rows = [wide_tree(n - 3 * b, vocab, device, seed=b) for b in range(BATCH)]
    logits = torch.zeros(BATCH, n, vocab, dtype=rows[0][0].dtype, device=device)
    tokens = torch.zeros(BATCH, n, dtype=torch.int64, device=device)
    parents = torch.full((BATCH, n), -1, dtype=torch.int64, device=device)
    for b, (row_logits, row_tokens, row_parents) in enumerate(rows):
        size = row_tokens.numel()
        logits[b, :size], tokens[b, :size], parents[b, :size] = row_logits, row_tokens, row_parents
    return logits, tokens, parents, [n - 3 * b for b in range(BATCH)]


@pytest.mark.benchmark(group="tree_verify_greedy_batched")
@pytest.mark.parametrize("n, vocab, device", [(n, vocab, device) for n in NODES for vocab in VOCABS[:2]
                                              for device in DEVICES])
def test_tree_verify_greedy_batched(benchmark, rows, n, vocab, device):
    """The batched op against one batch-1 op call per row (what the engine would do without it)."""
    logits, tokens, parents, sizes = batched_trees(n, vocab, device)

    def per_row():
        outs = [ops.tree_verify_greedy(logits[b, :s], tokens[b, :s], parents[b, :s]) for b, s in enumerate(sizes)]
        path = torch.full((BATCH, n), -1, dtype=torch.int64, device=device)
        for b, (row_path, _) in enumerate(outs):
            path[b, : row_path.numel()] = row_path
        return path, torch.stack([r for _, r in outs])

    accepted = int(ops.tree_verify_greedy_batched(logits, tokens, parents)[1][:, 0].sum())
    row_bytes = vocab * logits.element_size()
    compare(benchmark, rows, device=device, op_name="greedy_batched", case=f"B={BATCH} N={n} V={vocab} acc={accepted}",
            op=lambda: ops.tree_verify_greedy_batched(logits, tokens, parents), plain=per_row,
            op_bytes=accepted * row_bytes, plain_bytes=accepted * row_bytes)


@pytest.mark.benchmark(group="kv_compact_batched_")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", NODES)
def test_kv_compact_batched(benchmark, rows, n, device):
    """Ragged compaction of BATCH rows (dst_starts PREFIX - 7b, the tree at PREFIX) against a
    per-row gather and copy."""
    layers, heads, head_dim = KV_SHAPES["smollm2-135m"]
    logits, tokens, parents, _ = batched_trees(n, 512, device)
    paths = ops.tree_verify_greedy_batched(logits, tokens, parents)[0]
    dst_starts = [PREFIX - 7 * b for b in range(BATCH)]
    g = torch.Generator().manual_seed(n)
    cache = [torch.randn(BATCH, heads, PREFIX + n, head_dim, generator=g).to(device, float_dtype(device))
             for _ in range(2 * layers)]
    op_kv, plain_kv = [t.clone() for t in cache], [t.clone() for t in cache]
    del cache
    row_paths = [row[row >= 0] for row in paths]
    # Entries that really move (dst_starts[b] + j != PREFIX + path[j]), read once and written once.
    moved = sum(int((torch.arange(path.numel(), device=device) + dst != path + PREFIX).sum())
                for path, dst in zip(row_paths, dst_starts))
    kv_bytes = 2 * moved * 2 * layers * heads * head_dim * op_kv[0].element_size()

    def op():
        ops.kv_compact_batched_(op_kv, paths, dst_starts, PREFIX)
        return op_kv

    def plain():
        for t in plain_kv:
            for b, path in enumerate(row_paths):
                t[b].narrow(1, dst_starts[b], path.numel()).copy_(t[b].index_select(1, path + PREFIX))
        return plain_kv

    compare(benchmark, rows, device=device, op_name="kv_compact_batched_",
            case=f"smollm2-135m B={BATCH} N={n} moved={moved}", op=op, plain=plain, op_bytes=kv_bytes,
            plain_bytes=kv_bytes)
