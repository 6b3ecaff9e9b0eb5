"""Validation and normalisation of ``nn.Conv{1,2,3}d``-style arguments (tuples of length d).

Every public entry point funnels its convolution arguments through here, so the
error messages (which name the argument and the fix) are the same everywhere.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, List, Tuple, Union

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


def ntuple(value: Any, name: str, dims: int, *, minimum: int = 1) -> Tuple[int, ...]:
    """Normalise an int or a ``dims``-sequence of ints to a tuple of length ``dims``.

    Raises a ``TypeError``/``ValueError`` naming ``name`` for anything else.
    """
    if _is_int(value):
        items = (int(value),) * dims
    elif isinstance(value, (tuple, list)) and len(value) == dims and all(_is_int(v) for v in value):
        items = tuple(int(v) for v in value)
    else:
        what = "a pair of ints (h, w)" if dims == 2 else f"a tuple of {dims} int{'s' if dims > 1 else ''}"
        raise TypeError(f"{name} must be an int or {what}, got {value!r}")
    if min(items) < minimum:
        where = "in both dimensions" if dims == 2 else "in every dimension"
        raise ValueError(f"{name} must be >= {minimum} {where}, got {value!r}")
    return items


def pair(value: Any, name: str, *, minimum: int = 1) -> Tuple[int, int]:
    """Normalise an int or a 2-sequence of ints to a ``(h, w)`` tuple (``ntuple`` with 2 dims)."""
    return ntuple(value, name, 2, minimum=minimum)  # type: ignore[return-value]


def padding_arg(value: Any, stride: Tuple[int, ...]) -> Union[str, Tuple[int, ...]]:
    """Validate ``padding`` as ``nn.Conv{d}d`` does: 'same', 'valid', an int or a ``d``-tuple."""
    if isinstance(value, str):
        if value not in _PADDING_STRINGS:
            what = "a pair of ints" if len(stride) == 2 else f"a tuple of {len(stride)} ints"
            raise ValueError(f"padding must be 'same', 'valid', an int or {what}, got {value!r}")
        if value == "same" and any(s != 1 for s in stride):
            raise ValueError(
                f"padding='same' is not supported for strided convolutions (stride={stride}); "
                "pass explicit padding instead"
            )
        return value
    return ntuple(value, "padding", len(stride), minimum=0)


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
    padding: Union[str, Tuple[int, ...]],
    kernel_size: Tuple[int, ...],
    dilation: Tuple[int, ...],
) -> Tuple[int, ...]:
    """Padding for ``F.pad`` (last axis first: left, right, top, bottom, ...), matching
    ``nn.Conv{d}d`` exactly.

    For ``'same'`` the odd extra pixel goes to the right/bottom, as in PyTorch.
    """
    if padding == "valid":
        return (0,) * (2 * len(kernel_size))
    out: List[int] = []
    for axis in reversed(range(len(kernel_size))):
        if padding == "same":
            total = dilation[axis] * (kernel_size[axis] - 1)
            out += [total // 2, total - total // 2]
        elif isinstance(padding, str):
            raise ValueError(f"padding must be 'same', 'valid' or {len(kernel_size)} ints, got {padding!r}")
        else:
            out += [padding[axis], padding[axis]]
    return tuple(out)


def output_padding_arg(value: Any, stride: Tuple[int, ...], dilation: Tuple[int, ...]) -> Tuple[int, ...]:
    """Validate a transposed conv's ``output_padding``: each entry below its stride or dilation."""
    items = ntuple(value, "output_padding", len(stride), minimum=0)
    for o, s, d in zip(items, stride, dilation):
        if o >= max(s, d):
            raise ValueError(
                f"output_padding={items} must be smaller than either stride={stride} or dilation={dilation} "
                "in each dimension (as in torch.nn.ConvTranspose); lower it"
            )
    return items


def positive_finite(value: Any, name: str) -> float:
    """Return ``value`` as a ``float`` if it is a positive finite real number, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def dilated_extent(kernel_size: Tuple[int, ...], dilation: Tuple[int, ...]) -> Tuple[int, ...]:
    """Pixels spanned by a dilated kernel along each axis: ``d (k - 1) + 1``."""
    return tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel_size))


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
