"""SmallCNN: a compact conv net for small images (8x8 digits, 28x28 MNIST, 32x32 CIFAR).

Four conv-BN-ReLU layers with two 2x2 max pools, then global average pooling, so one set of weights
fits every input of at least 4 px. About 94k parameters at width 32.
"""
from __future__ import annotations

import torch
from torch import nn

from ._layers import conv_bn_act, init_cnn_weights


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(in_channels, width, 3),
            conv_bn_act(width, 2 * width, 3),
            nn.MaxPool2d(2),  # 32 -> 16, 28 -> 14, 8 -> 4
            conv_bn_act(2 * width, 2 * width, 3),
            nn.MaxPool2d(2),  # 16 -> 8, 14 -> 7, 4 -> 2
            conv_bn_act(2 * width, 2 * width, 3),  # more receptive field: 20 px, enough for 28 px digits
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        init_cnn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 2w, H/4, W/4)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 2w)
        return self.fc(x)  # (B, num_classes)
