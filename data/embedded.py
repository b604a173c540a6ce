"""An offline detection / segmentation dataset of procedural scenes, generated on first use.

Each image is a textured gradient background with 1..6 filled shapes of four classes. Labels are
Ultralytics segmentation lines (``cls x1 y1 x2 y2 ...``, normalised), which its detection loader also
reads (boxes are derived from the polygons). Objects drawn later may hide part of earlier ones; a
placement that would hide too much of an object, or cut it in two, is redrawn, so every label is
one polygon of the visible outline.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np

NAMES = {0: "ellipse", 1: "rectangle", 2: "triangle", 3: "star"}
GENERATOR_VERSION = 2  # bump when the scenes change, so cached copies are regenerated
MARKER = ".complete"
YAML_NAME = "embedded.yaml"

_SHIFT = 4  # cv2 fixed-point bits: polygons are drawn with sub-pixel vertices
_MIN_VISIBLE = 0.6  # share of an object that must stay visible after later objects are drawn
_MAX_OBJECTS = 6
_SIZE_RANGE = (0.10, 0.5)  # object extent as a share of the image side


def _shape_polygon(rng: np.random.Generator, cls: int, size: float) -> np.ndarray:
    """Vertices (N, 2) centred on the origin, extent about `size` pixels."""
    r = size / 2
    rot = rng.uniform(0, 2 * np.pi)
    if cls == 0:  # ellipse, 32 points
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([r * np.cos(t), r * rng.uniform(0.55, 1.0) * np.sin(t)], 1)
    elif cls == 1:  # rectangle
        w, h = r, r * rng.uniform(0.4, 0.9)
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
    elif cls == 2:  # roughly equilateral triangle
        t = np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.2, 0.2, 3)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    else:  # five-pointed star
        t = np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        pts = np.stack([radius * np.cos(t), radius * np.sin(t)], 1)
    c, s = np.cos(rot), np.sin(rot)
    return pts @ np.array([[c, s], [-s, c]])


def _background(rng: np.random.Generator, imgsz: int) -> np.ndarray:
    """Linear gradient between two colours, low-frequency blotches and fine noise (float32 HxWx3, 0..255)."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:imgsz, 0:imgsz] / max(imgsz - 1, 1)
    g = (np.cos(ang) * xx + np.sin(ang) * yy)
    g = (g - g.min()) / max(np.ptp(g), 1e-6)
    img = c0 + (c1 - c0) * g[..., None]
    blotches = rng.normal(0, 25, (4, 4, 3)).astype(np.float32)
    img += cv2.resize(blotches, (imgsz, imgsz), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 6, (imgsz, imgsz, 3))
    return img.astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        d = np.abs(c - bg_mean).sum()
        if d > 240:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _fill(poly: np.ndarray, imgsz: int) -> np.ndarray:
    mask = np.zeros((imgsz, imgsz), np.uint8)
    cv2.fillPoly(mask, [np.round(poly * (1 << _SHIFT)).astype(np.int32)], 1, cv2.LINE_8, _SHIFT)
    return mask


def _single_component(mask: np.ndarray) -> bool:
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 2:
        return n == 2
    areas = np.sort(stats[1:, cv2.CC_STAT_AREA])
    return areas[-2] <= 2  # allow stray pixels at the cut, not a second piece


def _scene(rng: np.random.Generator, imgsz: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image (uint8 BGR) and its labels [(cls, polygon in pixels)]."""
    img = _background(rng, imgsz)
    objects = []  # dicts: cls, poly, full mask, visible mask, colour
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        for _attempt in range(20):
            cls = int(rng.integers(len(NAMES)))
            size = imgsz * np.exp(rng.uniform(*np.log(_SIZE_RANGE)))
            poly = _shape_polygon(rng, cls, size)
            lo, hi = poly.min(0), poly.max(0)
            centre = rng.uniform(-lo, np.maximum(imgsz - 1 - hi, -lo + 1e-3))
            poly = poly + centre
            full = _fill(poly, imgsz)
            if full.sum() < 12:
                continue
            new_vis = [o["visible"] & (1 - full) for o in objects]
            if all(v.sum() >= _MIN_VISIBLE * o["full"].sum() and _single_component(v)
                   for o, v in zip(objects, new_vis)):
                for o, v in zip(objects, new_vis):
                    o["visible"] = v
                objects.append({"cls": cls, "poly": poly, "full": full, "visible": full.copy()})
                break
    for o in objects:
        bg_mean = img[o["full"].astype(bool)].mean(0)
        colour = _contrasting_colour(rng, bg_mean)
        shade = rng.uniform(0.8, 1.2)  # a mild one-sided shading gives the shapes some texture
        layer = np.empty_like(img)
        layer[:] = colour
        k = rng.uniform(-1, 1, 2)
        yy, xx = np.mgrid[0:imgsz, 0:imgsz] / imgsz
        layer *= (1 + (shade - 1) * (k[0] * xx + k[1] * yy))[..., None]
        alpha = np.zeros((imgsz, imgsz), np.float32)
        cv2.fillPoly(alpha, [np.round(o["poly"] * (1 << _SHIFT)).astype(np.int32)], 1.0, cv2.LINE_AA, _SHIFT)
        img = img * (1 - alpha[..., None]) + layer * alpha[..., None]
    labels = []
    for o in objects:
        if o["visible"].sum() == o["full"].sum():
            poly = o["poly"]
        else:  # partly hidden: trace the outline of what is still visible
            contours, _ = cv2.findContours(o["visible"], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            c = max(contours, key=cv2.contourArea)
            poly = cv2.approxPolyDP(c, 0.7, True).reshape(-1, 2).astype(np.float64)
            if len(poly) < 3:
                continue
        labels.append((o["cls"], poly))
    return np.clip(img, 0, 255).astype(np.uint8), labels


def _label_line(cls: int, poly: np.ndarray, imgsz: int) -> str:
    xy = np.clip(poly / imgsz, 0.0, 1.0).reshape(-1)
    return f"{cls} " + " ".join(f"{v:.6f}" for v in xy)


def write_split(root: Path, split: str, split_id: int, n: int, imgsz: int, seed: int, scene=None) -> None:
    """Write ``n`` images and their segmentation labels of ``scene(rng, imgsz) -> (img, [(cls, polygon)])``
    (default: the procedural scenes) under ``root/images/<split>`` and ``root/labels/<split>``."""
    scene = scene or _scene
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for i in range(n):
        # one generator per image: image i is the same whatever n is
        rng = np.random.default_rng([seed, split_id, i])
        img, labels = scene(rng, imgsz)
        stem = f"{split}_{i:06d}"
        cv2.imwrite(str(root / "images" / split / f"{stem}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        lines = [_label_line(c, p, imgsz) for c, p in labels]
        (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n" if lines else "")


def _yaml_text(root: Path, params: dict) -> str:
    names = "\n".join(f"  {k}: {v}" for k, v in NAMES.items())
    return (f"# Embedded procedural dataset, generated by data/embedded.py with {json.dumps(params)}\n"
            f"path: {root}\ntrain: images/train\nval: images/val\n\nnames:\n{names}\n")


def _is_complete(root: Path, params: dict) -> bool:
    marker = root / MARKER
    if not (marker.is_file() and (root / YAML_NAME).is_file()):
        return False
    try:
        return json.loads(marker.read_text()) == params
    except ValueError:
        return False


def default_root(n_train: int = 256, n_val: int = 64, imgsz: int = 160, seed: int = 0) -> Path:
    """`$YOLO_QAT_DATA/<name>` if that variable is set, else `<clone>/datasets/<name>` when run from a clone, else
    `./datasets/<name>` (an installed package never writes into site-packages)."""
    name = f"embedded-s{seed}-n{n_train}-{n_val}-i{imgsz}"
    parent = os.environ.get("YOLO_QAT_DATA")
    clone = Path(__file__).resolve().parent.parent
    if not parent:
        parent = clone / "datasets" if (clone / "train_qat.py").is_file() else Path.cwd() / "datasets"
    return Path(parent) / name


def ensure_embedded_dataset(root: str | Path | None = None, n_train: int = 256, n_val: int = 64, imgsz: int = 160,
                            seed: int = 0) -> Path:
    """Return the dataset yaml under `root`, generating the dataset there first unless a complete copy made with
    the same parameters is already present."""
    root = Path(root).resolve() if root is not None else default_root(n_train, n_val, imgsz, seed).resolve()
    params = {"version": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val, "imgsz": imgsz, "seed": seed}
    if _is_complete(root, params):
        return root / YAML_NAME

    # Build beside the target and rename into place, so an interrupted run never leaves a dataset that looks done.
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_split(tmp, "train", 0, n_train, imgsz, seed)
        write_split(tmp, "val", 1, n_val, imgsz, seed)
        (tmp / YAML_NAME).write_text(_yaml_text(root, params))
        (tmp / MARKER).write_text(json.dumps(params))
        if root.exists() and not _is_complete(root, params):
            shutil.rmtree(root)  # a partial or stale copy
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root, params):  # not another process finishing first: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / YAML_NAME


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate the embedded offline dataset and print its yaml path.")
    p.add_argument("--out", default=None, help="dataset directory (default: $YOLO_QAT_DATA/<name> or datasets/<name>)")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(ensure_embedded_dataset(a.out, a.n_train, a.n_val, a.imgsz, a.seed))


if __name__ == "__main__":
    main()
