"""Singular-value control: scaling is exact, clipping is reported honestly, training survives."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from configs import config_id, random_conv_configs
from models import SmallResNet
from oracle import circular_singular_values
from ttconv import SpectralControl, SVDConv, clip_singular_values_, convert, scale_to_spectral_norm_, spectral_norm
from ttconv.tt import orthonormality_error

CONFIGS = random_conv_configs(60, seed=4, max_in_numel=600)


def _oracle_norm(layer, n):
    weight = (layer.dense_weight() if isinstance(layer, SVDConv) else layer.weight).detach()
    stride = layer.stride if all(a % s == 0 for a, s in zip(n, layer.stride)) else (1, 1)
    return float(circular_singular_values(weight, n, stride, layer.dilation, layer.groups)[0])


def _layer(config, index):
    if index % 2:
        return nn.Conv2d(**config["conv"], dtype=torch.float64)
    return SVDConv(**config["conv"], rank=config["rank"], dtype=torch.float64)


@pytest.mark.parametrize("index, config", list(enumerate(CONFIGS)), ids=[config_id(c) for c in CONFIGS])
def test_scale_is_exact_and_clip_is_reported_honestly(index, config):
    n = config["n"]
    layer = _layer(config, index)
    before = _oracle_norm(layer, n)
    target = 0.5 * before
    ids = [id(p) for p in layer.parameters()]
    clipped = clip_singular_values_(layer, target, n)
    assert abs(clipped - _oracle_norm(layer, n)) <= 1e-9 * before  # the value returned is the true norm
    assert clipped < before
    reached = scale_to_spectral_norm_(layer, target, n)
    assert _oracle_norm(layer, n) <= target * (1 + 1e-9)
    assert abs(reached - _oracle_norm(layer, n)) <= 1e-9 * before
    assert [id(p) for p in layer.parameters()] == ids


def test_clip_converges_with_iterations_and_never_touches_small_layers():
    conv = nn.Conv2d(4, 4, 3, padding=1, dtype=torch.float64)
    norm = float(spectral_norm(conv, 8).detach())
    once = clip_singular_values_(conv, 0.5 * norm, 8)
    many = clip_singular_values_(conv, 0.5 * norm, 8, n_iter=30)
    assert abs(many - 0.5 * norm) < abs(once - 0.5 * norm)
    layer = SVDConv(4, 4, 3, padding=1)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert scale_to_spectral_norm_(layer, 100.0, 8) < 100.0
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())


def _regression_setup(mode, every, rank=3):
    torch.manual_seed(0)
    model = nn.Sequential(SVDConv(3, 6, 3, padding=1, rank=rank), nn.ReLU(), SVDConv(6, 6, 3, stride=2, padding=1, rank=rank),
                          nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1))
    control = SpectralControl(model, 0.8, every=every, mode=mode, example_input=torch.zeros(1, 3, 8, 8))
    return model, teacher, control


@pytest.mark.parametrize("mode", ["clip_scale", "scale", "clip"])
def test_thousand_steps_with_periodic_control(mode):
    model, teacher, control = _regression_setup(mode, every=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = [id(p) for p in model.parameters()]
    losses = []
    for step in range(1000):
        x = torch.randn(8, 3, 8, 8)
        loss = F.mse_loss(model(x), teacher(x).detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        result = control.step()
        assert (result is not None) == ((step + 1) % 10 == 0)
        losses.append(loss.item())
    assert [id(p) for p in model.parameters()] == ids  # optimizer state still attached
    # It kept learning (scale, which divides every singular value by the same factor, learns
    # least: about 0.6 since the direct factor sampling at construction, 0.3-0.4 for the clip modes).
    assert sum(losses[-50:]) < 0.75 * sum(losses[:50])
    for layer in (model[0], model[2]):
        assert orthonormality_error(layer.U) < 1e-5 and orthonormality_error(layer.V) < 1e-5
    reached = control.apply()
    for (name, layer, size) in control.layers:
        truth = _oracle_norm(layer, size)
        assert abs(reached[name] - truth) < 1e-4 * max(1, truth)
        if mode != "clip":  # the guaranteed modes
            assert truth <= 0.8 * (1 + 1e-5)


def test_control_step_changes_nothing_when_within_target():
    model = nn.Sequential(SVDConv(3, 6, 3, padding=1, rank=3), nn.Conv2d(6, 6, 3))
    control = SpectralControl(model, 1e3, every=1, example_input=torch.zeros(1, 3, 8, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    control.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_regularizers_are_differentiable_and_lower_the_norms():
    for method in ("fantastic_four", "exact"):
        model = convert(SmallResNet(width=4), rank=2)
        control = SpectralControl(model, 1.0, example_input=torch.zeros(1, 3, 8, 8))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
        start = control.regularizer(method).item()
        for _ in range(10):
            loss = control.regularizer(method)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert control.regularizer(method).item() < start


def test_looks_inside_data_parallel_and_records_sizes():
    model = SmallResNet(width=4)
    control = SpectralControl(nn.DataParallel(model), 1.0, example_input=torch.zeros(1, 3, 16, 16))
    sizes = {name: size for name, _, size in control.layers}
    assert sizes["stem"] == (16, 16) and sizes["layers.2.conv2"] == (4, 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_singular_value=0.0), ValueError, "max_singular_value must be a positive"),
        (dict(max_singular_value=-1), ValueError, "max_singular_value must be a positive"),
        (dict(max_singular_value=float("inf")), ValueError, "max_singular_value must be a positive finite"),
        (dict(every=0), ValueError, "every must be a positive int .* got 0"),
        (dict(every=2.5), TypeError, "every must be a positive int .* got 2.5 of type float"),
        (dict(mode="project"), ValueError, "mode must be one of 'clip_scale', 'clip', 'scale' .* got 'project'"),
        (dict(mode=None), TypeError, "mode must be one of 'clip_scale', 'clip', 'scale' .* got None of type NoneType"),
        (dict(n_iter=0), ValueError, "n_iter must be a positive int .* got 0"),
        (dict(n_iter=2.0), TypeError, "n_iter must be a positive int .* got 2.0"),
        (dict(n_iter=True), TypeError, "n_iter must be a positive int .* of type bool"),
        (dict(orthonormality_tol=-1e-3), ValueError, "orthonormality_tol must be a finite number >= 0"),
        (dict(orthonormality_tol=float("nan")), ValueError, "orthonormality_tol must be a finite number >= 0"),
        (dict(orthonormality_tol="1e-6"), TypeError, "orthonormality_tol must be a finite number >= 0"),
        (dict(example_input=torch.zeros(1, 5, 8, 8)), ValueError, "example_input could not be run"),
        (dict(example_input=None), ValueError, "example_input is required"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    options = dict(max_singular_value=1.0, example_input=torch.zeros(1, 3, 8, 8))
    options.update(kwargs)
    max_singular_value = options.pop("max_singular_value")
    with pytest.raises(error, match=match):
        SpectralControl(SmallResNet(width=4), max_singular_value, **options)


def test_default_mode_is_the_guaranteed_clip_then_scale():
    control = SpectralControl(SmallResNet(width=4), 1.0, example_input=torch.zeros(1, 3, 8, 8))
    assert (control.mode, control.n_iter) == ("clip_scale", 1)
    control = SpectralControl(SmallResNet(width=4), 1.0, mode="clip", n_iter=4, example_input=torch.zeros(1, 3, 8, 8))
    assert (control.mode, control.n_iter) == ("clip", 4)


def test_complex_layers_are_refused_not_cast_to_real():
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", dtype=torch.complex128)
    for call in (lambda: spectral_norm(conv, 5), lambda: scale_to_spectral_norm_(conv, 0.1, 5),
                 lambda: clip_singular_values_(conv, 0.1, 5)):
        with pytest.raises(TypeError, match="layer must have a real floating-point weight, got torch.complex128"):
            call()


def test_models_without_convs_and_bad_layers_are_refused():
    with pytest.raises(ValueError, match="has no conv layers to control"):
        SpectralControl(nn.Linear(3, 3), 1.0, example_input=torch.zeros(1, 3))
    with pytest.raises(TypeError, match="layer must be an nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, SVDConv1d/2d/3d or SVDConvTranspose1d/2d/3d, got Linear"):
        clip_singular_values_(nn.Linear(3, 3), 1.0, 8)
    with pytest.raises(ValueError, match="max_singular_value"):
        scale_to_spectral_norm_(nn.Conv2d(2, 2, 3), 0, 8)
    with pytest.raises(TypeError, match="layer must be an nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, SVDConv1d/2d/3d or SVDConvTranspose1d/2d/3d, got Linear"):
        scale_to_spectral_norm_(nn.Linear(3, 3), 1.0, 8)


def _deprecated_weight_norm(conv):
    import warnings

    with warnings.catch_warnings():  # torch 2.13 deprecates the hook-based weight_norm; models still use it
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(conv)


def _reparametrized_convs():
    """Convs whose weight a reparametrization recomputes before every forward, by name."""
    from torch.nn.utils import parametrizations, parametrize

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    def conv():
        return nn.Conv2d(3, 3, 3, padding=1).double()

    custom = conv()
    parametrize.register_parametrization(custom, "weight", Doubled())
    svd = SVDConv(3, 3, 3, padding=1, dtype=torch.float64)
    parametrize.register_parametrization(svd, "S", Doubled())
    return {"parametrizations.weight_norm": parametrizations.weight_norm(conv()),
            "parametrizations.spectral_norm": parametrizations.spectral_norm(conv()),
            "nn.utils.weight_norm": _deprecated_weight_norm(conv()),
            "nn.utils.spectral_norm": torch.nn.utils.spectral_norm(conv()),
            "pruning": torch.nn.utils.prune.random_unstructured(conv(), "weight", amount=0.3),
            "parametrize(2 w)": custom, "SVDConv with S parametrized": svd}


@pytest.mark.parametrize("kind", sorted(_reparametrized_convs()))
def test_control_refuses_reparametrized_layers_and_leaves_them_unchanged(kind):
    """Control writes the stored tensors; a reparametrization recomputes the ones a forward uses,
    so a scale or clip would report a norm the layer does not have (measured before this check:
    'scaled' to 0.1, norm 1.1 after the next forward). Each write path refuses, names the layer
    and the fix, and changes nothing; the read-only ``spectral_norm`` still answers."""
    layer = _reparametrized_convs()[kind].eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for call in (lambda: scale_to_spectral_norm_(layer, 0.1, 6), lambda: clip_singular_values_(layer, 0.1, 6)):
        with pytest.raises(ValueError, match="layer is reparametrized .*remove_parametrizations"):
            call()
    with pytest.raises(ValueError, match=r"layer '0' is reparametrized .*ttconv.convert folds it"):
        SpectralControl(nn.Sequential(layer), 0.1, every=1, example_input=x)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        layer(x)  # hook-based ones refresh .weight here
        assert float(spectral_norm(layer, 6)) > 0


@pytest.mark.parametrize("mode, norms_per_layer", [("scale", 1), ("clip", 2), ("clip_scale", 2)])
def test_a_control_pass_computes_each_norm_once(mode, norms_per_layer, monkeypatch):
    """One exact norm per layer before (passed on to the scale), one after a clip (passed on to
    clip_scale's scale), none twice; a layer within the target costs one norm."""
    import ttconv.control as control

    calls = []
    exact_norm = control._norm  # every norm a pass computes goes through it

    def counted(*args):
        calls.append(args[1])
        return exact_norm(*args)

    monkeypatch.setattr(control, "_norm", counted)
    torch.manual_seed(0)
    model = nn.Sequential(SVDConv(3, 8, 3, padding=1, rank=4), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          SVDConv(8, 8, 3, stride=2, padding=1))
    control_ = SpectralControl(model, 1e-3, every=1, mode=mode, example_input=torch.zeros(1, 3, 8, 8))
    reached = control_.apply()
    assert len(calls) == norms_per_layer * 3
    for name, layer, size in control_.layers:  # the values passed on are the exact norms reached
        assert reached[name] == pytest.approx(_oracle_norm(layer, size), rel=1e-4)
    calls.clear()
    SpectralControl(model, 1e3, every=1, mode=mode, example_input=torch.zeros(1, 3, 8, 8)).apply()
    assert len(calls) == 3
