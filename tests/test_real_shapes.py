"""End to end on the real-model shapes of benchmarks/real_shapes.py (issue 14's models).

MobileNet-v3-Small, the PP-OCR-like classifier (7 convs see maps smaller than their kernel),
detector (ConvTranspose2d head, FPN) and recogniser (Linear head), MTCNN: what a user runs on
them (report, control, convert) must cover every layer, agree with an independent oracle,
and not grow the model. Random seeded weights: coverage and exactness depend on shapes.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

import ttconv
from circular_oracle import circular_conv_any_size
from oracle import operator_matrix

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "real_shapes.py")
_spec = importlib.util.spec_from_file_location("real_shapes", _PATH)
real_shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_shapes)


def _input_sizes(model, x):
    sizes, hooks = {}, []

    def record(module, inputs, output, name):
        sizes.setdefault(name, tuple(inputs[0].shape[2:]))  # returns None: the output is kept

    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: record(m, i, o, name)))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return sizes


def _oracle_norm(conv: nn.Conv2d, size) -> float:
    """Largest singular value of the circular conv on ``size`` (tiled: any size, also below the
    kernel), group by group (the operator is block-diagonal over groups)."""
    weight = conv.weight.detach().double()
    stride = tuple(conv.stride) if all(n % s == 0 for n, s in zip(size, conv.stride)) else (1, 1)
    per_group = conv.out_channels // conv.groups
    norms = []
    for g in range(conv.groups):
        block = weight[g * per_group:(g + 1) * per_group]
        matrix = operator_matrix(circular_conv_any_size(block, stride, conv.dilation, 1), (block.shape[1], *size))
        norms.append(float(torch.linalg.matrix_norm(matrix, ord=2)))
    return max(norms)


def test_ocr_classifier_report_has_an_exact_value_for_every_conv_including_maps_below_the_kernel():
    model, x = real_shapes.build("ocr_cls")
    sizes = _input_sizes(model, x)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    below = [name for name, m in convs.items() if any(n < k for n, k in zip(sizes[name], m.kernel_size))]
    assert len(below) == 7  # the shapes the issue measured: 7 of the classifier's convs
    report = ttconv.spectral_report(model, x, progress=False)
    rows = {row.name: row for row in report.layers}
    assert set(convs) <= set(rows)
    for name in below:  # the folded circular operator, independently
        conv, size = convs[name], sizes[name]
        if all(n % s == 0 for n, s in zip(size, conv.stride)):
            assert rows[name].exact == pytest.approx(_oracle_norm(conv, size), rel=1e-4), name
        else:  # stride 2 on 3 rows: no strided circular operator; control uses the stride-1 one, a bound
            assert rows[name].exact is None and "not divisible" in rows[name].note
            with pytest.raises(ValueError, match="not divisible"):
                ttconv.spectral_norm(conv, size)
            controlled = ttconv.scale_to_spectral_norm_(conv, 1e30, size)  # within target: returns the norm
            assert controlled == pytest.approx(_oracle_norm(conv, size), rel=1e-4)
        assert rows[name].upper_bound is not None
    divisible = [name for name, m in convs.items() if all(n % s == 0 for n, s in zip(sizes[name], m.stride))]
    assert len(divisible) == len(convs) - 1
    assert all(rows[name].exact is not None for name in divisible)
    # Control covers the same layers at the same sizes as the report.
    control = ttconv.SpectralControl(model, 1.0, example_input=x)
    assert {name for name, _, _ in control.layers} == set(convs)
    assert {name: tuple(size) for name, _, size in control.layers} == {name: sizes[name] for name in convs}
    # The model is non-sequential (SE gates, residuals, hardswish): no product is claimed as a bound.
    assert report.lipschitz_bound is None and report.chain_note


def test_mobilenet_v3_at_full_rank_keeps_depthwise_convs_dense_and_stays_exact():
    model, x = real_shapes.build("mobilenet_v3_small")
    depthwise = {name for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1}
    assert len(depthwise) == 11
    converted, report = ttconv.convert(model, return_report=True, example_input=x)
    assert {kept.name for kept in report.kept_dense} >= depthwise
    for name in depthwise:
        assert type(converted.get_submodule(name)) is nn.Conv2d
    with torch.no_grad():
        reference, output = model(x).double(), converted(x).double()
    error = float((output - reference).norm() / reference.norm())
    assert error < 1e-5 and report.output_error == pytest.approx(error, rel=1e-3, abs=1e-9)
    # Every depthwise conv kept dense: the converted model carries exactly the TT growth of the
    # other convs, none from the depthwise ones.
    grown = sum(p.numel() for p in converted.parameters()) - sum(p.numel() for p in model.parameters())
    tt_growth = sum(layer.params_after - layer.params_before for layer in report.layers)
    assert grown == tt_growth


def test_detector_report_covers_its_transposed_head_and_labels_the_product():
    model, _ = real_shapes.build("ocr_det")
    x = torch.randn(1, 3, 64, 64)  # the shapes of the real 640x640 run, at a test-sized input
    report = ttconv.spectral_report(model, x, progress=False)
    kinds = [row.kind for row in report.layers]
    assert kinds.count("ConvTranspose2d") == 2
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert kinds.count("Conv2d") == convs
    assert report.lipschitz_bound is None and "NOT A LIPSCHITZ BOUND" in report.table()


def test_mtcnn_rnet_report_includes_its_linear_layers_exactly():
    model, x = real_shapes.build("mtcnn_rnet")
    report = ttconv.spectral_report(model, x, progress=False)
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    rows = {row.name: row for row in report.layers}
    for name, module in linear.items():
        expected = float(torch.linalg.matrix_norm(module.weight.detach().double(), ord=2))
        assert rows[name].exact == pytest.approx(expected, rel=1e-6)
