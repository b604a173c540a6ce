"""Short model names -> the yaml files in this folder; Ultralytics' own yaml names pass through.

Two yaml formats live here: Ultralytics' (anchor-free, built by ultralytics.nn.tasks) and the original
anchor-based one of yolov5 / yolov7 (built by models.yolo); ``is_original_yaml`` tells them apart.
"""
from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).resolve().parent

MODEL_CFGS = {
    name: str(_DIR / f"{name}.yaml")
    for name in ("yolov7-tinyu", "yolov5nu-seg", "yolov5su-seg", "yolov7-tinyu-seg")
}
# The original anchor-based models, in the yaml format of their own repositories (models.yolo builds them;
# Ultralytics' loader must never see these files: it would rename or rescale them).
ORIGINAL_CFGS = {
    name: str(_DIR / f"{name}.yaml")
    for name in ("yolov5n", "yolov5s", "yolov5n-seg", "yolov5s-seg", "yolov7-tiny")
}
MODEL_CFGS.update(ORIGINAL_CFGS)
# Ultralytics ships the anchor-free YOLOv5 detectors itself; a file of ours named 'yolov5nu.yaml' would be
# renamed to 'yolov5n.yaml' by its loader (check_yolov5u_filename), so these names go to its own copies.
MODEL_CFGS.update({"yolov5nu": "yolov5nu.yaml", "yolov5su": "yolov5su.yaml"})


def is_original_yaml(cfg: str | Path | dict) -> bool:
    """True for a model yaml (path, registry name or dict) in the format of ultralytics/yolov5 or
    WongKinYiu/yolov7: it lists ``anchors`` (Ultralytics' yamls have none; theirs carry ``scales``)."""
    if isinstance(cfg, dict):
        d = cfg
    else:
        s = str(cfg)
        key = s[:-5] if s.endswith(".yaml") else s
        if key in ORIGINAL_CFGS:
            return True
        if key in MODEL_CFGS or not Path(s).is_file():
            return False
        import yaml

        try:
            d = yaml.safe_load(Path(s).read_text(encoding="utf-8", errors="ignore"))
        except yaml.YAMLError:
            return False
    return isinstance(d, dict) and "anchors" in d and "scales" not in d


def _is_ultralytics_cfg(name: str) -> bool:
    # Ultralytics resolves 'yolov8n-seg.yaml' to cfg/models/v8/yolov8-seg.yaml with scale 'n'; the same lookup
    # (scale-stripped, then searched in its package) tells whether it would find the file.
    from ultralytics.nn.tasks import yaml_model_load

    try:
        yaml_model_load(name)
    except Exception:
        return False
    return True


def resolve_model_cfg(name_or_path: str | Path) -> str:
    """Return the yaml path for a short name ('yolov5nu', 'yolov7-tinyu-seg.yaml'), an existing file, or an
    Ultralytics model yaml name ('yolo11n.yaml'); raise ValueError otherwise."""
    s = str(name_or_path)
    key = s[:-5] if s.endswith(".yaml") else s
    if key in MODEL_CFGS:
        return MODEL_CFGS[key]
    if Path(s).is_file():
        from .yaml_rule import check_model_yaml_file

        check_model_yaml_file(s)  # a user's file: built only if it follows the rule (ValueError, one paragraph)
        return s
    if s.endswith((".yaml", ".yml")) and Path(s).name == s and _is_ultralytics_cfg(s):
        return s
    raise ValueError(f"unknown model config {s!r}; known names: {', '.join(MODEL_CFGS)}, an existing yaml path, "
                     "or an Ultralytics model yaml such as 'yolov8n.yaml' or 'yolo11n-seg.yaml'")
