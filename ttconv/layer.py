"""``SVDConv``: a drop-in ``nn.Conv2d`` stored in tensor-train form.

The kernel is ``W = U diag(S) core V^T`` per group (layout in ``ttconv.tt``). With
orthonormal ``U`` and ``V`` the layer's singular values are those of the small middle
convolution ``diag(S) core`` (Senderovich et al., NeurIPS 2022), so exact spectra cost
``O(n^2 r^3)`` instead of ``O(n^2 c^3)``.

Orthonormality is kept by a retraction *outside* ``forward``: ``SVDConv.canonicalize_``
(QR of ``U`` and ``V`` with the triangular factors absorbed into the core, then an SVD of
the core) leaves the computed function unchanged. The spectrum methods do not rely on it:
they express the core in orthonormal bases of ``span(U)``, ``span(V)`` first, so they are
exact at any point of training. See ``docs/design.md`` for the measurements behind this.
"""

from __future__ import annotations

import math
import struct
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from . import _conv_args as args
from . import _forward_paths, _functional
from ._effective_kernel import _effective_kernel
from ._precision import full_precision
from ._typing import CoreKind, ForwardPath, IntOrPair, Padding, PaddingMode, RankSpec
from .geometry import ConvSpec
from .orthogonal import bcop_halves, bcop_kernel, bcop_parameter_count, orthonormal_basis
from .spectra import check_spectral_input_size, conv_singular_values, conv_spectral_norm, spectral_dtype
from .tt import TTFactors, canonicalize, compose, decompose, orthonormal_core, random_factors, resolve_ranks

__all__ = ["SVDConv", "SVDConv1d", "SVDConv2d", "SVDConv3d", "SVDConvTranspose1d", "SVDConvTranspose2d",
           "SVDConvTranspose3d"]

# torch.fx.symbolic_trace records these as single calls instead of tracing into their
# shape arithmetic (which needs concrete sizes).
torch.fx.wrap("compose")
torch.fx.wrap("bcop_kernel")
torch.fx.wrap("bcop_halves")
torch.fx.wrap("orthonormal_basis")

_PATHS = ("auto", "dense", "factored", "separable")  # appended only: checkpoints store the index

_CORES = ("general", "orthogonal")

# Layout of the extra state (format 2): an int64 vector, so every value of a state dict
# stays a tensor (code that does ``{k: v.clone() for k, v in sd.items()}`` or EMA updates
# keeps working) and it loads with ``torch.load(weights_only=True)``.
_STATE_FIELDS = ("format", "r_out", "r_in", "core", "bounded", "max_singular_value_bits", "path")
_STATE_FORMAT = 2


# The class a method is called on: ``SVDConv1d.from_conv(...)`` is an ``SVDConv1d``.
_Layer = TypeVar("_Layer", bound="_SVDConvNd")


def _conv_arguments(module: nn.Module) -> dict:
    """The constructor arguments shared by a torch conv (``nn.Conv{1,2,3}d``, ``nn.ConvTranspose{1,2,3}d``)
    and its SVD counterpart (``output_padding`` only for the transposed ones). A torch conv's
    padding is checked before (``_effective_kernel``): every caller resolves its kernel first."""
    arguments = dict(
        in_channels=module.in_channels, out_channels=module.out_channels, kernel_size=module.kernel_size,
        stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups,
        bias=module.bias is not None, padding_mode=module.padding_mode,
    )
    if getattr(module, "transposed", False) or getattr(module, "_transposed", False):
        arguments["output_padding"] = module.output_padding
    return arguments


def _orthogonal_ranks(rank: RankSpec, ranks: Tuple[int, int], out_g: int, in_g: int,
                      stride: Tuple[int, ...], name: str) -> Tuple[int, int]:
    """The ranks of an orthogonal core (``ranks``: ``rank`` resolved and clamped by ``resolve_ranks``).

    ``None`` or one int: a square core, ``r_out = r_in = r <= min(c_out/g, c_in/g)``. A pair
    ``(r_out, r_in)`` is kept as it is (channel padding, docs/orthogonal.md), except that a pair
    asking for ``r_out <= r_in`` keeps that order when the channel counts clamp ``r_in``, and
    ``r_out > r_in`` is refused for a strided layer: its singular values would not be ``|S|``.
    """
    if not isinstance(rank, (tuple, list)):
        r = min(ranks[0], ranks[1], out_g, in_g)
        return r, r
    r_out, r_in = ranks
    if rank[0] <= rank[1]:  # asked for r_out <= r_in: keep that order when the channels clamp r_in
        r_out = min(r_out, r_in)
    if r_out > r_in and any(s > 1 for s in stride):
        raise ValueError(
            f"{name}(core_kind='orthogonal') with stride {stride} needs rank[0] <= rank[1], got rank={tuple(rank)!r} "
            f"(effective {ranks}). With rank[0] > rank[1] the core is an isometry, and subsampling its outputs "
            "leaves rows that are neither orthonormal nor orthogonal to each other, so the layer's singular values "
            f"would not be |S|. Pass rank=({r_in}, {r_in}) (or any (a, b) with a <= b), or use stride 1 "
            "(e.g. a stride-1 layer after nn.PixelUnshuffle)"
        )
    return r_out, r_in


class _SVDConvNd(nn.Module):
    """Common implementation of the SVD convolutions in ``d`` dimensions, plain and transposed.

    The kernel ``W: (A, B/groups, *kernel_size)`` is stored per group as
    ``U diag(S) core V^T`` (``ttconv.tt``), with ``(A, B) = (out_channels, in_channels)`` for a
    convolution and ``(in_channels, out_channels)`` for a transposed one (torch's
    ``ConvTranspose`` weight layout), so ``U`` has ``A`` rows and ``V`` has ``B``. The
    ``ttconv.tt`` routines see an N-d core with its taps flattened into one axis.
    """

    _dims = 2
    _transposed = False
    _torch_class: Type[_ConvNd] = nn.Conv2d

    # 1: U, S, core, V, bias. 2: plus ``_extra_state`` (configuration, see Notes).
    _version = 2
    # TorchScript must not compile the computed ``weight`` property.
    __jit_unused_properties__ = ["weight"]
    __constants__ = ["stride", "padding", "dilation", "groups", "padding_mode", "in_channels", "out_channels"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: PaddingMode = "zeros",
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        rank: RankSpec = None,
        path: ForwardPath = "auto",
        core_kind: CoreKind = "general",
        max_singular_value: Optional[float] = None,
        output_padding: Any = 0,
    ) -> None:
        super().__init__()
        d, name = self._dims, type(self).__name__
        self.in_channels, self.out_channels, self.groups = args.channels_and_groups(
            in_channels, out_channels, groups
        )
        self.kernel_size = args.ntuple(kernel_size, "kernel_size", d)
        self.stride = args.ntuple(stride, "stride", d)
        self.dilation = args.ntuple(dilation, "dilation", d)
        self.padding = padding  # validated, with the pads every path uses, by the setter
        self.padding_mode = args.padding_mode_arg(padding_mode)
        if self._transposed:
            if self.padding_mode != "zeros":
                raise ValueError(f"{name} supports only padding_mode='zeros' (as torch's ConvTranspose), "
                                 f"got {padding_mode!r}")
            self.output_padding = args.output_padding_arg(output_padding, self.stride, self.dilation)
        elif output_padding != 0:
            raise TypeError(f"output_padding is an argument of the transposed layers only, not of {name}")
        self.core_kind = cast(CoreKind, args.choice(core_kind, "core_kind", _CORES))
        self.path = path
        if max_singular_value is not None:
            if core_kind != "orthogonal":
                raise ValueError(
                    "max_singular_value needs core_kind='orthogonal': only then are S the layer's singular values"
                )
            max_singular_value = args.positive_finite(max_singular_value, "max_singular_value")
        self.max_singular_value = max_singular_value
        rows, cols = self._weight_channels()
        out_g, in_g = rows // groups, cols // groups
        self.ranks: Tuple[int, int] = resolve_ranks(rank, out_g, in_g, self._tt_kernel_size())
        if core_kind == "orthogonal":
            self.ranks = _orthogonal_ranks(rank, self.ranks, out_g, in_g, self.stride, name)
        r_out, r_in = self.ranks
        factory: Dict[str, Any] = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(rows, r_out, **factory))
        if core_kind == "orthogonal":
            # S: the layer's singular values, min(r_out, r_in) per group (see factors). The core:
            # BCOP generators of an r x r orthogonal conv, r = max(r_out, r_in) (ttconv.orthogonal).
            self.S = nn.Parameter(torch.empty(groups * min(r_out, r_in), **factory))
            core_shape: Tuple[int, ...] = (groups, bcop_parameter_count(self.kernel_size), max(r_out, r_in),
                                           max(r_out, r_in))
        else:
            self.S = nn.Parameter(torch.empty(groups * r_out, **factory))
            core_shape = (groups * r_out, r_in, *self.kernel_size)
        self.core = nn.Parameter(torch.empty(core_shape, **factory))
        self.V = nn.Parameter(torch.empty(cols, r_in, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.relative_error: Optional[float] = None
        self.reset_parameters()

    def _weight_channels(self) -> Tuple[int, int]:
        """``(A, B)`` of the dense weight ``(A, B/groups, *k)``: ``U`` has ``A`` rows, ``V`` has ``B``."""
        if self._transposed:
            return self.in_channels, self.out_channels
        return self.out_channels, self.in_channels

    def _tt_kernel_size(self) -> Tuple[int, int]:
        """The kernel size as ``ttconv.tt`` sees it: 2-D kernels as they are, others as (taps, 1)."""
        if self._dims == 2:
            kh, kw = self.kernel_size
            return kh, kw
        return (math.prod(self.kernel_size), 1)

    def _tt_core(self, core: Tensor) -> Tensor:
        """``core`` reshaped for ``ttconv.tt``: ``(g r_out, r_in, *k)`` -> ``(g r_out, r_in, taps, 1)`` off 2-D."""
        if self._dims == 2:
            return core
        return core.reshape(core.shape[0], core.shape[1], *self._tt_kernel_size())  # (fx: no unpacking)

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Initialise like a fresh ``nn.Conv2d``, sampling the factors directly.

        ``U``, ``V``: Haar-random orthonormal columns (sign-fixed QR of Gaussians); core:
        Haar-random orthonormal rows of its unfolding; ``S`` flat, scaled so that the
        composed kernel's entries have mean 0 and the variance of ``nn.Conv2d``'s default
        init, ``1 / (3 fan_in)``, in expectation and at every rank
        (``ttconv.tt.random_factors``). The layer starts in canonical form. Bias as in
        ``nn.Conv2d``. No dense kernel is drawn and nothing is decomposed: construction
        costs a few times ``nn.Conv2d(...)`` (``benchmarks/bench_convert.py``).
        """
        if self.U.is_meta:  # nothing to fill (e.g. torch.nn.utils.skip_init)
            return
        if self.core_kind == "orthogonal":
            self._reset_orthogonal()
            return
        self._reset_general()

    @torch.no_grad()
    def _reset_general(self) -> None:
        rows, cols = self._weight_channels()
        factors = random_factors(rows // self.groups, cols // self.groups, self._tt_kernel_size(), self.ranks,
                                 self.groups, dtype=self.U.dtype, device=self.U.device)
        self._copy_factors(factors)
        self._reset_bias()

    def _reset_bias(self) -> None:
        if self.bias is not None:
            # torch's fan_in: the weight's dim 1 times the taps (B/groups for the transposed layers).
            fan_in = (self._weight_channels()[1] // self.groups) * math.prod(self.kernel_size)
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def _reset_orthogonal(self) -> None:
        # Random orthonormal U, V, a random orthogonal core, and a flat spectrum: at the
        # Frobenius norm of torch's init, or near norm-preserving (0.88 c) under a bound c. Each
        # S_i contributes S_i^2 to ||W||_F^2 (a row, or column, of an orthogonal conv has unit
        # norm), and torch's init gives ||W||_F^2 = A / 3 for its weight (A, B/g, *k).
        for factor in (self.U, self.V):
            factor.copy_(orthonormal_basis(torch.randn_like(factor).reshape(self.groups, -1, factor.shape[1]))
                         .reshape(factor.shape))
        nn.init.normal_(self.core)
        # H = exp(0) = I: the kernel's distribution is unchanged (V is Haar, so H V^T is too,
        # and the blocks' projectors are conjugation invariant, which moves a random H onto
        # U when r_out > r_in), and a zero generator makes the exponential nearly free until
        # training moves it (ttconv.orthogonal.skew_matrix_exp sizes itself to the norm).
        self.core[:, 0].zero_()
        if self.max_singular_value is None:
            self.S.fill_(math.sqrt(self._weight_channels()[0] / (3.0 * self.S.numel())))
        else:
            self.S.fill_(2.0)  # c * sigmoid(2) = 0.88 c
        self._reset_bias()

    def factors(self) -> TTFactors:
        """The effective ``(U, S, core, V)`` that define the kernel (differentiable).

        In the general form these are the parameters themselves. With
        ``core_kind='orthogonal'`` they are computed from them: ``U``, ``V`` orthonormalised
        (sign-fixed QR), ``S`` as ``max_singular_value * sigmoid(S)`` when bounded, and the
        core cut from an exactly orthogonal ``r x r`` convolution built from its BCOP
        generators, ``r = max(r_out, r_in)``: its first ``r_out`` outputs and ``r_in``
        inputs. For ``r_out <= r_in`` that core has orthonormal rows (as an operator) and
        scales by ``S`` on the output side. For ``r_out > r_in`` it is an isometry and
        ``S`` (``r_in`` per group) scales its inputs: the core returned is
        ``isometry diag(S)`` and the returned ``S`` is ones. Either way the layer's nonzero
        singular values are ``|effective_S()|`` (docs/orthogonal.md).
        """
        if self.core_kind == "general":
            return TTFactors(self.U, self.S, self.core, self.V)
        g, d, (r_out, r_in) = self.groups, self._dims, self.ranks
        U = orthonormal_basis(self.U.reshape(g, -1, r_out)).reshape(self.U.shape)
        V = orthonormal_basis(self.V.reshape(g, -1, r_in)).reshape(self.V.shape)
        S = self.effective_S()
        core = bcop_kernel(self.core, self.kernel_size)[:, :r_out, :r_in]  # (g, r_out, r_in, *kernel_size)
        if r_out > r_in:
            # An isometry times diag(S) has singular values |S|; diag(S) times it would not.
            core = core * S.reshape(g, 1, r_in, *(1,) * d)
            S = S.new_ones(g * r_out)
        return TTFactors(U, S, core.reshape(g * r_out, r_in, *self.kernel_size), V)

    def effective_S(self) -> Tensor:
        """``S`` as used by the kernel: ``max_singular_value * sigmoid(S)`` when bounded, else ``S``.

        With ``core_kind='orthogonal'``: ``(groups * min(r_out, r_in),)``, whose absolute values are the
        layer's nonzero singular values (each once per output position of the circular operator).
        """
        return self.S if self.max_singular_value is None else self.max_singular_value * torch.sigmoid(self.S)

    @torch.no_grad()
    def set_singular_values_(self: _Layer, values: Tensor) -> _Layer:
        """Set the layer's singular values ``S`` in place (``core_kind='orthogonal'`` only).

        ``values``: ``(groups * min(r_out, r_in),)``, each ``|value|`` becomes a singular value of
        the layer (circular padding, any stride and dilation: exactly, once per output position;
        zero padding: ``max |S|`` bounds the norm).
        Under ``max_singular_value`` the values must lie in ``[0, max_singular_value)``.
        """
        if self.core_kind != "orthogonal":
            raise ValueError("set_singular_values_ needs core_kind='orthogonal'; in the general form S are not "
                             "the layer's singular values (use ttconv.clip_singular_values_)")
        values = torch.as_tensor(values, dtype=self.S.dtype, device=self.S.device)
        if values.numel() != self.S.numel():
            raise ValueError(f"values must hold groups * min(r_out, r_in) = {self.S.numel()} singular values "
                             f"(groups={self.groups}, ranks={self.ranks}), got shape {tuple(values.shape)}")
        values = values.reshape(self.S.shape)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("values must be finite (singular values), got NaN or Inf")
        if self.max_singular_value is None:
            self.S.copy_(values)
        else:
            ratio = values / self.max_singular_value
            if bool((ratio < 0).any() or (ratio >= 1).any()):
                raise ValueError(f"values must lie in [0, max_singular_value={self.max_singular_value})")
            tiny = torch.finfo(self.S.dtype).tiny
            self.S.copy_(torch.logit(ratio.clamp_min(tiny)))
        return self

    def _copy_factors(self, factors) -> None:
        # In place, so parameter identity (and any optimizer state) survives.
        for name in ("U", "S", "core", "V"):
            value = getattr(factors, name)
            getattr(self, name).copy_(value.reshape(getattr(self, name).shape))

    # --------------------------------------------------------------- forward
    def dense_weight(self) -> Tensor:
        """The dense kernel ``(out_channels, in_channels/groups, *kernel_size)`` (differentiable);
        ``(in_channels, out_channels/groups, *kernel_size)`` for the transposed layers, as torch's."""
        rows, cols = self._weight_channels()
        if self.core_kind == "orthogonal" and 2 * self.ranks[1] >= cols // self.groups:
            weight = self._orthogonal_dense_weight()
        else:
            U, S, core, V = self.factors()
            weight = compose(U, S, self._tt_core(core), V, self.groups)
        return weight.reshape(rows, cols // self.groups, *self.kernel_size)

    def _orthogonal_dense_weight(self) -> Tensor:
        """``compose(*factors())`` of the orthogonal core, as ``(g, A/g, B/g * taps)``.

        ``V^T`` (and an input-side ``S``) fold into BCOP's first matrix
        (``bcop_kernel(..., inputs=)``): one kernel product of ``r^2 c k`` fewer than composing
        the core and then ``V``. Worth it when ``r_in`` is near ``c_in/g`` (``dense_weight``
        uses it from ``2 r_in >= c_in/g``)."""
        inputs, outputs = self._orthogonal_outer_factors()
        kernel = bcop_kernel(self.core, self.kernel_size, inputs=inputs, outputs=outputs)  # (g, A/g, B/g, *k)
        return kernel.flatten(2)  # (g, A/g, B/g * taps)

    @property
    def padding(self) -> Union[str, Tuple[int, ...]]:
        """As ``nn.Conv{d}d.padding``; assignable after construction, unlike torch's convs (which
        keep padding by the amount they were built with for every mode but zeros): every forward
        path, the spectra and ``to_conv`` then use the new value."""
        # (A layer pickled whole before this was a property holds it under 'padding'.)
        return self.__dict__["_padding"] if "_padding" in self.__dict__ else self.__dict__["padding"]

    @padding.setter
    def padding(self, value: Any) -> None:
        if self._transposed and isinstance(value, str):
            raise ValueError(f"{type(self).__name__} takes padding as an int or a tuple of {self._dims} ints, got "
                             f"{value!r} (torch's ConvTranspose layers have no 'same'/'valid')")
        padding = args.padding_arg(value, self.stride)
        self.__dict__["_padding"] = padding
        self._reversed_padding_repeated_twice = args.reversed_padding_repeated_twice(
            padding, self.kernel_size, self.dilation)

    def _orthogonal_outer_factors(self) -> Tuple[Tensor, Tensor]:
        """What an orthogonal core's kernel is built between: ``(V^T, U S)``, as
        ``(g, r_in, B/g)`` and ``(g, A/g, r_out)``; with ``r_out > r_in``, ``S`` scales the input
        side instead (``(diag(S) V^T, U)``: see ``factors``)."""
        g, (r_out, r_in) = self.groups, self.ranks
        U = orthonormal_basis(self.U.reshape(g, -1, r_out))
        V = orthonormal_basis(self.V.reshape(g, -1, r_in))
        S = self.effective_S().reshape(g, -1)
        inputs = V.mT if r_out <= r_in else S[:, :, None] * V.mT  # (g, r_in, B/g)
        outputs = U * S[:, None, :] if r_out <= r_in else U  # (g, A/g, r_out)
        return inputs, outputs

    @property
    def weight(self) -> Tensor:
        """The composed dense kernel, as ``nn.Conv2d.weight`` (differentiable; computed).

        For code written for ``nn.Conv2d`` that reads ``.weight`` (fusion helpers, fan-in
        computations, spectral tools). It is computed on every access and is not a
        parameter: it is not in ``parameters()`` or the ``state_dict``, and writing into
        it in place (``nn.init.*_(layer.weight)``, ``layer.weight.copy_(...)``) changes a
        temporary, not the layer. Assigning sets the kernel: ``layer.weight = tensor``
        (a ``Parameter`` too) calls ``set_dense_weight_``, which is exact or raises.
        """
        return self.dense_weight()

    @weight.setter
    def weight(self, value: Tensor) -> None:
        self.set_dense_weight_(value)

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        # nn.Module.__setattr__ routes ``layer.weight = Parameter(...)`` here, not to the
        # property setter (e.g. torch.nn.utils.fusion.fuse_conv_bn_eval does this).
        if name == "weight":
            # torch's signature allows None here; set_dense_weight_ refuses it (TypeError naming weight).
            self.set_dense_weight_(cast(Tensor, param))
            return
        super().register_parameter(name, param)

    @torch.no_grad()
    def set_dense_weight_(self: _Layer, weight: Tensor) -> _Layer:
        """Set the layer's kernel to a dense tensor, in place and exactly (``core_kind='general'``).

        The kernel is decomposed at the layer's ranks and copied into ``U, S, core, V``
        (parameter identity kept, canonical form). ``layer.weight = weight`` does the same,
        so ``torch.nn.utils.fusion.fuse_conv_bn_eval(layer, bn)`` returns an ``SVDConv``
        computing the fused function: scaling output channels keeps the ranks.

        Parameters
        ----------
        weight : Tensor ``(out_channels, in_channels/groups, kh, kw)``
            Finite; values are copied (no autograd link to ``weight`` is kept).

        Raises
        ------
        ValueError
            If ``weight`` is not representable at the layer's ranks (relative Frobenius
            error above ``1000 eps`` of the dtype, at most ``1e-2``): the layer is left
            unchanged instead of being truncated silently.
        AttributeError
            For ``core_kind='orthogonal'``, whose core is an orthogonal convolution by
            construction: use ``layer.to_conv2d()`` and set that conv's weight.
        """
        if self.core_kind != "general":
            to_dense = "to_conv2d" if type(self) is SVDConv else "to_conv"
            raise AttributeError(
                f"cannot set the dense kernel of an {type(self).__name__} with core_kind={self.core_kind!r}: its core "
                "is an orthogonal convolution by construction, an arbitrary kernel would break that; "
                f"convert it first with conv = layer.{to_dense}() and set conv.weight"
            )
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
        rows, cols = self._weight_channels()
        shape = (rows, cols // self.groups, *self.kernel_size)
        if tuple(weight.shape) != shape:
            layout = "(in_channels, out_channels/groups, *kernel_size)" if self._transposed else \
                "(out_channels, in_channels/groups, kh, kw)"
            raise ValueError(f"weight must have shape {shape} {layout}, got {tuple(weight.shape)}")
        weight = weight.detach().to(dtype=self.U.dtype, device=self.U.device)
        result = decompose(self._tt_core(weight), self.groups, rank=self.ranks)
        tolerance = min(1e3 * torch.finfo(self.U.dtype).eps, 1e-2)
        if result.ranks != self.ranks or result.relative_error > tolerance:
            to_dense, from_dense = ("to_conv2d", "from_conv2d") if type(self) is SVDConv else ("to_conv", "from_conv")
            raise ValueError(
                f"the assigned kernel is not representable at this layer's ranks {self.ranks} (relative error "
                f"{result.relative_error:.2e} > {tolerance:.1e}); the layer is left unchanged. Use a dense copy "
                f"(conv = layer.{to_dense}()) or rebuild at higher rank with "
                f"{type(self).__name__}.{from_dense}(conv, rank=...)"
            )
        self._copy_factors(result.factors)
        return self

    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor],
              output_padding: Optional[Tuple[int, ...]] = None) -> Tensor:
        if self._transposed:
            # __init__ refuses string padding for these layers and _forward passes their output_padding.
            assert not isinstance(self.padding, str) and output_padding is not None
            transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self._dims - 1]
            return transpose(x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation)
        return _functional.conv_nd(
            x, weight, bias, self.stride, self.padding, self.dilation, self.groups,
            self.padding_mode, self._reversed_padding_repeated_twice,
        )

    def _output_size(self, size: Tuple[int, ...]) -> Tuple[int, ...]:
        """Spatial output size for a spatial input size (``output_padding`` as set, for transposed)."""
        pads = self._reversed_padding_repeated_twice
        extent = args.dilated_extent(self.kernel_size, self.dilation)
        out = []
        for axis, n in enumerate(size):
            before, after = pads[2 * (self._dims - 1 - axis)], pads[2 * (self._dims - 1 - axis) + 1]
            if self._transposed:
                out.append((n - 1) * self.stride[axis] - before - after + extent[axis] + self.output_padding[axis])
            else:
                out.append((n + before + after - extent[axis]) // self.stride[axis] + 1)
        return tuple(out)

    def flop_costs(self, input_shape: Tuple[int, ...]) -> Tuple[int, int]:
        """Multiply-adds of the ``(dense, factored)`` forward paths for an input shape.

        ``dense`` counts composing the kernel plus one convolution; ``factored`` counts
        the three convolutions (``V`` 1x1 at input resolution, the core, ``U`` 1x1).
        """
        return _forward_paths.flop_costs(self, input_shape)

    def path_elements(self, input_shape: Tuple[int, ...]) -> Tuple[int, int]:
        """Tensor elements the ``(dense, factored)`` forward paths read and write: the input,
        the output and, for the factored path, each hidden map twice (written, then read)."""
        return _forward_paths.path_elements(self, input_shape)

    def path_costs(self, input_shape: Tuple[int, ...], *, backward: bool = False,
                   input_requires_grad: bool = True) -> Tuple[float, float]:
        """Estimated cost of the ``(dense, factored)`` paths, in multiply-add units.

        ``flop_costs`` (the dense path composes its kernel on every call) plus what makes
        small and thin layers slow on CPU: a cost per tensor element read or written
        (``path_elements``; maps with few channels are memory-bound) and per operator call.
        ``backward=True``: forward plus backward, where an input that does not require
        grad (a model's first layer) spares each path its first operation's input gradient.
        The constants are fitted on timings of both paths on every conv of MTCNN-,
        MobileNet- and OCR-like models (``ttconv._forward_paths``). Deterministic: nothing
        is timed at run time.
        """
        return _forward_paths.path_costs(self, input_shape, backward=backward,
                                         input_requires_grad=input_requires_grad)

    def choose_path(self, input_shape: Tuple[int, ...], *, backward: bool = False,
                    input_requires_grad: bool = True) -> str:
        """The path ``forward`` takes with ``path='auto'`` for this input shape (see ``path_costs``;
        an orthogonal core's ``'separable'`` path is modelled alike, its two convs' multiply-adds
        weighted by their measured lower rate, ``ttconv._forward_paths.separable_cost``):
        ``backward=False`` under ``torch.no_grad()`` or when nothing requires grad, else
        ``backward=True`` with the input's ``requires_grad``."""
        return _forward_paths.cheaper_path(self, input_shape, backward=backward,
                                           input_requires_grad=input_requires_grad)

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input, None)

    def _forward(self, input: Tensor, output_padding: Optional[Tuple[int, ...]]) -> Tensor:
        path = self.path
        if isinstance(input, torch.fx.Proxy):
            # torch.fx.symbolic_trace: shapes are symbolic, so no input checks; 'auto'
            # compares per-output-pixel costs, leaving out composing the kernel.
            if path == "auto":
                path = "dense" if _forward_paths.dense_is_cheaper_per_pixel(self) else "factored"
        else:
            self._check_input(input)
            if path == "auto":
                path = _forward_paths.remembered_path(self, input)
        if path == "separable":
            self._check_path(path)  # the attribute may have been set after construction
            return self._separable_forward(input, output_padding)
        if path == "dense":
            if self._is_pointwise():
                return self._pointwise_forward(input, self.dense_weight())
            return self._conv(input, self.dense_weight(), self.bias, output_padding)
        return self._factored_forward(input, output_padding)

    @property
    def path(self) -> ForwardPath:
        """The forward path (see the class docstring); assigning checks it as the constructor does."""
        return cast(ForwardPath, self.__dict__["_path"])

    @path.setter
    def path(self, value: ForwardPath) -> None:
        value = cast(ForwardPath, args.choice(value, "path", _PATHS))
        self._check_path(value)
        self.__dict__["_path"] = value

    def __setstate__(self, state: Dict[str, Any]) -> None:
        if "path" in state:  # a module pickled before ``path`` was a property
            state["_path"] = state.pop("path")
        super().__setstate__(state)

    def _check_path(self, path: str) -> None:
        if path == "separable" and self.core_kind != "orthogonal":
            raise ValueError(
                f"path='separable' runs an orthogonal core's kernel as two convolutions and needs "
                f"core_kind='orthogonal'; {type(self).__name__} with core_kind={self.core_kind!r} has paths "
                "'auto', 'dense' and 'factored'")

    def _separable_forward(self, input: Tensor, output_padding: Optional[Tuple[int, ...]]) -> Tensor:
        """The orthogonal core's dense kernel as two convolutions (``bcop_halves``): the taps of
        every axis but the last (``B -> r`` channels, ``B`` the kernel's input side), then the
        last axis's (``r -> A``). The stride, dilation and padding of each axis go to the
        convolution whose taps run along it; padding one axis commutes with convolving along
        the others, whatever the padding mode. A transposed layer runs the adjoints in the
        reverse order, each with its axes' output padding."""
        d, g, r = self._dims, self.groups, max(self.ranks)
        rows, cols = self._weight_channels()
        inputs, outputs = self._orthogonal_outer_factors()
        halves = bcop_halves(self.core, self.kernel_size, inputs=inputs, outputs=outputs)
        # Shapes from the geometry, not the tensors: torch.fx traces this with proxies.
        first = halves[0].reshape(g * r, cols // g, *self.kernel_size[:-1], 1)
        second = halves[1].reshape(rows, r, *(1,) * (d - 1), self.kernel_size[-1])
        ones, zeros = (1,) * (d - 1), (0,) * (d - 1)
        if self._transposed:
            # __init__ refuses string padding for these layers and _forward passes their output_padding.
            assert not isinstance(self.padding, str) and output_padding is not None
            transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
            hidden = transpose(input, second, None, (*ones, self.stride[-1]), (*zeros, self.padding[-1]),
                               (*zeros, output_padding[-1]), g, (*ones, self.dilation[-1]))
            return transpose(hidden, first, self.bias, (*self.stride[:-1], 1), (*self.padding[:-1], 0),
                             (*output_padding[:-1], 0), g, (*self.dilation[:-1], 1))
        pads = self._reversed_padding_repeated_twice  # F.pad order: the last axis first
        if not isinstance(input, torch.fx.Proxy):
            # Each half would name its own kernel in torch's error; name the layer's, as the dense path does.
            extents = args.dilated_extent(self.kernel_size, self.dilation)
            for axis, (n, extent) in enumerate(zip(input.shape[-d:], extents)):
                padded = n + pads[2 * (d - 1 - axis)] + pads[2 * (d - 1 - axis) + 1]
                if padded < extent:
                    raise RuntimeError(
                        f"input size {tuple(input.shape[-d:])} padded to {padded} on spatial axis {axis} is smaller "
                        f"than the dilated kernel ({extent}: kernel_size={self.kernel_size}, "
                        f"dilation={self.dilation}); use a larger input or more padding")
        if self.kernel_size[-1] == 1 and self.padding != "same":
            # One tap along the last axis: neither half has taps there, so its stride and padding
            # commute with the first conv too. The first conv takes them and computes only the
            # kept positions; the second is a plain channel mixing. (As a 1 x 1 conv strided
            # along the last axis alone, with the rank's 2-4 input channels, it also met a
            # oneDNN memory corruption in the channels-last backward, torch 2.13 on one thread.)
            padding = (0,) * d if self.padding == "valid" else self.padding
            hidden = _functional.conv_nd(input, first, None, self.stride, padding, (*self.dilation[:-1], 1), g,
                                         self.padding_mode, pads)
            return _functional.unstrided_conv(hidden, second, self.bias, g, d)
        if isinstance(self.padding, str):  # 'same' or 'valid' mean the same for each half
            first_padding: Union[str, Tuple[int, ...]] = self.padding
            second_padding: Union[str, Tuple[int, ...]] = self.padding
        else:
            first_padding = (*self.padding[:-1], 0)
            second_padding = (*zeros, self.padding[-1])
        hidden = _functional.conv_nd(
            input, first, None, (*self.stride[:-1], 1), first_padding, (*self.dilation[:-1], 1), g,
            self.padding_mode, [0, 0, *pads[2:]])
        return _functional.conv_nd(
            hidden, second, self.bias, (*ones, self.stride[-1]), second_padding, (*ones, self.dilation[-1]), g,
            self.padding_mode, [*pads[:2], *(0,) * (2 * d - 2)])

    def _is_pointwise(self) -> bool:
        """A 1x1 kernel, stride 1, no padding: the conv only mixes channels (dilation is moot)."""
        no_padding = self.padding == "valid" or self.padding == "same" or all(p == 0 for p in self.padding)
        return (all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride) and no_padding
                and not self._transposed)

    def _pointwise_forward(self, input: Tensor, weight: Tensor) -> Tensor:
        # A 1x1 conv as a matmul on large inputs (much faster on CPU; see _functional).
        d = self._dims
        unbatched = not isinstance(input, torch.fx.Proxy) and input.dim() == d + 1
        x = input.unsqueeze(0) if unbatched else input
        g = self.groups
        y = _functional.mix_channels(x, weight.reshape(g, self.out_channels // g, -1), self.bias, g, d)
        return y.squeeze(0) if unbatched else y

    def _factored_forward(self, input: Tensor, output_padding: Optional[Tuple[int, ...]] = None) -> Tensor:
        d, g, (r_out, r_in) = self._dims, self.groups, self.ranks
        U, S, core, V = self.factors()
        unbatched = not isinstance(input, torch.fx.Proxy) and input.dim() == d + 1
        x = input.unsqueeze(0) if unbatched else input
        scaled_core = S[(...,) + (None,) * (d + 1)] * core
        # Channel mixing commutes with every padding mode, so the 1x1 convs can sit
        # outside the padded core conv.
        if self._is_pointwise():
            # A 1x1 core only mixes channels too: fold it into U, two mixings instead of three.
            left = (U.reshape(g, -1, r_out) * S.reshape(g, 1, r_out)) @ core.reshape(g, r_out, r_in)
            hidden = _functional.mix_channels(x, V.reshape(g, -1, r_in).transpose(1, 2), None, g, d)
            y = _functional.mix_channels(hidden, left, self.bias, g, d)
        elif self._transposed:
            # The adjoint of V core^T U^T: U^T on the input, the core transposed, then V.
            hidden = _functional.mix_channels(x, U.reshape(g, -1, r_out).transpose(1, 2), None, g, d)
            hidden = self._conv(hidden, scaled_core, None, output_padding)
            y = _functional.mix_channels(hidden, V.reshape(g, -1, r_in), self.bias, g, d)
        else:
            hidden = _functional.mix_channels(x, V.reshape(g, -1, r_in).transpose(1, 2), None, g, d)
            if all(k == 1 for k in self.kernel_size) and any(s > 1 for s in self.stride):
                # A strided one-tap core: pad and subsample, then an unstrided conv (the same
                # positions and multiply-adds). As a strided 1 x 1 conv with a low rank's 2-4
                # channels it met a oneDNN memory corruption in the channels-last backward
                # (torch 2.13, one thread, stride along the last axis alone).
                hidden = _functional.pad_and_subsample(hidden, self._reversed_padding_repeated_twice,
                                                       self.padding_mode, self.stride)
                hidden = _functional.unstrided_conv(hidden, scaled_core, None, g, d)
            else:
                hidden = self._conv(hidden, scaled_core, None)
            y = _functional.mix_channels(hidden, U.reshape(g, -1, r_out), self.bias, g, d)
        if not isinstance(x, torch.fx.Proxy):
            y = _functional.in_layout_of(x, y)
        return y.squeeze(0) if unbatched else y

    def _check_input(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
        d = self._dims
        if input.dim() not in (d + 1, d + 2):
            if d == 2:
                what = "4-D (batch, channels, height, width) or 3-D (channels, height, width)"
            else:
                what = f"{d + 2}-D (batch, channels, {d} spatial) or {d + 1}-D (channels, {d} spatial)"
            raise ValueError(f"input must be {what}, got shape {tuple(input.shape)}")
        if input.shape[-d - 1] != self.in_channels:
            raise ValueError(
                f"input has {input.shape[-d - 1]} channels (dim {input.dim() - d - 1}) but this layer expects "
                f"in_channels={self.in_channels}; got shape {tuple(input.shape)}"
            )

    # ------------------------------------------------------------- spectrum
    @full_precision
    def singular_values(self, input_size: IntOrPair) -> Tensor:
        """All singular values of the layer on an ``n1 x n2`` input, circular padding.

        Exact: computed from the core alone (``O(n1 n2 r^3)``, math.md theorem), with the
        stride handled by polyphase decomposition. The padding amount and mode do not
        enter: this is the spectrum of the circular convolution with this kernel, stride
        and dilation, which is the layer's operator when ``padding_mode='circular'``
        keeps the size, and the standard proxy otherwise.

        Parameters
        ----------
        input_size : int or (int, int)
            Divisible by the stride. Below the dilated kernel extent the circular operator
            is that of the kernel folded modulo the size (``ttconv.spectra.fold_kernel``).

        Returns
        -------
        Tensor
            1-D, sorted descending, length ``groups * m1 * m2 * min(c_out/g, (c_in/g) s1 s2)``
            (``m = n / s``): the full spectrum of the operator including its zeros, as
            ``ttconv.conv_singular_values`` returns for the dense kernel. Float64 for
            float64 parameters, float32 otherwise. Differentiable.
        """
        if self._transposed or self._dims != 2:
            return self._nd_singular_values(input_size)
        n = check_spectral_input_size(input_size, self.kernel_size, self.stride, self.dilation, fold=True)
        s1, s2 = self.stride
        if self.core_kind == "orthogonal":
            values = self._orthogonal_singular_values(n)
        else:
            values = conv_singular_values(
                self.orthonormal_core(), n, stride=self.stride, dilation=self.dilation, groups=self.groups
            )
        per_group = min(self.out_channels, (self.in_channels * s1 * s2)) // self.groups
        total = self.groups * (n[0] // s1) * (n[1] // s2) * per_group
        return F.pad(values, (0, total - values.numel()))

    def _nd_singular_values(self, input_size: Any) -> Tensor:
        """``singular_values`` for the 1-D, 3-D and transposed layers (d-D DFT of the core).

        A transposed layer on an input of size ``m`` (circular) is the adjoint of the circular
        conv with its weight on ``N = m * stride``, so it has that conv's singular values.
        """
        d, stride = self._dims, self.stride
        if self._transposed:
            m = args.ntuple(input_size, "input_size", d)
            size = tuple(mi * si for mi, si in zip(m, stride))
        else:
            size = args.ntuple(input_size, "input_size", d)
        n = check_spectral_input_size(size, self.kernel_size, stride, self.dilation, fold=True)
        if self.core_kind == "orthogonal":
            values = self._orthogonal_singular_values(n)
        else:
            values = conv_singular_values(self.orthonormal_core(), n, stride=stride, dilation=self.dilation,
                                          groups=self.groups)
        rows, cols = self._weight_channels()
        per_group = min(rows, cols * math.prod(stride)) // self.groups
        total = self.groups * math.prod(ni // si for ni, si in zip(n, stride)) * per_group
        return F.pad(values, (0, total - values.numel()))

    def _orthogonal_singular_values(self, n: Tuple[int, ...]) -> Tensor:
        """``|S|`` once per output position of the circular operator on the grid ``n`` (divisible by
        the stride), descending: the nonzero singular values of an orthogonal-core layer, in
        ``O(r)`` without an FFT (docs/orthogonal.md: orthonormal rows, or an isometry at stride 1)."""
        positions = math.prod(n_i // s_i for n_i, s_i in zip(n, self.stride))
        values = self.effective_S().to(spectral_dtype(self.S.dtype)).abs().repeat_interleave(positions)
        return values.sort(descending=True).values

    @full_precision
    def orthonormal_core(self) -> Tensor:
        """The kernel of the middle conv in orthonormal bases of ``span(U)``, ``span(V)``.

        ``(groups * r_out, r_in, kh, kw)``: a convolution with the same stride, padding,
        dilation and groups as the layer has the same nonzero singular values as the layer
        (math.md theorem), for every padding mode and input size, whether or not ``U`` and
        ``V`` are currently orthonormal. Float64 for float64 parameters, float32 otherwise.
        Differentiable; cost ``O(c r^2 + r^3 kh kw)``. Every spectral method uses it.
        """
        work = spectral_dtype(self.U.dtype)
        U, S, core, V = (p.to(work) for p in self.factors())
        return orthonormal_core(U, S, self._tt_core(core), V, self.groups).reshape(core.shape)

    def conv_spec(self) -> ConvSpec:
        """The layer as a ``ttconv.geometry.ConvSpec``: its orthonormal core with its geometry.

        The core has the layer's nonzero singular values for every padding mode and size
        (``orthonormal_core``), so bounds, spectra and control work on it (``r`` channels,
        not ``c``). Transposed layers give ``transposed=True`` and their ``output_padding``;
        ``core_kind='orthogonal'`` sets ``singular_values_are_s`` with ``S``. Differentiable.
        """
        orthogonal = self.core_kind == "orthogonal"
        return ConvSpec(
            self.orthonormal_core(), self.stride, self.padding, self.dilation, self.groups, self.padding_mode,
            self._transposed, self.output_padding if self._transposed else 0,
            orthogonal, self.effective_S() if orthogonal else None,
        )

    def spectral_norm(self, input_size: IntOrPair) -> Tensor:
        """Largest singular value of the layer on an ``n1 x n2`` input, circular padding (0-D).

        ``singular_values(input_size)[0]`` without the full spectrum: the norm of the core's
        circular operator (``ttconv.conv_spectral_norm``; a transposed layer on ``m`` inputs:
        on ``m * stride``), ``max |S|`` for the orthogonal core. The same value as
        ``ttconv.spectral_norm(layer, input_size)`` and ``ttconv.bounds.exact_spectral_norm``;
        sizes not divisible by the stride are refused. Differentiable.
        """
        size = args.ntuple(input_size, "input_size", self._dims)
        if self._transposed:
            size = tuple(m * s for m, s in zip(size, self.stride))
        n = check_spectral_input_size(size, self.kernel_size, self.stride, self.dilation, fold=True)
        if self.core_kind == "orthogonal":  # exactly |S| at every position (docs/orthogonal.md)
            return self.effective_S().to(spectral_dtype(self.S.dtype)).abs().max()
        return conv_spectral_norm(self.orthonormal_core(), n, stride=self.stride, dilation=self.dilation,
                                  groups=self.groups)

    # ----------------------------------------------------------- conversion
    @classmethod
    def from_conv(
        cls: Type[_Layer],
        conv: nn.Module,
        rank: Union[RankSpec, float] = None,
        energy: Optional[float] = None,
        *,
        path: ForwardPath = "auto",
        refine: int = 0,
    ) -> _Layer:
        """Convert the dense torch layer of this class's kind (exact at full rank).

        ``SVDConv1d.from_conv(nn.Conv1d)``, ``SVDConv3d.from_conv(nn.Conv3d)``,
        ``SVDConvTranspose2d.from_conv(nn.ConvTranspose2d)``, ...; arguments and result as
        ``SVDConv.from_conv2d``. For the transposed layers the TT form is that of torch's
        weight ``(in_channels, out_channels/groups, *kernel_size)``.
        """
        return cls._from_conv(conv, rank, energy, path, refine, f"{cls.__name__}.from_conv")

    @classmethod
    def _from_conv(cls: Type[_Layer], conv: nn.Module, rank: Union[RankSpec, float], energy: Optional[float],
                   path: ForwardPath, refine: int, caller: str) -> _Layer:
        if not isinstance(conv, cls._torch_class):
            raise TypeError(f"conv must be a torch.nn.{cls._torch_class.__name__} for {cls.__name__}, "
                            f"got {type(conv).__name__}")
        kernel = _effective_kernel(conv, strict=False)
        if kernel.folded:
            warnings.warn(f"{caller}: {'; '.join(kernel.folded)}", UserWarning, stacklevel=3)
        if isinstance(rank, float):  # a fraction of the channels per group, as in ttconv.convert
            fraction = args.fraction(rank, "rank", "a float rank is a fraction of the channels per group")
            rows_per_group, cols_per_group = kernel.weight.shape[0] // conv.groups, kernel.weight.shape[1]
            rank = (max(1, math.ceil(fraction * rows_per_group)), max(1, math.ceil(fraction * cols_per_group)))
        return cls._from_kernel(kernel.weight, kernel.bias, _conv_arguments(conv), rank=rank, energy=energy,
                                path=path, refine=refine)

    @classmethod
    def from_conv2d(
        cls: Type[_Layer],
        conv: nn.Conv2d,
        rank: Union[RankSpec, float] = None,
        energy: Optional[float] = None,
        *,
        path: ForwardPath = "auto",
        refine: int = 0,
    ) -> _Layer:
        """Convert a dense ``nn.Conv2d`` (exact at full rank).

        Parameters
        ----------
        conv : nn.Conv2d
            Its stride, padding, dilation, groups, padding mode, bias, dtype and device are
            carried over. Weights must be finite. The kernel converted is the one the conv
            computes with in eval mode: for a conv reparametrized by
            ``nn.utils.spectral_norm`` / ``weight_norm`` / ``prune`` (forward pre-hooks) or
            ``torch.nn.utils.parametrize`` that effective kernel is folded, and a
            ``UserWarning`` says so (the new layer does not enforce the
            reparametrization). Hooks, ``requires_grad`` and the training flag are not
            carried over; ``ttconv.convert`` does that.
        rank : None, int, (r_out, r_in) or float
            Per-group ranks (clamped as in the constructor). A float in ``(0, 1]`` is a
            fraction of the channels per group, rounded up: ``ceil(rank * c_out/g)`` and
            ``ceil(rank * c_in/g)`` (as ``ttconv.convert``'s float ``rank``). Exclusive with
            ``energy``.
        energy : float in (0, 1], optional
            Keep the smallest ranks whose TT form keeps this fraction of the whole
            kernel's squared Frobenius norm, ``||W_hat||^2 >= energy ||W||^2`` (relative
            error at most ``sqrt(1 - energy)``; see ``ttconv.tt.decompose``).
        path : {'auto', 'dense', 'factored'}
        refine : int, default 0
            Iterations of alternating optimisation of ``U`` and ``V`` (HOOI) after the
            one-pass truncation, at the same ranks: the error never increases, and
            ``relative_error`` stays the exact error of the result. Worth it for
            truncated 3x3 (and larger) kernels, where it lowers the error by a few percent
            at roughly the cost of one more conversion per iteration; no effect at full
            rank or on 1x1 kernels (see ``ttconv.tt.decompose``).

        Returns
        -------
        SVDConv
            In canonical form; ``relative_error`` is the relative Frobenius error
            ``||W - W_hat|| / ||W||``, which equals the optimal truncation error of the
            two unfoldings truncated (0 up to round-off at full rank), or with ``refine``
            the error of the refined factors.
        """
        if cls._dims != 2 or cls._transposed or not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}"
                            + ("" if cls._dims == 2 and not cls._transposed else
                               f"; use {cls.__name__}.from_conv for a {cls._torch_class.__name__}"))
        return cls._from_conv(conv, rank, energy, path, refine, "SVDConv.from_conv2d")

    @classmethod
    def _from_kernel(
        cls: Type[_Layer],
        weight: Tensor,
        bias: Optional[Tensor],
        arguments: Dict[str, Any],
        rank: RankSpec = None,
        energy: Optional[float] = None,
        path: ForwardPath = "auto",
        refine: int = 0,
    ) -> _Layer:
        """An ``SVDConv`` with ``nn.Conv2d`` constructor ``arguments`` holding ``weight``."""
        flat = weight if cls._dims == 2 else weight.reshape(*weight.shape[:2], -1, 1)  # taps as (taps, 1)
        result = decompose(flat, arguments["groups"], rank=rank, energy=energy, refine=refine)
        arguments = dict(arguments, bias=bias is not None)
        layer = torch.nn.utils.skip_init(
            cls, **arguments, device=weight.device, dtype=weight.dtype, rank=result.ranks, path=path
        )
        with torch.no_grad():
            layer._copy_factors(result.factors)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.relative_error = result.relative_error
        return layer

    def to_conv(self) -> _ConvNd:
        """The plain torch layer of this kind (``nn.Conv1d``, ..., ``nn.ConvTranspose3d``) computing
        the same function (same dtype and device)."""
        conv = torch.nn.utils.skip_init(self._torch_class, **_conv_arguments(self), device=self.U.device,
                                        dtype=self.U.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def to_conv2d(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing the same function (same dtype and device)."""
        if self._dims != 2 or self._transposed:
            raise TypeError(f"to_conv2d is for SVDConv; use {type(self).__name__}.to_conv()")
        conv = torch.nn.utils.skip_init(nn.Conv2d, **_conv_arguments(self), device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    # ------------------------------------------------------- maintenance
    @torch.no_grad()
    def canonicalize_(self: _Layer) -> _Layer:
        """Restore the exact canonical form in place without changing the layer's function.

        Afterwards ``U``, ``V`` have orthonormal columns, the core's unfolding orthonormal
        rows, and ``S`` holds the singular values of the kernel's ``(c_out/g, c_in/g*kh*kw)``
        unfolding, sorted descending. Parameters keep their identity (optimizer state
        stays attached; moments are not transformed). Cost ``O(c r^2 + r^3 kh kw)``.
        """
        if self.core_kind == "orthogonal":
            # Re-centre the raw factors on their orthonormal bases (a fixed point of the
            # sign-fixed QR), so they stay well conditioned; the function is unchanged.
            factors = self.factors()
            self.U.copy_(factors.U)
            self.V.copy_(factors.V)
            return self
        self._copy_factors(canonicalize(self.U, self.S, self._tt_core(self.core), self.V, self.groups))
        return self

    # ------------------------------------------------------------- module
    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._dims:
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else f", padding={self.padding}"
        if self._transposed and self.output_padding != (0,) * self._dims:
            s += f", output_padding={self.output_padding}"
        if self.dilation != (1,) * self._dims:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        s += f", rank={self.ranks}"
        if self.core_kind != "general":
            s += f", core_kind={self.core_kind!r}"
        if self.max_singular_value is not None:
            s += f", max_singular_value={self.max_singular_value}"
        if self.path != "auto":
            s += f", path={self.path!r}"
        return s

    # ---------------------------------------------------------- checkpoint
    def _config(self) -> Dict[str, Any]:
        """The constructor keywords that shapes alone do not pin down."""
        return dict(rank=self.ranks, core_kind=self.core_kind, max_singular_value=self.max_singular_value, path=self.path)

    def get_extra_state(self) -> Tensor:
        """The configuration as an int64 vector (see ``_STATE_FIELDS``); plain tensor data."""
        bound = self.max_singular_value
        bits = struct.unpack("<q", struct.pack("<d", 0.0 if bound is None else float(bound)))[0]
        values = [_STATE_FORMAT, *self.ranks, _CORES.index(self.core_kind), int(bound is not None), bits,
                  _PATHS.index(self.path)]
        # On the CPU whatever torch's default device: configuration, not data for a kernel.
        return torch.tensor(values, dtype=torch.int64, device="cpu")

    def set_extra_state(self, state: Any) -> None:
        """Check a stored configuration against this layer; ``RuntimeError`` if it differs."""
        problem = self._config_mismatch(_decode_extra_state(state))
        if problem:
            raise RuntimeError(problem)

    def _config_mismatch(self, saved: Dict[str, Any]) -> str:
        """Why a checkpoint layer of configuration ``saved`` cannot load into this one ('' if it can).

        ``path`` is a runtime choice that does not change the function: not checked.
        """
        mine = self._config()
        for key in ("rank", "core_kind", "max_singular_value"):
            if saved[key] != mine[key]:
                return (
                    f"the checkpoint's {type(self).__name__} has {key}={saved[key]!r}, this layer {key}={mine[key]!r}; "
                    "load with load_converted(model, state_dict) (from ttconv.convert), which builds layers of the "
                    "stored configuration, into the model the checkpoint was converted from"
                )
        return ""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        name = prefix[:-1] if prefix else type(self).__name__
        version = local_metadata.get("version")
        if version is not None and version > self._version:
            error_msgs.append(
                f"{name}: checkpoint was written by a newer ttconv ({type(self).__name__} state "
                f"version {version}, this version reads up to {self._version}); upgrade ttconv to load it"
            )
            return
        key = prefix + "_extra_state"
        if key in state_dict:
            # Checked before the parameters, so the message says what differs (ranks, core,
            # bound) rather than only which shapes do; a mismatch loads nothing here.
            try:
                problem = self._config_mismatch(_decode_extra_state(state_dict[key]))
            except ValueError as error:
                problem = str(error)
            if problem:
                error_msgs.append(f"{name}: {problem}")
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key not in state_dict and (version is None or version < 2) and key in missing_keys:
            # Version 1 wrote no extra state (and a state dict rebuilt as a plain dict has no
            # version): the parameter shapes are then the only check, as they were.
            missing_keys.remove(key)


class SVDConv(_SVDConvNd):
    r"""2-D convolution whose kernel is kept as ``U diag(S) core V^T`` (tensor-train form).

    Takes every argument of ``torch.nn.Conv2d`` with the same meaning and computes
    the same function (``padding='same'/'valid'``, all four padding modes, rectangular
    kernels, ``groups``: each group has its own factors).

    Parameters
    ----------
    in_channels : int
        Channels of the input.
    out_channels : int
        Channels of the output.
    kernel_size : int or (int, int)
        Spatial size of the kernel.
    stride : int or (int, int), default 1
    padding : int, (int, int), 'same' or 'valid', default 0
        Padding added on both sides of each spatial axis, as in ``torch.nn.Conv2d``.
    dilation : int or (int, int), default 1
    groups : int, default 1
        Channel groups; both channel counts must be divisible by it. Each group has its
        own factors.
    bias : bool, default True
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}, default 'zeros'
    device : torch.device or str, optional
    dtype : torch.dtype, optional
    rank : None, int or (int, int), keyword-only
        Per-group ranks ``(r_out, r_in)``; ``None`` is full rank (every kernel exactly
        representable), one int sets both. Values above what the shape allows are
        clamped to ``r_out <= min(c_out/g, r_in*kh*kw)``, ``r_in <= min(c_in/g, r_out*kh*kw)``;
        the effective ranks are in ``ranks`` and ``repr``.
    path : {'auto', 'dense', 'factored', 'separable'}, keyword-only
        How ``forward`` computes: ``'dense'`` composes the kernel and runs one conv,
        ``'factored'`` runs three (1x1, core, 1x1; a 1x1 layer two channel mixings),
        ``'separable'`` (``core_kind='orthogonal'``) runs the orthogonal
        kernel's two halves as two convs, the taps of every axis but the last and then the
        last axis's (``ttconv.orthogonal.bcop_halves``: fewer multiply-adds per position and
        no joining product), ``'auto'`` picks the one of lower modelled cost for the actual
        input shape (``path_costs``: multiply-adds, memory traffic and per-call overhead,
        calibrated on CPU timings; ``choose_path`` says which). All give the same result.
        On large inputs the 1x1 channel mixings run as batched matmuls.
    core_kind : {'general', 'orthogonal'}, keyword-only
        ``'general'`` (default): any kernel of the given ranks. ``'orthogonal'``: a core cut
        from an exactly orthogonal convolution (BCOP, ``ttconv.orthogonal``), with ``U``, ``V``
        orthonormalised in ``forward``; then the layer's singular values are exactly ``|S|``
        (circular padding, any stride and dilation, each repeated once per output position)
        and ``max |S|`` bounds the norm for zero padding. ``rank=None`` or an int gives a
        square core (``r <= min(c_out/g, c_in/g)``); a pair ``(r_out, r_in)`` may differ
        (channel padding; ``r_out > r_in`` needs stride 1). ``S`` then has
        ``min(r_out, r_in)`` values per group. See ``docs/orthogonal.md``.
    max_singular_value : float, keyword-only
        With ``core_kind='orthogonal'``: ``S = max_singular_value * sigmoid(raw)``, so every
        singular value stays below the bound at all times during training.

    Attributes
    ----------
    U : Parameter ``(out_channels, r_out)``
        Output factor, orthonormal columns per group.
    S : Parameter ``(groups * r_out,)``
        Singular values of the unfolding ``W.reshape(out_channels/g, -1)`` per group, in
        canonical form (after construction, conversion or ``canonicalize_``). With
        ``core_kind='orthogonal'``: ``(groups * min(r_out, r_in),)``, the layer's singular values
        (raw values under ``max_singular_value``; ``effective_S()`` gives them).
    core : Parameter ``(groups * r_out, r_in, kh, kw)``
        Middle core; its unfolding has orthonormal rows in canonical form. With
        ``core_kind='orthogonal'``: the BCOP generators ``(groups, 1 + (kh - 1) + (kw - 1), r, r)``,
        ``r = max(r_out, r_in)`` (``factors()`` gives the core they define).
    V : Parameter ``(in_channels, r_in)``
        Input factor, orthonormal columns per group.
    bias : Parameter ``(out_channels,)`` or None
    weight : Tensor ``(out_channels, in_channels/groups, kh, kw)``
        The composed dense kernel, ``dense_weight`` (differentiable, not a parameter,
        not in the ``state_dict``), for code written for ``nn.Conv2d`` that reads
        ``.weight``. Writing *into* the returned tensor (``nn.init.*_(layer.weight)``)
        changes a temporary, not the layer; *assigning* ``layer.weight = tensor`` does set
        the kernel (see ``set_dense_weight_``), so
        ``torch.nn.utils.fusion.fuse_conv_bn_eval(layer, bn)`` works.
    relative_error : float or None
        Relative Frobenius error of ``from_conv2d``'s truncation (``None`` otherwise).

    Notes
    -----
    The ``state_dict`` holds ``U, S, core, V, bias`` and, since state format version 2,
    an ``_extra_state`` int64 vector with the configuration that shapes alone do not
    pin down: ranks, core kind, ``max_singular_value`` and path. Loading checks it, so
    a checkpoint never loads silently into a layer of other ranks, another core kind or
    another bound (the error names the layer and both values);
    ``ttconv.convert.load_converted`` builds layers of the stored configuration.
    Version 1 checkpoints (no extra state) still load.

    Examples
    --------
    >>> layer = SVDConv(16, 32, kernel_size=3, padding=1, rank=8)
    >>> layer
    SVDConv(16, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), rank=(8, 8))
    >>> layer(torch.randn(2, 16, 8, 8)).shape
    torch.Size([2, 32, 8, 8])
    >>> layer.singular_values(input_size=(8, 8)).shape   # min(32, 16) * 8 * 8, descending
    torch.Size([1024])
    """

    _dims = 2
    _transposed = False
    _torch_class = nn.Conv2d


SVDConv2d = SVDConv
"""``SVDConv2d`` is ``SVDConv`` (the same class), named like ``torch.nn.Conv2d``."""


class SVDConv1d(_SVDConvNd):
    """1-D convolution kept as ``U diag(S) core V^T``: ``torch.nn.Conv1d``'s arguments and function.

    Everything as in ``SVDConv`` (the 2-D layer), with tuples of length 1: ``rank``,
    ``path``, ``from_conv`` / ``to_conv`` (``nn.Conv1d``), ``canonicalize_``, state
    dict and ``extra_repr``. The core is a 1-D kernel ``(groups * r_out, r_in, *kernel_size)``.
    ``core_kind='orthogonal'`` as in 2-D (BCOP along the one axis). ``singular_values(n)`` gives the exact
    circular spectrum from the core.
    """

    _dims = 1
    _transposed = False
    _torch_class = nn.Conv1d


class SVDConv3d(_SVDConvNd):
    """3-D convolution kept as ``U diag(S) core V^T``: ``torch.nn.Conv3d``'s arguments and function.

    Everything as in ``SVDConv`` (the 2-D layer), with tuples of length 3: ``rank``,
    ``path``, ``from_conv`` / ``to_conv`` (``nn.Conv3d``), ``canonicalize_``, state
    dict and ``extra_repr``. The core is a 3-D kernel ``(groups * r_out, r_in, *kernel_size)``.
    ``core_kind='orthogonal'`` as in 2-D (BCOP blocks along each of the three axes). ``singular_values(n)``
    gives the exact circular spectrum from the core (3-D DFT).
    """

    _dims = 3
    _transposed = False
    _torch_class = nn.Conv3d


def _no_output_size_in_trace(output_size: Any) -> None:
    """Run by a torch.fx graph traced from a transposed layer's own ``forward``: the graph takes
    ``output_size`` as an input but was traced without it (the output padding it asks for
    depends on the input's size, which the trace did not know), so a value given there is
    refused instead of ignored."""
    if output_size is not None:
        raise RuntimeError(
            "this torch.fx graph was traced from a ttconv transposed layer without output_size and computes the "
            "layer's default output size only; trace with a torch.fx.Tracer that keeps ttconv's layers as leaves "
            "(is_leaf_module), set output_padding at construction, or use torch.export / torch.compile")


torch.fx.wrap("_no_output_size_in_trace")  # recorded in a traced graph, run when the graph runs


class _SVDConvTransposeNd(_SVDConvNd):
    """Transposed layers: torch's ``ConvTranspose`` constructor order and ``forward(input, output_size)``."""

    _transposed = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        output_padding: Any = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: Any = 1,
        padding_mode: PaddingMode = "zeros",
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        rank: RankSpec = None,
        path: ForwardPath = "auto",
        core_kind: CoreKind = "general",
        max_singular_value: Optional[float] = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype, rank=rank, path=path, core_kind=core_kind, max_singular_value=max_singular_value,
            output_padding=output_padding,
        )

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        """As ``torch.nn.ConvTranspose{d}d.forward``: ``output_size`` picks the output padding."""
        if isinstance(output_size, torch.fx.Proxy) and output_size.node.op == "placeholder":
            # The traced layer's own argument (the trace's root), None unless the graph's caller
            # passes one: the graph checks it when it runs.
            _no_output_size_in_trace(output_size)
            return self._forward(input, self.output_padding)
        if output_size is None:
            return self._forward(input, self.output_padding)
        if isinstance(input, torch.fx.Proxy) or isinstance(output_size, torch.fx.Proxy):
            # The output padding output_size asks for depends on the input's size, which a symbolic
            # trace does not know: tracing on without it would record a different function.
            raise RuntimeError(
                f"torch.fx.symbolic_trace cannot trace {type(self).__name__}.forward with output_size: the output "
                "padding it picks depends on the input's size, which a symbolic trace does not know. Trace with a "
                "torch.fx.Tracer whose is_leaf_module keeps ttconv's layers as leaves (as torch's own convs are), "
                "set output_padding at construction instead, or use torch.export / torch.compile, which see sizes")
        self._check_input(input)
        # Borrowed from torch: given output_size it reads nothing from self, and it takes any int
        # sequences (its list[int] hints are narrower; torch's own forward ignores them too).
        borrowed = cast(Callable[..., List[int]], nn.modules.conv._ConvTransposeNd._output_padding)
        output_padding = borrowed(
            self, input, output_size, self.stride, self.padding, self.kernel_size, self._dims, self.dilation
        )
        return self._forward(input, tuple(output_padding))


class SVDConvTranspose1d(_SVDConvTransposeNd):
    """1-D transposed convolution kept in TT form: ``torch.nn.ConvTranspose1d``'s arguments and function.

    Same constructor arguments (``output_padding``, ``groups``, ``dilation``; padding mode
    'zeros' only, as torch) and ``forward(input, output_size=None)``. The TT form is that of
    torch's weight ``(in_channels, out_channels/groups, *kernel_size)``: ``U`` is
    ``(in_channels, r_1)``, ``V`` is ``(out_channels, r_2)``, ``core`` is
    ``(groups * r_1, r_2, *kernel_size)`` and ``rank=(r_1, r_2)`` counts in that order. This
    layer is the adjoint of the convolution from ``out_channels`` to ``in_channels`` with that
    weight, so its singular values are that convolution's (the meaning of ``S``).
    ``singular_values(m)`` (circular, on an input of size ``m``) are those of that
    convolution on ``m * stride``. With ``core_kind='orthogonal'`` those are exactly ``|S|``, ``m^d``
    times each (the adjoint of ``U diag(S) Q V^T`` has the same singular values).
    """

    _dims = 1
    _torch_class = nn.ConvTranspose1d


class SVDConvTranspose2d(_SVDConvTransposeNd):
    """2-D transposed convolution kept in TT form: ``torch.nn.ConvTranspose2d``'s arguments and function.

    Same constructor arguments (``output_padding``, ``groups``, ``dilation``; padding mode
    'zeros' only, as torch) and ``forward(input, output_size=None)``. The TT form is that of
    torch's weight ``(in_channels, out_channels/groups, *kernel_size)``: ``U`` is
    ``(in_channels, r_1)``, ``V`` is ``(out_channels, r_2)``, ``core`` is
    ``(groups * r_1, r_2, *kernel_size)`` and ``rank=(r_1, r_2)`` counts in that order. This
    layer is the adjoint of the convolution from ``out_channels`` to ``in_channels`` with that
    weight, so its singular values are that convolution's (the meaning of ``S``).
    ``singular_values(m)`` (circular, on an input of size ``m``) are those of that
    convolution on ``m * stride``. With ``core_kind='orthogonal'`` those are exactly ``|S|``, ``m^d``
    times each (the adjoint of ``U diag(S) Q V^T`` has the same singular values).
    """

    _dims = 2
    _torch_class = nn.ConvTranspose2d


class SVDConvTranspose3d(_SVDConvTransposeNd):
    """3-D transposed convolution kept in TT form: ``torch.nn.ConvTranspose3d``'s arguments and function.

    Same constructor arguments (``output_padding``, ``groups``, ``dilation``; padding mode
    'zeros' only, as torch) and ``forward(input, output_size=None)``. The TT form is that of
    torch's weight ``(in_channels, out_channels/groups, *kernel_size)``: ``U`` is
    ``(in_channels, r_1)``, ``V`` is ``(out_channels, r_2)``, ``core`` is
    ``(groups * r_1, r_2, *kernel_size)`` and ``rank=(r_1, r_2)`` counts in that order. This
    layer is the adjoint of the convolution from ``out_channels`` to ``in_channels`` with that
    weight, so its singular values are that convolution's (the meaning of ``S``).
    ``singular_values(m)`` (circular, on an input of size ``m``) are those of that
    convolution on ``m * stride``. With ``core_kind='orthogonal'`` those are exactly ``|S|``, ``m^d``
    times each (the adjoint of ``U diag(S) Q V^T`` has the same singular values).
    """

    _dims = 3
    _torch_class = nn.ConvTranspose3d


def _decode_extra_state(state: Any) -> Dict[str, Any]:
    """The configuration stored by ``SVDConv.get_extra_state``, as constructor keywords.

    Returns ``dict(rank=(r_out, r_in), core_kind=..., max_singular_value=..., path=...)``;
    raises ``ValueError`` for anything that is not such a vector.
    """
    values = state.tolist() if isinstance(state, Tensor) and state.dtype == torch.int64 and state.dim() == 1 else None
    if values is None or len(values) != len(_STATE_FIELDS) or values[0] != _STATE_FORMAT:
        raise ValueError(
            f"malformed SVDConv extra state {state!r}: expected an int64 vector {_STATE_FIELDS} of format "
            f"{_STATE_FORMAT} (written by SVDConv.get_extra_state)"
        )
    _, r_out, r_in, core, bounded, bits, path = values
    if not (0 <= core < len(_CORES) and 0 <= path < len(_PATHS) and bounded in (0, 1) and r_out > 0 and r_in > 0):
        raise ValueError(f"malformed SVDConv extra state {values}: fields {_STATE_FIELDS} out of range")
    bound = struct.unpack("<d", struct.pack("<q", bits))[0] if bounded else None
    if bound is not None and not 0.0 < bound < math.inf:
        raise ValueError(f"malformed SVDConv extra state {values}: its max_singular_value {bound!r} is not a positive "
                         "finite number")
    return dict(rank=(r_out, r_in), core_kind=_CORES[core], max_singular_value=bound, path=_PATHS[path])
