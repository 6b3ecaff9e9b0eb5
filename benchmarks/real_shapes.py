"""Models with the shapes of real pretrained networks, defined here (no downloads).

The layer shapes follow the published architectures; the weights are random (seeded), which
is all the speed and coverage checks need: cost depends on shapes, not values.

- ``mobilenet_v3_small``: MobileNet-v3-Small (Howard et al. 2019, Table 2), 224x224: depthwise
  3x3/5x5 convs with stride 2, 1x1 expand/project convs, squeeze-excite 1x1 convs on 1x1 maps,
  residual additions, a Linear classifier.
- ``ocr_det``: a PP-OCR-style text detector (DB): a depthwise-separable backbone, an FPN neck
  (1x1 laterals, upsampling, additions, 3x3 smoothing) and a DB head with two stride-2
  ``ConvTranspose2d``; input 3x640x640.
- ``ocr_rec``: a PP-OCR-style CRNN recogniser: height strides (2, 1) down to a 1-pixel-high map,
  5x5 depthwise convs on maps smaller than the kernel, a Linear CTC head; input 3x48x320.
- ``ocr_cls``: the PP-OCR text-direction classifier: a 0.35-width MobileNet-v3 on 3x48x192, whose
  last stages see 3x12 and 2x6 maps under 5x5 kernels (the kernel is larger than the map).
- ``mtcnn_pnet`` / ``mtcnn_rnet`` / ``mtcnn_onet``: the three MTCNN stages (Zhang et al. 2016)
  at their native input sizes 12, 24 and 48 (PNet also runs fully convolutionally on larger images).

Every model is non-sequential where the original is (residuals, FPN, SE gates), so a product
of per-layer norms is not a Lipschitz bound for them.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k, stride=1, groups: int = 1, act: Optional[Callable[[], nn.Module]] = nn.ReLU):
        ks = (k, k) if isinstance(k, int) else k
        padding = (ks[0] // 2, ks[1] // 2)
        layers: List[nn.Module] = [nn.Conv2d(cin, cout, ks, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        squeezed = _divisible(channels / reduction)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(gate))))


class InvertedResidual(nn.Module):
    """MobileNet-v3 block: 1x1 expand, kxk depthwise (stride), optional SE, 1x1 project."""

    def __init__(self, cin: int, k: int, expand: int, cout: int, se: bool, act, stride):
        super().__init__()
        layers: List[nn.Module] = []
        if expand != cin:
            layers.append(ConvBNAct(cin, expand, 1, act=act))
        layers.append(ConvBNAct(expand, expand, k, stride, groups=expand, act=act))
        if se:
            layers.append(SqueezeExcite(expand))
        layers.append(ConvBNAct(expand, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


RE, HS = nn.ReLU, nn.Hardswish
# (kernel, expansion, out, SE, activation, stride): MobileNet-v3-Small, Table 2 of the paper.
V3_SMALL = [(3, 16, 16, True, RE, 2), (3, 72, 24, False, RE, 2), (3, 88, 24, False, RE, 1),
            (5, 96, 40, True, HS, 2), (5, 240, 40, True, HS, 1), (5, 240, 40, True, HS, 1),
            (5, 120, 48, True, HS, 1), (5, 144, 48, True, HS, 1), (5, 288, 96, True, HS, 2),
            (5, 576, 96, True, HS, 1), (5, 576, 96, True, HS, 1)]


def _v3_features(config, width: float, strides: Optional[List] = None) -> Tuple[nn.Sequential, int]:
    cin = _divisible(16 * width)
    layers: List[nn.Module] = [ConvBNAct(3, cin, 3, 2, act=HS)]
    for i, (k, expand, cout, se, act, stride) in enumerate(config):
        stride = strides[i] if strides is not None else stride
        expand, cout = _divisible(expand * width), _divisible(cout * width)
        layers.append(InvertedResidual(cin, k, expand, cout, se, act, stride))
        cin = cout
    last = _divisible(576 * width)
    layers.append(ConvBNAct(cin, last, 1, act=HS))
    return nn.Sequential(*layers), last


class MobileNetV3Small(nn.Module):
    def __init__(self, width: float = 1.0, classes: int = 1000, strides: Optional[List] = None):
        super().__init__()
        self.features, channels = _v3_features(V3_SMALL, width, strides)
        hidden = 1024 if width >= 1 else _divisible(1024 * width)
        self.classifier = nn.Sequential(nn.Linear(channels, hidden), nn.Hardswish(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _separable(cin: int, cout: int, k: int, stride) -> nn.Sequential:
    """Depthwise-separable block (PP-LCNet style): kxk depthwise then 1x1 pointwise."""
    return nn.Sequential(ConvBNAct(cin, cin, k, stride, groups=cin, act=HS), ConvBNAct(cin, cout, 1, act=HS))


# (kernel, out, stride) per block; PP-LCNet x0.5-like widths.
LCNET = [(3, 32, 1), (3, 64, 2), (3, 64, 1), (3, 128, 2), (3, 128, 1), (3, 256, 2),
         (5, 256, 1), (5, 256, 1), (5, 256, 1), (5, 512, 2), (5, 512, 1)]


class OCRDetector(nn.Module):
    """PP-OCR-style DB detector: LCNet backbone, FPN neck, DB head with two transposed convs."""

    def __init__(self, neck: int = 96):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2, act=HS)
        blocks, cin = [], 16
        for k, cout, stride in LCNET:
            blocks.append(_separable(cin, cout, k, stride))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.taps = (2, 4, 8, 10)  # outputs at strides 4, 8, 16, 32
        widths = [LCNET[i][1] for i in self.taps]
        self.lateral = nn.ModuleList(nn.Conv2d(w, neck, 1, bias=False) for w in widths)
        self.smooth = nn.ModuleList(nn.Conv2d(neck, neck // 4, 3, padding=1, bias=False) for _ in widths)
        self.head = nn.Sequential(
            ConvBNAct(neck, neck // 4, 3),
            nn.ConvTranspose2d(neck // 4, neck // 4, 2, stride=2), nn.BatchNorm2d(neck // 4), nn.ReLU(),
            nn.ConvTranspose2d(neck // 4, 1, 2, stride=2), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                features.append(x)
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        size = laterals[0].shape[-2:]
        fused = torch.cat([F.interpolate(conv(p), size=size) for conv, p in zip(self.smooth, laterals)], dim=1)
        return self.head(fused)


class OCRRecognizer(nn.Module):
    """PP-OCR-style CRNN: LCNet with (2, 1) height strides to a 1-pixel-high map, BiLSTM-free CTC head."""

    def __init__(self, classes: int = 6625):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2, act=HS)
        strides = [1, (2, 1), 1, (2, 1), 1, (2, 1), 1, 1, 1, (2, 1), 1]
        blocks, cin = [], 16
        for (k, cout, _), stride in zip(LCNET, strides):
            blocks.append(_separable(cin, cout, k, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.neck = ConvBNAct(cin, 96, (1, 3), act=HS)
        self.head = nn.Linear(96, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.neck(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), (1, None)))
        return self.head(x.squeeze(2).transpose(1, 2))


def ocr_cls() -> MobileNetV3Small:
    """Text-direction classifier: MobileNet-v3-Small x0.35 with (2, 1) strides late, two classes."""
    strides = [2, (2, 1), 1, (2, 1), 1, 1, 1, 1, (2, 1), 1, 1]
    return MobileNetV3Small(width=0.35, classes=2, strides=strides)


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 10, 3), nn.PReLU(10), nn.MaxPool2d(2, 2, ceil_mode=True),
                                  nn.Conv2d(10, 16, 3), nn.PReLU(16), nn.Conv2d(16, 32, 3), nn.PReLU(32))
        self.score = nn.Conv2d(32, 2, 1)
        self.box = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return torch.cat([self.score(y), self.box(y)], dim=1)


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 28, 3), nn.PReLU(28), nn.MaxPool2d(3, 2, ceil_mode=True),
                                  nn.Conv2d(28, 48, 3), nn.PReLU(48), nn.MaxPool2d(3, 2, ceil_mode=True),
                                  nn.Conv2d(48, 64, 2), nn.PReLU(64))
        self.fc = nn.Sequential(nn.Linear(576, 128), nn.PReLU(128))
        self.out = nn.Linear(128, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(self.body(x).flatten(1)))


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True),
                                  nn.Conv2d(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2, ceil_mode=True),
                                  nn.Conv2d(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True),
                                  nn.Conv2d(64, 128, 2), nn.PReLU(128))
        self.fc = nn.Sequential(nn.Linear(1152, 256), nn.PReLU(256))
        self.out = nn.Linear(256, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(self.body(x).flatten(1)))


# ---------------------------------------------------------------- the model zoo (issue 11)
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(ConvBNAct(cin, width, 3, stride), ConvBNAct(width, width, 3, act=None))
        self.shortcut = (nn.Sequential() if stride == 1 and cin == width
                         else ConvBNAct(cin, width, 1, stride, act=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        out = 4 * width
        self.body = nn.Sequential(ConvBNAct(cin, width, 1), ConvBNAct(width, width, 3, stride),
                                  ConvBNAct(width, out, 1, act=None))
        self.shortcut = (nn.Sequential() if stride == 1 and cin == out
                         else ConvBNAct(cin, out, 1, stride, act=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """ImageNet ResNet (He et al. 2016): 7x7 stem, max-pool, four stages, Linear head."""

    def __init__(self, block, depths, width: int = 64, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, width, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, depth in enumerate(depths):
            for j in range(depth):
                stages.append(block(cin, width * 2 ** i, 2 if i > 0 and j == 0 else 1))
                cin = width * 2 ** i * block.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


def resnet18(width: int = 64) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), width)


def resnet50(width: int = 64) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), width)


# (expansion t, out c, repeats n, stride s): MobileNet-v2, Table 2 of Sandler et al. 2018.
V2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 1.0, classes: int = 1000):
        super().__init__()
        cin = _divisible(32 * width)
        layers: List[nn.Module] = [ConvBNAct(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in V2:
            for i in range(n):
                cout = _divisible(c * width)
                layers.append(InvertedResidual(cin, 3, cin * t, cout, False, nn.ReLU6, s if i == 0 else 1))
                cin = cout
        layers.append(ConvBNAct(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def vgg11(width: int = 64, classes: int = 1000) -> nn.Module:
    """VGG-11 (configuration A) with BN; the classifier shrunk to one Linear after pooling."""
    layers: List[nn.Module] = []
    cin = 3
    for v in (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers.append(ConvBNAct(cin, width * v, 3))
            cin = width * v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


ZOO: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, int, int]]] = {
    "resnet18": (resnet18, (3, 224, 224)),
    "resnet50": (resnet50, (3, 224, 224)),
    "mobilenet_v2": (MobileNetV2, (3, 224, 224)),
    "vgg11": (vgg11, (3, 224, 224)),
}


# name -> (constructor, input shape (C, H, W) at the model's real size)
MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, int, int]]] = {
    "mobilenet_v3_small": (MobileNetV3Small, (3, 224, 224)),
    "ocr_det": (OCRDetector, (3, 640, 640)),
    "ocr_rec": (OCRRecognizer, (3, 48, 320)),
    "ocr_cls": (ocr_cls, (3, 48, 192)),
    "mtcnn_pnet": (PNet, (3, 12, 12)),
    "mtcnn_rnet": (RNet, (3, 24, 24)),
    "mtcnn_onet": (ONet, (3, 48, 48)),
}


# narrow versions of the zoo for smoke runs: (constructor, input shape)
TINY: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, int, int]]] = {
    "resnet18": (lambda: resnet18(8), (3, 32, 32)),
    "resnet50": (lambda: resnet50(4), (3, 32, 32)),
    "mobilenet_v2": (lambda: MobileNetV2(0.25), (3, 32, 32)),
    "vgg11": (lambda: vgg11(4), (3, 32, 32)),
}


def build(name: str, seed: int = 0, tiny: bool = False) -> Tuple[nn.Module, torch.Tensor]:
    """The model in eval mode with seeded random weights (BN statistics randomised too) and one input.

    ``tiny=True`` gives a narrow zoo model on a 32x32 input (smoke runs); the issue-14 models are
    small enough as they are.

    Drawn on the CPU (the seeded ``torch.Generator`` is a CPU one), then moved to torch's
    default device (a benchmark's ``--device``): the same weights and input on every device.
    """
    constructor, shape = (TINY if tiny and name in TINY else {**MODELS, **ZOO})[name]
    target = torch.empty(0).device
    with torch.device("cpu"):
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = constructor()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
        x = torch.randn(1, *shape, generator=generator)
    return model.eval().to(target), x.to(target)
