"""``yolo_qat.quantize(model, recipe, forward_loop)`` (ModelOpt's mtq.quantize shape) and the recipe presets:
the bits a recipe names, calibration on what the loop feeds, and the presets equal to the yamls beside them."""
import copy

import pytest
import torch
import yaml
from torch import nn
from ultralytics.nn.tasks import DetectionModel, SegmentationModel

import yolo_qat
from yolo_qat.configs import CONFIGS_DIR
from yolo_qat.configs.presets import PRESETS, TARGET_NAMES, preset
from yolo_qat.engine.train_flags import build_parser
from yolo_qat.quant import QuantRecipe, layer_bits, quant_convs
from yolo_qat.quant.targets import TARGET_NAMES as CODE_TARGETS


def input_scales(model) -> dict:
    return {n: m.input_quantizer.scale.detach().clone() for n, m in quant_convs(model).items()}


def plain_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 4, 1))


def loop_over(images):
    def forward_loop(model):
        for x in images:
            model(x)
    return forward_loop


def test_quantize_a_plain_model_by_a_dict_and_calibrate():
    images = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 3 for i in range(3)]
    recipe = {"w_bits": 3, "a_bits": 5, "first_last_bits": None}
    bare = yolo_qat.quantize(plain_model(), recipe)
    model = plain_model()
    assert yolo_qat.quantize(model, recipe, forward_loop=loop_over(images)) is model  # in place, returned
    assert set(layer_bits(model).values()) == {(3, 5)} and len(layer_bits(model)) == 3
    before, after = input_scales(bare), input_scales(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)  # every quantizer saw the loop's data
    first = quant_convs(model)["0"].input_quantizer  # the first conv's range covers what the loop fed it
    assert first.scale * (first.qmax - first.qmin) > 5


@pytest.mark.parametrize("cls,cfg", [(DetectionModel, "yolov5nu.yaml"), (SegmentationModel, "yolov8n-seg.yaml")])
def test_quantize_a_yolo_model_by_a_preset(cls, cfg):
    torch.manual_seed(0)
    fp = cls(cfg, nc=3, verbose=False).eval()
    images = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    bare = yolo_qat.quantize(copy.deepcopy(fp), "lsq_w3a3")
    model = yolo_qat.quantize(copy.deepcopy(fp), "lsq_w3a3", forward_loop=loop_over(images))
    bits = layer_bits(model)
    assert set(bits.values()) == {(3, 3), (8, 8)} and list(bits.values()).count((3, 3)) > len(bits) // 2
    assert model.quant_recipe == QuantRecipe(w_bits=3, a_bits=3, first_last_bits=8).to_dict()
    before, after = input_scales(bare), input_scales(model)
    assert sum(not torch.equal(before[n], after[n]) for n in before) >= len(before) - 1
    with torch.no_grad():
        y = model(images[0])
    while isinstance(y, (tuple, list)):
        y = y[0]
    assert torch.isfinite(y).all()


def test_quantize_takes_every_recipe_form(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"w_bits": 2, "a_bits": 8, "first_last_bits": None, "method": "lsq"}))
    for recipe, want in ((QuantRecipe(w_bits=6, a_bits=6, first_last_bits=None), (6, 6)), (str(path), (2, 8)),
                         ("w4a8_tensorrt", (4, 8))):
        assert set(layer_bits(yolo_qat.quantize(plain_model(), recipe)).values()) >= {want}
    with pytest.raises(ValueError, match="not a preset"):
        yolo_qat.quantize(plain_model(), "ema_w2a2")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['w_bit'\]"):
        yolo_qat.quantize(plain_model(), {"w_bit": 4})


def test_presets_equal_the_yamls():
    yamls = sorted(CONFIGS_DIR.glob("*.yaml"))
    assert len(yamls) == 12
    for path in yamls:
        assert preset(path.stem) == yaml.safe_load(path.read_text()), path.name


def test_a_w4a8_preset_per_deploy_target():
    assert TARGET_NAMES == CODE_TARGETS
    flags = {a.dest for a in build_parser()._actions}
    for name, settings in PRESETS.items():
        assert set(settings) <= flags, name  # every key is a train_qat flag
    for t in CODE_TARGETS:
        r = QuantRecipe.from_any({k: v for k, v in preset(f"w4a8_{t}").items() if k in QuantRecipe.__dataclass_fields__})
        assert (r.w_bits, r.a_bits, r.target) == (4, 8, t)


def test_config_flag_takes_a_preset_name():
    from yolo_qat.engine.cli import parse_args, qat_config

    opt = parse_args(["--cfg", "yolov5nu", "--config", "freeze_w4a8", "--epochs", "3"])
    cfg = qat_config(opt)
    assert (cfg.method, cfg.recipe["target"], cfg.recipe["a_bits"], opt.epochs) == ("freeze", "ort", 8, 3)
