"""fit and evaluate with one target per position: sequence models' (batch, positions, classes) logits against
(batch, positions) targets (token classification, language modelling), positions labelled -100 (Hugging Face's
padding label) left out of the loss, the accuracy and the count; distillation per position."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatkit
from qatkit.errors import DataError
from qatkit.train.loop import compute_loss, per_target

V, T, CLASSES = 20, 8, 3


class Tagger(nn.Module):
    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.embed, self.fc = nn.Embedding(V, 16), nn.Linear(16, classes)

    def forward(self, ids):
        return self.fc(torch.relu(self.embed(ids)))


def _tagged(n: int = 256, size: int = 32):
    """Each token's class is its id mod 3; the padding (id 0, from a random length on) is labelled -100."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (n, T), generator=gen)
    lengths = torch.randint(2, T + 1, (n,), generator=gen)
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    ids[pad] = 0
    labels = torch.where(pad, torch.full_like(ids, -100), ids % CLASSES)
    return [(ids[i:i + size], labels[i:i + size]) for i in range(0, n, size)], int((~pad).sum())


def test_token_classification_trains_and_counts_the_labelled_positions_only():
    torch.manual_seed(0)
    batches, labelled = _tagged()
    qat = qatkit.prepare(Tagger(), qatkit.QATConfig(weight_bits=4, act_bits=4), batches[0][0])
    qatkit.calibrate(qat, batches, num_batches=2)
    history = qatkit.fit(qat, batches, qatkit.TrainConfig(epochs=8, lr=1e-2, progress=False))
    result = qatkit.evaluate(qat, batches)
    assert result["n"] == labelled  # the -100 positions are not counted
    assert result["accuracy"] > 0.9 and history[-1]["train_acc"] > history[0]["train_acc"] + 0.3, (result, history)
    # the same sums from the logits by hand, in float64
    with torch.no_grad():
        qat.eval()
        logits = torch.cat([qat(x) for x, _ in batches]).double()
        y = torch.cat([y for _, y in batches])
    keep = y != -100
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits[keep], y[keep])), rel=1e-5)
    assert result["accuracy"] == pytest.approx(float((logits[keep].argmax(-1) == y[keep]).double().mean()), abs=1e-12)
    integer = qatkit.convert(qat)
    assert qatkit.evaluate(integer, batches) == result  # the integer model, bit for bit


def test_next_token_prediction_trains_with_fit():
    """A language model's targets are its inputs shifted by one: here the next id is (id + 1) mod V."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, V, (256, 1), generator=gen)
    ids = (starts + torch.arange(T + 1)) % V
    batches = [(ids[i:i + 32, :-1], ids[i:i + 32, 1:]) for i in range(0, 256, 32)]
    qat = qatkit.prepare(Tagger(classes=V), qatkit.QATConfig(), batches[0][0])
    qatkit.calibrate(qat, batches, num_batches=2)
    qatkit.fit(qat, batches, qatkit.TrainConfig(epochs=10, lr=1e-2, progress=False))
    result = qatkit.evaluate(qat, batches)
    assert result["n"] == 256 * T and result["accuracy"] > 0.97, result


def test_distillation_per_position_is_the_mean_over_positions_of_the_kl():
    torch.manual_seed(0)
    logits, teacher = torch.randn(4, T, CLASSES, dtype=torch.float64), torch.randn(4, T, CLASSES, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (4, T))
    config = qatkit.TrainConfig(distill=0.5, temperature=2.0)
    got = compute_loss(nn.Identity(), logits, y, teacher, config, {})
    p_t = torch.softmax(teacher / 2, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(logits / 2, -1))).sum(-1).mean()  # over the 32 positions
    ce = -torch.log_softmax(logits, -1).gather(-1, y[..., None]).mean()
    assert float(got) == pytest.approx(float(0.5 * ce + 0.5 * 4 * kl), rel=1e-12)


def test_distillation_leaves_out_the_positions_without_a_target():
    """The KL was averaged over the -100 positions too (0.606675 where the labelled ones give 0.608853)."""
    torch.manual_seed(0)
    logits, teacher = torch.randn(4, T, CLASSES, dtype=torch.float64), torch.randn(4, T, CLASSES, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (4, T))
    y[:, 5:] = -100
    got = compute_loss(nn.Identity(), logits, y, teacher, qatkit.TrainConfig(distill=0.5, temperature=2.0), {})
    keep = y != -100
    p_t = torch.softmax(teacher[keep] / 2, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(logits[keep] / 2, -1))).sum(-1).mean()
    ce = -torch.log_softmax(logits[keep], -1).gather(-1, y[keep][:, None]).mean()
    assert float(got) == pytest.approx(float(0.5 * ce + 0.5 * 4 * kl), rel=1e-12)


def test_a_batch_with_no_target_adds_nothing_and_trains_on():
    """Cross-entropy over no target is NaN: fit stopped with 'training diverged ... lower --lr'."""
    torch.manual_seed(0)
    batches, _ = _tagged(64)
    empty = (batches[0][0], torch.full_like(batches[0][1], -100))
    assert float(compute_loss(nn.Identity(), torch.randn(32, T, CLASSES), empty[1], None, qatkit.TrainConfig(),
                              {})) == 0.0
    qat = qatkit.prepare(Tagger(), qatkit.QATConfig(), batches[0][0])
    qatkit.calibrate(qat, batches)
    history = qatkit.fit(qat, [empty, *batches], qatkit.TrainConfig(epochs=2, lr=1e-2, progress=False))
    assert all(row["train_loss"] == row["train_loss"] for row in history)  # (no NaN)
    with pytest.raises(DataError, match=r"^evaluation counted no targets \(no batches, or every target -100\)"):
        qatkit.evaluate(qat, [empty])


def test_class_probabilities_and_integer_labels_of_any_dtype_are_targets():
    """One-hot (or smoothed) labels of the logits' shape are probabilities: at a batch of as many samples as classes
    they were compared with argmax elementwise and counted N·C times (n 400 for 40 samples)."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 10, (40,))
    model = nn.Linear(6, 10)
    as_indices = qatkit.evaluate(model, [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)])
    one_hot = qatkit.evaluate(model, [(x[i:i + 10], F.one_hot(y[i:i + 10], 10).float()) for i in range(0, 40, 10)])
    assert one_hot["n"] == as_indices["n"] == 40 and one_hot["accuracy"] == as_indices["accuracy"]
    assert one_hot["loss"] == pytest.approx(as_indices["loss"], rel=1e-6)
    assert qatkit.evaluate(model, [(x, y.int())]) == qatkit.evaluate(model, [(x, y)])  # int32 labels (from numpy)


@pytest.mark.parametrize("logits, y, message", [
    (torch.randn(4, T, CLASSES), torch.zeros(4, dtype=torch.long),
     r"^targets = 'int64 targets of shape \(4,\)' is not allowed; allowed: class indices \(integers\) of shape "
     r"\(4, 8\), or class probabilities of the logits' shape \(4, 8, 3\) \(-100: no target\)\. Fix: give integer "
     r"class indices \(y\.long\(\)\) one per sample or position"),
    (torch.randn(4, CLASSES), torch.zeros(4, 1, dtype=torch.long), r"^targets = 'int64 targets of shape \(4, 1\)'"),
    (torch.randn(4, CLASSES), torch.zeros(4), r"^targets = 'float targets of shape \(4,\)'"),
    (torch.randn(4, CLASSES), torch.tensor([0, 1, 3, -100]),
     r"^a target class = 3 is not allowed; allowed: 0 \.\. 2 for the model's 3 classes, or -100 \(no target\)"),
], ids=["sequence-logits-per-sample-targets", "column-of-labels", "float-indices", "class-out-of-range"])
def test_targets_that_do_not_fit_the_logits_are_refused_with_the_fix(logits, y, message):
    with pytest.raises(DataError, match=message):
        per_target(logits, y)


def test_dense_predictions_count_every_pixel():
    """(B, C, H, W) logits against (B, H, W) labels, classes on axis 1 as PyTorch's cross-entropy takes them: each
    pixel is a target (the class of a pixel: is it brighter than 0?)."""
    torch.manual_seed(0)
    x = torch.randn(64, 1, 6, 6)
    y = (x[:, 0] > 0).long()
    y[:, 0, 0] = -100  # a pixel without a label
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    qat = qatkit.prepare(nn.Conv2d(1, 2, 1), qatkit.QATConfig(), x[:1])
    qatkit.calibrate(qat, batches)
    qatkit.fit(qat, batches, qatkit.TrainConfig(epochs=5, lr=5e-2, progress=False))
    result = qatkit.evaluate(qat, batches)
    with torch.no_grad():
        logits = qat.eval()(x).double()
    keep = y != -100
    assert result["n"] == 64 * 35
    assert result["accuracy"] == pytest.approx(float((logits.argmax(1) == y)[keep].double().mean()), abs=1e-12)
    assert result["accuracy"] > 0.85
