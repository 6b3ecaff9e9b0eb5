"""core_kind='orthogonal': the spectrum is exactly S; clipping is exact; 1-Lipschitz networks."""

import math
import random

import pytest
import torch
from torch import nn

from circular_oracle import circular_conv_any_size
from configs import config_id, random_conv_configs
from oracle import circular_singular_values, layer_operator, operator_matrix
from ttconv import SVDConv, clip_singular_values_, scale_to_spectral_norm_
from ttconv.activations import ChannelPad, MaxMin
from ttconv.orthogonal import bcop_halves, bcop_kernel, bcop_parameter_count, compose_kernels, skew_matrix_exp
from ttconv.report import spectral_report

CONFIGS = random_conv_configs(80, seed=5, max_in_numel=700)


def _orthogonal_layer(config, **kwargs):
    c = dict(config["conv"])
    rank = config["rank"]
    rank = rank[0] if isinstance(rank, tuple) else rank
    layer = SVDConv(**c, rank=rank, core_kind="orthogonal", dtype=torch.float64, **kwargs)
    with torch.no_grad():  # arbitrary raw parameters: the construction must not care
        for p in (layer.U, layer.V, layer.core):
            p.copy_(torch.randn_like(p))
        layer.S.copy_(torch.rand_like(layer.S) * 3)
    return layer


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_spectrum_is_exactly_s_repeated(config):
    layer = _orthogonal_layer(config)
    n = config["n"]
    c = config["conv"]
    weight = layer.dense_weight().detach()
    oracle = circular_singular_values(weight, n, c["stride"], c["dilation"], c["groups"])
    claimed = layer.singular_values(n).detach()
    assert claimed.shape == oracle.shape
    assert float((claimed - oracle).abs().max()) < 1e-6 * max(1.0, float(oracle[0]))
    # And the claim is |S| itself, each once per output position.
    positions = (n[0] // c["stride"][0]) * (n[1] // c["stride"][1])
    assert torch.allclose(claimed[: layer.S.numel() * positions].unique(),
                          layer.factors().S.detach().abs().unique(), atol=1e-10)


@pytest.mark.parametrize("kernel_size", [(1, 1), (3, 3), (2, 5), (4, 1)])
@pytest.mark.parametrize("r", [1, 2, 5, 8])
def test_core_is_orthogonal_for_circular_padding(kernel_size, r):
    generators = torch.randn(1, bcop_parameter_count(kernel_size), r, r, dtype=torch.float64)
    kernel = bcop_kernel(generators, kernel_size)[0]
    n = (max(6, kernel_size[0]), max(7, kernel_size[1]))
    values = circular_singular_values(kernel, n)
    assert float((values - 1).abs().max()) < 1e-6


def _bcop_cases():
    """Kernels in 1, 2 and 3 dimensions (sizes 1 included), channels 1-5, dilations 1-3 and input
    sizes from 1 pixel (far below the kernel: the operator is the folded kernel's) upwards."""
    rng = random.Random(7)
    cases = []
    for index in range(60):
        d = 1 + index % 3
        kernel = tuple(rng.randint(1, 5 if d == 1 else 3) for _ in range(d))
        dilation = tuple(rng.randint(1, 3) for _ in range(d))
        r = rng.randint(1, 5)
        n = tuple(rng.randint(1, 9 if d == 1 else 5 if d == 2 else 3) for _ in range(d))
        cases.append(pytest.param(kernel, dilation, r, n, id=f"k{kernel}-d{dilation}-r{r}-n{n}".replace(" ", "")))
    return cases


@pytest.mark.parametrize("kernel_size, dilation, r, n", _bcop_cases())
def test_bcop_circular_operator_is_orthogonal_in_every_dimension(kernel_size, dilation, r, n):
    """The explicit circular operator ``M`` of the BCOP kernel satisfies ``M^T M = M M^T = I`` to 1e-12."""
    torch.manual_seed(hash((kernel_size, dilation, r, n)) % 10**6)
    generators = 2 * torch.randn(2, bcop_parameter_count(kernel_size), r, r, dtype=torch.float64)
    kernels = bcop_kernel(generators, kernel_size)
    assert kernels.shape == (2, r, r, *kernel_size)
    eye = torch.eye(r * math.prod(n), dtype=torch.float64)
    for kernel in kernels:
        matrix = operator_matrix(circular_conv_any_size(kernel, (1,) * len(n), dilation), (r, *n))
        assert float((matrix.T @ matrix - eye).abs().max()) < 1e-12
        assert float((matrix @ matrix.T - eye).abs().max()) < 1e-12


def test_bcop_uses_every_generator_and_builds_a_full_kernel():
    """Each generator changes the kernel (none is ignored), and the outer taps are nonzero (the
    blocks really compose along every axis, not only the first)."""
    kernel_size = (2, 3, 2)
    generators = torch.randn(1, bcop_parameter_count(kernel_size), 4, 4, dtype=torch.float64)
    assert generators.shape[1] == 1 + 1 + 2 + 1
    kernel = bcop_kernel(generators, kernel_size)
    for corner in [(0, 0, 0), (1, 2, 1), (0, 2, 0), (1, 0, 1)]:
        assert float(kernel[(0, slice(None), slice(None), *corner)].abs().max()) > 1e-3
    for j in range(generators.shape[1]):
        moved = generators.clone()
        moved[:, j] += torch.randn(4, 4, dtype=torch.float64)
        assert not torch.allclose(bcop_kernel(moved, kernel_size), kernel)
    with pytest.raises(ValueError, match=r"expected 5 generators for kernel \(2, 3, 2\), got 4"):
        bcop_kernel(generators[:, :4], kernel_size)
    for name in ("inputs", "outputs"):  # at most r channels: more would be cropped silently
        with pytest.raises(ValueError, match=f"{name} acts on at most r = 4 channels"):
            bcop_kernel(generators, kernel_size, **{name: torch.randn(1, 5, 5, dtype=torch.float64)})


@pytest.mark.parametrize("kernel_size", [(3,), (4,), (3, 3), (2, 4), (3, 1), (1, 3), (1, 1), (3, 2, 3)])
@pytest.mark.parametrize("r, m_in, m_out", [(6, 6, 6), (6, 4, 6), (6, 6, 3), (5, 5, 5)])
def test_bcop_outputs_are_the_kernel_composed_after_the_core(kernel_size, r, m_in, m_out):
    """``outputs=`` builds the last axis's blocks onto ``outputs`` and joins the halves in one
    product; it must equal ``outputs`` composed after the first ``m_out`` rows of the kernel that
    ``inputs=`` gives (``compose_kernels``, checked against operator matrices above), at every
    tap: with three or more taps on the last axis the blocks do not commute, so their order shows."""
    torch.manual_seed(r + m_in + m_out)
    generators = torch.randn(2, bcop_parameter_count(kernel_size), r, r, dtype=torch.float64)
    inputs = torch.randn(2, m_in, 7, dtype=torch.float64)
    outputs = torch.randn(2, 9, m_out, dtype=torch.float64)
    d = len(kernel_size)
    one_tap = outputs.reshape(2, 9, m_out, *(1,) * d)
    expected = compose_kernels(one_tap, bcop_kernel(generators, kernel_size, inputs=inputs)[:, :m_out])
    joined = bcop_kernel(generators, kernel_size, inputs=inputs, outputs=outputs)
    assert joined.shape == (2, 9, 7, *kernel_size)
    assert float((joined - expected).abs().max()) < 1e-13 * float(expected.abs().max())
    # Unjoined: the second half convolved after the first is the same kernel.
    first, second = bcop_halves(generators, kernel_size, inputs=inputs, outputs=outputs)
    assert first.shape == (2, r, 7, *kernel_size[:-1], 1) and second.shape == (2, 9, r, *(1,) * (d - 1), kernel_size[-1])
    halves = compose_kernels(second, first)
    assert float((halves - expected).abs().max()) < 1e-13 * float(expected.abs().max())


@pytest.mark.parametrize("d", [1, 2, 3])
def test_compose_kernels_is_the_product_of_the_circular_operators(d):
    torch.manual_seed(d)
    outer = torch.randn(2, 3, 4, *(2, 1, 3)[:d], dtype=torch.float64)
    inner = torch.randn(2, 4, 2, *(3, 2, 2)[:d], dtype=torch.float64)
    n = (7, 5, 4)[:d]
    composed = compose_kernels(outer, inner)
    assert composed.shape == (2, 3, 2, *(a + b - 1 for a, b in zip(outer.shape[3:], inner.shape[3:])))
    for g in range(2):
        ones = (1,) * d
        m_outer = operator_matrix(circular_conv_any_size(outer[g], ones, ones), (4, *n))
        m_inner = operator_matrix(circular_conv_any_size(inner[g], ones, ones), (2, *n))
        m_composed = operator_matrix(circular_conv_any_size(composed[g], ones, ones), (2, *n))
        assert torch.allclose(m_composed, m_outer @ m_inner, rtol=0, atol=1e-12)


def test_zero_padding_orthogonality_error_is_measured_and_max_s_bounds_it():
    layer = SVDConv(6, 6, 3, padding=1, core_kind="orthogonal", max_singular_value=1.0, dtype=torch.float64)
    with torch.no_grad():
        layer.S.fill_(10.0)  # all singular values ~1
    values = torch.linalg.svdvals(operator_matrix(layer_operator(layer), (6, 8, 8)))
    assert float(values[0]) <= float(layer.factors().S.detach().max()) * (1 + 1e-12)
    # Not orthogonal at the border: some singular values drop below 1 (documented).
    assert float(values[-1]) < 0.99


def test_gradients_flow_to_every_parameter():
    layer = SVDConv(4, 6, 3, padding=1, core_kind="orthogonal", max_singular_value=1.0, dtype=torch.float64)
    layer(torch.randn(2, 4, 6, 6, dtype=torch.float64)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_gradcheck_orthogonal_forward():
    layer = SVDConv(2, 3, 2, padding=1, core_kind="orthogonal", max_singular_value=2.0, dtype=torch.float64,
                    path="factored")
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()))


def test_bound_holds_during_training():
    torch.manual_seed(0)
    layer = SVDConv(4, 4, 3, padding=1, core_kind="orthogonal", max_singular_value=0.5)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(100):
        x = torch.randn(4, 4, 6, 6)
        loss = -layer(x).square().mean()  # pushes the norm up as hard as it can
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert float(layer.spectral_norm(6).detach()) <= 0.5
    assert float(layer.spectral_norm(6).detach()) > 0.49  # it did push against the bound


def test_exact_clipping_and_scaling_in_o_of_r():
    layer = SVDConv(6, 6, 3, padding=1, core_kind="orthogonal", dtype=torch.float64)
    with torch.no_grad():
        layer.S.copy_(torch.linspace(0.1, 3.0, 6, dtype=torch.float64))
    reached = clip_singular_values_(layer, 1.0, 8)
    oracle = circular_singular_values(layer.dense_weight().detach(), (8, 8))
    assert reached == pytest.approx(1.0) and float(oracle[0]) == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(layer.S, torch.linspace(0.1, 3.0, 6, dtype=torch.float64).clamp(max=1.0))
    assert scale_to_spectral_norm_(layer, 0.5, 8) == pytest.approx(0.5)
    bounded = SVDConv(6, 6, 3, padding=1, core_kind="orthogonal", max_singular_value=2.0, dtype=torch.float64)
    assert clip_singular_values_(bounded, 0.7, 8) == pytest.approx(0.7)


def test_canonicalize_recentres_without_changing_the_function():
    layer = SVDConv(4, 6, 3, padding=1, core_kind="orthogonal", dtype=torch.float64)
    with torch.no_grad():
        layer.U.mul_(3.0).add_(0.1)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    before = layer(x)
    layer.canonicalize_()
    assert torch.allclose(layer(x), before, atol=1e-12)
    assert torch.allclose(layer.U.T @ layer.U, torch.eye(4, dtype=torch.float64), atol=1e-12)


def _lipschitz_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.PixelUnshuffle(2), ChannelPad(8),
        SVDConv(8, 8, 3, padding=1, core_kind="orthogonal", max_singular_value=1.0), MaxMin(),
        SVDConv(8, 8, 3, padding=1, core_kind="orthogonal", max_singular_value=1.0), MaxMin(),
        SVDConv(8, 8, 3, stride=2, padding=1, core_kind="orthogonal", max_singular_value=1.0), MaxMin(),
    ).double()


def test_lipschitz_network_is_empirically_1_lipschitz_and_certified():
    net = _lipschitz_net()
    x = torch.randn(64, 2, 16, 16, dtype=torch.float64)
    y = x + 0.1 * torch.randn_like(x)
    with torch.no_grad():
        ratio = (net(x) - net(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= 1.0
    report = spectral_report(net, x[:1])
    certificate = 1.0
    for layer in (m for m in net if isinstance(m, SVDConv)):
        certificate *= float(layer.factors().S.detach().max())
    # The report's bound for an orthogonal layer is max(S): the product equals the certificate.
    assert report.upper_bound_product == pytest.approx(certificate, rel=1e-6)


def test_stride_two_spectrum_and_bad_arguments():
    layer = SVDConv(4, 4, 3, stride=2, padding=1, core_kind="orthogonal", dtype=torch.float64)
    values = layer.singular_values(8)
    assert values.numel() == min(4 * 16, 4 * 64)
    assert SVDConv(4, 4, 3, core_kind="orthogonal", rank=(2, 3)).ranks == (2, 3)  # channel padding
    with pytest.raises(ValueError, match=r"needs rank\[0\] <= rank\[1\]"):
        SVDConv(4, 4, 3, stride=2, core_kind="orthogonal", rank=(3, 2))
    with pytest.raises(ValueError, match="max_singular_value needs core_kind='orthogonal'"):
        SVDConv(4, 4, 3, max_singular_value=1.0)
    with pytest.raises(ValueError, match="max_singular_value must be a positive"):
        SVDConv(4, 4, 3, core_kind="orthogonal", max_singular_value=0)
    with pytest.raises(ValueError, match="core_kind must be one of"):
        SVDConv(4, 4, 3, core_kind="soc")
    with pytest.raises(ValueError, match="set_singular_values_ needs core_kind='orthogonal'"):
        SVDConv(4, 4, 3).set_singular_values_(torch.ones(4))
    with pytest.raises(ValueError, match="must lie in"):
        SVDConv(4, 4, 3, core_kind="orthogonal", max_singular_value=1.0).set_singular_values_(torch.full((4,), 2.0))
    for bound in (1.0, None):  # NaN passes every comparison, inf the unbounded form's: refused, S unchanged
        layer = SVDConv(4, 4, 3, core_kind="orthogonal", max_singular_value=bound)
        before = layer.S.detach().clone()
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="values must be finite"):
                layer.set_singular_values_(torch.tensor([0.5, bad, 0.5, 0.5]))
        assert torch.equal(layer.S.detach(), before)
    with pytest.raises(ValueError, match="even number of channels"):
        MaxMin()(torch.randn(1, 3, 2, 2))
    assert "core_kind='orthogonal'" in repr(SVDConv(4, 4, 3, core_kind="orthogonal", max_singular_value=1.0))


@pytest.mark.parametrize("rank", [None, (2, 4), (4, 2)])
def test_fresh_core_starts_at_h_equal_identity_with_the_same_kernel_law(rank):
    """A fresh layer's generator 0 is zero (``H = I``: its exponential costs nothing until
    training moves it). The composed kernel's law does not depend on ``H`` (``V`` is Haar, and
    the blocks' projectors are conjugation invariant): rotating ``H`` by a random orthogonal
    matrix moves the kernel's Frobenius norm and its entries' spread by nothing beyond noise."""
    layer = SVDConv(4, 4, 3, padding=1, rank=rank, core_kind="orthogonal", max_singular_value=1.0)
    assert bool((layer.core[:, 0] == 0).all())
    assert torch.equal(skew_matrix_exp(layer.core[:, 0] - layer.core[:, 0].mT),
                       torch.eye(layer.core.shape[-1]).expand_as(layer.core[:, 0]))
    torch.manual_seed(0)
    zero_h, random_h = [], []
    for _ in range(400):
        layer.reset_parameters()
        zero_h.append(layer.dense_weight().detach().flatten())
        with torch.no_grad():
            layer.core[:, 0].normal_()
        random_h.append(layer.dense_weight().detach().flatten())
    zero_h, random_h = torch.stack(zero_h), torch.stack(random_h)
    # Per-entry second moments agree (400 draws: relative noise about 7% per entry, 1% on the mean).
    ratio = zero_h.square().mean(0) / random_h.square().mean(0)
    assert abs(float(ratio.mean()) - 1) < 0.05


def test_orthogonal_state_dict_round_trip_and_to_conv2d():
    layer = SVDConv(4, 6, 3, padding=1, core_kind="orthogonal", max_singular_value=1.0)
    fresh = SVDConv(4, 6, 3, padding=1, core_kind="orthogonal", max_singular_value=1.0)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(fresh(x), layer(x))
    assert torch.allclose(layer.to_conv2d()(x), layer(x), atol=1e-5)


@pytest.mark.parametrize("r", [1, 2, 3, 8, 33])
@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-3, 0.3, 1.0, 30.0])
def test_skew_exp_equals_torchs_matrix_exp_and_its_gradient(r, scale):
    """The sized Taylor exponential against torch's own (Pade/Taylor forward, a 2n x 2n
    exponential for the backward): the same value and gradient to round-off, at 0 (all
    eigenvalues equal), at nearly equal and at large eigenvalues (many squarings), and at the
    scales where each Taylor degree is chosen. The gradient is the harder half: a degree
    sized for the value alone is 1e-9 off at norm 1e-9."""
    torch.manual_seed(r)
    raw = torch.randn(3, r, r, dtype=torch.float64) * scale
    skew = (raw - raw.mT).requires_grad_()
    if r == 8:  # repeated eigenvalue pairs: a block-diagonal skew matrix with equal blocks
        with torch.no_grad():
            skew.zero_()
            for i in range(0, 8, 2):
                skew[:, i, i + 1], skew[:, i + 1, i] = scale, -scale
    grad = torch.randn(3, r, r, dtype=torch.float64)
    value = skew_matrix_exp(skew)
    truth_value = torch.linalg.matrix_exp(skew)
    # Orthogonal matrices: entries at most 1; round-off grows with the squarings (about 12 at scale 30).
    assert float((value - truth_value).detach().abs().max()) < 1e-12
    mine, = torch.autograd.grad(value, skew, grad)
    truth, = torch.autograd.grad(truth_value, skew, grad)
    assert float((mine - truth).abs().max()) < 1e-12 * max(1.0, float(truth.abs().max()))
    # float32 too (the training dtype): as accurate as torch's float32 matrix_exp.
    skew32 = skew.detach().float().requires_grad_()
    value32 = skew_matrix_exp(skew32)
    mine32, = torch.autograd.grad(value32, skew32, grad.float())
    torch_error = float((torch.linalg.matrix_exp(skew32).double() - truth_value).detach().abs().max())
    assert float((value32.double() - truth_value).detach().abs().max()) <= max(2 * torch_error, 1e-6)
    assert float((mine32.double() - truth).abs().max()) < 5e-5 * max(1.0, float(truth.abs().max()))


def test_skew_exp_keeps_its_precision_under_autocast_and_for_half_inputs():
    """Each squaring doubles the relative error, so the polynomial and its squarings run in
    float32 whatever autocast says, and half-precision inputs are widened: a bfloat16 product
    chain with 9 squarings would be off by order 1."""
    torch.manual_seed(0)
    raw = torch.randn(2, 16, 16) * 30
    skew = raw - raw.mT
    truth = torch.linalg.matrix_exp(skew.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = skew_matrix_exp(skew)
    assert value.dtype == torch.float32
    assert float((value.double() - truth).abs().max()) < 1e-4
    half = skew_matrix_exp(skew.bfloat16())
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, skew_matrix_exp(skew.bfloat16().float()).bfloat16())


def test_skew_exp_sizes_each_matrix_alone_and_never_returns_a_wrong_finite_matrix():
    """Each matrix of a batch is scaled by its own power of two: a large or broken one costs the
    others nothing. A matrix that is not finite, or too large for its dtype's digits to survive
    the squarings, is NaN (as from torch.linalg.matrix_exp), never a finite non-orthogonal one."""
    torch.manual_seed(0)
    raw = torch.randn(4, 6, 6, dtype=torch.float64)
    raw[1] *= 1e3  # many squarings
    raw[2, 0, 1] = float("nan")
    raw[3] *= 1e30  # beyond float64's digits
    skew = raw - raw.mT
    value = skew_matrix_exp(skew)
    alone = skew_matrix_exp(skew[:1])
    # The large one did not cost the small one its accuracy (one plan's degree, its own squarings).
    assert float((value[0] - alone[0]).abs().max()) < 1e-14
    assert float((value[0] - torch.linalg.matrix_exp(skew[0])).abs().max()) < 1e-14
    assert float((value[1] - torch.linalg.matrix_exp(skew[1])).abs().max()) < 1e-10
    assert bool(value[2].isnan().all()) and bool(value[3].isnan().all())
    upper = torch.full((1, 6, 6), 1e30).triu(1)
    assert bool(skew_matrix_exp(upper - upper.mT).isnan().all())  # float32: its square overflows


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_skew_exp_is_not_frozen_by_jit_trace():
    """torch.jit.trace records Python numbers as constants, so a traced layer would keep the
    Taylor plan of its example's generator: it takes torch's exponential instead."""
    layer = SVDConv(4, 4, 3, padding=1, core_kind="orthogonal", max_singular_value=1.0).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    traced = torch.jit.trace(layer, x, check_trace=False)
    with torch.no_grad():
        layer.core.normal_(std=3.0)  # trained-like generators, after tracing
    assert float((traced(x) - layer(x)).abs().max()) < 1e-12


def test_skew_exp_is_twice_differentiable():
    """Written in torch operations, so autograd differentiates the backward too (second-order
    optimisers, gradient penalties), checked by finite differences in float64."""
    torch.manual_seed(0)
    raw = torch.randn(2, 4, 4, dtype=torch.float64) * 0.7

    def exp_of_generator(generator):
        return skew_matrix_exp(generator - generator.mT)

    assert torch.autograd.gradgradcheck(exp_of_generator, (raw.requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_skew_exp_cost_follows_the_norm(dtype):
    """The cheapest (degree, squarings) pair is picked: none at zero, few for a small generator,
    and the number of squarings grows like log2 of the norm for a large one."""
    from ttconv.orthogonal import _taylor_plan, _taylor_products

    def products(norm):
        degree, squarings = _taylor_plan(norm, dtype)
        return _taylor_products(degree) + squarings

    assert products(0.0) == 0
    assert products(1e-3) <= 2
    assert products(1.0) <= 6
    assert products(2048.0) - products(1024.0) == 1
