"""F.grid_sample, a feature map warped by a predicted flow (optical flow, BEV lifting, deformable sampling) or by
F.affine_grid's grid (a spatial transformer): float ops on dequantized values, exported as ONNX GridSample in each
mode, padding and corner convention (the integer reference computes ONNX Runtime's values bit for bit) and as
PyTorch's base grid times thetaᵀ, at any input size."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import converts_exactly, runs_in_onnx_runtime
from onnx import TensorProto, helper
from torch import nn

import qatkit
from qatkit.errors import QatkitError
from qatkit.export import export_onnx, ort
from qatkit.export.integer_reference import _grid_sample


class Warp(nn.Module):
    """Features sampled at a base grid plus a flow computed from them, then a conv and a head."""

    def __init__(self, mode: str, padding_mode: str, align_corners: bool):
        super().__init__()
        self.c1, self.flow = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 3, padding=1)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)
        self.how = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)

    def forward(self, x, base):
        f = torch.relu(self.c1(x))
        grid = base + 0.3 * torch.tanh(self.flow(f)).permute(0, 2, 3, 1)
        warped = F.grid_sample(f, grid, **self.how)
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.c2(warped)), 1).flatten(1))


def _base(n: int, h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([xs, ys], -1).expand(n, h, w, 2).contiguous()


WARPS = [("bilinear", "zeros", False), ("bilinear", "border", True), ("nearest", "reflection", False),
         ("bicubic", "zeros", True)]


@pytest.mark.parametrize("mode, padding_mode, align_corners", WARPS)
def test_a_flow_warp_converts_and_runs_in_onnx_runtime(mode, padding_mode, align_corners, tmp_path):
    torch.manual_seed(0)
    model, x = Warp(mode, padding_mode, align_corners).eval(), torch.randn(8, 3, 8, 8)
    inputs = (x, _base(8, 8, 8))
    qat = qatkit.prepare(model, qatkit.QATConfig(), tuple(t[:1] for t in inputs))
    assert "grid_sample (grid_sample)" in qat.qat_info.float_ops
    qatkit.calibrate(qat, [(inputs, None)])
    integer = converts_exactly(qat, model, inputs, tolerance=0.1)
    assert runs_in_onnx_runtime(integer, inputs, tmp_path / "m.onnx")["within_one_step"] == 1.0


def test_the_reference_computes_onnx_runtimes_grid_sample(tmp_path):
    """Every mode, padding and corner convention, at points inside, on and beyond the edges."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    grid = rng.uniform(-1.6, 1.6, (2, 4, 6, 2)).astype(np.float32)
    grid[0, 0, :4] = [[-1, -1], [1, 1], [0, 0], [-1.5, 1.25]]
    for mode in ("nearest", "bilinear", "bicubic"):
        for padding in ("zeros", "border", "reflection"):
            for corners in (0, 1):
                node = helper.make_node("GridSample", ["x", "g"], ["y"], mode=mode, padding_mode=padding,
                                        align_corners=corners)
                inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in (("x", x),
                                                                                                   ("g", grid))]
                output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
                graph = helper.make_graph([node], "g", inputs, [output])
                onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
                runtime = ort.session(tmp_path / "g.onnx", threads=1).run(None, {"x": x, "g": grid})[0]
                attrs = {"mode": mode, "padding_mode": padding, "align_corners": corners}
                assert np.array_equal(_grid_sample([x, grid], attrs), runtime), attrs
                torch_values = F.grid_sample(torch.from_numpy(x), torch.from_numpy(grid), mode=mode,
                                             padding_mode=padding, align_corners=bool(corners))
                np.testing.assert_allclose(runtime, torch_values.numpy(), rtol=0, atol=1e-5)


class VolumeWarp(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(2, 4, 3, padding=1)

    def forward(self, x, grid):
        return F.grid_sample(self.c(x), grid, align_corners=False)


def test_a_volume_grid_sample_is_refused_at_export_with_the_fix(tmp_path):
    torch.manual_seed(0)
    model, inputs = VolumeWarp().eval(), (torch.randn(2, 2, 4, 4, 4), torch.rand(2, 3, 3, 3, 3) * 2 - 1)
    qat = qatkit.prepare(model, qatkit.QATConfig(), inputs)
    qatkit.calibrate(qat, [(inputs, None)])
    with pytest.raises(QatkitError, match=r"grid_sample of a 5-D input.*allowed: 4-D.*Fix: sample each 2-D slice"):
        export_onnx(qatkit.convert(qat), tmp_path / "v.onnx", inputs)
    assert not (tmp_path / "v.onnx").exists()


class SpatialTransformer(nn.Module):
    """Jaderberg et al.'s spatial transformer: a localisation head predicts an affine map, F.affine_grid makes its
    sampling grid at the input's size, F.grid_sample warps the input with it."""

    def __init__(self, align_corners: bool):
        super().__init__()
        self.loc, self.theta = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Linear(8, 6)
        self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)
        self.align_corners = align_corners
        with torch.no_grad():  # near the identity, as STNs start
            self.theta.weight.mul_(0.1)
            self.theta.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1.0, 0]))

    def forward(self, x):
        theta = self.theta(F.adaptive_avg_pool2d(torch.relu(self.loc(x)), 1).flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, x.size(), align_corners=self.align_corners)
        warped = F.grid_sample(x, grid, align_corners=self.align_corners)
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.c(warped)), 1).flatten(1))


@pytest.mark.parametrize("align_corners", [False, True])
def test_a_spatial_transformer_converts_and_runs_in_onnx_runtime_at_other_sizes(align_corners, tmp_path):
    torch.manual_seed(0)
    model, x = SpatialTransformer(align_corners).eval(), torch.randn(8, 3, 10, 12)
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:1])
    qatkit.calibrate(qat, [x])
    integer = converts_exactly(qat, model, x, tolerance=0.1)
    runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")
    other = torch.randn(4, 3, 7, 9)  # the grid follows the input's size
    sess = ort.session(tmp_path / "m.onnx", threads=1)
    with torch.no_grad():
        np.testing.assert_allclose(ort.run(sess, other), integer(other).numpy(), rtol=0, atol=0.05)


def test_affine_grid_export_computes_pytorchs_grid(tmp_path):
    """The exported grid alone against F.affine_grid's, at the example's size and another."""

    class Grid(nn.Module):
        def forward(self, theta, x):
            return F.affine_grid(theta, x.size(), align_corners=False)

    torch.manual_seed(0)
    theta, x = torch.randn(2, 2, 3), torch.randn(2, 1, 5, 6)
    integer = qatkit.convert(qatkit.prepare(Grid(), qatkit.QATConfig(), (theta, x)))
    export_onnx(integer, tmp_path / "g.onnx", (theta, x))
    sess = ort.session(tmp_path / "g.onnx", threads=1)
    for t, shape in ((theta, x), (torch.randn(3, 2, 3), torch.randn(3, 1, 9, 4))):
        expected = F.affine_grid(t.double(), shape.size(), align_corners=False)
        np.testing.assert_allclose(ort.run(sess, (t, shape)), expected.numpy(), rtol=0, atol=1e-6)
