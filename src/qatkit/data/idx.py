"""MNIST-format folders: the four IDX files, gzipped or not, parsed with numpy.

IDX layout: a big-endian uint32 magic (2051 images, 2049 labels), one big-endian uint32 per
dimension, then the uint8 values in row-major order.
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from qatkit.data.base import ImageDataset, Split, require_path
from qatkit.errors import DataError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
EXPECTED = "a directory holding " + ", ".join(f + ".gz" for f in FILES) + " (or the same names without .gz)"
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # published statistics of the MNIST train split


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"--data {str(root)!r} has no {stem}.gz (nor {stem}); expected {EXPECTED}. "
                    "Fix: pass --data pointing to the MNIST folder, or re-download the missing file")


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read one IDX file into a uint8 array of its declared shape, checking magic and size."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # bad gzip header, truncated stream, unreadable file
        raise DataError(f"{str(path)!r} cannot be read ({e}); expected an IDX file. "
                        "Fix: re-download it") from e
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{str(path)!r} starts with magic number {found}; expected {magic} (an IDX file of "
                        f"{ndim} dimensions). Fix: check the file is the one its name says, or re-download it")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{str(path)!r} is {len(raw)} bytes long; expected at least a {header}-byte IDX header. "
                        "Fix: the file is truncated; re-download it")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) - header != math.prod(shape):
        raise DataError(f"{str(path)!r} holds {len(raw) - header} data bytes; expected {math.prod(shape)} for shape "
                        f"{shape}. Fix: the file is truncated or corrupted; re-download it")
    # copy: frombuffer over bytes is read-only, and torch wants a writable array
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


def _read_split(root: Path, images_stem: str, labels_stem: str) -> Split:
    images_path, labels_path = _find(root, images_stem), _find(root, labels_stem)
    images = read_idx(images_path, IMAGES_MAGIC, 3)  # (N, H, W)
    labels = read_idx(labels_path, LABELS_MAGIC, 1)  # (N,)
    if len(images) != len(labels):
        raise DataError(f"{str(images_path)!r} holds {len(images)} images but {str(labels_path)!r} holds "
                        f"{len(labels)} labels; expected equal counts. Fix: re-download both files")
    if labels.size and labels.max() > 9:
        raise DataError(f"{str(labels_path)!r} holds label {labels.max()}; expected labels 0..9. "
                        "Fix: re-download the file")
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())


def load_mnist(path: str | None) -> ImageDataset:
    """60000 train / 10000 test grayscale 28x28 images as uint8 (N, 1, 28, 28)."""
    root = require_path(path, "mnist", EXPECTED)
    if not root.is_dir():
        raise DataError(f"--data {str(path)!r} is a file; expected {EXPECTED}. Fix: pass the folder, not a file")
    train, test = _read_split(root, *FILES[:2]), _read_split(root, *FILES[2:])
    size = train.x.shape[-1]
    if train.x.shape[1:] != (1, size, size) or test.x.shape[1:] != train.x.shape[1:]:
        raise DataError(f"--data {str(path)!r} has train images {tuple(train.x.shape[2:])} and test images "
                        f"{tuple(test.x.shape[2:])}; expected square images of one size. "
                        "Fix: re-download the MNIST files")
    return ImageDataset("mnist", train, test, num_classes=10, in_channels=1, image_size=size,
                        mean=MNIST_MEAN, std=MNIST_STD)
