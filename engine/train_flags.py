"""The settings of a QAT run as flags: the quantization and QAT flags generated from QuantRecipe and QATConfig
(engine/settings.py), the run's Ultralytics flags and the shared ones (engine/cli_common.py). ``yolo-qat train``
parses them; ``yolo_qat.train_qat`` / ``train_fp`` take the same names as keywords (``settings_of``)."""
from __future__ import annotations

import argparse

from yolo_qat.engine.cli_common import InputError, add_shared
from yolo_qat.engine.config import QATConfig
from yolo_qat.engine.settings import FORMS, add_fields, mapping

DESCRIPTION = """QAT of Ultralytics YOLO detectors and segmenters (LSQ, dampening, freezing; EMA of weights and scales).

    yolo-qat train                                          # offline demo: embedded data, FP training, W4A4 EMA QAT
    yolo-qat train --weights fp.pt --data coco-seg.yaml --config ema_w4a4 --epochs 100
    yolo-qat train --cfg yolov5nu --fp-epochs 50 --w-bits 3 --a-bits 3 --method dampen
    yolo-qat train --resume runs/qat/exp/weights/last.pt

Every flag can also be set in a recipe (``--config``: a preset name such as ema_w4a8, or a yaml whose keys are
the flag names with '_'); flags given on the command line override it. Outputs go to <project>/<name>/.
(python train_qat.py takes the same flags.)
"""

# The no-argument demo, sized for ~10 minutes on 2 CPU cores: 16 optimizer steps per epoch, so the
# EMA warm-up tau is counted in steps accordingly (the paper's tau=2000 assumes COCO-length runs).
# FP stage of the demo: short runs (~250 optimizer steps) learn far more with AdamW at 4e-3 than with
# optimizer=auto's choice (measured on the embedded set, yolov5nu 10 epochs: mAP50 0.34 vs 0.15).
DEMO = {"cfg": "yolov5nu-seg", "fp_epochs": 16, "fp_optimizer": "AdamW", "fp_lr0": 0.004, "epochs": 4, "imgsz": 128,
        "batch": 16, "ema_decay": 0.99, "ema_tau": 16.0, "lr0": 0.002, "warmup_epochs": 0.0, "workers": 0}


def build_parser(prog: str = "train_qat.py") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--config", help="recipe: a preset name (configs/presets.py, e.g. ema_w4a8) or a yaml whose keys are any of "
                       "these flags with '_' (e.g. configs/ema_w4a4.yaml); the command line overrides it")
    add_shared(ap, prog, project="runs/qat", weights_required=False, device_now=False,
               weights_help="FP (or QAT) checkpoint to start from: any Ultralytics or original YOLOv5/YOLOv7 .pt, "
                            "or a model yaml")
    a("--cfg", help="model yaml or short name (yolov5nu, yolov5su, yolov7-tinyu, *-seg) when there are no --weights")
    a("--epochs", type=int, default=10, help="QAT epochs")
    a("--fp-epochs", type=int, default=0, help="train the FP model first for this many epochs (no --weights)")
    a("--fp-optimizer", default="auto", help="optimizer of the FP stage (Ultralytics names: auto, SGD, AdamW, ...)")
    a("--fp-lr0", type=float, default=0.01, help="initial learning rate of the FP stage (ignored by optimizer=auto)")
    a("--nbs", type=int, help="nominal batch size (default: --batch, i.e. one optimizer step per batch)")
    a("--workers", type=int, default=2, help="dataloader workers")
    a("--lr0", type=float, default=0.01, help="initial SGD learning rate of the weights (Ultralytics' lr0; the "
                                              "quantizer scales have --scale-lr)")
    a("--warmup-epochs", type=float, default=3.0)
    a("--warmup-bias-lr", type=float, default=0.1,
      help="lr the biases (BN shifts included) start the warm-up at, falling to --lr0 (Ultralytics' warmup_bias_lr). "
           "Short QAT from a trained checkpoint: a lower --lr0 without warm-up measured steadier "
           "(docs/integer-qat.md)")
    a("--close-mosaic", type=int, help="epochs without mosaic at the end (default: a quarter of the run, <= 10)")
    a("--loss-hyp", type=mapping, default=None,
      help="original anchor-based models only: YOLOv5 loss settings as in a yolov5 hyp yaml, before its scaling by "
           "3/nl, nc/80 and (imgsz/640)^2, e.g. '{obj: 25}' (keys box, obj, cls, cls_pw, obj_pw, anchor_t, fl_gamma, "
           "label_smoothing); used by the FP and the QAT stage and kept in the checkpoints")
    a("--seed", type=int, default=0)
    a("--amp", action=argparse.BooleanOptionalAction, default=True,
      help="CUDA: fp16 autocast with a GradScaler (Ultralytics' default); --no-amp trains in float32. The fake "
           "quantization itself always computes in float32 and returns the input's dtype")
    a("--resume", nargs="?", const=True, default=False, help="resume an interrupted run from its last.pt")
    add_fields(ap.add_argument_group(f"quantization and QAT (QuantRecipe, QATConfig; {FORMS})"), QATConfig)
    return ap


def settings_of(settings: dict, overrides: dict) -> argparse.Namespace:
    """The namespace a parsed command line would give: the flags' defaults < ``settings`` (a recipe) <
    ``overrides`` (keywords named as the flags' dests). InputError naming any unknown key."""
    defaults = {a.dest: a.default for a in build_parser()._actions if a.dest not in ("help", "config")}
    unknown = sorted((set(settings) | set(overrides)) - set(defaults))
    if unknown:
        raise InputError(f"unknown setting(s) {unknown}: allowed names are train_qat's flags with '_': "
                         f"{', '.join(sorted(defaults))}")
    return argparse.Namespace(**{**defaults, **settings, **overrides})
