"""--device left out means Ultralytics' choice (the first GPU when there is one), in train_qat.py,
val.py and correct_qc.py, and the device used is printed."""
import pytest
import torch
from ultralytics.utils import NUM_THREADS, torch_utils
from ultralytics.utils.torch_utils import select_device

import yolo_qat.engine.cli as cli
from yolo_qat.engine import cli_qc, cli_val
from yolo_qat.engine.device import resolve_device


@pytest.fixture
def two_gpus(monkeypatch):
    """Ultralytics' select_device as it behaves on a machine with two CUDA GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch_utils, "get_gpu_info", lambda i: f"fake GPU {i}")
    assert select_device("", verbose=False) == torch.device("cuda", 0)


def train_qat_device(argv, monkeypatch, tmp_path):
    """The device train_qat.py's run settles on, observed where the run reaches its first slow step."""
    seen = {}

    def stop(opt):
        seen["device"] = opt.device
        raise cli.InputError("stopped by the test")

    monkeypatch.setattr(cli, "resolve_inputs", stop)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--cfg", "yolov5nu", "--project", str(tmp_path / "runs"), *argv]) == 2
    return seen["device"]


def test_default_is_what_select_device_picks_here():
    threads = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS + 1)  # select_device on the CPU sets NUM_THREADS
    try:
        device = resolve_device("")
        assert torch.get_num_threads() == NUM_THREADS + 1  # resolving a name leaves the thread count alone
        assert device == str(select_device("", verbose=False))
    finally:
        torch.set_num_threads(threads)


def test_scripts_default_to_the_first_gpu_and_say_so(two_gpus, monkeypatch, tmp_path, capsys):
    assert train_qat_device([], monkeypatch, tmp_path) == "cuda:0"
    assert "train_qat.py: device cuda:0 (Ultralytics' default" in capsys.readouterr().out
    assert cli_val.parse_args(["--weights", "a.pt"]).device == "cuda:0"
    assert "val.py: device cuda:0 (Ultralytics' default" in capsys.readouterr().out
    assert cli_qc.parse_args(["--weights", "a.pt"]).device == "cuda:0"
    assert "correct_qc.py: device cuda:0 (Ultralytics' default" in capsys.readouterr().out
    # an explicit choice is kept (and a multi-GPU one stays whole for Ultralytics' DDP launcher)
    assert train_qat_device(["--device", "cpu"], monkeypatch, tmp_path) == "cpu"
    assert train_qat_device(["--device", "0,1"], monkeypatch, tmp_path) == "0,1"
    assert cli_val.parse_args(["--weights", "a.pt", "--device", "1"]).device == "cuda:1"
    out = capsys.readouterr().out
    assert "train_qat.py: device cpu\n" in out and "val.py: device cuda:1\n" in out


def test_a_missing_gpu_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--cfg", "yolov5nu", "--device", "3", "--project", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_qat.py: error: --device: device '3' is not available") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        cli_val.parse_args(["--weights", "a.pt", "--device", "3"])
    assert e.value.code == 2 and "argument --device: device '3' is not available" in capsys.readouterr().err
