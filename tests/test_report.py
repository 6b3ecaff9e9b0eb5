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
    assert [r["name"] for r in rows] == ["stem", "block.down", "block.mix", "head"]
    assert [r["input_size"] for r in rows] == [(8, 8), (8, 8), (4, 4), None]
    assert [r["kind"] for r in rows] == ["Conv2d", "SVDConv", "Conv2d", "Linear"]
    head = float(torch.linalg.matrix_norm(net.head.weight.detach(), 2))
    assert rows[3]["exact"] == pytest.approx(head, rel=1e-12) == rows[3]["upper_bound"] == rows[3]["fantastic_four"]
    assert rows[1]["stride"] == (2, 2) and rows[1]["shape"] == (12, 8, 3, 3)
    for (_name, module), row in zip(find_conv_layers(net), rows):
        weight = module.dense_weight() if isinstance(module, SVDConv) else module.weight
        exact = float(circular_singular_values(weight.detach(), row["input_size"], module.stride, module.dilation)[0])
        real = float(torch.linalg.svdvals(operator_matrix(layer_operator(module), (weight.shape[1], *row["input_size"])))[0])
        assert abs(row["exact"] - exact) < 1e-8
        assert row["gram"] >= exact * (1 - 1e-12) and row["fantastic_four"] >= exact * (1 - 1e-12)
        assert row["power_estimate"] <= real * (1 + 1e-10) <= row["upper_bound"] * (1 + 1e-10)
        assert row["seconds"] > 0
    assert report.upper_bound_product == pytest.approx(
        rows[0]["upper_bound"] * rows[1]["upper_bound"] * rows[2]["upper_bound"] * rows[3]["upper_bound"])
    # torch.relu and the mean in forward are outside any module: not a verified chain.
    assert not report.chain and report.lipschitz_bound is None


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
    # Aligned: the rule's gaps are blank in every row, and each number column (right-aligned)
    # ends where its rule ends.
    rule = lines[1]
    assert set(rule) == {"-", " "}
    gaps = [i for i, c in enumerate(rule) if c == " "]
    for line in lines[:5]:
        assert all(i >= len(line) or line[i] == " " for i in gaps), line
    column_ends = [i for i in range(1, len(rule)) if rule[i - 1] == "-" and rule[i] == " "]
    for line in lines[2:5]:
        assert line[column_ends[2] - 1] != " " and line[column_ends[3] - 1] != " ", line  # shape, stride columns
    assert "NOT A LIPSCHITZ BOUND FOR THIS MODEL" in table
    payload = json.loads(report.to_json())
    assert len(payload["layers"]) == 4 and payload["upper_bound_product"] > 0
    assert payload["lipschitz_chain_verified"] is False and "previous layer" in payload["lipschitz_chain_note"]
    csv_lines = report.to_csv().strip().splitlines()
    assert csv_lines[0].startswith("name,kind,shape") and len(csv_lines) == 5
    assert repr(report) == table


def test_report_without_input_gives_size_independent_bounds():
    report = spectral_report(Net())
    for row in report.to_dicts()[:3]:
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
    report = spectral_report(Net(), torch.randn(1, 3, 8, 8), keep_spectra=True)
    path = tmp_path / "spectra.png"
    report.plot(str(path))
    assert path.stat().st_size > 0


def test_empty_model_and_bad_inputs():
    report = spectral_report(nn.Sequential(nn.ReLU(), nn.GroupNorm(1, 3)), torch.randn(1, 3, 5))
    assert len(report) == 0 and "no layer with a spectral norm" in str(report)
    assert report.upper_bound_product is None and [s.key for s in report.skipped] == ["1"]
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
    assert set(rows) == {"stem", "block.down", "block.mix", "head"}
    assert rows["block.down"]["kind"] == "SVDConv" and rows["block.down"]["shape"] == (12, 8, 3, 3)
    assert rows["head"]["kind"] == "Linear"
    assert rows["head"]["exact"] == pytest.approx(float(torch.linalg.matrix_norm(net.head.weight.detach(), 2)))
    assert not report.chain and "does not say how its layers connect" in str(report)
    for name, module in find_conv_layers(net):
        size = (8, 8) if name != "block.mix" else (4, 4)
        x_shape = (module.in_channels, *size)
        real = float(torch.linalg.svdvals(operator_matrix(layer_operator(module), x_shape))[0])
        if module.padding_mode == "zeros":
            # Stride 1 and padding up to k-1 cover the real zero-padded layer at the same size.
            at_size = state_dict_report({"w.weight": (module.dense_weight() if isinstance(module, SVDConv) else module.weight)}, size)
            assert at_size.layers[0].upper_bound >= real * (1 - 1e-12)
        assert rows[name]["fantastic_four"] >= 0
    assert len(state_dict_report({"bn.weight": torch.ones(3)})) == 0


def test_svdconv_rows_carry_the_full_spectrum_with_zeros():
    layer = SVDConv(4, 6, 3, padding=1, rank=2)
    row = spectral_report(nn.Sequential(layer), torch.randn(1, 4, 6, 6), keep_spectra=True).layers[0]
    assert len(row.singular_values) == 4 * 36 and row.singular_values[-1] == 0.0
    assert torch.allclose(torch.tensor(row.singular_values), layer.singular_values(6).detach(), atol=1e-6)


def test_state_dict_report_skips_orthogonal_layers_with_a_message():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), SVDConv(4, 4, 3, core_kind="orthogonal", max_singular_value=1.0))
    report = state_dict_report(net.state_dict())
    assert [row.name for row in report.layers] == ["0"]
    assert [(s.key, s.reason.split(":")[0]) for s in report.skipped] == [("1.core", "orthogonal-core SVDConv")]
    assert "orthogonal-core SVDConv" in str(report) and "1.core" in report.to_json()


# ------------------------------------------------------------- memory, spectra, JSON, legend
def test_full_spectra_are_kept_only_when_asked():
    net = Net().double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    lean, full = spectral_report(net, x), spectral_report(net, x, keep_spectra=True)
    assert all(row.singular_values is None for row in lean.layers)
    for (_name, module), a, b in zip(find_conv_layers(net), lean.layers, full.layers):
        weight = module.dense_weight() if isinstance(module, SVDConv) else module.weight
        oracle = circular_singular_values(weight.detach(), a.input_size, module.stride, module.dilation)
        assert a.exact == pytest.approx(float(oracle[0]), rel=1e-9) and b.exact == pytest.approx(a.exact, rel=1e-12)
        assert torch.allclose(torch.tensor(b.singular_values, dtype=torch.float64), oracle, atol=1e-9)
    with pytest.raises(ValueError, match="keep_spectra=True"):
        lean.plot("unused.png")


def test_max_memory_reaches_every_streaming_function(monkeypatch):
    import ttconv.bounds as bounds_module
    import ttconv.spectra as spectra_module

    seen = {}
    for module, name in ((spectra_module, "conv_spectral_norm"), (bounds_module, "gram_iteration_bound"),
                         (bounds_module, "operator_norm_bound")):
        original = getattr(module, name)

        def spy(*args, max_memory, _original=original, _name=name, **kwargs):
            seen[_name] = max_memory
            return _original(*args, max_memory=max_memory, **kwargs)

        monkeypatch.setattr(module, name, spy)
    spectral_report(nn.Sequential(nn.Conv2d(2, 2, 3)), torch.randn(1, 2, 6, 6), max_memory=123_456)
    assert seen == {"conv_spectral_norm": 123_456, "gram_iteration_bound": 123_456, "operator_norm_bound": 123_456}


def test_a_function_without_max_memory_is_gated_on_the_estimate(monkeypatch):
    import ttconv.spectra as spectra_module

    def materialising_norm(weight, input_size, **geometry):  # no max_memory keyword
        raise AssertionError("must not run over budget")

    monkeypatch.setattr(spectra_module, "conv_spectral_norm", materialising_norm)
    row = state_dict_report({"c.weight": torch.randn(8, 8, 3, 3)}, (64, 64), max_memory=200_000).layers[0]
    assert row.exact is None and "exact circ not computed: it needs about" in row.note
    assert "max_memory" in row.note and row.memory_estimate > 200_000


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_upper_bound_falls_back_when_the_operator_norm_does_not_fit(monkeypatch, padding_mode):
    import ttconv.bounds as bounds_module
    from ttconv.spectra import MemoryLimitError

    def too_big(*args, max_memory, **kwargs):
        raise MemoryLimitError("one frequency's 1 x 3 x 3 matrices need 9.0 GB, more than max_memory=1.0 KB")

    monkeypatch.setattr(bounds_module, "operator_norm_bound", too_big)
    conv = nn.Conv2d(3, 3, 3, padding=2, padding_mode=padding_mode).double()
    row = spectral_report(nn.Sequential(conv), torch.randn(1, 3, 6, 6, dtype=torch.float64)).layers[0]
    assert "upper own (exact norm on the padded grid) not computed: one frequency's" in row.note
    assert "falls back to size-independent bounds" in row.note
    real = float(torch.linalg.svdvals(operator_matrix(layer_operator(conv), (3, 6, 6)))[0])
    assert row.upper_bound >= real * (1 - 1e-12)


def test_strict_json_for_non_finite_values():
    report = spectral_report(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)))
    report.layers[0].fantastic_four = float("inf")
    report.layers[0].upper_bound = float("inf")
    report.layers[1].gram = float("nan")

    def reject(constant):
        raise ValueError(constant)

    payload = json.loads(report.to_json(), parse_constant=reject)
    first, second = payload["layers"]
    assert first["fantastic_four"] is None and first["upper_bound"] is None
    assert "fantastic_four, upper_bound are +inf, written as null" in first["note"]
    assert second["gram"] is None and "gram is NaN, written as null" in second["note"]
    assert payload["upper_bound_product"] is None
    assert "a per-layer bound is itself not finite" in payload["upper_bound_product_note"]
    assert json.loads(report.to_json(allow_nan=True), parse_constant=reject)  # allow_nan cannot be turned on


def test_zero_upper_bound_makes_the_product_zero_even_with_an_overflow():
    report = spectral_report(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)))
    report.layers[0].upper_bound, report.layers[1].upper_bound = 0.0, float("inf")
    assert report.upper_bound_product == 0.0


def test_columns_say_which_operator_they_describe():
    report = spectral_report(Net(), torch.randn(1, 3, 8, 8))
    table = str(report)
    header = table.splitlines()[0]
    for column in ("exact circ", "Gram circ", "power own", "upper own"):
        assert column in header
    assert "'circ' = circular convolution on the input size" in table
    assert "'own' = the layer's own operator with its own padding" in table
    assert "'upper own' may be below 'exact circ'" in table
    columns = json.loads(report.to_json())["columns"]
    assert "circular convolution" in columns["exact"] and "own padding" in columns["upper_bound"]


def test_iteration_counts_and_memory_must_be_positive():
    for kwargs in ({"gram_iters": 0}, {"power_iters": -1}, {"spatial_iters": 0}, {"max_memory": 0}):
        with pytest.raises(ValueError, match="must be a positive"):
            spectral_report(Net(), **kwargs)
        with pytest.raises(ValueError, match="must be a positive"):
            state_dict_report({"c.weight": torch.randn(2, 2, 3, 3)}, **kwargs)


def test_state_dict_in_channels_is_checked_against_the_first_kernel():
    sd = Net().state_dict()
    assert len(state_dict_report(sd, (8, 8), in_channels=3)) == 4  # three kernels and the Linear head
    with pytest.raises(ValueError, match=r"first kernel 'stem' \(shape 8x3x3x3\) takes 3 input channels"):
        state_dict_report(sd, (8, 8), in_channels=8)


def test_size_independent_upper_bound_is_the_smaller_of_ff_and_the_spatial_bound():
    from ttconv.bounds import fantastic_four_bound, spatial_gram_bound

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False, dtype=torch.float64)
    ff = float(fantastic_four_bound(conv.weight))
    spatial = float(spatial_gram_bound(conv.weight, n_iter=2))  # the report's default spatial_iters
    assert spatial < 0.9 * ff
    for report in (spectral_report(nn.Sequential(conv)), state_dict_report({"conv.weight": conv.weight})):
        assert report.layers[0].upper_bound == pytest.approx(spatial, rel=1e-12)


@pytest.mark.parametrize("run", ["report", "control", "histograms", "convert"])
def test_the_example_pass_restores_every_modules_own_training_flag(run):
    """A submodule frozen in eval mode inside a model in training mode stays frozen (one shared
    example pass, _hooks.run_example; ``model.train(was)`` would flip it back to training)."""
    import ttconv
    from ttconv import evaluate

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)).train()
    model[1].eval()
    x = torch.randn(1, 3, 8, 8)
    if run == "report":
        ttconv.spectral_report(model, x, progress=False)
    elif run == "control":
        ttconv.SpectralControl(model, 1.0, example_input=x)
    elif run == "histograms":
        evaluate.singular_value_histograms(model, x)
    else:
        ttconv.convert(model, example_input=x, inplace=True)
    assert model.training and model[0].training and not model[1].training and model[2].training
