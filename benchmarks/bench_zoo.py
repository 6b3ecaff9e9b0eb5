"""Model zoo: ResNet-18/50, MobileNet-v2 and VGG-11 (defined in benchmarks/real_shapes.py).

Run: ``python benchmarks/bench_zoo.py`` (``--quick``: narrow models at 32x32, a smoke run;
``--models resnet18 --models vgg11`` to choose). Prints three markdown tables, every cost next
to its dense baseline measured in the same run:

1. Conversion: ``ttconv.convert`` at full rank and ``ttconv.densify`` back, each against one
   float32 forward pass of the dense model at batch 8 (the unit a user knows), with the
   parameter counts and the converted model's relative output error.
2. ``spectral_report`` at 224x224, dense model (FFT of every kernel) vs the model converted at
   rank c/4 (spectra from the cores): wall time and peak resident memory, each in a fresh
   process (``ru_maxrss``; "peak" is the whole process, model and torch included). With
   ``--device cuda``, the peak CUDA memory allocated during the report comes first, the
   host process's peak resident memory next to it.
3. Forward (eval, no grad) at batch 8: full rank and rank c/4 vs the dense model, timed
   interleaved.

``--device cuda`` runs everything on the GPU (timers synchronised, TF32 off: see ``_device``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_shapes  # noqa: E402
from _device import add_device_argument, describe, on_device  # noqa: E402
from _timing import interleaved, markdown_table, timed_call  # noqa: E402
from _zoo import gib, measure_report_in_subprocess, parameters, relative_output_error  # noqa: E402

import ttconv  # noqa: E402


def _batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.expand(batch, *x.shape[1:]).contiguous()


def conversion_rows(names: Sequence[str], tiny: bool, repeats: int) -> List[List[str]]:
    rows = []
    # Untimed: one-time start-up (on CUDA the solver handles and lazily loaded kernels; the H100
    # run without it timed ResNet-18, the first model, at 2.54 s and the larger ResNet-50 at
    # 0.38 s) is paid by a tiny copy of the first model.
    ttconv.densify(ttconv.convert(real_shapes.build(names[0], tiny=True)[0]))
    for name in names:
        model, x = real_shapes.build(name, tiny=tiny)
        x8 = _batch(x, 8)
        with torch.no_grad():
            forward = interleaved({"fwd": lambda: model(x8)}, repeats)["fwd"]
        result = {}
        convert_s = timed_call(lambda: result.update(converted=ttconv.convert(model)))
        converted = result["converted"]
        densify_s = timed_call(lambda: ttconv.densify(converted))
        error = relative_output_error(model, converted, x)
        rows.append([name, f"{parameters(model) / 1e6:.2f} M", f"{parameters(converted) / parameters(model):.2f}x",
                     f"{forward * 1e3:.0f} ms", f"{convert_s:.2f} s ({convert_s / forward:.1f}x)",
                     f"{densify_s:.2f} s ({densify_s / forward:.1f}x)", f"{error:.1e}"])
    return rows


def _peak(result: dict, key: str) -> str:
    """``key`` peak (bytes, "peak" or "cuda_peak") with its rise over the baseline before the report."""
    peak, baseline = result[key], result[key.replace("peak", "baseline")]
    return f"{gib(peak)} GiB (+{gib(peak - baseline)})"


def report_rows(names: Sequence[str], tiny: bool, device: torch.device) -> List[List[str]]:
    rows = []
    for name in names:
        dense = measure_report_in_subprocess(name, tiny=tiny, device=device)
        core = measure_report_in_subprocess(name, convert_rank=0.25, tiny=tiny, device=device)
        peaks = ("cuda_peak", "peak") if device.type == "cuda" else ("peak",)
        rows.append([name, str(dense["rows"]),
                     f"{dense['seconds']:.1f} s", f"{core['seconds']:.1f} s",
                     f"{dense['seconds'] / core['seconds']:.1f}x",
                     *(_peak(result, key) for key in peaks for result in (dense, core))])
    return rows


def report_header(device: torch.device) -> List[str]:
    header = ["model", "layers", "dense time", "core time", "dense / core"]
    if device.type == "cuda":
        return header + ["dense CUDA peak", "core CUDA peak", "dense peak RSS", "core peak RSS"]
    return header + ["dense peak", "core peak"]


def forward_rows(names: Sequence[str], tiny: bool, repeats: int) -> List[List[str]]:
    rows = []
    for name in names:
        model, x = real_shapes.build(name, tiny=tiny)
        x8 = _batch(x, 8)
        full = ttconv.convert(model)
        quarter = ttconv.convert(model, rank=0.25)
        with torch.no_grad():
            t = interleaved({"dense": lambda: model(x8), "full": lambda: full(x8), "quarter": lambda: quarter(x8)},
                            repeats)
        rows.append([name, f"{t['dense'] * 1e3:.0f} ms", f"{t['full'] / t['dense']:.2f}x",
                     f"{t['quarter'] / t['dense']:.2f}x",
                     f"{parameters(quarter) / parameters(model):.2f}x"])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", action="append", choices=sorted(real_shapes.ZOO))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-report", action="store_true", help="leave out table 2 (the slowest)")
    add_device_argument(parser)
    options = parser.parse_args(argv)
    with on_device(options.device):
        _run(options)


def _run(options: argparse.Namespace) -> None:
    torch.set_num_threads(options.threads)
    names = options.models or list(real_shapes.ZOO)
    tiny, repeats = options.quick, (2 if options.quick else 5)
    if options.quick and not options.models:
        names = ["resnet18"]
    size = "32x32, narrow" if tiny else "224x224"
    print(f"threads: {options.threads}, load average at start: {open('/proc/loadavg').read().split()[0]}, "
          f"torch {torch.__version__}, device {describe(options.device)}\n")
    print(f"**Conversion at full rank** ({size}; forward = one float32 forward pass at batch 8)\n")
    print(markdown_table(["model", "params", "converted params", "forward", "convert (x forward)",
                          "densify (x forward)", "output error"], conversion_rows(names, tiny, repeats)))
    if not options.skip_report:
        peak = ("CUDA peak: torch.cuda.max_memory_allocated during the report; peak RSS: whole host process"
                if options.device.type == "cuda" else "peak: whole process")
        print(f"\n**spectral_report** ({size}, batch 1; dense: FFT of each kernel; core: converted at rank c/4; "
              f"{peak}, + over the process after one forward)\n")
        print(markdown_table(report_header(options.device), report_rows(names, tiny, options.device)))
    print(f"\n**Forward** (eval, no grad, batch 8, {size}; ratio to the dense model, path 'auto')\n")
    print(markdown_table(["model", "dense", "full rank", "rank c/4", "rank c/4 params"],
                         forward_rows(names, tiny, repeats)))


if __name__ == "__main__":
    main()
