"""convert on convs that are not plain nn.Conv2d: reparametrized ones fold exactly, the rest are listed.

Every check compares with an independent computation (the original model's output, or
the effective kernel written out by hand) and fails on a convert that uses the raw
weight, drops the hook, crashes in deepcopy or skips without a word.
"""

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm

from ttconv import SVDConv, convert


def _relative(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _spectral_norm(conv):
    return nn.utils.spectral_norm(conv)


def _weight_norm(conv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates it; models still use it
        return nn.utils.weight_norm(conv)


def _pruned(conv):
    return prune.l1_unstructured(conv, "weight", amount=0.4)


REPARAMETRIZATIONS = {
    "spectral_norm": (_spectral_norm, "spectral_norm on weight folded"),
    "weight_norm": (_weight_norm, "weight_norm on weight folded"),
    "prune": (_pruned, "pruning (L1Unstructured) on weight folded"),
    "parametrizations.orthogonal": (parametrizations.orthogonal, "parametrization Orthogonal on weight folded"),
    "parametrizations.spectral_norm": (parametrizations.spectral_norm, "parametrization SpectralNorm on weight"),
    "parametrizations.weight_norm": (parametrizations.weight_norm, "parametrization WeightNorm on weight folded"),
}


def _trained_model(kind, dtype=torch.float64):
    """Conv with ``kind`` between plain convs, after a few SGD steps in training mode."""
    torch.manual_seed(0)
    wrap, _ = REPARAMETRIZATIONS[kind]
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, dtype=dtype), nn.ReLU(),
        wrap(nn.Conv2d(6, 6, 3, padding=1, dtype=dtype)), nn.ReLU(),
        nn.Conv2d(6, 4, 1, dtype=dtype),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # training forwards move spectral norm's u, v and leave a non-leaf .weight
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8, dtype=dtype)).square().mean().backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("kind", sorted(REPARAMETRIZATIONS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_reparametrized_conv_converts_its_effective_kernel_exactly(kind, dtype, tolerance):
    model = _trained_model(kind, dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted, report = convert(model, return_report=True)
    assert type(converted[2]) is SVDConv
    assert _relative(converted(x), expected) < tolerance
    assert report.relative_error < tolerance  # measured against the effective kernel
    assert any(note.startswith(REPARAMETRIZATIONS[kind][1]) for note in report.layers[1].notes)
    assert REPARAMETRIZATIONS[kind][1] in str(report)
    # The original is untouched: no power-iteration step, same output.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(model(x), expected)


def test_hook_spectral_norm_folds_weight_over_sigma_of_the_stored_vectors():
    model = _trained_model("spectral_norm")
    conv = model[2]
    matrix = conv.weight_orig.detach().reshape(6, -1)
    sigma = conv.weight_u @ matrix @ conv.weight_v  # what the eval-mode forward divides by
    converted = convert(model, return_report=True)[0]
    expected = conv.weight_orig.detach() / sigma
    assert _relative(converted[2].dense_weight(), expected) < 1e-12
    # The raw weight is a different kernel: converting it was the old, silent mistake.
    assert _relative(conv.weight_orig, expected) > 1e-3


def test_training_mode_spectral_norm_folds_the_eval_mode_kernel():
    model = _trained_model("spectral_norm").train()
    u = model[2].weight_u.clone()
    converted = convert(model, return_report=True)[0]
    assert converted.training and converted[2].training
    assert torch.equal(model[2].weight_u, u)  # converting ran no power iteration
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert _relative(converted(x), model.eval()(x)) < 1e-10


@pytest.mark.parametrize("kind", ["spectral_norm", "weight_norm", "prune"])
def test_hook_based_models_deep_copy_and_convert_inplace(kind):
    model = _trained_model(kind)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    expected = model(x)
    copied = convert(model, return_report=True)[0]
    assert _relative(copied(x), expected) < 1e-10
    same, report = convert(model, inplace=True, return_report=True)
    assert same is model and type(model[2]) is SVDConv
    assert _relative(model(x), expected) < 1e-10


def test_frozen_reparametrization_gives_frozen_factors():
    model = _trained_model("weight_norm")
    model[2].weight_g.requires_grad_(False)
    model[2].weight_v.requires_grad_(False)
    orthogonal = _trained_model("parametrizations.orthogonal")
    orthogonal[2].parametrizations.weight.original.requires_grad_(False)
    for source in (model, orthogonal):
        layer = convert(source, return_report=True)[0][2]
        assert [p.requires_grad for p in (layer.U, layer.S, layer.core, layer.V, layer.bias)] == [False] * 4 + [True]


def test_from_conv2d_folds_with_a_warning():
    conv = _trained_model("spectral_norm")[2]
    x = torch.randn(1, 6, 8, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="from_conv2d: spectral_norm on weight folded"):
        layer = SVDConv.from_conv2d(conv)
    assert _relative(layer(x), conv(x)) < 1e-10


def test_without_report_a_warning_names_the_folded_layer():
    model = _trained_model("parametrizations.orthogonal")
    with pytest.warns(UserWarning, match=r"'2': parametrization Orthogonal on weight folded.*no longer enforced"):
        convert(model)


class _ScaledConv(nn.Conv2d):
    def forward(self, input):
        return 2 * super().forward(input)


class _PlainSubclass(nn.Conv2d):
    pass


def _unconvertible_models():
    torch.manual_seed(0)
    buffered = nn.Conv2d(4, 4, 3, padding=1)
    buffered.register_buffer("mask", torch.ones(4, 4, 3, 3))
    tied_a, tied_b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    tied_b.weight = tied_a.weight
    patched = nn.Conv2d(4, 4, 3, padding=1)
    plain_forward = patched.forward
    patched.forward = lambda x: torch.relu(plain_forward(x))
    repadded = nn.Conv2d(4, 4, 3, padding=2, padding_mode="circular")
    repadded.padding = (1, 1)  # torch still pads by 2 (its cached _reversed_padding_repeated_twice)
    return [
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _ScaledConv(4, 4, 3, padding=1)), {"1": "_ScaledConv is a subclass of nn.Conv2d"}),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _PlainSubclass(4, 4, 3, padding=1)), {"1": "_PlainSubclass is a subclass of nn.Conv2d"}),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LazyConv2d(4, 3)), {"1": "uninitialized lazy conv"}),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), buffered), {"1": "holds mask besides its kernel and bias"}),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), tied_a, tied_b),
         {"1": "a parameter is shared with '2.weight'", "2": "a parameter is shared with '1.weight'"}),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), patched), {"1": "its forward is replaced on the instance"}),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), repadded),
         {"1": "its padding=(1, 1) is not the padding its forward applies ((2, 2, 2, 2)"}),
    ]


@pytest.mark.parametrize("index", range(7), ids=["subclass", "plain-subclass", "lazy", "buffer", "tied",
                                                 "patched-forward", "padding-changed"])
def test_what_cannot_convert_exactly_is_left_and_listed(index):
    model, reasons = _unconvertible_models()[index]
    x = torch.randn(2, 3, 8, 8)
    expected = model(x) if index != 2 else None
    converted, report = convert(model, return_report=True)
    assert type(converted[0]) is SVDConv
    assert [name for name, _ in report.skipped] == list(reasons)
    for name, reason in report.skipped:
        assert reason.startswith(reasons[name]), reason
        assert type(converted[int(name)]) is type(model[int(name)])  # left as it is
        assert f"  {name}: {reasons[name]}" in str(report)
    assert "skipped (left as they are):" in str(report)
    if expected is not None:
        assert _relative(converted(x), expected) < 1e-5
    first = list(reasons)[0]
    with pytest.warns(UserWarning, match=re.escape(f"'{first}' left unchanged: {reasons[first]}")):
        convert(model)


def test_plain_models_and_exclusions_do_not_warn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _ScaledConv(4, 4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
        _, report = convert(model, exclude=("1",), return_report=True)
        convert(model, exclude=("1",))
    assert report.excluded == ["1"] and report.skipped == []


def test_parametrized_module_keeps_its_parametrization_state():
    model = _trained_model("parametrizations.spectral_norm").train()
    plist = model[2].parametrizations.weight
    buffers = [b.clone() for b in plist.buffers()]
    convert(model, return_report=True)
    assert plist.training and all(m.training for m in plist.modules())
    assert all(torch.equal(a, b) for a, b in zip(buffers, plist.buffers()))
    assert parametrize.is_parametrized(model[2])


def test_user_hooks_move_while_the_folded_hook_goes():
    model = _trained_model("spectral_norm")
    calls = []
    model[2].register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    expected = model(x)
    converted, report = convert(model, return_report=True)
    hooks = list(converted[2]._forward_pre_hooks.values())
    assert len(hooks) == 1 and not isinstance(hooks[0], SpectralNorm)
    calls.clear()
    assert _relative(converted(x), expected) < 1e-10
    assert calls == ["SVDConv"]
    assert report.layers[1].notes[1].startswith("moved 1 forward pre-hook to the SVDConv")


def test_a_failing_inplace_conversion_leaves_the_model_intact():
    model = _trained_model("spectral_norm")
    with torch.no_grad():
        model[4].weight[0, 0, 0, 0] = float("nan")
    hooks = dict(model[2]._forward_pre_hooks)
    with pytest.raises(ValueError, match="layer '4'.*NaN"):
        convert(model, inplace=True)
    assert dict(model[2]._forward_pre_hooks) == hooks and type(model[0]) is nn.Conv2d
