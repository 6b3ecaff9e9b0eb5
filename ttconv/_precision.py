"""Spectra, bounds and control always compute in float32/float64, whatever autocast says."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def full_precision(fn: F) -> F:
    """Run ``fn`` with autocast disabled (CPU, and CUDA when present)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
