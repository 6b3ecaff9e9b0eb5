"""What singular-value control buys: train one architecture many ways, measure the same things.

One command trains every method of a config on the same architecture, data, optimizer,
schedule and epoch budget, for each seed, and measures on the test set:

clean accuracy, ECE (15 equal-width bins), FGSM and PGD accuracy at each radius, certified
accuracy (``margin > sqrt(2) L eps``, only where the network is a plain chain, so that the
product ``L`` of layer bounds is a certificate), the largest conv spectral norm, the
certified Lipschitz product ``L`` and an empirical lower estimate of the same constant,
and the training time per epoch. Results go to ``results.json``, ``results.md`` (mean and
sample standard deviation over seeds) and plots (accuracy against radius, reliability
diagrams, per-layer singular-value histograms).

Methods (``kind`` in the config's ``methods``):

* ``conv2d``: plain ``nn.Conv2d``;
* ``svdconv``: ``ttconv.convert`` of the same network, no control;
* ``clip``, ``clip_scale``, ``scale``: ``SpectralControl(mode=kind)`` at ``target`` every
  ``control_every`` steps (``clip``: Sedghi clip, approximate; ``clip_scale``: clip then
  scale, guaranteed; ``scale``: exact scale), and a final control pass after training;
* ``fantastic_four``: ``SVDConv`` + ``ff_weight * SpectralControl.regularizer('fantastic_four')``
  added to the loss;
* ``orthogonal``: ``SVDConv(core_kind='orthogonal', max_singular_value=c)`` with MaxMin
  activations (on digits also a norm-1 head and a fixed logit scale ``temperature``).

Run (about 6 minutes on 2 CPU cores)::

    python examples/experiments/run.py                       # configs/digits.json, 3 seeds
    python examples/experiments/run.py --config examples/experiments/configs/cifar10_paper.json \\
        --data-dir /data/cifar-10-batches-py --arch wrn16_10  # the paper's setting (needs a GPU)
    python examples/experiments/run.py --config examples/experiments/configs/cifar10_paper.json \\
        --synthetic --epochs 1                               # time one CIFAR-sized epoch per method
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, os.pardir, os.pardir))  # the repository, for ttconv from a checkout

import architectures as models  # noqa: E402
import offline_data as datasets  # noqa: E402

import ttconv  # noqa: E402
from ttconv import evaluate as ev  # noqa: E402
from ttconv.activations import MaxMin  # noqa: E402

KINDS = ("conv2d", "svdconv", "clip", "clip_scale", "scale", "fantastic_four", "orthogonal")
CONTROL_KINDS = ("clip", "clip_scale", "scale")
DEFAULT_CONFIG = os.path.join(HERE, "configs", "digits.json")


# --------------------------------------------------------------------------- progress
class Progress:
    """One line per finished unit on stderr: ``[ 7/66  11%] label  elapsed 0:42  eta 5:30``."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.stream = max(1, total), 0, stream
        self.start = time.perf_counter()

    def step(self, label: str, units: int = 1) -> None:
        self.done = min(self.total, self.done + units)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        width = len(str(self.total))
        print(f"[{self.done:>{width}}/{self.total} {100 * self.done // self.total:3d}%] {label}  "
              f"elapsed {_clock(elapsed)}  eta {_clock(eta)}", file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


# --------------------------------------------------------------------------- config
def load_config(path: str) -> Dict[str, Any]:
    with open(path) as handle:
        config = json.load(handle)
    config.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return config


def for_arch(config: Dict[str, Any], arch: str) -> Dict[str, Any]:
    """The config with the ``per_arch[arch]`` overrides applied.

    ``arch_options`` and ``eval`` are merged key by key; every other key (``optimizer``,
    ``schedule``, ``methods``, ...) is replaced as a whole.
    """
    if arch not in models.ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(models.ARCHITECTURES)}, got {arch!r}")
    merged = copy.deepcopy(config)
    merged["arch"] = arch
    for key, value in config.get("per_arch", {}).get(arch, {}).items():
        if key in ("arch_options", "eval") and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    merged.pop("per_arch", None)
    return merged


def method_label(method: Dict[str, Any]) -> str:
    if "label" in method:
        return method["label"]
    kind = method["kind"]
    if kind in CONTROL_KINDS:
        return f"{kind} σ≤{method['target']:g}"
    if kind == "orthogonal":
        return f"orthogonal σ≤{method.get('max_singular_value', 1.0):g} + MaxMin"
    if kind == "fantastic_four":
        return f"Fantastic Four reg. λ={method.get('weight', 0):g}"
    return {"conv2d": "Conv2d", "svdconv": "SVDConv"}[kind]


def check_methods(methods: Sequence[Dict[str, Any]]) -> None:
    for method in methods:
        kind = method.get("kind")
        if kind not in KINDS:
            raise ValueError(f"method kind must be one of {KINDS}, got {kind!r} in {method}")
        if kind in CONTROL_KINDS and not (isinstance(method.get("target"), (int, float)) and method["target"] > 0):
            raise ValueError(f"a {kind} method needs a positive 'target' (spectral norm), got {method}")
        if kind == "fantastic_four" and not method.get("weight", 0) > 0:
            raise ValueError(f"a fantastic_four method needs a positive 'weight', got {method}")
    labels = [method_label(m) for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be distinct, got {labels}")


# --------------------------------------------------------------------------- models
def build_model(config: Dict[str, Any], method: Dict[str, Any]) -> nn.Module:
    """The config's architecture, as the method needs it (seed the RNG before calling)."""
    arch = models.ARCHITECTURES[config["arch"]]
    options = dict(config.get("arch_options", {}))
    classes = int(config.get("classes", 10))
    if method["kind"] == "orthogonal":
        bound = float(method.get("max_singular_value", 1.0))

        def conv(in_channels, out_channels, kernel_size, *, stride=1, padding=0, bias=True, padding_mode="zeros"):
            return ttconv.SVDConv(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                                  padding_mode=padding_mode, core_kind="orthogonal", max_singular_value=bound)

        if arch is models.digits_chain:
            width = options.get("width", 32)
            options["head"] = nn.Sequential(models.NormalizedLinear(width * 16, classes),
                                            models.Scale(method.get("temperature", 1.0)))
        return arch(conv, MaxMin, classes=classes, **options)
    model = arch(models.plain_conv, nn.ReLU, classes=classes, **options)
    if method["kind"] != "conv2d":
        model = ttconv.convert(model, rank=config.get("rank"), inplace=True)
    return model


def build_optimizer(config: Dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    options = dict(config.get("optimizer", {"name": "adam", "lr": 3e-3}))
    name = options.pop("name")
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **options)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), **options)
    raise ValueError(f"optimizer name must be 'sgd' or 'adam', got {name!r}")


def build_schedule(config: Dict[str, Any], optimizer: torch.optim.Optimizer, total_steps: int):
    schedule = config.get("schedule")
    if not schedule:
        return None
    if schedule["name"] == "multistep":  # milestones as fractions of all steps, stepped every iteration
        milestones = sorted({max(1, int(round(f * total_steps))) for f in schedule["milestones"]})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=schedule["gamma"])
    if schedule["name"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps))
    raise ValueError(f"schedule name must be 'multistep' or 'cosine', got {schedule['name']!r}")


# --------------------------------------------------------------------------- one run
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(config: Dict[str, Any], method: Dict[str, Any], split, seed: int, device: torch.device,
          progress: Progress, label: str) -> Tuple[nn.Module, float, int]:
    """Train one model; returns it (eval mode), seconds per epoch and optimizer steps taken."""
    x_train, y_train = split[0], split[1]
    torch.manual_seed(seed)
    model = build_model(config, method).to(device)
    example = x_train[:1].to(device)
    control = regularizer = None
    if method["kind"] in CONTROL_KINDS:
        control = ttconv.SpectralControl(model, method["target"], every=int(config.get("control_every", 10)),
                                         mode=method["kind"], example_input=example)
    if method["kind"] == "fantastic_four":  # used for its regularizer only; never steps
        regularizer = ttconv.SpectralControl(model, 1.0, every=1, example_input=example)
    epochs, batch = int(config["epochs"]), int(config["batch_size"])
    max_steps = config.get("max_steps")
    steps_per_epoch = math.ceil(len(y_train) / batch)
    if max_steps:
        steps_per_epoch = min(steps_per_epoch, int(max_steps))
    optimizer = build_optimizer(config, model)
    schedule = build_schedule(config, optimizer, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    augment = config.get("augment")
    steps, seconds = 0, 0.0
    for epoch in range(epochs):
        model.train()
        _sync(device)
        start = time.perf_counter()
        order = torch.randperm(len(y_train), generator=generator)[: steps_per_epoch * batch]
        total_loss = 0.0
        for index in order.split(batch):
            xb, yb = x_train[index], y_train[index]
            if augment:
                xb = datasets.augment(xb, generator, mode=augment.get("padding_mode", "reflect"))
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            if regularizer is not None:
                loss = loss + float(method["weight"]) * regularizer.regularizer("fantastic_four")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            if control is not None:
                control.step()
            total_loss += float(loss.detach())
            steps += 1
        _sync(device)
        seconds += time.perf_counter() - start
        progress.step(f"{label} seed {seed}: epoch {epoch + 1}/{epochs} loss {total_loss / len(order.split(batch)):.3f}")
    if control is not None:
        control.apply()  # end on a control pass: the reported norms are the controlled ones
    model.eval()
    return model, seconds / epochs, steps


def evaluate(model: nn.Module, config: Dict[str, Any], split, device: torch.device) -> Dict[str, Any]:
    """Every metric of the table for one trained model (eval mode)."""
    settings = config["eval"]
    x_test, y_test = split[2], split[3]
    count = min(len(y_test), int(settings.get("examples", len(y_test))))
    batch = int(settings.get("batch", 500))
    loader = [(x_test[i: min(i + batch, count)].to(device), y_test[i: min(i + batch, count)].to(device))
              for i in range(0, count, batch)]
    norm, radii = settings.get("norm", "l2"), [float(e) for e in settings["eps"]]
    example = split[0][:1].to(device)
    logits, labels = ev.predict(model, loader)
    result: Dict[str, Any] = {
        "clean_accuracy": float((logits.argmax(1) == labels).double().mean()),
        "ece": ev.calibration_report(logits, labels, int(settings.get("n_bins", 15))).ece,
    }
    clamp = tuple(settings["clamp"]) if settings.get("clamp") else None
    attack = dict(norm=norm, steps=int(settings.get("pgd_steps", 10)), restarts=int(settings.get("pgd_restarts", 1)),
                  clamp=clamp)
    for eps in radii:
        result[f"fgsm@{eps:g}"] = ev.attack_accuracy(model, loader, eps, attack="fgsm", norm=norm, clamp=clamp)
        result[f"pgd@{eps:g}"] = ev.attack_accuracy(model, loader, eps, attack="pgd", **attack)
    report = ttconv.spectral_report(model, example, gram_iters=1, power_iters=1)
    try:
        bound = ev.lipschitz_bound(model, example, report=report)
    except TypeError:  # residual / branching network: a product of layer norms certifies nothing
        bound = None
    result["lipschitz_bound"] = bound
    if bound is not None and math.isfinite(bound) and bound > 0:
        radius = ev.certified_radius(logits, labels, bound)
        scale = math.sqrt(example[0].numel()) if norm == "linf" else 1.0
        for eps in radii:
            result[f"certified@{eps:g}"] = float((radius > eps * scale).double().mean())
    else:
        for eps in radii:
            result[f"certified@{eps:g}"] = None
    exact = [row.exact for row in report.layers if row.exact is not None and "Conv" in row.kind]  # conv layers
    result["max_layer_norm"] = max(exact) if exact else None
    few = int(settings.get("lipschitz_examples", 100))
    result["empirical_lipschitz"] = ev.empirical_lipschitz(
        model, [(x_test[:few].to(device), y_test[:few].to(device))], n_iter=int(settings.get("lipschitz_iters", 10)),
        pair_eps=max(radii) if norm == "l2" else None)
    return result


# --------------------------------------------------------------------------- output
def columns(radii: Sequence[float], norm: str) -> List[Tuple[str, str, str]]:
    name = "L2" if norm == "l2" else "Linf"
    cols = [("clean_accuracy", "clean acc %", "pct"), ("ece", "ECE %", "pct")]
    cols += [(f"fgsm@{e:g}", f"FGSM {name} {e:g} %", "pct") for e in radii]
    cols += [(f"pgd@{e:g}", f"PGD {name} {e:g} %", "pct") for e in radii]
    cols += [(f"certified@{e:g}", f"certified {e:g} %", "pct") for e in radii]
    cols += [("max_layer_norm", "max σ conv", "num"), ("lipschitz_bound", "L certified", "num"),
             ("empirical_lipschitz", "L empirical", "num"), ("seconds_per_epoch", "s/epoch", "sec")]
    return cols


def summarise(runs: List[Dict[str, Any]], labels: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    summary: Dict[str, Dict[str, Any]] = {}
    for label in labels:
        mine = [r for r in runs if r["method"] == label]
        keys = [k for k in mine[0]["metrics"]] if mine else []
        summary[label] = {}
        for key in keys:
            values = [r["metrics"][key] for r in mine]
            if any(v is None for v in values):
                summary[label][key] = None
                continue
            summary[label][key] = {"mean": statistics.fmean(values),
                                   "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                   "values": values}
    return summary


def _cell(entry: Optional[Dict[str, Any]], kind: str) -> str:
    if entry is None:
        return "n/a"
    mean, std = entry["mean"], entry["std"]
    if kind == "pct":
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    if kind == "sec":
        return f"{mean:.2f} ± {std:.2f}"
    return f"{mean:.3g} ± {std:.2g}"


def markdown(summary: Dict[str, Dict[str, Any]], cols: List[Tuple[str, str, str]]) -> str:
    lines = ["| method | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for label, metrics in summary.items():
        lines.append(f"| {label} | " + " | ".join(_cell(metrics.get(k), f) for k, _, f in cols) + " |")
    return "\n".join(lines)


def environment(device: torch.device) -> Dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label.replace("σ≤", "le").replace("λ=", "w")).strip("_").lower()


def plot_all(out: str, runs: List[Dict[str, Any]], models_seed0: Dict[str, nn.Module], summary, radii, config,
             split, device) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    figure, (attacked, certified) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    xs = [0.0] + list(radii)
    for label, metrics in summary.items():
        clean = metrics["clean_accuracy"]["mean"]
        pgd = [clean] + [metrics[f"pgd@{e:g}"]["mean"] for e in radii]
        line, = attacked.plot(xs, [100 * v for v in pgd], marker="o", label=label)
        if metrics.get(f"certified@{radii[0]:g}") is not None:
            cert = [clean] + [metrics[f"certified@{e:g}"]["mean"] for e in radii]
            certified.plot(xs, [100 * v for v in cert], marker="o", color=line.get_color(), label=label)
    norm = config["eval"].get("norm", "l2")
    attacked.set(xlabel=f"radius eps ({norm})", ylabel="accuracy %", title="under PGD (an upper estimate)")
    certified.set(xlabel=f"radius eps ({norm})", title="certified (a lower bound; plain chains only)")
    attacked.legend(fontsize=7, loc="lower left")
    figure.suptitle(f"{config['name']} / {config['arch']}: mean over seeds {config.get('seeds', [0])}")
    figure.tight_layout()
    path = os.path.join(out, "robustness.png")
    figure.savefig(path)
    plt.close(figure)
    written.append(path)
    example = split[0][:1].to(device)
    settings = config["eval"]
    for label, model in models_seed0.items():
        name = slug(label)
        histograms = ev.singular_value_histograms(model, example, bins=40)
        path = os.path.join(out, f"spectra_{name}.png")
        ev.plot_singular_value_histograms(histograms, path, title=f"{label}: singular values per conv (seed 0)")
        written.append(path)
        count = min(len(split[3]), int(settings.get("examples", len(split[3]))))
        logits, labels = ev.predict(model, [(split[2][:count].to(device), split[3][:count].to(device))])
        path = os.path.join(out, f"reliability_{name}.png")
        ev.calibration_report(logits, labels, int(settings.get("n_bins", 15))).plot(path, title=label)
        written.append(path)
    return written


# --------------------------------------------------------------------------- main
def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="JSON config (default: configs/digits.json)")
    parser.add_argument("--out", default=None, help="output folder (default: experiment_results/<config name>)")
    parser.add_argument("--arch", default=None, help="override the config's architecture "
                                                     f"({', '.join(models.ARCHITECTURES)})")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder (torchvision batches or numpy arrays)")
    parser.add_argument("--synthetic", action="store_true",
                        help="random CIFAR-shaped data instead of --data-dir (timing runs)")
    parser.add_argument("--synthetic-size", type=int, nargs=2, default=None, metavar=("TRAIN", "TEST"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None, help="at most this many steps per epoch")
    parser.add_argument("--width", type=float, default=None, help="channel multiplier (CIFAR architectures)")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these method kinds")
    parser.add_argument("--eval-examples", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--pgd-steps", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    options = parse(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    config = load_config(options.config)
    config = for_arch(config, options.arch or config["arch"])
    if options.epochs is not None:
        config["epochs"] = options.epochs
    if options.max_steps is not None:
        config["max_steps"] = options.max_steps
    if options.width is not None:
        config.setdefault("arch_options", {})["width"] = options.width
    if options.seeds is not None:
        config["seeds"] = options.seeds
    if options.eval_examples is not None:
        config["eval"]["examples"] = options.eval_examples
    if options.pgd_steps is not None:
        config["eval"]["pgd_steps"] = options.pgd_steps
    methods = config["methods"]
    if options.methods:
        methods = [m for m in methods if m["kind"] in options.methods]
        if not methods:
            raise SystemExit(f"--methods {options.methods} matches none of the config's methods")
    check_methods(methods)
    dataset = config["dataset"]
    if options.synthetic:
        dataset = "synthetic"
        if options.synthetic_size:
            config["synthetic_size"] = list(options.synthetic_size)
    data_dir = options.data_dir or config.get("data_dir")
    device = torch.device("cuda" if options.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if options.device == "auto" else options.device))
    train_size, test_size = config.get("synthetic_size", [50000, 10000])
    split = datasets.load(dataset, data_dir=data_dir, mean=config.get("mean", (0.5, 0.5, 0.5)),
                          std=config.get("std", (0.5, 0.5, 0.5)), synthetic_train=train_size,
                          synthetic_test=test_size)
    out = options.out or os.path.join("experiment_results", f"{config['name']}_{config['arch']}")
    os.makedirs(out, exist_ok=True)
    seeds = [int(s) for s in config.get("seeds", [0])]
    labels = [method_label(m) for m in methods]
    progress = Progress(len(methods) * len(seeds) * (int(config["epochs"]) + 1))
    print(f"{config['name']}: {config['arch']} on {dataset} ({len(split[1])} train / {len(split[3])} test), "
          f"{len(methods)} methods x {len(seeds)} seeds x {config['epochs']} epochs on {device}", file=sys.stderr)
    runs: List[Dict[str, Any]] = []
    models_seed0: Dict[str, nn.Module] = {}
    start = time.perf_counter()
    for method, label in zip(methods, labels):
        for seed in seeds:
            model, per_epoch, steps = train(config, method, split, seed, device, progress, label)
            metrics = evaluate(model, config, split, device)
            metrics["seconds_per_epoch"] = per_epoch
            runs.append({"method": label, "kind": method["kind"], "seed": seed, "steps": steps, "metrics": metrics})
            progress.step(f"{label} seed {seed}: evaluated, clean {100 * metrics['clean_accuracy']:.1f}%, "
                          f"ECE {100 * metrics['ece']:.1f}%")
            if seed == seeds[0]:
                models_seed0[label] = model
    total = time.perf_counter() - start
    radii = [float(e) for e in config["eval"]["eps"]]
    summary = summarise(runs, labels)
    cols = columns(radii, config["eval"].get("norm", "l2"))
    table = markdown(summary, cols)
    payload = {"config": config, "dataset": dataset, "environment": environment(device), "total_seconds": total,
               "methods": methods, "runs": runs, "summary": summary}
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(payload, handle, indent=1, allow_nan=False)
    header = (f"{config['name']}: {config['arch']} on {dataset}, {config['epochs']} epochs, batch "
              f"{config['batch_size']}, seeds {seeds} (mean ± sample std), device {device}, "
              f"total {total / 60:.1f} min\n")
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(header + "\n" + table + "\n")
    plots = [] if options.no_plots else plot_all(out, runs, models_seed0, summary, radii, config, split, device)
    print(header + "\n" + table)
    print(f"\nwrote {os.path.join(out, 'results.json')}, results.md and {len(plots)} plots")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
