"""Whole-model conversion: every ``nn.Conv2d`` to :class:`~ttconv.SVDConv` and back.

:func:`convert` recurses over ``named_children`` and replaces each conv on its direct
parent (``nn.Sequential``, ``ModuleList``, ``ModuleDict`` and custom modules alike),
initialising the ``SVDConv`` from the conv's weights; :func:`densify` undoes it.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ._hooks import progress_callback, unwrap
from .layer import SVDConv
from .tt import energy_rank, resolve_ranks

__all__ = ["convert", "densify", "ConversionReport", "LayerConversion"]

RankChoice = Union[None, int, float, Tuple[int, int]]
Exclude = Union[Iterable[str], Callable[[nn.Module, str], bool]]
ProgressFn = Callable[[int, int, str], None]


@dataclass
class LayerConversion:
    """One converted layer: shapes, ranks, parameter counts and relative weight error."""

    name: str
    shape: Tuple[int, ...]
    groups: int
    ranks: Tuple[int, int]
    params_before: int
    params_after: int
    relative_error: float


class ConversionReport:
    """Per-layer conversion results with totals; ``str()`` is an aligned table."""

    def __init__(self, layers: List[LayerConversion], excluded: List[str]) -> None:
        self.layers = layers
        self.excluded = excluded

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
        return "\n".join(lines)

    __repr__ = __str__


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


def _unfolding_spectra(conv: nn.Conv2d) -> Tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.detach().to(torch.float64)
    g = conv.groups
    w = w.reshape(g, -1, *w.shape[1:])
    out_unfold = w.reshape(g, w.shape[1], -1)
    in_unfold = w.transpose(1, 2).reshape(g, w.shape[2], -1)
    return torch.linalg.svdvals(out_unfold), torch.linalg.svdvals(in_unfold)


def _budget_ranks(convs: List[Tuple[str, nn.Conv2d]], budget: int) -> Dict[str, Tuple[int, int]]:
    """One energy threshold for all layers, the largest whose total size fits ``budget``."""
    spectra = {name: _unfolding_spectra(conv) for name, conv in convs}

    def ranks_at(energy: float) -> Dict[str, Tuple[int, int]]:
        return {name: _energy_ranks(spectra[name], energy, conv) for name, conv in convs}

    def size(ranks: Dict[str, Tuple[int, int]]) -> int:
        return sum(_svd_params(conv, ranks[name]) for name, conv in convs)

    smallest = {name: (1, 1) for name, _ in convs}
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
) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Replace every ``nn.Conv2d`` of ``model`` by an ``SVDConv`` initialised from its weights.

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
        Modify ``model`` itself instead of a deep copy.
    return_report : bool
        Also return a :class:`ConversionReport`.
    progress : bool or callable(done, total, name), optional
        ``True`` prints a line per converted layer on stderr; a callable is called after
        each layer.

    Returns
    -------
    nn.Module or (nn.Module, ConversionReport)
        The converted model (the root; a conv passed as ``model`` is returned converted).
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
        model = copy.deepcopy(model)

    convs: List[Tuple[str, nn.Conv2d]] = []
    excluded: List[str] = []
    seen = set()
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d and id(module) not in seen:  # subclasses may change forward
            seen.add(id(module))
            (excluded if is_excluded(module, name) else convs).append((name, module))
    budget_ranks = _budget_ranks(convs, param_budget) if param_budget is not None and convs else {}

    mapping: Dict[int, nn.Module] = {}
    rows: List[LayerConversion] = []
    for index, (name, conv) in enumerate(convs):
        layer_rank = budget_ranks.get(name, rank)
        if isinstance(layer_rank, float):
            layer_rank = _fraction_ranks(conv, layer_rank)
        try:
            layer = SVDConv.from_conv2d(conv, rank=layer_rank, energy=energy)
        except (ValueError, TypeError) as error:
            raise type(error)(f"layer {name!r}: {error}") from error
        layer.train(conv.training)
        mapping[id(conv)] = layer
        rows.append(LayerConversion(name, tuple(conv.weight.shape), conv.groups, layer.ranks, _params(conv),
                                    _params(layer), float(layer.approximation_error)))
        if progress is not None:
            progress(index + 1, len(convs), name)
    if id(model) in mapping:
        model = mapping[id(model)]
    else:
        _replace(model, mapping)
    report = ConversionReport(rows, [name for name, _ in excluded])
    return (model, report) if return_report else model


def densify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every ``SVDConv`` of ``model`` by the equivalent plain ``nn.Conv2d``."""
    model = unwrap(model)
    if not inplace:
        model = copy.deepcopy(model)
    mapping: Dict[int, nn.Module] = {}
    for _, module in model.named_modules():
        if isinstance(module, SVDConv) and id(module) not in mapping:
            conv = module.to_conv2d()
            conv.train(module.training)
            mapping[id(module)] = conv
    if id(model) in mapping:
        return mapping[id(model)]
    _replace(model, mapping)
    return model
