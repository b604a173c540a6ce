"""The YOLO layer policy applies whatever the user imported, and quantize_model refuses a model with
fixed operators that no policy claims."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import yolo_qat.quant.convert as convert
from yolo_qat.quant import QuantConv2d, default_policy, layer_bits, quantize_model

ROOT = Path(__file__).resolve().parents[2]
RECIPE = {"w_bits": 4, "a_bits": 4, "first_last_bits": 8, "per_channel": False}

# What a user of an Ultralytics workflow writes: quant and Ultralytics' model classes, nothing of models/.
FRESH = """
import json, sys
from torch import nn
from ultralytics.nn.tasks import DetectionModel, SegmentationModel
from yolo_qat.quant import quantize_model, layer_bits

class MyDetector(DetectionModel):  # a user subclass, defined outside Ultralytics: found through its bases
    pass  # (finalize off below: the policy's quantization-aware fuse() supports Ultralytics' own classes only)

out = {"models_imported_before": "yolo_qat.models" in sys.modules}
for key, cls, cfg in (("det", DetectionModel, "yolov5nu.yaml"), ("seg", SegmentationModel, "yolov8n-seg.yaml"),
                      ("sub", MyDetector, "yolov5nu.yaml")):
    m = cls(cfg, nc=3, verbose=False)
    n_convs = sum(type(x) is nn.Conv2d for x in m.modules())
    quantize_model(m, %r, finalize=key != "sub")
    out[key] = {"bits": {k: list(v) for k, v in layer_bits(m).items()}, "n_convs": n_convs, "head": len(m.model) - 1,
                "dfl_type": type(m.model[-1].dfl.conv).__name__, "class": type(m).__name__}
print("RESULT" + json.dumps(out))
""" % RECIPE


def expected_8bit(head: int, seg: bool) -> set[str]:
    """Stem + the final prediction conv of every head branch (+ proto output), named from the layout of
    Ultralytics' Detect / Segment heads: each branch ends in a bare nn.Conv2d at index 2."""
    names = {"model.0.conv"}
    for branch in ("cv2", "cv3") + (("cv4",) if seg else ()):
        names |= {f"model.{head}.{branch}.{i}.2" for i in range(3)}
    if seg:
        names.add(f"model.{head}.proto.cv3.conv")
    return names


def test_yolo_policy_applies_in_a_process_that_imports_only_quant():
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-c", FRESH], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    assert out["models_imported_before"] is False  # the policy was not there by a side effect of the test set-up
    for key, seg, cls in (("det", False, "QuantDetectionModel"), ("seg", True, "QuantSegmentationModel"),
                          ("sub", False, "MyDetector")):
        res = out[key]
        bits = {k: tuple(v) for k, v in res["bits"].items()}
        head = res["head"]
        assert res["dfl_type"] == "Conv2d" and f"model.{head}.dfl.conv" not in bits, key
        assert len(bits) == res["n_convs"] - 1, key  # everything else is quantized
        eight = expected_8bit(head, seg)
        assert {n for n, b in bits.items() if b == (8, 8)} == eight, key
        assert all(b == (4, 4) for n, b in bits.items() if n not in eight), key
        assert res["class"] == cls, key  # the policy's finalize ran too (quantization-aware fuse)


class DFL(nn.Module):
    """Shaped like Ultralytics' DFL: a fixed 1x1 conv computing an expectation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 1, 1, bias=False).requires_grad_(False)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.body = nn.Conv2d(8, 16, 3)
        self.dfl = DFL()


def test_refuses_a_dfl_that_no_policy_claims():
    with pytest.raises(ValueError) as e:
        quantize_model(Toy(), RECIPE)
    msg = str(e.value)
    assert "dfl.conv" in msg and "DFL" in msg and "exclude" in msg and "policy" in msg
    m = quantize_model(Toy(), {**RECIPE, "exclude": ["dfl.conv"]})  # the fix the message names
    assert type(m.dfl.conv) is nn.Conv2d and set(layer_bits(m)) == {"stem", "body"}
    m = quantize_model(Toy(), RECIPE, policy=default_policy)  # an explicit policy: the user's choice
    assert isinstance(m.dfl.conv, QuantConv2d)


def test_refuses_a_conv_frozen_apart_from_the_rest():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1).requires_grad_(False), nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match=r"1 \(weight frozen"):
        quantize_model(m, RECIPE)
    # every parameter frozen (as loaded from a checkpoint) sets no conv apart: quantized as before
    m = quantize_model(m.requires_grad_(False), RECIPE)
    assert layer_bits(m) == {"0": (8, 8), "1": (4, 4), "2": (8, 8)}


def test_ultralytics_model_without_its_policy_package_is_refused(monkeypatch):
    """The provider cannot be imported (quant/ copied without models/): the DFL still stops the run."""
    from ultralytics.nn.tasks import DetectionModel

    monkeypatch.setattr(convert, "_POLICIES", [])
    monkeypatch.setattr(convert, "POLICY_PROVIDERS", {"ultralytics.": "no_such_policy_package.policy"})
    m = DetectionModel("yolov5nu.yaml", nc=3, verbose=False)
    with pytest.raises(ValueError, match=rf"model\.{len(m.model) - 1}\.dfl\.conv \(inside a DFL module\)"):
        quantize_model(m, RECIPE)
