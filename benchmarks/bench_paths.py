"""Which forward path is fastest, and how close ``path='auto'`` comes to it.

For realistic layer shapes (MTCNN-, MobileNet-v3- and PP-OCR-like: 8-512 channels,
kernels 1/3/5, depthwise and strided layers, feature maps 7-160) at batch 1 and 16 and
ranks full / 0.5 / 0.25, times ``path='dense'``, ``'factored'`` and ``'auto'`` on the same
layer and input, interleaved (one call of each path per round, median over rounds), in two
modes: forward only in ``eval()`` under ``torch.no_grad()``, and forward+backward in
training. Times are the fastest of the rounds (the least disturbed by other processes on a
shared machine). Reports ``auto / best`` (auto timed as a third path) and ``choice / best``
(the time of the fixed path auto chose, which isolates the choice from timing noise): 1.00
means auto took the faster fixed path.

Run at one thread (``OMP_NUM_THREADS=1`` is set here): ``python benchmarks/bench_paths.py``
(``--quick`` for a subset that runs in well under two minutes). The load average is printed:
timings from a loaded machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _device import add_device_argument, on_device  # noqa: E402
from _timing import interleaved, markdown_table  # noqa: E402

from ttconv import SVDConv  # noqa: E402

# (label, in, out, kernel, stride, groups, (height, width)); padding keeps the size (k // 2).
SHAPES = [
    ("mtcnn-p1", 3, 10, 3, 1, 1, (160, 160)),
    ("mtcnn-p2", 10, 16, 3, 1, 1, (79, 79)),
    ("mtcnn-p3", 16, 32, 3, 1, 1, (77, 77)),
    ("mtcnn-p4", 32, 4, 1, 1, 1, (75, 75)),
    ("mtcnn-r2", 28, 48, 3, 1, 1, (11, 11)),
    ("mtcnn-o3", 64, 64, 3, 1, 1, (10, 10)),
    ("mtcnn-o4", 64, 128, 2, 1, 1, (4, 4)),
    ("mnv3-exp", 16, 64, 1, 1, 1, (56, 56)),
    ("mnv3-dw", 72, 72, 5, 2, 72, (56, 56)),
    ("mnv3-proj", 120, 40, 1, 1, 1, (28, 28)),
    ("mnv3-dw7", 480, 480, 3, 1, 480, (7, 7)),
    ("mnv3-1x1", 512, 512, 1, 1, 1, (7, 7)),
    ("mnv3-3x3", 256, 256, 3, 1, 1, (14, 14)),
    ("ocr-stem", 3, 16, 3, 2, 1, (48, 320)),
    ("ocr-mid", 64, 128, 3, 1, 1, (12, 80)),
    ("ocr-s21", 128, 256, 3, (2, 1), 1, (12, 80)),
    ("ocr-head", 256, 512, 1, 1, 1, (3, 80)),
    ("ocr-cls", 96, 96, 5, 1, 1, (6, 48)),
]
QUICK = ["mtcnn-p3", "mtcnn-p4", "mtcnn-r2", "mnv3-dw", "mnv3-1x1", "ocr-s21"]
RANKS = [("full", None), ("0.5", 0.5), ("0.25", 0.25)]
PATHS = ("dense", "factored", "auto")


def build_layer(in_channels, out_channels, kernel, stride, groups, fraction):
    rank = None
    if fraction is not None:
        rank = max(1, round(fraction * min(in_channels, out_channels) / groups))
    return SVDConv(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, rank=rank)


def _forward_eval(layer, x, path):
    def run():
        layer.path = path
        with torch.no_grad():
            layer(x)
    return run


def _forward_backward(layer, x, path):
    def run():
        layer.path = path
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
    return run


def _elements(layer, x):
    """Tensor elements each path reads and writes (input, hidden maps, output), for calibration."""
    y = layer._output_size(tuple(x.shape[2:]))
    in_px, out_px = x.shape[0] * x[0, 0].numel(), x.shape[0] * int(torch.tensor(y).prod())
    r_out, r_in = layer.ranks
    g = layer.groups
    dense = in_px * layer.in_channels + out_px * layer.out_channels
    if layer._is_pointwise():
        return dense, dense + 2 * in_px * g * r_in
    return dense, dense + 2 * in_px * g * r_in + 2 * out_px * g * r_out


def measure(names, batches, rounds, modes, dump=None):
    rows, ratios, choices = [], {mode: [] for mode in modes}, {mode: [] for mode in modes}
    for label, c_in, c_out, kernel, stride, groups, size in SHAPES:
        if label not in names:
            continue
        for rank_label, fraction in RANKS:
            if groups == c_in and fraction is not None:
                continue  # depthwise: per-group rank 1 at every setting
            torch.manual_seed(0)
            layer = build_layer(c_in, c_out, kernel, stride, groups, fraction)
            for batch in batches:
                x = torch.randn(batch, c_in, *size)
                chosen = layer.choose_path(tuple(x.shape))
                for mode in modes:
                    layer.train(mode == "fwd+bwd")
                    make = _forward_eval if mode == "fwd eval" else _forward_backward
                    times = interleaved({p: make(layer, x, p) for p in PATHS}, rounds, statistic=min)
                    best = min(times["dense"], times["factored"])
                    ratio = times["auto"] / best
                    choice = times[chosen] / best
                    ratios[mode].append(ratio)
                    choices[mode].append(choice)
                    if dump is not None:
                        dump.append(dict(label=label, rank=rank_label, batch=batch, mode=mode, dense=times["dense"],
                                         factored=times["factored"], auto=times["auto"], chosen=chosen,
                                         flops=layer.flop_costs(tuple(x.shape)), elements=_elements(layer, x)))
                    faster = "dense" if times["dense"] <= times["factored"] else "factored"
                    rows.append([label, f"{c_in}->{c_out} k{kernel} s{stride} g{groups}", f"{size[0]}x{size[1]}",
                                 rank_label, str(layer.ranks), str(batch), mode,
                                 f"{times['dense'] * 1e3:.3f}", f"{times['factored'] * 1e3:.3f}",
                                 f"{times['auto'] * 1e3:.3f}", chosen, faster, f"{ratio:.2f}", f"{choice:.2f}"])
                    print(" | ".join(rows[-1]), flush=True, file=sys.stderr)
    header = ["shape", "layer", "n", "rank", "ranks", "batch", "mode", "dense ms", "factored ms", "auto ms",
              "auto picks", "faster", "auto / best", "choice / best"]
    return markdown_table(header, rows), ratios, choices


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a subset of the shapes, fewer rounds (< 2 min)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--dump", metavar="JSON", help="also write every timing with the layer's FLOP counts")
    add_device_argument(parser)
    options = parser.parse_args(argv)
    with on_device(options.device):
        _run(options)


def _run(options) -> None:
    torch.set_num_threads(1)
    names = QUICK if options.quick else [s[0] for s in SHAPES]
    rounds = options.rounds or (3 if options.quick else 9)
    modes = ("fwd eval", "fwd+bwd")
    load = open("/proc/loadavg").read().strip() if os.path.exists("/proc/loadavg") else "n/a"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {rounds} interleaved rounds, "
          f"load average before: {load}\n")
    start = time.perf_counter()
    dump = [] if options.dump else None
    table, ratios, choices = measure(names, (1, 16), rounds, modes, dump)
    print(table)
    print()
    for mode in modes:
        for label, values in (("auto / best", ratios[mode]), ("choice / best", choices[mode])):
            values = sorted(values)
            within = sum(v <= 1.10 for v in values)
            print(f"{mode}: {label} median {statistics.median(values):.2f}, worst {values[-1]:.2f}, "
                  f"within 10% on {within}/{len(values)}")
    if dump is not None:
        import json

        with open(options.dump, "w") as handle:
            json.dump(dump, handle, indent=1)
    load = open("/proc/loadavg").read().strip() if os.path.exists("/proc/loadavg") else "n/a"
    print(f"\nload average after: {load}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
