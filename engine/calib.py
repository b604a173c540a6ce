"""Calibration data for QC and BN re-estimation: a deterministic subset of the training split,
loaded by Ultralytics' own dataset / dataloader (same letterboxing, labels and collate as training);
or, for label-free QC with a teacher, any folder of images (``image_folder_loader``).
"""
from __future__ import annotations

import math
import random
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn
from ultralytics.cfg import get_cfg
from ultralytics.data import build_dataloader, build_yolo_dataset
from ultralytics.data.augment import LetterBox
from ultralytics.data.dataset import YOLODataset
from ultralytics.data.utils import IMG_FORMATS
from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace
from ultralytics.utils.patches import imread

from yolo_qat.data.embedded import ensure_embedded_dataset

from .data_download import check_dataset


def resolve_data(data: str | Path | None) -> str:
    """The dataset yaml to use: ``data`` or, by default, the embedded offline dataset. FileNotFoundError
    (one paragraph) when ``data`` is not a file."""
    if data is None:
        return str(ensure_embedded_dataset())
    if not Path(data).is_file():
        raise FileNotFoundError(f"dataset yaml '{data}' does not exist: pass the path of an Ultralytics dataset yaml "
                                f"(train/val image folders, names), or leave --data out for the embedded offline dataset")
    return str(data)


def ensure_loss_args(model: nn.Module, **overrides) -> IterableSimpleNamespace:
    """Give ``model.args`` what ``model.loss`` reads (box/cls/dfl gains, overlap_mask...).

    Checkpoints carry args as a plain dict (or not at all); the loss wants attribute access. The
    cached criterion is dropped so it is rebuilt with these args.
    """
    args = getattr(model, "args", None)
    base = dict(DEFAULT_CFG_DICT)
    if isinstance(args, dict):
        base.update({k: v for k, v in args.items() if k in DEFAULT_CFG_DICT})
    elif isinstance(args, IterableSimpleNamespace):
        base.update({k: v for k, v in vars(args).items() if k in DEFAULT_CFG_DICT})
    base.update(overrides)
    model.args = get_cfg(base)
    model.criterion = None
    return model.args


def calibration_files(train_files: list[str], n_images: int | None = None, fraction: float | None = None,
                      seed: int = 0) -> list[str]:
    """A seeded random subset of the training images (all of them when neither size is given).
    A request larger than the set is clipped, with a warning."""
    if n_images is not None and fraction is not None:
        raise ValueError("give either calib_images or calib_fraction, not both")
    n_total = len(train_files)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"calib_fraction={fraction}: allowed values are 0 < fraction <= 1")
        n = max(1, round(fraction * n_total))
    elif n_images is not None:
        if n_images < 1:
            raise ValueError(f"calib_images={n_images}: must be >= 1")
        n = n_images
        if n > n_total:
            warnings.warn(f"calib_images={n_images} is larger than the training set ({n_total} images): "
                          f"clipped to {n_total}", stacklevel=2)
            n = n_total
    else:
        n = n_total
    files = sorted(train_files)
    random.Random(seed).shuffle(files)
    return sorted(files[:n])


def _train_image_files(data: dict) -> list[str]:
    # Ultralytics' own file discovery (dirs, list files, several roots), without building labels.
    return YOLODataset.get_img_files(_Finder(), data["train"])


class _Finder:
    """The attributes ``YOLODataset.get_img_files`` reads from its instance."""

    prefix, fraction = "", 1.0


def calibration_loader(data: str | Path | None, task: str, imgsz: int = 640, batch: int = 16,
                       n_images: int | None = None, fraction: float | None = None, seed: int = 0,
                       augment: bool = False, shuffle: bool = True, workers: int = 0, save_dir: Path | None = None):
    """(dataloader, list of calibration image files) for the training split of ``data``.

    The subset is written to ``save_dir/calibration.txt`` (Ultralytics reads image lists from a
    txt file: that is how the subset reaches its dataset class). Without ``augment`` images are
    only letterboxed, as in validation, so the same batches give comparable losses.
    """
    cfg = get_cfg(overrides={"task": task, "imgsz": imgsz, "batch": batch, "rect": False, "fraction": 1.0,
                             "workers": workers})
    data_dict = check_dataset(resolve_data(data))  # a yaml's download: runs only when asked for
    files = calibration_files(_train_image_files(data_dict), n_images, fraction, seed)
    save_dir = Path(save_dir) if save_dir is not None else Path(data_dict["path"])
    save_dir.mkdir(parents=True, exist_ok=True)
    lst = save_dir / "calibration.txt"
    lst.write_text("\n".join(str(Path(f).resolve()) for f in files) + "\n")
    dataset = build_yolo_dataset(cfg, str(lst), batch, data_dict, mode="train" if augment else "val", rect=False,
                                 fraction=1.0)
    torch.manual_seed(seed)  # InfiniteDataLoader's shuffling generator is seeded, its workers are not
    loader = build_dataloader(dataset, min(batch, len(dataset)), workers, shuffle=shuffle, pin_memory=False,
                              device="cpu")
    return loader, files


def preprocess(batch: dict, device: torch.device | str = "cpu") -> dict:
    """What Ultralytics' trainer does to a batch before ``model.loss``: tensors to the device,
    uint8 images to float in [0, 1]."""
    out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out["img"] = out["img"].float() / 255
    return out


# ---------------------------------------------------------------------------------------------- label-free

def folder_images(source: str | Path) -> list[str]:
    """Every image file (Ultralytics' formats) in folder ``source`` and its subfolders, sorted. No label files
    are looked for: a ``labels`` folder next to the images, if any, is ignored."""
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{source}' does not exist or is not a folder: pass a folder of images "
                                f"from the deployment domain (no labels needed) as the label-free source")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS and p.is_file())
    if not files:
        raise FileNotFoundError(f"image folder '{source}' holds no images ({', '.join(sorted(IMG_FORMATS))}): pass "
                                f"a folder of images as the label-free source")
    return files


def _readable(files: list[str]) -> list[str]:
    # Header check of each file (as Ultralytics' dataset does before training): skip what would fail mid-run.
    good = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
            good.append(f)
        except Exception as e:
            warnings.warn(f"label-free source: skipping corrupt image {f} ({type(e).__name__}: {e})", stacklevel=3)
    if not good:
        raise ValueError("label-free source: none of the images can be read; pass a folder of JPEG/PNG images")
    return good


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images without labels, letterboxed as Ultralytics' validation letterboxes them (long side resized to
    ``imgsz``, padded to imgsz x imgsz with 114). Items: 'img' (3, imgsz, imgsz) uint8 RGB, 'im_file',
    'ori_shape', 'resized_shape', 'ratio_pad'. No 'cls' / 'bboxes' / 'batch_idx': a loss that needs labels
    fails on these batches instead of reading them as images without objects."""

    def __init__(self, files: list[str], imgsz: int = 640):
        self.files, self.imgsz = list(files), int(imgsz)
        self.letterbox = LetterBox(new_shape=(self.imgsz, self.imgsz), auto=False, scaleup=False, center=True)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        f = self.files[i]
        im = imread(f)  # BGR
        if im is None:
            raise ValueError(f"label-free source: image {f} cannot be read")
        h0, w0 = im.shape[:2]
        r = self.imgsz / max(h0, w0)
        if r != 1:
            im = cv2.resize(im, (min(math.ceil(w0 * r), self.imgsz), min(math.ceil(h0 * r), self.imgsz)),
                            interpolation=cv2.INTER_LINEAR)
        h, w = im.shape[:2]
        im = self.letterbox(image=im)
        pad = ((self.imgsz - w) / 2, (self.imgsz - h) / 2)
        img = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)[::-1]))  # HWC BGR -> CHW RGB
        return {"img": img, "im_file": f, "ori_shape": (h0, w0), "resized_shape": (h, w),
                "ratio_pad": ((h / h0, w / w0), pad)}


def collate_images(items: list[dict]) -> dict:
    out = {k: [it[k] for it in items] for k in items[0]}
    out["img"] = torch.stack(out["img"])
    return out


def image_folder_loader(source: str | Path, imgsz: int = 640, batch: int = 16, n_images: int | None = None,
                        fraction: float | None = None, seed: int = 0, shuffle: bool = True, workers: int = 0):
    """(dataloader, list of image files) over a folder of images without labels (label-free QC with a
    teacher): a seeded subset as ``calibration_loader`` draws it, batches whose 'img' has the shape and
    letterboxing of the labelled ones."""
    files = _readable(calibration_files(folder_images(source), n_images, fraction, seed))
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(ImageFolderDataset(files, imgsz), batch_size=min(batch, len(files)),
                                         shuffle=shuffle, num_workers=workers, collate_fn=collate_images,
                                         generator=generator)
    return loader, files
