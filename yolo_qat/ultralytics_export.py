"""Ultralytics' ``model.export(format="onnx")`` of a quantized model, in the project's export forms.

Ultralytics' exporter would trace a QuantConv2d in its training form (quant/qconv.py refuses that), so
``export_quantized``, an ``on_export_start`` callback, first swaps in the export form of each quantized layer for
the model's deploy target (deploy/): the fake-quant (sim) or integer (ort, npu, tensorrt) Q/DQ graph. A ``YOLO``
object copies Ultralytics' default callbacks when it is made, so the callback must be there before that, whatever
the order in which the user imported Ultralytics and yolo_qat: ``install()`` adds it at once when Ultralytics'
callbacks module is loaded, and otherwise as soon as it is, without importing Ultralytics for a user of
yolo_qat.quant alone.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

CALLBACKS_MODULE = "ultralytics.utils.callbacks.base"


def export_quantized(exporter) -> None:
    """``on_export_start``: the fused, export-mode copy of a quantized model that Ultralytics' exporter is about to
    trace gets the project's export form of each quantized layer for its target; ValueError for a format other
    than ONNX. A float model is left to Ultralytics."""
    # deferred: this module is imported with the yolo_qat package, the exporters only when a model is exported
    from yolo_qat.deploy.onnx_qdq import export_target
    from yolo_qat.deploy.ort_modules import swap_for_ort
    from yolo_qat.deploy.qdq_conv import swap_quant_convs
    from yolo_qat.quant import is_quantized

    model = exporter.model
    if not is_quantized(model):
        return
    if exporter.args.format != "onnx":
        raise ValueError(f"format={exporter.args.format!r}: a quantized model exports to ONNX only (format='onnx', "
                         f"or yolo-qat's export for the integer targets and their checks)")
    target = export_target(model)
    if target.integer:
        swap_for_ort(model, target)
    else:
        swap_quant_convs(model)


def add_export_callback(callbacks: dict) -> None:
    """``export_quantized`` in an Ultralytics callbacks dict (a trainer's, a model's, or the defaults), once."""
    if export_quantized not in callbacks.setdefault("on_export_start", []):
        callbacks["on_export_start"].append(export_quantized)


class _OnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when Ultralytics' callbacks module is imported, wraps its loader so the callback is
    added right after the module runs, then leaves sys.meta_path."""

    def find_spec(self, name, path=None, target=None):
        if name != CALLBACKS_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                add_export_callback(module.default_callbacks)

            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    module = sys.modules.get(CALLBACKS_MODULE)
    if module is not None:
        add_export_callback(module.default_callbacks)
    elif not any(isinstance(f, _OnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnImport())
