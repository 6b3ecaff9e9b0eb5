"""Architectures of the experiments, each built from a conv factory and an activation factory.

* :func:`digits_chain`: the small *plain chain* used on digits (``PixelUnshuffle``, zero
  channel padding, three 3x3 circular convs, a linear head), so that the product of the
  layer norms is a valid Lipschitz certificate for every method;
* :func:`wrn16_10`, :func:`resnet18`, :func:`vgg19`: the CIFAR networks of Senderovich et
  al. (NeurIPS 2022). WRN-16-10 and VGG-19 follow the paper's code
  (github.com/WhiteTeaDragon/practical_svd_conv): pre-activation wide blocks with the
  parameter-free shortcut (average pooling and zero channels), VGG-19 with batch norm
  (eps 1e-3) and a 512-512-classes head; ResNet-18 is the usual CIFAR variant (3x3 stem,
  no max pool). ``width`` scales every channel count (1.0: the published networks); the
  smoke test builds them narrow.

A conv factory is called as ``conv(in_channels, out_channels, kernel_size, stride=...,
padding=..., bias=...)``; an activation factory as ``act()``. Swapping them is how a
method turns the same architecture into an ``SVDConv`` / orthogonal-core / MaxMin network.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from ttconv.activations import ChannelPad

ConvFactory = Callable[..., nn.Module]
ActFactory = Callable[[], nn.Module]


def plain_conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
               bias: bool = True, padding_mode: str = "zeros") -> nn.Module:
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                     padding_mode=padding_mode)


class NormalizedLinear(nn.Linear):
    """A linear layer divided by its exact spectral norm when that exceeds 1: 1-Lipschitz."""

    def forward(self, input: Tensor) -> Tensor:
        norm = torch.linalg.matrix_norm(self.weight, ord=2)
        return nn.functional.linear(input, self.weight / norm.clamp_min(1.0), self.bias)

    def lipschitz_bound(self) -> float:
        return 1.0  # read by ttconv.evaluate.lipschitz_bound


class Scale(nn.Module):
    """Multiply by a fixed factor (the logit temperature of a 1-Lipschitz network)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, input: Tensor) -> Tensor:
        return input * self.factor

    def lipschitz_bound(self) -> float:
        return abs(self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def digits_chain(conv: ConvFactory = plain_conv, act: ActFactory = nn.ReLU, *, width: int = 32, classes: int = 10,
                 head: Optional[nn.Module] = None) -> nn.Sequential:
    """1x16x16 -> ``width`` x8x8 (isometries) -> 3 circular 3x3 convs (last stride 2) -> linear head.

    A plain chain: ``ttconv.evaluate.lipschitz_bound`` multiplies the layer bounds. Circular
    padding on sizes divisible by the stride makes each conv's exact circular norm (what
    ``SpectralControl`` controls) its operator norm, so the certificate is the product
    of the controlled norms and the head's norm.
    """

    def layer(stride: int = 1) -> nn.Module:
        return conv(width, width, 3, stride=stride, padding=1, padding_mode="circular")

    return nn.Sequential(
        nn.PixelUnshuffle(2), ChannelPad(width),
        layer(), act(), layer(), act(), layer(stride=2), act(),
        nn.Flatten(), head if head is not None else nn.Linear(width * 16, classes),
    )


# --------------------------------------------------------------------------- WRN-16-10
class WideBlock(nn.Module):
    """Pre-activation wide basic block: BN, act, conv3x3(stride), BN, act, conv3x3, plus shortcut."""

    def __init__(self, conv: ConvFactory, act: ActFactory, in_channels: int, out_channels: int, stride: int,
                 shortcut: str) -> None:
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(in_channels), act()
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(out_channels), act()
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        parts: List[nn.Module] = []
        if stride != 1 or in_channels != out_channels:
            if shortcut == "conv":
                parts.append(conv(in_channels, out_channels, 1, stride=stride, padding=0, bias=False))
            else:  # the paper's code: average pooling, then zero channels
                if stride != 1:
                    parts.append(nn.AvgPool2d(stride))
                if in_channels != out_channels:
                    parts.append(ChannelPad(out_channels))
        self.shortcut = nn.Sequential(*parts)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.act1(self.bn1(x)))
        out = self.conv2(self.act2(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    def __init__(self, conv: ConvFactory, act: ActFactory, depth: int = 16, widen: int = 10, classes: int = 10,
                 shortcut: str = "pad", width: float = 1.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        if shortcut not in ("pad", "conv"):
            raise ValueError(f"shortcut must be 'pad' or 'conv', got {shortcut!r}")
        blocks = (depth - 4) // 6
        stages = [_scaled(16, width), _scaled(16 * widen, width), _scaled(32 * widen, width), _scaled(64 * widen, width)]
        self.conv1 = conv(3, stages[0], 3, stride=1, padding=1, bias=False)
        layers: List[nn.Module] = []
        channels = stages[0]
        for stage, stride in zip(stages[1:], (1, 2, 2)):
            for index in range(blocks):
                layers.append(WideBlock(conv, act, channels, stage, stride if index == 0 else 1, shortcut))
                channels = stage
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.act = act()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn(self.blocks(self.conv1(x))))
        return self.fc(self.pool(out).flatten(1))


def wrn16_10(conv: ConvFactory = plain_conv, act: ActFactory = nn.ReLU, *, classes: int = 10, width: float = 1.0,
             shortcut: str = "pad") -> WideResNet:
    """WRN-16-10 (Zagoruyko & Komodakis 2016), dropout 0, the paper's parameter-free shortcut by default."""
    return WideResNet(conv, act, 16, 10, classes, shortcut, width)


# --------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, conv: ConvFactory, act: ActFactory, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(out_channels), act()
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(conv(in_channels, out_channels, 1, stride=stride, padding=0, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.act2 = act()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, conv: ConvFactory, act: ActFactory, classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = conv(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(widths[0]), act()
        layers: List[nn.Module] = []
        channels = widths[0]
        for stage, stride in zip(widths, (1, 2, 2, 2)):
            for index in range(2):
                layers.append(BasicBlock(conv, act, channels, stage, stride if index == 0 else 1))
                channels = stage
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.act1(self.bn1(self.conv1(x))))
        return self.fc(self.pool(out).flatten(1))


def resnet18(conv: ConvFactory = plain_conv, act: ActFactory = nn.ReLU, *, classes: int = 10,
             width: float = 1.0) -> ResNet18:
    """ResNet-18 for 32x32 inputs (He et al. 2016; 3x3 stem, no max pool; 11.17M parameters)."""
    return ResNet18(conv, act, classes, width)


# --------------------------------------------------------------------------- VGG-19
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def vgg19(conv: ConvFactory = plain_conv, act: ActFactory = nn.ReLU, *, classes: int = 10,
          width: float = 1.0) -> nn.Sequential:
    """VGG-19 with batch norm (eps 1e-3) and a 512-512-classes head, as in the paper's code.

    A plain ``nn.Sequential`` of convs, eval-mode batch norm, non-overlapping max pools and
    linear layers, so ``ttconv.evaluate.lipschitz_bound`` certifies it.
    """
    layers: List[nn.Module] = []
    channels = 3
    for item in VGG19_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = _scaled(int(item), width)
        layers += [conv(channels, out, 3, stride=1, padding=1, bias=True), nn.BatchNorm2d(out, eps=1e-3), act()]
        channels = out
    hidden = _scaled(512, width)
    layers += [nn.Flatten(), nn.Linear(channels, hidden), act(), nn.Linear(hidden, hidden), act(),
               nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)


def _scaled(channels: int, width: float) -> int:
    """Channels times ``width``, rounded to an even number >= 2 (MaxMin needs pairs)."""
    return max(2, 2 * round(channels * width / 2))


ARCHITECTURES = {"digits_chain": digits_chain, "wrn16_10": wrn16_10, "resnet18": resnet18, "vgg19": vgg19}
