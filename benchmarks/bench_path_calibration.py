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
import itertools
import json
import os
import sys
import time
from typing import Any, Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_shapes  # noqa: E402
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
            seen.setdefault(key, (module, args[0].shape))  # returns None: the input is left alone
        return hook

    hooks = [m.register_forward_pre_hook(record(key)) for key, m in converted.named_modules()
             if isinstance(m, ttconv.SVDConv)]
    with torch.no_grad():
        converted(x.expand(batch, *x.shape[1:]).contiguous())
    for hook in hooks:
        hook.remove()
    return [dict(model=name, layer=key, module=m, input=tuple(s)) for key, (m, s) in seen.items()]


def fastest(functions, rounds: int) -> Dict[str, float]:
    for fn in functions.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def time_paths(layer, shape, mode: str, rounds: int) -> Dict[str, float]:
    x = torch.randn(shape)

    def run(path):
        def call():
            layer.path = path
            if mode == "fwd eval":
                with torch.no_grad():
                    layer(x)
            else:
                layer.zero_grad(set_to_none=True)
                layer(x).sum().backward()
        return call

    layer.train(mode == "fwd+bwd")
    return fastest({p: run(p) for p in ("dense", "factored")}, rounds)


def measure(rounds: int, quick: bool) -> List[Dict[str, Any]]:
    rows, done = [], set()
    cases = PATH_CASES[:2] if quick else PATH_CASES
    for name, shape, batches in cases:
        for rank in (None, 0.25):
            for batch in batches:
                for item in layer_inputs(name, shape, batch, rank):
                    m = item["module"]
                    geometry = {k: getattr(m, k) for k in GEOMETRY}
                    key = json.dumps([geometry, m.ranks, item["input"]], default=list)
                    if key in done:
                        continue
                    done.add(key)
                    for mode in ("fwd eval", "fwd+bwd"):
                        t = time_paths(m, item["input"], mode, rounds)
                        rows.append(dict(model=name, layer=item["layer"], geometry=geometry, ranks=list(m.ranks),
                                         input=list(item["input"]), mode=mode, dense=t["dense"],
                                         factored=t["factored"]))
                        r = rows[-1]
                        print(f"{name:18s} {item['layer']:28s} {str(m.ranks):12s} {str(item['input']):22s} {mode:8s} "
                              f"dense {r['dense'] * 1e3:8.3f} factored {r['factored'] * 1e3:8.3f}",
                              file=sys.stderr, flush=True)
    return rows


def build_layer(row: Dict[str, Any]) -> ttconv.SVDConv:
    geometry = dict(row["geometry"])
    for key in ("kernel_size", "stride", "dilation"):
        geometry[key] = tuple(geometry[key])
    if not isinstance(geometry["padding"], str):
        geometry["padding"] = tuple(geometry["padding"])
    return ttconv.SVDConv(**geometry, rank=tuple(row["ranks"]))


def regret(rows, layers) -> Dict[str, float]:
    """Time lost by the cost model's choices: worst row ratio, rows over 10%, summed excess."""
    worst, over, lost, total = 1.0, 0, 0.0, 0.0
    for row, layer in zip(rows, layers):
        chosen = row[layer.choose_path(tuple(row["input"]))]
        best = min(row["dense"], row["factored"])
        worst = max(worst, chosen / best)
        over += chosen > 1.10 * best
        lost += chosen - best
        total += best
    return dict(worst=worst, over=over, lost=lost / total)


def fit(path: str) -> None:
    rows = json.load(open(path))
    layers = [build_layer(r) for r in rows]
    results = []
    for element, call, compose in itertools.product((0, 8, 16, 32, 64, 128), (50_000, 100_000, 200_000, 300_000,
                                                    500_000, 1_000_000), (1, 2, 4, 6, 10, 16)):
        _forward_paths.COST_PER_ELEMENT, _forward_paths.COST_PER_CALL, _forward_paths.COMPOSE_CALLS = (
            element, call, compose)
        for layer in layers:
            layer.__dict__.pop("_auto_paths", None)
        results.append(((element, call, compose), regret(rows, layers)))
    results.sort(key=lambda item: (item[1]["over"], item[1]["worst"]))
    for constants, r in results[:15]:
        print(constants, {k: round(v, 3) for k, v in r.items()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dump", metavar="JSON")
    parser.add_argument("--fit", metavar="JSON", help="search the cost model's constants on a dump")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    if options.fit:
        fit(options.fit)
        return
    load = open("/proc/loadavg").read().split()[0]
    start = time.perf_counter()
    rows = measure(options.rounds, options.quick)
    if options.dump:
        with open(options.dump, "w") as handle:
            json.dump(rows, handle, indent=0)
    r = regret(rows, [build_layer(row) for row in rows])
    print(f"load average at start {load}; {len(rows)} rows in {time.perf_counter() - start:.0f} s; "
          f"auto's choice: worst {r['worst']:.2f}x the faster path, {r['over']} rows over 10%, "
          f"{100 * r['lost']:.1f}% of the best total time lost")


if __name__ == "__main__":
    main()
