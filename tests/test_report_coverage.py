"""Issue 14: the report covers every layer with a spectral norm (Linear, ConvTranspose2d as
the adjoint conv, inputs smaller than the kernel), lists what it skips, prints the Lipschitz
product as a bound only for a verified plain chain, and shows progress; all values against
explicit float64 operator matrices (tests/oracle.py, tests/circular_oracle.py)."""

import io
import math

import pytest
import torch
from torch import nn

from circular_oracle import circular_singular_values_any_size
from oracle import circular_singular_values, layer_operator, operator_matrix, svdvals_cpu
from ttconv import SVDConv
from ttconv.cli import main
from ttconv.control import SpectralControl
from ttconv.layer import SVDConvTranspose2d
from ttconv.report import _transfer_bytes, spectral_report, state_dict_report

REL = 1e-10  # float64 throughout


def _top(matrix):
    return float(svdvals_cpu(matrix)[0])


# ------------------------------------------------------------------ ConvTranspose2d
TRANSPOSED = [  # in, out, kernel, stride, padding, output_padding, dilation, groups, input size
    (3, 4, 3, 1, 1, 0, 1, 1, (5, 6)),
    (4, 2, 4, 2, 1, 0, 1, 1, (4, 3)),
    (2, 3, 3, 2, 1, 1, 1, 1, (3, 4)),       # output_padding 1 < stride
    (4, 6, (3, 2), (2, 1), (1, 0), (1, 0), 1, 2, (3, 4)),
    (2, 2, 3, 1, 0, 1, 2, 1, (4, 4)),       # output_padding 1 >= stride 1 (allowed by dilation 2)
    (3, 3, 5, 3, 2, 2, 1, 3, (2, 2)),       # depthwise, output_padding 2 < stride 3
]


@pytest.mark.parametrize("index", range(len(TRANSPOSED)))
def test_transposed_conv_is_the_adjoint_of_the_conv_on_its_output_grid(index):
    c_in, c_out, k, s, p, op, d, g, n = TRANSPOSED[index]
    torch.manual_seed(index)
    layer = nn.ConvTranspose2d(c_in, c_out, k, s, p, op, groups=g, dilation=d, dtype=torch.float64)
    transposed = operator_matrix(layer_operator(layer), (c_in, *n))
    grid = tuple(layer(torch.zeros(1, c_in, *n, dtype=torch.float64)).shape[-2:])
    conv = nn.Conv2d(c_out, c_in, k, s, p, dilation=d, groups=g, bias=False, dtype=torch.float64)
    conv.weight.data.copy_(layer.weight.data)
    # The conv maps the output grid back to n + floor(output_padding / stride) pixels per axis; the
    # transposed conv is the adjoint of its first n (all of them when output_padding < stride).
    extra_rows = tuple(conv(torch.zeros(1, c_out, *grid, dtype=torch.float64)).shape[-2:]) != n
    forward = operator_matrix(lambda z: conv(z)[..., : n[0], : n[1]], (c_out, *grid))
    assert torch.allclose(forward, transposed.T, rtol=0, atol=1e-12)
    truth = _top(transposed)
    row = spectral_report(nn.Sequential(layer), torch.zeros(1, c_in, *n, dtype=torch.float64)).layers[0]
    stride = (s, s) if isinstance(s, int) else s
    # 'input' is s n: the circular transposed conv on n is the adjoint of the strided circular conv on s n.
    circ_grid = tuple(a * b for a, b in zip(n, stride))
    assert row.kind == "ConvTranspose2d" and row.input_size == circ_grid and row.shape == tuple(layer.weight.shape)
    assert row.upper_bound >= truth * (1 - REL) and row.fantastic_four >= truth * (1 - REL)
    # 'power own' runs on the transposed layer itself (its own output_padding), so it is a
    # lower estimate of its norm even when the conv on the output grid has extra rows.
    assert 0.9 * truth <= row.power_estimate <= truth * (1 + REL)
    if extra_rows:  # the adjoint conv on the grid is a strictly larger operator here
        assert _top(operator_matrix(lambda z: conv(z), (c_out, *grid))) > truth * (1 + 1e-6)
    circ = float(circular_singular_values_any_size(layer.weight, circ_grid, stride, (d, d), g)[0])
    assert row.exact == pytest.approx(circ, rel=REL) and row.gram >= circ * (1 - REL)


def test_svd_transposed_conv_is_reported_like_its_dense_layer():
    torch.manual_seed(8)
    layer = SVDConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, rank=2, dtype=torch.float64)
    x = torch.zeros(1, 4, 3, 4, dtype=torch.float64)
    row = spectral_report(nn.Sequential(layer), x).layers[0]
    truth = _top(operator_matrix(lambda z: layer(z) - layer(torch.zeros_like(z[:1])), (4, 3, 4)))
    assert row.kind == "SVDConvTranspose2d" and row.input_size == (6, 8) and row.shape == (4, 6, 3, 3)  # s n
    assert 0.9 * truth <= row.power_estimate <= truth * (1 + REL) <= row.upper_bound * (1 + REL)
    circ = float(circular_singular_values_any_size(layer.dense_weight().detach(), (6, 8), (2, 2), (1, 1))[0])
    assert row.exact == pytest.approx(circ, rel=REL)


# ------------------------------------------------------------------ BatchNorm
def test_batch_norm_rows_are_the_eval_mode_gain_and_a_conv_bn_relu_chain_is_verified():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1),
                          nn.BatchNorm2d(2, affine=False)).double()
    for bn in (model[1], model[4]):
        bn.running_var.uniform_(0.01, 2.0)
        if bn.affine:
            bn.weight.data.uniform_(-3.0, 3.0)
    model.train()  # the report runs in eval mode and restores the flag
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    report = spectral_report(model, x)
    assert model.training
    rows = {row.name: row for row in report.layers}
    model.eval()
    for name in ("1", "4"):
        bn = model[int(name)]
        truth = _top(operator_matrix(lambda z: bn(z) - bn(torch.zeros_like(z[:1])), (bn.num_features, 5, 5)))
        assert rows[name].kind == "BatchNorm2d" and rows[name].upper_bound == pytest.approx(truth, rel=REL)
        assert rows[name].exact == rows[name].upper_bound == rows[name].fantastic_four
    assert report.chain and report.lipschitz_bound == pytest.approx(math.prod(r.upper_bound for r in report.layers))
    y = x + 1e-3 * torch.randn(32, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        ratios = (model(y) - model(x)).flatten(1).norm(dim=1) / (y - x).flatten(1).norm(dim=1)
    assert float(ratios.max()) <= report.lipschitz_bound
    no_stats = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    report = spectral_report(no_stats, torch.randn(2, 2, 4, 4))
    assert [s.key for s in report.skipped] == ["1"] and "own statistics" in report.skipped[0].reason
    assert not report.chain


# ------------------------------------------------------------------ Linear
def test_linear_rows_are_the_exact_matrix_norm_at_any_input_shape():
    torch.manual_seed(0)
    linear = nn.Linear(7, 5, dtype=torch.float64)
    model = nn.Sequential(linear)
    x = torch.randn(2, 3, 7, dtype=torch.float64)  # applied to 3 rows per example
    row = spectral_report(model, x, keep_spectra=True).layers[0]
    truth = _top(operator_matrix(layer_operator_linear(linear), (3, 7)))
    assert row.kind == "Linear" and row.shape == (5, 7)
    for value in (row.exact, row.fantastic_four, row.upper_bound):
        assert value == pytest.approx(truth, rel=REL)
    assert row.gram is None and row.power_estimate is None
    assert row.singular_values == pytest.approx(torch.linalg.svdvals(linear.weight.detach()).tolist(), rel=REL)


def layer_operator_linear(linear):
    return lambda x: linear(x) - linear.bias.detach()


def test_state_dict_linear_weights_are_reported_and_embeddings_skipped():
    torch.manual_seed(1)
    w = torch.randn(6, 4, dtype=torch.float64)
    report = state_dict_report({"fc.weight": w, "fc.bias": torch.zeros(6), "embed.weight": torch.randn(10, 4)})
    assert [(r.name, r.kind) for r in report.layers] == [("fc", "Linear")]
    assert report.layers[0].exact == pytest.approx(_top(w), rel=REL)
    assert [s.key for s in report.skipped] == ["embed.weight"] and "embedding" in report.skipped[0].reason


# ------------------------------------------------------------------ skipped modules
class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        return self.gain * x


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(2, 2, 3, padding=1)
        self.conv3d = nn.Conv3d(1, 1, 3, padding=1)
        self.norm = nn.GroupNorm(1, 2)
        self.prelu = nn.PReLU()  # 1-Lipschitz activation: not listed
        self.embed = nn.Embedding(4, 3)
        self.scale = _Scale()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        x = self.scale(self.prelu(self.norm(self.conv(x))))
        x = self.conv1d(x.flatten(2)).reshape(x.shape)
        return self.head(x.mean((2, 3)))


def test_every_unanalysed_module_with_parameters_is_listed_with_a_reason():
    report = spectral_report(_Mixed(), torch.randn(1, 2, 4, 4))
    # conv3d is never called: analysed without a size (its row says so), conv1d at its (N, C, L) length.
    assert [r.name for r in report.layers] == ["conv1d", "conv3d", "conv", "head"]
    rows = {r.name: r for r in report.layers}
    assert rows["conv1d"].input_size == (16,) and rows["conv3d"].input_size is None
    assert "not called" in rows["conv3d"].note
    reasons = {s.key: s.reason for s in report.skipped}
    assert set(reasons) == {"norm", "embed", "scale"}
    assert "own statistics" in reasons["norm"] and "embedding" in reasons["embed"] and "gain" in reasons["scale"]
    assert "skipped 3 layer(s)" in str(report) and not report.chain


# ------------------------------------------------------------------ the Lipschitz product
def _chain_truth(model, x_shape):
    """Norm of the model with every ReLU removed (the linear chain the product bounds)."""
    linear = nn.Sequential(*[m for m in model if not isinstance(m, nn.ReLU)])
    return float(svdvals_cpu(operator_matrix(lambda x: linear(x) - linear(torch.zeros_like(x[:1])), x_shape))[0])


def test_a_plain_chain_is_verified_and_its_product_bounds_it():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 3, 1),
                          nn.LeakyReLU(0.1), nn.ConvTranspose2d(3, 2, 2, stride=2), nn.Flatten(),
                          nn.Linear(2 * 6 * 6, 4)).double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    for report in (spectral_report(model, x), spectral_report(model)):
        assert report.chain, report.chain_note
        assert report.lipschitz_bound == report.upper_bound_product
        assert "Lipschitz upper bound of the model" in str(report) and "NOT A" not in str(report)
    # Empirical check of the bound on the model itself (ReLU, max pool and flatten are 1-Lipschitz).
    bound = spectral_report(model, x).lipschitz_bound
    y = x + 1e-3 * torch.randn(64, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ratios = (model(y) - model(x)).flatten(1).norm(dim=1) / (y - x).flatten(1).norm(dim=1)
    assert float(ratios.max()) <= bound


class _Residual(nn.Module):
    def __init__(self, inplace=False):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.inplace = inplace

    def forward(self, x):
        y = self.conv(x)
        if self.inplace:
            y += x  # hidden in the same tensor object: caught by its version counter
        else:
            y = y + x
        return self.relu(y)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_residual_model_gets_no_unlabelled_product(inplace):
    torch.manual_seed(3)
    model = _Residual(inplace).double()
    with torch.no_grad():
        model.conv.weight.mul_(0.01)  # ||conv|| small, ||I + conv|| about 1: the product is far below the truth
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    report = spectral_report(model, x)
    truth = _top(operator_matrix(lambda z: model.conv(z) - model.conv.bias[:, None, None] + z, (2, 5, 5)))
    assert report.upper_bound_product < 0.5 * truth  # what a silent product would claim
    assert not report.chain and report.lipschitz_bound is None
    table = str(report)
    assert "NOT A LIPSCHITZ BOUND FOR THIS MODEL" in table and "Lipschitz upper bound of the model" not in table
    assert "'relu' does not receive the previous layer output unchanged" in report.chain_note
    assert spectral_report(model).chain is False  # no example input: not an nn.Sequential


@pytest.mark.parametrize("make_model, why", [  # factories: the model is built in the test, on its device
    (lambda: nn.Sequential(nn.Conv2d(2, 2, 3), nn.LayerNorm(4)), "LayerNorm '1' is not known to be 1-Lipschitz"),
    (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.PReLU(init=1.5)),
     "PReLU '1' is not 1-Lipschitz with these arguments"),
    (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.Upsample(scale_factor=2)), "Upsample '1' is not known"),
    (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.MaxPool2d(3, stride=2)), "not 1-Lipschitz with these arguments"),
    (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.GELU()), "GELU '1' is not known"),
], ids=["LayerNorm", "PReLU", "Upsample", "MaxPool2d", "GELU"])
def test_chains_through_maps_that_are_not_1_lipschitz_are_not_verified(make_model, why):
    report = spectral_report(make_model(), torch.randn(1, 2, 6, 6))
    assert not report.chain and why in report.chain_note


def test_a_layer_used_twice_is_not_a_verified_chain():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    assert "called 2 times" in spectral_report(model, torch.randn(1, 2, 4, 4)).chain_note
    assert "used twice" in spectral_report(model).chain_note


def test_state_dict_products_are_labelled_not_a_bound():
    report = state_dict_report(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)).state_dict())
    assert not report.chain and report.lipschitz_bound is None
    assert "NOT A LIPSCHITZ BOUND" in str(report)


# ------------------------------------------------------------------ n < k and 1x1: report and control agree
class _Small(nn.Module):
    """Layers whose feature map is smaller than the kernel (2x3 under 5x5, 1x1 under 3x3), and a 1x1."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 5, padding=2)
        self.b = SVDConv(4, 4, 5, padding=2, rank=3)
        self.c = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.d = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        x = self.b(torch.relu(self.a(x)))
        return self.d(self.c(x[..., :2, :2]))


def test_report_has_exact_values_below_the_kernel_size_equal_to_control_and_the_oracle():
    torch.manual_seed(4)
    model = _Small().double()
    x = torch.randn(1, 3, 2, 3, dtype=torch.float64)
    report = {row.name: row for row in spectral_report(model, x).layers}
    control = SpectralControl(model, 1e6, example_input=x)  # target far above: apply() only measures
    reached = control.apply()
    sizes = {"a": (2, 3), "b": (2, 3), "c": (2, 2), "d": (1, 1)}
    assert {name: size for name, _, size in control.layers} == sizes
    for name, layer in model.named_children():
        weight = layer.dense_weight() if isinstance(layer, SVDConv) else layer.weight
        oracle = float(circular_singular_values_any_size(weight.detach(), sizes[name], layer.stride, layer.dilation,
                                                         layer.groups)[0])
        row = report[name]
        assert row.input_size == sizes[name] and row.exact is not None, (name, row.note)
        assert row.exact == pytest.approx(oracle, rel=REL), name
        assert reached[name] == pytest.approx(oracle, rel=REL), name
        assert row.gram >= oracle * (1 - REL)
        assert row.note == ""


@pytest.mark.parametrize("stride", [1, 2])
def test_control_clip_below_the_kernel_size_is_exact_on_the_folded_operator(stride):
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 3, 5, stride=stride, padding=2, bias=False, dtype=torch.float64)
    n = (2, 4)
    before = circular_singular_values_any_size(conv.weight.detach(), n, (stride, stride), (1, 1))
    target = float(before[0]) * 0.6
    kernel = conv.weight.detach().clone()
    control = SpectralControl(nn.Sequential(conv), target, mode="clip", every=1,
                              example_input=torch.zeros(1, 3, *n, dtype=torch.float64))
    reached = control.apply()["0"]
    after = circular_singular_values_any_size(conv.weight.detach(), n, (stride, stride), (1, 1))
    # Every residue of the folded grid is reached by a tap: the clip is exact (no projection loss).
    assert torch.allclose(after, before.clamp(max=target), rtol=0, atol=1e-10 * float(before[0]))
    assert reached == pytest.approx(target, rel=1e-9)
    if stride == 1:  # the nearest such kernel: taps on the same residue mod n move alike
        delta = conv.weight.detach() - kernel
        for a in range(5):
            for b in range(5):
                assert torch.allclose(delta[..., a, b], delta[..., a % n[0], b % n[1]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("stride, groups", [(1, 1), (2, 1), (1, 3), ((2, 1), 3)])
def test_1x1_control_norm_and_clip_are_exact_against_the_oracle(stride, groups):
    torch.manual_seed(6)
    conv = nn.Conv2d(6, 9, 1, stride=stride, groups=groups, bias=False, dtype=torch.float64)
    n = (4, 6)
    s = conv.stride
    before = circular_singular_values(conv.weight.detach(), n, s, (1, 1), groups)
    target = float(before[0]) * 0.5
    control = SpectralControl(conv, target, mode="clip", example_input=torch.zeros(1, 6, *n, dtype=torch.float64))
    reached = control.apply()[""]
    after = circular_singular_values(conv.weight.detach(), n, s, (1, 1), groups)
    assert torch.allclose(after, before.clamp(max=target), rtol=0, atol=1e-12 * float(before[0]))
    assert reached == pytest.approx(target, rel=1e-12)


def test_1x1_memory_estimate_is_one_matrix_not_every_frequency():
    assert _transfer_bytes((512, 512, 1, 1), (1, 1), (128, 128), 4) == 512 * 512 * 2 * 4
    assert _transfer_bytes((512, 512, 1, 1), (2, 2), (128, 128), 4) == 512 * 512 * 4 * 2 * 4
    assert _transfer_bytes((8, 8, 3, 3), (1, 1), (1, 1), 4) == 8 * 8 * 2 * 4  # a 1-pixel grid: one tap
    assert _transfer_bytes((8, 8, 3, 3), (1, 1), (4, 4), 4) == 8 * 8 * 4 * 3 * 2 * 4
    conv = nn.Conv2d(256, 256, 1)
    row = spectral_report(nn.Sequential(conv), torch.zeros(1, 256, 64, 64), max_memory=24 * 2**20,
                          power_iters=1).layers[0]
    # LAPACK in float64 (cuSOLVER's float32 SVD of this 256 x 256 matrix is ~3e-5 off on an H100).
    assert row.exact == pytest.approx(float(svdvals_cpu(conv.weight[..., 0, 0])[0]), rel=1e-5)
    assert row.upper_bound == pytest.approx(row.exact, rel=1e-5)
    assert row.note.startswith("power own not computed")  # activations, the only thing that does not fit


# ------------------------------------------------------------------ progress
def test_report_progress_lines_and_silence(capsys):
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1))
    x = torch.randn(1, 2, 6, 6)
    spectral_report(model, x, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[1/2] 0  ") and lines[1].startswith("[2/2] 2  ")
    assert all(line.endswith(" s") for line in lines)
    for quiet in (False, None):  # None: on only when stderr is a terminal, and pytest's is not
        spectral_report(model, x, progress=quiet)
        state_dict_report(model.state_dict(), progress=quiet)
        assert capsys.readouterr().err == ""
    calls = []
    spectral_report(model, x, progress=lambda *a: calls.append(a))
    assert calls == [(1, 2, "0"), (2, 2, "2")]


def test_report_progress_defaults_to_on_for_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    spectral_report(nn.Sequential(nn.Conv2d(2, 2, 3)), torch.randn(1, 2, 5, 5))
    assert terminal.getvalue().startswith("[1/1] 0  ")


def test_control_progress_lines_and_default_silence(capsys):
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 1))
    x = torch.randn(1, 2, 6, 6)
    SpectralControl(model, 1e-3, every=1, example_input=x).step()
    assert capsys.readouterr().err == ""
    SpectralControl(model, 1e-3, every=1, example_input=x, progress=True).step()
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["[1/2]", "0"], ["[2/2]", "2"]]
    assert all(" s  " in line for line in lines)
    with pytest.raises(TypeError, match="progress must be a bool or a callable"):
        SpectralControl(model, 1.0, example_input=x, progress="yes")


def test_cli_prints_a_repeated_note_once(tmp_path):
    torch.manual_seed(7)
    path = tmp_path / "sd.pt"
    torch.save({f"c{i}.weight": torch.randn(8, 8, 3, 3) for i in range(3)}, path)
    out, err = io.StringIO(), io.StringIO()
    code = main(["check", str(path), "--input-size", "8", "16", "16", "--max-memory", "40KB"], out=out, err=err)
    assert code == 0
    text = out.getvalue()
    assert text.count("power own not computed") == 1
    assert "[1] (3 layers: c0, c1, c2) power own not computed" in text
    table = text[: text.index("columns:")]
    assert table.count("[1]") == 3
    assert [line.split()[0] for line in err.getvalue().splitlines()] == ["[1/3]", "[2/3]", "[3/3]"]


def _small_input_cases(count=40):
    """Random layers on inputs smaller than their dilated kernel (n divisible by the stride)."""
    generator = torch.Generator().manual_seed(10)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=generator))]
    cases = []
    while len(cases) < count:
        k, s, d, g = pick([2, 3, 5]), pick([1, 2]), pick([1, 2]), pick([1, 2])
        extent = d * (k - 1) + 1
        sizes = [n for n in range(1, extent) if n % s == 0]
        if not sizes:
            continue
        cases.append(dict(kind=pick(["conv", "svd"]), k=k, s=s, d=d, g=g, c_in=2 * g, c_out=pick([1, 2]) * g,
                          n=(pick(sizes), pick(sizes)), index=len(cases)))
    return cases


@pytest.mark.parametrize("case", _small_input_cases(), ids=lambda c: f"{c['index']}")
def test_control_guarantee_below_the_kernel_size_against_the_oracle(case):
    torch.manual_seed(case["index"])
    padding = (case["d"] * (case["k"] - 1) + 1) // 2  # enough for torch to accept any n >= 1
    geometry = dict(stride=case["s"], padding=padding, dilation=case["d"], groups=case["g"])
    if case["kind"] == "svd":
        layer = SVDConv(case["c_in"], case["c_out"], case["k"], rank=1, dtype=torch.float64, **geometry)
        weight = lambda: layer.dense_weight().detach()
    else:
        layer = nn.Conv2d(case["c_in"], case["c_out"], case["k"], bias=False, dtype=torch.float64, **geometry)
        weight = lambda: layer.weight.detach()
    n, stride, dilation = case["n"], (case["s"],) * 2, (case["d"],) * 2
    truth = lambda: float(circular_singular_values_any_size(weight(), n, stride, dilation, case["g"])[0])
    before = truth()
    row = spectral_report(nn.Sequential(layer), torch.zeros(1, case["c_in"], *n, dtype=torch.float64)).layers[0]
    assert row.exact == pytest.approx(before, rel=REL)
    target = 0.5 * before
    control = SpectralControl(nn.Sequential(layer), target, every=1, example_input=torch.zeros(1, case["c_in"], *n,
                                                                                              dtype=torch.float64))
    reached = control.apply()["0"]
    after = truth()
    assert after <= target * (1 + 1e-9) and reached == pytest.approx(after, rel=1e-9)


@pytest.mark.parametrize("case", [c for c in _small_input_cases() if c["d"] == 1 and c["s"] == 1],
                         ids=lambda c: f"{c['index']}")
def test_plain_clip_below_an_undilated_kernel_is_exact(case):
    # Every residue mod n holds a tap of an undilated kernel larger than n: the folded kernel
    # can take any value, so the clip reaches its target exactly (no projection loss).
    torch.manual_seed(case["index"])
    layer = nn.Conv2d(case["c_in"], case["c_out"], case["k"], padding=case["k"] // 2, groups=case["g"], bias=False,
                      dtype=torch.float64)
    n = case["n"]
    before = circular_singular_values_any_size(layer.weight.detach(), n, (1, 1), (1, 1), case["g"])
    target = 0.5 * float(before[0])
    SpectralControl(layer, target, mode="clip", example_input=torch.zeros(1, case["c_in"], *n,
                                                                          dtype=torch.float64)).apply()
    after = circular_singular_values_any_size(layer.weight.detach(), n, (1, 1), (1, 1), case["g"])
    assert torch.allclose(after, before.clamp(max=target), rtol=0, atol=1e-10 * float(before[0]))
