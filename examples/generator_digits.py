"""A conv-transpose decoder (generator) trained with spectral control, on the offline digits.

An autoencoder on scikit-learn's bundled digits (16x16, no download): a plain conv encoder
maps an image to a 2 x 4 x 4 code (32 numbers), and a decoder of three ``ConvTranspose2d``
layers (3x3 stride 1, then two 4x4 stride 2: 4x4 -> 8x8 -> 16x16) with ReLUs between them maps
the code back to the image.
The decoder's Lipschitz constant is what spectral normalisation controls in GAN generators
and decoders. It is trained five ways, the encoder always plain:

1. plain ``nn.ConvTranspose2d`` decoder;
2. ``nn.ConvTranspose2d`` under ``torch.nn.utils.parametrizations.spectral_norm`` (divides
   by the norm of the weight reshaped to a matrix: not the layer's operator norm);
3. the decoder converted to ``SVDConvTranspose2d`` (``ttconv.convert``) with
   ``SpectralControl(mode='clip_scale')`` every ``--every`` steps;
4. the same with ``mode='scale'``;
5. plain ``nn.ConvTranspose2d`` whose weight is parametrized as
   ``W * min(1, target / sigma(W))`` with ``sigma`` the exact circular norm
   (``ttconv.conv_spectral_norm``, differentiable): spectral normalisation as torch does
   it, but with the layer's operator norm.

Printed per model: the test reconstruction error (mean squared error per pixel on
standardised images); each decoder layer's exact circular spectral norm (the quantity the
control keeps at most the target); the product of the layers' certified bounds for their
own zero padding (``ttconv.bounds.operator_norm_bound``), an upper bound on the decoder's
Lipschitz constant because the decoder is a plain chain with 1-Lipschitz ReLUs between its
layers; the empirical Lipschitz constant (the largest Jacobian norm of the decoder over test
codes, a lower bound); and the training time per epoch.

Run: ``python examples/generator_digits.py`` (about two minutes on one CPU thread; needs
scikit-learn: ``pip install -e ".[examples]"``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(__file__))
from _digits import load_digits  # noqa: E402
from _lipschitz import ExactNormCap, empirical_lipschitz  # noqa: E402

import ttconv  # noqa: E402
from ttconv.bounds import operator_norm_bound  # noqa: E402

MODELS = ("ConvTranspose2d", "ConvTranspose2d + torch spectral_norm",
          "SVDConvTranspose2d + clip_scale", "SVDConvTranspose2d + scale", "ConvTranspose2d + exact norm cap")
TRANSPOSED = (nn.ConvTranspose2d, ttconv.SVDConvTranspose2d)


class AutoEncoder(nn.Module):
    """Conv encoder 1x16x16 -> 2x4x4 code; decoder: three transposed convs back to 1x16x16.

    The 32-number code is a real bottleneck: the 16x16 images are upsampled 8x8 digits (64
    numbers).
    """

    def __init__(self, width: int = 32, code_channels: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.ReLU(),                   # 16 -> 8
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),           # 8 -> 4
            nn.Conv2d(2 * width, code_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(code_channels, 2 * width, 3, padding=1), nn.ReLU(),    # 4 -> 4
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.ReLU(),  # 4 -> 8
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1),                     # 8 -> 16
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def decoder_layers(decoder: nn.Module, code: Tensor) -> List[Tuple[str, nn.Module, Tuple[int, ...]]]:
    """``(name, layer, input size)`` of every transposed conv of the decoder, in order, on ``code``."""
    seen: List[Tuple[str, nn.Module, Tuple[int, ...]]] = []
    names = {m: name for name, m in decoder.named_modules()}

    def record(module: nn.Module, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
        seen.append((names[module], module, tuple(inputs[0].shape[2:])))

    hooks = [m.register_forward_hook(record) for m in decoder.modules() if isinstance(m, TRANSPOSED)]
    with torch.no_grad():
        decoder(code)
    for hook in hooks:
        hook.remove()
    return seen


def decoder_norms(decoder: nn.Module, code: Tensor) -> Tuple[List[float], float]:
    """Each layer's exact circular norm at its input size, and the product of the certified bounds."""
    norms, product = [], 1.0
    with torch.no_grad():
        for _, layer, size in decoder_layers(decoder, code):
            norms.append(float(ttconv.spectral_norm(layer, size)))
            product *= float(operator_norm_bound(layer, size))
    return norms, product


def train(model: AutoEncoder, x_train: Tensor, *, epochs: int, lr: float, after_step=None, batch: int = 64) -> float:
    """Adam on the reconstruction MSE; returns seconds per epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(x_train), generator=generator).split(batch):
            loss = F.mse_loss(model(x_train[index]), x_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
    return (time.perf_counter() - start) / epochs


def run(label: str, x_train: Tensor, x_test: Tensor, options) -> Dict[str, object]:
    torch.manual_seed(0)
    model = AutoEncoder()
    code_example = model.encoder(x_train[:1]).detach()
    control = None
    if label == "ConvTranspose2d + torch spectral_norm":
        for module in model.decoder:
            if isinstance(module, nn.ConvTranspose2d):
                nn.utils.parametrizations.spectral_norm(module)
    elif label == "ConvTranspose2d + exact norm cap":
        with torch.no_grad():
            grids = [(layer, tuple(m * s for m, s in zip(size, layer.stride)))  # k = 2 p + s: output m * s
                     for _, layer, size in decoder_layers(model.decoder, code_example)]
        for layer, grid in grids:
            cap = ExactNormCap(options.max_singular_value, grid, layer.stride, layer.dilation)
            nn.utils.parametrize.register_parametrization(layer, "weight", cap)
    elif label.startswith("SVDConvTranspose2d"):
        model.decoder = ttconv.convert(model.decoder)
        control = ttconv.SpectralControl(model.decoder, options.max_singular_value, every=options.every,
                                         mode=label.split(" + ")[1], example_input=code_example)
    seconds = train(model, x_train, epochs=options.epochs, lr=options.lr,
                    after_step=None if control is None else control.step)
    if control is not None:
        control.apply()  # end on a control step
    model.eval()
    with torch.no_grad():
        error = float(F.mse_loss(model(x_test), x_test))
        codes = model.encoder(x_test[: options.lipschitz_samples])
    norms, bound = decoder_norms(model.decoder, code_example)
    return {
        "mse": error,
        "norms": norms,
        "bound": bound,
        "lipschitz": empirical_lipschitz(model.decoder, codes),
        "seconds": seconds,
        "model": model,
        "code_example": code_example,
        "max_singular_value": options.max_singular_value if control is not None or "cap" in label else None,
    }


def main(argv=None) -> Dict[str, Dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-singular-value", type=float, default=1.0, help="target spectral norm of every decoder layer")
    parser.add_argument("--every", type=int, default=10, help="control period in optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lipschitz-samples", type=int, default=360, help="test codes searched for ||J||")
    parser.add_argument("--quick", action="store_true", help="one epoch (smoke test)")
    options = parser.parse_args(argv)
    if options.quick:
        options.epochs, options.lipschitz_samples = 1, 32
    x_train, _, x_test, _ = load_digits()
    results = {label: run(label, x_train, x_test, options) for label in MODELS}
    print(f"digits 16x16 autoencoder, code 2x4x4, decoder 3 transposed convs, {options.epochs} epochs, "
          f"target spectral norm {options.max_singular_value}, control every {options.every} steps\n")
    print("| decoder | test MSE | layer sigmas (exact, circular) | product of certified bounds "
          "| empirical Lipschitz | s/epoch |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        sigmas = " / ".join(f"{s:.3f}" for s in r["norms"])
        print(f"| {label} | {r['mse']:.4f} | {sigmas} | {r['bound']:.3f} | {r['lipschitz']:.3f} | {r['seconds']:.2f} |")
    return results


if __name__ == "__main__":
    main()
