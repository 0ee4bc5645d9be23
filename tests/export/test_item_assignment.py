"""Item assignment, `x[index] = value`, on a tensor made in forward: Hugging Face's Swin builds its shifted-window
attention mask so (modeling_swin.py, SwinLayer.get_attn_mask: `img_mask[:, height_slice, width_slice, :] = count` in
a loop). prepare records it (fx refuses item assignment) and makes it functional (ops.setitem); the integer model
computes it, ONNX as Where over position tests. QAT eval = integer model (bit for bit) = ONNX Runtime."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.convert import ops
from qatkit.export import export_onnx, ort
from qatkit.export.integer_reference import IntegerReference


def window_partition(input_feature, window_size):
    batch_size, height, width, num_channels = input_feature.shape
    input_feature = input_feature.view(
        batch_size, height // window_size, window_size, width // window_size, window_size, num_channels
    )
    windows = input_feature.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, num_channels)
    return windows


class ShiftedWindowAttention(nn.Module):
    """Swin's shifted-window self-attention with the mask as Hugging Face computes it on every call."""

    def __init__(self, dim=16, heads=2, window_size=4, shift_size=2, classes=5):
        super().__init__()
        self.window_size, self.shift_size, self.heads = window_size, shift_size, heads
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, classes)

    def get_attn_mask(self, height, width, dtype, device):
        if self.shift_size > 0:
            # calculate attention mask for SW-MSA
            img_mask = torch.zeros((1, height, width, 1), dtype=dtype, device=device)
            height_slices = (
                slice(0, -self.window_size),
                slice(-self.window_size, -self.shift_size),
                slice(-self.shift_size, None),
            )
            width_slices = (
                slice(0, -self.window_size),
                slice(-self.window_size, -self.shift_size),
                slice(-self.shift_size, None),
            )
            count = 0
            for height_slice in height_slices:
                for width_slice in width_slices:
                    img_mask[:, height_slice, width_slice, :] = count
                    count += 1

            mask_windows = window_partition(img_mask, self.window_size)
            mask_windows = mask_windows.view(-1, self.window_size * self.window_size)
            attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        else:
            attn_mask = None
        return attn_mask

    def forward(self, x):
        b, h, w, c = x.shape
        ws, n = self.window_size, self.window_size * self.window_size
        shifted = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(shifted, ws).view(-1, n, c)
        q, k, v = self.qkv(windows).view(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5
        mask = self.get_attn_mask(h, w, x.dtype, x.device)
        scores = scores.view(b, -1, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        out = (scores.view(-1, self.heads, n, n).softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
        return self.head(self.proj(out).view(b, -1, c).mean(1))


def test_hugging_face_swin_mask_converts_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = ShiftedWindowAttention().eval()
    x = torch.randn(8, 8, 8, 16)
    qat = prepares_whole(model, x[:2])
    setitems = [n for n in qat.graph.nodes if n.target is ops.setitem]
    assert len(setitems) == 9  # one per window region, each a new tensor
    assert not [n for n in qat.graph.nodes if "setitem" in str(n.target) and n not in setitems]
    assert not any("setitem" in op for op in qat.qat_info.float_ops)  # a mask: exact, no float island
    qatkit.calibrate(qat, [x])
    integer = qatkit.convert(qat.eval())
    with torch.no_grad():
        assert torch.equal(integer(x), qat(x))
        assert (qat(x) - model(x)).abs().max() < 0.05
        bigger = torch.randn(2, 12, 12, 16)  # the mask follows the input's size
        assert torch.equal(integer(bigger), qat(bigger)) and (qat(bigger) - model(bigger)).abs().max() < 0.05
    runs_in_onnx_runtime(integer, x, tmp_path / "swin_mask.onnx")


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


def test_an_assigned_tensor_runs_in_the_integer_model_and_onnx_export_names_the_fix(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3)
    qat = prepares_whole(Fills().eval(), x)
    qatkit.calibrate(qat, [x])
    integer = qatkit.convert(qat.eval())
    with torch.no_grad():
        assert torch.equal(integer(x), qat(x))
    with pytest.raises(qatkit.QatkitError, match=r"^x\[\[0\]\] = .+ has no ONNX form in qatkit\. Fix: assign a number"):
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
