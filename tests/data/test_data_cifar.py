"""CIFAR-10: the real tarball (read in place), every accepted layout, and pickles that must be refused."""
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_data

from qatkit.data import load_dataset
from qatkit.errors import DataError

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def test_real_cifar10_from_tarball():
    ds = load_dataset("cifar10", str(shared_data("cifar10", "cifar-10-python.tar.gz")))
    assert ds.train.x.shape == (50000, 3, 32, 32) and ds.test.x.shape == (10000, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert ds.train.y.bincount().tolist() == [5000] * 10 and ds.test.y.bincount().tolist() == [1000] * 10
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 3, 32)
    # order-independent digests published in the data's SOURCE.md: sha256 over sorted sha256(label + row)
    for split, expected in [(ds.train, "c184bacd98362262b137a81143464df1ec411af501e82a5e407fe8e0b2b7ae86"),
                            (ds.test, "f72c9f40d8298ab84be545be2599e450e859fba31733e410b95783c11207d32e")]:
        rows = split.x.reshape(len(split), -1).numpy()
        digests = sorted(hashlib.sha256(bytes([label]) + row.tobytes()).hexdigest()
                         for label, row in zip(split.y.tolist(), rows))
        assert hashlib.sha256("".join(digests).encode()).hexdigest() == expected
    # SOURCE.md spot checks (first and last 3 bytes of a row): channel-major planes, R first, B last
    assert ds.train.x[15263, 0, 0, :3].tolist() == [59, 43, 50] and ds.train.y[15263] == 6  # a frog
    assert ds.train.x[15263, 2, 31, -3:].tolist() == [140, 84, 72]
    assert ds.test.x[969, 0, 0, :3].tolist() == [158, 159, 165] and ds.test.y[969] == 3  # a cat


def _batch(n: int, seed: int) -> tuple[bytes, np.ndarray, list]:
    """A valid CIFAR-style pickle with n random images.

    Default protocol: Python 3's protocol 2 stores bytes via _codecs.encode, which the loader refuses
    (the original files are Python 2 pickles and need no such global).
    """
    rng = np.random.default_rng(seed)
    data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
    return pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": labels}), data, labels


def _write_dir(root: Path, blobs: dict) -> Path:
    root.mkdir(parents=True)
    for name, blob in blobs.items():
        (root / name).write_bytes(blob)
    return root


def _write_tar(path: Path, blobs: dict) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def tiny_blobs():
    batches = {name: _batch(4, seed) for seed, name in enumerate(BATCHES)}
    return {name: b[0] for name, b in batches.items()}, batches


@pytest.mark.parametrize("layout", ["batches-dir", "parent-of-dir", "tarball", "parent-of-tarball"])
def test_every_layout_loads_the_same(tmp_path, tiny_blobs, layout):
    blobs, batches = tiny_blobs
    if layout.endswith("dir"):
        _write_dir(tmp_path / "cifar-10-batches-py", blobs)
        path = tmp_path / "cifar-10-batches-py" if layout == "batches-dir" else tmp_path
    else:
        _write_tar(tmp_path / "cifar-10-python.tar.gz", blobs)
        path = tmp_path / "cifar-10-python.tar.gz" if layout == "tarball" else tmp_path
    ds = load_dataset("cifar10", str(path))
    assert ds.train.x.shape == (20, 3, 32, 32) and ds.test.x.shape == (4, 3, 32, 32)
    _, data, labels = batches["data_batch_2"]
    assert torch.equal(ds.train.x[4:8], torch.from_numpy(data).reshape(4, 3, 32, 32))
    assert ds.train.y[4:8].tolist() == labels


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpensFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("evil", [_RunsCommand, _OpensFile])
@pytest.mark.parametrize("container", ["dir", "tarball"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, tiny_blobs, evil, container):
    marker = tmp_path / "pwned"
    blobs = dict(tiny_blobs[0])
    # hidden inside an otherwise valid batch, where a loader would look for the data
    blobs["data_batch_1"] = pickle.dumps({b"data": evil(marker), b"labels": [0]})
    path = (_write_dir(tmp_path / "cifar-10-batches-py", blobs) if container == "dir"
            else _write_tar(tmp_path / "cifar-10-python.tar.gz", blobs))
    with pytest.raises(DataError, match=r"data_batch_1.*refers to (posix|os|nt|io|builtins)\.(system|open)"):
        load_dataset("cifar10", str(path))
    assert not marker.exists()


@pytest.mark.parametrize("blob", [b"not a pickle", pickle.dumps([1, 2, 3]),
                                  pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}),
                                  pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
                                  pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:-30]],
                         ids=["garbage", "list", "wrong-shape", "label-10", "truncated"])
def test_wrong_batch_contents_are_data_errors(tmp_path, tiny_blobs, blob):
    blobs = dict(tiny_blobs[0], test_batch=blob)
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", str(_write_dir(tmp_path / "cifar-10-batches-py", blobs)))


def test_broken_tarball_and_missing_batch_are_data_errors(tmp_path, tiny_blobs):
    blobs = tiny_blobs[0]
    tar = _write_tar(tmp_path / "cifar-10-python.tar.gz", blobs)
    tar.write_bytes(tar.read_bytes()[:200])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz.*cannot be read"):
        load_dataset("cifar10", str(tar))
    partial = {k: v for k, v in blobs.items() if k != "data_batch_3"}
    with pytest.raises(DataError, match="has no data_batch_3"):
        load_dataset("cifar10", str(_write_tar(tmp_path / "partial.tar.gz", partial)))
    with pytest.raises(DataError, match="has no data_batch_3"):
        load_dataset("cifar10", str(_write_dir(tmp_path / "cifar-10-batches-py", partial)))


def test_folder_without_cifar_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="holds no CIFAR-10 batches"):
        load_dataset("cifar10", str(tmp_path))
