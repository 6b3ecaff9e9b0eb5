"""The one ``--device`` option every benchmark takes, and what timing on it needs.

A script adds the option with ``add_device_argument(parser)`` and runs its body inside
``on_device(options.device)``: factory calls without a ``device=`` (``torch.randn``,
``SVDConv(...)``, ``nn.Conv2d(...)``) then land on that device, so the script needs no
``device=`` of its own. On the CPU (the default) nothing is changed: torch's default device
stays unset, since ``torch.set_default_device`` installs a function mode that every torch
call pays for and CPU timings would move.

CUDA runs asynchronously: a wall-clock timer must wait for the queued work before it reads
the clock. ``_timing`` calls ``synchronize()`` around every timed call; scripts with their own
timers do the same.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Iterator, Optional, Union

import torch

DeviceLike = Union[str, torch.device]


def parse_device(text: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available, else the CPU) as a device
    that exists here; ``argparse.ArgumentTypeError`` naming the fix otherwise."""
    name = text.strip().lower()
    if name == "auto":
        return parse_device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a benchmark device; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: CUDA is not available (torch.cuda.is_available() is False); use cpu, or auto"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default ``cpu``); ``options.device`` is a ``torch.device``."""
    parser.add_argument("--device", type=parse_device, default=torch.device("cpu"), metavar="DEVICE",
                        help="where tensors and layers live: cpu (default), cuda, cuda:N, or auto")


@contextlib.contextmanager
def on_device(device: DeviceLike) -> Iterator[torch.device]:
    """Make ``device`` torch's default (and, on CUDA, current) device for the block; nothing
    changes on the CPU.

    On CUDA, TF32 is also switched off for the block, so float32 timings and errors are those
    of float32 arithmetic (torch enables TF32 for cuDNN convolutions by default).
    """
    device = torch.device(device)
    if device.type == "cpu":
        yield device
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with contextlib.ExitStack() as stack:
            if device.type == "cuda":
                stack.enter_context(torch.cuda.device(device))
            stack.enter_context(device)  # torch.device is a context manager: the default for factory calls
            yield device
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synchronize(device: Optional[DeviceLike] = None) -> None:
    """Wait for the device's queued work (CUDA); no-op on the CPU.

    ``device=None`` waits for the current CUDA device (``on_device`` makes the benchmark's
    device current), so a timer needs no device of its own; it does nothing in a process
    that never initialised CUDA.
    """
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return
    if torch.cuda.is_initialized():  # (a Python flag: ~0.1 us inside a timed window on the CPU)
        torch.cuda.synchronize()


def describe(device: DeviceLike) -> str:
    """One line for a benchmark's header: the device and, on CUDA, the card."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_memory_reset(device: DeviceLike) -> None:
    """Start a peak-memory measurement on CUDA (``peak_memory_bytes``); no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: DeviceLike) -> Optional[int]:
    """Peak CUDA memory allocated since ``peak_memory_reset``; None off CUDA (measure the
    process there, e.g. with ``resource`` or ``tracemalloc``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))
