"""In-memory dataset containers shared by every loader, and the checks they all need."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qatkit.errors import ConfigError, DataError


@dataclass(frozen=True)
class Split:
    """One split held in memory.

    x: (N, C, H, W), uint8 pixels 0..255 or float32 in [0, 1]; y: (N,) int64 class indices.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.dtype not in (torch.uint8, torch.float32):
            raise DataError(f"Split.x has shape {tuple(self.x.shape)} and dtype {self.x.dtype}; expected (N, C, H, W) "
                            "uint8 or float32. Fix: convert the images before building the Split")
        if self.y.shape != (self.x.shape[0],) or self.y.dtype != torch.int64:
            raise DataError(f"Split.y has shape {tuple(self.y.shape)} and dtype {self.y.dtype}; expected "
                            f"({self.x.shape[0]},) int64. Fix: give one int64 label per image")

    def __len__(self) -> int:
        return self.x.shape[0]

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
