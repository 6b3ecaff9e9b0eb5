"""Singular-value control: cost of one pass per mode, and how far plain clipping overshoots.

1. Cost: a ResNet-18-like stack of 3x3 convs (widths 64-512, input sizes 56-7), as SVDConv
   at rank c/4 and as dense nn.Conv2d; times ``SpectralControl.apply()`` in each mode
   (``scale``, ``clip``, ``clip_scale``; interleaved, on fresh copies; median of 3 runs
   for SVDConv, one run for the dense model, whose passes take minutes) with every layer
   above the target, and one training step of the model for scale. The last column is the
   largest norm the plain clip pass leaves, over the target (``clip_scale`` ends at the
   target by construction).
2. Overshoot: random float64 layers (half nn.Conv2d, half SVDConv; channels 1-16 incl.
   groups, kernels 1x1-5x5, stride and dilation 1-2), each clipped once at a target that is
   a fraction of its own exact norm; the norm reached over the target, for plain clip
   (``n_iter`` 1 and 10) and for ``clip_scale``.

Run: ``python benchmarks/bench_control.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import markdown_table, median_seconds  # noqa: E402

import ttconv  # noqa: E402

MODES = ("scale", "clip", "clip_scale")


def resnet_like(widths):
    layers, c_in = [], 3
    for index, width in enumerate(widths):
        stride = 1 if index == 0 else 2
        layers += [nn.Conv2d(c_in, width, 3, stride=stride, padding=1), nn.ReLU(),
                   nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))


def control_costs(widths, size, batch, repeats):
    """``repeats``: (dense, SVDConv) runs per mode, interleaved; medians reported."""
    torch.manual_seed(0)
    dense = resnet_like(widths)
    low = ttconv.convert(dense, rank=0.25)
    example = torch.zeros(1, 3, size, size)
    x = torch.randn(batch, 3, size, size)
    target = 1e-3  # tiny, so that every layer is above it and gets scaled or clipped
    rows, medians_by_model = [], []
    for label, model, runs in (("nn.Conv2d (dense FFT)", dense, repeats[0]), ("SVDConv r=c/4 (core)", low, repeats[1])):
        def train_step(model=model):
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        step = median_seconds(train_step, runs)
        times = {mode: [] for mode in MODES}
        overshoot = 0.0
        for _ in range(runs):
            for mode in MODES:  # interleaved
                control = ttconv.SpectralControl(copy.deepcopy(model), target, every=1, mode=mode,
                                                 example_input=example)
                start = time.perf_counter()
                reached = control.apply()
                times[mode].append(time.perf_counter() - start)
                if mode == "clip":
                    overshoot = max(reached.values()) / target
        medians = {mode: statistics.median(times[mode]) for mode in MODES}
        cells = [label, f"{step * 1e3:.0f}"]
        for mode in MODES:
            cells += [f"{medians[mode] * 1e3:.0f}", f"{medians[mode] / step:.2f}"]
        rows.append(cells + [f"{medians['clip_scale'] / medians['clip']:.2f}", f"{overshoot:.2f}"])
        medians_by_model.append(medians)
    speedup = ["speed-up (dense / SVDConv)", ""]
    for mode in MODES:
        speedup += [f"{medians_by_model[0][mode] / medians_by_model[1][mode]:.1f}x", ""]
    rows.append(speedup + ["", ""])
    header = ["model", "train step ms"]
    for mode in MODES:
        header += [f"{mode} pass ms", "/ step"]
    return markdown_table(header + ["clip_scale / clip", "clip: max sigma / target"], rows)


def random_layers(count, seed):
    rng = random.Random(seed)
    layers = []
    while len(layers) < count:
        groups = rng.choice([1, 1, 1, 2, 3, 4])
        c_in, c_out = groups * rng.randint(1, 16 // groups), groups * rng.randint(1, 16 // groups)
        kernel = (rng.randint(1, 5), rng.randint(1, 5))
        stride = rng.choice([(1, 1), (1, 1), (2, 2), (1, 2)])
        dilation = rng.choice([(1, 1), (1, 1), (2, 2), (1, 2)])
        extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
        n = tuple(s * -(-(e + rng.randint(0, 4)) // s) for e, s in zip(extent, stride))
        if c_in * n[0] * n[1] > 2000:
            continue
        conv = dict(in_channels=c_in, out_channels=c_out, kernel_size=kernel, stride=stride, dilation=dilation,
                    groups=groups, dtype=torch.float64)
        torch.manual_seed(len(layers))
        layer = nn.Conv2d(**conv) if len(layers) % 2 else ttconv.SVDConv(**conv)
        layers.append((layer, n))
    return layers


def overshoot_table(count, fractions):
    layers = random_layers(count, seed=0)
    rows = []
    for fraction in fractions:
        ratios = {"clip 1": [], "clip 10": [], "clip_scale": []}
        for layer, n in layers:
            with torch.no_grad():
                sigma = float(ttconv.spectral_norm(layer, n))
            target = fraction * sigma
            for key, n_iter in (("clip 1", 1), ("clip 10", 10)):
                reached = ttconv.clip_singular_values_(copy.deepcopy(layer), target, n, n_iter=n_iter)
                ratios[key].append(reached / target)
            guaranteed = copy.deepcopy(layer)
            control = ttconv.SpectralControl(nn.Sequential(guaranteed), target, every=1, mode="clip_scale",
                                             example_input=torch.zeros(1, layer.in_channels, *n, dtype=torch.float64))
            ratios["clip_scale"].append(control.apply()["0"] / target)
        rows.append([f"{fraction:g}", str(len(layers)),
                     f"{max(ratios['clip 1']):.3f}", f"{statistics.median(ratios['clip 1']):.3f}",
                     f"{max(ratios['clip 10']):.3f}", f"{statistics.median(ratios['clip 10']):.3f}",
                     f"{max(ratios['clip_scale']):.3f}"])
    header = ["target / sigma", "layers", "clip n_iter=1: max", "median", "clip n_iter=10: max", "median",
              "clip_scale: max"]
    return markdown_table(header, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args(argv)
    if options.quick:
        widths, size, batch, repeats, count, fractions = [8, 16], 8, 2, (1, 1), 6, (0.5,)
    else:
        widths, size, batch, repeats, count = [64, 128, 256, 512], 56, 32, (1, 3), 200
        fractions = (0.9, 0.5, 0.25, 0.1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; widths {widths}, input {size}x{size}, "
          f"batch {batch}, target 1e-3\n")
    print(control_costs(widths, size, batch, repeats))
    print(f"\nNorm reached / target after one control of {count} random float64 layers (exact circular norms):\n")
    print(overshoot_table(count, fractions))


if __name__ == "__main__":
    main()
