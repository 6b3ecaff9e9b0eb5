"""Pitch classification from raw 1-D waveforms, with and without spectral control.

The data are generated here (no download): 8 kHz waveforms of 512 samples (64 ms), each a
harmonic tone whose fundamental lies in one of ``--classes`` log-spaced bins over three
octaves (100-800 Hz), with random harmonic amplitudes (a random spectral tilt, harmonics
dropped at random, never the fundamental), random phases and white noise at 0-20 dB SNR; every
waveform is scaled to unit RMS. A small CNN on the waveform (a wide strided first conv as in
CREPE, dilated and strided convs after it, global average pooling, linear head) is trained
five ways (3-5 at each target of ``--max-singular-value``, 3 and 2 by default):

1. plain ``nn.Conv1d``;
2. ``nn.Conv1d`` under ``torch.nn.utils.parametrizations.spectral_norm`` (the usual
   spectral normalisation: it divides by the norm of the weight *reshaped to a matrix*,
   which is not the convolution's operator norm);
3. the same CNN converted to ``SVDConv1d`` (``ttconv.convert``) with
   ``SpectralControl(mode='clip_scale')`` every ``--every`` steps, for each target of
   ``--max-singular-value``;
4. the same with ``mode='scale'``;
5. plain ``nn.Conv1d`` whose weight is parametrized as ``W * min(1, target / sigma(W))``
   with ``sigma`` the exact circular norm (``ttconv.conv_spectral_norm``, differentiable):
   spectral normalisation as torch does it, but with the conv's operator norm.

Printed per model: test accuracy; accuracy when white noise of RMS ``--noise`` (relative to
the unit-RMS signal) is added to the test waveforms; each conv's spectral norm (exact,
circular, at the layer's input length: the quantity the control keeps at most the target);
the empirical Lipschitz constant of the logits (the largest Jacobian norm over test
waveforms, a lower bound of the true constant); and the training time per epoch.

Run: ``python examples/pitch_1d.py`` (about six minutes on one CPU thread; ``--quick``: seconds).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(__file__))
from _lipschitz import ExactNormCap, empirical_lipschitz  # noqa: E402

import ttconv  # noqa: E402

SAMPLE_RATE = 8000
LOWEST_F0 = 100.0
OCTAVES = 3
HARMONICS = 12


def harmonic_tones(count: int, *, length: int = 512, classes: int = 12, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``count`` noisy harmonic tones ``(count, 1, length)`` (unit RMS) and their pitch-bin labels."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    labels = torch.randint(classes, (count,), generator=generator)
    f0 = LOWEST_F0 * 2.0 ** ((labels + uniform(count)) / classes * OCTAVES)  # log-uniform inside the bin
    harmonic = torch.arange(1, HARMONICS + 1, dtype=torch.float64)
    tilt = 0.5 + 1.5 * uniform(count, 1)  # amplitude ~ h^-tilt
    amplitude = harmonic ** -tilt * (0.5 + uniform(count, HARMONICS))
    amplitude = amplitude * (uniform(count, HARMONICS) > 0.3)  # drop some harmonics...
    amplitude[:, 0] = amplitude[:, 0].clamp_min(0.3)  # ...but never the fundamental
    amplitude = amplitude * (f0[:, None] * harmonic < SAMPLE_RATE / 2)  # nothing above Nyquist
    phase = 2 * math.pi * uniform(count, HARMONICS, 1)
    t = torch.arange(length, dtype=torch.float64) / SAMPLE_RATE
    frequency = f0[:, None, None] * harmonic[None, :, None]
    tone = (amplitude[:, :, None] * torch.sin(2 * math.pi * frequency * t + phase)).sum(1)
    tone = tone / tone.pow(2).mean(1, keepdim=True).sqrt()
    snr_db = 20 * uniform(count, 1)
    noise = torch.randn(count, length, generator=generator, dtype=torch.float64) * 10 ** (-snr_db / 20)
    wave = tone + noise
    wave = wave / wave.pow(2).mean(1, keepdim=True).sqrt()
    return wave.unsqueeze(1).float(), labels


def pitch_cnn(classes: int = 12, width: int = 32) -> nn.Sequential:
    """Four convs on the waveform: wide stride-4, dilated, stride-2, dilated; pooled linear head."""
    return nn.Sequential(
        nn.Conv1d(1, width // 2, 33, stride=4, padding=16), nn.ReLU(),                   # 512 -> 128
        nn.Conv1d(width // 2, width, 9, dilation=2, padding=8), nn.ReLU(),
        nn.Conv1d(width, width, 9, stride=2, padding=4), nn.ReLU(),                     # 128 -> 64
        nn.Conv1d(width, width, 5, dilation=4, padding=8), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, classes),
    )


def input_lengths(model: nn.Module, example: Tensor) -> Dict[nn.Module, Tuple[int, ...]]:
    """The input length every conv of ``model`` sees on ``example``."""
    lengths: Dict[nn.Module, Tuple[int, ...]] = {}

    def record(module: nn.Module, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
        lengths[module] = tuple(inputs[0].shape[2:])

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Conv1d, ttconv.SVDConv1d))]
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    return lengths


def conv_norms(model: nn.Module, example: Tensor) -> Dict[str, float]:
    """Exact circular spectral norm of every conv at the input length it sees on ``example``."""
    lengths = input_lengths(model, example)
    with torch.no_grad():
        return {name: float(ttconv.spectral_norm(m, lengths[m])) for name, m in model.named_modules() if m in lengths}


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model: nn.Module, data, *, epochs: int, lr: float, after_step=None, batch: int = 64) -> float:
    """Adam on cross-entropy; returns seconds per epoch."""
    x_train, y_train = data[:2]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(y_train), generator=generator).split(batch):
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
    return (time.perf_counter() - start) / epochs


def run(kind: str, data, options, max_singular_value: Optional[float] = None) -> Dict[str, Any]:
    """Build, train and measure one model (``kind``: 'plain', 'torch_sn', 'exact_cap' or a control mode).

    Returns the table's numbers, the per-layer norms and the trained model.
    """
    x_train, y_train, x_test, y_test = data
    example = x_train[:1]
    torch.manual_seed(0)
    model = pitch_cnn(options.classes, options.width)
    control = None
    if kind == "torch_sn":
        for module in model:
            if isinstance(module, nn.Conv1d):
                nn.utils.parametrizations.spectral_norm(module)
    elif kind == "exact_cap":
        for module, length in input_lengths(model, example).items():
            cap = ExactNormCap(max_singular_value, length, module.stride, module.dilation)
            nn.utils.parametrize.register_parametrization(module, "weight", cap)
    elif kind != "plain":
        model = ttconv.convert(model)
        control = ttconv.SpectralControl(model, max_singular_value, every=options.every, mode=kind, example_input=example)
    seconds = train(model, data, epochs=options.epochs, lr=options.lr,
                    after_step=None if control is None else control.step)
    if control is not None:
        control.apply()  # end on a control step
    model.eval()
    noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(1)) * options.noise
    norms = conv_norms(model, example)
    return {
        "accuracy": accuracy(model, x_test, y_test),
        "noisy": accuracy(model, x_test + noise, y_test),
        "max_sigma": max(norms.values()),
        "norms": norms,
        "lipschitz": empirical_lipschitz(model, x_test[: options.lipschitz_samples]),
        "seconds": seconds,
        "model": model,
        "example": example,
        "max_singular_value": max_singular_value,
    }


def main(argv=None) -> Dict[str, Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train", type=int, default=4000, help="training waveforms")
    parser.add_argument("--test", type=int, default=1000, help="test waveforms")
    parser.add_argument("--classes", type=int, default=12, help="pitch bins over three octaves")
    parser.add_argument("--max-singular-value", type=float, nargs="+", default=[3.0, 2.0],
                        help="target spectral norms of every conv (one pair of controlled runs each)")
    parser.add_argument("--width", type=int, default=32, help="channels of the inner convs")
    parser.add_argument("--every", type=int, default=10, help="control period in optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--noise", type=float, default=0.5, help="RMS of the white noise added at test time")
    parser.add_argument("--lipschitz-samples", type=int, default=256, help="test waveforms searched for ||J||")
    parser.add_argument("--quick", action="store_true", help="tiny data, one epoch (smoke test)")
    options = parser.parse_args(argv)
    if options.quick:
        options.epochs, options.train, options.test, options.lipschitz_samples = 1, 512, 256, 32
        options.width, options.max_singular_value = 16, options.max_singular_value[:1]
    x_train, y_train = harmonic_tones(options.train, classes=options.classes, seed=0)
    x_test, y_test = harmonic_tones(options.test, classes=options.classes, seed=1)
    data = (x_train, y_train, x_test, y_test)
    results = {"Conv1d": run("plain", data, options),
               "Conv1d + torch spectral_norm": run("torch_sn", data, options)}
    for target in options.max_singular_value:
        for mode in ("clip_scale", "scale"):
            results[f"SVDConv1d + {mode} {target:g}"] = run(mode, data, options, target)
        results[f"Conv1d + exact norm cap {target:g}"] = run("exact_cap", data, options, target)
    print(f"synthetic pitch, {options.classes} bins over 100-800 Hz, 512 samples at 8 kHz, {options.train} train / "
          f"{options.test} test waveforms, width {options.width}, {options.epochs} epochs, "
          f"target spectral norms {', '.join(f'{t:g}' for t in options.max_singular_value)}, "
          f"control every {options.every} steps, test noise RMS {options.noise}\n")
    print("| model | test acc | acc + noise | conv sigmas (exact, circular) | empirical Lipschitz | s/epoch |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        sigmas = " / ".join(f"{s:.2f}" for s in r["norms"].values())
        print(f"| {label} | {r['accuracy']:.3f} | {r['noisy']:.3f} | {sigmas} | {r['lipschitz']:.2f} "
              f"| {r['seconds']:.2f} |")
    return results


if __name__ == "__main__":
    main()
