"""Datasets of the experiments, all offline: digits, CIFAR-10 from a local folder, synthetic.

* ``digits``: scikit-learn's bundled 8x8 digits upsampled to 16x16 and standardised
  (``examples/_digits.py``; 1,437 train / 360 test images, no download).
* ``cifar10``: read from ``data_dir``, never downloaded. Two layouts are recognised:

  - torchvision's: ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (pickled dicts
    with ``data``, ``(N, 3072)`` uint8, and ``labels``), in ``data_dir`` or in
    ``data_dir/cifar-10-batches-py``;
  - numpy arrays: ``x_train.npy``, ``y_train.npy``, ``x_test.npy``, ``y_test.npy``, images
    ``(N, 32, 32, 3)`` or ``(N, 3, 32, 32)``, uint8 (0..255) or float (0..1).

  Images are scaled to [0, 1] and normalised with the config's ``mean`` / ``std``.
* ``synthetic``: random CIFAR-shaped images and labels in memory (timing runs), and
  :func:`write_synthetic_cifar` to write a small numpy-layout folder (the smoke test).

Augmentation (random crop with 4 pixels of padding, horizontal flip) is done on batches
in torch, so nothing beyond torch and numpy is needed.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Split = Tuple[Tensor, Tensor, Tensor, Tensor]


def load_digits(seed: int = 0) -> Split:
    """``(x_train, y_train, x_test, y_test)``: 16x16 standardised digits (``examples/_digits.py``)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    from _digits import load_digits as digits

    return digits(size=16, seed=seed)


def _to_nchw_float(images: np.ndarray, name: str) -> Tensor:
    if images.ndim != 4:
        raise ValueError(f"{name}: expected 4-D images (N, 32, 32, 3) or (N, 3, 32, 32), got shape {images.shape}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.transpose(0, 3, 1, 2)
    if images.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 colour channels, got shape {images.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    return tensor.float()


def _labels(values: np.ndarray, name: str, count: int) -> Tensor:
    labels = torch.from_numpy(np.asarray(values).astype(np.int64).reshape(-1))
    if labels.numel() != count:
        raise ValueError(f"{name}: {labels.numel()} labels for {count} images")
    return labels


def _unpickle(path: str) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="bytes")


def load_cifar10(data_dir: str) -> Split:
    """CIFAR-10 from ``data_dir`` (torchvision batches or numpy arrays); raw [0, 1] images."""
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"CIFAR-10 folder {data_dir!r} not found. Pass --data-dir pointing at torchvision's "
            "'cifar-10-batches-py' folder (or its parent) or at a folder with x_train.npy, y_train.npy, "
            "x_test.npy, y_test.npy; nothing is downloaded."
        )
    arrays = [os.path.join(data_dir, f"{n}.npy") for n in ("x_train", "y_train", "x_test", "y_test")]
    if all(os.path.isfile(p) for p in arrays):
        x_train, y_train, x_test, y_test = (np.load(p, allow_pickle=False) for p in arrays)
        train = _to_nchw_float(x_train, "x_train.npy")
        test = _to_nchw_float(x_test, "x_test.npy")
        return train, _labels(y_train, "y_train.npy", len(train)), test, _labels(y_test, "y_test.npy", len(test))
    for folder in (data_dir, os.path.join(data_dir, "cifar-10-batches-py")):
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        if all(os.path.isfile(os.path.join(folder, n)) for n in names):
            batches = [_unpickle(os.path.join(folder, n)) for n in names]
            images = [np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches]
            labels = [np.asarray(b[b"labels"]) for b in batches]
            train = _to_nchw_float(np.concatenate(images[:5]), "data_batch_*")
            test = _to_nchw_float(images[5], "test_batch")
            return (train, _labels(np.concatenate(labels[:5]), "data_batch_*", len(train)),
                    test, _labels(labels[5], "test_batch", len(test)))
    raise FileNotFoundError(
        f"no CIFAR-10 found in {data_dir!r}: expected data_batch_1..5 and test_batch (torchvision's "
        "cifar-10-batches-py, here or in a subfolder of that name) or x_train.npy, y_train.npy, x_test.npy, y_test.npy"
    )


def synthetic_cifar(train: int, test: int, seed: int = 0, classes: int = 10) -> Split:
    """Random CIFAR-shaped data in [0, 1] (for timing and smoke runs; nothing to learn)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(train, 3, 32, 32, generator=generator), torch.randint(0, classes, (train,), generator=generator),
            torch.rand(test, 3, 32, 32, generator=generator), torch.randint(0, classes, (test,), generator=generator))


def write_synthetic_cifar(folder: str, images: int = 64, seed: int = 0) -> str:
    """Write a numpy-layout CIFAR folder with ``images`` uint8 images (3/4 train, 1/4 test)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_train = images * 3 // 4
    x = rng.integers(0, 256, size=(images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=images)
    np.save(os.path.join(folder, "x_train.npy"), x[:n_train])
    np.save(os.path.join(folder, "y_train.npy"), y[:n_train])
    np.save(os.path.join(folder, "x_test.npy"), x[n_train:])
    np.save(os.path.join(folder, "y_test.npy"), y[n_train:])
    return folder


def normalise(split: Split, mean: Sequence[float], std: Sequence[float]) -> Split:
    m = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    x_train, y_train, x_test, y_test = split
    return (x_train - m) / s, y_train, (x_test - m) / s, y_test


def augment(x: Tensor, generator: torch.Generator, padding: int = 4, mode: str = "reflect") -> Tensor:
    """Random crop after ``padding`` pixels of padding, and a random horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode=mode)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (n, w)
    index = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[index, channel, rows[:, None, :, None], cols[:, None, None, :]]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def load(dataset: str, *, data_dir: Optional[str] = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
         std: Sequence[float] = (0.5, 0.5, 0.5), synthetic_train: int = 50000, synthetic_test: int = 10000,
         seed: int = 0) -> Split:
    """The named dataset, normalised (digits come standardised)."""
    if dataset == "digits":
        return load_digits(seed)
    if dataset == "cifar10":
        return normalise(load_cifar10(data_dir or ""), mean, std)
    if dataset == "synthetic":
        return normalise(synthetic_cifar(synthetic_train, synthetic_test, seed), mean, std)
    raise ValueError(f"dataset must be 'digits', 'cifar10' or 'synthetic', got {dataset!r}")
