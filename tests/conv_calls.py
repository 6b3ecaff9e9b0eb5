"""What the layers hand to torch's convolutions, and whether a known oneDNN crash is met.

``ConvCalls`` records the kernel shape and stride of every ``conv1d/2d/3d`` called inside
the block (a ``TorchFunctionMode``, so it does not matter how ``ttconv`` calls them).

``channels_last_backward_survives`` runs a layer's forward and backward on a channels-last
input in a subprocess, on one thread: torch 2.13's oneDNN corrupts memory in the backward
of a 1 x 1 conv strided along the last axis alone with 2-4 input channels, and a crash
there must not take the test run down.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Tuple

from torch.overrides import TorchFunctionMode


class ConvCalls(TorchFunctionMode):
    """``calls``: ``(kernel shape, stride)`` of every conv1d/2d/3d called inside the block."""

    def __init__(self):
        super().__init__()
        self.calls: List[Tuple[Tuple[int, ...], Tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("conv1d", "conv2d", "conv3d"):
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
            stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * (weight.dim() - 2)
            self.calls.append((tuple(weight.shape[2:]), stride))
        return func(*args, **kwargs)


def channels_last_backward_survives(layer: str) -> subprocess.CompletedProcess:
    """Run ``layer`` (the source of a 2-D layer with 64 input channels, e.g.
    ``"ttconv.SVDConv(64, 64, 1, stride=2, rank=4)"``) forward and backward 30 times on a
    channels-last batch, one thread, in a subprocess; its exit code is 0 when nothing crashed."""
    script = (
        "import torch, ttconv\n"
        "torch.set_num_threads(1); torch.manual_seed(0)\n"
        f"layer = {layer}\n"
        "x = torch.randn(16, 64, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()\n"
        "for _ in range(30):\n"
        "    layer(x).sum().backward()\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


__all__ = ["ConvCalls", "channels_last_backward_survives"]
