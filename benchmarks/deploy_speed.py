"""onnxruntime CPU latency of the deployable files of one model, measured in one interleaved run.

The files, per image size:
- ``FP``: Ultralytics' own ONNX export of the float model (``YOLO(ckpt).export(format="onnx", simplify=False)``:
  nothing is installed or downloaded: onnxslim is only asked for with simplify);
- ``ORT PTQ``: onnxruntime's own static INT8 post-training quantization of that file (``quantize_static``, QDQ,
  u8 activations, s8 per-channel weights, MinMax over ``--calib-images`` training images of the
  embedded data; the head's decoding after its final convs stays float, as in Ultralytics' INT8 ONNX export:
  quantized, one u8 scale would span box pixels and class scores and round every score to 0): what a user gets
  from onnxruntime in one call;
- ours, ``W8A8`` / ``W4A8`` / ``W4A4`` (first and last layers 8 bit, per-channel weights, calibrated on the same
  images), through ``deploy.export_onnx(..., target=T)`` for every target T the function accepts (read from its
  signature and ``quant.targets`` at run time; the model is quantized for T when the recipe has a target).

All sessions (file x size x threads) are created first; then ``--repeats`` rounds, each running every session
once in turn (round-robin, so machine noise hits all alike), after ``--warmup`` runs each. Reported: the median
latency, the speed relative to FP (FP median / median: > 1 is faster), the file size, and the integer convs in
onnxruntime's optimised graph (``integer_conv_count``: QLinearConv, ConvInteger, ... after
``SessionOptions.optimized_model_filepath``) against the quantized convs of the file (Conv nodes whose weight
comes from a DequantizeLinear), and the QuantizeLinear + DequantizeLinear nodes left in the optimised graph
(each one float work around an op that did not become an integer kernel). Sessions are default onnxruntime CPU sessions (graph optimisation ALL, no
``session.x64quantprecision``) with ``intra_op_num_threads`` = threads, spinning off unless ``--spin`` (on a
shared machine a spinning thread steals the other's core).

    python benchmarks/deploy_speed.py --imgsz 320 640 --threads 1 2 --repeats 20
    python benchmarks/deploy_speed.py --weights fp.pt --bits W4A8 --targets ort

Writes ``table.md``, ``results.json`` and ``speed.png`` (bars: speed vs FP per file, grouped by size and
threads) under ``<project>/<name>/`` (runs/deploy_speed/exp by default), the ONNX files under ``files/``.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "deploy_speed.py"
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
# onnxruntime's integer convolution kernels (ONNX domain and com.microsoft contrib / NHWC variants)
INTEGER_CONV_OPS = ("QLinearConv", "ConvInteger", "NhwcQLinearConv", "QLinearConvTranspose")


# ---------------------------------------------------------------------------------------------- graph counts

def optimized_graph(onnx_path: str | Path, out_path: str | Path | None = None):
    """The graph onnxruntime runs for ``onnx_path`` on the CPU (default session, optimisation level ALL), as an
    onnx.ModelProto (written to ``out_path``, else next to the file as ``<stem>.ort-opt.onnx``)."""
    import onnx
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    out_path = Path(out_path) if out_path else onnx_path.with_name(onnx_path.stem + ".ort-opt.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(out_path)
    opts.log_severity_level = 3  # not the warning that an NCHWc-optimised graph is specific to this CPU: it is read here
    opts.intra_op_num_threads = 1
    ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(out_path))


def op_histogram(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def integer_conv_count(onnx_path: str | Path) -> int:
    """Integer convolutions (QLinearConv, ConvInteger, ...) in onnxruntime's optimised CPU graph of the file."""
    h = op_histogram(optimized_graph(onnx_path))
    return sum(h[k] for k in INTEGER_CONV_OPS)


def quantized_conv_count(onnx_path: str | Path) -> tuple[int, int]:
    """(Conv nodes whose weight is the output of a DequantizeLinear, all Conv nodes) of the file as written."""
    import onnx

    m = onnx.load(str(onnx_path))
    dq = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    return sum(len(c.input) > 1 and c.input[1] in dq for c in convs), len(convs)


def graph_summary(onnx_path: str | Path) -> dict:
    """Integer convs and the op histogram after onnxruntime's optimisation, quantized convs before."""
    h = op_histogram(optimized_graph(onnx_path))
    q, total = quantized_conv_count(onnx_path)
    return {"integer_convs": sum(h[k] for k in INTEGER_CONV_OPS), "quantized_convs": q, "convs": total,
            "qdq_left": h["QuantizeLinear"] + h["DequantizeLinear"], "optimized_ops": dict(h.most_common())}


# ---------------------------------------------------------------------------------------------- the files

def build_fp(cfg: str, weights: str | None, nc: int):
    """(FP model in eval mode, a display name): a trained checkpoint, else ``cfg`` built with BN statistics from
    random images (a fresh model's (0, 1) statistics would make every activation ~0)."""
    import torch
    from torch import nn

    if weights:
        from yolo_qat.models.checkpoint import load_checkpoint

        m, _ = load_checkpoint(weights)
        return m.float().eval(), Path(weights).name
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    torch.manual_seed(0)
    m = (SegmentationModel if "seg" in cfg else DetectionModel)(cfg, nc=nc, verbose=False)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None
    m.train()
    with torch.no_grad():
        for s in range(2):
            m(torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(s)))
    return m.eval(), cfg


def calibration_images(n: int, imgsz: int, data: str | None = None) -> list:
    """``n`` training images of the dataset (default: the embedded one), letterboxed to ``imgsz``, as float
    tensors (1, 3, imgsz, imgsz) in [0, 1]."""
    import cv2
    import numpy as np
    import torch
    from ultralytics.data.augment import LetterBox

    from yolo_qat.engine.calib import resolve_data
    from yolo_qat.engine.data_download import check_dataset

    d = check_dataset(resolve_data(data))
    root = Path(d["train"] if isinstance(d["train"], str) else d["train"][0])
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"})[:n]
    if not files:
        raise FileNotFoundError(f"no images under {root}")
    lb = LetterBox((imgsz, imgsz), auto=False, scale_fill=False)
    out = []
    for f in files:
        im = lb(image=cv2.imread(str(f)))[..., ::-1].transpose(2, 0, 1)
        out.append(torch.from_numpy(np.ascontiguousarray(im)).float()[None] / 255)
    return out


def export_fp(model, path: Path, imgsz: int) -> Path:
    """Ultralytics' ONNX export of the float model at a static (1, 3, imgsz, imgsz) input."""
    from ultralytics import YOLO

    from yolo_qat.models.checkpoint import save_checkpoint

    ckpt = save_checkpoint(path.with_suffix(".pt"), model)
    f = YOLO(str(ckpt)).export(format="onnx", imgsz=imgsz, simplify=False, batch=1, dynamic=False, device="cpu",
                               verbose=False)
    ckpt.unlink()
    return Path(f)


def decode_nodes(onnx_path: str | Path) -> list[str]:
    """The nodes after the head's final convs (``*.2/Conv`` of cv2 / cv3 / cv4: box distribution, class and mask
    coefficient maps), i.e. DFL, box decoding, sigmoid and the output Concat. Quantized, output0 would share one
    u8 scale between box pixels and class scores, which rounds every score to 0 (mAP 0)."""
    import re

    import onnx

    g = onnx.load(str(onnx_path)).graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    heads = [n for n in g.node if n.op_type == "Conv" and re.search(r"\.2/Conv$", n.name)]
    seen, todo = set(), [o for n in heads for o in n.output]
    while todo:
        for c in consumers.get(todo.pop(), []):
            if c.name not in seen:
                seen.add(c.name)
                todo.extend(c.output)
    return sorted(seen)


def export_ptq(fp_path: Path, path: Path, images: list) -> Path:
    """onnxruntime's static INT8 PTQ of an FP ONNX: QDQ, u8 activations, s8 per-channel weights, MinMax; the head's
    decoding after its final convs stays float (``decode_nodes``), as Ultralytics' own INT8 ONNX export keeps it."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"images": x.numpy()} for x in images])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp_path), str(path), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=decode_nodes(fp_path))
    return path


# Targets whose file onnxruntime's CPU provider is meant to run (sim: the reference float graph). The npu and
# tensorrt files run there too, but in float convs (INT4 weights, s8 activations before SiLU): their runtimes are
# an NPU and TensorRT, so they are timed only when --targets names them.
ORT_CPU_TARGETS = ("sim", "ort")


def export_targets(requested: list[str] | None = None) -> list[str | None]:
    """The targets ``deploy.export_onnx`` accepts now ([None]: it has no ``target`` argument, today's export);
    by default those in ORT_CPU_TARGETS."""
    from yolo_qat import deploy

    if "target" not in inspect.signature(deploy.export_onnx).parameters:
        return [None]
    try:
        from yolo_qat.quant.targets import TARGET_NAMES
    except ImportError:
        TARGET_NAMES = ("sim",)
    names = list(TARGET_NAMES)
    if requested:
        bad = [t for t in requested if t not in names]
        if bad:
            raise ValueError(f"--targets {bad}: deploy.export_onnx accepts {names}")
        return [t for t in names if t in requested]
    return [t for t in names if t in ORT_CPU_TARGETS]


def quantized_for(fp, bits: str, target: str | None, images: list):
    """The FP model quantized (W/A bits, first and last layers 8 bit, per-channel weights) for ``target``, calibrated."""
    from dataclasses import fields

    from yolo_qat.quant import calibrate, quantize_model
    from yolo_qat.quant.recipe import QuantRecipe

    w, a = BITS[bits]
    recipe = {"w_bits": w, "a_bits": a, "first_last_bits": 8, "per_channel": True, "weight_init": "lsq"}
    if target is not None and "target" in {f.name for f in fields(QuantRecipe)}:
        recipe["target"] = target
    q = quantize_model(copy.deepcopy(fp), recipe).eval()
    calibrate(q, images, num_batches=len(images))
    return q


def export_ours(q, path: Path, imgsz: int, target: str | None) -> Path:
    import warnings

    from yolo_qat import deploy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=deploy.ExportWarning)
        kw = {} if target is None else {"target": target}
        return deploy.export_onnx(q, path, imgsz, **kw)


def build_files(opt, out: Path) -> list[dict]:
    """Export every file: [{"label", "kind", "imgsz", "path"}]."""
    fp, _ = build_fp(opt.cfg, opt.weights, opt.nc)
    files = []
    out.mkdir(parents=True, exist_ok=True)
    targets = export_targets(opt.targets)
    calib = calibration_images(opt.calib_images, min(opt.imgsz), opt.data)
    quantized = {}
    for bits in opt.bits:
        for t in targets:
            try:
                quantized[bits, t] = quantized_for(fp, bits, t, calib)
            except ValueError as e:  # e.g. W4A4 for a target whose runtime convolves 8-bit activations only
                print(f"deploy_speed: skipping {bits} for target {t}: {e}")
    for s in opt.imgsz:
        images = calibration_images(opt.calib_images, s, opt.data)
        fp_path = export_fp(fp, out / f"fp_{s}.onnx", s)
        files.append({"label": "FP", "kind": "fp", "imgsz": s, "path": str(fp_path)})
        files.append({"label": "ORT PTQ W8A8", "kind": "ptq", "imgsz": s,
                      "path": str(export_ptq(fp_path, out / f"ort_ptq_{s}.onnx", images))})
        for (bits, t), q in quantized.items():
            name = f"ours_{bits}" + (f"_{t}" if t else "")
            files.append({"label": f"ours {bits}" + (f" ({t})" if t else ""), "kind": "ours", "imgsz": s,
                          "target": t, "bits": bits, "path": str(export_ours(q, out / f"{name}_{s}.onnx", s, t))})
    files += extra_files(opt.extra, opt.imgsz)
    return files


def extra_files(specs: list[str], sizes: list[int]) -> list[dict]:
    """``LABEL=PATH`` (the label without ``=``) ONNX files made elsewhere (a trained checkpoint's export, another tool's INT8 file), timed
    beside the others at their own static input size, which must be one of ``sizes`` (its FP file is the baseline)."""
    import onnx

    files = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            raise ValueError(f"--extra {spec!r}: expected LABEL=PATH of an existing .onnx file")
        dims = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        size = dims[-1].dim_value
        if size not in sizes:
            raise ValueError(f"--extra {spec!r}: the file's input is {size} px, not one of --imgsz {sizes}: pass its "
                             f"size to --imgsz so that the FP file of that size is its baseline")
        files.append({"label": label, "kind": "extra", "imgsz": size, "path": str(Path(path).resolve())})
    return files


# ---------------------------------------------------------------------------------------------- timing

def session(path: str, threads: int, spin: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def time_interleaved(files: list[dict], threads: list[int], repeats: int, warmup: int, spin: bool) -> dict:
    """{(path, threads): [seconds per run]}, every session run once per round, rounds repeated."""
    import numpy as np

    runs = []
    for f in files:
        x = np.random.default_rng(0).random((1, 3, f["imgsz"], f["imgsz"]), dtype=np.float32)
        for t in threads:
            s = session(f["path"], t, spin)
            runs.append(((f["path"], t), s, {s.get_inputs()[0].name: x}))
    for _, s, feed in runs:
        for _ in range(warmup):
            s.run(None, feed)
    times = {k: [] for k, _, _ in runs}
    for r in range(repeats):
        order = runs[r % len(runs):] + runs[:r % len(runs)]  # a different session first each round
        for k, s, feed in order:
            t0 = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t0)
    return times


def measure(files: list[dict], threads: list[int], repeats: int, warmup: int, spin: bool) -> list[dict]:
    """One row per file and thread count: median ms, speed vs FP of that size and threads, size, conv counts."""
    times = time_interleaved(files, threads, repeats, warmup, spin)
    graphs = {f["path"]: graph_summary(f["path"]) for f in files}
    fp = {(f["imgsz"], t): statistics.median(times[f["path"], t]) for f in files if f["kind"] == "fp" for t in threads}
    rows = []
    for f in files:
        for t in threads:
            med = statistics.median(times[f["path"], t])
            g = graphs[f["path"]]
            q = statistics.quantiles(times[f["path"], t], n=4) if len(times[f["path"], t]) > 1 else [med] * 3
            rows.append({"file": f["label"], "kind": f["kind"], "imgsz": f["imgsz"], "threads": t,
                         "median_ms": 1e3 * med, "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2], "speed_vs_fp": fp[f["imgsz"], t] / med,
                         "size_mb": Path(f["path"]).stat().st_size / 2 ** 20, "integer_convs": g["integer_convs"],
                         "quantized_convs": g["quantized_convs"], "convs": g["convs"], "qdq_left": g["qdq_left"],
                         "runs": len(times[f["path"], t]),
                         "path": f["path"], "optimized_ops": g["optimized_ops"]})
    return rows


# ---------------------------------------------------------------------------------------------- report

def markdown_table(rows: list[dict]) -> str:
    """One row per file and image size; per thread count the median latency and the speed vs FP."""
    threads = sorted({r["threads"] for r in rows})
    head = ["file", "imgsz", "size MB", "integer convs (ORT) / quantized convs", "Q/DQ left (ORT)"]
    for t in threads:
        head += [f"{t} thr: ms", f"{t} thr: vs FP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["file"], r["imgsz"]) for r in rows))
    for name, s in sorted(keys, key=lambda k: (k[1], keys.index(k))):
        sel = {r["threads"]: r for r in rows if (r["file"], r["imgsz"]) == (name, s)}
        r0 = next(iter(sel.values()))
        cells = [name, str(s), f"{r0['size_mb']:.2f}", f"{r0['integer_convs']} / {r0['quantized_convs']}",
                 str(r0["qdq_left"])]
        for t in threads:
            r = sel.get(t)
            cells += [f"{r['median_ms']:.2f}", f"{r['speed_vs_fp']:.2f}x"] if r else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(dict.fromkeys((r["imgsz"], r["threads"]) for r in rows))
    names = list(dict.fromkeys(r["file"] for r in rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(names) / 3)), 4))
    for i, n in enumerate(names):
        ys = [next((r["speed_vs_fp"] for r in rows if r["file"] == n and (r["imgsz"], r["threads"]) == g), np.nan)
              for g in groups]
        ax.bar(np.arange(len(groups)) + i * width - 0.4 + width / 2, ys, width, label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(groups)), [f"{s} px, {t} thr" for s, t in groups])
    ax.set_ylabel("speed vs FP ONNX (FP ms / ms)")
    ax.set_title("onnxruntime CPU, batch 1, medians of interleaved runs")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def run(opt) -> dict:
    """Export, time, count and report; returns {"rows", "table", "dir"}."""
    import onnxruntime as ort

    from yolo_qat.engine.cli_common import output_dir

    out = output_dir(opt)
    out.mkdir(parents=True, exist_ok=True)
    files = build_files(opt, out / "files")
    rows = measure(files, opt.threads, opt.repeats, opt.warmup, opt.spin)
    header = (f"{opt.weights or opt.cfg}, onnxruntime {ort.__version__} CPUExecutionProvider on {cpu_name()} "
              f"({os.cpu_count()} cores), batch 1, {opt.repeats} interleaved rounds after {opt.warmup} warm-up runs, "
              f"medians; spinning {'on' if opt.spin else 'off'}; vs FP = FP median / median (> 1: faster)")
    table = markdown_table(rows)
    (out / "table.md").write_text(header + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    plot(rows, out / "speed.png")
    print(header + "\n\n" + table + f"\n\nwrote {out}/table.md, results.json, speed.png")
    return {"rows": rows, "table": table, "dir": out}


def build_parser() -> argparse.ArgumentParser:
    from yolo_qat.engine.cli_common import add_shared

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared(p, PROG, project="runs/deploy_speed", weights_required=False, device_now=False,
               weights_help="a trained FP checkpoint (default: --cfg built from its yaml; speed needs no training)")
    p.set_defaults(imgsz=[320, 640])
    for a in p._actions:
        if a.dest == "imgsz":
            a.nargs, a.help = "+", "image sizes (default: 320 640)"
        elif a.dest == "data":
            a.help = "dataset yaml of the calibration images (default: the embedded offline dataset)"
    p.add_argument("--cfg", default="yolov5nu.yaml", help="model yaml when no --weights")
    p.add_argument("--nc", type=int, default=80, help="classes of the --cfg model")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts")
    p.add_argument("--repeats", type=int, default=20, help="interleaved rounds (each runs every session once)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs of each session first")
    p.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS), help="our quantized files")
    p.add_argument("--targets", nargs="+", default=None, help="deploy targets (default: all deploy.export_onnx takes)")
    p.add_argument("--calib-images", type=int, default=8, help="calibration images (ours and the ORT PTQ)")
    p.add_argument("--extra", nargs="*", default=[], metavar="LABEL=PATH",
                   help="more ONNX files to time beside the others (e.g. a trained checkpoint's export, Ultralytics' "
                        "INT8 file), each at its own static size")
    p.add_argument("--spin", action=argparse.BooleanOptionalAction, default=False,
                   help="let onnxruntime's threads spin while waiting (its default; off: a shared machine)")
    return p


def main(argv=None) -> int:
    from yolo_qat.engine.cli_common import input_error

    from yolo_qat.engine.data_download import allowing_downloads

    opt = build_parser().parse_args(argv)
    try:
        with allowing_downloads(opt.download):
            run(opt)
    except (ValueError, FileNotFoundError) as e:
        return input_error(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
