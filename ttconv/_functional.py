"""The one place that applies a conv kernel with torch's padding semantics (``nn.Conv1d/2d/3d``), and
the per-group channel mixing (a 1x1 convolution) of the factored forward path."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor


def conv_nd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Tuple[int, ...],
    padding: Union[str, Tuple[int, ...]],
    dilation: Tuple[int, ...],
    groups: int,
    padding_mode: str,
    reversed_padding: Sequence[int],
) -> Tensor:
    """``nn.Conv{d}d``'s forward for any padding mode, ``d = len(stride)`` in 1, 2, 3."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(stride) - 1]
    if padding_mode != "zeros":
        x = F.pad(x, tuple(reversed_padding), mode=padding_mode)
        return conv(x, weight, bias, stride, 0, dilation, groups)
    return conv(x, weight, bias, stride, padding, dilation, groups)


def unstrided_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int, dims: int) -> Tensor:
    """``conv{dims}d`` with stride 1, no padding and no dilation (the input is already padded or
    subsampled as the layer needs)."""
    return conv_nd(x, weight, bias, (1,) * dims, (0,) * dims, (1,) * dims, groups, "zeros", [0] * (2 * dims))


def pad_and_subsample(x: Tensor, reversed_padding: Sequence[int], padding_mode: str,
                      stride: Tuple[int, ...]) -> Tensor:
    """What a strided conv with one tap per axis reads: ``x`` padded as ``nn.Conv{d}d`` pads it
    (``reversed_padding`` in ``F.pad`` order), then every ``stride``-th position per axis. A
    conv with stride 1 on the result is the strided one-tap conv."""
    if any(reversed_padding):
        x = F.pad(x, tuple(reversed_padding), mode="constant" if padding_mode == "zeros" else padding_mode)
    every: Tuple[Any, ...] = (Ellipsis,) + tuple(slice(None, None, s) for s in stride)
    return x[every]


# Positions (batch * spatial) from which a 1x1 convolution runs as a batched matmul: on one
# CPU thread, torch 2.13's 1x1 conv2d measured up to 14x slower than the same matmul on
# large maps with few channels (batch 16, 160 x 160, 8 -> 2 channels: 27 ms vs 2 ms), and
# 1.5-2x faster on small ones (7 x 7 and 14 x 14 at batch 1).
MATMUL_MIN_POSITIONS = 1 << 14


def channels_last_format(x: Tensor) -> Optional[torch.memory_format]:
    """``torch.channels_last`` (``_3d``) when a batched 2-D (3-D) ``x`` is laid out so and not
    also contiguous (a layout some sizes make ambiguous), else None."""
    memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if memory_format is not None and not x.is_contiguous() and x.is_contiguous(memory_format=memory_format):
        return memory_format
    return None


def in_layout_of(x: Tensor, y: Tensor) -> Tensor:
    """``y`` in the memory layout torch's conv gives an input ``x``: channels-last for a
    channels-last ``x``, contiguous for a contiguous one. A chain of convs and mixings keeps it
    on its own except through a one-channel hidden map, whose layout is ambiguous; then this
    copies once."""
    memory_format = channels_last_format(x)
    if memory_format is not None:
        return y if y.is_contiguous(memory_format=memory_format) else y.contiguous(memory_format=memory_format)
    return y.contiguous() if x.is_contiguous() else y


def mix_channels(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int, dims: int) -> Tensor:
    """A grouped 1x1 convolution over ``dims`` spatial axes.

    ``weight: (groups, out/groups, in/groups)``, ``x: (batch, in, *spatial)``. Same result as
    ``F.conv{dims}d(x, weight.reshape(out, in/groups, 1, ...), bias, groups=groups)``; large
    inputs run as one batched matmul (see ``MATMUL_MIN_POSITIONS``). Sizes are read from
    ``x`` only outside ``torch.fx`` tracing, where they are concrete.
    """
    if isinstance(x, torch.fx.Proxy) or x.shape[0] * math.prod(x.shape[2:]) < MATMUL_MIN_POSITIONS:
        kernel = weight.flatten(0, 1)[(...,) + (None,) * dims]  # (out, in/groups, 1, ...)
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        return conv(x, kernel, bias, 1, 0, 1, groups)
    batch, spatial = x.shape[0], tuple(x.shape[2:])
    if channels_last_format(x) is not None:
        # Channels-last in, channels-last out, as torch's conv answers: mix along the last axis
        # of the (batch, *spatial, channels) view, no copy of the input.
        y = torch.matmul(x.movedim(1, -1).reshape(-1, groups, 1, weight.shape[2]), weight.transpose(1, 2))
        y = y.reshape(batch, *spatial, -1).movedim(-1, 1)
    else:
        y = torch.matmul(weight, x.reshape(batch, groups, weight.shape[2], -1))
        y = y.reshape(batch, -1, *spatial)
    if bias is not None:
        y = y + bias.reshape(-1, *(1,) * dims)
    return y
