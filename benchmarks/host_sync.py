"""Host syncs in one QAT training step: which calls would make the host wait for the GPU.

``count_step(cfg, method, ...)`` builds a small quantized model, a trainer object carrying the pieces that
``QATTrainerMixin.optimizer_step`` uses (optimizers as ``build_optimizer`` makes them, GradScaler,
oscillation tracker, dampening / freezing schedules past their start, EMA, distillation), runs one
forward + loss + backward + ``optimizer_step`` and counts the calls that read a device value on the host:

- on any device, a TorchDispatchMode records the aten ops that do so: ``_local_scalar_dense``
  (``.item()``, ``float()``, ``int()``, ``bool()`` of a tensor), ``nonzero``, ``is_nonzero``, ``equal``,
  ``masked_select``, ``repeat_interleave`` with tensor repeats, ``unique``, and indexing with a bool
  mask; a TorchFunctionMode adds ``tolist`` / ``numpy``. Each is attributed to the innermost frame of
  this repository (else Ultralytics', else torch's) that called it.
- on CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` is the ground truth: its warnings are counted too.

    python benchmarks/host_sync.py [--device 0] [--amp]     # a table: method x model, syncs per step
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

aten = torch.ops.aten
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default, aten.equal.default,
             aten.masked_select.default, aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor,
             aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
             aten.nonzero_static.default if hasattr(aten, "nonzero_static") else aten.nonzero.default}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_FN_NAMES = {"tolist", "numpy"}


def _where() -> str:
    """file:line of the innermost caller in this repository or Ultralytics, else torch; ops that the autograd
    engine runs (a backward) have no such caller: "torch/autograd backward" (e.g. the backward of a boolean-mask
    index in Ultralytics' loss)."""
    if torch._C._current_graph_task_id() != -1:
        return "torch/autograd backward"
    stack = traceback.extract_stack()[:-3]
    for pick in (lambda f: (str(ROOT) in f and "/.venv/" not in f and "host_sync.py" not in f) or "/ultralytics/" in f,
                 lambda f: True):
        for fr in reversed(stack):
            if pick(fr.filename):
                name = fr.filename.replace(str(ROOT) + "/", "")
                if "/ultralytics/" in name:
                    name = "ultralytics/" + name.split("/ultralytics/", 1)[1]
                return f"{name}:{fr.lineno}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that read device values on the host, by op and by caller."""

    def __init__(self):
        super().__init__()
        self.by_site: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = func in _SYNC_OPS
        if not hit and func in _INDEX_OPS:
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            hit = any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (idx or ()))
        if hit:
            self.by_site[f"{func.__name__} @ {_where()}"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.by_site.values())


class _FnCounter(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _FN_NAMES:
            self.counter.by_site[f"{func.__name__} @ {_where()}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_syncs():
    """``with count_syncs() as c: ...``; then ``c.total``, ``c.by_site`` (and ``c.cuda_warnings`` on CUDA)."""
    c = SyncCounter()
    c.cuda_warnings = 0
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with _FnCounter(c), c:
                yield c
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    c.cuda_warnings = sum("synchroniz" in str(x.message).lower() for x in w)


def _batch(n, imgsz, nc, seg, device, seed=0):
    from benchmarks.step_time import make_batch

    b = make_batch(n, imgsz, nc, seed=seed, device=device)
    if seg:  # overlap masks as Ultralytics' segment dataset gives them: per image, label index + 1 inside its box
        k = b["cls"].shape[0]
        per_img = k // n
        m = torch.zeros(n, imgsz // 4, imgsz // 4, device=device)
        xy = (b["bboxes"][:, :2] * imgsz / 4).long()
        for j in range(k):  # set-up only (not counted)
            i, x, y = j // per_img, int(xy[j, 0]), int(xy[j, 1])
            m[i, max(y - 2, 0):y + 2, max(x - 2, 0):x + 2] = j % per_img + 1
        b["masks"] = m
    return b


def build_step(cfg: str, method: str = "lsq", device="cpu", amp: bool = False, ema: bool = False,
               distill: bool = False, imgsz: int = 64, batch: int = 2, nc: int = 3, fused_like_cuda: bool = True):
    """(trainer, batch, step_fn): a quantized ``cfg`` set up as QATTrainerMixin trains it, one step ready."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    from yolo_qat import models  # noqa: F401
    from yolo_qat.engine.calib import ensure_loss_args
    from yolo_qat.engine.config import QATConfig
    from yolo_qat.engine.distill import attach_distillation
    from yolo_qat.engine.ema import QATModelEMA
    from yolo_qat.engine.trainer import qat_trainer_class
    from yolo_qat.models.registry import is_original_yaml
    from yolo_qat.models.yolo import DetectionModel as OriginalDetectionModel, SegmentationModel as OriginalSegmentationModel
    from yolo_qat.quant import calibrate, quant_convs, quantize_model
    from yolo_qat.quant.oscillation import Dampening, DelayedCosine, OscillationTracker

    device = torch.device(device)
    seg = "seg" in Path(cfg).stem
    original = is_original_yaml(cfg)
    torch.manual_seed(0)
    if original:
        fp = (OriginalSegmentationModel if seg else OriginalDetectionModel)(cfg, nc=nc, verbose=False)
    else:
        local = ROOT / "models" / (cfg if cfg.endswith(".yaml") else cfg + ".yaml")
        fp = (SegmentationModel if seg else DetectionModel)(str(local) if local.is_file() else cfg, nc=nc,
                                                            verbose=False)
    fp.args = get_cfg()
    fp = fp.to(device)
    q = quantize_model(copy.deepcopy(fp), {"w_bits": 4, "a_bits": 4}).to(device)
    ensure_loss_args(q)
    b = _batch(batch, imgsz, nc, seg, device)
    calibrate(q, [b["img"]], num_batches=1)
    q.train()
    if distill:
        attach_distillation(q, copy.deepcopy(fp))
    qat = QATConfig(method=method, ema_decay=0.999 if ema else 0.0, ema_tau=4.0, distill=False)
    tr = object.__new__(qat_trainer_class("segment" if seg else "detect", original))
    tr.args = get_cfg()
    tr.model, tr.qat, tr.device, tr.batch_size = q, qat, device, batch
    tr.scale_optimizer, tr._step_sizes = None, []
    tr.optimizer = tr.build_optimizer(q, "SGD", lr=0.01, momentum=0.9, decay=5e-4, iterations=100)
    if device.type != "cuda" and fused_like_cuda:  # what build_optimizer does on CUDA (fused kernels)
        from yolo_qat.engine.trainer import fused_optimizer

        tr.optimizer, tr.scale_optimizer = fused_optimizer(tr.optimizer), fused_optimizer(tr.scale_optimizer)
    tr.scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    tr.tracker = OscillationTracker(quant_convs(q), qat.osc_momentum).to(device)
    tr.dampening = Dampening(qat.dampen_lambda, qat.schedule_start)
    tr.freeze_schedule = DelayedCosine(qat.freeze_th_start, qat.freeze_th_end, qat.schedule_start)
    tr._damp_sum, tr._damp_n = 0.0, 0
    tr.qat_step, tr.total_steps = 3, 4  # past the schedules' start: dampening / freezing active
    tr.ema = QATModelEMA(q, qat.ema_decay, qat.ema_tau) if ema else None
    use_amp = amp and device.type == "cuda"

    def step():
        tr.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss, _ = q.loss(b)
        tr.scaler.scale(loss.sum()).backward()
        tr.optimizer_step()

    return tr, b, step


CASES = [("yolov5nu.yaml", "lsq", {}), ("yolov5nu.yaml", "dampen", {}), ("yolov5nu.yaml", "freeze", {}),
         ("yolov5nu.yaml", "lsq", {"ema": True}), ("yolov5nu.yaml", "lsq", {"distill": True}),
         ("yolov5n", "lsq", {}), ("yolov5n", "dampen", {}), ("yolov5n", "freeze", {}),
         ("yolov5n", "lsq", {"ema": True}), ("yolov5n", "lsq", {"distill": True}),
         ("yolov5n-seg", "lsq", {}), ("yolov5nu-seg.yaml", "lsq", {"distill": True})]


def count_step(cfg, method="lsq", device="cpu", amp=False, warm=1, **kw):
    """Syncs in one training step after ``warm`` uncounted ones: the SyncCounter (and CUDA warnings)."""
    tr, b, step = build_step(cfg, method, device, amp, **kw)
    for _ in range(warm):
        step()
    with count_syncs() as c:
        step()
    return c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--imgsz", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--sites", action="store_true", help="print where each sync comes from")
    args = ap.parse_args(argv)
    dev = f"cuda:{args.device}" if args.device.isdigit() else args.device
    os.environ.setdefault("YOLO_OFFLINE", "1")
    rows = []
    for cfg, method, kw in CASES:
        c = count_step(cfg, method, dev, args.amp, imgsz=args.imgsz, batch=args.batch, **kw)
        ours = sum(v for k, v in c.by_site.items() if "ultralytics/" not in k.split(" @ ")[1] and "torch/" not in k)
        name = f"{cfg} {method}" + "".join(f" +{k}" for k in kw)
        rows.append((name, c.total, ours, c.cuda_warnings))
        print(f"SYNC {name:<32} total {c.total:4d}  ours {ours:4d}  cuda-warnings {c.cuda_warnings:4d}", flush=True)
        if args.sites:
            for k, v in c.by_site.most_common():
                print(f"      {v:4d}  {k}")
    return rows


if __name__ == "__main__":
    main()
