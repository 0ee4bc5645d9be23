"""A layer scale γ right after a Linear or Conv (timm's LayerScale `x * self.gamma` in ViT/CaiT/DeiT III, ConvNeXt's
`self.gamma.reshape(1, -1, 1, 1) * x`) is folded into the layer's weight and bias, as BatchNorm is: the product is
no float op any more, the residual add after it runs on integers, and γ still trains (through the folded weight)."""
from __future__ import annotations

import pytest
import torch
from conftest import converts_exactly, prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.config import QuantSpec
from qatkit.nn import QConv, QLinear


class LayerScale(nn.Module):  # timm's
    def __init__(self, dim, inplace=False):
        super().__init__()
        self.inplace, self.gamma = inplace, nn.Parameter(0.1 * torch.rand(dim) + 0.05)

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class TokenBlock(nn.Module):  # a ViT MLP block with layer scale; tokens (B, T, C)
    def __init__(self, inplace=False):
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.ls, self.head = LayerScale(16, inplace), nn.Linear(16, 4)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.ls(self.fc2(torch.relu(self.fc1(x))))
        return self.head(x.mean(1))


class ConvNeXtStyle(nn.Module):  # channels-first: pointwise convs, γ reshaped to (1, C, 1, 1) on the left
    def __init__(self):
        super().__init__()
        self.stem, self.pw1, self.pw2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 1), nn.Conv2d(32, 16, 1)
        self.gamma, self.fc = nn.Parameter(0.1 * torch.rand(16) + 0.05), nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.gamma.reshape(1, -1, 1, 1) * self.pw2(torch.relu(self.pw1(x)))
        return self.fc(x.mean((2, 3)))


CASES = {"timm": (lambda: TokenBlock(), (6, 5, 8)), "timm-inplace": (lambda: TokenBlock(inplace=True), (6, 5, 8)),
         "convnext": (ConvNeXtStyle, (4, 3, 8, 8))}


@pytest.mark.parametrize("name", CASES)
def test_layer_scale_is_folded_and_the_residual_add_runs_on_integers(name, tmp_path):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(*shape)
    with torch.no_grad():
        gamma = next(p for n, p in model.named_parameters() if n.endswith("gamma")).clone()
    qat = prepares_whole(model, x[:1], qatkit.QATConfig(weight_bits=8, act_bits=8))
    assert not [op for op in qat.qat_info.float_ops if "mul" in op]
    assert any(q.startswith("qadd_") for q in qat.qat_info.act_quantizers)
    folded = [r for r in qat.qat_info.layers if r.get("scale_folded")]
    assert [r["name"] for r in folded] == ["fc2" if name.startswith("timm") else "pw2"]
    assert "scale " in qatkit.describe(qat)
    names = [n for n, _ in qat.named_parameters()]  # γ once, held by its layer
    assert sum("gamma" in n or "layer_scale" in n for n in names) == 1
    layer = qat.get_submodule(folded[0]["name"])
    torch.testing.assert_close(layer.layer_scale.detach(), gamma)
    qatkit.calibrate(qat, [torch.randn(*shape) for _ in range(4)])
    integer = converts_exactly(qat, model, x, tolerance=0.05)
    assert runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")["max_step_diff"] == 0
    qat.train()
    qat(x).square().mean().backward()
    assert layer.layer_scale.grad is not None and layer.layer_scale.grad.abs().sum() > 0  # γ trains


@pytest.mark.parametrize("cls, shape", [(QLinear, (16, 32)), (QConv, (16, 32, 3, 3))])
def test_folded_weight_and_bias_are_gamma_times_them_in_float64(cls, shape):
    torch.manual_seed(0)
    layer = (nn.Linear(32, 16) if cls is QLinear else nn.Conv2d(32, 16, 3)).double()
    gamma = nn.Parameter(torch.randn(16, dtype=torch.float64))
    q = cls(layer, QuantSpec(bits=8), layer_scale=gamma)
    w, b = q.folded()
    expected_w = (torch.diag(gamma.detach()) @ layer.weight.detach().reshape(16, -1)).reshape(shape)
    torch.testing.assert_close(w.detach(), expected_w, rtol=0, atol=1e-15)
    torch.testing.assert_close(b.detach(), gamma.detach() * layer.bias.detach(), rtol=0, atol=1e-15)


class NotALayerScale(nn.Module):
    """Products that are no per-channel scale of a layer's output: they stay float ops, and the model converts."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.per_token = nn.Parameter(torch.rand(5, 1) + 0.5)  # along the tokens, not the channels
        self.register_buffer("fixed", torch.rand(16) + 0.5)  # a buffer, not a trained scale
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        h = self.fc1(x)
        a = self.fc2(h) * self.per_token
        b = self.fc3(h)
        c = b * self.gamma + b  # the layer's output has another reader
        return self.head(a + c * self.fixed)


def test_other_products_stay_float_ops(tmp_path):
    torch.manual_seed(0)
    model, x = NotALayerScale().eval(), torch.randn(6, 5, 8)
    qat = prepares_whole(model, x[:1], qatkit.QATConfig(weight_bits=8, act_bits=8))
    assert not any(r.get("scale_folded") for r in qat.qat_info.layers)
    assert len([op for op in qat.qat_info.float_ops if "(mul)" in op]) == 3
    assert {"per_token", "fixed", "gamma"} <= {n.split(".")[-1] for n, _ in qat.named_buffers()} | {
        n.split(".")[-1] for n, _ in qat.named_parameters()}
    qatkit.calibrate(qat, [torch.randn(6, 5, 8) for _ in range(4)])
    runs_in_onnx_runtime(converts_exactly(qat, model, x, tolerance=0.1), x, tmp_path / "m.onnx")
