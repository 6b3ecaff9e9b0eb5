"""Smoke tests of the experiment runner (examples/experiments): data, models, one step per method."""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import sys

import numpy as np
import pytest
import torch

EXPERIMENTS = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "experiments")
sys.path.insert(0, os.path.abspath(EXPERIMENTS))

# Unique module names: tests/ has its own models.py, which pytest may have imported first.
data = importlib.import_module("offline_data")
models = importlib.import_module("architectures")
run = importlib.import_module("run")

import ttconv  # noqa: E402
from ttconv import evaluate as ev  # noqa: E402
from ttconv.activations import MaxMin  # noqa: E402

# Subprocesses, files and numpy: these run on the CPU whatever --device says.
pytestmark = pytest.mark.cpu_only

PAPER = os.path.join(EXPERIMENTS, "configs", "cifar10_paper.json")


def conv_params(c_in, c_out, k, bias):
    return c_in * c_out * k * k + (c_out if bias else 0)


def test_parameter_counts_of_the_published_networks():
    """Counts from each network's description, layer by layer (built on the meta device: no memory)."""
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in build().parameters()) for name, build in (
            ("wrn", models.wrn16_10), ("wrn_conv", lambda: models.wrn16_10(shortcut="conv")),
            ("resnet18", models.resnet18), ("vgg19", models.vgg19))}
    # WRN-16-10: stem 3->16, three stages of two pre-activation blocks (16*10, 32*10, 64*10).
    wrn = conv_params(3, 16, 3, False)
    bn = 0
    channels = 16
    for width in (160, 320, 640):
        wrn += conv_params(channels, width, 3, False) + 3 * conv_params(width, width, 3, False)
        bn += 2 * (channels + 3 * width)
        channels = width
    head = 2 * 640 + 640 * 10 + 10  # final batch norm and the classifier
    assert counts["wrn"] == wrn + bn + head == 16_858_074
    assert counts["wrn_conv"] == counts["wrn"] + 16 * 160 + 160 * 320 + 320 * 640  # 1x1 shortcuts: 17.1M
    # ResNet-18 (CIFAR): the well-known 11,173,962.
    assert counts["resnet18"] == 11_173_962
    vgg, channels = 0, 3
    for item in models.VGG19_LAYOUT:
        if item != "M":
            vgg += conv_params(channels, item, 3, True) + 2 * item
            channels = item
    vgg += 2 * (512 * 512 + 512) + 512 * 10 + 10
    assert counts["vgg19"] == vgg == 20_565_834


@pytest.mark.parametrize("name", ["wrn16_10", "resnet18", "vgg19"])
def test_every_architecture_runs_plain_and_orthogonal_at_reduced_width(name):
    build = models.ARCHITECTURES[name]
    torch.manual_seed(0)
    plain = build(width=0.05).eval()
    assert plain(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    def ortho(i, o, k, *, stride=1, padding=0, bias=True, padding_mode="zeros"):
        return ttconv.SVDConv(i, o, k, stride=stride, padding=padding, bias=bias, padding_mode=padding_mode,
                              core_kind="orthogonal", max_singular_value=1.0)

    orthogonal = build(ortho, MaxMin, width=0.05).eval()
    assert orthogonal(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert any(isinstance(m, MaxMin) for m in orthogonal.modules())


def test_vgg_and_digits_chain_are_certifiable_residual_nets_are_not():
    torch.manual_seed(0)
    vgg = models.vgg19(width=0.05).eval()
    assert math.isfinite(ev.lipschitz_bound(vgg, torch.zeros(1, 3, 32, 32)))
    chain = models.digits_chain(width=8).eval()
    assert math.isfinite(ev.lipschitz_bound(chain, torch.zeros(1, 1, 16, 16)))
    with pytest.raises(TypeError, match="plain chain"):
        ev.lipschitz_bound(models.resnet18(width=0.05).eval(), torch.zeros(1, 3, 32, 32))


def test_cifar_folders_in_both_layouts(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6 * 4, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=6 * 4)
    batches = tmp_path / "torchvision" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        part = slice(4 * index, 4 * index + 4)
        with open(batches / name, "wb") as handle:
            pickle.dump({b"data": images[part].reshape(4, -1), b"labels": labels[part].tolist()}, handle)
    x_train, y_train, x_test, y_test = data.load_cifar10(str(tmp_path / "torchvision"))
    assert x_train.shape == (20, 3, 32, 32) and x_test.shape == (4, 3, 32, 32)
    assert torch.equal(x_train, torch.from_numpy(images[:20]).float() / 255)
    assert y_train.tolist() == labels[:20].tolist() and y_test.tolist() == labels[20:].tolist()
    folder = tmp_path / "numpy"
    folder.mkdir()
    np.save(folder / "x_train.npy", images[:20].transpose(0, 2, 3, 1))  # NHWC uint8
    np.save(folder / "y_train.npy", labels[:20])
    np.save(folder / "x_test.npy", images[20:].astype(np.float32) / 255)  # NCHW float
    np.save(folder / "y_test.npy", labels[20:])
    same = data.load_cifar10(str(folder))
    assert torch.equal(same[0], x_train) and torch.allclose(same[2], x_test)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        data.load_cifar10(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 found"):
        data.load_cifar10(str(tmp_path))


def test_augment_is_a_crop_of_the_padded_image_and_a_flip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    out = data.augment(x, generator, padding=2)
    replay = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 5, (2,), generator=replay), torch.randint(0, 5, (2,), generator=replay)
    flip = torch.rand(2, generator=replay) < 0.5
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="reflect")
    for i in range(2):
        crop = padded[i, :, dy[i]: dy[i] + 8, dx[i]: dx[i] + 8]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def test_per_arch_overrides_and_method_checks():
    config = run.load_config(PAPER)
    vgg = run.for_arch(config, "vgg19")
    assert vgg["optimizer"]["name"] == "adam" and vgg["epochs"] == 140
    assert [m.get("target") for m in vgg["methods"] if m["kind"] == "clip"] == [0.5, 1.0]
    wrn = run.for_arch(config, "wrn16_10")
    assert wrn["optimizer"]["nesterov"] and wrn["rank"] == 192 and wrn["control_every"] == 100
    assert len({run.method_label(m) for m in wrn["methods"]}) == 10
    assert {m["kind"] for m in wrn["methods"]} == set(run.KINDS)
    with pytest.raises(ValueError, match="kind"):
        run.check_methods([{"kind": "spectral_dropout"}])
    with pytest.raises(ValueError, match="target"):
        run.check_methods([{"kind": "clip"}])
    with pytest.raises(ValueError, match="arch"):
        run.for_arch(config, "resnet50")


def test_one_step_of_every_method_on_synthetic_cifar(tmp_path, capsys):
    folder = data.write_synthetic_cifar(str(tmp_path / "cifar"), images=64)
    out = tmp_path / "out"
    payload = run.run(["--config", PAPER, "--data-dir", folder, "--arch", "vgg19", "--width", "0.03125",
                       "--epochs", "1", "--max-steps", "1", "--seeds", "0", "--eval-examples", "16", "--pgd-steps", "2",
                       "--out", str(out), "--device", "cpu", "--no-plots"])
    labels = [run.method_label(m) for m in payload["methods"]]
    assert len(labels) == 10 and {r["steps"] for r in payload["runs"]} == {1}
    stored = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in stored["runs"]] == labels
    for entry in stored["runs"]:
        metrics = entry["metrics"]
        for key in ("clean_accuracy", "ece", "max_layer_norm", "lipschitz_bound", "empirical_lipschitz"):
            assert metrics[key] is not None and math.isfinite(metrics[key]), (entry["method"], key)
        assert metrics["empirical_lipschitz"] <= metrics["lipschitz_bound"] * (1 + 1e-6)
        radii = stored["config"]["eval"]["eps"]
        for eps in radii:
            assert metrics[f"pgd@{eps:g}"] <= metrics["clean_accuracy"]
            assert metrics[f"certified@{eps:g}"] <= metrics[f"pgd@{eps:g}"]
    table = (out / "results.md").read_text()
    assert all(label in table for label in labels)
    assert "acc" in capsys.readouterr().out


def test_digits_runner_writes_summary_over_seeds_and_plots(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "digits"
    payload = run.run(["--epochs", "1", "--max-steps", "2", "--seeds", "0", "1", "--methods", "conv2d",
                       "--eval-examples", "32", "--pgd-steps", "2", "--out", str(out), "--device", "cpu"])
    assert [r["seed"] for r in payload["runs"]] == [0, 1]
    conv = payload["summary"]["Conv2d"]["clean_accuracy"]
    values = [r["metrics"]["clean_accuracy"] for r in payload["runs"] if r["method"] == "Conv2d"]
    assert conv["values"] == values and conv["mean"] == pytest.approx(sum(values) / 2)
    assert conv["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))  # sample std of two values
    for run_ in payload["runs"]:  # digits_chain is a plain chain: certified
        assert run_["metrics"]["certified@1.5"] is not None
        assert run_["metrics"]["empirical_lipschitz"] <= run_["metrics"]["lipschitz_bound"] * (1 + 1e-6)
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "results.md", "robustness.png", "spectra_conv2d.png", "reliability_conv2d.png"} <= names
