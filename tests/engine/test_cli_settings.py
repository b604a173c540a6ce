"""Settings declared once, command lines alike.

Every field of QuantRecipe, QATConfig and QCConfig reaches its dataclass from the command line and from a
--config yaml of the script that uses it; the fields are found by introspection, so a field added later is
covered without editing this file. QCConfig mirrors run_qc's keywords. The scripts share their flags, one
boolean style and one error format. Parsing only: nothing here trains."""
import argparse
import ast
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

import correct_qc
import export
import val
from yolo_qat.engine import cli, cli_export, cli_qc, cli_val
from yolo_qat.engine.cli_common import output_dir
from yolo_qat.engine.config import QATConfig, QCConfig
from yolo_qat.engine.exporting import verify_images
from yolo_qat.engine.settings import _members, default_of, setting_fields
from yolo_qat.quant import QuantRecipe

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import reproduce  # noqa: E402

RECIPE = {f.name for f in dataclasses.fields(QuantRecipe)}
NOT_SETTINGS = {"model", "data", "save_dir", "weights_dir", "checkpoint_extra", "report_extra"}  # run_qc plumbing


def train_qat_config(argv):
    cfg = cli.qat_config(cli.parse_args([*argv, "--cfg", "yolov5nu"]))  # any flag: not the demo
    return {**cfg.recipe, **dataclasses.asdict(cfg)}


def correct_qc_config(argv):
    a = cli_qc.parse_args(["--weights", "w.pt", *argv])
    a.imgsz = a.imgsz or 64  # what main() takes from the checkpoint
    return dataclasses.asdict(cli_qc.qc_config(a))


# (dataclass, the script's builder); QATConfig's recipe field is set through QuantRecipe's fields
CASES = {"QuantRecipe+QATConfig (train_qat.py)": (QATConfig, train_qat_config),
         "QCConfig (correct_qc.py)": (QCConfig, correct_qc_config)}
FIELDS = [(case, f.name) for case, (cls, _) in CASES.items() for f, _ in setting_fields(cls)]


def accepted(cls, name, value) -> bool:
    try:
        (QuantRecipe if name in RECIPE else cls)(**{name: value})
        return True
    except ValueError:
        return False


def other_value(cls, name):
    """A valid value other than the default, from the field's type and the dataclass's own check."""
    f, hint = next((f, h) for f, h in setting_fields(cls) if f.name == name)
    default, kinds = default_of(f), _members(hint)
    tries = []
    if bool in kinds:
        tries = [not default]
    elif int in kinds:
        tries = [(default or 0) + 1, (default or 0) - 1, 2, 3, 5]
    elif float in kinds:
        tries = [(default or 1.0) / 2, 0.5, 0.1]
    elif list in kinds:
        tries = [["model.1.conv", "model.2.conv"]]
    elif dict in kinds:
        tries = [{"model.1.conv": {"w_bits": 8, "a_bits": 6}}]
    elif str in kinds:
        try:  # a choice: the check names the allowed values
            (QuantRecipe if name in RECIPE else cls)(**{name: "no-such-value"})
            tries = ["some/path"]
        except ValueError as e:
            tries = list(ast.literal_eval(re.search(r"allowed values are (\(.*?\))", str(e)).group(1)))
    if type(None) in kinds:
        tries.append(None)
    value = next((v for v in tries if v != default and accepted(cls, name, v)), "none found")
    assert value != "none found", f"no valid non-default value of {cls.__name__}.{name} among {tries}"
    return value


def as_flags(name, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        return [flag, *value]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, "none" if value is None else str(value)]


@pytest.mark.parametrize("case,name", FIELDS)
def test_every_field_is_reachable_from_the_command_line_and_from_config(case, name, tmp_path):
    cls, build = CASES[case]
    if name == "device":  # one device here: the shared --device is checked in test_the_scripts_share_their_flags
        assert build(["--device", "cpu"])["device"] == "cpu"
        return
    value = other_value(cls, name)
    assert build([])[name] != value
    assert build(as_flags(name, value))[name] == value
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({name: value}))
    assert build(["--config", str(recipe)])[name] == value
    assert build(["--config", str(recipe), *as_flags(name, default_of(
        next(f for f, _ in setting_fields(cls) if f.name == name)))])[name] != value  # the command line wins


def test_defaults_are_the_dataclasses_and_every_field_has_help():
    assert cli.qat_config(cli.parse_args(["--cfg", "yolov5nu"])) == QATConfig()
    qc = correct_qc_config([])
    assert {k: v for k, v in qc.items() if k not in ("imgsz", "device")} == \
        {k: v for k, v in dataclasses.asdict(QCConfig()).items() if k not in ("imgsz", "device")}
    for cls in (QuantRecipe, QATConfig, QCConfig):
        for f, _ in setting_fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_qc_config_mirrors_run_qc():
    from yolo_qat.engine.qc import run_qc

    params = inspect.signature(run_qc).parameters
    fields = {f.name: f for f in dataclasses.fields(QCConfig)}
    assert set(params) - NOT_SETTINGS == set(fields), "run_qc's settings and QCConfig's fields differ"
    for name, f in fields.items():
        assert params[name].default == f.default, name


def test_bad_config_values_are_one_paragraph(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    for text, expect in (("ema_decay: [0.9]\n", "'ema_decay' = [0.9] is invalid: expected float"),
                         ("overrides: {model.1.conv: {w_bits: 12}}\n", "overrides"),
                         ("no_such_setting: 1\n", "unknown key(s) ['no_such_setting']")):
        bad.write_text(text)
        assert cli.main(["--cfg", "yolov5nu", "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("train_qat.py: error: ") and err.count("\n") == 1 and expect in err, err
    bad.write_text("lr: -1\n")
    assert correct_qc.main(["--weights", str(tmp_path / "missing.pt"), "--config", str(bad)]) == 2
    assert "correct_qc.py: error: " in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own check of a typed flag
        cli.parse_args(["--overrides", "[1, 2]"])


SHARED = ["--weights", "w.pt", "--data", "d.yaml", "--imgsz", "96", "--batch", "3", "--device", "cpu",
          "--project", "p", "--name", "n", "--exist-ok"]
PARSERS = {"train_qat.py": cli.build_parser, "correct_qc.py": cli_qc.build_parser, "val.py": cli_val.build_parser,
           "export.py": cli_export.build_parser, "reproduce.py": reproduce.build_parser}


@pytest.mark.parametrize("prog", PARSERS)
def test_the_scripts_share_their_flags(prog):
    parser = PARSERS[prog]()
    a = parser.parse_args(SHARED)
    assert (a.weights if prog != "val.py" else a.weights[0]) == "w.pt"
    assert (a.data, a.imgsz, a.batch, a.device, a.project, a.name, a.exist_ok) == ("d.yaml", 96, 3, "cpu", "p", "n", True)
    assert parser.parse_args([*SHARED, "--no-exist-ok"]).exist_ok is False
    booleans = [x for x in parser._actions if x.nargs == 0 and not isinstance(x, argparse._HelpAction)]
    assert booleans and all(isinstance(x, argparse.BooleanOptionalAction) for x in booleans), \
        [x.option_strings for x in booleans]  # one boolean style: --flag / --no-flag


def test_input_errors_share_prefix_and_status(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.yaml"
    data.write_text("path: .\n")
    missing = str(tmp_path / "missing.pt")
    runs = {"train_qat.py": lambda: cli.main(["--weights", missing, "--data", str(data)]),
            "correct_qc.py": lambda: correct_qc.main(["--weights", missing]),
            "val.py": lambda: val.main(["--weights", missing]),
            "export.py": lambda: export.main(["--weights", missing]),
            "reproduce.py": lambda: reproduce.main(["--data", str(tmp_path / "missing.yaml")])}
    for prog, run in runs.items():
        assert run() == 2, prog
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and "missing" in err[0], (prog, err)


def test_outputs_are_numbered_like_ultralytics_runs(tmp_path):
    opt = argparse.Namespace(project=str(tmp_path / "runs" / "qc"), name="exp", exist_ok=False)
    assert output_dir(opt) == tmp_path / "runs" / "qc" / "exp"
    (tmp_path / "runs" / "qc" / "exp").mkdir(parents=True)
    assert output_dir(opt) == tmp_path / "runs" / "qc" / "exp-2"
    opt.exist_ok = True
    assert output_dir(opt) == tmp_path / "runs" / "qc" / "exp"


def test_imgsz_defaults_to_the_checkpoint_training_size(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    from yolo_qat.models.checkpoint import save_checkpoint

    model = DetectionModel("yolov5nu.yaml", nc=3, verbose=False)
    model.args = {"imgsz": 96, "task": "detect"}
    ckpt = save_checkpoint(tmp_path / "fp.pt", model)
    data = tmp_path / "d.yaml"
    data.write_text("path: .\n")
    for argv, imgsz in (([], 96), (["--imgsz", "64"], 64)):
        opt = cli.parse_args(["--weights", str(ckpt), "--data", str(data), *argv])
        data_yaml, source = cli.resolve_inputs(opt)
        assert (data_yaml, source.path, source.task) == (str(data), str(ckpt), "detect") and opt.imgsz == imgsz
    opt = cli.parse_args(["--cfg", "yolov5nu", "--data", str(data)])
    cli.resolve_inputs(opt)
    assert opt.imgsz == 640  # a model yaml says nothing: Ultralytics' default


def test_format_table_shows_only_the_sources_that_scored():
    from yolo_qat.engine.validate import format_table

    trained = {"QAT": {"task": "detect", "ultralytics": {"box.map": 0.25, "box.map50": 0.5}}}
    text = format_table(trained).splitlines()
    assert text[0] == "box.map = box mAP50-95, box.map50 = box mAP50; ultra = Ultralytics' validator"
    assert "coco" not in text[1] and text[2].split() == ["QAT", "25.00", "50.00"]
    both = {**trained, "QC": {"task": "segment", "ultralytics": {"box.map": 0.1}, "pycocotools": {"mask.map": 0.2}}}
    text = format_table(both).splitlines()
    assert "mask.map = mask mAP50-95" in text[0] and "coco = pycocotools COCOeval" in text[0]
    assert text[1].split()[3:11] == ["box.map", "ultra", "box.map", "coco", "box.map50", "ultra", "box.map50", "coco"]
    assert text[3].split() == ["QC", "10.00", "-", "-", "-", "-", "20.00", "-", "-"]


def test_export_verifies_on_validation_images_of_data(tmp_path, capsys):
    from ultralytics.nn.tasks import DetectionModel

    from yolo_qat.data.embedded import ensure_embedded_dataset
    from yolo_qat.models.checkpoint import save_checkpoint
    from yolo_qat.quant import calibrate, quantize_model

    data = ensure_embedded_dataset(root=tmp_path / "ds", n_train=2, n_val=3, imgsz=64)
    x = verify_images(data, 64, 4)
    assert x.shape == (4, 3, 64, 64) and 0 <= x.min() and x.max() <= 1 and torch.equal(x[3], x[0])  # 3 images
    assert x[:3].std(dim=(1, 2, 3)).min() > 0.01 and not torch.equal(x[0], x[1])
    torch.manual_seed(0)
    q = quantize_model(DetectionModel("yolov5nu.yaml", nc=3, verbose=False), {"w_bits": 4, "a_bits": 4}).eval()
    calibrate(q, [x], num_batches=1)
    ckpt = save_checkpoint(tmp_path / "q.pt", q)
    assert export.main(["--weights", str(ckpt), "--format", "packed", "--imgsz", "64", "--batch", "2",
                        "--data", str(data), "--project", str(tmp_path / "out"), "--name", "v"]) == 0
    out = capsys.readouterr().out
    assert "reloads to identical outputs on 2 validation image(s)" in out
    assert (tmp_path / "out" / "v" / "q.qpk").is_file()
