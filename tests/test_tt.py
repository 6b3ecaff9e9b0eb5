"""TT factor math: exact and truncated decompositions, canonical form, rank rules."""

import math

import numpy as np
import pytest
import torch

from oracle import default_device, seeded_randn
from ttconv import tt
from ttconv.tt import (
    canonicalize,
    compose,
    decompose,
    orthonormal_core,
    orthonormality_error,
    random_factors,
    resolve_ranks,
)

SHAPES = [  # (c_out, c_in_per_group, kh, kw, groups)
    (8, 5, 3, 3, 1), (5, 8, 3, 3, 1), (6, 2, 1, 1, 3), (4, 4, 5, 2, 2), (16, 1, 3, 3, 16), (1, 7, 2, 3, 1),
]


def _unfold_out(w, groups):
    return w.reshape(groups, w.shape[0] // groups, -1)


def _unfold_in(w, groups):
    g = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
    return g.transpose(1, 2).reshape(groups, w.shape[1], -1)


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_is_exact_and_canonical(shape):
    c_out, c_in, kh, kw, groups = shape
    weight = torch.randn(c_out, c_in, kh, kw, dtype=torch.float64)
    result = decompose(weight, groups)
    U, S, core, V = result.factors
    rebuilt = compose(U, S, core, V, groups)
    assert float((rebuilt - weight).norm() / weight.norm()) < 1e-12
    assert result.relative_error < 1e-12
    assert orthonormality_error(U, groups) < 1e-12
    assert orthonormality_error(V, groups) < 1e-12
    rows = core.reshape(groups, core.shape[0] // groups, -1).transpose(1, 2).reshape(-1, core.shape[0] // groups)
    assert orthonormality_error(rows, groups) < 1e-12
    # S are the singular values of the (c_out/g, c_in/g*kh*kw) unfolding, descending.
    expected = np.linalg.svd(_unfold_out(weight, groups).cpu().numpy(), compute_uv=False)
    np.testing.assert_allclose(S.reshape(groups, -1).cpu().numpy(), expected[:, : S.numel() // groups], atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("rank", [1, 2, (3, 1), (1, 3)])
def test_truncation_error_is_reported_exactly_and_is_optimal_per_unfolding(shape, rank):
    c_out, c_in, kh, kw, groups = shape
    weight = torch.randn(c_out, c_in, kh, kw, dtype=torch.float64)
    result = decompose(weight, groups, rank=rank)
    r_out, r_in = result.ranks
    rebuilt = compose(*result.factors, groups)
    actual = float((rebuilt - weight).norm() / weight.norm())
    assert abs(result.relative_error - actual) < 1e-12
    # Independent check: Eckart-Young tails of the input unfolding, then of the projected one.
    sv_in = np.linalg.svd(_unfold_in(weight, groups).cpu().numpy(), compute_uv=False)
    V = result.factors.V.reshape(groups, c_in, r_in)
    projected = torch.einsum("goihw,gib->gobhw", weight.reshape(groups, -1, c_in, kh, kw), V)
    sv_out = np.linalg.svd(projected.reshape(groups, c_out // groups, -1).cpu().numpy(), compute_uv=False)
    optimal = np.sqrt((sv_in[:, r_in:] ** 2).sum() + (sv_out[:, r_out:] ** 2).sum()) / float(weight.norm())
    assert abs(result.relative_error - optimal) < 1e-12


def _one_pass_kept(weight, groups, r_out, r_in):
    """Fraction of ||W||^2 kept by the one-pass truncation at (r_out, r_in), in numpy:
    V = leading r_in left singular vectors of each group's input unfolding, U = leading
    r_out of the output unfolding of W V; kept = sum_g ||U^T W_g V||^2 (orthonormal U, V)."""
    w = weight.cpu().numpy()
    c_out, c_in, kh, kw = w.shape
    total, kept = float((w**2).sum()), 0.0
    for g in range(groups):
        wg = w[g * (c_out // groups):(g + 1) * (c_out // groups)]
        unfold_in = wg.transpose(1, 0, 2, 3).reshape(c_in, -1)
        V = np.linalg.svd(unfold_in, full_matrices=False)[0][:, :r_in]
        projected = np.einsum("oihw,ib->obhw", wg, V).reshape(wg.shape[0], -1)
        sv = np.linalg.svd(projected, compute_uv=False)
        kept += float((sv[:r_out] ** 2).sum())
    return kept / total


ENERGY_SHAPES = [  # (c_out, c_in_per_group, kh, kw, groups)
    (24, 16, 1, 1, 1), (16, 24, 1, 1, 1), (12, 10, 3, 3, 1), (10, 12, 3, 3, 1), (8, 4, 3, 3, 2), (6, 3, 1, 1, 3),
    (16, 6, 3, 1, 1), (4, 16, 3, 3, 1),
    (12, 40, 3, 3, 1), (40, 30, 3, 3, 1),  # more than 16 input ranks: spread candidates, then the shrink
]


@pytest.mark.parametrize("shape", ENERGY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("decay", [0.0, -1.0, -3.0])
def test_energy_is_met_on_the_whole_kernel_with_minimal_ranks(shape, decay):
    c_out, c_in, kh, kw, groups = shape
    gen = torch.Generator().manual_seed(c_out * 100 + c_in + int(10 * decay))
    weight = seeded_randn(c_out, c_in, kh, kw, dtype=torch.float64, generator=gen)
    weight = weight * torch.logspace(0, decay, c_in, dtype=torch.float64)[None, :, None, None]
    weight = weight * torch.logspace(0, decay / 2, c_out, dtype=torch.float64)[:, None, None, None]
    for energy in (0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999):
        for method in ("gram", "svd"):
            result = decompose(weight, groups, energy=energy, method=method)
            r_out, r_in = result.ranks
            w_hat = compose(*result.factors, groups)
            # Kept energy measured on the composed kernel: ||W_hat||^2 / ||W||^2, and the
            # error side 1 - ||W - W_hat||^2 / ||W||^2 (equal for an orthogonal projection).
            kept = float(w_hat.norm() ** 2 / weight.norm() ** 2)
            kept_by_error = 1 - float((weight - w_hat).norm() ** 2 / weight.norm() ** 2)
            assert abs(kept - kept_by_error) < 1e-12
            assert kept >= energy - 1e-12, (energy, method, result.ranks, kept)
            assert abs(result.relative_error ** 2 - (1 - kept)) < 1e-12
            assert abs(_one_pass_kept(weight, groups, r_out, r_in) - kept) < 1e-12
            # Minimal: the one-pass truncation with either rank one lower keeps too little.
            if r_out > 1:
                assert _one_pass_kept(weight, groups, r_out - 1, r_in) < energy
            if r_in > 1:
                assert _one_pass_kept(weight, groups, r_out, r_in - 1) < energy


@pytest.mark.parametrize("shape", [(12, 10, 3, 3, 1), (10, 12, 3, 3, 1), (8, 4, 3, 3, 2), (16, 6, 3, 1, 1)])
def test_energy_ranks_have_the_fewest_parameters_of_all_pairs_keeping_the_energy(shape):
    # At most 16 input ranks: the search is exhaustive, so compare with brute force over all pairs.
    c_out, c_in, kh, kw, groups = shape
    torch.manual_seed(3)
    weight = torch.randn(c_out, c_in, kh, kw, dtype=torch.float64) * torch.logspace(0, -1, c_in)[None, :, None, None]
    o, taps = c_out // groups, kh * kw
    for energy in (0.5, 0.8, 0.95):
        r_out, r_in = decompose(weight, groups, energy=energy).ranks

        def params(a, b):  # U, S, core, V; V compressed to the core's input span
            b = min(b, a * taps)
            return groups * (o * a + a + a * b * taps + c_in * b)

        best = min(params(a, b) for a in range(1, o + 1) for b in range(1, c_in + 1)
                   if _one_pass_kept(weight, groups, a, b) >= energy)
        assert params(r_out, r_in) == best
        assert tt.factor_params(o, c_in, (kh, kw), (r_out, r_in), groups) == best


def test_energy_ranks_shrink_r_in_below_the_tried_input_ranks():
    # 39 input channels: 16 spread input ranks are tried; the best of them (r_in = 21 here)
    # is then lowered to the smallest r_in that keeps the energy at the same r_out.
    gen = torch.Generator().manual_seed(0)
    weight = seeded_randn(37, 39, 3, 3, dtype=torch.float64, generator=gen)
    weight *= torch.logspace(0, -2.6, 37, dtype=torch.float64)[:, None, None, None]
    weight *= torch.logspace(0, -0.4, 39, dtype=torch.float64)[None, :, None, None]
    tried = tt._truncation(weight).energy_ranks(0.8, shrink=False)
    r_out, r_in = decompose(weight, energy=0.8).ranks
    assert r_out == tried[0] and r_in < tried[1]  # the shrink did something here
    assert _one_pass_kept(weight, 1, r_out, r_in) >= 0.8 - 1e-12
    assert _one_pass_kept(weight, 1, r_out, r_in - 1) < 0.8
    assert _one_pass_kept(weight, 1, r_out - 1, r_in) < 0.8


def test_energy_099_keeps_99_percent_of_a_1x1_kernel():
    # Issue 14, item 6: the same matrix used to be truncated twice (kept 98.1%).
    torch.manual_seed(0)
    weight = torch.randn(64, 64, 1, 1, dtype=torch.float64) * torch.logspace(0, -1, 64)[None, :, None, None]
    result = decompose(weight, energy=0.99)
    w_hat = compose(*result.factors)
    s = np.linalg.svd(weight[:, :, 0, 0].cpu().numpy(), compute_uv=False)
    r = int(np.searchsorted(np.cumsum(s**2) / (s**2).sum(), 0.99) + 1)  # Eckart-Young rank
    assert result.ranks == (r, r)
    assert float(w_hat.norm() ** 2 / weight.norm() ** 2) >= 0.99
    assert (s[: r - 1] ** 2).sum() / (s**2).sum() < 0.99


def test_canonicalize_restores_form_without_changing_kernel():
    groups = 2
    result = decompose(torch.randn(6, 3, 3, 3, dtype=torch.float64), groups, rank=(2, 2))
    U, S, core, V = (t + 0.2 * torch.randn_like(t) for t in result.factors)
    before = compose(U, S, core, V, groups)
    U2, S2, core2, V2 = canonicalize(U, S, core, V, groups)
    assert float((compose(U2, S2, core2, V2, groups) - before).abs().max()) < 1e-13
    assert orthonormality_error(U2, groups) < 1e-13 and orthonormality_error(V2, groups) < 1e-13
    expected = np.linalg.svd(_unfold_out(before, groups).cpu().numpy(), compute_uv=False)[:, :2]
    np.testing.assert_allclose(S2.reshape(groups, 2).cpu().numpy(), expected, atol=1e-12)


def test_orthonormal_core_equals_core_when_factors_are_orthonormal():
    U, S, core, V = decompose(torch.randn(5, 4, 3, 3, dtype=torch.float64), rank=3).factors
    absorbed = orthonormal_core(U, S, core, V)
    # R factors are diagonal +-1 for orthonormal input: equal up to per-row/column signs.
    assert torch.allclose(absorbed.abs(), (S[:, None, None, None] * core).abs(), atol=1e-12)


@pytest.mark.parametrize(
    "rank, expected",
    [(None, (8, 4)), (100, (8, 4)), (3, (3, 3)), ((8, 1), (8, 1)), ((100, 1), (8, 1)), ((1, 100), (1, 4))],
)
def test_rank_clamping(rank, expected):
    # c_out/g = 8, c_in/g = 4, 3x3 kernel; r_out <= r_in * 9, r_in <= r_out * 9.
    assert resolve_ranks(rank, 8, 4, (3, 3)) == expected


def test_rank_clamps_to_core_unfoldings_for_1x1_kernels():
    assert resolve_ranks((5, 2), 8, 4, (1, 1)) == (2, 2)


@pytest.mark.parametrize("rank, error", [(0, ValueError), (-1, ValueError), ((2, 0), ValueError), (1.5, TypeError),
                                         ("3", TypeError), ((1, 2, 3), ValueError), (True, TypeError)])
def test_bad_ranks_raise(rank, error):
    with pytest.raises(error, match="rank"):
        resolve_ranks(rank, 8, 4, (3, 3))


def test_decompose_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        decompose(torch.full((2, 2, 3, 3), float("inf")))
    with pytest.raises(ValueError, match="4-D"):
        decompose(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match="either rank or energy"):
        decompose(torch.randn(2, 2, 3, 3), rank=1, energy=0.9)
    with pytest.raises(ValueError, match="energy"):
        decompose(torch.randn(2, 2, 3, 3), energy=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        decompose(torch.ones(2, 2, 3, 3, dtype=torch.int64))


def test_zero_kernel_decomposes_with_zero_error():
    result = decompose(torch.zeros(3, 2, 3, 3), rank=1)
    assert result.relative_error == 0.0
    assert torch.all(compose(*result.factors) == 0)


def test_energy_ranks_of_1x1_kernels_keep_r_in_within_r_out():
    torch.manual_seed(0)
    weight = torch.randn(32, 16, 1, 1, dtype=torch.float64) * torch.logspace(0, -1, 16)[None, :, None, None]
    for energy in (0.5, 0.8, 0.9, 0.99):
        result = decompose(weight, energy=energy)
        r_out, r_in = result.ranks
        assert r_in <= r_out
        U, S, core, V = result.factors
        assert core.shape == (r_out, r_in, 1, 1) and V.shape == (16, r_in)
        actual = float((compose(*result.factors) - weight).norm() / weight.norm())
        assert abs(actual - result.relative_error) < 1e-12
        assert orthonormality_error(V) < 1e-12
        assert orthonormality_error(core.reshape(r_out, -1).T) < 1e-12


# ------------------------------------------------------------------ Gram route vs reference
def _graded(c_out, c_in, kh, kw, side, low=-12.0, rank=None, groups=1, seed=0):
    """A kernel whose output (``side='out'``) or input unfolding has singular values
    ``logspace(0, low)`` per group, the last ones set to exactly 0 past ``rank``."""
    gen = torch.Generator().manual_seed(seed)
    per_out, taps = c_out // groups, kh * kw
    rows, cols = (per_out, c_in * taps) if side == "out" else (c_in, per_out * taps)
    blocks = []
    for _ in range(groups):
        left = torch.linalg.qr(seeded_randn(rows, min(rows, cols), generator=gen, dtype=torch.float64)).Q
        right = torch.linalg.qr(seeded_randn(cols, min(rows, cols), generator=gen, dtype=torch.float64)).Q
        sv = torch.logspace(0, low, min(rows, cols), dtype=torch.float64)
        if rank is not None:
            sv[rank:] = 0
        matrix = (left * sv) @ right.T
        if side == "out":
            blocks.append(matrix.reshape(per_out, c_in, kh, kw))
        else:
            blocks.append(matrix.reshape(c_in, per_out, kh, kw).transpose(0, 1))
    return torch.cat(blocks)


def _canonical_checks(result, weight, groups):
    U, S, core, V = result.factors
    r_out = core.shape[0] // groups
    rows = core.reshape(groups, r_out, -1).transpose(1, 2).reshape(-1, r_out)
    assert orthonormality_error(U, groups) < 1e-12
    assert orthonormality_error(V, groups) < 1e-12
    assert orthonormality_error(rows, groups) < 1e-12
    assert bool((S.reshape(groups, -1).diff(dim=-1) <= 1e-15).all())  # descending
    actual = float((compose(*result.factors, groups) - weight).norm() / weight.norm())
    assert abs(result.relative_error - actual) < 1e-12


GRAM_CASES = [  # (c_out, c_in per group, kh, kw, groups, kernel kind)
    (64, 48, 3, 3, 1, "random"), (40, 72, 3, 3, 1, "random"), (96, 96, 1, 1, 1, "random"),
    (200, 48, 1, 1, 1, "random"), (48, 200, 1, 1, 1, "random"), (64, 40, 3, 3, 2, "random"),
    (36, 8, 5, 2, 1, "random"), (240, 10, 3, 3, 1, "random"), (10, 240, 3, 3, 1, "random"),
    (64, 64, 3, 3, 1, "out"), (64, 64, 3, 3, 1, "in"), (96, 96, 1, 1, 1, "out"), (80, 40, 3, 3, 2, "out"),
    (64, 64, 3, 3, 1, "out-deficient"), (64, 64, 3, 3, 1, "in-deficient"), (96, 96, 1, 1, 1, "out-deficient"),
    (128, 40, 1, 1, 1, "out-deficient"),
]


def _gram_case(case):
    c_out, c_in, kh, kw, groups, kind = case
    if kind == "random":
        return torch.randn(c_out, c_in, kh, kw, dtype=torch.float64)
    side = kind.split("-")[0]
    if kind.endswith("deficient"):  # exactly rank deficient: a third of the directions are zero
        return _graded(c_out, c_in, kh, kw, side, low=-3.0, rank=min(c_out // groups, c_in) // 3, groups=groups)
    return _graded(c_out, c_in, kh, kw, side, groups=groups)  # singular values 1 .. 1e-12


@pytest.mark.parametrize("case", GRAM_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("rank", [None, 7, (24, 5)], ids=["full", "r7", "r24x5"])
def test_gram_route_matches_the_reference_svd_route(case, rank):
    groups = case[4]
    weight = _gram_case(case)
    fast = decompose(weight, groups, rank=rank)
    reference = decompose(weight, groups, rank=rank, method="svd")
    assert fast.ranks == reference.ranks
    _canonical_checks(fast, weight, groups)
    if rank is None:
        assert fast.relative_error < 1e-12
        assert float((compose(*fast.factors, groups) - weight).norm() / weight.norm()) < 1e-12
    # Singular values of the output unfolding agree to 1e-12 of the largest (the accuracy
    # any backward-stable SVD has), including those near 1e-12 and the exact zeros.
    S, S_ref = fast.factors.S.reshape(groups, -1), reference.factors.S.reshape(groups, -1)
    assert float((S - S_ref).abs().max()) <= 1e-12 * float(S_ref.abs().max())
    assert abs(fast.relative_error - reference.relative_error) < 1e-12


@pytest.mark.parametrize("case", [c for c in GRAM_CASES if c[5] != "random"], ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("energy", [0.9, 0.999999, 1.0])
def test_gram_route_energy_truncation_matches_the_reference(case, energy):
    groups = case[4]
    weight = _gram_case(case)
    fast = decompose(weight, groups, energy=energy)
    reference = decompose(weight, groups, energy=energy, method="svd")
    assert fast.ranks == reference.ranks
    _canonical_checks(fast, weight, groups)
    assert abs(fast.relative_error - reference.relative_error) < 1e-12


def test_truncation_inside_the_ill_conditioned_tail_reports_the_exact_error():
    # Singular values 1 .. 1e-12: truncating where they are ~1e-8 leaves an error ~1e-8,
    # far below the Gram's round-off floor (eps * sigma_max^2 ~ 1e-16 on the squares).
    weight = _graded(64, 64, 3, 3, "out")
    for r_out in (45, 50, 60):
        fast = decompose(weight, rank=(r_out, 64))
        reference = decompose(weight, rank=(r_out, 64), method="svd")
        actual = float((compose(*fast.factors) - weight).norm() / weight.norm())
        assert 1e-12 < actual < 1e-4
        assert abs(fast.relative_error - actual) < 1e-14
        assert abs(fast.relative_error - reference.relative_error) < 1e-14


def test_the_exact_fallback_runs_where_the_gram_cannot_resolve_the_spectrum(monkeypatch):
    calls = []
    leaf = tt._leaf_svd

    def counting(x):
        calls.append(tuple(x.shape))
        return leaf(x)

    monkeypatch.setattr(tt, "_leaf_svd", counting)
    decompose(torch.randn(64, 48, 3, 3, dtype=torch.float64))  # well conditioned: Gram only
    assert calls == []
    ill = _graded(64, 64, 3, 3, "out")  # sigma 1 .. 1e-12: 4 Gram levels reach 1e-4, LAPACK the rest
    result = decompose(ill)
    assert len(calls) == 1 and calls[0][1] < 64  # only the unresolved tail block, not the whole matrix
    _canonical_checks(result, ill, 1)
    # A head of a few rows per level forces the projection, the recursion to the depth
    # limit and the completion on well-conditioned kernels too.
    levels = []
    rows_svd = tt._rows_svd

    def recording(x, depth=0):
        levels.append(depth)
        return rows_svd(x, depth)

    monkeypatch.setattr(tt, "_rows_svd", recording)
    monkeypatch.setattr(tt, "_HEAD", 0.9)
    for weight in (ill, torch.randn(64, 48, 3, 3, dtype=torch.float64), _graded(96, 96, 1, 1, "out", -3.0, 30)):
        levels.clear()
        forced = decompose(weight)
        assert max(levels) == tt._MAX_DEPTH
        _canonical_checks(forced, weight, 1)
        reference = decompose(weight, method="svd").factors.S
        assert float((forced.factors.S - reference).abs().max()) <= 1e-12 * float(reference.max())


def test_completion_replaces_null_directions_that_lie_in_the_kept_span():
    gen = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(seeded_randn(30, 10, generator=gen, dtype=torch.float64)).Q.T[None]  # (1, 10, 30)
    genuine = torch.linalg.qr(seeded_randn(30, 30, generator=gen, dtype=torch.float64)).Q.T[None, 20:23]
    genuine = genuine - (genuine @ basis.mT) @ basis
    genuine = torch.linalg.qr(genuine.mT).Q.mT
    inside = basis[:, :2] + 1e-9 * seeded_randn(1, 2, 30, generator=gen, dtype=torch.float64)  # "null" rows
    rows = torch.cat([genuine, inside], dim=1)
    completed = tt._complete_rows(rows, basis)
    assert completed.shape == rows.shape
    gram = completed @ completed.mT
    assert float((gram - torch.eye(5, dtype=gram.dtype)).abs().max()) < 1e-13
    assert float((completed @ basis.mT).abs().max()) < 1e-13
    assert float((completed[:, :3] - genuine).abs().max()) < 1e-13  # genuine rows untouched


def test_gram_route_handles_zero_groups_and_depthwise_kernels():
    weight = torch.randn(8, 40, 3, 3, dtype=torch.float64)
    weight[4:] = 0  # second group all zero
    result = decompose(weight, groups=2)
    assert float((compose(*result.factors, 2) - weight).norm() / weight.norm()) < 1e-12
    assert orthonormality_error(result.factors.U, 2) < 1e-12
    depthwise = torch.randn(32, 1, 3, 3, dtype=torch.float64)
    result = decompose(depthwise, groups=32)
    _canonical_checks(result, depthwise, 32)


def test_float32_kernels_convert_exactly_by_the_gram_route():
    weight = torch.randn(128, 64, 3, 3)
    result = decompose(weight)
    assert result.factors.U.dtype == torch.float32
    assert float((compose(*result.factors) - weight).norm() / weight.norm()) < 1e-6


def test_bad_method_and_refine_raise():
    weight = torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match="method"):
        decompose(weight, method="qr")
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="refine"):
            decompose(weight, rank=2, refine=bad)


# --------------------------------------------------------------------------- refinement
def _numpy_hooi(w, r_out, r_in, iterations):
    """Independent Tucker-2 HOOI (HOSVD start, alternating exact updates), error relative."""
    o, i = w.shape[:2]
    W = w.reshape(o, i, -1)
    U = np.linalg.svd(W.reshape(o, -1), full_matrices=False)[0][:, :r_out]
    V = np.linalg.svd(W.transpose(1, 0, 2).reshape(i, -1), full_matrices=False)[0][:, :r_in]
    for _ in range(iterations):
        U = np.linalg.svd(np.einsum("oit,ib->obt", W, V).reshape(o, -1), full_matrices=False)[0][:, :r_out]
        V = np.linalg.svd(np.einsum("oa,oit->ait", U, W).transpose(1, 0, 2).reshape(i, -1),
                          full_matrices=False)[0][:, :r_in]
    core = np.einsum("oa,oit,ib->abt", U, W, V)
    return np.sqrt(max(np.sum(W**2) - np.sum(core**2), 0.0) / np.sum(W**2))


def _low_rank_plus_noise(shape, rank, noise, seed):
    rng = np.random.default_rng(seed)
    o, i, kh, kw = shape
    signal = np.einsum("oa,abt,ib->oit", rng.standard_normal((o, rank)), rng.standard_normal((rank, rank, kh * kw)),
                       rng.standard_normal((i, rank)))
    signal /= np.linalg.norm(signal)
    return (signal + noise * rng.standard_normal((o, i, kh * kw)) / np.sqrt(o * i * kh * kw)).reshape(shape)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape, rank", [((32, 24, 3, 3), 6), ((20, 30, 3, 3), (10, 5)), ((16, 16, 5, 5), 4),
                                         ((24, 24, 3, 3), 8)])
def test_refinement_is_monotone_exact_and_beats_hooi_at_equal_iterations(shape, rank, seed):
    w = np.random.default_rng(seed).standard_normal(shape)
    weight = torch.as_tensor(w, device=default_device())  # the test's device
    previous = decompose(weight, rank=rank).relative_error
    for n in (1, 2, 5, 10):
        result = decompose(weight, rank=rank, refine=n)
        actual = float((compose(*result.factors) - weight).norm() / weight.norm())
        assert abs(result.relative_error - actual) < 1e-12
        assert result.relative_error <= previous + 1e-14
        previous = result.relative_error
        _canonical_checks(result, weight, 1)
        r_out, r_in = result.ranks
        assert result.relative_error <= _numpy_hooi(w, r_out, r_in, n) + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_refinement_reaches_converged_hooi_on_structured_kernels(seed):
    w = _low_rank_plus_noise((48, 40, 3, 3), 10, 0.5, seed)
    weight = torch.as_tensor(w, device=default_device())  # the test's device
    one_pass = decompose(weight, rank=8)
    refined = decompose(weight, rank=8, refine=50)
    converged = _numpy_hooi(w, 8, 8, 300)
    assert refined.relative_error <= converged + 1e-9
    assert refined.relative_error < one_pass.relative_error


def _same(a, b):
    return (a.ranks == b.ranks and a.relative_error == b.relative_error
            and all(torch.equal(x, y) for x, y in zip(a.factors, b.factors)))


def test_refinement_is_a_no_op_where_the_one_pass_is_optimal():
    weight = torch.randn(12, 10, 3, 3, dtype=torch.float64)
    for rank in (None, (12, 4), (5, 10)):  # full rank, or one factor square
        assert _same(decompose(weight, rank=rank, refine=5), decompose(weight, rank=rank))
    pointwise = torch.randn(12, 10, 1, 1, dtype=torch.float64)
    assert _same(decompose(pointwise, rank=4, refine=5), decompose(pointwise, rank=4))


def test_refinement_with_groups_and_energy():
    weight = torch.randn(16, 6, 3, 3, dtype=torch.float64)
    for kwargs in (dict(rank=(4, 3)), dict(energy=0.7)):
        base = decompose(weight, 2, **kwargs)
        refined = decompose(weight, 2, refine=5, **kwargs)
        assert refined.ranks == base.ranks
        assert refined.relative_error <= base.relative_error + 1e-14
        _canonical_checks(refined, weight, 2)


# ------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("shape", [(64, 32, (3, 3), (64, 32), 1), (64, 32, (3, 3), (8, 4), 1),
                                   (12, 6, (1, 1), (6, 6), 2), (16, 16, (3, 2), (16, 16), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_factors_are_canonical_with_conv2d_variance(shape, dtype):
    out_g, in_g, kernel, ranks, groups = shape
    U, S, core, V = random_factors(out_g, in_g, kernel, ranks, groups, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    r_out = ranks[0]
    rows = core.reshape(groups, r_out, -1).transpose(1, 2).reshape(-1, r_out)
    assert max(orthonormality_error(U, groups), orthonormality_error(V, groups),
               orthonormality_error(rows, groups)) < tol
    weight = compose(U, S, core, V, groups).double()
    # Canonical: S are the singular values of the output unfolding.
    expected = np.linalg.svd(_unfold_out(weight, groups).cpu().numpy(), compute_uv=False)[:, :r_out]
    np.testing.assert_allclose(S.double().reshape(groups, -1).cpu().numpy(), expected, rtol=10 * tol)
    # Mean square exactly 1 / (3 fan_in) (nn.Conv2d's kaiming_uniform_(a=sqrt(5))) at every rank.
    fan_in = in_g * kernel[0] * kernel[1]
    assert abs(float(weight.pow(2).mean()) * 3 * fan_in - 1) < 10 * tol


def test_random_factors_entries_are_centred_and_isotropic():
    # Averaged over draws: zero mean, the same variance at every tap and channel, no
    # correlation between taps (what makes the output variance match nn.Conv2d's).
    draws = torch.stack([compose(*random_factors(16, 8, (3, 3), (16, 8), dtype=torch.float64)) for _ in range(400)])
    fan_in = 8 * 9
    scaled = draws * math.sqrt(3 * fan_in)  # unit variance
    assert float(scaled.mean().abs()) < 4 / math.sqrt(scaled.numel())
    per_tap = scaled.pow(2).mean(dim=(0, 1, 2)).flatten()
    assert float((per_tap - 1).abs().max()) < 0.05
    taps = scaled.flatten(3).reshape(-1, 9)
    correlation = (taps.T @ taps) / taps.shape[0]
    assert float((correlation - torch.eye(9, dtype=correlation.dtype)).abs().max()) < 0.05


def test_random_factors_in_half_precision():
    U, S, core, V = random_factors(8, 4, (3, 3), (8, 4), dtype=torch.bfloat16)
    assert U.dtype == S.dtype == core.dtype == V.dtype == torch.bfloat16


def test_random_factors_land_on_the_default_device_like_torch_factories():
    """No ``device=``: torch's default device (``torch.set_default_device`` / a device context),
    as ``torch.randn`` does; an explicit device wins. (The CUDA run found them on the CPU.)"""
    with torch.device("meta"):
        factors = random_factors(4, 3, (3, 3), (2, 2), 1)
        explicit = random_factors(4, 3, (3, 3), (2, 2), 1, device="cpu")
    assert {t.device.type for t in factors} == {"meta"}
    assert {t.device.type for t in explicit} == {"cpu"}


@pytest.mark.parametrize("scale", [1e-300, 1e-170, 1e160, 1e300])
def test_float64_kernels_at_the_ends_of_the_range_decompose_as_at_scale_one(scale):
    """The truncation is scale-free: the same errors, ranks and (scaled) factors at 1e-300 as at
    1 (the squared norm underflowed to 0 below ~1e-165 and the error read 0; ~1e160 overflowed)."""
    weight = seeded_randn(12, 10, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for options in ({"rank": 4}, {"energy": 0.9}, {"rank": (3, 5), "refine": 2}):
        unit, scaled = tt.decompose(weight, **options), tt.decompose(weight * scale, **options)
        assert scaled.ranks == unit.ranks
        assert scaled.relative_error == pytest.approx(unit.relative_error, rel=1e-12)
        composed = tt.compose(*scaled.factors)
        assert torch.isfinite(composed).all()
        assert torch.allclose(composed / scale, tt.compose(*unit.factors), rtol=0, atol=1e-12)
        truth = float((weight - composed / scale).norm() / weight.norm())
        assert scaled.relative_error == pytest.approx(truth, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factors_report_the_error_of_their_rounding(dtype):
    """At full rank the truncation discards nothing, but the factors' rounding to 10 or 7 mantissa
    bits moves the kernel by ~1e-3: the reported error is that of the factors returned,
    recomputed here with numpy from the factors themselves."""
    weight = seeded_randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    result = tt.decompose(weight)
    U, S, core, V = (f.double().cpu().numpy() for f in result.factors)
    composed = np.einsum("oa,a,abhw,ib->oihw", U, S, core, V)
    reference = weight.double().cpu().numpy()
    truth = np.linalg.norm(composed - reference) / np.linalg.norm(reference)
    assert 1e-5 < truth < 1e-2
    assert result.relative_error == pytest.approx(truth, rel=1e-9)
    assert tt.decompose(weight.float()).relative_error == 0.0  # float32: the float64 truncation's (none)
