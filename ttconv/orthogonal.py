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

from ._compile import compiling
from ._precision import full_precision

__all__ = ["orthonormal_basis", "bcop_kernel", "bcop_halves", "compose_kernels", "bcop_parameter_count",
           "skew_matrix_exp"]


# Taylor degrees the exponential chooses from (``skew_matrix_exp``).
_TAYLOR_DEGREES = (1, 2, 3, 4, 6, 8, 10, 12, 15, 18, 24)


def _taylor_products(degree: int) -> int:
    """Matrix products to evaluate a Taylor polynomial of ``degree`` by Paterson-Stockmeyer,
    given ``X^2``: the powers ``X^3 .. X^b`` (``b = ceil(sqrt(degree + 1))``), then one
    product per further chunk of ``b`` coefficients (Horner's rule in ``X^b``)."""
    block = math.ceil(math.sqrt(degree + 1))
    chunks = math.ceil((degree + 1) / block)
    last_is_one_coefficient = (degree + 1) % block == 1
    return max(0, block - 2) + chunks - 1 - int(last_is_one_coefficient)


def _taylor_theta(degree: int, dtype: torch.dtype) -> float:
    """Largest scaled norm ``theta`` with ``2 theta^m / m! <= unit / 2`` (``_taylor_plan``)."""
    unit = torch.finfo(dtype).eps / 2
    return (math.factorial(degree) * unit / 4) ** (1.0 / degree)


def _taylor_plan(norm: float, dtype: torch.dtype) -> Tuple[int, int]:
    """``(degree, squarings)`` of the cheapest scaling-and-squaring Taylor approximant of
    ``exp(X)`` for ``||X||_2 <= norm`` (``X`` skew-symmetric, so ``||exp(X)||_2 = 1``) whose
    truncation error stays below half a unit of round-off of ``dtype``, for the value and for
    its derivative: the derivative's tail, ``sum_{k > m} t^(k-1) / (k-1)!`` at the scaled norm
    ``t = norm / 2^s`` (at most twice its first term ``t^m / m!`` for these degrees and
    scaled norms), is the larger of the two."""
    best: Optional[Tuple[int, int, int]] = None
    for degree in _TAYLOR_DEGREES:
        theta = _taylor_theta(degree, dtype)
        squarings = max(0, math.ceil(math.log2(norm / theta))) if norm > 0 else 0
        cost = _taylor_products(degree) + squarings
        if best is None or cost < best[0]:
            best = (cost, degree, squarings)
    assert best is not None
    return best[1], best[2]


def skew_matrix_exp(skew: Tensor) -> Tensor:
    """``exp(skew)`` for a batch of real skew-symmetric matrices: orthogonal matrices.

    Scaling and squaring of a Taylor polynomial, written in torch operations so autograd
    differentiates it (also twice), and sized to the input: the degree ``m`` and the number
    ``s`` of squarings are the cheapest pair whose truncation error is below the dtype's
    round-off (``_taylor_plan``), from the bound ``||skew||_2 <= ||skew^2||_1^(1/2)`` (for
    skew-symmetric ``A``, ``A^2`` is symmetric with ``||A^2||_2 = ||A||_2^2``). A small
    generator therefore costs a few ``r x r`` products forward and twice that backward: at
    zero one product, where ``torch.linalg.matrix_exp`` forward plus its ``2r x 2r`` block
    backward costs dozens. Agrees with ``torch.linalg.matrix_exp`` and its gradient to
    round-off (``tests/test_orthogonal.py``). The input is not checked to be skew-symmetric
    (the error bound assumes it). One host sync reads the norm, as ``matrix_exp`` does on CUDA.
    Where there are no values to read, or a plan read once would be frozen (meta tensors,
    ``torch.compile``'s tracing, ``torch.jit.trace``), it is ``torch.linalg.matrix_exp``.
    """
    if skew.is_meta or compiling() or torch.jit.is_tracing():
        # No values to size the polynomial by (meta tensors; torch.compile's tracing, which
        # cannot branch on them; torch.jit.trace, which would freeze one plan for every later
        # input): torch's own exponential, sized inside the operator.
        return torch.linalg.matrix_exp(skew)
    if skew.dtype in (torch.float16, torch.bfloat16):
        # Each squaring doubles the relative error: half precision would not survive them.
        return _sized_taylor_exp(skew.float()).to(skew.dtype)
    return _sized_taylor_exp(skew)


@full_precision  # under autocast too: the squarings amplify a low-precision product's error
def _sized_taylor_exp(skew: Tensor) -> Tensor:
    if skew.shape[-1] == 0:
        return skew.clone()
    square = skew @ skew
    norms = square.detach().abs().sum(-2).amax(-1).sqrt()  # per matrix: ||A^2||_1^(1/2) >= ||A||_2
    finite = torch.isfinite(norms)
    largest = float(torch.where(finite, norms, 0).amax()) if norms.numel() else 0.0  # the one host read
    degree, squarings = _taylor_plan(largest, skew.dtype)
    # Each matrix is scaled by its own power of two (``own`` squarings, at most ``squarings``),
    # so a large one in the batch costs the others no accuracy. Past ``digits`` squarings the
    # doubling round-off has eaten every digit: such a matrix, and one that is not finite, gets
    # NaN, as from torch.linalg.matrix_exp, never a finite non-orthogonal matrix.
    digits = round(-math.log2(torch.finfo(skew.dtype).eps))
    # (Capped at the plan's count, which rounding in another precision could exceed by one:
    # each matrix must be squared exactly as often as it was halved.)
    own = torch.clamp(torch.ceil(torch.log2(norms / _taylor_theta(degree, skew.dtype))), min=0, max=squarings)
    own = torch.where(finite, own, 0)
    scale = torch.exp2(-own)[..., None, None]
    x, x2 = skew * scale, square * scale * scale
    block = math.ceil(math.sqrt(degree + 1))
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
    powers = [eye, x, x2]
    while len(powers) <= block:
        powers.append(powers[-1] @ x)
    coefficients = [1.0 / math.factorial(k) for k in range(degree + 1)]
    chunks = [coefficients[i:i + block] for i in range(0, degree + 1, block)]

    def chunk(values: Sequence[float]) -> Tensor:
        # sum_k values[k] X^k for 2 <= len(values) <= block: no product.
        total = values[0] * eye + values[1] * powers[1]
        for value, power in zip(values[2:], powers[2:]):
            total = total + value * power
        return total

    if len(chunks[-1]) == 1:  # a last chunk c X^block needs no product
        result, rest = chunk(chunks[-2]) + chunks[-1][0] * powers[block], chunks[:-2]
    else:
        result, rest = chunk(chunks[-1]), chunks[:-1]
    for values in reversed(rest):  # Horner's rule in X^block
        result = chunk(values) + powers[block] @ result
    for k in range(min(squarings, digits)):
        result = torch.where((own > k)[..., None, None], result @ result, result)
    usable = finite & (own <= digits)
    return torch.where(usable[..., None, None], result, torch.nan)


def orthonormal_basis(raw: Tensor) -> Tensor:
    """Orthonormal basis of the column span of ``raw`` (batched), smooth in ``raw``.

    The Q factor of the QR decomposition with the signs fixed so that ``R`` has a
    non-negative diagonal: the unique, continuous choice for full-column-rank input.
    """
    q, r = torch.linalg.qr(raw)
    # The signs are piecewise constant: detached, so the QR's backward gets no (all-zero) gradient
    # for R and skips its R-side product.
    signs = torch.sgn(torch.diagonal(r.detach(), dim1=-2, dim2=-1))
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


def _two_tap(first_taps: Tensor, kernel: Tensor, dim: int) -> Tensor:
    """A kernel composed with a block ``[P, I - P]`` whose taps run along tensor dimension
    ``dim``, given ``first_taps``, the kernel's taps times ``P``: those land at offset 0 and
    ``kernel - first_taps`` (the taps times ``I - P``) at offset 1."""
    pad_after = [0, 0] * (kernel.dim() - dim)
    pad_before = list(pad_after)
    # F.pad lists the last dimension first.
    pad_after[-1] = 1
    pad_before[-2] = 1
    return F.pad(first_taps, pad_after) + F.pad(kernel - first_taps, pad_before)


def _compose_two_tap(projector: Tensor, kernel: Tensor, axis: int) -> Tensor:
    """``compose_kernels([P, I - P] along axis, kernel)`` with one matrix product per tap, for
    ``kernel: (g, o, i, *k)`` (``axis`` one of its spatial axes)."""
    return _two_tap(torch.einsum("gom,gmi...->goi...", projector, kernel), kernel, 3 + axis)


def _compose_two_tap_after(taps: Tensor, projector: Tensor) -> Tensor:
    """``compose_kernels(kernel, [P, I - P])`` along a kernel's one axis, the block running
    first, for ``taps: (g, t, o, m)`` (tap-major, so that ``taps P`` is one batched product
    without a transpose); returns ``(g, t + 1, o, m)``."""
    g, t, o, m = taps.shape
    return _two_tap((taps.reshape(g, t * o, m) @ projector).reshape(g, t, o, m), taps, 1)


def bcop_kernel(generators: Tensor, kernel_size: Sequence[int], inputs: Optional[Tensor] = None,
                outputs: Optional[Tensor] = None) -> Tensor:
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

    ``outputs``: an optional ``(g, c, m)`` matrix (``m <= r``) applied after the convolution to
    its first ``m`` output channels, as a 1x1 conv: the result is ``(g, c, ..., *kernel_size)``.
    The last axis's blocks are then composed onto ``outputs`` (from its input side) and the
    other axes' onto ``H``, and one product joins the two halves: for a 3 x 3 kernel 9 + 3 + 4
    ``r x r``-sized products where composing onto ``H`` alone and then applying ``outputs``
    takes 9 + 12 + 1.
    """
    if outputs is None:
        kernel, _ = _bcop_halves(generators, kernel_size, inputs, None)
        return kernel
    right, left = _bcop_halves(generators, kernel_size, inputs, outputs)
    # Every tap of the left half times every tap of the right half: one batched product.
    return torch.einsum("gtcm,gmi...->gci...t", left, right.squeeze(-1))


def bcop_halves(generators: Tensor, kernel_size: Sequence[int], inputs: Optional[Tensor],
                outputs: Tensor) -> Tuple[Tensor, Tensor]:
    """``bcop_kernel(generators, kernel_size, inputs, outputs)`` as two convolutions, unjoined.

    Returns ``(first, second)``: ``first`` ``(g, r, n, *kernel_size[:-1], 1)`` is ``H`` after
    ``inputs`` with every block of the axes before the last; ``second`` ``(g, c, r, 1, ...,
    1, kernel_size[-1])`` is ``outputs`` after the last axis's blocks. Convolving with
    ``first`` and then ``second`` (taps along different axes, so the taps of the
    composition are the products of theirs) is convolving with the joined kernel, for
    every padding mode, stride and dilation split by axis: padding or striding one axis
    commutes with a convolution along the others. Per position that is
    ``r (n prod(k[:-1]) + c k[-1])`` multiply-adds instead of ``c n prod(k)``, and building
    the halves skips the product that joins them. Both are contiguous.
    """
    right, left = _bcop_halves(generators, kernel_size, inputs, outputs)
    assert left is not None
    g, t, c, r = left.shape
    second = left.permute(0, 2, 3, 1).reshape(g, c, r, *(1,) * (len(kernel_size) - 1), t)
    # Contiguous, as torch's conv weights are: a conv takes its output's memory format from its
    # weight's strides, and a permuted view can read as channels-last.
    return right.contiguous(), second.contiguous()


def _bcop_halves(generators: Tensor, kernel_size: Sequence[int], inputs: Optional[Tensor],
                 outputs: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """``bcop_kernel``'s two halves: the right one ``(g, r, n, *k)`` (every axis composed
    without ``outputs``; the last axis at size 1 with them) and, with ``outputs``, the left
    one as taps ``(g, k[-1], c, r)`` (tap-major, so that ``taps P`` is one batched product)."""
    kernel_size = tuple(int(k) for k in kernel_size)
    if not kernel_size or any(k < 1 for k in kernel_size):
        raise ValueError(f"kernel_size must be a non-empty sequence of positive ints, got {kernel_size!r}")
    g, count, r, _ = generators.shape
    if count != bcop_parameter_count(kernel_size):
        raise ValueError(f"expected {bcop_parameter_count(kernel_size)} generators for kernel {kernel_size}, got {count}")
    for name, matrix, axis in (("inputs", inputs, -2), ("outputs", outputs, -1)):
        if matrix is not None and matrix.shape[axis] > r:
            raise ValueError(f"{name} acts on at most r = {r} channels of the orthogonal conv, got shape "
                             f"{tuple(matrix.shape)}")
    # Split, not index: each index's gradient would be a zero-filled copy of every generator.
    head, tails = generators.split([1, count - 1], dim=1)
    skew = head.squeeze(1) - head.squeeze(1).transpose(-1, -2)
    first = skew_matrix_exp(skew)
    if inputs is not None:
        first = first[..., : inputs.shape[-2]] @ inputs
    d = len(kernel_size)
    kernel = first.reshape(g, r, first.shape[-1], *(1,) * d)
    blocks = [axis for axis, k in enumerate(kernel_size) for _ in range(k - 1)]  # generator j + 1's axis
    # One batched QR for every block. A projector depends on the span only: no sign fixing.
    bases = torch.linalg.qr(tails[..., : r // 2]).Q  # (g, blocks, r, r // 2)
    projectors = (bases @ bases.transpose(-1, -2)).unbind(1)
    last = d - 1 if outputs is not None else d  # the axis composed onto outputs, if any
    for axis, projector in zip(blocks, projectors):
        if axis < last:
            kernel = _compose_two_tap(projector, kernel, axis)
    if outputs is None:
        return kernel, None
    # outputs times the first m rows of the operator: zero columns up to r.
    left = F.pad(outputs, (0, r - outputs.shape[-1])).unsqueeze(1)  # (g, 1 tap, c, r) along the last axis
    for axis, projector in reversed(list(zip(blocks, projectors))):  # the last block runs last
        if axis == last:
            left = _compose_two_tap_after(left, projector)
    return kernel, left
