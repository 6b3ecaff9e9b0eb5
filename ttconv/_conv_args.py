"""Validation and normalisation of ``nn.Conv2d``-style arguments.

Every public entry point funnels its convolution arguments through here, so the
error messages (which name the argument and the fix) are the same everywhere.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Tuple, Union

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_PADDING_STRINGS = ("same", "valid")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer, else raise."""
    if not _is_int(value):
        raise TypeError(f"{name} must be a positive int, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def pair(value: Any, name: str, *, minimum: int = 1) -> Tuple[int, int]:
    """Normalise an int or a 2-sequence of ints to a ``(h, w)`` tuple.

    Raises a ``TypeError``/``ValueError`` naming ``name`` for anything else.
    """
    if _is_int(value):
        items = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        items = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in both dimensions, got {value!r}")
    return items


def padding_arg(value: Any, stride: Tuple[int, int]) -> Union[str, Tuple[int, int]]:
    """Validate ``padding`` as ``nn.Conv2d`` does: 'same', 'valid', an int or a pair."""
    if isinstance(value, str):
        if value not in _PADDING_STRINGS:
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {value!r}")
        if value == "same" and stride != (1, 1):
            raise ValueError(
                f"padding='same' is not supported for strided convolutions (stride={stride}); "
                "pass explicit padding instead"
            )
        return value
    return pair(value, "padding", minimum=0)


def padding_mode_arg(value: Any) -> str:
    if value not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {value!r}")
    return value


def channels_and_groups(in_channels: Any, out_channels: Any, groups: Any) -> Tuple[int, int, int]:
    """Validate channel counts and ``groups`` (both channel counts divisible by groups)."""
    in_channels = positive_int(in_channels, "in_channels")
    out_channels = positive_int(out_channels, "out_channels")
    groups = positive_int(groups, "groups")
    for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
        if channels % groups:
            raise ValueError(
                f"{name} ({channels}) must be divisible by groups ({groups}); "
                "choose groups among the common divisors of in_channels and out_channels"
            )
    return in_channels, out_channels, groups


def reversed_padding_repeated_twice(
    padding: Union[str, Tuple[int, int]],
    kernel_size: Tuple[int, int],
    dilation: Tuple[int, int],
) -> Tuple[int, int, int, int]:
    """Padding for ``F.pad`` (left, right, top, bottom), matching ``nn.Conv2d`` exactly.

    For ``'same'`` the odd extra pixel goes to the right/bottom, as in PyTorch.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out = []
        for d, k in ((dilation[1], kernel_size[1]), (dilation[0], kernel_size[0])):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)  # type: ignore[return-value]
    return (padding[1], padding[1], padding[0], padding[0])


def positive_finite(value: Any, name: str) -> float:
    """Return ``value`` as a ``float`` if it is a positive finite real number, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def dilated_extent(kernel_size: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int]:
    """Pixels spanned by a dilated kernel along each axis: ``d (k - 1) + 1``."""
    return tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel_size))  # type: ignore[return-value]


def check_kernel(weight: Any, groups: int, name: str = "weight") -> int:
    """Validate a conv kernel ``(c_out, c_in/groups, kh, kw)``: 4-D, finite, ``c_out`` divisible
    by ``groups``. Returns ``groups`` as an int."""
    import torch

    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name} must be a 4-D tensor (c_out, c_in/groups, kh, kw), got {shape}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name} contains NaN or Inf values; its spectrum, bounds and factors are undefined")
    groups = positive_int(groups, "groups")
    if weight.shape[0] % groups:
        raise ValueError(f"{name} has {weight.shape[0]} output channels, not divisible by groups={groups}")
    return groups


def input_size_arg(value: Any, name: str = "input_size") -> Tuple[int, int]:
    """Validate a spatial input size ``(n1, n2)`` (an int means square)."""
    try:
        return pair(value, name)
    except TypeError:
        raise TypeError(
            f"{name} must be an int or a pair of ints (height, width) of the input image, got {value!r}"
        ) from None
