"""What is YOLO-specific about quantizing Ultralytics detection / segmentation models.

"first" = the stem conv (it sees the image); "last" = the final prediction conv of every head
branch (box, class, mask coefficients, also the one-to-one branches of end-to-end heads) and the
proto output conv; the DFL conv is a fixed integral operator and is never quantized.
"""
from __future__ import annotations

from torch import nn
from ultralytics.nn.modules import Conv, Detect
from ultralytics.nn.tasks import DetectionModel, SegmentationModel

from quant import QuantConv2d, register_policy

HEAD_BRANCHES = ("cv2", "cv3", "cv4", "one2one_cv2", "one2one_cv3", "one2one_cv4")


def _last_conv(module: nn.Module, prefix: str) -> str | None:
    names = [f"{prefix}.{n}" if n else prefix for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    return names[-1] if names else None


def yolo_roles(model: nn.Module) -> dict | None:
    """Layer roles of an Ultralytics DetectionModel (or subclass); None for other models."""
    if not isinstance(model, DetectionModel) or not isinstance(model.model[-1], Detect):
        return None
    head_idx = len(model.model) - 1
    head = model.model[-1]
    first = [n for n, m in model.model[0].named_modules() if isinstance(m, nn.Conv2d)][:1]
    first = [f"model.0.{n}" for n in first]
    last = []
    for attr in HEAD_BRANCHES:
        branches = getattr(head, attr, None)
        if branches is None:
            continue
        for i, seq in enumerate(branches):
            name = _last_conv(seq, f"model.{head_idx}.{attr}.{i}")
            if name:
                last.append(name)
    if getattr(head, "proto", None) is not None:
        last.append(_last_conv(head.proto, f"model.{head_idx}.proto"))
    never = []
    if isinstance(getattr(head, "dfl", None), nn.Module) and hasattr(head.dfl, "conv"):
        never.append(f"model.{head_idx}.dfl.conv")
    return {"first": first, "last": last, "never": never, "finalize": make_fuse_quant_aware}


@register_policy
def _registered(model):
    return yolo_roles(model)


def fold_bn_into_quant_convs(model: nn.Module) -> int:
    """Fold the BN of every Conv(QuantConv2d, BN) block into the conv's per-channel output scale
    and bias. The integer weights and both quantizers stay as trained, so this is exact."""
    n = 0
    for m in model.modules():
        if isinstance(m, Conv) and isinstance(m.conv, QuantConv2d) and hasattr(m, "bn"):
            bn = m.bn
            k = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
            m.conv.fold_affine(k, bn.bias.detach() - bn.running_mean * k)
            delattr(m, "bn")
            m.forward = m.forward_fuse
            n += 1
    return n


class _QuantFuseMixin:
    """Ultralytics' fuse() folds BN into conv weights and leaves the quantizer scales where they
    were, which silently changes the integer weights. Fold quantized convs our way first."""

    def fuse(self, verbose=True, imgsz=640):
        fold_bn_into_quant_convs(self)
        return super().fuse(verbose=verbose, imgsz=imgsz)


class QuantDetectionModel(_QuantFuseMixin, DetectionModel):
    pass


class QuantSegmentationModel(_QuantFuseMixin, SegmentationModel):
    pass


_QUANT_CLASSES = {DetectionModel: QuantDetectionModel, SegmentationModel: QuantSegmentationModel}


def make_fuse_quant_aware(model: nn.Module) -> None:
    """Give a quantized model a class whose fuse() keeps the quantization (pickles by name, so
    checkpoints load wherever this package is importable)."""
    if isinstance(model, _QuantFuseMixin):
        return
    cls = _QUANT_CLASSES.get(type(model))
    if cls is None:  # Pose/OBB/...: a class made on the fly would not pickle
        raise ValueError(f"quantize_model: no quantization-aware fuse() for {type(model).__name__}; "
                         f"supported model classes: DetectionModel, SegmentationModel")
    model.__class__ = cls
