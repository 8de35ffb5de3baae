"""What a target forward over N tokens costs next to one token, in fp32 and bf16: the bound on any speculative speedup.

Speculative decoding pays off only while verifying a tree of N tokens costs little more than
one forward. For each dtype and N, the target's forward over N tokens after a PREFIX-token KV
cache (the engine's tree mask and position ids, as in a verify step) is timed ROUNDS times; the
median is printed with its ratio to N = 1 and the tokens per step a drafter must average to
break even and to reach --goal x with that many verified tokens (drafting itself taken as free,
so these are lower bounds). The second table explains the curve: the target's largest matmul
(its MLP up-projection) at M = N rows, in GFLOP/s; where it stays flat, the forward is
compute-bound and its cost grows with N. The output starts with the machine's load (`uptime`),
its bf16-relevant CPU flags, the torch version and the git commit: figures from a loaded
machine are not figures.

    python benchmarks/verify_cost.py [--target SmolLM2-135M-Instruct] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from falcon_ext.evaluation.bench_report import environment
from falcon_ext.evaluation.tree_tuning import VerifyTimer, median_seconds
from falcon_ext.targets import DTYPES, choose_dtype, dtype_name, load_target


@torch.no_grad()
def gemm_gflops(model, nodes: list[int], rounds: int) -> dict[int, float]:
    config = model.config
    w = torch.randn(config.intermediate_size, config.hidden_size, dtype=model.dtype, device=model.device)
    out = {}
    for n in nodes:
        x = torch.randn(n, config.hidden_size, dtype=model.dtype, device=model.device)
        seconds = median_seconds(lambda: [F.linear(x, w) for _ in range(10)], model.device, rounds) / 10
        out[n] = 2 * n * w.numel() / seconds / 1e9
    return out


def print_provenance(device: str) -> None:
    env = environment(device)
    print(f"uptime: {env['uptime']}")
    print(f"CPU: {env['cpu']}, {env['cpu_count']} cores; bf16-relevant flags: {' '.join(env['cpu_bf16_flags']) or 'none'}"
          + (f"; GPU {env['gpu']}" if "gpu" in env else ""))
    print(f"torch {env['torch']}, transformers {env['transformers']}, {env['torch_threads']} threads; "
          f"falcon_ext commit {env['falcon_ext_commit']}; {env['date']}")


def runnable_dtypes(names: list[str], device: str) -> list[torch.dtype]:
    """The requested dtypes this device runs; each one it cannot is announced and skipped."""
    dtypes = []
    for name in names:
        try:
            dtypes.append(choose_dtype(name, device).dtype)
        except ValueError as error:
            print(f"skipped: {error}")
    return list(dict.fromkeys(dtypes))


def measure(target: str, dtype: torch.dtype, device: str, nodes: list[int], prefix: int,
            rounds: int) -> tuple[dict[int, float], dict[int, float]]:
    """(seconds per verify forward, MLP-matmul GFLOP/s), per N."""
    model, _ = load_target(target, dtype, device)
    timer = VerifyTimer.for_target(model, prefix)
    return {n: timer.seconds(n, rounds) for n in nodes}, gemm_gflops(model, nodes, rounds)


def print_curve(dtype: torch.dtype, seconds: dict[int, float], gflops: dict[int, float], goal: float) -> None:
    print(f"\n{dtype_name(dtype)}:")
    print(f"| N tokens | forward ms | x 1 token | tokens/step to break even | tokens/step for {goal}x "
          f"| MLP matmul GFLOP/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in seconds:
        ratio = seconds[n] / seconds[1]
        need = f"{ratio:.2f}" if ratio <= n else "-"  # more than n tokens per step cannot be accepted
        reach = f"{goal * ratio:.2f}" if goal * ratio <= n else f"> {n} (impossible)"
        print(f"| {n} | {seconds[n] * 1e3:.1f} | {ratio:.2f} | {need} | {reach} | {gflops[n]:.1f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="SmolLM2-135M-Instruct", help="model name, HF folder or .gguf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--prefix", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--goal", type=float, default=1.8, help="speedup whose tokens/step to print")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    nodes = sorted(set([1] + args.nodes))
    print_provenance(args.device)
    print(f"{args.target} on {args.device}, prefix {args.prefix}, median of {args.rounds}")
    curves = {}
    for dtype in runnable_dtypes(args.dtypes, args.device):
        curves[dtype] = measure(args.target, dtype, args.device, nodes, args.prefix, args.rounds)
        print_curve(dtype, *curves[dtype], args.goal)
    print("\nforward over N tokens / one-token forward:")
    print("| N | " + " | ".join(dtype_name(d) for d in curves) + " |")
    print("|---:|" + "---:|" * len(curves))
    for n in nodes:
        print(f"| {n} | " + " | ".join(f"{s[n] / s[1]:.2f}" for s, _ in curves.values()) + " |")


if __name__ == "__main__":
    main()
