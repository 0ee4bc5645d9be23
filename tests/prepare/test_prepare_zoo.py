"""`qatkit.prepare` on the zoo models (8×8×1 inputs): what gets wrapped, folded, fused and quantized."""
from __future__ import annotations

import operator

import pytest
import torch
from conftest import optional_mask
from torch import fx, nn

import qatkit
from qatkit.models import build_model
from qatkit.nn import QAdd, QConvBn, QLayer
from qatkit.quantizer import FakeQuantizer

ZOO = ["small-cnn", "resnet20", "mobilenetv2", "tiny-transformer", "seed-mlp"]
# (quantizable layers, BatchNorms, first layer, last layer) of each model, counted from its definition
EXPECTED = {
    "small-cnn": (5, 4, "features.0.0", "fc"),
    "resnet20": (22, 21, "conv1", "fc"),  # 19 convs + 2 downsample convs + fc; one BN per conv
    "mobilenetv2": (53, 52, "features.0.0", "classifier"),
    "tiny-transformer": (10, 0, "embed", "head"),  # embed + 2 × (qkv, proj, fc1, fc2) + head
    "seed-mlp": (2, 0, "fc1", "fc2"),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=10, in_channels=1, image_size=8)


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(16, 1, 8, 8)


@pytest.fixture(scope="module")
def prepared(x):
    """name -> (float model, its state_dict before prepare, QAT model at W4A4 with 8-bit first/last layers)."""
    out = {}
    for name in ZOO:
        model = build(name)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=4, act_bits=4), x[:2])
        out[name] = (model, before, qat)
    return out


def call_modules(gm: fx.GraphModule, types) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], types)]


@pytest.mark.parametrize("name", ZOO)
def test_every_conv_and_linear_is_wrapped(prepared, name):
    model, _, qat = prepared[name]
    n_layers, n_bn, first, last = EXPECTED[name]
    float_layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(float_layers) == n_layers
    assert isinstance(qat, fx.GraphModule)
    assert sorted(r["name"] for r in qat.qat_info.layers) == sorted(float_layers)  # in graph order
    for layer in float_layers:
        assert isinstance(qat.get_submodule(layer), QLayer), layer
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in qat.modules())
    assert len(call_modules(qat, QLayer)) == n_layers


@pytest.mark.parametrize("name", ZOO)
def test_batchnorm_is_folded_out_of_the_graph(prepared, name):
    model, _, qat = prepared[name]
    n_bn = EXPECTED[name][1]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn
    assert call_modules(qat, (nn.BatchNorm1d, nn.BatchNorm2d)) == []
    assert sum(isinstance(m, QConvBn) for m in qat.modules()) == n_bn
    assert sum(r["bn_folded"] for r in qat.qat_info.layers) == n_bn


@pytest.mark.parametrize("name", ZOO)
def test_relu_after_a_layer_is_fused(prepared, name):
    model, _, qat = prepared[name]
    modules = dict(qat.named_modules())
    for node in call_modules(qat, (nn.ReLU, nn.ReLU6)):
        producer = node.args[0]
        assert not (producer.op == "call_module" and isinstance(modules[producer.target], QLayer)), node
    fused = [r["act"] for r in qat.qat_info.layers if r["act"]]
    if name == "small-cnn":
        assert fused == ["relu"] * 4 and call_modules(qat, nn.ReLU) == []
    if name == "mobilenetv2":  # stem, 17 blocks (16 with an expand conv), head: every ReLU6 goes into a conv
        assert fused.count("relu6") == sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 35
        assert call_modules(qat, nn.ReLU6) == []
    if name == "resnet20":  # relu1 of each block and the stem's relu fuse into convs, relu2 into the residual add
        assert fused == ["relu"] * 10
        assert call_modules(qat, nn.ReLU) == []
        assert [m.act for m in qat.modules() if isinstance(m, QAdd)] == ["relu"] * 9


def test_resnet20_quantizes_the_input_and_every_residual_add(prepared):
    _, _, qat = prepared["resnet20"]
    modules = dict(qat.named_modules())
    aq = qat.qat_info.act_quantizers
    assert not [n for n in qat.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    adds = [n for n in qat.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], QAdd)]
    assert len(adds) == 9
    for add in adds:  # QAdd(a, b, quantizer of a, quantizer of b), ReLU fused, unsigned output
        a, b, qa, qb = add.args
        assert all(q.op == "get_attr" and isinstance(modules[q.target], FakeQuantizer) for q in (qa, qb))
        assert f"{add.target}.out_quant" in aq and modules[add.target].out_quant.spec.signed is False
    (placeholder,) = [n for n in qat.graph.nodes if n.op == "placeholder"]
    (first,) = placeholder.users
    assert first.target == "quant_x" and isinstance(modules["quant_x"], FakeQuantizer)
    adds_out = [f"qadd_add{'' if i == 0 else f'_{i}'}.out_quant" for i in range(9)]
    # the skip path stays 8-bit (residual_bits): the stem's output and the adds that feed the next block's add are
    # requantized to 4 bits for that block's conv1 (the adds before a downsampling block feed convs only)
    requant = [f"quant_{x}_a4" for x in ("conv1", "qadd_add", "qadd_add_1", "qadd_add_3", "qadd_add_4", "qadd_add_6", "qadd_add_7")]
    assert aq == ["quant_x", *adds_out, "qpool_avgpool.out_quant", *requant]
    assert [int(modules[q].bits) for q in adds_out] == [8, 8, 4, 8, 8, 4, 8, 8, 8]
    assert all(int(modules[q].bits) == 4 for q in requant)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_layers_read_their_act_bits_and_residual_adds_8_bits(prepared, name):
    _, _, qat = prepared[name]
    modules = dict(qat.named_modules())
    plans = {r["name"]: r["act_bits"] for r in qat.qat_info.layers}
    for node in qat.graph.nodes:
        if node.op != "call_module":
            continue
        if node.target in plans:
            assert int(modules[node.args[1].target].bits) == plans[node.target], node.target
        elif isinstance(modules[node.target], QAdd):
            assert [int(modules[q.target].bits) for q in node.args[2:]] == [8, 8], node.target


def test_mobilenetv2_quantizes_every_residual_add(prepared):
    model, _, qat = prepared["mobilenetv2"]
    modules = dict(qat.named_modules())
    n_res = sum(getattr(m, "use_residual", False) for m in model.modules())
    adds = [n for n in qat.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], QAdd)]
    assert len(adds) == n_res == 10
    assert all(modules[a.target].act is None for a in adds)  # linear bottlenecks: no ReLU after the add
    requant = [q for q in qat.qat_info.act_quantizers if q.endswith("_a4")]  # skip path 8-bit, expand convs 4-bit
    assert len(qat.qat_info.act_quantizers) == 1 + n_res + 1 + len(requant)  # input, adds, avgpool, requantizers
    assert len(requant) == n_res  # each residual block's input feeds its expand conv and its add


@pytest.mark.parametrize("name", ZOO)
def test_final_linear_outputs_8_bit_logits(prepared, name):
    _, _, qat = prepared[name]
    last = EXPECTED[name][3]
    assert int(qat.get_submodule(last).out_quant.bits) == 8  # output_bits=8 although act_bits=4
    assert qat.qat_info.layers[-1]["name"] == last and qat.qat_info.layers[-1]["output"] == "A8"
    # every other layer hands integers on
    assert all(r["output"].startswith("A") for r in qat.qat_info.layers[:-1])


@pytest.mark.parametrize("name", ZOO)
def test_output_bits_none_gives_float_logits(name):
    qat = qatkit.prepare(build(name), qatkit.QATConfig(weight_bits=4, act_bits=4, output_bits=None))
    last = EXPECTED[name][3]
    assert qat.get_submodule(last).out_quant is None and qat.qat_info.layers[-1]["output"] == "float"


@pytest.mark.parametrize("name", ZOO)
def test_first_and_last_layer_stay_at_8_bits(prepared, name):
    _, _, qat = prepared[name]
    _, _, first, last = EXPECTED[name]
    for row in qat.qat_info.layers:
        want = 8 if row["name"] in (first, last) else 4
        assert int(qat.get_submodule(row["name"]).weight_quant.bits) == want, row["name"]
        assert row["weight_bits"] == row["act_bits"] == want
    # the quantizer feeding the first layer is 8-bit too
    node = next(n for n in qat.graph.nodes if n.op == "call_module" and n.target == first)
    assert int(qat.get_submodule(node.args[1].target).bits) == 8


def test_first_last_bits_none_quantizes_every_layer_alike(x):
    qat = qatkit.prepare(build("small-cnn"), qatkit.QATConfig(weight_bits=4, act_bits=4, first_last_bits=None))
    assert {int(qat.get_submodule(r["name"]).weight_quant.bits) for r in qat.qat_info.layers} == {4}
    assert int(qat.quant_x.bits) == 4


@pytest.mark.parametrize("name", ZOO)
def test_prepare_leaves_the_float_model_untouched(prepared, x, name):
    model, before, qat = prepared[name]
    qatkit.calibrate(qat, [x], num_batches=1)
    qat.train()
    qat(x).square().mean().backward()  # a training forward updates the QAT model's BN statistics
    with torch.no_grad():
        for p in qat.parameters():
            p.add_(0.01)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert all(p.grad is None for p in model.parameters())
    float_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not float_ptrs & {p.data_ptr() for p in qat.parameters()}
    assert not isinstance(model, fx.GraphModule)
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == EXPECTED[name][0]


@pytest.mark.parametrize("name", ["small-cnn", "resnet20", "tiny-transformer", "seed-mlp"])
def test_8_bit_qat_eval_is_close_to_the_float_model(x, name):
    model = build(name).eval()
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:2])
    qatkit.calibrate(qat, [x], num_batches=1)
    qat.eval()
    with torch.no_grad():
        y, y_float = qat(x), model(x)
    assert (y - y_float).abs().max() <= 0.05 * (y_float.max() - y_float.min())


@pytest.mark.parametrize("name", ZOO)
def test_describe_lists_every_layer(prepared, name):
    model, _, qat = prepared[name]
    text = qatkit.describe(qat)
    lines = text.splitlines()
    for layer, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert any(line.startswith(f"| {layer} ") for line in lines), layer
    added = ", ".join(f"{q} (A{int(qat.get_submodule(q).bits)})" for q in qat.qat_info.act_quantizers)
    assert f"activation quantizers added: {added}" in text
    if name == "resnet20":  # the skip path at 8 bits, each block's conv input requantized to 4
        assert "qadd_add.out_quant (A8)" in text and "quant_qadd_add_a4 (A4)" in text
        assert any(line.startswith("| layer1.0.conv2 ") and line.rstrip(" |").endswith("A8") for line in lines)
    if name == "seed-mlp":
        assert "float ops (no integer kernel, run on dequantized values): act (Sigmoid)" in text


def test_describe_shows_the_bits_weights_are_quantized_at_with_reduce_range():
    """reduce_range quantizes 8-bit weights at 7 bits; describe and report.md said W8."""
    qat = qatkit.prepare(build("small-cnn"), qatkit.QATConfig(reduce_range=True), torch.zeros(2, 1, 8, 8))
    bits = [int(m.weight_quant.bits) for m in qat.modules() if hasattr(m, "weight_quant")]
    assert bits == [7] * 5 and [r["weight_bits"] for r in qat.qat_info.layers] == bits
    assert all("| W7 " in line for line in qatkit.describe(qat).splitlines()[2:7])


def test_describe_of_a_float_model():
    assert qatkit.describe(build("seed-mlp")).startswith("not a qatkit QAT model")


@pytest.mark.parametrize("name, shape", [
    ("small-cnn", (2, 3, 8, 8)), ("seed-mlp", (2, 1, 4, 4)), ("tiny-transformer", (2, 1, 6, 6)), ("resnet20", (2, 8, 8)),
])
def test_example_inputs_of_the_wrong_shape(name, shape):
    shown = str(shape).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(qatkit.DataError, match=rf"^input of shape {shown} does not fit the model \(.+\)\. Fix: pass inputs shaped"):
        qatkit.prepare(build(name), qatkit.QATConfig(), torch.randn(*shape))


def test_example_inputs_as_a_tuple():
    qat = qatkit.prepare(build("seed-mlp"), qatkit.QATConfig(), (torch.randn(2, 1, 8, 8),))
    assert qat.training  # the check runs in eval and restores the mode
    with pytest.raises(qatkit.DataError, match=r"^input of shape \(2, 5\) does not fit"):
        qatkit.prepare(build("seed-mlp"), qatkit.QATConfig(), (torch.randn(2, 5),))


@pytest.mark.parametrize("obj", [lambda x: x, "resnet20", None, nn.Conv2d])
def test_prepare_needs_a_module(obj):
    with pytest.raises(qatkit.ConfigError, match=rf"^model = '{type(obj).__name__}' is not allowed; allowed: a torch.nn.Module"):
        qatkit.prepare(obj, qatkit.QATConfig())


class CallsWithAndWithoutMask(nn.Module):
    """int(size / k) (as Swin's window_reverse writes it) defeats both tracers; traced alone, a submodule's optional
    mask is a graph input, so its graph takes the masked way even where the model passes None."""

    def __init__(self):
        super().__init__()
        self.a, self.b = optional_mask(), optional_mask()
        self.register_buffer("mask", torch.tensor([True, False, False, True]))

    def forward(self, x):
        rows = int(x.shape[0] / 1)
        return (self.a(x) + self.b(x, self.mask)).reshape(rows, 4)


def test_a_qat_graph_that_fails_where_the_float_model_runs_is_named_not_blamed_on_the_input():
    with pytest.raises(qatkit.QatkitError, match=r"^the QAT model fails on the example input, which the float model "
                                                 r"runs \(.+\): prepare's graph of 'CallsWithAndWithoutMask' .* Fix: make the "
                                                 r"model traceable as a whole"):
        qatkit.prepare(CallsWithAndWithoutMask(), qatkit.QATConfig(), torch.randn(2, 4))
