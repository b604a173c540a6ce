"""QC and BN re-estimation on Ultralytics YOLO models: the glue between quant/qc.py,
quant/bn_reestimate.py and Ultralytics' dataloader and loss.

QC does not use Ultralytics' trainer on purpose: it switches every float Parameter back to
``requires_grad=True`` and puts BN in train mode, both of which QC must not do. The loop here is
small: Ultralytics' dataloader, the model's own ``model.loss(batch)``, Adam on the corrections.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from ultralytics.utils import LOGGER

from yolo_qat.quant import is_quantized, set_quantizers_enabled
from yolo_qat.quant.bn_reestimate import reestimate_bn
from yolo_qat.models.checkpoint import save_checkpoint
from yolo_qat.quant.qc import FoldCheckError, fold_qc_checked, freeze_for_qc, insert_qc, qc_modules, set_batchnorm_eval

from yolo_qat.models.facts import model_task

from .calib import calibration_loader, ensure_loss_args, image_folder_loader, preprocess
from .distill import DEFAULT_WEIGHT, attach_distillation, detach_distillation

# End to end (logged, not checked): outputs that moved by more than this share of their range count as "off".
END_TO_END_RTOL = 1e-4
UNFOLDED_NAME, FOLDED_NAME = "qc_unfolded.pt", "qc.pt"  # checkpoints written by run_qc(weights_dir=...)
# The paper's QC is one COCO epoch: 1,849 Adam steps at lr 1e-4 (batch 64). Adam moves a correction by about lr per
# step at most, so lr x steps bounds how far QC can correct; on the embedded data QC's gain grew with it
# (docs/paper-table.md, "QC's budget at small scale").
PAPER_QC_BUDGET = 1849 * 1e-4


def budget_note(steps: int, lr: float, factor: float = 5.0) -> str | None:
    """One line when a QC run's lr x steps is more than ``factor`` times below the paper's, else None."""
    if steps <= 0 or steps * lr * factor >= PAPER_QC_BUDGET:
        return None
    return (f"QC budget: {steps} steps x lr {lr:g} = {steps * lr:.2g}, {PAPER_QC_BUDGET / (steps * lr):.0f}x below the "
            f"paper's one COCO epoch (1849 steps x lr 1e-4 = 0.18); on the embedded data W3A3 QC gained 4x less at 1/10 "
            f"of it: raise --steps (or --epochs) or --lr (docs/paper-table.md: QC's budget at small scale)")


def require_quantized(model: nn.Module) -> None:
    if not is_quantized(model):
        raise ValueError("QC needs a quantized checkpoint (a QAT model with QuantConv2d layers, e.g. the output of "
                         "train_qat.py); this model has no quantized conv")


def _flat_outputs(y) -> torch.Tensor:
    """Every tensor of a YOLO output joined flat (decoded boxes, scores, mask coefficients, protos)."""
    if isinstance(y, torch.Tensor):
        return y.detach().float().flatten()
    items = y.values() if isinstance(y, dict) else y
    return torch.cat([_flat_outputs(v) for v in items if v is not None])


@torch.no_grad()
def calibration_loss(model: nn.Module, loader, device="cpu", max_batches: int | None = None) -> float:
    """Mean ``model.loss`` over the loader, with BN frozen (eval) and the train-mode output format
    the loss expects. The model's modes are restored."""
    was_training = model.training
    model.train()
    set_batchnorm_eval(model)
    total, n = 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            loss, _ = model.loss(preprocess(batch, device))
            total += float(loss.sum()) / batch["img"].shape[0]  # the loss is scaled by the batch size
            n += 1
    finally:
        model.train(was_training)
    return total / max(n, 1)


@torch.no_grad()
def _eval_outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return _flat_outputs(model(images))
    finally:
        model.train(was_training)


def fold_and_check(model: nn.Module, probe_images: torch.Tensor) -> dict:
    """Fold the corrections, checking each folded layer on the input it saw before folding
    (``quant.qc.fold_qc_checked``: float64 comparison, bound from the rounding of the folded
    parameters), and report the end-to-end difference of the eval outputs on ``probe_images``.

    End to end, folding only reorders float arithmetic, but that can move an activation across a
    rounding threshold of the next quantizer, and a barely trained network amplifies even
    float-rounding differences layer after layer (measured: 1e-3 of the range with activation
    rounding off on a 1-epoch model): both end-to-end differences are reported and logged, not
    errors. Raises ``quant.qc.FoldCheckError`` (model left folded) if a layer fails its check.
    The model is left in eval mode (BN must use its frozen statistics throughout).
    """
    model.eval()
    before_smooth = _eval_outputs_without_act_quant(model, probe_images)
    outputs = {}
    layer_report = fold_qc_checked(model, lambda: outputs.__setitem__("before", _eval_outputs(model, probe_images)))
    before = outputs["before"]
    after = _eval_outputs(model, probe_images)
    after_smooth = _eval_outputs_without_act_quant(model, probe_images)
    smooth = (after_smooth - before_smooth).abs().max().item() / max((before_smooth.max() - before_smooth.min()).item(), 1e-12)
    diff = (after - before).abs().max().item()
    out_range = (before.max() - before.min()).item()
    off = ((after - before).abs() > END_TO_END_RTOL * max(out_range, 1e-12)).float().mean().item()
    report = {**layer_report, "max_abs_diff": diff, "output_range": out_range,
              "rel_diff": diff / max(out_range, 1e-12), "share_outputs_off": off, "rel_diff_without_act_quant": smooth}
    worst = layer_report.get("worst_layer")
    LOGGER.info(f"QC fold: {report['into_bn']} corrections into BN, {report['into_conv']} into conv output scales; "
                f"every layer within its float32 rounding bound (worst {worst}: {report.get('worst_ratio', 0):.2g} "
                f"of it); {tie_note(layer_report)}; end to end max |folded - unfolded| = {diff:.3g} (output range "
                f"{out_range:.3g})")
    if layer_report["unchecked"]:
        LOGGER.warning(f"QC fold: {len(layer_report['unchecked'])} folded layers never ran on the probe images, so "
                       f"their fold is unchecked: {', '.join(layer_report['unchecked'][:5])}")
    if smooth > END_TO_END_RTOL:
        LOGGER.warning(f"QC fold: with activation rounding off, end-to-end outputs differ by {smooth:.2g} of "
                       f"their range (float reordering amplified by the network)")
    if report["rel_diff"] > END_TO_END_RTOL:
        LOGGER.warning(f"QC fold: end-to-end outputs differ by up to {diff:.3g} on {100 * off:.3f}% of values: "
                       f"float reordering moved activations across a rounding threshold of a quantizer")
    return report


def tie_note(fold: dict) -> str:
    """What the fold check says about the quantizers after the folded layers, in one clause."""
    checked = sum(r.get("downstream") is not None for r in fold.get("layers", {}).values())
    if not checked:
        return "no quantizer takes a folded layer's output (float arithmetic comes first)"
    return (f"{fold.get('ties', 0)} outputs of {fold.get('tie_layers', 0)} layers sat on a rounding tie of the "
            f"quantizer after them (of {checked} such layers) and took the neighbouring code")


def _eval_outputs_without_act_quant(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    # With activation rounding off the network is a smooth function of the folded parameters:
    # an end-to-end check of the folding algebra that no rounding threshold can amplify.
    set_quantizers_enabled(model, False, weights=False)
    try:
        return _eval_outputs(model, images)
    finally:
        set_quantizers_enabled(model, True, weights=False)


def run_bn_reestimation(model: nn.Module, loader, num_batches: int = 50, device="cpu") -> int:
    """BN re-estimation over ``num_batches`` calibration batches (cycling if the set is smaller)."""
    def batches():
        while True:
            yield from loader

    return reestimate_bn(model, batches(), num_batches,
                         forward=lambda m, b: m(preprocess(b, device)["img"]))


def run_qc(model: nn.Module, data=None, *, calib_images: int | None = None, calib_fraction: float | None = None,
           epochs: int = 1, steps: int | None = None, lr: float = 1e-4, granularity: str = "channel",
           scale: bool = True, shift: bool = True, imgsz: int = 640, batch: int = 16, bn_reestimate: bool = False,
           bn_batches: int = 50, seed: int = 0, device: str = "cpu", augment: bool = False,
           measure_loss: bool = True, save_dir: str | Path | None = None, weights_dir: str | Path | None = None,
           checkpoint_extra: dict | None = None, report_extra: dict | None = None,
           teacher: nn.Module | str | Path | None = None, distill_weight: float = DEFAULT_WEIGHT,
           source: str | Path | None = None) -> tuple[nn.Module, dict]:
    """QC on a quantized YOLO model, in place: optional BN re-estimation, then corrections trained
    for ``epochs`` over the calibration subset (or exactly ``steps`` optimizer steps; 0 = no QC),
    then folded. A model that already carries corrections (``qc_unfolded.pt``) keeps them: they
    train for the given budget (0: none) and fold. Returns ``(model, report)``; the model is in
    eval mode with the corrections folded (its requires_grad flags as they were).

    With ``weights_dir``, the trained corrections are never lost: ``qc_unfolded.pt`` (corrections
    still as modules) is written before folding, then ``qc.pt`` (folded), also when the fold fails
    its check (``quant.qc.FoldCheckError``, re-raised with ``.paths`` and the run's ``.run_report``).
    ``checkpoint_extra`` goes into both checkpoints (e.g. ``train_args``), ``report_extra`` into the
    report (e.g. the source checkpoint).

    ``teacher`` (the FP model or its .pt): the QC loss adds the distillation term x ``distill_weight``
    (engine/distill.py); with ``source`` (a folder of images, no labels) it is the distillation term alone,
    over the images of that folder instead of ``data``'s training split."""
    require_quantized(model)
    if steps != 0 and not (scale or shift):
        raise ValueError("QC with neither scale nor shift trains nothing: drop --no-scale or --no-shift")
    _check_label_free(data, source, teacher, augment)
    torch.manual_seed(seed)
    model.to(device)
    ensure_loss_args(model)
    task = model_task(model)
    if source is not None:
        loader, files = image_folder_loader(source, imgsz, batch, calib_images, calib_fraction, seed)
        eval_loader, _ = image_folder_loader(source, imgsz, batch, calib_images, calib_fraction, seed, shuffle=False)
    else:
        loader, files = calibration_loader(data, task, imgsz, batch, calib_images, calib_fraction, seed,
                                           augment=augment, save_dir=save_dir)
        eval_loader, _ = calibration_loader(data, task, imgsz, batch, calib_images, calib_fraction, seed,
                                            augment=False, shuffle=False, save_dir=save_dir)
    if teacher is not None:  # the model's loss becomes detection + distillation (label-free: distillation only)
        attach_distillation(model, teacher, distill_weight, label_free=source is not None)
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    report = {"task": task, "calib_images": len(files), "granularity": granularity, "scale": scale, "shift": shift,
              "lr": lr, "seed": seed, "imgsz": imgsz, "batch": batch, "augment": augment, **(report_extra or {})}
    if teacher is not None:
        report["distill"] = {"teacher": str(teacher) if isinstance(teacher, (str, Path)) else type(teacher).__name__,
                             "weight": distill_weight, "label_free": source is not None,
                             "source": None if source is None else str(source)}
    paths: dict[str, str] = {}

    def save(name: str) -> None:
        if weights_dir is not None:
            paths[name] = str(save_checkpoint(Path(weights_dir) / name, model, qc=report, **(checkpoint_extra or {})))
            report["checkpoints"] = dict(paths)

    if measure_loss:
        report["loss_before"] = calibration_loss(model, eval_loader, device)
        LOGGER.info(f"QC: calibration loss before = {report['loss_before']:.4f} ({len(files)} images)")
    if bn_reestimate:
        report["bn_reestimate_batches"] = run_bn_reestimation(model, loader, bn_batches, device)
        if measure_loss:
            report["loss_after_bn"] = calibration_loss(model, eval_loader, device)
            LOGGER.info(f"QC: calibration loss after BN re-estimation = {report['loss_after_bn']:.4f}")
    total = steps if steps is not None else epochs * len(loader)
    report["steps"] = total
    if qc_modules(model):
        report["resumed_corrections"] = len(qc_modules(model))
    elif total > 0:
        report["corrected_convs"] = insert_qc(model, granularity, scale, shift)
    if qc_modules(model):
        if total > 0:
            report["history"] = _train_corrections(model, loader, total, lr, device)
        if measure_loss:
            report["loss_after"] = calibration_loss(model, eval_loader, device)
            LOGGER.info(f"QC: calibration loss {report['loss_before']:.4f} -> {report['loss_after']:.4f}")
        detach_distillation(model)  # the teacher never goes into a checkpoint
        _restore_grad_flags(model, grad_flags)
        save(UNFOLDED_NAME)
        probe = preprocess(next(iter(eval_loader)), device)["img"]
        try:
            report["fold"] = {**fold_and_check(model, probe), "passed": True}
        except FoldCheckError as e:  # the model is folded all the same: keep it for inspection
            report["fold"] = {**e.report, "passed": False, "error": str(e)}
            _restore_grad_flags(model, grad_flags)
            save(FOLDED_NAME)
            e.paths, e.run_report = dict(paths), report
            raise
    detach_distillation(model)
    _restore_grad_flags(model, grad_flags)
    save(FOLDED_NAME)
    return model, report


def _check_label_free(data, source, teacher, augment: bool) -> None:
    if source is None:
        return
    if teacher is None:
        raise ValueError(f"label-free QC on '{source}' needs a teacher: without labels the only target is the "
                         f"full-precision model's output. Pass the FP checkpoint the QAT run started from "
                         f"(--teacher FP.pt with --distill), or QC on a labelled dataset (--data)")
    if data is not None:
        raise ValueError(f"both a dataset ('{data}') and a label-free image folder ('{source}') were given: QC runs "
                         f"on one of them; drop --data for label-free QC, or --source to use the labelled data")
    if augment:
        raise ValueError("augmentation transforms labels with the images, and a label-free source has none: drop "
                         "--augment for label-free QC")


def _restore_grad_flags(model: nn.Module, flags: dict) -> None:
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), False))
    model.eval()


QC_LOG_EVERY = 10  # on CUDA: steps between reads of the loss on the host (every step on CPU, where it is free)


def device_type(device) -> str:
    return torch.device(device if not str(device).isdigit() else f"cuda:{device}").type if device is not None \
        else "cpu"


def _log_qc_window(history, sizes, window, step, total_steps, bar) -> None:
    """Log (and check) the last len(window) steps: one host read for all of them."""
    first = step + 1 - len(window)
    vals = torch.stack([torch.stack([history[first + i], *w.values()]) for i, w in enumerate(window)]).tolist()
    for i, row in enumerate(vals):
        if not math.isfinite(row[0]):
            raise FloatingPointError(f"QC step {first + i}: loss is {row[0]}")
    for i, (loss, *parts) in enumerate(vals):
        per_image, names = loss / sizes[first + i], list(window[i])
        text = " ".join(f"{k}={v:.4f}" for k, v in zip(names, parts))
        LOGGER.info(f"QC step {first + i + 1}/{total_steps}: loss {per_image:.4f} ({text})")
    bar.set_postfix(loss=f"{vals[-1][0] / sizes[-1]:.4f}")


def _train_corrections(model: nn.Module, loader, total_steps: int, lr: float, device) -> list[float]:
    params = freeze_for_qc(model)
    opt = torch.optim.Adam(params, lr=lr)
    history, sizes, window = [], [], []
    every = 1 if device_type(device) != "cuda" else QC_LOG_EVERY
    bar = tqdm(total=total_steps, desc="QC", unit="step")
    it = iter(loader)
    for step in range(total_steps):
        try:
            batch = next(it)
        except StopIteration:  # another epoch over a small calibration set
            it = iter(loader)
            batch = next(it)
        model.train()
        set_batchnorm_eval(model)  # train() flipped BN back; its statistics must stay frozen
        loss, items = model.loss(preprocess(batch, device))
        loss = loss.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # Losses stay on the device and are read every `every` steps (no host sync per step on a GPU);
        # a non-finite loss is then reported with the step it happened at (nothing is saved after the error).
        history.append(loss.detach())
        sizes.append(batch["img"].shape[0])
        window.append({k: torch.as_tensor(v).detach().float().to(loss.device).reshape(()) for k, v in items.items()})
        bar.update()
        if (step + 1) % every == 0 or step + 1 == total_steps:
            _log_qc_window(history, sizes, window, step, total_steps, bar)
            window = []
    bar.close()
    return [v / n for v, n in zip(torch.stack(history).tolist(), sizes)] if history else []
