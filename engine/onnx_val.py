"""Validation of exported ONNX files, run by onnxruntime on the CPU (``val.py --weights model.onnx``).

Ultralytics' validator runs the file through AutoBackend, which reads the metadata ``deploy/onnx_qdq.py``
(and Ultralytics' own exporter) writes: task, stride, names, the static ``batch`` and ``imgsz`` (short last
batches are zero-padded, square letterboxed images, no rect batches: the graph has one input shape). Two
changes to that path, both here:

- the session is ``deploy.verify.ort_session`` (CPUExecutionProvider, the project's session options) instead
  of AutoBackend's own, so validation runs the graph as the export check does;
- the original anchor-based YOLOv5 / YOLOv7 layout (output0 (B, N, 5+nc[+nm])) goes through the project's
  anchor-based validators (``engine/validate.py``), whose postprocess turns it into Ultralytics' layout.

The layout is told by the output shapes, with nc from the metadata names: Ultralytics' (B, 4+nc[+nm], N)
or the original (B, N, 5+nc[+nm]).
"""
from __future__ import annotations

import ast
import contextlib
from pathlib import Path
from unittest import mock

import onnx
import torch
from ultralytics.nn.autobackend import AutoBackend
from ultralytics.nn.backends.onnx import ONNXBackend

from yolo_qat.deploy.onnx_files import check_onnx_file
from yolo_qat.deploy.verify import ort_session


def is_onnx(weights) -> bool:
    return isinstance(weights, (str, Path)) and str(weights).lower().endswith(".onnx")


def onnx_info(path: str | Path) -> dict:
    """What validation needs from an exported file, without running it: ``task``, ``batch``, ``imgsz`` (h, w),
    ``names``, ``original`` (the anchor-based output layout), ``dynamic`` and the output shapes. ValueError (one
    paragraph) for a file that is not a YOLO detection / segmentation export."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file '{path}' does not exist")
    check_onnx_file(path)  # external data outside the file's folder: refused before anything reads it
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # truncated / not a protobuf
        raise ValueError(f"'{path}' is not a readable ONNX model ({type(e).__name__}: {e})") from None
    meta = {p.key: p.value for p in m.metadata_props}
    shapes = [[d.dim_value if d.HasField("dim_value") else d.dim_param for d in o.type.tensor_type.shape.dim]
              for o in m.graph.output]
    ishape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]
    need = [k for k in ("names", "stride") if k not in meta]
    if need:
        raise ValueError(f"'{path}' has no YOLO export metadata ({', '.join(need)} missing): export it with "
                         f"export.py or Ultralytics' exporter, which record the classes, stride and input shape")
    names = ast.literal_eval(meta["names"])
    nc = len(names)
    dynamic = any(isinstance(d, str) or d == 0 for d in ishape)
    nm = shapes[1][1] if len(shapes) > 1 and len(shapes[1]) == 4 else 0
    task = meta.get("task") or ("segment" if nm else "detect")
    if task not in {"detect", "segment"}:
        raise ValueError(f"'{path}' is a {task} model: val.py scores detection and segmentation models")
    out0 = shapes[0]
    if len(out0) == 3 and out0[1] == 4 + nc + nm:
        original = False
    elif len(out0) == 3 and out0[2] == 5 + nc + nm:
        original = True
    else:
        raise ValueError(f"'{path}': output0 has shape {out0}, neither Ultralytics' (batch, 4+nc{'+nm' if nm else ''}, "
                         f"anchors) nor the original YOLOv5/YOLOv7 (batch, anchors, 5+nc{'+nm' if nm else ''}) with "
                         f"nc={nc} (metadata names){f', nm={nm}' if nm else ''}")
    imgsz = ast.literal_eval(meta["imgsz"]) if "imgsz" in meta else list(ishape[2:])
    imgsz = [int(imgsz), int(imgsz)] if isinstance(imgsz, int) else [int(v) for v in imgsz]
    batch = int(meta["batch"]) if "batch" in meta else (ishape[0] if isinstance(ishape[0], int) else 1)
    return {"task": task, "batch": batch, "imgsz": imgsz, "names": names, "original": original,
            "dynamic": dynamic, "outputs": shapes, "input": ishape, "metadata": meta}


def shape_notes(info: dict, imgsz: int | None, batch: int | None) -> str | None:
    """One paragraph when the requested --imgsz / --batch contradict the file's static input shape (which is used),
    else None."""
    if info["dynamic"]:
        return None
    clash = []
    if imgsz is not None and [imgsz, imgsz] != list(info["imgsz"]):
        clash.append(f"--imgsz {imgsz}")
    if batch is not None and batch != info["batch"]:
        clash.append(f"--batch {batch}")
    if not clash:
        return None
    h, w = info["imgsz"]
    return (f"{' and '.join(clash)} ignored: the ONNX file has a static input shape ({info['batch']}, 3, {h}, {w}) "
            f"and is validated at it (batch {info['batch']}, images letterboxed to {h}x{w}; a short last batch is "
            f"zero-padded). To validate at another size or batch, export again with --imgsz / --batch.")


@contextlib.contextmanager
def project_ort_backend():
    """Within the block, AutoBackend opens .onnx files with ``deploy.verify.ort_session`` on the CPU."""
    class ProjectONNXBackend(ONNXBackend):
        def load_model(self, weight):
            self.device = torch.device("cpu")
            self.apply_metadata(self.read_metadata(weight))
            self.session = ort_session(weight)
            self.output_names = [x.name for x in self.session.get_outputs()]
            self.dynamic = isinstance(self.session.get_outputs()[0].shape[0], str)
            self.fp16 = "float16" in self.session.get_inputs()[0].type
            self.use_io_binding = False

    with mock.patch.dict(AutoBackend._BACKEND_MAP, {"onnx": ProjectONNXBackend}):
        yield
