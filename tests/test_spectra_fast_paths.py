"""Single-tap (1x1) fast paths and inputs smaller than the kernel, against explicit operators.

Truths are float64 matrices built by applying the map to basis images: the layer's own
operator (``oracle.layer_operator``) and the circular convolution on any size
(``circular_oracle``: the input is tiled, so no folding of ttconv's is involved). A
1x1 conv's circular spectrum is its matrix's singular values, each ``m1 m2`` times; its
own operator (any padding) has norm ``||W|| sqrt(c)`` (docs/math.md). Tolerance: 1e-10
relative to the largest value (the oracle's own round-off is ~1e-15).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

import ttconv
from circular_oracle import circular_singular_values_any_size
from configs import PADDING_MODES
from oracle import circular_singular_values, layer_operator, operator_matrix
from ttconv import SVDConv, bounds, conv_singular_values, conv_spectral_norm, spectra
from ttconv.bounds import (
    exact_spectral_norm,
    fantastic_four_bound,
    fantastic_four_reshape_bounds,
    gram_iteration_bound,
    operator_norm_bound,
    spatial_gram_bound,
)
from ttconv.spectra import check_spectral_input_size, fold_kernel

TOL = 1e-10


def _close(got, expected):
    assert got.shape == expected.shape, (got.shape, expected.shape)
    scale = max(1e-300, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= TOL * scale, float((got - expected).abs().max()) / scale


# ------------------------------------------------------------------ 1x1, circular spectrum
def _one_by_one_configs(count: int, seed: int):
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        groups = rng.choice([1, 1, 2, 3])
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        n = tuple(s * rng.randint(1, 4) for s in stride)  # the circular operator needs s | n
        c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 4)
        if c_in * n[0] * n[1] > 200:
            continue
        configs.append(dict(c_in=c_in, c_out=c_out, groups=groups, stride=stride, n=n,
                            dilation=(rng.randint(1, 3), rng.randint(1, 3))))
    return configs


ONE_BY_ONE = _one_by_one_configs(80, seed=14)


@pytest.mark.parametrize("index", range(len(ONE_BY_ONE)))
def test_one_by_one_circular_spectrum_matches_oracle(index):
    c = ONE_BY_ONE[index]
    weight = torch.randn(c["c_out"], c["c_in"] // c["groups"], 1, 1, dtype=torch.float64)
    geometry = dict(stride=c["stride"], dilation=c["dilation"], groups=c["groups"])
    expected = circular_singular_values(weight, c["n"], c["stride"], c["dilation"], c["groups"])
    _close(conv_singular_values(weight, c["n"], **geometry), expected)
    _close(conv_spectral_norm(weight, c["n"], **geometry), expected[0])
    _close(exact_spectral_norm(weight, c["n"], **geometry), expected[0])
    # Gram iteration bounds the circular norm, within rank^(2^-(t+1)) of it.
    gram = float(gram_iteration_bound(weight, c["n"], n_iter=3, **geometry))
    rank = min(c["c_out"], c["c_in"] * c["stride"][0] * c["stride"][1]) // c["groups"]
    assert float(expected[0]) * (1 - TOL) <= gram <= float(expected[0]) * rank ** (1 / 16) * (1 + TOL)


def test_one_by_one_spectrum_is_the_matrix_spectrum_repeated():
    """The statement itself: svdvals(W) each m1 m2 times, plus zeros for a wide polyphase matrix."""
    weight = torch.randn(5, 2, 1, 1, dtype=torch.float64)
    sv = torch.linalg.svdvals(weight[:, :, 0, 0])
    values = conv_singular_values(weight, (6, 4), stride=(2, 1))
    # m = (3, 4): 12 copies of the 2 singular values of W, then 12 x (min(5, 2 * 2) - 2) zeros.
    assert values.shape == (12 * 4,)
    _close(values[:24], sv.repeat_interleave(12))
    assert float(values[24:].abs().max()) <= TOL * float(sv[0])


def test_patch_conv_kernel_equal_to_stride_takes_the_single_tap_path(monkeypatch):
    """A k x k conv with stride k (a patch embedding) has a one-tap polyphase kernel."""
    weight = torch.randn(4, 3, 2, 3, dtype=torch.float64)
    expected = circular_singular_values(weight, (4, 6), (2, 3))
    monkeypatch.setattr(spectra, "transfer_batches", _refuse)
    _close(conv_singular_values(weight, (4, 6), stride=(2, 3)), expected)


def _refuse(*args, **kwargs):
    raise AssertionError("the frequency-batch route was taken")


def test_the_fast_path_is_taken_for_one_by_one(monkeypatch):
    weight = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    n = (8, 6)
    reference = {
        "exact": exact_spectral_norm(weight, n, stride=2),
        "gram": gram_iteration_bound(weight, n, stride=2),
        "operator": operator_norm_bound(weight, n, stride=2, padding=1, padding_mode="reflect"),
        "values": conv_singular_values(weight, n, stride=2),
    }
    monkeypatch.setattr(spectra, "transfer_batches", _refuse)
    monkeypatch.setattr(bounds, "transfer_batches", _refuse)
    assert float(exact_spectral_norm(weight, n, stride=2)) == float(reference["exact"])
    assert float(gram_iteration_bound(weight, n, stride=2)) == float(reference["gram"])
    assert float(operator_norm_bound(weight, n, stride=2, padding=1,
                                     padding_mode="reflect")) == float(reference["operator"])
    assert torch.equal(conv_singular_values(weight, n, stride=2), reference["values"])
    # The patch is effective: a 3x3 kernel does go through the frequency batches.
    with pytest.raises(AssertionError, match="frequency-batch route"):
        conv_spectral_norm(torch.randn(2, 2, 3, 3), 6)
    with pytest.raises(AssertionError, match="frequency-batch route"):
        gram_iteration_bound(torch.randn(2, 2, 3, 3), 6)


def test_one_by_one_gram_fast_path_equals_the_frequency_route(monkeypatch):
    """The single-matrix Gram iteration is the frequency route's value (every frequency is that matrix)."""
    for groups, stride in [(1, 1), (2, 2), (3, (1, 3))]:
        weight = torch.randn(3 * groups, 2, 1, 1, dtype=torch.float64) * 1e5
        fast = gram_iteration_bound(weight, (6, 6), stride=stride, groups=groups, n_iter=4)
        monkeypatch.setattr(bounds, "single_tap_matrices", lambda kernel: None)
        slow = gram_iteration_bound(weight, (6, 6), stride=stride, groups=groups, n_iter=4)
        monkeypatch.undo()
        assert float(fast) == pytest.approx(float(slow), rel=1e-13)


def test_one_by_one_float32_spectrum_is_float32_and_close():
    weight = torch.randn(7, 5, 1, 1, dtype=torch.float64)
    exact = conv_singular_values(weight, 4)
    single = conv_singular_values(weight.float(), 4)
    assert single.dtype == torch.float32
    assert float((single.double() - exact).abs().max()) <= 1e-5 * float(exact[0])


def test_one_by_one_norm_is_differentiable():
    weight = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    conv_spectral_norm(weight, 5).backward()
    u, s, vh = torch.linalg.svd(weight.detach()[:, :, 0, 0])
    _close(weight.grad[:, :, 0, 0], torch.outer(u[:, 0], vh[0]))  # d sigma_max / dW = u1 v1^T


def test_one_by_one_memory_limit_still_refuses_a_spectrum_too_large_to_keep():
    with pytest.raises(spectra.MemoryLimitError, match="conv_spectral_norm"):
        conv_singular_values(torch.randn(8, 8, 1, 1), 64, max_memory=100_000)


# ------------------------------------------------------------ 1x1, the layer's own operator
def _one_by_one_layers(count: int, seed: int):
    rng = random.Random(seed)
    layers = []
    while len(layers) < count:
        mode = rng.choice(PADDING_MODES)
        padding = (rng.randint(0, 2), rng.randint(0, 2))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        n = (rng.randint(1, 7), rng.randint(1, 7))
        if mode == "circular" and any(p > m for p, m in zip(padding, n)):
            continue
        if mode == "reflect" and any(p >= m for p, m in zip(padding, n)):
            continue
        groups = rng.choice([1, 1, 2, 3])
        c_in, c_out = groups * rng.randint(1, 2), groups * rng.randint(1, 3)
        layers.append((dict(in_channels=c_in, out_channels=c_out, kernel_size=1, stride=stride, padding=padding,
                            dilation=rng.randint(1, 3), groups=groups, bias=False, padding_mode=mode), n))
    return layers


ONE_BY_ONE_LAYERS = _one_by_one_layers(200, seed=15)


def test_one_by_one_layer_sweep_covers_what_it_claims():
    convs = [c for c, _ in ONE_BY_ONE_LAYERS]
    assert {c["padding_mode"] for c in convs} == set(PADDING_MODES)
    assert {p for c in convs for p in c["padding"]} == {0, 1, 2}
    assert {s for c in convs for s in c["stride"]} == {1, 2, 3}
    assert any(any(m % s for m, s in zip(n, c["stride"])) for c, n in ONE_BY_ONE_LAYERS)
    assert any(c["groups"] > 1 for c in convs) and any(n[0] != n[1] for _, n in ONE_BY_ONE_LAYERS)


@pytest.mark.parametrize("chunk", range(4))
def test_one_by_one_operator_norm_is_exact_for_every_padding(chunk):
    """operator_norm_bound of a 1x1 layer is its exact norm: checked from both sides."""
    failures = []
    for conv, n in ONE_BY_ONE_LAYERS[chunk::4]:
        layer = nn.Conv2d(**conv, dtype=torch.float64)
        truth = float(torch.linalg.matrix_norm(operator_matrix(layer_operator(layer), (conv["in_channels"], *n)), 2))
        with torch.no_grad():
            got = float(operator_norm_bound(layer, n))
        if abs(got - truth) > TOL * max(truth, 1e-300):
            failures.append(f"{conv} n={n}: {got} != {truth}")
        # The size-independent bounds stay bounds.
        for name, value in [("ff", fantastic_four_bound(layer)), ("spatial_gram", spatial_gram_bound(layer))]:
            if float(value) < truth * (1 - TOL):
                failures.append(f"{conv} n={n}: {name} {float(value)} < {truth}")
    assert not failures, "\n".join(failures[:10])


def test_one_by_one_layer_whose_outputs_all_read_padding_has_norm_zero():
    layer = nn.Conv2d(2, 3, 1, stride=3, padding=2, bias=False, dtype=torch.float64)
    # n = 1: padded row [0, 0, x, 0, 0], outputs read positions 0 and 3.
    truth = float(torch.linalg.matrix_norm(operator_matrix(layer_operator(layer), (2, 1, 1)), 2))
    assert truth == 0.0 and float(operator_norm_bound(layer, 1)) == 0.0


def test_one_by_one_fantastic_four_is_the_matrix_norm_times_padding_factor():
    weight = torch.randn(6, 2, 1, 1, dtype=torch.float64)
    norms = torch.linalg.matrix_norm(weight[:, :, 0, 0].reshape(3, 2, 2), 2)
    _close(fantastic_four_reshape_bounds(weight, groups=3, per_group=True), norms[:, None].repeat(1, 4))
    _close(fantastic_four_reshape_bounds(weight, groups=3), norms.amax().repeat(4))
    replicate = fantastic_four_reshape_bounds(weight, groups=3, padding=1, padding_mode="replicate")
    _close(replicate, bounds.padding_factor(bounds.conv_spec(weight, padding=1, padding_mode="replicate"))
           * norms.amax().repeat(4))
    power = fantastic_four_reshape_bounds(weight, groups=3, method="power", n_iter=50, state={})
    _close(power, norms.amax().repeat(4))


def test_one_by_one_svdconv_uses_its_core():
    layer = SVDConv(6, 4, 1, rank=3, stride=2, padding=1, padding_mode="replicate", dtype=torch.float64)
    with torch.no_grad():
        layer.S.mul_(3.0)
    n = (5, 4)
    truth = float(torch.linalg.matrix_norm(operator_matrix(layer_operator(layer), (6, *n)), 2))
    assert float(operator_norm_bound(layer, n)) == pytest.approx(truth, rel=TOL)
    circ = float(circular_singular_values(layer.dense_weight().detach(), (4, 4), (2, 2))[0])
    assert float(exact_spectral_norm(layer, (4, 4))) == pytest.approx(circ, rel=TOL)


# ------------------------------------------------------------ inputs smaller than the kernel
def test_fold_kernel_sums_taps_on_the_same_residue():
    kernel = torch.arange(2 * 7 * 5, dtype=torch.float64).reshape(2, 7, 5)
    folded = fold_kernel(kernel, (3, 5))
    expected = torch.zeros(2, 3, 5, dtype=torch.float64)
    for t in range(7):
        expected[:, t % 3] += kernel[:, t]
    assert torch.equal(folded, expected)
    assert fold_kernel(kernel, (7, 9)) is kernel  # nothing to fold
    folded = fold_kernel(kernel, (2, 2))
    assert folded.shape == (2, 2, 2)
    assert torch.equal(folded.sum((-2, -1)), kernel.sum((-2, -1)))
    assert float(folded[0, 1, 0]) == float(sum(kernel[0, a, b] for a in range(1, 7, 2) for b in range(0, 5, 2)))


def _small_input_configs():
    rng = random.Random(16)
    configs = []
    for k in range(2, 8):
        for dilation in (1, 2, 3):
            extent = dilation * (k - 1) + 1
            for n in range(1, extent):
                stride = rng.choice([s for s in (1, 2, 3) if n % s == 0])
                n2 = rng.randint(1, extent + 1)
                stride2 = rng.choice([s for s in (1, 2) if n2 % s == 0])
                kw = rng.randint(1, 4)
                groups = rng.choice([1, 1, 2])
                configs.append(dict(kernel=(k, kw), dilation=(dilation, rng.randint(1, 3)), n=(n, n2),
                                    stride=(stride, stride2), groups=groups,
                                    c_in=groups * rng.randint(1, 2), c_out=groups * rng.randint(1, 3)))
    return configs


SMALL = _small_input_configs()


def test_small_input_sweep_covers_what_it_claims():
    assert len(SMALL) > 100
    assert {c["kernel"][0] for c in SMALL} == set(range(2, 8))
    assert {c["n"][0] for c in SMALL} >= set(range(1, 7)) and {c["dilation"][0] for c in SMALL} == {1, 2, 3}
    assert any(c["stride"][0] > 1 for c in SMALL) and any(c["groups"] > 1 for c in SMALL)


@pytest.mark.parametrize("chunk", range(4))
def test_spectrum_of_an_input_smaller_than_the_kernel_matches_the_tiled_oracle(chunk):
    failures = []
    for c in SMALL[chunk::4]:
        weight = torch.randn(c["c_out"], c["c_in"] // c["groups"], *c["kernel"], dtype=torch.float64)
        geometry = dict(stride=c["stride"], dilation=c["dilation"], groups=c["groups"])
        expected = circular_singular_values_any_size(weight, c["n"], c["stride"], c["dilation"], c["groups"])
        got = conv_singular_values(weight, c["n"], **geometry)
        norm = float(conv_spectral_norm(weight, c["n"], **geometry))
        gram = float(gram_iteration_bound(weight, c["n"], n_iter=4, **geometry))
        rank = min(c["c_out"], c["c_in"] * c["stride"][0] * c["stride"][1]) // c["groups"]
        top = float(expected[0])
        if got.shape != expected.shape or float((got - expected).abs().max()) > TOL * top:
            failures.append(f"{c}: spectrum differs")
        if abs(norm - top) > TOL * top:
            failures.append(f"{c}: norm {norm} != {top}")
        if not top * (1 - TOL) <= gram <= top * rank ** (1 / 32) * (1 + TOL):
            failures.append(f"{c}: gram {gram} vs {top}")
    assert not failures, "\n".join(failures[:10])


def test_the_tiled_oracle_agrees_with_the_padded_oracle_where_both_apply():
    """The oracle of the small sizes is itself checked where oracle.py's circular padding works."""
    weight = torch.randn(3, 2, 3, 2, dtype=torch.float64)
    for n, stride, dilation in [((3, 4), (1, 2), (1, 2)), ((6, 3), (2, 1), (2, 1))]:
        _close(circular_singular_values_any_size(weight, n, stride, dilation),
               circular_singular_values(weight, n, stride, dilation))


def test_an_input_of_one_pixel_sees_the_kernel_sum():
    weight = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    expected = torch.linalg.svdvals(weight.sum((-2, -1)))
    _close(conv_singular_values(weight, 1, dilation=3), expected)


def test_check_spectral_input_size_folds_only_when_asked():
    with pytest.raises(ValueError, match="smaller than the"):
        check_spectral_input_size((2, 8), (3, 3), (1, 1), (1, 1))
    assert check_spectral_input_size((2, 8), (3, 3), (1, 1), (1, 1), fold=True) == (2, 8)
    with pytest.raises(ValueError, match="not divisible by stride"):
        check_spectral_input_size((3, 8), (3, 3), (2, 2), (1, 1), fold=True)


# -------------------------------------------- the layer's own operator on inputs smaller than the kernel
def _small_layers():
    rng = random.Random(17)
    layers = []
    while len(layers) < 160:
        k = (rng.randint(2, 5), rng.randint(1, 5))
        dilation = (rng.randint(1, 2), rng.randint(1, 2))
        extent = [d * (kk - 1) + 1 for d, kk in zip(dilation, k)]
        mode = rng.choice(PADDING_MODES)
        padding = tuple(rng.randint(0, kk) for kk in k)
        stride = (rng.randint(1, 3), rng.randint(1, 2))
        n = (rng.randint(1, extent[0] - 1), rng.randint(1, extent[1] + 1))
        if any(m + 2 * p < e for m, p, e in zip(n, padding, extent)):
            continue
        if (mode == "circular" and any(p > m for p, m in zip(padding, n))) or \
                (mode == "reflect" and any(p >= m for p, m in zip(padding, n))):
            continue
        layers.append((dict(in_channels=2, out_channels=rng.randint(1, 3), kernel_size=k, stride=stride,
                            padding=padding, dilation=dilation, bias=False, padding_mode=mode), n))
    return layers


SMALL_LAYERS = _small_layers()


@pytest.mark.parametrize("chunk", range(2))
def test_operator_bound_holds_on_inputs_smaller_than_the_kernel(chunk):
    failures = []
    modes = set()
    for conv, n in SMALL_LAYERS[chunk::2]:
        modes.add(conv["padding_mode"])
        layer = nn.Conv2d(**conv, dtype=torch.float64)
        truth = float(torch.linalg.matrix_norm(operator_matrix(layer_operator(layer), (2, *n)), 2))
        value = float(operator_norm_bound(layer, n))
        if not math.isfinite(value) or value < truth * (1 - TOL):
            failures.append(f"{conv} n={n}: {value} < {truth}")
        elif truth > 0 and value > 8 * truth:
            failures.append(f"{conv} n={n}: {value} > 8 x {truth}")
    assert modes == set(PADDING_MODES)
    assert not failures, "\n".join(failures[:10])


def test_size_preserving_circular_layer_on_a_small_input_gets_the_exact_folded_norm():
    """Circular padding 'same' on n < k: the layer's operator is the folded circular conv."""
    layer = nn.Conv2d(2, 3, 5, padding=2, padding_mode="circular", bias=False, dtype=torch.float64)
    for n in [(2, 3), (3, 3), (4, 2)]:
        truth = float(torch.linalg.matrix_norm(operator_matrix(layer_operator(layer), (2, *n)), 2))
        assert float(operator_norm_bound(layer, n)) == pytest.approx(truth, rel=TOL)
        assert float(exact_spectral_norm(layer, n)) == pytest.approx(truth, rel=TOL)


# ------------------------------------------------------------------ 1-D and 3-D kernels
def _nd_configs(d: int, count: int, seed: int):
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        kernel = tuple(rng.randint(1, 4) for _ in range(d))
        stride = tuple(rng.randint(1, 3) for _ in range(d))
        dilation = tuple(rng.randint(1, 2) for _ in range(d))
        n = tuple(s * rng.randint(1, 4) for s in stride)  # some below the dilated extent
        groups = rng.choice([1, 1, 2])
        c_in, c_out = groups * rng.randint(1, 2), groups * rng.randint(1, 3)
        if c_in * math.prod(n) > (160 if d == 3 else 60):
            continue
        configs.append(dict(kernel=kernel, stride=stride, dilation=dilation, n=n, groups=groups,
                            c_in=c_in, c_out=c_out))
    return configs


ND = [(1, c) for c in _nd_configs(1, 200, seed=18)] + [(3, c) for c in _nd_configs(3, 200, seed=19)]


def test_nd_sweep_covers_what_it_claims():
    for d in (1, 3):
        configs = [c for dd, c in ND if dd == d]
        assert any(all(k == 1 for k in c["kernel"]) for c in configs)  # single-tap path
        assert any(any(n < dil * (k - 1) + 1 for n, k, dil in zip(c["n"], c["kernel"], c["dilation"]))
                   for c in configs)  # folding
        assert any(max(c["stride"]) > 1 for c in configs) and any(max(c["dilation"]) > 1 for c in configs)
        assert any(c["groups"] > 1 for c in configs)


@pytest.mark.parametrize("index", range(len(ND)))
def test_nd_spectrum_matches_the_explicit_operator(index):
    """``d = 1`` and ``d = 3`` kernels: every singular value against the float64 matrix built with
    F.conv1d / F.conv3d on the tiled input (``circular_oracle``)."""
    d, c = ND[index]
    weight = torch.randn(c["c_out"], c["c_in"] // c["groups"], *c["kernel"], dtype=torch.float64)
    expected = circular_singular_values_any_size(weight, c["n"], c["stride"], c["dilation"], c["groups"])
    geometry = dict(stride=c["stride"], dilation=c["dilation"], groups=c["groups"])
    _close(conv_singular_values(weight, c["n"], **geometry), expected)
    _close(conv_spectral_norm(weight, c["n"], **geometry), expected[0])


def test_nd_batches_within_max_memory_give_the_same_spectrum():
    weight = torch.randn(3, 2, 3, 2, 2, dtype=torch.float64)
    n = (5, 4, 3)
    expected = circular_singular_values_any_size(weight, n, (1, 1, 1), (1, 1, 1))
    one_frequency = 4 * 3 * 2 * 16 + 12 * 16 + expected.numel() * (3 * 8 + 8)  # forces many batches
    _close(conv_singular_values(weight, n, max_memory=one_frequency), expected)
    kernel = weight.reshape(1, 3, 2, 3, 2, 2)
    batches = list(spectra.transfer_batches(kernel, n, 4 * 3 * 2 * 16 + 12 * 16))
    # One frequency per conjugate pair {f, -f}: (60 + 2) / 2, the 2 being those equal to their
    # own conjugate, (0, 0, 0) and (0, 2, 0).
    assert len(batches) == (5 * 4 * 3 + 2) // 2 and all(len(b) == 4 for b in batches)


def test_two_d_transfer_batches_keep_their_u_v_layout():
    kernel = torch.randn(1, 2, 3, 3, 2, dtype=torch.float64)
    (u, v, matrices), = spectra.transfer_batches(kernel, (4, 5), 1 << 20)
    # Row-major over the half plane v <= 2, without (3, 0): the conjugate of (1, 0), kept.
    pairs = [(a, b) for a in range(4) for b in range(3) if (a, b) != (3, 0)]
    assert list(zip(u.tolist(), v.tolist())) == pairs
    full = torch.fft.fft2(kernel, s=(4, 5)).permute(3, 4, 0, 1, 2)
    _close(matrices, torch.stack([full[a, b] for a, b in pairs]))


@pytest.mark.cpu_only  # the cap is the CPU's; a GPU keeps one large batch
def test_cpu_batches_stay_cache_sized_and_give_the_same_spectrum(monkeypatch):
    """A CPU batch holds at most ``_CPU_BATCH_BYTES`` of matrices, whatever ``max_memory``
    allows, and at least one frequency; the values are those of one large batch."""
    kernel = torch.randn(1, 128, 128, 3, 3)  # one frequency: 128 KiB of complex64 matrices
    per_frequency = 128 * 128 * 8
    sizes = [len(b[0]) for b in spectra.transfer_batches(kernel, (32, 32), 1 << 30)]
    assert max(sizes) == spectra._CPU_BATCH_BYTES // per_frequency == 64
    assert sum(sizes) == (32 * 32 + 4) // 2  # a frequency per conjugate pair; 4 are their own
    huge = torch.randn(1, 2048, 1024, 1, 2)  # one frequency: 16 MiB, more than the cap
    assert [len(b[0]) for b in spectra.transfer_batches(huge, (1, 2), 1 << 30)] == [1, 1]
    grouped = torch.randn(4, 64, 64, 3, 3)  # one frequency: 4 groups' matrices, 128 KiB
    sizes = [len(b[0]) for b in spectra.transfer_batches(grouped, (32, 32), 1 << 30)]
    assert max(sizes) == spectra._CPU_BATCH_BYTES // (4 * 64 * 64 * 8) == 64 and sum(sizes) == (32 * 32 + 4) // 2
    # Another device keeps the one large batch (there every batch is a launch).
    on_meta = list(spectra.transfer_batches(kernel.to("meta"), (32, 32), 1 << 30))
    assert [len(b[0]) for b in on_meta] == [(32 * 32 + 4) // 2]
    # The same spectrum and norm as with the cap lifted (one batch of every frequency).
    weight = torch.randn(64, 64, 3, 3, dtype=torch.float64)
    capped = (conv_singular_values(weight, (24, 24)), conv_spectral_norm(weight, (24, 24)))
    assert len(list(spectra.transfer_batches(weight.reshape(1, 64, 64, 3, 3), (24, 24), 1 << 30))) > 1
    monkeypatch.setattr(spectra, "_CPU_BATCH_BYTES", 1 << 40)
    whole = (conv_singular_values(weight, (24, 24)), conv_spectral_norm(weight, (24, 24)))
    torch.testing.assert_close(capped[0], whole[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(capped[1], whole[1], rtol=1e-13, atol=0)


@pytest.mark.parametrize("m", [(1,), (2,), (5,), (6,), (4, 4), (5, 4), (4, 5), (3, 3), (16, 16), (1, 4), (4, 1),
                               (2, 3, 4), (3, 3, 3), (4, 2, 6)])
def test_one_representative_per_conjugate_pair(m):
    """``conjugate_representatives`` holds exactly one frequency of each class ``{f, -f mod m}``,
    inside the half space the DFT batches index, and ``self_conjugate`` marks the classes of
    one member: counted once or twice, they give every frequency of the grid once. Checked
    against classes enumerated over the whole grid."""
    import itertools

    half = (*m[:-1], m[-1] // 2 + 1)
    flat = spectra.conjugate_representatives(m).tolist()
    assert flat == sorted(flat) and all(0 <= f < math.prod(half) for f in flat)
    points = []
    for f in flat:  # row-major over the half space
        point = []
        for size in reversed(half):
            point.insert(0, f % size)
            f //= size
        points.append(tuple(point))

    def conjugate(p):
        return tuple((-a) % size for a, size in zip(p, m))

    classes = {min(p, conjugate(p)) for p in itertools.product(*(range(size) for size in m))}
    assert sorted(min(p, conjugate(p)) for p in points) == sorted(classes)
    own = spectra.self_conjugate([torch.tensor([p[axis] for p in points]) for axis in range(len(m))], m)
    assert own.tolist() == [p == conjugate(p) for p in points]
    assert sum(1 if alone else 2 for alone in own.tolist()) == math.prod(m)


def test_self_conjugate_frequencies_are_exactly_real_so_float32_lapack_converges():
    """Rank-1 strided float32 kernels: with the ~1e-16 imaginary parts polar() leaves at -pi, the
    exactly real matrix of a self-conjugate frequency made complex64 LAPACK return NaN singular
    values (no error) or fail to converge, in about a third of such kernels; the phases' quarter
    turns are now exact. Checked against the float64 spectrum, also through the gradient path
    and a clip."""
    phases = spectra._phases(6, 4, torch.tensor([0, 3, 2]), torch.complex64)
    assert torch.equal(phases[1], torch.tensor([1, -1, 1, -1], dtype=torch.complex64))
    assert torch.equal(phases[0], torch.ones(4, dtype=torch.complex64))
    geometry = dict(stride=2, dilation=(2, 1))
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        a, b, h = (torch.randn(size, generator=generator) for size in (3, 2, 3))
        weight = (a[:, None, None] * b[None, :, None] * h[None, None, :])[..., None]  # (3, 2, 3, 1), rank 1
        values = conv_singular_values(weight, (4, 6), **geometry)
        expected = conv_singular_values(weight.double(), (4, 6), **geometry)
        assert torch.allclose(values.double(), expected, rtol=0, atol=1e-6 * float(expected[0])), seed
        norm = conv_spectral_norm(weight.clone().requires_grad_(True), (4, 6), **geometry)
        assert float(norm) == pytest.approx(float(expected[0]), rel=1e-5)
        conv = nn.Conv2d(2, 3, (3, 1), bias=False, **geometry)
        with torch.no_grad():
            conv.weight.copy_(weight)
        ttconv.clip_singular_values_(conv, 0.5 * float(expected[0]), (4, 6))
        assert torch.isfinite(conv.weight).all()
