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

from quant import is_quantized, set_quantizers_enabled
from quant.bn_reestimate import reestimate_bn
from quant.qc import default_bn_pairs, fold_qc, freeze_for_qc, insert_qc, qc_modules, set_batchnorm_eval

from .calib import calibration_loader, ensure_loss_args, preprocess, task_of

FOLD_RTOL = 1e-4  # folded vs unfolded outputs: max abs diff allowed, as a share of the output range


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


def fold_and_check(model: nn.Module, probe_images: torch.Tensor, rtol: float = FOLD_RTOL) -> dict:
    """Fold the corrections; check each folded layer on the input it saw before folding, and
    report the end-to-end difference of the eval outputs on ``probe_images``.

    The per-layer check is the exactness test (each folded layer against its unfolded self on the
    same recorded input). End to end, folding only reorders float arithmetic, but that can move an
    activation across a rounding threshold of the next quantizer, and a barely trained network
    amplifies even float-rounding differences layer after layer (measured: 1e-3 of the range with
    activation rounding off on a 1-epoch model): both end-to-end differences are reported and
    logged, not errors.
    The model is left in eval mode (BN must use its frozen statistics throughout).
    """
    model.eval()
    wrapped = qc_modules(model)
    pairs = default_bn_pairs(model)
    mods = dict(model.named_modules())
    inputs = {}
    hooks = [w.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, w in wrapped.items()]
    try:
        before = _eval_outputs(model, probe_images)
    finally:
        for h in hooks:
            h.remove()
    before_smooth = _eval_outputs_without_act_quant(model, probe_images)
    with torch.no_grad():
        local_ref = {n: (mods[pairs[n]] if n in pairs else nn.Identity())(w(inputs[n])) for n, w in wrapped.items()}
    counts = fold_qc(model, pairs)
    mods = dict(model.named_modules())
    local = 0.0
    with torch.no_grad():
        for n, ref in local_ref.items():
            out = (mods[pairs[n]] if n in pairs else nn.Identity())(mods[n](inputs[n]))
            d = (out - ref).abs().max().item() / max((ref.max() - ref.min()).item(), 1e-12)
            local = max(local, d)
    after = _eval_outputs(model, probe_images)
    after_smooth = _eval_outputs_without_act_quant(model, probe_images)
    smooth = (after_smooth - before_smooth).abs().max().item() / max((before_smooth.max() - before_smooth.min()).item(), 1e-12)
    diff = (after - before).abs().max().item()
    out_range = (before.max() - before.min()).item()
    off = ((after - before).abs() > rtol * max(out_range, 1e-12)).float().mean().item()
    report = {**counts, "max_abs_diff": diff, "output_range": out_range, "rel_diff": diff / max(out_range, 1e-12),
              "share_outputs_off": off, "max_layer_rel_diff": local, "rel_diff_without_act_quant": smooth}
    LOGGER.info(f"QC fold: {counts['into_bn']} corrections into BN, {counts['into_conv']} into conv output scales; "
                f"max |folded - unfolded| = {diff:.3g} (output range {out_range:.3g}), per layer {local:.2g} of range")
    if not local <= rtol:
        raise AssertionError(f"QC folding changed a layer's output: max diff {local:.3g} of its range > {rtol:g}")
    if smooth > rtol:
        LOGGER.warning(f"QC fold: with activation rounding off, end-to-end outputs differ by {smooth:.2g} of "
                       f"their range (float reordering amplified by the network)")
    if report["rel_diff"] > rtol:
        LOGGER.warning(f"QC fold: end-to-end outputs differ by up to {diff:.3g} on {100 * off:.3f}% of values: "
                       f"float reordering moved activations across a rounding threshold of a quantizer")
    return report


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
           measure_loss: bool = True, save_dir: str | Path | None = None) -> tuple[nn.Module, dict]:
    """QC on a quantized YOLO model, in place: optional BN re-estimation, then corrections trained
    for ``epochs`` over the calibration subset (or exactly ``steps`` optimizer steps; 0 = no QC),
    then folded. Returns ``(model, report)``; the model is in eval mode with the corrections
    folded (its requires_grad flags as they were)."""
    require_quantized(model)
    if steps != 0 and not (scale or shift):
        raise ValueError("QC with neither scale nor shift trains nothing: drop --no-scale or --no-shift")
    torch.manual_seed(seed)
    model.to(device)
    ensure_loss_args(model)
    task = task_of(model)
    loader, files = calibration_loader(data, task, imgsz, batch, calib_images, calib_fraction, seed,
                                       augment=augment, save_dir=save_dir)
    eval_loader, _ = calibration_loader(data, task, imgsz, batch, calib_images, calib_fraction, seed,
                                        augment=False, shuffle=False, save_dir=save_dir)
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    report = {"task": task, "calib_images": len(files), "granularity": granularity, "scale": scale, "shift": shift,
              "lr": lr, "seed": seed, "imgsz": imgsz, "batch": batch, "augment": augment}
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
    if total > 0:
        report["corrected_convs"] = insert_qc(model, granularity, scale, shift)
        report["history"] = _train_corrections(model, loader, total, lr, device)
        if measure_loss:
            report["loss_after"] = calibration_loss(model, eval_loader, device)
        probe = preprocess(next(iter(eval_loader)), device)["img"]
        report["fold"] = fold_and_check(model, probe)
        if measure_loss:
            LOGGER.info(f"QC: calibration loss {report['loss_before']:.4f} -> {report['loss_after']:.4f}")
    for p in model.parameters():
        p.requires_grad_(grad_flags.get(id(p), False))
    model.eval()
    return model, report


def _train_corrections(model: nn.Module, loader, total_steps: int, lr: float, device) -> list[float]:
    params = freeze_for_qc(model)
    opt = torch.optim.Adam(params, lr=lr)
    history = []
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
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"QC step {step}: loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        per_image = loss.item() / batch["img"].shape[0]
        history.append(per_image)
        parts = " ".join(f"{k}={float(v):.4f}" for k, v in items.items())
        bar.set_postfix(loss=f"{per_image:.4f}")
        bar.update()
        LOGGER.info(f"QC step {step + 1}/{total_steps}: loss {per_image:.4f} ({parts})")
    bar.close()
    return history
