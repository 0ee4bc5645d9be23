"""In-place ops as people write them (x.relu_(), F.relu(x, inplace=True), nn.ReLU(inplace=True), z.add_(y).mul_(s)):
prepare makes them functional where nothing else shows the change (later uses of the tensor read the op's result),
so the integer model and ONNX Runtime compute what QAT does; a change that a view's base, an input or a buffer would
show later stays as written for QAT, and convert refuses it with the fix."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc, self.relu = nn.Linear(8, 4), nn.ReLU(inplace=True)


class MethodResult(_Net):
    def forward(self, x):
        return self.fc(self.c1(x).relu_().mean((2, 3)))


class ResultDiscarded(_Net):
    def forward(self, x):
        y = self.c1(x)
        y.relu_()  # later code reads y: relu'd
        return self.fc(self.c2(y).mean((2, 3)))


class InplaceArgument(_Net):
    def forward(self, x):
        y = self.c1(x)
        before = y.mean((2, 3))  # read before the change: not relu'd
        F.relu(y, True)  # inplace given by position
        return self.fc(self.c2(y).mean((2, 3)) + before)


class Chained(_Net):
    def forward(self, x):
        y = torch.relu(self.c1(x))
        z = self.c2(y)
        z.add_(y).mul_(0.5)
        return self.fc(z.mean((2, 3)))


class SharedInplaceModule(_Net):
    def forward(self, x):
        y = self.c1(x)
        before = y.mean((2, 3))
        self.relu(y)  # torchvision's nn.ReLU(inplace=True), its result left unused
        z = self.relu(self.c2(y))
        return self.fc(z.mean((2, 3)) + before + y.mean((2, 3)))


class InPlaceFunctions(_Net):  # the functions' own in-place spellings, and methods the integer model spells otherwise
    def forward(self, x):
        y = self.c1(x)
        kept = y.clone()  # a copy: not changed by what follows
        F.hardtanh_(y, -0.5, 0.5)
        F.leaky_relu_(y, 0.1)
        torch.sigmoid_(y).div_(0.25).clamp_max_(3.0).clamp_min_(0.5)
        y.clip_(0.6, 2.5).remainder_(0.7)  # (written out in other ops)
        z = torch.tanh_(self.c2(y)).detach()
        return self.fc((z + kept.clamp_min(0.0).clamp_max(1.0)).mean((2, 3)))


@pytest.mark.parametrize("model_class", [MethodResult, ResultDiscarded, InplaceArgument, Chained, SharedInplaceModule,
                                         InPlaceFunctions])
def test_in_place_ops_are_made_functional_and_convert_exactly(model_class, tmp_path):
    torch.manual_seed(0)
    model, x = model_class().eval(), torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        expected = model(x.clone())
    qat = prepares_whole(model, x[:2])
    for node in qat.graph.nodes:  # no in-place op left: ReLU modules stay modules (their input's later uses rewired)
        assert not (node.op == "call_method" and node.target.endswith("_")) and node.kwargs.get("inplace") is not True
    qatkit.calibrate(qat, [x])
    qat.eval()
    integer = qatkit.convert(qat)
    with torch.no_grad():
        got = qat(x)
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # QAT computes what the float model does
        assert torch.equal(integer(x), got)
    runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")


class OnAView(_Net):
    def forward(self, x):
        y = torch.sigmoid(self.c1(x)) - 0.5  # a float op's result: quantized for c2 after the change below
        y[:, :4].relu_()  # changes y, which is read below
        return self.fc(self.c2(y).mean((2, 3)))


class OnTheInput(_Net):
    def forward(self, x):
        x.mul_(2.0)  # changes the caller's tensor
        return self.fc(self.c1(x).mean((2, 3)))


@pytest.mark.parametrize("model_class", [OnAView, OnTheInput])
def test_a_change_that_a_view_or_the_input_shows_trains_and_convert_refuses_it_with_the_fix(model_class):
    torch.manual_seed(0)
    model, x = model_class().eval(), torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        expected = model(x.clone())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = qatkit.prepare(model, qatkit.QATConfig(), x[:2].clone())
    refused = [str(w.message) for w in caught if "will refuse" in str(w.message)]
    assert refused and "changes in place a tensor that shares memory with an input, a buffer or one read later" in refused[0]
    qatkit.calibrate(qat, [x.clone()])
    with torch.no_grad():
        assert (qat.eval()(x.clone()) - expected).abs().max() < 0.05 * expected.abs().max()  # as written: in place
    with pytest.raises(qatkit.QatkitError, match=r"changes in place .* Fix: write it out of place"):
        qatkit.convert(qat)
