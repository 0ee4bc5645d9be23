"""The model zoo: small float models, written so that torch.fx can trace them and QAT can find
conv-BN-ReLU patterns, residual adds and attention matmuls in the graph."""
from __future__ import annotations

import difflib

from torch import nn

from ..errors import bad_value
from .mobilenet import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18, resnet20
from .seed_mlp import SeedMLP
from .small_cnn import SmallCNN
from .tiny_transformer import TinyTransformer

MODEL_NAMES = ("seed-mlp", "small-cnn", "resnet20", "resnet18", "mobilenetv2", "tiny-transformer")

__all__ = [
    "MODEL_NAMES",
    "TEXT_MODELS",
    "MobileNetV2",
    "ResNet",
    "SeedMLP",
    "SmallCNN",
    "TinyTransformer",
    "build_model",
    "mobilenet_v2",
    "resnet18",
    "resnet20",
]


def _patch_size(image_size: int) -> int:
    """Largest of 4, 2 that divides the image and leaves at least 4x4 patches, else 1 (8 px -> 2, 32 px -> 4)."""
    return next((p for p in (4, 2) if image_size % p == 0 and image_size // p >= 4), 1)


TEXT_MODELS = ("tiny-transformer",)  # the zoo models that take token ids


def build_model(name: str, *, num_classes: int, in_channels: int | None = None, image_size: int | None = None,
                vocab_size: int | None = None, max_len: int | None = None) -> nn.Module:
    """Build zoo model `name` for square images of shape (in_channels, image_size, image_size), or for token ids
    (B, max_len) from a vocabulary of vocab_size words."""
    text = vocab_size is not None or max_len is not None
    shape = {"vocab_size": vocab_size, "max_len": max_len} if text else {"in_channels": in_channels, "image_size": image_size}
    for what, value in (("num_classes", num_classes), *shape.items()):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_value(what, value, "an integer >= 1", f"pass a positive integer {what}")
    if text:
        if name in TEXT_MODELS:
            return TinyTransformer(num_classes, vocab_size=vocab_size, max_len=max_len)
        if name in MODEL_NAMES:
            raise bad_value("model for a text dataset", name, ", ".join(TEXT_MODELS),
                            f"pass --model {TEXT_MODELS[0]} ({name} takes images)")
    if name == "seed-mlp":
        return SeedMLP(in_channels * image_size * image_size, out_features=num_classes)
    if name == "small-cnn":
        return SmallCNN(in_channels, num_classes)
    if name == "resnet20":
        return resnet20(num_classes, in_channels)
    if name == "resnet18":
        return resnet18(num_classes, in_channels)
    if name == "mobilenetv2":
        return mobilenet_v2(num_classes, in_channels, small_input=image_size <= 64)
    if name == "tiny-transformer":
        return TinyTransformer(
            num_classes, image_size=image_size, in_channels=in_channels, patch_size=_patch_size(image_size)
        )
    close = difflib.get_close_matches(str(name), MODEL_NAMES, n=1)
    fix = f"did you mean {close[0]!r}?" if close else "pick one of the allowed names"
    raise bad_value("model name", name, ", ".join(MODEL_NAMES), fix)
