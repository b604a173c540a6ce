"""Compact integer checkpoint: bit-packed weight codes + fp32 scales, offsets, BN and other floats.

One ``torch.save`` file of plain data (tensors, dicts, strings), loadable with
``weights_only=True``: no pickled classes, so it loads without trusting the file. The loader
rebuilds the model from its yaml, quantizes it with the stored recipe and loads the tensors; the
latent weight becomes ``code * scale``, which fake-quantizes back to the same code, so outputs are
bit-identical (the latent float weights are not kept: a packed file is for deployment, not for
resuming QAT).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from ultralytics.nn.modules import Conv
from ultralytics.nn.tasks import DetectionModel, SegmentationModel

from yolo_qat.models import fold_bn_into_quant_convs, yolo
from yolo_qat.models.safe_load import safe_load
from yolo_qat.models.yaml_rule import restricted_build
from yolo_qat.quant import is_quantized, quant_convs, quantize_model

from .bitpack import pack_codes, unpack_codes
from .onnx_qdq import NothingQuantizedError

FORMAT, VERSION = "qyolo-packed", 1


def _model_classes() -> dict:
    """Stored name -> class that rebuilds the model from its yaml, most specific first (the original
    models subclass Ultralytics' classes, SegmentationModel subclasses DetectionModel)."""
    return {"OriginalSegmentationModel": yolo.SegmentationModel, "OriginalDetectionModel": yolo.DetectionModel,
            "SegmentationModel": SegmentationModel, "DetectionModel": DetectionModel}


def _base_class_name(model: nn.Module) -> str:
    for name, cls in _model_classes().items():
        if isinstance(model, cls):
            return name
    raise ValueError(f"save_packed: unsupported model class {type(model).__name__}; supported: Ultralytics' "
                     f"DetectionModel, SegmentationModel and the original YOLOv5 / YOLOv7 ones of models.yolo")


def _is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, Conv) and not hasattr(m, "bn") for m in model.modules())


def _plain(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


def save_packed(model: nn.Module, path: str | Path) -> Path:
    """Write the packed checkpoint of a quantized YOLO model; returns the path."""
    model = getattr(model, "module", model)
    if not is_quantized(model):
        raise NothingQuantizedError("save_packed: the model has no quantized layer, there are no integer weights to pack")
    state = model.state_dict()
    int_index, chunks, pos = {}, [], 0
    for name, m in quant_convs(model).items():
        wq = m.weight_quantizer
        data = pack_codes(m.integer_weight(), wq.bits, wq.qmin)
        int_index[f"{name}.weight"] = {"bits": wq.bits, "qmin": wq.qmin, "shape": list(m.weight.shape), "per_channel": wq.per_channel,
                                       "start": pos, "nbytes": data.numel()}
        chunks.append(data)
        pos += data.numel()
    float_index, floats, other, fpos = {}, [], {}, 0
    for k, t in state.items():
        if k in int_index:
            continue
        if t.is_floating_point():  # fp32 even if the model was halved: scales and BN must stay exact
            float_index[k] = {"shape": list(t.shape), "start": fpos}
            floats.append(t.detach().float().reshape(-1))
            fpos += t.numel()
        else:  # bool / int64 buffers (initialized flags, num_batches_tracked): tiny
            other[k] = t.detach().clone()
    payload = {"format": FORMAT, "version": VERSION, "model_class": _base_class_name(model),
               "yaml": copy.deepcopy(model.yaml), "recipe": model.quant_recipe, "names": dict(model.names),
               "args": {k: _plain(v) for k, v in dict(getattr(model, "args", {}) or {}).items()},
               "fused": _is_fused(model), "int_index": int_index, "float_index": float_index,
               "int_blob": torch.cat(chunks), "float_blob": torch.cat(floats) if floats else torch.zeros(0),
               "other": other}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def _rebuild(payload: dict) -> nn.Module:
    classes = _model_classes()
    if payload["model_class"] not in classes:
        raise ValueError(f"load_packed: unknown model class {payload['model_class']!r}")
    yaml = copy.deepcopy(payload["yaml"])
    # An original model's anchors come back with the state dict (the `anchors` buffer, and IDetect's
    # `anchor_grid`), so anchors changed by AutoAnchor after the yaml was written are kept.
    model = classes[payload["model_class"]](yaml, ch=yaml.get("channels", 3), nc=yaml.get("nc"), verbose=False)
    # The LSQ-formula init is instant; the stored scales overwrite whatever it computes anyway.
    quantize_model(model, {**payload["recipe"], "weight_init": "lsq"})
    model.quant_recipe = payload["recipe"]
    if payload["fused"]:
        fold_bn_into_quant_convs(model)
        model.fuse(verbose=False)
    # Folded BN / QC: out_scale buffers and biases the fresh model does not have yet.
    keys = payload["float_index"]
    for name, m in quant_convs(model).items():
        if f"{name}.out_scale" in keys and m.out_scale is None:
            m.out_scale = torch.ones(m.out_channels)
        if f"{name}.bias" in keys and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_channels), requires_grad=False)
    return model


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild the fake-quant model of a packed checkpoint (fp32, eval mode)."""
    payload = safe_load(Path(path))  # plain data; its model yaml is checked before the model is rebuilt from it
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a packed quantized checkpoint (written by export.py --format packed)")
    with restricted_build():  # a second line behind the yaml rule safe_load applied (models/yaml_rule.py)
        model = _rebuild(payload)
    state = {k: payload["float_blob"][i["start"]:i["start"] + torch.Size(i["shape"]).numel()].reshape(i["shape"]).clone()
             for k, i in payload["float_index"].items()}
    state.update(payload["other"])
    # The latent weights are not stored: load everything else first, so each conv's weight quantizer holds
    # its step sizes, then write code * step into the weight (it fake-quantizes back to the same code).
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != set(payload["int_index"]):
        raise RuntimeError(f"load_packed: '{path}' does not match the model rebuilt from its yaml and recipe "
                           f"(missing {sorted(set(missing) - set(payload['int_index']))[:5]}, unexpected "
                           f"{sorted(unexpected)[:5]}): the file was written by another version of this code or "
                           f"edited; export it again from its checkpoint with export.py --format packed")
    convs = quant_convs(model)
    with torch.no_grad():
        for k, i in payload["int_index"].items():
            blob = payload["int_blob"][i["start"]:i["start"] + i["nbytes"]]
            codes = unpack_codes(blob, i["bits"], i["qmin"], torch.Size(i["shape"]).numel()).reshape(i["shape"]).float()
            conv = convs[k[: -len(".weight")]]
            conv.weight.copy_(codes * conv.weight_quantizer.scale_for(codes))
    model.names, model.args = payload["names"], payload["args"]
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
