"""AutoAnchor for the anchor-based heads (Detect, Segment, IDetect), as the original YOLOv5 train.py runs it.

The check: every label's width and height at the training size (the image's long side scaled to imgsz, times a
random 0.9-1.1 zoom standing in for the scale augmentation) against every anchor. A label is recallable when
some anchor has both side ratios within ``anchor_t`` (4.0, the loss's assignment rule); the best possible
recall (BPR) is the share of recallable labels. Below 0.98, anchors are fitted to the labels: k-means on the
whitened label sizes, then a short evolution (multiplicative mutations kept when they raise the mean best-anchor
ratio above 1/anchor_t); the model's anchors are replaced only when the new BPR is higher.

Written from that description (ultralytics/yolov5 utils/autoanchor.py); no code taken from it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from ultralytics.utils import LOGGER

from yolo_qat.models.yolo import check_anchor_order

__all__ = ["label_sizes", "side_ratios", "anchor_metrics", "anchor_fitness", "fit_anchors", "head_anchors_px",
           "set_head_anchors", "check_anchors", "broadcast_anchors", "BPR_OK"]

PREFIX = "AutoAnchor: "
BPR_OK = 0.98  # upstream's threshold for "the anchors fit"
MIN_LABEL_PX = 2.0  # labels under this size on both sides carry no shape: left out of the fit


def label_sizes(labels: list[dict], imgsz: int, zoom=(0.9, 1.1), seed: int = 0) -> torch.Tensor:
    """(n, 2) label widths and heights in pixels at the training size, from Ultralytics dataset labels
    (``shape`` = original (h, w), ``bboxes`` = normalised xywh). Each image gets one random zoom in
    ``zoom`` (None: no zoom), seeded, so every DDP rank computes the same sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for lb in labels:
        boxes = np.asarray(lb.get("bboxes", np.zeros((0, 4))), dtype=np.float64).reshape(-1, 4)
        h, w = lb["shape"][:2]
        side = imgsz * np.array([w, h], dtype=np.float64) / max(h, w)
        z = rng.uniform(*zoom) if zoom else 1.0
        out.append(boxes[:, 2:4] * side * z)
    wh = np.concatenate(out, 0) if out else np.zeros((0, 2))
    return torch.from_numpy(wh).float()


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)


def side_ratios(wh, anchors) -> np.ndarray:
    """(n, a): for each label and anchor the worse of the two side ratios, min(r, 1/r) over w and h
    (1 = same size; the loss assigns a label to an anchor when this exceeds 1 / anchor_t). NumPy: these
    small reductions run thousands of times in the evolution, where torch's per-op overhead dominates."""
    r = _np(wh)[:, None] / _np(anchors).reshape(-1, 2)[None]
    return np.minimum(r, 1 / r).min(2)


def anchor_metrics(wh, anchors, anchor_t: float = 4.0) -> tuple[float, float]:
    """(best possible recall, mean number of anchors per label) of ``anchors`` (a, 2) pixels."""
    if len(wh) == 0:
        return 1.0, 0.0
    fits = side_ratios(wh, anchors) > 1 / anchor_t
    return float(fits.any(1).mean()), float(fits.sum(1).mean())


def anchor_fitness(wh, anchors, anchor_t: float = 4.0) -> float:
    """Mean best side ratio over labels, counting only labels some anchor recalls (the evolution's target)."""
    best = side_ratios(wh, anchors).max(1)
    return float((best * (best > 1 / anchor_t)).mean())


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 30) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; an emptied cluster is re-seeded at the worst-served point."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = ((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1).min(1)
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centres.append(x[rng.choice(len(x), p=p)])
    c = np.asarray(centres, dtype=np.float64)
    for _ in range(iters):
        d2 = ((x[:, None] - c[None]) ** 2).sum(-1)
        assign = d2.argmin(1)
        new = c.copy()
        for j in range(k):
            members = x[assign == j]
            new[j] = members.mean(0) if len(members) else x[d2.min(1).argmax()]
        if np.allclose(new, c):
            break
        c = new
    return c


def fit_anchors(wh: torch.Tensor, n: int, anchor_t: float = 4.0, generations: int = 300, seed: int = 0,
                imgsz: int = 640) -> torch.Tensor:
    """``n`` anchors (n, 2) in pixels fitted to label sizes ``wh``, sorted by area: k-means on sizes divided
    by their standard deviation, then ``generations`` rounds of mutation (each anchor side scaled by
    1 + 0.1 N(0, 1) x U(0, 1) with probability 0.9, clipped to [0.3, 3]), a mutant kept when its fitness
    (``anchor_fitness``) is higher."""
    rng = np.random.default_rng(seed)
    tiny = int((wh < 3.0).any(1).sum())
    if tiny:
        LOGGER.warning(f"{PREFIX}{tiny} of {len(wh)} labels are under 3 pixels at imgsz={imgsz}")
    x = wh[(wh >= MIN_LABEL_PX).any(1)].double().numpy()
    if len(x) < n:
        raise ValueError(f"{PREFIX}{len(x)} labels of at least {MIN_LABEL_PX:g} pixels: too few to fit {n} anchors; "
                         f"train with more labels or keep the model's anchors")
    std = x.std(0)
    std[std == 0] = 1.0
    k = _kmeans(x / std, n, rng) * std
    best_k, best_f = k, anchor_fitness(x, k, anchor_t)
    for _ in range(generations):
        v = np.ones_like(best_k)
        while (v == 1).all():  # at least one side must move
            v = ((rng.random(v.shape) < 0.9) * rng.random() * rng.standard_normal(v.shape) * 0.1 + 1).clip(0.3, 3.0)
        cand = (best_k * v).clip(min=MIN_LABEL_PX)
        f = anchor_fitness(x, cand, anchor_t)
        if f > best_f:
            best_k, best_f = cand, f
    best_k = best_k[np.argsort(best_k.prod(1))]
    return torch.from_numpy(best_k).float()


def head_anchors_px(head) -> torch.Tensor:
    """The head's anchors (nl, na, 2) in pixels (the buffer holds them in units of each level's stride)."""
    return head.anchors.detach().cpu().float() * head.stride.detach().cpu().float().view(-1, 1, 1)


@torch.no_grad()
def set_head_anchors(model, anchors_px: torch.Tensor) -> None:
    """Replace the head's anchors by ``anchors_px`` (nl * na, 2) pixels sorted by area: the ``anchors`` buffer
    (stride units), yolov7's pixel ``anchor_grid`` buffer, the cached grids and ``model.yaml``'s anchors."""
    head = model.model[-1]
    px = anchors_px.to(head.anchors.device, head.anchors.dtype).view_as(head.anchors)
    head.anchors[:] = px
    if isinstance(head.anchor_grid, torch.Tensor):
        head.anchor_grid[:] = px.view_as(head.anchor_grid)
    else:
        head.anchor_grid = [torch.empty(0) for _ in range(head.nl)]
    head.grid = [torch.empty(0) for _ in range(head.nl)]
    check_anchor_order(head)  # on pixel anchors, as at build time
    head.anchors /= head.stride.to(head.anchors).view(-1, 1, 1)
    if isinstance(getattr(model, "yaml", None), dict):
        pixels = head_anchors_px(head)
        model.yaml["anchors"] = [[round(float(v), 1) for v in level.flatten()] for level in pixels]


def check_anchors(model, labels: list[dict], imgsz: int, anchor_t: float = 4.0, refit: bool = True,
                  generations: int = 300, seed: int = 0, reason: str = "") -> dict:
    """Log the BPR of the model's anchors on the dataset; with ``refit`` and BPR < 0.98, fit new anchors and
    keep them if their BPR is higher. Returns a report (bpr, aat, and when refitted new_bpr, new_aat,
    replaced, anchors). ``reason`` says in the log why anchors are only checked."""
    head = model.model[-1]
    wh = label_sizes(labels, imgsz, seed=seed)
    old = head_anchors_px(head).view(-1, 2)
    bpr, aat = anchor_metrics(wh, old, anchor_t)
    report = {"bpr": bpr, "aat": aat, "labels": len(wh), "replaced": False}
    msg = f"{PREFIX}{aat:.2f} anchors/target, best possible recall {bpr:.4f} over {len(wh)} labels at " \
          f"imgsz={imgsz} (anchor_t={anchor_t:g})"
    if bpr >= BPR_OK:
        LOGGER.info(f"{msg}: the anchors fit the dataset")
        return report
    if not refit:
        LOGGER.info(f"{msg}: below {BPR_OK}, anchors kept: {reason or 'check only'}")
        return report
    LOGGER.info(f"{msg}: below {BPR_OK}, fitting {len(old)} anchors to the labels (k-means + {generations} "
                f"generations of evolution)")
    try:
        new = fit_anchors(wh, len(old), anchor_t, generations, seed, imgsz)
    except ValueError as e:  # too few labels: training goes on with the model's anchors
        LOGGER.warning(f"{e}; the model's anchors are kept")
        return report
    new_bpr, new_aat = anchor_metrics(wh, new, anchor_t)
    report.update(new_bpr=new_bpr, new_aat=new_aat, anchors=[[round(float(a), 1) for a in p] for p in new])
    if new_bpr > bpr:
        set_head_anchors(model, new)
        report["replaced"] = True
        LOGGER.info(f"{PREFIX}new anchors: best possible recall {bpr:.4f} -> {new_bpr:.4f}, anchors/target "
                    f"{aat:.2f} -> {new_aat:.2f}; anchors (pixels) {report['anchors']}")
    else:
        LOGGER.info(f"{PREFIX}fitted anchors reach best possible recall {new_bpr:.4f}, not above {bpr:.4f}: "
                    f"the model's anchors are kept")
    return report


def broadcast_anchors(model) -> None:
    """Rank 0's anchors on every DDP rank (each rank computes the same ones from the same seed; this makes
    sure of it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    head = model.model[-1]
    dist.broadcast(head.anchors.data, src=0)
    if isinstance(head.anchor_grid, torch.Tensor):
        dist.broadcast(head.anchor_grid.data, src=0)
    head.grid = [torch.empty(0) for _ in range(head.nl)]
    if isinstance(head.anchor_grid, list):
        head.anchor_grid = [torch.empty(0) for _ in range(head.nl)]
