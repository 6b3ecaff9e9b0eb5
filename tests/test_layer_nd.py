"""SVDConv1d/2d/3d and SVDConvTranspose1d/2d/3d against the torch layer they mirror.

A randomised sweep per class (seeded) over padding amounts ('same'/'valid' where torch
takes them), padding modes (transposed: zeros only, as torch), strides, dilation, groups,
rectangular kernels, output_padding and bias: at full rank the converted layer computes the
torch layer's function on every forward path to float64 round-off, ``to_conv`` gives back
its weight, the state dict round-trips and gradients reach every factor and equal torch's
input gradient. Truncation errors are checked against the dense weights directly.
"""

from __future__ import annotations

import io
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conv_calls import ConvCalls, channels_last_backward_survives
from oracle import deterministic_cudnn, operator_matrix
from ttconv import SVDConv, SVDConv1d, SVDConv2d, SVDConv3d, SVDConvTranspose1d, SVDConvTranspose2d, SVDConvTranspose3d

CLASSES = {  # SVD class: (torch class, dims, transposed)
    SVDConv1d: (nn.Conv1d, 1, False),
    SVDConv2d: (nn.Conv2d, 2, False),
    SVDConv3d: (nn.Conv3d, 3, False),
    SVDConvTranspose1d: (nn.ConvTranspose1d, 1, True),
    SVDConvTranspose2d: (nn.ConvTranspose2d, 2, True),
    SVDConvTranspose3d: (nn.ConvTranspose3d, 3, True),
}
PER_CLASS = {1: 40, 2: 30, 3: 16}


def _random_config(rng: random.Random, dims: int, transposed: bool) -> dict:
    groups = rng.choice([1, 1, 2, 3])
    c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    kernel = tuple(rng.randint(1, 3) for _ in range(dims))
    stride = tuple(rng.choice([1, 1, 2]) for _ in range(dims))
    dilation = tuple(rng.choice([1, 1, 2]) for _ in range(dims))
    config = dict(in_channels=c_in, out_channels=c_out, kernel_size=kernel, stride=stride, dilation=dilation,
                  groups=groups, bias=rng.random() < 0.7)
    if transposed:
        config["padding"] = tuple(rng.randint(0, 1) for _ in range(dims))
        config["output_padding"] = tuple(rng.randint(0, max(s, d) - 1) for s, d in zip(stride, dilation))
    else:
        choice = rng.random()
        if choice < 0.15:
            config["padding"] = "valid"
        elif choice < 0.3 and all(s == 1 for s in stride):
            config["padding"] = "same"
        else:
            config["padding"] = tuple(rng.randint(0, 2) for _ in range(dims))
        config["padding_mode"] = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
    size = tuple(rng.randint(5, 7) if dims < 3 else rng.randint(5, 6) for _ in range(dims))
    return dict(layer=config, size=size)


def _configs():
    rng = random.Random(12)
    cases = []
    for cls, (_, dims, transposed) in CLASSES.items():
        for index in range(PER_CLASS[dims]):
            cases.append(pytest.param(cls, _random_config(rng, dims, transposed), id=f"{cls.__name__}-{index}"))
    return cases


def _relative(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


def _torch_layer(cls, config):
    torch.manual_seed(hash(str(config)) % 1000)
    return CLASSES[cls][0](**config["layer"], dtype=torch.float64)


@pytest.mark.parametrize("cls, config", _configs())
def test_full_rank_matches_the_torch_layer(cls, config):
    conv = _torch_layer(cls, config)
    layer = cls.from_conv(conv)
    assert type(layer) is cls and layer.relative_error < 1e-12
    x = torch.randn(2, conv.in_channels, *config["size"], dtype=torch.float64, requires_grad=True)
    expected = conv(x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    for path in ("dense", "factored", "auto"):
        layer.path = path
        y = layer(x)
        assert y.shape == expected.shape
        assert _relative(y, expected) < 1e-12, path
        layer.zero_grad(set_to_none=True)
        (grad_x,) = torch.autograd.grad(y.square().sum(), x, retain_graph=True)
        assert _relative(grad_x, grad_expected) < 1e-11, path
        y.square().sum().backward()
        for name in ("U", "S", "core", "V"):
            grad = getattr(layer, name).grad
            assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0, (path, name)
    # Unbatched input, as torch takes it.
    assert _relative(layer(x[0]), conv(x[0])) < 1e-12
    back = layer.to_conv()
    assert type(back) is type(conv) and _relative(back.weight, conv.weight) < 1e-12
    assert repr(back) == repr(conv)
    if conv.bias is not None:
        assert torch.equal(back.bias, conv.bias)


@pytest.mark.parametrize("cls, config", _configs()[::3])
def test_state_dict_round_trip_and_repr(cls, config):
    conv = _torch_layer(cls, config)
    layer = cls.from_conv(conv, rank=1)
    kwargs = dict(config["layer"], rank=layer.ranks, dtype=torch.float64)
    fresh = cls(**kwargs)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in layer.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(2, conv.in_channels, *config["size"], dtype=torch.float64)
    with deterministic_cudnn():  # bitwise: on CUDA a transposed conv may otherwise accumulate in another order
        assert torch.equal(fresh(x), layer(x))
    # Another rank does not load silently.
    other = cls(**dict(kwargs, rank=(layer.ranks[0] + 1, layer.ranks[1] + 1)))
    if other.ranks != layer.ranks:
        with pytest.raises(RuntimeError, match=f"{cls.__name__} has rank="):
            other.load_state_dict(layer.state_dict())
    text = repr(layer)
    assert text.startswith(f"{cls.__name__}({conv.in_channels}, {conv.out_channels}, kernel_size=")
    assert f"rank={layer.ranks}" in text
    torch_text = repr(conv)[len(type(conv).__name__) + 1:-1]
    for part in torch_text.split(", "):  # every torch argument shown is shown the same way
        if "=" in part and not part.startswith("padding_mode") and not part.startswith("bias"):
            key = part.split("=")[0]
            assert f"{key}=" in text, (key, text, torch_text)


@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("rank", [1, 2, (1, 3)])
def test_truncation_error_is_the_exact_weight_error(cls, rank):
    torch_class, dims, _ = CLASSES[cls]
    torch.manual_seed(3)
    conv = torch_class(4, 6, (3,) * dims if dims < 3 else (3, 2, 2), groups=2, dtype=torch.float64)
    layer = cls.from_conv(conv, rank=rank)
    truth = _relative(layer.to_conv().weight, conv.weight)
    assert truth > 1e-3  # truncated for real
    assert abs(layer.relative_error - truth) < 1e-10 * max(1.0, truth)
    # energy: the kept fraction of the whole kernel's squared norm is at least what was asked
    kept = cls.from_conv(conv, energy=0.9)
    assert 1 - _relative(kept.to_conv().weight, conv.weight) ** 2 >= 0.9 - 1e-12


@pytest.mark.parametrize("cls", [SVDConvTranspose1d, SVDConvTranspose2d, SVDConvTranspose3d])
def test_transposed_output_size_as_torch(cls):
    torch_class, dims, _ = CLASSES[cls]
    torch.manual_seed(4)
    conv = torch_class(4, 2, 3, stride=3, padding=1, dtype=torch.float64)
    layer = cls.from_conv(conv)
    x = torch.randn(1, 4, *(4,) * dims, dtype=torch.float64)
    for extra in range(3):  # every output size the stride allows
        size = [(4 - 1) * 3 - 2 + 3 + extra] * dims
        for path in ("dense", "factored"):
            layer.path = path
            y = layer(x, output_size=size)
            assert list(y.shape[2:]) == size
            assert _relative(y, conv(x, output_size=size)) < 1e-12
    with pytest.raises(ValueError):
        layer(x, output_size=[100] * dims)


def test_svdconv2d_is_svdconv():
    assert SVDConv2d is SVDConv
    assert type(SVDConv2d(2, 3, 3)).__name__ == "SVDConv"


@pytest.mark.parametrize("cls", list(CLASSES))
def test_orthogonal_core_on_every_kind_carries_s_in_its_spec(cls):
    """Every layer kind takes core_kind='orthogonal' (tests/test_orthogonal_nd.py checks its spectrum);
    its conv_spec says the singular values are |S| and carries the bounded S."""
    layer = cls(4, 6, 3, stride=2, rank=(2, 3), core_kind="orthogonal", max_singular_value=2.0, dtype=torch.float64)
    spec = layer.conv_spec()
    assert spec.singular_values_are_s and torch.equal(spec.s, layer.effective_S()) and spec.s.shape == (2,)
    assert spec.transposed == CLASSES[cls][2]


@pytest.mark.parametrize("cls", [SVDConvTranspose1d, SVDConvTranspose2d, SVDConvTranspose3d])
def test_transposed_arguments_refused_as_torch_does(cls):
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        cls(2, 2, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="'same'/'valid'"):
        cls(2, 2, 3, padding="same")
    with pytest.raises(ValueError, match="output_padding=.* must be smaller than either stride"):
        cls(2, 2, 3, stride=2, output_padding=2)
    with pytest.raises(TypeError, match="kernel_size must be an int or"):
        cls(2, 2, (3,) * (CLASSES[cls][1] + 1))


def test_conv_arguments_refused_with_the_argument_named():
    with pytest.raises(TypeError, match="output_padding is an argument of the transposed layers only"):
        SVDConv1d(2, 2, 3, output_padding=1)
    with pytest.raises(TypeError, match=r"kernel_size must be an int or a tuple of 3 ints"):
        SVDConv3d(2, 2, (3, 3))
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        SVDConv3d(2, 2, 3, stride=(1, 2, 1), padding="same")
    with pytest.raises(TypeError, match="torch.nn.Conv1d for SVDConv1d, got Conv2d"):
        SVDConv1d.from_conv(nn.Conv2d(2, 2, 3))
    with pytest.raises(TypeError, match="use SVDConvTranspose2d.from_conv"):
        SVDConvTranspose2d.from_conv2d(nn.Conv2d(2, 2, 3))
    with pytest.raises(ValueError, match="input must be 3-D .* or 2-D"):
        SVDConv1d(2, 2, 3)(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match="input has 3 channels"):
        SVDConv3d(2, 2, 3)(torch.randn(1, 3, 5, 5, 5))


@pytest.mark.parametrize("cls", list(CLASSES))
def test_fresh_layers_initialise_like_torch(cls):
    """The composed kernel's variance and the bias bound are torch's (fan-in of torch's weight layout)."""
    torch_class, dims, _ = CLASSES[cls]
    torch.manual_seed(5)
    layer = cls(24, 64, (3,) * dims, groups=2)
    conv = torch_class(24, 64, (3,) * dims, groups=2)
    fan_in = conv.weight.shape[1] * math.prod(conv.weight.shape[2:])  # torch's: dim 1 of its layout
    variance = float(layer.dense_weight().detach().var())
    assert 0.6 < variance * 3 * fan_in < 1.6  # torch's default init: 1 / (3 fan_in)
    spread = float(layer.bias.detach().abs().max()) * math.sqrt(fan_in)  # uniform in +-1/sqrt(fan_in)
    assert 0.9 < spread <= 1


@pytest.mark.parametrize("stride, dilation, n", [(1, 1, 8), (2, 1, 8), (1, 2, 9), (3, 2, 9)])
def test_conv1d_singular_values_equal_the_explicit_circular_operator(stride, dilation, n):
    torch.manual_seed(6)
    layer = SVDConv1d(4, 6, 3, stride=stride, dilation=dilation, groups=2, rank=(2, 1), dtype=torch.float64)
    weight = layer.dense_weight().detach()
    extent = dilation * 2 + 1

    def circular(x):
        return F.conv1d(F.pad(x, (0, extent - 1), mode="circular"), weight, None, stride, 0, dilation, 2)

    matrix = operator_matrix(circular, (4, n))
    truth = torch.linalg.svdvals(matrix)
    values = layer.singular_values(n)
    assert values.shape == truth.shape
    assert torch.allclose(values, truth, rtol=0, atol=1e-12 * float(truth[0]))


@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2), ((2, 1, 1), (1, 2, 1))])
def test_conv3d_singular_values_equal_the_explicit_circular_operator(stride, dilation):
    torch.manual_seed(11)
    layer = SVDConv3d(2, 4, (2, 3, 1), stride=stride, dilation=dilation, groups=2, rank=1, dtype=torch.float64)
    weight = layer.dense_weight().detach()
    n = (6, 6, 2)
    st, dl = layer.stride, layer.dilation
    pad = []
    for axis in reversed(range(3)):
        pad += [0, dl[axis] * (layer.kernel_size[axis] - 1)]

    def circular(x):
        return F.conv3d(F.pad(x, pad, mode="circular"), weight, None, st, 0, dl, 2)

    truth = torch.linalg.svdvals(operator_matrix(circular, (2, *n)))
    values = layer.singular_values(n)
    assert values.shape == truth.shape
    assert torch.allclose(values, truth, rtol=0, atol=1e-12 * float(truth[0]))


@pytest.mark.parametrize("cls, stride", [(SVDConvTranspose1d, 2), (SVDConvTranspose2d, (2, 1)), (SVDConvTranspose3d, 1)])
def test_transposed_singular_values_equal_its_explicit_circular_operator(cls, stride):
    """The circular transposed conv on m inputs, built explicitly (the transpose of the
    circular conv's matrix on m * stride), has the singular values ``singular_values(m)`` gives."""
    torch_class, dims, _ = CLASSES[cls]
    torch.manual_seed(12)
    layer = cls(4, 2, 3, stride=stride, groups=2, rank=1, dtype=torch.float64)
    weight = layer.dense_weight().detach()  # (in, out/g, *k): a conv from out to in channels
    m = (3,) * dims
    n = tuple(mi * si for mi, si in zip(m, layer.stride))
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    pad = []
    for axis in reversed(range(dims)):
        pad += [0, layer.kernel_size[axis] - 1]

    def circular(x):
        return conv(F.pad(x, pad, mode="circular"), weight, None, layer.stride, 0, 1, 2)

    transposed = operator_matrix(circular, (2, *n)).T  # the layer's circular operator
    truth = torch.linalg.svdvals(transposed)
    values = layer.singular_values(m)
    assert values.shape == truth.shape
    assert torch.allclose(values, truth, rtol=0, atol=1e-12 * float(truth[0]))


@pytest.mark.parametrize("cls", list(CLASSES))
def test_canonicalize_keeps_function(cls):
    torch_class, dims, _ = CLASSES[cls]
    torch.manual_seed(7)
    layer = cls(4, 6, (3,) * dims, groups=2, rank=(2, 2), dtype=torch.float64)
    with torch.no_grad():
        layer.U.mul_(1.5)
        layer.V.add_(0.1)
    x = torch.randn(1, 4, *(5,) * dims, dtype=torch.float64)
    before = layer(x)
    layer.canonicalize_()
    assert _relative(layer(x), before) < 1e-12
    g = layer.groups
    for factor in (layer.U, layer.V):
        blocks = factor.detach().reshape(g, -1, factor.shape[1])
        gram = blocks.mT @ blocks
        assert torch.allclose(gram, torch.eye(factor.shape[1], dtype=torch.float64).expand_as(gram), atol=1e-12)


@pytest.mark.parametrize("cls, size", [(SVDConv1d, (17000,)), (SVDConv3d, (26, 26, 26)),
                                       (SVDConvTranspose1d, (17000,)), (SVDConvTranspose3d, (26, 26, 26))])
def test_large_inputs_mix_channels_by_matmul_exactly(cls, size):
    from ttconv import _functional

    assert math.prod(size) >= _functional.MATMUL_MIN_POSITIONS
    torch_class, dims, _ = CLASSES[cls]
    torch.manual_seed(8)
    conv = torch_class(4, 6, 3, padding=1, groups=2, dtype=torch.float64)
    layer = cls.from_conv(conv)
    x = torch.randn(1, 4, *size, dtype=torch.float64)
    layer.path = "factored"
    assert _relative(layer(x), conv(x)) < 1e-12
    pointwise = torch_class(4, 6, 1, groups=2, dtype=torch.float64)
    layer = cls.from_conv(pointwise)
    for path in ("dense", "factored"):
        layer.path = path
        assert _relative(layer(x), pointwise(x)) < 1e-12


@pytest.mark.parametrize("cls", list(CLASSES))
def test_fx_symbolic_trace_computes_the_same(cls):
    torch_class, dims, _ = CLASSES[cls]
    torch.manual_seed(9)
    layer = cls(4, 6, 3, stride=2, padding=1, groups=2, rank=2, dtype=torch.float64)
    traced = torch.fx.symbolic_trace(nn.Sequential(layer))
    x = torch.randn(2, 4, *(7,) * dims, dtype=torch.float64)
    assert _relative(traced(x), layer.to_conv()(x)) < 1e-12


class _Upsample(nn.Module):
    def __init__(self, up):
        super().__init__()
        self.up = up

    def forward(self, x, skip):
        return self.up(x, output_size=skip.shape[2:])


@pytest.mark.parametrize("cls", [SVDConvTranspose1d, SVDConvTranspose2d, SVDConvTranspose3d])
def test_fx_trace_of_output_size_is_refused_or_kept_by_a_leaf_tracer(cls):
    """A symbolic trace cannot know the input's size, which the output padding ``output_size``
    asks for depends on: tracing through the layer would record the default output size (9
    where 10 was asked for). It is refused, naming the ways that work; a tracer that keeps the
    layer as a leaf (as torch's own convs are) records the call and computes what eager does."""
    torch.manual_seed(11)
    torch_class, dims, _ = CLASSES[cls]
    layer = cls(2, 3, 3, stride=2, padding=1, dtype=torch.float64)
    model = _Upsample(layer)
    x, skip = torch.randn(1, 2, *(5,) * dims, dtype=torch.float64), torch.zeros(1, 1, *(10,) * dims)
    eager = model(x, skip)
    assert eager.shape[2:] == (10,) * dims
    with pytest.raises(RuntimeError, match="output_size.*is_leaf_module"):
        torch.fx.symbolic_trace(model)

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, cls) or super().is_leaf_module(module, name)

    traced = torch.fx.GraphModule(model, LeafTracer().trace(model))
    assert torch.equal(traced(x, skip), eager)
    # The layer traced as the root: output_size is the graph's input, refused when given.
    root = torch.fx.symbolic_trace(layer)
    assert torch.equal(root(x), layer(x))
    with pytest.raises(RuntimeError, match="traced .* without output_size"):
        root(x, output_size=(10,) * dims)


@pytest.mark.parametrize("cls", [SVDConv1d, SVDConv3d, SVDConvTranspose2d])
def test_set_dense_weight_exact_or_refused(cls):
    torch_class, dims, _ = CLASSES[cls]
    torch.manual_seed(10)
    layer = cls(4, 6, 3, groups=2, dtype=torch.float64)  # full rank: every kernel is representable
    conv = torch_class(4, 6, 3, groups=2, dtype=torch.float64)
    layer.weight = conv.weight.detach()
    assert _relative(layer.weight, conv.weight) < 1e-12
    low = cls(4, 6, 3, groups=2, rank=1, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"not representable.*{cls.__name__}.from_conv"):
        low.weight = conv.weight.detach()


class _MacRecorder(torch.overrides.TorchFunctionMode):
    """Multiply-adds of every (transposed) convolution called: a conv's output element takes
    ``c_in/g * taps`` products; a transposed conv's input element feeds ``c_out/g * taps``."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name.startswith("conv_transpose"):
            self.macs += args[0].numel() * math.prod(args[1].shape[1:])
        elif name in ("conv1d", "conv2d", "conv3d"):
            self.macs += result.numel() * math.prod(args[1].shape[1:])
        return result


@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("rank", [1, None])
def test_flop_costs_are_the_measured_multiply_adds(cls, rank):
    """Both paths' convolution multiply-adds, measured on small inputs (1x1 mixings run as
    convs there), are ``flop_costs`` less composing the kernel for the dense path."""
    torch_class, dims, transposed = CLASSES[cls]
    layer = cls(4, 6, 3, stride=2, padding=1, groups=2, rank=rank, dtype=torch.float64)
    x = torch.randn(2, 4, *(5,) * dims, dtype=torch.float64)
    measured = {}
    for path in ("dense", "factored"):
        layer.path = path
        with _MacRecorder() as recorder:
            layer(x)
        measured[path] = recorder.macs
    rows, cols = (4, 6) if transposed else (6, 4)
    r_out, r_in = layer.ranks
    # composing: per group the core with V, then U with the result (weight layout (rows, cols/g, *k))
    compose = 2 * r_out * r_in * 3 ** dims * (cols // 2) + rows * r_out * (cols // 2) * 3 ** dims
    dense, factored = layer.flop_costs(tuple(x.shape))
    assert dense == compose + measured["dense"]
    assert factored == measured["factored"]


def _counted_macs_per_path(layer, x, less=0, paths=("dense", "factored")):
    """The multiply-adds torch's ``FlopCounterMode`` counts for one forward on each of
    ``paths`` (products, einsums, convs), less ``less`` on each."""
    from torch.utils.flop_counter import FlopCounterMode

    measured = []
    for path in paths:
        layer.path = path
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            layer(x)
        measured.append(counter.get_total_flops() // 2 - less)
    return tuple(measured)


@pytest.mark.parametrize("cls", [c for c in CLASSES if not CLASSES[c][2]])
def test_pointwise_flop_costs_are_torchs_flop_count(cls):
    """A 1x1 layer's factored path folds the core into ``U`` (``(U S) @ core``) before its two
    channel mixings; ``flop_costs`` counts that product (torch's ``FlopCounterMode``)."""
    _, dims, _ = CLASSES[cls]
    layer = cls(4, 6, 1, groups=2, rank=(3, 2), dtype=torch.float64)
    x = torch.randn(2, 4, *(5,) * dims, dtype=torch.float64)
    assert layer.flop_costs(tuple(x.shape)) == _counted_macs_per_path(layer, x)


@pytest.mark.parametrize("cls", list(CLASSES))
# (Rank 1 is left out: torch contracts 1 x 1 einsums elementwise, which the counter does not see.)
@pytest.mark.parametrize("rank, stride", [(None, 2), ((2, 3), 2), ((3, 2), 1), ((2, 2), 1)])
@pytest.mark.parametrize("kernel_size", [3, 1])
def test_orthogonal_flop_costs_are_torchs_flop_count(cls, rank, stride, kernel_size):
    """An orthogonal core is built from its BCOP blocks on both paths (the factored path builds
    the ``r x r`` core, the dense path folds ``V^T`` and ``U S`` in, or composes the built core
    when ``r_in`` is small). ``flop_costs`` must be what torch's own ``FlopCounterMode`` counts
    for a whole forward (products, einsums and convs; QRs and elementwise work are not
    counted), less the exponential, whose cost follows the generator's norm."""
    from torch.utils.flop_counter import FlopCounterMode

    from ttconv._forward_paths import separable_flops
    from ttconv.orthogonal import skew_matrix_exp

    _, dims, _ = CLASSES[cls]
    padding = kernel_size // 2  # kernel 1 at stride 1: a pointwise layer (two channel mixings)
    layer = cls(4, 6, kernel_size, stride=stride, padding=padding, groups=2, rank=rank, core_kind="orthogonal",
                dtype=torch.float64)
    with torch.no_grad():
        layer.core.normal_()  # a generator away from zero: the exponential is counted apart
        generator = layer.core[:, 0]
        with FlopCounterMode(display=False) as exponential:
            skew_matrix_exp(generator - generator.mT)
    x = torch.randn(2, 4, *(5,) * dims, dtype=torch.float64)
    assert layer.flop_costs(tuple(x.shape)) == _counted_macs_per_path(layer, x, exponential.get_total_flops() // 2)
    # The separable path: the halves built, then two convs (their adjoints, transposed).
    build, first, second = separable_flops(layer, tuple(x.shape))
    assert _counted_macs_per_path(layer, x, exponential.get_total_flops() // 2, ("separable",)) == (
        build + first + second,)
    # The first conv's multiply-adds are what its input gradient costs in a backward pass.
    backward = []
    for requires_grad in (True, False):
        with FlopCounterMode(display=False) as counter:
            layer(x.clone().requires_grad_(requires_grad)).sum().backward()
        backward.append(counter.get_total_flops() // 2)
    assert backward[0] - backward[1] == first > 0


@pytest.mark.parametrize("cls, config", _configs()[::7])
def test_conv_spec_is_the_torch_layers_geometry_with_the_core(cls, config):
    from ttconv.bounds import exact_spectral_norm
    from ttconv.geometry import conv_spec

    conv = _torch_layer(cls, config)
    layer = cls.from_conv(conv, rank=2)
    spec, dense = layer.conv_spec(), conv_spec(layer.to_conv())
    for name in ("stride", "padding", "dilation", "groups", "padding_mode", "transposed", "output_padding"):
        assert getattr(spec, name) == getattr(dense, name), name
    assert torch.equal(spec.kernel, layer.orthonormal_core()) and not spec.singular_values_are_s
    # The core has the dense layer's spectrum (computed by bounds on each, the dense side
    # on the full kernel): a wrong core or geometry would change the norm.
    n = tuple(s * 4 for s in layer.stride)
    assert torch.allclose(exact_spectral_norm(layer, n), exact_spectral_norm(layer.to_conv(), n), rtol=1e-10)


def test_conv_spec_of_an_orthogonal_core_carries_s():
    layer = SVDConv(4, 4, 3, core_kind="orthogonal", max_singular_value=2.0, dtype=torch.float64)
    spec = layer.conv_spec()
    assert spec.singular_values_are_s and torch.equal(spec.s, layer.effective_S())


_MEMORY_FORMAT_CASES = [  # (class, channels in, out, kernel, extra kwargs, input shape)
    (SVDConv1d, 4, 6, 3, dict(padding=1), (2, 4, 9)),
    (SVDConv2d, 4, 6, 3, dict(padding=1), (2, 4, 7, 7)),
    (SVDConv2d, 4, 6, 1, dict(), (2, 4, 7, 7)),
    (SVDConv2d, 4, 6, (3, 2), dict(stride=2, groups=2), (2, 4, 8, 8)),
    (SVDConv3d, 4, 6, 3, dict(padding=1), (2, 4, 5, 5, 5)),
    (SVDConvTranspose2d, 4, 6, 3, dict(stride=2), (2, 4, 5, 5)),
    # groups with one input channel each: the separable path's second half, a permuted view,
    # had strides that read as channels-last, so its conv answered channels-last
    (SVDConvTranspose2d, 4, 24, 3, dict(stride=3, padding=1, output_padding=(1, 2), groups=4, rank=(4, 8)),
     (1, 4, 4, 4)),
    # one-tap kernels off the pointwise case: the composed 1 x 1 kernel kept a transpose's strides,
    # which read as channels-last (a ResNet downsample shortcut answered channels-last)
    (SVDConv2d, 4, 6, 1, dict(stride=2), (2, 4, 8, 8)),
    (SVDConvTranspose1d, 4, 6, 1, dict(), (2, 4, 9)),
    # 2^14 positions and more: the factored path mixes channels by matmul, which must keep
    # a channels-last input's layout as torch's conv does
    (SVDConv2d, 4, 6, 3, dict(padding=1, groups=2), (4, 4, 64, 64)),
]


@pytest.mark.parametrize("path", ["dense", "factored", "auto", "separable"])
@pytest.mark.parametrize("case", range(len(_MEMORY_FORMAT_CASES)))
@pytest.mark.parametrize("rank", [None, 2])
def test_output_memory_format_is_torchs(case, path, rank):
    """Drop-in includes the layout: the output is contiguous exactly when torch's layer's is
    (and channels-last exactly when torch's is), so ``y.view(n, -1)`` works wherever it works
    after torch's conv. A composed kernel returned as a transposed view made convs answer in
    channels-last; the separable path (an orthogonal core) runs two convs and must hand back
    torch's layout too."""
    cls, c_in, c_out, k, extra, shape = _MEMORY_FORMAT_CASES[case]
    torch.manual_seed(0)
    core_kind = "orthogonal" if path == "separable" else "general"
    layer = cls(c_in, c_out, k, path=path, core_kind=core_kind, **{"rank": rank, **extra})  # a case may fix its rank
    reference = layer.to_conv()
    inputs = [torch.randn(shape)]
    if len(shape) == 4:
        inputs.append(torch.randn(shape).to(memory_format=torch.channels_last))
    for x in inputs:
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                y, expected = layer(x), reference(x)
            assert y.shape == expected.shape
            assert y.is_contiguous() == expected.is_contiguous(), (x.stride(), y.stride(), expected.stride())
            if len(shape) == 4:
                channels_last = torch.channels_last
                assert y.is_contiguous(memory_format=channels_last) == expected.is_contiguous(memory_format=channels_last)
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [SVDConv1d, SVDConv2d, SVDConv3d])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_a_strided_one_tap_core_is_padded_and_subsampled_then_unstrided(cls, padding_mode):
    """The factored path's core conv of a strided 1 x 1 layer runs as pad, subsample, then a
    stride-1 conv: the torch layer's output and gradients for every padding mode and amount,
    and no strided conv left (a strided 1 x 1 conv with a low rank's 2-4 channels, stride
    along the last axis alone, corrupted memory in oneDNN's channels-last backward on one
    thread; that case runs in a subprocess, where a crash cannot take the test run down)."""
    dims = {SVDConv1d: 1, SVDConv2d: 2, SVDConv3d: 3}[cls]
    for stride, padding in [(2, 0), (3, 1), ((1,) * (dims - 1) + (2,), 2)]:
        torch.manual_seed(0)
        layer = cls(4, 6, 1, stride=stride, padding=padding, padding_mode=padding_mode, rank=(2, 3),
                    path="factored", dtype=torch.float64)
        x = torch.randn(2, 4, *(7,) * dims, dtype=torch.float64, requires_grad=True)
        with ConvCalls() as seen:
            y = layer(x)
        assert all(all(s == 1 for s in stride) for _, stride in seen.calls), seen.calls
        expected = layer.to_conv()(x)
        assert y.shape == expected.shape
        assert torch.allclose(y, expected, rtol=0, atol=1e-12)
        (grad,), (grad_torch,) = torch.autograd.grad(y.sum(), [x]), torch.autograd.grad(expected.sum(), [x])
        assert torch.allclose(grad, grad_torch, rtol=0, atol=1e-12)
    if cls is not SVDConv2d or padding_mode != "zeros":
        return
    done = channels_last_backward_survives("ttconv.SVDConv(64, 64, 1, stride=(1, 2), rank=4, path='factored')")
    assert done.returncode == 0, done.stderr[-2000:]
