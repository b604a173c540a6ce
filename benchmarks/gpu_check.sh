#!/usr/bin/env bash
# GPU check of the QAT project on ONE CUDA GPU, under 8 minutes on an H100/H200.
#
#   bash benchmarks/gpu_check.sh [OUT]      # OUT: output folder (default /tmp/qat-gpu-check)
#
# Needs a Python with torch (CUDA) + triton; ultralytics and pycocotools (and polars) may be missing: they are
# installed from wheels in <repo>/.gpu-wheels (pip install --no-index --no-deps), made on a machine with internet:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps \
#       -d .gpu-wheels ultralytics==8.4.190 ultralytics-thop pycocotools polars polars-runtime-32
# Nothing is downloaded here (YOLO_OFFLINE=1; the dataset is the project's procedural one, data/embedded.py).
# Knobs (environment): PYTHON, GPU (index, 0), BUDGET_S (420: steps that would start past it are SKIPPED),
# STEP_BATCH (32), COCO_BATCH (64), QAT_EPOCHS (1), TRAIN_IMGSZ (128), TRAIN_BATCH (16), DEVICE (cuda; "cpu"
# only for a dry run of the script's plumbing at tiny sizes), SKIP (space-separated step names to skip).
#
# Steps: preflight; units (Triton kernel vs reference on CUDA bit for bit, saved-for-backward bytes, inf input
# under AMP, quantizers' device, host syncs per training step for lsq/dampen/freeze/EMA/distillation and both
# loss families, fake-quant op time); step_amp / step_fp32 (FP vs W4A4 vs W4A4+distill at 640 x STEP_BATCH,
# ratios and peak memory); coco_plan (FP and W4A4 ms/step, AMP, 640 x COCO_BATCH, nc 80, original yolov5n,
# yolov5s, yolov7-tiny); dataset; qat_* (train_qat.py on CUDA, AMP on: yolov5nu-seg with an FP stage and
# distillation, the original yolov5n with freezing; no NaN, finite positive step sizes, GradScaler back-offs);
# qc_* and val_* (correct_qc.py and val.py on CUDA). A summary table at the end; exit 1 if a step FAILED.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${OUT:-/tmp/qat-gpu-check}}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-420}"
STEP_BATCH="${STEP_BATCH:-32}"
COCO_BATCH="${COCO_BATCH:-64}"
QAT_EPOCHS="${QAT_EPOCHS:-1}"
TRAIN_IMGSZ="${TRAIN_IMGSZ:-128}"
TRAIN_BATCH="${TRAIN_BATCH:-16}"
DEVICE="${DEVICE:-cuda}"
SKIP=" ${SKIP:-} "
mkdir -p "$OUT"/{logs,runs,qc,val,datasets,reports}
export CUDA_VISIBLE_DEVICES="${GPU:-0}"
export YOLO_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export YOLO_QAT_DATA="$OUT/datasets" YOLO_CONFIG_DIR="$OUT/ultralytics-config"
export QAT_FUSED_LSQ="${QAT_FUSED_LSQ:-1}"
T0=$SECONDS
if [ "$DEVICE" = "cpu" ]; then DEV=cpu; STEP_IMGSZ=64; COCO_IMGSZ=64; NSTEPS=1; else DEV=0; STEP_IMGSZ=640; COCO_IMGSZ=640; NSTEPS=10; fi

# ---------------------------------------------------------------------------- wheels (offline install)
if ! "$PY" -c "import ultralytics, pycocotools, polars" 2>/dev/null; then
  if ls "$REPO"/.gpu-wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$OUT/site" \
      "$REPO"/.gpu-wheels/*.whl >"$OUT/logs/wheels.log" 2>&1 || { echo "wheel install failed:"; tail "$OUT/logs/wheels.log"; }
    export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

declare -A STATUS SECS NOTE
ORDER=()
run_step() {  # run_step NAME TIMEOUT_S CMD...  (output in $OUT/logs/NAME.log)
  local name="$1" tmo="$2"; shift 2
  ORDER+=("$name")
  local left=$(( BUDGET_S - (SECONDS - T0) ))
  if [[ "$SKIP" == *" $name "* ]]; then STATUS[$name]=SKIPPED; SECS[$name]=0; NOTE[$name]="SKIP"; return 0; fi
  if (( left < 15 )); then STATUS[$name]=SKIPPED; SECS[$name]=0; NOTE[$name]="past the ${BUDGET_S}s budget"; return 0; fi
  (( tmo > left )) && tmo=$left
  local t=$SECONDS rc
  echo "== $name (timeout ${tmo}s, elapsed $(( SECONDS - T0 ))s)"
  timeout --kill-after=10 "$tmo" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  SECS[$name]=$(( SECONDS - t ))
  if (( rc == 0 )); then STATUS[$name]=PASS
  elif (( rc == 124 || rc == 137 )); then STATUS[$name]=TIMEOUT
  else STATUS[$name]="FAIL($rc)"; fi
  (( rc != 0 )) && { echo "---- tail of $name.log"; tail -n 15 "$OUT/logs/$name.log"; echo "----"; }
  return 0
}
note() { NOTE[$1]="${NOTE[$1]:+${NOTE[$1]}; }$2"; }

cd "$REPO"
run_step preflight 60 "$PY" -c '
import torch, triton, ultralytics, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "ultralytics", ultralytics.__version__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
note preflight "$(grep -m1 '^gpu' "$OUT/logs/preflight.log" 2>/dev/null | cut -c1-60)"

run_step units 150 "$PY" benchmarks/gpu_check.py units --device "$([ "$DEV" = cpu ] && echo cpu || echo cuda)" \
  --json "$OUT/reports/units.json"
note units "$(grep -c '^\[PASS\]' "$OUT/logs/units.log") PASS, $(grep -c '^\[FAIL\]' "$OUT/logs/units.log") FAIL"

COMMON_STEP=(--device "$DEV" --imgsz "$STEP_IMGSZ" --batch "$STEP_BATCH" --steps "$NSTEPS" --cfg yolov5nu.yaml yolov5n)
[ "$DEV" = cpu ] && COMMON_STEP=(--device cpu --imgsz 64 --batch 2 --steps 1 --cfg yolov5nu.yaml yolov5n)
run_step step_amp 120 "$PY" benchmarks/step_time.py "${COMMON_STEP[@]}" $([ "$DEV" = cpu ] || echo --amp)
COCO=(--device "$DEV" --imgsz "$COCO_IMGSZ" --batch "$COCO_BATCH" --nc 80 --steps "$NSTEPS" --no-variants --no-distill
      --cfg yolov5n yolov5s yolov7-tiny)
[ "$DEV" = cpu ] && COCO=(--device cpu --imgsz 64 --batch 2 --nc 80 --steps 1 --no-variants --no-distill --cfg yolov5n)
run_step coco_plan 100 "$PY" benchmarks/step_time.py "${COCO[@]}" $([ "$DEV" = cpu ] || echo --amp)
run_step step_fp32 90 "$PY" benchmarks/step_time.py "${COMMON_STEP[@]}" --no-variants

run_step dataset 60 "$PY" -m data.embedded
DATA="$(grep -E '\.yaml$' "$OUT/logs/dataset.log" | tail -n 1)"
DATA_ARGS=(); [ -n "$DATA" ] && [ -f "$DATA" ] && DATA_ARGS=(--data "$DATA")

TRAIN=(--epochs "$QAT_EPOCHS" --imgsz "$TRAIN_IMGSZ" --batch "$TRAIN_BATCH" --workers 4 --device "$DEV"
       --project "$OUT/runs" --exist-ok --warmup-epochs 0 --ema-decay 0.99 --ema-tau 16 --calib-batches 2
       --fp-epochs 1 --fp-optimizer AdamW --fp-lr0 0.004 "${DATA_ARGS[@]}")
qat() {  # qat NAME ARGS...
  local name="$1"; shift
  run_step "qat_$name" 100 "$PY" benchmarks/gpu_check.py qat --amp "$([ "$DEV" = cpu ] && echo off || echo on)" \
    --report "$OUT/reports/qat_$name.json" -- --name "$name" "${TRAIN[@]}" "$@"
  note "qat_$name" "$(grep -m1 '^QAT REPORT' "$OUT/logs/qat_$name.log" | sed 's/^QAT REPORT //' | cut -c1-150)"
}
qat v5nuseg --cfg yolov5nu-seg --method dampen --distill
qat v5n --cfg yolov5n --method freeze --fp-epochs 0

for name in v5nuseg v5n; do
  W="$OUT/runs/$name/weights/last.pt"
  if [ ! -f "$W" ]; then ORDER+=("qc_$name"); STATUS[qc_$name]=SKIPPED; SECS[qc_$name]=0; NOTE[qc_$name]="no QAT checkpoint"; continue; fi
  run_step "qc_$name" 90 "$PY" correct_qc.py --weights "$W" --device "$DEV" --calib-images 64 --steps 12 --no-val \
    --batch "$TRAIN_BATCH" --imgsz "$TRAIN_IMGSZ" --project "$OUT/qc" --name "$name" --exist-ok "${DATA_ARGS[@]}"
  note "qc_$name" "$(grep -E '^calibration loss' "$OUT/logs/qc_$name.log" | tail -n 1 | cut -c1-60); $(grep -E '^fold check' "$OUT/logs/qc_$name.log" | tail -n 1 | cut -c1-90)"
  QC="$(ls "$OUT"/qc/"$name"/weights/*.pt 2>/dev/null | head -n 1)"
  run_step "val_$name" 60 "$PY" val.py --weights "${QC:-$OUT/runs/$name/weights/best.pt}" --device "$DEV" \
    --batch "$TRAIN_BATCH" --imgsz "$TRAIN_IMGSZ" --project "$OUT/val" --name "$name" --exist-ok "${DATA_ARGS[@]}"
  note "val_$name" "$(grep -E '\.pt +[0-9]' "$OUT/logs/val_$name.log" | tail -n 1 | tr -s ' ' | cut -c1-120) (box/mask mAP %, ultra/coco)"
done

# ---------------------------------------------------------------------------- summary
echo
echo "================ QAT GPU check summary ($OUT, $(( SECONDS - T0 )) s) ================"
FAILED=0
for s in "${ORDER[@]}"; do
  printf "%-14s %-9s %5ss  %s\n" "$s" "${STATUS[$s]}" "${SECS[$s]:-0}" "${NOTE[$s]:-}"
  case "${STATUS[$s]}" in FAIL*|TIMEOUT) FAILED=1 ;; esac
done
echo "--- units"
grep -E '^\[(PASS|FAIL|INFO)\]' "$OUT/logs/units.log" 2>/dev/null | cut -c1-300
for s in step_amp step_fp32 coco_plan; do
  echo "--- $s"
  grep -E "^(yolov|ratio| *(fp|w4a4)|  )" "$OUT/logs/$s.log" 2>/dev/null | cut -c1-200
done
exit $FAILED
