"""QConvTranspose and QConvTransposeBn against float64 references written out by hand: per-output-channel weight
scales on the weight's axis 1, the BN fold along it, the training forward while BN still learns."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qatkit.config import QATConfig
from qatkit.errors import ConfigError
from qatkit.nn import QConvTranspose, QConvTransposeBn

EPS = 1e-5


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def conv_t(x: np.ndarray, w: np.ndarray, b, groups: int = 1) -> np.ndarray:
    bt = None if b is None else torch.from_numpy(np.ascontiguousarray(b))
    return F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w)), bt, stride=2, padding=1,
                              output_padding=1, groups=groups).numpy()


def fake_quant(w: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, axis: int | None) -> np.ndarray:
    s = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    return np.clip(np.rint(w / s), qmin, qmax) * s


def make(bn: bool, groups: int = 1, bits: int = 4):
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups)
    spec = QATConfig().weight_spec(bits, per_channel=True)
    if not bn:
        layer = QConvTranspose(conv, spec)
    else:
        norm = nn.BatchNorm2d(6, eps=EPS)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5).mul_(torch.tensor([1, -1, 1, 1, -1, 1.0]))
            norm.bias.normal_(0, 0.3)
            norm.running_mean.normal_(0, 0.2)
            norm.running_var.uniform_(0.3, 3.0)
        layer = QConvTransposeBn(conv, norm, spec)
    with torch.no_grad():
        layer.weight_quant.init_from(layer.folded()[0])
    return layer


@pytest.mark.parametrize("bn", [False, True])
def test_deployed_forward_is_the_transposed_conv_of_per_output_channel_fake_quantized_weights(bn):
    layer = make(bn).eval()
    x = torch.randn(3, 4, 5, 5)
    w, b = f64(layer.weight), f64(layer.bias)
    if bn:  # the fold along the output channels, axis 1 of a transposed conv's (C_in, C_out, k, k) weight
        g = f64(layer.bn.weight) / np.sqrt(f64(layer.bn.running_var) + EPS)
        w, b = w * g[None, :, None, None], f64(layer.bn.bias) + (b - f64(layer.bn.running_mean)) * g
        np.testing.assert_allclose(f64(layer.folded()[0]), w, rtol=1e-6, atol=1e-7)
    scale = f64(layer.weight_quant.qparams()[0])
    assert scale.shape == (6,)  # one scale per output channel
    with torch.no_grad():
        y = layer(x)
    y_ref = conv_t(f64(x), fake_quant(w, scale, -8, 7, axis=1), b)
    np.testing.assert_allclose(f64(y), y_ref, rtol=1e-5, atol=2e-6 * np.abs(y_ref).max())


def test_training_forward_with_learning_bn():
    """y = conv_t(x, q(w·γ/σ_run) / (γ/σ_run)) + b, then BN with batch statistics."""
    layer = make(bn=True).train()
    x = torch.randn(4, 4, 5, 5)
    g = f64(layer.bn.weight) / np.sqrt(f64(layer.bn.running_var) + EPS)
    y = layer(x)
    w_q = fake_quant(f64(layer.weight) * g[None, :, None, None], f64(layer.weight_quant.qparams()[0]), -8, 7, axis=1)
    z = conv_t(f64(x), w_q / g[None, :, None, None], f64(layer.bias))
    mean, var = z.mean(axis=(0, 2, 3), keepdims=True), z.var(axis=(0, 2, 3), keepdims=True)
    y_ref = (z - mean) / np.sqrt(var + EPS) * f64(layer.bn.weight)[None, :, None, None] + f64(layer.bn.bias)[None, :, None, None]
    np.testing.assert_allclose(f64(y), y_ref, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    for p in (layer.weight, layer.bias, layer.bn.weight, layer.weight_quant.scale):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_grouped_transposed_conv_has_one_weight_scale():
    """With groups an output channel's weights span the groups' (C_in/g, C_out/g) blocks: a per-tensor scale."""
    layer = make(bn=False, groups=2).eval()
    assert layer.weight_quant.scale.numel() == 1
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y = layer(x)
    y_ref = conv_t(f64(x), fake_quant(f64(layer.weight), f64(layer.weight_quant.qparams()[0]), -8, 7, None),
                   f64(layer.bias), groups=2)
    np.testing.assert_allclose(f64(y), y_ref, rtol=1e-5, atol=2e-6 * np.abs(y_ref).max())


def test_a_padding_mode_other_than_zeros_is_refused():
    conv = nn.ConvTranspose2d(4, 6, 3)
    conv.padding_mode = "reflect"  # PyTorch's constructor refuses it; a loaded module may carry it
    with pytest.raises(ConfigError, match="padding_mode='zeros'"):
        QConvTranspose(conv, QATConfig().weight_spec(8, per_channel=True))
