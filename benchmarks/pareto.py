"""The Pareto front of one FP checkpoint: mAP against weight size and against bit-ops for uniform bit widths, for
mixed_precision.py's allocations at several budgets, each after the same short QAT (+QC), and for the peers a user
would pick instead, all scored by val.py on the exported file where there is one.

Points (``--points``; every one of ours trains ``--epochs`` from ``--weights`` through benchmarks/integer_qat.py's
rows: train_qat.py with the same SGD ``--lr0`` / ``--warmup-epochs`` / ``--qat-args`` and per-channel weights for
``--target``; then correct_qc.py when ``--qc-steps`` > 0, export.py and val.py --no-rect on the checkpoint and its ONNX):

- ``WxAy``: uniform widths (first and last layers at 8 bits, the project's default), e.g. ``W4A8``;
- ``alloc@WxAy``: the allocation (mixed_precision.py, loss proxy, widths ``--w-bits-choices``) whose weights cost at
  most what uniform ``WxAy``'s do in ``--cost`` accounting (equal weight bytes);
- ``alloc:B``: the allocation under an average of B weight bits;
- peers, once per seed where they train: ``fp`` (the FP checkpoint as given), ``ort-ptq`` (onnxruntime's static INT8
  PTQ of Ultralytics' FP ONNX, benchmarks/deploy_speed.py's), ``ultra-int8`` (``YOLO(fp).export(format="onnx",
  quantize=8)``), ``ultra-qat8`` (``train(quantize=8)``, NVIDIA ModelOpt: skipped with a note where it cannot be
  imported). A peer whose file cannot be made is kept as a row saying why.

The per-layer sensitivity is measured once (``--sensitivity``, else mixed_precision.py runs into ``<out>/sensitivity``).
Each finished point is one JSON under ``<out>/points/`` and is skipped on a rerun (delete it to redo the point; the
training folders are kept too); the table and plot show every point stored there, so a later invocation with more
points or seeds adds to the same front. Sizes are read from each trained checkpoint's own widths: weight bytes of the
quantized convs as packed codes (``export.py --format packed``) and in the target's runtime containers, average
weight bits, bit-ops per image at ``--imgsz`` (MACs x weight bits x activation bits, nominal: the papers' accounting).

    python benchmarks/pareto.py --weights fp.pt --data d.yaml --imgsz 256 --epochs 3 --lr0 0.002 --seeds 0 1 2 \\
        --points W8A8 W4A8 W4A4 W3A3 alloc@W4A8 alloc@W3A3 --peers fp ort-ptq ultra-int8 ultra-qat8 --out runs/pareto

Writes ``<out>/pareto.md`` (the table and allocated-vs-uniform comparisons), ``<out>/points.csv`` (one row per point
and seed) and ``<out>/pareto.png`` (mAP against weight bytes and against bit-ops).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import integer_qat  # noqa: E402
from benchmarks.pipeline_matrix import run_qc  # noqa: E402

PROG = "pareto.py"
PEERS = ("fp", "ort-ptq", "ultra-int8", "ultra-qat8")
UNIFORM = re.compile(r"W([2-8])A([2-8])")
MATCHED = re.compile(r"alloc@(W[2-8]A[2-8])")
BITS = re.compile(r"alloc:(\d+(?:\.\d+)?)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="yaml whose keys are any of these flags with '_'; the command line overrides it")
    p.add_argument("--weights", required=True, help="the FP checkpoint every point starts from")
    p.add_argument("--data", required=True, help="dataset yaml")
    p.add_argument("--imgsz", type=int, required=True, help="the model's own image size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3, help="QAT epochs of every trained point")
    p.add_argument("--lr0", type=float, default=0.002, help="SGD lr of the weights, every trained point")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--warmup-bias-lr", type=float, default=0.1)
    p.add_argument("--qat-args", default="", help="more train_qat.py flags for every point of ours, one string")
    p.add_argument("--qc-steps", type=int, default=20, help="correct_qc.py steps after QAT (0: no QC)")
    p.add_argument("--qc-images", type=int, default=128)
    p.add_argument("--target", default="ort", help="deploy target of our points (quant/targets.py)")
    p.add_argument("--cost", default="packed", choices=("runtime", "onnx", "packed"),
                   help="weight accounting of the allocation budgets (quant/costs.py)")
    p.add_argument("--w-bits-choices", type=int, nargs="+", default=[8, 4, 3],
                   help="weight widths an allocation may use (measured ones outside are dropped)")
    p.add_argument("--sensitivity", help="sensitivity.json of mixed_precision.py for --weights and --target "
                                         "(default: measured once into <out>/sensitivity)")
    p.add_argument("--points", nargs="+", default=["W8A8", "W4A8", "W4A4", "W3A3", "alloc@W4A8", "alloc@W3A3"],
                   help="WxAy, alloc@WxAy, alloc:BITS")
    p.add_argument("--peers", nargs="*", default=list(PEERS), help=f"any of {PEERS}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--calib-images", type=int, default=32, help="ort-ptq calibration images (training split)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/pareto")
    p.add_argument("--time-repeats", type=int, default=20,
                   help="time every point's file (one seed's) beside the FP ONNX with benchmarks/deploy_speed.py, "
                        "this many interleaved rounds, 1 thread, batch 1 (0: no timing)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    from yolo_qat.engine.settings import parse_with_config

    opt = parse_with_config(build_parser(), argv)
    for spec in opt.points:
        if not (UNIFORM.fullmatch(spec) or MATCHED.fullmatch(spec) or BITS.fullmatch(spec)):
            raise SystemExit(f"{PROG}: error: --points {spec!r}: expected WxAy, alloc@WxAy or alloc:BITS")
    bad = [p for p in opt.peers if p not in PEERS]
    if bad:
        raise SystemExit(f"{PROG}: error: --peers {bad}: allowed values are {PEERS}")
    return opt


# ---------------------------------------------------------------------------------------------- costs

def conv_costs(model, imgsz: int, target: str) -> dict:
    """Weight bytes (packed codes and the target's runtime containers), average weight bits and nominal bit-ops of a
    quantized model's convs, from its own widths."""
    from yolo_qat.engine.sensitivity import layer_geometry
    from yolo_qat.quant import layer_bits
    from yolo_qat.quant.costs import COST_KINDS, weight_cost

    geo, bits = layer_geometry(model, imgsz), layer_bits(model)
    params = sum(g.params for g in geo.values())
    total = {k: sum(weight_cost(target, g, bits[n][0], k) for n, g in geo.items()) for k in COST_KINDS}
    return {**{f"{k}_bytes": v / 8 for k, v in total.items()}, "avg_w_bits": total["packed"] / params, "bitops": sum(g.macs * w * a for n, g in geo.items() for w, a in [bits[n]]),
            "params": params}


def recipe_costs(fp_path, recipe: dict, imgsz: int, target: str) -> dict:
    """``conv_costs`` of the FP checkpoint quantized with ``recipe`` (no calibration: widths only)."""
    from yolo_qat.engine.validate import load_model
    from yolo_qat.quant import quantize_model

    model, _ = load_model(fp_path)
    return conv_costs(quantize_model(model, recipe), imgsz, target)


def checkpoint_costs(path, imgsz: int, target: str) -> dict:
    from yolo_qat.engine.validate import load_model

    model, _ = load_model(path)
    return conv_costs(model, imgsz, target)


def fp_costs(fp_path, imgsz: int, target: str, bits: int) -> dict:
    """Every conv at ``bits`` weights and activations (the INT8 peers quantize all of them; the FP model at 32)."""
    c = recipe_costs(fp_path, {"w_bits": 8, "a_bits": 8, "first_last_bits": None, "per_channel": True}, imgsz, target)
    scale = bits / 8
    return {**{k: c["packed_bytes"] * scale for k in ("packed_bytes", "runtime_bytes", "onnx_bytes")},
            "avg_w_bits": float(bits), "bitops": c["bitops"] * scale * scale, "params": c["params"]}


def uniform_recipe(spec: str, target: str) -> dict:
    w, a = (int(x) for x in UNIFORM.fullmatch(spec).groups())
    return {"w_bits": w, "a_bits": a, "first_last_bits": 8, "per_channel": True, "target": target}


def uniform_flags(spec: str, target: str) -> str:
    r = uniform_recipe(spec, target)
    return f"--w-bits {r['w_bits']} --a-bits {r['a_bits']} --per-channel --target {target}"


# ---------------------------------------------------------------------------------------------- allocation

def sensitivity_report(opt, out: Path) -> dict:
    """The measurement (made once)."""
    path = Path(opt.sensitivity) if opt.sensitivity else out / "sensitivity/sensitivity.json"
    if not path.is_file():
        if opt.sensitivity:
            raise SystemExit(f"{PROG}: error: --sensitivity '{path}' does not exist")
        integer_qat.run([sys.executable, str(ROOT / "mixed_precision.py"), "--weights", opt.weights, "--data",
                         opt.data, "--imgsz", str(opt.imgsz), "--target", opt.target, "--per-channel",
                         "--w-bits-choices", *map(str, opt.w_bits_choices), "--cost", opt.cost, "--budget-bits", "8",
                         "--project", str(out), "--name", "sensitivity", "--exist-ok"], out / "sensitivity.log")
    report = json.loads(path.read_text())
    if report["recipe"]["target"] != opt.target:
        raise SystemExit(f"{PROG}: error: {path} was measured for target '{report['recipe']['target']}', the sweep "
                         f"is for '{opt.target}'")
    return report


def restricted(report: dict, w_bits: list[int]) -> dict:
    """``report`` with only the measured widths whose weight bits are in ``w_bits``."""
    keep = {str(w) for w in w_bits}
    return {**report, "layers": [{**layer, "sensitivity": {
        k: v for k, v in layer["sensitivity"].items() if re.fullmatch(r"w(\d)a\d", k, re.I).group(1) in keep}}
        for layer in report["layers"]]}


def allocated_recipe(opt, spec: str, report: dict, out: Path) -> Path:
    """Write the allocation of ``spec`` as a train_qat.py --config recipe (the same file on every seed)."""
    from yolo_qat.engine.sensitivity import MixedPrecisionConfig, allocate_report, write_recipe

    path = out / "recipes" / f"{slug(spec)}.yaml"
    if path.is_file():
        return path
    m = MATCHED.fullmatch(spec)
    if m:
        budget = {"budget_bytes": recipe_costs(opt.weights, uniform_recipe(m.group(1), opt.target), opt.imgsz,
                                               opt.target)[f"{opt.cost}_bytes"]}
    else:
        budget = {"budget_bits": float(BITS.fullmatch(spec).group(1))}
    # integer widths only: a point's sizes are read from its quantized convs (recipe_costs)
    cfg = MixedPrecisionConfig(**{**report.get("config", {}), "budget_bytes": None, "budget_bits": None,
                                  "budget_bitops": None, "cost": opt.cost, "proxy": "loss", "keep_float": False,
                                  **budget})
    report = restricted(report, opt.w_bits_choices)
    return write_recipe(path, report, allocate_report(report, cfg), cfg)


# ---------------------------------------------------------------------------------------------- points

def train_opt(opt, seed: int) -> argparse.Namespace:
    """integer_qat.py's options for one seed (its rows train and score our points)."""
    return argparse.Namespace(**{**vars(opt), "seed": seed})


def our_point(opt, name: str, flags: str, seed: int, out: Path) -> dict:
    """QAT -> (QC) -> export -> val.py for one point and seed."""
    o = train_opt(opt, seed)
    d = out / f"seed-{seed}"
    run_dir = integer_qat.train_row(o, slug(name), f"{flags} {opt.qat_args}", d)
    ckpt, row = run_dir / "weights/best.pt", {}
    if opt.qc_steps > 0:
        qc = run_qc(ckpt, ["--data", opt.data, "--imgsz", str(opt.imgsz), "--batch", str(opt.batch)], opt.qc_steps,
                    opt.qc_images, run_dir)
        row["qc"] = qc
        if qc["qc_folded"]:
            ckpt = run_dir / "qc/weights/qc.pt"
    scored = integer_qat.evaluate_row(o, slug(name), flags, run_dir, run_dir, ckpt=ckpt)
    row.update(checkpoint=scored["checkpoint"], file=scored["onnx"], file_path=scored["onnx_path"],
               export_error=scored.get("export_error"), curve=scored["curve"],
               **checkpoint_costs(ckpt, opt.imgsz, opt.target))
    return row


def calibration_images(opt) -> list:
    """``--calib-images`` training images, one per batch (the exported FP file takes batch 1)."""
    from yolo_qat.models.facts import model_task
    from yolo_qat.engine.sensitivity import MixedPrecisionConfig, calibration_batches
    from yolo_qat.engine.validate import load_model

    model, _ = load_model(opt.weights)
    cfg = MixedPrecisionConfig(calib_images=opt.calib_images, calib_batches=opt.calib_images)
    return [b["img"] for b in calibration_batches(opt.data, model_task(model), opt.imgsz, 1, cfg, "cpu")]


def peer_point(opt, name: str, seed: int, out: Path) -> dict | None:
    """One peer: its file (or why there is none) and val.py's scores; None when it cannot run here (a note says why)."""
    o = train_opt(opt, seed)
    d = out / ("peers" if name != "ultra-qat8" else f"seed-{seed}") / name
    d.mkdir(parents=True, exist_ok=True)
    fp = Path(opt.weights).resolve()
    row = fp_costs(opt.weights, opt.imgsz, opt.target, 32 if name == "fp" else 8)
    files, ckpt = [], None
    try:
        if name == "fp":
            ckpt = fp
        elif name == "ort-ptq":
            from benchmarks.deploy_speed import export_fp, export_ptq
            from yolo_qat.engine.validate import load_model

            model, _ = load_model(opt.weights)
            f = export_fp(model, d / "fp.onnx", opt.imgsz)
            files.append(export_ptq(f, d / "ort-ptq.onnx", calibration_images(opt)))
        elif name == "ultra-int8":
            src = shutil.copy(fp, d / "fp.pt")  # Ultralytics writes <stem>_int8.onnx beside the checkpoint
            code = (f"from ultralytics import YOLO; YOLO({str(src)!r}).export(format='onnx', quantize=8, "
                    f"data={str(Path(opt.data).resolve())!r}, imgsz={opt.imgsz}, batch=1)")
            integer_qat.run([sys.executable, "-c", code], d / "export.log")
            files.append(d / "fp_int8.onnx")
        else:
            run_dir = integer_qat.train_row(o, name, None, d.parent)
            if run_dir is None:
                return None
            scored = integer_qat.evaluate_row(o, name, None, run_dir, run_dir)
            return {**row, "checkpoint": scored["checkpoint"], "file": scored["onnx"], "file_path": scored["onnx_path"],
                    "export_error": scored.get("export_error"), "curve": scored["curve"]}
    except SystemExit as e:  # the peer's own tool failed here: the row keeps its error line
        return {**row, "checkpoint": None, "file": None, "file_path": None,
                "export_error": next((ln for ln in reversed(str(e).splitlines()) if "rror" in ln),
                                     str(e).splitlines()[0])[:400]}
    scores = integer_qat.score(o, [ckpt] if ckpt else files, d, name)
    return {**row, "checkpoint": scores.get(ckpt.name) if ckpt else None,
            "file": scores.get(files[0].name) if files else None, "file_path": str(files[0]) if files else None,
            "export_error": None}


def plan(opt) -> list[tuple[str, str, int | None]]:
    """(name, kind, seed) of every point, in the order they run: per seed ours, then the peers."""
    jobs = []
    for peer in opt.peers:
        if peer != "ultra-qat8":
            jobs.append((peer, "peer", None))
    for seed in opt.seeds:
        jobs += [(p, "uniform" if UNIFORM.fullmatch(p) else "allocated", seed) for p in opt.points]
        if "ultra-qat8" in opt.peers:
            jobs.append(("ultra-qat8", "peer", seed))
    return jobs


def slug(name: str) -> str:
    """A point's name as a file or folder name."""
    return name.replace("@", "-at-").replace(":", "-")


def point_file(out: Path, name: str, seed: int | None) -> Path:
    return out / "points" / f"{slug(name)}{'' if seed is None else f'-seed{seed}'}.json"


def stored(out: Path) -> list[dict]:
    """Every finished point of ``out`` (earlier invocations' too: the table grows as points are added)."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "points").glob("*.json"))]
    order = {"peer": 0, "uniform": 1, "allocated": 2}
    return sorted(rows, key=lambda r: (order[r["kind"]], -r["packed_bytes"], r["point"], r["seed"] or 0))


def sweep(opt) -> list[dict]:
    """Run every point not stored yet, one progress line each; the rows of this plan."""
    out = Path(opt.out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    jobs = plan(opt)
    report = sensitivity_report(opt, out) if any(k == "allocated" for _, k, _ in jobs) else None
    t0, rows = time.time(), []
    for i, (name, kind, seed) in enumerate(jobs, 1):
        path = point_file(out, name, seed)
        label = f"[{i}/{len(jobs)}] {name}" + ("" if seed is None else f" seed {seed}")
        if path.is_file():
            rows.append(json.loads(path.read_text()))
            print(f"{label}: kept ({path})", flush=True)
            continue
        t = time.time()
        if kind == "peer":
            row = peer_point(opt, name, seed if seed is not None else opt.seeds[0], out)
            if row is None:
                print(f"{label}: skipped: nvidia-modelopt cannot be imported (an optional benchmark dependency)",
                      flush=True)
                continue
        else:
            if kind == "uniform":
                flags = uniform_flags(name, opt.target)
            else:  # the recipe sets the widths; --target repeats its target so the row exports the target's file
                flags = f"--config {allocated_recipe(opt, name, report, out)} --target {opt.target}"
            row = our_point(opt, name, flags, seed, out)
            row["flags"] = flags
        row.update(point=name, kind=kind, seed=seed, seconds=round(time.time() - t, 1))
        path.write_text(json.dumps(row, indent=1))
        rows.append(row)
        print(f"{label}: {describe(row)}, {row['seconds']:.0f} s (elapsed {time.time() - t0:.0f} s)", flush=True)
    return rows


def describe(row: dict) -> str:
    s = score(row)
    text = ("mAP50-95 " + " / ".join(f"{k} {v:.2f}" for k, v in s.items()) + f" ({source(row)})") if s else "no score"
    if row.get("export_error"):
        text += f"; no file: {row['export_error'][:120]}"
    return f"{text}, {row['packed_bytes'] / 1e3:.0f} kB packed, {row['avg_w_bits']:.2f} avg weight bits"


# ---------------------------------------------------------------------------------------------- reporting

def score(row: dict) -> dict:
    """The score a point is plotted at: its exported file's where it has one, else its checkpoint's."""
    return row.get("file") or row.get("checkpoint") or {}


def source(row: dict) -> str:
    return "file" if row.get("file") else "checkpoint"


def _stats(values: list[float]) -> tuple[float, float, float]:
    return sum(values) / len(values), min(values), max(values)


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    m, lo, hi = _stats(values)
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ({lo:.2f}..{hi:.2f})"


def grouped(rows: list[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["point"], []).append(r)
    return by


def metrics(rows: list[dict]) -> list[str]:
    return [m for m in ("box", "mask") if any(m in score(r) for r in rows)]


def summary_table(rows: list[dict], speed: dict | None = None) -> str:
    ms = metrics(rows)
    head = ["point", "kind", "seeds", "avg weight bits", "weight kB (packed)", "weight kB (runtime)", "GBitOps",
            *[f"{m} mAP50-95 (scored)" for m in ms], *[f"{m} checkpoint" for m in ms], "scored on",
            *(["ms", "vs FP"] if speed else []), "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in grouped(rows).items():
        r0 = rs[0]
        notes = sorted({r["export_error"][:160] for r in rs if r.get("export_error")})
        lines.append("| " + " | ".join([
            name, r0["kind"], ",".join(str(r["seed"]) for r in rs if r["seed"] is not None) or "-",
            f"{r0['avg_w_bits']:.2f}", f"{r0['packed_bytes'] / 1e3:.1f}", f"{r0['runtime_bytes'] / 1e3:.1f}",
            f"{r0['bitops'] / 1e9:.1f}",
            *[_cell([score(r)[m] for r in rs if m in score(r)]) for m in ms],
            *[_cell([r["checkpoint"][m] for r in rs if r.get("checkpoint") and m in r["checkpoint"]]) for m in ms],
            "/".join(sorted({source(r) for r in rs})),
            *([f"{speed[name]['median_ms']:.1f}", f"{speed[name]['speed_vs_fp']:.2f}x"] if name in (speed or {})
              else ["", ""] if speed else []),
            "; ".join(notes)]) + " |")
    return "\n".join(lines)


def comparisons(rows: list[dict]) -> list[tuple[str, str]]:
    """(allocated, uniform) pairs: each ``alloc@WxAy`` against ``WxAy`` (equal weight bytes) and against every uniform
    point of the same average weight bits (within 0.05)."""
    by = grouped(rows)
    pairs = []
    for name, rs in by.items():
        if rs[0]["kind"] != "allocated":
            continue
        for other, os_ in by.items():
            if os_[0]["kind"] == "uniform" and abs(os_[0]["avg_w_bits"] - rs[0]["avg_w_bits"]) <= 0.05:
                pairs.append((name, other))
    return pairs


def comparison_table(rows: list[dict]) -> str:
    """Allocated minus uniform per seed (paired), against the seed spread (max - min) of either; with the paired t
    statistic (mean / its standard error: about 2.4 is the 5% two-sided level at 8 seeds, 4.3 at 3) and the number of
    seeds on which the allocation is ahead."""
    ms = metrics(rows)
    by = grouped(rows)
    lines = ["| allocated - uniform | avg weight bits | " + " | ".join(
        f"{m}: mean (min..max) of the paired differences | {m}: paired t, seeds ahead | {m}: seed spread "
        f"(allocated / uniform) | {m}: beats by more than the spread" for m in ms) + " |",
        "|---|---|" + "---|---|---|---|" * len(ms)]
    for a, b in comparisons(rows):
        ra = {r["seed"]: r for r in by[a]}
        rb = {r["seed"]: r for r in by[b]}
        seeds = sorted(set(ra) & set(rb))
        cells = [f"{a} - {b}", f"{ra[seeds[0]]['avg_w_bits']:.2f} / {rb[seeds[0]]['avg_w_bits']:.2f}" if seeds else ""]
        for m in ms:
            d = [score(ra[s])[m] - score(rb[s])[m] for s in seeds if m in score(ra[s]) and m in score(rb[s])]
            sa = [score(ra[s])[m] for s in seeds if m in score(ra[s])]
            sb = [score(rb[s])[m] for s in seeds if m in score(rb[s])]
            if not d:
                cells += ["", "", "", ""]
                continue
            spread = max(max(sa) - min(sa), max(sb) - min(sb))
            mean, lo, hi = _stats(d)
            verdict = ("one seed: no spread" if len(d) == 1 else
                       "yes" if mean > spread else "no (worse)" if mean < -spread else "no")
            sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5 if len(d) > 1 else 0.0
            t = f"{mean / (sd / len(d) ** 0.5):+.2f}" if sd > 0 else "-"
            cells += [f"{mean:+.2f} ({lo:+.2f}..{hi:+.2f}) over {len(d)} seeds",
                      f"{t}, {sum(x > 0 for x in d)}/{len(d)}",
                      f"{max(sa) - min(sa):.2f} / {max(sb) - min(sb):.2f}", verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else "(no allocated point shares a budget with a uniform one)"


def write_csv(rows: list[dict], path: Path) -> None:
    ms = metrics(rows)
    cols = ["point", "kind", "seed", "avg_w_bits", "packed_bytes", "runtime_bytes", "bitops",
            *[f"{m}_scored" for m in ms], *[f"{m}_checkpoint" for m in ms], *[f"{m}_file" for m in ms],
            "scored_on", "file_path", "export_error", "flags", "seconds"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "scored_on": source(r),
                        **{f"{m}_scored": score(r).get(m) for m in ms},
                        **{f"{m}_checkpoint": (r.get("checkpoint") or {}).get(m) for m in ms},
                        **{f"{m}_file": (r.get("file") or {}).get(m) for m in ms}})


def plot(rows: list[dict], path: Path, title: str) -> None:
    """mAP (first metric) against packed weight bytes and against bit-ops: mean over seeds, bars min..max; uniform and
    allocated points joined in order of size, peers as single markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = metrics(rows)[0] if metrics(rows) else "box"
    by = grouped(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, unit, scale) in zip(axes, (("packed_bytes", "weight kB (quantized convs, packed codes)", 1e-3),
                                             ("bitops", "GBitOps per image (nominal)", 1e-9))):
        series: dict[str, list] = {}
        for name, rs in by.items():
            vals = [score(r)[m] for r in rs if m in score(r)]
            if rs[0]["kind"] != "peer" and vals:
                u = UNIFORM.fullmatch(name)  # uniform points are joined per activation width, allocated ones together
                series.setdefault(f"uniform A{u.group(2)}" if u else "allocated", []).append(
                    (rs[0][key] * scale, *_stats(vals), name))
        colors = iter(("tab:blue", "tab:cyan", "tab:purple", "tab:olive", "tab:brown"))
        for label, pts in sorted(series.items()):
            pts.sort()
            style = dict(marker="s", color="tab:red") if label == "allocated" else dict(marker="o", color=next(colors))
            if pts:
                x, y = [p[0] for p in pts], [p[1] for p in pts]
                ax.errorbar(x, y, yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], capsize=3,
                            label=label, **style)
                for p in pts:
                    ax.annotate(p[4], (p[0], p[1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for marker, (name, rs) in zip("^vD*P", ((n, rs) for n, rs in by.items() if rs[0]["kind"] == "peer")):
            vals = [score(r)[m] for r in rs if m in score(r)]
            if vals:
                mean, lo, hi = _stats(vals)
                ax.errorbar([rs[0][key] * scale], [mean], yerr=[[mean - lo], [hi - mean]], marker=marker, capsize=3,
                            linestyle="none", label=f"{name} ({source(rs[0])})")
        ax.set_xscale("log")
        ax.set_xlabel(unit)
        ax.set_ylabel(f"{m} mAP50-95 % (val.py)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_files(opt, rows: list[dict]) -> dict:
    """{point: deploy_speed's row} for one file per point (the lowest seed's: the graph does not depend on the seed),
    timed in one interleaved run beside Ultralytics' FP ONNX of the checkpoint, so the ratios share the machine's
    state; also written to ``<out>/speed.json``."""
    from benchmarks.deploy_speed import export_fp, measure
    from yolo_qat.engine.validate import load_model

    out = Path(opt.out) / "speed"
    out.mkdir(parents=True, exist_ok=True)
    fp_onnx = out / "fp.onnx"
    if not fp_onnx.is_file():
        export_fp(load_model(opt.weights)[0], fp_onnx, opt.imgsz)
    files = [{"label": "fp", "kind": "fp", "imgsz": opt.imgsz, "path": str(fp_onnx)}]
    for name, rs in grouped(rows).items():
        path = next((r["file_path"] for r in rs if r.get("file_path") and Path(r["file_path"]).is_file()), None)
        if path:
            files.append({"label": name, "kind": "extra", "imgsz": opt.imgsz, "path": path})
    timed = measure(files, [1], opt.time_repeats, 3, False)
    speed = {r["file"]: {k: r[k] for k in ("median_ms", "speed_vs_fp", "integer_convs", "convs", "path")}
             for r in timed}
    (out / "speed.json").write_text(json.dumps(speed, indent=1))
    return speed


def write_outputs(opt, rows: list[dict], speed: dict | None = None) -> str:
    out = Path(opt.out)
    text = (f"Pareto sweep of {opt.weights} on {opt.data} at imgsz {opt.imgsz}: {opt.epochs} QAT epochs (SGD lr0 "
            f"{opt.lr0}, warm-up {opt.warmup_epochs}{', ' + opt.qat_args if opt.qat_args else ''}), QC "
            f"{opt.qc_steps} steps, target {opt.target}; mAP50-95 % by val.py --no-rect on the exported file where "
            f"there is one (else the checkpoint); mean (min..max) over seeds"
            + (f"; ms: onnxruntime CPU, 1 thread, batch 1, median of {opt.time_repeats} interleaved rounds "
               f"(benchmarks/deploy_speed.py), vs FP = FP ONNX ms / ms" if speed else "")
            + "\n\n" + summary_table(rows, speed)
            + "\n\nAllocated against uniform widths, paired per seed (scored mAP)\n\n" + comparison_table(rows))
    (out / "pareto.md").write_text(text + "\n")
    write_csv(rows, out / "points.csv")
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    plot(rows, out / "pareto.png", f"{opt.weights}: {opt.epochs} QAT epochs, target {opt.target}, seeds {seeds}, "
                                   f"mean and min..max")
    return text


def main(argv=None) -> int:
    opt = parse_args(argv)
    if not sweep(opt):
        raise SystemExit(f"{PROG}: error: no point could run")
    rows = stored(Path(opt.out))
    text = write_outputs(opt, rows, time_files(opt, rows) if opt.time_repeats > 0 else None)
    print(f"\n{text}\n\nwrote {opt.out}/pareto.md, points.csv, pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
