"""Validation and normalisation of arguments: one vocabulary for every public entry point.

Every check names the argument and says what it must be, and raises one exception type
per kind of mistake: ``TypeError`` when the value has the wrong type (a str for a
number, a bool for a count, ...), ``ValueError`` when the type is right but the value is
not (a count of 0, a fraction above 1, an unknown choice). ``what`` (optional) is a short
hint appended in parentheses, e.g. ``"clip-and-project rounds per clip"``.

* scalars: ``choice``, ``positive_int``, ``non_negative_int``, ``positive_finite``,
  ``non_negative_finite``, ``fraction``, ``interval``, ``tensor``, ``boolean``;
* ``nn.Conv{1,2,3}d``-style arguments (tuples of length ``d``): ``ntuple``, ``pair``,
  ``padding_arg``, ``padding_mode_arg``, ``channels_and_groups``, ``output_padding_arg``,
  ``check_kernel``, ``input_size_arg``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, List, Optional, Tuple, Union

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_PADDING_STRINGS = ("same", "valid")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _hint(what: str) -> str:
    return f" ({what})" if what else ""


def _wrong_type(name: str, expected: str, value: Any, what: str) -> TypeError:
    return TypeError(f"{name} must be {expected}{_hint(what)}, got {value!r} of type {type(value).__name__}")


def _wrong_value(name: str, expected: str, value: Any, what: str) -> ValueError:
    return ValueError(f"{name} must be {expected}{_hint(what)}, got {value!r}")


def choice(value: Any, name: str, options: Iterable[str], what: str = "") -> str:
    """Return ``value`` if it is one of ``options`` (a sequence, or a dispatch table's keys).

    ``TypeError`` for a non-str, ``ValueError`` for an unknown str; both list the options.
    """
    names = tuple(options)
    listed = ", ".join(repr(option) for option in names)
    if not isinstance(value, str):
        raise _wrong_type(name, f"one of {listed}", value, what)
    if value not in names:
        raise _wrong_value(name, f"one of {listed}", value, what)
    return value


def positive_int(value: Any, name: str, what: str = "", *, maximum: Optional[int] = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 1 (and <= ``maximum``); bools are refused."""
    expected = "a positive int" if maximum is None else f"an int in [1, {maximum}]"
    if not _is_int(value):
        raise _wrong_type(name, expected, value, what)
    if value < 1 or (maximum is not None and value > maximum):
        raise _wrong_value(name, expected, value, what)
    return int(value)


def non_negative_int(value: Any, name: str, what: str = "") -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 0; bools are refused."""
    if not _is_int(value):
        raise _wrong_type(name, "an int >= 0", value, what)
    if value < 0:
        raise _wrong_value(name, "an int >= 0", value, what)
    return int(value)


def positive_finite(value: Any, name: str, what: str = "") -> float:
    """Return ``value`` as a ``float`` if it is a finite real number > 0; bools are refused."""
    if not _is_real(value):
        raise _wrong_type(name, "a positive finite number", value, what)
    if not (math.isfinite(value) and value > 0):
        raise _wrong_value(name, "a positive finite number", value, what)
    return float(value)


def non_negative_finite(value: Any, name: str, what: str = "") -> float:
    """Return ``value`` as a ``float`` if it is a finite real number >= 0; bools are refused."""
    if not _is_real(value):
        raise _wrong_type(name, "a finite number >= 0", value, what)
    if not (math.isfinite(value) and value >= 0):
        raise _wrong_value(name, "a finite number >= 0", value, what)
    return float(value)


def fraction(value: Any, name: str, what: str = "") -> float:
    """Return ``value`` as a ``float`` if it is a real number in ``(0, 1]``; bools are refused."""
    if not _is_real(value):
        raise _wrong_type(name, "a number in (0, 1]", value, what)
    if not 0 < value <= 1:  # NaN fails too
        raise _wrong_value(name, "a number in (0, 1]", value, what)
    return float(value)


def interval(value: Any, name: str, what: str = "") -> Tuple[float, float]:
    """Return ``(low, high)`` as floats if ``value`` is a pair of finite real numbers with ``low < high``."""
    expected = "(low, high), two finite numbers with low < high"
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_real(v) for v in value):
        raise _wrong_type(name, expected, value, what)
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise _wrong_value(name, expected, value, what)
    return low, high


def tensor(value: Any, name: str, what: str = "") -> Any:
    """Return ``value`` if it is a ``torch.Tensor`` (``TypeError`` otherwise); shapes are the caller's to check."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise _wrong_type(name, "a torch.Tensor", value, what)
    return value


def boolean(value: Any, name: str, what: str = "") -> bool:
    """Return ``value`` if it is a ``bool`` (1, 0 or ``None`` are refused: they usually mean a slip)."""
    if not isinstance(value, bool):
        raise _wrong_type(name, "True or False", value, what)
    return value


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
    return choice(value, "padding_mode", _PADDING_MODES)


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


def padding_in_effect_problem(module: Any) -> Optional[str]:
    """Why a torch conv's ``padding`` is not the padding its forward applies, or None.

    For every padding mode but zeros torch pads by ``_reversed_padding_repeated_twice``, fixed
    at construction: a ``padding`` attribute set afterwards changes what analysis and
    conversion read, not what the conv computes. (ttconv's layers recompute their pads when
    ``padding`` is set; a transposed conv crops its output by ``padding`` itself.)
    """
    from torch.nn.modules.conv import _ConvNd

    if not isinstance(module, _ConvNd) or module.transposed or module.padding_mode == "zeros":
        return None
    cached, padding = module._reversed_padding_repeated_twice, module.padding
    try:
        expected = reversed_padding_repeated_twice(
            padding if isinstance(padding, str) else tuple(padding), tuple(module.kernel_size), tuple(module.dilation))
    except (TypeError, ValueError, IndexError):
        return f"its padding={padding!r} is not a padding the layer could have been built with"
    if tuple(int(p) for p in cached) != expected:
        return (f"its padding={padding!r} is not the padding its forward applies ({tuple(cached)} in F.pad order, "
                f"fixed when the layer was built for padding_mode={module.padding_mode!r}): padding was changed "
                "after construction; build the layer with the padding you mean")
    return None


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
