"""QC on YOLO models QAT-trained for two epochs on real photographs (tests/real_photos.py), det and seg,
W4A4 and W3A3, through correct_qc.py: the folds pass their per-layer check, both checkpoints are
written and the unfolded one folds later to the same model, and a wrong fold still fails the check.

A QAT from a model yaml calibrated on BN's initial statistics would leave final head convs that output their
bias almost unchanged everywhere, where a check relative to the output's range fails on float32 rounding alone;
calibration estimates BN statistics for a never-trained model first, and tests/engine/test_qc.py
(test_fold_check_passes_a_near_constant_head_output) keeps that case.
"""
import json

import cv2
import numpy as np
import pytest
import torch

from yolo_qat import models  # noqa: F401  (registers the YOLO policy)
from yolo_qat.models.checkpoint import load_checkpoint
from yolo_qat.quant import QuantConv2d
from yolo_qat.quant.qc import FoldCheckError, fold_qc, fold_qc_checked, qc_modules
from real_photos import real_photo_dataset

CASES = [("yolov5nu", 4), ("yolov5nu", 3), ("yolov5nu-seg", 4), ("yolov5nu-seg", 3)]
IDS = [f"{cfg}-w{b}a{b}" for cfg, b in CASES]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return real_photo_dataset(tmp_path_factory.mktemp("photos") / "ds", n_train=16, n_val=8, imgsz=96)


def test_real_photo_dataset_is_deterministic_and_well_formed(photos, tmp_path):
    from real_photos import class_names

    again = real_photo_dataset(tmp_path / "again", n_train=16, n_val=8, imgsz=96)
    names = class_names()
    assert len(names) == 11 and {"bus", "zidane", "astronaut"} <= set(names.values())
    for split in ("train", "val"):
        for img in sorted((photos.parent / "images" / split).glob("*.jpg")):
            twin = again.parent / "images" / split / img.name
            assert img.read_bytes() == twin.read_bytes(), img.name
            lines = (photos.parent / "labels" / split / f"{img.stem}.txt").read_text().splitlines()
            assert 1 <= len(lines) <= 4, img.name
            for line in lines:
                cls, *xy = line.split()
                assert 0 <= int(cls) < len(names) and len(xy) >= 8 and all(0 <= float(v) <= 1 for v in xy)


def train_qat(cfg: str, bits: int, data, project) -> str:
    """Two QAT epochs from the model yaml with the repo's trainer (the path train_qat.py takes)."""
    from yolo_qat.engine.config import QATConfig
    from yolo_qat.engine.trainer import qat_trainer_class
    from yolo_qat.models.yaml_rule import resolve_model_cfg

    task = "segment" if cfg.endswith("-seg") else "detect"
    qat = QATConfig(recipe={"w_bits": bits, "a_bits": bits}).to_dict()
    trainer = qat_trainer_class(task)(overrides={
        "model": resolve_model_cfg(cfg), "data": str(data), "imgsz": 64, "batch": 8, "nbs": 8, "epochs": 2,
        "workers": 0, "optimizer": "SGD", "lr0": 0.01, "warmup_epochs": 0, "close_mosaic": 0, "val": False,
        "plots": False, "deterministic": False, "seed": 0, "device": "cpu", "project": str(project),
        "name": f"{cfg}-w{bits}", "exist_ok": True, "qat": qat})
    trainer.train()
    return str(trainer.last)


@pytest.fixture(scope="module")
def qc_runs(photos, tmp_path_factory):
    """{case: QC output dir}, built on first use: two QAT epochs, then correct_qc.py (2 QC steps)."""
    import correct_qc

    root = tmp_path_factory.mktemp("qc_real")
    done = {}

    def get(case):
        if case not in done:
            cfg, bits = case
            last = train_qat(cfg, bits, photos, root / "qat")
            name = f"{cfg}-w{bits}"
            rc = correct_qc.main(["--weights", last, "--data", str(photos), "--imgsz", "64", "--batch", "8",
                                  "--calib-images", "100000", "--steps", "2", "--no-val",
                                  "--project", str(root / "qc"), "--name", name])
            done[case] = (rc, root / "qc" / name)
        return done[case]

    return get


def probe_images(data_yaml, n=4, size=64) -> torch.Tensor:
    files = sorted((data_yaml.parent / "images" / "val").glob("*.jpg"))[:n]
    imgs = [cv2.resize(cv2.imread(str(f)), (size, size), interpolation=cv2.INTER_AREA)[..., ::-1] for f in files]
    return torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy()).float() / 255


@pytest.mark.filterwarnings("ignore:calib_images")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_qc_folds_real_photo_model_and_keeps_both_checkpoints(case, qc_runs):
    rc, out = qc_runs(case)
    assert rc == 0, f"correct_qc.py failed on {case}"
    report = json.loads((out / "qc_report.json").read_text())
    fold = report["fold"]
    assert fold["passed"] and not fold["unchecked"] and len(fold["layers"]) == report["corrected_convs"]
    # each folded parameter within half an ulp of its exact value: at most half the bound
    assert 0 < fold["worst_ratio"] <= 0.5 + 1e-6, (fold["worst_layer"], fold["worst_ratio"])

    folded, _ = load_checkpoint(out / "weights" / "qc.pt")
    unfolded, ckpt = load_checkpoint(out / "weights" / "qc_unfolded.pt")
    assert not qc_modules(folded) and len(qc_modules(unfolded)) == report["corrected_convs"]
    assert ckpt["quant_recipe"]["w_bits"] == case[1] and len(ckpt["qc"]["history"]) == 2

    fold_qc(unfolded)  # folding the saved corrections later gives qc.pt exactly
    state = folded.state_dict()
    assert unfolded.state_dict().keys() == state.keys()
    for k, v in unfolded.state_dict().items():
        assert torch.equal(v, state[k]), k


def _forget_shift(conv, scale, shift):  # a folding bug: the QC shift never reaches the bias
    right_fold_affine(conv, scale, torch.zeros_like(shift))


right_fold_affine = QuantConv2d.fold_affine


@pytest.mark.filterwarnings("ignore:calib_images")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_wrong_fold_fails_on_real_photo_model(case, qc_runs, photos, monkeypatch):
    rc, out = qc_runs(case)
    model, _ = load_checkpoint(out / "weights" / "qc_unfolded.pt")
    monkeypatch.setattr(QuantConv2d, "fold_affine", _forget_shift)
    x = probe_images(photos)
    with pytest.raises(FoldCheckError) as e:
        fold_qc_checked(model, lambda: model(x))
    # the head convs fold into their own output scale and bias: that is where the bug shows
    assert e.value.layer.startswith("model.24.") and e.value.ratio > 10, (e.value.layer, e.value.ratio)
