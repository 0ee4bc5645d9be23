"""BatchLoader: coverage, determinism per (seed, epoch), exact normalisation and crop-flip."""
import pytest
import torch

from qatkit.data import BatchLoader, Split
from qatkit.errors import ConfigError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _split(n=50, size=8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    return Split(x, torch.arange(n))  # label = sample index, so batches show which samples they hold


def _loader(split, **kw):
    return BatchLoader(split, **{"batch_size": 16, "mean": MEAN, "std": STD, "shuffle": True, **kw})


def _labels(loader):
    return [y.tolist() for _, y in loader]


def test_every_sample_once_per_epoch():
    loader = _loader(_split())
    batches = _labels(loader)
    assert len(loader) == len(batches) == 4 and [len(b) for b in batches] == [16, 16, 16, 2]
    assert sorted(sum(batches, [])) == list(range(50)) and loader.num_samples == 50
    dropped = _loader(_split(), drop_last=True)
    assert len(dropped) == 3 and dropped.num_samples == 48 and len(sum(_labels(dropped), [])) == 48


def test_order_depends_only_on_seed_and_epoch():
    a, b = _loader(_split(), seed=3), _loader(_split(), seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    rng_before = torch.get_rng_state()
    assert _labels(a) == _labels(b) == _labels(a)  # repeatable, even on the same loader
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is never used
    b.set_epoch(6)
    assert _labels(a) != _labels(b)
    assert _labels(_loader(_split(), seed=4)) != _labels(_loader(_split(), seed=3))
    assert sum(_labels(_loader(_split(), shuffle=False)), []) == list(range(50))


def test_normalisation_matches_a_float64_reference():
    split = _split()
    (x, y), *_ = _loader(split, shuffle=False, batch_size=50)
    assert x.dtype == torch.float32 and x.shape == (50, 3, 8, 8)
    ref = split.x.double() / 255.0
    for c in range(3):
        ref[:, c] = (ref[:, c] - MEAN[c]) / STD[c]
    assert torch.allclose(x.double(), ref, atol=1e-6, rtol=0)
    # float32 input in [0, 1] (digits) is normalised without the /255
    fsplit = Split(split.x.float() / 255, split.y)
    (fx, _), *_ = _loader(fsplit, shuffle=False, batch_size=50)
    assert torch.allclose(fx.double(), ref, atol=1e-6, rtol=0)


def _crops(image, pad=4):
    """All 2 * (2*pad+1)^2 crop-flips of one (C, H, W) image."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (pad,) * 4)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            yield crop
            yield crop.flip(-1)


def test_crop_flip_is_a_real_crop_flip_and_deterministic_per_epoch():
    split = _split(n=64)
    loader = _loader(split, augment="crop-flip", mean=(0, 0, 0), std=(1, 1, 1))
    batches = [(x.clone(), y) for x, y in loader]
    assert all(x.shape[1:] == (3, 8, 8) for x, _ in batches)
    for x, y in batches:
        for image, label in zip(x, y):  # every output is one crop-flip of its own (zero-padded) input
            source = split.x[label].float() / 255
            assert any(torch.equal(image, crop) for crop in _crops(source))
    again = [x for x, _ in loader]
    assert all(torch.equal(a, b) for (a, _), b in zip(batches, again))
    loader.set_epoch(1)
    assert not all(torch.equal(a, b) for (a, _), b in zip(batches, (x for x, _ in loader)))
    # the draws cover both flips and shifted crops, not only the identity
    flat = torch.cat([x for x, _ in batches])
    originals = split.x[torch.cat([y for _, y in batches])].float() / 255
    assert 0 < (flat == originals).flatten(1).all(1).sum() < len(flat)


@pytest.mark.parametrize("kw, message", [({"batch_size": 0}, "batch_size = 0 is not allowed"),
                                         ({"augment": "mixup"}, "allowed: none, crop-flip"),
                                         ({"mean": (0.5,)}, "do not fit 3-channel images"),
                                         ({"seed": -1}, "seed = -1 is not allowed")])
def test_bad_options_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        _loader(_split(), **kw)
