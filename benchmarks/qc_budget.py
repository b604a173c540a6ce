"""QC's budget at small scale: on the QAT runs of a reproduce.py out dir, QC at several (steps, lr)
points, and the control a reader asks for: the same checkpoint trained by QAT for about as many extra optimizer
steps instead of QC. Box and mask mAP50-95 (pycocotools), per seed and paired against the run without QC.

    python benchmarks/reproduce.py --cfg yolov5nu-seg --bits 4 3 --methods ema --qc --qc-steps 185 --qc-lr 1e-3 \
        --fp-epochs 15 --qat-epochs 4 --seeds 0 1 --imgsz 128 --batch 16 --project runs/qc-budget --name base
    python benchmarks/qc_budget.py --out runs/qc-budget/base --points 185:1e-3 16:1e-4 185:1e-2 185:1e-4 \
        --control-epochs 12

The paper's QC is one COCO epoch: 1,849 Adam steps at lr 1e-4 (lr x steps = 0.185, the most a correction can move
in Adam's units). Each point's results are cached in <out>/qc-budget/*.json: a re-run computes only what is missing,
so seeds (reproduce.py --seeds 0 1 2 into the same out dir) and points can be added later. --cached-points are
tabulated for the seeds that have them cached and never computed (points measured on some seeds only). Each row
gives mean (min..max) over its seeds and the paired difference to the same seed's run without QC; a second table
gives every seed's values.
The control continues QAT from the QAT run's saved (EMA) model with its settings (SGD lr0, scales Adam, EMA), for
--control-epochs epochs (one optimizer step per batch; validated once, at the end), and is evaluated as the QAT
cells are (weights/last.pt).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import reproduce as rep  # noqa: E402


def qat_runs(out: Path) -> list[dict]:
    runs = []
    for p in sorted((out / "cells").glob("qat-*.json")):
        q = json.loads(p.read_text())
        key = q["qat_key"]  # w4-lsq-ema0.99-s0
        noqc = rep.read_json(out / "cells" / f"{key}--noqc.json")
        if noqc is None:
            continue
        bits = int(key[1:key.index("-")])
        seed = int(key.rsplit("-s", 1)[1])
        runs.append({"key": key, "bits": bits, "seed": seed, "qat": q, "noqc": noqc})
    return runs


def settings_namespace(out: Path, device: str) -> argparse.Namespace:
    s = json.loads((out / "settings.json").read_text())
    return argparse.Namespace(**{"loss_hyp": None, "target": "sim", **s, "out": out, "device": device, "workers": 0})


def qc_point(run: dict, steps: int, lr: float, a, data: str, reuse: bool = True, compute: bool = True) -> dict | None:
    """QC at one (steps, lr) on the run's model: cached, reproduce.py's own +QC cell, or (``compute``) run now."""
    path = Path(a.out) / "qc-budget" / f"{run['key']}--qc{steps}x{lr:g}.json"
    done = rep.read_json(path)
    if done:
        return done
    if reuse and (steps, lr) == (a.qc_steps, a.qc_lr):  # reproduce.py's own +QC cell (per-channel scale and shift)
        cell = rep.read_json(Path(a.out) / "cells" / f"{run['key']}--qc-channel-both.json")
        if cell is not None:
            return {"steps": cell["qc_steps"], "lr": lr, **{k: cell[k] for k in ("box", "mask")},
                    **{k: cell["qc_report"].get(k) for k in ("loss_before", "loss_after")}}
    if not compute:
        return None
    from yolo_qat.engine.qc import run_qc
    from yolo_qat.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(run["qat"]["weights"])
    t0 = time.time()
    model, report = run_qc(model, data=data, steps=steps, lr=lr, imgsz=a.imgsz, batch=a.batch, seed=run["seed"],
                           device=a.device, save_dir=Path(a.out) / "qc-budget" / "work")
    res = {"steps": report["steps"], "lr": lr, "loss_before": report.get("loss_before"),
           "loss_after": report.get("loss_after"), "qc_s": time.time() - t0,
           **rep.evaluate(model, a, data, Path(a.out) / "val" / path.stem)}
    rep.write_json(path, res)
    return res


def control(run: dict, epochs: int, a, data: str) -> dict:
    """QAT continued from the QAT run's saved model (the EMA, as QC starts from) for ``epochs`` more epochs."""
    name = f"{run['key']}--qat+{epochs}ep"
    path = Path(a.out) / "qc-budget" / f"{name}.json"
    done = rep.read_json(path)
    if done:
        return done
    q = run["qat"]
    steps = rep.steps_per_epoch(data, a.batch) * epochs
    settings = rep.run_settings(a, name, epochs=epochs, w_bits=run["bits"], a_bits=run["bits"], method="lsq",
                                ema_decay=q["ema_decay"], ema_tau=max(1.0, steps / 10), seed=run["seed"])
    t0 = time.time()
    qat = rep.train_qat(q["weights"], data, **settings)
    res = {"steps": int(qat.trainer.qat_step), "epochs": epochs, "train_s": time.time() - t0,
           **rep.evaluate(str(qat.last), a, data, Path(a.out) / "val" / name)}
    rep.write_json(path, res)
    return res


def pct(v: float, sign: bool = False) -> str:
    return f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}"


def span(vals: list[float], sign: bool = False) -> str:
    """mean (min..max) in points; the mean alone for one value."""
    if not vals:
        return "-"
    m = pct(statistics.fmean(vals), sign)
    return f"{m} ({pct(min(vals), sign)}..{pct(max(vals), sign)})" if len(vals) > 1 else m


def paired(diffs: list[float]) -> str:
    """mean (min..max) of the per-seed differences, and how many seeds were higher."""
    if not diffs:
        return "-"
    wins = f", {sum(d > 0 for d in diffs)}/{len(diffs)} up" if len(diffs) > 1 else ""
    return span(diffs, sign=True) + wins


def table(rows: dict, metrics: list[str]) -> str:
    """rows: (bits, label, lr x steps) -> list of (seed, {metric: value}, {metric: no-QC value}); one line a row:
    mean (min..max) over its seeds, and the paired difference to the same seed's run without QC."""
    head = ["bits", "what", "lr x steps", "seeds"] + [f"{m} mAP50-95" for m in metrics] + [
        f"{m} - no QC (paired)" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (bits, label, budget), vals in rows.items():
        cells = [str(bits), label, budget, " ".join(str(sd) for sd in sorted({sd for sd, _, _ in vals}))]
        cells += [span([v[m] for _, v, _ in vals if v.get(m) is not None]) for m in metrics]
        cells += ["-" if label == "no QC" else paired([v[m] - b[m] for _, v, b in vals if v.get(m) is not None])
                  for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table(rows: dict, metrics: list[str]) -> str:
    """Every seed's values: 'box / mask (box - no QC / mask - no QC)' per row and seed."""
    seeds = sorted({sd for vals in rows.values() for sd, _, _ in vals})
    head = ["bits", "what", "lr x steps"] + [f"seed {sd}" for sd in seeds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (bits, label, budget), vals in rows.items():
        by = {sd: (v, b) for sd, v, b in vals}
        cells = [str(bits), label, budget]
        for sd in seeds:
            if sd not in by:
                cells.append("-")
                continue
            v, b = by[sd]
            ms = [m for m in metrics if v.get(m) is not None]
            cell = " / ".join(pct(v[m]) for m in ms)
            if label != "no QC":
                cell += " (" + " / ".join(pct(v[m] - b[m], sign=True) for m in ms) + ")"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a reproduce.py out dir with QAT runs (cells/qat-*.json)")
    ap.add_argument("--points", nargs="+", default=["185:1e-3", "16:1e-4", "185:1e-2", "185:1e-4"],
                    help="QC budgets STEPS:LR, in the order computed (the control comes after the first)")
    ap.add_argument("--cached-points", nargs="*", default=[],
                    help="more budgets STEPS:LR, tabulated for the seeds that have them cached, never computed")
    ap.add_argument("--control-epochs", type=int, default=12, help="extra QAT epochs of the control (0: none)")
    ap.add_argument("--qc-after-control", action=argparse.BooleanOptionalAction, default=True,
                    help="also QC (the first point) on the control's longer-trained model")
    ap.add_argument("--device", default="cpu")
    a_ = ap.parse_args(argv)
    out = Path(a_.out)
    a = settings_namespace(out, a_.device)
    from yolo_qat.engine.calib import resolve_data

    data = resolve_data(a.data)
    parse = lambda p: (int(p.split(":")[0]), float(p.split(":")[1]))  # noqa: E731
    points = [(*parse(p), True) for p in a_.points] + [(*parse(p), False) for p in a_.cached_points]
    runs = qat_runs(out)
    rows: dict = {}
    for r in sorted(runs, key=lambda r: (r["seed"], -r["bits"])):  # seed-major: a stopped run has both widths
        base = {"box": r["noqc"]["box"], "mask": r["noqc"].get("mask")}
        rows.setdefault((r["bits"], "no QC", "0"), []).append((r["seed"], base, base))
        for i, (steps, lr, compute) in enumerate(points):
            res = qc_point(r, steps, lr, a, data, compute=compute)
            if res is None:  # a --cached-points budget this seed lacks
                continue
            rows.setdefault((r["bits"], f"QC {steps} steps x lr {lr:g}", f"{steps * lr:.3g}"), []).append(
                (r["seed"], res, base))
            if i == 0 and a_.control_epochs:  # right after the first point: what the control is compared with
                res = control(r, a_.control_epochs, a, data)
                rows.setdefault((r["bits"], f"QAT +{res['steps']} steps, no QC", "-"), []).append(
                    (r["seed"], res, base))
                if a_.qc_after_control:  # QC (the first point) after the longer QAT: does it still add?
                    name = f"{r['key']}--qat+{a_.control_epochs}ep"
                    longer = {**r, "key": name, "qat": {"weights": str(out / "runs" / name / "weights" / "last.pt")}}
                    res = qc_point(longer, steps, lr, a, data, reuse=False)
                    rows.setdefault((r["bits"], f"QAT +{a_.control_epochs}ep, then QC {steps} x {lr:g}",
                                     f"{steps * lr:.3g}"), []).append((r["seed"], res, base))
    metrics = ["box"] + (["mask"] if any(v.get("mask") is not None for vs in rows.values() for _, v, _ in vs) else [])
    rows = dict(sorted(rows.items(), key=lambda kv: -kv[0][0]))
    text = ("mAP50-95 (pycocotools, %): mean (min..max) over seeds; paired: the same seed's run without QC\n\n"
            f"{table(rows, metrics)}\n\nPer seed: box / mask (- no QC)\n\n{seed_table(rows, metrics)}")
    (out / "qc-budget.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
