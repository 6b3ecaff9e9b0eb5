"""Type aliases shared by the public API."""

from __future__ import annotations

from typing import Literal, Tuple, Union

IntOrPair = Union[int, Tuple[int, int]]
"""An ``int`` or a ``(height, width)`` pair, as ``nn.Conv2d`` accepts."""

Padding = Union[str, int, Tuple[int, int]]
"""``'same'``, ``'valid'``, an ``int`` or a ``(height, width)`` pair."""

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]

RankSpec = Union[None, int, Tuple[int, int]]
"""``None`` (full rank), one ``int`` for both ranks, or ``(r_out, r_in)``."""

ForwardPath = Literal["auto", "dense", "factored", "separable"]

CoreKind = Literal["general", "orthogonal"]
