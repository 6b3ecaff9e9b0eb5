"""The independent oracle shared by all tests: explicit operator matrices.

A linear map is applied to every basis image with ``F.conv2d`` in float64 and the
results are stacked as columns. Nothing here uses ttconv.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def operator_matrix(linear_map: Callable[[Tensor], Tensor], in_shape: Sequence[int]) -> Tensor:
    """Matrix ``(out_numel, in_numel)`` of a linear map on tensors of shape ``in_shape``."""
    numel = math.prod(in_shape)
    basis = torch.eye(numel, dtype=torch.float64).reshape(numel, *in_shape)
    with torch.no_grad():
        images = linear_map(basis)
    return images.reshape(numel, -1).T.contiguous()


def circular_conv(weight: Tensor, stride=(1, 1), dilation=(1, 1), groups: int = 1) -> Callable[[Tensor], Tensor]:
    """``x -> circular convolution of x with weight``, output on the ``n / stride`` grid."""
    kh, kw = weight.shape[-2:]
    pad = (0, dilation[1] * (kw - 1), 0, dilation[0] * (kh - 1))
    w = weight.detach().to(torch.float64)

    def linear_map(x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, pad, mode="circular"), w, None, stride, 0, dilation, groups)

    return linear_map


def layer_operator(module: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """The linear part of a conv layer (its bias removed), with its own padding."""
    bias = getattr(module, "bias", None)

    def linear_map(x: Tensor) -> Tensor:
        y = module(x)
        return y if bias is None else y - bias.detach()[:, None, None]

    return linear_map


def circular_singular_values(weight: Tensor, n, stride=(1, 1), dilation=(1, 1), groups: int = 1) -> Tensor:
    """All singular values (descending) of the circular convolution, from the dense matrix."""
    c_in = weight.shape[1] * groups
    matrix = operator_matrix(circular_conv(weight, stride, dilation, groups), (c_in, *n))
    return torch.linalg.svdvals(matrix)
