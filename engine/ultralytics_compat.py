"""The one seam between this project and Ultralytics' private API: what it overrides or calls, checked at import.

The QAT trainers (engine/trainer.py) and the original-model trainers (engine/original.py) change Ultralytics'
training loop in a few places that only private methods reach. Those overrides live here, in
``UltralyticsTrainerCompat``, each forwarding to a public hook of ours:

- ``_build_train_pipeline`` -> ``after_train_pipeline()``: calibration, distillation, AutoAnchor once the loaders exist;
- ``_load_checkpoint_state`` -> ``load_training_state(ckpt)``: our checkpoints' complete training state;
- ``_handle_nan_recovery`` -> ``recover_from_nan(epoch)``: back to that state when the loss turns NaN;
- ``_model_train`` is called (``set_train_mode()``) before weights are reloaded.

``.export(format="onnx")`` of a QAT model writes the project's export forms through an ``on_export_start``
callback (yolo_qat/ultralytics_export.py), added to Ultralytics' default callbacks and to each QAT trainer's.

engine/onnx_val.py patches ``AutoBackend._BACKEND_MAP`` (an .onnx file validates on the project's onnxruntime
session) and models/yolo.py's DetectionModel overrides ``BaseModel._apply`` (the head's anchors and grids are plain
attributes that must follow ``.to()``). ``PRIVATE_API`` names the methods with the parameters this code passes,
``PRIVATE_ATTRIBUTES`` the rest; importing this module checks them against the installed Ultralytics and raises
``UltralyticsCompatError``, naming each one that is missing or changed and the versions, so an upgrade fails here,
at import, instead of mid-run.
"""
from __future__ import annotations

import inspect

from ultralytics import __version__ as ULTRALYTICS_VERSION
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.nn.autobackend import AutoBackend
from ultralytics.nn.tasks import BaseModel
from ultralytics.utils import LOGGER

from yolo_qat.ultralytics_export import add_export_callback

TESTED_ULTRALYTICS = "8.4.190"  # the pin of requirements.txt (a test keeps them equal)

# (base classes, private method, its parameters, what we do with it)
PRIVATE_API: tuple[tuple[tuple[type, ...], str, tuple[str, ...], str], ...] = (
    ((DetectionTrainer, SegmentationTrainer), "_build_train_pipeline", ("self",),
     "overridden: QAT calibration, distillation and AutoAnchor run once the data loaders exist"),
    ((BaseTrainer,), "_load_checkpoint_state", ("self", "ckpt"),
     "overridden: a resume restores the QAT checkpoint's training state (both optimizers, oscillation tracker)"),
    ((BaseTrainer,), "_handle_nan_recovery", ("self", "epoch"),
     "overridden: a NaN loss goes back to that training state"),
    ((BaseTrainer,), "_model_train", ("self",), "called before the NaN recovery reloads the weights"),
    ((BaseModel,), "_apply", ("self", "fn"), "overridden by models.yolo.DetectionModel: the anchor head follows .to()"),
)

# (class, private attribute, what we do with it)
PRIVATE_ATTRIBUTES: tuple[tuple[type, str, str], ...] = (
    (AutoBackend, "_BACKEND_MAP", "patched by engine/onnx_val.py: .onnx files validate on the project's session"),
)


class UltralyticsCompatError(ImportError):
    """The installed Ultralytics lacks or changed a private method this project overrides or calls."""


def incompatibilities(api=PRIVATE_API, attributes=PRIVATE_ATTRIBUTES) -> list[str]:
    """One line per private method of ``api`` that a base class lacks or whose parameters changed, and per private
    attribute of ``attributes`` that is gone."""
    problems = [f"{cls.__module__}.{cls.__qualname__}.{name} is missing ({why})" for cls, name, why in attributes
                if not hasattr(cls, name)]
    for bases, name, params, why in api:
        for base in bases:
            where = f"{base.__module__}.{base.__qualname__}.{name}"
            fn = inspect.getattr_static(base, name, None)
            if not callable(fn):
                problems.append(f"{where} is missing ({why})")
                continue
            got = tuple(inspect.signature(fn).parameters)
            if got != params:
                problems.append(f"{where} takes ({', '.join(got)}), expected ({', '.join(params)}) ({why})")
    return problems


def check_ultralytics(api=PRIVATE_API, attributes=PRIVATE_ATTRIBUTES, version: str = ULTRALYTICS_VERSION) -> None:
    """UltralyticsCompatError naming every private method or attribute that does not match; a warning (only) when
    the installed version is not the tested one but everything matches."""
    problems = incompatibilities(api, attributes)
    if problems:
        raise UltralyticsCompatError(
            f"Ultralytics {version} is installed, yolo-qat is tested with {TESTED_ULTRALYTICS}, and the private "
            f"methods its trainers build on changed: {'; '.join(problems)}. Install ultralytics=={TESTED_ULTRALYTICS} "
            f"(requirements.txt), or adapt engine/ultralytics_compat.py to the new methods")
    if version != TESTED_ULTRALYTICS:
        LOGGER.warning(f"yolo-qat is tested with ultralytics=={TESTED_ULTRALYTICS}, {version} is installed: its "
                       f"private trainer methods still match (engine/ultralytics_compat.py), other changes may not")


class UltralyticsTrainerCompat:
    """Put before an Ultralytics task trainer: its private methods that we change, forwarded to public hooks.
    A hook's default is Ultralytics' own behaviour; subclasses extend ``after_train_pipeline`` (super() first)
    and replace ``load_training_state`` / ``recover_from_nan``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        add_export_callback(self.callbacks)  # shared with the YOLO model whose .train() made this trainer

    def _build_train_pipeline(self):
        super()._build_train_pipeline()
        self.after_train_pipeline()

    def after_train_pipeline(self) -> None:
        """Runs after Ultralytics built the loaders and the optimizer (again after an OOM retry rebuilds them)."""

    def _load_checkpoint_state(self, ckpt):
        self.load_training_state(ckpt)

    def load_training_state(self, ckpt: dict) -> None:
        """Optimizer, scaler, EMA, best fitness and early stopping from ``ckpt`` (a resume, a NaN recovery)."""
        super()._load_checkpoint_state(ckpt)

    def _handle_nan_recovery(self, epoch):
        return self.recover_from_nan(epoch)

    def recover_from_nan(self, epoch: int) -> bool:
        """At the end of an epoch: True when a NaN/Inf loss or fitness made it go back to last.pt."""
        return super()._handle_nan_recovery(epoch)

    def set_train_mode(self) -> None:
        self._model_train()


check_ultralytics()
