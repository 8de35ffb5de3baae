#!/usr/bin/env bash
# Issue 4's ablation at CPU scale (results in docs/training.md section 4): k = 1, 2, 3 trained
# plain, and CSGD vs plain at k = 2, each for the same steps on the same data, then mean accepted
# tokens through the real engine (falcon-ext eval-drafter) on 8 MT-Bench prompts (one per
# category) and the first 8 GSM8K-test questions, NEW_TOKENS new tokens each, greedy and
# temperature 1, drafting a top-1 chain of 6 tokens (6, 3 or 2 drafter passes for k = 1, 2, 3).
#
#   scripts/ablation_smollm2.sh DATA_FOLDER...     (folders written by falcon-ext prepare-data)
#
# Environment: OUT (default runs/ablation), STEPS (300), NEW_TOKENS (48), THREADS (2). Rerunning skips finished parts;
# an interrupted training resumes from its last checkpoint.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DATA_FOLDER..." >&2; exit 2; }
OUT=${OUT:-runs/ablation}
STEPS=${STEPS:-300}
NEW_TOKENS=${NEW_TOKENS:-48}
THREADS=${THREADS:-2}
PY=${PYTHON:-python}
mkdir -p "$OUT"
"$PY" -P - "$OUT" <<'PYEOF'
import json, sys
from falcon_ext import prompts
out = sys.argv[1]
sets = {"mtbench8": prompts.select(prompts.load_prompt_set("mt-bench"), 8),
        "gsm8k8": prompts.load_prompt_set("gsm8k")[:8]}
for name, chosen in sets.items():
    with open(f"{out}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps({"category": p.category, "prompt": p.text}) + "\n" for p in chosen)
PYEOF

run() {  # name k passes [train options...]
  local name=$1 k=$2 passes=$3
  shift 3
  [ -f "$OUT/$name/final/config.json" ] || "$PY" -P -m falcon_ext.cli train --target SmolLM2-135M-Instruct \
    --data "${DATA[@]}" --allow-partial-data --out "$OUT/$name" --k "$k" --steps "$STEPS" --warmup-steps 20 \
    --batch-size 8 --seq-len 192 --lr 1e-3 --w-dist 1.0 --distill-vocab data --threads "$THREADS" \
    --log-every 10 --save-every 50 --eval-sequences 16 "$@" 2> "$OUT/$name.train.log"
  for set in mtbench8 gsm8k8; do
    for temp in 0 1; do
      local result="$OUT/$name.$set.t$temp.json"
      [ -s "$result" ] || "$PY" -P -m falcon_ext.cli eval-drafter --target SmolLM2-135M-Instruct \
        --drafter "$OUT/$name/final" --prompts "$OUT/$set.jsonl" --max-new-tokens "$NEW_TOKENS" --temperature "$temp" \
        --passes "$passes" --threads "$THREADS" > "$result" 2> "$OUT/$name.$set.t$temp.log"
    done
  done
}

DATA=("$@")
run k2_plain 2 3 --plain
run k2_csgd 2 3
run k1_plain 1 6 --plain
run k3_plain 3 2 --plain
"$PY" -P - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | held-out chain acceptance | MT-Bench greedy | MT-Bench T=1 | GSM8K greedy | GSM8K T=1 |")
print("|---|---:|---:|---:|---:|---:|")
for name in ("k1_plain", "k2_plain", "k3_plain", "k2_csgd"):
    train = json.loads((out / name / "final" / "training.json").read_text())
    cells = [json.loads((out / f"{name}.{s}.t{t}.json").read_text())["mean_accepted_tokens"]
             for s in ("mtbench8", "gsm8k8") for t in (0, 1)]
    print(f"| {name} | {train['chain_acceptance']:.3f} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
PYEOF
