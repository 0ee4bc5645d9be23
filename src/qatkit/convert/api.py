"""`qatkit.convert`: trained QAT model → IntegerModel."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from qatkit.convert.ir import to_ir
from qatkit.convert.runtime import IntegerModel
from qatkit.devices import check_dtype, module_device
from qatkit.errors import QatkitError
from qatkit.modes import evaluating
from qatkit.nn import QEmbedding, QLayer
from qatkit.quantizer import check_qat_model, check_ranges


def convert(qat_model: nn.Module) -> IntegerModel:
    """The integer model of a calibrated/trained QAT model: int8 or packed int4/int2 weights with
    per-channel scales, int32 biases, integer activations; computes the QAT model's eval outputs."""
    check_qat_model(qat_model, "convert")
    if not isinstance(qat_model, fx.GraphModule):
        untraced = "; ".join(getattr(getattr(qat_model, "qat_info", None), "untraced", [])) or "the model"
        raise QatkitError(f"convert needs a graph, but {untraced} could not be traced by torch.fx. Fix: remove "
                          "data-dependent control flow from forward (branch on shapes, not tensor values; torch.where "
                          "computes both ways) and pass example_inputs to qatkit.prepare")
    check_dtype(qat_model, "convert")
    check_ranges(qat_model, "convert")
    if bad := [name for name, m in qat_model.named_modules() if isinstance(m, (QLayer, QEmbedding))
               and not all(bool(torch.isfinite(t).all()) for t in _weights(m) if t is not None)]:
        raise QatkitError(f"layer {bad[0]!r} has NaN or Inf weights or bias ({len(bad)} such layer(s)); allowed: "
                          "finite values (the QAT model computes NaN there, the integer model could not). Fix: train "
                          "again from the last good checkpoint, with a lower lr or TrainConfig(nonfinite='skip')")
    if module_device(qat_model).type != "cpu":  # the integer model runs on the CPU; the QAT model stays where it is
        qat_model = copy.deepcopy(qat_model).cpu()
    with evaluating(qat_model):
        nodes, tensors = to_ir(qat_model)
    info = getattr(qat_model, "qat_info", None)
    meta = {"layers": info.layers, "float_ops": info.float_ops} if info is not None else {}
    return IntegerModel(nodes, tensors, meta)


def _weights(layer) -> tuple:
    """A layer's weight and bias as the integer model stores them (folded; an embedding's table)."""
    return layer.folded() if isinstance(layer, QLayer) else (layer.weight,)
