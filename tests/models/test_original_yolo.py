"""The original anchor-based YOLOv5 / YOLOv7 (models.yolo, models.common): their checkpoints load as they
are and reproduce the original code's outputs (refs.pt, made with yolov5 7.0 / yolov7, not by this repo),
the shipped yamls build the upstream architectures (parameter counts of the original code)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from yolo_qat.models.pickled_names import renaming_pickle
from yolo_qat.models import common
from yolo_qat.models.checkpoint import load_checkpoint
from yolo_qat.models.registry import MODEL_CFGS, ORIGINAL_CFGS, is_original_yaml
from yolo_qat.models.yaml_rule import resolve_model_cfg
from yolo_qat.models.yolo import Detect, DetectionModel, IDetect, Segment, SegmentationModel

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT.parent / "shared" / "fixtures" / "original-yolo"
FIXTURES = {"yolov5n": "yolov5n-orig.pt", "yolov5n-seg": "yolov5n-seg-orig.pt", "yolov7-tiny": "yolov7-tiny-orig.pt"}
TOL = 1e-4

needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"fixtures not found at {FIX}")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative max difference, per column group (boxes in pixels, scores, mask coefficients), so the
    scores are not hidden behind the much larger pixel coordinates."""
    if a.shape != b.shape:
        return float("inf")
    groups = (slice(0, 4), slice(4, None)) if a.dim() == 3 else (slice(None),)
    return max(((a[..., g] - b[..., g]).abs().max() / b[..., g].abs().max()).item() for g in groups)


# A fresh interpreter, isolated (-I: no cwd, no PYTHONPATH, no user site), cwd elsewhere, the repo as the only
# project path: the fixture must unpickle into this repo's models.yolo / models.common and nothing else.
_CHILD = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path.insert(0, sys.argv[1])
    for pkg in ("yolov5", "yolov7", "yolov7detect"):
        assert importlib.util.find_spec(pkg) is None, pkg + " is importable"
    import torch
    torch.set_num_threads(2)
    from ultralytics.nn.modules import Conv as UConv
    from yolo_qat.models.original import load_original
    name, fix = sys.argv[2], sys.argv[3]
    model, ckpt = load_original(f"{fix}/{sys.argv[4]}")
    refs = torch.load(f"{fix}/refs.pt")
    def rel(a, b):
        if a.shape != b.shape:
            return float("inf")
        gs = (slice(0, 4), slice(4, None)) if a.dim() == 3 else (slice(None),)
        return max(((a[..., g] - b[..., g]).abs().max() / b[..., g].abs().max()).item() for g in gs)
    def run():
        with torch.no_grad():
            return model(refs["x"].clone())
    out = run()
    res = {"pred": rel(out[0], refs[name]), "n_out": len(out), "training": model.training,
           "dtype": str(next(model.parameters()).dtype), "names": {str(k): v for k, v in model.names.items()},
           "maps": [list(t.shape) for t in out[-1]],
           "classes": sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                              if type(m).__module__.startswith("yolo_qat.models")}),
           "convs_are_ultralytics": all(isinstance(m, UConv) for m in model.modules() if type(m).__name__ == "Conv"),
           "yolo_modules": sorted(k for k in sys.modules if k.split(".")[0] in ("yolov5", "yolov7", "utils"))}
    if name.endswith("-seg"):
        res["proto"] = rel(out[1], refs[name + "-proto"])
    model.fuse(verbose=False)
    out = run()
    res["fused_pred"] = rel(out[0], refs[name])
    res["fused"] = model.is_fused()
    res["implicit_left"] = sum(type(m).__name__ in ("ImplicitA", "ImplicitM") for m in model.modules())
    print(json.dumps(res))
""")


@needs_fixtures
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_loads_alone_and_matches_original_outputs(name, tmp_path):
    r = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(ROOT), name, str(FIX), FIXTURES[name]],
                       cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "YOLO_OFFLINE": "1", "MPLBACKEND": "Agg"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["pred"] <= TOL and res["fused_pred"] <= TOL, res
    assert res["fused"] and res["implicit_left"] == 0
    assert res["training"] is False and res["dtype"] == "torch.float32"
    assert res["names"] == {"0": "0", "1": "1", "2": "2"}  # yolov7 pickles a list: a dict for Ultralytics
    assert res["convs_are_ultralytics"] and res["yolo_modules"] == []
    assert res["maps"] == [[2, 3, 16, 16, 8 + 32 * name.endswith("-seg")], [2, 3, 8, 8, 8 + 32 * name.endswith("-seg")],
                           [2, 3, 4, 4, 8 + 32 * name.endswith("-seg")]]
    head = {"yolov5n": "yolo_qat.models.yolo.Detect", "yolov5n-seg": "yolo_qat.models.yolo.Segment",
            "yolov7-tiny": "yolo_qat.models.yolo.IDetect"}
    assert head[name] in res["classes"]
    if name.endswith("-seg"):
        assert res["n_out"] == 3 and res["proto"] <= TOL  # (pred, proto, raw maps)
    else:
        assert res["n_out"] == 2


# ------------------------------------------------------------------------------------------ built from yamls

_BUILT = {}


def build(name, nc=80):
    if (name, nc) not in _BUILT:
        cls = SegmentationModel if name.endswith("-seg") else DetectionModel
        torch.manual_seed(0)
        _BUILT[name, nc] = cls(name, nc=nc, verbose=False)
    return _BUILT[name, nc]


UPSTREAM_PARAMS = {  # the original code's counts at nc=80: (model, fused)
    "yolov5n": (1_872_157, 1_867_405), "yolov5s": (7_235_389, 7_225_885),
    "yolov5n-seg": (1_991_549, 1_986_637), "yolov5s-seg": (7_621_277, 7_611_485), "yolov7-tiny": (None, 6_219_709),
}


@pytest.mark.parametrize("name", sorted(UPSTREAM_PARAMS))
def test_yaml_builds_upstream_parameter_counts(name):
    import copy

    model = build(name)
    n, n_fused = UPSTREAM_PARAMS[name]
    if n is not None:
        assert sum(p.numel() for p in model.parameters()) == n
    fused = copy.deepcopy(model).eval().fuse(verbose=False)
    assert fused.is_fused()
    assert sum(p.numel() for p in fused.parameters()) == n_fused
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(fused(x)[0], model.eval()(x)[0]) <= TOL
    model.train()


@needs_fixtures
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_yaml_builds_the_fixture_architecture(name):
    """A model built from the shipped yaml (nc=3) takes the fixture's state_dict strictly and then gives the
    original code's outputs: the parser builds the same layers, channels and head as upstream."""
    ckpt = torch.load(FIX / FIXTURES[name], map_location="cpu", weights_only=False, pickle_module=renaming_pickle)
    model = build(name, nc=3)
    model.load_state_dict(ckpt["model"].float().state_dict(), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(torch.load(FIX / "refs.pt")["x"])
    assert rel_diff(out[0], torch.load(FIX / "refs.pt")[name]) <= TOL
    assert model.yaml["backbone"] == ckpt["model"].yaml["backbone"] and model.yaml["anchors"] == ckpt["model"].yaml[
        "anchors"]
    model.train()


@pytest.mark.parametrize("name", sorted(ORIGINAL_CFGS))
def test_output_layouts(name):
    model = build(name)
    seg, nc = name.endswith("-seg"), 80
    no = 5 + nc + 32 * seg
    model.train()
    out = model(torch.zeros(2, 3, 64, 96))
    maps, proto = (out if seg else (out, None))
    assert [tuple(t.shape) for t in maps] == [(2, 3, 8, 12, no), (2, 3, 4, 6, no), (2, 3, 2, 3, no)]
    if seg:
        assert proto.shape == (2, 32, 16, 24)  # 32 prototypes at 1/4 of the input
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 96))
    assert len(out) == (3 if seg else 2)
    pred = out[0]
    assert pred.shape == (2, 3 * (96 + 24 + 6), no)
    # sigmoid scores in (0, 1); the mask coefficients of Segment are not squashed
    assert ((pred[..., 4:5 + nc] > 0) & (pred[..., 4:5 + nc] < 1)).all()
    head = model.model[-1]
    head.export = True
    with torch.no_grad():
        assert len(model(torch.zeros(1, 3, 64, 64))) == (2 if seg else 1)  # yolov5's export layout
    head.export = False
    model.train()


def test_decoding_and_bias_priors():
    """xy = (2 sig - 0.5 + cell) * stride, wh = (2 sig)^2 * anchor in pixels, checked on a head with known
    conv outputs; objectness / class bias priors as upstream."""
    import math

    model = build("yolov5n")
    head = model.model[-1]
    for conv, s in zip(head.m, head.stride):
        b = conv.bias.detach().view(head.na, -1)
        lim = 1 / math.sqrt(conv.in_channels) + 1e-6  # nn.Conv2d's default bias init is U(-lim, lim)
        assert (b[:, 4] - math.log(8 / (640 / s) ** 2)).abs().max() <= lim
        assert (b[:, 5:] - math.log(0.6 / (80 - 0.99999))).abs().max() <= lim
    v7 = build("yolov7-tiny").model[-1]
    b = v7.m[0].bias.detach().view(v7.na, -1)
    assert (b[:, 5:] - math.log(0.6 / (80 - 0.99))).abs().max() <= 1 / math.sqrt(v7.m[0].in_channels) + 1e-6

    det = Detect(nc=1, anchors=([10, 13, 16, 30],), ch=(4,))
    det.stride = torch.tensor([8.0])
    det.anchors /= 8
    with torch.no_grad():
        det.m[0].weight.zero_()
        det.m[0].bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, 0.3, 0.1, -0.2, 0.4, 1.5, -0.7, 0.9]))
    det.eval()
    with torch.no_grad():
        pred, maps = det([torch.zeros(1, 4, 2, 3)])
    sig = torch.sigmoid
    p = pred.view(1, 2, 2, 3, 6)  # (b, anchor, y, x, 6)
    for a, (aw, ah) in enumerate(((10, 13), (16, 30))):
        t = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, 0.3]) if a == 0 else torch.tensor([0.1, -0.2, 0.4, 1.5, -0.7, 0.9])
        for y in range(2):
            for x in range(3):
                want = torch.stack([(sig(t[0]) * 2 - 0.5 + x) * 8, (sig(t[1]) * 2 - 0.5 + y) * 8,
                                    (sig(t[2]) * 2) ** 2 * aw, (sig(t[3]) * 2) ** 2 * ah, sig(t[4]), sig(t[5])])
                torch.testing.assert_close(p[0, a, y, x], want)


def test_parser_details():
    import yaml

    v7 = build("yolov7-tiny")
    acts = {type(m.act) for m in v7.modules() if isinstance(m, common.Conv)}
    assert acts == {nn.LeakyReLU} and all(m.act.negative_slope == 0.1 for m in v7.modules()
                                          if isinstance(m, common.Conv))
    assert isinstance(v7.model[-1], IDetect) and v7.model[-1].anchor_grid.shape == (3, 1, 3, 1, 1, 2)
    # anchors given largest-first are reversed to follow the strides (upstream's check_anchor_order)
    d = yaml.safe_load(Path(MODEL_CFGS["yolov5n"]).read_text())
    d["anchors"] = d["anchors"][::-1]
    m = DetectionModel(d, nc=2, verbose=False)
    torch.testing.assert_close(m.model[-1].anchors, build("yolov5n").model[-1].anchors)
    # an int: that many placeholder anchors per level (AutoAnchor sets them), as upstream
    m = DetectionModel("yolov5n", nc=2, anchors=2, verbose=False)
    assert m.model[-1].anchors.shape == (3, 2, 2) and m.model[-1].na == 2
    # a yaml-wide activation applies to that build only
    d = yaml.safe_load(Path(MODEL_CFGS["yolov5n"]).read_text())
    d["activation"] = "nn.ReLU()"
    assert {type(x.act) for x in DetectionModel(d, verbose=False).modules() if isinstance(x, common.Conv)} == {nn.ReLU}
    assert type(common.Conv(3, 8).act) is nn.SiLU
    d["backbone"][2][2] = "C2f"
    with pytest.raises(ValueError, match="C2f"):
        DetectionModel(d, verbose=False)
    with pytest.raises(ValueError, match="not an original YOLOv5/YOLOv7 model yaml"):
        DetectionModel({"nc": 80, "scales": {}, "backbone": [], "head": []})


def test_registry_tells_the_two_yaml_formats_apart():
    for name in ORIGINAL_CFGS:
        assert is_original_yaml(name) and is_original_yaml(f"{name}.yaml") and is_original_yaml(MODEL_CFGS[name])
        assert resolve_model_cfg(f"{name}.yaml") == ORIGINAL_CFGS[name]
    for name in ("yolov5nu", "yolov5nu-seg", "yolov7-tinyu", "yolov8n.yaml", "no-such-model"):
        assert not is_original_yaml(name)
    if FIX.is_dir():
        assert is_original_yaml(FIX / "yolov7-tiny.yaml")


def test_apply_moves_head_state_and_pickles(tmp_path):
    model = build("yolov7-tiny", nc=3).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)[0]
        model.double()
        head = model.model[-1]
        assert head.stride.dtype == torch.float64 and head.grid[0].dtype == torch.float64
        out = model(x.double())[0]
    torch.testing.assert_close(out.float(), ref, rtol=1e-5, atol=1e-4)
    model.float()
    torch.save({"model": model}, tmp_path / "m.pt")
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    with torch.no_grad():
        assert rel_diff(loaded(x)[0], ref) <= TOL
    model.train()


def _save_with_foreign_class(tmp_path, module_name, class_name):
    """A checkpoint whose pickle names `module_name.class_name`, a class this repo does not define."""
    import types

    foreign = type(class_name, (nn.Module,), {"__module__": module_name})
    parts = module_name.split(".")
    made = [n for n in (".".join(parts[:i + 1]) for i in range(len(parts))) if n not in sys.modules]
    for name in made:  # the package too: pickle imports 'models' before 'models.yolo' when it saves
        sys.modules[name] = types.ModuleType(name)
    mod = sys.modules[module_name]
    setattr(mod, class_name, foreign)
    try:
        torch.save({"model": foreign(), "ema": None}, tmp_path / "foreign.pt")
    finally:
        delattr(mod, class_name)
        for name in made:
            del sys.modules[name]
    return tmp_path / "foreign.pt"


@pytest.mark.parametrize("module_name,class_name,named", [
    ("models.yolo", "ClassificationModel", "class models.yolo.ClassificationModel"),
    ("models.common", "BottleneckCSP", "class models.common.BottleneckCSP"),
    ("models.experimental", "Ensemble", "module models.experimental"),
    ("zz_not_yolo", "Thing", None),  # not a YOLO repository's class: refused by the safe loader (models/safe_load.py)
])
def test_checkpoint_naming_an_unknown_class_gets_one_paragraph(tmp_path, module_name, class_name, named):
    path = _save_with_foreign_class(tmp_path, module_name, class_name)
    with pytest.raises(ValueError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and e.value.__cause__ is None and e.value.__suppress_context__
    if named:
        assert named in msg and "Supported:" in msg and "yolov5 v6.x / v7.0" in msg
    else:
        assert "'zz_not_yolo.Thing'" in msg and msg.startswith("refused to load") and "--trust-checkpoint" in msg


def test_original_models_are_ultralytics_models():
    from ultralytics.nn import tasks
    from ultralytics.nn.modules import C3, SPPF, Bottleneck, Concat, Conv, Proto

    seg = build("yolov5n-seg")
    assert isinstance(seg, tasks.SegmentationModel) and isinstance(build("yolov5n"), tasks.DetectionModel)
    assert seg.task == "segment" and build("yolov7-tiny").task == "detect" and seg.end2end is False
    kinds = {type(m) for m in seg.modules()}
    for ours, theirs in ((common.Conv, Conv), (common.C3, C3), (common.SPPF, SPPF), (common.Bottleneck, Bottleneck),
                         (common.Concat, Concat), (common.Proto, Proto)):
        assert ours in kinds and issubclass(ours, theirs)
    assert isinstance(seg.model[-1], Segment)
    from yolo_qat.models.loss import YOLOv5DetLoss, YOLOv5SegLoss  # what Ultralytics' BaseModel.loss() gets

    assert type(build("yolov7-tiny").init_criterion()) is YOLOv5DetLoss
    assert type(seg.init_criterion()) is YOLOv5SegLoss


def test_other_original_blocks_build_run_and_fuse():
    """Blocks the fixtures do not contain (Focus, SPP of yolov5 <= 5.0; RepConv, SPPCSPC of yolov7), an
    int anchor count and a two-level IDetect: built by the parser, fused exactly."""
    torch.manual_seed(0)
    d = {"nc": 2, "depth_multiple": 0.33, "width_multiple": 0.25, "anchors": 2,
         "backbone": [[-1, 1, "Focus", [32, 3]],                 # 0 /2
                      [-1, 1, "Conv", [64, 3, 2]],               # 1 /4
                      [-1, 3, "C3", [64]],                       # 2
                      [-1, 1, "Conv", [128, 3, 2]],              # 3 /8
                      [-1, 1, "RepConv", [128, 3, 1]],           # 4 (identity branch: c1 == c2)
                      [-1, 1, "MP", []],                         # 5 /16
                      [-1, 1, "SPP", [128, [5, 9, 13]]],         # 6
                      [-1, 1, "SPPCSPC", [128]]],                # 7
         "head": [[-1, 1, "RepConv", [64, 3, 1, None, 1, "nn.LeakyReLU(0.1)"]],  # 8 (no identity branch)
                  [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],                 # 9 /8
                  [[-1, 4], 1, "Concat", [1]],                                    # 10
                  [-1, 1, "SP", [5]],                                             # 11
                  [[11, 8], 1, "IDetect", ["nc", "anchors"]]]}                    # 12
    model = DetectionModel(d, verbose=False)
    kinds = [type(m).__name__ for m in model.model]
    assert kinds[:9] == ["Focus", "Conv", "C3", "Conv", "RepConv", "MP", "SPP", "SPPCSPC", "RepConv"]
    assert isinstance(model.model[4].rbr_identity, nn.BatchNorm2d) and model.model[8].rbr_identity is None
    assert isinstance(model.model[8].act, nn.LeakyReLU) and len(model.model[2].m) == 1  # 3 x 0.33 repeats
    head = model.model[-1]
    assert head.stride.tolist() == [8.0, 16.0] and head.na == 2 and head.anchors.shape == (2, 2, 2)
    with torch.no_grad():  # anchors (placeholders from the int) and BN statistics made non-trivial
        head.anchors.copy_(torch.tensor([[[1.5, 2.0], [3.0, 2.5]], [[2.0, 4.0], [5.0, 3.5]]]))
        head.anchor_grid.copy_((head.anchors * head.stride.view(-1, 1, 1)).view(2, 1, 2, 1, 1, 2))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        for p in list(head.ia.parameters()) + list(head.im.parameters()):
            p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref, maps = model(x)
        assert ref.shape == (2, 2 * (8 * 8 + 4 * 4), 7) and [tuple(t.shape) for t in maps] == [(2, 2, 8, 8, 7),
                                                                                                (2, 2, 4, 4, 7)]
        model.fuse(verbose=False)
        assert model.is_fused() and all(hasattr(m, "rbr_reparam") for m in model.modules()
                                        if isinstance(m, common.RepConv))
        assert not any(isinstance(m, (common.ImplicitA, common.ImplicitM, nn.BatchNorm2d)) for m in model.modules())
        assert rel_diff(model(x)[0], ref) <= TOL


def test_idetect_fold_keeps_quantized_weights():
    """On quantized 1x1 convs ImplicitM goes into the output scale (integer weights unchanged); ImplicitA,
    added before the input quantizer, has no exact fold and stays."""
    from yolo_qat.quant import QuantConv2d
    from yolo_qat.quant.fused import reference_only

    torch.manual_seed(0)
    head = IDetect(nc=2, anchors=([10, 13, 16, 30], [30, 61, 62, 45]), ch=(8, 16))
    head.stride = torch.tensor([8.0, 16.0])
    head.anchors /= head.stride.view(-1, 1, 1)
    with torch.no_grad():
        for p in list(head.ia.parameters()) + list(head.im.parameters()):
            p.add_(torch.randn_like(p) * 0.2)
    head.m = nn.ModuleList(QuantConv2d.from_conv(c, 4, 4) for c in head.m)
    head.eval()
    x = [torch.rand(1, 8, 8, 8), torch.rand(1, 16, 4, 4)]
    with torch.no_grad(), reference_only():  # the folding is under test, not the C++ kernel (no compile here)
        ref = head([t.clone() for t in x])[0]
        codes = [c.integer_weight().clone() for c in head.m]
        head.fuse_implicit()
        out = head([t.clone() for t in x])[0]
    assert rel_diff(out, ref) <= TOL and head.implicit_fused()
    assert all(isinstance(m, common.ImplicitA) for m in head.ia) and not any(isinstance(m, common.ImplicitM)
                                                                             for m in head.im)
    assert all(torch.equal(c.integer_weight(), w) for c, w in zip(head.m, codes))


@needs_fixtures
def test_training_image_size_of_a_yolov5_checkpoint_is_the_default_of_val_and_qc():
    """yolov5's train.py records its arguments in ckpt['opt'] (the fixtures were trained at 128): val.py and
    correct_qc.py default to that size; yolov7 records none, so 640 (both scripts' fallback)."""
    from yolo_qat.models.facts import trained_imgsz
    from yolo_qat.models.checkpoint import load_checkpoint

    assert trained_imgsz(load_checkpoint(FIX / FIXTURES["yolov5n"])[0]) == 128
    assert trained_imgsz(load_checkpoint(FIX / FIXTURES["yolov5n-seg"])[0]) == 128
    assert trained_imgsz(load_checkpoint(FIX / FIXTURES["yolov7-tiny"])[0]) == 640
    ckpt = torch.load(FIX / FIXTURES["yolov5n"], map_location="cpu", weights_only=False, pickle_module=renaming_pickle)
    ckpt["opt"]["imgsz"] = [320, 256]  # a (h, w) pair: the long side
    from yolo_qat.models.original import model_from_checkpoint

    assert trained_imgsz(model_from_checkpoint(ckpt)) == 320
