"""Datasets held in memory as uint8/float32 images or int64 token ids, and a fast deterministic batch loader over them."""
from qatkit.data.base import ImageDataset, Split
from qatkit.data.loader import BatchLoader
from qatkit.data.registry import DATASET_NAMES, TEXT_DATASETS, load_dataset
from qatkit.data.text import TextDataset

__all__ = ["DATASET_NAMES", "TEXT_DATASETS", "BatchLoader", "ImageDataset", "Split", "TextDataset", "load_dataset"]
