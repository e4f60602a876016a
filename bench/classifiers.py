"""Standard image classifiers for Protocol B (docs/protocols.md#protocol-b).

- ``resnet18-cifar``: torchvision ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool).
- ``vgg16-bn``: torchvision VGG-16-BN with a 1x1 pooled head for 32px inputs.
- ``small-resnet``: a 3-stage (16/32/64) pre-activation-free ResNet for 28px offline data (seconds
  per epoch on 2 cores).
- ``mlp``: fully connected layers (default 512, 512) with BatchNorm for small offline images: the
  capacity to memorise a few thousand training images in seconds per epoch on one core, so an
  offline Protocol B has something to forget (an Original at 100% on Df, a Retrain at test accuracy).
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


class MLP(nn.Module):
    """Flatten, then (Linear, BatchNorm, ReLU) per hidden width, then the class layer."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (512, 512), image_size: int = 28
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for hidden in widths:
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "small-resnet": SmallResNet,
    "resnet18-cifar": resnet18_cifar,
    "vgg16-bn": vgg16_bn,
}


WIDTHS = ("small-resnet", "mlp")  # the classifiers whose layer widths a suite may set
SIZED = ("mlp",)  # the classifiers built for one input size


def build_classifier(
    name: str, num_classes: int, in_channels: int, widths: list[int] | None = None, image_size: int = 28
) -> nn.Module:
    if name not in CLASSIFIERS:
        raise BenchError(f"model.name: unknown classifier {name!r}; known: {', '.join(sorted(CLASSIFIERS))}")
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    if widths is not None:
        if name not in WIDTHS:
            raise BenchError(f"model.widths only applies to {', '.join(WIDTHS)}, not {name!r}")
        kwargs["widths"] = tuple(widths)
    if name in SIZED:
        kwargs["image_size"] = image_size
    return CLASSIFIERS[name](**kwargs)
