"""Issue 12, item 5: ``spectral_report`` / ``state_dict_report`` / ``ttconv check`` on every conv kind.

Each of the 12 conv kinds (``nn.Conv{1,2,3}d``, ``nn.ConvTranspose{1,2,3}d``, ``SVDConv{1,2,3}d``,
``SVDConvTranspose{1,2,3}d``) in a small float64 model; every column of its row is checked
against explicit float64 operators, independent of ttconv's spectral code:

* 'exact circ' against the dense circular operator (``tests/circular_oracle.py``: the input
  tiled, a valid torch conv, the matrix from basis inputs) on the recorded size (for a
  transposed layer on ``n`` inputs: its weight as a strided conv kernel on ``s n``, whose
  adjoint is the circular transposed conv);
* 'upper own' >= the norm of the layer's own operator (the torch / SVD layer applied to
  basis inputs) and within a stated factor of it; 'power own' <= it and close to it;
* 'FF min' >= it, and equal to an independent recomputation of the ``2^d`` reshape bounds;
* 'Gram circ' >= 'exact circ' and within the Gram iteration's proven slack.
"""

import io
import itertools
import json
import math

import pytest
import torch
from torch import nn

import ttconv
import ttconv.evaluate
from circular_oracle import circular_singular_values_any_size
from oracle import operator_matrix, svdvals_cpu
from ttconv.cli import main
from ttconv.layer import SVDConv1d, SVDConv2d, SVDConv3d, SVDConvTranspose1d, SVDConvTranspose2d, SVDConvTranspose3d
from ttconv.report import _spectrum_length, _transfer_bytes, spectral_report, state_dict_report

REL = 1e-10  # float64 throughout
D = torch.float64


def _top(matrix):
    return float(svdvals_cpu(matrix)[0])


def _linear_part(layer):
    """The layer's own linear operator (bias removed), padding and output_padding included."""
    return lambda x: layer(x) - layer(torch.zeros_like(x[:1]))


def _ff_oracle(kernel, groups):
    """max over groups of the min over the 2^d reshapes (rows: c_out and the taps of a subset
    of axes) of sqrt(prod k) ||M_A||_2 (the operator is block diagonal over groups): written
    out from the definition."""
    k = kernel.detach().to(D)
    d = k.dim() - 2
    g = k.reshape(groups, k.shape[0] // groups, *k.shape[1:])  # (g, o, i, *k)
    taps = math.prod(k.shape[2:])
    values = []
    for size in range(d + 1):
        for rows in itertools.combinations(range(d), size):
            cols = [a for a in range(d) if a not in rows]
            order = [0, 1, *[3 + a for a in rows], 2, *[3 + a for a in cols]]
            m = g.permute(order).reshape(groups, g.shape[1] * math.prod(k.shape[2 + a] for a in rows), -1)
            values.append(math.sqrt(taps) * svdvals_cpu(m)[..., 0])
    assert len(values) == 2 ** d
    return float(torch.stack(values).amin(0).amax())  # each group's best reshape, the worst group


# kind, constructor, spatial input size; SVD layers at a rank below full.
CASES = {
    "Conv1d": (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=2, dtype=D), (12,)),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=(2, 1), padding=1, dilation=(1, 2), dtype=D), (6, 8)),
    "Conv3d": (lambda: nn.Conv3d(2, 4, 3, stride=2, padding=1, groups=2, dtype=D), (4, 4, 6)),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1, dtype=D), (6,)),  # 2n - 1 out
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2,
                                                   dtype=D), (3, 4)),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(2, 3, (2, 3, 3), stride=(2, 1, 1), padding=(0, 1, 1), dtype=D),
                        (2, 3, 3)),
    "SVDConv1d": (lambda: SVDConv1d(4, 6, 3, padding=1, padding_mode="circular", rank=2, dtype=D), (10,)),
    "SVDConv2d": (lambda: SVDConv2d(4, 4, 3, stride=2, padding=1, rank=2, dtype=D), (6, 6)),
    "SVDConv3d": (lambda: SVDConv3d(2, 4, 3, padding=(1, 2, 1), dilation=(1, 2, 1), rank=2, dtype=D), (4, 6, 5)),
    "SVDConvTranspose1d": (lambda: SVDConvTranspose1d(4, 3, 4, stride=2, padding=1, rank=2, dtype=D), (5,)),
    "SVDConvTranspose2d": (lambda: SVDConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, rank=2,
                                                      dtype=D), (3, 4)),
    "SVDConvTranspose3d": (lambda: SVDConvTranspose3d(2, 4, 3, stride=2, padding=1, output_padding=1, rank=2,
                                                      dtype=D), (2, 2, 2)),
}


def _dense_kernel(layer):
    """The kernel of the conv whose singular values the layer has (a transposed layer's weight)."""
    return (layer.dense_weight() if hasattr(layer, "dense_weight") else layer.weight).detach().to(D)


def _make(kind, seed):
    torch.manual_seed(seed)
    make, n = CASES[kind]
    layer = make()
    with torch.no_grad():  # SVD layers start with small S; give them some spread
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer, n


@pytest.mark.parametrize("kind", list(CASES))
def test_every_conv_kind_is_certified_against_explicit_operators(kind):
    layer, n = _make(kind, sorted(CASES).index(kind))
    c_in = layer.in_channels
    x = torch.zeros(1, c_in, *n, dtype=D)
    report = spectral_report(nn.Sequential(layer), x, power_iters=200)
    assert not report.skipped and len(report.layers) == 1
    row = report.layers[0]
    transposed = "Transpose" in kind
    kernel = _dense_kernel(layer)
    out_grid = tuple(layer(x).shape[2:])
    assert row.kind == type(layer).__name__ and row.shape == tuple(kernel.shape)
    circ_grid = tuple(a * b for a, b in zip(n, layer.stride)) if transposed else n
    assert row.input_size == circ_grid and row.stride == tuple(layer.stride)
    if kind == "ConvTranspose1d":  # output 2n - 1 is not divisible by the stride; s n always is
        assert out_grid == (2 * n[0] - 1,)
    # The layer's own operator, from the layer itself.
    truth = _top(operator_matrix(_linear_part(layer), (c_in, *n)))
    assert truth > 0
    assert row.upper_bound >= truth * (1 - REL)
    # Looseness: 'upper own' (exact norm on the padded grid, or FF) measured 1.00-1.37x the
    # layer's norm on these sizes; a bound 1.5x looser than that fails.
    assert row.upper_bound <= 1.5 * truth, (row.upper_bound / truth)
    assert truth * 0.99 <= row.power_estimate <= truth * (1 + REL)
    assert row.fantastic_four >= truth * (1 - REL)
    assert row.fantastic_four == pytest.approx(_ff_oracle(kernel, layer.groups), rel=1e-9)
    # The circular operator on the recorded grid (a transposed layer: its weight as a conv kernel).
    circ = circular_singular_values_any_size(kernel, row.input_size, tuple(layer.stride), tuple(layer.dilation),
                                             layer.groups)
    assert row.exact == pytest.approx(float(circ[0]), rel=REL)
    count = circ.numel()
    assert row.exact * (1 - REL) <= row.gram <= row.exact * count ** (1 / 2 ** 6) * (1 + REL)
    assert row.memory_estimate and row.memory_estimate > 0 and row.note == ""


@pytest.mark.parametrize("kind", ["Conv1d", "Conv3d", "ConvTranspose2d", "SVDConv1d", "SVDConv3d",
                                  "SVDConvTranspose3d"])
def test_kept_spectra_are_the_full_dense_circular_spectra(kind):
    layer, n = _make(kind, 30 + sorted(CASES).index(kind))
    report = spectral_report(nn.Sequential(layer), torch.zeros(1, layer.in_channels, *n, dtype=D),
                             keep_spectra=True)
    row = report.layers[0]
    circ = circular_singular_values_any_size(_dense_kernel(layer), row.input_size, tuple(layer.stride),
                                             tuple(layer.dilation), layer.groups)
    # Zeros of the low rank included (an SVD layer's core has fewer singular values than its kernel).
    assert len(row.singular_values) == circ.numel()
    assert torch.allclose(torch.tensor(row.singular_values, dtype=D), circ, rtol=0, atol=1e-10 * float(circ[0]))
    assert row.exact == pytest.approx(float(circ[0]), rel=REL)


def test_orthogonal_core_spectrum_is_its_s_on_every_output_position():
    torch.manual_seed(3)
    layer = SVDConv2d(4, 4, 3, padding=1, padding_mode="circular", rank=4, core_kind="orthogonal", dtype=D)
    with torch.no_grad():
        layer.S.add_(torch.randn_like(layer.S))
    n = (4, 6)
    row = spectral_report(nn.Sequential(layer), torch.zeros(1, 4, *n, dtype=D), keep_spectra=True).layers[0]
    circ = circular_singular_values_any_size(layer.dense_weight().detach(), n, (1, 1), (1, 1))
    assert row.singular_values[0] == pytest.approx(float(layer.effective_S().detach().abs().max()), rel=REL)
    assert torch.allclose(torch.tensor(row.singular_values, dtype=D), circ, rtol=0, atol=1e-10 * float(circ[0]))
    truth = _top(operator_matrix(_linear_part(layer), (4, *n)))  # circular 'same' padding: the circular operator
    assert row.upper_bound == pytest.approx(truth, rel=1e-9) and row.exact == pytest.approx(truth, rel=1e-9)


@pytest.mark.parametrize("length", [1, 5])
def test_transposed_call_with_output_size_uses_the_output_padding_of_the_call(length):
    torch.manual_seed(4)
    layer = nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1, dtype=D)  # output_padding attribute 0
    with torch.no_grad():  # the middle tap small: the row output_padding adds carries most of the norm
        layer.weight[..., 1] *= 0.1

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = layer

        def forward(self, x):
            return self.up(x, output_size=[2 * x.shape[-1]])  # output_padding 1 for this call

    n, grid = (length,), (2 * length,)  # the call's output size, and s n
    report = spectral_report(Up(), torch.zeros(1, 3, *n, dtype=D), power_iters=200)
    row = report.layers[0]
    assert row.input_size == grid
    truth = _top(operator_matrix(lambda z: layer(z, output_size=list(grid)) - layer.bias[:, None].detach(),
                                 (3, *n)))
    assert truth * 0.99 <= row.power_estimate <= truth * (1 + REL) <= row.upper_bound * (1 + 2 * REL)
    circ = circular_singular_values_any_size(layer.weight.detach(), grid, (2,), (1,))
    assert row.exact == pytest.approx(float(circ[0]), rel=REL)


# ------------------------------------------------------------------ memory estimates
def test_transfer_bytes_and_spectrum_length_are_dimension_generic():
    # 1-D: c_out * c_in * s * (m // 2 + 1) complex entries; 3-D: prod(m[:-1]) * (m[-1] // 2 + 1).
    assert _transfer_bytes((4, 3, 5), (2,), (12,), 8) == 4 * 3 * 2 * (6 // 2 + 1) * 2 * 8
    assert _transfer_bytes((4, 2, 3, 3, 3), (2, 1, 1), (4, 6, 8), 4) == 4 * 2 * 2 * (2 * 6 * 5) * 2 * 4
    assert _transfer_bytes((4, 2, 1, 1, 1), (1, 1, 1), (4, 6, 8), 4) == 4 * 2 * 1 * 2 * 4  # one matrix
    assert _transfer_bytes((4, 2, 3), (1,), (12,), 4, (2,)) == 4 * 2 * 7 * 2 * 4  # dilation: 5 taps > 1
    assert _spectrum_length((4, 3, 5), (2,), 1, (12,)) == 6 * 4
    assert _spectrum_length((8, 2, 3, 3, 3), (2, 2, 2), 2, (4, 4, 4)) == 2 * 8 * min(4, 16)


def test_memory_budget_notes_apply_to_3d_layers():
    layer = nn.Conv3d(4, 4, 3, padding=1, dtype=D)
    n = (6, 6, 6)
    # The kept spectrum (4 * 216 values, ~55 kB with its Python list) is gated on the budget; the
    # Fantastic Four bound (~35 kB) fits, and the exact norm streams over frequencies within it.
    report = spectral_report(nn.Sequential(layer), torch.zeros(1, 4, *n, dtype=D), max_memory=40_000,
                             keep_spectra=True)
    row = report.layers[0]
    assert row.singular_values is None and "full spectrum (kept for the plot) not computed" in row.note
    circ = circular_singular_values_any_size(layer.weight, n, (1, 1, 1), (1, 1, 1))
    assert row.exact == pytest.approx(float(circ[0]), rel=REL)
    assert row.upper_bound >= _top(operator_matrix(_linear_part(layer), (4, *n))) * (1 - REL)
    # Below the Fantastic Four estimate the layer is listed as skipped, with its dense shape.
    report = spectral_report(nn.Sequential(layer), torch.zeros(1, 4, *n, dtype=D), max_memory=4000)
    assert not report.layers and report.skipped[0].shape == (4, 4, 3, 3, 3)
    assert "even the size-independent bounds" in report.skipped[0].reason


# ------------------------------------------------------------------ chains
def _eval_batch_norm(bn, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
    return bn.eval()


def test_conv1d_audio_chain_gets_a_verified_lipschitz_product():
    torch.manual_seed(5)
    bn = _eval_batch_norm(nn.BatchNorm1d(8, dtype=D), 6)
    model = nn.Sequential(
        nn.Conv1d(1, 8, 9, stride=2, padding=4, dtype=D), nn.ReLU(), nn.MaxPool1d(2), bn,
        nn.Conv1d(8, 8, 5, padding=2, dilation=1, dtype=D), nn.LeakyReLU(0.1), nn.AvgPool1d(2), nn.Dropout1d(0.2),
        SVDConv1d(8, 8, 3, padding=1, rank=4, dtype=D), nn.Tanh(),
        nn.Conv1d(8, 4, 3, padding=1, dtype=D), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3, dtype=D),
    ).eval()
    x = torch.randn(1, 1, 64, dtype=D)
    report = spectral_report(model, x)
    assert report.chain, report.chain_note
    assert [row.input_size for row in report.layers] == [(64,), None, (16,), (8,), (8,), None]
    bn_row = report.layers[1]
    gains = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    assert bn_row.kind == "BatchNorm1d" and bn_row.upper_bound == pytest.approx(float(gains.abs().max()), rel=REL)
    bound = report.lipschitz_bound
    assert bound == pytest.approx(math.prod(row.upper_bound for row in report.layers), rel=1e-12)
    assert "Lipschitz upper bound of the model" in str(report) and "NOT A" not in str(report)
    y = x + 1e-3 * torch.randn(256, 1, 64, dtype=D)
    with torch.no_grad():
        ratios = (model(y) - model(x)).flatten(1).norm(dim=1) / (y - x).flatten(1).norm(dim=1)
    assert float(ratios.max()) <= bound
    # Each conv factor is its own certified operator bound (checked above per kind): the product of
    # the true layer norms is at most the bound and not far below it.
    truths = []
    modules = dict(model.named_children())
    for row in report.layers:
        module = modules[row.name]
        if row.input_size is None:
            truths.append(row.upper_bound)
            continue
        c = module.in_channels
        truths.append(_top(operator_matrix(_linear_part(module), (c, *row.input_size))))
    assert math.prod(truths) <= bound * (1 + 1e-9) and bound <= 1.25 * math.prod(truths)  # measured 1.05x


@pytest.mark.parametrize("pool, verified", [
    (nn.MaxPool1d(3, stride=1), False),        # overlapping windows: not 1-Lipschitz in L2
    (nn.MaxPool3d(2), True),
    (nn.AvgPool3d(2, padding=1, count_include_pad=False), False),  # zero padding not in the divisor
    (nn.AvgPool3d(2, padding=1, count_include_pad=True), True),
    (nn.AdaptiveMaxPool3d((1, None, 1)), True),
    (nn.AdaptiveAvgPool1d(2), False),
    (nn.Dropout3d(0.5), True),
])
def test_1d_and_3d_pools_are_accepted_where_the_2d_ones_are(pool, verified):
    dims = int(type(pool).__name__[-2])
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    model = nn.Sequential(conv(2, 2, 3, padding=1, dtype=D), pool, conv(2, 2, 1, dtype=D))
    report = spectral_report(model, torch.randn(1, 2, *([4] * dims), dtype=D))
    assert report.chain is verified, report.chain_note
    if not verified:
        assert type(pool).__name__ in report.chain_note


class _Residual3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(2, 2, 3, padding=1, dtype=D)
        self.bn = _eval_batch_norm(nn.BatchNorm3d(2, dtype=D), 7)
        self.conv2 = SVDConv3d(2, 2, 3, padding=1, rank=2, dtype=D)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


def test_3d_residual_model_gets_the_loud_label():
    model = _Residual3d()
    report = spectral_report(model, torch.randn(1, 2, 4, 4, 4, dtype=D))
    assert [row.kind for row in report.layers] == ["Conv3d", "BatchNorm3d", "SVDConv3d"]
    assert [row.input_size for row in report.layers] == [(4, 4, 4), None, (4, 4, 4)]
    assert not report.chain and report.lipschitz_bound is None
    assert "NOT A LIPSCHITZ BOUND FOR THIS MODEL" in str(report)
    assert report.upper_bound_product == pytest.approx(math.prod(r.upper_bound for r in report.layers))


def test_without_an_example_input_3d_and_transposed_rows_are_size_independent():
    layer = nn.ConvTranspose3d(2, 2, 2, stride=2, dtype=D)
    report = spectral_report(nn.Sequential(nn.Conv3d(2, 2, 3, dtype=D), nn.ReLU(), layer))
    assert report.chain and all(row.input_size is None and row.exact is None for row in report.layers)
    truth = _top(operator_matrix(_linear_part(layer), (2, 3, 3, 3)))
    assert report.layers[1].upper_bound >= truth * (1 - REL)


# ------------------------------------------------------------------ checkpoints
def _full_conv_norm(kernel, n):
    """Norm of the stride-1 conv with zero padding k - 1 per side (the state dict's 'own')."""
    d = kernel.dim() - 2
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[d - 1]
    pad = tuple(k - 1 for k in kernel.shape[2:])
    return _top(operator_matrix(lambda x: conv(x, kernel.to(D), padding=pad), (kernel.shape[1], *n)))


@pytest.mark.parametrize("dims, n", [(1, (9,)), (3, (3, 4, 4))])
def test_state_dict_report_on_conv1d_and_conv3d_checkpoints(dims, n):
    torch.manual_seed(10 + dims)
    conv = (nn.Conv1d, nn.Conv3d)[dims // 3]
    svd = (SVDConv1d, SVDConv3d)[dims // 3]
    model = nn.Sequential(conv(2, 3, 3, padding=1, dtype=D), nn.ReLU(), conv(3, 3, 2, stride=2, dtype=D),
                          svd(3, 4, 3, padding=1, rank=2, dtype=D))
    model[2] = nn.utils.parametrizations.weight_norm(model[2])
    sd = {"model": model.state_dict(), "optimizer": {"state": {0: {"exp_avg": torch.randn(3, 2, *[3] * dims)}}}}
    report = state_dict_report(sd, n, in_channels=2, power_iters=200)
    assert [row.name for row in report.layers] == ["0", "2", "3"]
    assert [row.kind for row in report.layers] == [f"Conv{dims}d", f"Conv{dims}d", f"SVDConv{dims}d"]
    assert [s.key.rsplit(".", 1)[-1] for s in report.skipped] == ["exp_avg"]
    kernels = [model[0].weight, model[2].weight, model[3].dense_weight()]
    for row, kernel in zip(report.layers, kernels):
        kernel = kernel.detach().to(D)
        assert row.shape == tuple(kernel.shape) and row.input_size == n and row.stride == (1,) * dims
        circ = circular_singular_values_any_size(kernel, n, (1,) * dims, (1,) * dims)
        assert row.exact == pytest.approx(float(circ[0]), rel=1e-9)
        truth = _full_conv_norm(kernel, n)
        assert truth * (1 - REL) <= row.upper_bound <= 1.6 * truth
        assert truth * 0.99 <= row.power_estimate <= truth * (1 + REL)
        assert row.fantastic_four == pytest.approx(_ff_oracle(kernel, 1), rel=1e-9)
    assert f"every {dims}-D kernel is analysed at" in report.message
    assert "ConvTranspose weight cannot be told" in report.message


def test_state_dict_kernels_of_another_dimension_get_size_independent_bounds():
    sd = {"a.weight": torch.randn(2, 2, 3, dtype=D), "b.weight": torch.randn(2, 2, 3, 3, 3, dtype=D)}
    report = state_dict_report(sd, (6,))
    rows = {row.name: row for row in report.layers}
    assert rows["a"].input_size == (6,) and rows["a"].exact is not None
    assert rows["b"].input_size is None and rows["b"].exact is None and "3-D kernel" in rows["b"].note
    with pytest.raises(ValueError, match="input_size has 2 spatial axes"):
        state_dict_report(sd, (6, 6))
    with pytest.raises(ValueError, match="1, 2 or 3 positive ints"):
        state_dict_report(sd, (6, 6, 6, 6))


def test_a_transposed_weight_in_a_state_dict_bounds_the_transposed_layer():
    torch.manual_seed(12)
    layer = nn.ConvTranspose3d(3, 2, 3, stride=2, padding=1, output_padding=1, dtype=D)
    row = state_dict_report({"up.weight": layer.weight.detach()}).layers[0]
    assert row.kind == "Conv3d"
    for n in ((2, 2, 2), (3, 2, 3)):
        truth = _top(operator_matrix(_linear_part(layer), (3, *n)))
        assert row.upper_bound >= truth * (1 - REL) and row.fantastic_four >= truth * (1 - REL)


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_on_a_5d_kernel_checkpoint(tmp_path):
    torch.manual_seed(13)
    kernel = torch.randn(4, 2, 3, 3, 2)
    path = tmp_path / "video.pt"
    torch.save({"state_dict": {"stem.weight": kernel, "head.weight": torch.randn(3, 4)}}, path)
    code, out, _ = _cli("check", str(path), "--input-size", "2", "4", "4", "6", "--json")
    assert code == 0
    payload = json.loads(out)
    rows = {row["name"]: row for row in payload["layers"]}
    stem = rows["stem"]
    assert stem["kind"] == "Conv3d" and stem["input_size"] == [4, 4, 6] and stem["shape"] == [4, 2, 3, 3, 2]
    circ = circular_singular_values_any_size(kernel.to(D), (4, 4, 6), (1, 1, 1), (1, 1, 1))
    assert stem["exact"] == pytest.approx(float(circ[0]), rel=1e-5)  # float32 kernel
    truth = _full_conv_norm(kernel, (4, 4, 6))
    assert truth * (1 - 1e-5) <= stem["upper_bound"] <= 1.6 * truth
    assert rows["head"]["kind"] == "Linear" and not payload["skipped"]
    # The table, and a size of the wrong dimension refused in one line.
    code, out, _ = _cli("check", str(path), "--input-size", "2", "4", "4", "6")
    assert code == 0 and "Conv3d" in out and "4x4x6" in out
    code, _, err = _cli("check", str(path), "--input-size", "2", "8", "8")
    assert code == 2
    assert "input_size has 2 spatial axes" in err and "C D H W" in err and err.count("\n") == 1


@pytest.mark.parametrize("cls, rank", [(ttconv.SVDConv, 1), (ttconv.SVDConv, (1, 3)), (ttconv.SVDConv1d, (2, 2)),
                                       (ttconv.SVDConv3d, 1), (ttconv.SVDConvTranspose2d, (1, 2))])
def test_state_dict_report_skips_orthogonal_cores_by_their_configuration(cls, rank):
    """An orthogonal core's ``core`` holds BCOP generators, not a kernel; at rank 1 (or
    ``(1, r)``) its shape looks like a kernel's, so the layer's stored configuration decides.
    Its factors are listed as skipped, never analysed as a conv; a general layer of the same
    shapes is analysed."""
    torch.manual_seed(0)
    orthogonal = cls(4, 6, 3, rank=rank, core_kind="orthogonal")
    report = ttconv.state_dict_report({"conv." + k: v for k, v in orthogonal.state_dict().items()})
    assert report.layers == []
    assert [s.key for s in report.skipped] == ["conv.core"] and "orthogonal" in report.skipped[0].reason
    general = cls(4, 6, 3, rank=rank)
    report = ttconv.state_dict_report({"conv." + k: v for k, v in general.state_dict().items()})
    assert [row.name for row in report.layers] == ["conv"] and report.skipped == []


@pytest.mark.parametrize("kernel", [1, 3])
def test_factors_without_their_configuration_are_skipped_where_orthogonal_and_general_shapes_coincide(kernel):
    """Without ``_extra_state`` (format 1) an orthogonal core is told apart by its shape; at rank 1
    its generators ``(g, count, 1, 1)`` also fit a general core: read as one, a rank-1 grouped
    orthogonal layer with ``max |S| = 0.5`` got 'upper own' 0.285 (k=1), or a crash (k=3). Both
    are skipped now; a general layer whose shape cannot be an orthogonal core's is still
    analysed, against the oracle."""
    torch.manual_seed(0)
    layer = ttconv.SVDConv(4, 4, kernel, groups=4, core_kind="orthogonal", rank=1)
    with torch.no_grad():
        layer.set_singular_values_(torch.tensor([0.5, 0.25, 0.1, 0.05]))
    state = {"conv." + k: v for k, v in layer.state_dict().items() if k != "_extra_state"}
    report = ttconv.state_dict_report(state, (8, 8))
    assert report.layers == [] and [s.key for s in report.skipped] == ["conv.core"]
    assert "orthogonal-core SVDConv" in report.skipped[0].reason
    general = ttconv.SVDConv(4, 6, 3, rank=2).double()
    state = {"conv." + k: v for k, v in general.state_dict().items() if k != "_extra_state"}
    row = ttconv.state_dict_report(state, (8, 8)).layers[0]
    expected = float(circular_singular_values_any_size(general.dense_weight().detach(), (8, 8), (1, 1), (1, 1))[0])
    assert row.exact == pytest.approx(expected, rel=1e-9)
    broken = dict(state, **{"conv.core": torch.randn(2, 5, 3, 3, dtype=torch.float64)})  # r_in 2, the core says 5
    skipped = ttconv.state_dict_report(broken, (8, 8)).skipped
    assert [s.key for s in skipped] == ["conv.core"] and "shapes do not fit together" in skipped[0].reason


@pytest.mark.parametrize("cls, shape", [(ttconv.SVDConv1d, (1, 4, 16)), (ttconv.SVDConv3d, (1, 4, 6, 6, 6))])
def test_lipschitz_bound_of_n_d_orthogonal_layers_is_max_abs_s(cls, shape):
    torch.manual_seed(0)
    layer = cls(4, 4, 3, padding=1, core_kind="orthogonal")
    with torch.no_grad():
        layer.set_singular_values_(torch.linspace(0.5, 2.5, layer.S.numel()))
    model = torch.nn.Sequential(layer, torch.nn.ReLU()).eval()
    assert ttconv.evaluate.lipschitz_bound(model, torch.randn(shape)) == pytest.approx(2.5, rel=1e-6)


@pytest.mark.parametrize("kind", ["Conv2d", "Conv3d", "ConvTranspose2d", "SVDConv1d", "SVDConvTranspose3d",
                                  "reflect"])
def test_fantastic_four_is_computed_once_per_row_and_upper_own_is_operator_norm_bound(kind, monkeypatch):
    """The row's Fantastic Four (of the zero-padded conv whose singular values the layer has)
    is the only one computed: the operator bound does not compute it again (it is never
    below the bound's other candidates, ``operator_norm_bound``'s docstring). 'upper own'
    is exactly ``operator_norm_bound`` of the layer and at most the FF column times the
    padding factor at the recorded size."""
    import ttconv.bounds as bounds_module

    if kind == "reflect":  # a padding factor above 1, grouped and dilated
        torch.manual_seed(77)
        layer, n = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, padding_mode="reflect", dtype=D), (7, 7)
    else:
        layer, n = _make(kind, 70 + sorted(CASES).index(kind))
    computed = []
    original = bounds_module.fantastic_four_bound

    def spy(*args, **kwargs):
        computed.append(original(*args, **kwargs))
        return computed[-1]

    monkeypatch.setattr(bounds_module, "fantastic_four_bound", spy)
    row = spectral_report(nn.Sequential(layer), torch.zeros(1, layer.in_channels, *n, dtype=D)).layers[0]
    assert len(computed) == 1
    ff = _ff_oracle(_dense_kernel(layer), layer.groups)
    assert float(computed[0]) == pytest.approx(ff, rel=1e-9)
    with torch.no_grad():
        assert row.upper_bound == pytest.approx(float(bounds_module.operator_norm_bound(layer, n)), rel=1e-12)
    assert len(computed) == 1  # nor does the public bound
    factor = bounds_module.padding_factor(bounds_module.conv_spec(layer), n)  # 1 for a transposed layer
    assert row.upper_bound <= ff * factor * (1 + 1e-12)
