"""benchmarks/reproduce.py end to end on a tiny embedded dataset: one bit width, two methods with QC,
one seed; table / json / csv / PNGs are written, and a re-run skips every finished cell."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data.embedded import ensure_embedded_dataset

    return ensure_embedded_dataset(root=tmp_path_factory.mktemp("ds"), n_train=8, n_val=4, imgsz=64)


def reproduce(data, out, *extra):
    args = ["--data", str(data), "--cfg", "yolov5nu-seg", "--bits", "4", "--methods", "lsq", "ema", "--qc",
            "--fp-epochs", "1", "--qat-epochs", "1", "--seeds", "0", "--imgsz", "64", "--batch", "4",
            "--calib-batches", "1", "--qc-steps", "2", "--project", str(out.parent), "--name", out.name, *extra]
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/reproduce.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env)


def test_reproduce_writes_outputs_and_resumes(data, tmp_path):
    out = tmp_path / "rep"
    first = reproduce(data, out)
    assert first.returncode in (0, 1), first.stderr[-3000:]  # 1: some cell failed and is listed in the table
    table = (out / "table.md").read_text()
    assert (first.returncode == 1) == ("Failed cells" in table)
    assert "| model | FP | bits | LSQ | LSQ+QC | EMA | EMA+QC |" in table and "mask mAP50-95" in table
    assert "2 steps per run" in first.stdout and "tau 1 steps" in first.stdout  # budgets in optimizer steps
    cells = json.loads((out / "summary.json").read_text())["cells"]
    noqc = {c["column"]: c for c in cells if c["qc"] is None}
    assert set(noqc) == {"LSQ", "EMA"}
    assert noqc["EMA"]["qat"]["ema_a_final"] > 0 and noqc["LSQ"]["qat"]["ema_a_final"] == 0
    assert all(c["qat"]["optimizer_steps"] == 2 for c in cells)
    for c in cells:
        if c["qc"] is not None:
            assert c["qc_steps"] == 2
    qc_cells = {c["column"] for c in cells if c["qc"] is not None}
    for col in {"LSQ+QC", "EMA+QC"} - qc_cells:  # a QC cell that failed must be reported, not dropped
        assert "Failed cells" in table
    assert len((out / "summary.csv").read_text().strip().splitlines()) == len(cells) + 1
    for run in ("w4-lsq-ema0-s0", "w4-lsq-ema0.99-s0"):
        for png in ("scale_trajectories.png", "threshold_distance.png", "layer_oscillations.png"):
            assert (out / "diagnostics" / run / png).stat().st_size > 1000
    done = sorted((out / "cells").glob("*.json"))
    mtimes = {p: p.stat().st_mtime_ns for p in done}

    second = reproduce(data, out)
    assert "[skip] FP model" in second.stdout and "[run] QAT" not in second.stdout
    for c in cells:
        assert f"[skip] cell {c['key']}: finished before" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in done} == mtimes
    table = (out / "table.md").read_text()  # rewritten by the second run (its wall time)
    assert "Compute time: FP" in table and "paired" in table
    assert (out / "table.png").stat().st_size > 1000

    # The decay sweep reuses the runs it shares with the main table (a=0 is LSQ, a=0.99 is EMA).
    sweep = subprocess.run([sys.executable, str(ROOT / "benchmarks/reproduce.py"), "--data", str(data),
                            "--cfg", "yolov5nu-seg", "--bits", "4", "--ablation", "ema-decay", "--decays", "0",
                            "0.99", "--fp-epochs", "1", "--qat-epochs", "1", "--seeds", "0", "--imgsz", "64",
                            "--batch", "4", "--calib-batches", "1", "--project", str(out.parent), "--name", out.name],
                           capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "YOLO_OFFLINE": "1"})
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "[run] QAT" not in sweep.stdout
    assert "| model | FP | bits | a=0 | a=0.99 |" in (out / "table-ema-decay.md").read_text()
    assert (out / "table.md").read_text() == table  # the main table is not overwritten by the ablation
    assert (out / "summary-ema-decay.json").exists() and (out / "table-ema-decay.png").stat().st_size > 1000

    # Other settings than the runs already there: refused with the flag named, nothing re-run or mixed in.
    other = reproduce(data, out, "--qat-epochs", "2")
    assert other.returncode != 0 and "--qat-epochs 2 (the runs there used 1)" in other.stderr
    assert "[run]" not in other.stdout


def test_paired_comparison_uses_per_seed_differences():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce as rep

    # x beats y by 1 point on every seed, while the seeds themselves spread by 10 points
    rows = [{"bits": 4, "column": col, "seed": sd, "box": base + (0.01 if col == "X" else 0.0)}
            for sd, base in ((0, 0.20), (1, 0.30), (2, 0.10)) for col in ("X", "Y")]
    diffs = rep.paired(rows, "box", 4, "X", "Y")
    assert diffs == pytest.approx([0.01, 0.01, 0.01])
    assert rep.verdict([r["box"] for r in rows if r["column"] == "X"],
                       [r["box"] for r in rows if r["column"] == "Y"])[1] == "no measurable difference"
    assert rep.paired_verdict(diffs).endswith("-> better") and "3/3 seeds higher" in rep.paired_verdict(diffs)
    assert rep.paired_verdict([0.01, -0.02, 0.015]).endswith("no measurable difference")
    assert rep.paired_verdict([0.01]).startswith("undetermined")
