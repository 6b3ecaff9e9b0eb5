"""Whether ``torch.compile`` is tracing the current call (lowest floor: imports only torch).

Code that branches on tensor values (a per-shape cache, an algorithm sized to a norm) cannot
run under dynamo's tracing; it asks ``compiling()`` and takes a value-free route there.
"""

from __future__ import annotations

import torch


def compiling() -> bool:
    """Whether ``torch.compile`` (dynamo) is tracing this call."""
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # torch < 2.3
        from torch._dynamo import is_compiling

        return bool(is_compiling())
