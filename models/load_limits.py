"""Size and shape limits on what a checkpoint file may hold, checked before anything inflates or walks it.

A file that runs no code can still hang or exhaust a machine: a zip record that inflates from 250 KB to 256 MiB, or a
module tree whose children are shared level by level (a DAG of 64 levels is 2^64 paths for ``_apply`` /
``float()`` / ``to()``, which visit a module once per path). The safe loader (``models/safe_load.py``) runs
``check_archive`` before ``torch.load`` and ``check_object_tree`` on what the unpickler returns, before anything
else touches it. The bounds are far above any real YOLO and are stated with what they were measured against:

- archive: a torch.save zip stores its records uncompressed, so their sizes sum to less than the file; up to
  ``MAX_INFLATION`` times the file is allowed (a re-zipped checkpoint: float weights do not compress that well),
  which is what stops a compression bomb, and never more than ``MAX_ARCHIVE_BYTES`` (8 GiB). Not 1 GB: the largest
  YOLO, yolov8x-seg (72 M parameters, 0.29 GB per fp32 copy), saved as a QAT ``last.pt`` keeps the model, its EMA
  and the optimizer's momentum in fp32 (0.86 GB) plus per-weight oscillation state; Ultralytics' ``YOLO.save`` of
  it (fp16) is 0.14 GB. torch itself refuses a storage whose declared byte size differs from its record's.
- module trees: a module with children of its own is the child of at most one module in the whole file (a
  childless one may repeat: every Ultralytics Conv shares one SiLU instance, ``Conv.default_act``), so the paths
  ``_apply`` walks are at most the edges; at most ``MAX_MODULE_DEPTH`` (64) levels and ``MAX_MODULES`` (100,000)
  modules. Measured: yolo11x-seg / yolo26x-seg / yolov5xu have 9 / 9 / 7 levels and 834 / 948 / 627 modules;
  quantization and QC add two levels and at most three modules per conv.
- everything else (dicts, lists, tuples, namespaces, objects' attributes) is walked as a tree too, counting a
  container reached twice twice: at most ``MAX_NODES`` (1,000,000) nodes and ``MAX_DEPTH`` (200) levels. A real
  checkpoint has ~10 items per module (its hook dicts) plus its optimizer state: < 10,000 for yolov5s (YOLO.save).
  A shared container in a crafted file is counted once per path, so a DAG that would make ``str()`` or a printer
  walk 2^64 paths is refused after 1,000,000 steps, and a cycle at the depth bound.
"""
from __future__ import annotations

import io
import os
import types
import zipfile

import torch
from torch import nn

MAX_ARCHIVE_BYTES = 8 << 30
MAX_INFLATION = 4
MAX_MODULE_DEPTH = 64
MAX_MODULES = 100_000
MAX_DEPTH = 200
MAX_NODES = 1_000_000

_CODE = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType)
_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


class StructureError(ValueError):
    """A file beyond the size or shape limits; ``why`` says which, in words for the refusal paragraph."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _file_size(f) -> int:
    if hasattr(f, "fileno"):
        try:
            return os.fstat(f.fileno()).st_size
        except (OSError, io.UnsupportedOperation):
            pass
    pos = f.tell()
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(pos)
    return size


def check_archive(f) -> None:
    """Refuse a zip checkpoint whose records would inflate beyond the bounds, from its central directory alone
    (nothing is inflated). A file that is not a zip is left to torch.load, which reports it."""
    pos = f.tell()
    try:
        if not zipfile.is_zipfile(f):
            return
        f.seek(pos)
        with zipfile.ZipFile(f) as z:
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load reports a broken archive in its own words
    finally:
        f.seek(pos)
    size = _file_size(f)
    if total > MAX_ARCHIVE_BYTES:
        raise StructureError(f"its records inflate to {total / 2**30:.2f} GiB, more than the {MAX_ARCHIVE_BYTES >> 30} "
                             f"GiB any YOLO checkpoint needs (the largest, yolov8x-seg as a QAT last.pt in fp32 with "
                             f"EMA and optimizer state, holds ~1 GB)")
    if total > MAX_INFLATION * size + (1 << 20):
        ratio = total / max(size, 1)
        raise StructureError(f"its records inflate to {total:,} bytes from a {size:,}-byte file ({ratio:.0f}x): "
                             f"torch.save stores records uncompressed, and float weights do not compress "
                             f"{MAX_INFLATION}x, so this is a compression bomb, not a checkpoint")


def check_object_tree(obj) -> None:
    """Refuse an unpickled checkpoint whose modules are not a tree within the bounds, or whose other data is
    larger or deeper than the bounds when walked as a tree (module docstring). Linear in what it visits, and it
    visits at most ``MAX_NODES`` nodes."""
    modules: set[int] = set()  # modules reached as some module's child
    expanded: set[int] = set()  # modules whose attributes were walked (each once)
    stack = [(obj, 0, 0)]  # (object, depth in the data, depth in the module tree)
    nodes = 0
    while stack:
        x, depth, mdepth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise StructureError(f"walked as a tree, its data has more than {MAX_NODES:,} items (a yolov5s "
                                 f"checkpoint has < 10,000; containers shared level by level multiply the paths "
                                 f"every printer and copier walks)")
        if depth > MAX_DEPTH:
            raise StructureError(f"its data nests more than {MAX_DEPTH} levels deep (a real YOLO checkpoint: ~20), "
                                 f"or refers to itself")
        if isinstance(x, _LEAVES):
            continue
        if isinstance(x, nn.Module):
            if id(x) in expanded:
                continue
            expanded.add(id(x))
            _push_module(x, depth, mdepth, modules, stack)
        elif isinstance(x, dict):
            stack.extend((v, depth + 1, mdepth) for kv in x.items() for v in kv)
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1, mdepth) for v in x)
        elif hasattr(x, "__dict__") and not isinstance(x, _CODE):  # data objects: namespaces, a kept loss
            stack.append((vars(x), depth + 1, mdepth))


def _push_module(m: nn.Module, depth: int, mdepth: int, modules: set, stack: list) -> None:
    held = vars(m).get("_modules", {})
    children = [c for c in (held.values() if isinstance(held, dict) else [held]) if c is not None]
    if not all(isinstance(c, nn.Module) for c in children):
        raise StructureError(f"its module {type(m).__name__} lists something other than modules as its children "
                             f"(float() / to() would call methods on it that it does not have)")
    if children and mdepth + 1 > MAX_MODULE_DEPTH:
        raise StructureError(f"its module tree is more than {MAX_MODULE_DEPTH} levels deep (the largest YOLO "
                             f"models have 9, quantized 11)")
    for c in children:
        if vars(c).get("_modules") and id(c) in modules:
            raise StructureError(f"a module with children of its own ({type(c).__name__}) is the child of two "
                                 f"modules: a model's modules form a tree (only childless ones such as the SiLU every "
                                 f"Ultralytics Conv shares may repeat), and one shared level by level makes float() / "
                                 f"to() visit it once per path, 2^levels times")
        modules.add(id(c))
        if len(modules) > MAX_MODULES:
            raise StructureError(f"it holds more than {MAX_MODULES:,} modules (the largest YOLO models have ~1,000)")
        stack.append((c, depth + 1, mdepth + 1))
    stack.extend((v, depth + 1, mdepth) for k, v in vars(m).items() if k != "_modules")
