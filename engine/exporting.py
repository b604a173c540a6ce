"""The export stage: a quantized (or original anchor-based) checkpoint to an ONNX file for its deploy target or a
bit-packed integer checkpoint, then checked against the PyTorch model (onnxruntime, or the packed file reloaded)
on random images or validation images of a dataset."""
from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ultralytics.cfg import get_cfg
from ultralytics.data import build_yolo_dataset

from yolo_qat import deploy
from yolo_qat.deploy.verify import compare_onnxruntime
from yolo_qat.engine.calib import resolve_data
from yolo_qat.engine.cli_common import InputError, RunFailed, output_dir
from yolo_qat.engine.data_download import check_dataset
from yolo_qat.engine.source import resolve_source
from yolo_qat.models.original import prepare_original
from yolo_qat.quant import is_quantized

FORMATS = ("onnx", "packed")


@dataclass
class ExportResult:
    """``path``: the written file; ``weights``: the checkpoint it came from; ``target``: the deploy target of an
    ONNX file (None for a packed one); ``verify``: the check against PyTorch (empty with verify=False)."""

    path: Path
    weights: Path
    format: str
    target: str | None = None
    verify: dict = field(default_factory=dict)


def output_path(weights: Path, fmt: str, output=None, project=None, name=None, exist_ok: bool = False) -> Path:
    """``output``, else <project>/<name>/<stem>.onnx|.qpk when either is given, else beside the checkpoint."""
    suffix = ".onnx" if fmt == "onnx" else ".qpk"
    if output:
        return Path(output)
    if project is None and name is None:
        return weights.with_suffix(suffix)
    where = argparse.Namespace(project=project or "runs/export", name=name or "exp", exist_ok=exist_ok)
    return output_dir(where) / (weights.stem + suffix)


def verify_images(data, imgsz: int, batch: int) -> torch.Tensor:
    """``batch`` images of the dataset's val split (repeated if it has fewer), letterboxed to imgsz x imgsz by
    Ultralytics' own val transforms, in [0, 1]."""
    d = check_dataset(resolve_data(data))
    ds = build_yolo_dataset(get_cfg(overrides={"imgsz": imgsz}), d["val"], batch, d, mode="val", rect=False)
    return torch.stack([ds[i % len(ds)]["img"] for i in range(batch)]).float() / 255


def export_stage(weights, target: str | None = None, format: str = "onnx", *, data=None, imgsz: int | None = None,
                 batch: int = 1, opset: int = 21, dynamic: bool = False, offset_mode: str = "exact", output=None,
                 project=None, name=None, exist_ok: bool = False, verify: bool = True, device: str = "cpu",
                 prog: str = "export") -> ExportResult:
    """Export ``weights`` (see the module). ``target`` only confirms the checkpoint's own (None: that one).
    InputError for what the user can fix; RunFailed when a packed file does not reload to the same outputs."""
    if device != "cpu":
        raise InputError(f"--device {device}: export runs on the CPU (the graph is traced there and checked with "
                         f"onnxruntime's CPU provider); pass --device cpu or leave it out")
    if format not in FORMATS:
        raise InputError(f"format={format!r} is invalid: allowed values are {FORMATS}")
    src = resolve_source(weights, tasks=("detect", "segment", "classify", "pose", "obb"))
    weights, model = Path(src.path), src.model
    if model is None:
        raise InputError(f"'{weights}' is a model yaml: export takes a trained checkpoint (.pt)")
    if src.original:
        model = prepare_original(model)  # names, stride, channels as the rest of the project reads them
    size = (imgsz or src.imgsz,) * 2
    if verify and data is not None:  # a dataset that cannot be used ends the run before any file is written
        try:
            check_dataset(resolve_data(data))
        except FileNotFoundError as e:
            raise InputError(str(e)) from None
    out = output_path(weights, format, output, project, name, exist_ok)
    warnings.simplefilter("always", deploy.ExportWarning)
    try:
        if format == "onnx":
            deploy.export_onnx(model, out, size, opset, dynamic, offset_mode, batch=batch, target=target)
        else:
            deploy.save_packed(model, out)
    except deploy.NothingQuantizedError as e:
        raise InputError(f"'{weights}': {e}") from None
    except ValueError as e:
        raise InputError(str(e)) from None
    ratio = weights.stat().st_size / out.stat().st_size  # a float ONNX of an fp16 checkpoint is the larger one
    print(f"{prog}: wrote {out} ({_mb(out)}); checkpoint {weights} is {_mb(weights)} "
          f"({f'{ratio:.1f}x larger' if ratio >= 1 else f'{1 / ratio:.1f}x smaller'})")
    res = ExportResult(out, weights, format, (getattr(model, "quant_recipe", None) or {}).get("target", target)
                       if format == "onnx" else None)
    if verify:
        res.verify = _verify(model, out, format, data, size, batch, prog)
    return res


def _verify(model, out: Path, fmt: str, data, size: tuple, batch: int, prog: str) -> dict:
    try:
        x = (verify_images(data, size[0], batch) if data is not None else
             torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0)))
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    what = f"{len(x)} validation image(s) of {data}" if data is not None else "a random image" \
        if len(x) == 1 else f"{len(x)} random images"
    if fmt == "onnx":
        try:
            r = compare_onnxruntime(model, out, x)
        except ValueError as e:  # e.g. external data outside the file's folder (deploy/onnx_files.py)
            raise InputError(str(e)) from None
        codes = (f"; activation codes differing: {r['code_flips']} of {r['codes']}" if is_quantized(model)
                 else " (float model)")
        print(f"{prog}: onnxruntime vs PyTorch{' fake-quant' if is_quantized(model) else ''} on {what}: "
              f"max |diff| {r['max_abs']:.3g} (outputs up to {r['max_ref']:.3g}){codes}")
        return dict(r)
    with torch.no_grad():
        same = _first(deploy.load_packed(out)(x)).equal(_first(model(x)))
    print(f"{prog}: packed checkpoint reloads to {'identical' if same else 'DIFFERENT'} outputs on {what}")
    if not same:
        raise RunFailed(f"the packed checkpoint {out} does not reload to the model's outputs on {what}")
    return {"identical": same}


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB"


def _first(y):
    while isinstance(y, (tuple, list)):
        y = y[0]
    return y
