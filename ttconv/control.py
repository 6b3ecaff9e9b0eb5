"""Keeping singular values in check during training.

In-place operations for one layer (``SVDConv`` on its small core, ``nn.Conv2d`` with the
dense FFT), all under ``torch.no_grad`` and keeping parameter identity so optimizer state
stays attached:

* :func:`scale_to_spectral_norm_` divides the kernel by ``sigma_max / max_value`` when it
  exceeds ``max_value``: exact.
* :func:`clip_singular_values_` clips every per-frequency singular value (Sedghi et al.
  2019) and projects the result back to the kernel's support: *approximate*, the
  projection can push the norm back above the target; the norm actually reached is
  returned.
* ``SVDConv.canonicalize_()`` restores orthonormal ``U``, ``V`` (function unchanged).

:class:`SpectralControl` applies them to a whole model every ``every`` optimizer steps and
provides differentiable regularizers. The spectral norm controlled is that of the circular
convolution at each layer's input size (learnt by one hooked forward pass); for a strided
layer whose input size is not divisible by the stride, the stride-1 norm (an upper bound)
is used instead.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._precision import full_precision
from . import _conv_args as args
from ._hooks import find_conv_layers, record_input_sizes
from .bounds import fantastic_four_bound
from .layer import SVDConv
from .spectra import check_spectral_input_size, conv_spectral_norm, dilate_kernel, spectral_dtype
from .tt import canonicalize, orthonormality_error

__all__ = ["clip_singular_values_", "scale_to_spectral_norm_", "spectral_norm", "SpectralControl"]

ConvLayer = Union[nn.Conv2d, SVDConv]


def _check_layer(layer: Any) -> None:
    if not isinstance(layer, (nn.Conv2d, SVDConv)):
        raise TypeError(f"layer must be an nn.Conv2d or SVDConv, got {type(layer).__name__}")


def _check_max_value(max_value: Any) -> float:
    return args.positive_finite(max_value, "max_value")


def _kernel(layer: ConvLayer) -> Tensor:
    """The kernel whose circular operator has the layer's nonzero singular values."""
    return layer.orthonormal_core() if isinstance(layer, SVDConv) else layer.weight.to(spectral_dtype(layer.weight.dtype))


def _effective_stride(layer: ConvLayer, n: Tuple[int, int]) -> Tuple[int, int]:
    # The strided operator needs n divisible by the stride; otherwise fall back to the
    # stride-1 operator, whose norm bounds the strided one.
    return layer.stride if all(a % s == 0 for a, s in zip(n, layer.stride)) else (1, 1)


@full_precision
def spectral_norm(layer: ConvLayer, input_size: Any) -> Tensor:
    """Exact circular spectral norm of a layer at ``input_size`` (differentiable, 0-D).

    For a strided layer with ``input_size`` not divisible by the stride, the stride-1 norm
    (an upper bound of the strided one).
    """
    _check_layer(layer)
    n = args.input_size_arg(input_size)
    if _is_orthogonal(layer):  # exactly max |S| for every stride and size: O(r)
        return layer.effective_S().to(spectral_dtype(layer.S.dtype)).abs().max()
    return conv_spectral_norm(_kernel(layer), n, stride=_effective_stride(layer, n), dilation=layer.dilation,
                              groups=layer.groups)


@torch.no_grad()
@full_precision
def scale_to_spectral_norm_(layer: ConvLayer, max_value: float, input_size: Any) -> float:
    """Divide the kernel by ``sigma_max / max_value`` if ``sigma_max > max_value`` (exact).

    For an ``SVDConv`` only ``S`` is scaled (canonical form preserved). Returns the
    spectral norm after the operation; parameters are updated in place.
    """
    max_value = _check_max_value(max_value)
    sigma = float(spectral_norm(layer, input_size))
    if sigma <= max_value:
        return sigma
    factor = max_value / sigma
    if _is_orthogonal(layer):
        layer.set_singular_values_(layer.effective_S() * factor)
    else:
        (layer.S if isinstance(layer, SVDConv) else layer.weight).mul_(factor)
    return sigma * factor


def _is_orthogonal(layer: ConvLayer) -> bool:
    return isinstance(layer, SVDConv) and layer.core_kind == "orthogonal"


def _clip_kernel(kernel: Tensor, n: Tuple[int, int], max_value: float, dilation: Tuple[int, int],
                 groups: int) -> Tensor:
    """Sedghi clip of a stride-1 circular conv, projected back to the (dilated) kernel support."""
    kh, kw = kernel.shape[-2:]
    dilated = dilate_kernel(kernel, dilation)
    grouped = dilated.reshape(groups, -1, *dilated.shape[1:])
    transfer = torch.fft.fft2(grouped, s=n).permute(0, 3, 4, 1, 2)  # (g, n1, n2, o, i)
    left, values, right = torch.linalg.svd(transfer, full_matrices=False)
    clipped = (left * values.clamp(max=max_value).to(left.dtype).unsqueeze(-2)) @ right
    spatial = torch.fft.ifft2(clipped.permute(0, 3, 4, 1, 2), dim=(-2, -1)).real
    support = spatial[..., : dilation[0] * (kh - 1) + 1: dilation[0], : dilation[1] * (kw - 1) + 1: dilation[1]]
    return support.reshape(kernel.shape)


@torch.no_grad()
@full_precision
def clip_singular_values_(layer: ConvLayer, max_value: float, input_size: Any, *, n_iter: int = 1) -> float:
    """Clip the layer's singular values at ``max_value`` (Sedghi et al. 2019); approximate.

    Per frequency of the stride-1 circular operator on ``input_size``, singular values
    above ``max_value`` are clipped; the kernel with full ``n1 x n2`` support that results
    is projected back to the layer's ``kh x kw`` support, which is *not* exact: the norm
    can end above ``max_value`` (alternating ``n_iter`` times converges slowly; follow
    with :func:`scale_to_spectral_norm_` for a guarantee). An ``SVDConv`` is
    canonicalised first and clipped on its ``r_out x r_in`` core. With
    ``core='orthogonal'`` the clip is exact and costs ``O(r)``: ``S`` are clamped.

    Returns
    -------
    float
        The exact spectral norm actually reached (as :func:`spectral_norm`).
    """
    _check_layer(layer)
    max_value = _check_max_value(max_value)
    n_iter = args.positive_int(n_iter, "n_iter")
    n = check_spectral_input_size(input_size, layer.kernel_size, (1, 1), layer.dilation)
    if _is_orthogonal(layer):
        # S are the singular values: clipping them is exact and O(r).
        values = layer.effective_S()
        layer.set_singular_values_(values.sign() * values.abs().clamp(max=max_value))
        return float(spectral_norm(layer, n))
    if isinstance(layer, SVDConv):
        layer.canonicalize_()
        work = spectral_dtype(layer.U.dtype)
        kernel = (layer.S[:, None, None, None] * layer.core).to(work)
    else:
        kernel = layer.weight.to(spectral_dtype(layer.weight.dtype))
    for _ in range(n_iter):
        kernel = _clip_kernel(kernel, n, max_value, layer.dilation, layer.groups)
    if isinstance(layer, SVDConv):
        ones = torch.ones_like(layer.S, dtype=kernel.dtype)
        factors = canonicalize(layer.U.to(kernel.dtype), ones, kernel, layer.V.to(kernel.dtype), layer.groups)
        layer._copy_factors(factors)
    else:
        layer.weight.copy_(kernel)
    return float(spectral_norm(layer, n))


class SpectralControl:
    """Keep every conv's spectral norm at most ``max_value`` during training.

    Call :meth:`step` after each ``optimizer.step()``; every ``every`` calls it runs
    :meth:`apply`: for each ``SVDConv`` whose ``U`` or ``V`` drifted from orthonormality by
    more than ``orthonormality_tol`` it calls ``canonicalize_()``; then every layer whose
    exact norm exceeds ``max_value`` is scaled (``mode='scale'``, exact) or clipped
    (``mode='clip'``, approximate). Layers within the target are left bit-for-bit untouched.

    Parameters
    ----------
    model : nn.Module
        Holds ``SVDConv`` and/or ``nn.Conv2d`` layers (DDP/DataParallel looked through).
    max_value : float
        Target spectral norm, > 0.
    every : int
        Control period in optimizer steps, >= 1.
    mode : {'scale', 'clip'}
    example_input : Tensor or tuple
        One forward pass on it records every layer's input size (a size smaller than the
        layer's dilated kernel is raised to the kernel's extent).
    orthonormality_tol : float
        Drift of ``U``, ``V`` that triggers ``canonicalize_()`` in a control step.

    Notes
    -----
    Under ``DistributedDataParallel`` every rank holds the same parameters after each
    optimizer step, so every rank runs the same deterministic computation and the
    parameters stay identical without any communication (see ``docs/training.md``).

    Examples
    --------
    >>> model = nn.Sequential(SVDConv(3, 8, 3, padding=1, rank=4), nn.ReLU(), SVDConv(8, 8, 3, padding=1))
    >>> control = SpectralControl(model, 1.0, every=1, example_input=torch.zeros(1, 3, 8, 8))
    >>> norms = control.step()
    >>> max(norms.values()) <= 1.0 + 1e-5
    True
    """

    def __init__(
        self,
        model: nn.Module,
        max_value: float,
        *,
        every: int = 100,
        mode: str = "scale",
        example_input: Any,
        orthonormality_tol: float = 1e-6,
    ) -> None:
        self.max_value = _check_max_value(max_value)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (control period in optimizer steps), got {every!r}")
        if mode not in ("scale", "clip"):
            raise ValueError(f"mode must be 'scale' or 'clip', got {mode!r}")
        self.every, self.mode, self.orthonormality_tol = every, mode, float(orthonormality_tol)
        layers = find_conv_layers(model)
        if not layers:
            raise ValueError(f"model ({type(model).__name__}) has no nn.Conv2d or SVDConv layers to control")
        if example_input is None:
            raise ValueError("example_input is required: one forward pass learns each layer's input size")
        sizes = record_input_sizes(model, layers, example_input)
        self.layers: List[Tuple[str, ConvLayer, Tuple[int, int]]] = []
        self.skipped: List[str] = []
        for name, layer in layers:
            if sizes[name]:
                # An input smaller than the (dilated) kernel has no circular operator of its
                # own: control the smallest grid that holds the kernel instead.
                extent = args.dilated_extent(layer.kernel_size, layer.dilation)
                size = tuple(max(n, e) for n, e in zip(sizes[name][0], extent))
                self.layers.append((name, layer, size))
            else:
                self.skipped.append(name)  # not reached by the example forward pass
        self.steps = 0

    def step(self) -> Optional[Dict[str, float]]:
        """Count one optimizer step; every ``every`` steps run :meth:`apply` and return its result."""
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.apply()

    @torch.no_grad()
    def apply(self) -> Dict[str, float]:
        """Run one control pass now; returns each layer's spectral norm afterwards."""
        reached = {}
        for name, layer, size in self.layers:
            if isinstance(layer, SVDConv) and max(orthonormality_error(layer.U, layer.groups),
                                                  orthonormality_error(layer.V, layer.groups)) > self.orthonormality_tol:
                layer.canonicalize_()
            sigma = float(spectral_norm(layer, size))
            if sigma > self.max_value:
                if self.mode == "scale":
                    sigma = scale_to_spectral_norm_(layer, self.max_value, size)
                else:
                    sigma = clip_singular_values_(layer, self.max_value, size)
            reached[name] = sigma
        return reached

    def regularizer(self, method: str = "fantastic_four") -> Tensor:
        """Differentiable penalty: sum over layers of the squared norm estimate.

        ``method='fantastic_four'``: the Fantastic Four minimum (a bound valid for any
        padding and size; cheap); ``'exact'``: the exact circular norm at the layer's input
        size (on an ``SVDConv``'s small core).
        """
        if method == "fantastic_four":
            terms = [fantastic_four_bound(layer) for _, layer, _ in self.layers]
        elif method == "exact":
            terms = [spectral_norm(layer, size) for _, layer, size in self.layers]
        else:
            raise ValueError(f"method must be 'fantastic_four' or 'exact', got {method!r}")
        return torch.stack([t.square() for t in terms]).sum()
