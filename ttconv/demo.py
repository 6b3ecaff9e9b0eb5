"""A one-minute tour: convert a conv layer, measure the error, read its exact spectrum."""

from __future__ import annotations

import time
from typing import List, Tuple

import torch
from torch import nn

from ._table import render_table
from ._typing import RankSpec
from .layer import SVDConv
from .spectra import conv_singular_values


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


#: The demo refuses sizes whose dense spectrum would need more memory than this (bytes).
DEMO_MAX_MEMORY = 2 * 2**30


def _demo_ranks(channels: int) -> Tuple[List[RankSpec], int]:
    """Ranks compared (full, c/2, c/4, c/8; duplicates dropped) and the rank whose spectrum is shown."""
    ranks: List[RankSpec] = [None]
    for divisor in (2, 4, 8):
        rank = max(1, channels // divisor)
        if rank < channels and rank not in ranks:
            ranks.append(rank)
    return ranks, max(1, channels // 4)


def _check_demo_args(channels: int, input_size: int) -> None:
    for name, value, minimum in (("channels", channels, 1), ("input_size", input_size, 3)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name} ({flag}) must be an integer >= {minimum} (the demo uses 3x3 kernels), "
                             f"got {value!r}")
    # The dense FFT spectrum (complex64 frequency matrices, copied ~2.5 times) dominates.
    needed = 2.5 * channels * channels * input_size * (input_size // 2 + 1) * 8 + 8 * channels * input_size**2 * 4 * 6
    if needed > DEMO_MAX_MEMORY:
        raise ValueError(f"--channels {channels} --input-size {input_size} would need about {needed / 1e9:.1f} GB "
                         f"(limit {DEMO_MAX_MEMORY / 1e9:.1f} GB); use fewer channels or a smaller input size")


def run_demo(channels: int = 128, input_size: int = 16, seed: int = 0) -> List[str]:
    """Return the lines of the demo report (the CLI prints them).

    Parameters
    ----------
    channels : int
        Input and output channels of the demo ``nn.Conv2d(channels, channels, 3, padding=1)``; >= 1.
    input_size : int
        Spatial size of the inputs; >= 3 (the kernel extent).
    seed : int
        Seed of the random weights and inputs.

    Raises
    ------
    ValueError
        An argument is out of range, or the sizes would need more than
        ``DEMO_MAX_MEMORY``; the message names the option.
    """
    _check_demo_args(channels, input_size)
    ranks, low_rank = _demo_ranks(channels)
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(8, channels, input_size, input_size)
    lines = [f"ttconv demo: nn.Conv2d({channels}, {channels}, 3, padding=1) on {input_size}x{input_size} inputs", ""]
    with torch.no_grad():
        reference = conv(x)
        rows: List[List[str]] = []
        for rank in ranks:
            layer = SVDConv.from_conv2d(conv, rank=rank)
            out_err = float((layer(x) - reference).norm() / reference.norm())
            params = sum(p.numel() for p in layer.parameters())
            rows.append([str(layer.ranks), str(params), f"{layer.relative_error:.2e}", f"{out_err:.2e}"])
        dense_params = sum(p.numel() for p in conv.parameters())
        rows.append(["dense nn.Conv2d", str(dense_params), "", ""])
        lines.append(render_table(["rank (r_out, r_in)", "params", "weight err", "output err"], rows, align=">>>>"))

        low = SVDConv.from_conv2d(conv, rank=low_rank)
        n = (input_size, input_size)
        core_sv, core_time = _timed(lambda: low.singular_values(n))
        dense_sv, dense_time = _timed(lambda: conv_singular_values(low.dense_weight(), n))
    agree = float((core_sv - dense_sv).abs().max() / dense_sv[0])
    lines += [
        "",
        f"exact circular spectrum of the rank-{low_rank} layer ({core_sv.numel()} singular values):",
        f"  from the TT core   {core_time * 1e3:8.1f} ms   sigma_max = {float(core_sv[0]):.6f}",
        f"  dense FFT method   {dense_time * 1e3:8.1f} ms   sigma_max = {float(dense_sv[0]):.6f}",
        f"  speed-up {dense_time / core_time:.1f}x, max relative difference {agree:.1e}",
        "  top 5: " + ", ".join(f"{float(v):.4f}" for v in core_sv[:5]),
    ]
    return lines
