"""Item assignment, `x[index] = value`, on a tensor made in forward (Hugging Face's Swin builds its shifted-window
mask so: tests/export/test_hf_swin_patterns.py). prepare records it (fx refuses item assignment) and makes it
functional (ops.setitem); the integer model computes what torch does, ONNX as Where over position tests."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.export import export_onnx, ort
from qatkit.export.integer_reference import IntegerReference


class Fills(nn.Module):
    """Item assignments of every kind the ONNX export takes: an int, negative slice bounds, an open end, ..., a bound
    computed from the input's size."""

    def forward(self, x):
        m = torch.zeros_like(x)
        m[..., 1] = 2.0
        m[:, -3:-1] = 1.0
        m[:, : x.size(1) // 2, 0] = -1.0
        m[0] = m[0]  # a tensor value: the integer model computes it, the export refuses it (tested below)
        return x + m[..., :] * 0.5


class FillsNumbers(Fills):
    def forward(self, x):
        m = torch.zeros_like(x)
        m[..., 1] = 2.0
        m[:, -3:-1] = 1.0
        m[:, : x.size(1) // 2, 0] = -1.0
        m[:, 3:] = 4.0
        return x * m


def test_item_assignments_compute_what_torch_computes_in_the_integer_model_and_onnx(tmp_path):
    torch.manual_seed(0)
    model = FillsNumbers().eval()
    x = torch.randn(4, 6, 3).abs() + 0.5
    qat = prepares_whole(model, x)
    qatkit.calibrate(qat, [x])
    integer = qatkit.convert(qat.eval())
    with torch.no_grad():
        assert torch.equal(integer(x), qat(x))
        longer = torch.rand(2, 9, 3) + 0.5  # x.size(1) // 2 = 4 instead of 3
        assert torch.equal(integer(longer), qat(longer))
        assert (qat(longer) - model(longer)).abs().max() < 0.1
    path = tmp_path / "fills.onnx"
    export_onnx(integer, path, x[:1])
    runtime = ort.run(ort.session(path, threads=1), x)  # the dequantized input times the mask, in float32
    np.testing.assert_array_equal(runtime, integer(x).numpy())
    np.testing.assert_array_equal(IntegerReference(path).run(x.numpy()), runtime)


class BooleanMasks(nn.Module):
    """`h[h < -1] = 0` on a layer's quantized output (a mask of its shape) and `t[keep] = 1.5` with a mask over the
    leading (batch, position) axes only: ONNX Where, the mask unsqueezed over the others."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        h[h < -0.5] = 0.0
        t = torch.relu(h)
        t[x[..., 0] > 0.3] = 1.5
        return self.out(t)


def test_boolean_mask_assignments_export_as_where(tmp_path):
    torch.manual_seed(0)
    model = BooleanMasks().eval()
    x = torch.randn(6, 5, 4)
    qat = prepares_whole(model, x)
    qatkit.calibrate(qat, [x])
    integer = qatkit.convert(qat.eval())
    with torch.no_grad():
        assert torch.equal(integer(x), qat(x))
        reference = model.double()(x.double())  # the masks applied as torch applies them, and they matter:
        assert (qat(x).double() - reference).abs().max() < 0.05
        unmasked = model.out(torch.relu(model.fc(x.double())))
        assert (unmasked - reference).abs().max() > 0.5
    result = runs_in_onnx_runtime(integer, x, tmp_path / "masks.onnx")
    assert result["max_step_diff"] == 0


def test_an_assigned_tensor_runs_in_the_integer_model_and_onnx_export_names_the_fix(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3)
    qat = prepares_whole(Fills().eval(), x)
    qatkit.calibrate(qat, [x])
    integer = qatkit.convert(qat.eval())
    with torch.no_grad():
        assert torch.equal(integer(x), qat(x))
    with pytest.raises(qatkit.QatkitError, match=r"^x\[0\] = <float tensor> \(node 'setitem\w*'\) has no ONNX form in "
                                                 r"qatkit\. Fix: assign a number"):
        export_onnx(integer, tmp_path / "f.onnx", x[:1])
    assert not (tmp_path / "f.onnx").exists()


class WritesItsInput(nn.Module):
    def forward(self, x):
        x[:, 0] = 0.0  # changes the caller's tensor: no functional form
        return x * 2


def test_an_assignment_to_an_input_is_named_as_what_convert_refuses():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qatkit.prepare(WritesItsInput(), qatkit.QATConfig(), torch.randn(2, 4))
    refused = [str(w.message) for w in caught if "will refuse" in str(w.message)]
    assert refused and "setitem" in refused[0], [str(w.message) for w in caught]
