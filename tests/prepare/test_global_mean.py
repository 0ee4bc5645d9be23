"""A mean over every spatial axis, as people write a global average pool (a ResNet head's `x.mean((2, 3))`, timm's
squeeze-excite `x.mean((2, 3), keepdim=True)`, ConvNeXt's `x.mean([-2, -1])`, a video net's `x.mean((2, 3, 4))`),
is the global average pool it computes: an integer kernel (QLinearGlobalAveragePool in ONNX Runtime) on the
skip-path codes instead of a float op. Means over other axes (a LayerNorm written out) stay float ops."""
from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import converts_exactly, prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit


class ResNetHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        return self.fc((torch.relu(self.c2(x)) + x).mean((2, 3)))


class SqueezeExcite(nn.Module):  # timm's SEModule on a conv stage
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.reduce, self.expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        se = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        x = torch.relu(self.c2(x * se.sigmoid()))
        return self.fc(torch.mean(x, dim=(3, 2)))


class ConvNeXtHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.c1 = nn.Conv2d(3, 16, 4, stride=4), nn.Conv2d(16, 16, 3, padding=1)
        self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.c1(F.gelu(x))
        return self.fc(self.norm(x.mean([-2, -1])))


class VideoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.fc = nn.Conv3d(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(x)).mean(dim=(2, 3, 4), keepdim=False))


IMAGE = (2, 3, 16, 16)
CASES = {"resnet-head": (ResNetHead, IMAGE, 1), "squeeze-excite": (SqueezeExcite, IMAGE, 2),
         "convnext-head": (ConvNeXtHead, IMAGE, 1), "video": (VideoHead, (2, 3, 4, 8, 8), 1)}
# QAT (eval) against the float model, random weights: the LayerNorm after ConvNeXt's pool scales up the earlier
# layers' rounding (as much with the mean left a float op)
TOLERANCE = {"convnext-head": 0.75}


@pytest.mark.parametrize("name", CASES)
def test_spatial_mean_is_an_integer_global_pool(name, tmp_path):
    cls, shape, pools = CASES[name]
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(*shape)
    qat = prepares_whole(model, x[:1], qatkit.QATConfig(weight_bits=8, act_bits=8))
    assert "mean" not in str(qat.qat_info.float_ops)
    assert sum(q.startswith("qpool_") for q in qat.qat_info.act_quantizers) == pools
    qatkit.calibrate(qat, [torch.randn(*shape) for _ in range(4)])
    integer = converts_exactly(qat, model, x, tolerance=TOLERANCE.get(name, 0.25))
    result = runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node]
    assert ops.count("GlobalAveragePool") == pools and "ReduceMean" not in ops
    if name != "squeeze-excite":  # (its sigmoid gate is a float op: within one step)
        assert result["max_step_diff"] == 0


@pytest.mark.parametrize("name", CASES)
def test_global_pool_computes_the_float64_mean(name):
    """The rewritten graph computes the mean the model wrote, keepdim or not (float64, every layer left float)."""
    cls, shape, pools = CASES[name]
    torch.manual_seed(0)
    model, x = cls().double().eval(), torch.randn(*shape, dtype=torch.float64)
    config = qatkit.QATConfig(rules=[qatkit.LayerRule(pattern="*", skip=True)])
    qat = qatkit.prepare(model, config, x[:1]).eval()
    targets = [n.target for n in qat.graph.nodes]
    assert "mean" not in targets and torch.mean not in targets
    assert sum(t in (F.adaptive_avg_pool2d, F.adaptive_avg_pool3d) for t in targets) == pools
    with torch.no_grad():
        torch.testing.assert_close(qat(x), model(x), rtol=0, atol=1e-12)


class WrittenOutNorm(nn.Module):  # a LayerNorm written out: a mean over channels, and an NHWC pool
    def __init__(self):
        super().__init__()
        self.c1, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x)).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = y - y.mean(-1, keepdim=True)
        return self.fc(y.mean((1, 2)))


@pytest.mark.parametrize("example", [True, False])
def test_other_means_stay_means(example, tmp_path):
    torch.manual_seed(0)
    model, x = WrittenOutNorm().eval(), torch.randn(*IMAGE)
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=8, act_bits=8), x[:1] if example else None)
    assert [op for op in qat.qat_info.float_ops if "(mean)" in op] == ["mean (mean)", "mean_1 (mean)"]
    assert not any(q.startswith("qpool_") for q in qat.qat_info.act_quantizers)
    qatkit.calibrate(qat, [torch.randn(*IMAGE) for _ in range(4)])
    runs_in_onnx_runtime(converts_exactly(qat, model, x, tolerance=0.25), x, tmp_path / "m.onnx")


def test_without_example_a_spatial_mean_stays_a_mean():
    """Its rank is known only from an example input: without one, the mean is a float op (still converts)."""
    torch.manual_seed(0)
    model, x = ResNetHead().eval(), torch.randn(*IMAGE)
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=8, act_bits=8))
    assert qat.qat_info.float_ops == ["mean (mean)"]
    qatkit.calibrate(qat, [x])
    converts_exactly(qat, model, x, tolerance=0.25)
