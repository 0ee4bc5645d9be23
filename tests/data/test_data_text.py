"""Text datasets: TSV reading, the vocabulary, encoding to ids, SST-2 in place, and token batches."""
from __future__ import annotations

import pytest
import torch

from qatkit.data import BatchLoader, TextDataset, load_dataset
from qatkit.data.text import PAD, UNK, build_vocab, encode, load_tsv_folder
from qatkit.errors import ConfigError, DataError
from tests.conftest import shared_data


def write_tsv(folder, name: str, rows: list[tuple[str, int]], header: str = "text\tlabel") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join([header, *(f"{t}\t{y}" for t, y in rows)]) + "\n", encoding="utf-8")


def test_vocabulary_is_most_frequent_first_ties_alphabetical():
    vocab = build_vocab(["b a c", "A b", "d b", "c"])
    assert vocab == (PAD, UNK, "b", "a", "c", "d")  # b: 3, a: 2 (lower-cased), c: 2, d: 1
    assert build_vocab(["b a c", "A b", "d b", "c"], max_size=4) == (PAD, UNK, "b", "a")


def test_encode_pads_cuts_and_marks_unknown_words():
    vocab = (PAD, UNK, "good", "film")
    ids = encode(["Good film", "a good good good film", "bad"], vocab, max_len=4)
    assert ids.dtype == torch.int64
    assert ids.tolist() == [[2, 3, 0, 0], [1, 2, 2, 2], [1, 0, 0, 0]]


def test_tsv_folder_loads_splits_with_the_train_vocabulary(tmp_path):
    write_tsv(tmp_path, "train.tsv", [("a fine film", 1), ("a dull film", 0), ("fine", 1)])
    write_tsv(tmp_path, "test.tsv", [("an unseen fine film", 1), ("dull", 0)])
    ds = load_dataset("tsv", str(tmp_path))
    assert isinstance(ds, TextDataset) and ds.num_classes == 2
    assert ds.max_len == 8  # the longest train text (3 words), rounded up to a multiple of 8
    assert ds.vocab == (PAD, UNK, "a", "film", "fine", "dull")
    assert ds.test.x.tolist() == [[1, 1, 4, 3, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0, 0]]
    assert ds.train.y.tolist() == [1, 0, 1] and ds.test.y.tolist() == [1, 0]
    # a model's vocabulary and length (its recipe) replace the derived ones
    again = load_dataset("tsv", str(tmp_path), vocab=[PAD, UNK, "fine"], max_len=2)
    assert again.test.x.tolist() == [[1, 1], [1, 0]]


@pytest.mark.parametrize("body, message", [
    ("review\tlabel\nok\t1\n", r"header .* allowed: text<TAB>label \(or GLUE's sentence<TAB>label\)"),
    ("text\tlabel\nok\tpositive\n", r"line 2 .* a class index"),
    ("text\tlabel\nok\t\u00b2\n", r"line 2 .* a class index"),  # (a digit to str.isdigit, not to int)
    ("text\tlabel\nok\t99999999999999999999\n", r"line 2 .* a class index 0, 1, \.\.\. \(below 100000\)"),
    ("text\tlabel\nfine\t1\ncaf\udce9\t0\n", r"^line 3 of .* is not UTF-8 .* Fix: save the file as UTF-8"),
    ("text\tlabel\n" + "word " * 30000 + "\t1\n", r"^line 2 of .* cannot be read .* Fix: shorten or remove the line"),
    ("text\tlabel\nok\t1\tx\n", r"line 2 .* one tab"),
    ("text\tlabel\n \t1\n", r"text on line 2 .* at least one word"),
    ("text\tlabel\n", r"holds no samples"),
])
def test_bad_tsv_is_refused_naming_line_and_fix(tmp_path, body, message):
    """Non-UTF-8 bytes, a line over csv's field limit and labels int() or torch refuse raised raw tracebacks."""
    (tmp_path / "train.tsv").write_bytes(body.encode("utf-8", "surrogateescape"))
    write_tsv(tmp_path, "test.tsv", [("ok", 0)])
    with pytest.raises(DataError, match=message):
        load_tsv_folder(str(tmp_path))


def test_glue_header_and_the_word_pad_in_a_text(tmp_path):
    """GLUE's SST-2 files begin 'sentence<TAB>label' (the README promised them; they were refused); a text holding the
    word '<pad>' was encoded as padding (all zeros, a fully masked attention: NaN)."""
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nfine film\t1\n<pad>\t0\n", encoding="utf-8")
    write_tsv(tmp_path, "test.tsv", [("<unk> film", 1)])
    ds = load_tsv_folder(str(tmp_path))
    assert ds.train.y.tolist() == [1, 0] and ds.train.x[1].tolist()[:2] == [1, 0]  # an unknown word, then padding
    assert ds.test.x[0].tolist()[:2] == [1, ds.vocab.index("film")]


def test_byte_order_mark_and_blank_lines_are_no_samples(tmp_path):
    (tmp_path / "train.tsv").write_bytes("\ufefftext\tlabel\nfine film\t1\n\ndull\t0\n\n".encode("utf-8"))
    write_tsv(tmp_path, "test.tsv", [("fine", 1)])
    ds = load_tsv_folder(str(tmp_path))
    assert ds.train.y.tolist() == [1, 0] and ds.train.x[:, :2].tolist() == [[4, 3], [2, 0]]  # dull, film, fine


def test_missing_split_and_foreign_vocabulary_are_refused(tmp_path):
    write_tsv(tmp_path, "train.tsv", [("ok", 0)])
    with pytest.raises(DataError, match=r"test.tsv' does not exist.*Fix"):
        load_tsv_folder(str(tmp_path))
    write_tsv(tmp_path, "test.tsv", [("ok", 1)])
    with pytest.raises(DataError, match=r"label = 1 .* 0\.\.0"):  # a test class the train split lacks
        load_tsv_folder(str(tmp_path))
    write_tsv(tmp_path, "test.tsv", [("ok", 0)])
    with pytest.raises(DataError, match=r"vocabulary start .* Fix"):
        load_tsv_folder(str(tmp_path), vocab=["ok", "<pad>", "<unk>"])
    with pytest.raises(ConfigError, match=r"--data is not set"):
        load_dataset("sst2")


def test_sst2_in_place():
    ds = load_dataset("sst2", str(shared_data("sst2")))
    assert (len(ds.train), len(ds.test)) == (67349, 872)  # GLUE train; dev is the test split papers report
    assert ds.num_classes == 2 and ds.max_len == 56  # longest train text: 52 words
    assert ds.test.y.bincount().tolist() == [428, 444]
    assert len(ds.vocab) == 14818 and ds.vocab[:4] == (PAD, UNK, "the", ",")
    assert int((ds.test.x == 1).sum()) > 0 and int(ds.test.x.max()) < len(ds.vocab)
    small = load_dataset("sst2", str(shared_data("sst2")), limit=10)
    assert len(small.train) == 10 and small.vocab == ds.vocab


def test_token_batches_are_ids_as_stored_and_shard_like_images(tmp_path):
    write_tsv(tmp_path, "train.tsv", [(f"w{i} w{i % 3}", i % 2) for i in range(10)])
    write_tsv(tmp_path, "test.tsv", [("w1", 0)])
    split = load_dataset("tsv", str(tmp_path)).train
    whole = list(BatchLoader(split, batch_size=4, shuffle=True, seed=3))
    assert [tuple(x.shape) for x, _ in whole] == [(4, 8), (4, 8), (2, 8)]
    assert torch.equal(torch.cat([x for x, _ in whole]).sort(0).values, split.x.sort(0).values)
    halves = [list(BatchLoader(split, batch_size=4, shuffle=True, seed=3, shard=(r, 2))) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(ConfigError, match=r"augment = 'crop-flip' .* none for token ids"):
        BatchLoader(split, batch_size=4, shuffle=True, augment="crop-flip")
