#!/bin/bash
# QAT W4A8 from one FP checkpoint for each deploy target (sim, ort, npu, tensorrt), seeds 0-2, on the embedded
# data at imgsz 128; each checkpoint exported for its own target; checkpoints and files scored in one val.py table
# (--no-rect: the same letterboxed input for both). The README's "All four targets" table comes from this.
#   bash benchmarks/deploy_targets.sh FP.pt [OUT]      # e.g. FP.pt = reproduce.py's <out>/runs/fp-fp/weights/best.pt
# About 2 min per QAT run and 1 min per export on one CPU core; a re-run skips what exists.
set -e
FP=${1:?usage: bash benchmarks/deploy_targets.sh FP.pt [OUT]}
OUT=${2:-runs/deploy-targets}
for seed in 0 1 2; do
  for tgt in tensorrt npu ort sim; do
    name=$tgt-s$seed
    [ -f $OUT/$name/weights/last.pt ] && continue
    python train_qat.py --weights $FP --w-bits 4 --a-bits 8 --per-channel --target $tgt --epochs 4 --imgsz 128 \
      --batch 16 --ema-decay 0.99 --ema-tau 6.4 --lr0 0.002 --warmup-epochs 0 --seed $seed \
      --project $OUT --name $name --exist-ok --workers 0
  done
done
for d in $OUT/*-s?/weights; do
  [ -f $d/last.onnx ] || python export.py --weights $d/last.pt --imgsz 128 --batch 16 --output $d/last.onnx
done
python val.py --weights $FP $OUT/*-s?/weights/last.pt $OUT/*-s?/weights/last.onnx --no-rect --imgsz 128 --batch 16 \
  --project $OUT --name val --exist-ok --json $OUT/val.json
