"""Exactly orthogonal convolution kernels (BCOP) and orthonormal bases.

Block Convolution Orthogonal Parametrization (Li et al., NeurIPS 2019, after Xiao et al.
2018): with a symmetric projector ``P`` (``P = Q Q^T``, ``Q`` orthonormal columns), the
two-tap kernel ``[P, I - P]`` has frequency response ``P + (I - P) e^{i w}``, which is
unitary at every frequency because ``P (I - P) = 0``. Composing an orthogonal matrix ``H``
with ``kh - 1`` vertical (2x1) and ``kw - 1`` horizontal (1x2) such blocks gives an
``r x r x kh x kw`` kernel whose circular convolution is orthogonal on every input size,
for every dilation, exactly (up to float round-off): a product of paraunitary factors.

Pure tensor math with no module: ``ttconv.SVDConv`` uses it for ``core='orthogonal'``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["orthonormal_basis", "bcop_kernel", "compose_kernels", "bcop_parameter_count"]


def orthonormal_basis(raw: Tensor) -> Tensor:
    """Orthonormal basis of the column span of ``raw`` (batched), smooth in ``raw``.

    The Q factor of the QR decomposition with the signs fixed so that ``R`` has a
    non-negative diagonal: the unique, continuous choice for full-column-rank input.
    """
    q, r = torch.linalg.qr(raw)
    signs = torch.sgn(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def compose_kernels(outer: Tensor, inner: Tensor) -> Tensor:
    """Kernel of ``conv(conv(x, inner), outer)`` for batched kernels ``(g, o, i, kh, kw)``."""
    g, o, _, h2, w2 = outer.shape
    _, _, i, h1, w1 = inner.shape
    out = inner.new_zeros(g, o, i, h1 + h2 - 1, w1 + w2 - 1)
    for a in range(h2):
        for b in range(w2):
            out[..., a: a + h1, b: b + w1] += torch.einsum("gom,gmihw->goihw", outer[..., a, b], inner)
    return out


def bcop_parameter_count(kernel_size: Tuple[int, int]) -> int:
    """Number of ``r x r`` generator matrices: one for ``H`` plus one per two-tap block."""
    return kernel_size[0] + kernel_size[1] - 1


def bcop_kernel(generators: Tensor, kernel_size: Tuple[int, int]) -> Tensor:
    """Orthogonal conv kernel ``(g, r, r, kh, kw)`` from generators ``(g, kh + kw - 1, r, r)``.

    Generator 0 gives ``H = matrix_exp(A - A^T)``; each other generator ``A_j`` gives the
    projector onto the span of its first ``r // 2`` columns for one two-tap block. Every
    generator value yields an exactly orthogonal convolution; differentiable.
    """
    g, count, r, _ = generators.shape
    if count != bcop_parameter_count(kernel_size):
        raise ValueError(f"expected {bcop_parameter_count(kernel_size)} generators for kernel {kernel_size}, got {count}")
    skew = generators[:, 0] - generators[:, 0].transpose(-1, -2)
    kernel = torch.linalg.matrix_exp(skew)[..., None, None]  # (g, r, r, 1, 1)
    eye = torch.eye(r, dtype=generators.dtype, device=generators.device)
    for j in range(1, count):
        basis = orthonormal_basis(generators[:, j, :, : r // 2])
        projector = basis @ basis.transpose(-1, -2)
        vertical = j < kernel_size[0]
        block = torch.stack([projector, eye - projector], dim=-1)  # (g, r, r, 2)
        block = block.unsqueeze(-1) if vertical else block.unsqueeze(-2)
        kernel = compose_kernels(block, kernel)
    return kernel
