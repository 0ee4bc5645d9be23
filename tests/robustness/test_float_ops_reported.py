"""Ops qatkit cannot quantize stay float: a listed warning at prepare, the report names them, nothing crashes."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import qatkit
from qatkit.convert import convert


class Odd(nn.Module):
    """A conv net with ops that have no integer kernel: a fractional max pool (no integer-model form; of kernel 1 to
    the input's size, the identity), bilinear upsampling, a custom elementwise op."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.FractionalMaxPool2d(1, output_size=(8, 8))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.up(self.act(self.conv(x)))
        x = torch.tanh(x) * x  # no integer kernel either
        return self.fc(x.mean(dim=(2, 3)))


def test_unquantizable_ops_are_listed_and_stay_float():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    model = Odd().eval()
    with pytest.warns(UserWarning) as record:
        qat = qatkit.prepare(model, qatkit.QATConfig(), x)
    messages = [str(w.message) for w in record]
    assert any(re.match(r"qatkit: \d+ ops have no integer kernel and stay float: .*act \(FractionalMaxPool2d\).*up "
                        r"\(Upsample\)", m) for m in messages)
    # said before training, not only when convert refuses: the ops without an integer-model form (upsampling and
    # tanh run as float ops)
    assert any(m.startswith("qatkit: QAT trains, but convert and ONNX export will refuse this model: act "
                            "(FractionalMaxPool2d) has no integer-model form (allowed modules: ") for m in messages)
    qatkit.calibrate(qat, [x])
    qat.eval()
    report = qatkit.describe(qat)
    assert "act (FractionalMaxPool2d)" in report and "up (Upsample)" in report and "tanh" in report
    assert {r["name"] for r in qat.qat_info.layers} == {"conv", "fc"}  # the quantizable layers are quantized
    y = qat(x)
    assert torch.isfinite(y).all() and (y - model(x)).abs().max() < 0.5  # runs, close to float
    with pytest.raises(qatkit.QatkitError, match=r"module 'act' \(FractionalMaxPool2d\) has no integer-model form; allowed: "
                                                 r"AdaptiveAvgPool1d, .*ZeroPad2d, (ZeroPad3d, )?the layers qatkit quantizes, and "
                                                 r"parameter-free modules that return their input in eval mode .*Fix:"):
        convert(qat)  # converting needs every op in the integer op table: a clear error, not a crash


def test_a_mask_from_the_input_ids_is_not_a_float_op():
    """`(ids != 0).float()` runs on integers (ONNX Equal/Not/Cast); what is done with the mask in float is listed."""
    from qatkit.models.tiny_transformer import TinyTransformer

    qat = qatkit.prepare(TinyTransformer(2, vocab_size=50, max_len=8, depth=1), qatkit.QATConfig())
    ops = [op.split(" (")[1].rstrip(")") for op in qat.qat_info.float_ops]
    assert "ne" not in ops and "float" not in ops and "matmul" not in ops  # attention's matmuls run on integers
    assert {"sub", "softmax", "LayerNorm", "GELU", "sum", "truediv"} <= set(ops)
