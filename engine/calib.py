"""Calibration data for QC and BN re-estimation: a deterministic subset of the training split,
loaded by Ultralytics' own dataset / dataloader (same letterboxing, labels and collate as training).
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch
from torch import nn
from ultralytics.cfg import get_cfg
from ultralytics.data import build_dataloader, build_yolo_dataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

def task_of(model: nn.Module) -> str:
    from ultralytics.nn.tasks import SegmentationModel

    return "segment" if isinstance(model, SegmentationModel) else "detect"


def resolve_data(data: str | Path | None) -> str:
    """The dataset yaml to use: ``data`` or, by default, the embedded offline dataset."""
    if data is None:
        from data.embedded import ensure_embedded_dataset

        return str(ensure_embedded_dataset())
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
    from ultralytics.data.dataset import YOLODataset

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
    data_dict = check_det_dataset(resolve_data(data))
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
