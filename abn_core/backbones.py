"""A registry of backbones, each split into feature extractor / last stage / classifier.

Backbones keep torchvision's module names (conv1, bn1, layer1..layer4, fc) so torchvision weights and
the authors' ABN checkpoints map onto them without renaming.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
from torchvision import models
from torchvision.models.resnet import BasicBlock


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and where ABN splits it."""

    build: Callable[[], nn.Module]
    extractor: tuple[str, ...]  # module names run in order to give g(x)
    last_stage: str  # the stage the perception branch runs on g'(x); the paper head copies it
    classifier: str = "fc"
    torchvision_name: str | None = None  # for looking up torchvision weights by name


BACKBONES: dict[str, BackboneSpec] = {}

_IMAGENET_EXTRACTOR = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
_TORCHVISION_RESNETS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
)


def _torchvision_builder(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(models, name)(weights=None)


for _name in _TORCHVISION_RESNETS:
    BACKBONES[_name] = BackboneSpec(
        build=_torchvision_builder(_name),
        extractor=_IMAGENET_EXTRACTOR,
        last_stage="layer4",
        torchvision_name=_name,
    )


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, basic blocks, 16/32/64 channels).

    Unlike the authors' ABN code, ``cifar_resnet110`` really has 110 layers (18 basic blocks per
    stage), not a bottleneck ResNet-164 under that name. Projection shortcuts (1x1 conv + BN).
    """

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(16, blocks, stride=1)
        self.layer2 = self._make_stage(32, blocks, stride=2)
        self.layer3 = self._make_stage(64, blocks, stride=2)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)


def _cifar_builder(depth: int) -> Callable[[], nn.Module]:
    return lambda: CifarResNet(depth)


for _depth in (20, 32, 44, 56, 110):
    BACKBONES[f"cifar_resnet{_depth}"] = BackboneSpec(
        build=_cifar_builder(_depth),
        extractor=("conv1", "bn1", "relu", "layer1", "layer2"),
        last_stage="layer3",
    )


def stage_channels(stage: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of a ResNet stage."""
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    out_channels = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
    return convs[0].in_channels, out_channels


def set_stride_one(stage: nn.Module) -> nn.Module:
    """Make every convolution of a stage stride 1 (in place): the paper head's stage copy keeps h x w."""
    for module in stage.modules():
        if isinstance(module, nn.Conv2d):
            module.stride = (1, 1)
    return stage
