"""One command, ``yolo-qat <mode>``, over the pipeline API: every mode's help, the root scripts as thin callers
(also from another directory), and a tiny real run through the API (train_qat -> correct_qc -> validate ->
export) and through each mode on its outputs."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

import yolo_qat
from yolo_qat.cli import MODES, main
from yolo_qat.models.checkpoint import load_checkpoint, save_checkpoint
from yolo_qat.quant import is_quantized

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"train": "train_qat.py", "qc": "correct_qc.py", "val": "val.py", "export": "export.py",
           "allocate": "mixed_precision.py"}
TINY = {"imgsz": 64, "batch": 4, "workers": 0, "calib_batches": 1, "warmup_epochs": 0.0, "device": "cpu"}


def test_help_lists_every_mode(capsys):
    assert main(["--help"]) == 0 and main([]) == 0
    out = capsys.readouterr().out
    assert all(f"  {mode} " in out for mode in SCRIPTS) and set(MODES) == set(SCRIPTS)
    assert main(["bogus"]) == 2 and "unknown mode 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", SCRIPTS)
def test_each_mode_has_its_flags(mode, capsys):
    assert main([mode, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: yolo-qat {mode} ") and "--weights" in out and "--data" in out


@pytest.mark.parametrize("mode,script", SCRIPTS.items())
def test_root_scripts_only_call_their_mode(mode, script):
    """No parser, no stage code: the script hands its arguments to ``yolo-qat <mode>`` under its own name."""
    tree = ast.parse((ROOT / script).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert "argparse" not in names and names <= {"sys", "main"}
    assert f'["{mode}", *(sys.argv[1:] if argv is None else argv)], prog="{script}"' in (ROOT / script).read_text()


def test_a_root_script_runs_from_another_directory(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "val.py"), "--weights", "missing.pt"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("val.py: error: checkpoint(s) ['missing.pt'] do not exist")


def test_errors_name_the_mode(tmp_path, capsys):
    assert main(["qc", "--weights", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.startswith("yolo-qat qc: error: --weights ")


@pytest.fixture(scope="module")
def fp(data, tmp_path_factory):
    torch.manual_seed(0)
    model = DetectionModel("yolov5nu.yaml", nc=4, verbose=False)  # the embedded dataset's 4 classes
    model.names = {i: str(i) for i in range(4)}
    model.args = {"imgsz": 64, "task": "detect"}
    return save_checkpoint(tmp_path_factory.mktemp("fp") / "fp.pt", model)


@pytest.fixture(scope="module")
def pipeline_run(data, fp, tmp_path_factory):
    """The README's pipeline in Python on a tiny model: QAT by a preset, QC, validation, export."""
    out = tmp_path_factory.mktemp("api")
    run = yolo_qat.train_qat(str(fp), data=data, recipe="lsq_w4a4", epochs=1, project=str(out / "qat"), name="t",
                             **TINY)
    qc = yolo_qat.correct_qc(run.weights, data=data, steps=1, imgsz=64, batch=4, val=False,
                             project=str(out / "qc"), name="t")
    return out, run, qc


def test_the_pipeline_api_end_to_end(pipeline_run, data):
    out, run, qc = pipeline_run
    assert run.weights == run.save_dir / "weights" / "best.pt" and run.last.is_file() and run.weights.is_file()
    assert "metrics/mAP50-95(B)" in run.metrics
    model, _ = load_checkpoint(run.weights)
    assert is_quantized(model) and model.quant_recipe["w_bits"] == 4 and model.quant_recipe["a_bits"] == 4
    assert qc.weights.is_file() and qc.save_dir == out / "qc" / "t" and (qc.save_dir / "qc_report.json").is_file()
    metrics = yolo_qat.validate(qc.weights, data=data, imgsz=64, batch=4, verbose=False)
    assert metrics["task"] == "detect" and set(metrics["pycocotools"]) == {"box.map", "box.map50"}
    assert metrics["weights"] == str(qc.weights)
    onnx = yolo_qat.export(qc.weights, format="onnx", output=out / "m.onnx")
    assert onnx.path == out / "m.onnx" and onnx.path.stat().st_size > 0 and onnx.verify["max_abs"] >= 0
    packed = yolo_qat.export(qc.weights, format="packed", output=out / "m.qpk")
    assert packed.path.is_file() and packed.verify == {"identical": True}


def test_the_modes_on_the_pipeline_outputs(pipeline_run, data, fp, tmp_path, monkeypatch, capsys):
    out, run, qc = pipeline_run
    monkeypatch.chdir(tmp_path)
    flags = ["--imgsz", "64", "--batch", "4"]
    assert main(["val", "--weights", str(qc.weights), "--data", str(data), *flags, "--json", "v.json"]) == 0
    assert set(json.loads(Path("v.json").read_text())) == {str(qc.weights)}
    assert main(["qc", "--weights", str(run.weights), "--data", str(data), *flags, "--steps", "1", "--no-val"]) == 0
    assert (tmp_path / "runs" / "qc" / "exp" / "weights" / "qc.pt").is_file()
    assert main(["export", "--weights", str(qc.weights), "--output", "q.onnx", "--imgsz", "64"]) == 0
    assert Path("q.onnx").is_file()
    assert main(["allocate", "--weights", str(fp), "--data", str(data), *flags, "--budget-bits", "6",
                 "--calib-batches", "1", "--project", "runs/mixed"]) == 0
    assert (tmp_path / "runs" / "mixed" / "exp" / "recipe.yaml").is_file()
    capsys.readouterr()
    # train: one QAT epoch from the FP checkpoint, by a preset name given to --config
    assert main(["train", "--weights", str(fp), "--data", str(data), "--config", "lsq_w4a4", "--epochs", "1",
                 "--imgsz", "64", "--batch", "4", "--workers", "0", "--calib-batches", "1", "--warmup-epochs", "0",
                 "--device", "cpu", "--project", "runs/qat"]) == 0
    model, _ = load_checkpoint(tmp_path / "runs" / "qat" / "exp" / "weights" / "last.pt")
    assert model.quant_recipe["a_bits"] == 4 and "QAT W4A4 lsq" in capsys.readouterr().out
