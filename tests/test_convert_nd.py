"""convert / densify / load_converted on every conv kind (issue 12, item 2).

Three example models: a 1-D audio net (Conv1d with stride, dilation, groups, every
padding mode, a depthwise layer), a 3-D net (Conv3d with stride, BatchNorm3d and a
residual) and a conv-transpose generator (ConvTranspose2d with stride 2, output_padding and
groups, plus ConvTranspose1d and ConvTranspose3d heads). Every claim is checked against an
independent computation: outputs by running both models, truncation errors by a numpy
one-pass truncation of the dense kernels, parameter counts by building the layer, spectral
norm folding by writing ``W / (u^T W_mat v)`` out with torch's ``dim=1`` for ConvTranspose.
"""

from __future__ import annotations

import io
import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from oracle import deterministic_cudnn
from ttconv import (
    SVDConv,
    SVDConv1d,
    SVDConv2d,
    SVDConv3d,
    SVDConvTranspose1d,
    SVDConvTranspose2d,
    SVDConvTranspose3d,
    convert,
    densify,
    load_converted,
)
from ttconv.convert import SVD_CLASSES

TORCH_TO_SVD = {  # written out here, not read from SVD_CLASSES: the table is under test
    nn.Conv1d: SVDConv1d, nn.Conv2d: SVDConv2d, nn.Conv3d: SVDConv3d,
    nn.ConvTranspose1d: SVDConvTranspose1d, nn.ConvTranspose2d: SVDConvTranspose2d,
    nn.ConvTranspose3d: SVDConvTranspose3d,
}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


# ------------------------------------------------------------------ example models
class AudioNet(nn.Module):
    """A small 1-D net on a waveform: strided front end, dilated grouped convs, depthwise."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Conv1d(2, 12, 9, stride=4, padding=4, padding_mode="reflect")
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv1d(12, 16, 3, dilation=2, padding=2, groups=2, padding_mode="circular"),
            nn.ReLU(),
            nn.Conv1d(16, 16, 5, padding="same", padding_mode="replicate"),
            nn.ReLU(),
            nn.Conv1d(16, 16, 3, groups=16, padding=1, bias=False),  # depthwise: kept dense
            nn.Conv1d(16, 10, 1),
        )

    def forward(self, x):
        return self.body(self.front(x)).mean(-1)


class VolumeNet(nn.Module):
    """A small 3-D net: strided stem with BatchNorm3d, a residual block, a depthwise conv, a 1x1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(2, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU(),
                                   nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1), stride=1))
        self.depthwise = nn.Conv3d(8, 8, 3, padding=1, groups=8)  # kept dense
        self.head = nn.Conv3d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.depthwise(x))


class Generator(nn.Module):
    """A conv-transpose decoder from a latent map, with 1-D and 3-D transposed heads."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.Sequential(nn.ConvTranspose2d(16, 12, 4, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(12, 8, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.smooth = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=8)  # depthwise transposed: kept dense
        self.to_image = nn.Conv2d(8, 3, 3, padding=1)
        self.sequence = nn.ConvTranspose1d(16, 6, 5, stride=3, output_padding=1, dilation=2, bias=False)
        self.volume = nn.ConvTranspose3d(16, 4, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1),
                                         output_padding=(0, 1, 1), groups=2)

    def forward(self, z):
        image = torch.tanh(self.to_image(self.smooth(torch.relu(self.up2(self.up1(z))))))
        return image, self.sequence(z.flatten(2)), self.volume(z.unsqueeze(2))


def _randomize_batch_norm(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)


MODELS = {
    "audio": (AudioNet, (3, 2, 64)),
    "volume": (VolumeNet, (2, 2, 6, 8, 8)),
    "generator": (Generator, (2, 16, 2, 2)),
}


def _model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    cls, shape = MODELS[kind]
    model = cls().to(dtype)
    _randomize_batch_norm(model)
    return model.eval(), torch.randn(shape, dtype=dtype)


def _outputs(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


def _output_error(a, b) -> float:
    """||a - b|| / ||b|| over all outputs together, in float64."""
    diff = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    return math.sqrt(diff / sum(float(y.double().pow(2).sum()) for y in b))


def _convs(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if type(m) in TORCH_TO_SVD]


def _depthwise(conv: nn.Module) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _one_pass_error(weight: np.ndarray, groups: int, ranks) -> float:
    """Relative error of the one-pass TT truncation, written out in numpy: per group, project
    the second channel axis on the top ``r_2`` left singular vectors of its unfolding, then the
    first on the top ``r_1`` of the projected kernel's unfolding."""
    r_1, r_2 = ranks
    rows = weight.shape[0] // groups
    approx = np.empty_like(weight)
    for g in range(groups):
        block = weight[g * rows:(g + 1) * rows].reshape(rows, weight.shape[1], -1)  # (a, b, taps)
        second = block.transpose(1, 0, 2).reshape(block.shape[1], -1)
        v = np.linalg.svd(second, full_matrices=False)[0][:, :r_2]
        projected = np.einsum("abt,bc,dc->adt", block, v, v).reshape(rows, -1)
        u = np.linalg.svd(projected, full_matrices=False)[0][:, :r_1]
        approx[g * rows:(g + 1) * rows] = (u @ (u.T @ projected)).reshape(approx[g * rows:(g + 1) * rows].shape)
    return float(np.linalg.norm(weight - approx) / np.linalg.norm(weight))


# ------------------------------------------------------------------ the table
def test_the_table_covers_every_torch_conv_kind():
    assert dict(SVD_CLASSES) == TORCH_TO_SVD
    assert SVD_CLASSES[nn.Conv2d] is SVDConv
    for torch_class, svd_class in TORCH_TO_SVD.items():
        assert svd_class._torch_class is torch_class  # densify's way back


# ------------------------------------------------------------------ full rank
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(MODELS))
def test_full_rank_convert_is_exact_and_keeps_depthwise_dense(kind, dtype):
    model, x = _model(kind, dtype)
    converted, report = convert(model, example_input=x, return_report=True)
    reference = _outputs(model, x)
    error = _output_error(_outputs(converted, x), reference)
    assert error <= TOLERANCE[dtype]
    assert report.output_error == pytest.approx(error, rel=1e-6, abs=1e-14)
    convs = _convs(model)
    kept = {name for name, conv in convs if _depthwise(conv)}
    assert kept and {k.name for k in report.kept_dense} == kept
    assert all("depthwise" in k.reason for k in report.kept_dense)
    assert {layer.name for layer in report.layers} == {name for name, _ in convs} - kept
    for name, conv in convs:
        new = converted.get_submodule(name)
        assert type(new) is (type(conv) if name in kept else TORCH_TO_SVD[type(conv)]), name
    assert report.relative_error <= TOLERANCE[dtype]
    for layer in report.layers:  # the reported error against the composed kernel, recomputed
        conv, new = model.get_submodule(layer.name), converted.get_submodule(layer.name)
        truth = ((new.dense_weight() - conv.weight).norm() / conv.weight.norm()).item()
        assert truth <= TOLERANCE[dtype] and layer.shape == tuple(conv.weight.shape)
        assert layer.params_after == _params(new) and layer.params_before == _params(conv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(MODELS))
def test_densify_gives_back_the_torch_classes_and_state_dict(kind, dtype):
    model, x = _model(kind, dtype)
    dense = densify(convert(model, force=("*",)))  # every conv through the SVD form
    for (name, before), (name_after, after) in zip(model.named_modules(), dense.named_modules()):
        assert name == name_after and type(after) is type(before), name
        if type(before) in TORCH_TO_SVD:
            assert repr(after) == repr(before)  # every hyper-parameter
    original, again = model.state_dict(), dense.state_dict()
    assert list(again) == list(original)
    for key, value in original.items():
        scale = max(float(value.abs().max()), 1.0) if value.is_floating_point() else 1.0
        assert torch.allclose(again[key], value, rtol=0, atol=TOLERANCE[dtype] * scale), key
    assert _output_error(_outputs(dense, x), _outputs(model, x)) <= TOLERANCE[dtype]


# ------------------------------------------------------------------ truncation
@pytest.mark.parametrize("setting", [dict(rank=2), dict(rank=(3, 1)), dict(rank=0.5), dict(energy=0.8),
                                     dict(energy=0.95)])
@pytest.mark.parametrize("kind", list(MODELS))
def test_truncation_reports_the_exact_kernel_error(kind, setting):
    model, x = _model(kind, torch.float64)
    converted, report = convert(model, **setting, force=("*",), example_input=x, return_report=True)
    assert len(report.layers) == len(_convs(model))
    for layer in report.layers:
        conv, new = model.get_submodule(layer.name), converted.get_submodule(layer.name)
        weight = conv.weight.detach().cpu().numpy()
        composed = new.dense_weight().detach().cpu().numpy()
        truth = float(np.linalg.norm(composed - weight) / np.linalg.norm(weight))
        assert layer.relative_error == pytest.approx(truth, rel=1e-8, abs=1e-12), layer.name
        assert layer.relative_error == pytest.approx(_one_pass_error(weight, conv.groups, new.ranks),
                                                     rel=1e-8, abs=1e-12), layer.name
        assert layer.ranks == new.ranks
        if "energy" in setting:  # ||W_hat||^2 >= energy ||W||^2
            assert np.sum(composed ** 2) >= setting["energy"] * np.sum(weight ** 2) * (1 - 1e-12)
        if isinstance(setting.get("rank"), float):  # a fraction of the channels per group, in TT order
            rows, cols = conv.weight.shape[0] // conv.groups, conv.weight.shape[1]
            taps = math.prod(conv.kernel_size)
            r_1, r_2 = math.ceil(0.5 * rows), math.ceil(0.5 * cols)
            assert new.ranks == (min(r_1, r_2 * taps), min(r_2, r_1 * taps))
    error = _output_error(_outputs(converted, x), _outputs(model, x))
    assert report.output_error == pytest.approx(error, rel=1e-9)


def test_transposed_ranks_count_in_channels_first():
    conv = nn.ConvTranspose2d(8, 4, 3, stride=2).double()  # weight (8, 4, 3, 3): U has 8 rows
    converted, report = convert(nn.Sequential(conv), rank=(6, 2), force=("*",), return_report=True)
    layer = converted[0]
    assert layer.ranks == (6, 2) and layer.U.shape == (8, 6) and layer.V.shape == (4, 2)
    assert report.layers[0].relative_error == pytest.approx(
        _one_pass_error(conv.weight.detach().cpu().numpy(), 1, (6, 2)), rel=1e-8)


# ------------------------------------------------------------------ kept dense and sizes
def _random_conv(rng: random.Random, torch_class: type) -> nn.Module:
    dims = int(torch_class.__name__[-2])
    groups = rng.choice([1, 1, 2, 4])
    c_in, c_out = groups * rng.randint(1, 5), groups * rng.randint(1, 5)
    if rng.random() < 0.2:
        c_in = c_out = groups  # depthwise
    kernel = tuple(rng.randint(1, 3) for _ in range(dims))
    return torch_class(c_in, c_out, kernel, groups=groups, bias=rng.random() < 0.6)


def _rank_spec(conv: nn.Module, rank):
    """``rank`` for ``from_conv``: a float is that fraction of each side's channels per group
    (TT order: the weight's dim 0 first), rounded up, as ``convert`` documents."""
    if not isinstance(rank, float):
        return rank
    rows, cols = conv.weight.shape[0] // conv.groups, conv.weight.shape[1]
    return max(1, math.ceil(rank * rows)), max(1, math.ceil(rank * cols))


@pytest.mark.parametrize("torch_class", list(TORCH_TO_SVD), ids=lambda c: c.__name__)
def test_kept_dense_exactly_when_the_built_layer_is_not_smaller(torch_class):
    """Sweep: a conv stays dense at every setting iff its rank-1 SVD layer (built and counted) is
    not smaller, and at a rank setting also iff the layer at that rank is not smaller; the
    report's parameter counts are those of the built layers."""
    rng = random.Random(sorted(TORCH_TO_SVD, key=str).index(torch_class))
    svd_class = TORCH_TO_SVD[torch_class]
    outcomes = set()
    for _ in range(25):
        conv = _random_conv(rng, torch_class).double()
        dense, smallest = _params(conv), _params(svd_class.from_conv(conv, rank=1))
        never = smallest >= dense
        converted, report = convert(nn.Sequential(conv), return_report=True)
        assert (type(converted[0]) is torch_class) == never, conv
        if never:
            assert report.kept_dense[0].params_tt == smallest and report.kept_dense[0].params_dense == dense
        else:
            assert type(converted[0]) is svd_class
            assert report.layers[0].params_after == _params(svd_class.from_conv(conv))
        if _depthwise(conv):
            assert never and "depthwise" in report.kept_dense[0].reason

        rank = rng.choice([1, 2, 3, (1, 3), (3, 1), 0.5])
        at_rank = _params(svd_class.from_conv(conv, rank=_rank_spec(conv, rank)))
        kept = never or at_rank >= dense
        outcomes.add((never, kept))
        converted, report = convert(nn.Sequential(conv), rank=rank, return_report=True)
        assert (type(converted[0]) is torch_class) == kept, (conv, rank)
        if kept:
            assert report.kept_dense[0].params_tt == (smallest if never else at_rank)
        else:
            assert type(converted[0]) is svd_class and report.layers[0].params_after == at_rank
    assert outcomes == {(True, True), (False, True), (False, False)}  # every case was seen


@pytest.mark.parametrize("make_conv", [  # factories: the conv is built in the test, on the test's device
    lambda: nn.Conv1d(6, 6, 5, groups=6), lambda: nn.Conv3d(4, 4, 3, groups=4, padding=1),
    lambda: nn.ConvTranspose1d(6, 6, 4, stride=2, groups=6),
    lambda: nn.ConvTranspose3d(3, 3, 2, stride=2, groups=3, bias=False)],
    ids=["Conv1d", "Conv3d", "ConvTranspose1d", "ConvTranspose3d"])
def test_depthwise_nd_kept_dense_and_force_converts_exactly(make_conv):
    conv = make_conv().double()
    model = nn.Sequential(conv)
    with pytest.warns(UserWarning, match=r"'0' kept dense: depthwise"):
        kept = convert(model)
    assert type(kept[0]) is type(conv) and kept[0] is not conv
    forced, report = convert(model, force=("0",), return_report=True)
    assert type(forced[0]) is TORCH_TO_SVD[type(conv)] and not report.kept_dense
    dims = len(conv.kernel_size)
    x = torch.randn(2, conv.in_channels, *([6] * dims), dtype=torch.float64)
    assert _output_error(_outputs(forced, x), _outputs(model, x)) <= 1e-10


@pytest.mark.parametrize("kind", list(MODELS))
def test_param_budget_fits_and_keeps_depthwise_dense(kind):
    model, x = _model(kind, torch.float64)
    before = sum(_params(conv) for _, conv in _convs(model))
    for budget in (0.5, 0.8):
        converted, report = convert(model, param_budget=budget, example_input=x, return_report=True)
        after = sum(_params(m) for m in converted.modules() if type(m) in TORCH_TO_SVD or
                    type(m) in TORCH_TO_SVD.values())
        assert after <= budget * before and report.params_after + report.params_kept_dense == after
        for name, conv in _convs(model):
            if _depthwise(conv):
                assert type(converted.get_submodule(name)) is type(conv)
        assert report.output_error == pytest.approx(_output_error(_outputs(converted, x), _outputs(model, x)),
                                                    rel=1e-9)


# ------------------------------------------------------------------ load_converted
@pytest.mark.parametrize("kind", list(MODELS))
def test_load_converted_round_trips(kind):
    model, x = _model(kind)
    for setting in (dict(), dict(energy=0.8, force=("*",)), dict(param_budget=0.6)):
        converted, _ = convert(model, **setting, return_report=True)  # (the report lists the depthwise conv)
        buffer = io.BytesIO()
        torch.save(converted.state_dict(), buffer)
        buffer.seek(0)
        restored = load_converted(model, torch.load(buffer, weights_only=True))
        for (name, a), (_, b) in zip(converted.named_modules(), restored.named_modules()):
            assert type(a) is type(b), name
            if hasattr(a, "ranks"):
                assert a.ranks == b.ranks
        with deterministic_cudnn():  # bitwise: the same convolution algorithms on both sides
            for a, b in zip(_outputs(converted, x), _outputs(restored, x)):
                assert torch.equal(a, b)
            again = load_converted(converted, converted.state_dict())  # a converted model reloads as it is
            for a, b in zip(_outputs(converted, x), _outputs(again, x)):
                assert torch.equal(a, b)


def test_load_converted_refuses_another_kind():
    state = convert(nn.Sequential(nn.Conv1d(4, 6, 3)), rank=2).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_converted(nn.Sequential(nn.Conv2d(4, 6, 3)), state)


# ------------------------------------------------------------------ reparametrized transposed convs
def test_spectral_norm_on_conv_transpose_folds_with_dim_1():
    torch.manual_seed(1)
    model = nn.Sequential(nn.utils.spectral_norm(nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2)),
                          nn.ReLU(), nn.ConvTranspose2d(4, 5, 3)).double()
    hooked = model[0]
    hook = next(h for h in hooked._forward_pre_hooks.values() if type(h).__name__ == "SpectralNorm")
    assert hook.dim == 1  # torch's default for ConvTranspose
    model.train()
    for _ in range(3):  # move u, v away from their initial values
        model(torch.randn(2, 6, 4, 4, dtype=torch.float64))
    model.eval()
    # What the layer computes in eval mode, written out: W / (u^T W_mat v), W_mat with dim 1 first.
    weight = hooked.weight_orig.detach()
    matrix = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    sigma = hooked.weight_u @ matrix @ hooked.weight_v
    expected = weight / sigma
    converted, report = convert(model, return_report=True)
    assert type(converted[0]) is SVDConvTranspose2d
    assert any("spectral_norm on weight folded" in note for note in report.layers[0].notes)
    folded = converted[0].dense_weight().detach()
    assert float((folded - expected).norm() / expected.norm()) <= 1e-12
    # A dim-0 normalisation would be a different kernel: the test tells them apart.
    wrong_sigma = torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord=2)
    assert float((weight / wrong_sigma - expected).norm() / expected.norm()) > 1e-3
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    assert _output_error(_outputs(converted, x), _outputs(model, x)) <= 1e-10


@pytest.mark.parametrize("kind", ["parametrizations.spectral_norm", "parametrizations.weight_norm"])
def test_parametrized_conv_transpose_and_3d_fold_exactly(kind):
    torch.manual_seed(2)
    wrap = (parametrizations.spectral_norm if kind.endswith("spectral_norm") else parametrizations.weight_norm)
    model = nn.Sequential(wrap(nn.ConvTranspose3d(4, 6, 2, stride=2)), nn.ReLU(),
                          wrap(nn.Conv3d(6, 5, 3, padding=1)), wrap(nn.ConvTranspose1d(5, 3, 3))).double()
    model[3] = nn.Sequential(nn.Flatten(2), model[3])  # (B, 5, 4*8*8) -> a 1-D signal
    model.train()
    model(torch.randn(2, 4, 2, 4, 4, dtype=torch.float64))  # one power-iteration step
    model.eval()
    x = torch.randn(2, 4, 2, 4, 4, dtype=torch.float64)
    converted, report = convert(model, return_report=True)
    assert [type(converted.get_submodule(n)) for n in ("0", "2", "3.1")] == [SVDConvTranspose3d, SVDConv3d,
                                                                          SVDConvTranspose1d]
    assert all(any("folded" in note for note in layer.notes) for layer in report.layers)
    assert _output_error(_outputs(converted, x), _outputs(model, x)) <= 1e-10


def _hook_weight_norm(conv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates it; models still use it
        return nn.utils.weight_norm(conv)


@pytest.mark.parametrize("wrap", [nn.utils.spectral_norm, _hook_weight_norm,
                                  lambda conv: torch.nn.utils.prune.l1_unstructured(conv, "weight", amount=0.4)],
                         ids=["spectral_norm", "weight_norm", "prune"])
def test_hook_reparametrized_nd_and_transposed_convs_fold_exactly(wrap):
    torch.manual_seed(3)
    model = nn.Sequential(wrap(nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2)), nn.ReLU(),  # (B, 6, 13)
                          wrap(nn.Conv1d(6, 5, 3, dilation=2)), nn.Unflatten(2, (1, 1, 9)),   # (B, 5, 1, 1, 9)
                          wrap(nn.ConvTranspose3d(5, 2, 2, stride=(1, 2, 2)))).double()
    model.train()
    model(torch.randn(2, 4, 6, dtype=torch.float64))  # spectral_norm: one power-iteration step
    model.eval()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    converted, report = convert(model, return_report=True)
    assert [type(converted[i]) for i in (0, 2, 4)] == [SVDConvTranspose1d, SVDConv1d, SVDConvTranspose3d]
    assert all(any("folded" in note for note in layer.notes) for layer in report.layers)
    assert _output_error(_outputs(converted, x), _outputs(model, x)) <= 1e-10


# ------------------------------------------------------------------ carried over, skipped
def test_hooks_flags_and_training_mode_carry_over_for_nd_kinds():
    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ConvTranspose1d(8, 4, 3, stride=2), nn.Conv1d(4, 4, 1))
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    model[1].eval()
    calls = []
    model[1].register_forward_hook(lambda module, inputs, output: calls.append(type(module).__name__))
    converted, report = convert(model, return_report=True)
    assert [type(m) for m in converted] == [SVDConv1d, SVDConvTranspose1d, SVDConv1d]
    assert not any(p.requires_grad for p in (converted[0].U, converted[0].S, converted[0].core, converted[0].V))
    assert converted[0].bias.requires_grad and converted[1].U.requires_grad and not converted[1].bias.requires_grad
    assert [m.training for m in converted] == [True, False, True]
    converted(torch.randn(1, 3, 10))
    assert calls == ["SVDConvTranspose1d"]
    assert any("moved 1 forward hook" in note for note in report.layers[1].notes)
    dense = densify(converted)
    assert [type(m) for m in dense] == [nn.Conv1d, nn.ConvTranspose1d, nn.Conv1d]
    assert not dense[0].weight.requires_grad and not dense[1].bias.requires_grad and not dense[1].training
    dense(torch.randn(1, 3, 10))
    assert calls == ["SVDConvTranspose1d", "ConvTranspose1d"]


class _MyConv1d(nn.Conv1d):
    pass


class _MyConvTranspose3d(nn.ConvTranspose3d):
    pass


def test_subclasses_and_lazy_nd_convs_are_skipped_with_the_reason():
    model = nn.Sequential(_MyConv1d(2, 4, 3), nn.Conv1d(4, 4, 3), nn.LazyConv3d(4, 3),
                          _MyConvTranspose3d(4, 2, 3), nn.LazyConvTranspose1d(3, 2))
    with pytest.warns(UserWarning, match="did not convert every conv as a plain torch conv"):
        convert(model)
    converted, report = convert(model, return_report=True)
    reasons = dict(report.skipped)
    assert set(reasons) == {"0", "2", "3", "4"}
    assert "_MyConv1d is a subclass of nn.Conv1d" in reasons["0"] and "SVDConv1d.from_conv" in reasons["0"]
    assert "is a subclass of nn.ConvTranspose3d" in reasons["3"] and "SVDConvTranspose3d.from_conv" in reasons["3"]
    assert "uninitialized lazy conv" in reasons["2"] and "nn.Conv3d" in reasons["2"]
    assert "nn.ConvTranspose1d" in reasons["4"]
    assert type(converted[1]) is SVDConv1d and type(converted[0]) is _MyConv1d


def test_initialized_lazy_conv_converts():
    model = nn.Sequential(nn.LazyConvTranspose2d(5, 3, stride=2)).double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    reference = _outputs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert(model)
    assert type(converted[0]) is SVDConvTranspose2d
    assert _output_error(_outputs(converted, x), reference) <= 1e-10


def test_a_bare_conv_of_each_kind_converts_and_densifies_to_its_class():
    for torch_class, svd_class in TORCH_TO_SVD.items():
        conv = torch_class(4, 6, 3).double()
        converted = convert(conv)
        assert type(converted) is svd_class
        back = densify(converted)
        assert type(back) is torch_class and repr(back) == repr(conv)
        assert torch.allclose(back.weight, conv.weight, rtol=0, atol=1e-12)


class _Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)

    def forward(self, x):  # output_size picks the output padding, as in U-Net decoders
        return self.up(x, output_size=[2 * x.shape[-2], 2 * x.shape[-1]])


def test_converted_transposed_layers_take_output_size():
    model = _Upsampler().double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    converted = convert(model)
    assert type(converted.up) is SVDConvTranspose2d
    out = _outputs(converted, x)
    assert out[0].shape == (2, 3, 10, 12) and _output_error(out, _outputs(model, x)) <= 1e-10
