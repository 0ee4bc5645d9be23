"""Which layers lose most when quantized: each quantizable layer alone at the config's bits (every other layer left
in float), calibrated, against the float model on a few batches; and the whole model so quantized. The layers at the
top of the list are those to keep at more bits (LayerRule) when the whole model loses too much."""
from __future__ import annotations

import dataclasses
import glob
import math
import warnings
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from qatkit import inputs
from qatkit.calibrate import calibrate
from qatkit.config import LayerRule, QATConfig
from qatkit.devices import module_device
from qatkit.errors import DataError, bad_value
from qatkit.prepare import prepare
from qatkit.train.loop import count_hits, logits_of, per_target


@torch.no_grad()
def sensitivity(model: nn.Module, config: QATConfig, example_inputs, batches: Iterable, *,
                num_batches: int = 4) -> dict:
    """Quantize each of the model's quantizable layers alone, as `config` would (its bits, first/last bits and
    rules), calibrate it on `num_batches` batches (x or (x, y) items, as `calibrate` takes them) and compare its
    logits there with the float model's: SQNR in dB (10·log10 of the float logits' energy over the difference's),
    top-1 agreement and, where the batches hold labels, accuracy. Returns {"model": the same for every layer
    quantized, "float_accuracy": ..., "samples": how many were compared, "layers": one row per layer, the most
    sensitive (lowest SQNR) first}."""
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise bad_value("num_batches", num_batches, "an integer >= 1", "pass num_batches=1 or more")
    pairs = [inputs.split(b) for b in islice(batches, num_batches)]
    if not pairs:
        raise DataError("sensitivity got no batches; allowed: at least one batch. Fix: pass the data's batches")
    device = module_device(model)  # where the QAT models are too
    labelled = all(isinstance(y, torch.Tensor) for _, y in pairs)
    xs = [inputs.to_device(x, device) for x, _ in pairs]
    ys = [y.to(device) for _, y in pairs] if labelled else None
    was_training = model.training
    model.eval()
    try:
        reference = [logits_of(inputs.call(model, x)).double() for x in xs]
    finally:
        model.train(was_training)
    with warnings.catch_warnings():  # prepare's notes (float ops, traced along the example) are the same every time
        warnings.simplefilter("ignore")
        whole = prepare(model, config, example_inputs)
        layers = whole.qat_info.layers  # the quantized ones (a rule's skip=True leaves a layer out)
        rows = []
        for layer in layers:
            skip = tuple(LayerRule(pattern=glob.escape(other["name"]), skip=True) for other in layers if other is not layer)
            alone = prepare(model, dataclasses.replace(config, rules=config.rules + skip), example_inputs)
            rows.append({"layer": layer["name"], "type": layer["type"], "weight_bits": layer["weight_bits"],
                         "act_bits": layer["act_bits"], **_compare(alone, xs, ys, reference)})
    rows.sort(key=lambda r: r["sqnr_db"])
    result = {"model": _compare(whole, xs, ys, reference),
              "samples": sum(inputs.batch_size(x) for x in xs), "layers": rows}
    if labelled:
        result["float_accuracy"] = _accuracy(reference, ys)
    return result


def _compare(qat: nn.Module, xs: list, ys: list | None, reference: list[torch.Tensor]) -> dict:
    """SQNR (dB) and top-1 agreement of the calibrated QAT model's eval logits against the float ones; accuracy."""
    calibrate(qat, xs, num_batches=len(xs))
    qat.eval()
    got = [logits_of(inputs.call(qat, x)).double() for x in xs]
    signal = sum(float((r ** 2).sum()) for r in reference)
    noise = sum(float(((g - r) ** 2).sum()) for g, r in zip(got, reference))
    axis = 1 if reference[0].dim() >= 4 else -1  # dense predictions: classes on axis 1
    agree = sum(int((g.argmax(axis) == r.argmax(axis)).sum()) for g, r in zip(got, reference))
    total = sum(r.argmax(axis).numel() for r in reference)
    row = {"sqnr_db": math.inf if noise == 0 else round(10 * math.log10(max(signal, 1e-300) / noise), 2),
           "top1_agreement": agree / total}
    if ys is not None:
        row["accuracy"] = _accuracy(got, ys)
    return row


def _accuracy(logits: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    hits, counted = zip(*(count_hits(*per_target(out, y)) for out, y in zip(logits, ys)))
    return sum(hits) / max(sum(counted), 1)
