"""Whole-model conversion: every ``nn.Conv2d`` to ``SVDConv`` and back.

``convert`` recurses over ``named_children`` and replaces each conv on its direct
parent (``nn.Sequential``, ``ModuleList``, ``ModuleDict`` and custom modules alike),
initialising the ``SVDConv`` from the kernel the conv computes with; ``densify``
undoes it; ``load_converted`` loads a converted model's ``state_dict`` into the
plain model, building layers of the stored ranks.

Nothing changes silently: a conv that cannot be converted exactly (a subclass, extra
state, tied parameters) is left as it is and listed in the report with the reason; what
is folded (``spectral_norm``, ``weight_norm``, pruning, ``parametrize``) or moved (hooks)
is listed too; without ``return_report=True`` a ``UserWarning`` says it.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook
from torch.nn.utils.weight_norm import WeightNorm

from ._hooks import progress_callback, unwrap
from .layer import SVDConv, _conv_arguments, _decode_extra_state
from .tt import energy_rank, resolve_ranks

__all__ = ["convert", "densify", "load_converted", "ConversionReport", "LayerConversion"]

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
    """

    def __init__(
        self,
        layers: List[LayerConversion],
        excluded: List[str],
        skipped: Optional[List[Tuple[str, str]]] = None,
    ) -> None:
        self.layers = layers
        self.excluded = excluded
        self.skipped = list(skipped or [])

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def relative_error(self) -> float:
        """Largest per-layer relative Frobenius error."""
        return max((layer.relative_error for layer in self.layers), default=0.0)

    def to_dicts(self) -> List[Dict[str, object]]:
        return [dict(vars(layer)) for layer in self.layers]

    def changes(self) -> List[str]:
        """One line per skipped layer and per note: what did not convert plainly."""
        lines = [f"{name!r} left unchanged: {reason}" for name, reason in self.skipped]
        lines += [f"{layer.name!r}: {note}" for layer in self.layers for note in layer.notes]
        return lines

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        header = ["layer", "shape", "groups", "ranks", "params", "-> params", "rel. error"]
        rows = [header] + [
            [layer.name, "x".join(map(str, layer.shape)), str(layer.groups), f"{layer.ranks}",
             str(layer.params_before), str(layer.params_after), f"{layer.relative_error:.2e}"]
            for layer in self.layers
        ]
        rows.append(["total", "", "", "", str(self.params_before), str(self.params_after),
                     f"{self.relative_error:.2e} (max)"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, lines[1])
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


# ------------------------------------------------------------ effective kernels
# Forward pre-hooks of torch's hook-based reparametrizations: they recompute the conv's
# ``weight`` attribute from other parameters before every forward.
_REPARAMETRIZATION_HOOKS = (SpectralNorm, WeightNorm, BasePruningMethod)
# spectral_norm's own state-dict hooks; they go with the folded reparametrization.
_OWN_STATE_HOOKS = (SpectralNormStateDictHook, SpectralNormLoadStateDictPreHook)
_PARAMETRIZATIONS_MODULE = "torch.nn.utils.parametrizations"  # e.g. weight_norm's compatibility hook
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")
_STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


def _is_reparametrization_state_hook(hook: Any) -> bool:
    """State-dict hooks that torch's reparametrizations register for themselves
    (spectral_norm's, the new weight_norm's compatibility hook): folded with them."""
    return isinstance(hook, _OWN_STATE_HOOKS) or getattr(hook, "__module__", "") == _PARAMETRIZATIONS_MODULE


class _Unconvertible(ValueError):
    """Why a conv cannot be converted exactly."""


@dataclass
class _Kernel:
    """The kernel and bias a conv computes with, and how they came about."""

    weight: Tensor
    bias: Optional[Tensor]
    weight_frozen: bool
    bias_frozen: bool
    folded: List[str]
    fold_hooks: List[int]  # ids of the forward pre-hooks that computed folded tensors


def _hook_tensor_name(hook: Any) -> str:
    return hook._tensor_name if isinstance(hook, BasePruningMethod) else hook.name


def _fold_hook(conv: nn.Conv2d, hook: Any, name: str) -> Tuple[Tensor, List[str], List[str], str]:
    """``(value, source parameters, other state, note)`` of a hook-based reparametrization."""
    if isinstance(hook, SpectralNorm):
        # Eval mode: no power-iteration step, sigma = u^T W v from the stored u, v. In
        # training mode each forward would first move u, v one step; the eval-mode kernel
        # is the function a trained model is used with.
        value = hook.compute_weight(conv, do_power_iteration=False)
        return (value, [name + "_orig"], [name + "_u", name + "_v"],
                f"spectral_norm on {name} folded: its eval-mode value W / sigma (sigma from the stored "
                "power-iteration vectors); the normalization is no longer enforced")
    if isinstance(hook, WeightNorm):
        return (hook.compute_weight(conv), [name + "_g", name + "_v"], [],
                f"weight_norm on {name} folded: g * v / ||v||; no longer reparametrized")
    return (hook.apply_mask(conv), [name + "_orig"], [name + "_mask"],
            f"pruning ({type(hook).__name__}) on {name} folded: the masked kernel; the mask is no longer "
            "enforced")


def _original_class(module: nn.Module) -> type:
    # parametrize swaps in a generated subclass ``Parametrized<Class>`` of the original.
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


def _effective_kernel(conv: nn.Conv2d, strict: bool = True) -> _Kernel:
    """The kernel and bias ``conv`` computes with in eval mode, ready to convert.

    ``strict``: raise ``_Unconvertible`` for what would not be exact as a whole
    layer (subclasses, state besides the kernel); ``from_conv2d`` converts those anyway.
    """
    if isinstance(conv, LazyModuleMixin) and conv.has_uninitialized_params():
        raise _Unconvertible("uninitialized lazy conv: run one forward pass first (it then becomes an nn.Conv2d)")
    cls = _original_class(conv)
    if strict and cls is not nn.Conv2d:
        raise _Unconvertible(
            f"{cls.__qualname__} is a subclass of nn.Conv2d and may override forward or hold more state; "
            "convert it by hand with SVDConv.from_conv2d if it computes a plain convolution"
        )
    hooks = [(key, hook) for key, hook in conv._forward_pre_hooks.items()
             if isinstance(hook, _REPARAMETRIZATION_HOOKS)]
    parametrized = parametrize.is_parametrized(conv)
    if hooks and parametrized:
        raise _Unconvertible("reparametrized both by torch.nn.utils.parametrize and by a hook "
                             f"({type(hooks[0][1]).__name__})")
    values: Dict[str, Tuple[Tensor, bool]] = {}
    folded: List[str] = []
    accounted = {"weight", "bias"}
    for _, hook in hooks:
        name = _hook_tensor_name(hook)
        if name not in ("weight", "bias") or name in values:
            raise _Unconvertible(f"{type(hook).__name__} reparametrizes {name!r} in a way convert does not fold")
        with torch.no_grad():
            value, sources, state, note = _fold_hook(conv, hook, name)
        values[name] = (value.detach(), not any(conv._parameters[s].requires_grad for s in sources))
        accounted.update(sources, state)
        folded.append(note)
    if parametrized:
        names = list(conv.parametrizations.keys())
        if any(name not in ("weight", "bias") for name in names):
            raise _Unconvertible(f"parametrized tensors {names}; only weight and bias can be folded")
        # Eval mode, as for hook-based spectral_norm: no power-iteration step, no update
        # of the parametrization's buffers.
        modes = [(module, module.training) for module in conv.parametrizations.modules()]
        conv.parametrizations.eval()
        try:
            with torch.no_grad():
                for name in names:
                    trainable = any(p.requires_grad for p in conv.parametrizations[name].parameters())
                    values[name] = (getattr(conv, name).detach(), not trainable)
        finally:
            for module, mode in modes:
                module.training = mode
        for name in names:
            kinds = " + ".join(type(p).__name__.lstrip("_") for p in conv.parametrizations[name])
            folded.append(f"parametrization {kinds} on {name} folded: its eval-mode value; no longer enforced")
    if strict:
        extra = (set(conv._parameters) | set(conv._buffers)) - accounted
        extra |= set(conv._modules) - ({"parametrizations"} if parametrized else set())
        if extra:
            raise _Unconvertible(f"holds {', '.join(sorted(extra))} besides its kernel and bias; an SVDConv "
                                 "would drop them")
    if "weight" in values:
        weight, weight_frozen = values["weight"]
    else:
        weight = conv.weight
        weight_frozen = not weight.requires_grad
    if "bias" in values:
        bias, bias_frozen = values["bias"]
    else:
        bias = conv.bias
        bias_frozen = bias is None or not bias.requires_grad
    return _Kernel(weight, bias, weight_frozen, bias_frozen, folded, [key for key, _ in hooks])


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
def _kernel_parameters(module: nn.Module) -> List[nn.Parameter]:
    if isinstance(module, SVDConv):
        return [module.U, module.S, module.core, module.V]
    return [module.weight]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("s" if count != 1 else "")


def _carry_over(source: nn.Module, target: nn.Module, weight_frozen: bool, bias_frozen: bool,
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


def _svd_params(conv: nn.Conv2d, ranks: Tuple[int, int]) -> int:
    r_out, r_in = ranks
    g = conv.groups
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    bias = conv.out_channels if conv.bias is not None else 0
    return conv.out_channels * r_out + g * r_out + g * r_out * r_in * taps + conv.in_channels * r_in + bias


def _fraction_ranks(conv: nn.Conv2d, fraction: float) -> Tuple[int, int]:
    out_g, in_g = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    return max(1, math.ceil(fraction * out_g)), max(1, math.ceil(fraction * in_g))


def _energy_ranks(spectra: Tuple[torch.Tensor, torch.Tensor], energy: float, conv: nn.Conv2d) -> Tuple[int, int]:
    """Ranks keeping ``energy`` of each unfolding's squared norm (max over groups), clamped."""
    out_g, in_g = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    wanted = (energy_rank(spectra[0], energy), energy_rank(spectra[1], energy))
    return resolve_ranks(wanted, out_g, in_g, conv.kernel_size)


def _unfolding_spectra(weight: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    w = weight.detach().to(torch.float64)
    w = w.reshape(groups, -1, *w.shape[1:])
    out_unfold = w.reshape(groups, w.shape[1], -1)
    in_unfold = w.transpose(1, 2).reshape(groups, w.shape[2], -1)
    return torch.linalg.svdvals(out_unfold), torch.linalg.svdvals(in_unfold)


def _budget_ranks(convs: List[Tuple[str, nn.Conv2d, Tensor]], budget: int) -> Dict[str, Tuple[int, int]]:
    """One energy threshold for all layers, the largest whose total size fits ``budget``."""
    spectra = {name: _unfolding_spectra(weight, conv.groups) for name, conv, weight in convs}

    def ranks_at(energy: float) -> Dict[str, Tuple[int, int]]:
        return {name: _energy_ranks(spectra[name], energy, conv) for name, conv, _ in convs}

    def size(ranks: Dict[str, Tuple[int, int]]) -> int:
        return sum(_svd_params(conv, ranks[name]) for name, conv, _ in convs)

    smallest = {name: (1, 1) for name, _, _ in convs}
    if size(smallest) > budget:
        raise ValueError(
            f"param_budget={budget} is below the smallest possible size of the converted layers "
            f"({size(smallest)} parameters at rank 1); raise the budget or exclude layers"
        )
    low, high = 0.0, 1.0
    if size(ranks_at(high)) <= budget:
        return ranks_at(high)
    for _ in range(40):  # bisection on the shared energy threshold
        middle = (low + high) / 2
        if size(ranks_at(middle)) <= budget:
            low = middle
        else:
            high = middle
    return ranks_at(low) if low > 0 else smallest


def _excluded(exclude: Exclude) -> Callable[[nn.Module, str], bool]:
    if callable(exclude):
        return exclude
    if isinstance(exclude, str):
        raise TypeError("exclude must be an iterable of names or patterns, or a predicate; got a single str "
                        f"{exclude!r}: wrap it in a tuple")
    patterns = list(exclude)
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


def _copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies models with hook-based reparametrizations.

    ``weight_norm``, pruning and (after a training forward) ``spectral_norm`` keep the
    computed ``weight`` as a non-leaf tensor attribute, which ``deepcopy`` refuses. Its
    value is recomputed by the hook before every forward, so the copy gets a detached
    clone (via the memo; the original model is not touched).
    """
    memo: Dict[int, Any] = {}
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


def convert(
    model: nn.Module,
    rank: RankChoice = None,
    energy: Optional[float] = None,
    *,
    param_budget: Optional[int] = None,
    exclude: Exclude = (),
    inplace: bool = False,
    return_report: bool = False,
    progress: Union[None, bool, ProgressFn] = None,
    refine: int = 0,
) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Replace every ``nn.Conv2d`` of ``model`` by an ``SVDConv`` initialised from its kernel.

    Each ``SVDConv`` computes what the conv computed (exactly at full rank, up to the
    reported truncation error otherwise) and keeps its training flag, the
    ``requires_grad`` flags of kernel and bias (a frozen conv gives frozen factors), and
    its forward (pre-)hooks and backward hooks (moved, in order, with their flags).

    What is not a plain ``nn.Conv2d`` is handled as follows, and never silently: the
    report lists it (``skipped`` and per-layer ``notes``, shown by ``str(report)``) and,
    without ``return_report=True``, a ``UserWarning`` names the layers.

    * ``nn.utils.spectral_norm``, ``nn.utils.weight_norm``, ``nn.utils.prune`` (forward
      pre-hooks) and ``torch.nn.utils.parametrize`` (e.g. ``parametrizations.orthogonal``,
      ``spectral_norm``, ``weight_norm``): the effective kernel is converted exactly and
      the reparametrization is *folded*: it is not enforced any more. The kernel is the
      eval-mode one; for spectral norm that is ``W / sigma`` with sigma from the stored
      power-iteration vectors (a training-mode forward would first move them one step).
    * Subclasses of ``nn.Conv2d`` (they may override ``forward``), uninitialised lazy
      convs, convs holding parameters, buffers or submodules besides kernel and bias, and
      convs whose parameters are tied to another module are left as they are (skipped).
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
        Per-layer ranks keeping this fraction of each unfolding's squared norm.
    param_budget : int, optional
        Total parameters of the converted layers: one energy threshold is shared by all
        layers and chosen as the largest that fits.
    exclude : iterable of str, or callable(module, name) -> bool
        Qualified names or ``fnmatch`` patterns (a name also excludes the layers inside
        it), or a predicate returning True for layers to keep dense.
    inplace : bool
        Modify ``model`` itself instead of a deep copy. Handles of hooks registered on a
        converted conv then remove the hook from the ``SVDConv`` (the replaced conv hands
        its hooks over; do not use it afterwards).
    return_report : bool
        Also return a ``ConversionReport`` (and do not warn about what it lists).
    progress : bool or callable(done, total, name), optional
        ``True`` prints a line per converted layer on stderr; a callable is called after
        each layer.
    refine : int, default 0
        HOOI iterations per converted layer after the one-pass truncation (see
        ``SVDConv.from_conv2d``); the report's errors stay exact.

    Returns
    -------
    nn.Module or (nn.Module, ConversionReport)
        The converted model (the root; a conv passed as ``model`` is returned converted).
        Ranks chosen by ``energy`` or ``param_budget`` depend on the weights: reload its
        ``state_dict`` with ``load_converted``.
    """
    choices = [rank is not None, energy is not None, param_budget is not None]
    if sum(choices) > 1:
        raise ValueError("pass at most one of rank, energy and param_budget")
    if isinstance(rank, float) and not 0.0 < rank <= 1.0:
        raise ValueError(f"a float rank is a fraction of channels and must be in (0, 1], got {rank}")
    if param_budget is not None and (not isinstance(param_budget, int) or param_budget < 1):
        raise ValueError(f"param_budget must be a positive int (a number of parameters), got {param_budget!r}")
    is_excluded = _excluded(exclude)
    progress = progress_callback(progress)
    model = unwrap(model)
    if not inplace:
        model = _copy_model(model)

    owners = _parameter_owners(model)
    convs: List[Tuple[str, nn.Conv2d, _Kernel]] = []
    excluded: List[str] = []
    skipped: List[Tuple[str, str]] = []
    for name, module in model.named_modules():  # each shared module once
        if not isinstance(module, nn.Conv2d):
            continue
        if is_excluded(module, name):
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
        convs.append((name, module, kernel))
    budget_ranks = (_budget_ranks([(n, c, k.weight) for n, c, k in convs], param_budget)
                    if param_budget is not None and convs else {})

    # Build every layer before touching any conv, so an error leaves an inplace model intact.
    layers: List[SVDConv] = []
    for index, (name, conv, kernel) in enumerate(convs):
        layer_rank = budget_ranks.get(name, rank)
        if isinstance(layer_rank, float):
            layer_rank = _fraction_ranks(conv, layer_rank)
        try:
            layer = SVDConv._from_kernel(kernel.weight, kernel.bias, _conv_arguments(conv), rank=layer_rank,
                                         energy=energy, refine=refine)
        except (ValueError, TypeError) as error:
            raise type(error)(f"layer {name!r}: {error}") from error
        layers.append(layer)
        if progress is not None:
            progress(index + 1, len(convs), name)

    mapping: Dict[int, nn.Module] = {}
    rows: List[LayerConversion] = []
    losses: List[str] = []
    for (name, conv, kernel), layer in zip(convs, layers):
        notes, lost = _carry_over(conv, layer, kernel.weight_frozen, kernel.bias_frozen, kernel.fold_hooks)
        losses += [f"{name!r}: {line}" for line in lost]
        mapping[id(conv)] = layer
        rows.append(LayerConversion(name, tuple(kernel.weight.shape), conv.groups, layer.ranks, _params(conv),
                                    _params(layer), float(layer.approximation_error), tuple(kernel.folded + notes)))
    if id(model) in mapping:
        model = mapping[id(model)]
    else:
        _replace(model, mapping)
    report = ConversionReport(rows, excluded, skipped)
    if not return_report and report.changes():
        _warn("ttconv.convert did not convert every conv as a plain nn.Conv2d",
              report.changes(), " (pass return_report=True to get this in the report instead)")
    elif losses:
        _warn("ttconv.convert dropped hooks", losses, "")
    return (model, report) if return_report else model


def densify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every ``SVDConv`` of ``model`` by the equivalent plain ``nn.Conv2d``.

    Training flag, ``requires_grad`` (the kernel is frozen when all four factors are) and
    forward/backward hooks carry over as in ``convert``; a ``UserWarning`` names
    layers whose state-dict hooks were dropped.
    """
    model = unwrap(model)
    if not inplace:
        model = _copy_model(model)
    mapping: Dict[int, nn.Module] = {}
    losses: List[str] = []
    for name, module in model.named_modules():
        if isinstance(module, SVDConv):
            conv = module.to_conv2d()
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
    """``layer name -> SVDConv constructor keywords`` for every SVDConv in a state dict.

    Format 2 stores the configuration in ``<layer>._extra_state``; a version-1 state dict
    has none, and then the ranks come from the shapes of ``U`` and ``V`` (general core).
    """
    configs: Dict[str, Dict[str, Any]] = {}
    for key, value in state_dict.items():
        if not (key == "core" or key.endswith(".core")):
            continue
        prefix = key[: -len("core")]
        name = prefix[:-1]
        U, S, V = (state_dict.get(prefix + part) for part in ("U", "S", "V"))
        if not all(isinstance(t, Tensor) for t in (U, S, V, value)):
            continue
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            try:
                configs[name] = _decode_extra_state(extra)
            except ValueError as error:
                raise ValueError(f"layer {name or '(root)'!r}: {error}") from None
        elif value.dim() == 4 and value.shape[0] == S.numel():
            configs[name] = dict(rank=(U.shape[1], V.shape[1]), core="general", max_singular_value=None,
                                 path="auto")
        else:
            raise ValueError(
                f"layer {name or '(root)'!r}: a version-1 checkpoint of an orthogonal-core SVDConv does not store "
                "its max_singular_value; build that layer with SVDConv(..., core='orthogonal', "
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
    """Load the ``state_dict`` of a converted model into ``model``, building its SVDConv layers.

    Ranks chosen by ``convert(energy=...)`` or ``convert(param_budget=...)`` depend on the
    weights, so a fresh ``convert`` of the plain model cannot reproduce the layer shapes.
    The state dict stores each layer's configuration (ranks, core kind,
    ``max_singular_value``, path); this builds an ``SVDConv`` of exactly that
    configuration at every layer the state dict has one, then loads it.

    Parameters
    ----------
    model : nn.Module
        The model as it was before conversion (plain ``nn.Conv2d`` layers; a model
        converted in any other way works too: SVDConv layers of another configuration are
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

    Raises
    ------
    ValueError
        A layer the state dict holds as an SVDConv is not a conv in ``model``, or a stored
        configuration is malformed.
    RuntimeError
        From ``load_state_dict``: missing or unexpected keys, shape mismatches.

    Examples
    --------
    >>> import io
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    >>> small = convert(model, energy=0.9)              # ranks depend on the weights
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
    configs = _stored_configs(state_dict)
    model = unwrap(model)
    if not inplace:
        model = _copy_model(model)
    mapping: Dict[int, nn.Module] = {}
    built: List[Tuple[str, nn.Module, SVDConv, _Kernel]] = []
    for name, module in model.named_modules():
        if name not in configs or id(module) in mapping:
            continue
        config = configs[name]
        if isinstance(module, SVDConv):
            if {**module._config(), "path": config["path"]} == config:
                module.path = config["path"]  # a runtime choice: no need to rebuild
                continue
            kernel = _Kernel(module.U, module.bias,
                             not any(p.requires_grad for p in _kernel_parameters(module)),
                             module.bias is None or not module.bias.requires_grad, [], [])
        elif isinstance(module, nn.Conv2d):
            kernel = _effective_kernel(module, strict=False)
        else:
            raise ValueError(f"layer {name or '(root)'!r}: the state dict holds an SVDConv there, but the model has "
                             f"a {type(module).__name__}; pass the model the state dict was converted from")
        factory = next(module.parameters(), None)
        arguments = dict(_conv_arguments(module), bias=kernel.bias is not None)
        layer = torch.nn.utils.skip_init(
            SVDConv, **arguments, **config,
            device=None if factory is None else factory.device, dtype=None if factory is None else factory.dtype,
        )
        mapping[id(module)] = layer
        built.append((name, module, layer, kernel))
    losses: List[str] = []
    for name, module, layer, kernel in built:
        lost = _carry_over(module, layer, kernel.weight_frozen, kernel.bias_frozen, kernel.fold_hooks)[1]
        losses += [f"{name!r}: {line}" for line in lost]
    if losses:
        _warn("ttconv.load_converted dropped hooks", losses, "")
    if id(model) in mapping:
        model = mapping[id(model)]
    else:
        _replace(model, mapping)
    model.load_state_dict(state_dict, strict=strict)
    return model
