"""Smoke runs of the examples (one epoch).

The digits examples need scikit-learn's bundled digits. The 1-D pitch and generator examples
have their own tests below: besides the printed table they check that every controlled
layer ends at most the target, against the explicit float64 matrix of its circular
operator (``circular_oracle``, nothing of ttconv), and that each model's empirical Lipschitz
estimate (a lower bound) stays below the certified upper bound the example prints.
"""

import importlib.util
import os

import pytest
import torch

from circular_oracle import circular_conv_any_size
from oracle import operator_matrix

# Subprocesses, files and numpy: these run on the CPU whatever --device says.
pytestmark = pytest.mark.cpu_only

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
OWN_TESTS = {"pitch_1d.py", "generator_digits.py"}  # checked in detail below
SCRIPTS = sorted(n for n in os.listdir(EXAMPLES)
                 if n.endswith(".py") and not n.startswith("_") and n not in OWN_TESTS)
RELATIVE_TOL = 1e-5  # float32 layers; the control guarantee is exact up to rounding


def _load(script):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(EXAMPLES, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_quick_run(script, capsys):
    pytest.importorskip("sklearn")
    _load(script).main(["--quick"])
    assert "acc" in capsys.readouterr().out


def _table_rows(out):
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header, rule, rows = lines[0], lines[1], lines[2:]
    assert set(rule) <= set("|-:")
    columns = header.count("|")
    assert all(row.count("|") == columns for row in rows)
    return header, rows


def _circular_norm(weight, n, stride, dilation, *, transposed=False):
    """Largest singular value of the layer's circular operator, from its explicit float64 matrix.

    A transposed layer on ``m`` is the adjoint of the circular conv with its weight on
    ``N = m * stride``: its matrix is that conv's matrix transposed (same singular values).
    """
    weight = weight.detach().double()
    c_in = weight.shape[1]
    matrix = operator_matrix(circular_conv_any_size(weight, stride, dilation), (c_in, *n))
    if transposed:
        matrix = matrix.T
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def test_pitch_1d_quick_run_controls_every_conv(capsys):
    module = _load("pitch_1d.py")
    target = 0.8
    results = module.main(["--quick", "--max-singular-value", str(target)])
    header, rows = _table_rows(capsys.readouterr().out)
    assert "test acc" in header and "empirical Lipschitz" in header
    assert [row.split("|")[1].strip() for row in rows] == list(results)
    assert len(results) == 5  # plain, torch spectral_norm, clip_scale, scale, exact norm cap
    # Control had something to do: the plain model's convs are above the target.
    assert results["Conv1d"]["max_sigma"] > 1.2 * target
    import ttconv

    for label, result in results.items():
        assert 0.0 <= result["accuracy"] <= 1.0 and result["lipschitz"] > 0
        if result["max_singular_value"] is None:
            continue
        model, example = result["model"], result["example"]
        lengths = {}
        kind = ttconv.SVDConv1d if label.startswith("SVDConv1d") else torch.nn.Conv1d
        hooks = [m.register_forward_hook(lambda m, i, o: lengths.__setitem__(m, tuple(i[0].shape[2:])) or None)
                 for m in model.modules() if isinstance(m, kind)]
        with torch.no_grad():
            model(example)
        for hook in hooks:
            hook.remove()
        assert len(lengths) == 4  # every conv was converted and reached
        oracle_norms = [_circular_norm(layer.weight, n, layer.stride, layer.dilation) for layer, n in lengths.items()]
        assert max(oracle_norms) <= target * (1 + RELATIVE_TOL), (label, oracle_norms)
        # The printed column is the same quantity.
        assert result["max_sigma"] == pytest.approx(max(oracle_norms), rel=1e-4)
        # clip_scale, scale and the cap bring a layer above the target exactly to it.
        assert max(oracle_norms) >= target * (1 - 1e-4)


def test_generator_quick_run_controls_the_decoder(capsys):
    pytest.importorskip("sklearn")
    module = _load("generator_digits.py")
    results = module.main(["--quick"])
    header, rows = _table_rows(capsys.readouterr().out)
    assert "test MSE" in header and "product of certified bounds" in header
    assert len(rows) == len(results) == 5
    import ttconv

    for label, result in results.items():
        assert result["mse"] > 0
        # Empirical Lipschitz (a lower bound, power iteration on Jacobians) never exceeds the
        # certified upper bound (product of per-layer operator bounds): two independent routes.
        assert result["lipschitz"] <= result["bound"] * (1 + 1e-4), label
        layers = module.decoder_layers(result["model"].decoder, result["code_example"])
        assert len(layers) == 3
        oracle_norms = []
        for _, layer, m in layers:
            n = tuple(mi * si for mi, si in zip(m, layer.stride))  # k = 2 p + s: output = m * s
            oracle_norms.append(_circular_norm(layer.weight, n, layer.stride, layer.dilation, transposed=True))
        assert result["norms"] == pytest.approx(oracle_norms, rel=1e-4), label
        if result["max_singular_value"] is not None:
            kind = ttconv.SVDConvTranspose2d if label.startswith("SVD") else torch.nn.ConvTranspose2d
            assert all(isinstance(layer, kind) for _, layer, _ in layers)
            assert max(oracle_norms) <= result["max_singular_value"] * (1 + RELATIVE_TOL), (label, oracle_norms)
    plain = results["ConvTranspose2d"]["norms"]
    assert max(plain) > 1.2  # the control had something to do
