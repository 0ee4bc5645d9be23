"""The sizes a model's inputs may take besides the batch: prepare finds which its traced graph follows (it computes
what the model computes at half and twice the example's), the integer model refuses the others with the fix, and the
ONNX file leaves the followed ones free where ONNX Runtime computes the integer model there too."""
from __future__ import annotations

import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatkit
from qatkit.errors import DataError
from qatkit.export import export_onnx, verify


class Reader(nn.Module):
    """Token ids → embedding → a conv over the length → mean over it → classes: traced symbolically, any length."""

    def __init__(self):
        super().__init__()
        self.embed, self.conv, self.head = nn.Embedding(30, 8), nn.Conv1d(8, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(torch.relu(self.conv(self.embed(ids).transpose(1, 2))).mean(2))


class Unrolled(nn.Module):
    """A recurrent cell stepped over the input's length in Python: traced along the example, five steps."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.Linear(8, 4), nn.Linear(4, 3)

    def forward(self, x):  # (B, T, 4)
        h = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(torch.cat([x[:, t], h], 1)))
        return self.head(h)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


class Halves(nn.Module):
    """The length split in two halves by torch.chunk: the integer model follows any length, qatkit's ONNX graph holds
    the example's halves."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):  # (B, T, 8)
        a, b = torch.chunk(self.fc(x), 2, dim=1)
        return self.head(torch.cat([b, a], 1).mean(1) + a.mean(1))


def _integer(model, x):
    qat = qatkit.prepare(model.eval(), qatkit.QATConfig(), x[:2])
    qatkit.calibrate(qat, [x])
    return qat.eval(), qatkit.convert(qat.eval())


def _dims(path, i: int = 0, outputs: bool = False) -> list:
    values = onnx.load(str(path)).graph.output if outputs else onnx.load(str(path)).graph.input
    return [d.dim_param or d.dim_value for d in values[i].type.tensor_type.shape.dim]


def test_prepare_records_the_sizes_its_graph_follows():
    torch.manual_seed(0)
    cases = [(Reader(), torch.randint(0, 30, (2, 7)), {"ids": [None, None]}, "ids (batch, any)"),
             (Unrolled(), torch.randn(2, 5, 4), {"x": [None, 5, 4]}, "x (batch, 5, 4)"),  # at 10 or 2 steps: still 5
             (ConvNet(), torch.randn(2, 3, 12, 10), {"x": [None, 3, None, None]}, "x (batch, 3, any, any)"),
             # a clip's 3 frames beside its 3 channels: no other size of both runs, then each is probed alone
             (nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                            nn.Linear(4, 2)), torch.randn(2, 3, 3, 8, 8), {"input": [None, 3, None, None, None]},
              "input (batch, 3, any, any, any)")]
    for model, x, sizes, shown in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the unrolled one is traced along the example)
            qat = qatkit.prepare(model.eval(), qatkit.QATConfig(), x)
        assert qat.qat_info.input_sizes == sizes  # (ConvNet: no other channel count runs)
        assert f"\ninputs (any: a size the graph follows; others hold the example's): {shown}" in qatkit.describe(qat)
    assert qatkit.prepare(ConvNet(), qatkit.QATConfig()).qat_info.input_sizes == {}  # no example: nothing probed


def test_qat_and_integer_models_refuse_a_size_their_graph_does_not_follow():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 4)
    with pytest.warns(UserWarning, match=r"traced along the example input instead: .*on batches of 2, 1, 4\. Keep"):
        qat, integer = _integer(Unrolled(), x)
    assert torch.equal(integer(x), qat(x))
    for m in (qat.train(), integer):  # training at another length would learn another graph's steps
        with pytest.raises(DataError, match=r"input 'x' has shape \(2, 7, 4\); this model takes \(batch, 5, 4\): .* "
                                            r"Fix: pass inputs of that shape \(pad or cut them\), or prepare the model "
                                            r"with an example of the size it is trained and deployed at"):
            m(torch.randn(2, 7, 4))


@pytest.mark.parametrize("model, x, other_sizes", [
    (Reader(), torch.randint(0, 30, (16, 7)), [(4, 3), (4, 20)]),
    (ConvNet(), torch.randn(16, 3, 12, 12), [(4, 3, 6, 6), (4, 3, 30, 17)]),
], ids=["text", "image"])
def test_onnx_takes_the_sizes_the_graph_follows(model, x, other_sizes, tmp_path):
    """The followed sizes are free ONNX dimensions, named after the input and axis (an image's equal height and width
    were probed together, and are named apart); ONNX Runtime computes the integer model there."""
    torch.manual_seed(0)
    qat, integer = _integer(model, x)
    assert not any("sizes" in note for note in export_onnx(integer, tmp_path / "m.onnx", x[:1]))
    assert _dims(tmp_path / "m.onnx") == (["batch", "ids_1"] if x.dim() == 2 else ["batch", 3, "x_2", "x_3"])
    assert _dims(tmp_path / "m.onnx", outputs=True) == ["batch", 3 if x.dim() == 2 else 4]
    for shape in other_sizes:
        other = torch.randint(0, 30, shape) if x.dim() == 2 else torch.randn(shape)
        assert torch.equal(integer(other), qat(other))
        result = verify(tmp_path / "m.onnx", integer, [other])
        assert result["top1_agreement"] == 1.0 and result["max_step_diff"] <= 1.0


def test_onnx_keeps_the_example_sizes_where_its_graph_does_not_follow_them(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 6, 8)
    qat, integer = _integer(Halves(), x)
    longer = torch.randn(4, 10, 8)
    assert torch.equal(integer(longer), qat(longer))  # the integer model splits the length it is given
    notes = export_onnx(integer, tmp_path / "m.onnx", x[:1])
    assert any(n.startswith("the ONNX inputs keep the example's sizes besides the batch: at x_1 = 3 ONNX Runtime "
                            "differs from the integer model by ") for n in notes), notes
    assert _dims(tmp_path / "m.onnx") == ["batch", 6, 8]
    assert verify(tmp_path / "m.onnx", integer, [x])["max_step_diff"] <= 1.0


class PyramidPool(nn.Module):
    """PSPNet's pyramid pooling: adaptive average pools to 2x2 (windows of the example's size in qatkit's ONNX graph),
    upsampled back and concatenated."""

    def __init__(self):
        super().__init__()
        self.stem, self.branch, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(12, 3, 1)

    def forward(self, x):
        f = torch.relu(self.stem(x))
        pooled = F.interpolate(torch.relu(self.branch(F.adaptive_avg_pool2d(f, 2))), size=f.shape[-2:], mode="nearest")
        return self.head(torch.cat([f, pooled], 1))


def test_a_constant_example_does_not_hide_a_size_the_graph_holds(tmp_path):
    """The other sizes were probed with the example cut or tiled: a zero image (qatkit export's example) gives the
    same output at every size, so the inputs stayed free and ONNX Runtime was 0.155 off at another size."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    _, integer = _integer(PyramidPool(), x)
    notes = export_onnx(integer, tmp_path / "m.onnx", torch.zeros(1, 3, 8, 8))
    assert any(n.startswith("the ONNX inputs keep the example's sizes besides the batch") for n in notes), notes
    assert _dims(tmp_path / "m.onnx") == ["batch", 3, 8, 8]
    assert verify(tmp_path / "m.onnx", integer, [x])["max_step_diff"] <= 1.0


class WindowOfItsSize(nn.Module):
    """Pools whose window is the feature map's own size, read from it: avg_pool2d(x, x.size()[2:]), GeM's
    avg_pool2d(x.pow(3), (x.size(-2), x.size(-1))).pow(1/3), lp_pool2d(x, 2, x.shape[-1]), max_pool2d(x, x.shape[2:])."""

    def __init__(self, head: str):
        super().__init__()
        self.head, self.conv, self.fc = head, nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = {"avg": lambda: F.avg_pool2d(x, x.size()[2:]),
             "gem": lambda: F.avg_pool2d(x.clamp(min=1e-6).pow(3), (x.size(-2), x.size(-1))).pow(1.0 / 3),
             "lp": lambda: F.lp_pool2d(x, 2, x.shape[-1]), "max": lambda: F.max_pool2d(x, x.shape[2:])}[self.head]()
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("head", ["avg", "gem", "lp", "max"])
def test_a_pooling_window_read_from_the_input_size_exports_at_the_example_size(head, tmp_path):
    """The export failed with a raw TypeError ('Value' object is not iterable) or onnx's 'Could not infer the attribute
    type'; the window is the example's, and the inputs keep its sizes (noted)."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    _, integer = _integer(WindowOfItsSize(head), x)
    notes = export_onnx(integer, tmp_path / "m.onnx", x[:1])
    assert any(n.startswith("the ONNX inputs keep the example's sizes besides the batch") for n in notes), notes
    assert verify(tmp_path / "m.onnx", integer, [x])["max_step_diff"] == 0
