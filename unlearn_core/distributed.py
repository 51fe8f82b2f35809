"""Which process this is when training runs under `torchrun` / `accelerate launch`.

With one process (the usual case) nothing here touches torch.distributed. With several, the
shared `accelerate.PartialState` is created first, so the model and the fixed sets load onto this
process's own device (not cuda:0 on every rank), and only the main process writes run files.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _state():
    from accelerate import PartialState

    # Without a GPU, accelerate makes a multi-process CPU group (gloo) only when asked for the CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return world_size() == 1 or _state().is_main_process


def wait_for_everyone() -> None:
    """A barrier across the processes (nothing with one process)."""
    if world_size() > 1:
        _state().wait_for_everyone()


def process_device() -> torch.device:
    """This process's device when several processes train together (one GPU each, or the CPU)."""
    return _state().device
