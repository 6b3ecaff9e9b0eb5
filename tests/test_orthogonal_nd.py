"""core_kind='orthogonal' on every layer kind: 1-D, 2-D, 3-D, transposed, strided, non-square ranks.

The oracle is the explicit float64 matrix of the circular operator of the torch layer that
``to_conv()`` returns (``tests/circular_oracle.py``: any input size, folding included), and
for a transposed layer the transpose of the circular conv it is the adjoint of, on the grid
``m * stride``. The claim checked is the documented one: the nonzero singular values are
exactly ``|S|``, each once per output position of that operator, and the rest are zeros.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from torch import nn

from circular_oracle import circular_conv_any_size
from conv_calls import ConvCalls, channels_last_backward_survives
from oracle import deterministic_cudnn, operator_matrix, svdvals_cpu
from ttconv import (
    SVDConv,
    SVDConv1d,
    SVDConv3d,
    SVDConvTranspose1d,
    SVDConvTranspose2d,
    SVDConvTranspose3d,
    clip_singular_values_,
    scale_to_spectral_norm_,
)
from ttconv.layer import _SVDConvNd

CLASSES = {  # class: (dims, transposed)
    SVDConv1d: (1, False), SVDConv: (2, False), SVDConv3d: (3, False),
    SVDConvTranspose1d: (1, True), SVDConvTranspose2d: (2, True), SVDConvTranspose3d: (3, True),
}
PER_CLASS = {1: 45, 2: 35, 3: 25}  # 210 configurations
MAX_OPERATOR_SIDE = 400  # rows or columns of an explicit operator, to keep the SVDs small


def _random_config(rng: random.Random, dims: int, transposed: bool) -> dict:
    """Channels, kernel, stride, dilation, groups, padding, ranks (square, r_out < r_in, and
    r_out > r_in at stride 1) and an input size that may be smaller than the kernel."""
    while True:
        groups = rng.choice([1, 1, 1, 2])
        c_in, c_out = groups * rng.randint(1, 5), groups * rng.randint(1, 5)
        kernel = tuple(rng.randint(1, 4 if dims == 1 else 3) for _ in range(dims))
        stride = tuple(rng.choice([1, 1, 2]) for _ in range(dims))
        dilation = tuple(rng.choice([1, 1, 2]) for _ in range(dims))
        layer = dict(in_channels=c_in, out_channels=c_out, kernel_size=kernel, stride=stride, dilation=dilation,
                     groups=groups, bias=rng.random() < 0.5)
        if transposed:
            layer["padding"] = tuple(rng.randint(0, 1) for _ in range(dims))
            layer["output_padding"] = tuple(rng.randint(0, max(s, d) - 1) for s, d in zip(stride, dilation))
        else:
            layer["padding"] = tuple(rng.randint(0, 1) for _ in range(dims))
            layer["padding_mode"] = rng.choice(["zeros", "zeros", "circular", "reflect"])
        kind = rng.choice(["none", "int", "pair", "pair"])
        rank = None if kind == "none" else rng.randint(1, 5) if kind == "int" else (rng.randint(1, 5),
                                                                                    rng.randint(1, 5))
        if isinstance(rank, tuple) and rank[0] > rank[1] and any(s > 1 for s in stride):
            rank = (rank[1], rank[0])  # refused for strided layers (tested separately)
        # The spectral input size: m for a transposed layer (its grid is m * stride), else n = m * stride.
        m = tuple(rng.randint(1, 4 if dims < 3 else 2) for _ in range(dims))
        size = m if transposed else tuple(mi * si for mi, si in zip(m, stride))
        grid = tuple(mi * si for mi, si in zip(m, stride))
        channels = c_out if transposed else c_in  # the input channels of the circular conv on the grid
        if max(channels * math.prod(grid), max(c_in, c_out) * math.prod(grid)) > MAX_OPERATOR_SIDE:
            continue
        return dict(layer=layer, rank=rank, size=size, bounded=rng.random() < 0.5, seed=rng.randint(0, 10**6))


def _configs():
    rng = random.Random(2026)
    cases = []
    for cls, (dims, transposed) in CLASSES.items():
        for index in range(PER_CLASS[dims]):
            cases.append(pytest.param(cls, _random_config(rng, dims, transposed), id=f"{cls.__name__}-{index}"))
    return cases


def _layer(cls, config) -> _SVDConvNd:
    """An orthogonal layer with arbitrary raw factors and distinct singular values set through
    ``set_singular_values_`` (the construction must not depend on the parameters' values)."""
    torch.manual_seed(config["seed"])
    bound = 2.5 if config["bounded"] else None
    layer = cls(**config["layer"], rank=config["rank"], core_kind="orthogonal", max_singular_value=bound,
                dtype=torch.float64)
    with torch.no_grad():
        for p in (layer.U, layer.V, layer.core):
            p.copy_(torch.randn_like(p))
    values = torch.rand(layer.S.shape, dtype=torch.float64) * 2.4 + 0.05
    if bound is None:
        values = values * torch.where(torch.rand_like(values) < 0.3, -1.0, 1.0)  # signs do not matter
    layer.set_singular_values_(values)
    return layer


def _oracle_singular_values(layer, size) -> torch.Tensor:
    """Singular values of the layer's circular operator on ``size``, from the explicit matrix of the
    torch layer's circular conv (the transpose of it for a transposed layer), descending."""
    weight = layer.to_conv().weight.detach()
    if layer._transposed:
        grid = tuple(m * s for m, s in zip(size, layer.stride))
        conv = circular_conv_any_size(weight, layer.stride, layer.dilation, layer.groups)  # out -> in channels
        matrix = operator_matrix(conv, (layer.out_channels, *grid)).T
    else:
        conv = circular_conv_any_size(weight, layer.stride, layer.dilation, layer.groups)
        matrix = operator_matrix(conv, (layer.in_channels, *size))
    return svdvals_cpu(matrix)  # LAPACK on the CPU whatever the test's device: the oracle is the same everywhere


def _large_enough(layer, size):
    """An input size at least ``size`` on which torch runs the layer (covers the dilated kernel)."""
    return tuple(max(n, d * (k - 1) + 1) + 2 for n, k, d in zip(size, layer.kernel_size, layer.dilation))


@pytest.mark.parametrize("cls, config", _configs())
def test_singular_values_are_exactly_s_on_the_explicit_operator(cls, config):
    layer = _layer(cls, config)
    size = config["size"]
    truth = _oracle_singular_values(layer, size)
    claimed = layer.singular_values(size).detach()
    assert claimed.shape == truth.shape
    assert float((claimed - truth).abs().max()) < 1e-11 * max(1.0, float(truth[0]))
    # The nonzero ones are |S|, each once per output position of the (strided) circular operator.
    grid = tuple(m * s for m, s in zip(size, layer.stride)) if layer._transposed else size
    positions = math.prod(n // s for n, s in zip(grid, layer.stride))
    expected = layer.effective_S().detach().abs().repeat_interleave(positions).sort(descending=True).values
    deviation = truth[: expected.numel()] - expected
    # (the message tells a uniform scale of the built operator from round-off noise)
    assert float(deviation.abs().max()) < 1e-11, f"relative deviations {(deviation / expected).tolist()}"
    assert float(torch.cat([truth[expected.numel():], truth.new_zeros(1)]).abs().max()) < 1e-11
    assert float(layer.spectral_norm(size).detach()) == pytest.approx(float(truth[0]), rel=1e-12, abs=1e-12)
    # The layer is the torch layer whose operator that is (the oracle's premise).
    conv = layer.to_conv()
    x = torch.randn(2, layer.in_channels, *_large_enough(layer, size), dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(layer(x), conv(x), rtol=0, atol=1e-12 * (1 + float(conv(x).abs().max())))


def _outputs_and_gradients(layer, x):
    y = layer(x)
    layer.zero_grad(set_to_none=True)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, retain_graph=True)
    y.square().sum().backward()
    return [y.detach(), grad_x] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("cls, config", _configs())
def test_separable_path_is_the_torch_layer_with_the_dense_paths_gradients(cls, config):
    """``path='separable'`` (the kernel's halves as two convs, each axis's stride, dilation and
    padding on the conv whose taps run along it; for a transposed layer their adjoints in the
    reverse order, with each axis's output padding) computes the torch layer that
    ``to_conv()`` returns, and every gradient equals the dense path's (which composes the
    joined kernel)."""
    layer = _layer(cls, config)
    x = torch.randn(2, layer.in_channels, *_large_enough(layer, config["size"]), dtype=torch.float64,
                    requires_grad=True)
    layer.path = "dense"
    dense = _outputs_and_gradients(layer, x)
    layer.path = "separable"
    separable = _outputs_and_gradients(layer, x)
    scale = 1 + float(dense[0].abs().max())
    with torch.no_grad():
        assert torch.allclose(separable[0], layer.to_conv()(x), rtol=0, atol=1e-12 * scale)
        assert torch.allclose(layer(x[0]), separable[0][0], rtol=0, atol=1e-12 * scale)  # unbatched
    for a, b in zip(separable[1:], dense[1:]):
        assert torch.allclose(a, b, rtol=0, atol=1e-11 * (1 + float(b.abs().max())))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", ["same", "valid", "asymmetric"])
def test_separable_path_splits_every_padding_by_axis(dims, padding_mode, padding):
    """String paddings (``'same'`` with even kernels pads one side more), per-axis amounts
    that differ, and every padding mode: the separable path is the torch layer."""
    cls = {1: SVDConv1d, 2: SVDConv, 3: SVDConv3d}[dims]
    kernel = (2, 3, 2)[:dims]
    dilation = (1, 2, 1)[:dims]
    amount = "same" if padding == "same" else "valid" if padding == "valid" else (2, 0, 1)[:dims]
    torch.manual_seed(dims)
    layer = cls(4, 6, kernel, padding=amount, dilation=dilation, groups=2, padding_mode=padding_mode,
                core_kind="orthogonal", path="separable", dtype=torch.float64)
    with torch.no_grad():
        for p in (layer.U, layer.V, layer.core, layer.S, layer.bias):
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 4, *(5, 6, 4)[:dims], dtype=torch.float64)
    with torch.no_grad():
        expected = layer.to_conv()(x)
        assert torch.allclose(layer(x), expected, rtol=0, atol=1e-12 * (1 + float(expected.abs().max())))


@pytest.mark.parametrize("cls, config", [case for case in _configs() if case.values[1]["layer"].get(
    "padding_mode", "zeros") == "zeros"][::3])
def test_max_s_bounds_the_zero_padded_operator(cls, config):
    """With zero padding (and a transposed layer's output_padding) the layer's own operator is a
    block of a circular one on a larger grid: ``max |S|`` bounds its norm."""
    layer = _layer(cls, config)
    layer.bias = None
    size = _large_enough(layer, config["size"])
    with torch.no_grad():
        matrix = operator_matrix(layer, (layer.in_channels, *size))
    norm = float(svdvals_cpu(matrix)[0])
    assert norm <= float(layer.effective_S().detach().abs().max()) * (1 + 1e-12)


@pytest.mark.parametrize("cls", list(CLASSES))
def test_non_square_ranks_both_ways_and_the_refused_case(cls):
    dims, _ = CLASSES[cls]
    for rank in [(2, 4), (4, 2)]:
        layer = cls(4, 4, 3, rank=rank, core_kind="orthogonal", dtype=torch.float64)
        assert layer.ranks == rank and layer.S.shape == (2,) and layer.core.shape == (1, 1 + 2 * dims, 4, 4)
        U, S, core, V = layer.factors()
        assert U.shape == (4, rank[0]) and V.shape == (4, rank[1]) and core.shape == (rank[0], rank[1], *(3,) * dims)
    with pytest.raises(ValueError, match=r"with stride .* needs rank\[0\] <= rank\[1\], got rank=\(4, 2\).*Pass "
                                         r"rank=\(2, 2\)"):
        cls(4, 4, 3, stride=2, rank=(4, 2), core_kind="orthogonal")
    if dims > 1:  # a stride along one axis only is a stride too
        with pytest.raises(ValueError, match=r"needs rank\[0\] <= rank\[1\]"):
            cls(4, 4, 3, stride=(1,) * (dims - 1) + (2,), rank=(4, 2), core_kind="orthogonal")
    assert cls(4, 4, 3, stride=2, rank=(2, 4), core_kind="orthogonal").ranks == (2, 4)
    with pytest.raises(ValueError, match=r"values must hold groups \* min\(r_out, r_in\) = 2 singular values"):
        cls(4, 4, 3, rank=(2, 4), core_kind="orthogonal").set_singular_values_(torch.ones(4))
    # rank=None or an int: square, as large as both channel counts allow (per group).
    assert cls(4, 6, 3, groups=2, core_kind="orthogonal").ranks == (2, 2)
    assert cls(6, 4, 3, rank=5, core_kind="orthogonal").ranks == (4, 4)


@pytest.mark.parametrize("cls", list(CLASSES))
def test_state_dict_round_trip_canonicalize_and_repr(cls):
    dims, _ = CLASSES[cls]
    layer = cls(4, 6, 3, padding=1, rank=(3, 2), core_kind="orthogonal", max_singular_value=1.5, dtype=torch.float64)
    fresh = cls(4, 6, 3, padding=1, rank=(3, 2), core_kind="orthogonal", max_singular_value=1.5, dtype=torch.float64)
    fresh.load_state_dict(layer.state_dict())
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in layer.state_dict().items()
               if isinstance(value, torch.Tensor))
    x = torch.randn(1, 4, *(5,) * dims, dtype=torch.float64)
    with deterministic_cudnn():  # bitwise: on CUDA a transposed conv may otherwise accumulate in another order
        assert torch.equal(fresh(x), layer(x))
    with pytest.raises(RuntimeError, match="rank=\\(3, 2\\), this layer rank=\\(2, 2\\)"):
        cls(4, 6, 3, padding=1, rank=2, core_kind="orthogonal", max_singular_value=1.5).load_state_dict(layer.state_dict())
    with torch.no_grad():
        layer.U.mul_(3.0).add_(0.1)
        layer.V.mul_(0.5)
    before = layer(x)
    layer.canonicalize_()
    assert torch.allclose(layer(x), before, rtol=0, atol=1e-12)
    assert torch.allclose(layer.U.T @ layer.U, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(layer.V.T @ layer.V, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert "rank=(3, 2), core_kind='orthogonal', max_singular_value=1.5" in repr(layer)
    with pytest.raises(AttributeError, match="to_conv2d" if cls is SVDConv else r"layer\.to_conv\(\)"):
        layer.weight = layer.dense_weight().detach()


@pytest.mark.parametrize("cls", list(CLASSES))
def test_gradients_and_the_bound_during_training(cls):
    dims, _ = CLASSES[cls]
    torch.manual_seed(1)
    layer = cls(4, 4, 3, stride=2, padding=1, rank=(3, 4), core_kind="orthogonal", max_singular_value=0.5)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    size = (4,) * dims
    for _ in range(25):
        loss = -layer(torch.randn(2, 4, *size)).square().mean()  # pushes the norm up as hard as it can
        optimizer.zero_grad()
        loss.backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        optimizer.step()
        assert float(layer.spectral_norm(size).detach()) <= 0.5
    assert float(layer.spectral_norm(size).detach()) > 0.45


@pytest.mark.parametrize("cls", [SVDConv1d, SVDConvTranspose2d, SVDConv3d])
def test_gradcheck_through_bcop_and_the_input_side_scaling(cls):
    dims, _ = CLASSES[cls]
    layer = cls(2, 3, 2, rank=(3, 2), core_kind="orthogonal", max_singular_value=2.0, dtype=torch.float64,
                path="factored")
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(1, 2, *(3,) * dims, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    with deterministic_cudnn():  # its reentrancy check wants the same bits from two backward runs
        assert torch.autograd.gradcheck(fn, (x, *layer.parameters()))


@pytest.mark.parametrize("cls", list(CLASSES))
def test_clip_and_scale_are_exact_on_every_kind(cls):
    dims, transposed = CLASSES[cls]
    layer = cls(4, 4, 3, stride=2, padding=1, rank=(2, 3), core_kind="orthogonal", dtype=torch.float64)
    layer.set_singular_values_(torch.tensor([0.3, 2.0], dtype=torch.float64))
    size = (2,) * dims if transposed else (4,) * dims
    assert clip_singular_values_(layer, 1.0, size) == pytest.approx(1.0)
    assert float(_oracle_singular_values(layer, size)[0]) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(layer.effective_S(), torch.tensor([0.3, 1.0], dtype=torch.float64))
    assert scale_to_spectral_norm_(layer, 0.5, size) == pytest.approx(0.5)
    assert float(_oracle_singular_values(layer, size)[0]) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("cls", list(CLASSES))
def test_spectrum_refuses_a_grid_the_stride_does_not_divide(cls):
    dims, transposed = CLASSES[cls]
    layer = cls(2, 2, 3, stride=2, core_kind="orthogonal")
    if transposed:  # the grid is m * stride: always divisible
        assert layer.singular_values((3,) * dims).numel() == 2 * 3 ** dims
        return
    with pytest.raises(ValueError, match="not divisible by stride"):
        layer.singular_values((5,) * dims)
    with pytest.raises(ValueError, match="not divisible by stride"):
        layer.spectral_norm((5,) * dims)


def test_fresh_orthogonal_layers_have_torchs_init_norm():
    """``||W||_F^2 = sum S^2 = A / 3`` for torch's weight layout ``(A, B/g, *k)``, as torch's init."""
    for cls in CLASSES:
        for rank in [None, (2, 5), (5, 2)]:
            layer = cls(6, 8, 3, rank=rank, core_kind="orthogonal", dtype=torch.float64)
            conv = layer.to_conv()
            rows = conv.weight.shape[0]
            assert float(layer.dense_weight().detach().square().sum()) == pytest.approx(rows / 3, rel=1e-10)
    assert isinstance(SVDConv1d(2, 2, 3, core_kind="orthogonal").to_conv(), nn.Conv1d)


@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("rank", [None, (2, 4), (4, 2), (3, 3), 1])
def test_dense_weight_with_v_folded_into_bcop_is_the_composed_factors(cls, rank):
    """``dense_weight`` folds ``V^T`` into BCOP's first matrix when ``r_in`` is near ``c_in/g``:
    the same kernel as composing ``factors()`` (the general route, ``ttconv.tt.compose``)."""
    from ttconv.tt import compose

    dims, _ = CLASSES[cls]
    torch.manual_seed(4)
    layer = cls(8, 10, (3, 2, 2)[:dims], groups=2, rank=rank, core_kind="orthogonal", dtype=torch.float64)
    with torch.no_grad():
        for p in (layer.U, layer.V, layer.core, layer.S):
            p.copy_(torch.randn_like(p))
    U, S, core, V = layer.factors()
    composed = compose(U, S, layer._tt_core(core), V, layer.groups).reshape(layer.dense_weight().shape)
    assert torch.allclose(layer.dense_weight(), composed, rtol=0, atol=1e-13)
    assert torch.allclose(layer._orthogonal_dense_weight().reshape(composed.shape), composed, rtol=0, atol=1e-13)


@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("path", ["dense", "factored", "auto", "separable"])
def test_fx_symbolic_trace_computes_the_same(cls, path):
    dims, _ = CLASSES[cls]
    layer = cls(4, 6, 3, rank=(3, 2), core_kind="orthogonal", path=path, dtype=torch.float64)
    x = torch.randn(2, 4, *(5,) * dims, dtype=torch.float64)
    expected = layer(x)
    assert torch.allclose(torch.fx.symbolic_trace(layer)(x), expected, rtol=0, atol=1e-12)


def test_bcop_inputs_fold_into_the_first_matrix():
    from ttconv.orthogonal import bcop_kernel, bcop_parameter_count, compose_kernels

    torch.manual_seed(5)
    generators = torch.randn(2, bcop_parameter_count((3, 2)), 5, 5, dtype=torch.float64)
    inputs = torch.randn(2, 3, 7, dtype=torch.float64)
    full = bcop_kernel(generators, (3, 2))
    expected = compose_kernels(full[:, :, :3], inputs[..., None, None])
    assert torch.allclose(bcop_kernel(generators, (3, 2), inputs=inputs), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("cls, input_size, stride", [
    (SVDConv, (8, 7), 1), (SVDConv, (15, 8), 2), (SVDConv3d, (4, 3, 4), 1),
    (SVDConvTranspose2d, (4, 4), 2), (SVDConvTranspose3d, (2, 3, 2), 1)])
def test_separable_path_in_float32_is_the_same_layer_in_torchs_layout(cls, input_size, stride):
    """The separable path in float32 (the dtype oneDNN runs, where the float64 sweeps above
    run torch's reference kernels) is the same layer: the output and every gradient agree
    with the float64 dense path to float32 round-off (batched and unbatched, reflect padding,
    groups), and the output has the layout torch's own conv returns for the input's
    (channels-first for a channels-first input, channels-last for a channels-last one)."""
    torch.manual_seed(len(input_size) + stride)
    dims = len(input_size)
    options = {} if CLASSES[cls][1] else {"padding_mode": "reflect"}
    reference = cls(6, 4, 3, stride=stride, padding=1, groups=2, core_kind="orthogonal", path="dense",
                    dtype=torch.float64, **options)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p))
    layer = copy.deepcopy(reference).float()
    layer.path = "separable"
    x64 = torch.randn(3, 6, *input_size, dtype=torch.float64, requires_grad=True)
    x32 = x64.detach().float().requires_grad_()
    expected, got = _outputs_and_gradients(reference, x64), _outputs_and_gradients(layer, x32)
    for a, b in zip(got, expected):
        assert torch.allclose(a.double(), b, rtol=0, atol=2e-5 * (1 + float(b.abs().max())))
    torch_layer = layer.to_conv()
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    for x in (x32.detach(), x32.detach().contiguous(memory_format=layout)):
        with torch.no_grad():
            y, y_torch = layer(x), torch_layer(x)
        assert y.stride() == y_torch.stride() and torch.allclose(y, y_torch, rtol=0, atol=2e-5)
        with torch.no_grad():
            assert torch.allclose(layer(x[0]), y[0], rtol=0, atol=2e-6)  # unbatched


def test_a_one_tap_last_axis_is_strided_by_the_separable_paths_first_conv():
    """With one tap along the last axis neither half has taps there, so the first conv takes
    that axis's stride (and padding) and the second is a stride-1 channel mixing: fewer
    positions, and no 1 x 1 conv strided along the last axis alone, which with 2-4 input
    channels corrupted memory in oneDNN's channels-last backward (torch 2.13, one thread;
    the second conv of a rank-4 strided 1 x 1 layer was one). The crash is checked in a
    subprocess, where it cannot take the test run down."""
    torch.manual_seed(0)
    layer = SVDConv(8, 8, (3, 1), stride=2, padding=(1, 1), rank=4, core_kind="orthogonal", path="separable",
                    padding_mode="reflect", dtype=torch.float64)
    x = torch.randn(2, 8, 9, 8, dtype=torch.float64)
    with ConvCalls() as seen, torch.no_grad():
        y = layer(x)
    assert seen.calls == [((3, 1), (2, 2)), ((1, 1), (1, 1))]
    with torch.no_grad():
        assert torch.allclose(y, layer.to_conv()(x), rtol=0, atol=1e-12 * (1 + float(y.abs().max())))
    done = channels_last_backward_survives(
        "ttconv.SVDConv(64, 64, 1, stride=2, rank=4, core_kind='orthogonal', path='separable')")
    assert done.returncode == 0, done.stderr[-2000:]
