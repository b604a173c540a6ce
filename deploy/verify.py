"""Check an exported ONNX file against the PyTorch fake-quant model it came from, in onnxruntime."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from yolo_qat.models.yolo import Detect as AnchorDetect
from yolo_qat.deploy.ort_modules import encoded_split_source
from yolo_qat.quant import LSQQuantizer
from yolo_qat.quant.act import FixedQuantizer
from yolo_qat.quant.targets import model_target

from .onnx_files import check_onnx_file


def ort_session(model_onnx: onnx.ModelProto | str | Path):
    import onnxruntime as ort  # loaded only when an ONNX file is run: training and validation never need it

    if not isinstance(model_onnx, onnx.ModelProto):
        check_onnx_file(model_onnx)  # external data outside the file's folder: refused before anything reads it
    proto = model_onnx if isinstance(model_onnx, onnx.ModelProto) else onnx.load(str(model_onnx))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2  # shared CPUs
    # x86 CPUs without VNNI (SSE4.1 / AVX2 / AVX-512F) compute U8S8 integer convs / matmuls with pairwise
    # sums saturated to int16 (vpmaddubsw): an integer kernel would then score another model than the file's.
    # This option (onnxruntime_session_options_config_keys.h, kOrtSessionOptionsAvx2PrecisionMode; read in
    # graph_transformer_utils.cc where MlasPlatformU8S8Overflow(), i.e. on x86 with AVX2, VNNI or not) makes
    # ORT rewrite s8 weights to u8 and run the exact U8U8 kernels (Avx2WeightS8ToU8Transformer); compiled
    # out on Arm. Verification and validation get the file's exact arithmetic on every x86 CPU, at some speed;
    # benchmarks/deploy_speed.py measures without it (a user's default session).
    # onnxruntime 1.32 bug: with the option, a per-axis DequantizeLinear of int8 weights that has no zero-point
    # input gets a scalar u8 zero point, and the run fails ("x_zero_point must be null or 1D tensor with size
    # C"). Such graphs (the 'sim' export: float convs, no integer kernel to protect) are run without it. The
    # 'ort' export's weight DequantizeLinear have no zero point either, but all fuse into QLinearConv, and it
    # loads and runs with the option (an explicit int8 zero point there made the session fail to load); so do
    # the 'npu' export's (its INT4 weights stay float convs: the option leaves INT4 alone). The 'tensorrt'
    # export runs in float convs here (no Q after a conv, which QLinearConv needs): nothing to saturate.
    meta = {m.key: m.value for m in proto.metadata_props}
    inits = {t.name: t for t in proto.graph.initializer}
    per_axis_without_zp = meta.get("quant_target") not in ("ort", "npu") and any(
        n.op_type == "DequantizeLinear" and len(n.input) < 3 and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in proto.graph.node)
    if not per_axis_without_zp:
        opts.add_session_config_entry("session.x64quantprecision", "1")
    data = proto.SerializeToString() if isinstance(model_onnx, onnx.ModelProto) else str(model_onnx)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=ort_disabled_optimizers(meta.get("quant_target")))


def ort_disabled_optimizers(target: str | None) -> list[str]:
    """onnxruntime (1.32) transformers to switch off for a file of ``target``. A 'tensorrt' file has signed
    (s8, zero point 0) activations: on x86 QDQS8ToU8Transformer rewrites them to u8 while
    QDQPropagationTransformer copies a Q past each SPPF MaxPool with an INT8 output type, and the session fails
    to load ("output_dtype INT8 does not match y_zero_point type UINT8"). Without the rewrite it loads and
    computes the same values (s8 grids are exact either way). And WeightBiasQuantization, which gives a float
    layer between Q/DQ (Proto's ConvTranspose) int8 weights of onnxruntime's choosing: TensorRT runs that
    layer in float, as the model does (with it, segmentation codes after the upsampling moved by 0.06 step)."""
    return ["QDQS8ToU8Transformer", "WeightBiasQuantization"] if target == "tensorrt" else []


def run_onnx(path: str | Path, x: torch.Tensor) -> list[np.ndarray]:
    return ort_session(path).run(None, {"images": x.numpy()})


def reference_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The eval-mode outputs the ONNX graph reproduces: Detect -> [y], Segment -> [y, protos]; for the
    original anchor-based heads those of their export mode, [pred] / [pred, protos]."""
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
    if isinstance(head, AnchorDetect):
        export = head.export
        head.export = True
        try:
            with torch.no_grad():
                return list(model.eval()(x))
        finally:
            head.export = export
    with torch.no_grad():
        y = model.eval()(x)[0]
    return [y] if isinstance(y, torch.Tensor) else list(y)


def _with_code_outputs(path) -> tuple[onnx.ModelProto, list[str]]:
    """The graph with every activation code exposed: each QuantizeLinear's output, or the integer Clip's
    that follows it (a sub-8-bit grid in its 8-bit container)."""
    check_onnx_file(path)
    m = onnx.load(str(path))
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names = []
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            c = consumers.get(n.output[0], [])
            names.append(c[0].output[0] if len(c) == 1 and c[0].op_type == "Clip" else n.output[0])
    for n in names:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m, names


def fake_quant_codes(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per activation quantizer, in call order (= ONNX QuantizeLinear order): the codes the fake-quant
    forward actually used, and the unrounded value in float64 (to tell ties). Activation quantizers are
    the conv inputs' and, for deploy targets that quantize more (quant/act.py), the conv outputs' and the
    sigmoid's; codes are on the container's grid (an integer zero point included).

    The codes are read back from the quantizer's output, not recomputed with ``codes()``: whichever kernel
    ran (fused CPU, reference, CUDA) is what is compared, so a tie that kernel decided its own way shows up
    at the layer where it happened.
    """
    codes, z = [], []

    def lsq_hook(q, args, y):
        x = args[0].float()
        b = q.effective_offset(grad=False)
        b = torch.zeros(1) if b is None else b.double()
        s = q.scale.double()
        codes.append(((y.double() - b) / s).round().float())
        z.append((x.double() - b) / s)

    def fixed_hook(q, args, y):
        codes.append((y.double() / q.step).round().float())
        z.append(args[0].double() / q.step)

    def view_hook(conv, args):  # a slice of an encoded tensor: the export repeats its encoding before the conv
        lsq_hook(conv.input_source, args, args[0])

    def split_hook(c2f, q, y):  # ... or right after a C2f's split, on both halves (ort_modules.encoded_split_source)
        for t in y.split((c2f.c, c2f.c), 1):
            lsq_hook(q, (t,), t)

    splits = {m: encoded_split_source(m) for m in model.modules()}
    splits = {m: q for m, q in splits.items() if q is not None and q.enabled}
    hooks = [m.register_forward_hook(lsq_hook) for m in model.modules()
             if isinstance(m, LSQQuantizer) and m.is_activation and m.enabled]
    hooks += [m.cv1.register_forward_hook(lambda _, a, y, m=m, q=q: split_hook(m, q, y)) for m, q in splits.items()]
    split_ids = {id(q) for q in splits.values()}
    hooks += [m.register_forward_pre_hook(view_hook) for m in model.modules()
              if getattr(m, "input_is_view", False) and m.input_source is not None and id(m.input_source) not in split_ids]
    hooks += [m.register_forward_hook(fixed_hook) for m in model.modules() if isinstance(m, FixedQuantizer) and m.enabled]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return codes, z


def deployed_form(model: nn.Module) -> nn.Module:
    """The model as its export computes it: for targets with an int32 bias (quant/targets.py), a fused copy,
    whose eval forward rounds each bias to the accumulator grid as the file does (BN folded first); otherwise the
    model, without the unused branch of an end-to-end head."""
    if model_target(model).int32_bias and hasattr(model, "fuse"):
        return copy.deepcopy(model).fuse(verbose=False)
    if not any(getattr(m, "one2one_cv2", None) is not None for m in model.modules()):
        return model
    # An end-to-end head (YOLO26) computes both branches in eval; the export is fused, which drops the unused one,
    # so the reference drops it too (its quantizers are not in the graph).
    model = copy.deepcopy(model)
    for m in model.modules():
        if getattr(m, "one2one_cv2", None) is not None and hasattr(m, "fuse"):
            m.fuse()
    return model


def compare_onnxruntime(model: nn.Module, path: str | Path, x: torch.Tensor) -> dict:
    """onnxruntime vs the PyTorch fake-quant model on ``x`` (batch as exported; exact offset mode).

    Returns max_abs (over all outputs), max_ref (largest |reference|), per_output diffs, and the
    activation codes (QuantizeLinear outputs) that differ from the fake-quant model's:
    code_flips / codes, first_flip_layer (graph order) and first_flip_tie_distance, the largest
    distance from a half-step of the unrounded values that flipped there. Before the first flip
    both runs see the same codes, so the first flips can only be rounding ties decided the other
    way by float arithmetic (conv accumulation order, x/s vs x*(1/s)); later flips are the
    network propagating them.
    """
    model = deployed_form(model)
    refs = reference_outputs(model, x)
    m, code_names = _with_code_outputs(path)
    outs = ort_session(m).run(None, {"images": x.numpy()})
    n_out = len(outs) - len(code_names)
    diffs = [float(np.abs(o - r.numpy()).max()) for o, r in zip(outs[:n_out], refs)]
    codes, z = fake_quant_codes(model, x)
    if len(codes) != len(code_names):
        raise RuntimeError(f"{len(code_names)} QuantizeLinear nodes in the graph but {len(codes)} quantized activations")
    flips = [torch.from_numpy(o.astype(np.float32)) != c for o, c in zip(outs[n_out:], codes)]
    counts = [int(f.sum()) for f in flips]
    first = next((i for i, n in enumerate(counts) if n), None)
    tie = None if first is None else float(((z[first][flips[first]] % 1) - 0.5).abs().max())
    return {"max_abs": max(diffs), "per_output": diffs, "max_ref": max(float(r.abs().max()) for r in refs),
            "code_flips": sum(counts), "codes": sum(c.numel() for c in codes), "first_flip_layer": first,
            "first_flip_count": None if first is None else counts[first],
            "first_flip_tie_distance": tie, "outputs": outs[:n_out], "refs": refs}
