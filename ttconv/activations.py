"""1-Lipschitz activations for Lipschitz-constrained networks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MaxMin", "ChannelPad"]


class MaxMin(nn.Module):
    """GroupSort with groups of two (Anil et al. 2019; "MaxMin"): 1-Lipschitz and norm preserving.

    Splits the channels (``dim``) into two halves ``a``, ``b`` and returns
    ``cat(max(a, b), min(a, b))``: a sorting permutation of each pair, so
    ``||f(x) - f(y)|| <= ||x - y||`` and ``||f(x)|| = ||x||``.

    Examples
    --------
    >>> MaxMin()(torch.tensor([[1.0, -2.0, 3.0, 0.0]]))
    tensor([[ 3.,  0.,  1., -2.]])
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, torch.fx.Proxy) and input.shape[self.dim] % 2:
            raise ValueError(f"MaxMin needs an even number of channels along dim {self.dim}, got shape "
                             f"{tuple(input.shape)}")
        a, b = input.chunk(2, dim=self.dim)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class ChannelPad(nn.Module):
    """Append zero channels up to ``channels``: an isometry (norm preserving, 1-Lipschitz).

    Lets a Lipschitz network widen its first layer without a non-square conv.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):  # symbolic_trace: sizes unknown, no check
            return nn.functional.pad(input, (0, 0, 0, 0, 0, self.channels - input.shape[-3]))
        missing = self.channels - input.shape[-3]
        if missing < 0:
            raise ValueError(f"input has {input.shape[-3]} channels, more than ChannelPad({self.channels})")
        return nn.functional.pad(input, (0, 0, 0, 0, 0, missing))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
