"""Validation of FP / QAT / QC checkpoints: Ultralytics' validator for its own mAP and for the
COCO-format predictions file, then pycocotools COCOeval on that file (boxes and masks).

Ultralytics 8.4 scores its predictions.json with faster-coco-eval (not installed here, and not the
reference implementation), so the validators below write the file and stop there; scoring is
``engine.coco_eval``. Quantized checkpoints load as pickled models whose ``fuse()`` keeps the
integer weights (models/policy.py), so AutoBackend's fusing is safe. The original anchor-based YOLOv5 / YOLOv7
models validate with the same classes behind ``OriginalValidatorMixin``, whose ``postprocess`` first turns their
output into Ultralytics' layout, so its NMS, metrics and predictions.json (and pycocotools after it) run unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.models.yolo.segment import SegmentationValidator
from ultralytics.utils import LOGGER, ops

from yolo_qat.models.checkpoint import load_checkpoint
from yolo_qat.models.facts import is_original, model_task, trained_imgsz

from .calib import resolve_data
from .coco_eval import coco_annotations_path, coco_map, image_ids, remap_predictions, yolo_labels_to_coco
from .data_download import check_dataset
from .onnx_val import is_onnx, onnx_info, project_ort_backend


class PredictionsOnlyDetectionValidator(DetectionValidator):
    """Writes predictions.json; COCO scoring is left to pycocotools."""

    def eval_json(self, stats):
        return stats


class PredictionsOnlySegmentationValidator(SegmentationValidator):
    def init_metrics(self, model):
        # SegmentationValidator.init_metrics would pip-check faster-coco-eval when save_json is on;
        # everything else it does is these two calls.
        DetectionValidator.init_metrics(self, model)
        self.process = ops.process_mask_native if self.args.save_json or self.args.save_txt else ops.process_mask

    def scale_preds(self, predn, pbatch):
        # Ultralytics' scale_preds maps masks with ops.scale_masks, which returns them untouched when
        # the letterboxed batch happens to have the original image's size (e.g. 160x160 images at
        # imgsz 128 in rect mode: resized to 128, padded to 160), so the masks in predictions.json
        # stayed letterboxed while the boxes were mapped back. Map masks with the letterbox always.
        return {**DetectionValidator.scale_preds(self, predn, pbatch),
                "masks": masks_to_original(predn["masks"], pbatch["ori_shape"], pbatch["ratio_pad"])}

    def eval_json(self, stats):
        return stats


def masks_to_original(masks: torch.Tensor, ori_shape, ratio_pad=None) -> torch.Tensor:
    """(N, h, w) binary masks on the letterboxed image -> (N, H, W) uint8 masks on the original image.

    ``ratio_pad`` is Ultralytics' ``((gain_h, gain_w), (pad_w, pad_h))`` (None: a centred letterbox
    computed from the shapes). Same crop, bilinear resize and ``.byte()`` (a pixel is kept where the
    resized mask is 1, as Ultralytics' own scale_preds keeps it) as ``ops.scale_masks`` with padding,
    but applied even when the letterboxed and original shapes are equal, where ``scale_masks``
    returns the letterboxed masks unchanged.
    """
    h1, w1 = masks.shape[-2:]
    h0, w0 = (int(v) for v in ori_shape[:2])
    if ratio_pad is None:
        gain_h = gain_w = min(h1 / h0, w1 / w0)
        pad_w, pad_h = (w1 - max(round(w0 * gain_w), 1)) / 2, (h1 - max(round(h0 * gain_h), 1)) / 2
    else:
        (gain_h, gain_w), (pad_w, pad_h) = ratio_pad
    if len(masks) == 0:
        return masks.new_zeros((0, h0, w0), dtype=torch.uint8)
    top, left = round(pad_h - 0.1), round(pad_w - 0.1)  # as ops.scale_boxes / scale_masks round the padding
    bottom, right = top + max(round(h0 * gain_h), 1), left + max(round(w0 * gain_w), 1)
    content = masks[:, top:bottom, left:right].float()
    if content.shape[-2:] != (h0, w0):
        content = F.interpolate(content[None], (h0, w0), mode="bilinear", align_corners=False)[0]
    return content.byte()


# ---------------------------------------------------------------------------------------------- original models

def to_ultralytics_preds(preds):
    """The original eval output -> the input of Ultralytics' postprocess.

    (pred, maps) / (pred,) / pred, with pred (B, N, 5 + nc) = decoded xywh pixels, objectness, class
    probabilities -> (B, 4 + nc, N) with class scores objectness x probability (yolov5's NMS score);
    (pred, proto, maps) / (pred, proto) with nm mask coefficients after the classes -> [(B, 4 + nc + nm, N),
    proto], the coefficients passed through."""
    proto = None
    if isinstance(preds, (list, tuple)):
        if len(preds) > 1 and torch.is_tensor(preds[1]) and preds[1].dim() == 4:
            proto = preds[1]
        pred = preds[0] if preds else None
    else:
        pred = preds
    nm = proto.shape[1] if proto is not None else 0
    if not torch.is_tensor(pred) or pred.dim() != 3 or pred.shape[-1] - 5 - nm < 1:
        shape = tuple(pred.shape) if torch.is_tensor(pred) else type(pred).__name__
        raise TypeError(f"expected the eval output of an anchor-based YOLOv5/YOLOv7 model, (pred, ...) with pred "
                        f"(batch, anchors, 5 + nc{' + nm' if nm else ''}); got {shape}. Anchor-free Ultralytics "
                        f"models validate with Ultralytics' own validators.")
    nc = pred.shape[-1] - 5 - nm
    scores = pred[..., 5:5 + nc] * pred[..., 4:5]
    out = torch.cat((pred[..., :4], scores, pred[..., 5 + nc:]), -1).transpose(1, 2)
    return out if proto is None else [out, proto]


class OriginalValidatorMixin:
    """Put before an Ultralytics detection / segmentation validator class."""

    def postprocess(self, preds):
        return super().postprocess(to_ultralytics_preds(preds))


class OriginalDetectionValidator(OriginalValidatorMixin, DetectionValidator):
    pass


class OriginalSegmentationValidator(OriginalValidatorMixin, SegmentationValidator):
    pass


class OriginalPredictionsOnlyDetectionValidator(OriginalValidatorMixin, PredictionsOnlyDetectionValidator):
    pass


class OriginalPredictionsOnlySegmentationValidator(OriginalValidatorMixin, PredictionsOnlySegmentationValidator):
    pass


def validator_class(task: str, original: bool, predictions_only: bool = False):
    """The validator class for a task, for original or Ultralytics models, Ultralytics' or the predictions-only ones."""
    table = {(False, False): (DetectionValidator, SegmentationValidator),
             (False, True): (PredictionsOnlyDetectionValidator, PredictionsOnlySegmentationValidator),
             (True, False): (OriginalDetectionValidator, OriginalSegmentationValidator),
             (True, True): (OriginalPredictionsOnlyDetectionValidator, OriginalPredictionsOnlySegmentationValidator)}
    det, seg = table[(bool(original), bool(predictions_only))]
    return seg if task == "segment" else det


def is_coco_val(data: dict, split: str = "val") -> bool:
    """Ultralytics' own test (DetectionValidator.init_metrics) for 'this is COCO val2017'."""
    val = data.get(split, "")
    return isinstance(val, str) and "coco" in val and val.endswith((f"{os.sep}val2017.txt", f"{os.sep}test-dev2017.txt"))


def load_model(weights_or_model) -> tuple[nn.Module, str]:
    """(a private copy of the model in fp32 eval mode, a display name)."""
    if isinstance(weights_or_model, nn.Module):
        return copy.deepcopy(weights_or_model).float().eval(), type(weights_or_model).__name__
    model, _ = load_checkpoint(weights_or_model)
    return model, str(weights_or_model)


def ultralytics_metrics(stats: dict, task: str) -> dict:
    """Ultralytics' metric keys ('metrics/mAP50-95(B)', the trainer's and validator's) in this module's
    vocabulary: box.map, box.map50 (and mask.map, mask.map50)."""
    out = {"box.map": stats.get("metrics/mAP50-95(B)", 0.0), "box.map50": stats.get("metrics/mAP50(B)", 0.0)}
    if task == "segment":
        out.update({"mask.map": stats.get("metrics/mAP50-95(M)", 0.0), "mask.map50": stats.get("metrics/mAP50(M)", 0.0)})
    return {k: float(v) for k, v in out.items()}


def validate(weights_or_model, data=None, imgsz: int | None = None, batch: int = 16, device: str = "cpu",
             save_dir: str | Path = "runs/val/exp", conf: float = 0.001, iou: float = 0.7,
             verbose: bool = True, pycocotools: bool = True, workers: int | None = None, rect: bool = True) -> dict:
    """Box (and mask) mAP of one model by Ultralytics and by pycocotools.

    Returns ``{"task", "weights", "ultralytics": {...}, "pycocotools": {...}, "predictions": path,
    "ground_truth": path}`` where each metrics dict has ``box.map``, ``box.map50`` (and
    ``mask.map``, ``mask.map50`` for segmentation), floats in [0, 1]. The model is not modified.
    ``imgsz`` defaults to the size the model was trained at (640 when unknown). Without
    ``pycocotools`` only Ultralytics' numbers (no predictions file; "pycocotools" is empty).

    Batches are rectangular (``rect=True``, each batch padded to its own images' shape plus half a
    stride), as Ultralytics' trainer validates during training, so a model's numbers here and in its
    training run's results.csv are measured alike; ``rect=False``: square letterboxed batches of
    ``imgsz``, the input an exported file of that size sees.

    ``weights_or_model`` may be an exported ``.onnx`` file: onnxruntime (CPU) runs it at its static input
    shape (batch and imgsz from its metadata override ``batch`` / ``imgsz``; square letterboxed batches, which
    equal rect ones on square images), in Ultralytics' or the original anchor-based layout (engine/onnx_val.py).
    """
    onnx_file = is_onnx(weights_or_model)
    if onnx_file:  # run by onnxruntime at the file's static shape (engine/onnx_val.py)
        info = onnx_info(weights_or_model)
        model, name, task, original = str(weights_or_model), str(weights_or_model), info["task"], info["original"]
        imgsz, batch, device = max(info["imgsz"]), info["batch"], "cpu"  # CPUExecutionProvider
    else:
        model, name = load_model(weights_or_model)
        imgsz = imgsz or trained_imgsz(model)
        task = model_task(model)
    data = resolve_data(data)
    data_dict = check_dataset(data)  # a yaml's download: runs only when asked for (engine/data_download.py)
    coco = is_coco_val(data_dict) and pycocotools
    if coco and not coco_annotations_path(data_dict).is_file():
        raise FileNotFoundError(f"COCO validation needs the official annotations: expected "
                                f"{coco_annotations_path(data_dict)} (instances_val2017.json from "
                                f"annotations_trainval2017.zip)")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    args = {"data": data, "imgsz": imgsz, "batch": batch, "device": device, "task": task, "mode": "val",
            "split": "val", "save_json": pycocotools, "plots": False, "conf": conf, "iou": iou, "rect": rect and not onnx_file,
            "verbose": verbose, **({} if workers is None else {"workers": workers})}
    cls = validator_class(task, original=original if onnx_file else is_original(model), predictions_only=True)
    validator = cls(save_dir=save_dir, args=args)
    with project_ort_backend() if onnx_file else contextlib.nullcontext():
        stats = validator(model=model)
    if not pycocotools:
        return {"task": task, "weights": name, "ultralytics": ultralytics_metrics(stats, task), "pycocotools": {},
                "predictions": None, "ground_truth": None}
    labels = validator.dataloader.dataset.labels
    files = [lb["im_file"] for lb in labels]
    pred_path = save_dir / "predictions.json"
    raw = json.loads(pred_path.read_text()) if pred_path.is_file() and validator.jdict else []
    iou_types = ("bbox", "segm") if task == "segment" else ("bbox",)
    if coco:
        gt_path = coco_annotations_path(data_dict)
        scored, img_ids = raw, [int(Path(f).stem) for f in files]
    else:
        gt = yolo_labels_to_coco(labels, validator.class_map, validator.names, with_masks=task == "segment")
        gt_path = save_dir / "ground_truth_coco.json"
        gt_path.write_text(json.dumps(gt))
        ids = image_ids(files)
        scored, img_ids = remap_predictions(raw, ids), list(ids.values())
    scored_path = save_dir / "predictions_coco.json"
    scored_path.write_text(json.dumps(scored))
    res = coco_map(gt_path, scored, iou_types, img_ids, verbose=verbose)
    coco_metrics = {"box.map": res["bbox"]["map"], "box.map50": res["bbox"]["map50"]}
    if task == "segment":
        coco_metrics.update({"mask.map": res["segm"]["map"], "mask.map50": res["segm"]["map50"]})
    out = {"task": task, "weights": name, "ultralytics": ultralytics_metrics(stats, task),
           "pycocotools": coco_metrics, "predictions": str(scored_path.resolve()),
           "ground_truth": str(Path(gt_path).resolve())}
    LOGGER.info(format_table({name: out}))
    return out


METRIC_NAMES = {"box.map": "box mAP50-95", "box.map50": "box mAP50", "mask.map": "mask mAP50-95",
                "mask.map50": "mask mAP50"}
SOURCES = {"ultralytics": ("ultra", "Ultralytics' validator"), "pycocotools": ("coco", "pycocotools COCOeval")}


def format_table(results: dict[str, dict]) -> str:
    """A legend line, then one row per model: mAP in % by each source that scored any of them
    (rows as ``validate`` returns them, or ``{"task", "ultralytics": ultralytics_metrics(...)}``)."""
    keys = ["box.map", "box.map50"]
    if any(r["task"] == "segment" for r in results.values()):
        keys += ["mask.map", "mask.map50"]
    sources = [s for s in SOURCES if any(r.get(s) for r in results.values())]
    legend = (", ".join(f"{k} = {METRIC_NAMES[k]}" for k in keys) + "; "
              + ", ".join(f"{SOURCES[s][0]} = {SOURCES[s][1]}" for s in sources))
    head = f"{'model (mAP %)':<28}" + "".join(f"{k + ' ' + SOURCES[s][0]:>18}" for k in keys for s in sources)
    rows = [legend, head]
    for name, r in results.items():
        cells = ""
        for k in keys:
            for s in sources:
                v = (r.get(s) or {}).get(k)
                cells += f"{'-' if v is None else f'{100 * v:.2f}':>18}"
        label = name if len(name) <= 27 else "..." + name[-24:]
        rows.append(f"{label:<28}{cells}")
    return "\n".join(rows)
