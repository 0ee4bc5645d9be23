"""Latency benchmark, in one process: PyTorch fp32, ORT fp32, qatkit's int8 QDQ export and ONNX Runtime's
own `quantize_static` on the same float weights, at several batch sizes.

Variants are timed interleaved (A B C D, then B C D A, ...: the order rotates every round) so that drift
in clock speed or background load hits them all alike; each sample is the mean over enough calls for
~20 ms of work, and the report gives medians (p10/p90) over rounds plus per-round speed ratios.
Everyone gets the same number of intra-op threads; ORT's threads do not spin (they would starve torch's).
"""
from __future__ import annotations

import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from qatkit.errors import bad_value
from qatkit.export.onnx_qdq import export_onnx
from qatkit.export.ort import session

RUNTIMES = ("torch-fp32", "ort-fp32", "ort-int8-qatkit", "ort-int8-quantize_static")
MIN_SAMPLE_S = 0.02  # each timing sample covers at least this much work


def check_batches(batches: Sequence[int], name: str = "batches") -> None:
    """Batch sizes to time: integers >= 1, each once."""
    if not batches or min(batches) < 1:
        raise bad_value(name, list(batches), "integers >= 1", "pass e.g. --batches 1 32")
    if len(set(batches)) != len(batches):
        raise bad_value(name, list(batches), "each batch size once", "drop the repeated size")


# ---------------------------------------------------------------------------------------------- exports
def export_float(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The float model as ONNX (legacy TorchScript exporter, dynamic batch, opset 17)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning and tracer warnings
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=17)
    return path


class _Batches:
    """onnxruntime.quantization.CalibrationDataReader over a list of tensors."""

    def __init__(self, input_name: str, batches: Sequence[torch.Tensor]):
        self.input_name = input_name
        self.batches = [(b.float() if b.is_floating_point() else b).detach().numpy() for b in batches]  # ids stay int64
        self.it = iter(self.batches)

    def get_next(self):
        x = next(self.it, None)
        return None if x is None else {self.input_name: x}

    def rewind(self):
        self.it = iter(self.batches)


def quantize_static_baseline(float_path: Path, out_path: Path, calib_batches: Sequence[torch.Tensor]) -> Path:
    """ORT's own static quantization of the float ONNX: QDQ, per-channel int8 weights, uint8 activations,
    MinMax calibration on `calib_batches` (after `quant_pre_process` where that succeeds)."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = float_path
    pre = out_path.with_name(out_path.stem + "_pre.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(float_path), str(pre))
        source = pre
    except Exception as e:  # noqa: BLE001 - the pre-processing is optional; quantize without it
        warnings.warn(f"quant_pre_process failed ({type(e).__name__}: {e}); quantizing the raw float ONNX", stacklevel=2)
    reader = _Batches(ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()[0].name,
                      calib_batches)
    q.quantize_static(str(source), str(out_path), reader, quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    pre.unlink(missing_ok=True)
    return out_path


# ---------------------------------------------------------------------------------------------- timing
def _ort_fn(sess: ort.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
    name, out = sess.get_inputs()[0].name, [sess.get_outputs()[0].name]
    return lambda x: sess.run(out, {name: x})[0]


def _torch_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x):
        with torch.inference_mode():
            return model(x)
    return fn


def calls_for(fn: Callable, x, warmup: int) -> int:
    """Run `warmup` calls (at least one) and return how many calls make one sample of ≥ MIN_SAMPLE_S."""
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn(x)
    per_call = (time.perf_counter() - start) / max(warmup, 1)
    return max(1, math.ceil(MIN_SAMPLE_S / max(per_call, 1e-7)))


def time_ms(fn: Callable, x, calls: int) -> float:
    """Milliseconds per call, averaged over `calls` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - start) * 1e3 / calls


def interleaved(fns: dict[str, Callable], inputs: dict[str, dict[int, object]], batches: Sequence[int],
                rounds: int, warmup: int) -> dict[tuple[str, int], list[float]]:
    """Samples (ms per call) per (runtime, batch): each round times every batch with every runtime, in an
    order rotated by one each round."""
    names = list(fns)
    calls = {(n, b): calls_for(fns[n], inputs[n][b], warmup) for b in batches for n in names}
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for b in batches:
            for n in order:
                samples[(n, b)].append(time_ms(fns[n], inputs[n][b], calls[(n, b)]))
    return samples


# ---------------------------------------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.platform()}; {cpu or platform.machine()}; {os.cpu_count()} logical CPUs"


def _top1(a, b) -> float:
    return float((np.asarray(a).argmax(-1) == np.asarray(b).argmax(-1)).mean())


def bench(float_model: nn.Module, qat_model: nn.Module, example: torch.Tensor, calib_batches: list[torch.Tensor], *,
          batches: Sequence[int] = (1, 32), threads: int = 2, rounds: int = 15, warmup: int = 3,
          workdir: str | os.PathLike | None = None) -> dict:
    """Latency of the four RUNTIMES at each batch size (see the module docstring); the model files are
    written to a temporary folder inside `workdir` (default: the system's) and removed afterwards."""
    check_batches(batches)
    float_model, qat_model = float_model.eval(), qat_model.eval()
    tmp = Path(tempfile.mkdtemp(prefix="qatkit-bench-", dir=workdir))
    previous_threads = torch.get_num_threads()
    try:
        paths = {"ort-fp32": export_float(float_model, example[:1], tmp / "float.onnx"),
                 "ort-int8-qatkit": tmp / "qatkit_int8.onnx"}
        export_onnx(qat_model, paths["ort-int8-qatkit"], example[:1])
        paths["ort-int8-quantize_static"] = quantize_static_baseline(paths["ort-fp32"], tmp / "quantize_static.onnx",
                                                                     calib_batches)
        model_bytes = {n: p.stat().st_size for n, p in paths.items()}
        torch.save(float_model.state_dict(), tmp / "float.pt")
        model_bytes["torch-fp32"] = (tmp / "float.pt").stat().st_size
        torch.set_num_threads(threads)
        fns = {"torch-fp32": _torch_fn(float_model), **{n: _ort_fn(session(p, threads)) for n, p in paths.items()}}

        pool = torch.cat(list(calib_batches))  # real samples (images or token ids), repeated up to the batch size
        xs = {b: pool[torch.arange(b) % len(pool)] for b in batches}
        inputs = {n: (xs if n == "torch-fp32" else {b: x.numpy() for b, x in xs.items()}) for n in RUNTIMES}

        reference = fns["torch-fp32"](pool).numpy()  # sanity only, never a gate (on every sample: on one, 0 or 1)
        agreement = {n: _top1(fns[n](pool.numpy()), reference) for n in RUNTIMES[2:]}

        samples = interleaved(fns, inputs, batches, rounds, warmup)
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [{"runtime": n, "batch": b, "median_ms": float(np.median(s := samples[(n, b)])),
             "p10_ms": float(np.percentile(s, 10)), "p90_ms": float(np.percentile(s, 90)), "model_bytes": model_bytes[n]}
            for b in batches for n in RUNTIMES]
    ratios = []
    for b in batches:
        q8, fp, qs = (np.array(samples[(n, b)]) for n in ("ort-int8-qatkit", "ort-fp32", "ort-int8-quantize_static"))
        per_round = [{"qatkit_int8_vs_ort_fp32": float(a), "qatkit_int8_vs_quantize_static": float(c)}
                     for a, c in zip(q8 / fp, q8 / qs)]
        ratios.append({"batch": b, "qatkit_int8_vs_ort_fp32": float(np.median(q8 / fp)),
                       "qatkit_int8_vs_quantize_static": float(np.median(q8 / qs)), "per_round": per_round})
    return {"rows": rows, "ratios": ratios, "threads": threads, "rounds": rounds, "machine": machine(),
            "ort_version": ort.__version__, "torch_version": torch.__version__,
            "top1_agreement_vs_torch_fp32": agreement}


def format_table(result: dict) -> str:
    """The result as a plain-text table (one line per runtime and batch), with the ratios below it."""
    lines = [f"{result['machine']}", f"threads={result['threads']} rounds={result['rounds']} "
             f"onnxruntime {result['ort_version']} torch {result['torch_version']}", "",
             f"{'runtime':<26}{'batch':>6}{'median ms':>12}{'p10 ms':>10}{'p90 ms':>10}{'model bytes':>13}"]
    for r in result["rows"]:
        lines.append(f"{r['runtime']:<26}{r['batch']:>6}{r['median_ms']:>12.3f}{r['p10_ms']:>10.3f}"
                     f"{r['p90_ms']:>10.3f}{r['model_bytes']:>13,}")
    lines.append("")
    for r in result["ratios"]:
        lines.append(f"batch {r['batch']}: int8-qatkit / ort-fp32 = {r['qatkit_int8_vs_ort_fp32']:.3f}, "
                     f"int8-qatkit / quantize_static = {r['qatkit_int8_vs_quantize_static']:.3f} (medians of per-round ratios)")
    agreement = result.get("top1_agreement_vs_torch_fp32", {})
    if agreement:
        lines.append("top-1 agreement with torch-fp32 on the example batch (sanity check): "
                     + ", ".join(f"{n} {a:.3f}" for n, a in agreement.items()))
    return "\n".join(lines)


__all__ = ["RUNTIMES", "bench", "export_float", "format_table", "quantize_static_baseline"]
