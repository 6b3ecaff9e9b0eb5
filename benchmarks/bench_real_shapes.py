"""Real pretrained-model shapes: MobileNet-v3-Small, PP-OCR det/rec/cls-like, MTCNN (benchmarks/real_shapes.py).

Run: ``python benchmarks/bench_real_shapes.py`` (``--quick``: the MTCNN and OCR-cls models
only, fewer repeats). Prints three markdown tables:

1. ``spectral_report`` at each model's real input size, in a fresh process: wall time, peak
   resident memory, how many layers got a row (Conv2d, ConvTranspose2d, Linear), how many of
   them an exact value, and how many were listed as skipped.
2. ``ttconv.convert`` at full rank: parameters before and after (depthwise layers stay dense
   by default), how many convs stayed dense, and the model's relative output error on the
   example input, recomputed here by running both models.
3. The converted model with every layer's path forced to ``'dense'`` and to ``'factored'``,
   and left at ``'auto'``, inference (``no_grad``) and a training step (forward and
   backward): each as a ratio to the original model, timed interleaved (fastest of the
   rounds), at full rank and at rank 0.25, batch 1 and 16; last column: auto over the
   better fixed path (the goal: at most 1.10). ``--paths-only`` prints this table alone.
   Every model is timed as three copies (``--copies``), a path's time the median of its
   copies' fastest rounds: identical copies differ by up to 7% here.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_shapes  # noqa: E402
from _device import add_device_argument, describe, on_device  # noqa: E402
from _timing import interleaved, markdown_table  # noqa: E402
from _zoo import gib, measure_report_in_subprocess, parameters, relative_output_error  # noqa: E402

import ttconv  # noqa: E402

# forward-path cases: (model, input shape override or None, batch sizes)
PATH_CASES: List[Tuple[str, Optional[Tuple[int, int, int]], Tuple[int, ...]]] = [
    ("mtcnn_pnet", (3, 120, 160), (1, 16)),  # PNet runs fully convolutionally on an image pyramid level
    ("mtcnn_rnet", None, (16,)),
    ("mtcnn_onet", None, (16,)),
    ("mobilenet_v3_small", None, (1, 16)),
    ("ocr_rec", None, (1, 16)),
    ("ocr_cls", None, (1, 16)),
]


def report_rows(names: Sequence[str], device: torch.device) -> List[List[str]]:
    """Per model: report time, peak memory (CUDA's peak allocated on a GPU, else the process's
    peak RSS), rows, rows with an exact value, skipped layers."""
    rows = []
    for name in names:
        result = measure_report_in_subprocess(name, device=device)
        _, shape = real_shapes.MODELS[name]
        peak = result["cuda_peak"] if device.type == "cuda" else result["peak"]
        rows.append([name, "x".join(map(str, shape)), f"{result['seconds']:.1f} s", f"{gib(peak)} GiB",
                     str(result["rows"]), str(result["exact"]), str(result["skipped"])])
    return rows


def conversion_rows(names: Sequence[str]) -> List[List[str]]:
    rows = []
    for name in names:
        model, x = real_shapes.build(name)
        converted = ttconv.convert(model)
        dense_left = sum(1 for m in converted.modules() if type(m) is nn.Conv2d)
        convs = sum(1 for m in model.modules() if type(m) is nn.Conv2d)
        rows.append([name, f"{parameters(model) / 1e6:.3f} M", f"{parameters(converted) / parameters(model):.3f}x",
                     f"{dense_left} of {convs}", f"{relative_output_error(model, converted, x):.1e}"])
    return rows


def _set_path(model: nn.Module, path: str) -> None:
    for module in model.modules():
        if isinstance(module, ttconv.SVDConv):
            module.path = path


def _step(model, x, backward: bool):
    def run():
        if backward:
            model.zero_grad(set_to_none=True)
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return run


def _auto_paths(model: nn.Module, batch: int, backward: bool) -> str:
    """How many of the model's SVD convs ``auto`` ran factored at this batch size and regime
    (it remembers its choice per input shape and regime): with 0 or all of them, 'auto' ran
    exactly the kernels of 'dense' or 'factored', and any gap between their times is noise."""
    chosen = [path for m in model.modules() if isinstance(m, ttconv.SVDConv)
              for key, path in m.__dict__.get("_auto_paths", {}).items() if key[0][0] == batch and key[1] == backward]
    return f"{chosen.count('factored')} of {len(chosen)}"


def path_rows(cases, repeats: int, copies: int = 3, modes=("fwd", "fwd+bwd")) -> List[List[str]]:
    """Each model (the original and each path's conversion) is timed as ``copies`` separate
    copies, all interleaved, and a path's time is the median over its copies of each copy's
    fastest round. Identical copies of one model differ by up to 7% on this machine (where
    their tensors land in memory; measured on ocr_cls), so one copy per path would time the
    placement along with the path."""
    rows = []
    for name, shape, batches in cases:
        model, x = real_shapes.build(name)
        if shape is not None:
            x = torch.randn(1, *shape)
        for rank in (None, 0.25):
            converted = {path: [ttconv.convert(model, rank=rank) for _ in range(copies)]
                         for path in ("auto", "dense", "factored")}
            for path, group in converted.items():
                for m in group:
                    _set_path(m, path)
            originals = [model] + [copy.deepcopy(model) for _ in range(copies - 1)]
            for batch in batches:
                xb = x.expand(batch, *x.shape[1:]).contiguous()
                for mode in modes:
                    backward = mode == "fwd+bwd"
                    fns = {("original", i): _step(m, xb, backward) for i, m in enumerate(originals)}
                    fns.update({(path, i): _step(m, xb, backward)
                                for path, group in converted.items() for i, m in enumerate(group)})
                    fastest = interleaved(fns, repeats, statistic=min, rotate=True)
                    t = {path: statistics.median(v for (p, _), v in fastest.items() if p == path)
                         for path in ("original", *converted)}
                    best = min(t["dense"], t["factored"])
                    rows.append([name, "full" if rank is None else str(rank), str(batch), mode,
                                 "x".join(map(str, x.shape[1:])), f"{t['original'] * 1e3:.2f} ms",
                                 f"{t['dense'] / t['original']:.2f}x", f"{t['factored'] / t['original']:.2f}x",
                                 f"{t['auto'] / t['original']:.2f}x", _auto_paths(converted["auto"][0], batch, backward),
                                 f"{t['auto'] / best:.2f}"])
                    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paths-only", action="store_true", help="only the forward-path table")
    parser.add_argument("--copies", type=int, default=3,
                        help="copies of every model in the path table (identical copies differ by up to 7%%)")
    add_device_argument(parser)
    options = parser.parse_args(argv)
    with on_device(options.device):
        _run(options)


def _run(options) -> None:
    torch.set_num_threads(options.threads)
    names = list(real_shapes.MODELS)
    cases = PATH_CASES
    repeats = 16
    if options.quick:
        names = ["mtcnn_pnet", "mtcnn_onet"]
        cases = [("mtcnn_onet", None, (2,))]
        repeats = 2
    print(f"{describe(options.device)}, threads: {options.threads}, load average at start: "
          f"{open('/proc/loadavg').read().split()[0]}, torch {torch.__version__}\n")
    if not options.paths_only:
        on_gpu = options.device.type == "cuda"
        print(f"**spectral_report at the real input size** (batch 1, fresh process; peak: "
              f"{'CUDA peak allocated' if on_gpu else 'whole process'})\n")
        print(markdown_table(["model", "input", "time", "peak CUDA" if on_gpu else "peak RSS", "rows", "with exact",
                              "skipped"], report_rows(names, options.device)))
        print("\n**convert at full rank** (default settings; output error: ||f'(x) - f(x)|| / ||f(x)||)\n")
        print(markdown_table(["model", "params", "converted params", "convs left dense", "output error"],
                             conversion_rows(names)))
    print(f"\n**Forward path** (eval mode; 'fwd' under no_grad, 'fwd+bwd' a training step's forward and "
          f"backward; {options.copies} copies of every model, each timed over {repeats} interleaved rounds: a "
          f"path's time is the median of its copies' fastest rounds; time of the original model, then each converted "
          "model as a ratio to it; auto / best: 'auto' over the faster of 'dense' and 'factored')\n")
    print(markdown_table(["model", "rank", "batch", "mode", "input", "original", "dense", "factored", "auto",
                          "auto ran factored", "auto / best"], path_rows(cases, repeats, options.copies)))


if __name__ == "__main__":
    main()
