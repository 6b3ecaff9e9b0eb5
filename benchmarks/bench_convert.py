"""Conversion and construction cost: Gram route vs LAPACK SVD, ResNet-50, SVDConv(...), refinement.

Run: ``python benchmarks/bench_convert.py`` (``--quick`` for a smoke run). Prints four
markdown tables. Times are medians; the timings compared in a row are interleaved (one
run of each in turn, repeated), so a change of machine load hits both sides.

1. One 512x512x3x3 conversion (``ttconv.decompose``, float64 work) vs
   ``torch.linalg.svd`` of its wide ``(512, 4608)`` unfolding, the call the old route made
   twice; with the FLOP floor of the Gram route measured in the same run: 3.5 GEMMs of
   ``512 x 4608 x 512`` (two Grams at 3/4 of a GEMM each, two rotations) and two
   ``eigh`` of ``512 x 512``.
2. A ResNet-50-shaped model (stem 7x7, bottlenecks [3, 4, 6, 3], 1x1/3x3/1x1 convs and
   1x1 downsamples, BN, ReLU, residuals; 53 convs) converted at full rank by
   ``ttconv.convert`` vs one float32 forward pass at batch 8, 224x224.
3. ``SVDConv(c, c, 3)`` vs ``nn.Conv2d(c, c, 3)`` construction.
4. Relative error and time of ``refine`` (HOOI) iterations vs the one-pass truncation.

``--device cuda`` runs ttconv and the torch baselines on the GPU (timers synchronised, TF32
off: see ``_device``); the numpy HOOI reference of table 4 always runs on the CPU, and the
"threads" column is then the host's CPU threads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Dict, Iterator, List, Sequence

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _device import add_device_argument, describe, on_device  # noqa: E402
from _timing import interleaved, markdown_table, timed_call  # noqa: E402

import ttconv  # noqa: E402
from ttconv.tt import decompose  # noqa: E402


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------ ResNet-50 shape
class Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (stride on the 3x3), built from plain modules."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def resnet50_shaped(widths: Sequence[int] = (64, 128, 256, 512), blocks: Sequence[int] = (3, 4, 6, 3),
                    classes: int = 1000) -> nn.Module:
    layers: List[nn.Module] = [nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    channels = widths[0]
    for stage, (width, count) in enumerate(zip(widths, blocks)):
        for block in range(count):
            layers.append(Bottleneck(channels, width, 2 if block == 0 and stage > 0 else 1))
            channels = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers).eval()


# ------------------------------------------------------------------------------- tables
def single_conversion_table(channels: int, repeats: int) -> str:
    torch.manual_seed(0)
    weight = torch.randn(channels, channels, 3, 3) / (3 * channels)
    wide = weight.double().reshape(channels, -1)
    rows = []
    for count in sorted({torch.get_num_threads(), 1}, reverse=True):
        with threads(count):
            gemm_b = torch.randn(9 * channels, channels, dtype=torch.float64)
            gram = wide @ wide.T
            t = interleaved({
                "svd_wide": lambda: torch.linalg.svd(wide, full_matrices=False),
                "gram_route": lambda: decompose(weight),
                "gemm": lambda: wide @ gemm_b,
                "eigh": lambda: torch.linalg.eigh(gram),
            }, repeats)
        floor = 3.5 * t["gemm"] + 2 * t["eigh"]
        rows.append([
            str(count), f"{t['svd_wide'] * 1e3:.0f}", f"{t['gram_route'] * 1e3:.0f}",
            f"{t['svd_wide'] / t['gram_route']:.1f}x", f"{floor * 1e3:.0f}", f"{t['svd_wide'] / floor:.1f}x",
            f"{floor / t['gram_route']:.2f}",
        ])
    header = ["threads", "svd wide ms", "ttconv decompose ms", "speed-up vs svd wide",
              "Gram-route floor ms", "limit (svd wide / floor)", "floor / measured"]
    return markdown_table(header, rows)


def resnet_table(batch: int, size: int, repeats: int, model_fn: Callable[[], nn.Module], reference: bool) -> str:
    torch.manual_seed(0)
    model = model_fn()
    x = torch.randn(batch, 3, size, size)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]

    def forward() -> None:
        with torch.no_grad():
            model(x)

    rows = []
    for count in sorted({torch.get_num_threads(), 1}, reverse=True):
        with threads(count):
            t = interleaved({"forward": forward, "convert": lambda: ttconv.convert(model)}, repeats)
            svd_route = None
            if reference and count == 1:  # the old route, once: two LAPACK SVDs per conv
                svd_route = timed_call(lambda: [decompose(conv.weight, conv.groups, method="svd") for conv in convs])
        rows.append([
            str(count), str(len(convs)), f"{t['forward']:.2f}", f"{t['convert']:.2f}",
            f"{t['convert'] / t['forward']:.2f}x",
            "-" if svd_route is None else f"{svd_route:.1f} ({svd_route / t['forward']:.0f}x)",
        ])
    header = ["threads", "convs", f"fwd b{batch} {size}x{size} s", "convert (full rank) s", "convert / fwd",
              "old SVD route s (/ fwd)"]
    return markdown_table(header, rows)


def construction_table(channel_list: Sequence[int], repeats: int) -> str:
    """Construction times, with the floor of sampling a Haar-random canonical layer: the
    Gaussian draws, two sign-fixed QRs of ``c x c`` (``U``, ``V``) and the Cholesky-QR of the
    ``c x 9c`` core (a 3/4 GEMM for its Gram, one GEMM by the inverse factor)."""
    rows = []
    for count in sorted({torch.get_num_threads(), 1}, reverse=True):
        with threads(count):
            for channels in channel_list:
                square = torch.randn(channels, channels)
                wide = torch.randn(channels, 9 * channels)
                t = interleaved({
                    "conv": lambda: nn.Conv2d(channels, channels, 3),
                    "full": lambda: ttconv.SVDConv(channels, channels, 3),
                    "low": lambda: ttconv.SVDConv(channels, channels, 3, rank=channels // 4),
                    "randn": lambda: torch.randn(channels, 11 * channels),
                    "qr": lambda: torch.linalg.qr(square),
                    "gemm": lambda: square @ wide,
                }, repeats)
                floor = t["randn"] + 2 * t["qr"] + 1.75 * t["gemm"]
                rows.append([str(count), f"{channels}x{channels}x3x3", f"{t['conv'] * 1e3:.2f}",
                             f"{t['full'] * 1e3:.2f}", f"{t['full'] / t['conv']:.1f}x", f"{floor / t['conv']:.1f}x",
                             f"{t['low'] * 1e3:.2f}", f"{t['low'] / t['conv']:.1f}x"])
    header = ["threads", "shape", "nn.Conv2d ms", "SVDConv full ms", "full / Conv2d", "floor / Conv2d",
              "SVDConv r=c/4 ms", "r=c/4 / Conv2d"]
    return markdown_table(header, rows)


def _numpy_hooi_errors(w: np.ndarray, r_out: int, r_in: int, checkpoints: Sequence[int]) -> Dict[int, float]:
    """Tucker-2 HOOI as tensorly runs it (HOSVD start), an independent reference: the
    relative error after each number of iterations in ``checkpoints`` (0 = HOSVD)."""
    o, i = w.shape[:2]
    W = w.reshape(o, i, -1)
    U = np.linalg.svd(W.reshape(o, -1), full_matrices=False)[0][:, :r_out]
    V = np.linalg.svd(W.transpose(1, 0, 2).reshape(i, -1), full_matrices=False)[0][:, :r_in]
    errors = {}
    for iteration in range(max(checkpoints) + 1):
        if iteration:
            U = np.linalg.svd(np.einsum("oit,ib->obt", W, V).reshape(o, -1), full_matrices=False)[0][:, :r_out]
            V = np.linalg.svd(np.einsum("oa,oit->ait", U, W).transpose(1, 0, 2).reshape(i, -1),
                              full_matrices=False)[0][:, :r_in]
        if iteration in checkpoints:
            core = np.einsum("oa,oit,ib->abt", U, W, V)
            errors[iteration] = float(np.sqrt(max(np.sum(W**2) - np.sum(core**2), 0.0) / np.sum(W**2)))
    return errors


def _kernels(channels: int) -> Dict[str, torch.Tensor]:
    """Seeded kernels, drawn on the CPU (a CPU generator: the same kernels on every device) and
    moved to the benchmark's device."""
    target = torch.empty(0).device  # the default device: on_device's, or the CPU
    with torch.device("cpu"):
        gen = torch.Generator().manual_seed(0)
        rank = channels // 4
        signal = torch.einsum("oa,abt,ib->oit", torch.randn(channels, rank, generator=gen),
                              torch.randn(rank, rank, 9, generator=gen), torch.randn(channels, rank, generator=gen))
        signal = signal / signal.norm()
        noise = torch.randn(channels, channels, 9, generator=gen)
        kernels = {
            "random (Gaussian)": torch.randn(channels, channels, 3, 3, generator=gen),
            "rank c/4 + 30% noise": (signal + 0.3 * noise / noise.norm()).reshape(channels, channels, 3, 3),
        }
    return {kind: kernel.to(target) for kind, kernel in kernels.items()}


def refinement_table(channels: int, ranks: Sequence[int], iterations: Sequence[int], repeats: int) -> str:
    rows = []
    for kind, weight in _kernels(channels).items():
        for rank in ranks:
            fns = {n: (lambda n=n: decompose(weight, rank=rank, refine=n)) for n in iterations}
            t = interleaved({str(n): fn for n, fn in fns.items()}, repeats, warmup=0)
            errors = {n: fn().relative_error for n, fn in fns.items()}
            hooi = _numpy_hooi_errors(weight.double().cpu().numpy(), rank, rank, iterations)
            for n in iterations:
                rows.append([
                    kind if n == iterations[0] and rank == ranks[0] else "", str(rank) if n == iterations[0] else "",
                    str(n), f"{errors[n]:.5f}", f"{100 * (1 - errors[n] / errors[0]):.2f}%", f"{hooi[n]:.5f}",
                    f"{1e3 * t[str(n)]:.0f}", f"{t[str(n)] / t['0']:.1f}x",
                ])
    header = ["kernel", "rank", "refine n", "rel. error", "below one-pass", "HOOI n it. (numpy, HOSVD start)", "ms",
              "time / one-pass"]
    return markdown_table(header, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke test)")
    add_device_argument(parser)
    options = parser.parse_args(argv)
    with on_device(options.device):
        _run(options)


def _run(options: argparse.Namespace) -> None:
    if options.quick:
        single, repeats, batch, size = 32, 1, 1, 32
        model_fn = lambda: resnet50_shaped((8, 8, 8, 8), (1, 1, 1, 1), 10)  # noqa: E731
        construct, refine_channels, refine_ranks, iterations = [16], 16, [4], [0, 1]
    else:
        single, repeats, batch, size = 512, 5, 8, 224
        model_fn = resnet50_shaped
        construct, refine_channels, refine_ranks, iterations = [64, 256, 512], 256, [32, 64], [0, 1, 5, 20]
    if options.device.type == "cpu":
        print(f"torch {torch.__version__}, {describe(options.device)} by default; rows also at 1 thread "
              "(the 2-core machine is shared: with 2 threads, timings swing with the other processes' load)\n")
    else:
        print(f"torch {torch.__version__}, {describe(options.device)}; 'threads': the host's CPU threads "
              f"({torch.get_num_threads()} by default, rows also at 1); the numpy HOOI reference runs on the CPU\n")
    print(f"One {single}x{single}x3x3 conversion (float64 work) vs LAPACK SVD of the wide unfolding:\n")
    print(single_conversion_table(single, max(1, repeats - 2)))  # LAPACK's wide SVD alone can take 10 s
    print("\nResNet-50-shaped model, full-rank ttconv.convert vs one float32 forward pass:\n")
    print(resnet_table(batch, size, max(2, repeats // 2), model_fn, reference=True))
    print("\nConstruction, SVDConv(c, c, 3) vs nn.Conv2d(c, c, 3) (float32):\n")
    print(construction_table(construct, repeats * 3))
    print(f"\nRefinement (HOOI) vs one-pass TT-SVD, {refine_channels}x{refine_channels}x3x3, float32 kernels, "
          "1 thread:\n")
    with threads(1):
        print(refinement_table(refine_channels, refine_ranks, iterations, max(1, repeats // 2)))


if __name__ == "__main__":
    main()
