"""Text classification from TSV files: `text<TAB>label` with a header row, one sample per line.

Texts are lower-cased and split on whitespace (SST-2 and GLUE ship pre-tokenised text, so this is their
own tokenisation). The vocabulary is built from the train split alone (most frequent first, ties in
alphabetical order, so the same file always gives the same ids); id 0 is padding, id 1 stands for a word
the vocabulary lacks. Each text becomes `max_len` ids, padded with 0 or cut. The vocabulary travels with
the model (its recipe), so test text and deployed inputs are encoded exactly as training text was.
"""
from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qatkit.data.base import Split, require_path
from qatkit.errors import DataError, bad_value

PAD, UNK = "<pad>", "<unk>"
HEADERS = (["text", "label"], ["sentence", "label"])  # (GLUE's SST-2 files say "sentence")
MAX_CLASSES = 100_000  # a label at or above it is a typo or an id, not a class index
MAX_VOCAB = 30_000
MAX_LEN_CAP = 128  # the longest sequence a dataset's max_len is set to (longer texts are cut)


def tokenize(text: str) -> list[str]:
    return text.lower().split()


def build_vocab(texts: Sequence[str], max_size: int = MAX_VOCAB) -> tuple[str, ...]:
    """PAD, UNK, then the `max_size - 2` most frequent words of `texts` (ties alphabetical)."""
    counts = Counter(word for text in texts for word in tokenize(text))
    counts.pop(PAD, None)
    counts.pop(UNK, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))[:max_size - 2]
    return (PAD, UNK, *words)


def encode(texts: Sequence[str], vocab: Sequence[str], max_len: int) -> torch.Tensor:
    """(N, max_len) int64 token ids: 0 pads the end, 1 marks a word not in `vocab`."""
    index = {word: i for i, word in enumerate(vocab)}
    index[PAD] = index[UNK] = 1  # (the words "<pad>" and "<unk>" in a text are unknown words, not padding)
    ids = torch.zeros(len(texts), max_len, dtype=torch.int64)
    for row, text in enumerate(texts):
        tokens = [index.get(word, 1) for word in tokenize(text)[:max_len]]
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    return ids


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    """Texts and integer labels of a `text<TAB>label` file with that header."""
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist; expected a TSV file with the header 'text<TAB>label'. "
                        "Fix: point --data at the folder that holds it")
    texts, labels = [], []
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the header
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"line {line} of {str(path)!r} is not UTF-8 ({e.reason}: "
                        f"{data[e.start:e.start + 1]!r}); allowed: UTF-8 text. Fix: save the file as UTF-8") from None
    line = 1
    try:
        with io.StringIO(text, newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(rows, None)
            if header not in HEADERS:
                raise bad_value(f"header of {str(path)!r}", header, "text<TAB>label (or GLUE's sentence<TAB>label)",
                                "make the first line 'text', a tab, 'label'", DataError)
            for line, row in enumerate(rows, start=2):
                if not row:  # a blank line (often the last one)
                    continue
                label = row[1].strip() if len(row) == 2 else ""
                if not (label.isascii() and label.isdigit() and int(label) < MAX_CLASSES):
                    raise bad_value(f"line {line} of {str(path)!r}", "\t".join(row)[:80], "a text, one tab, and a "
                                    f"class index 0, 1, ... (below {MAX_CLASSES})", "fix or remove the line", DataError)
                if not tokenize(row[0]):
                    raise bad_value(f"text on line {line} of {str(path)!r}", row[0], "at least one word",
                                    "remove the empty line", DataError)
                texts.append(row[0])
                labels.append(int(label))
    except csv.Error as e:  # (a field over csv's 131,072-character limit)
        raise DataError(f"line {line + 1} of {str(path)!r} cannot be read ({e}); allowed: texts of at most "
                        f"{csv.field_size_limit():,} characters. Fix: shorten or remove the line") from None
    if not texts:
        raise DataError(f"{str(path)!r} holds no samples after its header. Fix: add 'text<TAB>label' lines")
    return texts, labels


@dataclass(frozen=True)
class TextDataset:
    """Token-id splits, x (N, max_len) int64, with the vocabulary that made them."""

    name: str
    train: Split
    test: Split
    num_classes: int
    vocab: tuple[str, ...]
    max_len: int

    def __post_init__(self) -> None:
        for part in ("train", "test"):
            split = getattr(self, part)
            if split.x.ndim != 2 or split.x.shape[1] != self.max_len:
                raise bad_value(f"dataset {self.name!r} {part} token shape", tuple(split.x.shape),
                                f"(N, {self.max_len})", "encode every split with the same max_len", DataError)
            hi = int(split.y.max())
            if hi >= self.num_classes:
                raise bad_value(f"dataset {self.name!r} {part} label", hi, f"0..{self.num_classes - 1}",
                                "give every test class a train sample too", DataError)

    def head(self, limit: int) -> TextDataset:
        """Keep the first `limit` samples of each split (the vocabulary stays that of the full train split)."""
        return replace(self, train=self.train.head(limit), test=self.test.head(limit))


def load_tsv_folder(path: str | None, *, name: str = "tsv", test_file: str = "test.tsv",
                    vocab: Sequence[str] | None = None, max_len: int | None = None) -> TextDataset:
    """`path`/train.tsv and `path`/`test_file`. `vocab` and `max_len` (a trained model's, from its recipe) replace
    the ones derived from the train split."""
    root = require_path(path, name, f"a folder with train.tsv and {test_file} ('text<TAB>label' lines)")
    train_texts, train_labels = read_tsv(root / "train.tsv")
    test_texts, test_labels = read_tsv(root / test_file)
    vocab = build_vocab(train_texts) if vocab is None else tuple(vocab)
    if len(vocab) < 3 or vocab[:2] != (PAD, UNK):
        raise bad_value("vocabulary start", list(vocab[:2]), f"[{PAD!r}, {UNK!r}] then words",
                        "use the vocabulary qatkit stored in the model's recipe", DataError)
    if max_len is None:
        longest = max(len(tokenize(t)) for t in train_texts)
        max_len = min(MAX_LEN_CAP, -(-longest // 8) * 8)  # the longest train text, rounded up to a multiple of 8
    elif isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise bad_value("max_len", max_len, "an integer >= 1", "use the max_len stored in the model's recipe", DataError)
    return TextDataset(
        name=name,
        train=Split(encode(train_texts, vocab, max_len), torch.tensor(train_labels)),
        test=Split(encode(test_texts, vocab, max_len), torch.tensor(test_labels)),
        num_classes=max(train_labels) + 1,
        vocab=vocab,
        max_len=max_len,
    )


def load_sst2(path: str | None, vocab: Sequence[str] | None = None, max_len: int | None = None) -> TextDataset:
    """SST-2 (GLUE): train.tsv and dev.tsv, the split papers report as SST-2 accuracy, as the test split."""
    return load_tsv_folder(path, name="sst2", test_file="dev.tsv", vocab=vocab, max_len=max_len)
