"""x @ W^T against (W @ x^T)^T on the CPU, the choice behind ``falcon.few_rows_linear`` and the
fused draft step's ``dense``: for a few rows in bf16, oneDNN runs the second form faster.

Prints, per dtype, weight shape (the SmolLM2 drafter's LSTM and LM-head matrices) and row count,
the median time of both forms measured interleaved in one process, and their ratio.

    python benchmarks/bench_linear.py [--threads 2] [--repeats 200]
"""
import argparse
import os
import time

import torch

SHAPES = [(4 * 576, 2 * 576), (4 * 576, 576), (8192, 576)]  # LSTM w_ih0, w_hh/w_ih1, draft-vocab head
ROWS = [1, 2, 5, 16, 64]


def median_ms(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[repeats // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load before: {os.getloadavg()[0]:.2f}; torch {torch.__version__}, {args.threads} threads")
    print("| dtype | W | rows | x @ W^T (ms) | (W @ x^T)^T (ms) | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for n, k in SHAPES:
            w = torch.randn(n, k).to(dtype)
            for rows in ROWS:
                x = torch.randn(rows, k).to(dtype)
                plain = median_ms(lambda: torch.mm(x, w.t()), args.repeats)
                swapped = median_ms(lambda: (torch.mv(w, x[0])[None] if rows == 1 else torch.mm(w, x.t()).t()),
                                    args.repeats)
                print(f"| {str(dtype)[6:]} | {n}x{k} | {rows} | {plain:.3f} | {swapped:.3f} | {plain / swapped:.2f} |")


if __name__ == "__main__":
    main()
