"""CIFAR-10 in its python format: `cifar-10-batches-py/` or `cifar-10-python.tar.gz`, read in place.

Each batch is a pickle of {b"data": (10000, 3072) uint8 array, channel-major R, G, B planes of
32x32, b"labels": list of ints}. Pickles can run arbitrary code, so they are read only with
`SafeUnpickler`, which resolves just the three numpy globals such an array needs.
"""
from __future__ import annotations

import gzip
import io
import pickle
import posixpath
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from qatkit.data.base import ImageDataset, Split, require_path
from qatkit.errors import DataError

try:  # numpy >= 2 keeps _reconstruct in numpy._core; numpy 1.x in numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

DIR_NAME, TAR_NAME = "cifar-10-batches-py", "cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
EXPECTED = f"a {DIR_NAME} directory, a directory containing it, or {TAR_NAME} (or a directory containing that)"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # published train-split statistics

# What a pickled ndarray refers to: written by numpy 1.x (numpy.core) or 2.x (numpy._core).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that refuses every global except those numpy arrays are rebuilt from."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"{self.source!r} refers to {module}.{name}; a CIFAR-10 batch may refer only to numpy "
                            "array globals. Fix: use the official CIFAR-10 python files; this one may be "
                            "malicious") from None


def _parse_batch(blob: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> images (n, 3, 32, 32) uint8, labels (n,) int64."""
    try:
        batch = SafeUnpickler(io.BytesIO(blob), source).load()
        data, labels = batch[b"data"], np.asarray(batch[b"labels"], dtype=np.int64)
    except DataError:
        raise
    except Exception as e:  # untrusted bytes: any failure inside pickle or numpy means a bad file
        raise DataError(f"{source!r} is not a CIFAR-10 batch ({type(e).__name__}: {e}); expected a pickled dict "
                        "with b'data' and b'labels'. Fix: re-download the CIFAR-10 python version") from e
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and labels.shape == (len(data),) and labels.min(initial=0) >= 0 and labels.max(initial=0) <= 9):
        raise DataError(f"{source!r} holds data {getattr(data, 'shape', type(data).__name__)} and "
                        f"{labels.size} labels; expected (n, 3072) uint8 and n labels in 0..9. "
                        "Fix: re-download the CIFAR-10 python version")
    return data.reshape(-1, 3, 32, 32), labels


def _read_dir(root: Path) -> dict[str, bytes]:
    blobs = {}
    for name in TRAIN_FILES + TEST_FILES:
        if not (root / name).is_file():
            raise DataError(f"{str(root)!r} has no {name}; expected {', '.join(TRAIN_FILES + TEST_FILES)}. "
                            "Fix: re-extract the CIFAR-10 python version")
        blobs[name] = (root / name).read_bytes()
    return blobs


def _read_tar(path: Path) -> dict[str, bytes]:
    """Read the batch members in one sequential pass over the (compressed) tarball; nothing is extracted. A gzip
    stream is read to its end, where its CRC is checked (tarfile's stream mode never checks it: a flipped byte
    loaded as a changed pixel)."""
    blobs = {}
    try:
        with open(path, "rb") as raw:
            gz = gzip.GzipFile(fileobj=raw) if raw.read(2) == b"\x1f\x8b" else None
            raw.seek(0)
            with tarfile.open(fileobj=gz or raw, mode="r|" if gz else "r|*") as tar:
                for member in tar:
                    name = posixpath.basename(member.name)
                    if member.isfile() and name in TRAIN_FILES + TEST_FILES:
                        blobs[name] = tar.extractfile(member).read()
            while gz is not None and gz.read(1 << 20):  # (the tar's end padding; then the CRC check)
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{str(path)!r} cannot be read as a tarball ({e}); expected {TAR_NAME}. "
                        "Fix: re-download it") from e
    missing = [n for n in TRAIN_FILES + TEST_FILES if n not in blobs]
    if missing:
        raise DataError(f"{str(path)!r} has no {', '.join(missing)}; expected the members of {TAR_NAME}. "
                        "Fix: re-download it")
    return blobs


def _read_any(root: Path) -> tuple[dict[str, bytes], Path]:
    """Find the batches under any of the accepted layouts; return them and where they came from."""
    if root.is_file():
        return _read_tar(root), root
    for candidate in (root, root / DIR_NAME):
        if (candidate / TRAIN_FILES[0]).is_file():
            return _read_dir(candidate), candidate
    if (root / TAR_NAME).is_file():
        return _read_tar(root / TAR_NAME), root / TAR_NAME
    raise DataError(f"--data {str(root)!r} holds no CIFAR-10 batches; expected {EXPECTED}. "
                    "Fix: pass --data pointing to the CIFAR-10 python version")


def _stack(blobs: dict[str, bytes], names: tuple[str, ...], where: Path) -> Split:
    parts = [_parse_batch(blobs[n], f"{where}:{n}" if where.is_file() else str(where / n)) for n in names]
    x = np.concatenate([p[0] for p in parts])  # (N, 3, 32, 32)
    y = np.concatenate([p[1] for p in parts])  # (N,)
    return Split(torch.from_numpy(x), torch.from_numpy(y))


def load_cifar10(path: str | None) -> ImageDataset:
    """50000 train / 10000 test RGB 32x32 images as uint8 (N, 3, 32, 32)."""
    blobs, where = _read_any(require_path(path, "cifar10", EXPECTED))
    train, test = _stack(blobs, TRAIN_FILES, where), _stack(blobs, TEST_FILES, where)
    return ImageDataset("cifar10", train, test, num_classes=10, in_channels=3, image_size=32,
                        mean=CIFAR_MEAN, std=CIFAR_STD)
