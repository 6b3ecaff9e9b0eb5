"""Spectral norms of convolution layers: exact values, provable upper bounds, estimates.

Every function takes a kernel ``(c_out, c_in/groups, *k)`` with 1, 2 or 3 spatial axes
(geometry as keywords), a torch conv (``nn.Conv{1,2,3}d``, ``nn.ConvTranspose{1,2,3}d``),
an SVD conv layer or a ``ConvSpec`` (``ttconv.geometry``), and returns a tensor. For a
layer, its stride, dilation, groups, padding amount and padding mode are used; for an SVD
layer the work is done on its small orthonormal core (``orthonormal_core``), which gives
the same value as the dense kernel for every method here except the spatial Gram bound (a
different, equally valid bound). Results are float64 for float64 parameters, float32
otherwise; every method divides the kernel by ``max |w|`` first, so no scale overflows.

=================================  ===========================================  ======================
function                           operator described                           kind
=================================  ===========================================  ======================
``exact_spectral_norm``            circular conv on ``n`` (divisible by stride)  exact
``fantastic_four_bound``           the layer's own operator, every ``n``         upper bound
``gram_iteration_bound``           circular conv on ``n`` (divisible by stride)  upper bound -> exact
``spatial_gram_bound``             the layer's own operator, every ``n``         upper bound
``operator_norm_bound``            the layer's own operator on ``n``             upper bound
``power_iteration_estimate``       the layer's own operator on ``n``             lower estimate
=================================  ===========================================  ======================

``n`` has one entry per spatial axis (an int means the same along every axis). A
transposed spec (``ConvTranspose``) is the adjoint of its conv (``ConvSpec.transposed``):
its singular values are the conv's, the circular methods describe the adjoint of the
circular conv on ``s n`` (the transposed layer's ``n`` inputs are that conv's outputs),
and the operator methods the layer's own operator on ``n`` (``docs/math.md``).

The circular methods accept an input smaller than the (dilated) kernel: the kernel then
folds modulo ``n`` (``ttconv.spectra.fold_kernel``). A 1x1 conv is one matrix at every
frequency: the exact norm and the Gram bound decompose that matrix once, and
``operator_norm_bound`` returns its exact norm ``||W||_2 sqrt(c)`` (``docs/math.md``).

"The layer's own operator" includes its padding mode and amount: size-independent bounds
carry ``padding_factor`` (1 for zero padding and for circular padding of at most the
dilated extent minus one per axis). Stride: the strided operator keeps a subset of the
stride-1 operator's rows, so stride-1 bounds hold for it. Dilation: size-independent bounds
run on the undilated kernel (a dilated conv is a direct sum of undilated ones). Groups:
the operator is block diagonal, its norm is the max over groups. ``docs/guarantees.md``
says how each claim is tested.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _conv_args as args
from . import _functional
from ._linalg import matrix_two_norm
from ._precision import full_precision
from .geometry import ConvLike, ConvSpec, conv_spec, size_arg
from .spectra import (
    DEFAULT_MAX_MEMORY,
    MemoryLimitError,
    SizeArg,
    check_spectral_input_size,
    conv_spectral_norm,
    dilate_kernel,
    fold_kernel,
    format_bytes,
    kernel_scale,
    polyphase_kernel,
    single_tap_matrices,
    spectral_dtype,
    transfer_batches,
)

__all__ = [
    "ConvSpec",
    "conv_spec",
    "exact_spectral_norm",
    "fantastic_four_reshape_bounds",
    "fantastic_four_bound",
    "fantastic_four_reshapes",
    "gram_iteration_bound",
    "spatial_gram_bound",
    "operator_norm_bound",
    "padding_factor",
    "power_iteration_estimate",
]

_CONV = (F.conv1d, F.conv2d, F.conv3d)
_CONV_TRANSPOSE = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _grouped_kernel(spec: ConvSpec, *, dilated: bool = True) -> Tuple[Tensor, Tensor]:
    """``(kernel / scale, scale)``: the kernel split by group, ``(groups, c_out/g, c_in/g, *k)``,
    in spectral dtype, normalised by ``max |w|`` (``kernel_scale``).

    ``dilated=False`` keeps the undilated taps: a conv with dilation ``d`` is a direct sum
    of undilated convs on the ``prod d`` interleaved sub-grids (zero padding: each is
    zero padded; circular: each sub-grid is a cycle, a circular conv of its own), so every
    bound of the undilated conv that holds at every input size bounds the dilated one.
    """
    kernel = spec.kernel.to(spectral_dtype(spec.kernel.dtype))
    scale = kernel_scale(kernel)
    kernel = kernel / scale
    if dilated:
        kernel = dilate_kernel(kernel, spec.dilation)
    return kernel.reshape(spec.groups, -1, *kernel.shape[1:]), scale


def _admissible_sizes(spec: ConvSpec, axis: int) -> range:
    """Input sizes along ``axis`` that matter for the worst case of the padding map.

    Sizes where the layer accepts the input (torch's padding modes need ``pad <= n``
    for circular, ``pad < n`` for reflect, and the padded input must hold the dilated
    kernel); beyond ``before + after + 2`` the copy pattern no longer changes.
    """
    before, after = spec.axis_padding[axis]
    extent = args.dilated_extent(spec.kernel_size, spec.dilation)[axis]
    smallest = max(1, extent - before - after)
    if spec.padding_mode == "circular":
        smallest = max(smallest, before, after)
    elif spec.padding_mode == "reflect":
        smallest = max(smallest, before + 1, after + 1)
    return range(smallest, max(smallest, before + after + 2) + 1)


def _copies(mode: str, before: int, after: int, n: int) -> int:
    """Largest number of times one input pixel appears in the row padded by ``F.pad(mode)``."""
    if before == after == 0:
        return 1
    index = torch.arange(n, dtype=torch.float64, device="cpu").reshape(1, 1, n)  # host bookkeeping
    padded = F.pad(index, (before, after), mode=mode)
    return int(torch.bincount(padded.long().flatten(), minlength=n).max())


def _circular_repeats(before: int, after: int, extent: int, stride: int, n: int, *, strided: bool) -> int:
    """How often one row of a circular conv on ``n`` is repeated in a circular-padded output.

    Output ``p`` of a circular-padded conv with stride ``s`` reads input
    ``(s p - before + j) mod n``: it is row ``s p - before (mod n)`` of the stride-1
    circular conv on ``n``, or, when ``s`` divides ``n`` (``strided=True``), row
    ``p mod n/s`` of the strided circular conv applied to the input shifted by ``before``
    (a permutation). With more padding than ``extent - 1`` the output is longer than the
    circular one and rows repeat; a matrix whose rows are rows of ``C``, each at most
    ``c`` times, has norm at most ``sqrt(c) ||C||``.
    """
    outputs = (n + before + after - extent) // stride + 1
    if strided:
        return -(-outputs // (n // stride))
    return -(-(stride * (outputs - 1) + 1) // n)  # positions 0, s, 2s, ... of the stride-1 rows


def padding_factor(spec: Union[ConvSpec, ConvLike], input_size: Optional[SizeArg] = None) -> float:
    """Factor by which a bound of the unpadded (full, zero-padded) convolution must grow to
    bound the layer with its own padding mode and amount.

    * zeros: 1 (the layer is a crop of the full convolution; also every transposed spec,
      the adjoint of such a crop);
    * circular: ``sqrt`` of the largest number of repeats of an output row (1 when the
      total padding per axis is at most the dilated extent minus one: the layer is then
      a row selection of the circular conv on ``n``);
    * reflect / replicate: ``sqrt`` of the largest number of copies of an input pixel
      (the norm of the padding map, which precedes a valid convolution).

    A product over the spatial axes. Without ``input_size`` (one size per axis) the worst
    case over every input size the layer accepts; with circular, reflect or replicate
    padding a size the layer refuses is refused (``ValueError``), as by the other bounds. ``spec``: a ``ConvSpec`` or anything
    ``conv_spec`` takes (a torch conv, an SVD layer).
    """
    if not isinstance(spec, ConvSpec):
        spec = conv_spec(spec)
    n = None if input_size is None else size_arg(input_size, spec.dims)
    factor = 1.0
    if spec.padding_mode == "zeros":  # (every transposed spec): 1 at every size
        return factor
    if n is not None:
        _check_operator_size(spec, n)
    extent = args.dilated_extent(spec.kernel_size, spec.dilation)
    for axis, (before, after) in enumerate(spec.axis_padding):
        sizes = _admissible_sizes(spec, axis) if n is None else (n[axis],)
        if spec.padding_mode == "circular":
            worst = max(_circular_repeats(before, after, extent[axis], spec.stride[axis], n, strided=False)
                        for n in sizes)
        else:
            worst = max(_copies(spec.padding_mode, before, after, n) for n in sizes)
        factor *= worst
    return math.sqrt(factor)


def _circular_grid(spec: ConvSpec, input_size: SizeArg) -> SizeArg:
    """The size the circular conv of ``spec`` acts on: ``n``, or ``s n`` for a transposed spec
    (whose ``n`` inputs are the outputs of the strided circular conv on ``s n``)."""
    if not spec.transposed:
        return input_size  # validated by the spectral routines
    n = size_arg(input_size, spec.dims)
    return tuple(n_a * s for n_a, s in zip(n, spec.stride))


# ----------------------------------------------------------------------------- exact
@full_precision
def exact_spectral_norm(target: ConvLike, input_size: SizeArg, **geometry) -> Tensor:
    """Exact spectral norm of the circular convolution on an input of size ``n`` (per axis).

    Sedghi et al. (ICLR 2019), polyphase for stride, a ``d``-D DFT for ``d`` spatial axes.
    Exact for circular padding; for zero padding at size ``n`` use
    ``operator_norm_bound``. For a transposed spec, the norm of the transposed circular
    conv on ``n`` inputs: the adjoint of the circular conv on ``s n`` (the same value).
    Differentiable. Cost ``O(prod(n) c_out c_in min(c_out, c_in))`` (``r^3`` for an SVD
    layer); one matrix norm (per group) when the polyphase kernel has a single tap, e.g.
    every 1x1 conv. An input smaller than the kernel uses the kernel folded modulo ``n``
    (``conv_spectral_norm``).
    """
    spec = conv_spec(target, **geometry)
    return conv_spectral_norm(spec.kernel, _circular_grid(spec, input_size), stride=spec.stride,
                              dilation=spec.dilation, groups=spec.groups)


# ------------------------------------------------------------------ fantastic four
def fantastic_four_reshapes(dims: int) -> Tuple[Tuple[int, ...], ...]:
    """The ``2^dims`` reshapes of ``fantastic_four_reshape_bounds``, in its order: for each, the spatial
    axes (0 = first) whose taps join the *rows* (with ``c_out``); the others join the columns.

    2-D: ``((0,), (1,), (), (0, 1))``, Singla & Feizi's R, S, T, U. Otherwise every subset,
    by size then lexicographically: 1-D ``((), (0,))``.
    """
    if dims == 2:
        return ((0,), (1,), (), (0, 1))
    return tuple(subset for size in range(dims + 1) for subset in itertools.combinations(range(dims), size))


def _reshape(kernel: Tensor, rows: Tuple[int, ...]) -> Tensor:
    """``(g, o, i, *k)`` -> ``(g, o * prod k[rows], i * prod k[others])``."""
    g, o, i, *k = kernel.shape
    others = tuple(a for a in range(len(k)) if a not in rows)
    order = (0, 1, *(3 + a for a in rows), 2, *(3 + a for a in others))
    return kernel.permute(order).reshape(g, o * math.prod(k[a] for a in rows), i * math.prod(k[a] for a in others))


def _exact_matrix_norm(matrix: Tensor, n_iter: int, state: Optional[Dict[str, Tensor]], key: str) -> Tensor:
    """Largest singular value of a batch of matrices ``(..., m, k)``, max over the batch."""
    return matrix_two_norm(matrix).amax()


def _power_matrix_norm(matrix: Tensor, n_iter: int, state: Optional[Dict[str, Tensor]], key: str) -> Tensor:
    """``n_iter`` power iterations towards ``_exact_matrix_norm``, from below.

    Persistent vectors (Miyato et al.; Singla & Feizi's code) in ``state[key]``: the
    vectors carry no gradient, sigma = u^T M v does.
    """
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


# ``fantastic_four_reshape_bounds``' methods: how each reshape's matrix norm is taken.
_MATRIX_NORMS: Dict[str, Callable[[Tensor, int, Optional[Dict[str, Tensor]], str], Tensor]] = {
    "exact": _exact_matrix_norm,
    "power": _power_matrix_norm,
}


@full_precision
def fantastic_four_reshape_bounds(
    target: ConvLike,
    *,
    method: str = "exact",
    n_iter: int = 10,
    state: Optional[Dict[str, Tensor]] = None,
    per_group: bool = False,
    **geometry,
) -> Tensor:
    """The reshape bounds of Singla & Feizi (ICLR 2021), ``sqrt(prod k) * ||M||_2`` per reshape,
    generalised to ``d`` spatial axes: ``2^d`` of them (four in 2-D).

    Reshapes (math.md section 3, ``fantastic_four_reshapes`` gives the order): for each
    subset ``A`` of the spatial axes, ``M_A`` has rows ``(c_out, k_a for a in A)`` and
    columns ``(c_in, k_a for a not in A)``. In 2-D ``R: (c_out*kh, c_in*kw)``,
    ``S: (c_out*kw, c_in*kh)``, ``T: (c_out, c_in*kh*kw)``, ``U: (c_out*kh*kw, c_in)``. They
    are taken of the *undilated* kernel (a dilated conv is a direct sum of undilated ones
    on interleaved sub-grids, so the undilated bound holds and is ``(d(k-1)+1)/k`` tighter
    per axis than the zero-inserted kernel's), each times ``padding_factor`` of the
    layer's padding.

    What each value bounds, with ``method='exact'``: the spectral norm of the layer's
    operator at every input size and stride, for zero padding of any amount (and every
    transposed conv, the adjoint of such an operator); for circular, reflect and
    replicate padding the worst case over input sizes of the padding's effect is included
    (factor 1 for circular padding of at most ``(extent - 1)`` per axis in total, i.e. up
    to ``'same'``). For a kernel, pass ``padding``/``padding_mode`` (default: zero
    padding).

    Parameters
    ----------
    method : {'exact', 'power'}
        ``'exact'``: ``torch.linalg.matrix_norm(., 2)``, each value a provable upper bound
        as above. ``'power'``: ``n_iter`` power iterations with vectors kept in ``state``
        between calls (cheap, for training); the values approach the bounds from below
        and are *not* bounds.
    state : dict, optional
        Holds the persistent power-iteration vectors (pass the same dict every call).
    per_group : bool
        Return ``(groups, 2^d)`` instead of the max over groups ``(2^d,)``.

    Returns
    -------
    Tensor
        ``(2^d,)`` (or ``(groups, 2^d)``), differentiable; ``(4,)`` for a 2-D conv.
    """
    matrix_norm = _MATRIX_NORMS[args.choice(method, "method", _MATRIX_NORMS)]
    n_iter = args.positive_int(n_iter, "n_iter")
    per_group = args.boolean(per_group, "per_group")
    spec = conv_spec(target, **geometry)
    k, scale = _grouped_kernel(spec, dilated=False)  # (g, o, i, *k)
    g = k.shape[0]
    taps = math.prod(spec.kernel_size)
    subsets = fantastic_four_reshapes(spec.dims)
    names = ("R", "S", "T", "U") if spec.dims == 2 else tuple(f"rows{subset}" for subset in subsets)
    reshapes = {name: _reshape(k, subset) for name, subset in zip(names, subsets)}
    factor = math.sqrt(taps) * padding_factor(spec) * scale
    if taps == 1 and method == "exact":  # every reshape is the (g, o, i) matrix
        norms = matrix_two_norm(k.reshape(k.shape[:3]))
        value = factor * (norms if per_group else norms.amax())
        return torch.stack([value] * len(subsets), dim=-1)
    values = []
    for name, matrix in reshapes.items():
        if per_group:
            norms = torch.stack([matrix_norm(matrix[j], n_iter, state, f"{name}{j}") for j in range(g)])
        else:
            norms = matrix_norm(matrix, n_iter, state, name)
        values.append(factor * norms)
    return torch.stack(values, dim=-1)


def fantastic_four_bound(target: ConvLike, **options) -> Tensor:
    """``max over groups of min over the reshapes`` of ``fantastic_four_reshape_bounds`` (0-D, differentiable).

    With ``method='exact'`` a provable upper bound on the layer's spectral norm at every
    input size and stride, for the padding described in ``fantastic_four_reshape_bounds``;
    the natural training regularizer. Typically 1.6-1.8x the exact value on random 3x3
    kernels (``bounds.md``).
    """
    options["per_group"] = True
    return fantastic_four_reshape_bounds(target, **options).amin(-1).amax()


# ------------------------------------------------------------------ Gram iteration
def _frobenius(matrices: Tensor) -> Tensor:
    """``torch.linalg.matrix_norm(matrices, ord="fro")``; complex matrices are reduced over their real
    view, which torch 2.13 does ~50x faster on the CPU (its complex norm takes a hypot per entry:
    10 ms against 0.2 ms for 1624 16 x 16 complex64 matrices, 5x the Gram product itself)."""
    if matrices.is_complex():
        # A lazily conjugated view (``.mH``) has the same magnitudes: drop the conjugation, no copy.
        real = torch.view_as_real(matrices.conj() if matrices.is_conj() else matrices)
        return torch.linalg.vector_norm(real, dim=(-3, -2, -1))
    return torch.linalg.matrix_norm(matrices, ord="fro")


def _gram_iterate(matrices: Tensor, n_iter: int) -> Tuple[Tensor, Tensor]:
    """Rescaled Gram iteration (Delattre et al. 2023) on a batch; returns ``(G_t, log_scale)``."""
    log_scale = torch.zeros(matrices.shape[:-2], dtype=matrices.real.dtype, device=matrices.device)
    for _ in range(n_iter):
        norm = _frobenius(matrices).clamp_min(torch.finfo(log_scale.dtype).tiny)
        matrices = matrices / norm[..., None, None]
        log_scale = 2 * (log_scale + norm.log())
        matrices = matrices.mH @ matrices
    return matrices, log_scale



@full_precision
def gram_iteration_bound(
    target: ConvLike,
    input_size: SizeArg,
    *,
    n_iter: int = 6,
    max_memory: int = DEFAULT_MAX_MEMORY,
    **geometry,
) -> Tensor:
    """Gram-iteration upper bound on the circular spectral norm (Delattre et al., ICML 2023).

    Iterates ``G <- G^H G`` with Frobenius rescaling on the frequency matrices (one of each
    conjugate pair ``{f, -f}``, whose norms are equal) of the (polyphase, for stride) kernel on the grid
    ``m = n / s``, a batch of frequencies at a time within ``max_memory`` bytes, and
    bounds each by its Frobenius norm: ``sigma <= ||G_t||_F^(2^-t)``. Bounds the same
    operator as ``exact_spectral_norm`` (the circular convolution on ``n``, divisible by
    the stride; for a transposed spec the adjoint of the one on ``s n``); provable for
    every ``n_iter``, decreasing in ``n_iter`` and converging to the exact value
    (measured worst ratio 1.0012 at t=3, ``bounds.md``). Only matmuls: on this
    project's CPU it is slower than the exact SVDs on multi-tap kernels (docs/performance.md);
    its use is GPU matmul throughput and a smooth gradient. Differentiable.

    Any ``n`` divisible by the stride: smaller than the kernel, the kernel folds modulo
    ``n`` (``conv_singular_values``). Fast path: when the folded polyphase kernel has a
    single tap (every 1x1 conv) all frequencies hold the same matrix, and the iteration
    runs once on it (per group) instead of on every frequency's copy: the same value.
    """
    n_iter = args.positive_int(n_iter, "n_iter")
    spec = conv_spec(target, **geometry)
    n = check_spectral_input_size(_circular_grid(spec, input_size), spec.kernel_size, spec.stride, spec.dilation,
                                  fold=True)
    kernel, scale = _grouped_kernel(spec)
    g = spec.groups
    grid = tuple(n_a // s_a for n_a, s_a in zip(n, spec.stride))
    kernel = fold_kernel(polyphase_kernel(kernel.flatten(0, 1), spec.stride), grid)
    kernel = kernel.reshape(g, -1, *kernel.shape[1:])
    single = single_tap_matrices(kernel)
    if single is not None:  # every frequency holds this matrix: one batch of g
        batches = iter([single])
    else:
        batches = (batch[-1] for batch in transfer_batches(kernel, grid, max_memory, per_frequency_factor=6))
    best = None
    for matrices in batches:
        if matrices.shape[-1] > matrices.shape[-2]:
            matrices = matrices.mH  # the Gram matrices are (smaller dim)^2
        gram, log_scale = _gram_iterate(matrices, n_iter)
        frobenius = _frobenius(gram)
        exponent = 2.0**-n_iter
        top = (frobenius.log() * exponent + log_scale * exponent).exp().amax()
        best = top if best is None else torch.maximum(best, top)
    assert best is not None  # at least one batch
    return best * scale


def _self_correlation(kernel: Tensor, max_memory: int) -> Tensor:
    """``conv{d}d(K, K, padding=k-1)``, the kernel of ``A A^T``, in row chunks within ``max_memory``."""
    o, i, *k = kernel.shape
    out_taps = math.prod(2 * k_a - 1 for k_a in k)
    element = kernel.element_size()
    output_bytes = o * o * out_taps * element
    if output_bytes > max_memory:
        raise MemoryLimitError(
            f"the spatial Gram kernel ({' x '.join(str(x) for x in (o, o, *(2 * k_a - 1 for k_a in k)))}) needs "
            f"{format_bytes(output_bytes)}, more than max_memory={format_bytes(max_memory)}; "
            "lower n_iter or raise max_memory"
        )
    # im2col of one row of the batch: i * prod(k) values per output tap.
    per_row = (i * math.prod(k) * out_taps + o * out_taps) * element
    chunk = max(1, (max_memory - output_bytes) // max(1, per_row))
    conv = _CONV[len(k) - 1]
    padding = tuple(k_a - 1 for k_a in k)
    parts = [conv(kernel[start:start + chunk], kernel, padding=padding) for start in range(0, o, chunk)]
    return torch.cat(parts)


@full_precision
def spatial_gram_bound(
    target: ConvLike, *, n_iter: int = 3, max_memory: int = DEFAULT_MAX_MEMORY, **geometry
) -> Tensor:
    """Spatial Gram-iteration bound on the layer's norm at every input size.

    Delattre et al. (2024): iterate on the kernel itself, ``K <- K * K^T`` (the kernel of
    ``A A^T``, support ``2k - 1`` per axis) with Frobenius rescaling, then bound the final
    Gram operator by its largest absolute row sum. It bounds the full (infinite-grid)
    convolution, hence every zero-padded crop of it at every size and stride, every
    circular conv and every transposed conv (an adjoint); for the layer's own padding it is
    multiplied by ``padding_factor`` (worst case over input sizes), exactly like
    ``fantastic_four_reshape_bounds``. Runs on the undilated kernel (a dilated conv is a
    direct sum of undilated ones). Provable for every ``n_iter``. 1-D, 2-D and 3-D.

    Cost and memory grow fast: the support doubles each step and one step costs
    ``c^3 prod((2k-1) k)`` multiply-adds, so ``n_iter`` is capped at 6; 2-3 is practical
    for 512 channels (on an SVD layer it runs on the core, ``r`` channels). Work is
    chunked to ``max_memory`` bytes; ``MemoryLimitError`` when even
    the Gram kernel does not fit.
    """
    n_iter = args.positive_int(n_iter, "n_iter", "the spatial Gram kernel's support doubles each step", maximum=6)
    spec = conv_spec(target, **geometry)
    kernels, scale = _grouped_kernel(spec, dilated=False)
    bounds = []
    for kernel in kernels:  # (o, i, *k)
        if kernel.shape[0] > kernel.shape[1]:
            kernel = kernel.transpose(0, 1)  # A^T A has the smaller channel count
        log_scale = kernel.new_zeros(())
        for _ in range(n_iter):
            norm = kernel.norm().clamp_min(torch.finfo(kernel.dtype).tiny)
            kernel = kernel / norm
            log_scale = 2 * (log_scale + norm.log())
            kernel = _self_correlation(kernel, max_memory)
        row_sum = kernel.abs().flatten(1).sum(dim=1).amax().clamp_min(torch.finfo(kernel.dtype).tiny)
        exponent = 2.0**-n_iter
        bounds.append((row_sum.log() * exponent + log_scale * exponent).exp())
    return torch.stack(bounds).amax() * padding_factor(spec) * scale


# ----------------------------------------------------------- the layer's operator
def _check_operator_size(spec: ConvSpec, n: Tuple[int, ...]) -> None:
    """Refuse input sizes the layer itself refuses (so no bound is given for no operator)."""
    extent = args.dilated_extent(spec.kernel_size, spec.dilation)
    for axis, (before, after) in enumerate(spec.axis_padding):
        if n[axis] + before + after < extent[axis]:
            raise ValueError(
                f"input_size {n} is too small for this layer: padded size {n[axis] + before + after} < kernel "
                f"extent {extent[axis]} along axis {axis}"
            )
        too_much = {"circular": max(before, after) > n[axis], "reflect": max(before, after) >= n[axis]}
        if too_much.get(spec.padding_mode, False):
            raise ValueError(
                f"input_size {n}: {spec.padding_mode} padding ({before}, {after}) along axis {axis} needs an "
                f"input of more than {max(before, after) - (spec.padding_mode == 'circular')} pixels "
                "(torch refuses this input too)"
            )


def _operator_size(spec: ConvSpec, input_size: SizeArg) -> Tuple[ConvSpec, Tuple[int, ...]]:
    """``(plain spec, size)`` whose operator bounds the layer's: the spec itself on ``n``, or for a
    transposed spec the conv it is the adjoint of on ``N = conv_input_size(n)`` (the layer's
    operator is the adjoint of that conv's first ``n`` output rows: same norm or smaller)."""
    n = size_arg(input_size, spec.dims)
    if not spec.transposed:
        _check_operator_size(spec, n)
        return spec, n
    return spec.adjoint(), spec.conv_input_size(n)


def _selected_copies(mode: str, before: int, after: int, n: int, stride: int) -> int:
    """Largest number of outputs of a strided 1x1 conv that read one input pixel along an axis.

    Output ``q`` reads position ``s q`` of the row padded by ``mode`` (zero padding: a
    zero, read by no input pixel); 0 when every output reads padding.
    """
    index = torch.arange(1, n + 1, dtype=torch.float64, device="cpu").reshape(1, 1, n)  # 0 marks a zero-padded pixel
    padded = F.pad(index, (before, after), mode="constant" if mode == "zeros" else mode)
    return int(torch.bincount(padded.flatten()[::stride].long(), minlength=n + 1)[1:].max())


def _is_one_by_one(spec: ConvSpec) -> bool:
    return all(k == 1 for k in spec.kernel_size)


def _one_by_one_norm(spec: ConvSpec, n: Tuple[int, ...]) -> Tensor:
    """Exact norm of a 1x1 layer's own operator on ``n`` (any padding mode and amount, stride).

    Output pixel ``p`` is ``W x[pixel read by p]`` (or 0 on zero padding): the operator is
    ``W`` kron ``S`` with ``S`` a 0/1 matrix having at most one 1 per row, so ``S^T S`` is
    diagonal with the number of outputs reading each input pixel, and
    ``||A|| = ||W||_2 sqrt(max count)``, the count being a product over the axes.
    """
    kernel, scale = _grouped_kernel(spec, dilated=False)
    copies = math.prod(_selected_copies(spec.padding_mode, before, after, n_i, s)
                       for (before, after), n_i, s in zip(spec.axis_padding, n, spec.stride))
    return matrix_two_norm(kernel.reshape(kernel.shape[:3])).amax() * (math.sqrt(copies) * scale)


@full_precision
def operator_norm_bound(
    target: ConvLike, input_size: SizeArg, *, max_memory: int = DEFAULT_MAX_MEMORY, **geometry
) -> Tensor:
    """Provable upper bound on the norm of the layer's *actual* operator on an input of size ``n``.

    Uses the layer's own padding amount and mode, stride and dilation (``n``: one size
    per spatial axis); the smaller of these valid bounds (the first holds in every mode, the second
    in circular mode only):

    * every mode: the padding map (norm ``sqrt(max copies of a pixel)``, 1 for zeros)
      followed by a valid strided conv on the padded grid ``N = n + padding``, which is a
      crop of the strided circular conv on ``N`` rounded up to the stride (no
      wrap-around reaches a kept output); its exact norm bounds it;
    * circular mode: output ``p`` is a row of the
      circular conv on ``n`` itself (strided along axes the stride divides, else stride
      1), repeated at most ``c`` times when the padding exceeds the extent minus one;
      ``sqrt(c)`` times that exact norm bounds it, and equals it for a size-preserving
      circular layer with ``n`` divisible by the stride.

    ``fantastic_four_bound`` times ``padding_factor`` at this size is valid too but never
    smaller, so it is not computed. Fantastic Four bounds the transfer matrix at every
    frequency, hence the strided circular norm on every grid (a strided conv keeps rows of
    the stride-1 one). For zeros, reflect and replicate the padded-grid candidate's factor
    is ``padding_factor``; in circular mode the first candidate's repeat count is
    ``padding_factor``'s (at a stride dividing ``n`` the strided count equals the stride-1
    one). ``tests/test_bounds_values.py`` checks this on a sweep of every mode.

    A transposed spec: the layer on ``n`` is the adjoint of its zero-padded conv on
    ``N = ConvSpec.conv_input_size(n)`` (first ``n`` outputs kept), bounded as above.

    An input smaller than the dilated kernel is fine wherever the layer accepts it: the
    circular candidate then uses the kernel folded modulo ``n``. A 1x1 kernel gets its
    exact norm from one matrix norm: the operator is ``W`` kron a 0/1 selection ``S``
    (each output reads one padded pixel) and ``||A|| = ||W||_2 sqrt(c)``, ``c`` the most
    outputs reading one input pixel (0 if all read zero padding).

    Raises ``ValueError`` for sizes the layer refuses. Differentiable almost everywhere.
    """
    spec, n = _operator_size(conv_spec(target, **geometry), input_size)
    if _is_one_by_one(spec):
        return _one_by_one_norm(spec, n)  # exact: nothing can be smaller
    extent = args.dilated_extent(spec.kernel_size, spec.dilation)
    axes = spec.axis_padding
    geometry = dict(dilation=spec.dilation, groups=spec.groups, max_memory=max_memory)
    candidates = []
    if spec.padding_mode == "circular":
        strided = [n_i % s == 0 for n_i, s in zip(n, spec.stride)]
        stride = tuple(s if ok else 1 for s, ok in zip(spec.stride, strided))
        repeats = [
            _circular_repeats(before, after, e, s, n_i, strided=ok)
            for (before, after), e, s, n_i, ok in zip(axes, extent, spec.stride, n, strided)
        ]
        circ = conv_spectral_norm(spec.kernel, n, stride=stride, **geometry)
        candidates.append(math.sqrt(math.prod(repeats)) * circ)
        if all(r == 1 for r in repeats) and stride == spec.stride:
            return candidates[0]  # exact or a crop of it: nothing below can be smaller
    pad_norm = math.sqrt(math.prod(_copies(spec.padding_mode, b, a, n_i) if spec.padding_mode != "zeros" else 1
                                   for (b, a), n_i in zip(axes, n)))
    grid = tuple(s * -(-(n_i + b + a) // s) for (b, a), n_i, s in zip(axes, n, spec.stride))
    candidates.append(pad_norm * conv_spectral_norm(spec.kernel, grid, stride=spec.stride, **geometry))
    return torch.stack(candidates).amin()


def _round_down(value: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` cast to ``dtype``, rounded toward zero (a lower estimate stays below)."""
    cast = value.to(dtype)
    if cast.to(value.dtype) > value:
        cast = torch.nextafter(cast, torch.zeros_like(cast))
    return cast



@full_precision
def power_iteration_estimate(
    target: ConvLike,
    input_size: SizeArg,
    *,
    n_iter: int = 50,
    seed: int = 0,
    **geometry,
) -> Tensor:
    """Power iteration on the layer's actual operator: a *lower estimate*, never a bound.

    Iterates ``x <- A^T A x`` with ``A`` the layer's convolution (own stride, padding,
    dilation, padding mode, no bias; for a transposed spec torch's transposed conv with
    its ``output_padding``) and ``A^T`` its adjoint from autograd; returns ``||A x||``
    for the final unit ``x``, which approaches the spectral norm from below as ``n_iter``
    grows. Runs on the kernel divided by ``max |w|`` (no overflow or underflow at any
    scale); the iterations at the kernel's precision (float32 or float64), the returned
    ``||A x||`` in float64, rounded down to the kernel's spectral dtype, so it never exceeds
    the true norm beyond float64 round-off. Not differentiable.
    """
    n_iter = args.positive_int(n_iter, "n_iter")
    spec = conv_spec(target, **geometry)
    n = size_arg(input_size, spec.dims)
    if spec.transposed:
        spec.conv_input_size(n)  # refuses sizes with an empty output
    else:
        _check_operator_size(spec, n)
    out_dtype = spectral_dtype(spec.kernel.dtype)
    kernel = spec.kernel.detach().to(torch.float64)
    scale = kernel_scale(kernel)
    kernel = kernel / scale
    # The iterations run at the kernel's own precision (a float32 conv is several times faster
    # than a float64 one on CPU); only the final ||A x|| is evaluated in float64. Whatever x the
    # iterations reach, ||A x|| / ||x|| is at most the norm, so the estimate stays below it.
    work = kernel.to(torch.float32 if out_dtype == torch.float32 else torch.float64)

    def apply(x: Tensor, weight: Tensor = kernel) -> Tensor:
        if spec.transposed:
            return _CONV_TRANSPOSE[spec.dims - 1](x, weight, None, spec.stride, spec.padding, spec.output_padding,
                                                  spec.groups, spec.dilation)
        return _functional.conv_nd(x, weight, None, spec.stride, spec.padding, spec.dilation, spec.groups,
                                   spec.padding_mode, spec.reversed_padding)

    generator = torch.Generator(device=kernel.device).manual_seed(seed)
    # A transposed spec's input has the conv's output channels (the kernel's first axis).
    c_in = kernel.shape[0] if spec.transposed else kernel.shape[1] * spec.groups
    x = torch.randn(1, c_in, *n, dtype=torch.float64, device=kernel.device, generator=generator).to(work.dtype)
    x = x / x.norm()
    for _ in range(n_iter):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = apply(x, work)
            # A^T (A x) as the vector-Jacobian product of the linear map at y = A x.
            (x,) = torch.autograd.grad(y, x, y.detach())
        norm = x.norm()
        if not norm > 0:  # A^T A x = 0: x is in the null space; ||A x|| = 0 is still a lower estimate
            break
        x = x / norm
    with torch.no_grad():
        x = x.to(torch.float64)
        x = x / x.norm().clamp_min(torch.finfo(torch.float64).tiny)  # a unit vector (or 0) in float64
        return _round_down(apply(x.detach()).norm() * scale, out_dtype)
