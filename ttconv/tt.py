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
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._conv_args import check_kernel, positive_int
from ._linalg import kernel_scale
from ._precision import full_precision
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
    "factor_params",
    "random_factors",
]


class TTFactors(NamedTuple):
    """The four factors of a TT kernel, in the stacked-group layout of this module."""

    U: Tensor
    S: Tensor
    core: Tensor
    V: Tensor


class Decomposition(NamedTuple):
    """Result of ``decompose``.

    Attributes
    ----------
    factors : TTFactors
        Factors in canonical form.
    ranks : tuple of int
        ``(r_out, r_in)`` per group.
    relative_error : float
        ``||W - W_hat||_F / ||W||_F``, computed from the discarded singular values of
        the two unfoldings that were truncated (0.0 for a zero kernel). For float16 and
        bfloat16 factors, measured on the factors as rounded to that dtype (their
        rounding, ~1e-3 relative, is counted); float32's rounding (~1e-7) is not.
    """

    factors: TTFactors
    ranks: Tuple[int, int]
    relative_error: float


# Factorisations run in float64: they are cheap next to a forward pass, and this keeps
# conversions exact to float32 round-off whatever the parameter dtype.
_WORK_DTYPE = torch.float64

_HALF_DTYPES = (torch.float16, torch.bfloat16)
"""Factor dtypes whose rounding the reported error includes (float32's, ~1e-7 relative, it does not)."""


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
    g, r_in, taps = groups, core.shape[1], kh * kw
    r_out, out_g, in_g = core.shape[0] // g, U.shape[0] // g, V.shape[0] // g
    # Two batched matmuls, the core with V first, then with U (cost ~ r c k^2 (r + c)): a
    # fraction of einsum's dispatch on small kernels, where composing costs more than the
    # convolution it feeds (the dense forward path composes on every call).
    taps_last = core.reshape(g, r_out, r_in, taps).transpose(2, 3).reshape(g, r_out * taps, r_in)
    with_v = torch.matmul(taps_last, V.reshape(g, in_g, r_in).transpose(1, 2))  # (g, r_out taps, in_g)
    scaled_u = U.reshape(g, out_g, r_out) * S.reshape(g, 1, r_out)
    weight = torch.matmul(scaled_u, with_v.reshape(g, r_out, taps * in_g))  # (g, out_g, taps in_g)
    # Contiguous (torch's layout): a transposed view would make convs return channels-last
    # outputs, which code written for nn.Conv2d (``y.view(n, -1)``) does not expect. With one
    # tap ``weight`` is in that order already; the transpose's strides would survive
    # ``.contiguous()`` (a size-1 axis) and read as channels-last to torch's conv.
    if taps == 1:
        return weight.reshape(g * out_g, in_g, kh, kw)
    return weight.reshape(g * out_g, taps, in_g).transpose(1, 2).contiguous().reshape(g * out_g, in_g, kh, kw)


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest rank keeping ``energy`` of the squared norm, max over the groups (dim 0)."""
    power = singular_values.pow(2)
    total = power.sum(-1, keepdim=True).clamp_min(torch.finfo(power.dtype).tiny)
    kept = power.cumsum(-1) / total
    # Round-off can leave the last cumulative value a hair below 1.
    needed = (kept < energy - 1e-12).sum(-1) + 1
    return int(needed.clamp(max=power.shape[-1]).max())


# --------------------------------------------------------------------------- SVD by Gram
# Why a Gram route: LAPACK's SVD of a wide (c, c k^2) unfolding is slow on CPU (14 s for
# 512 x 4608 in float64 with 2 threads), while forming the c x c Gram matrix is one GEMM
# and its ``eigh`` takes a fraction of a second. The Gram squares the condition number,
# so it is used only where that provably costs no accuracy (see ``_rows_svd``); the
# ill-conditioned rest of the spectrum goes to an exact SVD of a smaller matrix.

_HEAD = 1e-2
"""Eigenvalues ``>= _HEAD * lambda_max`` form the *head*, taken straight from the Gram.

The computed Gram and its ``eigh`` are exact for a matrix within ``~4 eps lambda_max``
(measured 1-10 eps for 64-512 rows, 576-4608 columns), so a head row ``b_a`` of the
rotated matrix has ``|<b_a, b_c>| <~ 10 eps lambda_max`` and the normalised rows are
orthonormal to ``10 eps / _HEAD ~ 2e-13``, singular values exact to ``1e-14 sigma_max``."""

_LEAF_ROWS = 32
"""Matrices with at most this many rows go straight to LAPACK: a small SVD is cheap, and
batched tiny problems (depthwise and grouped convs) gain nothing from two GEMMs."""

_MAX_DEPTH = 4
"""Gram levels before the remaining block goes to LAPACK (each level peels off the part of
the spectrum within a factor ``sqrt(_HEAD) = 0.1`` of its top: 4 levels reach 1e-4)."""


def _leaf_svd(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Economy SVD of ``x: (g, m, n)``, ``m <= n``, by LAPACK on the tall orientation.

    This is the exact fallback of the Gram route. LAPACK is several times faster on the
    tall ``(n, m)`` matrix than on the wide one (1.7 s vs 14.1 s for 512 x 4608).
    """
    y, sv, zh = torch.linalg.svd(x.mT, full_matrices=False)
    return zh.mT, sv, y.mT


def _gram(x: Tensor) -> Tensor:
    """``x x^T`` for ``x: (g, m, n)``, exactly symmetric, in 3/4 of a GEMM's work.

    torch has no ``syrk``; with the rows split in two halves only the two diagonal blocks
    and one off-diagonal block are multiplied, the other is its transpose (measured
    20-25% faster than ``x @ x.mT`` for 512 x 4608 and 1024 x 2048).
    """
    m = x.shape[-2]
    if m < 256:
        return x @ x.mT
    half = m // 2
    top, bottom = x[..., :half, :], x[..., half:, :]
    gram = x.new_empty(*x.shape[:-2], m, m)
    gram[..., :half, :half] = top @ top.mT
    gram[..., half:, half:] = bottom @ bottom.mT
    corner = bottom @ top.mT
    gram[..., half:, :half] = corner
    gram[..., :half, half:] = corner.mT
    return gram


def _eigh_descending(gram: Tensor) -> Tuple[Tensor, Tensor]:
    lam, vec = torch.linalg.eigh(gram)
    return lam.flip(-1), vec.flip(-1)


def _project_out(rows: Tensor, basis: Tensor) -> Tensor:
    """``rows`` minus their components along the orthonormal rows of ``basis`` (twice: one
    classical Gram-Schmidt pass loses orthogonality in proportion to the cancellation)."""
    for _ in range(2):
        rows = rows - (rows @ basis.mT) @ basis
    return rows


def _by_descending(U: Tensor, s: Tensor, vh: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    if bool((s[..., :-1] >= s[..., 1:]).all()):
        return U, s, vh
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    return (U.gather(-1, order[..., None, :].expand_as(U)), s.gather(-1, order),
            vh.gather(-2, order[..., :, None].expand_as(vh)))


def _complete_rows(rows: Tensor, basis: Tensor) -> Tensor:
    """Orthonormal rows, orthogonal to ``basis``, each close to the row of ``rows`` it replaces.

    ``rows: (g, q, n)`` are the right singular vectors of the tail block, sorted by
    descending singular value. Those of tiny singular values are only accurate to
    ``eps ||tail|| / sigma``, and those of (numerically) zero ones are arbitrary vectors
    that need not be orthogonal to ``basis``. Projecting them off ``basis`` and
    re-orthonormalising (sign-fixed QR) moves each row by at most that amount, so the
    kernel, which holds the row times its singular value, moves by ``eps ||tail||``.
    A row that the projection all but removes (a null direction lying in ``span(basis)``)
    is replaced by a random direction of the complement: its singular value is round-off.
    """
    generator = None
    rows = _project_out(rows, basis)
    for _ in range(4):
        q, r = torch.linalg.qr(rows.mT)
        diag = torch.diagonal(r, dim1=-2, dim2=-1)
        rows = q.mT * torch.where(diag < 0, -1.0, 1.0).to(q.dtype)[..., None]
        lost = diag.abs() < 0.5
        if not bool(lost.any()):
            return rows
        if generator is None:
            generator = torch.Generator(device=rows.device).manual_seed(0)
        fresh = torch.randn(rows.shape, generator=generator, dtype=rows.dtype, device=rows.device)
        rows = _project_out(torch.where(lost[..., None], fresh, rows), basis)
        # Lost rows last, so the next QR orthogonalises them against the kept rows and
        # never the other way round (it would mix a random direction into a real one).
        order = torch.argsort(lost.to(torch.int8), dim=-1, stable=True)
        inverse = torch.argsort(order, dim=-1)
        rows = rows.gather(-2, order[..., None].expand_as(rows))
        q, r = torch.linalg.qr(rows.mT)
        diag = torch.diagonal(r, dim1=-2, dim2=-1)
        rows = q.mT * torch.where(diag < 0, -1.0, 1.0).to(q.dtype)[..., None]
        rows = rows.gather(-2, inverse[..., None].expand_as(rows))
        rows = _project_out(rows, basis)
    raise RuntimeError("could not complete an orthonormal basis of the core (please report this kernel)")


def _rows_svd(x: Tensor, depth: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Economy SVD ``x = U diag(s) Vh`` of ``x: (g, m, n)``, ``m <= n``, via the ``m x m`` Gram.

    ``eigh(x x^T)`` gives an orthogonal ``U`` (to machine precision, whatever the
    spectrum) and the rotated rows ``B = U^T x``, an exact orthogonal transform of ``x``.
    Rows whose eigenvalue is within ``_HEAD`` of the largest (the *head*) are
    right singular vectors after normalisation, orthonormal to ~1e-13; their norms are
    the singular values to ~1e-14 ``sigma_max``. The rest of ``B`` (small singular values,
    which the Gram cannot resolve: they sit near its round-off floor ``eps sigma_max^2``)
    is projected off the head rows and decomposed the same way, recursively, relative to
    its own scale, down to an exact LAPACK SVD of what is left (``_leaf_svd``). The
    components dropped by the projection are ``<~ 10 eps sigma_max / sqrt(_HEAD)``.

    Returns ``U (g, m, m)`` orthogonal, ``s (g, m)`` descending, ``Vh (g, m, n)`` with
    orthonormal rows, with ``U diag(s) Vh = x`` to ~1e-14 relative.
    """
    m = x.shape[-2]
    if m <= _LEAF_ROWS or depth >= _MAX_DEPTH:
        return _leaf_svd(x)
    lam, vec = _eigh_descending(_gram(x))
    rows = vec.mT @ x
    norms = rows.norm(dim=-1)
    in_head = (lam >= _HEAD * lam[..., :1]) & (lam > 0) & (norms > 0)
    head = int(in_head.to(torch.int64).cumprod(-1).sum(-1).min())  # a prefix, same for all groups
    if head == 0:  # a zero matrix in some group
        return _leaf_svd(x)
    head_rows = rows[..., :head, :] * norms[..., :head, None].reciprocal()
    if head == m:
        return _by_descending(vec, norms, head_rows)
    tail = _project_out(rows[..., head:, :], head_rows)
    u_tail, s_tail, vh_tail = _rows_svd(tail, depth + 1)
    U = torch.cat([vec[..., :head], vec[..., head:] @ u_tail], dim=-1)
    s = torch.cat([norms[..., :head], s_tail], dim=-1)
    vh = torch.cat([head_rows, _complete_rows(vh_tail, head_rows)], dim=-2)
    return _by_descending(U, s, vh)


def _economy_svd(x: Tensor, method: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``U (g, m, p), s (g, p), Vh (g, p, n)``, ``p = min(m, n)``, of ``x: (g, m, n)``."""
    if method == "svd":
        return torch.linalg.svd(x, full_matrices=False)
    if x.shape[-2] <= x.shape[-1]:
        return _rows_svd(x)
    u, s, vh = _rows_svd(x.mT)
    return vh.mT, s, u.mT


def _left_basis(a: Tensor, method: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Left singular basis of ``a: (g, m, n)``, the rotated rows and their norms.

    Returns ``basis (g, m, p)``, ``rows = basis^T a (g, p, n)`` and ``sv (g, p)``
    (``p = min(m, n)``, descending). With ``m <= n`` (the usual case) the Gram route's
    basis is square, so ``a = basis rows`` exactly and the squared norm of any set of
    discarded rows is exactly the squared error of truncating them, however inaccurate
    the eigenvectors of tiny eigenvalues are: ``eigh`` alone is enough, no fallback.
    """
    m, n = a.shape[-2:]
    if method == "svd":
        basis, sv, _ = torch.linalg.svd(a, full_matrices=False)
        return basis, basis.mT @ a, sv
    if m <= n:
        _, basis = _eigh_descending(_gram(a))
        rows = basis.mT @ a
        return basis, rows, rows.norm(dim=-1)
    basis, sv, vh = _economy_svd(a, method)
    return basis, sv[..., None] * vh, sv


# ------------------------------------------------------------------------- HOOI refinement
def _dominant_basis(x: Tensor, rank: int) -> Tensor:
    """Orthonormal basis ``(g, m, rank)`` of the dominant ``rank``-dim left subspace of ``x``.

    Only the subspace matters for HOOI, so ``eigh`` of the smaller Gram is exact enough:
    with ``m <= n`` its eigenvectors are orthonormal by construction; otherwise the
    top right vectors are mapped through ``x`` and orthonormalised by QR, which needs
    no division by singular values.
    """
    m, n = x.shape[-2:]
    if m <= n:
        return _eigh_descending(_gram(x))[1][..., :rank]
    right = _eigh_descending(_gram(x.mT))[1][..., :rank]
    return torch.linalg.qr(x @ right).Q


def _tucker_error_sq(w: Tensor, U: Tensor, V: Tensor) -> Tuple[Tensor, Tensor]:
    """Projected kernel ``U^T W V`` and ``||W - U U^T W V V^T||^2``, computed directly.

    The residual splits into two orthogonal parts, ``W (I - V V^T)`` and
    ``(I - U U^T) W V V^T``; each is formed and measured, instead of subtracting
    ``||U^T W V||^2`` from ``||W||^2``, which would lose the small errors to cancellation.
    """
    projected = torch.einsum("goit,gib->gobt", w, V)
    residual_in = w - torch.einsum("gobt,gib->goit", projected, V)
    core = torch.einsum("goa,gobt->gabt", U, projected)
    residual_out = projected - torch.einsum("goa,gabt->gobt", U, core)
    return core, residual_in.pow(2).sum() + residual_out.pow(2).sum()


def _hooi(w: Tensor, U: Tensor, V: Tensor, iterations: int) -> Tuple[Tensor, Tensor, Tensor, float]:
    """Alternating optimisation (HOOI, iterated Tucker-2) of ``U``, ``V`` from a start.

    Each step replaces one factor by the best one given the other: ``V`` by the top left
    singular subspace of the input unfolding of ``U^T W``, then ``U`` by that of the
    output unfolding of ``W V``. Each step maximises ``||U^T W V||`` over one factor, and
    for orthonormal factors ``||W - W_hat||^2 = ||W||^2 - ||U^T W V||^2``, so the error
    never increases. Stops early once a step gains less than round-off.

    ``w: (g, o, i, kh*kw)``; returns ``(U, V, core (g, r_out, r_in, kh*kw), error_sq)``.
    """
    g, o, i, taps = w.shape
    r_out, r_in = U.shape[-1], V.shape[-1]
    captured = float((U.mT @ torch.einsum("goit,gib->gobt", w, V).reshape(g, o, r_in * taps)).pow(2).sum())
    for _ in range(iterations):
        given_u = torch.einsum("goa,goit->gait", U, w).permute(0, 2, 1, 3).reshape(g, i, r_out * taps)
        V = _dominant_basis(given_u, r_in)
        given_v = torch.einsum("goit,gib->gobt", w, V).reshape(g, o, r_in * taps)
        U = _dominant_basis(given_v, r_out)
        gained = float((U.mT @ given_v).pow(2).sum())
        converged = gained - captured <= 64 * torch.finfo(w.dtype).eps * gained
        captured = max(captured, gained)
        if converged:
            break
    core, error_sq = _tucker_error_sq(w, U, V)
    return U, V, core, float(error_sq)


# ----------------------------------------------------------------------------- decompose
_METHODS = ("gram", "svd")

_ENERGY_SLACK = 1e-12
"""Relative round-off allowance of the energy test: a truncation keeps ``energy`` when it
discards at most ``(1 - energy + 1e-12) ||W||^2`` (the singular values are exact to
``~1e-14 sigma_max``, so without it ``energy=1.0`` would keep round-off directions)."""

_RANK_CANDIDATES = 16
"""Input ranks tried per energy search (all of them when there are at most this many)."""


def factor_params(out_per_group: int, in_per_group: int, kernel_size: Tuple[int, int],
                  ranks: Tuple[int, int], groups: int = 1) -> int:
    """Parameters of the TT factors of a kernel at ``ranks`` (no bias).

    Parameters
    ----------
    out_per_group, in_per_group : int
        Channels per group.
    kernel_size : (int, int)
    ranks : (int, int)
        ``(r_out, r_in)`` per group, as the factors hold them.
    groups : int

    Returns
    -------
    int
        ``groups * (o r_out + r_out + r_out r_in kh kw + i r_in)``: ``U``, ``S``, ``core``, ``V``.
    """
    r_out, r_in = ranks
    taps = kernel_size[0] * kernel_size[1]
    return groups * (out_per_group * r_out + r_out + r_out * r_in * taps + in_per_group * r_in)


class _Truncation:
    """One kernel's input-side decomposition, shared by every rank choice made on it.

    The input unfolding's singular basis is computed once; the output side at a given
    ``r_in`` (an SVD of the projected kernel) is computed per choice, and its singular
    values alone (``eigvalsh`` of a Gram) are cached per ``r_in`` for the energy search.
    """

    def __init__(self, weight: Tensor, groups: int, method: str = "gram") -> None:
        self.weight, self.groups, self.method = weight, groups, method
        c_out, self.in_per_group, kh, kw = weight.shape
        self.out_per_group = c_out // groups
        self.kernel_size = (kh, kw)
        self.taps = kh * kw
        w = _grouped(weight.detach().to(_WORK_DTYPE), groups)  # (g, o, i, kh, kw)
        # Worked on at unit scale, S takes the scale back: a float64 kernel near the ends of its
        # range (|w| ~ 1e-170: the squared norm underflows to 0; ~1e160: the Gram overflows) gets
        # the same factors and error as the kernel at scale 1. The truncation is scale-free.
        self.scale = float(kernel_scale(w))
        self.w = w / self.scale
        self.norm_sq = float(torch.linalg.vector_norm(self.w)) ** 2
        o, i = self.out_per_group, self.in_per_group
        # A 1x1 kernel is a matrix and one SVD gives both unfoldings: the input unfolding
        # is its transpose, and the projected output unfolding is ``U_all diag(s)``, whose
        # right singular vectors are the identity. Half the work of the two stages.
        self.pointwise = method == "gram" and self.taps == 1
        if self.pointwise:
            matrix = self.w.reshape(groups, o, i)
            if i <= o:
                V_all, s, left_rows = _rows_svd(matrix.mT)
                self.U_all = left_rows.mT
            else:
                self.U_all, s, right_rows = _rows_svd(matrix)
                V_all = right_rows.mT
            self.left, self.sv_in = V_all, s
        else:
            # Input-channel unfolding (g, i, o*kh*kw) -> V; its rotated rows are the projection.
            unfold_in = self.w.permute(0, 2, 1, 3, 4).reshape(groups, i, -1)
            self.left, self.rotated, self.sv_in = _left_basis(unfold_in, method)
        # tail_in[r]: squared norm discarded by keeping r input directions (all groups).
        power = self.sv_in.pow(2).sum(0)
        self.tail_in = torch.cat([power.flip(0).cumsum(0).flip(0), power.new_zeros(1)])
        self._out_power: Dict[int, Tensor] = {}
        self._grams: Optional[Dict[int, Tensor]] = None  # output Grams, kept during one energy search

    # -------------------------------------------------------------- output side
    def _projected(self, r_in: int) -> Tensor:
        """Output unfolding ``(g, o, r_in*kh*kw)`` of the kernel projected on ``V[:, :r_in]``."""
        g, o, (kh, kw) = self.groups, self.out_per_group, self.kernel_size
        projected = self.rotated[:, :r_in].reshape(g, r_in, o, kh, kw).transpose(1, 2)
        return projected.reshape(g, o, -1)

    def out_power(self, r_in: int) -> Tensor:
        """Squared singular values ``(g, p)`` of the projected output unfolding at ``r_in``."""
        if r_in not in self._out_power:
            if self.pointwise:
                power = self.sv_in[..., :r_in].pow(2)  # W V_r = U_all[:, :r] diag(s[:r])
            elif self.out_per_group <= r_in * self.taps:
                power = torch.linalg.eigvalsh(self._output_gram(r_in)).flip(-1).clamp_min(0.0)
            else:
                power = torch.linalg.eigvalsh(_gram(self._projected(r_in).mT)).flip(-1).clamp_min(0.0)
            self._out_power[r_in] = power
        return self._out_power[r_in]

    def _output_gram(self, r_in: int) -> Tensor:
        """``X X^T`` ``(g, o, o)`` of the projected output unfolding ``X`` at ``r_in``.

        ``X`` holds the first ``r_in`` rotated rows side by side (each an ``o x kh*kw``
        block ``R_b``), so ``X X^T = sum_{b < r_in} R_b R_b^T``: during one search the Gram
        at a larger ``r_in`` extends the nearest smaller one (``self._grams``) by the new
        blocks only, and a sweep over input ranks costs one Gram, not one per rank.
        """
        grams = self._grams if self._grams is not None else {}
        below = max((r for r in grams if r <= r_in), default=0)
        if below == r_in:
            return grams[r_in]
        g, o, (kh, kw) = self.groups, self.out_per_group, self.kernel_size
        new = self.rotated[:, below:r_in].reshape(g, r_in - below, o, kh * kw).transpose(1, 2).reshape(g, o, -1)
        gram = new @ new.mT
        if below:
            gram = gram + grams[below]
        grams[r_in] = gram
        return gram

    def _out_tails(self, r_in: int) -> Tensor:
        """``tails[r]``: squared norm discarded by keeping ``r`` output directions at ``r_in``."""
        power = self.out_power(r_in).sum(0)
        return torch.cat([power.flip(0).cumsum(0).flip(0), power.new_zeros(1)])

    # ------------------------------------------------------------ energy search
    def params(self, ranks: Tuple[int, int]) -> int:
        """Factor parameters at one-pass ranks ``(r_out, r_in)`` after the exact ``V`` compression."""
        r_out, r_in = ranks
        return factor_params(self.out_per_group, self.in_per_group, self.kernel_size,
                             (r_out, min(r_in, r_out * self.taps)), self.groups)

    def _min_r_out(self, r_in: int, allowed: float) -> int:
        tails = self._out_tails(r_in)
        room = allowed - float(self.tail_in[r_in])
        return max(1, int((tails > room).sum()))  # tails decrease: the first r with tails[r] <= room

    def energy_ranks(self, energy: float, shrink: bool = True) -> Tuple[int, int]:
        """Smallest one-pass ranks ``(r_out, r_in)`` keeping ``energy`` of ``||W||_F^2``.

        Kept energy is monotone in each rank (a larger ``r_in`` projects on a larger
        subspace, whose top-``r_out`` output energy can only grow), so the pairs that keep
        ``energy`` form a staircase. The result is on it: lowering either rank by one
        keeps less than ``energy``. Among the staircase points, it has the fewest
        parameters of those tried (the smallest feasible ``r_in`` and 16 spread over
        ``1..full``: every one for at most 16 input channels), then ``r_in`` is lowered as far as the same
        ``r_out`` allows. ``shrink=False`` tries the 16 spread input ranks only, whose
        spectra are cached across thresholds, and skips the lowering: an upper bound on
        the parameters of the ``shrink=True`` result at no new decomposition, for
        searches over many thresholds.
        """
        if self.norm_sq == 0.0:
            return 1, 1
        self._grams = {}
        try:
            return self._energy_ranks(energy, shrink)
        finally:
            self._grams = None  # (g, o, o) each: not kept between searches

    def _energy_ranks(self, energy: float, shrink: bool) -> Tuple[int, int]:
        allowed = (1.0 - energy + _ENERGY_SLACK) * self.norm_sq
        if self.pointwise:
            rank = max(1, int((self.tail_in > allowed).sum()))
            return rank, rank
        full_in = self.sv_in.shape[-1]
        low = max(1, int((self.tail_in > allowed).sum()))
        # The same spread of input ranks at every threshold (their spectra are cached), plus
        # the smallest feasible one (which ``spread`` need not hold).
        spread = {round(1 + k * (full_in - 1) / (_RANK_CANDIDATES - 1)) for k in range(_RANK_CANDIDATES)}
        candidates = sorted({r for r in spread if r >= low} | ({low} if shrink else set()))
        best = min((self.params((self._min_r_out(r_in, allowed), r_in)), r_in) for r_in in candidates)
        r_in = best[1]
        r_out = self._min_r_out(r_in, allowed)
        if not shrink:
            return r_out, r_in
        # Lower r_in at this r_out while the energy still holds (monotone: bisection).
        lo, hi = low, r_in  # hi is feasible
        while lo < hi:
            mid = (lo + hi) // 2
            if self._min_r_out(mid, allowed) <= r_out:
                hi = mid
            else:
                lo = mid + 1
        return r_out, hi

    # ---------------------------------------------------------------- factors
    def factors(self, r_out: int, r_in: int, refine: int = 0) -> Decomposition:
        """Canonical factors of the one-pass truncation at ``(r_out, r_in)`` (clamped by the caller)."""
        groups, method, w = self.groups, self.method, self.w
        o, i, (kh, kw) = self.out_per_group, self.in_per_group, self.kernel_size
        c_out = groups * o
        norm_sq, sv_in = self.norm_sq, self.sv_in
        V = self.left[..., :r_in]
        if self.pointwise:
            sv_out, P = sv_in[..., :r_in], self.U_all
        else:
            # Output-channel unfolding of the projected kernel (g, o, r_in*kh*kw) -> U, S, core.
            P, sv_out, Qh = _economy_svd(self._projected(r_in), method)
        r_out = min(r_out, r_in * kh * kw, sv_out.shape[-1])

        discarded = float(sv_in[..., r_in:].pow(2).sum() + sv_out[..., r_out:].pow(2).sum())
        relative_error = math.sqrt(discarded / norm_sq) if norm_sq > 0 else 0.0

        U, S = P[..., :r_out], sv_out[..., :r_out]
        if self.pointwise:
            r_in = r_out  # the input directions past r_out carry nothing through the core
            V = V[..., :r_in]
            core = torch.eye(r_out, dtype=w.dtype, device=w.device).expand(groups, r_out, r_out)[..., None]
        else:
            core = Qh[:, :r_out].reshape(groups, r_out, r_in, kh * kw)
        if r_in > r_out * kh * kw:
            # An energy-chosen r_out can leave more input directions than the core can use:
            # compress V onto the core's input span. Exact, and the core's rows stay
            # orthonormal because they lie in that span.
            r_in = r_out * kh * kw
            unfolding = core.transpose(1, 2).reshape(groups, core.shape[2], -1)
            span, _, _ = torch.linalg.svd(unfolding, full_matrices=False)
            span = span[..., :r_in]
            core = torch.einsum("gabk,gbc->gack", core, span)
            V = V @ span

        # With either factor square, or a 1x1 kernel (Eckart-Young), the one pass is optimal.
        optimal = r_out == o or r_in == i or kh * kw == 1
        if refine and norm_sq > 0 and not optimal:
            U, V, scaled, error_sq = _hooi(w.flatten(3), U, V, refine)
            # Canonical form of the refined core: its SVD (small, r_out x r_in kh kw).
            P, S, Qh = _economy_svd(scaled.reshape(groups, r_out, -1), method)
            U, core = U @ P, Qh.reshape(groups, r_out, r_in, kh * kw)
            relative_error = math.sqrt(error_sq / norm_sq)

        like = self.weight  # the factors take its dtype and device
        factors = TTFactors(
            U=U.reshape(c_out, r_out).to(like),
            S=(S * self.scale).reshape(groups * r_out).to(like),
            core=core.reshape(groups * r_out, r_in, kh, kw).to(like),
            V=V.reshape(groups * i, r_in).to(like),
        )
        if like.dtype in _HALF_DTYPES and norm_sq > 0:
            # Rounding the factors to 10 or 7 mantissa bits moves the kernel by ~1e-3 relative,
            # more than many truncations: the error reported is that of the factors returned.
            U64, S64, core64, V64 = (f.to(_WORK_DTYPE) for f in factors)
            composed = compose(U64, S64, core64, V64, groups=groups)
            reference = like.detach().to(_WORK_DTYPE)
            relative_error = float(torch.linalg.vector_norm(composed - reference)
                                   / torch.linalg.vector_norm(reference))
        return Decomposition(factors, (r_out, r_in), relative_error)

    def decompose(self, rank: RankSpec = None, energy: Optional[float] = None, refine: int = 0) -> Decomposition:
        if energy is not None:
            r_out, r_in = self.energy_ranks(float(energy))
            if rank is not None:  # a cap (used by convert's parameter budget)
                cap_out, cap_in = resolve_ranks(rank, self.out_per_group, self.in_per_group, self.kernel_size)
                r_out, r_in = min(r_out, cap_out), min(r_in, cap_in)
        else:
            r_out, r_in = resolve_ranks(rank, self.out_per_group, self.in_per_group, self.kernel_size)
        return self.factors(r_out, r_in, refine)


def _check_decompose_arguments(weight: Tensor, groups: int, rank: RankSpec, energy: Optional[float],
                               refine: int, method: str) -> int:
    groups = check_kernel(weight, groups)
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)}): a conv with no channels or taps has "
                         "nothing to decompose")
    if rank is not None and energy is not None:
        raise ValueError("pass either rank or energy, not both")
    if energy is not None and not (isinstance(energy, (float, int)) and not isinstance(energy, bool)
                                   and 0.0 < float(energy) <= 1.0):
        raise ValueError(f"energy must be a float in (0, 1], got {energy!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be a non-negative int (iterations), got {refine!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return groups


@full_precision
def _truncation(weight: Tensor, groups: int = 1, method: str = "gram") -> _Truncation:
    """The shared input-side analysis of ``weight`` (see ``_Truncation``), validated."""
    groups = _check_decompose_arguments(weight, groups, None, None, 0, method)
    return _Truncation(weight, groups, method)


@full_precision
def decompose(
    weight: Tensor,
    groups: int = 1,
    rank: RankSpec = None,
    energy: Optional[float] = None,
    *,
    refine: int = 0,
    method: str = "gram",
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
        Clamped to the shape (see ``resolve_ranks``). Exclusive with ``energy``.
    energy : float in (0, 1], optional
        Fraction of the whole kernel's squared Frobenius norm to keep: the composed
        kernel satisfies ``||W_hat||^2 = ||W||^2 - ||W - W_hat||^2 >= energy ||W||^2``
        (up to ``1e-12 ||W||^2`` of round-off), summed over all groups, so the relative
        error is at most ``sqrt(1 - energy)``. The ranks are minimal in this sense: the
        one-pass truncation with either rank one lower keeps less than ``energy``; among
        such pairs the one with the fewest parameters is taken (searched over up to 16
        input ranks, see ``_Truncation.energy_ranks``). On a 1x1 kernel this is the
        Eckart-Young rank: no rank-``(r - 1)`` kernel keeps ``energy``.
    refine : int, default 0
        Iterations of alternating optimisation of ``U`` and ``V`` (HOOI) after the
        one-pass truncation, at the same ranks. Never increases the error; at the ranks
        where it matters it lowers it by a few percent, at a cost of roughly one one-pass
        decomposition per iteration (``python benchmarks/bench_convert.py``). Stops
        early when an iteration gains nothing. No effect at full rank or on 1x1 kernels,
        where the one-pass result is already optimal.
    method : {'gram', 'svd'}, default 'gram'
        ``'gram'``: singular vectors from ``eigh`` of the smaller Gram matrix of each
        unfolding, with an exact SVD of the part of the spectrum the Gram cannot resolve
        (``docs/design.md``, "Conversion"); same accuracy as ``'svd'``, 10-40x faster on
        large kernels. ``'svd'``: LAPACK SVDs of the unfoldings (the reference).

    Returns
    -------
    Decomposition
        Factors in canonical form, in ``weight``'s dtype and device. ``relative_error``
        is the error of these factors, measured from the discarded rows (or, after
        ``refine``, from the residual itself; for float16 and bfloat16 factors, on the
        rounded factors themselves), not estimated.
    """
    groups = _check_decompose_arguments(weight, groups, rank, energy, refine, method)
    c_out, in_per_group, kh, kw = weight.shape
    resolve_ranks(rank, c_out // groups, in_per_group, (kh, kw))  # validate before any work
    return _Truncation(weight, groups, method).decompose(rank, energy, refine)


# --------------------------------------------------------------------- initialisation
def _haar_columns(groups: int, n: int, r: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(groups, n, r)`` Haar-random orthonormal columns: sign-fixed QR of a Gaussian."""
    q, r_factor = torch.linalg.qr(torch.randn(groups, n, r, dtype=dtype, device=device))
    signs = torch.where(torch.diagonal(r_factor, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(dtype)
    return q * signs[..., None, :]


def _haar_rows(groups: int, r: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(groups, r, n)``, ``r <= n``: Haar-random orthonormal rows.

    For ``n >= 4 r`` by Cholesky-QR of a Gaussian ``Z``: ``L^{-1} Z`` with ``Z Z^T = L L^T``,
    the same matrix as the sign-fixed QR of ``Z^T``, but with the work in one symmetric
    GEMM and one plain GEMM by the small inverse ``L^{-1}`` (3x faster than Householder
    QR or a triangular solve at 512 x 4608). Exact to ``eps kappa(Z)^2``, and a Gaussian
    that wide has ``kappa(Z) < 3``.
    """
    if n < 4 * r:
        return _haar_columns(groups, n, r, dtype, device).mT
    rows = torch.randn(groups, r, n, dtype=dtype, device=device)
    # The r x r factorisation in float64 keeps float32 rows orthonormal to ~1e-7.
    lower = torch.linalg.cholesky(_gram(rows).to(torch.float64))
    inverse = torch.linalg.solve_triangular(lower, torch.eye(r, dtype=lower.dtype, device=device), upper=False)
    return inverse.to(dtype) @ rows


def random_factors(
    out_per_group: int,
    in_per_group: int,
    kernel_size: Tuple[int, int],
    ranks: Tuple[int, int],
    groups: int = 1,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> TTFactors:
    """Random factors in canonical form whose kernel is distributed like ``nn.Conv2d``'s init.

    ``U``, ``V``: Haar-random orthonormal columns per group (sign-fixed QR of Gaussians);
    ``core``: Haar-random orthonormal rows of its unfolding; ``S``: flat, with
    ``sum_a S_a^2 = (c_out/g) / 3`` per group. Then the composed kernel has
    ``||W_g||^2 = sum S^2`` and, by the rotation invariance of the Haar factors, entries of
    mean 0 that are uncorrelated with equal variance ``1 / (3 fan_in)``: the variance of
    ``nn.Conv2d``'s default ``kaiming_uniform_(a=sqrt(5))``, at every rank. The form is
    canonical (``S`` are the singular values of the unfolding, all equal).

    Cost ``O(c r^2 + r_out^2 r_in kh kw)``, no SVD: ``SVDConv(...)`` used to draw a dense
    kernel and decompose it.

    Parameters
    ----------
    out_per_group, in_per_group : int
    kernel_size : (int, int)
    ranks : (int, int)
        ``(r_out, r_in)``, valid for the shape (see ``resolve_ranks``).
    groups : int
    dtype, device : optional
        Of the returned tensors. Half precision is sampled in float32 (QR has no
        half-precision kernels) and cast.

    Returns
    -------
    TTFactors
        In the stacked-group layout of this module.
    """
    r_out, r_in = ranks
    kh, kw = kernel_size
    dtype = dtype or torch.get_default_dtype()
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    # Like torch's factories: no device means torch's default device (torch.set_default_device).
    device = torch.device(device) if device is not None else torch.empty(0).device
    U = _haar_columns(groups, out_per_group, r_out, work, device)
    V = _haar_columns(groups, in_per_group, r_in, work, device)
    core = _haar_rows(groups, r_out, r_in * kh * kw, work, device)
    S = torch.full((groups * r_out,), math.sqrt(out_per_group / (3.0 * r_out)), dtype=work, device=device)
    return TTFactors(
        U=U.reshape(groups * out_per_group, r_out).to(dtype),
        S=S.to(dtype),
        core=core.reshape(groups * r_out, r_in, kh, kw).to(dtype),
        V=V.reshape(groups * in_per_group, r_in).to(dtype),
    )


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
    u, s, c, v = (t.detach().to(_WORK_DTYPE) for t in (U, S, core, V))
    q_u, q_v, absorbed = _qr_absorb(u, s, c, v, groups)
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
