"""QAT of Ultralytics YOLO detectors and segmenters (LSQ, dampening, freezing; EMA of weights and scales).

    python train_qat.py                                   # offline demo: embedded data, FP training, W4A4 EMA QAT
    python train_qat.py --weights fp.pt --data coco-seg.yaml --config configs/ema_w4a4.yaml --epochs 100
    python train_qat.py --cfg yolov5nu --fp-epochs 50 --w-bits 3 --a-bits 3 --method dampen
    python train_qat.py --resume runs/qat/exp/weights/last.pt

Every flag can also be set in a recipe yaml (``--config``; keys are the flag names with '_');
flags given on the command line override the file. Outputs go to <project>/<name>/.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing may be downloaded at run time
ROOT = Path(__file__).resolve().parent

from yolo_qat.engine.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
