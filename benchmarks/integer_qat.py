"""One FP checkpoint, one training budget, several QAT recipes and the peers a user would pick instead: the
per-epoch validation curves, the final checkpoints, their deployable files, all scored the same way.

Rows (``--rows``; each trains ``--epochs`` epochs from ``--weights`` on ``--data`` at ``--imgsz`` / ``--batch``,
SGD at ``--lr0`` with ``--warmup-epochs`` and ``--warmup-bias-lr`` (the defaults of train_qat.py and Ultralytics: 0.01, 3 and 0.1), one optimizer step per batch, mosaic closed for the last
quarter of the epochs (at most 10), the same for every row: train_qat.py's defaults):
- ``fp``: FP fine-tuning (``YOLO(weights).train(...)``), the accuracy reference;
- ``ultra-qat8``: Ultralytics' own INT8 QAT (``train(quantize=8)``, NVIDIA ModelOpt: ``pip install --no-deps
  nvidia-modelopt huggingface_hub`` plus what it imports; skipped with a note where it cannot be imported);
- ours, ``NAME=FLAGS``: ``train_qat.py --weights ... FLAGS`` (e.g. ``ort-w4a8='--w-bits 4 --a-bits 8
  --per-channel --target ort'``); the built-in names in ``OURS`` below.
Per row: the per-epoch mAP50-95 of Ultralytics' validator during training (results.csv, EMA model, rectangular
batches), then ``val.py --no-rect`` (pycocotools) on the final best.pt and, for ours and Ultralytics' QAT, on its
ONNX file (``export.py`` for ours trained for an integer target: the target's integer file; ``YOLO(best).export(format="onnx")`` for theirs).
Finished rows are kept (a rerun skips what exists: delete a row's folder to redo it).

    python benchmarks/integer_qat.py --weights fp.pt --data d.yaml --imgsz 256 --epochs 3 --out runs/integer_qat \\
        --rows fp ultra-qat8 ort-w8a8 ort-w4a8 sim-w4a8

Writes ``<out>/table.md``, ``<out>/results.json`` and ``<out>/curves.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

OURS = {
    "ort-w8a8": "--w-bits 8 --a-bits 8 --per-channel --target ort",
    "ort-w4a8": "--w-bits 4 --a-bits 8 --per-channel --target ort",
    "ort-w4a4": "--w-bits 4 --a-bits 4 --per-channel --target ort",
    "sim-w4a8": "--w-bits 4 --a-bits 8 --per-channel",
    "sim-w4a4": "--w-bits 4 --a-bits 4",
    "sim-w3a3": "--w-bits 3 --a-bits 3",
}
PEERS = ("fp", "ultra-qat8")
MAP = "metrics/mAP50-95(B)"


def parse_rows(specs: list[str]) -> dict[str, str | None]:
    """``name`` (a peer or a built-in recipe) or ``name=flags`` -> {name: train_qat flags, None for peers}."""
    rows = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        if flags:
            rows[name] = flags
        elif name in PEERS:
            rows[name] = None
        elif name in OURS:
            rows[name] = OURS[name]
        else:
            raise SystemExit(f"integer_qat.py: error: row '{name}' is unknown: use one of {PEERS + tuple(OURS)} or "
                             f"NAME='train_qat.py flags'")
    return rows


def run(cmd: list[str], log: Path) -> None:
    """Run ``cmd``, its output to ``log``; a failure stops the benchmark with the log's tail."""
    print("$ " + shlex.join(cmd), flush=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"integer_qat.py: error: {cmd[1]} failed (exit {r.returncode}); its log {log} ends:\n{tail}")


def ultralytics_train(opt, name: str, out: Path, quantize: int | None) -> None:
    """Ultralytics' own trainer on the same budget (FP fine-tuning, or its INT8 QAT with ``quantize=8``)."""
    kw = dict(data=str(Path(opt.data).resolve()), epochs=opt.epochs, imgsz=opt.imgsz, batch=opt.batch, workers=0,
              device=opt.device, optimizer="SGD", lr0=opt.lr0, warmup_epochs=opt.warmup_epochs,
              warmup_bias_lr=opt.warmup_bias_lr, project=str(out.resolve()), name=name, exist_ok=True,
              plots=False, seed=opt.seed, amp=False, nbs=opt.batch, close_mosaic=min(10, opt.epochs // 4))
    if quantize:
        kw["quantize"] = quantize
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from ultralytics import YOLO; "
            f"YOLO({str(Path(opt.weights).resolve())!r}).train(**{kw!r})")
    run([sys.executable, "-c", code], out / f"{name}.log")


def ultralytics_export(best: Path, out: Path, imgsz: int) -> Path:
    code = (f"from ultralytics import YOLO; print(YOLO({str(best)!r}).export(format='onnx', imgsz={imgsz}, "
            f"simplify=False, dynamic=False))")
    run([sys.executable, "-c", code], out / "export.log")
    return best.with_suffix(".onnx")


def can_import_modelopt() -> bool:
    r = subprocess.run([sys.executable, "-c", "import modelopt.torch.quantization"], capture_output=True)
    return r.returncode == 0


def train_row(opt, name: str, flags: str | None, out: Path) -> Path | None:
    """Train one row unless its best.pt exists; its run folder, or None when the row cannot run here."""
    run_dir = out / name
    if (run_dir / "weights/best.pt").is_file() and len(curve(run_dir)) >= opt.epochs:
        print(f"{name}: kept ({run_dir})")
        return run_dir
    if name == "ultra-qat8" and not can_import_modelopt():
        print(f"{name}: skipped: nvidia-modelopt cannot be imported (an optional benchmark dependency)")
        return None
    out.mkdir(parents=True, exist_ok=True)
    if flags is None:
        ultralytics_train(opt, name, out, quantize=8 if name == "ultra-qat8" else None)
    else:
        run([sys.executable, str(ROOT / "train_qat.py"), "--weights", opt.weights, "--data", opt.data, "--imgsz",
             str(opt.imgsz), "--batch", str(opt.batch), "--epochs", str(opt.epochs), "--workers", "0", "--seed",
             str(opt.seed), "--lr0", str(opt.lr0), "--warmup-epochs", str(opt.warmup_epochs), "--warmup-bias-lr",
             str(opt.warmup_bias_lr), "--project", str(out),
             "--name", name, "--exist-ok", *shlex.split(flags),
             *(["--device", opt.device] if opt.device else [])], out / f"{name}.log")
    return run_dir


def curve(run_dir: Path) -> list[float]:
    """mAP50-95 (%) per epoch from the run's results.csv (Ultralytics' validator on the EMA model)."""
    path = run_dir / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [100 * float(row[MAP]) for row in ({k.strip(): v for k, v in r.items()} for r in csv.DictReader(f))]


def score(opt, files: list[Path], out: Path, tag: str) -> dict[str, dict[str, float]]:
    """pycocotools box (and mask) mAP50-95 (%) of each file through val.py --no-rect at the run's image size."""
    js = out / f"val-{tag}.json"
    if not js.is_file():
        run([sys.executable, str(ROOT / "val.py"), "--weights", *map(str, files), "--data", opt.data, "--imgsz",
             str(opt.imgsz), "--no-rect", "--project", str(out / "val"), "--name", tag, "--exist-ok", "--json",
             str(js)], out / f"val-{tag}.log")
    res = json.loads(js.read_text())
    return {Path(k).name: {m: 100 * v[f"{m}.map"] for m in ("box", "mask") if f"{m}.map" in v} for k, v in res.items()}


def integer_target(flags: str | None) -> bool:
    """Whether a row of ours trains for an integer runtime (its file is what deploys; a sim file is for inspection)."""
    args = shlex.split(flags or "")
    return "--target" in args and args[args.index("--target") + 1] != "sim"


def evaluate_row(opt, name: str, flags: str | None, run_dir: Path, out: Path, ckpt: Path | None = None) -> dict:
    """Score the row's checkpoint (``ckpt``, default its best.pt) and, for rows that deploy, the ONNX file exported
    from it beside it."""
    best = ckpt or run_dir / "weights/best.pt"
    row = {"row": name, "flags": flags, "curve": curve(run_dir)}
    files = [best]
    if name == "ultra-qat8" or integer_target(flags):
        onnx = best.with_suffix(".onnx")
        try:
            if not onnx.is_file():
                if flags is None:
                    onnx = ultralytics_export(best, run_dir, opt.imgsz)
                else:
                    run([sys.executable, str(ROOT / "export.py"), "--weights", str(best), "--format", "onnx", "--imgsz",
                         str(opt.imgsz), "--output", str(onnx)], run_dir / "export.log")
            files.append(onnx)
        except SystemExit:  # no file: the row says why (the export's error line), the checkpoint is still scored
            log = (run_dir / "export.log").read_text(errors="replace").splitlines()
            row["export_error"] = next((ln for ln in reversed(log) if "error:" in ln), log[-1] if log else "")[:400]
    scores = score(opt, files, run_dir, name)
    row["checkpoint"] = scores.get(best.name)
    row["onnx"] = scores.get(best.with_suffix(".onnx").name)
    row["onnx_path"] = str(files[-1]) if len(files) > 1 else None
    return row


def table(rows: list[dict], opt) -> str:
    n = max(len(r["curve"]) for r in rows)
    head = ["row", *[f"epoch {i + 1}" for i in range(n)], "best.pt (val.py)", "its ONNX (val.py)", "flags"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(s):  # box (/ mask)
        return " / ".join(f"{v:.1f}" for v in s.values()) if s else ""

    for r in rows:
        cells = [r["row"], *[f"{v:.1f}" for v in r["curve"]], *["" for _ in range(n - len(r["curve"]))],
                 fmt(r["checkpoint"]), fmt(r["onnx"]) or ("no file: " + r["export_error"] if r.get("export_error") else ""),
                 f"`{r['flags']}`" if r["flags"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return (f"mAP50-95 %: per epoch the box mAP of Ultralytics' validator during training (EMA model, rectangular "
            f"batches); best.pt and its ONNX by val.py --no-rect --imgsz {opt.imgsz} (pycocotools, box / mask)\n\n"
            + "\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", label=r["row"])
    ax.set_xticks(range(1, max(len(r["curve"]) for r in rows) + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("box mAP50-95 % (Ultralytics' validator, EMA)")
    ax.set_title("validation during training, same FP and budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="integer_qat.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="the FP checkpoint every row starts from")
    p.add_argument("--data", required=True, help="dataset yaml")
    p.add_argument("--imgsz", type=int, required=True, help="the model's own image size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="several seeds: each into <out>/seed-<s>/, then <out>/seeds.md with every row's mean (min..max)")
    p.add_argument("--pairs", nargs="*", default=[], metavar="A:B",
                   help="with --seeds: rows compared seed by seed (A - B), e.g. ort-w4a8:ort-w4a8-abs")
    p.add_argument("--lr0", type=float, default=0.01, help="SGD lr of the weights, every row (Ultralytics' default)")
    p.add_argument("--warmup-epochs", type=float, default=3.0, help="Ultralytics' warm-up, every row")
    p.add_argument("--warmup-bias-lr", type=float, default=0.1,
                   help="the biases' lr at the start of the warm-up, every row (Ultralytics' and train_qat.py's 0.1)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/integer_qat")
    p.add_argument("--rows", nargs="+", default=["fp", "ultra-qat8", "ort-w8a8", "ort-w4a8"],
                   help=f"rows: {PEERS + tuple(OURS)} or NAME='train_qat.py flags'")
    opt = p.parse_args(argv)
    if not opt.seeds:
        run_seed(opt, Path(opt.out))
        return 0
    by_seed = {}
    for seed in opt.seeds:
        opt.seed = seed
        by_seed[seed] = run_seed(opt, Path(opt.out) / f"seed-{seed}")
    text = seed_table(by_seed) + ("\n\n" + pair_table(by_seed, opt.pairs) if opt.pairs else "")
    (Path(opt.out) / "seeds.md").write_text(text + "\n")
    print(f"\n{text}\n\nwrote {opt.out}/seeds.md")
    return 0


def run_seed(opt, out: Path) -> list[dict]:
    """Every row for one seed into ``out``: its table, results and curves."""
    rows = []
    for name, flags in parse_rows(opt.rows).items():
        run_dir = train_row(opt, name, flags, out)
        if run_dir is not None:
            rows.append(evaluate_row(opt, name, flags, run_dir, out))
            print(table(rows, opt), flush=True)
    text = table(rows, opt)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(opt), "rows": rows}, indent=2))
    plot(rows, out / "curves.png")
    print(f"\n{text}\n\nwrote {out}/table.md, results.json, curves.png")
    return rows


def _spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.1f} ({min(values):.1f}..{max(values):.1f})" if values else ""


def seed_table(by_seed: dict[int, list[dict]]) -> str:
    """Per row: best.pt's box / mask mAP and its ONNX as mean (min..max) over the seeds, and the largest
    |ONNX - checkpoint| of any seed and metric."""
    names = list(dict.fromkeys(r["row"] for rows in by_seed.values() for r in rows))
    lines = ["| row | seeds | best.pt box | best.pt mask | ONNX box | ONNX mask | max abs(ONNX - best.pt) |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        rs = [r for rows in by_seed.values() for r in rows if r["row"] == name]
        cells = [name, str(len(rs))]
        for key in ("checkpoint", "onnx"):
            for m in ("box", "mask"):
                cells.append(_spread([r[key][m] for r in rs if r.get(key) and m in r[key]]))
        gaps = [abs(r["onnx"][m] - r["checkpoint"][m]) for r in rs if r.get("onnx") for m in r["onnx"]]
        cells.append(f"{max(gaps):.2f}" if gaps else "")
        lines.append("| " + " | ".join(cells) + " |")
    return (f"best.pt and its ONNX by val.py --no-rect (pycocotools mAP50-95 %), mean (min..max) over seeds "
            f"{sorted(by_seed)}\n\n" + "\n".join(lines))


def pair_table(by_seed: dict[int, list[dict]], pairs: list[str]) -> str:
    """A - B per seed on best.pt (box / mask): mean (min..max) and on how many seeds A is at least B."""
    lines = ["| A - B | box | mask | seeds with A >= B (box / mask) |", "|---|---|---|---|"]
    for pair in pairs:
        a, _, b = pair.partition(":")
        diffs = {"box": [], "mask": []}
        for rows in by_seed.values():
            ra = next((r for r in rows if r["row"] == a), None)
            rb = next((r for r in rows if r["row"] == b), None)
            if ra and rb and ra.get("checkpoint") and rb.get("checkpoint"):
                for m in diffs:
                    if m in ra["checkpoint"] and m in rb["checkpoint"]:
                        diffs[m].append(ra["checkpoint"][m] - rb["checkpoint"][m])
        wins = " / ".join(f"{sum(d >= 0 for d in v)}/{len(v)}" for v in diffs.values() if v)
        lines.append(f"| {a} - {b} | " + " | ".join(
            f"{sum(v) / len(v):+.1f} ({min(v):+.1f}..{max(v):+.1f})" if v else "" for v in diffs.values())
            + f" | {wins} |")
    return "paired per seed, best.pt (val.py --no-rect)\n\n" + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
