"""Conv and Linear subclasses whose forward calls F.conv2d / F.linear itself, as timm writes them: Conv2dSame pads its
input to 'same' (math.ceil of the size over the stride) and convolves with padding 0; StdConv2d and ScaledStdConv2d
(BiT, NFNet) standardize their weight first; a LoRA layer multiplies by its weight plus the merged update B·A. The convolution is quantized as the layer's own (BN folded, ReLU fused; a computed
weight as the weight quantizer's input, what it is computed from training), the size arithmetic is exact in the
integer model and ONNX, and ONNX Runtime computes the integer model's values at the example's size and at others."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import converts_exactly, prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit


def pad_same(x, k, s, d=(1, 1), value=0.0):  # timm's
    ih, iw = x.size()[-2:]
    pad_h = max((math.ceil(ih / s[0]) - 1) * s[0] + (k[0] - 1) * d[0] + 1 - ih, 0)
    pad_w = max((math.ceil(iw / s[1]) - 1) * s[1] + (k[1] - 1) * d[1] + 1 - iw, 0)
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=value)


class Conv2dSame(nn.Conv2d):  # timm's
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, padding=0)

    def forward(self, x):
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class SameNet(nn.Module):  # a TF-ported EfficientNet's stem and a depthwise stage
    def __init__(self):
        super().__init__()
        self.stem, self.bn1 = Conv2dSame(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("size", [9, 16])
def test_conv2d_same_is_quantized_as_its_layer_and_runs_in_onnx_runtime(size, tmp_path):
    torch.manual_seed(0)
    model, x = SameNet().eval(), torch.randn(4, 3, size, size)
    qat = prepares_whole(model, x[:1], qatkit.QATConfig(weight_bits=8, act_bits=8))
    assert [(r["name"], r["bn_folded"], r["act"]) for r in qat.qat_info.layers] == [
        ("stem", True, "relu"), ("dw", True, "relu"), ("fc", False, None)]
    assert not [op for op in qat.qat_info.float_ops if "conv" in op or "ceil" in op]
    qatkit.calibrate(qat, [torch.randn(4, 3, size, size) for _ in range(4)])
    integer = converts_exactly(qat, model, x, tolerance=0.05)
    assert runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")["max_step_diff"] == 0
    assert qat.qat_info.input_sizes["x"] == [None, 3, None, None]  # the pads follow the image size
    other = torch.randn(2, 3, size + 3, size + 3)
    with torch.no_grad():
        assert torch.equal(integer(other), qat(other))
    runs_in_onnx_runtime(integer, other, tmp_path / "other.onnx")


class StdConv2d(nn.Conv2d):  # timm's weight standardization (BiT)
    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):  # timm's (NFNet): standardized, times a trained gain per output channel
    def __init__(self, *args, gamma=1.0, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale, self.eps = gamma * self.weight[0].numel() ** -0.5, eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StandardizedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = StdConv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv, self.fc = ScaledStdConv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _standardized64(weight, gain=None, scale=1.0, eps=1e-6):
    w = weight.double().flatten(1)
    w = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, unbiased=False, keepdim=True) + eps)
    return (w if gain is None else w * (gain.double().flatten(1) * scale)).reshape(weight.shape)


def test_standardized_weights_are_quantized_as_computed_and_train(tmp_path):
    torch.manual_seed(0)
    model, x = StandardizedNet().eval(), torch.randn(4, 3, 8, 8)
    qat = prepares_whole(model, x[:1], qatkit.QATConfig(weight_bits=8, act_bits=8))
    assert [(r["name"], r["bn_folded"], r["act"]) for r in qat.qat_info.layers] == [
        ("stem", True, "relu"), ("conv", False, "relu"), ("fc", False, None)]
    assert qat.qat_info.float_ops == []
    stem, conv = qat.get_submodule("stem"), qat.get_submodule("conv")
    gain = next(p for n, p in conv.named_parameters() if n.endswith("gain"))
    weight = conv.parametrizations.weight.original
    torch.testing.assert_close(stem.weight.double(), _standardized64(stem.parametrizations.weight.original),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(conv.folded()[0].double(), _standardized64(weight, gain, model.conv.scale),
                               rtol=0, atol=1e-5)
    qatkit.calibrate(qat, [torch.randn(4, 3, 8, 8) for _ in range(4)])
    integer = converts_exactly(qat, model, x, tolerance=0.05)
    assert runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")["max_step_diff"] == 0
    qat.train()
    qat(x).square().mean().backward()
    assert gain.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


class MergedLoRA(nn.Linear):  # the update merged into the weight the layer multiplies by
    def __init__(self, *args, rank=2, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_a = nn.Parameter(0.1 * torch.randn(rank, self.in_features))
        self.lora_b = nn.Parameter(0.1 * torch.randn(self.out_features, rank))

    def forward(self, x):
        return F.linear(x, self.weight + self.lora_b @ self.lora_a, self.bias)


class LoRANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 16), MergedLoRA(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_a_merged_lora_weight_is_quantized_and_its_factors_train(tmp_path):
    torch.manual_seed(0)
    model, x = LoRANet().eval(), torch.randn(8, 6)
    qat = prepares_whole(model, x[:1], qatkit.QATConfig(weight_bits=4, act_bits=8))
    assert [(r["name"], r["act"]) for r in qat.qat_info.layers] == [("fc1", "relu"), ("fc2", "relu"), ("head", None)]
    fc2 = qat.get_submodule("fc2")
    a, b = (next(p for n, p in fc2.named_parameters() if n.endswith(k)) for k in ("lora_a", "lora_b"))
    expected = fc2.parametrizations.weight.original.double() + b.double() @ a.double()
    torch.testing.assert_close(fc2.folded()[0].double(), expected, rtol=0, atol=1e-6)
    qatkit.calibrate(qat, [torch.randn(8, 6) for _ in range(4)])
    integer = converts_exactly(qat, model, x, tolerance=0.2)
    assert runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")["max_step_diff"] == 0
    qat.train()
    qat(x).square().mean().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


class TiedHead(nn.Linear):  # its own arithmetic on its weight, no F.linear or x @ W.t(): prepare leaves it float
    def forward(self, x):
        return (torch.tanh(x)[:, None, :] * self.weight).sum(-1)


class TiedHeadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 8), TiedHead(8, 3)

    def forward(self, x):
        return self.head(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


def test_first_last_bits_go_to_the_last_layer_quantized_when_a_planned_subclass_stays_float():
    model, x = TiedHeadNet().eval(), torch.randn(8, 6)
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=4, act_bits=4), x[:1])
    rows = {r["name"]: (r["weight_bits"], r["act_bits"]) for r in qat.qat_info.layers}
    assert rows == {"fc1": (8, 8), "fc2": (4, 4), "fc3": (8, 8)}  # fc3, not the float head, is the last layer
    assert qat.get_submodule("fc3").weight_quant.spec.bits == 8


class BareParameters(nn.Module):
    """Layers written as functions of the module's own parameters (research code, hypernetwork targets): a grouped,
    strided conv and a Linear."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(8) * 0.1)
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3)
        self.w1, self.b1 = nn.Parameter(torch.randn(4, 8) * 0.3), nn.Parameter(torch.zeros(4))

    def forward(self, x):
        x = torch.relu(F.conv2d(x, self.w, self.b, padding=1))
        x = torch.relu(F.conv2d(x, self.dw, None, 2, 1, 1, 8))
        return F.linear(x.mean((2, 3)), self.w1, self.b1)


def _conv64(x, w, b=None, **kw):
    return F.conv2d(x.double(), w.detach().double(), None if b is None else b.detach().double(), **kw)


def test_layers_on_bare_parameters_are_quantized_and_train_the_parameters(tmp_path):
    """They were left float (float32 weights in the integer model) and reported as ops with no integer kernel."""
    torch.manual_seed(0)
    model, x = BareParameters().eval(), torch.randn(8, 3, 12, 12)
    qat = prepares_whole(model, x, qatkit.QATConfig(weight_bits=4, act_bits=4))
    assert [(r["name"], r["weight_bits"]) for r in qat.qat_info.layers] == [("w_conv", 8), ("dw_conv", 4),
                                                                           ("w1_linear", 8)]
    assert not qat.qat_info.float_ops
    assert qat.w_conv.weight is qat.w and qat.w1_linear.bias is qat.b1  # the model's parameters, not copies
    ruled = qatkit.prepare(model, qatkit.QATConfig(weight_bits=4, act_bits=4, rules=(
        qatkit.LayerRule(pattern="dw_conv", weight_bits=2),)), x)  # a rule may name them
    assert {r["name"]: r["weight_bits"] for r in ruled.qat_info.layers}["dw_conv"] == 2
    reference = F.linear(torch.relu(_conv64(torch.relu(_conv64(x, model.w, model.b, padding=1)), model.dw, stride=2,
                                            padding=1, groups=8)).mean((2, 3)), model.w1.double(), model.b1.double())
    with torch.no_grad():  # the float model's arithmetic, in float64
        assert (model(x).double() - reference).abs().max() < 1e-5
    qatkit.calibrate(qat, [x])
    before = qat.dw.detach().clone()
    qat.train()
    loss = qat(x).square().mean()
    loss.backward()
    torch.optim.SGD(qat.parameters(), lr=0.1).step()
    assert not torch.equal(qat.dw, before)
    integer = converts_exactly(qat, model, x, tolerance=0.5)
    runs_in_onnx_runtime(integer, x, tmp_path / "bare.onnx")


class TiedOutputProjection(nn.Module):
    """fairseq's decoder with share_input_output_embed: logits = F.linear(features, self.embed_tokens.weight); minimal
    GPTs write it h @ self.wte.weight.T (or .t(), .transpose(0, 1))."""

    def __init__(self, spelling: str, vocab: int = 40, dim: int = 16):
        super().__init__()
        self.spelling = spelling
        self.embed_tokens, self.mix, self.norm = nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, ids):
        h, table = self.norm(torch.relu(self.mix(self.embed_tokens(ids)))), self.embed_tokens.weight
        return {"F.linear": lambda: F.linear(h, table), "@ .T": lambda: h @ table.T,
                ".t()": lambda: h.matmul(table.t()), "transpose": lambda: h @ table.transpose(-1, -2)}[self.spelling]()


@pytest.mark.parametrize("spelling", ["F.linear", "@ .T", ".t()", "transpose"])
def test_an_output_projection_on_the_embedding_table_is_quantized_and_stays_tied(spelling, tmp_path):
    """It was a float op (F.linear: float32 weights in the integer model) or a matmul of two 8-bit activations."""
    torch.manual_seed(0)
    model, ids = TiedOutputProjection(spelling).eval(), torch.randint(0, 40, (8, 6))
    qat = prepares_whole(model, ids, qatkit.QATConfig(weight_bits=4, act_bits=4))
    layers = {r["name"]: r["weight_bits"] for r in qat.qat_info.layers}
    # the table's plan (8 bits: the first layer); mix, the last module layer, keeps the last layer's 8 bits too
    assert layers == {"embed_tokens": 8, "mix": 8, "embed_tokens_weight_linear": 8}
    assert qat.embed_tokens_weight_linear.weight is qat.embed_tokens.weight
    qatkit.calibrate(qat, [ids])
    qat.train()
    torch.nn.functional.cross_entropy(qat(ids).flatten(0, 1), ids.flatten()).backward()
    torch.optim.SGD(qat.parameters(), lr=0.5).step()
    assert qat.embed_tokens_weight_linear.weight is qat.embed_tokens.weight  # still one table after a step
    integer = converts_exactly(qat, model, ids, tolerance=float("inf"))  # (trained: only QAT = integer)
    result = runs_in_onnx_runtime(integer, ids, tmp_path / "tied.onnx")
    assert result["output_step"] is not None  # integer logits: the head is an integer layer


class WeightOnly(nn.Module):
    """A Linear's weight used without its bias: F.linear(x, self.fc.weight) and x @ self.fc.weight.T."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling, self.fc = spelling, nn.Linear(8, 4)
        with torch.no_grad():
            self.fc.bias.fill_(5.0)

    def forward(self, x):
        return F.linear(x, self.fc.weight) if self.spelling == "F.linear" else x @ self.fc.weight.T


@pytest.mark.parametrize("spelling", ["F.linear", "@ .T"])
def test_a_linear_weight_used_without_its_bias_adds_no_bias(spelling, tmp_path):
    """prepare called the Linear itself, bias and all: every output 5.0 off the float model's."""
    torch.manual_seed(0)
    model, x = WeightOnly(spelling).eval(), torch.randn(16, 8)
    qat = prepares_whole(model, x[:2])
    assert [r["name"] for r in qat.qat_info.layers] == ["fc"]
    qatkit.calibrate(qat, [x])
    integer = converts_exactly(qat, model, x, tolerance=0.05)
    runs_in_onnx_runtime(integer, x, tmp_path / "weight_only.onnx")


class InOutWeights(nn.Module):
    """Weights stored (in, out) and multiplied from the right, as pygcn (`torch.mm(x, self.weight)`) and hand-written
    attention (`x @ self.W_q`) write them; W_k is read twice, so it stays a matmul of its own."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.W_q, self.W_k, self.W_v = (nn.Parameter(torch.randn(8, 8) * 0.3) for _ in range(3))
        self.W_o = nn.Parameter(torch.randn(8, 3) * 0.3)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        q, k, v = h @ self.W_q, torch.matmul(h, self.W_k), h.matmul(self.W_v)
        att = torch.softmax(q @ k.transpose(-1, -2) + (h @ self.W_k).mean(), -1)
        return torch.mm((att @ v).mean(1), self.W_o)


def test_weights_stored_in_out_are_quantized_as_layers_on_their_transpose(tmp_path):
    """x @ W of a parameter W (in, out) was a float matmul (float32 weights in the integer model)."""
    torch.manual_seed(0)
    model, x = InOutWeights().eval(), torch.randn(8, 5, 6)
    stored = {n: p.detach().clone() for n, p in model.named_parameters()}
    qat = prepares_whole(model, x[:2], qatkit.QATConfig(weight_bits=4, act_bits=8))
    layers = {r["name"]: r["weight_bits"] for r in qat.qat_info.layers}
    assert layers == {"embed": 8, "W_q_linear": 4, "W_v_linear": 4, "W_o_linear": 8}
    assert qat.W_q_linear.weight is qat.W_q and torch.equal(qat.W_q, model.W_q.T)  # trained in W_q's place
    assert all(torch.equal(p, stored[n]) for n, p in model.named_parameters())  # the float model keeps its own
    qatkit.calibrate(qat, [x])
    qat.train()
    qat(x).square().mean().backward()
    before = qat.W_o.detach().clone()
    torch.optim.SGD(qat.parameters(), lr=0.1).step()
    assert not torch.equal(qat.W_o, before)
    integer = converts_exactly(qat, model, x, tolerance=float("inf"))  # (trained: only QAT = integer)
    runs_in_onnx_runtime(integer, x, tmp_path / "in_out.onnx")
