"""Offline data and a small CNN shared by the examples and benchmarks.

scikit-learn's bundled 8x8 digits (1,797 images, shipped inside the wheel: no download),
upsampled to 16x16, split 1,437 / 360.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def load_digits(size: int = 16, seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``; images ``(N, 1, size, size)`` standardised."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:  # pragma: no cover
        raise ImportError("the examples need scikit-learn: pip install 'ttconv[examples]'") from None
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target, dtype=torch.long)
    # A seeded CPU permutation (the same split on every device), moved to where the images are.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed), device="cpu")
    train, test = order[:1437].to(images.device), order[1437:].to(images.device)
    return images[train], labels[train], images[test], labels[test]


def small_cnn(width: int = 32) -> nn.Sequential:
    """Four 3x3 convs (two with stride 2), ReLU, global pooling, linear head."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    )


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(
    model: nn.Module,
    data: Tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    epochs: int = 10,
    lr: float = 3e-3,
    batch: int = 64,
    after_step: Optional[Callable[[], None]] = None,
    extra_loss: Optional[Callable[[], Tensor]] = None,
    seed: int = 0,
) -> Dict[str, float]:
    """Adam training; returns test accuracy and seconds per epoch."""
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(y_train), generator=generator, device="cpu").split(batch):
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            if extra_loss is not None:
                loss = loss + extra_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
    seconds = (time.perf_counter() - start) / epochs
    return {"accuracy": accuracy(model, x_test, y_test), "seconds_per_epoch": seconds}
