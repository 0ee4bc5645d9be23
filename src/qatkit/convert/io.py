"""Integer model files: one safetensors file whose metadata holds the graph as JSON. No pickle.

Loading checks a sha256 of the graph and the tensors (a damaged or edited file), the format, version, every op name
against the closed table of ops.py and every tensor reference, so a damaged or foreign file gives a clear error
instead of running anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from qatkit.convert import ops
from qatkit.convert.runtime import IntegerModel
from qatkit.errors import ConfigError, ModelFileError
from qatkit.fileio import atomic_file

FORMAT, VERSION = "qatkit-integer-model", 1
# The fields the runtime (runtime.py IntegerModel) reads, per op: a type, a tuple of alternatives, None, a dict
# (a nested mapping with these fields), a one-item list (a list of such items) or _REF (a {"tensor": str} reference).
_REF = object()
_Q = {"scale": _REF, "zero_point": int, "qmin": int, "qmax": int}
_NODE_FIELDS = {
    "input": {}, "output": {"args": list}, "constant": {"value": object}, "quantize": {"args": list, **_Q},
    "qlayer": {"args": list, "kind": str, "input": _Q, "output": (_Q, None), "weight": _REF, "weight_scale": _REF,
               "bias": (_REF, None)},
    "qembed": {"args": list, "bits": int, "shape": list, "weight": _REF, "weight_scale": _REF},
    "qadd": {"args": list, "inputs": [_Q], "output": _Q}, "qpool": {"args": list, "inputs": [_Q], "output": _Q},
    "qmatmul": {"args": list, "inputs": [_Q], "output": _Q},
    "call": {"fn": str, "args": list, "kwargs": dict},
}
_NODE_OPS = set(_NODE_FIELDS)


def _fits(value, spec) -> bool:
    """Whether `value` has the shape `spec` describes (see _NODE_FIELDS)."""
    if spec is None or spec is _REF:
        return value is None if spec is None else isinstance(value, dict) and isinstance(value.get("tensor"), str)
    if isinstance(spec, tuple):
        return any(_fits(value, s) for s in spec)
    if isinstance(spec, dict):
        return isinstance(value, dict) and all(k in value and _fits(value[k], s) for k, s in spec.items())
    if isinstance(spec, list):
        return isinstance(value, list) and all(_fits(v, spec[0]) for v in value)
    return isinstance(value, spec)


def _digest(header: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the graph's JSON and of every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256(header.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save(model: IntegerModel, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file, fsync, rename), with a sha256 of the graph and tensors that `load` checks;
    returns the path."""
    if not isinstance(model, IntegerModel):
        raise ConfigError(f"save writes integer models, not a {type(model).__name__}; allowed: qatkit.convert's "
                          "result. Fix: qatkit.save(qatkit.convert(qat_model), path) (a QAT model's weights: "
                          "torch.save(model.state_dict(), path))")
    header = json.dumps({"format": FORMAT, "version": VERSION, "nodes": model.nodes, "meta": model.meta})
    tensors = {k: t.contiguous() for k, t in model.named_tensors().items()}
    with atomic_file(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"qatkit": header, "qatkit_sha256": _digest(header, tensors)})
        except SafetensorError as e:  # (its I/O errors as the OSError they are, for atomic_file's message)
            if code := re.search(r"os error (\d+)", str(e)):
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
            raise
    return Path(path)


def _fail(path, what: str) -> ModelFileError:
    return ModelFileError(f"model file {str(path)!r} {what}. Fix: pass a file written by qatkit convert (qatkit.save)")


def _check_refs(value, tensors, defined: set[str], path) -> None:
    """Every tensor reference names a stored tensor; every node reference an earlier node."""
    if isinstance(value, dict):
        if "tensor" in value and (not isinstance(value["tensor"], str) or value["tensor"] not in tensors):
            raise _fail(path, f"refers to tensor {value['tensor']!r}, which it does not contain")
        if "node" in value and (not isinstance(value["node"], str) or value["node"] not in defined):
            raise _fail(path, f"refers to node {value['node']!r} before defining it")
        if "torch_dtype" in value and (not isinstance(value["torch_dtype"], str) or value["torch_dtype"] not in ops.DTYPES):
            raise _fail(path, f"names dtype {value['torch_dtype']!r}; allowed: {', '.join(ops.DTYPES)}")
        for v in value.values():
            _check_refs(v, tensors, defined, path)
    elif isinstance(value, list):
        for v in value:
            _check_refs(v, tensors, defined, path)


def load(path: str | os.PathLike) -> IntegerModel:
    """Read an integer model file written by `save`."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "is a folder" if path.is_dir() else "does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(path, f"is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if "qatkit_sha256" in metadata and "qatkit" in metadata and (  # (files written before it have none)
            metadata["qatkit_sha256"] != _digest(metadata["qatkit"], tensors)):
        raise _fail(path, "has a sha256 checksum mismatch: its tensors or graph were changed (damaged or edited)")
    try:
        header = json.loads(metadata["qatkit"])
    except (KeyError, json.JSONDecodeError):
        raise _fail(path, "has no qatkit graph in its metadata") from None
    except RecursionError:
        raise _fail(path, "has a qatkit graph nested too deeply") from None
    try:
        meta = _check_header(header, tensors, path)
    except RecursionError:
        raise _fail(path, "has a qatkit graph nested too deeply") from None
    return IntegerModel(header["nodes"], tensors, meta)


def _check_header(header, tensors, path) -> dict:
    """Check the graph against the format, the op table and the fields the runtime reads; returns the meta."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _fail(path, f"has format {header.get('format') if isinstance(header, dict) else header!r}, not {FORMAT!r}")
    if header.get("version") != VERSION:
        raise _fail(path, f"has version {header.get('version')!r}; this qatkit reads version {VERSION}")
    nodes, meta = header.get("nodes"), header.get("meta")
    if not isinstance(nodes, list) or not nodes:
        raise _fail(path, "has no graph nodes")
    if meta is not None and not isinstance(meta, dict):
        raise _fail(path, f"has meta of type {type(meta).__name__}, not a mapping")
    defined: set[str] = set()
    for node in nodes:
        op = node.get("op") if isinstance(node, dict) else None
        if not isinstance(op, str) or op not in _NODE_OPS or not isinstance(node.get("name"), str):
            raise _fail(path, f"has a node {str(node)[:80]!r} of unknown kind")
        bad = [k for k, spec in _NODE_FIELDS[op].items() if k not in node or not _fits(node[k], spec)]
        if bad:
            raise _fail(path, f"has a {op} node {node['name']!r} without a valid {bad[0]!r} field")
        if op in ("output", "quantize", "qlayer", "qembed", "qpool") and not node["args"] or op in ("qadd", "qmatmul") and len(node["args"]) != 2:
            raise _fail(path, f"has a {op} node {node['name']!r} with args {node['args']!r:.80}")
        fn = node.get("fn")
        if op == "call" and not (fn == "identity" or fn in (ops.METHODS if node.get("method") else ops.FUNCTIONS)):
            raise _fail(path, f"calls {fn!r}, which is not an operation qatkit runs")
        if op == "call" and fn == ops.GETATTR and (len(node["args"]) != 2 or node["args"][1] not in ops.ATTRIBUTES):
            raise _fail(path, f"calls {fn!r} for attribute {node['args'][1:]!r:.80}; only {ops.ATTRIBUTES} may be read")
        _check_refs({k: v for k, v in node.items() if k != "name"}, tensors, defined, path)
        defined.add(node["name"])
    ops_in_order = [node["op"] for node in nodes]
    if not ops_in_order.count("input"):
        raise _fail(path, "has no input node")
    for node in nodes:
        sizes = node.get("sizes") if node["op"] == "input" else None
        if sizes is not None and not (isinstance(sizes, list) and all(
                n is None or type(n) is int and n > 0 for n in sizes)):
            raise _fail(path, f"has input {node['name']!r} with sizes {sizes!r:.80}; allowed: a list of positive "
                              "integers and nulls")
    if bad := [n for n in nodes if n["op"] == "input" and n.get("kind", "float") not in ("float", "integer")]:
        raise _fail(path, f"has input {bad[0]['name']!r} of kind {bad[0]['kind']!r:.40}; allowed: float, integer")
    arguments = [node.get("argument", node["name"]) for node in nodes if node["op"] == "input"]
    if not all(isinstance(a, str) for a in arguments) or len(set(arguments)) != len(arguments):
        raise _fail(path, f"has input nodes named {arguments!r:.80}; each input needs its own name")
    if ops_in_order.count("output") != 1 or ops_in_order[-1] != "output":
        raise _fail(path, "does not end with its one output node")
    output = nodes[-1]
    if "names" in output and not (isinstance(output["names"], list) and isinstance(output["args"][0], list)
                                  and len(output["names"]) == len(output["args"][0]) == len(set(output["names"]))
                                  and all(isinstance(n, str) for n in output["names"])):
        raise _fail(path, f"names its outputs {output['names']!r:.80}; a dict output needs one distinct name for each")
    return meta or {}


def model_bytes(path: str | os.PathLike) -> int:
    return Path(path).stat().st_size


__all__ = ["load", "model_bytes", "save"]
