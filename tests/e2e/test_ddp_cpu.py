"""Multi-GPU (``--device 0,1``) checked on the CPU: two processes, gloo, DistributedDataParallel.

Each process runs what a worker of Ultralytics' DDP launcher runs: ``QATDetectionTrainer(...).train()``
with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in its environment, so the real code
runs end to end: DistributedSampler shards, calibration (each rank on its own data, then rank 0's
scales broadcast), SGD + Adam steps with oscillation tracking and iterative freezing, the EMA,
rank-gated checkpoints, sharded validation, BN re-estimation of best.pt.
Ultralytics assumes a GPU per DDP rank in four places; only those are redirected to the CPU:
the process group (gloo instead of NCCL on ``cuda:<rank>``), DDP's ``device_ids=[None]`` for a CPU
module, the validator's ``cuda`` device for DDP ranks, and the AVG reduction gloo lacks (SUM / world).
"""
import math
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

WORLD = 2
EPOCHS, N_TRAIN, BATCH = 2, 16, 4  # 16 images over 2 ranks at 2 a rank: 4 optimizer steps an epoch
QAT = {"recipe": {"w_bits": 4, "a_bits": 4}, "method": "freeze", "ema_decay": 0.9, "ema_tau": 2.0,
       # freezing from the first step, and any weight that flips back once is frozen: some freeze in 8 steps
       "schedule_start": 0.0, "freeze_th_start": 0.0, "freeze_th_end": 0.0, "osc_momentum": 0.5,
       "calib_batches": 2, "bn_reestimate": True, "bn_batches": 2}


def _cpu_stands_in_for_cuda(world: int):
    """Patch, in this worker process only, the four places where Ultralytics' DDP path assumes CUDA."""
    from types import SimpleNamespace

    import torch.distributed as dist
    import ultralytics.engine.validator as validator

    ddp = torch.nn.parallel.DistributedDataParallel

    class CpuDDP(ddp):  # the trainer passes device_ids=[device.index], which is [None] on the CPU
        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__(module, device_ids=None if device_ids == [None] else device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP
    validator.get_torch_device_backend = lambda device_type: SimpleNamespace(current_device=lambda: 0)
    auto_backend = validator.AutoBackend
    validator.AutoBackend = lambda *a, device=None, **k: auto_backend(*a, device=torch.device("cpu"), **k)
    reduce = dist.reduce

    def reduce_avg_as_sum(tensor, dst, op=dist.ReduceOp.SUM, **kwargs):
        if op != dist.ReduceOp.AVG:
            return reduce(tensor, dst, op=op, **kwargs)
        work = reduce(tensor, dst, op=dist.ReduceOp.SUM, **kwargs)
        tensor.div_(world)
        return work

    dist.reduce = reduce_avg_as_sum


def _worker(rank: int, port: int, data_yaml: str, out: str):
    # Ultralytics reads RANK / LOCAL_RANK when first imported: set them before any import of it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), YOLO_OFFLINE="1")
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the host name may not resolve to a local address
    torch.set_num_threads(1)  # one core per rank
    import torch.distributed as dist

    import yolo_qat.engine.trainer as et
    from yolo_qat.quant import quant_convs
    from ultralytics.utils.torch_utils import unwrap_model

    _cpu_stands_in_for_cuda(WORLD)
    record = {"saves": [], "calibrated": None}
    save_checkpoint, calibrate = et.save_checkpoint, et.calibrate

    def recording_save(path, *a, **k):
        record["saves"].append(Path(path).name)
        return save_checkpoint(path, *a, **k)

    def recording_calibrate(model, *a, **k):  # this rank's own scales, before rank 0's are broadcast
        used = calibrate(model, *a, **k)
        record["calibrated"] = {name: m.input_quantizer._scale.detach().clone()
                                for name, m in quant_convs(model).items()}
        return used

    et.save_checkpoint, et.calibrate = recording_save, recording_calibrate

    class CpuDDPTrainer(et.QATDetectionTrainer):
        def _setup_ddp(self):  # Ultralytics': NCCL on cuda:<LOCAL_RANK>, same rendezvous from the environment
            dist.init_process_group("gloo", rank=rank, world_size=self.world_size)

    trainer = CpuDDPTrainer(overrides={
        "model": "yolov5nu.yaml", "data": data_yaml, "epochs": EPOCHS, "imgsz": 64, "batch": BATCH, "nbs": BATCH,
        "workers": 0, "device": "cpu", "warmup_epochs": 0, "lr0": 0.05, "plots": False, "val": False,
        "project": out, "name": "ddp", "exist_ok": True, "qat": QAT})
    trainer.world_size = WORLD  # the launcher's count of devices (Ultralytics counts 0 for "cpu")
    try:
        trainer.train()
        torch.save({"model": unwrap_model(trainer.model).state_dict(), "ema": trainer.ema.ema.state_dict(),
                    "ema_updates": trainer.ema.updates, "tracker": trainer.tracker.state_dict(),
                    "optimizer": trainer.optimizer.state_dict()["state"],
                    "scale_optimizer": trainer.scale_optimizer.state_dict()["state"],
                    "qat_step": trainer.qat_step, "extra_rows": trainer.extra_rows, **record},
                   Path(out) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat(state: dict, prefix: str = "") -> dict:
    """Tensors of a (nested) state dict by dotted key: optimizer states are {param index: {name: tensor}}."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
    return out


def _differing(a: dict, b: dict) -> list[str]:
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def _is_bn_statistic(key: str) -> bool:
    return key.endswith((".running_mean", ".running_var"))


def test_two_cpu_ranks_stay_bit_identical_and_only_rank0_writes(tmp_path):
    from yolo_qat.data.embedded import ensure_embedded_dataset

    data = ensure_embedded_dataset(root=tmp_path / "ds", n_train=N_TRAIN, n_val=4, imgsz=64)
    out = tmp_path / "runs"
    mp.spawn(_worker, args=(_free_port(), str(data), str(out)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(out / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in range(WORLD))

    # The ranks saw different data: their own calibration gave different scales, and the BN running
    # statistics of the raw models (DDP does not sync buffers in Ultralytics' setup) differ.
    assert _differing(r0["calibrated"], r1["calibrated"])
    model_diff = _differing(r0["model"], r1["model"])
    not_bn = [k for k in model_diff if not _is_bn_statistic(k)]
    assert model_diff and not not_bn, not_bn[:5]
    # Everything else is bit-identical: latent weights, biases, BN affine, LSQ step sizes and LSQ+
    # offsets (rank 0's calibration everywhere, then all-reduced gradients), both optimizers' states.
    scales = [k for k in r0["model"] if k.endswith("_quantizer._scale")]
    offsets = [k for k in r0["model"] if k.endswith("input_quantizer.offset")]
    assert scales and offsets
    assert _differing(r0["optimizer"], r1["optimizer"]) == [] and r0["optimizer"]
    assert _differing(r0["scale_optimizer"], r1["scale_optimizer"]) == [] and r0["scale_optimizer"]
    assert r0["qat_step"] == r1["qat_step"] == EPOCHS * N_TRAIN // BATCH
    # The EMA (Ultralytics broadcasts its buffers from rank 0 before each validation), and it is a
    # real average, not a copy of the raw model.
    assert _differing(r0["ema"], r1["ema"]) == [] and r0["ema_updates"] == r1["ema_updates"] == r0["qat_step"]
    assert any(not torch.equal(r0["ema"][k], r0["model"][k]) for k in scales)
    # The oscillation tracker: frequencies, integer EMAs, frozen masks and codes; some weights froze.
    assert _differing(r0["tracker"], r1["tracker"]) == []
    frozen = sum(int(v.sum()) for k, v in r0["tracker"].items() if k.startswith("frozen_") and v.dtype == torch.bool)
    assert frozen > 0

    # Checkpoints come from rank 0 only, and hold rank 0's state (its own BN statistics).
    assert r1["saves"] == [] and r0["saves"][-1] == "best_bn.pt"
    assert {"last.pt", "best.pt"} <= set(r0["saves"])
    last = torch.load(out / "ddp/weights/last.pt", map_location="cpu", weights_only=False)
    assert _differing(last["train_state"]["model"], r0["model"]) == []
    assert _differing(last["train_state"]["model"], r1["model"]) == model_diff
    assert _differing(last["model"].state_dict(), r0["ema"]) == []
    assert last["train_state"]["qat_step"] == r0["qat_step"]
    # BN re-estimation after DDP training: every rank takes part in the sharded validation of
    # best_bn.pt (before the fix rank 0 validated alone, blocked in a collective the others never joined).
    assert (out / "ddp/weights/best_bn.pt").is_file()
    assert list(r0["extra_rows"]) == ["QAT + BN re-estimation"] and r1["extra_rows"] == {}
    assert math.isfinite(r0["extra_rows"]["QAT + BN re-estimation"]["metrics/mAP50-95(B)"])
