"""SVDConv vs nn.Conv2d (forward, forward+backward), the 1-D, 3-D and transposed layers vs
their torch counterparts, and core vs dense exact spectra.

Run: ``python benchmarks/bench_layer.py`` (``--quick`` for a smoke run). Prints three
markdown tables; every time is a median over repeats with the layers timed interleaved
(one call of each per round), every ratio is against the torch layer timed in the same
rounds.

Forward+backward is timed with an input that requires grad, as for every layer inside a
network but the first: then torch's conv computes the input gradient too, as the SVD
conv's inner convolutions must. The "first layer" column times an input without grad,
where ``nn.Conv2d`` skips the input gradient (2 of its 3 convolution-sized products) while
the factored path still needs it for its core conv (math in
``../shared/reference/performance-limits.md``: the full-rank limit is 1 + min(2c/(BHW), 2/k^2)).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _device import add_device_argument, describe, on_device  # noqa: E402
from _timing import interleaved, markdown_table  # noqa: E402

from ttconv import SVDConv, SVDConv1d, SVDConv3d, SVDConvTranspose2d, conv_singular_values  # noqa: E402
from ttconv.spectra import conjugate_representatives  # noqa: E402

# (SVD class, torch class, channels, kernel, stride, padding, input spatial size)
ND_SHAPES = [
    (SVDConv1d, nn.Conv1d, 128, 5, 1, 2, (2048,)),
    (SVDConv3d, nn.Conv3d, 32, 3, 1, 1, (16, 16, 16)),
    (SVDConvTranspose2d, nn.ConvTranspose2d, 64, 4, 2, 1, (32, 32)),
]
ND_QUICK = [
    (SVDConv1d, nn.Conv1d, 8, 5, 1, 2, (64,)),
    (SVDConv3d, nn.Conv3d, 4, 3, 1, 1, (6, 6, 6)),
    (SVDConvTranspose2d, nn.ConvTranspose2d, 8, 4, 2, 1, (8, 8)),
]

RESNET_SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # (channels, spatial size), 3x3 convs
# (layer class, channels, input size), rank c/4, kernel 3 (5 in 1-D)
SPECTRUM_SHAPES = [(SVDConv, 256, (16, 16)), (SVDConv, 256, (32, 32)), (SVDConv, 512, (16, 16)),
                   (SVDConv, 512, (32, 32)), (SVDConv1d, 256, (1024,)), (SVDConv1d, 512, (512,)),
                   (SVDConv3d, 64, (8, 8, 8)), (SVDConv3d, 128, (8, 8, 8))]
SPECTRUM_QUICK = [(SVDConv, 16, (8, 8)), (SVDConv1d, 16, (16,)), (SVDConv3d, 8, (4, 4, 4))]


def _forward_backward(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        if x.grad is not None:
            x.grad = None
        module(x).sum().backward()

    return step


def _time_against_torch(torch_layer, candidates, x, repeats):
    """``{label: (fwd, fwd+bwd, fwd+bwd first layer)}`` seconds, torch's layer under ``None``;
    every layer timed interleaved with the others."""
    layers = {None: torch_layer, **dict(candidates)}
    with torch.no_grad():
        fwd = interleaved({k: (lambda m=m: m(x)) for k, m in layers.items()}, repeats)
    inner = x.detach().requires_grad_(True)
    bwd = interleaved({k: _forward_backward(m, inner) for k, m in layers.items()}, repeats)
    first = interleaved({k: _forward_backward(m, x) for k, m in layers.items()}, repeats)
    return {k: (fwd[k], bwd[k], first[k]) for k in layers}


HEADER = ["fwd ms", "fwd / {0}", "fwd+bwd ms", "fwd+bwd / {0}", "first layer fwd+bwd / {0}"]


def _rows(first_cell, torch_name, candidates, times, x, label_of):
    fwd0, bwd0, first0 = times[None]
    rows = [[first_cell, torch_name, "-", f"{fwd0 * 1e3:.1f}", "1.00", f"{bwd0 * 1e3:.1f}", "1.00", "1.00"]]
    for label, layer in candidates:
        fwd, bwd, first = times[label]
        rows.append(["", label_of(label, layer), layer.choose_path(tuple(x.shape)), f"{fwd * 1e3:.1f}",
                     f"{fwd / fwd0:.2f}", f"{bwd * 1e3:.1f}", f"{bwd / bwd0:.2f}", f"{first / first0:.2f}"])
    return rows


def layer_table(shapes, batch, repeats):
    rows = []
    for channels, size in shapes:
        x = torch.randn(batch, channels, size, size)
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        candidates = [("full", SVDConv.from_conv2d(conv)), ("c/4", SVDConv(channels, channels, 3, padding=1, rank=channels // 4))]
        times = _time_against_torch(conv, candidates, x, repeats)
        rows += _rows(f"{channels}x{size}x{size}", "Conv2d", candidates, times, x,
                      lambda label, layer: f"SVDConv r={label} {layer.ranks[0]}")
    header = ["input (c x n x n)", "layer", "auto path"] + [h.format("Conv2d") for h in HEADER]
    return markdown_table(header, rows)


def nd_table(shapes, batch, repeats):
    """The 1-D, 3-D and transposed layers against their torch counterparts, timed in the same run."""
    rows = []
    for svd_class, torch_class, channels, kernel, stride, padding, size in shapes:
        x = torch.randn(batch, channels, *size)
        conv = torch_class(channels, channels, kernel, stride=stride, padding=padding)
        candidates = [("full", svd_class.from_conv(conv)),
                      ("c/4", svd_class(channels, channels, kernel, stride=stride, padding=padding, rank=channels // 4))]
        times = _time_against_torch(conv, candidates, x, repeats)
        rows += _rows(f"{channels}x{'x'.join(map(str, size))}", torch_class.__name__, candidates, times, x,
                      lambda label, layer: f"{svd_class.__name__} r={label} {layer.ranks[0]}")
    header = ["input (c x size)", "layer", "auto path"] + [h.format("torch") for h in HEADER]
    return markdown_table(header, rows)


def spectrum_table(shapes, repeats):
    """Core vs dense exact spectrum, and the limit LAPACK sets on this machine: the time of
    ``svdvals`` on the dense method's batch of ``c x c`` complex matrices (one frequency of each
    conjugate pair) over the
    same batch of ``r x r`` ones (the SVDs are ~85% of either method; the FLOP ratio
    ``(c/r)^3 = 64`` assumes equal efficiency, which small matrices do not get). Each time is
    the fastest of the rounds, the order rotating every round: on this shared 2-core machine
    the medians of single runs moved the limit column between 28x and 36x."""
    rows = []
    header = ["layer", "c", "r", "n", "core ms", "dense FFT ms", "speed-up", "LAPACK limit (svdvals c / r)",
              "max abs diff"]
    print(" | ".join(header), file=sys.stderr, flush=True)
    for cls, channels, n in shapes:
        rank = channels // 4
        kernel = 5 if len(n) == 1 else 3
        layer = cls(channels, channels, kernel, padding=kernel // 2, rank=rank)
        weight = layer.dense_weight().detach()
        batch = len(conjugate_representatives(n))
        small = torch.randn(batch, rank, rank, dtype=torch.complex64)
        large = torch.randn(batch, channels, channels, dtype=torch.complex64)
        with torch.no_grad():
            times = interleaved({"core": lambda: layer.singular_values(n),
                                 "dense": lambda: conv_singular_values(weight, n),
                                 "svd r": lambda: torch.linalg.svdvals(small),
                                 "svd c": lambda: torch.linalg.svdvals(large)}, repeats, warmup=1,
                                statistic=min, rotate=True)
            diff = float((layer.singular_values(n) - conv_singular_values(weight, n)).abs().max())
        rows.append([cls.__name__, str(channels), str(rank), "x".join(map(str, n)), f"{times['core'] * 1e3:.1f}", f"{times['dense'] * 1e3:.1f}",
                     f"{times['dense'] / times['core']:.1f}x", f"{times['svd c'] / times['svd r']:.1f}x",
                     f"{diff:.1e}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)  # progress: a row survives a timeout
    return markdown_table(header, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke test)")
    parser.add_argument("--batch", type=int, default=32)
    add_device_argument(parser)
    options = parser.parse_args(argv)
    if options.quick:
        layers, spectra, batch, repeats, nd = [(16, 8)], SPECTRUM_QUICK, 2, 1, ND_QUICK
    else:
        layers, spectra, batch, repeats, nd = RESNET_SHAPES, SPECTRUM_SHAPES, options.batch, 5, ND_SHAPES
    print(f"torch {torch.__version__}, {describe(options.device)}, batch {batch}, 3x3 convs, padding 1\n")
    with on_device(options.device):
        print(layer_table(layers, batch, repeats))
        print()
        print(nd_table(nd, min(batch, 8), repeats))
        print()
        # On CUDA one timed round: the dense method's batched c x c SVDs take seconds per call
        # on cuSOLVER (4.3 s at c = 256, n = 16 on an H200), and the largest shape ~30x that.
        print(spectrum_table(spectra, 1 if options.device.type == "cuda" else repeats))


if __name__ == "__main__":
    main()
