"""Keeping singular values in check during training.

In-place operations for one layer of any kind: ``nn.Conv1d/2d/3d``,
``nn.ConvTranspose1d/2d/3d`` (with the dense ``d``-D FFT) and ``SVDConv1d/2d/3d``,
``SVDConvTranspose1d/2d/3d`` (on their small core), all under ``torch.no_grad`` and keeping
parameter identity so optimizer state stays attached:

* ``scale_to_spectral_norm_`` divides the kernel by ``sigma_max / max_singular_value`` when it
  exceeds ``max_singular_value``: exact.
* ``clip_singular_values_`` clips every per-frequency singular value of the layer's
  circular operator (Sedghi et al. 2019; for a strided layer the strided operator's own
  polyphase spectrum, as in Senderovich et al. 2022) and projects the result back to the
  kernel's support: *approximate*, the projection can push the norm back above the
  target (measured: up to 1.52x with ``n_iter=1`` on the 200 random layers of
  ``benchmarks/bench_control.py``); the norm actually reached is returned.
* ``canonicalize_()`` of an SVD layer restores orthonormal ``U``, ``V`` (function unchanged).

``SpectralControl`` applies them to a whole model every ``every`` optimizer steps and
provides differentiable regularizers. Its default ``mode='clip_scale'`` clips, then scales
by the exact norm reached, so every controlled norm ends at most the target. The spectral
norm controlled is that of the circular convolution at each layer's input size (learnt by
one hooked forward pass); for a strided layer whose input size is not divisible by the
stride, the stride-1 norm is used instead, an upper bound of the strided operator's norm
(see ``spectral_norm``). An input smaller than the kernel is controlled at its own size:
the operator is that of the kernel folded modulo the size (``ttconv.spectra.fold_kernel``).

A transposed layer is the adjoint of the convolution with the same weight viewed as a
conv kernel ``(in_channels, out_channels/groups, *k)`` (from the transposed layer's output
channels to its input channels). On ``n`` inputs, the circular transposed conv is the
adjoint of the strided circular conv on ``s n`` (the meaning ``SVDConvTranspose*d.singular_values``
and ``ttconv.bounds.exact_spectral_norm`` use too), so its singular values are that conv's,
and a clip rewrites the same weight tensor. ``s n`` is the layer's output size whenever
``dilation (k - 1) + output_padding + 1 - 2 p = s`` (every size-multiplying decoder layer:
k=4/s=2/p=1, k=3/s=2/p=1/output_padding=1, k=2/s=2/p=0, k=3/s=1/p=1); for other layers it is
still the circular analogue, and ``ttconv.bounds.operator_norm_bound`` bounds the layer's own
(zero-padded) operator.

Cost: a pass computes each exact norm once (before, and after a clip) and passes it on.
Those norms are certified rather than decomposed: per frequency one Gram product and one
Cholesky factorisation, and an SVD only for the few frequencies the certificate cannot
exclude. A clip decomposes one frequency of each conjugate pair only. A 1x1 layer (any kernel
whose polyphase form folds to a single tap) has one matrix at every frequency: its norm is
one matrix norm and its clip one SVD, exact.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _conv_args as args
from ._effective_kernel import TORCH_CONVS, _reparametrization_hooks
from ._hooks import run_example, unwrap
from ._precision import full_precision
from ._progress import ProgressArg, progress_for
from .bounds import fantastic_four_bound
from .layer import SVDConv, _SVDConvNd  # noqa: F401 (SVDConv: the doctest)
from .spectra import (
    DEFAULT_MAX_MEMORY,
    check_spectral_input_size,
    conv_spectral_norm,
    dilate_kernel,
    fold_kernel,
    kernel_scale,
    polyphase_kernel,
    self_conjugate,
    single_tap_matrices,
    spectral_dtype,
    transfer_batches,
)
from .tt import canonicalize, orthonormality_error

if TYPE_CHECKING:  # Python 3.10+; only read by the type checker (annotations are strings here)
    from typing import TypeGuard

__all__ = ["clip_singular_values_", "scale_to_spectral_norm_", "spectral_norm", "SpectralControl"]

ConvLayer = Union[nn.modules.conv._ConvNd, _SVDConvNd]
_KINDS = "an nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, SVDConv1d/2d/3d or SVDConvTranspose1d/2d/3d"


def _is_controllable(module: Any) -> bool:
    return isinstance(module, TORCH_CONVS + (_SVDConvNd,))


def _check_layer(layer: Any) -> None:
    if not _is_controllable(layer):
        raise TypeError(f"layer must be {_KINDS}, got {type(layer).__name__}")
    weight = getattr(layer, "weight", None) if isinstance(layer, TORCH_CONVS) else layer.S
    if isinstance(weight, Tensor) and not weight.is_floating_point():  # a complex one would be cast to real
        raise TypeError(f"layer must have a real floating-point weight, got {weight.dtype}")


def _check_writable(layer: Any, name: str = "layer") -> None:
    """``_check_layer``, and refuse a layer whose tensors a reparametrization recomputes: writing
    them would report a norm the next forward does not have."""
    _check_layer(layer)
    problem = _reparametrized(layer)
    if problem:
        raise ValueError(
            f"{name} is reparametrized ({problem}): its tensors are recomputed before every forward, so "
            "control would rewrite a value the next forward discards. Remove the reparametrization first "
            "(torch.nn.utils.parametrize.remove_parametrizations, nn.utils.remove_spectral_norm / "
            "remove_weight_norm), or convert the model (ttconv.convert folds it into the kernel)")


def _reparametrized(layer: nn.Module) -> str:
    """What recomputes a tensor of ``layer`` that control writes ('' when nothing does):
    ``torch.nn.utils.parametrize`` or a hook-based reparametrization (spectral_norm,
    weight_norm, pruning)."""
    if parametrize.is_parametrized(layer):
        return "torch.nn.utils.parametrize on " + ", ".join(cast(nn.ModuleDict, layer.parametrizations).keys())
    return ", ".join(type(hook).__name__ for _, hook in _reparametrization_hooks(layer))


def _dims(layer: ConvLayer) -> int:
    return len(layer.kernel_size)


def _is_transposed(layer: ConvLayer) -> bool:
    return bool(layer.transposed if isinstance(layer, nn.modules.conv._ConvNd) else layer._transposed)


def _operator_grid(layer: ConvLayer, input_size: Any, *, refuse_empty: bool = True) -> Tuple[int, ...]:
    """The grid of the circular conv whose norm is controlled, for a layer input of ``input_size``.

    A plain conv acts on its input grid. A transposed layer on ``n`` inputs is the adjoint of
    the strided circular conv with its weight on ``s n`` (the module docstring says when that
    is the layer's output size). ``refuse_empty``: refuse an ``n`` on which torch's layer
    has an empty output (a control step would change a layer for an input it cannot take);
    the read-only norm answers there, as ``layer.spectral_norm`` does.
    """
    d = _dims(layer)
    n = args.input_size_arg(input_size) if d == 2 else args.ntuple(input_size, "input_size", d)
    if not _is_transposed(layer):
        return n
    if refuse_empty:
        output = tuple((n_a - 1) * s - 2 * p + dil * (k - 1) + op + 1 for n_a, s, p, dil, k, op in
                       zip(n, layer.stride, layer.padding, layer.dilation, layer.kernel_size, layer.output_padding))
        if min(output) < 1:
            raise ValueError(f"input_size {n} gives the transposed layer an empty output {output}; "
                             "use a larger input_size (torch refuses this input too)")
    return tuple(n_a * s for n_a, s in zip(n, layer.stride))


def _check_max_singular_value(max_singular_value: Any) -> float:
    return args.positive_finite(max_singular_value, "max_singular_value")


def _kernel(layer: ConvLayer) -> Tensor:
    """The kernel whose circular operator has the layer's nonzero singular values."""
    return layer.orthonormal_core() if isinstance(layer, _SVDConvNd) else layer.weight.to(spectral_dtype(layer.weight.dtype))


def _effective_stride(layer: ConvLayer, n: Tuple[int, ...]) -> Tuple[int, ...]:
    # The strided operator needs n divisible by the stride; otherwise fall back to the
    # stride-1 operator, whose norm bounds the strided one.
    return tuple(layer.stride) if all(a % s == 0 for a, s in zip(n, layer.stride)) else (1,) * len(n)


@full_precision
def spectral_norm(layer: ConvLayer, input_size: Any) -> Tensor:
    """Exact circular spectral norm of a layer at ``input_size`` (differentiable, 0-D).

    The norm of the circular convolution on an ``n1 x n2`` input (``d`` sizes for a
    ``d``-D layer) with the layer's stride, dilation and groups: the same value as
    ``layer.spectral_norm`` (SVD layers), ``ttconv.bounds.exact_spectral_norm`` and
    ``ttconv.conv_spectral_norm``. A size not divisible by the stride has no strided
    circular operator and is refused (``ValueError``), as everywhere in ttconv; the control
    functions and ``SpectralControl`` control such a layer through the norm of its
    stride-1 circular convolution, an upper bound (every ``s``-th output of it is kept: a
    coordinate projection). For a transposed layer, the norm of the circular
    conv it is the adjoint of (its weight as a conv kernel) on ``s n`` (the circular transposed
    conv on ``n`` inputs; see the module docstring).

    Parameters
    ----------
    layer : nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d or an SVD conv layer of those kinds
    input_size : int or tuple of d ints
        Spatial input size of the layer ``(n1, n2)`` (``(n1,)``, ``(n1, n2, n3)`` in 1-D, 3-D).

    Returns
    -------
    Tensor
        0-D, float64 for float64 parameters and float32 otherwise, differentiable.
    """
    _check_layer(layer)
    n = _operator_grid(layer, input_size, refuse_empty=False)
    check_spectral_input_size(n, layer.kernel_size, layer.stride, layer.dilation, fold=True)  # stride divides n
    return _grid_norm(layer, n)


def _grid_norm(layer: ConvLayer, n: Tuple[int, ...]) -> Tensor:
    """``spectral_norm`` on the operator grid ``n`` (differentiable)."""
    if _is_orthogonal(layer):  # exactly max |S| for every stride and size: O(r)
        return layer.effective_S().to(spectral_dtype(layer.S.dtype)).abs().max()
    return conv_spectral_norm(_kernel(layer), n, stride=_effective_stride(layer, n), dilation=layer.dilation,
                              groups=layer.groups)


# ------------------------------------------------------------------ exact norm, certified
def _stride1(kernel: Tensor, stride: Tuple[int, ...], dilation: Tuple[int, ...], groups: int) -> Tensor:
    """Dilated kernel with its ``s1*s2`` phases as input channels, by group: ``(g, o, i s1 s2, t1, t2)``
    (``d`` tap axes and ``prod(s)`` phases for a ``d``-D kernel)."""
    stride1 = polyphase_kernel(dilate_kernel(kernel, dilation), stride)
    return stride1.reshape(groups, -1, *stride1.shape[1:])


def _norm(layer: ConvLayer, n: Tuple[int, ...]) -> float:
    """``float(_grid_norm(layer, n))`` (``n`` the operator grid), without gradients."""
    if _is_orthogonal(layer):
        return float(_grid_norm(layer, n))
    n = check_spectral_input_size(n, layer.kernel_size, (1,) * len(n), layer.dilation, fold=True)
    # Without gradients, conv_spectral_norm certifies most frequencies by one Gram product and
    # one Cholesky factorisation instead of an SVD each (spectra.certified_batch_max).
    with torch.no_grad():
        return float(conv_spectral_norm(_kernel(layer).detach(), n, stride=_effective_stride(layer, n),
                                        dilation=layer.dilation, groups=layer.groups))


@torch.no_grad()
@full_precision
def scale_to_spectral_norm_(layer: ConvLayer, max_singular_value: float, input_size: Any) -> float:
    """Divide the kernel by ``sigma_max / max_singular_value`` if ``sigma_max > max_singular_value`` (exact).

    ``sigma_max`` is ``spectral_norm`` at ``input_size``. For an SVD layer only ``S``
    is scaled (canonical form preserved). Parameters are updated in place; a layer within
    the target is left untouched. Every layer kind: for a transposed one the weight is
    scaled by the norm of the conv it is the adjoint of (see ``spectral_norm``).

    Parameters
    ----------
    layer : nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d or an SVD conv layer of those kinds
    max_singular_value : float
        Target norm, > 0.
    input_size : int or tuple of d ints
        The layer's spatial input size.

    Returns
    -------
    float
        The spectral norm afterwards, ``min(sigma_max, max_singular_value)`` up to rounding.
    """
    _check_writable(layer)
    max_singular_value = _check_max_singular_value(max_singular_value)
    return _scale_from(layer, _norm(layer, _operator_grid(layer, input_size)), max_singular_value)


def _scale_from(layer: ConvLayer, sigma: float, max_singular_value: float) -> float:
    """Scale a layer whose exact norm is ``sigma`` down to ``max_singular_value`` (no-op within it)."""
    if sigma <= max_singular_value:
        return sigma
    factor = max_singular_value / sigma
    if _is_orthogonal(layer):
        layer.set_singular_values_(layer.effective_S() * factor)
    else:
        (layer.S if isinstance(layer, _SVDConvNd) else layer.weight).mul_(factor)
    return sigma * factor


def _is_orthogonal(layer: ConvLayer) -> TypeGuard[_SVDConvNd]:
    return isinstance(layer, _SVDConvNd) and layer.core_kind == "orthogonal"


# ------------------------------------------------------------------ clipping
def _inverse_phases(frequencies: Sequence[Tensor], m: Tuple[int, ...], taps: Tuple[int, ...],
                    dtype: torch.dtype) -> Tensor:
    """``w_v exp(+2 pi i (u a / m1 + v b / m2)) / (m1 m2)`` for taps ``(a, b)``: ``(B, t1 t2)``.

    ``frequencies``: one index tensor per axis, ``(u, v)`` in 2-D (``d`` of them for ``d``
    axes: the sum in the exponent runs over every axis, the taps are the product grid).
    ``w`` is 2 for a frequency that stands for itself and its conjugate ``-f mod m`` (every
    one ``transfer_batches`` yields) and 1 for one that is its own conjugate
    (``self_conjugate``): the real part of the sum is the inverse DFT of the full
    Hermitian spectrum.
    """
    d = len(m)
    angle = None
    for axis, (f, m_a, t_a) in enumerate(zip(frequencies, m, taps)):
        shape = [1] * d
        shape[axis] = t_a
        tap = torch.arange(t_a, dtype=torch.float64, device=f.device).reshape(1, *shape)
        term = f.to(torch.float64).reshape(-1, *[1] * d) * tap / m_a
        angle = term if angle is None else angle + term
    assert angle is not None  # at least one axis
    angle = (2 * math.pi) * angle
    weight = torch.where(self_conjugate(frequencies, m), 1.0, 2.0).to(torch.float64) / math.prod(m)
    return torch.polar(weight.reshape(-1, *[1] * d).expand_as(angle), angle).reshape(len(angle), -1).to(dtype)


def _from_stride1(phases: Tensor, stride: Tuple[int, ...], dilation: Tuple[int, ...],
                  kernel_size: Tuple[int, ...]) -> Tensor:
    """Inverse of ``_stride1`` on the kernel's own taps: ``(c_out, c_in/g, *s, *t)`` phases and taps
    -> the ``(c_out, c_in/g, *kernel_size)`` kernel (tap ``s t + q`` of the dilated kernel, read at
    the dilated positions)."""
    c_out, c_in = phases.shape[:2]
    d = len(stride)
    taps = phases.shape[2 + d:]
    order = [axis for a in range(d) for axis in (2 + d + a, 2 + a)]  # (.., t1, s1, t2, s2, ..)
    spatial = phases.permute(0, 1, *order).reshape(c_out, c_in, *(t * s for t, s in zip(taps, stride)))
    support = spatial[(...,) + tuple(slice(None, dil * (k - 1) + 1, dil) for k, dil in zip(kernel_size, dilation))]
    return support


def _clip_kernel(kernel: Tensor, n: Tuple[int, ...], max_singular_value: float, stride: Tuple[int, ...],
                 dilation: Tuple[int, ...], groups: int) -> Tensor:
    """Sedghi clip of the circular conv with ``stride`` on ``n``, projected back to the kernel's taps.

    The stride-``s`` operator is the stride-1 operator of the polyphase kernel on the
    ``n / s`` grid (the ``s1*s2`` phases as extra input channels): its per-frequency
    matrices are clipped, the clipped kernel (full ``n / s`` support per phase) is read
    back at the polyphase taps and reassembled into the (dilated) kernel, and the
    kernel's own taps are kept. Only one frequency of each conjugate pair ``{f, -f}`` is
    decomposed (``transfer_batches``): clipping commutes with complex conjugation, so the
    clipped spectrum stays Hermitian and its inverse DFT real. The inverse DFT is evaluated at the taps only, a
    batch of frequencies at a time (memory bounded by ``DEFAULT_MAX_MEMORY``). Any number
    ``d`` of spatial axes (``kernel`` ``(c_out, c_in/g, *k)``).
    """
    scale = kernel_scale(kernel)
    limit = max_singular_value / float(scale)
    grouped = _stride1(kernel / scale, stride, dilation, groups)
    g, o, i, *t = grouped.shape
    m = tuple(n_a // s_a for n_a, s_a in zip(n, stride))
    if any(t_a > m_a for t_a, m_a in zip(t, m)) or all(t_a == 1 for t_a in t):
        return _clip_folded(kernel, grouped, m, limit, stride, dilation) * scale
    taps = None
    for *frequencies, matrices in transfer_batches(grouped, m, DEFAULT_MAX_MEMORY, per_frequency_factor=8):
        clipped = _clip_matrices(matrices, limit)
        term = (_inverse_phases(frequencies, m, tuple(t), clipped.dtype).T @ clipped.reshape(len(matrices), -1)).real
        taps = term if taps is None else taps + term
    assert taps is not None  # at least one batch of frequencies
    d = len(t)
    phases = taps.reshape(*t, g * o, -1, *stride)  # (*t, c_out, c_in/g, *s)
    phases = phases.permute(d, d + 1, *range(d + 2, 2 * d + 2), *range(d))  # (c_out, c_in/g, *s, *t)
    return _from_stride1(phases, stride, dilation, tuple(kernel.shape[2:])).reshape(kernel.shape) * scale


def _clip_matrices(matrices: Tensor, limit: float) -> Tensor:
    """Each matrix of a batch with its singular values clamped at ``limit``.

    LAPACK is 10-20% faster on the tall orientation; clipping commutes with transposition.
    """
    wide = matrices.shape[-2] < matrices.shape[-1]
    left, values, right = torch.linalg.svd(matrices.mT if wide else matrices, full_matrices=False)
    clipped = (left * values.clamp(max=limit).to(left.dtype).unsqueeze(-2)) @ right
    return clipped.mT if wide else clipped


def _clip_folded(kernel: Tensor, grouped: Tensor, m: Tuple[int, ...], limit: float, stride: Tuple[int, ...],
                 dilation: Tuple[int, ...]) -> Tensor:
    """Clip of the circular operator of a kernel folded modulo the grid ``m`` (normalised kernel in,
    normalised kernel out; any number of axes).

    On ``m < t`` taps several taps act alike (``spectra.fold_kernel``): the operator is that of
    the folded kernel ``F``, whose spectrum is clipped into ``F_c`` (full support on the ``m``
    grid, or a single tap). The kernel returned is the one nearest to ``kernel`` (Frobenius)
    whose folded kernel is ``F_c`` at every residue the kernel's taps reach: each tap moves by
    ``(F_c - F) / c`` at its residue, ``c`` the number of taps folding there. With a single
    tap (every 1x1 conv) the operator is ``kron(I, M)`` and the clip is exact: ``M``'s singular
    values are clamped. With no folding it is the usual projection onto the taps.
    """
    g, o, i, *t = grouped.shape
    d = len(t)
    folded = fold_kernel(grouped, m)
    f = folded.shape[3:]
    single = single_tap_matrices(folded)
    if single is not None:
        target = _clip_matrices(single, limit).reshape(g, o, i, *[1] * d)
    else:
        taps = None
        for *frequencies, matrices in transfer_batches(folded, m, DEFAULT_MAX_MEMORY, per_frequency_factor=8):
            clipped = _clip_matrices(matrices, limit)
            term = (_inverse_phases(frequencies, m, tuple(f), clipped.dtype).T
                    @ clipped.reshape(len(matrices), -1)).real
            taps = term if taps is None else taps + term
        assert taps is not None  # at least one batch of frequencies
        target = taps.reshape(*f, g, o, i).permute(d, d + 1, d + 2, *range(d))
    # Which taps of the stride-1 layout are the kernel's own (dilation and polyphase padding add zeros).
    support = _stride1(torch.ones_like(kernel), stride, dilation, grouped.shape[0]) != 0
    count = fold_kernel(support.to(grouped.dtype), m)
    step = torch.where(count > 0, (target - folded) / count.clamp_min(1), torch.zeros_like(folded))
    for axis, (t_a, f_a) in enumerate(zip(t, f)):  # each tap reads the change at its residue
        step = step.index_select(3 + axis, torch.arange(t_a, device=grouped.device) % f_a)
    updated = grouped + support * step
    phases = updated.reshape(g * o, -1, *stride, *t)  # (c_out, c_in/g, *s, *t)
    return _from_stride1(phases, stride, dilation, tuple(kernel.shape[2:])).reshape(kernel.shape)


def _bases_and_core(layer: _SVDConvNd) -> Tuple[Tensor, Tensor, Tensor]:
    """``(Q_U, kernel, Q_V)``: orthonormal bases of ``span(U)``, ``span(V)`` and the core
    ``R_U diag(S) core R_V^T`` in them, so that the layer's kernel is ``Q_U kernel Q_V^T``."""
    work = spectral_dtype(layer.U.dtype)
    g, r_out, r_in = layer.groups, layer.U.shape[1], layer.V.shape[1]
    q_u, r_u = torch.linalg.qr(layer.U.detach().to(work).reshape(g, -1, r_out))
    q_v, r_v = torch.linalg.qr(layer.V.detach().to(work).reshape(g, -1, r_in))
    core = layer.core.detach().to(work)
    core = layer.S.detach().to(work).reshape(-1, *[1] * (core.dim() - 1)) * core
    kernel = torch.einsum("gac,gcbk,gdb->gadk", r_u, core.reshape(g, r_out, r_in, -1), r_v).reshape(core.shape)
    return q_u.reshape(layer.U.shape), kernel, q_v.reshape(layer.V.shape)


def _clip(layer: ConvLayer, max_singular_value: float, n: Tuple[int, ...], n_iter: int) -> float:
    """Clip in place (validated arguments, ``n`` the operator grid); returns the exact norm reached."""
    if _is_orthogonal(layer):
        # S are the singular values: clipping them is exact and O(r).
        values = layer.effective_S()
        layer.set_singular_values_(values.sign() * values.abs().clamp(max=max_singular_value))
        return _norm(layer, n)
    stride = _effective_stride(layer, n)
    if isinstance(layer, _SVDConvNd):
        q_u, kernel, q_v = _bases_and_core(layer)
    else:
        kernel = layer.weight.detach().to(spectral_dtype(layer.weight.dtype))
    for _ in range(n_iter):
        kernel = _clip_kernel(kernel, n, max_singular_value, stride, layer.dilation, layer.groups)
    if isinstance(layer, _SVDConvNd):
        ones = torch.ones_like(layer.S, dtype=kernel.dtype)
        flat = kernel if kernel.dim() == 4 else kernel.reshape(*kernel.shape[:2], -1, 1)  # ttconv.tt's layout
        layer._copy_factors(canonicalize(q_u, ones, flat, q_v, layer.groups))
    else:
        layer.weight.copy_(kernel)
    return _norm(layer, n)


@torch.no_grad()
@full_precision
def clip_singular_values_(layer: ConvLayer, max_singular_value: float, input_size: Any, *, n_iter: int = 1) -> float:
    """Clip the layer's singular values at ``max_singular_value`` (Sedghi et al. 2019); approximate.

    Per frequency of the layer's circular operator on ``input_size``, singular values
    above ``max_singular_value`` are clipped; the kernel with full support that results is read
    back at the layer's ``kh x kw`` taps (at the dilated positions for a dilated layer).
    For a strided layer the operator clipped is the strided one itself, through its
    polyphase decomposition (the ``s1*s2`` phases of the kernel as input channels of a
    stride-1 convolution on the ``n / s`` grid), as in Senderovich et al. (2022); when
    ``input_size`` is not divisible by the stride, the stride-1 operator is clipped
    instead (its norm bounds the strided one; this over-constrains the kernel). The
    projection back to the taps is *not* exact: the norm can end above ``max_singular_value``.
    Measured on the 200 random layers of ``benchmarks/bench_control.py`` (targets 0.1 to
    0.9 times each layer's norm): up to 1.52x the target with ``n_iter=1``, up to 1.04x
    with ``n_iter=10``; a measurement, not a bound. Repeating clip and projection
    converges slowly towards the target; follow with ``scale_to_spectral_norm_`` (or use
    ``SpectralControl``'s default ``mode='clip_scale'``) for a guarantee. An SVD layer
    is clipped on its ``r_out x r_in`` core expressed in orthonormal bases of ``span(U)``
    and ``span(V)``, and left in canonical form. With ``core_kind='orthogonal'`` the clip is
    exact and costs ``O(r)``: ``S`` are clamped.

    Every layer kind: 1-D and 3-D layers with the ``d``-D DFT (polyphase stride, dilation
    and folding along each axis); a transposed layer is clipped as the conv it is the
    adjoint of (its weight viewed as that conv's kernel, on ``s n``, see
    ``spectral_norm``): the same weight tensor is rewritten.

    Parameters
    ----------
    layer : nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d or an SVD conv layer of those kinds
    max_singular_value : float
        Target for every singular value, > 0.
    input_size : int or tuple of d ints
        The layer's spatial input size (for a transposed layer the operator grid is
        ``s n``). Any size (not divisible by the stride: the stride-1 operator is clipped). Smaller
        than the dilated kernel, the operator is that of the kernel folded modulo the size
        (``ttconv.spectra.fold_kernel``): its spectrum is clipped and each tap moves by its
        share of the change at its residue (the nearest kernel whose folded kernel is the
        clipped one).
    n_iter : int
        Clip-and-project rounds, >= 1.

    Returns
    -------
    float
        The exact spectral norm actually reached (as ``spectral_norm``). A layer whose norm is
        already at most ``max_singular_value`` is left untouched (bit for bit) and its norm returned.

    Notes
    -----
    Cost: one SVD per conjugate pair of frequencies ``{f, -f}`` of the ``(n1 / s1) x (n2 / s2)``
    grid (about half of them, in ``d``-D too) of ``c_out/g x (c_in/g) s1 s2`` matrices
    (``r_out x r_in s1 s2`` for an SVD layer)
    per round, and one exact norm afterwards, for which a Gram product and a Cholesky
    factorisation per frequency certify all but a few frequencies, which are decomposed.
    A 1x1 kernel (and any kernel whose polyphase form folds to one tap) has the same
    matrix at every frequency: the clip is one SVD of it, and exact (its singular values
    clamped), whatever the size.
    """
    _check_writable(layer)
    max_singular_value = _check_max_singular_value(max_singular_value)
    n_iter = args.positive_int(n_iter, "n_iter")
    grid = _operator_grid(layer, input_size)
    n = check_spectral_input_size(grid, layer.kernel_size, (1,) * len(grid), layer.dilation, fold=True)
    sigma = _norm(layer, n)
    if sigma <= max_singular_value:  # nothing to clip: the layer is left bit-for-bit as it is
        return sigma
    return _clip(layer, max_singular_value, n, n_iter)


def _record_operator_grids(model: nn.Module, layers: List[Tuple[str, ConvLayer]],
                           example_input: Any) -> Dict[str, List[Tuple[int, ...]]]:
    """The grids of each layer's controlled operator seen in one forward pass (eval mode, no grad):
    the input's spatial size, times the stride for a transposed layer. Run by ``_hooks.run_example``
    (training flags restored; ``ValueError`` naming ``example_input`` when the forward pass fails)."""
    grids: Dict[str, List[Tuple[int, ...]]] = {name: [] for name, _ in layers}
    handles = []
    for name, module in layers:
        def record(module: ConvLayer, inputs: Any, output: Tensor, name: str = name) -> None:
            d = _dims(module)
            grid = tuple(int(size) for size in inputs[0].shape[-d:])
            if _is_transposed(module):  # the adjoint of the strided circular conv on s n
                grid = tuple(n_a * s for n_a, s in zip(grid, module.stride))
            if grid not in grids[name]:
                grids[name].append(grid)

        handles.append(module.register_forward_hook(record))
    try:
        run_example(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return grids


# ------------------------------------------------------------------ modes and regularizers
# How SpectralControl brings a layer whose exact norm ``sigma`` exceeds ``limit`` down;
# each returns the exact norm reached.
def _scale_mode(layer: ConvLayer, sigma: float, limit: float, size: Tuple[int, ...], n_iter: int) -> float:
    return _scale_from(layer, sigma, limit)


def _clip_mode(layer: ConvLayer, sigma: float, limit: float, size: Tuple[int, ...], n_iter: int) -> float:
    return _clip(layer, limit, size, n_iter)


def _clip_scale_mode(layer: ConvLayer, sigma: float, limit: float, size: Tuple[int, ...], n_iter: int) -> float:
    return _scale_from(layer, _clip(layer, limit, size, n_iter), limit)


_MODES: Dict[str, Callable[[ConvLayer, float, float, Tuple[int, ...], int], float]] = {
    "clip_scale": _clip_scale_mode, "clip": _clip_mode, "scale": _scale_mode,
}
MODES = tuple(_MODES)  # the default first

# Differentiable per-layer estimates for SpectralControl.regularizer.
_REGULARIZERS: Dict[str, Callable[[ConvLayer, Tuple[int, ...]], Tensor]] = {
    "fantastic_four": lambda layer, size: fantastic_four_bound(layer),
    "exact": _grid_norm,
}


class SpectralControl:
    """Keep every conv's spectral norm at most ``max_singular_value`` during training.

    Every conv of the model is controlled: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``
    and the SVD layers of those kinds. Call ``step`` after each ``optimizer.step()``; every
    ``every`` calls it runs ``apply``: for each SVD layer whose ``U`` or ``V`` drifted from
    orthonormality by more than ``orthonormality_tol`` it calls ``canonicalize_()``; then
    every layer whose norm (``spectral_norm`` at its recorded size) exceeds ``max_singular_value`` is

    * ``mode='clip_scale'`` (default): clipped (``clip_singular_values_``, ``n_iter``
      rounds), then, if the norm reached is still above ``max_singular_value``, scaled by the exact
      norm reached (``scale_to_spectral_norm_``): guaranteed;
    * ``mode='clip'``: clipped only, as in Sedghi et al. (2019): approximate, the norm
      can stay above ``max_singular_value`` (measured up to 1.52x with ``n_iter=1``, see
      ``clip_singular_values_``);
    * ``mode='scale'``: scaled only (every singular value divided by the same factor):
      guaranteed.

    Layers within the target are left bit-for-bit untouched.

    **Guarantee** (modes ``'clip_scale'`` and ``'scale'``): after every ``apply``, every
    controlled layer's ``spectral_norm`` at its recorded size is at most
    ``max_singular_value``, up to floating-point rounding. That is the exact norm of the circular
    convolution with the layer's stride on the recorded size when the size is divisible
    by the stride; otherwise the stride-1 norm is kept below ``max_singular_value``, which bounds
    the strided operator's norm (circular convolution, then every ``s``-th output kept)
    from above. Tested against explicit operator matrices on random layers: relative
    ``1e-6`` for float64 layers and for float32 ones in the general form; ``1e-4`` for
    float32 ``core_kind='orthogonal'`` layers, whose norm ``max |S|`` is exact only up to the
    float32 orthogonality of their core. It is a statement about circular padding at one
    input size: a layer seen at several sizes in the example pass is controlled at the
    first, and zero padding at size ``n`` is bounded by the circular norm at
    ``n + padding`` (``docs/math.md``). For a transposed layer the recorded grid is ``s n``
    for its input size ``n`` in the example pass: the grid of the strided circular conv it is
    the adjoint of, which has the transposed layer's singular values (its output size,
    ``output_size=`` included, can differ: ``(n - 1) s - 2 p + d (k - 1) + output_padding + 1``).

    Parameters
    ----------
    model : nn.Module
        Holds conv layers of any of the kinds above (DDP/DataParallel looked through).
    max_singular_value : float
        Target spectral norm, > 0.
    every : int
        Control period in optimizer steps, >= 1.
    mode : {'clip_scale', 'clip', 'scale'}
        How a layer above the target is brought down (see above).
    example_input : Tensor or tuple
        One forward pass on it records every layer's input size (a size smaller than the
        layer's dilated kernel is controlled as it is: the kernel folds modulo the size).
    orthonormality_tol : float
        Drift of ``U``, ``V`` that triggers ``canonicalize_()`` in a control step, >= 0.
    n_iter : int
        Clip-and-project rounds per clip (modes ``'clip_scale'`` and ``'clip'``), >= 1.
    progress : bool or callable(done, total, name)
        ``True``: one line per layer on stderr in each control pass,
        ``[3/20] layer2.0.conv1  0.41 s  1.23 -> 1.00``; a callable is called after each
        layer. Off by default: a pass runs every ``every`` optimizer steps inside a training
        loop, where a line per layer and pass would flood the training log; turn it on to
        see where a slow pass spends its time.

    Attributes
    ----------
    layers : list of (name, layer, size)
        The controlled layers with the size of their controlled operator: the input size
        recorded in the example pass (times the stride for a transposed layer).
    skipped : list of str
        Conv layers the example pass did not reach (not controlled).

    Notes
    -----
    Under ``DistributedDataParallel`` every rank holds the same parameters after each
    optimizer step, so every rank runs the same deterministic computation and the
    parameters stay identical without any communication (see ``docs/training.md``).

    Examples
    --------
    >>> model = nn.Sequential(SVDConv(3, 8, 3, padding=1, rank=4), nn.ReLU(), SVDConv(8, 8, 3, padding=1))
    >>> control = SpectralControl(model, 1.0, every=1, example_input=torch.zeros(1, 3, 8, 8))
    >>> norms = control.step()
    >>> max(norms.values()) <= 1.0 + 1e-5
    True
    """

    def __init__(
        self,
        model: nn.Module,
        max_singular_value: float,
        *,
        every: int = 100,
        mode: str = "clip_scale",
        example_input: Any,
        orthonormality_tol: float = 1e-6,
        n_iter: int = 1,
        progress: ProgressArg = False,
    ) -> None:
        self.max_singular_value = _check_max_singular_value(max_singular_value)
        every = args.positive_int(every, "every", "control period in optimizer steps")
        mode = args.choice(mode, "mode", MODES, "'clip_scale', the default: clip, then scale, guaranteed; "
                           "'clip': Sedghi clip only, approximate; 'scale': guaranteed")
        orthonormality_tol = args.non_negative_finite(orthonormality_tol, "orthonormality_tol", "e.g. the default 1e-6")
        n_iter = args.positive_int(n_iter, "n_iter", "clip-and-project rounds per clip, e.g. the default 1")
        self.every: int = every
        self.mode: str = mode
        self.n_iter: int = int(n_iter)
        progress_for(progress, 0)  # validate now, not at the first pass
        self.progress: ProgressArg = progress
        self.orthonormality_tol: float = float(orthonormality_tol)
        layers = [(name, m) for name, m in unwrap(model).named_modules() if _is_controllable(m)]
        for name, layer in layers:
            _check_writable(layer, f"layer '{name}'")
        if not layers:
            raise ValueError(f"model ({type(model).__name__}) has no conv layers to control (nn.Conv1d/2d/3d, "
                             "nn.ConvTranspose1d/2d/3d or their SVD layers)")
        if example_input is None:
            raise ValueError("example_input is required: one forward pass learns each layer's input size")
        sizes = _record_operator_grids(model, layers, example_input)
        self.layers: List[Tuple[str, ConvLayer, Tuple[int, ...]]] = []
        self.skipped: List[str] = []
        for name, layer in layers:
            if sizes[name]:
                # Any recorded size: smaller than the (dilated) kernel, the circular operator
                # is that of the kernel folded modulo the size (ttconv.spectra.fold_kernel).
                self.layers.append((name, layer, sizes[name][0]))
            else:
                self.skipped.append(name)  # not reached by the example forward pass
        self.steps: int = 0

    def step(self) -> Optional[Dict[str, float]]:
        """Count one optimizer step; every ``every`` steps run ``apply`` and return its result."""
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.apply()

    @torch.no_grad()
    def apply(self) -> Dict[str, float]:
        """Run one control pass now.

        Returns
        -------
        dict
            Layer name -> its ``spectral_norm`` at the recorded size afterwards.
        """
        reached = {}
        reporter = progress_for(self.progress, len(self.layers))
        for name, layer, size in self.layers:
            if isinstance(layer, _SVDConvNd) and max(orthonormality_error(layer.U, layer.groups),
                                                  orthonormality_error(layer.V, layer.groups)) > self.orthonormality_tol:
                layer.canonicalize_()
            sigma = before = _norm(layer, size)  # exact; computed once, then passed on
            if sigma > self.max_singular_value:
                sigma = _MODES[self.mode](layer, sigma, self.max_singular_value, size, self.n_iter)
            if reporter is not None:
                reporter.step(name, f"{before:.4g} -> {sigma:.4g}" if sigma != before else f"{sigma:.4g}")
            reached[name] = sigma
        return reached

    def regularizer(self, method: str = "fantastic_four") -> Tensor:
        """Differentiable penalty: the sum over layers of the *squared* norm estimate.

        Parameters
        ----------
        method : {'fantastic_four', 'exact'}
            ``'fantastic_four'``: each layer's Fantastic Four minimum
            (``ttconv.bounds.fantastic_four_bound``, a bound valid for any padding and
            size; cheap); ``'exact'``: each layer's ``spectral_norm`` at its recorded
            size (on an SVD layer's small core).

        Returns
        -------
        Tensor
            0-D, ``sum_layers estimate**2``.
        """
        estimate = _REGULARIZERS[args.choice(method, "method", _REGULARIZERS)]
        terms = [estimate(layer, size) for _, layer, size in self.layers]
        return torch.stack([t.square() for t in terms]).sum()
