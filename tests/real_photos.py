"""A tiny detection / segmentation dataset cut from real photographs that ship with installed packages.

The project's own dataset (data/embedded.py) is drawn by the same code that the pipeline was tuned
on: flat shapes on smooth gradients. Real photographs have other statistics (texture, saturated and
dark regions, a long-tailed activation range), and a network trained a few epochs on them ends with
BN statistics and quantizer ranges the generated data never produce. Tests that must hold "on data
the project has never seen" build their data here.

Sources: Ultralytics' two assets (``bus.jpg``, ``zidane.jpg``) and the photographs scikit-image ships
in its wheel (``skimage.data``; requirements-dev.txt). Each class is one source photograph: an
object is a patch cut at a random place of its photograph, scaled, and pasted through a random
elliptical or polygonal mask onto a tile of another photograph. The label is that mask's outline
(Ultralytics' segmentation format, which its detection loader also reads), so boxes and masks
follow the pasted real pixels exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from yolo_qat.data.embedded import write_split  # the file layout only: the scenes are this module's own

VERSION = 2  # bump when the scenes change, so cached copies are rebuilt
MARKER = ".complete"
YAML_NAME = "real_photos.yaml"
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera", "hubble_deep_field",
                  "immunohistochemistry", "moon")
_MAX_OBJECTS = 4
_SIZE_RANGE = (0.18, 0.5)  # object extent as a share of the image side
_MIN_VISIBLE = 0.6  # share of an object that must stay visible after later objects are pasted


@lru_cache(maxsize=1)
def photos() -> dict[str, np.ndarray]:
    """{name: HxWx3 uint8 BGR} of every source photograph, in a fixed order."""
    from ultralytics.utils import ASSETS

    out = {}
    for name in ("bus", "zidane"):
        img = cv2.imread(str(ASSETS / f"{name}.jpg"))
        if img is None:
            raise FileNotFoundError(f"Ultralytics asset {ASSETS / name}.jpg is missing: reinstall ultralytics")
        out[name] = img
    try:
        import skimage.data
    except ImportError:
        raise ImportError("tests/real_photos.py needs scikit-image for its photographs: "
                          "pip install -r requirements-dev.txt") from None
    for name in SKIMAGE_PHOTOS:
        img = getattr(skimage.data, name)()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        out[name] = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR)
    return out


def class_names() -> dict[int, str]:
    return dict(enumerate(photos()))


def _tile(rng: np.random.Generator, img: np.ndarray, side: int) -> np.ndarray:
    """A random square crop of ``img`` (at least a third of its short side) resized to ``side``."""
    h, w = img.shape[:2]
    s = int(rng.uniform(min(h, w) / 3, min(h, w)))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    return cv2.resize(img[y:y + s, x:x + s], (side, side), interpolation=cv2.INTER_AREA)


def _outline(rng: np.random.Generator, size: int) -> np.ndarray:
    """Vertices (N, 2) of an ellipse or a convex polygon inside a ``size`` x ``size`` box."""
    r, c = size / 2, (size - 1) / 2
    if rng.random() < 0.5:
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        ry = r * rng.uniform(0.55, 1.0)
    else:
        t = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(4, 8))))
        ry = r * rng.uniform(0.7, 1.0)
    rot = rng.uniform(0, 2 * np.pi)
    pts = np.stack([r * np.cos(t), ry * np.sin(t)], 1)
    pts = pts @ np.array([[np.cos(rot), np.sin(rot)], [-np.sin(rot), np.cos(rot)]])
    return np.clip(pts + c, 0, size - 1)


def _mask(poly: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.fillPoly(m, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


def _scene(rng: np.random.Generator, imgsz: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    srcs = list(photos().values())
    bg_id = int(rng.integers(len(srcs)))
    img = _tile(rng, srcs[bg_id], imgsz)
    placed: list[tuple[int, np.ndarray, np.ndarray, int]] = []  # (class, polygon, visible mask, full area)
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        for _attempt in range(20):
            cls = int(rng.integers(len(srcs)))
            if cls == bg_id:
                continue
            size = int(rng.uniform(*_SIZE_RANGE) * imgsz)
            x0, y0 = (int(v) for v in rng.integers(0, imgsz - size + 1, 2))
            poly = _outline(rng, size) + (x0, y0)
            mask = _mask(poly, (imgsz, imgsz))
            if mask.sum() < 16 or any((vis & ~mask).sum() < _MIN_VISIBLE * area for _, _, vis, area in placed):
                continue  # too small, or it would hide too much of an earlier object: draw again
            patch = _tile(rng, srcs[cls], imgsz)
            img[mask] = patch[mask]
            placed = [(c, p, vis & ~mask, area) for c, p, vis, area in placed] + [(cls, poly, mask, int(mask.sum()))]
            break
    # An object partly hidden by a later one (at most 40% of it) keeps its whole outline as label.
    return img, [(c, p) for c, p, _, _ in placed]


def real_photo_dataset(root: str | Path, n_train: int = 48, n_val: int = 16, imgsz: int = 128,
                       seed: int = 0) -> Path:
    """Build (once) the dataset under ``root`` and return its yaml; a complete copy made with the same
    parameters is reused. Built beside ``root`` and renamed into place, so a half-built copy never
    looks complete."""
    root = Path(root).resolve()
    params = {"version": VERSION, "n_train": n_train, "n_val": n_val, "imgsz": imgsz, "seed": seed}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root / YAML_NAME
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_split(tmp, "train", 0, n_train, imgsz, seed, scene=_scene)
        write_split(tmp, "val", 1, n_val, imgsz, seed, scene=_scene)
        names = "\n".join(f"  {k}: {v}" for k, v in class_names().items())
        (tmp / YAML_NAME).write_text(f"# real-photo test dataset (tests/real_photos.py) {json.dumps(params)}\n"
                                     f"path: {root}\ntrain: images/train\nval: images/val\n\nnames:\n{names}\n")
        (tmp / MARKER).write_text(json.dumps(params))
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / YAML_NAME
