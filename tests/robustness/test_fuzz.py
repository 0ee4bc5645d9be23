"""Hypothesis fuzzing of qatkit's parsers of untrusted input, at least 60 s in all:

(a) the integer model file loader `qatkit.convert.load`, on mutated bytes of a valid file and on valid files whose
    qatkit graph JSON was mutated or replaced by random structures (random ops, fn names, tensor/node references,
    wrong types). Allowed: ModelFileError, or a model that loads; a loaded model, run on a fixed input, either
    returns or raises an ordinary Exception of the kinds listed in RUN_RAISES (the loader checks the fields the
    runtime reads, not their values). Never anything else, and never code execution (a marker file).
(b) the checkpoint loader `qatkit.train.load_checkpoint` on mutated bytes (raw, and re-sealed with a valid
    checksum so torch.load sees them), random pickles and crafted ones: ModelFileError or a dict, nothing else.
(c) the config parser: `load_yaml` on random text and YAML-like documents, then what `qatkit run --config` does
    with the result, and `qat_config_from_dict` / `train_config_from_dict` on random nested values:
    ConfigError or a valid config that round-trips through to_dict, nothing else.

Crashes found in files this suite may not fix are recognised by their exception type and the qatkit function that
raised them (KNOWN_BUGS, empty now); each gets a deterministic xfail(strict=True, reason="BUG ...") test at the end
of this file, so the fuzzers pass meanwhile and the xfail turns into a failure once the bug is fixed (drop its
KNOWN_BUGS entry then). Any other exception fails the fuzzer. The tests at the end reproduce the crashes fixed so far.

Time: each target runs rounds of `max_examples` examples (sized to a few seconds per round on the 2-core dev
machine) until its share of the budget is spent; the module fixture asserts the total is >= 60 s.
QATKIT_FUZZ_SCALE=0.1 shortens it for local runs (the total is then checked against 60 s x scale).
"""
from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import struct
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import qatkit
from qatkit.cli import _parser, run_config_from
from qatkit.config import (
    QATConfig,
    TrainConfig,
    load_yaml,
    qat_config_from_dict,
    to_dict,
    train_config_from_dict,
)
from qatkit.convert import ops
from qatkit.convert.io import _NODE_OPS
from qatkit.errors import ConfigError, DataError, ModelFileError, QatkitError
from qatkit.train import load_checkpoint, save_checkpoint
from qatkit.train.checkpoint import MAGIC, TRAILER_SIZE

SCALE = float(os.environ.get("QATKIT_FUZZ_SCALE", "1"))
# seconds per fuzz target: (a) model file 20, (b) checkpoint 20, (c) config 20
BUDGETS = {"model_file_bytes": 10.0, "model_file_json": 10.0, "checkpoint": 20.0, "yaml_text": 8.0, "config_dicts": 12.0}
MIN_TOTAL_S = 60.0 * SCALE
ELAPSED: dict[str, float] = {}
ROUNDS: dict[str, int] = {}
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
SLOWEST: dict[str, float] = collections.defaultdict(float)
MAX_EXAMPLE_S = 30.0  # one example taking longer than this is a hang, not a slow machine
WORK = Path(tempfile.mkdtemp(prefix="qatkit-fuzz-"))
MARKER = WORK / "CODE-WAS-EXECUTED"
QATKIT_DIR = str(Path(qatkit.__file__).parent)
# torch warns about every pickle protocol other than 2 that the checkpoint fuzzer feeds it
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def fuzz_clock():
    """Record every target's fuzzing time and outcomes; when all ran, their total must reach 60 s."""
    yield
    lines = [f"{name}: {ELAPSED[name]:.1f} s in {ROUNDS[name]} rounds, slowest example {SLOWEST[name]:.2f} s, "
             f"outcomes {dict(OUTCOMES[name].most_common())}" for name in ELAPSED]
    total = sum(ELAPSED.values())
    summary = "\n".join(["[qatkit fuzz] " + line for line in lines] + [f"[qatkit fuzz] total {total:.1f} s"])
    print(summary)
    (Path(tempfile.gettempdir()) / "qatkit-fuzz-summary.txt").write_text(summary + "\n", encoding="utf-8")
    shutil.rmtree(WORK, ignore_errors=True)
    if set(ELAPSED) == set(BUDGETS):
        assert total >= MIN_TOTAL_S, summary


def fuzz(name: str, inner, record_property) -> None:
    """Run the Hypothesis test `inner` round after round until target `name` has used its budget."""
    budget = BUDGETS[name] * SCALE
    start, rounds = time.monotonic(), 0
    while rounds == 0 or time.monotonic() - start < budget:
        inner()
        rounds += 1
    ELAPSED[name], ROUNDS[name] = time.monotonic() - start, rounds
    record_property("fuzz_seconds", round(ELAPSED[name], 1))
    assert not MARKER.exists(), "a fuzzed input executed code"


def _settings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


class _Timer:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.start = time.monotonic()

    def __exit__(self, *exc):
        took = time.monotonic() - self.start
        SLOWEST[self.name] = max(SLOWEST[self.name], took)
        assert took < MAX_EXAMPLE_S, f"one example took {took:.1f} s"


# ---- known bugs: (exception type, qatkit file, qatkit function) -> bug id ---------------------------------------
KNOWN_BUGS: dict[tuple[type, str, str], str] = {}


def _qatkit_frame(exc: BaseException) -> tuple[str, str]:
    """(file name, function) of the innermost traceback frame inside the qatkit package."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.startswith(QATKIT_DIR):
            return Path(frame.filename).name, frame.name
    return "?", "?"


def known_bug(exc: BaseException) -> str | None:
    file, fn = _qatkit_frame(exc)
    for (kind, f, func), bug in KNOWN_BUGS.items():
        if type(exc) is kind and (f, func) == (file, fn):
            return bug
    return None


def _unexpected(what: str, exc: BaseException, data) -> AssertionError:
    file, fn = _qatkit_frame(exc)
    shown = repr(data)
    return AssertionError(f"{what} raised {type(exc).__name__} in {file}:{fn}: {exc!s:.300} -- input {shown[:600]}")


# ================================================================================================================
# (a) integer model files
# ================================================================================================================
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


X = torch.linspace(-2, 2, 32).view(2, 1, 4, 4)


def _valid_model_file() -> tuple[bytes, dict, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    qat = qatkit.prepare(_Net(), QATConfig(weight_bits=4, act_bits=4, first_last_bits=None), X)
    qatkit.calibrate(qat, [X])
    integer = qatkit.convert(qat.eval())
    integer.meta["recipe"] = {"model": "small-cnn", "dataset": "digits"}
    path = qatkit.save(integer, WORK / "valid.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["qatkit"])
    return path.read_bytes(), header, load_file(str(path))


VALID_BYTES, VALID_HEADER, VALID_TENSORS = _valid_model_file()
EXPECTED_OUTPUT = qatkit.load(WORK / "valid.safetensors")(X)
NODE_NAMES = [n["name"] for n in VALID_HEADER["nodes"]]
TENSOR_KEYS = sorted(VALID_TENSORS)
# Ordinary failures of a graph the runtime trusts (it checks no field): what running a loaded, damaged file raises.
RUN_RAISES = (QatkitError, ValueError, RuntimeError, TypeError, KeyError, IndexError, AttributeError, StopIteration,
              AssertionError, ZeroDivisionError, OverflowError, NotImplementedError)
_SCALAR_KEYS = {"zero_point", "qmin", "qmax", "bits", "version"}


def _too_big_to_run(value, key=None) -> bool:
    """Whether running could allocate too much (a padding of 10**5, an expand to 64**6): any int beyond +-64 or
    a list whose ints multiply beyond 2**16, outside the scalar fields (zero points, code ranges)."""
    if isinstance(value, dict):
        return any(_too_big_to_run(v, k) for k, v in value.items())
    if isinstance(value, list):
        ints = [abs(v) for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if ints and math.prod(max(1, min(v, 2**20)) for v in ints) > 2**16:
            return True
        return any(_too_big_to_run(v, key) for v in value)
    if isinstance(value, float) and key not in _SCALAR_KEYS:
        return not math.isfinite(value) or abs(value) > 64
    return isinstance(value, int) and not isinstance(value, bool) and key not in _SCALAR_KEYS and abs(value) > 64


def check_model_file(path: Path, outcome: collections.Counter, data) -> None:
    """The allowed outcomes of loading `path` and running what loaded."""
    try:
        model = qatkit.load(path)
    except ModelFileError as e:
        assert str(e).startswith(f"model file {str(path)!r} ") and "Fix:" in str(e), str(e)
        outcome["ModelFileError"] += 1
        return
    except Exception as e:
        bug = known_bug(e)
        if bug is None:
            raise _unexpected("qatkit.load", e, data) from e
        outcome[f"known bug {bug}"] += 1
        return
    assert isinstance(model, qatkit.IntegerModel)
    if _too_big_to_run(model.nodes):
        outcome["loaded (not run: huge sizes)"] += 1
        return
    try:
        model(X)
        outcome["loaded and ran"] += 1
    except RUN_RAISES as e:
        outcome[f"loaded, run raised {type(e).__name__}"] += 1
    except BaseException as e:
        raise _unexpected("running a loaded model", e, data) from e
    finally:
        assert not MARKER.exists(), f"code was executed for input {data!r:.600}"


# ---- (a1) byte mutations -------------------------------------------------------------------------------------------
HEADER_LEN = struct.unpack("<Q", VALID_BYTES[:8])[0]
_META_START = VALID_BYTES.index(b'"qatkit"', 8)  # the qatkit JSON, escaped inside the safetensors header
REGIONS = {"length": (0, 8), "header": (8, 8 + HEADER_LEN), "qatkit-json": (_META_START, 8 + HEADER_LEN),
           "data": (8 + HEADER_LEN, len(VALID_BYTES)), "anywhere": (0, len(VALID_BYTES))}
EDIT_KINDS = ("flip", "set", "insert", "delete", "duplicate", "truncate")
edit = st.tuples(st.sampled_from(EDIT_KINDS), st.sampled_from(sorted(REGIONS)), st.floats(0, 1), st.integers(0, 255),
                 st.integers(0, 7), st.integers(1, 64))


def apply_edits(data: bytes, edits, regions=REGIONS) -> bytes:
    out = bytearray(data)
    for kind, region, where, byte, bit, span in edits:
        lo, hi = regions[region] if isinstance(regions, dict) else (0, len(data))
        lo, hi = min(lo, len(out)), min(hi, len(out))
        pos = lo + int(where * max(hi - lo - 1, 0))
        if kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = bytes([byte]) * min(span, 4)
        elif not out or pos >= len(out):
            continue
        elif kind == "flip":
            out[pos] ^= 1 << bit
        elif kind == "set":
            out[pos] = byte
        elif kind == "delete":
            del out[pos:pos + min(span, 4)]
        elif kind == "duplicate":
            out[pos:pos] = out[pos:pos + span]
    return bytes(out)


def _text_edits(text: str, edits) -> str:
    """The same edits on the qatkit JSON text (re-wrapped in a valid container afterwards)."""
    raw = apply_edits(text.encode("utf-8"), edits, regions=None)
    return raw.decode("utf-8", errors="replace")


def test_fuzz_model_file_bytes(record_property):
    path = WORK / "bytes.safetensors"
    rewrapped = WORK / "rewrapped.safetensors"
    header_text = json.dumps(VALID_HEADER)
    outcome = OUTCOMES["model_file_bytes"]

    @_settings(max_examples=1100)
    @given(edits=st.lists(edit, min_size=1, max_size=6), mode=st.sampled_from(["file", "file", "qatkit-json-text"]))
    def inner(edits, mode):
        with _Timer("model_file_bytes"):
            if mode == "file":
                path.write_bytes(apply_edits(VALID_BYTES, edits))
                check_model_file(path, outcome, ("file", edits))
            else:  # the graph JSON itself damaged, inside an intact safetensors container
                save_file(VALID_TENSORS, str(rewrapped), metadata={"qatkit": _text_edits(header_text, edits)})
                check_model_file(rewrapped, outcome, ("json-text", edits))

    fuzz("model_file_bytes", inner, record_property)
    assert outcome["ModelFileError"] > 0 and sum(v for k, v in outcome.items() if k.startswith("loaded")) > 0


def test_unchanged_file_loads_and_runs_as_saved():
    """The base of the byte fuzzer: with no edit the file loads and gives the saved model's output."""
    path = WORK / "same.safetensors"
    path.write_bytes(apply_edits(VALID_BYTES, []))
    assert torch.equal(qatkit.load(path)(X), EXPECTED_OUTPUT)


# ---- (a2) graph JSON replaced by random structures -----------------------------------------------------------------
DANGEROUS_FNS = ["posix.system", "os.system", "builtins.eval", "builtins.exec", "builtins.__import__", "builtins.open",
                 "subprocess.Popen", "pickle.loads", "torch.load", "__class__", "__reduce__", "__globals__",
                 "__subclasses__", "__init__", "_operator.attrgetter", "_operator.methodcaller", "numpy.load"]
FN_NAMES = sorted(ops.FUNCTIONS) + sorted(ops.METHODS) + ["identity"] + DANGEROUS_FNS
FIELDS = ["name", "op", "fn", "method", "args", "kwargs", "kind", "act", "bits", "shape", "weight", "weight_scale",
          "input", "bias", "output", "dim", "stride", "padding", "dilation", "groups", "scale", "zero_point", "qmin",
          "qmax", "inputs", "value", "module"]
TOUCH = f"touch {MARKER}"

leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 16), st.integers(), st.floats(),
                 st.text(max_size=8), st.sampled_from(NODE_NAMES + TENSOR_KEYS + FN_NAMES + ["shape", TOUCH]))
json_value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(FIELDS + ["tensor", "node", "slice"]) | st.text(max_size=5),
                                            inner, max_size=4), max_leaves=12)
reference = st.one_of(
    st.builds(lambda t: {"tensor": t}, st.sampled_from(TENSOR_KEYS) | st.text(max_size=6) | json_value),
    st.builds(lambda n: {"node": n}, st.sampled_from(NODE_NAMES) | st.text(max_size=4) | json_value),
    st.builds(lambda s: {"slice": s}, st.lists(st.none() | st.integers(-4, 4), max_size=4) | json_value),
)
argument = st.one_of(reference, st.integers(-3, 8), st.sampled_from(["shape", TOUCH, "__class__"]), json_value,
                     st.lists(reference | st.integers(-3, 8), max_size=4))
quant_fields = st.fixed_dictionaries({"scale": reference, "zero_point": st.integers(-2, 300) | json_value,
                                      "qmin": st.integers(-300, 10) | json_value, "qmax": st.integers(-10, 300) | json_value})
random_node = st.fixed_dictionaries(
    {"name": st.sampled_from(NODE_NAMES + ["n0", "n1", "evil"]) | st.text(max_size=4) | json_value,
     "op": st.sampled_from(sorted(_NODE_OPS)) | st.text(max_size=6) | json_value},
    optional={"fn": st.sampled_from(FN_NAMES) | st.text(max_size=10) | json_value,
              "method": st.booleans() | json_value,
              "args": st.lists(argument, max_size=4) | json_value,
              "kwargs": st.dictionaries(st.sampled_from(["dim", "start_dim", "kernel_size", "stride", "padding"])
                                        | st.text(max_size=5), argument, max_size=3) | json_value,
              "kind": st.sampled_from(["conv", "linear"]) | json_value,
              "act": st.sampled_from([None, "relu", "relu6"]) | json_value,
              "bits": st.integers(-2, 10) | json_value,
              "shape": st.lists(st.integers(-2, 9), max_size=5) | json_value,
              "weight": reference, "weight_scale": reference, "bias": reference | st.none(),
              "input": quant_fields | json_value, "output": quant_fields | st.none() | json_value,
              "inputs": st.lists(quant_fields, max_size=3) | json_value,
              "dim": st.integers(0, 4) | json_value, "stride": st.lists(st.integers(-1, 3), max_size=3) | json_value,
              "padding": st.lists(st.integers(-1, 3), max_size=3) | json_value,
              "dilation": st.lists(st.integers(-1, 3), max_size=3) | json_value,
              "groups": st.integers(-1, 3) | json_value, "scale": reference, "zero_point": st.integers(-2, 300) | json_value,
              "qmin": st.integers(-300, 10), "qmax": st.integers(-10, 300), "value": argument})
tensor_value = st.builds(
    lambda dtype, shape, fill: torch.full(shape, fill).to(dtype),
    st.sampled_from([torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float16, torch.float64, torch.bool]),
    st.lists(st.integers(0, 5), max_size=3).map(tuple), st.sampled_from([0.0, 1.0, -1.0, 3.0, float("nan"), float("inf")]))
index = st.integers(0, 20)
mutation = st.one_of(
    st.tuples(st.just("set_field"), index, st.sampled_from(FIELDS) | st.text(max_size=5), argument | json_value),
    st.tuples(st.just("del_field"), index, st.sampled_from(FIELDS)),
    st.tuples(st.just("set_quant"), index, st.sampled_from(["input", "output"]),
              st.sampled_from(["scale", "zero_point", "qmin", "qmax"]), argument | json_value),
    st.tuples(st.just("insert_node"), index, random_node),
    st.tuples(st.just("delete_node"), index),
    st.tuples(st.just("swap_nodes"), index, index),
    st.tuples(st.just("replace_node"), index, random_node | json_value),
    st.tuples(st.just("replace_nodes"), st.lists(random_node, max_size=6) | json_value),
    st.tuples(st.just("set_top"), st.sampled_from(["format", "version", "nodes", "meta"]) | st.text(max_size=5), json_value),
    st.tuples(st.just("replace_header"), json_value),
    st.tuples(st.just("set_tensor"), st.sampled_from(TENSOR_KEYS) | st.text(min_size=1, max_size=5), tensor_value),
    st.tuples(st.just("drop_tensor"), st.sampled_from(TENSOR_KEYS)),
)


def mutate_header(mutations) -> tuple[object, dict[str, torch.Tensor]]:
    header: object = copy.deepcopy(VALID_HEADER)
    tensors = dict(VALID_TENSORS)
    for m in mutations:
        kind = m[0]
        nodes = header.get("nodes") if isinstance(header, dict) else None
        if kind == "set_top" and isinstance(header, dict):
            header[m[1]] = m[2]
        elif kind == "replace_header":
            header = m[1]
        elif kind == "set_tensor":
            tensors[m[1]] = m[2]
        elif kind == "drop_tensor":
            tensors.pop(m[1], None)
        elif kind == "replace_nodes" and isinstance(header, dict):
            header["nodes"] = m[1]
        elif isinstance(nodes, list) and nodes:
            i = m[1] % len(nodes)
            node = nodes[i]
            if kind == "insert_node":
                nodes.insert(i, m[2])
            elif kind == "delete_node":
                del nodes[i]
            elif kind == "swap_nodes":
                j = m[2] % len(nodes)
                nodes[i], nodes[j] = nodes[j], nodes[i]
            elif kind == "replace_node":
                nodes[i] = m[2]
            elif kind == "set_field" and isinstance(node, dict):
                node[m[2]] = m[3]
            elif kind == "del_field" and isinstance(node, dict):
                node.pop(m[2], None)
            elif kind == "set_quant" and isinstance(node, dict) and isinstance(node.get(m[2]), dict):
                node[m[2]][m[3]] = m[4]
    return header, tensors


def test_fuzz_model_file_json(record_property):
    path = WORK / "json.safetensors"
    outcome = OUTCOMES["model_file_json"]

    @_settings(max_examples=300)
    @given(mutations=st.lists(mutation, min_size=1, max_size=4))
    def inner(mutations):
        with _Timer("model_file_json"):
            header, tensors = mutate_header(mutations)
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata={"qatkit": json.dumps(header)})
            check_model_file(path, outcome, mutations)

    fuzz("model_file_json", inner, record_property)
    assert outcome["ModelFileError"] > 0 and sum(v for k, v in outcome.items() if k.startswith("loaded")) > 0


# ================================================================================================================
# (b) checkpoints
# ================================================================================================================
def _valid_checkpoint() -> bytes:
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(X).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "step": 12,
             "recipe": {"model": "small-cnn", "dataset": "digits", "mean": [0.5], "qat": {"weight_bits": 4}},
             "history": [{"epoch": 0, "loss": 1.5, "val_accuracy": None}], "rng": torch.get_rng_state()}
    return save_checkpoint(WORK / "valid.ckpt", state).read_bytes()


VALID_CKPT = _valid_checkpoint()
VALID_PAYLOAD = VALID_CKPT[:-TRAILER_SIZE]


def seal(payload: bytes) -> bytes:
    """A payload with a valid trailer: what save_checkpoint would write around it."""
    return payload + MAGIC + hashlib.sha256(payload).digest()


class _Evil:
    """Unpickling it would run `touch MARKER`."""

    def __reduce__(self):
        return os.system, (TOUCH,)


plain_data = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=8),
              st.builds(lambda n: torch.arange(n, dtype=torch.float32), st.integers(0, 4))),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=3)
    | st.tuples(inner, inner) | st.frozensets(st.integers(), max_size=3), max_leaves=10)
ckpt_input = st.one_of(
    st.tuples(st.just("raw"), st.lists(edit, min_size=1, max_size=5)),  # no valid checksum: always refused
    st.tuples(st.just("resealed"), st.lists(edit, min_size=1, max_size=5)),  # torch.load sees damaged bytes
    st.tuples(st.just("torch.save"), plain_data),
    st.tuples(st.just("pickle"), plain_data, st.integers(0, pickle.HIGHEST_PROTOCOL)),
    st.tuples(st.just("evil"), st.sampled_from(["torch.save", "pickle"]), plain_data),
    st.tuples(st.just("random bytes"), st.binary(max_size=200), st.booleans()),
)


def _ckpt_bytes(case) -> bytes:
    kind = case[0]
    if kind == "raw":
        return apply_edits(VALID_CKPT, case[1], regions=None)
    if kind == "resealed":
        return seal(apply_edits(VALID_PAYLOAD, case[1], regions=None))
    if kind == "torch.save":
        buf = io.BytesIO()
        torch.save(case[1], buf)
        return seal(buf.getvalue())
    if kind == "pickle":
        return seal(pickle.dumps(case[1], protocol=case[2]))
    if kind == "evil":
        obj = {"model": {"w": _Evil()}, "other": case[2]}
        if case[1] == "pickle":
            return seal(pickle.dumps(obj))
        buf = io.BytesIO()
        torch.save(obj, buf)
        return seal(buf.getvalue())
    return seal(case[1]) if case[2] else case[1]


def test_fuzz_checkpoint(record_property):
    path = WORK / "fuzzed.ckpt"
    outcome = OUTCOMES["checkpoint"]

    @_settings(max_examples=1800)
    @given(case=ckpt_input)
    def inner(case):
        with _Timer("checkpoint"):
            data = _ckpt_bytes(case)
            path.write_bytes(data)
            try:
                state = load_checkpoint(path)
            except ModelFileError as e:
                assert str(e).startswith(f"checkpoint {str(path)!r} ") and "Fix:" in str(e), str(e)
                outcome[f"{case[0]}: ModelFileError"] += 1
            except BaseException as e:
                raise _unexpected("load_checkpoint", e, case) from e
            else:
                assert isinstance(state, dict)
                assert case[0] not in ("evil", "random bytes"), case
                if case[0] == "raw":  # without a valid checksum only an unchanged file may load
                    assert data == VALID_CKPT, case
                outcome[f"{case[0]}: loaded"] += 1
            assert not MARKER.exists(), f"code was executed for {case!r:.300}"

    fuzz("checkpoint", inner, record_property)
    assert outcome["resealed: ModelFileError"] > 0 and outcome["raw: ModelFileError"] > 0


# ================================================================================================================
# (c) configs
# ================================================================================================================
RUN_KEYS = ["dataset", "data", "model", "weight_bits", "act_bits", "limit", "float_epochs", "float_lr", "qat", "train"]
TRAIN_KEYS = [f for f in TrainConfig.__dataclass_fields__]
QAT_KEYS = [f for f in QATConfig.__dataclass_fields__]
RULE_KEYS = ["pattern", "weight_bits", "act_bits", "per_channel", "skip"]
YAML_SCALARS = ["0", "1", "-1", "8", "4", "2", "9", "1.5", "-0.0", "1e-3", "1e400", "9" * 40, ".nan", ".inf", "-.inf",
                "~", "null", "true", "false", "yes", "no", "on", "'8'", '"x"', "adamw", "sgd", "mse", "minmax", "cpu",
                "cuda:0", "crop-flip", "0x1F", "0o17", "1_000", "2001-12-14", "!!binary aGVsbG8=", "!!set {a, b}",
                "!!str 5", "!!float 1", "!!int '3'", "!!python/object/apply:os.system ['" + TOUCH + "']",
                "!!python/name:os.system", "!!python/object/new:subprocess.Popen [['" + TOUCH + "']]",
                "!!omap [{a: 1}]", "*a", "&a 3", "[]", "{}", "[1, 2]", "{a: 1}", "|\n  text", "'unterminated",
                "{'pattern': '*', 'weight_bits': 4}", "[{pattern: 'fc', skip: true}]", "{'*.weight': 1e-4}"]


@st.composite
def yaml_document(draw) -> str:
    """A YAML-like document over the config's keys: nested sections, scalars, tags, anchors, flow collections."""
    def value(depth: int) -> str:
        choice = draw(st.integers(0, 5 if depth < 3 else 1))
        if choice <= 1:
            return draw(st.sampled_from(YAML_SCALARS) | st.text(max_size=6))
        if choice == 2:
            n = draw(st.integers(0, 30))
            return "[" * n + draw(st.sampled_from(YAML_SCALARS[:20])) + "]" * n
        if choice == 3:
            items = draw(st.lists(st.sampled_from(YAML_SCALARS[:30]), max_size=4))
            return "[" + ", ".join(items) + "]"
        if choice == 4:
            keys = draw(st.lists(st.sampled_from(TRAIN_KEYS + QAT_KEYS + RULE_KEYS), max_size=3))
            return "{" + ", ".join(f"{k}: {value(depth + 1)}" for k in keys) + "}"
        return "\n" + "\n".join(f"{'  ' * (depth + 1)}{k}: {value(depth + 1)}"
                                for k in draw(st.lists(st.sampled_from(TRAIN_KEYS + QAT_KEYS + ["<<", "a"]), max_size=3)))

    keys = draw(st.lists(st.sampled_from(RUN_KEYS) | st.sampled_from(["1", "- x", "? [a]", "<<", "%YAML 1.1\n---"])
                         | st.text(max_size=5), max_size=6))
    return "\n".join(f"{k}: {value(0)}" for k in keys) + draw(st.sampled_from(["", "\n", "\n---\nb: 1\n", "\t", "\n..."]))


def _namespace(config: Path) -> argparse.Namespace:
    """What `qatkit run --config CONFIG` parses to (the real parser: every flag at its default)."""
    return _parser().parse_args(["run", "--config", str(config)])


def _config_outcome(fn, data, outcome: collections.Counter, label: str):
    try:
        result = fn(data)
    except ConfigError as e:
        assert "Fix:" in str(e) and "\n" not in str(e), str(e)
        outcome[f"{label}: ConfigError"] += 1
        return None
    except Exception as e:
        bug = known_bug(e)
        if bug is None:
            raise _unexpected(label, e, data) from e
        outcome[f"{label}: known bug {bug}"] += 1
        return None
    outcome[f"{label}: accepted"] += 1
    return result


def _check_round_trip(config) -> None:
    if isinstance(config, QATConfig):
        assert qat_config_from_dict(to_dict(config)) == config
    elif isinstance(config, TrainConfig):
        assert train_config_from_dict(to_dict(config)) == config


def test_fuzz_yaml_text(record_property):
    path = WORK / "fuzzed.yaml"
    outcome = OUTCOMES["yaml_text"]

    @_settings(max_examples=300)
    @given(doc=st.one_of(yaml_document(), st.text(max_size=200), st.binary(max_size=100)))
    def inner(doc):
        with _Timer("yaml_text"):
            if isinstance(doc, bytes):
                path.write_bytes(doc)
            else:
                path.write_text(doc, encoding="utf-8", errors="surrogatepass")
            data = _config_outcome(load_yaml, path, outcome, "load_yaml")
            if data is not None:
                assert isinstance(data, dict)
                for section, parse in (("qat", qat_config_from_dict), ("train", train_config_from_dict)):
                    if section in data:
                        config = _config_outcome(parse, data[section], outcome, f"{section} section")
                        if config is not None:
                            _check_round_trip(config)
                run = _config_outcome(lambda p: run_config_from(_namespace(p)), path, outcome, "run_config_from")
                if run is not None:
                    _check_round_trip(run.qat)
                    _check_round_trip(run.train)
            assert not MARKER.exists(), f"code was executed for {doc!r:.300}"

    fuzz("yaml_text", inner, record_property)
    assert outcome["load_yaml: ConfigError"] > 0 and outcome["load_yaml: accepted"] > 0


scalar = st.one_of(st.none(), st.booleans(), st.integers(-2, 10), st.integers(), st.just(10**400), st.floats(),
                   st.text(max_size=6), st.sampled_from(["adamw", "sgd", "mse", "minmax", "percentile", "cpu", "cuda",
                                                         "cuda:1", "none", "crop-flip", "stop", "skip", "*", "fc*"]))
nested = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
rule = st.dictionaries(st.sampled_from(RULE_KEYS) | st.text(max_size=3) | st.integers(), scalar | nested, max_size=5)
field_value = st.one_of(scalar, nested, st.lists(rule, max_size=3),
                        st.dictionaries(st.text(max_size=6) | st.sampled_from(["*.weight", "fc.*"]), scalar, max_size=3),
                        st.lists(st.tuples(st.text(max_size=4), scalar), max_size=3))


def config_dict(keys: list[str]):
    key = st.sampled_from(keys) | st.text(max_size=6) | st.integers() | st.none() | st.booleans() | st.floats()
    return st.one_of(st.dictionaries(st.sampled_from(keys), field_value, max_size=6),
                     st.dictionaries(key, field_value, max_size=4), nested)


def test_fuzz_config_dicts(record_property):
    outcome = OUTCOMES["config_dicts"]

    @_settings(max_examples=1200)
    @given(qat=config_dict(QAT_KEYS), train=config_dict(TRAIN_KEYS))
    def inner(qat, train):
        with _Timer("config_dicts"):
            config = _config_outcome(qat_config_from_dict, qat, outcome, "qat_config_from_dict")
            if config is not None:
                _check_round_trip(config)
            config = _config_outcome(train_config_from_dict, train, outcome, "train_config_from_dict")
            if config is not None:
                _check_round_trip(config)

    fuzz("config_dicts", inner, record_property)
    assert outcome["qat_config_from_dict: accepted"] > 0 and outcome["train_config_from_dict: accepted"] > 0


# ================================================================================================================
# the crashes the fuzzers once tolerated as KNOWN_BUGS (now fixed), one deterministic reproducer each
# ================================================================================================================
def _graph_file(tmp_path: Path, edit_header, raw: str | None = None) -> Path:
    header = copy.deepcopy(VALID_HEADER)
    edit_header(header)
    path = tmp_path / "edited.safetensors"
    save_file(VALID_TENSORS, str(path), metadata={"qatkit": raw if raw is not None else json.dumps(header)})
    return path


def _insert(node):
    return lambda h: h["nodes"].insert(1, node)


@pytest.mark.parametrize("edit_header", [
    lambda h: h["nodes"][1].__setitem__("op", ["quantize"]),
    lambda h: h["nodes"][3].__setitem__("fn", ["torch.flatten"]),
    _insert({"name": "g", "op": "call", "fn": "builtins.getattr", "args": 5, "kwargs": {}}),
    _insert({"name": "g", "op": "call", "fn": "builtins.getattr", "args": {"a": 1, "b": 2}, "kwargs": {}}),
], ids=["op-list", "fn-list", "getattr-args-int", "getattr-args-mapping"])
def test_bug_load_field_of_the_wrong_type(tmp_path, edit_header):
    with pytest.raises(ModelFileError):
        qatkit.load(_graph_file(tmp_path, edit_header))


@pytest.mark.parametrize("ref", [{"tensor": ["quant_x.scale"]}, {"node": {"a": 1}}], ids=["tensor-list", "node-dict"])
def test_bug_load_unhashable_reference(tmp_path, ref):
    with pytest.raises(ModelFileError):
        qatkit.load(_graph_file(tmp_path, lambda h: h["nodes"][1].__setitem__("args", [ref])))


@pytest.mark.parametrize("meta", [5, [1, 2], "ab"], ids=["int", "list", "str"])
def test_bug_load_meta_not_a_mapping(tmp_path, meta):
    with pytest.raises(ModelFileError):
        qatkit.load(_graph_file(tmp_path, lambda h: h.__setitem__("meta", meta)))


def test_bug_load_deeply_nested_metadata(tmp_path):
    raw = '{"format": "qatkit-integer-model", "version": 1, "nodes": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(ModelFileError):
        qatkit.load(_graph_file(tmp_path, lambda h: None, raw=raw))


def test_an_added_input_makes_a_model_of_two_inputs_that_names_them_when_given_one(tmp_path):
    model = qatkit.load(_graph_file(tmp_path, _insert({"name": "y", "op": "input"})))
    first = model.input_names[0]
    assert len(model.input_names) == 2 and model.input_names[1] == "y"
    with pytest.raises(DataError, match=rf"^the integer model takes 2 inputs \['{first}', 'y'\]; it was given 1\. Fix"):
        model(X)


@pytest.mark.parametrize("names", [["x", "x"], ["x", 3]], ids=["repeated", "not-a-string"])
def test_input_names_must_be_distinct_strings(tmp_path, names):
    def edit(h):
        inputs = [n for n in h["nodes"] if n["op"] == "input"]
        inputs[0]["argument"] = names[0]
        h["nodes"].insert(1, {"name": "y", "op": "input", "argument": names[1]})
    with pytest.raises(ModelFileError, match=r"has input nodes named .*; each input needs its own name"):
        qatkit.load(_graph_file(tmp_path, edit))


@pytest.mark.parametrize("edit_header", [
    lambda h: h["nodes"][1].pop("args"),
    lambda h: h["nodes"].pop(),
    lambda h: h["nodes"][-1].__setitem__("args", []),
], ids=["no-args", "no-output", "output-without-args"])
def test_bug_loaded_graph_crashes_when_run(tmp_path, edit_header):
    path = _graph_file(tmp_path, edit_header)
    try:
        model = qatkit.load(path)
    except ModelFileError:
        return  # fixed: refused at load time
    model(X)


def test_bug_config_mixed_key_types():
    with pytest.raises(ConfigError):
        train_config_from_dict({1: 0, "x": 0})


@pytest.mark.parametrize("parse, data", [(train_config_from_dict, {"lr": 10**400}),
                                         (qat_config_from_dict, {"error_penalty": {"*.weight": 10**400}})],
                         ids=["lr", "error_penalty"])
def test_bug_config_huge_integer(parse, data):
    with pytest.raises(ConfigError):
        parse(data)


def test_bug_load_yaml_deep_nesting(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("qat: " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(ConfigError):
        load_yaml(path)


@pytest.mark.parametrize("text", ["train: [1]\n", "qat: 3\n", "1: a\nfoo: b\n", "act_bits: 4.0\n"],
                         ids=["train-list", "qat-int", "mixed-keys", "float-bits"])
def test_bug_run_config_from_crashes(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        run_config_from(_namespace(path))
