"""convert as a compressor (issue 14, items 4, 5, 8): layers kept dense where the TT form
would not be smaller, the model's output error on an example input, the output-tolerance
search, and global argument checks."""

import importlib
import math
import warnings

import pytest
import torch
from torch import nn

import ttconv
from oracle import seeded_randn
from ttconv import SVDConv, convert

convert_module = importlib.import_module("ttconv.convert")  # the module; ttconv.convert is the function


class InvertedResidual(nn.Module):
    """MobileNet-v2/v3 block: 1x1 expand, depthwise 3x3, 1x1 project, residual when shapes allow."""

    def __init__(self, c_in, c_out, expand, stride):
        super().__init__()
        hidden = c_in * expand
        self.expand = nn.Sequential(nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


def mobilenet_like():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        InvertedResidual(16, 24, 4, 2), InvertedResidual(24, 24, 4, 1), InvertedResidual(24, 40, 4, 2),
        InvertedResidual(40, 40, 4, 1), nn.Conv2d(40, 32, 1),
    )


def _conv_params(model):
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, SVDConv)) for p in m.parameters())


def _tt_params(conv, r_out, r_in):
    """SVDConv parameters, counted from the factor shapes: U (c_out, r_out), S (g r_out),
    core (g r_out, r_in, kh, kw), V (c_in, r_in), bias."""
    g, (kh, kw) = conv.groups, conv.kernel_size
    bias = conv.out_channels if conv.bias is not None else 0
    return conv.out_channels * r_out + g * r_out + g * r_out * r_in * kh * kw + conv.in_channels * r_in + bias


def _relative_output_error(converted, model, x):
    """Recomputed independently: both models in eval mode, float64 norms."""
    model.eval()
    converted.eval()
    with torch.no_grad():
        a, b = converted(x).double(), model(x).double()
    return float((a - b).norm() / b.norm())


def _compressible(model, decay=-2.0, seed=0):
    """Give every non-depthwise conv a decaying spectrum (trained kernels compress; random ones do not)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.in_channels // m.groups > 1:
                c_out, c_in = m.weight.shape[:2]
                w = seeded_randn(*m.weight.shape, generator=gen)  # the same kernels on every device
                w *= torch.logspace(0, decay, c_out)[:, None, None, None] * torch.logspace(0, decay, c_in)[None, :, None, None]
                m.weight.copy_(w / w.norm() * m.weight.norm())
    return model


# ------------------------------------------------------------------ item 4: kept dense
def test_full_rank_keeps_depthwise_convs_dense_and_stays_exact():
    torch.manual_seed(0)
    model = mobilenet_like().eval()
    x = torch.randn(2, 3, 32, 32)
    converted, report = convert(model, return_report=True)
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 4
    assert [k.name for k in report.kept_dense] == depthwise
    for kept in report.kept_dense:
        conv = model.get_submodule(kept.name)
        assert type(converted.get_submodule(kept.name)) is nn.Conv2d
        assert kept.params_dense == conv.weight.numel() == 9 * conv.out_channels
        # Smallest TT form, rank (1, 1): U, S, V one number per channel each, core 9 per channel.
        assert kept.params_tt == 12 * conv.out_channels > kept.params_dense
        assert kept.reason.startswith("depthwise")
    # Every other conv converts exactly (full rank is for the spectrum, not for size).
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    assert [row.name for row in report.layers] == others
    assert all(isinstance(converted.get_submodule(n), SVDConv) for n in others)
    assert _relative_output_error(converted, model, x) < 1e-5
    # The parameter count is exactly what the rule says: converted layers at their full-rank
    # TT size, the depthwise ones unchanged.
    expected = sum(_tt_params(model.get_submodule(r.name), *r.ranks) for r in report.layers)
    expected += sum(model.get_submodule(n).weight.numel() for n in depthwise)
    assert _conv_params(converted) == expected
    forced = convert(model, force=("*",))
    assert _conv_params(converted) == _conv_params(forced) - sum(3 * model.get_submodule(n).out_channels
                                                                 for n in depthwise)
    assert all(isinstance(forced.get_submodule(n), SVDConv) for n in depthwise)
    assert _relative_output_error(forced, model, x) < 1e-5
    text = str(report)
    assert "kept dense" in text and depthwise[0] in text


def test_truncating_settings_never_grow_a_layer_unless_forced():
    torch.manual_seed(0)
    model = mobilenet_like()
    original = _conv_params(model)
    for kwargs in (dict(rank=0.5), dict(rank=8), dict(energy=0.9), dict(param_budget=0.6)):
        converted, report = convert(model, return_report=True, **kwargs)
        for row in report.layers:
            assert row.params_after < row.params_before, (kwargs, row)
            assert row.params_after == _tt_params(model.get_submodule(row.name), *row.ranks)
        for kept in report.kept_dense:
            assert kept.params_tt >= kept.params_dense
            assert type(converted.get_submodule(kept.name)) is nn.Conv2d
        assert _conv_params(converted) <= original
        converted_names = {row.name for row in report.layers} | {k.name for k in report.kept_dense}
        assert converted_names == {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    # rank=0.5 on a 1x1 conv c -> c grows it (c^2/2 + c/2 + c^2/4 + c^2/2 > c^2): kept,
    # with its would-be ranks and size; force converts it anyway.
    conv = nn.Conv2d(32, 32, 1, bias=False)
    _, report = convert(nn.Sequential(conv), rank=0.5, return_report=True)
    assert report.layers == [] and report.kept_dense[0].params_tt == _tt_params(conv, 16, 16) > 32 * 32
    assert "at ranks (16, 16)" in report.kept_dense[0].reason
    forced, report = convert(nn.Sequential(conv), rank=0.5, force=("0",), return_report=True)
    assert isinstance(forced[0], SVDConv) and report.kept_dense == []


def test_patch_embedding_conv_at_energy_stays_dense():
    # Swin's patch embedding: 4x4 stride 4, 3 -> 96 (issue: 1.01x at energy=0.9).
    torch.manual_seed(0)
    patch = nn.Sequential(nn.Conv2d(3, 96, 4, stride=4))
    converted, report = convert(patch, energy=0.9, return_report=True)
    assert type(converted[0]) is nn.Conv2d
    (kept,) = report.kept_dense
    assert kept.params_dense == 96 * 48 + 96 and kept.params_tt >= kept.params_dense
    forced, report = convert(patch, energy=0.9, force=lambda module, name: True, return_report=True)
    assert isinstance(forced[0], SVDConv) and report.layers[0].params_after > report.layers[0].params_before


def test_exclude_wins_over_force_and_kept_layers_are_warned_about():
    model = mobilenet_like()
    converted = convert(model, exclude=("3.*",), force=("*depthwise*",), return_report=True)[0]
    assert type(converted[3].depthwise[0]) is nn.Conv2d and isinstance(converted[4].depthwise[0], SVDConv)
    with pytest.warns(UserWarning, match=r"'3\.depthwise\.0' kept dense: depthwise"):
        convert(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model, return_report=True)
    with pytest.raises(TypeError, match="force must be an iterable"):
        convert(model, force="*")


def test_tiny_grouped_1x1_convs_never_shrink_and_stay_dense():
    conv = nn.Conv2d(8, 8, 1, groups=4)  # 2 channels per group: rank-1 TT 2+1+1+2 = 6 >= 4 per group
    _, report = convert(nn.Sequential(conv), return_report=True)
    assert report.kept_dense[0].params_tt == _tt_params(conv, 1, 1) >= sum(p.numel() for p in conv.parameters())
    assert "at any rank" in report.kept_dense[0].reason


# ------------------------------------------------------------------ item 5: output error
def test_output_error_is_reported_and_model_state_is_restored():
    torch.manual_seed(0)
    model = _compressible(mobilenet_like())
    model.train()
    model[3].eval()  # mixed modes must come back as they were
    model[0].weight.requires_grad_(False)
    flags = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    converted, report = convert(model, rank=0.5, example_input=x, return_report=True)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    after = model.state_dict()  # BN running statistics untouched: the forward ran in eval mode
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
    # The converted model keeps the modes it was converted with.
    assert converted.training and not converted[3].training and converted[4].training
    truth = _relative_output_error(converted, model, x)
    assert 1e-4 < truth < 1
    assert report.output_error == pytest.approx(truth, rel=1e-6)
    assert "output rel. error" in str(report)
    assert convert(model, rank=0.5, return_report=True)[1].output_error is None


def test_output_error_inplace_compares_with_the_model_before_conversion():
    torch.manual_seed(1)
    model = _compressible(mobilenet_like()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x).double()
    same, report = convert(model, rank=4, example_input=x, inplace=True, return_report=True)
    assert same is model
    with torch.no_grad():
        truth = float((same(x).double() - before).norm() / before.norm())
    assert report.output_error == pytest.approx(truth, rel=1e-6) and truth > 1e-3


def test_output_error_of_tuple_inputs_and_dict_outputs():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)

        def forward(self, x, y):
            return {"a": self.a(x), "b": (self.b(y), torch.zeros(1, dtype=torch.int64))}

    torch.manual_seed(0)
    model = TwoHeads()
    inputs = (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))
    converted, report = convert(model, rank=2, example_input=inputs, return_report=True)
    with torch.no_grad():
        new, old = converted(*inputs), model(*inputs)
    diff = (new["a"] - old["a"]).double().norm() ** 2 + (new["b"][0] - old["b"][0]).double().norm() ** 2
    norm = old["a"].double().norm() ** 2 + old["b"][0].double().norm() ** 2
    assert report.output_error == pytest.approx(math.sqrt(diff / norm), rel=1e-6)
    with pytest.raises(ValueError, match="example_input could not be run"):
        convert(model, rank=2, example_input=torch.randn(1, 3, 8, 8))


def test_output_tolerance_search_meets_the_tolerance_and_reports_it():
    torch.manual_seed(0)
    model = _compressible(mobilenet_like(), decay=-3.0).eval()
    x = torch.randn(4, 3, 32, 32)
    full = _conv_params(model)
    sizes = {}
    for tolerance in (0.3, 0.05, 0.01):
        converted, report = convert(model, output_tolerance=tolerance, example_input=x, return_report=True)
        truth = _relative_output_error(converted, model, x)
        assert truth <= tolerance
        assert report.output_error == pytest.approx(truth, rel=1e-6)
        assert 0 < report.energy <= 1
        # The threshold found is the one used: energy= at it builds the same model.
        _, again_report = convert(model, energy=report.energy, return_report=True)
        assert [r.ranks for r in again_report.layers] == [r.ranks for r in report.layers]
        # Bisection on log10(1 - energy) to 0.01 decades: discarding 2.5% more (0.011
        # decades) already misses the tolerance, or gives the same ranks (a boundary).
        coarser = 1 - (1 - report.energy) * 10 ** 0.011
        _, lower_report = convert(model, energy=coarser, example_input=x, return_report=True)
        assert (lower_report.output_error > tolerance
                or [r.ranks for r in lower_report.layers] == [r.ranks for r in report.layers])
        sizes[tolerance] = _conv_params(converted)
    assert sizes[0.3] <= sizes[0.05] <= sizes[0.01] < full


def test_output_tolerance_needs_an_example_input_and_a_reachable_value():
    model = mobilenet_like()
    with pytest.raises(ValueError, match="output_tolerance needs example_input"):
        convert(model, output_tolerance=0.1)
    with pytest.raises(ValueError, match=r"output_tolerance must be a positive finite number \(a relative output error\), got 0\.0$"):
        convert(model, output_tolerance=0.0, example_input=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="below the output error at energy 1 - 1e-12"):
        convert(_compressible(model), output_tolerance=1e-300, example_input=torch.randn(1, 3, 16, 16),
                force=("*",))
    # Unforced, energy 1 - 1e-12 keeps every layer dense (none would shrink): error 0 meets any tolerance.
    _, report = convert(model, output_tolerance=1e-300, example_input=torch.randn(1, 3, 16, 16),
                        return_report=True)
    assert report.output_error == 0.0 and report.layers == []


# ------------------------------------------------------------------ item 8: messages, budget
@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), r"^rank must be a positive int, got 0$"),
    (dict(rank=(2, 0)), r"^rank must be a positive int"),
    (dict(rank=1.5), r"^rank must be a number in \(0, 1\] \(a float rank is a fraction .*got 1\.5$"),
    (dict(energy=1.5), r"^energy must be a number in \(0, 1\] \(.*squared norm to keep\), got 1\.5$"),
    (dict(energy=0), r"^energy must be a number in \(0, 1\].*got 0$"),
    (dict(energy="0.9"), r"^energy must be a number in \(0, 1\].*got '0\.9' of type str$"),
    (dict(param_budget=1.5), r"^param_budget must be a number in \(0, 1\].*got 1\.5$"),
    (dict(param_budget=True), r"^param_budget must be a positive int.*got True of type bool$"),
    (dict(param_budget=0), r"^param_budget must be a positive int.*got 0$"),
    (dict(refine=-1), r"^refine must be an int >= 0.*got -1$"),
    (dict(refine=1.0), r"^refine must be an int >= 0.*got 1\.0 of type float$"),
    (dict(rank=2, output_tolerance=0.1), "at most one of"),
])
def test_global_arguments_are_checked_up_front_and_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match) as error:
        convert(mobilenet_like(), **kwargs)
    assert "layer" not in str(error.value)


def test_param_budget_fraction_is_a_fraction_of_the_considered_parameters():
    torch.manual_seed(0)
    model = _compressible(mobilenet_like())
    considered = _conv_params(model)
    for fraction in (0.3, 0.5):
        converted, report = convert(model, param_budget=fraction, return_report=True)
        by_count = convert(model, param_budget=int(fraction * considered), return_report=True)[1]
        assert [r.ranks for r in report.layers] == [r.ranks for r in by_count.layers]
        assert report.params_after + report.params_kept_dense == _conv_params(converted) <= fraction * considered
        assert _conv_params(converted) > 0.8 * fraction * considered  # used, not far below
    with pytest.raises(ValueError, match=r"param_budget=0\.001 is \d+ parameters"):
        convert(model, param_budget=0.001)


def test_budget_search_reports_progress_first_and_decomposes_each_layer_once(monkeypatch):
    torch.manual_seed(0)
    model = _compressible(mobilenet_like())
    calls = []
    real = convert_module._truncation

    def counting(weight, groups=1, method="gram"):
        calls.append(weight.shape)
        return real(weight, groups, method)

    monkeypatch.setattr(convert_module, "_truncation", counting)
    lines = []
    _, report = convert(model, param_budget=0.5, return_report=True,
                        progress=lambda done, total, name: lines.append((done, total, name)))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    assert len(calls) == len(convs)  # the input side of each layer is decomposed once
    # Progress starts with the analysis of each layer, then the search, then the conversion.
    assert lines[: len(convs)] == [(i + 1, len(convs), f"analysing {n}") for i, n in enumerate(convs)]
    assert any(name.startswith("budget search") for _, _, name in lines)
    assert lines[-1] == (len(convs), len(convs), report.layers[-1].name)


@pytest.mark.parametrize("kwargs", [dict(energy=0.99), dict(output_tolerance=0.1), dict(rank=0.5)])
def test_each_layer_is_decomposed_once_whatever_the_setting(monkeypatch, kwargs):
    torch.manual_seed(0)
    model = _compressible(mobilenet_like()).eval()
    calls = []
    real = convert_module._truncation

    def counting(weight, groups=1, method="gram"):
        calls.append(weight.shape)
        return real(weight, groups, method)

    monkeypatch.setattr(convert_module, "_truncation", counting)
    lines = []
    _, report = convert(model, example_input=torch.randn(2, 3, 32, 32), return_report=True,
                        progress=lambda done, total, name: lines.append(name), **kwargs)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    converted = [row.name for row in report.layers]
    # energy / output search: every non-depthwise conv analysed once, probes included;
    # rank: only the converted ones are decomposed (a kept layer's size needs no decomposition).
    assert len(calls) == (len(converted) if "rank" in kwargs else len(convs))
    if "output_tolerance" in kwargs:
        assert sum(name.startswith("output search") for name in lines) == 11
        assert report.output_error <= 0.1


def test_convert_is_exported():
    assert ttconv.convert is convert
