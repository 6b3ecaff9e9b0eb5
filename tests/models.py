"""Real architectures built in the tests: a small ResNet, a VGG-style net, a grouped net."""

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, width=8, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.layers = nn.ModuleList([BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                     BasicBlock(2 * width, 4 * width, 2)])
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.layers:
            x = block(x)
        return self.head(x.mean((2, 3)))


def vgg_like(width=8, classes=10):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


class GroupedNet(nn.Module):
    """Depthwise-separable blocks (MobileNet style) plus a grouped conv, in a ModuleDict."""

    def __init__(self, width=8):
        super().__init__()
        self.blocks = nn.ModuleDict({
            "stem": nn.Conv2d(3, width, 3, padding=1),
            "depthwise": nn.Conv2d(width, width, 3, padding=1, groups=width),
            "pointwise": nn.Conv2d(width, 2 * width, 1),
            "grouped": nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, groups=4, padding_mode="reflect"),
        })

    def forward(self, x):
        for block in self.blocks.values():
            x = torch.relu(block(x))
        return x


ARCHITECTURES = {"resnet": SmallResNet, "vgg": vgg_like, "grouped": GroupedNet}
