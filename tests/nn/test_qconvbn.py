"""QConvBn against float64 references written out by hand: the BN fold, the deployed (folded) forward,
and the training forward while BN still learns (quantize w·γ/σ_running, undo the fold, BN on batch stats)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qatkit.config import QATConfig
from qatkit.nn import QConvBn

EPS = 1e-5
MOMENTUM = 0.1


def make_layer(*, bias: bool, act=None, bits: int = 8, seed: int = 0, groups: int = 1):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias, groups=groups)
    bn = nn.BatchNorm2d(6, eps=EPS, momentum=MOMENTUM)
    with torch.no_grad():
        bn.weight.copy_(torch.empty(6).uniform_(0.5, 1.5) * torch.tensor([1, -1, 1, 1, -1, 1.0]))  # negative γ too
        bn.bias.copy_(torch.randn(6) * 0.3)
        bn.running_mean.copy_(torch.randn(6) * 0.2)
        bn.running_var.copy_(torch.empty(6).uniform_(0.3, 3.0))
        if bias:
            conv.bias.copy_(torch.randn(6) * 0.2)
    layer = QConvBn(conv, bn, QATConfig().weight_spec(bits, per_channel=True), act=act)
    with torch.no_grad():
        layer.weight_quant.init_from(layer.folded()[0])
    return layer


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def ref_fold(layer: QConvBn, running_mean=None, running_var=None):
    """w·γ/σ and β + (b - μ)·γ/σ in float64, from the layer's raw parameters."""
    w, gamma, beta = f64(layer.weight), f64(layer.bn.weight), f64(layer.bn.bias)
    mu = f64(layer.bn.running_mean) if running_mean is None else running_mean
    var = f64(layer.bn.running_var) if running_var is None else running_var
    b = f64(layer.bias) if layer.bias is not None else np.zeros(w.shape[0])
    g = gamma / np.sqrt(var + EPS)
    return w * g[:, None, None, None], beta + (b - mu) * g, g


def ref_weight_fake_quant(w: np.ndarray, layer: QConvBn) -> np.ndarray:
    """Symmetric per-output-channel fake quantization, round half to even, in float64."""
    s = f64(layer.weight_quant.qparams()[0])
    qmin, qmax = layer.weight_quant.qrange
    codes = np.clip(np.rint(w / s[:, None, None, None]), qmin, qmax)
    return codes * s[:, None, None, None]


def ref_conv(x: np.ndarray, w: np.ndarray, b, groups: int = 1) -> np.ndarray:
    bt = None if b is None else torch.from_numpy(np.ascontiguousarray(b))
    return F.conv2d(torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w)), bt, padding=1, groups=groups).numpy()


@pytest.mark.parametrize("bias", [False, True])
def test_folded_weight_and_bias_match_float64(bias):
    layer = make_layer(bias=bias)
    w_ref, b_ref, _ = ref_fold(layer)
    w, b = layer.folded()
    np.testing.assert_allclose(f64(w), w_ref, rtol=1e-6, atol=1e-7 * np.abs(w_ref).max())
    np.testing.assert_allclose(f64(b), b_ref, rtol=1e-6, atol=1e-7 * np.abs(b_ref).max())


def test_fold_of_a_conv_without_bias_uses_zero_bias():
    layer = make_layer(bias=False)
    _, b = layer.folded()
    g = f64(layer.bn.weight) / np.sqrt(f64(layer.bn.running_var) + EPS)
    np.testing.assert_allclose(f64(b), f64(layer.bn.bias) - f64(layer.bn.running_mean) * g, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["eval", "train-frozen"])
def test_deployed_forward_is_conv_with_folded_fake_quantized_weight(mode, bias, act):
    layer = make_layer(bias=bias, act=act, bits=4)
    stats = (layer.bn.running_mean.clone(), layer.bn.running_var.clone(), layer.bn.num_batches_tracked.clone())
    x = torch.randn(3, 4, 5, 5)
    if mode == "eval":
        layer.eval()
    else:
        layer.train()
        layer.bn_frozen.fill_(True)
    with torch.no_grad():
        y = layer(x)
    w_ref, b_ref, _ = ref_fold(layer)
    # the codes computed in float64 are the codes the layer uses (no tie flips with this seed)
    np.testing.assert_array_equal(f64(layer.weight_quant.codes(layer.folded()[0])),
                                  np.clip(np.rint(w_ref / f64(layer.weight_quant.qparams()[0])[:, None, None, None]), -8, 7))
    y_ref = ref_conv(f64(x), ref_weight_fake_quant(w_ref, layer), b_ref)
    if act == "relu":
        y_ref = np.maximum(y_ref, 0.0)
    np.testing.assert_allclose(f64(y), y_ref, rtol=1e-5, atol=2e-6 * np.abs(y_ref).max())
    # the running statistics are not touched by the deployed forward
    assert torch.equal(layer.bn.running_mean, stats[0]) and torch.equal(layer.bn.running_var, stats[1])
    assert torch.equal(layer.bn.num_batches_tracked, stats[2])


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("bias", [False, True])
def test_training_forward_with_learning_bn(bias, act):
    """Jacob et al. 2018 / torch.ao's QAT ConvBn: y = conv(x, q(w·γ/σ_run)) / (γ/σ_run) (+ b), then BN with
    batch statistics; the running statistics move towards the batch statistics."""
    layer = make_layer(bias=bias, act=act)
    layer.train()
    mu0, var0 = f64(layer.bn.running_mean), f64(layer.bn.running_var)
    x = torch.randn(4, 4, 5, 5)
    y = layer(x)

    w_ref, _, g = ref_fold(layer, mu0, var0)
    z = ref_conv(f64(x), ref_weight_fake_quant(w_ref, layer), None) / g[None, :, None, None]
    if bias:
        z = z + f64(layer.bias)[None, :, None, None]
    mean_b = z.mean(axis=(0, 2, 3))
    var_b = z.var(axis=(0, 2, 3))  # biased, for normalisation
    y_ref = (z - mean_b[None, :, None, None]) / np.sqrt(var_b + EPS)[None, :, None, None]
    y_ref = y_ref * f64(layer.bn.weight)[None, :, None, None] + f64(layer.bn.bias)[None, :, None, None]
    if act == "relu":
        y_ref = np.maximum(y_ref, 0.0)
    np.testing.assert_allclose(f64(y), y_ref, rtol=1e-4, atol=1e-5)

    n = z.size / z.shape[1]
    np.testing.assert_allclose(f64(layer.bn.running_mean), (1 - MOMENTUM) * mu0 + MOMENTUM * mean_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f64(layer.bn.running_var), (1 - MOMENTUM) * var0 + MOMENTUM * var_b * n / (n - 1),
                               rtol=1e-5, atol=1e-6)
    assert int(layer.bn.num_batches_tracked) == 1


def test_training_forward_gives_gradients_to_bn_and_weights():
    layer = make_layer(bias=True, act="relu")
    layer.train()
    layer(torch.randn(4, 4, 5, 5)).square().sum().backward()
    for p in (layer.weight, layer.bias, layer.bn.weight, layer.bn.bias, layer.weight_quant.scale):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_freezing_switches_training_to_the_deployed_forward():
    layer = make_layer(bias=False)
    x = torch.randn(4, 4, 5, 5)
    layer.eval()
    with torch.no_grad():
        deployed = layer(x)
    layer.train()
    with torch.no_grad():
        learning = layer(x)
    assert not torch.allclose(learning, deployed, atol=1e-3)  # batch stats differ from the running ones
    layer.bn_frozen.fill_(True)
    stats = layer.bn.running_mean.clone()
    with torch.no_grad():
        frozen = layer(x)
    assert torch.equal(layer.bn.running_mean, stats)
    layer.eval()
    with torch.no_grad():
        deployed = layer(x)  # with the running statistics the learning step updated
    assert torch.equal(frozen, deployed)


def test_depthwise_fold():
    layer = make_layer(bias=True, groups=2)
    w_ref, b_ref, _ = ref_fold(layer)
    layer.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y = layer(x)
    y_ref = ref_conv(f64(x), ref_weight_fake_quant(w_ref, layer), b_ref, groups=2)
    np.testing.assert_allclose(f64(y), y_ref, rtol=1e-5, atol=2e-6 * np.abs(y_ref).max())
