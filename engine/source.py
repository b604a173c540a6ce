"""The model a stage starts from, resolved once: a .pt checkpoint (loaded, safely, one time) or a model yaml,
with what the stages ask of it (task, trained image size, original anchor-based or Ultralytics head), so
that inspection, FP validation and the trainer's class choice read one object instead of the file again."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn
from ultralytics.nn.tasks import guess_model_task

from yolo_qat.engine.cli_common import InputError
from yolo_qat.models.checkpoint import load_checkpoint
from yolo_qat.models.facts import is_original, model_task, original_yaml_task, trained_imgsz
from yolo_qat.models.registry import is_original_yaml
from yolo_qat.models.safe_load import UnsafeCheckpointError, safe_load
from yolo_qat.models.yaml_rule import resolve_model_cfg

TASKS = ("detect", "segment")


@dataclass
class ModelSource:
    """A resolved model source. ``path``: the .pt or model yaml (what a trainer is given); ``model`` and
    ``ckpt``: the checkpoint's model and dict, loaded once (None for a yaml); ``imgsz``: the size it was
    trained at (640 when it does not say); ``original``: an original anchor-based YOLOv5 / YOLOv7 model."""

    path: str
    task: str
    imgsz: int
    original: bool
    model: nn.Module | None = None
    ckpt: dict | None = None

    @property
    def is_checkpoint(self) -> bool:
        return self.model is not None

    def __str__(self) -> str:
        return self.path


def resolve_source(src, flag: str = "--weights", tasks: tuple = TASKS) -> ModelSource:
    """``src`` (a ModelSource, a .pt path, a model yaml or a registry name such as yolov5nu) resolved and,
    for a checkpoint, loaded. InputError, one paragraph, for a missing or unreadable file, a packed export,
    an unsafe checkpoint or a task outside ``tasks``."""
    if isinstance(src, ModelSource):
        return src
    src = str(src)
    if src.endswith(".qpk") and Path(src).is_file():
        _refuse_packed(src, flag)
    if src.endswith(".pt") and not Path(src).is_file():
        raise InputError(f"{flag} '{src}' does not exist: pass a YOLO .pt checkpoint (e.g. "
                         f"runs/detect/train/weights/best.pt) or a model yaml")
    if Path(src).is_file() and not src.endswith((".yaml", ".yml")):  # a checkpoint, whatever its suffix
        try:
            model, ckpt = load_checkpoint(src)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
        source = ModelSource(src, model_task(model), trained_imgsz(model), is_original(model), model, ckpt)
    else:
        try:
            path = resolve_model_cfg(src)
        except ValueError as e:
            raise InputError(str(e)) from None
        original = is_original_yaml(path)  # Ultralytics' guess reads the file name only; the head says it
        source = ModelSource(path, original_yaml_task(path) if original else guess_model_task(path), 640, original)
    if source.task not in tasks:
        raise InputError(f"'{src}' is a {source.task} model: this project supports detection and segmentation "
                         f"models")
    return source


def inspect_source(src) -> tuple[str, int]:
    """(task, training image size or 640) of a .pt checkpoint or a model yaml (``resolve_source``)."""
    source = resolve_source(src)
    return source.task, source.imgsz


def _refuse_packed(src: str, flag: str) -> None:
    """A packed export is read safely first (an unsafe file is named as such), then refused as a start point."""
    try:
        safe_load(src)
    except UnsafeCheckpointError as e:
        raise InputError(str(e)) from None
    except Exception:  # noqa: BLE001  (any other failure: the refusal below says what the file is)
        pass
    raise InputError(f"{flag} '{src}' is a packed integer checkpoint (export --format packed), made for deployment "
                     f"without the latent weights QAT trains: start from the .pt checkpoint it was exported from")
