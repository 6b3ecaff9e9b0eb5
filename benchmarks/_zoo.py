"""Whole-model measurements shared by bench_zoo.py and bench_real_shapes.py.

Peak memory is measured in a fresh subprocess (``python benchmarks/_zoo.py report NAME ...``)
so one model's allocations cannot hide another's: the child prints its peak resident set
size (``ru_maxrss``) after building the model and after the report, as JSON. With
``--device cuda`` the child runs the model and the report on the GPU and also prints the peak
CUDA memory allocated (``torch.cuda.max_memory_allocated``) over the report, next to the
host's resident set size.
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
from _device import DeviceLike, on_device, parse_device, peak_memory_bytes, peak_memory_reset, synchronize  # noqa: E402

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
                                 timeout: float = 3600.0, device: DeviceLike = "cpu") -> Dict[str, Any]:
    """Time and peak memory of ``ttconv.spectral_report`` on one model, in a fresh process on ``device``.

    The result's ``peak`` and ``baseline`` are the process's peak resident set size (bytes)
    after the report and after one forward pass; on CUDA, ``cuda_peak`` and ``cuda_baseline``
    are the CUDA memory allocated at its peak during the report and before it (None on the CPU).
    """
    command = [sys.executable, os.path.abspath(__file__), "report", name, "--device", str(torch.device(device))]
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
    parser.add_argument("--device", type=parse_device, default=torch.device("cpu"))
    options = parser.parse_args(argv)
    with on_device(options.device):
        result = _measure_report(options.name, options.convert_rank, options.tiny, options.device)
    print(json.dumps(result))


def _measure_report(name: str, convert_rank: Optional[float], tiny: bool, device: torch.device) -> Dict[str, Any]:
    model, x = real_shapes.build(name, tiny=tiny)
    if convert_rank is not None:
        model = ttconv.convert(model, rank=convert_rank if convert_rank < 1 else None)
    with torch.no_grad():
        model(x)  # warm the forward once: the baseline includes what one forward pass needs
    synchronize(device)
    baseline = _rss_bytes()
    cuda_baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    peak_memory_reset(device)
    start = time.perf_counter()
    report = ttconv.spectral_report(model, x, progress=False)
    synchronize(device)
    seconds = time.perf_counter() - start
    cuda_peak = peak_memory_bytes(device)
    rows = report.to_dicts()
    exact = sum(1 for row in rows if row.get("exact") is not None)
    return dict(seconds=seconds, peak=_rss_bytes(), baseline=baseline, cuda_peak=cuda_peak,
                cuda_baseline=cuda_baseline, rows=len(rows), exact=exact, skipped=len(report.skipped))


def gib(count: float) -> str:
    return f"{count / 2 ** 30:.2f}"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        _report_child(sys.argv[2:])
    else:
        raise SystemExit("usage: python benchmarks/_zoo.py report NAME [--convert-rank R] [--tiny] [--device D]")
