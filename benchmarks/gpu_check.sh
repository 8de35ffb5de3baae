#!/usr/bin/env bash
# One-call GPU check for a CUDA machine lent for ~10 minutes (e.g. the H100/H200 boxes: Python
# 3.12, torch 2.11, transformers 5.17, no network). In order, each step under its own `timeout`
# and the whole run inside BUDGET seconds (a step that would not fit is skipped, not started):
#   preflight       pytest, pytest-benchmark, hypothesis, ninja, nvcc, compute-sanitizer,
#                   torch.version.cuda and a visible GPU, each reported
#   build           falcon_ext from source, in place, with the CUDA kernels (stops the run on failure)
#   cuda_tests      every test marked `cuda` (CUDA kernels vs the CPU references)
#   gpu_benchmarks  the pytest benchmarks' CUDA cases only (-k cuda)
#   step_benchmark  benchmarks/bench_step.py on the GPU
#   e2e             benchmarks/gpu_e2e.py: stories260K and a random 30-layer 576-wide Llama, Falcon
#                   drafter and prompt lookup, greedy == generate, tokens/s and tau
#   memcheck        compute-sanitizer memcheck over the op tests, and then
#   racecheck       racecheck: only this project's kernels (kernel-name filter), and without the
#                   caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1): inside a cached segment
#                   an out-of-bounds access hits memory the allocator owns and memcheck misses it.
# Each step's log is OUTDIR/<step>.log; its summary line is appended to OUTDIR/summary.md as soon
# as it finishes, so a run cut short still leaves the table of the steps done.
#
#   usage: bash benchmarks/gpu_check.sh OUTDIR [PYTHON]     (PYTHON defaults to python3)
#   env:   BUDGET (seconds, default 570), FALCON_FUZZ_EXAMPLES (default here 25),
#          TORCH_CUDA_ARCH_LIST (default 9.0), T_<STEP> to change one step's limit
set -uo pipefail
out=$(realpath -m "${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [PYTHON]}")  # absolute: the script cds
py=${2:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FALCON_FUZZ_EXAMPLES=${FALCON_FUZZ_EXAMPLES:-25}
budget=${BUDGET:-570}
summary=$out/summary.md
printf '| step | result | time / limit | last line of the log |\n|---|---|---|---|\n' >"$summary"

step() {  # step NAME LIMIT COMMAND...: run under timeout, log to OUTDIR/NAME.log, append a summary line
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS - 5))
  if ((left < 20)); then
    echo "| $name | SKIPPED | 0s / ${limit}s | over the ${budget}s budget |" >>"$summary"
    return 1
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS rc result
  # bash -c: the command may be one of the functions below (exported to the child shell)
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >"$out/$name.log" 2>&1
  rc=$?
  case $rc in
    0) result=ok ;;
    124 | 137) result=TIMEOUT ;;
    *) result="FAIL (rc $rc)" ;;
  esac
  local last
  last=$(grep -v '^\s*$' "$out/$name.log" | tail -n 1 | cut -c1-160 | tr '|' '/')
  echo "| $name | $result | $((SECONDS - start))s / ${limit}s | $last |" >>"$summary"
  echo "[$name] $result: $last"
  return $rc
}

limit() { local var=T_$1; echo "${!var:-$2}"; }

preflight() {
  local missing=0
  for module in pytest pytest_benchmark hypothesis torch transformers; do
    if "$py" -c "import $module" 2>/dev/null; then echo "ok       python module $module"; else echo "MISSING  python module $module"; missing=1; fi
  done
  for tool in ninja nvcc compute-sanitizer nvidia-smi; do
    if command -v "$tool" >/dev/null || [ -x "/usr/local/cuda/bin/$tool" ]; then echo "ok       $tool"; else echo "MISSING  $tool"; [ "$tool" = compute-sanitizer ] || missing=1; fi
  done
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$py" -c 'import sys, torch, transformers
print(sys.version.split()[0], "torch", torch.__version__, "torch.version.cuda", torch.version.cuda,
      "transformers", transformers.__version__, "GPU visible", torch.cuda.is_available())
sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' || missing=1
  return $missing
}

build() {
  FALCON_EXT_CUDA=1 MAX_JOBS=$(nproc) "$py" setup.py build_ext --inplace &&
    "$py" -c 'import torch, falcon_ext
assert falcon_ext.compiled_with_cuda(), "built without the CUDA kernels"
for op in ("tree_build", "tree_verify_greedy", "tree_verify_sample", "kv_compact_", "falcon_draft_step",
           "tree_build_batched", "tree_verify_greedy_batched", "tree_verify_sample_batched", "kv_compact_batched_"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"falcon_ext::{op}", "CUDA"), op
print("falcon_ext with CUDA kernels:", falcon_ext.__file__)'
}

sanitize() {  # sanitize TOOL: the CUDA op tests under compute-sanitizer
  local cs
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  [ -x "$cs" ] || { echo "compute-sanitizer not found"; return 1; }
  # Only kernels whose name contains falcon_ext (their namespace) are instrumented.
  local filter=(--kernel-name kns=falcon_ext)
  "$cs" --help 2>&1 | grep -q -- '--kernel-name' || filter=(--filter kns=falcon_ext)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$1" "${filter[@]}" --error-exitcode 1 \
    "$py" -m pytest -q -p no:cacheprovider -m cuda tests/test_ops.py tests/test_ops_batched.py tests/test_draft_step.py
}

export py
export -f preflight build sanitize
step preflight "$(limit PREFLIGHT 60)" preflight
if ! step build "$(limit BUILD 240)" build; then
  echo "build failed: the later steps need it"
  cat "$summary"
  exit 1
fi
step cuda_tests "$(limit CUDA_TESTS 150)" "$py" -m pytest -q -rs -p no:cacheprovider -m cuda tests
step gpu_benchmarks "$(limit GPU_BENCHMARKS 90)" "$py" -m pytest -q -p no:cacheprovider benchmarks --benchmark-only \
  -k cuda --benchmark-json "$out/benchmarks.json" --benchmark-columns=min,median,max,rounds
step step_benchmark "$(limit STEP_BENCHMARK 60)" "$py" benchmarks/bench_step.py --device cuda --rounds 5
step e2e "$(limit E2E 90)" "$py" benchmarks/gpu_e2e.py --device cuda --json "$out/e2e.json"
step memcheck "$(limit MEMCHECK 150)" sanitize memcheck
step racecheck "$(limit RACECHECK 120)" sanitize racecheck

echo
cat "$summary"
