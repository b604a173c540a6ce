"""engine/ultralytics_compat.py: the private Ultralytics methods the project overrides or calls are named in one
place and checked against the installed Ultralytics; a missing or changed one fails with one message."""
import inspect
import re
from pathlib import Path

import pytest
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.models.yolo.detect import DetectionTrainer

from yolo_qat.engine import ultralytics_compat as compat
from yolo_qat.engine.original import OriginalDetectionTrainer, OriginalSegmentationTrainer
from yolo_qat.engine.trainer import (QATDetectionTrainer, QATOriginalDetectionTrainer, QATOriginalSegmentationTrainer,
                                     QATSegmentationTrainer)
from yolo_qat.models.yolo import DetectionModel

ROOT = Path(__file__).resolve().parents[2]


def test_installed_ultralytics_matches():
    assert compat.incompatibilities() == []
    compat.check_ultralytics()


def test_tested_version_is_the_pin():
    # pyproject.toml reads its dependencies from requirements.txt
    assert re.findall(r"ultralytics==([\w.]+)", (ROOT / "requirements.txt").read_text()) == [compat.TESTED_ULTRALYTICS]


def test_a_missing_method_is_named(monkeypatch):
    monkeypatch.delattr(BaseTrainer, "_handle_nan_recovery")
    with pytest.raises(compat.UltralyticsCompatError) as e:
        compat.check_ultralytics(version="9.9.9")
    msg = str(e.value)
    assert "BaseTrainer._handle_nan_recovery is missing" in msg and "9.9.9" in msg and compat.TESTED_ULTRALYTICS in msg
    assert "_load_checkpoint_state" not in msg  # only what changed


def test_changed_parameters_are_named(monkeypatch):
    monkeypatch.setattr(DetectionTrainer, "_build_train_pipeline", lambda self, retry: None)
    problems = compat.incompatibilities()  # SegmentationTrainer inherits it from DetectionTrainer
    why = compat.PRIVATE_API[0][3]
    pairs = (("detect", "DetectionTrainer"), ("segment", "SegmentationTrainer"))
    assert problems == [f"ultralytics.models.yolo.{t}.train.{c}._build_train_pipeline takes (self, retry), expected "
                        f"(self) ({why})" for t, c in pairs]


def test_a_missing_attribute_is_named(monkeypatch):
    from ultralytics.nn.autobackend import AutoBackend

    monkeypatch.delattr(AutoBackend, "_BACKEND_MAP")
    assert compat.incompatibilities() == [f"ultralytics.nn.autobackend.AutoBackend._BACKEND_MAP is missing "
                                          f"({compat.PRIVATE_ATTRIBUTES[0][2]})"]


def test_another_version_that_matches_only_warns():
    compat.check_ultralytics(version="8.5.0")  # no error: the methods match (a logged warning)


def _private_overrides(cls, project=("yolo_qat.",)) -> set[str]:
    """Single-underscore methods that a project class in ``cls``'s MRO defines over a class from outside it."""
    ours = [c for c in cls.__mro__ if c.__module__.startswith(project)]
    theirs = [c for c in cls.__mro__ if not c.__module__.startswith(project) and c is not object]
    found = set()
    for c in ours:
        for name, fn in vars(c).items():
            if (name.startswith("_") and not name.startswith("__") and inspect.isfunction(fn)
                    and any(name in vars(t) for t in theirs)):
                found.add((c.__module__, name))
    return found


def test_every_private_override_goes_through_the_seam():
    named = {name for _, name, _, _ in compat.PRIVATE_API}
    for cls in (QATDetectionTrainer, QATSegmentationTrainer, QATOriginalDetectionTrainer,
                QATOriginalSegmentationTrainer, OriginalDetectionTrainer, OriginalSegmentationTrainer):
        overrides = _private_overrides(cls)
        assert {m for m, _ in overrides} <= {"yolo_qat.engine.ultralytics_compat"}, overrides  # trainers use hooks
        assert {n for _, n in overrides} <= named
    assert {n for _, n in _private_overrides(DetectionModel)} <= named | {"_initialize_biases"}
