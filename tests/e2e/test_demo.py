"""The no-argument demo pins its thread count (Ultralytics' own choice depends on the core count, and
the thread count changes the numbers) and prints the spread measured over seeds."""
import torch
import ultralytics.utils.torch_utils as tu

from yolo_qat.engine.cli import DEMO, parse_args
from yolo_qat.engine.demo import DEMO_THREADS, SEED_SPREAD, pin_threads, reference_lines


def test_no_arguments_is_the_demo_and_flags_are_not():
    opt = parse_args([])
    assert opt.demo and opt.cfg == DEMO["cfg"] and opt.fp_epochs == DEMO["fp_epochs"]
    assert not parse_args(["--cfg", "yolov5nu", "--epochs", "1"]).demo


def test_pinned_threads_survive_ultralytics_select_device():
    before_const, before_threads = tu.NUM_THREADS, torch.get_num_threads()
    try:
        tu.NUM_THREADS = DEMO_THREADS + 2  # what a machine with more cores would get
        pin_threads()
        tu.select_device("cpu", verbose=False)  # every trainer / validator calls this
        assert torch.get_num_threads() == DEMO_THREADS
    finally:
        tu.NUM_THREADS = before_const
        torch.set_num_threads(before_threads)


def test_reference_lines_name_every_spread():
    text = reference_lines()
    for name, (lo, hi) in SEED_SPREAD.items():
        assert lo < hi and f"{name} {lo:.1f}-{hi:.1f}" in text
