"""The QC stage on a quantized checkpoint: the teacher and images it learns from, mAP before and after on the
dataset, the corrections trained and folded (engine/qc.py), qc_report.json written; returns the checkpoints."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from yolo_qat.engine.cli_common import InputError, output_dir
from yolo_qat.engine.config import QCConfig
from yolo_qat.engine.distill import checkpoint_teacher
from yolo_qat.engine.qc import run_qc
from yolo_qat.engine.settings import config_from
from yolo_qat.engine.source import resolve_source
from yolo_qat.engine.validate import validate
from yolo_qat.quant import is_quantized
from yolo_qat.quant.qc import FoldCheckError, qc_modules

LABELS = {"before": "before (QAT)", "after": "after (QC)"}  # the rows of qc_report.json's "map" and the summary


@dataclass
class QCResult:
    """``weights``: the folded qc.pt (to validate and export); ``unfolded``: qc_unfolded.pt, the corrections
    still as modules; ``save_dir``: the run folder (qc_report.json); ``metrics``: mAP ``before`` / ``after``
    (validate's dicts) when validated; ``report``: the run's report (losses, fold check, budget)."""

    weights: Path
    unfolded: Path | None
    save_dir: Path
    metrics: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict, repr=False)


def resolve_teacher(weights, ckpt: dict, *, distill: bool, labels: bool, teacher, source) -> str | None:
    """The FP teacher of QC with distillation, or None without it: ``teacher``, else the FP checkpoint the
    QAT checkpoint records. InputError when the distillation settings do not go together."""
    label_free = not labels
    if label_free and not source:
        raise InputError("--no-labels runs QC on a folder of unlabelled images: name it with --source DIR")
    if source and not label_free:
        raise InputError(f"--source '{source}' is label-free QC on a folder of images: add --no-labels to confirm "
                         f"(the QC loss is then the distillation term alone), or drop --source to use --data")
    if teacher and not (distill or label_free):
        raise InputError(f"--teacher '{teacher}' is set but distillation is off: add --distill, or drop --teacher")
    if (distill or label_free) and not teacher:
        try:
            teacher = checkpoint_teacher(ckpt)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
        print(f"QC: distilling from {teacher} (the FP model recorded in '{weights}')")
    return teacher


def qc_stage(weights, data=None, *, val: bool = True, distill: bool = False, labels: bool = True,
             project: str = "runs/qc", name: str = "exp", exist_ok: bool = False, **settings) -> QCResult:
    """QC of the quantized checkpoint ``weights`` (a path or a resolved source) by QCConfig's ``settings``.
    InputError for what the user can fix; quant.qc.FoldCheckError (after qc_report.json is written) when a
    folded layer fails its check: both checkpoints are kept (its ``paths``)."""
    src = resolve_source(weights)
    model, ckpt = src.model, src.ckpt or {}
    if model is None or not is_quantized(model):
        raise InputError(f"'{weights}' is a full-precision checkpoint: QC needs a quantized checkpoint (a QAT model "
                         f"with QuantConv2d layers, e.g. the output of yolo-qat train)")
    settings["imgsz"] = settings.get("imgsz") or src.imgsz
    settings["teacher"] = resolve_teacher(src.path, ckpt, distill=distill, labels=labels,
                                          teacher=settings.get("teacher"), source=settings.get("source"))
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(QCConfig)})
    if unknown:
        raise InputError(f"unknown QC setting(s) {unknown}: allowed names are QCConfig's fields")
    qc = config_from(QCConfig, argparse.Namespace(**settings), "QC")  # types checked: a --config yaml holds anything
    model = model.to(qc.device) if qc.device else model
    save_dir = output_dir(_Where(project, name, exist_ok))
    val_kw = dict(imgsz=qc.imgsz, batch=qc.batch, device=qc.device)
    results = {}
    if val and not qc_modules(model):  # Ultralytics' fuse() does not know the correction modules: fold first
        results["before"] = _validate(model, data, save_dir / "val_before", val_kw)
    try:
        model, report = run_qc(model, None if qc.source else data, **qc.to_dict(), save_dir=save_dir,
                               weights_dir=save_dir / "weights",
                               checkpoint_extra={"train_args": ckpt.get("train_args") or {}},
                               report_extra={"source": src.path, "data": None if data is None else str(data)})
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    except FoldCheckError as e:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "qc_report.json").write_text(json.dumps(e.run_report, indent=2))
        raise
    if val:
        results["after"] = _validate(model, data, save_dir / "val_after", val_kw)
        report["map"] = {LABELS[k]: {"ultralytics": r["ultralytics"], "pycocotools": r["pycocotools"]}
                         for k, r in results.items()}
    (save_dir / "qc_report.json").write_text(json.dumps(report, indent=2))
    paths = report["checkpoints"]
    unfolded = paths.get("qc_unfolded.pt")
    return QCResult(Path(paths["qc.pt"]), Path(unfolded) if unfolded else None, save_dir, results, report)


@dataclass
class _Where:  # the fields engine.cli_common.output_dir reads
    project: str
    name: str
    exist_ok: bool


def _validate(model, data, save_dir: Path, kw: dict) -> dict:
    try:
        return validate(model, data, save_dir=save_dir, **kw)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
