"""Integer model files: one safetensors file whose metadata holds the graph as JSON. No pickle.

Loading checks the format, version, every op name against the closed table of ops.py and every
tensor reference, so a damaged or foreign file gives a clear error instead of running anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from qatkit.convert import ops
from qatkit.convert.runtime import IntegerModel
from qatkit.errors import ModelFileError
from qatkit.fileio import atomic_file

FORMAT, VERSION = "qatkit-integer-model", 1
_NODE_OPS = {"input", "output", "constant", "quantize", "qlayer", "qadd", "qpool", "call"}


def save(model: IntegerModel, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file, fsync, rename); returns the path."""
    header = json.dumps({"format": FORMAT, "version": VERSION, "nodes": model.nodes, "meta": model.meta})
    with atomic_file(path) as tmp:
        save_file({k: t.contiguous() for k, t in model.named_tensors().items()}, str(tmp), metadata={"qatkit": header})
    return Path(path)


def _fail(path, what: str) -> ModelFileError:
    return ModelFileError(f"model file {str(path)!r} {what}. Fix: pass a file written by qatkit convert (qatkit.save)")


def _check_refs(value, tensors, defined: set[str], path) -> None:
    """Every tensor reference names a stored tensor; every node reference an earlier node."""
    if isinstance(value, dict):
        if "tensor" in value and value["tensor"] not in tensors:
            raise _fail(path, f"refers to tensor {value['tensor']!r}, which it does not contain")
        if "node" in value and value["node"] not in defined:
            raise _fail(path, f"refers to node {value['node']!r} before defining it")
        for v in value.values():
            _check_refs(v, tensors, defined, path)
    elif isinstance(value, list):
        for v in value:
            _check_refs(v, tensors, defined, path)


def load(path: str | os.PathLike) -> IntegerModel:
    """Read an integer model file written by `save`."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(path, f"is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    try:
        header = json.loads(metadata["qatkit"])
    except (KeyError, json.JSONDecodeError):
        raise _fail(path, "has no qatkit graph in its metadata") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _fail(path, f"has format {header.get('format') if isinstance(header, dict) else header!r}, not {FORMAT!r}")
    if header.get("version") != VERSION:
        raise _fail(path, f"has version {header.get('version')!r}; this qatkit reads version {VERSION}")
    nodes = header.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise _fail(path, "has no graph nodes")
    defined: set[str] = set()
    for node in nodes:
        if not isinstance(node, dict) or node.get("op") not in _NODE_OPS or not isinstance(node.get("name"), str):
            raise _fail(path, f"has a node {str(node)[:80]!r} of unknown kind")
        fn = node.get("fn")
        if node["op"] == "call" and not (fn == "identity" or fn in (ops.METHODS if node.get("method") else ops.FUNCTIONS)):
            raise _fail(path, f"calls {fn!r}, which is not an operation qatkit runs")
        if fn == ops.GETATTR and (len(node.get("args", [])) != 2 or node["args"][1] != "shape"):
            attr = node.get("args", [None, None])[1:]
            raise _fail(path, f"calls {fn!r} for attribute {attr!r}; only 'shape' may be read")
        node_fields = {k: v for k, v in node.items() if k != "name"}
        _check_refs(node_fields, tensors, defined, path)
        defined.add(node["name"])
    return IntegerModel(nodes, tensors, header.get("meta"))


def model_bytes(path: str | os.PathLike) -> int:
    return Path(path).stat().st_size


__all__ = ["load", "model_bytes", "save"]
