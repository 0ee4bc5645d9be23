"""The QAT layers' eval forward (integer path of qatkit.kernels) against their training forward
(fake quantization), the int32 bias, and the ReLU6 clamp on output codes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from qatkit.config import QATConfig
from qatkit.nn import QConv, QConvBn, QLinear
from qatkit.quantizer import FakeQuantizer

CFG = QATConfig()


def make_layer(kind: str, act, with_out: bool, bits: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    out_spec = CFG.act_spec(bits, unsigned=act is not None) if with_out else None
    w_spec = CFG.weight_spec(bits, per_channel=True)
    if kind == "linear":
        fl = nn.Linear(16, 12)
        with torch.no_grad():
            fl.bias.normal_(0.0, 0.3)
        layer = QLinear(fl, w_spec, act=act, out_spec=out_spec)
        x = torch.randn(64, 16)
    elif kind == "conv":
        conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        with torch.no_grad():
            conv.bias.normal_(0.0, 0.3)
        layer = QConv(conv, w_spec, act=act, out_spec=out_spec)
        x = torch.randn(8, 3, 9, 9)
    else:  # conv + BN, frozen: trains as deployed
        conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.3)
            bn.running_mean.normal_(0.0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
        layer = QConvBn(conv, bn, w_spec, act=act, out_spec=out_spec)
        layer.bn_frozen.fill_(True)
        x = torch.randn(8, 3, 9, 9)
    with torch.no_grad():
        layer.weight_quant.init_from(layer.folded()[0])
    in_q = FakeQuantizer(CFG.act_spec(bits), kind="act")
    in_q.init_from(x)
    return layer, in_q, x


CASES = list(itertools.product(["linear", "conv", "convbn"], [None, "relu", "relu6"], [True, False], [8, 4]))


@pytest.mark.parametrize("kind, act, with_out, bits", CASES)
def test_integer_eval_agrees_with_fake_quant_training(kind, act, with_out, bits):
    layer, in_q, x = make_layer(kind, act, with_out, bits)
    with torch.no_grad():
        x_hat = in_q(x)
        layer.train()
        layer(x_hat, in_q)  # initialises the output quantizer from the first batch
        y_train = layer(x_hat, in_q)
        layer.eval()
        y_eval = layer(x_hat, in_q)
    assert y_eval.shape == y_train.shape and y_eval.dtype == torch.float32
    if with_out:
        s_y, z_y = layer.out_quant.qparams()
        diff = (y_eval - y_train).abs()
        assert diff.max() <= s_y * (1 + 1e-5), (diff.max(), s_y)  # within one output step everywhere
        assert (y_eval == y_train).float().mean() >= 0.99  # and the same value almost everywhere
        qmin, qmax = layer.out_quant.qrange
        codes = torch.round(y_eval / s_y) + z_y
        assert torch.allclose(y_eval, (codes - z_y) * s_y, atol=s_y * 1e-4)  # on the output grid
        assert codes.min() >= qmin and codes.max() <= qmax
    else:
        torch.testing.assert_close(y_eval, y_train, rtol=1e-5, atol=2e-6 * float(y_train.abs().max()))
    if act is not None:
        assert y_eval.min() >= 0.0
    if act == "relu6":
        assert y_eval.max() <= 6.0 + (float(layer.out_quant.qparams()[0]) / 2 if with_out else 0.0)


@pytest.mark.parametrize("kind", ["linear", "conv", "convbn"])
def test_integer_path_int32_bias_is_round_of_bias_over_input_times_weight_scale(kind):
    """With zero input every centred input code is 0, so the accumulator is the int32 bias itself and,
    without an output quantizer, the output is float32(q_b)·s_x·s_w."""
    layer, in_q, x = make_layer(kind, None, with_out=False)
    layer.eval()
    zero = torch.zeros_like(x[:2])
    with torch.no_grad():
        y = layer(in_q(zero), in_q)
    s_x = np.float64(in_q.qparams()[0].item())
    s_w = layer.weight_quant.qparams()[0].double().numpy()
    b = layer.folded()[1].detach().double().numpy()
    q_b_ref = np.rint(b / (s_x * s_w))
    assert np.abs(q_b_ref).max() < 2**31 and np.abs(q_b_ref).max() > 100  # a real int32 bias, not a rounding artefact
    y_ch = y.double().numpy()[0] if kind == "linear" else y.double().numpy()[0, :, 0, 0]
    np.testing.assert_array_equal(np.rint(y_ch / (s_x * s_w)), q_b_ref)
    # the training forward adds the same rounded bias: b̂ = q_b·s_x·s_w
    layer.train()
    with torch.no_grad():
        y_train = layer(in_q(zero), in_q)
    y_train_ch = y_train.double().numpy()[0] if kind == "linear" else y_train.double().numpy()[0, :, 0, 0]
    np.testing.assert_allclose(y_train_ch, q_b_ref * s_x * s_w, rtol=1e-6)


@pytest.mark.parametrize("zero_point", [0.0, 10.0])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_relu6_clamps_output_codes_at_round_6_over_s_plus_z(mode, zero_point):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    layer = QConv(conv, CFG.weight_spec(8, per_channel=True), act="relu6", out_spec=CFG.act_spec(8, unsigned=True))
    with torch.no_grad():
        layer.weight_quant.init_from(layer.weight)
        s = 0.07  # 6 / s = 85.71...: the top code is round(6/s) + z = 86 + z, above 6.0 by 0.02
        layer.out_quant.scale.fill_(s)
        layer.out_quant.zero_point.fill_(zero_point)
        layer.out_quant.initialized.fill_(True)
    x = torch.randn(4, 2, 8, 8) * 20  # most outputs far beyond 6
    in_q = FakeQuantizer(CFG.act_spec(8), kind="act")
    in_q.init_from(x)
    layer.train(mode == "train")
    with torch.no_grad():
        y = layer(in_q(x), in_q)
    s32 = float(torch.tensor(s))
    codes = torch.round(y.double() / s32) + zero_point
    top = round(6 / s32) + zero_point
    assert top == 86 + zero_point
    assert codes.max().item() == top and codes.min().item() == zero_point
    assert (codes == top).float().mean() > 0.2  # the clamp is really exercised
    assert y.max().item() == pytest.approx(86 * s32, rel=1e-6) and y.max().item() > 6.0


def test_eval_without_calibrated_input_runs_the_float_fake_quant_path():
    """No input quantizer: the layer cannot run integers, and eval equals the weight-only fake-quant forward."""
    layer, _, x = make_layer("linear", "relu", with_out=False)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        w_hat = layer.weight_quant(layer.weight)
        expected = torch.relu(x @ w_hat.T + layer.bias)
    torch.testing.assert_close(y, expected)
    assert layer.last_input_quant is None


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 1e-6])
def test_a_pruned_or_tiny_channel_keeps_its_bias(gamma, power_of_two):
    """A channel whose folded weights are 0 (BN γ = 0: network slimming) or tiny has its weight scale at the floor of
    1e-8, where the bias code β/(s_x·s_w) saturated int32 (β = 1 came out 0.638, 45 steps off) and, with tiny weights
    beside it, the integer sum wrapped (143 steps; the training forward, adding the bias in float, did not). The
    weight scale is at least |b|/(s_x·2^30): the channel's output is relu(β) and training computes what eval does."""
    import qatkit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    xs = [torch.randn(8, 3, 6, 6) for _ in range(4)]
    with torch.no_grad():
        for x in xs:  # BN statistics
            model(x)
        model[1].weight[2], model[1].bias[2] = gamma, 1.0
    model.eval()
    qat = qatkit.prepare(model, QATConfig(power_of_two_scales=power_of_two), xs[0])
    qatkit.calibrate(qat, xs, num_batches=4)
    integer = qatkit.convert(qat.eval())
    node = next(n for n in integer.nodes if n["op"] == "qlayer")
    codes = integer.tensor(node["bias"]["tensor"]).double()
    assert codes.abs().max() <= 2 ** 30 * (1 + 1e-6) and codes[2] > 2 ** 29  # at the limit (float32), not 2^31 - 1
    assert codes[[0, 1, 3]].abs().max() < 2 ** 20  # (the other channels' scales are their own)
    x = xs[0]
    with torch.no_grad():
        out = integer.values(x)[node["name"]]
        channel = ((out.codes - out.zero_point) * out.scale)[:, 2].double()
        assert (channel - torch.relu(model[:3](x)[:, 2]).double()).abs().max() <= float(out.scale) / 2  # within ½ step
        first = next(m for m in qat.modules() if isinstance(m, QConvBn))
        first.bn_frozen.fill_(True)  # (trains as deployed)
        assert torch.equal(qat.train()(x), qat.eval()(x)) and torch.equal(integer(x), qat(x))
