"""Checkpoint layouts seen in the wild: only the model's conv kernels are analysed.

Every checkpoint here wraps the same small CNN together with the things that used to be
taken for kernels (Adam moments, an EMA copy, a batch of images); the analysed layers and
the product of bounds must be those of the CNN alone, checked against explicit operator
matrices (tests/oracle.py) and an independent Fantastic Four computation.
"""

import copy
import io
import json
import math
import warnings

import pytest
import torch
from torch import nn

from oracle import circular_singular_values
from ttconv import SVDConv
from ttconv.cli import main
from ttconv.report import state_dict_report

# Subprocesses, files and numpy: these run on the CPU whatever --device says.
pytestmark = pytest.mark.cpu_only

SIZE = (6, 6)


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2)).double()


@pytest.fixture(scope="module")
def trained():
    """The CNN after one Adam step, its optimizer and scheduler, an EMA copy far from it, images."""
    torch.manual_seed(0)
    net = _net()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    net(torch.randn(2, 3, 8, 8, dtype=torch.float64)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(10)  # analysing the EMA instead of the model would change the product
    images = torch.randn(4, 3, 8, 8, dtype=torch.float64) * 50
    return net, optimizer, scheduler, ema, images


def _fantastic_four(w):
    o, i, kh, kw = w.shape
    mats = [w.permute(0, 2, 1, 3).reshape(o * kh, i * kw), w.permute(0, 3, 1, 2).reshape(o * kw, i * kh),
            w.reshape(o, -1), w.permute(0, 2, 3, 1).reshape(o * kh * kw, i)]
    return math.sqrt(kh * kw) * min(float(torch.linalg.matrix_norm(m, 2)) for m in mats)


def _expected(net):
    """Per-layer (exact circ at SIZE, upper bound) from the real kernels, independently.

    A state dict has no paddings or strides: each kernel is bounded as a stride-1 conv with
    zero padding k-1 per side, a crop of the circular conv on the (n + 2(k-1)) grid, so
    its bound is min(exact norm on that grid, Fantastic Four).
    """
    out = []
    for conv in (m for m in net if isinstance(m, nn.Conv2d)):
        w = conv.weight.detach()
        exact = float(circular_singular_values(w, SIZE)[0])
        grid = tuple(n + 2 * (k - 1) for n, k in zip(SIZE, w.shape[2:]))
        out.append((exact, min(float(circular_singular_values(w, grid)[0]), _fantastic_four(w))))
    return out


def _layouts(net, optimizer, scheduler, ema, images):
    sd, ema_sd, opt = net.state_dict(), ema.state_dict(), optimizer.state_dict()
    prefixed = {"model." + k: v for k, v in sd.items()}
    # Parameters 0, 4, 6 are the conv weights (1, 5, 7 their biases, 2, 3 the batch norm's).
    moments = [f"state.{i}.{m}" for i in (0, 4, 6) for m in ("exp_avg", "exp_avg_sq")]
    return {
        # name: (checkpoint, analysed layer names, skipped keys)
        "plain": (sd, ["0", "3", "5"], []),
        "state_dict": ({"state_dict": sd}, ["0", "3", "5"], []),
        "model+optimizer+ema+images": (
            {"model": sd, "optimizer": opt, "ema": ema_sd, "images": images}, ["0", "3", "5"],
            ["optimizer." + m for m in moments] + ["ema.0.weight", "ema.3.weight", "ema.5.weight", "images"]),
        "model_state_dict": (
            {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": opt, "scheduler": scheduler.state_dict()},
            ["0", "3", "5"], ["optimizer_state_dict." + m for m in moments]),
        "deepspeed-like module": ({"module": sd, "optimizer": opt, "lr_scheduler": scheduler.state_dict()},
                                  ["0", "3", "5"], ["optimizer." + m for m in moments]),
        "timm state_dict_ema": ({"state_dict": sd, "state_dict_ema": ema_sd, "optimizer": opt}, ["0", "3", "5"],
                                ["state_dict_ema.0.weight", "state_dict_ema.3.weight", "state_dict_ema.5.weight"]
                                + ["optimizer." + m for m in moments]),
        "lightning": ({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.4.0", "state_dict": prefixed,
                       "optimizer_states": [opt], "lr_schedulers": [scheduler.state_dict()],
                       "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5)}},
                       "hyper_parameters": {"lr": 0.1}},
                      ["model.0", "model.3", "model.5"], ["optimizer_states.0." + m for m in moments]),
        "lightning with an EMA module": (
            {"state_dict": {**prefixed, **{"ema_model." + k: v for k, v in ema_sd.items()}}, "optimizer_states": [opt]},
            ["model.0", "model.3", "model.5"],
            ["state_dict.ema_model.0.weight", "state_dict.ema_model.3.weight", "state_dict.ema_model.5.weight"]
            + ["optimizer_states.0." + m for m in moments]),
        "torch-ema shadow params": (
            {"model": sd, "ema": {"decay": 0.999, "num_updates": 3, "shadow_params": list(ema.parameters())}},
            ["0", "3", "5"], ["ema.shadow_params.0", "ema.shadow_params.4", "ema.shadow_params.6"]),
    }


LAYOUTS = ["plain", "state_dict", "model+optimizer+ema+images", "model_state_dict", "deepspeed-like module",
           "timm state_dict_ema", "lightning", "lightning with an EMA module", "torch-ema shadow params"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_analyses_the_model_kernels_only(trained, layout, tmp_path):
    net = trained[0]
    checkpoint, names, skipped = _layouts(*trained)[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint, path)
    out, err = io.StringIO(), io.StringIO()
    code = main(["check", str(path), "--input-size", "3", *map(str, SIZE), "--json"], out=out, err=err)
    assert code == 0, err.getvalue()
    payload = json.loads(out.getvalue())
    assert [row["name"] for row in payload["layers"]] == names
    assert sorted(s["key"] for s in payload["skipped"]) == sorted(skipped)
    assert all(s["reason"] for s in payload["skipped"])
    expected = _expected(net)
    for row, (exact, upper) in zip(payload["layers"], expected):
        assert row["exact"] == pytest.approx(exact, rel=1e-9)
        assert row["upper_bound"] == pytest.approx(upper, rel=1e-9)
    assert payload["upper_bound_product"] == pytest.approx(math.prod(u for _, u in expected), rel=1e-9)


def test_skipped_tensors_are_listed_in_the_table(trained, tmp_path):
    checkpoint, _, _ = _layouts(*trained)["model+optimizer+ema+images"]
    report = state_dict_report(checkpoint)
    table = str(report)
    assert "skipped 10 layer(s) or tensor(s)" in table
    for words in ("optimizer state", "EMA", "images", "optimizer.state.0.exp_avg_sq"):
        assert words in table
    # The size-independent product is the clean model's, not one inflated by moments, EMA and images.
    assert report.upper_bound_product == pytest.approx(state_dict_report(trained[0].state_dict()).upper_bound_product)


def test_an_ema_copy_alone_is_analysed(trained):
    _, _, _, ema, _ = trained
    report = state_dict_report({"ema": ema.state_dict(), "optimizer": trained[1].state_dict()}, SIZE)
    assert [row.name for row in report.layers] == ["0", "3", "5"]
    assert "EMA" in report.message
    for row, (exact, _) in zip(report.layers, _expected(ema)):
        assert row.exact == pytest.approx(exact, rel=1e-9)


def test_same_names_from_two_containers_keep_their_full_keys(trained):
    sd = trained[0].state_dict()
    report = state_dict_report({"model": sd, "net": sd})
    assert [row.name for row in report.layers] == [f"{p}.{i}.weight" for p in ("model", "net") for i in (0, 3, 5)]


def test_only_keys_ending_in_weight_are_kernels():
    w = torch.randn(2, 2, 3, 3)
    report = state_dict_report({"conv.weight": w, "block.depthwise_weight": w, "conv.bias": torch.randn(2),
                                "features": w, "running_images": w.clone(), "conv1d.weight": torch.randn(2, 2, 3),
                                "clips": torch.randn(1, 2, 4, 4, 4), "tokens": torch.randn(1, 5, 2),
                                "ints.weight": torch.ones(2, 2, 3, 3, dtype=torch.int64)})
    assert [row.name for row in report.layers] == ["conv", "block.depthwise_weight", "conv1d"]
    assert [row.kind for row in report.layers] == ["Conv2d", "Conv2d", "Conv1d"]
    reasons = {s.key: s.reason for s in report.skipped}
    assert set(reasons) == {"features", "running_images", "clips", "tokens", "ints.weight"}
    assert "not a '...weight' key" in reasons["features"] and "5-D but not a '...weight' key" in reasons["clips"]
    assert "3-D but not a '...weight' key" in reasons["tokens"]
    assert "not floating point" in reasons["ints.weight"]


def _eval_weights(make):
    torch.manual_seed(1)
    layer = make(nn.Conv2d(3, 4, 3, padding=1).double())
    layer.train()
    layer(torch.randn(2, 3, 6, 6, dtype=torch.float64))  # a training step of the reparametrization
    layer.eval()
    layer(torch.randn(1, 3, 6, 6, dtype=torch.float64))  # old-style hooks set .weight in forward
    return layer.state_dict(), layer.weight.detach().clone()


@pytest.mark.parametrize("make", [
    nn.utils.spectral_norm,
    nn.utils.parametrizations.spectral_norm,
    nn.utils.weight_norm,
    nn.utils.parametrizations.weight_norm,
], ids=["spectral_norm", "parametrizations.spectral_norm", "weight_norm", "parametrizations.weight_norm"])
def test_reparametrized_kernels_are_rebuilt_as_used_in_eval_mode(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old-style weight_norm is deprecated
        state, weight = _eval_weights(make)
    report = state_dict_report({"model": {"conv." + k: v for k, v in state.items()}}, SIZE)
    assert [row.name for row in report.layers] == ["conv"] and not report.skipped
    assert report.layers[0].exact == pytest.approx(float(circular_singular_values(weight, SIZE)[0]), rel=1e-9)


SQUARE_REPARAMETRIZATIONS = {  # square kernels (c_out == c_in): the tensors' lengths alone do not say the dim
    "weight_norm dim=0": (nn.Conv2d, lambda m: nn.utils.weight_norm(m, dim=0)),
    "weight_norm dim=1": (nn.Conv2d, lambda m: nn.utils.weight_norm(m, dim=1)),
    "weight_norm dim=None": (nn.Conv2d, lambda m: nn.utils.weight_norm(m, dim=None)),
    "parametrizations.weight_norm dim=1": (nn.Conv2d, lambda m: nn.utils.parametrizations.weight_norm(m, dim=1)),
    "spectral_norm dim=0": (nn.Conv2d, lambda m: nn.utils.spectral_norm(m, dim=0)),
    "spectral_norm dim=1": (nn.Conv2d, lambda m: nn.utils.spectral_norm(m, dim=1)),
    "spectral_norm of a ConvTranspose2d (dim=1)": (nn.ConvTranspose2d, nn.utils.spectral_norm),
    "parametrizations.spectral_norm dim=1": (nn.Conv2d, lambda m: nn.utils.parametrizations.spectral_norm(m, dim=1)),
    "parametrizations.spectral_norm of a ConvTranspose2d": (nn.ConvTranspose2d,
                                                             nn.utils.parametrizations.spectral_norm),
}


@pytest.mark.parametrize("kind", sorted(SQUARE_REPARAMETRIZATIONS))
def test_square_reparametrized_kernels_are_rebuilt_with_their_own_dim(kind):
    """weight_norm's dim is read from g's shape, spectral_norm's from which layout the stored
    (u, v) pair was iterated in (u = normalize(W v)); before, a square kernel was read with dim 0
    whatever its dim: 13.7 instead of 20 for weight_norm(dim=1), sigma 1.19x off for spectral_norm
    of a ConvTranspose2d. The report's exact value is the circular norm of the kernel the module
    computes with in eval mode (a ConvTranspose2d weight read as the kernel of the conv it is the
    adjoint of: the same singular values)."""
    cls, make = SQUARE_REPARAMETRIZATIONS[kind]
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old-style weight_norm is deprecated
        layer = make(cls(4, 4, 3, padding=1).double())
    with torch.no_grad():  # a different magnitude per channel, so that the dim matters
        for name in ("weight_g", "parametrizations.weight.original0"):
            if name in dict(layer.named_parameters()):
                layer.get_parameter(name).mul_(torch.linspace(0.5, 3.0, layer.get_parameter(name).numel())
                                               .reshape(layer.get_parameter(name).shape))
    layer.train()
    layer(torch.randn(2, 4, 6, 6, dtype=torch.float64))
    layer.eval()
    layer(torch.randn(1, 4, 6, 6, dtype=torch.float64))
    weight = layer.weight.detach().clone()
    report = state_dict_report({"conv." + k: v for k, v in layer.state_dict().items()}, SIZE)
    assert [row.name for row in report.layers] == ["conv"] and not report.skipped
    assert report.layers[0].exact == pytest.approx(float(circular_singular_values(weight, SIZE)[0]), rel=1e-9)


def test_a_never_iterated_square_spectral_norm_is_skipped_not_guessed():
    """A hook-based spectral_norm that never ran in training mode holds random (u, v): on a square
    kernel neither layout fits them, so the dim is unknown and the layer is listed as skipped."""
    torch.manual_seed(3)
    layer = nn.utils.spectral_norm(nn.Conv2d(4, 4, 3, padding=1).double()).eval()
    report = state_dict_report({"conv." + k: v for k, v in layer.state_dict().items()}, SIZE)
    assert report.layers == [] and [s.key for s in report.skipped] == ["conv.weight_orig"]
    assert "cannot be rebuilt" in report.skipped[0].reason


def test_svdconv_factors_inside_a_training_checkpoint():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), SVDConv(6, 6, 3, padding=1, rank=3)).double()
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(1, 3, 6, 6, dtype=torch.float64)).sum().backward()
    optimizer.step()
    report = state_dict_report({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, SIZE)
    assert [(row.name, row.kind) for row in report.layers] == [("0", "Conv2d"), ("1", "SVDConv")]
    dense = net[1].dense_weight().detach()
    assert report.layers[1].exact == pytest.approx(float(circular_singular_values(dense, SIZE)[0]), rel=1e-9)
    assert {s.key.rsplit(".", 1)[-1] for s in report.skipped} == {"exp_avg", "exp_avg_sq"}


def test_float8_and_meta_kernels_are_skipped_with_their_reason():
    """A float8 kernel (torch has no isfinite for it) and a meta-device one (no values) made
    `ttconv check` print a traceback and exit 1; they are skipped and listed like other
    tensors the spectra cannot read."""
    state = {"a.weight": torch.randn(2, 2, 3, 3).to(torch.float8_e4m3fn),
             "b.weight": torch.empty(2, 2, 3, 3, device="meta"), "c.weight": torch.randn(2, 2, 3, 3)}
    report = state_dict_report(state, SIZE)
    assert [row.name for row in report.layers] == ["c"]
    reasons = {s.key: s.reason for s in report.skipped}
    assert "is not one the spectra compute in" in reasons["a.weight"]
    assert reasons["b.weight"] == "on the meta device: it holds no values"
