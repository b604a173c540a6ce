"""Short model names -> the yaml files in this folder; Ultralytics' own yaml names pass through."""
from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).resolve().parent

MODEL_CFGS = {
    name: str(_DIR / f"{name}.yaml")
    for name in ("yolov7-tinyu", "yolov5nu-seg", "yolov5su-seg", "yolov7-tinyu-seg")
}
# Ultralytics ships the anchor-free YOLOv5 detectors itself; a file of ours named 'yolov5nu.yaml' would be
# renamed to 'yolov5n.yaml' by its loader (check_yolov5u_filename), so these names go to its own copies.
MODEL_CFGS.update({"yolov5nu": "yolov5nu.yaml", "yolov5su": "yolov5su.yaml"})


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
        return s
    if s.endswith((".yaml", ".yml")) and Path(s).name == s and _is_ultralytics_cfg(s):
        return s
    raise ValueError(f"unknown model config {s!r}; known names: {', '.join(MODEL_CFGS)}, an existing yaml path, "
                     "or an Ultralytics model yaml such as 'yolov8n.yaml' or 'yolo11n-seg.yaml'")
