"""Reproduction benchmark of METHOD.md section 5 at CPU scale: one FP model, then every cell (method x
bit width x with/without QC x seed), box and mask mAP50-95 by pycocotools, mean and spread over seeds.

    python benchmarks/reproduce.py --cfg yolov5nu-seg --bits 4 --methods lsq ema --qc --fp-epochs 15 \
        --qat-epochs 4 --seeds 0 1 --imgsz 128 --batch 16 --name w4
    python benchmarks/reproduce.py ... --ablation qc          # QC granularity x scale/shift (Table 2)
    python benchmarks/reproduce.py ... --ablation ema-decay   # EMA decay 0 .. 0.9999 (Table 3)
    python benchmarks/reproduce.py ... --methods ema kd --qc --qc-variants labels kd label-free

"ema" is LSQ with the EMA (``--ema-decay``); lsq / dampen / freeze run without EMA unless ``--ema``.
"kd" is "ema" plus distillation from the FP model every cell starts from (``--distill-weight``; the teacher
is that FP checkpoint). QC variants (``--qc-variants``, with ``--qc``): "labels" (the paper's QC: detection
loss), "kd" (detection loss + distillation from the FP model) and "label-free" (distillation alone, on
<out>/unlabelled: the training images linked without their labels).
Budgets are counted in optimizer steps (one per batch: nbs = batch): the EMA warm-up tau defaults to
a tenth of the QAT run, QC to one pass over the calibration set. Outputs go to <project>/<name>/
(runs/reproduce/exp), called <out> below; each finished cell leaves one json in ``<out>/cells``
(written atomically), and a re-run into the same <out> skips those (so --exist-ok is on by default). Spread = sample std over seeds; a
difference smaller than twice the larger spread is reported as "no measurable difference".
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("YOLO_OFFLINE", "1")

from yolo_qat.engine.source import resolve_source  # noqa: E402  (after the path to the clone)
from yolo_qat.engine.training import check_loss_hyp  # noqa: E402
from yolo_qat.pipeline import train_fp, train_qat  # noqa: E402

LABELS = {"lsq": "LSQ", "dampen": "Dampen", "freeze": "Freeze", "ema": "EMA", "kd": "EMA+KD"}
EMA_METHODS = ("ema", "kd")  # always run with the EMA (--ema-decay); both are LSQ underneath
# QC variant -> (column suffix, cell-key suffix). "labels" has the empty key suffix: the keys of the cells
# written before the variants existed stay what they were, so old out dirs resume.
QC_VARIANTS = {"labels": ("+QC", ""), "kd": ("+QC(KD)", "-kd"), "label-free": ("+QC(KD, no labels)", "-kd-nolabels")}
QC_ABLATION = [(g, s, b) for g in ("tensor", "channel") for s, b in ((True, False), (False, True), (True, True))]
DECAYS = (0.0, 0.9, 0.99, 0.999, 0.9999)


@dataclass(frozen=True)
class Cell:
    """One QAT run (bits, method, ema_decay, distill, seed) evaluated without QC (qc=None) or with one QC
    variant (qc: the corrections; qc_mode: the loss and data they train on, a key of QC_VARIANTS)."""
    bits: str  # "4" (W4A4), "3" (W3A3), "4a8" (W4A8): ``bit_widths``
    method: str  # lsq, dampen or freeze (what train_qat.py runs)
    ema_decay: float
    seed: int
    column: str  # the table column it belongs to
    qc: tuple | None = None  # (granularity, scale, shift)
    distill: bool = False  # QAT distils from the FP model
    qc_mode: str = "labels"

    @property
    def qat_key(self) -> str:
        return f"w{self.bits}-{self.method}-ema{self.ema_decay:g}{'-kd' if self.distill else ''}-s{self.seed}"

    @property
    def qc_key(self) -> str:
        if self.qc is None:
            return "noqc"
        g, s, b = self.qc
        return f"qc-{g}-{'both' if s and b else 'scale' if s else 'shift'}{QC_VARIANTS[self.qc_mode][1]}"

    @property
    def key(self) -> str:
        return f"{self.qat_key}--{self.qc_key}"


def bits_token(s: str) -> str:
    """``--bits`` value: N or NaM (weights N bits, activations M), e.g. 4, 3, 4a8."""
    m = re.fullmatch(r"([2-8])(?:a([2-8]))?", str(s).strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r}: a bit width is N (WnAn, e.g. 4) or NaM (WnAm, e.g. 4a8), N, M in 2..8")
    return m.group(1) if m.group(2) in (None, m.group(1)) else f"{m.group(1)}a{m.group(2)}"


def bit_widths(token) -> tuple[int, int]:
    w, _, a = str(token).partition("a")
    return int(w), int(a or w)


def bits_label(token) -> str:
    w, a = bit_widths(token)
    return f"W{w}A{a}"


# -- the matrix ---------------------------------------------------------------------------------
def main_cells(a) -> list[Cell]:
    cells = []  # seed-major: a stopped run has every method at the first seeds
    for seed in a.seeds:
        for bits in a.bits:
            for m in a.methods:
                decay = a.ema_decay if (m in EMA_METHODS or a.ema) else 0.0
                method = "lsq" if m in EMA_METHODS else m
                label = LABELS[m] + ("+EMA" if a.ema and m not in EMA_METHODS else "")
                kd = m == "kd"
                cells.append(Cell(bits, method, decay, seed, label, distill=kd))
                if a.qc:
                    for v in a.qc_variants:
                        cells.append(Cell(bits, method, decay, seed, label + QC_VARIANTS[v][0], ("channel", True, True),
                                          distill=kd, qc_mode=v))
    return list(dict.fromkeys(cells))


def qc_ablation_cells(a) -> list[Cell]:
    cells = []
    for bits in a.bits:
        for seed in a.seeds:
            cells.append(Cell(bits, "lsq", a.ema_decay, seed, "no QC"))
            for g, s, b in QC_ABLATION:
                col = "both" if s and b else "scale only" if s else "shift only"
                cells.append(Cell(bits, "lsq", a.ema_decay, seed, f"{g}|{col}", (g, s, b)))
    return cells


def decay_ablation_cells(a) -> list[Cell]:
    return [Cell(bits, "lsq", d, seed, f"a={d:g}") for bits in a.bits for d in a.decays for seed in a.seeds]


# -- helpers ------------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def n_train_images(data: str) -> int:
    return len(train_images(data))


def steps_per_epoch(data: str, batch: int) -> int:
    return math.ceil(n_train_images(data) / batch)


def train_images(data: str) -> list[Path]:
    """The training split's image files: a list file's entries ('./' = its folder, as Ultralytics reads them)
    or the images under its folders."""
    from ultralytics.data.utils import IMG_FORMATS

    from yolo_qat.engine.data_download import check_dataset

    train = check_dataset(data)["train"]
    files = []
    for r in train if isinstance(train, list) else [train]:
        r = Path(r)
        if r.suffix == ".txt":
            files += [Path(str(r.parent / x[2:]) if x.startswith("./") else x) for x in r.read_text().split()]
        else:
            files += sorted(p for p in r.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
    return files


def unlabelled_source(a, data: str) -> Path:
    """<out>/unlabelled: the training images without their labels (symlinks; copies where links fail), the
    image folder of the label-free QC cells. Made again on each invocation that needs it (cheap, and it
    follows the dataset)."""
    root = Path(a.out) / "unlabelled"
    if getattr(a, "_unlabelled", None) == root:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for i, src in enumerate(train_images(data)):
        dst = root / f"{i:06d}_{src.name}"  # numbered: images of several folders may share a name
        try:
            os.symlink(src.resolve(), dst)
        except OSError:
            shutil.copy2(src, dst)
    if not any(root.iterdir()):
        raise FileNotFoundError(f"the training split of {data} has no images to link into {root}")
    a._unlabelled = root
    return root


def run_settings(a, name: str, **kw) -> dict:
    """The pipeline's settings (train_qat's flags, yolo_qat.train_fp / train_qat keywords) of one run."""
    settings = {"imgsz": a.imgsz, "batch": a.batch, "workers": a.workers, "device": a.device,
                "project": str(Path(a.out) / "runs"), "name": name, "exist_ok": True, "lr0": a.lr0,
                "warmup_epochs": a.warmup_epochs, "calib_batches": a.calib_batches}
    if a.loss_hyp:  # the original anchor-based models' YOLOv5 loss settings, FP and QAT stage alike
        settings["loss_hyp"] = a.loss_hyp
    return {**settings, **kw}


def metrics_of(res: dict) -> dict:
    coco = res["pycocotools"]
    return {"box": coco["box.map"], "mask": coco.get("mask.map"), "ultralytics": res["ultralytics"]}


def evaluate(model_or_path, a, data: str, save_dir: Path) -> dict:
    from yolo_qat.engine.validate import validate

    return metrics_of(validate(model_or_path, data, imgsz=a.imgsz, batch=a.batch, device=a.device,
                               save_dir=save_dir, verbose=False))


# Options that change what a finished run means but are not part of its key: an out dir holds runs of one
# setting only, so that a re-run never mixes, say, 4-epoch and 16-epoch cells in one table.
SETTINGS = ("data", "model", "fp_epochs", "fp_optimizer", "fp_lr0", "qat_epochs", "imgsz", "batch", "lr0",
            "warmup_epochs", "calib_batches", "ema_tau", "loss_hyp", "target")
QC_SETTINGS = ("qc_steps", "qc_calib_images", "qc_lr")  # checked only by invocations that run QC cells
KD_SETTINGS = ("distill_weight",)  # checked only by invocations with distillation (QAT or QC)


def check_settings(a, with_qc: bool, with_kd: bool = False) -> None:
    """Record the settings of the runs in an out dir; refuse a re-run into it with different ones."""
    path = Path(a.out) / "settings.json"
    keys = SETTINGS + (QC_SETTINGS if with_qc else ()) + (KD_SETTINGS if with_kd else ())
    now = {k: getattr(a, k) for k in keys}
    recorded = read_json(path) or {}
    # out dirs made before --target existed hold the paper's simulation: their cells are not ort runs
    before = {**recorded, "target": recorded.get("target", "sim")} if recorded else recorded
    flag = {"model": "--weights / --cfg"}
    diff = [f"{flag.get(k, '--' + k.replace('_', '-'))} {now[k]} (the runs there used {before[k]})"
            for k in keys if k in before and before[k] != now[k]]
    if diff:
        from yolo_qat.engine.cli_common import InputError

        raise InputError(f"{a.out} holds runs made with other settings: " + "; ".join(diff)
                         + ". Use another --name (or --project), or the same settings to resume.")
    if any(k not in recorded for k in keys):
        write_json(path, {**recorded, **now})


# -- FP -----------------------------------------------------------------------------------------
def ensure_fp(a, data: str) -> dict:
    """Train (or reuse) the one FP model all cells start from; validated once."""
    path = Path(a.out) / "fp.json"
    done = read_json(path)
    if done:
        print(f"[skip] FP model: {done['weights']} (box {100 * done['box']:.2f})")
        return done
    src = resolve_source(a.weights or a.cfg)
    t0 = time.time()
    if not src.is_checkpoint:
        shutil.rmtree(Path(a.out) / "runs" / "fp-fp", ignore_errors=True)
        fp = train_fp(src, data, **run_settings(a, "fp", fp_epochs=a.fp_epochs, seed=0, fp_optimizer=a.fp_optimizer,
                                                 fp_lr0=a.fp_lr0))
        src = resolve_source(str(fp.weights))
    res = {"weights": src.path, "task": src.task, "train_s": time.time() - t0,
           "fp_epochs": a.fp_epochs if not a.model.endswith(".pt") else 0,
           **evaluate(src.model, a, data, Path(a.out) / "val" / "fp")}
    write_json(path, res)
    return res


# -- QAT ----------------------------------------------------------------------------------------
def qat_budget(a, data: str) -> dict:
    spe = steps_per_epoch(data, a.batch)
    steps = spe * a.qat_epochs
    tau = a.ema_tau if a.ema_tau is not None else max(1.0, steps / 10)
    return {"steps_per_epoch": spe, "qat_steps": steps, "ema_tau": tau}


def read_results_csv(path: Path) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", None)} if rows else {}


def finished_before(path: Path, what: str) -> dict | None:
    """The saved result of a finished run (announced as skipped), or None: what makes re-runs resumable."""
    done = read_json(path)
    if done:
        print(f"[skip] {what}: finished before")
    return done


def ensure_qat(cell: Cell, a, data: str, fp: dict, budget: dict) -> dict:
    """Train (or reuse) the QAT run of a cell; record scale trajectories and write the diagnostics."""
    path = Path(a.out) / "cells" / f"qat-{cell.qat_key}.json"
    done = finished_before(path, f"QAT {cell.qat_key}")
    if done:
        return done
    from benchmarks.plots import ScaleRecorder

    run_dir = Path(a.out) / "runs" / cell.qat_key
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run would append to its csvs
    kd = {"distill": True, "teacher": fp["weights"], "distill_weight": a.distill_weight} if cell.distill else {}
    w_bits, a_bits = bit_widths(cell.bits)
    settings = run_settings(a, cell.qat_key, epochs=a.qat_epochs, w_bits=w_bits, a_bits=a_bits, target=a.target,
                            method=cell.method, ema_decay=cell.ema_decay, ema_tau=budget["ema_tau"], seed=cell.seed, **kd)
    rec = ScaleRecorder(window=a.diag_window)
    print(f"[run] QAT {cell.qat_key}: {budget['qat_steps']} optimizer steps planned, ema decay {cell.ema_decay:g}, "
          f"tau {budget['ema_tau']:g} steps" + (f", distilling from {fp['weights']} (weight {a.distill_weight:g})"
                                                if cell.distill else ""))
    t0 = time.time()
    run = train_qat(fp["weights"], data, callbacks={"on_train_batch_end": [rec.on_train_batch_end]}, **settings)
    secs = time.time() - t0
    trainer, save_dir = run.trainer, run.save_dir
    diag = rec.save(Path(a.out) / "diagnostics" / cell.qat_key, save_dir / "oscillations.csv")
    last = read_results_csv(save_dir / "results.csv")
    res = {"qat_key": cell.qat_key, "weights": str(save_dir / "weights" / "last.pt"), "train_s": secs,
           "optimizer_steps": int(trainer.qat_step), "ema_tau": budget["ema_tau"], "ema_decay": cell.ema_decay,
           "ema_a_final": last.get("qat/ema_a", 0.0), "osc_share": last.get("osc/share"),
           "osc_mean_freq": last.get("osc/mean_freq"), "frozen_share": last.get("osc/frozen"), "diagnostics": diag}
    if cell.distill:  # the last epoch's mean distillation loss per image (results.csv column train/kd)
        res["distill"] = {"teacher": fp["weights"], "weight": a.distill_weight,
                          "kd_loss_final": next((v for k, v in last.items() if k.startswith("train/kd")), None)}
    write_json(path, res)
    return res


# -- one cell -----------------------------------------------------------------------------------
def run_cell(cell: Cell, a, data: str, fp: dict, budget: dict) -> dict:
    path = Path(a.out) / "cells" / f"{cell.key}.json"
    done = finished_before(path, f"cell {cell.key}")
    if done:  # the same run may sit in another table (EMA 0.99 is also "a=0.99" of the decay sweep)
        # defaults: older cells (their bits were ints)
        return {"distill": False, "qc_mode": "labels", **done, "bits": str(done["bits"]), "column": cell.column}
    qat = ensure_qat(cell, a, data, fp, budget)
    res = {**asdict(cell), "key": cell.key, "qat": qat}
    t0 = time.time()
    if cell.qc is None:
        res.update(evaluate(qat["weights"], a, data, Path(a.out) / "val" / cell.key))
    else:
        res.update(run_qc_cell(cell, a, data, qat, fp))
    res["eval_s"] = time.time() - t0
    write_json(path, res)
    print(f"[done] cell {cell.key}: box {100 * res['box']:.2f}" +
          (f" mask {100 * res['mask']:.2f}" if res.get("mask") is not None else ""))
    return res


def run_qc_cell(cell: Cell, a, data: str, qat: dict, fp: dict) -> dict:
    from yolo_qat.engine.qc import run_qc
    from yolo_qat.models.checkpoint import load_checkpoint, save_checkpoint

    g, s, b = cell.qc
    model, _ = load_checkpoint(qat["weights"])
    work = Path(a.out) / "qc" / cell.key
    # The teacher is the FP model the QAT run started from; label-free QC sees only the images of the split.
    variant = {"labels": {"data": data},
               "kd": {"data": data, "teacher": fp["weights"], "distill_weight": a.distill_weight},
               "label-free": {"data": None, "source": str(unlabelled_source(a, data)), "teacher": fp["weights"],
                              "distill_weight": a.distill_weight}}[cell.qc_mode]
    model, rep = run_qc(model, calib_images=a.qc_calib_images, steps=a.qc_steps, lr=a.qc_lr, granularity=g,
                        scale=s, shift=b, imgsz=a.imgsz, batch=a.batch, seed=cell.seed, device=a.device, save_dir=work,
                        **variant)
    save_checkpoint(work / "qc.pt", model, qc={k: v for k, v in rep.items() if k != "history"})
    keep = ("steps", "calib_images", "loss_before", "loss_after", "distill")
    return {**evaluate(model, a, data, Path(a.out) / "val" / cell.key), "qc_steps": rep["steps"],
            "qc_report": {k: rep.get(k) for k in keep}}


# -- aggregation --------------------------------------------------------------------------------
def mean_spread(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def fmt(values: list[float]) -> str:
    m, s, n = mean_spread(values)
    return "-" if n == 0 else f"{100 * m:.1f} ± {100 * s:.1f}" if n > 1 else f"{100 * m:.1f}"


def group(results: list[dict], metric: str) -> dict:
    out: dict = {}
    for r in results:
        out.setdefault((r["bits"], r["column"]), []).append(r.get(metric))
    return out


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main_table(results, columns, a, fp, metric) -> str:
    g = group(results, metric)
    fpv = fp.get(metric)
    rows = [[a.model, "-" if fpv is None else f"{100 * fpv:.1f}", str(b)] + [fmt(g.get((b, c), [])) for c in columns]
            for b in a.bits]
    return markdown_table(["model", "FP", "bits", *columns], rows)


def variant_suffix(column: str) -> str | None:
    """The column suffix of a QC variant other than the labelled one, or None."""
    return next((sfx for v, (sfx, _) in QC_VARIANTS.items() if v != "labels" and column.endswith(sfx)), None)


def qc_variant_table(results, columns, a, fp, metric) -> str:
    """One row per method and bit width, one column per QC variant (and none): what the variants change."""
    g = group(results, metric)
    fpv = fp.get(metric)
    methods = [c for c in columns if "+QC" not in c]
    heads = [("none", "")] + [(QC_VARIANTS[v][0][1:], QC_VARIANTS[v][0]) for v in QC_VARIANTS
                              if v in (a.qc_variants or ())]
    rows = [[m, "-" if fpv is None else f"{100 * fpv:.1f}", str(b)] + [fmt(g.get((b, m + sfx), [])) for _, sfx in heads]
            for m in methods for b in a.bits]
    return markdown_table(["method", "FP", "bits", *[h for h, _ in heads]], rows)


def gap_lines(results, columns, a, fp, metrics) -> list[str]:
    """How much of the gap to FP distillation closes: EMA+KD* vs the EMA column of the same QC variant."""
    kd = LABELS["kd"]
    lines = []
    for m in metrics:
        if fp.get(m) is None:
            continue
        g = group(results, m)
        for b in a.bits:
            for c in columns:
                if not c.startswith(kd) or "EMA" + c[len(kd):] not in columns:
                    continue
                ref = "EMA" + c[len(kd):]
                gap_ref, gap_kd = mean_spread([fp[m] - v for v in g.get((b, ref), []) if v is not None]), \
                    mean_spread([fp[m] - v for v in g.get((b, c), []) if v is not None])
                diffs = paired(results, m, b, c, ref)
                if not gap_ref[2] or not gap_kd[2] or not diffs:
                    continue
                closed = statistics.fmean(diffs)
                share = f", {100 * closed / gap_ref[0]:.0f}% of it" if gap_ref[0] > 0 else ""
                lines.append(f"- {bits_label(b)} {m}: gap to FP {100 * gap_ref[0]:.2f} ± {100 * gap_ref[1]:.2f} ({ref}) -> "
                             f"{100 * gap_kd[0]:.2f} ± {100 * gap_kd[1]:.2f} ({c}): closed by {100 * closed:+.2f}"
                             + (f" ± {100 * statistics.stdev(diffs):.2f}" if len(diffs) > 1 else "")
                             + f" points paired over {len(diffs)} seed(s){share}")
    return lines


def qc_ablation_table(results, a, metric) -> str:
    g = group(results, metric)
    rows = []
    for b in a.bits:
        for gran in ("tensor", "channel"):
            rows.append([str(b), f"per-{gran}"] + [fmt(g.get((b, f"{gran}|{c}"), []))
                                                    for c in ("scale only", "shift only", "both")]
                        + [fmt(g.get((b, "no QC"), []))])
    return markdown_table(["bits", "QC granularity", "scale only", "shift only", "both", "no QC"], rows)


def verdict(a_vals, b_vals) -> tuple[float, str]:
    ma, sa, na = mean_spread(a_vals)
    mb, sb, nb = mean_spread(b_vals)
    d = ma - mb
    if min(na, nb) < 2:
        return d, "undetermined (fewer than 2 seeds)"
    if abs(d) < 2 * max(sa, sb):
        return d, "no measurable difference"
    return d, "better" if d > 0 else "worse"


def comparisons(columns: list[str]) -> list[tuple[str, str]]:
    pairs = [(c, c[:-3]) for c in columns if c.endswith("+QC") and c[:-3] in columns]
    for c in columns:  # a QC variant against the labelled QC and against no QC of the same QAT run
        sfx = variant_suffix(c)
        if sfx:
            pairs += [(c, ref) for ref in (c[:-len(sfx)] + "+QC", c[:-len(sfx)]) if ref in columns]
    base = [c for c in columns if c in ("LSQ", "no QC", "a=0")]
    if base:
        pairs += [(c, base[0]) for c in columns if c != base[0] and (c, base[0]) not in pairs
                  and not ("+QC" in c and base[0] != "no QC")]
    if "LSQ+QC" in columns:
        pairs += [(c, "LSQ+QC") for c in columns if c.endswith("+QC") and c != "LSQ+QC"]
    kd = LABELS["kd"]  # distillation against the EMA run it adds to, QC variant by QC variant
    pairs += [(c, "EMA" + c[len(kd):]) for c in columns if c.startswith(kd) and "EMA" + c[len(kd):] in columns]
    return list(dict.fromkeys(pairs))


def paired(results: list[dict], metric: str, bits: int, x: str, y: str) -> list[float]:
    """Per-seed differences x - y. Runs of one seed share the data order and calibration batches (and
    LSQ and EMA runs the very same training trajectory), so pairing removes most seed-to-seed noise."""
    by = {(r["column"], r["seed"]): r.get(metric) for r in results if r["bits"] == bits}
    seeds = sorted({sd for (c, sd) in by if c == x} & {sd for (c, sd) in by if c == y})
    return [by[(x, sd)] - by[(y, sd)] for sd in seeds if by[(x, sd)] is not None and by[(y, sd)] is not None]


def paired_verdict(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return "undetermined (fewer than 2 seeds)"
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    wins = sum(d > 0 for d in diffs)
    tag = "no measurable difference" if abs(m) < 2 * sd else ("better" if m > 0 else "worse")
    return f"paired {100 * m:+.2f} ± {100 * sd:.2f} ({wins}/{len(diffs)} seeds higher) -> {tag}"


def verdict_lines(results, columns, a, metrics) -> list[str]:
    lines = []
    for m in metrics:
        g = group(results, m)
        for b in a.bits:
            for x, y in comparisons(columns):
                d, v = verdict(g.get((b, x), []), g.get((b, y), []))
                if not math.isnan(d):
                    lines.append(f"- {bits_label(b)} {m}: {x} vs {y}: {100 * d:+.2f} points -> {v}; "
                                 f"{paired_verdict(paired(results, m, b, x, y))}")
    return lines


def time_summary(results: list[dict], fp: dict, wall_s: float | None = None) -> str:
    """Compute time by stage, summed from the cells' records (so it covers resumed invocations too)."""
    qat = {r["qat"]["qat_key"]: r["qat"].get("train_s", 0.0) for r in results}
    qc_eval = sum(r.get("eval_s", 0.0) for r in results if r.get("qc"))
    plain_eval = sum(r.get("eval_s", 0.0) for r in results if not r.get("qc"))
    total = fp.get("train_s", 0.0) + sum(qat.values()) + qc_eval + plain_eval
    text = (f"Compute time: FP {fp.get('train_s', 0.0) / 60:.1f} min, {len(qat)} QAT runs "
            f"{sum(qat.values()) / 60:.1f} min, QC + evaluation {qc_eval / 60:.1f} min, evaluation without QC "
            f"{plain_eval / 60:.1f} min; total {total / 60:.1f} min")
    return text + (f" (this invocation: {wall_s / 60:.1f} min wall)." if wall_s is not None else ".")


def diagnostics_table(results: list[dict]) -> str:
    runs = {r["qat"]["qat_key"]: r for r in results}
    rows = []
    for key, r in sorted(runs.items()):
        q, d = r["qat"], r["qat"]["diagnostics"]
        qc = [x.get("qc_steps") for x in results if x["qat"]["qat_key"] == key and x.get("qc_steps") is not None]
        rows.append([key, str(q["optimizer_steps"]), f"{q['ema_tau']:g}", f"{q['ema_a_final']:.4f}",
                     f"{100 * (q['osc_share'] or 0):.2f}", f"{d.get('raw_weight_scale_flip_rate', float('nan')):.2f}",
                     f"{d.get('ema_weight_scale_flip_rate', float('nan')):.2f}",
                     f"{100 * d.get('raw_weight_scale_rel_std', float('nan')):.2f}",
                     f"{100 * d.get('ema_weight_scale_rel_std', float('nan')):.2f}",
                     str(qc[0]) if qc else "-", f"{q['train_s']:.0f}"])
    head = ["QAT run", "opt. steps", "EMA tau", "final a", "osc. weights %", "w-scale flip rate raw",
            "w-scale flip rate EMA", "w-scale rel.std % raw", "w-scale rel.std % EMA", "QC steps", "QAT s"]
    return markdown_table(head, rows)


def report(results, cells, a, fp, wall_s: float | None = None) -> str:
    columns = list(dict.fromkeys(c.column for c in cells))
    metrics = ["box"] + (["mask"] if fp.get("mask") is not None else [])
    variants = [c for c in columns if variant_suffix(c)]
    fp_from = f"FP from {a.weights}" if a.weights else f"FP {a.fp_epochs} ep"  # --weights: no FP training here
    parts = [f"Dataset {a.data or 'embedded default'}, imgsz {a.imgsz}, batch {a.batch}, {fp_from}, "
             f"QAT {a.qat_epochs} ep, seeds {a.seeds}; mAP50-95 (pycocotools, %), mean ± sample std over seeds."]
    if any(c.distill or c.qc_mode != "labels" for c in cells):
        parts.append(f"{LABELS['kd']}: LSQ + EMA + distillation from the FP model (weight {a.distill_weight:g}). QC "
                     f"variants: QC = labels (detection loss), QC(KD) = detection + distillation loss, QC(KD, no "
                     f"labels) = distillation alone on the training images without labels (<out>/unlabelled).")
    for m in metrics:
        parts.append(f"\n### {m} mAP50-95")
        if a.ablation == "qc":
            parts.append(qc_ablation_table(results, a, m))
        else:
            parts.append(main_table(results, [c for c in columns if c not in variants], a, fp, m))
            if variants:
                parts.append(f"\nQC variants, {m} mAP50-95:\n")
                parts.append(qc_variant_table(results, columns, a, fp, m))
    lines = verdict_lines(results, columns, a, metrics)
    parts.append("\nVerdicts (difference of means; 'no measurable difference' when |diff| < 2 x the larger spread; "
                 "then the same rule on the per-seed paired differences: mean ± std):")
    parts += lines or ["- none (missing cells)"]
    gaps = gap_lines(results, columns, a, fp, metrics)
    if gaps:
        parts.append("\nGap to FP (FP - mAP, mean ± std over seeds) with and without distillation:")
        parts += gaps
    parts.append("\n### QAT runs: budgets and oscillation diagnostics")
    parts.append(diagnostics_table(results))
    parts.append("\n" + time_summary(results, fp, wall_s))
    return "\n".join(parts)


def output_names(a) -> dict[str, str]:
    """File names of one invocation: the ablations share the out dir (and its runs) with the main table
    without overwriting it."""
    suffix = f"-{a.ablation}" if a.ablation else ""
    return {"table_md": f"table{suffix}.md", "table_png": f"table{suffix}.png",
            "summary_json": f"summary{suffix}.json", "summary_csv": f"summary{suffix}.csv"}


def write_outputs(results: list[dict], text: str, out: Path, names: dict[str, str]) -> None:
    write_json(out / names["summary_json"], {"cells": results})
    fields = ["key", "bits", "method", "ema_decay", "distill", "seed", "column", "qc_key", "qc_mode", "box", "mask",
              "qc_steps",
              "optimizer_steps", "ema_tau", "osc_share", "raw_weight_scale_flip_rate", "ema_weight_scale_flip_rate",
              "raw_act_scale_flip_rate", "ema_act_scale_flip_rate"]
    tmp = out / "summary.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            q = r["qat"]
            row = {**r, **{k: q.get(k) for k in ("optimizer_steps", "ema_tau", "osc_share")}, **q["diagnostics"],
                   "qc_key": Cell(r["bits"], r["method"], r["ema_decay"], r["seed"], r["column"],
                                  tuple(r["qc"]) if r["qc"] else None, r.get("distill", False),
                                  r.get("qc_mode", "labels")).qc_key}
            w.writerow({k: row.get(k) for k in fields})
    os.replace(tmp, out / names["summary_csv"])
    (out / names["table_md"]).write_text(text + "\n")


# -- command line -------------------------------------------------------------------------------
PROG = "reproduce.py"


def build_parser() -> argparse.ArgumentParser:
    from yolo_qat.engine.cli_common import add_shared
    from yolo_qat.engine.config import QATConfig, QCConfig
    from yolo_qat.engine.settings import add_fields, mapping

    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    add_shared(ap, PROG, project="runs/reproduce", imgsz=128, exist_ok=True, weights_required=False,
               weights_help="FP checkpoint every cell starts from (default: trained here from --cfg)")
    a("--cfg", default="yolov5nu-seg", help="model yaml / short name of the FP model trained here (no --weights)")
    a("--bits", type=bits_token, nargs="+", default=["4"],
      help="bit widths, one table row each: N (WnAn: 4, 3) or NaM (WnAm: 4a8, the deployable 4-bit model)")
    a("--target", default="sim", choices=("sim", "ort", "npu", "tensorrt"),
      help="deploy target every QAT run simulates (train_qat.py --target): sim (the paper's), or what a runtime's "
           "integer kernels run: ort (onnxruntime), npu, tensorrt (8-bit activations: --bits 4a8); quant/targets.py")
    a("--methods", nargs="+", default=["lsq", "ema"], choices=list(LABELS))
    a("--qc", action=argparse.BooleanOptionalAction, default=False, help="also evaluate every method after QC")
    a("--qc-variants", nargs="+", choices=list(QC_VARIANTS),
      help="QC variants of --qc (default: labels): labels (the paper's QC), kd (labels + distillation from the FP "
           "model), label-free (distillation alone, on the training images without labels)")
    a("--distill-weight", type=float, default=QATConfig.distill_weight,
      help="weight of the distillation term of method kd and of the kd / label-free QC variants (train_qat.py's "
           "--distill-weight)")
    a("--ema", action=argparse.BooleanOptionalAction, default=False, help="run lsq / dampen / freeze with the EMA too")
    a("--ema-decay", type=float, default=0.99, help="max EMA decay (0.9999 in the paper's COCO-length runs)")
    a("--ema-tau", type=float, help="EMA warm-up in optimizer steps (default: a tenth of the QAT run)")
    a("--decays", type=float, nargs="+", default=list(DECAYS), help="decays of --ablation ema-decay")
    a("--ablation", choices=["qc", "ema-decay"])
    a("--fp-epochs", type=int, default=15)
    # Short FP runs learn far more with AdamW at 4e-3 than with optimizer=auto (see engine/train_flags.py DEMO).
    a("--fp-optimizer", default="AdamW", help="optimizer of the FP stage (Ultralytics names)")
    a("--fp-lr0", type=float, default=0.004, help="initial learning rate of the FP stage")
    a("--qat-epochs", type=int, default=4)
    a("--seeds", type=int, nargs="+", default=[0, 1])
    # correct_qc.py's --steps, --calib-images, --lr, for the QC cells (default: one pass over all training images)
    add_fields(ap.add_argument_group("QC of the +QC cells (correct_qc.py's flags of the same name)"), QCConfig,
               prefix="qc", only=("steps", "calib_images", "lr"))
    a("--lr0", type=float, default=0.002, help="train_qat.py's --lr0")
    a("--loss-hyp", type=mapping, default=None,
      help="original anchor-based models only: train_qat.py's --loss-hyp (YOLOv5 loss settings before its scaling "
           "by imgsz, e.g. '{obj: 25}' at imgsz 128), for the FP and the QAT stage")
    a("--warmup-epochs", type=float, default=0.0)
    a("--calib-batches", type=int, default=4)
    a("--workers", type=int, default=0)
    a("--diag-window", type=int, default=200, help="scale trajectories kept: the last N optimizer steps")
    return ap


def cells_for(a) -> list[Cell]:
    if a.ablation == "qc":
        return qc_ablation_cells(a)
    if a.ablation == "ema-decay":
        return decay_ablation_cells(a)
    return main_cells(a)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from yolo_qat.engine.data_download import allowing_downloads
    from yolo_qat.models.safe_load import trusting

    with trusting(a.trust_checkpoint), allowing_downloads(a.download):  # --trust-checkpoint, --download
        return reproduce(a)


def reproduce(a: argparse.Namespace) -> int:
    t_start = time.time()
    from yolo_qat.engine.calib import resolve_data
    from yolo_qat.engine.cli_common import InputError, input_error, output_dir
    from yolo_qat.engine.data_download import check_dataset

    a.model = a.weights or a.cfg  # the FP model's name in the tables and settings.json
    try:
        if a.qc_variants and not a.qc:
            raise InputError(f"--qc-variants {' '.join(a.qc_variants)} names variants of QC, which is off: add --qc")
        if a.distill_weight < 0:
            raise InputError(f"--distill-weight {a.distill_weight:g} is invalid: give a weight >= 0")
        a.qc_variants = list(dict.fromkeys(a.qc_variants or ["labels"]))
        if a.weights and str(a.weights).endswith(".pt"):  # an unsafe checkpoint is refused before any run starts
            resolve_source(a.weights)
        if a.loss_hyp:
            check_loss_hyp(a, resolve_source(a.weights or a.cfg))
        data = resolve_data(a.data)
        check_dataset(data)  # a missing split (and no --download) ends the run here, before any stage
        out = a.out = output_dir(a)
        out.mkdir(parents=True, exist_ok=True)
        cells = cells_for(a)
        check_settings(a, with_qc=any(c.qc is not None for c in cells),
                       with_kd=any(c.distill or c.qc_mode != "labels" for c in cells))
    except (InputError, FileNotFoundError) as e:
        return input_error(PROG, e)
    fp = ensure_fp(a, data)
    budget = qat_budget(a, data)
    print(f"[plan] {len(cells)} cells; QAT: {budget['steps_per_epoch']} optimizer steps/epoch x {a.qat_epochs} "
          f"epochs = {budget['qat_steps']} steps per run; EMA tau {budget['ema_tau']:g} steps; QC budget "
          f"{a.qc_steps if a.qc_steps is not None else 'one pass over the calibration set'}")
    results, failed = [], []
    for c in cells:
        try:
            results.append(run_cell(c, a, data, fp, budget))
        except (AssertionError, RuntimeError, ValueError, FloatingPointError) as e:  # no json: a re-run retries
            print(f"[fail] cell {c.key}: {type(e).__name__}: {e}")
            failed.append(f"{c.key}: {type(e).__name__}: {str(e).splitlines()[0]}")
    text = report(results, cells, a, fp, wall_s=time.time() - t_start)
    names = output_names(a)
    plotted = a.ablation != "qc" and bool(results)  # the QC ablation is a table of variants, not bars
    if plotted:
        from benchmarks.plots import plot_results_table

        plot_results_table(results, list(dict.fromkeys(c.column for c in cells)), a.bits,
                           ["box"] + (["mask"] if fp.get("mask") is not None else []), fp, out / names["table_png"])
    if failed:
        text += "\n\nFailed cells (no result written; a re-run retries them):\n" + "\n".join(f"- {f}" for f in failed)
    write_outputs(results, text, out, names)
    print("\n" + text)
    written = ("table_md", "summary_json", "summary_csv") + (("table_png",) if plotted else ())
    print("\nWritten: " + ", ".join(str(out / names[k]) for k in written)
          + f", {out / 'diagnostics'}/*/*.png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
