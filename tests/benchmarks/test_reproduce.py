"""benchmarks/reproduce.py end to end on a tiny embedded dataset: one bit width, two methods with QC,
one seed; table / json / csv / PNGs are written, and a re-run skips every finished cell. Then method kd
(EMA + distillation) with the three QC variants joins the same out dir, reusing the finished EMA cells.
The paper's own models (the original anchor-based YOLOv5 / YOLOv7): yolov5n from its yaml through the
command line with both ablations, yolov7-tiny and yolov5n-seg from the original-code checkpoints with every
other method, kd and the QC variants."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT.parent / "shared" / "fixtures" / "original-yolo"
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"fixtures not found at {FIX}")


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

    check_kd_with_qc_variants(data, out, cells)


def check_kd_with_qc_variants(data, out, before):
    """--methods ema kd with the QC variants, into the out dir of the lsq/ema run: the EMA cells made before
    are reused (their keys did not change), only the kd QAT run trains, and the report gets the kd and
    QC-variant rows, verdicts and gap lines."""
    kd = reproduce(data, out, "--methods", "ema", "kd", "--qc-variants", "labels", "kd", "label-free")
    assert kd.returncode in (0, 1), kd.stderr[-3000:]
    for c in before:
        if c["column"] in ("EMA", "EMA+QC"):
            assert f"[skip] cell {c['key']}: finished before" in kd.stdout
    assert kd.stdout.count("[run] QAT") == 1 and "[run] QAT w4-lsq-ema0.99-kd-s0:" in kd.stdout
    table = (out / "table.md").read_text()
    assert (kd.returncode == 1) == ("Failed cells" in table)
    assert "| model | FP | bits | EMA | EMA+QC | EMA+KD | EMA+KD+QC |" in table
    assert table.count("| method | FP | bits | none | QC | QC(KD) | QC(KD, no labels) |") == 2  # box and mask
    assert table.count("\n| EMA+KD | ") == 2 and table.count("\n| EMA | ") == 2
    for pair in ("EMA+KD vs EMA:", "EMA+KD+QC vs EMA+QC:", "EMA+QC(KD) vs EMA+QC:", "EMA+QC(KD, no labels) vs EMA:",
                 "EMA+KD+QC(KD, no labels) vs EMA+QC(KD, no labels):"):
        assert f"W4A4 box: {pair}" in table and f"W4A4 mask: {pair}" in table
    assert "W4A4 box: gap to FP" in table and "(EMA) ->" in table and "(EMA+KD): closed by" in table

    cells = {c["key"]: c for c in json.loads((out / "summary.json").read_text())["cells"]}
    fp = json.loads((out / "fp.json").read_text())["weights"]
    kd_run = cells["w4-lsq-ema0.99-kd-s0--noqc"]
    assert kd_run["column"] == "EMA+KD" and kd_run["distill"] is True
    assert kd_run["qat"]["distill"]["teacher"] == fp and kd_run["qat"]["distill"]["kd_loss_final"] > 0
    assert kd_run["qat"]["ema_a_final"] > 0  # the EMA of the ema column
    unlabelled = out / "unlabelled"
    images = sorted(unlabelled.iterdir())
    assert len(images) == 8 and all(p.is_file() and p.suffix == ".jpg" for p in images)
    assert not (out / "labels").exists() and not any(p.is_dir() for p in images)
    for run in ("w4-lsq-ema0.99-s0", "w4-lsq-ema0.99-kd-s0"):
        for variant, label_free in (("-kd", False), ("-kd-nolabels", True)):
            c = cells.get(f"{run}--qc-channel-both{variant}")
            if c is None:  # a failed QC cell is listed, not dropped
                assert "Failed cells" in table
                continue
            d = c["qc_report"]["distill"]
            assert d["teacher"] == fp and d["label_free"] is label_free and c["qc_steps"] == 2
            assert d["source"] == (str(unlabelled) if label_free else None)
    from yolo_qat.engine.config import QATConfig

    weight = QATConfig.distill_weight  # train_qat.py's default
    assert json.loads((out / "settings.json").read_text())["distill_weight"] == weight

    # The distillation weight is a setting of the out dir once kd runs are in it.
    other = reproduce(data, out, "--methods", "kd", "--distill-weight", str(weight + 1))
    assert other.returncode != 0 and f"--distill-weight {weight + 1} (the runs there used {weight})" in other.stderr


def test_cell_keys_of_older_out_dirs_are_unchanged(capsys):
    """Re-runs find finished cells by key: the keys of the cells without distillation keep their format."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce as rep

    assert rep.Cell(4, "lsq", 0.99, 1, "EMA").key == "w4-lsq-ema0.99-s1--noqc"
    qc = ("channel", True, True)
    assert rep.Cell(3, "dampen", 0.0, 0, "Dampen+QC", qc).key == "w3-dampen-ema0-s0--qc-channel-both"
    assert rep.Cell(4, "lsq", 0.99, 0, "x", ("tensor", True, False)).key == "w4-lsq-ema0.99-s0--qc-tensor-scale"
    kd = rep.Cell(4, "lsq", 0.99, 0, "EMA+KD+QC(KD, no labels)", qc, True, "label-free")
    assert kd.key == "w4-lsq-ema0.99-kd-s0--qc-channel-both-kd-nolabels"
    pairs = rep.comparisons(["EMA", "EMA+QC", "EMA+QC(KD)", "EMA+KD", "EMA+KD+QC", "EMA+KD+QC(KD)"])
    assert len(pairs) == len(set(pairs))
    assert {("EMA+QC(KD)", "EMA+QC"), ("EMA+QC(KD)", "EMA"), ("EMA+KD", "EMA"), ("EMA+KD+QC", "EMA+QC"),
            ("EMA+KD+QC(KD)", "EMA+QC(KD)"), ("EMA+KD+QC", "EMA+KD")} <= set(pairs)
    # without kd or variants the comparisons are those of before
    assert rep.comparisons(["LSQ", "LSQ+QC", "EMA", "EMA+QC"]) == [
        ("LSQ+QC", "LSQ"), ("EMA+QC", "EMA"), ("EMA", "LSQ"), ("EMA+QC", "LSQ+QC")]

    # QC variants without QC, a negative weight: one paragraph naming the fix, exit status 2, nothing run
    assert rep.main(["--qc-variants", "kd", "label-free"]) == 2
    assert "--qc-variants kd label-free names variants of QC, which is off: add --qc" in capsys.readouterr().err
    assert rep.main(["--qc", "--distill-weight", "-1"]) == 2
    assert "--distill-weight -1 is invalid" in capsys.readouterr().err
    # --loss-hyp is the YOLOv5 loss of the original anchor-based models: refused for an Ultralytics model
    assert rep.main(["--cfg", "yolov5nu-seg", "--loss-hyp", "{obj: 25}"]) == 2
    assert "--loss-hyp sets the YOLOv5 loss of the original anchor-based models" in capsys.readouterr().err


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


# -- the paper's models: the original anchor-based YOLOv5 / YOLOv7 -------------------------------------------
def run_cli(*args):
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/reproduce.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env)


TINY = ["--bits", "4", "--fp-epochs", "1", "--qat-epochs", "1", "--seeds", "0", "--imgsz", "64", "--batch", "4",
        "--calib-batches", "1", "--qc-steps", "1", "--qc-calib-images", "4"]


def check_original_cells(out, columns, task):
    from yolo_qat.models.facts import is_original
    from yolo_qat.models.checkpoint import load_checkpoint
    from yolo_qat.quant import is_quantized

    table = (out / "table.md").read_text()
    assert "Failed cells" not in table, table
    cells = json.loads((out / "summary.json").read_text())["cells"]
    assert {c["column"] for c in cells} == set(columns)
    assert all(c["box"] is not None and (c["mask"] is not None) == (task == "segment") for c in cells)
    assert all(c["qat"]["optimizer_steps"] == 2 for c in cells)
    for run in {c["qat"]["weights"] for c in cells}:
        model, _ = load_checkpoint(run)
        assert is_original(model) and is_quantized(model), run  # QAT ran on the anchor-based model
    return table, cells


def test_original_yolov5n_from_its_yaml_on_the_command_line(data, tmp_path):
    """The command that once ended in 'Detect.__init__() takes from 1 to 5 positional arguments but 6 were
    given' in the first QAT cell (Ultralytics' parse_model building the anchor-based yaml); then both ablations
    into the same out dir (in-process), reusing its runs: the QC ablation trains per-tensor and per-channel
    corrections on the EMA run, the decay sweep reuses a=0 (LSQ) and a=0.99 (EMA)."""
    out = tmp_path / "v5n"
    r = run_cli("--data", data, "--cfg", "yolov5n", "--methods", "lsq", "ema", "--qc", *TINY,
                "--project", tmp_path, "--name", "v5n")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table, _ = check_original_cells(out, ["LSQ", "LSQ+QC", "EMA", "EMA+QC"], "detect")
    assert "| model | FP | bits | LSQ | LSQ+QC | EMA | EMA+QC |" in table and "\n| yolov5n | " in table
    assert "mask mAP50-95" not in table
    assert json.loads((out / "fp.json").read_text())["task"] == "detect"

    same = ["--data", data, "--cfg", "yolov5n", *TINY, "--project", tmp_path, "--name", "v5n"]
    assert reproduce_in_process(*same, "--ablation", "ema-decay", "--decays", "0", "0.99") == 0
    assert "| model | FP | bits | a=0 | a=0.99 |" in (out / "table-ema-decay.md").read_text()
    assert reproduce_in_process(*same, "--ablation", "qc") == 0
    qc = (out / "table-qc.md").read_text()
    assert "| 4 | per-tensor | " in qc and "| 4 | per-channel | " in qc and "Failed cells" not in qc
    cells = json.loads((out / "summary-qc.json").read_text())["cells"]
    assert len(cells) == 7 and all(c["qc_steps"] == 1 for c in cells if c["qc"])
    assert len(list((out / "runs").glob("w4-*/weights/last.pt"))) == 2  # no QAT run beyond the main table's


@pytest.fixture(scope="module")
def data3(data, tmp_path_factory):
    """The tiny embedded set with 3 classes (class 3 relabelled 0): the fixtures' nc, so that they can teach."""
    import shutil

    import yaml

    root = tmp_path_factory.mktemp("ds3") / "ds"
    shutil.copytree(data.parent, root, ignore=shutil.ignore_patterns("*.cache"))
    for f in (root / "labels").rglob("*.txt"):
        f.write_text("".join("0" + line[1:] if line.startswith("3 ") else line
                             for line in f.read_text().splitlines(keepends=True)))
    cfg = yaml.safe_load(data.read_text())
    cfg.update(path=str(root), names={i: cfg["names"][i] for i in range(3)})
    (root / "d3.yaml").write_text(yaml.safe_dump(cfg))
    return root / "d3.yaml"


def reproduce_in_process(*args):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce as rep

    return rep.main([str(a) for a in args])


@needs_fixtures
def test_original_yolov7_tiny_checkpoint_every_method(data3, tmp_path):
    """--weights yolov7-tiny as WongKinYiu/yolov7's train.py saves it (fp16 pickle of models.yolo.Model with
    IDetect): Dampen and kd (the fixture as teacher), each with the label-free QC variant."""
    out = tmp_path / "v7t"
    assert reproduce_in_process("--data", data3, "--weights", FIX / "yolov7-tiny-orig.pt", "--methods", "dampen",
                                "kd", "--qc", "--qc-variants", "label-free", *TINY, "--project", tmp_path,
                                "--name", "v7t") == 0
    table, cells = check_original_cells(out, ["Dampen", "Dampen+QC(KD, no labels)", "EMA+KD",
                                              "EMA+KD+QC(KD, no labels)"], "detect")
    assert "FP from " in table and "yolov7-tiny-orig.pt" in table
    kd = next(c for c in cells if c["column"] == "EMA+KD")
    assert kd["qat"]["distill"]["teacher"] == str(FIX / "yolov7-tiny-orig.pt")


@needs_fixtures
def test_original_yolov5n_seg_checkpoint(data3, tmp_path):
    """--weights yolov5n-seg as ultralytics/yolov5's segment/train.py saves it: Freeze with QC (labels) and the
    QC(KD) variant; box and mask columns."""
    out = tmp_path / "v5nseg"
    assert reproduce_in_process("--data", data3, "--weights", FIX / "yolov5n-seg-orig.pt", "--methods", "freeze",
                                "--qc", "--qc-variants", "labels", "kd", *TINY, "--project", tmp_path,
                                "--name", "v5nseg") == 0
    table, _ = check_original_cells(out, ["Freeze", "Freeze+QC", "Freeze+QC(KD)"], "segment")
    assert "mask mAP50-95" in table


def test_bit_width_tokens():
    """--bits takes WnAn as N and WnAm as NaM (the W4A8 row beside W4A4 and W3A3); run names stay w4 / w3."""
    import argparse

    from benchmarks.reproduce import Cell, bit_widths, bits_label, bits_token

    assert [bits_token(s) for s in ("4", "3", "4a8", "3A3", " 4a4 ")] == ["4", "3", "4a8", "3", "4"]
    assert bit_widths("4a8") == (4, 8) and bit_widths("3") == (3, 3) and bits_label("4a8") == "W4A8"
    assert Cell("4", "lsq", 0.99, 0, "EMA").qat_key == "w4-lsq-ema0.99-s0"  # the names of earlier runs
    assert Cell("4a8", "lsq", 0.99, 0, "EMA").qat_key == "w4a8-lsq-ema0.99-s0"
    for bad in ("9", "4a1", "w4", "4a8a8"):
        with pytest.raises(argparse.ArgumentTypeError):
            bits_token(bad)


def test_out_dir_of_another_target_is_refused(tmp_path):
    """A re-run with another --target must not reuse the cells (an out dir from before targets is 'sim')."""
    from types import SimpleNamespace

    from benchmarks.reproduce import SETTINGS, check_settings
    from yolo_qat.engine.cli_common import InputError

    a = SimpleNamespace(out=str(tmp_path), **{k: None for k in SETTINGS})
    a.target = "sim"
    (tmp_path / "settings.json").write_text(json.dumps({k: None for k in SETTINGS if k != "target"}))
    check_settings(a, with_qc=False)  # an old dir: the same as sim
    assert json.loads((tmp_path / "settings.json").read_text())["target"] == "sim"
    a.target = "ort"
    with pytest.raises(InputError, match="--target ort"):
        check_settings(a, with_qc=False)
