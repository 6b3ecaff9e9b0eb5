"""Exactly orthogonal convolution kernels (BCOP) and orthonormal bases, in any number of dimensions.

Block Convolution Orthogonal Parametrization (Li et al., NeurIPS 2019, after Xiao et al.
2018): with a symmetric projector ``P`` (``P = Q Q^T``, ``Q`` orthonormal columns), the
two-tap kernel ``[P, I - P]`` along one axis has frequency response ``P + (I - P) e^{i w}``,
which is unitary at every frequency because ``P (I - P) = 0``. Composing an orthogonal
matrix ``H`` with ``k_i - 1`` such blocks along each axis ``i`` gives an
``r x r x k_1 x ... x k_d`` kernel whose circular convolution is orthogonal on every input
size, for every dilation, exactly (up to float round-off): its frequency response is a
product of unitary factors at every frequency of every grid.

Pure tensor math with no module: the SVD conv layers use it for ``core_kind='orthogonal'``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["orthonormal_basis", "bcop_kernel", "compose_kernels", "bcop_parameter_count", "skew_matrix_exp"]


class _SkewExp(torch.autograd.Function):
    """``matrix_exp`` of a batch of real skew-symmetric matrices, with a cheaper exact backward.

    The forward is ``torch.linalg.matrix_exp``. Its backward in torch exponentiates a
    ``2n x 2n`` block matrix (about 8 times the forward's work). A skew-symmetric ``A`` is
    normal: ``i A = Q diag(mu) Q^H`` (``eigh``, ``Q`` unitary), and the adjoint of the
    Frechet derivative of ``exp`` at ``A``, applied to ``G``, is the derivative at
    ``A^T = -A = Q diag(i mu) Q^H``: ``Q (Phi o (Q^H G Q)) Q^H`` with ``Phi`` the divided
    differences of ``exp`` at ``(i mu_j, i mu_k)``,
    ``exp(i (mu_j + mu_k) / 2) sinc((mu_j - mu_k) / 2)``, which is exact and stable for equal
    or close eigenvalues (``sinc(0) = 1`` gives ``exp(i mu_j)``). Agrees with torch's backward
    to round-off (``tests/test_orthogonal.py``). Not twice differentiable (an error says so).
    """

    @staticmethod
    def forward(ctx: Any, skew: Tensor) -> Tensor:
        ctx.save_for_backward(skew)
        return torch.linalg.matrix_exp(skew)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (skew,) = ctx.saved_tensors
        complex_dtype = torch.complex128 if skew.dtype == torch.float64 else torch.complex64
        mu, q = torch.linalg.eigh(1j * skew.to(complex_dtype))
        half_sum = (mu[..., :, None] + mu[..., None, :]) / 2
        half_difference = (mu[..., :, None] - mu[..., None, :]) / 2
        divided_differences = torch.polar(torch.ones_like(half_sum), half_sum) * torch.sinc(half_difference / math.pi)
        rotated = q.mH @ grad.to(complex_dtype) @ q
        return (q @ (divided_differences * rotated) @ q.mH).real.to(grad.dtype)


def skew_matrix_exp(skew: Tensor) -> Tensor:
    """``torch.linalg.matrix_exp(skew)`` for real skew-symmetric ``skew`` (batched): an orthogonal
    matrix. The same forward, a backward about 3x cheaper (``_SkewExp``); the input is not
    checked to be skew-symmetric (the backward assumes it)."""
    return _SkewExp.apply(skew)


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
    """Kernel of ``conv(conv(x, inner), outer)`` for batched kernels ``(g, o, i, *k)`` of any ``d``.

    ``outer``: ``(g, o, m, *k2)``, ``inner``: ``(g, m, i, *k1)``; the result is
    ``(g, o, i, *(k1 + k2 - 1))``: the full (zero-padded) convolution of the tap sequences,
    channel products as matrix products.
    """
    g, o, _, *k2 = outer.shape
    _, _, i, *k1 = inner.shape
    # One batched product for every pair of taps: (g, o, i, *k2, *k1).
    products = torch.einsum("goma,gmib->goiab", outer.flatten(3), inner.flatten(3)).reshape(g, o, i, *k2, *k1)
    out = inner.new_zeros(g, o, i, *(a + b - 1 for a, b in zip(k1, k2)))
    for taps in itertools.product(*(range(k) for k in k2)):  # outer tap t lands at offset t
        window: Tuple[Any, ...] = (Ellipsis,) + tuple(slice(t, t + k) for t, k in zip(taps, k1))
        source: Tuple[Any, ...] = (slice(None),) * 3 + taps
        out[window] += products[source]
    return out


def bcop_parameter_count(kernel_size: Sequence[int]) -> int:
    """Number of ``r x r`` generator matrices: one for ``H`` plus one per two-tap block, ``1 + sum(k_i - 1)``."""
    return 1 + sum(k - 1 for k in kernel_size)


def _compose_two_tap(projector: Tensor, kernel: Tensor, axis: int) -> Tensor:
    """``compose_kernels([P, I - P] along axis, kernel)`` with one matrix product.

    ``P K`` is the first tap's contribution and ``(I - P) K = K - P K`` the second's, shifted
    by one along ``axis`` (of the ``d`` spatial axes of ``kernel: (g, r, i, *k)``).
    """
    d = kernel.dim() - 3
    taps_first = torch.einsum("gom,gmi...->goi...", projector, kernel)
    pad_after = [0, 0] * d
    pad_before = [0, 0] * d
    # F.pad lists the last axis first.
    pad_after[2 * (d - 1 - axis) + 1] = 1
    pad_before[2 * (d - 1 - axis)] = 1
    return F.pad(taps_first, pad_after) + F.pad(kernel - taps_first, pad_before)


def bcop_kernel(generators: Tensor, kernel_size: Sequence[int], inputs: Optional[Tensor] = None) -> Tensor:
    """Orthogonal conv kernel ``(g, r, r, *kernel_size)`` from generators ``(g, 1 + sum(k_i - 1), r, r)``.

    Generator 0 gives ``H = matrix_exp(A - A^T)``; each other generator ``A_j`` gives the
    projector onto the span of its first ``r // 2`` columns for one two-tap block: the
    first ``k_1 - 1`` blocks along axis 0, the next ``k_2 - 1`` along axis 1, and so on (in
    2-D: vertical blocks, then horizontal ones). Every generator value yields an exactly
    orthogonal circular convolution (every input size, every dilation); differentiable.
    Works for any number ``d >= 1`` of spatial axes.

    ``inputs``: an optional ``(g, m, n)`` matrix (``m <= r``) applied before the convolution,
    as a 1x1 conv: the result is then the kernel ``(g, r, n, *kernel_size)`` of the
    orthogonal conv's first ``m`` input channels after ``inputs``. The blocks act on the
    output side only, so ``inputs`` folds into ``H`` (``H[:, :m] inputs``) and the kernel is
    never built at ``r`` input channels: cheaper when ``n <= r``.
    """
    kernel_size = tuple(int(k) for k in kernel_size)
    if not kernel_size or any(k < 1 for k in kernel_size):
        raise ValueError(f"kernel_size must be a non-empty sequence of positive ints, got {kernel_size!r}")
    g, count, r, _ = generators.shape
    if count != bcop_parameter_count(kernel_size):
        raise ValueError(f"expected {bcop_parameter_count(kernel_size)} generators for kernel {kernel_size}, got {count}")
    skew = generators[:, 0] - generators[:, 0].transpose(-1, -2)
    first = skew_matrix_exp(skew)
    if inputs is not None:
        first = first[..., : inputs.shape[-2]] @ inputs
    kernel = first.reshape(g, r, first.shape[-1], *(1,) * len(kernel_size))
    j = 1
    for axis, k in enumerate(kernel_size):
        for _ in range(k - 1):
            basis = orthonormal_basis(generators[:, j, :, : r // 2])
            kernel = _compose_two_tap(basis @ basis.transpose(-1, -2), kernel, axis)
            j += 1
    return kernel
