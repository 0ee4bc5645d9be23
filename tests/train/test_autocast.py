"""QAT in half precision the PyTorch way: a float32 QAT model trained under torch.autocast (bfloat16 convs and
matmuls, float32 fake quantization and scales), which still converts to an integer model that computes it exactly."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import qatkit
from qatkit.models import build_model


def test_qat_under_autocast_trains_and_converts_exactly():
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=8).eval()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=4, act_bits=4), x[:2])
    qatkit.calibrate(qat, [(x, y)])
    qat.train()
    optimizer = torch.optim.AdamW(qat.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = qat(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert logits.dtype == torch.bfloat16  # the layers ran in bfloat16
    assert all(p.dtype == torch.float32 for p in qat.parameters())
    assert losses[-1] < 0.5 * losses[0]  # it learns the 32 labels (2.28 -> 0.15 when written)
    qat.eval()
    integer = qatkit.convert(qat)
    with torch.no_grad():
        assert torch.equal(integer(x), qat(x))
