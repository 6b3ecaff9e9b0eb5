"""Cost of one singular-value control pass: SVDConv (core) vs the same on dense convs (FFT).

A ResNet-18-like stack of 3x3 convs (widths 64-512, input sizes 56-7), as SVDConv at rank
c/4 and as dense nn.Conv2d; times ``SpectralControl.apply()`` with every layer above the
target (so every layer is scaled or clipped), and one training step of the model for scale.

Run: ``python benchmarks/bench_control.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import markdown_table, median_seconds, median_seconds_on_copies  # noqa: E402

import ttconv  # noqa: E402


def resnet_like(widths, quick=False):
    layers, c_in = [], 3
    for index, width in enumerate(widths):
        stride = 1 if index == 0 else 2
        layers += [nn.Conv2d(c_in, width, 3, stride=stride, padding=1), nn.ReLU(),
                   nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args(argv)
    widths, size, batch, repeats = ([8, 16], 8, 2, 1) if options.quick else ([64, 128, 256, 512], 56, 32, 1)
    torch.manual_seed(0)
    dense = resnet_like(widths)
    low = ttconv.convert(dense, rank=0.25)
    example = torch.zeros(1, 3, size, size)
    x = torch.randn(batch, 3, size, size)
    rows = []
    for label, model in (("nn.Conv2d (dense FFT)", dense), ("SVDConv r=c/4 (core)", low)):
        def train_step(model=model):
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        step = median_seconds(train_step, repeats)
        cells = [label, f"{step * 1e3:.0f}"]
        for mode in ("scale", "clip"):
            # A tiny target so that every layer is above it and gets rescaled or clipped.
            control = ttconv.SpectralControl(model, 1e-3, every=1, mode=mode, example_input=example)
            seconds = median_seconds_on_copies(control, lambda c: c.apply(), repeats)
            cells += [f"{seconds * 1e3:.0f}", f"{seconds / step:.2f}"]
        rows.append(cells)
    for column in (2, 4):
        rows[1].append(f"{float(rows[0][column]) / float(rows[1][column]):.1f}x")
    rows[0] += ["", ""]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; widths {widths}, input {size}x{size}, "
          f"batch {batch}\n")
    header = ["model", "train step ms", "scale pass ms", "/ step", "clip pass ms", "/ step",
              "scale speed-up", "clip speed-up"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
