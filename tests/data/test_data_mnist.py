"""MNIST IDX parsing: the real files (read in place) and small crafted ones for every failure."""
import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_data

from qatkit.data import load_dataset
from qatkit.errors import DataError


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", str(shared_data("mnist")))


def test_real_mnist_shapes_labels_and_stats(mnist):
    assert mnist.train.x.shape == (60000, 1, 28, 28) and mnist.test.x.shape == (10000, 1, 28, 28)
    assert mnist.train.x.dtype == torch.uint8 and mnist.train.y.dtype == torch.int64
    assert (mnist.num_classes, mnist.in_channels, mnist.image_size) == (10, 1, 28)
    assert (mnist.mean, mnist.std) == ((0.1307,), (0.3081,))
    # histograms published in the data's SOURCE.md
    assert mnist.train.y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert mnist.test.y.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_pixels_are_exact(mnist):
    # pixel sums computed once with np.frombuffer(gzip.open(f).read(), np.uint8, offset=16).sum()
    assert mnist.train.x.sum(dtype=torch.int64).item() == 1567298545
    assert mnist.test.x.sum(dtype=torch.int64).item() == 264923200
    # header + pixels must hash to the widely cited MD5 of the uncompressed train-images file
    header = struct.pack(">IIII", 2051, 60000, 28, 28)
    assert hashlib.md5(header + mnist.train.x.numpy().tobytes()).hexdigest() == "6bbc9ace898e44ae57da46a324031adb"


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def tiny_mnist(tmp_path):
    """5 train / 3 test random 28x28 images; train gzipped, test not (both name forms are accepted)."""
    rng = np.random.default_rng(0)
    parts = {"train": 5, "t10k": 3}
    for prefix, n in parts.items():
        suffix = ".gz" if prefix == "train" else ""
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", 2051, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", 2049, rng.integers(0, 10, n))
    return tmp_path


def test_tiny_idx_loads_gz_and_plain(tiny_mnist):
    ds = load_dataset("mnist", str(tiny_mnist))
    assert ds.train.x.shape == (5, 1, 28, 28) and ds.test.x.shape == (3, 1, 28, 28)
    raw = np.frombuffer((tiny_mnist / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16)
    assert np.array_equal(ds.test.x.numpy().ravel(), raw)


def test_truncated_idx_is_a_data_error_naming_the_file(tiny_mnist):
    path = tiny_mnist / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", str(tiny_mnist))


def test_truncated_gzip_is_a_data_error_naming_the_file(tiny_mnist):
    path = tiny_mnist / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz") as info:
        load_dataset("mnist", str(tiny_mnist))
    assert info.value.__cause__ is not None  # chained from gzip's own error


def test_wrong_magic_is_a_data_error(tiny_mnist):
    # a label file where the images should be
    (tiny_mnist / "t10k-images-idx3-ubyte").write_bytes((tiny_mnist / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DataError, match="magic number 2049; expected 2051"):
        load_dataset("mnist", str(tiny_mnist))


def test_missing_file_is_a_data_error_naming_it(tiny_mnist):
    (tiny_mnist / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", str(tiny_mnist))


def test_label_count_mismatch_is_a_data_error(tiny_mnist):
    _write_idx(tiny_mnist / "t10k-labels-idx1-ubyte", 2049, np.zeros(2))
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load_dataset("mnist", str(tiny_mnist))
