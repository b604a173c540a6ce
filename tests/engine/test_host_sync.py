"""No host sync in a QAT training step, counted on the CPU.

benchmarks/host_sync.py runs one forward + loss + backward + ``QATTrainerMixin.optimizer_step`` with the
optimizers as ``build_optimizer`` makes them on CUDA (fused) and counts the calls that would make the host
wait for a GPU (``.item()``/``float()``/``bool()`` of a tensor, ``nonzero``, boolean indexing, ``tolist``,
...), attributed to their caller. This project's code must make none, for every method (lsq, dampen,
freeze, EMA, distillation) and both loss families; the YOLOv5 segmentation loss reads one small table (the
positives per image, all levels at once) to split its per-image mask loss. Ultralytics' own loss
(anchor-free models) has its syncs, which are not counted here as ours.
"""
import pytest
import torch

from benchmarks.host_sync import count_step, count_syncs


def _ours(c):
    return {k: v for k, v in c.by_site.items() if "ultralytics/" not in k and "/torch/" not in k}


@pytest.mark.parametrize("cfg,method,kw,allowed", [
    ("yolov5n", "freeze", {"ema": True}, 0),
    ("yolov5n", "dampen", {"distill": True}, 0),
    ("yolov5nu.yaml", "freeze", {"ema": True}, 0),
    ("yolov5nu.yaml", "dampen", {"distill": True}, 0),
    ("yolov5n-seg", "lsq", {}, 1),
], ids=["v5n-freeze-ema", "v5n-dampen-distill", "v5nu-freeze-ema", "v5nu-dampen-distill", "v5n-seg"])
def test_no_host_sync_in_a_training_step(cfg, method, kw, allowed):
    c = count_step(cfg, method, "cpu", **kw)
    ours = _ours(c)
    assert sum(ours.values()) <= allowed, ours


def test_the_counter_sees_syncs():
    x = torch.arange(6.0)
    with count_syncs() as c:
        x.sum().item()
        bool(x.any())
        x[x > 2].sum()
        x.tolist()
        x.nonzero()
        (x * 2).sum()  # no sync
    kinds = " ".join(c.by_site)
    assert c.total == 5, c.by_site
    for op in ("_local_scalar_dense", "index", "tolist", "nonzero"):
        assert op in kinds
