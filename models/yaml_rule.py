"""The one rule for every model yaml this project builds a model from: checkpoints' and EMAs' ``model.yaml``, packed
files' ``yaml``, ``--cfg`` files and teachers. It carries the guarantee that building runs no code from the file.

Ultralytics' ``parse_model`` ``eval()``s a yaml's ``activation``, looks each layer's module name up in a namespace
that also holds functions and whole model classes (``DetectionModel(cfg)`` parses and builds a second yaml from the
layer's arguments), and unpacks every layer as ``from, n, module, args`` (a dict layer unpacks its keys). So, at
every depth of the yaml (every dict and list, not only the top level):

- an ``activation`` is a literal ``[torch.]nn.<Activation>(<literal args>)``;
- ``backbone`` and ``head`` are lists of layers, and a layer is a list ``[from, n, module, args]``;
- a layer's module is a *layer* class: an ``nn.Module`` class of ``torch.nn``, ``torchvision.ops`` or
  ``ultralytics.nn.modules`` (this repo's layer map for the original YOLOv5 / YOLOv7 format), never a model class
  (``BaseModel`` subclasses, ``Ensemble``: they parse a yaml of their own), a function, or ``TorchVision`` (it
  loads, and may download, a whole torchvision model by name).

Ultralytics 8.4 has a restricted build mode of its own (``ultralytics.nn.tasks._SafeLoad``: no ``eval``, only
``nn.Module`` layer names). It still admits model classes as layers, so it is not what the guarantee rests on:
``restricted_build`` turns it on around the project's own rebuilds as a second line.
"""
from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import torchvision.ops
import yaml
from torch import nn
from ultralytics.nn import tasks
from ultralytics.nn.tasks import BaseModel, yaml_model_load

from .registry import MODEL_CFGS, is_original_yaml
from .yolo import _MODULES

MAX_YAML_NODES = 100_000  # a YOLO yaml has ~300 items; anchors (aliases) shared level by level are counted per path
_LAYER_PACKAGES = ("torch.nn.modules", "torchvision.ops", "ultralytics.nn.modules")
_NOT_LAYERS = ("TorchVision",)  # layer-package classes that load a whole model by name


def literal_activation(act) -> bool:
    """True for ``[torch.]nn.<nn.Module class>(<literal args>)``, the only activation built without eval: one call of
    that attribute chain, every argument a literal, no ``*`` / ``**`` unpacking."""
    if not isinstance(act, str) or len(act) > 1000:
        return False
    try:
        call = ast.parse(act.strip(), mode="eval").body
        if not isinstance(call, ast.Call) or any(k.arg is None for k in call.keywords):
            return False
        chain, node = [], call.func
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or [*chain[1:], node.id] not in (["nn"], ["nn", "torch"]):
            return False
        for a in [*call.args, *(k.value for k in call.keywords)]:
            ast.literal_eval(a)  # a Starred or any expression raises
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return False
    cls = getattr(nn, chain[0], None)
    return isinstance(cls, type) and issubclass(cls, nn.Module)


def _resolve(name: str, original: bool):
    """The object a builder would take for the layer module ``name`` (None: unknown)."""
    if name.startswith("nn."):
        return getattr(nn, name[3:], None)
    if name.startswith("torchvision.ops."):
        return getattr(torchvision.ops, name[16:], None)
    if original:
        return _MODULES.get(name)
    return vars(tasks).get(name)


def _is_layer_class(obj) -> bool:
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)) or issubclass(obj, BaseModel):
        return False
    if obj.__name__ in _NOT_LAYERS:
        return False
    return obj.__module__.startswith(_LAYER_PACKAGES) or obj.__module__ in ("yolo_qat.models.common", "yolo_qat.models.yolo")


def _layer_problem(layer, original: bool) -> str | None:
    if not isinstance(layer, (list, tuple)) or len(layer) != 4:
        return f"the layer {_short(layer)}, which is not a list [from, n, module, args]"
    module, args = layer[2], layer[3]
    if not isinstance(module, str) or not isinstance(args, (list, tuple)):
        return f"the layer {_short(layer)}, whose module is not a name or whose args are not a list"
    if not _is_layer_class(_resolve(module, original)):
        return (f"the layer module {module!r}, which is not a layer class (a model class, a function, a whole-model "
                f"loader or an unknown name)")
    return None


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


def _dict_problem(d: dict, original: bool) -> str | None:
    act = d.get("activation")
    if act and not literal_activation(act):
        return f"activation {_short(act)}"
    for part in ("backbone", "head"):
        if part not in d:
            continue
        if not isinstance(d[part], (list, tuple)):
            return f"a '{part}' that is not a list of layers"
        for layer in d[part]:
            problem = _layer_problem(layer, original)
            if problem:
                return problem
    return None


def yaml_problem(d) -> str | None:
    """What this model yaml (a dict) names that a builder would evaluate, call or build beyond layer classes, or
    None: the rule of the module docstring, applied to every dict at any depth."""
    original = isinstance(d, dict) and is_original_yaml(d)
    stack, seen = [d], 0
    while stack:
        x = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            return f"more than {MAX_YAML_NODES:,} items (walked as a tree; a YOLO yaml has a few hundred)"
        if isinstance(x, dict):
            problem = _dict_problem(x, original)
            if problem:
                return problem
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return None


def yaml_refusal(problem: str) -> str:
    return (f"its model yaml names {problem}; Ultralytics' model builder would evaluate, call or build that as "
            f"Python when the model is rebuilt from the yaml (only layer classes of torch.nn, torchvision.ops and "
            f"Ultralytics' modules, layers as [from, n, module, args] lists and a literal nn.<Activation>(...) are "
            f"built safely)")


def check_model_yaml_file(path: str | Path) -> None:
    """ValueError (one paragraph) for a model yaml file (``--cfg``) that breaks the rule; nothing is built."""
    try:
        d = yaml.safe_load(Path(path).read_text(encoding="utf-8", errors="ignore"))
    except (yaml.YAMLError, OSError) as e:
        raise ValueError(f"model yaml '{path}' is not readable yaml ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise ValueError(f"model yaml '{path}' is not a mapping of model settings (backbone, head, ...)")
    problem = yaml_problem(d)
    if problem:
        raise ValueError(f"refused to build from '{path}': {yaml_refusal(problem)}.")


def _is_ultralytics_cfg(name: str) -> bool:
    # Ultralytics resolves 'yolov8n-seg.yaml' to cfg/models/v8/yolov8-seg.yaml with scale 'n'; the same lookup
    # (scale-stripped, then searched in its package) tells whether it would find the file.
    try:
        yaml_model_load(name)
    except Exception:
        return False
    return True


def resolve_model_cfg(name_or_path: str | Path) -> str:
    """Return the yaml path for a short name ('yolov5nu', 'yolov7-tinyu-seg.yaml'), an existing file, or an
    Ultralytics model yaml name ('yolo11n.yaml'); raise ValueError otherwise."""
    s = str(name_or_path)
    key = s[:-5] if s.endswith(".yaml") else s
    if key in MODEL_CFGS:
        return MODEL_CFGS[key]
    if Path(s).is_file():
        check_model_yaml_file(s)  # a user's file: built only if it follows the rule (ValueError, one paragraph)
        return s
    if s.endswith((".yaml", ".yml")) and Path(s).name == s and _is_ultralytics_cfg(s):
        return s
    raise ValueError(f"unknown model config {s!r}; known names: {', '.join(MODEL_CFGS)}, an existing yaml path, "
                     "or an Ultralytics model yaml such as 'yolov8n.yaml' or 'yolo11n-seg.yaml'")


@contextlib.contextmanager
def restricted_build():
    """Within the block (this thread), Ultralytics' own parse_model builds without eval and only from nn.Module
    names, where the installed Ultralytics has that mode; a no-op elsewhere. A second line behind ``yaml_problem``."""
    safe = getattr(tasks, "_SafeLoad", None)
    local = getattr(safe, "_local", None)
    if local is None:
        yield
        return
    before = getattr(local, "active", False)
    local.active = True
    try:
        yield
    finally:
        local.active = before
