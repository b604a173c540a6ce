"""ONNX Q/DQ export of quantized YOLO models, checked in onnxruntime against the fake-quant model.

Tolerance: where onnxruntime and PyTorch quantize every activation to the same code, outputs
differ only by float accumulation order (conv sums): measured <= 3e-4 on outputs of up to ~760
(box coordinates in pixels), i.e. < 1e-6 relative; asserted at 1e-5 relative. They can differ by
one code where an activation lies within ~1e-5 of a step of a half-step (a rounding tie that the
two runtimes' float arithmetic decides differently): then the test asserts that the first
divergence is such a tie. Untrained random-weight nets amplify one flipped code a lot (one W8
flip can move a box by pixels), which is why outputs are compared on flip-free images only.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from ultralytics.nn.tasks import DetectionModel, SegmentationModel
from ultralytics.utils.nms import non_max_suppression

import deploy
from deploy.verify import compare_onnxruntime, reference_outputs
from models.checkpoint import save_checkpoint
from quant import calibrate, layer_bits, layer_roles, quantize_model
from test_quantize_yolo import build, images

ROOT = Path(__file__).resolve().parents[1]
CFGS = {"det": ("yolov5nu.yaml", DetectionModel), "seg": ("yolov8n-seg.yaml", SegmentationModel)}
IMGSZ = 64
_FP = {}


def quantized(kind, bits):
    if kind not in _FP:
        _FP[kind] = build(*CFGS[kind])
    q = quantize_model(copy.deepcopy(_FP[kind]), {"w_bits": bits, "a_bits": bits, "first_last_bits": 8,
                                                  "per_channel": bits == 4}).eval()
    calibrate(q, [images(8, IMGSZ, s) for s in range(2)], num_batches=2)
    return q


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(kind, bits): (model, onnx path)}, exported once per module (opset 21: INT4 weights)."""
    out = {}
    for kind in CFGS:
        for bits in (4, 8):
            q = quantized(kind, bits)
            out[kind, bits] = q, deploy.export_onnx(q, tmp_path_factory.mktemp("onnx") / f"{kind}{bits}.onnx", IMGSZ)
    return out


def detections(pred, nc=3):
    return non_max_suppression(torch.as_tensor(pred), conf_thres=0.001, iou_thres=0.7, nc=nc)[0]


@pytest.mark.parametrize("kind,bits", [("det", 4), ("det", 8), ("seg", 4), ("seg", 8)])
def test_onnxruntime_matches_fake_quant(exported, kind, bits):
    q, path = exported[kind, bits]
    flip_free = 0
    for seed in range(4):
        r = compare_onnxruntime(q, path, images(1, IMGSZ, 50 + seed))
        assert [o.shape for o in r["outputs"]] == [tuple(t.shape) for t in r["refs"]]
        if r["code_flips"]:
            # The first divergence must be a rounding tie (unrounded value at a half-step).
            assert r["first_flip_tie_distance"] < 1e-3, r["first_flip_tie_distance"]
            continue
        flip_free += 1
        assert r["max_abs"] <= 1e-5 * r["max_ref"], (r["max_abs"], r["max_ref"])
        a, b = detections(r["outputs"][0])[:10], detections(r["refs"][0])[:10]
        assert len(b) >= 3 and len(a) == len(b)  # an untrained model at conf 0.001 still has candidates
        assert torch.equal(a[:, 5], b[:, 5])  # classes
        torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-3, rtol=1e-5)  # boxes and scores
    assert flip_free >= 1


def test_output_layout_is_ultralytics(exported):
    """Same output names and shapes as Ultralytics' ONNX export (eval-mode Detect/Segment output)."""
    for (kind, bits), (q, path) in exported.items():
        m = onnx.load(str(path))
        names = [o.name for o in m.graph.output]
        assert names == (["output0", "output1"] if kind == "seg" else ["output0"])
        shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output]
        assert shapes == [list(t.shape) for t in reference_outputs(q, images(1, IMGSZ))]
        meta = {p.key: p.value for p in m.metadata_props}
        assert meta["task"] == ("segment" if kind == "seg" else "detect") and int(meta["stride"]) == 32


def _weights(path):
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    layers = json.loads({p.key: p.value for p in m.metadata_props}["quant_layers"])
    return m, inits, layers


def test_integer_weights_in_range_and_first_last_8bit(exported):
    for (kind, bits), (q, path) in exported.items():
        m, inits, layers = _weights(path)
        assert {n: (v["w_bits"], v["a_bits"]) for n, v in layers.items()} == layer_bits(q)
        roles = layer_roles(q)
        for n in roles["first"] + roles["last"]:
            assert layers[n]["w_bits"] == layers[n]["a_bits"] == 8
        dq_inputs = {n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
        for n, v in layers.items():
            t = inits[v["weight"]]
            assert v["weight"] in dq_inputs
            b = v["w_bits"]
            assert t.data_type == (TensorProto.INT4 if b <= 4 else TensorProto.INT8)
            w = numpy_helper.to_array(t).astype(np.int64)
            assert w.min() >= -(2 ** (b - 1)) and w.max() <= 2 ** (b - 1) - 1, (n, w.min(), w.max())
        # No float copy of a quantized weight: every Conv weight comes from a DequantizeLinear.
        dq_out = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
        convs = [n for n in m.graph.node if n.op_type == "Conv"]
        assert sum(c.input[1] in dq_out for c in convs) == len(layers) == len(convs) - 1  # all but the DFL conv
        ops = {n.op_type for n in m.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Mul"} <= ops and "BatchNormalization" not in ops


def test_old_opset_falls_back_to_int8_container(exported, tmp_path):
    q, path21 = exported["det", 4]
    with pytest.warns(deploy.ExportWarning, match="int8 container"):
        p = deploy.export_onnx(q, tmp_path / "o17.onnx", IMGSZ, opset=17)
    m, inits, layers = _weights(p)
    _, inits21, _ = _weights(path21)
    for n, v in layers.items():
        t = inits[v["weight"]]
        assert t.data_type == TensorProto.INT8
        b = v["w_bits"]
        w = numpy_helper.to_array(t)
        assert w.min() >= -(2 ** (b - 1)) and w.max() <= 2 ** (b - 1) - 1
        assert np.array_equal(w, numpy_helper.to_array(inits21[v["weight"]]).astype(np.int8))  # same codes
    r = compare_onnxruntime(q, p, images(1, IMGSZ, 50))
    assert r["code_flips"] or r["max_abs"] <= 1e-5 * r["max_ref"]


def test_float_checkpoint_is_refused(tmp_path):
    fp = build(*CFGS["det"])
    with pytest.raises(deploy.NothingQuantizedError, match="nothing quantized to export"):
        deploy.export_onnx(fp, tmp_path / "fp.onnx", IMGSZ)
    ckpt = save_checkpoint(tmp_path / "fp.pt", fp)
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), "--weights", str(ckpt), "--imgsz", str(IMGSZ)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "nothing quantized to export" in r.stderr, r.stderr
    assert not (tmp_path / "fp.onnx").exists()


def test_qc_folded_dynamic_export(tmp_path):
    """QC corrections folded into QuantConv2d.fold_affine (head convs: out_scale + bias) export as
    the Mul/Add after the integer conv; a dynamic graph runs another batch size and image size."""
    q = quantized("det", 4)
    g = torch.Generator().manual_seed(0)
    for m in q.modules():
        if isinstance(m, torch.nn.Module) and hasattr(m, "fold_affine") and m.bias is not None:
            m.fold_affine(1 + 0.1 * torch.randn(m.out_channels, generator=g), 0.1 * torch.randn(m.out_channels, generator=g))
    p = deploy.export_onnx(q, tmp_path / "dyn.onnx", IMGSZ, dynamic=True)
    x = images(2, 96, seed=21)
    r = compare_onnxruntime(q, p, x)
    assert r["outputs"][0].shape == (2, 7, (96 // 8) ** 2 + (96 // 16) ** 2 + (96 // 32) ** 2)
    assert (r["code_flips"] and r["first_flip_tie_distance"] < 1e-3) or r["max_abs"] <= 1e-5 * r["max_ref"], r["max_abs"]
