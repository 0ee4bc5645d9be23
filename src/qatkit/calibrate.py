"""Range initialisation from data: observe activations on a few batches, then set scales."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from qatkit.quantizer import FakeQuantizer


def act_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    return [m for m in model.modules() if isinstance(m, FakeQuantizer) and m.kind == "act"]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int = 8, device: str | torch.device = "cpu") -> int:
    """Set every activation quantizer's range from `num_batches` batches (x or (x, y) items).

    Runs in eval mode (BN statistics untouched) with activation quantization off, so each quantizer
    sees the float activations; weights stay quantized. Returns the number of batches used.
    """
    quantizers = act_quantizers(model)
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.start_observing()
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            used += 1
    finally:
        for q in quantizers:
            q.finish_observing()
        model.train(was_training)
    return used
