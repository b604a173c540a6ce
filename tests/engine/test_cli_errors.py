"""Values that Ultralytics' own argument check rejects end in train_qat.py's one-paragraph error (exit 2),
found before the dataset is touched or a model built."""
import pytest

import yolo_qat.engine.cli as cli

BASE = ["--cfg", "yolov5nu", "--epochs", "1", "--imgsz", "64", "--batch", "4", "--workers", "0"]


@pytest.fixture
def no_slow_work(monkeypatch, tmp_path):
    """Fail the test if the run gets as far as the dataset (the first slow step)."""
    def reached(opt):
        raise AssertionError("the argument error was not caught before the dataset step")

    monkeypatch.setattr(cli, "resolve_inputs", reached)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("args,flag,expect", [
    (["--lr0", "1e6"], "--lr0", "between 0.0 and 1.0"),
    (["--epochs", "0"], "--epochs", "must be >= 1"),
    (["--seed", "-3"], "--seed", "must be >= 0"),
    (["--batch", "0"], "--batch", "'nbs' must be >= 1"),  # --nbs defaults to --batch
    (["--fp-epochs", "2", "--fp-lr0", "5"], "--fp-lr0", "(FP stage)"),
    ("config:lr0: [0.1, 0.2]", "--lr0", "invalid type list"),  # a wrong type that argparse lets through
])
def test_ultralytics_argument_errors_are_one_paragraph(args, flag, expect, no_slow_work, capsys):
    if isinstance(args, str):
        recipe = no_slow_work / "r.yaml"
        recipe.write_text(args.split(":", 1)[1] + "\n")
        args = ["--config", str(recipe)]
    code = cli.main([*BASE, *args, "--project", str(no_slow_work / "runs")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"train_qat.py: error: {flag} "), err
    assert "rejected by Ultralytics' argument check" in err and expect in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("args,expect", [
    (["--loss-hyp", "{dfl: 1.0}"], "--loss-hyp: unknown YOLOv5 loss setting(s) ['dfl']"),
    (["--loss-hyp", "{obj: -2}"], "--loss-hyp: YOLOv5 loss setting obj=-2 is invalid"),
    (["--loss-hyp", "{obj: 25}"], "--loss-hyp sets the YOLOv5 loss of the original anchor-based models"),
])
def test_loss_hyp_errors(args, expect, monkeypatch, tmp_path, capsys):
    """--loss-hyp is checked, and refused for an anchor-free model (yolov5nu), before any training."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "train_fp", lambda *a: (_ for _ in ()).throw(AssertionError("training started")))
    import yolo_qat.engine.trainer

    monkeypatch.setattr(yolo_qat.engine.trainer, "qat_trainer_class",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("QAT started")))
    code = cli.main([*BASE, *args, "--project", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err, err


def test_distill_errors_are_one_paragraph(monkeypatch, tmp_path, capsys):
    """--distill without a teacher to default to, and a teacher for other classes: exit 2, no traceback, no step."""
    from ultralytics.nn.tasks import DetectionModel

    from yolo_qat.models.checkpoint import save_checkpoint
    from yolo_qat.models.yaml_rule import resolve_model_cfg

    monkeypatch.chdir(tmp_path)
    args = [*BASE, "--project", str(tmp_path / "runs")]
    assert cli.main([*args, "--distill"]) == 2
    err = capsys.readouterr().err
    assert "built from a yaml without weights" in err and "--teacher FP.pt" in err and "Traceback" not in err
    paths = {}
    for nc in (4, 80):
        model = DetectionModel(str(resolve_model_cfg("yolov5nu")), nc=nc, verbose=False)
        model.names = {i: str(i) for i in range(nc)}
        paths[nc] = save_checkpoint(tmp_path / f"fp{nc}.pt", model)
    weights = ["--weights", str(paths[4])]
    assert cli.main([*args[2:], *weights, "--distill", "--teacher", str(paths[80])]) == 2
    err = capsys.readouterr().err
    assert "teacher has nc 80 (student 4)" in err and "Traceback" not in err
