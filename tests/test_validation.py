"""One validation vocabulary (``ttconv._conv_args``): every public entry point refuses a bad
argument with ``TypeError`` for a wrong type and ``ValueError`` for a wrong value, in a
message that names the argument.

Two halves: the vocabulary itself on a sweep of values (each check accepts exactly its
domain, and the type of the exception depends only on the type of the value), then the
entry points, each with its bad arguments.
"""

from __future__ import annotations

import inspect
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import ttconv
from ttconv import _conv_args as args
from ttconv import bounds
from ttconv import evaluate as ev

# ------------------------------------------------------------------ the vocabulary
# Values of every kind, with the type class each belongs to. The checks below must agree
# with an independent statement of their domain on every one of them.
_SWEEP = [True, False, None, "1", "linf", b"x", [1], (1,), 1j, object(),  # never numbers
          0, 1, 2, 7, -1, -5, 10**20, np.int64(3), np.int32(0),  # integers
          0.0, 0.5, 1.0, 1.5, -0.25, 2.0, 1e-300, math.inf, -math.inf, math.nan, np.float32(0.5),
          Fraction(1, 3), Fraction(3, 2)]


def _is_integer(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value):
    return _is_integer(value) or isinstance(value, (float, np.floating, Fraction))


# name -> (check, type predicate, value predicate on the right type, text of the message)
_SCALAR_CHECKS = {
    "positive_int": (args.positive_int, _is_integer, lambda v: v >= 1, "a positive int"),
    "non_negative_int": (args.non_negative_int, _is_integer, lambda v: v >= 0, "an int >= 0"),
    "positive_finite": (args.positive_finite, _is_real, lambda v: math.isfinite(v) and v > 0,
                        "a positive finite number"),
    "non_negative_finite": (args.non_negative_finite, _is_real, lambda v: math.isfinite(v) and v >= 0,
                            "a finite number >= 0"),
    "fraction": (args.fraction, _is_real, lambda v: 0 < v <= 1, r"a number in \(0, 1\]"),
    "boolean": (args.boolean, lambda v: isinstance(v, bool), lambda v: True, "True or False"),
}


@pytest.mark.parametrize("check_name", sorted(_SCALAR_CHECKS))
def test_each_scalar_check_accepts_exactly_its_domain_and_raises_by_kind(check_name):
    check, right_type, right_value, text = _SCALAR_CHECKS[check_name]
    for value in _SWEEP:
        if not right_type(value):
            with pytest.raises(TypeError, match=rf"^my_arg must be {text} \(a hint\), got .* of type "):
                check(value, "my_arg", "a hint")
        elif not right_value(value):
            with pytest.raises(ValueError, match=rf"^my_arg must be {text} \(a hint\), got "):
                check(value, "my_arg", "a hint")
        else:
            result = check(value, "my_arg", "a hint")
            assert type(result) in (int, float, bool) and result == type(result)(value), (check_name, value, result)


def test_positive_int_maximum_is_inclusive_and_named():
    assert args.positive_int(6, "n_iter", maximum=6) == 6
    with pytest.raises(ValueError, match=r"^n_iter must be an int in \[1, 6\], got 7$"):
        args.positive_int(7, "n_iter", maximum=6)
    with pytest.raises(TypeError, match=r"^n_iter must be an int in \[1, 6\], got True of type bool$"):
        args.positive_int(True, "n_iter", maximum=6)


def test_interval_is_a_pair_of_finite_reals_in_increasing_order():
    for value in _SWEEP:
        for other in (0.5, 2, -math.inf, True):
            pair = (value, other)
            if not (_is_real(value) and _is_real(other)):
                with pytest.raises(TypeError, match=r"^clamp must be \(low, high\), .* of type tuple$"):
                    args.interval(pair, "clamp")
            elif not (math.isfinite(value) and math.isfinite(other) and value < other):
                with pytest.raises(ValueError, match=r"^clamp must be \(low, high\), two finite numbers with low < high"):
                    args.interval(pair, "clamp")
            else:
                assert args.interval(pair, "clamp") == (float(value), float(other))
    for value in (None, 0.5, "01", (0.0,), (0.0, 1.0, 2.0)):
        with pytest.raises(TypeError, match="^clamp must be"):
            args.interval(value, "clamp")


def test_choice_lists_the_options_in_order_and_takes_a_table():
    table = {"b": 1, "a": 2}
    assert args.choice("a", "method", table) == "a"
    with pytest.raises(ValueError, match=r"^method must be one of 'b', 'a', got 'c'$"):
        args.choice("c", "method", table)
    with pytest.raises(ValueError, match=r"^method must be one of 'b', 'a' \(why\), got 'A'$"):
        args.choice("A", "method", table, "why")  # case matters
    for value in (None, 1, b"a", ["a"]):
        with pytest.raises(TypeError, match=r"^method must be one of 'b', 'a', got .* of type "):
            args.choice(value, "method", table)


# ------------------------------------------------------------------ the entry points
def _conv():
    return nn.Conv2d(3, 4, 3, padding=1)


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()


def _loader():
    return [(torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 0]))]


def _example():
    """Built in the test (not at import), so it is on the test's device."""
    return torch.zeros(1, 3, 4, 4)


# (id, call taking the bad keyword, keyword, bad value, expected exception type)
_ENTRY_POINTS = [
    # bounds
    ("ff_method", lambda **kw: bounds.fantastic_four_bound(_conv(), **kw), "method", "svd", ValueError),
    ("ff_method_type", lambda **kw: bounds.fantastic_four_reshape_bounds(_conv(), **kw), "method", 1, TypeError),
    ("ff_n_iter", lambda **kw: bounds.fantastic_four_bound(_conv(), method="power", **kw), "n_iter", 0, ValueError),
    ("ff_n_iter_bool", lambda **kw: bounds.fantastic_four_bound(_conv(), **kw), "n_iter", True, TypeError),
    ("gram_n_iter", lambda **kw: bounds.gram_iteration_bound(_conv(), 8, **kw), "n_iter", 2.0, TypeError),
    ("spatial_n_iter", lambda **kw: bounds.spatial_gram_bound(_conv(), **kw), "n_iter", 7, ValueError),
    ("spatial_n_iter_type", lambda **kw: bounds.spatial_gram_bound(_conv(), **kw), "n_iter", "2", TypeError),
    ("power_n_iter", lambda **kw: bounds.power_iteration_estimate(_conv(), 8, **kw), "n_iter", -1, ValueError),
    ("padding_mode", lambda **kw: bounds.fantastic_four_bound(torch.randn(2, 2, 3, 3), **kw), "padding_mode",
     "mirror", ValueError),
    ("padding_mode_type", lambda **kw: bounds.fantastic_four_bound(torch.randn(2, 2, 3, 3), **kw), "padding_mode",
     None, TypeError),
    ("ff_per_group", lambda **kw: bounds.fantastic_four_reshape_bounds(_conv(), **kw), "per_group", 1, TypeError),
    # control
    ("scale_cap", lambda **kw: ttconv.scale_to_spectral_norm_(_conv(), input_size=8, **kw), "max_singular_value",
     0.0, ValueError),
    ("scale_cap_type", lambda **kw: ttconv.scale_to_spectral_norm_(_conv(), input_size=8, **kw),
     "max_singular_value", "1", TypeError),
    ("clip_cap", lambda **kw: ttconv.clip_singular_values_(_conv(), input_size=8, **kw), "max_singular_value",
     math.inf, ValueError),
    ("clip_n_iter", lambda **kw: ttconv.clip_singular_values_(_conv(), 1.0, 8, **kw), "n_iter", 0, ValueError),
    ("control_cap", lambda **kw: ttconv.SpectralControl(_model(), example_input=_example(), **kw),
     "max_singular_value", -1.0, ValueError),
    ("control_every", lambda **kw: ttconv.SpectralControl(_model(), 1.0, example_input=_example(), **kw), "every",
     0, ValueError),
    ("control_every_type", lambda **kw: ttconv.SpectralControl(_model(), 1.0, example_input=_example(), **kw),
     "every", 1.5, TypeError),
    ("control_mode", lambda **kw: ttconv.SpectralControl(_model(), 1.0, example_input=_example(), **kw), "mode",
     "exact", ValueError),
    ("control_tol", lambda **kw: ttconv.SpectralControl(_model(), 1.0, example_input=_example(), **kw),
     "orthonormality_tol", -1e-3, ValueError),
    ("control_n_iter", lambda **kw: ttconv.SpectralControl(_model(), 1.0, example_input=_example(), **kw), "n_iter",
     True, TypeError),
    ("regularizer_method",
     lambda **kw: ttconv.SpectralControl(_model(), 1.0, example_input=_example()).regularizer(**kw), "method",
     "power", ValueError),
    # convert
    ("convert_energy", lambda **kw: ttconv.convert(_model(), **kw), "energy", 1.5, ValueError),
    ("convert_energy_type", lambda **kw: ttconv.convert(_model(), **kw), "energy", "0.9", TypeError),
    ("convert_rank", lambda **kw: ttconv.convert(_model(), **kw), "rank", 0.0, ValueError),
    ("convert_budget", lambda **kw: ttconv.convert(_model(), **kw), "param_budget", 0, ValueError),
    ("convert_budget_bool", lambda **kw: ttconv.convert(_model(), **kw), "param_budget", True, TypeError),
    ("convert_tolerance", lambda **kw: ttconv.convert(_model(), example_input=_example(), **kw), "output_tolerance",
     math.nan, ValueError),
    ("convert_refine", lambda **kw: ttconv.convert(_model(), **kw), "refine", -1, ValueError),
    ("convert_refine_type", lambda **kw: ttconv.convert(_model(), **kw), "refine", 1.0, TypeError),
    ("convert_inplace", lambda **kw: ttconv.convert(_model(), **kw), "inplace", "no", TypeError),
    ("convert_return_report", lambda **kw: ttconv.convert(_model(), **kw), "return_report", 1, TypeError),
    ("densify_inplace", lambda **kw: ttconv.densify(_model(), **kw), "inplace", None, TypeError),
    ("load_converted_strict", lambda **kw: ttconv.load_converted(_model(), _model().state_dict(), **kw), "strict",
     "False", TypeError),
    # report
    ("report_gram", lambda **kw: ttconv.spectral_report(_model(), _example(), **kw), "gram_iters", 0, ValueError),
    ("report_power", lambda **kw: ttconv.spectral_report(_model(), _example(), **kw), "power_iters", 2.5, TypeError),
    ("report_memory", lambda **kw: ttconv.spectral_report(_model(), _example(), **kw), "max_memory", 0, ValueError),
    ("report_memory_type", lambda **kw: ttconv.spectral_report(_model(), _example(), **kw), "max_memory", "1GB",
     TypeError),
    ("state_dict_size", lambda **kw: ttconv.state_dict_report(_model().state_dict(), **kw), "input_size",
     (8, 8, 8, 8), ValueError),
    ("state_dict_size_entry", lambda **kw: ttconv.state_dict_report(_model().state_dict(), **kw), "input_size",
     (8, 0), ValueError),
    ("state_dict_size_type", lambda **kw: ttconv.state_dict_report(_model().state_dict(), **kw), "input_size",
     8.0, TypeError),
    ("report_keep_spectra", lambda **kw: ttconv.spectral_report(_model(), _example(), **kw), "keep_spectra", "yes",
     TypeError),
    ("state_dict_keep_spectra", lambda **kw: ttconv.state_dict_report(_model().state_dict(), **kw), "keep_spectra",
     None, TypeError),
    # evaluate
    ("pgd_random_start", lambda **kw: ev.pgd(_model(), *_loader()[0], 0.1, **kw), "random_start", 0, TypeError),
    ("attack", lambda **kw: ev.attack_accuracy(_model(), _loader(), 0.1, **kw), "attack", "cw", ValueError),
    ("attack_type", lambda **kw: ev.attack_accuracy(_model(), _loader(), 0.1, **kw), "attack", None, TypeError),
    ("attack_norm", lambda **kw: ev.attack_accuracy(_model(), _loader(), 0.1, **kw), "norm", "l1", ValueError),
    ("pgd_steps", lambda **kw: ev.pgd(_model(), *_loader()[0], 0.1, **kw), "steps", 0, ValueError),
    ("pgd_restarts", lambda **kw: ev.pgd(_model(), *_loader()[0], 0.1, **kw), "restarts", 1.0, TypeError),
    ("pgd_eps", lambda **kw: ev.pgd(_model(), *_loader()[0], **kw), "eps", -0.1, ValueError),
    ("fgsm_clamp", lambda **kw: ev.fgsm(_model(), *_loader()[0], 0.1, **kw), "clamp", (1.0, 0.0), ValueError),
    ("pgd_clamp_type", lambda **kw: ev.pgd(_model(), *_loader()[0], 0.1, **kw), "clamp", (0, "1"), TypeError),
    ("histogram_range", lambda **kw: ev.singular_value_histograms(_model(), _example(), **kw), "range", (2.0, 2.0),
     ValueError),
    ("fgsm_x_type", lambda **kw: ev.fgsm(_model(), y=torch.tensor([0]), eps=0.1, **kw), "x", [[0.0]], TypeError),
    ("fgsm_y", lambda **kw: ev.fgsm(_model(), torch.rand(2, 3, 4, 4), eps=0.1, **kw), "y", torch.zeros(2, 1),
     ValueError),
    ("calibration_logits_type", lambda **kw: ev.calibration_report(labels=torch.tensor([0]), **kw), "logits",
     [[0.1, 0.9]], TypeError),
    ("calibration_logits", lambda **kw: ev.calibration_report(labels=torch.tensor([0]), **kw), "logits",
     torch.zeros(1, 1), ValueError),
    ("margin_labels_type", lambda **kw: ev.margin_loss(torch.randn(2, 3), **kw), "labels", (0, 1), TypeError),
    ("margin_labels", lambda **kw: ev.margin_loss(torch.randn(2, 3), **kw), "labels", torch.zeros(2), ValueError),
    ("fgsm_eps_type", lambda **kw: ev.fgsm(_model(), *_loader()[0], **kw), "eps", "0.1", TypeError),
    ("calibration_bins", lambda **kw: ev.calibration(_model(), _loader(), **kw), "n_bins", 0, ValueError),
    ("certified_lipschitz", lambda **kw: ev.certified_accuracy(_model(), _loader(), eps=0.1, **kw), "lipschitz",
     0.0, ValueError),
    ("certified_lipschitz_type", lambda **kw: ev.certified_accuracy(_model(), _loader(), eps=0.1, **kw),
     "lipschitz", None, TypeError),
    ("margin_reduction", lambda **kw: ev.margin_loss(torch.randn(2, 3), torch.tensor([0, 1]), **kw), "reduction",
     "max", ValueError),
    ("margin_min", lambda **kw: ev.margin_loss(torch.randn(2, 3), torch.tensor([0, 1]), **kw), "min_margin",
     0.0, ValueError),
    ("margin_kr", lambda **kw: ev.margin_loss(torch.randn(2, 3), torch.tensor([0, 1]), **kw), "kr_weight",
     True, TypeError),
    ("empirical_n_iter", lambda **kw: ev.empirical_lipschitz(_model(), _loader(), **kw), "n_iter", 0, ValueError),
    ("histogram_bins", lambda **kw: ev.singular_value_histograms(_model(), _example(), **kw), "bins", 0.5,
     TypeError),
]


@pytest.mark.parametrize("call, keyword, value, error", [case[1:] for case in _ENTRY_POINTS],
                         ids=[case[0] for case in _ENTRY_POINTS])
def test_a_bad_argument_is_refused_with_its_kind_and_its_name(call, keyword, value, error):
    with pytest.raises((TypeError, ValueError)) as raised:
        call(**{keyword: value})
    assert type(raised.value) is error, f"{keyword}={value!r}: {type(raised.value).__name__}: {raised.value}"
    message = str(raised.value)
    # The message starts with the argument's name (or an element of it) and shows the value given.
    assert re.match(rf"{keyword}(\[\d+\])? must be ", message), message
    # (a tensor is shown by its shape)
    shown = [f"shape {tuple(value.shape)}"] if isinstance(value, torch.Tensor) else [repr(value)]
    shown += [repr(item) for item in value] if isinstance(value, tuple) else []
    assert any(text in message for text in shown), message
    if error is TypeError:
        assert f"of type {type(value).__name__}" in message, message


# ------------------------------------------------------------------ dispatch tables
def _documented_choices():
    from ttconv import control

    return [
        (ttconv.SpectralControl, "mode", control._MODES),
        (ttconv.SpectralControl.regularizer, "method", control._REGULARIZERS),
        (bounds.fantastic_four_reshape_bounds, "method", bounds._MATRIX_NORMS),
        (ev.attack_accuracy, "attack", ev._ATTACKS),
        (ev.fgsm, "norm", ev._BALLS),
        (ev.pgd, "norm", ev._BALLS),
        (ev.certified_accuracy, "norm", ev._BALLS),
        (ev.margin_loss, "reduction", ev._REDUCTIONS),
    ]


@pytest.mark.parametrize("function, name, table", _documented_choices(),
                         ids=[f"{f.__qualname__}-{n}" for f, n, _ in _documented_choices()])
def test_documented_choices_are_the_dispatch_tables_keys(function, name, table):
    """The docstring's ``name : {...}`` line lists the table's keys, in the table's order
    (the default first), and an unknown choice's error lists the same keys."""
    listed = ", ".join(repr(key) for key in table)
    assert f"{name} : {{{listed}}}" in function.__doc__
    assert list(table)[0] == inspect.signature(function).parameters[name].default or name == "norm" and (
        inspect.signature(function).parameters[name].default in table)


# ------------------------------------------------------------------ state the layer does not use
@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate", "zeros"])
def test_padding_changed_after_construction_is_refused_where_the_forward_ignores_it(mode):
    """torch's convs pad by the amount fixed at construction for every mode but zeros; a
    ``padding`` set afterwards would be analysed while the layer computes with the old one
    (measured: every bound 18.0 for a true norm 27-31). Analysis and conversion refuse, naming
    both paddings; where the forward does read ``padding`` (zero padding) the new value is used
    and the bound holds against the explicit operator."""
    from oracle import layer_operator, operator_matrix, svdvals_cpu

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=2, padding_mode=mode, bias=False, dtype=torch.float64)
    conv.padding = (0, 0)
    if mode == "zeros":
        truth = float(svdvals_cpu(operator_matrix(layer_operator(conv), (2, 4, 4)))[0])
        with torch.no_grad():
            assert float(bounds.operator_norm_bound(conv, 4)) >= truth * (1 - 1e-12)
        return
    pattern = r"padding=\(0, 0\) is not the padding its forward applies \(\(2, 2, 2, 2\)"
    for call in (lambda: bounds.operator_norm_bound(conv, 4), lambda: bounds.fantastic_four_bound(conv),
                 lambda: bounds.power_iteration_estimate(conv, 4), lambda: ttconv.SVDConv.from_conv(conv),
                 lambda: ttconv.spectral_report(nn.Sequential(conv), torch.zeros(1, 2, 4, 4, dtype=torch.float64))):
        with pytest.raises(ValueError, match=pattern):
            call()


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate", "zeros"])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (1, 2)])
def test_an_svd_layers_padding_set_after_construction_is_the_one_every_path_uses(mode, kernel, stride):
    """ttconv's layers take a new ``padding`` everywhere: every forward path (before: the dense
    path used the new value, the factored one the old, different output shapes), ``to_conv``
    and the bounds, checked against the explicit operator; a bad value is refused as at
    construction."""
    from oracle import layer_operator, operator_matrix, svdvals_cpu

    torch.manual_seed(1)
    layer = ttconv.SVDConv(2, 2, kernel, stride=stride, padding=2, padding_mode=mode, bias=False, rank=1,
                           dtype=torch.float64)
    layer.padding = 1
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    reference = layer.to_conv()
    assert reference.padding == (1, 1)
    expected = reference(x)
    for path in ("dense", "factored"):
        layer.path = path
        assert torch.allclose(layer(x), expected, rtol=0, atol=1e-12), path
    truth = float(svdvals_cpu(operator_matrix(layer_operator(layer), (2, 6, 6)))[0])
    with torch.no_grad():
        assert float(bounds.operator_norm_bound(layer, 6)) >= truth * (1 - 1e-12)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        ttconv.SVDConv(2, 2, 3, stride=2).padding = "same"
    with pytest.raises(ValueError, match="padding as an int or a tuple"):
        ttconv.SVDConvTranspose2d(2, 2, 3).padding = "same"
