"""Integer model files: save/load round trip, atomic writes, and every way a file can be wrong."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import qatkit
from qatkit.convert.io import FORMAT, VERSION
from qatkit.errors import ModelFileError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.randn(6, 1, 8, 8)


@pytest.fixture(scope="module")
def integer_model(x):
    torch.manual_seed(0)
    cfg = qatkit.QATConfig(weight_bits=4, act_bits=4, first_last_bits=None, rules=[qatkit.LayerRule(pattern="fc", weight_bits=2)])
    qat = qatkit.prepare(Net(), cfg, x[:2])
    qatkit.calibrate(qat, [x])
    qat.eval()
    return qatkit.convert(qat)


@pytest.fixture
def saved(integer_model, tmp_path) -> Path:
    return qatkit.save(integer_model, tmp_path / "model.safetensors")


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return json.loads(meta["qatkit"]), load_file(str(path))


def rewrite(path: Path, header, tensors: dict[str, torch.Tensor], raw: str | None = None) -> Path:
    out = path.with_name("edited.safetensors")
    save_file(tensors, str(out), metadata={"qatkit": raw if raw is not None else json.dumps(header)})
    return out


def fails(path: Path, what: str):
    return pytest.raises(ModelFileError, match=rf"^model file {re.escape(repr(str(path)))} {what}\. Fix: pass a file written by qatkit")


# ---- round trip -----------------------------------------------------------------------------------------
def test_save_load_round_trip(integer_model, saved, x):
    loaded = qatkit.load(saved)
    assert loaded.nodes == integer_model.nodes
    assert loaded.meta == integer_model.meta
    a, b = integer_model.named_tensors(), loaded.named_tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(loaded(x), integer_model(x))


def test_file_content(saved):
    header, tensors = read(saved)
    assert header["format"] == FORMAT == "qatkit-integer-model" and header["version"] == VERSION == 1
    assert {n["op"] for n in header["nodes"]} == {"input", "quantize", "qlayer", "call", "output"}
    assert tensors["conv.weight"].dtype == torch.uint8 and tensors["conv.weight"].numel() == 4 * 9 // 2  # int4 packed
    assert tensors["fc.weight"].dtype == torch.uint8 and tensors["fc.weight"].numel() == 3 * 64 // 4  # int2 packed
    qlayers = {n["name"]: n for n in header["nodes"] if n["op"] == "qlayer"}
    assert qlayers["conv"]["bits"] == 4 and qlayers["fc"]["bits"] == 2 and qlayers["conv"]["shape"] == [4, 1, 3, 3]
    assert tensors["conv.bias"].dtype == torch.int32 and tensors["fc.bias"].dtype == torch.int32
    assert [r["name"] for r in header["meta"]["layers"]] == ["conv", "fc"]


def test_save_leaves_no_temporary_file(integer_model, tmp_path):
    path = qatkit.save(integer_model, tmp_path / "m.safetensors")
    assert path == tmp_path / "m.safetensors"
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    qatkit.save(integer_model, path)  # overwriting is atomic too
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_failed_save_leaves_no_temporary_file(integer_model, tmp_path, monkeypatch):
    import errno

    import qatkit.fileio

    def fails(src, dst):  # (the rename fails after the temporary file was written)
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(qatkit.fileio.os, "replace", fails)
    with pytest.raises(OSError):
        qatkit.save(integer_model, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_accepts_str_paths(integer_model, tmp_path, x):
    path = qatkit.save(integer_model, str(tmp_path / "s.safetensors"))
    assert isinstance(path, Path) and torch.equal(qatkit.load(str(path))(x), integer_model(x))


# ---- broken files ---------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with fails(path, "does not exist"):
        qatkit.load(path)


def test_directory_is_not_a_model_file(tmp_path):
    with fails(tmp_path, "is a folder"):
        qatkit.load(tmp_path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    with fails(path, r"is not a readable safetensors file \(.+\)"):
        qatkit.load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with fails(path, r"is not a readable safetensors file \(.+\)"):
        qatkit.load(path)


@pytest.mark.parametrize("cut", ["4 bytes", "8 bytes", "half", "last 10 bytes"])
def test_truncated_file(saved, cut):
    data = saved.read_bytes()
    keep = {"4 bytes": 4, "8 bytes": 8, "half": len(data) // 2, "last 10 bytes": len(data) - 10}[cut]
    path = saved.with_name("truncated.safetensors")
    path.write_bytes(data[:keep])
    with fails(path, r"is not a readable safetensors file \(.+\)"):
        qatkit.load(path)


def test_safetensors_file_without_qatkit_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with fails(path, "has no qatkit graph in its metadata"):
        qatkit.load(path)
    save_file({"w": torch.zeros(3)}, str(path), metadata={"other": "x"})
    with fails(path, "has no qatkit graph in its metadata"):
        qatkit.load(path)


def test_metadata_that_is_not_json(saved):
    header, tensors = read(saved)
    path = rewrite(saved, None, tensors, raw="{not json")
    with fails(path, "has no qatkit graph in its metadata"):
        qatkit.load(path)


@pytest.mark.parametrize("fmt", ["onnx", None, 3])
def test_wrong_format(saved, fmt):
    header, tensors = read(saved)
    header["format"] = fmt
    path = rewrite(saved, header, tensors)
    with fails(path, rf"has format {re.escape(repr(fmt))}, not 'qatkit-integer-model'"):
        qatkit.load(path)


def test_header_that_is_not_an_object(saved):
    _, tensors = read(saved)
    path = rewrite(saved, [1, 2], tensors)
    with fails(path, r"has format \[1, 2\], not 'qatkit-integer-model'"):
        qatkit.load(path)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_wrong_version(saved, version):
    header, tensors = read(saved)
    header["version"] = version
    path = rewrite(saved, header, tensors)
    with fails(path, rf"has version {re.escape(repr(version))}; this qatkit reads version 1"):
        qatkit.load(path)


@pytest.mark.parametrize("nodes", [[], None, {"a": 1}])
def test_no_nodes(saved, nodes):
    header, tensors = read(saved)
    header["nodes"] = nodes
    path = rewrite(saved, header, tensors)
    with fails(path, "has no graph nodes"):
        qatkit.load(path)


@pytest.mark.parametrize("node", [{"name": "e", "op": "exec"}, {"op": "input"}, "input", {"name": 3, "op": "input"}])
def test_node_of_unknown_kind(saved, node):
    header, tensors = read(saved)
    header["nodes"].insert(1, node)
    path = rewrite(saved, header, tensors)
    with fails(path, "has a node .* of unknown kind"):
        qatkit.load(path)


@pytest.mark.parametrize("fn, method", [("os.system", False), ("builtins.eval", False), ("builtins.__import__", False),
                                        ("torch.load", False), ("__reduce__", True), ("numpy", True), ("view", False)])
def test_call_of_an_operation_not_in_the_table(saved, fn, method):
    header, tensors = read(saved)
    node = {"name": "evil", "op": "call", "fn": fn, "args": ["touch MARKER"], "kwargs": {}}
    if method:
        node["method"] = True
    header["nodes"].insert(1, node)
    path = rewrite(saved, header, tensors)
    with fails(path, rf"calls {re.escape(repr(fn))}, which is not an operation qatkit runs"):
        qatkit.load(path)


def test_every_call_in_a_saved_file_is_in_the_table(saved):
    from qatkit.convert import ops

    header, _ = read(saved)
    for node in header["nodes"]:
        if node["op"] == "call":
            assert node["fn"] == "identity" or node["fn"] in (ops.METHODS if node.get("method") else ops.FUNCTIONS)


@pytest.mark.parametrize("where", ["qlayer-weight", "quantize-scale", "nested-input"])
def test_dangling_tensor_reference(saved, where):
    header, tensors = read(saved)
    qlayer = next(n for n in header["nodes"] if n["op"] == "qlayer")
    if where == "qlayer-weight":
        qlayer["weight"] = {"tensor": "missing.weight"}
    elif where == "quantize-scale":
        next(n for n in header["nodes"] if n["op"] == "quantize")["scale"] = {"tensor": "missing.weight"}
    else:
        qlayer["input"]["scale"]["tensor"] = "missing.weight"
    path = rewrite(saved, header, tensors)
    with fails(path, "refers to tensor 'missing.weight', which it does not contain"):
        qatkit.load(path)


def test_removed_tensor_is_a_dangling_reference(saved):
    header, tensors = read(saved)
    del tensors["fc.bias"]
    path = rewrite(saved, header, tensors)
    with fails(path, "refers to tensor 'fc.bias', which it does not contain"):
        qatkit.load(path)


def test_getattr_other_than_shape_is_refused(saved):
    header, tensors = read(saved)
    out = header["nodes"].pop()
    header["nodes"] += [
        {"name": "g1", "op": "call", "fn": "builtins.getattr", "args": [{"node": "x"}, "__class__"], "kwargs": {}},
        {"name": "g2", "op": "call", "fn": "builtins.getattr", "args": [{"node": "g1"}, "__repr__"], "kwargs": {}},
        {"name": "g3", "op": "call", "fn": "builtins.getattr", "args": [{"node": "g2"}, "__globals__"], "kwargs": {}},
        {"name": "g4", "op": "call", "fn": "_operator.getitem", "args": [{"node": "g3"}, "__builtins__"], "kwargs": {}},
        dict(out, args=[{"node": "g4"}]),
    ]
    path = rewrite(saved, header, tensors)
    with fails(path, r"calls 'builtins\.getattr'.*"):
        qatkit.load(path)


@pytest.mark.parametrize("dtype", ["float16", "__class__", 3])
def test_a_dtype_outside_the_allowed_ones_is_refused(saved, dtype):
    header, tensors = read(saved)
    out = header["nodes"].pop()
    header["nodes"] += [{"name": "z", "op": "call", "fn": "torch.zeros", "args": [2, 3],
                         "kwargs": {"dtype": {"torch_dtype": dtype}}}, out]
    path = rewrite(saved, header, tensors)
    with fails(path, f"names dtype {dtype!r}; allowed: float32, int64, bool"):
        qatkit.load(path)


@pytest.mark.parametrize("sizes", [[None, 0, 8, 8], "any", [None, 1.5], [None, True]])
def test_input_sizes_other_than_positive_integers_and_nulls_are_refused(saved, sizes):
    header, tensors = read(saved)
    assert header["nodes"][0]["op"] == "input" and header["nodes"][0]["sizes"] == [None, 1, 8, 8]  # (flatten → fc)
    header["nodes"][0]["sizes"] = sizes
    path = rewrite(saved, header, tensors)
    with fails(path, r"has input 'x' with sizes .*; allowed: a list of positive integers and nulls"):
        qatkit.load(path)


def test_a_damaged_or_edited_file_fails_its_checksum(integer_model, saved, x):
    """One flipped bit in a weight loaded, evaluated and exported with exit 0 (64 of 640 outputs changed); an edited
    header field (a layer's bits 4 -> 2) computed another model without a word."""
    with safe_open(str(saved), framework="pt") as f:
        metadata = f.metadata()
    assert set(metadata) == {"qatkit", "qatkit_sha256"}
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x10  # a bit of the last tensor's bytes
    flipped = saved.with_name("flipped.safetensors")
    flipped.write_bytes(bytes(data))
    with fails(flipped, r"has a sha256 checksum mismatch: its tensors or graph were changed \(damaged or edited\)"):
        qatkit.load(flipped)
    header, tensors = read(saved)
    layer = next(n for n in header["nodes"] if n.get("bits") == 4)
    layer["bits"] = 2
    edited = saved.with_name("edited.safetensors")
    save_file(tensors, str(edited), metadata={"qatkit": json.dumps(header), "qatkit_sha256": metadata["qatkit_sha256"]})
    with fails(edited, r"has a sha256 checksum mismatch: its tensors or graph were changed \(damaged or edited\)"):
        qatkit.load(edited)
    assert torch.equal(qatkit.load(saved)(x), integer_model(x))  # (the intact file loads)
