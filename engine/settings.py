"""Settings as data: the flags and ``--config`` yaml keys of a script, generated from dataclass fields.

A field's name is its yaml key and (with '-' for '_') its flag; its default and help text come from the
dataclass (``field(metadata={"help": ...})``), so a field added to ``QuantRecipe``, ``QATConfig`` or
``QCConfig`` is settable from the command line and from ``--config`` without touching a parser. One
command-line form per type:

    bool              --flag / --no-flag
    int, float, str   one value; a field that may be None also takes ``none``
    list              zero or more values: --exclude model.0.conv model.9.cv2.conv
    dict              one yaml / json mapping: --overrides '{model.2.cv1.conv: {w_bits: 8, a_bits: 8}}'

A field whose metadata has ``"fields": OtherDataclass`` (``QATConfig.recipe``: ``QuantRecipe``) is set
through that dataclass's flags, flattened (``--w-bits``, yaml key ``w_bits``).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from yolo_qat.configs.presets import PRESET_NAMES, preset
from yolo_qat.engine.cli_common import InputError

FORMS = "dicts are one yaml/json mapping, lists zero or more values, 'none' clears a value that may be None"


def _members(hint) -> tuple:
    """The types a field accepts: ``int | None`` -> (int, NoneType); ``list[str]`` -> (list,)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_origin(h) or h for h in typing.get_args(hint))
    return (typing.get_origin(hint) or hint,)


def _named(fn, name: str):
    fn.__name__ = name  # argparse names the type in its message: "invalid int value: 'x'"
    return fn


def _none_or(conv):
    return _named(lambda s: None if s.strip().lower() in ("none", "null") else conv(s), conv.__name__)


def mapping(text: str) -> dict:
    """argparse type of a dict-valued flag: one yaml / json mapping."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a yaml / json mapping: pass e.g. "
                                         f"'{{model.2.cv1.conv: {{w_bits: 8}}}}'")
    return value


def setting_fields(cls, only=None, skip=()) -> list[tuple[dataclasses.Field, typing.Any]]:
    """(field, type hint) of every setting of ``cls``, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "fields" in f.metadata:
            out += setting_fields(f.metadata["fields"], only, skip)
        elif (only is None or f.name in only) and f.name not in skip:
            out.append((f, hints[f.name]))
    return out


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def add_fields(p, cls, *, prefix: str = "", only=None, skip=()) -> None:
    """One flag per setting of ``cls`` (``--<prefix>-<name>``, dest ``<prefix>_<name>``), on a parser or group."""
    for f, hint in setting_fields(cls, only, skip):
        kinds = _members(hint)
        base = next(k for k in kinds if k is not type(None))
        dest = f"{prefix}_{f.name}" if prefix else f.name
        help_text = f.metadata.get("help", "").replace("%", "%%")
        shown = "" if "default" in help_text else " (default: %(default)s)"
        kw = {"dest": dest, "default": default_of(f), "help": (help_text + shown).lstrip()}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif base is list:
            kw["nargs"] = "*"
        elif base is dict:
            kw["type"], kw["metavar"] = mapping, "MAPPING"
        else:
            kw["type"] = _none_or(base) if type(None) in kinds else base
        p.add_argument("--" + dest.replace("_", "-"), **kw)


def _check_type(name: str, value, hint) -> None:
    kinds = _members(hint)
    if value is None and type(None) in kinds:
        return
    ok = any(isinstance(value, k) and not (isinstance(value, bool) and k in (int, float))
             for k in kinds if k is not type(None))
    ok = ok or (float in kinds and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        want = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"'{name}' = {value!r} is invalid: expected {want}")


def from_namespace(cls, ns: argparse.Namespace):
    """An instance of ``cls`` from the parsed flags (nested dataclasses as their dicts). ValueError, one
    paragraph, for a value of the wrong type (a --config yaml can hold anything) or out of range."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if "fields" in f.metadata:
            kwargs[f.name] = dataclasses.asdict(from_namespace(f.metadata["fields"], ns))
        elif hasattr(ns, f.name):
            _check_type(f.name, getattr(ns, f.name), hints[f.name])
            kwargs[f.name] = getattr(ns, f.name)
    return cls(**kwargs)


def config_from(cls, ns: argparse.Namespace, what: str):
    """``from_namespace`` for a script: a bad value is an InputError naming the settings it belongs to."""
    try:
        return from_namespace(cls, ns)
    except ValueError as e:
        raise InputError(f"invalid {what} setting: {e}") from None


def parse_with_config(p: argparse.ArgumentParser, argv, defaults: dict | None = None) -> argparse.Namespace:
    """Parse ``argv``: the parser's defaults < ``defaults`` < a ``--config`` yaml (keys are the flags' dests,
    i.e. the flag names with '_') < the command line. InputError for a missing file or an unknown key."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # only --config, no type runs twice
    pre.add_argument("--config")
    first, _ = pre.parse_known_args(argv)
    if defaults:
        p.set_defaults(**defaults)
    if first.config:
        p.set_defaults(**read_config(first.config, p))
    return p.parse_args(argv)


def read_config(path, p: argparse.ArgumentParser) -> dict:
    """The settings of a recipe yaml, or of a preset named instead of a file (configs/presets.py)."""
    if str(path) in PRESET_NAMES and not Path(path).is_file():
        return _known_keys(path, preset(str(path)), p)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe file '{path}' does not exist: pass the path of a yaml such as configs/ema_w4a4.yaml, "
                         f"or a preset name ({', '.join(PRESET_NAMES)})")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"recipe file '{path}' is not valid yaml ({' '.join(str(e).split())})") from None
    return _known_keys(path, values, p)


def _known_keys(path, values, p: argparse.ArgumentParser) -> dict:
    dests = {a.dest for a in p._actions} - {"help", "config"}
    if not isinstance(values, dict) or set(values) - dests:
        bad = sorted(set(values) - dests) if isinstance(values, dict) else values
        raise InputError(f"recipe file '{path}' has unknown key(s) {bad}: allowed keys are {sorted(dests)}")
    return values
