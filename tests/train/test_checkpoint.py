"""Checkpoint files: atomic writes, and every damaged or crafted file refused with ModelFileError."""
from __future__ import annotations

import hashlib
import io
import os
import pickle

import pytest
import torch

from qatkit.errors import ModelFileError
from qatkit.train import checkpoint as ckpt
from qatkit.train import load_checkpoint, save_checkpoint


def _state() -> dict:
    return {
        "model": {"fc.weight": torch.randn(3, 4), "fc.bias": torch.zeros(3), "n": torch.tensor(7)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "epoch": 2,
        "history": [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25}],
        "config": {"lr": 1e-3, "scale_lr": None, "optimizer": "adamw", "progress": True},
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _with_trailer(payload: bytes, magic: bytes = ckpt.MAGIC) -> bytes:
    return payload + magic + hashlib.sha256(payload).digest()


def test_round_trip(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "a.ckpt", state)
    _assert_same(state, load_checkpoint(path))


def test_file_is_payload_plus_trailer(tmp_path):
    path = save_checkpoint(tmp_path / "a.ckpt", _state())
    data = path.read_bytes()
    payload = data[:-ckpt.TRAILER_SIZE]
    assert data[-ckpt.TRAILER_SIZE:] == ckpt.MAGIC + hashlib.sha256(payload).digest()
    assert torch.load(io.BytesIO(payload), weights_only=True)["epoch"] == 2


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "run" / "last.ckpt"  # the folder is created
    for epoch in range(3):
        save_checkpoint(path, {**_state(), "epoch": epoch})
    assert os.listdir(path.parent) == ["last.ckpt"]
    assert load_checkpoint(path)["epoch"] == 2


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, fail_at):
    path = save_checkpoint(tmp_path / "last.ckpt", {**_state(), "epoch": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, fail_at, boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**_state(), "epoch": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert load_checkpoint(path)["epoch"] == 1


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match=r"nope\.ckpt' does not exist.*Fix:"):
        load_checkpoint(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("keep", [0.5, -10, 5, 0])
def test_truncated_file(tmp_path, keep):
    path = save_checkpoint(tmp_path / "a.ckpt", _state())
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:n])
    with pytest.raises(ModelFileError, match=r"a\.ckpt' .*truncated.*Fix: pass a checkpoint qatkit wrote"):
        load_checkpoint(path)


@pytest.mark.parametrize("where", [0, 100, -ckpt.TRAILER_SIZE - 1, -1])
def test_flipped_byte_fails_the_checksum(tmp_path, where):
    path = save_checkpoint(tmp_path / "a.ckpt", _state())
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"a\.ckpt' has a sha256 checksum mismatch.*Fix:"):
        load_checkpoint(path)


def test_wrong_magic(tmp_path):
    buf = io.BytesIO()
    torch.save(_state(), buf)
    path = tmp_path / "a.ckpt"
    path.write_bytes(_with_trailer(buf.getvalue(), magic=b"NOT-QATKIT-CKPT!"))
    with pytest.raises(ModelFileError, match=r"a\.ckpt' has the wrong magic b'NOT-QATKIT-CKPT!'.*Fix:"):
        load_checkpoint(path)


def test_plain_torch_save_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(_state(), path)
    with pytest.raises(ModelFileError, match="wrong magic"):
        load_checkpoint(path)


def test_valid_trailer_over_garbage(tmp_path):
    path = tmp_path / "a.ckpt"
    path.write_bytes(_with_trailer(b"this is not a torch file"))
    with pytest.raises(ModelFileError, match="torch.load cannot read"):
        load_checkpoint(path)


def test_non_dict_state_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save([torch.ones(2)], buf)
    path = tmp_path / "a.ckpt"
    path.write_bytes(_with_trailer(buf.getvalue()))
    with pytest.raises(ModelFileError, match="holds a list, not a dict"):
        load_checkpoint(path)


class _Exploit:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _torch_payload(obj) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": obj}, buf)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("make_payload", [_torch_payload, pickle.dumps], ids=["torch-zip", "raw-pickle"])
def test_crafted_pickle_never_runs(tmp_path, make_payload):
    # the payload really is an exploit: unrestricted unpickling creates the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Exploit(str(probe)))).close()
    assert probe.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(_with_trailer(make_payload(_Exploit(str(marker)))))
    with pytest.raises(ModelFileError, match=r"evil\.ckpt' holds objects that only code could rebuild.*weights_only"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_prepared_model_saved_whole_loads_and_computes_the_same():
    """torch.save(qat_model) failed ('str' object has no attribute '__name__') on the string annotations fx keeps
    from a forward written under `from __future__ import annotations` (as the zoo's are). (A whole-model pickle is
    the user's own file here; qatkit's checkpoints hold state dicts.)"""
    import qatkit
    from qatkit.models import SmallCNN

    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    qat = qatkit.prepare(SmallCNN(1, 10, width=8), qatkit.QATConfig(weight_bits=4, act_bits=4), x[:2])
    qatkit.calibrate(qat, [x])
    buffer = io.BytesIO()
    torch.save(qat, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert torch.equal(again.eval()(x), qat.eval()(x))
    assert torch.equal(qatkit.convert(again)(x), qat(x))
