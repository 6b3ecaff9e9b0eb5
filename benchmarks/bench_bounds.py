"""Time and tightness of every spectral-norm method on ResNet-18-shaped layers.

Random layers (PyTorch's default init) and the four convs of a small CNN trained for a
few seconds on the offline digits data (skipped if scikit-learn is missing). Tightness is
``value / exact circular sigma_max`` at the layer's input size (>= 1 for upper bounds on
the circular norm; the zero-padding values may be a little below 1, since a zero-padded
operator is smaller than the circular one).

Run: ``python benchmarks/bench_bounds.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
from _device import add_device_argument, describe, on_device  # noqa: E402
from _timing import interleaved, markdown_table, timed_call  # noqa: E402

from ttconv import bounds, conv_singular_values, conv_spectral_norm, spectra  # noqa: E402

# (name, c_in, c_out, kernel, stride, input size) of ResNet-18 on 224x224 inputs.
RESNET18 = [
    ("conv1", 3, 64, 7, 2, 224),
    ("layer1.0.conv1", 64, 64, 3, 1, 56),
    ("layer2.0.conv1", 64, 128, 3, 2, 56),
    ("layer2.0.downsample", 64, 128, 1, 2, 56),
    ("layer2.0.conv2", 128, 128, 3, 1, 28),
    ("layer3.0.conv1", 128, 256, 3, 2, 28),
    ("layer3.0.conv2", 256, 256, 3, 1, 14),
    ("layer4.0.conv1", 256, 512, 3, 2, 14),
    ("layer4.0.conv2", 512, 512, 3, 1, 7),
]

METHODS = [  # (column, function(conv, n), kind)
    ("exact circ", lambda conv, n: bounds.exact_spectral_norm(conv, n)),
    ("FF min", lambda conv, n: bounds.fantastic_four_bound(conv)),
    ("FF power(10)", lambda conv, n: bounds.fantastic_four_bound(conv, method="power", n_iter=10)),
    ("Gram t=6", lambda conv, n: bounds.gram_iteration_bound(conv, n, n_iter=6)),
    ("spatial Gram t=2", lambda conv, n: bounds.spatial_gram_bound(conv, n_iter=2)),
    ("operator bound", lambda conv, n: bounds.operator_norm_bound(conv, n)),
    ("power est(20)", lambda conv, n: bounds.power_iteration_estimate(conv, n, n_iter=20)),
]


def _measure(conv, n):
    cells = []
    exact = None
    for column, method in METHODS:
        result = []
        with torch.no_grad():
            elapsed = timed_call(lambda: result.append(float(method(conv, n))))
        value = result[0]
        exact = exact if exact is not None else value
        cells.append(f"{value / exact:.3f} ({elapsed * 1e3:.0f} ms)" if column != "exact circ"
                     else f"{value:.3f} ({elapsed * 1e3:.0f} ms)")
    return cells


def _batching_rounds(options):
    return 1 if options.quick else 3


def _batching_rows(options):
    """Exact norm and exact spectrum of each multi-tap ResNet-18 layer with the CPU's cache-sized
    frequency batches and with the cap lifted (one batch up to ``max_memory``), interleaved."""
    torch.manual_seed(0)
    shapes = [("tiny", 4, 8, 3, 1, 8)] if options.quick else [s for s in RESNET18 if s[3] > 1]
    capped = spectra._CPU_BATCH_BYTES

    def lifted(fn):
        def run():
            spectra._CPU_BATCH_BYTES = 1 << 60
            try:
                return fn()
            finally:
                spectra._CPU_BATCH_BYTES = capped
        return run

    rows = []
    for name, c_in, c_out, k, stride, n in shapes:
        weight = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2).weight.detach()
        norm = lambda: conv_spectral_norm(weight, n, stride=stride)  # noqa: E731
        values = lambda: conv_singular_values(weight, n, stride=stride)  # noqa: E731
        with torch.no_grad():
            times = interleaved({"norm": norm, "norm one": lifted(norm), "values": values,
                                 "values one": lifted(values)}, _batching_rounds(options), rotate=True)
        rows.append([f"{name} {c_in}->{c_out} k{k} s{stride} n{n}",
                     f"{times['norm'] * 1e3:.0f}", f"{times['norm one'] * 1e3:.0f}",
                     f"{times['norm'] / times['norm one']:.2f}", f"{times['values'] * 1e3:.0f}",
                     f"{times['values one'] * 1e3:.0f}", f"{times['values'] / times['values one']:.2f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)  # progress: a row survives a timeout
    return rows


def _trained_cnn_layers(epochs):
    try:
        from _digits import load_digits, small_cnn, train
    except ImportError:
        return []
    try:
        data = load_digits()
    except ImportError:
        return []
    torch.manual_seed(0)
    model = small_cnn()
    result = train(model, data, epochs=epochs)
    sizes = [16, 16, 16, 8]
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    return [(f"digits CNN conv{i} (acc {result['accuracy']:.2f})", conv, n) for i, (conv, n) in enumerate(zip(convs, sizes))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    add_device_argument(parser)
    options = parser.parse_args(argv)
    with on_device(options.device):
        rows = _rows(options)
        batching = _batching_rows(options) if torch.empty(0).device.type == "cpu" else []
    print(f"torch {torch.__version__}, {describe(options.device)}, float32; cells: value / exact (time)\n")
    print(markdown_table(["layer", *[m[0] for m in METHODS]], rows))
    if batching:
        print("\nThe exact methods' frequency batches on the CPU: at most "
              f"{spectra._CPU_BATCH_BYTES >> 20} MiB of matrices (cache-sized, the default) against one batch as "
              f"large as max_memory (1 GiB) allows, the same kernel, median of {_batching_rounds(options)} "
              "interleaved rounds:\n")
        print(markdown_table(["layer", "norm: cache-sized ms", "one batch ms", "ratio",
                              "all values: cache-sized ms", "one batch ms", "ratio"], batching))


def _rows(options):
    torch.manual_seed(0)
    shapes = [("tiny", 4, 8, 3, 1, 8), ("tiny s2", 4, 8, 3, 2, 8)] if options.quick else RESNET18
    rows = []
    for name, c_in, c_out, k, stride, n in shapes:
        conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2)
        rows.append([f"{name} {c_in}->{c_out} k{k} s{stride} n{n}", *_measure(conv, n)])
    for name, conv, n in _trained_cnn_layers(epochs=1 if options.quick else 10):
        rows.append([name, *_measure(conv, n)])
    return rows


if __name__ == "__main__":
    main()
