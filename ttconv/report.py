"""Per-layer spectral reports for whole models and checkpoints.

``spectral_report`` runs one forward pass with hooks to learn each layer's input size
(and whether the model is a plain chain, ``ttconv._trace``), then computes, per
convolution of any kind (``nn.Conv{1,2,3}d``, ``nn.ConvTranspose{1,2,3}d`` through its
adjoint, and the SVD layers ``SVDConv{1,2,3}d`` / ``SVDConvTranspose{1,2,3}d``: each
through its ``ttconv.geometry.ConvSpec``), the exact circular spectral norm, the Fantastic Four minimum, the Gram-iteration bound, a power-iteration
estimate and a certified bound of the layer's actual operator; per ``nn.Linear`` and
eval-mode batch norm its exact norm. Modules it cannot analyse are listed with the reason. ``state_dict_report`` does what can
be done from weights alone, and finds the model's kernels in the checkpoint layouts seen
in the wild (optimizer state, EMA copies, training-loop state and images are skipped and
listed). Reports are returned, never printed: ``str(report)`` is an aligned table, and
they convert to dicts, CSV and strict JSON.

Memory: one layer's analysis stays within ``max_memory`` bytes. Exact norms, Gram and
operator bounds stream over frequencies within it (``ttconv.spectra``); the other
computations run only when an estimate of their peak memory fits; full spectra are kept
only with ``keep_spectra=True`` (for ``SpectralReport.plot``), within the same
budget. Whatever does not fit is left out with a note in its row instead of failing.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _conv_args as args
from . import bounds, spectra
from ._conv_args import dilated_extent
from ._hooks import find_conv_layers
from ._linalg import tall
from ._progress import ProgressArg, interactive, progress_for
from ._table import render_table
from ._trace import BATCH_NORMS, SIZE_FREE, batch_norm_problem, find_layers, sequential_problem, trace
from .geometry import ConvSpec, conv_spec
from .spectra import MemoryLimitError, format_bytes, kernel_scale, spectral_dtype
from .tt import orthonormal_core

__all__ = [
    "LayerSpectrum",
    "SkippedTensor",
    "SpectralReport",
    "UnsafeTensorError",
    "spectral_report",
    "state_dict_report",
    "find_conv_layers",
    "check_tensor_storage",
    "DEFAULT_MAX_MEMORY",
    "MAX_KERNEL_ELEMENTS",
]

ProgressFn = Callable[[int, int, str], None]

#: Default working-memory budget of one layer's analysis, in bytes (1 GiB, as in ``ttconv.spectra``).
DEFAULT_MAX_MEMORY = spectra.DEFAULT_MAX_MEMORY
#: A tensor with more elements than this is refused as a conv kernel (2**28: 1 GiB in
#: float32, e.g. 8192 x 8192 x 2 x 2); real conv kernels are orders of magnitude smaller.
MAX_KERNEL_ELEMENTS = 2**28


class UnsafeTensorError(ValueError):
    """A checkpoint tensor that would make the analysis allocate far more than the file holds."""


@dataclass
class LayerSpectrum:
    """One row of a ``SpectralReport`` (plain floats, no autograd history).

    Columns mean the same for every conv row, of any dimension (``Conv1d/2d/3d``, the SVD
    layers, and transposed convs through the conv they are the adjoint of, on ``s n``, see
    ``spectral_report``); ``stride`` and ``input_size`` have one entry per spatial axis. For layers whose
    norm does not depend on the input (``Linear``: the matrix 2-norm; eval-mode batch norms:
    the largest per-channel gain) ``exact``, ``fantastic_four`` and ``upper_bound`` all hold
    that exact norm, ``gram``, ``power_estimate``, ``stride`` and ``input_size`` are None.

    Attributes
    ----------
    exact : float or None
        Exact largest singular value of the *circular* convolution at ``input_size``
        ('exact circ'). ``None`` without an input size, when the size does not fit the
        kernel/stride, or when the computation would exceed ``max_memory`` (see ``note``).
    fantastic_four : float
        Fantastic Four minimum times the padding factor: upper bound of the layer's own
        operator (own padding) at every input size and stride.
    gram : float or None
        Gram-iteration upper bound on ``exact`` (circular convolution, same size).
    power_estimate : float or None
        Power iteration on the layer's own operator (own padding): a lower estimate.
    upper_bound : float
        Certified bound of the layer's own operator at ``input_size`` (own padding and
        mode; from a state dict: stride 1, zero padding up to ``k - 1``), or, without an
        input size, the best size-independent bound of it (any size). It can be
        below ``exact``: zero padding is a different operator than circular padding.
    seconds : float
        Wall time of the row.
    note : str
        Why a value is missing, and other caveats.
    memory_estimate : int or None
        Estimated peak working memory, in bytes, of the largest computation of the row
        when it materialises all frequencies (whether or not it ran, or streamed).
    singular_values : list of float or None
        The full circular spectrum (descending), only with ``keep_spectra=True``.
    """

    name: str
    kind: str
    shape: Tuple[int, ...]
    stride: Optional[Tuple[int, ...]]
    input_size: Optional[Tuple[int, ...]]
    exact: Optional[float]
    fantastic_four: float
    gram: Optional[float]
    power_estimate: Optional[float]
    upper_bound: float
    seconds: float
    note: str = ""
    memory_estimate: Optional[int] = None
    singular_values: Optional[List[float]] = field(default=None, repr=False)


@dataclass(frozen=True)
class SkippedTensor:
    """A 3-D, 4-D or 5-D tensor of a checkpoint that was not analysed, and why.

    Attributes
    ----------
    key : str
        Its dotted path in the checkpoint (nested keys and list indices joined by ``.``).
    shape : tuple of int
    reason : str
    """

    key: str
    shape: Tuple[int, ...]
    reason: str


_COLUMNS = [  # (header, attribute, format)
    ("layer", "name", "{}"),
    ("type", "kind", "{}"),
    ("shape", "shape", "{}"),
    ("stride", "stride", "{}"),
    ("input", "input_size", "{}"),
    ("exact circ", "exact", "{:.4f}"),
    ("FF min", "fantastic_four", "{:.4f}"),
    ("Gram circ", "gram", "{:.4f}"),
    ("power own", "power_estimate", "{:.4f}"),
    ("upper own", "upper_bound", "{:.4f}"),
    ("ms", "seconds", "{:.1f}"),
]

#: Which operator each numeric column describes (also written into the JSON).
COLUMN_OPERATORS = {
    "exact": "exact largest singular value of the circular convolution on the input size (circular padding)",
    "fantastic_four": "upper bound of the layer's own operator (its own padding) at every input size and stride "
                      "(Fantastic Four minimum times the padding factor)",
    "gram": "upper bound on 'exact': the circular convolution on the input size (Gram iteration)",
    "power_estimate": "lower estimate of the layer's own operator (its own padding) on the input size",
    "upper_bound": "certified upper bound of the layer's own operator (its own padding) on the input size; "
                   "without an input size, at every input size",
}

#: What the rows of layers other than plain convs hold (also written into the JSON).
KIND_NOTES = {
    "Linear": "the matrix 2-norm (one SVD), exact at any input shape, in exact, fantastic_four and upper_bound",
    "BatchNorm": "eval mode: max |gamma| / sqrt(running_var + eps), exact at any input shape, in exact, "
                 "fantastic_four and upper_bound",
    "ConvTranspose": "ConvTranspose1d/2d/3d and SVDConvTranspose1d/2d/3d on n inputs: 'exact circ' and 'Gram circ' "
                     "describe the strided circular conv with the same weight (out -> in channels) on s n (input_size), "
                     "whose adjoint is the circular transposed conv on n (same singular values); 'power own' and "
                     "'upper own' the transposed layer itself on n",
}

_LEGEND = [
    "columns: 'circ' = circular convolution on the input size; 'own' = the layer's own operator with its own "
    "padding (from a state dict: stride 1, zero padding up to k-1);",
    "  'FF min' bounds the layer's own operator at every size. 'upper own' may be below 'exact circ': zero padding "
    "and circular padding are different operators.",
]


def _cell(value: Any, fmt: str, attribute: str) -> str:
    if value is None:
        return "-"
    if attribute == "seconds":
        value = value * 1e3
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    if isinstance(value, float) and math.isfinite(value) and value != 0 and not 1e-4 <= abs(value) < 1e6:
        return f"{value:.4e}"
    return fmt.format(value)


def _non_finite_name(value: float) -> str:
    return "NaN" if math.isnan(value) else ("+inf" if value > 0 else "-inf")


class SpectralReport:
    """Per-layer spectral norms and bounds of a model; see ``spectral_report``.

    Attributes
    ----------
    layers : list of LayerSpectrum
    message : str
        What the report covers (and why it is empty, when it is).
    skipped : list of SkippedTensor
        3-D, 4-D and 5-D tensors of a checkpoint that were not analysed, with the reason.
    """

    def __init__(self, layers: Sequence[LayerSpectrum], message: str = "",
                 skipped: Optional[Sequence[SkippedTensor]] = None, *, chain: bool = False,
                 chain_note: str = "") -> None:
        self.layers = list(layers)
        self.message = message
        self.skipped = list(skipped or [])
        self.chain = chain
        self.chain_note = chain_note

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def upper_bound_product(self) -> Optional[float]:
        """Product of the per-layer upper bounds, whether or not it bounds the model.

        A Lipschitz upper bound only for a plain chain of these layers with 1-Lipschitz
        maps in between (``chain`` is True when the report verified that; use
        ``lipschitz_bound``, which is None otherwise); *not* for networks with residual
        branches, concatenations or normalisation layers. ``None`` for an empty report;
        ``inf`` when the product overflows a float.
        """
        if not self.layers:
            return None
        values = [layer.upper_bound for layer in self.layers]
        if any(value == 0 for value in values):  # 0 even when another factor overflowed to inf
            return 0.0
        return math.prod(values)

    @property
    def lipschitz_bound(self) -> Optional[float]:
        """The product of upper bounds when the model was verified to be a plain chain
        (``chain``; ``chain_note`` says how or why not), else None."""
        return self.upper_bound_product if self.chain else None

    def to_dicts(self) -> List[Dict[str, Any]]:
        """One dict per layer (spectra excluded; floats as computed, ``inf``/``nan`` included)."""
        rows = []
        for layer in self.layers:
            row = asdict(layer)
            row.pop("singular_values")
            rows.append(row)
        return rows

    def to_json(self, **kwargs: Any) -> str:
        """Strict JSON (RFC 8259): no ``NaN``/``Infinity`` tokens.

        A non-finite value (a bound that overflowed a float) is written as ``null`` and the
        row's ``note`` says which value it was and why; an overflowing product of bounds is
        ``null`` with ``upper_bound_product_note`` giving its log10. Keyword arguments go
        to ``json.dumps`` (``allow_nan`` is always False).
        """
        rows = self.to_dicts()
        for row in rows:
            by_kind: Dict[str, List[str]] = {}
            for key, value in list(row.items()):
                if isinstance(value, float) and not math.isfinite(value):
                    row[key] = None
                    by_kind.setdefault(_non_finite_name(value), []).append(key)
            for kind, keys in by_kind.items():
                why = ("undefined in floating point" if kind == "NaN"
                       else "the value overflows a float (the kernel's entries are huge)")
                extra = f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} {kind}, written as null: {why}"
                row["note"] = f"{row['note']}; {extra}" if row["note"] else extra
        product = self.upper_bound_product
        payload: Dict[str, Any] = {
            "message": self.message,
            "columns": COLUMN_OPERATORS,
            "kinds": KIND_NOTES,
            "layers": rows,
            "skipped": [{"key": s.key, "shape": list(s.shape), "reason": s.reason} for s in self.skipped],
            "upper_bound_product": product,
            "lipschitz_chain_verified": self.chain,
            "lipschitz_chain_note": self.chain_note,
        }
        if product is not None and not math.isfinite(product):
            payload["upper_bound_product"] = None
            values = [layer.upper_bound for layer in self.layers]
            total = (math.fsum(math.log10(v) for v in values)
                     if all(math.isfinite(v) and v > 0 for v in values) else None)
            payload["upper_bound_product_note"] = (
                f"the product is {_non_finite_name(product)}, written as null"
                + (f": it overflows a float (log10 of the product = {total:.2f})" if total is not None
                   else ": a per-layer bound is itself not finite")
            )
        kwargs["allow_nan"] = False
        return json.dumps(payload, **kwargs)

    def to_csv(self) -> str:
        buffer = io.StringIO()
        names = [f.name for f in fields(LayerSpectrum) if f.name != "singular_values"]
        writer = csv.DictWriter(buffer, fieldnames=names)
        writer.writeheader()
        for row in self.to_dicts():
            writer.writerow({k: ("x".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in row.items()})
        return buffer.getvalue()

    def _skipped_lines(self) -> List[str]:
        if not self.skipped:
            return []
        by_reason: Dict[str, List[str]] = {}
        for item in self.skipped:
            by_reason.setdefault(item.reason, []).append(item.key)
        lines = [f"skipped {len(self.skipped)} layer(s) or tensor(s), not analysed:"]
        lines += [f"  {reason} ({len(keys)}): {', '.join(keys)}" for reason, keys in by_reason.items()]
        return lines

    def table(self) -> str:
        """The report as an aligned text table, with a legend, notes and skipped tensors."""
        if not self.layers:
            return "\n".join([f"SpectralReport: empty. {self.message}".rstrip(), *self._skipped_lines()])
        # A note shared by several rows is printed once, as a numbered footnote the rows refer to.
        footnotes: Dict[str, int] = {}
        for layer in self.layers:
            if layer.note and layer.note not in footnotes:
                footnotes[layer.note] = len(footnotes) + 1
        header = [h for h, _, _ in _COLUMNS] + ["note"]
        rows = [[_cell(getattr(layer, a), f, a) for _, a, f in _COLUMNS]
                + [f"[{footnotes[layer.note]}]" if layer.note else ""] for layer in self.layers]
        align = "<<" + ">" * (len(header) - 3) + "<"  # name and kind, the numbers, the note
        lines = [render_table(header, rows, align=align), "", *_LEGEND]
        kinds = {layer.kind for layer in self.layers}
        if "Linear" in kinds:
            lines.append("  Linear rows: the matrix 2-norm (one SVD), exact at any input shape, in 'exact circ', 'FF min' "
                         "and 'upper own'.")
        if any(kind.startswith("BatchNorm") or kind == "SyncBatchNorm" for kind in kinds):
            lines.append("  BatchNorm rows: eval mode, max |gamma| / sqrt(running_var + eps), exact at any input shape.")
        if any("ConvTranspose" in kind for kind in kinds):
            lines.append("  ConvTranspose rows (n inputs, stride s): 'circ' columns are the strided conv with the same "
                         "weight on s n ('input'), whose adjoint is the circular transposed conv; same singular values. "
                         "'own' columns: the layer itself on n.")
        if footnotes:
            lines += ["", "notes:"]
            for note, number in footnotes.items():
                names = [layer.name for layer in self.layers if layer.note == note]
                where = names[0] if len(names) == 1 else f"{len(names)} layers: {', '.join(names)}"
                lines.append(f"  [{number}] ({where}) {note}")
        lines += ["", self._product_line()]
        if self.message:
            lines.append(self.message)
        skipped = self._skipped_lines()
        if skipped:
            lines += ["", *skipped]
        return "\n".join(lines)

    def _product_line(self) -> str:
        product = self.upper_bound_product
        if self.chain:
            return (f"Lipschitz upper bound of the model: {product:.4g} (product of the 'upper own' column; "
                    f"{self.chain_note})")
        return (f"product of the 'upper own' column: {product:.4g} -- NOT A LIPSCHITZ BOUND FOR THIS MODEL: "
                f"{self.chain_note or 'the report could not verify that the layers form a plain chain'}")

    __str__ = table

    def __repr__(self) -> str:
        return self.table()

    def plot(self, path: str, *, max_points: int = 2000) -> None:
        """Save each layer's singular-value spectrum (descending) to ``path`` (needs matplotlib).

        Needs a report built with ``keep_spectra=True`` and an input size. At most
        ``max_points`` evenly spaced values (first and last included) are drawn per layer.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover - exercised only without matplotlib
            raise ImportError("plotting needs matplotlib: pip install 'ttconv[plot]'") from None
        with_spectra = [layer for layer in self.layers if layer.singular_values]
        if not with_spectra:
            raise ValueError("no layer has a spectrum to plot: build the report with an input size and "
                             "keep_spectra=True")
        figure, axes = plt.subplots(figsize=(7, 4))
        for layer in with_spectra:
            values = layer.singular_values or []
            count = len(values)
            picks = sorted({round(i * (count - 1) / max(1, max_points - 1)) for i in range(min(count, max_points))})
            axes.plot([i / max(1, count - 1) for i in picks], [values[i] for i in picks], label=layer.name)
        axes.set_xlabel("rank (fraction of all singular values)")
        axes.set_ylabel("singular value (circular padding)")
        axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)


def _dense_shape(module: Any, spec: ConvSpec) -> Tuple[int, ...]:
    """The dense kernel's shape in the spec's layout ``(c_out, c_in/g, *k)`` of the conv it
    describes: ``(in, out/g, *k)`` for a transposed layer (torch's ``ConvTranspose`` weight),
    ``(out, in/g, *k)`` otherwise (an SVD layer's spec holds its small core instead)."""
    rows, cols = (module.in_channels, module.out_channels) if spec.transposed else \
        (module.out_channels, module.in_channels)
    return (rows, cols // spec.groups, *spec.kernel_size)


# ------------------------------------------------------------------ memory budget
def _accepts_max_memory(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes a ``max_memory`` keyword, i.e. bounds its own working memory.

    ``conv_singular_values``, ``conv_spectral_norm``, ``gram_iteration_bound``,
    ``spatial_gram_bound`` and ``operator_norm_bound`` stream over frequencies (or rows)
    within ``max_memory`` and raise ``MemoryLimitError`` when even one
    batch does not fit. Functions without the keyword (``fantastic_four_bound``,
    ``power_iteration_estimate``, ``SVDConv.singular_values``) are run only when the
    report's own estimate of their peak memory fits. Checked at call time.
    """
    try:
        return "max_memory" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _itemsize(kernel: Tensor) -> int:
    return 8 if kernel.dtype == torch.float64 else 4


def _transfer_bytes(shape: Tuple[int, ...], stride: Tuple[int, ...], n: Tuple[int, ...], itemsize: int,
                    dilation: Optional[Tuple[int, ...]] = None) -> int:
    """Bytes of the complex transfer tensor (every frequency matrix) of the polyphase kernel.

    ``shape`` is ``(c_out, c_in/g, *k)`` with ``d = 1, 2, 3`` spatial axes; ``stride``,
    ``n`` and ``dilation`` (default 1) have ``d`` entries. The frequency grid is ``m = n / s``
    per axis, halved along the last (real FFT). When the polyphase kernel folded modulo
    ``m`` has a single tap (every 1x1 kernel at any stride, a kernel equal to its stride,
    a 1-pixel grid) every frequency holds the same ``c_out x c_in/g prod(s)`` matrices and
    ``ttconv.spectra`` decomposes them once: only those matrices count.
    """
    c_out, c_in_per_group = shape[0], shape[1]
    m = [-(-n_i // s) for n_i, s in zip(n, stride)]
    extent = dilated_extent(tuple(shape[2:]), dilation or (1,) * len(stride))
    taps = [min(-(-e // s), m_i) for e, s, m_i in zip(extent, stride, m)]
    frequencies = 1 if all(t == 1 for t in taps) else math.prod(m[:-1]) * (m[-1] // 2 + 1)
    return c_out * c_in_per_group * math.prod(stride) * frequencies * 2 * itemsize


# Peak working memory of each computation in units of its transfer tensor (or kernel, or
# activations), measured on CPU with torch 2.13 (float32, 32-512 channels, n = 64-128)
# when every frequency is materialised at once, rounded up. Streaming functions need
# min(this, max_memory); the others are gated on it.
_EXACT_FACTOR = 2.5   # all frequencies: transfer tensor, a contiguous copy, SVD workspace
_GRAM_FACTOR = 4.5    # Gram iteration: the extra Gram products
_FF_FACTOR = 10       # fantastic_four_bound: four reshaped copies and their SVDs
_SPATIAL_FACTOR = 4   # spatial_gram_bound: the final Gram kernel
_POWER_FACTOR = 4     # power iteration (float64): input, output and their gradients
_LIST_BYTES = 32      # a Python float in a list (kept spectra)


def _spectrum_length(shape: Tuple[int, ...], stride: Tuple[int, ...], groups: int, n: Tuple[int, ...]) -> int:
    """Length of the dense kernel's full circular spectrum on ``n`` (zeros included)."""
    c_out, c_in_per_group = shape[0], shape[1]
    per_group = min(c_out // groups, c_in_per_group * math.prod(stride))
    return groups * math.prod(n_i // s for n_i, s in zip(n, stride)) * per_group


class _TooBig(Exception):
    """A layer whose cheapest analysis exceeds the memory budget (the caller lists it as skipped)."""


class _Budget:
    """Runs one layer's computations within ``max_memory``; collects notes and the peak estimate."""

    def __init__(self, max_memory: Optional[int], already_used: int = 0) -> None:
        self.max_memory = max_memory
        self.limit = None if max_memory is None else max(1, max_memory - already_used)
        self.notes: List[str] = []
        self.peak = 0

    def _refuse(self, label: str, why: str) -> None:
        assert self.max_memory is not None and self.limit is not None  # only called under a limit
        used = "" if self.limit == self.max_memory else \
            f" ({format_bytes(self.max_memory - self.limit)} of it hold the spectra kept for the plot)"
        self.notes.append(f"{label} not computed: {why}, over max_memory {format_bytes(self.max_memory)}{used}; "
                          "raise max_memory (--max-memory) or use a smaller input size")

    def run(self, label: str, estimate: float, fn: Callable[..., Tensor], *args: Any, gate: bool = False,
            **kwargs: Any) -> Optional[Tensor]:
        """``fn(*args, **kwargs)``, or None with a note when it does not fit.

        ``max_memory`` is passed to functions that accept it (they stream, or raise
        ``MemoryLimitError``); the others, and every call with ``gate=True`` (a result
        that cannot stream, e.g. a spectrum kept as a list), run only if ``estimate`` fits.
        """
        streams = self.limit is not None and _accepts_max_memory(fn)
        streamed = self.limit is not None and streams and not gate
        self.peak = max(self.peak, int(min(estimate, self.limit) if streamed and self.limit is not None else estimate))
        if self.limit is not None and (gate or not streams) and estimate > self.limit:
            self._refuse(label, f"it needs about {format_bytes(estimate)}")
            return None
        if streams:
            try:
                return fn(*args, max_memory=self.limit, **kwargs)
            except MemoryLimitError as error:
                self._refuse(label, str(error).split(", more than")[0].split("; ")[0])
                return None
        return fn(*args, **kwargs)


@torch.no_grad()
def _analyse(
    name: str,
    kind: str,
    shape: Tuple[int, ...],
    spec: ConvSpec,
    input_size: Optional[Tuple[int, ...]],
    *,
    gram_iters: int,
    power_iters: int,
    spatial_iters: int,
    layer_input: Optional[Tuple[int, ...]] = None,
    note: str = "",
    keep_spectra: bool = False,
    max_memory: Optional[int] = DEFAULT_MAX_MEMORY,
    kept_bytes: int = 0,
) -> LayerSpectrum:
    """One conv row, from its spec alone (any of 1-3 spatial axes, plain or transposed).

    ``input_size`` is the grid of the conv the spec describes: the layer's input for a
    plain spec, ``s n`` for a transposed one on ``n`` inputs (the circular columns are
    those of ``spec.adjoint()`` there, as ``bounds.exact_spectral_norm(spec, n)``). For a
    transposed spec, ``layer_input`` is ``n``: 'upper own' and 'power own' then describe
    the layer's own operator on it (``bounds`` treat a transposed spec as the adjoint of
    its conv on ``spec.conv_input_size(n)``).
    """
    start = time.perf_counter()
    circ = spec.adjoint() if spec.transposed else spec  # the conv whose singular values the layer has
    kernel = spec.kernel
    itemsize = _itemsize(kernel)
    budget = _Budget(max_memory, kept_bytes)
    notes = [note] if note else []
    # Fantastic Four and the spatial bound of the full (zero-padded) convolution; the layer's
    # own padding multiplies them by its padding factor (worst case over sizes here, at the
    # recorded size in the fallback below; 1 for zero padding and every transposed layer).
    full = dataclasses.replace(circ, padding=0, padding_mode="zeros")
    ff_estimate = _FF_FACTOR * kernel.numel() * itemsize
    ff_value = budget.run("FF min", ff_estimate, bounds.fantastic_four_bound, full)
    if ff_value is None:
        raise _TooBig(f"not analysed: even the size-independent bounds need about {format_bytes(ff_estimate)}, "
                      f"over max_memory {format_bytes(max_memory or 0)}")
    ff_full = float(ff_value)
    factor_any_size = bounds.padding_factor(circ)
    ff = ff_full * factor_any_size
    exact = gram = estimate_own = None
    spectrum = None

    def spatial_bound() -> Optional[float]:
        o = min(kernel.shape[0] // spec.groups, kernel.shape[1])
        support = [2**spatial_iters * (e - 1) + 1 for e in dilated_extent(spec.kernel_size, spec.dilation)]
        estimate = _SPATIAL_FACTOR * spec.groups * o * o * math.prod(support) * itemsize
        value = budget.run("spatial Gram bound", estimate, bounds.spatial_gram_bound, full, n_iter=spatial_iters)
        return None if value is None else float(value)

    if input_size is None:
        spatial = spatial_bound()
        upper = (ff_full if spatial is None else min(ff_full, spatial)) * factor_any_size  # the report's message says 'no input size'
    else:
        transfer = _transfer_bytes(tuple(kernel.shape), spec.stride, input_size, itemsize, spec.dilation)
        try:
            # Any size divisible by the stride: below the kernel extent the kernel folds modulo n.
            spectra.check_spectral_input_size(input_size, spec.kernel_size, spec.stride, spec.dilation, fold=True)
            if keep_spectra:
                count = _spectrum_length(shape, spec.stride, spec.groups, input_size)
                estimate = count * (3 * itemsize + 8 + _LIST_BYTES)  # values, sort, Python list
                values = budget.run("full spectrum (kept for the plot)", estimate, _full_spectrum, circ, input_size,
                                    count, gate=True)
                if values is not None:
                    spectrum = values.tolist()
                    exact = spectrum[0]
                    del values
            if exact is None:
                value = budget.run("exact circ", _EXACT_FACTOR * transfer, spectra.conv_spectral_norm, kernel,
                                   input_size, stride=spec.stride, dilation=spec.dilation, groups=spec.groups)
                exact = None if value is None else float(value)
            value = budget.run("Gram circ", _GRAM_FACTOR * transfer, bounds.gram_iteration_bound, circ, input_size,
                               n_iter=gram_iters)
            gram = None if value is None else float(value)
        except ValueError as error:  # size not divisible by stride
            notes.append(f"no circular spectrum: {error}")
        # The layer's own operator: a transposed layer on its own input (adjoint of the conv on
        # input_size, first layer_input outputs), a plain one on input_size.
        own_spec, own_size = (spec, layer_input) if spec.transposed and layer_input is not None else (circ, input_size)
        grid = tuple(n + before + after for n, (before, after) in zip(input_size, circ.axis_padding))
        padded = tuple(s * -(-g // s) for g, s in zip(grid, spec.stride))
        value = budget.run("upper own (exact norm on the padded grid)",
                           _EXACT_FACTOR * _transfer_bytes(tuple(kernel.shape), spec.stride, padded, itemsize,
                                                           spec.dilation),
                           bounds.operator_norm_bound, own_spec, own_size)
        if value is not None:
            upper = float(value)
        else:  # size-independent bounds of the full convolution, times the padding's factor
            spatial = spatial_bound()
            upper = (ff_full if spatial is None else min(ff_full, spatial)) * bounds.padding_factor(circ, input_size)
            notes.append("upper own falls back to size-independent bounds")
        channels = kernel.shape[0] + kernel.shape[1] * spec.groups
        activations = _POWER_FACTOR * channels * math.prod(grid) * 8
        value = budget.run("power own", activations, bounds.power_iteration_estimate, own_spec, own_size,
                           n_iter=power_iters)
        estimate_own = None if value is None else float(value)
    notes += budget.notes
    return LayerSpectrum(
        name=name, kind=kind, shape=shape, stride=spec.stride, input_size=input_size, exact=exact,
        fantastic_four=ff, gram=gram, power_estimate=estimate_own, upper_bound=upper,
        seconds=time.perf_counter() - start, note="; ".join(notes), memory_estimate=budget.peak,
        singular_values=spectrum,
    )


def _full_spectrum(spec: ConvSpec, n: Tuple[int, ...], count: int) -> Tensor:
    """The dense layer's full circular spectrum on ``n`` (descending, ``count`` values, zeros
    included): the spec kernel's (an SVD layer's core has the same nonzero singular values),
    or ``|S|`` once per output position when the spec says its singular values are ``|S|``."""
    if spec.singular_values_are_s:
        assert spec.s is not None
        positions = math.prod(n_i // s for n_i, s in zip(n, spec.stride))
        values = spec.s.detach().to(spectral_dtype(spec.s.dtype)).abs().repeat_interleave(positions)
        values = values.sort(descending=True).values
    else:
        values = spectra.conv_singular_values(spec.kernel, n, stride=spec.stride, dilation=spec.dilation,
                                              groups=spec.groups)
    return torch.nn.functional.pad(values, (0, count - values.numel()))


def _check_max_memory(max_memory: Optional[int]) -> Optional[int]:
    if max_memory is None:
        return None
    return args.positive_int(max_memory, "max_memory", "a number of bytes, or None for no limit")


def _check_iters(**iters: int) -> None:
    for name, value in iters.items():
        args.positive_int(value, name)


@torch.no_grad()
def _analyse_linear(name: str, weight: Tensor, *, note: str = "", keep_spectra: bool = False,
                    max_memory: Optional[int] = DEFAULT_MAX_MEMORY, kept_bytes: int = 0) -> LayerSpectrum:
    """A matrix ``y = W x`` (applied to every row of its input): its norm is ``||W||_2`` exactly,
    at any input shape (the operator is block diagonal with copies of ``W``). The value goes
    in 'exact', 'FF min' and 'upper own' (each is this exact norm); Gram and power are
    not computed (nothing to iterate on)."""
    start = time.perf_counter()
    if weight.dim() != 2:
        raise ValueError(f"a Linear weight must be 2-D, got shape {tuple(weight.shape)}")
    matrix = weight.detach().to(spectral_dtype(weight.dtype))
    scale = kernel_scale(matrix)
    itemsize = 8  # the SVD runs in float64
    budget = _Budget(max_memory, kept_bytes)
    notes = [note] if note else []
    estimate = 3 * matrix.numel() * itemsize + (min(matrix.shape) * _LIST_BYTES if keep_spectra else 0)
    # float64 SVD: float32 backends differ in accuracy (spectra.largest_singular_values)
    values = budget.run("exact (matrix SVD)", estimate, lambda m: torch.linalg.svdvals(tall(m.double())).to(m.dtype),
                        matrix / scale, gate=True)
    spectrum = None
    if values is not None:
        exact: Optional[float] = float(values[0] * scale) if values.numel() else 0.0
        upper = float(values[0] * scale) if values.numel() else 0.0
        if keep_spectra:
            spectrum = (values * scale).tolist()
    else:  # the Frobenius norm bounds the 2-norm at O(numel) cost
        exact = None
        upper = float(torch.linalg.vector_norm(matrix / scale) * scale)
        notes.append("upper own is the Frobenius norm")
    notes += budget.notes
    return LayerSpectrum(
        name=name, kind="Linear", shape=tuple(weight.shape), stride=None, input_size=None, exact=exact,
        fantastic_four=upper, gram=None, power_estimate=None, upper_bound=upper,
        seconds=time.perf_counter() - start, note="; ".join(notes), memory_estimate=budget.peak,
        singular_values=spectrum,
    )


@torch.no_grad()
def _analyse_batch_norm(name: str, module: Any, note: str = "") -> LayerSpectrum:
    """An eval-mode batch norm: ``x -> gamma (x - mean) / sqrt(var + eps) + beta`` per channel, a
    diagonal linear part with norm ``max |gamma| / sqrt(var + eps)``, exact at any input shape."""
    start = time.perf_counter()
    var = module.running_var.detach().to(torch.float64)
    gains = 1.0 / torch.sqrt(var + module.eps)
    if module.weight is not None:
        gains = gains * module.weight.detach().to(torch.float64)
    value = float(gains.abs().max()) if gains.numel() else 0.0
    return LayerSpectrum(
        name=name, kind=type(module).__name__, shape=(gains.numel(),), stride=None, input_size=None, exact=value,
        fantastic_four=value, gram=None, power_estimate=None, upper_bound=value,
        seconds=time.perf_counter() - start, note=note, memory_estimate=gains.numel() * 8,
    )


def _layer_spec(module: nn.Module, output: Optional[Tuple[int, ...]],
                layer_input: Optional[Tuple[int, ...]]) -> ConvSpec:
    """The module's spec; for a transposed layer with recorded input and output sizes, with
    the ``output_padding`` the call actually used (``forward(x, output_size=...)`` picks its
    own, so the layer attribute need not be it)."""
    spec = conv_spec(module)
    if not spec.transposed or output is None or layer_input is None:
        return spec
    base = dataclasses.replace(spec, output_padding=0).conv_input_size(layer_input)
    used = tuple(o - b for o, b in zip(output, base))
    return spec if used == spec.output_padding else dataclasses.replace(spec, output_padding=used)


def spectral_report(
    model: nn.Module,
    example_input: Optional[Any] = None,
    *,
    gram_iters: int = 6,
    power_iters: int = 20,
    spatial_iters: int = 2,
    keep_spectra: bool = False,
    max_memory: Optional[int] = DEFAULT_MAX_MEMORY,
    progress: ProgressArg = None,
) -> SpectralReport:
    """Spectral norms and bounds of every layer of ``model`` that has one.

    Layers analysed (at any depth; a ``DataParallel``/``DistributedDataParallel`` wrapper
    is looked through):

    * every convolution: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and the SVD
      layers ``SVDConv1d/2d/3d`` (``SVDConv``), ``SVDConvTranspose1d/2d/3d``, each through
      its ``ConvSpec`` (``ttconv.geometry.conv_spec``; an SVD layer's holds its small
      orthonormal core, with the same nonzero singular values): every column, at the
      input size of the example pass (``(L,)``, ``(H, W)`` or ``(D, H, W)``);
    * a transposed conv (weight ``(in, out/g, *k)``, stride ``s``, padding ``p``, dilation
      ``d``, groups ``g``) on ``n`` inputs is the adjoint of the conv ``out -> in`` with
      that weight, ``s``, ``p``, ``d``, ``g`` and zero padding on its output size
      ``N = (n - 1) s - 2p + d (k - 1) + output_padding + 1`` per axis (first ``n``
      outputs). Its circular version is the adjoint of the strided circular conv on
      ``s n`` (the meaning ``bounds``, ``SpectralControl`` and ``singular_values`` give
      it; ``s n`` is always divisible by the stride, ``N`` need not be): 'input' shows
      ``s n``, 'exact circ' and 'Gram circ' describe that conv (the same singular values
      as its adjoint), and 'upper own' / 'power own' bound / estimate the transposed layer
      itself on ``n`` with the ``output_padding`` the call used
      (``forward(x, output_size=...)`` included);
    * ``nn.Linear``: its matrix 2-norm (one SVD), exact at any input shape; it fills
      'exact', 'FF min' and 'upper own', Gram and power are left empty;
    * batch norms (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``) as they run in eval mode: a
      per-channel scale ``gamma / sqrt(running_var + eps)`` whose norm ``max |gamma| /
      sqrt(running_var + eps)`` fills the same three columns (without running statistics a
      batch norm is no fixed linear map and is skipped).

    Every other module with parameters or a linear part (group/layer/instance
    norms, embeddings, attention, custom modules with their own parameters...) is listed
    in ``report.skipped`` with the reason.

    Lipschitz product: ``report.upper_bound_product`` multiplies the 'upper own' column;
    it bounds the model's Lipschitz constant only when the model is a plain chain of the
    analysed layers and 1-Lipschitz maps. With an example input that is checked on the
    forward pass (every layer receives the previous layer's output unchanged, see
    ``ttconv._trace``); without one, the model must be an ``nn.Sequential`` of them.
    ``report.chain`` says whether it was verified, ``report.chain_note`` how or why not,
    ``report.lipschitz_bound`` is the product or None, and the table prints the product as
    a bound only when verified (otherwise labelled NOT A LIPSCHITZ BOUND).

    Parameters
    ----------
    model : nn.Module
    example_input : Tensor or tuple, optional
        One forward pass (in eval mode, without gradients) records each layer's input
        size. Without it only size-independent bounds are computed.
    gram_iters, power_iters, spatial_iters : int
        Iterations of the frequency Gram bound, the power estimate and (without an input
        size) the spatial Gram bound; positive.
    keep_spectra : bool
        Keep every layer's full circular spectrum in ``LayerSpectrum.singular_values``
        (needed by ``SpectralReport.plot``; for a Linear layer the matrix's singular
        values). Off by default: the norm alone needs far less memory than all
        ``prod(n) * min(c_out, c_in)`` singular values.
    max_memory : int or None
        Working-memory budget of one layer's analysis in bytes (default 1 GiB; kept spectra
        count against it); ``None`` for no limit. Norms and bounds stream over frequencies
        within it; a computation that still does not fit is left out and the row's note
        says so (its value ``None``; 'upper own' then from size-independent bounds; a
        layer whose Fantastic Four bound does not fit goes to ``report.skipped``).
    progress : bool or callable(done, total, name), optional
        ``True``: one line per layer on stderr, ``[3/20] layer2.0.conv1  0.41 s``;
        ``False``: silent; a callable is called after each layer. Default (``None``): on
        when stderr is a terminal, silent otherwise (logs, pipes, tests).

    Returns
    -------
    SpectralReport
        Empty, with a message saying so, when the model has no layer to analyse.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
    >>> report = spectral_report(net, torch.randn(1, 3, 16, 16))
    >>> [row["input_size"] for row in report.to_dicts()]
    [(16, 16), (16, 16)]
    >>> report.chain
    True
    """
    _check_iters(gram_iters=gram_iters, power_iters=power_iters, spatial_iters=spatial_iters)
    keep_spectra = args.boolean(keep_spectra, "keep_spectra")
    max_memory = _check_max_memory(max_memory)
    layers, skipped_modules = find_layers(model)
    skipped: List[SkippedTensor] = [SkippedTensor(name, shape, reason) for name, shape, reason in skipped_modules]
    if not layers:
        return SpectralReport([], f"no layer with a spectral norm (a conv of any kind, an SVD conv layer, "
                                  f"nn.Linear, an eval-mode batch norm) found in {type(model).__name__}", skipped)
    reporter = progress_for(progress, len(layers), default=interactive())
    if example_input is not None:
        traced = trace(model, layers, example_input)
        sizes, chain = traced.sizes, traced.chain
        chain_note = ("the example pass verified a plain chain: each layer receives the previous one's output, "
                      "with only 1-Lipschitz maps in between; for inputs of the example's size") if chain \
            else traced.chain_reason
    else:
        sizes = {}
        problem = sequential_problem(model, layers)
        chain = problem is None
        chain_note = problem or ("an nn.Sequential of the analysed layers and 1-Lipschitz maps; size-independent "
                                 "bounds, for inputs of any size")
    rows: List[LayerSpectrum] = []
    kept = 0
    for name, module in layers:
        seen = sizes.get(name, [])
        note = ""
        if example_input is not None and not seen:
            note = "not called by the example forward pass"
        elif len(seen) > 1 and not isinstance(module, SIZE_FREE):
            note = f"called with several input sizes {seen}; reported for the first"
        if isinstance(module, BATCH_NORMS):
            problem = batch_norm_problem(module)
            if problem is not None:
                skipped.append(SkippedTensor(name, tuple(module.running_mean.shape) if module.running_mean is not None
                                             else (module.num_features,), problem))
            else:
                rows.append(_analyse_batch_norm(name, module, note))
            if reporter is not None:
                reporter.step(name)
            continue
        shape: Tuple[int, ...] = tuple(module.weight.shape) if isinstance(module, nn.Linear) else ()
        try:
            if isinstance(module, nn.Linear):
                row = _analyse_linear(name, module.weight, note=note, keep_spectra=keep_spectra,
                                      max_memory=max_memory, kept_bytes=kept)
            else:  # every conv kind, through its spec
                layer_input = traced.transposed_inputs.get(name) if example_input is not None else None
                output = traced.transposed_outputs.get(name) if example_input is not None else None
                spec = _layer_spec(module, output, layer_input)
                shape = _dense_shape(module, spec)
                row = _analyse(name, type(module).__name__, shape, spec, seen[0] if seen else None,
                               layer_input=layer_input, gram_iters=gram_iters, power_iters=power_iters,
                               spatial_iters=spatial_iters, note=note, keep_spectra=keep_spectra,
                               max_memory=max_memory, kept_bytes=kept)
        except _TooBig as reason:
            skipped.append(SkippedTensor(name, shape, str(reason)))
        else:
            kept += _LIST_BYTES * len(row.singular_values or ())
            rows.append(row)
        if reporter is not None:
            reporter.step(name)
    if chain and len(rows) < len(layers):  # the product lacks a factor
        missing = next(name for name, _ in layers if name not in {row.name for row in rows})
        chain, chain_note = False, f"layer {missing!r} was not analysed (memory): its factor is missing"
    message = "" if example_input is not None else "size-independent bounds only (no example input)"
    return SpectralReport(rows, message, skipped, chain=chain, chain_note=chain_note)


# ------------------------------------------------------------- checkpoint discovery
# A path component (split on '.') is optimizer state when one of its '_'-words matches.
_OPTIMIZER_WORD = re.compile(r"^(optim|optimi[sz]ers?|opt|schedulers?)\d*$")
_OPTIMIZER_NAMES = {"opt_state", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer",
                    "square_avg", "acc_delta", "exp_inf"}
_EMA_NAMES = {"shadow", "shadow_params", "averaged_model", "swa_model", "model_avg", "avg_model"}
_LOOP_NAMES = {"callbacks", "loops"}
# Mapping keys that only wrap the model's state dict; dropped from the layer names.
_WRAPPER_KEYS = {"state_dict", "model", "model_state_dict", "model_state", "module", "net", "network",
                 "params", "weights", "ema", "model_ema", "ema_model", "ema_state_dict", "state_dict_ema"}


def _region(path: Tuple[str, ...]) -> str:
    """'optimizer', 'ema', 'loop' or 'model': which part of a training checkpoint a tensor is in."""
    parts = [p.lower() for element in path for p in element.split(".")]
    if any(p in _OPTIMIZER_NAMES or any(_OPTIMIZER_WORD.match(w) for w in p.split("_")) for p in parts):
        return "optimizer"
    if any("ema" in p.split("_") or p in _EMA_NAMES for p in parts):
        return "ema"
    if any(p in _LOOP_NAMES for p in parts):
        return "loop"
    return "model"


_REGION_REASONS = {
    "optimizer": "optimizer state (moments, momentum buffers, schedulers), not weights",
    "loop": "training-loop state (callbacks/loops), not the model's weights",
    "ema": "EMA / averaged copy of the model; the model's own weights are analysed",
}


def _walk(obj: Any, path: Tuple[str, ...] = (), parents: Tuple[int, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], Tensor]]:
    """Every tensor in nested mappings/lists/tuples, with its path of keys and indices (cycles cut)."""
    if isinstance(obj, Tensor):
        yield path, obj
        return
    if id(obj) in parents:
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _walk(value, path + (str(key),), parents + (id(obj),))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _walk(value, path + (str(index),), parents + (id(obj),))


def _shape_text(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def check_tensor_storage(checkpoint: Any) -> None:
    """Refuse tensors whose logical size is far larger than the data the file stores.

    ``torch.save`` keeps an expanded (stride-0) tensor as one element plus strides: a 1.6 kB
    file can hold a "4096 x 4096 x 3 x 3" tensor that becomes 600 MB (or far more) the moment
    it is copied. Checks metadata only (no tensor data is read or allocated).

    Raises
    ------
    UnsafeTensorError
        Naming the first offending key: a non-strided (sparse, ...) tensor with more than
        ``MAX_KERNEL_ELEMENTS`` elements, or a tensor whose storage is smaller than its
        number of elements (overlapping strides).
    """
    for path, tensor in _walk(checkpoint):
        key = ".".join(path) or "<top level>"
        if tensor.layout != torch.strided:
            if tensor.numel() > MAX_KERNEL_ELEMENTS:
                raise UnsafeTensorError(f"tensor {key!r} is a {tensor.layout} tensor of logical size "
                                        f"{_shape_text(tensor)}: refused (densifying it could exhaust memory)")
            continue
        logical = tensor.numel() * tensor.element_size()
        try:
            stored = tensor.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensor subclasses
            continue
        if logical > stored:
            raise UnsafeTensorError(
                f"tensor {key!r} claims shape {_shape_text(tensor)} ({format_bytes(logical)}) but stores only "
                f"{format_bytes(stored)} (an expanded, stride-0 tensor): refused, as analysing it would allocate "
                "the full size; a checkpoint of real weights never needs this (re-save it with .clone() if you "
                "trust it)"
            )


def _tensor_problem(tensor: Tensor, key: str) -> Optional[str]:
    """Why a would-be kernel cannot be analysed (a skip reason), or None; raises when implausibly large."""
    if tensor.layout != torch.strided:
        return f"not a dense tensor ({tensor.layout})"
    if not tensor.is_floating_point():
        return f"dtype {tensor.dtype} is not floating point"
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {tensor.dtype} is not one the spectra compute in (float16, bfloat16, float32, float64)"
    if tensor.device.type == "meta":
        return "on the meta device: it holds no values"
    if tensor.numel() == 0:
        return "empty (a dimension is 0)"
    if tensor.numel() > MAX_KERNEL_ELEMENTS:
        raise UnsafeTensorError(
            f"tensor {key!r} of shape {_shape_text(tensor)} has {tensor.numel():,} elements, more than "
            f"{MAX_KERNEL_ELEMENTS:,} (2**28): implausible for a conv kernel, refused"
        )
    if not bool(torch.isfinite(tensor).all()):
        return "contains NaN or Inf values (diverged training?)"
    return None


def _spectral_normalised(weight: Tensor, u: Tensor, v: Tensor) -> Optional[Tensor]:
    """``weight / sigma`` as ``torch.nn.utils.spectral_norm`` computes it in eval mode, or ``None``.

    ``sigma = u^T W v`` with ``W`` the weight with the normalised dimension first (0 for a conv,
    1 for a ``ConvTranspose``), flattened. The vectors' lengths tell the dimension apart, except
    for a square kernel (``c_out == c_in/g``: both fit); then the stored pair does, since torch's
    power iteration ends with ``u = normalize(W v)`` or ``v = normalize(W^T u)`` for the right
    ``W`` only (``_iterated_pair``). A square kernel
    whose pair fits neither or both (never iterated) is ambiguous: ``None``."""
    w = weight.detach().to(torch.float64)
    u64, v64 = (t.detach().to(torch.float64).flatten() for t in (u, v))
    layouts = [w.movedim(dim, 0).reshape(w.shape[dim], -1) for dim in (0, 1)
               if u64.numel() == w.shape[dim] and v64.numel() * w.shape[dim] == w.numel()]
    if len(layouts) == 2:
        layouts = [matrix for matrix in layouts if _iterated_pair(matrix, u64, v64)]
    if len(layouts) != 1:
        return None
    sigma = torch.dot(u64, layouts[0] @ v64)
    if not bool(torch.isfinite(sigma)) or float(sigma) == 0.0:
        return None
    return (w / sigma).to(weight.dtype)


def _iterated_pair(matrix: Tensor, u: Tensor, v: Tensor) -> bool:
    """Whether ``(u, v)`` ends a power iteration on ``matrix``: ``u = normalize(matrix v)`` (the
    hook-based spectral_norm updates ``u`` last) or ``v = normalize(matrix^T u)`` (the
    parametrization updates ``v`` last), to float32 rounding with margin."""
    for target, product in ((u, matrix @ v), (v, matrix.T @ u)):
        norm = torch.linalg.vector_norm(product)
        if bool(norm > 0) and float(torch.linalg.vector_norm(target - product / norm)) <= 1e-3:
            return True
    return False


def _weight_normalised(g: Tensor, v: Tensor) -> Optional[Tensor]:
    """``g * v / ||v||`` as ``torch.nn.utils.weight_norm`` computes it, or ``None``.

    The norm runs over every axis but ``dim``, which ``g``'s shape gives (``v``'s size on that
    axis, 1 on the others; all ones for ``dim=None``, a norm over everything); a 1-D ``g`` of
    ``c_out`` entries is taken as ``dim=0``."""
    w = v.detach().to(torch.float64)
    magnitude = g.detach().to(torch.float64)
    if magnitude.dim() == w.dim():
        kept = [axis for axis in range(w.dim()) if magnitude.shape[axis] != 1]
        if len(kept) > 1 or any(magnitude.shape[axis] != w.shape[axis] for axis in kept):
            return None
        axes = [axis for axis in range(w.dim()) if axis not in kept]
    elif magnitude.numel() == 1 and magnitude.dim() <= 1:
        magnitude, axes = magnitude.reshape((1,) * w.dim()), list(range(w.dim()))
    elif magnitude.dim() == 1 and magnitude.numel() == w.shape[0]:
        magnitude, axes = magnitude.reshape(-1, *(1,) * (w.dim() - 1)), list(range(1, w.dim()))
    else:
        return None
    norm = torch.linalg.vector_norm(w, dim=axes, keepdim=True)
    return (magnitude * w / norm).to(v.dtype)


_UNREBUILDABLE = ("a reparametrized weight (spectral_norm/weight_norm) whose effective kernel cannot be rebuilt: "
                  "its u, v or g tensors are missing or do not match")
_Target = Tuple[str, str, Tuple[int, ...], Tensor, str]  # name, kind, shape, kernel, note
#: Kernel ranks of conv kernels: 3-D (Conv1d), 4-D (Conv2d), 5-D (Conv3d).
_KERNEL_DIMS = (3, 4, 5)


def _orthogonal_core(extra_state: Any) -> bool:
    """Whether an SVD layer's ``_extra_state`` says ``core_kind='orthogonal'`` (its ``core``
    then holds BCOP generators, not a kernel). An unreadable state counts as orthogonal: the
    factors are then skipped, never misread."""
    from .layer import _decode_extra_state

    try:
        return _decode_extra_state(extra_state)["core_kind"] == "orthogonal"
    except ValueError:
        return True


def _orthogonal_by_shape(U: Tensor, S: Tensor, core: Tensor) -> Tuple[bool, str]:
    """Whether SVD factors stored without their configuration may hold an orthogonal core (BCOP
    generators ``(g, count, r, r)``, ``g r`` values in ``S``), and why: then they are not
    analysed as a general core. Ambiguous at ``r = 1`` with a 1x1 general kernel, where the two
    layouts coincide (``(g, 1, 1, 1)``): such factors are skipped too, never guessed."""
    if core.shape[0] != S.numel():
        return True, ""
    r = U.shape[-1]
    if core.dim() == 4 and core.shape[2] == core.shape[3] == r and core.shape[0] * r == S.numel():
        return True, " or a general one (the shapes fit both)"
    return False, ""


def _conv_kind(kernel: Tensor) -> str:
    """``Conv1d``/``Conv2d``/``Conv3d`` from a kernel's rank. A ``ConvTranspose`` weight has the
    same layout as the kernel of the conv it is the adjoint of, so it is reported as that conv
    (same singular values; see ``state_dict_report``)."""
    return f"Conv{kernel.dim() - 2}d"


def _discover(tensors: Dict[Tuple[str, ...], Tensor]) -> Tuple[List[Tuple[Tuple[str, ...], _Target]], List[SkippedTensor]]:
    """Kernels (by path) and skipped 3-D/4-D/5-D tensors among tensors of one region."""
    flat = {".".join(path): (path, t) for path, t in tensors.items()}
    used: set = set()
    targets: List[Tuple[Tuple[str, ...], _Target]] = []
    skipped: List[SkippedTensor] = []

    def get(key: str) -> Optional[Tensor]:
        entry = flat.get(key)
        return entry[1] if entry is not None else None

    def add(key: str, kind: str, kernel: Tensor, parts: Sequence[str], note: str = "", name_key: Optional[str] = None) -> None:
        path = flat[key][0]
        problem = _tensor_problem(kernel, key)
        used.update(parts)
        if problem is not None:
            skipped.append(SkippedTensor(key, tuple(kernel.shape), problem))
            return
        name_path = flat[name_key][0] if name_key else path
        targets.append((name_path, (key, kind, tuple(kernel.shape), kernel.detach(), note)))

    # weight_norm magnitudes (e.g. (c_out, 1, 1, 1)) come before their direction: reserve them.
    reserved = {k[: -len("weight_v")] + "weight_g" for k in flat if k.rsplit(".", 1)[-1] == "weight_v"}
    reserved |= {k[:-1] + "0" for k in flat if k.endswith("parametrizations.weight.original1")}
    for key, (path, tensor) in flat.items():
        if key in used or key in reserved:
            continue
        last = key.rsplit(".", 1)[-1]
        prefix = key[: len(key) - len(last)]
        factors = [get(prefix + n) for n in ("U", "S", "core", "V")]
        if last == "core" and all(f is not None for f in factors):
            U, S, core, V = (f for f in factors if f is not None)
            parts = [prefix + n for n in ("U", "S", "core", "V")]
            if core.dim() not in _KERNEL_DIMS or any(_tensor_problem(f, part) for f, part in zip((U, S, core, V), parts)):
                used.update(parts)
                skipped.append(SkippedTensor(key, tuple(core.shape), "SVDConv factors that are not analysable "
                                                                   "(not floating point, empty or not finite)"))
                continue
            extra = get(prefix + "_extra_state")
            if extra is not None:
                orthogonal, why = _orthogonal_core(extra), ""
            else:  # (format 1, no configuration: told apart by the shapes where they differ)
                orthogonal, why = _orthogonal_by_shape(U, S, core)
            if orthogonal:
                used.update(parts)
                skipped.append(SkippedTensor(
                    key, tuple(core.shape), f"orthogonal-core SVDConv{why}: its kernel size and S bound are not in "
                    "the state dict; load the whole model instead"))
                continue
            groups = S.numel() // U.shape[1]
            # Stacked groups analysed as one ungrouped conv: an upper bound on their max. The
            # taps of a 1-D/3-D core are flattened for ttconv.tt (as the layers do) and restored.
            try:
                taps = core.reshape(core.shape[0], core.shape[1], -1, 1)
                U, S, taps, V = (f.detach().to(torch.float64) for f in (U, S, taps, V))
                kernel = orthonormal_core(U, S, taps, V, groups)
                kernel = kernel.reshape(core.shape)
            except (RuntimeError, ValueError) as error:
                used.update(parts)
                skipped.append(SkippedTensor(key, tuple(core.shape), "SVDConv factors whose shapes do not fit "
                                                                   f"together ({error})"))
                continue
            shape = (U.shape[0], V.shape[0] // groups, *core.shape[2:])
            used.update(parts)
            kind = "SVDConv" if core.dim() == 4 else f"SVDConv{core.dim() - 2}d"
            targets.append((path, (key, kind, shape, kernel, "")))
            continue
        if last == "weight_orig" and tensor.dim() in _KERNEL_DIMS:
            u, v = get(prefix + "weight_u"), get(prefix + "weight_v")
            weight = None if u is None or v is None else _spectral_normalised(tensor, u, v)
            if weight is not None:
                add(key, _conv_kind(tensor), weight, [key, prefix + "weight_u", prefix + "weight_v"],
                    "spectral_norm: weight_orig / sigma from the stored u, v (the eval-mode kernel)",
                    name_key=key)
                continue
        if key.endswith("parametrizations.weight.original") and tensor.dim() in _KERNEL_DIMS:
            base = key[: -len("original")]
            u, v = get(base + "0._u"), get(base + "0._v")
            weight = None if u is None or v is None else _spectral_normalised(tensor, u, v)
            if weight is not None:
                add(key, _conv_kind(tensor), weight, [key, base + "0._u", base + "0._v"],
                    "spectral_norm parametrization: original / sigma from the stored _u, _v (the eval-mode kernel)")
                continue
        weight_norm_parts = None
        if last == "weight_v" and tensor.dim() in _KERNEL_DIMS and get(prefix + "weight_g") is not None:
            weight_norm_parts = (prefix + "weight_g", key)
        elif key.endswith("parametrizations.weight.original1") and tensor.dim() in _KERNEL_DIMS \
                and get(key[:-1] + "0") is not None:
            weight_norm_parts = (key[:-1] + "0", key)
        magnitude = None if weight_norm_parts is None else get(weight_norm_parts[0])
        if weight_norm_parts is not None and magnitude is not None:
            weight = _weight_normalised(magnitude, tensor)
            if weight is not None:
                add(key, _conv_kind(tensor), weight, list(weight_norm_parts),
                    "weight_norm: g * v / ||v|| (the effective kernel)")
                continue
            if magnitude.dim() in _KERNEL_DIMS:
                skipped.append(SkippedTensor(weight_norm_parts[0], tuple(magnitude.shape), _UNREBUILDABLE))
        if tensor.dim() == 2 and last == "weight":
            if "embed" in key.lower():
                skipped.append(SkippedTensor(key, tuple(tensor.shape), "embedding table (by name): a lookup, not a "
                                                                      "linear map of the input"))
            else:
                add(key, "Linear", tensor, [key])
            continue
        if tensor.dim() == 2 and last in ("weight_orig", "weight_v", "original", "original1"):
            skipped.append(SkippedTensor(key, tuple(tensor.shape), "reparametrized 2-D weight (spectral_norm/"
                                                                  "weight_norm of a Linear): not rebuilt from a state "
                                                                  "dict; load the whole model instead"))
            continue
        if tensor.dim() not in _KERNEL_DIMS:
            continue
        if last in ("weight_orig", "weight_v", "original", "original1"):
            skipped.append(SkippedTensor(key, tuple(tensor.shape), _UNREBUILDABLE))
        elif not last.endswith("weight"):
            skipped.append(SkippedTensor(key, tuple(tensor.shape), f"{tensor.dim()}-D but not a '...weight' key (not "
                                                                  "a conv kernel by name: an image, buffer, embedding "
                                                                  "or statistic?)"))
        else:
            add(key, _conv_kind(tensor), tensor, [key])
    return targets, skipped


def _layer_names(paths: List[Tuple[str, ...]], keys: List[str]) -> List[str]:
    """Display names: wrapper mapping keys dropped from the front, '.weight'-like tails removed."""
    names = []
    for full_path in paths:
        path = list(full_path)
        while len(path) > 1 and path[0].lower() in _WRAPPER_KEYS:
            path.pop(0)
        name = ".".join(path)
        for tail in (".parametrizations.weight.original1", ".parametrizations.weight.original", ".weight_orig",
                     ".weight_v", ".core", ".weight"):
            if name.endswith(tail):
                name = name[: -len(tail)]
                break
        else:
            if name in ("weight", "weight_orig", "core"):
                name = "<top level>"
        names.append(name)
    # Two containers can yield the same stripped name: fall back to the full keys.
    counts: Dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [key if counts[name] > 1 else name for name, key in zip(names, keys)]


def state_dict_report(
    state_dict: Mapping[str, Any],
    input_size: Optional[Tuple[int, ...]] = None,
    *,
    in_channels: Optional[int] = None,
    gram_iters: int = 6,
    power_iters: int = 20,
    spatial_iters: int = 2,
    keep_spectra: bool = False,
    max_memory: Optional[int] = DEFAULT_MAX_MEMORY,
    progress: ProgressArg = None,
) -> SpectralReport:
    """Report on the conv kernels and Linear matrices of a state dict or a training checkpoint.

    Finding the kernels
        The checkpoint is searched through nested mappings and lists. Tensors under
        optimizer state (a key containing ``optim`` or ``scheduler``: ``optimizer``,
        ``optimizer_state_dict``, Lightning's ``optimizer_states``/``lr_schedulers``, Adam
        moments ``exp_avg``...), under EMA copies (a key with an ``ema`` word:
        ``ema``, ``model_ema``, ``ema_state_dict``, ``state_dict_ema``, ``shadow_params``...)
        and under ``callbacks``/``loops`` are not analysed; an EMA copy is analysed only
        when the checkpoint holds no other weights. In the model's weights, a kernel is a
        3-D, 4-D or 5-D floating tensor whose key ends in ``weight`` (``conv1.weight``): a
        ``Conv1d``, ``Conv2d`` or ``Conv3d`` kernel ``(c_out, c_in/g, *k)``; ``spectral_norm``
        (``weight_orig`` + ``weight_u``/``weight_v``, or ``parametrizations.weight.original``)
        and ``weight_norm`` (``weight_g``/``weight_v``, ``original0``/``original1``) kernels
        are rebuilt as the layer uses them in eval mode; ``U, S, core, V`` groups are
        SVD conv layers (analysed on their core, of any dimension). Every other 3-D/4-D/5-D
        tensor (images, moments, EMA copies, empty or non-finite kernels...) is listed in
        ``report.skipped`` with the reason. Layer names drop wrapper keys such as
        ``state_dict``, ``model``, ``model_state_dict`` and ``module``.

    What is computed
        A state dict stores neither strides, dilations, groups nor paddings, so every
        kernel is analysed as a stride-1, undilated, ungrouped conv with zero padding up to
        ``k - 1``: the size-independent bounds are then valid for any stride and padding
        of zeros (for a grouped kernel they bound the max over groups), and with
        ``input_size`` every kernel with that many spatial axes is analysed at that size
        (the state dict does not say how deeper layers downsample); kernels of another
        dimension get size-independent bounds, with a note.

    Transposed convs
        A ``ConvTranspose{d}d`` weight ``(in, out/g, *k)`` has exactly the layout of the
        kernel of the conv it is the adjoint of, and nothing in a state dict tells the two
        apart. It is reported as that conv (kind ``Conv{d}d``): same singular values, so
        'FF min' and the size-independent 'upper own' bound the transposed layer too, and
        'exact circ' at ``input_size`` is that conv's circular spectrum there, i.e. the
        transposed layer's on ``input_size / s`` inputs (``spectral_report``'s convention).
        Load the whole model to have transposed layers named as such.

    Parameters
    ----------
    state_dict : mapping
        A state dict or a checkpoint dict that holds one (``{'state_dict': ...}``,
        ``{'model': ...}``, ``{'model_state_dict': ..., 'optimizer_state_dict': ...}``,
        Lightning checkpoints...).
    input_size : tuple of 1, 2 or 3 ints, optional
        Spatial size for exact circular values: ``(L,)`` for Conv1d kernels, ``(H, W)``
        for Conv2d, ``(D, H, W)`` for Conv3d.
    in_channels : int, optional
        The input's channel count (the ``C`` of ``--input-size C H W``), checked against
        the input channels (``shape[1]``) of the first kernel in the checkpoint, taken as
        the input layer (a common mistake is ``H W C`` order); it is not used otherwise.
    gram_iters, power_iters, spatial_iters, keep_spectra, max_memory, progress
        As in ``spectral_report``.

    Raises
    ------
    UnsafeTensorError
        A tensor stores far less data than its shape claims (expanded, stride-0), or a
        would-be kernel has more than ``MAX_KERNEL_ELEMENTS`` elements.
    ValueError
        ``in_channels`` differs from the first kernel's input channels, ``input_size`` has
        a number of spatial axes that no conv kernel of the checkpoint has, or a bad
        argument.
    """
    _check_iters(gram_iters=gram_iters, power_iters=power_iters, spatial_iters=spatial_iters)
    keep_spectra = args.boolean(keep_spectra, "keep_spectra")
    max_memory = _check_max_memory(max_memory)
    if input_size is not None:
        expected = ("a tuple of 1, 2 or 3 positive ints (L), (H, W) or (D, H, W), one per spatial axis of the "
                    f"kernels to analyse at that size, got {input_size!r}")
        if not isinstance(input_size, (tuple, list)):
            raise TypeError(f"input_size must be {expected} of type {type(input_size).__name__}")
        if not 1 <= len(input_size) <= 3:
            raise ValueError(f"input_size must be {expected}")
        input_size = tuple(args.positive_int(n, f"input_size[{axis}]") for axis, n in enumerate(input_size))
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors, got {type(state_dict).__name__}")
    check_tensor_storage(state_dict)
    regions: Dict[str, Dict[Tuple[str, ...], Tensor]] = {}
    for path, tensor in _walk(state_dict):
        regions.setdefault(_region(path), {})[path] = tensor
    found, skipped = _discover(regions.get("model", {}))
    messages = []
    ema_found, ema_skipped = _discover(regions.get("ema", {})) if "ema" in regions else ([], [])
    if not found and ema_found:
        found, skipped = ema_found, skipped + ema_skipped
        messages.append("the checkpoint holds no weights besides an EMA/averaged copy: analysed that copy")
    else:
        for path, tensor in regions.get("ema", {}).items():
            if tensor.dim() in _KERNEL_DIMS:
                skipped.append(SkippedTensor(".".join(path), tuple(tensor.shape), _REGION_REASONS["ema"]))
    for region in ("optimizer", "loop"):
        for path, tensor in regions.get(region, {}).items():
            if tensor.dim() in _KERNEL_DIMS:
                skipped.append(SkippedTensor(".".join(path), tuple(tensor.shape), _REGION_REASONS[region]))
    names = _layer_names([path for path, _ in found], [target[0] for _, target in found])
    targets = [(name, kind, shape, kernel, note) for name, (_, (_, kind, shape, kernel, note)) in zip(names, found)]
    if in_channels is not None and targets and targets[0][2][1] != in_channels:
        first_name, first_shape = targets[0][0], targets[0][2]
        raise ValueError(
            f"in_channels (the C of --input-size C H W) is {in_channels}, but the first kernel {first_name!r} "
            f"(shape {'x'.join(map(str, first_shape))}) takes {first_shape[1]} input channels; the order is C H W: "
            f"pass C={first_shape[1]} (from a state dict C is only checked against the first kernel, as the "
            "input layer; a ConvTranspose weight reads as the conv it is the adjoint of, whose input channels are "
            "the transposed layer's output channels: docs/cli.md, 'Transposed convs in a state dict')"
        )
    # Paddings are unknown: k - 1 per side covers every padding up to 'full' (crop argument).
    specs: List[Tuple[str, str, Tuple[int, ...], Tensor, Optional[ConvSpec], str]] = [
        (n, k, shape, kernel, None if k == "Linear" else
         ConvSpec(kernel, padding=tuple(size - 1 for size in kernel.shape[2:])), note)
        for n, k, shape, kernel, note in targets]
    if not specs:
        messages.insert(0, "no conv kernels found in the checkpoint (3-D, 4-D or 5-D floating tensors under keys "
                           "ending in 'weight', outside optimizer state)")
        return SpectralReport([], " ".join(messages), skipped)
    conv_dims = sorted({spec.dims for *_, spec, _ in specs if spec is not None})
    if input_size is not None and conv_dims and len(input_size) not in conv_dims:
        spelled = {1: "C L", 2: "C H W", 3: "C D H W"}
        raise ValueError(
            f"input_size has {len(input_size)} spatial {'axes' if len(input_size) > 1 else 'axis'} "
            f"{'x'.join(map(str, input_size))}, but the checkpoint's conv kernels are "
            f"{'/'.join(f'{d}-D' for d in conv_dims)}: give one size per spatial axis "
            f"(--input-size {spelled[conv_dims[0]]})")
    messages.insert(0, "strides, paddings and groups are not stored in a state_dict: each kernel is analysed as a "
                       "stride-1 ungrouped conv; upper bounds hold for any stride and any zero padding up to k-1 per side")
    messages.append("a ConvTranspose weight cannot be told from a conv kernel in a state dict: it is analysed as the "
                    "conv it is the adjoint of (same singular values; its bounds hold for the transposed layer)")
    if input_size is None:
        messages.append("no input size: size-independent bounds for zero/circular padding only")
    else:
        messages.append(f"every {len(input_size)}-D kernel is analysed at {'x'.join(map(str, input_size))} (a state "
                        "dict does not say how deeper layers downsample)"
                        + ("" if set(conv_dims) <= {len(input_size)} else
                           "; kernels with another number of spatial axes get size-independent bounds only"))
    rows = []
    kept = 0
    reporter = progress_for(progress, len(specs), default=interactive())
    for name, kind, shape, kernel, spec, note in specs:
        try:
            if spec is None:
                row = _analyse_linear(name, kernel, note=note, keep_spectra=keep_spectra, max_memory=max_memory,
                                      kept_bytes=kept)
            else:
                size = input_size if input_size is not None and len(input_size) == spec.dims else None
                if input_size is not None and size is None:
                    note = "; ".join(filter(None, [note, f"a {spec.dims}-D kernel: input_size has {len(input_size)} "
                                                         "axes, so size-independent bounds only"]))
                row = _analyse(name, kind, shape, spec, size, gram_iters=gram_iters, power_iters=power_iters,
                               spatial_iters=spatial_iters, note=note, keep_spectra=keep_spectra,
                               max_memory=max_memory, kept_bytes=kept)
        except _TooBig as reason:
            skipped.append(SkippedTensor(name, shape, str(reason)))
        else:
            kept += _LIST_BYTES * len(row.singular_values or ())
            rows.append(row)
        if reporter is not None:
            reporter.step(name)
    return SpectralReport(rows, "; ".join(messages[:1]) + "".join(f"\n{m}" for m in messages[1:]), skipped,
                          chain=False, chain_note="a state dict does not say how its layers connect (residual "
                          "branches, normalisation layers); the product bounds the model only if it is a plain "
                          "chain of these layers, in this order, with 1-Lipschitz maps in between")
