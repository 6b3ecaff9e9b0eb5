"""Whole-model conversion: every torch conv to its SVD counterpart and back.

``nn.Conv1d/2d/3d`` become ``SVDConv1d/2d/3d`` (``SVDConv2d`` is ``SVDConv``) and
``nn.ConvTranspose1d/2d/3d`` become ``SVDConvTranspose1d/2d/3d`` (one table,
``SVD_CLASSES``). ``convert`` recurses over ``named_children`` and replaces each conv on
its direct parent (``nn.Sequential``, ``ModuleList``, ``ModuleDict`` and custom modules
alike), initialising the SVD layer from the kernel the conv computes with; ``densify``
undoes it (each layer back to its exact torch class); ``load_converted`` loads a
converted model's ``state_dict`` into the plain model, building layers of the stored ranks.

Nothing changes silently: a conv that cannot be converted exactly (a subclass, extra
state, tied parameters) is left as it is and listed in the report with the reason; what
is folded (``spectral_norm``, ``weight_norm``, pruning, ``parametrize``) or moved (hooks)
is listed too; without ``return_report=True`` a ``UserWarning`` says it.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from . import _conv_args as args
from ._effective_kernel import (
    _REPARAMETRIZATION_HOOKS,
    TORCH_CONVS,
    _effective_kernel,
    _hook_tensor_name,
    _is_reparametrization_state_hook,
    _Kernel,
    _torch_conv_class,
    _Unconvertible,
)
from ._hooks import run_example, unwrap
from ._progress import progress_callback
from ._table import render_table
from .layer import (
    SVDConv1d,
    SVDConv2d,
    SVDConv3d,
    SVDConvTranspose1d,
    SVDConvTranspose2d,
    SVDConvTranspose3d,
    _conv_arguments,
    _decode_extra_state,
    _SVDConvNd,
)
from .tt import _truncation, factor_params, resolve_ranks

__all__ = ["convert", "densify", "load_converted", "ConversionReport", "LayerConversion", "KeptDense",
           "SVD_CLASSES"]

SVD_CLASSES: Mapping[Type[_ConvNd], Type[_SVDConvNd]] = {
    nn.Conv1d: SVDConv1d,
    nn.Conv2d: SVDConv2d,
    nn.Conv3d: SVDConv3d,
    nn.ConvTranspose1d: SVDConvTranspose1d,
    nn.ConvTranspose2d: SVDConvTranspose2d,
    nn.ConvTranspose3d: SVDConvTranspose3d,
}
"""The torch conv classes ``convert`` replaces, and the ttconv class each becomes
(``densify`` goes back through the layer's ``to_conv``, which builds this torch class)."""


_CONV_NAMES = frozenset(cls.__name__ for cls in TORCH_CONVS)
"""Class names of the torch convs, as ``torch.jit`` keeps them (``original_name``) on a compiled conv."""

RankChoice = Union[None, int, float, Tuple[int, int]]
Exclude = Union[Iterable[str], Callable[[nn.Module, str], bool]]
ProgressFn = Callable[[int, int, str], None]


@dataclass
class LayerConversion:
    """One converted layer: shapes, ranks, parameter counts, relative weight error, notes.

    ``relative_error`` compares with the kernel the conv computed with (the folded one for
    a reparametrized conv); ``notes`` say what was folded or moved to the new layer.
    """

    name: str
    shape: Tuple[int, ...]
    groups: int
    ranks: Tuple[int, int]
    params_before: int
    params_after: int
    relative_error: float
    notes: Tuple[str, ...] = ()


@dataclass
class KeptDense:
    """A conv ``convert`` left dense because its TT form would not be smaller.

    ``params_dense`` counts the conv's parameters (kernel and bias), ``params_tt`` those
    of the SVD layer it would have become at the requested setting (for a layer that
    cannot shrink at any rank, at rank ``(1, 1)``).
    """

    name: str
    reason: str
    params_dense: int
    params_tt: int


class ConversionReport:
    """Per-layer conversion results with totals; ``str()`` is an aligned table.

    Attributes
    ----------
    layers : list of LayerConversion
        The converted layers.
    excluded : list of str
        Convs kept dense because ``exclude`` matched them.
    skipped : list of (str, str)
        Convs left as they are because they cannot be converted exactly, with the reason.
    kept_dense : list of KeptDense
        Convs left dense because their TT form would not have fewer parameters (see
        ``convert``'s ``force``).
    output_error : float or None
        ``||f_converted(x) - f(x)|| / ||f(x)||`` on ``convert``'s ``example_input``
        (all outputs together, eval mode), or None without one.
    energy : float or None
        The shared energy threshold ``param_budget`` or ``output_tolerance`` chose.
    """

    def __init__(
        self,
        layers: List[LayerConversion],
        excluded: List[str],
        skipped: Optional[List[Tuple[str, str]]] = None,
        kept_dense: Optional[List[KeptDense]] = None,
        output_error: Optional[float] = None,
        energy: Optional[float] = None,
    ) -> None:
        self.layers = layers
        self.excluded = excluded
        self.skipped = list(skipped or [])
        self.kept_dense = list(kept_dense or [])
        self.output_error = output_error
        self.energy = energy

    @property
    def params_before(self) -> int:
        """Parameters of the converted convs before conversion."""
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the SVD layers that replaced them."""
        return sum(layer.params_after for layer in self.layers)

    @property
    def params_kept_dense(self) -> int:
        """Parameters of the convs kept dense because their TT form would not be smaller."""
        return sum(kept.params_dense for kept in self.kept_dense)

    @property
    def relative_error(self) -> float:
        """Largest per-layer relative Frobenius error."""
        return max((layer.relative_error for layer in self.layers), default=0.0)

    def to_dicts(self) -> List[Dict[str, object]]:
        return [dict(vars(layer)) for layer in self.layers]

    def changes(self) -> List[str]:
        """One line per skipped or kept-dense layer and per note: what did not convert plainly."""
        lines = [f"{name!r} left unchanged: {reason}" for name, reason in self.skipped]
        lines += [f"{kept.name!r} kept dense: {kept.reason}" for kept in self.kept_dense]
        lines += [f"{layer.name!r}: {note}" for layer in self.layers for note in layer.notes]
        return lines

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        header = ["layer", "shape", "groups", "ranks", "params", "-> params", "rel. error"]
        rows = [
            [layer.name, "x".join(map(str, layer.shape)), str(layer.groups), f"{layer.ranks}",
             str(layer.params_before), str(layer.params_after), f"{layer.relative_error:.2e}"]
            for layer in self.layers
        ]
        total = ["total", "", "", "", str(self.params_before), str(self.params_after),
                 f"{self.relative_error:.2e} (max)"]
        lines = render_table(header, rows, footer=[total]).split("\n")
        if self.output_error is not None:
            lines.append(f"model output rel. error on example_input: {self.output_error:.2e}"
                         " (||f_converted(x) - f(x)|| / ||f(x)||, eval mode)")
        if self.energy is not None:
            lines.append(f"shared energy threshold: {self.energy:.6g}")
        if self.kept_dense:
            lines.append(f"kept dense ({self.params_kept_dense} parameters; the TT form would not be smaller, "
                         "force= converts them):")
            lines += [f"  {kept.name}: {kept.reason}" for kept in self.kept_dense]
        if self.excluded:
            lines.append(f"excluded: {', '.join(self.excluded)}")
        if self.skipped:
            lines.append("skipped (left as they are):")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        notes = [(layer.name, note) for layer in self.layers for note in layer.notes]
        if notes:
            lines.append("notes:")
            lines += [f"  {name}: {note}" for name, note in notes]
        return "\n".join(lines)

    __repr__ = __str__


# Hooks a converted layer carries over (``_carry_over``); the reparametrizations' own are
# folded with them (``_effective_kernel``).
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")
_STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


def _svd_class(conv: nn.Module) -> Type[_SVDConvNd]:
    """The ttconv class that ``conv`` (a torch conv of ``SVD_CLASSES``, or a subclass) becomes."""
    base = _torch_conv_class(conv)
    if base is None:
        kinds = ", ".join(c.__name__ for c in SVD_CLASSES)
        raise TypeError(f"{type(conv).__name__} is not a conv that ttconv converts ({kinds})")
    return SVD_CLASSES[base]


def _parameter_owners(model: nn.Module) -> Dict[int, List[Tuple[str, int]]]:
    """``id(parameter) -> [(qualified name, id(owning module))]`` over the whole model."""
    owners: Dict[int, List[Tuple[str, int]]] = {}
    for module_name, module in model.named_modules():
        for name, param in module._parameters.items():
            if param is not None:
                qualified = f"{module_name}.{name}" if module_name else name
                owners.setdefault(id(param), []).append((qualified, id(module)))
    return owners


def _tied_elsewhere(conv: nn.Module, owners: Dict[int, List[Tuple[str, int]]]) -> Optional[str]:
    """A parameter of ``conv`` also registered outside it: its qualified name there."""
    inside = {id(module) for module in conv.modules()}
    for param in conv.parameters():
        for qualified, owner in owners.get(id(param), []):
            if owner not in inside:
                return qualified
    return None


# ----------------------------------------------------------------- carrying over
def _kernel_parameters(module: Union[_SVDConvNd, _ConvNd]) -> List[Tensor]:
    if isinstance(module, _SVDConvNd):
        return [module.U, module.S, module.core, module.V]
    return [module.weight]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("s" if count != 1 else "")


def _carry_over(source: nn.Module, target: Union[_SVDConvNd, _ConvNd], weight_frozen: bool, bias_frozen: bool,
                fold_hooks: Sequence[int] = ()) -> Tuple[List[str], List[str]]:
    """Give ``target`` the training flag, ``requires_grad`` flags and hooks of ``source``.

    Forward (pre-)hooks and backward hooks move with their order, ids and flags
    (``with_kwargs``, ``always_call``): ``target`` takes over ``source``'s hook dicts, so
    handles from ``register_forward_hook`` on ``source`` remove them from ``target``.
    ``fold_hooks`` (folded reparametrizations) are dropped. State-dict hooks expect the
    old parameter names and are dropped. Returns ``(notes, losses)``.
    """
    target.train(source.training)
    for param in _kernel_parameters(target):
        param.requires_grad_(not weight_frozen)
    if target.bias is not None:
        target.bias.requires_grad_(not bias_frozen)
    for key in fold_hooks:
        source._forward_pre_hooks.pop(key, None)
        source._forward_pre_hooks_with_kwargs.pop(key, None)
    counts = [(len(source._forward_pre_hooks), "forward pre-hook"), (len(source._forward_hooks), "forward hook"),
              (len(source._backward_pre_hooks) + len(source._backward_hooks), "backward hook")]
    for attr in _CALL_HOOKS:
        if hasattr(source, attr):
            setattr(target, attr, getattr(source, attr))
    target._is_full_backward_hook = source._is_full_backward_hook
    notes: List[str] = []
    moved = [_plural(count, word) for count, word in counts if count]
    if moved:
        notes.append(f"moved {', '.join(moved)} to the {type(target).__name__} (hooks now receive it as the module)")
    dropped = sum(1 for attr in _STATE_HOOKS for hook in getattr(source, attr, {}).values()
                  if not _is_reparametrization_state_hook(getattr(hook, "hook", hook)))
    losses = [f"dropped {_plural(dropped, 'state_dict hook')}: they expect the replaced module's parameter names"] if dropped else []
    return notes + losses, losses


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# The TT layout of a torch conv's weight ``(A, B/groups, *kernel_size)``: ``U`` has ``A`` rows,
# ``V`` has ``B``, with ``(A, B) = (out_channels, in_channels)`` for a conv and
# ``(in_channels, out_channels)`` for a transposed one (torch's layout, as the layers store it).
def _tt_channels(conv: _ConvNd) -> Tuple[int, int]:
    """Channels per group ``(A/groups, B/groups)`` of the rows of ``U`` and of ``V``."""
    rows, cols = (conv.in_channels, conv.out_channels) if conv.transposed else (conv.out_channels, conv.in_channels)
    return rows // conv.groups, cols // conv.groups


def _tt_kernel_size(conv: _ConvNd) -> Tuple[int, int]:
    """The kernel size as ``ttconv.tt`` sees it (as the SVD layers do): 2-D kernels as they
    are, the taps of others flattened into ``(taps, 1)``."""
    kernel_size = tuple(conv.kernel_size)
    return kernel_size if len(kernel_size) == 2 else (math.prod(kernel_size), 1)


def _tt_weight(conv: _ConvNd, weight: Tensor) -> Tensor:
    """``weight`` of ``conv`` as a 4-D kernel for ``ttconv.tt`` (see ``_tt_kernel_size``)."""
    return weight.reshape(*weight.shape[:2], *_tt_kernel_size(conv))


def _svd_params(conv: _ConvNd, ranks: Tuple[int, int]) -> int:
    """Parameters of the SVD layer of ``conv`` at ``ranks`` (the second rank compressed to
    ``r_1 * taps``)."""
    r_out, r_in = ranks
    kernel_size = _tt_kernel_size(conv)
    taps = kernel_size[0] * kernel_size[1]
    bias = conv.out_channels if conv.bias is not None else 0
    return factor_params(*_tt_channels(conv), kernel_size, (r_out, min(r_in, r_out * taps)), conv.groups) + bias


def _fraction_ranks(conv: _ConvNd, fraction: float) -> Tuple[int, int]:
    out_g, in_g = _tt_channels(conv)
    return max(1, math.ceil(fraction * out_g)), max(1, math.ceil(fraction * in_g))


def _never_smaller(conv: _ConvNd) -> Optional[str]:
    """Why ``conv``'s TT form has at least its parameters at every rank, or None.

    The TT form at rank ``(1, 1)`` is the smallest; if even it is not smaller than the
    dense kernel, no rank is. For a depthwise conv it also shows nothing the dense layer
    does not: each channel's kernel is its own ``1 x 1 x *kernel_size`` core.
    """
    smallest, dense = _svd_params(conv, (1, 1)), _params(conv)
    if smallest < dense:
        return None
    if conv.in_channels == conv.groups and conv.out_channels == conv.groups:
        return (f"depthwise: its TT form has {smallest} parameters at any rank, the dense conv {dense} "
                "(U, S, V add 3 per channel; each channel's kernel is its own core)")
    return f"its TT form has at least {smallest} parameters at any rank (rank (1, 1)), the dense conv {dense}"


@dataclass
class _Candidate:
    """A conv that ``convert`` may replace, and what is known about its TT form."""

    name: str
    conv: _ConvNd  # of SVD_CLASSES
    kernel: _Kernel
    forced: bool
    truncation: Any = None  # ttconv.tt._Truncation, for energy-chosen ranks


def _ranks_for(candidate: _Candidate, rank: RankChoice, energy: Optional[float],
               shrink: bool = True) -> Tuple[int, int]:
    conv = candidate.conv
    if energy is not None:
        return candidate.truncation.energy_ranks(energy, shrink=shrink)
    if isinstance(rank, float):
        rank = _fraction_ranks(conv, rank)
    return resolve_ranks(rank, *_tt_channels(conv), _tt_kernel_size(conv))


def _size(candidates: List[_Candidate], ranks: Mapping[str, Tuple[int, int]], keep_larger: bool) -> int:
    """Parameters of the considered convs: TT size, or dense where that is kept."""
    total = 0
    for candidate in candidates:
        tt_size, dense = _svd_params(candidate.conv, ranks[candidate.name]), _params(candidate.conv)
        total += dense if keep_larger and not candidate.forced and tt_size >= dense else tt_size
    return total


def _budget_energy(candidates: List[_Candidate], budget: int, fixed: int,
                   progress: Optional[ProgressFn]) -> float:
    """The largest shared energy threshold whose model fits ``budget`` (bisection).

    Sizes are probed with ``energy_ranks(shrink=False)``; the final ranks at the chosen
    threshold (shrunk) are never larger, so the result fits. At a fixed input rank a
    layer's output rank is nondecreasing in the threshold, but the tried input ranks
    include the smallest feasible one, which moves with it, so the size is nondecreasing
    only up to such steps: the result fits and the next-higher probe did not.
    """
    def size(energy: float) -> int:
        ranks = {c.name: _ranks_for(c, None, energy, shrink=False) for c in candidates}
        return fixed + _size(candidates, ranks, keep_larger=True)

    smallest = fixed + _size(candidates, {c.name: (1, 1) for c in candidates}, keep_larger=True)
    if smallest > budget:
        raise ValueError(
            f"param_budget={budget} is below the smallest possible size of the converted layers "
            f"({smallest} parameters at rank 1); raise the budget or exclude layers"
        )
    if size(1.0) <= budget:
        return 1.0
    low, high = 0.0, 1.0
    for step in range(_SEARCH_STEPS):
        middle = (low + high) / 2
        probed = size(middle)
        if probed <= budget:
            low = middle
        else:
            high = middle
        if progress is not None:
            progress(step + 1, _SEARCH_STEPS, f"budget search: energy {middle:.6g} gives {probed} parameters")
    return low


_SEARCH_STEPS = 30
"""Bisection steps on the shared energy threshold (to ~1e-9; ranks change at discrete thresholds)."""


def _excluded(exclude: Exclude, argument: str = "exclude") -> Callable[[nn.Module, str], bool]:
    if callable(exclude):
        return exclude
    if isinstance(exclude, str):
        raise TypeError(f"{argument} must be an iterable of names or patterns, or a predicate; got a single str "
                        f"{exclude!r}: wrap it in a tuple")
    if not isinstance(exclude, Iterable):
        raise TypeError(f"{argument} must be an iterable of names or patterns, or a predicate; got "
                        f"{type(exclude).__name__}: pass () for none")
    patterns = list(exclude)
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{argument} must hold str names or fnmatch patterns, got {type(bad[0]).__name__} {bad[0]!r}")
    return lambda module, name: any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def _replace(root: nn.Module, mapping: Dict[int, nn.Module]) -> None:
    """Swap children on their direct parent, recursively (never setattr with dotted names)."""
    # Not named_children(): it skips repeated occurrences of a shared module.
    for child_name, child in list(root._modules.items()):
        if child is None:
            continue
        if id(child) in mapping:
            setattr(root, child_name, mapping[id(child)])
        else:
            _replace(child, mapping)


def _copy_model(model: nn.Module, memo: Optional[Dict[int, Any]] = None) -> nn.Module:
    """``copy.deepcopy`` that also copies models with hook-based reparametrizations.

    ``weight_norm``, pruning and (after a training forward) ``spectral_norm`` keep the
    computed ``weight`` as a non-leaf tensor attribute, which ``deepcopy`` refuses. Its
    value is recomputed by the hook before every forward, so the copy gets a detached
    clone (via the memo; the original model is not touched). Pass ``memo`` to find the
    copy of a module: ``memo[id(module)]``.
    """
    memo = {} if memo is None else memo
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, _REPARAMETRIZATION_HOOKS):
                value = module.__dict__.get(_hook_tensor_name(hook))
                if isinstance(value, Tensor) and not value.is_leaf:
                    memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except RuntimeError as error:
        if "deepcopy" not in str(error):
            raise
        raise RuntimeError(f"could not deep-copy the model ({error}); pass inplace=True to convert it in place, "
                           "or deep-copy it yourself") from error


def _warn(what: str, lines: List[str], hint: str) -> None:
    warnings.warn(f"{what}{hint}:\n  " + "\n  ".join(lines), UserWarning, stacklevel=3)


def _check_arguments(rank: Any, energy: Any, param_budget: Any, output_tolerance: Any, example_input: Any,
                     refine: Any) -> None:
    """Validate the global arguments before any layer is touched; messages name the argument."""
    given = [name for name, value in (("rank", rank), ("energy", energy), ("param_budget", param_budget),
                                      ("output_tolerance", output_tolerance)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of rank, energy, param_budget and output_tolerance, got {', '.join(given)}")
    if isinstance(rank, float):
        args.fraction(rank, "rank", "a float rank is a fraction of the channels")
    elif rank is not None:
        resolve_ranks(rank, 1, 1, (1, 1))  # raises naming ``rank`` (e.g. rank=0)
    if energy is not None:
        args.fraction(energy, "energy", "the fraction of each kernel's squared norm to keep")
    if param_budget is not None:
        if isinstance(param_budget, float):
            args.fraction(param_budget, "param_budget", "a float budget is a fraction of the considered convs' "
                          "parameters; an int, a number of parameters")
        else:
            args.positive_int(param_budget, "param_budget", "a number of parameters; a float in (0, 1], a fraction "
                              "of the considered convs' parameters")
    if output_tolerance is not None:
        args.positive_finite(output_tolerance, "output_tolerance", "a relative output error")
        if example_input is None:
            raise ValueError("output_tolerance needs example_input: the output error is measured on it")
    args.non_negative_int(refine, "refine", "refinement iterations")


def _outputs(value: Any) -> List[Tensor]:
    """The floating-point tensors in a (nested) model output, in a fixed order."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() or value.is_complex() else []
    if isinstance(value, Mapping):
        return [t for key in value for t in _outputs(value[key])]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _outputs(item)]
    return []


def _run(model: nn.Module, example_input: Any) -> List[Tensor]:
    """The model's outputs on ``example_input`` in eval mode without grad; every module's
    training flag is restored (so batch-norm statistics and dropout are not touched)."""
    tensors = _outputs(run_example(model, example_input))
    if not tensors:
        raise ValueError("the model's output on example_input holds no floating-point tensor to compare")
    return tensors


def _output_error(outputs: List[Tensor], reference: List[Tensor]) -> float:
    """``||outputs - reference|| / ||reference||`` over all tensors together, in float64."""
    diff = sum(float((a.detach().to(torch.float64) - b.detach().to(torch.float64)).pow(2).sum())
               for a, b in zip(outputs, reference))
    norm = sum(float(b.detach().to(torch.float64).pow(2).sum()) for b in reference)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff / norm)


def _analyse(candidate: _Candidate) -> Any:
    """The input-side decomposition of a candidate's kernel (``ttconv.tt._Truncation``)."""
    return _truncation(_tt_weight(candidate.conv, candidate.kernel.weight), candidate.conv.groups)


def _build(candidate: _Candidate, ranks: Tuple[int, int], refine: int) -> _SVDConvNd:
    """The SVD layer (of ``SVD_CLASSES``) of one candidate at one-pass ``ranks`` from ``_ranks_for``
    (as ``_SVDConvNd._from_kernel``, reusing the input side an energy search decomposed)."""
    conv, kernel = candidate.conv, candidate.kernel
    truncation = candidate.truncation
    if truncation is None:
        truncation = _analyse(candidate)
    result = truncation.factors(*ranks, refine=refine)
    arguments = dict(_conv_arguments(conv), bias=kernel.bias is not None)
    layer = torch.nn.utils.skip_init(_svd_class(conv), **arguments, device=kernel.weight.device,
                                     dtype=kernel.weight.dtype, rank=result.ranks)
    with torch.no_grad():
        layer._copy_factors(result.factors)
        if kernel.bias is not None:
            layer.bias.copy_(kernel.bias)
    layer.relative_error = result.relative_error
    return layer


def _build_cached(cache: Dict[Tuple[str, Tuple[int, int]], _SVDConvNd], candidate: _Candidate,
                  ranks: Tuple[int, int], refine: int) -> _SVDConvNd:
    """``_build`` once per layer and ranks: the search's probes and the final model share it."""
    key = (candidate.name, ranks)
    if key not in cache:
        cache[key] = _build(candidate, ranks, refine)
    return cache[key]


def _probe(model: nn.Module, replacements: Sequence[Tuple[_Candidate, _SVDConvNd]],
           example_input: Any) -> Tuple[List[Tensor], List[str]]:
    """Run a copy of ``model`` with each candidate's conv replaced by its layer, as the
    converted model will run: the layer takes the copied conv's hooks and flags
    (``_carry_over`` from the copy; the model is not touched, and the final conversion
    hands the layer the real conv's). Returns the outputs and the names of the candidates
    whose conv still ran: the forward reaches it through a reference ``_replace`` cannot
    see (a plain list or attribute), so replacing the registered child would not change
    what runs."""
    memo: Dict[int, Any] = {}
    try:
        probe = _copy_model(model, memo)
    except RuntimeError as error:
        raise RuntimeError(f"{error}. With example_input, convert also runs a copy of the converted model (to find "
                           "convs the forward calls through other references, and for output_tolerance's search), "
                           "inplace or not: make the model deep-copyable, or convert without example_input") from error
    mapping: Dict[int, nn.Module] = {}
    watched: Dict[int, str] = {}
    for candidate, layer in replacements:
        copied = memo.get(id(candidate.conv), candidate.conv)
        kernel = candidate.kernel
        _carry_over(copied, layer, kernel.weight_frozen, kernel.bias_frozen, kernel.fold_hooks)
        mapping[id(copied)] = layer
        watched[id(copied)] = candidate.name
    probe = mapping.get(id(probe), probe)
    _replace(probe, mapping)
    ran: List[str] = []

    def record(module: nn.Module, _: Any) -> None:
        # A global hook: one on the copied conv would land in the hook dict its layer now shares.
        name = watched.get(id(module))
        if name is not None and name not in ran:
            ran.append(name)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        outputs = _run(probe, example_input)
    finally:
        handle.remove()
    return outputs, ran


def _tolerance_energy(model: nn.Module, candidates: List[_Candidate], example_input: Any,
                      reference: List[Tensor], tolerance: float, refine: int,
                      progress: Optional[ProgressFn],
                      layers: Dict[Tuple[str, Tuple[int, int]], _SVDConvNd]) -> Tuple[float, float]:
    """The smallest shared energy threshold whose model's output error is within
    ``tolerance``, by bisection; returns ``(energy, its output error)``.

    The bisection runs on ``log10(1 - energy)`` from ``-12`` (all but exact) to ``0``,
    to ``_TOLERANCE_RESOLUTION`` decades: the thresholds that matter for a model's
    outputs are often ``0.999`` and above, where a linear bisection would not look.
    Sizes grow with the threshold, but the output error need not shrink with it (errors
    of several layers can cancel), so the threshold found meets the tolerance and the
    next probe below it did not: a boundary, not necessarily the smallest such threshold.
    """
    errors: Dict[Tuple[Tuple[int, int], ...], float] = {}

    def error_at(energy: float) -> float:
        ranks = {c.name: _ranks_for(c, None, energy) for c in candidates}
        key = tuple(ranks[c.name] for c in candidates)
        if key not in errors:
            replacements = [(c, _build_cached(layers, c, ranks[c.name], refine)) for c in candidates
                            if c.forced or _svd_params(c.conv, ranks[c.name]) < _params(c.conv)]
            errors[key] = _output_error(_probe(model, replacements, example_input)[0], reference)
        return errors[key]

    def energy_of(exponent: float) -> float:
        return 1.0 - 10.0 ** exponent

    passing, failing = _TOLERANCE_EXPONENTS  # exponents of the discarded fraction 1 - energy
    passing_error = error_at(energy_of(passing))
    if passing_error > tolerance:
        raise ValueError(f"output_tolerance={tolerance:g} is below the output error at energy 1 - 1e-12 "
                         f"({passing_error:.3g}, round-off): raise the tolerance")
    steps = math.ceil(math.log2((failing - passing) / _TOLERANCE_RESOLUTION))
    for step in range(steps):
        middle = (passing + failing) / 2
        error = error_at(energy_of(middle))
        if error <= tolerance:
            passing, passing_error = middle, error
        else:
            failing = middle
        if progress is not None:
            progress(step + 1, steps, f"output search: energy {energy_of(middle):.6g} gives output error {error:.3g}")
    return energy_of(passing), passing_error


_TOLERANCE_EXPONENTS = (-12.0, 0.0)
"""The output search's range of ``log10(1 - energy)``: from all but exact to rank 1."""

_TOLERANCE_RESOLUTION = 0.01
"""Width in decades of ``1 - energy`` where the output search stops (about 2%: 11 probes)."""


def convert(
    model: nn.Module,
    rank: RankChoice = None,
    energy: Optional[float] = None,
    *,
    param_budget: Union[None, int, float] = None,
    output_tolerance: Optional[float] = None,
    example_input: Any = None,
    exclude: Exclude = (),
    force: Exclude = (),
    inplace: bool = False,
    return_report: bool = False,
    progress: Union[None, bool, ProgressFn] = None,
    refine: int = 0,
) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Replace every torch conv of ``model`` by its SVD layer, initialised from its kernel.

    Every kind is converted, through one table (``SVD_CLASSES``): ``nn.Conv1d``,
    ``nn.Conv2d``, ``nn.Conv3d`` become ``SVDConv1d``, ``SVDConv`` (= ``SVDConv2d``),
    ``SVDConv3d``, and ``nn.ConvTranspose1d/2d/3d`` become ``SVDConvTranspose1d/2d/3d``
    (whose TT form is that of torch's weight ``(in_channels, out_channels/groups, *k)``,
    so ``rank=(r_1, r_2)`` counts ``in_channels`` first there). Each SVD layer computes
    what the conv computed (exactly at full rank, up to the reported truncation error
    otherwise) and keeps its training flag, the ``requires_grad`` flags of kernel and bias
    (a frozen conv gives frozen factors), and its forward (pre-)hooks and backward hooks
    (moved, in order, with their flags).

    **Layers kept dense.** A conv whose TT form would not have fewer parameters than the
    conv itself stays as it is unless ``force`` names it:

    * at every setting, full rank included, a conv whose TT form is not smaller at *any*
      rank (at rank ``(1, 1)``, the smallest). This is every depthwise conv
      (``groups == in_channels == out_channels``, of any kind): ``U``, ``S`` and ``V`` add 3
      parameters per channel and each channel's kernel is its own core, so
      the TT form only costs (MobileNet-style nets grew 2.4x at full rank). Also tiny
      grouped 1x1 convs (e.g. 2 channels per group);
    * at a truncating setting (``rank``, ``energy``, ``param_budget``,
      ``output_tolerance``), a conv whose TT form at the chosen ranks is not smaller
      (e.g. grouped convs at ``rank=0.5``): truncating it costs accuracy and saves
      nothing.

    Full rank (no setting) converts every other conv although its TT form is usually
    larger (a 3x3 conv C -> C: ``11 C^2`` against ``9 C^2``): that conversion is exact
    and is for what the SVD form gives, the spectrum and its control, not for size.
    Kept layers are listed in ``report.kept_dense`` with the reason and both parameter
    counts (and, without ``return_report=True``, in a ``UserWarning``);
    ``force=("*",)`` converts every conv whatever its size.

    What is not a plain torch conv of ``SVD_CLASSES`` is handled as follows, and never silently: the
    report lists it (``skipped`` and per-layer ``notes``, shown by ``str(report)``) and,
    without ``return_report=True``, a ``UserWarning`` names the layers.

    * ``nn.utils.spectral_norm``, ``nn.utils.weight_norm``, ``nn.utils.prune`` (forward
      pre-hooks) and ``torch.nn.utils.parametrize`` (e.g. ``parametrizations.orthogonal``,
      ``spectral_norm``, ``weight_norm``): the effective kernel is converted exactly and
      the reparametrization is *folded*: it is not enforced any more. The kernel is the
      eval-mode one; for spectral norm that is ``W / sigma`` with sigma from the stored
      power-iteration vectors (a training-mode forward would first move them one step),
      whichever dim it normalises (``dim=1``, torch's default for a ``ConvTranspose``).
    * Subclasses of the torch convs (they may override ``forward``), uninitialised lazy
      convs, convs holding parameters, buffers or submodules besides kernel and bias, and
      convs whose parameters are tied to another module are left as they are (skipped).
    * Convs compiled by ``torch.jit`` (a scripted or traced model or submodule) are left and
      listed: convert the eager model, then script or trace the converted one.
    * A conv the forward calls through a reference other than its registered name (kept
      in a plain list or attribute) would keep running after its registered child is
      replaced. With ``example_input`` such convs are found (a probe run of the converted
      model, in which they still run) and left as they are (skipped); without it they
      cannot be seen.
    * State-dict hooks on a conv are dropped (they expect its parameter names); this is
      always warned about.

    Parameters
    ----------
    model : nn.Module
        Any model (a ``DataParallel``/DDP wrapper is looked through).
    rank : None, int, (int, int) or float
        Per layer: ``None`` full rank (exact), an int or ``(r_out, r_in)`` (clamped per
        layer), or a float in ``(0, 1]``: that fraction of each layer's channels per group.
    energy : float in (0, 1], optional
        Per layer, the smallest ranks whose TT form keeps this fraction of the kernel's
        squared Frobenius norm (``||W_hat||^2 >= energy ||W||^2``, relative error
        ``<= sqrt(1 - energy)``; see ``ttconv.tt.decompose``).
    param_budget : int or float in (0, 1], optional
        Total parameters of the considered convs (converted and kept dense; not the
        excluded or skipped ones): an int is a count, a float that fraction of their
        parameters before conversion. One energy threshold is shared by all layers and
        chosen (by bisection) as the largest that fits.
    output_tolerance : float, optional
        Relative output error ``||f_converted(x) - f(x)|| / ||f(x)||`` on
        ``example_input`` to stay within: one shared energy threshold is chosen by
        bisection (on ``log10(1 - energy)``, to 0.01 decades, about 12 probes) as
        (about) the smallest whose converted model meets it; see ``report.energy`` and
        ``report.output_error`` for what was achieved. Each probe runs the model once.
        The error need not fall monotonically with the threshold, so the result is a
        threshold that meets the tolerance whose next probe below did not.
    example_input : Tensor or tuple, optional
        An input (or a tuple of positional inputs) for ``model``, e.g. a small batch. When
        given, ``report.output_error`` is the relative output error of the converted
        model on it (eval mode, no grad; every module's training flag is restored; the
        outputs' floating-point tensors are compared together), and convs the forward
        calls through other references are found and left (above): the converted model
        runs once more, as a copy before the model is touched (twice where such a conv is
        found), and with ``output_tolerance`` once per search probe besides.
    exclude : iterable of str, or callable(module, name) -> bool
        Qualified names or ``fnmatch`` patterns (a name also excludes the layers inside
        it), or a predicate returning True for layers to keep dense.
    force : iterable of str, or callable(module, name) -> bool
        Layers to convert even where the TT form would not be smaller (same forms as
        ``exclude``; ``("*",)`` matches every layer). ``exclude`` wins over ``force``.
    inplace : bool
        Modify ``model`` itself instead of a deep copy. Handles of hooks registered on a
        converted conv then remove the hook from the SVD layer (the replaced conv hands
        its hooks over; do not use it afterwards).
    return_report : bool
        Also return a ``ConversionReport`` (and do not warn about what it lists).
    progress : bool or callable(done, total, name), optional
        ``True`` prints progress lines on stderr; a callable is called after each step:
        the analysis of each layer (``energy``, ``param_budget``, ``output_tolerance``),
        each search step, then each converted layer.
    refine : int, default 0
        HOOI iterations per converted layer after the one-pass truncation (see
        ``SVDConv.from_conv2d``, ``from_conv``); the report's errors stay exact.

    Returns
    -------
    nn.Module or (nn.Module, ConversionReport)
        The converted model (the root; a conv passed as ``model`` is returned converted).
        Ranks chosen by ``energy``, ``param_budget`` or ``output_tolerance`` depend on the
        weights: reload its ``state_dict`` with ``load_converted``.
    """
    _check_arguments(rank, energy, param_budget, output_tolerance, example_input, refine)
    inplace = args.boolean(inplace, "inplace")
    return_report = args.boolean(return_report, "return_report")
    is_excluded = _excluded(exclude, "exclude")
    is_forced = _excluded(force, "force")
    progress = progress_callback(progress)
    model = unwrap(model)
    reference = _run(model, example_input) if example_input is not None else None
    if not inplace:
        model = _copy_model(model)

    owners = _parameter_owners(model)
    candidates: List[_Candidate] = []
    excluded: List[str] = []
    skipped: List[Tuple[str, str]] = []
    kept: List[KeptDense] = []
    # A module registered under several names (shared) is converted once, under its first name;
    # exclude and force see every name, so naming any one of them acts on the shared module.
    aliases: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    for name, module in model.named_modules():  # each shared module once
        if isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", None) in _CONV_NAMES:
            skipped.append((name, "compiled by torch.jit (scripted or traced): its code cannot be replaced; "
                                  "convert the eager model, then script or trace the converted one"))
            continue
        if not isinstance(module, TORCH_CONVS):
            continue
        names = aliases[id(module)]
        if any(is_excluded(module, alias) for alias in names):
            excluded.append(name)
            continue
        try:
            kernel = _effective_kernel(module)
            tied = _tied_elsewhere(module, owners)
            if tied is not None:
                raise _Unconvertible(f"a parameter is shared with {tied!r}; converting would untie it")
        except _Unconvertible as reason:
            skipped.append((name, str(reason)))
            continue
        forced = any(bool(is_forced(module, alias)) for alias in names)
        never = None if forced else _never_smaller(module)
        if never is not None:
            kept.append(KeptDense(name, never, _params(module), _svd_params(module, (1, 1))))
            continue
        candidates.append(_Candidate(name, module, kernel, forced))

    searched = param_budget is not None or output_tolerance is not None
    if energy is not None or searched:
        for index, candidate in enumerate(candidates):
            try:
                candidate.truncation = _analyse(candidate)
            except (ValueError, TypeError) as error:
                raise type(error)(f"layer {candidate.name!r}: {error}") from error
            if progress is not None:
                progress(index + 1, len(candidates), f"analysing {candidate.name}")
    chosen_energy: Optional[float] = None
    probed: Dict[Tuple[str, Tuple[int, int]], _SVDConvNd] = {}  # layers the output search built
    if param_budget is not None and candidates:
        fixed = sum(k.params_dense for k in kept)
        fraction = not isinstance(param_budget, numbers.Integral)
        budget = int(param_budget)
        if fraction:
            budget = max(1, int(float(param_budget) * (fixed + sum(_params(c.conv) for c in candidates))))
        try:
            chosen_energy = _budget_energy(candidates, budget, fixed, progress)
        except ValueError as error:
            raise ValueError(f"{error} (param_budget={param_budget!r} is {budget} parameters)"
                             if fraction else str(error)) from None
    elif output_tolerance is not None and candidates:
        assert reference is not None  # _check_arguments: output_tolerance needs example_input
        chosen_energy, _ = _tolerance_energy(model, candidates, example_input, reference,
                                             float(output_tolerance), refine, progress, probed)
    layer_energy = chosen_energy if searched else energy
    layer_rank = None if layer_energy is not None else rank

    # Build every layer before touching any conv, so an error leaves an inplace model intact.
    built: List[Tuple[_Candidate, _SVDConvNd]] = []
    truncating = rank is not None or energy is not None or searched
    for index, candidate in enumerate(candidates):
        conv = candidate.conv
        try:
            ranks = _ranks_for(candidate, layer_rank, layer_energy)
            tt_size = _svd_params(conv, ranks)
            keep = truncating and not candidate.forced and tt_size >= _params(conv)
            if keep:
                kept.append(KeptDense(candidate.name, f"at ranks {ranks} its TT form would have {tt_size} parameters, "
                                      f"the dense conv {_params(conv)}", _params(conv), tt_size))
            else:
                built.append((candidate, _build_cached(probed, candidate, ranks, refine)))
        except (ValueError, TypeError) as error:
            raise type(error)(f"layer {candidate.name!r}: {error}") from error
        if progress is not None:
            progress(index + 1, len(candidates), candidate.name + (" (kept dense)" if keep else ""))
    probed_outputs: Optional[List[Tensor]] = None  # the converted model's, when the probe ran it as returned
    if example_input is not None and built:
        probed_outputs, still_ran = _probe(model, built, example_input)
        if still_ran:
            probed_outputs = None  # those convs stay: the returned model is not the one probed
        for name in still_ran:
            skipped.append((name, "the model's forward calls it through a reference other than its registered name "
                                  "(e.g. a plain list or attribute), which replacing the registered child would "
                                  "leave running; register the conv where the forward reads it"))
        built = [(candidate, layer) for candidate, layer in built if candidate.name not in still_ran]
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    kept.sort(key=lambda k: order[k.name])
    skipped.sort(key=lambda item: order.get(item[0], len(order)))

    mapping: Dict[int, nn.Module] = {}
    rows: List[LayerConversion] = []
    losses: List[str] = []
    for candidate, layer in built:
        name, conv, kernel = candidate.name, candidate.conv, candidate.kernel
        notes, lost = _carry_over(conv, layer, kernel.weight_frozen, kernel.bias_frozen, kernel.fold_hooks)
        losses += [f"{name!r}: {line}" for line in lost]
        mapping[id(conv)] = layer
        assert layer.relative_error is not None  # _build sets it
        rows.append(LayerConversion(name, tuple(kernel.weight.shape), conv.groups, layer.ranks, _params(conv),
                                    _params(layer), float(layer.relative_error), tuple(kernel.folded + notes)))
    if id(model) in mapping:
        model = mapping[id(model)]
    else:
        _replace(model, mapping)
    output_error = None
    if reference is not None:
        outputs = probed_outputs if probed_outputs is not None else _run(model, example_input)
        output_error = _output_error(outputs, reference)
    report = ConversionReport(rows, excluded, skipped, kept, output_error, chosen_energy)
    if not return_report and report.changes():
        _warn("ttconv.convert did not convert every conv as a plain torch conv",
              report.changes(), " (pass return_report=True to get this in the report instead)")
    elif losses:
        _warn("ttconv.convert dropped hooks", losses, "")
    return (model, report) if return_report else model


def densify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every SVD layer of ``model`` by the equivalent plain torch conv.

    Each layer becomes its exact torch class (``SVDConv1d`` -> ``nn.Conv1d``, ...,
    ``SVDConvTranspose3d`` -> ``nn.ConvTranspose3d``; see ``SVD_CLASSES``) with the same
    hyper-parameters, dtype and device, and the composed kernel as its weight: after a
    full-rank ``convert`` the ``state_dict`` equals the original one up to round-off.
    Training flag, ``requires_grad`` (the kernel is frozen when all four factors are) and
    forward/backward hooks carry over as in ``convert``; a ``UserWarning`` names
    layers whose state-dict hooks were dropped.

    Parameters
    ----------
    model : nn.Module
        Any model (a ``DataParallel``/DDP wrapper is looked through); an SVD layer passed
        as ``model`` is returned as a torch conv.
    inplace : bool
        Modify ``model`` itself instead of a deep copy.

    Returns
    -------
    nn.Module
        The model with only torch convs.
    """
    inplace = args.boolean(inplace, "inplace")
    model = unwrap(model)
    if not inplace:
        model = _copy_model(model)
    mapping: Dict[int, nn.Module] = {}
    losses: List[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _SVDConvNd):
            conv = module.to_conv()
            frozen = not any(p.requires_grad for p in _kernel_parameters(module))
            bias_frozen = module.bias is None or not module.bias.requires_grad
            losses += [f"{name!r}: {line}" for line in _carry_over(module, conv, frozen, bias_frozen)[1]]
            mapping[id(module)] = conv
    if losses:
        _warn("ttconv.densify dropped hooks", losses, "")
    if id(model) in mapping:
        return mapping[id(model)]
    _replace(model, mapping)
    return model


def _stored_configs(state_dict: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``layer name -> SVD layer constructor keywords`` for every SVD layer in a state dict.

    Format 2 stores the configuration in ``<layer>._extra_state``; a version-1 state dict
    (2-D ``SVDConv`` only: the other kinds came with format 2) has none, and then the
    ranks come from the shapes of ``U`` and ``V`` (general core).
    """
    configs: Dict[str, Dict[str, Any]] = {}
    for key, value in state_dict.items():
        if not (key == "core" or key.endswith(".core")):
            continue
        prefix = key[: -len("core")]
        name = prefix[:-1]
        U, S, V = (state_dict.get(prefix + part) for part in ("U", "S", "V"))
        if not (isinstance(U, Tensor) and isinstance(S, Tensor) and isinstance(V, Tensor)
                and isinstance(value, Tensor)):
            continue
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            try:
                configs[name] = _decode_extra_state(extra)
            except ValueError as error:
                raise ValueError(f"layer {name or '(root)'!r}: {error}") from None
        elif value.dim() != 4 or value.shape[0] == S.numel():  # a general core (1-D/3-D cores are general)
            configs[name] = dict(rank=(U.shape[1], V.shape[1]), core_kind="general", max_singular_value=None,
                                 path="auto")
        else:
            raise ValueError(
                f"layer {name or '(root)'!r}: a version-1 checkpoint of an orthogonal-core SVDConv does not store "
                "its max_singular_value; build that layer with SVDConv(..., core_kind='orthogonal', "
                "max_singular_value=...) and call model.load_state_dict"
            )
    return configs


def load_converted(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Load the ``state_dict`` of a converted model into ``model``, building its SVD layers.

    Ranks chosen by ``convert(energy=...)`` or ``convert(param_budget=...)`` depend on the
    weights, so a fresh ``convert`` of the plain model cannot reproduce the layer shapes.
    The state dict stores each layer's configuration (ranks, core kind,
    ``max_singular_value``, path); this builds an SVD layer of exactly that
    configuration at every layer the state dict has one, then loads it: the counterpart
    (``SVD_CLASSES``) of the torch conv there, ``SVDConv1d`` for an ``nn.Conv1d``,
    ``SVDConvTranspose2d`` for an ``nn.ConvTranspose2d`` and so on.

    Parameters
    ----------
    model : nn.Module
        The model as it was before conversion (plain torch convs; a model
        converted in any other way works too: SVD layers of another configuration are
        rebuilt). Conv hyper-parameters, dtype and device come from it; training flag,
        ``requires_grad`` and hooks carry over as in ``convert``. A DataParallel/DDP
        wrapper is looked through (the state dict must then be the inner model's).
    state_dict : mapping
        From ``converted.state_dict()``, e.g. ``torch.load(path, weights_only=True)``.
        Version-1 state dicts (ttconv before the configuration was stored) work for
        general-core layers: their ranks come from the factor shapes.
    strict : bool
        As in ``torch.nn.Module.load_state_dict``.
    inplace : bool
        Modify ``model`` itself instead of a deep copy.

    Returns
    -------
    nn.Module
        The model with the state dict loaded; computes what the saved model computed.
        Where the state dict holds an SVD layer at a conv ``convert`` would leave (a
        subclass, a ``forward`` replaced on the instance, extra state), the layer is
        built all the same, as the saved model had one, and a ``UserWarning`` names it.

    Raises
    ------
    ValueError
        A layer the state dict holds as an SVD layer is not a conv in ``model``, or a stored
        configuration is malformed.
    RuntimeError
        From ``load_state_dict``: missing or unexpected keys, shape mismatches.

    Examples
    --------
    >>> import io
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    >>> small = convert(model, energy=0.9, force=("*",))  # ranks depend on the weights
    >>> # (force: random kernels do not compress, and convert keeps a layer dense otherwise)
    >>> buffer = io.BytesIO()
    >>> torch.save(small.state_dict(), buffer)
    >>> _ = buffer.seek(0)
    >>> restored = load_converted(model, torch.load(buffer, weights_only=True))
    >>> x = torch.randn(1, 3, 8, 8)
    >>> torch.equal(restored(x), small(x))
    True
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping (from model.state_dict()), got {type(state_dict).__name__}")
    strict, inplace = args.boolean(strict, "strict"), args.boolean(inplace, "inplace")
    configs = _stored_configs(state_dict)
    model = unwrap(model)
    if not inplace:
        model = _copy_model(model)
    mapping: Dict[int, nn.Module] = {}
    built: List[Tuple[str, nn.Module, _SVDConvNd, _Kernel]] = []
    replaced: List[str] = []
    for name, module in model.named_modules():
        if name not in configs or id(module) in mapping:
            continue
        config = configs[name]
        if isinstance(module, _SVDConvNd):
            cls: type = type(module)
            if {**module._config(), "path": config["path"]} == config:
                module.path = config["path"]  # a runtime choice: no need to rebuild
                continue
            kernel = _Kernel(module.U, module.bias,
                             not any(p.requires_grad for p in _kernel_parameters(module)),
                             module.bias is None or not module.bias.requires_grad, [], [])
        elif isinstance(module, TORCH_CONVS):
            cls = _svd_class(module)
            try:
                kernel = _effective_kernel(module)
            except _Unconvertible as reason:  # convert leaves such a conv: say what replacing it drops
                try:
                    kernel = _effective_kernel(module, strict=False)
                except _Unconvertible as error:
                    raise ValueError(f"layer {name or '(root)'!r}: {error}") from None
                replaced.append(f"{name or '(root)'!r} ({type(module).__name__}) became a {cls.__name__}, as the "
                                f"state dict holds one there, though convert leaves it: {reason}")
        else:
            raise ValueError(f"layer {name or '(root)'!r}: the state dict holds an SVD layer there, but the model has "
                             f"a {type(module).__name__}; pass the model the state dict was converted from")
        factory = next(module.parameters(), None)
        arguments = dict(_conv_arguments(module), bias=kernel.bias is not None)
        layer = torch.nn.utils.skip_init(
            cls, **arguments, **config,
            device=None if factory is None else factory.device, dtype=None if factory is None else factory.dtype,
        )
        if tuple(layer.ranks) != tuple(config["rank"]):  # the constructor clamped them to this conv's channels
            raise ValueError(f"layer {name or '(root)'!r}: the state dict's {cls.__name__} has rank {config['rank']}, "
                             f"more than this {type(module).__name__} ({module.in_channels} -> {module.out_channels} "
                             f"channels, groups={module.groups}) can hold; pass the model the state dict was "
                             "converted from")
        mapping[id(module)] = layer
        built.append((name, module, layer, kernel))
    losses: List[str] = []
    for name, module, layer, kernel in built:
        lost = _carry_over(module, layer, kernel.weight_frozen, kernel.bias_frozen, kernel.fold_hooks)[1]
        losses += [f"{name!r}: {line}" for line in lost]
    if losses:
        _warn("ttconv.load_converted dropped hooks", losses, "")
    if replaced:
        _warn("ttconv.load_converted replaced convs that convert leaves", replaced,
              " (their own forward or state is gone)")
    if id(model) in mapping:
        model = mapping[id(model)]
    else:
        _replace(model, mapping)
    model.load_state_dict(state_dict, strict=strict)
    return model
