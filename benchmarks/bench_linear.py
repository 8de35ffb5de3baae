"""x @ W^T against (W @ x^T)^T on the CPU, the choice behind ``falcon.few_rows_linear`` and the
fused draft step's ``dense``: for a few rows in bf16, oneDNN runs the second form faster. And,
beside bf16, the same product with int8 weights (``ops.int8_linear``, the "int8" drafter format).

Prints, per dtype, weight shape (the SmolLM2 drafter's LSTM and LM-head matrices) and row count,
the median time of both forms measured interleaved in one process, and their ratio; for bf16 also
int8's time and the best bf16 form's time over it. The weights stay in cache between repeats
(while decoding, the target's forward evicts them, which favours int8 further).

    python benchmarks/bench_linear.py [--threads 2] [--repeats 200]
"""
import argparse
import os

import torch

from falcon_ext.drafters.falcon import Int8Weight
from falcon_ext.engine import ops
from falcon_ext.evaluation.tree_tuning import median_seconds

SHAPES = [(4 * 576, 2 * 576), (4 * 576, 576), (8192, 576)]  # LSTM w_ih0, w_hh/w_ih1, draft-vocab head
ROWS = [1, 2, 5, 16, 64]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(f"load before: {os.getloadavg()[0]:.2f}; torch {torch.__version__}, {args.threads} threads")
    print("| dtype | W | rows | x @ W^T (ms) | (W @ x^T)^T (ms) | ratio | int8 (ms) | best / int8 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for n, k in SHAPES:
            w = torch.randn(n, k).to(dtype)
            for rows in ROWS:
                x = torch.randn(rows, k).to(dtype)
                plain = 1e3 * median_seconds(lambda: torch.mm(x, w.t()), cpu, args.repeats)
                swapped = 1e3 * median_seconds(
                    lambda: (torch.mv(w, x[0])[None] if rows == 1 else torch.mm(w, x.t()).t()), cpu, args.repeats)
                line = f"| {str(dtype)[6:]} | {n}x{k} | {rows} | {plain:.3f} | {swapped:.3f} | {plain / swapped:.2f} |"
                if dtype == torch.bfloat16:
                    q = Int8Weight.quantize(w)
                    int8 = 1e3 * median_seconds(lambda: ops.int8_linear(x, q.q, q.scale), cpu, args.repeats)
                    line += f" {int8:.3f} | {min(plain, swapped) / int8:.2f} |"
                else:
                    line += " | |"
                print(line)


if __name__ == "__main__":
    main()
