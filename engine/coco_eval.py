"""COCO-style scoring with pycocotools: ground truth built from YOLO labels, image ids shared
with Ultralytics' ``predictions.json``, and COCOeval for ``bbox`` and ``segm``.

Ultralytics 8.4 writes ``image_id = int(stem)`` for numeric file stems and the stem *string*
otherwise, and puts ``file_name`` in every prediction. For non-COCO data we number images
ourselves (numeric stems keep their number, so COCO-named files stay compatible) and map
predictions through ``file_name``, which is unambiguous whatever the stems look like.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from ultralytics.data.utils import exif_size


def coco_annotations_path(data: dict) -> Path:
    """Where Ultralytics (and the COCO tools) expect the official val2017 annotations."""
    return Path(data["path"]) / "annotations" / "instances_val2017.json"


def image_ids(files: list[str]) -> dict[str, int]:
    """{file name: image id}: the numeric stem when every stem is numeric (COCO), else 1..N in
    sorted name order."""
    names = [Path(f).name for f in files]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ValueError(f"image file names must be unique to match predictions to images (duplicates: {dup})")
    stems = [Path(n).stem for n in names]
    if all(s.isnumeric() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return {n: int(s) for n, s in zip(names, stems)}
    return {n: i + 1 for i, n in enumerate(sorted(names))}


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # json-serialisable, as pycocotools' loadRes accepts
    return rle


def polygon_mask(polygon_xy: np.ndarray, h: int, w: int) -> np.ndarray:
    """Rasterise one polygon (pixel coordinates, (K, 2)) at the image size, the COCO way."""
    rle = mask_utils.frPyObjects([polygon_xy.reshape(-1).astype(np.float64).tolist()], h, w)
    return mask_utils.decode(mask_utils.merge(rle))


def yolo_labels_to_coco(labels: list[dict], class_ids: list[int], names: dict | None = None,
                        with_masks: bool = True) -> dict:
    """COCO ground truth from Ultralytics dataset labels (``dataset.labels``: im_file, shape (h, w),
    cls, normalised xywh bboxes, normalised polygon segments).

    Boxes are the labels' boxes (for polygon labels Ultralytics derives them from the polygon
    extent); masks are the polygons rasterised at the original image size, stored as RLE; area is
    the mask area (COCO's convention) or the box area without masks; iscrowd is 0.
    """
    ids = image_ids([lb["im_file"] for lb in labels])
    images, anns = [], []
    for lb in labels:
        name = Path(lb["im_file"]).name
        h, w = _image_hw(lb)
        images.append({"id": ids[name], "file_name": name, "height": h, "width": w})
        boxes = np.asarray(lb["bboxes"], dtype=np.float64).reshape(-1, 4)
        if not lb.get("normalized", True):
            raise ValueError("yolo_labels_to_coco expects normalised labels, as Ultralytics' datasets store them")
        segments = lb.get("segments") or []
        for j, (c, (cx, cy, bw, bh)) in enumerate(zip(np.asarray(lb["cls"]).reshape(-1), boxes)):
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            ann = {"id": len(anns) + 1, "image_id": ids[name], "category_id": class_ids[int(c)],
                   "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0}
            if with_masks and segments:
                poly = np.asarray(segments[j], dtype=np.float64) * (w, h)
                mask = polygon_mask(poly, h, w)
                ann["segmentation"] = _rle(mask)
                ann["area"] = float(mask.sum())
            anns.append(ann)
    names = names or {}
    cats = [{"id": cid, "name": str(names.get(i, cid))} for i, cid in enumerate(class_ids)]
    return {"images": images, "annotations": anns, "categories": cats}


def _image_hw(label: dict) -> tuple[int, int]:
    # Rectangular val batches pop "shape" from the labels; read it the way Ultralytics' label
    # check does (EXIF-rotated size) so boxes scale to the same original image.
    if "shape" in label:
        return tuple(int(v) for v in label["shape"])
    with Image.open(label["im_file"]) as im:
        w, h = exif_size(im)
    return h, w


def remap_predictions(preds: list[dict], name_to_id: dict[str, int]) -> list[dict]:
    """Ultralytics predictions with the ground truth's image ids (looked up by ``file_name``)."""
    missing = {p["file_name"] for p in preds if p["file_name"] not in name_to_id}
    if missing:
        raise ValueError(f"predictions for images absent from the ground truth: {sorted(missing)[:3]}")
    return [{**p, "image_id": name_to_id[p["file_name"]]} for p in preds]


def _load_gt(gt: dict | str | Path) -> COCO:
    coco = COCO() if isinstance(gt, dict) else None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        if coco is None:
            return COCO(str(gt))
        coco.dataset = gt
        coco.createIndex()
    return coco


def coco_map(gt: dict | str | Path, preds: list[dict] | str | Path, iou_types=("bbox",),
             img_ids: list[int] | None = None, verbose: bool = True) -> dict[str, dict]:
    """pycocotools COCOeval. Returns ``{iou_type: {"map": AP@[.5:.95], "map50": AP@.5, "stats": [12]}}``
    (COCO's -1 for "no ground truth" reported as 0)."""
    coco_gt = gt if isinstance(gt, COCO) else _load_gt(gt)
    if isinstance(preds, (str, Path)):
        preds = json.loads(Path(preds).read_text())
    out = {}
    for iou_type in iou_types:
        if not preds:  # loadRes cannot take an empty list; no detection scores 0
            out[iou_type] = {"map": 0.0, "map50": 0.0, "stats": [0.0] * 12}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(_results_for(preds, iou_type))
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if verbose:
            print(f"pycocotools COCOeval ({iou_type}):\n{buf.getvalue().rstrip()}")
        stats = [max(float(s), 0.0) for s in ev.stats]
        out[iou_type] = {"map": stats[0], "map50": stats[1], "stats": stats}
    return out


def _results_for(preds: list[dict], iou_type: str) -> list[dict]:
    # Copies: loadRes writes ids and areas into the dicts it is given. For "segm" only results
    # with a mask count; for "bbox" the masks are dropped so loadRes takes its box branch.
    if iou_type == "bbox":
        return [{k: v for k, v in p.items() if k != "segmentation"} for p in preds]
    return [dict(p) for p in preds if "segmentation" in p]
