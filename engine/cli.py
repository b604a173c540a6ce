"""The train_qat.py command line: arguments (flags < recipe file < command line), input checks with
one-paragraph messages, the optional FP stage, the QAT run and the FP-vs-QAT summary table."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

# The no-argument demo, sized for ~10 minutes on 2 CPU cores: 16 optimizer steps per epoch, so the
# EMA warm-up tau is counted in steps accordingly (the paper's tau=2000 assumes COCO-length runs).
# FP stage of the demo: short runs (~250 optimizer steps) learn far more with AdamW at 4e-3 than with
# optimizer=auto's choice (measured on the embedded set, yolov5nu 10 epochs: mAP50 0.34 vs 0.15).
DEMO = {"cfg": "yolov5nu-seg", "fp_epochs": 16, "fp_optimizer": "AdamW", "fp_lr0": 0.004, "epochs": 4, "imgsz": 128, "batch": 16, "ema_decay": 0.99,
        "ema_tau": 16.0, "lr0": 0.002, "warmup_epochs": 0.0, "workers": 0}


class InputError(Exception):
    """A problem with what the user passed: reported as one paragraph, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="train_qat.py", description=__doc__)
    a = ap.add_argument
    a("--config", help="recipe yaml whose keys are any of these flags (e.g. configs/ema_w4a4.yaml)")
    a("--weights", help="FP (or QAT) checkpoint to start from: any Ultralytics .pt, or a model yaml")
    a("--cfg", help="model yaml or short name (yolov5nu, yolov5su, yolov7-tinyu, *-seg) when there are no --weights")
    a("--data", help="dataset yaml (default: the embedded offline dataset, generated on first use)")
    a("--epochs", type=int, default=10, help="QAT epochs")
    a("--fp-epochs", type=int, default=0, help="train the FP model first for this many epochs (no --weights)")
    a("--fp-optimizer", default="auto", help="optimizer of the FP stage (Ultralytics names: auto, SGD, AdamW, ...)")
    a("--fp-lr0", type=float, default=0.01, help="initial learning rate of the FP stage (ignored by optimizer=auto)")
    a("--imgsz", type=int, default=640)
    a("--batch", type=int, default=16)
    a("--nbs", type=int, help="nominal batch size (default: --batch, i.e. one optimizer step per batch)")
    a("--device", default="", help="cpu, mps, 0, or 0,1 (multi-GPU goes through Ultralytics' DDP launcher); default: "
                                   "Ultralytics' choice, the first GPU when there is one, else the CPU")
    a("--workers", type=int, default=2)
    a("--w-bits", type=int, default=4)
    a("--a-bits", type=int, default=4)
    a("--first-last-bits", type=int, default=8, help="bits of the stem and the final head convs")
    a("--per-channel", action=argparse.BooleanOptionalAction, default=False)
    a("--act-mode", default="lsq+", help="lsq+ (learnable offset), unsigned or signed")
    a("--method", default="lsq", help="lsq, dampen or freeze")
    a("--ema-decay", type=float, default=0.9999, help="max EMA decay of weights and scales; 0 disables the EMA")
    a("--ema-tau", type=float, default=2000.0, help="EMA warm-up in optimizer steps")
    a("--scale-lr", type=float, default=1e-4, help="Adam lr of step sizes and offsets")
    a("--dampen-lambda", type=float, default=1e-2)
    a("--freeze-th-start", type=float, default=0.04)
    a("--freeze-th-end", type=float, default=0.01)
    a("--osc-momentum", type=float, default=0.01)
    a("--osc-threshold", type=float, default=0.01, help="frequency above which a weight counts as oscillating")
    a("--calib-batches", type=int, default=8)
    a("--bn-reestimate", action=argparse.BooleanOptionalAction, default=False)
    a("--bn-batches", type=int, default=50)
    a("--recompute-input", action=argparse.BooleanOptionalAction, default=False,
      help="recompute each conv input's fake quantization in the backward: ~FP peak memory, slower steps")
    a("--lr0", type=float, default=0.01, help="SGD lr of the weights (YOLO recipe)")
    a("--warmup-epochs", type=float, default=3.0)
    a("--close-mosaic", type=int, help="epochs without mosaic at the end (default: a quarter of the run, <= 10)")
    a("--project", default="runs/qat")
    a("--name", default="exp")
    a("--exist-ok", action="store_true")
    a("--seed", type=int, default=0)
    a("--resume", nargs="?", const=True, default=False, help="resume an interrupted run from its last.pt")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    first, _ = ap.parse_known_args(argv)
    if first.config:
        path = Path(first.config)
        if not path.is_file():
            raise InputError(f"recipe file '{path}' does not exist: pass the path of a yaml such as configs/ema_w4a4.yaml")
        values = yaml.safe_load(path.read_text()) or {}
        dests = {a.dest for a in ap._actions} - {"help", "config"}
        if not isinstance(values, dict) or set(values) - dests:
            bad = sorted(set(values) - dests) if isinstance(values, dict) else values
            raise InputError(f"recipe file '{path}' has unknown key(s) {bad}: allowed keys are {sorted(dests)}")
        ap.set_defaults(**values)
    demo = list(sys.argv[1:] if argv is None else argv) == []
    if demo:
        ap.set_defaults(**DEMO)  # no arguments at all: the offline demo
    opt = ap.parse_args(argv)
    opt.demo = demo
    return opt


def qat_config(opt):
    from engine.config import QATConfig

    recipe = {"w_bits": opt.w_bits, "a_bits": opt.a_bits, "first_last_bits": opt.first_last_bits,
              "per_channel": opt.per_channel, "act_mode": opt.act_mode}
    try:
        return QATConfig(recipe=recipe, method=opt.method, ema_decay=opt.ema_decay, ema_tau=opt.ema_tau,
                         scale_lr=opt.scale_lr, dampen_lambda=opt.dampen_lambda, freeze_th_start=opt.freeze_th_start,
                         freeze_th_end=opt.freeze_th_end, osc_momentum=opt.osc_momentum,
                         osc_threshold=opt.osc_threshold, calib_batches=opt.calib_batches,
                         bn_reestimate=opt.bn_reestimate, bn_batches=opt.bn_batches,
                         recompute_input=opt.recompute_input)
    except ValueError as e:
        raise InputError(f"invalid QAT setting: {e}") from None


def resolve_data(opt) -> str:
    if opt.data is None:
        from data.embedded import ensure_embedded_dataset

        return str(ensure_embedded_dataset())
    path = Path(opt.data)
    if not path.is_file():
        raise InputError(f"dataset yaml '{opt.data}' does not exist: pass the path of an Ultralytics dataset yaml "
                         f"(train/val image folders, names), or omit --data to use the embedded offline dataset")
    return str(path)


def model_task(source: str) -> str:
    """'detect' or 'segment' for a .pt checkpoint or a model yaml; InputError for anything else."""
    from ultralytics.nn.tasks import SegmentationModel, guess_model_task

    from models.registry import is_original_yaml

    if source.endswith(".pt"):
        from models.checkpoint import load_checkpoint

        try:
            model, _ = load_checkpoint(source)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
        task = "segment" if isinstance(model, SegmentationModel) else guess_model_task(model)
    elif is_original_yaml(source):  # Ultralytics' guess reads the file name only; the head says it
        from engine.original import original_yaml_task

        task = original_yaml_task(source)
    else:
        task = guess_model_task(source)
    if task not in {"detect", "segment"}:
        raise InputError(f"'{source}' is a {task} model: train_qat.py supports detection and segmentation models")
    return task


def resolve_model(opt) -> str:
    from models.registry import resolve_model_cfg

    src = opt.weights or opt.cfg or DEMO["cfg"]
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
            "exist_ok": opt.exist_ok, "project": str(Path(opt.project).resolve())}


def fp_overrides(opt, data, model_src) -> dict:
    # Plain Ultralytics training (its optimizer=auto choice included); validated at the end only.
    return {**common_overrides(opt, data), "model": model_src, "epochs": opt.fp_epochs, "name": f"{opt.name}-fp",
            "close_mosaic": min(10, opt.fp_epochs // 4), "val": False, "optimizer": opt.fp_optimizer,
            "lr0": opt.fp_lr0, "warmup_epochs": min(3, max(1, opt.fp_epochs // 10))}


def qat_overrides(opt, data, model_src, qat: dict) -> dict:
    return {**common_overrides(opt, data), "model": model_src, "epochs": opt.epochs, "name": opt.name,
            "optimizer": "SGD", "lr0": opt.lr0, "warmup_epochs": opt.warmup_epochs, "qat": qat}


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
        get_cfg(DEFAULT_CFG_DICT, {k: v for k, v in ov.items() if k != "qat"})
    except (ValueError, TypeError, SyntaxError) as e:
        msg = " ".join(str(e).split())
        key = m.group(1) if (m := re.match(r"'(\w+)=", msg)) else None
        flag = flags.get(key) or (f"--{key.replace('_', '-')}" if key else "an argument")
        raise InputError(f"{flag} {ov.get(key)!r} is rejected by Ultralytics' argument check{stage}: {msg} "
                         f"Pass a value of the type and range it names") from None


def train_fp(opt, model_src: str, task: str, data: str) -> tuple[str, dict]:
    """Train the FP model with the plain Ultralytics trainer (engine/original.py's subclass for the original
    anchor-based models); return its best.pt and metrics."""
    from engine.original import is_original_source, trainer_class

    cls = trainer_class(task, original=is_original_source(model_src))
    trainer = cls(overrides=fp_overrides(opt, data, model_src))
    trainer.train()
    return str(trainer.best), dict(trainer.metrics or {})


def validate(weights: str, task: str, opt, data: str) -> dict:
    """Box (and mask) metrics of a checkpoint on the val split, with Ultralytics' validator."""
    from engine.original import is_original_source, validator_class

    cls = validator_class(task, original=is_original_source(weights))
    v = cls(args={"model": weights, "data": data, "imgsz": opt.imgsz, "batch": opt.batch, "device": opt.device,
                  "plots": False, "task": task, "workers": 0})
    metrics = v(model=weights)
    return dict(metrics or {})


def summary(rows: dict[str, dict]) -> str:
    cols = [("box mAP50-95", "metrics/mAP50-95(B)"), ("box mAP50", "metrics/mAP50(B)"),
            ("mask mAP50-95", "metrics/mAP50-95(M)"), ("mask mAP50", "metrics/mAP50(M)")]
    cols = [c for c in cols if any(c[1] in m for m in rows.values())]
    lines = [f"{'model':<24}" + "".join(f"{h:>15}" for h, _ in cols)]
    for name, m in rows.items():
        lines.append(f"{name:<24}" + "".join(f"{m.get(k, float('nan')):>15.4f}" for _, k in cols))
    return "\n".join(lines)


def run(opt, callbacks: dict | None = None) -> dict:
    from engine.trainer import qat_trainer_class

    if opt.resume:
        return resume(opt, callbacks)
    qat = qat_config(opt)  # checks bits and method before anything slow
    flags = {"nbs": "--nbs" if opt.nbs else "--batch"}
    check_ultralytics_args(qat_overrides(opt, None, None, {}), flags)
    if runs_fp_stage(opt):
        check_ultralytics_args(fp_overrides(opt, None, None), {**flags, **FP_FLAGS}, " (FP stage)")
    use_device(opt)
    if getattr(opt, "demo", False):
        from engine.demo import pin_threads

        pin_threads()  # the thread count changes the numbers: the demo's reference is for 1 thread
    data = resolve_data(opt)
    model_src = resolve_model(opt)
    task = model_task(model_src)
    rows = {}
    if not model_src.endswith(".pt") and opt.fp_epochs > 0:
        model_src, rows["FP (trained here)"] = train_fp(opt, model_src, task, data)
    elif model_src.endswith(".pt"):
        rows["FP (--weights)"] = validate(model_src, task, opt, data)
    from engine.original import is_original_source

    trainer = qat_trainer_class(task, original=is_original_source(model_src))(
        overrides=qat_overrides(opt, data, model_src, qat.to_dict()))
    for event, fns in (callbacks or {}).items():
        for fn in fns:
            trainer.add_callback(event, fn)
    trainer.train()
    bits = f"W{qat.recipe['w_bits']}A{qat.recipe['a_bits']}"
    rows[f"QAT {bits} {qat.method}" + (f"+EMA" if qat.ema_decay else "")] = dict(trainer.metrics or {})
    rows.update(getattr(trainer, "extra_rows", {}))
    print("\n" + summary(rows))
    if getattr(opt, "demo", False):
        from engine.demo import reference_lines

        print(reference_lines())
    print(f"\nQAT run: {trainer.save_dir}  (weights/last.pt, weights/best.pt, results.csv, oscillations.csv, args.yaml)")
    return rows


def resume(opt, callbacks=None) -> dict:
    import torch

    from engine.trainer import qat_trainer_class

    path = opt.resume if isinstance(opt.resume, str) else None
    if path is None:
        runs = sorted(Path(opt.project).glob("*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise InputError(f"--resume: no run to resume under '{opt.project}': pass the path of a run's weights/last.pt")
        path = str(runs[-1])
    if not Path(path).is_file():
        raise InputError(f"--resume '{path}' does not exist: pass the path of a QAT run's weights/last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
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
    from engine.original import is_original

    trainer = qat_trainer_class(task, original=is_original(ckpt["model"]))(overrides=ov)
    for event, fns in (callbacks or {}).items():
        for fn in fns:
            trainer.add_callback(event, fn)
    trainer.train()
    rows = {"QAT (resumed)": dict(trainer.metrics or {})}
    print("\n" + summary(rows))
    return rows


def use_device(opt, resumed_device=None) -> None:
    """Resolve --device before anything slow and say which it is. Left out: Ultralytics' choice, or on
    --resume the run's own device (as Ultralytics resumes every argument not given)."""
    from engine.device import announce, default_note, resolve_device

    request, note = opt.device, default_note(opt.device)
    if request in (None, "") and resumed_device not in (None, ""):
        request, note = resumed_device, "the resumed run's device; --device to change it"
    try:
        opt.device = resolve_device(request, multi=True)
    except ValueError as e:
        raise InputError(f"--device: {e}") from None
    announce("train_qat.py", opt.device, note)


def main(argv=None, callbacks: dict | None = None) -> int:
    try:
        opt = parse_args(argv)
        run(opt, callbacks)
    except InputError as e:
        print(f"train_qat.py: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        from engine.trainer import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            print(f"train_qat.py: error: {e}", file=sys.stderr)
            return 1
        msg = str(e).strip()
        if "No labels found" in msg or "No valid images" in msg or "Dataset" in msg or "images not found" in msg:
            print(f"train_qat.py: error: the dataset could not be used: {msg.splitlines()[0]} -- check that the "
                  f"dataset yaml points at image folders with matching YOLO label .txt files", file=sys.stderr)
            return 2
        raise
    return 0
