"""qatkit.sensitivity: each layer quantized alone as the config quantizes it, against the float model."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import qatkit
from qatkit.errors import ConfigError, DataError
from qatkit import sensitivity


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4)).eval()


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(64, 6, generator=gen), torch.randint(0, 4, (64,), generator=gen)) for _ in range(3)]


def _by_hand(model, config, batches) -> tuple[float, float, float]:
    """SQNR (dB), top-1 agreement and accuracy of the calibrated QAT model against the float model, in float64."""
    qat = qatkit.prepare(model, config, batches[0][0][:2])
    qatkit.calibrate(qat, batches, num_batches=len(batches))
    with torch.no_grad():
        ref = torch.cat([model(x) for x, _ in batches]).double()
        got = torch.cat([qat.eval()(x) for x, _ in batches]).double()
    y = torch.cat([y for _, y in batches])
    sqnr = 10 * math.log10(float((ref ** 2).sum() / ((got - ref) ** 2).sum()))
    return sqnr, float((got.argmax(1) == ref.argmax(1)).double().mean()), float((got.argmax(1) == y).double().mean())


def test_each_layer_alone_and_the_whole_model_as_computed_by_hand():
    model, batches = _mlp(), _batches()
    config = qatkit.QATConfig(weight_bits=2, act_bits=2)
    result = sensitivity(model, config, batches[0][0][:2], batches, num_batches=3)
    rows = {r["layer"]: r for r in result["layers"]}
    assert list(rows) == sorted(rows, key=lambda name: rows[name]["sqnr_db"])  # the most sensitive first
    assert {name: (r["weight_bits"], r["act_bits"]) for name, r in rows.items()} == {
        "0": (8, 8), "2": (2, 2), "4": (2, 2), "6": (8, 8)}  # first and last at first_last_bits
    assert result["samples"] == 192
    for name in rows:
        alone = dataclasses.replace(config, rules=tuple(qatkit.LayerRule(pattern=o, skip=True) for o in rows if o != name))
        sqnr, agree, accuracy = _by_hand(model, alone, batches)
        assert rows[name]["sqnr_db"] == pytest.approx(sqnr, abs=0.006)  # rounded to 0.01 dB
        assert rows[name]["top1_agreement"] == pytest.approx(agree, abs=1e-12)
        assert rows[name]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    sqnr, agree, accuracy = _by_hand(model, config, batches)
    assert result["model"]["sqnr_db"] == pytest.approx(sqnr, abs=0.006) and result["model"]["accuracy"] == accuracy
    assert result["model"]["sqnr_db"] < min(r["sqnr_db"] for r in rows.values())  # every layer loses more
    with torch.no_grad():
        float_accuracy = float((torch.cat([model(x) for x, _ in batches]).argmax(1) == torch.cat([y for _, y in batches]))
                               .double().mean())
    assert result["float_accuracy"] == float_accuracy


def test_a_layer_the_config_skips_is_not_measured_and_unlabelled_batches_have_no_accuracy():
    model, batches = _mlp().train(), [x for x, _ in _batches()]
    config = qatkit.QATConfig(weight_bits=4, act_bits=4, rules=(qatkit.LayerRule(pattern="2", skip=True),))
    result = sensitivity(model, config, batches[0][:2], batches)
    assert [r["layer"] for r in result["layers"]].count("2") == 0 and len(result["layers"]) == 3
    assert "accuracy" not in result["model"] and "float_accuracy" not in result
    assert model.training  # the float model's mode is kept


def test_bad_arguments_are_refused_with_the_fix():
    model = _mlp()
    with pytest.raises(ConfigError, match=r"^num_batches = 0 is not allowed; allowed: an integer >= 1"):
        sensitivity(model, qatkit.QATConfig(), torch.randn(2, 6), _batches(), num_batches=0)
    with pytest.raises(DataError, match=r"^sensitivity got no batches; allowed: at least one batch"):
        sensitivity(model, qatkit.QATConfig(), torch.randn(2, 6), [])
