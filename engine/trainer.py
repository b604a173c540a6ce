"""QAT on the Ultralytics trainer: a mixin over DetectionTrainer / SegmentationTrainer.

What changes against plain Ultralytics training, each in the smallest override that does it:
- ``setup_model``: the FP model (yaml or any Ultralytics .pt) is quantized by the recipe; on resume
  the quantized model and its raw (non-EMA) weights come back from our own checkpoint.
- ``after_train_pipeline``: activation quantizers are calibrated on a few training batches once,
  before the EMA copy is taken (so the EMA starts from calibrated scales); with ``distill`` the model's
  loss gets the distillation term from the FP teacher (engine/distill.py), loaded in ``setup_model``
  from the path the settings carry (resolved when the run starts, so a resume finds the same file).
- ``build_optimizer``: SGD (the YOLO recipe) for weights, a separate Adam for step sizes / offsets
  (``optimizer=auto`` would pick MuSGD/AdamW by run length and put scales in its groups).
- ``optimizer_step``: dampening gradient, both optimizers, frozen-weight re-application,
  oscillation tracking, iterative freezing, then the EMA.
- ``resume_training`` / ``load_training_state`` / ``save_model`` / ``final_eval``: fp32
  checkpoints that carry the recipe, QAT args and the complete training state;
  ``recover_from_nan`` goes back to that state when the loss turns NaN.
The hooks named here without an Ultralytics method of that name are reached through Ultralytics' private methods,
which engine/ultralytics_compat.py overrides and checks against the installed version.
The class is importable by module path and built from plain overrides, as the DDP launcher needs, and is
Ultralytics' ``trainer=``: ``YOLO("fp.pt").train(trainer=QATDetectionTrainer, qat={...}, data=...)``; ``qat`` is
a QATConfig (or its dict), a QuantRecipe, a preset name or recipe yaml (configs/presets.py), or a dict of such settings.
"""
from __future__ import annotations

import csv
import math
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT, LOCAL_RANK, LOGGER, RANK, YAML
from ultralytics.utils.files import get_latest_run
from ultralytics.utils.torch_utils import torch_distributed_zero_first, unwrap_model

from yolo_qat import models  # noqa: F401  (registers the YOLO layer policy)
from yolo_qat.models.checkpoint import load_checkpoint, save_checkpoint
from yolo_qat.configs.presets import recipe_settings
from yolo_qat.quant import (LSQQuantizer, QuantRecipe, calibrate, is_quantized, quant_convs, quantize_model,
                            set_recompute_input)
from yolo_qat.quant.bn_reestimate import reestimate_bn
from yolo_qat.quant.targets import check_continued_target
from yolo_qat.quant.grid import MIN_SCALE
from yolo_qat.quant.step_optim import NEAR_FLOOR, step_size_optimizer, steps_near_floor
from yolo_qat.quant.oscillation import Dampening, DelayedCosine, OscillationTracker

from .config import QATConfig
from .distill import attach_distillation, check_teacher, distillation_of, load_teacher, resolve_teacher_path
from .ema import QATModelEMA
from .original import OriginalDetectionTrainer, OriginalSegmentationTrainer
from .resume_log import continued_clock, trim_epoch_logs
from .resume_dir import resumed_save_dir
from .ultralytics_compat import UltralyticsTrainerCompat


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LSQQuantizer) for p in m.parameters(recurse=False)]


def fused_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer (class, groups, hyper-parameters; no state yet) with ``fused=True``, or ``opt`` itself
    when this torch has no fused kernel for it."""
    try:
        return type(opt)([{**g, "fused": True, "foreach": None} for g in opt.param_groups], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return opt


class TrainingDiverged(RuntimeError):
    """The loss went NaN/Inf and the run cannot recover: reported as one paragraph, no traceback."""


_NAN_ATTEMPTS = 3  # reloads of last.pt per epoch before giving up, as Ultralytics does
_DIVERGED_FIX = ("Lower --lr0 or --scale-lr, or check the data for degenerate labels; to go on from an intact "
                 "last.pt with other settings, start a new run with --weights <last.pt> (--resume would reuse the "
                 "settings that diverged)")


def _all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def qat_config_of(qat) -> tuple[QATConfig, dict]:
    """(QATConfig, the Ultralytics settings it carries) of a trainer's ``qat``: None (the defaults), a QATConfig or its
    dict (``recipe`` nested), a QuantRecipe, a preset name or recipe yaml, or a dict of flat settings (recipe fields,
    QAT fields and Ultralytics keys, as in configs/presets.py). A preset's Ultralytics keys (its epochs) are
    defaults for the run."""
    if qat is None or isinstance(qat, QATConfig):
        return QATConfig.from_any(qat), {}
    if isinstance(qat, QuantRecipe):
        return QATConfig(recipe=qat.to_dict()), {}
    settings = recipe_settings(qat)
    recipe = dict(settings.pop("recipe", None) or {})
    recipe.update({k: settings.pop(k) for k in list(settings) if k in _RECIPE_FIELDS})
    config = {k: settings.pop(k) for k in list(settings) if k in _QAT_FIELDS}
    ultralytics = {k: settings.pop(k) for k in list(settings) if k in DEFAULT_CFG_DICT}
    if settings:
        raise ValueError(f"qat has unknown setting(s) {sorted(settings)}: allowed are the QAT settings "
                         f"{sorted(_QAT_FIELDS)}, the recipe's {sorted(_RECIPE_FIELDS)} and Ultralytics' train keys")
    return QATConfig.from_any({**config, "recipe": recipe}), ultralytics


_RECIPE_FIELDS = {f.name for f in fields(QuantRecipe)}
_QAT_FIELDS = {f.name for f in fields(QATConfig)} - {"recipe"}


class QATTrainerMixin(UltralyticsTrainerCompat):
    """Shared QAT behaviour; combine with an Ultralytics task trainer (see the two classes below)."""

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None):
        overrides = dict(overrides or {})
        qat = overrides.pop("qat", None)  # not an Ultralytics key: its cfg check would reject it
        if not overrides.get("resume"):
            qat, run_defaults = qat_config_of(qat)
            overrides = {**run_defaults, **overrides}
        super().__init__(cfg, overrides, _callbacks)
        if self.resume:  # the checkpoint's settings win, as for every other resumed argument
            qat = getattr(self.args, "qat", None) or qat
        self.qat = qat_config_of(qat)[0]
        self._check_distill_settings()
        self.args.qat = self.qat.to_dict()
        if RANK in {-1, 0}:
            YAML.save(self.save_dir / "args.yaml", vars(self.args))  # rewritten with the QAT settings
        self.scale_optimizer = None
        self._step_sizes: list = []
        self.tracker: OscillationTracker | None = None
        self.qat_step = 0
        self.total_steps = 1
        self._calibrated = False
        self.extra_rows: dict = {}
        self._damp_sum, self._damp_n = 0.0, 0
        self.dampening = Dampening(self.qat.dampen_lambda, self.qat.schedule_start)
        self.freeze_schedule = DelayedCosine(self.qat.freeze_th_start, self.qat.freeze_th_end,
                                             self.qat.schedule_start)
        self.teacher: nn.Module | None = None  # the FP model distilled from; never part of self.model
        # The FP checkpoint this QAT run started from, kept in every checkpoint (a resume's args.model is its
        # last.pt): the default teacher of a later QC with distillation (engine.distill.checkpoint_teacher).
        model = self.args.model
        self.fp_source = str(Path(model).resolve()) if str(model).endswith(".pt") and Path(model).is_file() else None

    def check_resume(self, overrides):
        # Ultralytics reads the run's settings from last.pt with a full torch.load (weights_only=False): load it
        # safely first (models.safe_load), so that a file that would run code is refused before that.
        resume = self.args.resume
        if resume:
            last = resume if isinstance(resume, (str, Path)) and Path(resume).is_file() else get_latest_run()
            if last and Path(last).is_file():
                load_checkpoint(last)
        super().check_resume(overrides)
        if self.resume:  # the run directory is the checkpoint's own, whatever its train_args say
            self.args.save_dir = str(resumed_save_dir(self.args.resume, getattr(self.args, "save_dir", None)))

    def _check_distill_settings(self):
        q = self.qat
        if q.teacher is not None and not q.distill:
            raise ValueError(f"teacher='{q.teacher}' is set but distillation is off: add --distill (distill=True) to "
                             f"learn from it, or drop --teacher")
        if q.distill_weight < 0:
            raise ValueError(f"distill_weight={q.distill_weight!r} is invalid: allowed values are >= 0")
        if q.distill and not self.resume:
            # Resolved to an absolute path now: a resumed run's args.model is its last.pt, not the FP checkpoint.
            q.teacher = resolve_teacher_path(q.teacher, self.args.model)

    # -- model ----------------------------------------------------------------------------------
    def setup_model(self):
        ckpt = self._setup_student()
        if self.qat.distill and self.teacher is None:  # each DDP rank loads its own
            if self.qat.teacher is None:
                raise ValueError("distill=True but the QAT settings name no teacher checkpoint: pass teacher=FP.pt")
            try:
                self.teacher = load_teacher(self.qat.teacher)
            except FileNotFoundError:
                if not self.resume:
                    raise
                raise FileNotFoundError(f"this run distils from '{self.qat.teacher}', which no longer exists; a "
                                        f"resume reuses the run's settings: put the FP checkpoint back at that "
                                        f"path, or start a new run with --weights <last.pt>") from None
            check_teacher(self.model, self.teacher)  # before any data is loaded
        return ckpt

    def _setup_student(self):
        if isinstance(self.model, nn.Module):  # Ultralytics' Model.train hands over the model it built by get_model
            if is_quantized(self.model):
                check_continued_target(self.model, self.qat.recipe.target, str(self.args.model))
                self._calibrated = True
            else:
                quantize_model(self.model, self.qat.recipe)
            return None
        if self.resume:
            model, ckpt = load_checkpoint(self.args.resume)
            state = ckpt.get("train_state")
            if state is None:
                raise ValueError(f"'{self.args.resume}' holds no training state (a best.pt or a finished run): "
                                 f"resume from the run's weights/last.pt")
            model.load_state_dict(state["model"])  # the raw weights; ckpt["model"] is the EMA
            self.fp_source = ckpt.get("fp_source")
            self.model, self._calibrated = model.train(), True
            return ckpt
        weights, cfg = None, self.model
        if str(self.model).endswith(".pt"):
            weights, source_ckpt = load_checkpoint(self.model)
            if is_quantized(weights):  # continue QAT of a quantized checkpoint as it is
                check_continued_target(weights, self.qat.recipe.target, str(self.model))
                self.fp_source = source_ckpt.get("fp_source")  # the FP model behind it, if it recorded one
                self.model, self._calibrated = weights.train(), True
                return None
            cfg = weights.yaml
        self.model = self.get_model(cfg=cfg, weights=weights, verbose=RANK == -1)
        quantize_model(self.model, self.qat.recipe)
        return None

    def get_model(self, cfg=None, weights=None, verbose=True):
        # YOLO("qat.pt").train(trainer=...): a quantized model goes on as it is (loading it into a new float model
        # would drop its quantizers).
        if isinstance(weights, nn.Module) and is_quantized(unwrap_model(weights)):
            return unwrap_model(weights)
        return super().get_model(cfg=cfg, weights=weights, verbose=verbose)

    def get_validator(self):
        # The validator re-checks its args against Ultralytics' cfg keys: hand it a copy without ours.
        qat = vars(self.args).pop("qat", None)
        try:
            validator = super().get_validator()
        finally:
            self.args.qat = qat
        # The anchor-based trainers fix their loss names (Ultralytics' own read them from the first loss dict).
        if self.qat.distill and self.loss_names and "kd" not in self.loss_names:
            self.loss_names = (*self.loss_names, "kd")
        return validator

    # -- data-dependent set-up: calibration, step budget ----------------------------------------
    def after_train_pipeline(self):
        super().after_train_pipeline()
        nb = len(self.train_loader)
        self.total_steps = max(1, self.epochs * math.ceil(nb / max(self.accumulate, 1)))
        if not self._calibrated:
            self._calibrate()
            self._calibrated = True
        model = unwrap_model(self.model)
        set_recompute_input(model, self.qat.recompute_input)
        if self.qat.distill:  # after set_model_attributes (the loss reads model.args), before the EMA copy
            attach_distillation(model, self.teacher.to(self.device), self.qat.distill_weight)
            LOGGER.info(f"QAT: distilling from {self.qat.teacher} (weight {self.qat.distill_weight})")
        if self.tracker is None:
            self.tracker = OscillationTracker(quant_convs(model), self.qat.osc_momentum).to(self.device)

    def _calibrate(self):
        loader = self.get_dataloader(self.data["train"], batch_size=max(self.batch_size // max(self.world_size, 1), 1),
                                     rank=-1, mode="train")
        model = unwrap_model(self.model)
        n = calibrate(model, loader, num_batches=self.qat.calib_batches,
                      forward=lambda m, b: m(self.preprocess_batch(b)["img"]))
        if hasattr(loader, "close"):
            loader.close()
        if self.world_size > 1:  # ranks saw different shards: keep rank 0's scales everywhere
            for m in model.modules():
                if isinstance(m, LSQQuantizer):
                    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                        dist.broadcast(t.data, src=0)
        LOGGER.info(f"QAT: calibrated {len(quant_convs(model))} activation quantizers on {n} batches")

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        if str(name).lower() in {"auto", "musgd"}:
            LOGGER.info(f"QAT: optimizer={name} replaced by SGD (the YOLO recipe; scales get their own Adam)")
            name = self.args.optimizer = "SGD"
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        qparams = quantizer_parameters(unwrap_model(model))
        qids = {id(p) for p in qparams}
        for group in optimizer.param_groups:  # still empty state: safe to edit the groups
            group["params"] = [p for p in group["params"] if id(p) not in qids]
        self.scale_optimizer = step_size_optimizer(unwrap_model(model), self.qat.scale_lr, self.qat.step_update)
        self._step_sizes = [m.step_size for m in unwrap_model(model).modules() if isinstance(m, LSQQuantizer)]
        if qparams and all(p.is_cuda for p in qparams) and all(p.is_cuda for g in optimizer.param_groups
                                                              for p in g["params"]):
            # fused kernels on CUDA: the GradScaler hands them found_inf instead of reading it on the host
            # (two syncs per step otherwise), and one launch per optimizer instead of one per tensor group
            optimizer, self.scale_optimizer = fused_optimizer(optimizer), fused_optimizer(self.scale_optimizer)
        return optimizer

    def resume_training(self, ckpt):
        # Ultralytics built a ModelEMA with its fixed decay / tau; configure ours instead (same class
        # underneath, same state), before a resume loads its state into it.
        self.ema = QATModelEMA(self.model, self.qat.ema_decay, self.qat.ema_tau)
        super().resume_training(ckpt)
        if self.resume and ckpt is not None:  # the logs end where the checkpoint does; the time column goes on
            self.resumed_time = trim_epoch_logs(self, ckpt)
        model = unwrap_model(self.model)
        if self.qat.distill and distillation_of(model) is None:  # Ultralytics rebuilt an end-to-end head's loss
            attach_distillation(model, self.teacher, self.qat.distill_weight)

    def load_training_state(self, ckpt):
        state = ckpt["train_state"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scale_optimizer.load_state_dict(state["scale_optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.ema = QATModelEMA(self.model, self.qat.ema_decay, self.qat.ema_tau, updates=ckpt["updates"])
        self.ema.ema.load_state_dict(ckpt["model"].float().state_dict())
        self.tracker.load_state_dict(state["oscillation"])
        self.qat_step = state["qat_step"]
        self.best_fitness = ckpt.get("best_fitness")
        self.stopper.__dict__.update(ckpt.get("stopper") or {})

    def recover_from_nan(self, epoch):
        """A NaN/Inf loss (or fitness) at the end of an epoch: go back to last.pt and redo the epoch.

        Ultralytics' version reloads ``ckpt["ema"]``, which our checkpoints leave empty (the EMA is
        ``ckpt["model"]``), and would restore the weights but not the scales' Adam, the oscillation
        tracker or the step counter. Ours restores the complete training state saved in last.pt, or
        stops with a TrainingDiverged message when there is nothing sound to go back to."""
        loss_nan = self.loss is not None and not bool(torch.isfinite(self.loss).all())
        fitness_nan = self.fitness is not None and not math.isfinite(float(self.fitness))
        corrupted = RANK in {-1, 0} and (loss_nan or fitness_nan)
        if RANK != -1:  # every rank must take the same branch
            flag = [corrupted if RANK == 0 else None]
            dist.broadcast_object_list(flag, 0)
            corrupted = flag[0]
        if not corrupted:
            return False
        what = "the training loss" if loss_nan else "the validation fitness"
        model = unwrap_model(self.model)
        if epoch == self.start_epoch and not self.resume:  # nothing saved yet (a last.pt there is a stale one)
            if _all_finite(model.state_dict()):  # e.g. one AMP step skipped by the grad scaler: harmless
                LOGGER.warning(f"QAT: {what} was NaN/Inf in epoch {epoch + 1}, the weights are finite: continuing")
                return False
            raise TrainingDiverged(f"{what} became NaN/Inf in epoch {epoch + 1}, the first of this run, and the "
                                   f"weights are no longer finite; there is no checkpoint of this run to go back "
                                   f"to. {_DIVERGED_FIX}")
        self.nan_recovery_attempts += 1
        ckpt = self._recovery_checkpoint(epoch, what)
        LOGGER.warning(f"QAT: {what} was NaN/Inf in epoch {epoch + 1}: reloading {self.last} (epoch {epoch}) and "
                       f"redoing the epoch (attempt {self.nan_recovery_attempts}/{_NAN_ATTEMPTS})")
        self.set_train_mode()
        model.load_state_dict(ckpt["train_state"]["model"])
        self.load_training_state(ckpt)
        self.scale_optimizer.zero_grad()  # the optimizer's own grads are cleared by Ultralytics' loop
        self._damp_sum, self._damp_n = 0.0, 0
        self.scheduler.last_epoch = epoch - 1
        return True

    def _recovery_checkpoint(self, epoch: int, what: str) -> dict:
        """last.pt as written at the end of the previous epoch, or TrainingDiverged."""
        last = f"{self.last} (epoch {epoch}) is intact" if self.last.exists() else "no last.pt was written"
        if self.nan_recovery_attempts > _NAN_ATTEMPTS:
            raise TrainingDiverged(f"{what} was NaN/Inf in epoch {epoch + 1} again after {_NAN_ATTEMPTS} reloads of "
                                   f"last.pt; {last}. {_DIVERGED_FIX}")
        try:
            _, ckpt = load_checkpoint(self.last)
        except (FileNotFoundError, ValueError) as e:
            raise TrainingDiverged(f"{what} became NaN/Inf in epoch {epoch + 1} and last.pt cannot be reloaded "
                                   f"({e}). {_DIVERGED_FIX}") from None
        state = ckpt.get("train_state")
        if state is None or ckpt.get("epoch") != epoch - 1 or not _all_finite(state["model"]):
            raise TrainingDiverged(f"{what} became NaN/Inf in epoch {epoch + 1} and {self.last} is not the sound "
                                   f"end-of-epoch-{epoch} training state of this run. {_DIVERGED_FIX}")
        return ckpt

    # -- one optimizer step ---------------------------------------------------------------------
    @property
    def progress(self) -> float:
        return min(self.qat_step / self.total_steps, 1.0)

    def optimizer_step(self):
        convs = quant_convs(unwrap_model(self.model))
        if self.qat.method == "dampen":
            reg = self.dampening(convs, self.progress)
            if reg.requires_grad:
                # Ultralytics' detection loss is summed over the batch (x batch size); scale the
                # regulariser alike so that lambda means the same at any batch size.
                self.scaler.scale(reg * self.batch_size).backward()
            self._damp_sum = self._damp_sum + reg.detach()  # a tensor: no host sync per step
            self._damp_n += 1
        self.scaler.unscale_(self.optimizer)
        self.scaler.unscale_(self.scale_optimizer)
        weights = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(weights, max_norm=10.0)
        self.scaler.step(self.optimizer)
        self.scaler.step(self.scale_optimizer)
        self.scaler.update()
        if self._step_sizes:  # LSQ step sizes stay positive: clamped in place (one foreach kernel, no sync)
            with torch.no_grad():
                torch._foreach_clamp_min_(self._step_sizes, MIN_SCALE)
        self.optimizer.zero_grad()
        self.scale_optimizer.zero_grad()
        self.qat_step += 1
        self.tracker.apply_frozen(convs)  # frozen codes stay fixed whatever SGD or the scale did
        self.tracker.update(convs)
        if self.qat.method == "freeze":
            th = self.freeze_schedule(self.progress)
            if th is not None:  # the count stays on the device; applying an empty mask changes nothing
                self.tracker.freeze(convs, th, count=False, max_bits=self.qat.freeze_max_bits)
                self.tracker.apply_frozen(convs)
        if self.ema:
            self.ema.update(self.model)

    # -- logging --------------------------------------------------------------------------------
    def qat_epoch_stats(self) -> dict:
        o = self.tracker.overall_stats(self.qat.osc_threshold)
        th = self.freeze_schedule(self.progress) if self.qat.method == "freeze" else None
        stats = {"osc/share": o["osc_share"], "osc/frozen": o["frozen_share"], "osc/mean_freq": o["mean_freq"],
                 "qat/damp_loss": float(self._damp_sum) / max(self._damp_n, 1),
                 "qat/damp_lambda": self.dampening.weight(self.progress) if self.qat.method == "dampen" else 0.0,
                 "qat/freeze_th": th or 0.0, "qat/ema_a": self.ema.decay_at(self.ema.updates) if self.ema else 0.0}
        self._damp_sum, self._damp_n = 0.0, 0
        return stats

    def save_metrics(self, metrics):
        convs = quant_convs(unwrap_model(self.model))
        floor = steps_near_floor(convs)
        self._warn_steps_near_floor(floor)
        with continued_clock(self):
            super().save_metrics({**metrics, **self.qat_epoch_stats(), "qat/steps_near_floor": sum(floor.values())})
        path = self.save_dir / "oscillations.csv"
        bits = {n: m.w_bits for n, m in convs.items()}
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["epoch", "step", "layer", "w_bits", "n_weights", "osc_share", "frozen_share", "mean_freq",
                            "steps_near_floor"])
            for name, s in self.tracker.layer_stats(self.qat.osc_threshold).items():
                w.writerow([self.epoch + 1, self.qat_step, name, bits.get(name, ""), s["n"],
                            f"{s['osc_share']:.6g}", f"{s['frozen_share']:.6g}", f"{s['mean_freq']:.6g}",
                            floor.get(name, 0)])

    def _warn_steps_near_floor(self, floor: dict[str, int]) -> None:
        """One log line naming the layers whose step sizes sit at the floor (their channels quantize to zero)."""
        if not floor:
            return
        worst = sorted(floor.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{n} ({c})" for n, c in worst[:8]) + (f", ... {len(worst) - 8} more" if len(worst) > 8 else "")
        LOGGER.warning(f"QAT: {sum(floor.values())} step sizes in {len(floor)} layers are at most {NEAR_FLOOR:g} (the "
                       f"floor is {MIN_SCALE:g}): their channels quantize to zero. Layers (steps): {shown}. Dead channels "
                       f"(all weights ~0) start there; steps driven there by training come from absolute step updates "
                       f"(--step-update relative keeps them off the floor)")

    # -- checkpoints ----------------------------------------------------------------------------
    def _checkpoint_extra(self) -> dict:
        return {"epoch": self.epoch, "best_fitness": self.best_fitness, "updates": self.ema.updates,
                "stopper": {"best_fitness": self.stopper.best_fitness, "best_epoch": self.stopper.best_epoch},
                "train_args": {k: v for k, v in vars(self.args).items()}, "qat_args": self.qat.to_dict(),
                "train_metrics": {**(self.metrics or {}), "fitness": self.fitness},
                "train_results": self.read_results_csv(), "fp_source": self.fp_source}

    def save_model(self):
        """fp32 checkpoints (Ultralytics would halve them). ``model`` is the EMA model (what is
        validated and deployed); last.pt adds ``train_state`` (raw weights, both optimizers, the
        oscillation state, the step counter) for an exact resume. Every file is written to a temp
        name and renamed, so a crash mid-save never leaves a partial last.pt or best.pt."""
        ema = self.ema.ema
        criterion = getattr(ema, "criterion", None)
        ema.criterion = None  # training-only state, rebuilt on demand
        try:
            extra = self._checkpoint_extra()
            state = {"model": unwrap_model(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scale_optimizer": self.scale_optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                     "oscillation": self.tracker.state_dict(), "qat_step": self.qat_step}
            save_checkpoint(self.last, ema, train_state=state, **extra)
            if self.best_fitness == self.fitness:
                save_checkpoint(self.best, ema, **extra)
            if self.save_period > 0 and self.epoch % self.save_period == 0:
                save_checkpoint(self.wdir / f"epoch{self.epoch}.pt", ema, **extra)
        finally:
            ema.criterion = criterion
        return True

    def final_eval(self):
        """Validate best.pt as saved (Ultralytics' version would first re-save it in fp16)."""
        if not self.best.exists():
            return
        LOGGER.info(f"\nValidating {self.best}...")
        self.validator.args.plots = self.args.plots
        self.validator.args.compile = False
        self.metrics = self.validator(model=self.best)
        self.metrics.pop("fitness", None)
        self.epoch += 1
        self.run_callbacks("on_fit_epoch_end")
        self.epoch -= 1
        if self.qat.bn_reestimate:  # on every rank: under DDP, validation is sharded and gathered on rank 0
            metrics = self.reestimate_bn_of_best()
            if RANK in {-1, 0}:
                self.extra_rows = {"QAT + BN re-estimation": metrics}

    def reestimate_bn_of_best(self) -> dict:
        """BN statistics of best.pt recomputed with the quantized forward -> weights/best_bn.pt, validated."""
        path = self.wdir / "best_bn.pt"
        with torch_distributed_zero_first(LOCAL_RANK):  # DDP: rank 0 writes the file, the others wait for it
            if RANK in {-1, 0}:
                model, ckpt = load_checkpoint(self.best, device=self.device)
                loader = self.get_dataloader(self.data["train"], batch_size=self.batch_size, rank=-1, mode="train")
                n = reestimate_bn(model, loader, num_batches=self.qat.bn_batches,
                                  forward=lambda m, b: m(self.preprocess_batch(b)["img"]))
                keep = {k: v for k, v in ckpt.items() if k not in {"model", "ema", "quant_recipe", "date", "version"}}
                save_checkpoint(path, model, bn_reestimated_batches=n, **keep)
                LOGGER.info(f"QAT: BN statistics re-estimated on {n} batches -> {path}")
        metrics = self.validator(model=path)
        metrics.pop("fitness", None)
        return metrics


class QATDetectionTrainer(QATTrainerMixin, DetectionTrainer):
    pass


class QATSegmentationTrainer(QATTrainerMixin, SegmentationTrainer):
    pass


# The original anchor-based YOLOv5 / YOLOv7 models: the same QAT over engine/original.py's trainers.
class QATOriginalDetectionTrainer(QATTrainerMixin, OriginalDetectionTrainer):
    pass


class QATOriginalSegmentationTrainer(QATTrainerMixin, OriginalSegmentationTrainer):
    pass


TRAINERS = {"detect": QATDetectionTrainer, "segment": QATSegmentationTrainer}
ORIGINAL_TRAINERS = {"detect": QATOriginalDetectionTrainer, "segment": QATOriginalSegmentationTrainer}


def qat_trainer_class(task: str, original: bool = False):
    """The QAT trainer for a task; ``original`` for the anchor-based models of models/yolo.py
    (``models.facts.is_original_source`` tells them apart)."""
    if task not in TRAINERS:
        raise ValueError(f"task {task!r} is not supported for QAT: allowed values are {sorted(TRAINERS)}")
    return (ORIGINAL_TRAINERS if original else TRAINERS)[task]
