"""The whole pipeline per deploy target and bit width, from one FP checkpoint (or a model yaml): QAT -> QC (folded)
-> the target's ONNX -> val.py on the QC checkpoint and on its file, and what could go wrong on the way.

Per cell (``--cells TARGET:WxAy``, per-channel weights): ``train_qat.py`` (``--epochs``), ``correct_qc.py``
(``--qc-steps``, the fold and its check), ``export.py`` (the target's file), then ``val.py --no-rect`` on qc.pt and its
ONNX. Reported: the step sizes at the floor after QAT (results.csv), whether QC folded (and its tie count), whether
the file was written, both mAPs and their difference. A stage that fails is reported as such (its log kept) and the
cell goes on to nothing after it. Finished cells are kept (delete a cell's folder to redo it).

    python benchmarks/pipeline_matrix.py --weights fp.pt --data d.yaml --imgsz 256 --out runs/matrix \\
        --cells ort:W8A8 ort:W4A8 ort:W4A4 npu:W8A8 npu:W4A8 tensorrt:W8A8 tensorrt:W4A8
    python benchmarks/pipeline_matrix.py --cfg yolov5nu --data d.yaml --imgsz 128 --out runs/matrix-yaml

Writes ``<out>/table.md`` and ``<out>/results.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
CELLS = ("ort:W8A8", "ort:W4A8", "ort:W4A4", "npu:W8A8", "npu:W4A8", "tensorrt:W8A8", "tensorrt:W4A8")


def stage(cmd: list[str], log: Path) -> bool:
    """Run one stage, its output to ``log``; True when it succeeded."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode == 0


def last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "error:" in ln]
    return lines[-1].strip()[:300] if lines else log.read_text(errors="replace").strip().splitlines()[-1][:300]


def steps_at_floor(run: Path) -> int | None:
    path = run / "results.csv"
    if not path.is_file():
        return None
    rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(path.open())]
    return int(float(rows[-1]["qat/steps_near_floor"])) if rows and "qat/steps_near_floor" in rows[-1] else None


def cell(opt, spec: str, out: Path) -> dict:
    target, bits = spec.split(":")
    w, a = (int(x) for x in re.fullmatch(r"W(\d)A(\d)", bits).groups())
    d = out / f"{target}-{bits}"
    d.mkdir(parents=True, exist_ok=True)
    res = {"cell": spec}
    done = d / "cell.json"
    if done.is_file():
        print(f"{spec}: kept ({d})")
        return json.loads(done.read_text())
    py = sys.executable
    src = ["--weights", opt.weights] if opt.weights else ["--cfg", opt.cfg]
    common = ["--data", opt.data, "--imgsz", str(opt.imgsz), "--batch", str(opt.batch)]
    qat = d / "qat"
    ok = stage([py, str(ROOT / "train_qat.py"), *src, *common, "--epochs", str(opt.epochs), "--workers", "0",
                "--w-bits", str(w), "--a-bits", str(a), "--per-channel", "--target", target, "--lr0", str(opt.lr0),
                "--warmup-epochs", "0", "--project", str(d), "--name", "qat", "--exist-ok", *opt.qat_args.split()],
               d / "qat.log")
    res["steps_at_floor"] = steps_at_floor(qat)
    if not ok:
        return finish(res, done, failed="qat", why=last_error(d / "qat.log"))
    res.update(run_qc(qat / "weights/best.pt", common, opt.qc_steps, opt.qc_images, d))
    if not res["qc_folded"]:
        return finish(res, done, failed="qc", why=last_error(d / "qc.log"))
    qc = d / "qc/weights/qc.pt"
    onnx = d / "qc.onnx"
    ok = stage([py, str(ROOT / "export.py"), "--weights", str(qc), "--format", "onnx", "--imgsz", str(opt.imgsz),
                "--output", str(onnx)], d / "export.log")
    res["exported"] = ok and onnx.is_file()
    if not res["exported"]:
        return finish(res, done, failed="export", why=last_error(d / "export.log"))
    js = d / "val.json"
    ok = stage([py, str(ROOT / "val.py"), "--weights", str(qc), str(onnx), "--data", opt.data, "--imgsz",
                str(opt.imgsz), "--no-rect", "--project", str(d), "--name", "val", "--exist-ok", "--json", str(js)],
               d / "val.log")
    if not ok:
        return finish(res, done, failed="val", why=last_error(d / "val.log"))
    scores = {Path(k).suffix: v for k, v in json.loads(js.read_text()).items()}
    for m in ("box", "mask"):
        if f"{m}.map" in scores[".pt"]:
            res[f"{m}_checkpoint"] = 100 * scores[".pt"][f"{m}.map"]
            res[f"{m}_onnx"] = 100 * scores[".onnx"][f"{m}.map"]
    return finish(res, done)


def run_qc(weights: Path, common: list[str], steps: int, images: int, d: Path) -> dict:
    """correct_qc.py on ``weights`` into ``d/qc/weights/qc.pt`` (log ``d/qc.log``): whether it folded, and the
    outputs that sat on a rounding tie."""
    ok = stage([sys.executable, str(ROOT / "correct_qc.py"), "--weights", str(weights), *common, "--steps",
                str(steps), "--calib-images", str(images), "--no-val", "--project", str(d), "--name", "qc",
                "--exist-ok"], d / "qc.log")
    ties = re.findall(r"(\d+) outputs of \d+ layers sat on a rounding tie", (d / "qc.log").read_text(errors="replace"))
    return {"qc_folded": ok and (d / "qc/weights/qc.pt").is_file(), "qc_ties": int(ties[-1]) if ties else 0}


def finish(res: dict, done: Path, failed: str | None = None, why: str | None = None) -> dict:
    res["failed"], res["why"] = failed, why
    done.write_text(json.dumps(res, indent=2))
    return res


def table(rows: list[dict]) -> str:
    head = ["target:bits", "steps at floor after QAT", "QC folded (ties)", "file written", "qc.pt box (/ mask)",
            "its ONNX", "ONNX - checkpoint", "failed at"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pairs = [(r[f"{m}_checkpoint"], r[f"{m}_onnx"]) for m in ("box", "mask") if f"{m}_checkpoint" in r]
        lines.append("| " + " | ".join([
            r["cell"], "" if r.get("steps_at_floor") is None else str(r["steps_at_floor"]),
            "" if "qc_folded" not in r else ("yes" if r["qc_folded"] else "no") + f" ({r.get('qc_ties', 0)})",
            "" if "exported" not in r else ("yes" if r["exported"] else "no"),
            " / ".join(f"{c:.2f}" for c, _ in pairs), " / ".join(f"{o:.2f}" for _, o in pairs),
            " / ".join(f"{o - c:+.2f}" for c, o in pairs),
            f"{r['failed']}: {r['why']}" if r.get("failed") else ""]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pipeline_matrix.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="the FP checkpoint every cell starts from")
    src.add_argument("--cfg", help="or a model yaml (QAT from scratch: the smoke test users run)")
    p.add_argument("--data", required=True)
    p.add_argument("--imgsz", type=int, required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1, help="QAT epochs per cell")
    p.add_argument("--lr0", type=float, default=0.002, help="QAT SGD lr of the weights (no warm-up)")
    p.add_argument("--qat-args", default="", help="more train_qat.py flags, one string")
    p.add_argument("--qc-steps", type=int, default=20)
    p.add_argument("--qc-images", type=int, default=128)
    p.add_argument("--out", default="runs/pipeline_matrix")
    p.add_argument("--cells", nargs="+", default=list(CELLS), help=f"TARGET:WxAy (default: {' '.join(CELLS)})")
    opt = p.parse_args(argv)
    out = Path(opt.out)
    rows = []
    for spec in opt.cells:
        if not re.fullmatch(r"(sim|ort|npu|tensorrt):W\dA\d", spec):
            p.error(f"--cells {spec!r}: expected TARGET:WxAy, e.g. ort:W4A8")
        rows.append(cell(opt, spec, out))
        print(table(rows), flush=True)
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(opt), "rows": rows}, indent=2))
    print(f"\n{text}\n\nwrote {out}/table.md, results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
