"""Recipes as Python presets: the rows of the paper's tables (the same settings as configs/<name>.yaml) and a
W4A8 recipe per deploy target, addressable by name from the API (``recipe="ema_w4a4"``) and from every
``--config`` flag. Keys are train_qat's flag names with '_', as in the yamls.

    lsq_w4a4, ema_w4a4, dampen_w4a4, freeze_w4a4 (and _w3a3, _w4a8)   the paper's methods and bit widths
    w4a8_sim, w4a8_ort, w4a8_npu, w4a8_tensorrt                        W4A8 with EMA for one deploy target
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

# What every row shares: 8-bit stem and final head convs, the step sizes' learning rate, the paper's 100 epochs.
_COMMON = {"first_last_bits": 8, "scale_lr": 1.0e-4, "epochs": 100}
_METHODS = {
    "lsq": {"method": "lsq", "ema_decay": 0.0},
    "ema": {"method": "lsq", "ema_decay": 0.9999, "ema_tau": 2000},
    "dampen": {"method": "dampen", "dampen_lambda": 1.0e-2, "ema_decay": 0.0},
    "freeze": {"method": "freeze", "freeze_th_start": 0.04, "freeze_th_end": 0.01, "ema_decay": 0.0},
}
# W4A4 / W3A3 are the paper's simulation; W4A8 is the deployable model, per channel, on onnxruntime's kernels.
_BITS = {
    "w4a4": {"w_bits": 4, "a_bits": 4, "per_channel": False},
    "w3a3": {"w_bits": 3, "a_bits": 3, "per_channel": False},
    "w4a8": {"w_bits": 4, "a_bits": 8, "per_channel": True, "target": "ort"},
}
TARGET_NAMES = ("sim", "ort", "npu", "tensorrt")  # quant.targets.TARGET_NAMES, checked equal by the tests

PRESETS: dict[str, dict] = {
    **{f"{m}_{b}": {**_BITS[b], **_COMMON, **_METHODS[m]} for m in _METHODS for b in _BITS},
    **{f"w4a8_{t}": {**_BITS["w4a8"], "target": t, **_COMMON, **_METHODS["ema"]} for t in TARGET_NAMES},
}
PRESET_NAMES = tuple(PRESETS)


def preset(name: str) -> dict:
    """A copy of the preset ``name``; ValueError naming the presets for any other name."""
    if name not in PRESETS:
        raise ValueError(f"recipe {name!r} is not a preset: allowed names are {', '.join(PRESET_NAMES)} (or the path "
                         f"of a recipe yaml)")
    return copy.deepcopy(PRESETS[name])


def recipe_settings(recipe) -> dict:
    """The settings of ``recipe``: None (no settings), a preset name, the path of a recipe yaml, or a dict
    of settings (returned as a copy). ValueError for anything else, FileNotFoundError for a missing yaml."""
    if recipe is None:
        return {}
    if isinstance(recipe, dict):
        return copy.deepcopy(recipe)
    if isinstance(recipe, (str, Path)):
        if str(recipe) in PRESETS:
            return preset(str(recipe))
        path = Path(recipe)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise FileNotFoundError(f"recipe file '{path}' does not exist: pass a preset name "
                                        f"({', '.join(PRESET_NAMES)}) or the path of a recipe yaml")
            values = yaml.safe_load(path.read_text()) or {}
            if not isinstance(values, dict):
                raise ValueError(f"recipe file '{path}' holds {type(values).__name__}, not a mapping of settings")
            return values
        return preset(str(recipe))  # names no preset: the error lists them
    raise ValueError(f"recipe={recipe!r} is invalid: pass a preset name, a recipe yaml path or a dict of settings")
