"""The proof obligation of every certified bound, as a randomized property sweep.

For >= 2,000 layers drawn over everything ``nn.Conv2d`` accepts (every padding mode,
padding 0..k per axis plus 'same'/'valid', stride 1-3 with n divisible and not, dilation,
groups, rectangular kernels, n from the smallest size the layer accepts to 12, kernels
scaled 1e-20..1e20, float64 and float32, dense convs and SVDConvs) the explicit float64
matrix of the layer's real operator (``tests/oracle.py``) is the truth, and:

* every function called a bound is >= the truth (``fantastic_four_reshape_bounds`` each of the
  four, ``fantastic_four_bound``, ``spatial_gram_bound``, ``operator_norm_bound``), and
  ``gram_iteration_bound`` >= the exact circular norm it bounds;
* ``exact_spectral_norm`` equals the circular oracle (on inputs smaller than the kernel,
  the oracle of the tiled input, ``circular_oracle.py``: the kernel folds modulo n);
* the lower estimate ``power_iteration_estimate`` is <= the truth;
* nothing is NaN or infinite.

Tolerances, relative to the truth: float64 kernels 1e-9 (the oracle's own round-off is
~1e-15); float32 kernels 2e-5 (float32 arithmetic). Each bound also has a looseness
ceiling (its worst measured ratio to the truth plus 10%), so a bound made 10x looser fails.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any, Dict, List, Optional

import pytest
import torch
from torch import nn

from circular_oracle import circular_singular_values_any_size as _tiled_singular_values
from configs import PADDING_MODES
from oracle import circular_singular_values, layer_operator, operator_matrix
from ttconv import SVDConv, spectral_report, state_dict_report
from ttconv.bounds import (
    exact_spectral_norm,
    fantastic_four_bound,
    fantastic_four_reshape_bounds,
    gram_iteration_bound,
    operator_norm_bound,
    power_iteration_estimate,
    spatial_gram_bound,
)

COUNT = 2100
MAX_INPUT_NUMEL = 160  # c_in * n1 * n2: keeps the oracle's SVD small so the sweep runs in ~1 minute
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5}


def _axis_ok(mode: str, before: int, after: int, n: int, extent: int) -> bool:
    if n + before + after < extent:
        return False
    if mode == "circular":
        return max(before, after) <= n
    if mode == "reflect":
        return max(before, after) < n
    return True


def _padding_per_axis(padding: Any, kernel, dilation):
    if padding == "valid":
        return [(0, 0), (0, 0)]
    if padding == "same":
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    return [(p, p) for p in padding]


def layer_configs(count: int, seed: int, kernel_size: Optional[tuple] = None) -> List[Dict[str, Any]]:
    """Deterministic random layers with an input size the layer accepts (``kernel_size``
    fixes the kernel, else 1..4 per axis)."""
    rng = random.Random(seed)
    configs: List[Dict[str, Any]] = []
    while len(configs) < count:
        groups = rng.choice([1, 1, 1, 2, 3])
        c_in = groups * rng.randint(1, 3 if groups == 1 else 1)
        c_out = groups * rng.randint(1, 3)
        kernel = kernel_size or (rng.randint(1, 4), rng.randint(1, 4))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = rng.choice([(1, 1), (1, 1), (2, 2), (1, 2), (3, 1)])
        extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
        form = rng.choice(["int", "pair", "pair", "valid", "same"] if stride == (1, 1) else ["int", "pair", "pair", "valid"])
        most = kernel if kernel_size is None else [max(k, 2) for k in kernel]  # fixed 1x1: padding 0..2
        if form == "int":
            padding: Any = (rng.randint(0, max(most)),) * 2
        elif form == "pair":
            padding = (rng.randint(0, most[0]), rng.randint(0, most[1]))
        else:
            padding = form
        mode = rng.choice(PADDING_MODES)
        per_axis = _padding_per_axis(padding, kernel, dilation)
        n = []
        for axis in range(2):
            sizes = [m for m in range(1, 13) if _axis_ok(mode, *per_axis[axis], m, extent[axis])]
            if not sizes:
                break
            # Half the time a size the stride divides, else any accepted size.
            divisible = [m for m in sizes if m % stride[axis] == 0]
            n.append(rng.choice(divisible if divisible and rng.random() < 0.5 else sizes))
        if len(n) < 2 or c_in * n[0] * n[1] > MAX_INPUT_NUMEL:
            continue
        configs.append(dict(
            conv=dict(in_channels=c_in, out_channels=c_out, kernel_size=kernel, stride=stride,
                      padding=padding if isinstance(padding, str) else tuple(padding), dilation=dilation,
                      groups=groups, bias=False, padding_mode=mode),
            n=tuple(n),
            scale=10.0 ** rng.uniform(-20, 20),
            dtype=torch.float32 if rng.random() < 0.25 else torch.float64,
            svd=rng.random() < 0.2,
            rank=rng.choice([None, 1, 2]),
        ))
    return configs


def _build(config: Dict[str, Any]) -> nn.Module:
    if config["svd"]:
        layer = SVDConv(**config["conv"], rank=config["rank"], dtype=torch.float64)
        with torch.no_grad():
            layer.S.mul_(config["scale"])
            layer.U.add_(0.2 * torch.randn_like(layer.U))  # off the orthonormal manifold
    else:
        layer = nn.Conv2d(**config["conv"], dtype=torch.float64)
        with torch.no_grad():
            layer.weight.mul_(config["scale"])
    return layer


def _truths(layer: nn.Module, config: Dict[str, Any]):
    """Exact norms from the explicit float64 operator: the layer's own, and the circular conv's."""
    c, n = config["conv"], config["n"]
    real = float(torch.linalg.matrix_norm(operator_matrix(layer_operator(layer), (c["in_channels"], *n)), 2))
    circular = None
    divisible = all(m % s == 0 for m, s in zip(n, c["stride"]))
    extent = [d * (k - 1) + 1 for d, k in zip(c["dilation"], c["kernel_size"])]
    if divisible:
        weight = layer.dense_weight() if isinstance(layer, SVDConv) else layer.weight
        # Smaller than the kernel: the circular operator of the input tiled (the kernel folds mod n).
        oracle = circular_singular_values if all(m >= e for m, e in zip(n, extent)) else _tiled_singular_values
        circular = float(oracle(weight.detach(), n, c["stride"], c["dilation"], c["groups"])[0])
    return real, circular


CONFIGS = layer_configs(COUNT, seed=10)
# 1x1 layers take the single-matrix paths (exact, Gram, operator bound, Fantastic Four):
# every padding mode and amount 0..2, stride 1..3, groups, rectangular grids.
CONFIGS_1X1 = layer_configs(300, seed=11, kernel_size=(1, 1))
# Looseness ceilings: the worst ratio bound / truth measured on this sweep, plus 10%. The
# size-independent bounds are loosest at tiny inputs (n = 1..3), where the operator sees
# few taps; a bound made 10x looser fails here.
CEILINGS = {
    "fantastic_four_reshape_bounds": 27.7,   # measured 25.18
    "fantastic_four_bound": 22.1,    # measured 20.05
    "spatial_gram_bound": 16.5,      # measured 14.96 (n_iter=2)
    "operator_norm_bound": 7.2,      # measured 6.52 (reflect, n=2, stride 2)
}
CHUNKS = 7  # a few parametrized cases, each sweeping its share (one test id per layer is slow)


def _check(config: Dict[str, Any], worst: Dict[str, float]) -> List[str]:
    torch.manual_seed(0)
    dtype, n = config["dtype"], config["n"]
    target = _build(config).to(dtype)
    # The truth is the operator of the layer as given (float32 weights are already rounded).
    real, circular = _truths(copy.deepcopy(target).double(), config)
    tol = TOLERANCE[dtype]
    failures: List[str] = []

    def upper(name: str, value: Tensor_like, truth: float, ceiling: Optional[float] = None) -> None:
        value = float(value)
        ceiling = ceiling or CEILINGS[name.split("[")[0]]
        if not math.isfinite(value):
            failures.append(f"{name} is {value}")
        elif value < truth * (1 - tol):
            failures.append(f"{name} {value:.6g} < truth {truth:.6g}")
        elif truth > 0 and value > ceiling * truth:
            failures.append(f"{name} {value:.6g} is more than {ceiling}x the truth {truth:.6g}")
        elif truth > 0:
            worst[name] = max(worst.get(name, 0.0), value / truth)

    with torch.no_grad():
        for index, value in enumerate(fantastic_four_reshape_bounds(target)):
            upper(f"fantastic_four_reshape_bounds[{index}]", value, real)
        upper("fantastic_four_bound", fantastic_four_bound(target), real)
        upper("spatial_gram_bound", spatial_gram_bound(target, n_iter=2), real)
        upper("operator_norm_bound", operator_norm_bound(target, n), real)
        if circular is not None:
            # After t steps the bound is the Schatten 2^(t+1) norm of the worst frequency
            # matrix, at most rank^(2^-(t+1)) times its largest singular value: the exact ceiling.
            c = config["conv"]
            rank = min(c["out_channels"], c["in_channels"] * c["stride"][0] * c["stride"][1]) // c["groups"]
            upper("gram_iteration_bound", gram_iteration_bound(target, n, n_iter=3), circular,
                  ceiling=rank ** (1 / 16) * (1 + tol))
            exact = float(exact_spectral_norm(target, n))
            if not abs(exact - circular) <= 10 * tol * circular:
                failures.append(f"exact_spectral_norm {exact:.9g} != circular oracle {circular:.9g}")
        estimate = float(power_iteration_estimate(target, n, n_iter=8))
        # An SVDConv's core is formed in the layer's dtype: float32 round-off is allowed there.
        if not math.isfinite(estimate) or estimate > real * (1 + (tol if dtype == torch.float32 else 1e-12)):
            failures.append(f"power_iteration_estimate {estimate:.9g} > truth {real:.9g}")
    return failures


Tensor_like = Any


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_every_bound_holds_on_the_sweep(chunk):
    failures = []
    for index in range(chunk, len(CONFIGS), CHUNKS):
        for failure in _check(CONFIGS[index], {}):
            failures.append(f"config {index} {CONFIGS[index]['conv']} n={CONFIGS[index]['n']}: {failure}")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("chunk", range(2))
def test_every_bound_holds_on_the_one_by_one_sweep(chunk):
    failures = []
    for index in range(chunk, len(CONFIGS_1X1), 2):
        config = CONFIGS_1X1[index]
        for failure in _check(config, {}):
            failures.append(f"1x1 config {index} {config['conv']} n={config['n']}: {failure}")
    assert not failures, "\n".join(failures[:20])


def test_the_one_by_one_sweep_covers_what_it_claims():
    convs = [c["conv"] for c in CONFIGS_1X1]
    assert all(c["kernel_size"] == (1, 1) for c in convs)
    assert {c["padding_mode"] for c in convs} == set(PADDING_MODES)
    assert {p for c in convs if not isinstance(c["padding"], str) for p in c["padding"]} == {0, 1, 2}
    assert {s for c in convs for s in c["stride"]} == {1, 2, 3} and any(c["groups"] > 1 for c in convs)
    assert any(any(m % s for m, s in zip(cfg["n"], cfg["conv"]["stride"])) for cfg in CONFIGS_1X1)
    assert any(cfg["svd"] for cfg in CONFIGS_1X1) and any(cfg["dtype"] == torch.float32 for cfg in CONFIGS_1X1)


def test_the_sweep_covers_what_it_claims():
    assert len(CONFIGS) >= 2000
    convs = [c["conv"] for c in CONFIGS]
    assert {c["padding_mode"] for c in convs} == set(PADDING_MODES)
    assert any(c["padding"] == "same" for c in convs) and any(c["padding"] == "valid" for c in convs)
    # Circular padding beyond (k - 1) / 2 per side: the case that broke the old bounds.
    assert sum(c["padding_mode"] == "circular" and not isinstance(c["padding"], str)
               and 2 * c["padding"][0] > c["kernel_size"][0] - 1 for c in convs) > 100
    strided_not_divisible = [cfg for cfg in CONFIGS
                             if any(m % s for m, s in zip(cfg["n"], cfg["conv"]["stride"]))]
    assert len(strided_not_divisible) > 300
    assert any(c["dilation"] != (1, 1) for c in convs) and any(c["groups"] > 1 for c in convs)
    assert any(c["kernel_size"][0] != c["kernel_size"][1] for c in convs)
    scales = [cfg["scale"] for cfg in CONFIGS]
    assert min(scales) < 1e-18 and max(scales) > 1e18
    assert any(cfg["dtype"] == torch.float32 for cfg in CONFIGS) and any(cfg["svd"] for cfg in CONFIGS)


# ------------------------------------------------------------------ report columns
REPORT_CONFIGS = CONFIGS[::10]


def _zero_padded_within_k_minus_1(conv: Dict[str, Any]) -> bool:
    per_axis = _padding_per_axis(conv["padding"], conv["kernel_size"], conv["dilation"])
    return conv["padding_mode"] == "zeros" and all(
        max(pads) <= k - 1 for pads, k in zip(per_axis, conv["kernel_size"]))


@pytest.mark.parametrize("chunk", range(2))
def test_report_columns_hold_on_the_sweep(chunk):
    """Every report column called a bound (and the CLI, which prints these reports)."""
    failures = []
    for index in range(chunk, len(REPORT_CONFIGS), 2):
        config = REPORT_CONFIGS[index]
        torch.manual_seed(0)
        layer = _build(config).to(config["dtype"])
        real, circular = _truths(copy.deepcopy(layer).double(), config)
        tol = TOLERANCE[config["dtype"]]
        c = config["conv"]
        example = torch.zeros(1, c["in_channels"], *config["n"], dtype=config["dtype"])
        sized = spectral_report(nn.Sequential(layer), example).layers[0]
        unsized = spectral_report(nn.Sequential(layer)).layers[0]
        checks = [("FF min", sized.fantastic_four, real), ("upper own", sized.upper_bound, real),
                  ("upper own, no size", unsized.upper_bound, real), ("FF min, no size", unsized.fantastic_four, real)]
        if circular is not None and sized.gram is not None:
            checks.append(("Gram circ", sized.gram, circular))
        if _zero_padded_within_k_minus_1(c):
            # A state dict stores no geometry: its rows hold for any stride and zero padding up to k - 1.
            rows = state_dict_report({"conv." + k: v for k, v in layer.state_dict().items()}, config["n"]).layers
            checks += [("state dict upper", rows[0].upper_bound, real)]
        for name, value, truth in checks:
            if value is None or not math.isfinite(value) or value < truth * (1 - tol):
                failures.append(f"config {index} {c} n={config['n']}: {name} {value} < truth {truth}")
        if sized.power_estimate is not None and sized.power_estimate > real * (1 + tol):
            failures.append(f"config {index} {c}: power own {sized.power_estimate} > truth {real}")
        if circular is not None and sized.exact is not None and abs(sized.exact - circular) > 10 * tol * circular:
            failures.append(f"config {index} {c}: exact circ {sized.exact} != oracle {circular}")
    assert len(REPORT_CONFIGS) >= 200
    assert not failures, "\n".join(failures[:20])


def test_report_lipschitz_product_bounds_a_sequential_chain():
    torch.manual_seed(3)
    for padding_mode in PADDING_MODES:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=2, padding_mode=padding_mode, bias=False),
            nn.ReLU(),
            nn.Conv2d(3, 2, (2, 3), stride=(2, 1), padding=1, padding_mode=padding_mode, bias=False),
        ).double()
        n = (5, 6)
        linear = nn.Sequential(model[0], model[2])  # ReLU is 1-Lipschitz: bound the linear chain
        truth = float(torch.linalg.matrix_norm(operator_matrix(linear, (2, *n)), 2))
        product = spectral_report(model, torch.zeros(1, 2, *n, dtype=torch.float64)).upper_bound_product
        assert product >= truth * (1 - 1e-9), padding_mode
