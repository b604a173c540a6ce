"""Module paths that checkpoints spell, mapped to where those classes live in the installed package.

The original YOLOv5 / YOLOv7 checkpoints pickle ``models.yolo.*`` and ``models.common.*``; checkpoints written
before this project became a package pickle ``quant.*`` and ``models.*``. The package provides them all under
``yolo_qat`` and claims no generic top-level name (a YOLOv5 user's own ``models`` package would shadow it, or be
shadowed), so the loaders translate the names instead of importing them as spelled.
"""
from __future__ import annotations

import pickle
import types

PACKAGE = "yolo_qat"
TOP_LEVEL = ("models", "quant", "engine", "deploy", "data")  # the packages a checkpoint may spell at the top level


def current_module(module: str) -> str:
    """``models.yolo`` -> ``yolo_qat.models.yolo``; other modules (torch, ultralytics, numpy, ...) unchanged."""
    return f"{PACKAGE}.{module}" if module.split(".", 1)[0] in TOP_LEVEL else module


def spelled_names(name: str) -> list[str]:
    """The names a checkpoint may use for the class ``name`` (``yolo_qat.models.yolo.Detect`` is also pickled as
    ``models.yolo.Detect``)."""
    prefix = PACKAGE + "."
    if name.startswith(prefix) and name[len(prefix):].split(".", 1)[0] in TOP_LEVEL:
        return [name, name[len(prefix):]]
    return [name]


class RenamingUnpickler(pickle.Unpickler):
    """pickle's Unpickler with the top-level names above resolved inside ``yolo_qat``."""

    def find_class(self, module, name):
        return super().find_class(current_module(module), name)


def _load(file, **kwargs):
    return RenamingUnpickler(file, **kwargs).load()


# A stand-in for the ``pickle`` module, for ``torch.load(..., pickle_module=renaming_pickle)``.
renaming_pickle = types.ModuleType("renaming_pickle")
renaming_pickle.__dict__.update({k: v for k, v in vars(pickle).items() if not k.startswith("__")})
renaming_pickle.Unpickler = RenamingUnpickler
renaming_pickle.load = _load
