"""How fast do U and V drift from orthonormality in training, and what does keeping them cost?

Compares the design ttconv uses (plain parameters, spectra computed through a QR of U
and V so they are exact at any time, and ``canonicalize_()`` outside ``forward``) with
``torch.nn.utils.parametrizations.orthogonal`` on U and V (orthonormal by construction,
paid in every forward and backward).

Run: ``python benchmarks/bench_orthonormality.py`` (``--quick`` for a smoke run; ``--device cuda``
on a GPU).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.nn.utils import parametrizations

sys.path.insert(0, os.path.dirname(__file__))
from _device import add_device_argument, describe, on_device  # noqa: E402
from _timing import markdown_table, median_seconds  # noqa: E402

from ttconv import SVDConv  # noqa: E402
from ttconv.spectra import conv_singular_values  # noqa: E402
from ttconv.tt import orthonormality_error  # noqa: E402


def drift_table(channels, rank, steps, checkpoints, lr):
    torch.manual_seed(0)
    teacher = nn.Conv2d(channels, channels, 3, padding=1)
    rows = []
    for name, make_opt in (("SGD(momentum=0.9)", lambda p: torch.optim.SGD(p, lr=lr * 10, momentum=0.9)),
                           ("Adam", lambda p: torch.optim.Adam(p, lr=lr))):
        torch.manual_seed(1)
        layer = SVDConv(channels, channels, 3, padding=1, rank=rank)
        optimizer = make_opt(layer.parameters())
        for step in range(1, steps + 1):
            x = torch.randn(8, channels, 8, 8)
            loss = (layer(x) - teacher(x).detach()).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step in checkpoints:
                with torch.no_grad():
                    exact = float(layer.spectral_norm(8))
                    # What a method that trusts U, V to be orthonormal would report.
                    naive = float(conv_singular_values(layer.S[:, None, None, None] * layer.core, 8)[0])
                    reference = float(conv_singular_values(layer.dense_weight(), 8)[0])
                rows.append([name, str(step), f"{orthonormality_error(layer.U):.1e}", f"{orthonormality_error(layer.V):.1e}",
                             f"{abs(naive - reference) / reference:.1e}", f"{abs(exact - reference) / reference:.1e}"])
    header = ["optimizer", "steps", "|U^T U - I|max", "|V^T V - I|max", "rel. err, core as is", "rel. err, ttconv (QR)"]
    return markdown_table(header, rows)


def cost_table(shapes, batch, repeats):
    rows = []
    for channels, size in shapes:
        rank = channels // 4
        x = torch.randn(batch, channels, size, size)
        plain = SVDConv(channels, channels, 3, padding=1, rank=rank)
        constrained = SVDConv(channels, channels, 3, padding=1, rank=rank)
        parametrizations.orthogonal(constrained, "U")
        parametrizations.orthogonal(constrained, "V")

        def train_step(module):
            def step():
                module.zero_grad(set_to_none=True)
                module(x).sum().backward()
            return step

        base = median_seconds(train_step(plain), repeats)
        param = median_seconds(train_step(constrained), repeats)
        canon = median_seconds(plain.canonicalize_, repeats)
        rows.append([f"{channels}x{size}x{size}", str(rank), f"{base * 1e3:.1f}", f"{param * 1e3:.1f} ({param / base:.2f}x)",
                     f"{canon * 1e3:.2f} ({canon / base:.3f}x)"])
    header = ["input", "rank", "fwd+bwd plain ms", "fwd+bwd parametrize.orthogonal ms", "one canonicalize_() ms"]
    return markdown_table(header, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    add_device_argument(parser)
    options = parser.parse_args(argv)
    with on_device(options.device):
        _run(options)


def _run(options: argparse.Namespace) -> None:
    if options.quick:
        drift = dict(channels=8, rank=2, steps=3, checkpoints={3}, lr=1e-3)
        shapes, batch, repeats = [(16, 8)], 2, 1
    else:
        drift = dict(channels=64, rank=16, steps=1000, checkpoints={10, 100, 1000}, lr=1e-3)
        shapes, batch, repeats = [(64, 56), (256, 14), (512, 7)], 32, 5
    print(f"torch {torch.__version__}, {describe(options.device)}\n")
    print("Drift of U, V during training without any retraction, and the error of the spectral norm")
    print("if the core were used as is versus through ttconv's QR (n = 8, circular):\n")
    print(drift_table(**drift))
    print(f"\nCost per training step, batch {batch}, 3x3 convs, rank c/4:\n")
    print(cost_table(shapes, batch, repeats))


if __name__ == "__main__":
    main()
