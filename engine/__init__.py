"""Glue between the QAT machinery (quant/, models/) and the Ultralytics trainer."""
from . import data_download  # noqa: F401  (a dataset yaml's download: runs only when asked for, in every caller)
from .config import QATConfig
from .ema import QATModelEMA
from .original import OriginalDetectionTrainer, OriginalSegmentationTrainer
from .trainer import (QATDetectionTrainer, QATOriginalDetectionTrainer, QATOriginalSegmentationTrainer,
                      QATSegmentationTrainer, QATTrainerMixin, qat_trainer_class)

__all__ = ["QATConfig", "QATModelEMA", "QATDetectionTrainer", "QATSegmentationTrainer", "QATTrainerMixin",
           "qat_trainer_class", "OriginalDetectionTrainer", "OriginalSegmentationTrainer",
           "QATOriginalDetectionTrainer", "QATOriginalSegmentationTrainer"]
