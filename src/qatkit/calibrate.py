"""Range initialisation from data: observe activations on a few batches, then set scales."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from qatkit import inputs
from qatkit.devices import check_available, module_device
from qatkit.errors import DataError, bad_value
from qatkit.modes import evaluating
from qatkit.quantizer import FakeQuantizer, check_qat_model


def act_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    return [m for m in model.modules() if isinstance(m, FakeQuantizer) and m.kind == "act"]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int = 8,
              device: str | torch.device | None = None) -> int:
    """Set every activation quantizer's range from `num_batches` batches (x or (x, y) items, x a tensor or a tuple
    or dict of the model's inputs; or dicts with the labels under "labels"), run on `device` (default: where the
    model's weights are).

    Runs in eval mode (BN statistics untouched) with activation quantization off, so each quantizer
    sees the float activations; weights stay quantized. Returns the number of batches used.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise bad_value("num_batches", num_batches, "an integer >= 1", "pass num_batches=1 or more (TrainConfig.calib_batches)")
    check_qat_model(model, "calibrate")
    if device is not None:
        check_available(device)
    device = module_device(model) if device is None else device
    quantizers = act_quantizers(model)
    for q in quantizers:
        q.start_observing()
    used = 0
    try:
        with evaluating(model):
            for batch in batches:
                if used >= num_batches:
                    break
                x, _ = inputs.split(batch)
                for t in inputs.as_args(x):
                    _check_batch(t, used)
                inputs.call(model, inputs.to_device(x, device))
                used += 1
    finally:
        for q in quantizers:
            q.finish_observing()
    if used == 0:
        raise DataError("calibration batches yielded none; allowed: at least one batch. Fix: pass the training "
                        "batches (a DataLoader, a list of (x, y)) and check that the split is not empty")
    return used


def _check_batch(x, index: int) -> None:
    """An empty batch has no range to observe; a NaN/inf input would silently turn every observed range (and so
    every scale) into NaN/inf."""
    if isinstance(x, torch.Tensor) and x.numel() == 0:
        raise bad_value(f"calibration batch {index} (0-based)", f"an empty tensor of shape {tuple(x.shape)}",
                        "batches of at least one sample", f"drop batch {index} from the calibration data", DataError)
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        bad = int(x.numel() - torch.isfinite(x).sum())
        if bad:
            raise bad_value(f"calibration batch {index} (0-based)", f"{bad} non-finite (NaN/inf) of {x.numel()} values",
                            "finite inputs only", f"clean or drop batch {index} of the calibration data", DataError)
