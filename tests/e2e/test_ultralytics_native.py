"""QAT from Ultralytics' own API: ``YOLO("fp.pt").train(trainer=QATDetectionTrainer, qat=...)`` end to end (the
returned model predicts, validates and exports to ONNX; the checkpoint loads with ``YOLO(path)``), the same for
segmentation with a preset name, and the forms ``qat=`` takes."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from ultralytics import YOLO

from yolo_qat import QATDetectionTrainer, QATSegmentationTrainer
from yolo_qat.engine.config import QATConfig
from yolo_qat.engine.trainer import qat_config_of
from yolo_qat.quant import QuantRecipe, is_quantized

TINY = {"epochs": 1, "imgsz": 64, "batch": 4, "workers": 0, "device": "cpu", "plots": False, "warmup_epochs": 0,
        "amp": False, "exist_ok": True}


def fp_checkpoint(cfg: str, path: Path) -> Path:
    """An Ultralytics FP checkpoint as Ultralytics writes one (untrained weights: only the plumbing is tested)."""
    YOLO(cfg).save(path)
    return path


def test_detect_train_predict_val_export_load(data, tmp_path):
    model = YOLO(fp_checkpoint("yolov8n.yaml", tmp_path / "fp.pt"))
    model.train(trainer=QATDetectionTrainer, qat={"w_bits": 4, "a_bits": 8, "calib_batches": 1}, data=str(data),
                project=str(tmp_path / "runs"), name="det", **TINY)
    best = tmp_path / "runs/det/weights/best.pt"
    assert best.is_file() and is_quantized(model.model)
    assert model.model.quant_recipe["w_bits"] == 4 and model.model.quant_recipe["a_bits"] == 8

    images = str(data.parent / "images/val")
    assert len(model.predict(images, imgsz=64, verbose=False)) == 4
    metrics = model.val(data=str(data), imgsz=64, batch=4, workers=0, device="cpu", plots=False,
                        project=str(tmp_path / "runs"), name="val")
    assert 0.0 <= metrics.box.map <= 1.0

    onnx_file = Path(model.export(format="onnx", imgsz=64))
    graph = onnx.load(onnx_file).graph
    ops = {n.op_type for n in graph.node}
    assert [i.name for i in graph.input] == ["images"] and {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = YOLO(best).model.fuse().eval()(x)[0].numpy()
    got = ort.InferenceSession(str(onnx_file)).run(None, {"images": x.numpy()})[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 0.05 * (np.abs(want).max() + 1)  # the fake-quant graph computes the model

    loaded = YOLO(best)
    assert is_quantized(loaded.model) and len(loaded.predict(images, imgsz=64, verbose=False)) == 4


def test_segment_train_with_a_preset(data, tmp_path):
    model = YOLO(fp_checkpoint("yolov8n-seg.yaml", tmp_path / "fp-seg.pt"))
    model.train(trainer=QATSegmentationTrainer, qat="ema_w4a4", data=str(data), project=str(tmp_path / "runs"),
                name="seg", **TINY)
    ckpt = torch.load(tmp_path / "runs/seg/weights/last.pt", map_location="cpu", weights_only=False)
    assert ckpt["qat_args"]["ema_decay"] == 0.9999 and ckpt["quant_recipe"]["w_bits"] == 4
    assert ckpt["train_args"]["epochs"] == 1  # the call's epochs win over the preset's
    assert is_quantized(model.model) and len(model.predict(str(data.parent / "images/val"), imgsz=64,
                                                           verbose=False)) == 4
    metrics = model.val(data=str(data), imgsz=64, batch=4, workers=0, device="cpu", plots=False,
                        project=str(tmp_path / "runs"), name="segval")
    assert 0.0 <= metrics.seg.map <= 1.0


def test_qat_forms():
    default, extra = qat_config_of(None)
    assert default == QATConfig() and extra == {}
    cfg = QATConfig(method="dampen")
    assert qat_config_of(cfg) == (cfg, {}) and qat_config_of(cfg.to_dict())[0] == cfg
    assert qat_config_of(QuantRecipe(w_bits=3, a_bits=3))[0].recipe["w_bits"] == 3
    flat, extra = qat_config_of({"w_bits": 3, "a_bits": 3, "method": "freeze", "epochs": 5})
    assert flat.recipe["a_bits"] == 3 and flat.method == "freeze" and extra == {"epochs": 5}
    preset, extra = qat_config_of("dampen_w4a8")
    assert preset.method == "dampen" and preset.recipe["per_channel"] and extra["epochs"] == 100
    with pytest.raises(ValueError, match="no_such_key"):
        qat_config_of({"no_such_key": 1})
    with pytest.raises(ValueError, match="not a preset"):
        qat_config_of("no_such_preset")
