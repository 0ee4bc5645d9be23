"""Training checkpoints: one file, written atomically, checksummed, and loaded without running code.

File format: the bytes of `torch.save(state)`, then a trailer of MAGIC and the sha256 of those bytes.
Loading checks the trailer and the checksum before anything is unpickled, then unpickles with
`weights_only=True`, which only builds tensors and plain data, so a crafted file cannot run code.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from qatkit.errors import ModelFileError
from qatkit.fileio import atomic_file

MAGIC = b"QATKIT-CKPT-v1\x00\n"  # 16 bytes
DIGEST_SIZE = hashlib.sha256().digest_size  # 32
TRAILER_SIZE = len(MAGIC) + DIGEST_SIZE
_FIX = ("pass a checkpoint qatkit wrote (the qat_*.ckpt of qatkit train or run); for a damaged one, restore an intact "
        "copy or re-run the training")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` (tensors, nested dicts/lists of them, plain data) to `path` atomically.

    The bytes go to a temporary file in the same folder, which is flushed, fsynced and renamed over
    `path`; the folder is fsynced too. A crash leaves either the old file or the new one, never a mix.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    with atomic_file(path) as tmp:
        tmp.write_bytes(payload + MAGIC + hashlib.sha256(payload).digest())
    return Path(path)


def _bad(path: Path, what: str) -> ModelFileError:
    return ModelFileError(f"checkpoint {str(path)!r} {what}; allowed: a complete file written by qatkit's "
                          f"save_checkpoint. Fix: {_FIX}")


def _payload(path: Path) -> bytes:
    """The torch.save bytes of a checkpoint file, after checking its trailer and checksum."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise ModelFileError(f"checkpoint {str(path)!r} {what}; allowed: an existing checkpoint file. Fix: check the "
                             "path (resuming: start without --resume)")
    data = path.read_bytes()
    if len(data) < TRAILER_SIZE:
        raise _bad(path, f"is truncated: {len(data)} bytes, less than its {TRAILER_SIZE}-byte trailer")
    payload, magic, digest = data[:-TRAILER_SIZE], data[-TRAILER_SIZE:-DIGEST_SIZE], data[-DIGEST_SIZE:]
    if magic != MAGIC:
        if MAGIC in data:  # the trailer is there but not at the end: bytes were cut off
            raise _bad(path, "is truncated: its trailer is cut off")
        raise _bad(path, f"has the wrong magic {magic!r} where {MAGIC!r} ends the file: it is truncated "
                         "or not a qatkit checkpoint")
    if hashlib.sha256(payload).digest() != digest:
        raise _bad(path, "has a sha256 checksum mismatch: its bytes were changed (corrupted)")
    return payload


def _refusal_reason(e: Exception) -> str:
    """The short reason in torch's weights_only error (not its advice to load with weights_only=False)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
    return found.group(1).strip().split(". ")[0][:200] if found else "a global or opcode outside tensors and plain data"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; tensors are loaded onto the CPU.

    Raises ModelFileError naming the path for a missing, truncated, corrupted or foreign file, and for
    a payload that would need code to unpickle (weights_only=True refuses it).
    """
    path = Path(path)
    payload = _payload(path)
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise _bad(path, "holds objects that only code could rebuild, refused by weights_only loading "
                         f"({_refusal_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - a damaged payload breaks the unpickler in many ways (IndexError, ...)
        raise _bad(path, f"has a checksum-valid payload torch.load cannot read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise _bad(path, f"holds a {type(state).__name__}, not a dict of training state")
    return state
