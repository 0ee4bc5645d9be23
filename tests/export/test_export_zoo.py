"""ONNX export of every zoo model: ONNX Runtime fuses it into integer kernels and computes what qatkit computes."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qatkit
from qatkit.errors import QatkitError
from qatkit.export import export_onnx, verify
from qatkit.export.ort import session
from qatkit.models import MODEL_NAMES, build_model

INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearAdd", "QLinearGlobalAveragePool", "QLinearSigmoid", "QuantizeLinear",
               "DequantizeLinear", "Transpose", "Reshape", "MaxPool", "NhwcMaxPool", "Identity",
               "Pad"}  # on the uint8 codes: a stem's input channels padded to 4


def _prepared(name: str, bits: int, channels: int = 1, size: int = 8, n: int = 32, **config):
    torch.manual_seed(0)
    x = torch.randn(n, channels, size, size)
    qat = qatkit.prepare(build_model(name, num_classes=10, in_channels=channels, image_size=size),
                         qatkit.QATConfig(weight_bits=bits, act_bits=bits, **config), x[:2])
    qatkit.calibrate(qat, [x])
    return qat.eval(), x


def _optimized_ops(path, tmp_path) -> set[str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}


def _without_uint8_note(notes: list[str]) -> list[str]:
    return [n for n in notes if not n.startswith("8-bit weights stored as uint8")]


@pytest.mark.parametrize("reduce_range", [False, True])
def test_weight_storage_keeps_the_u8s8_kernels_from_saturating(reduce_range, tmp_path):
    """8-bit weights of layers with 8-bit inputs could overflow the int16 pair sums of ORT's u8·s8 kernel on CPUs
    without VNNI: stored as uint8 + 128 (zero point 128). With reduce_range they are 7-bit ([-64, 63]) and stay
    int8. Either way ORT computes qatkit's integers (on this machine, whatever its CPU); the notes say which layers
    and how to keep the fast kernel."""
    qat, x = _prepared("resnet20", 8, channels=3, size=16, reduce_range=reduce_range)
    path = tmp_path / "m.onnx"
    notes = export_onnx(qat, path, x[:1])
    graph = onnx.load(str(path)).graph
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    weights = [consts[n.input[0]] for n in graph.node  # the conv/gemm weights: constant DQ inputs of rank ≥ 2
               if n.op_type == "DequantizeLinear" and n.input[0] in consts and consts[n.input[0]].ndim >= 2]
    assert len(weights) == 22
    if reduce_range:
        assert all(w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 64 for w in weights)
        assert notes == ["7-bit weights are stored as int8 (ONNX Runtime has no 7-bit conv/gemm kernels)"]
    else:
        assert all(w.dtype == np.uint8 and np.abs(w.astype(int) - 128).max() > 64 for w in weights)
        assert len(notes) == 1 and notes[0].startswith("8-bit weights stored as uint8 with zero point 128 at: ")
        layers = notes[0].split(" at: ")[1].split(" (")[0].split(", ")  # module paths
        assert len(layers) == 22 and layers[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
        assert "--reduce-range" in notes[0]
    result = verify(path, qat, [x[:16], x[16:]])
    assert result["within_one_step"] == 1.0 and result["max_step_diff"] == 0.0


@pytest.mark.parametrize("name, channels", [("small-cnn", 1), ("resnet20", 3)])
def test_stem_input_channels_are_padded_to_four_exactly(name, channels, tmp_path):
    """A conv with 1 or 3 input channels gets zero-point channels on its integer input and zero weights for them
    (ORT's u8·s8 kernels run 4-aligned rows faster): the sums, so the outputs, stay the same."""
    qat, x = _prepared(name, 8, channels=channels, size=16, reduce_range=True)
    path = tmp_path / "m.onnx"
    export_onnx(qat, path, x[:1])
    graph = onnx.load(str(path)).graph
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    pads = [n for n in graph.node if n.op_type == "Pad"]
    assert len(pads) == 1
    (pad,) = pads
    quantize = next(n for n in graph.node if n.output[0] == pad.input[0])
    assert quantize.op_type == "QuantizeLinear" and pad.input[2] == quantize.input[2]  # padded with the zero point
    assert consts[pad.input[1]].tolist() == [0, 0, 0, 0, 0, 4 - channels, 0, 0]
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == pad.output[0])
    conv = next(n for n in graph.node if n.op_type == "Conv" and n.input[0] == dq.output[0])
    weights = consts[next(n for n in graph.node if n.output[0] == conv.input[1]).input[0]]
    assert weights.shape[1] == 4 and not weights[:, channels:].any() and weights[:, :channels].any()
    result = verify(path, qat, [x[:16], x[16:]])
    assert result["top1_agreement"] == 1.0 and result["max_step_diff"] == 0.0


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "mobilenetv2"])
def test_exact_adds_export_runs_integer_kernels_and_equals_qatkit(name, tmp_path):
    """exact_adds: a ReLU fused into an output whose zero point is above qmin (the shared skip quantizer) is an
    integer Clip after the Q, not a float Relu before it, so ORT still fuses every conv and add into its integer
    kernel: no float islands, and ORT computes qatkit's integers."""
    qat, x = _prepared(name, 8, exact_adds=True)
    path = tmp_path / "m.onnx"
    assert _without_uint8_note(export_onnx(qat, path, x[:1])) == []
    result = verify(path, qat, [x[:16], x[16:]])
    assert result["top1_agreement"] == 1.0 and result["max_step_diff"] == 0.0
    ops = _optimized_ops(path, tmp_path)
    assert {"QLinearConv", "QLinearAdd"} <= ops <= INTEGER_OPS | {"Clip"}, ops - INTEGER_OPS
    assert ("Clip" in ops) == name.startswith("resnet")  # MobileNetV2's adds have no ReLU: no such output
    graph = onnx.load(str(path)).graph
    quantized = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert all(n.input[0] in quantized for n in graph.node if n.op_type == "Clip")  # on the codes


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_w8a8_export_runs_integer_kernels_and_equals_qatkit(name, tmp_path):
    qat, x = _prepared(name, 8)
    path = tmp_path / "m.onnx"
    notes = export_onnx(qat, path, x[:1])
    result = verify(path, qat, [x[:16], x[16:]])
    assert result["n"] == 32 and result["top1_agreement"] == 1.0
    assert result["within_one_step"] == 1.0 and result["max_step_diff"] == 0.0  # the same integers
    ops = _optimized_ops(path, tmp_path)
    if name == "tiny-transformer":  # attention, LayerNorm and GELU have no integer kernels: listed in the notes
        assert {"QGemm"} <= ops and any("layer_norm" in n and "blocks.0.norm1" in n for n in notes)
    else:  # no float islands between quantized ops
        assert ops <= INTEGER_OPS, ops - INTEGER_OPS
        expected = ["sigmoid runs on dequantized (float) values at: act"] if name == "seed-mlp" else []
        assert _without_uint8_note(notes) == expected


@pytest.mark.parametrize("bits", [8, 4])
def test_signed_activations_export_as_uint8_and_run_integer_kernels(bits, tmp_path):
    """act_symmetric makes every activation not after a ReLU int8; ONNX Runtime on x86 ran the stem conv, the global
    pool and the classifier on such inputs as float ops (max step diff 4). They are stored as uint8 + 128, and the
    residual adds round their float32 sums as QLinearAdd does on those codes."""
    from qatkit.export.ort import per_layer

    qat, x = _prepared("resnet20", bits, channels=3, size=16, act_symmetric=True)
    assert qat.conv1.last_input_quant is None or qat.conv1.last_input_quant.qrange[0] < 0  # (the input is signed)
    path = tmp_path / "m.onnx"
    export_onnx(qat, path, x[:1])
    result = verify(path, qat, [x[:16], x[16:]])
    assert result["top1_agreement"] == 1.0 and result["max_step_diff"] == 0.0
    assert _optimized_ops(path, tmp_path) <= INTEGER_OPS | {"Clip"}  # (4-bit codes clamped in their 8-bit tensor)
    graph = onnx.load(str(path)).graph
    types = {t.name: t.data_type for t in graph.initializer}
    assert {types[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"} == {onnx.TensorProto.UINT8}
    assert per_layer(qatkit.convert(qat), x[:4]) == []  # (the debug outputs: the model's signed codes back)


@pytest.mark.parametrize("name", ["small-cnn", "resnet20"])
def test_w4a4_export_runs_int8_kernels_and_equals_qatkit(name, tmp_path):
    """4-bit weights in int8, 4-bit activations as uint8 codes clamped by an integer Clip after each Q: ONNX Runtime
    keeps its integer kernels and computes the same integers as the QAT model."""
    qat, x = _prepared(name, 4, channels=3, size=16)
    path = tmp_path / "m.onnx"
    notes = export_onnx(qat, path, x[:1])
    assert any("4-bit weights are stored as int8" in n for n in notes)
    assert any("16-level activations" in n and "clamped to [0, 15]" in n for n in notes)
    result = verify(path, qat, [x[:16], x[16:]])
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0 and result["max_step_diff"] == 0.0
    ops = _optimized_ops(path, tmp_path)
    assert "QLinearConv" in ops and "Clip" in ops and ops <= INTEGER_OPS | {"Clip"}, ops
    graph = onnx.load(str(path)).graph
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    bounds = {(int(consts[n.input[1]]), int(consts[n.input[2]])) for n in graph.node if n.op_type == "Clip"}
    assert bounds == {(0, 15)}


def test_resnet18_int8_onnx_is_under_27_percent_of_float(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=1000, in_channels=3, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "float.onnx"), dynamo=False, opset_version=17)
    qat = qatkit.prepare(model, qatkit.QATConfig(), x)
    qatkit.calibrate(qat, [x])
    export_onnx(qat, tmp_path / "int8.onnx", x[:1])
    ratio = (tmp_path / "int8.onnx").stat().st_size / (tmp_path / "float.onnx").stat().st_size
    assert ratio <= 0.27, ratio


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # control flow on data: torch.fx cannot trace it
            x = x * 2
        return self.fc(x)


def test_impossible_export_names_the_module_and_the_fix(tmp_path):
    x = torch.randn(8, 4)
    with pytest.warns(UserWarning, match="could not trace 'DataDependent'"):
        qat = qatkit.prepare(DataDependent(), qatkit.QATConfig(), x)
    qatkit.calibrate(qat, [x])
    with pytest.raises(QatkitError, match=r"'DataDependent' \(TraceError.*Fix: remove data-dependent control flow"):
        export_onnx(qat, tmp_path / "m.onnx", x[:1])
    assert not (tmp_path / "m.onnx").exists()


def test_session_on_a_broken_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(qatkit.ModelFileError, match=r"cannot be loaded by ONNX Runtime.*Fix: pass a file written by qatkit export"):
        session(bad)


def test_export_writes_the_oldest_ir_version_of_its_opset(tmp_path):
    """The installed onnx's newest IR version (onnx 1.23: 14) is refused by older ONNX Runtimes (1.30 refused a file
    written with it); the opset's own IR version (opset 17: 8) loads in every runtime that has the opset."""
    qat, x = _prepared("small-cnn", 8)
    export_onnx(qat, tmp_path / "m.onnx", x[:1])
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert proto.ir_version == onnx.helper.find_min_ir_version_for(proto.opset_import) == 8
    proto.ir_version = 99  # a file newer than this runtime: the error gives ORT's reason, not its source location
    onnx.save(proto, str(tmp_path / "future.onnx"))
    with pytest.raises(qatkit.ModelFileError, match=r"Unsupported model IR version: 99.*pip install -U onnxruntime"):
        session(tmp_path / "future.onnx")
