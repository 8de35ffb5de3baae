#!/usr/bin/env bash
# One-call GPU check for a CUDA machine (e.g. the H100/H200 boxes: Python 3.12, torch 2.11,
# transformers 5.17, no network). Builds falcon_ext from source in place, runs the CUDA tests
# against the CPU references, compute-sanitizer memcheck + racecheck over them, the pytest
# benchmarks (every benchmarks/bench_*.py: bench_ops.py's tree ops vs plain PyTorch and
# bench_draft_step.py, CPU and CUDA cases) and the step benchmark; writes every log to OUTDIR
# and prints a summary table last.
#
#   usage: bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
summary=()

step() {  # step NAME COMMAND...: run, log to OUTDIR/NAME.log, record status and time
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '| %-22s | %-4s | %6ss | %s.log |' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $((SECONDS - start)) "$name")")
  tail -n 3 "$out/$name.log"
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python -c \
  'import sys, torch, transformers; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda); print("transformers", transformers.__version__)'; } >"$out/machine.log" 2>&1
step build env FALCON_EXT_CUDA=1 python setup.py build_ext --inplace
step cuda_tests python -m pytest -q -m cuda tests
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$sanitizer" ]; then
  # The op tests cover every kernel; the sanitizer slows them ~50x, so only the CUDA ones run.
  step memcheck "$sanitizer" --tool memcheck --error-exitcode 1 python -m pytest -q -m cuda tests/test_ops.py
  step racecheck "$sanitizer" --tool racecheck --error-exitcode 1 python -m pytest -q -m cuda tests/test_ops.py
else
  summary+=("| compute-sanitizer      | FAIL | not found |")
fi
step op_benchmarks python -m pytest -q benchmarks --benchmark-only --benchmark-json "$out/benchmarks.json" \
  --benchmark-columns=min,median,max,rounds
[ -f benchmarks/bench_step.py ] && step step_benchmark python benchmarks/bench_step.py --device cuda

echo
cat "$out/machine.log"
echo "| step                   | rc   | time    | log |"
echo "|------------------------|------|---------|-----|"
printf '%s\n' "${summary[@]}" | tee "$out/summary.md"
