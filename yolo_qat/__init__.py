"""yolo-qat: low-bit quantization-aware training of YOLO detectors and segmenters, and integer deployment."""
from pathlib import Path as _Path

# In a clone the subpackages sit beside this folder, in the layout of a YOLO training repo (quant/, models/,
# data/, engine/, deploy/, configs/); an installed copy has them inside it. Either way they import as yolo_qat.*.
_CLONE = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "quant").is_dir() and (_CLONE / "quant" / "__init__.py").is_file():
    __path__.append(str(_CLONE))
