"""Control on every conv kind: 1-D, 2-D and 3-D, plain and transposed, torch's and the SVD layers.

Every reference is an explicit float64 operator matrix built without ttconv
(``circular_oracle.circular_conv_any_size``, tiled circular convolution, any size):

* the norm is the largest singular value of the circular conv on the operator grid;
* the clip is the matrix clip itself: the operator's SVD with its singular values clamped,
  projected back onto the kernel's taps by least squares (the minimum-norm kernel change
  whose operator is nearest to the clipped one, ``torch.linalg.lstsq``), which is what
  Sedghi et al.'s per-frequency clip followed by the projection to the taps computes;
* a transposed layer's operator grid is ``s n`` for ``n`` inputs (the layer's output size for
  size-multiplying layers), and the first test checks, with ``F.conv_transpose{d}d``, that the
  circular transposed conv is the adjoint of the circular conv on that grid (so it has that
  conv's singular values).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttconv
from circular_oracle import circular_conv_any_size
from oracle import operator_matrix, svdvals_cpu
from ttconv import SpectralControl, clip_singular_values_, scale_to_spectral_norm_, spectral_norm

TORCH = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
         (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
SVD = {(1, False): ttconv.SVDConv1d, (2, False): ttconv.SVDConv2d, (3, False): ttconv.SVDConv3d,
       (1, True): ttconv.SVDConvTranspose1d, (2, True): ttconv.SVDConvTranspose2d,
       (3, True): ttconv.SVDConvTranspose3d}
KINDS = [(d, transposed, svd) for d in (1, 2, 3) for transposed in (False, True) for svd in (False, True)]


def _kind_id(kind):
    d, transposed, svd = kind
    return f"{'SVD' if svd else 'nn.'}Conv{'Transpose' if transposed else ''}{d}d"


# Per case: kernel size and dilation per number of axes, stride, groups, (c_in, c_out), the
# transposed layer's padding and output_padding, and the operator grid (a transposed layer's
# output size, from which its input size follows).
def _case(k, s, dil, g, c, pad, out_pad, grid):
    return dict(k=k, s=s, dil=dil, g=g, c=c, pad=pad, out_pad=out_pad, grid=grid)


CASES = {
    "plain": _case({1: (3,), 2: (3, 2), 3: (3, 3, 3)}, 1, 1, 1, (3, 2), 1, 0, {1: (8,), 2: (5, 4), 3: (4, 3, 3)}),
    "strided": _case({1: (3,), 2: (3, 3), 3: (3, 3, 3)}, 2, 1, 1, (2, 3), 1, 1, {1: (8,), 2: (6, 4), 3: (4, 4, 2)}),
    "strided_k4": _case({1: (4,), 2: (4, 4), 3: (4, 2, 2)}, 2, 1, 1, (2, 2), 1, 0,
                        {1: (8,), 2: (4, 6), 3: (4, 4, 2)}),
    "dilated": _case({1: (3,), 2: (3, 3), 3: (3, 3, 1)}, 1, {1: (2,), 2: (2, 1), 3: (2, 2, 1)}, 1, (2, 2), 2, 0,
                     {1: (7,), 2: (6, 4), 3: (5, 5, 2)}),
    "grouped": _case({1: (3,), 2: (3, 3), 3: (3, 2, 1)}, 1, 1, 2, (4, 4), 1, 0, {1: (6,), 2: (4, 4), 3: (3, 4, 2)}),
    "folded": _case({1: (5,), 2: (3, 3), 3: (3, 3, 3)}, 1, 1, 1, (2, 3), 2, 0,  # n < k
                    {1: (3,), 2: (2, 2), 3: (2, 2, 2)}),
    "folded_strided": _case({1: (5,), 2: (5, 3), 3: (5, 3, 3)}, 2, 1, 1, (2, 2), 2, 1,
                            {1: (2,), 2: (2, 2), 3: (2, 2, 2)}),
    "indivisible": _case({1: (3,), 2: (3, 3), 3: (3, 3, 3)}, 2, 1, 1, (2, 2), 1, 0,  # stride-1 operator
                         {1: (7,), 2: (5, 3), 3: (3, 3, 3)}),
    "unpadded": _case({1: (3,), 2: (3, 3), 3: (3, 3, 3)}, 1, 1, 1, (2, 3), 0, 0,  # output = input + 2
                      {1: (8,), 2: (5, 4), 3: (4, 4, 3)}),
}


def _make(kind, case, seed, rank=None):
    """The layer and its input size (the grid for a plain layer; for a transposed one the input
    whose output has the grid's size)."""
    d, transposed, svd = kind
    spec = CASES[case]
    k, grid = spec["k"][d], spec["grid"][d]
    stride = (spec["s"],) * d
    dilation = spec["dil"][d] if isinstance(spec["dil"], dict) else (spec["dil"],) * d
    c_in, c_out = spec["c"]
    # Padding does not enter the circular operator; it lets the example pass run below the kernel size.
    options = dict(stride=stride, padding=spec["pad"], dilation=dilation, groups=spec["g"], dtype=torch.float64)
    if transposed:
        n = []
        for g_a, s, dil, k_a in zip(grid, stride, dilation, k):
            numerator = g_a - 1 + 2 * spec["pad"] - dil * (k_a - 1) - spec["out_pad"]
            assert numerator % s == 0 and numerator >= 0, (case, d)
            n.append(numerator // s + 1)
        options.update(output_padding=spec["out_pad"])
    else:
        n = list(grid)
    torch.manual_seed(seed)
    cls = SVD[kind[:2]] if svd else TORCH[kind[:2]]
    extra = dict(rank=rank) if svd else {}
    return cls(c_in, c_out, k, **options, **extra), tuple(n)


def _weight(layer):
    """The conv kernel ``(A, B/groups, *k)``: torch's weight layout, also for transposed layers."""
    weight = layer.dense_weight() if hasattr(layer, "dense_weight") else layer.weight
    return weight.detach().to(torch.float64).clone()


def _grid(layer, n):
    """The operator grid, independently: the input size, or for a transposed layer ``s n`` (the
    circular transposed conv on ``n`` inputs is the adjoint of the strided circular conv on ``s n``)."""
    if not (getattr(layer, "transposed", False) or getattr(layer, "_transposed", False)):
        return tuple(n)
    with torch.no_grad():  # torch accepts the input (non-empty output)
        layer(torch.zeros(1, layer.in_channels, *n, dtype=torch.float64))
    return tuple(n_a * s for n_a, s in zip(n, layer.stride))


def _stride(layer, grid):
    return tuple(layer.stride) if all(a % s == 0 for a, s in zip(grid, layer.stride)) else (1,) * len(grid)


def _operator(weight, grid, stride, dilation, groups):
    c_in = weight.shape[1] * groups
    return operator_matrix(circular_conv_any_size(weight, stride, dilation, groups), (c_in, *grid))


def _oracle_norm(layer, n):
    grid = _grid(layer, n)
    return _layer_norm(layer, grid)


def _oracle_clip(layer, n, target):
    """The kernel after clipping the explicit operator's singular values at ``target`` and
    projecting back onto the taps (least squares, minimum-norm change)."""
    weight = _weight(layer)
    grid = _grid(layer, n)
    geometry = (grid, _stride(layer, grid), layer.dilation, layer.groups)
    # The SVD and the least squares run on the CPU in float64 (LAPACK; "gelsd" has no CUDA
    # kernel), whatever the test's device: the reference does not depend on the device's solvers.
    matrix = _operator(weight, *geometry).cpu()
    left, values, right = torch.linalg.svd(matrix, full_matrices=False)
    clipped = (left * values.clamp(max=target)) @ right
    units = torch.eye(weight.numel(), dtype=torch.float64).reshape(-1, *weight.shape)
    columns = torch.stack([_operator(unit, *geometry).flatten() for unit in units], dim=1).cpu()
    change = torch.linalg.lstsq(columns, (clipped - matrix).flatten()[:, None], driver="gelsd").solution
    return weight + change.reshape(weight.shape).to(weight.device)


def _parameters(layer):
    return [p.detach().clone() for p in layer.parameters()]


# ------------------------------------------------------------------ the oracle's correspondence
@pytest.mark.parametrize("d, stride, dilation, groups", [(1, 2, 1, 1), (2, 1, 2, 1), (2, 2, 1, 2), (3, 2, 1, 1)])
def test_circular_transposed_conv_is_the_adjoint_of_the_circular_conv(d, stride, dilation, groups):
    """With torch's own ``conv_transpose``: the circular transposed conv from ``N / s`` to ``N``
    (outputs wrapped modulo ``N``) is the transpose of the circular conv on ``N``, so their
    singular values agree; the tests below take the latter as the truth for transposed layers."""
    torch.manual_seed(d + stride)
    weight = torch.randn(2 * groups, 3, *(3,) * d, dtype=torch.float64)  # (in, out/groups, *k)
    grid = (4,) * d
    stride_, dilation_ = (stride,) * d, (dilation,) * d
    transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]

    def circular_transposed(x):
        full = transpose(x, weight, None, stride_, 0, 0, groups, dilation_)
        wrapped = torch.zeros(*full.shape[:2], *grid, dtype=full.dtype)
        for offsets in torch.cartesian_prod(*[torch.arange(0, size, g) for size, g in zip(full.shape[2:], grid)]
                                            ).reshape(-1, d).tolist():
            piece = full[(..., *(slice(o, o + g) for o, g in zip(offsets, grid)))]
            wrapped[(..., *(slice(0, s) for s in piece.shape[2:]))] += piece
        return wrapped

    adjoint = operator_matrix(circular_transposed, (2 * groups, *(g // stride for g in grid)))
    conv = _operator(weight, grid, stride_, dilation_, groups)
    assert torch.allclose(adjoint, conv.T, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ one layer of every kind
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS, ids=[_kind_id(k) for k in KINDS])
def test_every_kind_scale_clip_and_guarantee_against_the_explicit_operator(kind, case):
    if case == "unpadded" and not kind[1]:
        pytest.skip("padding does not enter a plain layer's circular operator (the 'plain' case)")
    layer, n = _make(kind, case, seed=sum(kind) * 31 + len(case), rank=None)
    truth = _oracle_norm(layer, n)
    if _stride(layer, _grid(layer, n)) == tuple(layer.stride):
        assert float(spectral_norm(layer, n).detach()) == pytest.approx(truth, rel=1e-10)
    else:  # no strided circular operator: the public norm refuses; control uses the stride-1 bound (below)
        with pytest.raises(ValueError, match="not divisible by stride"):
            spectral_norm(layer, n)

    # Within the target: nothing changes, bit for bit, and the norm is reported.
    before = _parameters(layer)
    assert scale_to_spectral_norm_(layer, 1.5 * truth, n) == pytest.approx(truth, rel=1e-10)
    assert clip_singular_values_(layer, 1.5 * truth, n) == pytest.approx(truth, rel=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(before, _parameters(layer)))

    # scale: exactly the target.
    scaled = copy.deepcopy(layer)
    target = 0.6 * truth
    assert scale_to_spectral_norm_(scaled, target, n) == pytest.approx(target, rel=1e-10)
    assert _oracle_norm(scaled, n) == pytest.approx(target, rel=1e-10)

    # clip: the matrix clip projected to the taps; the norm returned is the oracle's afterwards.
    target = 0.5 * truth
    expected = _oracle_clip(layer, n, target)
    clipped = copy.deepcopy(layer)
    reached = clip_singular_values_(clipped, target, n)
    assert torch.allclose(_weight(clipped), expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
    assert reached == pytest.approx(_oracle_norm(clipped, n), rel=1e-10)

    # clip_scale (SpectralControl's default) guarantees the target.
    model = nn.Sequential(copy.deepcopy(layer))
    example = torch.zeros(1, layer.in_channels, *n, dtype=torch.float64)
    control = SpectralControl(model, target, every=1, example_input=example)
    assert [size for *_, size in control.layers] == [_grid(layer, n)]
    reached = control.apply()["0"]
    assert reached <= target * (1 + 1e-9)
    assert _oracle_norm(model[0], n) == pytest.approx(reached, rel=1e-9)


@pytest.mark.parametrize("kind", [k for k in KINDS if k[2]], ids=[_kind_id(k) for k in KINDS if k[2]])
def test_low_rank_svd_layers_are_clipped_in_canonical_form_like_their_dense_kernel(kind):
    """A truncated SVD layer with drifted U is clipped on its core in orthonormal bases: the
    same kernel as the dense layer's clip, and the layer is left canonical."""
    layer, n = _make(kind, "strided", seed=5, rank=(1, 2))
    with torch.no_grad():
        layer.U.mul_(1.7)
        layer.S.div_(1.7)
    dense = layer.to_conv().double()
    target = 0.5 * _oracle_norm(layer, n)
    reached = clip_singular_values_(layer, target, n)
    clip_singular_values_(dense, target, n)
    assert torch.allclose(_weight(layer), _weight(dense), rtol=0, atol=1e-12)
    assert reached == pytest.approx(_oracle_norm(layer, n), rel=1e-10)
    eye = torch.eye(layer.U.shape[1], dtype=torch.float64)
    assert torch.allclose(layer.U.T @ layer.U, eye, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS, ids=[_kind_id(k) for k in KINDS])
def test_bad_input_sizes_are_refused_naming_the_argument(kind):
    layer, n = _make(kind, "plain", seed=0)
    with pytest.raises(TypeError, match="input_size"):
        spectral_norm(layer, (4,) * (kind[0] + 1))
    if kind[1]:  # a transposed layer whose output would be empty
        layer, _ = _make(kind, "unpadded", seed=0)
        layer.padding = (3,) * kind[0]
        with pytest.raises(ValueError, match="empty output"):
            clip_singular_values_(layer, 1.0, 1)


# ------------------------------------------------------------------ models
def _audio_net():
    return nn.Sequential(nn.Conv1d(2, 6, 5, padding=2), nn.ReLU(), nn.Conv1d(6, 6, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv1d(6, 4, 3, dilation=2, padding=2, groups=2), nn.ReLU(),
                         nn.Conv1d(4, 3, 1))


def _volume_net():
    return nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 4, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv3d(4, 2, (1, 3, 3), padding=(0, 1, 1)))


def _generator():
    return nn.Sequential(nn.ConvTranspose2d(4, 6, 4, 1, 0), nn.ReLU(),  # 1x1 -> 4x4 (DCGAN's first layer)
                         nn.ConvTranspose2d(6, 4, 4, 2, 1), nn.ReLU(),  # 4x4 -> 8x8
                         nn.ConvTranspose2d(4, 3, 3, 2, 1, output_padding=1))  # 8x8 -> 16x16


MODELS = {"audio-1d": (_audio_net, (1, 2, 16)), "volume-3d": (_volume_net, (1, 1, 6, 6, 6)),
          "generator": (_generator, (1, 4, 1, 1))}


def _recorded_grids(model, example):
    grids = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) or hasattr(module, "dense_weight"):
            def record(module, inputs, output, name=name):
                transposed = getattr(module, "transposed", False) or getattr(module, "_transposed", False)
                d = len(module.kernel_size)
                seen = tuple(inputs[0].shape[-d:])
                grids[name] = tuple(n * s for n, s in zip(seen, module.stride)) if transposed else seen
            hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    return grids


def _layer_norm(layer, grid):
    """The circular operator's norm on ``grid``: its largest singular value (the oracle's SVD, on the CPU)."""
    matrix = _operator(_weight(layer), grid, _stride(layer, grid), layer.dilation, layer.groups)
    return float(svdvals_cpu(matrix)[0])


@pytest.mark.parametrize("form", ["dense", "svd"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_spectral_control_keeps_every_layer_of_a_model_within_the_target(model_name, form):
    make, shape = MODELS[model_name]
    torch.manual_seed(3)
    model = make().double()
    if form == "svd":
        model = ttconv.convert(model)
        assert sum(hasattr(m, "dense_weight") for m in model.modules()) >= 3
    example = torch.randn(*shape, dtype=torch.float64)
    grids = _recorded_grids(model, example)
    modules = dict(model.named_modules())
    norms = {name: _layer_norm(modules[name], grid) for name, grid in grids.items()}
    target = 0.5 * min(norms.values())
    control = SpectralControl(model, target, every=1, example_input=example)
    assert {name: size for name, _, size in control.layers} == grids
    untouched = copy.deepcopy(model)
    reached = control.step()
    for name, grid in grids.items():  # recomputed from the weights, independently
        after = _layer_norm(modules[name], grid)
        assert after <= target * (1 + 1e-9), name
        assert reached[name] == pytest.approx(after, rel=1e-9)
    # A target above every norm leaves the model as it is, bit for bit.
    control = SpectralControl(untouched, 2 * max(norms.values()), every=1, example_input=example)
    kept = copy.deepcopy(untouched)
    control.apply()
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), untouched.state_dict().values()))
    # The regularizers: 'exact' is the sum of the squared oracle norms; the Fantastic Four
    # bounds hold every circular norm, so their sum of squares is at least that; both reach
    # every layer's parameters.
    exact = control.regularizer("exact")
    layers = dict(untouched.named_modules())
    assert float(exact.detach()) == pytest.approx(sum(_layer_norm(layers[name], grid) ** 2
                                                      for name, grid in grids.items()), rel=1e-9)
    bound = control.regularizer("fantastic_four")
    assert float(bound.detach()) >= float(exact.detach()) * (1 - 1e-9)
    (exact + bound).backward()
    for name in grids:
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0)
                   for p_name, p in layers[name].named_parameters() if p_name != "bias"), name


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("svd", [False, True], ids=["torch", "svd"])
def test_read_only_norm_answers_where_the_transposed_output_is_empty(d, svd):
    """``ttconv.spectral_norm`` is the value of ``layer.spectral_norm`` and
    ``bounds.exact_spectral_norm`` on every size they answer (the circular operator exists
    whatever the padding); only the control steps refuse a size torch's layer cannot take."""
    from ttconv.bounds import exact_spectral_norm

    layer, _ = _make((d, True, svd), "unpadded", seed=0)
    layer.padding = (3,) * d
    expected = float(exact_spectral_norm(layer, 1))
    assert float(spectral_norm(layer, 1)) == pytest.approx(expected, rel=1e-9)
    if svd:
        assert float(layer.spectral_norm(1)) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="empty output"):
        clip_singular_values_(layer, 1.0, 1)
