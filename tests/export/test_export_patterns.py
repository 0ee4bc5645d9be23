"""Model patterns beyond the zoo: QAT eval = integer model (torch.equal) = ONNX Runtime (0 steps).

Convs with padding modes, 'same' padding (an even kernel pads one more at the end) and a layer called twice."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import converts_exactly, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.errors import QatkitError
from qatkit.export import export_onnx, ort, verify
from qatkit.export.integer_reference import IntegerReference
from qatkit.kernels import conv_pads
from qatkit.config import QuantSpec
from qatkit.models import build_model
from qatkit.nn import QConv


class PaddedNet(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode)
        self.conv2 = nn.Conv2d(8, 8, (2, 3), padding="same", padding_mode=mode)  # pads rows (0, 1), columns (1, 1)
        self.conv3 = nn.Conv1d(8, 4, 3, padding=2, dilation=2, padding_mode=mode)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):  # (B, 3, H, W)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.relu(self.conv3(x.mean(2)))  # (B, 8, W) -> (B, 4, W)
        return self.fc(x.mean(2))


def _calibrated(model, x, bits=8):
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=bits, act_bits=bits, first_last_bits=None), x[:2])
    qatkit.calibrate(qat, [x[:8], x[8:]])
    return qat.eval()


def _exact_in_ort(integer, x: torch.Tensor, path) -> list[str]:
    """ONNX Runtime computes the integer model's outputs exactly (0 output steps); the export's notes."""
    notes = export_onnx(integer, path, x[:1])
    result = verify(path, integer, [x])
    assert result["top1_agreement"] == 1.0 and result["max_step_diff"] == 0.0
    return notes


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_padding_modes_and_same_padding_are_what_the_float_conv_computes(mode):
    """QConv pads as the float conv does (float64 reference: the float conv on the same weights)."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=8, symmetric=True, per_channel=True)
    for conv, x in ((nn.Conv2d(3, 4, (2, 3), padding="same", padding_mode=mode), torch.randn(2, 3, 7, 6)),
                    (nn.Conv1d(3, 4, 4, padding="same", dilation=2, padding_mode=mode), torch.randn(2, 3, 9)),
                    (nn.Conv2d(3, 4, 3, padding=(1, 2), stride=2, padding_mode=mode), torch.randn(2, 3, 7, 6))):
        conv = conv.double()
        q = QConv(conv, spec)
        assert torch.equal(q.op(x.double(), conv.weight, conv.bias), conv(x.double()))
    assert conv_pads(nn.Conv2d(1, 1, (2, 3), padding="same")) == [0, 1, 1, 1]
    assert conv_pads(nn.Conv2d(1, 1, 3, padding="valid")) == [0, 0, 0, 0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_padding_modes_run_exactly_in_the_integer_model_and_onnx_runtime(mode, bits, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 6, 7)
    qat = _calibrated(PaddedNet(mode), x, bits)
    with torch.no_grad():
        expected = qat(x)
    integer = qatkit.convert(qat)
    assert torch.equal(integer(x), expected)
    assert torch.equal(qatkit.load(qatkit.save(integer, tmp_path / "m.safetensors"))(x), expected)
    qat_zeros = _calibrated(PaddedNet("zeros"), x, bits)
    if mode != "zeros":  # the mode matters: the same weights padded with zeros compute something else
        qat_zeros.load_state_dict(qat.state_dict())
        with torch.no_grad():
            assert not torch.equal(qat_zeros(x), expected)
    path = tmp_path / "m.onnx"
    _exact_in_ort(integer, x, path)  # (circular: ONNX opset 17 has no such Pad, the far ends are joined)
    ort_out = ort.run(ort.session(path, threads=1), x)  # the integer-only reference pads the codes as ORT does
    assert np.array_equal(IntegerReference(path, requant="float32").run(x.numpy()), ort_out)


def test_a_float_conv_with_a_padding_mode_is_refused_at_convert():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 6, 7)
    model = PaddedNet("reflect")
    qat = qatkit.prepare(model, qatkit.QATConfig(rules=[qatkit.LayerRule(pattern="conv2", skip=True)]), x[:2])
    qatkit.calibrate(qat, [x])
    with pytest.raises(QatkitError, match=r"float conv 'conv2' \(not quantized\) has padding='same', "
                                          r"padding_mode='reflect'.*Fix: let qatkit quantize it"):
        qatkit.convert(qat.eval())


@pytest.mark.parametrize("skipped", ["conv1", "layer1.0.conv2", "layer2.0.downsample.0"])
def test_a_conv_a_rule_leaves_float_exports(skipped, tmp_path):
    """Any skipped conv but the last layer made export fail with a raw KeyError: 'node' (its weight is stored)."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=8)
    qat = qatkit.prepare(model, qatkit.QATConfig(rules=(qatkit.LayerRule(pattern=skipped, skip=True),)), x[:2])
    qatkit.calibrate(qat, [x])
    integer = qatkit.convert(qat.eval())
    assert torch.equal(integer(x), qat(x))
    export_onnx(integer, tmp_path / "m.onnx", x[:1])
    assert verify(tmp_path / "m.onnx", integer, [x])["top1_agreement"] == 1.0


class CatNet(nn.Module):
    """Inception-style branches of different ranges concatenated, then a DenseNet-style cat([x, conv(x)])."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Conv2d(8, 4, 3, padding=1)
        self.grow = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.b1(x)), self.b2(x)], dim=1)  # unsigned and signed parts, their own scales
        x = torch.cat([x, F.relu(self.grow(x))], dim=1)  # (B, 12, H, W)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("bits", [8, 4])
def test_concatenation_runs_exactly_in_onnx_runtime(bits, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qat = _calibrated(CatNet(), x, bits)
    integer = qatkit.convert(qat)
    with torch.no_grad():
        assert torch.equal(integer(x), qat(x))
    path = tmp_path / "m.onnx"
    notes = _exact_in_ort(integer, x, path)
    assert not any(n.startswith("cat ") for n in notes)  # every part is integer: not a float op
    assert np.array_equal(IntegerReference(path, requant="float32").run(x.numpy()), ort.run(ort.session(path, threads=1), x))


class MobileDecoder(nn.Module):
    """MobileNetV3's activations and squeeze-excite, a LeakyReLU/clamp, and a decoder's upsampling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act1 = nn.Hardswish()
        self.se1, self.se2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.gate = nn.Hardsigmoid()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):  # (B, 3, 8, 8)
        x = self.act1(self.conv1(x))  # (B, 8, 4, 4)
        x = x * self.gate(self.se2(F.relu(self.se1(x.mean((2, 3)))))).reshape(-1, 8, 1, 1)
        x = self.up(self.leaky(self.conv2(x)))  # (B, 8, 8, 8)
        x = F.interpolate(F.hardtanh(self.conv3(x), -2.0, 2.0), size=(5, 5), mode="bilinear", align_corners=False)
        x = F.interpolate(torch.clamp(x, min=-1.5), scale_factor=2.0, mode="nearest")
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("bits", [8, 4])
def test_mobile_activations_and_upsampling_convert_and_export(bits, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    model = MobileDecoder()
    with pytest.warns(UserWarning, match=r"stay float: act1 \(Hardswish\).*gate \(Hardsigmoid\).*leaky \(LeakyReLU\)"
                                         r".*up \(Upsample\).*hardtanh.*interpolate"):
        qat = _calibrated(model, x, bits)
    with torch.no_grad():
        expected = qat(x)
        assert (expected - model(x)).abs().max() < 0.2  # the float ops run as in the float model
    integer = qatkit.convert(qat)
    assert torch.equal(integer(x), expected)
    path = tmp_path / "m.onnx"
    notes = export_onnx(integer, path, x[:1])
    assert any(n.startswith("interpolate runs on dequantized") for n in notes)
    result = verify(path, integer, [x])  # float islands: ORT's float kernels may round a value to the next step
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0


@pytest.mark.parametrize("size, scale", [(None, 2.0), ((5, 7), None), ((3, 2), None)])
def test_the_integer_reference_upsamples_as_pytorch_nearest(size, scale):
    from qatkit.export.integer_reference import _resize

    x = np.arange(2 * 3 * 4 * 6, dtype=np.float32).reshape(2, 3, 4, 6)
    expected = F.interpolate(torch.from_numpy(x), size=size, scale_factor=scale, mode="nearest").numpy()
    ins = [x, None, np.array([1, 1, scale, scale], np.float32)] if scale else [x, None, None, np.array([2, 3, *size])]
    assert np.array_equal(_resize(ins, {"mode": "nearest"}), expected)


class RecomputedScale(nn.Module):
    """Upsampling by a fraction with recompute_scale_factor (its sampling follows output / input size, not the factor;
    10 · 1.3 is 13 in float64 but 12.99… in float32)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.Upsample(scale_factor=1.3, mode="bilinear", recompute_scale_factor=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.c2(self.up(torch.relu(self.c1(x))))
        y = F.interpolate(y, scale_factor=(1.3, 0.7), mode="nearest", recompute_scale_factor=True)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class NearestExact(nn.Module):
    """'nearest-exact' resampling (pixel centres: src = floor((dst + ½)·in/out)) up by 2 and by 1.5 and down to a
    size; it was refused at export."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = F.interpolate(torch.relu(self.c1(x)), scale_factor=2, mode="nearest-exact")
        y = F.interpolate(self.c2(y), scale_factor=1.5, mode="nearest-exact")
        return self.fc(F.interpolate(y, size=(7, 5), mode="nearest-exact").mean((2, 3)))


@pytest.mark.parametrize("net, size", [("recomputed", 10), ("recomputed", 8), ("nearest-exact", 6),
                                       ("nearest-exact", 9)])
def test_upsampling_with_a_recomputed_scale_or_nearest_exact_converts_and_runs_in_onnx_runtime(net, size, tmp_path):
    torch.manual_seed(0)
    model, x = (RecomputedScale if net == "recomputed" else NearestExact)().eval(), torch.randn(4, 3, size, size)
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:1])
    qatkit.calibrate(qat, [x])
    integer = converts_exactly(qat, model, x, tolerance=0.05)
    assert runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")["max_step_diff"] == 0


class Resampled(nn.Module):
    """Bicubic upsampling of a conv's output (pixel centres or corners), or trilinear of a 3-D conv's."""

    def __init__(self, mode: str, align_corners: bool):
        super().__init__()
        d = 3 if mode == "trilinear" else 2
        conv, self.pool = (nn.Conv3d, nn.AdaptiveAvgPool3d(1)) if d == 3 else (nn.Conv2d, nn.AdaptiveAvgPool2d(1))
        self.c1, self.c2, self.fc = conv(3, 8, 3, padding=1), conv(8, 8, 3, padding=1), nn.Linear(8, 4)
        self.up = nn.Upsample(scale_factor=2, mode=mode, align_corners=align_corners)
        self.down = nn.Upsample(size=(7,) * d, mode=mode, align_corners=align_corners)

    def forward(self, x):
        y = self.down(self.c2(self.up(torch.relu(self.c1(x)))))
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.mark.parametrize("mode, align_corners", [("bicubic", False), ("bicubic", True), ("trilinear", False)])
def test_bicubic_and_trilinear_resampling_converts_and_runs_in_onnx_runtime(mode, align_corners, tmp_path):
    torch.manual_seed(0)
    model = Resampled(mode, align_corners).eval()
    x = torch.randn(4, 3, *([5] * (3 if mode == "trilinear" else 2)))
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:1])
    qatkit.calibrate(qat, [x])
    integer = converts_exactly(qat, model, x, tolerance=0.05)
    assert runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")["within_one_step"] == 1.0


def test_the_cubic_resize_reference_computes_onnx_runtimes_values(tmp_path):
    """integer_reference's cubic Resize against ONNX Runtime's, bit for bit, at scales and sizes up and down."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qatkit.export.integer_reference import _resize

    x = np.random.default_rng(0).standard_normal((1, 2, 7, 9)).astype(np.float32)
    for coords in ("half_pixel", "align_corners"):
        for scales, sizes in ((np.array([1, 1, 2.5, 0.5], np.float32), None), (None, np.array([1, 2, 15, 4])),
                              (None, np.array([1, 2, 3, 20]))):
            given = {"scales": scales, "sizes": sizes}
            node = helper.make_node("Resize", ["x", "", *(k if v is not None else "" for k, v in given.items())], ["y"],
                                    mode="cubic", coordinate_transformation_mode=coords, cubic_coeff_a=-0.75)
            graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                      [numpy_helper.from_array(v, k) for k, v in given.items() if v is not None])
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "r.onnx")
            runtime = ort.session(tmp_path / "r.onnx", threads=1).run(None, {"x": x})[0]
            attrs = {"mode": "cubic", "coordinate_transformation_mode": coords, "cubic_coeff_a": -0.75}
            assert np.array_equal(_resize([x, None, scales, sizes], attrs), runtime), (coords, scales, sizes)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: the map averaged into 1, 2, 3 and 6 bins a side (windows of several sizes, overlapping,
    where the bins do not divide the map), each upsampled back and concatenated; then an adaptive max pool to 3 bins
    (the same windows) added back."""

    def __init__(self, dims: int):
        super().__init__()
        conv, pool = (nn.Conv2d, nn.AdaptiveAvgPool2d) if dims == 2 else (nn.Conv3d, nn.AdaptiveAvgPool3d)
        self.c1, self.c2, self.fc = conv(3, 8, 3, padding=1), conv(32, 8, 1), nn.Linear(8, 4)
        self.pools = nn.ModuleList(pool(bins) for bins in (1, 2, 3, 6))
        self.max_pool = (nn.AdaptiveMaxPool2d if dims == 2 else nn.AdaptiveMaxPool3d)(3)
        self.mode = "bilinear" if dims == 2 else "trilinear"

    def forward(self, x):
        f = torch.relu(self.c1(x))
        parts = [F.interpolate(pool(f), size=f.shape[2:], mode=self.mode, align_corners=False) for pool in self.pools]
        y = torch.relu(self.c2(torch.cat(parts, 1)))
        y = y + F.interpolate(self.max_pool(y), size=y.shape[2:], mode="nearest")
        return self.fc(torch.flatten(y.mean(dim=tuple(range(2, y.dim()))), 1))


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (2, 3, 8, 7, 10)])
def test_adaptive_pooling_to_uneven_windows_converts_and_runs_in_onnx_runtime(shape, tmp_path):
    torch.manual_seed(0)
    model, x = PyramidPooling(len(shape) - 2).eval(), torch.randn(*shape)
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:1])
    qatkit.calibrate(qat, [x])
    integer = converts_exactly(qat, model, x, tolerance=0.1)
    assert runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")["max_step_diff"] == 0


class TwoHeads(nn.Module):
    """A detector-like model: class logits and box regressions from one trunk."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Conv2d(3, 8, 3, padding=1)
        self.cls, self.box = nn.Linear(8, 5), nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.trunk(x)).mean((2, 3))
        return self.cls(h), self.box(h)


def test_a_tuple_of_outputs_converts_and_exports_as_several_outputs(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qat = _calibrated(TwoHeads(), x)
    integer = qatkit.convert(qat)
    with torch.no_grad():
        expected = qat(x)
    got = integer(x)
    assert isinstance(got, tuple) and len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, expected))
    export_onnx(integer, tmp_path / "m.onnx", x[:1])
    sess = ort.session(tmp_path / "m.onnx")
    assert [o.name for o in sess.get_outputs()] == ["output_0", "output_1"]
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(ort.run_all(sess, x), expected))
    result = verify(tmp_path / "m.onnx", integer, [x[:8], x[8:]])
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0 and result["max_step_diff"] == 0.0


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.fc(x), "loss": None}


def test_an_output_that_is_not_tensors_is_refused_with_the_fix():
    x = torch.randn(8, 4)
    qat = _calibrated(DictOut(), torch.randn(16, 4))
    with pytest.raises(QatkitError, match=r"the model returns .*\{'logits': fc, 'loss': None\}; an integer model returns "
                                          r"a tensor, a tuple of tensors or a dict of tensors by name\. Fix: return "
                                          r"tensors only \(leave None values out of a returned dict\)"):
        qatkit.convert(qat)
    assert qat(x)["logits"].shape == (8, 2)


class UpDown(nn.Module):
    """A transposed conv → BN → ReLU (a decoder's upsampling) and an adaptive average pool to 2×2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up, self.bn = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2), self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):  # (B, 3, 8, 8) -> (B, 8, 4, 4) -> (B, 8, 8, 8) -> (B, 4, 2, 2)
        x = self.pool(F.relu(self.conv2(F.relu(self.bn(self.up(F.relu(self.conv1(x))))))))
        return self.fc(torch.flatten(x, 1))


def test_a_transposed_conv_is_quantized_with_its_bn_and_runs_in_onnx_runtime(tmp_path):
    """Int8 weights (per output channel), BN folded, ReLU fused; ONNX Runtime has no integer kernel for it and runs
    it in float on the dequantized codes: within one step, and the integer reference computes the same."""
    torch.manual_seed(0)
    model, x = UpDown().eval(), torch.randn(32, 3, 8, 8)
    qat = _calibrated(model, x)
    assert type(qat.up).__name__ == "QConvTransposeBn" and qat.up.act == "relu"
    assert qat.up.weight_quant.scale.numel() == 8
    integer = converts_exactly(qat, model, x, 0.1)
    assert next(n for n in integer.nodes if n.get("module") == "up")["kind"] == "conv_transpose"
    notes = export_onnx(integer, tmp_path / "m.onnx", x[:1])
    assert any(n.startswith("ConvTranspose 'up' stores int8 weights") for n in notes)
    runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")


def test_a_float_transposed_conv_exports_as_a_float_island(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    config = qatkit.QATConfig(first_last_bits=None, rules=(qatkit.LayerRule(pattern="up", skip=True),))
    with pytest.warns(UserWarning, match=r"stay float: up \(ConvTranspose2d, skipped by rule\)"):
        qat = qatkit.prepare(UpDown().eval(), config, x[:2])
    qatkit.calibrate(qat, [x])
    integer = qatkit.convert(qat.eval())
    with torch.no_grad():
        assert torch.equal(integer(x), qat(x))
    path = tmp_path / "m.onnx"
    notes = export_onnx(integer, path, x[:1])
    assert any(n.startswith("conv_transpose2d runs on dequantized") for n in notes)
    result = verify(path, integer, [x])  # the transposed conv is a float island: ORT may round to the next step
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0


class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = nn.Conv2d(8, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = F.relu(self.conv1(F.pad(x, (0, 1, 0, 1))))  # TF-style 'same' for a stride-2 conv: pad right/bottom
        x = F.relu(self.conv2(F.pad(x, (1, 2, 1, 0), mode="reflect")))
        return self.fc(F.pad(x, (1, 1, 0, 2), mode="replicate").mean((2, 3)))


def test_functional_pad_converts_and_exports(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 9, 9)
    qat = _calibrated(Padded(), x)
    integer = qatkit.convert(qat)
    with torch.no_grad():
        assert torch.equal(integer(x), qat(x))
    _exact_in_ort(integer, x, tmp_path / "m.onnx")


def _softmax_outputs(integer, x) -> list[torch.Tensor]:
    """The integer model's softmax outputs on x (its attention weights), in graph order."""
    values = integer.values(x)
    return [values[n["name"]] for n in integer.nodes if n["op"] == "call" and n["fn"].endswith("softmax")]


class MaskedText(nn.Module):
    """Masks written the usual ways: padding (ids == 0), causal (positions compared), ~, |, None and ... indexing;
    q and k from one projection by chunk; states from x.new_zeros and torch.zeros_like."""

    def __init__(self):
        super().__init__()
        self.embed, self.pos = nn.Embedding(30, 16, padding_idx=0), nn.Embedding(12, 16)
        self.qk, self.fc = nn.Linear(16, 32), nn.Linear(16, 3)

    def forward(self, ids):  # (B, L), 0 = padding
        pad = ids == 0
        pos = torch.arange(ids.size(1), device=ids.device)
        causal = pos[None, :] > pos[:, None]
        x = self.embed(ids) + self.pos(pos)[None]
        q, k = self.qk(x).chunk(2, dim=-1)
        scores = (q @ k.transpose(-2, -1)).masked_fill(causal | pad[:, None, :], -1e4)
        x = scores.softmax(-1) @ x
        valid = (~pad).float()[..., None]
        h = x.new_zeros(ids.size(0), 16) + (x * valid).sum(1) / valid.sum(1).clamp(min=1.0)
        return self.fc(h + torch.full_like(h, 0.25) - torch.ones_like(h) * 0.25)


def test_masks_chunks_and_tensors_made_like_others_convert_and_export(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(1, 30, (64, 10))
    ids[:, 7:], ids[::3, 4:] = 0, 0
    qat = qatkit.prepare(MaskedText(), qatkit.QATConfig(), ids[:2])
    info = qatkit.describe(qat)
    for exact in ("eq", "gt", "or_", "invert", "arange", "new_zeros", "zeros_like", "chunk"):  # masks, not float ops
        assert f"({exact})" not in info.split("float ops")[-1]
    qatkit.calibrate(qat, [ids])
    qat.eval()
    integer = qatkit.convert(qat)
    with torch.no_grad():
        expected = qat(ids)
        assert torch.equal(integer(ids), expected)
    weights = _softmax_outputs(integer, ids)[0]  # (B, L, L): no weight on padding or on later positions
    padded = (ids == 0)[:, None, :] | torch.ones(10, 10, dtype=torch.bool).triu(1)
    assert (weights[padded] == 0).all() and (weights[~padded] > 0).all()
    path = tmp_path / "m.onnx"
    export_onnx(integer, path, ids[:1])
    result = verify(path, integer, [ids])  # softmax is a float island: ORT may round a value to the next step
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0
    ort_out = ort.run(ort.session(path, threads=1), ids)
    assert np.array_equal(IntegerReference(path, requant="float32").run(ids.numpy()), ort_out)


class Made(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.embed, self.fc = kind, nn.Embedding(30, 8), nn.Linear(8, 3)

    def forward(self, ids):
        x = self.embed(ids).mean(1)
        made = {"new_ones": lambda: x.new_ones((ids.size(0), 8)), "new_full": lambda: x.new_full((x.shape[0], 8), 0.5),
                "ids_like": lambda: torch.zeros_like(ids)[:, :1] + torch.ones_like(ids)[:, :1] * 2}[self.kind]()
        return self.fc(x * made)


@pytest.mark.parametrize("kind", ["new_ones", "new_full", "ids_like"])
def test_tensors_made_from_the_inputs_sizes_keep_their_type_in_onnx(kind, tmp_path):
    """x.new_*(…) of a float tensor are float32, torch.*_like(ids) int64 (ONNX would refuse a float · int Mul)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (16, 5))
    qat = qatkit.prepare(Made(kind), qatkit.QATConfig(), ids[:2])
    qatkit.calibrate(qat, [ids])
    integer = qatkit.convert(qat.eval())
    with torch.no_grad():
        assert torch.equal(integer(ids), qat(ids))
    _exact_in_ort(integer, ids, tmp_path / "m.onnx")


class ChunkBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=0)
        return torch.cat([b, a])


def test_chunk_along_the_batch_is_refused_at_export_with_the_fix(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    qat = _calibrated(ChunkBatch(), x)
    integer = qatkit.convert(qat)
    with torch.no_grad():
        assert torch.equal(integer(x), qat(x))
    with pytest.raises(QatkitError, match=r"chunk along an axis whose size follows the batch .* Fix: split along "
                                          r"another axis"):
        export_onnx(integer, tmp_path / "m.onnx", x[:2])


class MaskStyles(nn.Module):
    """Attention masks and scores written the ways one finds them: Hugging Face's extended mask (`.to(x.dtype)`,
    torch.finfo(dtype).min), torch.where, a tril of ones compared with 0, `.type_as`, torch.einsum."""

    def __init__(self, style: str):
        super().__init__()
        self.style, self.embed, self.qk, self.fc = style, nn.Embedding(30, 16), nn.Linear(16, 32), nn.Linear(16, 3)

    def forward(self, ids):
        x, keep = self.embed(ids), ids != 0
        q, k = self.qk(x).chunk(2, -1)
        scores = q @ k.transpose(1, 2)
        if self.style == "hf":
            scores = scores + (1.0 - keep[:, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        elif self.style == "where":
            scores = torch.where(keep[:, None, :], scores, torch.tensor(-1e4))
        elif self.style == "tril":
            t = ids.size(1)
            scores = scores.masked_fill(torch.tril(torch.ones(t, t)) == 0, float("-inf"))
        elif self.style == "type_as":
            scores = scores - 1e4 * (~keep[:, None, :]).type_as(scores)
        elif self.style == "strided":  # every other key, from positions (int64 %) and a float % of them
            pos = torch.arange(ids.size(1))
            odd = ((pos[None, :] + 2 * pos[:, None]) % 2 == 1) | (pos.float()[None, :] % 2.0 == 1.0)
            scores = scores.masked_fill(odd, float("-inf"))
        else:  # a softmax straight after the integer matmul: ORT's QLinearSoftmax, exact at the output scale 2^-8
            scores = torch.einsum("bqd,bkd->bqk", q, k)
        return self.fc((scores.softmax(-1) @ x).mean(1))


@pytest.mark.parametrize("style", ["hf", "where", "tril", "type_as", "strided", "einsum"])
def test_mask_and_score_styles_convert_and_export(style, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(1, 30, (32, 8))
    ids[:, 6:] = 0
    model = MaskStyles(style).eval()
    qat = qatkit.prepare(model, qatkit.QATConfig(), ids[:2])
    qatkit.calibrate(qat, [ids])
    qat.eval()
    with torch.no_grad():
        expected = qat(ids)
        assert (expected - model(ids)).abs().max() < 0.05
    integer = qatkit.convert(qat)
    assert torch.equal(integer(ids), expected)
    weights = _softmax_outputs(integer, ids)[0]  # (B, L, L): the masked keys get no weight
    if style == "tril":
        later = torch.ones(8, 8, dtype=torch.bool).triu(1)
        assert (weights[:, later] == 0).all() and (weights[:, ~later] > 0).all()
    elif style == "strided":  # the even keys only
        assert (weights[:, :, 1::2] == 0).all() and (weights[:, :, 0::2] > 0).all()
    elif style != "einsum":
        assert (weights[:, :, 6:] == 0).all() and (weights[:, :, :6] > 0).all()
    path = tmp_path / "m.onnx"
    export_onnx(integer, path, ids[:1])
    result = verify(path, integer, [ids])  # softmax is a float island: one step at most
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0
    assert np.array_equal(IntegerReference(path, requant="float32").run(ids.numpy()), ort.run(ort.session(path, threads=1), ids))


class TinyUNet(nn.Module):
    """A diffusion-style U-Net in small: conv → GroupNorm → SiLU blocks, a strided conv down, a residual middle,
    nearest upsampling and the skip concatenated."""

    def __init__(self):
        super().__init__()
        self.inc = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 32, 3, 2, 1))
        self.mid = nn.Sequential(nn.GroupNorm(8, 32, affine=False), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.out = nn.Sequential(nn.GroupNorm(4, 48), nn.SiLU(), nn.Conv2d(48, 3, 3, padding=1))

    def forward(self, x):
        h = self.inc(x)
        d = self.down(h)
        m = d + self.mid(d)
        return self.out(torch.cat([self.up(m), h], 1))


def test_group_norm_unet_converts_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = TinyUNet().eval()
    for gn in (model.down[0], model.out[0]):  # affine parameters away from their initial 1 and 0
        nn.init.normal_(gn.weight, 1.0, 0.2), nn.init.normal_(gn.bias, 0.0, 0.2)
    x = torch.randn(16, 3, 16, 16)
    integer = converts_exactly(_calibrated(model, x), model, x, 0.1)
    runs_in_onnx_runtime(integer, x, tmp_path / "unet.onnx", top1=False)  # an image out: no classes to agree on


class CosineHead(nn.Module):
    """A cosine classifier over normalised embeddings (face recognition, CLIP-style heads): F.normalize of the
    features and of the class weights, the features' length (x.norm) and an L1-normalised term beside."""

    def __init__(self):
        super().__init__()
        self.fc, self.classes = nn.Linear(12, 16), nn.Parameter(torch.randn(5, 16))

    def forward(self, x):
        h = self.fc(x)
        cosine = F.normalize(h, dim=-1) @ F.normalize(self.classes, p=2, dim=1).transpose(0, 1)
        return 10.0 * cosine + 0.1 * h.norm(dim=-1, keepdim=True) + F.normalize(h, p=1, dim=-1).sum(-1, keepdim=True)


def test_normalize_and_norm_convert_and_run_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = CosineHead().eval()
    x = torch.randn(32, 12)
    integer = converts_exactly(_calibrated(model, x), model, x, 0.2)
    runs_in_onnx_runtime(integer, x, tmp_path / "cosine.onnx", float_output=True)


class ESPCN(nn.Module):
    """Super-resolution as deployed on phones (Shi et al. 2016): convs to r² channels, then nn.PixelShuffle(r)."""

    def __init__(self, r: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, r * r, 3, padding=1))
        self.shuffle = nn.PixelShuffle(r)

    def forward(self, x):
        return self.shuffle(self.body(x))


def test_pixel_shuffle_moves_codes_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = ESPCN().eval()
    x = torch.rand(16, 1, 12, 12)
    integer = converts_exactly(_calibrated(model, x), model, x, 0.05)
    assert integer(x).shape == (16, 1, 36, 36)
    assert type(integer.values(x[:1])["shuffle"]).__name__ == "QValue"  # the last conv's codes, moved
    result = runs_in_onnx_runtime(integer, x, tmp_path / "espcn.onnx", top1=False)
    assert result["max_step_diff"] == 0.0  # integer convs, codes moved: exact


def test_per_layer_comparison_takes_a_model_that_splits_tensors():
    """verify's per-layer comparison (where outputs differ) exports every integer value, chunk's pieces included:
    the exact ESPCN-like split here shows no differing tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.PixelShuffle(2))
    x = torch.rand(16, 1, 6, 6)

    class Split(nn.Module):  # the pieces of a chunk, added back: a qadd of two code pieces
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            a, b = self.body(x).chunk(2, dim=-1)
            return a + b

    integer = qatkit.convert(_calibrated(Split(), x))
    assert ort.per_layer(integer, x) == []


class StyleNet(nn.Module):
    """Image-to-image blocks as style transfer and CycleGAN write them: conv → InstanceNorm → ReLU (affine or not,
    running statistics tracked or not), a cyclic shift of the feature map (torch.roll, as Swin shifts windows)."""

    def __init__(self, tracked: bool):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True, track_running_stats=tracked)
        self.conv2, self.norm2 = nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.norm1(self.conv1(x)))
        h = torch.roll(h, shifts=(-2, 3), dims=(2, 3))
        return self.out(torch.relu(self.norm2(self.conv2(h))).roll(1, -1))


@pytest.mark.parametrize("tracked", [False, True], ids=["input-statistics", "running-statistics"])
def test_instance_norm_and_roll_convert_and_run_in_onnx_runtime(tracked, tmp_path):
    torch.manual_seed(0)
    model = StyleNet(tracked)
    if tracked:  # running statistics away from their initial 0 and 1
        model.norm1.running_mean.normal_(0.0, 0.3), model.norm1.running_var.uniform_(0.5, 2.0)
        nn.init.normal_(model.norm1.weight, 1.0, 0.2), nn.init.normal_(model.norm1.bias, 0.0, 0.2)
    model.eval()
    x = torch.randn(16, 3, 10, 10)
    integer = converts_exactly(_calibrated(model, x), model, x, 0.15)
    runs_in_onnx_runtime(integer, x, tmp_path / "style.onnx", top1=False)  # an image out: no classes to agree on


class Focus(nn.Module):
    """YOLOv5's Focus: the four pixel phases of a feature map (x[..., ::2, ::2], …) stacked as channels, then a conv;
    here after a stem conv, so the strided slices move codes."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_strided_slices_convert_and_run_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = Focus().eval()
    x = torch.randn(16, 3, 12, 12)
    integer = converts_exactly(_calibrated(model, x), model, x, 0.1)
    runs_in_onnx_runtime(integer, x, tmp_path / "focus.onnx")


class IndexedLinear(nn.Module):
    """Channels reordered by an index buffer (x[:, order]); a weight-normalised projection computed in forward
    (F.linear of a (B, T, C) input with a computed weight: a float op); a layer called as F.linear with its own
    weight and bias (quantized as when called)."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc = nn.Conv1d(4, 6, 3, padding=1), nn.Linear(6, 5)
        self.register_buffer("order", torch.tensor([5, 3, 1, 0, 2, 4]))
        self.v, self.g = nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.rand(6, 1) + 0.5)

    def forward(self, x):
        h = torch.relu(self.stem(x))[:, self.order].transpose(1, 2)  # (B, T, 6)
        h = F.linear(h, self.v * (self.g / self.v.norm(dim=1, keepdim=True)))
        return F.linear(h.mean(1), self.fc.weight, self.fc.bias)


def test_index_tensors_and_functional_linear_convert_and_run_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = IndexedLinear().eval()
    x = torch.randn(16, 4, 7)
    qat = _calibrated(model, x)
    assert [row["name"] for row in qat.qat_info.layers] == ["stem", "fc"]
    assert sum(type(m).__name__ == "QLinear" for m in qat.modules()) == 1
    integer = converts_exactly(qat, model, x, 0.1)
    runs_in_onnx_runtime(integer, x, tmp_path / "indexed.onnx")


class ASPPPooling(nn.Module):
    """DeepLab's image pooling branch: pooled to 1×1, upsampled back to the input's size (x.shape[-2:])."""

    def __init__(self):
        super().__init__()
        self.stem, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.pool, self.proj = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.ReLU()), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.proj(torch.cat([torch.relu(self.b1(x)), pooled], 1))


class FPNTopDown(nn.Module):
    """A feature pyramid's top-down step: the coarse map upsampled to the lateral's size, added."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.lateral, self.out = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        fine = self.c1(x)
        return self.out(self.lateral(fine) + F.interpolate(self.c2(fine), size=fine.shape[-2:], mode="nearest"))


class UNetSkip(nn.Module):
    """U-Net's up step (milesial/Pytorch-UNet): the upsampled map padded to the skip's size by the size difference,
    which is negative (a crop) for odd inputs; a transposed conv (float) upsamples."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up, self.out = nn.ConvTranspose2d(8, 8, 2, stride=2), nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        skip = self.c1(x)
        up = self.up(self.c2(skip))
        dy, dx = skip.size(2) - up.size(2), skip.size(3) - up.size(3)
        up = F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.out(torch.cat([skip, up], 1))


@pytest.mark.parametrize("model_class", [ASPPPooling, FPNTopDown, UNetSkip])
@pytest.mark.parametrize("size", [8, 9])
def test_decoders_sized_by_other_tensors_run_in_onnx_runtime(model_class, size, tmp_path):
    """Sizes taken from other tensors at run time (interpolate's size=, pads from size differences) are graph values
    in ONNX; at size 9 the U-Net's difference is -1, whose floor division by 2 is Python's -1 (ONNX's Div: 0)."""
    torch.manual_seed(0)
    model = model_class().eval()
    x = torch.randn(16, 3, size, size)
    integer = converts_exactly(_calibrated(model, x), model, x, 0.2)
    runs_in_onnx_runtime(integer, x, tmp_path / "decoder.onnx", top1=False)


class YoloDetect(nn.Module):
    """YOLOv5's Detect head as exported: the anchor grid made at run time from the feature map's size
    (torch.meshgrid of two aranges, stacked, expanded), boxes decoded from the sigmoid of the conv's outputs."""

    def __init__(self, indexing: str, anchors=3, outputs=7):
        super().__init__()
        self.stem, self.m, self.na, self.no = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, anchors * outputs, 1), anchors, outputs
        self.indexing = indexing
        self.register_buffer("anchor_grid", torch.rand(1, anchors, 1, 1, 2) + 0.5)

    def forward(self, x):
        x = self.m(torch.relu(self.stem(x)))
        bs, _, ny, nx = x.shape
        x = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
        if self.indexing == "ij":
            yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
        else:
            xv, yv = torch.meshgrid(torch.arange(nx), torch.arange(ny), indexing="xy")
        grid = torch.stack((xv, yv), 2).expand(1, self.na, ny, nx, 2).float()
        y = x.sigmoid()
        xy, wh = (y[..., :2] * 2 - 0.5 + grid) * 8, (y[..., 2:4] * 2) ** 2 * self.anchor_grid
        return torch.cat((xy, wh, y[..., 4:]), -1).view(bs, -1, self.no)


@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_a_grid_made_by_meshgrid_converts_and_runs_in_onnx_runtime(indexing, tmp_path):
    torch.manual_seed(0)
    model, x = YoloDetect(indexing).eval(), torch.randn(16, 3, 12, 10)
    qat = _calibrated(model, x)
    assert not any("meshgrid" in op for op in qat.qat_info.float_ops)  # integer positions, not a float op
    integer = converts_exactly(qat, model, x, 0.2)
    runs_in_onnx_runtime(integer, x, tmp_path / "detect.onnx", top1=False, float_output=True)


class CoordConv(nn.Module):
    """CoordConv (Liu et al. 2018): the pixel coordinates, torch.linspace(-1, 1, size) over the input's height and
    width, as two more input channels of a conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(5, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        n, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, steps=w).view(1, 1, 1, w).expand(n, 1, h, w)
        return self.head(torch.relu(self.bn(self.conv(torch.cat([x, ys, xs], 1)))).mean((2, 3)))


def test_coordinates_from_linspace_over_the_input_size_convert_and_run_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model, x, other = CoordConv().eval(), torch.randn(16, 3, 12, 10), torch.randn(4, 3, 20, 6)
    qat = _calibrated(model, x)
    assert qat.qat_info.input_sizes == {"x": [None, 3, None, None]}  # height and width free
    integer = converts_exactly(qat, model, x, 0.05)
    with torch.no_grad():
        assert torch.equal(integer(other), qat(other))
    runs_in_onnx_runtime(integer, x, tmp_path / "coords.onnx")
    result = verify(tmp_path / "coords.onnx", integer, [(other,)])  # the ONNX file at another image size
    assert result["top1_agreement"] == 1.0 and result["max_step_diff"] == 0.0


class Ramp(nn.Module):
    def forward(self, x):
        return x + torch.linspace(-0.3, 2.9, x.size(-1))


@pytest.mark.parametrize("steps", [1, 2, 3, 17, 100])
def test_linspace_in_onnx_is_pytorchs_formula(steps, tmp_path):
    """torch.linspace's values in ONNX Runtime at any length: the float64 values to float32 rounding (an ulp: PyTorch's
    vectorised loop rounds some of its own values differently)."""
    qat = qatkit.prepare(Ramp(), qatkit.QATConfig(output_bits=None), torch.zeros(2, 5))
    qatkit.calibrate(qat, [torch.zeros(2, 5)])
    integer = qatkit.convert(qat.eval())
    export_onnx(integer, tmp_path / "ramp.onnx", torch.zeros(1, 5))
    x = torch.zeros(3, steps)  # dequantized exactly: the output is the linspace itself
    got = ort.run(ort.session(tmp_path / "ramp.onnx"), x)
    want = np.linspace(-0.3, 2.9, steps) if steps > 1 else np.array([-0.3])
    assert got.shape == (3, steps)
    np.testing.assert_allclose(got, np.broadcast_to(want, (3, steps)), rtol=0, atol=2.0**-22)
    np.testing.assert_allclose(got, integer(x).numpy(), rtol=0, atol=2.0**-22)


class Scaled(nn.Module):
    """Adds and subtractions in their torch and method spellings, with alpha (y + a·x: alpha was dropped before), and
    divisions (x.div(y), torch.div(x, y, rounding_mode="floor"): refused before)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        a, b = torch.relu(self.c1(x)), torch.relu(self.c2(x))
        y = torch.add(a, b, alpha=2.0)
        z = y.sub(a, alpha=0.5)
        z.add_(b, alpha=-1.0)
        w = torch.div(z, 0.25, rounding_mode="floor").div(4.0)
        return self.fc(torch.sub(w.add(a), b).mean((2, 3)))


def test_add_sub_and_div_in_every_spelling_convert_and_run_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(16, 3, 12, 12)
    qat = _calibrated(model, x)
    integer = converts_exactly(qat, model, x, 0.02 * model(x).abs().max().item())
    runs_in_onnx_runtime(integer, x, tmp_path / "scaled.onnx")


class Pools(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.c1, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.AvgPool2d(3, stride=2, padding=1, **kw)
        self.c2, self.fc = nn.Conv2d(8, 8, 3), nn.Linear(8, 4)

    def forward(self, x):
        y = self.pool(torch.relu(self.c1(x)))
        y = F.avg_pool2d(torch.relu(self.c2(y)), 2, divisor_override=3)  # a window's sum over 3
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("kw", [{}, {"count_include_pad": False, "ceil_mode": True}, {"divisor_override": 4},
                                {"divisor_override": 9, "count_include_pad": False}])
def test_average_pools_with_their_options_convert_and_run_in_onnx_runtime(kw, tmp_path):
    """divisor_override (module and function): the integer model and ONNX dropped it before."""
    torch.manual_seed(0)
    model, x = Pools(**kw).eval(), torch.randn(16, 3, 13, 11)
    integer = converts_exactly(_calibrated(model, x), model, x, 0.02 * model(x).abs().max().item())
    runs_in_onnx_runtime(integer, x, tmp_path / "pools.onnx")


def test_divisor_override_with_ceil_mode_is_refused_at_export_with_the_fix(tmp_path):
    torch.manual_seed(0)
    model, x = Pools(divisor_override=4, ceil_mode=True).eval(), torch.randn(16, 3, 13, 11)
    integer = converts_exactly(_calibrated(model, x), model, x, 0.02 * model(x).abs().max().item())
    with pytest.raises(QatkitError, match=r"divisor_override=4 and ceil_mode=True .* Fix: ceil_mode=False"):
        export_onnx(integer, tmp_path / "pools.onnx", x[:1])
    assert not (tmp_path / "pools.onnx").exists()


class PoolIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.pool, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2, return_indices=True), nn.Linear(8, 4)

    def forward(self, x):
        y, _ = self.pool(torch.relu(self.c1(x)))
        return self.fc(y.mean((2, 3)))


def test_max_pool_returning_its_indices_is_refused_at_convert_with_the_fix():
    """It ran as a max pool without indices, whose tensor the model then indexed: an IndexError, or a wrong result."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 12, 12)
    qat = _calibrated(PoolIndices().eval(), x)
    with pytest.raises(QatkitError, match=r"'pool' \(MaxPool2d\) returns its indices .* Fix: build it with "
                                          r"return_indices=False"):
        qatkit.convert(qat)


class Video(nn.Module):
    """A video / volume net: (2+1)-D factorised 3-D convs with BN and ReLU, a grouped one, a residual add, 3-D max,
    average and global pools, a 3-D transposed conv; an RGB stem (3 channels: padded to 4 on the codes)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d((1, 2, 2)))
        self.block = nn.Sequential(nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0)), nn.BatchNorm3d(8), nn.ReLU(),
                                   nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1), groups=2), nn.BatchNorm3d(8))
        self.up, self.avg, self.gap = nn.ConvTranspose3d(8, 4, 2, stride=2), nn.AvgPool3d(2), nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(12, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm3d):
                with torch.no_grad():
                    m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        u = self.avg(F.relu(self.up(x)))
        return self.fc(torch.cat([self.gap(x).flatten(1), self.gap(u).flatten(1)], 1))


def test_3d_convs_and_pools_are_quantized_and_run_exactly_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model, x = Video().eval(), torch.randn(16, 3, 4, 8, 8)
    qat = _calibrated(model, x)
    assert [(r["type"], r["bn_folded"]) for r in qat.qat_info.layers] == [
        ("Conv3d", True), ("Conv3d", True), ("Conv3d", True), ("ConvTranspose3d", False), ("Linear", False)]
    assert not qat.qat_info.float_ops
    result = runs_in_onnx_runtime(converts_exactly(qat, model, x, 0.2), x, tmp_path / "video.onnx")
    assert result["max_step_diff"] == 0  # ORT's QLinearConv runs the 3-D convs on integers


def test_adaptive_max_pool_3d_keeps_the_codes_and_runs_in_onnx_runtime(tmp_path):
    """To a size that divides the input's (a MaxPool) and to 1 (a ReduceMax), on the codes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool3d((1, 2, 2)), nn.Conv3d(8, 8, 1),
                          nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(16, 3, 4, 8, 8)
    qat = _calibrated(model, x)
    assert not qat.qat_info.float_ops  # the pools keep the codes
    result = runs_in_onnx_runtime(converts_exactly(qat, model, x, 0.2), x, tmp_path / "pool3d.onnx")
    assert result["max_step_diff"] == 0


def test_3d_float_ops_compute_what_pytorch_does():
    """Unquantized (skipped) 3-D layers and pools, BatchNorm3d and InstanceNorm3d: float64 = PyTorch."""
    torch.manual_seed(0)
    model = nn.Sequential(Video().stem, nn.InstanceNorm3d(8, affine=True), nn.AvgPool3d(2, ceil_mode=True),
                          nn.ConvTranspose3d(8, 2, 3, stride=2, padding=1, output_padding=1), nn.AdaptiveAvgPool3d(1))
    model = model.double().eval()
    x = torch.randn(2, 3, 3, 6, 6, dtype=torch.float64)
    qat = qatkit.prepare(model, qatkit.QATConfig(rules=(qatkit.LayerRule(pattern="*", skip=True),)), x)
    with torch.no_grad():
        torch.testing.assert_close(qatkit.convert(qat.eval())(x), model(x), rtol=1e-12, atol=1e-12)


class PointNet(nn.Module):
    """PointNet's global max pool over the points, in the ways it is written; `indices` also uses where the minimum
    is (integer positions), `elementwise` takes the larger of two feature maps."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.c1, self.bn, self.c2, self.fc = nn.Conv1d(3, 16, 1), nn.BatchNorm1d(16), nn.Conv1d(16, 32, 1), nn.Linear(32, 4)

    def forward(self, x):  # (B, 3, points)
        h = self.c2(F.relu(self.bn(self.c1(x))))
        if self.style == "torch.max":
            return self.fc(torch.max(h, 2, keepdim=True)[0].view(-1, 32))
        if self.style == "method":
            return self.fc(h.max(dim=-1)[0])
        if self.style == "amax":
            return self.fc(torch.amax(h, dim=2))
        if self.style == "values":
            return self.fc(h.max(2).values)
        if self.style == "indices":
            low = torch.min(h, 2)
            return self.fc(low.values) + 0.01 * low.indices[:, :4].float()
        return self.fc(torch.max(h, torch.relu(h[:, :, :1])).mean(2))  # elementwise


@pytest.mark.parametrize("style", ["torch.max", "method", "amax", "values", "indices", "elementwise"])
def test_max_and_min_over_an_axis_convert_and_run_in_onnx_runtime(style, tmp_path):
    torch.manual_seed(0)
    model, x = PointNet(style).eval(), torch.randn(16, 3, 20)
    qat = _calibrated(model, x)
    reduction = style != "elementwise"
    assert not any(op.endswith(("(max)", "(amax)", "(min)")) for op in qat.qat_info.float_ops) == reduction
    integer = converts_exactly(qat, model, x, 0.2)
    runs_in_onnx_runtime(integer, x, tmp_path / "pointnet.onnx", float_output=style == "indices")


class DetrPositions(nn.Module):
    """DETR's sine position embedding, computed in forward from the feature map's size: cumulative sums of a mask
    of ones, a frequency ladder, sin/cos of the even/odd features interleaved, added to the features."""

    def __init__(self, d=8):
        super().__init__()
        self.d, self.conv, self.head = d, nn.Conv2d(3, 2 * d, 3, padding=1), nn.Linear(2 * d, 4)

    def forward(self, x):
        f = self.conv(x)
        not_mask = torch.ones(f.shape[0], f.shape[2], f.shape[3])
        y_embed, x_embed = not_mask.cumsum(1, dtype=torch.float32), not_mask.cumsum(2, dtype=torch.float32)
        dim_t = 10000 ** (2 * (torch.arange(self.d, dtype=torch.float32) // 2) / self.d)
        pos_x, pos_y = x_embed[:, :, :, None] / dim_t, y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return self.head((f + torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)).mean((2, 3)))


def test_positions_from_cumulative_sums_convert_and_run_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model, x = DetrPositions().eval(), torch.randn(16, 3, 6, 7)
    qat = _calibrated(model, x)
    assert not any("cumsum" in op for op in qat.qat_info.float_ops)  # sums of a mask: exact
    runs_in_onnx_runtime(converts_exactly(qat, model, x, 0.2), x, tmp_path / "detr.onnx")


class TextCNN(nn.Module):
    """Kim (2014)'s sentence CNN: convs of widths 3, 4, 5 over the embedded words, each max-pooled over time with a
    kernel as long as its own output (h.size(2) or h.shape[-1]), concatenated."""

    def __init__(self, length: str):
        super().__init__()
        self.length, self.emb = length, nn.Embedding(50, 16)
        self.convs, self.fc = nn.ModuleList(nn.Conv1d(16, 8, k) for k in (3, 4, 5)), nn.Linear(24, 2)

    def forward(self, ids):
        x = self.emb(ids).transpose(1, 2)
        pooled = []
        for conv in self.convs:
            h = F.relu(conv(x))
            pooled.append(F.max_pool1d(h, h.size(2) if self.length == "size" else h.shape[-1]).squeeze(2))
        return self.fc(torch.cat(pooled, 1))


@pytest.mark.parametrize("length", ["size", "shape"])
def test_max_over_time_converts_and_runs_in_onnx_runtime(length, tmp_path):
    torch.manual_seed(0)
    model, ids = TextCNN(length).eval(), torch.randint(0, 50, (16, 12))
    qat = qatkit.prepare(model, qatkit.QATConfig(), ids[:2])
    qatkit.calibrate(qat, [ids])
    integer = converts_exactly(qat, model, ids, 0.2)
    converts_exactly(qat, model, ids[:, :9], 0.2)  # another sentence length
    runs_in_onnx_runtime(integer, ids, tmp_path / "textcnn.onnx")


def knn(x, k):
    inner = -2 * torch.matmul(x.transpose(2, 1), x)
    xx = torch.sum(x**2, dim=1, keepdim=True)
    return (-xx - inner - xx.transpose(2, 1)).topk(k=k, dim=-1)[1]


class DGCNN(nn.Module):
    """DGCNN's edge convolution as its authors write it: each point's k nearest points (topk of negative squared
    distances), gathered by flat index, with the point repeated beside them, a 1×1 conv, max over neighbours."""

    def __init__(self, k=4):
        super().__init__()
        self.k = k
        self.conv = nn.Sequential(nn.Conv2d(6, 16, 1, bias=False), nn.BatchNorm2d(16), nn.LeakyReLU(0.2))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):  # (B, 3, points)
        batch_size, num_points, k = x.size(0), x.size(2), self.k
        idx = (knn(x, k) + torch.arange(0, batch_size).view(-1, 1, 1) * num_points).view(-1)
        points = x.transpose(2, 1).contiguous()
        feature = points.view(batch_size * num_points, -1)[idx, :].view(batch_size, num_points, k, 3)
        centre = points.view(batch_size, num_points, 1, 3).repeat(1, 1, k, 1)
        edges = torch.cat((feature - centre, centre), dim=3).permute(0, 3, 1, 2).contiguous()
        return self.fc(self.conv(edges).max(dim=-1, keepdim=False)[0].amax(-1))


def test_k_nearest_neighbours_by_topk_convert_and_run_in_onnx_runtime(tmp_path):
    """Points on an integer lattice: many equal distances, so the order among equal values decides the neighbours:
    prepare makes torch.topk ONNX's (the lower index first), and the three agree exactly."""
    torch.manual_seed(0)
    model, x = DGCNN().eval(), torch.randint(-2, 3, (16, 3, 10)).float()
    qat = _calibrated(model, x)
    result = runs_in_onnx_runtime(converts_exactly(qat, model, x, 0.5), x, tmp_path / "dgcnn.onnx")
    assert result["max_step_diff"] == 0


class ComputedWeightConv(nn.Module):
    """A conv on a weight computed in forward (a gated, dynamic or hyper-network weight: a float op), called with
    its arguments by position, as people write F.conv2d."""

    def __init__(self, conv):
        super().__init__()
        self.c1, self.head, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4), conv
        self.w, self.gate = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2), nn.Parameter(torch.randn(8, 1, 1, 1))
        self.wt = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.2)

    def forward(self, x):
        return self.head(self.conv(self, self.c1(x)).mean((2, 3)))


COMPUTED_WEIGHT_CONVS = {
    "stride, padding": lambda m, y: F.conv2d(y, m.w * m.gate.sigmoid(), None, 2, 1),
    "padding='same', dilation": lambda m, y: F.conv2d(y, m.w * m.gate.sigmoid(), None, 1, "same", 2),
    "groups": lambda m, y: F.conv2d(y, (m.w * m.gate.sigmoid())[:, :4], None, 1, 1, 1, 2),
    "transposed: stride, padding, output_padding, groups": lambda m, y: F.conv_transpose2d(y, m.wt * 2, None, 2, 1,
                                                                                             1, 2),
    "by name": lambda m, y: F.conv2d(y, m.w * m.gate.sigmoid(), stride=2, padding=(1, 0)),
}


@pytest.mark.parametrize("name", list(COMPUTED_WEIGHT_CONVS))
def test_a_conv_on_a_computed_weight_exports_its_arguments_given_by_position(name, tmp_path):
    """(by position they were read as the defaults: ONNX Runtime 44 steps off, or a model it refused to load)"""
    torch.manual_seed(0)
    model, x = ComputedWeightConv(COMPUTED_WEIGHT_CONVS[name]).eval(), torch.randn(4, 3, 8, 8)
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:1])
    assert any(op.startswith("conv") for op in qat.qat_info.float_ops)
    qatkit.calibrate(qat, [x])
    runs_in_onnx_runtime(converts_exactly(qat, model, x, 0.3), x, tmp_path / "m.onnx")
