"""Training-step time of a W4A4 quantized YOLO vs the same FP model, measured in one run.

Forward, loss, backward and optimizer step on one fixed batch, the models interleaved so that
machine noise hits all alike; prints the median step times and their ratios to FP. The quantized
model runs as training runs it by default (fused LSQ CPU kernel, quant/fused.py) and, unless
``--no-variants``, with the input quantization recomputed in the backward ("recompute",
``--recompute-input`` of train_qat.py: less memory) and with the plain-PyTorch reference LSQ ("ref").
Unless ``--no-distill``, also the QAT step with distillation from the FP model ("distill", train_qat.py
``--distill``): the teacher's forward (eval mode, no gradients) on the same batch and the distillation
term added to the loss (engine/distill.py); its ratios to FP and to the plain QAT step are printed.

Each ``--cfg`` is timed in turn (by default Ultralytics' anchor-free yolov5nu, with its own loss, and
the original anchor-based yolov5n, with the YOLOv5 loss of models/loss.py), then the W4A4/FP ratios
are printed side by side.

    python benchmarks/step_time.py --cfg yolov5nu.yaml yolov5n --imgsz 320 --batch 8 --steps 10

On a GPU (``--device 0``): the models live there, every timed step ends with ``torch.cuda.synchronize()``,
``--amp`` runs the forward and loss under fp16 autocast with a GradScaler (Ultralytics' default on CUDA),
and the peak memory of each variant's step (``torch.cuda.max_memory_allocated`` above what the model and
its optimizer hold) is printed with its ratio to FP. The quantized step runs the Triton kernels
(quant/lsq_triton.py); "ref" is the plain-PyTorch reference on the same device.

    python benchmarks/step_time.py --device 0 --amp --imgsz 640 --batch 32
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolo_qat import models  # noqa: E402,F401  (registers the YOLO policy)
from yolo_qat.engine.distill import attach_distillation  # noqa: E402
from yolo_qat.quant import calibrate, quantize_model, set_recompute_input  # noqa: E402
from yolo_qat.quant import fused as fused_lsq  # noqa: E402


def make_batch(n: int, imgsz: int, nc: int, seed: int = 0, device="cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    boxes_per_img = 4
    k = n * boxes_per_img
    xy = torch.rand(k, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(k, 2, generator=g) * 0.3 + 0.05
    batch = {"img": torch.rand(n, 3, imgsz, imgsz, generator=g),
             "batch_idx": torch.arange(n).repeat_interleave(boxes_per_img).float(),
             "cls": torch.randint(0, nc, (k, 1), generator=g).float(),
             "bboxes": torch.cat([xy, wh], 1)}
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, opt, batch, scaler=None):
    """One step as Ultralytics' trainer runs it: with ``scaler`` (CUDA AMP) the forward and loss under fp16
    autocast, the backward on the scaled loss, the optimizer stepped through the scaler."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss, _ = model.loss(batch)
        loss.sum().backward()
        opt.step()
        return
    with torch.autocast("cuda", dtype=torch.float16):
        loss, _ = model.loss(batch)
    scaler.scale(loss.sum()).backward()
    scaler.step(opt)
    scaler.update()


def build_fp(cfg: str, nc: int = 3) -> torch.nn.Module:
    """An FP detection model from an Ultralytics yaml or an original-format one (models/registry.py)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from yolo_qat.models.registry import is_original_yaml
    from yolo_qat.models.yolo import DetectionModel as OriginalDetectionModel, Segment

    torch.manual_seed(0)
    if is_original_yaml(cfg):
        fp = OriginalDetectionModel(cfg, nc=nc, verbose=False)
        if isinstance(fp.model[-1], Segment):
            raise ValueError(f"--cfg {cfg}: step_time.py times detection models (its batch has no masks); "
                             f"pass a detection yaml such as yolov5n or yolov7-tiny")
    else:
        fp = DetectionModel(cfg, nc=nc, verbose=False)
    fp.args = get_cfg()
    return fp


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cfg(cfg: str, args) -> dict[str, float]:
    """Median step time (s) of FP, W<b>A<b> and its variants for one model config; prints them."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    fp = build_fp(cfg, args.nc).to(device)
    # quantize_model on the model where it trains (the quantizers follow the layers' device), then calibrated there
    q = quantize_model(copy.deepcopy(fp), {"w_bits": args.bits, "a_bits": args.bits}).to(device)
    batch = make_batch(args.batch, args.imgsz, args.nc, device=device)
    if args.channels_last:
        fp, q = fp.to(memory_format=torch.channels_last), q.to(memory_format=torch.channels_last)
        batch["img"] = batch["img"].contiguous(memory_format=torch.channels_last)
    calibrate(q, [batch["img"]], num_batches=1)
    qk = "w%da%d" % (args.bits, args.bits)
    # the per-tensor fast path of this device: the C++ kernel on CPU, the Triton kernels on CUDA
    fused_on = (fused_lsq.triton_module() is not None) if cuda else (fused_lsq.extension() is not None)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)  # noqa: E731
    scaler = (lambda: torch.amp.GradScaler("cuda")) if args.amp else (lambda: None)  # noqa: E731
    opts = {"fp": sgd(fp), qk: sgd(q)}
    # name -> (model, optimizer, scaler, fused kernel on?, recompute the input quantization in the backward?);
    # the variants share the quantized model and its optimizer
    runs = {"fp": (fp.train(), opts["fp"], scaler(), True, False), qk: (q.train(), opts[qk], scaler(), True, False)}
    if args.variants:
        runs[qk + " recompute"] = (q, opts[qk], runs[qk][2], True, True)
        if fused_on:
            runs[qk + " ref"] = (q, opts[qk], runs[qk][2], False, False)
    if args.distill:
        # Its own copy of the quantized model (the criterion is the model's), the teacher a frozen copy of the
        # FP model as it is now (the FP entry keeps training).
        qd = copy.deepcopy(q).train()
        attach_distillation(qd, copy.deepcopy(fp))
        runs[qk + " distill"] = (qd, sgd(qd), scaler(), True, False)

    def step(name):
        model, opt, sc, fused, recompute = runs[name]
        set_recompute_input(model, recompute)
        with contextlib.nullcontext() if fused else fused_lsq.reference_only():
            train_step(model, opt, batch, sc)

    peak = {}
    for k in runs:  # warm-up (kernel builds, cudnn's algorithm search, optimizer state), then one step's peak
        for _ in range(args.warmup):
            step(k)
        if cuda:
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(k)
            _sync(device)
            peak[k] = torch.cuda.max_memory_allocated(device) - base
    times = {k: [] for k in runs}
    for _ in range(args.steps):
        for k in runs:
            _sync(device)
            t = time.perf_counter()
            step(k)
            _sync(device)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    from yolo_qat.models.facts import is_original

    kind = "original anchor-based, YOLOv5 loss" if is_original(fp) else "Ultralytics, its own loss"
    print(f"{cfg} ({kind}, {type(fp.model[-1]).__name__} head, {device}{', AMP fp16' if args.amp else ''}):")
    for k, v in med.items():
        mem = (f"  peak {peak[k] / 2 ** 20:8.0f} MiB (x{peak[k] / max(peak['fp'], 1):.2f} fp)" if k in peak else "")
        print(f"{k:>14}: median step {v * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f}, "
              f"max {max(times[k]) * 1000:.1f})  ratio to fp {v / med['fp']:.3f}{mem}")
    lsq = ("Triton LSQ kernels" if cuda else "fused LSQ kernel") if fused_on else "reference LSQ (fused kernel unavailable)"
    where = f"device {device}" + (", AMP" if args.amp else "") if cuda else f"threads {args.threads}"
    print(f"ratio {qk}/fp = {med[qk] / med['fp']:.3f} with the {lsq}  ({cfg}, imgsz {args.imgsz}, "
          f"batch {args.batch}, {where}, {args.steps} steps)")
    if args.distill:
        d = med[qk + " distill"]
        print(f"ratio {qk}+distill/fp = {d / med['fp']:.3f}, {qk}+distill/{qk} = {d / med[qk]:.3f}  "
              f"(teacher forward + distillation loss on the same batch)")
    if peak:
        med["peak_ratio"] = peak[qk] / max(peak["fp"], 1)
        med["peak_fp_mib"], med["peak_q_mib"] = peak["fp"] / 2 ** 20, peak[qk] / 2 ** 20
    del runs, opts, fp, q
    if cuda:
        torch.cuda.empty_cache()
    return med


def main(argv=None) -> float:
    """Returns the W<b>A<b>/FP step-time ratio of the first ``--cfg``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", nargs="+", default=["yolov5nu.yaml", "yolov5n"],
                    help="detection model yamls, timed in turn: Ultralytics ones (yolov5nu.yaml, yolov8n.yaml) or "
                         "original anchor-based ones (yolov5n, yolov5s, yolov7-tiny)")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or a CUDA index (0) / cuda:0")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                    help="CUDA only: fp16 autocast with a GradScaler, as Ultralytics trains on a GPU")
    ap.add_argument("--channels-last", action="store_true", help="models and images in channels_last")
    ap.add_argument("--nc", type=int, default=3, help="number of classes of the head (80 for COCO)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (3 on CUDA)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the recompute and reference-LSQ variants (--no-variants: FP and W4A4 only)")
    ap.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the QAT step with distillation from the FP model (train_qat.py --distill)")
    args = ap.parse_args(argv)
    if args.device.isdigit():
        args.device = f"cuda:{args.device}"
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        args.warmup = max(args.warmup, 3)
    elif args.amp:
        ap.error("--amp needs a CUDA --device")
    torch.set_num_threads(args.threads)
    qk = "w%da%d" % (args.bits, args.bits)
    ratios, kd, ms = {}, {}, {}
    for cfg in args.cfg:
        med = time_cfg(cfg, args)
        ratios[cfg] = med[qk] / med["fp"]
        ms[cfg] = (med["fp"] * 1000, med[qk] * 1000)
        if args.distill:
            kd[cfg] = (med[qk + " distill"] / med["fp"], med[qk + " distill"] / med[qk])
    if len(ratios) > 1:
        width = max(map(len, ratios))
        print(f"{qk}/fp step-time ratios (imgsz {args.imgsz}, batch {args.batch}, "
              f"{args.device}{' AMP' if args.amp else ''}, threads {args.threads}):"
              + (f"  [{qk}+distill/fp, {qk}+distill/{qk}]" if kd else ""))
        for cfg, r in ratios.items():
            print(f"  {cfg:<{width}}  {r:.3f}" + (f"  [{kd[cfg][0]:.3f}, {kd[cfg][1]:.3f}]" if kd else "")
                  + (f"  fp {ms[cfg][0]:.1f} ms, {qk} {ms[cfg][1]:.1f} ms" if ms else ""))
    return ratios[args.cfg[0]]


if __name__ == "__main__":
    main()
