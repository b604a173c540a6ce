"""fp32 checkpoints of quantized YOLO models, in the Ultralytics checkpoint layout.

Ultralytics saves ``deepcopy(model).half()``; that would round latent weights and BN to fp16
(quantizers and QuantConv2d keep themselves fp32, but everything else would not), so we write
the whole model in fp32 and carry the recipe as plain data. Ultralytics' own loaders
(``YOLO(path)``, ``load_checkpoint``) read these files as long as this repo is importable. ``load_checkpoint``
reads every checkpoint through ``models.safe_load`` (``weights_only=True`` with an allowlist derived from the code).
"""
from __future__ import annotations

import copy
import os
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from ultralytics import __version__

from yolo_qat.quant import is_quantized

from .safe_load import MissingClassError, UnsafeCheckpointError, missing_class_message, safe_load


def save_checkpoint(path: str | Path, model: nn.Module, **extra) -> Path:
    """Atomically write ``{'model': fp32 model, 'quant_recipe': ..., **extra}`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(getattr(model, "module", model)).float()
    for p in m.parameters():
        p.requires_grad_(False)
    # 'ema' stays empty: the model given is what is validated and deployed (the EMA, for a QAT run). Ultralytics'
    # loaders fall back to 'model'; its NaN recovery, which reads 'ema', is replaced in engine/trainer.py.
    ckpt = {"model": m, "ema": None, "quant_recipe": getattr(m, "quant_recipe", None),
            "date": datetime.now().isoformat(), "version": __version__, **extra}
    ckpt.setdefault("train_args", dict(getattr(m, "args", {}) or {}))
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint at `path`
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    trust: bool | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint written by ``save_checkpoint``, by Ultralytics or by the original YOLOv5 / YOLOv7 code;
    model in fp32, eval mode. Loaded safely (``models.safe_load``): a file that names anything beyond the module
    classes and data YOLO checkpoints hold raises ``UnsafeCheckpointError`` (a ValueError) before it runs, unless
    trusted (``trust=True``, or ``YOLO_QAT_TRUST_CHECKPOINT=1`` when ``trust`` is None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist: pass the path of a .pt file")
    try:
        ckpt = safe_load(path, trust=trust)
    except (UnsafeCheckpointError, MissingClassError) as e:
        raise e from None  # one paragraph, no chained traceback
    except Exception as e:  # pickle errors, truncated files, not-a-zip ...
        msg = missing_class_message(path, e)  # a class of another YOLO release: say which, not a traceback
        if msg:
            raise ValueError(msg) from None
        raise ValueError(f"'{path}' is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); "
                         f"pass a YOLO .pt checkpoint saved by Ultralytics or by this repo") from None
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, nn.Module):
        raise ValueError(f"'{path}' is not a YOLO checkpoint (no 'model' module inside); pass a .pt "
                         f"saved by Ultralytics (e.g. runs/detect/train/weights/best.pt) or by train_qat.py")
    model = model.float().to(device).eval()
    if "opt" in ckpt:  # a checkpoint of yolov5's train.py: the image size it trained at
        record_train_imgsz(model, ckpt)
    if is_quantized(model) and getattr(model, "quant_recipe", None) is None:
        model.quant_recipe = ckpt.get("quant_recipe")
    return model, ckpt


def record_train_imgsz(model: nn.Module, ckpt: dict) -> nn.Module:
    """``model.train_imgsz`` from the arguments yolov5's train.py records in ``ckpt['opt']`` (a dict, older
    releases a Namespace; imgsz an int or [h, w]): the default image size of val.py / correct_qc.py
    (models.facts.trained_imgsz). yolov7 records none."""
    opt = ckpt.get("opt") if isinstance(ckpt, dict) else None
    imgsz = opt.get("imgsz") if isinstance(opt, dict) else getattr(opt, "imgsz", None)
    if isinstance(imgsz, (list, tuple)) and imgsz:
        imgsz = max(imgsz)
    if isinstance(imgsz, int) and imgsz > 0:
        model.train_imgsz = imgsz
    return model
