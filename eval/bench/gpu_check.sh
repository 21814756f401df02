#!/usr/bin/env bash
# GPU readiness in one command, at most 8 minutes on one H100: the CUDA tests (tests/test_cuda.py, marker cuda),
# train_throughput.py at ViT-B/16 in bf16 against open_clip in the same run (images/s, MFU against the card's bf16
# peak, peak memory), loss.py at B=16,384 (beside open_clip) and B=65,536 (tiled), and a short bf16 run of
# recipes/clip_vitb16_gpu.yaml; then one markdown table, written to TABLE.md and printed.
#
#     eval/bench/gpu_check.sh [TABLE.md]        (default gpu_check.md; PYTHON=... to choose the interpreter)
#
# Without a CUDA device it says so and exits 0. Each stage has its own time limit (their sum is 8 minutes), so a
# stage that hangs costs its limit and the table still comes out; its logs stay in the printed work folder.
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-gpu_check.md}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device found (torch.cuda.is_available() is False); nothing was run"
    exit 0
fi

WORK=$(mktemp -d -t gpu_check.XXXXXX)
echo "gpu_check: work folder $WORK"
"$PY" -c "import torch; print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}')" \
    > "$WORK/device"
cat "$WORK/device"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to WORK/NAME.log, record exit code and seconds
    local name=$1 limit=$2 start rc
    shift 2
    echo "gpu_check: $name (at most ${limit} s)"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    echo "$name $rc $(( $(date +%s) - start ))" >> "$WORK/stages"
    tail -n 15 "$WORK/$name.log"
}

stage tests 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml="$WORK/tests.xml"
stage throughput 170 "$PY" eval/bench/train_throughput.py --device cuda --size vitb16 --batch 256 --steps 10 \
    --warmup 3 --rows "open_clip bf16,contrast bf16,contrast bf16+compile" --json "$WORK/throughput.json"
stage loss 90 "$PY" eval/bench/loss.py --device cuda --sizes 16384 --big 65536 --reps 3 --json "$WORK/loss.json"
stage recipe 90 "$PY" -m contrast train recipes/clip_vitb16_gpu.yaml --out "$WORK/run" --no-progress
"$PY" eval/bench/gpu_table.py "$WORK" "$OUT"
