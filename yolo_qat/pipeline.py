"""The pipeline as functions: FP training, QAT, QC, validation and export, each taking its model source once
(a path, a model yaml or registry name, or a ``ModelSource`` already resolved) and returning its results.
Keywords are the command line's flag names with '_' (``yolo-qat <mode> --help`` lists them), so a run reads the
same in Python and in a shell:

    import yolo_qat
    run = yolo_qat.train_qat("fp.pt", data="coco.yaml", recipe="ema_w4a8", epochs=20)
    qc = yolo_qat.correct_qc(run.weights, data="coco.yaml")
    metrics = yolo_qat.validate(qc.weights, data="coco.yaml")
    onnx = yolo_qat.export(qc.weights, target="ort")
"""
from __future__ import annotations

import tempfile

from yolo_qat.configs.presets import recipe_settings
from yolo_qat.engine import trainer as qat_trainers
from yolo_qat.engine.calib import resolve_data
from yolo_qat.engine.cli_common import InputError
from yolo_qat.engine.correction import QCResult, qc_stage
from yolo_qat.engine.data_download import check_dataset
from yolo_qat.engine.exporting import ExportResult, export_stage
from yolo_qat.engine.source import ModelSource, resolve_source
from yolo_qat.engine.train_flags import settings_of
from yolo_qat.engine.training import (TrainResult, check_loss_hyp, check_settings, fp_stage, qat_stage, result_of,
                                     run_trainer)
from yolo_qat.engine.validate import validate as validate_model
from yolo_qat.models.facts import is_original

__all__ = ["ModelSource", "TrainResult", "QCResult", "ExportResult", "resolve_source", "train_fp", "train_qat",
           "resume_qat", "correct_qc", "validate", "export"]


def _inputs(source, data) -> tuple[ModelSource, str]:
    src = resolve_source(source)
    try:
        data = resolve_data(data)
        check_dataset(data)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    return src, data


def train_fp(source, data=None, *, callbacks: dict | None = None, **settings) -> TrainResult:
    """Train the FP model ``source`` (a model yaml or registry name such as ``yolov5nu``, or a .pt to fine-tune)
    for ``fp_epochs`` with the plain Ultralytics trainer. ``settings``: train_qat's flags (``fp_epochs``,
    ``fp_optimizer``, ``fp_lr0``, ``imgsz``, ``batch``, ``device``, ``project``, ``name``, ...). The run goes to
    <project>/<name>-fp/; ``.weights`` is its best.pt, the start of ``train_qat``."""
    opt = settings_of({}, settings)
    if opt.fp_epochs < 1:
        raise InputError(f"fp_epochs={opt.fp_epochs}: the FP stage trains for fp_epochs >= 1 ('epochs' is QAT's, "
                         f"as on the command line: --fp-epochs, --epochs)")
    check_settings(opt, fp_stage=True)
    src, data = _inputs(source, data)
    check_loss_hyp(opt, src)
    opt.imgsz = opt.imgsz or src.imgsz
    return fp_stage(opt, src, data, callbacks)


def train_qat(source, data=None, recipe=None, *, callbacks: dict | None = None, **settings) -> TrainResult:
    """QAT of ``source`` (an FP or QAT .pt, or a model yaml) on ``data`` (default: the embedded offline dataset).
    ``recipe``: None, a preset name (configs/presets.py: ``ema_w4a4``, ``w4a8_ort``, ...), a recipe yaml path or a
    dict of settings; ``settings`` override it (train_qat's flags: ``epochs``, ``w_bits``, ``method``, ``lr0``,
    ``imgsz``, ``batch``, ``device``, ``project``, ``name``, ...). ``callbacks``: {Ultralytics event: [fn]}.
    ``.weights`` is the run's best.pt, ``.last`` its last.pt, ``.metrics`` Ultralytics' final validation."""
    try:
        recipe = recipe_settings(recipe)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    opt = settings_of(recipe, settings)
    check_settings(opt)
    src, data = _inputs(source, data)
    check_loss_hyp(opt, src)
    opt.imgsz = opt.imgsz or src.imgsz
    return qat_stage(opt, src, data, callbacks)


def resume_qat(last, *, device=None, workers: int | None = None, callbacks: dict | None = None,
               ckpt: dict | None = None) -> TrainResult:
    """Resume an unfinished QAT run from its weights/last.pt with the run's own settings (``device`` and
    ``workers`` may change). ``ckpt``: the file, when the caller has already read it."""
    ckpt = ckpt if ckpt is not None else resolve_source(last).ckpt
    task = ckpt["train_args"].get("task", "detect")
    ov = {"model": str(last), "resume": str(last), "device": device,
          **({} if workers is None else {"workers": workers})}
    trainer = qat_trainers.qat_trainer_class(task, original=is_original(ckpt["model"]))(overrides=ov)
    run_trainer(trainer, callbacks)
    return result_of(trainer, task)


def correct_qc(weights, data=None, *, val: bool = True, distill: bool = False, labels: bool = True,
               project: str = "runs/qc", name: str = "exp", exist_ok: bool = False, **settings) -> QCResult:
    """QC of a quantized checkpoint: corrections of every quantized conv's output trained on ``data`` (or, with
    ``labels=False``, on the images of ``source=DIR`` by distillation alone), then folded into the model.
    ``settings``: QCConfig's fields (``steps``, ``calib_images``, ``lr``, ``imgsz``, ``batch``, ``device``,
    ``teacher``, ...). ``.weights`` is the folded qc.pt; ``.metrics`` the mAP ``before`` / ``after`` (``val``)."""
    return qc_stage(weights, data, val=val, distill=distill, labels=labels, project=project, name=name,
                    exist_ok=exist_ok, **settings)


def validate(weights, data=None, *, save_dir=None, **kw) -> dict:
    """Box (and mask) mAP of a checkpoint, a resolved source or an exported .onnx file, by Ultralytics'
    validator and pycocotools: engine.validate.validate's dict (``ultralytics``, ``pycocotools``, ...). ``kw``:
    ``imgsz``, ``batch``, ``device``, ``conf``, ``iou``, ``rect``, ``pycocotools``, ``workers``, ``verbose``.
    Without ``save_dir`` the predictions go to a temporary folder, removed after."""
    src = weights if str(weights).endswith(".onnx") else resolve_source(weights)
    model = src.model if isinstance(src, ModelSource) else src
    if model is None:
        raise InputError(f"'{weights}' is a model yaml: validation takes a trained checkpoint (.pt) or an .onnx file")
    if save_dir is not None:
        res = validate_model(model, data, save_dir=save_dir, **kw)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res = {**validate_model(model, data, save_dir=tmp, **kw), "predictions": None, "ground_truth": None}
    if isinstance(src, ModelSource):
        res["weights"] = src.path  # the file, not the class name of the model validated in memory
    return res


def export(weights, target: str | None = None, format: str = "onnx", **kw) -> ExportResult:
    """A deployable file of a quantized checkpoint: ``format="onnx"`` for its deploy ``target`` (``ort``, ``npu``,
    ``tensorrt``, ``sim``; None: the one it was trained for, which a name only confirms) or ``"packed"`` (a
    bit-packed integer checkpoint). ``kw``: ``output``, ``imgsz``, ``batch``, ``opset``, ``dynamic``,
    ``offset_mode``, ``verify``, ``data`` (verify on its validation images), ``project``, ``name``.
    ``.path`` is the file written."""
    return export_stage(weights, target, format, **kw)

