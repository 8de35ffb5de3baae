"""What a target forward over N tokens costs next to one token: the bound on any speculative speedup.

Speculative decoding pays off only while verifying a tree of N tokens costs little more than
one forward. For each N, the target's forward over N tokens after a PREFIX-token KV cache (the
engine's tree mask and position ids, as in a verify step) is timed ROUNDS times; the median is
printed with its ratio to N = 1 and the tokens per step a drafter must average to break even
and to reach --goal x with that many verified tokens (drafting itself taken as free, so these
are lower bounds). The second table explains the curve: the target's largest matmul (its MLP
up-projection) at M = N rows, in GFLOP/s; where it stays flat, the forward is compute-bound and
its cost grows with N.

    python benchmarks/verify_cost.py [--target SmolLM2-135M-Instruct] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from falcon_ext.cdt_tune import VerifyTimer, median_seconds
from falcon_ext.targets import load_target


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="SmolLM2-135M-Instruct", help="model name, HF folder or .gguf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--prefix", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--goal", type=float, default=1.8, help="speedup whose tokens/step to print")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    nodes = sorted(set([1] + args.nodes))
    model, _ = load_target(args.target, getattr(torch, args.dtype), args.device)
    timer = VerifyTimer.for_target(model, args.prefix)
    seconds = {n: timer.seconds(n, args.rounds) for n in nodes}
    gflops = gemm_gflops(model, nodes, args.rounds)
    print(f"{args.target} on {args.device} ({args.dtype}, {torch.get_num_threads()} threads), "
          f"prefix {args.prefix}, median of {args.rounds}")
    print(f"| N tokens | forward ms | x 1 token | tokens/step to break even | tokens/step for {args.goal}x "
          f"| MLP matmul GFLOP/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in nodes:
        ratio = seconds[n] / seconds[1]
        need = f"{ratio:.2f}" if ratio <= n else "-"  # more than n tokens per step cannot be accepted
        goal = f"{args.goal * ratio:.2f}" if args.goal * ratio <= n else f"> {n} (impossible)"
        print(f"| {n} | {seconds[n] * 1e3:.1f} | {ratio:.2f} | {need} | {goal} | {gflops[n]:.1f} |")


if __name__ == "__main__":
    main()
