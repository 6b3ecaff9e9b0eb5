"""Per-layer timings of the two forward paths on every conv of the real-shape models.

The ``auto`` path is a cost model (``ttconv.SVDConv.path_costs``); this script measures
what it models. Every ``SVDConv`` of the models of ``bench_real_shapes.PATH_CASES``
(MTCNN, MobileNet-v3-Small, PP-OCR rec/cls-like), converted at full rank and at rank 0.25,
is timed on the input it sees inside its model, at batch 1 and 16, with ``path='dense'``
and ``path='factored'`` interleaved (fastest of the rounds: the least disturbed by other
processes), in two modes: eval forward under ``torch.no_grad()`` and forward+backward.

``--dump tests/data/path_timings.json`` writes the rows (geometry, ranks, input shape,
both times) that ``tests/test_forward_path.py`` holds the cost model to: wherever one
path was measured more than 10% faster, ``auto`` must pick it. ``--fit`` searches the
cost model's constants on a dump and prints the regret of each candidate.

Run at one thread: ``python benchmarks/bench_path_calibration.py --dump FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_shapes  # noqa: E402
from _device import add_device_argument, on_device  # noqa: E402
from _timing import interleaved, markdown_table  # noqa: E402
from bench_real_shapes import PATH_CASES  # noqa: E402

import ttconv  # noqa: E402
from ttconv import _forward_paths  # noqa: E402

GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def layer_inputs(name: str, shape, batch: int, rank) -> List[Dict[str, Any]]:
    """Every SVD conv of the converted model with the input it sees (deduplicated by geometry and shape)."""
    model, x = real_shapes.build(name)
    if shape is not None:
        x = torch.randn(1, *shape)
    converted = ttconv.convert(model, rank=rank)
    seen: Dict[str, Any] = {}

    def record(key):
        def hook(module, args):
            # Returns None: the input is left alone. Whether it requires grad decides what
            # the backward pass computes (a model's first conv needs no input gradient).
            seen.setdefault(key, (module, args[0].shape, args[0].requires_grad))
        return hook

    hooks = [m.register_forward_pre_hook(record(key)) for key, m in converted.named_modules()
             if isinstance(m, ttconv.SVDConv)]
    converted(x.expand(batch, *x.shape[1:]).contiguous())  # with grad, so requires_grad is as in training
    for hook in hooks:
        hook.remove()
    return [dict(model=name, layer=key, module=m, input=tuple(s), input_grad=g) for key, (m, s, g) in seen.items()]


def time_paths(layer, shape, mode: str, rounds: int, input_grad: bool = False,
               paths=("dense", "factored")) -> Dict[str, float]:
    x = torch.randn(shape, requires_grad=input_grad and mode == "fwd+bwd")

    def run(path):
        def call():
            layer.path = path
            if mode == "fwd eval":
                with torch.no_grad():
                    layer(x)
            else:
                layer.zero_grad(set_to_none=True)
                x.grad = None
                layer(x).sum().backward()
        return call

    layer.train(mode == "fwd+bwd")
    return interleaved({p: run(p) for p in paths}, rounds, statistic=min)


# Orthogonal cores have a third path, 'separable' (the kernel's halves as two convs): a grid of
# 3 x 3 layers (channels, map size, rank c, c/2, c/4, stride 1 and 2) at batch 8 instead of
# the models' convs, in three modes: eval forward, and forward+backward with and without an
# input gradient (a model's first layer).
ORTHOGONAL_GRID = [(c, n) for c in (16, 32, 64, 128, 256, 512) for n in (7, 14, 28, 56)
                   if 16 * 14 * 14 <= c * n * n <= 256 * 28 * 28]
PATHS3 = ("dense", "factored", "separable")


def measure_orthogonal(rounds: int, quick: bool) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for c, n in ORTHOGONAL_GRID[:2] if quick else ORTHOGONAL_GRID:
        for fraction in (1, 2, 4):
            for stride in (1, 2):
                geometry = dict(in_channels=c, out_channels=c, kernel_size=(3, 3), stride=(stride, stride),
                                padding=(1, 1), dilation=(1, 1), groups=1, padding_mode="zeros")
                layer = ttconv.SVDConv(**geometry, rank=c // fraction, core_kind="orthogonal")
                for mode, input_grad in (("fwd eval", False), ("fwd+bwd", False), ("fwd+bwd", True)):
                    t = time_paths(layer, (8, c, n, n), mode, rounds, input_grad, PATHS3)
                    rows.append(dict(model="orthogonal grid", rank=f"c/{fraction}", batch=8, layer="3x3",
                                     geometry=geometry, core_kind="orthogonal", ranks=list(layer.ranks),
                                     input=[8, c, n, n], input_grad=input_grad, mode=mode, **t))
                    print(f"{c:4d} {n:3d} r={layer.ranks[0]:4d} stride {stride} {mode:8s} grad {input_grad!s:5s} "
                          + " ".join(f"{p} {t[p] * 1e3:8.3f}" for p in PATHS3), file=sys.stderr, flush=True)
    return rows


def orthogonal_choices(row: Dict[str, Any]) -> Dict[str, str]:
    """The path each policy takes on an orthogonal row: ``'auto'`` (the cost model over the three
    paths), ``'two'`` (the model choosing from dense and factored only, as before 'separable')
    and each fixed path."""
    layer = build_layer(row)
    dense, factored = layer.path_costs(tuple(row["input"]), backward=row["mode"] == "fwd+bwd",
                                       input_requires_grad=row["input_grad"])
    return {"auto": choose(row, layer), "two": "dense" if dense <= factored else "factored",
            **{path: path for path in PATHS3}}


def orthogonal_regret(rows, policy: str = "auto") -> Dict[str, float]:
    """A policy of ``orthogonal_choices`` on orthogonal rows: the mean and worst ratio of its
    path's time to the fastest of the three, and how many rows are more than 10% over."""
    ratios = [row[orthogonal_choices(row)[policy]] / min(row[p] for p in PATHS3) for row in rows]
    return dict(mean=sum(ratios) / len(ratios), worst=max(ratios), over=sum(r > 1.10 for r in ratios))


def write_rows(path: str, rows: List[Dict[str, Any]]) -> None:
    """A dump: one row per line, times in seconds."""
    with open(path, "w") as handle:
        handle.write("[\n" + ",\n".join(json.dumps(row, separators=(",", ":")) for row in rows) + "\n]\n")


def measure(rounds: int, quick: bool) -> List[Dict[str, Any]]:
    """One row per conv per (model, rank, batch, mode); a geometry and input shape seen before
    (the same block repeated in a model) reuses its timing."""
    rows: List[Dict[str, Any]] = []
    timed: Dict[str, Dict[str, float]] = {}
    cases = [("mtcnn_rnet", None, (2,))] if quick else PATH_CASES
    for name, shape, batches in cases:
        for rank in (None, 0.25):
            for batch in batches:
                for item in layer_inputs(name, shape, batch, rank):
                    m = item["module"]
                    geometry = {k: getattr(m, k) for k in GEOMETRY}
                    for mode in ("fwd eval", "fwd+bwd"):
                        input_grad = item["input_grad"] and mode == "fwd+bwd"
                        key = json.dumps([geometry, m.ranks, item["input"], mode, input_grad], default=list)
                        if key not in timed:
                            timed[key] = time_paths(m, item["input"], mode, rounds, input_grad)
                        t = timed[key]
                        rows.append(dict(model=name, rank="full" if rank is None else str(rank), batch=batch,
                                         layer=item["layer"], geometry=geometry, ranks=list(m.ranks),
                                         input=list(item["input"]), input_grad=input_grad, mode=mode, dense=t["dense"],
                                         factored=t["factored"]))
                        print(f"{name:18s} {item['layer']:28s} {str(m.ranks):12s} {str(item['input']):22s} "
                              f"{mode:8s} dense {t['dense'] * 1e3:8.3f} factored {t['factored'] * 1e3:8.3f}",
                              file=sys.stderr, flush=True)
    return rows


def build_layer(row: Dict[str, Any]) -> ttconv.SVDConv:
    geometry = dict(row["geometry"])
    for key in ("kernel_size", "stride", "dilation"):
        geometry[key] = tuple(geometry[key])
    if not isinstance(geometry["padding"], str):
        geometry["padding"] = tuple(geometry["padding"])
    return ttconv.SVDConv(**geometry, rank=tuple(row["ranks"]), core_kind=row.get("core_kind", "general"),
                          device="meta")


def choose(row: Dict[str, Any], layer: ttconv.SVDConv) -> str:
    """The path ``auto`` takes for the row's input and mode."""
    return layer.choose_path(tuple(row["input"]), backward=row["mode"] == "fwd+bwd",
                             input_requires_grad=row["input_grad"])


def model_totals(rows, choices) -> Dict[Any, Dict[str, float]]:
    """Per (model, rank, batch, mode): the convs' summed time on each fixed path and on the
    paths the cost model chose."""
    totals: Dict[Any, Dict[str, float]] = {}
    for row, chosen in zip(rows, choices):
        t = totals.setdefault((row["model"], row["rank"], row["batch"], row["mode"]),
                              dict(dense=0.0, factored=0.0, auto=0.0))
        t["dense"] += row["dense"]
        t["factored"] += row["factored"]
        t["auto"] += row[chosen]
    return totals


def regret(rows, layers) -> Dict[str, float]:
    """Time lost by the cost model's choices: per layer (worst ratio to the faster path, rows
    more than 10% over) and per model (worst ratio of the convs' total to the better fixed path)."""
    choices = [choose(row, layer) for row, layer in zip(rows, layers)]
    worst, over = 1.0, 0
    for row, chosen in zip(rows, choices):
        ratio = row[chosen] / min(row["dense"], row["factored"])
        worst, over = max(worst, ratio), over + (ratio > 1.10)
    model_worst = max(t["auto"] / min(t["dense"], t["factored"]) for t in model_totals(rows, choices).values())
    return dict(model_worst=model_worst, layer_worst=worst, layers_over=over)


def fit(path: str, samples: int = 3000, seed: int = 0) -> None:
    """Random search (log-uniform) of each regime's ``PathConstants`` on a dump: the
    constants that minimise the worst per-model ratio of ``auto`` to the better fixed path,
    then the count of layers more than 10% over. Prints the best few per regime."""
    import numpy as np

    rows = json.load(open(path))
    layers = [build_layer(r) for r in rows]
    rng = np.random.default_rng(seed)
    for regime, mode in (("INFERENCE", "fwd eval"), ("TRAINING", "fwd+bwd")):
        chosen = [(row, layer) for row, layer in zip(rows, layers) if row["mode"] == mode]
        results = []
        for _ in range(samples):
            element, mixing, compose = 10 ** rng.uniform(0, 2.5), 10 ** rng.uniform(4, 6.7), 10 ** rng.uniform(3.5, 6.5)
            setattr(_forward_paths, regime, _forward_paths.PathConstants(round(element, 1), round(mixing, -3),
                                                                          round(compose, -3)))
            for _, layer in chosen:
                layer.__dict__.pop("_auto_paths", None)
            r = regret([row for row, _ in chosen], [layer for _, layer in chosen])
            results.append(((round(r["model_worst"], 3), r["layers_over"]), getattr(_forward_paths, regime), r))
        results.sort(key=lambda item: item[0])
        for _, constants, r in results[:5]:
            print(regime, constants, {k: round(v, 3) for k, v in r.items()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per layer (default 9; 1 quick)")
    parser.add_argument("--dump", metavar="JSON")
    parser.add_argument("--fit", metavar="JSON", help="search the cost model's constants on a dump")
    parser.add_argument("--orthogonal", action="store_true",
                        help="time the orthogonal-core grid on its three paths instead of the models' convs")
    add_device_argument(parser)
    options = parser.parse_args(argv)
    with on_device(options.device):
        _run(options)


def _run(options) -> None:
    torch.set_num_threads(1)
    if options.fit:
        fit(options.fit)
        return
    load = open("/proc/loadavg").read().split()[0]
    start = time.perf_counter()
    if options.orthogonal:
        rows = measure_orthogonal(options.rounds or (1 if options.quick else 5), options.quick)
        if options.dump:
            write_rows(options.dump, rows)
        three, two = orthogonal_regret(rows), orthogonal_regret(rows, "two")
        print(f"load average at start {load}; {len(rows)} rows in {time.perf_counter() - start:.0f} s; auto's "
              f"path against the fastest of the three: mean {three['mean']:.3f}x, worst {three['worst']:.2f}x, "
              f"{three['over']} rows over 10% (choosing from dense and factored only: mean {two['mean']:.3f}x, "
              f"worst {two['worst']:.2f}x, {two['over']} over)")
        return
    rows = measure(options.rounds or (1 if options.quick else 9), options.quick)
    if options.dump:
        write_rows(options.dump, rows)
    layers = [build_layer(row) for row in rows]
    totals = model_totals(rows, [choose(row, layer) for row, layer in zip(rows, layers)])
    print(markdown_table(["model", "rank", "batch", "mode", "dense ms", "factored ms", "auto ms", "auto / best"],
                         [[*map(str, key), f"{t['dense'] * 1e3:.2f}", f"{t['factored'] * 1e3:.2f}",
                           f"{t['auto'] * 1e3:.2f}", f"{t['auto'] / min(t['dense'], t['factored']):.2f}"]
                          for key, t in totals.items()]))
    r = regret(rows, layers)
    print(f"load average at start {load}; {len(rows)} rows in {time.perf_counter() - start:.0f} s; auto's choices: "
          f"convs of a model within {r['model_worst']:.2f}x of the better fixed path, one layer at worst "
          f"{r['layer_worst']:.2f}x its faster path, {r['layers_over']} layers more than 10% over")


if __name__ == "__main__":
    main()
