"""Orthogonal-core SVD convs vs general ones vs torch's convs; exact O(r) clip vs FFT clip.

Run: ``python benchmarks/bench_orthogonal.py`` (``--quick`` for a smoke run). Every layer of
one input shape is timed in the same run, interleaved (``_timing.interleaved``), so a change
of machine load hits each side of a ratio alike. Rows: 2-D (the Conv2d shapes) and one 1-D
and one 3-D shape (``SVDConv1d`` / ``SVDConv3d`` with ``core_kind='orthogonal'``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _device import add_device_argument, describe, on_device  # noqa: E402
from _timing import interleaved, markdown_table, median_seconds_on_copies  # noqa: E402

import ttconv  # noqa: E402
from ttconv.orthogonal import orthonormal_basis, skew_matrix_exp  # noqa: E402

# (dims, channels, input size): kernel 3 per axis, padding 1, batch 32.
SHAPES = [(2, 64, 32), (2, 128, 16), (2, 256, 8), (1, 256, 64), (3, 64, 8)]
TORCH = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SVD = {1: ttconv.SVDConv1d, 2: ttconv.SVDConv, 3: ttconv.SVDConv3d}


def _train_step(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
    return step


def _inner_layer_step(module, x):
    """A training step of a layer inside a network: its input needs a gradient too."""
    x = x.detach().requires_grad_()

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()
    return step


def _stored_path_rows():
    import json

    from bench_path_calibration import PATHS3, orthogonal_choices

    rows = json.load(open(os.path.join(os.path.dirname(__file__), os.pardir, "tests", "data",
                                       "orthogonal_path_timings.json")))
    regimes = {("fwd eval", False): "eval forward", ("fwd+bwd", False): "fwd+bwd, first layer",
               ("fwd+bwd", True): "fwd+bwd, inner layer"}
    table = []
    for (mode, grad), name in regimes.items():
        ratios: dict = {policy: [] for policy in ("auto", "two", *PATHS3)}
        for row in rows:
            if (row["mode"], row["input_grad"]) == (mode, grad):
                best = min(row[p] for p in PATHS3)
                for policy, path in orthogonal_choices(row).items():
                    ratios[policy].append(row[path] / best)
        table.append([name, str(len(ratios["auto"]))] + [
            f"{sum(r) / len(r):.3f} ({sum(x > 1.1 for x in r)})" for r in ratios.values()])
    return table


def _paths_taken(layer, x) -> str:
    if not hasattr(layer, "choose_path"):  # a torch layer
        return ""
    if layer.path != "auto":
        return layer.path
    shape = tuple(x.shape)
    return " / ".join(layer.choose_path(shape, backward=backward, input_requires_grad=grad)
                      for backward, grad in ((False, False), (True, False), (True, True)))


def _forward(module, x):
    def run():
        with torch.no_grad():
            module(x)
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    add_device_argument(parser)
    options = parser.parse_args(argv)
    with on_device(options.device):
        _run(options)


def _run(options) -> None:
    shapes, batch, repeats = ([(2, 8, 8), (1, 8, 8), (3, 4, 4)], 2, 1) if options.quick else (SHAPES, 32, 15)
    rows, clip_rows = [], []
    for dims, channels, size in shapes:
        torch.manual_seed(0)
        x = torch.randn(batch, channels, *(size,) * dims)
        dense, svd = TORCH[dims], SVD[dims]
        name = svd.__name__
        layers = {
            dense.__name__: dense(channels, channels, 3, padding=1),
            f"{name} general r=c/4": svd(channels, channels, 3, padding=1, rank=channels // 4),
            f"{name} orthogonal r=c/4": svd(channels, channels, 3, padding=1, rank=channels // 4,
                                            core_kind="orthogonal", max_singular_value=1.0),
            f"{name} general r=c": svd(channels, channels, 3, padding=1),
            f"{name} orthogonal r=c": svd(channels, channels, 3, padding=1, core_kind="orthogonal", max_singular_value=1.0),
            f"{name} orthogonal r=c, dense path": svd(channels, channels, 3, padding=1, core_kind="orthogonal",
                                                       max_singular_value=1.0, path="dense"),
        }
        forward = interleaved({label: _forward(layer, x) for label, layer in layers.items()}, repeats)
        train = interleaved({label: _train_step(layer, x) for label, layer in layers.items()}, repeats)
        inner = interleaved({label: _inner_layer_step(layer, x) for label, layer in layers.items()}, repeats)
        base = dense.__name__
        for label, layer in layers.items():
            shape = f"{channels}x" + "x".join([str(size)] * dims)
            rows.append([shape if label == base else "", label, _paths_taken(layer, x), f"{forward[label] * 1e3:.1f}",
                         f"{forward[label] / forward[base]:.2f}", f"{train[label] * 1e3:.1f}",
                         f"{train[label] / train[base]:.2f}", f"{inner[label] * 1e3:.1f}",
                         f"{inner[label] / inner[base]:.2f}"])
        if dims != 2:
            continue
        for rank_label in ("r=c/4", "r=c"):
            general = layers[f"{name} general {rank_label}"]
            orthogonal = layers[f"{name} orthogonal {rank_label}"]
            fft = median_seconds_on_copies(general, lambda layer: ttconv.clip_singular_values_(layer, 0.5, size), 1)
            exact = median_seconds_on_copies(orthogonal, lambda layer: ttconv.clip_singular_values_(layer, 0.5, size),
                                             repeats)
            clip_rows.append([f"{channels}x{size}x{size} {rank_label}", f"{fft * 1e3:.1f}", f"{exact * 1e3:.2f}",
                              f"{fft / exact:.0f}x"])
    print(f"torch {torch.__version__}, {describe(options.device)}, batch {batch}, kernel 3 per axis, "
          "padding 1; each shape's layers timed interleaved\n")
    print("fwd+bwd: the input needs no gradient (a network's first layer: the weight gradients only); "
          "inner layer: it does (every other layer), so the conv also computes its input gradient.\n")
    print("paths: the forward path each SVD layer takes in the three measurements (fwd / fwd+bwd / inner "
          "layer): its path, or what path='auto' chose.\n")
    print(markdown_table(["input", "layer", "paths", "fwd ms", "/ torch", "fwd+bwd ms", "/ torch",
                          "inner layer fwd+bwd ms", "/ torch"], rows))
    print("\nOne clip to sigma <= 0.5 (includes the exact norm computed afterwards):\n")
    print(markdown_table(["layer", "general: FFT clip ms", "orthogonal: exact clip ms", "speed-up"], clip_rows))
    print("\nThe core's exponential H = exp(A - A^T), forward and backward, r = 256: ttconv's sized Taylor "
          "(`skew_matrix_exp`) vs `torch.linalg.matrix_exp` with torch's backward, timed interleaved. A fresh "
          "layer's generator is 0; training moves it (scale: the generator's entries' standard deviation):\n")
    print(markdown_table(["generator scale", "torch.linalg.matrix_exp ms", "skew_matrix_exp ms", "speed-up"],
                         _exponential_rows(8 if options.quick else 256, repeats, options.device)))

    print("\nThe forward path of orthogonal cores on the stored grid of tests/data/orthogonal_path_timings.json "
          "(3 x 3 layers, 16-512 channels, maps 7-56, rank c, c/2, c/4, stride 1 and 2, batch 8; all three paths "
          "timed by `bench_path_calibration.py --orthogonal --dump`, one thread; evaluated here, not re-timed): "
          "the mean over the rows of each choice's time / the fastest path's, and the rows where it is more than "
          "10% over. 'auto, two paths': the model choosing from dense and factored only, as before 'separable'.\n")
    print(markdown_table(["regime", "rows", "auto", "auto, two paths", "always dense", "always factored",
                          "always separable"], _stored_path_rows()))
    print("\nThe core's factorisations against a product, r = 256, forward and backward (docs/orthogonal.md "
          "counts the build in products of this size):\n")
    print(markdown_table(["operation", "ms", "in r x r products"], _building_block_rows(8 if options.quick else 256,
                                                                                         repeats, options.device)))


def _building_block_rows(r, repeats, device):
    torch.manual_seed(0)
    left, right = torch.randn(2, 1, r, r, device="cpu").to(device)
    square = torch.randn(1, r, r, device="cpu").to(device).requires_grad_()
    half = torch.randn(1, r, r // 2, device="cpu").to(device).requires_grad_()

    def basis_step(raw):
        return lambda: torch.autograd.grad(orthonormal_basis(raw), raw, torch.ones_like(raw))

    times = interleaved({"product": lambda: left @ right, "square": basis_step(square), "half": basis_step(half)},
                        repeats)
    labels = {"product": f"one {r} x {r} product (forward only)",
              "square": f"orthonormal_basis of {r} x {r} (QR), forward + backward",
              "half": f"orthonormal_basis of {r} x {r // 2} (QR), forward + backward"}
    return [[labels[name], f"{times[name] * 1e3:.2f}", f"{times[name] / times['product']:.1f}"] for name in labels]


def _exponential_rows(r, repeats, device):
    rows = []
    for scale in (0.0, 0.01, 0.1, 1.0):
        torch.manual_seed(0)
        generator = (torch.randn(1, r, r, device="cpu") * scale).to(device)  # the same draw on every device
        skew = (generator - generator.mT).requires_grad_()
        grad = torch.randn_like(skew)

        def step(exp):
            return lambda: torch.autograd.grad(exp(skew), skew, grad)

        times = interleaved({"torch": step(torch.linalg.matrix_exp), "ttconv": step(skew_matrix_exp)}, repeats)
        rows.append([f"{scale:g}", f"{times['torch'] * 1e3:.2f}", f"{times['ttconv'] * 1e3:.2f}",
                     f"{times['torch'] / times['ttconv']:.1f}x"])
    return rows


if __name__ == "__main__":
    main()
