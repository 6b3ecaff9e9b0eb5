"""The cost model behind ``path='auto'``: which forward path of an SVD conv is cheaper.

An SVD conv can run ``'dense'`` (compose ``W = U diag(S) core V^T``, then one conv) or
``'factored'`` (three convs: ``V`` 1x1, the core, ``U`` 1x1; two channel mixings for a 1x1
layer); an orthogonal core also ``'separable'`` (its dense kernel's two halves as two convs,
``separable_cost`` below). All compute the same function; which is faster depends on the
ranks, the kernel and the input shape. The model adds, in multiply-add units:

* the multiply-adds of each path (``flop_costs``), building its kernels included
  (``build_costs``: an orthogonal core is built from its BCOP blocks on both paths);
* ``element`` per tensor element read or written (``path_elements``: maps with few
  channels are memory-bound);
* ``mixing_call`` per 1x1 channel mixing (the factored path makes two, the dense path of a
  1x1 layer one): on CPU a small 1x1 conv costs far more than its multiply-adds;
* ``compose`` for composing the dense kernel (the dense path, on every call).

Both paths run the same number of k x k convolutions, so their call overhead cancels.
When the call will be differentiated (grad mode on and the input or a parameter requires
grad) the multiply-adds count three times (forward, input and weight gradients), less the
first operation's input gradient when the input does not require one (a model's first
layer: the dense path then skips its whole conv's, the factored path only its first
mixing's), and the training constants apply (backward through composing the kernel and
through each mixing is several more calls). The constants are fitted on per-layer timings
of both paths on every conv of the real-shape models (``benchmarks/bench_path_calibration.py
--fit``, one CPU thread), which ``tests/test_forward_path.py`` holds the model to.
Deterministic: nothing is timed at run time.

Works on any object with the layer's geometry (``ranks``, ``groups``, ``kernel_size``,
``stride``, ``_dims``, ``_transposed``, ``_weight_channels()``, ``_output_size()``,
``_is_pointwise()``): the SVD conv layers of ``ttconv.layer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ._compile import compiling
from ._typing import ForwardPath


@dataclass(frozen=True)
class PathConstants:
    """Costs in multiply-add units: per tensor element, per 1x1 mixing call, for composing;
    and what one multiply-add of the separable path's two convolutions (taps along one
    part of the axes each) costs against one of a dense ``k x k`` conv."""

    element: float
    mixing_call: float
    compose: float
    separable_conv: float = 1.0


INFERENCE = PathConstants(element=5, mixing_call=1_400_000, compose=50_000, separable_conv=1.5)
TRAINING = PathConstants(element=24, mixing_call=1_500_000, compose=50_000, separable_conv=1.2)

_CACHE_SIZE = 64


def pixel_costs(layer: Any) -> Tuple[int, int, int]:
    """Multiply-adds ``(dense per output pixel, factored per input pixel, factored per output
    pixel)``; building the kernels, once per call, is ``build_costs``."""
    r_out, r_in = layer.ranks
    g, taps = layer.groups, math.prod(layer.kernel_size)
    rows, cols = layer._weight_channels()
    dense = rows * (cols // g) * taps
    if layer._is_pointwise():  # the factored path folds the core into U: two channel mixings
        return dense, cols * r_in, rows * r_in
    return dense, cols * r_in, g * r_out * r_in * taps + rows * r_out


def _bcop_macs(kernel_size: Tuple[int, ...], r: int, inputs: int, outputs: Optional[int] = None,
               folded: int = 0, join: bool = True) -> int:
    """Multiply-adds of ``ttconv.orthogonal.bcop_kernel`` for one group, less the exponential
    (sized to the generator's norm, the same on every path): ``H[:, :folded] @ inputs`` when
    a matrix is folded in, the blocks' projectors, each block's product with the taps built
    so far (``inputs`` columns), and with ``outputs`` the last axis's blocks composed onto it
    and (``join``; not for ``bcop_halves``) the one product that joins the halves."""
    d = len(kernel_size)
    blocks = [axis for axis, k in enumerate(kernel_size) for _ in range(k - 1)]
    macs = len(blocks) * r * (r // 2) * r + r * folded * inputs  # projectors Q Q^T; H[:, :m] @ inputs
    last = d - 1 if outputs is not None else d
    sizes = [1] * d
    for axis in blocks:
        if axis < last:
            macs += math.prod(sizes) * r * r * inputs
            sizes[axis] += 1
    if outputs is None:
        return macs
    taps = 1
    for axis in blocks:
        if axis == last:
            macs += taps * outputs * r * r
            taps += 1
    return macs + (taps * outputs * r * inputs * math.prod(sizes) if join else 0)


def build_costs(layer: Any) -> Tuple[int, int]:
    """Multiply-adds of building each path's kernels, once per call: ``(dense, factored)``.

    A general core: composing the dense kernel (the dense path); the factored path uses the
    factors as they are. An orthogonal core (``core_kind='orthogonal'``) is built from its BCOP
    blocks on both paths: the factored path builds the ``r x r`` core, the dense path folds
    ``V^T`` and ``U S`` into the blocks (``SVDConv.dense_weight``, from ``2 r_in >= c_in/g``)
    or composes the built core like a general one. The QRs and the exponential, the same on
    both paths, are left out."""
    r_out, r_in = layer.ranks
    g, taps = layer.groups, math.prod(layer.kernel_size)
    rows, cols = layer._weight_channels()
    in_g = cols // g
    compose = g * r_out * r_in * taps * in_g + rows * r_out * in_g * taps
    # A 1x1 layer's factored path folds the core into U: (U S) @ core.
    fold = rows * r_out * r_in if layer._is_pointwise() else 0
    if getattr(layer, "core_kind", "general") != "orthogonal":
        return compose, fold
    r = max(r_out, r_in)
    core = g * _bcop_macs(layer.kernel_size, r, r)
    if 2 * r_in >= in_g:
        return g * _bcop_macs(layer.kernel_size, r, in_g, outputs=rows // g, folded=r_in), core + fold
    return core + compose, core + fold


def _batch_and_size(layer: Any, input_shape: Tuple[int, ...]) -> Tuple[int, Tuple[int, ...]]:
    """The batch (1 when unbatched) and the spatial size of an input shape."""
    d = layer._dims
    return (input_shape[0] if len(input_shape) == d + 2 else 1), tuple(input_shape[-d:])


def _pixels(layer: Any, input_shape: Tuple[int, ...]) -> Tuple[int, int]:
    """Input and output positions of a (batched or unbatched) input, batch included."""
    batch, size = _batch_and_size(layer, input_shape)
    return batch * math.prod(size), batch * math.prod(layer._output_size(size))


def flop_costs(layer: Any, input_shape: Tuple[int, ...]) -> Tuple[int, int]:
    """Multiply-adds of the ``(dense, factored)`` paths (see ``SVDConv.flop_costs``)."""
    in_pixels, out_pixels = _pixels(layer, input_shape)
    dense, factored_in, factored_out = pixel_costs(layer)
    dense_build, factored_build = build_costs(layer)
    if layer._transposed:
        # The adjoint of a conv from out_channels to in_channels: the kernel taps and the
        # core run at input resolution, U^T on the input, V on the output.
        in_pixels, out_pixels = out_pixels, in_pixels
    return (dense_build + out_pixels * dense,
            factored_build + in_pixels * factored_in + out_pixels * factored_out)


def path_elements(layer: Any, input_shape: Tuple[int, ...]) -> Tuple[int, int]:
    """Tensor elements the ``(dense, factored)`` paths read and write: the input, the
    output and, for the factored path, each hidden map twice (written, then read)."""
    in_pixels, out_pixels = _pixels(layer, input_shape)
    r_out, r_in = layer.ranks
    g = layer.groups
    dense = in_pixels * layer.in_channels + out_pixels * layer.out_channels
    # Hidden maps: after the first mixing (input resolution) and after the core (output
    # resolution); the rank on each side is r_in / r_out for a conv, r_out / r_in transposed.
    first, second = (r_out, r_in) if layer._transposed else (r_in, r_out)
    if layer._is_pointwise():
        return dense, dense + 2 * in_pixels * g * first
    return dense, dense + 2 * in_pixels * g * first + 2 * out_pixels * g * second


def _first_operation_macs(layer: Any, input_shape: Tuple[int, ...]) -> Tuple[int, int]:
    """Multiply-adds of each path's first operation on the input: the dense conv (composing
    the kernel left out), the factored path's first channel mixing (``V^T``; ``U^T`` for a
    transposed layer)."""
    dense_macs, _ = flop_costs(layer, input_shape)
    in_pixels, _ = _pixels(layer, input_shape)
    r_out, r_in = layer.ranks
    return dense_macs - build_costs(layer)[0], in_pixels * layer.in_channels * (r_out if layer._transposed else r_in)


def path_costs(layer: Any, input_shape: Tuple[int, ...], *, backward: bool = False,
               input_requires_grad: bool = True) -> Tuple[float, float]:
    """Modelled cost of the ``(dense, factored)`` paths, in multiply-add units: the forward,
    or with ``backward=True`` forward plus backward (three times the multiply-adds, less the
    first operation's input gradient when ``input_requires_grad`` is false)."""
    dense_macs, factored_macs = flop_costs(layer, input_shape)
    if backward:
        dense_macs, factored_macs = 3 * dense_macs, 3 * factored_macs
        if not input_requires_grad:
            dense_first, factored_first = _first_operation_macs(layer, input_shape)
            dense_macs, factored_macs = dense_macs - dense_first, factored_macs - factored_first
    constants = TRAINING if backward else INFERENCE
    dense_elements, factored_elements = path_elements(layer, input_shape)
    dense_mixings = 1 if layer._is_pointwise() else 0
    dense = dense_macs + constants.element * dense_elements + constants.mixing_call * dense_mixings + constants.compose
    factored = factored_macs + constants.element * factored_elements + constants.mixing_call * 2
    return dense, factored


def cheaper_path(layer: Any, input_shape: Tuple[int, ...], *, backward: bool = False,
                 input_requires_grad: bool = True) -> ForwardPath:
    """``'dense'``, ``'factored'`` or (orthogonal cores) ``'separable'``, whichever
    ``path_costs`` and ``separable_cost`` model as cheapest (ties to the earlier)."""
    dense_cost, factored_cost = path_costs(layer, input_shape, backward=backward,
                                           input_requires_grad=input_requires_grad)
    path: ForwardPath = "dense" if dense_cost <= factored_cost else "factored"
    separable = separable_cost(layer, input_shape, backward=backward, input_requires_grad=input_requires_grad)
    if separable is not None and separable < min(dense_cost, factored_cost):
        path = "separable"
    return path


def remembered_path(layer: Any, input: Tensor) -> ForwardPath:
    """``cheaper_path`` for this input, remembered per input shape, differentiation regime
    and geometry on the layer (evaluating the model takes ~30 us, a tenth of a small
    layer's forward)."""
    backward = torch.is_grad_enabled() and (
        input.requires_grad or any(p is not None and p.requires_grad for p in layer._parameters.values()))
    input_requires_grad = bool(input.requires_grad)
    if compiling():  # traced once per shape anyway; dynamo before torch 2.13 cannot trace the cache
        return cheaper_path(layer, tuple(input.shape), backward=backward, input_requires_grad=input_requires_grad)
    key = (tuple(input.shape), backward, input_requires_grad, layer.stride, layer.padding, layer.dilation,
           layer.ranks)
    cache: Dict[Any, ForwardPath] = layer.__dict__.setdefault("_auto_paths", {})
    path = cache.get(key)
    if path is None:
        if len(cache) >= _CACHE_SIZE:  # inputs of ever-changing shapes: keep it bounded
            cache.clear()
        path = cache[key] = cheaper_path(layer, tuple(input.shape), backward=backward,
                                         input_requires_grad=input_requires_grad)
    return path


def separable_applies(layer: Any) -> bool:
    """Whether the layer has the ``'separable'`` path: an orthogonal core."""
    return getattr(layer, "core_kind", "general") == "orthogonal"


def _hidden_pixels(layer: Any, input_shape: Tuple[int, ...]) -> int:
    """Positions of the separable path's hidden map, batch included: the output's size on the
    axes the first conv runs along and the input's on the others (every axis but the last
    for a conv, the last for a transposed conv, which runs the last axis's adjoint first);
    a conv whose kernel has one tap along the last axis strides and pads it in the first
    conv too."""
    batch, size = _batch_and_size(layer, input_shape)
    out = layer._output_size(size)
    if layer._transposed:
        return batch * math.prod((*size[:-1], out[-1]))
    if layer.kernel_size[-1] == 1:  # the first conv takes the last axis's stride and padding too
        return batch * math.prod(out)
    return batch * math.prod((*out[:-1], size[-1]))


def separable_flops(layer: Any, input_shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    """Multiply-adds of the ``'separable'`` path: ``(build, first conv, second conv)``. Building
    the halves (``bcop_halves``: ``bcop_kernel`` less the joining product), then a conv with
    the taps of every axis but the last (``B/g -> r`` per group) and one with the last axis's
    (``r -> A/g``); a transposed layer runs their adjoints in the reverse order, each costing
    its input positions times its kernel."""
    r_out, r_in = layer.ranks
    r, g, k = max(r_out, r_in), layer.groups, layer.kernel_size
    rows, cols = layer._weight_channels()
    (inputs, out), hidden = _pixels(layer, input_shape), _hidden_pixels(layer, input_shape)
    build = g * _bcop_macs(k, r, cols // g, outputs=rows // g, folded=r_in, join=False)
    other_axes, last_axis = g * r * (cols // g) * math.prod(k[:-1]), rows * r * k[-1]
    if layer._transposed:
        return build, inputs * last_axis, hidden * other_axes
    return build, hidden * other_axes, out * last_axis


def separable_cost(layer: Any, input_shape: Tuple[int, ...], *, backward: bool = False,
                   input_requires_grad: bool = True) -> Optional[float]:
    """Modelled cost of the ``'separable'`` path in ``path_costs``' units (``None`` where the
    layer has no such path): its multiply-adds (the convolutions' weighted by
    ``separable_conv``: convolving along some axes only runs at a lower rate than a
    ``k x k`` conv), the hidden map written and read, composing, and one call more than the
    dense path (charged as a channel mixing's)."""
    if not separable_applies(layer):
        return None
    constants = TRAINING if backward else INFERENCE
    build, first_macs, second_macs = separable_flops(layer, input_shape)
    first, second = first_macs * constants.separable_conv, second_macs * constants.separable_conv
    macs = build + first + second
    if backward:
        macs = 3 * macs - (0 if input_requires_grad else first)
    hidden = _hidden_pixels(layer, input_shape)
    elements = path_elements(layer, input_shape)[0] + 2 * hidden * layer.groups * max(layer.ranks)
    return macs + constants.element * elements + constants.mixing_call + constants.compose


def dense_is_cheaper_per_pixel(layer: Any) -> bool:
    """For a ``torch.fx`` trace (symbolic shapes): per output pixel, leaving out composing
    the kernel (the input has ``prod(stride)`` pixels per output pixel; transposed: per
    input pixel, which has ``prod(stride)`` output pixels)."""
    dense, factored_in, factored_out = pixel_costs(layer)
    return dense <= math.prod(layer.stride) * factored_in + factored_out
