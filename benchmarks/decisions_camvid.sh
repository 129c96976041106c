#!/bin/bash
# From scores to decisions on real CamVid (BENCHMARKS.md, "Decisions on real CamVid"): with the
# SegNet and observer of `python -m benchmarks.real_camvid --out RECIPE` (copied into OUT, the
# recipe's own files are left as they are), test val_ood before calibration, calibrate the
# observer on val, fit the thresholds on val, then test val_ood and val_ood_real.
#     bash benchmarks/decisions_camvid.sh RECIPE OUT
set -euo pipefail
RECIPE=${1:?usage: bash benchmarks/decisions_camvid.sh RECIPE OUT}
OUT=${2:?usage: bash benchmarks/decisions_camvid.sh RECIPE OUT}
PY=${PYTHON:-python}
mkdir -p "$OUT/ckpt/obsnet"
cp -n "$RECIPE/ckpt/segnet.pth" "$OUT/ckpt/segnet.pth"
cp -n "$RECIPE/ckpt/obsnet/best.pth" "$OUT/ckpt/obsnet/best.pth"
COMMON=(--data CamVid --dset_folder "$RECIPE/data" --size 180 240 --width_mult 0.25 --bsize 8
        --num_workers 2 --segnet_file "$OUT/ckpt/segnet.pth" --obsnet_file "$OUT/ckpt/obsnet" --T 20)
M=obsnet,mcp,mc_dropout,entropy,max_logit,energy
$PY main.py "${COMMON[@]}" --test_only --test_multi $M --test_split val_ood --tboard "$OUT/logs/before_val_ood"
$PY main.py "${COMMON[@]}" --calibrate --tboard "$OUT/logs/calibrate"
$PY main.py "${COMMON[@]}" --fit_threshold --test_multi $M --target_tpr 0.95 --target_risk 0.05 --tboard "$OUT/logs/fit"
for split in val_ood val_ood_real; do
  $PY main.py "${COMMON[@]}" --test_only --test_multi $M --test_split $split --tboard "$OUT/logs/$split"
done
