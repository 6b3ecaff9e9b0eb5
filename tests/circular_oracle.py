"""Explicit circular-convolution operators at every input size, for any number of spatial axes.

``tests/oracle.py`` pads with ``F.pad(mode='circular')``, which torch allows only for a
padding of at most the input size, so it cannot build the circular operator on an input
smaller than the kernel. Here the input is tiled (``Tensor.repeat``) until it covers the
dilated kernel, and a valid ``F.conv{1,2,3}d`` runs on the tiled input: output ``p`` is
``sum_j W[j] x[(s p + d j) mod n]`` with no folding logic of ttconv involved. The matrix
is built, as in ``oracle.py``, by applying the map to every basis image in float64.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from oracle import operator_matrix, svdvals_cpu

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def circular_conv_any_size(weight: Tensor, stride: Sequence[int], dilation: Sequence[int],
                           groups: int = 1) -> Callable[[Tensor], Tensor]:
    """``x -> circular convolution`` on ``(batch, c_in, *n)``, output on the ``n / stride`` grid.

    ``n`` must be divisible by the stride; any ``n >= 1`` otherwise.
    """
    d = weight.dim() - 2
    w = weight.detach().to(torch.float64)
    extent = [dil * (k - 1) + 1 for dil, k in zip(dilation, weight.shape[2:])]

    def linear_map(x: Tensor) -> Tensor:
        n = x.shape[-d:]
        reps = [-(-(n_i + e - 1) // n_i) for n_i, e in zip(n, extent)]
        tiled = x.repeat(1, 1, *reps)
        tiled = tiled[(..., *[slice(0, n_i + e - 1) for n_i, e in zip(n, extent)])]
        return _CONV[d](tiled, w, None, tuple(stride), 0, tuple(dilation), groups)

    return linear_map


def circular_singular_values_any_size(weight: Tensor, n: Sequence[int], stride: Sequence[int],
                                      dilation: Sequence[int], groups: int = 1) -> Tensor:
    """All singular values (descending) of the circular convolution on ``n``, from the dense matrix."""
    c_in = weight.shape[1] * groups
    matrix = operator_matrix(circular_conv_any_size(weight, stride, dilation, groups), (c_in, *n))
    return svdvals_cpu(matrix).to(matrix.dtype)  # LAPACK: the oracle is the same on every device
