"""Datasets held in memory as uint8/float32 tensors, and a fast deterministic batch loader over them."""
from qatkit.data.base import ImageDataset, Split
from qatkit.data.loader import BatchLoader
from qatkit.data.registry import DATASET_NAMES, load_dataset

__all__ = ["DATASET_NAMES", "BatchLoader", "ImageDataset", "Split", "load_dataset"]
