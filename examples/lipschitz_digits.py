"""A certifiably robust (1-Lipschitz) CNN on the offline digits data.

Two networks of the same shape, trained the same way:

* orthogonal: ``SVDConv(core_kind='orthogonal', max_singular_value=1)`` layers, whose singular
  values are exactly their ``S`` and provably stay below 1 throughout training;
* general + scale: general ``SVDConv`` layers whose spectral norm is scaled to 1 every 10
  steps by ``SpectralControl`` (certified with each layer's operator-norm bound).

Both use MaxMin activations, an invertible downsampling (``PixelUnshuffle``), zero channel
padding and a linear head normalised by its exact spectral norm, so the whole network's
Lipschitz constant is at most the product ``L`` of the layer bounds. A test point is
certified at radius ``eps`` (L2) when its logit margin exceeds ``sqrt(2) * L * eps``
(Li et al. 2019; Singla & Feizi 2021).

Run: ``python examples/lipschitz_digits.py`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _digits import load_digits, train  # noqa: E402

import ttconv  # noqa: E402
from ttconv.activations import ChannelPad, MaxMin  # noqa: E402
from ttconv.bounds import operator_norm_bound  # noqa: E402

RADII = (0.1, 0.25, 0.5)


class NormalizedLinear(nn.Linear):
    """A linear layer divided by its exact spectral norm when that exceeds 1."""

    def forward(self, input):
        norm = torch.linalg.matrix_norm(self.weight, ord=2)
        return nn.functional.linear(input, self.weight / norm.clamp_min(1.0), self.bias)


def lipschitz_cnn(core: str, width: int = 32) -> nn.Sequential:
    def conv(stride=1):
        if core == "orthogonal":
            return ttconv.SVDConv(width, width, 3, stride=stride, padding=1, core_kind="orthogonal", max_singular_value=1.0)
        return ttconv.SVDConv(width, width, 3, stride=stride, padding=1)

    return nn.Sequential(
        nn.PixelUnshuffle(2), ChannelPad(width),                  # 1x16x16 -> 32x8x8, isometries
        conv(), MaxMin(), conv(), MaxMin(), conv(stride=2), MaxMin(),  # -> 32x4x4
        nn.Flatten(), NormalizedLinear(width * 16, 10),
    )


def lipschitz_bound(model: nn.Sequential, example: torch.Tensor) -> float:
    """Product of per-layer bounds (the network is a plain chain of 1-Lipschitz pieces)."""
    bound = 1.0
    x = example
    with torch.no_grad():
        for module in model:
            if isinstance(module, ttconv.SVDConv):
                if module.core_kind == "orthogonal":
                    bound *= float(module.factors().S.abs().max())
                else:
                    bound *= float(operator_norm_bound(module, tuple(x.shape[-2:])))
            x = module(x)
    return bound


def certified_accuracy(model, x, y, bound):
    model.eval()
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(2, dim=1)
    correct = top2.indices[:, 0] == y
    margin = top2.values[:, 0] - top2.values[:, 1]
    return [float((correct & (margin > math.sqrt(2) * bound * eps)).float().mean()) for eps in RADII]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=16.0, help="logit scale in the training loss")
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args(argv)
    epochs = 1 if options.quick else options.epochs
    data = load_digits()
    example = data[0][:1]
    rows = []
    for core in ("orthogonal", "general"):
        torch.manual_seed(0)
        model = lipschitz_cnn(core)
        after_step = None
        if core == "general":
            control = ttconv.SpectralControl(model, 1.0, every=10, mode="scale", example_input=example)
            after_step = control.step
        scaled = nn.Sequential(model)
        scaled.forward = lambda x, m=model: options.temperature * m(x)  # training loss only
        result = train(scaled, data, epochs=epochs, lr=3e-3, after_step=after_step)
        if core == "general":
            control.apply()
        bound = lipschitz_bound(model, example)
        certified = certified_accuracy(model, data[2], data[3], bound)
        clean = float((model(data[2]).argmax(1) == data[3]).float().mean())
        label = "orthogonal core" if core == "orthogonal" else "general + scale"
        rows.append((label, clean, bound, certified, result["seconds_per_epoch"]))
    print(f"digits 16x16 (L2 radii on standardised pixels), {epochs} epochs\n")
    header = f"{'model':<17}{'clean acc':>10}{'Lipschitz':>11}" + "".join(f"{'cert@' + str(r):>11}" for r in RADII)
    print(header + f"{'s/epoch':>9}")
    for label, clean, bound, certified, seconds in rows:
        print(f"{label:<17}{clean:>10.3f}{bound:>11.3f}" + "".join(f"{c:>11.3f}" for c in certified) + f"{seconds:>9.2f}")


if __name__ == "__main__":
    main()
