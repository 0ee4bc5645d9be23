"""A model's input in a batch: one tensor; a tuple or list of tensors, the model's positional arguments (a text
model's input_ids and attention_mask); or a dict of tensors, its arguments by name. Batches are x or (x, y), or a
dict of the model's named inputs and its labels under "labels" (or "label"), as Hugging Face's collators make them:
{"input_ids": ..., "attention_mask": ..., "labels": ...}."""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch

from qatkit.errors import DataError, bad_value

LABEL_KEYS = ("labels", "label")
ALLOWED = ("a tensor, a tuple or list of tensors (the model's positional inputs), or a dict of tensors (its inputs "
           "by name)")


def _shown(x) -> str:
    if isinstance(x, Mapping):
        return f"a dict of ({', '.join(f'{k}: {type(v).__name__}' for k, v in x.items())})"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of ({', '.join(type(t).__name__ for t in x)})"
    return type(x).__name__


def as_args(x, names: Sequence[str] | None = None) -> tuple[torch.Tensor, ...]:
    """The model's inputs as a tuple: a dict's in the order of `names` (the model's input names), where given."""
    if isinstance(x, torch.Tensor):
        return (x,)
    values = list(x.values()) if isinstance(x, Mapping) else x
    if isinstance(x, (tuple, list, Mapping)) and x and all(isinstance(t, torch.Tensor) for t in values):
        if not isinstance(x, Mapping) or names is None:
            return tuple(values)
        missing, unknown = [n for n in names if n not in x], [k for k in x if k not in names]
        if missing or unknown:
            raise DataError(f"inputs by name {list(x)} do not match the model's inputs {list(names)} (missing: "
                            f"{missing or 'none'}; unknown: {unknown or 'none'}). Fix: give each of the model's inputs "
                            "under its forward argument's name, and nothing else")
        return tuple(x[n] for n in names)
    raise bad_value("model input", _shown(x), ALLOWED, "yield batches as x or (x, y), x a tensor, a tuple such as "
                    "(input_ids, attention_mask) or a dict such as {'input_ids': ..., 'attention_mask': ...}; or dict "
                    "batches with the labels under 'labels'", DataError)


def _like(x, args: tuple):
    """args (as_args(x) changed) in x's form."""
    if isinstance(x, torch.Tensor):
        return args[0]
    return dict(zip(x, args)) if isinstance(x, Mapping) else type(x)(args)


def to_device(x, device: str | torch.device):
    """x on `device` (each tensor of a tuple, list or dict)."""
    return _like(x, tuple(t.to(device) for t in as_args(x)))


def call(model, x):
    """model(x), model(*x) for several inputs, model(**x) for named ones."""
    if not isinstance(x, Mapping):
        return model(*as_args(x))
    as_args(x)  # tensors only
    try:
        return model(**x)
    except TypeError:  # the names forward does not take, said so; any other TypeError is the model's own
        signature = inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model)
        try:
            signature.bind(**x)
        except TypeError as e:
            raise DataError(f"inputs by name {list(x)} do not fit {type(model).__name__}.forward{signature} ({e}). "
                            "Fix: name each input as forward's argument (labels under 'labels')") from None
        raise


def first(x):
    """The first sample of x (of each of its tensors): an export's example."""
    return _like(x, tuple(t[:1] for t in as_args(x)))


def batch_size(x) -> int:
    return as_args(x)[0].shape[0]


def split(batch) -> tuple[object, torch.Tensor | None]:
    """(x, y) of a batch: x, (x, y), or a dict with the labels under "labels" or "label"; y None where there is none."""
    if isinstance(batch, Mapping):
        y = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, y
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1] if len(batch) > 1 else None
    return batch, None


def labelled(batch) -> tuple[object, torch.Tensor]:
    """(x, y) of a batch that must hold labels (training, evaluation)."""
    x, y = split(batch)
    pair = isinstance(batch, Mapping) or (isinstance(batch, (tuple, list)) and len(batch) == 2)
    if not pair or not isinstance(y, torch.Tensor):
        shown = _shown(batch) if isinstance(batch, (Mapping, tuple, list)) else type(batch).__name__
        raise bad_value("batch", shown, "(x, y) pairs, or dicts of the model's named inputs with the labels tensor "
                        "under 'labels' (or 'label')", "yield (inputs, labels) pairs, or add the labels to each dict "
                        "batch as 'labels'", DataError)
    return x, y


def shape_text(sizes: list[int | None]) -> str:
    """A prepared model's input shape: (batch, any, 6) for sizes [None, None, 6] (None: any size)."""
    return "(" + ", ".join("batch" if i == 0 else "any" if n is None else str(n) for i, n in enumerate(sizes)) + ")"


def input_kind(x: torch.Tensor) -> str | None:
    """What an input tensor holds, as prepare records it from the example: "float" values or "integer" ids (None
    for a mask of bools, which models take as either)."""
    return "float" if x.is_floating_point() else None if x.dtype == torch.bool else "integer"


def check_sizes(name: str, sizes: list[int | None] | None, x, kind: str | None = None) -> None:
    """Refuse an input tensor not shaped as a prepared model's graph takes it: `sizes` per axis, None where any size
    is taken (prepare's qat_info.input_sizes; None: not recorded, anything goes), or not of the example's `kind`
    (input_kind: uint8 pixels where float images were prepared, or float ids; None: anything goes)."""
    if not isinstance(x, torch.Tensor):
        return
    if kind is not None and input_kind(x) not in (None, kind):
        fix = ("convert and normalise images as in training (x.float() / 255, then the mean and std)" if kind == "float"
               else "pass the integer ids (x.long())")
        raise DataError(f"input '{name}' holds {str(x.dtype).replace('torch.', '')} values; this model takes {kind} "
                        f"values (prepare's example did). Fix: {fix}")
    if sizes is None:
        return
    if x.dim() != len(sizes) or any(n is not None and m != n for m, n in zip(x.shape, sizes)):
        raise DataError(f"input '{name}' has shape {tuple(x.shape)}; this model takes {shape_text(sizes)}: prepare's "
                        "example had those sizes, and at others its traced graph does not compute what the model "
                        "computes (a loop unrolled along the example's length), or the model itself takes no other "
                        "size. Fix: pass inputs of that shape (pad or cut them), or prepare the model with an example "
                        "of the size it is trained and deployed at")
