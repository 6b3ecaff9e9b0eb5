"""Randomised grids of convolution configurations for property tests (deterministic)."""

from __future__ import annotations

import random
from typing import Any, Dict, List

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def random_conv_configs(count: int, seed: int, max_in_numel: int = 1024) -> List[Dict[str, Any]]:
    """``count`` configs: ``conv`` (nn.Conv2d kwargs), ``rank`` and input size ``n``.

    Channels 1-16, kernels 1x1-5x5 incl. rectangular, stride and dilation 1-2 (per axis),
    groups, every padding form and mode, ranks None / int / pair; ``n`` is divisible by
    the stride, at least the dilated kernel extent, and ``c_in * n1 * n2 <= max_in_numel``.
    """
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        groups = rng.choice([1, 1, 1, 2, 3, 4])
        c_in = groups * rng.randint(1, 16 // groups)
        c_out = groups * rng.randint(1, 16 // groups)
        kernel = (rng.randint(1, 5), rng.randint(1, 5))
        stride = rng.choice([(1, 1), (1, 1), (2, 2), (1, 2), (2, 1)])
        dilation = rng.choice([(1, 1), (1, 1), (2, 2), (1, 2)])
        extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
        n = tuple(s * -(-(e + rng.randint(0, 3)) // s) for e, s in zip(extent, stride))
        if c_in * n[0] * n[1] > max_in_numel:
            continue
        padding = rng.choice(["int", "pair", "valid", "same"] if stride == (1, 1) else ["int", "pair", "valid"])
        if padding == "int":
            padding = rng.randint(0, 2)
        elif padding == "pair":
            padding = (rng.randint(0, 2), rng.randint(0, 2))
        mode = rng.choice(PADDING_MODES)
        pads = [padding] * 2 if isinstance(padding, int) else padding
        if mode != "zeros" and not isinstance(pads, str):
            # reflect/circular need the padding to be smaller than the input.
            if any(p >= size for p, size in zip(pads, n)):
                continue
        if mode != "zeros" and padding == "same" and any(e - 1 >= size for e, size in zip(extent, n)):
            continue
        rank = rng.choice([None, "int", "pair"])
        if rank == "int":
            rank = rng.randint(1, 16)
        elif rank == "pair":
            rank = (rng.randint(1, 16), rng.randint(1, 16))
        configs.append(
            dict(
                conv=dict(
                    in_channels=c_in, out_channels=c_out, kernel_size=kernel, stride=stride,
                    padding=padding, dilation=dilation, groups=groups, bias=rng.random() < 0.7,
                    padding_mode=mode,
                ),
                rank=rank,
                n=n,
            )
        )
    return configs


def config_id(config: Dict[str, Any]) -> str:
    c = config["conv"]
    return (
        f"{c['in_channels']}-{c['out_channels']}-k{c['kernel_size'][0]}x{c['kernel_size'][1]}"
        f"-s{c['stride'][0]}{c['stride'][1]}-d{c['dilation'][0]}{c['dilation'][1]}-g{c['groups']}"
        f"-p{c['padding']}-{c['padding_mode']}-r{config['rank']}-n{config['n'][0]}x{config['n'][1]}"
    ).replace(" ", "")
