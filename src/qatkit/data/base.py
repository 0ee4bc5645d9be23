"""In-memory dataset containers shared by every loader, and the checks they all need."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qatkit.errors import ConfigError, DataError, bad_value


@dataclass(frozen=True)
class Split:
    """One split held in memory.

    x: images (N, C, H, W), uint8 pixels 0..255 or float32 in [0, 1], or token ids (N, L) int64;
    y: (N,) int64 class indices.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        images = self.x.ndim == 4 and self.x.dtype in (torch.uint8, torch.float32)
        if not (images or self.is_tokens):
            raise DataError(f"Split.x has shape {tuple(self.x.shape)} and dtype {self.x.dtype}; expected images "
                            "(N, C, H, W) uint8 or float32, or token ids (N, L) int64. Fix: convert the samples before "
                            "building the Split")
        if self.y.shape != (self.x.shape[0],) or self.y.dtype != torch.int64:
            raise DataError(f"Split.y has shape {tuple(self.y.shape)} and dtype {self.y.dtype}; expected "
                            f"({self.x.shape[0]},) int64. Fix: give one int64 label per sample")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def is_tokens(self) -> bool:
        return self.x.ndim == 2 and self.x.dtype == torch.int64

    def head(self, n: int) -> Split:
        """The first n samples; cloned so the full tensors can be freed."""
        return Split(self.x[:n].clone(), self.y[:n].clone()) if n < len(self) else self


@dataclass(frozen=True)
class ImageDataset:
    """A train/test pair plus what a model and a BatchLoader need to know about it.

    mean/std: one value per channel, in [0, 1] pixel units.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()  # the names of the labels 0, 1, ..., where the data has them (a folder's)

    def __post_init__(self) -> None:
        """Check what a model and a loss rely on: sizes >= 1, non-empty splits of the declared image shape,
        labels in 0..num_classes-1, one mean/std per channel."""
        for what in ("num_classes", "in_channels", "image_size"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad_value(f"dataset {self.name!r} {what}", value, "an integer >= 1",
                                f"build the ImageDataset with a positive integer {what}", DataError)
        expected = (self.in_channels, self.image_size, self.image_size)
        for part in ("train", "test"):
            split = getattr(self, part)
            if len(split) == 0:
                raise bad_value(f"dataset {self.name!r} {part} split size", 0, "at least one sample",
                                f"check --data: its {part} split holds no samples", DataError)
            if tuple(split.x.shape[1:]) != expected:
                raise bad_value(f"dataset {self.name!r} {part} image shape (C, H, W)", tuple(split.x.shape[1:]),
                                f"{expected} (in_channels, image_size, image_size)",
                                "give every image the declared channel count and square size", DataError)
            lo, hi = int(split.y.min()), int(split.y.max())
            if lo < 0 or hi >= self.num_classes:
                raise bad_value(f"dataset {self.name!r} {part} label", lo if lo < 0 else hi,
                                f"0..{self.num_classes - 1} (num_classes = {self.num_classes})",
                                "relabel the samples or raise num_classes to cover every label", DataError)
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels or min(self.std) <= 0:
            raise bad_value(f"dataset {self.name!r} mean/std", (tuple(self.mean), tuple(self.std)),
                            f"{self.in_channels} values each (one per channel), std > 0",
                            "compute them with channel_stats(train.x)", DataError)

    def head(self, limit: int) -> ImageDataset:
        """Keep the first `limit` samples of each split (mean/std stay those of the full train split)."""
        return replace(self, train=self.train.head(limit), test=self.test.head(limit))


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of x (N, C, H, W) in [0, 1] units, accumulated in float64."""
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double() / scale  # (C, N*H*W)
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1, unbiased=False).tolist())


def require_path(path: str | None, dataset: str, expected: str) -> Path:
    """Check that --data was given and exists; `expected` describes what it should point to."""
    if path is None:
        raise ConfigError(f"--data is not set, but dataset {dataset!r} needs it; expected {expected}. "
                          f"Fix: pass --data pointing to the {dataset} data")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"--data {str(path)!r} does not exist; expected {expected}. "
                        f"Fix: pass --data pointing to the {dataset} data")
    return p
