"""The independent oracle shared by all tests: explicit operator matrices.

A linear map is applied to every basis image with ``F.conv2d`` in float64 and the
results are stacked as columns. Nothing here uses ttconv.

Device rules (``pytest --device cuda`` makes the test's device torch's default device):
the oracle's own SVDs run in float64 on the CPU (LAPACK), whatever the device, so the
reference does not depend on the device's solver; seeded draws are made on the CPU with a
CPU ``torch.Generator`` and moved to the default device, so every device sees the same
random instances (thresholds calibrated on them keep their meaning).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def default_device() -> torch.device:
    """torch's default device: the test's device (the CPU unless ``--device`` says otherwise)."""
    return torch.empty(0).device


def seeded_randn(*size: int, generator: torch.Generator, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.randn(*size)`` drawn from the CPU ``generator`` on the CPU, then moved to the
    default device: the same values on every device."""
    return torch.randn(*size, generator=generator, dtype=dtype, device="cpu").to(default_device())


def seeded_rand(*size: int, generator: torch.Generator, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.rand(*size)`` drawn as ``seeded_randn`` is (CPU generator, then the default device)."""
    return torch.rand(*size, generator=generator, dtype=dtype, device="cpu").to(default_device())


def seeded_randint(low: int, high: int, size: Sequence[int], *, generator: torch.Generator) -> Tensor:
    """``torch.randint(low, high, size)`` drawn as ``seeded_randn`` is (CPU generator, then the default device)."""
    return torch.randint(low, high, tuple(size), generator=generator, device="cpu").to(default_device())


def svdvals_cpu(matrix: Tensor) -> Tensor:
    """Singular values (descending) of ``matrix`` by LAPACK in float64 on the CPU, returned
    on ``matrix``'s device: the oracle's SVD is the same on every test device."""
    return torch.linalg.svdvals(matrix.detach().cpu().to(torch.float64)).to(matrix.device)


@contextlib.contextmanager
def deterministic_cudnn() -> Iterator[None]:
    """cuDNN restricted to deterministic algorithms inside the block (restored after).

    Off the CPU, cuDNN may pick convolution algorithms that accumulate with atomics, so two
    runs of the same convolution on the same inputs can differ in the last bits (a
    transposed convolution's forward, which is a convolution's data gradient, for instance).
    Tests that compare two runs bitwise (state-dict round trips, gradcheck's reentrancy
    check) need the same bits from the same inputs; the tolerances are unchanged. This covers
    cuDNN only: kernels outside it that accumulate with atomics (the backward of reflect and
    replicate padding on CUDA) stay nondeterministic. Has no effect on the CPU.
    """
    previous = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = previous


def operator_matrix(linear_map: Callable[[Tensor], Tensor], in_shape: Sequence[int]) -> Tensor:
    """Matrix ``(out_numel, in_numel)`` of a linear map on tensors of shape ``in_shape``."""
    numel = math.prod(in_shape)
    basis = torch.eye(numel, dtype=torch.float64).reshape(numel, *in_shape)
    with torch.no_grad():
        images = linear_map(basis)
    return images.reshape(numel, -1).T.contiguous()


def circular_conv(weight: Tensor, stride=(1, 1), dilation=(1, 1), groups: int = 1) -> Callable[[Tensor], Tensor]:
    """``x -> circular convolution of x with weight``, output on the ``n / stride`` grid."""
    kh, kw = weight.shape[-2:]
    pad = (0, dilation[1] * (kw - 1), 0, dilation[0] * (kh - 1))
    w = weight.detach().to(torch.float64)

    def linear_map(x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, pad, mode="circular"), w, None, stride, 0, dilation, groups)

    return linear_map


def layer_operator(module: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """The linear part of a conv layer (its bias removed), with its own padding."""
    bias = getattr(module, "bias", None)

    def linear_map(x: Tensor) -> Tensor:
        y = module(x)
        return y if bias is None else y - bias.detach()[:, None, None]

    return linear_map


def circular_singular_values(weight: Tensor, n, stride=(1, 1), dilation=(1, 1), groups: int = 1) -> Tensor:
    """All singular values (descending) of the circular convolution, from the dense matrix."""
    c_in = weight.shape[1] * groups
    matrix = operator_matrix(circular_conv(weight, stride, dilation, groups), (c_in, *n))
    return svdvals_cpu(matrix)
