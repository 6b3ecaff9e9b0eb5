"""The one place that applies a conv kernel with ``nn.Conv2d``'s padding semantics."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Tuple[int, int],
    padding: Union[str, Tuple[int, int]],
    dilation: Tuple[int, int],
    groups: int,
    padding_mode: str,
    reversed_padding: Sequence[int],
) -> Tensor:
    """``nn.Conv2d``'s forward for any padding mode (``reversed_padding`` feeds ``F.pad``)."""
    if padding_mode != "zeros":
        x = F.pad(x, tuple(reversed_padding), mode=padding_mode)
        return F.conv2d(x, weight, bias, stride, 0, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
