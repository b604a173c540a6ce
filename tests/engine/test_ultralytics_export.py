"""Ultralytics' ``YOLO(path).export(format="onnx")`` of a quantized checkpoint: the project's export form in a process
that imported yolo_qat before or after Ultralytics, and a refusal (never a graph that ignores its input) when a
quantized conv is traced in its training form."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

from yolo_qat.models.checkpoint import save_checkpoint
from yolo_qat.quant import QuantConv2d, calibrate, quantize_model
from yolo_qat.quant.qconv import EXPORT_REFUSAL
from builders import ROOT, images

CFG = "yolov8n.yaml"


@pytest.fixture(scope="module")
def qat_pt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m = DetectionModel(CFG, nc=3, verbose=False).eval()
    quantize_model(m, {"w_bits": 4, "a_bits": 4, "first_last_bits": 8})
    calibrate(m, [images(2, 64, s) for s in range(2)], num_batches=2)
    m.names = {0: "a", 1: "b", 2: "c"}
    m.args = {"imgsz": 64, "task": "detect"}
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "qat.pt", m)


SCRIPT = r"""
import json, sys
first = sys.argv[1]
if first == "yolo_qat":
    import yolo_qat
    from ultralytics import YOLO
else:
    from ultralytics import YOLO
    import yolo_qat
import onnx
f = YOLO(sys.argv[2]).export(format="onnx", imgsz=64)
g = onnx.load(f).graph
print(json.dumps({"inputs": [i.name for i in g.input], "ops": sorted({n.op_type for n in g.node})}))
"""


@pytest.mark.parametrize("first", ["yolo_qat", "ultralytics"])
def test_yolo_export_of_a_quantized_checkpoint_whatever_the_import_order(qat_pt, tmp_path, first):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, first, str(qat_pt)], cwd=tmp_path, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["inputs"] == ["images"], res
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= set(res["ops"]), res["ops"]


def test_quant_alone_does_not_import_ultralytics():
    code = "import sys, yolo_qat.quant; print(sorted(k for k in sys.modules if k.split('.')[0] == 'ultralytics'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])


def test_a_quantized_conv_traced_in_its_training_form_is_refused(tmp_path):
    conv = QuantConv2d(3, 4, 3, padding=1)
    calibrate(conv, [images(2, 16)], num_batches=1)
    with pytest.raises(Exception) as e:
        torch.onnx.export(conv.eval(), (images(1, 16),), str(tmp_path / "x.onnx"), dynamo=False)
    chain, err = [], e.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any(EXPORT_REFUSAL in c for c in chain), chain
    assert not (tmp_path / "x.onnx").exists()
