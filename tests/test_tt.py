"""TT factor math: exact and truncated decompositions, canonical form, rank rules."""

import numpy as np
import pytest
import torch

from ttconv.tt import canonicalize, compose, decompose, orthonormality_error, orthonormal_core, resolve_ranks

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
    expected = np.linalg.svd(_unfold_out(weight, groups).numpy(), compute_uv=False)
    np.testing.assert_allclose(S.reshape(groups, -1).numpy(), expected[:, : S.numel() // groups], atol=1e-12)


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
    sv_in = np.linalg.svd(_unfold_in(weight, groups).numpy(), compute_uv=False)
    V = result.factors.V.reshape(groups, c_in, r_in)
    projected = torch.einsum("goihw,gib->gobhw", weight.reshape(groups, -1, c_in, kh, kw), V)
    sv_out = np.linalg.svd(projected.reshape(groups, c_out // groups, -1).numpy(), compute_uv=False)
    optimal = np.sqrt((sv_in[:, r_in:] ** 2).sum() + (sv_out[:, r_out:] ** 2).sum()) / float(weight.norm())
    assert abs(result.relative_error - optimal) < 1e-12


def test_energy_picks_smallest_ranks_reaching_the_threshold():
    torch.manual_seed(1)
    # A kernel with a decaying spectrum along both unfoldings.
    weight = torch.einsum(
        "oa,a,abhw,ib->oihw", torch.randn(12, 12), torch.logspace(0, -3, 12), torch.randn(12, 12, 3, 3),
        torch.randn(10, 12) * torch.logspace(0, -2, 12),
    )
    for energy in (0.5, 0.9, 0.99, 1.0):
        result = decompose(weight.double(), energy=energy)
        r_out, r_in = result.ranks
        sv_in = torch.linalg.svdvals(_unfold_in(weight.double(), 1))[0]
        kept = (sv_in[:r_in] ** 2).sum() / (sv_in**2).sum()
        assert kept >= energy - 1e-12
        if r_in > 1:
            assert (sv_in[: r_in - 1] ** 2).sum() / (sv_in**2).sum() < energy
        assert result.relative_error <= np.sqrt(2 * (1 - energy)) + 1e-12


def test_canonicalize_restores_form_without_changing_kernel():
    groups = 2
    result = decompose(torch.randn(6, 3, 3, 3, dtype=torch.float64), groups, rank=(2, 2))
    U, S, core, V = (t + 0.2 * torch.randn_like(t) for t in result.factors)
    before = compose(U, S, core, V, groups)
    U2, S2, core2, V2 = canonicalize(U, S, core, V, groups)
    assert float((compose(U2, S2, core2, V2, groups) - before).abs().max()) < 1e-13
    assert orthonormality_error(U2, groups) < 1e-13 and orthonormality_error(V2, groups) < 1e-13
    expected = np.linalg.svd(_unfold_out(before, groups).numpy(), compute_uv=False)[:, :2]
    np.testing.assert_allclose(S2.reshape(groups, 2).numpy(), expected, atol=1e-12)


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
