"""Reading an ONNX file someone hands us: its external data must lie in the file's own folder.

An ONNX tensor may keep its bytes in another file (``external_data``: ``location``, relative to the model's folder).
A location that is absolute or climbs out of that folder (``../``) would make onnx / onnxruntime read any file the
user can read into the model, and ends in a traceback today; such a file is refused with one paragraph before
either loads it. Checked from the protobuf alone (``load_external_data=False``).
"""
from __future__ import annotations

from pathlib import Path

import onnx


def _tensors(graph: onnx.GraphProto):
    """Every tensor of a graph that can hold data: initializers and constant attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def outside_location(model: onnx.ModelProto, folder: Path) -> tuple[str, str] | None:
    """(tensor name, location) of the first tensor whose external data lies outside ``folder``, or None."""
    root = folder.resolve()
    for t in _tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        p = Path(loc)
        if p.is_absolute() or not (root / p).resolve().is_relative_to(root):
            return t.name, loc
    return None


def check_onnx_file(path: str | Path) -> None:
    """ValueError (one paragraph) for an ONNX file whose external data points outside its folder."""
    path = Path(path)
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # truncated / not a protobuf: reported by the caller's own load, in its words
        raise ValueError(f"'{path}' is not a readable ONNX model ({type(e).__name__}: {e})") from None
    bad = outside_location(m, path.parent)
    if bad is not None:
        raise ValueError(f"refused to read '{path}': its tensor '{bad[0]}' keeps its data in '{bad[1]}', outside the "
                         f"file's folder '{path.parent}'. ONNX external data is read relative to the model's folder, "
                         f"so a location that is absolute or climbs out of it (../) would read another file of this "
                         f"machine into the model; nothing was read. Keep the external data files beside the .onnx "
                         f"(onnx.save_model(..., save_as_external_data=True, location='<name>.data')) and pass that "
                         f"copy.")
