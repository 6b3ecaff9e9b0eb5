"""Orthogonal-core SVDConv vs general SVDConv vs nn.Conv2d; exact O(r) clip vs FFT clip.

Run: ``python benchmarks/bench_orthogonal.py`` (``--quick`` for a smoke run).
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

SHAPES = [(64, 32), (128, 16), (256, 8)]  # (channels, input size), 3x3, batch 32


def _train_step(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args(argv)
    shapes, batch, repeats = ([(8, 8)], 2, 1) if options.quick else (SHAPES, 32, 5)
    rows, clip_rows = [], []
    for channels, size in shapes:
        torch.manual_seed(0)
        x = torch.randn(batch, channels, size, size)
        layers = {
            "nn.Conv2d": nn.Conv2d(channels, channels, 3, padding=1),
            "SVDConv general r=c/4": ttconv.SVDConv(channels, channels, 3, padding=1, rank=channels // 4),
            "SVDConv orthogonal r=c/4": ttconv.SVDConv(channels, channels, 3, padding=1, rank=channels // 4,
                                                       core="orthogonal", max_singular_value=1.0),
            "SVDConv general r=c": ttconv.SVDConv(channels, channels, 3, padding=1),
            "SVDConv orthogonal r=c": ttconv.SVDConv(channels, channels, 3, padding=1, core="orthogonal",
                                                     max_singular_value=1.0),
        }
        base_fwd = base_bwd = None
        for label, layer in layers.items():
            with torch.no_grad():
                fwd = median_seconds(lambda: layer(x), repeats)
            bwd = median_seconds(_train_step(layer, x), repeats)
            base_fwd, base_bwd = base_fwd or fwd, base_bwd or bwd
            rows.append([f"{channels}x{size}x{size}" if label == "nn.Conv2d" else "", label,
                         f"{fwd * 1e3:.1f}", f"{fwd / base_fwd:.2f}", f"{bwd * 1e3:.1f}", f"{bwd / base_bwd:.2f}"])
        for rank_label in ("r=c/4", "r=c"):
            general = layers[f"SVDConv general {rank_label}"]
            orthogonal = layers[f"SVDConv orthogonal {rank_label}"]
            fft = median_seconds_on_copies(general, lambda layer: ttconv.clip_singular_values_(layer, 0.5, size), 1)
            exact = median_seconds_on_copies(orthogonal, lambda layer: ttconv.clip_singular_values_(layer, 0.5, size),
                                             repeats)
            clip_rows.append([f"{channels}x{size}x{size} {rank_label}", f"{fft * 1e3:.1f}", f"{exact * 1e3:.2f}",
                              f"{fft / exact:.0f}x"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, 3x3, padding 1\n")
    print(markdown_table(["input", "layer", "fwd ms", "/ Conv2d", "fwd+bwd ms", "/ Conv2d"], rows))
    print("\nOne clip to sigma <= 0.5 (includes the exact norm computed afterwards):\n")
    print(markdown_table(["layer", "general: FFT clip ms", "orthogonal: exact clip ms", "speed-up"], clip_rows))


if __name__ == "__main__":
    main()
