"""Training-step time of a W4A4 quantized YOLO vs the same FP model, measured in one run.

Forward, loss, backward and optimizer step on one fixed batch, both models interleaved so that
machine noise hits both alike; prints the median step times and their ratio.

    python benchmarks/step_time.py --cfg yolov5nu.yaml --imgsz 320 --batch 8 --steps 10
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402,F401  (registers the YOLO policy)
from quant import calibrate, quantize_model  # noqa: E402


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", default="yolov5nu.yaml")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    fp = DetectionModel(args.cfg, nc=3, verbose=False)
    fp.args = get_cfg()
    q = quantize_model(copy.deepcopy(fp), {"w_bits": args.bits, "a_bits": args.bits})
    batch = make_batch(args.batch, args.imgsz, 3)
    calibrate(q, [batch["img"]], num_batches=1)
    models_ = {"fp": fp.train(), "w%da%d" % (args.bits, args.bits): q.train()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in models_.items()}
    times = {k: [] for k in models_}
    for k, m in models_.items():  # warm-up
        train_step(m, opts[k], batch)
    for _ in range(args.steps):
        for k, m in models_.items():
            t = time.perf_counter()
            train_step(m, opts[k], batch)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    qk = [k for k in med if k != "fp"][0]
    for k, v in med.items():
        print(f"{k:>6}: median step {v * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f}, max {max(times[k]) * 1000:.1f})")
    print(f"ratio {qk}/fp = {med[qk] / med['fp']:.3f}  ({args.cfg}, imgsz {args.imgsz}, batch {args.batch}, "
          f"threads {args.threads}, {args.steps} steps)")
    return med[qk] / med["fp"]


if __name__ == "__main__":
    main()
