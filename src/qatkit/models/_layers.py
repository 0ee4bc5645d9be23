"""Building blocks shared by the convolutional models of the zoo."""
from __future__ import annotations

from torch import nn


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv2d -> BatchNorm2d -> a fresh activation module, the pattern QAT folds into one conv.

    The conv has no bias because BN's shift replaces it; padding keeps H and W for stride 1 and
    gives ceil(H / 2) for stride 2. `act=None` leaves the activation out (linear bottlenecks).
    """
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if act is not None:
        layers.append(act())  # a new instance per use, so each ReLU can get its own observer
    return nn.Sequential(*layers)


def init_cnn_weights(model: nn.Module) -> None:
    """Standard CNN init: Kaiming normal for convs (fan_out, as torchvision), BN weight 1 and bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
