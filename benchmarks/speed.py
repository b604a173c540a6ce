"""Cost of quantization, measured in one run on one batch and machine, printed as ratios:
QAT step / FP step, QAT step with distillation from the FP model (train_qat.py --distill: the teacher's
forward and the distillation term on the same batch) / FP step and / QAT step, QC pass / QAT pass over the
same batches, validation images/s quantized vs FP (eval forward), and peak memory of a training step
quantized (with and without distillation) vs FP (each in its own subprocess:
the resident set sampled every half millisecond during two training steps, over the resident set
just before them; glibc is told to give large blocks back at once, so the samples follow the live
tensors instead of the allocator's cache).

    python benchmarks/speed.py --cfg yolov5nu.yaml --imgsz 320 --batch 8 --steps 5
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yolo_qat import models  # noqa: E402,F401  (registers the YOLO policy)
from benchmarks.step_time import make_batch, train_step  # noqa: E402
from yolo_qat.engine.distill import attach_distillation  # noqa: E402
from yolo_qat.quant import calibrate, quantize_model, set_recompute_input  # noqa: E402
from yolo_qat.quant.qc import freeze_for_qc, insert_qc, set_batchnorm_eval  # noqa: E402


def build_fp(cfg: str) -> torch.nn.Module:
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    fp = DetectionModel(cfg, nc=3, verbose=False)
    fp.args = get_cfg()
    return fp.train()


def build_quantized(fp: torch.nn.Module, bits: int, batches: list[dict]) -> torch.nn.Module:
    q = quantize_model(copy.deepcopy(fp), {"w_bits": bits, "a_bits": bits})
    calibrate(q, [b["img"] for b in batches], num_batches=len(batches))
    return q.train()


def build_models(cfg: str, bits: int, imgsz: int, batch: int) -> tuple[torch.nn.Module, torch.nn.Module, list[dict]]:
    fp = build_fp(cfg)
    batches = [make_batch(batch, imgsz, 3, seed=i) for i in range(3)]
    return fp, build_quantized(fp, bits, batches), batches


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Each function once as warm-up, then ``repeats`` interleaved rounds (noise hits all alike)."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def sgd(model) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)


def qat_pass(model, opt, batches) -> None:
    for b in batches:
        train_step(model, opt, b)


def qc_pass(model, opt, batches) -> None:
    """What engine.qc trains: BN frozen, only the corrections get gradients."""
    for b in batches:
        model.train()
        set_batchnorm_eval(model)
        train_step(model, opt, b)


@torch.no_grad()
def eval_pass(model, batches) -> None:
    model.eval()
    for b in batches:
        model(b["img"])
    model.train()


def distilled(q, fp) -> torch.nn.Module:
    """A copy of the quantized model whose loss adds distillation from a frozen copy of ``fp`` (as QAT with
    --distill trains: the teacher is the FP model in eval mode, no optimizer state of its own)."""
    qd = copy.deepcopy(q).train()
    attach_distillation(qd, copy.deepcopy(fp))
    return qd


def time_all(fp, q, batches, repeats: int) -> dict[str, float]:
    qc = copy.deepcopy(q)
    insert_qc(qc, "channel", True, True)
    qc_opt = torch.optim.Adam(freeze_for_qc(qc), lr=1e-4)
    qd = distilled(q, fp)
    opts = {"fp": sgd(fp), "q": sgd(q), "qd": sgd(qd)}
    one = batches[:1]
    return median_times({
        "fp_step": lambda: qat_pass(fp, opts["fp"], one),
        "qat_step": lambda: qat_pass(q, opts["q"], one),
        "qat_distill_step": lambda: qat_pass(qd, opts["qd"], one),
        "qat_pass": lambda: qat_pass(q, opts["q"], batches),
        "qc_pass": lambda: qc_pass(qc, qc_opt, batches),
        "fp_eval": lambda: eval_pass(fp, batches),
        "q_eval": lambda: eval_pass(q, batches),
    }, repeats)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Highest resident set seen by a sampling thread while the block runs (torch releases the GIL
    inside its ops, so the thread samples during them)."""

    def __init__(self, interval_s: float = 5e-4):
        self.interval_s, self.peak, self._stop = interval_s, 0.0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self):
        self.peak = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def memory_child(a) -> None:
    """In a fresh process: peak resident-set growth of two training steps of one model (fp or q)."""
    batches = [make_batch(a.batch, a.imgsz, 3, seed=i) for i in range(3)]
    model = build_fp(a.cfg)
    if a.memory_child != "fp":
        fp, model = model, build_quantized(model, a.bits, batches[:1])
        set_recompute_input(model, a.memory_child == "q-recompute")
        if a.memory_child == "q-distill":  # the teacher's weights are in the resident set before the steps
            model = distilled(model, fp)
    opt = sgd(model)
    train_step(model, opt, batches[0])  # optimizer state and one-off buffers exist from here on
    base = rss_mb()
    with PeakRSS() as peak:
        for _ in range(2):
            train_step(model, opt, batches[0])
    print(json.dumps({"base_mb": base, "peak_mb": peak.peak}))


MEMORY_KINDS = ("fp", "q", "q-recompute", "q-distill")


def peak_memory(a) -> dict[str, dict]:
    out = {}
    # Large blocks go straight back to the OS when freed (no dynamic mmap threshold, no heap cache),
    # so resident memory tracks what is allocated.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    for kind in MEMORY_KINDS:
        cmd = [sys.executable, __file__, "--memory-child", kind, "--cfg", a.cfg, "--imgsz", str(a.imgsz),
               "--batch", str(a.batch), "--bits", str(a.bits), "--threads", str(a.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:  # its traceback, not only an exit code
            raise RuntimeError(f"the peak-memory measurement of '{kind}' failed in its subprocess (exit code "
                               f"{res.returncode}); its error output ends with:\n{res.stderr.strip()[-2000:]}")
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def ratio_lines(t: dict, mem: dict, a) -> list[str]:
    n_img = 3 * a.batch
    grow = {k: v["peak_mb"] - v["base_mb"] for k, v in mem.items()}
    mem_ratio = f"{grow['q'] / grow['fp']:.3f}" if grow["fp"] > 0 else "n/a (no growth measured for FP)"
    return [
        f"training step   QAT / FP          = {t['qat_step'] / t['fp_step']:.3f}  "
        f"({1000 * t['qat_step']:.0f} ms vs {1000 * t['fp_step']:.0f} ms)",
        f"training step   QAT+distill / FP  = {t['qat_distill_step'] / t['fp_step']:.3f}  "
        f"({1000 * t['qat_distill_step']:.0f} ms vs {1000 * t['fp_step']:.0f} ms)",
        f"training step   QAT+distill / QAT = {t['qat_distill_step'] / t['qat_step']:.3f}  "
        f"({1000 * t['qat_distill_step']:.0f} ms vs {1000 * t['qat_step']:.0f} ms)",
        f"pass over 3 batches  QC / QAT     = {t['qc_pass'] / t['qat_pass']:.3f}  "
        f"({1000 * t['qc_pass']:.0f} ms vs {1000 * t['qat_pass']:.0f} ms)",
        f"validation images/s  quant / FP   = {t['fp_eval'] / t['q_eval']:.3f}  "
        f"({n_img / t['q_eval']:.1f} vs {n_img / t['fp_eval']:.1f} img/s)",
        f"peak memory growth   quant / FP   = {mem_ratio}  "
        f"({grow['q']:.0f} MB vs {grow['fp']:.0f} MB over the resident set before the steps; peak "
        f"{mem['q']['peak_mb']:.0f} vs {mem['fp']['peak_mb']:.0f} MB)",
        f"  with --recompute-input          = {grow['q-recompute'] / grow['fp']:.3f}  "
        f"({grow['q-recompute']:.0f} MB)" if grow["fp"] > 0 else "  with --recompute-input: n/a",
        f"  with --distill                  = {grow['q-distill'] / grow['fp']:.3f}  "
        f"({grow['q-distill']:.0f} MB; teacher weights {mem['q-distill']['base_mb'] - mem['q']['base_mb']:+.0f} MB "
        f"in the resident set before the steps)" if grow["fp"] > 0 else "  with --distill: n/a",
    ]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", default="yolov5nu.yaml")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed repeats of each measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--memory-child", choices=MEMORY_KINDS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.memory_child:
        memory_child(a)
        return {}
    fp, q, batches = build_models(a.cfg, a.bits, a.imgsz, a.batch)
    t = time_all(fp, q, batches, a.steps)
    mem = peak_memory(a)
    print(f"W{a.bits}A{a.bits} vs FP, {a.cfg}, imgsz {a.imgsz}, batch {a.batch}, {a.threads} threads, "
          f"median of {a.steps}:")
    for line in ratio_lines(t, mem, a):
        print("  " + line)
    return {"times_s": t, "memory_mb": mem}


if __name__ == "__main__":
    main()
