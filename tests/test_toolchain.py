"""The rest of the PyTorch toolchain: compile, FX, export, ONNX, autocast, dtypes, pickling, versions."""

import copy
import io
import os

import pytest
import torch
from torch import nn

import ttconv
from ttconv import SVDConv
from ttconv.activations import ChannelPad, MaxMin

DATA = os.path.join(os.path.dirname(__file__), "data")


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        SVDConv(3, 8, 3, padding=1, rank=2), nn.ReLU(),
        SVDConv(8, 8, 3, padding=1, path="factored"), MaxMin(),
        SVDConv(8, 8, 3, stride=2, padding=1, core_kind="orthogonal", max_singular_value=1.0),
        SVDConv(8, 8, 3, padding=1, padding_mode="circular", core_kind="orthogonal", path="separable"),
        SVDConv(8, 8, (3, 2), padding=1, padding_mode="reflect", groups=2, path="dense"), ChannelPad(10),
        nn.Flatten(), nn.LazyLinear(4),
    )


def _outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("train", [True, False])
def test_compile_eager_backend_fullgraph_matches_eager(train):
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    model(x)  # materialise the lazy head
    model.train(train)
    expected = _outputs_and_grads(model, x)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    got = _outputs_and_grads(compiled, x)
    assert torch.allclose(got[0], expected[0], atol=1e-6)
    for a, b in zip(got[1], expected[1]):
        assert torch.allclose(a, b, atol=1e-5)


def test_no_graph_breaks():
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compile_inductor_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(SVDConv(3, 8, 3, padding=1, rank=2), nn.ReLU(), SVDConv(8, 4, 3, stride=2, padding=1))
    x = torch.randn(2, 3, 8, 8)
    expected = _outputs_and_grads(model, x)
    got = _outputs_and_grads(torch.compile(model, fullgraph=True), x)
    assert torch.allclose(got[0], expected[0], atol=1e-5)
    for a, b in zip(got[1], expected[1]):
        assert torch.allclose(a, b, atol=1e-4)


def test_fx_symbolic_trace():
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(x), model(x), atol=1e-6)


def test_export_of_a_converted_model_and_compiling_after_conversion():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    converted = ttconv.convert(dense, rank=4)
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(converted, (x,))
    assert torch.allclose(exported.module()(x), converted(x), atol=1e-6)
    compiled = torch.compile(converted, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), converted(x), atol=1e-6)


def test_onnx_export_of_the_densified_model(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = ttconv.densify(_cnn()[:6]).eval()
    x = torch.randn(1, 3, 8, 8)
    torch.onnx.export(model, (x,), str(tmp_path / "model.onnx"))
    assert (tmp_path / "model.onnx").stat().st_size > 0


def test_bfloat16_autocast_forward_matches_float32(device):
    model = _cnn()
    x = torch.randn(4, 3, 8, 8)
    reference = model(x)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    # bfloat16 has an 8-bit mantissa: 3% relative error through five layers.
    assert float((out.float() - reference).norm() / reference.norm()) < 3e-2


def test_spectra_bounds_and_control_ignore_autocast(device):
    layer = SVDConv(8, 8, 3, padding=1, rank=4)
    exact = layer.singular_values(8)
    bounds = [ttconv.bounds.fantastic_four_bound(layer), ttconv.bounds.gram_iteration_bound(layer, 8)]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        inside = layer.singular_values(8)
        inside_bounds = [ttconv.bounds.fantastic_four_bound(layer), ttconv.bounds.gram_iteration_bound(layer, 8)]
        reached = ttconv.scale_to_spectral_norm_(copy.deepcopy(layer), 0.5, 8)
    assert inside.dtype == torch.float32 and torch.allclose(inside, exact, atol=1e-6)
    for a, b in zip(inside_bounds, bounds):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-6)
    assert abs(reached - 0.5) < 1e-6


def test_dtype_conversions_half_and_channels_last():
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    double = copy.deepcopy(model).to(torch.float64)
    assert torch.allclose(double(x.double()).float(), reference, atol=1e-5)
    assert double[0].singular_values(8).dtype == torch.float64
    half = copy.deepcopy(model)[:4].half()
    out = half(x.half())
    assert out.dtype == torch.float16
    assert float((out.float() - model[:4](x)).norm() / model[:4](x).norm()) < 1e-2
    assert half[0].singular_values(8).dtype == torch.float32  # spectra never in half
    assert torch.allclose(model(x.to(memory_format=torch.channels_last)), reference, atol=1e-5)


def test_deepcopy_and_whole_model_save_load(tmp_path):
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    assert torch.equal(copy.deepcopy(model)(x), reference)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded(x), reference)


def test_checkpoint_of_format_version_1_still_loads(device):
    import sys

    sys.path.insert(0, DATA)
    from make_checkpoint import reference_model

    saved = torch.load(os.path.join(DATA, "svdconv_v1.pt"), weights_only=True, map_location=device)
    model = reference_model()
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        assert torch.allclose(model(saved["input"]), saved["output"], atol=1e-6)
    assert saved["state_dict"]._metadata["0"]["version"] == 1


def test_newer_checkpoint_version_is_refused_with_advice():
    state = SVDConv(2, 2, 3).state_dict()
    state._metadata[""]["version"] = 99
    with pytest.raises(RuntimeError, match="upgrade ttconv"):
        SVDConv(2, 2, 3).load_state_dict(state)


def test_state_dict_loads_with_weights_only():
    model = _cnn()
    model(torch.randn(1, 3, 8, 8))  # materialise the lazy head
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    assert len(torch.load(buffer, weights_only=True)) > 0
