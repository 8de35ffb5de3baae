"""Summaries of a `falcon-ext bench` run: JSON (everything, per-prompt records included),
a Markdown report and a PNG plot of speedup and accepted tokens per category."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

# Engine stages (falcon_ext.engine.generate) grouped the way the step-time question is asked: how much
# of a step is the target's own forward, how much drafting, how much bookkeeping.
STAGE_GROUPS = {
    "verify": "target forward",
    "draft": "drafting",
    "drafter_update": "drafting",
    "tree_build": "bookkeeping",
    "accept": "bookkeeping",
    "commit": "bookkeeping",
    "emit": "bookkeeping",
    "drop_finished": "bookkeeping",
    "loop overhead": "bookkeeping",
}


def _stats(rows: list[dict]) -> dict:
    tokens = sum(r["new_tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    decode_forwards = sum(max(r["forwards"] - 1, 0) for r in rows)
    checked = [r["same_as_generate"] for r in rows if r["same_as_generate"] is not None]
    divergences = [r["divergence"] for r in rows if r.get("divergence")]
    return {
        "prompts": len(rows),
        "new_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        # Tokens per target forward after the prefill (the prefill yields the first token).
        "mean_accepted_tokens": sum(max(r["new_tokens"] - 1, 0) for r in rows) / decode_forwards
        if decode_forwards else 0.0,
        "identical_to_generate": sum(checked) if checked else None,
        # Greedy outputs that differ: at a rounding near-tie of the target's logits, or not.
        "explained_divergences": sum(d["explained"] for d in divergences) if checked else None,
        "unexplained_divergences": sum(not d["explained"] for d in divergences) if checked else None,
    }


def _table(records: list[dict], keys: list[str]) -> dict[str, dict]:
    stats = {k: _stats([r for r in records if r["method"] == k]) for k in keys}
    for k, s in stats.items():
        for base in ("generate", "ar"):
            if base in stats:
                s[f"speedup_vs_{base}"] = s["tokens_per_second"] / stats[base]["tokens_per_second"]
    return stats


def _breakdown(rows: list[dict]) -> dict | None:
    """Per-stage seconds of an engine method, summed over prompts, with per-step figures."""
    if not rows or not rows[0]["stage_seconds"]:
        return None
    stages: dict[str, float] = {}
    for r in rows:
        for stage, s in r["stage_seconds"].items():
            stages[stage] = stages.get(stage, 0.0) + s
    decode = sum(r["decode_seconds"] for r in rows)
    stages["loop overhead"] = decode - sum(stages.values())  # the loop's own Python, between stages
    steps = sum(r["forwards"] - 1 for r in rows)
    groups: dict[str, float] = {}
    for stage, s in stages.items():
        groups[STAGE_GROUPS.get(stage, "bookkeeping")] = groups.get(STAGE_GROUPS.get(stage, "bookkeeping"), 0.0) + s
    return {
        "steps": steps,
        "mean_tree_nodes": sum(r["tree_nodes"] for r in rows) / steps,
        "decode_seconds": decode,
        "prefill_seconds": sum(r["seconds"] - r["decode_seconds"] for r in rows),
        "stage_seconds": stages,
        "stage_ms_per_step": {k: 1e3 * s / steps for k, s in stages.items()},
        "stage_fraction": {k: s / decode for k, s in stages.items()},
        "group_fraction": {k: s / decode for k, s in groups.items()},
    }


def _git_commit() -> str | None:
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+uncommitted changes" if dirty else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _bf16_cpu_flags() -> list[str]:
    """lscpu's flags that bear on bf16 speed: AVX-512 (incl. BF16/FP16), AMX tiles, AVX2/FMA."""
    text = _run(["lscpu"]) or ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "avx_vnni"))


def environment(device: str) -> dict:
    """What a measurement ran on: machine, its load when measured, software, code version."""
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # A loaded machine slows every method and distorts ratios: figures are only read from idle runs.
        "uptime": _run(["uptime"]),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cpu_bf16_flags": _bf16_cpu_flags(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "falcon_ext_commit": _git_commit(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def build_report(args, methods, skipped: dict, records: list[dict], prompts_cut: int, dtype: str) -> dict:
    keys = [m.key for m in methods]
    config = {k: v for k, v in vars(args).items() if k != "func"}
    categories = list(dict.fromkeys(r["category"] for r in records))
    return {
        "config": config,
        "environment": environment(args.device),
        "dtype": dtype,
        "methods": {m.key: m.label for m in methods},
        "skipped": skipped,
        "prompts_cut_to_fit": prompts_cut,
        "summary": _table(records, keys),
        "categories": {c: _table([r for r in records if r["category"] == c], keys) for c in categories},
        "breakdown": {k: b for k in keys if (b := _breakdown([r for r in records if r["method"] == k]))},
        "records": records,
    }


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown(report: dict) -> str:
    c, env, labels = report["config"], report["environment"], report["methods"]
    mode = "greedy" if c["temperature"] == 0 else f"temperature {c['temperature']}, top-k {c['top_k']}, top-p {c['top_p']}"
    n = next(iter(report["summary"].values()))["prompts"] if report["summary"] else 0
    batch = f", batches of {c['batch_size']}" if c.get("batch_size", 1) > 1 else ""
    lines = [f"### {Path(c['target']).name}, drafter `{c['drafter']}`, prompts `{c['prompts']}` "
             f"({n} prompts x {c['max_new_tokens']} new tokens, {mode}{batch})", "",
             "| method | tokens/s | speedup vs model.generate | speedup vs falcon_ext AR | mean accepted tokens "
             "| output vs model.generate: identical / explained / unexplained |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, s in report["summary"].items():
        same = "n/a (sampling)" if c["temperature"] > 0 else (
            f"{s['identical_to_generate']} / {s['explained_divergences']} / {s['unexplained_divergences']} "
            f"of {s['prompts']}")
        lines.append(f"| {labels[key]} | {s['tokens_per_second']:.1f} | {_fmt(s.get('speedup_vs_generate'), '.2f', 'x')} "
                     f"| {_fmt(s.get('speedup_vs_ar'), '.2f', 'x')} | {s['mean_accepted_tokens']:.2f} | {same} |")
    for key, note in report["skipped"].items():
        lines.append(f"| {key}: skipped | – | – | – | – | {note} |")
    lines += ["", "Per category: speedup vs model.generate / mean accepted tokens", "",
              "| category | " + " | ".join(labels.values()) + " |", "|---|" + "---:|" * len(labels)]
    for category, table in report["categories"].items():
        cells = [f"{_fmt(s.get('speedup_vs_generate'), '.2f', 'x')} / {s['mean_accepted_tokens']:.2f}" for s in table.values()]
        lines.append(f"| {category} ({next(iter(table.values()))['prompts']}) | " + " | ".join(cells) + " |")
    diverged = [r for r in report["records"] if r.get("divergence")]
    if diverged:
        lines += ["", "Greedy outputs that differ from model.generate: the first differing new token, the "
                      "target's logit(generate's token) - logit(this token) in generate's one-token forward and "
                      "in a multi-token forward, and the rounding tolerance of that difference "
                      "(falcon_ext.evaluation.divergence)", "",
                  "| method | prompt | new token | tokens (generate / this) | gap one-token | gap multi-token "
                  "| tolerance | verdict |", "|---|---:|---:|---|---:|---:|---:|---|"]
        for r in diverged:
            d = r["divergence"]
            lines.append(f"| {labels[r['method']]} | {r['prompt']} | {d['position']} | {d['generate_token']} / "
                         f"{d['other_token']} | {d['gap_one_token']:.4g} | {d['gap_multi_token']:.4g} | "
                         f"{d['tolerance']:.4g} | {'explained' if d['explained'] else 'UNEXPLAINED'} |")
    for key, b in report["breakdown"].items():
        groups = ", ".join(f"{g} {100 * f:.1f}%" for g, f in b["group_fraction"].items())
        lines += ["", f"Step-time breakdown, {labels[key]}: {b['steps']} decoding steps verifying "
                      f"{b['mean_tree_nodes']:.2f} tree nodes each on average, "
                      f"{1e3 * b['decode_seconds'] / b['steps']:.2f} ms/step ({groups})", "",
                  "| stage | ms/step | % of step |", "|---|---:|---:|"]
        for stage, ms in b["stage_ms_per_step"].items():
            lines.append(f"| {stage} ({STAGE_GROUPS.get(stage, 'bookkeeping')}) | {ms:.3f} | "
                         f"{100 * b['stage_fraction'][stage]:.1f}% |")
    lines += ["", f"Machine: {env['cpu']}, {env['cpu_count']} cores, {env['torch_threads']} torch threads, "
                  f"load {env['load_average']}"
                  + (f", GPU {env['gpu']}" if "gpu" in env else "") + f"; {c['device']}, {report['dtype']}"
              + (", fp32 LM head (engine methods)" if c["fp32_lm_head"] else "") + ". "
              f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
              f"falcon_ext {env['falcon_ext_commit']}; {env['date']}. "
              f"Chat template: {c['chat_template']}; prompts cut to fit: {report['prompts_cut_to_fit']}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """Speedup over model.generate and mean accepted tokens per category; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = report["methods"]
    keys = [k for k in labels if k != "generate"]
    categories = list(report["categories"]) + ["all"]
    tables = [*report["categories"].values(), report["summary"]]
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.9 * len(categories) + 2), 8))
    width = 0.8 / max(len(keys), 1)
    for ax, metric, title in ((axes[0], "speedup_vs_generate", "speedup over model.generate"),
                              (axes[1], "mean_accepted_tokens", "mean accepted tokens per target forward")):
        for j, key in enumerate(keys):
            values = [t[key].get(metric, 0.0) for t in tables]
            ax.bar([i + (j - (len(keys) - 1) / 2) * width for i in range(len(categories))], values, width,
                   label=labels[key])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        ax.set_title(title)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(keys), fontsize=8)
    c = report["config"]
    fig.suptitle(f"{Path(c['target']).name} / {c['prompts']} / {c['max_new_tokens']} new tokens / "
                 f"{'greedy' if c['temperature'] == 0 else 'T=' + str(c['temperature'])}")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(report), encoding="utf-8")
    if plot(report, out / "bench.png"):
        paths.append(out / "bench.png")
    return paths
