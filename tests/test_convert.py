"""Whole-model conversion on real architectures: exactness, rank choices, reports, checkpoints."""

import os
import sys

import pytest
import torch
from torch import nn

from models import ARCHITECTURES, SmallResNet, vgg_like
from oracle import default_device
from ttconv import SVDConv, convert, densify


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_full_rank_conversion_is_exact_and_densify_restores_the_state_dict(arch):
    model = ARCHITECTURES[arch]().eval()
    x = torch.randn(2, 3, 16, 16)
    converted = convert(model, force=("*",))  # depthwise convs too (kept dense by default)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(isinstance(m, SVDConv) for m in converted.modules()) == n_convs
    assert not any(type(m) is nn.Conv2d for m in converted.modules())
    assert _relative(converted(x), model(x)) < 1e-5
    restored = densify(converted)
    original, back = model.state_dict(), restored.state_dict()
    assert list(original) == list(back)
    for key in original:
        if original[key].is_floating_point() and original[key].norm() > 0:
            assert _relative(back[key], original[key]) < 1e-5, key
        else:
            assert torch.equal(back[key], original[key]), key


def test_conversion_keeps_the_original_unless_inplace():
    model = SmallResNet()
    converted = convert(model)
    assert isinstance(model.stem, nn.Conv2d) and isinstance(converted.stem, SVDConv)
    same = convert(model, inplace=True)
    assert same is model and isinstance(model.layers[1].shortcut[0], SVDConv)


def test_rank_choices():
    model = SmallResNet(width=16)
    fixed = convert(model, rank=4)
    assert fixed.layers[2].conv2.ranks == (4, 4)
    assert fixed.layers[1].shortcut[0].ranks == (4, 4)
    pair = convert(model, rank=(6, 3))
    assert pair.layers[2].conv2.ranks == (6, 3)
    fraction = convert(model, rank=0.25)
    assert fraction.layers[2].conv2.ranks == (16, 16)  # 64 channels * 0.25
    assert fraction.stem.ranks == (4, 1)  # 16 * 0.25 out, ceil(3 * 0.25) in
    # Random kernels barely compress: force keeps every layer converted to check the energy rule.
    energy, report = convert(model, energy=0.9, return_report=True, force=("*",))
    assert len(report.layers) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    for row in report.layers:
        conv, layer = model.get_submodule(row.name), energy.get_submodule(row.name)
        truth = _relative(layer.dense_weight().detach().double(), conv.weight.detach().double())
        assert row.relative_error == pytest.approx(truth, rel=1e-4)
        assert truth <= (1 - 0.9) ** 0.5 + 1e-6  # kept energy >= 0.9 of the whole kernel


def test_parameter_budget_is_respected_and_used():
    model = SmallResNet(width=16)
    dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    for budget in (dense // 2, dense // 4):
        converted, report = convert(model, param_budget=budget, return_report=True)
        assert report.params_after <= budget
        assert report.params_after > 0.7 * budget  # close to the budget, not far below
        assert report.params_after == sum(p.numel() for m in converted.modules() if isinstance(m, SVDConv)
                                          for p in m.parameters())


def test_exclude_by_name_pattern_and_predicate():
    model = SmallResNet()
    by_name = convert(model, exclude=("stem", "layers.1"))
    assert isinstance(by_name.stem, nn.Conv2d) and isinstance(by_name.layers[1].conv1, nn.Conv2d)
    assert isinstance(by_name.layers[2].conv1, SVDConv)
    by_pattern = convert(model, exclude=["*.shortcut.*"])
    assert isinstance(by_pattern.layers[1].shortcut[0], nn.Conv2d)
    by_predicate, report = convert(model, exclude=lambda m, name: m.kernel_size == (1, 1), return_report=True)
    assert isinstance(by_predicate.layers[2].shortcut[0], nn.Conv2d) and isinstance(by_predicate.stem, SVDConv)
    assert report.excluded == ["layers.1.shortcut.0", "layers.2.shortcut.0"]


def test_report_table_and_totals():
    model = vgg_like()
    calls = []
    _, report = convert(model, rank=2, return_report=True, progress=lambda d, t, n: calls.append((d, t, n)))
    assert len(report) == 4 and calls[-1] == (4, 4, "7")
    text = str(report)
    assert text.splitlines()[0].split()[:3] == ["layer", "shape", "groups"]
    assert "total" in text and str(report.params_before) in text
    assert report.params_before == sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())
    truth = [_relative(SVDConv.from_conv2d(m, rank=2).dense_weight().detach(), m.weight.detach())
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [r.relative_error for r in report.layers] == pytest.approx(truth, rel=1e-6)


def test_checkpoint_round_trip_into_a_fresh_skeleton(tmp_path):
    torch.manual_seed(0)
    model = convert(SmallResNet(), rank=4).eval()
    path = tmp_path / "converted.pt"
    torch.save(model.state_dict(), path)
    skeleton = convert(SmallResNet(), rank=4).eval()
    skeleton.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(skeleton(x), model(x))


def test_loading_into_a_mismatched_skeleton_names_layer_and_ranks():
    state = convert(SmallResNet(), rank=4).state_dict()
    with pytest.raises(RuntimeError, match=r"layers\.0\.conv1: the checkpoint's SVDConv has rank=\(4, 4\), "
                                           r"this layer rank=\(2, 2\); load with load_converted"):
        convert(SmallResNet(), rank=2).load_state_dict(state)


def test_shared_layers_stay_shared_and_a_bare_conv_converts():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    converted = convert(model)
    assert converted[0] is converted[2] and isinstance(converted[0], SVDConv)
    assert isinstance(convert(nn.Conv2d(2, 2, 3)), SVDConv)
    assert isinstance(densify(SVDConv(2, 2, 3)), nn.Conv2d)


def test_training_mode_is_carried():
    model = vgg_like().eval()
    assert not convert(model)[0].training
    assert not densify(convert(model))[0].training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=2, energy=0.9), "at most one of"),
        (dict(rank=1.5), "a float rank is a fraction of the channels"),
        (dict(param_budget=10), "below the smallest possible size"),
        (dict(param_budget=-3), "param_budget must be a positive int"),
        (dict(exclude="stem"), "single str"),
        (dict(rank=0), "rank"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        convert(SmallResNet(), **kwargs)


def test_nan_weights_are_reported_with_the_layer_name():
    model = vgg_like()
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '2'.*NaN"):
        convert(model)


def test_converts_weights_trained_on_real_data():
    """Weights trained on the offline digits data (skips without scikit-learn)."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
    from _digits import accuracy, load_digits, small_cnn, train

    torch.manual_seed(0)
    device = default_device()  # the test's device
    with torch.device("cpu"):  # the example's data and training are CPU code (seeded CPU generators)
        data = load_digits()
        model = small_cnn(width=16)
        train(model, data, epochs=3)
    model, data = model.to(device), tuple(t.to(device) for t in data)  # conversion runs on the test's device
    base = accuracy(model, data[2], data[3])
    exact = convert(model)
    assert _relative(exact(data[2]), model(data[2])) < 1e-5
    half, report = convert(model, rank=0.5, return_report=True)
    assert report.params_after < report.params_before
    assert accuracy(half, data[2], data[3]) > base - 0.1  # trained kernels compress well


def test_progress_true_prints_a_line_per_layer_on_stderr(capsys):
    convert(vgg_like(), rank=2, progress=True)
    assert capsys.readouterr().err.splitlines()[-1] == "[4/4] 7"
    with pytest.raises(TypeError, match="progress must be"):
        convert(vgg_like(), progress="yes")


def test_convert_refine_lowers_the_reported_error_and_reports_it_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).double()
    _, plain = convert(model, rank=4, return_report=True)
    refined_model, refined = convert(model, rank=4, refine=5, return_report=True)
    for before, after, conv, layer in zip(plain.layers, refined.layers, (model[0], model[2]),
                                          (refined_model[0], refined_model[2])):
        assert after.relative_error <= before.relative_error + 1e-12
        true = ((layer.dense_weight() - conv.weight).norm() / conv.weight.norm()).item()
        assert after.relative_error == pytest.approx(true, rel=1e-9)
    assert sum(a.relative_error for a in refined.layers) < sum(b.relative_error for b in plain.layers)


def test_exclude_and_force_see_every_name_of_a_shared_conv():
    """A conv registered under two names is converted once, under its first name; naming it by
    its second name in exclude or force acts on it too (before: ignored, silently)."""
    conv = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential()
    model.add_module("encoder", conv)
    model.add_module("decoder", conv)
    for pattern in (("decoder",), ("dec*",)):
        converted, report = convert(model, exclude=pattern, return_report=True)
        assert type(converted.encoder) is nn.Conv2d and converted.decoder is converted.encoder
        assert report.excluded == ["encoder"] and report.layers == []
    converted, report = convert(model, exclude=("other",), return_report=True)
    assert type(converted.decoder) is SVDConv and converted.decoder is converted.encoder
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # kept dense unless forced
    shared = nn.Sequential()
    shared.add_module("first", depthwise)
    shared.add_module("second", depthwise)
    for force in (("first",), ("second",)):
        converted, report = convert(shared, force=force, return_report=True)
        assert type(converted.second) is SVDConv and report.kept_dense == []


@pytest.mark.parametrize("argument", ["exclude", "force"])
def test_exclude_and_force_of_the_wrong_type_are_refused_by_name(argument):
    model = nn.Sequential(nn.Conv2d(2, 2, 3))
    with pytest.raises(TypeError, match=f"{argument} must be an iterable of names or patterns, or a predicate; got "
                                        "NoneType: pass \\(\\) for none"):
        convert(model, **{argument: None})
    with pytest.raises(TypeError, match=f"{argument} must hold str names or fnmatch patterns, got int 1"):
        convert(model, **{argument: [1]})


class _ListedConvs(nn.Module):
    """Runs c1 and c2 from a plain list (not through their registered names), c3 directly."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1),
                                     nn.Conv2d(6, 5, 3, padding=1))
        self.order = [self.c1, self.c2]

    def forward(self, x):
        for conv in self.order:
            x = torch.relu(conv(x))
        return self.c3(x)


def test_convs_the_forward_calls_through_other_references_are_left_and_listed():
    """Replacing the registered child of a conv the forward reads from a plain list would leave
    the old conv running while its parameters leave the model (an optimizer would train
    nothing). With example_input convert finds such convs and leaves them, listed."""
    torch.manual_seed(0)
    model, x = _ListedConvs(), torch.randn(2, 4, 8, 8)
    converted, report = convert(model, rank=2, force=("*",), example_input=x, return_report=True)
    assert [name for name, _ in report.skipped] == ["c1", "c2"]
    assert all("registered name" in reason for _, reason in report.skipped)
    assert [row.name for row in report.layers] == ["c3"]
    assert converted.order[0] is converted.c1 and type(converted.c1) is nn.Conv2d
    assert isinstance(converted.c3, SVDConv)
    # What runs is what the model holds: c1's kernel gets a gradient, and the reported output
    # error is that of the truncated c3 alone (recomputed independently here).
    converted(x).sum().backward()
    assert converted.c1.weight.grad is not None
    with torch.no_grad():
        expected = model(x)
        hidden = torch.relu(model.c2(torch.relu(model.c1(x))))
        truncated = nn.functional.conv2d(hidden, converted.c3.weight, converted.c3.bias, padding=1)
    assert report.output_error == pytest.approx(_relative(truncated, expected), rel=1e-5)
    with pytest.warns(UserWarning, match="registered name"):
        convert(model, example_input=x)


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_convs_compiled_by_torch_jit_are_listed_not_silently_kept(compile_with):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 3, 6, 6)
    compiled = torch.jit.script(model) if compile_with == "script" else torch.jit.trace(model, x)
    converted, report = convert(compiled, return_report=True)
    assert [name for name, _ in report.skipped] == ["0", "2"] and not report.layers
    assert all("torch.jit" in reason for _, reason in report.skipped)
    assert torch.equal(converted(x), model(x))
    with pytest.warns(UserWarning, match="torch.jit"):
        convert(compiled)


def test_output_search_runs_its_probes_with_the_convs_hooks():
    """The reference output runs the convs' forward hooks; so must every probe of the search
    (a probe without the hook saw an error of 0.5 at an exact rank and gave up)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    with torch.no_grad():  # the last conv has rank 2 on its output side
        model[2].weight.copy_((torch.randn(8, 2) @ torch.randn(2, 8 * 9)).reshape(8, 8, 3, 3))
    model[2].register_forward_hook(lambda module, inputs, output: 2.0 * output)
    x = torch.randn(2, 8, 6, 6)
    converted, report = convert(model, output_tolerance=1e-3, example_input=x, return_report=True)
    rows = {row.name: row for row in report.layers}
    assert rows["2"].ranks[0] == 2 and report.output_error <= 1e-3
    with torch.no_grad():
        assert _relative(converted(x), model(x)) <= 1e-3
