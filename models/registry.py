"""Short model names -> the yaml files in this folder (``models.yaml_rule.resolve_model_cfg`` resolves a name, a user's
file or one of Ultralytics' own yaml names).

Two yaml formats live here: Ultralytics' (anchor-free, built by ultralytics.nn.tasks) and the original
anchor-based one of yolov5 / yolov7 (built by models.yolo); ``is_original_yaml`` tells them apart.
"""
from __future__ import annotations

from pathlib import Path

import yaml

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
        try:
            d = yaml.safe_load(Path(s).read_text(encoding="utf-8", errors="ignore"))
        except yaml.YAMLError:
            return False
    return isinstance(d, dict) and "anchors" in d and "scales" not in d
