"""Measure what singular-value control buys: calibration, robustness and Lipschitz constants.

Everything here is plain PyTorch (matplotlib only for the optional plots) and works on any
classifier ``model(x) -> logits``:

* calibration: ``expected_calibration_error`` and ``calibration_report`` (a
  reliability table) on logits, ``calibration`` on a model and a loader;
* empirical robustness: ``fgsm`` and ``pgd`` (L2 and Linf) return adversarial
  inputs, ``attack_accuracy`` the accuracy under them;
* certified robustness: ``lipschitz_bound`` (a certified Lipschitz constant of a plain
  chain of layers), ``certified_radius`` and ``certified_accuracy``
  (``margin / (sqrt(2) L)``), beside ``empirical_lipschitz``, a lower estimate of the
  same constant from input Jacobians and adversarial pairs;
* training certified nets: ``margin_loss`` (hinge and hinge-KR);
* per-layer spectra: ``singular_value_histograms`` and ``plot_singular_value_histograms``.

Conventions. A *loader* is any iterable of ``(inputs, labels, ...)`` batches (a
``DataLoader``, a list of tuples); batches go to the device of the model's first
parameter. Every function that runs the model needs it in eval mode and raises otherwise:
nothing here changes the model's mode or restores it behind your back. Attacks and
Jacobians take gradients with respect to the *input only* (``torch.autograd.grad``): no
parameter's ``.grad`` is created or changed. Norms are over all of an example's
coordinates (``x.flatten(1)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from . import _conv_args as args
from ._hooks import record_input_sizes
from ._linalg import matrix_two_norm
from ._table import render_table
from ._trace import global_hook_problem, hook_problem
from .bounds import padding_factor
from .geometry import conv_spec
from .layer import SVDConv, _SVDConvNd
from .spectra import check_spectral_input_size, conv_singular_values

__all__ = [
    "predict",
    "accuracy",
    "ReliabilityBin",
    "CalibrationReport",
    "calibration_report",
    "expected_calibration_error",
    "calibration",
    "fgsm",
    "pgd",
    "attack_accuracy",
    "lipschitz_bound",
    "certified_radius",
    "certified_accuracy",
    "empirical_lipschitz",
    "margin_loss",
    "SpectrumHistogram",
    "singular_value_histograms",
    "plot_singular_value_histograms",
]

Loader = Iterable[Any]


# ----------------------------------------------------------------- argument checks
def _check_eval(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if module.training:
            where = f"its submodule '{name}' ({type(module).__name__})" if name else "it"
            raise ValueError(
                f"model is in training mode ({where} has training=True); call model.eval() first. "
                "Evaluation must see the model as it is deployed (batch-norm running statistics, no "
                "dropout), and ttconv.evaluate never changes a model's mode itself."
            )


def _check_eps(eps: Any, name: str = "eps") -> float:
    return args.non_negative_finite(eps, name, "a perturbation radius")


def _check_norm(norm: Any) -> str:
    """``'linf'`` or ``'l2'``, in any letter case."""
    return args.choice(norm.lower() if isinstance(norm, str) else norm, "norm", NORMS,
                       "'linf': max-abs ball, 'l2': Euclidean ball")


def _check_n_bins(n_bins: Any) -> int:
    return args.positive_int(n_bins, "n_bins", "number of equal-width confidence bins, e.g. 15")


def _check_lipschitz(lipschitz: Any) -> float:
    return args.positive_finite(lipschitz, "lipschitz", "an upper bound of the model's L2 Lipschitz constant, "
                                "e.g. from ttconv.evaluate.lipschitz_bound")
    return float(lipschitz)


def _check_logits_and_labels(logits: Any, labels: Any) -> None:
    """Types and shapes: ``(N, C)`` logits, ``(N,)`` integer labels."""
    args.tensor(logits, "logits", "(N, C) with C >= 2 classes")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be a (N, C) tensor with C >= 2 classes, got shape {tuple(logits.shape)}")
    args.tensor(labels, "labels", f"integer, of shape ({logits.shape[0]},) matching logits")
    if labels.shape != logits.shape[:1] or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of shape ({logits.shape[0]},) matching logits, got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")


def _check_logits(logits: Any, labels: Any) -> Tuple[Tensor, Tensor]:
    _check_logits_and_labels(logits, labels)
    if logits.shape[0] == 0:
        raise ValueError("logits and labels are empty: there is nothing to evaluate")
    if bool(((labels < 0) | (labels >= logits.shape[1])).any()):
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}] (one per class of logits)")
    return logits, labels


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.empty(0).device  # no tensors: torch's default device, as a factory call would use


def _batches(loader: Loader, device: torch.device) -> Iterator[Tuple[Tensor, Tensor]]:
    """``(x, y)`` of every batch, on ``device``; raises on an empty loader or a malformed batch."""
    if isinstance(loader, Tensor) or not isinstance(loader, Iterable):
        raise TypeError(f"loader must be an iterable of (inputs, labels) batches, e.g. a DataLoader, "
                        f"got {type(loader).__name__}")
    count = 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"each batch of loader must be (inputs, labels, ...), got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError("each batch of loader must hold tensors (inputs, labels)")
        count += 1
        yield x.to(device), y.to(device)
    if count == 0:
        raise ValueError("loader yielded no batches: pass a non-empty DataLoader or list of (inputs, labels) batches")


# ----------------------------------------------------------------- predictions
@torch.no_grad()
def predict(model: nn.Module, loader: Loader) -> Tuple[Tensor, Tensor]:
    """Logits and labels over a loader, concatenated (model in eval mode, no gradients).

    Returns
    -------
    (Tensor, Tensor)
        ``(N, C)`` logits and ``(N,)`` labels, on the model's device.
    """
    _check_eval(model)
    logits, labels = [], []
    for x, y in _batches(loader, _device(model)):
        logits.append(model(x))
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def accuracy(model: nn.Module, loader: Loader) -> float:
    """Fraction of examples whose ``argmax`` logit is the label (ties: the first maximal index)."""
    logits, labels = predict(model, loader)
    return float((logits.argmax(1) == labels).double().mean())


# ----------------------------------------------------------------- calibration
@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin ``(lower, upper]`` of a reliability table (the first bin includes 0).

    Attributes
    ----------
    lower, upper : float
        Bin edges, ``b / n_bins`` and ``(b + 1) / n_bins``.
    count : int
        Examples whose confidence falls in the bin.
    accuracy, confidence : float or None
        Mean correctness and mean confidence of those examples; ``None`` for an empty bin.
    """

    lower: float
    upper: float
    count: int
    accuracy: Optional[float]
    confidence: Optional[float]

    @property
    def gap(self) -> Optional[float]:
        """``|accuracy - confidence|``, ``None`` for an empty bin."""
        return None if self.count == 0 else abs(self.accuracy - self.confidence)  # type: ignore[operator]


@dataclass(frozen=True)
class CalibrationReport:
    """Expected calibration error and the reliability table it is computed from.

    Attributes
    ----------
    ece : float
        ``sum_b (n_b / N) |accuracy_b - confidence_b|`` over the non-empty bins.
    bins : list of ReliabilityBin
        All ``n_bins`` bins, empty ones included.
    count : int
        ``N``, the number of examples.
    """

    ece: float
    bins: List[ReliabilityBin]
    count: int

    def table(self) -> str:
        """The reliability table as Markdown: bin, count, accuracy, confidence, gap."""
        rows = []
        for b in self.bins:
            opening = "[" if b.lower == 0 else "("
            values = [f"{b.accuracy:.4f}", f"{b.confidence:.4f}", f"{b.gap:.4f}"] if b.count else ["-", "-", "-"]
            rows.append([f"{opening}{b.lower:.3f}, {b.upper:.3f}]", str(b.count), *values])
        table = render_table(["confidence bin", "count", "accuracy", "confidence", "gap"], rows, markdown=True)
        return f"{table}\n\nECE = {self.ece:.4f} over {self.count} examples ({len(self.bins)} equal-width bins)"

    __str__ = table

    def plot(self, path: str, *, title: str = "Reliability diagram") -> None:
        """Save a reliability diagram (accuracy per bin against the diagonal) to ``path``; needs matplotlib."""
        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(4, 4))
        try:
            full = [b for b in self.bins if b.count]
            axis.bar([b.lower for b in full], [b.accuracy for b in full], width=[b.upper - b.lower for b in full],
                     align="edge", edgecolor="black", label="accuracy")
            axis.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
            axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max softmax probability)", ylabel="accuracy",
                     title=f"{title}\nECE = {self.ece:.4f}")
            axis.legend(loc="upper left")
            figure.tight_layout()
            figure.savefig(path)
        finally:
            plt.close(figure)


def calibration_report(logits: Tensor, labels: Tensor, n_bins: int = 15) -> CalibrationReport:
    """Reliability table and expected calibration error (ECE) of a classifier's predictions.

    Binning, exactly: an example's *confidence* is its largest softmax probability
    (computed in float64) and its prediction the ``argmax`` logit (the first one on ties).
    ``[0, 1]`` is cut into ``n_bins`` equal-width bins ``(b/B, (b+1)/B]``, right-closed (the
    first bin also holds 0); a confidence of exactly ``b/B`` goes to bin ``b - 1``. Then

        ECE = sum over non-empty bins of (n_b / N) * |accuracy_b - confidence_b|,

    the count-weighted mean gap between accuracy and mean confidence (Guo et al. 2017;
    Naeini et al. 2015). Pass probabilities as ``probs.log()``: the softmax gives them back.

    Parameters
    ----------
    logits : Tensor
        ``(N, C)`` logits.
    labels : Tensor
        ``(N,)`` integer labels.
    n_bins : int
        Number of bins ``B`` (15 is the usual choice).

    Returns
    -------
    CalibrationReport

    Examples
    --------
    >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    >>> report = calibration_report(probs.log(), torch.tensor([0, 1, 1]), n_bins=2)
    >>> [(b.count, b.accuracy) for b in report.bins]      # bins [0, 0.5] and (0.5, 1]
    [(0, None), (3, 0.6666666666666666)]
    >>> round(report.bins[1].confidence, 4)               # (0.9 + 0.6 + 0.7) / 3
    0.7333
    >>> round(report.ece, 4)   # |2/3 - 0.7333|
    0.0667
    """
    logits, labels = _check_logits(logits, labels)
    n_bins = _check_n_bins(n_bins)
    probabilities = torch.softmax(logits.detach().double(), dim=1)
    confidence = probabilities.amax(dim=1)
    prediction = logits.detach().argmax(dim=1)  # the first maximal logit, as accuracy() counts it
    correct = (prediction == labels).double()
    edges = torch.arange(1, n_bins, dtype=torch.float64, device=confidence.device) / n_bins
    index = torch.bucketize(confidence, edges, right=False)  # edges[i-1] < c <= edges[i]
    counts = torch.bincount(index, minlength=n_bins)
    hits = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device).index_add_(0, index, correct)
    sure = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device).index_add_(0, index, confidence)
    bins, ece, total = [], 0.0, int(labels.numel())
    for b in range(n_bins):
        n = int(counts[b])
        acc = float(hits[b]) / n if n else None
        conf = float(sure[b]) / n if n else None
        if n:
            ece += n / total * abs(acc - conf)  # type: ignore[operator]
        bins.append(ReliabilityBin(b / n_bins, (b + 1) / n_bins, n, acc, conf))
    return CalibrationReport(ece, bins, total)


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width, right-closed confidence bins; see ``calibration_report``."""
    return calibration_report(logits, labels, n_bins).ece


def calibration(model: nn.Module, loader: Loader, n_bins: int = 15) -> CalibrationReport:
    """``calibration_report`` of ``model``'s predictions over ``loader`` (eval mode)."""
    n_bins = _check_n_bins(n_bins)
    return calibration_report(*predict(model, loader), n_bins=n_bins)


# ----------------------------------------------------------------- attacks
def _l2_length(t: Tensor) -> Tensor:
    """Per-example L2 norm, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def _linf_ascent(grad: Tensor) -> Tensor:
    return grad.sign()


def _l2_ascent(grad: Tensor) -> Tensor:
    length = _l2_length(grad)
    return torch.where(length > 0, grad / length.clamp_min(torch.finfo(grad.dtype).tiny), torch.zeros_like(grad))


def _linf_project(delta: Tensor, eps: float) -> Tensor:
    return delta.clamp(-eps, eps)


def _l2_project(delta: Tensor, eps: float) -> Tensor:
    length = _l2_length(delta)
    return delta * torch.where(length > eps, eps / length.clamp_min(torch.finfo(delta.dtype).tiny),
                               torch.ones_like(length))


def _linf_random_point(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps


def _l2_random_point(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / _l2_length(direction).clamp_min(torch.finfo(x.dtype).tiny)
    dim = x[0].numel()
    radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / dim) * eps
    return direction * radius.reshape(-1, *([1] * (x.dim() - 1)))  # uniform in the ball


@dataclass(frozen=True)
class _Ball:
    """What the attacks and the certificate need of one norm's ball (per example)."""

    ascent: Callable[[Tensor], Tensor]  # the unit step that increases <grad, .> the most
    project: Callable[[Tensor, float], Tensor]  # onto the ball of radius eps around 0
    random_point: Callable[[Tensor, float, torch.Generator], Tensor]  # uniform in the ball, shaped like x
    l2_radius: Callable[[int], float]  # radius of the smallest L2 ball holding the unit ball in d dimensions


_BALLS: Dict[str, _Ball] = {
    "linf": _Ball(_linf_ascent, _linf_project, _linf_random_point, math.sqrt),
    "l2": _Ball(_l2_ascent, _l2_project, _l2_random_point, lambda dim: 1.0),
}
NORMS = tuple(_BALLS)


def _domain(x: Tensor, clamp: Optional[Tuple[float, float]]) -> Tensor:
    return x if clamp is None else x.clamp(clamp[0], clamp[1])


def _check_clamp(clamp: Any) -> Optional[Tuple[float, float]]:
    if clamp is None:
        return None
    return args.interval(clamp, "clamp", "the valid input range, e.g. (0, 1); or None")


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradient of the summed cross-entropy w.r.t. the input only, and the logits."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def _check_attack_inputs(model: nn.Module, x: Any, y: Any) -> None:
    _check_eval(model)
    args.tensor(x, "x", "a floating-point batch (N, ...) of inputs")
    if not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating-point tensor (N, ...) of inputs, got {x.dtype} of shape {tuple(x.shape)}")
    args.tensor(y, "y", f"integer labels of shape ({x.shape[0]},)")
    if y.shape != x.shape[:1] or y.dtype not in (torch.int64, torch.uint8):  # what cross_entropy takes
        raise ValueError(f"y must be an int64 tensor of labels of shape ({x.shape[0]},), got {y.dtype} of shape "
                         f"{tuple(y.shape)}; e.g. y.long()")


def _check_inside(x: Tensor, clamp: Optional[Tuple[float, float]]) -> None:
    """An attack's points are clamped to ``clamp``: an ``x`` outside it would be moved further
    than ``eps`` (normalised data with ``clamp=(0, 1)``)."""
    if clamp is not None and x.numel() and (float(x.min()) < clamp[0] or float(x.max()) > clamp[1]):
        raise ValueError(f"x lies outside clamp={clamp} (values in [{float(x.min()):.4g}, {float(x.max()):.4g}]): "
                         "clamp is the range x lives in (e.g. (0, 1) for unnormalised images); pass the range of "
                         "your normalised inputs, or clamp=None")


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, norm: str = "linf",
         clamp: Optional[Tuple[float, float]] = None) -> Tensor:
    """Fast gradient attack: one step of length ``eps`` along the loss gradient's ascent direction.

    ``x + eps * sign(g)`` for ``norm='linf'`` (FGSM, Goodfellow et al. 2015) and
    ``x + eps * g / ||g||_2`` for ``norm='l2'`` (the fast gradient method), with ``g`` the
    gradient of the cross-entropy with respect to the input (only; no parameter gradient
    is touched), then clipped to ``clamp``. For a linear model with two classes this is the
    exact worst case in the ball.

    Parameters
    ----------
    model : nn.Module
        A classifier in eval mode (``ValueError`` otherwise).
    x : Tensor
        ``(N, ...)`` inputs.
    y : Tensor
        ``(N,)`` labels.
    eps : float
        Radius, >= 0.
    norm : {'linf', 'l2'}
    clamp : (float, float), optional
        Valid input range; the result is clipped to it. ``x`` must lie inside it (``ValueError``
        otherwise: clipping would move it further than ``eps``).

    Returns
    -------
    Tensor
        Adversarial inputs, detached, within ``eps`` of ``x`` in ``norm``.
    """
    _check_attack_inputs(model, x, y)
    eps, norm, clamp = _check_eps(eps), _check_norm(norm), _check_clamp(clamp)
    _check_inside(x, clamp)
    if eps == 0:
        return _domain(x.detach().clone(), clamp)
    grad, _ = _input_gradient(model, x, y)
    return _domain(x.detach() + eps * _BALLS[norm].ascent(grad), clamp)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, norm: str = "linf", steps: int = 10,
        step_size: Optional[float] = None, restarts: int = 1, random_start: bool = True,
        clamp: Optional[Tuple[float, float]] = None, seed: int = 0) -> Tensor:
    """Projected gradient descent attack (Madry et al. 2018) on the cross-entropy, L2 or Linf ball.

    Each restart starts at ``x`` (``random_start=False``) or at a uniform random point of
    the ball, then takes ``steps`` steps ``delta <- project(delta + step_size * d)``, ``d``
    the ascent direction of ``fgsm`` at the current point, projected onto the ball and
    clipped to ``clamp``. Per example, the first iterate (over steps and restarts) that
    the model misclassifies is returned; for an example never misclassified, the final
    iterate of the restart with the highest loss. Gradients are taken w.r.t. the input
    only.

    Parameters
    ----------
    model : nn.Module
        A classifier in eval mode.
    x, y : Tensor
        ``(N, ...)`` inputs and ``(N,)`` labels.
    eps : float
        Radius, >= 0.
    norm : {'linf', 'l2'}
    steps : int
        Gradient steps per restart, >= 1.
    step_size : float, optional
        Default ``2.5 * eps / steps`` (enough to cross the ball from any start).
    restarts : int
        Independent runs, >= 1.
    random_start : bool
        Start each restart at a uniform random point of the ball.
    clamp : (float, float), optional
        Valid input range, which ``x`` must lie inside (``ValueError`` otherwise).
    seed : int
        Seed of the random starts (a private generator: the global RNG is untouched).

    Returns
    -------
    Tensor
        Adversarial inputs, detached, within ``eps`` of ``x``.
    """
    _check_attack_inputs(model, x, y)
    eps, norm, clamp = _check_eps(eps), _check_norm(norm), _check_clamp(clamp)
    _check_inside(x, clamp)
    steps = args.positive_int(steps, "steps", "gradient steps per restart")
    restarts = args.positive_int(restarts, "restarts", "independent attack runs")
    random_start = args.boolean(random_start, "random_start")
    alpha = 2.5 * eps / steps if step_size is None else _check_eps(step_size, "step_size")
    x = x.detach()
    if eps == 0:
        return _domain(x.clone(), clamp)
    generator = torch.Generator(device=x.device).manual_seed(args.non_negative_int(seed, "seed", "an RNG seed"))
    ball = _BALLS[norm]
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = ball.random_point(x, eps, generator) if random_start else torch.zeros_like(x)
        current = _domain(x + delta, clamp)
        for step in range(steps + 1):
            grad, logits = _input_gradient(model, current, y)
            wrong = (logits.argmax(1) != y) & ~found
            best[wrong] = current[wrong]
            found |= wrong
            if bool(found.all()):
                return best
            if step == steps:
                break
            current = _domain(x + ball.project(current - x + alpha * ball.ascent(grad), eps), clamp)
        loss = F.cross_entropy(logits, y, reduction="none").double()
        better = ~found & (loss > best_loss)
        best[better] = current[better]
        best_loss = torch.where(better, loss, best_loss)
    return best


def _fgsm_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str,
                 clamp: Optional[Tuple[float, float]], options: Dict[str, Any], batch: int) -> Tensor:
    return fgsm(model, x, y, eps, norm=norm, clamp=clamp)  # single step: the PGD options do not apply


def _pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str,
                clamp: Optional[Tuple[float, float]], options: Dict[str, Any], batch: int) -> Tensor:
    return pgd(model, x, y, eps, norm=norm, clamp=clamp, **{**options, "seed": options["seed"] + batch})


_ATTACKS = {"pgd": _pgd_attack, "fgsm": _fgsm_attack}


def attack_accuracy(model: nn.Module, loader: Loader, eps: float, *, attack: str = "pgd", norm: str = "linf",
                    steps: int = 10, step_size: Optional[float] = None, restarts: int = 1,
                    random_start: bool = True, clamp: Optional[Tuple[float, float]] = None, seed: int = 0) -> float:
    """Robust accuracy: fraction of examples classified correctly at ``x`` *and* at the attack's point.

    Parameters
    ----------
    model : nn.Module
        A classifier in eval mode.
    loader : iterable of (inputs, labels)
    eps : float
        Radius, >= 0 (``eps=0`` gives the clean accuracy).
    attack : {'pgd', 'fgsm'}
    norm, steps, step_size, restarts, random_start, clamp, seed
        As in ``pgd`` (only ``norm`` and ``clamp`` apply to FGSM).

    Returns
    -------
    float
        An upper estimate of the true robust accuracy (an attack finds some, not all,
        adversarial examples).
    """
    run = _ATTACKS[args.choice(attack, "attack", _ATTACKS)]
    _check_eval(model)
    eps, norm = _check_eps(eps), _check_norm(norm)
    # Checked here whichever attack runs: a bad PGD option is a mistake with FGSM too.
    options = dict(steps=args.positive_int(steps, "steps", "gradient steps per restart"),
                   step_size=step_size if step_size is None else _check_eps(step_size, "step_size"),
                   restarts=args.positive_int(restarts, "restarts", "independent attack runs"),
                   random_start=args.boolean(random_start, "random_start"),
                   seed=args.non_negative_int(seed, "seed", "an RNG seed"))
    correct = total = 0
    for index, (x, y) in enumerate(_batches(loader, _device(model))):
        adversarial = run(model, x, y, eps, norm, clamp, options, index)
        with torch.no_grad():
            ok = (model(x).argmax(1) == y) & (model(adversarial).argmax(1) == y)
        correct += int(ok.sum())
        total += int(y.numel())
    return correct / total


# ----------------------------------------------------------------- Lipschitz constants
_ONE_LIPSCHITZ = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout,
                  nn.Dropout2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.Softsign, nn.Softplus)


def _pair(value: Any) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _module_bound(name: str, module: nn.Module, rows: Dict[str, Any], uses: int = 1) -> float:
    """Upper bound of one module's L2 Lipschitz constant, or TypeError naming it. ``rows``: the
    report's rows by name; ``uses``: how often the chain applies ``module``."""
    from .activations import ChannelPad, MaxMin

    custom = getattr(module, "lipschitz_bound", None)
    if callable(custom):
        return float(custom())
    if isinstance(module, _SVDConvNd) and module.core_kind == "orthogonal":
        # Its circular operator's singular values are exactly |S| (docs/orthogonal.md); zero padding
        # crops it, other padding multiplies it by the padding's factor (at the one size the
        # report saw, else the worst case over sizes).
        row = rows.get(name) if uses == 1 else None
        with torch.no_grad():
            factor = padding_factor(conv_spec(module), row.input_size if row is not None else None)
            return float(module.effective_S().detach().double().abs().max()) * factor
    if isinstance(module, (_ConvNd, _SVDConvNd)):
        if uses > 1:
            raise ValueError(f"layer '{name}' is applied {uses} times in the chain (registered under several names); "
                             "its bound depends on the input size of each call and the report analyses one: give "
                             "each position its own module, or bound the constant yourself")
        if name not in rows:
            raise ValueError(f"layer '{name}' has no certified bound in the spectral report: it was not reached by "
                             "example_input's forward pass (its operator norm depends on its input size) or its "
                             "analysis exceeded the report's memory budget")
        return rows[name].upper_bound
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            return float(matrix_two_norm(module.weight.detach().double()))
    if isinstance(module, (MaxMin, ChannelPad, *_ONE_LIPSCHITZ)):
        return 1.0
    if isinstance(module, (nn.LeakyReLU,)):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.ELU):
        return max(1.0, module.alpha)
    if isinstance(module, nn.Sigmoid):
        return 0.25
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and module.track_running_stats \
            and module.running_var is not None:
        with torch.no_grad():  # eval mode: y = gamma (x - mean) / sqrt(var + eps) + beta, per channel
            scale = 1.0 / torch.sqrt(module.running_var.double() + module.eps)
            if module.weight is not None:
                scale = scale * module.weight.detach().double().abs()
            return float(scale.max())
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        kernel, stride = _pair(module.kernel_size), _pair(module.stride)
        padding = _pair(module.padding)
        dilation = _pair(getattr(module, "dilation", 1))
        if all(s >= k for s, k in zip(stride, kernel)) and padding == (0, 0) and dilation == (1, 1) \
                and not module.ceil_mode and getattr(module, "divisor_override", None) is None:
            # Disjoint windows: a max is 1-Lipschitz per window; a mean of m values has norm 1/sqrt(m).
            return 1.0 if isinstance(module, nn.MaxPool2d) else 1.0 / math.sqrt(kernel[0] * kernel[1])
    raise TypeError(
        f"cannot bound the Lipschitz constant of '{name}' ({type(module).__name__}). lipschitz_bound knows "
        "convs (ttconv's SVD layers, torch's 1-3-D and transposed convs), nn.Linear, eval-mode batch norm, non-overlapping pools and 1-Lipschitz "
        "activations (ReLU, MaxMin, ...); give the module a lipschitz_bound() method returning an upper bound, "
        "or compute the constant yourself and pass it to certified_accuracy"
    )


def _refuse_hook(problem: Optional[str]) -> None:
    """``TypeError`` for a hook ``_trace.hook_problem`` found (None: nothing to refuse)."""
    if problem:
        raise TypeError(f"cannot certify the chain: {problem}; remove the hook, or bound the constant yourself "
                        "and pass it to certified_accuracy")


def _chain(module: nn.Module, prefix: str = "") -> Iterator[Tuple[str, nn.Module]]:
    """The modules a Sequential applies, in order, nested Sequentials flattened. A module
    registered twice is applied twice, so it is listed twice (``named_children`` would hide it).
    Raises ``TypeError`` where a hook can change what a module or a container computes."""
    for name, child in module._modules.items():
        if child is None:  # torch's Sequential skips a None entry
            continue
        path = f"{prefix}{name}"
        _refuse_hook(hook_problem(path, child))
        if type(child) is nn.Sequential:
            yield from _chain(child, path + ".")
        else:
            yield path, child


def lipschitz_bound(model: nn.Module, example_input: Tensor, *, report: Optional[Any] = None) -> float:
    """Certified upper bound of the L2 Lipschitz constant of a plain chain of layers.

    The product of per-layer bounds, valid because ``model`` is an ``nn.Sequential`` (nested
    ``nn.Sequential`` are flattened) that applies its layers one after the other:

    * ``SVDConv(core_kind='orthogonal')``: ``max |S|`` (its circular operator's exact norm, an
      upper bound with zero padding, ``docs/orthogonal.md``) times ``bounds.padding_factor`` of
      its padding (1 for zeros; the copies of reflect/replicate, circular rows repeated);
    * other SVD layers and torch convs (1-D, 2-D, 3-D, transposed): the report's certified bound of the layer's own
      operator at the input size seen in ``example_input``'s forward pass (the
      ``upper_bound`` column of ``ttconv.spectral_report``; exact for circular padding
      on sizes divisible by the stride);
    * ``nn.Linear``: its exact spectral norm; eval-mode batch norm: ``max |gamma| / sqrt(var + eps)``;
      non-overlapping max/avg pooling: ``1`` / ``1/sqrt(window)``; ReLU, MaxMin,
      ChannelPad, Flatten, PixelUnshuffle and other 1-Lipschitz maps: 1;
    * a module with a ``lipschitz_bound()`` method: its value.

    Anything else, any model that is not an ``nn.Sequential`` (residual connections,
    concatenations), and a hook that can change what a module computes (a forward hook or
    pre-hook other than the reparametrizations', a global module hook, a ``forward`` replaced
    on the instance) raise ``TypeError``: a product of layer bounds is *not* a certificate
    there. A module registered twice counts at each use; a conv so registered raises
    ``ValueError`` (its bound depends on each call's input size). For such a model, bound the constant yourself and pass it to
    ``certified_accuracy``.

    Parameters
    ----------
    model : nn.Sequential
        The chain, in eval mode (batch norm is bounded by its running statistics; convs are
        sized by one no-grad forward pass).
    example_input : Tensor
        An input the model accepts, e.g. ``torch.zeros(1, C, H, W)``.
    report : SpectralReport, optional
        ``spectral_report(model, example_input)`` if you already have it (saves computing it).

    Returns
    -------
    float
        ``L`` with ``||model(x) - model(x')||_2 <= L ||x - x'||_2`` for inputs of that size.
    """
    from .report import spectral_report

    if type(model) is not nn.Sequential:
        custom = getattr(model, "lipschitz_bound", None)
        if callable(custom):
            return float(custom())
        raise TypeError(
            f"model must be an nn.Sequential (a plain chain of layers), got {type(model).__name__}: the product "
            "of per-layer bounds is only a certificate for a plain chain, not with residual branches or "
            "concatenations; bound the constant yourself and pass it to certified_accuracy"
        )
    _check_eval(model)
    _refuse_hook(global_hook_problem() or hook_problem("", model))
    modules = list(_chain(model))
    rows: Dict[str, Any] = {}
    if any(isinstance(m, (_ConvNd, _SVDConvNd)) for _, m in modules):  # every kind: 1-3-D, transposed
        if report is None:
            report = spectral_report(model, example_input, gram_iters=1, power_iters=1)
        rows = {row.name: row for row in report.layers if row.input_size is not None}
    # The report names a module by its first registered name; count how often each is applied.
    first_name = {id(m): name for name, m in reversed(list(model.named_modules(remove_duplicate=False)))}
    uses: Dict[int, int] = {}
    for _, module in modules:
        uses[id(module)] = uses.get(id(module), 0) + 1
    bound = 1.0
    for name, module in modules:
        bound *= _module_bound(first_name.get(id(module), name), module, rows, uses[id(module)])
    return bound


def certified_radius(logits: Tensor, labels: Tensor, lipschitz: float) -> Tensor:
    """Per-example certified L2 radius ``margin / (sqrt(2) L)``, 0 where the prediction is wrong.

    ``margin = f_y - max_{j != y} f_j`` for the true label ``y``. If the logit map is
    ``L``-Lipschitz in L2, each ``f_y - f_j`` is ``sqrt(2) L``-Lipschitz, so no perturbation
    of L2 norm below the radius changes the prediction (Tsuzuku et al. 2018; Li et al. 2019).

    Parameters
    ----------
    logits : Tensor
        ``(N, C)``.
    labels : Tensor
        ``(N,)``.
    lipschitz : float
        Upper bound of the L2 Lipschitz constant of the logit map, > 0.

    Returns
    -------
    Tensor
        ``(N,)`` float64 radii, >= 0.

    Examples
    --------
    >>> certified_radius(torch.tensor([[3.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]), 1.0)
    tensor([1.4142, 0.0000], dtype=torch.float64)
    """
    logits, labels = _check_logits(logits, labels)
    lipschitz = _check_lipschitz(lipschitz)
    values = logits.detach().double()
    true = values.gather(1, labels[:, None]).squeeze(1)
    others = values.scatter(1, labels[:, None], -math.inf).amax(1)
    return ((true - others) / (math.sqrt(2) * lipschitz)).clamp_min(0.0)


def certified_accuracy(model: nn.Module, loader: Loader, lipschitz: float, eps: float, *, norm: str = "l2") -> float:
    """Fraction of examples correct with a certified radius above ``eps``: ``margin > sqrt(2) L eps``.

    Parameters
    ----------
    model : nn.Module
        The classifier, in eval mode.
    loader : iterable of (inputs, labels)
    lipschitz : float
        Upper bound ``L`` of the model's L2 Lipschitz constant, e.g. ``lipschitz_bound``
        for a plain chain (or ``spectral_report(...).upper_bound_product``, which also is a
        bound for plain chains of convs and 1-Lipschitz activations only).
    eps : float
        Radius, >= 0; at ``eps=0`` this is the accuracy of strictly correct predictions.
    norm : {'linf', 'l2'}
        ``'linf'`` certifies the Linf ball of radius ``eps``, which lies in the L2 ball of
        radius ``sqrt(d) eps`` (``d`` the input size): a weaker certificate.

    Returns
    -------
    float
        A lower bound of the true robust accuracy at ``eps`` (if ``L`` is a valid bound).
    """
    eps, norm, lipschitz = _check_eps(eps), _check_norm(norm), _check_lipschitz(lipschitz)
    _check_eval(model)
    certified = total = 0
    with torch.no_grad():
        for x, y in _batches(loader, _device(model)):
            radius = certified_radius(model(x), y, lipschitz)
            needed = eps * _BALLS[norm].l2_radius(x[0].numel())
            certified += int((radius > needed).sum())
            total += int(y.numel())
    return certified / total


def _jacobian_norms(model: nn.Module, x: Tensor, n_iter: int, generator: torch.Generator) -> Tensor:
    """Per-example largest singular value of the input Jacobian of the logits (power iteration)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        u = torch.zeros_like(out, requires_grad=True)
        (jt_u,) = torch.autograd.grad(out, x, u, create_graph=True)  # J^T u, linear in u
        v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        v = v / _l2_length(v).clamp_min(torch.finfo(x.dtype).tiny)
        value = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for _ in range(n_iter):
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)  # J v
            value = torch.maximum(value, jv.flatten(1).norm(dim=1).double())
            (w,) = torch.autograd.grad(out, x, jv, retain_graph=True)  # J^T J v
            length = _l2_length(w)
            if not bool((length > 0).any()):
                break
            v = torch.where(length > 0, w / length.clamp_min(torch.finfo(w.dtype).tiny), v)
    return value


def _in_float64(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` evaluated in float64 (parameters and floating buffers cast for the call only)."""
    state = {name: t.double() if t.is_floating_point() else t
             for name, t in (*model.named_parameters(), *model.named_buffers())}
    return torch.func.functional_call(model, state, (x.double(),)).double()


def empirical_lipschitz(model: nn.Module, loader: Loader, *, n_iter: int = 20, pair_eps: Optional[float] = None,
                        pair_steps: int = 10, seed: int = 0) -> float:
    """Lower estimate of the model's L2 Lipschitz constant, to set beside a certified bound.

    The largest of

    * ``||J(x)||_2``, the largest singular value of the input Jacobian of the logits, at
      every input of ``loader`` (``n_iter`` power iterations per example, with gradients
      w.r.t. the input only);
    * with ``pair_eps``: the same at PGD-L2 adversarial points ``x'`` within ``pair_eps`` of
      each input, and the difference quotient ``||f(x) - f(x')|| / ||x - x'||`` of each pair.

    Each is at most the true constant, so ``empirical_lipschitz(...) <= L`` for any valid
    bound ``L``; for a linear model ``f(x) = W x + b`` it is ``||W||_2``. The gap between the
    two says how loose the certificate is. Examples are treated independently, which holds
    in eval mode.

    Parameters
    ----------
    model : nn.Module
        In eval mode.
    loader : iterable of (inputs, labels)
    n_iter : int
        Power iterations per example, >= 1.
    pair_eps : float, optional
        Radius of the adversarial pairs (none when ``None``).
    pair_steps : int
        PGD steps for the pairs.
    seed : int
        Seed of the power-iteration starts and PGD restarts (private generators).

    Returns
    -------
    float
    """
    _check_eval(model)
    n_iter = args.positive_int(n_iter, "n_iter", "power iterations per example")
    seed = args.non_negative_int(seed, "seed", "an RNG seed")
    if pair_eps is not None:
        pair_eps = _check_eps(pair_eps, "pair_eps")
    best = 0.0
    for index, (x, y) in enumerate(_batches(loader, _device(model))):
        generator = torch.Generator(device=x.device).manual_seed(int(seed) + index)
        best = max(best, float(_jacobian_norms(model, x, n_iter, generator).max()))
        if pair_eps:
            adversarial = pgd(model, x, y, pair_eps, norm="l2", steps=pair_steps, seed=seed + index)
            best = max(best, float(_jacobian_norms(model, adversarial, n_iter, generator).max()))
            with torch.no_grad():
                # In float64: a float32 model's round-off in f(x') - f(x) can exceed the change
                # itself for a small pair (1.24x the true constant at pair_eps=1e-6, 6x at 3e-7).
                moved = (adversarial.double() - x.double()).flatten(1).norm(dim=1)
                change = (_in_float64(model, adversarial) - _in_float64(model, x)).flatten(1).norm(dim=1)
            keep = moved > 0
            if bool(keep.any()):
                best = max(best, float((change[keep] / moved[keep]).max()))
    return best


# ----------------------------------------------------------------- training loss
_REDUCTIONS: Dict[str, Callable[[Tensor], Tensor]] = {"mean": torch.mean, "sum": torch.sum, "none": lambda loss: loss}


def margin_loss(logits: Tensor, labels: Tensor, min_margin: float = 1.0, *, kr_weight: float = 0.0,
                reduction: str = "mean") -> Tensor:
    """Lipschitz margin loss for training certified networks: multiclass hinge, optionally hinge-KR.

    Per example with label ``y`` and ``K`` classes::

        hinge = sum_{j != y} relu(min_margin - (f_y - f_j))
        kr    = f_y - mean_{j != y} f_j
        loss  = hinge - kr_weight * kr

    ``kr_weight=0`` is the hinge loss: it is zero exactly when every margin ``f_y - f_j``
    is at least ``min_margin``, which for an ``L``-Lipschitz network certifies the L2
    radius ``min_margin / (sqrt(2) L)``; so to aim at radius ``eps`` on a 1-Lipschitz net
    take ``min_margin = sqrt(2) * eps``. ``kr_weight > 0`` adds the Kantorovich-Rubinstein
    term that keeps pushing margins up (deel-lip's hinge-KR, ``alpha * hinge - KR``, is
    this loss times ``alpha`` with ``kr_weight = 1 / alpha``).

    Parameters
    ----------
    logits : Tensor
        ``(N, C)``.
    labels : Tensor
        ``(N,)``.
    min_margin : float
        Required margin, > 0.
    kr_weight : float
        Weight of the KR term, >= 0.
    reduction : {'mean', 'sum', 'none'}

    Returns
    -------
    Tensor
        Differentiable loss (0-D, or ``(N,)`` for ``'none'``).

    Examples
    --------
    >>> margin_loss(torch.tensor([[2.0, 1.5, -1.0]]), torch.tensor([0]), min_margin=1.0)
    tensor(0.5000)
    """
    _check_logits_and_labels(logits, labels)  # no value checks: no host sync inside a training step
    min_margin = args.positive_finite(min_margin, "min_margin", "sqrt(2) * L * eps certifies radius eps")
    kr_weight = args.non_negative_finite(kr_weight, "kr_weight", "0: pure hinge")
    reduction = args.choice(reduction, "reduction", _REDUCTIONS)
    true = logits.gather(1, labels[:, None])
    others = torch.ones_like(logits, dtype=torch.bool).scatter(1, labels[:, None], False)
    gaps = torch.relu(min_margin - (true - logits)) * others
    loss = gaps.sum(1)
    if kr_weight:
        kr = true.squeeze(1) - (logits * others).sum(1) / (logits.shape[1] - 1)
        loss = loss - kr_weight * kr
    return _REDUCTIONS[reduction](loss)


# ----------------------------------------------------------------- spectra
@dataclass(frozen=True)
class SpectrumHistogram:
    """Histogram of one conv layer's singular values (circular operator at its input size).

    Attributes
    ----------
    name : str
    input_size : (int, int)
    counts : Tensor
        ``(bins,)`` int64 counts, on the CPU (a summary, whatever the model's device).
    edges : Tensor
        ``(bins + 1,)`` float64 bin edges, on the CPU.
    largest : float
        The layer's spectral norm (largest singular value).
    """

    name: str
    input_size: Tuple[int, int]
    counts: Tensor
    edges: Tensor
    largest: float


def _layer_spectrum(layer: Union[nn.Conv2d, SVDConv], size: Tuple[int, int]) -> Tensor:
    if isinstance(layer, SVDConv):
        return layer.singular_values(size).detach()
    return conv_singular_values(layer.weight.detach(), size, stride=layer.stride, dilation=layer.dilation,
                                groups=layer.groups)


@torch.no_grad()
def singular_value_histograms(model: nn.Module, example_input: Tensor, *, bins: int = 50,
                              range: Optional[Tuple[float, float]] = None) -> List[SpectrumHistogram]:
    """Histogram of every conv layer's singular values, all on the same bins.

    Each layer's spectrum is that of its circular convolution at the input size seen in
    ``example_input``'s forward pass (``ttconv.SVDConv.singular_values`` or
    ``ttconv.conv_singular_values``: every singular value, zeros of a low rank
    included). Bins are equal-width over ``range``, by default ``(0, largest singular
    value of all layers)``, so layers compare at a glance.

    Parameters
    ----------
    model : nn.Module
        Any model with ``nn.Conv2d`` / ``SVDConv`` layers (any mode: the sizing forward pass
        runs in eval mode, no grad, and restores the mode).
    example_input : Tensor
    bins : int
    range : (float, float), optional

    Returns
    -------
    list of SpectrumHistogram
        In module order. Left out: layers not reached by the forward pass, and layers
        whose input size is not divisible by the stride (no strided circular operator).
        Below the kernel size the kernel folds modulo the size, as in ``spectral_report``.
    """
    from ._hooks import find_conv_layers

    bins = args.positive_int(bins, "bins", "number of histogram bins")
    layers = find_conv_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no nn.Conv2d or SVDConv layers")
    sizes = record_input_sizes(model, layers, example_input)
    spectra = []
    for name, layer in layers:
        if not sizes[name]:
            continue
        try:
            check_spectral_input_size(sizes[name][0], layer.kernel_size, layer.stride, layer.dilation, fold=True)
        except ValueError:  # not divisible by the stride: no strided circular operator
            continue
        spectra.append((name, sizes[name][0], _layer_spectrum(layer, sizes[name][0]).double()))
    if not spectra:
        raise ValueError("no conv layer has a circular spectrum at the sizes seen in example_input's forward pass")
    if range is None:
        top = max(float(values.max()) for _, _, values in spectra)
        range = (0.0, top if top > 0 else 1.0)
    low, high = args.interval(range, "range", "of the histogram bins")
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64, device="cpu")  # beside counts
    result = []
    for name, size, values in spectra:
        counts = torch.histc(values.cpu(), bins=bins, min=low, max=high).long()
        result.append(SpectrumHistogram(name, size, counts, edges, float(values.max())))
    return result


def plot_singular_value_histograms(histograms: Sequence[SpectrumHistogram], path: str, *,
                                   title: str = "Singular values per layer") -> None:
    """Save the histograms (one panel per layer) to ``path``; needs matplotlib."""
    if not histograms:
        raise ValueError("histograms is empty: nothing to plot")
    plt = _pyplot()
    figure, axes = plt.subplots(len(histograms), 1, figsize=(6, 1.6 * len(histograms) + 0.6), squeeze=False,
                                sharex=True)
    try:
        for axis, item in zip(axes[:, 0], histograms):
            widths = (item.edges[1:] - item.edges[:-1]).tolist()
            axis.bar(item.edges[:-1].tolist(), item.counts.tolist(), width=widths, align="edge")
            axis.set_ylabel("count")
            axis.set_title(f"{item.name} at {item.input_size[0]}x{item.input_size[1]}: max {item.largest:.3g}",
                           fontsize=9)
        axes[-1, 0].set_xlabel("singular value (circular operator)")
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or 'ttconv[plot]')") from None
    return plt
