"""A forward that branches on its input's shapes is traced along the example input, so it converts and exports;
branches on the batch size or on tensor values are not frozen into a graph (module swap, as before)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import qatkit
from qatkit.export import export_onnx, verify
from qatkit.prepare.concrete import concrete_trace
from qatkit.prepare.modes import example_arguments


class ShapeChecks(nn.Module):
    """What user code does: asserts on the input, a branch on the channel count, a loop over a size, len()."""

    def __init__(self):
        super().__init__()
        self.gray = nn.Conv2d(1, 8, 3, padding=1)
        self.rgb = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        assert x.dim() == 4, f"expected (B, C, H, W), got {x.dim()} dims"
        x = F.relu(self.rgb(x) if x.shape[1] == 3 else self.gray(x))
        for i in range(x.size(2) // 4):  # 2 blocks for 8×8 inputs
            x = F.relu(self.blocks[i](x))
        if len(x.shape) == 4 and x.shape[-1] > 1:
            x = x.mean((2, 3))
        return self.fc(x.view(x.size(0), -1))


def test_shape_branches_follow_the_example_and_the_model_converts_and_exports(tmp_path):
    torch.manual_seed(0)
    model = ShapeChecks().eval()
    x = torch.randn(16, 3, 8, 8)
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)  # what plain torch.fx makes of it
    with pytest.warns(UserWarning, match=r"could not trace 'ShapeChecks' .*; traced along the example input instead: "
                                         r"\d+ Python branches.*\(\(2, 3, 8, 8\)\); the graph equals the model on "
                                         r"batches of 2, 1, 4\."):
        qat = qatkit.prepare(model, qatkit.QATConfig(), x[:2])
    assert isinstance(qat, fx.GraphModule) and not qat.qat_info.untraced
    assert sorted(r["name"] for r in qat.qat_info.layers) == ["blocks.0", "blocks.1", "fc", "rgb"]  # the example's way
    assert qat.qat_info.input_sizes == {"x": [None, 3, 8, 8]}  # 4×4 takes one block, 16×16 four: other graphs
    qatkit.calibrate(qat, [x])
    qat.eval()
    with torch.no_grad():
        y = qat(x)
    assert (y - model(x)).abs().max() < 0.05 * (model(x).abs().max())
    integer = qatkit.convert(qat)
    assert torch.equal(integer(x), y)  # any batch size: x.size(0) stayed symbolic
    export_onnx(integer, tmp_path / "m.onnx", x[:1])
    result = verify(tmp_path / "m.onnx", integer, [x])
    assert result["top1_agreement"] == 1.0 and result["max_step_diff"] == 0.0


class BatchBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x * 2 if x.shape[0] > 1 else x)  # a batch of one goes another way


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x * 2 if x.sum() > 0 else x)


@pytest.mark.parametrize("model, why", [
    (BatchBranch(), r"differs from the model on a batch of 1 \(its forward branches on the batch size"),
    (ValueBranch(), r"Python control flow on tensor values \(node 'gt'\) would follow the example's way"),
])
def test_branches_on_the_batch_size_or_on_values_are_not_frozen(model, why):
    x = torch.ones(4, 4)
    with pytest.raises((ValueError, fx.proxy.TraceError), match=why):
        concrete_trace(model, example_arguments(model, (x,)))
    with pytest.warns(UserWarning, match=rf"could not trace '{type(model).__name__}' .*nor along the example input "
                                         rf"\(.*{why}.*module swap"):
        qat = qatkit.prepare(model, qatkit.QATConfig(), x)
    assert qat.qat_info.untraced and not isinstance(qat, fx.GraphModule)


def test_without_example_inputs_the_model_falls_back_to_module_swap():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        qat = qatkit.prepare(ShapeChecks(), qatkit.QATConfig())
    assert any("nor along the example input (no example_inputs were given to prepare to trace it along)" in str(w.message) for w in record)
    assert not isinstance(qat, fx.GraphModule)


def test_tracing_along_the_example_leaves_the_model_untouched():
    """The example's values come from a copy: BN statistics and parameters of the model do not move."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    wrapped = BatchNormFirst(model)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    gm, decisions, checked = concrete_trace(wrapped, example_arguments(wrapped, (torch.randn(2, 3, 8, 8),)))
    assert decisions == 1 and checked == [2, 1, 4]
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items())


class BatchNormFirst(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        assert x.shape[1] == 3
        return self.body(x)


class PooledBatchNorm(nn.Module):
    """BatchNorm1d on pooled features: in training mode PyTorch refuses a batch of one sample."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x):
        assert x.shape[1] == 3
        return self.fc(self.bn(self.conv(x).mean((2, 3))))


def test_a_batch_the_model_itself_refuses_is_not_checked():
    model = PooledBatchNorm().train()
    gm, decisions, checked = concrete_trace(model, example_arguments(model, (torch.randn(4, 3, 8, 8),)))
    assert checked == [4, 8] and decisions == 1
    with pytest.warns(UserWarning, match=r"traced along the example input instead: .*on batches of 4, 1, 8 and at "
                                         r"other sizes along x axis 2, x axis 3\. Keep inputs shaped as the example "
                                         r"\(the batch size and those sizes may change\)"):
        qatkit.prepare(model, qatkit.QATConfig(), torch.randn(4, 3, 8, 8))  # traced in eval mode: one sample is fine


class Positions(nn.Module):
    """Position ids from torch.arange over the input's length, a recurrent state from torch.zeros over its batch."""

    def __init__(self, dtype=None):
        super().__init__()
        self.embed, self.pos = nn.Embedding(30, 8), nn.Embedding(16, 8)
        self.cell, self.fc = nn.Linear(8, 8), nn.Linear(8, 3)
        self.dtype = dtype

    def forward(self, ids):  # (B, L) int64
        x = self.embed(ids) + self.pos(torch.arange(ids.size(1), device=ids.device, dtype=self.dtype))
        h = torch.zeros(ids.size(0), 8, device=ids.device)
        for t in range(ids.size(1)):
            h = torch.tanh(self.cell(x[:, t]) + h)
        return self.fc(h + torch.full((ids.shape[0], 8), 0.5))


def test_tensors_made_from_the_inputs_sizes_convert_and_export(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (32, 6))
    with pytest.warns(UserWarning, match=r"traced along the example input instead"):
        qat = qatkit.prepare(Positions(), qatkit.QATConfig(), ids[:2])
    qatkit.calibrate(qat, [ids])
    qat.eval()
    integer = qatkit.convert(qat)
    with torch.no_grad():
        assert torch.equal(integer(ids), qat(ids))  # a batch of 32: the sizes stayed symbolic
    export_onnx(integer, tmp_path / "m.onnx", ids[:1])
    result = verify(tmp_path / "m.onnx", integer, [ids])  # tanh is a float island: ORT may round to the next step
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0
    qat = qatkit.prepare(Positions(dtype=torch.long), qatkit.QATConfig(), ids[:2])  # dtype=torch.long: stored
    qatkit.calibrate(qat, [ids])
    qat.eval()
    integer = qatkit.load(qatkit.save(qatkit.convert(qat), tmp_path / "long.safetensors"))
    with torch.no_grad():
        assert torch.equal(integer(ids), qat(ids))
    export_onnx(integer, tmp_path / "long.onnx", ids[:1])
    qat = qatkit.prepare(Positions(dtype=torch.int32), qatkit.QATConfig(), ids[:2])
    qatkit.calibrate(qat, [ids])
    with pytest.raises(qatkit.QatkitError, match=r"a dtype argument \(torch.int32\) cannot be stored .*allowed: "
                                                 r"torch.float32, torch.int64, torch.bool"):
        qatkit.convert(qat)


class BufferSteered(nn.Module):
    """A branch on the input's rank (fx alone cannot trace it), a flag buffer that steers Python code, and a mask
    buffer sliced by the input's length."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("use_mask", torch.tensor(True))
        self.register_buffer("mask", torch.tril(torch.ones(16, 16, dtype=torch.bool)))

    def forward(self, x):  # (B, T, 8)
        assert x.dim() == 3
        h = self.fc(x)
        scores = h @ h.transpose(1, 2)
        if self.use_mask:
            T = x.size(1)
            scores = scores.masked_fill(~self.mask[:T, :T], -1e4)
        return scores.softmax(-1) @ h


def test_buffers_steer_python_code_and_slices_of_them_keep_the_length_symbolic():
    torch.manual_seed(0)
    model = BufferSteered().eval()
    gm, decisions, checked = concrete_trace(model, example_arguments(model, (torch.randn(2, 6, 8),)))
    assert decisions == 2 and checked == [2, 1, 4]  # the assert and the flag
    for shape in [(3, 6, 8), (2, 11, 8)]:  # another length: the mask's slice follows it
        x = torch.randn(shape)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class OptionalMask(nn.Module):
    """`mask=None` filled in forward (Hugging Face's attention_mask), a finfo fill value (fx alone cannot trace it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, mask=None, scale=1.0, return_scores=False):
        if mask is None:
            mask = torch.ones(x.shape[0], x.shape[1])
        scores = self.fc(x) @ x.transpose(1, 2) * scale
        if return_scores:
            return scores
        return (scores + (1.0 - mask[:, None, :]) * torch.finfo(x.dtype).min).softmax(-1) @ x


def test_arguments_left_to_their_defaults_are_no_inputs_of_the_graph():
    torch.manual_seed(0)
    model = OptionalMask().eval()
    gm, decisions, checked = concrete_trace(model, example_arguments(model, (torch.randn(2, 5, 8),)))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert checked == [2, 1, 4]
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
