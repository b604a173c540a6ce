"""``quantize(model, recipe, forward_loop=None)``, as NVIDIA ModelOpt's ``mtq.quantize(model, config, forward_loop)``:
quantize any nn.Module in place by a recipe and, given a loop that feeds it data, calibrate its quantizers."""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from yolo_qat.configs.presets import recipe_settings
from yolo_qat.engine.config import QATConfig
from yolo_qat.engine.train_flags import build_parser
from yolo_qat.quant import QuantRecipe, calibrate, quantize_model

RECIPE_FIELDS = {f.name for f in dataclasses.fields(QuantRecipe)}


def recipe_of(recipe) -> QuantRecipe:
    """The QuantRecipe of a QuantRecipe, a preset name, a recipe yaml path or a dict: the quantization fields of
    its settings (a preset's or yaml's training settings, such as ``method`` or ``epochs``, are for train_qat).
    ValueError for a key that is no setting at all."""
    if isinstance(recipe, QuantRecipe):
        return recipe
    settings = recipe_settings(recipe)
    known = {a.dest for a in build_parser()._actions} | {f.name for f in dataclasses.fields(QATConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"recipe has unknown key(s) {unknown}: the quantization fields are {sorted(RECIPE_FIELDS)}")
    return QuantRecipe.from_any({k: v for k, v in settings.items() if k in RECIPE_FIELDS})


def quantize(model: nn.Module, recipe=None, forward_loop: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """Replace every conv of ``model`` (a YOLO DetectionModel / SegmentationModel, or any torch model) by its
    quantized version per ``recipe`` (None: QuantRecipe's defaults, W4A4; a preset name such as ``w4a8_ort``, a
    dict, a QuantRecipe or a recipe yaml path), in place. ``forward_loop(model)``: runs calibration batches
    through the model (``for x in loader: model(x)``); each activation quantizer then starts from the range of
    what it saw (MSE-optimal step, LSQ+ offset at the minimum), as QAT's calibration does. Without it the
    activation quantizers are uncalibrated, and training refuses them until they are. Returns ``model``."""
    quantize_model(model, recipe_of(recipe))
    if forward_loop is not None:
        # The whole loop is one "batch" of calibrate: its hooks observe every forward the loop makes.
        calibrate(model, [forward_loop], num_batches=1, forward=lambda m, loop: loop(m))
    return model
