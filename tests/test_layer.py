"""SVDConv as a drop-in nn.Conv2d: forward, conversion, gradients, serialisation, errors."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from configs import config_id, random_conv_configs
from ttconv import SVDConv
from ttconv.tt import orthonormality_error

CONFIGS = random_conv_configs(240, seed=2)


def _relative(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_full_rank_conversion_matches_conv2d_forward_on_both_paths(config):
    conv = nn.Conv2d(**config["conv"], dtype=torch.float64)
    layer = SVDConv.from_conv2d(conv)
    x = torch.randn(2, conv.in_channels, *config["n"], dtype=torch.float64)
    expected = conv(x)
    for path in ("dense", "factored", "auto"):
        layer.path = path
        assert _relative(layer(x), expected) < 1e-10, path
    assert _relative(layer.to_conv2d().weight, conv.weight) < 1e-10
    assert layer.relative_error < 1e-10


@pytest.mark.parametrize("config", CONFIGS[:80], ids=config_id)
def test_truncated_layer_matches_its_own_dense_conv(config):
    layer = SVDConv(**config["conv"], rank=config["rank"], dtype=torch.float64)
    dense = layer.to_conv2d()
    x = torch.randn(2, layer.in_channels, *config["n"], dtype=torch.float64)
    for path in ("dense", "factored"):
        layer.path = path
        assert _relative(layer(x), dense(x)) < 1e-10, path
    back = SVDConv.from_conv2d(dense)  # a rank-r kernel converts exactly at full rank
    assert _relative(back.dense_weight(), dense.weight) < 1e-10


@pytest.mark.parametrize("config", CONFIGS[:40], ids=config_id)
def test_float32_conversion_round_trip(config):
    conv = nn.Conv2d(**config["conv"])
    layer = SVDConv.from_conv2d(conv)
    assert layer.U.dtype == torch.float32
    assert _relative(layer.to_conv2d().weight, conv.weight) < 1e-5
    x = torch.randn(2, conv.in_channels, *config["n"])
    assert _relative(layer(x), conv(x)) < 1e-5


def test_conversion_carries_every_setting():
    conv = nn.Conv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2,
                     bias=False, padding_mode="replicate", dtype=torch.float64)
    layer = SVDConv.from_conv2d(conv, rank=1)
    back = layer.to_conv2d()
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(layer, name) == getattr(conv, name) == getattr(back, name), name
    assert layer.bias is None and back.bias is None
    assert back.weight.dtype == torch.float64 and layer.ranks == (1, 1)
    assert repr(layer) == (
        "SVDConv(6, 4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2, "
        "bias=False, padding_mode='replicate', rank=(1, 1))"
    )


def test_truncated_conversion_reports_the_true_error():
    conv = nn.Conv2d(16, 24, 3, dtype=torch.float64)
    for kwargs in (dict(rank=4), dict(rank=(12, 3)), dict(energy=0.8)):
        layer = SVDConv.from_conv2d(conv, **kwargs)
        actual = _relative(layer.dense_weight(), conv.weight)
        assert abs(layer.relative_error - actual) < 1e-12
        assert 0 < actual < 1


def test_same_padding_with_even_kernels_matches_conv2d():
    for mode in ("zeros", "reflect", "replicate", "circular"):
        conv = nn.Conv2d(3, 5, (2, 4), padding="same", dilation=(1, 2), padding_mode=mode, dtype=torch.float64)
        layer = SVDConv.from_conv2d(conv)
        x = torch.randn(1, 3, 9, 10, dtype=torch.float64)
        for path in ("dense", "factored"):
            layer.path = path
            assert _relative(layer(x), conv(x)) < 1e-10


def test_unbatched_and_channels_last_inputs():
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    layer = SVDConv.from_conv2d(conv)
    x = torch.randn(4, 7, 7)
    assert _relative(layer(x), conv(x)) < 1e-5
    xb = torch.randn(3, 4, 7, 7).to(memory_format=torch.channels_last)
    assert _relative(layer(xb), conv(xb)) < 1e-5


def test_auto_path_follows_the_flop_model():
    low = SVDConv(64, 64, 3, padding=1, rank=4)
    full = SVDConv(64, 64, 3, padding=1)
    shape = (8, 64, 16, 16)
    dense, factored = low.flop_costs(shape)
    assert factored < dense  # rank c/16: three small convs win
    dense, factored = full.flop_costs(shape)
    assert dense < factored  # full rank: one dense conv wins
    conv_flops = 8 * 16 * 16 * 64 * 64 * 9
    assert dense - conv_flops == 64 * 64 * 64 * 9 * 2  # composing the kernel is all that is added


@pytest.mark.parametrize("path", ["dense", "factored"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, rank=2),
        dict(in_channels=4, out_channels=4, kernel_size=(2, 3), stride=2, groups=2, padding_mode="circular", padding=1),
        dict(in_channels=2, out_channels=3, kernel_size=3, dilation=2, padding="same", padding_mode="reflect"),
    ],
)
def test_gradcheck(kwargs, path, device):
    from oracle import deterministic_cudnn

    layer = SVDConv(**kwargs, dtype=torch.float64, path=path)
    x = torch.randn(2, kwargs["in_channels"], 6, 6, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (x,))

    # gradcheck also runs each backward twice and by default wants the same bits. Off the CPU:
    # cuDNN is held to deterministic algorithms, but the backward of reflect/replicate padding
    # (F.pad, as nn.Conv2d uses it) accumulates with atomics on CUDA and has no deterministic
    # kernel (torch's F.pad docs), so two runs may differ by float64 round-off in the order of
    # a few additions. nondet_tol allows that (1e-12 on Jacobian entries of order 1: 10^4 times
    # the round-off, 10^-8 of any real error); atol/rtol, the gradient's accuracy, are unchanged.
    nondet_tol = 0.0 if device.type == "cpu" else 1e-12
    with deterministic_cudnn():
        assert torch.autograd.gradcheck(fn, (x, *params), nondet_tol=nondet_tol)


def test_gradients_equal_those_of_the_dense_kernel_chain_rule():
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    layer = SVDConv.from_conv2d(conv, path="factored")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    (conv(x) ** 2).sum().backward()
    grad_x_dense = x.grad.clone()
    x.grad = None
    (layer(x) ** 2).sum().backward()
    assert _relative(x.grad, grad_x_dense) < 1e-10
    assert _relative(layer.bias.grad, conv.bias.grad) < 1e-10
    # dL/dS = <dL/dW, dW/dS>: check one entry against the dense gradient.
    U, core, V = layer.U, layer.core, layer.V
    dW_dS0 = torch.einsum("o,bhw,ib->oihw", U[:, 0], core[0], V).detach()
    assert abs(float(layer.S.grad[0]) - float((conv.weight.grad * dW_dS0).sum())) < 1e-10


def test_state_dict_round_trip_and_names():
    layer = SVDConv(4, 6, 3, groups=2, rank=2)
    assert list(layer.state_dict()) == ["U", "S", "core", "V", "bias", "_extra_state"]
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = SVDConv(4, 6, 3, groups=2, rank=2)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(fresh(x), layer(x))


def test_loading_into_a_different_rank_names_both_ranks():
    with pytest.raises(RuntimeError, match=r"SVDConv: the checkpoint's SVDConv has rank=\(2, 2\), this layer rank=\(3, 3\)"):
        SVDConv(4, 6, 3, rank=3).load_state_dict(SVDConv(4, 6, 3, rank=2).state_dict())
    # Without the stored configuration (a version-1 state dict) the shapes still catch it.
    state = SVDConv(4, 6, 3, rank=2).state_dict()
    del state["_extra_state"]
    state._metadata[""]["version"] = 1
    with pytest.raises(RuntimeError, match="size mismatch for U"):
        SVDConv(4, 6, 3, rank=3).load_state_dict(state)


def test_loading_a_newer_format_version_is_refused():
    layer = SVDConv(2, 2, 3)
    state = layer.state_dict()
    state._metadata[""]["version"] = SVDConv._version + 1
    with pytest.raises(RuntimeError, match="newer ttconv"):
        SVDConv(2, 2, 3).load_state_dict(state)


def test_deepcopy_and_whole_module_pickle():
    layer = SVDConv(3, 5, 3, rank=2)
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), layer(x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_and_compile():
    layer = SVDConv(3, 8, 3, padding=1, rank=2)
    x = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(layer, x)
    assert torch.allclose(traced(x), layer(x), atol=1e-6)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), layer(x), atol=1e-6)


def test_canonicalize_keeps_function_and_parameter_identity():
    layer = SVDConv(6, 8, 3, padding=1, rank=(4, 3), dtype=torch.float64)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    layer(x).square().mean().backward()
    optimizer.step()
    assert orthonormality_error(layer.U) > 1e-6  # a step leaves the canonical form
    ids = [id(p) for p in layer.parameters()]
    before = layer(x)
    assert layer.canonicalize_() is layer
    assert [id(p) for p in layer.parameters()] == ids
    assert _relative(layer(x), before) < 1e-12
    assert orthonormality_error(layer.U) < 1e-12 and orthonormality_error(layer.V) < 1e-12
    unfolding = layer.dense_weight().reshape(8, -1)
    assert torch.allclose(layer.S, torch.linalg.svdvals(unfolding)[:4], atol=1e-12)
    optimizer.zero_grad()
    layer(x).square().mean().backward()
    optimizer.step()  # the optimizer keeps working on the same parameters


def test_init_matches_conv2d_distribution():
    torch.manual_seed(0)
    full = SVDConv(64, 64, 3).dense_weight().detach()
    dense = nn.Conv2d(64, 64, 3).weight.detach()
    assert abs(float(full.std() / dense.std()) - 1) < 0.02
    # Low rank keeps the kernel's Frobenius norm, so activations keep their scale.
    low = SVDConv(64, 64, 3, rank=8).dense_weight().detach()
    assert abs(float(low.norm() / dense.norm()) - 1) < 0.05
    x = torch.randn(16, 64, 8, 8)
    ratio = float(F.conv2d(x, low).std() / F.conv2d(x, dense).std())
    assert 0.8 < ratio < 1.25
    bias = SVDConv(64, 64, 3).bias.detach()
    assert float(bias.abs().max()) <= 1 / math.sqrt(64 * 9)


@pytest.mark.parametrize("kwargs", [dict(rank=None), dict(rank=(24, 8)), dict(rank=4, groups=2), dict(kernel_size=1)])
def test_fresh_layer_is_canonical_with_conv2d_kernel_variance(kwargs):
    kwargs = dict(dict(in_channels=16, out_channels=32, kernel_size=3), **kwargs)
    layer = SVDConv(**kwargs, dtype=torch.float64)
    g = layer.groups
    for factor in (layer.U, layer.V):
        assert orthonormality_error(factor, g) < 1e-12
    r_out = layer.ranks[0]
    rows = layer.core.detach().reshape(g, r_out, -1).transpose(1, 2).reshape(-1, r_out)
    assert orthonormality_error(rows, g) < 1e-12
    weight = layer.dense_weight().detach()
    unfolding = weight.reshape(g, weight.shape[0] // g, -1)
    assert torch.allclose(layer.S.detach().reshape(g, -1), torch.linalg.svdvals(unfolding)[:, :r_out], atol=1e-12)
    fan_in = weight[0].numel()
    assert abs(float(weight.pow(2).mean()) * 3 * fan_in - 1) < 1e-12  # nn.Conv2d: 1 / (3 fan_in)
    # canonicalize_ of a fresh layer changes nothing but round-off.
    before = [p.detach().clone() for p in (layer.U, layer.S, layer.core, layer.V)]
    layer.canonicalize_()
    assert _relative(layer.dense_weight(), weight) < 1e-12
    assert torch.allclose(layer.S.detach(), before[1], atol=1e-12)


def test_deep_stack_output_variance_matches_conv2d():
    # Ten linear layers (circular padding, no bias): each multiplies the variance by
    # fan_in * Var(w) = 1/3 in expectation for both inits.
    def run(make, seed):
        torch.manual_seed(seed)
        stack = nn.Sequential(*[make() for _ in range(10)])
        x = torch.randn(8, 32, 16, 16)
        with torch.no_grad():
            return float(stack(x).var()) * 3**10

    svd = [run(lambda: SVDConv(32, 32, 3, padding=1, padding_mode="circular", bias=False), s) for s in range(6)]
    conv = [run(lambda: nn.Conv2d(32, 32, 3, padding=1, padding_mode="circular", bias=False), s) for s in range(6)]
    for values in (svd, conv):
        assert all(0.7 < v < 1.4 for v in values), values
        assert 0.85 < sum(values) / len(values) < 1.15
    assert 0.85 < sum(svd) / sum(conv) < 1.15


def test_refined_conversion_reports_the_true_error_and_never_loses():
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 32, 3, dtype=torch.float64)
    base = SVDConv.from_conv2d(conv, rank=6)
    refined = SVDConv.from_conv2d(conv, rank=6, refine=10)
    assert refined.ranks == base.ranks
    assert refined.relative_error < base.relative_error
    assert abs(refined.relative_error - _relative(refined.dense_weight(), conv.weight)) < 1e-12
    with pytest.raises(ValueError, match="refine"):
        SVDConv.from_conv2d(conv, rank=6, refine=-1)


def test_skip_init_and_meta_device():
    layer = torch.nn.utils.skip_init(SVDConv, 4, 4, 3)
    assert layer.U.shape == (4, 4)
    meta = SVDConv(4, 4, 3, device="meta")
    assert meta.U.is_meta


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(in_channels=0, out_channels=4, kernel_size=3), ValueError, "in_channels must be a positive int"),
        (dict(in_channels=4, out_channels=-1, kernel_size=3), ValueError, "out_channels must be a positive int"),
        (dict(in_channels=4.0, out_channels=4, kernel_size=3), TypeError, "in_channels"),
        (dict(in_channels=6, out_channels=4, kernel_size=3, groups=4), ValueError, "in_channels \\(6\\) must be divisible by groups"),
        (dict(in_channels=4, out_channels=6, kernel_size=3, groups=4), ValueError, "out_channels \\(6\\) must be divisible by groups"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, rank=0), ValueError, "rank must be a positive int"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, rank=(2, 0)), ValueError, "rank"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, padding_mode="mirror"), ValueError, "padding_mode must be one of"),
        (dict(in_channels=4, out_channels=4, kernel_size=0), ValueError, "kernel_size must be >= 1"),
        (dict(in_channels=4, out_channels=4, kernel_size=(3, 3, 3)), TypeError, "kernel_size must be an int or a pair"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, padding=-1), ValueError, "padding must be >= 0"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, padding="full"), ValueError, "padding must be 'same'"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding="same"), ValueError, "strided"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, path="fast"), ValueError, "path must be one of"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, path="separable"), ValueError,
         "path='separable' .* needs core_kind='orthogonal'; SVDConv with core_kind='general' has paths 'auto', "
         "'dense' and 'factored'"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SVDConv(**kwargs)


def test_the_separable_path_is_refused_where_the_layer_has_none():
    from ttconv import SVDConvTranspose2d

    with pytest.raises(ValueError, match="needs core_kind='orthogonal'; SVDConvTranspose2d with"):
        SVDConvTranspose2d(4, 4, 3, path="separable")
    layer = SVDConv(4, 4, 3)
    # Assigned after construction: refused at once, so no state dict can record it.
    with pytest.raises(ValueError, match="needs core_kind='orthogonal'"):
        layer.path = "separable"
    with pytest.raises(ValueError, match="path must be one of"):
        layer.path = "fast"
    assert layer.path == "auto"
    layer.__dict__["_path"] = "separable"  # forced past the setter: forward still refuses, never runs another path
    with pytest.raises(ValueError, match="needs core_kind='orthogonal'"):
        layer(torch.randn(1, 4, 5, 5))
    orthogonal = SVDConv(4, 4, 3, core_kind="orthogonal", path="separable")
    assert "path='separable'" in repr(orthogonal)


def test_path_survives_pickling_and_an_old_pickle_loads():
    import pickle

    layer = SVDConv(4, 4, 3, core_kind="orthogonal", path="separable")
    assert pickle.loads(pickle.dumps(layer)).path == "separable"
    state = dict(layer.__dict__)  # as a module pickled while path was a plain attribute
    state["path"] = state.pop("_path")
    old = SVDConv.__new__(SVDConv)
    old.__setstate__(state)
    x = torch.randn(1, 4, 6, 6)
    assert old.path == "separable" and torch.equal(old(x), layer(x))


def test_the_separable_path_names_the_layers_kernel_when_the_input_is_too_small():
    layer = SVDConv(8, 8, (3, 5), dilation=(1, 2), core_kind="orthogonal", path="separable")
    with pytest.raises(RuntimeError, match=r"input size \(40, 3\) padded to 3 on spatial axis 1 is smaller than the "
                                           r"dilated kernel \(9: kernel_size=\(3, 5\), dilation=\(1, 2\)\)"):
        layer(torch.randn(1, 8, 40, 3))
    layer.path = "dense"
    with pytest.raises(RuntimeError):  # torch's own message, naming the same kernel
        layer(torch.randn(1, 8, 40, 3))


def test_forward_errors():
    layer = SVDConv(4, 4, 3)
    with pytest.raises(ValueError, match="input must be 4-D"):
        layer(torch.randn(4, 8))
    with pytest.raises(ValueError, match="expects in_channels=4"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="input must be a Tensor"):
        layer([1.0])


def test_from_conv2d_errors():
    conv = nn.Conv2d(2, 2, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        SVDConv.from_conv2d(conv)
    with pytest.raises(TypeError, match="conv must be a torch.nn.Conv2d"):
        SVDConv.from_conv2d(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="either rank or energy"):
        SVDConv.from_conv2d(nn.Conv2d(2, 2, 3), rank=1, energy=0.5)


# ------------------------------------------------------------ .weight as in nn.Conv2d
def test_weight_is_the_composed_kernel_differentiable_and_not_a_parameter():
    layer = SVDConv(4, 6, 3, groups=2, rank=2, dtype=torch.float64)
    assert torch.equal(layer.weight, layer.dense_weight())
    assert layer.weight.shape == (6, 2, 3, 3)
    layer.weight.square().sum().backward()
    via_weight = [p.grad.clone() for p in (layer.U, layer.S, layer.core, layer.V)]
    layer.zero_grad()
    layer.dense_weight().square().sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(via_weight, (layer.U, layer.S, layer.core, layer.V)))
    assert "weight" not in layer.state_dict() and "weight" not in dict(layer.named_parameters())
    assert torch.equal(copy.deepcopy(layer).weight, layer.weight)
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)  # init code reads .weight
    assert (fan_in, fan_out) == (2 * 9, 6 * 9)


def test_fuse_conv_bn_eval_gives_an_svdconv_of_the_fused_function():
    torch.manual_seed(0)
    for kwargs in (dict(rank=(3, 2)), dict(rank=2, bias=False, groups=2), dict()):
        layer = SVDConv(4, 6, 3, padding=1, dtype=torch.float64, **kwargs).eval()
        bn = nn.BatchNorm2d(6, dtype=torch.float64).eval()
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
        before = [p.clone() for p in layer.parameters()]
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(layer, bn)
        x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
        assert type(fused) is SVDConv and fused.ranks == layer.ranks
        assert _relative(fused(x), bn(layer(x))) < 1e-10
        assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))  # original untouched


def test_assigning_weight_sets_the_kernel_exactly_or_refuses():
    torch.manual_seed(0)
    layer = SVDConv(4, 6, 3, dtype=torch.float64)  # full rank: every kernel is representable
    ids = [id(p) for p in layer.parameters()]
    kernel = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    layer.weight = kernel
    assert _relative(layer.dense_weight(), kernel) < 1e-12
    layer.weight = nn.Parameter(2 * kernel)  # nn.Module.__setattr__ routes Parameters elsewhere
    assert _relative(layer.dense_weight(), 2 * kernel) < 1e-12
    assert [id(p) for p in layer.parameters()] == ids and "weight" not in dict(layer.named_parameters())
    low = SVDConv(4, 6, 3, rank=2, dtype=torch.float64)
    before = low.dense_weight().detach().clone()
    with pytest.raises(ValueError, match=r"not representable at this layer's ranks \(2, 2\).*left unchanged"):
        low.weight = kernel
    assert torch.equal(low.dense_weight(), before)
    with pytest.raises(ValueError, match=r"weight must have shape \(6, 4, 3, 3\)"):
        layer.weight = torch.randn(6, 4, 3, 2)
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        layer.weight = None
    orthogonal = SVDConv(4, 4, 3, core_kind="orthogonal")
    with pytest.raises(AttributeError, match=r"core_kind='orthogonal'.*conv = layer.to_conv2d\(\)"):
        orthogonal.weight = torch.randn(4, 4, 3, 3)
    layer.extra = nn.Parameter(torch.ones(1))  # other attributes register as usual
    assert "extra" in dict(layer.named_parameters())


def test_weight_in_a_compiled_and_traced_forward():
    class Standardized(nn.Module):  # reads .weight in forward, as weight-standardization code does
        def __init__(self):
            super().__init__()
            self.conv = SVDConv(3, 4, 3, padding=1, rank=2)

        def forward(self, x):
            w = self.conv.weight
            return F.conv2d(x, (w - w.mean()) / w.std(), None, 1, 1)

    module = Standardized()
    x = torch.randn(2, 3, 6, 6)
    expected = module(x)
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), expected, atol=1e-6)
    assert torch.allclose(torch.fx.symbolic_trace(module)(x), expected, atol=1e-6)


# ---------------------------------------------------------- configuration in state
def test_extra_state_stores_ranks_core_bound_and_path():
    from ttconv.layer import _decode_extra_state

    layer = SVDConv(4, 4, 3, rank=3, core_kind="orthogonal", max_singular_value=0.7, path="dense")
    state = layer.state_dict()["_extra_state"]
    assert state.dtype == torch.int64
    assert _decode_extra_state(state) == dict(rank=(3, 3), core_kind="orthogonal", max_singular_value=0.7, path="dense")
    assert _decode_extra_state(SVDConv(4, 6, 3, rank=(5, 2)).get_extra_state()) == dict(
        rank=(5, 2), core_kind="general", max_singular_value=None, path="auto")
    assert _decode_extra_state(SVDConv(4, 4, 3, core_kind="orthogonal", path="separable").get_extra_state()) == dict(
        rank=(4, 4), core_kind="orthogonal", max_singular_value=None, path="separable")
    with pytest.raises(RuntimeError, match=r"rank=\(3, 3\), this layer rank=\(4, 4\)"):
        SVDConv(4, 4, 3, core_kind="orthogonal").set_extra_state(state)
    other_path = SVDConv(4, 4, 3, rank=3, core_kind="orthogonal", max_singular_value=0.7)
    other_path.load_state_dict(layer.state_dict())  # path is a runtime choice: not checked
    assert other_path.path == "auto"


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.75, 1.0])
def test_float_rank_is_a_fraction_of_the_channels_as_in_convert(fraction):
    """``from_conv2d`` / ``from_conv`` read a float rank as ``ttconv.convert`` does: the
    same ranks per group (rounded up), the same layer."""
    import ttconv
    from ttconv import SVDConvTranspose1d

    torch.manual_seed(3)
    conv = nn.Conv2d(12, 20, 3, groups=2, dtype=torch.float64)
    layer = SVDConv.from_conv2d(conv, rank=fraction)
    expected = (max(1, math.ceil(fraction * 10)), max(1, math.ceil(fraction * 6)))
    assert layer.ranks == tuple(min(e, f) for e, f in zip(expected, SVDConv.from_conv2d(conv).ranks))
    converted = ttconv.convert(nn.Sequential(conv), rank=fraction, force=["0"])[0]
    assert converted.ranks == layer.ranks
    assert torch.equal(converted.dense_weight(), layer.dense_weight())
    assert SVDConv.from_conv(conv, rank=fraction).ranks == layer.ranks
    # A transposed conv: fractions of the rows (in_channels) and columns (out_channels) of torch's weight.
    transposed = nn.ConvTranspose1d(8, 4, 3, dtype=torch.float64)
    assert SVDConvTranspose1d.from_conv(transposed, rank=fraction).ranks == (
        min(max(1, math.ceil(fraction * 8)), 4 * 3), max(1, math.ceil(fraction * 4)))


@pytest.mark.parametrize("rank, error", [(1.5, ValueError), (0.0, ValueError), (float("nan"), ValueError),
                                         (-0.5, ValueError), (True, TypeError)])
def test_bad_float_ranks_are_refused_naming_rank(rank, error):
    with pytest.raises(error, match="rank"):
        SVDConv.from_conv2d(nn.Conv2d(4, 4, 3), rank=rank)
