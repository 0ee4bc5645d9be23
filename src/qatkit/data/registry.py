"""`load_dataset`: one entry point that picks the loader by name and applies `limit`."""
from __future__ import annotations

import os

from qatkit.data.base import ImageDataset
from qatkit.data.cifar import load_cifar10
from qatkit.data.digits import load_digits
from qatkit.data.folder import load_folder
from qatkit.data.idx import load_mnist
from qatkit.data.text import TextDataset, load_sst2, load_tsv_folder
from qatkit.errors import ConfigError, bad_value

DATASET_NAMES = ("digits", "mnist", "cifar10", "folder", "sst2", "tsv")
TEXT_DATASETS = {"sst2": load_sst2, "tsv": load_tsv_folder}
_LOADERS = {"mnist": load_mnist, "cifar10": load_cifar10, "folder": load_folder}


def load_dataset(name: str, path: str | None = None, *, limit: int | None = None, vocab: list[str] | None = None,
                 max_len: int | None = None) -> ImageDataset | TextDataset:
    """Load dataset `name` from `path` (the --data option; digits needs none).

    limit: keep only the first `limit` samples of each split, for quick runs.
    vocab, max_len: for text datasets, encode with a trained model's vocabulary and length (its recipe's).
    """
    if name not in DATASET_NAMES:
        raise bad_value("--dataset", name, ", ".join(DATASET_NAMES), "pick one of those")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise bad_value("--data", path, "a path (str or os.PathLike), or unset", "pass --data as a folder or file path")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise bad_value("--limit", limit, "an integer >= 1, or unset for all samples", "pass --limit 1 or more")
    if name == "digits":
        if path is not None:
            raise ConfigError(f"--data {str(path)!r} was given, but dataset 'digits' is bundled with scikit-learn "
                              "and reads no files; allowed: no --data. Fix: drop --data")
        dataset = load_digits()
    elif name in TEXT_DATASETS:
        dataset = TEXT_DATASETS[name](path, vocab=vocab, max_len=max_len)
    else:
        dataset = _LOADERS[name](path)
    return dataset if limit is None else dataset.head(limit)
