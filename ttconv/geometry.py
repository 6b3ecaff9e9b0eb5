"""One description of a convolution's geometry: ``ConvSpec`` (1-D, 2-D and 3-D, plain and transposed).

The lowest floor of the package (it imports only torch and ``_conv_args``): spectra, bounds,
control and report take a ``ConvSpec`` and need not know which layer class produced it.

A spec always holds the kernel of a *convolution*, ``(c_out, c_in/groups, *kernel_size)``
with ``d = kernel.dim() - 2`` spatial axes, and its stride, padding, dilation, groups and
padding mode (tuples of length ``d``, as ``nn.Conv{d}d`` stores them). ``transposed=True``
says the layer is the *adjoint* of that convolution, as ``nn.ConvTranspose{d}d`` is: its
weight ``(in_channels, out_channels/groups, *k)`` is the kernel of the conv from the
transposed layer's output channels to its input channels (``docs/math.md``, "Transposed
convolutions", for the exact correspondence, ``output_padding`` included).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Union

from torch import Tensor, nn

from . import _conv_args as args

__all__ = ["ConvSpec", "conv_spec", "check_kernel", "size_arg"]


def check_kernel(kernel: Any, groups: int, name: str = "weight") -> int:
    """Validate a floating-point conv kernel ``(c_out, c_in/groups, *k)`` with 1, 2 or 3 spatial axes.

    Same checks and messages as ``_conv_args.check_kernel`` (finite values, ``c_out``
    divisible by ``groups``). Returns ``groups`` as an int.
    """
    if not isinstance(kernel, Tensor):
        raise TypeError(f"{name} must be a Tensor, a torch conv layer, an SVD conv layer or a ConvSpec, "
                        f"got {type(kernel).__name__}")
    if kernel.dim() not in (3, 4, 5):
        raise ValueError(f"{name} must be a 3-D, 4-D or 5-D tensor (c_out, c_in/groups, *kernel_size) for a "
                         f"1-D, 2-D or 3-D convolution, got {tuple(kernel.shape)}")
    groups = args.check_kernel(kernel if kernel.dim() == 4 else kernel.reshape(*kernel.shape[:2], -1, 1), groups,
                               name)
    if not kernel.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {kernel.dtype}")
    return groups


def size_arg(value: Any, dims: int, name: str = "input_size") -> Tuple[int, ...]:
    """A spatial size: an int (the same along every axis) or ``dims`` positive ints."""
    if dims == 2:
        return args.input_size_arg(value, name)
    try:
        return args.ntuple(value, name, dims)
    except TypeError:
        raise TypeError(f"{name} must be an int or a tuple of {dims} ints (one per spatial axis of the "
                        f"{dims}-D input), got {value!r}") from None


@dataclass(frozen=True, eq=False)
class ConvSpec:
    """A convolution's kernel with its geometry; every field normalised and validated on creation.

    Parameters
    ----------
    kernel : Tensor
        ``(c_out, c_in/groups, *kernel_size)``, ``d = 1, 2, 3`` spatial axes: the kernel of
        the convolution (for a transposed layer, torch's ``ConvTranspose`` weight
        ``(in_channels, out_channels/groups, *k)``, the conv the layer is the adjoint of).
        For an SVD layer, its orthonormal core, which has the same nonzero singular values
        as the dense kernel for every padding mode and size.
    stride, dilation : int or tuple of d ints
    padding : 'same', 'valid', int or tuple of d ints
        As ``nn.Conv{d}d`` (``'same'`` only at stride 1). For ``transposed=True`` an int
        or tuple: the padding of the conv the layer is the adjoint of, which is what
        ``ConvTranspose``'s ``padding`` means.
    groups : int
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}
        Only ``'zeros'`` for ``transposed=True`` (as torch's ``ConvTranspose``).
    transposed : bool
        The layer's operator on an input of size ``n`` is the adjoint of this conv (zero
        padded) on the size ``N = (n - 1) s - 2 p + d (k - 1) + output_padding + 1``,
        restricted to the conv's first ``n`` outputs (all of them unless
        ``output_padding >= stride``): ``conv_input_size`` gives ``N``. Its singular
        values are those of that (restricted) conv.
    output_padding : int or tuple of d ints
        Transposed only, each entry below its stride or dilation.
    singular_values_are_s : bool
        The layer's singular values are ``|s|`` (an orthogonal core): on the circular grid
        every output position repeats each of them. Set by the layer, with ``s``.
    s : Tensor, optional
        The layer's ``S`` (required with ``singular_values_are_s``, else ``None``).
    """

    kernel: Tensor
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: Any = 0
    singular_values_are_s: bool = False
    s: Optional[Tensor] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        groups = check_kernel(self.kernel, self.groups, "kernel")
        d = self.kernel.dim() - 2
        stride = args.ntuple(self.stride, "stride", d)
        dilation = args.ntuple(self.dilation, "dilation", d)
        if self.transposed and isinstance(self.padding, str):
            raise ValueError(f"a transposed ConvSpec takes padding as an int or a tuple of {d} ints, got "
                             f"{self.padding!r} (torch's ConvTranspose layers have no 'same'/'valid')")
        padding = args.padding_arg(self.padding, stride)
        mode = args.padding_mode_arg(self.padding_mode)
        if not isinstance(self.transposed, bool):
            raise TypeError(f"transposed must be a bool, got {self.transposed!r}")
        if self.transposed:
            if mode != "zeros":
                raise ValueError(f"a transposed ConvSpec has padding_mode='zeros' (torch's ConvTranspose "
                                 f"supports no other), got {mode!r}")
            output_padding = args.output_padding_arg(self.output_padding, stride, dilation)
        else:
            output_padding = args.ntuple(self.output_padding, "output_padding", d, minimum=0)
            if any(output_padding):
                raise ValueError(f"output_padding={output_padding} is for transposed specs only; pass "
                                 "transposed=True or drop it")
        if self.singular_values_are_s:
            if not isinstance(self.s, Tensor):
                raise ValueError("singular_values_are_s=True needs s, the tensor of the layer's singular values")
        elif self.s is not None:
            raise ValueError("s is only given with singular_values_are_s=True")
        for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation), ("groups", groups),
                            ("padding_mode", mode), ("output_padding", output_padding)):
            object.__setattr__(self, name, value)

    @property
    def dims(self) -> int:
        """Number of spatial axes ``d``."""
        return self.kernel.dim() - 2

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        return tuple(self.kernel.shape[2:])

    @property
    def reversed_padding(self) -> Tuple[int, ...]:
        """Padding for ``F.pad`` (last axis first), as ``nn.Conv{d}d`` applies it."""
        return args.reversed_padding_repeated_twice(self.padding, self.kernel_size, self.dilation)

    @property
    def axis_padding(self) -> Tuple[Tuple[int, int], ...]:
        """``(before, after)`` padding per spatial axis, first axis first."""
        flat = self.reversed_padding
        d = self.dims
        return tuple((flat[2 * (d - 1 - a)], flat[2 * (d - 1 - a) + 1]) for a in range(d))

    def conv_input_size(self, input_size: Any) -> Tuple[int, ...]:
        """The size the conv of this spec acts on when the layer sees ``input_size``.

        For a plain spec, ``input_size`` itself. For a transposed spec, the transposed
        layer's output size ``N = (n - 1) s - 2 p + d (k - 1) + output_padding + 1``: the
        layer is the adjoint of the zero-padded conv on ``N`` (its first ``n`` outputs).
        """
        n = size_arg(input_size, self.dims)
        if not self.transposed:
            return n
        out = tuple((n_a - 1) * s - 2 * p + dil * (k - 1) + op + 1 for n_a, s, p, dil, k, op in
                    zip(n, self.stride, self.padding, self.dilation, self.kernel_size, self.output_padding))
        if min(out) < 1:
            raise ValueError(f"input_size {n} gives the transposed layer an empty output {out}; "
                             "use a larger input or less padding (torch refuses this input too)")
        return out

    def adjoint(self) -> ConvSpec:
        """For a transposed spec: the plain spec of the conv it is the adjoint of (zero padding,
        no output_padding). Its operator on ``conv_input_size(n)`` has the layer's singular
        values (after dropping its outputs beyond ``n``, when ``output_padding >= stride``)."""
        return dataclasses.replace(self, transposed=False, output_padding=0)


def _spec_of_svd_layer(target: Any) -> ConvSpec:
    """Duck-typed spec of an SVD conv layer (``orthonormal_core`` and torch's geometry attributes)."""
    transposed = bool(getattr(target, "_transposed", False))
    orthogonal = getattr(target, "core_kind", "general") == "orthogonal"
    s = target.effective_S() if orthogonal and callable(getattr(target, "effective_S", None)) else None
    return ConvSpec(target.orthonormal_core(), tuple(target.stride), target.padding, tuple(target.dilation),
                    target.groups, target.padding_mode, transposed,
                    tuple(getattr(target, "output_padding", (0,) * len(target.stride))) if transposed else 0,
                    s is not None, s)


def conv_spec(
    target: Any,
    *,
    stride: Any = 1,
    dilation: Any = 1,
    groups: int = 1,
    padding: Any = 0,
    padding_mode: str = "zeros",
    transposed: bool = False,
    output_padding: Any = 0,
) -> ConvSpec:
    """Normalise a kernel, a conv layer or a spec into a ``ConvSpec``.

    * a ``ConvSpec`` is returned as it is (it was validated when created);
    * an object with a ``conv_spec()`` method (the SVD layers) gives its own spec;
    * any torch conv ``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d`` (``_ConvNd``):
      its weight and geometry (``transposed`` and ``output_padding`` from the layer);
    * an object with ``orthonormal_core()`` and conv attributes (an SVD layer without
      ``conv_spec()``): its orthonormal core and geometry;
    * a kernel tensor ``(c_out, c_in/groups, *k)``: the geometry keywords (an int or one
      value per spatial axis). Keywords are only for kernels: given with a layer or a spec,
      which carry their own geometry, they are refused (a ``TypeError`` naming them)
      rather than silently ignored.
    """
    if isinstance(target, Tensor):
        check_kernel(target, groups)
        return ConvSpec(target, stride, padding, dilation, groups, padding_mode, transposed, output_padding)
    given = [name for name, value, default in (
        ("stride", stride, 1), ("dilation", dilation, 1), ("groups", groups, 1), ("padding", padding, 0),
        ("padding_mode", padding_mode, "zeros"), ("transposed", transposed, False),
        ("output_padding", output_padding, 0)) if value is not default]
    if given:
        raise TypeError(f"{', '.join(given)} given with a {type(target).__name__}, which carries its own geometry: "
                        "geometry keywords are only for kernel tensors; drop them, or pass the kernel "
                        "(e.g. layer.weight) with the geometry you mean")
    if isinstance(target, ConvSpec):
        return target
    problem = args.padding_in_effect_problem(target)
    if problem:
        raise ValueError(f"{type(target).__name__}: {problem}")
    method = getattr(target, "conv_spec", None)
    if callable(method):
        spec = method()
        if not isinstance(spec, ConvSpec):
            raise TypeError(f"{type(target).__name__}.conv_spec() must return a ttconv ConvSpec, got "
                            f"{type(spec).__name__}")
        return spec
    if isinstance(target, nn.modules.conv._ConvNd):
        transposed = bool(target.transposed)
        return ConvSpec(target.weight, tuple(target.stride), target.padding, tuple(target.dilation), target.groups,
                        target.padding_mode, transposed, tuple(target.output_padding) if transposed else 0)
    if callable(getattr(target, "orthonormal_core", None)) and hasattr(target, "stride"):
        return _spec_of_svd_layer(target)
    check_kernel(target, groups)  # raises the TypeError naming what is accepted
    raise AssertionError  # pragma: no cover


ConvLike = Union[Tensor, nn.Module, ConvSpec]
"""What ``conv_spec`` accepts: a kernel, a conv layer (torch's or ttconv's) or a spec."""
