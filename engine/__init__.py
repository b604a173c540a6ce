"""Glue between the QAT machinery (quant/, models/) and the Ultralytics trainer."""
from .config import QATConfig
from .ema import QATModelEMA
from .trainer import QATDetectionTrainer, QATSegmentationTrainer, QATTrainerMixin, qat_trainer_class

__all__ = ["QATConfig", "QATModelEMA", "QATDetectionTrainer", "QATSegmentationTrainer", "QATTrainerMixin",
           "qat_trainer_class"]
