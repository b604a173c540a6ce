"""Distillation from the full-precision model during QAT and QC.

The FP model (the teacher) runs beside the quantized student on the same batch, in eval mode and without
gradients, and the student is pulled towards the teacher's head outputs:
- classes: the teacher's class probabilities as soft BCE targets, written as the Bernoulli KL (soft BCE minus
  the teacher's own entropy: the same gradient, and exactly 0 when the outputs agree), at every location;
- boxes: for DFL (anchor-free) heads the teacher's per-side distributions (KL); for anchor-based heads the
  teacher's decoded boxes (1 - CIoU) and its objectness (Bernoulli KL at every cell);
- masks: the masks the teacher assembles from its coefficients and protos, at its most confident locations,
  inside its box (per-pixel Bernoulli KL): coefficients and protos are matched through their product, which
  is what the masks are (coefficients alone have no fixed meaning apart from the protos);
- optionally (anchor-free heads only, off by default) the head's input features, normalised per channel by
  the teacher's statistics (MSE); they come with the head's output for free.
Box and mask terms are weighted by the teacher's confidence (max class probability, times objectness for
anchor-based heads): most locations are background, where the teacher's box carries nothing. Each term takes
the gain of the detection-loss term it mirrors and the total is x batch size, as Ultralytics' and the YOLOv5
losses return theirs, so ``weight`` = 1 weighs the teacher about like the labels.

The teacher never becomes part of the student: ``DistillationCriterion`` is a plain object set as
``model.criterion`` (what ``model.loss`` calls), not a submodule, so it is in no state_dict, optimizer or
quantization pass; deep copies (the EMA) share the teacher, pickles drop it (reloaded from its file on first
use, when it came from one). Ultralytics 8.4's own ``DistillationModel`` (``distill_model=``) is not used: it
makes the teacher a submodule of the trained model and distils neck features only.

The default weight (1) and terms were chosen on the embedded data over seeds; the measurements are in
docs/training.md ("Distillation from the FP model").
"""
from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules.head import Detect, Segment, v10Detect
from ultralytics.utils import DEFAULT_CFG_DICT
from ultralytics.utils.tal import dist2bbox, make_anchors

from yolo_qat.models.checkpoint import load_checkpoint
from yolo_qat.models.loss import YOLOv5DetLoss, _split_preds
from yolo_qat.models.yolo import Detect as AnchorDetect
from yolo_qat.quant import is_quantized
from yolo_qat.quant.recipe import dataclass_from

from .config import QATConfig

DEFAULT_WEIGHT = QATConfig.distill_weight  # measured: docs/training.md
MASK_TOPK = 16  # teacher locations per image whose masks are distilled


class TeacherMismatchError(ValueError):
    """Teacher and student heads differ in a way that output distillation cannot bridge."""


@dataclass
class DistillGains:
    """Per-term multipliers on top of the detection-loss gain each term mirrors (0 turns a term off)."""
    cls: float = 1.0
    box: float = 1.0  # DFL distributions (anchor-free) or decoded boxes (anchor-based)
    obj: float = 1.0  # anchor-based heads only
    mask: float = 1.0
    feat: float = 0.0  # anchor-free heads only: the head's input features

    @classmethod
    def from_any(cls, gains: "DistillGains | dict | None") -> "DistillGains":
        out = dataclass_from(cls, gains, "distillation gains")
        if any(v < 0 for v in asdict(out).values()):
            raise ValueError(f"distillation gains {asdict(out)} must be >= 0")
        return out


# ---------------------------------------------------------------------------------------------- heads

def detection_head(model: nn.Module) -> nn.Module:
    layers = getattr(getattr(model, "module", model), "model", None)
    if not isinstance(layers, nn.Sequential) or not len(layers):
        raise TypeError(f"distillation needs a YOLO model (model.model[-1] is its head); got {type(model).__name__}")
    return layers[-1]


def head_family(head: nn.Module) -> str:
    """'anchor-based' (models/yolo.py Detect, Segment, IDetect) or 'anchor-free' (Ultralytics Detect, Segment)."""
    if isinstance(head, AnchorDetect):
        return "anchor-based"
    if type(head) in (Detect, Segment, v10Detect):
        return "anchor-free"
    raise TypeError(f"distillation supports detection and segmentation heads (Ultralytics' Detect / Segment, the "
                    f"original Detect / Segment / IDetect); this model's head is {type(head).__name__}")


def _is_segment(head: nn.Module) -> bool:
    return hasattr(head, "proto")


def _describe(head: nn.Module) -> dict:
    d = {"head": type(head).__name__, "family": head_family(head), "nc": int(head.nc), "levels": int(head.nl),
         "strides": [float(s) for s in torch.as_tensor(head.stride).flatten()]}
    if d["family"] == "anchor-free":
        d["reg_max"] = int(head.reg_max)
    else:
        d["anchors per cell"] = int(head.na)
    if _is_segment(head):
        d["mask coefficients (nm)"] = int(head.nm)
    return d


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Raise TeacherMismatchError (one paragraph: what differs, how to fix it) unless the teacher's head has the
    student's family, classes, levels, strides, reg_max / anchors per cell and mask coefficients."""
    s, t = _describe(detection_head(student)), _describe(detection_head(teacher))
    if s["family"] != t["family"]:
        what = (f"the student has an {s['family']} head ({s['head']}) and the teacher an {t['family']} one "
                f"({t['head']})")
    elif "mask coefficients (nm)" in s and "mask coefficients (nm)" not in t:
        what = f"the student segments ({s['head']} head) but the teacher only detects ({t['head']} head)"
    else:
        diffs = [f"{k} {t[k]} (student {s[k]})" for k in ("nc", "levels", "strides", "reg_max", "anchors per cell",
                                                          "mask coefficients (nm)") if k in s and s[k] != t.get(k)]
        if not diffs:
            return
        what = "the teacher has " + ", ".join(diffs)
    raise TeacherMismatchError(
        f"The distillation teacher does not match the student: {what}. Distillation compares the two heads output "
        f"by output, so the teacher must be the same kind of model for the same classes; it is normally the "
        f"full-precision checkpoint the QAT run started from (the default). Pass that checkpoint as the teacher "
        f"(--teacher FP.pt), or train an FP model of the student's architecture on this dataset first.")


def load_teacher(teacher: "nn.Module | str | Path") -> nn.Module:
    """The teacher in eval mode with gradients off: a module as given, or the model of a .pt checkpoint."""
    if isinstance(teacher, (str, Path)):
        if not Path(teacher).is_file():
            raise FileNotFoundError(f"the distillation teacher '{teacher}' does not exist: pass the path of the "
                                    f"full-precision .pt checkpoint (--teacher FP.pt)")
        model, _ = load_checkpoint(teacher)
    elif isinstance(teacher, nn.Module):
        model = getattr(teacher, "module", teacher)
    else:
        raise TypeError(f"teacher must be a model or the path of a .pt checkpoint, not {type(teacher).__name__}")
    if is_quantized(model):
        raise ValueError(f"the distillation teacher{f' {teacher!r}' if isinstance(teacher, (str, Path)) else ''} "
                         f"is a quantized model; distillation learns from the full-precision one: pass the FP "
                         f"checkpoint the QAT run started from (--teacher FP.pt)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_teacher_path(teacher: "str | Path | None", model_source) -> str:
    """Absolute path of the teacher checkpoint: ``teacher``, or by default the FP checkpoint the QAT run starts
    from (``model_source``); stored in the QAT settings so that a resume finds the same file."""
    if teacher is None:
        if not (isinstance(model_source, (str, Path)) and str(model_source).endswith(".pt")):
            raise ValueError(f"distill=True needs a full-precision teacher, and the QAT model '{model_source}' is "
                             f"built from a yaml without weights, so there is none to default to. Pass the teacher "
                             f"(--teacher FP.pt), or start QAT from an FP checkpoint (--weights FP.pt, or "
                             f"--fp-epochs N to train one first)")
        teacher = model_source
    if not Path(teacher).is_file():
        raise FileNotFoundError(f"the distillation teacher '{teacher}' does not exist: pass the path of the "
                                f"full-precision .pt checkpoint (--teacher FP.pt)")
    return str(Path(teacher).resolve())


def checkpoint_teacher(ckpt: dict) -> str:
    """The default teacher for distillation on a QAT checkpoint (QC with ``--distill``): the teacher its QAT run
    distilled from, else the FP checkpoint that run started from. ValueError (one paragraph) when neither is
    recorded."""
    qat = ckpt.get("qat_args") or (ckpt.get("train_args") or {}).get("qat") or {}
    path = qat.get("teacher") or ckpt.get("fp_source")
    if not path:
        raise ValueError("this checkpoint records no full-precision model to distil from (its QAT run started from "
                         "a yaml, or it was written before distillation existed): pass the FP checkpoint as the "
                         "teacher (--teacher FP.pt)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"the FP checkpoint this model was trained from, '{path}', no longer exists: pass "
                                f"the FP checkpoint as the teacher (--teacher FP.pt)")
    return str(path)


# ---------------------------------------------------------------------------------------------- terms

def bernoulli_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bern(sigmoid(t)) || Bern(sigmoid(s))) = soft BCE - teacher entropy; d/ds = sigmoid(s) - p_t."""
    p = teacher_logits.sigmoid()
    return (p * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits))
            + (1 - p) * (F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits)))


def ciou_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """1 - CIoU of xywh boxes (..., 4). Areas come from the corners as the intersection does, so identical boxes
    give exactly 0 (a collapsed box included)."""
    a1, a2 = a[..., :2] - a[..., 2:] / 2, a[..., :2] + a[..., 2:] / 2
    b1, b2 = b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2
    wa, wb = a2 - a1, b2 - b1
    inter = (torch.minimum(a2, b2) - torch.maximum(a1, b1)).clamp(min=0).prod(-1)
    union = wa.prod(-1) + wb.prod(-1) - inter
    iou = (inter + eps) / (union + eps)  # 1 also for two identical degenerate (zero-area) boxes
    c2 = ((torch.maximum(a2, b2) - torch.minimum(a1, b1)) ** 2).sum(-1).clamp(min=eps)
    rho2 = ((a1 + a2 - b1 - b2) ** 2).sum(-1) / 4
    v = (4 / math.pi ** 2) * (torch.atan(wb[..., 0] / wb[..., 1].clamp(min=eps))
                              - torch.atan(wa[..., 0] / wa[..., 1].clamp(min=eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + 1).clamp(min=eps)  # v = 0 and iou = 1: 0, not 0 / 0
    return 1 - (iou - rho2 / c2 - alpha * v)


def mask_term(coef_s, coef_t, proto_s, proto_t, boxes, conf, img_hw, topk: int = MASK_TOPK) -> torch.Tensor:
    """Confidence-weighted mean, over the teacher's top-k locations per image, of the per-pixel Bernoulli KL of
    the assembled masks inside the teacher's box. coef (B, N, nm); proto (B, nm, Hp, Wp); boxes xyxy pixels
    (B, N, 4); conf (B, N); img_hw the input size in pixels."""
    w, idx = conf.topk(min(topk, conf.shape[1]), dim=1)  # (B, k)
    pick = lambda x: x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    ms = torch.einsum("bkm,bmhw->bkhw", pick(coef_s), proto_s.float())
    mt = torch.einsum("bkm,bmhw->bkhw", pick(coef_t), proto_t.float())
    hp, wp = proto_t.shape[-2:]
    box = pick(boxes) * boxes.new_tensor([wp / img_hw[1], hp / img_hw[0]] * 2)  # in proto pixels
    cols = torch.arange(wp, device=box.device, dtype=box.dtype)[None, None, None, :]
    rows = torch.arange(hp, device=box.device, dtype=box.dtype)[None, None, :, None]
    x1, y1, x2, y2 = (box[..., j, None, None] for j in range(4))
    inside = ((cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)).float()
    per_location = (bernoulli_kl(ms, mt) * inside).sum((2, 3)) / inside.sum((2, 3)).clamp(min=1)
    return (per_location * w).sum() / w.sum().clamp(min=1e-12)


def _arg(args, key: str) -> float:
    v = args.get(key) if isinstance(args, dict) else getattr(args, key, None)
    return float(DEFAULT_CFG_DICT[key] if v is None else v)


class AnchorFreeDistillation:
    """The terms for Ultralytics' DFL heads. Train output: {'boxes' (B, 4 reg_max, N), 'scores' (B, nc, N),
    'feats', ['mask_coefficient' (B, nm, N), 'proto']}; eval output (y, that dict) / ((y, proto), that dict);
    end-to-end heads nest it under 'one2many' / 'one2one' (both branches are distilled, averaged)."""

    def __init__(self, model: nn.Module, gains: DistillGains):
        head = detection_head(model)
        if int(head.reg_max) <= 1:
            raise ValueError(f"distillation of anchor-free heads matches the teacher's DFL distributions; this "
                             f"{type(head).__name__} head has reg_max={head.reg_max} (no distributions, e.g. "
                             f"YOLO26), which is not supported: distil a DFL model (YOLOv5u, YOLOv8, YOLO11)")
        self.reg_max, self.nm = int(head.reg_max), int(getattr(head, "nm", 0) if _is_segment(head) else 0)
        self.stride_0 = float(torch.as_tensor(head.stride).flatten()[0])  # read once here, never per step
        self.stride = torch.as_tensor(head.stride).detach().float().cpu().clone()
        self._stride_on: dict = {}  # device -> the strides there, copied once (not every step)
        args = getattr(model, "args", None) or {}
        self.hyp = {k: _arg(args, k) for k in ("box", "cls", "dfl")}
        self.gains = gains

    @staticmethod
    def branches(preds) -> list[dict]:
        raw = preds[1] if isinstance(preds, tuple) else preds
        if not isinstance(raw, dict) or not ({"scores", "one2many"} & set(raw)):
            raise TypeError(f"anchor-free distillation takes the head's raw output (a dict with 'boxes' and "
                            f"'scores', or an eval-mode (y, dict) tuple); got {type(raw).__name__}")
        return [raw["one2many"], raw["one2one"]] if "one2many" in raw else [raw]

    def __call__(self, s_preds, t_preds, teacher: nn.Module) -> dict[str, torch.Tensor]:
        pairs = list(zip(self.branches(s_preds), self.branches(t_preds)))
        terms = [self._branch(s, t) for s, t in pairs]
        return {k: sum(t[k] for t in terms) / len(terms) for k in terms[0]}

    def _branch(self, s: dict, t: dict) -> dict[str, torch.Tensor]:
        g, hyp = self.gains, self.hyp
        zs, zt = s["scores"].float(), t["scores"].float()
        b, _, n = zt.shape
        conf = zt.sigmoid().amax(1)  # (B, N)
        norm = conf.sum().clamp(min=1.0)  # as Ultralytics' target_scores_sum
        out = {}
        if g.cls:
            out["cls"] = bernoulli_kl(zs, zt).sum() / norm * hyp["cls"] * g.cls
        dt = t["boxes"].float().view(b, 4, self.reg_max, n)
        if g.box:
            ds = s["boxes"].float().view(b, 4, self.reg_max, n)
            lt = dt.log_softmax(2)
            kl = (lt.exp() * (lt - ds.log_softmax(2))).sum(2).mean(1)  # (B, N): mean over the 4 sides
            out["box"] = (kl * conf).sum() / norm * hyp["dfl"] * g.box
        if self.nm and g.mask:
            out["mask"] = self._masks(s, t, dt, conf) * hyp["box"] * g.mask
        if g.feat:
            out["feat"] = feature_term(s["feats"], t["feats"]) * g.feat
        return out

    def _masks(self, s, t, dt, conf):
        proto_s, proto_t = (p[0] if isinstance(p, tuple) else p for p in (s["proto"], t["proto"]))
        if dt.device not in self._stride_on:
            self._stride_on[dt.device] = self.stride.to(dt.device)
        anchors, strides = make_anchors(t["feats"], self._stride_on[dt.device], 0.5)
        dist = (dt.softmax(2) * torch.arange(self.reg_max, device=dt.device, dtype=dt.dtype).view(1, 1, -1, 1)).sum(2)
        boxes = (dist2bbox(dist, anchors.T[None].float(), xywh=False, dim=1) * strides.T[None]).transpose(1, 2)
        img_hw = [x * self.stride_0 for x in t["feats"][0].shape[2:]]
        return mask_term(s["mask_coefficient"].float().transpose(1, 2), t["mask_coefficient"].float().transpose(1, 2),
                         proto_s, proto_t, boxes, conf, img_hw)


def feature_term(fs: list, ft: list) -> torch.Tensor:
    """Mean over levels of the MSE of the head inputs, each channel divided by the teacher's std."""
    total = 0.0
    for s, t in zip(fs, ft):
        t = t.float()
        sd = t.std((0, 2, 3), keepdim=True).clamp(min=1e-6)
        total = total + (((s.float() - t) / sd) ** 2).mean()
    return total / len(ft)


class AnchorBasedDistillation:
    """The terms for models/yolo.py's heads: objectness at every cell (level balance as the YOLOv5 loss),
    classes and decoded boxes weighted by the teacher's score (objectness x max class), masks; gains of the
    YOLOv5 loss (box, obj, cls scaled by levels, image size and nc)."""

    def __init__(self, model: nn.Module, gains: DistillGains):
        if gains.feat:
            raise ValueError("feature distillation needs the head's input features, which only anchor-free heads "
                             "return with their output: set the feature gain to 0 for anchor-based models")
        self.head = detection_head(model)
        self.ref = YOLOv5DetLoss(model)  # its gains(imgsz) and level balance
        self.nc = int(self.head.nc)
        self.nm = int(self.head.nm) if _is_segment(self.head) else 0
        self.gains = gains
        self.stride_0 = float(torch.as_tensor(self.head.stride).flatten()[0])  # read once here, never per step

    def __call__(self, s_preds, t_preds, teacher: nn.Module) -> dict[str, torch.Tensor]:
        (maps_s, proto_s), (maps_t, proto_t) = _split_preds(s_preds), _split_preds(t_preds)
        t_head, g, nc = detection_head(teacher), self.gains, self.nc
        img_hw = [x * self.stride_0 for x in maps_t[0].shape[2:4]]
        gbox, gobj, gcls = self.ref.gains(max(img_hw))
        zero = maps_s[0].new_zeros((), dtype=torch.float32)
        box, obj, cls = zero, zero, zero
        flat = {"conf": [], "coef_s": [], "coef_t": [], "box_t": []}
        for i, (ms, mt) in enumerate(zip(maps_s, maps_t)):
            ms, mt = ms.float(), mt.float()
            obj = obj + self.ref.balance[i] * bernoulli_kl(ms[..., 4], mt[..., 4]).mean()
            conf = mt[..., 4].sigmoid()
            if nc > 1:  # as the YOLOv5 loss: a single class has no class term
                conf = conf * mt[..., 5:5 + nc].sigmoid().amax(-1)
                kl = bernoulli_kl(ms[..., 5:5 + nc], mt[..., 5:5 + nc]).mean(-1)
                cls = cls + (kl * conf).sum() / conf.sum().clamp(min=1e-12)
            bt = t_head._decode(i, mt)[..., :4]
            if g.box:
                bs = self.head._decode(i, ms)[..., :4]
                box = box + (ciou_loss(bs, bt) * conf).sum() / conf.sum().clamp(min=1e-12)
            if self.nm:
                b = ms.shape[0]
                flat["conf"].append(conf.reshape(b, -1))
                flat["coef_s"].append(ms[..., 5 + nc:].reshape(b, -1, self.nm))
                flat["coef_t"].append(mt[..., 5 + nc:].reshape(b, -1, self.nm))
                flat["box_t"].append(torch.cat((bt[..., :2] - bt[..., 2:] / 2, bt[..., :2] + bt[..., 2:] / 2),
                                               -1).reshape(b, -1, 4))
        out = {"box": box * gbox * g.box, "obj": obj * gobj * g.obj}
        if nc > 1:
            out["cls"] = cls * gcls * g.cls
        out = {k: v for k, v in out.items() if getattr(g, k)}
        if self.nm and g.mask:
            f = {k: torch.cat(v, 1) for k, v in flat.items()}
            out["mask"] = mask_term(f["coef_s"], f["coef_t"], proto_s, proto_t, f["box_t"], f["conf"],
                                    img_hw) * gbox * g.mask
        return out


# ---------------------------------------------------------------------------------------------- criterion

class DistillationCriterion:
    """``model.criterion`` with distillation: ``(preds, batch) -> (loss x batch size, items)``.

    The teacher runs on ``batch['img']`` (eval mode, no gradients, moved to the images' device; under autocast
    it runs in the same precision as the student); the distillation term, x ``weight``, is appended to the
    base criterion's loss vector and reported as item 'kd' (per image, as the other items). ``label_free``:
    the distillation term alone, for batches without labels. Training-mode and eval-mode predictions both
    work (the validator calls ``model.loss(batch, preds)`` with eval outputs).
    """

    def __init__(self, model: nn.Module, teacher: "nn.Module | str | Path", weight: float = DEFAULT_WEIGHT,
                 label_free: bool = False, gains: "DistillGains | dict | None" = None, base=None):
        if weight < 0:
            raise ValueError(f"distill_weight={weight!r} is invalid: allowed values are >= 0")
        model = getattr(model, "module", model)
        self.teacher_path = str(teacher) if isinstance(teacher, (str, Path)) else None
        self.teacher = load_teacher(teacher)
        check_teacher(model, self.teacher)
        self.weight, self.label_free = float(weight), bool(label_free)
        self.gains = DistillGains.from_any(gains)
        family = head_family(detection_head(model))
        self.kd = (AnchorBasedDistillation if family == "anchor-based" else AnchorFreeDistillation)(model, self.gains)
        self.base = None if label_free else base
        self.last_terms: dict[str, torch.Tensor] = {}  # the last call's terms per image (detached), for reports

    def __call__(self, preds, batch: dict):
        img = batch["img"]
        terms = self.kd(preds, self.teacher_outputs(img), self.teacher)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        kd = sum(terms.values()) * self.weight if terms else img.new_zeros((), dtype=torch.float32)
        bs = img.shape[0]
        if self.label_free:
            return (kd * bs).reshape(1), {"kd": kd.detach()}
        if self.base is None:
            raise RuntimeError("this distillation criterion has no detection loss (it was built label-free): "
                               "attach it again with label_free=False to train on labelled batches")
        loss, items = self.base(preds, batch)
        return torch.cat((loss.reshape(-1), (kd * bs).reshape(1).to(loss.dtype))), {**items, "kd": kd.detach()}

    @torch.no_grad()
    def teacher_outputs(self, img: torch.Tensor):
        teacher = self._teacher()
        p = next(teacher.parameters())
        if p.device != img.device:
            teacher.to(img.device)
        if teacher.training:  # someone called .train() on it: BN statistics must never move
            teacher.eval()
        autocast = torch.is_autocast_enabled(img.device.type)
        return teacher(img if autocast or img.dtype == p.dtype else img.to(p.dtype))

    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            if self.teacher_path is None:
                raise RuntimeError("this distillation criterion was pickled, which drops its teacher, and the "
                                   "teacher came from memory: attach_distillation(model, teacher) again")
            self.teacher = load_teacher(self.teacher_path)
        return self.teacher

    def update(self):
        """Ultralytics calls ``criterion.update()`` after each epoch when it exists (end-to-end heads' loss)."""
        if hasattr(self.base, "update"):
            self.base.update()

    def __deepcopy__(self, memo):
        # The EMA deep-copies the model with its criterion: share the teacher, copy the rest (the base loss and
        # the terms refer to the model's head, which the same memo maps to the copy's).
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: v if k == "teacher" else deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def __getstate__(self):
        return {**self.__dict__, "teacher": None, "last_terms": {}}


def attach_distillation(model: nn.Module, teacher: "nn.Module | str | Path", weight: float = DEFAULT_WEIGHT,
                        label_free: bool = False, gains: "DistillGains | dict | None" = None) -> DistillationCriterion:
    """Make ``model.loss(batch[, preds])`` add the distillation term (``label_free``: return only that term).

    Call after ``model.args`` holds the loss hyper-parameters (Ultralytics' trainer sets them in
    ``set_model_attributes``; ``engine.calib.ensure_loss_args`` elsewhere). Calling it again replaces the
    previous distillation and keeps the model's detection loss."""
    model = getattr(model, "module", model)
    current = getattr(model, "criterion", None)
    if isinstance(current, DistillationCriterion):
        current = current.base
    base = None if label_free else (current if current is not None else model.init_criterion())
    model.criterion = DistillationCriterion(model, teacher, weight, label_free, gains, base)
    return model.criterion


def detach_distillation(model: nn.Module) -> None:
    """Put the model's own detection loss back (None when the distillation was label-free)."""
    model = getattr(model, "module", model)
    current = getattr(model, "criterion", None)
    if isinstance(current, DistillationCriterion):
        model.criterion = current.base


def distillation_of(model: nn.Module) -> "DistillationCriterion | None":
    c = getattr(getattr(model, "module", model), "criterion", None)
    return c if isinstance(c, DistillationCriterion) else None
