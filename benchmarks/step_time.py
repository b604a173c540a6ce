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

import models  # noqa: E402,F401  (registers the YOLO policy)
from engine.distill import attach_distillation  # noqa: E402
from quant import calibrate, quantize_model, set_recompute_input  # noqa: E402
from quant import fused as fused_lsq  # noqa: E402


def make_batch(n: int, imgsz: int, nc: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    boxes_per_img = 4
    k = n * boxes_per_img
    xy = torch.rand(k, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(k, 2, generator=g) * 0.3 + 0.05
    return {"img": torch.rand(n, 3, imgsz, imgsz, generator=g),
            "batch_idx": torch.arange(n).repeat_interleave(boxes_per_img).float(),
            "cls": torch.randint(0, nc, (k, 1), generator=g).float(),
            "bboxes": torch.cat([xy, wh], 1)}


def train_step(model, opt, batch):
    opt.zero_grad(set_to_none=True)
    loss, _ = model.loss(batch)
    loss.sum().backward()
    opt.step()


def build_fp(cfg: str) -> torch.nn.Module:
    """An FP detection model from an Ultralytics yaml or an original-format one (models/registry.py)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from models.registry import is_original_yaml
    from models.yolo import DetectionModel as OriginalDetectionModel, Segment

    torch.manual_seed(0)
    if is_original_yaml(cfg):
        fp = OriginalDetectionModel(cfg, nc=3, verbose=False)
        if isinstance(fp.model[-1], Segment):
            raise ValueError(f"--cfg {cfg}: step_time.py times detection models (its batch has no masks); "
                             f"pass a detection yaml such as yolov5n or yolov7-tiny")
    else:
        fp = DetectionModel(cfg, nc=3, verbose=False)
    fp.args = get_cfg()
    return fp


def time_cfg(cfg: str, args) -> dict[str, float]:
    """Median step time (s) of FP, W<b>A<b> and its variants for one model config; prints them."""
    fp = build_fp(cfg)
    q = quantize_model(copy.deepcopy(fp), {"w_bits": args.bits, "a_bits": args.bits})
    batch = make_batch(args.batch, args.imgsz, 3)
    calibrate(q, [batch["img"]], num_batches=1)
    qk = "w%da%d" % (args.bits, args.bits)
    fused_on = fused_lsq.extension() is not None
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)  # noqa: E731
    opts = {"fp": sgd(fp), qk: sgd(q)}
    # name -> (model, optimizer, fused kernel on?, recompute the input quantization in the backward?); the
    # variants share the quantized model and its optimizer
    runs = {"fp": (fp.train(), opts["fp"], True, False), qk: (q.train(), opts[qk], True, False)}
    if args.variants:
        runs[qk + " recompute"] = (q, opts[qk], True, True)
        if fused_on:
            runs[qk + " ref"] = (q, opts[qk], False, False)
    if args.distill:
        # Its own copy of the quantized model (the criterion is the model's), the teacher a frozen copy of the
        # FP model as it is now (the FP entry keeps training).
        qd = copy.deepcopy(q).train()
        attach_distillation(qd, copy.deepcopy(fp))
        runs[qk + " distill"] = (qd, sgd(qd), True, False)

    def step(name):
        model, opt, fused, recompute = runs[name]
        set_recompute_input(model, recompute)
        with contextlib.nullcontext() if fused else fused_lsq.reference_only():
            train_step(model, opt, batch)

    times = {k: [] for k in runs}
    for k in runs:  # warm-up (and the kernel build, if any)
        step(k)
    for _ in range(args.steps):
        for k in runs:
            t = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    from models.original import is_original_model

    kind = "original anchor-based, YOLOv5 loss" if is_original_model(fp) else "Ultralytics, its own loss"
    print(f"{cfg} ({kind}, {type(fp.model[-1]).__name__} head):")
    for k, v in med.items():
        print(f"{k:>14}: median step {v * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f}, "
              f"max {max(times[k]) * 1000:.1f})  ratio to fp {v / med['fp']:.3f}")
    lsq = "fused LSQ kernel" if fused_on else "reference LSQ (fused kernel unavailable)"
    print(f"ratio {qk}/fp = {med[qk] / med['fp']:.3f} with the {lsq}  ({cfg}, imgsz {args.imgsz}, "
          f"batch {args.batch}, threads {args.threads}, {args.steps} steps)")
    if args.distill:
        d = med[qk + " distill"]
        print(f"ratio {qk}+distill/fp = {d / med['fp']:.3f}, {qk}+distill/{qk} = {d / med[qk]:.3f}  "
              f"(teacher forward + distillation loss on the same batch)")
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
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the recompute and reference-LSQ variants (--no-variants: FP and W4A4 only)")
    ap.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the QAT step with distillation from the FP model (train_qat.py --distill)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    qk = "w%da%d" % (args.bits, args.bits)
    ratios, kd = {}, {}
    for cfg in args.cfg:
        med = time_cfg(cfg, args)
        ratios[cfg] = med[qk] / med["fp"]
        if args.distill:
            kd[cfg] = (med[qk + " distill"] / med["fp"], med[qk + " distill"] / med[qk])
    if len(ratios) > 1:
        width = max(map(len, ratios))
        print(f"{qk}/fp step-time ratios (imgsz {args.imgsz}, batch {args.batch}, threads {args.threads}):"
              + (f"  [{qk}+distill/fp, {qk}+distill/{qk}]" if kd else ""))
        for cfg, r in ratios.items():
            print(f"  {cfg:<{width}}  {r:.3f}" + (f"  [{kd[cfg][0]:.3f}, {kd[cfg][1]:.3f}]" if kd else ""))
    return ratios[args.cfg[0]]


if __name__ == "__main__":
    main()
