"""Whole-model measurements shared by bench_zoo.py and bench_real_shapes.py.

Peak memory is measured in a fresh subprocess (``python benchmarks/_zoo.py report NAME ...``)
so one model's allocations cannot hide another's: the child prints its peak resident set
size (``ru_maxrss``) after building the model and after the report, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_shapes  # noqa: E402

import ttconv  # noqa: E402


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def relative_output_error(reference: nn.Module, other: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = reference(x).double(), other(x).double()
    return float((a - b).norm() / a.norm())


def conv_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, ttconv.SVDConv))]


def _rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_report_in_subprocess(name: str, *, convert_rank: Optional[float] = None, tiny: bool = False,
                                 timeout: float = 3600.0) -> Dict[str, Any]:
    """Time and peak memory of ``ttconv.spectral_report`` on one model, in a fresh process."""
    command = [sys.executable, os.path.abspath(__file__), "report", name]
    if convert_rank is not None:
        command += ["--convert-rank", str(convert_rank)]
    if tiny:
        command.append("--tiny")
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"report subprocess for {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _report_child(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--convert-rank", type=float)
    parser.add_argument("--tiny", action="store_true", help="the narrow smoke-run version of the model")
    options = parser.parse_args(argv)
    model, x = real_shapes.build(options.name, tiny=options.tiny)
    if options.convert_rank is not None:
        model = ttconv.convert(model, rank=options.convert_rank if options.convert_rank < 1 else None)
    with torch.no_grad():
        model(x)  # warm the forward once: the baseline includes what one forward pass needs
    baseline = _rss_bytes()
    start = time.perf_counter()
    report = ttconv.spectral_report(model, x, progress=False)
    seconds = time.perf_counter() - start
    rows = report.to_dicts()
    exact = sum(1 for row in rows if row.get("exact") is not None)
    print(json.dumps(dict(seconds=seconds, peak=_rss_bytes(), baseline=baseline, rows=len(rows), exact=exact,
                          skipped=len(report.skipped))))


def gib(count: float) -> str:
    return f"{count / 2 ** 30:.2f}"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        _report_child(sys.argv[2:])
    else:
        raise SystemExit("usage: python benchmarks/_zoo.py report NAME [--convert-rank R] [--tiny]")
