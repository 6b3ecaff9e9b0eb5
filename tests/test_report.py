"""Model reports: hooks find input sizes, values match the bound functions and the oracle."""

import json

import pytest
import torch
from torch import nn

from oracle import circular_singular_values, layer_operator, operator_matrix
from ttconv import SVDConv
from ttconv.report import find_conv_layers, spectral_report, state_dict_report


class Net(nn.Module):
    """A small CNN with a nested block, a stride-2 SVDConv and a reflect-padded conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.ModuleDict({"down": SVDConv(8, 12, 3, stride=2, padding=1, rank=4),
                                    "mix": nn.Conv2d(12, 12, 3, padding=1, padding_mode="reflect")})
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.block["mix"](self.block["down"](x)))
        return self.head(x.mean((2, 3)))


def test_report_rows_sizes_and_values():
    net = Net().double()
    report = spectral_report(net, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    rows = report.to_dicts()
    assert [r["name"] for r in rows] == ["stem", "block.down", "block.mix"]
    assert [r["input_size"] for r in rows] == [(8, 8), (8, 8), (4, 4)]
    assert [r["kind"] for r in rows] == ["Conv2d", "SVDConv", "Conv2d"]
    assert rows[1]["stride"] == (2, 2) and rows[1]["shape"] == (12, 8, 3, 3)
    for (name, module), row in zip(find_conv_layers(net), rows):
        weight = module.dense_weight() if isinstance(module, SVDConv) else module.weight
        exact = float(circular_singular_values(weight.detach(), row["input_size"], module.stride, module.dilation)[0])
        real = float(torch.linalg.svdvals(operator_matrix(layer_operator(module), (weight.shape[1], *row["input_size"])))[0])
        assert abs(row["exact"] - exact) < 1e-8
        assert row["gram"] >= exact * (1 - 1e-12) and row["fantastic_four"] >= exact * (1 - 1e-12)
        assert row["power_estimate"] <= real * (1 + 1e-10) <= row["upper_bound"] * (1 + 1e-10)
        assert row["seconds"] > 0
    assert report.lipschitz_upper_bound == pytest.approx(
        rows[0]["upper_bound"] * rows[1]["upper_bound"] * rows[2]["upper_bound"])


def test_report_does_not_change_training_mode_or_batchnorm_stats():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    net.train()
    before = net[1].running_mean.clone()
    spectral_report(net, torch.randn(4, 3, 8, 8))
    assert net.training and torch.equal(net[1].running_mean, before)


def test_report_formats():
    report = spectral_report(Net(), torch.randn(1, 3, 8, 8))
    table = str(report)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["layer", "type", "shape"]
    assert len({len(line) for line in lines[:5]}) == 1  # aligned
    assert "plain sequential chain" in table
    payload = json.loads(report.to_json())
    assert len(payload["layers"]) == 3 and payload["lipschitz_upper_bound_sequential"] > 0
    csv_lines = report.to_csv().strip().splitlines()
    assert csv_lines[0].startswith("name,kind,shape") and len(csv_lines) == 4
    assert repr(report) == table


def test_report_without_input_gives_size_independent_bounds():
    report = spectral_report(Net())
    for row in report.to_dicts():
        assert row["exact"] is None and row["input_size"] is None
        assert row["upper_bound"] <= row["fantastic_four"]
    assert "size-independent" in str(report)


def test_strided_layer_with_indivisible_size_is_reported_with_a_note():
    net = nn.Sequential(nn.Conv2d(2, 2, 3, stride=2, padding=1))
    row = spectral_report(net, torch.randn(1, 2, 7, 7)).layers[0]
    assert row.exact is None and "not divisible by stride" in row.note
    assert row.upper_bound > 0 and row.power_estimate <= row.upper_bound


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    report = spectral_report(Net(), torch.randn(1, 3, 8, 8))
    path = tmp_path / "spectra.png"
    report.plot(str(path))
    assert path.stat().st_size > 0


def test_empty_model_and_bad_inputs():
    report = spectral_report(nn.Sequential(nn.Linear(3, 3)), torch.randn(1, 3))
    assert len(report) == 0 and "no nn.Conv2d or SVDConv layers" in str(report)
    assert report.lipschitz_upper_bound is None
    with pytest.raises(ValueError, match="example_input could not be run"):
        spectral_report(Net(), torch.randn(1, 5, 8, 8))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        spectral_report("resnet", torch.randn(1, 3, 8, 8))
    bad = Net()
    with torch.no_grad():
        bad.stem.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        spectral_report(bad)


def test_looks_through_data_parallel_wrappers():
    wrapped = nn.DataParallel(Net())
    assert [name for name, _ in find_conv_layers(wrapped)] == ["stem", "block.down", "block.mix"]


def test_state_dict_report_bounds_the_real_layers():
    net = Net().double()
    report = state_dict_report(net.state_dict(), (8, 8))
    rows = {r["name"]: r for r in report.to_dicts()}
    assert set(rows) == {"stem", "block.down", "block.mix"}
    assert rows["block.down"]["kind"] == "SVDConv" and rows["block.down"]["shape"] == (12, 8, 3, 3)
    for name, module in find_conv_layers(net):
        size = (8, 8) if name != "block.mix" else (4, 4)
        x_shape = (module.in_channels, *size)
        real = float(torch.linalg.svdvals(operator_matrix(layer_operator(module), x_shape))[0])
        if module.padding_mode == "zeros":
            # Stride 1 and padding up to k-1 cover the real zero-padded layer at the same size.
            at_size = state_dict_report({"w": (module.dense_weight() if isinstance(module, SVDConv) else module.weight)}, size)
            assert at_size.layers[0].upper_bound >= real * (1 - 1e-12)
        assert rows[name]["fantastic_four"] >= 0
    assert len(state_dict_report({"bn.weight": torch.ones(3)})) == 0


def test_svdconv_rows_carry_the_full_spectrum_with_zeros():
    layer = SVDConv(4, 6, 3, padding=1, rank=2)
    row = spectral_report(nn.Sequential(layer), torch.randn(1, 4, 6, 6)).layers[0]
    assert len(row.singular_values) == 4 * 36 and row.singular_values[-1] == 0.0
    assert torch.allclose(torch.tensor(row.singular_values), layer.singular_values(6).detach(), atol=1e-6)


def test_state_dict_report_skips_orthogonal_layers_with_a_message():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), SVDConv(4, 4, 3, core="orthogonal", max_singular_value=1.0))
    report = state_dict_report(net.state_dict())
    assert [row.name for row in report.layers] == ["0"]
    assert "skipped orthogonal-core SVDConv layers" in report.message and ": 1" in report.message
