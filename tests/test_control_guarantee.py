"""What SpectralControl guarantees, and clipping / regularizers against independent references.

Every reference here is computed without ttconv: explicit operator matrices
(``oracle.py``) and a numpy re-implementation of the per-frequency clip.
"""

import random

import numpy as np
import pytest
import torch
from torch import nn

from configs import config_id, random_conv_configs
from oracle import circular_singular_values
from ttconv import SpectralControl, SVDConv, clip_singular_values_, spectra


@torch.no_grad()
def _certified_norm(weight, n, stride, dilation, groups):
    """The exact norm without gradients: conv_spectral_norm's certified route (certified_batch_max)."""
    return float(spectra.conv_spectral_norm(weight, n, stride=stride, dilation=dilation, groups=groups))

TOL = 1e-6  # relative slack of the guarantee in float64


def _clip_each_frequency(transfer, groups, max_singular_value):
    """In place: clip the singular values of every group's matrix at every frequency of
    ``transfer: (c_out, c_in_g, m1, m2)`` (numpy, one SVD per matrix)."""
    o = transfer.shape[0] // groups
    for g in range(groups):
        for a in range(transfer.shape[2]):
            for b in range(transfer.shape[3]):
                u, s, vh = np.linalg.svd(transfer[g * o:(g + 1) * o, :, a, b], full_matrices=False)
                transfer[g * o:(g + 1) * o, :, a, b] = (u * np.minimum(s, max_singular_value)) @ vh


def _dense(layer):
    return (layer.dense_weight() if isinstance(layer, SVDConv) else layer.weight).detach().to(torch.float64)


def _oracle(layer, n, stride):
    """Exact norm of the circular conv with ``stride`` on ``n`` (any n: every s-th output kept)."""
    return float(circular_singular_values(_dense(layer), n, stride, layer.dilation, layer.groups)[0])


def _sweep(count=48, seed=7):
    """Random single layers; a third of the strided ones get an input size not divisible by the stride."""
    rng = random.Random(seed)
    cases = []
    for index, config in enumerate(random_conv_configs(count, seed=seed, max_in_numel=500)):
        n = config["n"]
        stride = config["conv"]["stride"]
        if stride != (1, 1) and rng.random() < 0.5:
            n = tuple(a + (s > 1) for a, s in zip(n, stride))  # odd size along the strided axes
        kind = ["conv", "svd", "conv", "orthogonal"][index % 4]
        cases.append((kind, config, n))
    return cases


def _make(kind, config, seed):
    torch.manual_seed(seed)
    conv = dict(config["conv"], dtype=torch.float64)
    if kind == "conv":
        return nn.Conv2d(**conv)
    if kind == "orthogonal":
        groups = conv["groups"]
        r = min(conv["in_channels"], conv["out_channels"]) // groups
        layer = SVDConv(**conv, rank=r, core_kind="orthogonal")
        with torch.no_grad():
            layer.S.uniform_(0.5, 3.0)  # a spread spectrum, norm well above 1
        return layer
    return SVDConv(**conv, rank=config["rank"])


SWEEP = _sweep()


@pytest.mark.parametrize("mode", ["clip_scale", "scale"])
@pytest.mark.parametrize("index, case", list(enumerate(SWEEP)),
                         ids=[f"{c[0]}-{config_id(c[1])}-at{c[2][0]}x{c[2][1]}" for c in SWEEP])
def test_guarantee_after_apply_against_the_oracle(mode, index, case):
    kind, config, n = case
    layer = _make(kind, config, index)
    model = nn.Sequential(layer)
    example = torch.zeros(1, layer.in_channels, *n, dtype=torch.float64)
    divisible = all(a % s == 0 for a, s in zip(n, layer.stride))
    controlled = layer.stride if divisible else (1, 1)
    before = _oracle(layer, n, controlled)
    target = 0.3 * before
    control = SpectralControl(model, target, every=1, mode=mode, example_input=example)
    assert control.layers[0][2] == n
    reached = control.apply()["0"]
    strided = _oracle(layer, n, layer.stride)
    assert strided <= target * (1 + TOL)  # the guarantee, for every size
    if not divisible:  # what is controlled: the stride-1 norm, which bounds the strided one
        assert _oracle(layer, n, (1, 1)) <= target * (1 + TOL)
        assert strided <= _oracle(layer, n, (1, 1)) * (1 + 1e-12)
    assert reached == pytest.approx(_oracle(layer, n, controlled), rel=1e-9)  # reported honestly


@pytest.mark.parametrize("seed, n_iter", [(0, 1), (1, 3), (2, 1), (4, 2)])
def test_guarantee_on_a_float32_model_over_a_run_of_apply_calls(seed, n_iter):
    torch.manual_seed(seed)
    model = nn.Sequential(SVDConv(3, 8, 3, padding=1, rank=4), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), SVDConv(8, 8, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
                          SVDConv(8, 8, 3, padding=1, core_kind="orthogonal"))
    control = SpectralControl(model, 0.7, every=1, example_input=torch.zeros(1, 3, 9, 9), n_iter=n_iter)
    assert control.mode == "clip_scale"  # the default
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        loss = -sum(p.square().sum() for p in model.parameters())  # push every norm up
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        control.step()
        for name, layer, size in control.layers:
            divisible = all(a % s == 0 for a, s in zip(size, layer.stride))
            # float32: rounding; the orthogonal core's norm max|S| is exact only up to the
            # float32 orthogonality of its BCOP core.
            slack = 1e-4 if getattr(layer, "core_kind", None) == "orthogonal" else 1e-6
            assert _oracle(layer, size, layer.stride if divisible else (1, 1)) <= 0.7 * (1 + slack), name


def test_plain_clip_overshoots_where_clip_scale_does_not():
    torch.manual_seed(0)
    layers = {mode: nn.Conv2d(6, 6, 3, padding=1, dtype=torch.float64) for mode in ("clip", "clip_scale", "scale")}
    for layer in list(layers.values())[1:]:
        layer.load_state_dict(layers["clip"].state_dict())
    n = (8, 8)
    target = 0.25 * _oracle(layers["clip"], n, (1, 1))
    example = torch.zeros(1, 6, *n, dtype=torch.float64)
    reached = {}
    for mode, layer in layers.items():
        reached[mode] = SpectralControl(nn.Sequential(layer), target, every=1, mode=mode, example_input=example).apply()["0"]
    assert _oracle(layers["clip"], n, (1, 1)) > 1.1 * target  # the paper's clip is approximate
    assert reached["clip"] == pytest.approx(_oracle(layers["clip"], n, (1, 1)), rel=1e-9)
    for mode in ("clip_scale", "scale"):
        assert _oracle(layers[mode], n, (1, 1)) <= target * (1 + TOL)
        assert reached[mode] == pytest.approx(target, rel=1e-9)
    # clip_scale is the clipped kernel rescaled, not the plain rescale
    ratio = layers["clip_scale"].weight / layers["clip"].weight
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
    assert not torch.allclose(layers["clip_scale"].weight, layers["scale"].weight)


# ----------------------------------------------------------------- clip vs an independent reference
def _reference_clip(weight, n, max_singular_value, dilation, groups):
    """Per-frequency clip of the stride-1 circular conv (numpy), read back at the dilated taps.

    Also returns the full ``n1 x n2`` clipped kernel before projection.
    """
    w = weight.detach().cpu().numpy().astype(np.float64)
    c_out, c_in_g, kh, kw = w.shape
    (d1, d2), (n1, n2) = dilation, n
    e1, e2 = d1 * (kh - 1) + 1, d2 * (kw - 1) + 1
    full = np.zeros((c_out, c_in_g, n1, n2))
    full[:, :, 0:e1:d1, 0:e2:d2] = w  # the dilated kernel on the n1 x n2 grid
    transfer = np.fft.fft2(full, axes=(2, 3))
    _clip_each_frequency(transfer, groups, max_singular_value)
    clipped_full = np.fft.ifft2(transfer, axes=(2, 3)).real
    return clipped_full[:, :, 0:e1:d1, 0:e2:d2].copy(), clipped_full


DILATED = [  # (c_in, c_out, kernel, dilation, groups, n)
    (3, 4, (3, 3), (2, 2), 1, (9, 8)),
    (4, 6, (2, 3), (3, 1), 2, (8, 7)),
    (6, 6, (3, 2), (1, 2), 3, (6, 9)),
    (2, 3, (3, 3), (2, 3), 1, (7, 10)),
]


@pytest.mark.parametrize("kind", ["conv", "svd"])
@pytest.mark.parametrize("c_in, c_out, kernel, dilation, groups, n", DILATED)
def test_dilated_clip_matches_an_independent_reference(kind, c_in, c_out, kernel, dilation, groups, n):
    torch.manual_seed(sum(kernel) + groups)
    conv = dict(in_channels=c_in, out_channels=c_out, kernel_size=kernel, dilation=dilation, groups=groups,
                dtype=torch.float64)
    layer = nn.Conv2d(**conv) if kind == "conv" else SVDConv(**conv)
    before = _dense(layer)
    values = circular_singular_values(before, n, (1, 1), dilation, groups)
    target = 0.5 * float(values[0])
    expected, clipped_full = _reference_clip(before, n, target, dilation, groups)
    # The reference is right: its unprojected kernel has exactly the clipped spectrum (oracle).
    full_values = circular_singular_values(torch.from_numpy(clipped_full).to(before.device), n, (1, 1), (1, 1), groups)
    assert torch.allclose(full_values, values.clamp(max=target), atol=1e-10)
    clip_singular_values_(layer, target, n)
    assert np.abs(_dense(layer).cpu().numpy() - expected).max() <= 1e-10 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("kind", ["conv", "svd"])
def test_dilated_clip_iterated_approaches_the_target(kind):
    torch.manual_seed(3)
    conv = dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2, dtype=torch.float64)
    n = (10, 10)
    layers = [nn.Conv2d(**conv) if kind == "conv" else SVDConv(**conv) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    before = _oracle(layers[0], n, (1, 1))
    target = 0.4 * before
    clip_singular_values_(layers[0], target, n)
    clip_singular_values_(layers[1], target, n, n_iter=100)
    once, many = _oracle(layers[0], n, (1, 1)), _oracle(layers[1], n, (1, 1))
    assert once > 1.05 * target
    assert abs(many - target) < 0.25 * abs(once - target)
    assert many < 1.02 * target


# ----------------------------------------------------------------- strided clip vs an independent reference
def _reference_strided_clip(weight, n, max_singular_value, stride, dilation, groups):
    """The paper's polyphase clip in numpy: the dilated kernel on the ``n1 x n2`` grid, its
    ``s1*s2`` phases ``full[..., q1::s1, q2::s2]`` (each on the ``n / s`` grid) as extra
    columns of every frequency's matrix, SVD, clip, inverse FFT, phases put back, taps kept.

    Also returns the clipped kernel on the full grid before the projection.
    """
    w = weight.detach().cpu().numpy().astype(np.float64)
    c_out, c_in_g, kh, kw = w.shape
    (d1, d2), (s1, s2), (n1, n2) = dilation, stride, n
    m1, m2 = n1 // s1, n2 // s2
    e1, e2 = d1 * (kh - 1) + 1, d2 * (kw - 1) + 1
    full = np.zeros((c_out, c_in_g, n1, n2))
    full[:, :, 0:e1:d1, 0:e2:d2] = w
    phases = [(q1, q2) for q1 in range(s1) for q2 in range(s2)]
    stacked = np.stack([full[:, :, q1::s1, q2::s2] for q1, q2 in phases], axis=2)  # (c_out, i, s1 s2, m1, m2)
    transfer = np.fft.fft2(stacked, axes=(3, 4)).reshape(c_out, c_in_g * s1 * s2, m1, m2)
    _clip_each_frequency(transfer, groups, max_singular_value)
    spatial = np.fft.ifft2(transfer, axes=(2, 3)).real.reshape(c_out, c_in_g, s1 * s2, m1, m2)
    clipped_full = np.zeros_like(full)
    for index, (q1, q2) in enumerate(phases):
        clipped_full[:, :, q1::s1, q2::s2] = spatial[:, :, index]
    return clipped_full[:, :, 0:e1:d1, 0:e2:d2].copy(), clipped_full


STRIDED = [  # (c_in, c_out, kernel, stride, dilation, groups, n), n divisible by the stride
    (3, 4, (3, 3), (2, 2), (1, 1), 1, (8, 8)),
    (4, 6, (3, 2), (2, 1), (1, 2), 2, (8, 7)),
    (2, 3, (1, 1), (2, 2), (1, 1), 1, (6, 6)),  # kernel smaller than the stride
    (6, 6, (5, 3), (3, 2), (1, 1), 3, (9, 8)),
    (4, 4, (3, 3), (2, 2), (2, 2), 2, (10, 10)),  # dilated and strided
    (2, 5, (2, 3), (1, 2), (2, 1), 1, (7, 6)),
]


def _strided_layer(kind, c_in, c_out, kernel, stride, dilation, groups, seed):
    torch.manual_seed(seed)
    conv = dict(in_channels=c_in, out_channels=c_out, kernel_size=kernel, stride=stride, dilation=dilation,
                groups=groups, dtype=torch.float64)
    return nn.Conv2d(**conv) if kind == "conv" else SVDConv(**conv)


@pytest.mark.parametrize("kind", ["conv", "svd"])
@pytest.mark.parametrize("c_in, c_out, kernel, stride, dilation, groups, n", STRIDED)
def test_strided_clip_clips_the_polyphase_spectrum_like_an_independent_reference(
        kind, c_in, c_out, kernel, stride, dilation, groups, n):
    layer = _strided_layer(kind, c_in, c_out, kernel, stride, dilation, groups, seed=sum(kernel) + 7 * groups)
    before = _dense(layer)
    values = circular_singular_values(before, n, stride, dilation, groups)
    target = 0.5 * float(values[0])
    expected, clipped_full = _reference_strided_clip(before, n, target, stride, dilation, groups)
    # The reference is right: its unprojected kernel's *strided* operator has exactly the
    # clipped spectrum (explicit operator matrices).
    full_values = circular_singular_values(torch.from_numpy(clipped_full).to(before.device), n, stride, (1, 1), groups)
    assert torch.allclose(full_values, values.clamp(max=target), atol=1e-10)
    reached = clip_singular_values_(layer, target, n)
    assert np.abs(_dense(layer).cpu().numpy() - expected).max() <= 1e-10 * max(1.0, np.abs(expected).max())
    assert reached == pytest.approx(_oracle(layer, n, stride), rel=1e-9)  # the strided norm, reported


@pytest.mark.parametrize("kind", ["conv", "svd"])
def test_strided_clip_changes_the_kernel_less_than_the_stride1_clip(kind):
    """At one target for the strided norm, clipping the stride-1 operator over-constrains."""
    layer = _strided_layer(kind, 8, 8, (3, 3), (2, 2), (1, 1), 1, seed=11)
    n = (8, 8)
    before = _dense(layer).cpu().numpy().copy()  # not a view of the parameter clipped in place
    target = 0.5 * _oracle(layer, n, (2, 2))
    stride1, _ = _reference_clip(_dense(layer), n, target, (1, 1), 1)
    clip_singular_values_(layer, target, n)
    change = np.linalg.norm(_dense(layer).cpu().numpy() - before) / np.linalg.norm(before)
    assert change < 0.9 * np.linalg.norm(stride1 - before) / np.linalg.norm(before)


@pytest.mark.parametrize("kind", ["conv", "svd"])
def test_indivisible_size_clips_the_stride1_operator(kind):
    layer = _strided_layer(kind, 3, 4, (3, 3), (2, 2), (1, 1), 1, seed=3)
    n = (9, 8)  # 9 is not divisible by 2: the stride-1 operator is clipped (its norm bounds the strided one)
    before = _dense(layer)
    target = 0.5 * _oracle(layer, n, (1, 1))
    expected, _ = _reference_clip(before, n, target, (1, 1), 1)
    reached = clip_singular_values_(layer, target, n)
    assert np.abs(_dense(layer).cpu().numpy() - expected).max() <= 1e-10 * max(1.0, np.abs(expected).max())
    assert reached == pytest.approx(_oracle(layer, n, (1, 1)), rel=1e-9)


@pytest.mark.parametrize("n", [(7, 8), (8, 7), (6, 6), (5, 5), (4, 9), (3, 3)])
def test_half_plane_clip_equals_the_full_plane_clip(n):
    """Only frequencies v <= n2 // 2 are decomposed (odd and even n2: the Nyquist column)."""
    torch.manual_seed(n[0] * 10 + n[1])
    layer = nn.Conv2d(4, 5, 3, dtype=torch.float64)
    target = 0.4 * _oracle(layer, n, (1, 1))
    expected, _ = _reference_clip(layer.weight, n, target, (1, 1), 1)  # numpy fft2, every frequency
    clip_singular_values_(layer, target, n)
    assert np.abs(layer.weight.detach().cpu().numpy() - expected).max() <= 1e-12 * np.abs(expected).max()


@pytest.mark.parametrize("stride", [(2, 2), (1, 1)])
def test_svdconv_clip_leaves_the_canonical_form_and_equals_the_dense_clip(stride):
    layer = SVDConv(6, 8, 3, stride=stride, rank=(4, 3), dtype=torch.float64)
    dense = nn.Conv2d(6, 8, 3, stride=stride, bias=False, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        layer.U.mul_(1.5)  # U no longer orthonormal: the clip works in an orthonormal basis of span(U)
        layer.S.div_(1.5)
    n = (8, 8)
    target = 0.5 * _oracle(layer, n, stride)
    clip_singular_values_(layer, target, n)
    clip_singular_values_(dense, target, n)
    assert torch.allclose(_dense(layer), _dense(dense), rtol=0, atol=1e-12)
    eye_u, eye_v = torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    assert torch.allclose(layer.U.T @ layer.U, eye_u, atol=1e-12)
    assert torch.allclose(layer.V.T @ layer.V, eye_v, atol=1e-12)
    rows = layer.core.detach().reshape(4, -1)
    assert torch.allclose(rows @ rows.T, eye_u, atol=1e-12)
    assert bool((layer.S[:-1] >= layer.S[1:]).all()) and bool((layer.S >= 0).all())


# ----------------------------------------------------------------- the certified exact norm
def _numpy_max_singular_value(matrices):
    return float(np.linalg.svd(matrices.cpu().numpy(), compute_uv=False)[..., 0].max())


def test_certified_norm_finds_a_maximum_the_power_iteration_misses():
    """The top singular vector of matrix 0 is orthogonal to the column the power iteration
    starts from (that of the largest Gram diagonal), so its Rayleigh quotient stays at 0.5
    while its norm is 1; matrix 1 (norm^2 0.7) ranks first. The Cholesky certificate at the
    best value found (0.7) fails for matrix 0, which is then decomposed exactly."""
    top = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64) / 3 ** 0.5
    second = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    tricky = (torch.outer(top, top) + 0.5 ** 0.5 * torch.outer(second, second)).to(torch.complex128)
    plain = torch.diag(torch.tensor([0.7 ** 0.5, 0.1, 0.1, 0.1], dtype=torch.float64)).to(torch.complex128)
    for batch in (torch.stack([tricky, plain]), torch.stack([plain, tricky])):
        assert float(spectra.certified_batch_max(batch, None)) == pytest.approx(1.0, rel=1e-14)
        known = torch.tensor(0.8 ** 0.5, dtype=torch.float64)  # a best value from an earlier batch
        assert float(spectra.certified_batch_max(batch, known)) == pytest.approx(1.0, rel=1e-14)


@pytest.mark.parametrize("dtype, rel", [(torch.complex128, 1e-13), (torch.complex64, 1e-6)])
def test_certified_norm_with_near_ties_and_zero_matrices(dtype, rel, device):
    """Many matrices whose largest singular values agree to 1e-12 (a flat spectrum), rectangular
    both ways, and all-zero matrices: the maximum is still that of numpy's SVD. (Drawn on the
    CPU, then moved: the same matrices on every device.)"""
    generator = torch.Generator().manual_seed(0)
    for o, i in ((5, 3), (3, 5), (4, 4)):
        with torch.device("cpu"):
            left = torch.linalg.qr(torch.randn(40, o, o, dtype=torch.complex128, generator=generator))[0]
            right = torch.linalg.qr(torch.randn(40, i, i, dtype=torch.complex128, generator=generator))[0]
            values = torch.rand(40, min(o, i), dtype=torch.float64, generator=generator) * 0.9
            values[:, 0] = 1.0 - 1e-12 * torch.arange(40, dtype=torch.float64)  # near ties
            matrices = (left[:, :, :min(o, i)] * values[:, None, :].to(left.dtype)) @ right[:, :, :min(o, i)].mH
            matrices[5:9] = 0
        matrices = matrices.to(dtype=dtype, device=device)
        assert float(spectra.certified_batch_max(matrices, None)) == pytest.approx(_numpy_max_singular_value(matrices), rel=rel)
    zero = torch.zeros(3, 2, 2, dtype=dtype)
    assert float(spectra.certified_batch_max(zero, None)) == 0.0


def test_certified_norm_on_a_batch_large_enough_for_batched_matvecs(device):
    generator = torch.Generator().manual_seed(2)
    matrices = torch.randn(4200, 16, 16, dtype=torch.complex128, generator=generator, device="cpu")  # > 2^20 Gram entries
    matrices = matrices.to(device)
    assert float(spectra.certified_batch_max(matrices, None)) == pytest.approx(_numpy_max_singular_value(matrices), rel=1e-13)


@pytest.mark.parametrize("index, config", list(enumerate(random_conv_configs(24, seed=21, max_in_numel=400))))
def test_certified_norm_equals_the_oracle_in_one_or_many_frequency_batches(index, config, monkeypatch):
    torch.manual_seed(index)
    weight = torch.randn(config["conv"]["out_channels"], config["conv"]["in_channels"] // config["conv"]["groups"],
                         *config["conv"]["kernel_size"], dtype=torch.float64)
    if index % 3 == 0:
        weight[:, :, 1:] = 0  # a kernel with an empty row: flat spectrum along one axis
    conv, n = config["conv"], config["n"]
    stride, dilation, groups = conv["stride"], conv["dilation"], conv["groups"]
    expected = float(circular_singular_values(weight, n, stride, dilation, groups)[0])
    assert _certified_norm(weight, n, stride, dilation, groups) == pytest.approx(expected, rel=1e-12)
    original = spectra.transfer_batches

    def one_frequency_per_batch(kernel, m, max_memory, per_frequency_factor=4):
        g, o, i, t1, t2 = kernel.shape
        element = 16 if kernel.dtype == torch.float64 else 8
        return original(kernel, m, (per_frequency_factor * g * o * i + t1 * t2) * element,
                        per_frequency_factor=per_frequency_factor)

    monkeypatch.setattr(spectra, "transfer_batches", one_frequency_per_batch)
    assert _certified_norm(weight, n, stride, dilation, groups) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("scale", [1.0, 1e19, 1e-18])
def test_certified_norm_in_float32_over_the_whole_range(scale):
    torch.manual_seed(1)
    weight = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    expected = float(circular_singular_values(weight, (12, 12), (2, 2), (1, 1), 2)[0])
    value = _certified_norm((weight * scale).float(), (12, 12), (2, 2), (1, 1), 2)
    assert value == pytest.approx(expected * scale, rel=2e-6)


# ----------------------------------------------------------------- regularizer values
def _fantastic_four(weight, groups):
    """Singla & Feizi: max over groups of min over four reshapes of sqrt(kh kw) ||M||_2 (numpy)."""
    k = weight.detach().cpu().numpy().astype(np.float64)
    c_out, i, kh, kw = k.shape
    o = c_out // groups
    best = []
    for g in range(groups):
        b = k[g * o:(g + 1) * o]
        reshapes = [b.transpose(0, 2, 1, 3).reshape(o * kh, i * kw), b.transpose(0, 3, 1, 2).reshape(o * kw, i * kh),
                    b.reshape(o, i * kh * kw), b.transpose(0, 2, 3, 1).reshape(o * kh * kw, i)]
        best.append(min(np.sqrt(kh * kw) * np.linalg.norm(m, 2) for m in reshapes))
    return max(best)


def _regularizer_model(dilation):
    torch.manual_seed(5)
    model = nn.Sequential(
        SVDConv(3, 6, 3, padding=1, rank=3, dtype=torch.float64), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=dilation, dilation=dilation, groups=2, dtype=torch.float64), nn.ReLU(),
        SVDConv(6, 4, (3, 2), stride=2, padding=1, groups=2, dtype=torch.float64), nn.ReLU(),  # 9x9: not divisible
        nn.Conv2d(4, 4, 1, stride=2, dtype=torch.float64),
    )
    with torch.no_grad():  # norms well away from 1 (variance-preserving initialisation puts them near 1)
        for index, factor in zip((0, 2, 4, 6), (3.0, 2.5, 0.3, 4.0)):
            layer = model[index]
            (layer.S if isinstance(layer, SVDConv) else layer.weight).mul_(factor)
    return model


def _control(model):
    control = SpectralControl(model, 1.0, example_input=torch.zeros(1, 3, 9, 9, dtype=torch.float64))
    assert {name: size for name, _, size in control.layers} == {"0": (9, 9), "2": (9, 9), "4": (9, 9), "6": (5, 5)}
    return control


def test_exact_regularizer_is_the_sum_of_squared_oracle_norms():
    control = _control(_regularizer_model(dilation=2))
    norms = []
    for _, layer, size in control.layers:
        divisible = all(a % s == 0 for a, s in zip(size, layer.stride))
        norms.append(_oracle(layer, size, layer.stride if divisible else (1, 1)))
    assert all(abs(value - 1) > 0.05 for value in norms)  # a square differs from its value
    assert control.regularizer("exact").item() == pytest.approx(sum(v * v for v in norms), rel=1e-9)


def test_fantastic_four_regularizer_is_the_sum_of_squared_independent_bounds():
    control = _control(_regularizer_model(dilation=1))
    bounds = [_fantastic_four(_dense(layer), layer.groups) for _, layer, _ in control.layers]
    assert all(abs(value - 1) > 0.05 for value in bounds)
    expected = sum(v * v for v in bounds)
    assert control.regularizer("fantastic_four").item() == pytest.approx(expected, rel=1e-9)
    assert control.regularizer().item() == pytest.approx(expected, rel=1e-9)  # the default method
