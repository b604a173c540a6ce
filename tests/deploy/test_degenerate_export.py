"""Degenerate but honest models export (deploy/degenerate_bias.py).

An untrained YOLO11 / YOLO26 (detect and segment, built from Ultralytics' yamls) quantized for each integer target
and calibrated on noise exports, and onnxruntime runs each file with the fake-quant model's activation codes (up to
rounding ties, as tests/deploy/test_export_ort.py checks). Its box branch is made dead (the middle conv's BN output pinned
far below zero, so SiLU gives ~0), as noise calibration of an untrained model left it in the issue that found this:
the last box conv's input step calibrates to the 1e-8 floor and its int32 bias does not fit at s_x * s_w. Where its
output code cannot depend on its input, the file keeps it exact (one warning naming the layer); where it can, the
export stops with one paragraph naming the layer, the cause and the fix.
"""
import re
import types
import warnings

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel, SegmentationModel

from yolo_qat import deploy
from yolo_qat.deploy.degenerate_bias import fit_int32_bias
from yolo_qat.deploy.verify import compare_onnxruntime
from yolo_qat.quant import calibrate, quant_convs, quantize_model
from yolo_qat.quant.act import output_quantizer
from yolo_qat.quant.grid import MIN_SCALE

IMGSZ = 64
MODELS = {"yolo11n.yaml": DetectionModel, "yolo26n.yaml": DetectionModel, "yolo11n-seg.yaml": SegmentationModel,
          "yolo26n-seg.yaml": SegmentationModel}
DEAD = re.compile(r"^model\.\d+\.(one2one_)?cv2\.\d\.1\.bn$")  # the middle conv of every box branch


def noise(n, seed):
    return torch.rand(n, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(seed))


def untrained(cfg: str, target: str):
    torch.manual_seed(0)
    fp = MODELS[cfg](cfg, nc=80, verbose=False).eval()
    with torch.no_grad():
        for name, bn in fp.named_modules():
            if DEAD.match(name):
                bn.weight.fill_(1e-6)
                bn.bias.fill_(-30.0)
    q = quantize_model(fp, {"w_bits": 4, "a_bits": 8, "per_channel": True, "target": target}).eval()
    calibrate(q, [noise(2, s) for s in range(2)], num_batches=2)
    return q


# Every integer target with YOLO11 and YOLO26, detect and segment; the full 4 x 3 matrix passes too, at ~5 s a case
CASES = [("yolo11n.yaml", "ort"), ("yolo26n-seg.yaml", "ort"), ("yolo26n.yaml", "npu"), ("yolo11n-seg.yaml", "npu"),
         ("yolo26n.yaml", "tensorrt")]


@pytest.mark.parametrize(("cfg", "target"), CASES)
def test_untrained_model_calibrated_on_noise_exports_and_matches(cfg, target, tmp_path):
    q = untrained(cfg, target)
    box = [c for n, c in quant_convs(q).items() if re.match(r"model\.\d+\.(one2one_)?cv2\.\d\.2", n)]
    assert box and all(float(c.input_grid.scale) <= 2 * MIN_SCALE for c in box)  # the degenerate layers are there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = deploy.export_onnx(q, tmp_path / "m.onnx", IMGSZ)
    notes = [str(w.message) for w in caught if issubclass(w.category, deploy.ExportWarning)]
    if target == "tensorrt":  # a float bias: nothing overflows
        assert not notes
    else:  # one line per degenerate layer, naming it: the box convs (and the dead middle convs, whose folded
        # weight steps shrank with their BN scale)
        named = {n.split(":")[0] for n in notes}
        assert {f"model.23.cv2.{i}.2.conv" for i in range(3)} <= named <= set(quant_convs(q)), notes
        assert len(named) == len(notes) and all("\n" not in n and "changes no output code" in n for n in notes)
    r = compare_onnxruntime(q, path, noise(1, 7))
    if r["code_flips"]:
        assert r["first_flip_tie_distance"] < 1e-3, (r["first_flip_layer"], r["first_flip_tie_distance"])
    else:
        assert r["max_abs"] <= 1e-5 * r["max_ref"], (r["max_abs"], r["max_ref"])


def stand_in(s_x: float):
    """A conv as fit_int32_bias reads it: its input grid (unsigned 8-bit, zero point 0)."""
    grid = output_quantizer(8)
    grid.set_scale(s_x, 0.0)
    return types.SimpleNamespace(input_grid=grid)


def out_grid(step: float):
    q = output_quantizer(8)
    q.set_scale(step, 0.0)
    return q


# 64 input channels x 3x3 at the largest 8-bit code: the most an input can move an output, for a bias of 2.0
CODES = torch.full((2, 64, 3, 3), 127.0)
BIAS = torch.tensor([2.0, 2.0], dtype=torch.float64)


def test_a_bias_that_fits_is_left_alone():
    w_scale = torch.tensor([0.05, 0.05])
    assert fit_int32_bias("m.conv", stand_in(1e-3), CODES, w_scale, BIAS, out_grid(0.01)) is w_scale


@pytest.mark.parametrize("case", ["tiny input step", "collapsed weight steps"])
def test_a_bias_whose_channel_depends_on_its_input_is_refused(case):
    """The bias overflows int32 and the input can still move the output code (reach ~0.01 vs an output step of
    0.01): no exact integer form, so one paragraph names the layer, the cause and the fix."""
    s_x, s_w = (1e-8, 0.05) if case == "tiny input step" else (0.09, MIN_SCALE)
    with pytest.raises(ValueError) as e:
        fit_int32_bias("model.23.cv2.0.2.conv", stand_in(s_x), CODES, torch.full((2,), s_w), BIAS, out_grid(0.01))
    msg = str(e.value)
    assert msg.startswith("layer 'model.23.cv2.0.2.conv'") and "\n" not in msg and "Fix:" in msg, msg
    if case == "tiny input step":
        assert "input step s_x calibrated to 1e-08" in msg and "calibrate" in msg.split("Fix:")[1], msg
    else:
        assert "collapsed" in msg and "--scale-lr" in msg, msg
