"""What makes the no-argument demo comparable from machine to machine.

Ultralytics' ``select_device`` sets ``torch.set_num_threads(min(8, cpu_count - 1))`` on the CPU, so
the demo ran with 1 thread on a 2-core machine and with 7 on an 8-core one. The thread count changes
the float summation order of the conv kernels (yolov5nu-seg: weights differ by 3e-6 after 3 SGD
steps, 1 vs 2 threads), and 300 steps of training amplify that into a different model: another
machine landed anywhere in the seed spread below. The demo therefore pins the thread count, and
prints the spread measured over seeds, so that a newcomer can tell noise from a broken install.
"""
from __future__ import annotations

import torch
import ultralytics.utils.torch_utils as tu

DEMO_THREADS = 1  # what Ultralytics picks on the 2-core machines the reference numbers come from

# `python train_qat.py` (the demo) with --seed 0..4 on a 2-core AMD EPYC, ultralytics 8.4.190, torch 2.14.1,
# 1 thread: Ultralytics' mAP50-95 in %, (min, max) over the 5 seeds; seed 0 is the default.
SEED_SPREAD = {
    "FP box": (26.9, 34.3), "FP mask": (16.5, 24.1),
    "QAT box": (25.7, 34.1), "QAT mask": (16.5, 23.5),
}
SEED0 = {"FP box": 32.7, "FP mask": 23.1, "QAT box": 31.3, "QAT mask": 21.2}


def pin_threads(n: int = DEMO_THREADS) -> None:
    """Make every Ultralytics trainer / validator of this process use ``n`` intra-op threads.

    Work-around: ``select_device`` reads the module constant ``NUM_THREADS`` each time it is called
    (trainer, validator), and there is no argument to choose it.
    """
    tu.NUM_THREADS = n
    torch.set_num_threads(n)


def reference_lines() -> str:
    """The reference printed under the demo's table."""
    spread = ", ".join(f"{k} {lo:.1f}-{hi:.1f}" for k, (lo, hi) in SEED_SPREAD.items())
    seed0 = ", ".join(f"{k} {v:.1f}" for k, v in SEED0.items())
    return (f"Reference (mAP50-95 %, {DEMO_THREADS} thread): seed 0 gave {seed0} on the reference machine; "
            f"seeds 0-4 spread {spread}.\nAnother processor moves seed 0 about as much as another seed does (an "
            f"AVX-512 EPYC gave FP box 28.4, QAT box 26.8, also with the kernels held to AVX2; an Intel Xeon with "
            f"AVX-512 and AMX FP box 32.7, QAT box 32.1): values inside the "
            f"spread are normal on any x86 CPU, values far below it (e.g. FP box < 20) point to a broken install.")
