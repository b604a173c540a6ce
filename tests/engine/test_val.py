"""COCO ground truth from YOLO labels, pycocotools scoring, validate() and val.py."""
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from ultralytics.cfg import get_cfg
from ultralytics.data import build_yolo_dataset
from ultralytics.data.utils import check_det_dataset

from yolo_qat import models  # noqa: F401
from yolo_qat.engine.coco_eval import coco_map, image_ids, remap_predictions, yolo_labels_to_coco
from yolo_qat.models.checkpoint import save_checkpoint
from builders import qat_like_model


def val_labels(data_yaml, rect=True):
    d = check_det_dataset(str(data_yaml))
    cfg = get_cfg(overrides={"task": "segment", "imgsz": 64, "rect": rect})
    return build_yolo_dataset(cfg, d["val"], 4, d, mode="val", rect=rect).labels


def gt_as_predictions(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
             "segmentation": a["segmentation"]} for a in gt["annotations"]]


def test_ground_truth_scores_one(data):
    gt = yolo_labels_to_coco(val_labels(data), [1, 2, 3, 4])
    assert len(gt["images"]) == 4 and len(gt["annotations"]) > 4
    res = coco_map(gt, gt_as_predictions(gt), ("bbox", "segm"), verbose=False)
    assert res["bbox"]["map"] == pytest.approx(1.0) and res["segm"]["map"] == pytest.approx(1.0)


def test_scoring_can_fail(data):
    gt = yolo_labels_to_coco(val_labels(data), [1, 2, 3, 4])
    preds = gt_as_predictions(gt)
    wrong_class = [{**p, "category_id": p["category_id"] % 4 + 1} for p in preds]
    assert coco_map(gt, wrong_class, ("bbox", "segm"), verbose=False)["bbox"]["map"] == 0.0
    half = preds[: len(preds) // 2]
    r = coco_map(gt, half, ("bbox", "segm"), verbose=False)
    assert 0.1 < r["bbox"]["map"] < 0.9 and 0.1 < r["segm"]["map"] < 0.9


def test_ground_truth_geometry(data):
    """Boxes (from labels) and masks (rasterised polygons) describe the same objects, in pixels of
    the original image, with COCO fields set."""
    labels = val_labels(data, rect=False)
    gt = yolo_labels_to_coco(labels, [1, 2, 3, 4])
    n_labels = sum(len(lb["cls"]) for lb in labels)
    assert len(gt["annotations"]) == n_labels
    for a in gt["annotations"]:
        img = next(i for i in gt["images"] if i["id"] == a["image_id"])
        assert (img["height"], img["width"]) == (64, 64) and a["iscrowd"] == 0
        assert a["segmentation"]["size"] == [64, 64]
        mb = mask_utils.toBbox(a["segmentation"])
        corners = lambda b: np.array([b[0], b[1], b[0] + b[2], b[1] + b[3]])  # noqa: E731
        # rasterisation moves each edge by at most about a pixel
        assert np.abs(corners(a["bbox"]) - corners(mb)).max() <= 1.5, (a["bbox"], mb)
        assert 0 < a["area"] <= a["bbox"][2] * a["bbox"][3] + 2 * (a["bbox"][2] + a["bbox"][3])


def test_image_ids_follow_ultralytics_names():
    assert image_ids(["/a/000000000139.jpg", "/a/285.jpg"]) == {"000000000139.jpg": 139, "285.jpg": 285}
    ids = image_ids(["/v/val_000001.jpg", "/v/val_000000.jpg"])
    assert ids == {"val_000000.jpg": 1, "val_000001.jpg": 2}
    preds = [{"image_id": "val_000001", "file_name": "val_000001.jpg", "bbox": [0, 0, 1, 1]}]
    assert remap_predictions(preds, ids)[0]["image_id"] == 2
    with pytest.raises(ValueError, match="unique"):
        image_ids(["/a/x.jpg", "/b/x.jpg"])


def test_validate_quantized_model(data, tmp_path):
    from yolo_qat.engine.validate import validate

    m = qat_like_model(data)
    r = validate(m, data, imgsz=64, batch=4, save_dir=tmp_path / "v", verbose=False)
    assert r["task"] == "segment"
    for src in ("ultralytics", "pycocotools"):
        assert set(r[src]) == {"box.map", "box.map50", "mask.map", "mask.map50"}
        assert all(0.0 <= v <= 1.0 for v in r[src].values())
    preds = json.loads(open(r["predictions"]).read())
    gt = json.loads(open(r["ground_truth"]).read())
    gt_ids = {i["id"] for i in gt["images"]}
    assert preds and all(p["image_id"] in gt_ids for p in preds)
    for p in preds[:50]:  # Ultralytics' own RLE encoder must decode to an image-sized mask
        assert mask_utils.decode(p["segmentation"]).shape == (64, 64)
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # validate() fused a copy, not m


def test_missing_coco_annotations_says_where(tmp_path, data):
    from yolo_qat.engine.validate import validate

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    src = data.parent / "images" / "val"
    for f in src.iterdir():
        (root / "images" / f.name).symlink_to(f)
    (root / "val2017.txt").write_text("\n".join(f"./images/{f.name}" for f in src.iterdir()))
    yaml = tmp_path / "coco.yaml"
    yaml.write_text(f"path: {root}\ntrain: val2017.txt\nval: val2017.txt\nnames:\n  0: a\n  1: b\n  2: c\n  3: d\n")
    with pytest.raises(FileNotFoundError, match="annotations/instances_val2017.json"):
        validate(qat_like_model(data), yaml, imgsz=64, batch=4, save_dir=tmp_path / "v")


def test_val_cli_table_and_json(data, tmp_path, monkeypatch, capsys):
    import val
    from ultralytics.nn.tasks import SegmentationModel

    torch.manual_seed(0)
    fp = save_checkpoint(tmp_path / "fp.pt", SegmentationModel("yolov8n-seg.yaml", nc=4, verbose=False))
    q = save_checkpoint(tmp_path / "qat.pt", qat_like_model(data))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "res.json"
    assert val.main(["--weights", str(fp), str(q), "--data", str(data), "--imgsz", "64", "--batch", "4",
                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res) == [str(fp), str(q)]
    for r in res.values():
        for k in ("box.map", "box.map50", "mask.map", "mask.map50"):
            assert 0.0 <= r[k] <= 1.0
        assert open(r["predictions"])
    table = capsys.readouterr().out
    assert "box.map coco" in table and "mask.map50 ultra" in table
    assert val.main(["--weights", str(tmp_path / "missing.pt")]) != 0


L_SHAPE = np.array([[0.05, 0.1], [0.95, 0.1], [0.95, 0.3], [0.3, 0.3], [0.3, 0.55], [0.05, 0.55]])  # wide, asymmetric


@pytest.mark.parametrize("ori_hw, batch_hw, pad_wh", [
    ((160, 160), (160, 160), (16, 16)),  # letterboxed batch as big as the image: masks were left letterboxed
    ((100, 160), (96, 160), (16, 8)),  # non-square image, non-square rect batch
])
def test_predicted_masks_map_to_original_image(ori_hw, batch_hw, pad_wh):
    """A perfect prediction made on the letterboxed image (imgsz 128, rect batch) and written through
    the validator's own scale_preds + pred_to_json lands on the ground-truth mask; its transpose does not."""
    from yolo_qat.engine.validate import PredictionsOnlySegmentationValidator

    h, w = ori_hw
    gain = 128 / max(h, w)
    xs, ys = L_SHAPE[:, 0], L_SHAPE[:, 1]
    label = {"im_file": "/d/images/val/img_a.jpg", "shape": ori_hw, "cls": np.array([[2.0]]), "normalized": True,
             "bboxes": np.array([[(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, np.ptp(xs), np.ptp(ys)]]),
             "segments": [L_SHAPE.copy()]}
    gt = yolo_labels_to_coco([label], [1, 2, 3, 4])
    gt_mask = mask_utils.decode(gt["annotations"][0]["segmentation"])
    assert gt_mask.shape == ori_hw

    # the model's view: polygon and box in letterboxed pixels
    poly_lb = L_SHAPE * (w, h) * gain + pad_wh
    box_lb = torch.tensor([[*poly_lb.min(0), *poly_lb.max(0)]], dtype=torch.float32)
    from yolo_qat.engine.coco_eval import polygon_mask
    mask_lb = torch.from_numpy(polygon_mask(poly_lb, *batch_hw)).float()[None]
    predn = {"bboxes": box_lb, "conf": torch.tensor([0.9]), "cls": torch.tensor([2.0]), "masks": mask_lb}
    pbatch = {"imgsz": torch.Size(batch_hw), "ori_shape": ori_hw, "ratio_pad": ((gain, gain), pad_wh),
              "im_file": label["im_file"]}
    v = PredictionsOnlySegmentationValidator(args={"task": "segment", "save_json": True, "plots": False})
    v.class_map, v.jdict = [1, 2, 3, 4], []
    v.pred_to_json(v.scale_preds(predn, pbatch), pbatch)
    preds = remap_predictions(v.jdict, image_ids([label["im_file"]]))
    assert len(preds) == 1 and preds[0]["segmentation"]["size"] == list(ori_hw)
    pm = mask_utils.decode(preds[0]["segmentation"])

    def iou(a, b):
        return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()

    assert iou(pm, gt_mask) > 0.85, iou(pm, gt_mask)
    if h == w:
        assert iou(pm.T, gt_mask) < 0.5  # orientation matters: the L is not symmetric
    res = coco_map(gt, preds, ("bbox", "segm"), verbose=False)
    assert res["bbox"]["map"] > 0.9 and res["segm"]["map50"] == pytest.approx(1.0)
    # a transposed mask (row-major encoding) would score nothing at IoU 0.5
    flipped = [{**preds[0], "segmentation": _rle_of(pm.T.copy())}] if h == w else []
    if flipped:
        assert coco_map(gt, flipped, ("segm",), verbose=False)["segm"]["map50"] == 0.0


def _rle_of(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_masks_to_original_identity_and_empty():
    from yolo_qat.engine.validate import masks_to_original

    m = (torch.rand(3, 40, 60) > 0.5).float()
    assert torch.equal(masks_to_original(m, (40, 60), ((1.0, 1.0), (0, 0))), m.byte())
    assert masks_to_original(m[:0], (80, 120), ((0.5, 0.5), (0, 0))).shape == (0, 80, 120)
