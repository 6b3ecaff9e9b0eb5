"""Per-layer spectral reports for whole models and checkpoints.

:func:`spectral_report` runs one forward pass with hooks to learn each conv's input size,
then computes, per ``nn.Conv2d`` / :class:`~ttconv.SVDConv`, the exact circular spectrum,
the Fantastic Four minimum, the Gram-iteration bound, a power-iteration estimate and a
certified bound of the layer's actual operator. :func:`state_dict_report` does what can be
done from weights alone. Reports are returned, never printed: ``str(report)`` is an
aligned table, and they convert to dicts, CSV and JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import bounds
from ._hooks import find_conv_layers, progress_callback, record_input_sizes
from .layer import SVDConv
from .spectra import conv_singular_values
from .tt import orthonormal_core

__all__ = ["LayerSpectrum", "SpectralReport", "spectral_report", "state_dict_report", "find_conv_layers"]

ProgressFn = Callable[[int, int, str], None]


@dataclass
class LayerSpectrum:
    """One row of a :class:`SpectralReport` (plain floats, no autograd history).

    Attributes
    ----------
    exact : float or None
        Exact largest singular value of the circular convolution at ``input_size``.
    fantastic_four : float
        Fantastic Four minimum: upper bound for zero/circular padding, any size.
    gram : float or None
        Gram-iteration upper bound on ``exact``.
    power_estimate : float or None
        Power iteration on the actual operator (own padding): a lower estimate.
    upper_bound : float
        Certified bound of the actual operator at ``input_size`` (any padding mode), or,
        without an input size, the best size-independent bound (zero/circular padding).
    """

    name: str
    kind: str
    shape: Tuple[int, ...]
    stride: Tuple[int, int]
    input_size: Optional[Tuple[int, int]]
    exact: Optional[float]
    fantastic_four: float
    gram: Optional[float]
    power_estimate: Optional[float]
    upper_bound: float
    seconds: float
    note: str = ""
    singular_values: Optional[List[float]] = field(default=None, repr=False)


_COLUMNS = [  # (header, attribute, format)
    ("layer", "name", "{}"),
    ("type", "kind", "{}"),
    ("shape", "shape", "{}"),
    ("stride", "stride", "{}"),
    ("input", "input_size", "{}"),
    ("exact circ", "exact", "{:.4f}"),
    ("FF min", "fantastic_four", "{:.4f}"),
    ("Gram", "gram", "{:.4f}"),
    ("power est", "power_estimate", "{:.4f}"),
    ("upper bound", "upper_bound", "{:.4f}"),
    ("ms", "seconds", "{:.1f}"),
]


def _cell(value: Any, fmt: str, attribute: str) -> str:
    if value is None:
        return "-"
    if attribute == "seconds":
        value = value * 1e3
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return fmt.format(value)


class SpectralReport:
    """Per-layer spectral norms and bounds of a model; see :func:`spectral_report`.

    Attributes
    ----------
    layers : list of LayerSpectrum
    message : str
        What the report covers (and why it is empty, when it is).
    """

    def __init__(self, layers: Sequence[LayerSpectrum], message: str = "") -> None:
        self.layers = list(layers)
        self.message = message

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def lipschitz_upper_bound(self) -> Optional[float]:
        """Product of the per-layer upper bounds.

        A Lipschitz upper bound for a plain sequential chain of these layers with
        1-Lipschitz activations in between; *not* for networks with residual branches,
        concatenations or normalisation layers. ``None`` for an empty report.
        """
        if not self.layers:
            return None
        return math.prod(layer.upper_bound for layer in self.layers)

    def to_dicts(self) -> List[Dict[str, Any]]:
        """One dict per layer (spectra excluded)."""
        rows = []
        for layer in self.layers:
            row = asdict(layer)
            row.pop("singular_values")
            rows.append(row)
        return rows

    def to_json(self, **kwargs: Any) -> str:
        payload = {
            "message": self.message,
            "layers": self.to_dicts(),
            "lipschitz_upper_bound_sequential": self.lipschitz_upper_bound,
        }
        return json.dumps(payload, **kwargs)

    def to_csv(self) -> str:
        buffer = io.StringIO()
        names = [f.name for f in fields(LayerSpectrum) if f.name != "singular_values"]
        writer = csv.DictWriter(buffer, fieldnames=names)
        writer.writeheader()
        for row in self.to_dicts():
            writer.writerow({k: ("x".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in row.items()})
        return buffer.getvalue()

    def table(self) -> str:
        """The report as an aligned text table."""
        if not self.layers:
            return f"SpectralReport: empty. {self.message}".rstrip()
        rows = [[h for h, _, _ in _COLUMNS]]
        rows += [[_cell(getattr(layer, a), f, a) for _, a, f in _COLUMNS] for layer in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        notes = [f"  {layer.name}: {layer.note}" for layer in self.layers if layer.note]
        if notes:
            lines += ["", "notes:", *notes]
        lines += ["", f"product of upper bounds (Lipschitz bound for a plain sequential chain only): "
                      f"{self.lipschitz_upper_bound:.4g}"]
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return self.table()

    def plot(self, path: str) -> None:
        """Save each layer's singular-value spectrum (descending) to ``path`` (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover - exercised only without matplotlib
            raise ImportError("plotting needs matplotlib: pip install 'ttconv[plot]'") from None
        with_spectra = [layer for layer in self.layers if layer.singular_values]
        if not with_spectra:
            raise ValueError("no layer has a spectrum to plot: build the report with an input size")
        figure, axes = plt.subplots(figsize=(7, 4))
        for layer in with_spectra:
            values = layer.singular_values
            axes.plot([i / max(1, len(values) - 1) for i in range(len(values))], values, label=layer.name)
        axes.set_xlabel("rank (fraction of all singular values)")
        axes.set_ylabel("singular value (circular padding)")
        axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)


def _dense_shape(target: Any) -> Tuple[int, ...]:
    if isinstance(target, SVDConv):
        return (target.out_channels, target.in_channels // target.groups, *target.kernel_size)
    return tuple((target.weight if isinstance(target, nn.Conv2d) else target).shape)


@torch.no_grad()
def _analyse(
    name: str,
    kind: str,
    shape: Tuple[int, ...],
    target: Any,
    input_size: Optional[Tuple[int, int]],
    *,
    gram_iters: int,
    power_iters: int,
    spatial_iters: int,
    note: str = "",
) -> LayerSpectrum:
    start = time.perf_counter()
    spec = target if isinstance(target, bounds.ConvSpec) else bounds.conv_spec(target)
    ff = float(bounds.fantastic_four_bound(spec.kernel, stride=spec.stride, dilation=spec.dilation, groups=spec.groups))
    exact = gram = power = None
    spectrum = None
    if input_size is None:
        spatial = float(bounds.zero_padding_bound(spec.kernel, dilation=spec.dilation, groups=spec.groups,
                                                  n_iter=spatial_iters))
        upper = min(ff, spatial)
        note = note or "no input size: size-independent bounds for zero/circular padding only"
    else:
        kwargs = dict(stride=spec.stride, dilation=spec.dilation, groups=spec.groups)
        try:
            if isinstance(target, SVDConv):  # its full spectrum, zeros of the low rank included
                values = target.singular_values(input_size)
            else:
                values = conv_singular_values(spec.kernel, input_size, **kwargs)
            spectrum = values.tolist()
            exact = float(values[0])
            gram = float(bounds.gram_iteration_bound(spec.kernel, input_size, n_iter=gram_iters, **kwargs))
        except ValueError as error:  # size not divisible by stride, or smaller than the kernel
            note = f"{note}; " if note else ""
            note += f"no circular spectrum: {error}"
        geometry = dict(kwargs, padding=spec.padding, padding_mode=spec.padding_mode)
        upper = float(bounds.operator_norm_bound(spec.kernel, input_size, **geometry))
        power = float(bounds.power_iteration_estimate(spec.kernel, input_size, n_iter=power_iters, **geometry))
    return LayerSpectrum(
        name=name, kind=kind, shape=shape, stride=spec.stride, input_size=input_size, exact=exact,
        fantastic_four=ff, gram=gram, power_estimate=power, upper_bound=upper,
        seconds=time.perf_counter() - start, note=note, singular_values=spectrum,
    )


def spectral_report(
    model: nn.Module,
    example_input: Optional[Any] = None,
    *,
    gram_iters: int = 6,
    power_iters: int = 20,
    spatial_iters: int = 2,
    progress: Union[None, bool, ProgressFn] = None,
) -> SpectralReport:
    """Spectral norms and bounds of every conv layer of ``model``.

    Parameters
    ----------
    model : nn.Module
        Any model; ``nn.Conv2d`` and ``SVDConv`` layers at any depth are analysed
        (a ``DataParallel``/``DistributedDataParallel`` wrapper is looked through).
    example_input : Tensor or tuple, optional
        One forward pass (in eval mode, without gradients) records each layer's input
        size. Without it only size-independent bounds are computed.
    gram_iters, power_iters, spatial_iters : int
        Iterations of the frequency Gram bound, the power estimate and (without an input
        size) the spatial Gram bound.
    progress : bool or callable(done, total, name), optional
        ``True`` prints a line per layer on stderr; a callable is called after each layer.

    Returns
    -------
    SpectralReport
        Empty, with a message saying so, when the model has no conv layers.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
    >>> report = spectral_report(net, torch.randn(1, 3, 16, 16))
    >>> [row["input_size"] for row in report.to_dicts()]
    [(16, 16), (16, 16)]
    """
    progress = progress_callback(progress)
    layers = find_conv_layers(model)
    if not layers:
        return SpectralReport([], f"no nn.Conv2d or SVDConv layers found in {type(model).__name__}")
    sizes = record_input_sizes(model, layers, example_input) if example_input is not None else {}
    rows = []
    for index, (name, module) in enumerate(layers):
        seen = sizes.get(name, [])
        note = ""
        if example_input is not None and not seen:
            note = "not called by the example forward pass"
        elif len(seen) > 1:
            note = f"called with several input sizes {seen}; reported for the first"
        rows.append(_analyse(name, type(module).__name__, _dense_shape(module), module, seen[0] if seen else None,
                             gram_iters=gram_iters, power_iters=power_iters, spatial_iters=spatial_iters, note=note))
        if progress is not None:
            progress(index + 1, len(layers), name)
    message = "" if example_input is not None else "size-independent bounds only (no example input)"
    return SpectralReport(rows, message)


def _flatten_tensors(state: Mapping[str, Any], prefix: str = "") -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            out[prefix + str(key)] = value
        elif isinstance(value, Mapping):
            out.update(_flatten_tensors(value, f"{prefix}{key}."))
    return out


def state_dict_report(
    state_dict: Mapping[str, Any],
    input_size: Optional[Tuple[int, int]] = None,
    *,
    gram_iters: int = 6,
    power_iters: int = 20,
    spatial_iters: int = 2,
    progress: Union[None, bool, ProgressFn] = None,
) -> SpectralReport:
    """Report on the conv kernels of a state dict (nested dicts are searched too).

    Every 4-D floating-point tensor is a dense kernel; ``P.U, P.S, P.core, P.V`` groups are
    ``SVDConv`` layers (analysed on their core). A state dict stores neither strides,
    dilations, groups nor paddings, so every kernel is analysed as a stride-1, undilated,
    ungrouped, zero-padded conv: the size-independent bounds are then valid for any stride
    and padding of zeros (for a grouped kernel they bound the max over groups), and with
    ``input_size`` the exact values are those of a stride-1 circular conv on that size.
    """
    progress = progress_callback(progress)
    tensors = _flatten_tensors(state_dict)
    targets: List[Tuple[str, str, Tuple[int, ...], Tensor]] = []
    skipped: List[str] = []
    for key, value in tensors.items():
        if key.endswith(".core") or key == "core":
            prefix = key[: -len("core")]
            factors = [tensors.get(prefix + n) for n in ("U", "S", "core", "V")]
            if all(isinstance(f, Tensor) for f in factors):
                U, S, core, V = factors
                if core.shape[0] != S.numel():
                    # core='orthogonal' stores BCOP generators; its kernel size and S bound
                    # are not in the state dict.
                    skipped.append(prefix.rstrip("."))
                    continue
                groups = S.numel() // U.shape[1]
                # Stacked groups analysed as one ungrouped conv: an upper bound on their max.
                kernel = orthonormal_core(*(f.detach().to(torch.float64) for f in factors), groups)
                shape = (U.shape[0], V.shape[0] // groups, *core.shape[2:])
                targets.append((prefix.rstrip("."), "SVDConv", shape, kernel))
                continue
        if value.dim() == 4 and value.is_floating_point():
            name = key[: -len(".weight")] if key.endswith(".weight") else key
            targets.append((name, "Conv2d", tuple(value.shape), value.detach()))
    # Paddings are unknown: k - 1 per side covers every padding up to 'full' (crop argument).
    targets = [(n, k, shape, bounds.ConvSpec(kernel, padding=(kernel.shape[2] - 1, kernel.shape[3] - 1)))
               for n, k, shape, kernel in targets]
    skip_note = (f"; skipped orthogonal-core SVDConv layers (not analysable from a state dict, load the whole "
                 f"model instead): {', '.join(skipped)}" if skipped else "")
    if not targets:
        return SpectralReport([], "no 4-D conv weights found in the checkpoint" + skip_note)
    note = ("strides, paddings and groups are not stored in a state_dict: each kernel is analysed as a "
            "stride-1 ungrouped conv; upper bounds hold for any stride and any zero padding up to k-1 per side"
            + skip_note)
    rows = []
    for index, (name, kind, shape, kernel) in enumerate(targets):
        rows.append(_analyse(name, kind, shape, kernel, input_size, gram_iters=gram_iters,
                             power_iters=power_iters, spatial_iters=spatial_iters))
        if progress is not None:
            progress(index + 1, len(targets), name)
    return SpectralReport(rows, note)
