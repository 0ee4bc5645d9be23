"""Running exported models in ONNX Runtime, and `verify`: does the runtime compute what was trained?"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qatkit.convert.runtime import IntegerModel, QValue, output_list
from qatkit.errors import DataError, ModelFileError
from qatkit.inputs import as_args, batch_size, call, split


def session(path: str | os.PathLike, threads: int = 2, quiet: bool = False) -> ort.InferenceSession:
    """A CPU session with every graph optimization (the QDQ → integer-kernel fusions) and, because
    ORT's spinning workers starve torch's threads on a 2-core machine, no spinning. `quiet`: ORT logs no errors (a
    probe whose failure the caller reports)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 4 if quiet else 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for missing, corrupt or invalid files
        raise ModelFileError(f"ONNX model {str(path)!r} cannot be loaded by ONNX Runtime {ort.__version__} "
                             f"({_reason(e)}). "
                             "Fix: pass a file written by qatkit export, with an onnxruntime that supports its IR "
                             "version and opset (pip install -U onnxruntime)") from None


def _reason(e: Exception) -> str:
    """ONNX Runtime's message on one line, its end kept (a source location and C++ signature, then the reason)."""
    reason = " ".join(str(e).split())
    return reason if len(reason) <= 300 else "…" + reason[-300:]


def _feed(sess: ort.InferenceSession, x) -> dict[str, np.ndarray]:
    """The graph's inputs from x (a tensor, a tuple of the model's inputs in order, or a dict of them by name)."""
    names = [i.name for i in sess.get_inputs()]
    return {name: t.numpy() for name, t in zip(names, as_args(x, names))}


def run_all(sess: ort.InferenceSession, x) -> list[np.ndarray]:
    """Every output of the model, in order ("output", a tuple's "output_0", "output_1", ..., or a dict's by key)."""
    return sess.run(None, _feed(sess, x))


def run(sess: ort.InferenceSession, x) -> np.ndarray:
    """The (first) output."""
    return run_all(sess, x)[0]


# A float output's "step" relative to its largest magnitude: 16 float32 ulps there (ONNX Runtime's float ops, a
# LayerNorm's sums, round differently from PyTorch's by an ulp or a few).
FLOAT_OUTPUT_STEP = 2.0**-19


def output_steps(integer: IntegerModel, x) -> list[float | None]:
    """Each output's quantization step (its scale), or None for a float output."""
    result = next(n for n in integer.nodes if n["op"] == "output")["args"][0]
    values = call(integer.values, x)  # (not x's first sample: a graph's nodes, say, are no batch of samples)
    return [float(v.scale) if isinstance(v := values[r["node"]], QValue) and v.scale.numel() == 1 else None
            for r in (result if isinstance(result, list) else [result])]


def _sqnr_db(ref: np.ndarray, other: np.ndarray) -> float:
    noise = float(np.sum((ref - other) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(float(np.sum(ref**2)), 1e-30) / noise)


def per_layer(integer: IntegerModel, x) -> list[dict]:
    """For each integer tensor where ONNX Runtime and qatkit differ on `x`: fraction differing, largest
    difference in steps, and SQNR (dB) of the runtime's values against qatkit's."""
    from qatkit.export.onnx_qdq import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "debug.onnx"
        export_onnx(integer, path, x, debug_outputs=True)
        sess = session(path)
        names = [o.name for o in sess.get_outputs() if o.name.startswith("debug/")]
        outs = dict(zip(names, sess.run(names, _feed(sess, x))))
    values, rows = call(integer.values, x), []
    for name in names:
        mine = values[name[len("debug/"):]]
        if not isinstance(mine, QValue):
            continue
        diff = np.abs(outs[name].astype(np.int64) - mine.codes.numpy().astype(np.int64))
        if diff.max() > 0:
            scale = mine.scale.numpy()
            ref, got = mine.dequantize().numpy(), (outs[name].astype(np.float32) - mine.zero_point) * scale
            rows.append({"node": name[len("debug/"):], "differing": float((diff > 0).mean()), "max_steps": int(diff.max()),
                         "sqnr_db": round(float(_sqnr_db(ref, got)), 2)})
    return rows


def verify(onnx_path: str | os.PathLike | ort.InferenceSession, model, batches: Iterable, *, threads: int = 2,
           layers: bool = True) -> dict:
    """Run ONNX Runtime and qatkit's model (QAT or IntegerModel) on the same inputs and compare outputs; batches
    are x or (x, y) items, x a tensor, a tuple of the model's inputs or a dict of them by name (a dict batch's
    "labels" are left out). onnx_path: the ONNX file, or a session of it (`session`) to run again.

    Returns n (samples), top1_agreement (of the first output's predictions along its last axis: one per sample,
    or one per position of a sequence output), within_one_step (fraction of output values,
    all outputs, within one output quantization step; of a float output, within FLOAT_OUTPUT_STEP of its largest
    magnitude), max_step_diff, output_step (the first output's quantization step; None for a float output),
    and per_layer (where any integer tensor differs, from a second session of the graph with every integer tensor as
    an output, which ONNX Runtime may fuse otherwise; with layers=False, not looked for).
    """
    from qatkit.convert import convert

    integer = model if isinstance(model, IntegerModel) else convert(model)
    sess = onnx_path if isinstance(onnx_path, ort.InferenceSession) else session(onnx_path, threads)
    n = agree = predictions = within = total = 0
    max_diff, steps, first_x = 0.0, None, None
    for batch in batches:
        x, _ = split(batch)
        if first_x is None:
            first_x, steps = x, output_steps(integer, x)
        mine = call(integer, x)
        mine = [m.numpy() for m in output_list(mine)]
        try:
            theirs = run_all(sess, x)
        except Exception as e:  # noqa: BLE001 - ORT's errors for inputs of other names, counts, types or sizes
            theirs = _reason(e)
        if isinstance(theirs, str) or [t.shape for t in theirs] != [m.shape for m in mine]:
            got = theirs if isinstance(theirs, str) else f"outputs of shapes {[t.shape for t in theirs]}"
            raise ModelFileError(f"the ONNX model does not run on its reference model's inputs as the reference does "
                                 f"({got}; the reference's outputs: {[m.shape for m in mine]}); allowed: the ONNX "
                                 "export of the reference model. Fix: pass --reference with the model file (or QAT "
                                 "checkpoint) it was exported from")
        n += batch_size(x)
        same = mine[0].argmax(-1) == theirs[0].argmax(-1)  # top-1 of the first output
        agree, predictions = agree + int(same.sum()), predictions + same.size
        for m, t, step in zip(mine, theirs, steps):
            diff = np.abs(m - t) / (step if step is not None else float(np.abs(m).max() or 1.0) * FLOAT_OUTPUT_STEP)
            within += int((diff <= 1.0 + 1e-4).sum())
            total += diff.size
            max_diff = max(max_diff, float(diff.max()))
    if n == 0:
        raise DataError("verify got no batches; allowed: at least one batch of inputs. Fix: pass the test split's "
                        "batches")
    result = {"n": n, "top1_agreement": agree / max(predictions, 1), "within_one_step": within / max(total, 1),
              "max_step_diff": round(max_diff, 4), "output_step": steps[0] if steps else None}
    result["per_layer"] = per_layer(integer, first_x) if layers and max_diff > 0 and first_x is not None else []
    return result
