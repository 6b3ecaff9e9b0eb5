"""ttconv.evaluate against independent computations.

* calibration: bins, counts and ECE worked out by hand, and an independent per-example
  loop with exact fractions for the bin edges;
* attacks: a linear two-class model, where the worst perturbation in the ball is known in
  closed form (FGSM and PGD must flip exactly the points whose margin is at most
  ``eps * ||w_y - w_j||_1`` (Linf) or ``_2`` (L2));
* certificates: a hand-built chain whose Lipschitz constant (6) and logits are computed on
  paper, and explicit operator matrices (tests/oracle.py) for conv chains;
* empirical Lipschitz: exactly ``||W||_2`` on a linear model, at most the certificate on nets.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttconv
from oracle import layer_operator, operator_matrix, seeded_rand, seeded_randint, seeded_randn, svdvals_cpu
from ttconv import evaluate as ev
from ttconv.activations import ChannelPad, MaxMin


# ----------------------------------------------------------------- helpers
def loader_of(x, y, batch=16):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def assert_no_parameter_grads(model):
    assert all(p.grad is None for p in model.parameters()), "a parameter gradient was accumulated"


def small_conv_net(circular=False):
    mode = "circular" if circular else "zeros"
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode=mode), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode=mode), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).eval()


def matrix_norm(linear_map, in_shape):
    return float(torch.linalg.matrix_norm(operator_matrix(linear_map, in_shape), ord=2))


# ----------------------------------------------------------------- calibration
def test_ece_and_reliability_table_on_hand_computed_bins():
    # 3 classes, 5 bins (0,.2], (.2,.4], (.4,.6], (.6,.8], (.8,1]; confidences chosen by hand.
    probs = torch.tensor([
        [0.90, 0.05, 0.05],  # conf .90 -> bin 4, label 0: correct
        [0.10, 0.85, 0.05],  # conf .85 -> bin 4, label 0: wrong
        [0.95, 0.03, 0.02],  # conf .95 -> bin 4, label 0: correct
        [0.50, 0.30, 0.20],  # conf .50 -> bin 2, label 1: wrong
        [0.20, 0.45, 0.35],  # conf .45 -> bin 2, label 1: correct
        [0.35, 0.34, 0.31],  # conf .35 -> bin 1, label 0: correct
    ], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 0])
    report = ev.calibration_report(probs.log(), labels, n_bins=5)
    assert [b.count for b in report.bins] == [0, 1, 2, 0, 3]
    assert [b.accuracy for b in report.bins] == [None, 1.0, 0.5, None, pytest.approx(2 / 3)]
    assert report.bins[4].confidence == pytest.approx((0.90 + 0.85 + 0.95) / 3)
    assert report.bins[2].confidence == pytest.approx((0.50 + 0.45) / 2)
    assert report.bins[1].confidence == pytest.approx(0.35)
    # Weighted by bin count (a plain mean over bins would give another number):
    expected = 3 / 6 * abs(2 / 3 - 0.9) + 2 / 6 * abs(0.5 - 0.475) + 1 / 6 * abs(1 - 0.35)
    assert report.ece == pytest.approx(expected, rel=1e-12)
    assert ev.expected_calibration_error(probs.log(), labels, n_bins=5) == report.ece
    assert report.count == 6
    assert [(b.lower, b.upper) for b in report.bins] == [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)]
    assert "ECE = " in report.table() and report.table().count("\n| ") == 5


def test_bins_are_right_closed_at_the_edges():
    # Zero logits give a confidence of exactly 1/C: on an edge, it belongs to the lower bin.
    logits = torch.zeros(2, 2)
    report = ev.calibration_report(logits, torch.tensor([0, 1]), n_bins=2)  # conf 0.5 exactly
    assert [b.count for b in report.bins] == [2, 0]
    report = ev.calibration_report(torch.zeros(1, 4), torch.tensor([0]), n_bins=4)  # conf 0.25
    assert [b.count for b in report.bins] == [1, 0, 0, 0]
    # Confidence 1 (a saturated softmax) lands in the last bin.
    report = ev.calibration_report(torch.tensor([[100.0, -100.0]]), torch.tensor([0]), n_bins=10)
    assert report.bins[-1].count == 1 and report.ece == pytest.approx(0.0, abs=1e-15)


def test_ece_matches_an_independent_loop_on_random_predictions():
    generator = torch.Generator().manual_seed(3)
    logits = seeded_randn(500, 7, generator=generator, dtype=torch.float64) * 3
    labels = seeded_randint(0, 7, (500,), generator=generator)
    n_bins = 15
    sums = {}
    for row, label in zip(logits.tolist(), labels.tolist()):
        peak = max(row)
        exps = [math.exp(v - peak) for v in row]
        confidence = max(exps) / sum(exps)
        exact = Fraction(confidence)
        b = next(i for i in range(n_bins) if exact <= Fraction(i + 1, n_bins))
        count, hits, total = sums.get(b, (0, 0, 0.0))
        sums[b] = (count + 1, hits + (row.index(peak) == label), total + confidence)
    expected = sum(c / 500 * abs(h / c - t / c) for c, h, t in sums.values())
    report = ev.calibration_report(logits, labels, n_bins=n_bins)
    assert report.ece == pytest.approx(expected, rel=1e-9)
    assert {b: v[0] for b, v in sums.items()} == {i: b.count for i, b in enumerate(report.bins) if b.count}


def test_calibration_on_a_model_and_loader():
    model = small_conv_net()
    x, y = torch.randn(40, 2, 8, 8), torch.randint(0, 3, (40,))
    report = ev.calibration(model, loader_of(x, y), n_bins=10)
    with torch.no_grad():
        direct = ev.calibration_report(model(x), y, n_bins=10)
    assert report.ece == pytest.approx(direct.ece, rel=1e-6)
    assert not model.training
    assert ev.accuracy(model, loader_of(x, y)) == pytest.approx(float((model(x).argmax(1) == y).float().mean()))


def test_calibration_errors():
    with pytest.raises(ValueError, match="n_bins"):
        ev.calibration_report(torch.zeros(2, 3), torch.tensor([0, 1]), n_bins=0)
    with pytest.raises(ValueError, match="logits"):
        ev.calibration_report(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        ev.calibration_report(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="no batches"):
        ev.calibration(small_conv_net(), [])


# ----------------------------------------------------------------- attacks: closed form
def binary_linear(d=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 2).double().eval()
    with torch.no_grad():
        model.weight.copy_(seeded_randn(2, d, generator=generator, dtype=torch.float64))
        model.bias.copy_(seeded_randn(2, generator=generator, dtype=torch.float64))
    return model


def closed_form_robust(model, x, y, eps, norm):
    """Correct at x and at every point of the ball: margin > eps * dual norm of w_y - w_j."""
    w, b = model.weight.detach(), model.bias.detach()
    direction = w[y] - w[1 - y]  # (N, d)
    margin = (direction * x).sum(1) + b[y] - b[1 - y]
    dual = direction.abs().sum(1) if norm == "linf" else direction.norm(dim=1)
    return margin, eps * dual


def closed_form_data(model, eps, n=400, seed=1, gap=0.05):
    generator = torch.Generator().manual_seed(seed)
    x = seeded_randn(n, model.in_features, generator=generator, dtype=torch.float64) * 0.3
    y = seeded_randint(0, 2, (n,), generator=generator)
    keep = torch.ones(n, dtype=torch.bool)
    for norm in ("linf", "l2"):  # no point near a threshold: the expected set is unambiguous
        margin, threshold = closed_form_robust(model, x, y, eps, norm)
        keep &= (margin - threshold).abs() > gap * threshold
        keep &= margin.abs() > gap * threshold
    return x[keep], y[keep]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_and_pgd_reach_the_closed_form_worst_case_on_a_linear_model(norm):
    model = binary_linear()
    eps = 0.1
    x, y = closed_form_data(model, eps)
    margin, threshold = closed_form_robust(model, x, y, eps, norm)
    expected = float((margin > threshold).double().mean())
    clean = float((margin > 0).double().mean())
    assert 0.2 < expected < clean - 0.1  # the attack matters, and some points stay robust
    other = closed_form_robust(model, x, y, eps, "l2" if norm == "linf" else "linf")
    assert float((other[0] > other[1]).double().mean()) != expected  # the norms flip different sets
    loader = loader_of(x, y, batch=64)
    assert ev.attack_accuracy(model, loader, eps, attack="fgsm", norm=norm) == pytest.approx(expected, abs=1e-12)
    for random_start, steps in ((False, 10), (True, 40)):
        result = ev.attack_accuracy(model, loader, eps, attack="pgd", norm=norm, steps=steps,
                                    random_start=random_start, restarts=2)
        assert result == pytest.approx(expected, abs=1e-12)
    # The optimal perturbation itself: -eps sign(w_y - w_j) or -eps (w_y - w_j) / ||w_y - w_j||.
    direction = model.weight.detach()[y] - model.weight.detach()[1 - y]
    optimum = -eps * (direction.sign() if norm == "linf" else direction / direction.norm(dim=1, keepdim=True))
    assert torch.allclose(ev.fgsm(model, x, y, eps, norm=norm) - x, optimum, atol=1e-12)
    assert_no_parameter_grads(model)


def test_attacks_never_beat_the_optimum_on_a_multiclass_linear_model():
    generator = torch.Generator().manual_seed(5)
    model = nn.Linear(10, 4).double().eval()
    x = seeded_randn(300, 10, generator=generator, dtype=torch.float64)
    y = model(x).argmax(1).detach()
    flip = seeded_rand(300, generator=generator) < 0.2
    y[flip] = (y[flip] + 1) % 4
    w, b = model.weight.detach(), model.bias.detach()
    for norm in ("linf", "l2"):
        eps = 0.15
        robust = torch.ones(300, dtype=torch.bool)
        for j in range(4):
            direction = w[y] - w[j]
            margin = (direction * x).sum(1) + b[y] - b[j]
            dual = direction.abs().sum(1) if norm == "linf" else direction.norm(dim=1)
            robust &= (j == y) | (margin > eps * dual)
        optimum = float(robust.double().mean())
        for attack in ("fgsm", "pgd"):
            measured = ev.attack_accuracy(model, loader_of(x, y, 100), eps, attack=attack, norm=norm, restarts=2)
            assert measured >= optimum - 1e-12
        assert ev.attack_accuracy(model, loader_of(x, y, 100), eps, norm=norm, steps=50) <= \
            ev.attack_accuracy(model, loader_of(x, y, 100), 0.0, norm=norm)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attacks_stay_in_the_ball_and_the_domain(norm):
    model = small_conv_net()
    x = torch.rand(16, 2, 8, 8)
    y = torch.randint(0, 3, (16,))
    eps = 0.3 if norm == "linf" else 1.5
    for adversarial in (ev.fgsm(model, x, y, eps, norm=norm, clamp=(0.0, 1.0)),
                        ev.pgd(model, x, y, eps, norm=norm, steps=5, restarts=2, clamp=(0.0, 1.0))):
        delta = (adversarial - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps * (1 + 1e-5)
        assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
        assert not adversarial.requires_grad
    assert_no_parameter_grads(model)


def test_attacks_leave_model_parameters_mode_and_global_rng_alone():
    model = small_conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(24, 2, 8, 8), torch.randint(0, 3, (24,))
    rng = torch.get_rng_state()
    ev.attack_accuracy(model, loader_of(x, y), 0.5, norm="l2", restarts=2)
    ev.attack_accuracy(model, loader_of(x, y), 0.05, attack="fgsm")
    ev.empirical_lipschitz(model, loader_of(x, y), n_iter=3, pair_eps=0.5)
    ev.certified_accuracy(model, loader_of(x, y), 10.0, 0.1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert_no_parameter_grads(model)


def test_robust_accuracy_needs_the_clean_point_correct_too():
    class Periodic(nn.Module):  # logits (cos(w x), 0): an attack step can wrap a wrong point back to correct
        def forward(self, x):
            return torch.stack([torch.cos(4.0 * x[:, 0]), torch.zeros_like(x[:, 0])], dim=1)

    model = Periodic().eval()
    x = torch.tensor([[(math.pi - 0.1) / 4]], dtype=torch.float64)  # cos = -0.995: wrong for label 0
    y = torch.tensor([0])
    adversarial = ev.fgsm(model, x, y, math.pi / 4)
    assert model(adversarial).argmax(1).tolist() == [0]  # the attack point is classified correctly
    assert ev.attack_accuracy(model, [(x, y)], math.pi / 4, attack="fgsm") == 0.0


def test_pgd_is_deterministic_under_a_seed_and_eps_zero_is_clean_accuracy():
    model = small_conv_net()
    x, y = torch.randn(16, 2, 8, 8), torch.randint(0, 3, (16,))
    a = ev.pgd(model, x, y, 0.5, norm="l2", seed=7)
    assert torch.equal(a, ev.pgd(model, x, y, 0.5, norm="l2", seed=7))
    assert torch.equal(ev.pgd(model, x, y, 0.0), x)
    clean = ev.accuracy(model, loader_of(x, y))
    assert ev.attack_accuracy(model, loader_of(x, y), 0.0) == clean


def test_evaluation_errors_name_the_argument_and_the_fix():
    model = small_conv_net()
    x, y = torch.randn(4, 2, 8, 8), torch.randint(0, 3, (4,))
    model.train()
    for call in (lambda: ev.fgsm(model, x, y, 0.1), lambda: ev.attack_accuracy(model, loader_of(x, y), 0.1),
                 lambda: ev.certified_accuracy(model, loader_of(x, y), 1.0, 0.1),
                 lambda: ev.empirical_lipschitz(model, loader_of(x, y)), lambda: ev.predict(model, loader_of(x, y))):
        with pytest.raises(ValueError, match=r"model\.eval\(\)"):
            call()
    assert model.training  # the mode is reported, never changed
    model.eval()
    model[1].train()  # one submodule left in training mode is named
    with pytest.raises(ValueError, match="'1' \\(ReLU\\)"):
        ev.fgsm(model, x, y, 0.1)
    model.eval()
    with pytest.raises(ValueError, match="eps"):
        ev.fgsm(model, x, y, -0.1)
    with pytest.raises(ValueError, match="eps"):
        ev.attack_accuracy(model, loader_of(x, y), float("nan"))
    with pytest.raises(ValueError, match="norm"):
        ev.pgd(model, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="steps"):
        ev.pgd(model, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="attack"):
        ev.attack_accuracy(model, loader_of(x, y), 0.1, attack="cw")
    with pytest.raises(ValueError, match="no batches"):
        ev.attack_accuracy(model, [], 0.1)
    with pytest.raises(ValueError, match="no batches"):
        ev.empirical_lipschitz(model, iter([]))
    with pytest.raises(ValueError, match="lipschitz"):
        ev.certified_accuracy(model, loader_of(x, y), 0.0, 0.1)
    with pytest.raises(ValueError, match="clamp"):
        ev.fgsm(model, x, y, 0.1, clamp=(1.0, 0.0))


# ----------------------------------------------------------------- certificates
def hand_built_chain():
    """conv 1x1 diag(3, 0.5) (norm 3), ReLU, Flatten, Linear diag(1, 2) (norm 2): L = 6."""
    conv = nn.Conv2d(2, 2, 1, bias=False)
    linear = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.diag(torch.tensor([3.0, 0.5])).reshape(2, 2, 1, 1))
        linear.weight.copy_(torch.diag(torch.tensor([1.0, 2.0])))
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear).eval()


def test_certified_accuracy_on_a_hand_built_net():
    model = hand_built_chain()
    # A 1x1 image with channels (a, c): features (3a, 0.5c), logits (3a, c).
    points = [((1.0, 0.0), 0), ((2.0, 1.0), 0), ((0.1, 1.0), 1), ((1.0, 2.0), 0), ((1.0, 1.0), 1)]
    x = torch.tensor([p for p, _ in points]).reshape(5, 2, 1, 1)
    y = torch.tensor([label for _, label in points])
    assert torch.allclose(model(x), torch.tensor([[3.0, 0], [6, 1], [0.3, 1], [3, 2], [3, 1]]))
    bound = ev.lipschitz_bound(model, x[:1])
    assert bound == pytest.approx(6.0, rel=1e-6)
    radius = ev.certified_radius(model(x), y, 6.0)
    margins = torch.tensor([3.0, 5.0, 0.7, 1.0, 0.0], dtype=torch.float64)  # last one is misclassified
    assert torch.allclose(radius, margins / (math.sqrt(2) * 6), atol=1e-7)
    loader = loader_of(x, y, batch=2)
    for eps, expected in ((0.0, 4), (0.1, 3), (0.3, 2), (0.4, 1), (0.5, 1), (0.6, 0)):
        assert ev.certified_accuracy(model, loader, 6.0, eps) == pytest.approx(expected / 5), eps
    # Linf radius eps certifies when the L2 radius exceeds sqrt(d) eps (d = 2 inputs here).
    assert ev.certified_accuracy(model, loader, 6.0, 0.3 / math.sqrt(2), norm="linf") == pytest.approx(2 / 5)
    # radii 0.354, 0.589, 0.0825, 0.118, 0: at eps=0.07 the Linf ball needs L2 radius 0.099 (3 certified),
    # at 0.1 it needs 0.141 (2), where the L2 ball of the same eps certifies 3.
    for eps, expected in ((0.07, 3), (0.1, 2), (0.2, 2), (0.3, 1)):
        assert ev.certified_accuracy(model, loader, 6.0, eps, norm="linf") == pytest.approx(expected / 5), eps
    # A certificate is never broken by an attack.
    for eps in (0.1, 0.3):
        assert ev.attack_accuracy(model, loader, eps, norm="l2", steps=20, restarts=3) >= \
            ev.certified_accuracy(model, loader, bound, eps)


@pytest.mark.parametrize("circular", [True, False])
def test_lipschitz_bound_of_a_conv_chain_against_explicit_operators(circular):
    torch.manual_seed(2)
    model = small_conv_net(circular).double()
    example = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    product = (matrix_norm(layer_operator(model[0]), (2, 8, 8)) * matrix_norm(layer_operator(model[2]), (4, 8, 8))
               * float(torch.linalg.matrix_norm(model[5].weight.detach(), ord=2)))
    bound = ev.lipschitz_bound(model, example)
    if circular:  # circular padding, size divisible by the stride: each layer's bound is its exact norm
        assert bound == pytest.approx(product, rel=1e-9)
    else:  # zero padding: a bound, never below the exact product
        assert product * (1 - 1e-9) <= bound <= 1.5 * product
    svd = ttconv.convert(model).eval()
    assert ev.lipschitz_bound(svd, example) == pytest.approx(bound, rel=1e-6)
    assert ev.empirical_lipschitz(model, [(torch.randn(8, 2, 8, 8, dtype=torch.float64), torch.zeros(8).long())],
                                  n_iter=30, pair_eps=1.0) <= bound * (1 + 1e-9)


def test_lipschitz_bound_of_an_orthogonal_chain_is_the_product_of_max_s():
    torch.manual_seed(0)
    model = nn.Sequential(
        ChannelPad(4),
        ttconv.SVDConv(4, 4, 3, padding=1, padding_mode="circular", core_kind="orthogonal", max_singular_value=0.8),
        MaxMin(),
        ttconv.SVDConv(4, 4, 3, padding=1, padding_mode="circular", core_kind="orthogonal"),
        nn.Flatten(), nn.Linear(4 * 36, 3),
    ).double().eval()
    with torch.no_grad():
        model[3].S.mul_(1.7)
    example = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    explicit = (matrix_norm(layer_operator(model[1]), (4, 6, 6)) * matrix_norm(layer_operator(model[3]), (4, 6, 6))
                * float(torch.linalg.matrix_norm(model[5].weight.detach(), ord=2)))
    assert ev.lipschitz_bound(model, example) == pytest.approx(explicit, rel=1e-8)
    data = [(torch.randn(16, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (16,)))]
    assert ev.empirical_lipschitz(model, data, n_iter=20, pair_eps=0.5) <= explicit * (1 + 1e-9)


@pytest.mark.parametrize("dims", [1, 3, "transposed"])
def test_lipschitz_bound_of_1d_3d_and_transposed_chains_against_explicit_operators(dims):
    """Every conv kind the report certifies is bounded (a chain without a 2-D conv had no report
    rows and was refused as 'not reached'), and eval-mode BatchNorm3d like the 1-D and 2-D ones."""
    torch.manual_seed(4)
    if dims == "transposed":
        convs = [nn.ConvTranspose2d(2, 3, 3, padding=1, bias=False), nn.ConvTranspose2d(3, 2, 3, padding=1, bias=False)]
        norm, shapes = nn.BatchNorm2d(3), [(2, 6, 6), (3, 6, 6)]
    else:
        conv, norm = (nn.Conv1d, nn.BatchNorm1d(3)) if dims == 1 else (nn.Conv3d, nn.BatchNorm3d(3))
        convs = [conv(2, 3, 3, padding=1, padding_mode="circular", bias=False),
                 conv(3, 2, 3, padding=1, padding_mode="circular", bias=False)]
        shapes = [(2, 8), (3, 8)] if dims == 1 else [(2, 4, 4, 4), (3, 4, 4, 4)]
    with torch.no_grad():
        norm.running_var.copy_(torch.tensor([0.5, 2.0, 4.0]))
        norm.weight.copy_(torch.tensor([1.0, -3.0, 0.5]))
    model = nn.Sequential(convs[0], norm, nn.ReLU(), convs[1]).double().eval()
    explicit = (matrix_norm(convs[0], shapes[0]) * 3 / math.sqrt(2.0 + norm.eps) * matrix_norm(convs[1], shapes[1]))
    example = torch.zeros(1, *shapes[0], dtype=torch.float64)
    bound = ev.lipschitz_bound(model, example)
    if dims == "transposed":  # zero-padded: a bound of the explicit product
        assert explicit * (1 - 1e-9) <= bound <= 2 * explicit
    else:  # circular, every size divisible by the stride: the exact product
        assert bound == pytest.approx(explicit, rel=1e-9)
    assert ev.lipschitz_bound(ttconv.convert(model), example) == pytest.approx(bound, rel=1e-6)
    if dims == 3:  # an orthogonal 3-D layer: max |S|, times the batch norm's
        layer = ttconv.SVDConv3d(3, 3, 3, padding=1, padding_mode="circular", core_kind="orthogonal", bias=False,
                                 max_singular_value=0.7).double()
        orthogonal = nn.Sequential(layer, norm).eval()
        example = torch.zeros(1, 3, 4, 4, 4, dtype=torch.float64)
        expected = matrix_norm(layer, (3, 4, 4, 4)) * 3 / math.sqrt(2.0 + norm.eps)
        assert ev.lipschitz_bound(orthogonal, example) == pytest.approx(expected, rel=1e-9)


def test_lipschitz_bound_of_batch_norm_and_pooling_against_explicit_operators():
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 4.0]))
        bn.weight.copy_(torch.tensor([1.0, -3.0, 0.5]))
    for module, expected in ((bn, 3 / math.sqrt(2.0 + bn.eps)), (nn.MaxPool2d(2), 1.0), (nn.AvgPool2d(2), 0.5)):
        model = nn.Sequential(module).eval()
        assert ev.lipschitz_bound(model, torch.zeros(1, 3, 4, 4)) == pytest.approx(expected, rel=1e-12)
        if not isinstance(module, nn.MaxPool2d):  # linear maps: the bound is their exact norm
            shift = model(torch.zeros(1, 3, 4, 4, dtype=torch.float64))
            norm = matrix_norm(lambda t: model(t) - shift, (3, 4, 4))
            assert norm == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.LeakyReLU(2.0), nn.LeakyReLU(0.1), nn.ELU(3.0), nn.Sigmoid(),
                                        nn.Tanh(), nn.Softplus()])
def test_activation_bounds_are_their_largest_slope(activation):
    grid = torch.linspace(-20, 20, 400001, dtype=torch.float64)
    values = activation(grid)
    slope = float(((values[1:] - values[:-1]) / (grid[1:] - grid[:-1])).abs().max())
    bound = ev.lipschitz_bound(nn.Sequential(activation).eval(), torch.zeros(1, 2, 1, 1))
    assert slope <= bound * (1 + 1e-9) and bound == pytest.approx(slope, rel=1e-3)


def test_lipschitz_bound_refuses_what_it_cannot_certify():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    example = torch.zeros(1, 2, 8, 8)
    with pytest.raises(TypeError, match="plain chain"):
        ev.lipschitz_bound(Residual().eval(), example)
    with pytest.raises(TypeError, match=r"'1' \(Residual\)"):
        ev.lipschitz_bound(nn.Sequential(nn.Conv2d(2, 2, 1), Residual()).eval(), example)
    with pytest.raises(TypeError, match="GELU"):
        ev.lipschitz_bound(nn.Sequential(nn.Conv2d(2, 2, 1), nn.GELU()).eval(), example)
    with pytest.raises(TypeError, match="MaxPool2d"):
        ev.lipschitz_bound(nn.Sequential(nn.MaxPool2d(3, stride=1)).eval(), example)
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        ev.lipschitz_bound(nn.Sequential(nn.Conv2d(2, 2, 1)), example)

    class Scaled(nn.Module):  # the lipschitz_bound() protocol
        def forward(self, x):
            return 4 * x

        def lipschitz_bound(self):
            return 4.0

    assert ev.lipschitz_bound(nn.Sequential(Scaled(), nn.ReLU()).eval(), example) == 4.0


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
def test_orthogonal_layers_bound_includes_their_padding(mode):
    """An orthogonal core's circular operator has norm ``max |S|``; padding other than zeros can
    make the layer's own operator larger (a padding map that copies pixels, circular rows
    repeated), so the bound is ``max |S|`` times the padding's factor, never ``max |S|`` alone:
    checked against the explicit operator (padding 2 on a 4x4 input, where the copies matter)."""
    torch.manual_seed(3)
    layer = ttconv.SVDConv(4, 4, 3, padding=2, padding_mode=mode, bias=False, core_kind="orthogonal",
                           dtype=torch.float64)
    model = nn.Sequential(layer).eval()
    bound = ev.lipschitz_bound(model, torch.zeros(1, 4, 4, 4, dtype=torch.float64))
    truth = matrix_norm(layer_operator(layer), (4, 4, 4))
    max_s = float(layer.effective_S().detach().abs().max())
    assert bound >= truth * (1 - 1e-12)
    # Per axis, by hand on a row of 4 padded by 2: circular 6 outputs over 4 rows (2 repeats), reflect
    # 2 1 [0 1 2 3] 2 1 and replicate 0 0 [0 1 2 3] 3 3 (3 copies); the factor is sqrt(copies^2).
    copies = {"zeros": 1, "circular": 2, "reflect": 3, "replicate": 3}[mode]
    assert bound == pytest.approx(max_s * (copies if mode != "zeros" else 1), rel=1e-12)


def test_a_module_registered_twice_counts_at_every_use():
    """``nn.Sequential(lin, relu, lin)`` applies ``lin`` twice: the bound is ``||W||^2``, not
    ``||W||``; a conv registered twice is refused (its bound depends on each call's input size)."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 6).double()
    model = nn.Sequential(linear, nn.ReLU(), linear).eval()
    norm = float(svdvals_cpu(linear.weight.detach())[0])
    assert ev.lipschitz_bound(model, torch.zeros(1, 6, dtype=torch.float64)) == pytest.approx(norm ** 2, rel=1e-12)
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False).double()
    with pytest.raises(ValueError, match="applied 2 times"):
        ev.lipschitz_bound(nn.Sequential(conv, nn.Identity(), conv).eval(), torch.zeros(1, 2, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("where", ["conv output", "relu output", "conv input", "root output", "nested output"])
def test_hooks_that_can_change_a_layer_are_refused_and_never_certified(where):
    """A forward hook (or pre-hook) can replace what a module computes: neither
    ``lipschitz_bound`` nor the report's chain product certifies such a model, with or without
    an example input. The reparametrization pre-hooks (``spectral_norm``) only recompute the
    kernel the bound reads: a chain with one is still certified, above the explicit norm."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.ReLU())
    model = nn.Sequential(inner, nn.Conv2d(2, 2, 3, padding=1, bias=False)).double().eval()
    target, hook = {
        "conv output": (inner[0], lambda m, i, o: o * 100.0),
        "relu output": (inner[1], lambda m, i, o: o * 100.0),
        "conv input": (model[1], None),
        "root output": (model, lambda m, i, o: o * 100.0),
        "nested output": (inner, lambda m, i, o: o * 100.0),
    }[where]
    if hook is None:
        target.register_forward_pre_hook(lambda m, args: (args[0] * 100.0,))
    else:
        target.register_forward_hook(hook)
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match="hook"):
        ev.lipschitz_bound(model, x)
    assert ttconv.spectral_report(model, x).lipschitz_bound is None
    assert ttconv.spectral_report(model).lipschitz_bound is None


def test_spectral_norm_pre_hooks_still_certify():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(2, 3, 3, padding=1, bias=False)), nn.ReLU(),
                          nn.Conv2d(3, 2, 3, padding=1, bias=False)).double()
    model(torch.randn(1, 2, 6, 6, dtype=torch.float64))  # one training-mode step of the power iteration
    model.eval()
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    explicit = matrix_norm(layer_operator(model[0]), (2, 6, 6)) * matrix_norm(layer_operator(model[2]), (3, 6, 6))
    bound = ev.lipschitz_bound(model, x)
    assert bound >= explicit * (1 - 1e-12)
    assert ttconv.spectral_report(model, x).lipschitz_bound is not None


def test_global_forward_hooks_block_the_certificate():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False)).double().eval()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(TypeError, match="global forward hooks"):
            ev.lipschitz_bound(model, torch.zeros(1, 2, 5, 5, dtype=torch.float64))
        assert ttconv.spectral_report(model, torch.zeros(1, 2, 5, 5, dtype=torch.float64)).lipschitz_bound is None
    finally:
        handle.remove()
    assert ev.lipschitz_bound(model, torch.zeros(1, 2, 5, 5, dtype=torch.float64)) > 0


# ----------------------------------------------------------------- empirical Lipschitz
def test_empirical_lipschitz_of_a_linear_model_is_its_spectral_norm():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double().eval()
    left = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64))[0]
    with torch.no_grad():  # singular values 3, 1.5, 1, 0.5, 0.2: power iteration converges like 0.5**k
        model[1].weight.copy_(left @ torch.diag(torch.tensor([3.0, 1.5, 1.0, 0.5, 0.2], dtype=torch.float64)) @ right.T)
    x = torch.randn(20, 3, 2, 2, dtype=torch.float64)
    loader = loader_of(x, torch.zeros(20).long(), batch=7)
    exact = float(torch.linalg.matrix_norm(model[1].weight.detach(), ord=2))
    frobenius = float(model[1].weight.detach().norm())
    assert frobenius > 1.1 * exact  # a Frobenius norm would fail the next line
    assert ev.empirical_lipschitz(model, loader, n_iter=40) == pytest.approx(exact, rel=1e-9)
    with_pairs = ev.empirical_lipschitz(model, loader, n_iter=40, pair_eps=0.5)
    assert with_pairs == pytest.approx(exact, rel=1e-9)
    assert_no_parameter_grads(model)


def test_empirical_lipschitz_grows_with_pairs_and_stays_below_the_certificate():
    torch.manual_seed(6)
    model = small_conv_net().double()
    x, y = torch.randn(32, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (32,))
    bound = ev.lipschitz_bound(model, x[:1])
    plain = ev.empirical_lipschitz(model, loader_of(x, y), n_iter=10)
    paired = ev.empirical_lipschitz(model, loader_of(x, y), n_iter=10, pair_eps=2.0)
    assert 0 < plain <= paired <= bound


# ----------------------------------------------------------------- margin loss
def test_margin_loss_by_hand_and_against_torch_multi_margin_loss():
    logits = torch.tensor([[2.0, 1.5, -1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    # hinge: [relu(1 - 0.5) + relu(1 - 3), relu(1 - 1) + relu(1 + 2)] = [0.5, 3]
    assert ev.margin_loss(logits, labels, 1.0, reduction="none").tolist() == [0.5, 3.0]
    assert float(ev.margin_loss(logits, labels, 1.0)) == pytest.approx(1.75)
    # KR terms: 2 - (1.5 - 1) / 2 = 1.75 and 1 - (0 + 3) / 2 = -0.5
    assert ev.margin_loss(logits, labels, 1.0, kr_weight=0.5, reduction="none").tolist() == \
        pytest.approx([0.5 - 0.875, 3.0 + 0.25])
    assert float(ev.margin_loss(logits, labels, 1.0, reduction="sum")) == pytest.approx(3.5)
    generator = torch.Generator().manual_seed(0)
    logits = seeded_randn(50, 6, generator=generator, dtype=torch.float64).requires_grad_()
    labels = seeded_randint(0, 6, (50,), generator=generator)
    ours = ev.margin_loss(logits, labels, 0.7, reduction="none")
    reference = 6 * F.multi_margin_loss(logits, labels, margin=0.7, reduction="none")  # it divides by C
    assert torch.allclose(ours, reference, atol=1e-12)
    ours.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # Zero exactly when every margin reaches min_margin.
    assert float(ev.margin_loss(torch.tensor([[2.0, 1.0, 0.5]]), torch.tensor([0]), 1.0)) == 0.0
    assert float(ev.margin_loss(torch.tensor([[2.0, 1.01, 0.5]]), torch.tensor([0]), 1.0)) > 0.0
    with pytest.raises(ValueError, match="min_margin"):
        ev.margin_loss(logits, labels, 0.0)
    with pytest.raises(ValueError, match="kr_weight"):
        ev.margin_loss(logits, labels, 1.0, kr_weight=-1)
    with pytest.raises(ValueError, match="reduction"):
        ev.margin_loss(logits, labels, 1.0, reduction="max")


# ----------------------------------------------------------------- spectra
def test_singular_value_histograms_against_explicit_operators(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                          nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular")).double()
    svd = ttconv.convert(model)
    example = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    values = [svdvals_cpu(operator_matrix(layer_operator(model[i]), (c, 6, 6))) for i, c in ((0, 2), (2, 3))]
    top = max(float(v.max()) for v in values) * 1.01
    for net in (model, svd):
        histograms = ev.singular_value_histograms(net, example, bins=12, range=(0.0, top))
        assert [h.name for h in histograms] == ["0", "2"]
        for item, exact in zip(histograms, values):
            counts, _ = np.histogram(exact.cpu().numpy(), bins=item.edges.cpu().numpy())  # min(c_out, c_in) * 36 values
            assert item.counts.tolist() == counts.tolist()
            assert item.largest == pytest.approx(float(exact.max()), rel=1e-9)
            assert int(item.counts.sum()) == min(model[int(item.name)].in_channels, model[int(item.name)].out_channels) * 36
    default = ev.singular_value_histograms(model, example, bins=5)
    assert all(h.counts.device.type == h.edges.device.type == "cpu" for h in default)
    assert float(default[0].edges[-1]) == pytest.approx(max(float(v.max()) for v in values), rel=1e-9)
    pytest.importorskip("matplotlib")
    ev.plot_singular_value_histograms(default, str(tmp_path / "spectra.png"))
    assert (tmp_path / "spectra.png").stat().st_size > 0
    logits, labels = torch.randn(30, 3), torch.randint(0, 3, (30,))
    ev.calibration_report(logits, labels).plot(str(tmp_path / "reliability.png"))
    assert (tmp_path / "reliability.png").stat().st_size > 0


def test_histogram_of_an_orthogonal_layer_is_a_spike_at_its_singular_values():
    layer = ttconv.SVDConv(4, 4, 3, padding=1, core_kind="orthogonal")
    with torch.no_grad():
        layer.set_singular_values_(torch.tensor([0.5, 0.5, 1.0, 1.0]))
    histograms = ev.singular_value_histograms(nn.Sequential(layer), torch.zeros(1, 4, 5, 5), bins=4, range=(0, 1.2))
    assert histograms[0].counts.tolist() == [0, 50, 0, 50]
    tiny = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(4), nn.Conv2d(4, 4, 3, padding=1))
    # '2' sees 2x2, below its kernel: the kernel folds modulo the size (as in spectral_report).
    histograms = ev.singular_value_histograms(tiny, torch.zeros(1, 4, 8, 8))
    assert [h.name for h in histograms] == ["0", "2"]
    from circular_oracle import circular_conv_any_size
    from oracle import operator_matrix
    folded = operator_matrix(circular_conv_any_size(tiny[2].weight.detach().double(), (1, 1), (1, 1), 1), (4, 2, 2))
    assert histograms[1].largest == pytest.approx(float(torch.linalg.matrix_norm(folded, ord=2)), rel=1e-5)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        ev.singular_value_histograms(nn.Sequential(nn.ReLU()), torch.zeros(1, 4, 5, 5))


def test_empirical_lipschitz_pairs_stay_below_the_constant_for_tiny_pairs_in_float32():
    """The difference quotient of a pair is evaluated in float64: in the float32 model, round-off
    in f(x') - f(x) exceeded the change itself for small pairs (a linear model with bias 5 gave
    1.24x its ||W|| at pair_eps=1e-6 and 6.1x at 3e-7)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    with torch.no_grad():
        model[1].bias.fill_(5.0)
    norm = float(svdvals_cpu(model[1].weight.detach().double())[0])
    data = [(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    for pair_eps in (1e-4, 1e-6, 3e-7):
        estimate = ev.empirical_lipschitz(model, data, n_iter=30, pair_eps=pair_eps)
        assert norm * (1 - 1e-3) <= estimate <= norm * (1 + 1e-6), pair_eps  # float32 Jacobian: ~1 ulp


def test_attacks_refuse_inputs_outside_clamp_and_labels_cross_entropy_cannot_take():
    """clamp is the range x lives in: normalised data with clamp=(0, 1) was moved 6.3 (not eps)
    and 'clean' accuracy at eps=0 came out 0.656 for a model right on every example."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x, y = torch.randn(5, 3, 2, 2) * 2, torch.randint(0, 3, (5,))
    for attack in (ev.fgsm, ev.pgd):
        with pytest.raises(ValueError, match=r"x lies outside clamp=\(0\.0, 1\.0\)"):
            attack(model, x, y, 0.01, clamp=(0, 1))
        assert float((attack(model, x, y, 0.01, clamp=None) - x).abs().max()) <= 0.01 + 1e-6
        for bad in (y.int(), y.bool()):
            with pytest.raises(ValueError, match="y must be an int64 tensor of labels"):
                attack(model, x, bad, 0.01)


def test_seeds_steps_and_bool_labels_are_checked_by_name():
    """A float seed was truncated silently and a str one failed in int(); FGSM ignored bad PGD
    options; bool labels reached gather()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    x, y = torch.rand(4, 1, 2, 2), torch.randint(0, 3, (4,))
    for seed in (1.5, "a", None, -1):
        with pytest.raises((TypeError, ValueError), match="seed must be an int >= 0"):
            ev.pgd(model, x, y, 0.1, seed=seed)
        with pytest.raises((TypeError, ValueError), match="seed must be an int >= 0"):
            ev.attack_accuracy(model, [(x, y)], 0.1, seed=seed)
    with pytest.raises(ValueError, match="steps must be"):
        ev.attack_accuracy(model, [(x, y)], 0.1, attack="fgsm", steps=-3)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        ev.certified_radius(torch.randn(4, 3), torch.ones(4, dtype=torch.bool), 1.0)
