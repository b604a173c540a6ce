"""Safe checkpoint loading (models/safe_load.py; docs/safe-loading.md).

Crafted pickles (os.system, subprocess.Popen, builtins.eval / exec, importlib.import_module, a payload nested in
train_args or in a module's __dict__, in a packed file, a model class called with a poisoned yaml, a model yaml
whose activation is code) are refused before anything runs, through the four scripts, --resume, --teacher and the
Python API: exit 2 with one paragraph that names the global, and the file the payload would create is absent.
Everything users have loads unchanged: the original YOLOv5 / YOLOv7 fixtures, Ultralytics checkpoints (detect,
segment, fused, the trainer's), ours (QAT, BN re-estimated, QC, packed) and the previous release's files.
"""
import datetime
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from ultralytics.nn.tasks import DetectionModel

import correct_qc
from yolo_qat.models.pickled_names import renaming_pickle
from yolo_qat import deploy
import yolo_qat.engine.cli as cli
import export
import val
from yolo_qat.models.checkpoint import load_checkpoint, save_checkpoint
from yolo_qat.models.safe_load import TRUST_ENV, UnsafeCheckpointError, allowlist, safe_load, trusting

ROOT = Path(__file__).resolve().parents[2]
PREV = ROOT / "tests" / "fixtures" / "prev-release"
PREV_PT, PREV_QPK = PREV / "qat-yolov5nu-tiny-w4a4.pt", PREV / "qat-yolov5nu-tiny-w4a4.qpk"
ORIG = ROOT.parent / "shared" / "fixtures" / "original-yolo"
TINY = ["--imgsz", "64", "--batch", "4", "--workers", "0", "--calib-batches", "1", "--warmup-epochs", "0",
        "--exist-ok"]
SYSTEM = f"{os.system.__module__}.system"  # posix.system: the name os.system pickles under


class Payload:
    """Unpickles to ``fn(*args)``: what a malicious .pt does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)  # the tests set it themselves where they mean to


def tiny_model() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel(yaml.safe_load((PREV / "yolov5nu-tiny.yaml").read_text()), nc=2, verbose=False)


def crafted(kind: str, d: Path, marker: Path) -> tuple[Path, str]:
    """(path of a crafted checkpoint, the global its refusal names); loading it unsafely creates ``marker``."""
    touch = Payload(os.system, f"touch {marker}")
    path = d / f"{kind}.pt"
    if kind == "os.system":
        torch.save({"model": touch, "epoch": 1}, path)
    elif kind == "subprocess.Popen":
        torch.save({"model": Payload(subprocess.Popen, ["touch", str(marker)])}, path)
    elif kind in ("builtins.eval", "builtins.exec"):
        fn = eval if kind == "builtins.eval" else exec
        torch.save({"model": Payload(fn, f"open({str(marker)!r}, 'w').close()")}, path)
    elif kind == "importlib.import_module":
        mod = f"pwn_{abs(hash(str(d))) % 10**8}"
        (d / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        torch.save({"model": Payload(importlib.import_module, mod)}, path)
    elif kind == "train_args":
        save_checkpoint(path, tiny_model(), train_args={"data": "coco.yaml", "hook": touch})
    elif kind == "module_dict":
        m = tiny_model()
        m.model[0].conv.note = touch  # a plain attribute: pickled in the module's __dict__
        torch.save({"model": m, "ema": None, "train_args": {}}, path)  # (save_checkpoint's deepcopy would run it)
    elif kind == "packed":
        payload = torch.load(PREV_QPK, weights_only=True)
        payload["note"] = touch
        path = d / "packed.qpk"
        torch.save(payload, path)
    else:
        raise KeyError(kind)
    return path, {"os.system": SYSTEM, "train_args": SYSTEM, "module_dict": SYSTEM, "packed": SYSTEM}.get(kind, kind)


KINDS = ["os.system", "subprocess.Popen", "builtins.eval", "builtins.exec", "importlib.import_module", "train_args",
         "module_dict", "packed"]


@pytest.fixture
def payload(request, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))  # importlib.import_module's payload module is importable
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    path, name = crafted(request.param, tmp_path, marker)
    assert not marker.exists()
    return path, name, marker


def assert_refused(code, err, prog, name):
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("W1")]  # torch's CUDA warning
    refusals = [ln for ln in lines if ln.startswith(f"{prog}: error:")]
    assert code == 2, err[-3000:]
    assert len(refusals) == 1 and "refused to load" in refusals[0], err[-3000:]
    msg = refusals[0]
    assert f"'{name}'" in msg and "--trust-checkpoint" in msg and f"{TRUST_ENV}=1" in msg, msg
    assert "Traceback" not in err


def entry_points(data, fp, tmp):
    """name -> (argv runner, prog): every way a user hands this project a checkpoint on the command line."""
    runs = ["--project", str(tmp / "runs"), "--name", "r"]
    return {
        "val.py": (lambda p: val.main(["--weights", str(p), "--data", str(data), *runs]), "val.py"),
        "export.py": (lambda p: export.main(["--weights", str(p), "--format", "packed"]), "export.py"),
        "correct_qc.py": (lambda p: correct_qc.main(["--weights", str(p), "--data", str(data), *runs]),
                          "correct_qc.py"),
        "train_qat.py": (lambda p: cli.main(["--weights", str(p), "--data", str(data), "--epochs", "1", *TINY, *runs]),
                         "train_qat.py"),
        "--resume": (lambda p: cli.main(["--resume", str(p)]), "train_qat.py"),
        "--teacher": (lambda p: cli.main(["--weights", str(fp), "--distill", "--teacher", str(p), "--data", str(data),
                                          "--epochs", "1", *TINY, *runs]), "train_qat.py"),
    }


@pytest.fixture(scope="module")
def fp(tmp_path_factory):
    """A small FP checkpoint (the student of the --teacher runs)."""
    return save_checkpoint(tmp_path_factory.mktemp("fp") / "fp.pt", tiny_model())


@pytest.mark.parametrize("payload", KINDS, indirect=True)
@pytest.mark.parametrize("entry", ["val.py", "export.py", "correct_qc.py", "train_qat.py", "--resume", "--teacher"])
def test_crafted_checkpoint_is_refused_by_every_script(payload, entry, data, fp, tmp_path, capsys):
    path, name, marker = payload
    run, prog = entry_points(data, fp, tmp_path)[entry]
    code = run(path)
    assert_refused(code, capsys.readouterr().err, prog, name)
    assert not marker.exists(), "the payload ran"
    assert TRUST_ENV not in os.environ


@pytest.mark.parametrize("payload", KINDS, indirect=True)
def test_crafted_checkpoint_is_refused_by_the_python_api(payload):
    from yolo_qat.engine.distill import load_teacher
    from yolo_qat.engine.trainer import qat_trainer_class
    from yolo_qat.engine.validate import validate

    path, name, marker = payload
    for load in (load_checkpoint, safe_load, deploy.load_packed, load_teacher, validate,
                 lambda p: qat_trainer_class("detect")(overrides={"resume": str(p)})):  # Ultralytics' resume check
        with pytest.raises(UnsafeCheckpointError) as e:
            load(path)
        msg = str(e.value)
        assert msg.startswith(f"refused to load '{path}'") and f"'{name}'" in msg and "\n" not in msg, msg
        assert not marker.exists(), f"the payload ran in {load}"


def test_the_real_scripts_exit_2(tmp_path, fp, data):
    """The same through `python <script>` in a fresh process (one payload per script)."""
    marker = tmp_path / "PWNED"
    evil, name = crafted("os.system", tmp_path, marker)
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(TRUST_ENV, None)
    runs = ["--project", str(tmp_path / "runs")]
    for script, argv in (("val.py", ["--weights", str(evil), "--data", str(data), *runs]),
                         ("export.py", ["--weights", str(evil)]),
                         ("correct_qc.py", ["--weights", str(evil), *runs]),
                         ("train_qat.py", ["--weights", str(evil), "--data", str(data), *runs]),
                         ("train_qat.py", ["--resume", str(evil)])):
        r = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=tmp_path, capture_output=True, text=True,
                           env=env)
        assert_refused(r.returncode, r.stderr, script, name)
        assert not marker.exists(), argv


def test_correct_qc_teacher_is_refused(tmp_path, data, capsys):
    marker = tmp_path / "PWNED"
    evil, name = crafted("os.system", tmp_path, marker)
    code = correct_qc.main(["--weights", str(PREV_PT), "--distill", "--teacher", str(evil), "--data", str(data),
                            "--imgsz", "64", "--batch", "4", "--steps", "1", "--no-val", "--project", str(tmp_path)])
    assert_refused(code, capsys.readouterr().err, "correct_qc.py", name)
    assert not marker.exists()


def test_legacy_format_files(tmp_path):
    """torch < 1.6's format (no zip: the names cannot be read first): a payload is still refused by name, a
    pickled model (stored with its source code, unreadable by weights_only) is refused with a reason, plain
    tensors load."""
    marker = tmp_path / "PWNED"
    torch.save({"model": Payload(os.system, f"touch {marker}")}, tmp_path / "evil.pt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=f"'{SYSTEM}'"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"model": tiny_model()}, tmp_path / "model.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="legacy serialization format"):
        load_checkpoint(tmp_path / "model.pt")
    assert isinstance(load_checkpoint(tmp_path / "model.pt", trust=True)[0], DetectionModel)
    torch.save({"w": torch.ones(2)}, tmp_path / "sd.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(safe_load(tmp_path / "sd.pt")["w"], torch.ones(2))


# -- beyond the names a pickle imports: calling a model class, getattr, a model yaml that is code ---------------
def test_a_model_class_called_with_a_poisoned_yaml_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    cfg = yaml.safe_load((PREV / "yolov5nu-tiny.yaml").read_text())
    cfg["activation"] = f"__import__('os').system('touch {marker}') or nn.SiLU()"
    path = tmp_path / "ctor.pt"
    torch.save({"model": Payload(DetectionModel, cfg)}, path)  # only allowlisted names, but a constructor call
    with pytest.raises(UnsafeCheckpointError, match="calls the class 'ultralytics.nn.tasks.DetectionModel'"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.save({"model": Payload(getattr, DetectionModel, "__init__")}, path)
    with pytest.raises(UnsafeCheckpointError, match="takes the attribute '__init__'"):
        load_checkpoint(path)


def test_a_model_yaml_that_is_code_is_refused(tmp_path):
    """Ultralytics' parse_model eval()s a yaml's activation and calls the functions its layer names resolve to:
    train_qat.py rebuilds an FP checkpoint's model from its yaml, load_packed every packed file's."""
    marker = tmp_path / "PWNED"
    evil = f"__import__('os').system('touch {marker}')"
    m = tiny_model()
    m.yaml = {**m.yaml, "activation": evil}
    save_checkpoint(tmp_path / "act.pt", m)
    with pytest.raises(UnsafeCheckpointError, match="activation"):
        load_checkpoint(tmp_path / "act.pt")
    m.yaml = {**m.yaml, "activation": "nn.SiLU()", "head": [*m.yaml["head"][:-1], [-1, 1, "torch_safe_load", ["x.pt"]]]}
    save_checkpoint(tmp_path / "fn.pt", m)
    with pytest.raises(UnsafeCheckpointError, match="layer module 'torch_safe_load'"):
        load_checkpoint(tmp_path / "fn.pt")
    payload = torch.load(PREV_QPK, weights_only=True)
    payload["yaml"] = {**payload["yaml"], "activation": evil}
    torch.save(payload, tmp_path / "act.qpk")
    with pytest.raises(UnsafeCheckpointError, match="activation"):
        deploy.load_packed(tmp_path / "act.qpk")
    assert not marker.exists()
    ok = tiny_model()
    ok.yaml = {**ok.yaml, "activation": "torch.nn.LeakyReLU(0.1)"}  # a literal activation is fine
    assert load_checkpoint(save_checkpoint(tmp_path / "ok.pt", ok))[0].yaml["activation"] == "torch.nn.LeakyReLU(0.1)"


# -- trusted files -----------------------------------------------------------------------------------------------
def test_trust_checkpoint_loads_in_full_and_says_what_it_allowed(tmp_path, capsys, monkeypatch):
    """A benign checkpoint with a global outside the allowlist (a datetime in train_args): refused by default,
    loaded with --trust-checkpoint, which prints the global; the environment variable does the same in the API."""
    m, ckpt = load_checkpoint(PREV_PT)
    path = save_checkpoint(tmp_path / "dated.pt", m, train_args={"started": datetime.datetime(2024, 1, 2)})
    out = ["--format", "packed", "--output", str(tmp_path / "x.qpk")]
    assert export.main(["--weights", str(path), *out]) == 2
    assert_refused(2, capsys.readouterr().err, "export.py", "datetime.datetime")
    assert export.main(["--weights", str(path), "--trust-checkpoint", *out]) == 0
    err = capsys.readouterr().err
    assert "trusted checkpoint" in err and "datetime.datetime" in err and (tmp_path / "x.qpk").is_file()
    assert TRUST_ENV not in os.environ  # the flag's scope ended with the command

    monkeypatch.setenv(TRUST_ENV, "1")
    assert load_checkpoint(path)[1]["train_args"]["started"] == datetime.datetime(2024, 1, 2)
    marker = tmp_path / "PWNED"
    evil, _ = crafted("os.system", tmp_path, marker)
    safe_load(evil)  # trusted means trusted: the pickle runs in full
    assert marker.exists() and SYSTEM in capsys.readouterr().err
    monkeypatch.delenv(TRUST_ENV)
    with trusting(True):
        assert os.environ[TRUST_ENV] == "1"
    assert TRUST_ENV not in os.environ


# -- what users have loads unchanged -----------------------------------------------------------------------------
def same(a, b, where="ckpt", seen=None) -> None:
    """a and b are equal: modules by type, state and attributes, tensors exactly, containers item by item."""
    seen = set() if seen is None else seen
    assert type(a) is type(b), (where, type(a), type(b))
    if id(a) in seen:
        return
    seen.add(id(a))
    if isinstance(a, nn.Module):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), where
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{where}.{k}"
        assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()], where
        for (n, ma), mb in zip(a.named_modules(), b.modules()):
            keys = {k for k in vars(ma) if k not in {"_parameters", "_buffers", "_modules"}}
            assert keys == {k for k in vars(mb) if k not in {"_parameters", "_buffers", "_modules"}}, f"{where}.{n}"
            for k in keys:
                same(vars(ma)[k], vars(mb)[k], f"{where}.{n}.{k}", seen)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]", seen)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]", seen)
    elif isinstance(a, types.SimpleNamespace):
        same(vars(a), vars(b), where, seen)
    elif isinstance(a, types.MethodType):  # forward = forward_fuse after fuse()
        assert a.__func__ is b.__func__ and type(a.__self__) is type(b.__self__), where
    elif isinstance(a, float) and a != a:
        assert b != b, where
    elif hasattr(a, "__dict__") and not isinstance(a, (type, types.FunctionType)):  # e.g. a kept model.criterion
        same(vars(a), vars(b), where, seen)
    else:
        assert a == b, (where, a, b)


def flat(y):
    if isinstance(y, torch.Tensor):
        return [y]
    return [t for v in (y.values() if isinstance(y, dict) else y) for t in flat(v)]


def assert_loads_unchanged(path):
    safe = safe_load(path)
    same(safe, torch.load(path, map_location="cpu", weights_only=False, pickle_module=renaming_pickle))
    return safe


@pytest.mark.skipif(not ORIG.is_dir(), reason=f"fixtures not found at {ORIG}")
@pytest.mark.parametrize("name", ["yolov5n-orig.pt", "yolov5n-seg-orig.pt", "yolov7-tiny-orig.pt", "refs.pt"])
def test_original_yolo_checkpoints_load_unchanged(name):
    assert_loads_unchanged(ORIG / name)


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolov8n-seg.yaml", "yolo11n-seg.yaml"])
def test_ultralytics_checkpoints_load_unchanged(cfg, tmp_path):
    """Saved by the installed Ultralytics (YOLO.save: the fp16 model, as it ships them), also after fuse()."""
    from ultralytics import YOLO

    m = YOLO(cfg)
    m.save(tmp_path / "m.pt")
    assert isinstance(assert_loads_unchanged(tmp_path / "m.pt")["model"], DetectionModel)
    m.fuse()
    m.save(tmp_path / "fused.pt")
    fused = assert_loads_unchanged(tmp_path / "fused.pt")["model"]  # its convs' forward: bound forward_fuse
    unsafe = torch.load(tmp_path / "fused.pt", weights_only=False, pickle_module=renaming_pickle)["model"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = fused.float().eval()(x), unsafe.float().eval()(x)
    for ya, yb in zip(flat(a), flat(b), strict=True):
        assert torch.equal(ya, yb)


def test_previous_release_checkpoints_load_unchanged():
    """A QAT checkpoint and its packed file written by the release before safe loading (tests/fixtures/prev-release):
    the same objects as an unsafe load, the same outputs as that release computed."""
    refs = safe_load(PREV / "qat-yolov5nu-tiny-w4a4.refs.pt")
    ckpt = assert_loads_unchanged(PREV_PT)
    assert ckpt["quant_recipe"]["w_bits"] == 4 and "qat_args" in ckpt
    model, _ = load_checkpoint(PREV_PT)
    packed = deploy.load_packed(PREV_QPK)
    assert_loads_unchanged(PREV_QPK)
    with torch.no_grad():
        y, y_packed = model(refs["x"])[0], packed(refs["x"])[0]
    assert torch.equal(y, y_packed)  # same machine: the packed file is the checkpoint, bit for bit
    # The references were computed on another processor: its conv kernels sum in another float order (an Intel
    # Xeon with AMX gave 760 of 1344 outputs off by <= 2.7e-6 relative). A changed model (weights, step sizes,
    # codes) moves outputs by a quantization step, orders of magnitude more than this tolerance.
    for name, out in (("checkpoint", y), ("packed", y_packed)):
        torch.testing.assert_close(out, refs[name], rtol=1e-5, atol=1e-5 * float(refs[name].abs().max()))


def test_every_checkpoint_the_pipeline_writes_loads_safely(tmp_path, data, capsys):
    """FP training (Ultralytics' trainer: last.pt / best.pt with optimizer, metrics, train_args), QAT (last.pt with
    the training state, best.pt, best_bn.pt), QC (qc.pt) and a packed export: each loads through the safe loader
    to the same objects as an unsafe load; --resume of the finished run's last.pt is read safely too."""
    runs = tmp_path / "runs"
    assert cli.main(["--cfg", str(PREV / "yolov5nu-tiny.yaml"), "--data", str(data), "--fp-epochs", "1",
                     "--epochs", "1", "--bn-reestimate", "--bn-batches", "1", "--project", str(runs), "--name", "q",
                     *TINY]) == 0, capsys.readouterr().err[-3000:]
    best = runs / "q" / "weights" / "best.pt"
    assert correct_qc.main(["--weights", str(best), "--data", str(data), "--imgsz", "64", "--batch", "4",
                            "--steps", "1", "--no-val", "--project", str(runs), "--name", "qc"]) == 0, \
        capsys.readouterr().err[-3000:]
    qc = runs / "qc" / "weights" / "qc.pt"
    assert export.main(["--weights", str(qc), "--format", "packed", "--output", str(runs / "qc.qpk")]) == 0
    files = sorted(runs.rglob("*.pt")) + [runs / "qc.qpk"]
    names = {str(p.relative_to(runs)) for p in files}
    assert {"q-fp/weights/last.pt", "q-fp/weights/best.pt", "q/weights/last.pt", "q/weights/best.pt",
            "q/weights/best_bn.pt", "qc/weights/qc.pt", "qc/weights/qc_unfolded.pt", "qc.qpk"} <= names, names
    for p in files:
        assert_loads_unchanged(p)
    needed = set().union(*(torch.serialization.get_unsafe_globals_in_checkpoint(p) for p in files))
    assert needed <= set(allowlist()), needed - set(allowlist())
    assert cli.main(["--resume", str(runs / "q" / "weights" / "last.pt")]) == 2  # read safely, then: finished run
    assert "already finished" in capsys.readouterr().err


def test_the_allowlist_is_derived_from_the_code():
    """Every nn.Module class of Ultralytics' and this repo's module packages is on it (a block added upstream
    needs no edit here), and nothing that runs code is."""
    import ultralytics.nn.modules.block as block

    from yolo_qat.models import policy
    from yolo_qat.quant import qconv

    names = set(allowlist())
    for mod in (block, policy, qconv):
        for v in vars(mod).values():
            if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == mod.__name__:
                assert f"{v.__module__}.{v.__qualname__}" in names, v
    for bad in ("builtins.eval", "builtins.exec", SYSTEM, "os.system", "subprocess.Popen", "importlib.import_module",
                "builtins.__import__", "ultralytics.nn.tasks.torch_safe_load", "ultralytics.nn.tasks.parse_model"):
        assert bad not in names
