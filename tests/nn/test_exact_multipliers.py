"""Exact requantization multipliers (QATConfig(exact_multipliers=True)): each conv/linear weight scale nudged so that
the layer's multiplier M = f32(f32(s_x·s_w) / s_y) is a multiple of g = 2^-(24 - b), b the output bits. Then
float32(acc)·M is exact for every unsaturated output, and ONNX Runtime's float32 requantization and integer-only
hardware's M0·2^-n round the same real number (tests/export/test_integer_reference.py checks the exported models).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qatkit
from qatkit import kernels
from qatkit.export.integer_reference import multiply_by_quantized_multiplier, quantize_multiplier
from qatkit.nn.qlayer import QLayer


def _case(bits: int):
    rng = np.random.default_rng(bits)
    s_in, s_out = (torch.tensor(np.float32(rng.uniform(lo, hi))) for lo, hi in ((0.005, 0.05), (0.02, 0.2)))
    s_w = torch.from_numpy((10.0 ** rng.uniform(-3.5, -1.5, 256)).astype(np.float32))
    return rng, s_in, s_w, s_out


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_multipliers_on_the_grid_and_the_nearest_such_scale(bits):
    _, s_in, s_w, s_out = _case(bits)
    got = kernels.exact_multiplier_scale(s_in, s_w, s_out, bits)
    g = 2.0 ** -(24 - bits)
    m = kernels.multiplier(s_in, got, s_out).double().numpy()
    on_grid = np.remainder(m, g) == 0
    # float32 rounding puts a grid multiplier out of reach now and then (0.1 % of channels over random scales):
    # such a channel keeps its scale
    assert got.dtype == torch.float32 and np.all(m > 0) and np.mean(on_grid) >= 0.98
    assert torch.equal(got[~torch.from_numpy(on_grid)], s_w[~torch.from_numpy(on_grid)])
    free = kernels.multiplier(s_in, s_w, s_out).double().numpy()
    assert np.mean(np.remainder(free, g) == 0) < 0.1  # the nudge is what puts them there
    # nearest: no float32 closer to s_w (either side) has its multiplier on the grid; scanned where the nudge is short
    sw, gt = s_w.numpy(), got.numpy()
    dist = np.abs(gt.astype(np.float64) - sw)
    span = np.abs(gt.view(np.int32).astype(np.int64) - sw.view(np.int32))
    scanned = np.flatnonzero(on_grid & (span <= 2**16))
    assert len(scanned) >= 32
    for c in scanned:
        i = int(sw[c].view(np.int32))
        near = np.arange(i - span[c] - 2, i + span[c] + 3, dtype=np.int64).astype(np.int32).view(np.float32)
        near = near[np.abs(near.astype(np.float64) - sw[c]) < dist[c]]
        mult = ((np.float32(s_in) * near) / np.float32(s_out)).astype(np.float64)
        assert not np.any(np.remainder(mult, g) == 0), c


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_float32_products_exact_and_fixed_point_rounds_the_same(bits):
    """Every accumulator with |acc·M| < 2^b: float32(acc)·M (numpy float32, as ORT) is the exact product, so its
    rint (half to even) is the fixed-point single rounding of acc·M0·2^-(31+n). With the free multipliers it is
    not."""
    rng, s_in, s_w, s_out = _case(bits)
    for scales, exact in ((kernels.exact_multiplier_scale(s_in, s_w, s_out, bits), True), (s_w, False)):
        m = kernels.multiplier(s_in, scales, s_out).numpy()
        m = m[np.remainder(m.astype(np.float64), 2.0 ** -(24 - bits)) == 0] if exact else m  # the channels on the grid
        c = rng.integers(0, m.size, 200_000)
        acc = np.trunc(rng.uniform(-1, 1, c.size) * 2.0**bits / m[c].astype(np.float64)).astype(np.int64)
        prod = acc.astype(np.float32) * m[c]
        equal = prod.astype(np.float64) == acc * m[c].astype(np.float64)
        assert np.all(equal) if exact else not np.all(equal)
        if exact:
            fixed = multiply_by_quantized_multiplier(acc, *quantize_multiplier(m[c]))
            assert np.array_equal(np.rint(prod).astype(np.int64), fixed)


def _prepared(exact: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(16, 3, 8, 8)
    q = qatkit.prepare(net, qatkit.QATConfig(exact_multipliers=exact), x[:2])
    qatkit.calibrate(q, [x])
    return q, x


def test_layers_quantize_with_the_nudged_scale_and_its_gradient_goes_straight_through():
    q, x = _prepared(True)
    q.train()
    q(x)  # each layer records its input's quantizer
    layers = [m for m in q.modules() if isinstance(m, QLayer)]
    nudged = [m for m in layers if m.weight_scale(m.last_input_quant, None) is not None]
    assert len(nudged) == len(layers) == 3  # every layer has a quantized input and output
    for m in nudged:
        in_q, wq = m.last_input_quant, m.weight_quant
        s = m.weight_scale(in_q, None)
        want = kernels.exact_multiplier_scale(in_q.qparams()[0], wq.qparams()[0], m.out_quant.qparams()[0],
                                              int(m.out_quant.bits))
        assert torch.equal(s.detach(), want) and not torch.equal(want, wq.qparams()[0])
        wq.scale.grad = None
        s.sum().backward()
        assert torch.equal(wq.scale.grad, torch.sign(wq.scale.detach()))  # d|s|/ds, straight through the nudge
    # the training forward's weights are the weight codes at that scale: fake-quant(w) = codes(w, s)·s
    m = nudged[-1]
    s = m.weight_qscale(m.last_input_quant, m.folded()[1])
    w_hat = m.weight_quant(m.folded()[0], scale=s)
    assert torch.equal(w_hat, m.weight_quant.codes(m.folded()[0], s) * s.view(-1, 1))


@pytest.mark.parametrize("exact", [False, True])
def test_integer_model_equals_the_qat_model(exact):
    """The converted integer model computes the QAT model's eval forward exactly, nudged scales included."""
    q, x = _prepared(exact)
    q.eval()
    integer = qatkit.convert(q)
    assert torch.equal(integer(x), q(x))
    s_w = [integer.tensor(n["weight_scale"]["tensor"]) for n in integer.nodes if n.get("op") == "qlayer"]
    assert len(s_w) == 3
