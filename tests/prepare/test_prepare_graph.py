"""Graph rewrites of prepare beyond wrapping layers: functional dropout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatkit


class FunctionalDropout(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.fc1, self.fc2, self.dropout = nn.Linear(8, 16), nn.Linear(16, 3), dropout

    def forward(self, x):
        return self.fc2(self.dropout(F.relu(self.fc1(x)), 0.5, self.training))


@pytest.mark.parametrize("dropout", [F.dropout, F.alpha_dropout])
@pytest.mark.parametrize("mode_at_prepare", ["train", "eval"])
def test_functional_dropout_follows_the_qat_models_mode(mode_at_prepare, dropout):
    """Tracing froze F.dropout's `training` to the mode at prepare time; the QAT model drops in train() only."""
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    model = FunctionalDropout(dropout).train(mode_at_prepare == "train")
    qat = qatkit.prepare(model, qatkit.QATConfig())
    qatkit.calibrate(qat, [x])
    qat.train()
    assert not torch.equal(qat(x), qat(x))  # dropout applied, whatever the mode at prepare time
    qat.eval()
    with torch.no_grad():
        y = qat(x)
        assert torch.equal(qat(x), y) and torch.equal(qatkit.convert(qat)(x), y)
