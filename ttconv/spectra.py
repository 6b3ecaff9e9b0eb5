"""Exact singular values of convolutions with circular padding (2-D; also 1-D and 3-D).

Sedghi, Gupta & Long, *The Singular Values of Convolutional Layers* (ICLR 2019): a
circular convolution on an ``n1 x n2`` grid is block-diagonalised by the 2-D DFT, so its
singular values are the union over frequencies of the singular values of the
``c_out x c_in`` matrices ``P(u, v)`` of the zero-padded kernel's DFT. A stride ``s`` is
handled by the polyphase decomposition (math.md section 2): the ``s*s`` phases of the
kernel become extra input channels of a stride-1 convolution on the ``n/s`` grid.

An input smaller than the (dilated) kernel is allowed: on ``n`` pixels tap ``j`` shifts
by ``j mod n``, so the kernel folds modulo the grid (taps on the same residue add up,
``fold_kernel``) and the folded kernel's DFT is the transfer function (math.md). When the
polyphase, folded kernel has a single tap (every 1x1 conv, any stride; a patch conv with
kernel = stride; any kernel on a 1-pixel grid) every frequency holds the same matrix and
one decomposition of it replaces the ``m1 m2`` frequency matrices.

These functions work on any dense kernel and are the baseline the TT layer is measured
against; ``ttconv.SVDConv`` calls them on its small core.

Spectra are computed in float64 for float64 kernels and in float32 otherwise, whatever
the autocast state.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._conv_args import check_kernel, dilated_extent, input_size_arg, pair
from ._linalg import kernel_scale, matrix_two_norm, tall
from ._precision import full_precision

SizeArg = Union[int, Sequence[int]]
"""An int (the same along every spatial axis) or one int per axis (``d`` of them)."""

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "MemoryLimitError",
    "conv_singular_values",
    "conv_spectral_norm",
    "check_spectral_input_size",
    "conjugate_representatives",
    "dilate_kernel",
    "fold_kernel",
    "kernel_scale",
    "polyphase_kernel",
    "self_conjugate",
    "single_tap_matrices",
    "spectral_dtype",
    "transfer_batches",
]


def spectral_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _axes_arg(value: Any, d: int, name: str) -> Tuple[int, ...]:
    """An int or a sequence of ``d`` positive ints (``pair`` and its messages for ``d = 2``)."""
    if d == 2:
        return input_size_arg(value, name) if name == "input_size" else pair(value, name)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        items = (int(value),) * d
    elif isinstance(value, (tuple, list)) and len(value) == d and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        items = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{name} must be an int or a tuple of {d} ints (one per spatial axis), got {value!r}")
    if min(items) < 1:
        raise ValueError(f"{name} must be >= 1 along every axis, got {value!r}")
    return items


def _check_weight(weight: Any, groups: int) -> int:
    """``check_kernel`` for 1, 2 or 3 spatial axes: ``(c_out, c_in/groups, *kernel_size)``."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor (c_out, c_in/groups, *kernel_size), got "
                        f"{type(weight).__name__}")
    if weight.dim() not in (3, 4, 5):
        shape = tuple(weight.shape)
        raise ValueError(f"weight must be a 3-D, 4-D or 5-D tensor (c_out, c_in/groups, *kernel_size) "
                         f"for a 1-D, 2-D or 3-D convolution, got {shape}")
    if not weight.is_floating_point():  # a complex kernel's imaginary part would be dropped in the casts
        raise TypeError(f"weight must be a real floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)}): a conv with no taps or channels has no "
                         "spectrum")
    if weight.dim() == 4:
        return check_kernel(weight, groups)
    return check_kernel(weight.reshape(*weight.shape[:2], -1, 1), groups)  # same checks, 2-D view


def check_spectral_input_size(
    input_size: SizeArg,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    *,
    fold: bool = False,
) -> Tuple[int, ...]:
    """Validate an input size for the circular spectrum; returns ``(n1, n2)`` (one size per
    axis of ``kernel_size``: ``(n1,)`` or ``(n1, n2, n3)`` for 1-D and 3-D kernels).

    The size must be divisible by the stride. With ``fold=False`` (the default, for
    callers that map a spectrum back onto the kernel's taps, which is not unique once
    taps fold) it must also be at least the dilated kernel extent; ``fold=True`` accepts
    any size: the circular operator on fewer pixels than the kernel spans is the one of
    the kernel folded modulo the size (``fold_kernel``), which ``conv_singular_values``
    and ``conv_spectral_norm`` compute.
    """
    n = _axes_arg(input_size, len(kernel_size), "input_size")
    for axis, (n_i, s_i, extent) in enumerate(zip(n, stride, dilated_extent(tuple(kernel_size), tuple(dilation)))):
        if n_i % s_i:
            raise ValueError(
                f"input_size {n} is not divisible by stride {stride} along axis {axis}: "
                "the strided circular operator is only defined for such sizes; "
                f"use a multiple of {s_i}"
            )
        if n_i < extent and not fold:
            raise ValueError(
                f"input_size {n} is smaller than the (dilated) kernel extent {extent} along axis "
                f"{axis}; use an input of at least {extent} pixels"
            )
    return n


def dilate_kernel(weight: Tensor, dilation: Sequence[int]) -> Tensor:
    """The zero-inserted kernel: tap ``j`` moved to ``d j`` along every spatial axis."""
    if all(d == 1 for d in dilation):
        return weight
    extent = dilated_extent(tuple(weight.shape[2:]), tuple(dilation))
    out = weight.new_zeros(*weight.shape[:2], *extent)
    out[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)] = weight
    return out


def polyphase_kernel(weight: Tensor, stride: Sequence[int]) -> Tensor:
    """Stride-``s`` kernel -> stride-1 kernel with the ``s1*s2`` phases as input channels
    (per spatial axis of ``weight``, ``len(stride)`` of them).

    ``y[p] = sum_j W[j] x[s p + j]``; writing ``j = s t + q`` gives
    ``y[p] = sum_{q, t} W[s t + q] x_q[p + t]`` with ``x_q[m] = x[s m + q]``.
    """
    if all(s == 1 for s in stride):
        return weight
    c_out, c_in, *k = weight.shape
    d = len(k)
    t = [-(-k_a // s_a) for k_a, s_a in zip(k, stride)]
    pad = [x for t_a, s_a, k_a in zip(t, stride, k) for x in (t_a * s_a - k_a, 0)][::-1]  # F.pad: last axis first
    padded = torch.nn.functional.pad(weight, pad)
    order = [*range(3, 2 + 2 * d, 2), *range(2, 2 + 2 * d, 2)]  # (.., t1, s1, ..) -> (.., s1, s2, .., t1, t2, ..)
    phases = padded.reshape(c_out, c_in, *(size for pair_ in zip(t, stride) for size in pair_)).permute(0, 1, *order)
    return phases.reshape(c_out, c_in * math.prod(stride), *t)


def fold_kernel(kernel: Tensor, m: Sequence[int]) -> Tensor:
    """Fold the last ``len(m)`` (tap) axes modulo ``m``: ``(..., t1, t2)`` -> ``(..., min(t1, m1), min(t2, m2))``.

    On a circular grid of ``m`` pixels tap ``t`` shifts by ``t mod m``, so taps on the
    same residue add up into one: the folded kernel has the same circular operator on
    ``m`` (and the same DFT at the ``m`` frequencies). Axes with ``t <= m`` are kept as
    they are.
    """
    for axis, m_i in zip(range(-len(m), 0), m):
        taps = kernel.shape[axis]
        if taps > m_i:
            cycles = -(-taps // m_i)
            pad = [0, 0] * (-axis - 1) + [0, cycles * m_i - taps]
            padded = torch.nn.functional.pad(kernel, pad)
            shape = kernel.shape[:axis] + (cycles, m_i) + kernel.shape[axis:][1:]
            kernel = padded.reshape(shape).sum(dim=axis - 1)
    return kernel


class MemoryLimitError(ValueError):
    """A spectral computation would need more memory than ``max_memory`` allows."""


def _memory_arg(max_memory: Any) -> int:
    if isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Integral):
        raise TypeError(f"max_memory must be a positive int (bytes, e.g. 1 << 30), got {max_memory!r}")
    if max_memory < 1:
        raise ValueError(f"max_memory must be a positive int (bytes), got {max_memory!r}")
    return int(max_memory)


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError  # pragma: no cover


def _phases(m: int, taps: int, frequencies: Tensor, dtype: torch.dtype) -> Tensor:
    """``exp(-2 pi i f t / m)`` for the given frequencies ``f`` and taps ``t = 0..taps-1``.

    The exponent is reduced to ``f t mod m`` in integers first, and quarter turns are exact
    (``1, -i, -1, i``): a self-conjugate frequency's matrix is then exactly real. The
    ~1e-16 imaginary parts ``polar`` leaves at ``-pi`` made complex64 LAPACK (cgesdd) return
    NaN or fail to converge on rank-deficient matrices (a rank-1 strided kernel: 64 of 200).
    """
    t = torch.arange(taps, device=frequencies.device)
    turns = (frequencies.long()[:, None] * t[None, :]) % m  # f t mod m, exact
    angle = (-2.0 * math.pi / m) * turns.to(torch.float64)
    real, imaginary = torch.cos(angle), torch.sin(angle)
    quarter = (4 * turns) % m == 0  # a quarter turn: cos and sin within 1e-16 of -1, 0 or 1, made exact
    real = torch.where(quarter, real.round(), real)
    imaginary = torch.where(quarter, imaginary.round(), imaginary)
    return torch.complex(real, imaginary).to(dtype)


def _stride1_kernel(weight: Tensor, stride: Sequence[int], dilation: Sequence[int], groups: int,
                    m: Sequence[int]) -> Tensor:
    """Dilated, polyphase kernel folded modulo the grid ``m = n / s``, split by group:
    ``(groups, c_out/g, c_in/g * s1 s2, t1, t2)`` with ``t <= m``.

    Folding after the polyphase split is the fold of the dilated kernel modulo ``n``:
    phase ``q`` tap ``t`` sits at ``s t + q``, and ``s (t mod m) + q = (s t + q) mod n``.
    """
    kernel = fold_kernel(polyphase_kernel(dilate_kernel(weight, dilation), stride), m)
    return kernel.reshape(groups, -1, *kernel.shape[1:])


def single_tap_matrices(kernel: Tensor) -> Optional[Tensor]:
    """``(g, o, i)`` real matrices of a stride-1 grouped kernel ``(g, o, i, t1, t2)`` (any
    number of tap axes) with one tap, else ``None``.

    Such a kernel's transfer function is the same matrix at every frequency (the phase of
    tap 0 is 1), so the circular operator is ``kron(I_{m1 m2}, M)`` up to a permutation:
    its singular values are those of ``M``, each ``m1 m2`` times.
    """
    return kernel.reshape(kernel.shape[:3]) if kernel.shape[3:].numel() == 1 else None


_CPU_BATCH_BYTES = 8 << 20
"""Most bytes of transfer matrices in one CPU batch (whatever ``max_memory`` allows): a batch
that stays in the last-level cache is decomposed faster. Measured at 1 thread on a 2-core EPYC
with a 32 MiB L3 (docs/performance.md, bounds section): the exact norm of ResNet-18's layers
up to 256 channels in 0.55-0.72x the time of one large batch, 0.85-1.04x at 512 channels,
where a few frequencies fill a batch anyway (a fresh 70 MB buffer alone takes ~55 ms to fault
in, and the Gram, power-iteration and Cholesky passes each stream it again). GPUs keep the
large batch: there every batch is a launch."""


def conjugate_representatives(m: Sequence[int], device: Optional[torch.device] = None) -> Tensor:
    """One frequency of each conjugate pair ``{f, -f mod m}`` of the grid ``m``, as row-major
    indices into the half space ``(*m[:-1], m[-1] // 2 + 1)`` (last axis halved), ascending.

    Every ``f`` with ``0 < f_d < m_d / 2`` on the last axis has its conjugate outside the
    half space. The columns ``f_d = 0`` and ``f_d = m_d / 2`` hold both members of their
    pairs: there the other axes' indices are those of one per pair of the grid ``m[:-1]``
    (the same construction, one axis down). About ``prod(m) / 2`` frequencies where the
    half space has ``prod(m[:-1]) (m_d // 2 + 1)``: ``m1 (m2 / 2 - 1) + 2 (m1 / 2 + 1)``
    instead of ``m1 (m2 / 2 + 1)`` on an even 2-D grid (130 of 144 at 16 x 16). Built
    from ``arange`` and arithmetic on ``device``: no host values, no data-dependent shapes.
    """
    *rest, last = (int(size) for size in m)
    half = last // 2 + 1
    rows = torch.arange(math.prod(rest), device=device)  # row-major over the other axes
    interior = (rows[:, None] * half + torch.arange(1, (last + 1) // 2, device=device)).flatten()
    if rest:  # one per pair of the other axes, as indices into their full grid
        paired = conjugate_representatives(rest, device)
        rest_half = rest[-1] // 2 + 1
        paired = paired // rest_half * rest[-1] + paired % rest_half
    else:
        paired = torch.zeros(1, dtype=torch.long, device=device)
    columns = [0] + ([last // 2] if last % 2 == 0 and last > 1 else [])
    return torch.cat([interior, *(paired * half + column for column in columns)]).sort().values


def _unravel(index: Tensor, m: Sequence[int]) -> List[Tensor]:
    """Row-major indices into the half space of the grid ``m`` as one frequency index per axis."""
    frequencies: List[Tensor] = []
    for size in reversed((*m[:-1], m[-1] // 2 + 1)):  # the last axis varies fastest
        frequencies.insert(0, index % size)
        index = index // size
    return frequencies


def self_conjugate(frequencies: Sequence[Tensor], m: Sequence[int]) -> Tensor:
    """Whether each frequency (one index tensor per axis) is its own conjugate, ``f = -f mod m``
    on every axis (every index 0 or ``m_a / 2``): it stands for itself alone, where every other
    representative ``transfer_batches`` yields stands for two frequencies."""
    own = torch.ones_like(frequencies[0], dtype=torch.bool)
    for f, m_a in zip(frequencies, m):
        own &= (f == 0) | (2 * f == m_a)
    return own


def transfer_batches(
    kernel: Tensor, m: Sequence[int], max_memory: int, *, per_frequency_factor: int = 4
) -> Iterator[Tuple[Tensor, ...]]:
    """The DFT of a stride-1 grouped kernel at one frequency of each conjugate pair, a batch
    of frequencies at a time.

    ``kernel``: ``(g, o, i, t1, t2)`` real. Yields ``(u, v, matrices)`` with ``matrices``
    ``(B, g, o, i)`` complex: ``P(u, v) = sum_{h, w} K[..., h, w] exp(-2 pi i (u h / m1 + v w / m2))``.
    A real kernel's ``P(-u, -v)`` (indices modulo ``m``) is the complex conjugate of
    ``P(u, v)``, with the same singular values, so only one frequency of each pair is
    yielded (``conjugate_representatives``): ``v`` in ``[0, m2 // 2]``, and on the
    columns ``v = 0`` and ``v = m2 / 2``, which hold both members of their pairs, the one
    with the smaller ``u`` (``self_conjugate`` says which stand for themselves alone). Any number of spatial axes: ``kernel`` ``(g, o, i, *t)`` with
    ``len(m) == len(t)`` yields one frequency index per axis, then the matrices (the last
    axis halved: ``(u,)`` for 1-D, ``(u, v, w)`` for 3-D). Taps beyond ``m`` need no folding first (the phases are
    periodic in the tap). A batch holds as many frequencies as fit ``max_memory`` with
    ``per_frequency_factor`` copies of one frequency's matrices (room for the
    decomposition that consumes them), and on the CPU at most ``_CPU_BATCH_BYTES`` of
    matrices (cache-sized; at least one frequency). The DFT at a batch is one matmul over the taps,
    so neither the full transfer tensor nor an FFT buffer is ever materialised.
    """
    g, o, i, *taps = kernel.shape
    if len(taps) != len(m):
        raise ValueError(f"kernel has {len(taps)} tap axes but the grid m={tuple(m)} has {len(m)}")
    representatives = conjugate_representatives(m, kernel.device)
    total = len(representatives)
    complex_dtype = torch.complex128 if kernel.dtype == torch.float64 else torch.complex64
    element = complex_dtype.itemsize  # (no tensor: one would land on the default device)
    per_frequency = (per_frequency_factor * g * o * i + math.prod(taps)) * element
    batch = max(1, min(total, max_memory // max(1, per_frequency)))
    if kernel.device.type == "cpu":
        batch = max(1, min(batch, _CPU_BATCH_BYTES // max(1, g * o * i * element)))
    if per_frequency > max_memory:
        raise MemoryLimitError(
            f"one frequency's {g} x {o} x {i} matrices need {format_bytes(per_frequency)}, more than "
            f"max_memory={format_bytes(max_memory)}; raise max_memory"
        )
    flat = kernel.to(complex_dtype).reshape(g * o * i, -1).T
    for start in range(0, len(representatives), batch):
        frequencies = _unravel(representatives[start:start + batch], m)
        phases = None  # (B, t1 t2 ...): the product of the per-axis phases
        for m_a, t_a, f_a in zip(m, taps, frequencies):
            axis = _phases(m_a, t_a, f_a, complex_dtype)
            phases = axis if phases is None else (phases[:, :, None] * axis[:, None, :]).reshape(len(f_a), -1)
        assert phases is not None  # at least one spatial axis
        values = phases @ flat
        yield (*frequencies, values.reshape(-1, g, o, i))


DEFAULT_MAX_MEMORY = 1 << 30
"""Default working-memory limit (bytes) of the frequency-batched spectral computations."""


def _prepare(
    weight: Tensor, input_size: SizeArg, stride: SizeArg, dilation: SizeArg, groups: int, max_memory: Any
) -> Tuple[Tensor, Tensor, Tuple[int, ...], int]:
    """Validate; return the normalised stride-1 grouped kernel, its scale, the grid ``n/s``
    and the memory limit."""
    groups = _check_weight(weight, groups)
    d = weight.dim() - 2
    stride, dilation = _axes_arg(stride, d, "stride"), _axes_arg(dilation, d, "dilation")
    n = check_spectral_input_size(input_size, tuple(weight.shape[2:]), stride, dilation, fold=True)
    max_memory = _memory_arg(max_memory)
    weight = weight.to(spectral_dtype(weight.dtype))
    scale = kernel_scale(weight)
    m = tuple(n_a // s_a for n_a, s_a in zip(n, stride))
    kernel = _stride1_kernel(weight / scale, stride, dilation, groups, m)
    return kernel, scale, m, max_memory


@full_precision
def conv_singular_values(
    weight: Tensor,
    input_size: SizeArg,
    *,
    stride: SizeArg = 1,
    dilation: SizeArg = 1,
    groups: int = 1,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> Tensor:
    """All singular values of a circular convolution, sorted in descending order.

    Parameters
    ----------
    weight : Tensor
        Kernel ``(c_out, c_in/groups, kh, kw)`` in ``nn.Conv2d`` layout; also
        ``(c_out, c_in/groups, k)`` (``nn.Conv1d``) and ``(c_out, c_in/groups, kd, kh, kw)``
        (``nn.Conv3d``): ``d = weight.dim() - 2`` spatial axes, ``d``-D DFT, polyphase
        stride and dilation per axis.
    input_size : int or (int, int)
        Spatial size ``(n1, n2)`` of the input (``d`` sizes, or an int for all), divisible
        by the stride. Any size: an input smaller than the dilated kernel extent gets the
        circular operator of the kernel folded modulo ``n`` (taps ``j`` and ``j + n`` act
        alike).
    stride, dilation, groups
        As in ``nn.Conv2d`` (an int or ``d`` ints).
    max_memory : int
        Working memory in bytes (default 1 GiB). Frequencies are processed in batches
        that fit; raises ``MemoryLimitError`` when the result itself does not fit
        (use ``conv_spectral_norm``, which needs only a running maximum).

    Returns
    -------
    Tensor
        1-D, length ``groups * m1 * m2 * min(c_out/groups, (c_in/groups) * s1 * s2)``
        (products over the ``d`` axes)
        with ``m = n / s``: every singular value of the operator
        ``x -> circular_conv(x)`` from ``c_in x n1 x n2`` to ``c_out x m1 x m2``, with
        multiplicity. Float64 for float64 kernels, float32 otherwise. Differentiable.

    Notes
    -----
    Exact (Sedghi et al. 2019, polyphase for stride). The padding amount does not enter:
    with circular padding it only shifts the output. Cost
    ``O(n1 n2 c_out c_in min(c_out, c_in))``. Only one frequency of each conjugate pair
    ``{f, -f}`` is decomposed (about ``m1 m2 / 2`` of them): a real kernel's matrices at
    ``-f`` are the complex conjugates of those at ``f``.

    Fast path: when the polyphase kernel folded modulo ``m`` has a single tap (a 1x1
    kernel at any stride and dilation, a kernel equal to its stride, or ``m = (1, 1)``)
    the operator is ``kron(I_{m1 m2}, M)`` up to a permutation, with ``M`` the
    ``c_out x c_in s1 s2`` matrix (block-diagonal over groups): the result is the
    singular values of ``M``, each repeated ``m1 m2`` times, from one batched SVD,
    ``O(c_out c_in min(c_out, c_in))``.

    Examples
    --------
    >>> w = torch.zeros(1, 1, 3, 3); w[0, 0, 1, 1] = 2.0   # 2 * identity
    >>> conv_singular_values(w, (4, 4)).unique()
    tensor([2.])
    """
    kernel, scale, m, max_memory = _prepare(weight, input_size, stride, dilation, groups, max_memory)
    g, o, i = kernel.shape[:3]
    count = g * math.prod(m) * min(o, i)
    # The values decomposed, their conjugates' copy, the sorted copy and the sort's int64 indices.
    needed = count * (3 * kernel.element_size() + 8)
    if needed > max_memory:
        raise MemoryLimitError(
            f"all {count} singular values need about {format_bytes(needed)}, more than "
            f"max_memory={format_bytes(max_memory)}; use conv_spectral_norm (a running maximum) "
            "or raise max_memory"
        )
    single = single_tap_matrices(kernel)
    if single is not None:  # every frequency holds this matrix: decompose it once
        values = torch.linalg.svdvals(tall(single))  # (g, min(o, i))
        return values.flatten().repeat(math.prod(m)).sort(descending=True).values * scale
    values, twice = [], []
    for *frequencies, matrices in transfer_batches(kernel, m, max_memory):
        values.append(torch.linalg.svdvals(matrices).flatten(1))
        twice.append(~self_conjugate(frequencies, m))
    # The conjugate of every frequency but those equal to their own has the same singular values:
    # count them twice (a known output size: no host read).
    counts = 1 + torch.cat(twice).long()
    spectrum = torch.cat(values).repeat_interleave(counts, dim=0, output_size=math.prod(m))
    return spectrum.flatten().sort(descending=True).values * scale


# ------------------------------------------------------------------ certified maximum
# Relative margin on sigma^2 below which a frequency counts as certified under the best
# value found: far above the rounding of a Gram matrix and its Cholesky factorisation
# (~sqrt(size) * eps in practice), far below any gap that matters.
_MARGIN = {torch.float32: 1e-3, torch.float64: 1e-9}
_POWER_STEPS = 2


def largest_singular_values(matrices: Tensor) -> Tensor:
    """``torch.linalg.svdvals(matrices)[..., 0]``, decomposed in float64 (complex128), returned in
    the matrices' real dtype.

    For the values that certify something (a norm a layer is scaled by, a report's exact
    column): float32 SVD backends differ in accuracy (cuSOLVER's float32 SVD was measured
    8e-6 relative off on a 128 x 576 matrix, where LAPACK's is ~1e-7), so the decomposition
    runs in float64 and only the matrices' own float32 rounding remains.
    """
    wide = torch.complex128 if matrices.is_complex() else torch.float64
    real = matrices.real.dtype if matrices.is_complex() else matrices.dtype
    if not matrices.is_complex():  # real matrices (single-tap kernels'): the faster orientation
        matrices = tall(matrices)
    if matrices.dtype == wide or matrices.dim() < 3:
        return torch.linalg.svdvals(matrices.to(wide))[..., 0].to(real)
    # In quarters of the batch: the widened copy stays within half the batch's own memory,
    # so the spectra's max_memory budget (sized for the input dtype) still holds.
    flat = matrices.reshape(-1, *matrices.shape[-2:])
    chunk = max(1, -(-flat.shape[0] // 4))
    values = [torch.linalg.svdvals(part.to(wide))[..., 0].to(real) for part in flat.split(chunk)]
    return torch.cat(values).reshape(matrices.shape[:-2])


def certified_batch_max(matrices: Tensor, best: Optional[Tensor]) -> Tensor:
    """``max(best, largest singular value of any matrix in the batch)``, evaluated exactly.

    ``matrices``: ``(B, o, i)``. Every value returned is the largest singular value of one
    of the matrices (``largest_singular_values``: float64 SVD) or ``best``, and no matrix
    left out can exceed it. Rounds: the
    pending matrices a short power iteration on the smaller Gram ``G`` ranks highest
    (``B // 32`` of them, at least one) are decomposed, then every other pending matrix
    whose ``best^2 (1 - margin) I - G`` has a Cholesky factorisation is dropped: the
    factorisation certifies ``sigma_max^2 <= best^2 (1 - margin)`` up to rounding, far
    inside the margin. When a round does not raise ``best`` the rest are decomposed. A
    spread spectrum takes one round; a flat one (every frequency within a few percent of
    the top, as after a clip), where the power iteration ranks poorly, a few.
    """
    o, i = matrices.shape[-2:]
    gram = matrices @ matrices.mH if o <= i else matrices.mH @ matrices
    count, size = gram.shape[0], gram.shape[-1]
    # Power iteration from the column of the largest diagonal entry (nonzero for a nonzero matrix).
    diagonal = gram.diagonal(dim1=-2, dim2=-1).real
    x = torch.gather(gram, -1, diagonal.argmax(-1)[:, None, None].expand(-1, size, 1))
    tiny = torch.finfo(diagonal.dtype).tiny
    small = count * size * size <= 1 << 20  # a batched matvec's per-matrix overhead dominates: multiply-add
    for _ in range(_POWER_STEPS):
        x = x / torch.linalg.vector_norm(x, dim=-2, keepdim=True).clamp_min(tiny)
        y = (gram * x.mT).sum(-1, keepdim=True) if small else gram @ x
        rayleigh = (x.conj() * y).real.sum((-2, -1))  # x^H G x <= sigma_max^2 (x a unit vector or 0)
        x = y
    chunk = max(1, count // 32)
    pending = torch.ones(count, dtype=torch.bool, device=gram.device)
    if best is not None:
        pending &= diagonal.amax(-1) > 0  # all-zero matrices cannot exceed best >= 0
    certified = False
    while bool(pending.any()):
        ranked = torch.where(pending, rayleigh, rayleigh.new_tensor(-1.0))
        if best is not None and not certified:  # before a certificate: only those that beat best for sure
            ranked = torch.where(rayleigh > best * best, ranked, rayleigh.new_tensor(-1.0))
        chosen = ranked.argsort(descending=True)[:chunk]
        chosen = chosen[ranked[chosen] >= 0]
        improved = best is None or not certified
        if len(chosen):
            value = largest_singular_values(matrices[chosen]).max()
            pending[chosen] = False
            improved = improved or best is None or bool(value > best)
            best = value if best is None else torch.maximum(best, value)
        if not bool(pending.any()):
            break
        if best is None:  # no Rayleigh quotient ranked (all rounded below 0): decompose the rest
            best = largest_singular_values(matrices[pending]).max()
            break
        if not improved or not bool(best > 0):  # the same certificate again would drop nothing
            best = torch.maximum(best, largest_singular_values(matrices[pending]).max())
            break
        shift = best * best * (1 - _MARGIN[diagonal.dtype])
        where = pending.nonzero().flatten()
        shifted = gram[where].neg_()
        shifted.diagonal(dim1=-2, dim2=-1).add_(shift)
        pending[where] = torch.linalg.cholesky_ex(shifted).info != 0
        certified = True
    if best is None:
        raise ValueError("certified_batch_max: matrices is an empty batch (B = 0) and best is None; "
                         "pass at least one matrix or a best value")
    return best



@full_precision
def conv_spectral_norm(
    weight: Tensor,
    input_size: SizeArg,
    *,
    stride: SizeArg = 1,
    dilation: SizeArg = 1,
    groups: int = 1,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> Tensor:
    """Largest singular value of a circular convolution (0-D tensor, differentiable).

    Same arguments and cost as ``conv_singular_values``, but memory is bounded by
    ``max_memory`` whatever the input size: frequencies are processed in batches and only
    a running maximum is kept (``MemoryLimitError`` when one frequency's matrices alone do
    not fit). A grouped convolution's norm is the
    maximum over its groups. A single-tap polyphase kernel (every 1x1 conv) costs one
    matrix norm per group (see ``conv_singular_values``, Notes). 1-D and 3-D kernels
    and inputs smaller than the kernel as in ``conv_singular_values``.

    Examples
    --------
    >>> w = torch.zeros(2, 2, 1, 1); w[0, 0] = 3.0; w[1, 1] = -1.0
    >>> conv_spectral_norm(w, (5, 5))
    tensor(3.)
    """
    kernel, scale, m, max_memory = _prepare(weight, input_size, stride, dilation, groups, max_memory)
    single = single_tap_matrices(kernel)
    differentiable = torch.is_grad_enabled() and weight.requires_grad
    if single is not None:  # every frequency holds this matrix
        top = matrix_two_norm(single) if differentiable else largest_singular_values(single)
        return top.amax() * scale
    best = None
    for *_, matrices in transfer_batches(kernel, m, max_memory):
        if differentiable:  # an SVD per frequency: gradients flow through the largest
            top = torch.linalg.matrix_norm(matrices, ord=2).amax()
            best = top if best is None else torch.maximum(best, top)
        else:  # the same value, most frequencies certified by a Cholesky factorisation
            best = certified_batch_max(matrices.flatten(0, -3), best)
    assert best is not None  # at least one batch
    return best * scale
