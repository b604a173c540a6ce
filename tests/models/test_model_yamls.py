"""Every model yaml in models/ builds and runs forward, in train and eval mode."""
import pytest
import torch
from ultralytics.nn.tasks import DetectionModel, SegmentationModel, guess_model_task, yaml_model_load

from yolo_qat.models.registry import MODEL_CFGS, is_original_yaml
from yolo_qat.models.yaml_rule import resolve_model_cfg


def _build(name):
    path = MODEL_CFGS[name]
    seg = guess_model_task(yaml_model_load(path)) == "segment"
    assert seg == name.endswith("-seg")
    return (SegmentationModel if seg else DetectionModel)(path, nc=80, verbose=False), seg


@pytest.mark.parametrize("name", sorted(n for n in MODEL_CFGS if not is_original_yaml(n)))  # originals: test_original_yolo
def test_builds_and_forwards(name):
    model, seg = _build(name)
    x = torch.zeros(1, 3, 64, 64)
    model.train()
    out = model(x)
    assert out["boxes"].shape[:2] == (1, 64) and out["scores"].shape[:2] == (1, 80)  # DFL bins x 4, classes
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    if seg:  # ((predictions, proto), raw head outputs)
        pred, proto = out[0]
        assert pred.shape[:2] == (1, 4 + 80 + 32)
        assert proto.shape == (1, 32, 16, 16)  # 32 prototypes at 1/4 of the input
    else:
        assert out[0].shape[:2] == (1, 4 + 80)


def test_yolov5nu_seg_has_the_yolov5nu_backbone():
    seg = SegmentationModel(MODEL_CFGS["yolov5nu-seg"], nc=80, verbose=False)
    det = DetectionModel(MODEL_CFGS["yolov5nu"], nc=80, verbose=False)
    n = len(det.model) - 1  # everything but the head
    assert [type(m).__name__ for m in seg.model[:n]] == [type(m).__name__ for m in det.model[:n]]
    assert sum(p.numel() for p in seg.model[:n].parameters()) == sum(p.numel() for p in det.model[:n].parameters())


def test_yolov7_tiny_uses_leaky_relu():
    model, _ = _build("yolov7-tinyu")
    acts = {type(m.act) for m in model.modules() if hasattr(m, "act") and isinstance(m.act, torch.nn.Module)}
    assert acts == {torch.nn.LeakyReLU}


def test_resolve_model_cfg(tmp_path):
    assert resolve_model_cfg("yolov5nu") == MODEL_CFGS["yolov5nu"]
    assert resolve_model_cfg("yolov7-tinyu-seg.yaml") == MODEL_CFGS["yolov7-tinyu-seg"]
    assert resolve_model_cfg("yolov8n-seg.yaml") == "yolov8n-seg.yaml"
    assert resolve_model_cfg("yolo11n.yaml") == "yolo11n.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("nc: 1\n")
    assert resolve_model_cfg(own) == str(own)
    with pytest.raises(ValueError, match="yolov7-tinyu"):
        resolve_model_cfg("no-such-model")
