"""The embedded procedural dataset: deterministic, valid labels, cached atomically, loadable by Ultralytics."""
from pathlib import Path

import numpy as np
import pytest

from yolo_qat.data.embedded import MARKER, NAMES, ensure_embedded_dataset

SMALL = dict(n_train=6, n_val=3, imgsz=96)


def _labels(yaml_path: Path) -> dict[str, bytes]:
    root = yaml_path.parent
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "labels").rglob("*.txt"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return ensure_embedded_dataset(tmp_path_factory.mktemp("emb") / "ds", seed=0, **SMALL)


def test_layout(dataset):
    root = dataset.parent
    assert dataset.is_file() and (root / MARKER).is_file()
    for split, n in (("train", SMALL["n_train"]), ("val", SMALL["n_val"])):
        assert len(list((root / "images" / split).glob("*.jpg"))) == n
        assert len(list((root / "labels" / split).glob("*.txt"))) == n
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_deterministic_by_seed(dataset, tmp_path):
    same = ensure_embedded_dataset(tmp_path / "a", seed=0, **SMALL)
    other = ensure_embedded_dataset(tmp_path / "b", seed=1, **SMALL)
    assert _labels(same) == _labels(dataset)
    assert _labels(other) != _labels(dataset)


def test_label_format(dataset):
    counts = []
    for name, text in _labels(dataset).items():
        lines = text.decode().splitlines()
        counts.append(len(lines))
        for line in lines:
            cls, *xy = line.split()
            assert int(cls) in NAMES
            xy = np.array(xy, float)
            assert len(xy) % 2 == 0 and len(xy) >= 6, name
            assert ((xy >= 0) & (xy <= 1)).all(), name
    assert min(counts) >= 1 and max(counts) <= 6


def test_cache_reused(dataset):
    files = [p for p in dataset.parent.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    assert ensure_embedded_dataset(dataset.parent, seed=0, **SMALL) == dataset
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_incomplete_dir_regenerated(tmp_path):
    yaml_path = ensure_embedded_dataset(tmp_path / "ds", seed=0, **SMALL)
    reference = _labels(yaml_path)
    (yaml_path.parent / MARKER).unlink()
    victim = next((yaml_path.parent / "labels" / "train").glob("*.txt"))
    victim.write_text("garbage\n")
    assert ensure_embedded_dataset(tmp_path / "ds", seed=0, **SMALL) == yaml_path
    assert (yaml_path.parent / MARKER).is_file()
    assert _labels(yaml_path) == reference


def test_other_parameters_regenerate(tmp_path):
    ensure_embedded_dataset(tmp_path / "ds", seed=0, **SMALL)
    y = ensure_embedded_dataset(tmp_path / "ds", seed=0, n_train=4, n_val=2, imgsz=96)
    assert len(list((y.parent / "images" / "train").glob("*.jpg"))) == 4


def test_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_QAT_DATA", str(tmp_path))
    y = ensure_embedded_dataset(n_train=2, n_val=1, imgsz=64, seed=3)
    assert y.parent.parent == tmp_path.resolve() and y.parent.name == "embedded-s3-n2-1-i64"


def test_ultralytics_loads_it(dataset):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(dataset))
    assert data["nc"] == len(NAMES) and Path(data["val"]).is_dir()
    cfg = get_cfg(overrides={"task": "segment", "imgsz": 96, "rect": False, "overlap_mask": False})
    ds = build_yolo_dataset(cfg, data["val"], batch=2, data=data, mode="val")
    assert len(ds) == SMALL["n_val"]
    item = ds[0]
    assert item["masks"].shape[0] == len(item["cls"]) > 0
    assert all(m.sum() > 0 for m in item["masks"])  # one non-empty mask per instance
