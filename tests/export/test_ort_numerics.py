"""qatkit.export.ort_numerics against ONNX Runtime itself, bit for bit.

Every test builds a tiny QDQ model with onnx.helper, lets ORT optimize it (ORT_ENABLE_ALL, one thread, the
optimized graph saved to disk), checks which fused op ORT ran, and asserts np.array_equal between ORT's output
and the numpy function on thousands of values. Scales are drawn both at random and as powers of two / small
dyadic fractions, which put many results exactly on .5 ties (the tests count them to prove it).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from qatkit.export import ort_numerics as on  # noqa: E402

f32 = np.float32
U8 = (TP.UINT8, np.uint8, 0, 255)
S8 = (TP.INT8, np.int8, -128, 127)


# ----------------------------------------------------------------------------- helpers
def _model(nodes, inputs, outputs, inits, opset):
    graph = oh.make_graph(nodes, "g", inputs, outputs, [nh.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset), oh.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9 if opset >= 21 else 8
    onnx.checker.check_model(m)
    return m


def _run(model, feeds, tmp_path):
    """Run with ORT_ENABLE_ALL, 1 thread; return (outputs, [op_type of every node ORT kept])."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    path = tmp_path / "optimized.onnx"
    so.optimized_model_filepath = str(path)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, feeds)
    return out, [n.op_type for n in onnx.load(str(path)).graph.node]


def _vi(name, dt, rank):
    return oh.make_tensor_value_info(name, dt, [None] * rank)


def _dq(x, s, z, y, axis=None):
    return oh.make_node("DequantizeLinear", [x, s, z], [y], **({} if axis is None else {"axis": axis}))


def _q(x, s, z, y):
    return oh.make_node("QuantizeLinear", [x, s, z], [y])


def _rng(*key):
    """A generator seeded from the test parameters (stable across processes, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _scales(rng, tie, n_w):
    """(s_x, s_w[n_w] or scalar when n_w == 0, s_y). tie: powers of two with M = s_x*s_w/s_y in 2^-8..2^-6, so
    about 1 accumulator in 128 lands exactly on a .5 tie (use small weights so outputs stay in range)."""
    shape = (n_w,) if n_w else ()
    if tie:
        return f32(2.0**-5), (2.0 ** rng.integers(-9, -6, shape)).astype(f32), f32(2.0**-6)
    return f32(rng.uniform(0.005, 0.05)), rng.uniform(0.001, 0.02, shape).astype(f32), f32(rng.uniform(0.02, 0.3))


def _n_ties(acc, mult):
    v = acc.astype(f32) * mult
    return int(np.sum(v - np.floor(v) == 0.5))


# ----------------------------------------------------------------------------- QuantizeLinear
@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("act", [U8, S8], ids=["u8", "s8"])
def test_quantize_linear(act, opset, tmp_path):
    dt, npdt, qmin, qmax = act
    rng = np.random.default_rng(1)
    for scale, zp in [(f32(0.125), 3 if qmin else 128), (f32(rng.uniform(1e-3, 0.2)), int(rng.integers(qmin, qmax)))]:
        m = _model([_q("x", "s", "z", "y")], [_vi("x", TP.FLOAT, 1)], [_vi("y", dt, 1)],
                   {"s": scale, "z": np.array(zp, npdt)}, opset)
        k = rng.integers(-300, 300, 4000).astype(f32)
        ties = (k + f32(0.5)) * scale  # exact .5 ties when scale is a power of two
        x = np.concatenate([ties, np.nextafter(ties, f32(np.inf)), np.nextafter(ties, -f32(np.inf)),
                            rng.normal(0, 80 * scale, 4000).astype(f32), np.array([1e30, -1e30, np.inf, -np.inf], f32)])
        (y,), ops = _run(m, {"x": x}, tmp_path)
        assert ops == ["QuantizeLinear"]
        assert np.array_equal(y, on.quantize_linear(x, scale, zp, qmin, qmax))
        if scale != 0.125:  # a multiply by the reciprocal is NOT what ORT does
            assert not np.array_equal(y, np.clip(np.rint(x * (f32(1) / scale)) + zp, qmin, qmax))


def test_dequantize_linear(tmp_path):
    m = _model([_dq("x", "s", "z", "y")], [_vi("x", TP.UINT8, 1)], [_vi("y", TP.FLOAT, 1)],
               {"s": f32(0.0371), "z": np.array(77, np.uint8)}, 17)
    x = np.arange(256, dtype=np.uint8)
    (y,), _ = _run(m, {"x": x}, tmp_path)
    assert np.array_equal(y.view(np.int32), on.dequantize_linear(x, f32(0.0371), 77).view(np.int32))


def _stored(w, act):  # int8 weights as qatkit's export stores them for these activations
    return on.stored_weights(w, act[3] if act[2] >= 0 else None)


# ----------------------------------------------------------------------------- Conv
def _conv_model(w, b, s_x, z_x, s_w, s_y, z_y, *, act=U8, group=1, stride=1, pads=(0, 0, 0, 0), dil=1,
                relu=False, opset=17):
    dt, npdt, _, _ = act
    pc = np.ndim(s_w) > 0
    nodes = [_dq("xq", "sx", "zx", "xf"), _dq("w", "sw", "zw", "wf", 0 if pc else None)]
    inits = {"sx": f32(s_x), "zx": np.array(z_x, npdt), "w": _stored(w, act), "sw": s_w,
             "zw": on.weight_zero_point(_stored(w, act), np.shape(s_w)),
             "sy": f32(s_y), "zy": np.array(z_y, npdt)}
    ins = ["xf", "wf"]
    if b is not None:
        nodes.append(_dq("b", "sb", "zb", "bf", 0 if pc else None))
        inits.update(b=b, sb=(f32(s_x) * s_w).astype(f32), zb=np.zeros(np.shape(s_w), np.int32))
        ins.append("bf")
    nodes.append(oh.make_node("Conv", ins, ["yf"], group=group, strides=[stride] * 2, pads=list(pads), dilations=[dil] * 2))
    last = "yf"
    if relu:
        nodes.append(oh.make_node("Relu", ["yf"], ["yr"]))
        last = "yr"
    nodes.append(_q(last, "sy", "zy", "yq"))
    return _model(nodes, [_vi("xq", dt, 4)], [_vi("yq", dt, 4)], inits, opset)


CONV_CASES = {  # name: (C, K, k, group, stride, pads, dilation, relu, per_channel, bias)
    "3x3": (8, 16, 3, 1, 1, (1, 1, 1, 1), 1, False, True, True),
    "3x3_relu": (8, 16, 3, 1, 1, (1, 1, 1, 1), 1, True, True, True),
    "1x1_stride2": (16, 24, 1, 1, 2, (0, 0, 0, 0), 1, False, True, True),
    "depthwise": (16, 16, 3, 16, 1, (1, 1, 1, 1), 1, False, True, True),
    "depthwise_s2_relu": (16, 16, 3, 16, 2, (0, 1, 1, 0), 1, True, True, True),
    "grouped_dilated": (8, 8, 3, 2, 1, (2, 2, 2, 2), 2, False, True, True),
    "first_layer_5x5": (3, 32, 5, 1, 2, (2, 2, 2, 2), 1, False, True, True),
    "per_tensor_nobias": (8, 16, 3, 1, 1, (1, 1, 1, 1), 1, False, False, False),
}


@pytest.mark.parametrize("tie", [True, False], ids=["pow2", "random"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_qlinear_conv(case, tie, tmp_path):
    c, k, ks, group, stride, pads, dil, relu, pc, has_bias = CONV_CASES[case]
    rng = _rng(case, tie)
    s_x, s_w, s_y = _scales(rng, tie, k if pc else 0)
    z_x, z_y = int(rng.integers(0, 256)), 0 if relu else int(rng.integers(0, 256))
    wmax, bmax = (16, 2000) if tie else (128, 20000)
    w = rng.integers(-wmax + 1, wmax, (k, c // group, ks, ks)).astype(np.int8)
    b = rng.integers(-bmax, bmax, k).astype(np.int32) if has_bias else None
    opset = 21 if tie else 17
    m = _conv_model(w, b, s_x, z_x, s_w, s_y, z_y, group=group, stride=stride, pads=pads, dil=dil, relu=relu, opset=opset)
    x = rng.integers(0, 256, (2, c, 24, 25)).astype(np.uint8)
    (y,), ops = _run(m, {"xq": x}, tmp_path)
    assert "QLinearConv" in ops and "Conv" not in ops and "Relu" not in ops, ops
    ref = on.qlinear_conv(x, z_x, w, b, s_x, s_w, s_y, z_y, stride, pads, dil, group)
    assert y.shape == ref.shape and np.array_equal(y, ref)
    if tie:
        acc = on._conv_acc(x, z_x, w, b, stride, pads, dil, group)
        mult = np.broadcast_to(on.requant_multiplier(s_x, s_w, s_y), (k,)).reshape(1, -1, 1, 1)
        assert _n_ties(acc, mult) > 10


def test_requant_multiplier_order(tmp_path):
    """1x1 conv, w = [1, 127]: acc = (x0-zx) + 127 (x1-zx) sweeps every value in range, 256 channels whose
    multipliers differ by an ulp between evaluation orders; only f32(f32(s_x*s_w)/s_y) matches."""
    rng = np.random.default_rng(7)
    k = 256
    s_x, s_y = f32(0.0312), f32(0.173)
    s_w = (rng.uniform(0.007, 0.01, k) * s_y / s_x).astype(f32)
    w = np.zeros((k, 2, 1, 1), np.int8)
    w[:, 0], w[:, 1] = 1, 127
    m = _conv_model(w, np.zeros(k, np.int32), s_x, 131, s_w, s_y, 128)
    g = np.arange(256, dtype=np.uint8)
    x = np.stack(np.meshgrid(g, g, indexing="ij"))[None]
    (y,), ops = _run(m, {"xq": x}, tmp_path)
    assert "QLinearConv" in ops
    assert np.array_equal(y, on.qlinear_conv(x, 131, w, None, s_x, s_w, s_y, 128))
    acc = on._conv_acc(x, 131, w, None, 1, 0, 1, 1).astype(f32)
    for other in (s_x * (s_w / s_y), (s_x / s_y) * s_w, (s_x * s_w) * (f32(1) / s_y)):
        alt = np.clip(np.rint(acc * other.reshape(1, -1, 1, 1)) + 128, 0, 255)
        assert not np.array_equal(y, alt)


def test_qlinear_conv_saturation_prone(tmp_path):
    """x = 255, w = +-127: u8*s8 pair sums of 64770 would saturate the 16-bit (vpmaddubsw) kernel ORT runs on
    x86 CPUs without VNNI (ORT's reduce_range caveat); stored as uint8 + 128 they run its exact u8*u8 kernel."""
    assert on.stored_weights(np.int8([[64, -64]])).dtype == np.int8  # 2 * 255 * 64 = 32640 fits in int16
    assert np.array_equal(on.stored_weights(np.int8([[65, -127]])), np.uint8([[193, 1]]))
    assert on.stored_weights(np.int8([[127]]), x_max=15).dtype == np.int8  # 4-bit inputs: 2 * 15 * 127
    assert on.stored_weights(np.int8([[127]]), x_max=None).dtype == np.int8  # int8 inputs: s8*s8 is exact
    rng = np.random.default_rng(3)
    w = np.where(rng.random((16, 32, 3, 3)) < 0.5, -127, 127).astype(np.int8)
    w[:8] = 127
    s_w = np.full(16, 2.0**-10, f32)
    m = _conv_model(w, None, 2.0**-4, 0, s_w, 4.0, 7, pads=(1, 1, 1, 1))
    x = np.full((1, 32, 6, 6), 255, np.uint8)
    x[0, :, ::2] = rng.integers(0, 256, (32, 3, 6))
    (y,), _ = _run(m, {"xq": x}, tmp_path)
    assert np.array_equal(y, on.qlinear_conv(x, 0, w, None, f32(2.0**-4), s_w, f32(4.0), 7, 1, 1))


# ----------------------------------------------------------------------------- Gemm / MatMul
def _gemm_model(w, b, s_a, z_a, s_b, s_y, z_y, act, trans_b, out_q, relu, opset=17):
    dt, npdt, _, _ = act
    pc = np.ndim(s_b) > 0
    nodes = [_dq("xq", "sx", "zx", "xf"), _dq("w", "sw", "zw", "wf", (0 if trans_b else 1) if pc else None)]
    inits = {"sx": f32(s_a), "zx": np.array(z_a, npdt), "w": _stored(w, act), "sw": s_b,
             "zw": on.weight_zero_point(_stored(w, act), np.shape(s_b))}
    ins = ["xf", "wf"]
    if b is not None:
        nodes.append(_dq("b", "sb", "zb", "bf", 0 if pc else None))
        inits.update(b=b, sb=(f32(s_a) * s_b).astype(f32), zb=np.zeros(np.shape(s_b), np.int32))
        ins.append("bf")
    nodes.append(oh.make_node("Gemm", ins, ["yf"], transB=int(trans_b)))
    last = "yf"
    if relu:
        nodes.append(oh.make_node("Relu", ["yf"], ["yr"]))
        last = "yr"
    if out_q:
        nodes.append(_q(last, "sy", "zy", "yq"))
        inits.update(sy=f32(s_y), zy=np.array(z_y, npdt))
    out = _vi("yq", dt, 2) if out_q else _vi(last, TP.FLOAT, 2)
    return _model(nodes, [_vi("xq", dt, 2)], [out], inits, opset)


GEMM_CASES = {  # name: (act, trans_b, relu, bias, per_channel)
    "u8": (U8, True, False, True, True),
    "u8_relu": (U8, True, True, True, True),
    "u8_transB0_nobias": (U8, False, False, False, True),
    "u8_per_tensor": (U8, True, False, True, False),
    "s8": (S8, True, False, True, True),
    "s8_relu_zp_min": (S8, True, True, True, True),
}


@pytest.mark.parametrize("tie", [True, False], ids=["pow2", "random"])
@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_qgemm(case, tie, tmp_path):
    act, trans_b, relu, has_bias, pc = GEMM_CASES[case]
    _, npdt, qmin, qmax = act
    rng = _rng(case, tie)
    m_, k, n = 160, 200, 48
    s_a, s_b, s_y = _scales(rng, tie, n if pc else 0)
    z_a, z_y = int(rng.integers(qmin, qmax + 1)), qmin if relu else int(rng.integers(qmin, qmax + 1))
    wmax, bmax = (16, 3000) if tie else (128, 30000)
    w = rng.integers(-wmax + 1, wmax, (n, k) if trans_b else (k, n)).astype(np.int8)
    b = rng.integers(-bmax, bmax, n).astype(np.int32) if has_bias else None
    x = rng.integers(qmin, qmax + 1, (m_, k)).astype(npdt)
    (y,), ops = _run(_gemm_model(w, b, s_a, z_a, s_b, s_y, z_y, act, trans_b, True, relu, 21 if tie else 17),
                     {"xq": x}, tmp_path)
    assert ops[0] == "QGemm" and "Gemm" not in ops and "Relu" not in ops, ops
    assert np.array_equal(y, on.qgemm(x, z_a, w, b, s_a, s_b, s_y, z_y, qmin, qmax, trans_b=trans_b))
    if tie:
        assert _n_ties(on._gemm_acc(x, z_a, w, b, trans_b), on.requant_multiplier(s_a, s_b, s_y)) > 5


@pytest.mark.parametrize("act", [U8, S8], ids=["u8", "s8"])
@pytest.mark.parametrize("pc", [True, False], ids=["per_channel", "per_tensor"])
def test_qgemm_float_output(act, pc, tmp_path):
    _, npdt, qmin, qmax = act
    rng = np.random.default_rng(11)
    s_a, s_b, _ = _scales(rng, False, 40 if pc else 0)
    w = rng.integers(-127, 128, (40, 300)).astype(np.int8)
    b = rng.integers(-30000, 30000, 40).astype(np.int32)
    x = rng.integers(qmin, qmax + 1, (50, 300)).astype(npdt)
    (y,), ops = _run(_gemm_model(w, b, s_a, 5, s_b, None, None, act, True, False, False), {"xq": x}, tmp_path)
    assert ops[0] == "QGemm" and "Gemm" not in ops and "DequantizeLinear" not in ops, ops
    ref = on.qgemm_float_output(x, 5, w, b, s_a, s_b)
    assert y.dtype == np.float32 and np.array_equal(y.view(np.int32), ref.view(np.int32))


def _matmul_model(w, s_a, z_a, s_b, s_y, z_y, act, rank, out_q):
    dt, npdt, _, _ = act
    pc = np.ndim(s_b) > 0
    nodes = [_dq("xq", "sx", "zx", "xf"), _dq("w", "sw", "zw", "wf", 1 if pc else None),
             oh.make_node("MatMul", ["xf", "wf"], ["yf"])]
    inits = {"sx": f32(s_a), "zx": np.array(z_a, npdt), "w": _stored(w, act), "sw": s_b,
             "zw": on.weight_zero_point(_stored(w, act), np.shape(s_b))}
    if out_q:
        nodes.append(_q("yf", "sy", "zy", "yq"))
        inits.update(sy=f32(s_y), zy=np.array(z_y, npdt))
    out = _vi("yq", dt, rank) if out_q else _vi("yf", TP.FLOAT, rank)
    return _model(nodes, [_vi("xq", dt, rank)], [out], inits, 17)


@pytest.mark.parametrize("tie", [True, False], ids=["pow2", "random"])
@pytest.mark.parametrize("shape", [(64, 150), (3, 20, 150)], ids=["2d", "3d"])
@pytest.mark.parametrize("pc", [True, False], ids=["per_channel", "per_tensor"])
def test_qlinear_matmul(shape, pc, tie, tmp_path):
    rng = _rng(shape, pc, tie)
    s_a, s_b, s_y = _scales(rng, tie, 32 if pc else 0)
    wmax = 16 if tie else 128
    w = rng.integers(-wmax + 1, wmax, (150, 32)).astype(np.int8)
    x = rng.integers(0, 256, shape).astype(np.uint8)
    (y,), ops = _run(_matmul_model(w, s_a, 100, s_b, s_y, 9, U8, len(shape), True), {"xq": x}, tmp_path)
    assert ops == ["QLinearMatMul"]
    assert np.array_equal(y, on.qlinear_matmul(x, 100, w, s_a, s_b, s_y, 9))
    if tie:
        acc = (x.astype(np.int64) - 100) @ w.astype(np.int64)
        assert _n_ties(acc, on.requant_multiplier(s_a, s_b, s_y)) > 5


@pytest.mark.parametrize("pc", [True, False], ids=["per_channel", "per_tensor"])
def test_matmul_integer_to_float(pc, tmp_path):
    rng = np.random.default_rng(4)
    s_a, s_b, _ = _scales(rng, False, 32 if pc else 0)
    w = rng.integers(-127, 128, (150, 32)).astype(np.int8)
    x = rng.integers(0, 256, (3, 20, 150)).astype(np.uint8)
    (y,), ops = _run(_matmul_model(w, s_a, 100, s_b, None, None, U8, 3, False), {"xq": x}, tmp_path)
    assert ops == ["MatMulIntegerToFloat"]
    assert np.array_equal(y.view(np.int32), on.matmul_integer_to_float(x, 100, w, s_a, s_b).view(np.int32))


# ----------------------------------------------------------------------------- Add / pools / concat
def _all_pairs(npdt, qmin, qmax, shape=(4, 16, 32, 32)):
    g = np.arange(qmin, qmax + 1)
    a, b = np.meshgrid(g, g, indexing="ij")
    return a.reshape(shape).astype(npdt), b.reshape(shape).astype(npdt)


@pytest.mark.parametrize("scales", ["pow2", "dyadic", "random"])
@pytest.mark.parametrize("relu", [False, True], ids=["add", "add_relu"])
@pytest.mark.parametrize("act", [U8, S8], ids=["u8", "s8"])
def test_qlinear_add(act, relu, scales, tmp_path):
    dt, npdt, qmin, qmax = act
    rng = _rng(act[0], relu, scales)
    for _ in range(3):
        if scales == "pow2":
            s_a, s_b, s_c = (f32(2.0 ** rng.integers(-8, -2)) for _ in range(3))
        elif scales == "dyadic":
            s_a, s_b, s_c = f32(rng.integers(1, 16) / 64), f32(rng.integers(1, 16) / 64), f32(rng.integers(1, 16) / 32)
        else:
            s_a, s_b, s_c = (f32(rng.uniform(0.005, 0.1)) for _ in range(3))
        z_a, z_b = (int(v) for v in rng.integers(qmin, qmax + 1, 2))
        z_c = qmin if relu else int(rng.integers(qmin, qmax + 1))
        nodes = [_dq("aq", "sa", "za", "af"), _dq("bq", "sb", "zb", "bf"), oh.make_node("Add", ["af", "bf"], ["cf"])]
        if relu:
            nodes.append(oh.make_node("Relu", ["cf"], ["cr"]))
        nodes.append(_q("cr" if relu else "cf", "sc", "zc", "cq"))
        z = lambda v: np.array(v, npdt)  # noqa: E731
        m = _model(nodes, [_vi("aq", dt, 4), _vi("bq", dt, 4)], [_vi("cq", dt, 4)],
                   {"sa": s_a, "za": z(z_a), "sb": s_b, "zb": z(z_b), "sc": s_c, "zc": z(z_c)}, 17)
        a, b = _all_pairs(npdt, qmin, qmax)  # every (a, b) pair: 65536 outputs
        a, b = a[:, :, :31, :29].copy(), b[:, :, :31, :29].copy()  # odd lengths exercise the kernel's tail
        (y,), ops = _run(m, {"aq": a, "bq": b}, tmp_path)
        assert ops == ["QLinearAdd"]
        assert np.array_equal(y, on.qlinear_add(a, s_a, z_a, b, s_b, z_b, s_c, z_c, qmin, qmax))
        b1 = b[:1, :, :1, :1].copy()  # broadcast (per-channel B)
        (y,), _ = _run(m, {"aq": a, "bq": b1}, tmp_path)
        assert np.array_equal(y, on.qlinear_add(a, s_a, z_a, b1, s_b, z_b, s_c, z_c, qmin, qmax))


@pytest.mark.parametrize("hw", [(7, 7), (1, 1), (13, 11), (32, 32)])
@pytest.mark.parametrize("act", [U8, S8], ids=["u8", "s8"])
def test_qlinear_global_avgpool(act, hw, tmp_path):
    dt, npdt, qmin, qmax = act
    rng = _rng(act[0], hw)
    for s_x, s_y in [(f32(2.0**-5), f32(2.0**-4)), (f32(rng.uniform(0.01, 0.1)), f32(rng.uniform(0.01, 0.1)))]:
        z_x, z_y = (int(v) for v in rng.integers(qmin, qmax + 1, 2))
        m = _model([_dq("xq", "sx", "zx", "xf"), oh.make_node("GlobalAveragePool", ["xf"], ["yf"]), _q("yf", "sy", "zy", "yq")],
                   [_vi("xq", dt, 4)], [_vi("yq", dt, 4)],
                   {"sx": s_x, "zx": np.array(z_x, npdt), "sy": s_y, "zy": np.array(z_y, npdt)}, 17)
        x = rng.integers(qmin, qmax + 1, (4, 250) + hw).astype(npdt)
        (y,), ops = _run(m, {"xq": x}, tmp_path)
        assert ops == ["QLinearGlobalAveragePool"]
        assert np.array_equal(y, on.qlinear_global_avgpool(x, s_x, z_x, s_y, z_y, qmin, qmax))


def test_qlinear_global_avgpool_scale_order(tmp_path):
    """Channels whose sums sweep every value 0..255*HW; scale pairs picked where f32(s_x / f32(s_y * HW)) rounds
    some output differently from (s_x / s_y) / HW: ORT must follow the former."""
    rng = np.random.default_rng(12)
    h, w = 3, 3
    hw = h * w
    sums = np.arange(255 * hw + 1)
    x = np.clip(sums[:, None] - 255 * np.arange(hw)[None, :], 0, 255).astype(np.uint8).reshape(1, -1, h, w)
    found = 0
    for _ in range(20000):  # about 1 draw in 600 discriminates
        if found == 6:
            break
        s_x, z_x = f32(rng.uniform(0.01, 0.1)), int(rng.integers(0, 256))
        s_y = f32(s_x * rng.uniform(0.97, 1.05))
        acc = (sums - z_x * hw).astype(f32)
        alt = np.clip(np.rint(acc * ((s_x / s_y) / f32(hw))) + 128, 0, 255)
        ref = on.qlinear_global_avgpool(x, s_x, z_x, s_y, 128).ravel()
        if np.array_equal(ref, alt):
            continue
        found += 1
        m = _model([_dq("xq", "sx", "zx", "xf"), oh.make_node("GlobalAveragePool", ["xf"], ["yf"]), _q("yf", "sy", "zy", "yq")],
                   [_vi("xq", TP.UINT8, 4)], [_vi("yq", TP.UINT8, 4)],
                   {"sx": s_x, "zx": np.array(z_x, np.uint8), "sy": s_y, "zy": np.array(128, np.uint8)}, 17)
        (y,), _ = _run(m, {"xq": x}, tmp_path)
        assert np.array_equal(y.ravel(), ref)
    assert found == 6


AVGPOOL_CASES = {"k2s2": (2, 2, 0, False), "k3s1p1": (3, 1, 1, False), "k3s2p1_incl": (3, 2, 1, True), "k2s1": (2, 1, 0, False)}


@pytest.mark.parametrize("case", list(AVGPOOL_CASES))
@pytest.mark.parametrize("act", [U8, S8], ids=["u8", "s8"])
def test_qlinear_avgpool(act, case, tmp_path):
    dt, npdt, qmin, qmax = act
    k, s, p, incl = AVGPOOL_CASES[case]
    rng = _rng(act[0], case)
    for s_x, s_y in [(f32(2.0**-5), f32(2.0**-5)), (f32(rng.uniform(0.01, 0.1)), f32(rng.uniform(0.01, 0.1)))]:
        z_x, z_y = (int(v) for v in rng.integers(qmin, qmax + 1, 2))
        pool = oh.make_node("AveragePool", ["xf"], ["yf"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4,
                            count_include_pad=int(incl))
        m = _model([_dq("xq", "sx", "zx", "xf"), pool, _q("yf", "sy", "zy", "yq")], [_vi("xq", dt, 4)], [_vi("yq", dt, 4)],
                   {"sx": s_x, "zx": np.array(z_x, npdt), "sy": s_y, "zy": np.array(z_y, npdt)}, 17)
        x = rng.integers(qmin, qmax + 1, (2, 16, 12, 13)).astype(npdt)
        (y,), ops = _run(m, {"xq": x}, tmp_path)
        assert ops == ["QLinearAveragePool"]
        assert np.array_equal(y, on.qlinear_avgpool(x, s_x, z_x, s_y, z_y, k, s, p, incl, qmin, qmax))


@pytest.mark.parametrize("act", [U8, S8], ids=["u8", "s8"])
def test_qlinear_concat(act, tmp_path):
    dt, npdt, qmin, qmax = act
    rng = np.random.default_rng(5)
    s_y, z_y = f32(0.05), int(rng.integers(qmin, qmax + 1))
    params = [(f32(0.037), int(rng.integers(qmin, qmax + 1))), (s_y, z_y), (f32(2.0**-4), 0), (f32(0.1), z_y)]
    nodes = [_dq(f"x{i}", f"s{i}", f"z{i}", f"f{i}") for i in range(4)]
    nodes += [oh.make_node("Concat", [f"f{i}" for i in range(4)], ["cf"], axis=1), _q("cf", "sy", "zy", "yq")]
    inits = {"sy": s_y, "zy": np.array(z_y, npdt)}
    for i, (s, z) in enumerate(params):
        inits.update({f"s{i}": s, f"z{i}": np.array(z, npdt)})
    m = _model(nodes, [_vi(f"x{i}", dt, 4) for i in range(4)], [_vi("yq", dt, 4)], inits, 17)
    every = np.broadcast_to(np.arange(qmin, qmax + 1).astype(npdt).reshape(1, 256, 1, 1), (2, 256, 3, 5)).copy()
    xs = [every, rng.integers(qmin, qmax + 1, (2, 7, 3, 5)).astype(npdt), every, every]
    (y,), ops = _run(m, {f"x{i}": x for i, x in enumerate(xs)}, tmp_path)
    assert ops == ["QLinearConcat"]
    ref = on.qlinear_concat([(x, s, z) for x, (s, z) in zip(xs, params)], s_y, z_y, 1, qmin, qmax)
    assert np.array_equal(y, ref)


# ----------------------------------------------------------------------------- what ORT does NOT fuse
def test_unfused_patterns(tmp_path):
    """int8-activation Conv/MatMul (x86: QDQIsInt8Allowed() is false), Relu before a Q whose zero point is not
    qmin, and shape/max ops whose DQ and Q differ all stay as float ops; same-parameter MaxPool / Transpose /
    Flatten drop their DQ/Q pair and run on the uint8 tensor."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (8, 8, 3, 3)).astype(np.int8)
    s_w = np.full(8, 0.01, f32)
    _, ops = _run(_conv_model(w, None, 0.02, 0, s_w, 0.1, 3, act=S8, pads=(1, 1, 1, 1)),
                  {"xq": np.zeros((1, 8, 5, 5), np.int8)}, tmp_path)
    assert "QLinearConv" not in ops and "Conv" in ops
    _, ops = _run(_conv_model(w, None, 0.02, 128, s_w, 0.1, 10, relu=True, pads=(1, 1, 1, 1)),
                  {"xq": np.zeros((1, 8, 5, 5), np.uint8)}, tmp_path)
    assert "QLinearConv" not in ops and "FusedConv" in ops
    _, ops = _run(_matmul_model(w[:, :, 0, 0].copy(), 0.02, 0, s_w, 0.1, 3, S8, 2, True), {"xq": np.zeros((2, 8), np.int8)}, tmp_path)
    assert ops == ["DequantizeLinear", "DequantizeLinear", "MatMul", "QuantizeLinear"]

    x = rng.integers(0, 256, (2, 4, 8, 6)).astype(np.uint8)
    pool = lambda i, o: oh.make_node("MaxPool", [i], [o], kernel_shape=[2, 2], strides=[2, 2])  # noqa: E731
    perm = lambda i, o: oh.make_node("Transpose", [i], [o], perm=[0, 2, 3, 1])  # noqa: E731
    maxpool_np = lambda v: v.reshape(2, 4, 4, 2, 3, 2).max(axis=(3, 5))  # noqa: E731
    for make, fn in [(pool, maxpool_np), (perm, lambda v: v.transpose(0, 2, 3, 1))]:
        for (s_y, z_y), fused in [((0.03, 100), True), ((0.05, 90), False)]:
            m = _model([_dq("xq", "sx", "zx", "xf"), make("xf", "yf"), _q("yf", "sy", "zy", "yq")], [_vi("xq", TP.UINT8, 4)],
                       [_vi("yq", TP.UINT8, 4)], {"sx": f32(0.03), "zx": np.array(100, np.uint8), "sy": f32(s_y),
                                                  "zy": np.array(z_y, np.uint8)}, 17)
            (y,), ops = _run(m, {"xq": x}, tmp_path)
            assert ("DequantizeLinear" not in ops) == fused, ops
            ref = fn(x) if fused else on.quantize_linear(fn(on.dequantize_linear(x, f32(0.03), 100)), s_y, z_y)
            assert np.array_equal(y, ref)


# ----------------------------------------------------------------------------- QLinearSoftmax
@pytest.mark.parametrize("length", [4, 16, 197])
def test_qlinear_softmax_at_output_scale_2_to_the_minus_8_is_the_float_softmaxs_codes(length, tmp_path):
    """ORT fuses DQ → Softmax → Q (uint8) into QLinearSoftmax, a lookup table; at s_y = 1/256, z_y = 0 (what prepare
    gives a softmax of integers, QuantSpec.unit_range) its codes are those of the unfused float pattern, for any input
    scale and zero point; at another output scale they are not (a step off here and there)."""
    rng = _rng("softmax", length)
    x = rng.integers(0, 256, (64, length)).astype(np.uint8)
    codes = {}
    for s_y in (1 / 256, 0.003):
        for s_x, z_x in ((0.02, 140), (0.11, 30), (0.4, 255)):
            inits = {"sx": f32(s_x), "zx": np.uint8(z_x), "sy": f32(s_y), "zy": np.uint8(0)}
            m = _model([_dq("x", "sx", "zx", "d"), oh.make_node("Softmax", ["d"], ["p"], axis=-1), _q("p", "sy", "zy", "y")],
                       [_vi("x", TP.UINT8, 2)], [_vi("y", TP.UINT8, 2)], inits, 17)
            (fused,), ops = _run(m, {"x": x}, tmp_path)
            assert ops == ["QLinearSoftmax"]
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            (plain,) = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
            codes[(s_y, s_x)] = (fused.astype(int), plain.astype(int))
    assert all(np.array_equal(f, p) for (s_y, _), (f, p) in codes.items() if s_y == 1 / 256)
    assert any(not np.array_equal(f, p) for (s_y, _), (f, p) in codes.items() if s_y != 1 / 256)
