"""Speed against batch size: `falcon-ext bench --batch-size B` for several B, then one table and
one plot (issue 14).

Each B is one `bench` run (its own folder OUT/bB with bench.json, bench.md): model.generate, the
engine's plain decoding and the engine with the drafter run interleaved batch by batch on the
same prompts, so each run's ratios are measured under the same load. Throughput is all rows' new
tokens over the batches' wall time. Arguments after ``--`` go to `bench` unchanged; a finished
B (its bench.json exists) is not rerun.

    python benchmarks/batch_sweep.py --out runs/batch_smol --batch-sizes 1 2 4 8 16 -- \
        --target SmolLM2-135M-Instruct --drafter falcon --tree-size auto --prompts mt-bench \
        --num-prompts 16 --max-new-tokens 64 --dtype bfloat16 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

METHODS = "generate,ar,spec"


def run_bench(out: Path, batch_size: int, bench_args: list[str]) -> dict:
    folder = out / f"b{batch_size}"
    if not (folder / "bench.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        # bench records the load when it ends, its own threads included: the load before it starts
        # is the one that says whether anything else ran
        (folder / "load_before.json").write_text(json.dumps(os.getloadavg()))
        command = [sys.executable, "-m", "falcon_ext.cli", "bench", *bench_args, "--methods", METHODS,
                   "--batch-size", str(batch_size), "--no-progress", "--out", str(folder)]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return json.loads((folder / "bench.json").read_text())


def row(batch_size: int, report: dict, report_dir: Path) -> dict:
    s = report["summary"]
    return {"batch_size": batch_size, "spec_label": report["methods"]["spec"],
            "generate_tps": s["generate"]["tokens_per_second"], "ar_tps": s["ar"]["tokens_per_second"],
            "spec_tps": s["spec"]["tokens_per_second"], "tau": s["spec"]["mean_accepted_tokens"],
            "speedup": s["spec"]["speedup_vs_generate"], "ar_speedup": s["ar"]["speedup_vs_generate"],
            "unexplained": sum(s[m]["unexplained_divergences"] for m in ("ar", "spec")),
            "load": json.loads((report_dir / "load_before.json").read_text())[0],
            "commit": report["environment"]["falcon_ext_commit"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| B | drafter (tree) | model.generate tok/s | falcon_ext AR | falcon_ext + drafter | speedup vs generate"
             " | τ | unexplained | load before | commit |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['spec_label']} | {r['generate_tps']:.1f} | {r['ar_tps']:.1f} "
                     f"({r['ar_speedup']:.2f}x) | {r['spec_tps']:.1f} | **{r['speedup']:.2f}x** | {r['tau']:.2f} "
                     f"| {r['unexplained']} | {r['load']:.2f} | {r['commit']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = [r["batch_size"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("generate_tps", "model.generate"), ("ar_tps", "falcon_ext AR"),
                       ("spec_tps", "falcon_ext + drafter")):
        left.plot(b, [r[key] for r in rows], marker="o", label=label)
    left.set(xscale="log", xlabel="batch size B", ylabel="tokens/s (all rows)", title="throughput")
    left.set_xticks(b, [str(x) for x in b])
    left.legend()
    right.plot(b, [r["speedup"] for r in rows], marker="o", label="falcon_ext + drafter")
    right.plot(b, [r["ar_speedup"] for r in rows], marker="o", label="falcon_ext AR")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xscale="log", xlabel="batch size B", ylabel="speedup vs model.generate at the same B",
              title="speedup")
    right.set_xticks(b, [str(x) for x in b])
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--title", default="")
    args = p.parse_args(argv[:split])
    bench_args = argv[split + 1:]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row(b, run_bench(args.out, b, bench_args), args.out / f"b{b}") for b in args.batch_sizes]
    table = markdown(rows)
    (args.out / "sweep.md").write_text(table, encoding="utf-8")
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    plot(rows, args.out / "sweep.png", args.title or " ".join(bench_args))
    print(table)


if __name__ == "__main__":
    main()
