"""YOLO models and the YOLO-specific side of quantizing them (importing registers the policy)."""
from pathlib import Path

from .policy import (QuantDetectionModel, QuantSegmentationModel, fold_bn_into_quant_convs, make_fuse_quant_aware,
                     yolo_roles)

MODELS_DIR = Path(__file__).resolve().parent

__all__ = ["QuantDetectionModel", "QuantSegmentationModel", "fold_bn_into_quant_convs", "make_fuse_quant_aware",
           "yolo_roles", "MODELS_DIR"]
