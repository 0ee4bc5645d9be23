"""ResNets of He et al. 2016 built from BasicBlocks.

resnet20: the CIFAR layout (3x3 stem, 3 stages of 3 blocks, 16/32/64 channels), ~0.27M parameters.
resnet18: the ImageNet layout (7x7/2 stem, 3x3/2 max pool, [2, 2, 2, 2] blocks, 64..512 channels).
Both use projection shortcuts (1x1 conv + BN, "option B") where the shape changes. Module names
follow torchvision (conv1, bn1, layer1.0.downsample.0, fc, ...), so resnet18 has the same
state_dict keys and the same 11,689,512 parameters as torchvision's; only the ReLUs differ,
one instance per use instead of one shared per block.
"""
from __future__ import annotations

import torch
from torch import nn

from ._layers import init_cnn_weights


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; the first conv carries the stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (B, C_out, H', W')
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResNet(nn.Module):
    """Stem, stages `layer1..layerN` (each after the first halves H and W), avgpool, Linear."""

    def __init__(
        self,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        num_classes: int,
        in_channels: int,
        imagenet_stem: bool,
    ) -> None:
        super().__init__()
        if imagenet_stem:  # 224 px -> 56 px before the first stage
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:  # 32 px images keep their resolution into the first stage
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.maxpool = None
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(widths)))
        channels = widths[0]
        for i, (name, width, depth) in enumerate(zip(self.stage_names, widths, depths)):
            blocks = [BasicBlock(channels, width, 1 if i == 0 else 2)]
            blocks += [BasicBlock(width, width, 1) for _ in range(depth - 1)]
            setattr(self, name, nn.Sequential(*blocks))
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_cnn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, widths[0], H', W')
        if self.maxpool is not None:
            x = self.maxpool(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)  # (B, width, H'', W'')
        x = torch.flatten(self.avgpool(x), 1)  # (B, widths[-1])
        return self.fc(x)  # (B, num_classes)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-20: 6n+2 layers with n=3."""
    return ResNet((16, 32, 64), (3, 3, 3), num_classes, in_channels, imagenet_stem=False)


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ImageNet ResNet-18."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, imagenet_stem=True)
