"""The YOLOv5 loss (models/loss.py): assignment on hand-made labels, a hand-computed loss, the mask term on a
hand-made proto, gradients, and a tiny model fitting fixed labels. A stand-in model carries the attributes of
yolov5's Detect / Segment head (nc, nl, na, anchors in grid units, stride, nm)."""
import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from yolo_qat.models.pickled_names import renaming_pickle
from yolo_qat.models.loss import DEFAULT_HYP, YOLOv5DetLoss, YOLOv5SegLoss, bce_with_logits, build_targets

@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: with 2 threads on a busy machine, thread hand-offs cost 100x the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# yolov5's default anchors (pixels) for P3/8, P4/16, P5/32
ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


class StandInHead(nn.Module):
    """The attributes and raw training output of yolov5's Detect (Segment with nm > 0)."""

    def __init__(self, nc, anchors_px=ANCHORS_PX, strides=(8, 16, 32), nm=0, ch=16):
        super().__init__()
        self.nc, self.nl, self.na, self.nm = nc, len(strides), len(anchors_px[0]) // 2, nm
        self.no = 5 + nc + nm
        self.stride = torch.tensor(strides, dtype=torch.float)
        self.register_buffer("anchors", torch.tensor(anchors_px, dtype=torch.float).view(self.nl, self.na, 2)
                             / self.stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(ch, self.na * self.no, 1) for _ in strides)
        if not nm:
            del self.nm  # Detect has no nm

    def forward(self, feats):
        out = []
        for conv, x in zip(self.m, feats):
            b, _, h, w = x.shape
            out.append(conv(x).view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out


class TinyModel(nn.Module):
    """Strided convs down to /8, /16, /32 and the head; with nm, a proto at /4 from the /8 features."""

    def __init__(self, nc=3, nm=0, ch=16):
        super().__init__()
        act = nn.SiLU()
        self.stem = nn.Sequential(nn.Conv2d(3, ch, 3, 2, 1), act, nn.Conv2d(ch, ch, 3, 2, 1), act,
                                  nn.Conv2d(ch, ch, 3, 2, 1), act)
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(ch, ch, 3, 2, 1), act) for _ in range(2))
        self.proto = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(ch, nm, 3, 1, 1)) if nm else None
        self.model = nn.ModuleList([StandInHead(nc, nm=nm, ch=ch)])

    def forward(self, x):
        p3 = self.stem(x)
        p4 = self.down[0](p3)
        p5 = self.down[1](p4)
        maps = self.model[-1]([p3, p4, p5])
        return (maps, self.proto(p3)) if self.proto is not None else maps


def stand_in(nc=3, nm=0, anchors_px=ANCHORS_PX, strides=(8, 16, 32), **attrs):
    return types.SimpleNamespace(model=[StandInHead(nc, anchors_px, strides, nm)], **attrs)


def make_batch(boxes, img_idx=None, cls=None, imgsz=64, bs=1):
    boxes = torch.as_tensor(boxes, dtype=torch.float).view(-1, 4)
    n = len(boxes)
    return {"img": torch.zeros(bs, 3, imgsz, imgsz),
            "batch_idx": torch.tensor(img_idx if img_idx is not None else [0] * n, dtype=torch.float),
            "cls": torch.tensor(cls if cls is not None else [0] * n, dtype=torch.float).view(-1, 1),
            "bboxes": boxes}


def labels(*rows):
    """[img, cls, x, y, w, h] rows, normalised xywh."""
    return torch.tensor(rows, dtype=torch.float).view(-1, 6)


def cells(t):
    return sorted(zip(t.anchor.tolist(), t.gj.tolist(), t.gi.tolist()))


# ---- assignment -------------------------------------------------------------------------------------------------

def test_own_cell_and_the_two_nearest_neighbours():
    # 8x8 grid: centre (3.3, 4.7) -> own cell (x3, y4); x fraction .3 -> left neighbour, y fraction .7 -> lower one
    anchors = torch.tensor([[1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    t = build_targets(labels([0, 1, 3.3 / 8, 4.7 / 8, 1.2 / 8, 1.2 / 8]), anchors, (8, 8))
    # anchors 0 (ratio 1.2) and 1 (1.67) fit, anchor 2 (ratio 4.17 > 4) does not
    want = [(a, gj, gi) for a in (0, 1) for gj, gi in [(4, 3), (4, 2), (5, 3)]]
    assert cells(t) == sorted(want)
    # box xy = centre minus the assigned cell's corner: in (-0.5, 1.5), reachable by 2 sig - 0.5
    offsets = {(gj, gi): tuple(round(v, 5) for v in xy) for gj, gi, xy in zip(t.gj.tolist(), t.gi.tolist(),
                                                                             t.box[:, :2].tolist())}
    assert offsets == {(4, 3): (0.3, 0.7), (4, 2): (1.3, 0.7), (5, 3): (0.3, -0.3)}
    assert torch.allclose(t.box[:, 2:], torch.tensor([1.2, 1.2]).expand(len(t), 2))
    assert torch.equal(t.anchor_wh, anchors[t.anchor])
    assert t.cls.tolist() == [1] * 6 and t.img.tolist() == [0] * 6


def test_right_and_upper_neighbours():
    t = build_targets(labels([0, 0, 5.8 / 8, 2.2 / 8, 1 / 8, 1 / 8]), torch.tensor([[1.0, 1.0]]), (8, 8))
    assert cells(t) == sorted([(0, 2, 5), (0, 2, 6), (0, 1, 5)])
    by_cell = {(gj, gi): xy for gj, gi, xy in zip(t.gj.tolist(), t.gi.tolist(), t.box[:, :2].tolist())}
    assert by_cell[(2, 6)] == pytest.approx([-0.2, 0.2], abs=1e-5)
    assert by_cell[(1, 5)] == pytest.approx([0.8, 1.2], abs=1e-5)


@pytest.mark.parametrize("xy, want", [
    ((0.4, 0.3), [(0, 0)]),          # first cell: no neighbour above or to the left
    ((7.8, 7.9), [(7, 7)]),          # last cell: no neighbour below or to the right
    ((1.3, 7.6), [(7, 1), (7, 0)]),  # second column: the left neighbour is column 0; bottom row: none below
    ((6.7, 0.2), [(0, 6), (0, 7)]),  # top row: none above; the right neighbour is the last column
])
def test_no_neighbour_across_the_image_border(xy, want):
    t = build_targets(labels([0, 0, xy[0] / 8, xy[1] / 8, 1 / 8, 1 / 8]), torch.tensor([[1.0, 1.0]]), (8, 8))
    assert sorted(zip(t.gj.tolist(), t.gi.tolist())) == sorted(want)


def test_centre_on_a_cell_edge_follows_upstream():
    # x = 4.0 exactly: both half-cell tests pass; upstream's "right" cell is then floor(4.5) = the own cell
    t = build_targets(labels([0, 0, 4.0 / 8, 2.7 / 8, 1 / 8, 1 / 8]), torch.tensor([[1.0, 1.0]]), (8, 8))
    assert sorted(zip(t.gj.tolist(), t.gi.tolist())) == sorted([(2, 4), (2, 3), (2, 4), (3, 4)])


@pytest.mark.parametrize("wh, fits", [
    ((5.0, 1.0), [False, True]),     # 5x anchor 0's width; 2.5x anchor 1's
    ((1.0, 5.0), [False, True]),     # the same on the height
    ((0.2, 0.2), [False, False]),    # anchor / label = 5 and 10
    ((3.99, 1.0), [True, True]),     # just under anchor_t = 4
    ((4.0, 1.0), [False, True]),     # the bound itself is out
])
def test_ratio_filter(wh, fits):
    anchors = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    t = build_targets(labels([0, 0, 0.3 / 8 + 0.5, 0.3 / 8 + 0.5, wh[0] / 8, wh[1] / 8]), anchors, (8, 8))
    assert [a in t.anchor.tolist() for a in (0, 1)] == fits


def test_anchor_t_is_the_bound():
    t = build_targets(labels([0, 0, 0.55, 0.55, 3 / 8, 1 / 8]), torch.tensor([[1.0, 1.0]]), (8, 8), anchor_t=2.0)
    assert len(t) == 0


def test_which_level_and_anchor():
    # a 20x20 px label at imgsz 256: 2.5 cells on P3 fits all three anchors (worst ratio 2); 1.25 cells on P4 fits
    # anchors (30, 61) and (62, 45) (ratios 3.05, 3.1) but not (59, 119) (5.95); 0.625 cells on P5 fits none
    head = StandInHead(3)
    lab = labels([0, 0, 0.51, 0.53, 20 / 256, 20 / 256])
    got = [sorted(set(build_targets(lab, head.anchors[i], (256 // s, 256 // s)).anchor.tolist()))
           for i, s in enumerate((8, 16, 32))]
    assert got == [[0, 1, 2], [0, 1], []]


def test_labels_keep_their_image_class_and_row():
    lab = labels([0, 2, 0.3, 0.3, 0.1, 0.1], [1, 0, 0.7, 0.7, 0.1, 0.1], [1, 1, 0.2, 0.8, 0.1, 0.1])
    t = build_targets(lab, torch.tensor([[0.8, 0.8]]), (8, 8))
    for img, c, row in zip(t.img.tolist(), t.cls.tolist(), t.label.tolist()):
        assert (img, c) == (int(lab[row, 0]), int(lab[row, 1]))
    assert set(t.label.tolist()) == {0, 1, 2}
    assert len(build_targets(labels(), torch.tensor([[1.0, 1.0]]), (8, 8))) == 0


# ---- the loss value -----------------------------------------------------------------------------------------------

def ciou(p, t):
    """CIoU of two (cx, cy, w, h) boxes from its paper (Zheng et al. 2020), in plain floats."""
    (px, py, pw, ph), (tx, ty, tw, th) = p, t
    iw = max(0.0, min(px + pw / 2, tx + tw / 2) - max(px - pw / 2, tx - tw / 2))
    ih = max(0.0, min(py + ph / 2, ty + th / 2) - max(py - ph / 2, ty - th / 2))
    iou = iw * ih / (pw * ph + tw * th - iw * ih)
    cw = max(px + pw / 2, tx + tw / 2) - min(px - pw / 2, tx - tw / 2)
    ch = max(py + ph / 2, ty + th / 2) - min(py - ph / 2, ty - th / 2)
    v = 4 / math.pi ** 2 * (math.atan(tw / th) - math.atan(pw / ph)) ** 2
    return iou - ((px - tx) ** 2 + (py - ty) ** 2) / (cw ** 2 + ch ** 2) - v ** 2 / (1 - iou + v)


def bce(x, y):
    return max(x, 0) - x * y + math.log1p(math.exp(-abs(x)))


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_loss_equals_a_hand_computation():
    # one level (4x4 cells of 8 px), anchors (1, 1) and (3, 0.3) cells, nc = 2, one label: centre (1.2, 2.4), wh
    # (0.8, 1.4) cells. Anchor 1 fails the ratio test (h 4.67x); anchor 0 takes its own cell (x1, y2), the left
    # one (x0, y2) and the upper one (x1, y1).
    model = stand_in(nc=2, anchors_px=[[8, 8, 24, 2.4]], strides=(8,))
    torch.manual_seed(0)
    pred = torch.randn(1, 2, 4, 4, 7)
    batch = make_batch([0.3, 0.6, 0.2, 0.35], cls=[1], imgsz=32)
    loss, items = YOLOv5DetLoss(model)([pred], batch)

    target = (1.2, 2.4, 0.8, 1.4)
    positives = [(2, 1), (2, 0), (1, 1)]  # (gj, gi)
    tobj = torch.zeros(2, 4, 4)
    box_terms, cls_terms = [], []
    for gj, gi in positives:
        p = pred[0, 0, gj, gi].tolist()
        pbox = (2 * sig(p[0]) - 0.5, 2 * sig(p[1]) - 0.5, (2 * sig(p[2])) ** 2, (2 * sig(p[3])) ** 2)
        c = ciou(pbox, (target[0] - gi, target[1] - gj, target[2], target[3]))
        box_terms.append(1 - c)
        tobj[0, gj, gi] = max(c, 0)
        cls_terms += [bce(p[5], 0.0), bce(p[6], 1.0)]
    lbox = sum(box_terms) / 3
    lobj = 4.0 * sum(bce(x, y) for x, y in zip(pred[0, ..., 4].flatten().tolist(), tobj.flatten().tolist())) / 32
    lcls = sum(cls_terms) / 6
    # nl = 1: gains x3; obj x (32/640)^2; cls x 2/80
    want = [lbox * 0.05 * 3, lobj * 1.0 * (32 / 640) ** 2 * 3, lcls * 0.5 * 2 / 80 * 3]
    assert list(items) == ["box_loss", "obj_loss", "cls_loss"]
    assert torch.tensor([float(v) for v in items.values()]) == pytest.approx(want, rel=1e-5)
    assert float(loss) == pytest.approx(sum(want) * 1, rel=1e-5)


def test_single_class_has_no_class_term_and_batch_size_scales_the_total():
    model = stand_in(nc=1)
    torch.manual_seed(1)
    maps = [torch.randn(2, 3, s, s, 6) for s in (8, 4, 2)]
    batch = make_batch([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.4, 0.4]], img_idx=[0, 1], bs=2)
    loss, items = YOLOv5DetLoss(model)(maps, batch)
    assert float(items["cls_loss"]) == 0.0
    assert float(loss) == pytest.approx(2 * sum(float(v) for v in items.values()), rel=1e-6)


def test_gains_scale_with_levels_classes_and_image_size():
    loss = YOLOv5DetLoss(stand_in(nc=20))
    assert loss.gains(640) == pytest.approx((0.05, 1.0, 0.5 * 20 / 80))
    assert loss.gains(320) == pytest.approx((0.05, 0.25, 0.125))
    four = YOLOv5DetLoss(stand_in(nc=80, anchors_px=ANCHORS_PX + [[400, 400, 500, 500, 600, 600]],
                                  strides=(8, 16, 32, 64)))
    assert four.gains(640) == pytest.approx((0.05 * 0.75, 0.75, 0.5 * 0.75))
    assert four.balance[:4] == [4.0, 1.0, 0.25, 0.06]


def test_imgsz_comes_from_the_batch_unless_given():
    torch.manual_seed(2)
    maps = [torch.randn(1, 3, s, s, 8) for s in (8, 4, 2)]
    batch = make_batch([0.5, 0.5, 0.3, 0.3])
    _, at_64 = YOLOv5DetLoss(stand_in())(maps, batch)
    _, at_640 = YOLOv5DetLoss(stand_in(), imgsz=640)(maps, batch)
    assert float(at_640["obj_loss"]) == pytest.approx(100 * float(at_64["obj_loss"]), rel=1e-5)
    assert float(at_640["box_loss"]) == pytest.approx(float(at_64["box_loss"]), rel=1e-6)


def test_hyp_sources():
    assert {k: DEFAULT_HYP[k] for k in ("lr0", "lrf", "momentum", "weight_decay", "warmup_epochs",
                                        "warmup_momentum", "warmup_bias_lr", "box", "cls", "obj", "anchor_t",
                                        "fl_gamma", "hsv_h", "mosaic", "fliplr", "translate", "scale")} == {
        "lr0": 0.01, "lrf": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "warmup_epochs": 3.0,
        "warmup_momentum": 0.8, "warmup_bias_lr": 0.1, "box": 0.05, "cls": 0.5, "obj": 1.0, "anchor_t": 4.0,
        "fl_gamma": 0.0, "hsv_h": 0.015, "mosaic": 1.0, "fliplr": 0.5, "translate": 0.1, "scale": 0.5}
    # a checkpoint's pickled hyp: its loss settings are taken, its gains (already scaled by train.py) are not
    from_ckpt = YOLOv5DetLoss(stand_in(hyp={"anchor_t": 2.5, "box": 0.0123, "cls": 0.01, "fl_gamma": 1.0}))
    assert (from_ckpt.hyp["anchor_t"], from_ckpt.hyp["fl_gamma"], from_ckpt.hyp["box"]) == (2.5, 1.0, 0.05)
    given = YOLOv5DetLoss(stand_in(hyp={"anchor_t": 2.5}), hyp={"anchor_t": 3.0, "box": 0.1})
    assert (given.hyp["anchor_t"], given.hyp["box"]) == (3.0, 0.1)
    smoothed = YOLOv5DetLoss(stand_in(), hyp={"label_smoothing": 0.2})
    assert (smoothed.cls_pos, smoothed.cls_neg) == pytest.approx((0.9, 0.1))


def test_focal_form():
    # FL = BCE x alpha_t x (1 - p_t)^gamma, alpha_t = 0.25 on positives, 0.75 on negatives
    logits, target = torch.tensor([2.0, -3.0, 0.5]), torch.tensor([0.0, 1.0, 1.0])
    p = torch.sigmoid(logits)
    bce_ = F.softplus(torch.tensor([2.0, 3.0, -0.5]))  # -log(1 - p) for target 0, -log(p) for target 1
    want = [bce_[0] * 0.75 * p[0] ** 1.5, bce_[1] * 0.25 * (1 - p[1]) ** 1.5, bce_[2] * 0.25 * (1 - p[2]) ** 1.5]
    for i in range(3):
        assert float(bce_with_logits(logits[i:i + 1], target[i:i + 1], gamma=1.5)) == pytest.approx(float(want[i]))
    assert float(bce_with_logits(logits, target)) == pytest.approx(float(F.binary_cross_entropy_with_logits(
        logits, target)))
    assert float(bce_with_logits(logits, target, pos_weight=2.0)) == pytest.approx(float(
        F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(2.0))))
    torch.manual_seed(3)
    maps = [torch.randn(1, 3, s, s, 8) for s in (8, 4, 2)]
    batch = make_batch([0.5, 0.5, 0.3, 0.3])
    _, plain = YOLOv5DetLoss(stand_in())(maps, batch)
    _, focal = YOLOv5DetLoss(stand_in(), hyp={"fl_gamma": 1.5})(maps, batch)
    assert float(focal["box_loss"]) == pytest.approx(float(plain["box_loss"]))
    assert float(focal["obj_loss"]) < 0.5 * float(plain["obj_loss"])


def test_eval_outputs_give_the_same_loss():
    torch.manual_seed(4)
    maps = [torch.randn(1, 3, s, s, 8 + 4) for s in (8, 4, 2)]
    proto = torch.randn(1, 4, 16, 16)
    batch = make_batch([0.5, 0.5, 0.3, 0.3])
    batch["masks"] = torch.zeros(1, 16, 16)
    seg = YOLOv5SegLoss(stand_in(nm=4))
    flat = torch.randn(1, 252, 12)  # what the eval output's decoded pred would be; the loss ignores it
    assert float(seg((flat, proto, maps), batch)[0]) == float(seg((maps, proto), batch)[0])
    det = YOLOv5DetLoss(stand_in())
    dmaps = [m[..., :8] for m in maps]
    assert float(det((flat[..., :8], dmaps), batch)[0]) == float(det(dmaps, batch)[0])


def test_bad_inputs_get_one_paragraph():
    with pytest.raises(TypeError, match="anchors"):
        YOLOv5DetLoss(types.SimpleNamespace(model=[nn.Conv2d(1, 1, 1)]))
    with pytest.raises(TypeError, match="nm"):
        YOLOv5SegLoss(stand_in())
    loss = YOLOv5DetLoss(stand_in(nc=3))
    batch = make_batch([0.5, 0.5, 0.3, 0.3])
    with pytest.raises(ValueError, match="nc=3"):
        loss([torch.zeros(1, 3, s, s, 9) for s in (8, 4, 2)], batch)
    with pytest.raises(TypeError, match="post-processed"):
        loss(torch.zeros(1, 252, 8), batch)
    with pytest.raises(KeyError, match="bboxes"):
        loss([torch.zeros(1, 3, s, s, 8) for s in (8, 4, 2)], {"img": batch["img"], "cls": batch["cls"],
                                                               "batch_idx": batch["batch_idx"]})


# ---- the mask term ------------------------------------------------------------------------------------------------

def one_level_seg(nm=1):
    # one level of 8 px cells on a 64 px image, one anchor fitting the labels below, proto at /4 (16x16)
    return stand_in(nc=1, nm=nm, anchors_px=[[16, 16]], strides=(8,))


def seg_inputs(boxes, proto_inside, gt_inside, proto_outside=None, coef=1.0, img_idx=None, bs=1):
    """Maps whose mask coefficient is `coef` everywhere; proto = proto_inside inside each label box, else
    proto_outside; per-instance masks = gt_inside(mask of the box) inside each box, 0 outside."""
    torch.manual_seed(5)
    maps = [torch.randn(bs, 1, 8, 8, 7)]
    maps[0][..., 6] = coef
    proto = proto_outside.clone() if proto_outside is not None else torch.full((bs, 1, 16, 16), -3.0)
    masks = []
    img_idx = img_idx or [0] * len(boxes)
    for (x, y, w, h), b in zip(boxes, img_idx):
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[round((y - h / 2) * 16):round((y + h / 2) * 16), round((x - w / 2) * 16):round((x + w / 2) * 16)] = 1
        proto[b, 0][inside] = proto_inside
        masks.append(gt_inside(inside))
    batch = make_batch(boxes, img_idx=img_idx, bs=bs)
    batch["masks"] = torch.stack(masks).float()
    return maps, proto, batch


def test_mask_term_is_the_mean_bce_inside_the_box():
    # two labels of different sizes, boxes on proto pixels; logit 0 inside -> log 2 per pixel whatever the
    # target; normalised by box area, each positive gives log 2, so the image's mean is log 2
    boxes = [[0.375, 0.625, 0.25, 0.25], [0.6875, 0.3125, 0.375, 0.5]]
    maps, proto, batch = seg_inputs(boxes, 0.0, lambda inside: inside)
    loss = YOLOv5SegLoss(one_level_seg(), overlap=False)
    _, items = loss((maps, proto), batch)
    gbox = loss.gains(64)[0]
    assert float(items["seg_loss"]) == pytest.approx(math.log(2) * gbox, rel=1e-5)
    # whatever lies outside the boxes does not count
    _, moved = loss((maps, proto + 7.0 * (proto == -3.0)), batch)
    assert float(moved["seg_loss"]) == pytest.approx(float(items["seg_loss"]), rel=1e-6)


def test_mask_term_with_a_partial_target_and_an_unaligned_box():
    # logit 2 inside, target 1 on the left half only: mean of softplus(-2) and softplus(2)
    box = [[0.5, 0.5, 0.5, 0.25]]

    def left_half(inside):
        m = inside.clone()
        m[:, 8:] = False
        return m
    maps, proto, batch = seg_inputs(box, 2.0, left_half)
    loss = YOLOv5SegLoss(one_level_seg(), overlap=False)
    want = (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(2.0))) / 2 * loss.gains(64)[0]
    assert float(loss((maps, proto), batch)[1]["seg_loss"]) == pytest.approx(float(want), rel=1e-5)
    # a box edge between proto pixels: a pixel counts when its index lies in [x1, x2), the sum is divided by the
    # box area in proto pixels (here 8.4 x 4), not by the number of pixels counted (9 x 4)
    batch["bboxes"] = torch.tensor([[0.5, 0.5, 0.525, 0.25]])
    proto = torch.zeros(1, 1, 16, 16)
    got = float(loss((maps, proto), batch)[1]["seg_loss"])
    counted = 9 * 4  # columns 4..12 (x1 = 3.8 -> from 4, x2 = 12.2 -> to 12), rows 6..9
    assert got == pytest.approx(math.log(2) * counted / (8.4 * 4) * loss.gains(64)[0], rel=1e-5)


def test_overlap_masks_and_mask_resolution():
    boxes = [[0.3, 0.3, 0.25, 0.25], [0.7, 0.6, 0.375, 0.5], [0.5, 0.5, 0.5, 0.5]]
    torch.manual_seed(6)
    maps = [torch.randn(2, 3, s, s, 5 + 3 + 4) for s in (8, 4, 2)]
    proto = torch.randn(2, 4, 16, 16)
    per_instance = (torch.rand(3, 16, 16) > 0.5).float()
    overlap = torch.zeros(2, 16, 16)
    overlap[0][per_instance[0] > 0] = 1  # image 0: labels 0, 1 drawn as 1, 2 (a later label on top)
    overlap[0][per_instance[1] > 0] = 2
    overlap[1][per_instance[2] > 0] = 1
    per_instance[0][per_instance[1] > 0] = 0  # what the overlap form can show of label 0
    batch = make_batch(boxes, img_idx=[0, 0, 1], cls=[0, 1, 2], bs=2)
    model = stand_in(nm=4)
    a = YOLOv5SegLoss(model, overlap=True)((maps, proto), dict(batch, masks=overlap))[1]
    b = YOLOv5SegLoss(model, overlap=False)((maps, proto), dict(batch, masks=per_instance))[1]
    assert float(a["seg_loss"]) == pytest.approx(float(b["seg_loss"]), rel=1e-6)
    assert float(a["seg_loss"]) > 0
    # masks at twice the proto size are brought to it (nearest), as yolov5 does
    big = overlap.repeat_interleave(2, 1).repeat_interleave(2, 2)
    c = YOLOv5SegLoss(model, overlap=True)((maps, proto), dict(batch, masks=big))[1]
    assert float(c["seg_loss"]) == pytest.approx(float(a["seg_loss"]), rel=1e-6)
    # overlap_mask is read from model.args (Ultralytics' trainer sets it) unless given
    assert YOLOv5SegLoss(stand_in(nm=4, args={"overlap_mask": False})).overlap is False
    assert YOLOv5SegLoss(stand_in(nm=4)).overlap is True


def test_no_labels_still_reaches_every_output():
    torch.manual_seed(7)
    maps = [torch.randn(1, 3, s, s, 12, requires_grad=True) for s in (8, 4, 2)]
    proto = torch.randn(1, 4, 16, 16, requires_grad=True)
    batch = make_batch(torch.zeros(0, 4))
    batch["masks"] = torch.zeros(1, 16, 16)
    loss, items = YOLOv5SegLoss(stand_in(nm=4))((maps, proto), batch)
    loss.backward()
    assert float(items["box_loss"]) == float(items["seg_loss"]) == float(items["cls_loss"]) == 0
    assert float(items["obj_loss"]) > 0 and proto.grad is not None


# ---- training -----------------------------------------------------------------------------------------------------

def fixed_data(nm=0):
    g = torch.Generator().manual_seed(8)
    imgs = torch.rand(2, 3, 64, 64, generator=g) * 0.2
    boxes = [[0.3, 0.3, 0.3, 0.25], [0.7, 0.65, 0.35, 0.45], [0.5, 0.5, 0.6, 0.5]]
    img_idx, cls = [0, 0, 1], [0, 1, 2]
    masks = torch.zeros(2, 16, 16)
    for k, ((x, y, w, h), b) in enumerate(zip(boxes, img_idx)):
        x1, x2, y1, y2 = int((x - w / 2) * 64), int((x + w / 2) * 64), int((y - h / 2) * 64), int((y + h / 2) * 64)
        imgs[b, cls[k], y1:y2, x1:x2] = 1.0  # the class is the colour
        masks[b, (y1 + 2) // 4:(y2 - 2) // 4, (x1 + 2) // 4:(x2 - 2) // 4] = img_idx[:k].count(b) + 1
    batch = make_batch(boxes, img_idx=img_idx, cls=cls, bs=2)
    batch["img"] = imgs
    if nm:
        batch["masks"] = masks
    return batch


@pytest.mark.parametrize("nm", [0, 4])
def test_gradients_reach_every_parameter(nm):
    torch.manual_seed(9)
    model = TinyModel(nm=nm)
    loss_fn = (YOLOv5SegLoss if nm else YOLOv5DetLoss)(model)
    batch = fixed_data(nm)
    loss, _ = loss_fn(model(batch["img"]), batch)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("nm", [0, 4])
def test_loss_falls_on_fixed_labels(nm):
    torch.manual_seed(10)
    model = TinyModel(nm=nm)
    loss_fn = (YOLOv5SegLoss if nm else YOLOv5DetLoss)(model)
    batch = fixed_data(nm)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        loss, items = loss_fn(model(batch["img"]), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in items.items()})
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.6 * sum(first.values())
    for k in first:  # every term, not just the total
        assert last[k] < 0.8 * first[k], (k, first[k], last[k])


FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "original-yolo"


@pytest.mark.parametrize("source", ["yolov5n.yaml", "yolov5n-seg.yaml", "yolov7-tiny-orig.pt"])
def test_with_the_original_models(source):
    """The real anchor-based classes of models/yolo.py (written beside this loss), built from the shipped yamls
    or loaded from an original checkpoint (fp16 anchors)."""
    yolo = pytest.importorskip("yolo_qat.models.yolo")
    if not hasattr(yolo, "DetectionModel"):
        pytest.skip("yolo_qat.models.yolo.DetectionModel not available")
    from yolo_qat.models import MODELS_DIR
    torch.manual_seed(11)
    if source.endswith(".pt"):
        if not (FIXTURES / source).exists():
            pytest.skip(f"{source} fixture absent")
        model = torch.load(FIXTURES / source, weights_only=False, pickle_module=renaming_pickle)["model"].float()
    else:
        if not (MODELS_DIR / source).exists():
            pytest.skip(f"models/{source} not shipped")
        cls = yolo.SegmentationModel if "seg" in source else yolo.DetectionModel
        model = cls(str(MODELS_DIR / source), nc=3, verbose=False)
    model.train()
    seg = hasattr(model.model[-1], "nm")
    batch = fixed_data(nm=4 if seg else 0)
    loss_fn = (YOLOv5SegLoss if seg else YOLOv5DetLoss)(model)
    loss, items = loss_fn(model(batch["img"]), batch)
    loss.backward()
    assert torch.isfinite(loss) and all(float(v) > 0 for v in items.values())
    assert all(p.grad is not None for p in model.model[-1].parameters())
