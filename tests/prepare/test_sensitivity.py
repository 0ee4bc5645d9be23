"""qatkit.sensitivity: each layer quantized alone as the config quantizes it, against the float model."""
from __future__ import annotations

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


def _fake_quant(x: torch.Tensor, q, axis: int | None = None) -> torch.Tensor:
    """x on q's grid in float64: (clamp(round(x/s) + z, qmin, qmax) - z)·s (per row of a weight: axis 0)."""
    s, z = (t.double() for t in q.qparams())
    if axis is not None:
        s, z = s.reshape(-1, 1), z.reshape(-1, 1) if z.dim() else z
    return (torch.clamp(torch.round(x / s) + z, *q.qrange) - z) * s


def _alone_by_hand(model: nn.Sequential, qat, name: str, x: torch.Tensor) -> torch.Tensor:
    """The MLP in float64 with layer `name` alone quantized as the whole QAT model quantizes it: its input (the graph
    input's quantizer, or the previous layer's output quantizer), weight (per row), int32 bias and output."""
    linears = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    h = x.double()
    for i in linears:
        layer = model[i]
        w, b = layer.weight.double(), layer.bias.double()
        if str(i) == name:
            q_in = qat.get_submodule(str(linears[linears.index(i) - 1])).out_quant if i else qat.quant_input_1
            h, w = _fake_quant(h, q_in), _fake_quant(w, qat.get_submodule(name).weight_quant, axis=0)
            step = q_in.qparams()[0].double() * qat.get_submodule(name).weight_quant.qparams()[0].double()
            b = torch.round(b / step) * step
        h = h @ w.T + b
        h = torch.relu(h) if i != linears[-1] else h
        if str(i) == name:
            h = _fake_quant(h, qat.get_submodule(name).out_quant)
    return h


def _figures(got: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """SQNR (dB), top-1 agreement and accuracy of logits `got` against the float model's `ref`."""
    sqnr = 10 * math.log10(float((ref ** 2).sum() / ((got - ref) ** 2).sum()))
    return sqnr, float((got.argmax(1) == ref.argmax(1)).double().mean()), float((got.argmax(1) == y).double().mean())


def test_each_layer_alone_and_the_whole_model_as_computed_by_hand():
    """Each layer's row quantizes its input, weight and output as the whole model does (the first hidden layer's
    input at the 2 bits of the whole model, unsigned after its ReLU: quantized alone, prepare gave it 8 bits, or signed
    ones with act_symmetric, and the ranking changed)."""
    model, batches = _mlp(), _batches()
    config = qatkit.QATConfig(weight_bits=2, act_bits=2)
    result = sensitivity(model, config, batches[0][0][:2], batches, num_batches=3)
    rows = {r["layer"]: r for r in result["layers"]}
    assert list(rows) == sorted(rows, key=lambda name: rows[name]["sqnr_db"])  # the most sensitive first
    assert {name: (r["weight_bits"], r["act_bits"]) for name, r in rows.items()} == {
        "0": (8, 8), "2": (2, 2), "4": (2, 2), "6": (8, 8)}  # first and last at first_last_bits
    assert result["samples"] == 192
    qat = qatkit.prepare(model, config, batches[0][0][:2])
    qatkit.calibrate(qat, batches, num_batches=3)
    assert int(qat.get_submodule("0").out_quant.bits) == 2  # layer 2's input
    x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    with torch.no_grad():
        ref = model(x).double()
        for name in rows:
            sqnr, agree, accuracy = _figures(_alone_by_hand(model, qat, name, x), ref, y)
            assert rows[name]["sqnr_db"] == pytest.approx(sqnr, abs=0.006)  # rounded to 0.01 dB
            assert rows[name]["top1_agreement"] == pytest.approx(agree, abs=1e-12)
            assert rows[name]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        sqnr, agree, accuracy = _figures(qat.eval()(x).double(), ref, y)
    assert result["model"]["sqnr_db"] == pytest.approx(sqnr, abs=0.006) and result["model"]["accuracy"] == accuracy
    assert result["model"]["sqnr_db"] < min(r["sqnr_db"] for r in rows.values())  # every layer loses more
    float_accuracy = float((ref.argmax(1) == y).double().mean())
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


class Tagger(nn.Module):
    """A token tagger: (B, T) ids → (B, T, C) logits."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.out = nn.Embedding(20, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, ids):
        h = self.mix(self.embed(ids))
        return self.out(torch.relu(self.bn(h.transpose(1, 2)).transpose(1, 2)))


def test_agreement_counts_labelled_positions_only_and_every_module_keeps_its_mode():
    """Positions labelled -100 (padding) counted in the top-1 agreement though not in the accuracy (0.170 for 0.678
    in the repro); evaluate, calibrate and sensitivity put a BatchNorm the user keeps in eval back into train."""
    torch.manual_seed(0)
    model, ids = Tagger(), torch.randint(0, 20, (6, 10))
    labels = torch.randint(0, 5, (6, 10))
    labels[:, 3:] = -100  # 18 of 60 positions labelled
    model.train()
    model.bn.eval()  # frozen by the user
    config = qatkit.QATConfig(weight_bits=2, act_bits=2)
    result = sensitivity(model, config, ids[:2], [(ids, labels)], num_batches=1)
    assert model.training and not model.bn.training
    qat = qatkit.prepare(model, config, ids[:2])
    qatkit.calibrate(qat, [ids])
    with torch.no_grad():
        ref, got = model.eval()(ids), qat.eval()(ids)
    labelled = labels != -100
    agree = int(((got.argmax(-1) == ref.argmax(-1)) & labelled).sum()) / 18
    assert result["model"]["top1_agreement"] == pytest.approx(agree, abs=1e-12)
    assert result["model"]["accuracy"] == int(((got.argmax(-1) == labels) & labelled).sum()) / 18
    qat.train()
    bn = next(m for m in qat.modules() if isinstance(m, nn.BatchNorm1d))
    bn.eval()
    qatkit.calibrate(qat, [ids])
    qatkit.evaluate(qat, [(ids, labels)])
    assert qat.training and not bn.training
