"""Oscillation tracking and the annealed error penalty (Nagel et al. 2022): codes moving back and forth are counted,
steady moves are not; the cosine ramp of λ against its float64 formula; both switched on in fit."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qatkit
from qatkit.config import QATConfig, TrainConfig
from qatkit.errors import ConfigError
from qatkit.train import fit
from qatkit.train.loop import penalty_scale
from qatkit.train.oscillation import OscillationTracker


def _mlp(bits: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    return qatkit.prepare(model, QATConfig(weight_bits=bits, act_bits=bits, first_last_bits=8), torch.randn(2, 4))


def test_tracker_counts_reversals_of_the_integer_code_only():
    qat = _mlp(4)
    first = qat.get_submodule("1")
    tracker = OscillationTracker(qat)
    assert list(tracker.layers) == []  # first and last layer at 8 bits: nothing below 8 bits to track
    tracker.layers = {"1": first}  # track the 4-bit-capable layer at its 8 bits for the test
    s = float(first.weight_quant.qparams()[0].flatten()[0])
    with torch.no_grad():
        first.weight_quant.scale.fill_(s)  # one scale for every row: codes = round(w / s)
        # weight [0,0] goes code 0 -> 1 -> 0 -> 1 (two reversals), [0,1] 0 -> 1 -> 2 -> 3 (none), the rest stay at 0
        for codes in ([0, 0], [1, 1], [0, 2], [1, 3]):
            first.weight.zero_()
            first.weight[0, 0], first.weight[0, 1] = codes[0] * s, codes[1] * s
            tracker.update()
    stats = tracker.epoch_stats()
    assert stats == {"oscillating": pytest.approx(1 / 12), "oscillations_per_weight": pytest.approx(2 / 12)}
    assert tracker.epoch_stats() == {"oscillating": 0.0, "oscillations_per_weight": 0.0}  # counts start again


def test_a_new_bit_width_starts_the_comparison_again():
    """Progressive precision's 8 → 4 bits moves every code onto another grid (a code of 21 becomes about 1): that
    step counted 47,592 false oscillations (20x the steps around it)."""
    qat = _mlp(4)
    first = qat.get_submodule("1")
    tracker = OscillationTracker(qat)
    tracker.layers = {"1": first}
    s = float(first.weight_quant.qparams()[0].flatten()[0])
    with torch.no_grad():
        first.weight_quant.scale.fill_(s)
        for code in (20, 21, 20, 21):  # 8 bits: two reversals, the last move up
            first.weight.zero_()
            first.weight[0, 0] = code * s
            tracker.update()
        first.weight_quant.set_bits(4)  # the same weight's code on the 4-bit grid: far below 21, not a move down
        tracker.update()
        tracker.update()
    assert tracker.epoch_stats()["oscillations_per_weight"] == pytest.approx(2 / 12)


def test_penalty_scale_cosine_against_float64():
    steps, epochs = 10, 3
    config = TrainConfig(epochs=epochs, penalty_schedule="cosine")
    scales = [penalty_scale(config, e, k, steps) for e in range(epochs) for k in range(steps)]
    total = epochs * steps - 1
    assert scales == pytest.approx([0.5 * (1 - math.cos(math.pi * i / total)) for i in range(total + 1)], abs=1e-15)
    assert scales[0] == 0.0 and scales[-1] == pytest.approx(1.0) and scales == sorted(scales)
    assert penalty_scale(TrainConfig(epochs=epochs), 1, 3, steps) == 1.0
    with pytest.raises(ConfigError, match=r"penalty_schedule = 'linear' is not allowed; allowed: constant, cosine"):
        TrainConfig(penalty_schedule="linear")
    with pytest.raises(ConfigError, match="track_oscillations"):
        TrainConfig(track_oscillations="yes")


def test_fit_reports_oscillations_with_the_annealed_penalty():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    qat = qatkit.prepare(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)),
                         QATConfig(weight_bits=2, act_bits=4), x[:2])
    qatkit.calibrate(qat, [x])
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    config = TrainConfig(epochs=2, lr=0.05, track_oscillations=True, penalty_schedule="cosine", progress=False)
    history = fit(qat, loader, config, error_penalty={"*.weight": 1.0})
    assert all(0.0 <= row["oscillating"] <= 1.0 and row["oscillations_per_weight"] >= 0.0 for row in history)
    assert any(row["oscillating"] > 0 for row in history)  # lr 0.05 on 2-bit weights: codes flip back and forth
    w8 = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=8)
    history = fit(_mlp(8), w8, TrainConfig(epochs=1, track_oscillations=True, progress=False))
    assert "oscillating" not in history[0]  # every weight at 8 bits: nothing tracked


def test_fit_applies_the_prepare_configs_penalty_and_checks_its_own():
    """fit read only its own error_penalty argument: QATConfig(error_penalty=...) given to prepare did nothing (the
    weights bit for bit those of a run without it), and fit's argument went unchecked (λ = -1 trained, a glob that
    matches nothing was a silent no-op, a string gave a raw ValueError)."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    float_model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    config = TrainConfig(epochs=1, lr=0.01, progress=False)
    runs = {}
    for name, penalty, argument in (("from prepare", {"*.weight": 100.0}, None), ("given", {}, {"*.weight": 100.0}),
                                    ("off", {"*.weight": 100.0}, {}), ("none", {}, None)):
        qat = qatkit.prepare(float_model, QATConfig(weight_bits=4, act_bits=4, error_penalty=penalty), x[:2])
        qatkit.calibrate(qat, [x])
        fit(qat, [(x, y)], config, error_penalty=argument)
        runs[name] = qat.state_dict()
    same = {a: all(torch.equal(runs[a][k], runs["none"][k]) for k in runs[a]) for a in runs}
    assert same == {"from prepare": False, "given": False, "off": True, "none": True}
    assert all(torch.equal(runs["from prepare"][k], runs["given"][k]) for k in runs["given"])
    qat = qatkit.prepare(float_model, QATConfig(), x[:2])
    for bad, message in (({"*.weight": -1.0}, r"error_penalty\['\*\.weight'\] = -1\.0 is not allowed"),
                         ("*.weight", r"error_penalty = '\*\.weight' is not allowed; allowed: a mapping"),
                         ({"*.wieght": 1.0}, r"error_penalty glob = '\*\.wieght' is not allowed; allowed: a glob "
                                             r"matching a quantized weight or bias \(0\.weight, 0\.bias, 2\.weight")):
        with pytest.raises(ConfigError, match=message):
            fit(qat, [(x, y)], config, error_penalty=bad)


def test_fit_says_that_it_does_not_augment_a_loader_of_its_own():
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,))
    with pytest.warns(UserWarning, match=r"TrainConfig\.augment = 'crop-flip' is not applied by fit"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), [(x, y)],
            TrainConfig(epochs=1, augment="crop-flip", progress=False))
