"""load_dataset's checks of names, --data and --limit: ConfigError for usage, DataError for bad paths."""
import pytest

from qatkit.data import DATASET_NAMES, load_dataset
from qatkit.errors import ConfigError, DataError


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="'imagenet'.*allowed: digits, mnist, cifar10, folder"):
        load_dataset("imagenet")


@pytest.mark.parametrize("name", [n for n in DATASET_NAMES if n != "digits"])
def test_file_datasets_need_data(name):
    with pytest.raises(ConfigError, match=f"--data is not set, but dataset '{name}' needs it"):
        load_dataset(name)


@pytest.mark.parametrize("name", [n for n in DATASET_NAMES if n != "digits"])
def test_missing_path_is_named(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"--data '{missing}' does not exist; expected .* Fix: pass --data"):
        load_dataset(name, str(missing))


def test_digits_refuses_a_path():
    with pytest.raises(ConfigError, match="Fix: drop --data"):
        load_dataset("digits", "/some/where")


def test_limit_keeps_the_first_samples():
    full, small = load_dataset("digits"), load_dataset("digits", limit=10)
    assert (len(small.train), len(small.test)) == (10, 10)
    assert small.train.x.equal(full.train.x[:10]) and small.test.y.equal(full.test.y[:10])
    assert small.mean == full.mean  # normalisation does not change with --limit
    assert len(load_dataset("digits", limit=10**6).train) == len(full.train)
    with pytest.raises(ConfigError, match="--limit = 0 is not allowed"):
        load_dataset("digits", limit=0)
