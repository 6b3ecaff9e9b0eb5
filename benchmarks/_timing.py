"""Tiny timing helpers shared by the benchmark scripts (medians of wall-clock runs).

Every timed call is bracketed by ``_device.synchronize()``: on CUDA, work is queued and a
clock read without waiting for it would time the launch, not the work (a no-op on the CPU).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(__file__))
from _device import synchronize  # noqa: E402


def timed_call(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn``, queued device work included (CUDA synchronised before
    the clock starts and before it stops)."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median([timed_call(fn) for _ in range(repeats)])


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1, *,
                statistic: Callable[[List[float]], float] = statistics.median,
                rotate: bool = False) -> Dict[str, float]:
    """Median seconds of each function, timed in turn (a, b, c, a, b, c, ...) after a warm-up, so a
    change of machine load hits every side of a ratio alike.

    ``statistic=min``: the fastest round instead (the least disturbed by other processes on a
    shared machine). ``rotate``: the order turns by one every round, so no function always runs
    right after the same other one.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for round_ in range(repeats):
        shift = round_ % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            times[name].append(timed_call(fns[name]))
    return {name: statistic(values) for name, values in times.items()}


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def median_seconds_on_copies(obj, fn: Callable[[object], object], repeats: int = 3) -> float:
    """Median time of ``fn(copy)`` over fresh deep copies of ``obj`` (for in-place operations)."""
    import copy

    times = []
    for _ in range(repeats):
        fresh = copy.deepcopy(obj)
        times.append(timed_call(lambda: fn(fresh)))
    return statistics.median(times)
