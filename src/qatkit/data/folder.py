"""Image folders: `root/train/<class>/*.png|jpg|jpeg|bmp` and `root/test/<class>/...`, read with Pillow.

Classes are the sorted subfolder names of train, so label i is the i-th name (kept in the model's recipe: a
folder evaluated later must have the same classes). Images are kept as uint8 (16-bit grayscale scaled to 8 bits):
one channel if every image is grayscale, else RGB (grayscale ones are then replicated).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from qatkit.data.base import ImageDataset, Split, channel_stats, require_path
from qatkit.errors import DataError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
GRAY_MODES = ("1", "L", "LA")
EXPECTED = "a directory with train/<class>/*.png and test/<class>/*.png (also .jpg, .jpeg, .bmp)"


def _read_image(path: Path) -> np.ndarray:
    """(H, W) uint8 for a grayscale image (16-bit ones scaled to 8 bits: 65535 is 255), (H, W, 3) uint8 otherwise."""
    from PIL import Image  # imported here: only folder datasets need Pillow

    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # 16-bit grayscale ("I;16", or "I" as Pillow opens some PNGs)
                pixels = np.asarray(im).astype(np.int64)
                if pixels.min() >= 0 and pixels.max() <= 65535:
                    return np.rint(pixels / 257.0).astype(np.uint8)
            elif im.mode != "F":
                return np.asarray(im.convert("L" if im.mode in GRAY_MODES else "RGB"))
    except Exception as e:  # Pillow's decoders raise many types for a broken file; all mean a bad image
        raise DataError(f"{str(path)!r} cannot be read as an image ({e}); expected a {'/'.join(SUFFIXES)} file. "
                        "Fix: remove or replace the file") from e
    raise DataError(f"{str(path)!r} holds {im.mode!r} pixels (32-bit integers or floats); allowed: 8-bit (grayscale, "
                    "RGB, palette) or 16-bit grayscale images. Fix: save it as an 8- or 16-bit image")


def _list_split(split_dir: Path, classes: list[str], every_class: bool) -> list[tuple[Path, int]]:
    """(file, label) pairs, files sorted by name within a class, the classes taking turns (a class's first file, the
    next class's first, ...), so that the first N samples (--limit N) hold every class.

    every_class: each class folder must hold an image (train must; test may lack a class).
    """
    per_class = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (split_dir / cls).iterdir()  # (hidden files, macOS's ._x.png: tool litter)
                       if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        if not files and every_class:
            raise DataError(f"{str(split_dir / cls)!r} holds no {'/'.join(SUFFIXES)} images; expected at least one "
                            "per class. Fix: add images or remove the empty class folder")
        per_class.append([(f, label) for f in files])
    samples = [pair for turn in itertools.zip_longest(*per_class) for pair in turn if pair is not None]
    if not samples:
        raise DataError(f"{str(split_dir)!r} holds no {'/'.join(SUFFIXES)} images; expected {EXPECTED}. "
                        "Fix: add images to the class folders")
    return samples


def _classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        what = "is a file, not a folder" if split_dir.exists() else "does not exist"
        raise DataError(f"{str(split_dir)!r} {what}; expected {EXPECTED}. Fix: create it, one subfolder per class")
    # hidden folders (.ipynb_checkpoints, ...) are tool litter, not classes
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_folder(path: str | None) -> ImageDataset:
    """All images of root/train and root/test, which must share one square size and the same classes."""
    root = require_path(path, "folder", EXPECTED)
    if not root.is_dir():
        raise DataError(f"--data {str(path)!r} is a file, not a folder; expected {EXPECTED}. Fix: pass the folder "
                        "(unpack an archive first)")
    classes = _classes(root / "train")
    if not classes:
        raise DataError(f"{str(root / 'train')!r} has no class subfolders; expected {EXPECTED}. "
                        "Fix: put each class's images in its own subfolder")
    test_classes = _classes(root / "test")
    if test_classes != classes:
        raise DataError(f"{str(root / 'test')!r} has classes {test_classes}; expected the train classes "
                        f"{classes}. Fix: give test the same class subfolders as train")
    samples = {s: _list_split(root / s, classes, every_class=s == "train") for s in ("train", "test")}
    images = {s: [_read_image(f) for f, _ in pairs] for s, pairs in samples.items()}

    first_file, size = samples["train"][0][0], images["train"][0].shape[:2]  # (H, W)
    for s in images:
        for (f, _), im in zip(samples[s], images[s]):
            if im.shape[:2] != size:
                raise DataError(f"{str(f)!r} is {im.shape[1]}x{im.shape[0]} (WxH) but {str(first_file)!r} is "
                                f"{size[1]}x{size[0]}; expected one size for all images. Fix: resize the images")
    if size[0] != size[1]:
        raise DataError(f"{str(first_file)!r} is {size[1]}x{size[0]} (WxH); expected square images. "
                        "Fix: crop or resize the images to square")

    rgb = any(im.ndim == 3 for ims in images.values() for im in ims)
    splits = {}
    for s, ims in images.items():
        # (H, W) -> (H, W, 1) -> (H, W, 3 if any image is RGB); stacked to (N, H, W, C), then (N, C, H, W)
        ims = [np.repeat(im[..., None], 3 if rgb else 1, axis=2) if im.ndim == 2 else im for im in ims]
        x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor([label for _, label in samples[s]], dtype=torch.int64)
        splits[s] = Split(x, y)
    mean, std = channel_stats(splits["train"].x)
    return ImageDataset("folder", splits["train"], splits["test"], num_classes=len(classes),
                        in_channels=3 if rgb else 1, image_size=size[0], mean=mean, std=std, classes=tuple(classes))
