"""Safe loading of every checkpoint this project reads: ``torch.load(weights_only=True)`` with an allowlist.

A ``.pt`` is a pickle, and a pickle can name any importable function and call it (``os.system``,
``builtins.eval``, ...) while it loads. ``safe_load`` reads only what YOLO checkpoints hold, and refuses anything
else before it runs, with one paragraph that names the offending global:

- the **allowlist is derived from the code**, not written by hand: every ``nn.Module`` class defined in the
  packages a checkpoint's modules come from (``torch.nn.modules``, ``ultralytics.nn.modules``,
  ``ultralytics.nn.tasks``, this repo's ``models`` and ``quant``), every class of the loss modules older
  checkpoints keep as ``model.criterion``, plus the data types their metadata uses (Ultralytics'
  ``IterableSimpleNamespace``, ``pathlib`` paths, numpy scalars / dtypes / arrays) and Ultralytics' own legacy
  aliases. A block Ultralytics adds is allowed as soon as it is in those packages;
- a module class is only ever **rebuilt from its saved state** (pickle's NEWOBJ + BUILD, what ``torch.save`` of a
  module writes): a pickle that *calls* a model class with arguments (REDUCE, which would run its constructor on
  the file's data, e.g. ``DetectionModel(cfg)`` evaluating a yaml) is refused. The checkpoint's names resolve to
  stand-ins that create the instance but refuse to be called; the real classes are registered only under names a
  pickle cannot spell (they contain a newline), for torch's BUILD check;
- ``builtins.getattr`` (fused models pickle ``forward = forward_fuse`` bound methods, yolov5-seg pickles
  ``Detect.forward``) only resolves ``forward*`` functions of allowlisted module classes;
- the model yaml a checkpoint carries (rebuilt by Ultralytics' ``parse_model``, which ``eval()``s its
  ``activation`` and looks layer names up in a module namespace that also holds functions and model classes)
  follows the rule of ``models/yaml_rule.py`` at every depth: list-shaped layers of layer classes, a literal
  ``nn.<Activation>(...)``;
- size and shape limits (``models/load_limits.py``): the archive's records may not inflate beyond the file and
  1 GiB (checked before anything is inflated), and the unpickled modules must be a tree within a depth and size
  bound (checked before anything walks them), so a crafted file cannot exhaust memory or hang ``float()``.

The names a checkpoint uses are read first with ``torch.serialization.get_unsafe_globals_in_checkpoint`` (it scans
the pickle's opcodes, executing nothing), and only those entries are registered for the load (torch rebuilds its
lookup of registered globals on every opcode, so a ~1000-entry registry would slow each load).

A file the user trusts loads in full with ``--trust-checkpoint`` (every script) or ``YOLO_QAT_TRUST_CHECKPOINT=1``;
what it needed beyond the allowlist is printed.
"""
from __future__ import annotations

import _compat_pickle
import contextlib
import functools
import importlib
import importlib.util
import inspect
import io
import os
import pathlib
import pickle
import pkgutil
import re
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from ultralytics.utils import IterableSimpleNamespace

from .env_flag import env_flag
from .load_limits import StructureError, check_archive, check_object_tree
from .pickled_names import current_module, renaming_pickle, spelled_names
from .yaml_rule import yaml_problem, yaml_refusal

TRUST_ENV = "YOLO_QAT_TRUST_CHECKPOINT"
TRUST_HOW = (f"--trust-checkpoint (train_qat.py, correct_qc.py, val.py, export.py, benchmarks/reproduce.py) or the "
             f"environment variable {TRUST_ENV}=1 (also for the Python API)")

# Packages whose nn.Module classes checkpoints pickle, walked at first use.
MODULE_PACKAGES = ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks", "yolo_qat.models",
                   "yolo_qat.quant")
# Modules whose classes (any, not only nn.Module) older checkpoints keep on the model as ``criterion``.
OBJECT_MODULES = ("ultralytics.utils.loss", "ultralytics.utils.tal", "yolo_qat.models.loss")
# Legacy names Ultralytics itself maps when loading (ultralytics.nn.tasks.torch_safe_load's temporary_modules).
LEGACY_ALIASES = {
    "ultralytics.nn.modules.block.Silence": "torch.nn.modules.linear.Identity",  # YOLOv9e
    "ultralytics.nn.tasks.YOLOv10DetectionModel": "ultralytics.nn.tasks.DetectionModel",  # YOLOv10
    "ultralytics.utils.loss.v10DetectLoss": "ultralytics.utils.loss.E2EDetectLoss",  # YOLOv10
    "ultralytics.yolo.utils.IterableSimpleNamespace": "ultralytics.utils.IterableSimpleNamespace",  # < 8.0.44
}
_BUILD_SUFFIX = "\n(rebuild only)"  # registry names a pickle's GLOBAL cannot spell (it reads names line by line)


class UnsafeCheckpointError(ValueError):
    """A checkpoint refused by the safe loader; the message is the one-paragraph explanation, ``why`` its reason."""

    def __init__(self, path, why: str):
        super().__init__(paragraph(path, why))
        self.why = why


class OversizedCheckpointError(UnsafeCheckpointError):
    """A checkpoint beyond the size and shape limits of models/load_limits.py (refused with or without trust: the
    limits guard against hangs and memory exhaustion, not code)."""

    def __init__(self, path, why: str):
        ValueError.__init__(self, f"refused to load '{path}': {why}. Nothing in it ran and nothing was built from "
                                  f"it; no YOLO checkpoint comes near these limits (models/load_limits.py), so the file "
                                  f"is damaged or crafted, and --trust-checkpoint does not lift them.")
        self.why = why


class MissingClassError(ValueError):
    """A checkpoint naming a class of another YOLO release (``missing_class_message``)."""


# The checkpoints of the original repositories that load (models/original.py), named in the refusals.
SUPPORTED = ("ultralytics/yolov5 v6.x / v7.0 detection and segmentation checkpoints (models.yolo.DetectionModel "
             "or Model, SegmentationModel, Detect, Segment; models.common Conv, C3, Bottleneck, SPPF, SPP, Focus, "
             "Concat, Proto) and WongKinYiu/yolov7 detection checkpoints with Detect or IDetect heads "
             "(models.common Conv, Concat, MP, SP, SPPCSPC, RepConv, ImplicitA, ImplicitM), beside Ultralytics "
             "checkpoints")


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str, why: str):
        super().__init__(why)
        self.name, self.why = name, why


class _Rebuild:
    """What a checkpoint's GLOBAL of a module class resolves to: torch's NEWOBJ calls ``cls.__new__(cls, *args)``,
    which creates the real class's instance (its state follows by BUILD); calling it (REDUCE) is refused."""

    def __init__(self, cls: type, name: str):
        self.cls, self.name = cls, name
        self.__new__ = self._new  # found in the instance dict before object.__new__

    def _new(self, _stand_in, *args):
        return self.cls.__new__(self.cls, *args)

    def __call__(self, *args, **kwargs):
        raise _Refused(self.name, f"it calls the class '{self.name}' with arguments, which would run the class's "
                                  f"constructor on data from the file (a checkpoint rebuilds a module from its saved "
                                  f"state, never by calling its class)")

    def __repr__(self):
        return f"<rebuild-only {self.name}>"


def _forward_getattr(obj, name):
    """``builtins.getattr`` as checkpoints use it: a ``forward*`` function of an allowlisted module class
    (``Detect.forward`` in yolov5-seg's ``Segment.detect``), or the bound ``forward*`` method of a module
    (``forward = forward_fuse`` after Ultralytics' ``fuse()``). Anything else is refused."""
    cls = obj.cls if isinstance(obj, _Rebuild) else type(obj) if isinstance(obj, nn.Module) else None
    fn = inspect.getattr_static(cls, name, None) if cls is not None and isinstance(name, str) else None
    if (cls in _registry().real_classes and name.startswith("forward") and inspect.isfunction(fn)):
        return fn if isinstance(obj, _Rebuild) else fn.__get__(obj)
    owner = obj.name if isinstance(obj, _Rebuild) else type(obj).__name__
    raise _Refused("builtins.getattr", f"it takes the attribute {name!r} of {owner} with builtins.getattr (a "
                                      f"checkpoint only refers to the forward methods of its module classes that way)")


class _Registry:
    def __init__(self):
        self.entries: dict[str, list] = {}  # checkpoint name -> safe_globals entries it needs
        self.real_classes: set[type] = set()
        self.walked: list[str] = []
        modules = []
        for pkg in MODULE_PACKAGES:
            modules += _walk(pkg, self.walked)
        for mod in modules:
            for cls in _classes(mod):
                if issubclass(cls, nn.Module):
                    self._rebuild_only(cls)
        for name in OBJECT_MODULES:
            with contextlib.suppress(ImportError):
                mod = importlib.import_module(name)
                self.walked.append(name)
                for cls in _classes(mod):
                    self._rebuild_only(cls)
        # A class under another name of a walked module (models.yolo.Model = DetectionModel: yolov7 pickles 'Model')
        for mod in modules:
            for attr, obj in vars(mod).items():
                if isinstance(obj, type) and obj in self.real_classes and f"{mod.__name__}.{attr}" not in self.entries:
                    self._rebuild_only(obj, f"{mod.__name__}.{attr}")
        self._data_types()
        for old, new in LEGACY_ALIASES.items():
            if new in self.entries:
                obj = self.entries[new][0]
                self.entries[old] = [(obj[0], old), *self.entries[new][1:]]
        self.entries["builtins.getattr"] = [(_forward_getattr, "builtins.getattr")]

    def _rebuild_only(self, cls: type, name: str | None = None):
        for name in spelled_names(name or f"{cls.__module__}.{cls.__qualname__}"):
            self.entries[name] = [(_Rebuild(cls, name), name), (cls, name + _BUILD_SUFFIX)]
        self.real_classes.add(cls)

    def _add(self, obj, *names):
        for name in names:
            self.entries[name] = [(obj, name)]

    def _data_types(self):
        """Types of checkpoint metadata whose constructors only build data (calling them is harmless)."""
        self._add(IterableSimpleNamespace, "ultralytics.utils.IterableSimpleNamespace")
        self._add(types.SimpleNamespace, "types.SimpleNamespace")
        local = pathlib.WindowsPath if os.name == "nt" else pathlib.PosixPath  # a path pickled on the other OS
        for m in ("pathlib", "pathlib._local"):
            self._add(local, f"{m}.PosixPath", f"{m}.WindowsPath")
            self._add(pathlib.PurePosixPath, f"{m}.PurePosixPath")
            self._add(pathlib.PureWindowsPath, f"{m}.PureWindowsPath")
        # numpy scalars (np.float64 in Ultralytics' metrics), dtypes and arrays, under numpy 1 and 2 module names
        scalar = np.float64(0).__reduce__()[0]
        reconstruct = np.ndarray((0,)).__reduce__()[0]
        dtype_classes = {type(np.dtype(c)) for c in np.typecodes["All"]}
        dtype_classes |= {c for c in vars(getattr(np, "dtypes", object)).values() if isinstance(c, type)
                          and issubclass(c, np.dtype)}
        self._add(np.ndarray, "numpy.ndarray")
        for m in ("numpy.core.multiarray", "numpy._core.multiarray"):
            self._add(scalar, f"{m}.scalar")
            self._add(reconstruct, f"{m}._reconstruct")
        # a dtype's BUILD checks type(instance) (numpy.dtypes.Float64DType, ...), which no pickle names itself
        self.entries["numpy.dtype"] = [(np.dtype, "numpy.dtype")] + [
            (c, f"numpy.dtypes.{c.__name__}{_BUILD_SUFFIX}") for c in sorted(dtype_classes, key=str)]

    def refusal(self, name: str) -> str:
        """Why ``name`` (a global outside the allowlist) is refused."""
        return (f"it names the global '{name}', which is not one of the module classes and data types a YOLO "
                f"checkpoint holds (unpickling it would import '{name}' and could call it)")


def _walk(package: str, walked: list) -> list:
    try:
        root = importlib.import_module(package)
    except ImportError:
        return []
    mods = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
        try:
            mods.append(importlib.import_module(info.name))
        except Exception:  # an optional backend (e.g. triton) that is not installed: none of its classes load
            continue
    walked.extend(m.__name__ for m in mods)
    return mods


def _classes(mod) -> list[type]:
    return [c for c in vars(mod).values() if isinstance(c, type) and c.__module__ == mod.__name__]


@functools.lru_cache(maxsize=1)
def _registry() -> _Registry:
    return _Registry()


def allowlist() -> list[str]:
    """The names a checkpoint may use beyond torch's own allowlist (tensors, dtypes, OrderedDict, ...)."""
    return sorted(_registry().entries)


def is_trusted(trust: bool | None = None) -> bool:
    if trust is not None:
        return bool(trust)
    return os.environ.get(TRUST_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@contextlib.contextmanager
def trusting(trust: bool):
    """Within the block, checkpoints load in full (``--trust-checkpoint``); through the environment, so that
    DDP workers started meanwhile inherit it. A no-op for ``trust=False`` (the environment variable still counts)."""
    with env_flag(TRUST_ENV, trust):
        yield


def paragraph(path, why: str) -> str:
    return (f"refused to load '{path}': {why}. A .pt checkpoint is a pickle, which can run any code it names while "
            f"it loads, so this project loads checkpoints with torch.load(weights_only=True) and accepts only what "
            f"YOLO checkpoints hold (the module classes of torch.nn, Ultralytics and this project, tensors, "
            f"containers, dtypes, numpy scalars and plain data); nothing the file names was run. If you trust the "
            f"file (you made it, or it comes from a source you trust), load it with {TRUST_HOW}: it is then "
            f"unpickled in full and what it needed beyond the safe list is printed.")


_lock = threading.Lock()


def _names(f) -> list[str] | None:
    """The globals a torch.save zip file names beyond torch's defaults, read without executing it; None for a
    file that is not such an archive (torch's legacy format, or not a checkpoint: torch.load reports it)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception:
        return None
    finally:
        if hasattr(f, "seek"):
            f.seek(0)
    return sorted({_as_unpickled(n) for n in names})


def _as_unpickled(full: str) -> str:
    """A scanned name as the unpickler resolves it: protocol-2 pickles spell Python 3 names in Python 2's
    (subprocess.Popen is 'commands.Popen'), which torch's unpickler maps back (_compat_pickle)."""
    module, _, name = full.rpartition(".")
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _check_names(path, names: list[str]) -> None:
    reg = _registry()
    for name in names:
        if name not in reg.entries:
            missing = _missing_class(path, name)
            if missing:
                raise MissingClassError(missing)
            raise UnsafeCheckpointError(path, reg.refusal(name))


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


def _missing_class(path, name: str) -> str | None:
    """The paragraph of ``missing_class_message`` for a class of another YOLO release (a name under
    this repo's ``models`` package that it does not define), found without importing anything new."""
    module, _, attr = name.rpartition(".")
    if module.split(".")[0] not in ("models", "utils"):
        return None
    mod = sys.modules.get(current_module(module))
    if mod is None and module.split(".")[0] == "models":
        with contextlib.suppress(ImportError, ValueError):
            if importlib.util.find_spec(current_module(module)) is not None:
                mod = importlib.import_module(current_module(module))  # this repo's own module
    if mod is not None:
        exc = AttributeError(f"Can't get attribute '{attr}' on <module '{module}'>")
    else:
        exc = ModuleNotFoundError(f"No module named '{module}'", name=module)
    return missing_class_message(path, exc)


def _safe_unpickle(f, names: list[str] | None):
    reg = _registry()
    needed = reg.entries if names is None else {n: reg.entries[n] for n in names}
    entries = [e for v in needed.values() for e in v]
    with _lock, torch.serialization.safe_globals(entries):
        return torch.load(f, map_location="cpu", weights_only=True)


def _open(path):
    return path if isinstance(path, io.IOBase) or hasattr(path, "read") else open(path, "rb")


def safe_load(path: str | Path | io.IOBase, trust: bool | None = None) -> Any:
    """``torch.load`` of a checkpoint on the CPU, safely: only the allowlisted globals, modules rebuilt from their
    state, model yamls checked. ``UnsafeCheckpointError`` (a ValueError) names what was refused, unless the file is
    trusted (``trust=True``, or ``YOLO_QAT_TRUST_CHECKPOINT=1`` when ``trust`` is None): then it is loaded in full
    with ``weights_only=False`` and what it needed beyond the allowlist is printed to stderr. Other load errors
    (not a checkpoint, truncated, ...) are torch's, unchanged."""
    label = path if isinstance(path, (str, Path)) else getattr(path, "name", "<file object>")
    with contextlib.ExitStack() as stack:
        f = _open(path)
        if f is not path:
            stack.callback(f.close)
        _within_limits(label, check_archive, f)  # before anything is inflated
        names = _names(f)
        try:
            if names is not None:
                _check_names(label, names)
            obj = _safe_unpickle(f, names)
            _within_limits(label, check_object_tree, obj)  # before anything walks the modules (float(), to())
            check_model_yamls(obj, label)
            return obj
        except OversizedCheckpointError:
            raise
        except UnsafeCheckpointError as e:
            if not is_trusted(trust):
                raise
            reason = e.why
        except pickle.UnpicklingError as e:
            refused = _refusal_of(e) or _refusal_from_message(str(e))
            if refused is None:
                raise
            if not is_trusted(trust):
                raise UnsafeCheckpointError(label, refused) from None
            reason = refused
        extra = [n for n in names or [] if n not in _registry().entries]
        print(f"{label}: loading a trusted checkpoint in full ({TRUST_ENV}=1 / --trust-checkpoint), "
              f"torch.load(weights_only=False); beyond the safe list it allowed "
              f"{', '.join(extra) if extra else 'what the safe loader refused'}: {reason}", file=sys.stderr)
        f.seek(0)
        obj = torch.load(f, map_location="cpu", weights_only=False, pickle_module=renaming_pickle)
        _within_limits(label, check_object_tree, obj)
        return obj


def _within_limits(label, check, what) -> None:
    try:
        check(what)
    except StructureError as e:
        raise OversizedCheckpointError(label, e.why) from None


def _refusal_of(e: BaseException) -> str | None:
    """The reason of a refusal raised inside torch's weights_only unpickler by a stand-in or ``_forward_getattr``
    (torch re-raises it as its own UnpicklingError); None for other errors."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, _Refused):
            return e.why
        e = e.__cause__ or e.__context__
    return None


def _refusal_from_message(msg: str) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+) (was not an allowed global|whose module)", msg)
    if m:
        return _registry().refusal(m.group(1))
    if "Only persistent_load of storage is allowed" in msg:  # modules pickled with their source code
        return ("it is in PyTorch's legacy serialization format (torch < 1.6, _use_new_zipfile_serialization=False), "
                "which stores modules with their source code and cannot be read without unpickling it in full; "
                "re-save it with a current torch.save where it was made")
    return None


# -- model yamls (the rule lives in models/yaml_rule.py) ---------------------------------------------------------
def check_model_yamls(obj, path) -> None:
    """Refuse a checkpoint whose model yaml (``model.yaml`` of its model / EMA, a packed file's ``yaml``) would run
    code when the model is rebuilt from it (train_qat.py from an FP checkpoint, packed files, teachers)."""
    if not isinstance(obj, dict):
        return
    yamls = [getattr(obj.get(k), "yaml", None) for k in ("model", "ema") if isinstance(obj.get(k), nn.Module)]
    yamls.append(obj.get("yaml"))
    for d in yamls:
        problem = yaml_problem(d) if isinstance(d, dict) else None
        if problem:
            raise UnsafeCheckpointError(path, yaml_refusal(problem))
