"""train_qat.py end to end on a tiny embedded dataset: detection and segmentation runs from the CLI,
outputs, EMA-off checkpoints, crash + --resume, atomic checkpoints, and bad-input messages."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--imgsz", "64", "--batch", "4", "--workers", "0", "--calib-batches", "2", "--warmup-epochs", "0",
        "--exist-ok"]


def cli(args, cwd, env_extra=None):
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train_qat.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env=env)


def load(path):
    sys.path.insert(0, str(ROOT))
    return torch.load(path, map_location="cpu", weights_only=False)


def check_outputs(run: Path, epochs: int):
    for f in ("weights/last.pt", "weights/best.pt", "results.csv", "oscillations.csv", "args.yaml"):
        assert (run / f).is_file(), f
    lines = (run / "results.csv").read_text().strip().splitlines()
    assert len(lines) == epochs + 1 and "osc/share" in lines[0] and "metrics/mAP50-95(B)" in lines[0]
    osc = (run / "oscillations.csv").read_text().strip().splitlines()
    assert osc[0].startswith("epoch,step,layer") and len(osc) > epochs * 10
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["qat"]["recipe"]["w_bits"] == 4 and args["nbs"] == args["batch"] == 4
    ckpt = load(run / "weights/last.pt")
    assert ckpt["quant_recipe"]["w_bits"] == 4 and ckpt["qat_args"]["method"] == args["qat"]["method"]
    dtypes = {v.dtype for v in ckpt["model"].state_dict().values() if v.is_floating_point()}
    assert dtypes == {torch.float32}  # not halved
    return ckpt


def test_detect_cli_ema_off_with_a_corrupt_image(data, tmp_path):
    # one corrupt training image: Ultralytics skips it with a warning and the run completes
    ds = tmp_path / "ds"
    shutil.copytree(data.parent, ds)
    (ds / "images/train/train_000000.jpg").write_bytes(b"not a jpeg at all")
    for cache in ds.glob("labels/*.cache"):
        cache.unlink()
    cfg = yaml.safe_load(data.read_text())
    cfg["path"] = str(ds)
    (ds / "d.yaml").write_text(yaml.safe_dump(cfg))
    r = cli(["--data", str(ds / "d.yaml"), "--cfg", "yolov5nu", "--epochs", "2", "--ema-decay", "0", "--method", "lsq",
             "--project", str(tmp_path / "runs"), "--name", "det", *TINY], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "corrupt" in out.lower() and "QAT W4A4 lsq" in out
    ckpt = check_outputs(tmp_path / "runs/det", 2)
    # --ema-decay 0: the saved ("EMA") model is exactly the raw model (every float tensor: weights,
    # scales, offsets, BN statistics; integer counters like num_batches_tracked are not averaged)
    raw = ckpt["train_state"]["model"]
    floats = {k: v for k, v in ckpt["model"].state_dict().items() if v.is_floating_point()}
    assert any(k.endswith("_scale") for k in floats)
    for k, v in floats.items():
        assert torch.equal(v, raw[k]), k


def test_segment_cli_freeze_with_ema(data, tmp_path):
    r = cli(["--data", str(data), "--cfg", "yolov5nu-seg", "--epochs", "2", "--ema-decay", "0.9", "--ema-tau", "2",
             "--method", "freeze", "--recompute-input", "--project", str(tmp_path / "runs"), "--name", "seg", *TINY],
            tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mask mAP50-95" in r.stdout
    ckpt = check_outputs(tmp_path / "runs/seg", 2)
    assert yaml.safe_load((tmp_path / "runs/seg/args.yaml").read_text())["qat"]["recompute_input"] is True
    assert "metrics/mAP50-95(M)" in (tmp_path / "runs/seg/results.csv").read_text()
    # EMA on: the saved model lags the raw weights
    raw = ckpt["train_state"]["model"]
    ema = ckpt["model"].state_dict()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if k.endswith("_scale"))
    assert ckpt["updates"] == ckpt["train_state"]["qat_step"] == 4


CRASH_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import train_qat  # noqa: F401  (sets YOLO_OFFLINE, sys.path)
from yolo_qat.engine.cli import main

seen = {{"n": 0}}
def crash(trainer):
    if trainer.epoch == 1:  # second epoch, after its first batch: the process dies, nothing is saved
        seen["n"] += 1
        if seen["n"] == 1:
            os._exit(17)

sys.exit(main({args!r}, callbacks={{"on_train_batch_end": [crash]}}))
"""


def test_crash_mid_epoch_then_resume(data, tmp_path):
    run = tmp_path / "runs/crash"
    args = ["--data", str(data), "--cfg", "yolov5nu", "--epochs", "2", "--ema-decay", "0.9", "--ema-tau", "2",
            "--method", "dampen", "--project", str(tmp_path / "runs"), "--name", "crash", *TINY]
    script = CRASH_SCRIPT.format(root=str(ROOT), args=args)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 17, r.stderr[-3000:]
    # After the crash: epoch 1's checkpoints are intact and loadable.
    last, best = load(run / "weights/last.pt"), load(run / "weights/best.pt")
    assert last["epoch"] == 0 and best["epoch"] == 0 and "train_state" in last
    best_bytes = (run / "weights/best.pt").read_bytes()
    assert len((run / "results.csv").read_text().strip().splitlines()) == 2

    r = cli(["--resume", str(run / "weights/last.pt")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming training" in r.stdout + r.stderr
    final = load(run / "weights/last.pt")
    assert final["epoch"] == 1 and final["qat_args"]["method"] == "dampen"
    # the optimizer-step counter carried on from the checkpoint: 2 steps per epoch, 2 epochs
    assert final["train_state"]["qat_step"] == 4 and final["updates"] == 4
    assert final["train_state"]["scale_optimizer"]["state"], "scale optimizer state lost"
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    load(run / "weights/best.pt")  # still a valid checkpoint (rewritten only if epoch 2 was as good)
    assert (run / "weights/best.pt").read_bytes() == best_bytes or load(run / "weights/best.pt")["epoch"] == 1

    r = cli(["--resume", str(run / "weights/last.pt")], tmp_path)  # nothing left to do: a message
    assert r.returncode != 0 and "already finished" in r.stderr


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing never replaces a good checkpoint by a partial one."""
    import yolo_qat.models.checkpoint as mc
    from yolo_qat.quant import QuantConv2d

    model = torch.nn.Sequential(QuantConv2d.from_conv(torch.nn.Conv2d(3, 4, 3), 4, 4))
    path = mc.save_checkpoint(tmp_path / "best.pt", model, epoch=0)
    good = path.read_bytes()

    def dying_save(obj, f, *a, **k):
        Path(f).write_bytes(good[: len(good) // 3])
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(mc.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        mc.save_checkpoint(path, model, epoch=1)
    assert path.read_bytes() == good


@pytest.mark.parametrize("case", ["missing_data", "no_labels", "bits", "not_a_checkpoint", "bad_config"])
def test_bad_input_messages(case, data, tmp_path, monkeypatch, capsys):
    base = ["--cfg", "yolov5nu", "--epochs", "1", "--project", str(tmp_path / "runs"), *TINY]
    if case == "missing_data":
        args, expect = ["--data", str(tmp_path / "nope.yaml"), *base], "dataset yaml"
    elif case == "no_labels":
        ds = tmp_path / "ds"
        shutil.copytree(data.parent, ds)
        shutil.rmtree(ds / "labels")
        cfg = yaml.safe_load(data.read_text())
        cfg["path"] = str(ds)
        (ds / "d.yaml").write_text(yaml.safe_dump(cfg))
        args, expect = ["--data", str(ds / "d.yaml"), *base], "label"
    elif case == "bits":
        args, expect = ["--data", str(data), "--w-bits", "12", *base], "w_bits"
    elif case == "not_a_checkpoint":
        bad = tmp_path / "weights.pt"
        bad.write_bytes(b"\x00garbage" * 100)
        args, expect = ["--data", str(data), "--weights", str(bad), *base], "checkpoint"
    else:
        cfg = tmp_path / "r.yaml"
        cfg.write_text("w_bits: 4\nlearning_rate: 3\n")
        args, expect = ["--config", str(cfg), *base], "unknown key"
    if case == "no_labels":  # gets as far as Ultralytics' dataset scan: a real process, real streams
        r = cli(args, tmp_path)
        code, err = r.returncode, r.stderr
    else:  # the CLI's own main in process: same stderr and exit code, no fresh torch import per case
        from yolo_qat.engine.cli import main

        monkeypatch.chdir(tmp_path)
        code = main(args)
        err = capsys.readouterr().err
    assert code != 0
    assert "train_qat.py: error:" in err and expect in err, err[-2000:]
    assert "Traceback" not in err


NAN_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch
import train_qat  # noqa: F401  (sets YOLO_OFFLINE, sys.path)
from yolo_qat.engine.cli import main
from ultralytics.utils.torch_utils import unwrap_model

MODE = {mode!r}  # once: one NaN loss in epoch 2; always: every loss of epoch 2 on; first: from epoch 1 on
starts = []


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a.cpu(), b.cpu())
    return a == b


def restored(trainer):
    # at the start of the redone epoch the whole training state must be last.pt's, bit for bit
    ckpt = torch.load(trainer.last, map_location="cpu", weights_only=False)
    st = ckpt["train_state"]
    checks = {{"raw weights": same(unwrap_model(trainer.model).state_dict(), st["model"]),
              "ema": same(trainer.ema.ema.state_dict(), ckpt["model"].state_dict()),
              "optimizer": same(trainer.optimizer.state_dict(), st["optimizer"]),
              "scale optimizer": same(trainer.scale_optimizer.state_dict(), st["scale_optimizer"]),
              "oscillation tracker": same(trainer.tracker.state_dict(), st["oscillation"]),
              "qat_step": trainer.qat_step == st["qat_step"], "ema updates": trainer.ema.updates == ckpt["updates"]}}
    print("RESTORED", sorted(k for k, ok in checks.items() if ok),
          "NOT", sorted(k for k, ok in checks.items() if not ok))


def poison(trainer):
    starts.append(trainer.epoch)
    first_bad = 0 if MODE == "first" else 1
    if trainer.epoch == 1 and starts.count(1) == 2:
        restored(trainer)
    if trainer.epoch < first_bad or (MODE == "once" and starts.count(1) > 1):
        return
    m = unwrap_model(trainer.model)

    def nan_loss(batch, preds=None):
        if MODE == "once":
            del m.loss  # one NaN batch, then the model's own loss again
        total, items = type(m).loss(m, batch, preds)
        return total * float("nan"), items

    m.loss = nan_loss


sys.exit(main({args!r}, callbacks={{"on_train_epoch_start": [poison]}}))
"""


def finite(ckpt) -> bool:
    tensors = list(ckpt["model"].state_dict().values())
    if "train_state" in ckpt:
        st = ckpt["train_state"]
        tensors += list(st["model"].values()) + list(st["oscillation"].values())
        for opt in (st["optimizer"], st["scale_optimizer"]):
            tensors += [v for s in opt["state"].values() for v in s.values() if torch.is_tensor(v)]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


@pytest.mark.parametrize("mode", ["once", "always", "first"])
def test_nan_loss_recovers_from_last_pt_or_stops_with_a_message(mode, data, tmp_path):
    run = tmp_path / "runs/nan"
    args = ["--data", str(data), "--cfg", "yolov5nu", "--epochs", "2", "--ema-decay", "0.9", "--ema-tau", "2",
            "--method", "freeze", "--project", str(tmp_path / "runs"), "--name", "nan", *TINY]
    script = NAN_SCRIPT.format(root=str(ROOT), args=args, mode=mode)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    out = r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if mode == "once":  # epoch 2 is redone from last.pt, and the run finishes as if nothing happened
        assert r.returncode == 0, r.stderr[-3000:]
        assert "reloading" in out and "attempt 1/3" in out
        restored = [line for line in r.stdout.splitlines() if line.startswith("RESTORED")]
        assert restored == ["RESTORED ['ema', 'ema updates', 'optimizer', 'oscillation tracker', 'qat_step', "
                            "'raw weights', 'scale optimizer'] NOT []"], restored
        last, best = load(run / "weights/last.pt"), load(run / "weights/best.pt")
        assert last["epoch"] == 1 and finite(last) and finite(best)
        assert last["train_state"]["qat_step"] == last["updates"] == 4  # the lost pass is not counted
        rows = (run / "results.csv").read_text().strip().splitlines()
        assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"] and "nan" not in rows[-1].lower()
    else:  # no recovery possible: one paragraph, exit 1, and what was saved before stays intact
        assert r.returncode == 1, r.stderr[-3000:]
        err = [line for line in r.stderr.splitlines() if line.startswith("train_qat.py: error:")]
        assert len(err) == 1 and "NaN" in err[0] and "--lr0" in err[0], r.stderr[-3000:]
        if mode == "always":
            assert "again after 3 reloads" in err[0] and "attempt 3/3" in out
            last = load(run / "weights/last.pt")
            assert last["epoch"] == 0 and finite(last)
        else:
            assert "the first of this run" in err[0] and not (run / "weights/last.pt").exists()
