"""ONNX Q/DQ export of quantized (QAT / QC) YOLO models.

Ultralytics' (anchor-free) models keep Ultralytics' ONNX interface (input ``images``; ``output0``
[+ ``output1`` protos for segmentation], same shapes and metadata keys as ``yolo export
format=onnx``), so Ultralytics' NMS and ``YOLO('model.onnx')`` apply unchanged.
The original anchor-based YOLOv5 / YOLOv7 models (models.yolo) keep the interface of yolov5's
``export.py``: ``output0`` (B, N, 5+nc[+nm]) = xywh in pixels, objectness, class scores [, mask
coefficients], and for segmentation ``output1`` the protos (B, nm, H/4, W/4), so the NMS and the
deployment code written for those files take ours unchanged. These are also exported in float
(fused: BN and the implicit layers folded), since Ultralytics' exporter does not take them.
Inside, every quantized conv is Q/DQ(activation) -> Conv(DequantizeLinear(integer weight)) ->
Mul(out_scale) -> Add(bias); an IDetect's ImplicitA stays an Add in front of its head conv's
activation quantizer (no exact fold exists there), its ImplicitM is in the Mul.
"""
from __future__ import annotations

import copy
import json
import warnings
from datetime import datetime
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter
from torch import nn
from ultralytics import __version__
from ultralytics.nn.modules import C2f, Detect
from ultralytics.nn.tasks import SegmentationModel, guess_model_task

from yolo_qat.models import fold_bn_into_quant_convs, make_fuse_quant_aware
from yolo_qat.models.facts import is_original
from yolo_qat.models.yolo import Detect as AnchorDetect
from yolo_qat.quant import is_quantized, layer_bits
from yolo_qat.quant.targets import Target, get_target, model_target

from .degenerate_bias import ExportWarning
from .ort_modules import swap_for_ort
from .qdq_conv import swap_quant_convs

MIN_OPSET = 13  # per-axis DequantizeLinear (per-channel weight scales) first appears in opset 13
INT4_OPSET = 21  # first opset with INT4 tensors
try:  # the TorchScript exporter stops below the ONNX release's max; later opsets come from onnx's converter
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as TS_MAX_OPSET
except ImportError:  # pragma: no cover - older torch
    TS_MAX_OPSET = 17


class NothingQuantizedError(ValueError):
    """The model has no quantized layer: there are no integer weights to export."""


def _set_export_mode(model: nn.Module, imgsz: tuple[int, int], dynamic: bool) -> None:
    """The same switches Ultralytics' Exporter sets on its heads (ultralytics/engine/exporter.py),
    so the output layout is the one of ``yolo export format=onnx``."""
    for m in model.modules():
        if isinstance(m, AnchorDetect):  # yolov5's export switches: (pred,) / (pred, proto), grids per shape
            m.dynamic, m.export = dynamic, True
        elif isinstance(m, Detect):
            m.dynamic, m.export, m.format = dynamic, True, "onnx"
            m.max_det = min(300, sum(int(imgsz[0] / s) * int(imgsz[1] / s) for s in model.stride.tolist()))
            m.agnostic_nms, m.xyxy, m.shape = False, False, None
        elif isinstance(m, C2f):
            m.forward = m.forward_split


def prepare_export_model(model: nn.Module, imgsz=(640, 640), dynamic: bool = False,
                         offset_mode: str = "exact", target: str | None = None) -> tuple[nn.Module, dict]:
    """A fused, export-mode copy of ``model`` with the export form of every QuantConv2d: QDQConv2d for
    the ``sim`` target, ORTConv2d (and the output quantizers' Q/DQ) for the integer targets (none for a float original
    YOLOv5 / YOLOv7 model, the only float models exported here). ``target`` None: the model's own."""
    quantized = is_quantized(model)
    if not quantized and not is_original(model):
        raise NothingQuantizedError(
            "the model has no quantized layer (no QuantConv2d): there is nothing quantized to export. "
            "Export a QAT or QC checkpoint (train_qat.py / correct_qc.py output), or use Ultralytics' own "
            "`yolo export format=onnx` for a float model")
    m = copy.deepcopy(getattr(model, "module", model)).float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    if quantized:
        if is_original(m):
            make_fuse_quant_aware(m)  # a quantized RepConv must keep its branches (in case finalize was skipped)
        # BN -> out_scale/bias of the quantized convs first (exact, integer weights unchanged), whatever
        # the model's class; then the model's fuse() for any float conv left.
        fold_bn_into_quant_convs(m)
    m = m.fuse(verbose=False)
    _set_export_mode(m, imgsz, dynamic)
    tgt = export_target(model, target) if quantized else None
    if tgt is not None and tgt.integer:
        return m, swap_for_ort(m, tgt)
    return m, swap_quant_convs(m, offset_mode)


def export_target(model: nn.Module, target: str | None = None) -> Target:
    """The target to export for: ``target``, else the one the model was trained for. Exporting a model for
    a target that quantizes more than it was trained with is refused (the runtime would run quantizers
    QAT never saw); the other way (an ``ort`` model to ``sim``) only drops quantizers, and is refused too:
    the file would not compute what the model computes."""
    trained = model_target(model)
    want = get_target(target) if target is not None else trained
    if want.name != trained.name and is_quantized(model):
        hint = (f"QAT for it from the FP model: train_qat.py --weights <the FP checkpoint> --target {want.name}, "
                f"or export this one with --target {trained.name}")
        raise ValueError(f"the model was trained for target '{trained.name}' and cannot be exported for "
                         f"'{want.name}': what runs would not be what was trained. Use {hint}")
    return want


def _output_names(model: nn.Module) -> list[str]:
    return ["output0", "output1"] if isinstance(model, SegmentationModel) else ["output0"]


def _dynamic_axes(names: list[str], original: bool) -> dict:
    # Ultralytics' output0 is (B, 4+nc[+nm], N), the original one (B, N, 5+nc[+nm])
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1 if original else 2: "anchors"}}
    if "output1" in names:
        axes["output1"] = {0: "batch", 2: "mask_height", 3: "mask_width"}
    return axes


def _narrow_to_int4(model_onnx: onnx.ModelProto, names: dict[str, str]) -> int:
    """Rewrite the int8 weight initializers listed in ``names`` (layer -> initializer) as INT4."""
    inits = {t.name: t for t in model_onnx.graph.initializer}
    for name in names.values():
        t = inits[name]
        a = numpy_helper.to_array(t)
        t.CopyFrom(helper.make_tensor(name, TensorProto.INT4, a.shape, a.reshape(-1).tolist()))
    return len(names)


def _metadata(model: nn.Module, imgsz, batch: int, layers: dict) -> dict:
    """Ultralytics' ONNX metadata keys (read by AutoBackend) plus our per-layer quantization table."""
    if is_original(model):
        what = "quantized (QAT/QC), ONNX Q/DQ" if layers else "float, fused"
        protos = "; output1 protos" if len(_output_names(model)) > 1 else ""
        desc = (f"original anchor-based YOLOv5/YOLOv7, {what}; output0 (batch, anchors, 5+nc[+nm]): xywh pixels, "
                f"objectness, class scores[, mask coefficients]{protos}")
    else:
        desc = "Ultralytics YOLO, quantized (QAT/QC), ONNX Q/DQ"
    return {"description": desc, "author": "qat-yolo export.py",
            "date": datetime.now().astimezone().isoformat(), "version": __version__,
            "stride": int(max(model.stride)), "task": getattr(model, "task", None) or guess_model_task(model), "head": type(model.model[-1]).__name__,
            "batch": batch, "imgsz": list(imgsz), "names": model.names, "channels": model.yaml.get("channels", 3),
            "end2end": getattr(model, "end2end", False), "quant_recipe": json.dumps(getattr(model, "quant_recipe", None)),
            "quant_layers": json.dumps(layers)}


def export_onnx(model: nn.Module, path: str | Path, imgsz: int | tuple[int, int] = 640, opset: int = INT4_OPSET,
                dynamic: bool = False, offset_mode: str = "exact", batch: int = 1, target: str | None = None) -> Path:
    """Export a quantized YOLO model to ONNX with QuantizeLinear/DequantizeLinear (or a float original
    YOLOv5 / YOLOv7 model, fused, without them); returns the path.

    ``opset >= 21`` stores weights of <= 4 bits as INT4 initializers; older opsets keep them in an
    int8 container clipped to their b-bit range (with an ExportWarning). ``offset_mode``: see
    ``qdq_conv.activation_grid``. ``model.quant_recipe`` and a per-layer table
    (``quant_layers``: weight initializer, bits, zero point) go into the ONNX metadata.
    """
    if opset < MIN_OPSET and is_quantized(model):
        raise ValueError(f"opset={opset}: quantized export needs opset >= {MIN_OPSET} (per-channel DequantizeLinear)")
    imgsz = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    tgt = export_target(model, target) if is_quantized(model) else get_target("sim")
    if tgt.integer and tgt.int4_weights and opset < INT4_OPSET and any(w <= 4 for w, _ in layer_bits(model).values()):
        raise ValueError(f"target '{tgt.name}' stores <= 4-bit weights as INT4 initializers, which need opset >= "
                         f"{INT4_OPSET} (got --opset {opset}): use --opset {INT4_OPSET}")
    m, convs = prepare_export_model(model, imgsz, dynamic, offset_mode, tgt.name)
    im = torch.zeros(batch, m.yaml.get("channels", 3), *imgsz)
    with torch.no_grad():
        m(im)  # dry run: Detect caches anchors for the static shape, as in Ultralytics' exporter
    names = _output_names(m)
    axes = _dynamic_axes(names, is_original(m)) if dynamic else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # dynamo=False is deprecated, still supported
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(m, (im,), str(path), opset_version=min(opset, TS_MAX_OPSET), input_names=["images"],
                          output_names=names, dynamic_axes=axes,
                          do_constant_folding=True, dynamo=False)
    model_onnx = onnx.load(str(path))
    if opset > TS_MAX_OPSET:
        model_onnx = version_converter.convert_version(model_onnx, opset)
    inits = {t.name for t in model_onnx.graph.initializer}
    weight_names = {n: f"{n}.weight_int" for n in convs}
    missing = [w for w in weight_names.values() if w not in inits]
    if missing:  # the exporter renamed or folded them: the artifact could not be checked, so refuse it
        raise RuntimeError(f"ONNX export lost the integer weight initializers {missing[:3]}...")
    narrow = {n: w for n, w in weight_names.items() if convs[n].w_bits <= 4 and tgt.int4_weights}
    if tgt.integer:
        _narrow_to_int4(model_onnx, narrow)
        layers = {n: {"weight": weight_names[n], "w_bits": c.w_bits, "a_bits": c.a_bits,
                      "weight_dtype": "int4" if n in narrow else "int8",
                      "input_scale": c.input_scale, "zero_point": int(c.input_zero_point),
                      "shared_input": c.shared_input} for n, c in convs.items()}
        return _finish(model_onnx, m, imgsz, batch, layers, path, tgt)
    if opset >= INT4_OPSET:
        _narrow_to_int4(model_onnx, narrow)
    elif narrow:
        warnings.warn(f"opset {opset} < {INT4_OPSET} has no INT4 type: {len(narrow)} weight tensors of <= 4 bits are "
                      f"stored in an int8 container (values clipped to their b-bit range); use --opset {INT4_OPSET} "
                      f"for INT4 initializers", ExportWarning, stacklevel=2)
    shifted = {n: c.act.zp_shift for n, c in convs.items() if c.act is not None and c.act.zp_shift > 1e-6}
    if shifted:
        worst = max(shifted, key=shifted.get)
        warnings.warn(f"offset_mode='zero_point': {len(shifted)} LSQ+ offsets are not an integer number of steps; "
                      f"rounded zero points shift those grids by up to {shifted[worst]:.3f} step ({worst}). "
                      f"Use offset_mode='exact' for the trained grid", ExportWarning, stacklevel=2)
    layers = {n: {"weight": weight_names[n], "w_bits": c.w_bits, "a_bits": c.a_bits,
                  "weight_dtype": "int4" if n in narrow and opset >= INT4_OPSET else "int8",
                  "zero_point": None if c.act is None else c.act.zero_point,
                  "offset": None if c.act is None else c.act.offset} for n, c in convs.items()}
    return _finish(model_onnx, m, imgsz, batch, layers, path, tgt)


def _finish(model_onnx, m, imgsz, batch, layers, path, tgt: Target) -> Path:
    for k, v in _metadata(m, imgsz, batch, layers).items():
        model_onnx.metadata_props.add(key=k, value=str(v))
    model_onnx.metadata_props.add(key="quant_target", value=tgt.name)
    onnx.checker.check_model(model_onnx)
    onnx.save(model_onnx, str(path))
    return path
