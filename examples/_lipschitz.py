"""Empirical Lipschitz constants and an exact-norm parametrization shared by the 1-D and generator examples.

A network's Lipschitz constant is at least the spectral norm of its Jacobian at any point.
``jacobian_norms`` estimates that norm at every sample of a batch by power iteration on
``J^T J`` (forward-mode ``jvp`` for ``J v``, reverse-mode ``vjp`` for ``J^T u``): each
iterate is a lower bound of the sample's ``||J||_2``, so the largest over a test set is a
lower bound of the global Lipschitz constant. The model must treat samples independently
(eval mode, no batch statistics), which makes the batch Jacobian block diagonal and lets one
power iteration run on every sample at once.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor, nn

import ttconv


def _per_sample_normalize(v: Tensor) -> Tensor:
    norms = v.flatten(1).norm(dim=1).clamp_min(1e-30)
    return v / norms.view(-1, *([1] * (v.dim() - 1)))


def jacobian_norms(function: Callable[[Tensor], Tensor], x: Tensor, *, iters: int = 30, seed: int = 0) -> Tensor:
    """Lower estimates of ``||J_f(x_i)||_2`` for every sample ``x_i`` of the batch ``x`` (1-D tensor)."""
    generator = torch.Generator().manual_seed(seed)
    v = _per_sample_normalize(torch.randn(x.shape, generator=generator, dtype=x.dtype))
    _, pullback = torch.func.vjp(function, x)
    sigma = torch.zeros(len(x), dtype=x.dtype)
    for _ in range(iters):
        _, u = torch.func.jvp(function, (x,), (v,))  # J v with ||v|| = 1: ||J v|| <= ||J||
        sigma = u.flatten(1).norm(dim=1)
        (w,) = pullback(u)
        v = _per_sample_normalize(w)
    return sigma.detach()


def empirical_lipschitz(function: Callable[[Tensor], Tensor], x: Tensor, *, batch: int = 256, iters: int = 30) -> float:
    """Largest Jacobian norm over the samples of ``x``: a lower bound of ``f``'s Lipschitz constant."""
    return max(float(jacobian_norms(function, part, iters=iters).max()) for part in x.split(batch))


class ExactNormCap(nn.Module):
    """Parametrization ``W -> W * min(1, target / sigma(W))``, ``sigma`` the conv's exact circular norm.

    Spectral normalisation as ``torch.nn.utils.parametrizations.spectral_norm`` does it (the
    weight is divided in every forward, so gradients see the normalisation), but with the
    convolution's operator norm on a grid of ``size`` (``ttconv.conv_spectral_norm``,
    differentiable) instead of the norm of the weight reshaped to a matrix. For a transposed
    layer pass its *output* size: it is the adjoint of the conv with its weight on that grid.
    ttconv has no such parametrization (``SpectralControl`` projects after optimizer steps);
    this one recomputes the norm from the dense kernel at every forward.
    """

    def __init__(self, target: float, size: Tuple[int, ...], stride: Tuple[int, ...],
                 dilation: Tuple[int, ...]) -> None:
        super().__init__()
        self.target, self.size, self.stride, self.dilation = target, size, stride, dilation

    def forward(self, weight: Tensor) -> Tensor:
        sigma = ttconv.conv_spectral_norm(weight, self.size, stride=self.stride, dilation=self.dilation)
        return weight * (self.target / sigma).clamp(max=1.0)
