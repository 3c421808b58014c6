#!/usr/bin/env bash
# One command for a CUDA machine: the Triton kernel tests compiled (not interpreted), bench.kernels at
# Llama-3-8B attention shapes, and a short KV-mode x link experiment, in at most 8 minutes; results under
# docs/gpu/. Installs nothing: it uses the project's environment as it is and stops, naming what is missing.
#
#   bench/gpu_check.sh              # run (from the repository root or anywhere)
#   bench/gpu_check.sh --dry-run    # check the environment and print the steps without running them
#
# Each step has its own time limit (tests 120 s, kernels 170 s, experiment 170 s: 7.7 min at most) and a
# failing or timed-out step does not stop the later ones; the exit status is the first failure's.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${GPU_CHECK_OUT:-$ROOT/docs/gpu}
PYTHON=${PYTHON:-}
if [[ -z $PYTHON ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
DRY_RUN=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
    esac
done

fail() { echo "gpu_check.sh: $*" >&2; exit 1; }

[[ -n $PYTHON && -x $PYTHON ]] || fail "no Python found (set PYTHON=/path/to/python of the project's environment)"
"$PYTHON" - <<'EOF' || fail "the environment lacks what the check needs (see above); install the project first: ./hack install"
import importlib.util, sys
missing = [m for m in ("torch", "triton", "pytest", "common.kv.ops", "bench.kernels") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing modules: {', '.join(missing)}")
EOF
if [[ $DRY_RUN == 0 ]]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device')" \
        || fail "no CUDA device: this check is for a GPU machine (CPU numbers: python -m bench.kernels --device cpu)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET HACK_KV_OPS  # compiled kernels, routed as in production
STATUS=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember the first failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*"
    if [[ $DRY_RUN == 1 ]]; then return 0; fi
    local start=$SECONDS rc
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "   $name: exit $rc after $((SECONDS - start)) s (log: ${OUT#$ROOT/}/$name.log)"
    if [[ $rc != 0 && $STATUS == 0 ]]; then STATUS=$rc; fi
}

[[ $DRY_RUN == 1 ]] || mkdir -p "$OUT"
step kernel-tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/common/kv/test_triton_ops.py \
    tests/common/kv/test_triton_decode_attention.py tests/common/kv/test_triton_prefill_attention.py \
    tests/common/kv/test_triton_quantize_append.py tests/common/kv/test_triton_dequant_decode.py \
    tests/common/kv/test_triton_compile.py
step kernels 170 bash -c "\"$PYTHON\" -m bench.kernels --device cuda --contexts 4096 16384 32768 \
    --batches 1 4 16 --prefill 2048 4096 8192 --reps 20 --json --write \"$OUT/kernels.md\" >\"$OUT/kernels.jsonl\""
step experiment 170 "$PYTHON" -m bench.hack_bench.cli experiment --random-model llama3-8b --random-model-layers 2 \
    --dataset-path "$ROOT/docs/experiments.md" --input-len 4096 --output-len 32 --num-prompts 4 \
    --kv-modes fp16 dequant hack --link-gbps 10 25 --start-timeout 60 \
    --result-dir "$OUT" --label llama3-8b-2l-gpu

if [[ $DRY_RUN == 1 ]]; then
    echo "dry run: environment ok, nothing run (results would go to ${OUT#$ROOT/}/)"
    exit 0
fi
echo "results in ${OUT#$ROOT/}/: kernel-tests.log, kernels.md, kernels.jsonl, llama3-8b-2l-gpu.{json,md,png}"
exit $STATUS
