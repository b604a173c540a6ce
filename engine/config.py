"""QATConfig: the QAT settings that Ultralytics' own cfg does not know, as plain data; QCConfig: the
settings of QC (engine/qc.py). Each field carries its default and help text: the command lines and the
--config yaml keys are generated from them (engine/settings.py).

The QAT settings travel inside the trainer's overrides under the single key ``qat`` (a dict): the trainer pops
it before Ultralytics validates the overrides, then puts it back on ``trainer.args.qat`` so that it
is written to args.yaml, to every checkpoint's ``train_args`` (resume reads it back from there) and
to the pickled args Ultralytics' DDP launcher hands to each worker.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from yolo_qat.quant import QuantRecipe
from yolo_qat.quant.recipe import dataclass_from
from yolo_qat.quant.step_optim import STEP_UPDATES

METHODS = ("lsq", "dampen", "freeze")


def setting(default, help: str, **metadata):
    """A dataclass field with its help text: the command lines and --config keys are generated from these
    (engine/settings.py). Mutable defaults are copied per instance."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class QATConfig:
    recipe: dict = field(default_factory=lambda: QuantRecipe().to_dict(),
                         metadata={"help": "bits and granularity (QuantRecipe), set by its own flags", "fields": QuantRecipe})
    method: str = setting("lsq", f"QAT method: one of {METHODS} (LSQ, oscillation dampening, iterative freezing)")
    ema_decay: float = setting(0.9999, "max EMA decay of weights, scales and BN buffers; 0 disables the EMA (the raw "
                                       "LSQ model is validated and saved)")
    ema_tau: float = setting(2000.0, "EMA warm-up in optimizer steps: a = decay * (1 - exp(-t / tau))")
    scale_lr: float = setting(1e-4, "lr of the quantizers' step sizes and LSQ+ offsets (Adam, no weight decay)")
    step_update: str = setting("relative", f"how Adam moves the step sizes, one of {STEP_UPDATES}: relative (Adam on "
                                           f"r*log(s/r), r the 4-bit per-tensor step of the same range: the paper's "
                                           f"update for per-tensor steps of <= 4 bits, and 8-bit / per-channel steps "
                                           f"that cannot collapse to the floor; quant/step_optim.py) or absolute "
                                           f"(plain Adam on s)")
    dampen_lambda: float = setting(1e-2, "final oscillation-dampening strength (method dampen)")
    freeze_th_start: float = setting(0.04, "freezing threshold at the start of its cosine (method freeze)")
    freeze_th_end: float = setting(0.01, "freezing threshold at the end of its cosine (method freeze)")
    freeze_max_bits: int = setting(8, "method freeze freezes the weights of layers with at most this many bits: 8 "
                                      "(default) every layer; 4 leaves the 8-bit stem and head alone, whose finer grid "
                                      "makes most of their weights count as oscillating")
    schedule_start: float = setting(0.25, "dampening / freezing are off for this share of training, in [0, 1)")
    osc_momentum: float = setting(0.01, "m of the oscillation frequency f <- m * osc + (1 - m) * f")
    osc_threshold: float = setting(0.01, "frequency above which a weight counts as oscillating in the reports")
    calib_batches: int = setting(8, "batches that initialise the activation quantizers")
    bn_reestimate: bool = setting(False, "recompute BN statistics with the quantized forward after QAT "
                                         "(weights/best_bn.pt)")
    bn_batches: int = setting(50, "batches of the BN re-estimation")
    recompute_input: bool = setting(False, "recompute each conv input's fake quantization in the backward: ~FP "
                                           "peak memory, slower steps")
    distill: bool = setting(False, "distil from the full-precision teacher: its class probabilities, box "
                                   "distributions (or boxes and objectness) and masks (engine/distill.py)")
    teacher: str | None = setting(None, "the teacher's FP checkpoint (default: the FP checkpoint QAT starts from)")
    distill_weight: float = setting(1.0, "weight of the distillation term against the detection loss (how 1 was "
                                         "chosen: docs/training.md)")

    def __post_init__(self):
        self.recipe = QuantRecipe.from_any(self.recipe).to_dict()  # raises ValueError on bad bits
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is invalid: allowed values are {METHODS}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} is invalid: allowed values are in [0, 1)")
        if self.ema_tau <= 0:
            raise ValueError(f"ema_tau={self.ema_tau!r} is invalid: allowed values are > 0 (optimizer steps)")
        if self.scale_lr < 0:
            raise ValueError(f"scale_lr={self.scale_lr!r} is invalid: allowed values are >= 0")
        if self.step_update not in STEP_UPDATES:
            raise ValueError(f"step_update={self.step_update!r} is invalid: allowed values are {STEP_UPDATES}")
        if not 0.0 <= self.schedule_start < 1.0:
            raise ValueError(f"schedule_start={self.schedule_start!r} is invalid: allowed values are in [0, 1)")
        if not 2 <= self.freeze_max_bits <= 8:
            raise ValueError(f"freeze_max_bits={self.freeze_max_bits!r} is invalid: allowed values are 2..8 (bits)")
        if self.calib_batches < 1:
            raise ValueError(f"calib_batches={self.calib_batches!r} is invalid: allowed values are >= 1")

    @classmethod
    def from_any(cls, cfg: "QATConfig | dict | None") -> "QATConfig":
        return dataclass_from(cls, cfg, "QAT config")

    def to_dict(self) -> dict:
        return asdict(self)


GRANULARITIES = ("channel", "tensor")


@dataclass
class QCConfig:
    """The settings of ``engine.qc.run_qc``, one field per keyword argument of the same name and default
    (``run_qc(model, data, **asdict(cfg), save_dir=...)``); correct_qc.py's flags are generated from it."""

    calib_images: int | None = setting(None, "calibration subset: this many training images (default: all)")
    calib_fraction: float | None = setting(None, "calibration subset as a share of the training images, in (0, 1]")
    epochs: int = setting(1, "passes over the calibration subset")
    steps: int | None = setting(None, "budget in optimizer steps instead of --epochs; 0: no QC training (the "
                                      "corrections of a qc_unfolded.pt are only folded)")
    lr: float = setting(1e-4, "lr of the corrections (Adam)")
    granularity: str = setting("channel", f"corrections per output channel or per tensor: one of {GRANULARITIES}")
    scale: bool = setting(True, "train the multiplicative correction (gamma)")
    shift: bool = setting(True, "train the additive correction (beta)")
    imgsz: int = setting(640, "image size")
    batch: int = setting(16, "images per batch")
    bn_reestimate: bool = setting(False, "re-estimate the BN statistics first (Nagel et al.)")
    bn_batches: int = setting(50, "batches of the BN re-estimation")
    seed: int = setting(0, "chooses the calibration subset and the batch order")
    device: str = setting("cpu", "device to run on")
    augment: bool = setting(False, "train on augmented images (default: letterboxed only, as in validation)")
    measure_loss: bool = setting(True, "measure the calibration loss before and after (one more pass each)")
    teacher: str | None = setting(None, "FP checkpoint whose outputs the QC loss also distils (engine/distill.py)")
    distill_weight: float = setting(QATConfig.distill_weight, "weight of the distillation term (with --teacher)")
    source: str | None = setting(None, "folder of unlabelled images to calibrate on instead of the dataset's training "
                                       "split (needs --teacher: the loss is then the distillation term alone)")

    def __post_init__(self):
        if self.calib_images is not None and self.calib_fraction is not None:
            raise ValueError("calib_images and calib_fraction both set: give one of them (or neither: all images)")
        if self.calib_images is not None and self.calib_images < 1:
            raise ValueError(f"calib_images={self.calib_images!r} is invalid: allowed values are >= 1")
        if self.calib_fraction is not None and not 0 < self.calib_fraction <= 1:
            raise ValueError(f"calib_fraction={self.calib_fraction!r} is invalid: allowed values are in (0, 1]")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} is invalid: allowed values are {GRANULARITIES}")
        for name in ("imgsz", "batch", "bn_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed values are >= 1")
        for name in ("epochs", "steps"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed values are >= 0")
        if self.lr < 0:
            raise ValueError(f"lr={self.lr!r} is invalid: allowed values are >= 0")

    def to_dict(self) -> dict:
        return asdict(self)
