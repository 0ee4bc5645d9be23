"""torch.nn's activation, norm, padding, pooling and shuffling modules, and functional norms, between two quantized
convs: the integer model computes what PyTorch does (float64, nothing quantized), QAT eval = integer model bit for
bit, ONNX Runtime within one step and the integer-only reference = ONNX Runtime."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import converts_exactly, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.errors import QatkitError

MODULES = {
    "ELU": lambda: nn.ELU(0.7), "SELU": nn.SELU, "CELU": lambda: nn.CELU(1.3), "Softplus": lambda: nn.Softplus(2.0, 3.0),
    "Mish": nn.Mish, "PReLU": lambda: nn.PReLU(8, 0.2), "RReLU": lambda: nn.RReLU(0.1, 0.3), "LogSigmoid": nn.LogSigmoid, "Softsign": nn.Softsign,
    "Tanhshrink": nn.Tanhshrink, "GELU(approximate='tanh')": lambda: nn.GELU(approximate="tanh"), "Hardshrink": lambda: nn.Hardshrink(0.3), "Softshrink": lambda: nn.Softshrink(0.3),
    "Threshold": lambda: nn.Threshold(0.1, -0.5), "GLU": lambda: nn.GLU(1), "LogSoftmax": lambda: nn.LogSoftmax(1),
    "Softmin": lambda: nn.Softmin(1), "Softmax2d": nn.Softmax2d, "LocalResponseNorm": lambda: nn.LocalResponseNorm(3),
    "ZeroPad2d": lambda: nn.ZeroPad2d((1, 0, 2, 1)), "ConstantPad2d": lambda: nn.ConstantPad2d(1, 0.5),
    "ReflectionPad2d": lambda: nn.ReflectionPad2d(1), "ReplicationPad2d": lambda: nn.ReplicationPad2d((0, 1, 1, 0)),
    "Dropout2d": lambda: nn.Dropout2d(0.1), "AlphaDropout": lambda: nn.AlphaDropout(0.1),
    "AdaptiveMaxPool2d(1)": lambda: nn.AdaptiveMaxPool2d(1), "AdaptiveMaxPool2d(4)": lambda: nn.AdaptiveMaxPool2d(4),
    "AdaptiveMaxPool2d(3)": lambda: nn.AdaptiveMaxPool2d(3),  # (windows of 3 and 4 pixels on 8: uneven)
    "AdaptiveAvgPool2d((3, 5))": lambda: nn.AdaptiveAvgPool2d((3, 5)),
    "Unfold-Fold": lambda: nn.Sequential(nn.Unfold(3, padding=1), nn.Fold((8, 8), 3, padding=1)),  # overlapping
    "Unfold-Fold(stride, dilation)": lambda: nn.Sequential(nn.Unfold(2, dilation=2, stride=3),
                                                           nn.Fold((8, 8), 2, dilation=2, stride=3)),
    "Unfold(patches)": lambda: nn.Sequential(nn.Unfold(2, stride=2), nn.Unflatten(2, (4, 4))),  # patches as channels
    "PixelUnshuffle": lambda: nn.PixelUnshuffle(2), "ChannelShuffle": lambda: nn.ChannelShuffle(2),
    "Unflatten": lambda: nn.Sequential(nn.Flatten(2), nn.Unflatten(2, (8, 8))),
    "UpsamplingNearest2d": lambda: nn.UpsamplingNearest2d(scale_factor=2),
    "UpsamplingBilinear2d": lambda: nn.UpsamplingBilinear2d(scale_factor=2),
    "MaxPool2d(ceil_mode)": lambda: nn.MaxPool2d(3, 2, ceil_mode=True),
    "AvgPool2d(ceil_mode)": lambda: nn.AvgPool2d(3, 2, ceil_mode=True),
    "AvgPool2d(ceil_mode, padding)": lambda: nn.AvgPool2d(3, 2, padding=1, ceil_mode=True),
    "AvgPool2d(ceil_mode, padding, count_include_pad=False)":
        lambda: nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False),
    "LPPool2d(2)": lambda: nn.LPPool2d(2, 2),  # (a fractional power of a negative sum is NaN in PyTorch: after a ReLU)
    "LPPool2d(1.5, ceil_mode)": lambda: nn.Sequential(nn.ReLU(), nn.LPPool2d(1.5, 3, 2, ceil_mode=True)),
    "LPPool2d(inf)": lambda: nn.LPPool2d(float("inf"), 2), "LPPool2d(-inf)": lambda: nn.LPPool2d(float("-inf"), 2),
    # norms without their affine parameters (ONNX's LayerNormalization needs a scale: ones; ONNX Runtime read a
    # missing one as NaN before); the BatchNorm after a ReLU is not folded
    "LayerNorm((8, 8), elementwise_affine=False)": lambda: nn.LayerNorm((8, 8), elementwise_affine=False),
    "LayerNorm(8, bias=False)": lambda: nn.LayerNorm(8, bias=False), "GroupNorm(affine=False)": lambda: nn.GroupNorm(
        2, 8, affine=False), "InstanceNorm2d": lambda: nn.InstanceNorm2d(8),
    "ReLU-BatchNorm2d(affine=False)": lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(8, affine=False).eval()),
    **({"RMSNorm((8, 8), elementwise_affine=False)": lambda: nn.RMSNorm((8, 8), elementwise_affine=False)}
       if hasattr(nn, "RMSNorm") else {}),
}


class Between(nn.Module):
    """conv → the module → conv → mean → linear (8×8 images: the pools' partial last windows are real)."""

    def __init__(self, mid: nn.Module):
        super().__init__()
        self.c1, self.mid = nn.Conv2d(3, 8, 3, padding=1), mid
        self.c2, self.head = nn.Conv2d(mid(torch.zeros(1, 8, 8, 8)).shape[1], 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.c2(self.mid(self.c1(x))).mean((2, 3)))


@pytest.mark.parametrize("name", list(MODULES))
def test_the_integer_model_computes_the_module_as_pytorch_does(name):
    torch.manual_seed(0)
    model = Between(MODULES[name]()).double().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    config = qatkit.QATConfig(rules=(qatkit.LayerRule(pattern="*", skip=True),))  # nothing quantized
    qat = qatkit.prepare(model, config, x)
    with torch.no_grad():
        torch.testing.assert_close(qatkit.convert(qat.eval())(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(MODULES))
def test_the_module_converts_and_runs_in_onnx_runtime(name, tmp_path):
    torch.manual_seed(0)
    model = Between(MODULES[name]()).eval()
    x = torch.randn(16, 3, 8, 8)
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:2])
    qatkit.calibrate(qat, [x])
    runs_in_onnx_runtime(converts_exactly(qat, model, x, 0.5), x, tmp_path / "m.onnx")


PADS_3D = {"ConstantPad3d": lambda: nn.ConstantPad3d((1, 0, 2, 1, 0, 1), 0.5), "ZeroPad3d": lambda: nn.ZeroPad3d(1),
           "ReflectionPad3d": lambda: nn.ReflectionPad3d(1),
           "ReplicationPad3d": lambda: nn.ReplicationPad3d((0, 1, 1, 0, 1, 1))}


@pytest.mark.parametrize("name", list(PADS_3D))
def test_a_3d_padding_module_converts_and_runs_in_onnx_runtime(name, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), PADS_3D[name](), nn.Conv3d(8, 8, 3), nn.AdaptiveAvgPool3d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(4, 3, 5, 6, 7)
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:1])
    qatkit.calibrate(qat, [x])
    assert runs_in_onnx_runtime(converts_exactly(qat, model, x, 0.1), x, tmp_path / "m.onnx")["max_step_diff"] == 0


def test_a_module_onnx_cannot_express_is_refused_at_export_with_the_fix(tmp_path):
    from qatkit.export import export_onnx

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qat = qatkit.prepare(Between(nn.LocalResponseNorm(4)).eval(), qatkit.QATConfig(), x[:2])
    qatkit.calibrate(qat, [x])
    with pytest.raises(QatkitError, match="use an odd size"):
        export_onnx(qatkit.convert(qat.eval()), tmp_path / "m.onnx", x[:1])
    assert not (tmp_path / "m.onnx").exists()


class Functional(nn.Module):
    """conv → a functional norm with the model's parameters, given by position as people write them → conv."""

    def __init__(self, norm):
        super().__init__()
        self.c1, self.c2, self.head, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Linear(8, 4), norm
        self.w, self.b, self.w2 = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8)), nn.Parameter(
            torch.rand(8, 8) + 0.5)
        self.register_buffer("mean", torch.randn(8))
        self.register_buffer("var", torch.rand(8) + 0.5)

    def forward(self, x):
        return self.head(self.c2(self.norm(self, self.c1(x))).mean((2, 3)))


FUNCTIONAL = {
    "batch_norm": lambda m, y: F.batch_norm(y, m.mean, m.var, m.w, m.b, False, 0.1, 1e-2),
    "batch_norm without weights": lambda m, y: F.batch_norm(y, m.mean, m.var),
    "instance_norm": lambda m, y: F.instance_norm(y, None, None, m.w, m.b),
    "instance_norm with running statistics": lambda m, y: F.instance_norm(y, m.mean, m.var, m.w, m.b, False),
    "group_norm": lambda m, y: F.group_norm(y, 2, m.w, m.b, 1e-3),
    "layer_norm": lambda m, y: F.layer_norm(y, (8, 8), m.w2, None, 1e-3),
    "layer_norm without weights": lambda m, y: F.layer_norm(y, (8,)),
    "layer_norm over sizes read from the tensor": lambda m, y: F.layer_norm(y, y.shape[-2:]),
    **({"rms_norm over sizes read from the tensor": lambda m, y: F.rms_norm(y, y.shape[-1:], m.w, 1e-4)}
       if hasattr(F, "rms_norm") else {}),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_a_functional_norm_converts_and_runs_in_onnx_runtime(name, tmp_path):
    torch.manual_seed(0)
    model = Functional(FUNCTIONAL[name]).eval()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        skip = qatkit.QATConfig(rules=(qatkit.LayerRule(pattern="*", skip=True),))  # nothing quantized, float64
        exact = qatkit.convert(qatkit.prepare(model.double(), skip, x.double()).eval())(x.double())
        torch.testing.assert_close(exact, model(x.double()), rtol=1e-12, atol=1e-12)
    model.float()
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:2])
    qatkit.calibrate(qat, [x])
    runs_in_onnx_runtime(converts_exactly(qat, model, x, 0.5), x, tmp_path / "m.onnx")
