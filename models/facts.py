"""What the rest of the project asks of a model, a model yaml or a checkpoint, answered in one place.

- ``model_task``: 'detect' / 'segment' (or another Ultralytics task, which the callers refuse) of a model in memory;
- ``trained_imgsz``: the image size it was trained at (the default of validation, QC and export);
- ``is_original``: an original anchor-based YOLOv5 / YOLOv7 model (models/yolo.py) rather than an Ultralytics one;
  ``is_original_source`` the same for a model, a yaml or a ``.pt`` file; ``original_yaml_task`` the task of an
  original-format yaml (Ultralytics' own guess reads only the file name).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn
from ultralytics.nn.tasks import SegmentationModel, guess_model_task
from ultralytics.utils.torch_utils import unwrap_model

from .checkpoint import load_checkpoint
from .registry import is_original_yaml
from .yolo import Detect, DetectionModel, load_original_yaml


def model_task(model: nn.Module) -> str:
    """'segment', 'detect' (or another Ultralytics task, which the callers refuse) of a model in memory."""
    # Original yolov5-seg models subclass SegmentationModel but carry their own Segment head, which
    # Ultralytics' guess does not know.
    return "segment" if isinstance(model, SegmentationModel) else guess_model_task(model)


def trained_imgsz(model: nn.Module, default: int = 640) -> int:
    """The image size the model was trained at (``model.args``, a dict or namespace; for a checkpoint of
    yolov5's train.py the ``opt`` it recorded, see ``models.checkpoint.record_train_imgsz``), else ``default``."""
    args = getattr(model, "args", None)
    v = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
    if not (isinstance(v, int) and v > 0):
        v = getattr(model, "train_imgsz", None)
    return int(v) if isinstance(v, int) and v > 0 else default


def is_original(model) -> bool:
    """True for a model of this package's original anchor-based classes, from a checkpoint or a yaml (FP or
    quantized, DDP- or EMA-wrapped), whose head is one of models.yolo's anchor-based heads."""
    model = unwrap_model(model)
    if isinstance(model, DetectionModel):
        return True
    layers = getattr(model, "model", None)
    return isinstance(layers, nn.Sequential) and len(layers) > 0 and isinstance(layers[-1], Detect)


def is_original_source(src) -> bool:
    """True for an original model, an original-format yaml (path, registry name, dict) or a .pt checkpoint
    holding an original model (a yolov5 / yolov7 checkpoint, or one this project wrote from such a model).
    Unreadable files give False: the caller's own loading reports them."""
    if isinstance(src, nn.Module):
        return is_original(src)
    if isinstance(src, (str, Path)) and str(src).endswith(".pt"):
        if not Path(src).is_file():
            return False
        try:
            model, _ = load_checkpoint(src)
        except (ValueError, FileNotFoundError):
            return False
        return is_original(model)
    return is_original_yaml(src)


def original_yaml_task(cfg) -> str:
    """'segment' for an original yaml (path, registry name or dict) whose head is Segment, else 'detect'."""
    head = load_original_yaml(cfg)["head"][-1][2]
    return "segment" if head == "Segment" else "detect"
