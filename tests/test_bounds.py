"""Bounds: every upper bound >= the oracle, the exact method = oracle, estimates <= oracle."""

import pytest
import torch
from torch import nn

from configs import config_id, random_conv_configs
from oracle import circular_singular_values, layer_operator, operator_matrix
from ttconv import SVDConv
from ttconv.bounds import (
    _frobenius,
    conv_spec,
    exact_spectral_norm,
    fantastic_four_bound,
    fantastic_four_reshape_bounds,
    gram_iteration_bound,
    operator_norm_bound,
    padding_factor,
    power_iteration_estimate,
    spatial_gram_bound,
)
from ttconv.spectra import MemoryLimitError

CONFIGS = random_conv_configs(220, seed=3)
SAFE = 1 - 1e-12  # float64 round-off allowance for "bound >= exact"


def _make(config, index):
    """Alternate dense convs and SVDConvs (with U, V off the orthonormal manifold)."""
    if index % 2:
        return nn.Conv2d(**config["conv"], dtype=torch.float64)
    layer = SVDConv(**config["conv"], rank=config["rank"], dtype=torch.float64)
    with torch.no_grad():
        layer.U.add_(0.2 * torch.randn_like(layer.U))
        layer.V.add_(0.2 * torch.randn_like(layer.V))
    return layer


def _dense_weight(layer):
    return (layer.dense_weight() if isinstance(layer, SVDConv) else layer.weight).detach()


@pytest.mark.parametrize("index, config", list(enumerate(CONFIGS)), ids=[config_id(c) for c in CONFIGS])
@torch.no_grad()  # values only: the bounds are differentiable tensors (float() of one warns)
def test_bounds_against_oracle(index, config):
    layer = _make(config, index)
    c, n = config["conv"], config["n"]
    weight = _dense_weight(layer)
    circular = float(circular_singular_values(weight, n, c["stride"], c["dilation"], c["groups"])[0])
    real = float(torch.linalg.svdvals(operator_matrix(layer_operator(layer), (c["in_channels"], *n)))[0])

    exact = float(exact_spectral_norm(layer, n).detach())
    assert abs(exact - circular) <= 1e-8 * max(1.0, circular)

    grams = [float(gram_iteration_bound(layer, n, n_iter=t)) for t in (1, 2, 3, 5, 12)]
    assert all(g >= circular * SAFE for g in grams)
    assert all(a >= b * SAFE for a, b in zip(grams, grams[1:]))  # decreasing in t
    # Converging: a top singular value of multiplicity k leaves a factor k^(2^-t).
    assert grams[-1] <= circular * (1 + 1e-3) + 1e-12

    ff = float(fantastic_four_bound(layer))
    zero_bound = float(spatial_gram_bound(layer, n_iter=2))
    for bound in (ff, zero_bound):
        assert bound >= circular * SAFE
        if c["padding_mode"] == "zeros":
            assert bound >= real * SAFE

    assert float(operator_norm_bound(layer, n)) >= real * SAFE  # any padding mode
    assert float(power_iteration_estimate(layer, n, n_iter=30)) <= real * (1 + 1e-10)


@pytest.mark.parametrize("config", CONFIGS[:40], ids=config_id)
@torch.no_grad()
def test_svdconv_core_gives_the_dense_value(config):
    layer = _make(config, 0)
    dense = layer.to_conv2d()
    n = config["n"]
    for method in (exact_spectral_norm, gram_iteration_bound):
        assert abs(float(method(layer, n)) - float(method(dense, n))) <= 1e-10 * max(1.0, float(method(dense, n)))
    assert torch.allclose(fantastic_four_reshape_bounds(layer), fantastic_four_reshape_bounds(dense), rtol=1e-10, atol=1e-12)


@torch.no_grad()
def test_power_iteration_converges_to_the_real_norm():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", dtype=torch.float64)
    real = float(torch.linalg.svdvals(operator_matrix(layer_operator(conv), (3, 6, 6)))[0])
    estimate = float(power_iteration_estimate(conv, 6, n_iter=2000))
    assert real * (1 - 1e-6) <= estimate <= real * (1 + 1e-12)


@torch.no_grad()
def test_operator_norm_bound_is_exact_for_size_preserving_circular_conv():
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular", dtype=torch.float64)
    real = float(torch.linalg.svdvals(operator_matrix(layer_operator(conv), (3, 7, 7)))[0])
    assert abs(float(operator_norm_bound(conv, 7)) - real) < 1e-10


@torch.no_grad()
def test_fantastic_four_power_method_approaches_exact_values_with_persistent_state():
    weight = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    exact = fantastic_four_reshape_bounds(weight)
    state = {}
    first = fantastic_four_reshape_bounds(weight, method="power", n_iter=1, state=state)
    for _ in range(100):
        later = fantastic_four_reshape_bounds(weight, method="power", n_iter=1, state=state)
    assert torch.all(first <= exact * (1 + 1e-12))
    assert torch.allclose(later, exact, rtol=1e-6)
    assert set(state) == {"R", "S", "T", "U"}


@pytest.mark.parametrize("method", ["exact", "power"])
def test_fantastic_four_bound_is_a_working_regularizer(method):
    layer = SVDConv(8, 8, 3, padding=1, rank=4)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    state = {}
    start = fantastic_four_bound(layer, method=method, state=state).item()
    for _ in range(20):
        loss = fantastic_four_bound(layer, method=method, state=state)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fantastic_four_bound(layer).item() < 0.8 * start


def test_gram_bound_is_differentiable():
    weight = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    gram_iteration_bound(weight, 8, n_iter=4).backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


@torch.no_grad()
def test_gram_bound_does_not_overflow():
    weight = 1e30 * torch.randn(4, 4, 3, 3, dtype=torch.float64)
    bound = gram_iteration_bound(weight, 8, n_iter=10)
    exact = exact_spectral_norm(weight, 8)
    # Ten Gram iterations reach the exact norm: the two meet up to float64 rounding of either
    # side (CUDA's SVD put `exact` 1 ulp above the bound).
    assert torch.isfinite(bound) and exact * (1 - 1e-12) <= bound <= exact * (1 + 1e-9)


@torch.no_grad()
def test_grouped_norm_is_the_max_over_groups():
    weight = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    parts = [exact_spectral_norm(weight[2 * g: 2 * g + 2], 6) for g in range(3)]
    assert torch.isclose(exact_spectral_norm(weight, 6, groups=3), max(parts))


def _real_norm(conv, n):
    return float(torch.linalg.matrix_norm(operator_matrix(layer_operator(conv), (conv.in_channels, *n)), 2))


@torch.no_grad()
def test_strided_circular_conv_on_a_size_the_stride_does_not_divide():
    # Issue 10.1: rounding 5 up to 6 changed the operator (true 0.863, old "bound" 0.640).
    torch.manual_seed(1)
    low = []
    for _ in range(20):
        conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="circular", bias=False, dtype=torch.float64)
        real = _real_norm(conv, (5, 5))
        bound = float(operator_norm_bound(conv, 5))
        low.append(bound < real * (1 - 1e-12))
        # The row-selection argument: the stride-1 circular norm on n = 5 bounds it, and
        # the operator bound is never looser than that value.
        assert bound <= float(exact_spectral_norm(conv.weight, 5)) * (1 + 1e-12)
    assert not any(low)


@torch.no_grad()
def test_circular_padding_beyond_half_the_kernel_repeats_rows():
    # Issue 10.2: all-ones 3x3 with circular padding 2: true 12.7-15 (n = 3..8), old bounds 9.0.
    conv = nn.Conv2d(1, 1, 3, padding=2, padding_mode="circular", bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    real = _real_norm(conv, (5, 5))
    assert abs(real - 13.1496) < 1e-4  # n = 5
    # Output 7 rows per axis from 5 distinct circular rows: each repeated at most twice,
    # so sqrt(2 * 2) times the circular norm 9.
    assert float(operator_norm_bound(conv, 5)) == pytest.approx(18.0, rel=1e-12)
    # Size independent: the worst case over sizes the layer accepts (n >= 2 per axis).
    # Tight at n = 2: the bound equals the truth up to float64 rounding of the oracle's SVD
    # (CUDA's came out 18 + 7e-15), hence 1e-12.
    for bound in (fantastic_four_bound(conv), spatial_gram_bound(conv)):
        assert float(bound) >= max(_real_norm(conv, (n, n)) for n in range(2, 9)) * (1 - 1e-12)
    # Worst size n = 2: 4 outputs per axis from 2 circular rows, 2 repeats per axis.
    assert float(fantastic_four_bound(conv)) == pytest.approx(9.0 * 2.0, rel=1e-12)


@torch.no_grad()
def test_padding_factor_counts_repeats_and_copies():
    def factor(n=None, **conv):
        layer = nn.Conv2d(1, 1, bias=False, **conv)
        return padding_factor(conv_spec(layer), n)

    assert factor(kernel_size=3, padding=1, padding_mode="circular") == 1.0  # size preserving
    assert factor(kernel_size=3, padding=5) == 1.0  # zeros: a crop of the full convolution
    # replicate: pixel 0 is copied `padding` extra times per axis (worst at n = 1: both sides).
    assert factor((8, 8), kernel_size=3, padding=2, padding_mode="replicate") == pytest.approx(3.0)
    assert factor(kernel_size=3, padding=2, padding_mode="replicate") == pytest.approx(5.0)
    # reflect pad 1 on n = 8: pixels 1 and 6 appear twice.
    assert factor((8, 8), kernel_size=3, padding=1, padding_mode="reflect") == pytest.approx(2.0)
    # circular pad 2, 3x3, n = 8: 10 outputs from 8 rows.
    assert factor((8, 8), kernel_size=3, padding=2, padding_mode="circular") == pytest.approx(2.0)


def test_padding_factor_takes_any_conv_and_refuses_sizes_the_layer_refuses():
    """As the other bounds: a torch conv or an SVD layer is accepted (AttributeError before), a size
    torch refuses for the layer is refused (circular pad 2 on n = 1 gave 3.0, above the 2.0 it
    gives as the worst case over every accepted size), and the size is validated in every mode."""
    circular = nn.Conv2d(4, 4, 3, padding=2, padding_mode="circular")
    assert padding_factor(circular, 8) == padding_factor(conv_spec(circular), 8) == pytest.approx(2.0)
    assert padding_factor(SVDConv.from_conv(circular), 8) == pytest.approx(2.0)
    assert padding_factor(circular) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="input_size"):
        padding_factor(circular, 1)
    with pytest.raises(ValueError, match="input_size"):
        padding_factor(nn.Conv2d(4, 4, 3, padding=2, padding_mode="reflect"), 2)
    for bad in (-3, 1.5, (8, 8, 8)):
        with pytest.raises((TypeError, ValueError), match="input_size"):
            padding_factor(nn.Conv2d(4, 4, 3, padding=1), bad)


@pytest.mark.parametrize("scale", [1e-20, 1e-18, 1e19, 1e20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@torch.no_grad()
def test_extreme_scales_give_finite_values_on_the_right_side(scale, dtype):
    # Issue 10.3: power estimate 1.46x too high at 1e-18, NaN at 1e19 (float32).
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.mul_(scale)
    conv = conv.to(dtype)
    real = _real_norm(conv.double(), (8, 8))
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    estimate = float(power_iteration_estimate(conv, 8, n_iter=200))
    assert real * 0.99 <= estimate <= real * (1 + 1e-12)
    for bound in (exact_spectral_norm(conv, 8), operator_norm_bound(conv, 8), gram_iteration_bound(conv, 8)):
        assert float(bound) == pytest.approx(real, rel=2e-3)
        assert float(bound) >= real * (1 - tol)
    for bound in (fantastic_four_bound(conv), spatial_gram_bound(conv)):
        assert real * (1 - tol) <= float(bound) <= 3 * real


@torch.no_grad()
def test_dilated_bounds_use_the_undilated_kernel():
    # A dilated conv is a direct sum of undilated ones on interleaved sub-grids.
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    for bound in (fantastic_four_bound, spatial_gram_bound):
        assert float(bound(weight, dilation=2)) == pytest.approx(float(bound(weight)), rel=1e-12)
    conv = nn.Conv2d(2, 3, 3, dilation=2, padding=2, bias=False, dtype=torch.float64)
    assert float(fantastic_four_bound(conv)) >= _real_norm(conv, (9, 9))


@torch.no_grad()
def test_spatial_gram_bound_chunks_within_max_memory():
    weight = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    # One step's Gram kernel is 16 x 16 x 5 x 5 (51 KB); its im2col is computed row by row.
    chunked = spatial_gram_bound(weight, n_iter=1, max_memory=60_000)
    assert float(chunked) == pytest.approx(float(spatial_gram_bound(weight, n_iter=1)), rel=1e-12)
    with pytest.raises(MemoryLimitError, match="16 x 16 x 9 x 9.*max_memory"):
        spatial_gram_bound(weight, n_iter=2, max_memory=60_000)


@torch.no_grad()
def test_gram_bound_streams_within_max_memory():
    weight = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    small = gram_iteration_bound(weight, 12, n_iter=3, max_memory=6 * 6 * 5 * 16 * 3)
    assert float(small) == pytest.approx(float(gram_iteration_bound(weight, 12, n_iter=3)), rel=1e-12)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fantastic_four_bound(torch.randn(3, 3)), ValueError, "3-D, 4-D or 5-D"),  # 3-D is a Conv1d kernel
        (lambda: gram_iteration_bound(torch.full((2, 2, 3, 3), float("nan")), 8), ValueError, "NaN or Inf"),
        (lambda: spatial_gram_bound(torch.full((2, 2, 3, 3), float("inf"))), ValueError, "NaN or Inf"),
        (lambda: exact_spectral_norm(torch.randn(2, 2, 3, 3), 7, stride=2), ValueError, "not divisible by stride"),
        (lambda: gram_iteration_bound(nn.Conv2d(2, 2, 3, stride=2), (8, 7)), ValueError, "not divisible by stride"),
        (lambda: spatial_gram_bound(torch.randn(2, 2, 3, 3), n_iter=7), ValueError, r"n_iter must be an int in \[1, 6\]"),
        (lambda: fantastic_four_bound(torch.randn(2, 2, 3, 3), method="svd"), ValueError, "method must be"),
        (lambda: fantastic_four_bound("conv"), TypeError, "weight must be a Tensor"),
        (lambda: operator_norm_bound(nn.Conv2d(2, 2, 5), 3), ValueError, "too small"),
        (lambda: power_iteration_estimate(torch.randn(2, 2, 3, 3), 6, n_iter=0), ValueError, "n_iter"),
        (lambda: operator_norm_bound(nn.Conv2d(2, 2, 3, padding=3, padding_mode="circular"), 2), ValueError,
         "circular padding"),
        (lambda: power_iteration_estimate(nn.Conv2d(2, 2, 3, padding=2, padding_mode="reflect"), 2), ValueError,
         "reflect padding"),
        (lambda: gram_iteration_bound(torch.randn(2, 2, 3, 3), 8, max_memory=0), ValueError, "max_memory"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
def test_gram_iterations_frobenius_norm_is_torchs_with_its_gradient(dtype):
    """The Gram iteration's Frobenius norm (complex: over the real view, for speed) equals
    ``torch.linalg.matrix_norm(., "fro")``, on lazily conjugated views (``.mH``) too, with
    the same gradient, 0 on an all-zero matrix."""
    torch.manual_seed(0)
    matrices = torch.randn(5, 3, 4, dtype=dtype)
    matrices[2] = 0
    for view in (lambda m: m, lambda m: m.mH, lambda m: m[:, ::2, 1:]):
        ours_input = matrices.clone().requires_grad_(True)
        torchs_input = matrices.clone().requires_grad_(True)
        ours, torchs = _frobenius(view(ours_input)), torch.linalg.matrix_norm(view(torchs_input), ord="fro")
        assert ours.dtype == torchs.dtype and ours.shape == torchs.shape == (5,)
        torch.testing.assert_close(ours, torchs, rtol=1e-6 if dtype in (torch.float32, torch.complex64) else 1e-14,
                                   atol=0)
        weights = torch.arange(1.0, 6.0, dtype=ours.dtype)
        (ours * weights).sum().backward()
        (torchs * weights).sum().backward()
        torch.testing.assert_close(ours_input.grad, torchs_input.grad)
        assert ours_input.grad[2].abs().max() == 0
