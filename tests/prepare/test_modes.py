"""Training-only code: drop path as a module follows train()/eval() and converts as the identity (a ConvNeXt
model too); inline training-only code is left out of QAT (the graph is traced in eval mode) and said."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatkit
from qatkit.convert.ops import identity_in_eval
from qatkit.export import export_onnx, verify
from qatkit.prepare.modes import mode_dependent, train_only_ops


class DropPath(nn.Module):
    """timm's: samples are dropped from the residual branch in training, the identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Noise(nn.Module):
    def forward(self, x):
        return x + 0.1 * torch.randn_like(x) if self.training else x * 1.0


class Block(nn.Module):
    def __init__(self, inline_noise: bool):
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), DropPath(0.5)
        self.inline_noise = inline_noise

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        if self.inline_noise and self.training:
            y = y + 0.1 * torch.randn_like(y)
        return x + self.drop(y)


class Net(nn.Module):
    def __init__(self, inline_noise: bool = False):
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 8, 3, padding=1), Block(inline_noise), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.block(F.relu(self.stem(x)))).mean((2, 3)))


def test_mode_dependent_modules_are_told_apart():
    assert mode_dependent(DropPath(0.1)) and mode_dependent(Noise())
    assert not mode_dependent(DropPath(0.0)) and not mode_dependent(nn.Dropout(0.1)) and not mode_dependent(Block(False))
    assert identity_in_eval(DropPath(0.1)) and identity_in_eval(nn.Dropout()) and not identity_in_eval(Noise())
    assert not identity_in_eval(nn.Conv2d(1, 1, 1)) and not identity_in_eval(nn.ReLU())
    assert train_only_ops(Net(inline_noise=True)) == ["randn_like", "mul"] and train_only_ops(Net()) == []


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_drop_path_follows_the_mode_in_qat_and_is_the_identity_when_deployed(mode, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    model = getattr(Net(), mode)()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        qat = qatkit.prepare(model, qatkit.QATConfig(), x[:2])
    assert not [w for w in said if "train()" in str(w.message) or "refuse" in str(w.message)]  # it converts as it is
    assert qat.training == (mode == "train")  # the float model's mode
    assert isinstance(qat.get_submodule("block.drop"), DropPath)  # a module call, not traced through
    qatkit.calibrate(qat, [x[:8], x[8:]])
    qat.train()
    torch.manual_seed(0)
    first = qat(x)
    torch.manual_seed(1)
    assert not torch.equal(first, qat(x))  # samples dropped at random in training
    qat.eval()
    integer = qatkit.convert(qat)
    with torch.no_grad():
        expected = qat(x)
        assert torch.equal(qat(x), expected) and torch.equal(integer(x), expected)
    export_onnx(integer, tmp_path / "m.onnx", x[:1])
    result = verify(tmp_path / "m.onnx", integer, [x])
    assert result["top1_agreement"] == 1.0 and result["max_step_diff"] == 0.0


def test_inline_training_only_code_is_left_out_and_said():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"'Net' runs randn_like, mul in train\(\) but not in eval\(\).*QAT leaves "
                                         r"them out. Fix: move training-only code .* into a parameter-free submodule"):
        qat = qatkit.prepare(Net(inline_noise=True).train(), qatkit.QATConfig(), x[:2])
    assert "randn_like" not in qat.code


def test_a_mode_dependent_module_that_is_not_the_identity_in_eval_is_refused_at_convert():
    model = nn.Sequential(nn.Linear(4, 4), Noise(), nn.Linear(4, 2))
    x = torch.randn(16, 4)
    with pytest.warns(UserWarning, match=r"convert and ONNX export will refuse this model: 1 \(Noise\)"):
        qat = qatkit.prepare(model, qatkit.QATConfig(), x[:2])
    qatkit.calibrate(qat, [x])
    with pytest.raises(qatkit.QatkitError, match=r"module '1' \(Noise\) has no integer-model form.*parameter-free "
                                                 r"modules that return their input in eval mode"):
        qatkit.convert(qat.eval())


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: a subclass of nn.LayerNorm with its own forward."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7×7, channels-last LayerNorm and pointwise Linear layers, layer scale, drop path."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm, self.pwconv1, self.act, self.pwconv2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(0.5 * torch.ones(dim))
        self.drop_path = DropPath(0.1)

    def forward(self, x):
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        return x + self.drop_path((self.gamma * y).permute(0, 3, 1, 2))


def test_a_convnext_model_converts_and_exports(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), LayerNorm2d(16), ConvNeXtBlock(16), ConvNeXtBlock(16),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    x = torch.randn(32, 3, 16, 16)
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=8, act_bits=8, first_last_bits=None), x[:2])
    qatkit.calibrate(qat, [x[:16], x[16:]])
    qat.eval()
    with torch.no_grad():
        expected = qat(x)
        assert (expected - model(x)).abs().max() < 0.05
    integer = qatkit.convert(qat)
    assert torch.equal(integer(x), expected)
    export_onnx(integer, tmp_path / "m.onnx", x[:1])
    result = verify(tmp_path / "m.onnx", integer, [x])  # LayerNorm and GELU are float islands: one step at most
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0


class ModeArguments(nn.Module):
    """Mode-dependent arguments, not ops: SDPA's dropout_p and a functional batch norm's `training`."""

    def __init__(self, which: str):
        super().__init__()
        self.which, self.fc = which, nn.Linear(8, 8)
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("var", torch.ones(8))

    def forward(self, x):  # (B, L, 8)
        y = self.fc(x)
        if self.which == "sdpa":
            return F.scaled_dot_product_attention(y, y, y, dropout_p=0.1 if self.training else 0.0)
        if self.which == "batch_norm":
            return F.batch_norm(y.transpose(1, 2), self.mean, self.var, training=self.training).transpose(1, 2)
        return F.dropout(y, 0.1, self.training)  # made an nn.Dropout by prepare: nothing to say


@pytest.mark.parametrize("which, said", [("sdpa", "scaled_dot_product_attention with other arguments"),
                                         ("batch_norm", "batch_norm with other arguments"), ("dropout", None)])
def test_arguments_that_depend_on_the_mode_are_said(which, said):
    model = ModeArguments(which).train()
    assert train_only_ops(model) == ([said] if said else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qatkit.prepare(model, qatkit.QATConfig(), torch.randn(2, 5, 8))
    messages = [str(w.message) for w in caught if "in train() but not in eval()" in str(w.message)]
    assert messages == ([f"qatkit: 'ModeArguments' runs {said} in train() but not in eval(); the QAT graph is traced "
                         "in eval mode (the deployed one), so QAT leaves them out. Fix: move training-only code (drop "
                         "path, noise) into a parameter-free submodule, as timm's DropPath: qatkit keeps such modules, "
                         "following train()/eval()"] if said else [])
