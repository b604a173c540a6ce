"""yolo-qat: low-bit quantization-aware training of YOLO detectors and segmenters, and integer deployment."""
import importlib as _importlib
from pathlib import Path as _Path

from yolo_qat import ultralytics_export

# In a clone the subpackages sit beside this folder, in the layout of a YOLO training repo (quant/, models/,
# data/, engine/, deploy/, configs/); an installed copy has them inside it. Either way they import as yolo_qat.*.
_CLONE = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "quant").is_dir() and (_CLONE / "quant" / "__init__.py").is_file():
    __path__.append(str(_CLONE))

ultralytics_export.install()  # Ultralytics' model.export() of a quantized model, whichever package is imported first

# The Python API. Resolved on first use (PEP 562): every subpackage import runs this file first, and the API
# pulls in Ultralytics and every stage, which `import yolo_qat.quant` alone must not.
_API = {"train_fp": "pipeline", "train_qat": "pipeline", "resume_qat": "pipeline", "correct_qc": "pipeline",
        "validate": "pipeline", "export": "pipeline", "resolve_source": "pipeline", "ModelSource": "pipeline",
        "TrainResult": "pipeline", "QCResult": "pipeline", "ExportResult": "pipeline", "quantize": "quantize",
        "recipe_of": "quantize", "PRESETS": "configs.presets", "preset": "configs.presets",
        "QATDetectionTrainer": "engine.trainer", "QATSegmentationTrainer": "engine.trainer"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'yolo_qat' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"yolo_qat.{_API[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
