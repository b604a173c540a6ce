"""The train_qat.py command line: the quantization and QAT flags generated from QuantRecipe and QATConfig
(engine/settings.py), the run's Ultralytics flags and the shared ones (engine/cli_common.py); defaults <
--config yaml < command line. Input checks with one-paragraph messages, the optional FP stage, the QAT run
and the FP-vs-QAT table."""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from yolo_qat.engine.cli_common import InputError, add_shared, input_error
from yolo_qat.engine.config import QATConfig
from yolo_qat.engine.settings import FORMS, add_fields, config_from, mapping, parse_with_config
from yolo_qat.models.yaml_rule import restricted_build

PROG = "train_qat.py"

# The no-argument demo, sized for ~10 minutes on 2 CPU cores: 16 optimizer steps per epoch, so the
# EMA warm-up tau is counted in steps accordingly (the paper's tau=2000 assumes COCO-length runs).
# FP stage of the demo: short runs (~250 optimizer steps) learn far more with AdamW at 4e-3 than with
# optimizer=auto's choice (measured on the embedded set, yolov5nu 10 epochs: mAP50 0.34 vs 0.15).
DEMO = {"cfg": "yolov5nu-seg", "fp_epochs": 16, "fp_optimizer": "AdamW", "fp_lr0": 0.004, "epochs": 4, "imgsz": 128, "batch": 16, "ema_decay": 0.99,
        "ema_tau": 16.0, "lr0": 0.002, "warmup_epochs": 0.0, "workers": 0}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__)
    a = ap.add_argument
    a("--config", help="yaml whose keys are any of these flags with '_' (e.g. configs/ema_w4a4.yaml); the command "
                       "line overrides it")
    add_shared(ap, PROG, project="runs/qat", weights_required=False, device_now=False,
               weights_help="FP (or QAT) checkpoint to start from: any Ultralytics or original YOLOv5/YOLOv7 .pt, "
                            "or a model yaml")
    a("--cfg", help="model yaml or short name (yolov5nu, yolov5su, yolov7-tinyu, *-seg) when there are no --weights")
    a("--epochs", type=int, default=10, help="QAT epochs")
    a("--fp-epochs", type=int, default=0, help="train the FP model first for this many epochs (no --weights)")
    a("--fp-optimizer", default="auto", help="optimizer of the FP stage (Ultralytics names: auto, SGD, AdamW, ...)")
    a("--fp-lr0", type=float, default=0.01, help="initial learning rate of the FP stage (ignored by optimizer=auto)")
    a("--nbs", type=int, help="nominal batch size (default: --batch, i.e. one optimizer step per batch)")
    a("--workers", type=int, default=2, help="dataloader workers")
    a("--lr0", type=float, default=0.01, help="initial SGD learning rate of the weights (Ultralytics' lr0; the "
                                              "quantizer scales have --scale-lr)")
    a("--warmup-epochs", type=float, default=3.0)
    a("--warmup-bias-lr", type=float, default=0.1,
      help="lr the biases (BN shifts included) start the warm-up at, falling to --lr0 (Ultralytics' warmup_bias_lr). "
           "Short QAT from a trained checkpoint: a lower --lr0 without warm-up measured steadier "
           "(docs/integer-qat.md)")
    a("--close-mosaic", type=int, help="epochs without mosaic at the end (default: a quarter of the run, <= 10)")
    a("--loss-hyp", type=mapping, default=None,
      help="original anchor-based models only: YOLOv5 loss settings as in a yolov5 hyp yaml, before its scaling by "
           "3/nl, nc/80 and (imgsz/640)^2, e.g. '{obj: 25}' (keys box, obj, cls, cls_pw, obj_pw, anchor_t, fl_gamma, "
           "label_smoothing); used by the FP and the QAT stage and kept in the checkpoints")
    a("--seed", type=int, default=0)
    a("--amp", action=argparse.BooleanOptionalAction, default=True,
      help="CUDA: fp16 autocast with a GradScaler (Ultralytics' default); --no-amp trains in float32. The fake "
           "quantization itself always computes in float32 and returns the input's dtype")
    a("--resume", nargs="?", const=True, default=False, help="resume an interrupted run from its last.pt")
    add_fields(ap.add_argument_group(f"quantization and QAT (QuantRecipe, QATConfig; {FORMS})"), QATConfig)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    demo = list(sys.argv[1:] if argv is None else argv) == []
    opt = parse_with_config(build_parser(), argv, DEMO if demo else None)  # no arguments at all: the offline demo
    opt.demo = demo
    return opt


def qat_config(opt) -> QATConfig:
    return config_from(QATConfig, opt, "QAT")


def resolve_inputs(opt) -> tuple[str, str, str]:
    """(dataset yaml, model source, task), checked; --imgsz left out becomes the checkpoint's training
    size (640 for a model yaml). The run's first step that reads files (and may generate the dataset)."""
    from yolo_qat.engine.calib import resolve_data

    try:
        data = resolve_data(opt.data)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    model_src = resolve_model(opt)
    task, imgsz = inspect_source(model_src)
    opt.imgsz = opt.imgsz or imgsz
    return data, model_src, task


def check_data(data: str) -> None:
    """The dataset yaml, checked before any training: a missing split ends the run with one paragraph (its
    download: runs only with --download, engine/data_download.py), as do Ultralytics' checks of its keys."""
    from yolo_qat.engine.data_download import check_dataset

    try:
        check_dataset(data)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    except (SyntaxError, TypeError, ValueError) as e:
        raise InputError(f"--data '{data}' is not a usable dataset yaml: {' '.join(str(e).split())}") from None


def inspect_source(source: str) -> tuple[str, int]:
    """(task, training image size or 640) of a .pt checkpoint or a model yaml; InputError for a task other
    than detect / segment, or a file that is not a checkpoint."""
    from ultralytics.nn.tasks import guess_model_task

    from yolo_qat.engine.calib import model_task
    from yolo_qat.engine.validate import trained_imgsz
    from yolo_qat.models.registry import is_original_yaml

    imgsz = 640
    if source.endswith(".pt"):
        from yolo_qat.models.checkpoint import load_checkpoint

        try:
            model, _ = load_checkpoint(source)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
        task, imgsz = model_task(model), trained_imgsz(model)
    elif is_original_yaml(source):  # Ultralytics' guess reads the file name only; the head says it
        from yolo_qat.engine.original import original_yaml_task

        task = original_yaml_task(source)
    else:
        task = guess_model_task(source)
    if task not in {"detect", "segment"}:
        raise InputError(f"'{source}' is a {task} model: train_qat.py supports detection and segmentation models")
    return task, imgsz


def resolve_model(opt) -> str:
    from yolo_qat.models.registry import resolve_model_cfg

    src = opt.weights or opt.cfg or DEMO["cfg"]
    if str(src).endswith(".qpk") and Path(src).is_file():  # a packed export: read safely, then say what it is
        from yolo_qat.models.safe_load import UnsafeCheckpointError, safe_load

        try:
            safe_load(src)
        except UnsafeCheckpointError as e:
            raise InputError(str(e)) from None
        except Exception:
            pass
        raise InputError(f"--weights '{src}' is a packed integer checkpoint (export.py --format packed), made for "
                         f"deployment without the latent weights QAT trains: start from the .pt checkpoint it was "
                         f"exported from")
    if str(src).endswith(".pt"):
        if not Path(src).is_file():
            raise InputError(f"--weights '{src}' does not exist: pass a YOLO .pt checkpoint (e.g. "
                             f"runs/detect/train/weights/best.pt) or a model yaml")
        return str(src)
    try:
        return resolve_model_cfg(src)
    except ValueError as e:
        raise InputError(str(e)) from None


def common_overrides(opt, data: str) -> dict:
    close_mosaic = opt.close_mosaic if opt.close_mosaic is not None else min(10, opt.epochs // 4)
    return {"data": data, "imgsz": opt.imgsz, "batch": opt.batch, "nbs": opt.nbs or opt.batch, "device": opt.device,
            "workers": opt.workers, "seed": opt.seed, "plots": False, "close_mosaic": close_mosaic,
            "amp": getattr(opt, "amp", True),
            "exist_ok": opt.exist_ok, "project": str(Path(opt.project).resolve())}


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


def check_loss_hyp(opt, model_src: str) -> None:
    from yolo_qat.engine.original import is_original_source
    from yolo_qat.models.loss import check_loss_hyp as check

    if not getattr(opt, "loss_hyp", None):
        return
    try:
        check(opt.loss_hyp)
    except ValueError as e:
        raise InputError(f"--loss-hyp: {e}") from None
    if not is_original_source(model_src):
        raise InputError(f"--loss-hyp sets the YOLOv5 loss of the original anchor-based models; '{model_src}' is an "
                         f"Ultralytics model, whose loss gains are Ultralytics' own: drop --loss-hyp")


def runs_fp_stage(opt) -> bool:
    return opt.fp_epochs > 0 and not str(opt.weights or "").endswith(".pt")


# The flags behind the FP stage's Ultralytics arguments (elsewhere 'warmup_epochs' comes from '--warmup-epochs').
FP_FLAGS = {"epochs": "--fp-epochs", "lr0": "--fp-lr0", "optimizer": "--fp-optimizer", "close_mosaic": "--fp-epochs",
            "warmup_epochs": "--fp-epochs"}


def check_ultralytics_args(ov: dict, flags: dict, stage: str = "") -> None:
    """Run Ultralytics' own argument check (types and ranges, e.g. lr0 in [0, 1]) on the overrides a
    trainer will get, before any data or training, and name the flag behind a rejected value."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg

    try:
        get_cfg(DEFAULT_CFG_DICT, {k: v for k, v in ov.items() if k not in ("qat", "loss_hyp")})
    except (ValueError, TypeError, SyntaxError) as e:
        msg = " ".join(str(e).split())
        key = m.group(1) if (m := re.match(r"'(\w+)=", msg)) else None
        flag = flags.get(key) or (f"--{key.replace('_', '-')}" if key else "an argument")
        raise InputError(f"{flag} {ov.get(key)!r} is rejected by Ultralytics' argument check{stage}: {msg} "
                         f"Pass a value of the type and range it names") from None


def train_fp(opt, model_src: str, task: str, data: str) -> tuple[str, dict]:
    """Train the FP model with the plain Ultralytics trainer (engine/original.py's subclass for the original
    anchor-based models); return its best.pt and metrics."""
    from yolo_qat.engine.original import is_original_source, trainer_class

    cls = trainer_class(task, original=is_original_source(model_src))
    trainer = cls(overrides=fp_overrides(opt, data, model_src))
    with restricted_build():  # Ultralytics' own no-eval build mode behind the yaml rule (models/yaml_rule.py)
        trainer.train()
    return str(trainer.best), dict(trainer.metrics or {})


def metrics_row(metrics: dict | None, task: str) -> dict:
    """A row of engine.validate.format_table from a trainer's metrics (Ultralytics' keys)."""
    from yolo_qat.engine.validate import ultralytics_metrics

    return {"task": task, "ultralytics": ultralytics_metrics(dict(metrics or {}), task)}


def train(trainer, callbacks: dict | None) -> None:
    for event, fns in (callbacks or {}).items():
        for fn in fns:
            trainer.add_callback(event, fn)
    with restricted_build():  # Ultralytics' own no-eval build mode behind the yaml rule (models/yaml_rule.py)
        trainer.train()


def run(opt, callbacks: dict | None = None) -> dict:
    from yolo_qat.engine.trainer import qat_trainer_class
    from yolo_qat.engine.validate import format_table

    if opt.resume:
        return resume(opt, callbacks)
    qat = qat_config(opt)  # checks bits and method before anything slow
    flags = {"nbs": "--nbs" if opt.nbs else "--batch"}
    check_ultralytics_args(qat_overrides(opt, None, None, {}), flags)
    if runs_fp_stage(opt):
        check_ultralytics_args(fp_overrides(opt, None, None), {**flags, **FP_FLAGS}, " (FP stage)")
    use_device(opt)
    if getattr(opt, "demo", False):
        from yolo_qat.engine.demo import pin_threads

        pin_threads()  # the thread count changes the numbers: the demo's reference is for 1 thread
    data, model_src, task = resolve_inputs(opt)
    check_data(data)
    check_loss_hyp(opt, model_src)
    rows = {}
    if not model_src.endswith(".pt") and opt.fp_epochs > 0:
        model_src, fp_metrics = train_fp(opt, model_src, task, data)
        rows["FP (trained here)"] = metrics_row(fp_metrics, task)
    elif model_src.endswith(".pt"):
        from yolo_qat.engine.validate import validate

        with tempfile.TemporaryDirectory() as tmp:  # Ultralytics' numbers only: nothing to keep
            rows["FP (--weights)"] = validate(model_src, data, imgsz=opt.imgsz, batch=opt.batch, device=opt.device,
                                              save_dir=tmp, pycocotools=False, workers=opt.workers)
    from yolo_qat.engine.original import is_original_source

    try:  # the trainer checks the settings that need the model source (e.g. a teacher for --distill)
        trainer = qat_trainer_class(task, original=is_original_source(model_src))(
            overrides=qat_overrides(opt, data, model_src, qat.to_dict()))
    except ValueError as e:
        raise InputError(str(e)) from None
    train(trainer, callbacks)
    bits = f"W{qat.recipe['w_bits']}A{qat.recipe['a_bits']}"
    rows[f"QAT {bits} {qat.method}" + ("+EMA" if qat.ema_decay else "")] = metrics_row(trainer.metrics, task)
    rows.update({k: metrics_row(m, task) for k, m in getattr(trainer, "extra_rows", {}).items()})
    print("\n" + format_table(rows))
    if getattr(opt, "demo", False):
        from yolo_qat.engine.demo import reference_lines

        print(reference_lines())
    print(f"\nQAT run: {trainer.save_dir}  (weights/last.pt, weights/best.pt, results.csv, oscillations.csv, args.yaml)")
    return rows


def resume(opt, callbacks=None) -> dict:
    from yolo_qat.engine.trainer import qat_trainer_class
    from yolo_qat.engine.validate import format_table

    path = opt.resume if isinstance(opt.resume, str) else None
    if path is None:
        runs = sorted(Path(opt.project).glob("*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise InputError(f"--resume: no run to resume under '{opt.project}': pass the path of a run's weights/last.pt")
        path = str(runs[-1])
    if not Path(path).is_file():
        raise InputError(f"--resume '{path}' does not exist: pass the path of a QAT run's weights/last.pt")
    from yolo_qat.models.safe_load import MissingClassError, UnsafeCheckpointError, safe_load

    try:
        ckpt = safe_load(path)
    except (UnsafeCheckpointError, MissingClassError) as e:
        raise InputError(f"--resume: {e}") from None
    except Exception as e:
        raise InputError(f"--resume '{path}' is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "train_state" not in ckpt or "qat_args" not in ckpt:
        raise InputError(f"--resume '{path}' is not the last.pt of an unfinished train_qat.py run (it holds no QAT "
                         f"training state); start a new run with --weights instead")
    task = ckpt["train_args"].get("task", "detect")
    if ckpt.get("epoch", -1) + 1 >= ckpt["train_args"]["epochs"]:
        raise InputError(f"--resume '{path}': the run already finished all {ckpt['train_args']['epochs']} epochs")
    check_ultralytics_args({"workers": opt.workers}, {})
    use_device(opt, ckpt["train_args"].get("device"))
    ov = {"model": path, "resume": path, "device": opt.device, "workers": opt.workers}
    from yolo_qat.engine.original import is_original

    trainer = qat_trainer_class(task, original=is_original(ckpt["model"]))(overrides=ov)
    train(trainer, callbacks)
    rows = {"QAT (resumed)": metrics_row(trainer.metrics, task)}
    print("\n" + format_table(rows))
    return rows


def use_device(opt, resumed_device=None) -> None:
    """Resolve --device before anything slow and say which it is. Left out: Ultralytics' choice, or on
    --resume the run's own device (as Ultralytics resumes every argument not given)."""
    from yolo_qat.engine.device import announce, default_note, resolve_device

    request, note = opt.device, default_note(opt.device)
    if request in (None, "") and resumed_device not in (None, ""):
        request, note = resumed_device, "the resumed run's device; --device to change it"
    try:
        opt.device = resolve_device(request, multi=True)
    except ValueError as e:
        raise InputError(f"--device: {e}") from None
    announce(PROG, opt.device, note)


def main(argv=None, callbacks: dict | None = None) -> int:
    from yolo_qat.engine.data_download import allowing_downloads, missing_split_in
    from yolo_qat.models.safe_load import MissingClassError, UnsafeCheckpointError, trusting

    try:
        opt = parse_args(argv)
        with trusting(opt.trust_checkpoint), allowing_downloads(opt.download):
            run(opt, callbacks)
    except InputError as e:
        return input_error(PROG, e)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        if missing_split_in(e) is not None:  # found by Ultralytics' trainer, which re-raises it as RuntimeError
            return input_error(PROG, missing_split_in(e))
        if isinstance(e, (UnsafeCheckpointError, MissingClassError)):  # e.g. the --teacher, loaded by the trainer
            return input_error(PROG, e)
        from yolo_qat.engine.trainer import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            return input_error(PROG, e, code=1)  # not an input error: training failed
        from yolo_qat.engine.distill import TeacherMismatchError

        if isinstance(e, TeacherMismatchError):  # found when the trainer loads the models, before any step
            return input_error(PROG, e)
        msg = str(e).strip()
        if "No labels found" in msg or "No valid images" in msg or "Dataset" in msg or "images not found" in msg:
            return input_error(PROG, f"the dataset could not be used: {msg.splitlines()[0]} -- check that the "
                                     f"dataset yaml points at image folders with matching YOLO label .txt files")
        raise
    return 0
