"""The device a script runs on: Ultralytics' choice unless --device says otherwise, announced in one line."""
from __future__ import annotations

import argparse
import logging

import torch
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import parse_device, select_device

DEFAULT_HELP = "cpu, mps, 0, cuda:1, ... (default: Ultralytics' choice, the first GPU when there is one, else the CPU)"


def resolve_device(request="", multi: bool = False) -> str:
    """Ultralytics' reading of a device request, as a string torch and Ultralytics both accept.

    '' (or None) is Ultralytics' default: the current CUDA GPU when CUDA is available, else the CPU
    (``select_device`` picks MPS only when asked). With ``multi`` a multi-GPU request such as '0,1'
    is kept as it is, for Ultralytics' DDP launcher; otherwise its first device is returned.
    ValueError (one paragraph) when the device is not there.
    """
    request = "" if request is None else str(request)
    threads, level = torch.get_num_threads(), LOGGER.level
    LOGGER.setLevel(logging.WARNING)  # its version banner, logged before it raises for a missing GPU
    try:
        device = select_device(request, verbose=False)
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"device '{request}' is not available here ({first}); pass cpu, a GPU index such as 0, or "
                         f"leave the device out for Ultralytics' choice (the first GPU when there is one, else the "
                         f"CPU)") from None
    finally:
        # select_device also sets the CPU thread count; that belongs to whoever runs the work (the
        # Ultralytics trainer / validator call it again), not to resolving a name.
        torch.set_num_threads(threads)
        LOGGER.setLevel(level)
    if multi and "," in parse_device(request):
        return parse_device(request)
    return str(device)


def announce(prog: str, device: str, source: str = "") -> None:
    print(f"{prog}: device {device}" + (f" ({source})" if source else ""), flush=True)


def default_note(request) -> str:
    return "Ultralytics' default; --device to choose" if request in (None, "") else ""


def device_arg(prog: str):
    """An argparse ``type`` for --device (with ``default=""``): resolves, announces, and turns an
    unavailable device into the usual one-line argparse error."""
    def parse(request: str) -> str:
        try:
            device = resolve_device(request)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        announce(prog, device, default_note(request))
        return device

    parse.__name__ = "device"
    return parse
