"""Distillation from the FP teacher (engine/distill.py): zero for a student equal to the teacher and positive
once quantized, for both head families and both tasks; gradients reach the student only; the teacher stays out
of the student's state, copies, checkpoints and optimizers and never changes; a resumed QAT run gets its
distillation settings and teacher back; label-free QC on a folder of images; clear errors for a wrong teacher."""
import copy
import io
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel as UDetectionModel
from ultralytics.nn.tasks import SegmentationModel as USegmentationModel

from yolo_qat import models  # noqa: F401  (registers the YOLO policy)
from yolo_qat.engine.calib import calibration_loader, ensure_loss_args, image_folder_loader, preprocess
from yolo_qat.engine.distill import (DistillationCriterion, TeacherMismatchError, attach_distillation, check_teacher,
                            checkpoint_teacher, distillation_of)
from yolo_qat.engine.ema import QATModelEMA
from yolo_qat.models import yolo as original
from yolo_qat.models.checkpoint import load_checkpoint, save_checkpoint
from yolo_qat.models.yaml_rule import resolve_model_cfg
from yolo_qat.quant import QuantConv2d, calibrate, quantize_model, set_quantizers_enabled
from yolo_qat.quant.qc import qc_modules, set_batchnorm_eval

NAMES = {0: "ellipse", 1: "rectangle", 2: "triangle", 3: "star"}
MODELS = ["yolov5nu", "yolov5nu-seg", "yolov5n", "yolov5n-seg"]
TERMS = {"yolov5nu": {"cls", "box"}, "yolov5nu-seg": {"cls", "box", "mask"}, "yolov5n": {"box", "obj", "cls"},
         "yolov5n-seg": {"box", "obj", "cls", "mask"}}


@pytest.fixture(scope="module")
def images(data):
    files = sorted((data.parent / "images" / "train").glob("*.jpg"))
    ims = np.stack([cv2.imread(str(f))[..., ::-1] for f in files])
    return torch.from_numpy(ims.transpose(0, 3, 1, 2).copy()).float() / 255


def build(name, nc=4):
    cfg = resolve_model_cfg(name)
    seg = name.endswith("-seg")
    if name in ("yolov5n", "yolov5n-seg"):
        return (original.SegmentationModel if seg else original.DetectionModel)(cfg, nc=nc, verbose=False)
    return (USegmentationModel if seg else UDetectionModel)(cfg, nc=nc, verbose=False)


def fp_like(name, images, nc=4, seed=0):
    """An FP model whose outputs depend on the image: BN statistics from the images, output biases at 0 (a fresh
    head's priors put every probability near 0, where every distillation term vanishes)."""
    torch.manual_seed(seed)
    m = build(name, nc)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None
    m.train()
    with torch.no_grad():
        m(images)
        head = m.model[-1]
        for conv in head.m if isinstance(head, original.Detect) else [seq[-1] for seq in head.cv3]:
            conv.bias.zero_()
    m.names = dict(NAMES)
    return m.eval()


def quantized_copy(teacher, images, bits=4):
    student = copy.deepcopy(teacher)
    quantize_model(student, {"w_bits": bits, "a_bits": bits})
    calibrate(student, [images[:4]], num_batches=1)
    ensure_loss_args(student)
    return student


@pytest.mark.parametrize("name", MODELS)
def test_zero_for_the_teacher_itself_positive_once_quantized(name, images):
    teacher = fp_like(name, images)
    student = quantized_copy(teacher, images)
    crit = attach_distillation(student, teacher, label_free=True)
    batch = {"img": images[:4]}
    set_quantizers_enabled(student, False)  # the student computes exactly what the teacher computes
    student.eval()  # the validator's path: eval-mode predictions passed in
    with torch.no_grad():
        loss, items = student.loss(batch, student(batch["img"]))
    assert set(crit.last_terms) == TERMS[name] and set(items) == {"kd"}
    assert abs(float(loss.sum())) < 1e-6, crit.last_terms
    student.train()
    set_batchnorm_eval(student)  # the training path (BN frozen, or batch statistics would differ by themselves)
    loss, _ = student.loss(batch)
    assert abs(float(loss.detach().sum())) < 1e-6, crit.last_terms

    set_quantizers_enabled(student, True)
    loss, items = student.loss(batch)
    assert all(float(v) > 1e-5 for v in crit.last_terms.values()), crit.last_terms
    assert float(loss.detach().sum()) == pytest.approx(float(items["kd"]) * 4, rel=1e-5)  # x batch size, as the det. loss


def test_gradients_reach_the_student_only_and_the_teacher_stays_out(data, images):
    teacher = fp_like("yolov5nu-seg", images)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = quantized_copy(teacher, images)
    keys = set(student.state_dict())
    crit = attach_distillation(student, teacher, weight=2.0)
    assert set(student.state_dict()) == keys  # not a submodule: nothing of it in state_dict / parameters
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
    assert not any(isinstance(m, QuantConv2d) for m in teacher.modules())

    loader, _ = calibration_loader(data, "segment", 64, 4, shuffle=False, save_dir=data.parent / "calib")
    batch = preprocess(next(iter(loader)))
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    teacher.train()  # a stray .train() must not let BN statistics move: the criterion puts it back in eval
    head = student.model[-1]
    for step in range(2):
        student.train()
        loss, items = student.loss(batch)
        assert {"box_loss", "seg_loss", "cls_loss", "dfl_loss", "kd"} <= set(items) and float(items["kd"]) > 0
        assert float(loss[-1].detach()) == pytest.approx(float(items["kd"]) * 4, rel=1e-5)
        opt.zero_grad()
        loss.sum().backward()
        if step == 0:
            for seq in (head.cv2[0], head.cv3[0], head.cv4[0]):  # boxes, classes, mask coefficients
                assert seq[-1].weight.grad.abs().sum() > 0
        opt.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # the distillation term alone reaches the student as well
    student.zero_grad()
    student.train()
    student.loss(batch)[0][-1].backward()
    assert head.cv3[0][-1].weight.grad.abs().sum() > 0 and head.proto.cv3.conv.weight.grad.abs().sum() > 0
    assert not teacher.training
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics (and counters)

    # copies share the teacher (the EMA copy), pickles drop it
    ema = QATModelEMA(student, 0.9, 2.0)
    assert distillation_of(ema.ema).teacher is teacher and distillation_of(ema.ema).base is not crit.base
    assert distillation_of(copy.deepcopy(student)).teacher is teacher
    buf = io.BytesIO()
    torch.save(student, buf)
    reloaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert distillation_of(reloaded).teacher is None
    with pytest.raises(RuntimeError, match="attach_distillation"):
        reloaded.loss(batch)


def test_mismatched_teacher_gets_one_paragraph(images, tmp_path):
    student = build("yolov5nu")
    for teacher, words in ((build("yolov5nu", nc=3), ["nc 3 (student 4)"]),
                           (build("yolov5n"), ["anchor-free", "anchor-based"]),
                           (build("yolov5n-seg", nc=4), ["anchor-free", "anchor-based"])):
        with pytest.raises(TeacherMismatchError) as e:
            check_teacher(student, teacher)
        msg = str(e.value)
        assert all(w in msg for w in words) and "--teacher" in msg and "\n" not in msg, msg
    with pytest.raises(TeacherMismatchError, match="segments"):
        check_teacher(build("yolov5nu-seg"), student)
    with pytest.raises(TeacherMismatchError, match="anchors per cell"):
        t = build("yolov5n")
        s = original.DetectionModel(resolve_model_cfg("yolov5n"), nc=4, anchors=2, verbose=False)
        check_teacher(s, t)
    quantized = quantized_copy(fp_like("yolov5nu", images), images)
    with pytest.raises(ValueError, match="quantized"):
        attach_distillation(copy.deepcopy(quantized), quantized)


def qat_overrides(data, project, model, **qat):
    return {"model": str(model), "data": str(data), "imgsz": 64, "batch": 4, "nbs": 4, "epochs": 2, "workers": 0,
            "warmup_epochs": 0, "close_mosaic": 0, "plots": False, "device": "cpu", "project": str(project),
            "name": "run", "exist_ok": True, "seed": 0,
            "qat": {"recipe": {"w_bits": 4, "a_bits": 4}, "calib_batches": 1, "ema_decay": 0.9, "ema_tau": 2, **qat}}


class Killed(Exception):
    pass


def kill_at_second_epoch(trainer):
    if trainer.epoch == 1:
        raise Killed


def test_qat_resume_restores_distillation_and_teacher(data, images, tmp_path):
    from yolo_qat.engine.trainer import qat_trainer_class

    fp = save_checkpoint(tmp_path / "fp.pt", fp_like("yolov5nu-seg", images))
    trainer = qat_trainer_class("segment")(overrides=qat_overrides(data, tmp_path, fp, distill=True,
                                                                  distill_weight=0.5))
    trainer.add_callback("on_train_epoch_start", kill_at_second_epoch)
    with pytest.raises(Killed):
        trainer.train()
    last = tmp_path / "run" / "weights" / "last.pt"
    model, ckpt = load_checkpoint(last)
    qat = ckpt["train_args"]["qat"]
    assert (qat["distill"], qat["teacher"], qat["distill_weight"]) == (True, str(fp.resolve()), 0.5)
    assert getattr(model, "criterion", None) is None and not any("teacher" in k for k in ckpt["train_state"]["model"])

    resumed = qat_trainer_class("segment")(overrides={"model": str(last), "resume": str(last), "device": "cpu",
                                                      "workers": 0})
    resumed.train()
    assert resumed.qat.distill and resumed.qat.teacher == str(fp.resolve()) and resumed.qat.distill_weight == 0.5
    crit = distillation_of(resumed.model)
    assert crit is not None and crit.teacher is resumed.teacher and crit.weight == 0.5
    assert distillation_of(resumed.ema.ema).teacher is resumed.teacher  # validation distils as well
    resumed.load_training_state(load_checkpoint(last)[1])  # what the NaN recovery reloads
    assert distillation_of(resumed.ema.ema).teacher is resumed.teacher
    fp_state = load_checkpoint(fp)[0].state_dict()
    assert all(torch.equal(v, resumed.teacher.state_dict()[k]) for k, v in fp_state.items())  # unchanged
    teacher_ids = {id(p) for p in resumed.teacher.parameters()}
    for opt in (resumed.optimizer, resumed.scale_optimizer):
        assert not teacher_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    # what a later QC with distillation defaults to: the same FP checkpoint, also after the resume
    assert ckpt["fp_source"] == str(fp.resolve()) == checkpoint_teacher(load_checkpoint(last)[1])
    with pytest.raises(ValueError, match="--teacher"):
        checkpoint_teacher({"train_args": {}})
    rows = (tmp_path / "run" / "results.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 3 and "train/kd" in header and "val/kd" in header
    assert all(float(r.split(",")[header.index("train/kd")]) > 0 for r in rows[1:])

    # correct_qc.py on the finished run: --distill finds that teacher by itself; --no-labels on a bare folder
    import correct_qc

    folder = tmp_path / "photos"
    shutil.copytree(data.parent / "images" / "train", folder)
    best = tmp_path / "run" / "weights" / "best.pt"
    common = ["--weights", str(best), "--steps", "1", "--imgsz", "64", "--batch", "4", "--no-val",
              "--project", str(tmp_path / "qc"), "--exist-ok", "--no-measure-loss"]
    assert correct_qc.main([*common, "--no-labels", "--source", str(folder), "--name", "free"]) == 0
    report = json.loads((tmp_path / "qc" / "free" / "qc_report.json").read_text())
    assert report["distill"]["teacher"] == str(fp.resolve()) and report["distill"]["source"] == str(folder)
    assert report["distill"]["label_free"] and report["fold"]["passed"]
    assert correct_qc.main([*common, "--distill", "--data", str(data), "--name", "kd"]) == 0
    report = json.loads((tmp_path / "qc" / "kd" / "qc_report.json").read_text())
    assert report["distill"]["teacher"] == str(fp.resolve()) and not report["distill"]["label_free"]
    assert correct_qc.main([*common, "--source", str(folder), "--name", "x"]) == 2  # label-free must be confirmed
    assert correct_qc.main([*common, "--no-labels", "--name", "x"]) == 2  # no folder named


def test_original_trainer_logs_kd_and_yaml_models_have_no_default_teacher(data, images, tmp_path):
    from yolo_qat.engine.trainer import qat_trainer_class

    fp = save_checkpoint(tmp_path / "fp.pt", fp_like("yolov5n", images))
    ov = qat_overrides(data, tmp_path, fp, distill=True)
    trainer = qat_trainer_class("detect", original=True)(overrides={**ov, "epochs": 1})
    trainer.train()
    assert trainer.loss_names == ("box_loss", "obj_loss", "cls_loss", "kd")
    rows = (tmp_path / "run" / "results.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert float(rows[1].split(",")[header.index("train/kd")]) > 0 and "val/kd" in header

    with pytest.raises(ValueError, match="yaml without weights"):
        qat_trainer_class("detect")(overrides=qat_overrides(data, tmp_path, resolve_model_cfg("yolov5nu"),
                                                            distill=True))
    with pytest.raises(ValueError, match="--distill"):
        qat_trainer_class("detect")(overrides=qat_overrides(data, tmp_path, fp, teacher=str(fp)))


def test_label_free_qc_on_an_image_folder(data, images, tmp_path):
    from yolo_qat.engine.qc import run_qc

    folder = tmp_path / "photos"  # images only: no labels folder, no dataset yaml
    shutil.copytree(data.parent / "images" / "train", folder)
    (folder / "notes.txt").write_text("not an image")
    teacher = fp_like("yolov5nu-seg", images)
    student = quantized_copy(teacher, images)
    with pytest.raises(ValueError, match="needs a teacher"):
        run_qc(copy.deepcopy(student), source=folder, steps=1, imgsz=64, batch=4)

    model, report = run_qc(student, source=folder, teacher=teacher, distill_weight=1.0, steps=3, imgsz=64, batch=4,
                           weights_dir=tmp_path / "w", save_dir=tmp_path / "qc")
    assert report["distill"]["label_free"] and report["calib_images"] == 8 and report["fold"]["passed"]
    assert report["loss_before"] > 0 and len(report["history"]) == 3 and not qc_modules(model)
    assert getattr(model, "criterion", None) is None  # the teacher is detached again
    folded, ckpt = load_checkpoint(tmp_path / "w" / "qc.pt")
    assert not isinstance(getattr(folded, "criterion", None), DistillationCriterion)


def test_image_folder_batches_are_letterboxed_as_ultralytics_does(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for i, (h, w) in enumerate([(60, 96), (80, 50), (40, 30), (200, 120)]):  # down- and up-scaled, both aspects
        cv2.imwrite(str(root / "images" / "train" / f"im{i}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        (root / "labels" / "train" / f"im{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "d.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnames:\n  0: a\n")
    ours, files = image_folder_loader(root / "images" / "train", imgsz=64, batch=4, shuffle=False)
    theirs, _ = calibration_loader(root / "d.yaml", "detect", 64, 4, shuffle=False, save_dir=tmp_path / "c")
    a, b = next(iter(ours)), next(iter(theirs))
    assert len(files) == 4 and a["img"].dtype == torch.uint8 and a["img"].shape == (4, 3, 64, 64)
    order = [a["im_file"].index(f) for f in b["im_file"]]
    assert torch.equal(a["img"][order], b["img"])
    assert "cls" not in a and "bboxes" not in a  # a loss that needs labels fails instead of seeing empty images
    with pytest.raises(FileNotFoundError, match="no images"):
        image_folder_loader(root / "labels", imgsz=64)
