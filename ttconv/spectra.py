"""Exact singular values of 2-D convolutions with circular padding.

Sedghi, Gupta & Long, *The Singular Values of Convolutional Layers* (ICLR 2019): a
circular convolution on an ``n1 x n2`` grid is block-diagonalised by the 2-D DFT, so its
singular values are the union over frequencies of the singular values of the
``c_out x c_in`` matrices ``P(u, v)`` of the zero-padded kernel's DFT. A stride ``s`` is
handled by the polyphase decomposition (math.md section 2): the ``s*s`` phases of the
kernel become extra input channels of a stride-1 convolution on the ``n/s`` grid.

These functions work on any dense kernel and are the baseline the TT layer is measured
against; :class:`ttconv.SVDConv` calls them on its small core.

Spectra are computed in float64 for float64 kernels and in float32 otherwise, whatever
the autocast state.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._precision import full_precision
from ._conv_args import check_kernel, dilated_extent, input_size_arg, pair
from ._typing import IntOrPair

__all__ = [
    "conv_singular_values",
    "conv_spectral_norm",
    "check_spectral_input_size",
    "dilate_kernel",
    "polyphase_kernel",
    "spectral_dtype",
]


def spectral_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_spectral_input_size(
    input_size: IntOrPair,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    dilation: Tuple[int, int],
) -> Tuple[int, int]:
    """Validate an input size for the circular spectrum; returns ``(n1, n2)``."""
    n = input_size_arg(input_size)
    for axis, (n_i, s_i, extent) in enumerate(zip(n, stride, dilated_extent(kernel_size, dilation))):
        if n_i % s_i:
            raise ValueError(
                f"input_size {n} is not divisible by stride {stride} along axis {axis}: "
                "the strided circular operator is only defined for such sizes; "
                f"use a multiple of {s_i}"
            )
        if n_i < extent:
            raise ValueError(
                f"input_size {n} is smaller than the (dilated) kernel extent {extent} along axis "
                f"{axis}; use an input of at least {extent} pixels"
            )
    return n


def dilate_kernel(weight: Tensor, dilation: Tuple[int, int]) -> Tensor:
    if dilation == (1, 1):
        return weight
    c_out, c_in, kh, kw = weight.shape
    out = weight.new_zeros(c_out, c_in, dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    out[:, :, :: dilation[0], :: dilation[1]] = weight
    return out


def polyphase_kernel(weight: Tensor, stride: Tuple[int, int]) -> Tensor:
    """Stride-``s`` kernel -> stride-1 kernel with the ``s1*s2`` phases as input channels.

    ``y[p] = sum_j W[j] x[s p + j]``; writing ``j = s t + q`` gives
    ``y[p] = sum_{q, t} W[s t + q] x_q[p + t]`` with ``x_q[m] = x[s m + q]``.
    """
    if stride == (1, 1):
        return weight
    c_out, c_in, kh, kw = weight.shape
    s1, s2 = stride
    t1, t2 = -(-kh // s1), -(-kw // s2)
    padded = torch.nn.functional.pad(weight, (0, t2 * s2 - kw, 0, t1 * s1 - kh))
    phases = padded.reshape(c_out, c_in, t1, s1, t2, s2).permute(0, 1, 3, 5, 2, 4)
    return phases.reshape(c_out, c_in * s1 * s2, t1, t2)


def _frequency_singular_values(
    weight: Tensor, n: Tuple[int, int], stride: Tuple[int, int], dilation: Tuple[int, int], groups: int
) -> Tensor:
    """Singular values per group and frequency, ``(groups, m1, m2, k)``.

    Uses ``rfft2`` (half the frequencies) and restores the conjugate half, whose matrices
    are the complex conjugates and so have the same singular values.
    """
    weight = weight.to(spectral_dtype(weight.dtype))
    kernel = polyphase_kernel(dilate_kernel(weight, dilation), stride)
    m1, m2 = n[0] // stride[0], n[1] // stride[1]
    c_out, c_in = kernel.shape[:2]
    kernel = kernel.reshape(groups, c_out // groups, c_in, *kernel.shape[2:])
    transfer = torch.fft.rfft2(kernel, s=(m1, m2))  # (g, o, i, m1, m2 // 2 + 1)
    values = torch.linalg.svdvals(transfer.permute(0, 3, 4, 1, 2))  # (g, m1, m2h, k)
    # Frequency (u, v) with v > m2 // 2 is the conjugate of (-u, m2 - v), which rfft2 kept.
    device = values.device
    rows = (-torch.arange(m1, device=device)) % m1
    cols = m2 - torch.arange(m2 // 2 + 1, m2, device=device)
    return torch.cat([values, values[:, rows][:, :, cols]], dim=2)


@full_precision
def conv_singular_values(
    weight: Tensor,
    input_size: IntOrPair,
    *,
    stride: IntOrPair = 1,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> Tensor:
    """All singular values of a circular convolution, sorted in descending order.

    Parameters
    ----------
    weight : Tensor
        Kernel ``(c_out, c_in/groups, kh, kw)`` in ``nn.Conv2d`` layout.
    input_size : int or (int, int)
        Spatial size ``(n1, n2)`` of the input; divisible by the stride and at least the
        dilated kernel extent.
    stride, dilation, groups
        As in ``nn.Conv2d``.

    Returns
    -------
    Tensor
        1-D, length ``groups * m1 * m2 * min(c_out/groups, (c_in/groups) * s1 * s2)``
        with ``m = n / s``: every singular value of the operator
        ``x -> circular_conv(x)`` from ``c_in x n1 x n2`` to ``c_out x m1 x m2``, with
        multiplicity. Float64 for float64 kernels, float32 otherwise. Differentiable.

    Notes
    -----
    Exact (Sedghi et al. 2019, polyphase for stride). The padding amount does not enter:
    with circular padding it only shifts the output. Cost
    ``O(n1 n2 c_out c_in min(c_out, c_in))``.

    Examples
    --------
    >>> w = torch.zeros(1, 1, 3, 3); w[0, 0, 1, 1] = 2.0   # 2 * identity
    >>> conv_singular_values(w, (4, 4)).unique()
    tensor([2.])
    """
    groups = check_kernel(weight, groups)
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    n = check_spectral_input_size(input_size, tuple(weight.shape[2:]), stride, dilation)
    values = _frequency_singular_values(weight, n, stride, dilation, groups)
    return values.flatten().sort(descending=True).values


def conv_spectral_norm(
    weight: Tensor,
    input_size: IntOrPair,
    *,
    stride: IntOrPair = 1,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> Tensor:
    """Largest singular value of a circular convolution (0-D tensor, differentiable).

    Same arguments and cost as :func:`conv_singular_values`; a grouped convolution's
    norm is the maximum over its groups.
    """
    return conv_singular_values(weight, input_size, stride=stride, dilation=dilation, groups=groups)[0]
