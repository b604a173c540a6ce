"""The two training stages on a resolved model source: FP training with the plain Ultralytics trainer and QAT
with engine/trainer.py's, each from a namespace of train_qat's settings (its flags' dests: the command line
and the Python API name every setting alike), returning the run's weights and metrics."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg

from yolo_qat.engine import trainer as qat_trainers
from yolo_qat.engine.cli_common import InputError
from yolo_qat.engine.config import QATConfig
from yolo_qat.engine.original import trainer_class
from yolo_qat.engine.settings import config_from
from yolo_qat.engine.source import ModelSource, resolve_source
from yolo_qat.models.loss import check_loss_hyp as check_hyp_values
from yolo_qat.models.yaml_rule import restricted_build

# The flags behind the FP stage's Ultralytics arguments (elsewhere 'warmup_epochs' comes from '--warmup-epochs').
FP_FLAGS = {"epochs": "--fp-epochs", "lr0": "--fp-lr0", "optimizer": "--fp-optimizer", "close_mosaic": "--fp-epochs",
            "warmup_epochs": "--fp-epochs"}


@dataclass
class TrainResult:
    """A finished training run: ``weights`` its best.pt, ``last`` its last.pt, ``save_dir`` the run folder
    (results.csv, args.yaml, ...), ``metrics`` Ultralytics' final validation metrics, ``trainer`` the trainer."""

    weights: Path
    last: Path
    save_dir: Path
    metrics: dict = field(default_factory=dict)
    task: str = "detect"
    trainer: object = field(default=None, repr=False)


def qat_config(opt: argparse.Namespace) -> QATConfig:
    return config_from(QATConfig, opt, "QAT")


def common_overrides(opt, data) -> dict:
    close_mosaic = opt.close_mosaic if opt.close_mosaic is not None else min(10, opt.epochs // 4)
    return {"data": data, "imgsz": opt.imgsz, "batch": opt.batch, "nbs": opt.nbs or opt.batch, "device": opt.device,
            "workers": opt.workers, "seed": opt.seed, "plots": False, "close_mosaic": close_mosaic,
            "amp": getattr(opt, "amp", True), "exist_ok": opt.exist_ok, "project": str(Path(opt.project).resolve())}


def loss_overrides(opt) -> dict:
    """The YOLOv5 loss settings of an original model's run (engine/original.py pops them before Ultralytics'
    cfg check); nothing for the rest."""
    hyp = getattr(opt, "loss_hyp", None)
    return {"loss_hyp": hyp} if hyp else {}


def fp_overrides(opt, data, model_src) -> dict:
    # Plain Ultralytics training (its optimizer=auto choice included); validated at the end only.
    return {**common_overrides(opt, data), "model": model_src, "epochs": opt.fp_epochs, "name": f"{opt.name}-fp",
            "close_mosaic": min(10, opt.fp_epochs // 4), "val": False, "optimizer": opt.fp_optimizer,
            "lr0": opt.fp_lr0, "warmup_epochs": min(3, max(1, opt.fp_epochs // 10)), **loss_overrides(opt)}


def qat_overrides(opt, data, model_src, qat: dict) -> dict:
    return {**common_overrides(opt, data), "model": model_src, "epochs": opt.epochs, "name": opt.name,
            "optimizer": "SGD", "lr0": opt.lr0, "warmup_epochs": opt.warmup_epochs,
            "warmup_bias_lr": getattr(opt, "warmup_bias_lr", 0.1), "qat": qat, **loss_overrides(opt)}


def check_ultralytics_args(ov: dict, flags: dict, stage: str = "") -> None:
    """Run Ultralytics' own argument check (types and ranges, e.g. lr0 in [0, 1]) on the overrides a
    trainer will get, before any data or training, and name the flag behind a rejected value."""
    try:
        get_cfg(DEFAULT_CFG_DICT, {k: v for k, v in ov.items() if k not in ("qat", "loss_hyp")})
    except (ValueError, TypeError, SyntaxError) as e:
        msg = " ".join(str(e).split())
        key = m.group(1) if (m := re.match(r"'(\w+)=", msg)) else None
        flag = flags.get(key) or (f"--{key.replace('_', '-')}" if key else "an argument")
        raise InputError(f"{flag} {ov.get(key)!r} is rejected by Ultralytics' argument check{stage}: {msg} "
                         f"Pass a value of the type and range it names") from None


def check_settings(opt, fp_stage: bool = False) -> QATConfig:
    """The QAT settings and Ultralytics' check of the run's arguments (and the FP stage's), before anything slow."""
    qat = qat_config(opt)
    flags = {"nbs": "--nbs" if opt.nbs else "--batch"}
    check_ultralytics_args(qat_overrides(opt, None, None, {}), flags)
    if fp_stage:
        check_ultralytics_args(fp_overrides(opt, None, None), {**flags, **FP_FLAGS}, " (FP stage)")
    return qat


def check_loss_hyp(opt, source) -> None:
    """--loss-hyp's values, and that the model is an original anchor-based one (the only loss it sets)."""
    if not getattr(opt, "loss_hyp", None):
        return
    try:
        check_hyp_values(opt.loss_hyp)
    except ValueError as e:
        raise InputError(f"--loss-hyp: {e}") from None
    if not resolve_source(source).original:
        raise InputError(f"--loss-hyp sets the YOLOv5 loss of the original anchor-based models; '{source}' is an "
                         f"Ultralytics model, whose loss gains are Ultralytics' own: drop --loss-hyp")


def run_trainer(trainer, callbacks: dict | None = None) -> None:
    for event, fns in (callbacks or {}).items():
        for fn in fns:
            trainer.add_callback(event, fn)
    with restricted_build():  # Ultralytics' own no-eval build mode behind the yaml rule (models/yaml_rule.py)
        trainer.train()


def result_of(trainer, task: str) -> TrainResult:
    return TrainResult(Path(trainer.best), Path(trainer.last), Path(trainer.save_dir), dict(trainer.metrics or {}),
                       task, trainer)


def fp_stage(opt, source: ModelSource, data: str, callbacks: dict | None = None) -> TrainResult:
    """Train the FP model with the plain Ultralytics trainer (engine/original.py's subclass for the original
    anchor-based models)."""
    trainer = trainer_class(source.task, original=source.original)(overrides=fp_overrides(opt, data, source.path))
    run_trainer(trainer, callbacks)
    return result_of(trainer, source.task)


def qat_stage(opt, source: ModelSource, data: str, callbacks: dict | None = None) -> TrainResult:
    """QAT of ``source`` by the settings in ``opt``; InputError for settings the trainer refuses up front
    (e.g. a teacher for --distill that cannot be found)."""
    qat = qat_config(opt)
    cls = qat_trainers.qat_trainer_class(source.task, original=source.original)
    try:
        trainer = cls(overrides=qat_overrides(opt, data, source.path, qat.to_dict()))
    except ValueError as e:
        raise InputError(str(e)) from None
    run_trainer(trainer, callbacks)
    return result_of(trainer, source.task)
