"""Checkpoints of the original repositories, taken as they are.

ultralytics/yolov5's ``train.py`` saves ``{epoch, best_fitness, model, ema, updates, optimizer, opt, git,
date}`` with an fp16 model (``strip_optimizer`` leaves ``model`` = the EMA, the rest None);
WongKinYiu/yolov7's ``{epoch, best_fitness, training_results, model, ema, updates, optimizer, wandb_id}``.
Their pickles name ``models.yolo.*`` and ``models.common.*``: this package, so ``torch.load`` with this
repo importable gives working modules, with no yolov5 / yolov7 code installed.
"""
from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from .yolo import Detect, DetectionModel

SUPPORTED = ("ultralytics/yolov5 v6.x / v7.0 detection and segmentation checkpoints (models.yolo.DetectionModel "
             "or Model, SegmentationModel, Detect, Segment; models.common Conv, C3, Bottleneck, SPPF, SPP, Focus, "
             "Concat, Proto) and WongKinYiu/yolov7 detection checkpoints with Detect or IDetect heads "
             "(models.common Conv, Concat, MP, SP, SPPCSPC, RepConv, ImplicitA, ImplicitM), beside Ultralytics "
             "checkpoints")


def is_original_model(model) -> bool:
    """True for a model of this package's original anchor-based classes (from a checkpoint or a yaml)."""
    return isinstance(model, DetectionModel)


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
    if not is_original_model(model):
        raise ValueError(f"not an original YOLOv5/YOLOv7 checkpoint (its model is {type(model).__name__}); "
                         f"supported: {SUPPORTED}")
    return record_train_imgsz(prepare_original(model), ckpt)


def record_train_imgsz(model: nn.Module, ckpt: dict) -> nn.Module:
    """``model.train_imgsz`` from the arguments yolov5's train.py records in ``ckpt['opt']`` (a dict, older
    releases a Namespace; imgsz an int or [h, w]): the default image size of val.py / correct_qc.py
    (engine.validate.trained_imgsz). yolov7 records none."""
    opt = ckpt.get("opt") if isinstance(ckpt, dict) else None
    imgsz = opt.get("imgsz") if isinstance(opt, dict) else getattr(opt, "imgsz", None)
    if isinstance(imgsz, (list, tuple)) and imgsz:
        imgsz = max(imgsz)
    if isinstance(imgsz, int) and imgsz > 0:
        model.train_imgsz = imgsz
    return model


def load_original(path: str | Path) -> tuple[DetectionModel, dict]:
    """(model, checkpoint dict) of a yolov5 / yolov7 ``.pt``; errors as ``models.checkpoint.load_checkpoint``."""
    from .checkpoint import load_checkpoint

    _, ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt), ckpt


def missing_class_message(path, exc: BaseException) -> str | None:
    """One paragraph for a checkpoint that names a class or module this repo does not define (another
    yolov5 / yolov7 release, a yolov5 ClassificationModel, ...); None if ``exc`` is not such an error."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        module, what = exc.name, f"module {exc.name}"
    elif isinstance(exc, AttributeError):
        m = re.search(r"Can't get attribute '([\w.]+)' on <module '([\w.]+)'", str(exc))
        if not m:
            return None
        module, what = m.group(2), f"class {m.group(2)}.{m.group(1)}"
    else:
        return None
    module = module.removeprefix("yolo_qat.")  # the loaders resolve a checkpoint's models.* inside the package
    what = what.replace("yolo_qat.", "", 1)
    if module.split(".")[0] not in ("models", "utils"):  # the YOLO repositories' packages; numpy etc. are other trouble
        return None
    hint = (" A YOLOv5 ClassificationModel is not a detector: this project quantizes detection and segmentation "
            "models." if "Classif" in what else "")
    return (f"'{path}' was pickled with {what}, which this repo does not define: it comes from a YOLO release or "
            f"model type this project does not load.{hint} Supported: {SUPPORTED}. For another release of the same "
            f"architecture, save the model's state_dict with the code that wrote the checkpoint and load it into "
            f"a model built from a yaml in models/ (models.yolo.DetectionModel).")
