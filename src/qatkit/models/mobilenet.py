"""MobileNetV2 (Sandler et al. 2018) with an option for small images.

Inverted residual block: 1x1 expand conv-BN-ReLU6, 3x3 depthwise conv-BN-ReLU6, 1x1 linear
projection conv-BN with no activation, and a residual add when the shape is unchanged.

`small_input=True` (for 8-32 px images) uses stride 1 in the stem and in the first stride-2 stage
(24 channels), leaving 3 stride-2 stages: 32 px -> 4 px, 8 px -> 1 px. Spatial size can never
reach 0, whatever the input: every stride-2 conv is a padded 3x3 that maps H to ceil(H / 2) >= 1,
and the head is AdaptiveAvgPool2d(1), so the number of stride-2 stages needs no cap and the model
needs no `image_size`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import bad_value
from ._layers import conv_bn_act, init_cnn_weights

# (expansion t, output channels c, repeats n, stride s of the first repeat): the paper's Table 2
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor` without going more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = [conv_bn_act(in_channels, hidden, 1, act=nn.ReLU6)] if expansion != 1 else []
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
            conv_bn_act(hidden, out_channels, 1, act=None),  # linear bottleneck: ReLU would lose information
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x  # (B, C_in, H, W)
        out = self.conv(x)  # (B, C_out, H / stride, W / stride)
        if self.use_residual:
            out = out + identity
        return out


class MobileNetV2(nn.Module):
    def __init__(
        self, num_classes: int, in_channels: int = 3, width_mult: float = 1.0, small_input: bool = True
    ) -> None:
        super().__init__()
        if not width_mult > 0:
            raise bad_value("width_mult", width_mult, "a number > 0", "use 1.0 for the standard MobileNetV2")
        channels = _make_divisible(32 * width_mult)
        last_channels = _make_divisible(1280 * max(1.0, width_mult))
        layers = [conv_bn_act(in_channels, channels, 3, 1 if small_input else 2, act=nn.ReLU6)]
        for t, c, n, s in _SETTINGS:
            out_channels = _make_divisible(c * width_mult)
            stride = 1 if small_input and c == 24 else s
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, t))
                channels = out_channels
        layers.append(conv_bn_act(channels, last_channels, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        init_cnn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, last_channels, H', W')
        x = torch.flatten(self.avgpool(x), 1)  # (B, last_channels)
        return self.classifier(x)  # (B, num_classes)


def mobilenet_v2(
    num_classes: int, in_channels: int = 3, width_mult: float = 1.0, small_input: bool = True
) -> MobileNetV2:
    """MobileNetV2; `small_input=True` keeps resolution for 8-32 px images (see the module docstring)."""
    return MobileNetV2(num_classes, in_channels, width_mult, small_input)
