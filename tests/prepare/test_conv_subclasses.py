"""Conv subclasses whose forward calls F.conv2d itself, as timm writes them: Conv2dSame pads its input to 'same'
(math.ceil of the size over the stride) and convolves with padding 0. The convolution is quantized as the layer's
own (BN folded, ReLU fused), the size arithmetic is exact in the integer model and ONNX, and ONNX Runtime computes
the integer model's values at the example's size and at others."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import converts_exactly, prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit


def pad_same(x, k, s, d=(1, 1), value=0.0):  # timm's
    ih, iw = x.size()[-2:]
    pad_h = max((math.ceil(ih / s[0]) - 1) * s[0] + (k[0] - 1) * d[0] + 1 - ih, 0)
    pad_w = max((math.ceil(iw / s[1]) - 1) * s[1] + (k[1] - 1) * d[1] + 1 - iw, 0)
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=value)


class Conv2dSame(nn.Conv2d):  # timm's
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, padding=0)

    def forward(self, x):
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class SameNet(nn.Module):  # a TF-ported EfficientNet's stem and a depthwise stage
    def __init__(self):
        super().__init__()
        self.stem, self.bn1 = Conv2dSame(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("size", [9, 16])
def test_conv2d_same_is_quantized_as_its_layer_and_runs_in_onnx_runtime(size, tmp_path):
    torch.manual_seed(0)
    model, x = SameNet().eval(), torch.randn(4, 3, size, size)
    qat = prepares_whole(model, x[:1], qatkit.QATConfig(weight_bits=8, act_bits=8))
    assert [(r["name"], r["bn_folded"], r["act"]) for r in qat.qat_info.layers] == [
        ("stem", True, "relu"), ("dw", True, "relu"), ("fc", False, None)]
    assert not [op for op in qat.qat_info.float_ops if "conv" in op or "ceil" in op]
    qatkit.calibrate(qat, [torch.randn(4, 3, size, size) for _ in range(4)])
    integer = converts_exactly(qat, model, x, tolerance=0.05)
    assert runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")["max_step_diff"] == 0
    assert qat.qat_info.input_sizes["x"] == [None, 3, None, None]  # the pads follow the image size
    other = torch.randn(2, 3, size + 3, size + 3)
    with torch.no_grad():
        assert torch.equal(integer(other), qat(other))
    runs_in_onnx_runtime(integer, other, tmp_path / "other.onnx")
