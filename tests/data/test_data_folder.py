"""Image folders built in tmp_path with Pillow: layout, channels, pixel exactness and every refusal."""
import numpy as np
import pytest
from PIL import Image

from qatkit.data import load_dataset
from qatkit.pipeline import RunConfig
from qatkit.errors import DataError


def _save(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode).save(path)


def _make(root, mode="RGB", size=6, counts=None):
    """root/{train,test}/{cat,dog}/i.png with random pixels; returns {(split, cls): [arrays]}."""
    rng = np.random.default_rng(0)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    made = {}
    for (split, cls), n in (counts or {("train", "cat"): 3, ("train", "dog"): 2,
                                       ("test", "cat"): 1, ("test", "dog"): 1}).items():
        made[split, cls] = [rng.integers(0, 256, shape) for _ in range(n)]
        for i, array in enumerate(made[split, cls]):
            _save(root / split / cls / f"{i}.png", array, mode)
    return made


def test_rgb_folder_loads_exact_pixels_with_the_classes_taking_turns(tmp_path):
    """cat's first image, dog's first, cat's second, ...: the first N samples (--limit N) hold every class (in class
    order, --limit 64 of 3 classes of 40 had kept none of the third)."""
    made = _make(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"macOS metadata")  # ignored: hidden (it stopped the load)
    (tmp_path / "train" / "dog" / "train").mkdir()  # (a folder in a class folder: no image)
    ds = load_dataset("folder", str(tmp_path))
    assert ds.train.x.shape == (5, 3, 6, 6) and ds.test.x.shape == (2, 3, 6, 6)
    assert ds.train.y.tolist() == [0, 1, 0, 1, 0] and ds.test.y.tolist() == [0, 1]
    assert (ds.num_classes, ds.in_channels, ds.image_size, ds.classes) == (2, 3, 6, ("cat", "dog"))
    assert np.array_equal(ds.train.x[1].permute(1, 2, 0).numpy(), made["train", "dog"][0])
    assert np.array_equal(ds.train.x[4].permute(1, 2, 0).numpy(), made["train", "cat"][2])
    assert load_dataset("folder", str(tmp_path), limit=2).train.y.tolist() == [0, 1]
    expected = np.stack(made["train", "cat"] + made["train", "dog"]) / 255.0  # (N, H, W, C)
    assert np.allclose(ds.mean, expected.mean(axis=(0, 1, 2))) and np.allclose(ds.std, expected.std(axis=(0, 1, 2)))


def test_grayscale_folder_has_one_channel_and_mixed_becomes_rgb(tmp_path):
    made = _make(tmp_path, mode="L")
    ds = load_dataset("folder", str(tmp_path))
    assert ds.in_channels == 1 and ds.train.x.shape == (5, 1, 6, 6)
    _save(tmp_path / "test" / "dog" / "color.png", np.zeros((6, 6, 3)), "RGB")
    ds = load_dataset("folder", str(tmp_path))
    assert ds.in_channels == 3 and ds.train.x.shape == (5, 3, 6, 6)
    for c in range(3):  # grey images are replicated into all three channels
        assert np.array_equal(ds.train.x[0, c].numpy(), made["train", "cat"][0])


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path):
    """A 16-bit PNG (Pillow's mode I;16) was converted to RGB by clipping: 33375 became 255, and the folder 3
    channels."""
    _make(tmp_path, mode="L")
    deep = np.arange(36, dtype=np.uint16).reshape(6, 6) * 1800 + 375  # 375 .. 63375
    Image.fromarray(deep).save(tmp_path / "train" / "cat" / "deep.png")
    ds = load_dataset("folder", str(tmp_path))
    assert ds.in_channels == 1  # deep.png sorts after cat's 0-2.png: the last sample (cat, dog, cat, dog, cat, cat)
    assert np.array_equal(ds.train.x[5, 0].numpy(), np.rint(deep / 257.0).astype(np.uint8))


def test_image_of_another_size_is_named(tmp_path):
    _make(tmp_path)
    _save(tmp_path / "test" / "dog" / "big.png", np.zeros((7, 6, 3)), "RGB")
    with pytest.raises(DataError, match=r"big.png' is 6x7 \(WxH\) but .*0.png' is 6x6"):
        load_dataset("folder", str(tmp_path))


def test_test_classes_must_match_train(tmp_path):
    _make(tmp_path)
    _save(tmp_path / "test" / "bird" / "0.png", np.zeros((6, 6, 3)), "RGB")
    with pytest.raises(DataError, match=r"has classes \['bird', 'cat', 'dog'\]; expected the train classes"):
        load_dataset("folder", str(tmp_path))


def test_empty_and_broken_folders_are_data_errors(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset("folder", str(tmp_path))
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "test" / "cat").mkdir()
    with pytest.raises(DataError, match="cat' holds no .png"):
        load_dataset("folder", str(tmp_path))
    _save(tmp_path / "train" / "cat" / "0.png", np.zeros((6, 6)), "L")
    with pytest.raises(DataError, match="test' holds no .png"):
        load_dataset("folder", str(tmp_path))
    _save(tmp_path / "test" / "cat" / "0.png", np.zeros((6, 6)), "L")
    (tmp_path / "train" / "cat" / "fake.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="fake.png' cannot be read as an image"):
        load_dataset("folder", str(tmp_path))


def test_missing_test_split_is_named(tmp_path):
    _save(tmp_path / "train" / "cat" / "0.png", np.zeros((6, 6, 3)), "RGB")
    with pytest.raises(DataError, match="test' does not exist"):
        load_dataset("folder", str(tmp_path))


def test_a_folder_of_other_classes_is_refused_for_a_model_trained_on_a_folder(tmp_path):
    """The class names go into the model's recipe: `qatkit eval` on a folder without 'cat' labelled dog 0, the
    model's cat, and reported accuracy 0.0 with exit 0."""
    from qatkit.pipeline import _recipe, dataset_for

    _make(tmp_path / "a")
    recipe = _recipe(RunConfig(dataset="folder", data=str(tmp_path / "a")), load_dataset("folder", str(tmp_path / "a")),
                     None)
    assert recipe["classes"] == ["cat", "dog"]
    assert dataset_for(recipe, None, str(tmp_path / "a")).classes == ("cat", "dog")
    _make(tmp_path / "b", counts={("train", "dog"): 1, ("train", "eel"): 1, ("test", "dog"): 1, ("test", "eel"): 1})
    with pytest.raises(DataError, match=r"has the classes \['dog', 'eel'\], the model was trained on \['cat', 'dog'\]"):
        dataset_for(recipe, None, str(tmp_path / "b"))
