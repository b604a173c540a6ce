"""Deployable artifacts of quantized YOLO models: ONNX with QuantizeLinear/DequantizeLinear, and a
compact checkpoint of bit-packed integer weights."""
from .onnx_qdq import ExportWarning, NothingQuantizedError, export_onnx, prepare_export_model
from .packed import load_packed, save_packed

__all__ = ["export_onnx", "prepare_export_model", "save_packed", "load_packed", "ExportWarning",
           "NothingQuantizedError"]
