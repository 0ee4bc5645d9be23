"""The integer runtime computes exactly the QAT model's eval outputs (torch.equal), before and after a
file round trip; its stored weights and int32 biases are the QAT layers' codes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatkit
from qatkit.convert import ops
from qatkit.convert.pack import unpack
from qatkit.export import export_onnx, verify
from qatkit.models import build_model
from qatkit.nn import QLayer


class PoolNet(nn.Module):
    """conv-BN-ReLU → max pool → conv-ReLU6 → avg pool → flatten → Linear-ReLU → Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.act2 = nn.ReLU6()
        self.pool2 = nn.AvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        x = self.pool2(self.act2(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(self.flat(x))))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm1d(6)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.bn(self.conv(x)))), 1))


class SharedConvNet(nn.Module):
    """One conv called twice: each call has its own input scale, int32 bias and requantization."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(F.relu(self.conv(x)))).mean((2, 3)))


def trained_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give the BNs non-trivial running statistics, as after float training."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def qat_model(model, x, bits):
    cfg = qatkit.QATConfig(weight_bits=bits, act_bits=bits, first_last_bits=None)
    qat = qatkit.prepare(model, cfg, x[:2])
    qatkit.calibrate(qat, [x[: len(x) // 2], x[len(x) // 2:]])
    # a training step so the scales are not just the calibrated ones
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3)
    qat.train()
    qat(x).square().mean().backward()
    opt.step()
    qat.eval()
    scales = [p for n, p in qat.named_parameters() if n.endswith(".scale")]
    assert all(bool((p > 1e-6).all()) for p in scales)  # no quantizer collapsed to the minimum scale
    return qat


CASES = {
    "poolnet": (PoolNet, (16, 1, 8, 8)),
    "conv1d": (Conv1dNet, (16, 2, 12)),
    "shared-conv": (SharedConvNet, (16, 3, 8, 8)),
    "tiny-transformer": (lambda: build_model("tiny-transformer", num_classes=10, in_channels=1, image_size=8), (16, 1, 8, 8)),
}


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_integer_model_equals_qat_eval(case, bits, tmp_path):
    make, shape = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = make()
    if case != "tiny-transformer":
        trained_bn(model, x)
    qat = qat_model(model, x, bits)
    x_test = torch.randn(*shape) * 1.5  # beyond the calibrated range too: clamping must agree
    with torch.no_grad():
        expected = qat(x_test)
    integer = qatkit.convert(qat)
    got = integer(x_test)
    assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)
    loaded = qatkit.load(qatkit.save(integer, tmp_path / "m.safetensors"))
    assert torch.equal(loaded(x_test), expected)
    assert qat.training is False  # convert restores the mode
    if case == "poolnet":
        fns = [n.get("fn") for n in integer.nodes if n["op"] == "call"]
        assert fns == [ops.NAME_OF[F.max_pool2d], ops.NAME_OF[F.avg_pool2d], ops.NAME_OF[torch.flatten]]
    if case == "shared-conv":  # two calls, their own input scales and biases, one stored weight; exact in ORT
        calls = [n for n in integer.nodes if n.get("module") == "conv"]
        assert len(calls) == 2 and calls[0]["input"]["scale"] != calls[1]["input"]["scale"]
        assert calls[0]["weight"] == calls[1]["weight"] and calls[0]["bias"] != calls[1]["bias"]
        export_onnx(integer, tmp_path / "m.onnx", x_test[:1])
        result = verify(tmp_path / "m.onnx", integer, [x_test])
        assert result["top1_agreement"] == 1.0 and result["max_step_diff"] == 0.0


def test_convert_restores_training_mode():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    qat = qat_model(PoolNet(), x, 8)
    qat.train()
    qatkit.convert(qat)
    assert qat.training


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_stored_weights_and_int32_biases(bits):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    qat = qat_model(trained_bn(PoolNet(), x), x, bits)
    integer = qatkit.convert(qat)
    tensors = integer.named_tensors()
    modules = dict(qat.named_modules())
    qlayers = [n for n in integer.nodes if n["op"] == "qlayer"]
    assert [n["name"] for n in qlayers] == ["conv1", "conv2", "fc1", "fc2"]
    for node in qlayers:
        layer: QLayer = modules[node["name"]]
        w, b = layer.folded()
        codes = unpack(tensors[node["weight"]["tensor"]], node["bits"], tuple(node["shape"]))
        assert node["bits"] == bits
        assert torch.equal(codes.float(), layer.weight_quant.codes(w.detach()))
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
        s_x = tensors[node["input"]["scale"]["tensor"]].double().numpy()
        s_w = tensors[node["weight_scale"]["tensor"]].double().numpy()
        q_b = tensors[node["bias"]["tensor"]]
        assert q_b.dtype == torch.int32
        np.testing.assert_array_equal(q_b.numpy(), np.rint(b.detach().double().numpy() / (s_x * s_w)))
    assert all(n["output"] is not None for n in qlayers)  # logits too: output_bits=8 by default
    assert qlayers[0]["act"] == "relu" and qlayers[1]["act"] == "relu6" and qlayers[2]["act"] == "relu"


def test_convert_refuses_an_uncalibrated_model():
    qat = qatkit.prepare(PoolNet(), qatkit.QATConfig())
    with pytest.raises(qatkit.QatkitError, match=r"^convert needs every quantizer's range, but these have none: "
                                                 r"'conv1\.out_quant', .*Fix: run "
                                                 r"qatkit\.calibrate\(model, batches\) on batches that reach them"):
        qatkit.convert(qat)


def test_convert_refuses_non_finite_weights():
    """A NaN weight made the QAT model's outputs NaN but was stored as code 0: bias-only logits, exit 0."""
    qat = qatkit.prepare(PoolNet(), qatkit.QATConfig(), torch.randn(2, 1, 8, 8))
    qatkit.calibrate(qat, [torch.randn(4, 1, 8, 8)])
    with torch.no_grad():
        qat.fc1.weight[0, 0] = float("nan")
    with pytest.raises(qatkit.QatkitError, match=r"^layer 'fc1' has NaN or Inf weights or bias \(1 such layer\(s\)\)"):
        qatkit.convert(qat)


def test_convert_refuses_a_layer_whose_weight_quantizer_is_off():
    """With weight_quant disabled the QAT model computes float weights there; convert stored their codes (0.042 off)."""
    qat = qatkit.prepare(PoolNet(), qatkit.QATConfig(), torch.randn(2, 1, 8, 8))
    qatkit.calibrate(qat, [torch.randn(4, 1, 8, 8)])
    qat.fc1.weight_quant.enabled.fill_(False)
    with pytest.raises(qatkit.QatkitError, match=r"^layer 'fc1' has no quantized input, or its weights are asymmetric "
                                                 r"or not quantized \(weight_quant disabled"):
        qatkit.convert(qat)
