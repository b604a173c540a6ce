"""Crafted input files beyond the pickle (models/yaml_rule.py, models/load_limits.py, engine/data_download.py,
engine/resume_dir.py, deploy/onnx_files.py): one file per class, through every entry point that reads that kind of
file. Each is refused with exit 2 and one paragraph, no traceback, nothing it names runs (no marker file) and
nothing is written (the run directory stays empty); a resumed run writes only into its own directory.

Classes: a model yaml whose layer is a model class carrying a second yaml with code, a dict-shaped layer, a module
tree shared level by level (a DAG: 2^64 paths for float()), a module tree 100 levels deep, a compression bomb, data
yamls whose download: is Python or bash, a last.pt whose train_args point the run elsewhere, ONNX files whose
external data lies outside their folder (../ and absolute). The real checkpoints still load: tests/models/test_safe_load.py
loads the original-code fixtures, Ultralytics', ours and the previous release's through the same loader.
"""
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import correct_qc
from yolo_qat import deploy
import yolo_qat.engine.cli as cli
import export
import test_safe_load as tsl
import val
from benchmarks import reproduce
from yolo_qat.models.checkpoint import load_checkpoint, save_checkpoint
from yolo_qat.models.safe_load import TRUST_ENV, UnsafeCheckpointError, safe_load

ROOT = Path(__file__).resolve().parents[2]
HANG_GUARD_S = 300  # fails a hang; the DAG is refused in well under a second


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.delenv("YOLO_QAT_DOWNLOAD", raising=False)


@pytest.fixture(scope="module")
def fp(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("fp") / "fp.pt", tsl.tiny_model())


def assert_refused(code, err, prog, *words):
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("W1")]  # torch's CUDA warning
    errors = [ln for ln in lines if ln.startswith(f"{prog}: error:")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    for w in words:
        assert w in errors[0], errors[0]


def files(d: Path) -> set:
    return {p for p in d.rglob("*") if p.is_file()}


def assert_written_only_under(runs: Path, before: set):
    """No file appeared in the test's directory (the working directory of the calls) outside ``runs``."""
    new = {p for p in files(runs.parent) - before if runs not in p.parents}
    assert not new, sorted(new)


# -- crafted checkpoints -----------------------------------------------------------------------------------------
def evil_activation(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}') or nn.SiLU()"


def nested_model_class(d: Path, marker: Path) -> Path:
    """A layer whose module is DetectionModel: Ultralytics would build its argument, a second yaml, eval included."""
    m = tsl.tiny_model()
    inner = {**m.yaml, "activation": evil_activation(marker)}
    m.yaml = {**m.yaml, "head": [*m.yaml["head"][:-1], [-1, 1, "DetectionModel", [inner]], m.yaml["head"][-1]]}
    return save_checkpoint(d / "nested.pt", m)


def dict_layer(d: Path, marker: Path) -> Path:
    """A dict layer: parse_model unpacks its keys as (from, n, module, args), so a key names any tasks function."""
    m = tsl.tiny_model()
    m.yaml = {**m.yaml, "head": [*m.yaml["head"][:-1], {-1: 0, 1: 0, "torch_safe_load": 0, str(marker): 0},
                                 m.yaml["head"][-1]]}
    return save_checkpoint(d / "dict_layer.pt", m)


def shared_dag(d: Path, marker: Path) -> Path:
    """64 levels, each module holding the one below twice: float() / to() would walk 2^64 paths."""
    m = tsl.tiny_model()
    node = nn.Identity()
    for _ in range(64):
        level = nn.Sequential()
        level.add_module("a", node)
        level.add_module("b", node)
        node = level
    m.model[0].add_module("dag", node)
    path = d / "dag.pt"
    torch.save({"model": m, "ema": None, "train_args": {}}, path)  # (save_checkpoint would float() it)
    return path


def deep_tree(d: Path, marker: Path) -> Path:
    m = tsl.tiny_model()
    node = nn.Identity()
    for _ in range(100):
        node = nn.Sequential(node)
    m.model[0].add_module("deep", node)
    path = d / "deep.pt"
    torch.save({"model": m, "ema": None, "train_args": {}}, path)
    return path


def zip_bomb(d: Path, marker: Path) -> Path:
    """A real checkpoint whose largest record is replaced by 256 MiB of zeros, deflated (a ~250 KB file)."""
    src = save_checkpoint(d / "src.pt", tsl.tiny_model())
    path = d / "bomb.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        largest = max(zin.infolist(), key=lambda i: i.file_size).filename
        for info in zin.infolist():
            if info.filename != largest:
                zout.writestr(info.filename, zin.read(info.filename))
                continue
            with zout.open(info.filename, "w", force_zip64=True) as f:
                chunk = bytes(1 << 20)
                for _ in range(256):
                    f.write(chunk)
    return path


CHECKPOINTS = {"nested model class": (nested_model_class, "layer module 'DetectionModel'"),
               "dict layer": (dict_layer, "not a list [from, n, module, args]"),
               "deep tree": (deep_tree, "more than 64 levels deep"),
               "zip bomb": (zip_bomb, "compression bomb")}


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_crafted_checkpoint_through_every_entry_point(kind, data, fp, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    make, words = CHECKPOINTS[kind]
    path = make(tmp_path, marker)
    before = files(tmp_path)
    for name, (run, prog) in tsl.entry_points(data, fp, tmp_path).items():
        code = run(path)
        assert_refused(code, capsys.readouterr().err, prog, f"refused to load '{path}'", words)
        assert not marker.exists(), name
        assert_written_only_under(tmp_path / "runs", before)
    for load in (safe_load, load_checkpoint, deploy.load_packed):  # the Python API
        with pytest.raises(UnsafeCheckpointError, match=words.replace("[", r"\[")):
            load(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["nested model class", "dict layer"])
def test_crafted_model_yaml_in_a_packed_file_and_a_cfg_file(kind, data, tmp_path, capsys):
    """The same yamls in a packed file (load_packed rebuilds from it) and as train_qat.py --cfg."""
    marker = tmp_path / "PWNED"
    make, words = CHECKPOINTS[kind]
    model_yaml = load_checkpoint(make(tmp_path, marker), trust=True)[0].yaml
    payload = torch.load(tsl.PREV_QPK, weights_only=True)
    payload["yaml"] = model_yaml
    torch.save(payload, tmp_path / "evil.qpk")
    with pytest.raises(UnsafeCheckpointError, match=words.replace("[", r"\[")):
        deploy.load_packed(tmp_path / "evil.qpk")
    runs = ["--project", str(tmp_path / "runs"), "--data", str(data), *tsl.TINY]
    assert_refused(cli.main(["--weights", str(tmp_path / "evil.qpk"), *runs]), capsys.readouterr().err,
                   "train_qat.py", words)
    import yaml

    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(model_yaml))
    assert_refused(cli.main(["--cfg", str(tmp_path / "evil.yaml"), "--fp-epochs", "1", *runs]),
                   capsys.readouterr().err, "train_qat.py", "refused to build", words)
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()


def test_shared_children_dag_is_refused_without_hanging(fp, data, tmp_path):
    """Every checkpoint entry point on the DAG, in one child process the test kills only if it hangs."""
    marker = tmp_path / "PWNED"
    path = shared_dag(tmp_path, marker)
    before = files(tmp_path)
    driver = textwrap.dedent(f"""
        import contextlib, io, json, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests' / 'models')!r}, {str(ROOT / 'tests')!r}]
        from pathlib import Path
        from yolo_qat import deploy; import test_safe_load as tsl
        from yolo_qat.models.checkpoint import load_checkpoint
        out = []
        points = tsl.entry_points(Path({str(data)!r}), Path({str(fp)!r}), Path({str(tmp_path)!r}))
        for name, (run, prog) in points.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = run(Path({str(path)!r}))
            out.append([name, prog, code, err.getvalue()])
        for load in (load_checkpoint, deploy.load_packed):
            try:
                load({str(path)!r})
                out.append([load.__name__, "", 0, "loaded"])
            except ValueError as e:
                out.append([load.__name__, "", 2, str(e)])
        print("RESULTS" + json.dumps(out))
    """)
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    try:
        r = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading the shared-children DAG hung for {HANG_GUARD_S} s")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.split("RESULTS", 1)[1])
    assert len(results) == 8
    for name, prog, code, err in results:
        if prog:
            assert_refused(code, err, prog, "the child of two modules")
        else:
            assert code == 2 and "the child of two modules" in err and "\n" not in err, (name, err)
    assert not marker.exists()
    assert_written_only_under(tmp_path / "runs", before)


# -- data yamls ---------------------------------------------------------------------------------------------------
def data_yaml(d: Path, kind: str, marker: Path) -> Path:
    """A dataset yaml whose val split is missing and whose download: would create ``marker``."""
    script = (f"download: |\n  open({str(marker)!r}, 'w').close()\n" if kind == "python" else
              f"download: bash -c touch${{IFS}}{marker}\n")
    path = d / f"{kind}.yaml"
    path.write_text(f"path: {d / 'ds'}\ntrain: images/train\nval: images/val\nnames: {{0: a}}\n{script}")
    return path


@pytest.mark.parametrize("kind", ["python", "bash"])
def test_data_yaml_download_runs_only_when_asked(kind, fp, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    evil = str(data_yaml(tmp_path, kind, marker))
    runs = ["--project", str(tmp_path / "runs")]
    prev = str(tsl.PREV_PT)
    scripts = {
        "train_qat.py": lambda: cli.main(["--weights", str(fp), "--data", evil, *tsl.TINY, *runs]),
        "correct_qc.py": lambda: correct_qc.main(["--weights", prev, "--data", evil, "--imgsz", "64", "--steps", "1",
                                                  *runs]),
        "val.py": lambda: val.main(["--weights", prev, "--data", evil, *runs]),
        "export.py": lambda: export.main(["--weights", prev, "--format", "packed", "--data", evil,
                                          "--output", str(tmp_path / "runs" / "x.qpk")]),
        "reproduce.py": lambda: reproduce.main(["--weights", str(fp), "--data", evil, *runs]),
    }
    before = files(tmp_path)
    for prog, run in scripts.items():
        code = run()
        assert_refused(code, capsys.readouterr().err, prog, "'val' split", str(tmp_path / "ds" / "images" / "val"),
                       "--download")
        assert not marker.exists(), prog
        assert not (tmp_path / "runs").exists() and files(tmp_path) == before, prog  # refused before any output
    from yolo_qat.engine.data_download import MissingSplitError, check_dataset

    with pytest.raises(MissingSplitError):  # the Python API
        check_dataset(evil)
    assert not marker.exists()
    monkeypatch.setenv("YOLO_QAT_DOWNLOAD", "1")  # asked for: the yaml's download runs (as data/coco.yaml's must)
    check_dataset(evil)
    assert marker.exists()


# -- resume ------------------------------------------------------------------------------------------------------
def test_resume_writes_only_into_the_checkpoints_own_run(data, tmp_path, capsys):
    """A last.pt whose train_args name another directory (another run's, say): the resumed run's directory is the
    file's own (.../weights/last.pt -> ...), with one note, and the other directory stays untouched."""
    from yolo_qat.engine.trainer import qat_trainer_class

    victim = tmp_path / "other-run"
    (victim / "weights").mkdir(parents=True)
    (victim / "weights" / "best.pt").write_bytes(b"another run's weights")
    ckpt = safe_load(tsl.PREV_PT)
    ckpt["train_args"].update(save_dir=str(victim), project=str(tmp_path), name=victim.name, data=str(data))
    last = tmp_path / "mine" / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save(ckpt, last)
    before = {p: p.stat().st_mtime_ns for p in victim.rglob("*")}
    trainer = qat_trainer_class("detect")(overrides={"model": str(last), "resume": str(last)})  # as --resume runs it
    assert trainer.save_dir == tmp_path / "mine" and trainer.last == last
    assert {p: p.stat().st_mtime_ns for p in victim.rglob("*")} == before
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("resume: note:")]
    assert len(notes) == 1 and str(victim) in notes[0] and str(tmp_path / "mine") in notes[0], notes


# -- ONNX external data -----------------------------------------------------------------------------------------
def onnx_with_external(path: Path, location: str) -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "4")):
        e = w.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Add", ["images", "w"], ["output0"])], "g",
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
                          [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 64, 64])], [w])
    m = helper.make_model(g)
    for k, v in (("names", "{0: 'a'}"), ("stride", "32")):
        m.metadata_props.add(key=k, value=v)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname"])
def test_onnx_external_data_outside_its_folder_is_refused(location, tmp_path, capsys):
    from yolo_qat.deploy.verify import ort_session

    (tmp_path / "secret.bin").write_bytes(b"\0\0\x80?")
    path = onnx_with_external(tmp_path / "model" / "m.onnx", location)
    code = val.main(["--weights", str(path), "--project", str(tmp_path / "runs")])
    assert_refused(code, capsys.readouterr().err, "val.py", f"keeps its data in '{location}'", "outside")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="outside the file's folder"):  # export.py's check runs files through it
        ort_session(path)
