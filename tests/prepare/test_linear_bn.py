"""A Linear followed by BatchNorm1d on its (N, C) output (PointNet's and DGCNN's MLP heads, SimCLR's projection head,
tabular MLPs) is folded as a conv's BN is: w·γ/σ and (b - μ)·γ/σ + β, BN learning its statistics from batches until
frozen. It was a float op between two integer layers. On a (N, L, C) output BatchNorm1d normalizes over L, not the
Linear's features: it stays a float op there. A conv called more than once (a Siamese encoder) folds the BN that every
call goes through."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import converts_exactly, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.nn import QLinearBn


class PointHead(nn.Module):
    """PointNet's shape: a shared point MLP (Conv1d + BN), a max over points, then Linear + BN + ReLU layers."""

    def __init__(self):
        super().__init__()
        self.point, self.bn0 = nn.Conv1d(3, 16, 1), nn.BatchNorm1d(16)
        self.fc1, self.bn1 = nn.Linear(16, 32), nn.BatchNorm1d(32)
        self.fc2, self.bn2 = nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16, affine=False)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.bn0(self.point(x))).amax(-1)
        h = torch.relu(self.bn1(self.fc1(h)))
        return self.out(torch.relu(self.bn2(self.fc2(h))))


def _trained_statistics(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(10):
            model(torch.randn(32, 3, 20) * 2 + 0.5)
    return model.eval()


def _head64(model: PointHead, x: torch.Tensor) -> torch.Tensor:
    """The float model in float64, BN written out from its running statistics."""
    def bn(bn_module, h):
        shape = (1, -1) + (1,) * (h.dim() - 2)
        y = (h - bn_module.running_mean.double().view(shape)) / torch.sqrt(
            bn_module.running_var.double().view(shape) + bn_module.eps)
        if bn_module.affine:
            y = y * bn_module.weight.double().view(shape) + bn_module.bias.double().view(shape)
        return y

    p = {k: v.detach().double() for k, v in model.named_parameters()}
    h = torch.relu(bn(model.bn0, F.conv1d(x.double(), p["point.weight"], p["point.bias"]))).amax(-1)
    h = torch.relu(bn(model.bn1, F.linear(h, p["fc1.weight"], p["fc1.bias"])))
    return F.linear(torch.relu(bn(model.bn2, F.linear(h, p["fc2.weight"]))), p["out.weight"], p["out.bias"])


def test_linear_batchnorm_folds_trains_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = _trained_statistics(PointHead())
    x = torch.randn(64, 3, 20) * 2 + 0.5
    with torch.no_grad():
        assert (model(x).double() - _head64(model, x)).abs().max() < 1e-5
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:4])
    folded = {r["name"]: r["bn_folded"] for r in qat.qat_info.layers}
    assert folded == {"point": True, "fc1": True, "fc2": True, "out": False} and not qat.qat_info.float_ops
    assert isinstance(qat.fc1, QLinearBn) and isinstance(qat.fc2, QLinearBn)
    qatkit.calibrate(qat, [x])
    with torch.no_grad():  # W8A8: the float model's values (BN folded into the weights) to a few steps
        assert (qat.eval()(x).double() - _head64(model, x)).abs().max() < 0.05

    y = (x[:, 0].mean(-1) > 0.5).long() + (x[:, 1].mean(-1) > 0.5).long()
    stats = qat.bn1.running_mean.clone()
    history = qatkit.fit(qat, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)],
                         qatkit.TrainConfig(epochs=4, lr=3e-3, bn_freeze_epoch=3, progress=False))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert not torch.equal(qat.bn1.running_mean, stats) and bool(qat.fc1.bn_frozen)  # BN learned, then froze
    integer = converts_exactly(qat, model, x, tolerance=float("inf"))  # (trained: only QAT = integer)
    assert [n["fn"].rsplit(".", 1)[-1] for n in integer.nodes if n["op"] == "call"] == ["amax"]  # no float BN
    result = runs_in_onnx_runtime(integer, x, tmp_path / "head.onnx")
    assert result["max_step_diff"] == 0


class TokenFeatures(nn.Module):
    """BatchNorm1d(L) on a (N, L, C) Linear output: statistics per position, not per feature."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(8, 8), nn.BatchNorm1d(5), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))).mean(1))


def test_a_batchnorm_over_positions_stays_a_float_op(tmp_path):
    torch.manual_seed(0)
    model, x = TokenFeatures().eval(), torch.randn(16, 5, 8)
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:4])
    assert not any(r["bn_folded"] for r in qat.qat_info.layers) and "bn (BatchNorm1d)" in qat.qat_info.float_ops
    qatkit.calibrate(qat, [x])
    integer = converts_exactly(qat, model, x, tolerance=0.05)
    runs_in_onnx_runtime(integer, x, tmp_path / "tokens.onnx")


class Siamese(nn.Module):
    """One encoder (conv, BN, ReLU) applied to two inputs, its features compared: each call goes through the same BN,
    which nothing else calls, so the one shared wrapper folds it (it was a float op after both calls)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 2)

    def encode(self, x):
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))

    def forward(self, a, b):
        return self.head((self.encode(a) - self.encode(b)).abs())


def test_a_batchnorm_shared_by_every_call_of_a_conv_folds(tmp_path):
    torch.manual_seed(0)
    model = Siamese()
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8) + 0.5)  # (statistics of both calls)
    model.eval()
    a, b = torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)
    qat = qatkit.prepare(model, qatkit.QATConfig(), (a[:2], b[:2]))
    assert {r["name"]: r["bn_folded"] for r in qat.qat_info.layers} == {"conv": True, "head": False}
    assert not any("BatchNorm" in op for op in qat.qat_info.float_ops)
    qatkit.calibrate(qat, [((a, b), torch.zeros(16, dtype=torch.long))])  # (a batch: (the inputs, labels))
    with torch.no_grad():  # W8A8: the float model's values to a few steps
        assert (qat.eval()(a, b) - model(a, b)).abs().max() < 0.05
    qat.train()  # training: BN takes each call's batch statistics, as the float model's BN does
    before = qat.bn.num_batches_tracked.clone()
    qat(a, b).sum().backward()
    assert int(qat.bn.num_batches_tracked - before) == 2
    integer = converts_exactly(qat.eval(), model, (a, b), tolerance=0.05)
    runs_in_onnx_runtime(integer, (a, b), tmp_path / "siamese.onnx")
