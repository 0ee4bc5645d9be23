"""A model's input in a batch: one tensor, or a tuple or list of tensors, the model's positional arguments
(a text model's input_ids and attention_mask). Batches are x or (x, y): a model of two inputs takes
((input_ids, attention_mask), labels) items."""
from __future__ import annotations

import torch

from qatkit.errors import DataError, bad_value


def as_args(x) -> tuple[torch.Tensor, ...]:
    """The model's positional arguments."""
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(x)
    shown = (f"a {type(x).__name__} of ({', '.join(type(t).__name__ for t in x)})" if isinstance(x, (tuple, list))
             else type(x).__name__)
    raise bad_value("model input", shown, "a tensor, or a tuple or list of tensors (the model's positional inputs)",
                    "yield batches as x or (x, y), x a tensor or a tuple such as (input_ids, attention_mask)", DataError)


def to_device(x, device: str | torch.device):
    """x on `device` (each tensor of a tuple or list)."""
    args = tuple(t.to(device) for t in as_args(x))
    return args[0] if isinstance(x, torch.Tensor) else type(x)(args)


def call(model, x):
    """model(x), or model(*x) for several inputs."""
    return model(*as_args(x))


def first(x):
    """The first sample of x (of each of its tensors): an export's example."""
    args = tuple(t[:1] for t in as_args(x))
    return args[0] if isinstance(x, torch.Tensor) else args


def batch_size(x) -> int:
    return as_args(x)[0].shape[0]
