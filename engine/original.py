"""The original anchor-based YOLOv5 / YOLOv7 models (models/yolo.py) on Ultralytics' trainer and validator.

Trainers (``OriginalDetectionTrainer``, ``OriginalSegmentationTrainer``): Ultralytics' DetectionTrainer /
SegmentationTrainer with
- ``get_model``: models.yolo.DetectionModel / SegmentationModel from an original-format yaml (path, registry name
  or a checkpoint's ``model.yaml`` dict) with nc from the data, weights transferred by Ultralytics' ``model.load``
  (every tensor of matching name and shape, anchors included);
- the YOLOv5 hyper-parameters (hyp.scratch-low) where the user set nothing: ``TRAIN_DEFAULTS``;
- the AutoAnchor check of yolov5's train.py after the data is loaded (``after_train_pipeline``,
  engine/autoanchor.py): anchors are refitted only for a model built from a yaml; trained weights keep theirs (the
  check is logged);
- the YOLOv5 loss items (box, [seg,] obj, cls) and the validators of engine/validate.py, whose ``postprocess``
  first turns the original output into Ultralytics' layout.
"""
from __future__ import annotations

from copy import copy
from pathlib import Path

from torch import nn
from ultralytics.cfg import cfg2dict
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT, LOGGER, RANK, YAML
from ultralytics.utils.torch_utils import unwrap_model

from yolo_qat.models.common import ImplicitA, ImplicitM
from yolo_qat.models.facts import original_yaml_task
from yolo_qat.models.loss import DEFAULT_HYP, YOLOv5DetLoss, YOLOv5SegLoss, check_loss_hyp, resolve_hyp
from yolo_qat.models.registry import is_original_yaml
from yolo_qat.models.yolo import DetectionModel, SegmentationModel

from .autoanchor import broadcast_anchors, check_anchors
from .ultralytics_compat import UltralyticsTrainerCompat
from .validate import validator_class

# hyp.scratch-low keys that Ultralytics' trainer and data pipeline read under the same name and meaning (its
# box / cls gains mean other losses: the YOLOv5 gains stay in models/loss.py). Ultralytics' defaults equal most
# of them; the ones that differ are the optimizer (auto -> SGD) and close_mosaic (yolov5 keeps mosaic to the end).
_SHARED_HYP = ("lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
               "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud",
               "fliplr", "mosaic", "mixup", "copy_paste")
TRAIN_DEFAULTS = {**{k: DEFAULT_HYP[k] for k in _SHARED_HYP}, "optimizer": "SGD", "close_mosaic": 0}


def loss_names(task: str) -> tuple[str, ...]:
    return YOLOv5SegLoss.item_names if task == "segment" else YOLOv5DetLoss.item_names


# ---------------------------------------------------------------------------------------------- training

def _user_defaults(cfg, overrides: dict) -> dict:
    """TRAIN_DEFAULTS for the keys the user left at Ultralytics' default (in ``cfg`` and ``overrides``)."""
    base = cfg2dict(cfg) if cfg is not None else {}
    return {k: v for k, v in TRAIN_DEFAULTS.items()
            if k not in overrides and base.get(k, DEFAULT_CFG_DICT[k]) == DEFAULT_CFG_DICT[k]}


def _implicit_without_decay(optimizer, model) -> None:
    """yolov7's ImplicitA / ImplicitM vectors train without weight decay, as its train.py groups them (decay would
    pull the multiplicative ImplicitM towards 0); Ultralytics' grouping puts them with the decayed weights."""
    implicit = {id(p) for m in unwrap_model(model).modules() if isinstance(m, (ImplicitA, ImplicitM))
                for p in m.parameters(recurse=False)}
    groups = {g.get("param_group"): g for g in optimizer.param_groups}
    if not implicit or "weight" not in groups or "bn" not in groups:
        return
    moved = [p for p in groups["weight"]["params"] if id(p) in implicit]
    groups["weight"]["params"] = [p for p in groups["weight"]["params"] if id(p) not in implicit]
    groups["bn"]["params"] = list(groups["bn"]["params"]) + moved


class OriginalTrainerMixin(UltralyticsTrainerCompat):
    """Put before Ultralytics' DetectionTrainer / SegmentationTrainer (see the two classes below)."""

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None):
        overrides = dict(overrides or {})
        # The YOLOv5 loss settings (unscaled gains, anchor_t, ...) are not Ultralytics keys (its box / cls mean
        # other losses): popped before its cfg check, kept on args for args.yaml and the DDP workers' overrides.
        loss_hyp = check_loss_hyp(overrides.pop("loss_hyp", None))
        if not overrides.get("resume"):  # a resumed run keeps its own settings
            overrides.update(_user_defaults(cfg, overrides))
        super().__init__(cfg, overrides, _callbacks)
        if self.resume:  # the model of last.pt carries them; the checkpoint's args say the same
            loss_hyp = check_loss_hyp(getattr(self.args, "loss_hyp", None)) or loss_hyp
        self.loss_hyp = loss_hyp
        if loss_hyp:
            self.args.loss_hyp = loss_hyp
            if RANK in {-1, 0}:
                YAML.save(self.save_dir / "args.yaml", vars(self.args))
        self.loss_names = loss_names(self.args.task)
        self.anchors_trained = True  # get_model() says otherwise for a model built from a yaml alone
        self.anchor_report: dict | None = None

    def get_model(self, cfg=None, weights=None, verbose=True):
        cfg = cfg if cfg is not None else self.args.model
        if not is_original_yaml(cfg):
            raise ValueError(f"{type(self).__name__} trains the original anchor-based YOLOv5/YOLOv7 models; "
                             f"'{cfg if isinstance(cfg, (str, Path)) else self.args.model}' is not an original-format "
                             f"model (no 'anchors'). Train Ultralytics models with Ultralytics' own trainers "
                             f"(ultralytics.models.yolo.detect.DetectionTrainer, ...).")
        task = original_yaml_task(cfg)
        if task != self.args.task:
            raise ValueError(f"the model is a {task} model (its head is "
                             f"{'Segment' if task == 'segment' else 'Detect/IDetect'}) but the trainer's task is "
                             f"'{self.args.task}': use the {task} trainer (engine.original.trainer_class('{task}'))")
        cls = SegmentationModel if task == "segment" else DetectionModel
        model = cls(cfg, ch=self.data.get("channels", 3), nc=self.data["nc"], verbose=verbose and RANK == -1)
        if weights is not None:
            model.load(weights)
            hyp = getattr(unwrap_model(weights) if isinstance(weights, nn.Module) else None, "hyp", None)
            if isinstance(hyp, dict):
                model.hyp = hyp  # the loss keys of the run that trained them (anchor_t, ...): models/loss.py
        self.anchors_trained = weights is not None
        return model

    def set_model_attributes(self):
        super().set_model_attributes()
        if self.loss_hyp:  # also for a quantized or resumed model that get_model() never built
            model = unwrap_model(self.model)
            model.loss_hyp = {**(getattr(model, "loss_hyp", None) or {}), **self.loss_hyp}
            model.criterion = None  # built again, lazily, with these settings
            LOGGER.info(f"YOLOv5 loss settings (before yolov5's scaling): {model.loss_hyp}")

    def get_validator(self):
        self.loss_names = loss_names(self.args.task)
        cls = validator_class(self.args.task, original=True)
        args = copy(self.args)
        vars(args).pop("loss_hyp", None)  # the validator checks its args against Ultralytics' cfg keys
        return cls(self.test_loader, save_dir=self.save_dir, args=args, _callbacks=self.callbacks)

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        if str(name).lower() == "auto":  # Ultralytics' pick by run length; the YOLOv5 recipe is SGD
            LOGGER.info("optimizer=auto: SGD for the original anchor-based model (the YOLOv5 recipe)")
            name = self.args.optimizer = "SGD"
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        _implicit_without_decay(optimizer, model)
        return optimizer

    def after_train_pipeline(self):
        super().after_train_pipeline()
        if self.anchor_report is None:  # once: an OOM retry rebuilds the pipeline
            self.anchor_report = self.check_anchors()

    def check_anchors(self) -> dict:
        """yolov5 train.py's AutoAnchor on the training labels: refit for a model built from a yaml, check only
        for trained weights (or a resumed run)."""
        model = unwrap_model(self.model)
        anchor_t = resolve_hyp(model)["anchor_t"]
        refit = not self.anchors_trained and not self.resume
        reason = ("the weights were trained with these anchors; train from the model yaml to refit them"
                  if not refit else "")
        report = check_anchors(model, self.train_loader.dataset.labels, self.args.imgsz, anchor_t=anchor_t,
                               refit=refit, seed=self.args.seed, reason=reason)
        if report["replaced"] and self.world_size > 1:
            broadcast_anchors(model)
        return report


class OriginalDetectionTrainer(OriginalTrainerMixin, DetectionTrainer):
    pass


class OriginalSegmentationTrainer(OriginalTrainerMixin, SegmentationTrainer):
    pass


def trainer_class(task: str, original: bool = True):
    """The FP trainer class for a task: the original-model trainers above, or Ultralytics' own."""
    if task not in {"detect", "segment"}:
        raise ValueError(f"task {task!r} is not supported: allowed values are 'detect', 'segment'")
    if original:
        return OriginalSegmentationTrainer if task == "segment" else OriginalDetectionTrainer
    return SegmentationTrainer if task == "segment" else DetectionTrainer
