"""Per-layer progress lines with the time each layer took, for reports and control passes.

Same convention as ``convert(progress=...)``: ``True`` prints one line per layer on
stderr, ``False`` is silent, a callable ``(done, total, name)`` is called after each layer.
``None`` means "the function's default" (``default``), which for ``spectral_report`` is
"on when stderr is a terminal".
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO, Union

ProgressFn = Callable[[int, int, str], None]
ProgressArg = Union[None, bool, ProgressFn]


def interactive(stream: Optional[TextIO] = None) -> bool:
    """Whether ``stream`` (stderr by default) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # a closed stream
        return False


class Progress:
    """Calls ``report(done, total, name)`` or prints ``[done/total] name  1.23 s`` per item.

    ``step(name, detail='')`` marks one item done; the time is measured since the
    previous step (or since construction).
    """

    def __init__(self, total: int, callback: Optional[ProgressFn] = None, stream: Optional[TextIO] = None) -> None:
        self.total, self.callback, self.stream = total, callback, stream
        self.done = 0
        self.last = time.perf_counter()

    def step(self, name: str, detail: str = "") -> None:
        self.done += 1
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        if self.callback is not None:
            self.callback(self.done, self.total, name)
        if self.stream is not None:
            extra = f"  {detail}" if detail else ""
            print(f"[{self.done}/{self.total}] {name}  {seconds:.2f} s{extra}", file=self.stream, flush=True)


def progress_for(progress: ProgressArg, total: int, *, default: bool = False,
                 stream: Optional[TextIO] = None) -> Optional[Progress]:
    """A ``Progress`` for ``total`` items, or None when silent.

    ``progress``: ``True`` lines on ``stream`` (stderr); ``False`` silent; ``None`` the
    ``default``; a callable is called as ``(done, total, name)`` after each item.
    """
    if progress is None:
        progress = default
    if progress is True:
        return Progress(total, stream=sys.stderr if stream is None else stream)
    if progress is False:
        return None
    if not callable(progress):
        raise TypeError(f"progress must be a bool or a callable(done, total, name), got {progress!r}")
    return Progress(total, callback=progress)


# Convert's callback form (a phase may restart the count: budget search, then conversion).
def stream_progress(stream: TextIO) -> ProgressFn:
    """A callback printing one progress line per item to ``stream``: ``[3/20] layer2.0.conv1``."""

    def report(done: int, total: int, name: str) -> None:
        print(f"[{done}/{total}] {name}", file=stream, flush=True)

    return report


def progress_callback(progress: Union[None, bool, ProgressFn]) -> Optional[ProgressFn]:
    """``True``: progress lines on stderr; a callable is used as is; ``None``/``False``: silent."""
    if progress is True:
        return stream_progress(sys.stderr)
    if progress is None or progress is False:
        return None
    if not callable(progress):
        raise TypeError(f"progress must be a bool or a callable(done, total, name), got {progress!r}")
    return progress
