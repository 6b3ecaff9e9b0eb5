"""Train a small CNN on the offline digits data four ways and compare.

1. plain ``nn.Conv2d``;
2. ``SVDConv`` (full rank) with singular values clipped every ``--every`` steps
   (``SpectralControl(mode='clip')``, Sedghi et al.: the norm can stay above the target);
3. the same clip followed by a scale to the exact norm (``mode='clip_scale'``, the
   default: the norm ends at most the target);
4. ``SVDConv`` with the spectral norm scaled to the target every ``--every`` steps
   (``mode='scale'``).

Prints test accuracy, the largest layer spectral norm (exact, circular, at each layer's
input size) and the time per epoch. Runs in about two minutes on 2 CPU cores.

Run: ``python examples/train_digits.py`` (needs scikit-learn: ``pip install -e ".[examples]"``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _digits import load_digits, small_cnn, train  # noqa: E402

import ttconv  # noqa: E402


def largest_norm(model, example):
    report = ttconv.spectral_report(model, example, gram_iters=1, power_iters=1)
    return max(row.exact for row in report.layers if "Conv" in row.kind)  # convs only: not the Linear head


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--max-singular-value", type=float, default=4.0)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quick", action="store_true", help="one epoch (smoke test)")
    options = parser.parse_args(argv)
    epochs = 1 if options.quick else options.epochs
    data = load_digits()
    example = data[0][:1]
    rows = []
    for label in ("Conv2d", "SVDConv + clip", "SVDConv + clip_scale", "SVDConv + scale"):
        torch.manual_seed(0)
        model = small_cnn()
        after_step = None
        if label != "Conv2d":
            model = ttconv.convert(model)
            mode = label.split(" + ")[1]
            control = ttconv.SpectralControl(model, options.max_singular_value, every=options.every, mode=mode,
                                             example_input=example)
            after_step = control.step
        result = train(model, data, epochs=epochs, lr=options.lr, after_step=after_step)
        if after_step is not None:
            control.apply()  # end on a control step
        rows.append((label, result["accuracy"], largest_norm(model, example), result["seconds_per_epoch"]))
    print(f"digits 16x16, {epochs} epochs, target spectral norm {options.max_singular_value}, control every {options.every} steps\n")
    print(f"{'model':<22}{'test acc':>10}{'max sigma':>11}{'s/epoch':>9}")
    for label, acc, sigma, seconds in rows:
        print(f"{label:<22}{acc:>10.3f}{sigma:>11.3f}{seconds:>9.2f}")


if __name__ == "__main__":
    main()
