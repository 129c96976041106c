#!/usr/bin/env bash
# Everything a lent GPU is for, in one call (about 10 minutes on one H100):
#   1. the environment: Python, torch, CUDA, the GPU;
#   2. the float16 attack check (benchmarks/attack_precision.py, 360x480, width 1);
#   3. the train-step and inference benchmark rows (python -m benchmarks.run --only train_step
#      inference: the same rows as BENCHMARKS.md);
#   4. the paper-scale recipe on the packed frames: python -m benchmarks.real_camvid --scale
#      paper --camvid data_pack/camvid [--objects data_pack/objects], its epochs planned to
#      fit $BUDGET_MIN minutes (6 here, so that the whole script fits a 10-minute call; the
#      recipe's own default is 8).
# Results go under $OUT when it is set (the device runner's folder), else runs/device_run:
# one .txt per step, the benchmark report, and the recipe's plan, log and results files (its
# checkpoints stay in runs/device_run_recipe, too large to bring back).
#
# Before: pack the frames on a machine that has CamVid (38.7 MiB with the objects, under the
# runner's 64 MiB carry):
#   python -m benchmarks.pack_camvid --camvid ../shared/data/camvid --out data_pack/camvid \
#       --objects ../shared/data/objects
# then run this script with data_pack carried (run tool: carry ["data_pack"]):
#   bash benchmarks/device_run.sh
# A step that fails is reported and the next one still runs; the exit status is that of the
# first failure. Runs on torch >= 2.4 (the GPU machines have torch 2.11, Python 3.12).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
RESULTS="${OUT:-runs/device_run}"
RECIPE_OUT="${RECIPE_OUT:-runs/device_run_recipe}"
BUDGET_MIN="${BUDGET_MIN:-6}"
mkdir -p "$RESULTS"
status=0

step() {  # step NAME COMMAND...: run, print and keep its output in $RESULTS/NAME.txt
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$RESULTS/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$RESULTS/steps.txt"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

step environment "$PY" -c '
import platform, sys, torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB")
if not torch.cuda.is_available():
    print("no GPU visible: the timings below are CPU timings")
'
step attack_precision "$PY" -m benchmarks.attack_precision --size 360 480 --width_mult 1.0 \
  --batches 3
step benchmarks "$PY" -m benchmarks.run --only train_step inference --runs 3 \
  --out "$RESULTS/benchmarks"

if [ ! -f data_pack/camvid/train.txt ]; then
  echo "== real_camvid: data_pack/camvid not found; pack it first (see the top of this script)" \
    | tee -a "$RESULTS/steps.txt"
  [ "$status" -eq 0 ] && status=1
else
  objects=()
  [ -d data_pack/objects ] && objects=(--objects data_pack/objects)
  step real_camvid "$PY" -m benchmarks.real_camvid --scale paper --budget_min "$BUDGET_MIN" \
    --camvid data_pack/camvid ${objects[@]+"${objects[@]}"} --out "$RECIPE_OUT"
  mkdir -p "$RESULTS/real_camvid"
  cp "$RECIPE_OUT"/plan.json "$RECIPE_OUT"/recipe.log "$RESULTS/real_camvid/" 2>/dev/null
  for results in "$RECIPE_OUT"/logs/*/results_*.json "$RECIPE_OUT"/logs/*/results_*.csv; do
    [ -f "$results" ] && cp "$results" "$RESULTS/real_camvid/"
  done
fi
exit "$status"
