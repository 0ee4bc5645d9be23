"""The bundled scikit-learn digits: shapes, counts, class balance and a split that never changes."""
import torch

from qatkit.data import load_dataset


def test_digits_shapes_counts_and_range():
    ds = load_dataset("digits")
    assert (len(ds.train), len(ds.test)) == (1437, 360)
    assert ds.train.x.shape == (1437, 1, 8, 8) and ds.train.x.dtype == torch.float32
    assert ds.train.y.dtype == torch.int64
    assert 0.0 <= ds.train.x.min() and ds.train.x.max() == 1.0
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 8)
    # mean/std are the train split's own
    assert abs(ds.mean[0] - ds.train.x.double().mean().item()) < 1e-9
    assert abs(ds.std[0] - ds.train.x.double().std(unbiased=False).item()) < 1e-9


def test_digits_split_is_stratified():
    ds = load_dataset("digits")
    train_counts, test_counts = ds.train.y.bincount(), ds.test.y.bincount()
    assert len(train_counts) == len(test_counts) == 10
    # 20% of each class, rounded either way, lands in test
    assert ((test_counts.double() / (train_counts + test_counts) - 0.2).abs() < 0.01).all()


def test_digits_split_is_deterministic():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    # pinned, so a change of split method or seed shows up
    assert a.test.y[:12].tolist() == [7, 6, 3, 7, 7, 3, 2, 8, 9, 3, 2, 6]
    assert a.train.y[:12].tolist() == [3, 9, 1, 3, 1, 9, 4, 4, 2, 8, 3, 5]
