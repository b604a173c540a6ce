"""The original anchor-based YOLOv5 / YOLOv7 on this project's trainer, validator and command line
(engine/original.py, engine/autoanchor.py): AutoAnchor, the output conversion for Ultralytics' NMS, the trainers'
defaults and weight transfer, the loss falling on the embedded data, and the whole CLI pipeline from each fixture
(train_qat.py -> correct_qc.py -> val.py [-> export.py])."""
import contextlib
import copy
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from ultralytics.utils import DEFAULT_CFG_DICT, LOGGER, YAML
from ultralytics.utils.nms import non_max_suppression

from yolo_qat.models.pickled_names import renaming_pickle
from yolo_qat.engine.autoanchor import anchor_metrics, check_anchors, fit_anchors, head_anchors_px, label_sizes
from yolo_qat.engine.original import TRAIN_DEFAULTS, OriginalDetectionTrainer, OriginalSegmentationTrainer
from yolo_qat.engine.validate import to_ultralytics_preds, validator_class
from yolo_qat.models.facts import is_original, is_original_source
from yolo_qat.models.loss import build_targets
from yolo_qat.models.registry import ORIGINAL_CFGS
from yolo_qat.models.yolo import DetectionModel, IDetect, SegmentationModel

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT.parent / "shared" / "fixtures" / "original-yolo"
FIXTURES = {"yolov5n": "yolov5n-orig.pt", "yolov5n-seg": "yolov5n-seg-orig.pt", "yolov7-tiny": "yolov7-tiny-orig.pt"}
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"fixtures not found at {FIX}")


_BUILT = {}


def build(name, nc=4):
    """A fresh model from a shipped yaml (built once per module, then copied: each build probes its strides)."""
    if (name, nc) not in _BUILT:
        cls = SegmentationModel if name.endswith("-seg") else DetectionModel
        _BUILT[name, nc] = cls(name, nc=nc, verbose=False)
    return copy.deepcopy(_BUILT[name, nc])


@contextlib.contextmanager
def captured_log():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    LOGGER.addHandler(handler)
    try:
        yield buf
    finally:
        LOGGER.removeHandler(handler)


# ---------------------------------------------------------------------------------------------- AutoAnchor

def labels_of(sizes_px, imgsz=64, shape=(64, 64)):
    """Ultralytics dataset labels for label sizes in pixels at imgsz (one image per label, centred)."""
    h, w = shape
    side = torch.tensor([w, h], dtype=torch.float64) * imgsz / max(h, w)
    out = []
    for wh in sizes_px:
        norm = (torch.tensor(wh, dtype=torch.float64) / side).tolist()
        out.append({"shape": shape, "bboxes": torch.tensor([[0.5, 0.5, *norm]]).numpy()})
    return out


def test_label_sizes_scale_the_long_side_to_imgsz():
    # a 100 x 200 (h x w) image at imgsz 100 is letterboxed to 50 x 100: normalised w 0.1 -> 10 px, h 0.4 -> 20 px
    labels = [{"shape": (100, 200), "bboxes": torch.tensor([[0.5, 0.5, 0.1, 0.4], [0.2, 0.2, 0.5, 1.0]]).numpy()}]
    wh = label_sizes(labels, 100, zoom=None)
    assert torch.allclose(wh, torch.tensor([[10.0, 20.0], [50.0, 50.0]]))
    zoomed = label_sizes(labels, 100, zoom=(0.9, 1.1), seed=3)
    ratio = zoomed / wh
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio)) and 0.9 <= float(ratio[0, 0]) <= 1.1  # one zoom per image
    assert torch.equal(zoomed, label_sizes(labels, 100, zoom=(0.9, 1.1), seed=3))  # seeded: the same on every rank


def test_bpr_by_hand():
    anchors = torch.tensor([[10.0, 20.0], [40.0, 80.0], [100.0, 20.0]])
    # (10, 20): anchor 0 exactly; (40, 80) is 4x on both sides: not within anchor_t (the loss's "< 4" as well)
    # (20, 40): anchors 0 and 1 (2x each); (30, 10): anchor 0 (3x, 2x) and anchor 2 (3.3x, 2x)
    # (400, 20): 4x anchor 2's width -> no anchor; (5, 5): 8x under anchor 0's height -> none
    wh = torch.tensor([[10.0, 20.0], [20.0, 40.0], [30.0, 10.0], [400.0, 20.0], [5.0, 5.0]])
    bpr, aat = anchor_metrics(wh, anchors, anchor_t=4.0)
    assert bpr == pytest.approx(3 / 5) and aat == pytest.approx((1 + 2 + 2 + 0 + 0) / 5)
    assert anchor_metrics(wh, anchors, anchor_t=8.5)[0] == pytest.approx(1.0)


def test_bpr_is_the_share_of_labels_the_loss_assigns():
    """The independent reference: models/loss.py's build_targets on one level (stride 8, anchors in grid units)
    assigns a label to some anchor exactly when it counts as recallable."""
    g = torch.Generator().manual_seed(0)
    anchors_px = torch.tensor([[8.0, 10.0], [20.0, 14.0], [30.0, 40.0]])
    wh = torch.exp(torch.rand(400, 2, generator=g) * 4.5)  # 1 .. 90 px at imgsz 64
    labels = torch.cat((torch.zeros(400, 2), torch.full((400, 2), 0.5), wh / 64), 1)
    t = build_targets(labels, anchors_px / 8, (8, 8), anchor_t=4.0)
    assigned = torch.zeros(400, dtype=torch.bool)
    assigned[t.label] = True
    bpr, _ = anchor_metrics(wh, anchors_px, 4.0)
    assert 0.2 < bpr < 0.9 and bpr == pytest.approx(float(assigned.float().mean()))


def test_kmeans_anchors_fit_labels_the_default_anchors_miss():
    # long thin labels, lying (90-130 x 2.5-3.5 px at imgsz 640) and standing: none fits yolov5's default anchors
    g = torch.Generator().manual_seed(1)
    thin = torch.stack((90 + 40 * torch.rand(150, generator=g), 2.5 + torch.rand(150, generator=g)), 1)
    sizes = torch.cat((thin, thin.flip(1))).tolist()
    model = build("yolov5n")
    default = head_anchors_px(model.model[-1]).view(-1, 2)
    labels = labels_of(sizes, imgsz=640, shape=(640, 640))
    bpr_default = anchor_metrics(label_sizes(labels, 640, seed=0), default)[0]
    assert bpr_default == 0.0
    new = fit_anchors(label_sizes(labels, 640, seed=0), 9, generations=100, imgsz=640)
    assert anchor_metrics(label_sizes(labels, 640, seed=0), new)[0] == 1.0
    assert torch.equal(new.prod(1).argsort(), torch.arange(9))  # sorted by area, as levels expect

    with captured_log() as log:
        report = check_anchors(model, labels, 640, generations=100)
    assert report["replaced"] and report["bpr"] == pytest.approx(bpr_default) and report["new_bpr"] == 1.0
    assert "best possible recall" in log.getvalue() and "->" in log.getvalue()
    head = model.model[-1]
    px = head_anchors_px(head)
    assert torch.allclose(px.view(-1, 2), torch.tensor(report["anchors"]), atol=0.06)
    assert model.yaml["anchors"] == [[round(float(v), 1) for v in level.flatten()] for level in px]
    # the loss now assigns every label to some level and anchor
    wh = torch.tensor(sizes)
    batch = torch.cat((torch.zeros(len(wh), 2), torch.full((len(wh), 2), 0.5), wh / 640), 1)
    hit = torch.zeros(len(wh), dtype=torch.bool)
    for i, s in enumerate((8, 16, 32)):
        hit[build_targets(batch, head.anchors[i], (640 // s, 640 // s)).label] = True
    assert hit.all()


def test_trained_anchors_are_only_checked():
    model = build("yolov7-tiny")
    before = model.model[-1].anchors.clone()
    labels = labels_of([[80.0, 5.0]] * 20, imgsz=640, shape=(640, 640))
    with captured_log() as log:
        report = check_anchors(model, labels, 640, refit=False, reason="the weights were trained with these anchors")
    assert report["bpr"] == 0.0 and not report["replaced"] and "new_bpr" not in report
    assert torch.equal(model.model[-1].anchors, before) and "trained with these anchors" in log.getvalue()


def test_too_few_labels_to_fit_keep_the_anchors():
    model = build("yolov5n")
    before = model.model[-1].anchors.clone()
    report = check_anchors(model, labels_of([[80.0, 3.0]] * 5, 640, (640, 640)), 640)  # 5 labels, 9 anchors
    assert report["bpr"] == 0.0 and not report["replaced"] and torch.equal(model.model[-1].anchors, before)


def test_refitted_anchors_reach_yolov7s_pixel_anchor_grid():
    model = build("yolov7-tiny")
    head = model.model[-1]
    assert isinstance(head, IDetect)
    check_anchors(model, labels_of([[80.0, 5.0]] * 30 + [[5.0, 80.0]] * 30, 640, (640, 640)), 640, generations=50)
    assert torch.allclose(head.anchor_grid.view(-1, 2), head_anchors_px(head).view(-1, 2))
    with torch.no_grad():  # the decoded wh of a zero logit is (2 x 0.5)^2 x the anchor, at every level
        for i in range(head.nl):
            wh = head._decode(i, torch.zeros(1, head.na, 2, 2, head.no))[0, :, 0, 0, 2:4]
            assert torch.allclose(wh, head_anchors_px(head)[i])


# ---------------------------------------------------------------------------------------------- validation

def test_original_output_to_ultralytics_nms_layout():
    # two anchors, nc = 2: objectness 0.5 x class 0.8 must become the class score 0.4
    pred = torch.tensor([[[32.0, 32.0, 10.0, 20.0, 0.5, 0.8, 0.1],
                          [10.0, 12.0, 4.0, 4.0, 0.9, 0.2, 0.3]]])
    out = to_ultralytics_preds((pred, ["maps"]))
    assert out.shape == (1, 6, 2)
    assert torch.allclose(out[0, :, 0], torch.tensor([32.0, 32.0, 10.0, 20.0, 0.4, 0.05]))
    det = non_max_suppression(out, conf_thres=0.1, iou_thres=0.7, nc=0, multi_label=True)[0]
    want = {(27.0, 22.0, 37.0, 42.0, 0.4, 0.0), (8.0, 10.0, 12.0, 14.0, 0.27, 1.0), (8.0, 10.0, 12.0, 14.0, 0.18, 0.0)}
    assert {tuple(round(float(v), 4) for v in row) for row in det} == want
    # segmentation: 3 mask coefficients pass through untouched, the proto travels beside
    coef = torch.tensor([[[1.0, -2.0, 3.0]] * 2])
    proto = torch.rand(1, 3, 4, 4)
    out, p = to_ultralytics_preds((torch.cat((pred, coef), -1), proto, ["maps"]))
    assert p is proto and out.shape == (1, 9, 2) and torch.equal(out[0, 6:, 1], coef[0, 1])
    assert torch.equal(to_ultralytics_preds((pred,)), to_ultralytics_preds(pred))  # export layout
    for bad in (torch.rand(1, 10, 5), {"boxes": pred}):  # no class column; not a tensor output at all
        with pytest.raises(TypeError, match="anchor-based"):
            to_ultralytics_preds(bad)


def test_validator_and_trainer_dispatch(tmp_path):
    from ultralytics.models.yolo.detect import DetectionValidator

    from yolo_qat.engine.trainer import QATOriginalSegmentationTrainer, QATSegmentationTrainer, qat_trainer_class
    from yolo_qat.engine.validate import PredictionsOnlySegmentationValidator

    cls = validator_class("segment", original=True, predictions_only=True)
    assert issubclass(cls, PredictionsOnlySegmentationValidator) and cls.postprocess is not \
        PredictionsOnlySegmentationValidator.postprocess
    assert validator_class("detect", original=False) is DetectionValidator
    assert qat_trainer_class("segment", original=True) is QATOriginalSegmentationTrainer
    assert qat_trainer_class("segment") is QATSegmentationTrainer
    assert QATOriginalSegmentationTrainer.__module__ == "yolo_qat.engine.trainer"  # the DDP launcher imports it by path
    for name in ORIGINAL_CFGS:
        assert is_original_source(name) and is_original_source(ORIGINAL_CFGS[name])
    assert not is_original_source("yolov5nu") and not is_original_source(tmp_path / "missing.pt")


@needs_fixtures
def test_cli_reads_both_checkpoint_layouts_and_the_yamls(tmp_path):
    """engine/source.py's inspect_source on an unstripped yolov5 last.pt (fp16 model and EMA, the EMA is used), the
    yolov7 layout and the original yamls (Ultralytics' guess would read only the file name)."""
    from yolo_qat.engine.source import inspect_source
    from yolo_qat.models.yaml_rule import resolve_model_cfg

    ckpt = torch.load(FIX / FIXTURES["yolov5n-seg"], map_location="cpu", weights_only=False, pickle_module=renaming_pickle)
    ema = ckpt["model"]
    raw = copy.deepcopy(ema).float()
    raw.model[-1].nc = 999  # marks the raw model: it must not be the one read
    last = {"epoch": 3, "best_fitness": 0.1, "model": raw.half(), "ema": ema, "updates": 40, "optimizer": None,
            "opt": {"imgsz": 640}, "git": None, "date": None}
    torch.save(last, tmp_path / "last.pt")
    assert inspect_source(str(tmp_path / "last.pt"))[0] == "segment" and is_original_source(tmp_path / "last.pt")
    from yolo_qat.models.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "last.pt")[0].model[-1].nc == 3
    assert inspect_source(str(FIX / FIXTURES["yolov7-tiny"]))[0] == "detect"
    assert inspect_source(str(FIX / FIXTURES["yolov5n"]))[0] == "detect"
    copy_of_seg_yaml = tmp_path / "my-model.yaml"  # no '-seg' in the name: the head decides
    copy_of_seg_yaml.write_text(Path(resolve_model_cfg("yolov5n-seg")).read_text())
    assert inspect_source(str(copy_of_seg_yaml))[0] == "segment"
    assert inspect_source(resolve_model_cfg("yolov7-tiny"))[0] == "detect"


# ---------------------------------------------------------------------------------------------- trainers

def trainer(cls, data, tmp_path, **overrides):
    ov = {"data": str(data), "imgsz": 64, "batch": 4, "workers": 0, "device": "cpu", "plots": False,
          "project": str(tmp_path), "name": "t", "exist_ok": True, **overrides}
    return cls(overrides=ov)


def test_trainer_defaults_are_yolov5s_hyperparameters(data, tmp_path):
    t = trainer(OriginalDetectionTrainer, data, tmp_path, model="yolov5n")
    assert t.args.optimizer == "SGD" and t.args.close_mosaic == 0
    yolov5_scratch_low = {"lr0": 0.01, "lrf": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "warmup_epochs": 3.0,
                          "warmup_momentum": 0.8, "warmup_bias_lr": 0.1, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4,
                          "translate": 0.1, "scale": 0.5, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0}
    for k, v in yolov5_scratch_low.items():
        assert getattr(t.args, k) == v, k
    assert set(TRAIN_DEFAULTS) >= set(yolov5_scratch_low)
    assert t.loss_names == ("box_loss", "obj_loss", "cls_loss")
    # what the user sets wins, on the command line or in a cfg file
    t = trainer(OriginalSegmentationTrainer, data, tmp_path, model="yolov5n-seg", optimizer="AdamW", lr0=0.004)
    assert (t.args.optimizer, t.args.lr0, t.args.momentum) == ("AdamW", 0.004, 0.937)
    assert t.loss_names == ("box_loss", "seg_loss", "obj_loss", "cls_loss")
    cfg = tmp_path / "cfg.yaml"  # a full cfg file, as `yolo copy-cfg` writes it, with two values changed
    YAML.save(cfg, {**DEFAULT_CFG_DICT, "close_mosaic": 3, "mosaic": 0.5})
    t = OriginalDetectionTrainer(cfg=str(cfg), overrides={"model": "yolov5n", "data": str(data), "device": "cpu",
                                                          "project": str(tmp_path), "name": "c", "exist_ok": True})
    assert (t.args.close_mosaic, t.args.mosaic, t.args.optimizer) == (3, 0.5, "SGD")


@needs_fixtures
def test_get_model_transfers_fixture_weights_with_nc_from_the_data(data, tmp_path):
    from yolo_qat.models.checkpoint import load_checkpoint

    fixture, _ = load_checkpoint(FIX / FIXTURES["yolov7-tiny"])
    t = trainer(OriginalDetectionTrainer, data, tmp_path, model=str(FIX / FIXTURES["yolov7-tiny"]))
    model = t.get_model(cfg=fixture.yaml, weights=copy.deepcopy(fixture), verbose=False)
    assert is_original(model) and model.model[-1].nc == 4 and t.anchors_trained
    src, dst = fixture.state_dict(), model.state_dict()
    same = [k for k in dst if k in src and src[k].shape == dst[k].shape]
    assert all(torch.equal(dst[k].float(), src[k].float()) for k in same)
    assert "model.77.anchors" in same and "model.77.anchor_grid" in same
    # all but what has nc=4 rows: the 3 prediction convs (weight, bias) and their ImplicitM
    assert sorted(set(dst) - set(same)) == sorted(f"model.77.{p}.{i}.{w}" for i in range(3)
                                                  for p, w in (("m", "weight"), ("m", "bias"), ("im", "implicit")))
    with pytest.raises(ValueError, match="segment trainer"):
        t.get_model(cfg="yolov5n-seg", verbose=False)
    with pytest.raises(ValueError, match="not an original-format"):
        t.get_model(cfg="yolov5nu.yaml", verbose=False)


@pytest.mark.parametrize("name", ["yolov5n", "yolov5n-seg", "yolov7-tiny"])
def test_loss_falls_on_the_embedded_data(name, data):
    """model.loss (the criterion the trainer calls) on one batch of the embedded set, from Ultralytics' own
    dataset and collate, falls under a few optimizer steps. The objectness term is left out of the per-term
    check: its target is each positive's IoU, which grows as the boxes improve, so it first rises (measured:
    0.005 -> 0.009 over these steps, from the 8-objects-per-640px prior of its bias)."""
    from yolo_qat.engine.calib import calibration_loader, ensure_loss_args, preprocess

    torch.manual_seed(0)
    task = "segment" if name.endswith("-seg") else "detect"
    loader, _ = calibration_loader(str(data), task, imgsz=64, batch=4, n_images=4, shuffle=False,
                                   save_dir=data.parent / f"calib-{name}")
    batch = preprocess(next(iter(loader)))
    torch.manual_seed(0)
    model = (SegmentationModel if task == "segment" else DetectionModel)(name, nc=4, verbose=False).train()
    ensure_loss_args(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(25):
        loss, items = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in items.items()})
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.7 * sum(first.values()), (first, last)
    for k in set(first) - {"obj_loss"}:
        assert last[k] < 0.8 * first[k], (k, first, last)


# ---------------------------------------------------------------------------------------------- the CLI pipeline

def raw_detections(model, image_path, nc, pad=16):
    """Every anchor of ``model`` on one 64 x 64 image as Ultralytics' rect validation feeds it at imgsz 64
    (half a stride of gray, 114, on every side: 96 x 96): COCO boxes [x1, y1, w, h] in the image, clipped to it
    (N, 4), objectness x class probability (N, nc), objectness (N,)."""
    import cv2

    img = cv2.imread(str(image_path))[:, :, ::-1].copy()
    h, w = img.shape[:2]
    x = torch.full((1, 3, h + 2 * pad, w + 2 * pad), 114.0)
    x[0, :, pad:pad + h, pad:pad + w] = torch.from_numpy(img).permute(2, 0, 1).float()
    with torch.no_grad():
        pred = model.eval()(x / 255)[0][0]
    xy, wh = pred[:, :2] - pad, pred[:, 2:4]
    x1y1 = (xy - wh / 2).clamp(min=0)
    x2y2 = torch.minimum(xy + wh / 2, torch.tensor([w, h], dtype=pred.dtype))
    return torch.cat((x1y1, x2y2 - x1y1), 1), pred[:, 5:5 + nc] * pred[:, 4:5], pred[:, 4]


@needs_fixtures
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_cli_pipeline_from_the_original_checkpoint(name, data, tmp_path, capfd, caplog):
    """train_qat.py --weights FIXTURE -> correct_qc.py -> val.py (fixture, QAT and QC in one table, pycocotools
    beside Ultralytics) -> export.py --format onnx / packed, on the checkpoints as yolov5 / yolov7 left them."""
    import correct_qc
    import export
    import onnx
    import val
    from yolo_qat.engine.cli import main as train_qat
    from yolo_qat.models.checkpoint import load_checkpoint
    from yolo_qat.models.common import Conv
    from yolo_qat.models.original import load_original
    from yolo_qat.quant import is_quantized, layer_bits
    from yolo_qat.quant.qc import qc_modules

    fixture, seg = FIX / FIXTURES[name], name.endswith("-seg")
    tiny = ["--data", str(data), "--imgsz", "64", "--batch", "4", "--device", "cpu"]
    assert train_qat(["--weights", str(fixture), "--epochs", "1", "--workers", "0", "--calib-batches", "1",
                      "--warmup-epochs", "0", "--project", str(tmp_path / "qat"), "--name", name, "--exist-ok",
                      "--loss-hyp", "{obj: 2.0}", *tiny]) == 0
    out = capfd.readouterr().out
    assert "FP (--weights)" in out and "QAT W4A4 lsq+EMA" in out and ("mask mAP50-95" in out) == seg
    assert "AutoAnchor:" in caplog.text  # checked on the training labels (the weights keep their anchors)
    run = tmp_path / "qat" / name
    header = (run / "results.csv").read_text().splitlines()[0]
    names = ("box_loss", "seg_loss", "obj_loss", "cls_loss") if seg else ("box_loss", "obj_loss", "cls_loss")
    assert all(f"train/{k}" in header and f"val/{k}" in header for k in names) and "dfl_loss" not in header
    qat, _ = load_checkpoint(run / "weights/best.pt")
    head = len(qat.model) - 1
    bits = layer_bits(qat)
    assert is_original(qat) and is_quantized(qat) and qat.model[-1].nc == 4
    assert qat.loss_hyp == {"obj": 2.0}  # --loss-hyp travels with the model (QC's loss reads it from there)
    assert bits["model.0.conv"] == (8, 8) and all(bits[f"model.{head}.m.{i}"] == (8, 8) for i in range(3))
    assert sum(b == (4, 4) for b in bits.values()) > len(bits) // 2

    assert correct_qc.main(["--weights", str(run / "weights/best.pt"), "--steps", "1", "--calib-images", "4",
                            "--no-val", "--project", str(tmp_path / "qc"), "--name", name, *tiny]) == 0
    qc_path = tmp_path / "qc" / name / "weights/qc.pt"
    qc, _ = load_checkpoint(qc_path)
    assert is_original(qc) and is_quantized(qc) and not qc_modules(qc)  # corrections folded away
    assert qc.loss_hyp == {"obj": 2.0}
    report = json.loads((tmp_path / "qc" / name / "qc_report.json").read_text())
    # model.loss ran (the YOLOv5 loss) and every correction found its place: the BN of each Conv block, the
    # output scale of the 3 prediction convs, which have no BN
    assert report["loss_before"] > 0 and report["fold"]["passed"]
    blocks = sum(isinstance(m, Conv) and isinstance(getattr(m, "bn", None), torch.nn.BatchNorm2d) for m in qat.modules())
    assert (report["fold"]["into_bn"], report["fold"]["into_conv"]) == (blocks, 3) == (len(bits) - 3, 3)

    weights = [str(fixture), str(run / "weights/best.pt"), str(qc_path)]
    capfd.readouterr()
    assert val.main(["--weights", *weights, "--json", str(tmp_path / "val.json"), "--project", str(tmp_path / "val"),
                     "--name", name, *tiny]) == 0
    out = capfd.readouterr().out
    table = out[out.rindex("model (mAP %)"):].strip().splitlines()
    assert len(table) == 1 + 3 + 1 and table[-1].startswith("wrote")  # header, the 3 checkpoints, the json
    assert "box.map ultra" in table[0] and "box.map coco" in table[0]
    assert ("mask.map coco" in table[0]) == seg
    results = json.loads((tmp_path / "val.json").read_text())
    assert list(results) == weights
    keys = ("box.map", "box.map50", "mask.map", "mask.map50") if seg else ("box.map", "box.map50")
    for r in results.values():
        for k in keys:
            assert 0.0 <= r[k] <= 1.0 and 0.0 <= r["ultralytics"][k] <= 1.0
    # what was scored is what the fixture outputs: the top detection is the largest objectness x class
    # probability of the raw model, with its decoded box (predictions.json: Ultralytics' own file)
    model, _ = load_original(fixture)
    preds = json.loads((tmp_path / "val" / name / f"0_{fixture.stem}" / "predictions.json").read_text())
    for image in sorted((data.parent / "images" / "val").iterdir())[:2]:
        boxes, scores, obj = raw_detections(model, image, model.model[-1].nc)
        mine = sorted((p for p in preds if p["image_id"] == image.stem), key=lambda p: -p["score"])
        assert mine[0]["score"] == pytest.approx(float(scores.max()), rel=1e-3, abs=2e-5)
        assert abs(float(obj.max()) - float(scores.max())) > 1e-3  # objectness alone would not pass
        for p in mine[:3]:  # each scored box is one anchor's decoded box, scored obj x p(its class)
            rows = ((boxes - torch.tensor(p["bbox"])).abs() < 2e-2).all(1)
            assert ((scores[rows, p["category_id"] - 1] - p["score"]).abs() < 2e-5).any(), p

    for fmt, suffix in (("onnx", ".onnx"), ("packed", ".qpk")):
        assert export.main(["--weights", str(qc_path), "--format", fmt, "--imgsz", "64"]) == 0
        assert qc_path.with_suffix(suffix).is_file()
    graph = onnx.load(str(qc_path.with_suffix(".onnx"))).graph
    shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output]
    n = 3 * (8 * 8 + 4 * 4 + 2 * 2)  # anchors x cells of the three levels at 64 px
    assert shapes[0] == [1, n, 5 + 4 + (32 if seg else 0)]  # the original layout, for yolov5/yolov7 NMS code
    assert len(shapes) == (2 if seg else 1)


def test_trainer_refits_anchors_only_for_a_model_built_from_its_yaml(data, tmp_path):
    """The trainer's AutoAnchor step (run once the training labels are loaded): k-means for a yaml-built model,
    a logged check for transferred weights."""
    from types import SimpleNamespace

    t = trainer(OriginalDetectionTrainer, data, tmp_path, model="yolov5n")
    t.args.imgsz = 640
    thin = labels_of([[100.0 + i, 3.0] for i in range(40)] + [[3.0, 100.0 + i] for i in range(40)], 640, (640, 640))
    t.train_loader = SimpleNamespace(dataset=SimpleNamespace(labels=thin))
    t.model = t.get_model(cfg="yolov5n", verbose=False)
    report = t.check_anchors()
    assert not t.anchors_trained and report["replaced"] and report["new_bpr"] == 1.0
    trained = t.model
    t.model = t.get_model(cfg=trained.yaml, weights=trained, verbose=False)
    assert torch.equal(t.model.model[-1].anchors, trained.model[-1].anchors)  # the buffer travels with the weights
    fresh = build("yolov5n")
    fresh.model[-1].anchors.mul_(0.1)  # trained anchors that miss these labels
    t.model = t.get_model(cfg=fresh.yaml, weights=fresh, verbose=False)
    with captured_log() as log:
        report = t.check_anchors()
    assert t.anchors_trained and not report["replaced"] and report["bpr"] < 0.98
    assert torch.equal(t.model.model[-1].anchors, fresh.model[-1].anchors)
    assert "the weights were trained with these anchors" in log.getvalue()


def test_yolov7_implicit_layers_train_without_weight_decay(data, tmp_path):
    from yolo_qat.models.common import ImplicitA, ImplicitM

    t = trainer(OriginalDetectionTrainer, data, tmp_path, model="yolov7-tiny")
    model = build("yolov7-tiny")
    opt = t.build_optimizer(model, "auto", lr=0.01, momentum=0.937, decay=5e-4)
    assert isinstance(opt, torch.optim.SGD) and t.args.optimizer == "SGD"  # auto -> the YOLOv5/YOLOv7 recipe
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    implicit = [p for m in model.modules() if isinstance(m, (ImplicitA, ImplicitM)) for p in m.parameters()]
    assert len(implicit) == 6 and all(decay[id(p)] == 0.0 for p in implicit)
    assert decay[id(model.model[0].conv.weight)] == 5e-4 and len(decay) == len(list(model.parameters()))


def test_channels_last_move_after_a_forward():
    """Ultralytics' AutoBackend moves a loaded model to channels_last on x86 CPUs, after fuse() ran a forward that
    filled the head's 5-D grid caches: the caches must not stop the move, and outputs stay the same."""
    model = build("yolov5n").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)[0]
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


def test_yolov5_loss_settings_reach_the_criterion_and_args(data, tmp_path):
    """`loss_hyp` (the unscaled YOLOv5 gains; Ultralytics' own box / cls keys mean other losses) passes Ultralytics'
    cfg check, lands on the model (so QAT, QC and checkpoints keep it), on args.yaml, and not on the validator."""
    from yolo_qat.models.loss import YOLOv5DetLoss

    t = trainer(OriginalDetectionTrainer, data, tmp_path, model="yolov5n", loss_hyp={"obj": 25.0, "cls": 1})
    assert t.args.loss_hyp == {"obj": 25.0, "cls": 1.0}
    assert YAML.load(t.save_dir / "args.yaml")["loss_hyp"] == {"obj": 25.0, "cls": 1.0}
    t.model = t.get_model(cfg="yolov5n", verbose=False)
    t.model.criterion = YOLOv5DetLoss(t.model)  # built before the settings: must be rebuilt with them
    t.data["names"] = {i: str(i) for i in range(t.data["nc"])}
    t.set_model_attributes()
    assert t.model.loss_hyp == {"obj": 25.0, "cls": 1.0} and t.model.criterion is None
    box, obj, cls = YOLOv5DetLoss(t.model).gains(320)
    assert (box, obj, cls) == pytest.approx((0.05, 25.0 * 0.25, 1.0 * t.data["nc"] / 80))
    t.test_loader = None
    assert not hasattr(t.get_validator().args, "loss_hyp") and t.args.loss_hyp == {"obj": 25.0, "cls": 1.0}
    with pytest.raises(ValueError, match="unknown YOLOv5 loss setting.*'dfl'"):
        trainer(OriginalDetectionTrainer, data, tmp_path, model="yolov5n", loss_hyp={"dfl": 1.0})
    with pytest.raises(ValueError, match="obj=-1.*>= 0"):
        trainer(OriginalDetectionTrainer, data, tmp_path, model="yolov5n", loss_hyp={"obj": -1})
    plain = trainer(OriginalDetectionTrainer, data, tmp_path, model="yolov5n")
    assert not hasattr(plain.args, "loss_hyp")  # nothing set: the args stay Ultralytics' own
