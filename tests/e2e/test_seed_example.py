"""The seed's worked example: qatkit's loss equals the formula written out by hand, and β learns."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import qatkit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed_mlp.py"


def _example():
    spec = importlib.util.spec_from_file_location("seed_mlp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fq(v, beta, z, qmin, qmax):
    """y = (clamp(round(v/β) + z) - z)·β, written out again here."""
    return (torch.clamp(torch.round(v / beta) + z, qmin, qmax) - z) * beta


def _hand_loss(qat, x, y, lambdas):
    q_in, q_hidden, q_act = qat.quant_flatten, qat.fc1.out_quant, qat.quant_act
    W1, b1, W2, b2 = qat.fc1.weight, qat.fc1.bias, qat.fc2.weight, qat.fc2.bias
    b_in, b_w1, b_h, b_a, b_w2 = (q.scale for q in (q_in, qat.fc1.weight_quant, q_hidden, q_act, qat.fc2.weight_quant))
    z_in, z_h, z_a = (torch.round(q.zero_point) for q in (q_in, q_hidden, q_act))
    assert qat.fc1.weight_quant.qrange == (-8, 7) and q_in.qrange == (0, 255)
    W1q, W2q = _fq(W1, b_w1, 0, -8, 7), _fq(W2, b_w2, 0, -8, 7)
    b1q = torch.round(b1 / (b_in * b_w1)) * (b_in * b_w1)  # int32 bias at step β_in·β_W1
    b2q = torch.round(b2 / (b_a * b_w2)) * (b_a * b_w2)
    xq = _fq(x, b_in, z_in, 0, 255)
    h = _fq(xq @ W1q.T + b1q, b_h, z_h, 0, 255)
    a = _fq(torch.sigmoid(h), b_a, z_a, 0, 255)
    p = torch.softmax(a @ W2q.T + b2q, dim=-1)
    l1, l2, l3, l4 = (lambdas[k] for k in ("fc1.weight", "fc2.weight", "fc1.bias", "fc2.bias"))
    return (0.5 * ((p - y) ** 2).sum(-1).mean() + l1 * ((W1 - W1q) ** 2).mean() + l2 * ((W2 - W2q) ** 2).mean()
            + l3 * ((b1 - b1q) ** 2).mean() + l4 * ((b2 - b2q) ** 2).mean())


def test_loss_equals_hand_written_formula():
    ex = _example()
    x, y = ex.toy_data(64)
    qat = ex.build()
    qatkit.calibrate(qat, [x], num_batches=1)
    ex.train(qat, x, y, steps=20)  # move away from the initial point so every term is non-trivial
    qat = qat.double()
    x, y = x.double(), y.double()
    got = ex.seed_loss(qat, x, y)
    want = _hand_loss(qat, x, y, ex.LAMBDAS)
    errors = qatkit.quantization_errors(qat)
    assert all(errors[k].abs().max() > 0 for k in ex.LAMBDAS)  # every Δ term is present and non-zero
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_beta_moves_and_the_model_learns():
    ex = _example()
    x, y = ex.toy_data()
    qat = ex.build()
    qatkit.calibrate(qat, [x], num_batches=1)
    before = {n: p.detach().clone() for n, p in qat.named_parameters() if n.endswith("scale")}
    losses = ex.train(qat, x, y)
    assert losses[-1] < 0.5 * losses[0]
    for name, b in before.items():
        after = dict(qat.named_parameters())[name].detach()
        assert (after - b).abs().item() > 0.01 * b.abs().item(), name  # every β learned
    qat.eval()
    assert (qat(x).argmax(-1) == y.argmax(-1)).float().mean() > 0.85
