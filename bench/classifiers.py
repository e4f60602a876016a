"""Standard image classifiers for Protocol B (docs/protocols.md#protocol-b).

- ``resnet18-cifar``: torchvision ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool).
- ``vgg16-bn``: torchvision VGG-16-BN with a 1x1 pooled head for 32px inputs.
- ``small-resnet``: a 3-stage (16/32/64) pre-activation-free ResNet for 28px offline data (seconds
  per epoch on 2 cores).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bench.errors import BenchError


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers.append(_Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    from torchvision.models import vgg16_bn as tv_vgg16_bn

    model = tv_vgg16_bn(num_classes=num_classes)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(512, num_classes))
    return model


CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "small-resnet": SmallResNet,
    "resnet18-cifar": resnet18_cifar,
    "vgg16-bn": vgg16_bn,
}


def build_classifier(name: str, num_classes: int, in_channels: int, widths: list[int] | None = None) -> nn.Module:
    if name not in CLASSIFIERS:
        raise BenchError(f"model.name: unknown classifier {name!r}; known: {', '.join(sorted(CLASSIFIERS))}")
    if widths is not None:
        if name != "small-resnet":
            raise BenchError(f"model.widths only applies to small-resnet, not {name!r}")
        return SmallResNet(num_classes=num_classes, in_channels=in_channels, widths=tuple(widths))
    return CLASSIFIERS[name](num_classes=num_classes, in_channels=in_channels)
