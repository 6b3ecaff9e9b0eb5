"""Exact circular spectra of dense kernels and of SVDConv, against the dense oracle."""

import pytest
import torch
import torch.nn.functional as F

from configs import config_id, random_conv_configs
from oracle import circular_singular_values, layer_operator, operator_matrix, seeded_randn
from ttconv import SVDConv, SVDConv1d, SVDConv3d, SVDConvTranspose2d, conv_singular_values, conv_spectral_norm

CONFIGS = random_conv_configs(240, seed=1)
TOL = 1e-10  # float64, relative to the largest singular value


def _assert_spectra_equal(got, expected):
    assert got.shape == expected.shape
    scale = max(1.0, float(expected[0]))
    assert float((got - expected).abs().max()) <= TOL * scale


def _random_layer(config):
    layer = SVDConv(**config["conv"], rank=config["rank"], dtype=torch.float64)
    with torch.no_grad():
        # Leave the canonical form: U, V no longer orthonormal, S unsorted and signed.
        for p in (layer.U, layer.S, layer.core, layer.V):
            p.add_(0.3 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_layer_spectrum_matches_oracle(config):
    layer = _random_layer(config)
    c = config["conv"]
    weight = layer.dense_weight().detach()
    expected = circular_singular_values(weight, config["n"], c["stride"], c["dilation"], c["groups"])
    _assert_spectra_equal(layer.singular_values(config["n"]).detach(), expected)
    dense = conv_singular_values(weight, config["n"], stride=c["stride"], dilation=c["dilation"], groups=c["groups"])
    _assert_spectra_equal(dense, expected)


@pytest.mark.parametrize("config", CONFIGS[:60], ids=config_id)
def test_theorem_layer_and_core_share_nonzero_singular_values(config):
    """math.md theorem on the *real* operator (own padding mode): A_W = (U x I) A_C (V^T x I)."""
    layer = SVDConv(**config["conv"], rank=config["rank"], dtype=torch.float64)
    c = config["conv"]
    n = config["n"]
    core_conv = SVDConv(
        layer.ranks[1] * c["groups"], layer.ranks[0] * c["groups"], c["kernel_size"], c["stride"],
        c["padding"], c["dilation"], c["groups"], False, c["padding_mode"], dtype=torch.float64,
    ).to_conv2d()
    with torch.no_grad():
        core_conv.weight.copy_(layer.S[:, None, None, None] * layer.core)
    full = torch.linalg.svdvals(operator_matrix(layer_operator(layer), (c["in_channels"], *n)))
    small = torch.linalg.svdvals(operator_matrix(core_conv, (core_conv.in_channels, *n)))
    k = small.numel()
    assert float((full[:k] - small).abs().max()) <= TOL * max(1.0, float(full[0]))
    assert float(F.pad(full[k:], (0, 1)).abs().max()) <= TOL * max(1.0, float(full[0]))  # the rest are zeros


def test_identity_kernel_has_flat_spectrum():
    weight = torch.zeros(3, 3, 3, 3, dtype=torch.float64)
    weight[:, :, 1, 1] = 2.0 * torch.eye(3)
    values = conv_singular_values(weight, (5, 4))
    assert values.shape == (3 * 5 * 4,)
    assert torch.allclose(values, torch.full_like(values, 2.0))


def test_spectrum_is_sorted_descending_and_norm_is_first():
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    values = conv_singular_values(weight, 6, stride=2)
    assert torch.all(values[:-1] >= values[1:])
    assert conv_spectral_norm(weight, 6, stride=2) == values[0]


@pytest.mark.parametrize("n", [(5, 5), (6, 7), (7, 6), (1 + 2, 9), (6, 8), (4, 4)])
def test_odd_and_even_sizes_restore_conjugate_frequencies(n):
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    _assert_spectra_equal(conv_singular_values(weight, n), circular_singular_values(weight, n))


def test_float32_kernels_give_float32_spectra_close_to_float64():
    weight = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    exact = conv_singular_values(weight, 8)
    single = conv_singular_values(weight.float(), 8)
    assert single.dtype == torch.float32
    assert float((single.double() - exact).abs().max()) <= 1e-5 * float(exact[0])


def test_half_precision_kernels_are_computed_in_float32():
    weight = torch.randn(4, 4, 3, 3)
    assert conv_singular_values(weight.to(torch.bfloat16), 6).dtype == torch.float32
    layer = SVDConv(4, 4, 3, dtype=torch.bfloat16)
    assert layer.singular_values(6).dtype == torch.float32


def test_spectral_norm_is_differentiable():
    layer = SVDConv(4, 6, 3, rank=3, dtype=torch.float64)
    layer.spectral_norm(6).backward()
    for p in (layer.U, layer.S, layer.core, layer.V):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert float(layer.S.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_size=(7, 8), stride=2), "not divisible by stride"),
        (dict(input_size="8"), "input_size must be"),
        (dict(input_size=(0, 8)), "input_size must be >= 1"),
    ],
)
def test_bad_input_sizes_raise(kwargs, match):
    weight = torch.randn(2, 2, 3, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        conv_singular_values(weight, **kwargs)


def test_inputs_smaller_than_the_kernel_fold_instead_of_raising():
    """Sizes below the (dilated) kernel extent are legal: the kernel folds modulo n
    (tests/test_spectra_fast_paths.py checks the values against a tiled oracle)."""
    weight = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    assert conv_singular_values(weight, (2, 8)).shape == (2 * 8 * 2,)
    assert conv_singular_values(weight, (5, 5), dilation=3).shape == (5 * 5 * 2,)


def test_layer_bad_input_sizes_raise():
    layer = SVDConv(2, 2, 3, stride=2)
    with pytest.raises(ValueError, match="not divisible by stride"):
        layer.singular_values((7, 8))


@pytest.mark.parametrize("cls, kernel, size", [(SVDConv, 5, (2, 3)), (SVDConv1d, 5, (3,)), (SVDConv3d, 3, (2, 1, 2)),
                                               (SVDConvTranspose2d, 4, (1, 2))])
def test_layer_spectrum_below_the_kernel_size_is_the_folded_dense_spectrum(cls, kernel, size):
    """Below the kernel extent the circular operator folds the kernel modulo the size, for the
    SVD layers as for dense kernels (the same values as conv_singular_values of the composed
    kernel; the folding itself is oracle-tested in test_spectra_fast_paths.py)."""
    torch.manual_seed(0)
    layer = cls(3, 4, kernel, rank=2, dtype=torch.float64)
    stride = tuple(layer.stride)
    grid = tuple(n * s for n, s in zip(size, stride)) if cls is SVDConvTranspose2d else size
    expected = conv_singular_values(layer.weight.detach(), grid, stride=stride, dilation=layer.dilation,
                                    groups=layer.groups)
    torch.testing.assert_close(layer.singular_values(size), expected, rtol=0, atol=1e-12)


def test_bad_weights_raise():
    with pytest.raises(ValueError, match="3-D, 4-D or 5-D"):  # 1-D and 3-D kernels are fine
        conv_singular_values(torch.randn(3, 3), 8)
    with pytest.raises(ValueError, match="3-D, 4-D or 5-D"):
        conv_singular_values(torch.randn(1, 1, 1, 1, 1, 1), 8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        conv_singular_values(torch.full((1, 1, 2), float("inf")), 8)
    with pytest.raises(TypeError, match="input_size must be an int or a tuple of 3 ints"):
        conv_singular_values(torch.randn(1, 1, 2, 2, 2), (8, 8))
    weight = torch.randn(2, 2, 3, 3)
    weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        conv_singular_values(weight, 8)
    with pytest.raises(ValueError, match="groups"):
        conv_singular_values(torch.randn(3, 2, 3, 3), 8, groups=2)


def test_spectra_stream_over_frequency_batches_within_max_memory():
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    n = (9, 8)
    reference = circular_singular_values(weight, n)
    # Room for one frequency's 5 x 4 matrices at a time: 72 batches instead of one.
    tiny = 4 * 5 * 4 * 16 + 9 * 16 + reference.numel() * (3 * 8 + 8)
    _assert_spectra_equal(conv_singular_values(weight, n, max_memory=tiny), reference)
    assert float(conv_spectral_norm(weight, n, max_memory=4 * 5 * 4 * 16 + 9 * 16)) == pytest.approx(
        float(reference[0]), rel=1e-12)


def test_full_spectrum_beyond_max_memory_is_refused_but_the_norm_streams():
    from ttconv.spectra import MemoryLimitError

    weight = torch.randn(8, 8, 3, 3)
    with pytest.raises(MemoryLimitError, match="conv_spectral_norm"):
        conv_singular_values(weight, 64, max_memory=100_000)
    norm = conv_spectral_norm(weight, 64, max_memory=100_000)
    assert float(norm) == pytest.approx(float(conv_singular_values(weight, 64)[0]), rel=1e-6)
    with pytest.raises(MemoryLimitError, match="one frequency"):
        conv_spectral_norm(weight, 64, max_memory=1000)
    with pytest.raises(ValueError, match="max_memory must be a positive int"):
        conv_spectral_norm(weight, 64, max_memory=-1)
    for bad in ("1GB", True, 1.5):  # a wrong type is a TypeError, as everywhere else
        with pytest.raises(TypeError, match="max_memory must be a positive int"):
            conv_spectral_norm(weight, 64, max_memory=bad)


def test_complex_and_empty_kernels_are_refused_not_cast():
    """A complex kernel lost its imaginary part in the casts (0.977 for a true norm of 1.718,
    the real part's); an empty one failed inside torch. Both are refused by name."""
    complex_weight = torch.randn(3, 2, 3, 3, dtype=torch.complex128)
    for call in (conv_spectral_norm, conv_singular_values):
        with pytest.raises(TypeError, match="weight must be a real floating-point tensor, got torch.complex128"):
            call(complex_weight, 5)
        with pytest.raises(ValueError, match="weight is empty"):
            call(torch.zeros(4, 2, 0, 3), 5)
        with pytest.raises(TypeError, match="weight must be a torch.Tensor .* got list"):
            call([[1.0]], 5)


@torch.no_grad()
def test_certifying_values_are_decomposed_in_float64():
    """The norms that certify something (control scales by them, reports print them as exact)
    come from a float64 SVD of the float32 matrices: float32 SVD backends differ (cuSOLVER's
    float32 SVD was 8e-6 relative off on an H200 where LAPACK's is ~1e-7). Bit for bit: the
    float64 value rounded to float32, for real and complex batches; and the no-grad norm of a
    float32 kernel (frequency route and single-tap route) equals the float64 norm to float32
    rounding of the FFT."""
    from ttconv.spectra import certified_batch_max, largest_singular_values

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.complex64):
        matrices = seeded_randn(40, 24, 17, generator=generator, dtype=dtype)
        wide = torch.complex128 if dtype.is_complex else torch.float64
        expected = torch.linalg.svdvals(matrices.to(wide))[..., 0].float()
        got = largest_singular_values(matrices)
        assert got.dtype == torch.float32 and torch.equal(got, expected)
        assert torch.equal(certified_batch_max(matrices, None), expected.max())
    for shape in ((6, 5, 3, 3), (6, 5, 1, 1)):
        weight = seeded_randn(*shape, generator=generator)
        value = conv_spectral_norm(weight, (8, 8))
        reference = conv_spectral_norm(weight.double(), (8, 8))
        assert value.dtype == torch.float32 and float(value) == pytest.approx(float(reference), rel=3e-7)
