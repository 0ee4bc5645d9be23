"""Layer rules, the module-swap fallback for untraceable code, and small hand-built models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import qatkit
from qatkit import LayerRule, QATConfig
from qatkit.export import export_onnx, verify
from qatkit.models import build_model
from qatkit.nn import QConv, QConvBn, QLayer, QLinear
from qatkit.quantizer import FakeQuantizer


def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", num_classes=10, in_channels=1, image_size=8)


def bits_of(qat) -> dict[str, int]:
    return {r["name"]: int(qat.get_submodule(r["name"]).weight_quant.bits) for r in qat.qat_info.layers}


def input_quantizer_of(qat: fx.GraphModule, layer: str):
    node = next(n for n in qat.graph.nodes if n.op == "call_module" and n.target == layer)
    return qat.get_submodule(node.args[1].target)


# ---- rules ------------------------------------------------------------------------------------------
def test_rule_by_glob():
    qat = qatkit.prepare(resnet20(), QATConfig(weight_bits=4, act_bits=4, rules=[LayerRule(pattern="layer1.*", weight_bits=2)]))
    bits = bits_of(qat)
    layer1 = [n for n in bits if n.startswith("layer1.")]
    assert len(layer1) == 6
    for name, b in bits.items():
        assert b == (2 if name.startswith("layer1.") else 8 if name in ("conv1", "fc") else 4), name
    assert qat.get_submodule("layer1.0.conv1").weight_quant.qrange == (-2, 1)
    # the weights really take 4 values per channel
    w = qat.get_submodule("layer1.0.conv1")
    codes = w.weight_quant.codes(w.folded()[0].detach())
    assert set(codes.unique().tolist()) <= {-2.0, -1.0, 0.0, 1.0}


def test_rule_by_type_overrides_first_last_bits():
    qat = qatkit.prepare(resnet20(), QATConfig(weight_bits=4, act_bits=4, rules=[LayerRule(pattern="Linear", weight_bits=6, per_channel=False)]))
    bits = bits_of(qat)
    assert bits["fc"] == 6 and bits["conv1"] == 8
    assert all(b == 4 for n, b in bits.items() if n not in ("fc", "conv1"))
    assert qat.fc.weight_quant.scale.dim() == 0  # per-tensor
    assert qat.conv1.weight_quant.scale.shape == (16,)


def test_later_rules_win():
    rules = [LayerRule(pattern="layer*", weight_bits=2), LayerRule(pattern="layer3.*", weight_bits=6)]
    bits = bits_of(qatkit.prepare(resnet20(), QATConfig(weight_bits=4, rules=rules)))
    assert bits["layer1.0.conv1"] == bits["layer2.0.downsample.0"] == 2
    assert bits["layer3.2.conv2"] == bits["layer3.0.downsample.0"] == 6


def test_rule_act_bits_a_shared_input_takes_the_wider_width_and_requantizes_for_the_narrower():
    """layer2.0.conv1 (6 bits by rule) and layer2.0.downsample.0 (4) read the same value: its quantizer is
    6 bits wide and the downsample conv reads a 4-bit requantization of it."""
    cfg = QATConfig(weight_bits=4, act_bits=4, rules=[LayerRule(pattern="layer2.0.conv1", act_bits=6)])
    qat = qatkit.prepare(resnet20(), cfg)
    wide, narrow = input_quantizer_of(qat, "layer2.0.conv1"), input_quantizer_of(qat, "layer2.0.downsample.0")
    assert (int(wide.bits), int(narrow.bits)) == (6, 4)
    nodes = {n.target: n for n in qat.graph.nodes if n.op == "call_module"}
    conv1_x, requant = nodes["layer2.0.conv1"].args[0], nodes["layer2.0.downsample.0"].args[0]
    assert requant.op == "call_module" and qat.get_submodule(requant.target) is narrow and requant.args[0] is conv1_x
    assert int(input_quantizer_of(qat, "layer1.0.conv1").bits) == 4


def test_residual_bits_none_quantizes_the_skip_path_at_act_bits():
    qat = qatkit.prepare(resnet20(), QATConfig(weight_bits=4, act_bits=4, residual_bits=None))
    assert {int(m.bits) for n, m in qat.named_modules() if isinstance(m, FakeQuantizer) and m.kind == "act"} == {4, 8}
    assert not [n for n in qat.graph.nodes if n.op == "call_module" and n.target.endswith("_a4")]  # no requantizers


class SkipReaders(nn.Module):
    """r feeds a residual add (8-bit skip path), conv2 directly and conv3 through a max pool."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.conv2, self.conv3 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = F.relu(self.conv0(x))
        r = h + self.conv1(h)
        return r + self.conv2(r), self.conv3(F.max_pool2d(r, 2))


def test_each_reader_of_the_skip_path_gets_a_requantizer_of_its_own_input():
    x = torch.randn(2, 1, 8, 8)
    qat = qatkit.prepare(SkipReaders(), QATConfig(weight_bits=4, act_bits=4, first_last_bits=None), x)
    nodes = {n.target: n for n in qat.graph.nodes if n.op == "call_module"}
    for layer, read in (("conv2", "qadd_add"), ("conv3", "max_pool2d")):
        requant = nodes[layer].args[0]
        assert requant.args[0].name == read and int(qat.get_submodule(requant.target).bits) == 4, layer
        assert qat.get_submodule(nodes[layer].args[1].target) is qat.get_submodule(requant.target)
    assert int(qat.conv0.out_quant.bits) == 8 and int(input_quantizer_of(qat, "conv1").bits) == 4  # h feeds the add
    qatkit.calibrate(qat, [x])
    s, t = qat.eval()(x)
    assert s.shape == (2, 4, 8, 8) and t.shape == (2, 2, 4, 4)


@pytest.mark.parametrize("pattern", ["layer1.0.conv1", "Conv2d"])
def test_skip_leaves_a_plain_float_layer(pattern):
    model = resnet20()
    qat = qatkit.prepare(model, QATConfig(rules=[LayerRule(pattern=pattern, skip=True)]), torch.randn(2, 1, 8, 8))
    assert type(qat.get_submodule("layer1.0.conv1")) is nn.Conv2d
    names = [r["name"] for r in qat.qat_info.layers]
    assert "layer1.0.conv1" not in names
    if pattern == "Conv2d":
        assert names == ["fc"] and type(qat.get_submodule("conv1")) is nn.Conv2d
    else:
        assert len(names) == 21 and isinstance(qat.conv1, QConvBn)
    # its BN stays in the graph, unfolded
    modules = dict(qat.named_modules())
    assert any(n.op == "call_module" and n.target == "layer1.0.bn1" and isinstance(modules[n.target], nn.BatchNorm2d)
               for n in qat.graph.nodes)
    assert "layer1.0.conv1 (Conv2d, skipped by rule)" in qat.qat_info.float_ops
    qatkit.calibrate(qat, [torch.randn(8, 1, 8, 8)])
    qat.eval()
    model.eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        y, y_float = qat(x), model(x)
    assert (y - y_float).abs().max() <= 0.05 * (y_float.max() - y_float.min())


def test_skip_linear_by_type_on_an_mlp():
    torch.manual_seed(0)
    model = build_model("seed-mlp", num_classes=3, in_channels=1, image_size=4)
    qat = qatkit.prepare(model, QATConfig(rules=[LayerRule(pattern="Linear", skip=True)]))
    assert type(qat.fc1) is nn.Linear and type(qat.fc2) is nn.Linear
    assert qat.qat_info.layers == [] and qat.qat_info.act_quantizers == []
    x = torch.randn(4, 1, 4, 4)
    assert torch.equal(qat(x), model(x))


def test_skipped_layer_is_reported_once():
    qat = qatkit.prepare(resnet20(), QATConfig(rules=[LayerRule(pattern="layer1.0.conv1", skip=True)]))
    assert sum(op.startswith("layer1.0.conv1 ") for op in qat.qat_info.float_ops) == 1


@pytest.mark.parametrize("pattern", ["layer9.*", "Conv1d", "fc.weight"])
def test_rule_matching_nothing_is_an_error_naming_the_glob(pattern):
    glob = pattern.replace(".", r"\.").replace("*", r"\*")
    with pytest.raises(qatkit.ConfigError, match=rf"^rule pattern = '{glob}' is not allowed; allowed: a glob matching a layer "
                                                  r"name or type \(conv1, layer1\.0\.conv1, .*, \.\.\.\)"):
        qatkit.prepare(resnet20(), QATConfig(rules=[LayerRule(pattern="fc", weight_bits=8), LayerRule(pattern=pattern, weight_bits=4)]))


# ---- module-swap fallback ---------------------------------------------------------------------------
class Branchy(nn.Module):
    """Data-dependent control flow in forward: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            x = self.conv(x)
        else:
            x = -self.conv(x)
        return self.fc(torch.flatten(x, 1))


def test_untraceable_forward_falls_back_to_module_swap():
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(16, 1, 8, 8)
    with pytest.warns(UserWarning, match=r"^qatkit: could not trace 'Branchy' \(TraceError: .*control flow\), nor along the "
                                         r"example input \(Python control flow on tensor values \(node 'gt'\).*module swap"):
        qat = qatkit.prepare(model, QATConfig(), x[:2])
    assert type(qat) is Branchy and qat.qat_info.untraced and "Branchy" in qat.qat_info.untraced[0]
    assert isinstance(qat.conv, QConv) and isinstance(qat.fc, QLinear)
    assert qat.conv.input_quant is not None and qat.fc.input_quant is not None
    # the traceable child is still prepared as a graph: BN folded, ReLU fused
    assert isinstance(qat.features, fx.GraphModule) and isinstance(qat.features.get_submodule("0"), QConvBn)
    assert qat.features.get_submodule("0").act == "relu"
    assert sorted(r["name"] for r in qat.qat_info.layers) == ["conv", "fc", "features.0"]
    qatkit.calibrate(qat, [x])
    qat.eval()
    with torch.no_grad():
        y, y_float = qat(x), model(x)
    assert (y - y_float).abs().max() <= 0.03 * (y_float.max() - y_float.min())
    with pytest.raises(qatkit.QatkitError, match=r"^convert needs a graph, but 'Branchy' .* could not be traced"):
        qatkit.convert(qat)


def test_module_swap_honours_rules():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="Branchy"):
        qat = qatkit.prepare(Branchy(), QATConfig(weight_bits=4, first_last_bits=None,
                                                  rules=[LayerRule(pattern="conv", skip=True), LayerRule(pattern="fc", weight_bits=2)]))
    assert type(qat.conv) is nn.Conv2d
    assert int(qat.fc.weight_quant.bits) == 2 and int(qat.features.get_submodule("0").weight_quant.bits) == 4


# ---- hand-built models --------------------------------------------------------------------------------
class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


def test_functional_relu_is_fused_and_maxpool_passes_quantization_through():
    qat = qatkit.prepare(FunctionalNet(), QATConfig(), torch.randn(2, 1, 8, 8))
    assert qat.conv.act == "relu" and isinstance(qat.conv, QConvBn)
    assert [n.target for n in qat.graph.nodes if n.op == "call_function"] == [F.max_pool2d]
    assert qat.qat_info.act_quantizers == ["quant_x"]  # the fc reads the conv's output quantizer through the pool
    fc_node = next(n for n in qat.graph.nodes if n.target == "fc")
    assert fc_node.args[1].target == "conv.out_quant"


def test_fold_bn_false_keeps_batchnorm_as_a_float_op():
    qat = qatkit.prepare(FunctionalNet(), QATConfig(fold_bn=False), torch.randn(2, 1, 8, 8))
    assert type(qat.conv) is QConv and qat.conv.act is None
    assert "bn (BatchNorm2d)" in qat.qat_info.float_ops


class SharedConv(nn.Module):
    """One conv applied twice (weight sharing): relu(conv(x)), then conv again."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 3)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = self.conv(x)
        return self.fc(x.flatten(1))


def test_weight_shared_conv_keeps_the_float_semantics():
    torch.manual_seed(0)
    model = SharedConv()
    x = torch.randn(8, 4, 8, 8)
    qat = qatkit.prepare(model, QATConfig(), x)
    qatkit.calibrate(qat, [x])
    qat.eval()
    with torch.no_grad():
        y, y_float = qat(x), model(x)
    assert (y - y_float).abs().max() <= 0.05 * (y_float.max() - y_float.min())


class ConvBnVariant(nn.Module):
    def __init__(self, **bn_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, **bn_kwargs)
        self.fc = nn.Linear(4 * 64, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("bn_kwargs", [
    {"affine": False},
    {"track_running_stats": False},
])
def test_conv_bn_variants_prepare_and_match_float(bn_kwargs):
    torch.manual_seed(0)
    model = ConvBnVariant(**bn_kwargs)
    x = torch.randn(8, 1, 8, 8)
    qat = qatkit.prepare(model, QATConfig(), x)
    qatkit.calibrate(qat, [x])
    qat.eval()
    model.eval()
    with torch.no_grad():
        y, y_float = qat(x), model(x)
    assert (y - y_float).abs().max() <= 0.05 * (y_float.max() - y_float.min())


def test_sync_batchnorm_folds_like_batchnorm_and_converts_exactly(tmp_path):
    """A model made for synchronised multi-process training (nn.SyncBatchNorm.convert_sync_batchnorm): its BNs fold
    into the convs before them; one left alone (after a pool) is a float op the integer model knows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    x = torch.randn(8, 3, 12, 12)
    qat = qatkit.prepare(model, QATConfig(), x[:1])
    assert type(qat.get_submodule("0")) is QConvBn and qat.qat_info.float_ops == ["4 (SyncBatchNorm)"]
    qat.train()(x).square().mean().backward()  # (one process: batch statistics, no synchronisation)
    qatkit.calibrate(qat, [x])
    qat.eval()
    with torch.no_grad():
        y, y_float = qat(x), model(x)
        assert (y - y_float).abs().max() <= 0.05 * (y_float.max() - y_float.min())
        assert torch.equal(qatkit.convert(qat)(x), y)
    export_onnx(qatkit.convert(qat), tmp_path / "m.onnx", x[:1])
    assert verify(tmp_path / "m.onnx", qatkit.convert(qat), [x])["within_one_step"] == 1.0


def test_prepare_without_example_inputs_and_default_config():
    qat = qatkit.prepare(FunctionalNet())
    assert all(isinstance(qat.get_submodule(r["name"]), QLayer) for r in qat.qat_info.layers)
    assert int(qat.conv.weight_quant.bits) == 8
