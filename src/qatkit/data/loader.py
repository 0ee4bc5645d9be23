"""Batches straight from in-memory tensors: one index, one conversion and one normalisation per batch.

Order and augmentation of epoch e depend only on (seed, e), drawn from a local torch.Generator, so
a run is reproducible and resumable and never touches the global RNG.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from qatkit.config import AUGMENTS
from qatkit.data.base import Split
from qatkit.errors import ConfigError, DataError, bad_value

PAD = 4  # crop-flip: pixels of zero padding on each side before the random crop


def _crop_flip(x: torch.Tensor, gen: torch.Generator, batch: int, part: slice) -> torch.Tensor:
    """Random crop of the zero-padded image plus random horizontal flip, per sample, in one gather.

    x: (B, C, H, W) -> (B, C, H, W), same dtype: samples `part` of a batch of `batch` (the draws are made for the
    whole batch, so each sample gets the same crop whatever share of the batch this process holds).
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD)).permute(0, 2, 3, 1)  # (B, H+2P, W+2P, C)
    dy = torch.randint(0, 2 * PAD + 1, (batch, 1), generator=gen)[part]
    dx = torch.randint(0, 2 * PAD + 1, (batch, 1), generator=gen)[part]
    flip = (torch.rand(batch, 1, generator=gen) < 0.5)[part]
    rows = dy + torch.arange(h)  # (B, H)
    # reading the crop window right-to-left is cropping then flipping
    cols = dx + torch.where(flip, torch.arange(w - 1, -1, -1), torch.arange(w))  # (B, W)
    out = padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class BatchLoader:
    """Yields (x, y) per batch: x (B, C, H, W) float32 normalised per channel, or for a split of token ids
    x (B, L) int64 as stored (no mean/std, no augmentation); y (B,) int64.

    Iterating twice without set_epoch gives the same batches; call set_epoch(e) before epoch e.
    shard=(rank, world_size): this process's part of every batch (data-parallel training; rank r of w gets
    samples [r·B/w, (r+1)·B/w) of each batch of B, the same ones and the same augmentation a single process
    would give them), so the batch size stays the global one; a last batch smaller than w is dropped.
    """

    def __init__(self, split: Split, *, batch_size: int, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None,
                 shuffle: bool, seed: int = 0, augment: str = "none", drop_last: bool = False,
                 shard: tuple[int, int] = (0, 1)) -> None:
        if not isinstance(split, Split):
            raise bad_value("split", type(split).__name__, "a qatkit.data.Split (a dataset's .train or .test; "
                            "Split(x, y) of tensors)", "pass ds.train, or wrap tensors as Split(x, y)")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise bad_value(name, flag, "True or False", f"pass {name}=True or {name}=False")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise bad_value("batch_size", batch_size, "an integer >= 1",
                            "pass batch_size=1 or more (batch_size: under train: in qatkit's --config YAML)")
        if augment not in AUGMENTS:
            raise bad_value("augment", augment, ", ".join(AUGMENTS), "pick one of those")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise bad_value("seed", seed, "an integer >= 0", "pass --seed 0 or more")
        if (not isinstance(shard, (tuple, list)) or len(shard) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
                or not 0 <= shard[0] < shard[1]):
            raise bad_value("shard", shard, "(rank, world_size) with 0 <= rank < world_size", "pass e.g. shard=(0, 2)")
        if len(split) == 0:
            raise bad_value("split size", 0, "at least one sample", "check the data (and --limit) feeding the loader",
                            DataError)
        if split.is_tokens:
            if augment != "none":
                raise bad_value("augment", augment, "none for token ids", "drop --augment for text datasets")
            mean, std = (), ()  # ids are not normalised
        else:
            channels = split.x.shape[1]
            numbers = isinstance(mean, Sequence) and isinstance(std, Sequence) and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in (*mean, *std))
            if not numbers or len(mean) != channels or len(std) != channels or min(std) <= 0:
                raise ConfigError(f"mean {mean} / std {std} do not fit {channels}-channel images; expected "
                                  f"{channels} finite numbers each, std > 0. Fix: use the dataset's mean and std")
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.seed, self.augment, self.drop_last = seed, augment, drop_last
        self.rank, self.world_size = shard
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise bad_value("epoch", epoch, "an integer >= 0", "count epochs from 0")
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = len(self.split), self.batch_size
        full, rest = divmod(n, b)
        return full + (0 < rest and not self.drop_last and rest >= self.world_size)

    @property
    def num_samples(self) -> int:
        """Samples one epoch yields over all shards: all of them, less a dropped last partial batch."""
        return min(len(self) * self.batch_size, len(self.split))

    def _part(self, batch: int) -> slice:
        """This shard's rows of a batch of `batch` samples (the first batch % world_size shards get one more)."""
        base, extra = divmod(batch, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # SeedSequence mixes (seed, epoch) so neighbouring seeds or epochs give unrelated streams
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state))
        n = len(self.split)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for start in range(0, self.num_samples, self.batch_size):
            idx = order[start:start + self.batch_size]
            part = self._part(len(idx))
            idx_part = idx[part]
            x = self.split.x[idx_part]  # (B, C, H, W) or (B, L), a fresh copy, so in-place ops below are safe
            if self.split.is_tokens:
                yield x, self.split.y[idx_part]
                continue
            if self.augment == "crop-flip":
                x = _crop_flip(x, gen, len(idx), part)
            x = x.float()
            if self.split.x.dtype == torch.uint8:
                x.div_(255.0)
            yield x.sub_(self.mean).div_(self.std), self.split.y[idx_part]
