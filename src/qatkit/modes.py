"""A model's train/eval mode, module by module."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() inside the block; after it, every module back in its own mode (model.train(was_training) would
    put a BatchNorm the user keeps in eval inside a training model back into train, to update its statistics)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
