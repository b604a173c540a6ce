"""Builders shared by the tests: tiny models with data-derived BN statistics, images, the embedded dataset, and the
original-code fixtures (``../shared/fixtures/original-yolo``)."""
import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from ultralytics.nn.tasks import DetectionModel, SegmentationModel

from yolo_qat import models  # noqa: F401  (registers the YOLO policy)
from yolo_qat.data.embedded import ensure_embedded_dataset
from yolo_qat.engine.calib import calibration_loader, preprocess
from yolo_qat.quant import calibrate, quantize_model

ROOT = Path(__file__).resolve().parents[1]


def build(cfg, cls, seed=0):
    """A model from yaml whose BN statistics come from data: a fresh Ultralytics model has
    running stats (0, 1) that shrink features to ~1e-6 by the head, hiding any quantization."""
    torch.manual_seed(seed)
    m = cls(cfg, nc=3, verbose=False)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None  # cumulative average
    m.train()
    with torch.no_grad():
        for s in range(4):
            m(images(4, 64, 100 + s))
    return m.eval()


def calibrated_copy(fp, recipe, imgsz=64):
    """A copy of ``fp`` quantized by ``recipe`` (eval mode), calibrated on two batches of 8 random images."""
    q = quantize_model(copy.deepcopy(fp), recipe).eval()
    calibrate(q, [images(8, imgsz, s) for s in range(2)], num_batches=2)
    return q


def images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def first_output(y):
    while isinstance(y, (tuple, list)):
        y = y[0]
    return y


def raw_outputs(y):
    """Every tensor of a YOLO output (raw box/score maps, features, masks), flattened and joined:
    decoded boxes of an untrained model are dominated by anchor positions, raw maps are not."""
    if isinstance(y, torch.Tensor):
        return y.flatten()
    items = y.values() if isinstance(y, dict) else y
    return torch.cat([raw_outputs(v) for v in items])


def tiny_dataset(tmp_path):
    return ensure_embedded_dataset(root=tmp_path / "ds", n_train=8, n_val=4, imgsz=64)


def fp_like_model(data_yaml, cfg="yolov8n-seg.yaml", seed=0, imgsz=64):
    """An FP YOLO model for the classes of ``data_yaml`` with BN statistics from its images (a fresh model's (0, 1)
    statistics shrink everything to ~0), and the calibration images it saw."""
    names = yaml.safe_load(data_yaml.read_text())["names"]
    torch.manual_seed(seed)
    m = (SegmentationModel if "seg" in cfg else DetectionModel)(cfg, nc=len(names), verbose=False)
    loader, _ = calibration_loader(data_yaml, "segment" if "seg" in cfg else "detect", imgsz, 4,
                                   save_dir=data_yaml.parent / "calib_build")
    imgs = [preprocess(b)["img"] for b in loader]
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None
    m.train()
    with torch.no_grad():
        for x in imgs:
            m(x)
    m.names = dict(names)
    return m.eval(), imgs


def qat_like_model(data_yaml, cfg="yolov8n-seg.yaml", seed=0, bits=4, recipe=None, imgsz=64):
    """A quantized YOLO model as QAT leaves it: BN statistics from data, quantizers calibrated
    (``recipe``: the quantization recipe, default W``bits``A``bits`` with 8-bit first and last layers)."""
    m, imgs = fp_like_model(data_yaml, cfg, seed, imgsz)
    quantize_model(m, recipe or {"w_bits": bits, "a_bits": bits, "first_last_bits": 8})
    calibrate(m, imgs, num_batches=len(imgs))
    return m


FIX = ROOT.parent / "shared" / "fixtures" / "original-yolo"
FIXTURES = {"yolov5n": "yolov5n-orig.pt", "yolov5n-seg": "yolov5n-seg-orig.pt", "yolov7-tiny": "yolov7-tiny-orig.pt"}
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"fixtures not found at {FIX}")
RECIPE = {"w_bits": 4, "a_bits": 4, "first_last_bits": 8, "per_channel": True, "weight_init": "lsq"}  # instant init
# Stem + the 1x1 prediction conv of every level (+ the proto output conv), written out from the upstream
# architectures: Detect / Segment is layer 24 of yolov5n(-seg), IDetect layer 77 of yolov7-tiny.
EXPECTED_8BIT = {
    "yolov5n": {"model.0.conv", "model.24.m.0", "model.24.m.1", "model.24.m.2"},
    "yolov5n-seg": {"model.0.conv", "model.24.m.0", "model.24.m.1", "model.24.m.2", "model.24.proto.cv3.conv"},
    "yolov7-tiny": {"model.0.conv", "model.77.m.0", "model.77.m.1", "model.77.m.2"},
}
