"""What is YOLO-specific about quantizing Ultralytics detection / segmentation models.

"first" = the stem conv (it sees the image); "last" = the final prediction conv of every head
branch (box, class, mask coefficients, also the one-to-one branches of end-to-end heads) and the
proto output conv; the DFL conv is a fixed integral operator and is never quantized.
The original anchor-based YOLOv5 / YOLOv7 models (models.yolo) have one prediction conv per level
(``Detect.m[i]``, also in Segment and IDetect) and no DFL, so nothing there is "never".
"""
from __future__ import annotations

import torch
from torch import nn
from ultralytics.nn.modules import Conv, Detect
from ultralytics.nn.tasks import DetectionModel, SegmentationModel
from ultralytics.utils.torch_utils import fuse_conv_and_bn

from yolo_qat.quant import QuantConv2d, register_policy
from yolo_qat.quant.qc import fold_qc

from . import yolo
from .common import RepConv
from .quant_sites import yolo_sites

HEAD_BRANCHES = ("cv2", "cv3", "cv4", "one2one_cv2", "one2one_cv3", "one2one_cv4")


def _last_conv(module: nn.Module, prefix: str) -> str | None:
    names = [f"{prefix}.{n}" if n else prefix for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    return names[-1] if names else None


def _stem_conv(model: nn.Module) -> list[str]:
    # the first Conv2d of layer 0: its conv, or Focus's conv.conv (yolov5 < v6.0)
    first = [n for n, m in model.model[0].named_modules() if isinstance(m, nn.Conv2d)][:1]
    return [f"model.0.{n}" for n in first]


def original_roles(model: nn.Module) -> dict | None:
    """Layer roles of an original anchor-based YOLOv5 / YOLOv7 model (models.yolo DetectionModel or
    SegmentationModel with a Detect / Segment / IDetect head); None for other models."""
    if not isinstance(model, yolo.DetectionModel) or not isinstance(model.model[-1], yolo.Detect):
        return None
    head_idx = len(model.model) - 1
    head = model.model[-1]
    last = [f"model.{head_idx}.m.{i}" for i in range(len(head.m))]
    if isinstance(head, yolo.Segment):
        last.append(_last_conv(head.proto, f"model.{head_idx}.proto"))
    return {"first": _stem_conv(model), "last": last, "never": [], "finalize": make_fuse_quant_aware, "sites": yolo_sites}


def yolo_roles(model: nn.Module) -> dict | None:
    """Layer roles of an Ultralytics DetectionModel (or subclass), anchor-free or (models.yolo) the
    original anchor-based one; None for other models."""
    if isinstance(model, yolo.DetectionModel):
        return original_roles(model)
    if not isinstance(model, DetectionModel) or not isinstance(model.model[-1], Detect):
        return None
    head_idx = len(model.model) - 1
    head = model.model[-1]
    first = _stem_conv(model)
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
    return {"first": first, "last": last, "never": never, "finalize": make_fuse_quant_aware, "sites": yolo_sites}


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
        # A QC checkpoint saved before folding (qc_unfolded.pt) still wraps convs in QCConv: fold the
        # corrections first, or Ultralytics' fuse would turn those layers into plain float convs.
        fold_qc(self)
        fold_bn_into_quant_convs(self)
        return super().fuse(verbose=verbose, imgsz=imgsz)


class QuantDetectionModel(_QuantFuseMixin, DetectionModel):
    pass


class QuantSegmentationModel(_QuantFuseMixin, SegmentationModel):
    pass


# After the BN fold above, the original models' own fuse() runs: RepConv.fuse_repvgg_block (QuantRepConv's
# for a quantized block) and IDetect.fuse_implicit, which puts ImplicitM into a quantized conv's output scale
# and keeps ImplicitA in front of its input quantizer.
class QuantOriginalDetectionModel(_QuantFuseMixin, yolo.DetectionModel):
    pass


class QuantOriginalSegmentationModel(_QuantFuseMixin, yolo.SegmentationModel):
    pass


class QuantRepConv(RepConv):
    """yolov7's RepConv with quantized branch convs. Its three branches cannot be merged into one
    integer conv (the sum of two integer-weight convs on differently quantized grids is not one), so
    fuse keeps them and folds each branch's BN into its conv instead: the output scale of a quantized
    conv (integer weights unchanged), the weights of a float one. The identity branch (a BN of the
    input) stays as it is."""

    @torch.no_grad()
    def fuse_repvgg_block(self):
        for branch in (self.rbr_dense, self.rbr_1x1):
            conv, bn = branch[0], branch[1]
            if not isinstance(bn, nn.BatchNorm2d):
                continue  # folded already
            if isinstance(conv, QuantConv2d):
                k = bn.weight / (bn.running_var + bn.eps).sqrt()
                conv.fold_affine(k, bn.bias - bn.running_mean * k)
            else:
                branch[0] = fuse_conv_and_bn(conv, bn)
            branch[1] = nn.Identity()


_QUANT_CLASSES = {DetectionModel: QuantDetectionModel, SegmentationModel: QuantSegmentationModel,
                  yolo.DetectionModel: QuantOriginalDetectionModel,
                  yolo.SegmentationModel: QuantOriginalSegmentationModel}


def make_fuse_quant_aware(model: nn.Module) -> None:
    """Give a quantized model a class whose fuse() keeps the quantization (pickles by name, so
    checkpoints load wherever this package is importable); also its quantized RepConv blocks."""
    for m in model.modules():
        if type(m) is RepConv and not hasattr(m, "rbr_reparam") and \
                any(isinstance(c, QuantConv2d) for c in m.modules()):
            m.__class__ = QuantRepConv
    if isinstance(model, _QuantFuseMixin):
        return
    cls = _QUANT_CLASSES.get(type(model))
    if cls is None:  # Pose/OBB/...: a class made on the fly would not pickle
        raise ValueError(f"quantize_model: no quantization-aware fuse() for {type(model).__name__}; "
                         f"supported model classes: Ultralytics' DetectionModel and SegmentationModel, and the "
                         f"original YOLOv5 / YOLOv7 ones of models.yolo (DetectionModel alias Model, "
                         f"SegmentationModel)")
    model.__class__ = cls
