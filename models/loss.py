"""The YOLOv5 loss for the anchor-based heads (Detect, Segment, IDetect), as a criterion for Ultralytics' trainer.

Written from the definition in ultralytics/yolov5 v7.0 (utils/loss.py and utils/segment/loss.py `ComputeLoss`,
the gain scaling of train.py and data/hyps/hyp.scratch-low.yaml):
- assignment: a label goes to every anchor of every level whose width and height ratios (label/anchor and
  anchor/label) stay under `anchor_t`, in the cell holding its centre and in the two neighbour cells nearest to
  the centre (one along x, one along y), never across the image border;
- box: 1 - CIoU of the decoded prediction (xy = 2 sig - 0.5 in the cell, wh = (2 sig)^2 anchor);
- objectness: BCE over every cell with the detached IoU (clamped at 0) as the positive cells' target,
  level weights 4.0 / 1.0 / 0.4;
- class: BCE on the positives, only when there is more than one class;
- masks: per positive, proto x its coefficients, BCE inside the label box (in proto pixels) normalised by the
  box area; averaged per image and level, summed, times the box gain / batch size.
The gains are scaled as train.py does: box x 3/nl, cls x nc/80 x 3/nl, obj x (imgsz/640)^2 x 3/nl.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from ultralytics.utils.metrics import bbox_iou

# data/hyps/hyp.scratch-low.yaml of ultralytics/yolov5 v7.0, plus train.py's `--label-smoothing` default
DEFAULT_HYP = {
    "lr0": 0.01, "lrf": 0.01, "momentum": 0.937, "weight_decay": 0.0005,
    "warmup_epochs": 3.0, "warmup_momentum": 0.8, "warmup_bias_lr": 0.1,
    "box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0, "obj_pw": 1.0, "iou_t": 0.20, "anchor_t": 4.0,
    "fl_gamma": 0.0, "label_smoothing": 0.0,
    "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0,
    "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0, "copy_paste": 0.0,
}
# Keys a checkpoint's pickled `model.hyp` may set. Not box/cls/obj: yolov5 and yolov7 train.py pickle the gains
# after scaling them by that run's nl, nc and imgsz, so reading them back would scale them a second time.
MODEL_HYP_KEYS = ("cls_pw", "obj_pw", "anchor_t", "fl_gamma", "label_smoothing")
# Keys a user may set for this project's runs (`model.loss_hyp`, unscaled as in a hyp yaml): the gains too, since
# this project stores them before scaling.
LOSS_HYP_KEYS = ("box", "obj", "cls") + MODEL_HYP_KEYS
LEVEL_BALANCE = {3: [4.0, 1.0, 0.4]}
LEVEL_BALANCE_OTHER = [4.0, 1.0, 0.25, 0.06, 0.02]  # P3-P7
FOCAL_ALPHA = 0.25
NEIGHBOUR_BIAS = 0.5  # a neighbour cell is taken when the centre lies in the half of its cell facing it


def check_loss_hyp(hyp: dict | None) -> dict:
    """A user's loss settings (unscaled, as in a yolov5 hyp yaml): known keys, non-negative numbers."""
    hyp = dict(hyp or {})
    unknown = sorted(set(hyp) - set(LOSS_HYP_KEYS))
    if unknown:
        raise ValueError(f"unknown YOLOv5 loss setting(s) {unknown}: allowed keys are {list(LOSS_HYP_KEYS)} "
                         f"(the gains before yolov5's scaling by 3/nl, nc/80 and (imgsz/640)^2)")
    for k, v in hyp.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"YOLOv5 loss setting {k}={v!r} is invalid: pass a number >= 0")
    return {k: float(v) for k, v in hyp.items()}


def resolve_hyp(model, hyp: dict | None = None) -> dict:
    """DEFAULT_HYP, updated by the loss keys of a yolov5-style `model.hyp` dict, then by this project's
    `model.loss_hyp` (what the user set for the run that trains the model; it travels with the model into QAT,
    QC and every checkpoint), then by `hyp`."""
    out = dict(DEFAULT_HYP)
    model_hyp = getattr(model, "hyp", None)
    if isinstance(model_hyp, dict):
        out.update({k: model_hyp[k] for k in MODEL_HYP_KEYS if model_hyp.get(k) is not None})
    out.update(check_loss_hyp(getattr(model, "loss_hyp", None)))
    out.update(hyp or {})
    return out


@dataclass
class LevelTargets:
    """The positives of one level: prediction index (img, anchor, gj, gi), the target box (xy offset from
    the cell's corner, wh, in grid units), the matched anchor's wh, the class and the label's row in the batch.

    From ``level_candidates`` every (neighbour, anchor, label) candidate, with ``mask`` True on the positives:
    fixed shapes, so the loss runs without reading anything on the host (no ``nonzero``)."""
    img: torch.Tensor
    anchor: torch.Tensor
    gj: torch.Tensor
    gi: torch.Tensor
    box: torch.Tensor
    anchor_wh: torch.Tensor
    cls: torch.Tensor
    label: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self):
        return self.img.shape[0]

    def select(self, keep: torch.Tensor) -> "LevelTargets":
        return LevelTargets(self.img[keep], self.anchor[keep], self.gj[keep], self.gi[keep], self.box[keep],
                            self.anchor_wh[keep], self.cls[keep], self.label[keep])


def level_candidates(labels: torch.Tensor, anchors: torch.Tensor, grid_hw: tuple[int, int],
                     anchor_t: float = 4.0) -> LevelTargets:
    """Every candidate (5 cells: own, left, up, right, down) x (na anchors) x (n labels), in that order, with
    ``mask`` marking the positives of ``build_targets``; the cells of the others are clamped into the grid so
    that every index is valid. Same float operations per candidate as ``build_targets``."""
    h, w = grid_hw
    na, n = anchors.shape[0], labels.shape[0]
    size = labels.new_tensor([w, h])
    gxy, gwh = labels[:, 2:4] * size, labels[:, 4:6] * size
    ratio = gwh[None] / anchors[:, None]  # (na, n, 2)
    fits = torch.maximum(ratio, 1 / ratio).amax(2) < anchor_t
    to_far_edge = size - gxy
    near_start = (gxy % 1 < NEIGHBOUR_BIAS) & (gxy > 1)
    near_end = (to_far_edge % 1 < NEIGHBOUR_BIAS) & (to_far_edge > 1)
    taken = torch.cat((torch.ones_like(near_start[:, :1]), near_start, near_end), 1).T  # (5, n): own, l, u, r, d
    shifts = labels.new_tensor([[0, 0], [-1, 0], [0, -1], [1, 0], [0, 1]]) * NEIGHBOUR_BIAS
    cell = (gxy[None] + shifts[:, None]).floor()  # (5, n, 2)
    box = torch.cat((gxy[None] - cell, gwh[None].expand(5, n, 2)), 2)  # (5, n, 4)
    cell = cell.long()
    mask = (taken[:, None, :] & fits[None]).reshape(-1)  # (5, na, n) group-major, anchor, label
    anchor = torch.arange(na, device=labels.device)[None, :, None].expand(5, na, n).reshape(-1)
    lab = torch.arange(n, device=labels.device)[None, None, :].expand(5, na, n).reshape(-1)
    per_label = lambda t: t[:, None].expand(5, na, n, *t.shape[2:]).reshape(5 * na * n, *t.shape[2:])  # noqa: E731
    cell = per_label(cell)
    return LevelTargets(img=labels[lab, 0].long(), anchor=anchor, gj=cell[:, 1].clamp(0, h - 1),
                        gi=cell[:, 0].clamp(0, w - 1), box=per_label(box), anchor_wh=anchors[anchor],
                        cls=labels[lab, 1].long(), label=lab, mask=mask)


def build_targets(labels: torch.Tensor, anchors: torch.Tensor, grid_hw: tuple[int, int],
                  anchor_t: float = 4.0) -> LevelTargets:
    """Assign labels (n, 6) = [img, cls, x, y, w, h] (normalised xywh) to one level with anchors (na, 2) in
    grid units and a grid of grid_hw = (H, W) cells.

    Order of the positives: own cells first, then left, up, right, down neighbours; inside each group anchor by
    anchor, labels in batch order (as upstream, which matters only when two positives share one prediction).
    The positives of ``level_candidates`` (the loss uses those directly, without this host-side selection).
    """
    t = level_candidates(labels, anchors, grid_hw, anchor_t)
    return t.select(t.mask.nonzero().squeeze(1))


def _bce_elements(logits, target, pos_weight: float = 1.0, gamma: float = 0.0) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none",
                                              pos_weight=logits.new_tensor([pos_weight]))
    if gamma > 0:
        p = logits.sigmoid()
        p_t = target * p + (1 - target) * (1 - p)
        alpha = target * FOCAL_ALPHA + (1 - target) * (1 - FOCAL_ALPHA)
        loss = loss * alpha * (1 - p_t) ** gamma
    return loss


def bce_with_logits(logits, target, pos_weight: float = 1.0, gamma: float = 0.0) -> torch.Tensor:
    """Mean BCE; with gamma > 0 the focal form of yolov5's FocalLoss (alpha 0.25)."""
    return _bce_elements(logits, target, pos_weight, gamma).mean()


def _detect_head(model):
    layers = getattr(model, "model", None)
    head = layers[-1] if layers is not None and len(layers) else None
    missing = [a for a in ("nc", "nl", "na", "anchors") if not hasattr(head, a)]
    if head is None or missing:
        raise TypeError(
            f"The YOLOv5 loss needs an anchor-based model whose last layer (model.model[-1]) is a Detect, Segment or "
            f"IDetect head with nc, nl, na and an `anchors` buffer (nl, na, 2) in grid units; "
            f"{type(head).__name__} lacks {', '.join(missing) or 'them'}. Anchor-free Ultralytics models "
            f"(yolov5nu, yolov8, yolo11) train with Ultralytics' own v8DetectionLoss instead.")
    return head


def _split_preds(preds):
    """(maps, proto) from a training output (maps | (maps, proto)) or an eval output ((pred, maps) |
    (pred, proto, maps)); maps = nl tensors (B, na, H, W, no)."""
    if isinstance(preds, (list, tuple)) and preds and all(torch.is_tensor(p) and p.dim() == 5 for p in preds):
        return list(preds), None
    if isinstance(preds, (list, tuple)):
        maps = [p for p in preds if isinstance(p, (list, tuple))]
        protos = [p for p in preds if torch.is_tensor(p) and p.dim() == 4]
        if len(maps) == 1 and all(torch.is_tensor(p) and p.dim() == 5 for p in maps[0]):
            return list(maps[0]), (protos[0] if protos else None)
    raise TypeError(
        "The YOLOv5 loss takes the head's output: in training a list of nl maps (B, na, H, W, 5+nc[+nm]) (with the "
        "proto (B, nm, Hp, Wp) after it for Segment), in eval (pred, maps) or (pred, proto, maps); got "
        f"{type(preds).__name__}. Pass the model's raw output, not the post-processed detections.")


class YOLOv5DetLoss:
    """YOLOv5 detection loss. `loss(preds, batch)` -> (total x batch size, {box_loss, obj_loss, cls_loss}).

    batch: Ultralytics' collated dict ('img', 'batch_idx', 'cls', 'bboxes' normalised xywh). imgsz (for the
    objectness gain) is the batch's max(H, W) unless given. Anchors are read from the head at every call, so an
    anchor update (autoanchor) or a device move after construction is seen.
    """
    item_names = ("box_loss", "obj_loss", "cls_loss")

    def __init__(self, model, hyp: dict | None = None, imgsz: int | None = None):
        self.head = _detect_head(model)
        self.nc, self.nl, self.na = int(self.head.nc), int(self.head.nl), int(self.head.na)
        self.nm = 0
        self.hyp = resolve_hyp(model, hyp)
        self.imgsz = imgsz
        self.balance = LEVEL_BALANCE.get(self.nl, LEVEL_BALANCE_OTHER)
        if self.nl > len(self.balance):
            raise ValueError(f"The YOLOv5 loss has level weights for at most {len(self.balance)} levels; this head "
                             f"has nl={self.nl}. Use a model with 3 to 5 detection levels.")
        eps = self.hyp["label_smoothing"]
        self.cls_pos, self.cls_neg = 1.0 - 0.5 * eps, 0.5 * eps

    def gains(self, imgsz: int) -> tuple[float, float, float]:
        """(box, obj, cls) gains as yolov5 train.py scales them for nl levels, nc classes and image size."""
        levels = 3 / self.nl
        return (self.hyp["box"] * levels, self.hyp["obj"] * (imgsz / 640) ** 2 * levels,
                self.hyp["cls"] * self.nc / 80 * levels)

    def _labels(self, batch, device) -> torch.Tensor:
        missing = [k for k in ("img", "batch_idx", "cls", "bboxes") if k not in batch]
        if missing:
            raise KeyError(f"The YOLOv5 loss takes Ultralytics' collated batch dict; it lacks {missing}. Pass the "
                           f"batch as the trainer's preprocess_batch returns it.")
        return torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"].view(-1, 4)),
                         1).to(device=device, dtype=torch.float32)

    def _check_maps(self, maps):
        no = 5 + self.nc + self.nm
        if len(maps) != self.nl or any(m.shape[1] != self.na or m.shape[-1] != no for m in maps):
            shapes = [tuple(m.shape) for m in maps]
            raise ValueError(f"The head has nl={self.nl}, na={self.na}, {no} outputs per anchor (5 + nc={self.nc}"
                             f" + nm={self.nm}), but the predictions have shapes {shapes}. Build the loss from the "
                             f"model that produced them.")

    def detection_terms(self, maps, labels):
        """Unscaled (lbox, lobj, lcls) summed over levels, and the candidates of each level (``mask``: the
        positives). Means over the positives are masked sums over the candidates divided by their count:
        fixed shapes, no host sync; a level without positives adds zero, as before."""
        anchors = self.head.anchors.detach().to(device=maps[0].device, dtype=torch.float32)
        zero = maps[0].new_zeros((), dtype=torch.float32)
        lbox, lobj, lcls = zero, zero, zero
        positives = []
        for i, pi in enumerate(maps):
            t = level_candidates(labels, anchors[i], pi.shape[2:4], self.hyp["anchor_t"])
            positives.append(t)
            keep = t.mask
            npos = keep.sum().clamp(min=1).float()
            tobj = torch.zeros(pi.shape[:4].numel() + 1, device=pi.device)  # the last slot takes the non-positives
            ps = pi[t.img, t.anchor, t.gj, t.gi].float()
            pxy = ps[:, :2].sigmoid() * 2 - 0.5
            pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * t.anchor_wh
            iou = bbox_iou(torch.cat((pxy, pwh), 1), t.box, xywh=True, CIoU=True).squeeze(-1)
            lbox = lbox + torch.where(keep, 1.0 - iou, 0.0).sum() / npos
            h, w = pi.shape[2:4]
            flat = ((t.img * self.na + t.anchor) * h + t.gj) * w + t.gi
            flat = torch.where(keep, flat, tobj.numel() - 1)
            tobj = tobj.index_put((flat,), iou.detach().clamp(0))[:-1].view(pi.shape[:4])  # gr = 1: the IoU itself
            if self.nc > 1:
                target = torch.full_like(ps[:, 5:5 + self.nc], self.cls_neg)
                target[torch.arange(len(t), device=pi.device), t.cls] = self.cls_pos
                el = _bce_elements(ps[:, 5:5 + self.nc], target, self.hyp["cls_pw"], self.hyp["fl_gamma"])
                lcls = lcls + torch.where(keep[:, None], el, 0.0).sum() / (npos * self.nc)
            lobj = lobj + self.balance[i] * bce_with_logits(pi[..., 4].float(), tobj, self.hyp["obj_pw"],
                                                            self.hyp["fl_gamma"])
        return lbox, lobj, lcls, positives

    def _imgsz(self, batch) -> int:
        return self.imgsz or max(batch["img"].shape[-2:])

    def __call__(self, preds, batch):
        maps, _ = _split_preds(preds)
        self._check_maps(maps)
        labels = self._labels(batch, maps[0].device)
        lbox, lobj, lcls, _ = self.detection_terms(maps, labels)
        gbox, gobj, gcls = self.gains(self._imgsz(batch))
        items = torch.stack((lbox * gbox, lobj * gobj, lcls * gcls))
        return items.sum() * maps[0].shape[0], dict(zip(self.item_names, items.detach()))


def _starts(sizes: list[int]) -> list[int]:
    out, s = [], 0
    for n in sizes:
        out.append(s)
        s += n
    return out


class YOLOv5SegLoss(YOLOv5DetLoss):
    """YOLOv5 segmentation loss: the detection terms plus the mask term of every positive.
    -> (total x batch size, {box_loss, seg_loss, obj_loss, cls_loss}).

    batch['masks']: with overlap_mask (Ultralytics' default, read from model.args unless `overlap` is given)
    (B, h, w) holding 1..k for the k labels of each image in batch order, else (n, h, w) one mask per label.
    Masks of another size than the proto are resized to it (nearest), as yolov5 does.
    """
    item_names = ("box_loss", "seg_loss", "obj_loss", "cls_loss")

    def __init__(self, model, hyp: dict | None = None, imgsz: int | None = None, overlap: bool | None = None):
        super().__init__(model, hyp, imgsz)
        if not hasattr(self.head, "nm"):
            raise TypeError(f"The YOLOv5 segmentation loss needs a Segment head with `nm` mask coefficients; "
                            f"{type(self.head).__name__} has none. Use YOLOv5DetLoss for detection models.")
        self.nm = int(self.head.nm)
        if overlap is None:
            args = getattr(model, "args", None)
            overlap = args.get("overlap_mask", True) if isinstance(args, dict) else getattr(args, "overlap_mask", True)
        self.overlap = bool(overlap)

    def __call__(self, preds, batch):
        maps, proto = _split_preds(preds)
        if proto is None:
            raise TypeError("The YOLOv5 segmentation loss needs the proto (B, nm, Hp, Wp) beside the maps: "
                            "(maps, proto) in training, (pred, proto, maps) in eval.")
        self._check_maps(maps)
        if "masks" not in batch:
            raise KeyError("The YOLOv5 segmentation loss needs batch['masks'] (Ultralytics' segment dataset).")
        labels = self._labels(batch, maps[0].device)
        lbox, lobj, lcls, positives = self.detection_terms(maps, labels)
        lseg = self.mask_term(positives, maps, proto, batch["masks"], labels)
        bs = maps[0].shape[0]
        gbox, gobj, gcls = self.gains(self._imgsz(batch))
        items = torch.stack((lbox * gbox, lseg * gbox / bs, lobj * gobj, lcls * gcls))
        return items.sum() * bs, dict(zip(self.item_names, items.detach()))

    def _gt_masks(self, masks, labels, hp, wp):
        masks = masks.to(labels.device).float()
        if tuple(masks.shape[-2:]) != (hp, wp):
            masks = F.interpolate(masks[None], (hp, wp), mode="nearest")[0]
        if not self.overlap:
            if masks.shape[0] != labels.shape[0]:
                raise ValueError(f"With overlap_mask=False batch['masks'] holds one mask per label; it has "
                                 f"{masks.shape[0]} masks for {labels.shape[0]} labels.")
            return lambda img, lab: masks[lab]
        # The i-th label of an image (batch order) is drawn as value i + 1 in that image's mask. (A comparison,
        # not F.one_hot, whose range check reads the labels on the host.)
        one_hot = (labels[:, 0].long()[:, None] == torch.arange(masks.shape[0], device=labels.device)).long()
        value = (one_hot.cumsum(0) * one_hot).sum(1).float()
        return lambda img, lab: (masks[img] == value[lab, None, None]).float()

    def mask_term(self, positives, maps, proto, masks, labels):
        """Sum over levels and images of the mean mask loss of that image's positives at that level."""
        proto = proto.float()
        bs, nm, hp, wp = proto.shape
        gt_of = self._gt_masks(masks, labels, hp, wp)
        per_positive, group = [], []
        # The one host read of the loss: how many candidates and positives each image has at each level,
        # for all levels at once. The mask loss goes image by image (gathering the proto per positive would cost
        # nm times the masks' memory), and those sizes decide the split.
        pos_of = [torch.ones_like(t.img, dtype=torch.bool) if t.mask is None else t.mask for t in positives]
        per_img = lambda t, k: ((t.img[:, None] == torch.arange(bs, device=t.img.device)) & k[:, None]).sum(0)  # noqa: E731
        counts = torch.stack([torch.stack((per_img(t, torch.ones_like(k)), per_img(t, k)))
                              for t, k in zip(positives, pos_of)]).tolist() if positives else []
        for i, (t, pi) in enumerate(zip(positives, maps)):
            n_cand, n_pos = counts[i]
            if not sum(n_pos):
                continue
            # candidates sorted by image, the positives first inside each image (a stable sort keeps their order)
            order = torch.argsort(t.img * 2 + (~pos_of[i]).long(), stable=True)
            t = t.select(order)
            coef = pi[t.img, t.anchor, t.gj, t.gi][:, 5 + self.nc:].float()
            xywh = labels[t.label, 2:6]
            x1y1 = (xywh[:, :2] - xywh[:, 2:] / 2) * xywh.new_tensor([wp, hp])
            x2y2 = (xywh[:, :2] + xywh[:, 2:] / 2) * xywh.new_tensor([wp, hp])
            loss = torch.zeros(len(t), device=proto.device)
            start = 0
            # One image at a time: gathering the proto per positive would cost nm times the masks' memory.
            for img in range(bs):
                j = torch.arange(start, start + n_pos[img], device=proto.device)
                start += n_cand[img]
                if not n_pos[img]:
                    continue
                logits = (coef[j] @ proto[img].view(nm, -1)).view(-1, hp, wp)
                bce = F.binary_cross_entropy_with_logits(logits, gt_of(img, t.label[j]), reduction="none")
                cols = torch.arange(wp, device=proto.device, dtype=x1y1.dtype)[None, None, :]
                rows = torch.arange(hp, device=proto.device, dtype=x1y1.dtype)[None, :, None]
                a, b = x1y1[j, :, None, None], x2y2[j, :, None, None]
                inside = (cols >= a[:, 0]) & (cols < b[:, 0]) & (rows >= a[:, 1]) & (rows < b[:, 1])
                area = xywh[j, 2] * xywh[j, 3]  # normalised, so mean over all pixels / area = mean inside box
                loss = loss.index_put((j,), (bce * inside).mean((1, 2)) / area)
            keep = torch.cat([torch.arange(s0, s0 + p, device=proto.device)
                              for s0, p in zip(_starts(n_cand), n_pos)])
            per_positive.append(loss[keep])
            group.append(i * bs + t.img[keep])
        # No positive: a zero that still reaches the proto, so DDP sees every parameter used.
        lseg = proto.sum() * 0
        if per_positive:
            loss, group = torch.cat(per_positive), torch.cat(group)
            sums = torch.zeros(len(maps) * bs, device=proto.device).index_add(0, group, loss)
            counts = torch.zeros(len(maps) * bs, device=proto.device).index_add(0, group, torch.ones_like(loss))
            lseg = lseg + torch.where(counts > 0, sums / counts.clamp(min=1), 0.0).sum()  # no boolean indexing
        return lseg
