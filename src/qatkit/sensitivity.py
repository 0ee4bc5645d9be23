"""Which layers lose most when quantized: each quantizable layer alone (its weight, input and output quantized as the
whole model quantizes them, every other layer and op in float), against the float model on a few batches; and the
whole model so quantized. The layers at the top of the list are those to keep at more bits (LayerRule) when the
whole model loses too much."""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from qatkit import inputs
from qatkit.calibrate import calibrate
from qatkit.config import QATConfig
from qatkit.devices import module_device
from qatkit.errors import DataError, bad_value
from qatkit.modes import evaluating
from qatkit.prepare import prepare
from qatkit.quantizer import FakeQuantizer
from qatkit.train.loop import IGNORE_INDEX, count_hits, logits_of, per_target


@torch.no_grad()
def sensitivity(model: nn.Module, config: QATConfig, example_inputs, batches: Iterable, *,
                num_batches: int = 4) -> dict:
    """Quantize the model as `config` would (its bits, first/last bits and rules), calibrate it on `num_batches`
    batches (x or (x, y) items, as `calibrate` takes them) and compare its logits there with the float model's, each
    quantized layer alone (its weight quantizer, its input's and its output's; the others off) and all of them: SQNR in
    dB (10·log10 of the float logits' energy over the difference's), top-1 agreement (over the labelled positions,
    where the batches hold labels with -100s) and, where the batches hold labels, accuracy. Returns {"model": the
    same for every layer quantized, "float_accuracy": ..., "samples": how many were compared, "layers": one row per
    layer, the most sensitive (lowest SQNR) first}."""
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise bad_value("num_batches", num_batches, "an integer >= 1", "pass num_batches=1 or more")
    pairs = [inputs.split(b) for b in islice(batches, num_batches)]
    if not pairs:
        raise DataError("sensitivity got no batches; allowed: at least one batch. Fix: pass the data's batches")
    device = module_device(model)  # where the QAT model is too
    labelled = all(isinstance(y, torch.Tensor) for _, y in pairs)
    xs = [inputs.to_device(x, device) for x, _ in pairs]
    ys = [y.to(device) for _, y in pairs] if labelled else None
    with evaluating(model):
        reference = [logits_of(inputs.call(model, x)).double() for x in xs]
    with warnings.catch_warnings():  # prepare's notes (float ops, traced along the example) are for prepare's caller
        warnings.simplefilter("ignore")
        qat = prepare(model, config, example_inputs)
    calibrate(qat, xs, num_batches=len(xs))
    qat.eval()
    inputs.call(qat, xs[0])  # (each layer records its input's quantizer, while every quantizer is on)
    layers = qat.qat_info.layers  # the quantized ones (a rule's skip=True leaves a layer out)
    owns = [{getattr(qat.get_submodule(layer["name"]), name, None) for name in ("weight_quant", "out_quant",
                                                                                "last_input_quant")} for layer in layers]
    enabled = {q: bool(q.enabled) for q in qat.modules() if isinstance(q, FakeQuantizer)}
    rows = []
    try:
        for layer, own in zip(layers, owns):
            for q, on in enabled.items():
                q.enabled.fill_(on and q in own)
            rows.append({"layer": layer["name"], "type": layer["type"], "weight_bits": layer["weight_bits"],
                         "act_bits": layer["act_bits"], **_compare(qat, xs, ys, reference)})
    finally:
        for q, on in enabled.items():
            q.enabled.fill_(on)
    rows.sort(key=lambda r: r["sqnr_db"])
    result = {"model": _compare(qat, xs, ys, reference),
              "samples": sum(inputs.batch_size(x) for x in xs), "layers": rows}
    if labelled:
        result["float_accuracy"] = _accuracy(reference, ys)
    return result


def _compare(qat: nn.Module, xs: list, ys: list | None, reference: list[torch.Tensor]) -> dict:
    """SQNR (dB) and top-1 agreement of the QAT model's eval logits against the float ones; accuracy."""
    got = [logits_of(inputs.call(qat, x)).double() for x in xs]
    signal = sum(float((r ** 2).sum()) for r in reference)
    noise = sum(float(((g - r) ** 2).sum()) for g, r in zip(got, reference))
    agree = total = 0
    for i, (g, r) in enumerate(zip(got, reference)):
        axis = 1 if r.dim() >= 4 else -1  # dense predictions: classes on axis 1
        same = g.argmax(axis) == r.argmax(axis)
        y = None if ys is None else ys[i]
        counted = y != IGNORE_INDEX if y is not None and not y.is_floating_point() and y.shape == same.shape else None
        agree += int(same.sum() if counted is None else (same & counted).sum())
        total += same.numel() if counted is None else int(counted.sum())
    row = {"sqnr_db": math.inf if noise == 0 else round(10 * math.log10(max(signal, 1e-300) / noise), 2),
           "top1_agreement": agree / max(total, 1)}
    if ys is not None:
        row["accuracy"] = _accuracy(got, ys)
    return row


def _accuracy(logits: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    hits, counted = zip(*(count_hits(*per_target(out, y)) for out, y in zip(logits, ys)))
    return sum(hits) / max(sum(counted), 1)
