"""Empirical Lipschitz constants shared by the 1-D and generator examples.

A network's Lipschitz constant is at least the spectral norm of its Jacobian at any point.
``jacobian_norms`` estimates that norm at every sample of a batch by power iteration on
``J^T J`` (forward-mode ``jvp`` for ``J v``, reverse-mode ``vjp`` for ``J^T u``): each
iterate is a lower bound of the sample's ``||J||_2``, so the largest over a test set is a
lower bound of the global Lipschitz constant. The model must treat samples independently
(eval mode, no batch statistics), which makes the batch Jacobian block diagonal and lets one
power iteration run on every sample at once.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


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
