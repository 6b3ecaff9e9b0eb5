"""Regenerate docs/performance.md: run every benchmark and example and collect their tables.

Run from the repository root: ``python benchmarks/run_all.py`` (about 15 minutes on 2 CPU
cores; ``--quick`` for a smoke run that writes to stdout only).

``--device cuda`` runs every benchmark that takes ``--device`` (``benchmarks/_device.py``) on
the GPU and writes ``docs/performance-cuda.md`` (``--output`` to choose); a script that does
not take the option yet, and the examples, are listed there as not run, since only a script
that knows its device synchronises its timers and measures GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import platform
import sys
import time
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _device import add_device_argument, describe  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
SECTIONS = [  # (heading, script, blurb)
    ("SVDConv vs nn.Conv2d, and exact spectra", "benchmarks/bench_layer.py",
     "Forward and forward+backward at batch 32 (ResNet-like 3x3 convs; fwd+bwd with an input that requires grad, "
     "as for every layer inside a network, and for a first layer without it), the 1-D, 3-D and transposed layers "
     "against their torch counterparts, then the exact spectrum from the TT core vs the dense FFT method (rank c/4) "
     "next to the limit LAPACK's batched SVD sets on this machine (fastest of the rounds, the order rotating "
     "every round). Full-rank FLOP limit (performance-limits.md): "
     "1 + min(2c/(BHW), 2/k^2), i.e. 1.00/1.01/1.08/1.22 for the four 2-D shapes."),
    ("Forward path choice: dense vs factored vs auto", "benchmarks/bench_paths.py",
     "MTCNN-, MobileNet-v3- and OCR-like layer shapes at ranks full/0.5/0.25, batch 1 and 16, eval forward and "
     "forward+backward: both fixed paths and 'auto' timed interleaved (fastest of rounds); choice / best is the "
     "time of the path auto chose over the faster one."),
    ("Forward path choice on whole models: calibration", "benchmarks/bench_path_calibration.py",
     "Both paths timed on every conv of the real-shape models (MTCNN, MobileNet-v3-Small, PP-OCR rec/cls), each on "
     "the input it sees in its model, inference and a training step (inputs requiring grad as in training): the "
     "convs' total per model on each fixed path and on the paths 'auto' picks. The rows are "
     "tests/data/path_timings.json, which tests/test_forward_path.py holds 'auto' to."),
    ("Orthonormality: drift and cost", "benchmarks/bench_orthonormality.py",
     "Why U and V are kept orthonormal by a retraction outside forward (design.md)."),
    ("Bounds: time and tightness on ResNet-18-shaped layers", "benchmarks/bench_bounds.py",
     "Cells: value / exact circular sigma_max at the layer's input size (time); first column: the exact value."),
    ("Single-tap fast paths: 1x1 and patch convs", "benchmarks/bench_single_tap.py",
     "When every frequency holds the same matrix (1x1 convs, patch convs whose kernel equals their stride), one "
     "batched SVD replaces the per-frequency route: exact norm, Gram bound and operator bound, both routes timed "
     "alternately in one run."),
    ("Cost of one control pass", "benchmarks/bench_control.py",
     "SpectralControl.apply() in each mode (scale, clip, clip_scale) with every layer above the target, "
     "SVDConv (core) vs dense convs (FFT); the limit LAPACK sets (bare per-frequency kernels, dense / core); one "
     "clip step against the paper's code on the same core; strided clipping; then how far plain clipping "
     "overshoots on random layers."),
    ("Conversion and construction", "benchmarks/bench_convert.py", "Gram-route decompose, ResNet-50, SVDConv(), refine."),
    ("Model zoo: conversion, reports and forward at ImageNet scale", "benchmarks/bench_zoo.py",
     "ResNet-18/50, MobileNet-v2 and VGG-11 with their real shapes (random weights, benchmarks/real_shapes.py), "
     "every cost next to the dense model's in the same run."),
    ("Real pretrained-model shapes: MobileNet-v3, PP-OCR, MTCNN", "benchmarks/bench_real_shapes.py",
     "Depthwise, 1x1-heavy, non-sequential models with feature maps smaller than their kernels: report time at "
     "the real input size, full-rank conversion size and error, and the forward-path choice."),
    ("Orthogonal core vs general SVDConv vs nn.Conv2d", "benchmarks/bench_orthogonal.py",
     "Training-step cost of the exactly orthogonal core, and exact O(r) clipping vs FFT clipping."),
    ("Example: training with control on digits", "examples/train_digits.py",
     "Small CNN on scikit-learn's bundled digits: plain, SVDConv + clip, + clip_scale, + scale."),
    ("Example: a 1-Lipschitz CNN on digits", "examples/lipschitz_digits.py",
     "Certified robust accuracy at L2 radii: orthogonal core vs general SVDConv + scale."),
    ("Example: a 1-D pitch CNN with spectral control", "examples/pitch_1d.py",
     "Raw-waveform pitch classification on synthetic harmonic tones: plain Conv1d, torch spectral_norm, "
     "SVDConv1d + clip_scale / scale at two targets (docs/tutorials/audio-and-generators.md)."),
    ("Example: a conv-transpose decoder with spectral control", "examples/generator_digits.py",
     "Digits autoencoder whose decoder is three ConvTranspose2d layers: plain, torch spectral_norm, "
     "SVDConvTranspose2d + clip_scale / scale (docs/tutorials/audio-and-generators.md)."),
]


def _run(script: str, argv: List[str], device: torch.device) -> Optional[str]:
    """The script's printed output, or None when it cannot run on ``device`` (it takes no
    ``--device``: only the CPU)."""
    path = os.path.join(ROOT, script)
    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # A script takes --device when it builds its parser with _device.add_device_argument.
    if hasattr(module, "add_device_argument"):
        argv = [*argv, "--device", str(device)]
    elif device.type != "cpu":
        return None
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        module.main(argv)
    return buffer.getvalue().strip()


class _Missing:
    """A section with no output in a ``--collect`` folder, and why."""

    def __init__(self, why: str) -> None:
        self.why = why


def _collected(folder: str, script: str):
    """The saved stdout of ``script`` from a ``.ci/cuda-check`` folder (headed by a note when the
    script did not finish: the tables it printed before its time limit), or ``_Missing``."""
    name = os.path.basename(script)[:-3]
    output, log = os.path.join(folder, f"{name}.md"), os.path.join(folder, f"{name}.log")
    ended = open(log).read().strip().splitlines()[-1:] if os.path.exists(log) else []
    printed = open(output).read().strip() if os.path.exists(output) else ""
    if not ended:
        return _Missing("not run (no output saved)")
    if ended[0].startswith(f"{name}: exit 0 "):
        return printed
    progress = [line.rstrip() for line in open(log) if " | " in line and not line.startswith("|")]
    if progress:  # rows a script prints to stderr as it goes (bench_layer's spectra)
        printed += "\n\nRows it had printed as progress when it stopped:\n\n```\n" + "\n".join(progress) + "\n```"
    if "|" not in printed:
        return _Missing(f"`{ended[0]}`")
    return f"**Stopped before the end** (`{ended[0]}`): the tables it printed until then.\n\n{printed.strip()}"


def _sections(path: str) -> dict:
    """The ``## heading`` sections of an existing performance page, by heading (text kept as is)."""
    if not os.path.exists(path):
        return {}
    sections, heading, lines = {}, None, []
    for line in open(path).read().splitlines():
        if line.startswith("## "):
            if heading is not None:
                sections[heading] = "\n".join(lines).strip("\n")
            heading, lines = line[3:], [line]
        elif heading is not None:
            lines.append(line)
    if heading is not None:
        sections[heading] = "\n".join(lines).strip("\n")
    return sections


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", metavar="SCRIPT",
                        help="regenerate only this section (e.g. benchmarks/bench_control.py; repeatable) and keep "
                             "the others as they are in the output page")
    add_device_argument(parser)
    parser.add_argument("--collect", metavar="DIR",
                        help="run nothing: build the page from the outputs .ci/cuda-check saved in DIR (NAME.md, the "
                             "script's stdout, NAME.log, env.txt and device.txt; default output "
                             "docs/performance-<device type>.md)")
    parser.add_argument("--output", metavar="PATH",
                        help="the page to write (default docs/performance.md on the CPU, "
                             "docs/performance-<device type>.md on another device)")
    options = parser.parse_args(argv)
    device = options.device
    if options.collect:  # the device the outputs were measured on, which need not exist here
        recorded = os.path.join(options.collect, "device.txt")
        device = torch.device(open(recorded).read().strip() if os.path.exists(recorded) else "cuda")
    page = "performance.md" if device.type == "cpu" else f"performance-{device.type}.md"
    output = options.output or os.path.join(ROOT, "docs", page)
    if options.collect:
        return _write(output, _collected_page(options.collect, device, output), quick=False)
    extra = ["--quick"] if options.quick else []
    known = {script for _, script, _ in SECTIONS}
    for script in options.only or ():
        if script not in known:
            parser.error(f"--only {script!r} is not a section; choose from {sorted(known)}")
    previous = _sections(output) if options.only else {}
    on_gpu = device.type == "cuda"
    parts = [
        f"# Performance on {describe(device)}" if on_gpu else "# Performance",
        "",
        f"Generated by `python benchmarks/run_all.py{' --device cuda' if on_gpu else ''}`; every ratio is against "
        f"the baseline timed in the same run. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", {describe(device)}, CUDA {torch.version.cuda}" if on_gpu else "")
        + f", on {time.strftime('%Y-%m-%d')}"
        + (f" (sections regenerated: {', '.join(options.only)}; the others kept from the previous run)."
           if options.only else "."),
    ]
    for heading, script, blurb in SECTIONS:
        if options.only and script not in options.only:
            if heading in previous:
                parts += ["", previous[heading]]
            continue
        start = time.perf_counter()
        printed = _run(script, extra, device)
        print(f"{script}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if printed is None:
            parts += ["", f"## {heading}", "", f"Not run on {device.type}: `{script}` takes no `--device` yet "
                      "(see `benchmarks/_device.py`); its CPU numbers are in docs/performance.md."]
            continue
        parts += ["", _section(heading, blurb, script, device, printed)]
    if not on_gpu:
        parts += ["", gpu_summary(os.path.join(ROOT, "docs", "performance-cuda.md"))]
    _write(output, "\n".join(parts) + "\n", quick=options.quick)


def gpu_summary(cuda_page: str) -> str:
    """The CPU page's last section: where the GPU numbers are, and their first table."""
    parts = ["## On a GPU", ""]
    if not os.path.exists(cuda_page):
        return "\n".join(parts + ["No GPU run yet: `.ci/cuda-check` runs the suite and the benchmarks on a CUDA "
                                   "machine, `run_all.py --collect` makes docs/performance-cuda.md from its output."])
    text = open(cuda_page).read()
    machine = _page_machine(text)
    first = text.split("\n## ", 2)[1]
    kept = next((line for line in first.splitlines() if line.startswith(_KEPT)), None)
    if kept is not None:  # the first section is an earlier run's
        machine = kept[len(_KEPT):].split("*")[0]
    parts += [f"`.ci/cuda-check` ran the suite and the benchmarks on a GPU; the tables are on "
              "[the CUDA page](performance-cuda.md) (a section kept from an earlier run names its machine). Its "
              f"first, the layers against `nn.Conv2d` on {machine} (batch 32, fwd+bwd with an input that requires "
              "grad):", "", _first_table(first)]
    return "\n".join(parts)


def _first_table(section: str) -> str:
    """The first markdown table of a page section."""
    table = []
    for line in section.splitlines():
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table)


def _section(heading: str, blurb: str, script: str, device: torch.device, printed: str) -> str:
    """One page section: heading, blurb with the command that made it, then the script's
    tables (plain text in a code block)."""
    body = printed if "|" in printed else f"```\n{printed}\n```"
    command = f"python {script}" + ("" if device.type == "cpu" else f" --device {device.type}")
    return "\n".join([f"## {heading}", "", f"{blurb} (`{command}`)", "", body])


def _write(output: str, text: str, quick: bool) -> None:
    if quick:
        print(text)
        return
    with open(output, "w") as handle:
        handle.write(text)
    print(f"wrote {os.path.relpath(output, ROOT)}", file=sys.stderr)


_KEPT = "*Kept from an earlier run on "


def _machine(folder: str) -> str:
    """The machine a ``.ci/cuda-check`` folder was measured on (its ``env.txt``), in one line."""
    env_path = os.path.join(folder, "env.txt")
    if not os.path.exists(env_path):
        return "not recorded"
    return "; ".join(line.strip() for line in open(env_path) if line.strip())


def _page_machine(text: str) -> str:
    """The machine named in a collected page's header (``Machine: ...``)."""
    line = next((line for line in text.splitlines() if "Machine:" in line), "Machine: an unrecorded machine.")
    return line.split("Machine:", 1)[1].split(". Every ratio")[0].split(". Sections")[0].strip()


def _collected_page(folder: str, device: torch.device, previous_page: Optional[str] = None) -> str:
    """The page for outputs ``.ci/cuda-check`` saved in ``folder`` (its ``env.txt`` names the machine).

    A section this run has no output for keeps its text from ``previous_page`` (the page being
    replaced), marked with the machine it was measured on: a short GPU lease rarely reaches every
    benchmark, and a run should add to the page rather than erase what an earlier one measured.
    """
    machine = _machine(folder)
    previous_text = open(previous_page).read() if previous_page and os.path.exists(previous_page) else ""
    previous = _sections(previous_page) if previous_text else {}
    earlier = _page_machine(previous_text) if previous_text else ""
    parts = [f"# Performance on {device.type}", "",
             "Collected by `python benchmarks/run_all.py --device cuda --collect DIR` from the outputs of "
             f"`.ci/cuda-check` (each script run on its own, with a time limit). Machine: {machine}. Sections "
             "marked as kept come from an earlier run on the machine they name. Every ratio is against the baseline "
             "timed in the same run of the same script."]
    for heading, script, blurb in SECTIONS:
        printed = _collected(folder, script) if script.startswith("benchmarks/") else \
            _Missing("the examples run on the CPU only")
        if not isinstance(printed, _Missing):
            parts += ["", _section(heading, blurb, script, device, printed)]
            continue
        kept = previous.get(heading, "")
        if "|" in kept:  # an earlier run's tables: keep them, saying where they were measured
            lines = kept.splitlines()
            marks = [i for i, line in enumerate(lines) if line.startswith(_KEPT)]
            if marks:  # kept again: the machine it was measured on stays, the reason is this run's
                head = lines[marks[0]].split("; the latest run: ")[0]
                lines[marks[0]] = f"{head}; the latest run: {printed.why}."
            else:
                lines[1:1] = ["", f"{_KEPT}{earlier}*; the latest run: {printed.why}."]
            parts += ["", "\n".join(lines)]
            continue
        parts += ["", f"## {heading}", "", f"Not run to the end on {device.type}: {printed.why}. Its CPU "
                  "numbers are in docs/performance.md."]
    return "\n".join(parts) + "\n"

if __name__ == "__main__":
    main()
