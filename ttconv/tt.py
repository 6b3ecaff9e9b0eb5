"""Tensor-train (TT) factor math for convolution kernels.

A kernel ``W: (c_out, c_in/groups, kh, kw)`` is stored per group ``g`` as

    W_g[o, i, h, w] = sum_{a, b} U_g[o, a] * S_g[a] * core_g[a, b, h, w] * V_g[i, b]

and the groups are stacked so that every factor has the layout of a (grouped)
convolution weight:

* ``U``: ``(c_out, r_out)``, rows of group ``g`` are ``U_g`` (the weight of the last
  1x1 grouped conv);
* ``S``: ``(groups * r_out,)``;
* ``core``: ``(groups * r_out, r_in, kh, kw)`` (the weight of the middle grouped conv);
* ``V``: ``(c_in, r_in)``, rows of group ``g`` are ``V_g``.

Ranks are per group. In *canonical form* every ``U_g`` and ``V_g`` has orthonormal
columns and the unfolding ``core_g.reshape(r_out, -1)`` has orthonormal rows, so
``S_g`` are exactly the singular values of the unfolding ``W_g.reshape(c_out/groups, -1)``
(see ``shared/reference/math.md``, section 1).

Everything here is pure tensor math with no ``nn.Module``: the layer builds on it.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._precision import full_precision
from ._conv_args import check_kernel, positive_int
from ._typing import RankSpec

__all__ = [
    "TTFactors",
    "Decomposition",
    "full_ranks",
    "resolve_ranks",
    "compose",
    "decompose",
    "canonicalize",
    "orthonormality_error",
    "orthonormal_core",
    "energy_rank",
]


class TTFactors(NamedTuple):
    """The four factors of a TT kernel, in the stacked-group layout of this module."""

    U: Tensor
    S: Tensor
    core: Tensor
    V: Tensor


class Decomposition(NamedTuple):
    """Result of :func:`decompose`.

    Attributes
    ----------
    factors : TTFactors
        Factors in canonical form.
    ranks : tuple of int
        ``(r_out, r_in)`` per group.
    relative_error : float
        ``||W - W_hat||_F / ||W||_F``, computed from the discarded singular values of
        the two unfoldings that were truncated (0.0 for a zero kernel).
    """

    factors: TTFactors
    ranks: Tuple[int, int]
    relative_error: float


# Factorisations run in float64: they are cheap next to a forward pass, and this keeps
# conversions exact to float32 round-off whatever the parameter dtype.
_WORK_DTYPE = torch.float64


def full_ranks(out_per_group: int, in_per_group: int, kernel_size: Tuple[int, int]) -> Tuple[int, int]:
    """Largest useful ``(r_out, r_in)``: the ranks of the two unfoldings of a generic kernel."""
    taps = kernel_size[0] * kernel_size[1]
    return min(out_per_group, in_per_group * taps), min(in_per_group, out_per_group * taps)


def resolve_ranks(
    rank: RankSpec, out_per_group: int, in_per_group: int, kernel_size: Tuple[int, int]
) -> Tuple[int, int]:
    """Validate a rank spec and clamp it to what the shape allows.

    Parameters
    ----------
    rank : None, int or (int, int)
        ``None`` for full rank, one int for both, or ``(r_out, r_in)``.
    out_per_group, in_per_group : int
        Channels per group.
    kernel_size : (int, int)

    Returns
    -------
    (r_out, r_in) with ``1 <= r_out <= min(c_out/g, r_in*kh*kw)`` and
    ``1 <= r_in <= min(c_in/g, r_out*kh*kw)``.
    """
    max_out, max_in = full_ranks(out_per_group, in_per_group, kernel_size)
    if rank is None:
        return max_out, max_in
    if isinstance(rank, (tuple, list)):
        if len(rank) != 2:
            raise ValueError(f"rank must be None, an int or a pair (r_out, r_in), got {rank!r}")
        r_out, r_in = (positive_int(r, "rank") for r in rank)
    else:
        try:
            r_out = r_in = positive_int(rank, "rank")
        except TypeError:
            raise TypeError(
                f"rank must be None, a positive int or a pair (r_out, r_in) of positive ints, got {rank!r}"
            ) from None
    taps = kernel_size[0] * kernel_size[1]
    r_out, r_in = min(r_out, max_out), min(r_in, max_in)
    # The core's unfoldings must be able to carry these ranks too.
    r_out = min(r_out, r_in * taps)
    r_in = min(r_in, r_out * taps)
    return r_out, r_in


def _grouped(t: Tensor, groups: int) -> Tensor:
    return t.reshape(groups, t.shape[0] // groups, *t.shape[1:])


def compose(U: Tensor, S: Tensor, core: Tensor, V: Tensor, groups: int = 1) -> Tensor:
    """Dense kernel ``(c_out, c_in/groups, kh, kw)`` from TT factors (differentiable)."""
    kh, kw = core.shape[-2:]
    scaled = (S[:, None, None, None] * core).reshape(groups, -1, core.shape[1], kh * kw)
    # Contract the small core with V first, then with U: cost ~ r*c*k^2*(r + c).
    with_v = torch.einsum("gabk,gib->gaik", scaled, _grouped(V, groups))
    weight = torch.einsum("goa,gaik->goik", _grouped(U, groups), with_v)
    return weight.reshape(U.shape[0], V.shape[0] // groups, kh, kw)


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest rank keeping ``energy`` of the squared norm, max over the groups (dim 0)."""
    power = singular_values.pow(2)
    total = power.sum(-1, keepdim=True).clamp_min(torch.finfo(power.dtype).tiny)
    kept = power.cumsum(-1) / total
    # Round-off can leave the last cumulative value a hair below 1.
    needed = (kept < energy - 1e-12).sum(-1) + 1
    return int(needed.clamp(max=power.shape[-1]).max())


@full_precision
def decompose(
    weight: Tensor,
    groups: int = 1,
    rank: RankSpec = None,
    energy: Optional[float] = None,
) -> Decomposition:
    """Canonical TT decomposition of a dense kernel, optionally truncated.

    Truncates the input-channel unfolding ``W_(2): (c_in, c_out*kh*kw)`` to ``r_in``
    (giving ``V``), projects, then truncates the output-channel unfolding of the
    projected kernel to ``r_out`` (giving ``U``, ``S``, ``core``). The two residuals are
    orthogonal, so the squared error is exactly the sum of the squared discarded
    singular values of the two unfoldings; each truncation is optimal for its unfolding.

    Parameters
    ----------
    weight : Tensor
        ``(c_out, c_in/groups, kh, kw)``, finite.
    groups : int
    rank : None, int or (r_out, r_in)
        Clamped to the shape (see :func:`resolve_ranks`). Exclusive with ``energy``.
    energy : float in (0, 1], optional
        Each truncation keeps the smallest rank whose singular values hold at least this
        fraction of the squared Frobenius norm of the matrix it truncates (the largest
        such rank over groups). The relative error is then at most ``sqrt(2 (1 - energy))``.

    Returns
    -------
    Decomposition
        Factors in canonical form, in ``weight``'s dtype and device.
    """
    groups = check_kernel(weight, groups)
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if rank is not None and energy is not None:
        raise ValueError("pass either rank or energy, not both")
    if energy is not None and not (isinstance(energy, (float, int)) and 0.0 < float(energy) <= 1.0):
        raise ValueError(f"energy must be a float in (0, 1], got {energy!r}")
    c_out, in_per_group, kh, kw = weight.shape
    out_per_group = c_out // groups
    r_out, r_in = resolve_ranks(rank, out_per_group, in_per_group, (kh, kw))

    w = _grouped(weight.detach().to(_WORK_DTYPE), groups)  # (g, o, i, kh, kw)
    norm_sq = float(w.pow(2).sum())

    # Input-channel unfolding (g, i, o*kh*kw) -> V.
    unfold_in = w.permute(0, 2, 1, 3, 4).reshape(groups, in_per_group, -1)
    left, sv_in, _ = torch.linalg.svd(unfold_in, full_matrices=False)
    if energy is not None:
        r_in = min(r_in, energy_rank(sv_in, float(energy)))
    V = left[..., :r_in]
    projected = torch.einsum("goihw,gib->gobhw", w, V)

    # Output-channel unfolding of the projected kernel (g, o, r_in*kh*kw) -> U, S, core.
    unfold_out = projected.reshape(groups, out_per_group, -1)
    P, sv_out, Qh = torch.linalg.svd(unfold_out, full_matrices=False)
    if energy is not None:
        r_out = min(r_out, energy_rank(sv_out, float(energy)))
    r_out = min(r_out, r_in * kh * kw)

    discarded = float(sv_in[..., r_in:].pow(2).sum() + sv_out[..., r_out:].pow(2).sum())
    relative_error = math.sqrt(discarded / norm_sq) if norm_sq > 0 else 0.0

    core = Qh[:, :r_out].reshape(groups, r_out, r_in, kh * kw)
    if r_in > r_out * kh * kw:
        # An energy-chosen r_out can leave more input directions than the core can use
        # (1x1 kernels): compress V onto the core's input span. Exact, and the core's rows
        # stay orthonormal because they lie in that span.
        r_in = r_out * kh * kw
        span, _, _ = torch.linalg.svd(core.transpose(1, 2).reshape(groups, core.shape[2], -1), full_matrices=False)
        span = span[..., :r_in]
        core = torch.einsum("gabk,gbc->gack", core, span)
        V = V @ span

    out = dict(dtype=weight.dtype, device=weight.device)
    factors = TTFactors(
        U=P[..., :r_out].reshape(c_out, r_out).to(**out),
        S=sv_out[..., :r_out].reshape(groups * r_out).to(**out),
        core=core.reshape(groups * r_out, r_in, kh, kw).to(**out),
        V=V.reshape(groups * in_per_group, r_in).to(**out),
    )
    return Decomposition(factors, (r_out, r_in), relative_error)


def _qr_absorb(U: Tensor, S: Tensor, core: Tensor, V: Tensor, groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(Q_U, Q_V, R_U diag(S) core R_V^T)`` per group, with ``U = Q_U R_U``, ``V = Q_V R_V``.

    The absorbed core is grouped and flattened: ``(groups, r_out, r_in, kh*kw)``.
    """
    q_u, r_u = torch.linalg.qr(_grouped(U, groups))
    q_v, r_v = torch.linalg.qr(_grouped(V, groups))
    scaled = _grouped(S[:, None, None, None] * core, groups).flatten(3)
    return q_u, q_v, torch.einsum("gac,gcbk,gdb->gadk", r_u, scaled, r_v)


@full_precision
def canonicalize(U: Tensor, S: Tensor, core: Tensor, V: Tensor, groups: int = 1) -> TTFactors:
    """Canonical form of the same kernel: orthonormal ``U``, ``V``, core rows; ``S`` sorted.

    QR of ``U`` and ``V`` with the triangular factors absorbed into the core (the TT
    orthogonalisation sweep), then an SVD of the core's unfolding. The composed kernel
    is unchanged up to round-off. Returns new tensors in the inputs' dtype.
    """
    dtype = U.dtype
    q_u, q_v, absorbed = _qr_absorb(*(t.detach().to(_WORK_DTYPE) for t in (U, S, core, V)), groups)
    P, sv, Qh = torch.linalg.svd(absorbed.reshape(groups, absorbed.shape[1], -1), full_matrices=False)
    return TTFactors(
        U=(q_u @ P).reshape(U.shape).to(dtype),
        S=sv.reshape(S.shape).to(dtype),
        core=Qh.reshape(core.shape).to(dtype),
        V=q_v.reshape(V.shape).to(dtype),
    )


def orthonormality_error(Q: Tensor, groups: int = 1) -> float:
    """``max_g ||Q_g^T Q_g - I||_max`` for a stacked factor ``Q: (groups * n, r)``."""
    q = _grouped(Q.detach().to(torch.float64), groups)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return float((q.transpose(-1, -2) @ q - eye).abs().max())


@full_precision
def orthonormal_core(U: Tensor, S: Tensor, core: Tensor, V: Tensor, groups: int = 1) -> Tensor:
    """The scaled core ``diag(S) core`` expressed in orthonormal bases of ``span(U)``, ``span(V)``.

    Returns ``R_U diag(S) core R_V^T`` (``U = Q_U R_U``, ``V = Q_V R_V``), a kernel
    ``(groups * r_out, r_in, kh, kw)`` whose convolution has the same nonzero singular
    values as the full layer (math.md theorem) even when ``U`` and ``V`` have drifted
    from orthonormality during training. Differentiable; cost ``O(c r^2 + r^3 k^2)``.
    """
    _, _, absorbed = _qr_absorb(U, S, core, V, groups)
    return absorbed.reshape(core.shape)
