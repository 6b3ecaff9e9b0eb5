"""Single-tap fast paths (1x1 convs, patch convs with kernel = stride) against the frequency route.

A conv whose polyphase kernel has one tap holds the same matrix at every frequency
(docs/math.md, "What holds for 1x1 convolutions"), so the exact norm, the Gram bound and
the operator bound decompose that matrix once. The alternative timed here, in the same
run and interleaved, is the same function with the fast path switched off (every
frequency matrix formed and decomposed, as before the fast path existed); both give the
same value up to float32 rounding, which is printed.

Run: ``python benchmarks/bench_single_tap.py`` (``--quick`` for a smoke run; ``--device cuda``
on a GPU). Use one thread (``OMP_NUM_THREADS=1``) to compare with the numbers in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from typing import Callable, Iterator, List

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _device import add_device_argument, describe, on_device  # noqa: E402
from _timing import markdown_table, timed_call  # noqa: E402

from ttconv import bounds, spectra  # noqa: E402

# (name, c_out, c_in, kernel, stride, input size): the OCR 1x1 layer, a MobileNet-style
# expansion 1x1, a ViT/Swin-style patch conv (kernel = stride).
LAYERS = [
    ("1x1 480->480, 40x40", 480, 480, 1, 1, 40),
    ("1x1 160->960, 14x14", 960, 160, 1, 1, 14),
    ("patch 4x4/4 3->96, 224x224", 96, 3, 4, 4, 224),
]
QUICK = [("1x1 32->32, 8x8", 32, 32, 1, 1, 8), ("patch 2x2/2 3->8, 8x8", 8, 3, 2, 2, 8)]


@contextlib.contextmanager
def frequency_route() -> Iterator[None]:
    """Switch the single-tap paths off: every frequency matrix is formed and decomposed."""
    saved = spectra.single_tap_matrices, bounds.single_tap_matrices, bounds._is_one_by_one
    spectra.single_tap_matrices = bounds.single_tap_matrices = lambda kernel: None
    bounds._is_one_by_one = lambda spec: False
    try:
        yield
    finally:
        spectra.single_tap_matrices, bounds.single_tap_matrices, bounds._is_one_by_one = saved


def interleaved(fast: Callable[[], torch.Tensor], repeats_slow: int, repeats_fast: int):
    """Median seconds and values of the fast path and the frequency route, runs alternated."""
    fast_times: List[float] = []
    slow_times: List[float] = []
    values = {}

    def run(key: str) -> None:
        values[key] = float(fast())

    fast()  # warm-up
    for index in range(max(repeats_slow, repeats_fast)):
        if index < repeats_fast:
            fast_times.append(timed_call(lambda: run("fast")))
        if index < repeats_slow:
            with frequency_route():
                slow_times.append(timed_call(lambda: run("slow")))
    return statistics.median(fast_times), statistics.median(slow_times), values


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one run each (smoke test)")
    parser.add_argument("--repeats-slow", type=int, default=1, help="runs of the frequency route (default 1)")
    parser.add_argument("--repeats-fast", type=int, default=5, help="runs of the fast path (default 5)")
    add_device_argument(parser)
    options = parser.parse_args(argv)
    with on_device(options.device):
        _run(options)


def _run(options: argparse.Namespace) -> None:
    layers = QUICK if options.quick else LAYERS
    slow_runs, fast_runs = (1, 1) if options.quick else (options.repeats_slow, options.repeats_fast)
    torch.manual_seed(0)
    rows = []
    for name, c_out, c_in, k, stride, n in layers:
        weight = torch.randn(c_out, c_in, k, k) / (c_in * k * k) ** 0.5
        methods = [
            ("exact_spectral_norm", lambda: bounds.exact_spectral_norm(weight, n, stride=stride)),
            ("gram_iteration_bound", lambda: bounds.gram_iteration_bound(weight, n, stride=stride)),
        ]
        if k == 1:
            methods.append(("operator_norm_bound", lambda: bounds.operator_norm_bound(weight, n, padding=0)))
        for method, call in methods:
            fast, slow, values = interleaved(call, slow_runs, fast_runs)
            rows.append([name, method, f"{slow:.3f}", f"{fast:.4f}", f"{slow / fast:.0f}x",
                         f"{abs(values['fast'] - values['slow']) / values['slow']:.1e}"])
    print(f"device: {describe(options.device)}; float32; median seconds")
    print(markdown_table(["layer", "method", "frequency route (s)", "single tap (s)", "speed-up",
                          "relative difference"], rows))


if __name__ == "__main__":
    main()
