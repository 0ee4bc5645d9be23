"""scikit-learn's bundled 8x8 digits: a dataset that needs no download, for quick runs and tests."""
from __future__ import annotations

import torch
from sklearn.datasets import load_digits as sklearn_digits
from sklearn.model_selection import train_test_split

from qatkit.data.base import ImageDataset, Split, channel_stats


def load_digits() -> ImageDataset:
    """1797 images, stratified 80/20 into 1437 train / 360 test, the same split on every call."""
    x, y = sklearn_digits(return_X_y=True)  # x: (1797, 64) float64 in 0..16
    x = (x / 16.0).astype("float32").reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    train = Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long())
    test = Split(torch.from_numpy(x_te), torch.from_numpy(y_te).long())
    mean, std = channel_stats(train.x)
    return ImageDataset("digits", train, test, num_classes=10, in_channels=1, image_size=8, mean=mean, std=std)
