"""Tiny timing helpers shared by the benchmark scripts (medians of wall-clock runs)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Median seconds of each function, timed in turn (a, b, c, a, b, c, ...) after a warm-up, so a
    change of machine load hits every side of a ratio alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


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
        start = time.perf_counter()
        fn(fresh)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
