"""Checkpoints of the original repositories, taken as they are.

ultralytics/yolov5's ``train.py`` saves ``{epoch, best_fitness, model, ema, updates, optimizer, opt, git,
date}`` with an fp16 model (``strip_optimizer`` leaves ``model`` = the EMA, the rest None);
WongKinYiu/yolov7's ``{epoch, best_fitness, training_results, model, ema, updates, optimizer, wandb_id}``.
Their pickles name ``models.yolo.*`` and ``models.common.*``: this package, so ``torch.load`` with this
repo importable gives working modules, with no yolov5 / yolov7 code installed.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .checkpoint import load_checkpoint, record_train_imgsz
from .facts import is_original
from .safe_load import SUPPORTED
from .yolo import Detect, DetectionModel


def prepare_original(model: DetectionModel) -> DetectionModel:
    """fp32, eval mode, and the attributes the rest of the project reads, on an unpickled original model."""
    model = model.float().eval()
    if isinstance(getattr(model, "names", None), (list, tuple)):
        model.names = dict(enumerate(model.names))
    elif not isinstance(getattr(model, "names", None), dict):
        model.names = {i: str(i) for i in range(model.model[-1].nc)}
    head = model.model[-1]
    if isinstance(head, Detect):
        head.inplace = True
        if not hasattr(model, "stride"):
            model.stride = head.stride
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml.setdefault("channels", model.yaml.get("ch", 3))  # the key Ultralytics' AutoBackend reads
    for m in model.modules():
        if isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None  # pickles from torch < 1.11
    return model


def model_from_checkpoint(ckpt: dict) -> DetectionModel:
    """The model of a yolov5 / yolov7 checkpoint dict (``ckpt.get('ema') or ckpt['model']``), in fp32, eval."""
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not is_original(model):
        raise ValueError(f"not an original YOLOv5/YOLOv7 checkpoint (its model is {type(model).__name__}); "
                         f"supported: {SUPPORTED}")
    return record_train_imgsz(prepare_original(model), ckpt)


def load_original(path: str | Path) -> tuple[DetectionModel, dict]:
    """(model, checkpoint dict) of a yolov5 / yolov7 ``.pt``; errors as ``models.checkpoint.load_checkpoint``."""
    _, ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt), ckpt
