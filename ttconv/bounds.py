"""Spectral norms of convolution layers: exact values, provable upper bounds, estimates.

Every function takes a kernel ``(c_out, c_in/groups, kh, kw)``, an ``nn.Conv2d`` or an
:class:`~ttconv.SVDConv`, and returns a tensor. For a layer, its stride, dilation, groups
(and padding, where it matters) are used; for an ``SVDConv`` the work is done on its
small orthonormal core (:meth:`~ttconv.SVDConv.orthonormal_core`), which gives the same
value as the dense kernel for every method here except the spatial Gram bound (a
different, equally valid bound). Results are float64 for float64 parameters, float32
otherwise.

=======================================  =====================  =================  ==================
function                                 padding it is for      kind               cost
=======================================  =====================  =================  ==================
:func:`exact_spectral_norm`              circular, size n       exact              ``n^2 c^3``
:func:`fantastic_four_bound`             zero and circular,     upper bound        four matrix norms
                                         any n
:func:`gram_iteration_bound`             circular, size n       upper bound,       ``t n^2 c^3``
                                                                converges to exact (matmuls only)
:func:`zero_padding_bound`               zero and circular,     upper bound        grows as 4^t
                                         any n
:func:`operator_norm_bound`              the layer's own mode,  upper bound        one exact FFT
                                         size n                                    norm
:func:`power_iteration_estimate`         the layer's own mode,  lower estimate     ``n_iter`` convs
                                         size n
=======================================  =====================  =================  ==================

Stride: the strided operator is the stride-1 operator followed by subsampling (a partial
isometry), so stride-1 bounds hold for it; the exact and Gram methods use the polyphase
form and bound/compute the strided operator itself. Dilation: methods act on the dilated
kernel. Groups: the operator is block diagonal, its norm is the max over groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._precision import full_precision
from . import _conv_args as args
from . import _functional
from ._typing import IntOrPair
from .layer import SVDConv
from .spectra import (
    check_spectral_input_size,
    conv_spectral_norm,
    dilate_kernel,
    polyphase_kernel,
    spectral_dtype,
)

__all__ = [
    "ConvSpec",
    "conv_spec",
    "exact_spectral_norm",
    "fantastic_four_bounds",
    "fantastic_four_bound",
    "gram_iteration_bound",
    "zero_padding_bound",
    "operator_norm_bound",
    "power_iteration_estimate",
]

ConvLike = Union[Tensor, nn.Conv2d, SVDConv]


@dataclass(frozen=True)
class ConvSpec:
    """A kernel with the geometry that the bound methods need.

    For an ``SVDConv`` the kernel is its orthonormal core, whose operator has the same
    nonzero singular values as the layer for every padding mode.
    """

    kernel: Tensor
    stride: Tuple[int, int] = (1, 1)
    padding: Union[str, Tuple[int, int]] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def reversed_padding(self) -> Tuple[int, int, int, int]:
        return args.reversed_padding_repeated_twice(self.padding, tuple(self.kernel.shape[2:]), self.dilation)


def _check_kernel(kernel: Tensor, groups: int, name: str = "weight") -> None:
    if not isinstance(kernel, Tensor):
        raise TypeError(f"{name} must be a Tensor, nn.Conv2d or SVDConv, got {type(kernel).__name__}")
    args.check_kernel(kernel, groups, name)
    if not kernel.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {kernel.dtype}")


def conv_spec(
    target: ConvLike,
    *,
    stride: IntOrPair = 1,
    dilation: IntOrPair = 1,
    groups: int = 1,
    padding: Union[str, IntOrPair] = 0,
    padding_mode: str = "zeros",
) -> ConvSpec:
    """Normalise a kernel or layer into a :class:`ConvSpec` (keyword geometry only for kernels)."""
    if isinstance(target, SVDConv):
        spec = ConvSpec(target.orthonormal_core(), target.stride, target.padding, target.dilation,
                        target.groups, target.padding_mode)
    elif isinstance(target, nn.Conv2d):
        spec = ConvSpec(target.weight, target.stride, target.padding, target.dilation, target.groups,
                        target.padding_mode)
    else:
        stride_pair = args.pair(stride, "stride")
        spec = ConvSpec(
            target, stride_pair, args.padding_arg(padding, stride_pair), args.pair(dilation, "dilation"),
            args.positive_int(groups, "groups"), args.padding_mode_arg(padding_mode),
        )
    _check_kernel(spec.kernel, spec.groups)
    return spec


def _grouped_kernel(spec: ConvSpec) -> Tensor:
    """Dilated kernel split by group: ``(groups, c_out/g, c_in/g, kh', kw')`` in spectral dtype."""
    kernel = dilate_kernel(spec.kernel.to(spectral_dtype(spec.kernel.dtype)), spec.dilation)
    return kernel.reshape(spec.groups, -1, *kernel.shape[1:])


# ----------------------------------------------------------------------------- exact
@full_precision
def exact_spectral_norm(target: ConvLike, input_size: IntOrPair, **geometry) -> Tensor:
    """Exact spectral norm of the circular convolution on an ``n1 x n2`` input.

    Sedghi et al. (ICLR 2019), polyphase for stride. Exact for circular padding; for zero
    padding at size ``n`` use :func:`operator_norm_bound`. Differentiable. Cost
    ``O(n1 n2 c_out c_in min(c_out, c_in))`` (``r^3`` for an ``SVDConv``).
    """
    spec = conv_spec(target, **geometry)
    return conv_spectral_norm(spec.kernel, input_size, stride=spec.stride, dilation=spec.dilation, groups=spec.groups)


# ------------------------------------------------------------------ fantastic four
def _matrix_norm(matrix: Tensor, method: str, n_iter: int, state: Optional[Dict[str, Tensor]], key: str) -> Tensor:
    """Largest singular value of a batch of matrices ``(..., m, k)``, max over the batch."""
    if method == "exact":
        return torch.linalg.matrix_norm(matrix, ord=2).amax()
    # Power iteration with persistent vectors (Miyato et al.; Singla & Feizi's code): the
    # vectors carry no gradient, sigma = u^T M v does.
    with torch.no_grad():
        v = state.get(key) if state is not None else None
        if v is None or v.shape != matrix.shape[:-2] + matrix.shape[-1:]:
            v = torch.randn(*matrix.shape[:-2], matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        v = F.normalize(v.to(matrix.dtype), dim=-1)
        for _ in range(n_iter):
            u = F.normalize((matrix @ v.unsqueeze(-1)).squeeze(-1), dim=-1)
            v = F.normalize((matrix.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1), dim=-1)
        u = F.normalize((matrix @ v.unsqueeze(-1)).squeeze(-1), dim=-1)
        if state is not None:
            state[key] = v
    return (u.unsqueeze(-2) @ matrix @ v.unsqueeze(-1)).amax()


@full_precision
def fantastic_four_bounds(
    target: ConvLike,
    *,
    method: str = "exact",
    n_iter: int = 10,
    state: Optional[Dict[str, Tensor]] = None,
    per_group: bool = False,
    **geometry,
) -> Tensor:
    """The four bounds of Singla & Feizi (ICLR 2021), ``sqrt(kh*kw) * ||M||_2`` per reshape.

    Reshapes (math.md section 3): ``R: (c_out*kh, c_in*kw)``, ``S: (c_out*kw, c_in*kh)``,
    ``T: (c_out, c_in*kh*kw)``, ``U: (c_out*kh*kw, c_in)`` of the (dilated) kernel.

    Parameters
    ----------
    method : {'exact', 'power'}
        ``'exact'``: ``torch.linalg.matrix_norm(., 2)``, each value a provable upper bound
        on the spectral norm for zero and circular padding, any input size, any stride.
        ``'power'``: ``n_iter`` power iterations with vectors kept in ``state`` between
        calls (cheap, for training); the values approach the bounds from below.
    state : dict, optional
        Holds the persistent power-iteration vectors (pass the same dict every call).
    per_group : bool
        Return ``(groups, 4)`` instead of the max over groups ``(4,)``.

    Returns
    -------
    Tensor
        ``(4,)`` (or ``(groups, 4)``), differentiable.
    """
    if method not in ("exact", "power"):
        raise ValueError(f"method must be 'exact' or 'power', got {method!r}")
    n_iter = args.positive_int(n_iter, "n_iter")
    spec = conv_spec(target, **geometry)
    k = _grouped_kernel(spec)  # (g, o, i, kh, kw)
    g, o, i, kh, kw = k.shape
    reshapes = {
        "R": k.permute(0, 1, 3, 2, 4).reshape(g, o * kh, i * kw),
        "S": k.permute(0, 1, 4, 2, 3).reshape(g, o * kw, i * kh),
        "T": k.reshape(g, o, i * kh * kw),
        "U": k.permute(0, 1, 3, 4, 2).reshape(g, o * kh * kw, i),
    }
    scale = math.sqrt(kh * kw)
    values = []
    for name, matrix in reshapes.items():
        if per_group:
            norms = torch.stack([_matrix_norm(matrix[j], method, n_iter, state, f"{name}{j}") for j in range(g)])
        else:
            norms = _matrix_norm(matrix, method, n_iter, state, name)
        values.append(scale * norms)
    return torch.stack(values, dim=-1)


def fantastic_four_bound(target: ConvLike, **options) -> Tensor:
    """``max over groups of min of the four`` :func:`fantastic_four_bounds` (0-D, differentiable).

    A provable upper bound on the spectral norm for zero and circular padding, any input
    size and stride, with ``method='exact'``; the natural training regularizer.
    Typically 1.6-1.8x the exact value on random 3x3 kernels (``bounds.md``).
    """
    options["per_group"] = True
    return fantastic_four_bounds(target, **options).amin(-1).amax()


# ------------------------------------------------------------------ Gram iteration
def _gram_iterate(matrices: Tensor, n_iter: int) -> Tuple[Tensor, Tensor]:
    """Rescaled Gram iteration (Delattre et al. 2023) on a batch; returns ``(G_t, log_scale)``."""
    log_scale = torch.zeros(matrices.shape[:-2], dtype=matrices.real.dtype, device=matrices.device)
    for _ in range(n_iter):
        norm = torch.linalg.matrix_norm(matrices, ord="fro").clamp_min(torch.finfo(log_scale.dtype).tiny)
        matrices = matrices / norm[..., None, None]
        log_scale = 2 * (log_scale + norm.log())
        matrices = matrices.mH @ matrices
    return matrices, log_scale


@full_precision
def gram_iteration_bound(target: ConvLike, input_size: IntOrPair, *, n_iter: int = 6, **geometry) -> Tensor:
    """Gram-iteration upper bound on the circular spectral norm (Delattre et al., ICML 2023).

    Iterates ``G <- G^H G`` with Frobenius rescaling on all ``n1 (n2//2+1)`` frequency
    matrices of the (polyphase, for stride) kernel at once and bounds each by its
    Frobenius norm: ``sigma <= ||G_t||_F^(2^-t)``. Provable for every ``n_iter``,
    decreasing in ``n_iter`` and converging to :func:`exact_spectral_norm` (measured worst
    ratio 1.0012 at t=3, ``bounds.md``). Only matmuls: cheaper than the SVDs of the exact
    method for large channel counts. Differentiable.
    """
    n_iter = args.positive_int(n_iter, "n_iter")
    spec = conv_spec(target, **geometry)
    n = check_spectral_input_size(input_size, tuple(spec.kernel.shape[2:]), spec.stride, spec.dilation)
    kernel = polyphase_kernel(_grouped_kernel(spec).flatten(0, 1), spec.stride)
    kernel = kernel.reshape(spec.groups, -1, *kernel.shape[1:])
    transfer = torch.fft.rfft2(kernel, s=(n[0] // spec.stride[0], n[1] // spec.stride[1]))
    matrices = transfer.permute(0, 3, 4, 1, 2)  # (g, m1, m2h, o, i)
    if matrices.shape[-1] > matrices.shape[-2]:
        matrices = matrices.mH  # the Gram matrices are (smaller dim)^2
    gram, log_scale = _gram_iterate(matrices, n_iter)
    frobenius = torch.linalg.matrix_norm(gram, ord="fro")
    scale = 2.0**-n_iter
    return (frobenius.log() * scale + log_scale * scale).exp().amax()


@full_precision
def zero_padding_bound(target: ConvLike, *, n_iter: int = 3, **geometry) -> Tensor:
    """Spatial Gram-iteration bound, valid for zero and circular padding at every input size.

    Delattre et al. (2024): iterate on the kernel itself, ``K <- K * K^T`` (the kernel of
    ``A A^T``, support ``2k - 1``) with Frobenius rescaling, then bound the final Gram
    operator by its largest absolute row sum. Provable for every ``n_iter`` and stride.

    Cost and memory grow fast: the support doubles each step and one step costs
    ``c^3 (2k-1)^2 k^2`` multiply-adds, so ``n_iter`` is capped at 6; 2-3 is practical
    for 512 channels (on an ``SVDConv`` it runs on the core, ``r`` channels).
    """
    n_iter = args.positive_int(n_iter, "n_iter")
    if n_iter > 6:
        raise ValueError(f"n_iter must be <= 6 for the spatial Gram bound (support doubles each step), got {n_iter}")
    spec = conv_spec(target, **geometry)
    bounds = []
    for kernel in _grouped_kernel(spec):  # (o, i, kh, kw)
        if kernel.shape[0] > kernel.shape[1]:
            kernel = kernel.transpose(0, 1)  # A^T A has the smaller channel count
        log_scale = kernel.new_zeros(())
        for _ in range(n_iter):
            norm = kernel.norm().clamp_min(torch.finfo(kernel.dtype).tiny)
            kernel = kernel / norm
            log_scale = 2 * (log_scale + norm.log())
            kh, kw = kernel.shape[-2:]
            kernel = F.conv2d(kernel, kernel, padding=(kh - 1, kw - 1))
        row_sum = kernel.abs().sum(dim=(1, 2, 3)).amax()
        scale = 2.0**-n_iter
        bounds.append((row_sum.log() * scale + log_scale * scale).exp())
    return torch.stack(bounds).amax()


# ----------------------------------------------------------- the layer's operator
def _padding_operator_norm(spec: ConvSpec, n: Tuple[int, int]) -> float:
    """Spectral norm of the padding map: sqrt of the largest number of copies of a pixel."""
    if spec.padding_mode == "zeros":
        return 1.0
    left, right, top, bottom = spec.reversed_padding
    counts = []
    for size, before, after in ((n[0], top, bottom), (n[1], left, right)):
        index = torch.arange(size, dtype=torch.float64).reshape(1, 1, size)
        padded = F.pad(index, (before, after), mode=spec.padding_mode).long().flatten()
        counts.append(int(torch.bincount(padded, minlength=size).max()))
    return math.sqrt(counts[0] * counts[1])


@full_precision
def operator_norm_bound(target: ConvLike, input_size: IntOrPair, **geometry) -> Tensor:
    """Provable upper bound on the norm of the layer's *actual* operator on an ``n1 x n2`` input.

    Uses the layer's own padding amount and mode:

    * circular mode whose total padding is at most the dilated kernel extent minus one:
      the operator is a crop of the circular convolution on ``n``, so its exact norm;
    * zero padding: the operator is a crop of the circular convolution on a grid of
      ``n + padding`` (rounded up to the stride), whose exact norm bounds it (``bounds.md``);
    * reflect / replicate (and other circular paddings): the padding map has norm
      ``sqrt(max copies of a pixel)`` and the rest is a valid conv on the padded grid.

    The result is the minimum of that value and the :func:`fantastic_four_bound` (times the
    padding map's norm). Exact whenever the layer is a size-preserving circular conv.
    """
    spec = conv_spec(target, **geometry)
    n = args.input_size_arg(input_size)
    kernel_size = tuple(spec.kernel.shape[2:])
    extent = args.dilated_extent(kernel_size, spec.dilation)
    left, right, top, bottom = spec.reversed_padding
    pads = (top + bottom, left + right)
    for axis in range(2):
        if n[axis] + pads[axis] < extent[axis]:
            raise ValueError(
                f"input_size {n} is too small for this layer: padded size {n[axis] + pads[axis]} < kernel "
                f"extent {extent[axis]} along axis {axis}"
            )
    size_preserving_circular = spec.padding_mode == "circular" and all(
        p <= e - 1 <= n_i - 1 for p, e, n_i in zip(pads, extent, n)
    )
    if size_preserving_circular:
        pad_norm, grid = 1.0, n
    else:
        pad_norm = _padding_operator_norm(spec, n)
        grid = tuple(n_i + p for n_i, p in zip(n, pads))
    # Round the grid up to the stride (a larger grid only embeds the operator further).
    grid = tuple(s * -(-g // s) for g, s in zip(grid, spec.stride))
    exact = conv_spectral_norm(spec.kernel, grid, stride=spec.stride, dilation=spec.dilation, groups=spec.groups)
    ff = fantastic_four_bound(spec.kernel, stride=spec.stride, dilation=spec.dilation, groups=spec.groups)
    return pad_norm * torch.minimum(exact, ff)


@full_precision
def power_iteration_estimate(
    target: ConvLike,
    input_size: IntOrPair,
    *,
    n_iter: int = 50,
    seed: int = 0,
    **geometry,
) -> Tensor:
    """Power iteration on the layer's actual operator: a *lower estimate*, never a bound.

    Iterates ``x <- A^T A x`` with ``A`` the layer's convolution (own stride, padding,
    dilation, padding mode, no bias) and ``A^T`` its adjoint from autograd (for zero
    padding, ``conv_transpose2d``); returns ``||A x||`` for the final unit ``x``, which
    approaches the spectral norm from below as ``n_iter`` grows. Not differentiable.
    """
    n_iter = args.positive_int(n_iter, "n_iter")
    spec = conv_spec(target, **geometry)
    n = args.input_size_arg(input_size)
    kernel = spec.kernel.detach().to(spectral_dtype(spec.kernel.dtype))

    def apply(x: Tensor) -> Tensor:
        return _functional.conv2d(x, kernel, None, spec.stride, spec.padding, spec.dilation, spec.groups,
                                  spec.padding_mode, spec.reversed_padding)

    generator = torch.Generator(device=kernel.device).manual_seed(seed)
    c_in = kernel.shape[1] * spec.groups
    x = torch.randn(1, c_in, *n, dtype=kernel.dtype, device=kernel.device, generator=generator)
    x = x / x.norm()
    for _ in range(n_iter):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = apply(x)
            # A^T (A x) as the vector-Jacobian product of the linear map at y = A x.
            (x,) = torch.autograd.grad(y, x, y.detach())
        x = x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)
    with torch.no_grad():
        return apply(x.detach()).norm()
